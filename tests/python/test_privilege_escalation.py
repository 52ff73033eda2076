"""Nothing a non-superuser can define or replace runs with more rights than its author has.

Each test is an attack that worked on booking_guard 0.1.0, tried as the role that made it:
an application role that prepares a statement booking_guard would run as a superuser; a table
owner whose trigger, default, CHECK or policy booking_guard's own writes would run as a
superuser; a role that squats the advisory keys booking_guard serialised on; an application
role that ends verification graces early or reads what it was not given.
"""

import json

import psycopg
import pytest
from conftest import APP_TABLE_GRANTS
from support.application_rows import FAILED, flags, new_appointment, new_call


def is_superuser(db: psycopg.Connection, role: str) -> bool:
    return db.execute("select rolsuper from pg_roles where rolname = %s", (role,)).fetchone()[0]


# -- an application role and a session prepared statement ----------------------------------------

def test_a_prepared_statement_named_like_booking_guards_is_never_run(core, login_role):
    """0.1.0 ran `EXECUTE booking_guard_insert_<md5>` as its superuser owner: an application role
    that prepared that name first ran its own statement as a superuser."""
    app, conn = login_role("booking_guard_app", grants=APP_TABLE_GRANTS)
    call_id = new_call(conn)
    statement = conn.execute("""
        select format('prepare %I (jsonb) as
                         with esc as (update pg_catalog.pg_authid set rolsuper = true
                                       where rolname = session_user returning 1)
                       insert into public.appointments as t (call_id, calcom_v2_booking_id)
                       select r.call_id, r.calcom_v2_booking_id
                         from pg_catalog.jsonb_populate_record(null::public.appointments, $1) r
                        where (select count(*) from esc) >= 0
                       returning t.id::bigint',
                      'booking_guard_insert_' || md5('public.appointments'::regclass::oid::text || ':'
                                                     || '["call_id", "calcom_v2_booking_id"]'))""").fetchone()[0]
    conn.execute(statement)
    result = conn.execute("select success, appointment_id from booking_guard.record_booking(%s, 'cal-prep', '{}')",
                          (call_id,)).fetchone()
    assert not is_superuser(core, app)
    assert result[0] is True
    assert core.execute("select count(*) from appointments where call_id = %s and calcom_v2_booking_id = 'cal-prep'",
                        (call_id,)).fetchone()[0] == 1


HOSTILE_OPERATORS = """
create table hostile.fired (what text);
create function hostile.eq_int8(a bigint, b bigint) returns boolean language plpgsql as $$
begin insert into hostile.fired values ('= bigint'); return a operator(pg_catalog.=) b; end $$;
create function hostile.eq_text(a text, b text) returns boolean language plpgsql as $$
begin insert into hostile.fired values ('= text'); return a operator(pg_catalog.=) b; end $$;
create function hostile.minus_tstz(a timestamptz, b timestamptz) returns interval language plpgsql as $$
begin insert into hostile.fired values ('- timestamptz'); return a operator(pg_catalog.-) b; end $$;
create function hostile.now() returns timestamptz language plpgsql as $$
begin insert into hostile.fired values ('now()'); return pg_catalog.now(); end $$;
create function hostile."left"(t text, n integer) returns text language plpgsql as $$
begin insert into hostile.fired values ('left()'); return pg_catalog."left"(t, n); end $$;
create operator hostile.= (leftarg = bigint, rightarg = bigint, function = hostile.eq_int8);
create operator hostile.= (leftarg = text, rightarg = text, function = hostile.eq_text);
create operator hostile.- (leftarg = timestamptz, rightarg = timestamptz, function = hostile.minus_tstz);
"""


def test_record_booking_runs_nothing_found_on_the_callers_search_path(core, login_role):
    """record_booking() runs as its caller and parses its queries under the caller's search_path:
    operators and functions of the caller's own schema, put before pg_catalog, are never picked,
    neither when its plans are made nor when they are made again under the new path."""
    app, conn = login_role("booking_guard_app", grants=APP_TABLE_GRANTS)
    core.execute(f"create schema hostile authorization {app}")
    conn.execute(HOSTILE_OPERATORS)
    first, second, orphaned = new_call(conn), new_call(conn), new_call(conn)
    assert conn.execute("select success from booking_guard.record_booking(%s, 'cal-path-1', '{}')",
                        (first,)).fetchone()[0] is True
    conn.execute("set search_path = hostile, pg_catalog, public")
    new_appointment(conn, None, calcom_v2_booking_id="cal-path-3")   # the calendar's webhook first: an orphan
    for call_id, booking in ((second, "cal-path-2"), (second, "cal-path-2"), (orphaned, "cal-path-3"),
                             (first, "cal-path-2")):   # created, recorded before, linked, refused
        conn.execute("select booking_guard.record_booking(%s, %s, '{}')", (call_id, booking))
    assert core.execute("select what from hostile.fired").fetchall() == []
    conn.execute("select 1::bigint = 2::bigint, now(), left('ab', 1)")   # an unqualified query picks them
    assert sorted(core.execute("select what from hostile.fired").fetchall()) == [("= bigint",), ("left()",), ("now()",)]
    assert core.execute("select count(*) from appointments where calcom_v2_booking_id like 'cal-path-%'"
                        ).fetchone()[0] == 3


