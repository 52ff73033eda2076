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

-- Every booking counted, whatever wrote it: appointment_creation_success_total counts the
-- appointment rows, not the calls of record_booking(), and nothing is written on the booking path.
-- fold_metrics() reads, with its caller's rights, the ids above a mark (booking_mark), counts them
-- and moves the mark to the greatest. An id below that is not visible yet (its transaction still
-- writing, rolled back, or never used) is kept as a gap (metric_booking_gaps), looked for by every
-- fold, counted if it appears, and dropped once every transaction that was open when the gap was
-- noted has ended: an id is handed out before its transaction commits, so by then its row is
-- visible or never will be. The time before which gaps may be dropped (settle_before) is taken by a
-- fold after its reads and used by the next one, whose reads come later. What this cannot see: an
-- appointment deleted before a fold saw it, and an id handed out out of order (a sequence with CACHE
-- above 1, an id given by hand) that commits after its gap was dropped.
create function booking_guard_internal.fold_booking_rows(mark bigint, settle_before timestamptz, ids bigint[],
                                                         gap_ids bigint[])
returns bigint
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    v_new    bigint[] := array(select distinct x from unnest(ids) x where x > mark order by x);
    v_found  bigint[] := array(select distinct x from unnest(gap_ids) x
                                where exists (select from booking_guard.metric_booking_gaps g where x between g.lo and g.hi)
                                order by x);
    v_noted  timestamptz := clock_timestamp();
    v_open   timestamptz;
begin
    -- gaps with an id found split around it
    with hit as (
        delete from booking_guard.metric_booking_gaps g
         where exists (select from unnest(v_found) x where x between g.lo and g.hi)
        returning g.lo, g.hi, g.noted_at
    )
    insert into booking_guard.metric_booking_gaps (lo, hi, noted_at)
    select p.lo, p.hi, p.noted_at
      from (select y.noted_at, lag(y.x) over (partition by y.lo order by y.x) + 1 as lo, y.x - 1 as hi
              from (select h.lo, h.noted_at, b.x
                      from hit h
                     cross join lateral unnest(array[h.lo - 1]
                                               || array(select x from unnest(v_found) x where x between h.lo and h.hi)
                                               || array[h.hi + 1]) as b(x)) y) p
     where p.lo <= p.hi;
    -- new rows: the ids between the mark and the greatest one seen that are not there are gaps
    insert into booking_guard.metric_booking_gaps (lo, hi, noted_at)
    select y.p + 1, y.x - 1, v_noted
      from (select x, lag(x) over (order by x) as p from unnest(mark || v_new) x) y
     where y.p is not null and y.x > y.p + 1;
    if cardinality(v_new) > 0 then
        update booking_guard.metric_fold_state s set booking_mark = v_new[cardinality(v_new)];
    end if;
    -- gaps every transaction open when they were noted has left, as of before the caller's reads
    delete from booking_guard.metric_booking_gaps g
     where settle_before is not null
       and g.noted_at < least(settle_before, (select s.booking_settle_before from booking_guard.metric_fold_state s));
    -- for the next fold: when the oldest transaction open now began (a prepared one: any time;
    -- autovacuum inserts no appointment)
    v_open := case when exists (select from pg_catalog.pg_prepared_xacts x where x.database = current_database())
                   then '-infinity'
                   else coalesce((select min(a.xact_start) from pg_catalog.pg_stat_activity a
                                   where a.datname = current_database() and a.pid <> pg_backend_pid()
                                   and a.backend_type <> 'autovacuum worker'),
                                 clock_timestamp()) end;
    update booking_guard.metric_fold_state s set booking_settle_before = v_open;
    return cardinality(v_new) + cardinality(v_found);
end
$$;

comment on function booking_guard_internal.fold_booking_rows(bigint, timestamptz, bigint[], bigint[]) is
    'fold_counters(): counts the appointment ids above the mark and those found in gaps, once each; keeps the ids skipped as gaps until every transaction that could still commit them has ended; returns how many rows it counted.';

