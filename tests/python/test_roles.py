"""The roles do what the docs give them and nothing more.

booking_guard_app       the booking path, the circuit breaker, retries
booking_guard_monitor   read-only: views, metrics, reports (the exporter's scrapes)
booking_guard_serve     what `booking-guard serve` runs: the alert relay and the verification loop
booking_guard_admin     settings, rules, review queue, breakers by hand, jobs; attach/detach with
                        the table owner's rights
booking_guard_owner     owns booking_guard's privileged functions; no rights on the application
booking_guard_worker    the identity of booking_guard's own writes to the application tables

Every grant and every privileged function's owner is compared with tests/expected/grants.txt,
so that a new grant shows up as a diff in review.
"""

import os
from pathlib import Path

import psycopg
import pytest
from conftest import APP_TABLE_GRANTS
from support.application_rows import alerts, call_row, new_call

EXPECTED = Path(__file__).resolve().parents[1] / "expected" / "grants.txt"

# Every privilege on booking_guard's objects, every SECURITY DEFINER function with its owner, the
# role attributes of booking_guard's roles, and what attach() grants on the application tables.
GRANTS_SQL = """
with objects as (
    select 'table' as kind, c.oid::regclass::text as name, c.relacl as acl, c.relowner as owner
      from pg_class c join pg_namespace n on n.oid = c.relnamespace
     where n.nspname like 'booking\\_guard%' and c.relkind in ('r', 'v', 'S', 'p')
    union all
    select case when p.prokind = 'p' then 'procedure' else 'function' end, p.oid::regprocedure::text, p.proacl, p.proowner
      from pg_proc p join pg_namespace n on n.oid = p.pronamespace
     where n.nspname like 'booking\\_guard%'
    union all
    select 'schema', n.nspname, n.nspacl, n.nspowner from pg_namespace n where n.nspname like 'booking\\_guard%'
),
acl as (
    select o.kind, o.name, a.grantee, a.privilege_type
      from objects o cross join lateral aclexplode(o.acl) a
     where a.grantee <> o.owner
)
select format('%s %s: %s', o.kind, o.name,
              coalesce((select string_agg(g, ', ' order by g)
                          from (select format('%s=%s', case when a.grantee = 0 then 'PUBLIC' else a.grantee::regrole::text end,
                                              a.privilege_type) as g
                                  from acl a where a.kind = o.kind and a.name = o.name) x), '-'))
  from objects o
union all
select format('security definer %s owned by %s', p.oid::regprocedure::text, p.proowner::regrole)
  from pg_proc p join pg_namespace n on n.oid = p.pronamespace
 where n.nspname like 'booking\\_guard%' and p.prosecdef
union all
select format('role %s: super=%s login=%s bypassrls=%s member of %s', r.rolname, r.rolsuper, r.rolcanlogin, r.rolbypassrls,
              coalesce((select string_agg(m.roleid::regrole::text, ', ' order by m.roleid::regrole::text)
                          from pg_auth_members m where m.member = r.oid), '-'))
  from pg_roles r where r.rolname like 'booking\\_guard\\_%'
union all
select format('application %s%s: %s', c.relname, coalesce('.' || a.attname, ''),
              string_agg(format('%s=%s', x.grantee::regrole, x.privilege_type), ', '
                         order by x.grantee::regrole::text, x.privilege_type))
  from pg_class c
  left join pg_attribute a on a.attrelid = c.oid and a.attnum > 0
  cross join lateral aclexplode(case when a.attnum is null then c.relacl else a.attacl end) x
 where c.oid in ('public.calls'::regclass, 'public.appointments'::regclass)
   and x.grantee::regrole::text like 'booking\\_guard\\_%'
 group by c.relname, a.attname
order by 1
"""


def grants(db: psycopg.Connection) -> list[str]:
    return [row[0] for row in db.execute(GRANTS_SQL).fetchall()]


