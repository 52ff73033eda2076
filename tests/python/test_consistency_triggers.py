"""The four consistency triggers, each in every rule mode, and the five places where what one trigger
does could undo what another did (a correction against the truth at COMMIT, a deletion, two appointments,
when the check runs, a retry that books twice).

Every test runs with verification_grace = 0, so the commit-time truth check judges at COMMIT;
where a test looks at one trigger alone it switches the truth check's rule off, and says so.
"""

from datetime import datetime

import psycopg
import pytest
from support.application_rows import (
    BOOKED,
    CANCELLED,
    FAILED,
    alerts,
    call_row,
    flags,
    link_of,
    new_appointment,
    new_call,
    review_items,
    set_rule,
)

MODES = ["off", "observe", "correct", "enforce"]


# -- helpers ---------------------------------------------------------------------------------

def booked_call(db: psycopg.Connection, appointments: int = 1) -> tuple[int, list[int]]:
    """A call booked the ordinary way: the call, then its appointment(s), in one transaction."""
    with db.transaction():
        call_id = new_call(db)
        ids = [new_appointment(db, call_id) for _ in range(appointments)]
    return call_id, ids


def open_alert_types(db: psycopg.Connection, call_id: int) -> list[str]:
    return [a["alert_type"] for a in alerts(db, call_id=call_id) if a["resolved_at"] is None]


def call_count(db: psycopg.Connection) -> int:
    return db.execute("select count(*) from calls").fetchone()[0]


def assert_rejected(caught: pytest.ExceptionInfo, rule: str, call_id: int | None = None) -> None:
    diag = caught.value.diag
    assert diag.sqlstate == "BG002", diag.message_primary
    assert f"rule {rule}" in diag.message_primary
    if call_id is not None:
        assert diag.message_primary.endswith(f"call {call_id}")
    assert f"set_rule('{rule}'" in diag.message_hint


# -- trigger 1: direction (rule missing_direction) -------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_direction_null_on_insert_by_mode(core, mode):
    set_rule(core, "missing_direction", mode)
    if mode == "enforce":
        with pytest.raises(psycopg.Error) as caught:
            new_call(core, direction=None)
        assert_rejected(caught, "missing_direction")
        assert caught.value.diag.message_detail == "direction is null"
        assert call_count(core) == 0
        assert alerts(core) == []
        return
    call_id = new_call(core, direction=None)
    direction = call_row(core, call_id)["direction"]
    found = alerts(core, "missing_direction", call_id)
    if mode == "off":
        assert direction is None
        assert found == []
    elif mode == "observe":
        assert direction is None
        assert [(a["severity"], a["auto_corrected"]) for a in found] == [("warning", False)]
    else:
        assert direction == "inbound"
        assert [(a["severity"], a["auto_corrected"]) for a in found] == [("warning", True)]
        assert found[0]["details"] == {"before": {"direction": None}, "after": {"direction": "inbound"}}


def test_direction_null_on_update_is_corrected(core):
    call_id = new_call(core, direction="outbound")
    assert alerts(core) == []
    core.execute("update calls set direction = null where id = %s", (call_id,))
    assert call_row(core, call_id)["direction"] == "inbound"
    assert [a["auto_corrected"] for a in alerts(core, "missing_direction", call_id)] == [True]


def test_direction_follows_the_default_direction_setting(core):
    core.execute("select booking_guard.set_setting('default_direction', 'outbound')")
    call_id = new_call(core, direction=None)
    assert call_row(core, call_id)["direction"] == "outbound"


def test_given_direction_is_left_alone(core):
    call_id = new_call(core, direction="outbound")
    assert call_row(core, call_id)["direction"] == "outbound"
    assert alerts(core) == []


