"""The soak: the simulator at scale, then the verdict against the ground truth (sim.faults).

For each injected fault the verdict looks for what booking_guard did about it, by the fault's
entities (its call, its appointment, its Cal.com booking id):

    prevented      the database kept the fault from becoming an inconsistency when it committed:
                   record_booking refused it (a rollback to creation_failed, or idempotency), a
                   BG002, or the flags were derived from the appointment rows (trigger 4)
    detected       an alert, a review item or a reconcile repair names one of its entities
    auto-corrected one of those alerts is auto_corrected, or a repair event names it
    queued         a review item for its call (or its appointment, for ambiguous orphans)
    missed         neither prevented nor detected

False positives: alerts and review items that name no injected fault. Latency: from the fault's
commit (sim.faults.committed_at) to its first alert or review item, per expected class (commit,
grace, monitor). Consistency: the share of calls whose flags agree with their appointment rows
(and that have a direction), and of retell_webhook appointments that have their call, after the
final reconcile. Lost: a Cal.com booking with no trace in the database (no appointment, no call
holding its booking id, no review item naming it), a committed booking (sim.bookings) whose
appointment is gone without an appointment_deleted fault, or an alert that was notified but is
not in booking_guard.alerts.
"""

from __future__ import annotations

import json
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psycopg

from booking_guard.sim.simulate import FAULT_KINDS, SimConfig, SimResult
from booking_guard.sim.simulate import run as simulate

# Per fault (one row each): every alert, review item and repair event naming its entities.
# What may answer each kind of fault: alert types and review reasons. An alert or review item on a
# fault's entity for any other reason is no detection of it, and counts as a false positive.
SIGNALS = {
    "calcom_failure": ("calcom_booking_failed",),
    "local_insert_failed": ("phantom_booking", "missing_appointment", "appointment_validation_failed"),
    "worker_died": ("missing_appointment", "appointment_validation_failed"),
    "null_direction": ("missing_direction",),
    "orphan_appointment": ("orphaned_appointment", "ambiguous_orphan"),
    "appointment_deleted": (),
    # record_booking refuses the second booking (alert and review appointment_validation_failed, and the
    # rule recent_failures sees the failed validation); its rollback of the call is then undone by the
    # commit-time truth check, which finds the first booking's appointment (unlinked_appointment)
    "double_booking": ("appointment_validation_failed", "recent_failures", "unlinked_appointment",
                       "booking_id_mismatch"),
    "retry_double_booked": ("duplicate_booking",),
}

SIGNALS_CTE = """
signals (kind, signal) as (
    select key, jsonb_array_elements_text(value) from jsonb_each(%(signals)s::jsonb)
),
-- equality joins, one per kind of entity (an OR of them would be a nested loop over alerts x faults)
entities (fault_id, kind, entity_type, entity_id) as (
    select id, kind, 'call', call_id::text from f where call_id is not null
    union all select id, kind, 'appointment', appointment_id::text from f where appointment_id is not null
    union all select id, kind, 'booking', booking_id from f where booking_id is not null
),
matches as (
    select distinct e.fault_id, a.id as alert_id, null::bigint as review_id
      from entities e
      join booking_guard.alerts a on a.entity_type = e.entity_type and a.entity_id = e.entity_id
      join signals s on s.kind = e.kind and s.signal = a.alert_type
    union all
    select f.id, null, q.id
      from f
      join booking_guard.review_queue q on q.call_id = f.call_id
      join signals s on s.kind = f.kind and s.signal = q.reason
    union all
    select f.id, null, q.id
      from f
      join booking_guard.review_queue q on q.call_id is null and q.context ? ('appointment_' || f.appointment_id)
      join signals s on s.kind = f.kind and s.signal = q.reason
     where f.appointment_id is not null
)
"""

