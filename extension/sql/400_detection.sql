-- Detection: what is wrong right now, rule by rule.
--
-- Every rule is a row of booking_guard.rules: its entity, severity, modes, label, alert text and
-- repair are read from there. The built-in rules' conditions are the SQL below, each in one spot of
-- the function of what it reads (call_findings(), appointment_findings(), booking_findings(),
-- failure_findings()); a rule an administrator declared carries its own predicate, run as its role
-- (declared_findings()).
--
-- detect(since) returns one finding per (rule, entity) whose condition holds now, for every rule
-- that is not off, among the candidates of the window (candidate_calls() and friends below): the
-- calls and appointments created within it, the calls those appointments point at, and the calls
-- whose due verification has passed. Each candidate is checked by primary key and
-- appointments(call_id) / appointments(calcom_v2_booking_id). Its cost grows with the rows of the
-- window, never with the size of the tables. It runs with the caller's rights (booking_guard_monitor
-- reads the guarded columns: attach() grants them).
--
-- JIT is off in detect(), run_monitor(), reconcile(), the reports, kpis(), purge(), metrics() and
-- their job steps (set jit = off). Their queries take the window's start as a parameter, so the
-- planner estimates a third of the table where the window holds a few thousand rows; above a few
-- million calls that estimate crosses PostgreSQL's JIT thresholds, and compiling the plans cost ten
-- to a hundred times the query itself (bench/partitions.py at ten million calls).
--
-- run_monitor() turns findings into alerts (one open alert per rule and entity, repeats bump
-- occurrences), repairs what a rule in `correct` (or `enforce`) mode can repair (auto_corrected),
-- and resolves the open alerts of detection rules whose condition no longer holds.

create type booking_guard.finding as (
    rule         text,
    severity     text,
    entity_type  text,
    entity_id    text,
    details      jsonb
);

comment on type booking_guard.finding is
    'One inconsistency: the rule it breaks, its severity, the entity (call, appointment, booking) and the facts (details.since: since when).';

-- A call may claim a booking without its appointment while its verification grace runs.
create function booking_guard_internal.within_grace(call_id bigint, since timestamptz)
returns boolean
language plpgsql
stable
set search_path = pg_catalog, pg_temp
as $$
begin
    return since > now() - (select s.interval_value from booking_guard.settings s where s.name = 'verification_grace')
        or exists (select from booking_guard.due_verifications d
                    where d.call_id = within_grace.call_id and d.due_at > clock_timestamp());
end
$$;

comment on function booking_guard_internal.within_grace(bigint, timestamptz) is
    'True while a call (last changed at since) is still within its verification grace, or waits on the due list.';

