"""record_booking() across transactions and sessions: COMMIT, ROLLBACK, many sessions racing.
Two sessions recording one booking id in every interleaving (same call, other call, rollback,
SERIALIZABLE) are an isolation spec: tests/isolation/specs/record_booking_same_booking.spec."""

import threading

import psycopg
import pytest
from support.application_rows import call_to_book

RECORD = "select success, reason, appointment_id, created from booking_guard.record_booking(%s, %s, %s)"


def counts(conn: psycopg.Connection, call_id: int) -> dict[str, int]:
    return dict(zip(
        ("appointments", "alerts", "reviews", "events"),
        conn.execute(
            """select (select count(*) from appointments where call_id = %(c)s),
                      (select count(*) from booking_guard.alerts where entity_type = 'call' and entity_id = %(c)s::text),
                      (select count(*) from booking_guard.review_queue where call_id = %(c)s),
                      (select count(*) from booking_guard.events where entity_id = %(c)s::text)""",
            {"c": call_id},
        ).fetchone(), strict=True))


def call_state(conn: psycopg.Connection, call_id: int) -> tuple:
    return conn.execute(
        "select session_outcome, appointment_made, appointment_link_status from calls where id = %s", (call_id,)
    ).fetchone()


@pytest.mark.parametrize("grace", ["0", "5 seconds"])
def test_failed_validation_after_commit(attached, connect, grace):
    """A failed validation leaves the call at creation_failed with one alert and one review item after COMMIT."""
    attached.execute("select booking_guard.set_setting('verification_grace', %s)", (grace,))
    call_id = call_to_book(attached, "r-fail", booking_id="cal-OTHER")
    with connect(autocommit=False) as conn:
        row = conn.execute(RECORD, (call_id, "cal-1", '{"status": "confirmed"}')).fetchone()
        conn.commit()
    assert row == (False, "booking_id_mismatch", None, False)
    assert call_state(attached, call_id) == ("creation_failed", False, "creation_failed")
    alerts = attached.execute(
        "select alert_type, severity from booking_guard.alerts where entity_type = 'call' and entity_id = %s",
        (str(call_id),)).fetchall()
    assert alerts == [("appointment_validation_failed", "critical")]
    reviews = attached.execute(
        "select reason, context ->> 'calcom_booking_id' from booking_guard.review_queue where call_id = %s",
        (call_id,)).fetchall()
    assert reviews == [("appointment_validation_failed", "cal-1")]
    assert counts(attached, call_id)["appointments"] == 0
    # nothing left for the truth check to judge later either
    assert attached.execute("select count(*) from booking_guard.due_verifications where call_id = %s",
                            (call_id,)).fetchone()[0] == 0


def test_success_after_commit_is_consistent(attached, connect):
    attached.execute("select booking_guard.set_setting('verification_grace', '0')")
    call_id = call_to_book(attached, "r-ok")
    with connect(autocommit=False) as conn:
        success, reason, appointment_id, created = conn.execute(RECORD, (call_id, "cal-ok", "{}")).fetchone()
        conn.commit()
    assert (success, reason, created) == (True, "ok", True)
    assert call_state(attached, call_id) == ("appointment_booked", True, "linked")
    assert attached.execute("select call_id from appointments where id = %s", (appointment_id,)).fetchone()[0] == call_id
    # a consistent booking raises no alert at COMMIT
    assert counts(attached, call_id)["alerts"] == 0


@pytest.mark.parametrize("path", ["success", "failure"])
def test_callers_rollback_leaves_nothing(attached, connect, path):
    call_id = call_to_book(attached, "r-rb", booking_id="cal-OTHER" if path == "failure" else None)
    before_state, before = call_state(attached, call_id), counts(attached, call_id)
    with connect(autocommit=False) as conn:
        row = conn.execute(RECORD, (call_id, "cal-rb", '{"status": "confirmed"}')).fetchone()
        assert row[0] is (path == "success")
        assert counts(conn, call_id) != before   # it did write, inside the transaction
        conn.rollback()
    assert counts(attached, call_id) == before
    assert call_state(attached, call_id) == before_state
    assert attached.execute("select count(*) from appointments where calcom_v2_booking_id = 'cal-rb'").fetchone()[0] == 0


