"""A lifecycle a DBA can trust: an update from the released 0.1.0 ends exactly where a fresh
install starts, with no row lost; released scripts never change; removal leaves nothing; a
partial restore's leftover triggers are harmless until attach() takes them over; retention purges
only what is past it, and the counters stay right; tables partitioned by time attach; a logical
replication subscriber acts on nothing."""

import shutil
import subprocess
import time

import psycopg
import pytest
from conftest import ROOT, SERVER, pg_tool, tool_args
from support.application_rows import FAILED, flags, new_appointment, new_call

# Everything of booking_guard in the catalog, and what it put on the application's tables (privileges
# as sorted sets: the order of an ACL's items follows the history of the grants, not their meaning).
CATALOG_SQL = """
with ours as (select oid from pg_namespace where nspname in ('booking_guard', 'booking_guard_internal'))
select 'function', p.oid::regprocedure::text,
       concat_ws(' | ', p.prokind, p.prosecdef, p.provolatile, p.proisstrict, p.proowner::regrole, l.lanname,
                 pg_get_function_result(p.oid), p.proconfig::text, md5(p.prosrc), p.probin,
                 (select string_agg(x::text, ',' order by x::text) from unnest(p.proacl) x),
                 obj_description(p.oid, 'pg_proc'))
  from pg_proc p join pg_language l on l.oid = p.prolang where p.pronamespace in (select oid from ours)
union all
select 'relation', c.oid::regclass::text,
       concat_ws(' | ', c.relkind, c.relowner::regrole,
                 (select string_agg(x::text, ',' order by x::text) from unnest(c.relacl) x), c.reloptions::text,
                 obj_description(c.oid, 'pg_class'), case when c.relkind = 'v' then pg_get_viewdef(c.oid) end)
  from pg_class c where c.relnamespace in (select oid from ours) and c.relkind in ('r', 'v', 'S', 'p', 'c')
union all
select 'column', a.attrelid::regclass::text || '.' || a.attname,
       concat_ws(' | ', a.attnum, format_type(a.atttypid, a.atttypmod), a.attnotnull, pg_get_expr(d.adbin, d.adrelid),
                 a.attidentity, col_description(a.attrelid, a.attnum),
                 (select string_agg(x::text, ',' order by x::text) from unnest(a.attacl) x))
  from pg_attribute a join pg_class c on c.oid = a.attrelid
  left join pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum
 where c.relnamespace in (select oid from ours) and a.attnum > 0 and not a.attisdropped
union all
select 'index', i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid)
  from pg_index i join pg_class c on c.oid = i.indrelid where c.relnamespace in (select oid from ours)
union all
select 'constraint', co.conrelid::regclass::text || '.' || co.conname, pg_get_constraintdef(co.oid)
  from pg_constraint co where co.connamespace in (select oid from ours)
union all
select 'trigger', t.tgrelid::regclass::text || '.' || t.tgname, concat_ws(' | ', pg_get_triggerdef(t.oid), t.tgenabled)
  from pg_trigger t join pg_class c on c.oid = t.tgrelid
 where not t.tgisinternal and (c.relnamespace in (select oid from ours)
                               or t.tgfoid in (select oid from pg_proc where pronamespace in (select oid from ours)))
union all
select 'event trigger', e.evtname, concat_ws(' | ', e.evtevent, e.evtfoid::regproc, e.evtenabled, e.evttags::text)
  from pg_event_trigger e
union all
select 'schema', n.nspname,
       concat_ws(' | ', n.nspowner::regrole, (select string_agg(x::text, ',' order by x::text) from unnest(n.nspacl) x),
                 obj_description(n.oid, 'pg_namespace'))
  from pg_namespace n where n.oid in (select oid from ours)
union all
select 'type', t.oid::regtype::text, concat_ws(' | ', t.typtype, obj_description(t.oid, 'pg_type'))
  from pg_type t where t.typnamespace in (select oid from ours) and t.typtype <> 'b'
   and (t.typrelid = 0 or (select relkind from pg_class where oid = t.typrelid) = 'c')
union all
select 'config dump', x.cfg::regclass::text, x.cond
  from pg_extension e, unnest(e.extconfig, e.extcondition) x (cfg, cond) where e.extname = 'booking_guard'
union all
select 'application grant', c.relname || coalesce('.' || a.attname, ''),
       (select string_agg(format('%s=%s', g.grantee::regrole, g.privilege_type), ', ' order by 1)
          from aclexplode(coalesce(a.attacl, c.relacl)) g where g.grantee::regrole::text like 'booking\\_guard\\_%')
  from pg_class c left join pg_attribute a on a.attrelid = c.oid and a.attnum > 0 and a.attacl is not null
 where c.relname in ('calls', 'appointments') and c.relnamespace = 'public'::regnamespace
order by 1, 2
"""


