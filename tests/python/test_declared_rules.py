"""Rules administrators declare: a predicate over the calls or the appointments, run with the rights
of a role the administrator chose, is detected, alerted once, repaired, counted, reported and shown
on the status page like a built-in rule; bad SQL is refused at declaration with the parser's
message; a rule never gets more rights than its role has, whoever runs detection."""

import uuid

import psycopg
import pytest
from booking_guard.ops import status_page

READS = ("grant select on calls, appointments to {role}",)


@pytest.fixture
def declarer(attached, login_role):
    """(run_as, admin): a role that may read the attached tables, and an administrator (a member of
    booking_guard_admin and of that role) connected as itself."""
    reader, _ = login_role(grants=READS)
    name, admin = login_role("booking_guard_admin", reader)
    return reader, admin


def company(db) -> int:
    return db.execute("insert into companies (name) values ('acme') returning id").fetchone()[0]


def call(db, company_id: int, **cols) -> int:
    values = {"retell_call_id": f"retell-{uuid.uuid4().hex[:12]}", "company_id": company_id, "direction": "inbound",
              **cols}
    names = ", ".join(values)
    marks = ", ".join(["%s"] * len(values))
    return db.execute(f"insert into calls ({names}) values ({marks}) returning id", list(values.values())).fetchone()[0]


def declare(conn, run_as: str, name: str = "transferred_with_booking", entity: str = "call",
            predicate: str = "c.session_outcome = 'transferred' and c.booking_id is not null",
            severity: str = "warning", mode: str = "observe",
            description: str = "was transferred but carries a booking id", repair: str | None = None,
            label: str | None = None):
    return conn.execute(
        "select r.name, r.entity_type, r.source, r.severity, r.mode, r.default_mode, r.label, r.run_as::text,"
        "       r.declared_by::text, r.repair_kind"
        "  from booking_guard.declare_rule(rule_name => %s, entity => %s, predicate => %s, severity => %s, mode => %s,"
        "                                  description => %s, run_as => %s, repair => %s, label => %s) r",
        (name, entity, predicate, severity, mode, description, run_as, repair, label)).fetchone()


def refused(conn, sqlstate: str, *args, **kwargs) -> psycopg.Error:
    with pytest.raises(psycopg.Error) as caught:
        declare(conn, *args, **kwargs)
    assert caught.value.diag.sqlstate == sqlstate, caught.value.diag.message_primary
    assert caught.value.diag.message_detail
    assert caught.value.diag.message_hint
    return caught.value


def declared(db) -> list[str]:
    return [r[0] for r in db.execute("select name from booking_guard.rules where predicate is not null order by 1")]


def warnings_of(conn) -> list[str]:
    """Collects the warnings the server sends on this connection."""
    seen: list[str] = []
    conn.add_notice_handler(lambda d: seen.append(f"{d.message_primary} {d.message_detail or ''}")
                            if d.severity_nonlocalized == "WARNING" else None)
    return seen


