-- Alerts: the seed's data_consistency_alerts, deduplicated.
--
-- One open alert per fingerprint (rule + entity): a repeat bumps occurrences and
-- last_seen_at instead of adding a row, so a flapping entity cannot flood the table or
-- the pager. Each new alert sends NOTIFY booking_guard_alert with its id (NOTIFY is
-- delivered at COMMIT and not replayed: the relay reads the table, the id only wakes it).

create table booking_guard.alerts (
    id               bigint generated always as identity primary key,
    alert_type       text not null,
    severity         text not null check (severity in ('critical', 'warning', 'info')),
    entity_type      text,
    entity_id        text,
    description      text not null,
    details          jsonb not null default '{}',
    fingerprint      text not null,
    occurrences      integer not null default 1 check (occurrences > 0),
    auto_corrected   boolean not null default false,
    detected_at      timestamptz not null default now(),
    last_seen_at     timestamptz not null default now(),
    acknowledged_at  timestamptz,
    acknowledged_by  name,
    resolved_at      timestamptz,
    delivered_at     timestamptz
);

create unique index alerts_one_open_per_fingerprint on booking_guard.alerts (fingerprint) where resolved_at is null;
create index alerts_detected_at_idx on booking_guard.alerts (detected_at);
create index alerts_undelivered_idx on booking_guard.alerts (id) where delivered_at is null;

comment on table booking_guard.alerts is
    'Alerts raised by booking_guard''s rules: one open alert per fingerprint (rule + entity), with occurrences, acknowledgement, resolution and delivery.';

-- History, not configuration, but it must survive pg_dump / pg_restore like the rest.
select pg_catalog.pg_extension_config_dump('booking_guard.alerts', '');
select pg_catalog.pg_extension_config_dump('booking_guard.alerts_id_seq', '');

create function booking_guard.raise_alert(alert_type text, severity text, entity_type text, entity_id text,
                                          description text, details jsonb default '{}',
                                          auto_corrected boolean default false)
returns bigint
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_column
declare
    v_id        bigint;
    v_inserted  boolean;
begin
    if raise_alert.alert_type is null or raise_alert.description is null or raise_alert.severity is null
       or raise_alert.severity not in ('critical', 'warning', 'info') then
        raise exception 'invalid alert: type %, severity %', coalesce(raise_alert.alert_type, 'null'),
                        coalesce(raise_alert.severity, 'null')
            using errcode = 'BG005',
                  detail = 'An alert needs a type, a description and a severity of critical, warning or info.',
                  hint = 'select booking_guard.raise_alert(''phantom_booking'', ''critical'', ''call'', ''42'', ''...'');';
    end if;
    insert into booking_guard.alerts as a
           (alert_type, severity, entity_type, entity_id, description, details, fingerprint, auto_corrected)
    values (raise_alert.alert_type, raise_alert.severity, raise_alert.entity_type, raise_alert.entity_id,
            raise_alert.description, coalesce(raise_alert.details, '{}'),
            concat_ws(':', raise_alert.alert_type, raise_alert.entity_type, raise_alert.entity_id),
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
        perform booking_guard.log_event('alert', raise_alert.alert_type, raise_alert.entity_type, raise_alert.entity_id,
                                        jsonb_build_object('alert_id', v_id, 'severity', raise_alert.severity,
                                                           'auto_corrected', coalesce(raise_alert.auto_corrected, false)));
    end if;
    return v_id;
end
$$;

comment on function booking_guard.raise_alert(text, text, text, text, text, jsonb, boolean) is
    'Raises an alert, or bumps the open one with the same fingerprint (type + entity); a new alert sends NOTIFY booking_guard_alert with its id.';

-- The row of an alert, or BG004 when there is none (shared by acknowledge and resolve).
create function booking_guard.alert_for_update(alert_id bigint)
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

comment on function booking_guard.alert_for_update(bigint) is
    'The alert with this id, row-locked; BG004 if there is none.';

create function booking_guard.acknowledge_alert(alert_id bigint, acknowledged_by name default current_user)
returns booking_guard.alerts
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_column
declare
    a  booking_guard.alerts := booking_guard.alert_for_update(alert_id);
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
    a  booking_guard.alerts := booking_guard.alert_for_update(alert_id);
begin
    if a.resolved_at is not null then
        return a;
    end if;
    update booking_guard.alerts set resolved_at = now() where id = alert_id returning * into a;
    return a;
end
$$;

comment on function booking_guard.resolve_alert(bigint) is
    'Closes an alert; the next occurrence of its fingerprint opens a new one.';

grant select on booking_guard.alerts to booking_guard_monitor;
grant execute on function booking_guard.acknowledge_alert(bigint, name), booking_guard.resolve_alert(bigint)
   to booking_guard_admin;