def test_every_grant_is_the_expected_one(attached):
    """To accept a change on purpose: BG_WRITE_EXPECTED=1 make test, then review the diff."""
    actual = "\n".join(grants(attached)) + "\n"
    if os.environ.get("BG_WRITE_EXPECTED"):
        EXPECTED.parent.mkdir(exist_ok=True)
        EXPECTED.write_text(actual)
    assert actual == EXPECTED.read_text()


def test_no_privileged_function_is_owned_by_a_superuser(db):
    owners = db.execute("""
        select p.oid::regprocedure::text, r.rolname, r.rolsuper
          from pg_proc p join pg_namespace n on n.oid = p.pronamespace join pg_roles r on r.oid = p.proowner
         where n.nspname like 'booking\\_guard%' and p.prosecdef""").fetchall()
    assert owners
    assert [o for o in owners if o[2] or o[1] != "booking_guard_owner"] == []


def test_booking_guards_own_roles_hold_nothing_dangerous(db):
    rows = db.execute("""select rolname, rolsuper, rolcanlogin, rolcreaterole, rolcreatedb, rolreplication, rolbypassrls
                           from pg_roles where rolname like 'booking\\_guard\\_%' order by 1""").fetchall()
    assert {r[0] for r in rows} >= {"booking_guard_app", "booking_guard_monitor", "booking_guard_admin",
                                   "booking_guard_serve", "booking_guard_owner", "booking_guard_worker"}
    assert [r for r in rows if any(r[1:])] == []


def test_the_privileged_owner_has_no_right_on_the_application(attached):
    assert attached.execute("""
        select has_table_privilege('booking_guard_owner', 'public.calls', 'select, insert, update, delete'),
               has_table_privilege('booking_guard_owner', 'public.appointments', 'select, insert, update, delete'),
               has_any_column_privilege('booking_guard_owner', 'public.calls', 'select, insert, update'),
               has_any_column_privilege('booking_guard_owner', 'public.appointments', 'select, insert, update')
    """).fetchone() == (False, False, False, False)
    views = attached.execute("""select c.relname, c.reloptions from pg_class c
                                 where c.oid in ('booking_guard_internal.guarded_calls'::regclass,
                                                 'booking_guard_internal.guarded_appointments'::regclass)""").fetchall()
    assert all("security_invoker=true" in (options or []) for _, options in views)


# -- a writer with DML rights only -------------------------------------------------------------

def test_a_dml_only_writer_gets_every_rule(core, login_role):
    """0.1.0: permission denied for schema booking_guard on every row the C trigger handed to PL/pgSQL."""
    _, writer = login_role(grants=APP_TABLE_GRANTS)
    assert writer.execute("select has_schema_privilege('booking_guard', 'usage')").fetchone()[0] is False
    no_direction = new_call(writer, direction=None)
    phantom = new_call(writer, session_outcome="appointment_booked", appointment_made=False)
    customer = new_call(writer, customer_id=1, customer_link_status="unlinked")
    assert call_row(core, no_direction)["direction"] == "inbound"
    assert call_row(core, phantom)["session_outcome"] == "creation_failed"
    assert call_row(core, customer)["customer_link_status"] == "linked"
    assert {a["alert_type"] for a in alerts(core)} >= {"missing_direction", "missing_appointment", "customer_link"}


# -- booking_guard_admin ------------------------------------------------------------------------

def test_the_admin_role_does_what_it_is_for(db, login_role):
    admin, conn = login_role("booking_guard_admin", grants=("grant create on schema public to {role}",))
    for table in ("calls", "appointments"):
        db.execute(f"alter table public.{table} owner to {admin}")
    conn.execute("select booking_guard.attach('public.calls', 'public.appointments')")
    conn.execute("select booking_guard.set_rule('missing_direction', 'observe')")
    conn.execute("select booking_guard.set_setting('verification_grace', '2 seconds')")
    conn.execute("insert into booking_guard.circuit_policies (key_pattern, failure_threshold) values ('x:%', 5)")
    conn.execute("select booking_guard.reconcile()")
    conn.execute("select booking_guard.run_monitor()")
    conn.execute("call booking_guard.run_job('reconcile')")
    assert conn.execute("select count(*) from booking_guard.review_queue").fetchone()[0] == 0
    conn.execute("select booking_guard.detach()")
    assert db.execute("select count(*) from booking_guard.attachment").fetchone()[0] == 0