def test_a_declared_rule_is_detected_alerted_once_counted_reported_and_shown(db, declarer):
    reader, admin = declarer
    c = company(db)
    hit = call(db, c, session_outcome="transferred", booking_id="cal-t1")
    call(db, c, session_outcome="transferred")
    call(db, c, session_outcome="no_answer", booking_id="cal-t2")

    row = declare(admin, reader)
    admin_name = admin.execute("select current_user").fetchone()[0]
    assert row == ("transferred_with_booking", "call", "calls", "warning", "observe", "observe",
                   "Transferred With Booking", reader, admin_name, None)

    expected = [("transferred_with_booking", "warning", "call", str(hit))]
    assert db.execute("select rule, severity, entity_type, entity_id from booking_guard.detect('1 hour')"
                      " where rule = 'transferred_with_booking'").fetchall() == expected
    assert db.execute("select rule, severity, entity_type, entity_id"
                      "  from booking_guard.detect_rule('transferred_with_booking')").fetchall() == expected
    assert ("transferred_with_booking",) in db.execute(
        "select rule from booking_guard.check_call(%s)", (hit,)).fetchall()

    # alerted once: a second run is one more occurrence of the same alert
    admin.execute("select booking_guard.run_monitor()")
    admin.execute("select booking_guard.run_monitor()")
    alerts = db.execute("select severity, entity_id, occurrences, description from booking_guard.alerts"
                        " where alert_type = 'transferred_with_booking'").fetchall()
    assert len(alerts) == 1 and alerts[0][:3] == ("warning", str(hit), 2)
    assert alerts[0][3].endswith("was transferred but carries a booking id")

    # counted in the metrics, by its name
    metrics = {(r[0], r[1].get("type") or r[1].get("rule")): r[2] for r in db.execute(
        "select name, labels, value from booking_guard.metrics()"
        " where labels ->> 'type' = 'transferred_with_booking' or labels ->> 'rule' = 'transferred_with_booking'")}
    assert metrics[("data_inconsistency_detected_total", "transferred_with_booking")] == 1
    assert metrics[("booking_guard_open_alerts", "transferred_with_booking")] == 1

    # listed in the daily report under its label
    report = db.execute("select booking_guard.daily_report_json(current_date)").fetchone()[0]
    lines = [b for b in report["breakdown"] if b["rule"] == "transferred_with_booking"]
    assert lines == [{"rule": "transferred_with_booking", "label": "Transferred With Booking", "count": 1,
                      "auto_corrected": 0, "open": 1}]
    assert "Transferred With Booking" in db.execute("select booking_guard.daily_report(current_date)").fetchone()[0]

    # shown on the status page, which reads the alerts: no change on the Python side
    page = status_page.render(status_page.read(db))
    assert "transferred_with_booking" in page and "was transferred but carries a booking id" in page

    # fixed: the next run resolves the alert
    db.execute("update calls set booking_id = null where id = %s", (hit,))
    assert admin.execute("select booking_guard.run_monitor()").fetchone()[0]["resolved"] == 1
    assert db.execute("select resolved_at is not null from booking_guard.alerts"
                      " where alert_type = 'transferred_with_booking'").fetchone() == (True,)


def test_a_rule_on_appointments(db, declarer):
    reader, admin = declarer
    c = company(db)
    owner = call(db, c)
    manual = db.execute("insert into appointments (call_id, calcom_v2_booking_id, source) values (%s, 'cal-m', 'manual')"
                        " returning id", (owner,)).fetchone()[0]
    db.execute("insert into appointments (call_id, calcom_v2_booking_id, source, customer_id)"
               " values (%s, 'cal-n', 'manual', null)", (None,))
    declare(admin, reader, name="manual_with_call", entity="appointment",
            predicate="a.source = 'manual' and a.call_id is not null", severity="info",
            description="was entered by hand for a call")
    assert db.execute("select rule, severity, entity_type, entity_id from booking_guard.detect('1 hour')"
                      " where rule = 'manual_with_call'").fetchall() == [
        ("manual_with_call", "info", "appointment", str(manual))]
    admin.execute("select booking_guard.run_monitor()")
    db.execute("update appointments set source = 'retell_webhook' where id = %s", (manual,))
    assert admin.execute("select booking_guard.run_monitor()").fetchone()[0]["resolved"] == 1


@pytest.mark.parametrize(("predicate", "message"), [
    ("c.direction =", "syntax error at end of input"),
    ("true) or (true", 'syntax error at or near ")"'),
    ("true; delete from public.calls", "the predicate is not one expression"),
    ("true from public.calls", "the predicate is not one expression"),
    ("c.direction = 'x' as flag", "the predicate is not one expression"),
    ("c.no_such_column = 1", "column c.no_such_column does not exist"),
    ("c.id", "must be type boolean"),
    ("a.id = 1", 'missing FROM-clause entry for table "a"'),
    ("calls.id = 1", 'missing FROM-clause entry for table "calls"'),
])
def test_bad_predicate_sql_is_refused_with_the_parsers_message(db, declarer, predicate, message):
    reader, admin = declarer
    error = refused(admin, "BG005", reader, predicate=predicate)
    assert message in error.diag.message_primary
    assert declared(db) == []
    assert db.execute("select count(*) from booking_guard.events where kind = 'rule'").fetchone()[0] == 0


@pytest.mark.parametrize(("repair", "message"), [
    ("update public.calls set direction = 'outbound' where id = $1; delete from public.calls",
     "the repair is not one SELECT, INSERT, UPDATE or DELETE statement"),
    ("select 1 into public.copied", "the repair is not one SELECT, INSERT, UPDATE or DELETE statement"),
    ("truncate public.calls", "the repair is not one SELECT, INSERT, UPDATE or DELETE statement"),
    ("update public.calls set no_such_column = 1 where id = $1", 'column "no_such_column" of relation "calls" does not exist'),
    # the role may read the calls, not write them
    ("update public.calls set direction = 'outbound' where id = $1", "permission denied for table calls"),
])
def test_bad_repair_sql_is_refused_with_the_parsers_message(db, declarer, repair, message):
    reader, admin = declarer
    error = refused(admin, "BG005", reader, repair=repair)
    assert message in error.diag.message_primary
    assert declared(db) == []


