"""The booking_guard circuit breaker from Python.

    from psycopg.types.json import Jsonb
    from booking_guard.app import CircuitOpen, circuit

    scopes = [f"appointment_booking:service:{service_id}", f"appointment_booking:staff:{staff_id}",
              "appointment_booking:global"]
    try:
        with circuit(conn, scopes):
            book_in_calcom(...)
    except CircuitOpen as rejected:
        conn.execute("select booking_guard.queue_for_review(%s, 'calcom_booking_failed', %s)",
                     (call_id, Jsonb({"circuit_key": rejected.key, "retry_after": rejected.retry_after})))

`circuit()` acquires one permit for every scope (booking_guard.circuit_acquire), runs the block,
and reports the result to every scope with how long the call took (for the slow-call rate of
policies that have one): success on a normal exit, failure (with the exception's text) when the
block raises. A rejected call raises `CircuitOpen` before the block runs; it reads the key, state
and retry-after from the JSON DETAIL of BG001.

`call_timeout` (seconds) bounds the protected call. `circuit(...).call(fn, *args)` runs fn in a
worker thread and stops waiting for it after call_timeout: the call is abandoned (Python cannot
stop a thread; its eventual result or exception is dropped), a failure is reported, and
`CallTimeout` is raised. `call_async()` does the same for a coroutine with asyncio.timeout (like
asyncio.wait_for), which cancels it. A `with` block cannot be interrupted from outside: one that runs longer than
call_timeout is reported as a failure when it ends, and its outcome is left as it is (raising then
would hide a booking that did happen). An abandoned call may still complete on the far side:
protect it with an idempotency key (record_booking's booking id).

Each breaker call is its own short transaction, so the connection must be in autocommit or idle
(not inside a transaction): nothing is held while the call runs, and the breaker's state is shared
at once with every other process.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from types import TracebackType
from typing import Any, TypeVar

import psycopg
from psycopg import pq

__all__ = ["CallTimeout", "CircuitOpen", "call_async", "circuit"]

CIRCUIT_OPEN = "BG001"
_ERROR_TEXT_LIMIT = 500
_clock = time.monotonic   # times the calls (module-level, so that a test can stand in a clock of its own)
T = TypeVar("T")
Keys = str | Sequence[str]


class CircuitOpen(Exception):
    """The breaker of `key` rejected the call (BG001): it is `state` (open or half_open) and a
    call may be admitted again in `retry_after` seconds (None: forced open until a reset). Under
    several scopes, `key` is the scope that refuses longest."""

    def __init__(self, key: str, state: str, retry_after: float | None, message: str = "") -> None:
        super().__init__(message or f"circuit breaker {key!r} is {state}")
        self.key = key
        self.state = state
        self.retry_after = retry_after

    @classmethod
    def from_error(cls, key: str, error: psycopg.Error) -> CircuitOpen:
        """Builds the exception from the server's BG001 error: its DETAIL is a JSON object with
        key, state and retry_after_seconds."""
        message = error.diag.message_primary or str(error)
        try:
            facts = json.loads(error.diag.message_detail or "")
            retry = facts["retry_after_seconds"]
            return cls(str(facts["key"]), str(facts["state"]), float(retry) if retry is not None else None, message)
        except (ValueError, TypeError, KeyError):
            return cls(key, "open", None, message)


class CallTimeout(TimeoutError):
    """The protected call did not finish within call_timeout: it was abandoned and reported as a failure."""

    def __init__(self, keys: Keys, call_timeout: float) -> None:
        super().__init__(f"the call under {keys!r} did not finish within {call_timeout:g} s and was abandoned")
        self.keys = keys
        self.call_timeout = call_timeout


def _scopes(keys: Keys) -> str | list[str]:
    """The key parameter: one key as text, several as a list (sent as text[])."""
    return keys if isinstance(keys, str) else list(keys)


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


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:_ERROR_TEXT_LIMIT]


def _acquire_query(keys: str | list[str]) -> str:
    return ("select booking_guard.circuit_acquire(%s)" if isinstance(keys, str)
            else "select booking_guard.circuit_acquire(%s::text[])")


def _success_query(keys: str | list[str]) -> str:
    return ("select booking_guard.circuit_record_success(%s, %s, %s)" if isinstance(keys, str)
            else "select booking_guard.circuit_record_success(%s::text[], %s, %s)")


def _failure_query(keys: str | list[str]) -> str:
    return ("select booking_guard.circuit_record_failure(%s, %s, %s, %s)" if isinstance(keys, str)
            else "select booking_guard.circuit_record_failure(%s::text[], %s, %s, %s)")


class circuit:
    """Runs a call under the breakers of `keys` (one key, or several scopes that must all admit it).

        with circuit(conn, keys) as permit:       # the block is the call
            ...
        result = circuit(conn, keys, call_timeout=10).call(fn, *args, **kwargs)

    An exception of a type in `ignore` (a business answer such as "slot taken", not a failure of the
    service) is re-raised and reported as a success. BaseExceptions that are not Exceptions
    (KeyboardInterrupt, SystemExit) report nothing: the call did not finish, and a half-open trial
    permit that is never reported counts as a failure once its lease has passed.
    """

    def __init__(self, conn: psycopg.Connection, keys: Keys, *, ignore: tuple[type[BaseException], ...] = (),
                 call_timeout: float | None = None) -> None:
        if call_timeout is not None and not call_timeout > 0:
            raise ValueError(f"call_timeout must be a positive number of seconds, not {call_timeout!r}")
        self.conn = conn
        self.keys = _scopes(keys)
        self.ignore = ignore
        self.call_timeout = call_timeout
        self._permit: int | None = None
        self._started = 0.0

    # ---- the two halves of a call: a permit before it, its result after it

    def _acquire(self) -> int:
        try:
            permit = _call(self.conn, _acquire_query(self.keys), (self.keys,))
        except psycopg.Error as error:
            if error.sqlstate == CIRCUIT_OPEN:
                raise CircuitOpen.from_error(self.keys if isinstance(self.keys, str) else self.keys[0], error) from error
            raise
        self._permit = permit
        self._started = _clock()
        return permit

    def _elapsed(self) -> timedelta:
        return timedelta(seconds=_clock() - self._started)

    def _success(self, took: timedelta) -> None:
        _call(self.conn, _success_query(self.keys), (self.keys, self._permit, took))

    def _failure(self, error: str, took: timedelta) -> None:
        _call(self.conn, _failure_query(self.keys), (self.keys, error, self._permit, took))

    def _overran(self, took: timedelta) -> bool:
        return self.call_timeout is not None and took.total_seconds() > self.call_timeout

    # ---- the block as the call

    def __enter__(self) -> int:
        return self._acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        took = self._elapsed()
        if exc is None:
            if self._overran(took):
                self._failure(f"call_timeout: the call took {took.total_seconds():.3f} s, "
                              f"more than {self.call_timeout:g} s", took)
            else:
                self._success(took)
        elif isinstance(exc, self.ignore):
            self._success(took)
        elif isinstance(exc, Exception):
            self._failure(_error_text(exc), took)
        return False   # the exception, if any, goes on

    # ---- a function as the call, abandoned after call_timeout

    def call(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Runs fn(*args, **kwargs) under the breakers and returns its result. With call_timeout it
        runs in a worker thread (a daemon, with this thread's context variables); after call_timeout
        the caller stops waiting, reports a failure and raises CallTimeout."""
        self._acquire()
        try:
            result = fn(*args, **kwargs) if self.call_timeout is None else self._in_worker(fn, args, kwargs)
        except CallTimeout as timeout:
            self._failure(_error_text(timeout), self._elapsed())
            raise
        except self.ignore:
            self._success(self._elapsed())
            raise
        except Exception as exc:
            self._failure(_error_text(exc), self._elapsed())
            raise
        self._success(self._elapsed())
        return result

    def _in_worker(self, fn: Callable[..., T], args: tuple, kwargs: dict) -> T:
        outcome: dict[str, Any] = {}
        done = threading.Event()
        context = contextvars.copy_context()

        def run() -> None:
            try:
                outcome["result"] = context.run(fn, *args, **kwargs)
            except BaseException as exc:   # handed to the caller's thread, which decides
                outcome["error"] = exc
            finally:
                done.set()

        threading.Thread(target=run, name="booking-guard-circuit-call", daemon=True).start()
        if not done.wait(self.call_timeout):
            raise CallTimeout(self.keys, self.call_timeout)
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"]


