"""Rows planted for detection: companies, calls and appointments written straight into the
reference tables, each with its own company id and random external ids, so that a test can plant
exactly the inconsistency a rule looks for (dict values are stored as jsonb)."""

import uuid

from psycopg import sql
from psycopg.types.json import Jsonb


def company(db) -> int:
    return db.execute("insert into companies (name) values ('acme') returning id").fetchone()[0]


def insert(db, table: str, **cols) -> int:
    query = sql.SQL("insert into {} ({}) values ({}) returning id").format(
        sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, cols)),
        sql.SQL(", ").join(sql.Placeholder() * len(cols)))
    return db.execute(query, [Jsonb(v) if isinstance(v, dict) else v for v in cols.values()]).fetchone()[0]


def call(db, company_id: int, **cols) -> int:
    values = {"retell_call_id": f"retell-{uuid.uuid4().hex[:12]}", "company_id": company_id, "direction": "inbound"}
    values.update(cols)
    return insert(db, "calls", **values)


def lone_call(db, retell_call_id: str, **cols) -> int:
    """A call with this Retell id, of a company of its own."""
    return call(db, company(db), retell_call_id=retell_call_id, **cols)


def appointment(db, call_id: int | None, booking: str | None = None, **cols) -> int:
    values = {"call_id": call_id, "calcom_v2_booking_id": booking or f"cal-{uuid.uuid4().hex[:10]}",
              "source": "retell_webhook"}
    values.update(cols)
    return insert(db, "appointments", **values)


def booked_call(db, company_id: int, booking: str | None = None) -> tuple[int, str]:
    """A clean booking, the way the application writes it: call, appointment, then the call's flags."""
    booking = booking or f"cal-{uuid.uuid4().hex[:10]}"
    with db.transaction():
        call_id = call(db, company_id)
        appointment(db, call_id, booking)
        db.execute("update calls set appointment_made = true, session_outcome = 'appointment_booked', "
                   "booking_id = %s, booking_confirmed = true, call_successful = true where id = %s", (booking, call_id))
    return call_id, booking
