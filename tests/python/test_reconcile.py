"""reconcile(): a planted mix is repaired in one run and the second run fixes nothing; an
ambiguous orphan is queued for review, never linked; modes are honoured; runs are logged."""

import psycopg
import pytest
from support.planted_rows import appointment, booked_call, call, company, insert

RULES = ["missing_direction", "customer_link", "unlinked_appointment", "orphaned_appointment",
         "missing_appointment", "phantom_booking", "outcome_flag_mismatch"]


def set_rules(db, mode: str, rules=RULES) -> None:
    for rule in rules:
        db.execute("select booking_guard.set_rule(%s, %s)", (rule, mode))


def plant_mix(db) -> dict:
    """Every inconsistency reconcile repairs, written with the rules off so that nothing corrects it."""
    set_rules(db, "off")
    c = company(db)
    customer = insert(db, "customers", company_id=c, name="Di")
    planted = {
        "clean": booked_call(db, c, "cal-clean")[0],
        "no_direction": [call(db, c, direction=None), call(db, c, direction=None)],
        "customer": call(db, c, customer_id=customer, customer_link_status="pending"),
        "phantom": call(db, c, session_outcome="appointment_booked", appointment_made=False),
        "claims": call(db, c, session_outcome="appointment_booked", appointment_made=True,
                       appointment_link_status="linked"),
        "target": call(db, c, booking_id="cal-one"),
        "twin_a": call(db, c, booking_id="cal-two"),
        "twin_b": call(db, c, booking_id="cal-two"),
    }
    with db.transaction():
        planted["unlinked"] = call(db, c)
        appointment(db, planted["unlinked"])
    planted["orphan"] = appointment(db, None, "cal-one")
    planted["ambiguous"] = appointment(db, None, "cal-two")
    planted["unmatched"] = appointment(db, 55555, "cal-none")
    # the phantom and the claim are old: their verification grace is long over
    db.execute("update calls set created_at = now() - interval '10 minutes', updated_at = now() - interval '10 minutes'"
               " where id = any(%s)", ([planted["phantom"], planted["claims"]],))
    set_rules(db, "correct")
    return planted


def test_planted_mix_is_repaired_once(attached):
    p = plant_mix(attached)
    first = attached.execute("select booking_guard.reconcile(2)").fetchone()[0]
    assert {k: first[k] for k in ("directions", "customer_links", "flags", "rolled_back", "orphans",
                                  "orphans_ambiguous", "orphans_unmatched")} == {
        "directions": 2, "customer_links": 1, "flags": 1, "rolled_back": 2, "orphans": 1,
        "orphans_ambiguous": 1, "orphans_unmatched": 1}
    assert first["fixed"] == 7
    assert first["calls_scanned"] == 10 and first["appointments_scanned"] == 5

    calls = dict(((r[0]), r[1:]) for r in attached.execute(
        "select id, direction, appointment_made, session_outcome, appointment_link_status, customer_link_status "
        "from calls").fetchall())
    assert all(calls[i][0] == "inbound" for i in p["no_direction"])
    assert calls[p["customer"]][4] == "linked"
    assert calls[p["unlinked"]][1:4] == (True, "appointment_booked", "linked")
    assert calls[p["phantom"]][1:3] == (False, "creation_failed")
    assert calls[p["claims"]][1:3] == (False, "creation_failed")
    assert calls[p["target"]][1:4] == (True, "appointment_booked", "linked")   # its orphan was linked to it
    links = dict(attached.execute("select id, call_id from appointments").fetchall())
    assert links[p["orphan"]] == p["target"]
    assert links[p["ambiguous"]] is None
    assert links[p["unmatched"]] == 55555
    reviews = attached.execute("select call_id, reason, context from booking_guard.review_queue order by id").fetchall()
    assert sorted(((r[0] or 0), r[1]) for r in reviews) == sorted([
        (p["phantom"], "appointment_validation_failed"), (p["claims"], "appointment_validation_failed"),
        (0, "ambiguous_orphan")])
    ambiguous = next(r[2] for r in reviews if r[1] == "ambiguous_orphan")
    assert ambiguous[f"appointment_{p['ambiguous']}"]["candidate_call_ids"] == [p["twin_a"], p["twin_b"]]

    events = attached.execute("select count(*) from booking_guard.events where kind = 'reconcile'").fetchone()[0]
    assert events == first["fixed"]

    second = attached.execute("select booking_guard.reconcile()").fetchone()[0]
    assert second["fixed"] == 0 and second["orphans_ambiguous"] == 0 and second["orphans_unmatched"] == 1
    assert attached.execute("select count(*) from booking_guard.review_queue").fetchone()[0] == 3
    runs = attached.execute("select finished_at is not null, error, batch_size, counts->>'fixed' "
                            "from booking_guard.reconciliation_runs order by id").fetchall()
    assert runs == [(True, None, 2, "7"), (True, None, 10000, "0")]
    # what is left is what nobody may guess
    left = attached.execute("select rule, entity_id from booking_guard.detect('1 hour') order by entity_id").fetchall()
    assert sorted(left) == sorted([("orphaned_appointment", str(p["ambiguous"])),
                                   ("orphaned_appointment", str(p["unmatched"]))])


