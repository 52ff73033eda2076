-- Post-booking validation.
--
-- validate_appointment_creation() answers one question right after a booking was written:
-- does the appointment this call claims really stand? It is PL/Python (body in
-- extension/plpython/validate_appointment_creation.py), reads the application through the
-- guarded views with plans prepared once per session (with the caller's rights: it shows a
-- role only the calls it may read), and logs one event of kind
-- 'validation' per call with its outcome and duration: the latency KPI (p95 of
-- details->>'duration_ms') and the recent-failures detection read those events.

create type booking_guard.validation_result as (
    success  boolean,
    reason   text,
    details  jsonb
);

comment on type booking_guard.validation_result is
    'Outcome of validate_appointment_creation(): success, reason (ok, call_not_found, appointment_not_found, appointment_not_linked, booking_id_mismatch, appointment_stale) and the facts behind it.';

-- The validation's event, written with booking_guard_owner's rights (the caller may not write
-- booking_guard's tables).
create function booking_guard_internal.log_validation(call_id bigint, success boolean, reason text, duration_ms float8,
                                                      appointment_id bigint)
returns void
language sql
security definer
set search_path = pg_catalog, pg_temp
as $$
    insert into booking_guard.events (kind, entity_type, entity_id, details)
    values ('validation', 'call', log_validation.call_id::text,
            jsonb_build_object('success', log_validation.success, 'reason', left(log_validation.reason, 63),
                               'duration_ms', log_validation.duration_ms, 'appointment_id', log_validation.appointment_id))
$$;

comment on function booking_guard_internal.log_validation(bigint, boolean, text, float8, bigint) is
    'validate_appointment_creation(): appends its validation event (success, reason, duration, appointment), which the latency KPI and the metrics read.';

create function booking_guard.validate_appointment_creation(call_id bigint, appointment_id bigint default null,
                                                            calcom_booking_id text default null)
returns booking_guard.validation_result
language plpython3u
volatile
set search_path = pg_catalog, pg_temp
as $python$
@plpython validate_appointment_creation.py
return validate_appointment_creation(plpy, SD, call_id, appointment_id, calcom_booking_id)
$python$;

comment on function booking_guard.validate_appointment_creation(bigint, bigint, text) is
    'Post-booking validation: checks that the call exists, that the appointment (by id, else the call''s) exists, is linked to the call, carries the expected Cal.com booking id and is recent (validation_recent_window); logs one validation event with its duration. A null call id is BG005.';
