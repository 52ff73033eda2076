"""Every input is bounded: a value out of bounds is a BG005 with a message, a DETAIL and a HINT,
and writes nothing; one role cannot create rows, alerts or metric series without bound.

On 0.1.0 the application role queued 20,000 review items, made 20,000 breaker keys (80,000
metric series), scheduled retries 100 years out, raised 2,000 critical alerts (each a NOTIFY)
and stored a 50 MB review context; several bad inputs gave raw PostgreSQL errors.
"""

import psycopg
import pytest
from conftest import APP_TABLE_GRANTS
from support.application_rows import new_call

BIG = "x" * 70_000


def assert_bg005(conn: psycopg.Connection, statement: str, params: tuple = ()) -> None:
    with pytest.raises(psycopg.Error) as caught:
        conn.execute(statement, params)
    diag = caught.value.diag
    assert diag.sqlstate == "BG005", f"{statement}: {diag.sqlstate} {diag.message_primary}"
    assert diag.message_detail and diag.message_hint, statement


@pytest.mark.parametrize("statement, params", [
    # record_booking
    ("select booking_guard.record_booking(1, %s, '{}')", ("c" * 300,)),
    ("select booking_guard.record_booking(1, %s, '{}')", ("cal\n1",)),
    ("select booking_guard.record_booking(1, 'cal-1', %s::jsonb)", ('{"status": "' + BIG + '"}',)),
    # review queue
    ("select booking_guard.queue_for_review(1, '', '{}')", ()),
    ("select booking_guard.queue_for_review(1, 'Not A Reason!', '{}')", ()),
    ("select booking_guard.queue_for_review(1, 'calcom_booking_failed', %s::jsonb)", ('{"a": "' + BIG + '"}',)),
    ("select booking_guard.resolve_review(1, 'fixed', %s)", (BIG,)),
    # retries
    ("select booking_guard.schedule_retry(1, 'record_booking', '{}', 3, '100 years')", ()),
    ("select booking_guard.schedule_retry(1, 'record_booking', %s::jsonb)", ('{"a": "' + BIG + '"}',)),
    ("select booking_guard.schedule_retry(1, %s)", ("op" * 100,)),
    ("select booking_guard.finish_retry(1, false, %s)", (BIG,)),
    # backoff
    ("select booking_guard.backoff_delay(5, base => '1000000 years', max_delay => '2000000 years')", ()),
    ("select booking_guard.backoff_delay(3, max_delay => '100 years')", ()),
    # circuit breaker
    ("select booking_guard.circuit_record_failure('k', %s)", (BIG,)),
    # detection windows and reports
    ("select * from booking_guard.detect('1000000 years')", ()),
    ("select * from booking_guard.kpis('1000000 years')", ()),
    ("select booking_guard.daily_report('4000-01-01')", ()),
    ("select booking_guard.run_monitor('1000000 years')", ()),
])
def test_bad_input_is_bg005(core, statement, params):
    before = core.execute("select (select count(*) from booking_guard.events), (select count(*) from booking_guard.alerts),"
                          " (select count(*) from booking_guard.review_queue), (select count(*) from booking_guard.retries)"
                          ).fetchone()
    assert_bg005(core, statement, params)
    after = core.execute("select (select count(*) from booking_guard.events), (select count(*) from booking_guard.alerts),"
                         " (select count(*) from booking_guard.review_queue), (select count(*) from booking_guard.retries)"
                         ).fetchone()
    assert after == before


def test_the_app_cannot_flood_the_review_queue(core, login_role):
    core.execute("select booking_guard.set_setting('review_queue_max_open', '50')")
    _, app = login_role("booking_guard_app", grants=APP_TABLE_GRANTS)
    for call_id in range(1, 51):
        app.execute("select booking_guard.queue_for_review(%s, 'calcom_booking_failed', '{}')", (call_id,))
    assert_bg005(app, "select booking_guard.queue_for_review(51, 'calcom_booking_failed', '{}')")
    assert core.execute("select count(*) from booking_guard.review_queue").fetchone()[0] == 50
    # booking_guard's own findings still reach the queue: a full queue never loses a rollback
    phantom = new_call(core, session_outcome="appointment_booked", appointment_made=True)
    assert core.execute("select count(*) from booking_guard.review_queue where call_id = %s and reason = %s",
                        (phantom, "appointment_validation_failed")).fetchone()[0] == 1


def test_the_app_cannot_flood_breaker_keys_or_metric_series(core, login_role):
    core.execute("select booking_guard.set_setting('circuit_max_keys', '40')")
    _, app = login_role("booking_guard_app")
    for i in range(40):
        app.execute("select booking_guard.circuit_acquire(%s)", (f"appointment_booking:service:{i}",))
    assert_bg005(app, "select booking_guard.circuit_acquire('appointment_booking:service:40')")
    series_before = core.execute("select count(*) from booking_guard.metrics()").fetchone()[0]
    assert_bg005(app, "select booking_guard.circuit_record_failure('appointment_booking:service:41')")
    assert core.execute("select count(*) from booking_guard.metrics()").fetchone()[0] == series_before


def test_an_alert_storm_is_one_alert(core, login_role):
    """Each booking for a call that does not exist is an alert; a storm of them is bounded."""
    core.execute("select booking_guard.set_setting('alert_storm_threshold', '20')")
    _, app = login_role("booking_guard_app", grants=APP_TABLE_GRANTS)
    app.execute("listen booking_guard_alert")
    for i in range(100):
        result = app.execute("select success, reason from booking_guard.record_booking(%s, %s, '{}')",
                             (900_000 + i, f"cal-storm-{i}")).fetchone()
        assert result == (False, "call_not_found")
    per_rule = core.execute("""select alert_type, count(*) from booking_guard.alerts
                                where resolved_at is null group by 1 order by 1""").fetchall()
    assert per_rule == [("alert_storm", 1), ("appointment_validation_failed", 20)]
    storm = core.execute("select occurrences, details from booking_guard.alerts where alert_type = 'alert_storm'").fetchone()
    assert storm[0] == 80
    assert storm[1]["rule"] == "appointment_validation_failed"
    assert len(list(app.notifies(timeout=1, stop_after=200))) == 21


def test_failure_reasons_are_labelled_from_a_closed_set(core):
    for reason in ("weird_reason_1", "weird_reason_2"):
        core.execute("""insert into booking_guard.events (kind, entity_type, entity_id, details)
                        values ('record_booking', 'call', '1', jsonb_build_object('success', false, 'reason', %s::text))""",
                     (reason,))
    labels = core.execute("""select labels ->> 'reason' from booking_guard.metrics()
                              where name = 'appointment_creation_failure_total'""").fetchall()
    assert {"weird_reason_1", "weird_reason_2"}.isdisjoint({r[0] for r in labels})
    assert "other" in {r[0] for r in labels}
