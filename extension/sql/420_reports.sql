create function booking_guard_internal.is_inconsistency(alert_type text, details jsonb)
returns boolean
language sql
stable
set search_path = pg_catalog, pg_temp
as $$
    -- a rule that reads the validation events (recent_failures) re-reports failed validations,
    -- which count already as their appointment_validation_failed alerts
    select (alert_type = 'appointment_validation_failed'
            or exists (select from booking_guard.rules r
                        where r.name = alert_type and r.source <> 'validation_events'))
           and not coalesce(details ? 'superseded_by', false)
$$;

comment on function booking_guard_internal.is_inconsistency(text, jsonb) is
    'Whether an alert counts as an inconsistency in reports and KPIs: a detection rule''s or a failed booking validation''s, not superseded by a rollback.';

create function booking_guard_internal.check_day(day date)
returns void
language plpgsql
immutable
set search_path = pg_catalog, pg_temp
as $$
begin
    if day is null or day not between date '2000-01-01' and date '2999-12-31' then
        raise exception 'invalid report day: %', coalesce(day::text, 'null')
            using errcode = 'BG005',
                  detail = 'A report covers one calendar day.',
                  hint = 'select booking_guard.daily_report(current_date - 1);';
    end if;
end
$$;

comment on function booking_guard_internal.check_day(date) is
    'BG005 unless the day is a real calendar day (not null).';

create function booking_guard_internal.day_alerts(t0 timestamptz, t1 timestamptz)
returns table (id bigint, alert_type text, details jsonb, auto_corrected boolean, resolved_at timestamptz)
language sql
stable
set search_path = pg_catalog, pg_temp
as $$
    select a.id, a.alert_type, a.details, a.auto_corrected, a.resolved_at
      from booking_guard.alerts a
     where a.detected_at >= t0 and a.detected_at < t1
       and booking_guard_internal.is_inconsistency(a.alert_type, a.details)
$$;

comment on function booking_guard_internal.day_alerts(timestamptz, timestamptz) is
    'The inconsistencies (alerts, see is_inconsistency()) detected in [t0, t1).';

create function booking_guard.daily_report_json(day date default current_date)
returns jsonb
language plpgsql
stable
set search_path = pg_catalog, pg_temp
set jit = off
as $$
#variable_conflict use_column
declare
    t0            timestamptz;
    t1            timestamptz;
    n_calls       bigint;
    n_appts       bigint;
    n_inc         bigint;
    n_prev        bigint;
    n_recovered   bigint;
    n_monitor     bigint;
    latency       numeric;
    breakdown     jsonb;
    top_issues    jsonb;
    reviews       jsonb;
    criticals     jsonb;
    n_criticals   bigint;
    recon         jsonb;
    prev_avg      numeric;