# -- trigger 2: customer link (rule customer_link) ---------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_customer_link_on_insert_by_mode(core, mode):
    set_rule(core, "customer_link", mode)
    with core.transaction():
        call_id = new_call(core, customer_id=1)
        now = core.execute("select now()").fetchone()[0]
    row = call_row(core, call_id)
    found = alerts(core, "customer_link", call_id)
    if mode in ("correct", "enforce"):
        # the plain case (no status given) is a derivation, not a correction: silent in both modes
        assert link_of(core, call_id) == ("linked", "phone_match", 100)
        assert row["customer_linked_at"] == now
        assert found == []
    elif mode == "observe":
        assert link_of(core, call_id) == (None, None, None)
        assert row["customer_linked_at"] is None
        assert [(a["severity"], a["auto_corrected"]) for a in found] == [("info", False)]
    else:
        assert link_of(core, call_id) == (None, None, None)
        assert found == []


def test_customer_link_keeps_given_method_and_confidence(core):
    call_id = new_call(core, customer_id=1, customer_link_method="name_match", customer_link_confidence=72.5)
    assert link_of(core, call_id) == ("linked", "name_match", 72.5)


def test_customer_link_without_customer_does_nothing(core):
    call_id = new_call(core)
    assert link_of(core, call_id) == (None, None, None)
    assert call_row(core, call_id)["customer_linked_at"] is None


def test_customer_link_on_update(core):
    call_id = new_call(core)
    core.execute("update calls set customer_id = 1 where id = %s", (call_id,))
    assert link_of(core, call_id) == ("linked", "phone_match", 100)
    # a change of customer links again, with a fresh linked_at
    core.execute("update calls set customer_linked_at = '2020-01-01 00:00+00' where id = %s", (call_id,))
    assert call_row(core, call_id)["customer_linked_at"] == datetime.fromisoformat("2020-01-01T00:00:00+00:00")
    with core.transaction():
        core.execute("update calls set customer_id = 2 where id = %s", (call_id,))
        now = core.execute("select now()").fetchone()[0]
    row = call_row(core, call_id)
    assert (row["customer_id"], row["customer_link_status"], row["customer_linked_at"]) == (2, "linked", now)
    assert alerts(core, "customer_link") == []


def test_customer_link_untouched_when_customer_does_not_change(core):
    call_id = new_call(core, customer_id=1)
    core.execute("update calls set customer_linked_at = '2020-01-01 00:00+00', call_successful = true where id = %s", (call_id,))
    assert call_row(core, call_id)["customer_linked_at"] == datetime.fromisoformat("2020-01-01T00:00:00+00:00")


@pytest.mark.parametrize("mode", MODES)
def test_customer_link_with_a_contradicting_status_by_mode(core, mode):
    set_rule(core, "customer_link", mode)
    if mode == "enforce":
        with pytest.raises(psycopg.Error) as caught:
            new_call(core, customer_id=1, customer_link_status="unlinked")
        assert_rejected(caught, "customer_link")
        assert "customer_link_status is unlinked" in caught.value.diag.message_detail
        assert call_count(core) == 0
        return
    call_id = new_call(core, customer_id=1, customer_link_status="unlinked")
    found = alerts(core, "customer_link", call_id)
    if mode == "correct":
        assert link_of(core, call_id) == ("linked", "phone_match", 100)
        assert [(a["severity"], a["auto_corrected"]) for a in found] == [("info", True)]
        assert found[0]["details"] == {"before": {"customer_link_status": "unlinked"},
                                       "after": {"customer_link_status": "linked"}}
    elif mode == "observe":
        assert link_of(core, call_id)[0] == "unlinked"
        assert [(a["severity"], a["auto_corrected"]) for a in found] == [("info", False)]
    else:
        assert link_of(core, call_id)[0] == "unlinked"
        assert found == []


@pytest.mark.parametrize("mode", MODES)
def test_customer_link_replaces_a_status_carried_over_from_the_old_row(core, mode):
    """The application starts calls as 'unlinked' (no customer yet); matching the customer later
    links it without complaint: the old status is no contradiction written with the customer."""
    call_id = new_call(core, customer_link_status="unlinked")
    set_rule(core, "customer_link", mode)
    core.execute("update calls set customer_id = 1 where id = %s", (call_id,))
    found = alerts(core, "customer_link", call_id)
    if mode in ("correct", "enforce"):
        assert link_of(core, call_id) == ("linked", "phone_match", 100)
        assert found == []
    elif mode == "observe":
        assert link_of(core, call_id) == ("unlinked", None, None)
        assert [a["auto_corrected"] for a in found] == [False]
    else:
        assert link_of(core, call_id) == ("unlinked", None, None)
        assert found == []