def test_the_app_role_writes_record_booking_events_only_through_record_booking(core, login_role):
    """record_booking() writes its event (one row, the validation's part inside) as
    booking_guard_owner, with a statement of its own: the application role that calls it can
    neither write booking_guard.events itself nor call a function that writes record_booking
    events for it."""
    app, conn = login_role("booking_guard_app", grants=APP_TABLE_GRANTS)
    call_id = new_call(conn)
    before = core.execute("select count(*) from booking_guard.events").fetchone()[0]
    assert conn.execute("select success from booking_guard.record_booking(%s, 'cal-own', '{}')",
                        (call_id,)).fetchone()[0] is True
    assert core.execute("select array_agg(kind order by kind) from booking_guard.events where entity_id = %s",
                        (str(call_id),)).fetchone()[0] == ["record_booking"]
    assert core.execute("select count(*) from booking_guard.events").fetchone()[0] == before + 1
    assert core.execute("select details ->> 'success' from booking_guard.validation_events where entity_id = %s",
                        (str(call_id),)).fetchone()[0] == "true"
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("insert into booking_guard.events (kind, entity_type, entity_id) values ('record_booking', 'call', '1')")
    # (validate_appointment_creation() logs its validation events through log_validation())
    writers = core.execute(r"""
        select p.oid::regprocedure::text from pg_proc p
         where p.prosecdef and has_function_privilege(%s, p.oid, 'execute')
           and p.prosrc ~* 'insert\s+into\s+booking_guard\.events' and p.prosrc ~* '''record_booking'''""",
        (app,)).fetchall()
    assert writers == []


def test_no_role_can_hold_the_booking_id_lock(core, login_role, connect):
    """record_booking() serialises on a lock whose tag no SQL function sets: a role that takes every
    advisory key derived from the booking id the way the server hashes it holds nothing the
    booking waits for, while a booking in progress holds it (as pg_locks shows)."""
    _, squatter = login_role()
    squatter.execute("""
        select pg_advisory_lock(h), pg_advisory_lock((h >> 32)::int, (h & 4294967295)::bit(32)::int)
          from (select hashtextextended('cal-held', 0) h) k""")
    holder = connect()
    holder.execute("set lock_timeout = '2s'")
    holder.execute("begin")
    first = new_call(core)
    assert holder.execute("select success from booking_guard.record_booking(%s, 'cal-held', '{}')",
                          (first,)).fetchone()[0] is True
    held = core.execute("""
        select l.classid::bigint << 32 | l.objid::bigint from pg_locks l
         where l.locktype = 'advisory' and l.objsubid = 16967 and l.pid = %s and l.granted""",
        (holder.info.backend_pid,)).fetchall()
    assert held == core.execute("select hashtextextended('cal-held', 0)").fetchall()
    holder.execute("commit")
    booker = connect()
    booker.execute("set lock_timeout = '2s'")
    assert booker.execute("select success from booking_guard.record_booking(%s, 'cal-held', '{}')",
                          (first,)).fetchone()[0] is True


# -- a table owner's code on the attached tables ------------------------------------------------

OWNER_CODE = """
create table public.who_ran (usr name, super boolean, what text);
grant insert on public.who_ran to public;

-- Records who runs it, then tries to make the table owner a superuser.
create function public.owner_code(what text) returns boolean language plpgsql as $$
begin
    insert into public.who_ran values (current_user, (select rolsuper from pg_roles where rolname = current_user), what);
    begin
        execute format('alter role %I superuser', '{owner}');
    exception when others then
        null;
    end;
    return true;
end
$$;
grant execute on function public.owner_code(text) to public;

create function public.owner_trigger() returns trigger language plpgsql as $$
begin
    perform public.owner_code(tg_table_name || ' ' || tg_op);
    return null;
end
$$;
create trigger owner_after_update after update on public.calls
    for each row execute function public.owner_trigger();
create trigger owner_after_update after update on public.appointments
    for each row execute function public.owner_trigger();
alter table public.appointments alter column status set default (case when public.owner_code('default') then 'scheduled' end);
alter table public.appointments add constraint owner_check check (public.owner_code('check'));
"""


