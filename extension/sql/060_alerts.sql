-- Alerts (table booking_guard.alerts), deduplicated.
--
-- One open alert per fingerprint (rule + entity): a repeat bumps occurrences and last_seen_at
-- instead of adding a row, so a flapping entity cannot flood the table or the pager. Each new alert
-- sends NOTIFY booking_guard_alert with its id only (any role may LISTEN on any channel; NOTIFY is
-- delivered at COMMIT and not replayed: the relay reads the table, the id only wakes it).

create function booking_guard_internal.raise_alert(alert_type text, severity text, entity_type text, entity_id text,
                                          description text, details jsonb default '{}',
                                          auto_corrected boolean default false)
returns bigint
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_column
declare
    v_fingerprint  text;
    v_id           bigint;
    v_inserted     boolean;
    v_threshold    bigint;
begin
    if raise_alert.alert_type is null or raise_alert.alert_type !~ '^[a-z][a-z0-9_]{0,62}$'
       or raise_alert.description is null or raise_alert.severity is null
       or raise_alert.severity not in ('critical', 'warning', 'info')
       or length(raise_alert.entity_id) > 255 or length(raise_alert.entity_type) > 63
       or pg_column_size(raise_alert.details) > 65536 then
        raise exception 'invalid alert: type %, severity %', coalesce(left(raise_alert.alert_type, 100), 'null'),
                        coalesce(raise_alert.severity, 'null')
            using errcode = 'BG005',
                  detail = 'An alert needs a type (a lower-case identifier), a description, a severity of critical, '
                           'warning or info, an entity of at most 255 characters and details of at most 64 kB.',
                  hint = 'select booking_guard_internal.raise_alert(''phantom_booking'', ''critical'', ''call'', ''42'', ''...'');';
    end if;
    v_fingerprint := concat_ws(':', raise_alert.alert_type, raise_alert.entity_type, raise_alert.entity_id);

    -- a repeat of an open alert: one more occurrence, never a new row or a notification
    update booking_guard.alerts a
       set occurrences = a.occurrences + 1, last_seen_at = now(), details = coalesce(raise_alert.details, '{}'),
           description = left(raise_alert.description, 2000),
           auto_corrected = a.auto_corrected or coalesce(raise_alert.auto_corrected, false)
     where a.fingerprint = v_fingerprint and a.resolved_at is null
    returning a.id into v_id;
    if found then
        return v_id;
    end if;

    -- A storm: more new alerts of one type in the last minute than alert_storm_threshold. The rest
    -- of the minute's alerts of that type become occurrences of one alert_storm alert, so that
    -- whoever floods (a broken client, a hostile role) cannot page once per row.
    v_threshold := (select s.integer_value from booking_guard.settings s where s.name = 'alert_storm_threshold');
    if raise_alert.alert_type <> 'alert_storm'
       and (select count(*) from (select from booking_guard.alerts a
                                   where a.alert_type = raise_alert.alert_type and a.detected_at > now() - interval '1 minute'
                                   limit v_threshold) recent) >= v_threshold then
        -- One row all of the storm's sessions bump: one held by another transaction is not waited for
        -- (that occurrence goes uncounted), so that a storm cannot chain writers and jobs into a deadlock.
        update booking_guard.alerts a
           set occurrences = a.occurrences + 1, last_seen_at = now(),
               details = a.details || jsonb_build_object('last_entity',
                                                         concat_ws(':', raise_alert.entity_type, raise_alert.entity_id))
         where a.id = (select x.id from booking_guard.alerts x
                        where x.fingerprint = concat_ws(':', 'alert_storm', 'rule', raise_alert.alert_type)
                          and x.resolved_at is null
                          for update skip locked)
        returning a.id into v_id;
        if found or exists (select from booking_guard.alerts x
                             where x.fingerprint = concat_ws(':', 'alert_storm', 'rule', raise_alert.alert_type)
                               and x.resolved_at is null) then
            return v_id;
        end if;
        return booking_guard_internal.raise_alert('alert_storm', raise_alert.severity, 'rule', raise_alert.alert_type,
            format('More than %s new %s alerts within a minute: the rest are counted here', v_threshold, raise_alert.alert_type),
            jsonb_build_object('rule', raise_alert.alert_type, 'threshold', v_threshold,
                               'last_entity', concat_ws(':', raise_alert.entity_type, raise_alert.entity_id)),
            false);
    end if;

    insert into booking_guard.alerts as a
           (alert_type, severity, entity_type, entity_id, description, details, fingerprint, auto_corrected)
    values (raise_alert.alert_type, raise_alert.severity, raise_alert.entity_type, raise_alert.entity_id,
            left(raise_alert.description, 2000), coalesce(raise_alert.details, '{}'), v_fingerprint,
            coalesce(raise_alert.auto_corrected, false))
    on conflict (fingerprint) where resolved_at is null do update
       set occurrences = a.occurrences + 1,
           last_seen_at = now(),
           details = excluded.details,
           description = excluded.description,
           auto_corrected = a.auto_corrected or excluded.auto_corrected
    returning a.id, a.occurrences = 1 into v_id, v_inserted;

    if v_inserted then
        perform pg_notify('booking_guard_alert', v_id::text);
        perform booking_guard_internal.log_event('alert', raise_alert.alert_type, raise_alert.entity_type, raise_alert.entity_id,
                                        jsonb_build_object('alert_id', v_id, 'severity', raise_alert.severity,
                                                           'auto_corrected', coalesce(raise_alert.auto_corrected, false)));
    end if;
    return v_id;
