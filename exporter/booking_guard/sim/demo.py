"""`booking-guard demo`: booking_guard meeting a realistic, faulty booking workload, told as a story.

On the database it is given (the sandbox of `make demo`) it creates the reference application
schema (package data: booking_guard/sim/data/app_schema.sql, which examples/app_schema.sql links
to) and the extension, attaches booking_guard to `calls` and `appointments`, and runs the workload
simulator (booking_guard.sim.simulate): a few hundred calls placed by phone-agent workers against
a fake Cal.com on 127.0.0.1, a share of them with a fault injected (each recorded as ground truth
in sim.faults), and a Cal.com outage in the middle. Then it tells what happened: what was
injected, what was prevented at commit, what was detected and repaired, what waits in the review
queue, how the circuit breaker opened and recovered, the daily report (and how "found" differs from
"consistent"), the KPIs against their targets (and why each one that misses its target
misses it), and where to look next.

With serve (`booking-guard demo --serve`, `make demo-serve`) it then keeps serving that database:
the status page, /metrics and the verification loop, until Ctrl-C (or SIGTERM), and prints the
URLs, the psql line and the commands that work on it. Without it the lines it prints work after
the demo has ended (the sandbox of `make demo` is gone by then).

To finish in well under a minute the run shortens two defaults, and says so: the verification
grace (1 s instead of 5 s) and the breaker cooldown (2 s instead of 30 s).
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import threading
import time

import psycopg

from booking_guard.ops.display import heading, render, table
from booking_guard.sim import app_schema
from booking_guard.sim.simulate import FAULT_KINDS, SimConfig
from booking_guard.sim.simulate import run as simulate
from booking_guard.sim.soak import progress_bar, verdict

#: What each injected fault is, in one line (the failure modes of an unguarded booking system).
FAULT_STORY = {
    "calcom_failure": "Cal.com answered 503, or the breaker refused to call it while it was down",
    "local_insert_failed": "Cal.com booked, the appointment insert failed, the app still said booked",
    "worker_died": "the call was flagged booked, then the worker died before the appointment",
    "null_direction": "the call was written without a direction",
    "orphan_appointment": "the calendar webhook wrote an appointment without its call",
    "appointment_deleted": "a booked call's appointment was deleted",
    "double_booking": "two workers booked the same call (two Cal.com bookings)",
    "retry_double_booked": "a retry recorded the same Cal.com booking twice",
}

DEMO_CONFIG = SimConfig(calls=400, workers=4, fault_rate=0.2, calcom_latency=0.05, think_time=0.1, calcom_failure_rate=0.01,
                        outages=[(0.3, 2.0)], grace=1.0, cooldown=2.0, monitor_every=1.0, services=2, companies=2,
                        seed=7)


def prepare(conn: psycopg.Connection) -> None:
    """Reference schema, extension and attachment, each only when missing."""
    if conn.execute("select to_regclass('public.calls') is null").fetchone()[0]:
        conn.execute(app_schema())
    conn.execute("create extension if not exists booking_guard cascade")
    if conn.execute("select not exists (select from booking_guard.attachment)").fetchone()[0]:
        conn.execute("select booking_guard.attach('public.calls', 'public.appointments')")


def _rows(conn: psycopg.Connection, query: str, params: tuple = ()) -> list[list[str]]:
    return [["" if v is None else str(v) for v in row] for row in conn.execute(query, params).fetchall()]


#: Why a rule or kind of failed booking is left to a person (the auto-correction rate's misses).
LEFT_TO_A_PERSON = {
    "duplicate_booking": "one calendar booking in two appointment rows: which one is real is not for a rule to guess",
    "appointment_validation_failed": "a second booking refused for a booked call: the extra calendar booking must be"
                                     " cancelled, and a refused booking rebooked",
    "orphaned_appointment": "a webhook appointment that no call, or several calls, hold the booking id of",
    "booking_id_mismatch": "observe mode: the call's booking id differs from its appointment's, alerted only",
    "missing_appointment": "observe mode, or a claim whose grace had not passed",
}


def kpi_notes(conn: psycopg.Connection) -> list[str]:
    """One line per KPI that misses its target, saying why, from the data."""
    notes = []
    for name, value, unit, target in conn.execute(
            "select name, value, unit, target from booking_guard.kpis('1 day') where ok is false"):
        if name == "manual_review_queue_size":
            reasons = conn.execute("select reason, count(*) from booking_guard.review_queue where status <> 'resolved'"
                                   " group by 1 order by 2 desc, 1").fetchall()
            split = ", ".join(f"{r} {n}" for r, n in reasons)
            notes.append(f"manual_review_queue_size is {value} (target {target}): {split}. The Cal.com outage queued every"
                         " booking the calendar refused or the open breaker rejected (calcom_booking_failed), so that a person"
                         " rebooks the caller; the rest are findings no rule may decide. A real day's queue is worked off by"
                         " people: here nobody does but the one reviewer of section 6.")
        elif name == "auto_correction_rate":
            left = conn.execute("select a.alert_type, count(*) from booking_guard.alerts a"
                                " where a.detected_at >= now() - interval '1 day' and not a.auto_corrected"
                                "   and booking_guard_internal.is_inconsistency(a.alert_type, a.details)"
                                " group by 1 order by 2 desc, 1").fetchall()
            why = "; ".join(f"{t} {n} ({LEFT_TO_A_PERSON.get(t, 'no repair applies')})" for t, n in left)
            notes.append(f"auto_correction_rate is {value} % (target {target}): the inconsistencies not repaired are those no"
                         f" rule may repair: {why}. Each is in the review queue instead.")
        elif name == "alert_response_time":
            notes.append(f"alert_response_time is {value} s (target {target}): the critical alerts were acknowledged only"
                         " at section 6, after the whole run; an on-call would acknowledge each as it arrives.")
        elif name == "data_consistency_rate":
            notes.append(f"data_consistency_rate is {value} % (target {target}): calls of the day whose flags still disagree"
                         " with their appointment rows; select * from booking_guard.detect('1 day'); says which.")
        elif name == "circuit_breaker_recovery_time":
            notes.append(f"circuit_breaker_recovery_time is {value} s (target {target}): a breaker stayed open longer than"
                         " its cooldown because its trials kept failing while Cal.com was down.")
        else:
            notes.append(f"{name} is {value} {unit} (target {target}): see docs/runbooks/README.md for what it measures.")
    return notes


def self_command() -> str:
    """How to run booking-guard again as the user typed it: on PATH, the script that runs now, or python -m."""
    script = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    found = shutil.which("booking-guard")
    if found and script and os.path.realpath(found) == os.path.realpath(script):
        return "booking-guard"
    if os.path.basename(script) == "booking-guard":
        relative = os.path.relpath(script)
        return shlex.quote(relative if not relative.startswith("..") else script)
    return f"{shlex.quote(sys.executable)} -m booking_guard.cli"


def where_to_look(dsn: str, run_id: int, base_url: str | None) -> list[tuple[str, str]]:
    """The "where to look next" lines: (what to type, what it shows). With base_url (serving), what works
    on this database while it is served; without, what works after the demo has ended."""
    if base_url is None:
        return [("make demo-serve", "this story again, then the status page, /metrics and psql on its database until"
                                    " Ctrl-C (this run's sandbox is gone once the demo ends)"),
                ("docs/runbooks/README.md", "what each alert and review reason means, how to confirm, fix and prevent it"),
                ("docs/review-queue.md", "the review queue's priorities, and what reaches the relay's webhook and digest"),
                ("make soak", "the same at 100,000 calls, with the verdict; make bench for the benchmarks")]
    me, quoted = self_command(), shlex.quote(dsn)
    return [(f"{base_url}/", "the status page: what needs action, the review queue by priority, breakers, alerts and"
                             " their runbooks"),
            (f"{base_url}/metrics", "every series Prometheus scrapes, each labelled database"),
            (f"psql {quoted}", "this database; in it, for example:"),
            ("  select * from booking_guard.open_inconsistencies;", "the inconsistencies that need a person"),
            ("  select id, priority, reason, call_id, subject from booking_guard.review_queue where status <> 'resolved'"
             " order by priority, id;", "the review queue, most urgent first"),
            ("  select * from booking_guard.claim_review('you');", "take the most urgent item (resolve_review() closes it"
                                                                   " and its alerts)"),
            (f"  select kind, count(*) from sim.faults where run_id = {run_id} group by kind;", "the ground truth of this run"),
            (f"{me} check --since '1 day' --dsn {quoted}", "the findings left (exit 2 while a critical one is open)"),
            (f"{me} report --dsn {quoted}", "today's daily report"),
            ("docs/runbooks/README.md", "what each alert and review reason means, and what to do")]


def print_where_to_look(lines: list[tuple[str, str]], serving: bool) -> None:
    print(heading("Where to look next" + (" (served until Ctrl-C)" if serving else "")))
    width = max(len(what) for what, _ in lines if len(what) <= 60)
    for what, why in lines:
        mark = "--" if what.lstrip().startswith("select ") else "#"
        print(f"  {what.ljust(width)}  {mark} {why}")


def run(dsn: str, config: SimConfig = DEMO_CONFIG, listen: str | None = None,
        stop: threading.Event | None = None) -> int:
    """The story; with `listen` (HOST:PORT), then the status page, /metrics and the verification loop on
    this database until `stop` is set. Returns 0 when nothing was missed, lost or falsely flagged."""
    started = time.monotonic()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.add_notice_handler(lambda notice: None)
        prepare(conn)

        print(heading("booking_guard demo"))
        print("booking_guard keeps calls.appointment_made and session_outcome true to the appointment rows.")
        versions = ", ".join(f"{c} {v}" for c, v in conn.execute("select component, version from booking_guard.environment()"))
        print(f"Running on: {versions}.")
        guarded = conn.execute("select calls_table::text, appointments_table::text from booking_guard.attachment").fetchone()
        print(f"Guarding: {guarded[0]} and {guarded[1]} (triggers installed, indexes created where missing).")
        print("Rules and their modes (observe alerts, correct repairs and alerts, enforce rejects):")
        print("  " + ", ".join(f"{n} {m}" for n, m in conn.execute(
            "select name, mode from booking_guard.rules order by array_position(array['critical', 'warning', 'info'],"
            " severity), name")))

        print(heading("1. The workload"))
        print(f"{config.calls} calls by {config.workers} phone-agent workers, each with its own connection; bookings go to a"
              f" fake Cal.com on 127.0.0.1 ({config.calcom_latency * 1000:.0f} ms, {config.calcom_failure_rate:.0%} failures)"
              f" under the circuit breaker, then through booking_guard.record_booking() or, like an application"
              f" without booking_guard, by raw SQL. {config.fault_rate:.0%} of the bookings get a fault injected;"
              f" Cal.com goes down for"
              f" {config.outages[0][1]:g} s a third of the way in. verification_grace is {config.grace:g} s (default: 5 s),"
              f" the breaker cooldown {config.cooldown:g} s (default: 30 s); verify_due() runs every second, as"
              f" `booking-guard serve` does, and run_monitor() every {config.monitor_every:g} s (pg_cron: every minute).")
    result, settled = simulate(dsn, config, progress_bar())

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.add_notice_handler(lambda notice: None)
        v = verdict(conn, result, settled, config.grace, config.monitor_every)
        run_id = result.run_id
        print(f"Done in {result.seconds:.1f} s; then the last claims' grace was waited out, verify_due(), run_monitor(),"
              " reconcile() and run_monitor() again.")

        print(heading("2. What was injected (ground truth: sim.faults)"))
        print(render(["fault", "injected", "what happened"],
                     [[k, str(v.by_kind[k].injected), FAULT_STORY[k]] for k in FAULT_KINDS], {"what happened": 70}))

        print(heading("3. What booking_guard made of it"))
        cols = ["fault", "injected", "prevented", "detected", "auto_corrected", "queued", "missed"]
        rows = [[k] + [str(getattr(v.by_kind[k], c)) for c in cols[1:]] for k in FAULT_KINDS]
        rows.append(["total"] + [str(getattr(v.total, c)) for c in cols[1:]])
        print(render(cols, rows, {}))
        print(f"False positives (flagged but not injected): {len(v.false_positives)}. Lost: {len(v.lost_bookings)} "
              f"booking(s), {len(v.lost_alerts)} alert(s).")
        print(f"Consistency after the final reconcile: {v.consistency_rate:.2f} % of calls and webhook appointments: the"
              " state now, after every repair (section 8's \"Inconsistencies Found\" counts what was caught on the way,"
              " before repair).")
        for cls, label in (("commit", "at commit"), ("grace", f"after the {config.grace:g} s grace"),
                           ("monitor", "by run_monitor()")):
            p = v.latency[cls]
            if p["n"]:
                print(f"Detection latency {label}: p50 {p['p50']:.2f} s, p95 {p['p95']:.2f} s, max {p['max']:.2f} s"
                      f" ({p['n']} faults).")

        print(heading("4. Prevented at commit"))
        print("record_booking() is idempotent on the Cal.com booking id, and refuses a second booking for a booked call"
              " (the call is queued for review with the second booking, so that a person cancels it in Cal.com):")
        print(table(conn.execute(
            "select kind, path, outcome, count(*) as faults from sim.faults"
            " where run_id = %s and (kind = 'appointment_deleted' or (kind in ('double_booking', 'retry_double_booked')"
            " and path = 'record_booking')) group by 1, 2, 3 order by 1, 2, 3", (run_id,))), end="")
        print("The raw-SQL retry that booked twice cannot be refused (the reference schema has no unique key on the"
              " booking id): duplicate_booking reports it below.")
        print("A deleted appointment is not an inconsistency: the call's flags are derived from the appointments left"
              " (appointment_cancelled) in the same transaction.")

        print(heading("5. Detected and repaired (booking_guard.alerts)"))
        print(table(conn.execute(
            "select alert_type, severity, count(*) as alerts, count(*) filter (where auto_corrected) as auto_corrected,"
            " count(*) filter (where resolved_at is null) as still_open from booking_guard.alerts"
            " group by 1, 2 order by array_position(array['critical', 'warning', 'info'], severity), 3 desc")), end="")
        print("Open alerts left are those no rule may repair alone, each answered by a review item: duplicate_booking"
              " (which of the two appointments is real?) and appointment_validation_failed (a second booking refused:"
              " cancel it in the calendar); recent_failures says a validation failed, and goes once its hour is over."
              " The auto-corrected ones close when the monitor confirms the repair.")
        print(table(conn.execute(
            "select alert_type, severity, count(*) as need_action, count(review_id) as with_review_item"
            " from booking_guard.open_inconsistencies group by 1, 2 order by 3 desc, 1")), end="")

        print(heading("6. The review queue (what needs a person)"))
        print(table(conn.execute(
            "select priority, reason, count(*) as items, count(delivered_at) as notified,"
            " min(created_at)::time(0) as oldest"
            " from booking_guard.review_queue where status <> 'resolved' group by 1, 2 order by 1, 2")), end="")
        print("Priority 1: a customer may believe they are booked and are not, or hold a booking refused (call them"
              " back); 2: a booking failed or is held twice (fix it today); 3: records disagree but the booking stands."
              " calcom_booking_failed: the application queued each booking Cal.com refused or the open breaker rejected,"
              " for a person to rebook; nothing was booked, nothing is lost.")
        urgent, critical = conn.execute(
            "select (select count(*) from booking_guard.review_notifications),"
            " (select count(*) from booking_guard.alerts where severity = 'critical' and delivered_at is null)").fetchone()
        print(f"Who is told: each new item of priority 1 or 2 and each alert go to the relay's webhook at once and into its"
              f" e-mail digest, once each; no relay runs here, so {urgent} urgent item(s) and {critical} critical alert(s)"
              " wait in the outbox (booking-guard serve --slack-webhook URL --smtp-host HOST --smtp-to ADDRESS sends them).")
        # a reviewer takes the most urgent item, and the on-call acknowledges the critical alerts
        claimed = conn.execute("select id, call_id, reason from booking_guard.claim_review('demo-reviewer')").fetchone()
        if claimed and claimed[0] is not None:
            conn.execute("select booking_guard.resolve_review(%s, 'fixed', 'rebooked by phone')", (claimed[0],))
            print(f"A reviewer claimed item #{claimed[0]} (call {claimed[1]}, {claimed[2]}) and resolved it as fixed.")
        acked = conn.execute("select count(booking_guard.acknowledge_alert(id, 'demo-oncall')) from booking_guard.alerts"
                             " where severity = 'critical' and acknowledged_at is null").fetchone()[0]
        print(f"The on-call acknowledged the {acked} critical alert(s).")

        print(heading("7. The circuit breaker while Cal.com was down"))
        t0 = conn.execute("select started_at from sim.runs where id = %s", (run_id,)).fetchone()[0]
        print(table(conn.execute(
            "select key, from_state || ' -> ' || to_state as transition,"
            " round(extract(epoch from at - %s)::numeric, 2) as at_s, split_part(reason, ':', 1) as reason"
            " from booking_guard.circuit_transitions where at >= %s order by at, id", (t0, t0))), end="")
        print(f"{v.extra['breaker_rejections']} call(s) were rejected at once while open (no request to Cal.com);"
              f" the first call after the {config.cooldown:g} s cooldown was a trial, two successes closed it.")
        print(table(conn.execute("select key, state, opened_total as times_opened, last_transition_at::time(0) as last_change"
                                 " from booking_guard.circuit_status order by key")), end="")

        print(heading("8. The daily report (booking_guard.daily_report())"))
        print(conn.execute("select booking_guard.daily_report()").fetchone()[0].rstrip())
        facts = conn.execute("select booking_guard.daily_report_json()").fetchone()[0]
        summary, trend = facts["summary"], facts["trend"]
        left = ", ".join(f"{b['rule']} {b['open']}" for b in facts["breakdown"] if b.get("open"))
        print(f"\nHow to read it: \"Inconsistencies Found: {summary['inconsistencies']}"
              f" ({float(summary['inconsistency_pct']):.2f}%)\""
              f" counts what the rules caught today, each when it happened, before any repair, against"
              f" {summary['total_calls']} calls. The consistency of section 3 ({v.consistency_rate:.2f} %) and the KPI"
              f" data_consistency_rate below are the state now, after the repairs and the final reconcile. The recovery"
              f" rate is the share of the found ones repaired automatically ({trend['recovered']});"
              f" {'the rest wait for a person: ' + left if left else 'none waits for a person'}.")

        print(heading("9. KPIs against their targets (booking_guard.kpis('1 day'))"))
        print(table(conn.execute(
            "select name, value, unit, target, case when ok then 'yes' when not ok then 'NO' else 'no data' end as met,"
            " samples from booking_guard.kpis('1 day')")), end="")
        notes = kpi_notes(conn)
        for note in notes:
            print(note)
        if not notes:
            print("Every KPI with data meets its target.")

        print(heading("10. A sample of the metrics (booking_guard.metrics(), served at /metrics)"))
        print(table(conn.execute(
            "select name, labels::text as labels, value from booking_guard.metrics()"
            " where name in ('appointment_creation_success_total', 'appointment_creation_failure_total',"
            " 'data_inconsistency_detected_total', 'data_inconsistency_auto_corrected_total',"
            " 'data_inconsistency_manual_review_total', 'circuit_breaker_open_total', 'booking_guard_open_inconsistencies')"
            " and value > 0 order by name, labels::text")), end="")
        counted, recorded, rows, deleted = conn.execute(
            "select (select value from booking_guard.metric_counters where name = 'appointment_creation_success_total'"
            "        and labels = '{}'),"
            " (select coalesce(sum(value), 0) from booking_guard.metric_windows where name = 'creation_recorded'),"
            " (select count(*) from appointments),"
            " (select count(*) from sim.faults where run_id = %s and kind = 'appointment_deleted')", (run_id,)).fetchone()
        counted, recorded = int(counted or 0), int(recorded or 0)
        unseen = rows + deleted - counted
        print(f"appointment_creation_success_total counts every booking written, whatever wrote it: {counted} appointment"
              f" rows, {recorded} through record_booking() and {counted - recorded} by plain SQL or the calendar webhook."
              f" A row counts when a fold sees it (serve folds every second): of the {deleted} deleted on purpose right"
              f" after their booking, {unseen} were gone before one looked. Durations exist for record_booking()'s"
              " calls only.")

        failures = v.failures(targets=False)
        verdict_line = (f"\nDemo finished in {time.monotonic() - started:.0f} s: "
                        + ("nothing missed, nothing lost, no false positive." if not failures else "; ".join(failures)))
        if listen is None:
            print_where_to_look(where_to_look(dsn, run_id, None), serving=False)
            print(verdict_line)
            return 1 if failures else 0
    return serve_story(dsn, run_id, listen, stop or threading.Event(), verdict_line, 1 if failures else 0)


def serve_story(dsn: str, run_id: int, listen: str, stop: threading.Event, verdict_line: str, code: int) -> int:
    """Serves the demo's database (status page, /metrics, verify_due() every second) until stop is set."""
    from booking_guard.ops.serve import ServeConfig, Service

    try:
        service = Service(ServeConfig(dsn=dsn, listen=listen))
    except OSError as error:
        print(f"{verdict_line}\nCannot listen on {listen}: {error}. Choose another address:"
              " make demo-serve DEMO_LISTEN=127.0.0.1:9189", flush=True)
        return 1
    service.start()
    host, port = service.address
    try:
        print_where_to_look(where_to_look(dsn, run_id, f"http://{host}:{port}"), serving=True)
        print(verdict_line)
        print(f"Serving {service.targets[0].name} on http://{host}:{port}/ until Ctrl-C.", flush=True)
        stop.wait()
    finally:
        service.shutdown()
    print("Stopped serving.", flush=True)
    return code
