-- Circuit breaker: objects, the behavioural scenarios of a breaker (closed, open, half-open and back; time
-- moved with booking_guard.clock_offset, never slept through), policies, errors. Concurrency is in pytest.
begin;
select plan(145);
set local client_min_messages = warning;

-- The breaker's clock reads `t` from now on (clock_timestamp() plus an offset, so it keeps running:
-- the microseconds between two statements are the only drift).
create function pg_temp.clock_at(t timestamptz) returns void language sql as $$
    select set_config('booking_guard.clock_offset', (t - clock_timestamp())::text, true)
$$;
create function pg_temp.clock_reset() returns void language sql as $$
    select set_config('booking_guard.clock_offset', '', true)
$$;
create function pg_temp.b(k text) returns booking_guard.circuit_breakers language sql as $$
    select * from booking_guard.circuit_breakers where key = k
$$;
create function pg_temp.fail(k text, n integer) returns text language plpgsql as $$
declare s text;
begin
    for i in 1 .. n loop
        s := booking_guard.circuit_record_failure(k, 'boom ' || i);
    end loop;
    return s;
end $$;
create function pg_temp.transitions(k text) returns text language sql as $$
    select coalesce(string_agg(from_state || '>' || to_state, ' ' order by id), '')
      from booking_guard.circuit_transitions where key = k
$$;
create table pg_temp.permits (name text primary key, permit bigint);
create function pg_temp.keep(name text, permit bigint) returns bigint language sql as $$
    insert into pg_temp.permits values (name, permit) on conflict (name) do update set permit = excluded.permit;
    select permit
$$;
create function pg_temp.p(n text) returns bigint language sql as $$ select permit from pg_temp.permits where name = n $$;

-- ---- objects
select has_table('booking_guard', t, 'table booking_guard.' || t)
  from unnest(array['circuit_policies', 'circuit_breakers', 'circuit_transitions', 'circuit_permits']) t;
select has_view('booking_guard', v, 'view booking_guard.' || v) from unnest(array['circuit_status', 'circuit_recoveries']) v;
select columns_are('booking_guard', 'circuit_policies',
                   array['key_pattern', 'failure_threshold', 'cooldown', 'success_threshold', 'half_open_max_calls', 'call_timeout',
                         'sliding_window_type', 'sliding_window_size', 'minimum_number_of_calls', 'failure_rate_threshold',
                         'slow_call_rate_threshold', 'slow_call_duration_threshold'],
                   'circuit_policies has the fixed columns and the window options');
select columns_are('booking_guard', 'circuit_breakers',
                   array['key', 'state', 'failure_count', 'success_count', 'last_failure_at', 'opened_at', 'closed_at',
                         'forced_until', 'updated_at', 'window_type', 'last_transition_id'],
                   'circuit_breakers has the fixed columns, its window''s type and its latest transition');
select columns_are('booking_guard', 'circuit_transitions', array['id', 'key', 'from_state', 'to_state', 'at', 'reason'],
                   'circuit_transitions has its documented columns');
select col_type_is('booking_guard', 'circuit_policies', 'cooldown', 'interval', 'cooldown is an interval');
select col_type_is('booking_guard', 'circuit_breakers', 'opened_at', 'timestamp with time zone', 'opened_at is timestamptz');
select has_function('booking_guard', 'circuit_acquire', array['text']);
select has_function('booking_guard', 'circuit_record_success', array['text', 'bigint', 'interval']);
select has_function('booking_guard', 'circuit_record_failure', array['text', 'text', 'bigint', 'interval']);
select has_function('booking_guard', 'circuit_state', array['text']);
select has_function('booking_guard', 'circuit_reset', array['text']);
select has_function('booking_guard', 'circuit_force_open', array['text', 'timestamp with time zone']);
select function_returns('booking_guard', 'circuit_acquire', array['text'], 'bigint');
select results_eq($$select key_pattern, failure_threshold, cooldown, success_threshold, half_open_max_calls, call_timeout
                     from booking_guard.circuit_policies$$,
                  $$values ('%', 3, interval '30 seconds', 2, 1, interval '10 seconds')$$,
                  'the default policy row % carries the default values');