@pytest.mark.parametrize("mode", ["correct", "enforce"])
def test_customer_link_status_written_with_a_new_customer_is_judged(core, mode):
    call_id = new_call(core, customer_link_status="unlinked")
    set_rule(core, "customer_link", mode)
    query = "update calls set customer_id = 1, customer_link_status = 'pending' where id = %s"
    if mode == "enforce":
        with pytest.raises(psycopg.Error) as caught:
            core.execute(query, (call_id,))
        assert_rejected(caught, "customer_link", call_id)
        assert link_of(core, call_id)[0] == "unlinked"
        return
    core.execute(query, (call_id,))
    assert link_of(core, call_id)[0] == "linked"
    assert [a["details"]["before"] for a in alerts(core, "customer_link", call_id)] == [{"customer_link_status": "pending"}]


# -- trigger 3a: outcome says booked, flag says not (rule phantom_booking) ---------------------
# The truth check (missing_appointment) is switched off here, to see trigger 3 alone; the
# combination is contradiction 1 below.

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op", ["insert", "update"])
def test_phantom_booking_by_mode(core, mode, op):
    set_rule(core, "missing_appointment", "off")
    set_rule(core, "phantom_booking", mode)
    call_id = new_call(core) if op == "update" else None

    def write():
        if op == "insert":
            return new_call(core, session_outcome="appointment_booked", appointment_made=False)
        core.execute("update calls set session_outcome = 'appointment_booked' where id = %s", (call_id,))
        return call_id

    if mode == "enforce":
        with pytest.raises(psycopg.Error) as caught:
            write()
        assert_rejected(caught, "phantom_booking")
        assert caught.value.diag.message_detail == "session_outcome is appointment_booked but appointment_made is false"
        assert call_count(core) == (1 if op == "update" else 0)
        if op == "update":
            assert flags(core, call_id) == (None, False, None)
        assert alerts(core) == []
        return
    call_id = write()
    found = alerts(core, "phantom_booking", call_id)
    made = call_row(core, call_id)["appointment_made"]
    if mode == "correct":
        assert made is True
        assert [(a["severity"], a["auto_corrected"]) for a in found] == [("critical", True)]
        assert found[0]["details"] == {
            "before": {"session_outcome": "appointment_booked", "appointment_made": False},
            "after": {"session_outcome": "appointment_booked", "appointment_made": True}}
    elif mode == "observe":
        assert made is False
        assert [(a["severity"], a["auto_corrected"]) for a in found] == [("critical", False)]
        assert found[0]["details"] == {"state": {"session_outcome": "appointment_booked", "appointment_made": False}}
    else:
        assert made is False
        assert found == []


# -- trigger 3b: flag says booked, outcome says otherwise (rule outcome_flag_mismatch) --------

@pytest.mark.parametrize("mode", MODES)
def test_outcome_flag_mismatch_by_mode(core, mode):
    set_rule(core, "missing_appointment", "off")
    set_rule(core, "outcome_flag_mismatch", mode)
    if mode == "enforce":
        with pytest.raises(psycopg.Error) as caught:
            new_call(core, session_outcome="no_answer", appointment_made=True)
        assert_rejected(caught, "outcome_flag_mismatch")
        assert caught.value.diag.message_detail == "appointment_made is true but session_outcome is no_answer"
        assert call_count(core) == 0
        return
    call_id = new_call(core, session_outcome="no_answer", appointment_made=True)
    found = alerts(core, "outcome_flag_mismatch", call_id)
    outcome = call_row(core, call_id)["session_outcome"]
    if mode == "correct":
        assert outcome == "appointment_booked"
        assert [(a["severity"], a["auto_corrected"]) for a in found] == [("critical", True)]
        assert found[0]["details"] == {
            "before": {"session_outcome": "no_answer", "appointment_made": True},
            "after": {"session_outcome": "appointment_booked", "appointment_made": True}}
    elif mode == "observe":
        assert outcome == "no_answer"
        assert [(a["severity"], a["auto_corrected"]) for a in found] == [("critical", False)]
    else:
        assert outcome == "no_answer"
        assert found == []


