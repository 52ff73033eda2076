"""One `booking-guard serve` for several databases: every series labelled with its target, /probe
for one target, a target that is down or slow delays and breaks no other, /healthz, the status
page and the relay per target, and the command line's --target and --targets-file."""

import json
import re
import signal
import subprocess
import sys
import textwrap
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from booking_guard.ops.relay import RelayConfig
from booking_guard.ops.serve import ServeConfig, Service
from booking_guard.ops.targets import Target
from conftest import APP_SCHEMA, ROOT
from prometheus_client.parser import text_string_to_metric_families
from psycopg.conninfo import make_conninfo
from support.fake_slack import FakeSlack
from support.prometheus import PROMETHEUS, Prometheus
from support.services import dsn_of, free_port, get, running, sample, wait_for

TIMEOUT = 1.5


@pytest.fixture
def second_db(db: psycopg.Connection) -> Iterator[psycopg.Connection]:
    """A second database on the test server with the reference schema and the extension (not
    attached), dropped afterwards: the fleet of these tests is `db` and this one."""
    name = f"{db.info.dbname}_second"
    admin = psycopg.connect(host=db.info.host, port=db.info.port, user=db.info.user, dbname="postgres", autocommit=True)
    admin.execute(f'drop database if exists "{name}" with (force)')
    admin.execute(f'create database "{name}"')
    conn = psycopg.connect(host=db.info.host, port=db.info.port, user=db.info.user, dbname=name, autocommit=True)
    try:
        conn.execute("set client_min_messages = warning")
        conn.execute(APP_SCHEMA.read_text())
        conn.execute("create extension booking_guard cascade")
        yield conn
    finally:
        conn.close()
        admin.execute(f'drop database if exists "{name}" with (force)')
        admin.close()


def nowhere() -> str:
    """A server that is not there (a closed port): connections are refused at once."""
    return make_conninfo(host="127.0.0.1", port=free_port(), user="nobody", dbname="nothing")


def phantoms(conn: psycopg.Connection, n: int) -> None:
    """Attach and plant n phantom bookings (each counted in data_inconsistency_detected_total)."""
    conn.execute("select booking_guard.attach('calls', 'appointments')")
    conn.execute("select booking_guard.set_setting('verification_grace', '0')")
    company = conn.execute("insert into companies (name) values ('c') returning id").fetchone()[0]
    for i in range(n):
        conn.execute("insert into calls (retell_call_id, company_id, direction, session_outcome, appointment_made)"
                     " values (%s, %s, 'inbound', 'appointment_booked', false)", (f"phantom-{i}", company))


@contextmanager
def serving(*targets: tuple[str, str], **options: object) -> Iterator[Service]:
    options.setdefault("verify", False)
    service = Service(ServeConfig(targets=[Target(name, dsn) for name, dsn in targets], listen="127.0.0.1:0",
                                  scrape_timeout=TIMEOUT, **options))
    service.start()
    try:
        yield service
    finally:
        service.shutdown()


def databases_of(text: str) -> set[str]:
    """The `database` label of every sample of an exposition (asserting that each has one)."""
    seen = set()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            assert "database" in s.labels, (s.name, s.labels)
            seen.add(s.labels["database"])
    return seen


def test_metrics_labels_every_series_with_its_target(db, second_db):
    phantoms(db, 1)
    phantoms(second_db, 3)
    with serving(("alpha", dsn_of(db)), ("beta", dsn_of(second_db))) as service:
        status, text = get(service, "/metrics")
        assert status == 200
        assert databases_of(text) == {"alpha", "beta"}
        assert sample(text, "booking_guard_up", "alpha") == 1 and sample(text, "booking_guard_up", "beta") == 1
        assert sample(text, 'data_inconsistency_detected_total{type="phantom_booking"}', "alpha") == 1
        assert sample(text, 'data_inconsistency_detected_total{type="phantom_booking"}', "beta") == 3
        assert sample(text, 'appointment_creation_duration_seconds_bucket{le="+Inf"}', "beta") == 0
        # one HELP and one TYPE per family, whatever the number of targets: promtool finds nothing to lint
        assert len(re.findall(r"^# TYPE booking_guard_up gauge$", text, re.M)) == 1
        lint = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
        assert lint.returncode == 0 and (lint.stdout + lint.stderr).strip() == "", lint.stdout + lint.stderr
        # OpenMetrics too
        status, om = get(service, "/metrics", accept="application/openmetrics-text; version=1.0.0")
        assert status == 200 and om.rstrip().endswith("# EOF")
        assert sample(om, 'data_inconsistency_detected_total{type="phantom_booking"}', "beta") == 3