@pytest.mark.parametrize("bad", [
    {"name": "Transferred"}, {"name": "x" * 64}, {"name": None}, {"entity": "booking"}, {"predicate": " "},
    {"predicate": "true or " * 600 + "true"}, {"severity": "high"}, {"mode": "correct"}, {"mode": "enforce"},
    {"description": ""}, {"description": "d" * 1001}, {"label": "l" * 201}, {"repair": "r" * 4001},
    {"name": "missing_direction"},      # built in
    {"name": "retry_exhausted"},        # a review reason: an alert type of booking_guard's own
])
def test_bad_input_writes_nothing(db, declarer, bad):
    reader, admin = declarer
    refused(admin, "BG005", reader, **bad)
    assert declared(db) == []
    assert db.execute("select count(*) from booking_guard.rules").fetchone()[0] == 10


def test_the_declarer_must_be_a_member_of_run_as(db, declarer, login_role):
    _, admin = declarer
    stranger, _ = login_role(grants=READS)
    error = refused(admin, "42501", stranger)
    assert "is not a member of" in error.diag.message_detail
    assert declared(db) == []


def test_run_as_may_be_neither_a_superuser_nor_one_of_booking_guards_own(db, attached, login_role):
    superuser = db.execute("select current_user").fetchone()[0]
    holder, _ = login_role("booking_guard_owner", grants=READS)
    for role in (superuser, "booking_guard_worker", "booking_guard_owner", holder):
        # the declarer here is a superuser: a member of every role, so only run_as itself is refused
        error = refused(db, "42501", role)
        assert "may not run as" in error.diag.message_primary
    assert declared(db) == []


def attack_function(db, body: str) -> None:
    db.execute(f"create function public.attack() returns boolean language plpgsql as $f$ begin {body}; return true; end $f$")


@pytest.mark.parametrize(("body", "said"), [
    ("execute format('alter role %I superuser', current_user)", "superuser"),
    ("execute format('grant booking_guard_owner to %I', current_user)", "booking_guard_owner"),
    ("set role postgres", "cannot set parameter \"role\""),
    ("create temporary table stolen (x int)", "security-restricted operation"),
])
def test_a_predicate_gets_no_more_rights_than_run_as(db, declarer, body, said):
    reader, admin = declarer
    attack_function(db, body)
    c = company(db)
    call(db, c, session_outcome="transferred", booking_id="cal-a")
    db.execute("select booking_guard.set_rule('missing_direction', 'observe')")
    call(db, c, direction=None)   # a built-in finding beside it
    declare(admin, reader, name="attacker", predicate="public.attack()")

    # detect() by a superuser, run_monitor() as the worker: the predicate runs as the reader either way
    seen = warnings_of(db)
    found = db.execute("select rule from booking_guard.detect('1 hour')").fetchall()
    assert ("attacker",) not in found and ("missing_direction",) in found
    assert len([w for w in seen if "declared rule attacker was not checked" in w and said in w]) == 1, seen
    db.execute("call booking_guard.run_job('run_monitor')")
    assert len([w for w in seen if "declared rule attacker was not checked" in w and said in w]) >= 2, seen
    assert db.execute("select rolsuper from pg_roles where rolname = %s", (reader,)).fetchone() == (False,)
    assert db.execute("select pg_has_role(%s, 'booking_guard_owner', 'member')", (reader,)).fetchone() == (False,)
    assert db.execute("select count(*) from booking_guard.alerts where alert_type = 'attacker'").fetchone()[0] == 0


def test_the_predicate_runs_as_run_as_whoever_detects(db, declarer, login_role):
    reader, admin = declarer
    db.execute("create table public.seen_as (at_role name, in_session name)")
    db.execute(f"grant insert on public.seen_as to {reader}")
    db.execute("""create function public.note_who() returns boolean language plpgsql as $f$
                  begin insert into public.seen_as values (current_user, session_user); return true; end $f$""")
    c = company(db)
    call(db, c, session_outcome="transferred", booking_id="cal-w")
    declare(admin, reader, name="who_runs_me", predicate="c.booking_id = 'cal-w' and public.note_who()")
    monitor, monitor_conn = login_role("booking_guard_monitor")

    assert db.execute("select count(*) from booking_guard.detect('1 hour') where rule = 'who_runs_me'").fetchone() == (1,)
    assert monitor_conn.execute("select count(*) from booking_guard.detect('1 hour')"
                                " where rule = 'who_runs_me'").fetchone() == (1,)
    db.execute("call booking_guard.run_job('run_monitor')")
    roles = db.execute("select distinct at_role::text from public.seen_as").fetchall()
    assert roles == [(reader,)]
    assert db.execute("select count(distinct in_session) from public.seen_as").fetchone() == (2,)


