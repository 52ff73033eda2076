"""The exporter's cost: /metrics scrape time against the size of the tables, and the booking
workload's TPS with the metric counters maintained (folded every second) or not.

1. Scrape time. The tables hold N calls with their appointments and the events a day of
   record_booking() leaves behind (a record_booking and a validation event per call, 1 % of
   the calls with a phantom booking alert and a review item), already folded as the scrapes
   and cron would have folded them. Each scrape also folds what arrived since the previous
   one (a 15 s scrape interval at 60 bookings/s: 1,800 events). Timed over HTTP, through
   `booking-guard serve`'s /metrics, for N = 100,000 and 1,000,000. Target: <= 50 ms, flat in N.
2. TPS. pgbench drives the booking path (insert a call, record_booking()) with booking_guard
   attached, alternately without any fold and with metrics() scraped every second (each
   scrape folds the new events into the counters). Target: maintained >= 0.9 x not.

usage: bench/exporter.py [--sizes 100000,1000000] [--scrapes 40] [--seconds 10] [--rounds 2] [--clients 8]
"""

import argparse
import re
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psycopg
from _common import emit, figure, machine, pgbench, scratch_database
from booking_guard.ops.serve import ServeConfig, Service

DB = "bg_bench_exporter"

BOOKING = """\
\\set company random(1, 100)
insert into calls (retell_call_id, company_id, direction, customer_id)
     values (gen_random_uuid()::text, :company, 'inbound', :company) returning id as call_id \\gset
select success from booking_guard.record_booking(:call_id, 'cal-' || :call_id,
       jsonb_build_object('company_id', :company::bigint, 'customer_id', :company::bigint));
"""


def populate(conn: psycopg.Connection, upto: int, start: int) -> None:
    """Calls start+1..upto with appointments and a day's events, then folded (detached while loading)."""
    conn.execute("select booking_guard.detach()")
    conn.execute("""
        insert into calls (retell_call_id, company_id, direction, session_outcome, appointment_made,
                           appointment_link_status, booking_id, created_at)
        select 'seed-' || i, 1 + i %% 100, 'inbound', 'appointment_booked', true, 'linked', 'seed-' || i,
               now() - interval '1 day' * random()
          from generate_series(%s + 1, %s) i""", (start, upto))
    conn.execute("""
        insert into appointments (call_id, calcom_v2_booking_id, company_id, source, created_at)
        select c.id, c.booking_id, c.company_id, 'retell_webhook', c.created_at
          from calls c where c.id > %s""", (start,))
    conn.execute("""
        insert into booking_guard.events (at, kind, entity_type, entity_id, details)
        select now() - interval '1 day' * random(), k.kind, 'call', i::text,
               jsonb_build_object('success', i %% 50 <> 0,
                                  'reason', case when i %% 50 = 0 then 'appointment_not_found' else 'ok' end,
                                  'duration_ms', 2 + random() * 40)
          from generate_series(%s + 1, %s) i cross join (values ('record_booking'), ('validation')) k(kind)""",
                 (start, upto))
    conn.execute("""
        select booking_guard_internal.raise_alert('phantom_booking', 'critical', 'call', i::text, 'planted', '{}', true),
               booking_guard.queue_for_review(i, 'appointment_validation_failed')
          from generate_series(%s + 1, %s, 100) i""", (start, upto))
    # all but the latest hundred alerts and review items are resolved, as they would be after a day
    conn.execute("""update booking_guard.alerts set resolved_at = now()
                     where resolved_at is null and id < (select max(id) - 100 from booking_guard.alerts)""")
    conn.execute("""update booking_guard.review_queue set status = 'resolved', resolution = 'fixed'
                     where status <> 'resolved' and id < (select max(id) - 100 from booking_guard.review_queue)""")
    for i in range(20):
        conn.execute("select booking_guard.circuit_record_failure(%s, 'timeout')", (f"appointment_booking:service:{i % 10}",))
    while conn.execute("select booking_guard.fold_metrics(200000)").fetchone()[0] > 0:
        pass
    conn.execute("select booking_guard.attach('calls', 'appointments')")
    conn.execute("vacuum analyze")


def new_events(conn: psycopg.Connection, n: int) -> None:
    conn.execute("""
        insert into booking_guard.events (kind, entity_type, entity_id, details)
        select case when i %% 2 = 0 then 'record_booking' else 'validation' end, 'call', i::text,
               jsonb_build_object('success', true, 'reason', 'ok', 'duration_ms', 5 + random() * 20)
          from generate_series(1, %s) i""", (n,))


