-- Detection, reconciliation, reports, KPIs and scheduling: objects, grants, errors, and a small round trip.
begin;
select plan(51);
set local client_min_messages = warning;

-- objects
select has_type('booking_guard', 'finding', 'type finding');
select columns_are('booking_guard', 'finding', array['rule', 'severity', 'entity_type', 'entity_id', 'details'],
                   'finding(rule, severity, entity_type, entity_id, details)');
select has_function('booking_guard', 'detect', array['interval']);
select has_function('booking_guard', 'detect_rule', array['text', 'interval']);
select has_function('booking_guard', 'check_call', array['bigint']);
select has_function('booking_guard', 'run_monitor', array['interval']);
select has_function('booking_guard', 'reconcile', array['integer']);
select has_function('booking_guard', 'daily_report', array['date']);
select has_function('booking_guard', 'daily_report_json', array['date']);
select has_function('booking_guard', 'store_daily_report', array['date']);
select has_function('booking_guard', 'kpis', array['interval']);
select has_function('booking_guard', 'schedule_jobs', array['text']);
select has_function('booking_guard', 'unschedule_jobs', array['text']);
select has_function('booking_guard', 'job_status', array[]::text[]);
select has_function('booking_guard', 'help', array[]::text[]);
select has_table('booking_guard', t, 'table booking_guard.' || t)
  from unnest(array['reconciliation_runs', 'reports', 'jobs', 'job_runs', 'rules']) t;
select has_view('booking_guard', 'inconsistencies', 'view inconsistencies');
select is_empty($$select r.name from booking_guard.rules r
                   where to_regclass('booking_guard.' || r.name || '_findings') is null$$, 'one view per built-in rule');
select is_empty($$select r.name from booking_guard.rules r
                   where r.entity_type is null or r.source is null or r.default_mode is null or r.label is null
                      or r.alert_text is null or r.action is null or (r.repair is null) <> (r.repair_kind is null)$$,
                'every built-in rule''s row holds its whole definition');
select results_eq($$select severity, mode, description from booking_guard.rules where name = 'recent_failures'$$,
                  $$values ('warning', 'observe',
                            'validation failures in the window: calls whose validate_appointment_creation() failed (events of kind validation with success false)')$$,
                  'recent_failures: warning, observe');
select col_is_pk('booking_guard', 'reports', 'day', 'one report per day');

-- privileges
select ok(has_function_privilege('booking_guard_monitor', 'booking_guard.detect(interval)', 'execute'), 'monitor may detect');
select ok(has_function_privilege('booking_guard_monitor', 'booking_guard.check_call(bigint)', 'execute'), 'monitor may check a call');
select ok(has_function_privilege('booking_guard_monitor', 'booking_guard.kpis(interval)', 'execute'), 'monitor may read KPIs');
select ok(has_function_privilege('booking_guard_monitor', 'booking_guard.daily_report(date)', 'execute'), 'monitor may read the report');
select ok(has_table_privilege('booking_guard_monitor', 'booking_guard.inconsistencies', 'select'), 'monitor may read inconsistencies');
select ok(has_table_privilege('booking_guard_monitor', 'booking_guard.phantom_booking_findings', 'select'), 'monitor may read a rule view');
select ok(not has_function_privilege('booking_guard_monitor', 'booking_guard.run_monitor(interval)', 'execute'), 'monitor may not run the monitor');
select ok(not has_function_privilege('booking_guard_monitor', 'booking_guard.reconcile(integer)', 'execute'), 'monitor may not reconcile');
select ok(has_function_privilege('booking_guard_admin', 'booking_guard.reconcile(integer)', 'execute'), 'admin may reconcile');
select ok(has_function_privilege('booking_guard_admin', 'booking_guard.schedule_jobs(text)', 'execute'), 'admin may schedule');
select ok(not has_function_privilege('booking_guard_app', 'booking_guard.detect(interval)', 'execute'), 'app may not detect');
select is_empty($$select p.oid::regprocedure::text from pg_proc p
                   where p.oid in ('booking_guard.detect(interval)'::regprocedure, 'booking_guard.check_call(bigint)'::regprocedure,
                                   'booking_guard.kpis(interval)'::regprocedure, 'booking_guard.daily_report_json(date)'::regprocedure,
                                   'booking_guard.detect_rule(text, interval)'::regprocedure)
                     and p.prosecdef$$, 'what the monitor calls reads the application with the monitor''s own rights');

-- not attached: BG003
select throws_ok($$select * from booking_guard.detect()$$, 'BG003', 'booking_guard is not attached', 'detect: BG003');
select throws_ok($$select booking_guard.reconcile()$$, 'BG003', 'booking_guard is not attached', 'reconcile: BG003');

-- attached: a small round trip
select booking_guard.attach('public.calls', 'public.appointments');
select booking_guard.set_rule('missing_direction', 'observe');
insert into companies (name) values ('pgtap');
insert into calls (retell_call_id, company_id, direction) values ('pgtap-1', (select max(id) from companies), null);
select results_eq($$select rule, entity_type from booking_guard.inconsistencies$$,
                  $$values ('missing_direction'::text, 'call'::text)$$, 'the planted call is found');
select results_eq($$select count(*)::int from booking_guard.missing_direction_findings$$, array[1], 'and in its rule view');
select throws_ok($$select * from booking_guard.detect(null)$$, 'BG005', null, 'detect(null): BG005');
select throws_ok($$select booking_guard.reconcile(0)$$, 'BG005', null, 'reconcile(0): BG005');
select is((select (booking_guard.reconcile() ->> 'fixed')::int), 0, 'observe: reconcile leaves it alone');
select booking_guard.set_rule('missing_direction', 'correct');
select is((select (booking_guard.reconcile() ->> 'directions')::int), 1, 'correct: reconcile sets the direction');
select is_empty($$select * from booking_guard.inconsistencies$$, 'nothing left');
select matches(booking_guard.daily_report(), '^DATA CONSISTENCY REPORT - \d{4}-\d\d-\d\d\n=+\n\nSUMMARY\n-------\nTotal Calls: 1\n',
               'the report starts with the default layout');

-- the roles can do their job
set local role booking_guard_monitor;
select lives_ok($$select * from booking_guard.inconsistencies$$, 'monitor reads the inconsistencies');
select lives_ok($$select * from booking_guard.kpis(), booking_guard.daily_report_json(current_date)$$, 'monitor reads KPIs and the report');
select throws_ok($$select booking_guard.reconcile()$$, '42501', null, 'monitor may not reconcile');
reset role;
set local role booking_guard_admin;
select lives_ok($$select booking_guard.run_monitor(), booking_guard.reconcile()$$, 'admin runs the monitor and reconciles');
reset role;

select * from finish();
rollback;
