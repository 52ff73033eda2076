"""kpis(): the seven success targets from planted facts; no data means null, never a made-up 100 %."""

from decimal import Decimal

import psycopg
import pytest
from psycopg.types.json import Jsonb
from support.planted_rows import booked_call, call, company


def kpis(db, since: str = "1 day") -> dict:
    rows = db.execute("select name, value, target, ok, samples from booking_guard.kpis(%s)", (since,)).fetchall()
    return {r[0]: r[1:] for r in rows}


def test_no_data_is_null(attached):
    got = kpis(attached)
    assert list(got) == ["data_consistency_rate", "validation_latency_p95", "circuit_breaker_recovery_time",
                         "alert_response_time", "auto_correction_rate", "manual_review_queue_size",
                         "false_positive_rate"]
    for name, (value, _target, ok, samples) in got.items():
        if name == "manual_review_queue_size":
            assert (value, ok, samples) == (0, True, 0)
        else:
            assert (value, ok, samples) == (None, None, 0), name


def test_planted_kpis(attached):
    db = attached
    c = company(db)
    # consistency: 3 booked, 1 without booking, 1 phantom left standing (observe, judged at once): 4 of 5
    for _ in range(3):
        booked_call(db, c)
    call(db, c, session_outcome="no_booking")
    db.execute("select booking_guard.set_setting('verification_grace', '0')")
    db.execute("select booking_guard.set_rule('phantom_booking', 'observe')")
    db.execute("select booking_guard.set_rule('missing_appointment', 'observe')")
    call(db, c, session_outcome="appointment_booked", appointment_made=False)
    old = call(db, c, session_outcome="appointment_booked", appointment_made=False)   # outside the window
    db.execute("update calls set created_at = now() - interval '2 days' where id = %s", (old,))

    # validation latency: 10, 20, ..., 200 ms; p95 = 190.5; one older event does not count
    for ms in range(10, 201, 10):
        db.execute("select booking_guard_internal.log_event('validation', null, 'call', '1', %s)",
                   (Jsonb({"success": True, "reason": "ok", "duration_ms": ms}),))
    db.execute("""insert into booking_guard.events (at, kind, entity_type, entity_id, details)
                  values (now() - interval '2 days', 'validation', 'call', '1', '{"duration_ms": 99999}')""")

    # circuit breaker: one key open for 40 s (through half-open), another for 100 s: 70 s on average
    db.execute("""
        insert into booking_guard.circuit_transitions (key, from_state, to_state, at, reason) values
            ('appointment_booking:global', 'closed', 'open', now() - interval '10 minutes', 'failure_threshold'),
            ('appointment_booking:global', 'open', 'half_open', now() - interval '10 minutes' + interval '30 seconds',
             'cooldown_elapsed'),
            ('appointment_booking:global', 'half_open', 'closed', now() - interval '10 minutes' + interval '40 seconds',
             'success_threshold'),
            ('appointment_booking:service:7', 'closed', 'open', now() - interval '5 minutes', 'failure_threshold'),
            ('appointment_booking:service:7', 'open', 'closed', now() - interval '5 minutes' + interval '100 seconds',
             'reset')""")

    # alerts: replace what the plants raised by a known set: 1 acknowledged after 120 s, 9 auto-corrected
    db.execute("delete from booking_guard.alerts")
    db.execute("""
        insert into booking_guard.alerts (alert_type, severity, entity_type, entity_id, description, fingerprint,
                                          auto_corrected, detected_at, acknowledged_at)
        values ('phantom_booking', 'critical', 'call', '1', 'x', 'a', false, now() - interval '10 minutes',
                now() - interval '8 minutes')""")
    db.execute("""
        insert into booking_guard.alerts (alert_type, severity, entity_type, entity_id, description, fingerprint,
                                          auto_corrected, detected_at)
        select 'missing_direction', 'warning', 'call', i::text, 'x', 'd' || i, true, now() - interval '1 hour'
          from generate_series(1, 9) i""")

    # review queue: 15 items, 3 resolved (1 false positive): 12 open, 33.33 % false positives
    ids = [db.execute("select booking_guard.queue_for_review(%s, 'appointment_validation_failed', '{}')",
                      (1000 + i,)).fetchone()[0] for i in range(15)]
    for review_id, resolution in zip(ids[:3], ("false_positive", "fixed", "dismissed"), strict=True):
        db.execute("select booking_guard.resolve_review(%s, %s)", (review_id, resolution))

    got = kpis(db)
    assert got["data_consistency_rate"] == (80, ">= 99.5", False, 5)
    assert got["validation_latency_p95"] == (Decimal("190.50"), "<= 100", False, 20)
    assert got["circuit_breaker_recovery_time"] == (70, "<= 60", False, 2)
    assert got["alert_response_time"] == (120, "<= 300", True, 1)
    assert got["auto_correction_rate"] == (90, ">= 90", True, 10)
    assert got["manual_review_queue_size"] == (12, "<= 10", False, 12)
    assert got["false_positive_rate"] == (Decimal("33.33"), "<= 1", False, 3)

    # a wider window takes in the older rows
    assert kpis(db, "3 days")["data_consistency_rate"][3] == 6


def test_bad_window(attached):
    with pytest.raises(psycopg.Error) as caught:
        attached.execute("select * from booking_guard.kpis('0')")
    assert caught.value.diag.sqlstate == "BG005"