def scrape_times(url: str, conn: psycopg.Connection, scrapes: int, backlog: int) -> tuple[list[float], float]:
    times: list[float] = []
    size = 0
    for _ in range(scrapes):
        if backlog:
            new_events(conn, backlog)
        started = time.perf_counter()
        with urllib.request.urlopen(url, timeout=10) as response:
            body = response.read()
        times.append((time.perf_counter() - started) * 1000)
        if not re.search(rb'^booking_guard_up\{database="[^"]*"\} 1\.0$', body, re.M):
            raise SystemExit("the exporter reported booking_guard_up 0 during the benchmark")
        size = len(body)
    return times, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--scrapes", type=int, default=40)
    parser.add_argument("--backlog", type=int, default=1800, help="new events between two scrapes")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    scrapes: dict[tuple[int, int], float] = {}

    with scratch_database(DB) as dsn, tempfile.TemporaryDirectory() as tmp, psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("set client_min_messages = warning")
        conn.execute("insert into companies (name) select 'company ' || i from generate_series(1, 100) i")
        conn.execute("insert into customers (company_id, name) select i, 'customer ' || i from generate_series(1, 100) i")
        conn.execute("select booking_guard.attach('calls', 'appointments')")
        conn.execute("select booking_guard.set_setting('verification_grace', '0')")

        # --- 1. scrape time against table size -------------------------------------------------
        service = Service(ServeConfig(dsn=dsn, listen="127.0.0.1:0", verify=False))
        service.start()
        host, port = service.address
        url = f"http://{host}:{port}/metrics"
        print(f"\n{'calls':>9} {'events':>9} {'series':>7} {'backlog':>8} {'median ms':>10} {'p95 ms':>7} {'max ms':>7}")
        done = 0
        try:
            for size in (int(s) for s in args.sizes.split(",")):
                populate(conn, size, done)
                done = size
                events = conn.execute("select count(*) from booking_guard.events").fetchone()[0]
                n_series = conn.execute("select count(*) from booking_guard.metrics()").fetchone()[0]
                for backlog in (0, args.backlog):
                    scrape_times(url, conn, 3, backlog)   # warm up
                    times, _ = scrape_times(url, conn, args.scrapes, backlog)
                    times.sort()
                    p95 = times[min(len(times) - 1, int(len(times) * 0.95))]
                    scrapes[(size, backlog)] = statistics.median(times)
                    print(f"{size:>9} {events:>9} {n_series:>7} {backlog:>8} {statistics.median(times):>10.1f}"
                          f" {p95:>7.1f} {times[-1]:>7.1f}")
        finally:
            service.shutdown()

        # --- 2. booking TPS with and without the fold ------------------------------------------
        stop = threading.Event()
        fold_ms: list[float] = []

        def scrape_every_second() -> None:
            with psycopg.connect(dsn, autocommit=True) as scraper:
                while not stop.is_set():
                    started = time.perf_counter()
                    scraper.execute("select count(*) from booking_guard.metrics()").fetchone()
                    fold_ms.append((time.perf_counter() - started) * 1000)
                    stop.wait(max(0.0, 1.0 - (time.perf_counter() - started)))

        tps: dict[str, list[float]] = {"not maintained": [], "maintained": []}
        for _ in range(args.rounds):
            for side in ("not maintained", "maintained"):
                thread = None
                if side == "maintained":
                    stop.clear()
                    thread = threading.Thread(target=scrape_every_second)
                    thread.start()
                tps[side].append(pgbench(DB, [(BOOKING, 1)], args.clients, args.seconds, Path(tmp)))
                if thread is not None:
                    stop.set()
                    thread.join()
                # what the unmaintained run left unfolded is folded now, outside the measurement
                while conn.execute("select booking_guard.fold_metrics(200000)").fetchone()[0] > 0:
                    pass
        un, ma = statistics.median(tps["not maintained"]), statistics.median(tps["maintained"])
        print(f"\nbooking path (insert call + record_booking), {args.clients} clients, {args.seconds} s x {args.rounds} rounds")
        print(f"{'counters':<16} {'tps':>8}")
        print(f"{'not maintained':<16} {un:>8.0f}")
        print(f"{'maintained':<16} {ma:>8.0f}   (metrics() every second: median {statistics.median(fold_ms):.1f} ms,"
              f" max {max(fold_ms):.1f} ms)")
        print(f"ratio maintained / not: {ma / un:.2f} (target >= 0.9)")
        folded = conn.execute("select value from booking_guard.metric_counters"
                              " where name = 'booking_guard_metrics_events_folded_total'").fetchone()[0]
        events = conn.execute("select count(*) from booking_guard.events").fetchone()[0]
        print(f"events folded {folded:.0f} of {events} in the table (each exactly once)")
    small, big = min(s for s, _ in scrapes), max(s for s, _ in scrapes)
    figures = [figure(f"booking path TPS with metrics() every second, {args.clients} clients", ma, "tps",
                      "no fold, no scrape", un, ">= 0.9")]
    if big != small:
        figures += [figure(f"/metrics scrape median at {big:,} calls, backlog {b:,}", scrapes[(big, b)], "ms",
                           f"same at {small:,} calls", scrapes[(small, b)]) for b in (0, args.backlog)]
    emit("exporter", figures)


if __name__ == "__main__":
    main()
