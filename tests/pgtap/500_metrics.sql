-- metrics() and the alert relay's outbox: objects, privileges, bad input.
begin;
select plan(19);

select has_function('booking_guard', 'metrics', array[]::text[]);
select has_function('booking_guard', 'fold_metrics', array['integer']);
select has_function('booking_guard', 'claim_alerts', array['text', 'integer', 'interval']);
select has_function('booking_guard', 'claim_digest', array['text', 'interval', 'interval']);
select has_table('booking_guard', t, 'table booking_guard.' || t)
  from unnest(array['metric_definitions', 'metric_counters', 'metric_windows', 'metric_fold_state',
                    'metric_circuit_marks', 'alert_claims', 'alert_digests']) t;

select is_empty($$
    select p.oid::regprocedure::text from pg_proc p
     where p.pronamespace = 'booking_guard'::regnamespace
       and p.proname in ('metrics', 'fold_metrics', 'fold_circuit_metrics', 'metric_label_seeds', 'histogram_le',
                         'claim_alerts', 'alerts_delivered', 'alerts_failed', 'claim_digest', 'digest_sent',
                         'digest_failed', 'relay_check')
       and (obj_description(p.oid, 'pg_proc') is null
            or not exists (select from unnest(p.proconfig) c where c like 'search_path=%'))
$$, 'every metrics and relay function has a comment and a pinned search_path');

select ok(has_function_privilege('booking_guard_monitor', 'booking_guard.metrics()', 'execute'),
          'booking_guard_monitor may scrape');
select ok(not has_function_privilege('public', 'booking_guard.metrics()', 'execute'), 'PUBLIC may not');
select ok(not has_table_privilege('booking_guard_monitor', 'booking_guard.metric_counters', 'update'),
          'the monitor role cannot change a counter');

select throws_ok($$select booking_guard.fold_metrics(0)$$, 'BG005', null, 'fold_metrics(0) is bad input');
select throws_ok($$select * from booking_guard.claim_alerts('', 10)$$, 'BG005', null, 'a relay needs a name');
select throws_ok($$select * from booking_guard.claim_digest('r', '0 seconds')$$, 'BG005', null,
                 'a digest period must be positive');

-- a read-only transaction (a standby, a read-only scraper) reads the metrics without folding
set local transaction_read_only = on;
select is((select count(*) > 0 from booking_guard.metrics()), true, 'metrics() answers in a read-only transaction');

select * from finish();
rollback;
