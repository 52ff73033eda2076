"""`booking-guard serve`: one process with /metrics, /probe, /healthz, the status page (/), the
due-verification loop (verify_due() every second) and the alert relay, for one database or a
fleet of them (its targets, see targets.py).

Every target has its own connections (scrapes, status page, verification loop, relay), its own
timeouts and its own loops, so a target that is down or slow delays and breaks no other. It
listens on 127.0.0.1:9188 unless told otherwise, starts whether or not the databases are up,
and never lets a slow or unreachable database hold a request past the scrape timeout.

    /metrics               every target's series, each labelled database="<target>"
    /probe?target=NAME     one configured target's series (Prometheus' multi-target pattern);
                           404 for a name that is not configured: never a connection string
    /healthz               200, or 503 when a thread died or a target's loop keeps failing
    /, /?target=NAME       the status page of the target (with several: / lists them)
"""

import dataclasses
import json
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import psycopg
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from booking_guard.ops import status_page
from booking_guard.ops.connection import connect, set_local_timeouts
from booking_guard.ops.exporter import BoundedConnection, MetricsCollector, TargetScraper
from booking_guard.ops.health import DEFAULT_GRACE, LoopHealth, first_line
from booking_guard.ops.relay import Relay, RelayConfig
from booking_guard.ops.runbooks import DEFAULT_BASE
from booking_guard.ops.targets import Target, implicit_name, unique

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

    def __init__(self, dsn: str, interval: float = 1.0, name: str | None = None) -> None:
        self.dsn = dsn
        self.interval = interval
        self.name = name            # the target's, for the log
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
            where = f"[{self.name}] " if self.name else ""
            if problem:
                log.warning("%sverification loop: %s", where, problem)
            else:
                log.info("%sverification loop: running", where)
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
    """What `booking-guard serve` runs. `targets` are the databases; without them `dsn` is the one
    target (named after its database, see targets.implicit_name). `relay`, when given, is the
    relay's configuration for every target (its `dsn` and `database` are the target's)."""

    dsn: str = ""
    listen: str = DEFAULT_LISTEN
    scrape_timeout: float = 1.5
    verify_interval: float = 1.0
    verify: bool = True
    relay: RelayConfig | None = None
    health_grace: float = DEFAULT_GRACE     # see health.py
    targets: list[Target] | None = None
    #: where the status page's runbook links point (runbooks.py)
    runbook_base: str = DEFAULT_BASE

    def __post_init__(self) -> None:
        self.targets = unique(self.targets) if self.targets else [Target(implicit_name(self.dsn), self.dsn)]


class TargetService:
    """One target's share of serve: its scrape and status-page connections, its verification loop
    and its relay, each on connections of its own."""

    def __init__(self, target: Target, config: ServeConfig) -> None:
        self.name = target.name
        self.dsn = target.dsn
        self.metrics_db = BoundedConnection(target.dsn, config.scrape_timeout, "booking-guard exporter")
        self.page_db = BoundedConnection(target.dsn, config.scrape_timeout, "booking-guard status page")
        self.scraper = TargetScraper(target.name, self.metrics_db)
        # /probe?target=NAME: this target alone, through the same scraper as /metrics
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(MetricsCollector([self.scraper]))
        self.verifier = VerificationLoop(target.dsn, config.verify_interval, target.name) if config.verify else None
        self.relay = (Relay(dataclasses.replace(config.relay, dsn=target.dsn, database=target.name))
                      if config.relay else None)
        self.threads: dict[str, threading.Thread] = {}

    def loops(self) -> list[tuple[str, VerificationLoop | Relay]]:
        return [(name, loop) for name, loop in (("verify_due", self.verifier), ("relay", self.relay)) if loop is not None]

    def health(self, grace: float, now: float) -> dict:
        """This target's part of /healthz: its threads, its loops (health.py) and their problems,
        each problem starting with the target's name."""
        body: dict = {"status": "ok", "problems": [], "threads": {}, "loops": {}}
        for name, thread in self.threads.items():
            body["threads"][name] = "running" if thread.is_alive() else "stopped"
            if not thread.is_alive():
                body["problems"].append(f"{self.name}: thread {name} has stopped")
        for name, loop in self.loops():
            state = loop.health.state(grace, now)
            if "problem" in state:
                body["problems"].append(f"{self.name}: {state.pop('problem')}")
            body["loops"][name] = state
        if body["problems"]:
            body["status"] = "degraded"
        return body


