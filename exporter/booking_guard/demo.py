"""`booking-guard demo`: what booking_guard is guarding, shown on a database of its own.

On an empty database it creates the reference application schema (examples/app_schema.sql)
and the extension, attaches booking_guard to `calls` and `appointments`, and prints what a
newcomer needs to see: versions, the attachment, the rules and their modes, the settings.
"""

from pathlib import Path

import psycopg

from booking_guard.display import heading, table

APP_SCHEMA = Path(__file__).resolve().parents[2] / "examples" / "app_schema.sql"


def prepare(conn: psycopg.Connection) -> None:
    """Reference schema, extension and attachment, each only when missing."""
    if conn.execute("select to_regclass('public.calls') is null").fetchone()[0]:
        conn.execute(APP_SCHEMA.read_text())
    conn.execute("create extension if not exists booking_guard cascade")
    if conn.execute("select not exists (select from booking_guard.attachment)").fetchone()[0]:
        conn.execute("select booking_guard.attach('public.calls', 'public.appointments')")


def run(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.add_notice_handler(lambda notice: None)
        prepare(conn)

        print(heading("booking_guard demo"))
        print("booking_guard keeps calls.appointment_made and session_outcome true to the appointment rows.\n")

        print(heading("What it runs on"))
        print(table(conn.execute("select component, version from booking_guard.environment()")))

        print(heading("What it guards (booking_guard.attachment)"))
        print(table(conn.execute(
            "select calls_table::text as calls, appointments_table::text as appointments,"
            " array_length(created_indexes, 1) as indexes_created,"
            " coalesce(array_length(triggers, 1), 0) as triggers"
            " from booking_guard.attachment")))

        print(heading("The rules (booking_guard.rules)"))
        print(table(conn.execute(
            "select name, severity, mode, rollout_percent as rollout, description"
            " from booking_guard.rules"
            " order by array_position(array['critical', 'warning', 'info'], severity), name"), wrap={"description": 60}))

        print(heading("Settings (booking_guard.settings)"))
        print(table(conn.execute(
            "select name, booking_guard.setting(name) as value, description"
            " from booking_guard.settings order by name"), wrap={"description": 60}))

        print("Change a rule:    select booking_guard.set_rule('missing_direction', 'observe');")
        print("Change a setting: select booking_guard.set_setting('verification_grace', '0');")
    return 0