def test_batch_size_does_not_change_the_result(attached):
    plant_mix(attached)
    one = attached.execute("select booking_guard.reconcile(1)").fetchone()[0]
    assert one["fixed"] == 7 and one["calls_scanned"] == 10


def test_observe_mode_is_not_repaired(attached):
    p = plant_mix(attached)
    set_rules(attached, "observe", ["missing_direction"])
    result = attached.execute("select booking_guard.reconcile()").fetchone()[0]
    assert result["directions"] == 0
    rows = attached.execute("select direction from calls where id = any(%s)", (p["no_direction"],)).fetchall()
    assert rows == [(None,), (None,)]


def test_bad_batch_size_writes_nothing(attached):
    for bad in ("0", "null", "-5"):
        with pytest.raises(psycopg.Error) as caught:
            attached.execute(f"select booking_guard.reconcile({bad})")
        assert caught.value.diag.sqlstate == "BG005"
        assert caught.value.diag.message_hint
    assert attached.execute("select count(*) from booking_guard.reconciliation_runs").fetchone()[0] == 0


def test_not_attached(db):
    with pytest.raises(psycopg.Error) as caught:
        db.execute("select booking_guard.reconcile()")
    assert caught.value.diag.sqlstate == "BG003"


def test_failed_run_is_logged_and_changes_nothing(attached):
    c = company(attached)
    set_rules(attached, "off", ["missing_direction", "customer_link"])
    no_direction = call(attached, c, direction=None)
    customer = insert(attached, "customers", company_id=c, name="Ed")
    call(attached, c, customer_id=customer, customer_link_status="pending")
    set_rules(attached, "correct", ["missing_direction", "customer_link"])
    # the application refuses one of the repairs (its own trigger): the run fails as a whole
    attached.execute("""
        create function refuse_link() returns trigger language plpgsql as $$
        begin
            raise exception 'customer links are set by the CRM sync only' using errcode = 'P0001';
        end $$""")
    attached.execute("create trigger refuse_link before update of customer_link_status on calls "
                     "for each row execute function refuse_link()")
    result = attached.execute("select booking_guard.reconcile()").fetchone()[0]
    assert result["error"] == "P0001: customer links are set by the CRM sync only"
    run = attached.execute("select finished_at is not null, error from booking_guard.reconciliation_runs").fetchone()
    assert run == (True, "P0001: customer links are set by the CRM sync only")
    # the direction the run had fixed before it failed is as it was
    assert attached.execute("select direction from calls where id = %s", (no_direction,)).fetchone() == (None,)
    assert attached.execute("select count(*) from booking_guard.events where kind = 'reconcile'").fetchone()[0] == 0


def test_enforce_repairs_rows_already_written(attached):
    p = plant_mix(attached)
    set_rules(attached, "enforce", ["missing_direction"])
    result = attached.execute("select booking_guard.reconcile()").fetchone()[0]
    assert result["directions"] == 2
    rows = attached.execute("select direction from calls where id = any(%s)", (p["no_direction"],)).fetchall()
    assert rows == [("inbound",), ("inbound",)]
