-- Attachment: which application tables booking_guard guards.
--
-- booking_guard never owns the application's tables. attach() checks their shape against
-- required_columns, creates the indexes detection needs when absent, grants booking_guard_worker
-- and booking_guard_monitor the columns they read (and the worker the columns it writes), installs
-- the triggers and records the pair; detach() undoes all of that and leaves every row and index
-- alone. Both run with the caller's rights: creating triggers and indexes and granting on a table is
-- for its owner, so the caller must own the tables (or be a superuser).
--
-- While attached, DDL that would break the attachment (renaming, dropping or retyping a column
-- booking_guard reads, disabling or dropping its triggers, dropping its views) is refused with
-- BG003 by the event triggers at the end of this file.

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
create function booking_guard_internal.attachment_problems(table_role text, tbl regclass)
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
    -- id alone unique; a table partitioned by time cannot have that, and its key (id, created_at)
    -- is accepted: the application's ids come from one sequence
    select format('%s table %s: column id is not a primary key or unique%s', table_role, tbl,
                  case when (select c.relkind from pg_catalog.pg_class c where c.oid = tbl) = 'p'
                       then ' (nor part of a unique key)' else '' end)
     where attachment_problems.table_role = 'calls'
       and exists (select from pg_catalog.pg_attribute where attrelid = tbl and attname = 'id' and not attisdropped)
       and not exists (
               select from pg_catalog.pg_index i
                 join pg_catalog.pg_attribute a on a.attrelid = i.indrelid
                where i.indrelid = tbl and i.indisunique and i.indpred is null and a.attname = 'id'
                  and (a.attnum = i.indkey[0] and i.indnkeyatts = 1
                       or ((select c.relkind from pg_catalog.pg_class c where c.oid = tbl) = 'p'
                           and a.attnum = any (i.indkey::int2[]))))
$$;

comment on function booking_guard_internal.attachment_problems(text, regclass) is
    'What keeps a table from being attached in a role (calls or appointments): one line per missing or mistyped column.';

-- What is wrong with the current attachment, one line each: the shape of both tables, and
-- booking_guard's triggers and views, present and enabled. Empty when all is well.
create function booking_guard_internal.attachment_health(a booking_guard.attached_tables)
returns setof text
language sql
stable
set search_path = pg_catalog, pg_temp
as $$
    select p from booking_guard_internal.attachment_problems('calls', a.calls_table) p
    union all
    select p from booking_guard_internal.attachment_problems('appointments', a.appointments_table) p
    union all
    select format('trigger %s on %s is %s', t.name, t.tbl, case when g.tgenabled = 'D' then 'disabled' else 'missing' end)
      from (values ('booking_guard_calls_before', a.calls_table), ('booking_guard_calls_truth_insert', a.calls_table),
                   ('booking_guard_calls_truth_update', a.calls_table),
                   ('booking_guard_appointments_sync', a.appointments_table),
                   ('booking_guard_appointments_truth', a.appointments_table)) t (name, tbl)
      left join pg_catalog.pg_trigger g on g.tgrelid = t.tbl and g.tgname = t.name
     where g.oid is null or g.tgenabled = 'D'
    union all
    select format('view booking_guard_internal.%s is missing', v.name)
      from (values ('guarded_calls'), ('guarded_appointments')) v (name)
     where to_regclass('booking_guard_internal.' || v.name) is null
$$;

comment on function booking_guard_internal.attachment_health(booking_guard.attached_tables) is
    'What is wrong with an attachment: the tables'' shape, booking_guard''s triggers (present and enabled) and views; empty when all is well.';

-- PostgreSQL cuts identifiers at 63 bytes, not characters: a name built from a long or multibyte
-- table name is cut here, on a character boundary, so that the column and suffix survive and two
-- indexes of one table never get the same name.
create function booking_guard_internal.index_name(tbl regclass, column_name name)
returns name
language plpgsql
stable
set search_path = pg_catalog, pg_temp
as $$
declare
    suffix  text := format('_%s_bg_idx', column_name);
    base    text := (select c.relname from pg_catalog.pg_class c where c.oid = tbl);
    nsp     oid := (select c.relnamespace from pg_catalog.pg_class c where c.oid = tbl);
    result  text;
    n       integer := 0;
