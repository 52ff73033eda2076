"""The commit-time truth check (rules missing_appointment and unlinked_appointment), the grace
path with verify_due(), and rollback_on_failure().

Time is never slept through: the grace is passed by giving verify_due() an as_of in the future.
"""

import psycopg
import pytest
from psycopg.rows import dict_row
from support.application_rows import BOOKED, FAILED, alerts, call_row, flags, new_appointment, new_call, review_items, set_rule

MODES = ["off", "observe", "correct", "enforce"]


@pytest.fixture
def graced(core: psycopg.Connection) -> psycopg.Connection:
    """As core, with the default grace of 5 seconds."""
    core.execute("select booking_guard.set_setting('verification_grace', '5 seconds')")
    return core


def count(db: psycopg.Connection, relation: str) -> int:
    return db.execute(f"select count(*) from {relation}").fetchone()[0]


def open_alerts(db: psycopg.Connection) -> list[tuple]:
    return db.execute("""select alert_type, severity, entity_id, auto_corrected from booking_guard.alerts
                          where resolved_at is null order by id""").fetchall()


def events(db: psycopg.Connection) -> list[tuple]:
    return db.execute("select kind, rule, entity_id from booking_guard.events order by id").fetchall()


def due_list(db: psycopg.Connection) -> list[int]:
    return [r[0] for r in db.execute("select call_id from booking_guard.due_verifications order by call_id")]


def verify_due(db: psycopg.Connection, after: str) -> list[tuple]:
    """verify_due() as of now() + after (an interval), as a list of (call_id, verdict)."""
    return db.execute("select call_id, verdict from booking_guard.verify_due(as_of => now() + %s::interval) order by 1",
                      (after,)).fetchall()


def claimed_booking(db: psycopg.Connection, **cols) -> int:
    """A call that claims a booking (as trackBooking writes it), committed alone."""
    cols.setdefault("session_outcome", "appointment_booked")
    cols.setdefault("appointment_made", True)
    return new_call(db, **cols)


def commit_error(db: psycopg.Connection, *writes) -> psycopg.Error:
    """Runs the writes (functions of the connection) in one transaction and returns the error
    COMMIT raised; the statements themselves must all succeed."""
    db.execute("begin")
    for write in writes:
        write(db)
    with pytest.raises(psycopg.Error) as caught:
        db.execute("commit")
    assert db.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    return caught.value


# -- missing_appointment at COMMIT (grace 0) -------------------------------------------------

@pytest.mark.parametrize(("outcome", "made"), [("appointment_booked", True), ("appointment_booked", False),
                                               ("no_answer", True)],
                         ids=["flagged", "booked_without_flag", "flag_with_another_outcome"])
def test_a_phantom_committed_alone_is_rolled_back(core, outcome, made):
    """The classic phantom (outcome booked, flag false) and the flag with another outcome are first
    'corrected' by trigger 3 into a booking; whatever the shape, the call ends creation_failed
    with exactly one open critical alert (trigger 3's is superseded) and one review item."""
    call_id = claimed_booking(core, session_outcome=outcome, appointment_made=made, retell_call_id="retell-phantom")
    assert flags(core, call_id) == FAILED
    assert open_alerts(core) == [("missing_appointment", "critical", str(call_id), True)]
    with core.cursor(row_factory=dict_row) as cur:
        item, = cur.execute("select * from booking_guard.review_queue").fetchall()
    assert (item["call_id"], item["reason"], item["priority"], item["status"]) == (
        call_id, "appointment_validation_failed", 1, "pending")
    assert item["context"]["rule"] == "missing_appointment"
    assert item["context"]["retell_call_id"] == "retell-phantom"
    assert item["context"]["before"]["session_outcome"] == "appointment_booked"
    assert item["context"]["after"] == {"session_outcome": "creation_failed", "appointment_made": False,
                                        "appointment_link_status": "creation_failed"}
    alert, = [a for a in alerts(core, "missing_appointment")]
    assert item["context"]["alert_id"] == alert["id"]
    assert "retell-phantom" in alert["description"]
    corrected = [a for a in alerts(core, call_id=call_id) if a["alert_type"] in ("phantom_booking", "outcome_flag_mismatch")]
    assert [(a["resolved_at"] is not None, a["details"]["superseded_by"]) for a in corrected] == (
        [] if made and outcome == "appointment_booked" else [(True, alert["id"])])
    kinds = [e for e in events(core) if e[0] in ("rollback", "review")]
    assert kinds == [("rollback", "missing_appointment", str(call_id)),
                     ("review", "appointment_validation_failed", str(call_id))]
    assert due_list(core) == []


