-- validate_appointment_creation(): every reason, its details and events; record_booking():
-- success, idempotency, the failure path inside the transaction, every bad input writing nothing.
begin;
select plan(75);
set local client_min_messages = warning;
select booking_guard.attach('public.calls', 'public.appointments');

-- explicit ids below; keep record_booking's generated ones (sequences survive ROLLBACK) away from them
select setval(pg_get_serial_sequence('appointments', 'id'), greatest(1000, (select last_value from appointments_id_seq)));
insert into companies (id, name) values (1, 'c1');
insert into calls (id, retell_call_id, company_id, direction, booking_id) values
    (1, 'r1', 1, 'inbound', 'cal-A'),      -- booked, consistent
    (2, 'r2', 1, 'inbound', null),         -- nothing booked
    (3, 'r3', 1, 'inbound', 'cal-B'),      -- its appointment carries another booking id
    (4, 'r4', 1, 'inbound', null),         -- an old appointment
    (5, 'r5', 1, 'inbound', 'cal-E');      -- its booking id is on an appointment of nobody
insert into appointments (id, call_id, calcom_v2_booking_id, company_id, created_at) values
    (10, 1, 'cal-A', 1, now()),
    (11, 1, 'cal-A2', 1, now() - interval '1 minute'),
    (30, 3, 'cal-A3', 1, now()),
    (40, 4, 'cal-D', 1, now() - interval '10 minutes'),
    (50, null, 'cal-E', 1, now());

create function pg_temp.v(call_id bigint, appointment_id bigint default null, booking text default null)
returns booking_guard.validation_result language sql as $$
    select * from booking_guard.validate_appointment_creation(call_id, appointment_id, booking)
$$;

-- one reason each
select is((pg_temp.v(999)).reason, 'call_not_found', 'an unknown call: call_not_found');
select is((pg_temp.v(999)).success, false, 'call_not_found is a failure');
select is((pg_temp.v(2)).reason, 'appointment_not_found', 'a call without appointment: appointment_not_found');
select is((pg_temp.v(1, 9999)).reason, 'appointment_not_found', 'an unknown appointment id: appointment_not_found');
select is((pg_temp.v(2, 10)).reason, 'appointment_not_linked', 'another call''s appointment: appointment_not_linked');
select is((pg_temp.v(5)).reason, 'appointment_not_linked',
          'found only by the call''s booking id, linked to nobody: appointment_not_linked');
select is(((pg_temp.v(5)).details ->> 'appointment_id')::bigint, 50::bigint, '... and details name that appointment');
select is((pg_temp.v(1, 10, 'cal-Z')).reason, 'booking_id_mismatch', 'a given booking id that differs: booking_id_mismatch');
select is((pg_temp.v(1, 10, 'cal-Z')).details ->> 'expected_from', 'argument', '... expected from the argument');
select is((pg_temp.v(3, 30)).reason, 'booking_id_mismatch', 'the call''s own booking id differs: booking_id_mismatch');
select is((pg_temp.v(3, 30)).details ->> 'expected_from', 'call', '... expected from the call');
select is((pg_temp.v(3, 30)).details ->> 'expected_booking_id', 'cal-B', '... with the expected id in details');
select is((pg_temp.v(4, 40)).reason, 'appointment_stale', 'an appointment older than the window: appointment_stale');
select cmp_ok(((pg_temp.v(4, 40)).details ->> 'age_seconds')::float8, '>=', 600::float8, '... with its age in details');
select is((pg_temp.v(1, 10)).reason, 'ok', 'a linked, matching, recent appointment: ok');
select is((pg_temp.v(1, 10)).success, true, 'ok is a success');
select is((pg_temp.v(1, 10, 'cal-A')).reason, 'ok', 'ok with the matching booking id given');

-- the validation window is the setting
select booking_guard.set_setting('validation_recent_window', '1 hour');
select is((pg_temp.v(4, 40)).reason, 'ok', 'a longer validation_recent_window makes the old appointment recent');
select booking_guard.set_setting('validation_recent_window', '5 minutes');

-- without an appointment id: the call's appointment with the expected booking id, else the newest
select is(((pg_temp.v(1)).details ->> 'appointment_id')::bigint, 10::bigint,
          'without an id: the call''s appointment with its booking id');
select is(((pg_temp.v(1, null, 'cal-A2')).details ->> 'appointment_id')::bigint, 11::bigint,
          'without an id: the call''s appointment with the given booking id');