end
$$;

comment on function booking_guard_internal.raise_alert(text, text, text, text, text, jsonb, boolean) is
    'Raises an alert, or bumps the open one with the same fingerprint (type + entity); a new alert sends NOTIFY booking_guard_alert with its id. Past alert_storm_threshold new alerts of a type per minute, the rest count as occurrences of one alert_storm alert. Bad input is BG005.';

-- An alert of a rule, with the rule's severity (its row in booking_guard.rules says it, once).
create function booking_guard_internal.rule_alert(rule_name text, entity_type text, entity_id text, description text,
                                                  details jsonb default '{}', auto_corrected boolean default false)
returns bigint
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    v_severity  text := (select r.severity from booking_guard.rules r where r.name = rule_alert.rule_name);
begin
    if v_severity is null then
        raise exception 'unknown rule "%"', coalesce(left(rule_alert.rule_name, 100), 'null')
            using errcode = 'BG004',
                  detail = 'An alert of a rule takes its severity from the rule''s row in booking_guard.rules.',
                  hint = 'select name, severity from booking_guard.rules;';
    end if;
    return booking_guard_internal.raise_alert(rule_alert.rule_name, v_severity, rule_alert.entity_type, rule_alert.entity_id,
                                              rule_alert.description, rule_alert.details, rule_alert.auto_corrected);
end
$$;

comment on function booking_guard_internal.rule_alert(text, text, text, text, jsonb, boolean) is
    'Raises (or bumps) the alert of a rule on an entity, with the severity of the rule''s row; BG004 for an unknown rule.';

-- The row of an alert, or BG004 when there is none (shared by acknowledge and resolve).
create function booking_guard_internal.alert_for_update(alert_id bigint)
returns booking_guard.alerts
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    a  booking_guard.alerts;
begin
    select * into a from booking_guard.alerts where id = alert_id for update;
    if not found then
        raise exception 'unknown alert %', coalesce(alert_id::text, 'null')
            using errcode = 'BG004',
                  detail = format('No alert has id %s.', coalesce(alert_id::text, 'null')),
                  hint = 'select id, alert_type, entity_id from booking_guard.alerts where resolved_at is null;';
    end if;
    return a;
end
$$;

comment on function booking_guard_internal.alert_for_update(bigint) is
    'The alert with this id, row-locked; BG004 if there is none.';

create function booking_guard.acknowledge_alert(alert_id bigint, acknowledged_by name default current_user)
returns booking_guard.alerts
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_column
declare
    a  booking_guard.alerts := booking_guard_internal.alert_for_update(alert_id);
begin
    if a.acknowledged_at is not null then
        return a;   -- acknowledging twice keeps the first acknowledgement (alert response time)
    end if;
    update booking_guard.alerts
       set acknowledged_at = now(), acknowledged_by = coalesce(acknowledge_alert.acknowledged_by, session_user)
     where id = alert_id
    returning * into a;
    return a;
end
$$;

comment on function booking_guard.acknowledge_alert(bigint, name) is
    'Marks an alert as seen by a person (the alert response time KPI); acknowledging twice keeps the first.';

create function booking_guard.resolve_alert(alert_id bigint)
returns booking_guard.alerts
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    a  booking_guard.alerts := booking_guard_internal.alert_for_update(alert_id);
begin
    if a.resolved_at is not null then
        return a;
    end if;
    perform booking_guard_internal.resolve_together(alert_id, null, 'fixed',
                                                    format('resolved with its alert #%s by %s', alert_id, session_user));
    select * into a from booking_guard.alerts where id = alert_id;
    return a;
end
$$;

comment on function booking_guard.resolve_alert(bigint) is
    'Closes an alert (and its review item, unless another alert of the item is open or the alert was auto-corrected); the next occurrence of its fingerprint opens a new one.';
