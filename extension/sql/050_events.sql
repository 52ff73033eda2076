-- The events log: an append-only record of what booking_guard did (corrections, rollbacks,
-- verdicts, validations). Reports, KPIs and metrics read it; nothing ever rewrites it.

create table booking_guard.events (
    id           bigint generated always as identity primary key,
    at           timestamptz not null default clock_timestamp(),
    kind         text not null,
    rule         text,
    entity_type  text,
    entity_id    text,
    details      jsonb not null default '{}',
    -- The writing transaction: every event of a transaction older than the oldest one still
    -- running is final, which lets metrics fold events into counters exactly once without
    -- a lock on the booking path.
    xid          xid8 not null default pg_current_xact_id()
);

create index events_at_idx on booking_guard.events (at);
create index events_xid_idx on booking_guard.events (xid);
create index events_kind_at_idx on booking_guard.events (kind, at);

comment on table booking_guard.events is
    'Append-only log of what booking_guard did: kind (correction, rollback, verdict, alert, review, ...), rule, entity, details.';

-- History, not configuration, but it must survive pg_dump / pg_restore like the rest.
select pg_catalog.pg_extension_config_dump('booking_guard.events', '');
select pg_catalog.pg_extension_config_dump('booking_guard.events_id_seq', '');

create function booking_guard.events_append_only()
returns trigger
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
    raise exception 'booking_guard.events is append-only'
        using errcode = 'BG005',
              detail = format('%s of event rows is not allowed.', tg_op),
              hint = 'Events are history: insert new ones with booking_guard.log_event().';
end
$$;

comment on function booking_guard.events_append_only() is
    'Trigger: rejects UPDATE and DELETE on booking_guard.events.';

create trigger events_append_only
    before update or delete on booking_guard.events
    for each row execute function booking_guard.events_append_only();

-- PL/pgSQL, not SQL: an SQL function with a SET clause is never inlined and is planned again
-- in every transaction (about 50 us an event here); PL/pgSQL keeps the INSERT's plan.
create function booking_guard.log_event(kind text, rule text, entity_type text, entity_id text,
                                        details jsonb default '{}')
returns bigint
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    new_id  bigint;
begin
    insert into booking_guard.events (kind, rule, entity_type, entity_id, details)
    values (log_event.kind, log_event.rule, log_event.entity_type, log_event.entity_id, coalesce(log_event.details, '{}'))
    returning id into new_id;
    return new_id;
end
$$;

comment on function booking_guard.log_event(text, text, text, text, jsonb) is
    'Appends one event to booking_guard.events and returns its id.';

grant select on booking_guard.events to booking_guard_monitor;