VERDICT_SQL = """
with f as (
    select * from sim.faults where run_id = %(run)s
),""" + SIGNALS_CTE + """,
alert_agg as (
    select m.fault_id, count(*) as alerts, array_agg(distinct a.alert_type) as alert_types,
           bool_or(a.auto_corrected) as auto_corrected, min(a.detected_at) as first_at
      from matches m join booking_guard.alerts a on a.id = m.alert_id
     group by m.fault_id
),
review_agg as (
    select m.fault_id, count(*) as reviews, min(q.created_at) as first_at
      from matches m join booking_guard.review_queue q on q.id = m.review_id
     group by m.fault_id
),
repair_agg as (
    select e.fault_id, count(*) as repairs, min(ev.at) as first_at
      from entities e
      join booking_guard.events ev
        on ev.kind = 'reconcile' and ev.entity_type = e.entity_type and ev.entity_id = e.entity_id
     where e.entity_type in ('call', 'appointment')
     group by e.fault_id
)
select f.id, f.kind, f.path, f.expected, f.call_id, f.outcome,
       coalesce(aa.alerts, 0) as alerts, aa.alert_types, aa.auto_corrected,
       coalesce(ra.reviews, 0) as reviews, coalesce(pa.repairs, 0) as repairs,
       extract(epoch from least(aa.first_at, ra.first_at, pa.first_at) - f.committed_at) as latency,
       -- the call's state now, for "prevented": consistent flags derived from the appointment rows
       c.session_outcome, c.appointment_made,
       (select count(*) from appointments a where a.call_id = f.call_id) as appointments
  from f
  left join alert_agg aa on aa.fault_id = f.id
  left join review_agg ra on ra.fault_id = f.id
  left join repair_agg pa on pa.fault_id = f.id
  left join calls c on c.id = f.call_id
 order by f.id
"""

# Every alert and review item of the database (all runs) must answer an injected fault.
FALSE_POSITIVE_SQL = """
with f as (select * from sim.faults),""" + SIGNALS_CTE + """
select 'alert' as what, a.id, a.alert_type as kind, a.entity_type, a.entity_id
  from booking_guard.alerts a
 where not exists (select from matches m where m.alert_id = a.id)
union all
select 'review', q.id, q.reason, 'call', q.call_id::text
  from booking_guard.review_queue q
 where not exists (select from matches m where m.review_id = q.id)
"""

# The truth invariant, written here independently of the extension's rules.
CONSISTENCY_SQL = """
select count(*) as calls,
       count(*) filter (where c.direction is not null
                          and c.appointment_made = (c.n > 0)
                          and (c.session_outcome is not distinct from 'appointment_booked') = (c.n > 0)
                          and (c.appointment_link_status is not distinct from 'linked') = (c.n > 0)) as consistent,
       (select count(*) from appointments a where a.source = 'retell_webhook') as appointments,
       (select count(*) from appointments a where a.source = 'retell_webhook'
           and (a.call_id is null or not exists (select from calls x where x.id = a.call_id))) as orphans
  from (select g.*, (select count(*) from appointments a where a.call_id = g.id) as n from calls g) c
"""


@dataclass
class KindRow:
    injected: int = 0
    prevented: int = 0
    detected: int = 0
    auto_corrected: int = 0
    queued: int = 0
    missed: int = 0
    missed_ids: list[int] = field(default_factory=list)