def test_outcome_flag_mismatch_ignores_a_null_outcome(core):
    set_rule(core, "missing_appointment", "off")
    call_id = new_call(core, appointment_made=True)
    assert call_row(core, call_id)["session_outcome"] is None
    assert alerts(core) == []


# -- trigger 4: appointment link sync (rule unlinked_appointment) ----------------------------

@pytest.mark.parametrize("mode", ["correct", "enforce"])
def test_appointment_insert_derives_the_flags(core, mode):
    set_rule(core, "unlinked_appointment", mode)
    call_id = new_call(core)
    assert flags(core, call_id) == (None, False, None)
    with core.transaction():
        new_appointment(core, call_id)
        now = core.execute("select now()").fetchone()[0]
    assert flags(core, call_id) == BOOKED
    assert call_row(core, call_id)["appointment_linked_at"] == now
    # deriving a flag from the truth is not a correction: no alert, nothing to review
    assert alerts(core) == []
    assert review_items(core, call_id) == []


@pytest.mark.parametrize("mode", ["observe", "off"])
def test_appointment_insert_without_sync_by_mode(core, mode):
    set_rule(core, "unlinked_appointment", mode)
    call_id = new_call(core)
    new_appointment(core, call_id)
    assert flags(core, call_id) == (None, False, None)
    found = alerts(core, "unlinked_appointment", call_id)
    if mode == "observe":
        assert [(a["severity"], a["auto_corrected"]) for a in found] == [("critical", False)]
    else:
        assert found == []


def test_appointment_without_call_id_touches_no_call(core):
    call_id = new_call(core)
    new_appointment(core, None)
    assert flags(core, call_id) == (None, False, None)
    assert alerts(core) == []


@pytest.mark.parametrize("mode", ["correct", "enforce"])
def test_deleting_the_only_appointment_cancels_the_booking(core, mode):
    set_rule(core, "unlinked_appointment", mode)
    call_id, (appointment_id,) = booked_call(core)
    assert flags(core, call_id) == BOOKED
    core.execute("delete from appointments where id = %s", (appointment_id,))
    assert flags(core, call_id) == CANCELLED
    assert call_row(core, call_id)["appointment_made"] is False
    assert alerts(core) == []
    assert review_items(core, call_id) == []


@pytest.mark.parametrize("mode", ["observe", "off"])
def test_deleting_an_appointment_without_sync_by_mode(core, mode):
    """With trigger 4's rule and the truth check's rule both observing (or off), nothing is
    changed; observe says what is wrong (the call still claims the deleted booking)."""
    call_id, (appointment_id,) = booked_call(core)
    set_rule(core, "unlinked_appointment", mode)
    set_rule(core, "missing_appointment", mode)
    core.execute("delete from appointments where id = %s", (appointment_id,))
    assert flags(core, call_id) == BOOKED
    found = [(a["alert_type"], a["auto_corrected"]) for a in alerts(core, call_id=call_id)]
    assert found == ([("missing_appointment", False)] if mode == "observe" else [])
    assert review_items(core, call_id) == []


def test_moving_an_appointment_moves_the_flags(core):
    first, (appointment_id,) = booked_call(core)
    second = new_call(core)
    core.execute("update appointments set call_id = %s where id = %s", (second, appointment_id))
    assert flags(core, first) == CANCELLED
    assert flags(core, second) == BOOKED
    assert alerts(core) == []


def test_moving_one_of_two_appointments_keeps_the_first_call_booked(core):
    first, (kept, moved) = booked_call(core, appointments=2)
    second = new_call(core)
    core.execute("update appointments set call_id = %s where id = %s", (second, moved))
    assert flags(core, first) == BOOKED
    assert flags(core, second) == BOOKED
    core.execute("update appointments set call_id = %s where id = %s", (second, kept))
    assert flags(core, first) == CANCELLED
    assert flags(core, second) == BOOKED
    assert alerts(core) == []


