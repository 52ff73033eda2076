"""The daily report on a fixed, planted day: every number of the text is checked against the
planted facts (calls, appointments, alerts, detection events, reconciliation runs, review queue)."""

import re

import psycopg
import pytest
from support.planted_rows import company

DAY = "2026-03-10"


def plant_day(db) -> dict:
    db.execute("set timezone = 'UTC'")
    c = company(db)
    # 8 calls and 5 appointments on the day; others the day before and after (not counted)
    db.execute("""
        insert into calls (retell_call_id, company_id, direction, session_outcome, appointment_made,
                           appointment_link_status, booking_id, created_at, updated_at)
        select 'day-' || i, %(c)s, 'inbound',
               case when i <= 5 then 'appointment_booked' else 'no_booking' end, i <= 5,
               case when i <= 5 then 'linked' end, case when i <= 5 then 'cal-day-' || i end,
               timestamptz '2026-03-10 09:00 UTC' + i * interval '1 hour',
               timestamptz '2026-03-10 09:00 UTC' + i * interval '1 hour'
          from generate_series(1, 8) i""", {"c": c})
    db.execute("""
        insert into appointments (call_id, calcom_v2_booking_id, source, created_at, updated_at)
        select c.id, c.booking_id, 'retell_webhook', c.created_at, c.created_at
          from calls c where c.booking_id like 'cal-day-%'""")
    db.execute("""
        insert into calls (retell_call_id, company_id, direction, created_at, updated_at)
        values ('before-1', %(c)s, 'inbound', '2026-03-09 23:59:59 UTC', '2026-03-09 23:59:59 UTC'),
               ('before-2', %(c)s, 'inbound', '2026-03-09 12:00 UTC', '2026-03-09 12:00 UTC'),
               ('after-1', %(c)s, 'inbound', '2026-03-11 00:00 UTC', '2026-03-11 00:00 UTC')""", {"c": c})
    db.execute("""insert into appointments (call_id, calcom_v2_booking_id, source, created_at, updated_at)
                  values (null, 'cal-before', 'manual', '2026-03-09 22:00 UTC', '2026-03-09 22:00 UTC')""")

    def alert(kind, severity, entity, at, corrected=False, resolved=False, details="{}"):
        return db.execute("""
            insert into booking_guard.alerts (alert_type, severity, entity_type, entity_id, description, details,
                                              fingerprint, auto_corrected, detected_at, last_seen_at, resolved_at)
            values (%s, %s, 'call', %s, %s, %s::jsonb, %s || ':call:' || %s, %s, %s::timestamptz, %s::timestamptz,
                    case when %s then %s::timestamptz + interval '1 minute' end)
            returning id""",
            (kind, severity, entity, f"{kind} on call {entity}", details, kind, entity, corrected, at, at,
             resolved, at)).fetchone()[0]

    at = "2026-03-10 10:30 UTC"
    ids = {}
    # the day: 3 phantom bookings (2 corrected and resolved, 1 open), 2 missing directions (corrected),
    # 2 failed validations (rolled back), and what does not count: a superseded alert, a
    # recent_failures alert, a circuit alert
    ids["p1"] = alert("phantom_booking", "critical", "101", at, True, True)
    ids["p2"] = alert("phantom_booking", "critical", "102", at, True, True)
    ids["open"] = alert("phantom_booking", "critical", "103", at)
    ids["d1"] = alert("missing_direction", "warning", "104", at, True, True)
    ids["d2"] = alert("missing_direction", "warning", "105", at, True)
    alert("appointment_validation_failed", "critical", "106", at, True, True, '{"reason": "appointment_not_found"}')
    alert("appointment_validation_failed", "critical", "107", at, True, True, '{"reason": "appointment_not_found"}')
    alert("phantom_booking", "critical", "106", at, True, True, '{"superseded_by": 1}')
    alert("recent_failures", "warning", "108", at)
    alert("circuit_open", "critical", "109", at, False, True)
    # the previous 7 days: 70 (a daily average of 10); 5 more before that, not counted
    for i in range(70):
        alert("missing_direction", "warning", f"p{i}", "2026-03-08 12:00 UTC", True, True)
    for i in range(5):
        alert("missing_direction", "warning", f"old{i}", "2026-03-02 12:00 UTC", True, True)
    # the monitor found two of the day's seven, 3 s and 4 s late: 7 s over 7 inconsistencies
    for key, latency in (("open", 3.0), ("d2", 4.0)):
        db.execute("""insert into booking_guard.events (at, kind, rule, entity_type, entity_id, details)
                      values ('2026-03-10 10:30 UTC', 'detection', 'x', 'call', '0',
                              jsonb_build_object('alert_id', %s::bigint, 'latency_seconds', %s::numeric))""",
                   (ids[key], latency))
    # reconciliation: two runs on the day, one failed; one the day after
    db.execute("""insert into booking_guard.reconciliation_runs (started_at, finished_at, batch_size, counts, error)
                  values ('2026-03-10 01:00 UTC', '2026-03-10 01:00:01 UTC', 10000, '{"fixed": 4}', null),
                         ('2026-03-10 02:00 UTC', '2026-03-10 02:00:01 UTC', 10000, '{}', 'BG002: rejected'),
                         ('2026-03-11 01:00 UTC', '2026-03-11 01:00:01 UTC', 10000, '{"fixed": 9}', null)""")
    # the open review queue: two failed validations, one failed calendar booking
    for call_id, reason in ((106, "appointment_validation_failed"), (107, "appointment_validation_failed"),
                            (110, "calcom_booking_failed")):
        db.execute("select booking_guard.queue_for_review(%s, %s, '{}')", (call_id, reason))
    done = db.execute("select booking_guard.queue_for_review(111, 'service_not_found', '{}')").fetchone()[0]
    db.execute("select booking_guard.resolve_review(%s, 'fixed')", (done,))
    return ids


