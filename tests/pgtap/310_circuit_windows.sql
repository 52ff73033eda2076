-- Circuit breaker windows and scopes: failure and slow-call rates over count- and time-based windows
-- (minimum number of calls, slow-call duration), half-open with rates (permitted calls, their
-- verdict, leases), policy changes, composed scopes, circuit_try_acquire, BG001's JSON DETAIL, bounds.
-- Time is a stopped clock (booking_guard.clock_at), never slept through; concurrency is in pytest.
begin;
select plan(148);
set local client_min_messages = warning;

create function pg_temp.at(t text) returns void language sql as $$
    select set_config('booking_guard.clock_at', ('2030-01-01 00:00:00+00'::timestamptz + t::interval)::text, true)
$$;
create function pg_temp.b(k text) returns booking_guard.circuit_breakers language sql as $$
    select * from booking_guard.circuit_breakers where key = k
$$;
create function pg_temp.w(k text) returns text language sql as $$
    select format('%s calls, %s failed, %s slow', calls, failures, slow_calls)
      from booking_guard_internal.circuit_windows where key = k
$$;
-- results in a row: s success, f failure, S slow success (2 minutes), F slow failure; the state after the last
create function pg_temp.run(k text, results text) returns text language plpgsql as $$
declare
    s  text;
    c  text;
begin
    if not exists (select from booking_guard.circuit_breakers where key = k) then
        perform booking_guard.circuit_acquire(k);   -- a success of a key never acquired is not recorded
    end if;
    foreach c in array regexp_split_to_array(results, '') loop
        s := case c when 's' then booking_guard.circuit_record_success(k, null, '100 ms')
                    when 'S' then booking_guard.circuit_record_success(k, null, '2 minutes')
                    when 'f' then booking_guard.circuit_record_failure(k, 'boom', null, '100 ms')
                    when 'F' then booking_guard.circuit_record_failure(k, 'boom', null, '2 minutes') end;
    end loop;
    return s;
end $$;
create function pg_temp.transitions(k text) returns text language sql as $$
    select coalesce(string_agg(from_state || '>' || to_state, ' ' order by id), '')
      from booking_guard.circuit_transitions where key = k
$$;
-- the error a statement raises, as (sqlstate, message, detail, hint, context)
create function pg_temp.err(statement text, out state text, out message text, out detail text, out hint text, out context text)
language plpgsql as $$
begin
    execute statement;
exception when others then
    get stacked diagnostics state = returned_sqlstate, message = message_text, detail = pg_exception_detail,
                            hint = pg_exception_hint, context = pg_exception_context;
end $$;
create table pg_temp.kept (name text primary key, value bigint);
create function pg_temp.keep(name text, value bigint) returns bigint language sql as $$
    insert into pg_temp.kept values (name, value) on conflict (name) do update set value = excluded.value;
    select value
$$;
create function pg_temp.k(n text) returns bigint language sql as $$ select value from pg_temp.kept where name = n $$;

select pg_temp.at('0 s');

-- ---- the options and their bounds
select results_eq($$select sliding_window_type, sliding_window_size, minimum_number_of_calls, failure_rate_threshold,
                           slow_call_rate_threshold, slow_call_duration_threshold
                      from booking_guard.circuit_policies where key_pattern = '%'$$,
                  $$values ('consecutive', 100, 100, 50.00::numeric(5, 2), 100.00::numeric(5, 2), interval '60 seconds')$$,
                  'the default policy counts consecutive failures; the rate options default to resilience4j''s');
select throws_ok($$insert into booking_guard.circuit_policies (key_pattern, sliding_window_type) values ('x:%', 'sliding')$$,
                 'BG005', 'invalid circuit breaker policy: sliding_window_type is out of range', 'an unknown window type: BG005');
select throws_ok($$insert into booking_guard.circuit_policies (key_pattern, sliding_window_type, sliding_window_size)
                   values ('x:%', 'count_based', 1001)$$,
                 'BG005', 'invalid circuit breaker policy: sliding_window_size is out of range', 'a count window above 1000 calls: BG005');
