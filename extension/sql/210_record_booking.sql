-- record_booking(): the booking path as one database call (the seed's
-- AppointmentCreationService::createLocalRecord with its post-validation), for any language,
-- right after the calendar (Cal.com) booking succeeded.
--
--   1. checks its input; bad input is an error (BG005) and writes nothing
--   2. serialises on the booking id (transaction advisory lock, two-key form with the class
--      below) and looks the booking up: the appointments table has no unique constraint on
--      calcom_v2_booking_id, on purpose, so this lock is what makes the call idempotent
--   3. a booking already recorded for this call: returns that appointment, creates nothing
--   4. otherwise, in a subtransaction: inserts the appointment (or links the orphaned one
--      that carries the booking id), flags the call, validates; a failed validation undoes all
--      of that, rolls the call back to creation_failed (rollback_on_failure: critical alert
--      appointment_validation_failed) and queues it for review, in the caller's transaction;
--      a call that still has an appointment (a second booking refused) keeps it: alert and
--      review, no rollback.
--
-- The appointment's INSERT is prepared once per session, table and set of jsonb keys, as a
-- prepared statement named booking_guard_insert_<md5> (visible in pg_prepared_statements; a
-- DISCARD ALL or DEALLOCATE only makes the next call prepare it again).
--
-- Idempotency needs each call to see the appointments committed before it took the lock:
-- READ COMMITTED (the default) does, and SERIALIZABLE detects the conflict; REPEATABLE READ
-- would read an older snapshot and is refused.

create type booking_guard.booking_result as (
    success         boolean,
    reason          text,
    details         jsonb,
    appointment_id  bigint,
    created         boolean
);

comment on type booking_guard.booking_result is
    'Outcome of record_booking(): the validation_result fields, the appointment id (null when the booking failed) and created (false when the booking had been recorded before).';

create function booking_guard.record_booking(call_id bigint, calcom_booking_id text, appointment jsonb default '{}')
returns booking_guard.booking_result
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_column
declare
    -- advisory lock class of record_booking: first 32 bits of md5('booking_guard.record_booking')
    lock_class   constant integer := -1560708019;
    started      timestamptz := clock_timestamp();
    payload      jsonb := coalesce(record_booking.appointment, '{}');
    tbl          regclass;
    unknown      text[];
    conflicting  text[];
    existing     record;
    cols         text;
    stmt         name;
    prepared     boolean := false;
    the_id       bigint;
    v            booking_guard.validation_result;
    failed       boolean := false;
    rolled_back  jsonb;
    alert_id     bigint;
    review_id    bigint;
    result       booking_guard.booking_result;
