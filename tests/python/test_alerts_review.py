"""What pgTAP cannot see (tests/pgtap/060_alerts_review.sql has the rest): NOTIFY booking_guard_alert
as a listening session receives it, and many reviewers racing to claim with SKIP LOCKED. The
interleavings of two sessions (two reviewers claiming at once, one alert or review item raised by
two sessions at once) are isolation specs: tests/isolation/specs/review_queue.spec and
alert_dedup.spec.

A notification that must not come is checked with a sentinel: after the action, the writer sends
its own NOTIFY on the channel; notifications arrive in commit order, so if the next one the
listener gets is the sentinel, the action sent none. No sleeps."""

import threading
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest

CHANNEL = "booking_guard_alert"


@pytest.fixture
def listener(connect) -> psycopg.Connection:
    conn = connect()
    conn.execute(f"listen {CHANNEL}")
    return conn


def next_notifications(listener: psycopg.Connection, n: int = 1) -> list[tuple[str, str]]:
    """The next n notifications (channel, payload); a safety timeout only stops a hung test."""
    return [(note.channel, note.payload) for note in listener.notifies(timeout=10, stop_after=n)]


def sentinel(db: psycopg.Connection, listener: psycopg.Connection) -> None:
    """Asserts that nothing was notified before this point."""
    db.execute(f"notify {CHANNEL}, 'sentinel'")
    assert next_notifications(listener) == [(CHANNEL, "sentinel")]


def raise_alert(db: psycopg.Connection, entity: str = "42", alert_type: str = "phantom_booking") -> int:
    return db.execute("select booking_guard_internal.raise_alert(%s, 'critical', 'call', %s, 'test alert')",
                      (alert_type, entity)).fetchone()[0]


def test_a_new_alert_notifies_its_id(db, listener):
    alert_id = raise_alert(db)
    assert next_notifications(listener) == [(CHANNEL, str(alert_id))]
    other = raise_alert(db, entity="43")
    assert next_notifications(listener) == [(CHANNEL, str(other))]


def test_a_repeat_does_not_notify(db, listener):
    alert_id = raise_alert(db)
    assert next_notifications(listener) == [(CHANNEL, str(alert_id))]
    assert raise_alert(db) == alert_id
    sentinel(db, listener)


def test_a_repeat_after_resolution_notifies_the_new_alert(db, listener):
    alert_id = raise_alert(db)
    db.execute("select booking_guard.resolve_alert(%s)", (alert_id,))
    again = raise_alert(db)
    assert again != alert_id
    assert next_notifications(listener, 2) == [(CHANNEL, str(alert_id)), (CHANNEL, str(again))]


def test_notify_waits_for_commit_and_a_rollback_sends_nothing(db, listener):
    db.execute("begin")
    alert_id = raise_alert(db)
    db.execute("rollback")
    sentinel(db, listener)
    with db.transaction():
        alert_id = raise_alert(db)
        # not delivered while the alert is uncommitted: the listener gets only what committed before
        assert list(listener.notifies(timeout=0, stop_after=1)) == []
    assert next_notifications(listener) == [(CHANNEL, str(alert_id))]


def test_corrections_by_the_triggers_notify(attached, listener):
    attached.execute("select booking_guard.set_setting('verification_grace', '0')")
    attached.execute("insert into companies (id, name) values (1, 'Acme Dental')")
    attached.execute("insert into calls (retell_call_id, company_id) values ('retell-1', 1)")
    alert_id, = attached.execute("select id from booking_guard.alerts where alert_type = 'missing_direction'").fetchone()
    assert next_notifications(listener) == [(CHANNEL, str(alert_id))]


def test_a_rejected_commit_notifies_nothing(attached, listener):
    attached.execute("select booking_guard.set_setting('verification_grace', '0')")
    attached.execute("select booking_guard.set_rule('missing_appointment', 'enforce')")
    attached.execute("insert into companies (id, name) values (1, 'Acme Dental')")
    attached.execute("begin")
    # phantom_booking corrects (and alerts) at once; missing_appointment rejects the COMMIT
    attached.execute("""insert into calls (retell_call_id, company_id, direction, session_outcome)
                        values ('retell-1', 1, 'inbound', 'appointment_booked')""")
    with pytest.raises(psycopg.Error) as caught:
        attached.execute("commit")
    assert caught.value.diag.sqlstate == "BG002"
    sentinel(attached, listener)


# -- claim_review with many reviewers racing ------------------------------------------------

def queue(db: psycopg.Connection, n: int) -> list[int]:
    return [db.execute("select booking_guard.queue_for_review(%s, 'appointment_validation_failed')", (call_id,)).fetchone()[0]
            for call_id in range(1, n + 1)]


def claim(conn: psycopg.Connection, reviewer: str) -> int | None:
    row = conn.execute("select id from booking_guard.claim_review(%s)", (reviewer,)).fetchone()
    return row[0] if row else None


def test_many_reviewers_racing_claim_each_item_once(db, connect):
    items = queue(db, 20)
    reviewers = [connect() for _ in range(6)]
    barrier = threading.Barrier(len(reviewers))

    def work(conn: psycopg.Connection, name: str) -> list[int]:
        got = []
        barrier.wait(timeout=10)
        while (item := claim(conn, name)) is not None:
            got.append(item)
        return got

    with ThreadPoolExecutor(max_workers=len(reviewers)) as pool:
        results = list(pool.map(work, reviewers, [f"r{i}" for i in range(len(reviewers))], timeout=60))
    claimed = [item for got in results for item in got]
    assert sorted(claimed) == items          # every item once, none twice
    assert db.execute("""select count(*) from booking_guard.review_queue
                          where status = 'in_review' and claimed_by like 'r%%'""").fetchone()[0] == len(items)