-- The call rules, checked for the given calls (by primary key), or for every call of a key range
-- (reconcile's batches). Every *_findings function takes its ids as a semi-join on unnest(): "= any
-- (array)" on a parameter compares each row with the whole array, which is quadratic when the
-- monitor checks a large window. A key range is read as one: one range scan of the calls and one of
-- their appointments, where probing each id would cost an index descent per call and per
-- appointment list. Each branch of the row source is gated by its own parameter (a one-time filter):
-- only one runs.
create function booking_guard_internal.call_findings(call_ids bigint[], only_rule text default null,
                                                    after_id bigint default null, last_id bigint default null)
returns setof booking_guard.finding
language plpgsql
stable
set search_path = pg_catalog, pg_temp
as $$
begin
    if only_rule is null
       or exists (select from booking_guard.rules r where r.name = only_rule and r.predicate is null) then
        return query
        with c as materialized (
            select g.id, g.retell_call_id, g.company_id::text as company_id, g.direction, g.session_outcome,
                   g.appointment_made, g.appointment_link_status, g.booking_id, g.customer_id, g.customer_link_status,
                   g.created_at::timestamptz as created_at,
                   greatest(g.created_at, g.updated_at)::timestamptz as since,
                   ap.n as appointments, ap.booking_ids
              from booking_guard_internal.guarded_calls g
             cross join lateral (
                   select count(*) as n,
                          coalesce(array_agg(a.calcom_v2_booking_id::text order by a.id)
                                       filter (where a.calcom_v2_booking_id is not null), '{}') as booking_ids
                     from booking_guard_internal.guarded_appointments a
                    where a.call_id = g.id) ap
             where call_ids is not null
               and g.id in (select unnest(call_ids))
            union all
            select g.id, g.retell_call_id, g.company_id::text, g.direction, g.session_outcome,
                   g.appointment_made, g.appointment_link_status, g.booking_id, g.customer_id, g.customer_link_status,
                   g.created_at::timestamptz, greatest(g.created_at, g.updated_at)::timestamptz,
                   coalesce(ap.n, 0), coalesce(ap.booking_ids, '{}')
              from booking_guard_internal.guarded_calls g
              left join (select a.call_id, count(*) as n,
                                coalesce(array_agg(a.calcom_v2_booking_id::text order by a.id)
                                             filter (where a.calcom_v2_booking_id is not null), '{}') as booking_ids
                           from booking_guard_internal.guarded_appointments a
                          where a.call_id > after_id and a.call_id <= last_id
                          group by a.call_id) ap on ap.call_id = g.id
             where call_ids is null
               and g.id > after_id and g.id <= last_id
        ),
        -- each call with the rules that hold on it: a set-returning function in the select list,
        -- evaluated once per call (a lateral VALUES list would build its expressions again per call)
        k as (
            select c.*, unnest(array_remove(array[
                case when c.session_outcome = 'appointment_booked' and c.appointment_made is not true
                     then 'phantom_booking' end,
                -- "is not distinct from": a null link status would make the claim null, not false, and
                -- within_grace() (two queries) would then run for every call without an appointment
                case when (c.appointment_made is true or c.appointment_link_status is not distinct from 'linked')
                          and c.appointments = 0 and not booking_guard_internal.within_grace(c.id, c.since)
                     then 'missing_appointment' end,
                case when c.direction is null
                     then 'missing_direction' end,
                case when c.appointment_made is true and c.session_outcome is not null
                          and c.session_outcome <> 'appointment_booked'
                     then 'outcome_flag_mismatch' end,
                case when c.appointments > 0 and c.appointment_made is not true
                     then 'unlinked_appointment' end,
                case when c.booking_id is not null and cardinality(c.booking_ids) > 0
                          and not c.booking_id = any (c.booking_ids)
                     then 'booking_id_mismatch' end,
                case when c.customer_id is not null and c.customer_link_status is distinct from 'linked'
                     then 'customer_link' end
            ], null)) as rule
              from c
        )
        select r.name, r.severity, 'call'::text, k.id::text,
               jsonb_strip_nulls(jsonb_build_object(
                   'retell_call_id', k.retell_call_id, 'company_id', k.company_id,
                   'created_at', k.created_at, 'since', k.since,
                   'session_outcome', k.session_outcome, 'appointment_made', k.appointment_made,
                   'appointment_link_status', k.appointment_link_status, 'appointments', k.appointments,
                   'booking_id', case when k.rule = 'booking_id_mismatch' then k.booking_id end,
                   'appointment_booking_ids', case when k.rule = 'booking_id_mismatch' then to_jsonb(k.booking_ids) end,
                   'customer_id', case when k.rule = 'customer_link' then k.customer_id end,
                   'customer_link_status', case when k.rule = 'customer_link'
                                                then coalesce(k.customer_link_status, 'null') end))
          from k
          join booking_guard.rules r on r.name = k.rule and r.mode <> 'off'
         where only_rule is null or k.rule = only_rule;
    end if;
    if exists (select from booking_guard.rules r
                where r.predicate is not null and r.entity_type = 'call' and r.mode <> 'off'
                  and (only_rule is null or r.name = only_rule)) then
        return query
        select * from booking_guard_internal.declared_findings('call',
            coalesce(call_ids, array(select g.id::bigint from booking_guard_internal.guarded_calls g
                                      where g.id > after_id and g.id <= last_id)), only_rule);
    end if;
end
$$;

comment on function booking_guard_internal.call_findings(bigint[], text, bigint, bigint) is
    'The rules on calls for the given calls (or, call_ids null, for the calls after_id < id <= last_id): the built-in ones (phantom_booking, missing_appointment, missing_direction, outcome_flag_mismatch, unlinked_appointment, booking_id_mismatch, customer_link) and the declared ones; only_rule: that rule alone; rules that are off are skipped.';

-- orphaned_appointment, and the declared rules on appointments, for the given appointments (or, as
-- call_findings(), for every appointment of a key range).
create function booking_guard_internal.appointment_findings(appointment_ids bigint[], only_rule text default null,
                                                           after_id bigint default null, last_id bigint default null)
returns setof booking_guard.finding
language plpgsql
stable
set search_path = pg_catalog, pg_temp
as $$
begin
    if only_rule is null or only_rule = 'orphaned_appointment' then
        return query
        with a as (
            select x.* from booking_guard_internal.guarded_appointments x
             where appointment_ids is not null and x.id in (select unnest(appointment_ids))
            union all
            select x.* from booking_guard_internal.guarded_appointments x
             where appointment_ids is null and x.id > after_id and x.id <= last_id
        )
        select r.name, r.severity, 'appointment'::text, a.id::text,
               jsonb_strip_nulls(jsonb_build_object(
                   'calcom_v2_booking_id', a.calcom_v2_booking_id, 'customer_id', a.customer_id, 'call_id', a.call_id,
                   'source', a.source, 'created_at', a.created_at::timestamptz,
                   'since', greatest(a.created_at, a.updated_at)::timestamptz,
                   'matching_calls', (select count(*) from booking_guard_internal.guarded_calls m
                                       where m.booking_id = a.calcom_v2_booking_id)))
          from a
          join booking_guard.rules r on r.name = 'orphaned_appointment' and r.mode <> 'off'
         where a.source = 'retell_webhook'
           -- a scalar subquery, probed per row by primary key (NOT EXISTS under an OR is planned
           -- as a hashed subplan over the whole calls table)
           and (a.call_id is null
                or (select true from booking_guard_internal.guarded_calls c where c.id = a.call_id) is null);
    end if;
    if exists (select from booking_guard.rules r
                where r.predicate is not null and r.entity_type = 'appointment' and r.mode <> 'off'
                  and (only_rule is null or r.name = only_rule)) then
        return query
        select * from booking_guard_internal.declared_findings('appointment',
            coalesce(appointment_ids, array(select x.id::bigint from booking_guard_internal.guarded_appointments x
                                             where x.id > after_id and x.id <= last_id)), only_rule);
    end if;
end
$$;

comment on function booking_guard_internal.appointment_findings(bigint[], text, bigint, bigint) is
    'The rules on appointments for the given appointments (or, appointment_ids null, for the appointments after_id < id <= last_id): orphaned_appointment (source retell_webhook, call_id null or pointing at no call) and the declared ones; only_rule: that rule alone.';

-- duplicate_booking for the given calendar booking ids.
create function booking_guard_internal.booking_findings(booking_ids text[])
returns setof booking_guard.finding
language plpgsql
stable
set search_path = pg_catalog, pg_temp
as $$
begin
    return query
    select r.name, r.severity, 'booking'::text, d.booking_id,
           jsonb_build_object('appointment_ids', d.appointment_ids, 'call_ids', d.call_ids,
                              'appointments', cardinality(d.appointment_ids),
                              'created_at', d.first_at, 'since', d.last_at)
      from (select a.calcom_v2_booking_id::text as booking_id,
                   array_agg(a.id order by a.id) as appointment_ids,
                   array_agg(distinct a.call_id) filter (where a.call_id is not null) as call_ids,
                   min(a.created_at)::timestamptz as first_at, max(a.created_at)::timestamptz as last_at
              from booking_guard_internal.guarded_appointments a
             where a.calcom_v2_booking_id in (select unnest(booking_ids))
             group by a.calcom_v2_booking_id
            having count(*) > 1) d
      join booking_guard.rules r on r.name = 'duplicate_booking' and r.mode <> 'off';
end
$$;

comment on function booking_guard_internal.booking_findings(text[]) is
    'The rule duplicate_booking (several appointments share one calcom_v2_booking_id) for the given booking ids.';

-- recent_failures: validation failures logged since the cutoff, one finding per call.
create function booking_guard_internal.failure_findings(cutoff timestamptz, call_ids text[] default null)
returns setof booking_guard.finding
language plpgsql
stable
set search_path = pg_catalog, pg_temp
as $$
begin
    return query
    select r.name, r.severity, 'call'::text, f.entity_id,
           jsonb_build_object('failures', f.n, 'reasons', f.reasons, 'created_at', f.first_at, 'since', f.first_at,
                              'last_failure_at', f.last_at)
      from (select e.entity_id, count(*) as n,
                   jsonb_agg(distinct e.details ->> 'reason') as reasons,
                   min(e.at) as first_at, max(e.at) as last_at
              from booking_guard.validation_events e
             where e.at >= cutoff
               and e.details ->> 'success' = 'false'
               and (call_ids is null or e.entity_id in (select unnest(call_ids)))
             group by e.entity_id) f
      join booking_guard.rules r on r.name = 'recent_failures' and r.mode <> 'off';
end
$$;

comment on function booking_guard_internal.failure_findings(timestamptz, text[]) is
    'The rule recent_failures: validation events with success false since the cutoff, one finding per call.';

-- The rules an administrator declared (declare_rule()) on calls or appointments, for the given ids:
-- each predicate runs as the rule's role (declared_matches(), C). A rule whose SQL fails (a privilege
-- revoked since, a division by zero) finds nothing this time and says so in a warning: one broken
-- rule does not stop detection, the monitor or reconcile.
create function booking_guard_internal.declared_findings(entity text, ids bigint[], only_rule text default null)
returns setof booking_guard.finding
language plpgsql
stable
set search_path = pg_catalog, pg_temp
as $$
declare
    r        record;
    matched  bigint[];
