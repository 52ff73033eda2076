"""Retention keeps the tables flat: a steady booking load with short retention, sampled over time.

Every retention setting is set to one minute. A loop then books steadily (calls, bookings through
record_booking, a missing direction the monitor repairs and a phantom claim it rolls back and queues
for review every second, review items and alerts resolved by an on-call after 30 seconds, retries
scheduled and finished, a breaker opened and closed) while the jobs run as pg_cron would run them
(the monitor, a metrics scrape and the purge, every few seconds). Every sample records each growing
table's live rows and its size on disk (table, indexes and TOAST).

Once the load has run for longer than the retention, the tables must stop growing: the figure is
each table's rows at the end over its rows at the first sample past two retention periods
(target <= 1.25), and the counters must be untouched by the purge (the booking counter equals the
bookings made).

usage: bench/retention.py [--minutes 6] [--retention 60] [--rate 25]
"""

import argparse
import time

import psycopg
from _common import emit, figure, machine, scratch_database

DB = "bg_bench_retention"
TABLES = ["events", "alerts", "review_queue", "retries", "circuit_transitions", "reconciliation_runs"]
RETENTION_SETTINGS = ["events_retention", "alerts_retention", "review_retention", "retries_retention",
                      "circuit_history_retention", "runs_retention"]


def sample(conn: psycopg.Connection) -> dict[str, tuple[int, int]]:
    out = {}
    for t in TABLES:
        rows, size = conn.execute(
            f"select count(*), pg_total_relation_size('booking_guard.{t}') from booking_guard.{t}").fetchone()
        out[t] = (rows, size)
    return out


def tick(conn: psycopg.Connection, n: int, rate: int) -> int:
    """One second of traffic: `rate` calls, most of them booked; returns the bookings made."""
    booked = 0
    with conn.transaction():
        ids = [r[0] for r in conn.execute(
            """insert into calls (retell_call_id, company_id, direction, session_outcome)
               select 't' || %s || '-' || i, 1 + i %% 10, 'inbound', 'no_answer' from generate_series(1, %s) i
               returning id""", (n, rate))]
    for i, call_id in enumerate(ids):
        if i % 5 == 4:
            continue
        conn.execute("select booking_guard.record_booking(%s, %s, %s)",
                     (call_id, f"b-{call_id}", '{"starts_at": "2030-01-01T10:00:00Z", "ends_at": "2030-01-01T10:30:00Z"}'))
        booked += 1
    # a missing direction (the monitor repairs it) and a phantom claim (the monitor rolls it back and
    # queues it for review), both written with their rule off
    conn.execute("select booking_guard.set_rule('missing_direction', 'off')")
    conn.execute("select booking_guard.set_rule('phantom_booking', 'off')")
    conn.execute("update calls set direction = null where id = %s", (ids[-2],))
    conn.execute("update calls set session_outcome = 'appointment_booked' where id = %s", (ids[-1],))
    conn.execute("select booking_guard.set_rule('missing_direction', 'correct')")
    conn.execute("select booking_guard.set_rule('phantom_booking', 'correct')")
    # the on-call works the queue: what has waited 30 seconds is resolved
    for (review_id,) in conn.execute("select id from booking_guard.review_queue where status <> 'resolved'"
                                     " and created_at < now() - interval '30 seconds'").fetchall():
        conn.execute("select booking_guard.resolve_review(%s, 'fixed', 'rebooked by phone')", (review_id,))
    for (alert_id,) in conn.execute("select id from booking_guard.alerts where resolved_at is null"
                                    " and detected_at < now() - interval '30 seconds'").fetchall():
        conn.execute("select booking_guard.resolve_alert(%s)", (alert_id,))
    review = conn.execute("select booking_guard.queue_for_review(%s, 'manual_check', '{}')", (ids[0],)).fetchone()[0]
    conn.execute("select booking_guard.resolve_review(%s, 'fixed', 'checked by the bench')", (review,))
    conn.execute("select booking_guard.schedule_retry(%s, 'calcom_booking', '{}', 1, interval '0')", (ids[1],))
    for (retry_id,) in conn.execute("select id from booking_guard.claim_retries('bench', 10)").fetchall():
        conn.execute("select booking_guard.finish_retry(%s, true)", (retry_id,))
    if n % 10 == 0:
        conn.execute("select booking_guard.circuit_force_open('calcom', now() + interval '1 minute')")
        conn.execute("select booking_guard.circuit_reset('calcom')")
    return booked


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=6)
    ap.add_argument("--retention", type=int, default=60, help="seconds, every retention setting")
    ap.add_argument("--rate", type=int, default=25, help="calls per second")
    args = ap.parse_args()
    print("machine:", machine())

    with scratch_database(DB) as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("insert into companies (name) select 'company ' || i from generate_series(1, 10) i")
        conn.execute("select booking_guard.attach('calls', 'appointments')")
        for s in RETENTION_SETTINGS:
            conn.execute("select booking_guard.set_setting(%s, %s)", (s, f"{args.retention} seconds"))
        conn.execute("select booking_guard.set_setting('verification_grace', '0 seconds')")
        conn.execute("select booking_guard.set_rule('missing_appointment', 'correct')")

        start = time.monotonic()
        end = start + args.minutes * 60
        samples: list[tuple[float, dict]] = []
        booked = ticks = 0
        next_jobs = next_sample = start
        while time.monotonic() < end:
            t0 = time.monotonic()
            booked += tick(conn, ticks, args.rate)
            ticks += 1
            if t0 >= next_jobs:
                conn.execute("call booking_guard.run_job('run_monitor')")
                conn.execute("call booking_guard.run_job('reconcile')")
                conn.execute("select count(*) from booking_guard.metrics()")   # a scrape folds the counters
                conn.execute("call booking_guard.run_job('purge')")
                next_jobs = t0 + 5
            if t0 >= next_sample:
                samples.append((t0 - start, sample(conn)))
                next_sample = t0 + 20
            time.sleep(max(0.0, 1 - (time.monotonic() - t0)))
        conn.execute("call booking_guard.run_job('run_monitor')")
        conn.execute("call booking_guard.run_job('purge')")
        samples.append((time.monotonic() - start, sample(conn)))

        counted = conn.execute(
            "select coalesce(sum(value), 0) from booking_guard.metrics()"
            " where name = 'appointment_creation_success_total'").fetchone()[0]

    print(f"{ticks} seconds of traffic, {booked} bookings; every retention {args.retention} s")
    print("  t(s)  " + "  ".join(f"{t:>26}" for t in TABLES))
    for at, s in samples:
        print(f"{at:6.0f}  " + "  ".join(f"{s[t][0]:>10,} rows {s[t][1] / 1024:>8,.0f} kB" for t in TABLES))

    steady = next(s for at, s in samples if at >= 2 * args.retention)
    last = samples[-1][1]
    figures = []
    for t in TABLES:
        base_rows = max(steady[t][0], 1)
        figures.append(figure(f"{t} rows at the end / past two retention periods", last[t][0] / base_rows, "x",
                              "rows past two retention periods", 1.0, target="<= 1.25"))
        print(f"{t}: {steady[t][0]:,} -> {last[t][0]:,} rows, {steady[t][1] / 1024:,.0f} -> {last[t][1] / 1024:,.0f} kB")
    print(f"appointment_creation_success_total {counted:,.0f} for {booked:,} bookings made")
    figures.append(figure("bookings counted after purges / bookings made", counted / booked, "x",
                          "bookings made", 1.0, target="= 1"))
    emit("retention", figures)
    if counted != booked:
        raise SystemExit("the booking counter lost bookings to the purge")


if __name__ == "__main__":
    main()
