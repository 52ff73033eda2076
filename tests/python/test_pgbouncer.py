"""booking-guard serve through a real PgBouncer in transaction mode: timeouts without startup
options, no automatic prepared statements, the relay polling instead of LISTEN, and /healthz
following the loops it runs."""

import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from booking_guard.ops.connection import behind_pooler
from booking_guard.ops.exporter import BoundedConnection
from booking_guard.ops.relay import RelayConfig
from booking_guard.ops.serve import ServeConfig, Service
from conftest import SERVER
from psycopg.conninfo import make_conninfo
from support.fake_slack import FakeSlack
from support.planted_rows import lone_call
from support.services import free_port, get, sample, wait_for

NO_NOTIFICATIONS = "notifications need a direct or session-mode connection"


@dataclass
class PgBouncer:
    port: int
    log: Path

    def dsn(self, dbname: str) -> str:
        return make_conninfo(host="127.0.0.1", port=self.port, user=SERVER.get("user"), dbname=dbname)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@pytest.fixture
def pgbouncer() -> Iterator[PgBouncer]:
    """A PgBouncer in transaction mode on a free port in front of the test server (every database
    of it), stopped and deleted afterwards whatever happens."""
    binary = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin")
    if binary is None:
        pytest.fail("pgbouncer not found: scripts/bootstrap installs it")
    # PgBouncer refuses to run as root; as root it runs as the server's OS user, as the sandbox does
    as_postgres = os.geteuid() == 0
    home = Path(tempfile.mkdtemp(prefix="bg-pgbouncer-", dir="/tmp"))
    user = SERVER.get("user") or os.environ.get("USER", "postgres")
    port = free_port()
    (home / "users.txt").write_text(f'"{user}" "{SERVER.get("password") or ""}"\n')
    (home / "pgbouncer.ini").write_text(f"""
[databases]
* = host={SERVER.get("host", "localhost")} port={SERVER.get("port", 5432)}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
pool_mode = transaction
auth_type = trust
auth_file = {home / "users.txt"}
; two server connections for serve's four clients (scrapes, status page, verify_due, relay):
; they share server connections, so any state one leaves behind shows up in another's session
default_pool_size = 2
; no ignore_startup_parameters: `options` is refused, as in a default installation
server_login_retry = 1
""")
    if as_postgres:
        shutil.chown(home, "postgres")
        for path in home.iterdir():
            shutil.chown(path, "postgres")
    log = home / "pgbouncer.log"
    proc = None
    try:
        with open(log, "w") as out:
            proc = subprocess.Popen([binary, str(home / "pgbouncer.ini")], stdout=out, stderr=subprocess.STDOUT,
                                    user="postgres" if as_postgres else None, group="postgres" if as_postgres else None)
        bouncer = PgBouncer(port, log)

        def answers() -> bool:
            assert proc.poll() is None, f"pgbouncer exited with {proc.returncode}:\n{bouncer.log_text()}"
            try:
                with psycopg.connect(bouncer.dsn("postgres"), connect_timeout=2) as conn:
                    conn.execute("select 1")
                return True
            except psycopg.OperationalError:
                return False

        wait_for(answers, 15, "pgbouncer to accept connections")
        yield bouncer
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(home, ignore_errors=True)


def health(service: Service) -> tuple[int, dict]:
    status, body = get(service, "/healthz")
    return status, json.loads(body)


def test_the_pooler_is_detected_and_timeouts_stay_in_their_transaction(db, pgbouncer):
    dsn = pgbouncer.dsn(db.info.dbname)
    with psycopg.connect(dsn, autocommit=True) as pooled:
        assert behind_pooler(pooled)
    assert not behind_pooler(db)
    bounded = BoundedConnection(dsn, timeout=1.5)
    try:
        for _ in range(8):   # past psycopg's default prepare threshold (5)
            assert bounded.call(lambda conn: conn.execute(
                "select current_setting('statement_timeout'), current_setting('lock_timeout')").fetchone()
            ) == ("1200ms", "1200ms")
    finally:
        bounded.close()
    # SET LOCAL ended with the call's transaction: the server connections the pool hands out are clean
    with psycopg.connect(dsn, autocommit=True, prepare_threshold=None) as conn:
        for _ in range(4):
            assert conn.execute("select current_setting('statement_timeout')").fetchone()[0] == "0"