select throws_ok($$insert into booking_guard.circuit_policies (key_pattern, sliding_window_type, sliding_window_size)
                   values ('x:%', 'time_based', 3601)$$,
                 'BG005', 'invalid circuit breaker policy: sliding_window_size is out of range', 'a time window above an hour: BG005');
select lives_ok($$insert into booking_guard.circuit_policies (key_pattern, sliding_window_type, sliding_window_size)
                  values ('x:ok', 'time_based', 3600)$$, 'a time window of an hour is allowed');
select throws_ok($$insert into booking_guard.circuit_policies (key_pattern, minimum_number_of_calls) values ('x:%', 0)$$,
                 'BG005', 'invalid circuit breaker policy: minimum_number_of_calls is out of range', 'a minimum of 0 calls: BG005');
select throws_ok($$insert into booking_guard.circuit_policies (key_pattern, failure_rate_threshold) values ('x:%', 0)$$,
                 'BG005', 'invalid circuit breaker policy: failure_rate_threshold is out of range', 'a failure rate of 0 %: BG005');
select throws_ok($$insert into booking_guard.circuit_policies (key_pattern, failure_rate_threshold) values ('x:%', 100.5)$$,
                 'BG005', 'invalid circuit breaker policy: failure_rate_threshold is out of range', 'a failure rate above 100 %: BG005');
select throws_ok($$insert into booking_guard.circuit_policies (key_pattern, slow_call_rate_threshold) values ('x:%', -1)$$,
                 'BG005', 'invalid circuit breaker policy: slow_call_rate_threshold is out of range', 'a negative slow-call rate: BG005');
select throws_ok($$insert into booking_guard.circuit_policies (key_pattern, slow_call_duration_threshold) values ('x:%', '0')$$,
                 'BG005', 'invalid circuit breaker policy: slow_call_duration_threshold is out of range', 'a slow-call duration of 0: BG005');
select throws_ok($$insert into booking_guard.circuit_policies (key_pattern, slow_call_duration_threshold) values ('x:%', '2 days')$$,
                 'BG005', 'invalid circuit breaker policy: slow_call_duration_threshold is out of range',
                 'a slow-call duration above a day: BG005');
select throws_ok($$insert into booking_guard.circuit_policies (key_pattern) values (repeat('p', 256))$$,
                 'BG005', 'invalid circuit breaker policy: key_pattern is out of range', 'a pattern of 256 characters: BG005');
select results_eq($$select state, detail, hint is not null
                      from pg_temp.err('update booking_guard.circuit_policies set minimum_number_of_calls = 0 where key_pattern = ''%''')$$,
                  $$values ('BG005', 'key_pattern ''%'': minimum_number_of_calls = 0; allowed: 1 to 100000 calls.', true)$$,
                  'the DETAIL names the pattern, the column, its value and the range; a HINT follows');
select is((select count(*) from booking_guard.circuit_policies where key_pattern like 'x:%'), 1::bigint, 'the refused rows wrote nothing');
delete from booking_guard.circuit_policies where key_pattern = 'x:ok';

-- ---- count_based: the rates over the last N calls, once the window holds the minimum number of calls
insert into booking_guard.circuit_policies (key_pattern, sliding_window_type, sliding_window_size, minimum_number_of_calls,
                                            failure_rate_threshold, slow_call_rate_threshold, slow_call_duration_threshold,
                                            half_open_max_calls)
values ('count:%', 'count_based', 4, 4, 50, 75, '1 minute', 3);
select ok(booking_guard.circuit_acquire('count:a') > 0, 'count: a new key of a count_based policy');
select results_eq($$select b.window_type, w.head, length(w.outcomes), w.buckets is null, w.policy_pattern, w.closed
                      from booking_guard.circuit_breakers b join booking_guard_internal.circuit_windows w using (key)
                     where key = 'count:a'$$,
                  $$values ('count_based', 0::bigint, 4, true, 'count:%', true)$$,
                  'count: its window is a ring of 4 empty calls, tied to its policy row');