async def _acall(conn: psycopg.AsyncConnection, query: str, params: tuple) -> object:
    """Runs one breaker function in its own transaction (async connection) and returns its value."""
    if conn.autocommit:
        return (await (await conn.execute(query, params)).fetchone())[0]
    if conn.info.transaction_status != pq.TransactionStatus.IDLE:
        raise RuntimeError(
            "call_async(): the connection is inside a transaction; breaker calls must run in their own short "
            "transactions (use an autocommit connection, or commit first)")
    async with conn.transaction():
        return (await (await conn.execute(query, params)).fetchone())[0]


async def call_async(conn: psycopg.AsyncConnection, keys: Keys, fn: Callable[..., Awaitable[T]], /, *args: Any,
                     ignore: tuple[type[BaseException], ...] = (), call_timeout: float | None = None,
                     **kwargs: Any) -> T:
    """Awaits fn(*args, **kwargs) under the breakers of `keys`, like circuit(...).call() for
    asyncio: with call_timeout, asyncio.timeout cancels the coroutine after call_timeout, a
    failure is reported and CallTimeout is raised."""
    if call_timeout is not None and not call_timeout > 0:
        raise ValueError(f"call_timeout must be a positive number of seconds, not {call_timeout!r}")
    scopes = _scopes(keys)
    try:
        permit = await _acall(conn, _acquire_query(scopes), (scopes,))
    except psycopg.Error as error:
        if error.sqlstate == CIRCUIT_OPEN:
            raise CircuitOpen.from_error(scopes if isinstance(scopes, str) else scopes[0], error) from error
        raise
    started = _clock()

    def took() -> timedelta:
        return timedelta(seconds=_clock() - started)

    try:
        if call_timeout is None:
            result = await fn(*args, **kwargs)
        else:
            deadline = asyncio.timeout(call_timeout)
            try:
                async with deadline:
                    result = await fn(*args, **kwargs)
            except TimeoutError:
                if not deadline.expired():
                    raise   # the coroutine's own timeout, not call_timeout
                raise CallTimeout(scopes, call_timeout) from None
    except ignore:
        await _acall(conn, _success_query(scopes), (scopes, permit, took()))
        raise
    except Exception as exc:
        await _acall(conn, _failure_query(scopes), (scopes, _error_text(exc), permit, took()))
        raise
    await _acall(conn, _success_query(scopes), (scopes, permit, took()))
    return result
