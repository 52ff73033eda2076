-- Roles, and the two schemas.
--
-- Roles are cluster-wide and outlive the extension: they are created only when absent and never
-- dropped by DROP EXTENSION (another database of the cluster may use them). What each may do is
-- granted in one place, 900_grants.sql; docs/security.md says why.
--
--   booking_guard_app      the booking path: record_booking(), the circuit breaker, retries
--   booking_guard_monitor  read-only: views, metrics, reports, findings (the exporter's scrapes)
--   booking_guard_serve    what `booking-guard serve` does beyond reading: the alert relay (it can
--                          acknowledge only what it claimed) and the verification loop
--   booking_guard_admin    settings, rules, the review queue, breakers by hand, the jobs; with the
--                          table owner's rights, attach() and detach()
--   booking_guard_owner    owns the SECURITY DEFINER functions; has rights on booking_guard's own
--                          tables only, never on the application's: no code of anyone else's ever
--                          runs with its rights
--   booking_guard_worker   owns nothing; booking_guard writes the application's tables as this role
--                          (the C module switches to it), so that the table owner's triggers,
--                          defaults, CHECKs and policies never run with more than its rights
-- None of them is a superuser, can log in, create roles or databases, replicate or bypass RLS.

do $roles$
declare
    r  text;
begin
    foreach r in array array['booking_guard_app', 'booking_guard_monitor', 'booking_guard_serve', 'booking_guard_admin',
                             'booking_guard_owner', 'booking_guard_worker'] loop
        if not exists (select from pg_catalog.pg_roles where rolname = r) then
            execute format('create role %I nologin nosuperuser nocreatedb nocreaterole noreplication nobypassrls', r);
        end if;
    end loop;
    -- the scheduled monitor's watermark reads when the oldest transaction still writing began
    -- (pg_stat_activity.xact_start of other roles' sessions); no code of anyone else's runs as this role
    if not pg_has_role('booking_guard_owner', 'pg_read_all_stats', 'member') then
        grant pg_read_all_stats to booking_guard_owner;
    end if;
end
$roles$;

comment on schema booking_guard is
    'booking_guard: keeps call booking flags true to the appointment rows. Its functions, views and tables here are the API.';
comment on schema booking_guard_internal is
    'booking_guard''s internals: functions the API and the triggers use, not meant to be called directly.';
