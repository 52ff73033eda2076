"""Detection: each rule finds exactly the inconsistency planted for it (with the rule in observe,
so that nothing corrects it first); a clean booking produces no finding; run_monitor() alerts once
per finding, repairs in correct mode and resolves what no longer holds; detection reads through
indexes only."""


import psycopg
import pytest
from psycopg.types.json import Jsonb
from support.planted_rows import appointment, booked_call, call, company, insert

CALL_RULES = ["phantom_booking", "missing_appointment", "missing_direction", "outcome_flag_mismatch",
              "unlinked_appointment", "booking_id_mismatch", "customer_link"]


def observe(db, *rules: str) -> None:
    for rule in rules:
        db.execute("select booking_guard.set_rule(%s, 'observe')", (rule,))


def findings(db, since: str = "1 hour") -> list[tuple[str, str, str]]:
    return db.execute("select rule, entity_type, entity_id from booking_guard.detect(%s)", (since,)).fetchall()


def validation_failure(db, call_id: int, reason: str = "appointment_not_found", duration_ms: float = 12.5) -> None:
    db.execute("select booking_guard_internal.log_event('validation', null, 'call', %s, %s)",
               (str(call_id), Jsonb({"success": False, "reason": reason, "duration_ms": duration_ms,
                                     "appointment_id": None})))


# --- each rule, planted alone -------------------------------------------------------------

def test_clean_booking_has_no_finding(attached):
    c = company(attached)
    call_id, _ = booked_call(attached, c)
    customer = insert(attached, "customers", company_id=c, name="Ada")
    attached.execute("update calls set customer_id = %s where id = %s", (customer, call_id))
    assert findings(attached) == []
    assert attached.execute("select * from booking_guard.check_call(%s)", (call_id,)).fetchall() == []
    assert attached.execute("select count(*) from booking_guard.inconsistencies").fetchone()[0] == 0


def test_phantom_booking(attached):
    observe(attached, "phantom_booking")
    call_id = call(attached, company(attached), session_outcome="appointment_booked", appointment_made=False)
    assert findings(attached) == [("phantom_booking", "call", str(call_id))]
    row = attached.execute("select entity_id, details->>'session_outcome' from booking_guard.phantom_booking_findings"
                           ).fetchall()
    assert row == [(str(call_id), "appointment_booked")]


def test_missing_appointment(attached):
    observe(attached, "missing_appointment")
    attached.execute("select booking_guard.set_setting('verification_grace', '0')")
    call_id = call(attached, company(attached), session_outcome="appointment_booked", appointment_made=True,
                   appointment_link_status="linked")
    assert findings(attached) == [("missing_appointment", "call", str(call_id))]
    assert attached.execute("select count(*) from booking_guard.missing_appointment_findings").fetchone()[0] == 1


def test_missing_appointment_waits_for_the_grace(attached):
    observe(attached, "missing_appointment")   # grace 5 s: the call goes on the due list
    call_id = call(attached, company(attached), session_outcome="appointment_booked", appointment_made=True)
    assert findings(attached) == []
    attached.execute("update booking_guard.due_verifications set due_at = now() - interval '1 second'")
    attached.execute("update calls set created_at = now() - interval '1 minute', updated_at = now() - interval '1 minute' "
                     "where id = %s", (call_id,))
    assert findings(attached) == [("missing_appointment", "call", str(call_id))]


def test_missing_direction(attached):
    observe(attached, "missing_direction")
    call_id = call(attached, company(attached), direction=None)
    assert findings(attached) == [("missing_direction", "call", str(call_id))]


def test_orphaned_appointment(attached):
    observe(attached, "orphaned_appointment")
    orphan = appointment(attached, None)
    dangling = appointment(attached, 987654)      # points at no call
    appointment(attached, None, source="manual")  # not from the webhook: not this rule
    assert sorted(findings(attached)) == sorted([("orphaned_appointment", "appointment", str(orphan)),
                                                 ("orphaned_appointment", "appointment", str(dangling))])


def test_outcome_flag_mismatch(attached):
    observe(attached, "outcome_flag_mismatch")
    with attached.transaction():
        call_id = call(attached, company(attached), session_outcome="callback_requested", appointment_made=True,
                       appointment_link_status="linked", booking_id="cal-om")
        appointment(attached, call_id, "cal-om")
    assert findings(attached) == [("outcome_flag_mismatch", "call", str(call_id))]


def test_unlinked_appointment(attached):
    observe(attached, "unlinked_appointment")
    with attached.transaction():
        call_id = call(attached, company(attached))
        appointment(attached, call_id)
    assert findings(attached) == [("unlinked_appointment", "call", str(call_id))]


