-- Circuit breaker: a state machine per key (closed, open, half_open) shared by every session,
-- with the policy of the longest matching key pattern. A policy opens a breaker after
-- failure_threshold consecutive failures (sliding_window_type consecutive, the default), or on the
-- failure rate or the slow-call rate over a sliding window of its last calls (count_based) or last
-- seconds (time_based). A call may run under several scopes at once (a service, a staff member, a
-- global breaker): one permit covers them all, and its result counts for each.

create trigger circuit_policies_replace_seeded_row
    before insert on booking_guard.circuit_policies
    for each row execute function booking_guard_internal.replace_seeded_row('key_pattern');

-- The CHECK constraints of circuit_policies are the last line; this names the column, the value and
-- the range before they are reached (BG005 like every other bad input).
create function booking_guard_internal.circuit_policy_check()
returns trigger
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    v_column  text;
    v_value   text;
    v_range   text;
begin
    if new.key_pattern is null or new.key_pattern = '' or length(new.key_pattern) > 255 or new.key_pattern ~ '[[:cntrl:]]' then
        v_column := 'key_pattern'; v_value := left(new.key_pattern, 300);
        v_range := '1 to 255 printable characters, a LIKE pattern such as appointment_booking:service:%';
    elsif new.failure_threshold is null or new.failure_threshold not between 1 and 1000 then
        v_column := 'failure_threshold'; v_value := new.failure_threshold; v_range := '1 to 1000 consecutive failures';
    elsif new.cooldown is null or new.cooldown <= interval '0' or new.cooldown > interval '1 day' then
        v_column := 'cooldown'; v_value := new.cooldown; v_range := 'more than 0 and at most 1 day';
    elsif new.success_threshold is null or new.success_threshold not between 1 and 1000 then
        v_column := 'success_threshold'; v_value := new.success_threshold; v_range := '1 to 1000 consecutive successes';
    elsif new.half_open_max_calls is null or new.half_open_max_calls not between 1 and 1000 then
        v_column := 'half_open_max_calls'; v_value := new.half_open_max_calls; v_range := '1 to 1000 trial calls';
    elsif new.call_timeout is null or new.call_timeout <= interval '0' or new.call_timeout > interval '1 hour' then
        v_column := 'call_timeout'; v_value := new.call_timeout; v_range := 'more than 0 and at most 1 hour';
    elsif new.sliding_window_type is null or new.sliding_window_type not in ('consecutive', 'count_based', 'time_based') then
        v_column := 'sliding_window_type'; v_value := left(new.sliding_window_type, 300);
        v_range := 'consecutive, count_based or time_based';
    elsif new.sliding_window_size is null or new.sliding_window_size not between 1 and 3600
          or (new.sliding_window_type = 'count_based' and new.sliding_window_size > 1000) then
        v_column := 'sliding_window_size'; v_value := new.sliding_window_size;
        v_range := '1 to 1000 calls (count_based) or 1 to 3600 seconds (time_based)';
    elsif new.minimum_number_of_calls is null or new.minimum_number_of_calls not between 1 and 100000 then
        v_column := 'minimum_number_of_calls'; v_value := new.minimum_number_of_calls; v_range := '1 to 100000 calls';
    elsif new.failure_rate_threshold is null or new.failure_rate_threshold <= 0 or new.failure_rate_threshold > 100 then
        v_column := 'failure_rate_threshold'; v_value := new.failure_rate_threshold; v_range := 'a percentage, more than 0 and at most 100';
    elsif new.slow_call_rate_threshold is null or new.slow_call_rate_threshold <= 0 or new.slow_call_rate_threshold > 100 then
        v_column := 'slow_call_rate_threshold'; v_value := new.slow_call_rate_threshold;
        v_range := 'a percentage, more than 0 and at most 100';
    elsif new.slow_call_duration_threshold is null or new.slow_call_duration_threshold <= interval '0'
          or new.slow_call_duration_threshold > interval '1 day' then
        v_column := 'slow_call_duration_threshold'; v_value := new.slow_call_duration_threshold; v_range := 'more than 0 and at most 1 day';
    else
        return new;
    end if;
    raise exception 'invalid circuit breaker policy: % is out of range', v_column
        using errcode = 'BG005',
              detail = format('key_pattern %s: %s = %s; allowed: %s.', coalesce(quote_literal(left(new.key_pattern, 300)), 'null'),
                              v_column, coalesce(v_value, 'null'), v_range),
              hint = 'Each option and its range: \d+ booking_guard.circuit_policies (column comments).';
end
$$;

comment on function booking_guard_internal.circuit_policy_check() is
    'Trigger: raises BG005 naming the column, its value and its range when a circuit_policies row is out of bounds.';

create trigger circuit_policies_check
    before insert or update on booking_guard.circuit_policies
    for each row execute function booking_guard_internal.circuit_policy_check();

-- The breaker's clock. clock_timestamp(), not now(): now() is the start of the caller's transaction,
-- and a call that waited for the breaker row (or runs late in a longer transaction) would then judge
-- cooldowns and leases by a time older than the state it has just read, and could even store an
-- opened_at earlier than one already committed. Read after the row lock, clock_timestamp() orders
-- every change of a key the way it really happened.
-- booking_guard.clock_offset shifts this clock for tests (no test sleeps through a 30 s cooldown), and
-- booking_guard.clock_at stops it at a given time (for tests that compare against a model at exact
-- boundaries). Both are honoured for superusers only: a skewed session could otherwise store an
-- opened_at in the future and keep a breaker open for every other session.
create function booking_guard_internal.circuit_now()
returns timestamptz
language plpgsql
volatile
set search_path = pg_catalog, pg_temp
as $$
declare
    v_offset  text := nullif(current_setting('booking_guard.clock_offset', true), '');
    v_at      text := nullif(current_setting('booking_guard.clock_at', true), '');
begin
    if v_offset is null and v_at is null then
        return clock_timestamp();
    end if;
    if not coalesce((select r.rolsuper from pg_catalog.pg_roles r where r.rolname = session_user), false) then
        raise exception 'booking_guard.clock_offset and booking_guard.clock_at are reserved for superusers'
            using errcode = 'BG005',
                  detail = format('Session user %s set booking_guard.clock_offset = %s, booking_guard.clock_at = %s.',
                                  session_user, coalesce(v_offset, 'unset'), coalesce(v_at, 'unset')),
                  hint = 'RESET booking_guard.clock_offset; RESET booking_guard.clock_at; they exist to test the circuit breaker without waiting.';
    end if;
    begin
        if v_at is not null then
            return v_at::timestamptz;
        end if;
        return clock_timestamp() + v_offset::interval;
    exception when data_exception then
        raise exception 'invalid booking_guard.clock_offset or booking_guard.clock_at: "%"', coalesce(v_at, v_offset)
            using errcode = 'BG005',
                  detail = format('The server said: %s', sqlerrm),
                  hint = 'clock_offset is an interval (''31 seconds''), clock_at a timestamptz.';
    end;
end
$$;

comment on function booking_guard_internal.circuit_now() is
    'The circuit breaker''s clock: clock_timestamp(); for superusers (tests) shifted by booking_guard.clock_offset or stopped at booking_guard.clock_at.';

create function booking_guard_internal.circuit_check_key(key text)
returns void
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
    if key is null or key !~ '\S' or length(key) > 255 or key ~ '[[:cntrl:]]' then
        raise exception 'invalid circuit breaker key'
            using errcode = 'BG005',
                  detail = format('key: %s', coalesce(quote_literal(left(key, 300)), 'null')),
                  hint = 'A key is 1 to 255 printable characters, e.g. appointment_booking:service:42.';
    end if;
end
$$;

comment on function booking_guard_internal.circuit_check_key(text) is
    'Raises BG005 unless the key is 1 to 255 printable characters (the key ends the BG001 DETAIL line, so no control characters).';

-- The scopes of one call: 1 to 16 valid keys, each once, in one order (every session locks the
-- breaker rows of several scopes in this order, so two composed calls never wait for each other
-- in a cycle).
create function booking_guard_internal.circuit_check_keys(keys text[])
returns text[]
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    k  text;
begin
    if keys is null or cardinality(keys) not between 1 and 16 then
        raise exception 'invalid circuit breaker scopes: % keys', coalesce(cardinality(keys)::text, 'null')
            using errcode = 'BG005',
                  detail = format('keys: %s', coalesce(left(keys::text, 300), 'null')),
                  hint = 'Pass 1 to 16 keys as a text[], e.g. array[''appointment_booking:service:3'', ''appointment_booking:global''].';
    end if;
    foreach k in array keys loop
        perform booking_guard_internal.circuit_check_key(k);
    end loop;
    return array(select d.k from (select distinct u.k from unnest(keys) u(k)) d order by d.k collate "C");
end
$$;

comment on function booking_guard_internal.circuit_check_keys(text[]) is
    'Raises BG005 unless 1 to 16 valid keys are given; returns them without duplicates, in the order breaker rows are locked in.';

