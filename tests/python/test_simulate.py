"""The workload simulator: the fake Cal.com, and each kind of injected fault on its own, with the
ground truth it writes and what booking_guard made of it (booking_guard.sim.soak.verdict)."""

import json

import psycopg
import pytest
from booking_guard.sim.fake_calcom import CalcomClient, CalcomError, FakeCalcom
from booking_guard.sim.simulate import EXPECTED, FAULT_KINDS, SimConfig
from booking_guard.sim.simulate import run as simulate
from booking_guard.sim.soak import verdict
from psycopg.conninfo import make_conninfo


def dsn_of(conn: psycopg.Connection) -> str:
    info = conn.info
    return make_conninfo(host=info.host, port=info.port, user=info.user, dbname=info.dbname,
                         password=info.password or None)


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
                 "DATA CONSISTENCY REPORT", "9. KPIs against the seed's targets", "10. A sample of the metrics",
                 "Where to look next", "http://127.0.0.1:9188/"):
        assert part in out, part
    assert "closed -> open" in out   # the outage opened the breaker
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