select is(pg_temp.run('count:a', 'fff'), 'closed', 'count: 3 failures in 3 calls stay closed below the minimum of 4');
select is(pg_temp.w('count:a'), '3 calls, 3 failed, 0 slow', 'count: the window holds them');
select is(pg_temp.run('count:a', 's'), 'open', 'count: the 4th call reaches the minimum: 75 % failed opens it (a success did it)');
select is((select reason from booking_guard.circuit_transitions where key = 'count:a'),
          'failure_rate: 3 of 4 calls failed (75.00% >= 50.00%)', 'count: the reason gives the rate and the threshold');
select results_eq($$select window_calls, window_failures, failure_rate, slow_call_rate from booking_guard.circuit_status where key = 'count:a'$$,
                  $$values (4, 3, 75.00, 0.00)$$, 'count: circuit_status shows the window and its rates');

select is(pg_temp.run('count:b', 'sssfsssfs'), 'closed', 'count: never 2 failures among 4 calls in a row: closed');
select is(pg_temp.w('count:b'), '4 calls, 1 failed, 0 slow', 'count: the window holds the last 4 calls only');
select is(pg_temp.run('count:b', 'f'), 'open', 'count: 2 failures among the last 4 (50 %) open it: the threshold is inclusive');
select is((select reason from booking_guard.circuit_transitions where key = 'count:b'),
          'failure_rate: 2 of 4 calls failed (50.00% >= 50.00%): boom', 'count: a failure that opens it gives its error');
select is(pg_temp.run('count:c', 'ffss'), 'open', 'count: 2 of 4 failed at the 4th call: open');
select is(pg_temp.run('count:e', 'ssff'), 'open', 'count: so too s s f f');
select is(pg_temp.run('count:f', 'sssfsssfss'), 'closed', 'count: failures 4 calls apart never reach 50 %');
select is(pg_temp.w('count:f'), '4 calls, 1 failed, 0 slow', 'count: failures leave the window as calls come');
select is(pg_temp.transitions('count:f'), '', 'count: no transition');

-- slow calls: longer than slow_call_duration_threshold
select is(pg_temp.run('count:g', 'SSSs'), 'open', 'slow: 3 slow of 4 calls (75 %) open it');
select is((select reason from booking_guard.circuit_transitions where key = 'count:g'),
          'slow_call_rate: 3 of 4 calls slower than 00:01:00 (75.00% >= 75.00%)', 'slow: reason slow_call_rate');
select is(booking_guard.circuit_record_success('count:h', null, '2 minutes'), 'closed', 'slow: a success of a key never acquired...');
select is(pg_temp.w('count:h'), null, '... is not recorded');
select ok(booking_guard.circuit_acquire('count:h') > 0, 'slow: acquired');
select is(booking_guard.circuit_record_success('count:h', null, '1 minute'), 'closed', 'slow: a call of exactly the threshold');
select is(booking_guard.circuit_record_success('count:h', null, '60.001 seconds'), 'closed', 'slow: one just over it');
select is(booking_guard.circuit_record_success('count:h'), 'closed', 'slow: a call reported without a duration');
select is(pg_temp.w('count:h'), '3 calls, 0 failed, 1 slow', 'slow: only the one over the threshold is slow');
select is(pg_temp.run('count:i', 'FSfs'), 'open', 'slow: a slow failure counts in both rates');
select is(pg_temp.w('count:i'), '4 calls, 2 failed, 2 slow', 'slow: 2 failed, 2 slow');

insert into booking_guard.circuit_policies (key_pattern, sliding_window_type, sliding_window_size, minimum_number_of_calls)
values ('small:%', 'count_based', 2, 100);
select is(pg_temp.run('small:a', 'f'), 'closed', 'count: a minimum above the window size is the window size: 1 call...');
select is(pg_temp.run('small:a', 'f'), 'open', '... 2 calls reach it');