begin
    if record_booking.call_id is null or record_booking.calcom_booking_id is null
       or btrim(record_booking.calcom_booking_id) = '' then
        raise exception 'record_booking() needs a call id and a Cal.com booking id'
            using errcode = 'BG005',
                  detail = format('call_id: %s, calcom_booking_id: %s', coalesce(record_booking.call_id::text, 'null'),
                                  coalesce(quote_literal(record_booking.calcom_booking_id), 'null')),
                  hint = 'select * from booking_guard.record_booking(42, ''cal-123'', ''{"service_id": 7}'');';
    end if;
    if jsonb_typeof(payload) <> 'object' then
        raise exception 'record_booking(): the appointment must be a jsonb object, not %', jsonb_typeof(payload)
            using errcode = 'BG005',
                  detail = format('appointment: %s', left(payload::text, 200)),
                  hint = 'Pass the appointment''s columns as an object: ''{"service_id": 7, "staff_id": 3}''.';
    end if;
    if current_setting('transaction_isolation') = 'repeatable read' then
        raise exception 'record_booking() cannot run in a REPEATABLE READ transaction'
            using errcode = 'BG005',
                  detail = 'Its idempotency needs to see appointments committed by concurrent sessions after this '
                           'transaction''s snapshot was taken.',
                  hint = 'Use READ COMMITTED (the default) or SERIALIZABLE.';
    end if;

    select a.appointments_table into tbl from booking_guard.attached_tables a;
    if not found then
        perform booking_guard.attached();   -- raises BG003
    end if;
    payload := payload || jsonb_build_object('call_id', record_booking.call_id,
                                             'calcom_v2_booking_id', record_booking.calcom_booking_id);
    -- The insert's prepared statement is named after the table and the payload's keys (a jsonb
    -- object keeps its keys in one fixed order). Its keys were checked when it was prepared in
    -- this session: the catalog is read only for a set of keys not seen yet.
    stmt := 'booking_guard_insert_' || md5(tbl::oid::text || ':' || jsonb_path_query_array(payload, '$.keyvalue().key')::text);
    if current_setting('booking_guard.insert_' || stmt, true) is distinct from 'prepared' then
        select array_agg(k order by k) filter (where a.attnum is null), string_agg(quote_ident(k), ', ' order by k)
          into unknown, cols
          from jsonb_object_keys(payload) k
          left join pg_catalog.pg_attribute a
                 on a.attrelid = tbl and a.attname = k and a.attnum > 0 and not a.attisdropped;
    end if;
    if unknown is not null then
        raise exception 'record_booking(): unknown appointment field(s): %', array_to_string(unknown, ', ')
            using errcode = 'BG005',
                  detail = format('%s has no column(s) %s.', tbl, array_to_string(unknown, ', ')),
                  hint = format('Known columns: %s.',
                                (select string_agg(a.attname, ', ' order by a.attnum) from pg_catalog.pg_attribute a
                                  where a.attrelid = tbl and a.attnum > 0 and not a.attisdropped));
    end if;
    if record_booking.appointment ?| array['call_id', 'calcom_v2_booking_id'] then
        select array_agg(format('%s (%s, the argument says %s)', f.key, record_booking.appointment ->> f.key, f.arg)
                         order by f.key)
          into conflicting
          from (values ('call_id', record_booking.call_id::text),
                       ('calcom_v2_booking_id', record_booking.calcom_booking_id)) f (key, arg)
         where record_booking.appointment ? f.key and (record_booking.appointment ->> f.key) is distinct from f.arg;
    end if;
    if conflicting is not null then
        raise exception 'record_booking(): the appointment contradicts the arguments: %', array_to_string(conflicting, '; ')
            using errcode = 'BG005',
                  detail = 'call_id and calcom_v2_booking_id of the appointment are taken from record_booking''s arguments.',
                  hint = 'Leave them out of the appointment object.';
    end if;

    perform pg_catalog.pg_advisory_xact_lock(lock_class, pg_catalog.hashtext(record_booking.calcom_booking_id));
    select a.id::bigint as id, a.call_id::bigint as call_id
      into existing
      from booking_guard.guarded_appointments a
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
        <<attempt>>
        loop
            begin
                if existing.id is null then
                    -- The insert is dynamic (the attached table, the jsonb's columns). A prepared
                    -- statement per table and column set keeps its plan for the session: planning it
                    -- on every booking cost more than the insert itself. Prepared on first use
                    -- (below), also after a DISCARD ALL or DEALLOCATE.
                    execute format('execute %I(%L)', stmt, payload) into the_id;
                elsif existing.call_id is null then
                    -- the calendar's webhook was first: link the orphaned appointment to this call
                    update booking_guard.guarded_appointments a
                       set call_id = record_booking.call_id, updated_at = now()
                     where a.id = existing.id;
                    the_id := existing.id;
                else
                    the_id := existing.id;   -- the booking belongs to another call: validation says so
                end if;
                -- then flag the call: with its appointment already there, the calls trigger
                -- finds the claim true and the commit-time check has nothing left to judge
                update booking_guard.guarded_calls g
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
                when invalid_sql_statement_name then
                    -- the insert is not prepared in this session yet: prepare it, run the block again
                    if prepared or exists (select from pg_catalog.pg_prepared_statements p where p.name = stmt) then
                        raise;
                    end if;
                    if cols is null then   -- checked before, but the statement is gone (DISCARD, DEALLOCATE)
                        select string_agg(quote_ident(k), ', ' order by k) into cols from jsonb_object_keys(payload) k;
                    end if;
                    execute format('prepare %I (jsonb) as insert into %s as t (%s) select %s '
                                   'from pg_catalog.jsonb_populate_record(null::%s, $1) r returning t.id',
                                   stmt, tbl, cols, cols, tbl);
                    -- a session-level mark, so that DISCARD ALL (RESET ALL) forgets it with the statement
                    perform set_config('booking_guard.insert_' || stmt, 'prepared', false);
                    prepared := true;
                    continue attempt;
                when data_exception or integrity_constraint_violation then
                    raise exception 'record_booking(): the appointment for booking % cannot be stored: %',
                                    record_booking.calcom_booking_id, sqlerrm
                        using errcode = 'BG005',
                              detail = format('appointment: %s; the server said: %s (SQLSTATE %s)',
                                              left(payload::text, 500), sqlerrm, sqlstate),
                              hint = format('Give values that fit the columns and constraints of %s.', tbl);
            end;
            exit attempt;
        end loop attempt;

        if not failed then
            result := (true, v.reason, v.details, the_id, existing.id is null);
        else
            -- the validation's own event went with the undone subtransaction: log it again
            perform booking_guard.log_event('validation', null, 'call', record_booking.call_id::text,
                jsonb_build_object('success', false, 'reason', v.reason, 'duration_ms', v.details -> 'duration_ms',
                                   'appointment_id', v.details -> 'appointment_id'));
            if v.reason = 'call_not_found' then
                alert_id := booking_guard.raise_alert('appointment_validation_failed', 'critical', 'call',
                    record_booking.call_id::text,
                    format('Booking %s was made for call %s, which does not exist: not recorded',
                           record_booking.calcom_booking_id, record_booking.call_id),
                    jsonb_build_object('reason', v.reason, 'calcom_booking_id', record_booking.calcom_booking_id));
            elsif exists (select from booking_guard.guarded_appointments a where a.call_id = record_booking.call_id) then
                -- The call keeps the booking it already has (a second one was refused): rolling it
                -- back to creation_failed would be false, and the truth check would only undo it.
                alert_id := booking_guard.raise_alert('appointment_validation_failed', 'critical', 'call',
                    record_booking.call_id::text,
                    format('Booking %s for call %s was refused (%s); the call keeps its existing appointment. '
                           'Cancel the extra booking in the calendar.',
                           record_booking.calcom_booking_id, record_booking.call_id, v.reason),
                    jsonb_build_object('reason', v.reason, 'calcom_booking_id', record_booking.calcom_booking_id));
            else
                rolled_back := booking_guard.rollback_on_failure(record_booking.call_id, v.reason);
                alert_id := (rolled_back ->> 'alert_id')::bigint;
            end if;
            -- everything needed to redo the booking by hand: nothing of it is lost
            review_id := booking_guard.queue_for_review(record_booking.call_id, 'appointment_validation_failed',
                jsonb_build_object('reason', v.reason, 'calcom_booking_id', record_booking.calcom_booking_id,
                                   'appointment', record_booking.appointment, 'validation', v.details,
                                   'rollback', rolled_back, 'alert_id', alert_id));
            result := (false, v.reason,
                       v.details || jsonb_build_object('alert_id', alert_id, 'review_id', review_id,
                                                       'undone_appointment_id',
                                                       case when existing.id is null then the_id end),
                       null, false);
        end if;
    end if;

    perform booking_guard.log_event('record_booking', null, 'call', record_booking.call_id::text,
        jsonb_build_object('success', result.success, 'reason', result.reason, 'appointment_id', result.appointment_id,
                           'created', result.created,
                           'duration_ms', round(extract(epoch from clock_timestamp() - started) * 1000, 3)));
    return result;
end
$$;

comment on function booking_guard.record_booking(bigint, text, jsonb) is
    'Records a Cal.com booking for a call in one call: inserts the appointment (jsonb keys onto the attached table''s columns), links and flags the call, validates; idempotent on the booking id. A failed validation undoes the insert, rolls the call back to creation_failed, alerts and queues it for review, and returns success = false. Bad input is BG005 and writes nothing.';

grant execute on function booking_guard.record_booking(bigint, text, jsonb) to booking_guard_app, booking_guard_admin;