begin
    perform booking_guard_internal.attached();
    perform booking_guard_internal.check_day(daily_report_json.day);
    t0 := daily_report_json.day::timestamptz;
    t1 := (daily_report_json.day + 1)::timestamptz;

    n_calls := (select count(*) from booking_guard_internal.guarded_calls g where g.created_at >= t0 and g.created_at < t1);
    n_appts := (select count(*) from booking_guard_internal.guarded_appointments a where a.created_at >= t0 and a.created_at < t1);

    n_inc := (select count(*) from booking_guard_internal.day_alerts(t0, t1));
    n_recovered := (select count(*) from booking_guard_internal.day_alerts(t0, t1) x where x.auto_corrected or x.resolved_at is not null);

    select coalesce(jsonb_agg(jsonb_build_object('rule', b.alert_type, 'label', b.label, 'count', b.n,
                                                 'auto_corrected', b.corrected, 'open', b.open)
                              order by b.n desc, b.ord, b.alert_type), '[]')
      into breakdown
      from (select x.alert_type,
                   coalesce(d.label, 'Failed Booking Validations (' || x.alert_type || ')') as label,
                   (select count(*) from booking_guard.rules e where e.name < x.alert_type) as ord,
                   count(*) as n, count(*) filter (where x.auto_corrected) as corrected,
                   count(*) filter (where x.resolved_at is null) as open
              from booking_guard_internal.day_alerts(t0, t1) x
              left join booking_guard.rules d on d.name = x.alert_type
             group by x.alert_type, d.label) b;

    select coalesce(jsonb_agg(t.issue order by t.n desc, t.alert_type, t.reason), '[]')
      into top_issues
      from (select x.alert_type, x.details ->> 'reason' as reason, count(*) as n,
                   jsonb_build_object(
                       'rule', x.alert_type,
                       'label', coalesce(d.label, 'Failed Booking Validations (' || x.alert_type || ')'),
                       'reason', x.details ->> 'reason',
                       'cases', count(*),
                       'auto_corrected', count(*) filter (where x.auto_corrected),
                       'open', count(*) filter (where x.resolved_at is null),
                       'action', coalesce(d.action, 'Check the booking path (calendar booked, local record failed); '
                                                    'rebook from the review queue')) as issue
              from booking_guard_internal.day_alerts(t0, t1) x
              left join booking_guard.rules d on d.name = x.alert_type
             group by x.alert_type, x.details ->> 'reason', d.label, d.action
             order by count(*) desc, x.alert_type, x.details ->> 'reason'
             limit 3) t;

    n_prev := (select count(*) from booking_guard.alerts a
                where a.detected_at >= t0 - interval '7 days' and a.detected_at < t0
                  and booking_guard_internal.is_inconsistency(a.alert_type, a.details));
    prev_avg := round(n_prev / 7.0, 1);

    -- detection latency: the monitor's detection event of an alert says how late it came;
    -- an alert without one was raised by the triggers as the row was written (latency 0)
    select count(*), coalesce(sum((e.details ->> 'latency_seconds')::numeric), 0)
      into n_monitor, latency
      from booking_guard.events e
     where e.kind = 'detection' and e.at >= t0 and e.at < t1 + interval '1 day'
       and e.details ? 'latency_seconds'
       and (e.details ->> 'alert_id')::bigint in (select x.id from booking_guard_internal.day_alerts(t0, t1) x);

    select coalesce(jsonb_agg(jsonb_build_object('reason', q.reason, 'pending', q.n, 'oldest', q.oldest)
                              order by q.priority, q.n desc, q.reason), '[]')
      into reviews
      from (select r.reason, min(r.priority) as priority, count(*) as n, min(r.created_at) as oldest
              from booking_guard.review_queue r
             where r.status <> 'resolved'
             group by r.reason) q;

    n_criticals := (select count(*) from booking_guard.alerts a where a.resolved_at is null and a.severity = 'critical');
    select coalesce(jsonb_agg(jsonb_build_object('id', c.id, 'rule', c.alert_type, 'entity_type', c.entity_type,
                                                 'entity_id', c.entity_id, 'description', c.description,
                                                 'detected_at', c.detected_at, 'acknowledged', c.acknowledged_at is not null)
                              order by c.detected_at, c.id), '[]')
      into criticals
      from (select a.* from booking_guard.alerts a
             where a.resolved_at is null and a.severity = 'critical'
             order by a.detected_at, a.id
             limit 10) c;

    select jsonb_build_object('runs', count(*), 'fixed', coalesce(sum((r.counts ->> 'fixed')::bigint), 0),
                              'failed', count(*) filter (where r.error is not null))
      into recon
      from booking_guard.reconciliation_runs r
     where r.started_at >= t0 and r.started_at < t1;

    return jsonb_build_object(
        'day', daily_report_json.day,
        'time_zone', current_setting('TimeZone'),
        'generated_at', now(),
        'summary', jsonb_build_object(
            'total_calls', n_calls,
            'total_appointments', n_appts,
            'inconsistencies', n_inc,
            'inconsistency_pct', case when n_calls > 0 then round(100.0 * n_inc / n_calls, 2) end),
        'breakdown', breakdown,
        'top_issues', top_issues,
        'trend', jsonb_build_object(
            'previous_7_days', n_prev,
            'previous_daily_average', prev_avg,
            'change_pct', case when n_prev > 0 then round(100.0 * (n_inc - n_prev / 7.0) / (n_prev / 7.0), 1) end,
            'recovered', n_recovered,
            'recovery_success_rate_pct', case when n_inc > 0 then round(100.0 * n_recovered / n_inc, 1) end,
            'found_by_monitor', n_monitor,
            'found_at_write_time', n_inc - n_monitor,
            'average_detection_latency_seconds', case when n_inc > 0 then round(latency / n_inc, 1) end),
        'reconciliation', recon,
        'action_items', jsonb_build_object('review_queue', reviews, 'open_critical_alerts', n_criticals,
                                           'critical_alerts', criticals));