-- the breaker row: a failure dates last_failure_at; a window lost (not dumped, say) is made again
select ok(booking_guard.circuit_acquire('count:m') > 0, 'row: count:m');
create temp table m_row as select ctid::text as version from booking_guard.circuit_breakers where key = 'count:m';
select is(pg_temp.run('count:m', 's'), 'closed', 'row: a success...');
select is((select ctid::text from booking_guard.circuit_breakers where key = 'count:m'), (select version from m_row),
          '... writes nothing to the breaker row (the same row version)');
select is(pg_temp.run('count:m', 'f'), 'closed', 'row: a failure...');
select is((pg_temp.b('count:m')).last_failure_at, '2030-01-01 00:00:00+00'::timestamptz, '... dates last_failure_at');
delete from booking_guard_internal.circuit_windows where key = 'count:m';
select is(pg_temp.run('count:m', 'f'), 'closed', 'row: with its window gone, a result...');
select is(pg_temp.w('count:m'), '1 calls, 1 failed, 0 slow', '... starts a new one');

-- late results count only toward the state their permit was granted in
select pg_temp.keep('late', booking_guard.circuit_acquire('count:k'));
select is(pg_temp.run('count:k', 'ffff'), 'open', 'late: opened');
select is((booking_guard.circuit_reset('count:k')).state || ', ' || pg_temp.w('count:k'), 'closed, 0 calls, 0 failed, 0 slow',
          'late: reset empties the window');
select is(booking_guard.circuit_record_failure('count:k', 'late', pg_temp.k('late')), 'closed',
          'late: a failure of a permit granted before the reset...');
select is(pg_temp.w('count:k'), '0 calls, 0 failed, 0 slow', '... is not counted');
select is(booking_guard.circuit_record_failure('count:k', 'new', booking_guard.circuit_acquire('count:k')), 'closed',
          'late: one of a permit granted after it...');
select is(pg_temp.w('count:k'), '1 calls, 1 failed, 0 slow', '... is');

-- ---- half-open with rates: half_open_max_calls trial calls in all, then their rates decide
select pg_temp.at('100 s');
select is(booking_guard.circuit_state('count:a'), 'half_open', 'half-open: after the cooldown');
select ok(booking_guard.circuit_acquire('count:a') > 0 and booking_guard.circuit_acquire('count:a') > 0
          and booking_guard.circuit_acquire('count:a') > 0, 'half-open: 3 trial calls admitted (half_open_max_calls)');
select throws_ok($$select booking_guard.circuit_acquire('count:a')$$, 'BG001', 'circuit breaker "count:a" is half_open: call rejected',
                 'half-open: a 4th is rejected');
select is(pg_temp.w('count:a'), '0 calls, 0 failed, 0 slow', 'half-open: the window counts the trial calls afresh');
select is(pg_temp.run('count:a', 's'), 'half_open', 'half-open: one trial success: no verdict before the minimum (3 here)');
select throws_ok($$select booking_guard.circuit_acquire('count:a')$$, 'BG001', null,
                 'half-open: its slot is not given again: 3 trial calls in all, not at a time');
select is(pg_temp.run('count:a', 'f'), 'half_open', 'half-open: 2 of 3 reported');
select is(pg_temp.run('count:a', 's'), 'closed', 'half-open: 1 of 3 failed (33 % < 50 %): closed');
select is((select reason from booking_guard.circuit_transitions where key = 'count:a' order by id desc limit 1),
          'trial_rates: 1 of 3 trial calls failed, 0 slow (below 50.00% and 75.00%)', 'half-open: reason trial_rates');
select is(pg_temp.w('count:a'), '0 calls, 0 failed, 0 slow', 'half-open: closing starts an empty window');
select is((select round(recovery_seconds) from booking_guard.circuit_recoveries where key = 'count:a'), 100::double precision,
          'half-open: the recovery is in circuit_recoveries');