def test_a_table_run_as_cannot_read_is_refused_or_finds_nothing(db, declarer):
    reader, admin = declarer
    db.execute("create table public.secret (call_id bigint)")
    c = company(db)
    hit = call(db, c)
    db.execute("insert into public.secret values (%s)", (hit,))
    # read directly: the plan names the table, refused at declaration
    error = refused(admin, "BG005", reader, predicate="exists (select from public.secret s where s.call_id = c.id)")
    assert "permission denied for table secret" in error.diag.message_primary
    # read inside a function: only running it tells, and then it finds nothing
    db.execute("create function public.in_secret(id bigint) returns boolean language plpgsql stable"
               " as 'begin return exists (select from public.secret s where s.call_id = id); end'")
    declare(admin, reader, name="secretly", predicate="public.in_secret(c.id)")
    seen = warnings_of(db)
    assert db.execute("select count(*) from booking_guard.detect('1 hour') where rule = 'secretly'").fetchone() == (0,)
    assert any("permission denied for table secret" in w for w in seen), seen


def test_a_predicate_that_runs_too_long_is_cancelled_and_the_others_still_run(db, declarer):
    reader, admin = declarer
    db.execute("create function public.slow() returns boolean language plpgsql"
               " as 'begin perform pg_catalog.pg_sleep(600); return true; end'")
    db.execute("select booking_guard.set_setting('declared_rule_timeout', '0.2 seconds')")
    c = company(db)
    call(db, c, session_outcome="transferred", booking_id="cal-s")
    declare(admin, reader, name="sleeper", predicate="public.slow()")
    declare(admin, reader)
    seen = warnings_of(db)
    found = db.execute("select rule from booking_guard.detect('1 hour') order by 1").fetchall()
    assert found == [("transferred_with_booking",)]
    assert len([w for w in seen if "declared rule sleeper was not checked" in w
                and "ran longer than 200 ms and was cancelled" in w and "BG005" in w]) == 1, seen
    # the cancel was the rule's alone: the session goes on
    assert db.execute("select 1").fetchone() == (1,)


def test_a_role_given_more_after_the_declaration_stops_the_rule(db, declarer):
    reader, admin = declarer
    c = company(db)
    call(db, c, session_outcome="transferred", booking_id="cal-g")
    declare(admin, reader)
    seen = warnings_of(db)
    try:
        db.execute(f"alter role {reader} superuser")
        assert db.execute("select count(*) from booking_guard.detect('1 hour')"
                          " where rule = 'transferred_with_booking'").fetchone() == (0,)
        db.execute(f"alter role {reader} nosuperuser")
        db.execute(f"grant booking_guard_worker to {reader}")
        assert db.execute("select count(*) from booking_guard.detect('1 hour')"
                          " where rule = 'transferred_with_booking'").fetchone() == (0,)
    finally:
        db.execute(f"alter role {reader} nosuperuser")
        db.execute(f"revoke booking_guard_worker from {reader}")
    assert any("it is a superuser" in w for w in seen) and any("rights of booking_guard_worker" in w for w in seen), seen
    assert db.execute("select count(*) from booking_guard.detect('1 hour')"
                      " where rule = 'transferred_with_booking'").fetchone() == (1,)


def test_a_declarer_no_longer_a_member_of_run_as_stops_the_rule(db, declarer):
    reader, admin = declarer
    admin_name = admin.execute("select current_user").fetchone()[0]
    c = company(db)
    call(db, c, session_outcome="transferred", booking_id="cal-m")
    declare(admin, reader)
    count = "select count(*) from booking_guard.detect('1 hour') where rule = 'transferred_with_booking'"
    assert db.execute(count).fetchone() == (1,)
    seen = warnings_of(db)
    db.execute(f"revoke {reader} from {admin_name}")
    assert db.execute(count).fetchone() == (0,)
    assert any(f"its declarer {admin_name} is not a member of it" in w for w in seen), seen
    db.execute(f"grant {reader} to {admin_name}")
    assert db.execute(count).fetchone() == (1,)


