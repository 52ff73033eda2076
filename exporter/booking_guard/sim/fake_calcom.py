"""A fake Cal.com for the simulator: a real HTTP server on 127.0.0.1 (an ephemeral port).

POST /v2/bookings with a JSON body answers 201 {"status": "success", "data": {"uid": "..."}} after
`latency` seconds, or 503 with probability `failure_rate`, or 503 always while an outage is on
(`outage_for(seconds)`, the demo's and soak's way to open the circuit breaker). Every booking it
made is kept in `ledger` (uid -> request body): the soak checks that none of them was lost.

The server runs in a daemon thread and stops by itself after `max_lifetime` seconds even if
nobody calls stop(), so an interrupted run never leaves it behind.
"""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["CalcomError", "FakeCalcom", "CalcomClient"]


class CalcomError(Exception):
    """Cal.com did not book (HTTP status other than 201, or no answer)."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive: one connection per worker, not one per booking
    server: _Server

    def log_message(self, *args: object) -> None:   # quiet: the simulator reports what matters
        pass

    def do_POST(self) -> None:   # noqa: N802 (http.server's naming)
        fake = self.server.fake
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path != "/v2/bookings":
            return self._answer(404, {"status": "error", "error": "not found"})
        if fake.latency:
            time.sleep(fake.latency * (0.5 + fake.rng.random()))
        if fake.failing():
            fake.count("failed")
            return self._answer(503, {"status": "error", "error": "service unavailable"})
        try:
            request = json.loads(body or b"{}")
        except ValueError:
            return self._answer(400, {"status": "error", "error": "bad json"})
        uid = fake.book(request)
        self._answer(201, {"status": "success", "data": {"uid": uid}})

    def _answer(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeCalcom


class FakeCalcom:
    def __init__(self, latency: float = 0.0, failure_rate: float = 0.0, seed: int | None = None,
                 max_lifetime: float = 3600.0) -> None:
        self.latency = latency
        self.failure_rate = failure_rate
        self.rng = random.Random(seed)
        self.ledger: dict[str, dict] = {}
        self.counts = {"booked": 0, "failed": 0}
        self._outage_until = 0.0
        self._lock = threading.Lock()
        self._seq = 0
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.fake = self
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="fake-calcom", daemon=True)
        self._timer = threading.Timer(max_lifetime, self.stop)
        self._timer.daemon = True

    def __enter__(self) -> FakeCalcom:
        self._thread.start()
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._timer.cancel()
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()

    def outage_for(self, seconds: float) -> None:
        """Every booking fails (503) for the next `seconds`."""
        self._outage_until = time.monotonic() + seconds

    def end_outage(self) -> None:
        self._outage_until = 0.0

    def in_outage(self) -> bool:
        return time.monotonic() < self._outage_until

    def failing(self) -> bool:
        return self.in_outage() or (self.failure_rate > 0 and self.rng.random() < self.failure_rate)

    def count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1

    def book(self, request: dict) -> str:
        with self._lock:
            self._seq += 1
            uid = f"cal-{self.port}-{self._seq}"
            self.ledger[uid] = request
            self.counts["booked"] += 1
        return uid


class CalcomClient:
    """One worker's keep-alive connection to the fake Cal.com."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.port = port
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def book(self, details: dict) -> str:
        """The booking's uid; CalcomError when Cal.com says no or does not answer."""
        body = json.dumps(details)
        for attempt in (1, 2):   # a kept-alive connection the server closed is reopened once, not retried further
            if self._conn is None:
                self._conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            try:
                self._conn.request("POST", "/v2/bookings", body, {"Content-Type": "application/json"})
                response = self._conn.getresponse()
                payload = json.loads(response.read() or b"{}")
            except (OSError, http.client.HTTPException) as error:
                self.close()
                if attempt == 2:
                    raise CalcomError(f"Cal.com unreachable: {error}") from error
                continue
            if response.status != 201:
                raise CalcomError(f"HTTP {response.status} from Cal.com: {payload.get('error')}")
            return payload["data"]["uid"]
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
