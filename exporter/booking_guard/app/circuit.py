"""The booking_guard circuit breaker from Python.

    from psycopg.types.json import Jsonb
    from booking_guard.app import CircuitOpen, circuit

    try:
        with circuit(conn, f"appointment_booking:service:{service_id}"):
            book_in_calcom(...)
    except CircuitOpen as rejected:
        conn.execute("select booking_guard.queue_for_review(%s, 'calcom_booking_failed', %s)",
                     (call_id, Jsonb({"circuit_key": rejected.key, "retry_after": rejected.retry_after})))

`circuit()` acquires a permit (booking_guard.circuit_acquire), runs the block, and reports the
result: success on a normal exit, failure (with the exception's text) when the block raises. A
rejected call raises `CircuitOpen` before the block runs. Each breaker call is its own short
transaction, so the connection must be in autocommit or idle (not inside a transaction): nothing
is held while the block runs, and the breaker's state is shared at once with every other process.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import pq

__all__ = ["CircuitOpen", "circuit"]

CIRCUIT_OPEN = "BG001"
# DETAIL of BG001: "state: open, retry after: 30 s, opened at: ..., key: appointment_booking:service:1"
# (the key comes last and runs to the end, so a key may contain anything printable).
_DETAIL = re.compile(r"^state: (?P<state>\w+), retry after: (?:(?P<retry>\d+) s|unknown), .*?key: (?P<key>.*)\Z", re.S)
_ERROR_TEXT_LIMIT = 500


class CircuitOpen(Exception):
    """The breaker of `key` rejected the call (BG001): it is `state` (open or half_open) and a
    call may be admitted again in `retry_after` seconds (None: forced open until a reset)."""

    def __init__(self, key: str, state: str, retry_after: float | None, message: str = "") -> None:
        super().__init__(message or f"circuit breaker {key!r} is {state}")
        self.key = key
        self.state = state
        self.retry_after = retry_after

    @classmethod
    def from_error(cls, key: str, error: psycopg.Error) -> CircuitOpen:
        """Builds the exception from the server's BG001 error (its DETAIL carries the facts)."""
        match = _DETAIL.match(error.diag.message_detail or "")
        if match is None:
            return cls(key, "open", None, error.diag.message_primary or str(error))
        retry = match.group("retry")
        return cls(match.group("key"), match.group("state"), float(retry) if retry is not None else None,
                   error.diag.message_primary or str(error))


def _call(conn: psycopg.Connection, query: str, params: tuple) -> object:
    """Runs one breaker function in its own transaction and returns its value."""
    if conn.autocommit:
        return conn.execute(query, params).fetchone()[0]
    if conn.info.transaction_status != pq.TransactionStatus.IDLE:
        raise RuntimeError(
            "circuit(): the connection is inside a transaction; breaker calls must run in their own short "
            "transactions (use an autocommit connection, or commit first)")
    with conn.transaction():
        return conn.execute(query, params).fetchone()[0]


@contextmanager
def circuit(conn: psycopg.Connection, key: str, *, ignore: tuple[type[BaseException], ...] = ()) -> Iterator[int]:
    """Runs the block under the breaker of `key`; yields the permit.

    An exception of a type in `ignore` (a business answer such as "slot taken", not a failure of the
    service) is re-raised and reported as a success. BaseExceptions that are not Exceptions
    (KeyboardInterrupt, SystemExit) report nothing: the call did not finish, and a half-open trial
    permit that is never reported counts as a failure once its call timeout has passed.
    """
    try:
        permit = _call(conn, "select booking_guard.circuit_acquire(%s)", (key,))
    except psycopg.Error as error:
        if error.sqlstate == CIRCUIT_OPEN:
            raise CircuitOpen.from_error(key, error) from error
        raise
    try:
        yield permit
    except ignore:
        _call(conn, "select booking_guard.circuit_record_success(%s, %s)", (key, permit))
        raise
    except Exception as exc:
        text = f"{type(exc).__name__}: {exc}"[:_ERROR_TEXT_LIMIT]
        _call(conn, "select booking_guard.circuit_record_failure(%s, %s, %s)", (key, text, permit))
        raise
    else:
        _call(conn, "select booking_guard.circuit_record_success(%s, %s)", (key, permit))