def test_attach_needs_the_table_owner(db, login_role):
    _, conn = login_role("booking_guard_admin")   # not the owner of the tables
    with pytest.raises(psycopg.Error) as caught:
        conn.execute("select booking_guard.attach('public.calls', 'public.appointments')")
    assert caught.value.sqlstate == "BG003"
    assert "owner" in caught.value.diag.message_primary
    assert caught.value.diag.message_hint


# -- booking_guard_monitor is read-only, booking_guard_serve acknowledges only its claims --------

def raise_alert(db: psycopg.Connection, entity: str) -> int:
    new_call(db, direction=None, retell_call_id=f"retell-{entity}")
    return db.execute("select max(id) from booking_guard.alerts").fetchone()[0]


def test_the_monitor_cannot_silence_paging(core, login_role):
    alert_id = raise_alert(core, "m1")
    _, monitor = login_role("booking_guard_monitor")
    for statement in (f"select booking_guard.alerts_delivered('relay-x', array[{alert_id}]::bigint[])",
                      "select booking_guard.digest_sent('relay-x', now(), 0)",
                      "select * from booking_guard.claim_alerts('relay-x')",
                      f"select booking_guard.acknowledge_alert({alert_id})",
                      "select * from booking_guard.verify_due()",
                      "update booking_guard.alerts set delivered_at = now()"):
        with pytest.raises(psycopg.Error) as caught:
            monitor.execute(statement)
        assert caught.value.sqlstate == "42501", statement
    assert core.execute("select delivered_at from booking_guard.alerts where id = %s", (alert_id,)).fetchone()[0] is None


def test_the_relay_acknowledges_only_what_it_claimed(core, login_role):
    first = raise_alert(core, "r1")
    _, relay = login_role("booking_guard_serve")
    _, other = login_role("booking_guard_serve")
    claimed = [r[0] for r in relay.execute("select id from booking_guard.claim_alerts('relay-a', 1)").fetchall()]
    assert claimed == [first]
    second = raise_alert(core, "r2")
    # another relay (and another role) cannot mark the claimed alert, nor one nobody claimed
    assert other.execute("select booking_guard.alerts_delivered('relay-a', %s)", ([first, second],)).fetchone()[0] == 0
    assert relay.execute("select booking_guard.alerts_delivered('relay-a', %s)", ([second],)).fetchone()[0] == 0
    assert relay.execute("select booking_guard.alerts_delivered('relay-a', %s)", ([first],)).fetchone()[0] == 1
    delivered = dict(core.execute("select id, delivered_at is not null from booking_guard.alerts").fetchall())
    assert delivered == {first: True, second: False}
    # the digest likewise: only a claimed one can be marked sent
    assert other.execute("select booking_guard.digest_sent('relay-b', now(), 0)").fetchone()[0] is False
    period = relay.execute("select period_end from booking_guard.claim_digest('relay-a', '1 second')").fetchone()[0]
    assert other.execute("select booking_guard.digest_sent('relay-b', %s, 0)", (period,)).fetchone()[0] is False
    assert relay.execute("select booking_guard.digest_sent('relay-a', %s, 0)", (period,)).fetchone()[0] is True


def test_the_app_role_cannot_run_jobs_or_read_findings(core, login_role):
    _, app = login_role("booking_guard_app", grants=APP_TABLE_GRANTS)
    for statement in ("select booking_guard.reconcile()", "select booking_guard.run_monitor()",
                      "call booking_guard.run_job('reconcile')", "select * from booking_guard.detect()",
                      "select * from booking_guard.alerts", "select booking_guard.set_rule('phantom_booking', 'off')"):
        with pytest.raises(psycopg.Error) as caught:
            app.execute(statement)
        assert caught.value.sqlstate == "42501", statement