def test_idempotent_across_transactions(attached):
    call_id = call_to_book(attached, "r-idem")
    first = attached.execute(RECORD, (call_id, "cal-idem", '{"status": "confirmed"}')).fetchone()
    second = attached.execute(RECORD, (call_id, "cal-idem", '{"status": "changed"}')).fetchone()
    assert first[:2] == (True, "ok") and first[3] is True
    assert second == (True, "ok", first[2], False)
    assert attached.execute("select count(*), min(status) from appointments where calcom_v2_booking_id = 'cal-idem'"
                            ).fetchone() == (1, "confirmed")


@pytest.mark.parametrize("same_call", [True, False])
def test_concurrent_sessions_record_one_appointment(attached, connect, same_call):
    """Eight sessions record the same booking at once (released together by a barrier): one appointment."""
    n = 8
    calls = [call_to_book(attached, f"r-race-{i}") for i in range(1 if same_call else n)]
    conns = [connect() for _ in range(n)]
    barrier = threading.Barrier(n)
    rows: list[tuple | None] = [None] * n
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            rows[i] = conns[i].execute(RECORD, (calls[i % len(calls)], "cal-race", "{}")).fetchone()
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert attached.execute("select count(*) from appointments where calcom_v2_booking_id = 'cal-race'").fetchone()[0] == 1
    created = [r for r in rows if r[3]]
    assert len(created) == 1 and created[0][:2] == (True, "ok")
    others = [r for r in rows if not r[3]]
    if same_call:
        assert all(r == (True, "ok", created[0][2], False) for r in others)
    else:
        # the booking belongs to the first call that recorded it; the others fail validation
        assert all(r[:2] == (False, "appointment_not_linked") for r in others)
        assert attached.execute("select count(*) from booking_guard.review_queue where reason = 'appointment_validation_failed'"
                                ).fetchone()[0] == n - 1


def test_repeatable_read_is_refused(attached, connect):
    call_id = call_to_book(attached, "r-rr")
    with connect(autocommit=False) as conn:
        conn.execute("set transaction isolation level repeatable read")
        with pytest.raises(psycopg.Error) as caught:
            conn.execute(RECORD, (call_id, "cal-rr", "{}"))
        assert caught.value.diag.sqlstate == "BG005"
        assert "REPEATABLE READ" in caught.value.diag.message_primary
        conn.rollback()
    with connect(autocommit=False) as conn:
        conn.execute("set transaction isolation level serializable")
        assert conn.execute(RECORD, (call_id, "cal-rr", "{}")).fetchone()[:2] == (True, "ok")
        conn.commit()


def test_validation_plans_follow_a_reattach(attached, connect):
    """The plans cached in a session are replanned when attach() points the guarded views elsewhere."""
    conn = connect()
    call_id = call_to_book(attached, "r-plan")
    assert conn.execute(RECORD, (call_id, "cal-plan", "{}")).fetchone()[0] is True   # plans cached in conn
    attached.execute("select booking_guard.detach()")
    with pytest.raises(psycopg.Error) as caught:
        conn.execute("select * from booking_guard.validate_appointment_creation(%s)", (call_id,))
    assert caught.value.diag.sqlstate == "BG003"
    attached.execute("create schema other")
    attached.execute("create table other.calls (like public.calls including all)")
    attached.execute("create table other.appointments (like public.appointments including all)")
    attached.execute("select booking_guard.attach('other.calls', 'other.appointments')")
    attached.execute("insert into other.calls (id, retell_call_id, company_id, direction) values (%s, 'o1', 1, 'inbound')",
                     (call_id,))
    reason = conn.execute("select reason from booking_guard.validate_appointment_creation(%s)", (call_id,)).fetchone()[0]
    assert reason == "appointment_not_found"   # the new, empty appointments table: not the old one's appointment
    assert conn.execute(RECORD, (call_id, "cal-plan-2", '{"status": "x"}')).fetchone()[:2] == (True, "ok")
    assert attached.execute("select count(*) from other.appointments").fetchone()[0] == 1