select ok((select extconfig @> array['booking_guard.circuit_policies'::regclass, 'booking_guard.circuit_breakers'::regclass,
                                     'booking_guard.circuit_transitions'::regclass, 'booking_guard.circuit_seq'::regclass]::oid[]
             from pg_extension where extname = 'booking_guard'),
          'policies, breakers, transitions and the permit sequence are kept by pg_dump');
select ok(has_function_privilege('booking_guard_app', 'booking_guard.circuit_acquire(text)', 'execute'), 'app may acquire');
select ok(has_function_privilege('booking_guard_app', 'booking_guard.circuit_record_failure(text, text, bigint, interval)', 'execute'),
          'app may record failures');
select ok(not has_function_privilege('booking_guard_app', 'booking_guard.circuit_reset(text)', 'execute'), 'app may not reset');
select ok(not has_table_privilege('booking_guard_app', 'booking_guard.circuit_breakers', 'update'),
          'app may not write breaker rows directly');
select ok(has_table_privilege('booking_guard_monitor', 'booking_guard.circuit_status', 'select'), 'monitor reads circuit_status');
select ok(not has_function_privilege('booking_guard_monitor', 'booking_guard.circuit_acquire(text)', 'execute'),
          'monitor may not acquire');
select ok(has_function_privilege('booking_guard_admin', 'booking_guard.circuit_force_open(text, timestamptz)', 'execute'),
          'admin may force a breaker open');
select ok(has_table_privilege('booking_guard_admin', 'booking_guard.circuit_policies', 'update'), 'admin may change policies');
select ok(not has_table_privilege('booking_guard_monitor', 'booking_guard.circuit_policies', 'update'),
          'monitor may not change policies');

-- ---- 1. a success while closed: stays closed, no failures
select ok(booking_guard.circuit_acquire('s1') > 0, '1: closed admits');
select is(booking_guard.circuit_record_success('s1', booking_guard.circuit_acquire('s1')), 'closed', '1: success keeps it closed');
select is((pg_temp.b('s1')).failure_count, 0, '1: no failures');

-- ---- 2. F F S F F: the success ends the streak
select is(pg_temp.fail('s2', 2), 'closed', '2: two failures leave it closed');
select is(booking_guard.circuit_record_success('s2'), 'closed', '2: success');
select is((pg_temp.b('s2')).failure_count, 0, '2: the success reset the streak');
select is(pg_temp.fail('s2', 2), 'closed', '2: F F S F F is still closed');
select is((pg_temp.b('s2')).failure_count, 2, '2: failure count 2');

-- ---- 3. F F F: open, opened_at = now
select is(pg_temp.fail('s3', 3), 'open', '3: the third consecutive failure opens it');
select ok((pg_temp.b('s3')).opened_at between clock_timestamp() - interval '5 seconds' and clock_timestamp(), '3: opened_at is now');
select is(pg_temp.transitions('s3'), 'closed>open', '3: one closed->open transition');
select matches((select reason from booking_guard.circuit_transitions where key = 's3'),
               '^failure_threshold: 3 consecutive failures: boom 3$', '3: the reason carries the code and the last error');

-- ---- 4. rejected while open: not failures, opened_at does not move, counted as fast fails
select pg_temp.keep('ff', booking_guard.circuit_fast_fail_total());
select throws_ok($$select booking_guard.circuit_acquire('s3')$$, 'BG001', 'circuit breaker "s3" is open: call rejected',
                 '4: open rejects with BG001');
select throws_ok($$select booking_guard.circuit_acquire('s3')$$, 'BG001', null, '4: and again');
select is(booking_guard.circuit_fast_fail_total(), pg_temp.p('ff') + 2, '4: both rejections counted as fast fails (survive the rollback)');
select is((pg_temp.b('s3')).failure_count, 3, '4: rejections are not failures');
select is(pg_temp.transitions('s3'), 'closed>open', '4: rejections add no transition');

-- ---- 5. the cooldown boundary: +29.9 s rejected, +30.1 s admitted
select pg_temp.clock_at((pg_temp.b('s3')).opened_at + interval '29.9 seconds');
select throws_ok($$select booking_guard.circuit_acquire('s3')$$, 'BG001', null, '5: +29.9 s is still open');
select is(booking_guard.circuit_state('s3'), 'open', '5: circuit_state at +29.9 s: open');
select pg_temp.clock_at((pg_temp.b('s3')).opened_at + interval '30.1 seconds');
select ok(booking_guard.circuit_acquire('s3') > 0, '5: +30.1 s admits a trial call');
select is((pg_temp.b('s3')).state, 'half_open', '5: and the breaker is half-open');
select pg_temp.clock_reset();

