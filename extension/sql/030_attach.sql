-- Attachment: which application tables booking_guard guards.
--
-- booking_guard never owns the application's tables. attach() checks their shape against
-- required_columns, creates the indexes detection needs when absent, installs the triggers
-- (see the consistency files) and records the pair here; detach() removes the triggers and
-- leaves every row and index alone.

create table booking_guard.required_columns (
    table_role      text not null check (table_role in ('calls', 'appointments')),
    column_name     name not null,
    accepted_types  text[] not null,
    primary key (table_role, column_name)
);

comment on table booking_guard.required_columns is
    'The columns attach() requires on the calls and appointments tables, with the types it accepts (format_type spelling).';

insert into booking_guard.required_columns (table_role, column_name, accepted_types)
select t.table_role, t.column_name, t.accepted_types::text[]
  from (values
    ('calls', 'id', '{integer,bigint}'),
    ('calls', 'retell_call_id', '{text,"character varying"}'),
    ('calls', 'company_id', '{integer,bigint,uuid,text,"character varying"}'),
    ('calls', 'direction', '{text,"character varying"}'),
    ('calls', 'session_outcome', '{text,"character varying"}'),
    ('calls', 'appointment_made', '{boolean}'),
    ('calls', 'appointment_link_status', '{text,"character varying"}'),
    ('calls', 'appointment_linked_at', '{"timestamp with time zone","timestamp without time zone"}'),
    ('calls', 'booking_id', '{text,"character varying"}'),
    ('calls', 'booking_details', '{jsonb}'),
    ('calls', 'booking_confirmed', '{boolean}'),
    ('calls', 'call_successful', '{boolean}'),
    ('calls', 'customer_id', '{integer,bigint}'),
    ('calls', 'customer_link_status', '{text,"character varying"}'),
    ('calls', 'customer_linked_at', '{"timestamp with time zone","timestamp without time zone"}'),
    ('calls', 'customer_link_method', '{text,"character varying"}'),
    ('calls', 'customer_link_confidence', '{numeric}'),
    ('calls', 'created_at', '{"timestamp with time zone","timestamp without time zone"}'),
    ('calls', 'updated_at', '{"timestamp with time zone","timestamp without time zone"}'),
    ('appointments', 'id', '{integer,bigint}'),
    ('appointments', 'call_id', '{integer,bigint}'),
    ('appointments', 'calcom_v2_booking_id', '{text,"character varying"}'),
    ('appointments', 'customer_id', '{integer,bigint}'),
    ('appointments', 'service_id', '{integer,bigint}'),
    ('appointments', 'staff_id', '{integer,bigint}'),
    ('appointments', 'source', '{text,"character varying"}'),
    ('appointments', 'created_at', '{"timestamp with time zone","timestamp without time zone"}'),
    ('appointments', 'updated_at', '{"timestamp with time zone","timestamp without time zone"}')
  ) as t (table_role, column_name, accepted_types);

-- The indexes detection and the triggers read through: (table role, column).
create table booking_guard.required_indexes (
    table_role   text not null check (table_role in ('calls', 'appointments')),
    column_name  name not null,
    why          text not null,
    primary key (table_role, column_name)
);

comment on table booking_guard.required_indexes is
    'The single-column indexes attach() creates when no index leads with that column.';

insert into booking_guard.required_indexes (table_role, column_name, why) values
    ('calls', 'created_at', 'detection windows over recent calls'),
    ('calls', 'booking_id', 'linking orphaned appointments by booking id'),
    ('appointments', 'call_id', 'the truth of a call: its linked appointments'),
    ('appointments', 'calcom_v2_booking_id', 'idempotent record_booking and duplicate detection'),
    ('appointments', 'created_at', 'detection windows over recent appointments');

create table booking_guard.attached_tables (
    singleton           boolean primary key default true check (singleton),
    calls_table         regclass not null,
    appointments_table  regclass not null,
    attached_at         timestamptz not null default now(),
    attached_by         name not null default current_user,
    created_indexes     text[] not null default '{}'
);

comment on table booking_guard.attached_tables is
    'The one attached (calls, appointments) pair; read it through the attachment view.';

select pg_catalog.pg_extension_config_dump('booking_guard.attached_tables', '');

