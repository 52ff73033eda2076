"""Concurrency, with real connections: sessions that change the same call's appointments at the
same time end consistent.

The interleavings are run deterministically: one session does its statement and keeps its
transaction open; the other's statement (or COMMIT) runs in a thread, and the test waits until
PostgreSQL reports that thread's backend blocked by the first session (pg_blocking_pids) before
the first one commits. Then the same is left to run free, several times. No sleeps, no retries.
"""

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import psycopg
import pytest
from support.application_rows import BOOKED, CANCELLED, flags, new_appointment, new_call

RACES = 25


@pytest.fixture
def pool():
    with ThreadPoolExecutor(max_workers=4) as executor:
        yield executor


def wait_until_blocked(observer: psycopg.Connection, waiting: psycopg.Connection, blocker: psycopg.Connection,
                       future: Future) -> None:
    """Returns once PostgreSQL reports `waiting`'s backend blocked by `blocker`'s; fails if the
    waiting statement finished instead (it was not blocked) or nothing happened in 10 s."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if future.done():
            future.result()   # raises the thread's error, if any
            pytest.fail("the second session's statement was not blocked by the first session")
        blocked_by = observer.execute("select pg_blocking_pids(%s)", (waiting.info.backend_pid,)).fetchone()[0]
        if blocker.info.backend_pid in blocked_by:
            return
    pytest.fail("the second session never blocked on the first")


def in_transaction(conn: psycopg.Connection, *statements: tuple[str, tuple]) -> None:
    for query, params in statements:
        conn.execute(query, params)


def book(call_id: int, booking_id: str) -> list[tuple[str, tuple]]:
    """The usual booking transaction after the call exists: the appointment, then trackBooking."""
    return [
        ("insert into appointments (call_id, calcom_v2_booking_id, company_id) values (%s, %s, 1)", (call_id, booking_id)),
        ("""update calls set appointment_made = true, session_outcome = 'appointment_booked', booking_id = %s,
                             booking_confirmed = true where id = %s""", (booking_id, call_id)),
    ]


def appointments_of(db: psycopg.Connection, call_id: int) -> list[str]:
    return [r[0] for r in db.execute(
        "select calcom_v2_booking_id from appointments where call_id = %s order by calcom_v2_booking_id", (call_id,))]


def assert_consistent(db: psycopg.Connection, call_id: int) -> None:
    """The flags say exactly what the appointment rows say, and nobody had to be alerted."""
    expected = BOOKED if appointments_of(db, call_id) else CANCELLED
    assert flags(db, call_id) == expected
    assert db.execute("select count(*) from booking_guard.alerts").fetchone()[0] == 0
    assert db.execute("select count(*) from booking_guard.review_queue").fetchone()[0] == 0


def booked_call(db: psycopg.Connection) -> tuple[int, int]:
    with db.transaction():
        call_id = new_call(db)
        appointment_id = new_appointment(db, call_id, calcom_v2_booking_id="cal-old")
    assert flags(db, call_id) == BOOKED
    return call_id, appointment_id


# -- two sessions booking the same call --------------------------------------------------------

def test_two_sessions_booking_the_same_call_in_turn(core, connect, pool):
    call_id = new_call(core)
    a, b = connect(), connect()
    a.execute("begin")
    in_transaction(a, *book(call_id, "cal-a"))
    b.execute("begin")
    b.execute(*book(call_id, "cal-b")[0])               # its appointment: no lock needed
    blocked = pool.submit(in_transaction, b, book(call_id, "cal-b")[1])   # its flags: the call's row lock
    wait_until_blocked(core, b, a, blocked)
    a.execute("commit")
    blocked.result(timeout=10)
    b.execute("commit")
    assert appointments_of(core, call_id) == ["cal-a", "cal-b"]
    assert_consistent(core, call_id)


def test_two_sessions_booking_the_same_call_commit_while_the_other_holds_the_call(core, connect, pool):
    """Appointments only (the flags are left to booking_guard): B's COMMIT waits for A's."""
    call_id = new_call(core)
    a, b = connect(), connect()
    a.execute("begin")
    in_transaction(a, *book(call_id, "cal-a"))
    b.execute("begin")
    b.execute(*book(call_id, "cal-b")[0])
    committing = pool.submit(b.execute, "commit")
    wait_until_blocked(core, b, a, committing)
    a.execute("commit")
    committing.result(timeout=10)
    assert appointments_of(core, call_id) == ["cal-a", "cal-b"]
    assert_consistent(core, call_id)


def test_two_sessions_booking_the_same_call_race(core, connect, pool):
    a, b = connect(), connect()
    for i in range(RACES):
        call_id = new_call(core)
        barrier = threading.Barrier(2)

        def booking(conn, tag, call_id=call_id, barrier=barrier):
            barrier.wait(timeout=10)
            with conn.transaction():
                in_transaction(conn, *book(call_id, f"cal-{tag}"))

        futures = [pool.submit(booking, a, f"{i}-a"), pool.submit(booking, b, f"{i}-b")]
        for f in futures:
            f.result(timeout=30)
        assert appointments_of(core, call_id) == [f"cal-{i}-a", f"cal-{i}-b"]
        assert_consistent(core, call_id)


# -- one session deletes an appointment while another inserts one for the same call ------------

def test_delete_first_then_insert_blocks_and_wins(core, connect, pool):
    """A deletes the call's only appointment (trigger 4 cancels the call and holds its row);
    B books the call again: B's flag update waits for A, then the call is booked by B's appointment."""
    call_id, old = booked_call(core)
    a, b = connect(), connect()
    a.execute("begin")
    a.execute("delete from appointments where id = %s", (old,))
    assert a.execute("select appointment_made from calls where id = %s", (call_id,)).fetchone()[0] is False
    b.execute("begin")
    b.execute(*book(call_id, "cal-new")[0])
    blocked = pool.submit(in_transaction, b, book(call_id, "cal-new")[1])
    wait_until_blocked(core, b, a, blocked)
    a.execute("commit")
    assert flags(core, call_id) == CANCELLED        # A alone: cancelled
    blocked.result(timeout=10)
    b.execute("commit")
    assert appointments_of(core, call_id) == ["cal-new"]
    assert_consistent(core, call_id)


def test_insert_first_then_delete_blocks_and_keeps_the_booking(core, connect, pool):
    """B books first and holds the call; A's delete of the old appointment waits in trigger 4 for
    the call's row, then counts B's committed appointment and leaves the call booked."""
    call_id, old = booked_call(core)
    a, b = connect(), connect()
    b.execute("begin")
    in_transaction(b, *book(call_id, "cal-new"))
    a.execute("begin")
    blocked = pool.submit(a.execute, "delete from appointments where id = %s", (old,))
    wait_until_blocked(core, a, b, blocked)
    b.execute("commit")
    blocked.result(timeout=10)
    a.execute("commit")
    assert appointments_of(core, call_id) == ["cal-new"]
    assert_consistent(core, call_id)


def test_delete_then_an_unflagged_insert_commits_after_it(core, connect, pool):
    """B writes only the appointment; its COMMIT (the truth check) waits for A's delete to commit
    and then derives the flags from both changes."""
    call_id, old = booked_call(core)
    a, b = connect(), connect()
    a.execute("begin")
    a.execute("delete from appointments where id = %s", (old,))
    b.execute("begin")
    b.execute(*book(call_id, "cal-new")[0])
    committing = pool.submit(b.execute, "commit")
    wait_until_blocked(core, b, a, committing)
    a.execute("commit")
    committing.result(timeout=10)
    assert appointments_of(core, call_id) == ["cal-new"]
    assert_consistent(core, call_id)


def test_an_unflagged_insert_then_a_delete_that_commits_first(core, connect, pool):
    """B has inserted (uncommitted) when A deletes the old appointment: A cannot see B's row and
    cancels the call; B's COMMIT then waits for A and books the call again from its appointment."""
    call_id, old = booked_call(core)
    a, b = connect(), connect()
    b.execute("begin")
    b.execute(*book(call_id, "cal-new")[0])
    a.execute("begin")
    a.execute("delete from appointments where id = %s", (old,))
    committing = pool.submit(b.execute, "commit")
    wait_until_blocked(core, b, a, committing)
    a.execute("commit")
    committing.result(timeout=10)
    assert appointments_of(core, call_id) == ["cal-new"]
    assert_consistent(core, call_id)


