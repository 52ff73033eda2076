"""A small soak inside `make test`: a few thousand calls with every kind of fault and a Cal.com outage,
then the same verdict `make soak` demands (booking_guard.sim.soak): nothing missed, no false positive,
nothing lost, 100 % consistent after the final reconcile, detection latency measured (its targets
are `make soak`'s to judge: a test asserts no timing of its own run).
And the verdict itself: a planted miss and a planted false positive are counted as such."""

import pytest
from booking_guard.sim.simulate import FAULT_KINDS, SimConfig
from booking_guard.sim.simulate import run as simulate
from booking_guard.sim.soak import render, verdict
from psycopg.types.json import Jsonb
from support.services import dsn_of

GRACE = 1.0


@pytest.mark.slow
def test_small_soak_verdict(db):
    config = SimConfig(calls=3000, workers=4, fault_rate=0.1, grace=GRACE, cooldown=1.0, monitor_every=1.0,
                       outages=[(0.3, 1.0)], calcom_latency=0.001, calcom_failure_rate=0.005, seed=11)
    result, settled = simulate(dsn_of(db), config)
    v = verdict(db, result, settled, GRACE, 1.0)
    report = render(v)
    assert result.worker_errors == [], report
    assert all(v.by_kind[k].injected > 0 for k in FAULT_KINDS), report
    assert v.total.missed == 0, report
    assert v.false_positives == [], report
    assert v.lost_bookings == [] and v.lost_alerts == [], report
    assert v.consistency_rate == 100.0, report
    # detection latency is measured for both kinds of fault; whether it meets its targets depends on
    # this machine's load, and is the verdict of `make soak`, not of this test
    assert v.latency["commit"]["p95"] is not None and v.latency["grace"]["p95"] is not None, report
    # the outage opened breakers, and they closed again while the workload went on
    assert v.extra["breaker_opened"] >= 1 and v.extra["breaker_closed"] >= 1, report
    assert v.failures(targets=False) == [], report


@pytest.mark.slow
def test_verdict_counts_a_miss_and_a_false_positive(db):
    result, settled = simulate(dsn_of(db), SimConfig(calls=30, workers=2, fault_rate=0.0, calcom_failure_rate=0.0,
                                                     calcom_latency=0.0, grace=0.5))
    clean = verdict(db, result, settled, 0.5)
    assert clean.total.injected == 0 and clean.failures(targets=False) == []
    a, b = [r[0] for r in db.execute("select id from calls where session_outcome = 'appointment_booked'"
                                     " order by id limit 2")]
    # ground truth says a direction was dropped on call a, but nothing was wrong with it: a miss
    db.execute("insert into sim.faults (run_id, kind, path, expected, call_id, committed_at)"
               " values (%s, 'null_direction', 'raw_sql', 'commit', %s, now())", (result.run_id, a))
    # an alert on call b, where nothing was injected: a false positive
    db.execute("select booking_guard_internal.raise_alert('missing_direction', 'warning', 'call', %s, 'planted', %s, false)",
               (str(b), Jsonb({})))
    v = verdict(db, result, settled, 0.5)
    assert v.by_kind["null_direction"].missed == 1
    assert [(fp[0], fp[2], fp[4]) for fp in v.false_positives] == [("alert", "missing_direction", str(b))]
    assert v.failures(targets=False) == ["1 fault(s) missed", "1 false positive(s)"]