begin
    loop
        result := base || suffix || case when n > 0 then n::text else '' end;
        while octet_length(result) > 63 loop
            base := left(base, -1);
            result := base || suffix || case when n > 0 then n::text else '' end;
        end loop;
        exit when not exists (select from pg_catalog.pg_class c where c.relname = result and c.relnamespace = nsp);
        n := n + 1;
    end loop;
    return result;
end
$$;

comment on function booking_guard_internal.index_name(regclass, name) is
    'A name of at most 63 bytes, unused in the table''s schema, for the index attach() creates on one column.';

-- Superuser, or a member of the role that owns the table: what CREATE TRIGGER and CREATE INDEX need.
create function booking_guard_internal.check_owner(what text, tbl regclass)
returns void
language plpgsql
stable
set search_path = pg_catalog, pg_temp
as $$
declare
    owner  regrole := (select c.relowner::regrole from pg_catalog.pg_class c where c.oid = tbl);
begin
    if not pg_has_role(current_user, owner, 'USAGE')
       and not coalesce((select r.rolsuper from pg_catalog.pg_roles r where r.rolname = current_user), false) then
        raise exception '%() must be run by the owner of %', what, tbl
            using errcode = 'BG003',
                  detail = format('%s is owned by %s; %s installs triggers and indexes on it and grants on its columns, '
                                  'which only its owner (or a superuser) may do. You are %s.', tbl, owner, what, current_user),
                  hint = format('Run it as %s (grant it booking_guard_admin), or as a superuser.', owner);
    end if;
end
$$;

comment on function booking_guard_internal.check_owner(text, regclass) is
    'BG003 unless the current user owns the table (is a member of its owner role) or is a superuser.';

-- Every session reads the attachment again once this transaction commits (the C module keeps it).
create function booking_guard_internal.attachment_changed()
returns void
language c
as 'MODULE_PATHNAME', 'attachment_changed';

comment on function booking_guard_internal.attachment_changed() is
    'Tells every session (from its next transaction) that the attachment changed: the C module reads it again.';

-- The pair as it stands, locked for the rest of the transaction; null when not attached.
create function booking_guard_internal.attachment_lock()
returns booking_guard.attached_tables
language sql
security definer
set search_path = pg_catalog, pg_temp
as $$
    select a.* from booking_guard.attached_tables a for update
$$;

comment on function booking_guard_internal.attachment_lock() is
    'The attached pair (null when none), row-locked: attach() and detach() of concurrent sessions run one after the other.';

create function booking_guard_internal.attachment_record(calls regclass, appointments regclass, created text[])
returns void
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    insert into booking_guard.attached_tables (calls_table, appointments_table, created_indexes, attached_by)
    values (calls, appointments, created, session_user);
    perform booking_guard_internal.create_guarded_views(calls, appointments);
    perform booking_guard_internal.attachment_changed();
end
$$;

comment on function booking_guard_internal.attachment_record(regclass, regclass, text[]) is
    'attach(): records the pair and creates the guarded views (owned by booking_guard_owner, in schema booking_guard).';

create function booking_guard_internal.attachment_forget()
returns void
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    -- the attachment goes first: the DDL guard then lets the views and triggers go
    delete from booking_guard.attached_tables;
    drop view if exists booking_guard_internal.guarded_calls, booking_guard_internal.guarded_appointments;
    perform booking_guard_internal.attachment_changed();
end
$$;

comment on function booking_guard_internal.attachment_forget() is
    'detach(): forgets the pair and drops the guarded views.';