def test_a_repair_statement_runs_as_run_as_in_correct_mode(db, attached, login_role):
    fixer, _ = login_role(grants=READS + ("grant update (session_outcome) on calls to {role}",))
    _, admin = login_role("booking_guard_admin", fixer)
    c = company(db)
    first = call(db, c, session_outcome="unknown")
    declare(admin, fixer, name="unknown_outcome", predicate="c.session_outcome = 'unknown'",
            description="has the outcome unknown", repair="update public.calls set session_outcome = 'no_answer' where id = $1")
    assert db.execute("select repair_kind, repair from booking_guard.rules where name = 'unknown_outcome'").fetchone() == (
        "statement", f"runs the rule's repair statement as {fixer}")

    # observe: alerted, not repaired
    admin.execute("select booking_guard.run_monitor()")
    assert db.execute("select session_outcome from calls where id = %s", (first,)).fetchone() == ("unknown",)

    admin.execute("select booking_guard.set_rule('unknown_outcome', 'correct')")
    result = admin.execute("select booking_guard.run_monitor()").fetchone()[0]
    assert result["repaired"] == 1
    assert db.execute("select session_outcome from calls where id = %s", (first,)).fetchone() == ("no_answer",)
    assert db.execute("select auto_corrected, description like '%%repair statement ran (1 rows)' from booking_guard.alerts"
                      " where alert_type = 'unknown_outcome'").fetchone() == (True, True)

    # reconcile repairs with the same statement, over the whole table
    second = call(db, c, session_outcome="unknown")
    counts = admin.execute("select booking_guard.reconcile()").fetchone()[0]
    assert counts["declared_repairs"] == 1 and counts["fixed"] == 1
    assert db.execute("select session_outcome from calls where id = %s", (second,)).fetchone() == ("no_answer",)
    assert db.execute("select rule, entity_id from booking_guard.events where kind = 'reconcile'").fetchall() == [
        ("unknown_outcome", str(second))]


def test_a_declared_rule_alerts_or_repairs_and_never_rejects(db, declarer):
    reader, admin = declarer
    declare(admin, reader)
    for mode, fallback in (("enforce", None), ("correct", None), ("observe", "enforce")):
        with pytest.raises(psycopg.Error) as caught:
            admin.execute("select booking_guard.set_rule('transferred_with_booking', %s, 50, %s)", (mode, fallback))
        assert caught.value.diag.sqlstate == "BG005"
    admin.execute("select booking_guard.set_rule('transferred_with_booking', 'off')")
    assert db.execute("select mode from booking_guard.rules where name = 'transferred_with_booking'").fetchone() == ("off",)


def test_declaring_again_replaces_and_drop_rule_removes(db, declarer):
    reader, admin = declarer
    c = company(db)
    hit = call(db, c, session_outcome="transferred", booking_id="cal-d")
    declare(admin, reader)
    declare(admin, reader, predicate="c.session_outcome = 'transferred'", severity="critical")
    assert db.execute("select severity, predicate from booking_guard.rules where predicate is not null").fetchall() == [
        ("critical", "c.session_outcome = 'transferred'")]
    admin.execute("select booking_guard.run_monitor()")

    dropped = admin.execute("select name from booking_guard.drop_rule('transferred_with_booking')").fetchone()
    assert dropped == ("transferred_with_booking",)
    assert declared(db) == []
    assert db.execute("select resolved_at is not null, details ->> 'rule_dropped' from booking_guard.alerts"
                      " where alert_type = 'transferred_with_booking' and entity_id = %s", (str(hit),)).fetchone() == (
        True, "true")
    assert db.execute("select count(*) from booking_guard.detect('1 hour') where rule = 'transferred_with_booking'"
                      ).fetchone() == (0,)
    assert [r[0] for r in db.execute("select details ->> 'declared' is not null from booking_guard.events"
                                     " where kind = 'rule' order by id")] == [True, True, False]

    for name, sqlstate in (("transferred_with_booking", "BG004"), ("missing_direction", "BG005")):
        with pytest.raises(psycopg.Error) as caught:
            admin.execute("select booking_guard.drop_rule(%s)", (name,))
        assert caught.value.diag.sqlstate == sqlstate
    assert db.execute("select count(*) from booking_guard.rules").fetchone() == (10,)


def test_declaring_needs_an_attachment(db, login_role):
    reader, _ = login_role(grants=READS)
    _, admin = login_role("booking_guard_admin", reader)
    refused(admin, "BG003", reader)