select ok(booking_guard.circuit_acquire('count:c') > 0, 'half-open: a trial call of count:c');
select is(pg_temp.run('count:c', 'fs'), 'half_open', 'half-open: a result without a permit is the oldest trial''s...');
select is((select count(*) from booking_guard.circuit_permits where key = 'count:c'), 0::bigint, '... and ends it');
select is(pg_temp.w('count:c'), '1 calls, 1 failed, 0 slow', 'half-open: a result with no trial in progress counts for nothing');
select ok(booking_guard.circuit_acquire('count:c') > 0 and booking_guard.circuit_acquire('count:c') > 0, 'half-open: two more trials');
select is(pg_temp.run('count:c', 'fs'), 'open', 'half-open: 2 of 3 trial calls failed (67 %): open again');
select is((select reason from booking_guard.circuit_transitions where key = 'count:c' order by id desc limit 1),
          'failure_rate: 2 of 3 trial calls failed (66.67% >= 50.00%)', 'half-open: reason failure_rate over the trial calls');

-- a trial lease that runs out is a failed trial call, at its end
select pg_temp.keep('e1', booking_guard.circuit_acquire('count:e'));
select pg_temp.at('105 s');
select pg_temp.keep('e2', booking_guard.circuit_acquire('count:e'));
select pg_temp.keep('e3', booking_guard.circuit_acquire('count:e'));
select is(booking_guard.circuit_record_success('count:e', pg_temp.k('e2')), 'half_open', 'lease: one trial succeeded');
select pg_temp.at('110.5 s');
select is(booking_guard.circuit_state('count:e'), 'half_open', 'lease: the first lease (10 s) ran out: a failed trial, no verdict yet');
select is((select window_calls || '/' || window_failures from booking_guard.circuit_status where key = 'count:e'), '2/1',
          'lease: circuit_status counts it without writing');
select is(booking_guard.circuit_record_success('count:e', pg_temp.k('e3')), 'closed', 'lease: the third trial''s success decides');
select is((select reason from booking_guard.circuit_transitions where key = 'count:e' order by id desc limit 1),
          'trial_rates: 1 of 3 trial calls failed, 0 slow (below 50.00% and 75.00%)', 'lease: 1 of 3 failed: closed');
select is(booking_guard.circuit_record_success('count:e', pg_temp.k('e1')), 'closed', 'lease: the expired permit''s own result...');
select is(pg_temp.w('count:e'), '0 calls, 0 failed, 0 slow', '... comes too late to count');

select pg_temp.at('110 s');
select ok(booking_guard.circuit_acquire('count:g') > 0 and booking_guard.circuit_acquire('count:g') > 0
          and booking_guard.circuit_acquire('count:g') > 0, 'lease: 3 trials of count:g at 110 s');
select pg_temp.at('121 s');
select is(booking_guard.circuit_state('count:g'), 'open', 'lease: all three leases ran out at 120 s: 3 failed trials, open');
select is((select last_transition_reason from booking_guard.circuit_status where key = 'count:g'),
          (select format('failure_rate: 3 of 3 trial calls failed (100.00%% >= 50.00%%) (trial permit %s not reported within 00:00:10)',
                         max(permit))
             from booking_guard.circuit_permits where key = 'count:g'),
          'lease: the reason names the lease that decided');
select is((select opened_at from booking_guard.circuit_status where key = 'count:g'), '2030-01-01 00:02:00+00'::timestamptz,
          'lease: reopened when the leases ended');

-- a trial call reported without a duration is measured from its permit
insert into booking_guard.circuit_policies (key_pattern, sliding_window_type, sliding_window_size, minimum_number_of_calls,
                                            slow_call_duration_threshold, half_open_max_calls)
values ('meas:%', 'count_based', 4, 4, '2 seconds', 2);
select is(pg_temp.run('meas:a', 'ffff'), 'open', 'measured: opened at 121 s');
select pg_temp.at('151 s');
select pg_temp.keep('m1', booking_guard.circuit_acquire('meas:a'));
select pg_temp.at('154 s');
select pg_temp.keep('m2', booking_guard.circuit_acquire('meas:a'));
select is(booking_guard.circuit_record_success('meas:a', pg_temp.k('m1')), 'half_open', 'measured: a trial that took 3 s');
select pg_temp.at('155 s');
select is(booking_guard.circuit_record_success('meas:a', pg_temp.k('m2')), 'closed', 'measured: one that took 1 s');
select is((select reason from booking_guard.circuit_transitions where key = 'meas:a' order by id desc limit 1),
          'trial_rates: 0 of 2 trial calls failed, 1 slow (below 50.00% and 100.00%)', 'measured: the first was slow, the second not');