end
$$;

comment on function booking_guard.daily_report_json(date) is
    'The facts of the daily report of one day (session time zone): summary, breakdown by rule, top issues, trend against the previous 7 days, recovery rate, detection latency, reconciliation, action items.';

create function booking_guard.daily_report(day date default current_date)
returns text
language plpgsql
stable
set search_path = pg_catalog, pg_temp
set jit = off
as $$
declare
    f      jsonb := booking_guard.daily_report_json(day);
    s      jsonb := f -> 'summary';
    t      jsonb := f -> 'trend';
    title  text := 'DATA CONSISTENCY REPORT - ' || (f ->> 'day');
    lines  text[];
    item   jsonb;
    i      integer := 0;
    n      numeric;
begin
    lines := array[title, repeat('=', length(title)), '',
                   'SUMMARY', '-------',
                   'Total Calls: ' || to_char((s ->> 'total_calls')::bigint, 'FM999,999,999,990'),
                   'Total Appointments: ' || to_char((s ->> 'total_appointments')::bigint, 'FM999,999,999,990'),
                   'Inconsistencies Found: ' || to_char((s ->> 'inconsistencies')::bigint, 'FM999,999,999,990')
                       || coalesce(' (' || to_char((s ->> 'inconsistency_pct')::numeric, 'FM999,990.00') || '%)', ''),
                   'Repaired by reconciliation: ' || (f #>> '{reconciliation,fixed}') || ' ('
                       || (f #>> '{reconciliation,runs}') || ' runs' ||
                       case when (f #>> '{reconciliation,failed}')::bigint > 0
                            then ', ' || (f #>> '{reconciliation,failed}') || ' failed' else '' end || ')',
                   '',
                   'INCONSISTENCY BREAKDOWN', '-----------------------'];
    for item in select * from jsonb_array_elements(f -> 'breakdown') loop
        i := i + 1;
        lines := lines || format('%s. %s: %s', i, item ->> 'label', item ->> 'count');
    end loop;
    if i = 0 then
        lines := lines || 'None.'::text;
    end if;

    lines := lines || array['', 'TOP ISSUES', '----------'];
    i := 0;
    for item in select * from jsonb_array_elements(f -> 'top_issues') loop
        i := i + 1;
        if i > 1 then
            lines := lines || ''::text;
        end if;
        lines := lines || format('%s. %s (%s %s)', i, item ->> 'label', item ->> 'cases',
                                 case when (item ->> 'cases')::bigint = 1 then 'case' else 'cases' end);
        if item ->> 'reason' is not null then
            lines := lines || format('   - Reason: %s', item ->> 'reason');
        end if;
        lines := lines || format('   - Status: %s auto-corrected, %s still open', item ->> 'auto_corrected', item ->> 'open')
                       || format('   - Action: %s', item ->> 'action');
    end loop;
    if i = 0 then
        lines := lines || 'None.'::text;
    end if;

    lines := lines || array['', 'TREND ANALYSIS', '--------------'];
    n := (t ->> 'change_pct')::numeric;
    lines := lines || case
        when n is null then format('- No inconsistencies in the previous 7 days: no trend (today %s)',
                                   (s ->> 'inconsistencies'))
        when n < 0 then format('- Inconsistencies decreased %s%% vs. last week (daily average %s)',
                               to_char(-n, 'FM999,990.0'), to_char((t ->> 'previous_daily_average')::numeric, 'FM999,990.0'))
        when n > 0 then format('- Inconsistencies increased %s%% vs. last week (daily average %s)',
                               to_char(n, 'FM999,990.0'), to_char((t ->> 'previous_daily_average')::numeric, 'FM999,990.0'))
        else format('- Inconsistencies unchanged vs. last week (daily average %s)',
                    to_char((t ->> 'previous_daily_average')::numeric, 'FM999,990.0'))
    end;
    lines := lines || case
        when t ->> 'recovery_success_rate_pct' is null then '- Recovery success rate: n/a (no inconsistencies)'
        else format('- Recovery success rate: %s%% (%s of %s)', to_char((t ->> 'recovery_success_rate_pct')::numeric, 'FM990.0'),
                    t ->> 'recovered', s ->> 'inconsistencies')
    end;
    lines := lines || case
        when t ->> 'average_detection_latency_seconds' is null then '- Average detection latency: n/a (nothing detected)'
        else format('- Average detection latency: %s seconds (%s found by the monitor, %s at write time)',
                    to_char((t ->> 'average_detection_latency_seconds')::numeric, 'FM999,990.0'),
                    t ->> 'found_by_monitor', t ->> 'found_at_write_time')
    end;

    lines := lines || array['', 'ACTION ITEMS', '------------'];
    i := 0;
    for item in select * from jsonb_array_elements(f #> '{action_items,review_queue}') loop
        i := i + 1;
        lines := lines || format('[ ] Review %s cases (%s pending since %s)', item ->> 'reason', item ->> 'pending',
                                 to_char((item ->> 'oldest')::timestamptz, 'YYYY-MM-DD HH24:MI'));
    end loop;
    for item in select * from jsonb_array_elements(f #> '{action_items,critical_alerts}') loop
        i := i + 1;
        lines := lines || format('[ ] %s critical alert #%s (%s %s %s): %s',
                                 case when (item ->> 'acknowledged')::boolean then 'Resolve' else 'Acknowledge' end,
                                 item ->> 'id', item ->> 'rule', item ->> 'entity_type', item ->> 'entity_id',
                                 item ->> 'description');
    end loop;
    if (f #>> '{action_items,open_critical_alerts}')::bigint > jsonb_array_length(f #> '{action_items,critical_alerts}') then
        lines := lines || format('[ ] ... and %s more open critical alerts',
                                 (f #>> '{action_items,open_critical_alerts}')::bigint
                                 - jsonb_array_length(f #> '{action_items,critical_alerts}'));
    end if;
    if i = 0 then
        lines := lines || '[x] Nothing pending: the review queue is empty and no critical alert is open'::text;
    end if;
    return array_to_string(lines, E'\n') || E'\n';
end
$$;

comment on function booking_guard.daily_report(date) is
    'The daily report of one day as text, in sections SUMMARY, INCONSISTENCY BREAKDOWN, TOP ISSUES, TREND ANALYSIS and ACTION ITEMS; the same facts as daily_report_json(day).';

-- The stored copy of a day's report, written with booking_guard_owner's rights.
create function booking_guard_internal.keep_report(day date, report text, facts jsonb)
returns void
language sql
security definer
set search_path = pg_catalog, pg_temp
as $$
    insert into booking_guard.reports as r (day, generated_at, report, facts)
    values (keep_report.day, now(), keep_report.report, keep_report.facts)
    on conflict (day) do update set generated_at = excluded.generated_at, report = excluded.report, facts = excluded.facts
$$;

comment on function booking_guard_internal.keep_report(date, text, jsonb) is
    'Keeps a day''s report in booking_guard.reports, replacing an earlier copy of that day.';

-- Job daily_report, its one step, as booking_guard_worker (it reads the application's tables).
create function booking_guard_internal.report_step(state jsonb)
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
set jit = off
as $$
declare
    day     date := coalesce((state -> 'args' ->> 'day')::date, current_date - 1);
    v_text  text := booking_guard.daily_report(day);
begin
    perform booking_guard_internal.keep_report(day, v_text, booking_guard.daily_report_json(day));
    return state || jsonb_build_object('day', day, 'report', v_text, 'done', true);
end
$$;

comment on function booking_guard_internal.report_step(jsonb) is
    'Job daily_report: generates the report of a day (default yesterday) and keeps it in reports.';

create function booking_guard.store_daily_report(day date default current_date - 1)
returns text
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    result  jsonb;
begin
    perform booking_guard_internal.check_day(store_daily_report.day);
    result := booking_guard_internal.run_job_steps('daily_report', jsonb_build_object('day', store_daily_report.day));
    perform booking_guard_internal.job_raise(result);
    return result ->> 'report';
end
$$;

comment on function booking_guard.store_daily_report(date) is
    'Generates the daily report of a day (default yesterday) and keeps it in reports, replacing an earlier copy of that day; returns the text. Runs as booking_guard_worker.';
