-- KPIs: booking_guard's seven success targets, measured over a window.
--
-- A KPI without data in the window says so (value null, ok null, samples 0): never a made-up 100 %.

create function booking_guard.kpis(since interval default '1 day')
returns table (name text, value numeric, unit text, target text, ok boolean, samples bigint, description text)
language plpgsql
stable
set search_path = pg_catalog, pg_temp
set jit = off
as $$
#variable_conflict use_column
declare
    cutoff  timestamptz;
    v       numeric;
    n       bigint;
    m       bigint;
begin
    perform booking_guard_internal.attached();
    if since is null or since <= interval '0' or since > interval '10 years' then
        raise exception 'invalid KPI window: %', coalesce(since::text, 'null')
            using errcode = 'BG005',
                  detail = 'The window is how far back the KPIs look: a positive interval of at most 10 years.',
                  hint = 'select * from booking_guard.kpis(''1 day'');';
    end if;
    cutoff := now() - since;

    -- 1. data consistency rate: calls with an outcome whose flags agree with each other and with
    --    their appointments (the appointment rows are the truth)
    select count(*),
           count(*) filter (where (c.appointment_made is true) = c.has_one
                              and (c.session_outcome = 'appointment_booked') = (c.appointment_made is true))
      into n, m
      from (select g.appointment_made, g.session_outcome,
                   exists (select from booking_guard_internal.guarded_appointments a where a.call_id = g.id) as has_one
              from booking_guard_internal.guarded_calls g
             where g.created_at >= cutoff and g.session_outcome is not null
               and not exists (select from booking_guard.due_verifications d
                                where d.call_id = g.id and d.due_at > clock_timestamp())) c;
    name := 'data_consistency_rate'; unit := '%'; target := '>= 99.5'; samples := n;
    value := case when n > 0 then round(100.0 * m / n, 2) end;
    ok := value >= 99.5;
    description := 'calls with an outcome whose flags agree with their appointment rows';
    return next;

    -- 2. validation latency p95 (every validation logs duration_ms: validation_events)
    select count(*), percentile_cont(0.95) within group (order by (e.details ->> 'duration_ms')::numeric)
      into n, v
      from booking_guard.validation_events e
     where e.at >= cutoff and e.details ? 'duration_ms'
       and jsonb_typeof(e.details -> 'duration_ms') = 'number';
    name := 'validation_latency_p95'; unit := 'ms'; target := '<= 100'; samples := n;
    value := round(v, 2);
    ok := value <= 100;
    description := 'p95 of validation durations (validate_appointment_creation() and record_booking())';
    return next;

    -- 3. circuit breaker recovery time: from opening to the next close of the same key
    select count(*), avg(r.recovery_seconds)
      into n, v
      from booking_guard.circuit_recoveries r
     where r.closed_at >= cutoff;
    name := 'circuit_breaker_recovery_time'; unit := 's'; target := '<= 60'; samples := n;
    value := round(v, 1);
    ok := value <= 60;
    description := 'average time from a breaker opening to its closing again';
    return next;

    -- 4. alert response time: from alert to acknowledgement, of the alerts a person must see
    select count(*) filter (where a.acknowledged_at is not null),
           avg(extract(epoch from a.acknowledged_at - a.detected_at)) filter (where a.acknowledged_at is not null)
      into n, v
      from booking_guard.alerts a
     where a.detected_at >= cutoff and not a.auto_corrected;
    name := 'alert_response_time'; unit := 's'; target := '<= 300'; samples := n;
    value := round(v, 1);
    ok := value <= 300;
    description := 'average time from an alert (not auto-corrected) to its acknowledgement';
    return next;

    -- 5. auto-correction rate of the inconsistencies
    select count(*), count(*) filter (where a.auto_corrected)
      into n, m
      from booking_guard.alerts a
     where a.detected_at >= cutoff and booking_guard_internal.is_inconsistency(a.alert_type, a.details);
    name := 'auto_correction_rate'; unit := '%'; target := '>= 90'; samples := n;
    value := case when n > 0 then round(100.0 * m / n, 2) end;
    ok := value >= 90;
    description := 'inconsistencies repaired automatically';
    return next;

    -- 6. manual review queue size, now
    n := (select count(*) from booking_guard.review_queue q where q.status <> 'resolved');
    name := 'manual_review_queue_size'; unit := 'items'; target := '<= 10'; samples := n;
    value := n;
    ok := value <= 10;
    description := 'open items (pending and in review) in the review queue, now';
    return next;

    -- 7. false positive rate: reviews resolved as false_positive
    select count(*), count(*) filter (where q.resolution = 'false_positive')
      into n, m
      from booking_guard.review_queue q
     where q.status = 'resolved' and q.updated_at >= cutoff;
    name := 'false_positive_rate'; unit := '%'; target := '<= 1'; samples := n;
    value := case when n > 0 then round(100.0 * m / n, 2) end;
    ok := value <= 1;
    description := 'reviews resolved as false_positive among those resolved';
    return next;
end
$$;

comment on function booking_guard.kpis(interval) is
    'The seven success targets over the window (data consistency, validation latency, breaker recovery, alert response, auto-correction, review queue size, false positives): name, value, unit, target, ok (null when there is no data), samples, description.';
