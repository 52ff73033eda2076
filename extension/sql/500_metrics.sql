-- The alert types booking_guard raises that are not rules: the closed set of type labels, with
-- the rules' names.
create function booking_guard_internal.alert_types()
returns table (alert_type text)
language sql
stable
set search_path = pg_catalog, pg_temp
as $$
    select r.name from booking_guard.rules r
    union
    select p.reason from booking_guard.review_priorities p
    union
    values ('job_stalled'), ('alert_storm')
$$;

comment on function booking_guard_internal.alert_types() is
    'Every alert type booking_guard raises: the rules, the review reasons (a rollback is alerted as one), job_stalled and alert_storm; metrics label anything else other.';

create function booking_guard_internal.histogram_le(value double precision, buckets double precision[])
returns text
language sql
immutable
set search_path = pg_catalog, pg_temp
as $$
    select coalesce((select min(b) from unnest(buckets) b where b >= value), 'Infinity'::double precision)::text
$$;

comment on function booking_guard_internal.histogram_le(double precision, double precision[]) is
    'The upper bound (as text, Infinity for the last) of the histogram bucket a value falls in.';

-- Called by fold_metrics() under the fold state's row lock.
create function booking_guard_internal.fold_circuit_metrics()
returns void
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    k             text;
    v_last_id     bigint;
    v_open_since  timestamptz;
    t             record;
    v_bounds      double precision[] := (select d.buckets from booking_guard.metric_definitions d
                                          where d.name = 'circuit_breaker_recovery_time_seconds');
    v_secs        double precision;
    v_seen        boolean;
    n_changes     bigint := 0;
begin
    for k in select b.key from booking_guard.circuit_breakers b loop
        select m.last_id, m.open_since into v_last_id, v_open_since
          from booking_guard.metric_circuit_marks m where m.key = k;
        v_last_id := coalesce(v_last_id, 0);
        v_seen := false;
        for t in select x.id, x.to_state, x.at from booking_guard.circuit_transitions x
                  where x.key = k and x.id > v_last_id order by x.id loop
            v_seen := true;
            n_changes := n_changes + 1;
            v_last_id := t.id;
            if t.to_state = 'open' then
                insert into booking_guard.metric_counters as m (name, labels, value)
                values ('circuit_breaker_open_total', jsonb_build_object('key', k), 1)
                on conflict (name, labels) do update set value = m.value + 1, updated_at = now();
                v_open_since := coalesce(v_open_since, t.at);
            elsif t.to_state = 'closed' and v_open_since is not null then
                v_secs := greatest(extract(epoch from t.at - v_open_since)::double precision, 0);
                insert into booking_guard.metric_counters as m (name, labels, value)
                values ('circuit_breaker_recovery_time_seconds_bucket',
                        jsonb_build_object('le', booking_guard_internal.histogram_le(v_secs, v_bounds)), 1),
                       ('circuit_breaker_recovery_time_seconds_sum', '{}', v_secs),
                       ('circuit_breaker_recovery_time_seconds_count', '{}', 1)
                on conflict (name, labels) do update set value = m.value + excluded.value, updated_at = now();
                v_open_since := null;
            end if;
        end loop;
        if v_seen then
            insert into booking_guard.metric_circuit_marks as m (key, last_id, open_since)
            values (k, v_last_id, v_open_since)
            on conflict (key) do update set last_id = excluded.last_id, open_since = excluded.open_since;
        end if;
        v_open_since := null;
    end loop;
    if n_changes > 0 then
        insert into booking_guard.metric_counters as m (name, labels, value)
        values ('circuit_breaker_state_changes_total', '{}', n_changes)
        on conflict (name, labels) do update set value = m.value + excluded.value, updated_at = now();
    end if;
end
$$;

comment on function booking_guard_internal.fold_circuit_metrics() is
    'Internal (fold_metrics): folds new circuit_transitions, per key by id, into circuit_breaker_open_total, circuit_breaker_state_changes_total and circuit_breaker_recovery_time_seconds.';