select is((pg_temp.v(1, null, 'cal-A2')).reason, 'booking_id_mismatch',
          '... which still has to match the call''s own booking id');
update calls set booking_id = null where id = 3;
select is((pg_temp.v(3)).reason, 'ok', 'a call without booking id and a recent appointment: ok');

-- details carry the facts
select ok((pg_temp.v(1, 10)).details ?& array['call_id', 'retell_call_id', 'appointment_id', 'appointment_call_id',
                                             'appointment_booking_id', 'appointment_created_at', 'age_seconds',
                                             'recent_window_seconds', 'duration_ms'],
          'details of ok carry call, appointment, age, window and duration');

-- one event per call, with the shared contract's keys
create temp table before_events as select coalesce(max(id), 0) as id from booking_guard.events;
select pg_temp.v(1, 10);
select pg_temp.v(2);
select results_eq($$select entity_type, entity_id, details ->> 'reason', (details ->> 'success')::boolean,
                           (details ->> 'appointment_id')::bigint
                      from booking_guard.events where kind = 'validation' and id > (select id from before_events)
                     order by id$$,
                  $$values ('call', '1', 'ok', true, 10::bigint), ('call', '2', 'appointment_not_found', false, null)$$,
                  'each validation logs one validation event with reason, success and appointment id');
select is_empty($$select from booking_guard.events where kind = 'validation' and id > (select id from before_events)
                     and not (details ? 'duration_ms' and (details ->> 'duration_ms')::float8 >= 0)$$,
                'every validation event has a duration_ms');

-- bad input
select throws_ok($$select booking_guard.validate_appointment_creation(null)$$, 'BG005',
                 'plpy.Error: validate_appointment_creation() needs a call id', 'a null call id: BG005');
truncate before_events;
insert into before_events select max(id) from booking_guard.events;
select throws_ok($$select booking_guard.validate_appointment_creation(null, 10)$$, 'BG005', null, 'null call id again');
select is_empty($$select from booking_guard.events where id > (select id from before_events)$$,
                'a rejected validation logs nothing');

-- ---------------------------------------------------------------- record_booking
create temp table counts as
select (select count(*) from appointments) as appointments, (select count(*) from booking_guard.events) as events,
       (select count(*) from booking_guard.alerts) as alerts, (select count(*) from booking_guard.review_queue) as reviews;
create function pg_temp.nothing_written() returns boolean language sql as $$
    select (select count(*) from appointments) = c.appointments and (select count(*) from booking_guard.events) = c.events
       and (select count(*) from booking_guard.alerts) = c.alerts
       and (select count(*) from booking_guard.review_queue) = c.reviews
      from counts c
$$;

select throws_ok($$select booking_guard.record_booking(null, 'cal-X', '{}')$$, 'BG005',
                 'record_booking() needs a call id and a Cal.com booking id', 'null call id: BG005');
select throws_ok($$select booking_guard.record_booking(2, null, '{}')$$, 'BG005',
                 'record_booking() needs a call id and a Cal.com booking id', 'null booking id: BG005');
select throws_ok($$select booking_guard.record_booking(2, '  ', '{}')$$, 'BG005',
                 'record_booking() needs a call id and a Cal.com booking id', 'blank booking id: BG005');
select throws_ok($$select booking_guard.record_booking(2, e'\t \n', '{}')$$, 'BG005',
                 'record_booking() needs a call id and a Cal.com booking id', 'a booking id of tabs and newlines: BG005');
select throws_ok($$select booking_guard.record_booking(2, e'cal-\x01X', '{}')$$, 'BG005',
                 'record_booking() needs a call id and a Cal.com booking id', 'a control character in the booking id: BG005');
select throws_ok($$select booking_guard.record_booking(2, e'cal-\u00e9\x7f', '{}')$$, 'BG005',
                 'record_booking() needs a call id and a Cal.com booking id',
                 'a control character beside a non-ASCII one (judged by the regular expressions): BG005');
select throws_ok($$select booking_guard.record_booking(2, repeat(e'\u00e9', 256), '{}')$$, 'BG005',
                 'record_booking() needs a call id and a Cal.com booking id', '256 characters of non-ASCII text: BG005');
select throws_ok($$select booking_guard.record_booking(2, 'cal-X', '[1, 2]')$$, 'BG005',
                 'record_booking(): the appointment must be a jsonb object, not array', 'a jsonb array: BG005');
