"""The client examples (examples/psql, python, php, node), each run as a program against its own
database with the application's own role: each prints the same story, line by line, and leaves the
database in the same state (one call booked with one appointment, both breakers open, nothing
written by the refused input or the refused commit)."""

import json
import os
import re
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from urllib.parse import quote

import psycopg
import pytest
from conftest import APP_TABLE_GRANTS, ROOT, pg_tool

EXAMPLES = ROOT / "examples"
SETUP = EXAMPLES / "clients_setup.sql"
SCOPES = {"appointment_booking:global", "appointment_booking:service:1"}
COOLDOWN_SECONDS = 30   # the default policy's: no retry-after is longer
LANGUAGES = ["psql", "python", "php", "node"]
CONNECTIONS = ["libpq environment", "DATABASE_URL"]

# What every program prints on stdout, one pattern per line. psql cannot read DETAIL into a
# variable: it leaves out the "BG001 DETAIL" line and prints the DETAIL on stderr with the error.
STORY = [
    r"call (?P<call_id>\d+) inserted",
    r"breaker closed: permit \d+",
    r"calendar booked (?P<booking_id>cal-\d+-[0-9a-f]{8})",
    r"booked: call (?P<booked_call_id>\d+), appointment (?P<appointment_id>\d+), created true",
    r"call (?P<failing_call_id>\d+) inserted",
    r"calendar failed \(1/3\): Cal\.com answered 503 Service Unavailable; breaker closed",
    r"calendar failed \(2/3\): Cal\.com answered 503 Service Unavailable; breaker closed",
    r"calendar failed \(3/3\): Cal\.com answered 503 Service Unavailable; breaker open",
    r'BG001 circuit breaker "(?P<bg001_key>[^"]+)" is open: call rejected',
    r"BG001 DETAIL: key (?P<detail_key>\S+), state open, retry after (?P<detail_retry>\d+) s",
    r"try_acquire: allowed false, state open, refused by (?P<refused_by>\S+), retry after (?P<try_retry>\d+) s",
    r"BG005 invalid input: record_booking\(\): unknown appointment field\(s\): room",
    r"BG002 commit refused: booking rejected by rule missing_appointment: call (?P<bg002_call_id>\d+)",
]
PSQL_DETAIL = re.compile(r"^DETAIL:  (\{.*\})$", re.MULTILINE)


def program(language: str) -> list[str]:
    """The command that runs one example (psql gets its connection from its caller: see run())."""
    def need(tool: str) -> str:
        path = shutil.which(tool)
        if path is None:
            pytest.fail(f"{tool} not found: scripts/bootstrap installs it")
        return path

    if language == "psql":
        return [pg_tool("psql"), "-X", "-f", str(EXAMPLES / "psql" / "booking.sql")]
    if language == "python":
        return [sys.executable, str(EXAMPLES / "python" / "booking.py")]
    if language == "php":
        return [need("php"), str(EXAMPLES / "php" / "booking.php")]
    if not (EXAMPLES / "node" / "node_modules" / "pg").is_dir():
        pytest.fail("examples/node/node_modules has no pg: scripts/bootstrap runs npm ci there")
    return [need("node"), str(EXAMPLES / "node" / "booking.js")]


def run(language: str, connection: str, db: psycopg.Connection, role: str) -> subprocess.CompletedProcess:
    """Runs one example as `role` on db's database, its connection given the way `connection` says:
    the libpq environment (PGHOST, PGPORT, PGUSER, PGDATABASE), or DATABASE_URL with a libpq
    environment that names another database, so that a program reading the wrong one fails."""
    info = db.info
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG") and k != "DATABASE_URL"}
    command = program(language)
    if connection == "libpq environment":
        env |= {"PGHOST": info.host, "PGPORT": str(info.port), "PGUSER": role, "PGDATABASE": info.dbname}
    else:
        # a socket directory as the host, percent-encoded, as libpq and node-postgres accept it
        url = f"postgresql://{role}@{quote(info.host, safe='')}:{info.port}/{info.dbname}"
        env |= {"DATABASE_URL": url, "PGDATABASE": f"{info.dbname}_not_this_one"}
        if language == "psql":
            command += ["-d", url]   # a psql script is connected by its caller
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def example_db(attached: psycopg.Connection, login_role) -> tuple[psycopg.Connection, str]:
    """A database set up as examples/clients_setup.sql says, and the application's role: booking_guard_app
    and DML on its own tables, nothing more."""
    attached.execute(SETUP.read_text())
    role, _ = login_role("booking_guard_app", grants=APP_TABLE_GRANTS)
    return attached, role


