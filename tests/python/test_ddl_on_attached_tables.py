"""DDL a table owner may run on the attached tables leaves booking_guard working, or is refused
with BG003 and a hint; the C module re-checks every column type it reads and never crashes.

On 0.1.0, renaming a required column and adding another of the old name and a different type
crashed the server on the next write (signal 11: every session killed); dropping a column with
CASCADE silently dropped the guarded views and every claiming write failed afterwards.
"""

import psycopg
import pytest
from support.application_rows import BOOKED, FAILED, flags, new_appointment, new_call


def assert_refused(caught: pytest.ExceptionInfo, *words: str) -> None:
    diag = caught.value.diag
    assert diag.sqlstate == "BG003", diag.message_primary
    for word in words:
        assert word in f"{diag.message_primary} {diag.message_detail}"
    assert diag.message_hint


def still_guarded(db: psycopg.Connection) -> None:
    """A phantom is still rolled back at COMMIT, a booking still stands."""
    phantom = new_call(db, session_outcome="appointment_booked", appointment_made=True)
    assert flags(db, phantom) == FAILED
    with db.transaction():
        call_id = new_call(db)
        new_appointment(db, call_id)
        db.execute("update calls set appointment_made = true, session_outcome = 'appointment_booked' where id = %s",
                   (call_id,))
    assert flags(db, call_id) == BOOKED


@pytest.mark.parametrize("ddl, words", [
    ("alter table calls rename column session_outcome to outcome", ["calls", "session_outcome"]),
    ("alter table appointments rename column call_id to the_call", ["call_id"]),
    ("alter table calls drop column customer_link_method cascade", ["customer_link_method"]),
    ("alter table appointments drop column staff_id cascade", ["staff_id"]),
    ("drop view booking_guard_internal.guarded_calls", ["guarded_calls"]),
    ("drop view booking_guard_internal.guarded_appointments cascade", ["guarded_appointments"]),
    ("alter table calls drop constraint calls_pkey", ["id"]),
])
def test_ddl_that_would_break_the_attachment_is_refused(core, ddl, words):
    with pytest.raises(psycopg.Error) as caught:
        core.execute(ddl)
    assert_refused(caught, *words)
    still_guarded(core)


@pytest.mark.parametrize("ddl, sqlstate", [
    # PostgreSQL itself refuses these while the guarded views read the column
    ("alter table calls drop column customer_link_method", "2BP01"),
    ("alter table calls alter column appointment_made type text using appointment_made::text", "0A000"),
    ("alter table appointments alter column call_id type text", "0A000"),
])
def test_ddl_postgresql_refuses_for_the_guarded_views(core, ddl, sqlstate):
    with pytest.raises(psycopg.Error) as caught:
        core.execute(ddl)
    assert caught.value.sqlstate == sqlstate
    assert "guarded_" in (caught.value.diag.message_detail or "")
    still_guarded(core)


@pytest.mark.parametrize("ddl", [
    "alter table calls add column notes text",
    "alter table appointments add column room integer",
    "alter table appointments drop column starts_at",
    "alter table appointments rename to bookings",
    "create index on calls (session_outcome)",
    "drop index appointments_call_id_bg_idx",
])
def test_ddl_that_keeps_the_attachment_is_allowed(core, ddl):
    core.execute(ddl)
    if "bookings" in ddl:
        core.execute("create view appointments as select * from bookings")   # the helpers write `appointments`
        assert core.execute("select appointments_table::text from booking_guard.attachment").fetchone()[0] == "bookings"
    still_guarded(core)


def test_the_renamed_and_retyped_column_crash(core):
    """The 0.1.0 crash: rename session_outcome, add an integer session_outcome, update a row. The
    DDL is refused now; with event triggers disabled (replica role) the C check refuses the write."""
    call_id = new_call(core)
    with pytest.raises(psycopg.Error) as caught:
        core.execute("alter table calls rename column session_outcome to outcome_text")
    assert_refused(caught, "session_outcome")
    with core.transaction():
        core.execute("set local session_replication_role = replica")   # event triggers do not fire
        core.execute("alter table calls rename column session_outcome to outcome_text")
        core.execute("alter table calls add column session_outcome integer")
    with pytest.raises(psycopg.Error) as caught:
        core.execute("update calls set appointment_made = true where id = %s", (call_id,))
    assert_refused(caught, "session_outcome", "integer")
    assert core.execute("select 1").fetchone()[0] == 1   # the server is up


def test_every_required_column_is_type_checked_by_the_c_module(core):
    """Whatever a required column became behind booking_guard's back, a write is a BG003, never a crash."""
    # the columns the C module reads as a type on every write of calls (company_id it only prints,
    # whatever its type; the rest are read by SQL, which checks types itself)
    columns = [(c,) for c in ("direction", "session_outcome", "appointment_made", "appointment_link_status",
                              "appointment_linked_at", "customer_id", "customer_link_status", "customer_linked_at",
                              "customer_link_method", "customer_link_confidence")]
    core.execute("alter table calls add column touched integer not null default 0")
    for (column,) in columns:
        call_id = new_call(core)
        with core.transaction():
            core.execute("set local session_replication_role = replica")
            core.execute(f"alter table calls rename column {column} to {column}_was")
            core.execute(f"alter table calls add column {column} point")
        with pytest.raises(psycopg.Error) as caught:
            core.execute("update calls set touched = touched + 1 where id = %s", (call_id,))
        assert caught.value.sqlstate == "BG003", column
        assert column in caught.value.diag.message_primary
        with core.transaction():
            core.execute("set local session_replication_role = replica")
            core.execute(f"alter table calls drop column {column}")
            core.execute(f"alter table calls rename column {column}_was to {column}")
    still_guarded(core)


def test_changing_a_booked_calls_id_does_not_escape_the_commit_check(core):
    with core.transaction():
        call_id = new_call(core)
        new_appointment(core, call_id)
        core.execute("update calls set appointment_made = true, session_outcome = 'appointment_booked' where id = %s",
                     (call_id,))
    assert flags(core, call_id) == BOOKED
    core.execute("update calls set id = id + 1000000 where id = %s", (call_id,))
    # the call under its new id claims a booking no appointment stands behind
    assert flags(core, call_id + 1000000) == FAILED


@pytest.mark.parametrize("name", ["ü" * 30, "c" * 58, "calls_" + "ß" * 27])
def test_long_and_multibyte_table_names_attach(db, name):
    """0.1.0 cut index names by characters: names within a few bytes of PostgreSQL's 63 got two
    indexes of one name (42P07)."""
    db.execute(f"""create table "{name}" (like calls including all);
                   create table "{name}_a" (like appointments including all)""")
    created = db.execute(f"""select created_indexes
                               from booking_guard.attach('public."{name}"', 'public."{name}_a"')""").fetchone()[0]
    assert len(created) == 5
    assert len(set(created)) == 5
    assert all(len(ix.encode()) <= 63 * 2 + 5 for ix in created)
    db.execute("select booking_guard.detach()")