create function booking_guard_internal.circuit_check_duration(duration interval)
returns void
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
    if duration < interval '0' or duration > interval '1 day' then
        raise exception 'invalid call duration: %', duration
            using errcode = 'BG005',
                  detail = format('duration: %s; allowed: 0 to 1 day, or null.', duration),
                  hint = 'Pass how long the call took (e.g. interval ''850 milliseconds''), or null to let the breaker measure a trial call from its permit.';
    end if;
end
$$;

comment on function booking_guard_internal.circuit_check_duration(interval) is
    'Raises BG005 unless a reported call duration is null or between 0 and 1 day.';

-- The buckets of a time_based window of `size` seconds: at most 60, each `width` whole seconds
-- (1 s up to a 60 s window), so that a window stays small whatever its size.
create function booking_guard_internal.circuit_buckets(size integer, out width integer, out buckets integer)
language plpgsql
immutable
set search_path = pg_catalog, pg_temp
as $$
begin
    width := (size + 59) / 60;
    buckets := (size + width - 1) / width;
end
$$;

comment on function booking_guard_internal.circuit_buckets(integer) is
    'The buckets of a time_based window of size seconds: width seconds each (ceil(size / 60)), and how many (ceil(size / width), at most 60).';

-- The minimum number of calls before a window's rates count: in closed state that of the policy
-- (count_based: at most the window size); in half-open at most the trial calls permitted.
create function booking_guard_internal.circuit_minimum_calls(policy booking_guard.circuit_policies, state text)
returns integer
language plpgsql
immutable
set search_path = pg_catalog, pg_temp
as $$
begin
    return case
               when state = 'half_open' then least(policy.minimum_number_of_calls, policy.half_open_max_calls)
               when policy.sliding_window_type = 'count_based' then least(policy.minimum_number_of_calls, policy.sliding_window_size)
               else policy.minimum_number_of_calls
           end;
end
$$;

comment on function booking_guard_internal.circuit_minimum_calls(booking_guard.circuit_policies, text) is
    'Calls a window must hold before its rates count: minimum_number_of_calls, at most the window size (count_based) or the trial calls permitted (half-open).';

-- A window with no calls: an all-zero ring (count_based) or buckets (time_based) of its size.
create function booking_guard_internal.circuit_window_empty(w booking_guard_internal.circuit_windows)
returns booking_guard_internal.circuit_windows
language plpgsql
immutable
set search_path = pg_catalog, pg_temp
as $$
begin
    w.calls := 0;
    w.failures := 0;
    w.slow_calls := 0;
    w.head := 0;
    w.bucket_width := null;
    w.outcomes := null;
    w.buckets := null;
    if w.sliding_window_type = 'count_based' then
        w.outcomes := decode(repeat('00', w.sliding_window_size), 'hex');
    else
        w.bucket_width := (booking_guard_internal.circuit_buckets(w.sliding_window_size)).width;
        w.buckets := array_fill(0, array[3 * (booking_guard_internal.circuit_buckets(w.sliding_window_size)).buckets]);
    end if;
    return w;
end
$$;

comment on function booking_guard_internal.circuit_window_empty(booking_guard_internal.circuit_windows) is
    'A window emptied: no calls, and an all-zero ring (count_based) or buckets (time_based) of its size.';

-- The window of a key as its policy asks for it now: none for consecutive failures; the same
-- window with the policy's current thresholds when it was built for that policy row and shape;
-- else an empty one (a window is only ever read with the shape it was built for).
create function booking_guard_internal.circuit_window_for(w booking_guard_internal.circuit_windows, key text,
                                                          policy booking_guard.circuit_policies)
returns booking_guard_internal.circuit_windows
language plpgsql
stable
set search_path = pg_catalog, pg_temp
as $$
begin
    if policy.sliding_window_type = 'consecutive' then
        return null;
    end if;
    if w.key is null or w.policy_pattern is distinct from policy.key_pattern
       or w.sliding_window_type is distinct from policy.sliding_window_type
       or w.sliding_window_size is distinct from policy.sliding_window_size then
        w := null;
        w.key := key;
        w.policy_pattern := policy.key_pattern;
        w.sliding_window_type := policy.sliding_window_type;
        w.sliding_window_size := policy.sliding_window_size;
        w := booking_guard_internal.circuit_window_empty(w);
    end if;
    w.minimum_number_of_calls := booking_guard_internal.circuit_minimum_calls(policy, 'closed');
    w.failure_rate_threshold := policy.failure_rate_threshold;
    w.slow_call_rate_threshold := policy.slow_call_rate_threshold;
    w.slow_call_duration_threshold := policy.slow_call_duration_threshold;
    return w;
end
$$;

comment on function booking_guard_internal.circuit_window_for(booking_guard_internal.circuit_windows, text, booking_guard.circuit_policies) is
    'The window of a key as its policy asks for it now: null (consecutive failures), the same window with the policy''s current thresholds, or an empty one when the policy row or the window''s type or size changed.';

-- One call's result into the window of a closed breaker: count_based drops the call recorded
-- sliding_window_size calls ago; time_based first drops the buckets that have left the window.
create function booking_guard_internal.circuit_window_add(inout w booking_guard_internal.circuit_windows,
                                                          at timestamptz, failed boolean, slow boolean)
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    v_failed  integer := failed::integer;
    v_slow    integer := slow::integer;
    v_pos     integer;
    v_old     integer;
    v_count   integer;
    v_bucket  bigint;
    v_slot    integer;
begin
    if w.sliding_window_type = 'count_based' then
        v_pos := (w.head % w.sliding_window_size)::integer;
        if w.head >= w.sliding_window_size then
            v_old := get_byte(w.outcomes, v_pos);
            w.calls := w.calls - 1;
            w.failures := w.failures - (v_old & 1);
            w.slow_calls := w.slow_calls - ((v_old >> 1) & 1);
        end if;
        w.outcomes := set_byte(w.outcomes, v_pos, v_failed | (v_slow << 1));
        w.head := w.head + 1;
    else
        v_count := cardinality(w.buckets) / 3;
        v_bucket := floor(extract(epoch from at) / w.bucket_width)::bigint;
        if v_bucket > w.head then
            -- the buckets between the newest one and now leave the window (at most all of them)
            for i in 1 .. least(v_bucket - w.head, v_count) loop
                v_slot := 3 * ((w.head + i) % v_count)::integer;
                w.calls := w.calls - w.buckets[v_slot + 1];
                w.failures := w.failures - w.buckets[v_slot + 2];
                w.slow_calls := w.slow_calls - w.buckets[v_slot + 3];
                w.buckets[v_slot + 1] := 0;
                w.buckets[v_slot + 2] := 0;
                w.buckets[v_slot + 3] := 0;
            end loop;
            w.head := v_bucket;
        end if;
        -- a time before the newest bucket (a clock set back) counts in the newest bucket
        v_slot := 3 * (w.head % v_count)::integer;
        w.buckets[v_slot + 1] := w.buckets[v_slot + 1] + 1;
        w.buckets[v_slot + 2] := w.buckets[v_slot + 2] + v_failed;
        w.buckets[v_slot + 3] := w.buckets[v_slot + 3] + v_slow;
    end if;
    w.calls := w.calls + 1;
    w.failures := w.failures + v_failed;
    w.slow_calls := w.slow_calls + v_slow;
end
$$;

comment on function booking_guard_internal.circuit_window_add(booking_guard_internal.circuit_windows, timestamptz, boolean, boolean) is
    'Adds one call (failed or not, slow or not) to the sliding window of a closed breaker, dropping what leaves the window.';

-- One trial call into the window of a half-open breaker: it only counts them (half_open_max_calls at most).
create function booking_guard_internal.circuit_window_trial(inout w booking_guard_internal.circuit_windows,
                                                            failed boolean, slow boolean)
language plpgsql
immutable
set search_path = pg_catalog, pg_temp
as $$
begin
    w.calls := w.calls + 1;
    w.failures := w.failures + failed::integer;
    w.slow_calls := w.slow_calls + slow::integer;
end
$$;

comment on function booking_guard_internal.circuit_window_trial(booking_guard_internal.circuit_windows, boolean, boolean) is
    'Counts one trial call (failed or not, slow or not) in the window of a half-open breaker.';

-- The window's totals at a time, writing nothing (circuit_status): time_based leaves out the
-- buckets that have left the window since the last call was recorded.
create function booking_guard_internal.circuit_window_at(w booking_guard_internal.circuit_windows, state text, at timestamptz,
                                                         out calls integer, out failures integer, out slow_calls integer)
language plpgsql
stable
set search_path = pg_catalog, pg_temp
as $$
declare
    v_count   integer;
    v_bucket  bigint;
begin
    calls := w.calls;
    failures := w.failures;
    slow_calls := w.slow_calls;
    if state <> 'closed' or w.sliding_window_type <> 'time_based' then
        return;
    end if;
    v_count := cardinality(w.buckets) / 3;
    v_bucket := floor(extract(epoch from at) / w.bucket_width)::bigint;
    if v_bucket <= w.head then
        return;
    end if;
    -- slot s holds bucket head - ((head - s) mod count); it is in the window if newer than now - count
    select coalesce(sum(w.buckets[3 * s + 1]), 0), coalesce(sum(w.buckets[3 * s + 2]), 0), coalesce(sum(w.buckets[3 * s + 3]), 0)
      into calls, failures, slow_calls
      from generate_series(0, v_count - 1) s
     where w.head - (((w.head - s) % v_count) + v_count) % v_count > v_bucket - v_count;