-- ---- 6. the lazy transition: reads say half_open without writing; the first call writes exactly one
select is(pg_temp.fail('s6', 3), 'open', '6: opened');
select pg_temp.clock_at((pg_temp.b('s6')).opened_at + interval '31 seconds');
select is(booking_guard.circuit_state('s6'), 'half_open', '6: an open breaker past its cooldown reads half_open');
select is(booking_guard.circuit_state('s6'), 'half_open', '6: read twice');
select is((select state from booking_guard.circuit_status where key = 's6'), 'half_open', '6: circuit_status agrees');
select is((select retry_after from booking_guard.circuit_status where key = 's6'), null, '6: no retry-after: a call would be admitted');
select is((select last_transition from booking_guard.circuit_status where key = 's6'), 'open -> half_open',
          '6: circuit_status shows the pending transition as the last one');
select is((pg_temp.b('s6')).state, 'open', '6: reading wrote nothing');
select is(pg_temp.transitions('s6'), 'closed>open', '6: reading added no transition');
select pg_temp.keep('s6', booking_guard.circuit_acquire('s6'));
select is(pg_temp.transitions('s6'), 'closed>open open>half_open', '6: the first call wrote exactly one open->half_open');
select is((select at from booking_guard.circuit_transitions where key = 's6' and to_state = 'half_open'),
          (pg_temp.b('s6')).opened_at + interval '30 seconds', '6: dated when the cooldown ended, not when noticed');
select is((select reason from booking_guard.circuit_transitions where key = 's6' and to_state = 'half_open'), 'cooldown_elapsed',
          '6: reason cooldown_elapsed');

-- ---- 7. half-open permit limit: one trial at a time
select throws_ok($$select booking_guard.circuit_acquire('s6')$$, 'BG001', 'circuit breaker "s6" is half_open: call rejected',
                 '7: a second trial call is rejected while the first is in progress');
select is((select trial_permits from booking_guard.circuit_status where key = 's6'), 1, '7: one trial permit outstanding');
select is((pg_temp.b('s6')).failure_count, 3, '7: the rejection is not a failure');

-- ---- 8. a failure in half-open reopens with a fresh opened_at and no successes
select pg_temp.keep('s6_opened', extract(epoch from (pg_temp.b('s6')).opened_at)::bigint);
select is(booking_guard.circuit_record_failure('s6', 'still down', pg_temp.p('s6')), 'open', '8: trial failure reopens');
select ok((pg_temp.b('s6')).opened_at = (pg_temp.b('s6')).last_failure_at
          and extract(epoch from (pg_temp.b('s6')).opened_at)::bigint >= pg_temp.p('s6_opened') + 30,
          '8: opened_at is fresh: the time of the trial''s failure');
select is((pg_temp.b('s6')).success_count, 0, '8: success count zeroed');
select is((select reason from booking_guard.circuit_transitions where key = 's6' order by id desc limit 1),
          'half_open_failure: still down', '8: reason half_open_failure with the error');
select pg_temp.clock_at((pg_temp.b('s6')).opened_at + interval '29 seconds');
select throws_ok($$select booking_guard.circuit_acquire('s6')$$, 'BG001', null, '8: still rejected 29 s after reopening');
select pg_temp.clock_reset();

-- ---- 9. closing: two consecutive trial successes
select is(pg_temp.fail('s9', 3), 'open', '9: opened');
select pg_temp.clock_at((pg_temp.b('s9')).opened_at + interval '31 seconds');
select pg_temp.keep('s9a', booking_guard.circuit_acquire('s9'));
select is(booking_guard.circuit_record_success('s9', pg_temp.p('s9a')), 'half_open', '9: one success: still half-open');
select is((pg_temp.b('s9')).success_count, 1, '9: success count 1');
select pg_temp.keep('s9b', booking_guard.circuit_acquire('s9'));
select ok(pg_temp.p('s9b') > pg_temp.p('s9a'), '9: the finished trial freed its slot for the next one');
select is(booking_guard.circuit_record_success('s9', pg_temp.p('s9b')), 'closed', '9: the second success closes it');
select results_eq($$select state, failure_count, success_count, closed_at is not null from booking_guard.circuit_breakers where key = 's9'$$,
                  $$values ('closed', 0, 0, true)$$, '9: closed with zeroed counters and closed_at');

