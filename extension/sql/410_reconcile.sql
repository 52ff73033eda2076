-- Reconciliation: over the whole tables, hourly.
--
-- reconcile() walks calls and appointments in primary-key order, batch_size rows at a time (keyset
-- pagination: every batch is one index range scan, whatever the table's size), finds what every
-- rule finds on them (call_findings() and appointment_findings(): the same conditions as detection,
-- declared rules included) and applies the repair of each rule in `correct` mode (`enforce` too:
-- rows already written can no longer be rejected, so they are repaired as in `correct`), with the
-- monitor's repair_finding(). The counts say what was repaired:
--   directions        a null direction got the default_direction setting (missing_direction)
--   customer_links    a call with a customer got customer_link_status linked (customer_link)
--   flags             a call with an appointment got its flags from it (unlinked_appointment, ...)
--   rolled_back       a call claiming a booking with no appointment, past its grace, was rolled
--                     back to creation_failed and queued for review (missing_appointment, ...)
--   orphans           an orphaned webhook appointment was linked to the call whose booking_id equals
--                     its calcom_v2_booking_id, when exactly one call does (orphaned_appointment);
--                     orphans_ambiguous: several did, queued for review, never guessed;
--                     orphans_unmatched: none did
--   declared_repairs  a declared rule's repair statement changed something
--   due_verified      due verifications whose grace has passed were judged (due_fixed: repaired)
-- No UPDATE touches more than batch_size rows, and a row another transaction holds is skipped, not
-- waited for (skipped_locked): the next run repairs it. A second run finds nothing left to fix.
-- Every repair is an event of kind 'reconcile'; every run a row of reconciliation_runs. It runs as
-- booking_guard_worker.

-- One batch of calls or appointments (id > after): the findings of the rules that repair, repaired.
-- Returns the last id seen and the counts.
create function booking_guard_internal.reconcile_batch(entity text, after bigint, batch_size integer, run_id bigint,
                                                       out last_id bigint, out counts jsonb)
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    n       bigint;
    fs      booking_guard.finding[];
    f       booking_guard.finding;
    result  record;
begin
    -- the batch is a key range: (after, last_id]
    if entity = 'call' then
        select max(b.id), count(*) into last_id, n
          from (select g.id from booking_guard_internal.guarded_calls g where g.id > after order by g.id limit batch_size) b;
    else
        select max(b.id), count(*) into last_id, n
          from (select a.id from booking_guard_internal.guarded_appointments a where a.id > after order by a.id limit batch_size) b;
    end if;
    counts := jsonb_build_object(entity || 's_scanned', n);
    if n = 0 then
        return;
    end if;
    fs := case entity when 'call' then array(select x from booking_guard_internal.call_findings(null, null, after, last_id) x)
                      else array(select x from booking_guard_internal.appointment_findings(null, null, after, last_id) x) end;
    for f in
        select x.* from unnest(fs) x join booking_guard.rules r on r.name = x.rule
         where r.repair_kind is not null
         order by x.entity_id::bigint, x.rule
    loop
        -- a row an application's transaction holds is skipped, never waited for: the next run repairs it
        if booking_guard_internal.held_by_another(f) then
            counts := jsonb_set(counts, '{skipped_locked}', to_jsonb(coalesce((counts ->> 'skipped_locked')::bigint, 0) + 1));
            continue;
        end if;
        result := booking_guard_internal.repair_finding(f);
        if result.counter is not null then
            counts := jsonb_set(counts, array[result.counter],
                                to_jsonb(coalesce((counts ->> result.counter)::bigint, 0) + 1));
        end if;
        if result.done is not null then
            counts := jsonb_set(counts, '{fixed}', to_jsonb(coalesce((counts ->> 'fixed')::bigint, 0) + 1));
            perform booking_guard_internal.log_event('reconcile', f.rule, f.entity_type, f.entity_id,
                jsonb_build_object('run_id', run_id, 'fix', result.done));
        end if;
    end loop;
end
$$;

comment on function booking_guard_internal.reconcile_batch(text, bigint, integer, bigint) is
    'reconcile(): one batch of calls or appointments (entity) after the given id: the findings of every rule that repairs, repaired where its mode corrects (repair_finding()); returns the last id and the counts.';

-- One step of the job reconcile: a batch of calls, then of appointments, then of due
-- verifications; the run is a row of reconciliation_runs (job_begin() opens it, job_end() closes it).
create function booking_guard_internal.reconcile_step(state jsonb)
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
set jit = off
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
                                                     'orphans_ambiguous', 0, 'orphans_unmatched', 0, 'declared_repairs', 0,
                                                     'due_verified', 0, 'due_fixed', 0, 'skipped_locked', 0, 'fixed', 0));
    batch       record;
    k           text;
    v_id        bigint;
    verdict     text;
    n           integer := 0;
begin
    perform booking_guard_internal.attached();
    if phase in ('calls', 'appointments') then
        batch := booking_guard_internal.reconcile_batch(case phase when 'calls' then 'call' else 'appointment' end,
                                                        after, batch_size, run_id);
        for k in select jsonb_object_keys(batch.counts) loop
            totals := jsonb_set(totals, array[k], to_jsonb(coalesce((totals ->> k)::bigint, 0) + (batch.counts ->> k)::bigint));
        end loop;
        if batch.last_id is null then
            return state || jsonb_build_object('totals', totals, 'after', null,
                                               'phase', case phase when 'calls' then 'appointments' else 'due' end);
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
            totals := jsonb_set(totals, '{fixed}', to_jsonb((totals ->> 'fixed')::bigint + 1));
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
    'Job reconcile, one step: a batch of calls or of appointments (every rule''s findings, repaired where its mode corrects) or of due verifications; rows another transaction holds are skipped (counted in skipped_locked) and repaired by the next run.';

create function booking_guard.reconcile(batch_size integer default 10000)
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
set jit = off
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
    'Repairs, over the whole attached tables and batch_size rows per batch, what the rules in correct mode repair (directions, customer links, flags, rollbacks, orphans, declared repairs, due verifications); idempotent; logged in reconciliation_runs and as reconcile events. Returns the counts. Runs as booking_guard_worker, in the caller''s transaction (the scheduled job commits per batch).';