@pytest.mark.parametrize("flagged", [True, False], ids=["with_track_booking", "appointment_only"])
def test_delete_and_insert_race(core, connect, pool, flagged):
    a, b = connect(), connect()
    for i in range(RACES):
        call_id, old = booked_call(core)
        barrier = threading.Barrier(2)

        def deleter(barrier=barrier, old=old):
            barrier.wait(timeout=10)
            with a.transaction():
                a.execute("delete from appointments where id = %s", (old,))

        def inserter(barrier=barrier, call_id=call_id, i=i):
            statements = book(call_id, f"cal-{i}")
            barrier.wait(timeout=10)
            with b.transaction():
                in_transaction(b, *(statements if flagged else statements[:1]))

        for f in [pool.submit(deleter), pool.submit(inserter)]:
            f.result(timeout=30)
        assert appointments_of(core, call_id) == [f"cal-{i}"]
        assert_consistent(core, call_id)


# -- moving appointments between two calls, in opposite directions -----------------------------

def test_opposite_moves_do_not_deadlock(core, connect, pool):
    """A holds the first call (it updated it) and moves X to the second call while B moves Y from
    the second call to the first. booking_guard must take the calls' locks in one order: if it
    locked B's old call first, B would hold the second call while waiting for the first, and A's
    move would then deadlock against it."""
    with core.transaction():
        first, second = new_call(core), new_call(core)
        x = new_appointment(core, first, calcom_v2_booking_id="cal-x")
        y = new_appointment(core, second, calcom_v2_booking_id="cal-y")
    a, b = connect(), connect()
    a.execute("begin")
    a.execute("update calls set call_successful = true where id = %s", (first,))
    b.execute("begin")
    blocked = pool.submit(b.execute, "update appointments set call_id = %s where id = %s", (first, y))
    wait_until_blocked(core, b, a, blocked)
    a.execute("update appointments set call_id = %s where id = %s", (second, x))
    a.execute("commit")
    blocked.result(timeout=10)
    b.execute("commit")
    assert appointments_of(core, first) == ["cal-y"]
    assert appointments_of(core, second) == ["cal-x"]
    assert_consistent(core, first)
    assert_consistent(core, second)


def test_opposite_moves_race(core, connect, pool):
    with core.transaction():
        first, second = new_call(core), new_call(core)
        x = new_appointment(core, first, calcom_v2_booking_id="cal-x")
        y = new_appointment(core, second, calcom_v2_booking_id="cal-y")
    a, b = connect(), connect()

    def move(conn: psycopg.Connection, appointment_id: int, barrier: threading.Barrier) -> Callable[[], None]:
        def run():
            barrier.wait(timeout=10)
            conn.execute("""update appointments set call_id = case call_id when %s then %s else %s end
                             where id = %s""", (first, second, first, appointment_id))
        return run

    for _ in range(RACES):
        barrier = threading.Barrier(2)
        for f in [pool.submit(move(a, x, barrier)), pool.submit(move(b, y, barrier))]:
            f.result(timeout=30)
        assert len(appointments_of(core, first)) == len(appointments_of(core, second)) == 1
        assert_consistent(core, first)
        assert_consistent(core, second)
