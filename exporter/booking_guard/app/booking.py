"""The booking path from Python: record_booking() and retry_with_backoff().

    from booking_guard.app import record_booking, retry_with_backoff

    result = record_booking(conn, call_id=42, calcom_booking_id="cal-123",
                            appointment={"service_id": 7, "staff_id": 3, "starts_at": "2026-12-01T10:00Z"})
    if not result.success:
        ...  # the call is rolled back to creation_failed, alerted and queued for review

record_booking() is a thin wrapper around the SQL function booking_guard.record_booking(): it
runs in the connection's current transaction (with autocommit it commits at once; otherwise the
caller commits), and returns a BookingResult.

backoff_delay() is the pure-Python twin of SQL booking_guard.backoff_delay(): the same schedule,
arithmetic and argument checks, so a Python worker and the database agree on when to try again.
retry_with_backoff() calls fn until it succeeds, sleeping
backoff_delay(attempt) between failures, and re-raises the last error after max_attempts.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from psycopg.types.json import Jsonb

log = logging.getLogger("booking_guard.booking")

T = TypeVar("T")


def validation_reasons(conn: Any) -> dict[str, str]:
    """The reasons validate_appointment_creation() and record_booking() report, ok first, each with
    its description: read from booking_guard.validation_reasons, where SQL and the metrics read them
    too, so that the set is defined in one place."""
    return dict(conn.execute(
        "select reason, description from booking_guard.validation_reasons order by reason <> 'ok', reason").fetchall())


#: "seed" is 0.1.0's name of "exponential", still accepted.
STRATEGIES = ("exponential", "full", "seed")


@dataclass(frozen=True)
class BookingResult:
    """What booking_guard.record_booking() returned (type booking_guard.booking_result)."""

    success: bool
    reason: str
    details: dict[str, Any] = field(default_factory=dict)
    appointment_id: int | None = None
    #: False when the booking had been recorded before (the first appointment is returned).
    created: bool = False

    def __bool__(self) -> bool:
        return self.success


def record_booking(conn: Any, call_id: int, calcom_booking_id: str,
                   appointment: Mapping[str, Any] | None = None) -> BookingResult:
    """Record a Cal.com booking for a call: see booking_guard.record_booking() in the README.

    Bad input raises psycopg.Error with SQLSTATE BG005 (nothing is written); a failed
    validation is not an exception but a result with success False.
    """
    row = conn.execute(
        "select success, reason, details, appointment_id, created"
        " from booking_guard.record_booking(%s, %s, %s)",
        (call_id, calcom_booking_id, Jsonb(dict(appointment or {}))),
    ).fetchone()
    success, reason, details, appointment_id, created = row
    return BookingResult(success=success, reason=reason, details=details or {}, appointment_id=appointment_id,
                         created=created)


def backoff_delay(attempt: int, base: float = 1.0, factor: float = 2.0, max_delay: float = 60.0,
                  jitter: float = 0.1, strategy: str = "exponential", draw: float | None = None,
                  rng: Callable[[], float] = random.random) -> float:
    """Seconds to wait after failed attempt number `attempt` (1, 2, ...), as SQL backoff_delay().

    exponential: min(max_delay, base * factor**(attempt - 1)) * (1 + jitter * u)   (1 s, 2 s, 4 s, + 0-10 %)
    full:        min(max_delay, base * factor**(attempt - 1)) * u                  (AWS "full jitter")

    u is `draw` when given, else rng(), in [0, 1). Bad arguments raise ValueError.
    """
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
        raise ValueError(f"attempt must be an integer of 1 or more, not {attempt!r}")
    if not (base > 0 and max_delay > 0) or math.isinf(base):
        raise ValueError(f"base and max_delay must be positive, not {base!r} and {max_delay!r}")
    if not 1 <= factor <= 100:
        raise ValueError(f"factor must be between 1 and 100, not {factor!r}")
    if not 0 <= jitter <= 1:
        raise ValueError(f"jitter must be between 0 and 1, not {jitter!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}: one of {', '.join(STRATEGIES)}")
    u = rng() if draw is None else draw
    if not 0 <= u < 1:
        raise ValueError(f"draw must be in [0, 1), not {u!r}")
    # compared in logarithms, as in SQL, so that no attempt overflows
    if factor == 1 or (attempt - 1) * math.log(factor) < math.log(max_delay / base):
        capped = min(max_delay, base * math.pow(factor, attempt - 1))
    else:
        capped = max_delay
    if strategy == "full":
        return capped * u
    return capped * (1 + jitter * u)


def retry_with_backoff(fn: Callable[[], T], max_attempts: int = 3, *, base: float = 1.0, factor: float = 2.0,
                       max_delay: float = 60.0, jitter: float = 0.1, strategy: str = "exponential",
                       retry_on: type[BaseException] | tuple[type[BaseException], ...] = Exception,
                       sleep: Callable[[float], None] = time.sleep, rng: Callable[[], float] = random.random,
                       on_retry: Callable[[int, BaseException, float], None] | None = None) -> T:
    """Call fn() until it returns, at most max_attempts times.

    After failed attempt n (an exception in retry_on) it sleeps backoff_delay(n, ...) and tries
    again; after the last attempt the last exception is re-raised. Exceptions not in retry_on
    propagate at once. on_retry(attempt, error, delay) is called before each sleep; every
    attempt is logged. sleep and rng are parameters so that tests control time.
    """
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
        raise ValueError(f"max_attempts must be an integer of 1 or more, not {max_attempts!r}")
    backoff_delay(1, base, factor, max_delay, jitter, strategy, draw=0.0)   # check the schedule up front
    attempt = 0
    while True:
        attempt += 1
        try:
            result = fn()
        except retry_on as error:
            if attempt >= max_attempts:
                log.error("all %d attempts failed, last error: %s", max_attempts, error)
                raise
            delay = backoff_delay(attempt, base, factor, max_delay, jitter, strategy, rng=rng)
            log.warning("attempt %d of %d failed, retrying in %.3f s: %s", attempt, max_attempts, delay, error)
            if on_retry is not None:
                on_retry(attempt, error, delay)
            sleep(delay)
        else:
            log.info("succeeded at attempt %d of %d", attempt, max_attempts)
            return result
