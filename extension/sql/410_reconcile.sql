-- Reconciliation: over the whole tables, hourly.
--
-- reconcile() walks calls and appointments in primary-key order, batch_size rows at a time (keyset
-- pagination: every batch is one index range scan, whatever the table's size), and repairs what the
-- rules in `correct` mode repair (`enforce` too: rows already written can no longer be rejected,
-- so they are repaired as in `correct`):
--   directions       a null direction gets the default_direction setting (missing_direction)
--   customer_links   a call with a customer gets customer_link_status linked (customer_link)
--   flags            a call with an appointment gets its flags from it (unlinked_appointment)
--   rolled_back      a call claiming a booking with no appointment, past its grace, is rolled
--                    back to creation_failed and queued for review (missing_appointment)
--   orphans          an orphaned webhook appointment is linked to the call whose booking_id equals
--                    its calcom_v2_booking_id, when exactly one call does (orphaned_appointment);
--                    several: queued for review, never guessed
--   due_verified     due verifications whose grace has passed are judged
-- No UPDATE touches more than batch_size rows, and a row another transaction holds is skipped, not
-- waited for (skipped_locked): the next run repairs it. A second run finds nothing left to fix.
-- Every repair is an event of kind 'reconcile'; every run a row of reconciliation_runs. It runs as
-- booking_guard_worker.

-- The calls part: one batch of calls (id > after), returns the last id seen and the counts.
create function booking_guard_internal.reconcile_calls_batch(after bigint, batch_size integer, run_id bigint,
                                                    out last_id bigint, out counts jsonb)
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    hi          bigint;
    n           bigint;
    dirs        bigint[];
    custs       bigint[];
    syncs       bigint[];
    claims      bigint[];
    v_id        bigint;
    n_dirs      bigint := 0;
    n_custs     bigint := 0;
    n_flags     bigint := 0;
    n_rolled    bigint := 0;
    n_skipped   bigint := 0;
    locked      bigint[];
    grace       interval := (select s.interval_value from booking_guard.settings s where s.name = 'verification_grace');
begin
    select max(b.id), count(*) into hi, n
      from (select g.id from booking_guard_internal.guarded_calls g where g.id > after order by g.id limit batch_size) b;
    last_id := hi;
    if n = 0 then
        counts := jsonb_build_object('calls_scanned', 0);
        return;
    end if;

    -- one range scan of the batch, joined with the appointments of the same id range
    select array_agg(x.id) filter (where x.direction is null
                                     and booking_guard.rule_mode('missing_direction', x.company) in ('correct', 'enforce')),
           array_agg(x.id) filter (where x.customer_id is not null and x.customer_link_status is distinct from 'linked'
                                     and booking_guard.rule_mode('customer_link', x.company) in ('correct', 'enforce')),
           array_agg(x.id) filter (where x.has_one
                                     and not (x.appointment_made is true and x.session_outcome = 'appointment_booked'
                                              and x.appointment_link_status = 'linked')
                                     and booking_guard.rule_mode(case when x.appointment_made is true
                                                                           and x.session_outcome is distinct from 'appointment_booked'
                                                                      then 'outcome_flag_mismatch'
                                                                      else 'unlinked_appointment' end, x.company) in ('correct', 'enforce')),
           array_agg(x.id) filter (where not x.has_one
                                     and (x.appointment_made is true or x.session_outcome = 'appointment_booked'
                                          or x.appointment_link_status = 'linked')
                                     and x.since <= now() - grace
                                     and booking_guard.rule_mode('missing_appointment', x.company) in ('correct', 'enforce')
                                     and not booking_guard_internal.within_grace(x.id, x.since))
      into dirs, custs, syncs, claims
      from (select g.id, g.company_id::text as company, g.direction, g.customer_id, g.customer_link_status,
                   g.appointment_made, g.session_outcome, g.appointment_link_status,
                   greatest(g.created_at, g.updated_at)::timestamptz as since,
                   a.call_id is not null as has_one
              from booking_guard_internal.guarded_calls g
              left join (select distinct ap.call_id from booking_guard_internal.guarded_appointments ap
                          where ap.call_id > after and ap.call_id <= hi) a on a.call_id = g.id
             where g.id > after and g.id <= hi) x;

    -- Rows another transaction holds (an application's booking in flight) are skipped, never waited
    -- for: the next run repairs them. The rest stay locked until this batch's transaction ends.
    locked := array(select g.id from booking_guard_internal.guarded_calls g
                     where g.id = any (coalesce(dirs, '{}') || coalesce(custs, '{}') || coalesce(syncs, '{}')
                                       || coalesce(claims, '{}'))
                       for no key update skip locked);
    n_skipped := cardinality(array(select unnest(coalesce(dirs, '{}') || coalesce(custs, '{}') || coalesce(syncs, '{}')
                                                 || coalesce(claims, '{}'))
                                   except select unnest(locked)));
    dirs := array(select unnest(dirs) intersect select unnest(locked));
    custs := array(select unnest(custs) intersect select unnest(locked));
    syncs := array(select unnest(syncs) intersect select unnest(locked));
    claims := array(select unnest(claims) intersect select unnest(locked));

    if dirs is not null then
        with u as (
            update booking_guard_internal.guarded_calls g
               set direction = (select s.text_value from booking_guard.settings s where s.name = 'default_direction'),
                   updated_at = now()
             where g.id = any (dirs) and g.direction is null
            returning g.id, g.direction
        )
        insert into booking_guard.events (kind, rule, entity_type, entity_id, details)
        select 'reconcile', 'missing_direction', 'call', u.id::text,
               jsonb_build_object('run_id', run_id, 'fix', 'direction set', 'direction', u.direction)
          from u;
        get diagnostics n_dirs = row_count;
    end if;

    if custs is not null then
        with u as (
            update booking_guard_internal.guarded_calls g
               set customer_link_status = 'linked', customer_linked_at = coalesce(g.customer_linked_at, now()),
                   customer_link_method = coalesce(g.customer_link_method, 'reconcile'), updated_at = now()
             where g.id = any (custs) and g.customer_id is not null and g.customer_link_status is distinct from 'linked'
            returning g.id
        )
        insert into booking_guard.events (kind, rule, entity_type, entity_id, details)
        select 'reconcile', 'customer_link', 'call', u.id::text,
               jsonb_build_object('run_id', run_id, 'fix', 'customer_link_status set to linked')
          from u;
        get diagnostics n_custs = row_count;
    end if;

    foreach v_id in array coalesce(syncs, '{}') loop
        if booking_guard_internal.sync_call_flags(v_id) then
            n_flags := n_flags + 1;
            perform booking_guard_internal.log_event('reconcile', 'unlinked_appointment', 'call', v_id::text,
                jsonb_build_object('run_id', run_id, 'fix', 'flags set from the appointments'));
        end if;
    end loop;

    foreach v_id in array coalesce(claims, '{}') loop
        if booking_guard_internal.judge_call(v_id, true) = 'rolled_back' then
            n_rolled := n_rolled + 1;
            perform booking_guard_internal.log_event('reconcile', 'missing_appointment', 'call', v_id::text,
                jsonb_build_object('run_id', run_id, 'fix', 'rolled back to creation_failed, queued for review'));
        end if;
    end loop;

    counts := jsonb_build_object('calls_scanned', n, 'directions', n_dirs, 'customer_links', n_custs,
                                 'flags', n_flags, 'rolled_back', n_rolled, 'skipped_locked', n_skipped);
end
$$;

comment on function booking_guard_internal.reconcile_calls_batch(bigint, integer, bigint) is
    'reconcile(): one batch of calls after the given id: directions, customer links, flags from the appointments, rollbacks of claims without one.';

-- The appointments part: one batch of appointments (id > after): orphans.
create function booking_guard_internal.reconcile_orphans_batch(after bigint, batch_size integer, run_id bigint,
                                                      out last_id bigint, out counts jsonb)
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    hi          bigint;
    n           bigint;
    ambiguous   jsonb;
    amb         jsonb;
    n_linked    bigint := 0;
    n_ambig     bigint := 0;
    n_unmatched bigint := 0;
begin
    select max(b.id), count(*) into hi, n
      from (select a.id from booking_guard_internal.guarded_appointments a where a.id > after order by a.id limit batch_size) b;
    last_id := hi;
    if n = 0 then
        counts := jsonb_build_object('appointments_scanned', 0);
        return;
    end if;

    with o as materialized (
        select a.id, a.calcom_v2_booking_id::text as booking_id, m.ids as matches, m.company
          from booking_guard_internal.guarded_appointments a
          left join lateral (select array_agg(c.id order by c.id) as ids, min(c.company_id::text) as company
                               from booking_guard_internal.guarded_calls c
                              where c.booking_id = a.calcom_v2_booking_id) m on true
         where a.id > after and a.id <= hi
           and a.source = 'retell_webhook'
           and (a.call_id is null or not exists (select from booking_guard_internal.guarded_calls c where c.id = a.call_id))
           for no key update of a skip locked
    ), u as (
        update booking_guard_internal.guarded_appointments a
           set call_id = o.matches[1], updated_at = now()
          from o
         where a.id = o.id and cardinality(o.matches) = 1
           and booking_guard.rule_mode('orphaned_appointment', o.company) in ('correct', 'enforce')
        returning a.id, a.call_id
    ), ev as (
        insert into booking_guard.events (kind, rule, entity_type, entity_id, details)
        select 'reconcile', 'orphaned_appointment', 'appointment', u.id::text,
               jsonb_build_object('run_id', run_id, 'fix', 'linked by booking id', 'call_id', u.call_id)
          from u
        returning 1
    )
    select (select count(*) from ev),
           count(*) filter (where o.matches is null),
           coalesce(jsonb_agg(jsonb_build_object('id', o.id, 'booking_id', o.booking_id, 'matches', o.matches)
                              order by o.id) filter (where cardinality(o.matches) > 1), '[]')
      into n_linked, n_unmatched, ambiguous
      from o;

    for amb in select * from jsonb_array_elements(ambiguous) loop
        if booking_guard.rule_mode('orphaned_appointment', null) in ('correct', 'enforce')
           and booking_guard_internal.queue_orphan((amb ->> 'id')::bigint, amb ->> 'booking_id',
                   array(select jsonb_array_elements_text(amb -> 'matches')::bigint)) then
            n_ambig := n_ambig + 1;
        end if;
    end loop;

    counts := jsonb_build_object('appointments_scanned', n, 'orphans', n_linked, 'orphans_ambiguous', n_ambig,
                                 'orphans_unmatched', n_unmatched);
end
$$;

comment on function booking_guard_internal.reconcile_orphans_batch(bigint, integer, bigint) is
    'reconcile(): one batch of appointments after the given id: orphans linked by booking id when exactly one call matches, queued for review when several do.';

-- One step of the job reconcile: a batch of calls, then of appointments, then of due
-- verifications; the run is a row of reconciliation_runs (job_begin() opens it, job_end() closes it).
create function booking_guard_internal.reconcile_step(state jsonb)
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    batch_size  integer := coalesce((state -> 'args' ->> 'batch_size')::integer,
                                    (select s.integer_value from booking_guard.settings s where s.name = 'job_batch_size'));
    phase       text := coalesce(state ->> 'phase', 'calls');
    after       bigint := coalesce((state ->> 'after')::bigint, -9223372036854775808);
    run_id      bigint := (state ->> 'run_id')::bigint;
    totals      jsonb := coalesce(state -> 'totals',
                                  jsonb_build_object('calls_scanned', 0, 'appointments_scanned', 0, 'directions', 0,
                                                     'customer_links', 0, 'flags', 0, 'rolled_back', 0, 'orphans', 0,
                                                     'orphans_ambiguous', 0, 'orphans_unmatched', 0, 'due_verified', 0,
                                                     'due_fixed', 0, 'skipped_locked', 0));
    batch       record;
    k           text;
    v_id        bigint;
    verdict     text;
    n           integer := 0;
begin
    perform booking_guard_internal.attached();
    if phase in ('calls', 'orphans') then
        if phase = 'calls' then
            batch := booking_guard_internal.reconcile_calls_batch(after, batch_size, run_id);
        else
            batch := booking_guard_internal.reconcile_orphans_batch(after, batch_size, run_id);
        end if;
        for k in select jsonb_object_keys(batch.counts) loop
            totals := jsonb_set(totals, array[k], to_jsonb((totals ->> k)::bigint + (batch.counts ->> k)::bigint));
        end loop;
        if batch.last_id is null then
            return state || jsonb_build_object('totals', totals, 'after', null,
                                               'phase', case phase when 'calls' then 'orphans' else 'due' end);
        end if;
        return state || jsonb_build_object('totals', totals, 'after', batch.last_id, 'phase', phase);
    end if;

    -- due verifications whose grace has passed
    for v_id in
        select d.call_id from booking_guard.due_verifications d
         where d.due_at <= clock_timestamp()
         order by d.due_at, d.call_id
         limit batch_size
           for update skip locked
    loop
        n := n + 1;
        delete from booking_guard.due_verifications d where d.call_id = v_id;
        verdict := booking_guard_internal.judge_call(v_id, true);
        totals := jsonb_set(totals, '{due_verified}', to_jsonb((totals ->> 'due_verified')::bigint + 1));
        if verdict in ('rolled_back', 'corrected') then
            totals := jsonb_set(totals, '{due_fixed}', to_jsonb((totals ->> 'due_fixed')::bigint + 1));
            perform booking_guard_internal.log_event('reconcile', case verdict when 'rolled_back' then 'missing_appointment'
                                                                               else 'unlinked_appointment' end,
                                                     'call', v_id::text,
                                                     jsonb_build_object('run_id', run_id, 'fix', 'due verification: ' || verdict));
        end if;
    end loop;
    return state || jsonb_build_object('totals', totals, 'done', n < batch_size);
end
$$;

comment on function booking_guard_internal.reconcile_step(jsonb) is
    'Job reconcile, one step: a batch of calls (directions, customer links, flags, rollbacks), of appointments (orphans) or of due verifications; rows another transaction holds are skipped (counted in skipped_locked) and repaired by the next run.';

create function booking_guard.reconcile(batch_size integer default 10000)
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_column
declare
    result   jsonb;
    totals   jsonb;
    seconds  numeric;
begin
    if reconcile.batch_size is null or reconcile.batch_size not between 1 and 1000000 then
        raise exception 'invalid batch size: %', coalesce(reconcile.batch_size::text, 'null')
            using errcode = 'BG005',
                  detail = 'batch_size is the most rows one statement of reconcile() may change or lock.',
                  hint = 'Give a number between 1 and 1000000, e.g. select booking_guard.reconcile(10000);';
    end if;
    perform booking_guard_internal.attached();
    result := booking_guard_internal.run_job_steps('reconcile', jsonb_build_object('batch_size', reconcile.batch_size));
    if result ? 'skipped' then
        return jsonb_build_object('skipped', result ->> 'skipped');
    end if;
    if result ? 'error' then
        raise warning 'booking_guard.reconcile() run % failed: %', result ->> 'run_id', result ->> 'error';
        return jsonb_build_object('run_id', (result ->> 'run_id')::bigint, 'error', result ->> 'error');
    end if;
    return result -> 'totals';
end
$$;

comment on function booking_guard.reconcile(integer) is
    'Repairs, over the whole attached tables and batch_size rows per statement, what the rules in correct mode repair (directions, customer links, flags, rollbacks, orphans, due verifications); idempotent; logged in reconciliation_runs and as reconcile events. Returns the counts. Runs as booking_guard_worker, in the caller''s transaction (the scheduled job commits per batch).';