@pytest.fixture
def hostile_owner(core, login_role):
    """The application tables owned by a role that is no superuser, with code of its own on them:
    an AFTER UPDATE trigger on both tables, a column default and a CHECK on appointments."""
    owner, conn = login_role()
    for table in ("calls", "appointments", "companies", "customers", "services", "staff"):
        core.execute(f"alter table public.{table} owner to {owner}")
    core.execute(f"grant create on schema public to {owner}")
    conn.execute(OWNER_CODE.replace("{owner}", owner))
    return owner, conn


def who_ran(db: psycopg.Connection) -> set[tuple[str, bool]]:
    return {(usr, bool(sup)) for usr, sup in db.execute("select usr, super from public.who_ran").fetchall()}


def assert_no_owner_code_ran_as_superuser(db: psycopg.Connection, owner: str) -> None:
    assert not is_superuser(db, owner)
    assert {usr for usr, sup in who_ran(db) if sup} == set()


def test_owner_code_never_runs_as_superuser_on_the_commit_time_rollback(core, hostile_owner, login_role):
    owner, _ = hostile_owner
    _, app = login_role(grants=APP_TABLE_GRANTS)
    call_id = new_call(app, session_outcome="appointment_booked", appointment_made=True)   # a phantom
    assert flags(core, call_id) == FAILED
    assert ("booking_guard_worker", False) in who_ran(core)
    assert_no_owner_code_ran_as_superuser(core, owner)


def test_owner_code_runs_as_the_application_on_record_booking(core, hostile_owner, login_role):
    owner, _ = hostile_owner
    app, conn = login_role("booking_guard_app", grants=APP_TABLE_GRANTS)
    call_id = new_call(conn)
    assert conn.execute("select success from booking_guard.record_booking(%s, 'cal-own', '{}')",
                        (call_id,)).fetchone()[0] is True
    assert {usr for usr, _ in who_ran(core)} <= {app, "booking_guard_worker"}
    assert (app, False) in who_ran(core)
    assert_no_owner_code_ran_as_superuser(core, owner)


def test_owner_code_never_runs_as_superuser_in_jobs_called_by_a_superuser(core, hostile_owner, login_role):
    owner, _ = hostile_owner
    _, app = login_role(grants=APP_TABLE_GRANTS)
    core.execute("select booking_guard.set_rule('missing_direction', 'observe')")
    new_call(app, direction=None)
    core.execute("select booking_guard.set_rule('missing_direction', 'correct')")
    # an appointment deleted: the call's flags follow at once
    with app.transaction():
        call_id = new_call(app)
        appointment = new_appointment(app, call_id)
    app.execute("delete from appointments where id = %s", (appointment,))
    core.execute("select booking_guard.reconcile()")
    core.execute("call booking_guard.run_job('reconcile')")
    core.execute("call booking_guard.run_job('run_monitor')")
    assert core.execute("select count(*) from calls where direction is null").fetchone()[0] == 0
    assert "booking_guard_worker" in {usr for usr, _ in who_ran(core)}
    assert_no_owner_code_ran_as_superuser(core, owner)


def test_owner_policy_never_runs_as_superuser(core, hostile_owner, login_role):
    owner, conn = hostile_owner
    _, app = login_role(grants=APP_TABLE_GRANTS)
    for table in ("calls", "appointments"):
        conn.execute(f"alter table public.{table} enable row level security")
        conn.execute(f"create policy everyone on public.{table} using (public.owner_code('policy'))")
    with app.transaction():
        call_id = new_call(app)
        new_appointment(app, call_id)
        app.execute("update calls set appointment_made = true, session_outcome = 'appointment_booked' where id = %s",
                    (call_id,))
    core.execute("select booking_guard.reconcile()")
    assert_no_owner_code_ran_as_superuser(core, owner)


def test_job_code_cannot_leave_settings_behind_for_the_superuser(core, hostile_owner, login_role):
    """Code run as booking_guard_worker may SET what it likes: the caller's settings come back."""
    owner, conn = hostile_owner
    _, app = login_role(grants=APP_TABLE_GRANTS)
    conn.execute("""
        create or replace function public.owner_code(what text) returns boolean language plpgsql as $$
        begin
            perform set_config('search_path', 'public', false);
            perform set_config('application_name', 'owned', false);
            return true;
        end
        $$""")
    core.execute("select booking_guard.set_rule('missing_direction', 'observe')")
    new_call(app, direction=None)
    core.execute("select booking_guard.set_rule('missing_direction', 'correct')")
    core.execute("set application_name = 'mine'")
    core.execute("select booking_guard.reconcile()")   # sets the direction: the owner's trigger runs
    assert core.execute("select count(*) from calls where direction is null").fetchone()[0] == 0
    assert core.execute("show application_name").fetchone()[0] == "mine"
    assert core.execute("show search_path").fetchone()[0] == '"$user", public'