-- ---- time_based: the calls of the last N seconds, in buckets
insert into booking_guard.circuit_policies (key_pattern, sliding_window_type, sliding_window_size, minimum_number_of_calls)
values ('time:%', 'time_based', 10, 3), ('hour:%', 'time_based', 3600, 3);
select pg_temp.at('200 s');
select ok(booking_guard.circuit_acquire('time:a') > 0, 'time: a new key of a time_based policy');
select results_eq($$select cardinality(buckets), bucket_width from booking_guard_internal.circuit_windows where key = 'time:a'$$,
                  $$values (30, 1)$$, 'time: 10 buckets of 1 s (calls, failures, slow calls each)');
select is(pg_temp.run('time:a', 'ff'), 'closed', 'time: 2 failures, below the minimum of 3');
select pg_temp.at('209.9 s');
select is(pg_temp.run('time:a', 's'), 'open', 'time: 9.9 s later they are still in the window: 2 of 3 failed');
select pg_temp.at('200 s');
select is(pg_temp.run('time:b', 'ff'), 'closed', 'time: 2 failures at 200 s');
select pg_temp.at('210 s');
select is((select window_calls from booking_guard.circuit_status where key = 'time:b'), 0,
          'time: at 210 s their bucket has left the window (circuit_status, writing nothing)');
select is(pg_temp.run('time:b', 'fs'), 'closed', 'time: 2 more calls');
select is(pg_temp.w('time:b'), '2 calls, 1 failed, 0 slow', 'time: the window moved forward and dropped the old bucket');
select pg_temp.at('215 s');
select is(pg_temp.run('time:b', 'f'), 'open', 'time: 5 s later: 2 of 3 failed');
select pg_temp.at('300 s');
select is(pg_temp.run('time:c', 'sf'), 'closed', 'time: 2 calls at 300 s...');
select pg_temp.at('300.5 s');
select is(pg_temp.run('time:c', 'f'), 'open', '... and one more in the same second: 2 of 3');
select is(pg_temp.w('time:c'), '3 calls, 2 failed, 0 slow', 'time: one bucket holds the three');
select pg_temp.at('0 s');
select is(pg_temp.run('hour:a', 'sss'), 'closed', 'time: a window of an hour...');
select results_eq($$select cardinality(buckets), bucket_width from booking_guard_internal.circuit_windows where key = 'hour:a'$$,
                  $$values (180, 60)$$, 'time: ... has 60 buckets of 60 s');
select pg_temp.at('3599 s');
select is(pg_temp.run('hour:a', 'f'), 'closed', 'time: 3599 s later: 1 of 4 failed');
select pg_temp.at('3600 s');
select is(pg_temp.run('hour:a', 'ff'), 'open', 'time: at 3600 s the first bucket has left: 3 of 3 failed');
select is(pg_temp.w('hour:a'), '3 calls, 3 failed, 0 slow', 'time: without the first bucket''s calls');

-- ---- policy changes
select pg_temp.at('1000 s');
select is(pg_temp.run('count:f', 's'), 'closed', 'change: count:f, closed, window of 4');
update booking_guard.circuit_policies set failure_rate_threshold = 25 where key_pattern = 'count:%';
select is(pg_temp.w('count:f'), '4 calls, 1 failed, 0 slow', 'change: a new threshold keeps the window');
update booking_guard.circuit_policies set sliding_window_size = 6 where key_pattern = 'count:%';
select results_eq($$select calls, length(outcomes) from booking_guard_internal.circuit_windows where key = 'count:f'$$,
                  $$values (0, 6)$$, 'change: a new window size starts a window of the new size');
insert into booking_guard.circuit_policies (key_pattern, sliding_window_type) values ('count:f', 'consecutive');
select results_eq($$select b.window_type, (select count(*) from booking_guard_internal.circuit_windows w where w.key = b.key)
                      from booking_guard.circuit_breakers b where key = 'count:f'$$,
                  $$values (null::text, 0::bigint)$$, 'change: a more specific consecutive policy drops its window');
