"""What /healthz says about serve's background loops (the verification loop, the relay).

A loop is unhealthy when it has had no successful run for longer than the health grace plus its
own interval, counted from its last success (or from its start). That covers a loop that keeps
failing (a revoked grant, booking_guard not attached, a database or pooler down for minutes) and
one that hangs, while a database restart, a failover or a pooler reload that lasts less than the
grace leaves /healthz at 200: those show on /metrics as booking_guard_up 0, and restarting
serve would not make them end sooner.
"""

import threading
import time

DEFAULT_GRACE = 60.0


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class LoopHealth:
    def __init__(self, name: str, interval: float) -> None:
        self.name = name
        self.interval = interval
        self._lock = threading.Lock()
        self.started = time.monotonic()
        self.last_success: float | None = None
        self.failing_since: float | None = None
        self.failures = 0                       # consecutive failed runs
        self.last_error: str | None = None      # of the current streak of failures; None once a run succeeds
        self.details: dict[str, object] = {}    # what else the loop wants /healthz to show

    def succeeded(self) -> None:
        with self._lock:
            self.last_success = time.monotonic()
            self.failing_since = None
            self.failures = 0
            self.last_error = None

    def failed(self, error: str) -> None:
        with self._lock:
            if self.failing_since is None:
                self.failing_since = time.monotonic()
            self.failures += 1
            self.last_error = error

    def state(self, grace: float, now: float | None = None) -> dict[str, object]:
        now = time.monotonic() if now is None else now
        with self._lock:
            quiet = now - (self.last_success if self.last_success is not None else self.started)
            limit = grace + self.interval
            healthy = quiet <= limit
            state: dict[str, object] = {
                "healthy": healthy,
                "last_success_seconds_ago": None if self.last_success is None else round(now - self.last_success, 3),
                "failing_for_seconds": None if self.failing_since is None else round(now - self.failing_since, 3),
                "consecutive_failures": self.failures,
                "last_error": self.last_error,
                **self.details,
            }
            if not healthy:
                state["problem"] = (f"{self.name}: no successful run for {quiet:.0f} s (limit {limit:g} s)"
                                    + (f"; last error: {self.last_error}" if self.last_error else "; no run has ended"))
            return state
