"""The workload simulator: the fake Cal.com, and each kind of injected fault on its own, with the
ground truth it writes and what booking_guard made of it (booking_guard.sim.soak.verdict)."""

import contextlib
import json
import re
import subprocess
import threading
import urllib.request

import pytest
from booking_guard.sim.fake_calcom import CalcomClient, CalcomError, FakeCalcom
from booking_guard.sim.simulate import EXPECTED, FAULT_KINDS, SimConfig
from booking_guard.sim.simulate import run as simulate
from booking_guard.sim.soak import verdict
from conftest import ROOT
from support.services import dsn_of


def test_fake_calcom_books_fails_and_stops():
    with FakeCalcom() as fake:
        client = CalcomClient(fake.port, timeout=5)
        uid = client.book({"call": "c1"})
        assert fake.ledger == {uid: {"call": "c1"}}
        fake.outage_for(3600)
        with pytest.raises(CalcomError, match="HTTP 503"):
            client.book({"call": "c2"})
        fake.end_outage()
        assert client.book({"call": "c3"}) in fake.ledger
        assert fake.counts == {"booked": 2, "failed": 1}
        client.close()
    with pytest.raises(CalcomError, match="unreachable"):
        CalcomClient(fake.port, timeout=1).book({"call": "c4"})


def test_fake_calcom_failure_rate_and_lifetime():
    fake = FakeCalcom(failure_rate=1.0, max_lifetime=0.2)
    with fake:
        with pytest.raises(CalcomError):
            CalcomClient(fake.port, timeout=5).book({})
        # nobody stops it: its own timer does
        fake._thread.join(10)
        assert not fake._thread.is_alive()


def only(kind: str, calls: int = 20, **overrides) -> SimConfig:
    """Every call books, and every booking gets this one fault."""
    settings = dict(calls=calls, workers=2, fault_rate=1.0, fault_mix={kind: 1}, booking_share=1.0,
                    calcom_failure_rate=0.0, calcom_latency=0.0, grace=0.5, cooldown=1.0, monitor_every=0.5)
    settings.update(overrides)
    return SimConfig(**settings)


@pytest.mark.slow
@pytest.mark.parametrize("kind", [k for k in FAULT_KINDS if k != "calcom_failure"])
def test_each_fault_kind_has_ground_truth_and_an_answer(db, kind):
    result, settled = simulate(dsn_of(db), only(kind))
    assert result.worker_errors == []
    faults = db.execute("select kind, expected, count(*), count(distinct call_id) from sim.faults"
                        " where run_id = %s group by 1, 2", (result.run_id,)).fetchall()
    assert faults == [(kind, EXPECTED[kind], 20, 20)]
    v = verdict(db, result, settled, 0.5, 0.5)
    row = v.by_kind[kind]
    assert row.injected == 20
    assert row.missed == 0, row.missed_ids
    assert v.false_positives == []
    assert v.lost_bookings == [] and v.lost_alerts == []
    assert v.consistency_rate == 100.0
    if kind == "appointment_deleted":
        assert row.prevented == 20 and row.detected == 0
    elif kind == "retry_double_booked":
        paths = dict(db.execute("select path, count(*) from sim.faults where run_id = %s group by 1", (result.run_id,)))
        assert row.prevented == paths.get("record_booking", 0)
        assert row.detected == paths.get("raw_sql", 0)
    else:
        assert row.detected == 20
    if kind in ("local_insert_failed", "worker_died"):
        # rolled back to creation_failed by verify_due() after the grace, and queued for review
        assert row.queued == 20 and row.auto_corrected == 20
        assert db.execute("select count(*) from calls where session_outcome = 'creation_failed'").fetchone()[0] == 20
    if kind == "orphan_appointment":
        assert db.execute("select count(*) from appointments where call_id is null").fetchone()[0] == 0


@pytest.mark.slow
def test_calcom_failures_open_the_breaker_and_are_queued(db):
    result, settled = simulate(dsn_of(db), only("double_booking", calls=12, workers=1, calcom_failure_rate=1.0, services=1,
                                                companies=1))
    assert result.worker_errors == []
    assert result.fault_counts == {"calcom_failure": 12}
    # three failures open the breaker of the service; the calls after that are rejected without a request
    assert result.calcom["failed"] + result.breaker_rejections == 12
    assert result.breaker_rejections > 0
    assert db.execute("select count(*) from booking_guard.review_queue where reason = 'calcom_booking_failed'"
                      ).fetchone()[0] == 12
    v = verdict(db, result, settled, 0.5, 0.5)
    assert v.by_kind["calcom_failure"].queued == 12 and v.total.missed == 0 and v.false_positives == []
    assert v.extra["breaker_opened"] >= 1