def test_probe_serves_one_configured_target_and_nothing_else(db, second_db):
    phantoms(db, 1)
    phantoms(second_db, 2)
    with serving(("alpha", dsn_of(db)), ("beta", dsn_of(second_db))) as service:
        for name, found in (("alpha", 1), ("beta", 2)):
            status, text = get(service, f"/probe?target={name}")
            assert status == 200
            assert databases_of(text) == {name}
            assert sample(text, "booking_guard_up", name) == 1
            assert sample(text, 'data_inconsistency_detected_total{type="phantom_booking"}', name) == found
        # an unknown name, and a connection string in place of a name: 404, one line, nothing connected to
        before = db.execute("select count(*) from pg_stat_activity where application_name like 'booking-guard%%'").fetchone()[0]
        for target in ("gamma", urllib.parse.quote(dsn_of(db)), urllib.parse.quote("postgresql://postgres@/postgres")):
            status, body = get(service, f"/probe?target={target}")
            assert status == 404
            assert body.count("\n") == 1 and body.startswith("unknown target")
        after = db.execute("select count(*) from pg_stat_activity where application_name like 'booking-guard%%'").fetchone()[0]
        assert after == before
        # no target, two targets, or a DSN given under another name: 400 (only ?target= is read)
        for query in ("", "?target=", "?target=alpha&target=beta", "?dsn=" + urllib.parse.quote(dsn_of(db))):
            status, body = get(service, f"/probe{query}")
            assert status == 400 and body.count("\n") == 1, (query, body)


def test_a_down_target_and_a_slow_one_delay_no_other(db, second_db, connect):
    phantoms(db, 1)
    with serving(("alpha", dsn_of(db)), ("slow", dsn_of(second_db)), ("down", nowhere())) as service:
        text = get(service, "/metrics")[1]
        assert [sample(text, "booking_guard_up", n) for n in ("alpha", "slow", "down")] == [1, 1, 0]
        # `slow` hangs on a lock until its statement gives up; `down` refuses connections
        blocker = psycopg.connect(dsn_of(second_db))
        blocker.execute("lock table booking_guard.metric_counters in access exclusive mode")
        try:
            for _ in range(2):
                status, text = get(service, "/metrics")
                assert status == 200
                assert [sample(text, "booking_guard_up", n) for n in ("alpha", "slow", "down")] == [1, 0, 0]
                assert sample(text, 'data_inconsistency_detected_total{type="phantom_booking"}', "alpha") == 1
                assert databases_of(text) == {"alpha", "slow", "down"}   # up and scrape duration for each
            # /probe of the healthy target asks the others nothing
            status, text = get(service, "/probe?target=alpha")
            assert status == 200 and databases_of(text) == {"alpha"} and sample(text, "booking_guard_up", "alpha") == 1
            # and /probe of the slow one gives up while the lock is still held
            status, text = get(service, "/probe?target=slow")
            assert status == 200 and sample(text, "booking_guard_up", "slow") == 0
        finally:
            blocker.rollback()
            blocker.close()
        assert sample(get(service, "/metrics")[1], "booking_guard_up", "slow") == 1


def exporter_sessions(conn: psycopg.Connection, waiting_on_a_lock: bool = False) -> int:
    """How many of serve's connections to `conn`'s database there are (only those waiting on a lock)."""
    return conn.execute("select count(*) from pg_stat_activity where datname = current_database()"
                        " and application_name like 'booking-guard%%' and (not %s or wait_event_type = 'Lock')",
                        (waiting_on_a_lock,)).fetchone()[0]


def test_the_targets_are_scraped_at_the_same_time(second_db):
    # two targets on the same database, its counters locked: scraped one after the other, only one
    # of them would ever wait on the lock; scraped at the same time, both wait together
    with serving(("first", dsn_of(second_db)), ("second", dsn_of(second_db))) as service:
        assert [sample(get(service, "/metrics")[1], "booking_guard_up", n) for n in ("first", "second")] == [1, 1]
        blocker = psycopg.connect(dsn_of(second_db))
        blocker.execute("lock table booking_guard.metric_counters in access exclusive mode")
        scrape = ThreadPoolExecutor(1)
        try:
            answer = scrape.submit(get, service, "/metrics")

            def both_waiting_or_over() -> str | None:
                if exporter_sessions(second_db, waiting_on_a_lock=True) == 2:
                    return "both waiting"
                return "scrape over" if answer.done() else None

            seen = wait_for(both_waiting_or_over, 30, "both targets to wait on the lock, or the scrape to end")
            assert seen == "both waiting", "the targets were scraped one after the other"
            status, text = answer.result()
            assert status == 200
            assert [sample(text, "booking_guard_up", n) for n in ("first", "second")] == [0, 0]
        finally:
            scrape.shutdown()
            blocker.rollback()
            blocker.close()