-- booking_guard reads and writes the application's tables through two views with fixed names, so
-- that its functions use static SQL (planned once per session and cached) instead of EXECUTE with
-- a table name. They live in booking_guard_internal, a schema of the extension: DROP EXTENSION
-- ... CASCADE takes them with it. They are simple, hence auto-updatable, views over the required columns only, and
-- security_invoker: whoever reads or writes through them needs the rights on the table itself, so
-- that the views never lend their owner's rights to anyone.
create function booking_guard_internal.create_guarded_views(calls regclass, appointments regclass)
returns void
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    if to_regclass('booking_guard_internal.guarded_calls') is not null
       or to_regclass('booking_guard_internal.guarded_appointments') is not null then
        drop view if exists booking_guard_internal.guarded_calls, booking_guard_internal.guarded_appointments;
    end if;
    execute format('create view booking_guard_internal.guarded_calls with (security_invoker = true) as select %s from %s',
                   (select string_agg(quote_ident(column_name), ', ' order by column_name)
                      from booking_guard.required_columns where table_role = 'calls'), calls);
    execute format('create view booking_guard_internal.guarded_appointments with (security_invoker = true) as select %s from %s',
                   (select string_agg(quote_ident(column_name), ', ' order by column_name)
                      from booking_guard.required_columns where table_role = 'appointments'), appointments);
    comment on view booking_guard_internal.guarded_calls is
        'The attached calls table, as booking_guard reads and writes it (created by attach()).';
    comment on view booking_guard_internal.guarded_appointments is
        'The attached appointments table, as booking_guard reads and writes it (created by attach()).';
    grant select, update on booking_guard_internal.guarded_calls, booking_guard_internal.guarded_appointments
       to booking_guard_worker, booking_guard_app;
    grant select on booking_guard_internal.guarded_calls, booking_guard_internal.guarded_appointments to booking_guard_monitor;
end
$$;

comment on function booking_guard_internal.create_guarded_views(regclass, regclass) is
    'Creates the views guarded_calls and guarded_appointments (security_invoker) over the attached tables.';

-- The columns booking_guard_worker and booking_guard_monitor get on the application's tables.
create function booking_guard_internal.grant_columns(calls regclass, appointments regclass, granting boolean)
returns void
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    t    record;
    nsp  regnamespace;
begin
    -- the tables' schemas, when the caller may grant on them (its own, or a superuser's call);
    -- otherwise they must already be usable, and the error says which GRANT is missing
    for nsp in select distinct c.relnamespace::regnamespace from pg_catalog.pg_class c where c.oid in (calls, appointments) loop
        -- booking_guard_owner creates the guarded views there (it has no right on the tables themselves)
        continue when not granting
                   or (has_schema_privilege('booking_guard_worker', nsp, 'usage')
                       and has_schema_privilege('booking_guard_monitor', nsp, 'usage')
                       and has_schema_privilege('booking_guard_owner', nsp, 'usage'));
        if pg_has_role(current_user, (select n.nspowner from pg_catalog.pg_namespace n where n.oid = nsp), 'USAGE')
           or coalesce((select r.rolsuper from pg_catalog.pg_roles r where r.rolname = current_user), false) then
            execute format('grant usage on schema %s to booking_guard_worker, booking_guard_monitor, booking_guard_owner', nsp);
        else
            raise exception 'booking_guard''s roles cannot use schema %', nsp
                using errcode = 'BG003',
                      detail = format('booking_guard reads the attached tables in %s, and %s may not grant its roles the '
                                      'use of that schema.', nsp, current_user),
                      hint = format('As the owner of schema %s: grant usage on schema %s to booking_guard_worker, '
                                    'booking_guard_monitor, booking_guard_owner;', nsp, nsp);
        end if;
    end loop;
    for t in
        select r.table_role, case r.table_role when 'calls' then calls else appointments end as tbl,
               string_agg(quote_ident(r.column_name), ', ' order by r.column_name) as readable,
               string_agg(quote_ident(r.column_name), ', ' order by r.column_name) filter (where r.written) as writable
          from booking_guard.required_columns r
         group by r.table_role
    loop
        if granting then
            execute format('grant select (%s) on %s to booking_guard_worker, booking_guard_monitor', t.readable, t.tbl);
            execute format('grant update (%s) on %s to booking_guard_worker', t.writable, t.tbl);
        else
            -- revoking on the table revokes on each of its columns too
            execute format('revoke all on %s from booking_guard_worker, booking_guard_monitor', t.tbl);
        end if;
    end loop;