select throws_ok($$select booking_guard.record_booking(2, 'cal-X', '"x"')$$, 'BG005',
                 'record_booking(): the appointment must be a jsonb object, not string', 'a jsonb string: BG005');
select throws_ok($$select booking_guard.record_booking(2, 'cal-X', '{"colour": "red", "service_id": 1, "aaa": 1}')$$,
                 'BG005', 'record_booking(): unknown appointment field(s): aaa, colour', 'unknown keys: BG005 naming them');
select throws_ok($$select booking_guard.record_booking(2, 'cal-X', '{"call_id": 3}')$$, 'BG005',
                 'record_booking(): the appointment contradicts the arguments: call_id (3, the argument says 2)',
                 'a call_id key that contradicts the argument: BG005');
select throws_ok($$select booking_guard.record_booking(2, 'cal-X', '{"starts_at": "tomorrow-ish"}')$$, 'BG005',
                 null, 'a value that does not fit its column: BG005');
select throws_ok($$select booking_guard.record_booking(2, 'cal-X', '{"service_id": 424242}')$$, 'BG005',
                 null, 'a value that breaks a foreign key: BG005');
select ok(pg_temp.nothing_written(), 'no bad input wrote anything (appointments, events, alerts, reviews)');
select is((select session_outcome from calls where id = 2), null, '... nor touched the call');

-- success: one appointment with the jsonb's columns, the call linked and flagged
create temp table r1 as
select * from booking_guard.record_booking(2, 'cal-NEW', '{"status": "confirmed", "starts_at": "2026-12-01T10:00:00Z", "call_id": 2}');
select results_eq($$select success, reason, created from r1$$, $$values (true, 'ok', true)$$,
                  'record_booking succeeds and says it created the appointment');
select results_eq($$select call_id, calcom_v2_booking_id, status, starts_at from appointments
                     where id = (select appointment_id from r1)$$,
                  $$values (2::bigint, 'cal-NEW', 'confirmed', '2026-12-01T10:00:00Z'::timestamptz)$$,
                  'the appointment carries the call, the booking id and the jsonb''s columns');
select results_eq($$select appointment_made, session_outcome, appointment_link_status, booking_id, booking_confirmed
                      from calls where id = 2$$,
                  $$values (true, 'appointment_booked', 'linked', 'cal-NEW', true)$$, 'the call is linked and flagged');
select is((select count(*)::int from booking_guard.events where kind = 'record_booking' and entity_id = '2'), 1,
          'one record_booking event');
select ok((select details ?& array['success', 'reason', 'appointment_id', 'duration_ms']
             from booking_guard.events where kind = 'record_booking' and entity_id = '2'),
          'the record_booking event carries success, reason, appointment_id and duration_ms');

-- idempotent on the booking id
create temp table r2 as select * from booking_guard.record_booking(2, 'cal-NEW', '{"status": "other"}');
select results_eq($$select success, reason, created, appointment_id from r2$$,
                  $$select true, 'ok', false, appointment_id from r1$$,
                  'recording the same booking again returns the first appointment, created false');
select is((select count(*)::int from appointments where calcom_v2_booking_id = 'cal-NEW'), 1,
          '... and creates nothing');
select is((select status from appointments where calcom_v2_booking_id = 'cal-NEW'), 'confirmed',
          '... nor changes the first appointment');

