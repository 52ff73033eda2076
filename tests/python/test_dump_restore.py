"""pg_dump keeps the user's settings, rules (declared ones too) and attachment; a restore does not fail
on the rows CREATE EXTENSION seeded again."""

import contextlib
import subprocess
from collections.abc import Iterator

import psycopg
from conftest import pg_tool, tool_args


@contextlib.contextmanager
def restored_copy(db: psycopg.Connection) -> Iterator[psycopg.Connection]:
    """A connection to a new database of the same server restored from pg_dump of db's; dropped after."""
    target = f"{db.info.dbname}_restored"
    admin = psycopg.connect(
        host=db.info.host, port=db.info.port, user=db.info.user, dbname="postgres", autocommit=True)
    try:
        admin.execute(f'drop database if exists "{target}"')
        admin.execute(f'create database "{target}"')
        dump = subprocess.run([pg_tool("pg_dump"), *tool_args(db.info.dbname)], check=True, capture_output=True,
                              text=True)
        restore = subprocess.run([pg_tool("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", *tool_args(target)],
                                 input=dump.stdout, capture_output=True, text=True)
        assert restore.returncode == 0, restore.stderr
        with psycopg.connect(host=db.info.host, port=db.info.port, user=db.info.user, dbname=target) as restored:
            yield restored
    finally:
        admin.execute(f'drop database if exists "{target}" with (force)')
        admin.close()


def test_dump_and_restore_keeps_configuration(db, connect):
    db.execute("select booking_guard.set_setting('verification_grace', '0')")
    db.execute("select booking_guard.set_rule('missing_direction', 'observe')")
    db.execute("select booking_guard.attach('calls', 'appointments')")
    # history too: a phantom rolled back leaves an alert, a review item and events
    db.execute("insert into companies (name) values ('dumped')")
    db.execute("insert into calls (retell_call_id, company_id, direction, session_outcome, appointment_made)"
               " select 'dump-1', max(id), 'inbound', 'appointment_booked', true from companies")
    history = db.execute("select (select count(*) from booking_guard.alerts), (select count(*) from booking_guard.review_queue),"
                         " (select count(*) from booking_guard.events),"
                         " (select count(*) from booking_guard.review_notifications)").fetchone()
    assert history[0] >= 1 and history[1] == 1
    assert history[3] == 1   # the urgent item not sent yet: the relay sends it from the restored database
    rules = db.execute("select count(*) from booking_guard.rules").fetchone()[0]
    with restored_copy(db) as restored:
        assert restored.execute("select booking_guard.setting('verification_grace')").fetchone()[0] == "00:00:00"
        assert restored.execute(
            "select mode from booking_guard.rules where name = 'missing_direction'").fetchone()[0] == "observe"
        # every seeded row once: the restored rows replaced their freshly seeded twins
        assert restored.execute("select count(*) from booking_guard.rules").fetchone()[0] == rules
        assert restored.execute(
            "select calls_table::text, appointments_table::text from booking_guard.attachment").fetchone() == (
            "calls", "appointments")
        assert restored.execute(
            "select (select count(*) from booking_guard.alerts), (select count(*) from booking_guard.review_queue),"
            " (select count(*) from booking_guard.events),"
            " (select count(*) from booking_guard.review_notifications)").fetchone() == history
        # the identity sequences came along: a new alert does not collide with a restored one
        restored.execute("select booking_guard_internal.raise_alert('restore_check', 'info', 'call', '0', 'after restore')")
        restored.commit()


def test_a_declared_rule_survives_dump_and_restore(db, login_role):
    reader, _ = login_role(grants=("grant select on calls, appointments to {role}",))
    db.execute("select booking_guard.attach('calls', 'appointments')")
    db.execute("insert into companies (name) values ('dumped')")
    db.execute("insert into calls (retell_call_id, company_id, direction, session_outcome, booking_id)"
               " select 'dump-t', max(id), 'inbound', 'transferred', 'cal-t' from companies")
    db.execute("select booking_guard.declare_rule('transfer_with_booking', 'call',"
               " $$c.session_outcome = 'transferred' and c.booking_id is not null$$, 'warning', 'observe',"
               " 'was transferred but carries a booking id', %s)", (reader,))
    declared = db.execute("select name, entity_type, predicate, run_as::text, declared_by from booking_guard.rules"
                          " where predicate is not null").fetchall()
    with restored_copy(db) as restored:
        assert restored.execute("select name, entity_type, predicate, run_as::text, declared_by from booking_guard.rules"
                                " where predicate is not null").fetchall() == declared
        assert restored.execute("select c.retell_call_id from booking_guard.detect_rule('transfer_with_booking') f"
                                " join calls c on c.id::text = f.entity_id").fetchall() == [("dump-t",)]
