"""What needs a person reaches the review queue once, linked to its alert, and the two close together.

The findings no rule may decide (a booking held by several appointments, an orphan that no call or
several calls match by booking id), a second booking record_booking() refused, a rollback of a
claim without an appointment and an exhausted retry each get one open review item; resolving the
item resolves its alerts, and resolving an alert that was not auto-corrected resolves its item.
Urgent items (review_notify_priority) get an outbox row and every new item a NOTIFY with its id."""

import psycopg
import pytest


@pytest.fixture
def clinic(attached: psycopg.Connection) -> psycopg.Connection:
    attached.execute("select booking_guard.set_setting('verification_grace', '0')")
    attached.execute("insert into companies (id, name) values (1, 'Acme Dental')")
    return attached


def call(db: psycopg.Connection, retell: str, **columns: object) -> int:
    names = ["retell_call_id", "company_id", "direction", *columns]
    values = [retell, 1, "inbound", *columns.values()]
    return db.execute(f"insert into calls ({', '.join(names)}) values ({', '.join(['%s'] * len(values))}) returning id",
                      values).fetchone()[0]


def appointment(db: psycopg.Connection, call_id: int | None, booking: str, source: str | None = None) -> int:
    return db.execute("insert into appointments (call_id, calcom_v2_booking_id, source) values (%s, %s, coalesce(%s, 'app'))"
                      " returning id", (call_id, booking, source)).fetchone()[0]


def items(db: psycopg.Connection, reason: str | None = None) -> list[tuple]:
    return db.execute("""select id, call_id, reason, subject, priority, status from booking_guard.review_queue
                          where %(reason)s::text is null or reason = %(reason)s order by id""",
                      {"reason": reason}).fetchall()


def alert_of(db: psycopg.Connection, rule: str, entity_id: str) -> tuple:
    return db.execute("""select id, review_id, resolved_at is not null from booking_guard.alerts
                          where alert_type = %s and entity_id = %s order by id desc limit 1""",
                      (rule, entity_id)).fetchone()


def monitor(db: psycopg.Connection) -> dict:
    return db.execute("select booking_guard.run_monitor('1 hour')").fetchone()[0]


def test_a_duplicate_booking_is_queued_once_and_closes_with_its_alert(clinic):
    db = clinic
    c = call(db, "dup-1")
    first = appointment(db, c, "cal-dup")
    second = appointment(db, c, "cal-dup")
    monitor(db)
    monitor(db)   # seen again: the same alert, the same item
    [(item, call_id, reason, subject, priority, status)] = items(db, "duplicate_booking")
    assert (call_id, subject, priority, status) == (c, "booking:cal-dup", 2, "pending")
    alert, review, resolved = alert_of(db, "duplicate_booking", "cal-dup")
    assert review == item and not resolved
    context = db.execute("select context from booking_guard.review_queue where id = %s", (item,)).fetchone()[0]
    assert context["appointment_ids"] == [first, second] and context["call_ids"] == [c]

    # the person fixes it: the extra row goes, the monitor finds the booking clean and closes both
    db.execute("delete from appointments where id = %s", (second,))
    monitor(db)
    assert alert_of(db, "duplicate_booking", "cal-dup")[2]
    assert db.execute("select status, resolution, note from booking_guard.review_queue where id = %s",
                      (item,)).fetchone()[:2] == ("resolved", "fixed")


def test_resolving_the_item_resolves_its_alert_and_a_duplicate_left_comes_back(clinic):
    db = clinic
    c = call(db, "dup-2")
    appointment(db, c, "cal-dup-2")
    appointment(db, c, "cal-dup-2")
    monitor(db)
    [(item, *_)] = items(db, "duplicate_booking")
    db.execute("select booking_guard.resolve_review(%s, 'dismissed', 'both rows are real: two slots')", (item,))
    alert, _, resolved = alert_of(db, "duplicate_booking", "cal-dup-2")
    assert resolved
    # the booking is still held twice: the next run raises it again, with a new item
    monitor(db)
    again, review, resolved = alert_of(db, "duplicate_booking", "cal-dup-2")
    assert again != alert and not resolved
    assert [i[0] for i in items(db, "duplicate_booking")] == [item, review]


def test_orphans_no_call_or_several_calls_match_are_queued_one_item_each(clinic):
    db = clinic
    lonely = appointment(db, None, "cal-nobody", "retell_webhook")
    for booking in ("cal-twins", "cal-pair"):
        call(db, f"{booking}-a", booking_id=booking)
        call(db, f"{booking}-b", booking_id=booking)
    twin_1 = appointment(db, None, "cal-twins", "retell_webhook")
    twin_2 = appointment(db, None, "cal-pair", "retell_webhook")
    monitor(db)
    monitor(db)
    assert [(i[2], i[3], i[4]) for i in items(db)] == [
        ("orphaned_appointment", f"appointment:{lonely}", 3),
        ("ambiguous_orphan", f"appointment:{twin_1}", 3),
        ("ambiguous_orphan", f"appointment:{twin_2}", 3)]
    for appointment_id, (item, *_) in zip((lonely, twin_1, twin_2), items(db), strict=True):
        assert alert_of(db, "orphaned_appointment", str(appointment_id))[1] == item
    # an orphan with exactly one match is linked, not queued
    call(db, "single", booking_id="cal-single")
    appointment(db, None, "cal-single", "retell_webhook")
    monitor(db)
    assert len(items(db)) == 3