-- ---- 11. the transition log: exactly the state changes, no same-state rows
select is(pg_temp.transitions('s9'), 'closed>open open>half_open half_open>closed', '11: closed->open->half_open->closed exactly');
select is((select count(*)::integer from booking_guard.circuit_transitions where from_state = to_state), 0, '11: no same-state row');
select is((select opened_total from booking_guard.circuit_status where key = 's9'), 1::bigint, '11: opened once');
select is((select round(recovery_seconds) from booking_guard.circuit_recoveries where key = 's9'), 31::double precision,
          '11: recovery time from opening to closing (31 s)');
select pg_temp.clock_reset();

-- ---- 12. late results
select pg_temp.keep('s12_old', booking_guard.circuit_acquire('s12'));   -- granted while closed, reported late
select is(pg_temp.fail('s12', 3), 'open', '12: opened');
select pg_temp.keep('s12_opened', (extract(epoch from (pg_temp.b('s12')).opened_at) * 1e6)::bigint);
select is(booking_guard.circuit_record_failure('s12', 'late', pg_temp.p('s12_old')), 'open', '12: a late failure while open');
select is((extract(epoch from (pg_temp.b('s12')).opened_at) * 1e6)::bigint, pg_temp.p('s12_opened'), '12: does not move opened_at');
select is(pg_temp.transitions('s12'), 'closed>open', '12: nor add a transition');
select is(booking_guard.circuit_record_success('s12', pg_temp.p('s12_old')), 'open', '12: a late success does not close it');
select is(booking_guard.circuit_record_success('s12'), 'open', '12: nor does one without a permit');
select pg_temp.clock_at((pg_temp.b('s12')).opened_at + interval '31 seconds');
select pg_temp.keep('s12_trial', booking_guard.circuit_acquire('s12'));
select is(booking_guard.circuit_record_success('s12', pg_temp.p('s12_old')), 'half_open',
          '12: in half-open, the pre-open permit''s success is ignored');
select is((pg_temp.b('s12')).success_count, 0, '12: it did not count toward closing');
select is(booking_guard.circuit_record_failure('s12', 'late', pg_temp.p('s12_old')), 'half_open',
          '12: nor does its failure reopen the breaker');
select is(booking_guard.circuit_record_success('s12'), 'half_open', '12: a result without a permit is the trial''s');
select is((pg_temp.b('s12')).success_count, 1, '12: and it counted');
select is((select trial_permits from booking_guard.circuit_status where key = 's12'), 0, '12: the trial permit is released');
select pg_temp.clock_reset();

-- ---- 13. reset
select is((booking_guard.circuit_reset('s3')).state, 'closed', '13: reset closes a tripped breaker');
select results_eq($$select state, failure_count, success_count, forced_until from booking_guard.circuit_breakers where key = 's3'$$,
                  $$values ('closed', 0, 0, null::timestamptz)$$, '13: with zeroed counters');
select matches((select reason from booking_guard.circuit_transitions where key = 's3' order by id desc limit 1),
               '^reset by ', '13: the transition says who reset it');
select ok(booking_guard.circuit_acquire('s3') > 0, '13: admits again');
select pg_temp.keep('s3_n', (select count(*) from booking_guard.circuit_transitions where key = 's3'));
select is((booking_guard.circuit_reset('s3')).state, 'closed', '13: resetting a closed breaker');
select is((select count(*) from booking_guard.circuit_transitions where key = 's3'), pg_temp.p('s3_n'), '13: adds no transition');
select throws_ok($$select booking_guard.circuit_reset('no such key')$$, 'BG004', 'unknown circuit breaker "no such key"',
                 '13: reset of an unknown key: BG004');