# -- the keys booking_guard serialises on -----------------------------------------------------

def test_a_squatter_cannot_stall_the_jobs_or_a_booking(core, login_role, connect):
    """0.1.0 serialised run_monitor, reconcile and record_booking(booking id) on advisory keys any
    role can take: the jobs then reported success without running, and a booking waited."""
    _, squatter = login_role()
    fold_key = core.execute("select 'booking_guard.metric_fold_state'::regclass::oid::bigint").fetchone()[0]
    squatter.execute("select pg_advisory_lock(hashtext('booking_guard.run_monitor'))")
    squatter.execute("select pg_advisory_lock(hashtext('booking_guard.reconcile'))")
    squatter.execute("select pg_advisory_lock(-1560708019, hashtext('cal-squat'))")
    squatter.execute("select pg_advisory_lock(%s)", (fold_key,))
    assert "skipped" not in core.execute("select booking_guard.run_monitor()").fetchone()[0]
    assert "skipped" not in core.execute("select booking_guard.reconcile()").fetchone()[0]
    before = core.execute("select events_folded from booking_guard.metric_fold_state").fetchone()[0]
    new_call(core, direction=None)   # an alert: an event to fold
    assert core.execute("select booking_guard.fold_metrics()").fetchone()[0] > 0
    assert core.execute("select events_folded from booking_guard.metric_fold_state").fetchone()[0] > before
    call_id = new_call(core)
    booker = connect()
    booker.execute("set lock_timeout = '2s'")
    assert booker.execute("select success from booking_guard.record_booking(%s, 'cal-squat', '{}')",
                          (call_id,)).fetchone()[0] is True


# -- graces and reads ----------------------------------------------------------------------------

def test_the_app_role_cannot_end_verification_graces_early(attached, login_role):
    attached.execute("select booking_guard.set_setting('verification_grace', '1 hour')")
    app, conn = login_role("booking_guard_app", grants=APP_TABLE_GRANTS)
    attached.execute("insert into companies (id, name) values (1, 'Acme')")
    call_id = new_call(conn, session_outcome="appointment_booked", appointment_made=True)
    with pytest.raises(psycopg.Error) as caught:
        conn.execute("select * from booking_guard.verify_due('infinity')")
    assert caught.value.sqlstate in ("42501", "BG005")
    # not even a role that may run the verification loop may move the clock forward
    _, serve = login_role("booking_guard_serve")
    with pytest.raises(psycopg.Error) as caught:
        serve.execute("select * from booking_guard.verify_due('infinity')")
    assert caught.value.sqlstate == "BG005"
    assert serve.execute("select count(*) from booking_guard.verify_due()").fetchone()[0] == 0
    assert flags(attached, call_id) == ("appointment_booked", True, None)


def test_validation_shows_a_role_only_what_it_may_read(core, login_role):
    """0.1.0's validation ran as a superuser: any app role listed every call's ids with it."""
    call_id = new_call(core, retell_call_id="retell-secret")
    _, conn = login_role("booking_guard_app")   # no grant on the application's tables
    with pytest.raises(psycopg.Error) as caught:
        conn.execute("select details from booking_guard.validate_appointment_creation(%s)", (call_id,))
    assert caught.value.sqlstate == "42501"
    assert "retell-secret" not in str(caught.value)


def test_notifications_carry_ids_only(core, login_role):
    """Any role may LISTEN on any channel: 0.1.0's circuit notifications carried the error texts."""
    _, listener = login_role()
    listener.execute("listen booking_guard_circuit")
    listener.execute("listen booking_guard_alert")
    for _ in range(3):
        core.execute("select booking_guard.circuit_record_failure('appointment_booking:service:9', 'customer Ada +4930123')")
    new_call(core, direction=None)
    payloads = []
    for notify in listener.notifies(timeout=2, stop_after=2):
        payloads.append(notify.payload)
    assert payloads
    for payload in payloads:
        assert "Ada" not in payload and "4930123" not in payload
        value = json.loads(payload)
        assert isinstance(value, int) or set(value) <= {"id"}


def test_a_role_without_grants_reads_nothing(core, login_role):
    _, nobody = login_role()
    for query in ("select * from booking_guard.alerts", "select * from booking_guard.events",
                  "select * from booking_guard.metrics()", "select * from booking_guard.detect()",
                  "select * from booking_guard.review_queue", "select booking_guard.circuit_state('x')"):
        with pytest.raises(psycopg.Error) as caught:
            nobody.execute(query)
        assert caught.value.sqlstate == "42501", query