@dataclass
class Verdict:
    run_id: int
    calls: int
    seconds: float
    by_kind: dict[str, KindRow]
    false_positives: list[tuple]
    consistency: dict
    latency: dict[str, dict]
    lost_bookings: list[str]
    lost_alerts: list[int]
    open_findings: dict[str, int]
    worker_errors: list[str]
    driver_errors: list[str]
    extra: dict

    @property
    def total(self) -> KindRow:
        t = KindRow()
        for row in self.by_kind.values():
            for name in ("injected", "prevented", "detected", "auto_corrected", "queued", "missed"):
                setattr(t, name, getattr(t, name) + getattr(row, name))
        return t

    @property
    def consistency_rate(self) -> float:
        c = self.consistency
        good = c["consistent"] + c["appointments"] - c["orphans"]
        whole = c["calls"] + c["appointments"]
        return 100.0 * good / whole if whole else 100.0

    def failures(self, targets: bool = True) -> list[str]:
        """What makes the soak fail: missed, false positives, lost, inconsistent, errors, and the latency targets."""
        out = []
        if self.total.missed:
            out.append(f"{self.total.missed} fault(s) missed")
        if self.false_positives:
            out.append(f"{len(self.false_positives)} false positive(s)")
        if self.lost_bookings:
            out.append(f"{len(self.lost_bookings)} booking(s) lost")
        if self.lost_alerts:
            out.append(f"{len(self.lost_alerts)} alert(s) lost")
        if self.consistency_rate < 100.0:
            out.append(f"consistency {self.consistency_rate:.3f} % after the final reconcile")
        if self.worker_errors:
            out.append(f"{len(self.worker_errors)} worker error(s)")
        if targets:
            grace = self.extra.get("grace", 0.0)
            for cls, limit in (("commit", 1.0), ("grace", grace + 2.0)):
                p95 = self.latency.get(cls, {}).get("p95")
                if p95 is not None and p95 > limit:
                    out.append(f"detection latency p95 of {cls}-time faults {p95:.2f} s > {limit:.1f} s")
        return out

    def as_dict(self) -> dict:
        t = self.total
        return {"run_id": self.run_id, "calls": self.calls, "seconds": round(self.seconds, 1),
                "by_kind": {k: {n: getattr(r, n) for n in ("injected", "prevented", "detected", "auto_corrected",
                                                            "queued", "missed")} for k, r in self.by_kind.items()},
                "total": {n: getattr(t, n) for n in ("injected", "prevented", "detected", "auto_corrected", "queued",
                                                      "missed")},
                "false_positives": len(self.false_positives), "consistency_rate": self.consistency_rate,
                "consistency": self.consistency, "latency": self.latency, "lost_bookings": len(self.lost_bookings),
                "lost_alerts": len(self.lost_alerts), "open_findings": self.open_findings,
                "worker_errors": len(self.worker_errors), "driver_errors": len(self.driver_errors),
                "extra": self.extra, "failures": self.failures()}


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0, "p50": None, "p95": None, "max": None}
    values = sorted(values)

    def pick(q: float) -> float:
        return values[min(len(values) - 1, max(0, round(q * len(values)) - 1))]

    return {"n": len(values), "p50": round(statistics.median(values), 3), "p95": round(pick(0.95), 3),
            "max": round(values[-1], 3)}


def _prevented(kind: str, row: dict) -> bool:
    """The database kept this fault from becoming an inconsistency when it committed."""
    outcome = row["outcome"] or ""
    if kind == "retry_double_booked":
        return outcome == "idempotent"
    if kind == "double_booking":
        # record_booking recorded one of the two bookings and refused the other (queued with its booking id)
        first, _, second = outcome.partition(", ")
        return "error" not in outcome and (first.split()[-1] == "ok") != (second.split()[-1] == "ok")
    if kind == "appointment_deleted":
        # trigger 4: the call lost its only appointment and its flags were derived from that at once
        return row["appointments"] == 0 and row["appointment_made"] is False \
            and row["session_outcome"] == "appointment_cancelled"
    return False