end
$$;

comment on function booking_guard_internal.circuit_window_at(booking_guard_internal.circuit_windows, text, timestamptz) is
    'The calls, failures and slow calls of a breaker''s window at a time, writing nothing (time_based: without the buckets that have left it).';

-- Whether the rates of a window open the breaker: the reason (failure_rate or slow_call_rate, with
-- the figures) when its calls reach the minimum and a rate reaches its threshold, else null.
create function booking_guard_internal.circuit_rates_exceeded(w booking_guard_internal.circuit_windows, minimum integer, what text)
returns text
language plpgsql
immutable
set search_path = pg_catalog, pg_temp
as $$
begin
    return case
               when w.calls < greatest(minimum, 1) then null
               when w.failures * 100 >= w.failure_rate_threshold * w.calls
                   then format('failure_rate: %s of %s %s failed (%s%% >= %s%%)', w.failures, w.calls, what,
                               round(w.failures * 100.0 / w.calls, 2), w.failure_rate_threshold)
               when w.slow_calls * 100 >= w.slow_call_rate_threshold * w.calls
                   then format('slow_call_rate: %s of %s %s slower than %s (%s%% >= %s%%)', w.slow_calls, w.calls, what,
                               w.slow_call_duration_threshold, round(w.slow_calls * 100.0 / w.calls, 2), w.slow_call_rate_threshold)
           end;
end
$$;

comment on function booking_guard_internal.circuit_rates_exceeded(booking_guard_internal.circuit_windows, integer, text) is
    'The reason a window''s failure rate or slow-call rate opens the breaker (calls at least the minimum, a rate at or above its threshold), else null.';

-- (PL/pgSQL, not SQL: its plan is kept for the session instead of made at every call)
create function booking_guard_internal.circuit_policy(key text)
returns booking_guard.circuit_policies
language plpgsql
stable
set search_path = pg_catalog, pg_temp
as $$
declare
    p  booking_guard.circuit_policies;
begin
    select c.key_pattern, c.failure_threshold, c.cooldown, c.success_threshold, c.half_open_max_calls, c.call_timeout,
           c.sliding_window_type, c.sliding_window_size, c.minimum_number_of_calls, c.failure_rate_threshold,
           c.slow_call_rate_threshold, c.slow_call_duration_threshold
      into p
      from (select x.*, false as builtin
              from booking_guard.circuit_policies x
             where circuit_policy.key like x.key_pattern
            union all
            -- the built-in defaults when the % row has been deleted: a breaker never runs without a policy
            select '%', 3, interval '30 seconds', 2, 1, interval '10 seconds',
                   'consecutive', 100, 100, 50, 100, interval '60 seconds', true) c
     -- longest by its literal characters, so that appointment_booking:staff:7 beats appointment_booking:staff:%
     order by length(translate(c.key_pattern, '%_', '')) desc, length(c.key_pattern) desc, c.builtin, c.key_pattern
     limit 1;
    return p;
end
$$;

comment on function booking_guard_internal.circuit_policy(text) is
    'The policy of a key: the matching key_pattern of circuit_policies with the most literal (non-wildcard) characters (built-in defaults if none matches).';