def test_a_refused_second_booking_is_queued_once_with_its_alert(clinic):
    db = clinic
    c = call(db, "second-1")
    assert db.execute("select success from booking_guard.record_booking(%s, 'cal-first')", (c,)).fetchone() == (True,)
    for second in ("cal-second", "cal-third"):
        assert db.execute("select success from booking_guard.record_booking(%s, %s)", (c, second)).fetchone() == (False,)
    [(item, call_id, reason, subject, priority, status)] = items(db)
    assert (call_id, reason, subject, priority) == (c, "appointment_validation_failed", None, 1)
    linked = db.execute("select id, auto_corrected from booking_guard.alerts where review_id = %s", (item,)).fetchall()
    assert [corrected for _, corrected in linked] == [False]
    # an alert that was not auto-corrected closes its item when a person resolves it
    db.execute("select booking_guard.resolve_alert(%s)", (linked[0][0],))
    assert items(db)[0][5] == "resolved"


def test_a_rolled_back_claim_keeps_its_item_when_the_monitor_closes_the_auto_corrected_alert(clinic):
    db = clinic
    c = call(db, "phantom-1", session_outcome="appointment_booked", appointment_made=True)
    [(item, call_id, reason, *_)] = items(db)
    assert (call_id, reason) == (c, "appointment_validation_failed")
    alert, review, _ = alert_of(db, "missing_appointment", str(c))
    assert review == item
    # the call is consistent now (creation_failed): the monitor closes the alert, the customer still needs a call back
    db.execute("update booking_guard.alerts set last_seen_at = now() - interval '1 hour' where id = %s", (alert,))
    monitor(db)
    assert alert_of(db, "missing_appointment", str(c))[2]
    assert items(db)[0][5] == "pending"
    # resolving the item resolves what is still open of it (nothing here) and closes it
    db.execute("select booking_guard.resolve_review(%s, 'fixed', 'rebooked by phone')", (item,))
    assert items(db)[0][5] == "resolved"


def test_an_item_with_two_alerts_closes_with_the_last(clinic):
    db = clinic
    item = db.execute("select booking_guard_internal.queue_review(42, 'duplicate_booking', '{}', 'booking:x')").fetchone()[0]
    alerts = [db.execute("""select booking_guard_internal.raise_alert('duplicate_booking', 'critical', 'booking', %s, 'd')""",
                         (entity,)).fetchone()[0] for entity in ("x", "y")]
    for alert in alerts:
        db.execute("update booking_guard.alerts set review_id = %s where id = %s", (item, alert))
    db.execute("select booking_guard.resolve_alert(%s)", (alerts[0],))
    assert items(db)[0][5] == "pending"
    db.execute("select booking_guard.resolve_alert(%s)", (alerts[1],))
    assert items(db)[0][5] == "resolved"
    note = db.execute("select note from booking_guard.review_queue").fetchone()[0]
    assert note.startswith(f"resolved with its alert #{alerts[1]}")


def test_each_exhausted_retry_of_a_call_is_its_own_item(db):
    for _ in range(2):
        retry = db.execute("select booking_guard.schedule_retry(7, 'record_booking', '{}', 1, '0')").fetchone()[0]
        [(claimed,)] = db.execute("select id from booking_guard.claim_retries('w', 1)").fetchall()
        assert claimed == retry
        db.execute("select booking_guard.finish_retry(%s, false, 'calendar down')", (retry,))
    found = items(db, "retry_exhausted")
    assert [(i[1], i[4]) for i in found] == [(7, 2), (7, 2)]
    assert len({i[3] for i in found}) == 2 and all(i[3].startswith("retry:") for i in found)


def test_a_new_item_notifies_its_id_and_urgent_ones_go_to_the_outbox(db, connect):
    listener = connect()
    listener.execute("listen booking_guard_review")
    urgent = db.execute("select booking_guard.queue_for_review(1, 'calcom_booking_failed', '{}')").fetchone()[0]
    calm = db.execute("select booking_guard.queue_for_review(2, 'service_not_found', '{}')").fetchone()[0]
    again = db.execute("select booking_guard.queue_for_review(1, 'calcom_booking_failed', '{\"again\": 1}')").fetchone()[0]
    assert again == urgent
    db.execute("notify booking_guard_review, 'sentinel'")
    notes = [(n.channel, n.payload) for n in listener.notifies(timeout=10, stop_after=3)]
    assert notes == [("booking_guard_review", str(urgent)), ("booking_guard_review", str(calm)),
                     ("booking_guard_review", "sentinel")]   # the repeat sent nothing
    assert db.execute("select review_id from booking_guard.review_notifications").fetchall() == [(urgent,)]
    db.execute("select booking_guard.set_setting('review_notify_priority', '0')")
    db.execute("select booking_guard.queue_for_review(3, 'appointment_validation_failed', '{}')")
    assert db.execute("select count(*) from booking_guard.review_notifications").fetchone()[0] == 1


def test_a_subject_must_look_like_one(db):
    with pytest.raises(psycopg.Error) as bad:
        db.execute("select booking_guard_internal.queue_review(1, 'duplicate_booking', '{}', 'no colon')")
    assert bad.value.diag.sqlstate == "BG005"
    assert items(db) == []
