create trigger circuit_policies_replace_seeded_row
    before insert on booking_guard.circuit_policies
    for each row execute function booking_guard_internal.replace_seeded_row('key_pattern');

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

-- A breaker row for a key not seen before: every key is a row and a set of metric series, so
-- there are at most circuit_max_keys of them (one role cannot grow them without bound).
create function booking_guard_internal.circuit_add_key(key text)
returns void
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    v_max  bigint;
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
        on conflict on constraint circuit_breakers_pkey do nothing;
end
$$;

comment on function booking_guard_internal.circuit_add_key(text) is
    'Adds the breaker row of a new key: BG005 for an invalid key or past circuit_max_keys keys.';

create function booking_guard_internal.circuit_policy(key text)
returns booking_guard.circuit_policies
language sql
stable
set search_path = pg_catalog, pg_temp
as $$
    select c.key_pattern, c.failure_threshold, c.cooldown, c.success_threshold, c.half_open_max_calls, c.call_timeout
      from (select p.*, false as builtin
              from booking_guard.circuit_policies p
             where circuit_policy.key like p.key_pattern
            union all
            -- the seed's values when the % row has been deleted: a breaker never runs without a policy
            select '%', 3, interval '30 seconds', 2, 1, interval '10 seconds', true) c
     -- longest by its literal characters, so that appointment_booking:staff:7 beats appointment_booking:staff:%
     order by length(translate(c.key_pattern, '%_', '')) desc, length(c.key_pattern) desc, c.builtin, c.key_pattern
     limit 1
$$;

comment on function booking_guard_internal.circuit_policy(text) is
    'The policy of a key: the matching key_pattern of circuit_policies with the most literal (non-wildcard) characters (the seed''s values if none matches).';

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