@pytest.mark.slow
def test_demo_tells_the_whole_story(db, capsys):
    from booking_guard.sim.demo import run as demo

    config = SimConfig(calls=120, workers=2, fault_rate=0.3, calcom_latency=0.005, think_time=0.02,
                       outages=[(0.3, 0.5)], grace=0.5, cooldown=0.5, monitor_every=0.5, services=1, companies=1)
    assert demo(dsn_of(db), config) == 0
    out = capsys.readouterr().out
    for part in ("1. The workload", "2. What was injected", "3. What booking_guard made of it", "4. Prevented at commit",
                 "5. Detected and repaired", "6. The review queue", "7. The circuit breaker",
                 "DATA CONSISTENCY REPORT", "9. KPIs against their targets", "10. A sample of the metrics",
                 "Where to look next", "make demo-serve"):
        assert part in out, part
    assert "closed -> open" in out   # the outage opened the breaker
    # found (before repair) against consistent (after), and a reason for every KPI that misses its target
    assert re.search(r'How to read it: "Inconsistencies Found: \d+ \([\d.]+%\)" counts what the rules caught today,'
                     r".*before any repair.*after the repairs and the final reconcile", out, re.S)
    missed = [name for name in re.findall(r"^(\w+) +[\d.]+ +\S+ +[<>]= [\d.]+ +NO ", out, re.M)]
    for name in missed:
        assert re.search(rf"^{name} is [\d.]+ .*\(target [<>]= [\d.]+\): \S", out, re.M), name
    assert "every booking written, whatever wrote it" in out
    assert out.rstrip().endswith("nothing missed, nothing lost, no false positive.")


@pytest.mark.slow
def test_cli_soak_writes_its_verdict(db, tmp_path, capsys):
    from booking_guard.cli import main

    verdict_file = tmp_path / "verdict.json"
    assert main(["--dsn", dsn_of(db), "soak", "--calls", "200", "--workers", "2", "--outage", "0.5:0.5",
                 "--grace", "500ms", "--monitor-every", "500ms", "--json", str(verdict_file)]) == 0
    written = json.loads(verdict_file.read_text())
    assert written["calls"] == 200 and written["failures"] == [] and written["total"]["missed"] == 0
    assert "VERDICT: PASS" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["--dsn", dsn_of(db), "soak", "--outage", "soon"])
    assert exit_info.value.code == 2


class Lines:
    """stdout for a demo running in a thread: the lines so far, and an event when one contains `until`."""

    def __init__(self, until: str) -> None:
        self.text = ""
        self.until = until
        self.seen = threading.Event()

    def write(self, data: str) -> int:
        self.text += data
        if self.until in self.text:
            self.seen.set()
        return len(data)

    def flush(self) -> None:
        pass


def where_to_look(out: str) -> list[str]:
    """The commands of the "Where to look next" lines, as printed (the comment after them dropped)."""
    block = out.split("Where to look next", 1)[1].split("\n\n", 1)[0]
    commands = []
    for line in block.splitlines()[2:]:
        command = re.split(r"  (?:#|--) ", line.strip(), maxsplit=1)[0].strip()
        if command:
            commands.append(command)
    return commands


@pytest.mark.slow
def test_demo_serve_keeps_everything_up_and_every_line_it_prints_works(db):
    from booking_guard.sim.demo import run as demo

    config = SimConfig(calls=80, workers=2, fault_rate=0.3, calcom_latency=0.005, think_time=0.0,
                       outages=[(0.3, 0.5)], grace=0.5, cooldown=0.5, monitor_every=0.5, services=1, companies=1)
    out, stop, result = Lines(until="until Ctrl-C."), threading.Event(), {}
    thread = threading.Thread(target=lambda: result.setdefault("code", demo(dsn_of(db), config, "127.0.0.1:0", stop)))
    with contextlib.redirect_stdout(out):
        thread.start()
        assert out.seen.wait(180), out.text[-3000:]
        commands = where_to_look(out.text)
        urls = [c for c in commands if c.startswith("http://")]
        assert [u.rsplit("/", 1)[1] for u in urls] == ["", "metrics"]
        for url in urls:
            with urllib.request.urlopen(url, timeout=10) as response:
                assert response.status == 200
                body = response.read().decode()
            assert ("inconsistency-count" in body) if url.endswith("/") else ("appointment_creation_success_total" in body)
        psql = [c for c in commands if c.startswith("psql ")]
        sql = [c for c in commands if c.startswith("select ")]
        assert len(psql) == 1 and len(sql) >= 3
        done = subprocess.run(psql[0] + " -X -v ON_ERROR_STOP=1", shell=True, input="\n".join(sql) + "\n",
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        # the review item claimed, and every reason still queued listed (which reasons a run queues is random)
        queued = {r for (r,) in db.execute("select distinct reason from booking_guard.review_queue where status <> 'resolved'")}
        assert "claimed_by" in done.stdout and queued, done.stdout
        assert {r for r in queued if r not in done.stdout} == set(), done.stdout
        shell = [c for c in commands if " check " in c or " report " in c]
        assert len(shell) == 2
        for command in shell:
            done = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=60, cwd=ROOT)
            assert done.returncode in (0, 1, 2) and "error:" not in done.stderr, (command, done.stderr)
            assert "finding(s)" in done.stdout or "DATA CONSISTENCY REPORT" in done.stdout, done.stdout[:500]
        files = [c for c in commands if c.endswith(".md")]
        assert files and all((ROOT / f).is_file() for f in files)
        stop.set()
        thread.join(30)
    assert result == {"code": 0}
    assert out.text.rstrip().endswith("Stopped serving.")
    with pytest.raises(OSError):
        urllib.request.urlopen(urls[0], timeout=2)


def test_the_lines_a_plain_demo_prints_work_once_its_sandbox_is_gone():
    from booking_guard.sim.demo import where_to_look as lines

    makefile = (ROOT / "Makefile").read_text()
    for command, _why in lines("postgresql://nowhere/x", 1, None):
        if command.startswith("make "):
            target = command.split()[1]
            assert re.search(rf"^{re.escape(target)}:", makefile, re.M), command
        else:
            assert (ROOT / command).is_file(), command