def catalog(conn: psycopg.Connection) -> list[tuple]:
    return conn.execute(CATALOG_SQL).fetchall()


@pytest.fixture
def scratch(db):
    """Make fresh databases on the test server (dropped afterwards): scratch(name) -> connection."""
    made: list[tuple[str, psycopg.Connection]] = []
    admin = psycopg.connect(host=db.info.host, port=db.info.port, user=db.info.user, dbname="postgres", autocommit=True)

    def make(suffix: str) -> psycopg.Connection:
        name = f"{db.info.dbname}_{suffix}"
        admin.execute(f'drop database if exists "{name}" with (force)')
        admin.execute(f'create database "{name}"')
        conn = psycopg.connect(host=db.info.host, port=db.info.port, user=db.info.user, dbname=name, autocommit=True)
        conn.execute("set client_min_messages = warning")
        made.append((name, conn))
        return conn

    yield make
    for name, conn in made:
        conn.close()
        admin.execute(f'drop database if exists "{name}" with (force)')
    admin.close()


APP_SCHEMA = (ROOT / "examples" / "app_schema.sql").read_text()


def live_data(conn: psycopg.Connection) -> dict:
    """What an update must keep: the rows of booking_guard's tables that hold the users' history and settings."""
    return {
        "settings": conn.execute("select name, booking_guard.setting(name) from booking_guard.settings order by 1").fetchall(),
        "rules": conn.execute("select name, mode, rollout_percent from booking_guard.rules order by 1").fetchall(),
        "alerts": conn.execute("select id, alert_type, entity_id, occurrences from booking_guard.alerts order by id").fetchall(),
        "events": conn.execute("select id, kind, entity_id from booking_guard.events order by id").fetchall(),
        "reviews": conn.execute("select id, call_id, reason, status from booking_guard.review_queue order by id").fetchall(),
        "breakers": conn.execute("select key, state, failure_count from booking_guard.circuit_breakers order by 1").fetchall(),
        "retries": conn.execute("select id, operation, status from booking_guard.retries order by id").fetchall(),
        "calls": conn.execute("select id, session_outcome, appointment_made, appointment_link_status from calls order by id"
                              ).fetchall(),
        "attachment": conn.execute("select calls_table::text, appointments_table::text from booking_guard.attachment").fetchall(),
    }


