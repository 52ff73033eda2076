"""The exporter over HTTP: the series, promtool's lint, and a database that is down, slow or hung."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from booking_guard.ops.exporter import BoundedConnection, MetricsCollector, TargetScraper
from booking_guard.ops.serve import ServeConfig, Service
from conftest import APP_SCHEMA, ROOT
from prometheus_client import CollectorRegistry, generate_latest
from psycopg.conninfo import make_conninfo
from support.services import dsn_of, free_port, get, running, sample, wait_for

PGBIN = Path("/usr/lib/postgresql/15/bin")


def plant(db: psycopg.Connection) -> None:
    """Something in every family: a phantom booking, bookings, an opened breaker."""
    db.execute("select booking_guard.attach('calls', 'appointments')")
    db.execute("select booking_guard.set_setting('verification_grace', '0')")
    company = db.execute("insert into companies (name) values ('c') returning id").fetchone()[0]
    db.execute("insert into calls (retell_call_id, company_id, direction, session_outcome, appointment_made)"
               " values ('phantom', %s, 'inbound', 'appointment_booked', false)", (company,))
    call = db.execute("insert into calls (retell_call_id, company_id, direction) values ('ok', %s, 'inbound') returning id",
                      (company,)).fetchone()[0]
    db.execute("select booking_guard.record_booking(%s, 'cal-ok')", (call,))
    db.execute("select booking_guard.record_booking(%s, 'cal-nope')", (call + 1000,))
    for _ in range(3):
        db.execute("select booking_guard.circuit_record_failure('appointment_booking:service:1', 'timeout')")


def test_metrics_endpoint_serves_every_family_and_promtool_finds_nothing_to_lint(db, tmp_path):
    plant(db)
    with running(dsn_of(db)) as service:
        status, text = get(service, "/metrics")
        assert status == 200
        assert sample(text, "booking_guard_up") == 1
        assert sample(text, "booking_guard_scrape_duration_seconds") > 0
        assert sample(text, 'data_inconsistency_detected_total{type="phantom_booking"}') == 1
        assert sample(text, "appointment_creation_success_total") == 1
        assert sample(text, 'appointment_creation_failure_total{reason="call_not_found"}') == 1
        assert sample(text, 'circuit_breaker_state{key="appointment_booking:service:1",state="open"}') == 1
        assert sample(text, 'appointment_creation_duration_seconds_bucket{le="+Inf"}') == 2
        assert "# TYPE appointment_creation_duration_seconds histogram" in text
        lint = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
        assert lint.returncode == 0, lint.stdout + lint.stderr
        assert (lint.stdout + lint.stderr).strip() == ""
        # OpenMetrics too, for a Prometheus that asks for it
        status, om = get(service, "/metrics", accept="application/openmetrics-text; version=1.0.0")
        assert status == 200 and om.rstrip().endswith("# EOF")
        assert sample(om, "circuit_breaker_open_total{key=\"appointment_booking:service:1\"}") == 1


def test_describe_touches_nothing_and_each_scrape_calls_metrics_once(db):
    class Counting(BoundedConnection):
        calls = 0

        def call(self, fn):
            Counting.calls += 1
            return super().call(fn)

    registry = CollectorRegistry()
    registry.register(MetricsCollector([TargetScraper("one", Counting(dsn_of(db)))]))
    assert Counting.calls == 0
    output = generate_latest(registry).decode()
    assert Counting.calls == 1
    assert sample(output, "booking_guard_up", database="one") == 1


def test_starts_and_answers_while_the_database_is_down():
    nowhere = make_conninfo(host="127.0.0.1", port=free_port(), user="nobody", dbname="nothing")
    with running(nowhere) as service:
        status, text = get(service, "/metrics")
        assert status == 200
        assert sample(text, "booking_guard_up") == 0
        assert sample(text, "booking_guard_scrape_duration_seconds") is not None
        assert "appointment_creation_success_total" not in text
        status, _ = get(service, "/healthz")
        assert status == 200
        status, page = get(service, "/")
        assert status == 503 and "Database unreachable" in page


def test_a_database_that_holds_the_scrape_on_a_lock_gives_up_0_then_1(db, connect):
    with running(dsn_of(db)) as service:
        assert sample(get(service, "/metrics")[1], "booking_guard_up") == 1
        blocker = connect(autocommit=False)
        blocker.execute("lock table booking_guard.metric_counters in access exclusive mode")
        # answered while the lock is still held: the scrape gave up rather than waited
        status, text = get(service, "/metrics")
        assert status == 200
        assert sample(text, "booking_guard_up") == 0
        assert exporter_waiting_on_a_lock(db) == 0
        blocker.rollback()
        assert sample(get(service, "/metrics")[1], "booking_guard_up") == 1


def exporter_waiting_on_a_lock(db: psycopg.Connection) -> int:
    return db.execute("select count(*) from pg_stat_activity where application_name = 'booking-guard exporter'"
                      " and datname = current_database() and wait_event_type = 'Lock'").fetchone()[0]


def test_a_hung_server_process_gives_up_0_then_1(db):
    with running(dsn_of(db)) as service:
        assert sample(get(service, "/metrics")[1], "booking_guard_up") == 1
        pid = db.execute("select pid from pg_stat_activity where application_name = 'booking-guard exporter'"
                         " and datname = current_database()").fetchone()[0]
        try:
            os.kill(pid, signal.SIGSTOP)
        except PermissionError:
            pytest.skip("cannot signal the server's processes as this user")
        try:
            # answered while the server process is still stopped: the scrape gave up rather than waited
            status, text = get(service, "/metrics")
            assert status == 200
            assert sample(text, "booking_guard_up") == 0
        finally:
            os.kill(pid, signal.SIGCONT)
        wait_for(lambda: sample(get(service, "/metrics")[1], "booking_guard_up") == 1, 10,
                 "booking_guard_up to return to 1 once the server process runs again")


class Cluster:
    """A private PostgreSQL cluster that a test may stop and start (the shared one must stay up)."""

    def __init__(self) -> None:
        self.as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self.home = Path(tempfile.mkdtemp(prefix="bg-exporter-cluster-", dir="/tmp"))
        if self.as_postgres:
            shutil.chown(self.home, "postgres")
        self.data = self.home / "data"
        self.port = free_port()
        self.user = "postgres" if self.as_postgres else os.environ.get("USER", "postgres")
        self._run("initdb", "-D", str(self.data), "-U", self.user, "-A", "trust", "--no-sync")
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"port = {self.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{self.home}'\n"
                       "fsync = off\n")

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run([*self.as_postgres, str(PGBIN / tool), *args], check=True, capture_output=True, text=True)

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.home / "log"), "-w", "-t", "30", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    @property
    def dsn(self) -> str:
        return make_conninfo(host="127.0.0.1", port=self.port, user=self.user, dbname="postgres")

    def destroy(self) -> None:
        subprocess.run([*self.as_postgres, str(PGBIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(self.home, ignore_errors=True)


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    try:
        c.start()
        with psycopg.connect(c.dsn, autocommit=True) as conn:
            conn.execute("set client_min_messages = warning")
            conn.execute(APP_SCHEMA.read_text())
            conn.execute("create extension booking_guard cascade")
        yield c
    finally:
        c.destroy()


@pytest.mark.slow
def test_database_stopped_then_started_without_restarting_the_exporter(cluster):
    with psycopg.connect(cluster.dsn, autocommit=True) as conn:
        for call in ("1", "2"):
            conn.execute("select booking_guard.queue_for_review(%s, 'calcom_booking_failed')", (call,))
    with running(cluster.dsn) as service:
        first = get(service, "/metrics")[1]
        assert sample(first, "booking_guard_up") == 1
        assert sample(first, "data_inconsistency_manual_review_total") == 2
        cluster.stop()
        status, text = get(service, "/metrics")
        assert status == 200
        assert sample(text, "booking_guard_up") == 0
        cluster.start()

        def scraped_up() -> str | None:
            text = get(service, "/metrics")[1]
            return text if sample(text, "booking_guard_up") == 1 else None

        text = wait_for(scraped_up, 15, "booking_guard_up to return to 1 once PostgreSQL is started again")
        # the counters are rows: they survive PostgreSQL's restart
        assert sample(text, "data_inconsistency_manual_review_total") == 2
    # and the exporter's
    with running(cluster.dsn) as service:
        assert sample(get(service, "/metrics")[1], "data_inconsistency_manual_review_total") == 2


def booking_guard_cli(*args: str, dsn: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "booking_guard.cli", "--dsn", dsn, *args],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_check_exits_0_when_clean_and_2_on_a_critical_finding(attached):
    db = attached
    clean = booking_guard_cli("check", dsn=dsn_of(db))
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "no findings" in clean.stdout
    db.execute("select booking_guard.set_rule('phantom_booking', 'observe')")
    db.execute("select booking_guard.set_setting('verification_grace', '1 hour')")
    company = db.execute("insert into companies (name) values ('c') returning id").fetchone()[0]
    db.execute("insert into calls (retell_call_id, company_id, direction, session_outcome, appointment_made)"
               " values ('phantom-cli', %s, 'inbound', 'appointment_booked', false)", (company,))
    found = booking_guard_cli("check", dsn=dsn_of(db))
    assert found.returncode == 2, found.stdout + found.stderr
    assert "phantom_booking" in found.stdout and "critical" in found.stdout


def test_report_prints_the_daily_report_as_text_and_json(attached):
    text = booking_guard_cli("report", dsn=dsn_of(attached))
    assert text.returncode == 0, text.stderr
    assert "DATA CONSISTENCY REPORT" in text.stdout
    as_json = booking_guard_cli("report", "--day", "2026-01-02", "--json", dsn=dsn_of(attached))
    assert as_json.returncode == 0, as_json.stderr
    assert "2026-01-02" in json.dumps(json.loads(as_json.stdout))


def test_the_verification_loop_judges_due_calls_every_second(attached):
    db = attached
    db.execute("select booking_guard.set_setting('verification_grace', '1 second')")
    company = db.execute("insert into companies (name) values ('c') returning id").fetchone()[0]
    call = db.execute("insert into calls (retell_call_id, company_id, direction, session_outcome, appointment_made)"
                      " values ('due-1', %s, 'inbound', 'appointment_booked', true) returning id", (company,)).fetchone()[0]
    assert db.execute("select count(*) from booking_guard.due_verifications where call_id = %s", (call,)).fetchone()[0] == 1
    service = Service(ServeConfig(dsn=dsn_of(db), listen="127.0.0.1:0", verify=True, verify_interval=0.2))
    service.start()
    try:
        # rolled back by verify_due() once the grace had passed
        wait_for(lambda: db.execute("select session_outcome from calls where id = %s", (call,)).fetchone()[0]
                 == "creation_failed", 10, "the verification loop to judge the due call")
        assert db.execute("select count(*) from booking_guard.due_verifications").fetchone()[0] == 0
        status, body = get(service, "/healthz")
        health = json.loads(body)
        [target] = health["targets"].values()
        assert status == 200 and target["threads"]["verify_due"] == "running"
        assert target["loops"]["verify_due"]["last_success_seconds_ago"] is not None
        assert target["loops"]["verify_due"]["last_error"] is None
        # the loop also folds the events, ahead of the scrapes (none ran in this test): after the
        # verification it has just been seen to make, in a transaction of its own
        wait_for(lambda: db.execute("select events_folded > 0 from booking_guard.metric_fold_state").fetchone()[0],
                 10, "the verification loop to fold the events")
    finally:
        service.shutdown()
