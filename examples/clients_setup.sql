-- What the client examples (examples/psql, python, php, node) expect to find, done once by an
-- operator with booking_guard_admin's rights or more, on a database with the reference schema
-- (app_schema.sql) and booking_guard attached to its calls and appointments:
--
--   * company 1 and its service 1, which the examples book;
--   * the rule missing_appointment in enforce mode, so that a transaction flagging a call as
--     booked without an appointment is refused at COMMIT (BG002), which the examples show;
--   * the breakers of the examples' two scopes closed, with no failure streak: each example
--     opens them on purpose (three failed calendar calls), so that running it again needs them
--     closed again.
--
-- Running it again changes nothing else.

insert into companies (id, name) values (1, 'Acme Dental') on conflict (id) do nothing;
insert into services (id, company_id, name, duration_minutes) values (1, 1, 'Check-up', 30) on conflict (id) do nothing;

select booking_guard.set_rule('missing_appointment', 'enforce');

select booking_guard.circuit_reset(b.key)
  from booking_guard.circuit_breakers b
 where b.key in ('appointment_booking:global', 'appointment_booking:service:1');
