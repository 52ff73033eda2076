-- Retries with backoff: the first answer to a failed booking is to try again, later.
--
-- backoff_delay() is the schedule. Strategy 'exponential' (the default): base * factor^(attempt-1)
-- (1 s, 2 s, 4 s, 8 s, ...), capped at max_delay, plus 0 to jitter (10 %) of it on top, so the
-- spread survives at the cap. Strategy 'full' is AWS's "full jitter": a uniform draw from
-- 0 to the capped exponential, which spreads a thundering herd best. 'seed' is 0.1.0's name of
-- 'exponential', still accepted. The Python package computes the same schedule
-- (booking_guard.app.backoff_delay); the tests check both agree.
--
-- The retries table is a small durable work queue for operations that failed and should be
-- tried again later by a worker (any language): schedule_retry() puts one in, claim_retries()
-- hands due ones to a worker (FOR UPDATE SKIP LOCKED; a claim expires after
-- retry_claim_timeout, so a dead worker's retries come back), finish_retry() records the
-- outcome and either schedules the next attempt by backoff_delay() or, after the last
-- attempt, queues the call for review with the whole history.

create function booking_guard.backoff_delay(attempt integer, base interval default '1 second',
                                            factor double precision default 2,
                                            max_delay interval default '1 minute',
                                            jitter double precision default 0.1, strategy text default 'exponential',
                                            draw double precision default null)
returns interval
language plpgsql
volatile
set search_path = pg_catalog, pg_temp
as $$
declare
    base_s  double precision := extract(epoch from base);
    max_s   double precision := extract(epoch from max_delay);
    capped  double precision;
    u       double precision := coalesce(draw, random());
begin
    if attempt is null or attempt < 1 then
        raise exception 'backoff_delay(): attempt must be 1 or more, not %', coalesce(attempt::text, 'null')
            using errcode = 'BG005',
                  detail = 'attempt is the number of the attempt that just failed: 1 gives the first delay (base).',
                  hint = 'select booking_guard.backoff_delay(1);';
    end if;
    if base_s is null or base_s <= 0 or max_s is null or max_s <= 0 or base_s > 86400 or max_s > 86400 then
        raise exception 'backoff_delay(): base and max_delay must be positive intervals of at most a day'
            using errcode = 'BG005',
                  detail = format('base: %s, max_delay: %s', coalesce(base::text, 'null'), coalesce(max_delay::text, 'null')),
                  hint = 'select booking_guard.backoff_delay(3, base => ''1 second'', max_delay => ''1 minute'');';
    end if;
    if factor is null or not factor between 1 and 100 then
        raise exception 'backoff_delay(): factor must be between 1 and 100, not %', coalesce(factor::text, 'null')
            using errcode = 'BG005',
                  detail = 'The delay grows by factor per attempt; below 1 it would shrink.',
                  hint = 'The default factor, 2, doubles the delay per attempt.';
    end if;
    if jitter is null or not jitter between 0 and 1 then
        raise exception 'backoff_delay(): jitter must be between 0 and 1, not %', coalesce(jitter::text, 'null')
            using errcode = 'BG005',
                  detail = 'jitter is the largest share of the delay added at random (strategy exponential).',
                  hint = 'The default jitter is 0.1 (0-10 %).';
    end if;
    if strategy is null or strategy not in ('exponential', 'seed', 'full') then
        raise exception 'backoff_delay(): unknown strategy %', coalesce(quote_literal(strategy), 'null')
            using errcode = 'BG005',
                  detail = 'Strategies: exponential (plus 0 to jitter of it; seed is its former name), full (uniform from 0 to the exponential).',
                  hint = 'select booking_guard.backoff_delay(2, strategy => ''full'');';
    end if;
    if not u >= 0 or not u < 1 then
        raise exception 'backoff_delay(): draw must be in [0, 1), not %', u
            using errcode = 'BG005',
                  detail = 'draw replaces the random number, for reproducible schedules.',
                  hint = 'Leave draw null for random().';
    end if;

    -- base * factor^(attempt - 1), capped; compared in logarithms so that no attempt overflows
    if factor = 1 or (attempt - 1) * ln(factor) < ln(max_s / base_s) then
        capped := least(max_s, base_s * power(factor, attempt - 1));
    else
        capped := max_s;
    end if;
    -- the jitter in numeric, rounded to the microsecond: a tiny draw must not underflow float8
    if strategy = 'full' then
        return make_interval(secs => round(capped::numeric * u::numeric, 6)::float8);
    end if;
    return make_interval(secs => round(capped::numeric * (1 + jitter::numeric * u::numeric), 6)::float8);
end
$$;

comment on function booking_guard.backoff_delay(integer, interval, double precision, interval, double precision, text,
                                                double precision) is
    'Delay before the next try after failed attempt number attempt (1, 2, ...): exponential = min(max_delay, base * factor^(attempt-1)) plus up to jitter of it (''seed'', the name 0.1.0 gave it, is still accepted); full = uniform in [0, that). draw replaces random(). Bad arguments are BG005.';

create function booking_guard.schedule_retry(call_id bigint, operation text, payload jsonb default '{}',
                                             max_attempts integer default 3, delay interval default null)
returns bigint
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_column
declare
    v_id  bigint;
begin
    if schedule_retry.operation is null or schedule_retry.operation !~ '^[a-z][a-z0-9_]{0,62}$' then
        raise exception 'schedule_retry(): an operation name is needed'
            using errcode = 'BG005',
                  detail = format('operation: %s (a lower-case identifier of at most 63 characters)',
                                  coalesce(quote_literal(left(schedule_retry.operation, 100)), 'null')),
                  hint = 'select booking_guard.schedule_retry(42, ''record_booking'', ''{"calcom_booking_id": "cal-1"}'');';
    end if;
    if schedule_retry.payload is null or jsonb_typeof(schedule_retry.payload) <> 'object'
       or pg_column_size(schedule_retry.payload) > 65536 then
        raise exception 'schedule_retry(): the payload must be a jsonb object of at most 64 kB'
            using errcode = 'BG005',
                  detail = format('payload: %s', coalesce(left(schedule_retry.payload::text, 200), 'null')),
                  hint = 'Pass what the worker needs to try again as an object.';
    end if;
    if schedule_retry.max_attempts is null or not schedule_retry.max_attempts between 1 and 100 then
        raise exception 'schedule_retry(): max_attempts must be between 1 and 100, not %',
                        coalesce(schedule_retry.max_attempts::text, 'null')
            using errcode = 'BG005',
                  detail = 'max_attempts counts the attempts the workers make.',
                  hint = 'The default is 3 attempts.';
    end if;
    if schedule_retry.delay < interval '0' or schedule_retry.delay > interval '1 day' then
        raise exception 'schedule_retry(): delay must be between 0 and a day, not %', schedule_retry.delay
            using errcode = 'BG005',
                  detail = 'delay is how long from now the first attempt is due; null means backoff_delay(1).',
                  hint = 'Pass ''0'' for at once.';
    end if;
    if (select count(*) from (select from booking_guard.retries t where t.status in ('pending', 'running')
                                 limit (select s.integer_value from booking_guard.settings s where s.name = 'retries_max_open')) o)
       >= (select s.integer_value from booking_guard.settings s where s.name = 'retries_max_open') then
        raise exception 'schedule_retry(): too many open retries'
            using errcode = 'BG005',
                  detail = format('retries_max_open is %s.', booking_guard.setting('retries_max_open')),
                  hint = 'Let the workers catch up (claim_retries()), or raise the limit with set_setting().';
    end if;
    insert into booking_guard.retries (call_id, operation, payload, max_attempts, due_at)
    values (schedule_retry.call_id, schedule_retry.operation, schedule_retry.payload, schedule_retry.max_attempts,
            now() + coalesce(schedule_retry.delay, booking_guard.backoff_delay(1)))
    returning id into v_id;
    perform booking_guard_internal.log_event('retry_scheduled', null, 'call', schedule_retry.call_id::text,
                                    jsonb_build_object('retry_id', v_id, 'operation', schedule_retry.operation,
                                                       'max_attempts', schedule_retry.max_attempts));
    return v_id;
end
$$;

comment on function booking_guard.schedule_retry(bigint, text, jsonb, integer, interval) is
    'Queues an operation (with what a worker needs in payload) to be tried up to max_attempts times; the first try is due after delay (default backoff_delay(1)). Returns the retry id.';

-- Records a failed attempt: the next one is due after backoff_delay(attempts), or, after the
-- last one, the retry has failed and the call goes to the review queue with the history.
create function booking_guard_internal.retry_attempt_failed(retry_id bigint, error text, worker text, as_of timestamptz)
returns booking_guard.retries
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    r  booking_guard.retries;
begin
    update booking_guard.retries t
       set history = t.history || jsonb_build_array(jsonb_build_object(
                         'attempt', t.attempts, 'at', as_of, 'ok', false, 'error', error, 'worker', worker)),
           last_error = error,
           status = case when t.attempts >= t.max_attempts then 'failed' else 'pending' end,
           due_at = case when t.attempts >= t.max_attempts then t.due_at
                         else as_of + booking_guard.backoff_delay(t.attempts) end,
           finished_at = case when t.attempts >= t.max_attempts then as_of end,
           claimed_by = null,
           claimed_at = null,
           updated_at = now()
     where t.id = retry_id
    returning t.* into r;
    perform booking_guard_internal.log_event('retry', r.operation, 'call', r.call_id::text,
                                    jsonb_build_object('retry_id', r.id, 'attempt', r.attempts, 'ok', false,
                                                       'error', error, 'status', r.status));
    if r.status = 'failed' then
        -- one item per retry (subject retry:<id>): a second exhausted retry of the call keeps its own history
        perform booking_guard_internal.queue_review(r.call_id, 'retry_exhausted',
            jsonb_build_object('retry_id', r.id, 'operation', r.operation, 'payload', r.payload,
                               'attempts', r.attempts, 'last_error', r.last_error, 'history', r.history),
            'retry:' || r.id);
    end if;
    return r;
end
$$;

comment on function booking_guard_internal.retry_attempt_failed(bigint, text, text, timestamptz) is
    'Internal: records a failed attempt of a retry; schedules the next by backoff_delay() or, after the last, fails it and queues the call for review (retry_exhausted) with the history.';

create function booking_guard.claim_retries(worker text, n integer default 10, as_of timestamptz default clock_timestamp())
returns setof booking_guard.retries
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_column
declare
    timeout  interval := (select s.interval_value from booking_guard.settings s where s.name = 'retry_claim_timeout');
    dead     record;
begin
    if claim_retries.worker is null or btrim(claim_retries.worker) = '' or length(claim_retries.worker) > 200 then
        raise exception 'claim_retries(): a worker name is needed'
            using errcode = 'BG005',
                  detail = 'The worker''s name is recorded with each claim and attempt.',
                  hint = 'select * from booking_guard.claim_retries(''worker-1'', 10);';
    end if;
    if claim_retries.n is null or not claim_retries.n between 1 and 1000 then
        raise exception 'claim_retries(): n must be between 1 and 1000, not %', coalesce(claim_retries.n::text, 'null')
            using errcode = 'BG005',
                  detail = 'n is how many due retries to claim at most.',
                  hint = 'select * from booking_guard.claim_retries(''worker-1'', 10);';
    end if;
    if claim_retries.as_of is null then
        raise exception 'claim_retries(): as_of must not be null'
            using errcode = 'BG005', detail = 'as_of is the time the claim is made at.',
                  hint = 'Leave it out for now.';
    end if;

    -- A claim that expired on the last attempt: that attempt failed (its worker is gone).
    for dead in
        select t.id, t.claimed_by
          from booking_guard.retries t
         where t.status = 'running' and t.claimed_at <= claim_retries.as_of - timeout
           and t.attempts >= t.max_attempts
         order by t.id
           for update skip locked
    loop
        perform booking_guard_internal.retry_attempt_failed(dead.id, 'claim expired: worker ' || dead.claimed_by || ' did not finish',
                                                   dead.claimed_by, claim_retries.as_of);
    end loop;

    return query
    update booking_guard.retries t
       set status = 'running',
           attempts = t.attempts + 1,
           claimed_by = claim_retries.worker,
           claimed_at = claim_retries.as_of,
           history = case when t.status = 'running'
                          then t.history || jsonb_build_array(jsonb_build_object(
                                   'attempt', t.attempts, 'at', claim_retries.as_of, 'ok', false,
                                   'error', 'claim expired: worker ' || t.claimed_by || ' did not finish',
                                   'worker', t.claimed_by))
                          else t.history end,
           updated_at = now()
     where t.id in (select c.id
                      from booking_guard.retries c
                     where (c.status = 'pending' and c.due_at <= claim_retries.as_of)
                        or (c.status = 'running' and c.claimed_at <= claim_retries.as_of - timeout
                            and c.attempts < c.max_attempts)
                     order by c.due_at, c.id
                     limit claim_retries.n
                       for update skip locked)
    returning t.*;
end
$$;

comment on function booking_guard.claim_retries(text, integer, timestamptz) is
    'Hands up to n due retries to a worker (FOR UPDATE SKIP LOCKED: concurrent workers never get the same one) and counts the attempt; a claim older than retry_claim_timeout comes back (on its last attempt it fails).';

create function booking_guard.finish_retry(retry_id bigint, ok boolean, error text default null, worker text default null)
returns booking_guard.retries
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    r  booking_guard.retries;
begin
    if ok is null or length(error) > 2000 or length(worker) > 200 then
        raise exception 'finish_retry(): ok must be true or false, the error at most 2000 characters'
            using errcode = 'BG005', detail = format('retry %s, ok: %s, error: %s characters', coalesce(retry_id::text, 'null'),
                                                     coalesce(ok::text, 'null'), coalesce(length(error), 0)),
                  hint = 'select booking_guard.finish_retry(7, false, ''calendar timed out'');';
    end if;
    select * into r from booking_guard.retries t where t.id = retry_id for update;
    if not found then
        raise exception 'unknown retry %', coalesce(retry_id::text, 'null')
            using errcode = 'BG004',
                  detail = format('No retry has id %s.', coalesce(retry_id::text, 'null')),
                  hint = 'select id, operation, status from booking_guard.retries where status = ''running'';';
    end if;
    if r.status <> 'running' or (worker is not null and r.claimed_by is distinct from worker) then
        raise exception 'retry % is not claimed by %', retry_id, coalesce(worker, 'anyone')
            using errcode = 'BG005',
                  detail = format('Its status is %s%s.', r.status,
                                  case when r.claimed_by is not null then ', claimed by ' || r.claimed_by else '' end),
                  hint = 'Finish only a retry your worker claimed with claim_retries() and has not finished yet '
                         '(a claim older than retry_claim_timeout may have gone to another worker).';
    end if;
    if not ok then
        return booking_guard_internal.retry_attempt_failed(retry_id, coalesce(error, 'failed'), r.claimed_by, clock_timestamp());
    end if;
    update booking_guard.retries t
       set status = 'succeeded',
           history = t.history || jsonb_build_array(jsonb_build_object(
                         'attempt', t.attempts, 'at', clock_timestamp(), 'ok', true, 'worker', t.claimed_by)),
           finished_at = clock_timestamp(),
           claimed_at = null,
           updated_at = now()
     where t.id = retry_id
    returning t.* into r;
    perform booking_guard_internal.log_event('retry', r.operation, 'call', r.call_id::text,
                                    jsonb_build_object('retry_id', r.id, 'attempt', r.attempts, 'ok', true,
                                                       'status', r.status));
    return r;
end
$$;

comment on function booking_guard.finish_retry(bigint, boolean, text, text) is
    'Records the outcome of a claimed retry: ok ends it; a failure schedules the next attempt after backoff_delay(attempts), or after the last one fails it and queues the call for review (retry_exhausted) with its history.';