create view booking_guard.attachment as
select a.calls_table,
       a.appointments_table,
       a.attached_at,
       a.attached_by,
       a.created_indexes,
       coalesce((select array_agg(format('%s on %s', t.tgname, t.tgrelid::regclass) order by t.tgname)
                   from pg_catalog.pg_trigger t
                  where t.tgrelid in (a.calls_table, a.appointments_table)
                    and t.tgname like 'booking\_guard\_%'), '{}') as triggers
  from booking_guard.attached_tables a;

comment on view booking_guard.attachment is
    'The attached calls and appointments tables, when and by whom, the indexes attach() created and the triggers installed.';

-- The shape problems of one table, one line each; empty when it fits.
create function booking_guard.attachment_problems(table_role text, tbl regclass)
returns setof text
language sql
stable
set search_path = pg_catalog, pg_temp
as $$
    select case
               when a.attnum is null then format('%s table %s: missing column %s (%s)', table_role, tbl,
                                                 r.column_name, array_to_string(r.accepted_types, ' or '))
               else format('%s table %s: column %s is %s, expected %s', table_role, tbl, r.column_name,
                           format_type(a.atttypid, null), array_to_string(r.accepted_types, ' or '))
           end
      from booking_guard.required_columns r
      left join pg_catalog.pg_attribute a
             on a.attrelid = tbl and a.attname = r.column_name and a.attnum > 0 and not a.attisdropped
     where r.table_role = attachment_problems.table_role
       and (a.attnum is null or not format_type(a.atttypid, null) = any (r.accepted_types))
    union all
    select format('%s table %s: column id is not a primary key or unique', table_role, tbl)
     where attachment_problems.table_role = 'calls'
       and exists (select from pg_catalog.pg_attribute where attrelid = tbl and attname = 'id' and not attisdropped)
       and not exists (
               select from pg_catalog.pg_index i
                 join pg_catalog.pg_attribute a on a.attrelid = i.indrelid and a.attnum = i.indkey[0]
                where i.indrelid = tbl and i.indisunique and i.indnkeyatts = 1 and a.attname = 'id')
$$;

comment on function booking_guard.attachment_problems(text, regclass) is
    'What keeps a table from being attached in a role (calls or appointments): one line per missing or mistyped column.';

create function booking_guard.attach(calls regclass, appointments regclass)
returns setof booking_guard.attachment
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    current   booking_guard.attached_tables;
    problems  text[];
    created   text[] := '{}';
    ix        record;
    ix_name   text;
begin
    if calls is null or appointments is null then
        raise exception 'attach() needs both tables'
            using errcode = 'BG005',
                  detail = format('calls: %s, appointments: %s', coalesce(calls::text, 'null'), coalesce(appointments::text, 'null')),
                  hint = 'select booking_guard.attach(''public.calls'', ''public.appointments'');';
    end if;

    select * into current from booking_guard.attached_tables for update;
    if found then
        if current.calls_table = calls and current.appointments_table = appointments then
            raise notice 'booking_guard is already attached to % and %', calls, appointments;
            return query select * from booking_guard.attachment;
            return;
        end if;
        raise exception 'booking_guard is already attached to other tables'
            using errcode = 'BG003',
                  detail = format('Attached: calls %s, appointments %s. Asked: calls %s, appointments %s.',
                                  current.calls_table, current.appointments_table, calls, appointments),
                  hint = 'Run select booking_guard.detach(); first.';
    end if;

    select array_agg(p) into problems
      from (select p from booking_guard.attachment_problems('calls', calls) p
            union all
            select p from booking_guard.attachment_problems('appointments', appointments) p) s;
    if calls = appointments then
        problems := array_prepend(format('the same table %s was given for calls and appointments', calls), problems);
    end if;
    if exists (select from pg_catalog.pg_class where oid in (calls, appointments) and relkind not in ('r', 'p')) then
        problems := array_prepend('calls and appointments must be tables (not views or foreign tables)', problems);
    end if;
    if problems is not null then
        raise exception 'cannot attach booking_guard to % and %: % problem(s)', calls, appointments, cardinality(problems)
            using errcode = 'BG003',
                  detail = array_to_string(problems, E'\n'),
                  hint = 'The tables need the columns of examples/app_schema.sql (calls and appointments); see booking_guard.required_columns.';
    end if;

    for ix in
        select r.table_role, r.column_name, case r.table_role when 'calls' then calls else appointments end as tbl
          from booking_guard.required_indexes r
         order by r.table_role desc, r.column_name
    loop
        continue when exists (
            select from pg_catalog.pg_index i
              join pg_catalog.pg_attribute a on a.attrelid = i.indrelid and a.attnum = i.indkey[0]
             where i.indrelid = ix.tbl and a.attname = ix.column_name and i.indisvalid and i.indpred is null);
        ix_name := left(format('%s_%s_bg_idx', (select relname from pg_catalog.pg_class where oid = ix.tbl), ix.column_name), 63);
        execute format('create index %I on %s (%I)', ix_name, ix.tbl, ix.column_name);
        created := created || format('%I.%I', (select nspname from pg_catalog.pg_namespace n
                                                  join pg_catalog.pg_class c on c.relnamespace = n.oid
                                                 where c.oid = ix.tbl), ix_name);
    end loop;

    insert into booking_guard.attached_tables (calls_table, appointments_table, created_indexes)
    values (calls, appointments, created);
    perform booking_guard.create_guarded_views(calls, appointments);
    perform booking_guard.install_triggers(calls, appointments);
    return query select * from booking_guard.attachment;