create function booking_guard.fold_metrics(max_events integer default 100000)
returns bigint
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_from        xid8;
    v_to          xid8;
    v_cut         xid8;
    v_creation    double precision[];
    v_validation  double precision[];
    n             bigint;
begin
    if max_events is null or max_events < 1 then
        raise exception 'invalid max_events %', coalesce(max_events::text, 'null')
            using errcode = 'BG005',
                  detail = 'fold_metrics() folds at most max_events events per run; it must be a positive number.',
                  hint = 'select booking_guard.fold_metrics(100000);';
    end if;
    -- A standby or a read-only transaction cannot write the counters, and a snapshot older than
    -- the statement (repeatable read) could miss a concurrent fold: then just read.
    if pg_is_in_recovery() or current_setting('transaction_read_only')::boolean
       or current_setting('transaction_isolation') <> 'read committed' then
        return 0;
    end if;
    -- one fold at a time: the row lock of the fold state (a concurrent scrape just reads what is folded)
    select s.horizon into v_from from booking_guard.metric_fold_state s for update skip locked;
    if not found then
        return 0;
    end if;
    v_to := pg_snapshot_xmin(pg_current_snapshot());
    -- At most max_events events per run, and only whole transactions: stop before the xid of
    -- the first event past the limit (or just after one transaction bigger than the limit).
    v_cut := (select e.xid from booking_guard.events e
               where e.xid >= v_from and e.xid < v_to
               order by e.xid offset max_events limit 1);
    if v_cut is not null then
        -- the first transaction alone is over the limit: take it whole
        if v_cut = (select min(e.xid) from booking_guard.events e where e.xid >= v_from and e.xid < v_to) then
            v_cut := coalesce((select min(e.xid) from booking_guard.events e where e.xid > v_cut and e.xid < v_to), v_to);
        end if;
        v_to := v_cut;
    end if;
    if v_to <= v_from then
        perform booking_guard_internal.fold_circuit_metrics();
        return 0;
    end if;

    v_creation := (select d.buckets from booking_guard.metric_definitions d
                    where d.name = 'appointment_creation_duration_seconds');
    v_validation := (select d.buckets from booking_guard.metric_definitions d
                      where d.name = 'appointment_validation_duration_seconds');

    -- Per event only field extraction and a hash aggregate; labels and contributions are made
    -- from the few groups. Every expression is inline (a function with SET is never inlined) and
    -- defensive: a malformed detail must not stop the fold for good, so it becomes null or 'other'.
    with raw as materialized (
        select e.kind, e.rule, e.at,
               case when jsonb_typeof(e.details -> 'success') = 'boolean' then (e.details -> 'success')::boolean end as ok,
               e.details ->> 'reason' as reason,
               case when jsonb_typeof(e.details -> 'auto_corrected') = 'boolean'
                    then (e.details -> 'auto_corrected')::boolean end as corrected,
               case when jsonb_typeof(e.details -> 'duration_ms') = 'number'
                    then (e.details -> 'duration_ms')::numeric end as ms
          from booking_guard.events e
         where e.xid >= v_from and e.xid < v_to
           and e.kind in ('record_booking', 'validation', 'alert', 'review')
    ),
    ev as materialized (
        select x.kind, x.rule, x.ok, x.reason, x.corrected, s.seconds,
               date_bin('5 minutes', x.at, timestamptz '2000-01-01 00:00+00') as bucket,
               -- the histogram bucket: the smallest bound >= seconds (width_bucket counts the bounds <= it)
               case when s.seconds is not null then
                   coalesce(case when w.n > 0 and w.bounds[w.n] = s.seconds then w.bounds[w.n] else w.bounds[w.n + 1] end,
                            'Infinity') end as le
          from raw x
         cross join lateral (select case when x.ms between -1e300 and 1e300 then x.ms::double precision / 1000.0 end
                                    as seconds) s
         cross join lateral (select y.bounds, width_bucket(s.seconds, y.bounds) as n
                               from (select case x.kind when 'record_booking' then v_creation else v_validation end
                                            as bounds) y) w
    ),
    grouped as (
        select g.kind, g.ok, g.corrected, g.bucket, g.le::text as le,
               -- label values: identifier-like reasons and rule names as they are, never free text or ids
               -- label values from closed sets: a reason or rule nobody declared is 'other', so that
               -- no input can grow the number of series
               case when g.reason is null then 'unknown'
                    when g.reason in (select v.reason from booking_guard.validation_reasons v) then g.reason
                    else 'other' end as reason,
               case when g.rule is null then 'unknown'
                    when g.rule in (select x.alert_type from booking_guard_internal.alert_types() x) then g.rule
                    else 'other' end as rule,
               g.n, g.timed, g.seconds
          from (select ev.kind, ev.ok, ev.corrected, ev.bucket, ev.le, ev.reason, ev.rule,
                       count(*)::double precision as n, count(ev.seconds)::double precision as timed,
                       coalesce(sum(ev.seconds), 0) as seconds
                  from ev
                 group by ev.kind, ev.ok, ev.corrected, ev.bucket, ev.le, ev.reason, ev.rule) g
    ),
    -- (counter series or null, labels, amount, 5-minute window name or null, bucket)
    contrib as (
        select c.counter, c.labels, c.amount, c.win, g.bucket
          from grouped g
         cross join lateral (values
            (case when g.kind = 'record_booking' and g.ok then 'appointment_creation_success_total' end,
             '{}'::jsonb, g.n, case when g.kind = 'record_booking' and g.ok then 'creation_success' end),
            (case when g.kind = 'record_booking' and g.ok is false then 'appointment_creation_failure_total' end,
             jsonb_build_object('reason', g.reason), g.n, null),
            (null, null, g.n, case when g.kind = 'record_booking' and g.ok is not null then 'creation_total' end),
            (case when g.kind = 'record_booking' and g.timed > 0 then 'appointment_creation_duration_seconds_bucket' end,
             jsonb_build_object('le', g.le), g.timed, null),
            (case when g.kind = 'record_booking' and g.timed > 0 then 'appointment_creation_duration_seconds_sum' end,
             '{}', g.seconds, case when g.kind = 'record_booking' and g.timed > 0 then 'creation_seconds' end),
            (case when g.kind = 'record_booking' and g.timed > 0 then 'appointment_creation_duration_seconds_count' end,
             '{}', g.timed, case when g.kind = 'record_booking' and g.timed > 0 then 'creation_timed' end),
            (case when g.kind = 'validation' and g.ok is not null then 'appointment_validation_total' end,
             '{}', g.n, case when g.kind = 'validation' and g.ok is not null then 'validation_total' end),
            (null, null, g.n, case when g.kind = 'validation' and g.ok then 'validation_success' end),
            (case when g.kind = 'validation' and g.ok is false then 'appointment_validation_failure_total' end,
             jsonb_build_object('type', g.reason), g.n, null),
            (case when g.kind = 'validation' and g.timed > 0 then 'appointment_validation_duration_seconds_bucket' end,
             jsonb_build_object('le', g.le), g.timed, null),
            (case when g.kind = 'validation' and g.timed > 0 then 'appointment_validation_duration_seconds_sum' end,
             '{}', g.seconds, null),
            (case when g.kind = 'validation' and g.timed > 0 then 'appointment_validation_duration_seconds_count' end,
             '{}', g.timed, null),
            (case when g.kind = 'alert' then 'data_inconsistency_detected_total' end,
             jsonb_build_object('type', g.rule), g.n, case when g.kind = 'alert' then 'inconsistencies' end),
            (case when g.kind = 'alert' and g.corrected then 'data_inconsistency_auto_corrected_total' end,
             '{}', g.n, case when g.kind = 'alert' and g.corrected then 'auto_corrected' end),
            (case when g.kind = 'review' then 'data_inconsistency_manual_review_total' end, '{}', g.n, null)
         ) as c(counter, labels, amount, win)
         where c.counter is not null or c.win is not null
    ),
    counted as (
        insert into booking_guard.metric_counters as m (name, labels, value)
        select c.counter, c.labels, sum(c.amount) from contrib c where c.counter is not null group by c.counter, c.labels
        on conflict (name, labels) do update set value = m.value + excluded.value, updated_at = now()
        returning 1
    ),
    windowed as (
        insert into booking_guard.metric_windows as w (name, bucket, value)
        select c.win, c.bucket, sum(c.amount)
          from contrib c where c.win is not null group by c.win, c.bucket
        on conflict (name, bucket) do update set value = w.value + excluded.value
        returning 1
    )
    select (select count(*) from booking_guard.events e where e.xid >= v_from and e.xid < v_to)
      into n
      from (select count(*) from counted) a, (select count(*) from windowed) b;

    insert into booking_guard.metric_counters as m (name, labels, value)
    values ('booking_guard_metrics_events_folded_total', '{}', n)
    on conflict (name, labels) do update set value = m.value + excluded.value, updated_at = now();
    update booking_guard.metric_fold_state s
       set horizon = v_to, folded_at = now(), events_folded = s.events_folded + n, runs = s.runs + 1;
    delete from booking_guard.metric_windows w where w.bucket < now() - interval '2 days';
    perform booking_guard_internal.fold_circuit_metrics();
    return n;