def test_a_phantom_in_enforce_mode_fails_the_commit_and_leaves_no_trace(core):
    set_rule(core, "missing_appointment", "enforce")
    before = (count(core, "booking_guard.events"), count(core, "booking_guard.alerts"))
    error = commit_error(core, claimed_booking)
    diag = error.diag
    assert diag.sqlstate == "BG002"
    assert diag.message_primary == "booking rejected by rule missing_appointment: call 1"
    assert "Call 1 (retell-" in diag.message_detail
    assert "no appointment is linked" in diag.message_detail
    assert "set_rule('missing_appointment', 'correct')" in diag.message_hint
    assert count(core, "calls") == 0
    assert (count(core, "booking_guard.events"), count(core, "booking_guard.alerts")) == before == (0, 0)
    assert count(core, "booking_guard.review_queue") == 0
    assert due_list(core) == []


def test_the_seeds_phantom_in_enforce_mode_takes_its_own_alert_with_it(core):
    """phantom_booking (correct) alerts inside the transaction; the rejected COMMIT discards it."""
    set_rule(core, "missing_appointment", "enforce")
    error = commit_error(core, lambda db: claimed_booking(db, appointment_made=False))
    assert error.diag.sqlstate == "BG002"
    assert count(core, "calls") == 0
    assert count(core, "booking_guard.alerts") == 0
    assert count(core, "booking_guard.events") == 0


def test_enforce_is_judged_at_commit_even_with_a_grace(graced):
    """enforce cannot wait for a grace: the transaction can only be rejected while it commits."""
    set_rule(graced, "missing_appointment", "enforce")
    error = commit_error(graced, claimed_booking)
    assert error.diag.sqlstate == "BG002"
    assert count(graced, "calls") == 0
    assert due_list(graced) == []


def test_enforce_lets_a_real_booking_through(core):
    set_rule(core, "missing_appointment", "enforce")
    with core.transaction():
        call_id = claimed_booking(core)
        new_appointment(core, call_id)
    assert flags(core, call_id) == BOOKED
    assert open_alerts(core) == []


@pytest.mark.parametrize("order", ["call_first", "appointment_first"])
@pytest.mark.parametrize("grace", ["0", "5 seconds"])
def test_a_booking_written_in_one_transaction_raises_nothing(core, order, grace):
    core.execute("select booking_guard.set_setting('verification_grace', %s)", (grace,))
    with core.transaction():
        if order == "call_first":
            call_id = claimed_booking(core, appointment_link_status="linked")
            new_appointment(core, call_id)
        else:
            new_appointment(core, 500)
            call_id = claimed_booking(core, id=500, appointment_link_status="linked")
    assert flags(core, call_id) == BOOKED
    assert count(core, "booking_guard.alerts") == 0
    assert count(core, "booking_guard.review_queue") == 0
    assert count(core, "booking_guard.events") == 0
    assert due_list(core) == []


def test_only_the_phantom_of_a_mixed_transaction_is_rolled_back(core):
    with core.transaction():
        good = claimed_booking(core)
        new_appointment(core, good)
        bad = claimed_booking(core)
    assert flags(core, good) == BOOKED
    assert flags(core, bad) == FAILED
    assert open_alerts(core) == [("missing_appointment", "critical", str(bad), True)]
    assert [r[0] for r in core.execute("select call_id from booking_guard.review_queue")] == [bad]


@pytest.mark.parametrize("mode", ["off", "observe"])
def test_missing_appointment_by_mode(core, mode):
    set_rule(core, "missing_appointment", mode)
    call_id = claimed_booking(core)
    assert flags(core, call_id) == ("appointment_booked", True, None)
    assert open_alerts(core) == ([("missing_appointment", "critical", str(call_id), False)] if mode == "observe" else [])
    assert count(core, "booking_guard.review_queue") == 0