select results_eq($$select length(outcomes), policy_pattern from booking_guard_internal.circuit_windows where key = 'count:b'$$,
                  $$values (6, 'count:%')$$, 'change: the other keys of count:% keep theirs');
select is(pg_temp.run('count:f', 'ff'), 'closed', 'change: count:f counts consecutive failures now: 2...');
select is(pg_temp.run('count:f', 'f'), 'open', '... 3 open it');
delete from booking_guard.circuit_policies where key_pattern = 'count:f';
select is((select length(outcomes) from booking_guard_internal.circuit_windows where key = 'count:f'), 6,
          'change: deleting that policy gives count:f the window of count:% again');

-- ---- composed scopes: one permit, refused while any scope refuses
select ok(booking_guard.circuit_acquire(array['app:service:3', 'app:global', 'app:staff:7']) > 0, 'scopes: all closed: a permit');
select is((select count(*) from booking_guard.circuit_breakers where key like 'app:%'), 3::bigint, 'scopes: each scope has its breaker');
select booking_guard.circuit_force_open('app:global', '2030-01-01 00:20:00+00');
select is((pg_temp.err($$select booking_guard.circuit_acquire(array['app:service:3', 'app:global', 'app:staff:7'])$$)).detail::jsonb,
          '{"key": "app:global", "state": "open", "retry_after_seconds": 200}'::jsonb,
          'scopes: global open refuses a call under service:3: BG001 names global, 200 s');
select is(booking_guard.circuit_state('app:service:3'), 'closed', 'scopes: service:3 itself is closed');
select ok(booking_guard.circuit_acquire('app:service:3') > 0, 'scopes: and a call under service:3 alone is admitted');
select is(pg_temp.run('app:staff:7', 'fff'), 'open', 'scopes: staff:7 opens at 1000 s (cooldown 30 s)');
select is((select (row(s.*))::text from booking_guard.circuit_try_acquire(array['app:service:3', 'app:staff:7', 'app:global']) s),
          '(f,open,200,,app:global)', 'scopes: the scope refusing longest is named (global 200 s, staff:7 30 s)');
select booking_guard.circuit_reset('app:global');
select is((select (row(s.*))::text from booking_guard.circuit_try_acquire(array['app:service:3', 'app:staff:7', 'app:global']) s),
          '(f,open,30,,app:staff:7)', 'scopes: then staff:7');
select pg_temp.at('1031 s');
select pg_temp.keep('composed', (select permit from booking_guard.circuit_try_acquire(array['app:service:3', 'app:staff:7', 'app:global'])));
select results_eq($$select key from booking_guard.circuit_permits where permit = pg_temp.k('composed')$$, $$values ('app:staff:7')$$,
                  'scopes: past staff:7''s cooldown the permit is its trial permit');
select throws_ok($$select booking_guard.circuit_acquire(array['app:global', 'app:staff:7'])$$, 'BG001',
                 'circuit breaker "app:staff:7" is half_open: call rejected', 'scopes: its one trial is taken');
select is(booking_guard.circuit_record_success(array['app:service:3', 'app:staff:7', 'app:global'], pg_temp.k('composed')), 'half_open',
          'scopes: the result counts for every scope; the most restrictive state comes back');
select is((select success_count from booking_guard.circuit_breakers where key = 'app:staff:7'), 1, 'scopes: staff:7 counted the trial');
select is(booking_guard.circuit_record_failure(array['app:service:3', 'app:global'], 'x', null, '1 second'), 'closed',
          'scopes: a failure under two scopes...');
select results_eq($$select key, failure_count from booking_guard.circuit_breakers where key in ('app:service:3', 'app:global') order by key$$,
                  $$values ('app:global', 1), ('app:service:3', 1)$$, '... counts for both');
select ok(booking_guard.circuit_acquire(array['app:twice', 'app:twice']) > 0, 'scopes: a key given twice...');
select is((select count(*) from booking_guard.circuit_breakers where key = 'app:twice'), 1::bigint, '... is one scope');

