-- Jobs: the periodic work (table booking_guard.jobs), run step by step, and pg_cron scheduling.
--
-- A job runs as three kinds of call, each returning its state (jsonb, "done" when nothing is left):
--   job_begin(job, args)  takes the job's lease in job_runs: one run of a job at a time, held by a
--                         live backend (a run whose backend died is taken over), never an advisory
--                         key another role could hold; a run that finds the lease held is recorded
--                         as skipped, never as a success
--   job_step(state)       one batch of the job's work, as booking_guard_worker
--   job_end(state)        records the success or failure in job_runs and gives the lease back
-- The C module drives them (run_job() and run_job_steps()): CALL booking_guard.run_job(job), as
-- pg_cron runs it, commits after every step, so no row a job locks stays locked for longer than a
-- batch (job_batch_size); the functions reconcile(), run_monitor() and verify_due() run the same
-- steps in the caller's transaction. pg_cron's own "succeeded" only says the command was
-- dispatched: a stalled schedule shows as a stale last_success_at, which the exporter exports and
-- the monitor job alerts on (job_stalled).

-- The attached tables a logical replication subscription of this database writes, or null.
create function booking_guard_internal.subscribed_tables()
returns text
language sql
stable
set search_path = pg_catalog, pg_temp
as $$
    select string_agg(r.srrelid::regclass::text, ', ' order by r.srrelid::regclass::text)
      from pg_catalog.pg_subscription_rel r
      join booking_guard.attached_tables a on r.srrelid in (a.calls_table, a.appointments_table)
$$;

comment on function booking_guard_internal.subscribed_tables() is
    'The attached tables that a logical replication subscription writes (booking_guard then acts on nothing here), or null.';

create function booking_guard_internal.job_begin(job text, args jsonb)
returns jsonb
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_column
declare
    scheduled  boolean := coalesce((job_begin.args ->> 'scheduled')::boolean, false);
    r          booking_guard.job_runs;
    run_id     bigint;
    started    timestamptz := clock_timestamp();
