-- attach(): every error path, the indexes it creates, idempotence, detach().
begin;
select plan(19);
set local client_min_messages = warning;

create schema shapes;
create table shapes.bad_calls (id bigint primary key, direction integer, appointment_made text);
create table shapes.bad_appointments (id bigint primary key, call_id text);
create view shapes.calls_view as select * from public.calls;

select throws_ok($$select booking_guard.attach(null, 'appointments')$$, 'BG005', 'attach() needs both tables',
                 'null table: BG005');
select throws_ok($$select booking_guard.attach('calls', 'calls')$$, 'BG003', null, 'same table twice: BG003');
select throws_ok($$select booking_guard.attach('shapes.calls_view', 'appointments')$$, 'BG003', null, 'a view: BG003');
select throws_ok($$select booking_guard.attach('shapes.bad_calls', 'shapes.bad_appointments')$$, 'BG003',
                 'cannot attach booking_guard to shapes.bad_calls and shapes.bad_appointments: 26 problem(s)',
                 'bad shapes: BG003 counting every problem');

-- the DETAIL lists each problem, one per line
create function pg_temp.attach_detail(c regclass, a regclass) returns text language plpgsql as $$
declare d text;
begin
    perform booking_guard.attach(c, a);
    return null;
exception when sqlstate 'BG003' then
    get stacked diagnostics d = pg_exception_detail;
    return d;
end $$;
select matches(pg_temp.attach_detail('shapes.bad_calls', 'shapes.bad_appointments'),
               'calls table shapes.bad_calls: column direction is integer, expected text or character varying',
               'DETAIL names a mistyped column with its type');
select matches(pg_temp.attach_detail('shapes.bad_calls', 'shapes.bad_appointments'),
               'calls table shapes.bad_calls: missing column session_outcome',
               'DETAIL names a missing column');
select matches(pg_temp.attach_detail('shapes.bad_calls', 'shapes.bad_appointments'),
               'appointments table shapes.bad_appointments: column call_id is text, expected integer or bigint',
               'DETAIL names a mistyped appointments column');
select is(array_length(string_to_array(pg_temp.attach_detail('shapes.bad_calls', 'shapes.bad_appointments'), E'\n'), 1),
          26, 'one DETAIL line per problem');
create table shapes.calls_no_key (like public.calls);
select matches(pg_temp.attach_detail('shapes.calls_no_key', 'appointments'),
               'column id is not a primary key or unique', 'calls.id must be a key');
select is_empty('select * from booking_guard.attached_tables', 'failed attach() calls recorded nothing');

-- success
select lives_ok($$select booking_guard.attach('public.calls', 'public.appointments')$$, 'attach the reference tables');
select results_eq($$select calls_table, appointments_table from booking_guard.attachment$$,
                  $$values ('calls'::regclass, 'appointments'::regclass)$$, 'the attachment is recorded');
select has_index('public', 'appointments', 'appointments_call_id_bg_idx', array['call_id'],
                 'attach creates the appointments(call_id) index');
select has_index('public', 'calls', 'calls_created_at_bg_idx', array['created_at'],
                 'attach creates the calls(created_at) index');
select is((select cardinality(created_indexes) from booking_guard.attachment), 5, 'five indexes created');
select lives_ok($$select booking_guard.attach('public.calls', 'public.appointments')$$, 'attaching twice is a no-op');
select throws_ok($$select booking_guard.attach('shapes.calls_no_key', 'appointments')$$, 'BG003',
                 'booking_guard is already attached to other tables', 'attaching other tables while attached: BG003');

select lives_ok($$select booking_guard.detach()$$, 'detach');
select is_empty('select * from booking_guard.attachment', 'detach forgets the attachment');

select * from finish();
rollback;
