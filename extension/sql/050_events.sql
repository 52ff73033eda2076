-- The events log (table booking_guard.events): a record of what booking_guard did (corrections,
-- rollbacks, verdicts, validations). Reports, KPIs and metrics read it.

-- Events are history: nobody rewrites them, and only the purge (retention, as booking_guard_owner)
-- deletes them, not even a superuser by hand.
create function booking_guard_internal.events_append_only()
returns trigger
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
    if tg_op = 'DELETE' and current_user = 'booking_guard_owner' then
        return old;
    end if;
    raise exception 'booking_guard.events is append-only'
        using errcode = 'BG005',
              detail = format('%s of event rows is not allowed.', tg_op),
              hint = 'Events are history: booking_guard appends new ones; the purge job removes those past their retention.';
end
$$;

comment on function booking_guard_internal.events_append_only() is
    'Trigger: rejects UPDATE and DELETE on booking_guard.events, except the purge''s DELETE (as booking_guard_owner).';

create trigger events_append_only
    before update or delete on booking_guard.events
    for each row execute function booking_guard_internal.events_append_only();

-- PL/pgSQL, not SQL: an SQL function with a SET clause is never inlined and is planned again
-- in every transaction (about 50 us an event here); PL/pgSQL keeps the INSERT's plan.
create function booking_guard_internal.log_event(kind text, rule text, entity_type text, entity_id text,
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

comment on function booking_guard_internal.log_event(text, text, text, text, jsonb) is
    'Appends one event to booking_guard.events and returns its id.';