begin
    if not exists (select from booking_guard.jobs j where j.job = job_begin.job) then
        raise exception 'unknown job "%"', coalesce(left(job_begin.job, 100), 'null')
            using errcode = 'BG004',
                  detail = format('Jobs: %s.', (select string_agg(j.job, ', ' order by j.job) from booking_guard.jobs j)),
                  hint = 'select job, schedule, description from booking_guard.jobs;';
    end if;
    -- On a hot standby nothing can be written; on a logical replication subscriber the rows come from
    -- the publisher, whose booking_guard judges and repairs them: here booking_guard acts on nothing.
    if pg_is_in_recovery() then
        return jsonb_build_object('job', job_begin.job, 'done', true,
                                  'skipped', 'a hot standby: booking_guard acts on nothing here (the primary''s does)');
    end if;
    if booking_guard_internal.subscribed_tables() is not null then
        return jsonb_build_object('job', job_begin.job, 'done', true,
                                  'skipped', format('%s are replicated from a publisher, whose booking_guard acts on them',
                                                    booking_guard_internal.subscribed_tables()));
    end if;
    -- verify_due called as a function (the exporter's loop, every second) shares the due list
    -- with any other run (SKIP LOCKED): it takes no lease and records nothing here
    if job_begin.job = 'verify_due' and not scheduled then
        return jsonb_build_object('job', job_begin.job, 'args', coalesce(job_begin.args, '{}'), 'started', started,
                                  'steps', 0, 'done', false);
    end if;
    -- One run of a job at a time. A run in a caller's transaction holds the job's row lock until
    -- that transaction ends; a scheduled run commits between its steps and holds the lease
    -- (running_pid) instead, which lapses with its backend.
    select * into r from booking_guard.job_runs x where x.job = job_begin.job for update skip locked;
    if not found then
        if not exists (select from booking_guard.job_runs x where x.job = job_begin.job) then
            insert into booking_guard.job_runs as x (job) values (job_begin.job) on conflict (job) do nothing;
            select * into r from booking_guard.job_runs x where x.job = job_begin.job for update skip locked;
        end if;
    end if;
    if r.job is null
       or (r.running_pid is not null and r.running_pid <> pg_backend_pid()
           and exists (select from pg_catalog.pg_stat_activity a where a.pid = r.running_pid)) then
        if scheduled then
            update booking_guard.job_runs x set skips = x.skips + 1, last_skipped_at = started
             where x.job = job_begin.job and r.job is not null;
        end if;
        return jsonb_build_object('job', job_begin.job, 'done', true, 'skipped',
                                  format('another run of %s is in progress', job_begin.job));
    end if;
    if scheduled then
        update booking_guard.job_runs x
           set running_pid = pg_backend_pid(), running_since = started, last_started_at = started
         where x.job = job_begin.job;
    end if;
    if job_begin.job = 'reconcile' then
        insert into booking_guard.reconciliation_runs as x (batch_size)
        values (coalesce((job_begin.args ->> 'batch_size')::integer,
                         (select s.integer_value from booking_guard.settings s where s.name = 'job_batch_size')))
        returning x.id into run_id;
    end if;
    return jsonb_strip_nulls(jsonb_build_object('job', job_begin.job, 'args', coalesce(job_begin.args, '{}'),
                                                'started', started, 'watermark', r.watermark, 'run_id', run_id,
                                                'scheduled', scheduled, 'steps', 0, 'done', false,
                                                -- rows a transaction open now commits later carry its start time
                                                -- (created_at defaults to now()), and are seen by the next run only
                                                -- if its window reaches back to it. Any open transaction of this
                                                -- database counts, not only those holding an xid: one that has not
                                                -- written yet (waiting on the calendar) may write next.
                                                'oldest_writer', case when job_begin.job = 'run_monitor' then
                                                    (select min(a.xact_start) from pg_catalog.pg_stat_activity a
                                                      where a.datname = current_database() and a.xact_start is not null
                                                        and a.pid <> pg_backend_pid())
                                                end));
end
$$;

comment on function booking_guard_internal.job_begin(text, jsonb) is
    'Starts a run of a job: takes its row lock (and, scheduled, its lease) in job_runs and returns the first state; a run that finds another in progress returns done with skipped. verify_due as a function takes neither.';

create function booking_guard_internal.job_step(state jsonb)
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    v_state   text;
    v_msg     text;
    v_detail  text;
    v_hint    text;
begin
    state := jsonb_set(state, '{steps}', to_jsonb(coalesce((state ->> 'steps')::integer, 0) + 1));
    case state ->> 'job'
        when 'run_monitor' then return booking_guard_internal.monitor_step(state);
        when 'verify_due' then return booking_guard_internal.verify_step(state);
        when 'reconcile' then return booking_guard_internal.reconcile_step(state);
        when 'daily_report' then return booking_guard_internal.report_step(state);
        when 'purge' then return booking_guard_internal.purge_step(state);
    end case;
exception when others then
    -- this step's work is undone; the steps before it are kept (committed, under run_job())
    get stacked diagnostics v_state = returned_sqlstate, v_msg = message_text, v_detail = pg_exception_detail,
                            v_hint = pg_exception_hint;
    return state || jsonb_strip_nulls(jsonb_build_object('done', true, 'error', format('%s: %s', v_state, v_msg),
                                                         'error_state', v_state, 'error_message', v_msg,
                                                         'error_detail', nullif(v_detail, ''),
                                                         'error_hint', nullif(v_hint, '')));
end
$$;

comment on function booking_guard_internal.job_step(jsonb) is
    'One step of a job, as booking_guard_worker: dispatches to monitor_step(), verify_step(), reconcile_step(), report_step() or purge_step(); an error ends the run with the error in the state.';

create function booking_guard_internal.job_end(state jsonb)
returns jsonb
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    job       text := state ->> 'job';
    finished  timestamptz := clock_timestamp();
    result    jsonb := state - array['args', 'done'];
begin
    if state ? 'skipped' then
        return result;
    end if;
    result := result || jsonb_build_object('duration_ms',
                  round(extract(epoch from finished - (state ->> 'started')::timestamptz)::numeric * 1000, 1));
    if job = 'reconcile' and state ? 'run_id' then
        result := jsonb_set(result, '{totals}', coalesce(state -> 'totals', '{"calls_scanned": 0, "appointments_scanned": 0}') || jsonb_build_object(
            'run_id', (state ->> 'run_id')::bigint,
            'fixed', coalesce((state -> 'totals' ->> 'fixed')::bigint, 0),
            'duration_ms', result -> 'duration_ms',
            'rows_per_second', round((coalesce((state -> 'totals' ->> 'calls_scanned')::bigint, 0)
                                      + coalesce((state -> 'totals' ->> 'appointments_scanned')::bigint, 0))
                                     / greatest(extract(epoch from finished - (state ->> 'started')::timestamptz), 0.000001))));
        update booking_guard.reconciliation_runs x
           set finished_at = finished, counts = result -> 'totals', error = state ->> 'error'
         where x.id = (state ->> 'run_id')::bigint;
    end if;
    if not coalesce((state ->> 'scheduled')::boolean, false) then
        return result;   -- run as a function: job_runs records the scheduled runs only
    end if;
    if state ? 'error' then
        update booking_guard.job_runs x
           set last_failure_at = finished, last_error = state ->> 'error', failures = x.failures + 1, runs = x.runs + 1,
               running_pid = null, running_since = null
         where x.job = job_end.state ->> 'job';
        raise warning 'booking_guard job % failed: %', job, state ->> 'error';
    else
        update booking_guard.job_runs x
           set last_success_at = finished, runs = x.runs + 1,
               -- the result, with verify_due's verdicts counted rather than listed
               last_result = case when job_end.state ? 'verdicts'
                                  then (result - 'verdicts') || jsonb_build_object(
                                           'judged', jsonb_array_length(result -> 'verdicts'),
                                           'verdicts', (select coalesce(jsonb_object_agg(v.verdict, v.n), '{}')
                                                          from (select e ->> 'verdict' as verdict, count(*) as n
                                                                  from jsonb_array_elements(result -> 'verdicts') e
                                                                 group by 1) v))
                                  else result end,
               watermark = coalesce((job_end.state ->> 'next_watermark')::timestamptz, x.watermark),
               running_pid = null, running_since = null
         where x.job = job_end.state ->> 'job';
    end if;
    return result;
end
$$;

comment on function booking_guard_internal.job_end(jsonb) is
    'Ends a run of a job: records its success (result, watermark) or failure (error) in job_runs, gives the lease back and returns the result.';

-- The functions that run a job in the caller's transaction raise its error, as any function would.
create function booking_guard_internal.job_raise(result jsonb)
returns void
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
    if result ? 'error' then
        raise exception using errcode = result ->> 'error_state', message = result ->> 'error_message',
                              detail = coalesce(result ->> 'error_detail', ''), hint = coalesce(result ->> 'error_hint', '');
    end if;
end
$$;

comment on function booking_guard_internal.job_raise(jsonb) is
    'Raises the error a job''s result carries (with its SQLSTATE, DETAIL and HINT); nothing when it carries none.';

create procedure booking_guard.run_job(job text)
language c
as 'MODULE_PATHNAME', 'run_job';

comment on procedure booking_guard.run_job(text) is
    'Runs one booking_guard job (run_monitor, verify_due, reconcile, daily_report, purge) as booking_guard_worker, as pg_cron does; called with CALL outside a transaction block it commits after each batch. Needs EXECUTE on the job''s function (booking_guard.reconcile() for reconcile, ...).';

create function booking_guard_internal.run_job_steps(job text, args jsonb)
returns jsonb
language c
as 'MODULE_PATHNAME', 'run_job_steps';

comment on function booking_guard_internal.run_job_steps(text, jsonb) is
    'Runs every step of a job in the caller''s transaction, as booking_guard_worker, and returns its result (reconcile(), run_monitor(), verify_due(), store_daily_report()).';

create function booking_guard_internal.job_name(job text)
returns text
language sql
stable
set search_path = pg_catalog, pg_temp
as $$
    select 'booking_guard.' || job || '@' || current_database()
$$;

comment on function booking_guard_internal.job_name(text) is
    'The pg_cron job name of a booking_guard job in this database (stable: scheduling again updates the same job).';

create function booking_guard_internal.job_command(job text)
returns text
language sql
stable
set search_path = pg_catalog, pg_temp
as $fn$
    select format($cmd$do $job$ begin
    if pg_catalog.to_regprocedure('booking_guard.run_job(text)') is not null then
        call booking_guard.run_job(%L);
    elsif pg_catalog.to_regnamespace('cron') is not null then
        perform cron.unschedule(%L);
    end if;
end $job$$cmd$, job, booking_guard_internal.job_name(job))
$fn$;

comment on function booking_guard_internal.job_command(text) is
    'The command pg_cron runs for a booking_guard job: CALL booking_guard.run_job(job), or, once booking_guard is gone, nothing (and the job unschedules itself where pg_cron lives).';

-- Which scheduled jobs have not succeeded for longer than twice their period (plus a minute)?
create function booking_guard.stalled_jobs()
returns table (job text, scheduled_at timestamptz, last_success_at timestamptz, last_error text, overdue interval)
language sql
stable
set search_path = pg_catalog, pg_temp
as $$
    select j.job, r.scheduled_at, r.last_success_at, r.last_error,
           now() - coalesce(r.last_success_at, r.scheduled_at) - (2 * j.expected_every + interval '1 minute')
      from booking_guard.jobs j
      join booking_guard.job_runs r on r.job = j.job
     where r.scheduled_at is not null
       and coalesce(r.last_success_at, r.scheduled_at) < now() - (2 * j.expected_every + interval '1 minute')
$$;

comment on function booking_guard.stalled_jobs() is
    'Scheduled jobs whose last success (or, never run, their scheduling) is older than twice their period plus a minute.';

create function booking_guard_internal.check_jobs()
returns integer
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    s  record;
    a  record;
    n  integer := 0;
begin
    for s in select * from booking_guard.stalled_jobs() loop
        n := n + 1;
        perform booking_guard_internal.raise_alert('job_stalled', 'warning', 'job', s.job,
            format('booking_guard job %s has not succeeded since %s', s.job,
                   coalesce(s.last_success_at::text, 'it was scheduled at ' || s.scheduled_at)),
            jsonb_build_object('last_success_at', s.last_success_at, 'last_error', s.last_error,
                               'overdue_seconds', round(extract(epoch from s.overdue))));
    end loop;
    for a in
        select x.id from booking_guard.alerts x
         where x.alert_type = 'job_stalled' and x.resolved_at is null
           and not exists (select from booking_guard.stalled_jobs() st where st.job = x.entity_id)
    loop
        perform booking_guard.resolve_alert(a.id);
    end loop;
    return n;
end
$$;

comment on function booking_guard_internal.check_jobs() is
    'Raises a job_stalled alert for each stalled scheduled job and resolves those that succeed again; returns how many are stalled.';

-- Where pg_cron is, and whether this database can reach it: ready, not_loaded, not_created, no_dblink.
create function booking_guard_internal.cron_state(connection text default null)
returns text
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    cron_db  text := current_setting('cron.database_name', true);
begin
    if cron_db is null or cron_db = '' then
        return 'not_loaded';
    end if;
    if cron_db = current_database() then
        return case when exists (select from pg_catalog.pg_extension where extname = 'pg_cron') then 'ready'
                    else 'not_created' end;
    end if;
    if not exists (select from pg_catalog.pg_extension where extname = 'dblink') then
        return 'no_dblink';
    end if;
    return case when exists (select from booking_guard_internal.cron_exec(
                                 'select extname::text from pg_catalog.pg_extension where extname = ''pg_cron''',
                                 connection))
                then 'ready' else 'not_created' end;
end
$$;

comment on function booking_guard_internal.cron_state(text) is
    'Whether pg_cron can be used from this database: ready, not_loaded (not in shared_preload_libraries), not_created (no CREATE EXTENSION pg_cron in cron.database_name), no_dblink (another database: dblink is needed).';

-- The connection string to cron's database: this server, by its own socket and port.
create function booking_guard_internal.cron_connection()
returns text
language sql
stable
set search_path = pg_catalog, pg_temp
as $$
    select format('dbname=%s host=%s port=%s user=%s application_name=booking_guard_schedule',
                  quote_literal(current_setting('cron.database_name')),
                  quote_literal(coalesce(nullif(trim(split_part(current_setting('unix_socket_directories'), ',', 1)), ''),
                                         'localhost')),
                  current_setting('port'), quote_literal(current_user))
$$;

comment on function booking_guard_internal.cron_connection() is
    'The libpq connection string schedule_jobs() uses to reach cron.database_name on this server (socket directory, port, current user).';

-- Runs a query that returns one text column in cron's database: here, or through dblink.
create function booking_guard_internal.cron_exec(query text, connection text default null)
returns setof text
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    dblink_schema  name;
begin
    if current_setting('cron.database_name', true) = current_database() then
        return query execute query;
        return;
    end if;
    dblink_schema := (select n.nspname from pg_catalog.pg_extension e
                        join pg_catalog.pg_namespace n on n.oid = e.extnamespace
                       where e.extname = 'dblink');
    return query execute format('select t.r from %I.dblink($1, $2) as t (r text)', dblink_schema)
        using coalesce(connection, booking_guard_internal.cron_connection()), query;
end
$$;

comment on function booking_guard_internal.cron_exec(text, text) is
    'Runs a query returning one text column in cron.database_name: directly when that is this database, otherwise through dblink.';

create function booking_guard_internal.cron_not_ready(state text)
returns void
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
    raise notice 'booking_guard: pg_cron is not usable from database %: nothing was scheduled', current_database()
        using detail = case state
                  when 'not_loaded' then 'pg_cron is not loaded by this server (shared_preload_libraries).'
                  when 'not_created' then format('The pg_cron extension does not exist in cron.database_name (%s).',
                                                 current_setting('cron.database_name', true))
                  else format('pg_cron lives in database %s; reaching it from %s needs the dblink extension.',
                              current_setting('cron.database_name', true), current_database())
              end,
              hint = case state
                  when 'not_loaded' then 'Add pg_cron to shared_preload_libraries, set cron.database_name, restart, create extension pg_cron there, then select booking_guard.schedule_jobs();'
                  when 'not_created' then format('In database %s: create extension pg_cron; then select booking_guard.schedule_jobs();',
                                                 current_setting('cron.database_name', true))
                  else format('create extension dblink; select booking_guard.schedule_jobs(); or, in database %s, run: %s',
                              current_setting('cron.database_name', true),
                              (select string_agg(format('select cron.schedule_in_database(%L, %L, %L, %L);',
                                                        booking_guard_internal.job_name(j.job), j.schedule,
                                                        booking_guard_internal.job_command(j.job), current_database()), ' '
                                                 order by j.job)
                                 from booking_guard.jobs j))
              end;
end
$$;

comment on function booking_guard_internal.cron_not_ready(text) is
    'The NOTICE of schedule_jobs() and unschedule_jobs() when pg_cron cannot be used, saying why and what to do.';

-- What pg_cron registered, in job_runs (with booking_guard_owner's rights: the admin schedules);
-- a null job: every job unscheduled.
create function booking_guard_internal.job_scheduled(job text, cron_database text, cron_jobid bigint)
returns void
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_column
begin
    if job_scheduled.job is null then
        update booking_guard.job_runs set scheduled_at = null, cron_jobid = null, cron_database = null;
        return;
    end if;
    insert into booking_guard.job_runs as r (job, scheduled_at, cron_database, cron_jobid)
    values (job_scheduled.job, now(), job_scheduled.cron_database, job_scheduled.cron_jobid)
    on conflict (job) do update
       set scheduled_at = coalesce(r.scheduled_at, excluded.scheduled_at), cron_database = excluded.cron_database,
           cron_jobid = excluded.cron_jobid;
end
$$;

comment on function booking_guard_internal.job_scheduled(text, text, bigint) is
    'Records in job_runs that a job was registered with pg_cron (its database and job id), or, job null, that every job was removed.';

-- pg_cron runs a job by connecting to cron.host (localhost unless set) with libpq, or in a
-- background worker. On a server that listens on its socket only, the first never connects.
create function booking_guard_internal.cron_unreachable(
    use_background_workers text default current_setting('cron.use_background_workers', true),
    host text default current_setting('cron.host', true),
    listen_addresses text default current_setting('listen_addresses'))
returns text
language sql
stable
set search_path = pg_catalog, pg_temp
as $$
    select case
               when coalesce(use_background_workers, 'off') = 'on' then null
               when coalesce(nullif(host, ''), 'localhost') like '/%' then null
               when btrim(listen_addresses) = '' then
                   format('cron.host is %s but the server listens on no TCP address (listen_addresses is empty)',
                          coalesce(nullif(host, ''), 'localhost'))
           end
$$;

comment on function booking_guard_internal.cron_unreachable(text, text, text) is
    'Why pg_cron cannot connect to run the jobs (TCP host on a socket-only server), or null when it can.';

create function booking_guard.schedule_jobs(connection text default null)
returns table (job text, cron_jobid bigint, schedule text, command text, cron_database text)
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_column
declare
    state  text := booking_guard_internal.cron_state(connection);
    j      record;
begin
    perform booking_guard_internal.attached();
    if state <> 'ready' then
        perform booking_guard_internal.cron_not_ready(state);
        return;
    end if;
    for j in select * from booking_guard.jobs x order by x.job loop
        job := j.job;
        schedule := j.schedule;
        command := booking_guard_internal.job_command(j.job);
        cron_database := current_setting('cron.database_name');
        -- same name, same user: pg_cron updates the job instead of adding one
        cron_jobid := (select r::bigint from booking_guard_internal.cron_exec(
                           format('select cron.schedule_in_database(%L, %L, %L, %L)::text',
                                  booking_guard_internal.job_name(j.job), j.schedule, command, current_database()),
                           connection) r);
        perform booking_guard_internal.job_scheduled(j.job, cron_database, cron_jobid);
        return next;
    end loop;
    if booking_guard_internal.cron_unreachable() is not null then
        raise warning 'pg_cron will not reach this server: %', booking_guard_internal.cron_unreachable()
            using hint = 'Set cron.use_background_workers = on, or cron.host to the socket directory ('
                         || split_part(current_setting('unix_socket_directories'), ',', 1)
                         || '), in postgresql.conf, and restart. A job that cannot run raises job_stalled in the exporter.';
    end if;
end
$$;

comment on function booking_guard.schedule_jobs(text) is
    'Registers the pg_cron jobs of booking_guard.jobs (run_monitor and verify_due every minute, reconcile and purge hourly, daily_report at 00:05) for this database, in cron.database_name (through dblink when that is another database); idempotent. Without pg_cron: a NOTICE saying what is missing, and nothing else.';

create function booking_guard.unschedule_jobs(connection text default null)
returns integer
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    state  text := booking_guard_internal.cron_state(connection);
    n      integer;
begin
    if state <> 'ready' then
        perform booking_guard_internal.cron_not_ready(state);
        return 0;
    end if;
    n := (select r::integer from booking_guard_internal.cron_exec(
              format('select count(cron.unschedule(j.jobid))::text from cron.job j where j.jobname = any (%L::text[])',
                     (select array_agg(booking_guard_internal.job_name(x.job)) from booking_guard.jobs x)),
              connection) r);
    perform booking_guard_internal.job_scheduled(null, null, null);
    return n;
end
$$;

comment on function booking_guard.unschedule_jobs(text) is
    'Removes this database''s booking_guard jobs from pg_cron; returns how many were removed. Without pg_cron: a NOTICE, nothing else.';

-- pg_cron's view of the jobs, with the caller's rights: cron.job_run_details has row-level
-- security (a user sees the runs of the jobs it scheduled; a superuser sees all).
create function booking_guard.job_status()
returns table (job text, schedule text, scheduled_at timestamptz, last_success_at timestamptz,
               last_failure_at timestamptz, last_error text, stalled boolean, cron_jobid bigint, cron_active boolean,
               cron_last_status text, cron_last_start timestamptz, cron_last_message text)
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_column
declare
    cron  jsonb := '[]';
begin
    begin
        if booking_guard_internal.cron_state() = 'ready' then
            cron := (select r::jsonb from booking_guard_internal.cron_exec(format($q$
                select coalesce(json_agg(json_build_object('jobname', j.jobname, 'jobid', j.jobid, 'active', j.active,
                                                           'status', d.status, 'start', d.start_time,
                                                           'message', d.return_message)), '[]')::text
                  from cron.job j
                  left join lateral (select r.status, r.start_time, r.return_message from cron.job_run_details r
                                      where r.jobid = j.jobid order by r.runid desc limit 1) d on true
                 where j.jobname = any (%L::text[])$q$,
                (select array_agg(booking_guard_internal.job_name(x.job)) from booking_guard.jobs x))) r);
        end if;
    exception when others then
        cron := '[]';   -- pg_cron unreachable: job_runs still tells the story
    end;
    return query
    select j.job, j.schedule, r.scheduled_at, r.last_success_at, r.last_failure_at, r.last_error,
           exists (select from booking_guard.stalled_jobs() st where st.job = j.job),
           (c ->> 'jobid')::bigint, (c ->> 'active')::boolean, c ->> 'status', (c ->> 'start')::timestamptz,
           c ->> 'message'
      from booking_guard.jobs j
      left join booking_guard.job_runs r on r.job = j.job
      left join lateral (select e from jsonb_array_elements(cron) e
                          where e ->> 'jobname' = booking_guard_internal.job_name(j.job)) x(c) on true
     order by j.job;
end
$$;

comment on function booking_guard.job_status() is
    'Every booking_guard job: schedule, last success and failure (job_runs), stalled or not, and pg_cron''s job and last run (cron.job_run_details, as far as the caller may read it).';

create function booking_guard.help()
returns table (topic text, query text)
language sql
immutable
set search_path = pg_catalog, pg_temp
as $$
    values
        ('what is wrong now (last hour)', 'select * from booking_guard.inconsistencies;'),
        ('what is wrong over a longer window', 'select * from booking_guard.detect(''1 day'');'),
        ('one rule', 'select * from booking_guard.phantom_booking_findings;   -- one view per built-in rule; any rule: booking_guard.detect_rule(''phantom_booking'')'),
        ('one call', 'select * from booking_guard.check_call(42);'),
        ('open alerts, since when', 'select id, alert_type, entity_id, detected_at, occurrences, auto_corrected from booking_guard.alerts where resolved_at is null order by detected_at;'),
        ('acknowledge an alert', 'select booking_guard.acknowledge_alert(17);'),
        ('what was repaired', 'select at, rule, entity_type, entity_id, details from booking_guard.events where kind in (''reconcile'', ''detection'') order by at desc limit 50;'),
        ('reconciliation runs', 'select id, started_at, finished_at, counts, error from booking_guard.reconciliation_runs order by id desc limit 10;'),
        ('repair now', 'select booking_guard.reconcile();'),
        ('detect and alert now', 'select booking_guard.run_monitor();'),
        ('what is left for a person', 'select id, call_id, reason, priority, created_at from booking_guard.review_queue where status <> ''resolved'' order by priority, created_at;'),
        ('the daily report', 'select booking_guard.daily_report(current_date - 1);'),
        ('stored reports', 'select day, generated_at from booking_guard.reports order by day desc;'),
        ('KPIs', 'select * from booking_guard.kpis(''1 day'');'),
        ('rules and modes', 'select name, severity, mode, rollout_percent from booking_guard.rules order by name;'),
        ('scheduled jobs, last success', 'select * from booking_guard.job_status();'),
        ('schedule the jobs (pg_cron)', 'select * from booking_guard.schedule_jobs();')
$$;

comment on function booking_guard.help() is
    'The everyday psql queries of booking_guard: what is wrong, since when, what was repaired, what is left.';
