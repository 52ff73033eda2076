-- The booking path through booking_guard from a psql script.
--
-- The same story as the Python, PHP and Node examples beside this one, printing the same lines:
-- a call, a permit of the circuit breaker under two scopes (the global breaker and the service's),
-- the calendar, record_booking(); then the calendar goes down, three failures open the breakers,
-- the next ask is refused (BG001) and circuit_try_acquire() tells the retry-after as a row; last,
-- bad input (BG005) and a commit refused by the rule missing_appointment (BG002).
--
--     psql -X -f examples/psql/booking.sql                       (PGHOST, PGPORT, PGUSER, PGDATABASE)
--     psql -X -d "$DATABASE_URL" -f examples/psql/booking.sql
--
-- The database needs examples/clients_setup.sql first; see docs/clients.md.
--
-- How a psql script reads an error: with ON_ERROR_STOP off around a statement that may fail,
-- :ERROR says whether it failed and :SQLSTATE is its SQLSTATE (00000 on success); the last error's
-- message and SQLSTATE stay in :LAST_ERROR_MESSAGE and :LAST_ERROR_SQLSTATE. psql has no variable
-- for DETAIL: it prints BG001's JSON DETAIL on stderr with the error, and the script reads the
-- retry-after from circuit_try_acquire's row. psql cannot choose its exit status either: an
-- unexpected outcome raises an error (a DO block) so that ON_ERROR_STOP ends the script with 3.

\set ON_ERROR_STOP on
\set QUIET on

\set company_id 1
\set service_id 1
-- every scope the call runs under, as a text[] literal: a permit covers them all
\set scopes '{appointment_booking:global,appointment_booking:service:' :service_id '}'
\set appointment '{"company_id": 1, "service_id": 1, "starts_at": "2030-01-15T09:00:00Z", "ends_at": "2030-01-15T09:30:00Z"}'
-- The calendar (Cal.com) is a stub: psql cannot call an HTTP API. A real script is handed the
-- booking id by whoever called the calendar (psql -v booking_id=...); here the stub's answers are
-- made up below, a new booking id while the calendar is up and this error while it is down.
\set calendar_error 'Cal.com answered 503 Service Unavailable'

-- 1-3. a call, a permit, the calendar, the result reported with the same scopes and permit
insert into calls (retell_call_id, company_id, direction)
values ('example-psql-' || left(md5(random()::text), 8), :company_id, 'inbound')
returning id as call_id \gset
\echo call :call_id inserted

select booking_guard.circuit_acquire(:'scopes'::text[]) as permit \gset
\echo breaker closed: permit :permit

select 'cal-' || :call_id || '-' || left(md5(random()::text), 8) as booking_id \gset
select booking_guard.circuit_record_success(:'scopes'::text[], :permit) as state \gset
\echo calendar booked :booking_id

-- 4. record the booking: appointment, call flags and validation in one call
select success, reason, appointment_id, created::text as created
  from booking_guard.record_booking(:call_id, :'booking_id', :'appointment'::jsonb) \gset
\if :success
    \echo booked: call :call_id, appointment :appointment_id, created :created
\else
    -- refused by validation: the call is rolled back to creation_failed and queued for review
    \echo booking refused: :reason
    do $$ begin raise exception 'stopped: the booking was refused'; end $$;
\endif

-- 5. the calendar goes down: each failure is reported, and the third opens the breakers (the
-- default policy opens after 3 consecutive failures)
insert into calls (retell_call_id, company_id, direction)
values ('example-psql-' || left(md5(random()::text), 8), :company_id, 'inbound')
returning id as failing_call_id \gset
\echo call :failing_call_id inserted

select booking_guard.circuit_acquire(:'scopes'::text[]) as permit \gset
select booking_guard.circuit_record_failure(:'scopes'::text[], :'calendar_error', :permit) as state \gset
\echo calendar failed (1/3): :calendar_error; breaker :state
select booking_guard.circuit_acquire(:'scopes'::text[]) as permit \gset
select booking_guard.circuit_record_failure(:'scopes'::text[], :'calendar_error', :permit) as state \gset
\echo calendar failed (2/3): :calendar_error; breaker :state
select booking_guard.circuit_acquire(:'scopes'::text[]) as permit \gset
select booking_guard.circuit_record_failure(:'scopes'::text[], :'calendar_error', :permit) as state \gset
\echo calendar failed (3/3): :calendar_error; breaker :state

-- ... so the next ask is refused: BG001 (psql prints its message and JSON DETAIL on stderr)
\set ON_ERROR_STOP off
select booking_guard.circuit_acquire(:'scopes'::text[]) as permit \gset
\set ON_ERROR_STOP on
select :'SQLSTATE' = 'BG001' as refused \gset
\if :refused
    \echo BG001 :LAST_ERROR_MESSAGE
\else
    \warn expected BG001, got SQLSTATE :SQLSTATE
    do $$ begin raise exception 'stopped: unexpected result (see above)'; end $$;
\endif

-- ... and the retry-after, as a row (retry_after_seconds null: forced open until a reset)
select allowed::text as allowed, state, refused_by,
       coalesce('retry after ' || retry_after_seconds || ' s', 'no retry before a reset') as retry
  from booking_guard.circuit_try_acquire(:'scopes'::text[]) \gset try_
\echo try_acquire: allowed :try_allowed, state :try_state, refused by :try_refused_by, :try_retry

-- 6. BG005: the appointment names a column the appointments table does not have; nothing is written
\set ON_ERROR_STOP off
select * from booking_guard.record_booking(:failing_call_id, 'cal-' || :failing_call_id || '-bad',
                                           :'appointment'::jsonb || '{"room": "B"}') \gset bad_
\set ON_ERROR_STOP on
select :'SQLSTATE' = 'BG005' as invalid \gset
\if :invalid
    \echo BG005 invalid input: :LAST_ERROR_MESSAGE
\else
    \warn expected BG005, got SQLSTATE :SQLSTATE
    do $$ begin raise exception 'stopped: unexpected result (see above)'; end $$;
\endif

-- BG002: flagging the call as booked without recording an appointment is refused at COMMIT
begin;
update calls set session_outcome = 'appointment_booked', appointment_made = true where id = :failing_call_id;
\set ON_ERROR_STOP off
commit;
\set ON_ERROR_STOP on
select :'SQLSTATE' = 'BG002' as rejected \gset
\if :rejected
    \echo BG002 commit refused: :LAST_ERROR_MESSAGE
\else
    \warn expected BG002, got SQLSTATE :SQLSTATE
    do $$ begin raise exception 'stopped: unexpected result (see above)'; end $$;
\endif