def test_booking_id_mismatch(attached):
    c = company(attached)
    call_id, _ = booked_call(attached, c, "cal-A")
    attached.execute("update calls set booking_id = 'cal-B' where id = %s", (call_id,))
    assert findings(attached) == [("booking_id_mismatch", "call", str(call_id))]
    details = attached.execute("select details from booking_guard.booking_id_mismatch_findings").fetchone()[0]
    assert details["booking_id"] == "cal-B" and details["appointment_booking_ids"] == ["cal-A"]


def test_duplicate_booking(attached):
    c = company(attached)
    call_id, _ = booked_call(attached, c, "cal-D")
    second = appointment(attached, call_id, "cal-D")
    assert findings(attached) == [("duplicate_booking", "booking", "cal-D")]
    details = attached.execute("select details from booking_guard.duplicate_booking_findings").fetchone()[0]
    assert details["appointments"] == 2 and second in details["appointment_ids"]


def test_customer_link(attached):
    observe(attached, "customer_link")
    c = company(attached)
    customer = insert(attached, "customers", company_id=c, name="Bo")
    call_id = call(attached, c, customer_id=customer, customer_link_status="pending")
    assert findings(attached) == [("customer_link", "call", str(call_id))]


def test_recent_failures(attached):
    call_id, _ = booked_call(attached, company(attached))
    validation_failure(attached, call_id, "appointment_not_found")
    validation_failure(attached, call_id, "appointment_stale")
    attached.execute("select booking_guard_internal.log_event('validation', null, 'call', %s, %s)",
                     (str(call_id), Jsonb({"success": True, "reason": "ok", "duration_ms": 3})))
    assert findings(attached) == [("recent_failures", "call", str(call_id))]
    details = attached.execute("select details from booking_guard.recent_failures_findings").fetchone()[0]
    assert details["failures"] == 2 and sorted(details["reasons"]) == ["appointment_not_found", "appointment_stale"]


# --- window, modes, errors --------------------------------------------------------------------

def test_window_and_off_rules(attached):
    observe(attached, "missing_direction")
    old = call(attached, company(attached), direction=None)
    attached.execute("update calls set created_at = now() - interval '2 hours', updated_at = now() - interval '2 hours'"
                     " where id = %s", (old,))
    assert findings(attached, "1 hour") == []
    assert findings(attached, "3 hours") == [("missing_direction", "call", str(old))]
    # check_call sees a call of any age
    assert attached.execute("select rule from booking_guard.check_call(%s)", (old,)).fetchall() == [("missing_direction",)]
    attached.execute("select booking_guard.set_rule('missing_direction', 'off')")
    assert findings(attached, "3 hours") == []


def test_errors(attached, db):
    with pytest.raises(psycopg.Error) as caught:
        attached.execute("select * from booking_guard.detect('-1 hour')")
    assert caught.value.diag.sqlstate == "BG005"
    with pytest.raises(psycopg.Error) as caught:
        attached.execute("select * from booking_guard.detect_rule('no_such_rule')")
    assert caught.value.diag.sqlstate == "BG004"
    with pytest.raises(psycopg.Error) as caught:
        attached.execute("select * from booking_guard.check_call(424242)")
    assert caught.value.diag.sqlstate == "BG004"
    with pytest.raises(psycopg.Error) as caught:
        attached.execute("select * from booking_guard.check_call(null)")
    assert caught.value.diag.sqlstate == "BG005"
    attached.execute("select booking_guard.detach()")
    for query in ("select * from booking_guard.detect()", "select booking_guard.run_monitor()",
                  "select * from booking_guard.inconsistencies"):
        with pytest.raises(psycopg.Error) as caught:
            attached.execute(query)
        assert caught.value.diag.sqlstate == "BG003", query


# --- run_monitor -------------------------------------------------------------------------------

def open_alerts(db, rule: str) -> list[tuple]:
    return db.execute("select entity_id, occurrences, auto_corrected from booking_guard.alerts "
                      "where alert_type = %s and resolved_at is null order by id", (rule,)).fetchall()