end
$$;

comment on function booking_guard.attach(regclass, regclass) is
    'Guards the given calls and appointments tables: checks their columns (BG003 lists every problem), creates missing indexes, installs the triggers, records the attachment.';

create function booking_guard.detach()
returns void
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    current  booking_guard.attached_tables;
    trg      record;
begin
    select * into current from booking_guard.attached_tables for update;
    if not found then
        raise notice 'booking_guard is not attached';
        return;
    end if;
    for trg in
        select t.tgname, t.tgrelid::regclass as tbl
          from pg_catalog.pg_trigger t
         where t.tgrelid in (current.calls_table, current.appointments_table)
           and t.tgname like 'booking\_guard\_%'
    loop
        execute format('drop trigger %I on %s', trg.tgname, trg.tbl);
    end loop;
    drop view if exists booking_guard.guarded_calls, booking_guard.guarded_appointments;
    delete from booking_guard.attached_tables;
end
$$;

comment on function booking_guard.detach() is
    'Removes booking_guard''s triggers and views of the attached tables and forgets the attachment; data and indexes stay.';

-- booking_guard reads and writes the application's tables through two views with fixed
-- names, so that its functions use static SQL (planned once per session and cached)
-- instead of EXECUTE with a table name (parsed and planned on every row of every booking).
-- They are simple, hence auto-updatable, views over the required columns only; while they
-- exist PostgreSQL refuses to drop or retype a column booking_guard relies on.
create function booking_guard.create_guarded_views(calls regclass, appointments regclass)
returns void
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
    drop view if exists booking_guard.guarded_calls, booking_guard.guarded_appointments;
    execute format('create view booking_guard.guarded_calls as select %s from %s',
                   (select string_agg(quote_ident(column_name), ', ' order by column_name)
                      from booking_guard.required_columns where table_role = 'calls'), calls);
    execute format('create view booking_guard.guarded_appointments as select %s from %s',
                   (select string_agg(quote_ident(column_name), ', ' order by column_name)
                      from booking_guard.required_columns where table_role = 'appointments'), appointments);
    comment on view booking_guard.guarded_calls is
        'The attached calls table, as booking_guard reads and writes it (created by attach()).';
    comment on view booking_guard.guarded_appointments is
        'The attached appointments table, as booking_guard reads and writes it (created by attach()).';
end
$$;

comment on function booking_guard.create_guarded_views(regclass, regclass) is
    'Creates the views guarded_calls and guarded_appointments over the attached tables (used by attach()).';

-- The attached pair, or BG003: every function that reads the application tables starts here.
create function booking_guard.attached()
returns booking_guard.attached_tables
language plpgsql
stable
set search_path = pg_catalog, pg_temp
as $$
declare
    current  booking_guard.attached_tables;
begin
    select * into current from booking_guard.attached_tables;
    if not found then
        raise exception 'booking_guard is not attached'
            using errcode = 'BG003',
                  detail = 'No calls and appointments tables have been attached in this database.',
                  hint = 'select booking_guard.attach(''public.calls'', ''public.appointments'');';
    end if;
    return current;
end
$$;

comment on function booking_guard.attached() is
    'The attached tables; raises BG003 when booking_guard is not attached.';