def test_serve_books_verifies_exports_and_relays_through_pgbouncer(attached, pgbouncer, caplog):
    db = attached
    db.execute("select booking_guard.set_setting('verification_grace', '1 second')")
    dsn = pgbouncer.dsn(db.info.dbname)

    # the application books through the pooler: plain SQL, then record_booking()
    with psycopg.connect(dsn, prepare_threshold=None) as app:
        with app.transaction():
            raw = lone_call(app, "pooled-raw")
            app.execute("insert into appointments (call_id, calcom_v2_booking_id, company_id)"
                        " select id, 'cal-pooled-raw', company_id from calls where id = %s", (raw,))
            app.execute("update calls set appointment_made = true, session_outcome = 'appointment_booked',"
                        " booking_id = 'cal-pooled-raw' where id = %s", (raw,))
        with app.transaction():
            recorded = lone_call(app, "pooled-record")
            assert app.execute("select success from booking_guard.record_booking(%s, 'cal-pooled-record')",
                               (recorded,)).fetchone()[0] is True
        # a call flagged booked whose appointment never comes: verify_due() (serve's loop) rolls it
        # back after the grace and raises missing_appointment, which the relay posts
        with app.transaction():
            phantom = lone_call(app, "pooled-phantom", session_outcome="appointment_booked", appointment_made=True)

    slack = FakeSlack()
    service = Service(ServeConfig(dsn=dsn, listen="127.0.0.1:0", verify=True, verify_interval=0.2,
                                  relay=RelayConfig(dsn=dsn, slack_webhook=slack.url, poll_interval=0.5)))
    service.start()
    try:
        wait_for(lambda: any("missing_appointment" in text for _, text in slack.accepted), 30,
                 "the relay to post the missing_appointment alert")
        assert db.execute("select session_outcome from calls where id = %s", (phantom,)).fetchone()[0] == "creation_failed"
        assert db.execute("select session_outcome from calls where id = %s", (raw,)).fetchone()[0] == "appointment_booked"
        assert db.execute("select count(*) from booking_guard.alerts where delivered_at is null").fetchone()[0] == 0

        for _ in range(8):   # past psycopg's default prepare threshold, on server connections the clients share
            status, text = get(service, "/metrics")
            assert status == 200
            assert sample(text, "booking_guard_up") == 1, pgbouncer.log_text()
            assert get(service, "/")[0] == 200
        assert sample(text, "appointment_creation_success_total") == 2   # the raw-SQL booking and the recorded one
        assert sample(text, 'data_inconsistency_detected_total{type="missing_appointment"}') == 1

        status, body = health(service)
        assert status == 200, body
        assert body["problems"] == []
        loops = body["targets"][db.info.dbname]["loops"]
        verify, relay = loops["verify_due"], loops["relay"]
        assert verify["healthy"] and verify["consecutive_failures"] == 0 and verify["last_error"] is None
        assert relay["healthy"] and relay["last_error"] is None
        assert relay["notifications"] is False       # PgBouncer detected: the relay polled
    finally:
        service.shutdown()
        slack.close()
    said = [r for r in caplog.records if r.name == "booking_guard.relay" and NO_NOTIFICATIONS in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING


def test_healthz_turns_503_when_the_verification_loop_keeps_failing(db, pgbouncer):
    # booking_guard is installed, not attached: verify_due() fails on every run, metrics() answers
    grace = 2.0
    service = Service(ServeConfig(dsn=pgbouncer.dsn(db.info.dbname), listen="127.0.0.1:0", verify=True,
                                  verify_interval=0.2, health_grace=grace))
    started = time.monotonic()
    service.start()
    try:
        name = db.info.dbname      # the one target, named after its database

        def verify_due() -> dict:
            return health(service)[1]["targets"][name]["loops"]["verify_due"]

        wait_for(lambda: verify_due()["last_error"] is not None, 10, "the verification loop's first failure")
        status, body = health(service)
        if time.monotonic() - started < grace:     # a failure shorter than the grace is not a problem yet
            assert status == 200 and body["status"] == "ok", body
        assert "not attached" in body["targets"][name]["loops"]["verify_due"]["last_error"]
        assert sample(get(service, "/metrics")[1], "booking_guard_up") == 1

        wait_for(lambda: health(service)[0] == 503, grace + 10, "/healthz to answer 503")
        status, body = health(service)
        assert body["status"] == "degraded"
        [problem] = body["problems"]
        assert problem.startswith(f"{name}: verify_due: no successful run for") and "booking_guard is not attached" in problem
        assert body["targets"][name]["status"] == "degraded" and body["targets"][name]["problems"] == [problem]
        assert body["targets"][name]["loops"]["verify_due"]["healthy"] is False
        assert body["targets"][name]["loops"]["verify_due"]["consecutive_failures"] >= 2

        db.execute("select booking_guard.attach('calls', 'appointments')")
        wait_for(lambda: health(service)[0] == 200, 10, "/healthz to recover once verify_due() succeeds")
        assert verify_due()["last_error"] is None
    finally:
        service.shutdown()
