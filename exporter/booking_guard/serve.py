"""`booking-guard serve`: one process with /metrics, /healthz, the status page (/), the
due-verification loop (verify_due() every second) and the alert relay.

It listens on 127.0.0.1:9188 unless told otherwise, starts whether or not the database is
up, and never lets a slow or unreachable database hold a request past the scrape timeout.
"""

import json
import logging
import signal
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psycopg
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from booking_guard import status_page
from booking_guard.connection import connect, set_local_timeouts
from booking_guard.exporter import BoundedConnection, MetricsCollector
from booking_guard.health import DEFAULT_GRACE, LoopHealth, first_line
from booking_guard.relay import Relay, RelayConfig

log = logging.getLogger("booking_guard.serve")

DEFAULT_LISTEN = "127.0.0.1:9188"


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--listen wants HOST:PORT, not {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


class VerificationLoop:
    """Calls booking_guard.verify_due() every `interval` seconds on its own connection, then folds
    new events into the metric counters (fold_metrics()), so that scrapes find little left to fold.
    Each is a transaction of its own with a local statement_timeout (poolers, see connection.py)."""

    STATEMENT_MS = 30_000

    def __init__(self, dsn: str, interval: float = 1.0) -> None:
        self.dsn = dsn
        self.interval = interval
        self.verified = 0
        self.health = LoopHealth("verify_due", interval)
        self._problem: str | None = None

    @property
    def last_run(self) -> float | None:
        """Monotonic time of the last successful run."""
        return self.health.last_success

    def _report(self, problem: str | None) -> None:
        if problem is None:
            self.health.succeeded()
        else:
            self.health.failed(problem)
        if problem != self._problem:
            if problem:
                log.warning("verification loop: %s", problem)
            else:
                log.info("verification loop: running")
            self._problem = problem

    def _run_once(self, conn: psycopg.Connection) -> None:
        error: psycopg.Error | None = None
        try:
            with conn.transaction():
                set_local_timeouts(conn, self.STATEMENT_MS)
                self.verified += len(conn.execute("select call_id, verdict from booking_guard.verify_due()").fetchall())
        except psycopg.Error as failed:
            error = failed
        # folded even when verify_due() failed: the counters need not wait for it
        if not conn.broken:
            try:
                with conn.transaction():
                    set_local_timeouts(conn, self.STATEMENT_MS)
                    conn.execute("select booking_guard.fold_metrics(100000)")
            except psycopg.Error as failed:
                error = error or failed
        if error is not None:
            raise error

    def run(self, stop: threading.Event) -> None:
        conn: psycopg.Connection | None = None
        while not stop.is_set():
            started = time.monotonic()
            try:
                if conn is None or conn.closed:
                    conn = connect(self.dsn, "booking-guard verify_due")
                self._run_once(conn)
                self._report(None)
            except psycopg.Error as error:
                self._report(first_line(error))
                if conn is not None and (conn.closed or conn.broken):
                    conn = None
            stop.wait(max(0.0, self.interval - (time.monotonic() - started)))
        if conn is not None:
            conn.close()


@dataclass
class ServeConfig:
    dsn: str
    listen: str = DEFAULT_LISTEN
    scrape_timeout: float = 1.5
    verify_interval: float = 1.0
    verify: bool = True
    relay: RelayConfig | None = None
    health_grace: float = DEFAULT_GRACE     # see health.py


class Service:
    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.stop = threading.Event()
        self.metrics_db = BoundedConnection(config.dsn, config.scrape_timeout, "booking-guard exporter")
        self.page_db = BoundedConnection(config.dsn, config.scrape_timeout, "booking-guard status page")
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(MetricsCollector(self.metrics_db))
        self.verifier = VerificationLoop(config.dsn, config.verify_interval) if config.verify else None
        self.relay = Relay(config.relay) if config.relay else None
        self.threads: dict[str, threading.Thread] = {}
        host, port = parse_listen(config.listen)
        self.server = ThreadingHTTPServer((host, port), self._handler())
        self.server.daemon_threads = True

    @property
    def address(self) -> tuple[str, int]:
        return self.server.server_address[:2]

    def health(self) -> tuple[int, dict]:
        """200 while every thread runs and every loop has succeeded lately (health.py); else 503
        with the problems: which thread stopped, which loop fails and its last error."""
        now = time.monotonic()
        body: dict = {"status": "ok", "problems": [], "threads": {}, "loops": {}}
        for name, thread in self.threads.items():
            body["threads"][name] = "running" if thread.is_alive() else "stopped"
            if not thread.is_alive():
                body["problems"].append(f"thread {name} has stopped")
        loops = [("verify_due", self.verifier), ("relay", self.relay)]
        for name, loop in loops:
            if loop is None:
                continue
            state = loop.health.state(self.config.health_grace, now)
            body["loops"][name] = state
            if "problem" in state:
                body["problems"].append(state.pop("problem"))
        if self.verifier is not None:
            body["verify_due_last_run_seconds_ago"] = body["loops"]["verify_due"]["last_success_seconds_ago"]
            body["verify_due_problem"] = self.verifier._problem
        if body["problems"] and not self.stop.is_set():
            body["status"] = "degraded"
            return 503, body
        return 200, body

    def _handler(self):
        service = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "booking-guard"

            def _send(self, status: int, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    encoder, content_type = choose_encoder(self.headers.get("Accept"))
                    self._send(200, content_type, encoder(service.registry))
                elif path == "/healthz":
                    status, body = service.health()
                    self._send(status, "application/json", (json.dumps(body) + "\n").encode())
                elif path == "/":
                    status, page = status_page.page(service.page_db)
                    self._send(status, "text/html; charset=utf-8", page.encode())
                else:
                    self._send(404, "text/plain; charset=utf-8", b"not found: try /, /metrics or /healthz\n")

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - http.server's signature
                log.debug("%s %s", self.address_string(), format % args)

        return Handler

    def start(self) -> None:
        def spawn(name: str, target) -> None:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self.threads[name] = thread

        if self.verifier is not None:
            spawn("verify_due", lambda: self.verifier.run(self.stop))
        if self.relay is not None:
            spawn("relay", lambda: self.relay.run(self.stop))
        spawn("http", self.server.serve_forever)

    def shutdown(self) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()
        for name, thread in self.threads.items():
            if name != "http":
                thread.join(timeout=5)


def serve(config: ServeConfig) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    service = Service(config)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    service.start()
    host, port = service.address
    log.info("listening on http://%s:%s (/metrics, /healthz, /)", host, port)
    done.wait()
    service.shutdown()
    return 0