-- an orphaned appointment with the booking id (the calendar's webhook was first) is linked
update calls set booking_id = null where id = 5;
select results_eq($$select success, reason, created, appointment_id from booking_guard.record_booking(5, 'cal-E')$$,
                  $$values (true, 'ok', false, 50::bigint)$$, 'an orphaned appointment with the booking id is linked');
select is((select call_id from appointments where id = 50), 5::bigint, '... to the call');

-- a failed validation: undone, rolled back, alerted, queued, in this transaction
insert into calls (id, retell_call_id, company_id, direction, booking_id) values (6, 'r6', 1, 'inbound', 'cal-OTHER');
create temp table r3 as select * from booking_guard.record_booking(6, 'cal-F', '{"status": "confirmed"}');
select results_eq($$select success, reason, appointment_id, created from r3$$,
                  $$values (false, 'booking_id_mismatch', null::bigint, false)$$,
                  'a booking that fails validation returns success false with the reason');
select is((select count(*)::int from appointments where calcom_v2_booking_id = 'cal-F'), 0, 'its appointment is undone');
select results_eq($$select session_outcome, appointment_made, appointment_link_status, booking_confirmed
                      from calls where id = 6$$,
                  $$values ('creation_failed', false, 'creation_failed', false)$$,
                  'the call is rolled back to creation_failed (and the undone flags are gone)');
select results_eq($$select alert_type, severity from booking_guard.alerts where entity_id = '6' and entity_type = 'call'$$,
                  $$values ('appointment_validation_failed', 'critical')$$, 'one critical appointment_validation_failed alert');
select results_eq($$select reason, priority, context ->> 'calcom_booking_id', context -> 'appointment' ->> 'status'
                      from booking_guard.review_queue where call_id = 6$$,
                  $$values ('appointment_validation_failed', 1, 'cal-F', 'confirmed')$$,
                  'one review item with what is needed to redo the booking');
select results_eq($$select details ->> 'reason', (details ->> 'success')::boolean from booking_guard.validation_events
                     where entity_id = '6'$$,
                  $$values ('booking_id_mismatch', false)$$,
                  'the failed validation''s event survives the undo, once');
select ok((select (details ? 'review_id') and (details ? 'alert_id') from r3), 'the result names the alert and review item');

-- an appointment older than the window given in the jsonb: stale, undone
insert into calls (id, retell_call_id, company_id, direction) values (7, 'r7', 1, 'inbound');
select results_eq($$select success, reason from booking_guard.record_booking(7, 'cal-G',
                        jsonb_build_object('created_at', now() - interval '1 day'))$$,
                  $$values (false, 'appointment_stale')$$, 'a backdated appointment: appointment_stale');
select is((select count(*)::int from appointments where calcom_v2_booking_id = 'cal-G'), 0, '... undone');

-- a booking id already on another call's appointment
select results_eq($$select success, reason from booking_guard.record_booking(7, 'cal-NEW')$$,
                  $$values (false, 'appointment_not_linked')$$, 'a booking id of another call: appointment_not_linked');
select is((select call_id from appointments where calcom_v2_booking_id = 'cal-NEW'), 2::bigint,
          '... and the other call''s appointment stays where it is');

-- an application trigger that swallows the insert: appointment_not_found
insert into calls (id, retell_call_id, company_id, direction) values (8, 'r8', 1, 'inbound');
create function pg_temp.swallow() returns trigger language plpgsql as $$ begin return null; end $$;
create trigger swallow before insert on appointments for each row when (new.calcom_v2_booking_id = 'cal-H')
    execute function pg_temp.swallow();
select results_eq($$select success, reason from booking_guard.record_booking(8, 'cal-H')$$,
                  $$values (false, 'appointment_not_found')$$, 'an insert that did not happen: appointment_not_found');
select is((select session_outcome from calls where id = 8), 'creation_failed', '... and the call is creation_failed');

-- an unknown call: nothing recorded, alerted and queued with the booking
select results_eq($$select success, reason from booking_guard.record_booking(777, 'cal-I', '{"status": "confirmed"}')$$,
                  $$values (false, 'call_not_found')$$, 'an unknown call: call_not_found');
select is((select count(*)::int from appointments where calcom_v2_booking_id = 'cal-I'), 0, '... no appointment');
select is((select context ->> 'calcom_booking_id' from booking_guard.review_queue where call_id = 777), 'cal-I',
          '... the booking waits for review');

-- PHP's json_encode([]) is '[]': an empty array is taken as the empty object (call 2's booking,
-- recorded above, is returned)
select results_eq($$select success, created from booking_guard.record_booking(2, 'cal-NEW', '[]')$$,
                  $$values (true, false)$$, 'an empty JSON array is taken as an empty object');

-- not attached: BG003 (also with the plans already cached in this session)
select booking_guard.detach();
select throws_ok($$select booking_guard.validate_appointment_creation(1)$$, 'BG003',
                 'plpy.SPIError: booking_guard is not attached', 'validation when not attached: BG003');
select throws_ok($$select booking_guard.record_booking(1, 'cal-Z')$$, 'BG003', 'booking_guard is not attached',
                 'record_booking when not attached: BG003');

-- privileges
select ok(has_function_privilege('booking_guard_app', 'booking_guard.record_booking(bigint, text, jsonb)', 'execute'),
          'app may record bookings');
select ok(has_function_privilege('booking_guard_app',
                                 'booking_guard.validate_appointment_creation(bigint, bigint, text)', 'execute'),
          'app may validate');
select ok(not has_function_privilege('booking_guard_monitor', 'booking_guard.record_booking(bigint, text, jsonb)', 'execute'),
          'monitor may not record bookings');

select * from finish();
rollback;
