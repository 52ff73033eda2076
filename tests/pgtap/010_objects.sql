-- Every object the extension creates, its column types, comments and privileges.
begin;
select plan(68);

select has_schema('booking_guard');
select has_schema('booking_guard_internal');
select has_extension('booking_guard');

-- tables and views
select has_table('booking_guard', t, 'table booking_guard.' || t)
  from unnest(array['settings', 'rules', 'required_columns', 'required_indexes', 'attached_tables']) t;
select has_view('booking_guard', 'attachment', 'view booking_guard.attachment');

-- functions, with their signatures
select has_function('booking_guard', 'setting', array['text']);
select has_function('booking_guard', 'set_setting', array['text', 'text']);
select has_function('booking_guard', 'set_rule', array['text', 'text', 'integer', 'text']);
select has_function('booking_guard', 'rule_mode', array['text', 'text']);
select has_function('booking_guard', 'rollout_bucket', array['text']);
select has_function('booking_guard', 'attach', array['regclass', 'regclass']);
select has_function('booking_guard', 'detach', array[]::text[]);
select has_function('booking_guard_internal', 'attached', array[]::text[]);
select has_function('booking_guard_internal', 'attachment_problems', array['text', 'regclass']);
select has_function('booking_guard', 'environment', array[]::text[]);
select has_function('booking_guard_internal', 'replace_seeded_row', array[]::text[]);
select function_lang_is('booking_guard', 'environment', array[]::text[], 'plpython3u');
select function_lang_is('booking_guard', 'set_setting', array['text', 'text'], 'plpgsql');

-- column types
select col_type_is('booking_guard', 'settings', 'interval_value', 'interval', 'settings.interval_value is interval');
select col_type_is('booking_guard', 'settings', 'integer_value', 'bigint', 'settings.integer_value is bigint');
select col_type_is('booking_guard', 'settings', 'boolean_value', 'boolean', 'settings.boolean_value is boolean');
select col_is_pk('booking_guard', 'settings', 'name', 'settings.name is the primary key');
select col_type_is('booking_guard', 'rules', 'rollout_percent', 'integer', 'rules.rollout_percent is integer');
select col_type_is('booking_guard', 'rules', 'mode', 'text', 'rules.mode is text');
select col_is_pk('booking_guard', 'rules', 'name', 'rules.name is the primary key');
select col_type_is('booking_guard', 'attached_tables', 'calls_table', 'regclass', 'attached_tables.calls_table is regclass');
select col_type_is('booking_guard', 'attached_tables', 'appointments_table', 'regclass', 'attached_tables.appointments_table is regclass');
select col_type_is('booking_guard', 'attached_tables', 'created_indexes', 'text[]', 'attached_tables.created_indexes is text[]');
select columns_are('booking_guard', 'attachment',
                   array['calls_table', 'appointments_table', 'attached_at', 'attached_by', 'created_indexes', 'triggers']);
select has_check('booking_guard', 'settings', 'settings has CHECK constraints');
select has_check('booking_guard', 'rules', 'rules has CHECK constraints');

-- seeds
select is_empty($$select unnest(array['phantom_booking', 'missing_appointment', 'missing_direction',
                                       'orphaned_appointment', 'outcome_flag_mismatch', 'unlinked_appointment',
                                       'booking_id_mismatch', 'duplicate_booking', 'customer_link'])
                  except select name from booking_guard.rules$$,
                'the built-in rules are seeded');
select results_eq($$select severity, mode from booking_guard.rules where name = 'phantom_booking'$$,
                  $$values ('critical', 'correct')$$, 'phantom_booking: critical, correct');
select results_eq($$select severity, mode from booking_guard.rules where name = 'duplicate_booking'$$,
                  $$values ('critical', 'observe')$$, 'duplicate_booking: critical, observe');
select results_eq($$select booking_guard.setting('verification_grace'), booking_guard.setting('default_direction')$$,
                  $$values ('00:00:05', 'inbound')$$, 'seed settings: 5 s grace, inbound');

-- config tables are kept by pg_dump
select is_empty($$select unnest(array['booking_guard.settings', 'booking_guard.rules', 'booking_guard.attached_tables',
                                       'booking_guard.review_priorities'])
                  except
                  select unnest(extconfig)::regclass::text from pg_extension where extname = 'booking_guard'$$,
                'settings, rules, the attachment and review priorities are pg_dump config tables');

-- roles
select has_role(r) from unnest(array['booking_guard_app', 'booking_guard_monitor', 'booking_guard_admin',
                                       'booking_guard_serve', 'booking_guard_owner', 'booking_guard_worker']) r;
select is_member_of('booking_guard_monitor', array['booking_guard_admin', 'booking_guard_serve']);

-- every function documented, none executable by PUBLIC
select is_empty($$select p.oid::regprocedure::text from pg_proc p
                   where p.pronamespace in ('booking_guard'::regnamespace, 'booking_guard_internal'::regnamespace)
                     and obj_description(p.oid, 'pg_proc') is null$$,
                'every function has a COMMENT ON');
select is_empty($$select p.oid::regprocedure::text from pg_proc p
                   where p.pronamespace in ('booking_guard'::regnamespace, 'booking_guard_internal'::regnamespace)
                     and (p.proacl is null or exists (select from aclexplode(p.proacl) a where a.grantee = 0))
                     and p.oid not in ('booking_guard_internal.claim_check_needed(bigint)'::regprocedure,
                                       'booking_guard_internal.commit_check_possible()'::regprocedure)$$,
                'no function but the truth checks'' WHEN clauses is executable by PUBLIC');