@pytest.mark.parametrize("connection", CONNECTIONS)
@pytest.mark.parametrize("language", LANGUAGES)
def test_each_example_tells_the_story_and_the_database_agrees(example_db, language, connection):
    db, role = example_db
    done = run(language, connection, db, role)
    assert done.returncode == 0, done.stdout + done.stderr

    # stdout: the story, line by line
    story = [p for p in STORY if not (language == "psql" and p.startswith("BG001 DETAIL"))]
    lines = done.stdout.splitlines()
    assert len(lines) == len(story), done.stdout
    seen: dict[str, str] = {}
    for line, pattern in zip(lines, story, strict=True):
        match = re.fullmatch(pattern, line)
        assert match, f"{line!r} does not match {pattern!r}"
        seen |= match.groupdict()

    # BG001's DETAIL: read by the program, or (psql) printed with the error on stderr
    if language == "psql":
        assert done.stderr.count("ERROR:") == 3, done.stderr   # BG001, BG005, BG002
        details = [json.loads(d) for d in PSQL_DETAIL.findall(done.stderr) if '"retry_after_seconds"' in d]
        assert len(details) == 1, done.stderr
        assert details[0]["state"] == "open"
        seen |= {"detail_key": details[0]["key"], "detail_retry": str(details[0]["retry_after_seconds"])}
    else:
        assert done.stderr == ""
    # the refusing scope: the same failures opened both at the same moment, so either may be named
    assert seen["bg001_key"] == seen["detail_key"]
    assert {seen["bg001_key"], seen["refused_by"]} <= SCOPES
    for retry in (seen["detail_retry"], seen["try_retry"]):
        assert 1 <= int(retry) <= COOLDOWN_SECONDS

    call_id, failing_call_id = int(seen["call_id"]), int(seen["failing_call_id"])
    assert int(seen["booked_call_id"]) == call_id and int(seen["bg002_call_id"]) == failing_call_id != call_id

    # the database: the first call booked, the second untouched by BG005 and BG002
    calls = db.execute("""select id, retell_call_id like %s, appointment_made, session_outcome, booking_id,
                                 appointment_link_status
                            from calls order by id""", (f"example-{language}-%",)).fetchall()
    assert calls == [(call_id, True, True, "appointment_booked", seen["booking_id"], "linked"),
                     (failing_call_id, True, False, None, None, None)]
    appointments = db.execute("""select id, call_id, calcom_v2_booking_id, company_id, service_id, starts_at, ends_at
                                   from appointments""").fetchall()
    assert appointments == [(int(seen["appointment_id"]), call_id, seen["booking_id"], 1, 1,
                             datetime(2030, 1, 15, 9, 0, tzinfo=UTC), datetime(2030, 1, 15, 9, 30, tzinfo=UTC))]
    recorded = db.execute("""select entity_id, details ->> 'success', details ->> 'appointment_id'
                               from booking_guard.events where kind = 'record_booking'""").fetchall()
    assert recorded == [(str(call_id), "true", seen["appointment_id"])]
    assert db.execute("select count(*) from booking_guard.alerts where entity_id = %s",
                      (str(failing_call_id),)).fetchone()[0] == 0
    assert db.execute("select count(*) from booking_guard.review_queue").fetchone()[0] == 0

    # the breakers: both scopes opened once, by the three failures; two refusals counted as fast fails
    breakers = db.execute("select key, state, opened_total from booking_guard.circuit_status").fetchall()
    assert sorted(breakers) == [(key, "open", 1) for key in sorted(SCOPES)]
    assert db.execute("select booking_guard.circuit_fast_fail_total()").fetchone()[0] == 2


@pytest.mark.parametrize("language", LANGUAGES)
def test_each_example_fails_when_an_expected_error_does_not_come(example_db, language):
    """An example that swallowed an unexpected outcome would teach the wrong thing: with the rule
    missing_appointment only correcting, the commit that should be refused goes through, and the
    program says so and exits non-zero."""
    db, role = example_db
    db.execute("select booking_guard.set_rule('missing_appointment', 'correct')")
    done = run(language, "libpq environment", db, role)
    assert done.returncode != 0
    assert "BG002" in done.stderr, done.stderr
    assert not any(line.startswith("BG002") for line in done.stdout.splitlines())


def test_the_node_client_is_pinned():
    """npm ci installs exactly the lock file: pg at one exact version, every package with its hash."""
    manifest = json.loads((EXAMPLES / "node" / "package.json").read_text())
    lock = json.loads((EXAMPLES / "node" / "package-lock.json").read_text())
    pinned = manifest["dependencies"]["pg"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", pinned), pinned
    assert lock["packages"][""]["dependencies"] == manifest["dependencies"]
    assert lock["packages"]["node_modules/pg"]["version"] == pinned
    installed = {path: entry for path, entry in lock["packages"].items() if path}
    assert installed and all(entry.get("integrity", "").startswith("sha512-") for entry in installed.values())
