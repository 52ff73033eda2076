"""The Python side of the booking path: booking_guard.app.record_booking() and retry_with_backoff()."""

import threading
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from booking_guard import app
from booking_guard.app.booking import BookingResult, backoff_delay, validation_reasons
from conftest import APP_TABLE_GRANTS
from support.application_rows import call_to_book


def test_app_exports_the_booking_path():
    for name in ("BookingResult", "record_booking", "retry_with_backoff", "backoff_delay"):
        assert name in app.__all__
        assert getattr(app, name) is not None


def test_record_booking_returns_a_typed_result(attached):
    call_id = call_to_book(attached, "py-1")
    result = app.record_booking(attached, call_id, "cal-py-1", {"status": "confirmed", "starts_at": "2026-12-01T10:00Z"})
    assert isinstance(result, BookingResult)
    assert result.success and bool(result) and result.reason == "ok" and result.created
    assert isinstance(result.appointment_id, int)
    assert result.details["call_id"] == call_id and result.details["appointment_id"] == result.appointment_id
    status, starts_at = attached.execute("select status, starts_at from appointments where id = %s",
                                         (result.appointment_id,)).fetchone()
    assert status == "confirmed" and starts_at == datetime(2026, 12, 1, 10, 0, tzinfo=UTC)

    again = app.record_booking(attached, call_id, "cal-py-1")
    assert again == BookingResult(True, "ok", again.details, result.appointment_id, False)
    assert again.details["already_recorded"] is True


def test_record_booking_failure_is_a_result_not_an_exception(attached):
    call_id = call_to_book(attached, "py-2", booking_id="cal-other")
    result = app.record_booking(attached, call_id, "cal-py-2")
    assert not result and result.reason == "booking_id_mismatch" and result.reason in validation_reasons(attached)
    assert result.appointment_id is None and not result.created
    assert {"alert_id", "review_id"} <= result.details.keys()


def test_record_booking_bad_input_raises_and_writes_nothing(attached):
    call_id = call_to_book(attached, "py-3")
    with pytest.raises(psycopg.Error) as caught:
        app.record_booking(attached, call_id, "cal-py-3", {"colour": "red"})
    assert caught.value.diag.sqlstate == "BG005"
    assert "colour" in caught.value.diag.message_primary
    assert "Known columns" in caught.value.diag.message_hint
    assert attached.execute("select count(*) from appointments").fetchone()[0] == 0


def test_record_booking_runs_in_the_callers_transaction(attached, connect):
    call_id = call_to_book(attached, "py-4")
    with connect(autocommit=False) as conn:
        assert app.record_booking(conn, call_id, "cal-py-4").success
        conn.rollback()
    assert attached.execute("select count(*) from appointments where call_id = %s", (call_id,)).fetchone()[0] == 0


def test_retry_with_backoff_around_record_booking(attached, connect):
    """A booking whose first attempts hit a lock timeout is retried on the backoff schedule, then recorded once."""
    call_id = call_to_book(attached, "py-5")
    holder = connect(autocommit=False)
    holder.execute("select pg_advisory_xact_lock(1, 1)")   # an unrelated lock the first attempts time out on
    conn = connect()
    conn.execute("set lock_timeout = '50ms'")
    slept: list[float] = []
    attempts = 0

    def book() -> BookingResult:
        nonlocal attempts
        attempts += 1
        if attempts < 3:
            conn.execute("select pg_advisory_xact_lock(1, 1)")   # times out while the holder has it
        return app.record_booking(conn, call_id, "cal-py-5")

    def sleep(seconds: float) -> None:   # the test's clock: no real waiting
        slept.append(seconds)

    result = app.retry_with_backoff(book, max_attempts=3, retry_on=psycopg.errors.LockNotAvailable,
                                       sleep=sleep, rng=lambda: 0.5)
    assert result.success and result.created and attempts == 3
    assert slept == [backoff_delay(1, draw=0.5), backoff_delay(2, draw=0.5)]
    assert attached.execute("select count(*) from appointments where calcom_v2_booking_id = 'cal-py-5'").fetchone()[0] == 1


def test_retries_queue_with_concurrent_workers(attached, connect):
    """Two workers claiming at once never get the same retry (SKIP LOCKED), and between them get all due ones."""
    ids = [attached.execute("select booking_guard.schedule_retry(%s, 'record_booking', '{}', 3, '0')", (i,)).fetchone()[0]
           for i in range(40)]
    workers = [connect(autocommit=False) for _ in range(2)]
    barrier = threading.Barrier(2)
    claimed: list[list[int]] = [[], []]

    def work(i: int) -> None:
        barrier.wait(timeout=30)
        claimed[i] = [r[0] for r in workers[i].execute(
            "select id from booking_guard.claim_retries(%s, 25)", (f"w{i}",)).fetchall()]
        barrier.wait(timeout=30)   # both hold their claims (row locks) at the same time
        workers[i].commit()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not set(claimed[0]) & set(claimed[1])
    assert sorted(claimed[0] + claimed[1]) == ids
    assert max(len(c) for c in claimed) <= 25


