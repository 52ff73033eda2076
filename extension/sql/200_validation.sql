-- Post-booking validation (the seed's PostBookingValidationService.validateAppointmentCreation).
--
-- validate_appointment_creation() answers one question right after a booking was written:
-- does the appointment this call claims really stand? It is PL/Python (body in
-- extension/plpython/validate_appointment_creation.py), reads the application through the
-- guarded views with plans prepared once per session, and logs one event of kind
-- 'validation' per call with its outcome and duration: the latency KPI (p95 of
-- details->>'duration_ms') and the recent-failures detection read those events.

create type booking_guard.validation_result as (
    success  boolean,
    reason   text,
    details  jsonb
);

comment on type booking_guard.validation_result is
    'Outcome of validate_appointment_creation(): success, reason (ok, call_not_found, appointment_not_found, appointment_not_linked, booking_id_mismatch, appointment_stale) and the facts behind it.';

create function booking_guard.validate_appointment_creation(call_id bigint, appointment_id bigint default null,
                                                            calcom_booking_id text default null)
returns booking_guard.validation_result
language plpython3u
volatile
security definer
set search_path = pg_catalog, pg_temp
as $python$
@plpython validate_appointment_creation.py
return validate_appointment_creation(plpy, SD, call_id, appointment_id, calcom_booking_id)
$python$;

comment on function booking_guard.validate_appointment_creation(bigint, bigint, text) is
    'The seed''s post-booking validation: checks that the call exists, that the appointment (by id, else the call''s) exists, is linked to the call, carries the expected Cal.com booking id and is recent (validation_recent_window); logs one validation event with its duration. A null call id is BG005.';

grant execute on function booking_guard.validate_appointment_creation(bigint, bigint, text)
   to booking_guard_app, booking_guard_admin;