def test_run_monitor_alerts_once_per_finding_and_resolves(attached):
    observe(attached, "missing_direction")
    attached.execute("select booking_guard.set_rule('missing_direction', 'off')")   # no alert at write time
    call_id = call(attached, company(attached), direction=None)
    observe(attached, "missing_direction")
    result = attached.execute("select booking_guard.run_monitor()").fetchone()[0]
    assert result["findings"] == 1 and result["new"] == 1 and result["repaired"] == 0
    attached.execute("select booking_guard.run_monitor()")
    assert open_alerts(attached, "missing_direction") == [(str(call_id), 2, False)]
    event = attached.execute("select details from booking_guard.events where kind = 'detection' and rule = %s",
                             ("missing_direction",)).fetchall()
    assert len(event) == 1 and event[0][0]["latency_seconds"] >= 0
    # fixed by hand: the next run resolves the alert
    attached.execute("update calls set direction = 'outbound' where id = %s", (call_id,))
    result = attached.execute("select booking_guard.run_monitor()").fetchone()[0]
    assert result["resolved"] == 1 and open_alerts(attached, "missing_direction") == []


def test_scheduled_monitor_sees_the_rows_of_a_transaction_open_while_it_ran(attached, connect):
    """The scheduled monitor looks at the rows created since its last run. A transaction open during a
    run, even one that had written nothing yet, commits rows dated at its own start, before that run:
    the next run must still see them."""
    attached.execute("select booking_guard.set_setting('monitor_overlap', '0')")
    observe(attached, "orphaned_appointment")
    attached.execute("call booking_guard.run_job('run_monitor')")
    writer = connect(autocommit=False)
    writer.execute("select 1")                     # open, no transaction id yet (the calendar call runs)
    attached.execute("call booking_guard.run_job('run_monitor')")
    orphan = appointment(writer, None)             # dated at the writer's start, before that run
    writer.commit()
    attached.execute("call booking_guard.run_job('run_monitor')")
    assert open_alerts(attached, "orphaned_appointment") == [(str(orphan), 1, False)]


def test_run_monitor_repairs_in_correct_mode(attached):
    for rule in ("missing_direction", "customer_link", "unlinked_appointment", "orphaned_appointment"):
        attached.execute("select booking_guard.set_rule(%s, 'off')", (rule,))
    c = company(attached)
    customer = insert(attached, "customers", company_id=c, name="Cy")
    no_direction = call(attached, c, direction=None)
    unlinked_customer = call(attached, c, customer_id=customer, customer_link_status="pending")
    with attached.transaction():
        unlinked = call(attached, c)
        appointment(attached, unlinked)
    target = call(attached, c, booking_id="cal-orphan")
    orphan = appointment(attached, None, "cal-orphan")
    for rule in ("missing_direction", "customer_link", "unlinked_appointment", "orphaned_appointment"):
        attached.execute("select booking_guard.set_rule(%s, 'correct')", (rule,))

    result = attached.execute("select booking_guard.run_monitor()").fetchone()[0]
    assert result["repaired"] == 4, result
    row = attached.execute("select direction from calls where id = %s", (no_direction,)).fetchone()
    assert row == ("inbound",)
    assert attached.execute("select customer_link_status from calls where id = %s", (unlinked_customer,)).fetchone() \
        == ("linked",)
    assert attached.execute("select appointment_made, session_outcome, appointment_link_status from calls where id = %s",
                            (unlinked,)).fetchone() == (True, "appointment_booked", "linked")
    assert attached.execute("select call_id from appointments where id = %s", (orphan,)).fetchone() == (target,)
    flagged = attached.execute("select alert_type, auto_corrected from booking_guard.alerts where resolved_at is null "
                               "order by alert_type").fetchall()
    assert flagged == [("customer_link", True), ("missing_direction", True), ("orphaned_appointment", True),
                       ("unlinked_appointment", True)]
    # all repaired: the next run finds nothing and resolves the four alerts
    result = attached.execute("select booking_guard.run_monitor()").fetchone()[0]
    assert result["findings"] == 0 and result["resolved"] == 4


def test_run_monitor_rolls_back_a_phantom_without_appointment(attached):
    attached.execute("select booking_guard.set_rule('phantom_booking', 'off')")
    attached.execute("select booking_guard.set_rule('missing_appointment', 'off')")
    call_id = call(attached, company(attached), session_outcome="appointment_booked", appointment_made=False)
    attached.execute("update calls set created_at = now() - interval '10 minutes', updated_at = now() - interval "
                     "'10 minutes' where id = %s", (call_id,))
    attached.execute("select booking_guard.set_rule('phantom_booking', 'correct')")
    attached.execute("select booking_guard.set_rule('missing_appointment', 'correct')")
    attached.execute("select booking_guard.run_monitor()")
    assert attached.execute("select session_outcome, appointment_made from calls where id = %s", (call_id,)).fetchone() \
        == ("creation_failed", False)
    assert attached.execute("select reason from booking_guard.review_queue where call_id = %s", (call_id,)).fetchall() \
        == [("appointment_validation_failed",)]
    assert attached.execute("select alert_type, auto_corrected from booking_guard.alerts where resolved_at is null"
                            ).fetchall() == [("missing_appointment", True)]