def verdict(conn: psycopg.Connection, result: SimResult, settled: dict, grace: float,
            monitor_every: float = 1.0) -> Verdict:
    by_kind = {k: KindRow() for k in FAULT_KINDS}
    latencies: dict[str, list[float]] = {"commit": [], "grace": [], "monitor": [], "queue": []}
    cur = conn.execute(VERDICT_SQL, {"run": result.run_id, "signals": json.dumps(SIGNALS)})
    names = [c.name for c in cur.description]
    for values in cur.fetchall():
        row = dict(zip(names, values, strict=True))
        k = by_kind[row["kind"]]
        k.injected += 1
        prevented = _prevented(row["kind"], row)
        detected = row["alerts"] > 0 or row["reviews"] > 0 or row["repairs"] > 0
        k.prevented += prevented
        k.detected += detected
        k.auto_corrected += bool(row["auto_corrected"]) or row["repairs"] > 0
        k.queued += row["reviews"] > 0
        if not (prevented or detected):
            k.missed += 1
            k.missed_ids.append(row["id"])
        if detected and row["latency"] is not None:
            # an alert raised inside the faulty transaction is dated at its start, before the commit
            latencies[row["expected"]].append(max(0.0, float(row["latency"])))
    false_positives = conn.execute(FALSE_POSITIVE_SQL, {"signals": json.dumps(SIGNALS)}).fetchall()
    consistency = dict(zip(("calls", "consistent", "appointments", "orphans"),
                           conn.execute(CONSISTENCY_SQL).fetchone(), strict=True))
    # Lost bookings: what Cal.com booked must be findable by a person.
    traced = {r[0] for r in conn.execute(
        "select calcom_v2_booking_id from appointments where calcom_v2_booking_id is not null"
        " union select booking_id from calls where booking_id is not null"
        " union select booking_id from sim.faults where run_id = %s and booking_id is not null", (result.run_id,))}
    reviewed = " ".join(r[0] for r in conn.execute("select context::text from booking_guard.review_queue"))
    lost_bookings = [uid for uid in result.calcom_ledger if uid not in traced and uid not in reviewed]
    # committed bookings whose appointment vanished without a deletion in the ground truth
    lost_bookings += [r[0] for r in conn.execute(
        "select b.booking_id from sim.bookings b where b.run_id = %s"
        " and not exists (select from appointments a where a.calcom_v2_booking_id = b.booking_id)"
        " and not exists (select from sim.faults f where f.run_id = b.run_id and f.kind = 'appointment_deleted'"
        "                 and f.booking_id = b.booking_id)", (result.run_id,))]
    alert_ids = {r[0] for r in conn.execute("select id from booking_guard.alerts")}
    lost_alerts = sorted(result.notified_alerts - alert_ids)
    open_findings = dict(conn.execute(
        "select rule, count(*) from booking_guard.detect('1 day') group by rule order by rule").fetchall())
    extra = {"grace": grace, "monitor_every": monitor_every, "calcom": result.calcom,
             "breaker_rejections": result.breaker_rejections,
             "verify_runs": result.verify_runs, "monitor_runs": result.monitor_runs,
             "notified_alerts": len(result.notified_alerts),
             "breaker_opened": conn.execute("select count(*) from booking_guard.circuit_transitions"
                                            " where to_state = 'open'").fetchone()[0],
             "breaker_closed": conn.execute("select count(*) from booking_guard.circuit_transitions"
                                            " where to_state = 'closed'").fetchone()[0],
             "settle": {k: v for k, v in settled.items() if k != "reconcile"},
             "final_reconcile": settled.get("reconcile")}
    return Verdict(run_id=result.run_id, calls=result.calls, seconds=result.seconds, by_kind=by_kind,
                   false_positives=false_positives, consistency=consistency,
                   latency={k: _percentiles(v) for k, v in latencies.items()}, lost_bookings=lost_bookings,
                   lost_alerts=lost_alerts, open_findings=open_findings, worker_errors=result.worker_errors,
                   driver_errors=result.driver_errors, extra=extra)