class Service:
    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.stop = threading.Event()
        self.targets = [TargetService(target, config) for target in config.targets]
        self.by_name = {t.name: t for t in self.targets}
        # /metrics: every target, scraped at the same time, each within its own timeout
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(MetricsCollector([t.scraper for t in self.targets]))
        self.threads: dict[str, threading.Thread] = {}
        host, port = parse_listen(config.listen)
        self.server = ThreadingHTTPServer((host, port), self._handler())
        self.server.daemon_threads = True

    @property
    def address(self) -> tuple[str, int]:
        return self.server.server_address[:2]

    def health(self) -> tuple[int, dict]:
        """200 while every thread runs and every target's loops have succeeded lately (health.py);
        else 503 with the problems: which thread stopped, which target's loop fails and its last error."""
        now = time.monotonic()
        body: dict = {"status": "ok", "problems": [], "threads": {}, "targets": {}}
        for name, thread in self.threads.items():
            body["threads"][name] = "running" if thread.is_alive() else "stopped"
            if not thread.is_alive():
                body["problems"].append(f"thread {name} has stopped")
        for target in self.targets:
            part = target.health(self.config.health_grace, now)
            body["targets"][target.name] = part
            body["problems"] += part["problems"]
        if body["problems"] and not self.stop.is_set():
            body["status"] = "degraded"
            return 503, body
        return 200, body

    def status(self, target_name: str | None) -> tuple[int, str]:
        """The status page: a target's page, or with several targets and none asked for, the list."""
        names = [t.name for t in self.targets]
        if target_name is None:
            if len(self.targets) > 1:
                now = time.monotonic()
                return 200, status_page.index([(t.name, t.health(self.config.health_grace, now)) for t in self.targets])
            target_name = names[0]
        target = self.by_name.get(target_name)
        if target is None:
            return 404, status_page.not_found(names)
        return status_page.page(target.page_db, database=target.name, targets=names if len(names) > 1 else (),
                                runbook_base=self.config.runbook_base)

    def _handler(self):
        service = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "booking-guard"

            def _send(self, status: int, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.send_header("X-Content-Type-Options", "nosniff")
                self.end_headers()
                self.wfile.write(body)

            def _text(self, status: int, line: str) -> None:
                self._send(status, "text/plain; charset=utf-8", (line + "\n").encode())

            def _metrics(self, registry: CollectorRegistry) -> None:
                encoder, content_type = choose_encoder(self.headers.get("Accept"))
                self._send(200, content_type, encoder(registry))

            def _target_param(self, query: str) -> tuple[str | None, str | None]:
                """(target, error): the one `target` of the query string, or why there is none usable."""
                values = parse_qs(query, keep_blank_values=True).get("target", [])
                if not values:
                    return None, None
                if len(values) > 1 or not values[0]:
                    return None, "give one target: ?target=NAME"
                return values[0], None

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                parts = urlsplit(self.path)
                path, query = parts.path, parts.query
                if path == "/metrics":
                    self._metrics(service.registry)
                elif path == "/probe":
                    # only a configured target's name is accepted: the exporter never connects to a
                    # server named in a request (anyone who can reach it could make it connect anywhere)
                    name, error = self._target_param(query)
                    if error or name is None:
                        self._text(400, error or "/probe wants ?target=NAME, a target of --target or --targets-file")
                    elif name not in service.by_name:
                        self._text(404, "unknown target: /probe serves only the targets the exporter was started with")
                    else:
                        self._metrics(service.by_name[name].registry)
                elif path == "/healthz":
                    status, body = service.health()
                    self._send(status, "application/json", (json.dumps(body) + "\n").encode())
                elif path == "/":
                    name, error = self._target_param(query)
                    if error:
                        self._text(400, error)
                        return
                    status, page = service.status(name)
                    self._send(status, "text/html; charset=utf-8", page.encode())
                else:
                    self._text(404, "not found: try /, /metrics, /probe?target=NAME or /healthz")

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - http.server's signature
                log.debug("%s %s", self.address_string(), format % args)

        return Handler

    def start(self) -> None:
        def spawn(owner: dict[str, threading.Thread], name: str, thread_name: str, target: Callable[[], None]) -> None:
            thread = threading.Thread(target=target, name=thread_name, daemon=True)
            thread.start()
            owner[name] = thread

        for t in self.targets:
            if t.verifier is not None:
                spawn(t.threads, "verify_due", f"verify_due {t.name}", lambda t=t: t.verifier.run(self.stop))
            if t.relay is not None:
                spawn(t.threads, "relay", f"relay {t.name}", lambda t=t: t.relay.run(self.stop))
        spawn(self.threads, "http", "http", self.server.serve_forever)

    def shutdown(self) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()
        deadline = time.monotonic() + 5
        for t in self.targets:
            for thread in t.threads.values():
                thread.join(timeout=max(0.0, deadline - time.monotonic()))


def serve(config: ServeConfig) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    service = Service(config)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    service.start()
    host, port = service.address
    log.info("listening on http://%s:%s (/metrics, /probe?target=NAME, /healthz, /) for %d target(s): %s",
             host, port, len(service.targets), ", ".join(t.name for t in service.targets))
    done.wait()
    service.shutdown()
    return 0
