-- Post-booking validation.
--
-- validate_appointment_creation() answers one question right after a booking was written:
-- does the appointment this call claims really stand? It is PL/Python (body in
-- extension/plpython/validate_appointment_creation.py), reads the application through the
-- guarded views with plans prepared once per session (with the caller's rights: it shows a
-- role only the calls it may read), and logs one event of kind
-- 'validation' per call with its outcome and duration: the latency KPI (p95 of
-- details->>'duration_ms') and the recent-failures detection read those events.
--
-- The rules themselves live in one PL/Python function, validation_verdict(), which judges facts
-- its caller read: validate_appointment_creation() and record_booking() (which takes them from
-- the RETURNING of the statements that wrote the rows, without a query of PL/Python's own: each
-- runs in a subtransaction).

create type booking_guard.validation_result as (
    success  boolean,
    reason   text,
    details  jsonb
);

comment on type booking_guard.validation_result is
    'Outcome of validate_appointment_creation(): success, reason (ok, call_not_found, appointment_not_found, appointment_not_linked, booking_id_mismatch, appointment_stale) and the facts behind it.';

-- The validation's event, written with booking_guard_owner's rights (the caller may not write
-- booking_guard's tables). PL/pgSQL rather than SQL: PL/pgSQL keeps the insert's plan for the
-- session, a SQL function called from PL/Python plans it again on every call.
create function booking_guard_internal.log_validation(call_id bigint, success boolean, reason text, duration_ms float8,
                                                      appointment_id bigint)
returns void
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    insert into booking_guard.events (kind, entity_type, entity_id, details)
    values ('validation', 'call', log_validation.call_id::text,
            jsonb_build_object('success', log_validation.success, 'reason', left(log_validation.reason, 63),
                               'duration_ms', log_validation.duration_ms, 'appointment_id', log_validation.appointment_id));
end
$$;

comment on function booking_guard_internal.log_validation(bigint, boolean, text, float8, bigint) is
    'validate_appointment_creation(): appends its validation event (success, reason, duration, appointment), which the latency KPI and the metrics read.';

-- Every validation that ran, as one kind of event: validate_appointment_creation()'s own events
-- (kind 'validation'), and the validation record_booking() ran, which its own event carries under
-- 'validation' (one row per booking instead of two: the booking path writes one event). details
-- has the same keys for both: success, reason, duration_ms, appointment_id. The latency KPI, the
-- validation metrics and detection read this view; it reads events with the reader's own rights.
create view booking_guard.validation_events with (security_invoker = true) as
select e.id, e.at, e.xid, e.entity_type, e.entity_id, e.details
  from booking_guard.events e
 where e.kind = 'validation'
union all
select e.id, e.at, e.xid, e.entity_type, e.entity_id,
       pg_catalog.jsonb_build_object('success', e.details -> 'success', 'reason', e.details -> 'reason')
       operator(pg_catalog.||) (e.details -> 'validation')
  from booking_guard.events e
 where e.kind = 'record_booking' and pg_catalog.jsonb_typeof(e.details -> 'validation') = 'object';

comment on view booking_guard.validation_events is
    'Every validation that ran: validate_appointment_creation()''s events and the validation record_booking() logs within its own event; details: success, reason, duration_ms, appointment_id.';

-- The rules (body in extension/plpython/validation_verdict.py). It runs no SQL and reads
-- nothing: it judges the facts it is given, with the caller's rights like its callers. The one
-- function without a pinned search_path: it resolves no name (no query, no cast by name), so
-- there is nothing for a search_path to change, and a SET clause would cost a setting's save and
-- restore, and a recomputation of the caller's search path, on every booking.
create function booking_guard_internal.validation_verdict(
    call_id bigint, appointment_id bigint, calcom_booking_id text, started float8,
    call_found boolean, retell_call_id text, call_booking_id text,
    found_id bigint, appointment_call_id bigint, appointment_booking_id text, appointment_created_at text,
    age_seconds float8, window_seconds float8)
returns booking_guard.validation_result
language plpython3u
volatile
as $python$
@plpython validation_verdict.py
return validation_verdict(plpy, call_id, appointment_id, calcom_booking_id, started, call_found, retell_call_id,
                          call_booking_id, found_id, appointment_call_id, appointment_booking_id, appointment_created_at,
                          age_seconds, window_seconds)
$python$;

comment on function booking_guard_internal.validation_verdict(bigint, bigint, text, float8, boolean, text, text, bigint,
                                                              bigint, text, text, float8, float8) is
    'The rules of the post-booking validation, on facts its caller read (the call: found, retell id, booking id; the appointment examined: id, call, booking id, created_at, age; the validation window): returns the validation_result, with duration_ms since started (Unix time). Runs no SQL.';

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