def test_report_of_a_planted_day(attached):
    ids = plant_day(attached)
    text = attached.execute("select booking_guard.daily_report(%s)", (DAY,)).fetchone()[0]
    since = re.search(r"appointment_validation_failed cases \(2 pending since (\S+ \S+)\)", text)
    assert since, text
    expected = f"""\
DATA CONSISTENCY REPORT - 2026-03-10
====================================

SUMMARY
-------
Total Calls: 8
Total Appointments: 5
Inconsistencies Found: 7 (87.50%)
Repaired by reconciliation: 4 (2 runs, 1 failed)

INCONSISTENCY BREAKDOWN
-----------------------
1. Phantom Bookings (session_outcome mismatch): 3
2. Failed Booking Validations (appointment_validation_failed): 2
3. Missing Direction: 2

TOP ISSUES
----------
1. Phantom Bookings (session_outcome mismatch) (3 cases)
   - Status: 2 auto-corrected, 1 still open
   - Action: Find where the application sets session_outcome without appointment_made

2. Failed Booking Validations (appointment_validation_failed) (2 cases)
   - Reason: appointment_not_found
   - Status: 2 auto-corrected, 0 still open
   - Action: Check the booking path (calendar booked, local record failed); rebook from the review queue

3. Missing Direction (2 cases)
   - Status: 2 auto-corrected, 1 still open
   - Action: Make the application send direction; booking_guard fills in the default meanwhile

TREND ANALYSIS
--------------
- Inconsistencies decreased 30.0% vs. last week (daily average 10.0)
- Recovery success rate: 85.7% (6 of 7)
- Average detection latency: 1.0 seconds (2 found by the monitor, 5 at write time)

ACTION ITEMS
------------
[ ] Review appointment_validation_failed cases (2 pending since {since.group(1)})
[ ] Review calcom_booking_failed cases (1 pending since {since.group(1)})
[ ] Acknowledge critical alert #{ids['open']} (phantom_booking call 103): phantom_booking on call 103
"""
    assert text == expected

    facts = attached.execute("select booking_guard.daily_report_json(%s)", (DAY,)).fetchone()[0]
    assert facts["summary"] == {"total_calls": 8, "total_appointments": 5, "inconsistencies": 7,
                                "inconsistency_pct": 87.5}
    assert [(b["rule"], b["count"]) for b in facts["breakdown"]] == [
        ("phantom_booking", 3), ("appointment_validation_failed", 2), ("missing_direction", 2)]
    assert facts["trend"]["previous_7_days"] == 70 and facts["trend"]["change_pct"] == -30.0
    assert facts["trend"]["recovery_success_rate_pct"] == 85.7
    assert facts["trend"]["average_detection_latency_seconds"] == 1.0
    assert facts["reconciliation"] == {"runs": 2, "fixed": 4, "failed": 1}
    assert facts["action_items"]["open_critical_alerts"] == 1


def test_report_is_stored_once_per_day(attached):
    plant_day(attached)
    first = attached.execute("select booking_guard.store_daily_report(%s)", (DAY,)).fetchone()[0]
    attached.execute("select booking_guard.store_daily_report(%s)", (DAY,))
    rows = attached.execute("select day::text, report, facts->'summary'->>'total_calls' from booking_guard.reports"
                            ).fetchall()
    assert rows == [(DAY, first, "8")]


def test_empty_day_says_so(attached):
    attached.execute("set timezone = 'UTC'")
    text = attached.execute("select booking_guard.daily_report('2026-01-01')").fetchone()[0]
    assert "Total Calls: 0\n" in text
    assert "Inconsistencies Found: 0\n" in text   # no made-up percentage of zero calls
    assert "INCONSISTENCY BREAKDOWN\n-----------------------\nNone.\n" in text
    assert "- Recovery success rate: n/a (no inconsistencies)" in text
    assert "[x] Nothing pending" in text


def test_bad_day(attached):
    with pytest.raises(psycopg.Error) as caught:
        attached.execute("select booking_guard.daily_report(null)")
    assert caught.value.diag.sqlstate == "BG005"