def test_healthz_and_the_loops_run_per_target(db, second_db):
    db.execute("select booking_guard.attach('calls', 'appointments')")
    grace = 1.0
    # beta is installed but not attached: its verification loop fails on every run, alpha's does not
    with serving(("alpha", dsn_of(db)), ("beta", dsn_of(second_db)), verify=True, verify_interval=0.2,
                 health_grace=grace) as service:
        def health() -> tuple[int, dict]:
            status, body = get(service, "/healthz")
            return status, json.loads(body)

        wait_for(lambda: health()[0] == 503, grace + 10, "/healthz to answer 503")
        status, body = health()
        assert body["status"] == "degraded" and set(body["targets"]) == {"alpha", "beta"}
        [problem] = body["problems"]
        assert problem.startswith("beta: verify_due: no successful run") and "not attached" in problem
        alpha, beta = body["targets"]["alpha"], body["targets"]["beta"]
        assert alpha["status"] == "ok" and alpha["problems"] == [] and alpha["loops"]["verify_due"]["healthy"]
        assert alpha["threads"] == {"verify_due": "running"} and beta["threads"] == {"verify_due": "running"}
        assert beta["status"] == "degraded" and beta["loops"]["verify_due"]["consecutive_failures"] >= 2
        assert body["threads"] == {"http": "running"}
        # the failing target leaves the other's metrics alone
        text = get(service, "/metrics")[1]
        assert sample(text, "booking_guard_up", "alpha") == 1 and sample(text, "booking_guard_up", "beta") == 1

        second_db.execute("select booking_guard.attach('calls', 'appointments')")
        wait_for(lambda: health()[0] == 200, 10, "/healthz to recover once beta's verify_due() succeeds")
        assert health()[1]["targets"]["beta"]["loops"]["verify_due"]["last_error"] is None


def test_the_relay_runs_per_target_and_says_which(db, second_db):
    slack = FakeSlack()
    try:
        with serving(("alpha", dsn_of(db)), ("beta", dsn_of(second_db)),
                     relay=RelayConfig(dsn="", slack_webhook=slack.url, poll_interval=0.3)) as service:
            for conn, who in ((db, "a"), (second_db, "b")):
                conn.execute("select booking_guard_internal.raise_alert('phantom_booking', 'critical', 'call', %s, %s)",
                             (f"{who}-1", f"call {who}-1 claims a booking"))
            wait_for(lambda: len(slack.accepted) >= 2, 20, "an alert of each target posted")
            texts = sorted(text for _, text in slack.accepted)
            assert texts[0].startswith("booking_guard: 1 new alert in alpha\n") and "call a-1" in texts[0]
            assert texts[1].startswith("booking_guard: 1 new alert in beta\n") and "call b-1" in texts[1]
            status, body = get(service, "/healthz")
            assert status == 200
            assert {n: t["threads"] for n, t in json.loads(body)["targets"].items()} == {
                "alpha": {"relay": "running"}, "beta": {"relay": "running"}}
    finally:
        slack.close()


def test_the_status_page_lists_the_targets_and_shows_each(db, second_db):
    phantoms(second_db, 2)   # corrected at once: nothing for a person
    for missing in (9001, 9002):   # bookings for calls that do not exist: a person must look
        second_db.execute("select booking_guard.record_booking(%s, %s)", (missing, f"cal-{missing}"))
    with serving(("alpha", dsn_of(db)), ("beta", dsn_of(second_db)), ("down", nowhere())) as service:
        status, index = get(service, "/")
        assert status == 200
        assert exporter_sessions(db) == exporter_sessions(second_db) == 0   # the list asks no database
        for name in ("alpha", "beta", "down"):
            assert f'<a href="/?target={name}">{name}</a>' in index
        status, page = get(service, "/?target=beta")
        assert status == 200
        assert re.search(r'<span class="inconsistency-count">2</span>', page)
        assert '<strong class="database">beta</strong>' in page and '<a href="/?target=alpha">alpha</a>' in page
        status, page = get(service, "/?target=alpha")
        assert status == 200 and re.search(r'<span class="inconsistency-count">0</span>', page)
        status, page = get(service, "/?target=down")
        assert status == 503 and "Database unreachable" in page
        status, page = get(service, "/?target=<script>")
        assert status == 404 and "<script>" not in page and '<a href="/?target=beta">beta</a>' in page


def test_one_dsn_is_one_target_named_after_its_database(db, monkeypatch):
    assert [t.name for t in ServeConfig(dsn=dsn_of(db)).targets] == [db.info.dbname]
    assert [t.name for t in ServeConfig(dsn="postgresql://u@h/my%20db").targets] == ["my_db"]   # label-safe
    monkeypatch.delenv("PGDATABASE", raising=False)
    assert [t.name for t in ServeConfig(dsn="host=/tmp port=5432").targets] == ["default"]
    monkeypatch.setenv("PGDATABASE", "shop")
    assert [t.name for t in ServeConfig(dsn="host=/tmp port=5432").targets] == ["shop"]
    with running(dsn_of(db)) as service:
        assert databases_of(get(service, "/metrics")[1]) == {db.info.dbname}
        status, page = get(service, "/")          # one target: / is its page, as before
        assert status == 200 and 'class="inconsistency-count"' in page and "all databases" not in page
        status, page = get(service, f"/?target={db.info.dbname}")
        assert status == 200 and 'class="inconsistency-count"' in page