def test_retry_exhausted_goes_to_review_with_history(attached):
    retry_id = attached.execute("select booking_guard.schedule_retry(99, 'record_booking', '{\"b\": 1}', 2, '0')").fetchone()[0]
    clock = attached.execute("select now()").fetchone()[0]
    for attempt in (1, 2):
        claimed = attached.execute("select id, attempts from booking_guard.claim_retries('w', 10, %s)", (clock,)).fetchall()
        assert claimed == [(retry_id, attempt)]
        status, due_at = attached.execute(
            "select status, due_at from booking_guard.finish_retry(%s, false, %s)", (retry_id, f"boom {attempt}")).fetchone()
        clock = due_at + timedelta(microseconds=1)   # jump the test's clock to the next due time
    assert status == "failed"
    reason, history = attached.execute(
        "select reason, context -> 'history' from booking_guard.review_queue where call_id = 99").fetchone()
    assert reason == "retry_exhausted"
    assert [(h["attempt"], h["ok"], h["error"]) for h in history] == [(1, False, "boom 1"), (2, False, "boom 2")]


def test_the_app_role_books_with_its_own_table_privileges(attached, login_role):
    """record_booking() writes what the application could write itself, with the application's own
    rights: a role holding booking_guard_app and DML on its tables books, and nothing else is lent."""
    call_id = call_to_book(attached, "py-role")
    _, conn = login_role("booking_guard_app", grants=APP_TABLE_GRANTS)
    result = app.record_booking(conn, call_id, "cal-role", {"status": "confirmed"})
    assert result.success and result.created
    assert conn.execute("select reason from booking_guard.validate_appointment_creation(%s)", (call_id,)).fetchone()[0] == "ok"
    retry_id = conn.execute("select booking_guard.schedule_retry(%s, 'notify', '{}', 2, '0')", (call_id,)).fetchone()[0]
    assert conn.execute("select id from booking_guard.claim_retries('app-worker')").fetchall() == [(retry_id,)]
    assert conn.execute("select status from booking_guard.finish_retry(%s, true)", (retry_id,)).fetchone()[0] == "succeeded"
    assert conn.execute("select booking_guard.backoff_delay(2, draw => 0)").fetchone()[0] == timedelta(seconds=2)
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("select * from booking_guard.retries")   # reading the queue is the monitor's


def test_the_app_role_without_table_privileges_books_nothing(attached, login_role):
    call_id = call_to_book(attached, "py-role-none")
    _, conn = login_role("booking_guard_app")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        app.record_booking(conn, call_id, "cal-none", {"status": "confirmed"})
    assert attached.execute("select count(*) from appointments").fetchone()[0] == 0


def test_pending_retries_survive_dump_and_restore(attached):
    """pg_dump keeps the retries queue and its sequence: restored ids stay taken."""
    import shutil
    import subprocess

    from conftest import SERVER

    first = attached.execute("select booking_guard.schedule_retry(1, 'record_booking', '{\"b\": \"cal-1\"}', 3, '0')"
                             ).fetchone()[0]
    second = attached.execute("select booking_guard.schedule_retry(2, 'notify', '{}', 2, '1 hour')").fetchone()[0]
    source, target = attached.info.dbname, f"{attached.info.dbname}_retries"
    args = ["-h", SERVER.get("host", "localhost"), "-p", str(SERVER.get("port", 5432))]
    if SERVER.get("user"):
        args += ["-U", SERVER["user"]]
    tool = lambda name: shutil.which(name, path="/usr/lib/postgresql/15/bin") or shutil.which(name)  # noqa: E731
    admin = psycopg.connect(host=attached.info.host, port=attached.info.port, user=attached.info.user, dbname="postgres",
                            autocommit=True)
    try:
        admin.execute(f'drop database if exists "{target}"')
        admin.execute(f'create database "{target}"')
        dump = subprocess.run([tool("pg_dump"), *args, "-d", source], check=True, capture_output=True, text=True)
        restore = subprocess.run([tool("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", *args, "-d", target],
                                 input=dump.stdout, capture_output=True, text=True)
        assert restore.returncode == 0, restore.stderr
        with psycopg.connect(host=attached.info.host, port=attached.info.port, user=attached.info.user,
                             dbname=target, autocommit=True) as restored:
            assert restored.execute("select id, operation, status from booking_guard.retries order by id").fetchall() == [
                (first, "record_booking", "pending"), (second, "notify", "pending")]
            third = restored.execute("select booking_guard.schedule_retry(3, 'notify', '{}')").fetchone()[0]
            assert third > second
            assert [r[0] for r in restored.execute("select id from booking_guard.claim_retries('w')")] == [first]
    finally:
        admin.execute(f'drop database if exists "{target}" with (force)')
        admin.close()


def test_validation_reasons_are_read_from_the_database(attached):
    reasons = validation_reasons(attached)
    assert list(reasons)[0] == "ok"
    assert set(reasons) == {r for (r,) in attached.execute("select reason from booking_guard.validation_reasons")}
    assert all(reasons.values())
