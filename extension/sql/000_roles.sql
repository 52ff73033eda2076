-- Roles and shared plumbing.
--
-- Roles are cluster-wide and outlive the extension: they are created only when absent and
-- never dropped by DROP EXTENSION (another database of the cluster may use them).

do $roles$
begin
    if not exists (select from pg_catalog.pg_roles where rolname = 'booking_guard_app') then
        create role booking_guard_app nologin;
    end if;
    if not exists (select from pg_catalog.pg_roles where rolname = 'booking_guard_monitor') then
        create role booking_guard_monitor nologin;
    end if;
    if not exists (select from pg_catalog.pg_roles where rolname = 'booking_guard_admin') then
        create role booking_guard_admin nologin;
    end if;
end
$roles$;

comment on schema booking_guard is
    'booking_guard: keeps call booking flags true to the appointment rows';

-- Seeded configuration tables (settings, rules, ...) are dumped by pg_dump and restored with
-- COPY after CREATE EXTENSION has seeded them again. A restored row would then collide with
-- its freshly seeded twin; this trigger lets the restored (user's) row replace the seed.
create function booking_guard.replace_seeded_row()
returns trigger
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    key_column text := tg_argv[0];
begin
    execute format('delete from %I.%I where %I::text = $1', tg_table_schema, tg_table_name, key_column)
        using to_jsonb(new) ->> key_column;
    return new;
end
$$;

comment on function booking_guard.replace_seeded_row() is
    'Trigger: an INSERT of an existing key replaces the row, so that pg_restore of a seeded config table keeps the dumped values';