-- Writes the working copies of a breaker and its window (the caller holds both row locks, the
-- window's first). The window takes from the breaker whether it is closed and its latest
-- transition, which the one-statement path of a result reads from it.
create function booking_guard_internal.circuit_store(b booking_guard.circuit_breakers, w booking_guard_internal.circuit_windows,
                                                     at timestamptz)
returns void
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
    update booking_guard.circuit_breakers c
       set state = b.state, failure_count = b.failure_count, success_count = b.success_count,
           last_failure_at = b.last_failure_at, opened_at = b.opened_at, closed_at = b.closed_at,
           forced_until = b.forced_until, updated_at = at, window_type = w.sliding_window_type,
           last_transition_id = b.last_transition_id
     where c.key = b.key;
    if w.key is not null then
        insert into booking_guard_internal.circuit_windows as x
               (key, policy_pattern, sliding_window_type, sliding_window_size, bucket_width, minimum_number_of_calls,
                failure_rate_threshold, slow_call_rate_threshold, slow_call_duration_threshold, closed, last_transition_id,
                calls, failures, slow_calls, head, outcomes, buckets)
        values (b.key, w.policy_pattern, w.sliding_window_type, w.sliding_window_size, w.bucket_width, w.minimum_number_of_calls,
                w.failure_rate_threshold, w.slow_call_rate_threshold, w.slow_call_duration_threshold, b.state = 'closed',
                b.last_transition_id, w.calls, w.failures, w.slow_calls, w.head, w.outcomes, w.buckets)
        on conflict (key) do update
           set policy_pattern = excluded.policy_pattern, sliding_window_type = excluded.sliding_window_type,
               sliding_window_size = excluded.sliding_window_size, bucket_width = excluded.bucket_width,
               minimum_number_of_calls = excluded.minimum_number_of_calls, failure_rate_threshold = excluded.failure_rate_threshold,
               slow_call_rate_threshold = excluded.slow_call_rate_threshold,
               slow_call_duration_threshold = excluded.slow_call_duration_threshold, closed = excluded.closed,
               last_transition_id = excluded.last_transition_id, calls = excluded.calls, failures = excluded.failures,
               slow_calls = excluded.slow_calls, head = excluded.head, outcomes = excluded.outcomes, buckets = excluded.buckets;
    elsif b.window_type is not null then
        delete from booking_guard_internal.circuit_windows x where x.key = b.key;
    end if;
end
$$;

comment on function booking_guard_internal.circuit_store(booking_guard.circuit_breakers, booking_guard_internal.circuit_windows, timestamptz) is
    'Writes the working copies of a breaker and of its window (none: deleted) back; callers hold both row locks.';

-- A breaker row for a key not seen before: every key is a row and a set of metric series, so
-- there are at most circuit_max_keys of them (one role cannot grow them without bound).
create function booking_guard_internal.circuit_add_key(key text)
returns void
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    v_max    bigint;
    v_added  integer;
    b        booking_guard.circuit_breakers;
    w        booking_guard_internal.circuit_windows;
begin
    if exists (select from booking_guard.circuit_breakers c where c.key = circuit_add_key.key) then
        return;
    end if;
    perform booking_guard_internal.circuit_check_key(circuit_add_key.key);
    v_max := (select s.integer_value from booking_guard.settings s where s.name = 'circuit_max_keys');
    if (select count(*) from (select from booking_guard.circuit_breakers limit v_max) b) >= v_max then
        raise exception 'too many circuit breaker keys: % exist', v_max
            using errcode = 'BG005',
                  detail = format('circuit_max_keys is %s; the key %s would be one more.', v_max, quote_literal(circuit_add_key.key)),
                  hint = 'Use a bounded set of keys (per service, per staff member, global), or raise the limit with '
                         'set_setting(''circuit_max_keys'', ...).';
    end if;
    insert into booking_guard.circuit_breakers as c (key) values (circuit_add_key.key)
        on conflict on constraint circuit_breakers_pkey do nothing
    returning c.* into b;
    get diagnostics v_added = row_count;
    if v_added = 1 then
        w := booking_guard_internal.circuit_window_for(null, circuit_add_key.key,
                                                       booking_guard_internal.circuit_policy(circuit_add_key.key));
        if w.key is not null then
            perform booking_guard_internal.circuit_store(b, w, b.updated_at);
        end if;
    end if;
end
$$;

comment on function booking_guard_internal.circuit_add_key(text) is
    'Adds the breaker row of a new key, and the window its policy asks for: BG005 for an invalid key or past circuit_max_keys keys.';

-- A policy row that comes, goes, or changes its pattern, window type or window size moves keys to
-- another policy or changes the shape of their window: each such key gets the window of its policy
-- now (empty, unless it was built for that policy row and shape). A change of a threshold, the
-- minimum or the slow-call duration goes to the windows of that policy row, which keep their calls.
create function booking_guard_internal.circuit_policies_changed()
returns trigger
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_patterns  text[];
    k           text;
    b           booking_guard.circuit_breakers;
    w0          booking_guard_internal.circuit_windows;
    w           booking_guard_internal.circuit_windows;
begin
    if tg_op = 'TRUNCATE' then
        v_patterns := array['%'];
    elsif tg_op = 'UPDATE' then
        if old.key_pattern = new.key_pattern and old.sliding_window_type = new.sliding_window_type
           and old.sliding_window_size = new.sliding_window_size then
            update booking_guard_internal.circuit_windows x
               set minimum_number_of_calls = booking_guard_internal.circuit_minimum_calls(new, 'closed'),
                   failure_rate_threshold = new.failure_rate_threshold, slow_call_rate_threshold = new.slow_call_rate_threshold,
                   slow_call_duration_threshold = new.slow_call_duration_threshold
             where x.policy_pattern = new.key_pattern;
            return null;
        end if;
        v_patterns := array[old.key_pattern, new.key_pattern];
    elsif tg_op = 'INSERT' then
        v_patterns := array[new.key_pattern];
    else
        v_patterns := array[old.key_pattern];
    end if;
    for k in
        select c.key from booking_guard.circuit_breakers c
         where c.key like any (v_patterns)
            or c.key in (select x.key from booking_guard_internal.circuit_windows x where x.policy_pattern = any (v_patterns))
         order by c.key collate "C"
    loop
        select * into w0 from booking_guard_internal.circuit_windows x where x.key = k for update;   -- the window first
        select * into b from booking_guard.circuit_breakers c where c.key = k for update;
        w := booking_guard_internal.circuit_window_for(w0, k, booking_guard_internal.circuit_policy(k));
        if w is distinct from w0 then
            perform booking_guard_internal.circuit_store(b, w, now());
        end if;
    end loop;
    return null;
end
$$;

comment on function booking_guard_internal.circuit_policies_changed() is
    'Trigger: gives the keys whose policy row or window shape changed the window of their policy now; passes a new threshold to the windows of its policy row.';

create trigger circuit_policies_changed
    after insert or update or delete on booking_guard.circuit_policies
    for each row execute function booking_guard_internal.circuit_policies_changed();

create trigger circuit_policies_truncated
    after truncate on booking_guard.circuit_policies
    for each statement execute function booking_guard_internal.circuit_policies_changed();

-- Appends a transition: the row, the end of the key's permits (they belong to the previous state),
-- and NOTIFY booking_guard_circuit with its id (delivered at COMMIT).
create function booking_guard_internal.circuit_transition(key text, from_state text, to_state text,
                                                 happened_at timestamptz, reason text)
returns bigint
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    v_id  bigint;
begin
    insert into booking_guard.circuit_transitions as t (key, from_state, to_state, at, reason)
    values (circuit_transition.key, circuit_transition.from_state, circuit_transition.to_state,
            circuit_transition.happened_at, circuit_transition.reason)
    returning t.id into v_id;
    delete from booking_guard.circuit_permits p where p.key = circuit_transition.key;
    -- the transition's id only: any role may LISTEN on any channel, and the reason may quote an error
    perform pg_notify('booking_guard_circuit', v_id::text);
    return v_id;
end
$$;

comment on function booking_guard_internal.circuit_transition(text, text, text, timestamptz, text) is
    'Records one state change of a breaker (row, end of its permits, NOTIFY booking_guard_circuit with its id); callers hold the breaker row lock.';

-- The verdict of a half-open breaker whose policy has rates: none until the trial calls reported
-- reach the minimum (at most half_open_max_calls), then open if a rate reaches its threshold, else closed.
create function booking_guard_internal.circuit_trial_verdict(w booking_guard_internal.circuit_windows,
                                                             policy booking_guard.circuit_policies,
                                                             out to_state text, out reason text)
language plpgsql
immutable
set search_path = pg_catalog, pg_temp
as $$
begin
    if w.calls < booking_guard_internal.circuit_minimum_calls(policy, 'half_open') then
        return;
    end if;
    reason := booking_guard_internal.circuit_rates_exceeded(w, 0, 'trial calls');
    if reason is not null then
        to_state := 'open';
        return;
    end if;
    to_state := 'closed';
    reason := format('trial_rates: %s of %s trial calls failed, %s slow (below %s%% and %s%%)', w.failures, w.calls, w.slow_calls,
                     w.failure_rate_threshold, w.slow_call_rate_threshold);
end
$$;

comment on function booking_guard_internal.circuit_trial_verdict(booking_guard_internal.circuit_windows, booking_guard.circuit_policies) is
    'Half-open with rates: no verdict before the minimum of trial calls has reported; then open (a rate at its threshold) or closed, with the reason.';

-- The time-driven part of the state machine, replayed up to `clock`: open -> half_open when the cooldown
-- (and any forced_until) has passed; in half-open a trial lease that ran out is a failed trial call at
-- its end (consecutive: it reopens the breaker; with rates: it counts toward the trial calls' rates,
-- which may reopen or close it). With apply the transitions are written and expired leases deleted (the
-- caller holds the row locks and stores b and w); without it nothing is written and the outcome is only
-- computed (circuit_state, circuit_status). w is the key's window (null for consecutive failures).
create function booking_guard_internal.circuit_advance(inout b booking_guard.circuit_breakers,
                                              inout w booking_guard_internal.circuit_windows,
                                              policy booking_guard.circuit_policies,
                                              clock timestamptz, apply boolean,
                                              out steps integer, out opens integer,
                                              out last_from text, out last_to text,
                                              out last_at timestamptz, out last_reason text)
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    v_reopen      timestamptz;
    v_permit      bigint;
    v_expired     timestamptz;
    v_verdict     record;
    v_decided     boolean;
    v_fresh       boolean := false;   -- a transition happened here: the key has no permits any more
    v_rates       boolean := w.key is not null;
    v_slow        boolean := policy.call_timeout > policy.slow_call_duration_threshold;   -- an expired trial took call_timeout
begin
    steps := 0;
    opens := 0;
    -- at most half_open -> open -> half_open (a fresh half-open has no permits): a bound, not a wait
    for i in 1 .. 4 loop
        if b.state = 'open' then
            v_reopen := greatest(b.opened_at + policy.cooldown, b.forced_until);
            exit when clock < v_reopen;
            last_reason := case when b.forced_until is not null and b.forced_until >= b.opened_at + policy.cooldown
                                then 'forced_until_passed' else 'cooldown_elapsed' end;
            last_from := 'open';
            last_to := 'half_open';
            last_at := v_reopen;
            b.state := 'half_open';
            b.success_count := 0;
            b.forced_until := null;
            if v_rates then
                w := booking_guard_internal.circuit_window_empty(w);   -- it counts the trial calls
            end if;
        elsif b.state = 'half_open' and not v_fresh and not v_rates then
            select p.permit, p.expires_at into v_permit, v_expired
              from booking_guard.circuit_permits p
             where p.key = b.key and p.expires_at < clock
             order by p.expires_at, p.permit
             limit 1;
            exit when not found;
            last_reason := format('call_timeout: trial permit %s not reported within %s', v_permit, policy.call_timeout);
            last_from := 'half_open';
            last_to := 'open';
            last_at := v_expired;
            b.state := 'open';
            b.opened_at := v_expired;
            b.success_count := 0;
            b.failure_count := b.failure_count + 1;
            b.last_failure_at := v_expired;
            opens := opens + 1;
        elsif b.state = 'half_open' and not v_fresh then
            v_decided := false;
            for v_permit, v_expired in
                select p.permit, p.expires_at
                  from booking_guard.circuit_permits p
                 where p.key = b.key and p.expires_at < clock
                 order by p.expires_at, p.permit
            loop
                if apply then
                    delete from booking_guard.circuit_permits p where p.key = b.key and p.permit = v_permit;
                end if;
                w := booking_guard_internal.circuit_window_trial(w, true, v_slow);
                b.last_failure_at := v_expired;
                select * into v_verdict from booking_guard_internal.circuit_trial_verdict(w, policy);
                continue when v_verdict.to_state is null;
                v_decided := true;
                last_from := 'half_open';
                last_to := v_verdict.to_state;
                last_at := v_expired;
                last_reason := v_verdict.reason
                               || format(' (trial permit %s not reported within %s)', v_permit, policy.call_timeout);
                b.state := v_verdict.to_state;
                b.success_count := 0;
                if b.state = 'open' then
                    b.opened_at := v_expired;
                    opens := opens + 1;
                else
                    b.closed_at := v_expired;
                    w := booking_guard_internal.circuit_window_empty(w);
                end if;
                exit;
            end loop;
            exit when not v_decided;
        else
            exit;
        end if;
        steps := steps + 1;
        v_fresh := true;
        if apply then
            b.last_transition_id := booking_guard_internal.circuit_transition(b.key, last_from, last_to, last_at, last_reason);
        end if;
    end loop;
end
$$;

comment on function booking_guard_internal.circuit_advance(booking_guard.circuit_breakers, booking_guard_internal.circuit_windows, booking_guard.circuit_policies, timestamptz, boolean) is
    'Replays the time-driven transitions of a breaker up to a time (cooldown elapsed, trial lease expired as a failed trial call); writes them only with apply.';

-- Whether a call under the given scopes may run, as values (the core of circuit_acquire and
-- circuit_try_acquire). Every scope must admit it: a closed breaker always does; an open one not
-- before its cooldown has passed; a half-open one while it has trial calls left (consecutive: at
-- most half_open_max_calls at a time; with rates: half_open_max_calls in all until the trial calls
-- decide). The permit is then one number for all scopes, and a trial permit of each half-open one.
-- A refusal names the scope that makes the caller wait longest, and is counted as a fast fail
-- (never as a failure); nothing is taken from the scopes that would have admitted the call.
create function booking_guard_internal.circuit_admit(keys text[],
                                                     out allowed boolean, out state text, out retry_after_seconds numeric,
                                                     out permit bigint, out key text)
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    k          text;
    b          booking_guard.circuit_breakers;
    stored     booking_guard.circuit_breakers;
    w0         booking_guard_internal.circuit_windows;
    w          booking_guard_internal.circuit_windows;
    p          booking_guard.circuit_policies;
    adv        record;
    v_now      timestamptz;
    v_reopen   timestamptz;
    v_wait     interval;
    v_refused  boolean := false;
    v_longest  interval;           -- the longest wait among the refusing scopes
    v_forever  boolean := false;   -- a refusal with no known end (forced open until reset)
    v_locked   text[] := '{}';
    v_trials   text[] := '{}';
    v_leases   interval[] := '{}';
    v_taken    integer;
    v_free_at  timestamptz;
begin
    -- closed, or open before its cooldown's end: answered from the row as read, without a lock.
    -- One clock reading for all scopes, so that the refusing scope with the longest wait is chosen
    -- by waits measured at the same instant.
    v_now := booking_guard_internal.circuit_now();
    foreach k in array keys loop
        select * into b from booking_guard.circuit_breakers c where c.key = k;
        if not found then
            perform booking_guard_internal.circuit_add_key(k);
            continue;
        end if;
        continue when b.state = 'closed';
        if b.state = 'open' then
            p := booking_guard_internal.circuit_policy(k);
            v_reopen := greatest(b.opened_at + p.cooldown, b.forced_until);
            if v_now < v_reopen then
                v_wait := case when isfinite(v_reopen) then v_reopen - v_now end;
                if not v_refused or (not v_forever and (v_wait is null or v_wait > v_longest)) then
                    v_forever := v_wait is null;
                    v_longest := v_wait;
                    state := 'open';
                    key := k;
                end if;
                v_refused := true;
                continue;
            end if;
        end if;
        v_locked := v_locked || k;
    end loop;

    -- half-open (or due to become so): trial calls are counted under the row locks, across all sessions
    foreach k in array v_locked loop
        select * into w0 from booking_guard_internal.circuit_windows x where x.key = k for update;   -- the window first
        select * into stored from booking_guard.circuit_breakers c where c.key = k for update;
        v_now := booking_guard_internal.circuit_now();
        p := booking_guard_internal.circuit_policy(k);
        select * into adv
          from booking_guard_internal.circuit_advance(stored, booking_guard_internal.circuit_window_for(w0, k, p), p, v_now, true);
        b := adv.b;
        w := adv.w;
        if b is distinct from stored or w is distinct from w0 then
            perform booking_guard_internal.circuit_store(b, w, v_now);
        end if;
        v_wait := null;
        if b.state = 'open' then
            v_reopen := greatest(b.opened_at + p.cooldown, b.forced_until);
            v_wait := case when isfinite(v_reopen) then v_reopen - v_now end;
        elsif b.state = 'half_open' then
            select count(*), min(c.expires_at) into v_taken, v_free_at
              from booking_guard.circuit_permits c where c.key = k;
            if w.key is not null then
                v_taken := v_taken + w.calls;   -- with rates: the trial calls already reported
            end if;
            if v_taken < p.half_open_max_calls then
                v_trials := v_trials || k;
                v_leases := v_leases || p.call_timeout;
                continue;
            end if;
            v_wait := coalesce(v_free_at - v_now, p.call_timeout);   -- when the first trial lease ends
        else
            continue;
        end if;
        if not v_refused or (not v_forever and (v_wait is null or v_wait > v_longest)) then
            v_forever := v_wait is null;
            v_longest := v_wait;
            state := b.state;
            key := k;
        end if;
        v_refused := true;
    end loop;

    if v_refused then
        perform nextval('booking_guard.circuit_fast_fails');
        allowed := false;
        -- whole seconds, rounded up: a caller that waits this long finds the breaker ready to admit
        retry_after_seconds := case when v_longest is not null then greatest(1, ceil(extract(epoch from v_longest))) end;
        return;
    end if;
    allowed := true;
    permit := nextval('booking_guard.circuit_seq');
    state := case when cardinality(v_trials) > 0 then 'half_open' else 'closed' end;
    for i in 1 .. cardinality(v_trials) loop
        insert into booking_guard.circuit_permits (permit, key, granted_at, expires_at)
        values (circuit_admit.permit, v_trials[i], v_now, v_now + v_leases[i]);
    end loop;
end
$$;

comment on function booking_guard_internal.circuit_admit(text[]) is
    'Whether a call under the given scopes (valid keys, in lock order) may run: a permit covering them all, or the scope that refuses it longest, its state and retry-after (counted as a fast fail).';

-- BG001, in the words every client reads: a one-line message, a DETAIL that is a JSON object
-- {"key", "state", "retry_after_seconds"} (null: forced open until a reset), a short HINT. The
-- functions the client calls raise it themselves, so that its CONTEXT is one line, not a stack.
create function booking_guard_internal.circuit_refusal(key text, state text, retry_after_seconds numeric,
                                                       out message text, out detail text, out hint text)
language plpgsql
immutable
set search_path = pg_catalog, pg_temp
as $$
begin
    message := format('circuit breaker "%s" is %s: call rejected', key, state);
    detail := jsonb_build_object('key', key, 'state', state, 'retry_after_seconds', retry_after_seconds)::text;
    hint := 'Retry after retry_after_seconds (DETAIL is JSON), or queue the call for review (reason calcom_booking_failed).';
end
$$;

comment on function booking_guard_internal.circuit_refusal(text, text, numeric) is
    'Message, DETAIL (JSON: key, state, retry_after_seconds) and HINT of BG001.';

create function booking_guard.circuit_acquire(key text)
returns bigint
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    b  booking_guard.circuit_breakers;
    a  record;
    e  record;
begin
    -- a key that has a row is valid (CHECK): only a new key is checked, off the hot path
    select * into b from booking_guard.circuit_breakers c where c.key = circuit_acquire.key;
    if not found then
        perform booking_guard_internal.circuit_add_key(circuit_acquire.key);
        return nextval('booking_guard.circuit_seq');
    end if;
    if b.state = 'closed' then
        return nextval('booking_guard.circuit_seq');
    end if;
    select * into a from booking_guard_internal.circuit_admit(array[circuit_acquire.key]);
    if a.allowed then
        return a.permit;
    end if;
    -- (the rollback of this rejection also undoes any transition written on the way; the next call
    -- that gets through writes it again, with the same time)
    select * into e from booking_guard_internal.circuit_refusal(a.key, a.state, a.retry_after_seconds);
    raise exception using errcode = 'BG001', message = e.message, detail = e.detail, hint = e.hint;
end
$$;

comment on function booking_guard.circuit_acquire(text) is
    'A permit to call the service behind a key, or BG001 (DETAIL: JSON key, state, retry_after_seconds): closed always admits; open rejects until the cooldown has passed; half-open admits its trial calls only, across all sessions. Call it in its own transaction.';

create function booking_guard.circuit_acquire(keys text[])
returns bigint
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    a  record;
    e  record;
begin
    select * into a from booking_guard_internal.circuit_admit(booking_guard_internal.circuit_check_keys(keys));
    if a.allowed then
        return a.permit;
    end if;
    select * into e from booking_guard_internal.circuit_refusal(a.key, a.state, a.retry_after_seconds);
    raise exception using errcode = 'BG001', message = e.message, detail = e.detail, hint = e.hint;
end
$$;

comment on function booking_guard.circuit_acquire(text[]) is
    'A permit for a call under several scopes (1 to 16 keys, e.g. a service, a staff member and global), or BG001 naming the scope that refuses it longest: one round trip, one permit; report its result with the same keys.';

create function booking_guard.circuit_try_acquire(key text,
                                                  out allowed boolean, out state text, out retry_after_seconds numeric,
                                                  out permit bigint, out refused_by text)
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    select a.allowed, a.state, a.retry_after_seconds, a.permit, a.key
      into allowed, state, retry_after_seconds, permit, refused_by
      from booking_guard_internal.circuit_admit(array[circuit_try_acquire.key]) a;
end
$$;

comment on function booking_guard.circuit_try_acquire(text) is
    'circuit_acquire without the exception: one row (allowed, state, retry_after_seconds, permit, refused_by); a refusal is counted as a fast fail like BG001.';

create function booking_guard.circuit_try_acquire(keys text[],
                                                  out allowed boolean, out state text, out retry_after_seconds numeric,
                                                  out permit bigint, out refused_by text)
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    select a.allowed, a.state, a.retry_after_seconds, a.permit, a.key
      into allowed, state, retry_after_seconds, permit, refused_by
      from booking_guard_internal.circuit_admit(booking_guard_internal.circuit_check_keys(keys)) a;
end
$$;

comment on function booking_guard.circuit_try_acquire(text[]) is
    'circuit_acquire(keys) without the exception: one row (allowed, state, retry_after_seconds, permit, refused_by: the scope that refuses longest).';

-- The result of a call, under the row locks of the breaker and its window (circuit_record takes
-- the common cases without this).
create function booking_guard_internal.circuit_record_result(key text, permit bigint, succeeded boolean, error text,
                                                             duration interval)
returns text
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    k          text := circuit_record_result.key;
    b          record;   -- the working copy (a record: pgspot's parser cannot follow fields of a named row type)
    w          booking_guard_internal.circuit_windows;   -- the working copy of the window (none: all null)
    stored     booking_guard.circuit_breakers;
    w0         booking_guard_internal.circuit_windows;
    p          booking_guard.circuit_policies;
    adv        record;
    v_verdict  record;
    v_now      timestamptz;
    v_counts   boolean;
    v_claimed  bigint;
    v_granted  timestamptz;
    v_slow     boolean;
    v_reason   text;
    v_error    text := nullif(left(btrim(circuit_record_result.error), 200), '');
begin
    select * into w0 from booking_guard_internal.circuit_windows x where x.key = k for update;   -- the window first
    select * into stored from booking_guard.circuit_breakers c where c.key = k for update;
    if not found then
        perform booking_guard_internal.circuit_add_key(k);
        select * into w0 from booking_guard_internal.circuit_windows x where x.key = k for update;
        select * into stored from booking_guard.circuit_breakers c where c.key = k for update;
    end if;
    v_now := booking_guard_internal.circuit_now();
    p := booking_guard_internal.circuit_policy(k);   -- read after the locks: a policy change is seen whole
    w := booking_guard_internal.circuit_window_for(w0, k, p);
    if stored.state = 'closed' then
        b := stored;   -- nothing in closed state is driven by time
    else
        select * into adv from booking_guard_internal.circuit_advance(stored, w, p, v_now, true);
        b := adv.b;
        w := adv.w;
    end if;

    -- Does this result count? Only toward the state its permit was granted in.
    if b.state = 'closed' then
        v_counts := permit is null or permit > coalesce(b.last_transition_id, 0);
    elsif b.state = 'half_open' then
        -- a result without a permit is taken as the result of the oldest trial in progress
        delete from booking_guard.circuit_permits c
         where c.key = k
           and c.permit = coalesce(circuit_record_result.permit,
                                   (select o.permit from booking_guard.circuit_permits o
                                     where o.key = k order by o.granted_at, o.permit limit 1))
        returning c.permit, c.granted_at into v_claimed, v_granted;
        v_counts := v_claimed is not null;
    else
        v_counts := false;   -- open: a late result moves nothing
    end if;

    if not v_counts then
        null;
    elsif w.key is null then
        -- consecutive failures
        if succeeded and b.state = 'closed' then
            b.failure_count := 0;
        elsif succeeded then
            b.success_count := b.success_count + 1;
            if b.success_count >= p.success_threshold then
                b.last_transition_id := booking_guard_internal.circuit_transition(k, 'half_open', 'closed', v_now,
                                                         format('success_threshold: %s consecutive successes', b.success_count));
                b.state := 'closed';
                b.failure_count := 0;
                b.success_count := 0;
                b.closed_at := v_now;
            end if;
        else
            b.failure_count := b.failure_count + 1;
            b.last_failure_at := v_now;
            if b.state = 'half_open' then
                b.last_transition_id := booking_guard_internal.circuit_transition(k, 'half_open', 'open', v_now,
                                                         'half_open_failure' || coalesce(': ' || v_error, ''));
                b.state := 'open';
                b.opened_at := v_now;
                b.success_count := 0;
            elsif b.failure_count >= p.failure_threshold then
                b.last_transition_id := booking_guard_internal.circuit_transition(k, 'closed', 'open', v_now,
                                                         format('failure_threshold: %s consecutive failures', b.failure_count)
                                                         || coalesce(': ' || v_error, ''));
                b.state := 'open';
                b.opened_at := v_now;
                b.success_count := 0;
            end if;
        end if;
    else
        -- rates: slow is longer than slow_call_duration_threshold, as reported, or for a trial call
        -- measured from its permit; a closed call reported without a duration is not slow
        v_slow := coalesce(coalesce(duration, v_now - v_granted) > w.slow_call_duration_threshold, false);
        if not succeeded then
            b.last_failure_at := v_now;
        end if;
        if b.state = 'closed' then
            w := booking_guard_internal.circuit_window_add(w, v_now, not succeeded, v_slow);
            v_reason := booking_guard_internal.circuit_rates_exceeded(w, w.minimum_number_of_calls, 'calls');
            if v_reason is not null then
                b.last_transition_id := booking_guard_internal.circuit_transition(k, 'closed', 'open', v_now,
                                                                  v_reason || case when succeeded then '' else coalesce(': ' || v_error, '') end);
                b.state := 'open';
                b.opened_at := v_now;
                b.success_count := 0;
            end if;
        else
            w := booking_guard_internal.circuit_window_trial(w, not succeeded, v_slow);
            b.success_count := b.success_count + succeeded::integer;
            select * into v_verdict from booking_guard_internal.circuit_trial_verdict(w, p);
            if v_verdict.to_state is not null then
                b.last_transition_id := booking_guard_internal.circuit_transition(k, 'half_open', v_verdict.to_state, v_now,
                                                                  v_verdict.reason
                                                                  || case when succeeded then '' else coalesce(': ' || v_error, '') end);
                b.state := v_verdict.to_state;
                b.success_count := 0;
                if b.state = 'open' then
                    b.opened_at := v_now;
                else
                    b.closed_at := v_now;
                    w := booking_guard_internal.circuit_window_empty(w);
                end if;
            end if;
        end if;
    end if;

    if b is distinct from stored or w is distinct from w0 then
        perform booking_guard_internal.circuit_store(b, w, v_now);
    end if;
    return b.state;
end
$$;

comment on function booking_guard_internal.circuit_record_result(text, bigint, boolean, text, interval) is
    'Applies the result of a call to a breaker under its row locks (consecutive failures, or the window''s rates); a result of a permit from an earlier state (late) counts for nothing.';

-- One scope's result: answered without a lock when it cannot change anything (a success while
-- closed with no failure streak and no window; any result while open before the cooldown's end).
-- A closed breaker with a window takes the result in one UPDATE of its window, which also takes
-- the window's row lock; only a failure (its time) or a result that opens the breaker writes the
-- breaker row too. What that cannot settle (a window to roll to a new bucket, a late permit, a
-- breaker no longer closed, a window not made yet) goes to circuit_record_result.
create function booking_guard_internal.circuit_record(key text, permit bigint, succeeded boolean, error text,
                                                      duration interval)
returns text
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    k         text := circuit_record.key;
    b         booking_guard.circuit_breakers;
    p         booking_guard.circuit_policies;
    w         booking_guard_internal.circuit_windows;
    v_now     timestamptz;
    v_failed  integer := (not succeeded)::integer;
    v_reason  text;
    v_id      bigint;
begin
    select * into b from booking_guard.circuit_breakers c where c.key = k;
    if not found then
        perform booking_guard_internal.circuit_check_key(k);   -- a key with a row is valid (CHECK)
        if succeeded then
            return 'closed';   -- a success of a key never acquired changes nothing
        end if;
    elsif b.state = 'closed' and succeeded and b.failure_count = 0 and b.window_type is null then
        return 'closed';       -- nothing to reset: no write, no lock
    elsif b.state = 'open' then
        p := booking_guard_internal.circuit_policy(k);
        if booking_guard_internal.circuit_now() < greatest(b.opened_at + p.cooldown, b.forced_until) then
            return 'open';     -- a late result neither moves opened_at, nor adds a transition, nor closes it
        end if;
    elsif b.state = 'closed' and b.window_type = 'count_based' then
        v_now := booking_guard_internal.circuit_now();
        -- the call sliding_window_size calls ago leaves the ring, this one takes its byte
        update booking_guard_internal.circuit_windows x
           set outcomes = set_byte(x.outcomes, (x.head % x.sliding_window_size)::integer,
                                   v_failed | (coalesce(duration > x.slow_call_duration_threshold, false)::integer << 1)),
               head = x.head + 1,
               calls = x.calls + 1 - (x.head >= x.sliding_window_size)::integer,
               failures = x.failures + v_failed
                          - case when x.head >= x.sliding_window_size
                                 then get_byte(x.outcomes, (x.head % x.sliding_window_size)::integer) & 1 else 0 end,
               slow_calls = x.slow_calls + coalesce(duration > x.slow_call_duration_threshold, false)::integer
                            - case when x.head >= x.sliding_window_size
                                   then (get_byte(x.outcomes, (x.head % x.sliding_window_size)::integer) >> 1) & 1 else 0 end
         where x.key = k and x.closed and x.sliding_window_type = 'count_based'
           and (circuit_record.permit is null or circuit_record.permit > coalesce(x.last_transition_id, 0))
        returning x.* into w;
    elsif b.state = 'closed' and b.window_type = 'time_based' then
        v_now := booking_guard_internal.circuit_now();
        -- within the newest bucket: it counts one more call
        update booking_guard_internal.circuit_windows x
           set buckets[3 * (x.head % (cardinality(x.buckets) / 3))::integer + 1]
                   = x.buckets[3 * (x.head % (cardinality(x.buckets) / 3))::integer + 1] + 1,
               buckets[3 * (x.head % (cardinality(x.buckets) / 3))::integer + 2]
                   = x.buckets[3 * (x.head % (cardinality(x.buckets) / 3))::integer + 2] + v_failed,
               buckets[3 * (x.head % (cardinality(x.buckets) / 3))::integer + 3]
                   = x.buckets[3 * (x.head % (cardinality(x.buckets) / 3))::integer + 3]
                     + coalesce(duration > x.slow_call_duration_threshold, false)::integer,
               calls = x.calls + 1,
               failures = x.failures + v_failed,
               slow_calls = x.slow_calls + coalesce(duration > x.slow_call_duration_threshold, false)::integer
         where x.key = k and x.closed and x.sliding_window_type = 'time_based'
           and x.head = floor(extract(epoch from v_now) / x.bucket_width)::bigint
           and (circuit_record.permit is null or circuit_record.permit > coalesce(x.last_transition_id, 0))
        returning x.* into w;
    end if;
    if w.key is null then
        return booking_guard_internal.circuit_record_result(k, circuit_record.permit, succeeded, error, duration);
    end if;
    -- the result is in the window, whose row lock is held: do its rates open the breaker?
    v_reason := booking_guard_internal.circuit_rates_exceeded(w, w.minimum_number_of_calls, 'calls');
    if v_reason is not null then
        v_id := booking_guard_internal.circuit_transition(k, 'closed', 'open', v_now,
                                                          v_reason || case when succeeded then ''
                                                                           else coalesce(': ' || nullif(left(btrim(error), 200), ''), '') end);
        update booking_guard_internal.circuit_windows x set closed = false, last_transition_id = v_id where x.key = k;
    end if;
    if v_reason is not null or not succeeded then
        update booking_guard.circuit_breakers c
           set last_failure_at = case when succeeded then c.last_failure_at else v_now end,
               state = case when v_reason is null then c.state else 'open' end,
               opened_at = case when v_reason is null then c.opened_at else v_now end,
               success_count = case when v_reason is null then c.success_count else 0 end,
               last_transition_id = coalesce(v_id, c.last_transition_id),
               updated_at = v_now
         where c.key = k;
    end if;
    return case when v_reason is null then 'closed' else 'open' end;
end
$$;

comment on function booking_guard_internal.circuit_record(text, bigint, boolean, text, interval) is
    'The result of a call for one scope: without a lock when it cannot change anything, in one UPDATE of its window when the breaker is closed and has one, else circuit_record_result. Returns the state after it.';

-- The most restrictive of two states: what a caller of several scopes faces.
create function booking_guard_internal.circuit_worst(a text, b text)
returns text
language plpgsql
immutable
set search_path = pg_catalog, pg_temp
as $$
begin
    return case when 'open' in (a, b) then 'open' when 'half_open' in (a, b) then 'half_open' else 'closed' end;
end
$$;

comment on function booking_guard_internal.circuit_worst(text, text) is
    'The most restrictive of two breaker states (open, then half_open, then closed).';

create function booking_guard_internal.circuit_check_error(error text)
returns void
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
    if length(error) > 2000 then
        raise exception 'circuit_record_failure(): the error text is % characters', length(error)
            using errcode = 'BG005',
                  detail = 'The error is kept (its first 200 characters) for the transition history: at most 2000 characters.',
                  hint = 'Pass the error''s message, not a whole response body.';
    end if;
end
$$;

comment on function booking_guard_internal.circuit_check_error(text) is
    'Raises BG005 for an error text of a failed call longer than 2000 characters.';

create function booking_guard.circuit_record_success(key text, permit bigint default null, duration interval default null)
returns text
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    if duration is not null then
        perform booking_guard_internal.circuit_check_duration(duration);
    end if;
    return booking_guard_internal.circuit_record(circuit_record_success.key, circuit_record_success.permit, true, null,
                                                 circuit_record_success.duration);
end
$$;

comment on function booking_guard.circuit_record_success(text, bigint, interval) is
    'Reports a successful call (duration: how long it took, for the slow-call rate): consecutive resets the failure streak and in half-open counts toward success_threshold; with rates it enters the window. Returns the state after it. A result of a permit from an earlier state is ignored.';

create function booking_guard.circuit_record_success(keys text[], permit bigint default null, duration interval default null)
returns text
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    k        text;
    v_state  text := 'closed';
begin
    perform booking_guard_internal.circuit_check_duration(duration);
    foreach k in array booking_guard_internal.circuit_check_keys(keys) loop
        v_state := booking_guard_internal.circuit_worst(v_state,
                       booking_guard_internal.circuit_record(k, circuit_record_success.permit, true, null, circuit_record_success.duration));
    end loop;
    return v_state;
end
$$;

comment on function booking_guard.circuit_record_success(text[], bigint, interval) is
    'Reports a successful call under several scopes (the keys and permit of circuit_acquire(keys)) to each of them; returns the most restrictive state after it.';

create function booking_guard.circuit_record_failure(key text, error text default null, permit bigint default null,
                                                     duration interval default null)
returns text
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    perform booking_guard_internal.circuit_check_error(error);
    perform booking_guard_internal.circuit_check_duration(duration);
    return booking_guard_internal.circuit_record(circuit_record_failure.key, circuit_record_failure.permit, false,
                                                 circuit_record_failure.error, circuit_record_failure.duration);
end
$$;

comment on function booking_guard.circuit_record_failure(text, text, bigint, interval) is
    'Reports a failed call: consecutive opens a closed breaker at the failure_threshold-th failure in a row and reopens a half-open one at any trial failure; with rates it enters the window. Returns the state after it. A result of a permit from an earlier state is ignored.';

create function booking_guard.circuit_record_failure(keys text[], error text default null, permit bigint default null,
                                                     duration interval default null)
returns text
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    k        text;
    v_state  text := 'closed';
begin
    perform booking_guard_internal.circuit_check_error(error);
    perform booking_guard_internal.circuit_check_duration(duration);
    foreach k in array booking_guard_internal.circuit_check_keys(keys) loop
        v_state := booking_guard_internal.circuit_worst(v_state,
                       booking_guard_internal.circuit_record(k, circuit_record_failure.permit, false, circuit_record_failure.error,
                                                             circuit_record_failure.duration));
    end loop;
    return v_state;
end
$$;

comment on function booking_guard.circuit_record_failure(text[], text, bigint, interval) is
    'Reports a failed call under several scopes (the keys and permit of circuit_acquire(keys)) to each of them; returns the most restrictive state after it.';

create function booking_guard.circuit_state(key text)
returns text
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    b    booking_guard.circuit_breakers;
    w    booking_guard_internal.circuit_windows;
    adv  record;
begin
    select * into b from booking_guard.circuit_breakers c where c.key = circuit_state.key;
    if not found then
        perform booking_guard_internal.circuit_check_key(circuit_state.key);   -- a key with a row is valid (CHECK)
        return 'closed';
    end if;
    if b.state = 'closed' then
        return 'closed';
    end if;
    select * into w from booking_guard_internal.circuit_windows x where x.key = circuit_state.key;
    select * into adv from booking_guard_internal.circuit_advance(b, w, booking_guard_internal.circuit_policy(circuit_state.key),
                                                                  booking_guard_internal.circuit_now(), false);
    return (adv.b).state;
end
$$;

comment on function booking_guard.circuit_state(text) is
    'The effective state of a breaker (closed, open, half_open), writing nothing: an open breaker past its cooldown reads half_open; a key never used reads closed.';

create function booking_guard.circuit_reset(key text)
returns booking_guard.circuit_breakers
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    stored  booking_guard.circuit_breakers;
    b       record;   -- the working copy (see circuit_record_result)
    w0      booking_guard_internal.circuit_windows;
    w       booking_guard_internal.circuit_windows;
    p       booking_guard.circuit_policies;
    adv     record;
    v_now   timestamptz;
begin
    perform booking_guard_internal.circuit_check_key(circuit_reset.key);
    select * into w0 from booking_guard_internal.circuit_windows x where x.key = circuit_reset.key for update;   -- the window first
    select * into stored from booking_guard.circuit_breakers c where c.key = circuit_reset.key for update;
    if not found then
        raise exception 'unknown circuit breaker "%"', circuit_reset.key
            using errcode = 'BG004',
                  detail = format('No breaker has key %s.', quote_literal(circuit_reset.key)),
                  hint = 'select key, state from booking_guard.circuit_status;';
    end if;
    v_now := booking_guard_internal.circuit_now();
    p := booking_guard_internal.circuit_policy(circuit_reset.key);
    select * into adv
      from booking_guard_internal.circuit_advance(stored, booking_guard_internal.circuit_window_for(w0, circuit_reset.key, p),
                                                  p, v_now, true);
    b := adv.b;
    w := adv.w;
    if b.state <> 'closed' then
        b.last_transition_id := booking_guard_internal.circuit_transition(b.key, b.state, 'closed', v_now, format('reset by %s', session_user));
        b.closed_at := v_now;
    end if;
    b.state := 'closed';
    b.failure_count := 0;
    b.success_count := 0;
    b.forced_until := null;
    if w.key is not null then
        w := booking_guard_internal.circuit_window_empty(w);
    end if;
    perform booking_guard_internal.circuit_store(b, w, v_now);
    select * into stored from booking_guard.circuit_breakers c where c.key = circuit_reset.key;
    return stored;
end
$$;

comment on function booking_guard.circuit_reset(text) is
    'Closes a breaker by hand with zeroed counters and an empty window (also a forced one); BG004 for a key that has no breaker.';

create function booking_guard.circuit_force_open(key text, until timestamptz default 'infinity')
returns booking_guard.circuit_breakers
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    stored   booking_guard.circuit_breakers;
    b        record;   -- the working copy (see circuit_record_result)
    w0       booking_guard_internal.circuit_windows;
    p        booking_guard.circuit_policies;
    adv      record;
    v_now    timestamptz;
    v_until  timestamptz := coalesce(circuit_force_open.until, 'infinity');
begin
    perform booking_guard_internal.circuit_check_key(circuit_force_open.key);
    v_now := booking_guard_internal.circuit_now();
    if v_until <= v_now then
        raise exception 'cannot force circuit breaker "%" open until %: that is not in the future',
                        circuit_force_open.key, v_until
            using errcode = 'BG005',
                  detail = format('until: %s, now: %s', v_until, v_now),
                  hint = 'Give a time in the future, or omit it to keep the breaker open until circuit_reset().';
    end if;
    perform booking_guard_internal.circuit_add_key(circuit_force_open.key);
    select * into w0 from booking_guard_internal.circuit_windows x where x.key = circuit_force_open.key for update;   -- the window first
    select * into stored from booking_guard.circuit_breakers c where c.key = circuit_force_open.key for update;
    v_now := booking_guard_internal.circuit_now();
    p := booking_guard_internal.circuit_policy(circuit_force_open.key);
    select * into adv
      from booking_guard_internal.circuit_advance(stored, booking_guard_internal.circuit_window_for(w0, circuit_force_open.key, p),
                                                  p, v_now, true);
    b := adv.b;
    if b.state <> 'open' then
        b.last_transition_id := booking_guard_internal.circuit_transition(b.key, b.state, 'open', v_now,
                                                 format('forced_open by %s until %s', session_user, v_until));
        b.opened_at := v_now;
    end if;
    b.state := 'open';
    b.success_count := 0;
    b.forced_until := v_until;
    perform booking_guard_internal.circuit_store(b, adv.w, v_now);
    select * into stored from booking_guard.circuit_breakers c where c.key = circuit_force_open.key;
    return stored;
end
$$;

comment on function booking_guard.circuit_force_open(text, timestamptz) is
    'Opens a breaker by hand until a time (default: until circuit_reset), rejecting calls even after the cooldown; then it goes half-open as usual.';

-- One row of circuit_status: the effective state and what the dashboard and the metrics need, computed
-- without writing (the monitor role is read-only).
create function booking_guard_internal.circuit_snapshot(b booking_guard.circuit_breakers,
                                               out state text, out failure_count integer, out success_count integer,
                                               out trial_permits integer, out last_failure_at timestamptz,
                                               out opened_at timestamptz, out closed_at timestamptz,
                                               out forced_until timestamptz, out retry_after interval,
                                               out opened_total bigint, out state_changes_total bigint,
                                               out last_transition_at timestamptz, out last_transition text,
                                               out last_transition_reason text, out sliding_window_type text,
                                               out window_calls integer, out window_failures integer,
                                               out window_slow_calls integer, out failure_rate numeric,
                                               out slow_call_rate numeric)
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    p      booking_guard.circuit_policies := booking_guard_internal.circuit_policy(b.key);
    v_now  timestamptz := booking_guard_internal.circuit_now();
    adv    record;
    w      booking_guard_internal.circuit_windows;
    cw     record;   -- the window's totals now
    e      booking_guard.circuit_breakers;
    v_free_at  timestamptz;
    v_taken    integer;
begin
    select * into w from booking_guard_internal.circuit_windows x where x.key = b.key;
    select * into adv from booking_guard_internal.circuit_advance(b, w, p, v_now, false);
    e := adv.b;
    w := adv.w;
    state := e.state;
    failure_count := e.failure_count;
    success_count := e.success_count;
    last_failure_at := e.last_failure_at;
    opened_at := e.opened_at;
    closed_at := e.closed_at;
    forced_until := e.forced_until;
    trial_permits := 0;
    if e.state = 'half_open' and adv.steps = 0 then
        -- (a lease that ran out has been counted by circuit_advance already)
        select count(*), min(c.expires_at) into trial_permits, v_free_at
          from booking_guard.circuit_permits c where c.key = b.key and c.expires_at >= v_now;
    end if;
    v_taken := trial_permits + case when w.key is not null and e.state = 'half_open' then w.calls else 0 end;
    retry_after := case
                       when e.state = 'open' and isfinite(greatest(e.opened_at + p.cooldown, e.forced_until))
                           then greatest(e.opened_at + p.cooldown, e.forced_until) - v_now
                       when e.state = 'half_open' and v_taken >= p.half_open_max_calls then v_free_at - v_now
                   end;
    sliding_window_type := p.sliding_window_type;
    if w.key is not null then
        select * into cw from booking_guard_internal.circuit_window_at(w, e.state, v_now);
        window_calls := cw.calls;
        window_failures := cw.failures;
        window_slow_calls := cw.slow_calls;
        if cw.calls > 0 and cw.calls >= booking_guard_internal.circuit_minimum_calls(p, e.state) then
            failure_rate := round(cw.failures * 100.0 / cw.calls, 2);
            slow_call_rate := round(cw.slow_calls * 100.0 / cw.calls, 2);
        end if;
    end if;
    select count(*) filter (where t.to_state = 'open') + adv.opens, count(*) + adv.steps
      into opened_total, state_changes_total
      from booking_guard.circuit_transitions t where t.key = b.key;
    if adv.steps > 0 then
        last_transition_at := adv.last_at;
        last_transition := adv.last_from || ' -> ' || adv.last_to;
        last_transition_reason := adv.last_reason;
    else
        select t.at, t.from_state || ' -> ' || t.to_state, t.reason
          into last_transition_at, last_transition, last_transition_reason
          from booking_guard.circuit_transitions t where t.key = b.key
         order by t.id desc limit 1;
    end if;
end
$$;

comment on function booking_guard_internal.circuit_snapshot(booking_guard.circuit_breakers) is
    'The effective state of one breaker with its counters, retry-after, last transition and window (calls, failures, slow calls, rates once the minimum is reached), computed without writing (one row of circuit_status).';

create view booking_guard.circuit_status as
select b.key, s.state, s.failure_count, s.success_count, s.trial_permits, s.last_failure_at, s.opened_at, s.closed_at,
       s.forced_until, s.retry_after, s.opened_total, s.state_changes_total, s.last_transition_at, s.last_transition,
       s.last_transition_reason, b.updated_at, s.sliding_window_type, s.window_calls, s.window_failures,
       s.window_slow_calls, s.failure_rate, s.slow_call_rate
  from booking_guard.circuit_breakers b
 cross join lateral booking_guard_internal.circuit_snapshot(b) s;

comment on view booking_guard.circuit_status is
    'Every breaker with its effective state (an open breaker past its cooldown reads half_open), counters, trial permits in progress, retry-after (null when a call would be admitted), open count, last transition, and its window: calls, failures and slow calls in it, failure and slow-call rate in percent (null before the minimum number of calls).';

-- Recovery time (circuit_breaker_recovery_time_seconds): each return to closed, and when it had opened.
create view booking_guard.circuit_recoveries as
select t.key, o.at as opened_at, t.at as closed_at,
       extract(epoch from t.at - o.at)::double precision as recovery_seconds,
       t.reason
  from booking_guard.circuit_transitions t
 cross join lateral (select x.at
                       from booking_guard.circuit_transitions x
                      where x.key = t.key and x.to_state = 'open' and x.id < t.id
                        and not exists (select from booking_guard.circuit_transitions y
                                         where y.key = t.key and y.to_state = 'closed' and y.id > x.id and y.id < t.id)
                      order by x.id
                      limit 1) o
 where t.to_state = 'closed';

comment on view booking_guard.circuit_recoveries is
    'One row per return of a breaker to closed: when it first opened in that outage, when it closed, the seconds between, and why it closed (success_threshold, trial_rates or reset).';

create function booking_guard.circuit_fast_fail_total()
returns bigint
language sql
stable
set search_path = pg_catalog, pg_temp
as $$
    select case when s.is_called then s.last_value else 0 end from booking_guard.circuit_fast_fails s
$$;

comment on function booking_guard.circuit_fast_fail_total() is
    'Calls rejected by circuit_acquire since the extension was created (circuit_breaker_fast_fail_total); may jump by up to 32 after a server crash (sequences log ahead).';
