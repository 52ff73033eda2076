-- record_booking(): the booking path as one database call, for any language, right after the
-- calendar (Cal.com) booking succeeded.
--
--   1. checks its input; bad input is an error (BG005) and writes nothing
--   2. serialises on the booking id (a lock the C module takes on a tag no SQL function can take,
--      so no role can hold it to make bookings wait) and looks the booking up: the appointments table has no unique constraint on
--      calcom_v2_booking_id, on purpose, so this lock is what makes the call idempotent
--   3. a booking already recorded for this call: returns that appointment, creates nothing
--   4. otherwise, in a subtransaction: inserts the appointment (or links the orphaned one that
--      carries the booking id), flags the call, validates (judges both rows as those statements
--      return them, with validation_verdict(), the rules validate_appointment_creation() applies); a failed
--      validation undoes all of that, and booking_failed() rolls the call back to
--      creation_failed (rollback_on_failure: critical alert appointment_validation_failed) and
--      queues it for review, in the caller's transaction; a call that still has an appointment (a
--      second booking refused) keeps it: alert and review, no rollback.
--   5. logs its event, one row: its own, with the validation's (when one ran) under 'validation'
--
-- The steps are one C function (extension/src/booking_guard.c): the booking path has to cost what
-- an application doing the same itself costs, and PL/pgSQL's own work per statement and expression
-- was most of the difference (bench/record_booking.py measures both). What decides stays in PL/Python and PL/pgSQL:
-- the validation's rules (validation_verdict()), what a refusal does (booking_failed()).
--
-- It runs with the caller's rights: it writes what the application could write itself (an
-- appointment, its call's flags), so the caller needs SELECT, INSERT and UPDATE on the two tables,
-- and the table owner's code on them runs with the application's rights. Only its event, in
-- booking_guard's own table, is written as booking_guard_owner: a fixed statement kept by the C
-- module, which the application's roles cannot run otherwise. The insert's plan is kept
-- by the C module per table and set of keys: no session-level name the caller could prepare first.
--
-- Idempotency needs each call to see the appointments committed before it took the lock: READ
-- COMMITTED (the default) does, and SERIALIZABLE detects the conflict; REPEATABLE READ would read
-- an older snapshot and is refused.

create type booking_guard.booking_result as (
    success         boolean,
    reason          text,
    details         jsonb,
    appointment_id  bigint,
    created         boolean
);

comment on type booking_guard.booking_result is
    'Outcome of record_booking(): the validation_result fields, the appointment id (null when the booking failed) and created (false when the booking had been recorded before).';

-- A booking that failed validation: a critical alert, and a review item with everything needed to
-- redo it by hand (its validation event is logged with record_booking's, outside the undone
-- subtransaction). A call that does not exist, or that keeps an earlier appointment (a second
-- booking refused), is not rolled back: the alert says so.
create function booking_guard_internal.booking_refused(call_id bigint, booking_id text, reason text, validation jsonb,
                                                       appointment jsonb, rolled_back jsonb)
returns jsonb
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_column
declare
    alert_id   bigint;
    v_review   bigint;
begin
    if booking_refused.rolled_back is not null then
        alert_id := (booking_refused.rolled_back ->> 'alert_id')::bigint;
    elsif booking_refused.reason = 'call_not_found' then
        alert_id := booking_guard_internal.raise_alert('appointment_validation_failed', 'critical', 'call',
            booking_refused.call_id::text,
            format('Booking %s was made for call %s, which does not exist: not recorded',
                   booking_refused.booking_id, booking_refused.call_id),
            jsonb_build_object('reason', booking_refused.reason, 'calcom_booking_id', booking_refused.booking_id));
    else
        -- Rolling it back to creation_failed would be false, and the truth check would only undo it.
        alert_id := booking_guard_internal.raise_alert('appointment_validation_failed', 'critical', 'call',
            booking_refused.call_id::text,
            format('Booking %s for call %s was refused (%s); the call keeps its existing appointment. '
                   'Cancel the extra booking in the calendar.',
                   booking_refused.booking_id, booking_refused.call_id, booking_refused.reason),
            jsonb_build_object('reason', booking_refused.reason, 'calcom_booking_id', booking_refused.booking_id));
    end if;
    v_review := booking_guard.queue_for_review(booking_refused.call_id, 'appointment_validation_failed',
        jsonb_build_object('reason', booking_refused.reason, 'calcom_booking_id', booking_refused.booking_id,
                           'appointment', booking_refused.appointment, 'validation', booking_refused.validation,
                           'rollback', booking_refused.rolled_back, 'alert_id', alert_id));
    -- the item answers the alert: resolving one resolves the other
    update booking_guard.alerts a set review_id = v_review
     where a.id = alert_id and a.review_id is null and a.alert_type <> 'alert_storm';
    return jsonb_build_object('alert_id', alert_id, 'review_id', v_review);
end
$$;

comment on function booking_guard_internal.booking_refused(bigint, text, text, jsonb, jsonb, jsonb) is
    'record_booking(): a booking that failed validation: a critical alert (unless the rollback raised one) and a review item answering it (counted against review_queue_max_open); returns their ids.';

-- What a refused booking does, after record_booking() undid its writes: a call left without any appointment
-- is rolled back to creation_failed (not an unknown call, nor one that keeps an earlier
-- appointment: a second booking refused), then the alert and the review item. With the caller's
-- rights, like record_booking(). Returns the result's details.
create function booking_guard_internal.booking_failed(call_id bigint, booking_id text, reason text, details jsonb,
                                                      appointment jsonb, undone_appointment_id bigint)
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    rolled_back  jsonb;
begin
    if booking_failed.reason <> 'call_not_found'
       and not exists (select from booking_guard_internal.guarded_appointments a where a.call_id = booking_failed.call_id) then
        rolled_back := booking_guard.rollback_on_failure(booking_failed.call_id, booking_failed.reason);
    end if;
    return booking_failed.details
        || booking_guard_internal.booking_refused(booking_failed.call_id, booking_failed.booking_id, booking_failed.reason,
                                                  booking_failed.details, booking_failed.appointment, rolled_back)
        || jsonb_build_object('undone_appointment_id', booking_failed.undone_appointment_id);
end
$$;

comment on function booking_guard_internal.booking_failed(bigint, text, text, jsonb, jsonb, bigint) is
    'record_booking(): a booking that failed validation, after its writes were undone: rolls a call left without appointment back to creation_failed, then alerts and queues it for review (booking_refused()); returns the result''s details (the verdict''s, the alert and review ids, the undone appointment).';

create function booking_guard.record_booking(call_id bigint, calcom_booking_id text, appointment jsonb default '{}')
returns booking_guard.booking_result
language c
as 'MODULE_PATHNAME', 'record_booking';

comment on function booking_guard.record_booking(bigint, text, jsonb) is
    'Records a Cal.com booking for a call in one call: inserts the appointment (jsonb keys onto the attached table''s columns), links and flags the call, validates; idempotent on the booking id. A failed validation undoes the insert, rolls the call back to creation_failed, alerts and queues it for review, and returns success = false. Bad input is BG005 and writes nothing. Runs with the caller''s rights.';