begin
    for r in
        select x.name, x.severity, x.run_as
          from booking_guard.rules x
         where x.predicate is not null and x.entity_type = entity and x.mode <> 'off'
           and (only_rule is null or x.name = only_rule)
         order by x.name
    loop
        begin
            matched := booking_guard_internal.declared_matches(r.name, ids);
        exception when others then
            raise warning 'declared rule % was not checked: %', r.name, sqlerrm
                using detail = format('Its predicate runs as %s; SQLSTATE %s.', r.run_as, sqlstate),
                      hint = 'Fix the rule (declare it again) or turn it off: select booking_guard.set_rule(''' || r.name
                             || ''', ''off'');';
            continue;
        end;
        if entity = 'call' then
            return query
            select r.name, r.severity, 'call'::text, g.id::text,
                   jsonb_strip_nulls(jsonb_build_object(
                       'retell_call_id', g.retell_call_id, 'company_id', g.company_id::text,
                       'created_at', g.created_at::timestamptz,
                       'since', greatest(g.created_at, g.updated_at)::timestamptz))
              from booking_guard_internal.guarded_calls g
             where g.id in (select unnest(matched));
        else
            return query
            select r.name, r.severity, 'appointment'::text, a.id::text,
                   jsonb_strip_nulls(jsonb_build_object(
                       'calcom_v2_booking_id', a.calcom_v2_booking_id, 'call_id', a.call_id, 'source', a.source,
                       'created_at', a.created_at::timestamptz,
                       'since', greatest(a.created_at, a.updated_at)::timestamptz))
              from booking_guard_internal.guarded_appointments a
             where a.id in (select unnest(matched));
        end if;
    end loop;
end
$$;

comment on function booking_guard_internal.declared_findings(text, bigint[], text) is
    'The declared rules on calls or appointments (entity) that are not off, for the given ids, each predicate run as its rule''s role; a rule whose SQL fails finds nothing and raises a warning. only_rule: that rule alone.';

-- The window check shared by detect() and detect_rule().
create function booking_guard_internal.check_window(since interval)
returns timestamptz
language plpgsql
stable
set search_path = pg_catalog, pg_temp
as $$
begin
    if since is null or since < interval '0' or since > interval '10 years' then
        raise exception 'invalid detection window: %', coalesce(since::text, 'null')
            using errcode = 'BG005',
                  detail = 'The window is how far back detection looks: a positive interval of at most 10 years.',
                  hint = 'select * from booking_guard.detect(''1 hour'');';
    end if;
    return now() - since;
end
$$;

comment on function booking_guard_internal.check_window(interval) is
    'The cutoff now() - since of a detection window; BG005 for a null, negative or longer than 10 years window.';

-- The candidates of a window: what detection reads the rules on. Only the indexes attach()
-- creates are used: calls(created_at), appointments(created_at) and the due list; every candidate is
-- then checked by primary key, so the cost follows the rows of the window, never the tables.
create function booking_guard_internal.candidate_calls(cutoff timestamptz)
returns bigint[]
language sql
stable
set search_path = pg_catalog, pg_temp
as $$
    select coalesce(array_agg(c.id order by c.id), '{}')
      from (select g.id::bigint as id from booking_guard_internal.guarded_calls g where g.created_at >= cutoff
            union
            select a.call_id::bigint from booking_guard_internal.guarded_appointments a
             where a.created_at >= cutoff and a.call_id is not null
            union
            select d.call_id from booking_guard.due_verifications d where d.due_at <= clock_timestamp()) c
$$;

comment on function booking_guard_internal.candidate_calls(timestamptz) is
    'The calls detection checks for a window: created since the cutoff, those whose appointments were, and those whose due verification has passed.';

create function booking_guard_internal.candidate_appointments(cutoff timestamptz)
returns bigint[]
language sql
stable
set search_path = pg_catalog, pg_temp
as $$
    select coalesce(array_agg(a.id::bigint order by a.id), '{}')
      from booking_guard_internal.guarded_appointments a where a.created_at >= cutoff
$$;

comment on function booking_guard_internal.candidate_appointments(timestamptz) is
    'The appointments detection checks for a window: created since the cutoff.';

create function booking_guard_internal.candidate_bookings(cutoff timestamptz)
returns text[]
language sql
stable
set search_path = pg_catalog, pg_temp
as $$
    select coalesce(array_agg(distinct a.calcom_v2_booking_id::text), '{}')
      from booking_guard_internal.guarded_appointments a
     where a.created_at >= cutoff and a.calcom_v2_booking_id is not null
$$;

comment on function booking_guard_internal.candidate_bookings(timestamptz) is
    'The calendar booking ids detection checks for a window: those of the appointments created since the cutoff.';

create function booking_guard_internal.findings(since interval, only_rule text)
returns setof booking_guard.finding
language plpgsql
stable
set search_path = pg_catalog, pg_temp
as $$
declare
    cutoff  timestamptz;
    source  text;
begin
    perform booking_guard_internal.attached();
    cutoff := booking_guard_internal.check_window(since);
    source := (select r.source from booking_guard.rules r where r.name = only_rule);

    if only_rule is null or source = 'calls' then
        return query
        select * from booking_guard_internal.call_findings(booking_guard_internal.candidate_calls(cutoff), only_rule);
    end if;
    if only_rule is null or source = 'appointments' then
        return query
        select * from booking_guard_internal.appointment_findings(booking_guard_internal.candidate_appointments(cutoff),
                                                                  only_rule);
    end if;
    if only_rule is null or source = 'bookings' then
        return query
        select * from booking_guard_internal.booking_findings(booking_guard_internal.candidate_bookings(cutoff));
    end if;
    if only_rule is null or source = 'validation_events' then
        return query select * from booking_guard_internal.failure_findings(cutoff);
    end if;
end
$$;

comment on function booking_guard_internal.findings(interval, text) is
    'The findings of one rule (or all, only_rule null) over the rows created in the window; used by detect() and detect_rule().';

create function booking_guard.detect(since interval default '1 hour')
returns setof booking_guard.finding
language sql
stable
set search_path = pg_catalog, pg_temp
set jit = off
as $$
    select f.*
      from booking_guard_internal.findings(since, null) f
     order by case f.severity when 'critical' then 1 when 'warning' then 2 else 3 end, f.rule,
              f.entity_type, length(f.entity_id), f.entity_id
$$;

comment on function booking_guard.detect(interval) is
    'Every inconsistency of every rule that is not off, among the calls and appointments created in the window (and the calls whose due verification has passed); critical first.';

create function booking_guard.detect_rule(rule_name text, since interval default '1 hour')
returns setof booking_guard.finding
language plpgsql
stable
set search_path = pg_catalog, pg_temp
set jit = off
as $$
begin
    if not exists (select from booking_guard.rules r where r.name = rule_name) then
        raise exception 'unknown rule "%"', coalesce(left(rule_name, 100), 'null')
            using errcode = 'BG004',
                  detail = format('Rules: %s.', (select string_agg(r.name, ', ' order by r.name) from booking_guard.rules r)),
                  hint = 'select name, entity_type, mode, description from booking_guard.rules;';
    end if;
    return query
    select f.* from booking_guard_internal.findings(since, rule_name) f
     order by f.entity_type, length(f.entity_id), f.entity_id;
end
$$;

comment on function booking_guard.detect_rule(text, interval) is
    'The findings of one rule over the window (what its view shows for the last hour); BG004 for an unknown rule.';

-- One view per built-in rule (<rule>_findings), and all of them: the last hour. A declared rule has
-- no view of its own (it comes and goes with the data, a view is part of the extension): its
-- findings are detect_rule('<rule>').
do $views$
declare
    r  record;
begin
    for r in select x.name, x.description from booking_guard.rules x where x.predicate is null order by x.name loop
        execute format('create view booking_guard.%I as
                        select f.entity_type, f.entity_id, f.severity, (f.details ->> ''since'')::timestamptz as since,
                               f.details
                          from booking_guard.detect_rule(%L, ''1 hour'') f', r.name || '_findings', r.name);
        execute format('comment on view booking_guard.%I is %L', r.name || '_findings',
                       format('Rule %s, last hour: %s', r.name, r.description));
    end loop;
end
$views$;

create view booking_guard.inconsistencies as
select f.rule, f.severity, f.entity_type, f.entity_id, (f.details ->> 'since')::timestamptz as since, f.details
  from booking_guard.detect('1 hour') f;

comment on view booking_guard.inconsistencies is
    'Every finding of every rule that is not off, among the rows created in the last hour (booking_guard.detect(''1 hour'')).';

create function booking_guard.check_call(call_id bigint)
returns setof booking_guard.finding
language plpgsql
stable
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_column
begin
    perform booking_guard_internal.attached();
    if check_call.call_id is null then
        raise exception 'check_call() needs a call id'
            using errcode = 'BG005',
                  detail = 'call_id is null.',
                  hint = 'select * from booking_guard.check_call(42);';
    end if;
    if not exists (select from booking_guard_internal.guarded_calls g where g.id = check_call.call_id) then
        raise exception 'unknown call %', check_call.call_id
            using errcode = 'BG004',
                  detail = format('The attached calls table has no row with id %s.', check_call.call_id),
                  hint = 'Pass the id of an existing call.';
    end if;
    return query select * from booking_guard_internal.call_findings(array[check_call.call_id]);
    return query
    select * from booking_guard_internal.booking_findings(array(
               select a.calcom_v2_booking_id::text from booking_guard_internal.guarded_appointments a
                where a.call_id = check_call.call_id and a.calcom_v2_booking_id is not null));
    return query select * from booking_guard_internal.failure_findings(now() - interval '1 hour', array[check_call.call_id::text]);
end
$$;

comment on function booking_guard.check_call(bigint) is
    'Every rule for one call, whatever its age: its flags, its appointments'' booking ids and its validation failures of the last hour. BG004 for an unknown call.';

-- Does the condition of an alert still hold? (run_monitor resolves the alerts for which it does not.)
create function booking_guard_internal.finding_holds(rule text, entity_type text, entity_id text, since interval)
returns boolean
language plpgsql
stable
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_column
declare
    id  bigint;
begin
    if finding_holds.entity_type in ('call', 'appointment') then
        begin
            id := finding_holds.entity_id::bigint;
        exception when data_exception then
            return false;
        end;
    end if;
    case (select r.source from booking_guard.rules r where r.name = finding_holds.rule)
        when 'validation_events' then
            return exists (select from booking_guard_internal.failure_findings(now() - since, array[finding_holds.entity_id]));
        when 'calls' then
            return exists (select from booking_guard_internal.call_findings(array[id], finding_holds.rule));
        when 'appointments' then
            return exists (select from booking_guard_internal.appointment_findings(array[id], finding_holds.rule));
        when 'bookings' then
            return exists (select from booking_guard_internal.booking_findings(array[finding_holds.entity_id]));
        else
            return false;   -- a rule dropped since
    end case;
end
$$;

comment on function booking_guard_internal.finding_holds(text, text, text, interval) is
    'Whether one rule still finds its inconsistency on one entity (by key, whatever its age); false for a rule that is off or gone.';

-- What a rule in correct mode repairs, for one finding: the repair its row names (repair_kind), each
-- written once here and shared by the monitor and reconcile. done says what was repaired (null:
-- nothing); counter names the count reconcile() adds it to.
create function booking_guard_internal.repair_finding(f booking_guard.finding, out done text, out counter text)
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    v_id     bigint;
    company  text := f.details ->> 'company_id';
    kind     text := (select r.repair_kind from booking_guard.rules r where r.name = f.rule);
    matches  bigint[];
    n        bigint;
begin
    if f.entity_type in ('call', 'appointment') then
        v_id := f.entity_id::bigint;
    end if;
    case kind
        when 'default_direction' then
            if booking_guard.rule_mode(f.rule, company) not in ('correct', 'enforce') then
                return;
            end if;
            update booking_guard_internal.guarded_calls g
               set direction = (select s.text_value from booking_guard.settings s where s.name = 'default_direction'),
                   updated_at = now()
             where g.id = v_id and g.direction is null;
            if found then
                done := 'direction set';
                counter := 'directions';
            end if;
        when 'customer_link' then
            if booking_guard.rule_mode(f.rule, company) not in ('correct', 'enforce') then
                return;
            end if;
            update booking_guard_internal.guarded_calls g
               set customer_link_status = 'linked', customer_linked_at = coalesce(g.customer_linked_at, now()),
                   customer_link_method = coalesce(g.customer_link_method, 'reconcile'), updated_at = now()
             where g.id = v_id and g.customer_id is not null
               and g.customer_link_status is distinct from 'linked';
            if found then
                done := 'customer linked';
                counter := 'customer_links';
            end if;
        when 'call_flags' then
            if (f.details ->> 'appointments')::bigint > 0 then
                if booking_guard.rule_mode(f.rule, company) in ('correct', 'enforce')
                   and booking_guard_internal.sync_call_flags(v_id) then
                    done := 'flags set from the appointments';
                    counter := 'flags';
                end if;
                return;
            end if;
            -- no appointment behind the claim: the missing_appointment verdict (rollback and review)
            if booking_guard.rule_mode(f.rule, company) not in ('correct', 'enforce')
               or booking_guard.rule_mode('missing_appointment', company) not in ('correct', 'enforce')
               or booking_guard_internal.within_grace(v_id, (f.details ->> 'since')::timestamptz) then
                return;
            end if;
            if booking_guard_internal.judge_call(v_id, true) = 'rolled_back' then
                done := 'rolled back to creation_failed and queued for review';
                counter := 'rolled_back';
            end if;
        when 'orphan_link' then
            select array_agg(c.id order by c.id) into matches
              from booking_guard_internal.guarded_calls c
             where c.booking_id = f.details ->> 'calcom_v2_booking_id';
            if cardinality(matches) = 1 then
                if booking_guard.rule_mode(f.rule,
                       (select c.company_id::text from booking_guard_internal.guarded_calls c where c.id = matches[1]))
                   not in ('correct', 'enforce') then
                    return;
                end if;
                -- linking makes the appointments trigger update the call: a call an application holds
                -- is left for the next run rather than waited for (the job never waits, and never
                -- deadlocks an application that holds the call and books onto this appointment)
                if not exists (select from booking_guard_internal.guarded_calls c where c.id = matches[1]
                                  for no key update skip locked) then
                    counter := 'skipped_locked';
                    return;
                end if;
                update booking_guard_internal.guarded_appointments a
                   set call_id = matches[1], updated_at = now()
                 where a.id = v_id;
                done := format('linked to call %s', matches[1]);
                counter := 'orphans';
            elsif cardinality(matches) > 1 then
                if booking_guard.rule_mode(f.rule, null) in ('correct', 'enforce')
                   and booking_guard_internal.queue_orphan(v_id, f.details ->> 'calcom_v2_booking_id', matches) then
                    counter := 'orphans_ambiguous';
                end if;
            else
                counter := 'orphans_unmatched';
            end if;
        when 'statement' then
            -- a declared rule's repair statement, run as its role; one that fails leaves the finding
            -- alerted and says so in a warning
            if booking_guard.rule_mode(f.rule, company) not in ('correct', 'enforce') then
                return;
            end if;
            begin
                n := booking_guard_internal.declared_repair(f.rule, v_id);
            exception when others then
                raise warning 'the repair of declared rule % failed on % %: %', f.rule, f.entity_type, f.entity_id, sqlerrm
                    using detail = format('SQLSTATE %s. The finding stays alerted.', sqlstate),
                          hint = 'Fix the rule (declare it again) or set it to observe: select booking_guard.set_rule('''
                                 || f.rule || ''', ''observe'');';
                return;
            end;
            if n > 0 then
                done := format('repair statement ran (%s rows)', n);
                counter := 'declared_repairs';
            end if;
        else
            null;   -- the rule only alerts
    end case;
end
$$;

comment on function booking_guard_internal.repair_finding(booking_guard.finding) is
    'Applies the repair of a finding''s rule (its repair_kind) when its mode (for the entity''s company) is correct or enforce; returns what was done (or null) and the reconcile count it adds to.';

-- An orphan is never guessed: one whose booking id several calls hold (ambiguous_orphan), or none
-- (orphaned_appointment), goes to a person. One open item per appointment (subject
-- appointment:<id>), its context keyed appointment_<id>, linked to the orphan's alert when given.
create function booking_guard_internal.queue_orphan(appointment_id bigint, booking_id text, candidate_calls bigint[],
                                                    alert_id bigint default null)
returns boolean
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_reason   text := case when cardinality(candidate_calls) > 1 then 'ambiguous_orphan' else 'orphaned_appointment' end;
    v_subject  text := 'appointment:' || appointment_id;
    fresh      boolean;
begin
    fresh := not exists (select from booking_guard.review_queue q
                          where q.call_id is null and q.reason = v_reason and q.subject = v_subject
                            and q.status <> 'resolved');
    perform booking_guard_internal.queue_review(null, v_reason,
        jsonb_build_object('appointment_' || appointment_id,
                           jsonb_build_object('appointment_id', appointment_id, 'calcom_v2_booking_id', booking_id,
                                              'candidate_call_ids', to_jsonb(coalesce(candidate_calls, '{}')))),
        v_subject, alert_id);
    return fresh;
end
$$;

comment on function booking_guard_internal.queue_orphan(bigint, text, bigint[], bigint) is
    'Queues an orphaned appointment that no call or several calls match by booking id for review (ambiguous_orphan with several, orphaned_appointment with none; subject appointment:<id>), linked to its alert; false if it is queued already.';

-- The findings run_monitor hands to a person, at the point where they become alerts: those no rule
-- may decide, whatever the rule's mode (a review item repairs nothing). A booking held by several
-- appointments (which row is real?) and an orphan no call or several calls claim. The item is linked
-- to the finding's alert and queued once: a repeat finds it open.
create function booking_guard_internal.queue_finding(f booking_guard.finding, alert_id bigint, repaired text)
returns void
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    calls  jsonb := case when jsonb_typeof(f.details -> 'call_ids') = 'array' then f.details -> 'call_ids' else '[]' end;
    n      bigint;
begin
    -- seen again: its alert already has its open item
    if exists (select from booking_guard.alerts a join booking_guard.review_queue q on q.id = a.review_id
                where a.id = alert_id and q.status <> 'resolved') then
        return;
    end if;
    if f.rule = 'duplicate_booking' then
        perform booking_guard_internal.queue_review(
            case when jsonb_array_length(calls) = 1 then (calls ->> 0)::bigint end, 'duplicate_booking',
            jsonb_build_object('calcom_booking_id', f.entity_id, 'appointment_ids', f.details -> 'appointment_ids',
                               'call_ids', calls),
            'booking:' || f.entity_id, alert_id);
    elsif f.rule = 'orphaned_appointment' and repaired is null then
        n := (f.details ->> 'matching_calls')::bigint;
        if n <> 1 then
            perform booking_guard_internal.queue_orphan(f.entity_id::bigint, f.details ->> 'calcom_v2_booking_id',
                array(select c.id::bigint from booking_guard_internal.guarded_calls c
                       where c.booking_id = f.details ->> 'calcom_v2_booking_id' order by c.id),
                alert_id);
        end if;
    end if;
end
$$;

comment on function booking_guard_internal.queue_finding(booking_guard.finding, bigint, text) is
    'run_monitor: queues a finding no rule may decide for a person, linked to its alert (duplicate_booking; orphaned_appointment when no call or several match), once.';

create function booking_guard_internal.finding_description(f booking_guard.finding)
returns text
language plpgsql
stable
set search_path = pg_catalog, pg_temp
as $$
declare
    text_of  text := (select r.alert_text from booking_guard.rules r where r.name = f.rule);
    k        text;
begin
    -- the rule's alert text, its {key} replaced by that fact of the finding
    for k in select distinct m[1] from regexp_matches(coalesce(text_of, ''), '\{([a-z_][a-z0-9_]*)\}', 'g') m loop
        if f.details ? k then
            text_of := replace(text_of, '{' || k || '}', f.details ->> k);
        end if;
    end loop;
    return format('%s: %s %s%s', f.rule, f.entity_type, f.entity_id,
                  case when f.details ? 'retell_call_id' then format(' (%s)', f.details ->> 'retell_call_id') else '' end)
           || coalesce(' ' || text_of, '');
end
$$;

comment on function booking_guard_internal.finding_description(booking_guard.finding) is
    'A one-line description of a finding, for its alert: rule, entity and the rule''s alert text with the finding''s facts.';

-- run_monitor: detection turned into alerts, with repairs where a rule is in correct mode.
--
-- As a job it runs in steps: plan (the candidates of the window), then calls, appointments,
-- bookings and validation failures batch by batch, then the open alerts whose condition may no
-- longer hold, then the job health check. The scheduled job looks only at rows created since its
-- last run, so its cost follows the new rows, not the window: its watermark is when that run
-- began, or when the oldest transaction then still writing began (its rows, committed later, carry
-- that older created_at), less monitor_overlap. An alert it did not see again is re-checked at
-- most every monitor_recheck_interval. The function run_monitor(since) looks at the whole window and re-checks
-- every open alert.

-- Whether the row a finding would repair exists but another transaction holds it; when not, it is
-- locked here for the rest of this batch. A finding of a rule with no repair (its repair_kind null)
-- or about a row that does not exist locks nothing.
create function booking_guard_internal.held_by_another(f booking_guard.finding)
returns boolean
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
    if (select r.repair_kind from booking_guard.rules r where r.name = f.rule) is null then
        return false;
    elsif f.entity_type = 'call' then
        perform from booking_guard_internal.guarded_calls g where g.id = f.entity_id::bigint for no key update skip locked;
        return not found and exists (select from booking_guard_internal.guarded_calls g where g.id = f.entity_id::bigint);
    elsif f.entity_type = 'appointment' then
        perform from booking_guard_internal.guarded_appointments a where a.id = f.entity_id::bigint
            for no key update skip locked;
        return not found
               and exists (select from booking_guard_internal.guarded_appointments a where a.id = f.entity_id::bigint);
    end if;
    return false;
end
$$;

comment on function booking_guard_internal.held_by_another(booking_guard.finding) is
    'run_monitor: true when the row a finding would repair is held by another transaction (then skipped, not waited for); otherwise locks it for the batch.';

-- The findings of one batch, alerted (deduplicated) and repaired where the rule corrects; returns
-- the counts with this batch's added.
create function booking_guard_internal.monitor_findings(fs booking_guard.finding[], counts jsonb, since interval)
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    f              booking_guard.finding;
    v_fingerprint  text;
    fresh          boolean;
    repaired       text;
    alert_id       bigint;
begin
    foreach f in array coalesce(fs, '{}') loop
        counts := jsonb_set(counts, '{findings}', to_jsonb((counts ->> 'findings')::bigint + 1));
        counts := jsonb_set(counts, array['by_rule', f.rule], to_jsonb(coalesce((counts -> 'by_rule' ->> f.rule)::bigint, 0) + 1));
        v_fingerprint := concat_ws(':', f.rule, f.entity_type, f.entity_id);
        fresh := not exists (select from booking_guard.alerts x where x.fingerprint = v_fingerprint and x.resolved_at is null);
        -- An entity an application transaction holds is not repaired now (its own write is judged by
        -- the triggers; the next run sees it again): a job never waits for an application's lock.
        if booking_guard_internal.held_by_another(f) then
            counts := jsonb_set(counts, '{skipped_locked}', to_jsonb(coalesce((counts ->> 'skipped_locked')::bigint, 0) + 1));
            continue;
        end if;
        select r.done into repaired from booking_guard_internal.repair_finding(f) r;
        if repaired is null and booking_guard.rule_mode(f.rule, f.details ->> 'company_id') in ('correct', 'enforce')
           and not booking_guard_internal.finding_holds(f.rule, f.entity_type, f.entity_id, since) then
            -- repaired with another finding of the same entity in this run (a phantom's flags set
            -- from its appointment also end its unlinked_appointment)
            repaired := 'repaired with another finding of this entity';
        end if;
        if repaired is not null then
            counts := jsonb_set(counts, '{repaired}', to_jsonb((counts ->> 'repaired')::bigint + 1));
        end if;
        if repaired like 'rolled back%' then
            -- rollback_on_failure() has raised the missing_appointment alert of this call
            alert_id := (select x.id from booking_guard.alerts x
                          where x.fingerprint = concat_ws(':', 'missing_appointment', 'call', f.entity_id)
                            and x.resolved_at is null);
        else
            alert_id := booking_guard_internal.raise_alert(f.rule, f.severity, f.entity_type, f.entity_id,
                booking_guard_internal.finding_description(f) || coalesce(': ' || repaired, ''),
                f.details || jsonb_strip_nulls(jsonb_build_object('repair', repaired)),
                repaired is not null);
        end if;
        perform booking_guard_internal.queue_finding(f, alert_id, repaired);
        if fresh then
            counts := jsonb_set(counts, '{new}', to_jsonb((counts ->> 'new')::bigint + 1));
            perform booking_guard_internal.log_event('detection', f.rule, f.entity_type, f.entity_id,
                f.details || jsonb_strip_nulls(jsonb_build_object(
                    'alert_id', alert_id, 'repair', repaired,
                    'latency_seconds', round(extract(epoch from now() - (f.details ->> 'since')::timestamptz)::numeric, 3))));
        end if;
    end loop;
    return counts;
end
$$;

comment on function booking_guard_internal.monitor_findings(booking_guard.finding[], jsonb, interval) is
    'run_monitor: raises one deduplicated alert per finding (repairing, and marking auto_corrected, where the rule corrects), queues those no rule may decide for a person (queue_finding) and logs the detection of new ones; returns the counts.';

-- An open alert of a detection rule that run_monitor did not see again: resolved when its
-- condition no longer holds, otherwise marked seen (last_seen_at) so that it is not re-checked
-- before monitor_recheck_interval has passed.
create function booking_guard_internal.alert_recheck(alert_id bigint, holds boolean)
returns boolean
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    a  booking_guard.alerts;
begin
    select * into a from booking_guard.alerts x where x.id = alert_recheck.alert_id and x.resolved_at is null for update;
    if not found then
        return false;
    end if;
    if holds then
        update booking_guard.alerts x set last_seen_at = now() where x.id = alert_recheck.alert_id;
        return false;
    end if;
    perform booking_guard_internal.resolve_together(alert_recheck.alert_id, null, 'fixed',
        format('resolved with its alert #%s: run_monitor found the %s condition no longer holds', a.id, a.alert_type));
    perform booking_guard_internal.log_event('detection', a.alert_type, a.entity_type, a.entity_id,
                                             jsonb_build_object('resolved_alert_id', a.id));
    return true;
end
$$;

comment on function booking_guard_internal.alert_recheck(bigint, boolean) is
    'run_monitor: resolves an open detection alert whose condition no longer holds (true), or marks it seen again.';

create function booking_guard_internal.monitor_step(state jsonb)
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
set jit = off
as $$
declare
    args     jsonb := state -> 'args';
    -- scheduled (run_job()): only what is new since the last run, in batches that commit
    scheduled  boolean := coalesce((args ->> 'scheduled')::boolean, false);
    since    interval := coalesce((args ->> 'since')::interval, interval '1 hour');
    batch    integer := case when scheduled
                             then (select s.integer_value from booking_guard.settings s where s.name = 'job_batch_size')
                             else 2147483647 end;
    phase    text := coalesce(state ->> 'phase', 'plan');
    counts   jsonb := coalesce(state -> 'counts',
                               jsonb_build_object('findings', 0, 'new', 0, 'repaired', 0, 'resolved', 0, 'by_rule', '{}'::jsonb));
    cutoff   timestamptz;
    slice    text[];
    a        record;
    n        integer := 0;
    recheck  interval;
    last_key text;
begin
    perform booking_guard_internal.attached();
    if phase = 'plan' then
        cutoff := now() - since;
        if scheduled and state ->> 'watermark' is not null then
            cutoff := greatest(cutoff, (state ->> 'watermark')::timestamptz
                                       - (select s.interval_value from booking_guard.settings s where s.name = 'monitor_overlap'));
        end if;
        -- the candidates go into a queue taken a batch per step (left over by a run that died: dropped)
        delete from booking_guard_internal.monitor_queue;
        insert into booking_guard_internal.monitor_queue (kind, entity_id)
        select 'call', unnest(booking_guard_internal.candidate_calls(cutoff))::text
        union all
        select 'appointment', unnest(booking_guard_internal.candidate_appointments(cutoff))::text
        union all
        select 'booking', unnest(booking_guard_internal.candidate_bookings(cutoff));
        return state || jsonb_build_object('phase', 'call', 'cutoff', cutoff, 'seen_from', now(),
                                           'next_watermark', least(now(), (state ->> 'oldest_writer')::timestamptz),
                                           'counts', counts);
    end if;
    cutoff := (state ->> 'cutoff')::timestamptz;

    if phase in ('call', 'appointment', 'booking') then
        -- The batch is the queue's first `batch` entities of the phase, taken as one key range: a
        -- semi-join of the queue with itself is planned from the statistics of a table that is
        -- emptied every run, and estimated at one row it became a nested loop, quadratic in the
        -- window (minutes at 100,000 calls).
        last_key := (select x.entity_id from booking_guard_internal.monitor_queue x
                      where x.kind = phase order by x.entity_id offset batch - 1 limit 1);
        with taken as (
            delete from booking_guard_internal.monitor_queue q
             where q.kind = phase and (last_key is null or q.entity_id <= last_key)
            returning q.entity_id
        )
        select array_agg(t.entity_id) into slice from taken t;
        counts := booking_guard_internal.monitor_findings(
            case phase
                when 'call' then array(select f from booking_guard_internal.call_findings(slice::bigint[]) f)
                when 'appointment' then array(select f from booking_guard_internal.appointment_findings(slice::bigint[]) f)
                else array(select f from booking_guard_internal.booking_findings(slice) f)
            end, counts, since);
        return state || jsonb_build_object('counts', counts,
                                           'phase', case when cardinality(slice) = batch then phase
                                                         when phase = 'call' then 'appointment'
                                                         when phase = 'appointment' then 'booking'
                                                         else 'failures' end);
    end if;

    if phase = 'failures' then
        counts := booking_guard_internal.monitor_findings(
            array(select f from booking_guard_internal.failure_findings(cutoff) f), counts, since);
        return state || jsonb_build_object('phase', 'resolve', 'after', 0, 'counts', counts);
    end if;

    if phase = 'resolve' then
        recheck := case when scheduled
                        then (select s.interval_value from booking_guard.settings s where s.name = 'monitor_recheck_interval')
                        else interval '0' end;
        for a in
            select x.id, x.alert_type, x.entity_type, x.entity_id
              from booking_guard.alerts x
             where x.resolved_at is null and x.id > (state ->> 'after')::bigint
               and x.alert_type in (select r.name from booking_guard.rules r)
               and x.last_seen_at < (state ->> 'seen_from')::timestamptz
               and x.last_seen_at <= now() - recheck
             order by x.id
             limit batch
        loop
            n := n + 1;
            if booking_guard_internal.alert_recheck(a.id,
                   booking_guard_internal.finding_holds(a.alert_type, a.entity_type, a.entity_id, since)) then
                counts := jsonb_set(counts, '{resolved}', to_jsonb((counts ->> 'resolved')::bigint + 1));
            end if;
            state := jsonb_set(state, '{after}', to_jsonb(a.id));
        end loop;
        return state || jsonb_build_object('counts', counts, 'phase', case when n < batch then 'jobs' else 'resolve' end);
    end if;

    -- phase jobs: the health of the other jobs, last
    return state || jsonb_build_object('stalled_jobs', booking_guard_internal.check_jobs(), 'done', true, 'counts', counts);
end
$$;

comment on function booking_guard_internal.monitor_step(jsonb) is
    'Job run_monitor, one step: plan (the window''s candidates into monitor_queue), call, appointment, booking, failures (findings alerted and repaired, job_batch_size entities a step), resolve (open alerts re-checked), jobs (job health).';

create function booking_guard.run_monitor(since interval default '1 hour')
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
set jit = off
as $$
declare
    result  jsonb;
begin
    perform booking_guard_internal.attached();
    perform booking_guard_internal.check_window(since);
    result := booking_guard_internal.run_job_steps('run_monitor', jsonb_build_object('since', since));
    if result ? 'skipped' then
        return jsonb_build_object('skipped', result ->> 'skipped');
    end if;
    perform booking_guard_internal.job_raise(result);
    return (result -> 'counts') || jsonb_build_object('duration_ms', result -> 'duration_ms')
           || jsonb_strip_nulls(jsonb_build_object('stalled_jobs', result -> 'stalled_jobs'));
end
$$;

comment on function booking_guard.run_monitor(interval) is
    'Detects over the rows created in the window, raises one deduplicated alert per finding (repairing, and marking auto_corrected, where the rule is in correct mode), resolves open alerts of detection rules whose condition no longer holds; returns counts. Runs as booking_guard_worker, in the caller''s transaction (the scheduled job commits per batch).';