def test_run_monitor_never_guesses_an_ambiguous_orphan(attached):
    attached.execute("select booking_guard.set_rule('orphaned_appointment', 'off')")
    c = company(attached)
    first = call(attached, c, booking_id="cal-twice")
    second = call(attached, c, booking_id="cal-twice")
    orphan = appointment(attached, None, "cal-twice")
    attached.execute("select booking_guard.set_rule('orphaned_appointment', 'correct')")
    for _ in range(2):
        attached.execute("select booking_guard.run_monitor()")
    assert attached.execute("select call_id from appointments where id = %s", (orphan,)).fetchone() == (None,)
    items = attached.execute("select call_id, reason, context from booking_guard.review_queue").fetchall()
    assert len(items) == 1
    assert items[0][:2] == (None, "ambiguous_orphan")
    assert items[0][2][f"appointment_{orphan}"]["candidate_call_ids"] == [first, second]
    assert open_alerts(attached, "orphaned_appointment") == [(str(orphan), 2, False)]


# --- cost: through the indexes ----------------------------------------------------------------

def test_detection_reads_through_indexes(attached):
    # 20,000 old calls and appointments, then a few recent ones; no sequential scan of either table
    attached.execute("select booking_guard.set_rule('missing_direction', 'observe')")
    attached.execute("insert into companies (name) select 'c' || i from generate_series(1, 5) i")
    attached.execute("""
        insert into calls (retell_call_id, company_id, direction, session_outcome, appointment_made,
                           appointment_link_status, booking_id, created_at, updated_at)
        select 'old-' || i, 1 + i % 5, 'inbound', 'appointment_booked', true, 'linked', 'cal-old-' || i,
               now() - interval '3 days' + i * interval '1 second', now() - interval '3 days'
          from generate_series(1, 20000) i""")
    attached.execute("""
        insert into appointments (call_id, calcom_v2_booking_id, source, created_at, updated_at)
        select c.id, c.booking_id, 'retell_webhook', c.created_at, c.created_at from calls c""")
    call(attached, 1, direction=None)
    attached.execute("analyze calls")
    attached.execute("analyze appointments")

    # Every plan detection runs, nested ones included, as auto_explain prints them to this session
    # (the table-wide seq_scan counters would also count what any other backend does meanwhile).
    plans: list[str] = []
    attached.add_notice_handler(lambda d: plans.append(d.message_primary or ""))
    attached.execute("load 'auto_explain'")
    for setting, value in (("auto_explain.log_min_duration", "0"), ("auto_explain.log_nested_statements", "on"),
                           ("auto_explain.log_level", "notice")):
        attached.execute("select set_config(%s, %s, false)", (setting, value))
    assert [r[0] for r in findings(attached)] == ["missing_direction"]
    attached.execute("select booking_guard.run_monitor()")
    attached.execute("select set_config('auto_explain.log_min_duration', '-1', false)")
    assert any("Index" in p and "calls" in p for p in plans), plans
    scans = [line.strip() for p in plans for line in p.splitlines()
             if "Seq Scan on calls" in line or "Seq Scan on appointments" in line]
    assert scans == [], "\n\n".join(p for p in plans if "Seq Scan on calls" in p or "Seq Scan on appointments" in p)


def test_one_repair_ends_two_findings(attached):
    # a phantom whose appointment exists: phantom_booking and unlinked_appointment, one repair
    for rule in ("phantom_booking", "unlinked_appointment"):
        attached.execute("select booking_guard.set_rule(%s, 'off')", (rule,))
    with attached.transaction():
        call_id = call(attached, company(attached), session_outcome="appointment_booked", appointment_made=False)
        appointment(attached, call_id)
    assert sorted(r[0] for r in attached.execute("select rule from booking_guard.check_call(%s)", (call_id,))) == []
    for rule in ("phantom_booking", "unlinked_appointment"):
        attached.execute("select booking_guard.set_rule(%s, 'correct')", (rule,))
    assert sorted(r[0] for r in attached.execute("select rule from booking_guard.check_call(%s)", (call_id,))) == [
        "phantom_booking", "unlinked_appointment"]
    result = attached.execute("select booking_guard.run_monitor()").fetchone()[0]
    assert result["findings"] == 2 and result["repaired"] == 2
    assert attached.execute("select alert_type, auto_corrected from booking_guard.alerts where resolved_at is null "
                            "order by alert_type").fetchall() == [("phantom_booking", True), ("unlinked_appointment", True)]