def render(v: Verdict) -> str:
    cols = ("injected", "prevented", "detected", "auto_corrected", "queued", "missed")
    lines = [f"{'fault kind':<22}" + "".join(f"{c:>15}" for c in cols)]
    for kind, row in [*v.by_kind.items(), ("total", v.total)]:
        if kind == "total":
            lines.append("-" * (22 + 15 * len(cols)))
        lines.append(f"{kind:<22}" + "".join(f"{getattr(row, c):>15,}" for c in cols))
    lines.append("")
    lines.append(f"false positives (flagged, not injected): {len(v.false_positives)}")
    c = v.consistency
    lines.append(f"consistency after the final reconcile: {v.consistency_rate:.3f} % "
                 f"({c['consistent']:,} of {c['calls']:,} calls, {c['appointments'] - c['orphans']:,} of "
                 f"{c['appointments']:,} webhook appointments with their call)")
    lines.append("detection latency, fault's commit to its first alert or review item:")
    labels = {"commit": "at commit (target p95 <= 1 s)",
              "grace": f"after the grace of {v.extra['grace']:g} s (target p95 <= {v.extra['grace'] + 2:g} s)",
              "monitor": f"by run_monitor() every {v.extra['monitor_every']:g} s"}
    for cls, label in labels.items():
        p = v.latency[cls]
        if p["n"]:
            lines.append(f"  {label:<48} n={p['n']:<7,} p50 {p['p50']:.3f} s  p95 {p['p95']:.3f} s  max {p['max']:.3f} s")
    lines.append(f"lost: {len(v.lost_bookings)} booking(s), {len(v.lost_alerts)} alert(s) "
                 f"(of {v.extra['calcom'].get('booked', 0):,} Cal.com bookings and {v.extra['notified_alerts']:,} "
                 "notified alerts)")
    findings = ", ".join(f"{k} {n}" for k, n in v.open_findings.items()) or "none"
    lines.append(f"findings left after the final reconcile (detect('1 day')): {findings}")
    lines.append(f"breaker: opened {v.extra['breaker_opened']} time(s), closed {v.extra['breaker_closed']} time(s), "
                 f"{v.extra['breaker_rejections']:,} call(s) rejected while open")
    if v.worker_errors:
        lines.append(f"worker errors: {len(v.worker_errors)}, first: {v.worker_errors[0]}")
    if v.driver_errors:
        lines.append(f"verify/monitor runs that hit a deadlock (run again next period): {len(v.driver_errors)}")
    failures = v.failures()
    lines.append("VERDICT: " + ("PASS" if not failures else "FAIL: " + "; ".join(failures)))
    return "\n".join(lines) + "\n"


def progress_bar(label: str = "calls") -> Callable[[int, int], None]:
    """A progress callback: a bar redrawn in place on a terminal, a line every 10 % otherwise."""
    tty = sys.stderr.isatty()
    lock = threading.Lock()
    shown = [-1]

    def bar(done: int, total: int) -> None:
        step = max(1, total // (200 if tty else 10))
        if done % step and done != total:
            return
        with lock:   # workers report from their threads; draw each step once, in order
            if done <= shown[0]:
                return
            shown[0] = done
            if tty:
                fill = 40 * done // total
                sys.stderr.write(f"\r[{'#' * fill}{'.' * (40 - fill)}] {done:,}/{total:,} {label}"
                                 + ("\n" if done == total else ""))
            else:
                sys.stderr.write(f"{done:,}/{total:,} {label}\n")
            sys.stderr.flush()

    return bar


def soak(dsn: str, config: SimConfig, progress: bool = True, json_path: str | None = None) -> int:
    started = time.monotonic()
    result, settled = simulate(dsn, config, progress_bar() if progress else None)
    with psycopg.connect(dsn, autocommit=True) as conn:
        v = verdict(conn, result, settled, config.grace, config.monitor_every)
    print(f"soak: {config.calls:,} calls, {config.workers} workers, fault rate {config.fault_rate:.0%}, "
          f"verification_grace {config.grace:g} s, verify_due() every {config.verify_every:g} s, "
          f"run_monitor() every {config.monitor_every:g} s; workload {result.seconds:.1f} s "
          f"({config.calls / result.seconds:,.0f} calls/s), total {time.monotonic() - started:.1f} s\n")
    print(render(v), end="")
    if json_path:
        with open(json_path, "w") as out:
            json.dump(v.as_dict(), out, indent=2, default=str)
    return 1 if v.failures() else 0


def simulate_and_report(dsn: str, config: SimConfig, progress: bool = True) -> int:
    """`booking-guard simulate`: the workload only; what was injected, and where to look."""
    result, _ = simulate(dsn, config, progress_bar() if progress else None)
    print(f"run {result.run_id}: {result.calls:,} calls in {result.seconds:.1f} s, "
          f"{sum(result.fault_counts.values()):,} faults injected:")
    for kind in FAULT_KINDS:
        print(f"  {kind:<22}{result.fault_counts.get(kind, 0):>8,}")
    print(f"ground truth: select * from sim.faults where run_id = {result.run_id};")
    print("what booking_guard made of it: booking-guard check --since '1 day'; booking-guard report")
    for error in result.worker_errors[:10]:
        print(f"worker error: {error}")
    return 1 if result.worker_errors else 0