def test_a_phantom_repeated_bumps_its_alert_and_keeps_one_review_item(core):
    call_id = claimed_booking(core)
    core.execute("""update calls set session_outcome = 'appointment_booked', appointment_made = true
                     where id = %s""", (call_id,))
    assert flags(core, call_id) == FAILED
    missing = alerts(core, "missing_appointment", call_id)
    assert [(a["occurrences"], a["resolved_at"]) for a in missing] == [(2, None)]
    assert review_items(core, call_id) == [("appointment_validation_failed", 1, "pending")]


# -- unlinked_appointment (the reverse rule) --------------------------------------------------

def booked(db: psycopg.Connection) -> int:
    with db.transaction():
        call_id = new_call(db)
        new_appointment(db, call_id)
    assert flags(db, call_id) == BOOKED
    return call_id


def deny(db: psycopg.Connection, call_id: int) -> None:
    db.execute("""update calls set appointment_made = false, session_outcome = 'no_answer',
                         appointment_link_status = 'unlinked' where id = %s""", (call_id,))


@pytest.mark.parametrize("mode", MODES)
def test_unlinked_appointment_by_mode(core, mode):
    call_id = booked(core)
    set_rule(core, "unlinked_appointment", mode)
    if mode == "enforce":
        error = commit_error(core, lambda db: deny(db, call_id))
        assert error.diag.sqlstate == "BG002"
        assert error.diag.message_primary == f"booking rejected by rule unlinked_appointment: call {call_id}"
        assert "has a linked appointment" in error.diag.message_detail
        assert flags(core, call_id) == BOOKED
        assert count(core, "booking_guard.alerts") == 0
        return
    deny(core, call_id)
    found = alerts(core, "unlinked_appointment", call_id)
    if mode == "correct":
        assert flags(core, call_id) == BOOKED
        assert [(a["severity"], a["auto_corrected"]) for a in found] == [("critical", True)]
        assert found[0]["details"]["before"] == {"session_outcome": "no_answer", "appointment_made": False,
                                                 "appointment_link_status": "unlinked"}
        assert found[0]["details"]["after"] == {"session_outcome": "appointment_booked", "appointment_made": True,
                                                "appointment_link_status": "linked"}
    elif mode == "observe":
        assert flags(core, call_id) == ("no_answer", False, "unlinked")
        assert [(a["severity"], a["auto_corrected"]) for a in found] == [("critical", False)]
    else:
        assert flags(core, call_id) == ("no_answer", False, "unlinked")
        assert found == []
    assert count(core, "booking_guard.review_queue") == 0


def test_rollback_on_failure_cannot_deny_a_standing_appointment(core):
    """The truth is the appointment row: rolling back a call that has one is undone at COMMIT,
    and said (unlinked_appointment)."""
    call_id = booked(core)
    core.execute("select booking_guard.rollback_on_failure(%s, 'manual test')", (call_id,))
    assert flags(core, call_id) == BOOKED
    assert [a["alert_type"] for a in alerts(core, call_id=call_id) if a["resolved_at"] is None] == [
        "appointment_validation_failed", "unlinked_appointment"]


# -- the grace path ---------------------------------------------------------------------------

def test_grace_a_claim_waits_on_the_due_list(graced):
    call_id = claimed_booking(graced)
    assert flags(graced, call_id) == ("appointment_booked", True, None)
    due_at, = graced.execute("select due_at - enqueued_at from booking_guard.due_verifications").fetchone()
    assert due_at.total_seconds() == pytest.approx(5, abs=0.5)
    assert open_alerts(graced) == []
    # not due yet: verify_due() now judges nothing and changes nothing
    assert verify_due(graced, "0 seconds") == []
    assert due_list(graced) == [call_id]
    assert flags(graced, call_id) == ("appointment_booked", True, None)


def test_grace_an_appointment_that_arrives_in_time_clears_the_call(graced):
    call_id = claimed_booking(graced)
    assert due_list(graced) == [call_id]
    new_appointment(graced, call_id)     # another transaction, before the grace has passed
    assert verify_due(graced, "6 seconds") == [(call_id, "ok")]
    assert flags(graced, call_id) == BOOKED
    assert due_list(graced) == []
    assert open_alerts(graced) == []
    assert count(graced, "booking_guard.review_queue") == 0


