-- Retention: every table that grows keeps its rows for a setting's time, and the purge job removes
-- the rest, a batch per transaction.
--
--   table                        setting                     what goes
--   events                       events_retention            older events already folded into the metric
--                                                            counters (so the counters stay right)
--   alerts                       alerts_retention            alerts resolved longer ago (open ones stay)
--   review_queue                 review_retention            items resolved longer ago (open ones stay)
--   retries                      retries_retention           retries finished longer ago
--   circuit_transitions          circuit_history_retention   transitions older, already folded per key
--   reconciliation_runs,         runs_retention              older runs, digests and reports
--   alert_digests, reports
--   due_verifications            (none)                      entries whose call no longer exists
--
-- The metric counters are totals folded from the events and transitions, so they do not change when
-- those are purged; reports and KPIs read the events of their window, which must be shorter than
-- events_retention (the defaults keep 30 days).

-- One batch of one table, with booking_guard_owner's rights (events refuse any other DELETE).
create function booking_guard_internal.purge_batch(what text, batch integer)
returns bigint
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    n        bigint := 0;
    horizon  xid8 := (select s.horizon from booking_guard.metric_fold_state s);
begin
    case what
        when 'events' then
            delete from booking_guard.events e
             where e.id in (select x.id from booking_guard.events x
                             where x.at < now() - booking_guard_internal.retention('events_retention') and x.xid < horizon
                             order by x.at limit batch);
        when 'alerts' then
            delete from booking_guard.alerts a
             where a.id in (select x.id from booking_guard.alerts x
                             where x.resolved_at < now() - booking_guard_internal.retention('alerts_retention')
                             limit batch);
        when 'review_queue' then
            delete from booking_guard.review_queue q
             where q.id in (select x.id from booking_guard.review_queue x
                             where x.status = 'resolved'
                               and x.updated_at < now() - booking_guard_internal.retention('review_retention')
                             limit batch);
        when 'retries' then
            delete from booking_guard.retries r
             where r.id in (select x.id from booking_guard.retries x
                             where x.finished_at < now() - booking_guard_internal.retention('retries_retention')
                             limit batch);
        when 'circuit_transitions' then
            delete from booking_guard.circuit_transitions t
             where t.id in (select x.id from booking_guard.circuit_transitions x
                              join booking_guard.metric_circuit_marks m on m.key = x.key and x.id <= m.last_id
                             where x.at < now() - booking_guard_internal.retention('circuit_history_retention')
                             limit batch);
        when 'reconciliation_runs' then
            delete from booking_guard.reconciliation_runs r
             where r.id in (select x.id from booking_guard.reconciliation_runs x
                             where x.started_at < now() - booking_guard_internal.retention('runs_retention')
                             limit batch);
        when 'alert_digests' then
            delete from booking_guard.alert_digests d
             where d.period_end in (select x.period_end from booking_guard.alert_digests x
                                     where x.period_end < now() - booking_guard_internal.retention('runs_retention')
                                     limit batch);
        when 'reports' then
            delete from booking_guard.reports r
             where r.day in (select x.day from booking_guard.reports x
                              where x.day < current_date - booking_guard_internal.retention('runs_retention')
                              limit batch);
    end case;
    get diagnostics n = row_count;
    return n;
end
$$;

comment on function booking_guard_internal.purge_batch(text, integer) is
    'The purge of one table, at most batch rows: what is past its retention (see 450_retention.sql); returns how many went.';

create function booking_guard_internal.retention(setting_name text)
returns interval
language sql
stable
set search_path = pg_catalog, pg_temp
as $$
    select s.interval_value from booking_guard.settings s where s.name = setting_name
$$;

comment on function booking_guard_internal.retention(text) is
    'The interval of a retention setting.';

-- Whether a call exists, read as the worker (the purge's batch runs as booking_guard_owner, which may
-- not read the application's tables): due entries of calls gone are leftovers.
create function booking_guard_internal.call_exists(call_id bigint)
returns boolean
language sql
stable
set search_path = pg_catalog, pg_temp
as $$
    select exists (select from booking_guard_internal.guarded_calls g where g.id = call_exists.call_id)
$$;

comment on function booking_guard_internal.call_exists(bigint) is
    'Whether the attached calls table has a call with this id.';

-- Job purge, one step: a batch of one table, tables in turn.
create function booking_guard_internal.purge_step(state jsonb)
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
set jit = off
as $$
declare
    tables  constant text[] := array['events', 'alerts', 'review_queue', 'retries', 'circuit_transitions',
                                     'reconciliation_runs', 'alert_digests', 'reports', 'due_verifications'];
    i       integer := coalesce((state ->> 'table_index')::integer, 1);
    batch   integer := (select s.integer_value from booking_guard.settings s where s.name = 'job_batch_size');
    n       bigint;
    purged  jsonb := coalesce(state -> 'purged', '{}');
begin
    if tables[i] = 'due_verifications' and not exists (select from booking_guard.attached_tables) then
        n := 0;   -- without an attachment, nothing tells a leftover from a due call
    elsif tables[i] = 'due_verifications' then
        -- the calls are read as the worker: the leftovers' ids first, then the owner's delete
        delete from booking_guard.due_verifications d
         where d.call_id in (select x.call_id from booking_guard.due_verifications x
                              where x.due_at < now() - interval '1 hour'
                                and not booking_guard_internal.call_exists(x.call_id)
                              limit batch);
        get diagnostics n = row_count;
    else
        n := booking_guard_internal.purge_batch(tables[i], batch);
    end if;
    purged := jsonb_set(purged, array[tables[i]], to_jsonb(coalesce((purged ->> tables[i])::bigint, 0) + n));
    if n < batch then
        i := i + 1;
    end if;
    return state || jsonb_build_object('purged', purged, 'table_index', i, 'done', i > cardinality(tables));
end
$$;

comment on function booking_guard_internal.purge_step(jsonb) is
    'Job purge, one step: removes up to job_batch_size rows past their retention from one table, the tables in turn.';

create function booking_guard.purge()
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
set jit = off
as $$
declare
    result  jsonb := booking_guard_internal.run_job_steps('purge', '{}');
begin
    if result ? 'skipped' then
        return jsonb_build_object('skipped', result ->> 'skipped');
    end if;
    perform booking_guard_internal.job_raise(result);
    return result -> 'purged';
end
$$;

comment on function booking_guard.purge() is
    'Removes what is past its retention from every growing table (events_retention, alerts_retention, review_retention, retries_retention, circuit_history_retention, runs_retention) and due entries of calls gone; returns how many rows went, per table. Runs as booking_guard_worker, in the caller''s transaction (the scheduled job purge commits per batch).';