def test_moving_all_appointments_in_one_statement(core):
    first, _ = booked_call(core, appointments=2)
    second = new_call(core)
    core.execute("update appointments set call_id = %s where call_id = %s", (second, first))
    assert flags(core, first) == CANCELLED
    assert flags(core, second) == BOOKED
    assert alerts(core) == []


def test_an_appointment_for_a_call_that_does_not_exist_is_left_to_detection(core):
    """No call row to flag (the orphaned_appointment rule's case): the COMMIT goes through."""
    appointment_id = new_appointment(core, 999)
    assert core.execute("select call_id from appointments where id = %s", (appointment_id,)).fetchone()[0] == 999
    core.execute("delete from appointments where id = %s", (appointment_id,))
    assert core.execute("select count(*) from appointments").fetchone()[0] == 0
    assert alerts(core) == []


def test_unlinking_an_appointment_cancels_the_booking(core):
    call_id, (appointment_id,) = booked_call(core)
    core.execute("update appointments set call_id = null where id = %s", (appointment_id,))
    assert flags(core, call_id) == CANCELLED


def test_updating_other_appointment_columns_leaves_the_call_alone(core):
    call_id, (appointment_id,) = booked_call(core)
    core.execute("update calls set appointment_linked_at = '2020-01-01 00:00+00' where id = %s", (call_id,))
    core.execute("update appointments set status = 'confirmed' where id = %s", (appointment_id,))
    row = call_row(core, call_id)
    assert flags(core, call_id) == BOOKED
    assert row["appointment_linked_at"] == datetime.fromisoformat("2020-01-01T00:00:00+00:00")


def test_deleting_a_booked_calls_other_outcome_is_kept(core):
    """A call whose outcome is not appointment_booked keeps its outcome when its appointment goes."""
    set_rule(core, "outcome_flag_mismatch", "off")
    call_id, (appointment_id,) = booked_call(core)
    core.execute("update calls set session_outcome = 'callback_requested' where id = %s", (call_id,))
    core.execute("delete from appointments where id = %s", (appointment_id,))
    assert flags(core, call_id) == ("callback_requested", False, "unlinked")


# -- where one correction meets another --------------------------------------------------------

def test_a_corrected_phantom_is_rolled_back_at_commit(core):
    """Trigger 3 sets appointment_made for a phantom; the commit-time truth check then rolls the
    call back to creation_failed, because no appointment stands behind the flag."""
    with core.transaction():
        call_id = new_call(core, session_outcome="appointment_booked", appointment_made=False)
        # inside the transaction, trigger 3 has set the flag (its auto-correction) ...
        assert call_row(core, call_id)["appointment_made"] is True
    # ... and at COMMIT the truth wins
    assert flags(core, call_id) == FAILED
    assert open_alert_types(core, call_id) == ["missing_appointment"]
    phantom = alerts(core, "phantom_booking", call_id)
    assert len(phantom) == 1 and phantom[0]["resolved_at"] is not None
    missing = alerts(core, "missing_appointment", call_id)[0]
    assert phantom[0]["details"]["superseded_by"] == missing["id"]
    assert missing["auto_corrected"] is True
    assert missing["details"]["before"]["appointment_made"] is True
    assert missing["details"]["after"] == {"session_outcome": "creation_failed", "appointment_made": False,
                                           "appointment_link_status": "creation_failed"}
    assert review_items(core, call_id) == [("appointment_validation_failed", 1, "pending")]


def test_a_phantom_with_its_appointment_stays_booked(core):
    with core.transaction():
        call_id = new_call(core, session_outcome="appointment_booked", appointment_made=False)
        new_appointment(core, call_id)
    assert flags(core, call_id) == BOOKED
    # the application wrote a contradictory row: that is still said, but nothing is rolled back
    assert open_alert_types(core, call_id) == ["phantom_booking"]
    assert review_items(core, call_id) == []