def test_grace_an_appointment_that_never_arrives_is_rolled_back_after_the_grace(graced):
    call_id = claimed_booking(graced)
    assert verify_due(graced, "4 seconds") == []
    assert flags(graced, call_id) == ("appointment_booked", True, None)
    assert verify_due(graced, "6 seconds") == [(call_id, "rolled_back")]
    assert flags(graced, call_id) == FAILED
    assert open_alerts(graced) == [("missing_appointment", "critical", str(call_id), True)]
    assert review_items(graced, call_id) == [("appointment_validation_failed", 1, "pending")]
    assert due_list(graced) == []
    # judged once: a second pass finds nothing to do
    assert verify_due(graced, "60 seconds") == []
    assert call_row(graced, call_id)["session_outcome"] == "creation_failed"


def test_grace_observe_alerts_after_the_grace(graced):
    set_rule(graced, "missing_appointment", "observe")
    call_id = claimed_booking(graced)
    assert open_alerts(graced) == []
    assert verify_due(graced, "6 seconds") == [(call_id, "alerted")]
    assert flags(graced, call_id) == ("appointment_booked", True, None)
    assert open_alerts(graced) == [("missing_appointment", "critical", str(call_id), False)]
    assert due_list(graced) == []


def test_grace_a_withdrawn_claim_or_a_deleted_call_leaves_the_list(graced):
    withdrawn = claimed_booking(graced)
    deleted = claimed_booking(graced)
    graced.execute("""update calls set session_outcome = 'creation_failed', appointment_made = false
                       where id = %s""", (withdrawn,))
    graced.execute("delete from calls where id = %s", (deleted,))
    assert verify_due(graced, "6 seconds") == [(withdrawn, "ok"), (deleted, "gone")]
    assert due_list(graced) == []
    assert open_alerts(graced) == []


def test_grace_a_repeated_claim_keeps_its_first_due_time(graced):
    call_id = claimed_booking(graced)
    first, = graced.execute("select due_at from booking_guard.due_verifications").fetchone()
    graced.execute("update calls set appointment_link_status = 'pending' where id = %s", (call_id,))
    assert graced.execute("select due_at from booking_guard.due_verifications").fetchall() == [(first,)]


def test_grace_a_claim_committed_before_enforce_is_rolled_back_not_stuck(graced):
    """Switching the rule to enforce while calls wait on the due list: verify_due() cannot reject a
    transaction that committed long ago, so it repairs as correct does, and goes on with the
    rest of the list instead of failing at that call every time."""
    first = claimed_booking(graced)
    second = claimed_booking(graced)
    set_rule(graced, "missing_appointment", "enforce")
    assert verify_due(graced, "6 seconds") == [(first, "rolled_back"), (second, "rolled_back")]
    assert flags(graced, first) == flags(graced, second) == FAILED
    assert due_list(graced) == []
    assert len(open_alerts(graced)) == 2


def test_verify_due_needs_an_attachment(graced):
    graced.execute("select booking_guard.detach()")
    with pytest.raises(psycopg.Error) as caught:
        graced.execute("select * from booking_guard.verify_due()")
    assert caught.value.diag.sqlstate == "BG003"


# -- rollback_on_failure() ----------------------------------------------------------------------

def test_rollback_on_failure(core):
    call_id = new_call(core, retell_call_id="retell-rb", session_outcome="in_progress")
    result = core.execute("select booking_guard.rollback_on_failure(%s, 'calcom said no')", (call_id,)).fetchone()[0]
    assert flags(core, call_id) == FAILED
    assert result["reason"] == "calcom said no"
    assert result["before"] == {"session_outcome": "in_progress", "appointment_made": False, "appointment_link_status": None}
    assert result["after"] == {"session_outcome": "creation_failed", "appointment_made": False,
                               "appointment_link_status": "creation_failed"}
    alert, = alerts(core, call_id=call_id)
    assert (alert["id"], alert["alert_type"], alert["severity"], alert["auto_corrected"]) == (
        result["alert_id"], "appointment_validation_failed", "critical", True)
    assert "retell-rb" in alert["description"] and "calcom said no" in alert["description"]
    assert ("rollback", "appointment_validation_failed", str(call_id)) in events(core)
    # a second failure of the same call bumps the one open alert
    again = core.execute("select booking_guard.rollback_on_failure(%s, 'again', 'calcom_booking_failed')",
                         (call_id,)).fetchone()[0]
    assert again["alert_id"] != result["alert_id"]   # another alert type: another fingerprint
    core.execute("select booking_guard.rollback_on_failure(%s, 'third')", (call_id,))
    assert [a["occurrences"] for a in alerts(core, "appointment_validation_failed", call_id)] == [2]


