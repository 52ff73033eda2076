-- PostgreSQL does not check function bodies while it runs an extension script: check them here.
begin;
select plan(3);

-- attached, so that the views booking_guard reads the application through exist
set local client_min_messages = warning;
select booking_guard.attach('public.calls', 'public.appointments');

select is_empty($$
    select f.fn::text || ': ' || r.message
      from (select p.oid::regprocedure as fn, null::regclass as relid
              from pg_proc p join pg_language l on l.oid = p.prolang and l.lanname = 'plpgsql'
             where p.pronamespace = 'booking_guard'::regnamespace and p.prorettype <> 'trigger'::regtype
            union
            select distinct on (p.oid) p.oid::regprocedure, t.tgrelid::regclass
              from pg_proc p join pg_trigger t on t.tgfoid = p.oid
                   join pg_language l on l.oid = p.prolang and l.lanname = 'plpgsql'
             where p.pronamespace = 'booking_guard'::regnamespace
            union
            -- run by the C trigger calls_before() on the calls table, not a trigger itself
            select 'booking_guard_internal.calls_rules()'::regprocedure, 'public.calls'::regclass) f
      cross join lateral (select * from plpgsql_check_function_tb(f.fn) where f.relid is null
                          union all
                          select * from plpgsql_check_function_tb(f.fn, f.relid) where f.relid is not null) r
     where r.level = 'error'
$$, 'plpgsql_check finds no error in any PL/pgSQL function');

select is_empty($$
    select p.oid::regprocedure::text from pg_proc p
     where p.pronamespace = 'booking_guard'::regnamespace and p.prorettype = 'trigger'::regtype
       and not exists (select from pg_trigger t where t.tgfoid = p.oid)
       and p.oid <> 'booking_guard_internal.calls_rules()'::regprocedure
$$, 'every trigger function is in use, so plpgsql_check above has checked it against a real table');

create function pg_temp.plpython_errors() returns setof text language plpgsql as $$
declare f regprocedure;
begin
    for f in select p.oid from pg_proc p join pg_language l on l.oid = p.prolang and l.lanname = 'plpython3u'
              where p.pronamespace = 'booking_guard'::regnamespace loop
        begin
            perform plpython3_validator(f);
        exception when others then
            return next f::text || ': ' || sqlerrm;
        end;
    end loop;
end $$;
select is_empty('select * from pg_temp.plpython_errors()', 'every PL/Python body compiles (plpython3_validator)');

select * from finish();
rollback;