-- ---- 14. forced open
select is((booking_guard.circuit_force_open('s14', clock_timestamp() + interval '1 hour')).state, 'open', '14: forced open');
select pg_temp.clock_at((pg_temp.b('s14')).opened_at + interval '31 seconds');
select throws_ok($$select booking_guard.circuit_acquire('s14')$$, 'BG001', null, '14: rejects after the cooldown');
select is(booking_guard.circuit_state('s14'), 'open', '14: and reads open');
select pg_temp.clock_at((pg_temp.b('s14')).forced_until + interval '1 second');
select is(booking_guard.circuit_state('s14'), 'half_open', '14: half-open once the forced time has passed');
select ok(booking_guard.circuit_acquire('s14') > 0, '14: then admits a trial');
select is((select reason from booking_guard.circuit_transitions where key = 's14' and to_state = 'half_open'), 'forced_until_passed',
          '14: reason forced_until_passed');
select pg_temp.clock_reset();
select is((booking_guard.circuit_force_open('s14b')).forced_until, 'infinity'::timestamptz, '14: without a time: until reset');
select pg_temp.keep('s14b_n', (select count(*) from booking_guard.circuit_transitions where key = 's14b'));
select is((booking_guard.circuit_force_open('s14b')).state, 'open', '14: forcing an open breaker again');
select is((select count(*) from booking_guard.circuit_transitions where key = 's14b'), pg_temp.p('s14b_n'), '14: adds no transition');
select pg_temp.clock_at(clock_timestamp() + interval '1 year');
select throws_ok($$select booking_guard.circuit_acquire('s14b')$$, 'BG001', null, '14: still rejected a year later');
select is((select retry_after from booking_guard.circuit_status where key = 's14b'), null, '14: retry-after unknown');
select pg_temp.clock_reset();
select throws_ok($$select booking_guard.circuit_force_open('s14c', clock_timestamp() - interval '1 second')$$, 'BG005', null,
                 '14: forcing open until a past time: BG005');
select is((select count(*) from booking_guard.circuit_breakers where key = 's14c'), 0::bigint, '14: and writes nothing');

-- ---- 15. a trial permit not reported within call_timeout counts as a failure
select is(pg_temp.fail('s15', 3), 'open', '15: opened');
select pg_temp.clock_at((pg_temp.b('s15')).opened_at + interval '31 seconds');
select pg_temp.keep('s15', booking_guard.circuit_acquire('s15'));
select pg_temp.keep('s15_expiry', (select (extract(epoch from expires_at) * 1e6)::bigint from booking_guard.circuit_permits
                                    where permit = pg_temp.p('s15')));
select pg_temp.clock_at(to_timestamp(pg_temp.p('s15_expiry') / 1e6) - interval '0.1 seconds');
select is(booking_guard.circuit_state('s15'), 'half_open', '15: within the call timeout: still half-open');
select pg_temp.clock_at(to_timestamp(pg_temp.p('s15_expiry') / 1e6) + interval '0.1 seconds');
select is(booking_guard.circuit_state('s15'), 'open', '15: past the call timeout the unreported trial is a failure: open');
select throws_ok($$select booking_guard.circuit_acquire('s15')$$, 'BG001', 'circuit breaker "s15" is open: call rejected',
                 '15: and rejects (cooldown from the lease''s end)');
select pg_temp.clock_at(to_timestamp(pg_temp.p('s15_expiry') / 1e6) + interval '30.1 seconds');
select is(booking_guard.circuit_state('s15'), 'half_open', '15: half-open again a cooldown after the lease ended');
select ok(booking_guard.circuit_acquire('s15') > pg_temp.p('s15'), '15: a new trial is admitted: the breaker is not wedged');
select is(pg_temp.transitions('s15'), 'closed>open open>half_open half_open>open open>half_open',
          '15: the log has the timeout''s reopening');
select is((select (extract(epoch from at) * 1e6)::bigint from booking_guard.circuit_transitions
            where key = 's15' and from_state = 'half_open'), pg_temp.p('s15_expiry'), '15: dated at the lease''s end');
select matches((select reason from booking_guard.circuit_transitions where key = 's15' and from_state = 'half_open'),
               '^call_timeout: ', '15: reason call_timeout');
select is(booking_guard.circuit_record_success('s15', pg_temp.p('s15')), 'half_open', '15: the expired permit''s result comes too late');
select is((pg_temp.b('s15')).success_count, 0, '15: and does not count');
select pg_temp.clock_reset();