end
$$;

comment on function booking_guard.fold_metrics(integer) is
    'Adds the events of finished transactions not folded yet (xid in [horizon, snapshot xmin)) to the metric counters, at most max_events per run, each exactly once; returns how many were folded. A concurrent run returns 0 at once. metrics() runs it.';

-- The label sets every scrape shows, at 0 until something happens: a counter series that first
-- appears at 1 has no earlier sample, and Prometheus' rate() would miss that first increase.
create function booking_guard_internal.metric_label_seeds()
returns table (name text, labels jsonb)
language sql
stable
set search_path = pg_catalog, pg_temp
as $$
    select 'appointment_creation_success_total', '{}'::jsonb
    union all select 'appointment_creation_failure_total', jsonb_build_object('reason', v.reason)
      from booking_guard.validation_reasons v where v.reason <> 'ok'
    union all select 'appointment_validation_total', '{}'
    union all select 'appointment_validation_failure_total', jsonb_build_object('type', v.reason)
      from booking_guard.validation_reasons v where v.reason <> 'ok'
    union all select 'data_inconsistency_detected_total', jsonb_build_object('type', x.alert_type)
      from booking_guard_internal.alert_types() x
    union all select 'data_inconsistency_auto_corrected_total', '{}'
    union all select 'data_inconsistency_manual_review_total', '{}'
    union all select 'booking_guard_metrics_events_folded_total', '{}'
    union all select 'circuit_breaker_open_total', jsonb_build_object('key', b.key) from booking_guard.circuit_breakers b
    union all select 'circuit_breaker_state_changes_total', '{}'