-- ---- circuit_try_acquire: the answer as a row
select is(pg_temp.run('try:open', 'fff'), 'open', 'try: opened at 1031 s');
select pg_temp.keep('ff', booking_guard.circuit_fast_fail_total());
select results_eq($$select allowed, state, retry_after_seconds, permit is not null, refused_by
                      from booking_guard.circuit_try_acquire('try:open')$$,
                  $$values (false, 'open', 30::numeric, false, 'try:open')$$, 'try: an open breaker: not allowed, retry after, no exception');
select is(booking_guard.circuit_fast_fail_total(), pg_temp.k('ff') + 1, 'try: counted as a fast fail');
select results_eq($$select allowed, state, retry_after_seconds, refused_by from booking_guard.circuit_try_acquire('try:new')$$,
                  $$values (true, 'closed', null::numeric, null::text)$$, 'try: a new key is allowed, closed');
select ok((select permit from booking_guard.circuit_try_acquire('try:new')) > 0, 'try: with a permit');
select booking_guard.circuit_force_open('try:forced');
select results_eq($$select allowed, state, retry_after_seconds from booking_guard.circuit_try_acquire('try:forced')$$,
                  $$values (false, 'open', null::numeric)$$, 'try: forced open until reset: retry_after_seconds is null');

-- ---- BG001: a short message, a JSON DETAIL, a HINT, one line of CONTEXT
select results_eq($$select state, message, detail from pg_temp.err('select booking_guard.circuit_acquire(''try:open'')')$$,
                  $$values ('BG001', 'circuit breaker "try:open" is open: call rejected',
                            '{"key": "try:open", "state": "open", "retry_after_seconds": 30}')$$,
                  'BG001: the message and a JSON DETAIL');
select is((pg_temp.err($$select booking_guard.circuit_acquire('try:forced')$$)).detail::jsonb -> 'retry_after_seconds', 'null'::jsonb,
          'BG001: forced open until reset: retry_after_seconds null');
select matches((pg_temp.err($$select booking_guard.circuit_acquire('try:open')$$)).hint, 'calcom_booking_failed', 'BG001: the HINT');
select matches((pg_temp.err($$select booking_guard.circuit_acquire('try:open')$$)).context,
               '^PL/pgSQL function booking_guard\.circuit_acquire\(text\) line \d+ at RAISE\nSQL statement',
               'BG001: raised by the function called: its CONTEXT is one line (then this test''s own)');

-- ---- bad input: BG005, nothing written
select throws_ok($$select booking_guard.circuit_acquire('{}'::text[])$$, 'BG005', 'invalid circuit breaker scopes: 0 keys', 'no scope: BG005');
select throws_ok($$select booking_guard.circuit_acquire(null::text[])$$, 'BG005', 'invalid circuit breaker scopes: null keys',
                 'null scopes: BG005');
select throws_ok($$select booking_guard.circuit_try_acquire(array(select 'k' || g from generate_series(1, 17) g))$$, 'BG005',
                 'invalid circuit breaker scopes: 17 keys', '17 scopes: BG005');
select throws_ok($$select booking_guard.circuit_record_success(array['bad:a', null])$$, 'BG005', 'invalid circuit breaker key',
                 'a null scope: BG005');
select throws_ok($$select booking_guard.circuit_record_success('bad:b', null, '-1 second')$$, 'BG005', 'invalid call duration: -00:00:01',
                 'a negative duration: BG005');
select throws_ok($$select booking_guard.circuit_record_failure('bad:c', 'x', null, '25 hours')$$, 'BG005', 'invalid call duration: 25:00:00',
                 'a duration over a day: BG005');
select throws_ok($$select booking_guard.circuit_record_failure(array['bad:d'], repeat('e', 2001))$$, 'BG005', null,
                 'an error text over 2000 characters: BG005');
select is((select count(*) from booking_guard.circuit_breakers where key like 'bad:%' or key like 'k%'), 0::bigint, 'bad input wrote nothing');

select * from finish();
rollback;