-- ---- 16. keys are isolated
select is(pg_temp.fail('appointment_booking:service:1', 3), 'open', '16: service:1 opened');
select is(booking_guard.circuit_state('appointment_booking:service:2'), 'closed', '16: service:2 is still closed');
select ok(booking_guard.circuit_acquire('appointment_booking:service:2') > 0, '16: and admits');
select is((pg_temp.b('appointment_booking:service:2')).failure_count, 0, '16: with no failures');

-- ---- policies: the longest matching pattern wins
insert into booking_guard.circuit_policies (key_pattern, failure_threshold, half_open_max_calls)
values ('appointment_booking:staff:%', 5, 2), ('appointment_booking:staff:7', 1, 1);
select is((booking_guard_internal.circuit_policy('appointment_booking:staff:7')).failure_threshold, 1, 'policy: the exact key wins');
select is((booking_guard_internal.circuit_policy('appointment_booking:staff:8')).failure_threshold, 5, 'policy: then the staff pattern');
select is((booking_guard_internal.circuit_policy('appointment_booking:global')).failure_threshold, 3, 'policy: then %');
select is(booking_guard.circuit_record_failure('appointment_booking:staff:7'), 'open', 'policy: threshold 1 opens on one failure');
select is(pg_temp.fail('appointment_booking:staff:8', 4), 'closed', 'policy: threshold 5 survives four');
select is(pg_temp.fail('appointment_booking:staff:8', 1), 'open', 'policy: and opens on the fifth');
select pg_temp.clock_at((pg_temp.b('appointment_booking:staff:8')).opened_at + interval '31 seconds');
select ok(booking_guard.circuit_acquire('appointment_booking:staff:8') > 0 and booking_guard.circuit_acquire('appointment_booking:staff:8') > 0,
          'policy: half_open_max_calls 2 admits two trials');
select throws_ok($$select booking_guard.circuit_acquire('appointment_booking:staff:8')$$, 'BG001', null, 'policy: and rejects the third');
select pg_temp.clock_reset();
select throws_ok($$insert into booking_guard.circuit_policies (key_pattern, failure_threshold) values ('x%', 0)$$, 'BG005',
                 'invalid circuit breaker policy: failure_threshold is out of range', 'policy: a threshold of 0 is BG005');
select throws_ok($$update booking_guard.circuit_policies set cooldown = '-1 second' where key_pattern = '%'$$, 'BG005',
                 'invalid circuit breaker policy: cooldown is out of range', 'policy: a negative cooldown is BG005');
insert into booking_guard.circuit_policies (key_pattern, failure_threshold) values ('%', 4);
select is((select failure_threshold from booking_guard.circuit_policies where key_pattern = '%'), 4,
          'policy: inserting % again replaces the seeded row (what pg_restore does)');
delete from booking_guard.circuit_policies where key_pattern = '%';
select is((booking_guard_internal.circuit_policy('anything')).failure_threshold, 3, 'policy: without a % row the default values apply');

-- ---- bad input: BG005, nothing written
select throws_ok($$select booking_guard.circuit_acquire(null)$$, 'BG005', 'invalid circuit breaker key', 'null key: BG005');
select throws_ok($$select booking_guard.circuit_acquire('  ')$$, 'BG005', 'invalid circuit breaker key', 'blank key: BG005');
select throws_ok($$select booking_guard.circuit_record_failure(repeat('k', 256))$$, 'BG005', null, 'a 256-character key: BG005');
select throws_ok($$select booking_guard.circuit_state(E'a\nb')$$, 'BG005', null, 'a key with a newline: BG005');
select throws_ok($$select booking_guard.circuit_record_success(E'tab\there')$$, 'BG005', null, 'a success for a bad key: BG005');
select is((select count(*) from booking_guard.circuit_breakers where key !~ '\S' or length(key) > 255), 0::bigint,
          'bad keys wrote nothing');
select throws_ok($$insert into booking_guard.circuit_breakers (key) values (' ')$$, '23514', null,
                 'even a direct INSERT cannot store a bad key (CHECK), so a key with a row needs no check on the hot path');

select * from finish();
rollback;
