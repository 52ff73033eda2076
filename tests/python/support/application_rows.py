"""Rows an application writes into the reference tables (calls, appointments), one statement at a
time, and what booking_guard's triggers made of them: a call's flags, its alerts, its review items.

For the trigger tests (fixture `core`: company 1 exists, claims are judged at COMMIT)."""

import itertools

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

_serial = itertools.count(1)

#: A call's (session_outcome, appointment_made, appointment_link_status) in each settled state.
BOOKED = ("appointment_booked", True, "linked")
CANCELLED = ("appointment_cancelled", False, "unlinked")
FAILED = ("creation_failed", False, "creation_failed")


def set_rule(db: psycopg.Connection, rule: str, mode: str) -> None:
    db.execute("select booking_guard.set_rule(%s, %s)", (rule, mode))


def insert(db: psycopg.Connection, table: str, cols: dict) -> int:
    query = sql.SQL("insert into {} ({}) values ({}) returning id").format(
        sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, cols)),
        sql.SQL(", ").join(sql.Placeholder() * len(cols)))
    return db.execute(query, list(cols.values())).fetchone()[0]


def new_call(db: psycopg.Connection, **cols) -> int:
    """A call of company 1 with a fresh Retell id; `cols` override or add columns."""
    cols.setdefault("retell_call_id", f"retell-{next(_serial)}")
    cols.setdefault("company_id", 1)
    cols.setdefault("direction", "inbound")
    return insert(db, "calls", cols)


def call_to_book(db: psycopg.Connection, retell_id: str, booking_id: str | None = None) -> int:
    """A call of company 1 (created if missing) with this Retell id, as an application writes it
    before it records the call's booking (record_booking())."""
    db.execute("insert into companies (id, name) values (1, 'c1') on conflict do nothing")
    return db.execute(
        "insert into calls (retell_call_id, company_id, direction, booking_id) values (%s, 1, 'inbound', %s) returning id",
        (retell_id, booking_id),
    ).fetchone()[0]


def new_appointment(db: psycopg.Connection, call_id: int | None, **cols) -> int:
    """An appointment of company 1 with a fresh Cal.com booking id, for `call_id` (or none)."""
    cols.setdefault("calcom_v2_booking_id", f"cal-{next(_serial)}")
    cols.setdefault("company_id", 1)
    return insert(db, "appointments", {"call_id": call_id, **cols})


def call_row(db: psycopg.Connection, call_id: int) -> dict:
    with db.cursor(row_factory=dict_row) as cur:
        return cur.execute("select * from calls where id = %s", (call_id,)).fetchone()


def link_of(db: psycopg.Connection, call_id: int) -> tuple:
    """The call's (customer_link_status, customer_link_method, customer_link_confidence)."""
    row = call_row(db, call_id)
    return (row["customer_link_status"], row["customer_link_method"], row["customer_link_confidence"])


def flags(db: psycopg.Connection, call_id: int) -> tuple:
    """The call's (session_outcome, appointment_made, appointment_link_status): compare with BOOKED..."""
    return db.execute("select session_outcome, appointment_made, appointment_link_status from calls where id = %s",
                      (call_id,)).fetchone()


def alerts(db: psycopg.Connection, alert_type: str | None = None, call_id: int | None = None) -> list[dict]:
    with db.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            """select * from booking_guard.alerts
                where (%(t)s::text is null or alert_type = %(t)s) and (%(c)s::text is null or entity_id = %(c)s)
                order by id""",
            {"t": alert_type, "c": None if call_id is None else str(call_id)}).fetchall()


def review_items(db: psycopg.Connection, call_id: int) -> list[tuple]:
    return db.execute("select reason, priority, status from booking_guard.review_queue where call_id = %s order by id",
                      (call_id,)).fetchall()