def test_update_from_0_1_0_ends_where_a_fresh_install_starts(scratch):
    old = scratch("from010")
    old.execute(APP_SCHEMA)
    old.execute("create extension booking_guard version '0.1.0' cascade")
    old.execute("select booking_guard.attach('public.calls', 'public.appointments')")
    old.execute("select booking_guard.set_setting('verification_grace', '0')")
    old.execute("select booking_guard.set_rule('booking_id_mismatch', 'correct', 50, 'observe')")
    old.execute("insert into companies (id, name) values (1, 'Acme')")
    booked = new_call(old)
    old.execute("select booking_guard.record_booking(%s, 'cal-1', '{}')", (booked,))
    phantom = new_call(old, session_outcome="appointment_booked", appointment_made=True)   # rolled back, reviewed
    new_call(old, direction=None)
    for _ in range(3):
        old.execute("select booking_guard.circuit_record_failure('appointment_booking:global', 'down')")
    old.execute("select booking_guard.schedule_retry(%s, 'notify', '{}', 3, '0')", (booked,))
    before = live_data(old)

    old.execute("alter extension booking_guard update")
    assert old.execute("select extversion from pg_extension where extname = 'booking_guard'").fetchone()[0] == "0.2.0"
    after = live_data(old)
    # every row is still there as it was (0.2.0 adds settings and rules of its own)
    assert {k: v for k, v in after.items() if k not in ("settings", "rules")} == \
           {k: v for k, v in before.items() if k not in ("settings", "rules")}
    assert set(before["settings"]) <= set(after["settings"]) and set(before["rules"]) <= set(after["rules"])

    fresh = scratch("fresh020")
    fresh.execute(APP_SCHEMA)
    fresh.execute("create extension booking_guard cascade")
    fresh.execute("select booking_guard.attach('public.calls', 'public.appointments')")
    updated, installed = catalog(old), catalog(fresh)
    assert [r for r in updated if r not in installed] == [] and [r for r in installed if r not in updated] == []
    # the rules' definitions too (their modes are the user's)
    definitions = ("select name, severity, entity_type, source, default_mode, label, alert_text, repair, repair_kind,"
                   " action, description from booking_guard.rules order by name")
    assert old.execute(definitions).fetchall() == fresh.execute(definitions).fetchall()

    # and the updated attachment works: a new phantom is rolled back at COMMIT
    assert flags(old, phantom) == FAILED
    again = new_call(old, session_outcome="appointment_booked", appointment_made=True)
    assert flags(old, again) == FAILED
    with old.transaction():
        call_id = new_call(old)
        new_appointment(old, call_id)
    assert old.execute("select appointment_made from calls where id = %s", (call_id,)).fetchone()[0] is True


def test_a_released_file_may_never_change(tmp_path):
    """scripts/build-extension --check (run by every make) compares the released files with released/SHA256SUMS."""
    for part in ("scripts", "released", "extension"):
        shutil.copytree(ROOT / part, tmp_path / part, ignore=shutil.ignore_patterns("*.o", "*.so", "*.bc"))
    check = [str(tmp_path / "scripts" / "build-extension"), "--check"]
    assert subprocess.run(check, capture_output=True, text=True).returncode == 0
    schema = tmp_path / "extension" / "sql" / "schema" / "0.1.0.sql"
    schema.write_text(schema.read_text() + "\n-- a later change\n")
    out = subprocess.run(check, capture_output=True, text=True)
    assert out.returncode != 0
    assert "extension/sql/schema/0.1.0.sql: changed" in out.stderr


def leftovers(conn: psycopg.Connection) -> dict:
    return {
        "views": conn.execute("select count(*) from pg_class where relname like 'guarded\\_%' and relkind = 'v'").fetchone()[0],
        "triggers": conn.execute("select count(*) from pg_trigger where tgname like 'booking\\_guard\\_%'").fetchone()[0],
        "indexes": conn.execute("select count(*) from pg_class where relname like '%\\_bg\\_idx'").fetchone()[0],
        "event triggers": conn.execute("select count(*) from pg_event_trigger").fetchone()[0],
    }


def test_prepare_drop_then_drop_extension_leaves_nothing(attached):
    assert leftovers(attached)["indexes"] == 5
    result = attached.execute("select booking_guard.prepare_drop()").fetchone()[0]
    assert result["detached"] is True and len(result["dropped_indexes"]) == 5
    attached.execute("drop extension booking_guard cascade")
    assert leftovers(attached) == {"views": 0, "triggers": 0, "indexes": 0, "event triggers": 0}


def test_drop_extension_cascade_alone_leaves_no_view_or_trigger(attached):
    command = attached.execute("select booking_guard_internal.job_command('reconcile')").fetchone()[0]
    attached.execute("drop extension booking_guard cascade")
    found = leftovers(attached)
    assert (found["views"], found["triggers"], found["event triggers"]) == (0, 0, 0)
    # a pg_cron job left behind does nothing once booking_guard is gone (no error every minute)
    attached.execute(command)
    attached.execute("create extension booking_guard")
    assert attached.execute("select count(*) from booking_guard.attachment").fetchone()[0] == 0


