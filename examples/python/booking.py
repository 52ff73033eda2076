"""The booking path through booking_guard from Python, with psycopg 3.

The same story as the psql, PHP and Node examples beside this one, printing the same lines:

  1. insert a call, as the voice agent's webhook does;
  2. ask the circuit breaker for a permit under two scopes at once (the global breaker and the
     service's): one round trip, refused while either is open;
  3. call the calendar (a stub here) and report the result with the same scopes and permit;
  4. record the booking with record_booking() and report its result;
  5. the calendar goes down: three failed calls open the breakers (the default policy opens after
     3 consecutive failures); the next ask is refused with BG001, whose DETAIL is JSON with
     retry_after_seconds, and circuit_try_acquire() answers the same as a row, without raising;
  6. bad input to record_booking() is BG005; a transaction flagging a call as booked without an
     appointment is refused at COMMIT with BG002 (rule missing_appointment in enforce mode).

Errors are told apart by SQLSTATE (psycopg: exc.sqlstate; the fields of the server's report in
exc.diag). The connection comes from DATABASE_URL if it is set, otherwise from the libpq
environment (PGHOST, PGPORT, PGUSER, PGDATABASE). The database needs examples/clients_setup.sql
first; see docs/clients.md. Needs psycopg >= 3.1 (pip install "psycopg[binary]").
"""

import json
import os
import secrets
import sys
import time

import psycopg
from psycopg.types.json import Jsonb

COMPANY_ID = 1
SERVICE_ID = 1
# Every scope the call runs under: a permit covers them all, and the call's result counts for each.
SCOPES = ["appointment_booking:global", f"appointment_booking:service:{SERVICE_ID}"]
# Consecutive failures that open a breaker under the default policy (circuit_policies, row '%').
FAILURES_TO_OPEN = 3
APPOINTMENT = {"company_id": COMPANY_ID, "service_id": SERVICE_ID,
               "starts_at": "2030-01-15T09:00:00Z", "ends_at": "2030-01-15T09:30:00Z"}


class CalendarError(Exception):
    """The calendar did not book."""


def book_in_calendar(call_id: int, available: bool) -> str:
    """Stands in for the calendar's booking API (Cal.com): the new booking's id, or CalendarError
    while the calendar is down (`available` is the stub's switch)."""
    if not available:
        raise CalendarError("Cal.com answered 503 Service Unavailable")
    return f"cal-{call_id}-{secrets.token_hex(4)}"


def retry_text(seconds) -> str:
    """retry_after_seconds in words: null means forced open until someone resets the breaker."""
    return "no retry before a reset" if seconds is None else f"retry after {seconds} s"


def insert_call(conn: psycopg.Connection) -> int:
    call_id = conn.execute(
        "insert into calls (retell_call_id, company_id, direction) values (%s, %s, 'inbound') returning id",
        (f"example-python-{secrets.token_hex(4)}", COMPANY_ID),
    ).fetchone()[0]
    print(f"call {call_id} inserted")
    return call_id


def acquire(conn: psycopg.Connection) -> int:
    """A permit for a call under SCOPES; raises BG001 while a scope refuses (own transaction:
    the connection is in autocommit)."""
    return conn.execute("select booking_guard.circuit_acquire(%s::text[])", (SCOPES,)).fetchone()[0]


def main() -> int:
    # autocommit: each statement is its own transaction (circuit_acquire wants its own), and the
    # one transaction of several statements is explicit (step 6)
    with psycopg.connect(os.environ.get("DATABASE_URL", ""), autocommit=True) as conn:
        # 1-3. a call, a permit, the calendar; the result is reported with its duration (for
        # policies that count slow calls)
        call_id = insert_call(conn)
        permit = acquire(conn)
        print(f"breaker closed: permit {permit}")
        started = time.monotonic()
        booking_id = book_in_calendar(call_id, available=True)
        conn.execute("select booking_guard.circuit_record_success(%s::text[], %s, make_interval(secs => %s))",
                     (SCOPES, permit, time.monotonic() - started))
        print(f"calendar booked {booking_id}")

        # 4. record the booking: appointment, call flags and validation in one call
        success, reason, appointment_id, created = conn.execute(
            "select success, reason, appointment_id, created from booking_guard.record_booking(%s, %s, %s)",
            (call_id, booking_id, Jsonb(APPOINTMENT)),
        ).fetchone()
        if not success:
            # refused by validation: the call is rolled back to creation_failed and queued for review
            print(f"booking refused: {reason}")
            return 1
        print(f"booked: call {call_id}, appointment {appointment_id}, created {str(created).lower()}")

        # 5. the calendar goes down: each failure is reported, and the third opens the breakers
        failing_call_id = insert_call(conn)
        for attempt in range(1, FAILURES_TO_OPEN + 1):
            permit = acquire(conn)
            started = time.monotonic()
            try:
                book_in_calendar(failing_call_id, available=False)
            except CalendarError as exc:
                state = conn.execute(
                    "select booking_guard.circuit_record_failure(%s::text[], %s, %s, make_interval(secs => %s))",
                    (SCOPES, str(exc), permit, time.monotonic() - started),
                ).fetchone()[0]
                print(f"calendar failed ({attempt}/{FAILURES_TO_OPEN}): {exc}; breaker {state}")

        # ... so the next ask is refused: BG001, its DETAIL a JSON object
        try:
            acquire(conn)
        except psycopg.Error as exc:
            if exc.sqlstate != "BG001":
                raise
            refusal = json.loads(exc.diag.message_detail)
            print(f"BG001 {exc.diag.message_primary}")
            print(f"BG001 DETAIL: key {refusal['key']}, state {refusal['state']}, "
                  f"{retry_text(refusal['retry_after_seconds'])}")
        else:
            sys.exit("expected BG001: the breaker admitted the call")

        # ... or, without an exception, as a row
        allowed, state, retry_after, refused_by = conn.execute(
            "select allowed, state, retry_after_seconds, refused_by from booking_guard.circuit_try_acquire(%s::text[])",
            (SCOPES,),
        ).fetchone()
        print(f"try_acquire: allowed {str(allowed).lower()}, state {state}, refused by {refused_by}, "
              f"{retry_text(retry_after)}")

        # 6. BG005: the appointment names a column the appointments table does not have; nothing is written
        try:
            conn.execute("select * from booking_guard.record_booking(%s, %s, %s)",
                         (failing_call_id, f"cal-{failing_call_id}-bad", Jsonb({**APPOINTMENT, "room": "B"})))
        except psycopg.Error as exc:
            if exc.sqlstate != "BG005":
                raise
            print(f"BG005 invalid input: {exc.diag.message_primary}")
        else:
            sys.exit("expected BG005: the appointment was accepted")

        # BG002: flagging the call as booked without recording an appointment is refused at COMMIT
        try:
            with conn.transaction():
                conn.execute("update calls set session_outcome = 'appointment_booked', appointment_made = true "
                             "where id = %s", (failing_call_id,))
        except psycopg.Error as exc:
            if exc.sqlstate != "BG002":
                raise
            print(f"BG002 commit refused: {exc.diag.message_primary}")
        else:
            sys.exit("expected BG002: the commit went through")
    return 0


if __name__ == "__main__":
    sys.exit(main())
