-- record_booking(): the booking path as one database call, for any language, right after the
-- calendar (Cal.com) booking succeeded.
--
--   1. checks its input; bad input is an error (BG005) and writes nothing
--   2. serialises on the booking id (lock_booking(): a row lock in booking_guard's own table) and
--      looks the booking up: the appointments table has no unique constraint on
--      calcom_v2_booking_id, on purpose, so this lock is what makes the call idempotent
--   3. a booking already recorded for this call: returns that appointment, creates nothing
--   4. otherwise, in a subtransaction: inserts the appointment (or links the orphaned one that
--      carries the booking id), flags the call, validates; a failed validation undoes all of that,
--      rolls the call back to creation_failed (rollback_on_failure: critical alert
--      appointment_validation_failed) and queues it for review, in the caller's transaction; a call
--      that still has an appointment (a second booking refused) keeps it: alert and review, no
--      rollback.
--
-- It runs with the caller's rights: it writes what the application could write itself (an
-- appointment, its call's flags), so the caller needs SELECT, INSERT and UPDATE on the two tables,
-- and the table owner's code on them runs with the application's rights. The insert's plan is kept
-- by the C module per table and set of keys (insert_appointment()).
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

-- Concurrent callers with the same booking id queue on the row this inserts: a second insert of a
-- key waits for the transaction holding it. The row is deleted again at once, so the table stays
-- empty; the wait lasts until the holder's transaction ends.
create function booking_guard_internal.lock_booking(booking_id text)
returns void
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    insert into booking_guard_internal.booking_locks as l (booking_id) values (lock_booking.booking_id)
        on conflict on constraint booking_locks_pkey do nothing;
    delete from booking_guard_internal.booking_locks l where l.booking_id = lock_booking.booking_id;
end
$$;

comment on function booking_guard_internal.lock_booking(text) is
    'Serialises record_booking() calls of one booking id until the end of the caller''s transaction (a row lock in booking_guard_internal.booking_locks, not an advisory key another role could hold).';

create function booking_guard_internal.insert_appointment(tbl regclass, appointment jsonb)
returns bigint
language c
strict
as 'MODULE_PATHNAME', 'insert_appointment';

comment on function booking_guard_internal.insert_appointment(regclass, jsonb) is
    'record_booking(): inserts the object''s keys into the columns of the same names of the table and returns the id; the plan is kept per table and set of keys (C). Unknown keys are BG005.';

-- What record_booking() records on booking_guard's side, with booking_guard_owner's rights: the
-- application role can write its bookings, not booking_guard's tables.
create function booking_guard_internal.log_booking(call_id bigint, success boolean, reason text, appointment_id bigint,
                                                   created boolean, duration_ms numeric)
returns void
language sql
security definer
set search_path = pg_catalog, pg_temp
as $$
    insert into booking_guard.events (kind, entity_type, entity_id, details)
    values ('record_booking', 'call', log_booking.call_id::text,
            jsonb_build_object('success', log_booking.success, 'reason', left(log_booking.reason, 63),
                               'appointment_id', log_booking.appointment_id, 'created', log_booking.created,
                               'duration_ms', log_booking.duration_ms))
$$;

comment on function booking_guard_internal.log_booking(bigint, boolean, text, bigint, boolean, numeric) is
    'record_booking(): appends its event (success, reason, appointment, duration), which the booking metrics count.';

-- A booking that failed validation: its validation event (the one in the undone subtransaction is
-- gone), a critical alert, and a review item with everything needed to redo it by hand. A call
-- that does not exist, or that keeps an earlier appointment (a second booking refused), is not
-- rolled back: the alert says so.
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
    perform booking_guard_internal.log_event('validation', null, 'call', booking_refused.call_id::text,
        jsonb_build_object('success', false, 'reason', left(booking_refused.reason, 63),
                           'duration_ms', booking_refused.validation -> 'duration_ms',
                           'appointment_id', booking_refused.validation -> 'appointment_id'));
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
    'record_booking(): a booking that failed validation: its validation event, a critical alert (unless the rollback raised one) and a review item answering it (counted against review_queue_max_open); returns their ids.';

create function booking_guard.record_booking(call_id bigint, calcom_booking_id text, appointment jsonb default '{}')
returns booking_guard.booking_result
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_column
declare
    started      timestamptz := clock_timestamp();
    payload      jsonb := coalesce(record_booking.appointment, '{}');
    tbl          regclass;
    conflicting  text[];
    existing     record;
    the_id       bigint;
    v            booking_guard.validation_result;
    failed       boolean := false;
    rolled_back  jsonb;
    alert_id     bigint;
    review_id    bigint;
    result       booking_guard.booking_result;
begin
    if record_booking.call_id is null or record_booking.calcom_booking_id is null
       or record_booking.calcom_booking_id !~ '\S' or length(record_booking.calcom_booking_id) > 255
       or record_booking.calcom_booking_id ~ '[[:cntrl:]]' then
        raise exception 'record_booking() needs a call id and a Cal.com booking id'
            using errcode = 'BG005',
                  detail = format('call_id: %s, calcom_booking_id: %s', coalesce(record_booking.call_id::text, 'null'),
                                  coalesce(quote_literal(left(record_booking.calcom_booking_id, 100)), 'null')),
                  hint = 'The booking id is 1 to 255 printable characters: '
                         'select * from booking_guard.record_booking(42, ''cal-123'', ''{"service_id": 7}'');';
    end if;
    if payload = '[]' then
        payload := '{}';   -- an empty list, as some JSON encoders write an empty map
    end if;
    if jsonb_typeof(payload) <> 'object' then
        raise exception 'record_booking(): the appointment must be a jsonb object, not %', jsonb_typeof(payload)
            using errcode = 'BG005',
                  detail = format('appointment: %s', left(payload::text, 200)),
                  hint = 'Pass the appointment''s columns as an object: ''{"service_id": 7, "staff_id": 3}''.';
    end if;
    if pg_column_size(payload) > 65536 then
        raise exception 'record_booking(): the appointment is too large: % bytes', pg_column_size(payload)
            using errcode = 'BG005',
                  detail = 'An appointment''s columns fit in 64 kB.',
                  hint = 'Pass the appointment''s columns, not documents: keep large texts out of the booking call.';
    end if;
    if current_setting('transaction_isolation') = 'repeatable read' then
        raise exception 'record_booking() cannot run in a REPEATABLE READ transaction'
            using errcode = 'BG005',
                  detail = 'Its idempotency needs to see appointments committed by concurrent sessions after this '
                           'transaction''s snapshot was taken.',
                  hint = 'Use READ COMMITTED (the default) or SERIALIZABLE.';
    end if;
    if payload ?| array['call_id', 'calcom_v2_booking_id'] then
        select array_agg(format('%s (%s, the argument says %s)', f.key, payload ->> f.key, f.arg) order by f.key)
          into conflicting
          from (values ('call_id', record_booking.call_id::text),
                       ('calcom_v2_booking_id', record_booking.calcom_booking_id)) f (key, arg)
         where payload ? f.key and (payload ->> f.key) is distinct from f.arg;
    end if;
    if conflicting is not null then
        raise exception 'record_booking(): the appointment contradicts the arguments: %', array_to_string(conflicting, '; ')
            using errcode = 'BG005',
                  detail = 'call_id and calcom_v2_booking_id of the appointment are taken from record_booking''s arguments.',
                  hint = 'Leave them out of the appointment object.';
    end if;

    tbl := (booking_guard_internal.attached()).appointments_table;
    payload := payload || jsonb_build_object('call_id', record_booking.call_id,
                                             'calcom_v2_booking_id', record_booking.calcom_booking_id);

    perform booking_guard_internal.lock_booking(record_booking.calcom_booking_id);
    select a.id::bigint as id, a.call_id::bigint as call_id
      into existing
      from booking_guard_internal.guarded_appointments a
     where a.calcom_v2_booking_id = record_booking.calcom_booking_id
     order by coalesce(a.call_id = record_booking.call_id, false) desc, (a.call_id is null) desc, a.id
     limit 1;

    if existing.call_id = record_booking.call_id then
        -- recorded before: the first appointment stands, nothing is created
        result := (true, 'ok', jsonb_build_object('call_id', record_booking.call_id, 'appointment_id', existing.id,
                                                  'calcom_booking_id', record_booking.calcom_booking_id,
                                                  'already_recorded', true),
                   existing.id, false);
    else
        begin
            if existing.id is null then
                the_id := booking_guard_internal.insert_appointment(tbl, payload);
            elsif existing.call_id is null then
                -- the calendar's webhook was first: link the orphaned appointment to this call
                update booking_guard_internal.guarded_appointments a
                   set call_id = record_booking.call_id, updated_at = now()
                 where a.id = existing.id;
                the_id := existing.id;
            else
                the_id := existing.id;   -- the booking belongs to another call: validation says so
            end if;
            -- then flag the call: with its appointment already there, the calls trigger finds the
            -- claim true and the commit-time check has nothing left to judge
            update booking_guard_internal.guarded_calls g
               set appointment_made = true,
                   session_outcome = 'appointment_booked',
                   appointment_link_status = 'linked',
                   appointment_linked_at = coalesce(g.appointment_linked_at, now()),
                   booking_id = coalesce(g.booking_id, record_booking.calcom_booking_id),
                   booking_confirmed = true,
                   call_successful = true,
                   updated_at = now()
             where g.id = record_booking.call_id;
            v := booking_guard.validate_appointment_creation(record_booking.call_id, the_id,
                                                             record_booking.calcom_booking_id);
            if not v.success then
                -- undo this block's writes (the call's flags, the appointment); caught below
                raise exception using errcode = 'BGV01', message = 'validation failed: ' || v.reason;
            end if;
        exception
            when sqlstate 'BGV01' then
                failed := true;
            when data_exception or integrity_constraint_violation then
                raise exception 'record_booking(): the appointment for booking % cannot be stored: %',
                                record_booking.calcom_booking_id, sqlerrm
                    using errcode = 'BG005',
                          detail = format('appointment: %s; the server said: %s (SQLSTATE %s)',
                                          left(payload::text, 500), sqlerrm, sqlstate),
                          hint = format('Give values that fit the columns and constraints of %s.', tbl);
        end;

        if not failed then
            result := (true, v.reason, v.details, the_id, existing.id is null);
        else
            if v.reason <> 'call_not_found'
               and not exists (select from booking_guard_internal.guarded_appointments a where a.call_id = record_booking.call_id) then
                rolled_back := booking_guard.rollback_on_failure(record_booking.call_id, v.reason);
            end if;
            result := (false, v.reason,
                       v.details || booking_guard_internal.booking_refused(record_booking.call_id,
                                        record_booking.calcom_booking_id, v.reason, v.details, record_booking.appointment,
                                        rolled_back)
                                 || jsonb_build_object('undone_appointment_id', case when existing.id is null then the_id end),
                       null, false);
        end if;
    end if;

    perform booking_guard_internal.log_booking(record_booking.call_id, result.success, result.reason,
                                               result.appointment_id, result.created,
                                               round(extract(epoch from clock_timestamp() - started) * 1000, 3));
    return result;
end
$$;

comment on function booking_guard.record_booking(bigint, text, jsonb) is
    'Records a Cal.com booking for a call in one call: inserts the appointment (jsonb keys onto the attached table''s columns), links and flags the call, validates; idempotent on the booking id. A failed validation undoes the insert, rolls the call back to creation_failed, alerts and queues it for review, and returns success = false. Bad input is BG005 and writes nothing. Runs with the caller''s rights.';
