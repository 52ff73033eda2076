-- backoff_delay(): the exponential schedule, full jitter, the cap, every bad argument; the retries queue:
-- schedule, claim (due only, expiring claims), finish (next attempt by backoff, review after the last).
begin;
select plan(55);
set local client_min_messages = warning;

-- the schedule, with the random draw fixed
select results_eq($$select booking_guard.backoff_delay(a, draw => 0) from generate_series(1, 4) a$$,
                  $$values (interval '1 second'), (interval '2 seconds'), (interval '4 seconds'), (interval '8 seconds')$$,
                  'exponential strategy (the default) without jitter: 1 s, 2 s, 4 s, 8 s');
select is(booking_guard.backoff_delay(3, strategy => 'seed', draw => 0.5), booking_guard.backoff_delay(3, strategy => 'exponential', draw => 0.5),
          'seed, the 0.1.0 name of exponential, is still accepted and the same');
select is(booking_guard.backoff_delay(3, draw => 0.5), interval '4.2 seconds', 'jitter adds up to 10 %: half of it at draw 0.5');
select is(booking_guard.backoff_delay(20, draw => 0), interval '1 minute', 'capped at max_delay (default 1 minute)');
select is(booking_guard.backoff_delay(2147483647, draw => 0), interval '1 minute', 'the largest attempt does not overflow');
select is(booking_guard.backoff_delay(20, max_delay => '10 seconds', jitter => 0.5, draw => 0.5), interval '12.5 seconds',
          'jitter is added on top of the cap');
select is(booking_guard.backoff_delay(3, strategy => 'full', draw => 0.5), interval '2 seconds',
          'full jitter: a uniform share of the exponential');
select is(booking_guard.backoff_delay(30, strategy => 'full', draw => 0.999), interval '59.94 seconds',
          'full jitter stays below the cap');
select is(booking_guard.backoff_delay(3, base => '100 milliseconds', factor => 3, draw => 0), interval '0.9 seconds',
          'base and factor');
select is(booking_guard.backoff_delay(5, factor => 1, draw => 0), interval '1 second', 'factor 1 is a constant delay');
select is(booking_guard.backoff_delay(1, base => '1 minute', max_delay => '10 seconds', draw => 0), interval '10 seconds',
          'a base above the cap is capped');

-- random draws stay within bounds and do spread
select is((select count(*)::int from generate_series(1, 2000) i
            where booking_guard.backoff_delay(3) not between interval '4 seconds' and interval '4.4 seconds'), 0,
          'exponential: 2000 random delays of attempt 3 all within [4 s, 4.4 s]');
select cmp_ok((select count(distinct booking_guard.backoff_delay(3))::int from generate_series(1, 200)), '>', 100,
              'exponential: the jitter spreads the delays');
select is((select count(*)::int from generate_series(1, 2000) i
            where booking_guard.backoff_delay(4, strategy => 'full') not between interval '0' and interval '8 seconds'), 0,
          'full: 2000 random delays of attempt 4 all within [0, 8 s]');

-- bad arguments
select throws_ok($$select booking_guard.backoff_delay(0)$$, 'BG005', 'backoff_delay(): attempt must be 1 or more, not 0',
                 'attempt 0: BG005');
select throws_ok($$select booking_guard.backoff_delay(-3)$$, 'BG005', 'backoff_delay(): attempt must be 1 or more, not -3',
                 'a negative attempt: BG005');
select throws_ok($$select booking_guard.backoff_delay(null)$$, 'BG005', 'backoff_delay(): attempt must be 1 or more, not null',
                 'a null attempt: BG005');
select throws_ok($$select booking_guard.backoff_delay(1, jitter => -0.1)$$, 'BG005',
                 'backoff_delay(): jitter must be between 0 and 1, not -0.1', 'jitter below 0: BG005');
select throws_ok($$select booking_guard.backoff_delay(1, jitter => 1.5)$$, 'BG005',
                 'backoff_delay(): jitter must be between 0 and 1, not 1.5', 'jitter above 1: BG005');
