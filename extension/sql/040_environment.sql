-- What booking_guard runs on: shown by the demo and worth pasting into a bug report.

create function booking_guard.environment()
returns table (component text, version text)
language plpython3u
stable
set search_path = pg_catalog, pg_temp
as $python$
@plpython environment.py
return environment(plpy)
$python$;

comment on function booking_guard.environment() is
    'Versions of booking_guard, PostgreSQL, the server''s Python (PL/Python) and pg_cron.';