def test_partial_restore_leftover_triggers_are_harmless_then_taken_over(attached, scratch):
    """pg_dump -n public of an attached database, into another with booking_guard installed: the
    triggers come back without their attachment. They do nothing; attach() takes them over;
    detach() without an attachment removes them."""
    attached.execute("insert into companies (id, name) values (1, 'Acme')")
    new_call(attached)
    target = scratch("partial")
    target.execute("create extension booking_guard cascade")
    target.execute("drop schema public")   # pg_dump -n public creates it
    dump = subprocess.run([pg_tool("pg_dump"), "-n", "public", *tool_args(attached.info.dbname)],
                          check=True, capture_output=True, text=True)
    restore = subprocess.run([pg_tool("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", *tool_args(target.info.dbname)],
                             input=dump.stdout, capture_output=True, text=True)
    assert restore.returncode == 0, restore.stderr
    assert leftovers(target)["triggers"] == 5
    # writes work, and nothing is judged: there is no attachment
    phantom = new_call(target, session_outcome="appointment_booked", appointment_made=True)
    assert flags(target, phantom)[0] == "appointment_booked"
    target.execute("select booking_guard.attach('public.calls', 'public.appointments')")
    assert leftovers(target)["triggers"] == 5
    again = new_call(target, session_outcome="appointment_booked", appointment_made=True)
    target.execute("select booking_guard.set_setting('verification_grace', '0')")
    assert flags(target, new_call(target, session_outcome="appointment_booked", appointment_made=True)) == FAILED
    assert again
    target.execute("select booking_guard.detach()")
    assert leftovers(target)["triggers"] == 0

    # the other order: restored, then detach() finds the leftovers without an attachment
    other = scratch("partial2")
    other.execute("create extension booking_guard cascade")
    other.execute("drop schema public")
    subprocess.run([pg_tool("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", *tool_args(other.info.dbname)],
                   input=dump.stdout, capture_output=True, text=True, check=True)
    other.execute("select booking_guard.detach()")
    assert leftovers(other)["triggers"] == 0


def test_purge_removes_what_is_past_retention_and_the_counters_stay(core):
    core.execute("insert into booking_guard.events (kind, rule, entity_type, entity_id, at) "
                 "select 'alert', 'missing_direction', 'call', i::text, now() - interval '2 days' from generate_series(1, 30) i")
    new_call(core, direction=None)   # a fresh alert and its event
    core.execute("select booking_guard.fold_metrics()")

    def counter() -> float:
        return core.execute("select sum(value) from booking_guard.metrics() "
                            "where name = 'data_inconsistency_detected_total'").fetchone()[0]
    before = counter()
    assert before == 31
    core.execute("select booking_guard.set_setting('events_retention', '1 day')")
    purged = core.execute("select booking_guard.purge()").fetchone()[0]
    assert purged["events"] == 30
    assert core.execute("select count(*) from booking_guard.events").fetchone()[0] == 1
    assert counter() == before
    # an event not folded yet is never purged, however old
    core.execute("insert into booking_guard.events (kind, rule, entity_type, entity_id, at) "
                 "values ('alert', 'missing_direction', 'call', '999', now() - interval '5 days')")
    with core.transaction():
        core.execute("update booking_guard.metric_fold_state set horizon = horizon")   # nothing folded since
        assert core.execute("select booking_guard.purge()").fetchone()[0]["events"] == 0


PARTITIONED = """
create sequence pcalls_id_seq;
create table pcalls (like calls including defaults) partition by range (created_at);
alter table pcalls alter column id set default nextval('pcalls_id_seq');
alter table pcalls add primary key (id, created_at);
create table pcalls_2026_11 partition of pcalls for values from ('2026-11-01') to ('2026-12-01');
create table pcalls_2026_12 partition of pcalls for values from ('2026-12-01') to ('2027-01-01');
create table pcalls_default partition of pcalls default;
create sequence pappointments_id_seq;
create table pappointments (like appointments including defaults) partition by range (created_at);
alter table pappointments alter column id set default nextval('pappointments_id_seq');
create table pappointments_default partition of pappointments default;
"""


def test_calls_partitioned_by_time_attach_and_are_guarded(db):
    db.execute(PARTITIONED)
    db.execute("select booking_guard.attach('pcalls', 'pappointments')")
    db.execute("select booking_guard.set_setting('verification_grace', '0')")
    db.execute("insert into companies (id, name) values (1, 'Acme')")
    db.execute("set search_path = public")
    call_id = db.execute("insert into pcalls (retell_call_id, company_id, direction) values ('p1', 1, 'inbound') "
                         "returning id").fetchone()[0]
    result = db.execute("select success, reason from booking_guard.record_booking(%s, 'cal-p1', '{}')", (call_id,)).fetchone()
    assert result == (True, "ok")
    phantom = db.execute("insert into pcalls (retell_call_id, company_id, direction, session_outcome, appointment_made) "
                         "values ('p2', 1, 'inbound', 'appointment_booked', true) returning id").fetchone()[0]
    assert db.execute("select session_outcome from pcalls where id = %s", (phantom,)).fetchone()[0] == "creation_failed"
    db.execute("insert into pcalls (retell_call_id, company_id, direction) values ('p3', 1, null)")
    assert db.execute("select count(*) from pcalls where direction is null").fetchone()[0] == 0
    assert [f[0] for f in db.execute("select rule from booking_guard.detect('1 hour')").fetchall()] == []
    assert "error" not in db.execute("select booking_guard.reconcile()").fetchone()[0]
    assert "error" not in db.execute("select booking_guard.run_monitor()").fetchone()[0]


def test_a_subscriber_acts_on_nothing(attached, scratch):
    """Logical replication between two databases of this cluster: the publisher's booking_guard judges
    the rows; on the subscriber the triggers do not fire for replicated rows and the jobs skip."""
    publisher = attached
    publisher.execute("select booking_guard.set_setting('verification_grace', '0')")
    publisher.execute("create publication bg_pub for table calls, appointments, companies")
    subscriber = scratch("subscriber")
    subscriber.execute(APP_SCHEMA)
    subscriber.execute("create extension booking_guard cascade")
    slot = f"bg_{publisher.info.dbname}"[:60]
    publisher.execute("select pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
    host = SERVER.get("host", "localhost")
    conninfo = f"host={host} port={SERVER.get('port', 5432)} user={SERVER.get('user')} dbname={publisher.info.dbname}"
    try:
        subscriber.execute(f"create subscription bg_sub connection '{conninfo}' publication bg_pub "
                           f"with (create_slot = false, slot_name = '{slot}', copy_data = false)")
        notices = []
        subscriber.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        subscriber.execute("set client_min_messages = warning")
        subscriber.execute("select booking_guard.attach('public.calls', 'public.appointments')")
        assert any("logical replication subscription" in n for n in notices)
        publisher.execute("insert into companies (id, name) values (1, 'Acme')")
        phantom = new_call(publisher, session_outcome="appointment_booked", appointment_made=True)
        deadline = time.monotonic() + 30
        while subscriber.execute("select count(*) from calls where id = %s", (phantom,)).fetchone()[0] == 0:
            assert time.monotonic() < deadline, "the call never reached the subscriber"
            time.sleep(0.1)
        assert flags(subscriber, phantom) == FAILED   # judged once, on the publisher, replicated as it is
        assert subscriber.execute("select count(*) from booking_guard.alerts").fetchone()[0] == 0
        assert "skipped" in subscriber.execute("select booking_guard.reconcile()").fetchone()[0]
    finally:
        subscriber.execute("alter subscription bg_sub disable")
        subscriber.execute("alter subscription bg_sub set (slot_name = none)")
        subscriber.execute("drop subscription if exists bg_sub")
        publisher.execute("select pg_drop_replication_slot(%s)", (slot,))


def test_pg_cron_on_a_socket_only_server_is_said(db):
    unreachable = "select booking_guard_internal.cron_unreachable(%s, %s, %s)"
    assert db.execute(unreachable, ("off", "localhost", "")).fetchone()[0].startswith("cron.host is localhost")
    assert db.execute(unreachable, ("off", None, "")).fetchone()[0] is not None
    assert db.execute(unreachable, ("on", "localhost", "")).fetchone()[0] is None
    assert db.execute(unreachable, ("off", "/var/run/postgresql", "")).fetchone()[0] is None
    assert db.execute(unreachable, ("off", "localhost", "127.0.0.1")).fetchone()[0] is None