-- The time-driven part of the state machine, replayed up to `clock`: open -> half_open when the cooldown
-- (and any forced_until) has passed, half_open -> open when a trial lease ran out (at its expiry, as a
-- failure). With apply the transitions are written (the caller holds the row lock and stores b); without
-- it nothing is written and the outcome is only computed (circuit_state, circuit_status).
create function booking_guard_internal.circuit_advance(inout b booking_guard.circuit_breakers,
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
    v_fresh       boolean := false;   -- a transition happened here: the key has no permits any more
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
        elsif b.state = 'half_open' and not v_fresh then
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
        else
            exit;
        end if;
        steps := steps + 1;
        v_fresh := true;
        if apply then
            perform booking_guard_internal.circuit_transition(b.key, last_from, last_to, last_at, last_reason);
        end if;
    end loop;
end
$$;

comment on function booking_guard_internal.circuit_advance(booking_guard.circuit_breakers, booking_guard.circuit_policies, timestamptz, boolean) is
    'Replays the time-driven transitions of a breaker up to a time (cooldown elapsed, trial lease expired); writes them only with apply.';

-- Raises BG001 for a rejected call and counts it as a fast fail (never as a failure).
create function booking_guard_internal.circuit_reject(key text, state text, retry_after interval, facts text)
returns void
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    v_retry  text := case when retry_after is null or not isfinite(retry_after) then 'unknown'
                          else greatest(1, ceil(extract(epoch from retry_after)))::bigint || ' s' end;
begin
    perform nextval('booking_guard.circuit_fast_fails');
    raise exception 'circuit breaker "%" is %: call rejected', key, state
        using errcode = 'BG001',
              detail = format('state: %s, retry after: %s, %s, key: %s', state, v_retry, facts, key),
              hint = 'Do not call the service now: hand the call to the review queue '
                     '(booking_guard.queue_for_review(call_id, ''calcom_booking_failed'', context)) or retry after the time in DETAIL.';
end
$$;

comment on function booking_guard_internal.circuit_reject(text, text, interval, text) is
    'Counts a fast fail (sequence circuit_fast_fails, which survives the rollback) and raises BG001 with state and retry-after in DETAIL.';

create function booking_guard.circuit_acquire(key text)
returns bigint
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    k          text := circuit_acquire.key;
    b          booking_guard.circuit_breakers;
    stored     booking_guard.circuit_breakers;
    p          booking_guard.circuit_policies;
    adv        record;
    v_now      timestamptz;
    v_permit   bigint;
    v_taken    integer;
    v_free_at  timestamptz;
    v_reopen   timestamptz;
begin
    -- a key that has a row is valid (CHECK): only a new key is checked, off the hot path
    select * into b from booking_guard.circuit_breakers c where c.key = k;
    if not found then
        perform booking_guard_internal.circuit_add_key(k);
        return nextval('booking_guard.circuit_seq');
    end if;
    if b.state = 'closed' then
        return nextval('booking_guard.circuit_seq');
    end if;
    p := booking_guard_internal.circuit_policy(k);
    if b.state = 'open' then
        -- still cooling down: reject without taking the row lock
        v_now := booking_guard_internal.circuit_now();
        v_reopen := greatest(b.opened_at + p.cooldown, b.forced_until);
        if v_now < v_reopen then
            perform booking_guard_internal.circuit_reject(k, 'open', case when isfinite(v_reopen) then v_reopen - v_now end,
                                                 format('opened at: %s, failures: %s', b.opened_at, b.failure_count)
                                                 || case when b.forced_until is not null then format(', forced open until: %s', b.forced_until) else '' end);
        end if;
    end if;

    -- Half-open (or due to become so): permits are counted under the row lock, across all sessions.
    select * into stored from booking_guard.circuit_breakers c where c.key = k for update;
    v_now := booking_guard_internal.circuit_now();
    select * into adv from booking_guard_internal.circuit_advance(stored, p, v_now, true);
    b := adv.b;
    if b.state = 'closed' then
        v_permit := nextval('booking_guard.circuit_seq');
    elsif b.state = 'open' then
        -- (the rollback of this rejection also undoes any transition written above; the next call that
        -- succeeds writes it again, with the same time)
        v_reopen := greatest(b.opened_at + p.cooldown, b.forced_until);
        perform booking_guard_internal.circuit_reject(k, 'open', case when isfinite(v_reopen) then v_reopen - v_now end,
                                             format('opened at: %s, failures: %s', b.opened_at, b.failure_count)
                                             || case when b.forced_until is not null then format(', forced open until: %s', b.forced_until) else '' end);
    else
        select count(*), min(c.expires_at) into v_taken, v_free_at
          from booking_guard.circuit_permits c where c.key = k;
        if v_taken >= p.half_open_max_calls then
            perform booking_guard_internal.circuit_reject(k, 'half_open', v_free_at - v_now,
                                                 format('trial calls in progress: %s of %s', v_taken, p.half_open_max_calls));
        end if;
        v_permit := nextval('booking_guard.circuit_seq');
        insert into booking_guard.circuit_permits (permit, key, granted_at, expires_at)
        values (v_permit, k, v_now, v_now + p.call_timeout);
    end if;
    if b is distinct from stored then
        update booking_guard.circuit_breakers c
           set state = b.state, failure_count = b.failure_count, success_count = b.success_count,
               last_failure_at = b.last_failure_at, opened_at = b.opened_at, forced_until = b.forced_until,
               updated_at = v_now
         where c.key = k;
    end if;
    return v_permit;
end
$$;

comment on function booking_guard.circuit_acquire(text) is
    'A permit to call the service behind a key, or BG001 (DETAIL: state, retry after, key): closed always admits; open rejects until the cooldown has passed; half-open admits at most half_open_max_calls trial calls at a time, across all sessions. Call it in its own transaction.';

-- The result of a call, under the breaker row lock (the functions below skip it when the result
-- cannot change anything).
create function booking_guard_internal.circuit_record_result(key text, permit bigint, succeeded boolean, error text)
returns text
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    k          text := circuit_record_result.key;
    b          record;   -- the working copy (a record: pgspot's parser cannot follow fields of a named row type)
    stored     booking_guard.circuit_breakers;
    p          booking_guard.circuit_policies := booking_guard_internal.circuit_policy(circuit_record_result.key);
    adv        record;
    v_now      timestamptz;
    v_counts   boolean;
    v_changed  boolean;
    v_claimed  bigint;
    v_error    text := nullif(left(btrim(circuit_record_result.error), 200), '');
begin
    perform booking_guard_internal.circuit_add_key(k);
    select * into stored from booking_guard.circuit_breakers c where c.key = k for update;
    v_now := booking_guard_internal.circuit_now();
    select * into adv from booking_guard_internal.circuit_advance(stored, p, v_now, true);
    b := adv.b;
    v_changed := adv.steps > 0;

    -- Does this result count? Only toward the state its permit was granted in.
    if b.state = 'closed' then
        v_counts := permit is null
                    or permit > coalesce((select max(t.id) from booking_guard.circuit_transitions t where t.key = k), 0);
    elsif b.state = 'half_open' then
        -- a result without a permit is taken as the result of the oldest trial in progress
        delete from booking_guard.circuit_permits c
         where c.permit = coalesce(circuit_record_result.permit,
                                   (select o.permit from booking_guard.circuit_permits o
                                     where o.key = k order by o.granted_at, o.permit limit 1))
           and c.key = k
        returning c.permit into v_claimed;
        v_counts := v_claimed is not null;
    else
        v_counts := false;   -- open: a late result moves nothing
    end if;

    if v_counts and succeeded then
        if b.state = 'closed' then
            v_changed := v_changed or b.failure_count <> 0;
            b.failure_count := 0;
        else
            v_changed := true;
            b.success_count := b.success_count + 1;
            if b.success_count >= p.success_threshold then
                perform booking_guard_internal.circuit_transition(k, 'half_open', 'closed', v_now,
                                                         format('success_threshold: %s consecutive successes', b.success_count));
                b.state := 'closed';
                b.failure_count := 0;
                b.success_count := 0;
                b.closed_at := v_now;
            end if;
        end if;
    elsif v_counts then
        v_changed := true;
        b.failure_count := b.failure_count + 1;
        b.last_failure_at := v_now;
        if b.state = 'half_open' then
            perform booking_guard_internal.circuit_transition(k, 'half_open', 'open', v_now,
                                                     'half_open_failure' || coalesce(': ' || v_error, ''));
            b.state := 'open';
            b.opened_at := v_now;
            b.success_count := 0;
        elsif b.failure_count >= p.failure_threshold then
            perform booking_guard_internal.circuit_transition(k, 'closed', 'open', v_now,
                                                     format('failure_threshold: %s consecutive failures', b.failure_count)
                                                     || coalesce(': ' || v_error, ''));
            b.state := 'open';
            b.opened_at := v_now;
            b.success_count := 0;
        end if;
    end if;

    if v_changed then
        update booking_guard.circuit_breakers c
           set state = b.state, failure_count = b.failure_count, success_count = b.success_count,
               last_failure_at = b.last_failure_at, opened_at = b.opened_at, closed_at = b.closed_at,
               forced_until = b.forced_until, updated_at = v_now
         where c.key = k;
    end if;
    return b.state;
end
$$;

comment on function booking_guard_internal.circuit_record_result(text, bigint, boolean, text) is
    'Applies the result of a call to a breaker under its row lock; a result of a permit from an earlier state (late) counts for nothing.';

create function booking_guard.circuit_record_success(key text, permit bigint default null)
returns text
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    b  booking_guard.circuit_breakers;
    p  booking_guard.circuit_policies;
begin
    select * into b from booking_guard.circuit_breakers c where c.key = circuit_record_success.key;
    if not found then
        perform booking_guard_internal.circuit_check_key(circuit_record_success.key);   -- a key with a row is valid (CHECK)
        return 'closed';
    end if;
    if b.state = 'closed' and b.failure_count = 0 then
        return 'closed';   -- nothing to reset: no write, no lock
    end if;
    if b.state = 'open' then
        p := booking_guard_internal.circuit_policy(circuit_record_success.key);
        if booking_guard_internal.circuit_now() < greatest(b.opened_at + p.cooldown, b.forced_until) then
            return 'open';   -- a late success does not close the breaker
        end if;
    end if;
    return booking_guard_internal.circuit_record_result(circuit_record_success.key, circuit_record_success.permit, true, null);
end
$$;

comment on function booking_guard.circuit_record_success(text, bigint) is
    'Reports a successful call: closed resets the failure streak; half-open counts toward success_threshold and then closes. Returns the state after it. A result of a permit from an earlier state is ignored.';

create function booking_guard.circuit_record_failure(key text, error text default null, permit bigint default null)
returns text
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    b  booking_guard.circuit_breakers;
    p  booking_guard.circuit_policies;
begin
    if length(circuit_record_failure.error) > 2000 then
        raise exception 'circuit_record_failure(): the error text is % characters', length(circuit_record_failure.error)
            using errcode = 'BG005',
                  detail = 'The error is kept (its first 200 characters) for the transition history: at most 2000 characters.',
                  hint = 'Pass the error''s message, not a whole response body.';
    end if;
    select * into b from booking_guard.circuit_breakers c where c.key = circuit_record_failure.key;
    if not found then
        perform booking_guard_internal.circuit_check_key(circuit_record_failure.key);   -- a key with a row is valid (CHECK)
    elsif b.state = 'open' then
        p := booking_guard_internal.circuit_policy(circuit_record_failure.key);
        if booking_guard_internal.circuit_now() < greatest(b.opened_at + p.cooldown, b.forced_until) then
            return 'open';   -- a late failure neither moves opened_at nor adds a transition
        end if;
    end if;
    return booking_guard_internal.circuit_record_result(circuit_record_failure.key, circuit_record_failure.permit, false,
                                               circuit_record_failure.error);
end
$$;

comment on function booking_guard.circuit_record_failure(text, text, bigint) is
    'Reports a failed call: the failure_threshold-th consecutive failure opens a closed breaker, any trial failure reopens a half-open one (fresh opened_at). Returns the state after it. A result of a permit from an earlier state is ignored.';

create function booking_guard.circuit_state(key text)
returns text
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    b    booking_guard.circuit_breakers;
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
    select * into adv from booking_guard_internal.circuit_advance(b, booking_guard_internal.circuit_policy(circuit_state.key),
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
    adv     record;
    v_now   timestamptz;
begin
    perform booking_guard_internal.circuit_check_key(circuit_reset.key);
    select * into stored from booking_guard.circuit_breakers c where c.key = circuit_reset.key for update;
    if not found then
        raise exception 'unknown circuit breaker "%"', circuit_reset.key
            using errcode = 'BG004',
                  detail = format('No breaker has key %s.', quote_literal(circuit_reset.key)),
                  hint = 'select key, state from booking_guard.circuit_status;';
    end if;
    v_now := booking_guard_internal.circuit_now();
    select * into adv from booking_guard_internal.circuit_advance(stored, booking_guard_internal.circuit_policy(circuit_reset.key), v_now, true);
    b := adv.b;
    if b.state <> 'closed' then
        perform booking_guard_internal.circuit_transition(b.key, b.state, 'closed', v_now, format('reset by %s', session_user));
        b.closed_at := v_now;
    end if;
    update booking_guard.circuit_breakers c
       set state = 'closed', failure_count = 0, success_count = 0, last_failure_at = b.last_failure_at,
           opened_at = b.opened_at, closed_at = b.closed_at, forced_until = null, updated_at = v_now
     where c.key = b.key
    returning c.* into stored;
    return stored;
end
$$;

comment on function booking_guard.circuit_reset(text) is
    'Closes a breaker by hand with zeroed counters (also a forced one); BG004 for a key that has no breaker.';

create function booking_guard.circuit_force_open(key text, until timestamptz default 'infinity')
returns booking_guard.circuit_breakers
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    stored   booking_guard.circuit_breakers;
    b        record;   -- the working copy (see circuit_record_result)
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
    select * into stored from booking_guard.circuit_breakers c where c.key = circuit_force_open.key for update;
    v_now := booking_guard_internal.circuit_now();
    select * into adv from booking_guard_internal.circuit_advance(stored, booking_guard_internal.circuit_policy(circuit_force_open.key), v_now, true);
    b := adv.b;
    if b.state <> 'open' then
        perform booking_guard_internal.circuit_transition(b.key, b.state, 'open', v_now,
                                                 format('forced_open by %s until %s', session_user, v_until));
        b.opened_at := v_now;
    end if;
    update booking_guard.circuit_breakers c
       set state = 'open', success_count = 0, failure_count = b.failure_count, last_failure_at = b.last_failure_at,
           opened_at = b.opened_at, closed_at = b.closed_at, forced_until = v_until, updated_at = v_now
     where c.key = b.key
    returning c.* into stored;
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
                                               out last_transition_reason text)
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    p      booking_guard.circuit_policies := booking_guard_internal.circuit_policy(b.key);
    v_now  timestamptz := booking_guard_internal.circuit_now();
    adv    record;
    e      booking_guard.circuit_breakers;
    v_free_at  timestamptz;
begin
    select * into adv from booking_guard_internal.circuit_advance(b, p, v_now, false);
    e := adv.b;
    state := e.state;
    failure_count := e.failure_count;
    success_count := e.success_count;
    last_failure_at := e.last_failure_at;
    opened_at := e.opened_at;
    closed_at := e.closed_at;
    forced_until := e.forced_until;
    trial_permits := 0;
    if e.state = 'half_open' and adv.steps = 0 then
        select count(*), min(c.expires_at) into trial_permits, v_free_at
          from booking_guard.circuit_permits c where c.key = b.key;
    end if;
    retry_after := case
                       when e.state = 'open' and isfinite(greatest(e.opened_at + p.cooldown, e.forced_until))
                           then greatest(e.opened_at + p.cooldown, e.forced_until) - v_now
                       when e.state = 'half_open' and trial_permits >= p.half_open_max_calls then v_free_at - v_now
                   end;
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
    'The effective state of one breaker with its counters, retry-after and last transition, computed without writing (one row of circuit_status).';

create view booking_guard.circuit_status as
select b.key, s.state, s.failure_count, s.success_count, s.trial_permits, s.last_failure_at, s.opened_at, s.closed_at,
       s.forced_until, s.retry_after, s.opened_total, s.state_changes_total, s.last_transition_at, s.last_transition,
       s.last_transition_reason, b.updated_at
  from booking_guard.circuit_breakers b
 cross join lateral booking_guard_internal.circuit_snapshot(b) s;

comment on view booking_guard.circuit_status is
    'Every breaker with its effective state (an open breaker past its cooldown reads half_open), counters, trial permits in progress, retry-after (null when a call would be admitted), open count and last transition.';

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
    'One row per return of a breaker to closed: when it first opened in that outage, when it closed, the seconds between, and why it closed (success_threshold or reset).';

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
