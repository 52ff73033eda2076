"""The extension's life cycle and attach() on tables that are not the reference ones."""

import psycopg
import pytest
from conftest import APP_SCHEMA
from psycopg import sql

QUOTED_SCHEMA = "Booking Data"


def install_app_schema(conn: psycopg.Connection, schema: str, prefix: str) -> tuple[str, str]:
    """The reference tables in `schema`, renamed to mixed-case names that need quoting."""
    conn.execute(sql.SQL("create schema {}").format(sql.Identifier(schema)))
    conn.execute(sql.SQL("set search_path = {}").format(sql.Identifier(schema)))
    conn.execute(APP_SCHEMA.read_text())
    calls, appointments = f"{prefix}Calls", f"{prefix}Appointments"
    conn.execute(sql.SQL("alter table calls rename to {}").format(sql.Identifier(calls)))
    conn.execute(sql.SQL("alter table appointments rename to {}").format(sql.Identifier(appointments)))
    conn.execute("reset search_path")
    return calls, appointments


def qualified(schema: str, table: str) -> str:
    return psycopg.sql.Identifier(schema, table).as_string(None)


def test_attach_in_another_schema_with_quoted_names(db):
    calls, appointments = install_app_schema(db, QUOTED_SCHEMA, "Guarded ")
    row = db.execute(
        "select calls_table::oid, appointments_table::oid, created_indexes from booking_guard.attach(%s, %s)",
        (qualified(QUOTED_SCHEMA, calls), qualified(QUOTED_SCHEMA, appointments)),
    ).fetchone()
    expected = db.execute(
        "select %s::regclass::oid, %s::regclass::oid",
        (qualified(QUOTED_SCHEMA, calls), qualified(QUOTED_SCHEMA, appointments)),
    ).fetchone()
    assert (row[0], row[1]) == expected
    assert len(row[2]) == 5
    # the created indexes exist on the quoted tables, under the quoted schema
    indexed = db.execute(
        "select count(*) from pg_index where indrelid in (%s::regclass, %s::regclass)",
        (qualified(QUOTED_SCHEMA, calls), qualified(QUOTED_SCHEMA, appointments)),
    ).fetchone()[0]
    assert indexed >= 5 + 2  # ours + the two primary keys
    for index_name in row[2]:
        assert index_name.startswith('"Booking Data".')
        assert db.execute("select to_regclass(%s) is not null", (index_name,)).fetchone()[0]


def test_attach_reports_every_problem_of_quoted_tables(db):
    db.execute('create schema "Odd"')
    db.execute('create table "Odd"."My Calls" (id bigint primary key, "Direction" text, appointment_made int)')
    db.execute('create table "Odd"."My Appts" (id bigint primary key, call_id bigint)')
    with pytest.raises(psycopg.Error) as caught:
        db.execute("""select booking_guard.attach('"Odd"."My Calls"', '"Odd"."My Appts"')""")
    diag = caught.value.diag
    assert diag.sqlstate == "BG003"
    assert '"Odd"."My Calls"' in diag.message_primary
    lines = diag.message_detail.splitlines()
    assert 'calls table "Odd"."My Calls": column appointment_made is integer, expected boolean' in lines
    assert any(line.startswith('calls table "Odd"."My Calls": missing column direction') for line in lines)
    assert 'examples/app_schema.sql' in diag.message_hint
    assert db.execute("select count(*) from booking_guard.attached_tables").fetchone()[0] == 0
    # and nothing was indexed
    assert db.execute("""select count(*) from pg_index where indrelid = '"Odd"."My Appts"'::regclass""").fetchone()[0] == 1


def test_attach_keeps_existing_indexes(db):
    db.execute("create index my_own_call_idx on appointments (call_id, created_at)")
    created = db.execute("select created_indexes from booking_guard.attach('calls', 'appointments')").fetchone()[0]
    assert "public.appointments_call_id_bg_idx" not in created
    assert len(created) == 4


def test_create_drop_and_recreate_extension(empty_db):
    conn = empty_db
    conn.autocommit = True
    conn.execute(APP_SCHEMA.read_text())
    conn.execute("create extension booking_guard cascade")
    rules = conn.execute("select count(*) from booking_guard.rules").fetchone()[0]
    conn.execute("select booking_guard.set_setting('verification_grace', '0')")
    conn.execute("select booking_guard.attach('calls', 'appointments')")
    conn.execute("insert into companies (name) values ('Acme')")
    conn.execute("insert into calls (retell_call_id, company_id) values ('r1', 1)")

    # while attached, the triggers depend on the extension: DROP EXTENSION needs detach() first
    with pytest.raises(psycopg.errors.DependentObjectsStillExist):
        conn.execute("drop extension booking_guard")
    conn.execute("select booking_guard.detach()")
    conn.execute("drop extension booking_guard")
    # PostgreSQL creates the control file's schema without making it a member of the extension: it
    # stays behind, empty, and CREATE EXTENSION reuses it.
    assert conn.execute("select count(*) from pg_class where relnamespace = 'booking_guard'::regnamespace").fetchone()[0] == 0
    assert conn.execute("select count(*) from pg_proc where pronamespace = 'booking_guard'::regnamespace").fetchone()[0] == 0
    # application data is not the extension's: it survives, and no trigger of ours is left on it
    assert conn.execute("select count(*) from calls").fetchone()[0] == 1
    assert conn.execute(
        "select count(*) from pg_trigger where tgrelid = 'calls'::regclass and not tgisinternal").fetchone()[0] == 0

    conn.execute("create extension booking_guard")
    assert conn.execute("select booking_guard.setting('verification_grace')").fetchone()[0] == "00:00:05"
    assert conn.execute("select count(*) from booking_guard.rules").fetchone()[0] == rules
    row = conn.execute("select calls_table::text from booking_guard.attach('calls', 'appointments')").fetchone()
    assert row[0] == "calls"