-- Where counting starts: attach() gives the greatest appointment id of the table it attaches (its
-- earlier rows are history, not bookings made under booking_guard).
create function booking_guard_internal.count_bookings_from(mark bigint)
returns void
language sql
security definer
set search_path = pg_catalog, pg_temp
as $$
    delete from booking_guard.metric_booking_gaps;
    update booking_guard.metric_fold_state s set booking_mark = coalesce(count_bookings_from.mark, 0), booking_settle_before = null;
$$;

comment on function booking_guard_internal.count_bookings_from(bigint) is
    'attach(): the appointments with a greater id than mark are counted as bookings from now on.';

create function booking_guard_internal.fold_counters(max_events integer, booking_mark bigint, settle_before timestamptz,
                                                      booking_ids bigint[], gap_ids bigint[])
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
    v_mark        bigint;
    n             bigint;
    n_rows        bigint := 0;
begin
    if max_events is null or max_events < 1 or pg_is_in_recovery() or current_setting('transaction_read_only')::boolean
       or current_setting('transaction_isolation') <> 'read committed' then
        return 0;
    end if;
    -- one fold at a time: the row lock of the fold state (a concurrent scrape just reads what is folded)
    select s.horizon, s.booking_mark into v_from, v_mark from booking_guard.metric_fold_state s for update skip locked;
    if not found then
        return 0;
    end if;

    -- the appointment rows the caller saw above the mark it read (another fold moved on: next time)
    if v_mark is null and fold_counters.booking_mark is null and cardinality(booking_ids) = 1 then
        update booking_guard.metric_fold_state s set booking_mark = booking_ids[1];   -- counting starts here
    elsif v_mark = fold_counters.booking_mark then
        n_rows := booking_guard_internal.fold_booking_rows(v_mark, settle_before, booking_ids, gap_ids);
    end if;
    if n_rows > 0 then
        insert into booking_guard.metric_counters as m (name, labels, value)
        values ('appointment_creation_success_total', '{}', n_rows)
        on conflict (name, labels) do update set value = m.value + excluded.value, updated_at = now();
        insert into booking_guard.metric_windows as w (name, bucket, value)
        values ('creation_success', date_bin('5 minutes', now(), timestamptz '2000-01-01 00:00+00'), n_rows)
        on conflict (name, bucket) do update set value = w.value + excluded.value;
    end if;
    v_to := booking_guard_internal.fold_horizon();
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
        return n_rows;
    end if;

    v_creation := (select d.buckets from booking_guard.metric_definitions d
                    where d.name = 'appointment_creation_duration_seconds');
    v_validation := (select d.buckets from booking_guard.metric_definitions d
                      where d.name = 'appointment_validation_duration_seconds');

    -- Per event only field extraction and a hash aggregate; labels and contributions are made
    -- from the few groups. Every expression is inline (a function with SET is never inlined) and
    -- defensive: a malformed detail must not stop the fold for good, so it becomes null or 'other'.
    with raw as materialized (
        select e.kind, e.rule, e.at, e.xid, e.entity_id,
               case when jsonb_typeof(e.details -> 'success') = 'boolean' then (e.details -> 'success')::boolean end as ok,
               jsonb_typeof(e.details -> 'created') = 'boolean' and (e.details -> 'created')::boolean as created,
               e.details ->> 'reason' as reason,
               case when jsonb_typeof(e.details -> 'auto_corrected') = 'boolean'
                    then (e.details -> 'auto_corrected')::boolean end as corrected,
               case when jsonb_typeof(e.details -> 'duration_ms') = 'number'
                    then (e.details -> 'duration_ms')::numeric end as ms
          from (select e.kind, e.rule, e.at, e.xid, e.entity_id, e.details
                  from booking_guard.events e
                 where e.xid >= v_from and e.xid < v_to
                   and e.kind in ('record_booking', 'alert', 'review', 'rollback')
                union all
                -- validate_appointment_creation()'s and the ones record_booking() logs in its own event
                select 'validation', null, v.at, v.xid, v.entity_id, v.details
                  from booking_guard.validation_events v
                 where v.xid >= v_from and v.xid < v_to) e
    ),
    -- A rollback is a booking that did not stand: the commit-time check's (rule missing_appointment,
    -- a claim without an appointment row: appointment_not_found) and one the application reported
    -- with rollback_on_failure(). record_booking()'s own rollbacks are counted by its event.
    failed_claims as (
        select x.kind, x.rule, x.at, x.xid, x.entity_id, false as ok, false as created,
               case when x.rule = 'missing_appointment' then 'appointment_not_found' else x.reason end as reason,
               null::boolean as corrected, null::numeric as ms
          from raw x
         where x.kind = 'rollback'
           and not exists (select from raw b where b.kind = 'record_booking' and b.xid = x.xid and b.entity_id = x.entity_id)
    ),
    bookings as (
        select x.kind, x.rule, x.at, x.xid, x.entity_id, x.ok, x.created, x.reason, x.corrected, x.ms
          from raw x where x.kind <> 'rollback'
        union all
        select 'record_booking', f.rule, f.at, f.xid, f.entity_id, f.ok, f.created, f.reason, f.corrected, f.ms
          from failed_claims f
    ),
    ev as materialized (
        select x.kind, x.rule, x.ok, x.created, x.reason, x.corrected, s.seconds,
               date_bin('5 minutes', x.at, timestamptz '2000-01-01 00:00+00') as bucket,
               -- the histogram bucket: the smallest bound >= seconds (width_bucket counts the bounds <= it)
               case when s.seconds is not null then
                   coalesce(case when w.n > 0 and w.bounds[w.n] = s.seconds then w.bounds[w.n] else w.bounds[w.n + 1] end,
                            'Infinity') end as le
          from bookings x
         cross join lateral (select case when x.ms between -1e300 and 1e300 then x.ms::double precision / 1000.0 end
                                    as seconds) s
         cross join lateral (select y.bounds, width_bucket(s.seconds, y.bounds) as n
                               from (select case x.kind when 'record_booking' then v_creation else v_validation end
                                            as bounds) y) w
    ),
    grouped as (
        select g.kind, g.ok, g.created, g.corrected, g.bucket, g.le::text as le,
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
          from (select ev.kind, ev.ok, ev.created, ev.corrected, ev.bucket, ev.le, ev.reason, ev.rule,
                       count(*)::double precision as n, count(ev.seconds)::double precision as timed,
                       coalesce(sum(ev.seconds), 0) as seconds
                  from ev
                 group by ev.kind, ev.ok, ev.created, ev.corrected, ev.bucket, ev.le, ev.reason, ev.rule) g
    ),
    -- (counter series or null, labels, amount, 5-minute window name or null, bucket)
    contrib as (
        select c.counter, c.labels, c.amount, c.win, g.bucket
          from grouped g
         cross join lateral (values
            -- a successful booking is counted from its appointment row (above), whatever wrote it
            (null, '{}'::jsonb, g.n, case when g.kind = 'record_booking' and g.ok and g.created then 'creation_recorded' end),
            (case when g.kind = 'record_booking' and g.ok is false then 'appointment_creation_failure_total' end,
             jsonb_build_object('reason', g.reason), g.n, case when g.kind = 'record_booking' and g.ok is false
                                                               then 'creation_failed' end),
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
    return n + n_rows;
end
$$;

comment on function booking_guard_internal.fold_counters(integer, bigint, timestamptz, bigint[], bigint[]) is
    'fold_metrics() as booking_guard_owner: counts the appointment rows the caller saw (when the mark it read is still the mark), then adds the events of finished transactions not folded yet (xid in [horizon, fold_horizon()): before the oldest transaction that may still write in this database), at most max_events per run, each exactly once; returns how many rows and events were folded. A concurrent run returns 0 at once.';

-- Whether the caller may read the ids of the attached appointments (not attached: no).
create function booking_guard_internal.booking_ids_readable()
returns boolean
language plpgsql
stable
set search_path = pg_catalog, pg_temp
as $$
declare
    t  regclass := (select a.appointments_table from booking_guard.attached_tables a);
begin
    if t is null or to_regclass('booking_guard_internal.guarded_appointments') is null then
        return false;
    end if;
    return has_table_privilege('booking_guard_internal.guarded_appointments', 'select')
           and has_column_privilege(t, 'id', 'select');
end
$$;

comment on function booking_guard_internal.booking_ids_readable() is
    'fold_metrics(): true when booking_guard is attached and the caller may read the appointments'' ids.';

-- Runs with the caller's rights: booking_guard_owner, which writes the counters, never reads the
-- application's tables, so the caller (booking_guard_monitor and the roles that include it; attach()
-- granted it the appointment ids) reads the new appointment ids and fold_counters() counts them.
-- Where a fold stops: the oldest transaction that may still write events of this database. The
-- snapshot's xmin is the oldest open transaction of the whole cluster, so one long transaction in
-- another database (a dump, a migration, an idle session) would hold every fold back, and the
-- counters would stand still. A transaction writes in one database only: an open one that
-- pg_stat_activity or pg_prepared_xacts shows in another database cannot write these events and
-- is passed over. Whatever is not known to be elsewhere (finished since the snapshot, a backend
-- whose row this role may not read, one without a database) holds the horizon as the xmin would.
create function booking_guard_internal.fold_horizon()
returns xid8
language sql
volatile
set search_path = pg_catalog, pg_temp
as $$
    select coalesce(
               (select min(x.full_xid)
                  from pg_snapshot_xip(s.snap) as x(full_xid)
                 where not exists (select from pg_stat_activity a
                                    where a.backend_xid = (x.full_xid::text::numeric % 4294967296)::text::xid
                                      and a.datname <> current_database())
                   and not exists (select from pg_prepared_xacts p
                                    where p.transaction = (x.full_xid::text::numeric % 4294967296)::text::xid
                                      and p.database <> current_database())),
               pg_snapshot_xmax(s.snap))
      from (select pg_current_snapshot() as snap) s;
$$;
comment on function booking_guard_internal.fold_horizon() is
    'Internal (fold_metrics): the oldest xid that may still write events of this database: the snapshot''s oldest open transaction, passing over those open in another database; the snapshot''s xmax when none is open.';

create function booking_guard.fold_metrics(max_events integer default 100000)
returns bigint
language plpgsql
set search_path = pg_catalog, pg_temp
set jit = off
as $$
declare
    st     record;
    v_ids  bigint[];
    v_gap  bigint[];
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
    select s.booking_mark, s.booking_settle_before into st from booking_guard.metric_fold_state s;
    if booking_guard_internal.booking_ids_readable() then
        if st.booking_mark is null then
            v_ids := array[(select coalesce(max(a.id), 0)::bigint from booking_guard_internal.guarded_appointments a)];
        else
            v_ids := array(select a.id::bigint from booking_guard_internal.guarded_appointments a
                            where a.id > st.booking_mark order by a.id limit max_events);
            -- per gap, a range of the id index (few gaps, each usually one id wide)
            v_gap := array(select x.id
                             from booking_guard.metric_booking_gaps g
                            cross join lateral (select a.id::bigint as id from booking_guard_internal.guarded_appointments a
                                                 where a.id between g.lo and g.hi order by a.id limit max_events) x
                            order by x.id limit max_events);
        end if;
    end if;
    return booking_guard_internal.fold_counters(max_events, st.booking_mark, st.booking_settle_before, v_ids, v_gap);
end
$$;

comment on function booking_guard.fold_metrics(integer) is
    'Folds into the metric counters the appointment rows written since the last fold (every booking, whatever wrote it; read with the caller''s rights) and the events of finished transactions, at most max_events of each per run, each exactly once; returns how many were folded. A concurrent run returns 0 at once. metrics() runs it.';

-- The inconsistencies that need a person now. Auto-corrected alerts are done (they stay open only
-- until the monitor confirms the repair); resolved ones are done; a validation failure in the last
-- hour (recent_failures) is about the failure, whose booking has its own alert.
create view booking_guard.open_inconsistencies as
select a.id, a.alert_type, a.severity, a.entity_type, a.entity_id, a.description, a.detected_at, a.last_seen_at,
       a.occurrences, a.acknowledged_at, a.acknowledged_by, a.review_id
  from booking_guard.alerts a
 where a.resolved_at is null and not a.auto_corrected
   and booking_guard_internal.is_inconsistency(a.alert_type, a.details);

comment on view booking_guard.open_inconsistencies is
    'Open inconsistencies that need a person: unresolved alerts of the detection rules (but recent_failures) and of failed booking validations that were not auto-corrected, with the review item that answers each.';

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
set jit = off
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
    ),
    open_reviews as (   -- a reason nobody declared is labelled other: no input grows the series
        select q.priority,
               case when q.reason in (select p.reason from booking_guard.review_priorities p) then q.reason
                    else 'other' end as reason
          from booking_guard.review_queue q
         where q.status <> 'resolved'
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
    -- what the on-call acts on: open inconsistencies, the latest alert of each type, the review
    -- queue by priority, when each breaker last opened
    union all
    select d.name, d.type, d.help, jsonb_build_object('type', k.alert_type, 'severity', k.severity), coalesce(o.n, 0)
      from defs d
     cross join (select r.name as alert_type, r.severity from booking_guard.rules r
                  where booking_guard_internal.is_inconsistency(r.name, '{}')
                 union
                 select 'appointment_validation_failed', 'critical'
                 union
                 select i.alert_type, i.severity from booking_guard.open_inconsistencies i) k
      left join (select i.alert_type, i.severity, count(*)::double precision as n
                   from booking_guard.open_inconsistencies i group by 1, 2) o
             on o.alert_type = k.alert_type and o.severity = k.severity
     where d.name = 'booking_guard_open_inconsistencies'
    union all
    select d.name, d.type, d.help, jsonb_build_object('type', x.alert_type), extract(epoch from l.at)::double precision
      from defs d
     cross join booking_guard_internal.alert_types() x
     cross join lateral (select max(a.detected_at) as at from booking_guard.alerts a where a.alert_type = x.alert_type) l
     where d.name = 'booking_guard_alert_last_detected_timestamp_seconds' and l.at is not null
    union all
    select d.name, d.type, d.help, jsonb_build_object('priority', k.priority::text, 'reason', k.reason), coalesce(o.n, 0)
      from defs d
     cross join (select p.priority, p.reason from booking_guard.review_priorities p
                 union
                 select q.priority, q.reason from open_reviews q) k
      left join (select q.priority, q.reason, count(*)::double precision as n from open_reviews q group by 1, 2) o
             on o.priority = k.priority and o.reason = k.reason
     where d.name = 'booking_guard_review_queue_open_items'
    union all
    select d.name, d.type, d.help, jsonb_build_object('key', b.key), extract(epoch from b.opened_at)::double precision
      from defs d
     cross join booking_guard.circuit_breakers b
     where d.name = 'circuit_breaker_last_opened_timestamp_seconds' and b.opened_at is not null
    ) as m(name, type, help, labels, value)
    order by m.name, m.labels::text;
end
$$;

comment on function booking_guard.metrics() is
    'Every exported series, one row each: name (the sample name: _total for counters, _bucket/_sum/_count for histograms), type, help, labels, value. Folds new events first; reads only counters and small state tables, never the application tables.';