@pytest.mark.parametrize(("call_id", "reason"), [(None, "x"), (1, None)])
def test_rollback_on_failure_nulls_are_bg005(core, call_id, reason):
    existing = claimed_booking(core, session_outcome="in_progress", appointment_made=False)
    assert existing == 1
    with pytest.raises(psycopg.Error) as caught:
        core.execute("select booking_guard.rollback_on_failure(%s, %s)", (call_id, reason))
    assert caught.value.diag.sqlstate == "BG005"
    assert caught.value.diag.message_primary == "rollback_on_failure() needs a call id and a reason"
    assert flags(core, 1) == ("in_progress", False, None)
    assert count(core, "booking_guard.alerts") == 0


def test_rollback_on_failure_unknown_call_is_bg004(core):
    with pytest.raises(psycopg.Error) as caught:
        core.execute("select booking_guard.rollback_on_failure(4242, 'x')")
    assert caught.value.diag.sqlstate == "BG004"
    assert caught.value.diag.message_primary == "unknown call 4242"
    assert count(core, "booking_guard.alerts") == 0
    assert count(core, "booking_guard.events") == 0


def test_rollback_on_failure_needs_an_attachment(core):
    call_id = new_call(core)
    core.execute("select booking_guard.detach()")
    with pytest.raises(psycopg.Error) as caught:
        core.execute("select booking_guard.rollback_on_failure(%s, 'x')", (call_id,))
    assert caught.value.diag.sqlstate == "BG003"


# -- the ordinary life of a call raises nothing -------------------------------------------------

def test_an_ordinary_call_lifecycle_raises_nothing(core):
    """Outcomes other than a booking, with no link status, are no claim: no verdict, no alert."""
    call_id = new_call(core)
    for outcome in ("in_progress", "no_answer", "callback_requested", None):
        core.execute("update calls set session_outcome = %s where id = %s", (outcome, call_id))
    core.execute("update calls set call_successful = false where id = %s", (call_id,))
    assert flags(core, call_id) == (None, False, None)
    assert open_alerts(core) == []
    assert count(core, "booking_guard.events") == 0


def test_two_verify_due_loops_share_the_work(graced, connect):
    """The exporter's loop and the pg_cron backstop may run at once: SKIP LOCKED gives each due
    call to one of them, and the other neither waits nor judges it twice."""
    calls = [claimed_booking(graced) for _ in range(3)]
    a, b = connect(), connect()
    b.execute("set lock_timeout = '5s'")    # waiting for a's rows instead of skipping them fails here
    a.execute("begin")
    assert verify_due(a, "6 seconds") == [(c, "rolled_back") for c in calls]
    assert verify_due(b, "6 seconds") == []
    a.execute("commit")
    assert verify_due(b, "6 seconds") == []
    assert [flags(graced, c) for c in calls] == [FAILED] * 3
    assert count(graced, "booking_guard.review_queue") == 3
    assert len(open_alerts(graced)) == 3


def test_verify_due_takes_every_judged_call_off_the_list(attached):
    """Whatever the verdict (here: the rule was switched off, and an observed unlinked call), a
    call judged by verify_due leaves the due list, so the next run does not judge it again."""
    db = attached
    db.execute("insert into companies (name) values ('due list')")
    company = db.execute("select max(id) from companies").fetchone()[0]
    booked = db.execute(
        "insert into calls (retell_call_id, company_id, direction, session_outcome, appointment_made)"
        " values ('due-off', %s, 'inbound', 'appointment_booked', true) returning id", (company,)).fetchone()[0]
    assert db.execute("select count(*) from booking_guard.due_verifications where call_id = %s",
                      (booked,)).fetchone()[0] == 1
    db.execute("select booking_guard.set_rule('missing_appointment', 'off')")
    first = db.execute("select call_id, verdict from booking_guard.verify_due(now() + interval '1 hour')").fetchall()
    assert first == [(booked, "off")]
    assert db.execute("select count(*) from booking_guard.due_verifications").fetchone()[0] == 0
    assert db.execute("select count(*) from booking_guard.verify_due(now() + interval '1 hour')").fetchone()[0] == 0