def test_deletion_is_not_undone_by_trigger_3(core):
    call_id, (appointment_id,) = booked_call(core)
    core.execute("delete from appointments where id = %s", (appointment_id,))
    assert flags(core, call_id) == CANCELLED
    # a later write to the call runs trigger 3 again: it must not flip the flag back
    core.execute("update calls set call_successful = true where id = %s", (call_id,))
    assert flags(core, call_id) == CANCELLED
    assert alerts(core) == []


def test_delete_and_write_in_one_transaction(core):
    """The application deletes the appointment and, in the same transaction, writes the call's old
    flags back (a stale ORM save): the truth check at COMMIT sees no appointment and rolls back."""
    call_id, (appointment_id,) = booked_call(core)
    with core.transaction():
        core.execute("delete from appointments where id = %s", (appointment_id,))
        core.execute("""update calls set session_outcome = 'appointment_booked', appointment_made = true,
                               appointment_link_status = 'linked' where id = %s""", (call_id,))
    assert flags(core, call_id) == FAILED
    assert open_alert_types(core, call_id) == ["missing_appointment"]


def test_a_call_with_two_appointments_stays_booked_when_one_is_deleted(core):
    call_id, (first, second) = booked_call(core, appointments=2)
    assert flags(core, call_id) == BOOKED
    core.execute("delete from appointments where id = %s", (first,))
    assert flags(core, call_id) == BOOKED
    assert call_row(core, call_id)["appointment_made"] is True
    core.execute("delete from appointments where id = %s", (second,))
    assert flags(core, call_id) == CANCELLED
    assert alerts(core) == []


def test_deleting_both_in_one_statement(core):
    call_id, _ = booked_call(core, appointments=2)
    core.execute("delete from appointments where call_id = %s", (call_id,))
    assert flags(core, call_id) == CANCELLED
    assert alerts(core) == []


def test_the_check_waits_for_commit(core):
    """No sleep before judging: the verdict is at COMMIT: a booking written call-first is not
    judged at the call's statement, and a claim that is still alone at COMMIT is rolled back."""
    with core.transaction():
        call_id = new_call(core, session_outcome="appointment_booked", appointment_made=True,
                           appointment_link_status="linked")
        assert flags(core, call_id) == BOOKED   # not judged yet
        new_appointment(core, call_id)
    assert flags(core, call_id) == BOOKED
    assert alerts(core) == []

    lonely = new_call(core, session_outcome="appointment_booked", appointment_made=True,
                      appointment_link_status="linked")
    assert flags(core, lonely) == FAILED


def test_a_retry_that_books_twice_keeps_one_consistent_call(core):
    """Retrying after a partial failure: the first attempt's appointment insert failed (its
    savepoint was rolled back), so the call was rolled back at COMMIT; the retry writes the
    appointment, and a second retry writes it again with the same booking id. The call follows
    the truth each time; removing the duplicate keeps the booking."""
    with core.transaction():
        call_id = new_call(core, session_outcome="appointment_booked", appointment_made=True)
        with pytest.raises(psycopg.errors.CheckViolation), core.transaction():
            new_appointment(core, call_id, calcom_v2_booking_id="cal-retry",
                            starts_at="2026-01-01 10:00", ends_at="2026-01-01 09:00")
    assert flags(core, call_id) == FAILED
    first = new_appointment(core, call_id, calcom_v2_booking_id="cal-retry")
    assert flags(core, call_id) == BOOKED
    duplicate = new_appointment(core, call_id, calcom_v2_booking_id="cal-retry")
    assert flags(core, call_id) == BOOKED
    core.execute("delete from appointments where id = %s", (duplicate,))
    assert flags(core, call_id) == BOOKED
    assert core.execute("select array_agg(id) from appointments where call_id = %s", (call_id,)).fetchone()[0] == [first]
    # the failure of the first attempt is on record for a person, once
    assert review_items(core, call_id) == [("appointment_validation_failed", 1, "pending")]
    assert open_alert_types(core, call_id) == ["missing_appointment"]