$$;

comment on function booking_guard_internal.metric_label_seeds() is
    'Counter series exported at 0 before their first event (every rule, every validation reason), so that rate() sees their first increase.';

create function booking_guard.metrics()
returns table (name text, type text, help text, labels jsonb, value double precision)
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
    perform booking_guard.fold_metrics(10000);   -- small batches keep a scrape short after a backlog

    return query
    with defs as (
        select d.name, d.type, d.help, d.buckets from booking_guard.metric_definitions d
    ),
    series as (   -- folded counters, with their zero-initialised label sets
        select s.name, s.labels from booking_guard_internal.metric_label_seeds() s
        union
        select c.name, c.labels from booking_guard.metric_counters c
    ),
    win as (
        select w.name, sum(w.value) as value
          from booking_guard.metric_windows w
         where w.bucket >= now() - interval '24 hours'
         group by w.name
    ),
    open_alerts as (
        select a.alert_type, a.severity, count(*)::double precision as n
          from booking_guard.alerts a
         where a.resolved_at is null
         group by a.alert_type, a.severity
    ),
    fold as (
        select f.folded_at from booking_guard.metric_fold_state f
    )
    select m.* from (
    -- counters
    select d.name, d.type, d.help, s.labels, coalesce(c.value, 0)
      from defs d
      join series s on s.name = d.name
      left join booking_guard.metric_counters c on c.name = s.name and c.labels = s.labels
     where d.type = 'counter'
    union all
    select d.name, d.type, d.help, '{}'::jsonb, booking_guard.circuit_fast_fail_total()::double precision
      from defs d
     where d.name = 'circuit_breaker_fast_fail_total'
    union all
    select d.name, d.type, d.help, jsonb_build_object('key', b.key, 'state', st.state),
           (st.state = b.state)::integer::double precision
      from defs d
     cross join (select c.key, booking_guard.circuit_state(c.key) as state from booking_guard.circuit_breakers c) b
     cross join (values ('closed'), ('open'), ('half_open')) as st(state)
     where d.name = 'circuit_breaker_state'
    -- histograms: cumulative buckets, sum and count
    union all
    select d.name || '_bucket', d.type, d.help,
           jsonb_build_object('le', case when b.le = 'Infinity' then '+Inf' else b.le::text end),
           coalesce((select sum(c.value) from booking_guard.metric_counters c
                      where c.name = d.name || '_bucket' and (c.labels ->> 'le')::double precision <= b.le), 0)
      from defs d
     cross join lateral unnest(d.buckets || 'Infinity'::double precision) as b(le)
     where d.type = 'histogram'
    union all
    select d.name || x.suffix, d.type, d.help, '{}'::jsonb,
           coalesce((select c.value from booking_guard.metric_counters c
                      where c.name = d.name || x.suffix and c.labels = '{}'), 0)
      from defs d
     cross join (values ('_sum'), ('_count')) as x(suffix)
     where d.type = 'histogram'
    -- gauges
    union all
    select d.name, d.type, d.help, '{}'::jsonb,
           (select v.value from win v where v.name = 'validation_success')
           / (select v.value from win v where v.name = 'validation_total')
      from defs d
     where d.name = 'appointment_validation_success_rate'
       and (select v.value from win v where v.name = 'validation_total') > 0
    union all
    select d.name, d.type, d.help, jsonb_build_object('rule', k.rule, 'severity', k.severity), coalesce(o.n, 0)
      from defs d
     cross join (select r.name as rule, r.severity from booking_guard.rules r
                 union
                 select o.alert_type, o.severity from open_alerts o) k
      left join open_alerts o on o.alert_type = k.rule and o.severity = k.severity
     where d.name = 'booking_guard_open_alerts'
    union all
    select d.name, d.type, d.help, jsonb_build_object('status', st.status),
           (select count(*) from booking_guard.review_queue q
             where q.status <> 'resolved' and q.status = st.status)::double precision
      from defs d
     cross join (values ('pending'), ('in_review')) as st(status)
     where d.name = 'booking_guard_review_queue_items'
    union all
    select d.name, d.type, d.help, '{}'::jsonb, (select count(*) from booking_guard.due_verifications)::double precision
      from defs d
     where d.name = 'booking_guard_due_verifications'
    union all
    select d.name, d.type, d.help, '{}'::jsonb,
           (select count(*) from booking_guard.due_verifications v where v.due_at < now() - interval '10 seconds')::double precision
      from defs d
     where d.name = 'booking_guard_due_verifications_overdue'
    union all
    select d.name, d.type, d.help, jsonb_build_object('scheduled_job', j.job),
           case d.name when 'booking_guard_job_expected_interval_seconds' then extract(epoch from j.expected_every)
                       else extract(epoch from greatest(r.last_success_at, r.scheduled_at)) end::double precision
      from defs d
     cross join booking_guard.jobs j
      join booking_guard.job_runs r on r.job = j.job and r.scheduled_at is not null
     where d.name in ('booking_guard_job_last_success_timestamp_seconds', 'booking_guard_job_expected_interval_seconds')
    union all
    select d.name, d.type, d.help, '{}'::jsonb, extract(epoch from f.folded_at)::double precision
      from defs d, fold f
     where d.name = 'booking_guard_metrics_last_fold_timestamp_seconds' and f.folded_at is not null
    ) as m(name, type, help, labels, value)
    order by m.name, m.labels::text;
end
$$;

comment on function booking_guard.metrics() is
    'Every exported series, one row each: name (the sample name: _total for counters, _bucket/_sum/_count for histograms), type, help, labels, value. Folds new events first; reads only counters and small state tables, never the application tables.';
