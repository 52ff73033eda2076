-- The isolation specs' database: loaded once by scripts/run-isolation, after the reference
-- application schema (examples/app_schema.sql).
--
-- isolationtester keeps each session's connection for every permutation of a spec, so a
-- permutation cannot start from a new database: its setup block calls fresh_booking_guard(),
-- which empties the application's tables and creates booking_guard anew (its alerts, events,
-- queues, job runs, settings and rules all back to what a new installation has).

create procedure fresh_booking_guard()
language plpgsql
as $$
begin
    set local client_min_messages = warning;
    drop extension if exists booking_guard cascade;
    truncate calls, appointments, customers, services, staff, companies restart identity;
    create extension booking_guard cascade;
    perform booking_guard.attach('public.calls', 'public.appointments');
    -- claims are judged at COMMIT, not after a grace period
    perform booking_guard.set_setting('verification_grace', '0');
    insert into companies (id, name) values (1, 'Acme Dental');
end
$$;

comment on procedure fresh_booking_guard() is
    'Isolation specs: empty application tables and a new booking_guard attached to them, claims judged at COMMIT, company 1.';

-- A gate in front of booking_guard's own writes to calls, for the specs that need a job stopped
-- in the middle of a batch: a write by booking_guard_worker to call N waits while another session
-- holds the advisory lock N (pg_advisory_lock(N)); the isolation tester sees the job waiting, and
-- pg_advisory_unlock(N) lets it go on. With no lock held it lets everything through at once.
-- It is an application trigger, as any application may have one: booking_guard runs it with the
-- worker's rights, like any trigger of the application's tables.
create function wait_at_gate() returns trigger
language plpgsql
as $$
begin
    perform pg_advisory_xact_lock_shared(new.id);
    return new;
end
$$;

comment on function wait_at_gate() is
    'Isolation specs: a write of booking_guard_worker to call N waits while another session holds advisory lock N.';

create trigger wait_at_gate before update on calls
    for each row when (current_user = 'booking_guard_worker') execute function wait_at_gate();