# -- attach / detach ----------------------------------------------------------------------------

def test_detach_removes_the_triggers(core):
    core.execute("select booking_guard.detach()")
    call_id = new_call(core, direction=None, session_outcome="appointment_booked", appointment_made=False)
    new_appointment(core, call_id)
    assert call_row(core, call_id)["direction"] is None
    assert flags(core, call_id) == ("appointment_booked", False, None)
    assert alerts(core) == []
    # and attaching again, in the same session (cached plans of the old views), guards again
    core.execute("select booking_guard.attach('public.calls', 'public.appointments')")
    call_id = new_call(core, direction=None)
    new_appointment(core, call_id)
    assert call_row(core, call_id)["direction"] == "inbound"
    assert flags(core, call_id) == BOOKED


# -- trigger 4 on INSERT, in the orders an application writes a booking ----------------------

def test_the_usual_booking_flow_ends_fully_linked(core):
    """The usual application: insert the call, insert the appointment, then trackBooking sets
    appointment_made and session_outcome (never the link). Trigger 4 sets the link."""
    with core.transaction():
        call_id = new_call(core, customer_id=1)
        new_appointment(core, call_id, customer_id=1)
        core.execute("""update calls set appointment_made = true, session_outcome = 'appointment_booked',
                               booking_id = 'cal-x', booking_confirmed = true, call_successful = true
                         where id = %s""", (call_id,))
        now = core.execute("select now()").fetchone()[0]
    assert flags(core, call_id) == BOOKED
    assert call_row(core, call_id)["appointment_linked_at"] == now
    assert alerts(core) == []


def test_the_usual_booking_flow_writes_the_call_once(core):
    """The link is derived in the application's own UPDATE (its BEFORE trigger sees the
    appointment), so the truth check at COMMIT finds nothing to write: the booking path costs
    no second UPDATE of the call (the row version of the UPDATE is the one that stays)."""
    with core.transaction():
        call_id = new_call(core)
        new_appointment(core, call_id)
        core.execute("update calls set appointment_made = true, session_outcome = 'appointment_booked' where id = %s",
                     (call_id,))
        assert flags(core, call_id) == BOOKED
        version = core.execute("select ctid from calls where id = %s", (call_id,)).fetchone()[0]
    assert core.execute("select ctid from calls where id = %s", (call_id,)).fetchone()[0] == version
    assert flags(core, call_id) == BOOKED


def test_a_call_flagged_before_its_appointment_ends_fully_linked(core):
    with core.transaction():
        call_id = new_call(core, session_outcome="appointment_booked", appointment_made=True)
        new_appointment(core, call_id)
    assert flags(core, call_id) == BOOKED
    assert call_row(core, call_id)["appointment_linked_at"] is not None
    assert alerts(core) == []


@pytest.mark.parametrize("mode", ["correct", "enforce"])
def test_an_appointment_written_before_its_call_links_it(core, mode):
    """The calendar's webhook row first, then the call, in one transaction: the same end as the
    other order, silently (the call's default flags are no claim against the appointment)."""
    set_rule(core, "unlinked_appointment", mode)
    with core.transaction():
        new_appointment(core, 1000)
        new_call(core, id=1000)
    assert flags(core, 1000) == BOOKED
    assert alerts(core) == []


def test_record_booking_retried_books_once(core):
    """The booking path's own answer to the retry (record_booking is idempotent on the booking id),
    seen from the consistency core: one appointment, a booked call, nothing to alert or review."""
    call_id = new_call(core)
    results = [core.execute("select created, success from booking_guard.record_booking(%s, 'cal-once', %s)",
                            (call_id, '{"company_id": 1}')).fetchone() for _ in range(2)]
    assert results == [(True, True), (False, True)]
    assert appointments_count(core, call_id) == 1
    assert flags(core, call_id) == BOOKED
    assert alerts(core) == []
    assert review_items(core, call_id) == []


def appointments_count(db: psycopg.Connection, call_id: int) -> int:
    return db.execute("select count(*) from appointments where call_id = %s", (call_id,)).fetchone()[0]
