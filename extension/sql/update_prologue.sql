-- The first part of every update script: the code of the version being updated goes, so that this
-- version's code can be created whole (functions, views, types and triggers are code; tables,
-- sequences and their rows are data and stay). booking_guard's triggers on the application's tables
-- and its guarded views go too: the last part of the script puts them back when attached.
-- Nothing outside booking_guard is dropped: if another object depends on its code (a view of yours
-- over detect(), say), the update stops and names it.
do $prologue$
declare
    ext      oid := (select e.oid from pg_catalog.pg_extension e where e.extname = 'booking_guard');
    schemas  oid[] := array(select n.oid from pg_catalog.pg_namespace n
                             where n.nspname in ('booking_guard', 'booking_guard_internal'));
    r        record;
    left_over  text[];
    progress boolean;
begin
    for r in
        select e.evtname from pg_catalog.pg_event_trigger e
          join pg_catalog.pg_depend d on d.classid = 'pg_catalog.pg_event_trigger'::regclass and d.objid = e.oid
         where d.refclassid = 'pg_catalog.pg_extension'::regclass and d.refobjid = ext and d.deptype = 'e'
    loop
        execute format('drop event trigger %I', r.evtname);
    end loop;
    -- every trigger whose function is booking_guard's: on the application's tables and on its own
    for r in
        select t.tgname, t.tgrelid::regclass as tbl
          from pg_catalog.pg_trigger t join pg_catalog.pg_proc p on p.oid = t.tgfoid
         where p.pronamespace = any (schemas) and not t.tgisinternal
    loop
        execute format('drop trigger %I on %s', r.tgname, r.tbl);
    end loop;
    -- the guarded views: in booking_guard up to 0.1.0, in booking_guard_internal since
    for r in
        select c.oid::regclass as view
          from pg_catalog.pg_class c
         where c.relnamespace = any (schemas) and c.relname in ('guarded_calls', 'guarded_appointments')
    loop
        execute format('drop view %s', r.view);
    end loop;
    -- views, routines and types of the extension, in dependency order: what others of them still
    -- depend on is tried again after those are gone
    loop
        progress := false;
        left_over := '{}';
        for r in
            select format('drop view %s', c.oid::regclass) as ddl
              from pg_catalog.pg_class c
              join pg_catalog.pg_depend d on d.classid = 'pg_catalog.pg_class'::regclass and d.objid = c.oid
             where c.relkind = 'v' and d.refobjid = ext and d.deptype = 'e'
            union all
            select format('drop routine %s', p.oid::regprocedure)
              from pg_catalog.pg_proc p
              join pg_catalog.pg_depend d on d.classid = 'pg_catalog.pg_proc'::regclass and d.objid = p.oid
             where d.refobjid = ext and d.deptype = 'e'
            union all
            select format('drop type %s', t.oid::regtype)
              from pg_catalog.pg_type t
              join pg_catalog.pg_depend d on d.classid = 'pg_catalog.pg_type'::regclass and d.objid = t.oid
             where d.refobjid = ext and d.deptype = 'e'
               and (t.typtype <> 'c' or (select c.relkind from pg_catalog.pg_class c where c.oid = t.typrelid) = 'c')
        loop
            begin
                execute r.ddl;
                progress := true;
            exception when dependent_objects_still_exist then
                left_over := left_over || r.ddl;
            end;
        end loop;
        exit when cardinality(left_over) = 0;
        if not progress then
            raise exception 'cannot update booking_guard: other objects depend on its code'
                using errcode = 'BG003',
                      detail = format('Still needed by objects outside booking_guard: %s.', array_to_string(left_over, '; ')),
                      hint = 'Drop those objects (or their dependency on booking_guard), update, and create them again.';
        end if;
    end loop;
end
$prologue$;