select throws_ok($$select booking_guard.backoff_delay(1, strategy => 'decorrelated')$$, 'BG005',
                 'backoff_delay(): unknown strategy ''decorrelated''', 'an unknown strategy: BG005');
select throws_ok($$select booking_guard.backoff_delay(1, base => '0')$$, 'BG005',
                 'backoff_delay(): base and max_delay must be positive intervals of at most a day', 'base 0: BG005');
select throws_ok($$select booking_guard.backoff_delay(1, max_delay => '-1 second')$$, 'BG005',
                 'backoff_delay(): base and max_delay must be positive intervals of at most a day', 'a negative cap: BG005');
select throws_ok($$select booking_guard.backoff_delay(1, factor => 0.5)$$, 'BG005',
                 'backoff_delay(): factor must be between 1 and 100, not 0.5', 'a shrinking factor: BG005');
select throws_ok($$select booking_guard.backoff_delay(1, draw => 1)$$, 'BG005',
                 'backoff_delay(): draw must be in [0, 1), not 1', 'a draw of 1: BG005');

-- ---------------------------------------------------------------- the retries queue
select is(booking_guard.setting('retry_claim_timeout'), '00:05:00', 'setting retry_claim_timeout, 5 minutes');
select throws_ok($$select booking_guard.schedule_retry(1, null)$$, 'BG005', 'schedule_retry(): an operation name is needed',
                 'no operation: BG005');
select throws_ok($$select booking_guard.schedule_retry(1, 'record_booking', '[]')$$, 'BG005',
                 'schedule_retry(): the payload must be a jsonb object of at most 64 kB', 'a payload that is not an object: BG005');
select throws_ok($$select booking_guard.schedule_retry(1, 'record_booking', '{}', 0)$$, 'BG005',
                 'schedule_retry(): max_attempts must be between 1 and 100, not 0', 'max_attempts 0: BG005');
select throws_ok($$select booking_guard.schedule_retry(1, 'record_booking', '{}', 3, '-1 second')$$, 'BG005',
                 'schedule_retry(): delay must be between 0 and a day, not -00:00:01', 'a negative delay: BG005');
select is_empty('select from booking_guard.retries', 'bad schedule_retry calls wrote nothing');

create temp table ids as
select booking_guard.schedule_retry(1, 'record_booking', '{"calcom_booking_id": "cal-1"}', 2, '0') as now_due,
       booking_guard.schedule_retry(2, 'record_booking', '{}', 3, '1 hour') as later,
       booking_guard.schedule_retry(3, 'notify', '{}') as by_backoff;
select cmp_ok((select due_at from booking_guard.retries where id = (select by_backoff from ids)), '>=', now() + interval '1 second',
              'without a delay the first try is due after backoff_delay(1)');
update booking_guard.retries set due_at = now() + interval '1 day' where id = (select by_backoff from ids);

select throws_ok($$select * from booking_guard.claim_retries(null)$$, 'BG005', 'claim_retries(): a worker name is needed',
                 'claim without a worker: BG005');
select throws_ok($$select * from booking_guard.claim_retries('w1', 0)$$, 'BG005',
                 'claim_retries(): n must be between 1 and 1000, not 0', 'claim of 0: BG005');

select results_eq($$select id, attempts, status, claimed_by from booking_guard.claim_retries('w1', 10, now())$$,
                  $$select now_due, 1, 'running', 'w1' from ids$$, 'a claim hands out only the due retry and counts the attempt');
select is_empty($$select * from booking_guard.claim_retries('w2', 10, now())$$, 'a claimed retry is not handed out again');

-- a claim expires: the retry comes back, the abandoned attempt is in its history
select is_empty($$select * from booking_guard.claim_retries('w2', 10, now() + interval '4 minutes')$$,
                'within retry_claim_timeout the claim holds');
select results_eq($$select id, attempts, claimed_by from booking_guard.claim_retries('w2', 1, now() + interval '5 minutes')$$,
                  $$select now_due, 2, 'w2' from ids$$, 'after retry_claim_timeout another worker gets it (attempt 2)');