def test_validation_events_feed_the_latency_kpi(attached):
    call_id = call_to_book(attached, "r-kpi")
    attached.execute(RECORD, (call_id, "cal-kpi", "{}"))
    for _ in range(20):
        attached.execute("select booking_guard.validate_appointment_creation(%s)", (call_id,))
    n, p95, reasons = attached.execute(
        """select count(*), percentile_cont(0.95) within group (order by (details ->> 'duration_ms')::float8),
                  array_agg(distinct details ->> 'reason')
             from booking_guard.validation_events where entity_id = %s""", (str(call_id),)).fetchone()
    assert n == 21
    assert reasons == ["ok"]
    assert p95 > 0      # each validation logs its duration (how long it may take is bench/'s business)


def test_the_insert_leaves_no_session_statement_and_survives_discard(attached, connect):
    """The insert's plan is kept inside booking_guard, per table and set of keys: nothing a session
    can see, name or replace (0.1.0 kept a prepared statement the caller could prepare first)."""
    conn = connect()
    calls = [call_to_book(attached, f"r-prep-{i}") for i in range(4)]
    assert conn.execute(RECORD, (calls[0], "cal-prep-0", '{"status": "a"}')).fetchone()[0] is True
    assert conn.execute(RECORD, (calls[1], "cal-prep-1", '{"status": "b"}')).fetchone()[0] is True
    assert conn.execute("select count(*) from pg_prepared_statements").fetchone()[0] == 0
    conn.execute("discard all")
    assert conn.execute(RECORD, (calls[2], "cal-prep-2", '{"status": "c"}')).fetchone()[0] is True
    assert conn.execute(RECORD, (calls[3], "cal-prep-3", '{"status": "d", "starts_at": "2026-12-01T10:00Z"}')).fetchone()[0]
    assert conn.execute("select count(*) from pg_prepared_statements").fetchone()[0] == 0
    assert attached.execute("select array_agg(status order by status) from appointments where calcom_v2_booking_id like "
                            "'cal-prep-%'").fetchone()[0] == ["a", "b", "c", "d"]


def test_the_insert_follows_a_changed_table(attached, connect):
    """A kept plan was planned against the table as it was: after a column is added it is planned again."""
    conn = connect()
    calls = [call_to_book(attached, f"r-alter-{i}") for i in range(2)]
    assert conn.execute(RECORD, (calls[0], "cal-alter-0", '{"status": "a"}')).fetchone()[0] is True
    attached.execute("alter table appointments add column room text")
    assert conn.execute(RECORD, (calls[1], "cal-alter-1", '{"status": "b", "room": "2"}')).fetchone()[0] is True
    assert attached.execute("select room from appointments where calcom_v2_booking_id = 'cal-alter-1'").fetchone()[0] == "2"


def test_a_collation_of_the_callers_does_not_change_the_input_check(attached):
    """The booking id is checked under the database's collation: one the caller attaches to the
    argument (here one the regular expressions of the check cannot use) changes nothing."""
    attached.execute("create collation pg_temp.loose (provider = icu, locale = 'und', deterministic = false)")
    call_id = call_to_book(attached, "retell-collate")
    assert attached.execute(RECORD.replace("%s, %s, %s", "%s, %s collate pg_temp.loose, %s"),
                            (call_id, "cal-collate", "{}")).fetchone()[:2] == (True, "ok")
    with pytest.raises(psycopg.Error) as caught:
        attached.execute(RECORD.replace("%s, %s, %s", "%s, %s collate pg_temp.loose, %s"), (call_id, "cal\n2", "{}"))
    assert caught.value.sqlstate == "BG005"