end
$$;

comment on function booking_guard_internal.grant_columns(regclass, regclass, boolean) is
    'Grants (or revokes) booking_guard_worker and booking_guard_monitor the required columns they read, and the worker the columns it writes (required_columns.written); grants them the use of the tables'' schemas when the caller may.';

create function booking_guard_internal.install_triggers(calls regclass, appointments regclass)
returns void
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
    execute format('create trigger booking_guard_calls_before before insert or update on %s
                    for each row execute function booking_guard_internal.calls_before()', calls);
    execute format('create constraint trigger booking_guard_calls_truth_insert after insert on %s
                    deferrable initially deferred for each row
                    when (booking_guard_internal.claim_check_needed(new.id))
                    execute function booking_guard_internal.calls_truth_check()', calls);
    execute format('create constraint trigger booking_guard_calls_truth_update after update on %s
                    deferrable initially deferred for each row
                    when (booking_guard_internal.claim_check_needed(new.id))
                    execute function booking_guard_internal.calls_truth_check()', calls);
    execute format('create trigger booking_guard_appointments_sync after delete or update of call_id on %s
                    for each row execute function booking_guard_internal.appointments_sync()', appointments);
    execute format('create constraint trigger booking_guard_appointments_truth after insert or delete or update of call_id on %s
                    deferrable initially deferred for each row
                    when (booking_guard_internal.commit_check_possible())
                    execute function booking_guard_internal.appointments_truth_check()', appointments);
end
$$;

comment on function booking_guard_internal.install_triggers(regclass, regclass) is
    'Creates booking_guard''s triggers on the attached tables (attach()).';

-- booking_guard's triggers on any table: those whose function lives in booking_guard_internal,
-- whether an attachment records them or not (after a partial restore, none does).
create function booking_guard_internal.drop_triggers(only_on regclass[] default null)
returns integer
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    t  record;
    n  integer := 0;
begin
    for t in
        select g.tgname, g.tgrelid::regclass as tbl
          from pg_catalog.pg_trigger g
          join pg_catalog.pg_proc p on p.oid = g.tgfoid
         where p.pronamespace = 'booking_guard_internal'::regnamespace
           and g.tgname like 'booking\_guard\_%'
           and (only_on is null or g.tgrelid = any (only_on))
         order by 2, 1
    loop
        perform booking_guard_internal.check_owner('detach', t.tbl);
        execute format('drop trigger %I on %s', t.tgname, t.tbl);
        n := n + 1;
    end loop;
    return n;
end
$$;

comment on function booking_guard_internal.drop_triggers(regclass[]) is
    'Drops booking_guard''s triggers (functions in booking_guard_internal) from the given tables, or from every table; returns how many.';

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
    ix_name   name;
    max_id    bigint;
begin
    if calls is null or appointments is null then
        raise exception 'attach() needs both tables'
            using errcode = 'BG005',
                  detail = format('calls: %s, appointments: %s', coalesce(calls::text, 'null'), coalesce(appointments::text, 'null')),
                  hint = 'select booking_guard.attach(''public.calls'', ''public.appointments'');';
    end if;

    current := booking_guard_internal.attachment_lock();
    if current.calls_table is not null then
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
      from (select p from booking_guard_internal.attachment_problems('calls', calls) p
            union all
            select p from booking_guard_internal.attachment_problems('appointments', appointments) p) s;
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
    perform booking_guard_internal.check_owner('attach', calls);
    perform booking_guard_internal.check_owner('attach', appointments);

    for ix in
        select r.table_role, r.column_name, case r.table_role when 'calls' then calls else appointments end as tbl
          from booking_guard.required_indexes r
         order by r.table_role desc, r.column_name
    loop
        continue when exists (
            select from pg_catalog.pg_index i
              join pg_catalog.pg_attribute a on a.attrelid = i.indrelid and a.attnum = i.indkey[0]
             where i.indrelid = ix.tbl and a.attname = ix.column_name and i.indisvalid and i.indpred is null);
        ix_name := booking_guard_internal.index_name(ix.tbl, ix.column_name);
        execute format('create index %I on %s (%I)', ix_name, ix.tbl, ix.column_name);
        created := created || format('%I.%I', (select n.nspname from pg_catalog.pg_namespace n
                                                  join pg_catalog.pg_class c on c.relnamespace = n.oid
                                                 where c.oid = ix.tbl), ix_name);
    end loop;

    perform booking_guard_internal.grant_columns(calls, appointments, true);
    -- triggers left by an earlier attachment (a partial restore brings them back without it) are
    -- booking_guard's own: replaced, not a reason to fail
    perform booking_guard_internal.drop_triggers(array[calls, appointments]);
    perform booking_guard_internal.attachment_record(calls, appointments, created);
    -- bookings are counted from here on (the metrics count appointment rows; earlier ones are history)
    execute format('select max(id)::bigint from %s', appointments) into max_id;
    perform booking_guard_internal.count_bookings_from(max_id);
    perform booking_guard_internal.install_triggers(calls, appointments);
    if booking_guard_internal.subscribed_tables() is not null then
        raise warning 'booking_guard is attached to tables a logical replication subscription writes: %',
                      booking_guard_internal.subscribed_tables()
            using detail = 'The publisher''s booking_guard judges and repairs these rows; here the jobs do nothing, and the '
                           'triggers do not fire for replicated rows (unless enabled ALWAYS or REPLICA, which would alert twice).',
                  hint = 'Attach booking_guard on the publisher. Leave booking_guard''s triggers enabled as they are here.';
    end if;
    return query select * from booking_guard.attachment;
end
$$;

comment on function booking_guard.attach(regclass, regclass) is
    'Guards the given calls and appointments tables: checks their columns (BG003 lists every problem), creates missing indexes, grants booking_guard''s roles the columns they use, installs the triggers, records the attachment. Run it as the tables'' owner.';

create function booking_guard.detach()
returns void
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    current  booking_guard.attached_tables := booking_guard_internal.attachment_lock();
    n        integer;
begin
    if current.calls_table is null then
        -- nothing recorded, but a partial restore may have brought booking_guard's triggers back
        n := booking_guard_internal.drop_triggers();
        if n > 0 then
            raise notice 'booking_guard was not attached; dropped % leftover trigger(s)', n;
        else
            raise notice 'booking_guard is not attached';
        end if;
        return;
    end if;
    perform booking_guard_internal.check_owner('detach', current.calls_table);
    perform booking_guard_internal.check_owner('detach', current.appointments_table);
    perform booking_guard_internal.attachment_forget();
    perform booking_guard_internal.drop_triggers(array[current.calls_table, current.appointments_table]);
    perform booking_guard_internal.grant_columns(current.calls_table, current.appointments_table, false);
end
$$;

comment on function booking_guard.detach() is
    'Removes booking_guard''s triggers, views and grants from the attached tables and forgets the attachment; data and indexes stay. Without an attachment, drops booking_guard triggers left on any table (after a partial restore). Run it as the tables'' owner.';

-- The attached pair, or BG003: every function that reads the application tables starts here.
create function booking_guard_internal.attached()
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

comment on function booking_guard_internal.attached() is
    'The attached tables; raises BG003 when booking_guard is not attached.';

-- The DDL guard. A DDL command that leaves the attachment less healthy than it found it is refused:
-- its transaction aborts. At the start of every DDL command (while attached) it notes what is
-- already wrong; at the end it refuses only what the command broke, so that a restore, which adds
-- the tables' keys and triggers after their rows, or a repair of a broken attachment, goes through.
-- It runs as booking_guard_owner (it reads only the catalogs and booking_guard's own tables) and
-- costs one lookup while nothing is attached.
create function booking_guard_internal.guard_ddl_start()
returns event_trigger
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    a  booking_guard.attached_tables;
begin
    select * into a from booking_guard.attached_tables;
    if found then
        perform set_config('booking_guard.ddl_health_before',
                           coalesce((select to_jsonb(array_agg(h)) from booking_guard_internal.attachment_health(a) h),
                                    '[]')::text, true);
    end if;
end
$$;

comment on function booking_guard_internal.guard_ddl_start() is
    'Event trigger at the start of a DDL command: notes what is already wrong with the attachment, so that the end refuses only what the command broke.';

create function booking_guard_internal.guard_ddl()
returns event_trigger
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    a          booking_guard.attached_tables;
    problems   text[];
    before     jsonb;
begin
    select * into a from booking_guard.attached_tables;
    if not found then
        return;
    end if;
    if tg_event = 'sql_drop' then
        select array_agg(format('%s %s was dropped', d.object_type, d.object_identity) order by d.object_identity)
          into problems
          from pg_catalog.pg_event_trigger_dropped_objects() d
         where (d.classid = 'pg_catalog.pg_class'::regclass
                and (d.objid in (a.calls_table, a.appointments_table)
                     or d.object_identity in ('booking_guard_internal.guarded_calls', 'booking_guard_internal.guarded_appointments'))
                and (d.objsubid = 0
                     or d.address_names[3] in (select r.column_name from booking_guard.required_columns r)))
            or (d.object_type = 'trigger' and d.object_identity like 'booking\_guard\_%');
    elsif exists (select from pg_catalog.pg_event_trigger_ddl_commands() c
                   where c.classid = 'pg_catalog.pg_class'::regclass and c.objid in (a.calls_table, a.appointments_table)) then
        before := coalesce(nullif(current_setting('booking_guard.ddl_health_before', true), ''), '[]')::jsonb;
        select array_agg(h) into problems
          from booking_guard_internal.attachment_health(a) h
         where not before ? h;
    end if;
    if problems is not null then
        raise exception 'this change would break booking_guard''s attachment to % and %', a.calls_table, a.appointments_table
            using errcode = 'BG003',
                  detail = array_to_string(problems, E'\n'),
                  hint = format('booking_guard reads and writes these columns, triggers and views on every booking. To change '
                                'them, run select booking_guard.detach(); first, then select booking_guard.attach(%L, %L); '
                                'again once the tables fit.', a.calls_table, a.appointments_table);
    end if;
end
$$;

comment on function booking_guard_internal.guard_ddl() is
    'Event trigger: refuses (BG003) a DDL command that breaks the attachment: a required column renamed, dropped or retyped, a booking_guard trigger disabled or dropped, a guarded view dropped.';

drop event trigger if exists booking_guard_ddl_start;
create event trigger booking_guard_ddl_start on ddl_command_start
    execute function booking_guard_internal.guard_ddl_start();

drop event trigger if exists booking_guard_ddl_end;
create event trigger booking_guard_ddl_end on ddl_command_end
    execute function booking_guard_internal.guard_ddl();

drop event trigger if exists booking_guard_ddl_drop;
create event trigger booking_guard_ddl_drop on sql_drop
    execute function booking_guard_internal.guard_ddl();

-- What DROP EXTENSION cannot do for itself: the pg_cron jobs live in another extension, and the
-- indexes attach() created belong to the application's tables.
create function booking_guard.prepare_drop()
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    current   booking_guard.attached_tables := booking_guard_internal.attachment_lock();
    jobs      integer;
    ix        text;
    dropped   text[] := '{}';
begin
    jobs := booking_guard.unschedule_jobs();
    if current.calls_table is not null then
        perform booking_guard.detach();
        foreach ix in array current.created_indexes loop
            if to_regclass(ix) is not null then
                execute format('drop index %s', ix);
                dropped := dropped || ix;
            end if;
        end loop;
    else
        perform booking_guard.detach();   -- leftover triggers
    end if;
    return jsonb_build_object('unscheduled_jobs', jobs, 'detached', current.calls_table is not null,
                              'dropped_indexes', to_jsonb(dropped));
end
$$;

comment on function booking_guard.prepare_drop() is
    'Before DROP EXTENSION booking_guard: removes its pg_cron jobs, detaches, and drops the indexes attach() created; DROP EXTENSION ... CASCADE then leaves nothing of booking_guard behind. Run it as the tables'' owner.';