select is((select history -> 0 ->> 'error' from booking_guard.retries where id = (select now_due from ids)),
          'claim expired: worker w1 did not finish', 'the abandoned attempt is in the history');

-- finish
select throws_ok($$select booking_guard.finish_retry(-1, true)$$, 'BG004', 'unknown retry -1', 'an unknown retry: BG004');
select throws_ok(format('select booking_guard.finish_retry(%s, true, null, %L)', (select now_due from ids), 'w1'), 'BG005',
                 format('retry %s is not claimed by w1', (select now_due from ids)), 'a worker whose claim expired: BG005');
select throws_ok(format('select booking_guard.finish_retry(%s, null)', (select now_due from ids)), 'BG005',
                 'finish_retry(): ok must be true or false, the error at most 2000 characters', 'ok null: BG005');
select throws_ok(format('select booking_guard.finish_retry(%s, true)', (select later from ids)), 'BG005', null,
                 'finishing an unclaimed retry: BG005');

-- the last attempt fails: failed, and the call goes to review with the history
select results_eq(format('select status, attempts from booking_guard.finish_retry(%s, false, %L, %L)',
                         (select now_due from ids), 'calendar timed out', 'w2'),
                  $$values ('failed', 2)$$, 'a failure on the last attempt fails the retry');
select results_eq($$select reason, priority, jsonb_array_length(context -> 'history'), context ->> 'last_error'
                      from booking_guard.review_queue where call_id = 1$$,
                  $$values ('retry_exhausted', 2, 2, 'calendar timed out')$$,
                  'the call is queued for review with the whole history');

-- a failure before the last attempt: pending again, due after backoff_delay(attempts)
update booking_guard.retries set due_at = now() where id = (select later from ids);
select is((select count(*)::int from booking_guard.claim_retries('w3', 10, now())), 1, 'claim the second retry');
create temp table f as select * from booking_guard.finish_retry((select later from ids), false, 'busy');
select results_eq($$select status, attempts, last_error, claimed_by from f$$, $$values ('pending', 1, 'busy', null::text)$$,
                  'a failure before the last attempt puts the retry back');
select ok((select due_at - (history -> -1 ->> 'at')::timestamptz between interval '1 second' and interval '1.1 seconds'
             from f),
          'due again backoff_delay(1) after the failure: 1 s to 1.1 s');
select is((select count(*)::int from booking_guard.claim_retries('w3', 10, now())), 0, 'not due before its backoff');
select results_eq($$select id, attempts from booking_guard.claim_retries('w3', 10, now() + interval '1 hour')$$,
                  $$select later, 2 from ids$$, 'due after its backoff (attempt 2)');
select results_eq(format('select status, finished_at is not null from booking_guard.finish_retry(%s, true, null, %L)',
                         (select later from ids), 'w3'),
                  $$values ('succeeded', true)$$, 'a success ends the retry');

-- a claim that expires on the last attempt: that attempt failed
update booking_guard.retries set due_at = now(), max_attempts = 1 where id = (select by_backoff from ids);
select is((select count(*)::int from booking_guard.claim_retries('w4', 10, now())), 1, 'claim the last one');
select is_empty($$select * from booking_guard.claim_retries('w5', 10, now() + interval '1 hour')$$,
                'a claim expired on the last attempt is not handed out again');
select results_eq($$select status, last_error from booking_guard.retries where id = (select by_backoff from ids)$$,
                  $$values ('failed', 'claim expired: worker w4 did not finish')$$, '... it failed');

-- privileges
select ok(has_function_privilege('booking_guard_app', 'booking_guard.claim_retries(text, integer, timestamptz)', 'execute')
          and has_function_privilege('booking_guard_app', 'booking_guard.finish_retry(bigint, boolean, text, text)', 'execute'),
          'app may work the retries');
select ok(has_table_privilege('booking_guard_monitor', 'booking_guard.retries', 'select')
          and not has_table_privilege('booking_guard_monitor', 'booking_guard.retries', 'update'),
          'monitor may read, not change, the retries');

select * from finish();
rollback;