select ok(has_function_privilege('public', 'booking_guard_internal.claim_check_needed(bigint)', 'execute'),
          'the WHEN clause of the calls-side truth check runs as any role that writes calls');
select is_empty($$select c.oid::regclass::text from pg_class c
                   where c.relnamespace in ('booking_guard'::regnamespace, 'booking_guard_internal'::regnamespace)
                     and c.relkind in ('r', 'v')
                     and exists (select from aclexplode(c.relacl) a where a.grantee = 0)$$,
                'no table or view is granted to PUBLIC');
-- validation_verdict() alone does not: it runs no query and resolves no name, and a SET clause
-- would cost a setting's save and restore on every booking. It must stay harmless without one: not
-- SECURITY DEFINER, and no SQL in its body (plpy.execute, plpy.prepare, plpy.cursor).
select is_empty($$select p.oid::regprocedure::text from pg_proc p
                   where p.pronamespace in ('booking_guard'::regnamespace, 'booking_guard_internal'::regnamespace)
                     and p.prolang <> (select oid from pg_language where lanname = 'c')
                     and p.oid <> 'booking_guard_internal.validation_verdict(bigint, bigint, text, float8, boolean, text, text, bigint, bigint, text, text, float8, float8)'::regprocedure
                     and not exists (select from unnest(p.proconfig) c where c = 'search_path=pg_catalog, pg_temp')$$,
                'every SQL, PL/pgSQL and PL/Python function but validation_verdict() pins search_path = pg_catalog, pg_temp');
select ok(not p.prosecdef and p.prosrc !~ 'plpy\.(execute|prepare|cursor)'
          and not exists (select from unnest(p.proconfig) c where c like 'search_path=%'),
          'validation_verdict() runs with its caller''s rights and no query: no search_path to pin')
  from pg_proc p
 where p.oid = 'booking_guard_internal.validation_verdict(bigint, bigint, text, float8, boolean, text, text, bigint, bigint, text, text, float8, float8)'::regprocedure;
-- C functions resolve no name through search_path: every query they run is schema-qualified
-- down to its operators. None is SECURITY DEFINER: where they need rights they switch to
-- booking_guard_worker around their queries (a declared rule's SQL: to its role).
select is(array_agg(p.proname::text order by p.proname),
          array['appointments_sync', 'appointments_truth_check', 'attachment_changed', 'calls_before', 'calls_truth_check',
                'claim_check_needed', 'commit_check_possible', 'declared_matches', 'declared_repair', 'record_booking',
                'rule_mode', 'rules_changed', 'run_job', 'run_job_steps', 'store_declared_rule'],
          'the C functions, none of them SECURITY DEFINER')
  from pg_proc p join pg_language l on l.oid = p.prolang and l.lanname = 'c'
 where p.pronamespace in ('booking_guard'::regnamespace, 'booking_guard_internal'::regnamespace) and not p.prosecdef;
select is_empty($$select p.oid::regprocedure::text from pg_proc p
                   where p.pronamespace in ('booking_guard'::regnamespace, 'booking_guard_internal'::regnamespace)
                     and p.prolang = (select oid from pg_language where lanname = 'c')
                     and p.probin <> '$libdir/booking_guard-' || (select extversion from pg_extension where extname = 'booking_guard')$$,
                'every C function is in the library of this version');

-- grants per role
select ok(has_function_privilege('booking_guard_admin', 'booking_guard.set_setting(text, text)', 'execute'),
          'admin may change settings');
select ok(not has_function_privilege('booking_guard_app', 'booking_guard.set_setting(text, text)', 'execute'),
          'app may not change settings');
select ok(not has_function_privilege('booking_guard_monitor', 'booking_guard.set_rule(text, text, integer, text)', 'execute'),
          'monitor may not change rules');
select ok(has_function_privilege('booking_guard_admin', 'booking_guard.attach(regclass, regclass)', 'execute'),
          'admin may attach');
select ok(not has_function_privilege('booking_guard_app', 'booking_guard.attach(regclass, regclass)', 'execute'),
          'app may not attach');
select ok(has_function_privilege('booking_guard_monitor', 'booking_guard.setting(text)', 'execute'),
          'monitor may read settings');
select ok(has_table_privilege('booking_guard_monitor', 'booking_guard.rules', 'select'), 'monitor may read rules');
select ok(not has_table_privilege('booking_guard_monitor', 'booking_guard.rules', 'update'), 'monitor may not update rules');
select ok(has_table_privilege('booking_guard_admin', 'booking_guard.attachment', 'select'), 'admin reads the attachment');
select ok(not has_table_privilege('booking_guard_app', 'booking_guard.settings', 'update'), 'app may not update settings');
select ok(has_schema_privilege('booking_guard_app', 'booking_guard', 'usage'), 'app may use the schema');

-- environment() reports the running versions
select is((select version from booking_guard.environment() where component = 'booking_guard'),
          (select extversion from pg_extension where extname = 'booking_guard'), 'environment() reports the extension version');
select is((select version from booking_guard.environment() where component = 'postgresql'),
          current_setting('server_version'), 'environment() reports the server version');

select * from finish();
rollback;