def cli_serve(*args: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "booking_guard.cli", "serve", "--listen", f"127.0.0.1:{port}",
                             "--no-verify", *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return proc, f"http://127.0.0.1:{port}"


def test_the_command_line_takes_targets_and_a_targets_file(db, second_db, tmp_path):
    targets = tmp_path / "targets"
    targets.write_text(f"# name  connection string\n\nbeta   {dsn_of(second_db)}\n  gamma\t{nowhere()}\n")
    proc, url = cli_serve("--target", f"alpha={dsn_of(db)}", "--targets-file", str(targets))
    try:
        def metrics() -> str | None:
            try:
                with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
                    return response.read().decode()
            except OSError:
                assert proc.poll() is None, proc.stderr.read()
                return None

        wait_for(lambda: metrics() is not None, 15, "serve to listen")
        text = metrics()
        assert [sample(text, "booking_guard_up", n) for n in ("alpha", "beta", "gamma")] == [1, 1, 0]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0


@pytest.mark.parametrize("args, says", [
    (["--target", "alpha"], "--target wants NAME=DSN"),
    (["--target", "a b=host=x"], "bad target name"),
    (["--target", "postgresql://u:secret@h/db?sslmode=require"], "looks like a connection string"),
    (["--target", "a=host=x", "--target", "a=host=y"], "given twice"),
    (["--dsn", "host=x", "--target", "a=host=y"], "either --dsn or --target"),
    (["--targets-file", "/nonexistent/targets"], "cannot read the targets file"),
])
def test_unusable_targets_are_usage_errors(args, says):
    result = subprocess.run([sys.executable, "-m", "booking_guard.cli", "serve", "--listen", "127.0.0.1:0", *args],
                            capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert result.returncode == 2, result.stderr
    assert says in result.stderr and "secret" not in result.stderr


def test_a_bad_line_of_a_targets_file_is_named(tmp_path):
    targets = tmp_path / "targets"
    targets.write_text("alpha host=x\nbeta\n")
    result = subprocess.run([sys.executable, "-m", "booking_guard.cli", "serve", "--targets-file", str(targets)],
                            capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert result.returncode == 2 and f"{targets}:2:" in result.stderr, result.stderr


@pytest.mark.slow
def test_prometheus_scrapes_each_target_through_probe(db, second_db, tmp_path):
    """Prometheus' multi-target pattern, as the README configures it: the targets are names, relabelled
    into /probe?target=NAME on the exporter's address; each database is an `instance` of its own."""
    if not Path(PROMETHEUS).exists():
        pytest.fail("prometheus is not installed (scripts/bootstrap installs it)")
    phantoms(db, 1)
    with serving(("alpha", dsn_of(db)), ("beta", dsn_of(second_db)), ("down", nowhere())) as service:
        host, port = service.address
        config = textwrap.dedent(f"""\
            scrape_configs:
              - job_name: booking_guard
                metrics_path: /probe
                static_configs:
                  - targets: [alpha, beta, down]
                relabel_configs:
                  - source_labels: [__address__]
                    target_label: __param_target
                  - source_labels: [__param_target]
                    target_label: instance
                  - target_label: __address__
                    replacement: {host}:{port}
            """)
        prometheus = Prometheus(tmp_path, "", scrape_configs=config)
        try:
            wait_for(prometheus.ready, 30, "Prometheus to be ready", prometheus.proc)

            def up() -> dict | None:
                result = prometheus.get("/api/v1/query", query="booking_guard_up")["data"]["result"]
                return {(r["metric"]["instance"], r["metric"]["database"]): r["value"][1] for r in result} or None

            seen = wait_for(lambda: (u := up()) and len(u) == 3 and u, 30, "a scrape of every target", prometheus.proc)
            assert seen == {("alpha", "alpha"): "1", ("beta", "beta"): "1", ("down", "down"): "0"}
            scraped = prometheus.get("/api/v1/query", query='up{job="booking_guard"}')["data"]["result"]
            assert {r["metric"]["instance"]: r["value"][1] for r in scraped} == {"alpha": "1", "beta": "1", "down": "1"}
            found = prometheus.get("/api/v1/query", query='data_inconsistency_detected_total{type="phantom_booking"}')
            assert {r["metric"]["instance"]: r["value"][1] for r in found["data"]["result"]} == {"alpha": "1", "beta": "0"}
        finally:
            prometheus.stop()
