"""Latency of validate_appointment_creation() on a large calls table.

Populates --calls booked calls (each with its appointment), attaches booking_guard, then runs
--validations validations of random calls from one connection (after a warm-up that caches the
plans). Prints p50/p95/p99 of the duration the function measures itself (the events'
details->>'duration_ms', which the latency KPI reads) and of the client's round trip.
Target: p95 <= 1 ms (the product's own requirement is <= 100 ms).

usage: bench/validation_latency.py [--calls 100000] [--validations 10000]
"""

import argparse
import random
import statistics
import time

import psycopg
from _common import emit, figure, machine, scratch_database

DB = "bg_bench_validation"


def populate(dsn: str, calls: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("insert into companies (name) select 'company ' || i from generate_series(1, 100) i")
        conn.execute("""
            insert into calls (retell_call_id, company_id, direction, session_outcome, appointment_made,
                               appointment_link_status, appointment_linked_at, booking_id, booking_confirmed)
            select 'call-' || i, 1 + i %% 100, 'inbound', 'appointment_booked', true, 'linked', now(), 'cal-' || i, true
              from generate_series(1, %s) i""", (calls,))
        conn.execute("""
            insert into appointments (call_id, calcom_v2_booking_id, company_id, source)
            select id, booking_id, company_id, 'retell_webhook' from calls""")
        conn.execute("select booking_guard.attach('calls', 'appointments')")   # creates its indexes
        conn.execute("select booking_guard.set_setting('validation_recent_window', '1 day')")
        conn.execute("vacuum analyze")


def percentiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=100, method="inclusive")
    return q[49], q[94], q[98]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--validations", type=int, default=10_000)
    args = parser.parse_args()
    rng = random.Random(4)
    with scratch_database(DB) as dsn:
        started = time.monotonic()
        populate(dsn, args.calls)
        populated = time.monotonic() - started
        with psycopg.connect(dsn, autocommit=True) as conn:
            n_calls, n_appointments = conn.execute(
                "select (select count(*) from calls), (select count(*) from appointments)").fetchone()
            query = "select success, reason from booking_guard.validate_appointment_creation(%s)"
            for _ in range(500):   # warm-up: plans cached in SD, psycopg's statement prepared
                conn.execute(query, (rng.randint(1, args.calls),))
            first_event = conn.execute("select max(id) from booking_guard.events").fetchone()[0]
            round_trips: list[float] = []
            failures = 0
            for _ in range(args.validations):
                call_id = rng.randint(1, args.calls)
                t0 = time.perf_counter()
                success, _reason = conn.execute(query, (call_id,)).fetchone()
                round_trips.append((time.perf_counter() - t0) * 1000)
                failures += not success
            server = [row[0] for row in conn.execute(
                "select (details ->> 'duration_ms')::float8 from booking_guard.events"
                " where kind = 'validation' and id > %s", (first_event,))]
    print(f"machine: {machine()}")
    print(f"table: {n_calls:,} calls, {n_appointments:,} appointments (populated in {populated:.1f} s)")
    print(f"validations: {len(round_trips):,} of random calls, {failures} failed; {len(server):,} validation events")
    print(f"{'latency (ms)':<40} {'p50':>7} {'p95':>7} {'p99':>7}")
    for label, values in (("in the function (events.duration_ms)", server), ("client round trip", round_trips)):
        p50, p95, p99 = percentiles(values)
        print(f"{label:<40} {p50:>7.3f} {p95:>7.3f} {p99:>7.3f}")
    p95 = percentiles(server)[1]
    print(f"target p95 <= 1 ms (required: <= 100 ms): {'met' if p95 <= 1 else 'NOT met'} ({p95:.3f} ms)")
    emit("validation_latency", [
        figure("validation p95 in the function", p95, "ms", "client round trip p95 of the same validations",
               percentiles(round_trips)[1], "p95 <= 1 ms"),
        figure("validation p50 in the function", percentiles(server)[0], "ms", "client round trip p50",
               percentiles(round_trips)[0])])


if __name__ == "__main__":
    main()
