"""Detection, monitor and reconciliation cost at 100,000 and 1,000,000 calls.

The calls arrive at the same rate in both data sets (one every 2.592 s: 1,000,000 calls span 30
days, 100,000 span 3), so the last hour holds the same ~1,400 calls in both: detection cost must
stay the same while the table grows tenfold. 1 % of the calls carry a planted inconsistency (six
kinds in turn: no direction, phantom booking, missing appointment, outcome/flag mismatch,
unlinked customer, orphaned appointment). The data is generated set-based while booking_guard is
not attached (no triggers), then attached (its indexes are built) and analysed.

Measured: detect('1 hour') (minimum and median of rounds x repeat runs, the sizes measured in
alternation so that a busy machine slows them alike), whether any plan of detection scans the
application tables sequentially (auto_explain of the nested statements), run_monitor() (first
run: alerts and correct-mode repairs; then steady state), and reconcile() over the whole tables
(first run repairs the planted rows; the second finds nothing). Targets: detect over
the last hour <= 50 ms at 1,000,000 calls; reconcile >= 50,000 rows scanned per second.

usage: bench/detection.py [--sizes 100000,1000000] [--rounds 5] [--repeat 5]
"""

import argparse
import contextlib
import statistics
import time

import psycopg
from _common import emit, figure, machine, scratch_database

DB = "bg_bench_detection"
STEP = "2.592 seconds"   # 30 days / 1,000,000


def populate(conn: psycopg.Connection, n: int) -> None:
    conn.execute("insert into companies (name) select 'company ' || i from generate_series(1, 100) i")
    conn.execute("insert into customers (company_id, name) select i, 'customer ' || i from generate_series(1, 100) i")
    # kind of a planted row: i % 100 = 0, then (i / 100) % 6
    #   0 no direction, 1 phantom (booked outcome, flag false, appointment exists), 2 flags claim a booking
    #   without appointment, 3 appointment_made with another outcome, 4 customer link pending, 5 orphan
    conn.execute(f"""
        insert into calls (id, retell_call_id, company_id, direction, session_outcome, appointment_made,
                           appointment_link_status, appointment_linked_at, booking_id, booking_confirmed,
                           call_successful, customer_id, customer_link_status, customer_linked_at,
                           customer_link_method, created_at, updated_at)
        select i, 'retell-' || i, 1 + i % 100,
               case when kind = 0 then null else 'inbound' end,
               case when kind = 3 then 'callback_requested'
                    when booked or kind in (1, 2) then 'appointment_booked' else 'no_booking' end,
               (booked or kind in (2, 3)) and kind is distinct from 1,
               case when booked or kind in (2, 3) then 'linked' end,
               case when booked or kind in (2, 3) then at end,
               case when booked or kind in (1, 2, 3, 5) then 'cal-' || i end,
               booked, true,
               1 + i % 100, case when kind = 4 then 'pending' else 'linked' end, at, 'phone_match', at, at
          from (select i, now() - ({n} - i) * interval '{STEP}' as at,
                       case when i % 100 = 0 then (i / 100) % 6 else -1 end as kind,
                       i % 10 < 7 and i % 100 <> 0 as booked
                  from generate_series(1, {n}) i) s""")
    conn.execute("""
        insert into appointments (call_id, calcom_v2_booking_id, company_id, customer_id, source, created_at, updated_at)
        select case when c.id % 100 = 0 and (c.id / 100) % 6 = 5 then null else c.id end,
               c.booking_id, c.company_id, c.customer_id, 'retell_webhook',
               c.created_at + interval '1 second', c.created_at + interval '1 second'
          from calls c
         where c.booking_id is not null and not (c.id % 100 = 0 and (c.id / 100) % 6 = 2)""")
    conn.execute("select setval(pg_get_serial_sequence('calls', 'id'), (select max(id) from calls))")
    conn.execute("select booking_guard.attach('calls', 'appointments')")
    conn.execute("vacuum analyze calls")
    conn.execute("vacuum analyze appointments")


def timed(conn: psycopg.Connection, query: str):
    start = time.perf_counter()
    row = conn.execute(query).fetchone()
    return (time.perf_counter() - start) * 1000, row


def seq_scans_of_detection(conn: psycopg.Connection) -> list[str]:
    """Plans of every statement detect() runs, via auto_explain at NOTICE level: sequential scans of the app tables."""
    plans: list[str] = []
    conn.add_notice_handler(lambda d: plans.append(d.message_primary or ""))
    conn.execute("load 'auto_explain'")
    conn.execute("set auto_explain.log_min_duration = 0")
    conn.execute("set auto_explain.log_nested_statements = on")
    conn.execute("set auto_explain.log_level = notice")
    conn.execute("select count(*) from booking_guard.detect('1 hour')")
    conn.execute("reset auto_explain.log_min_duration")
    conn.execute("set auto_explain.log_min_duration = -1")
    return [line.strip() for plan in plans for line in plan.splitlines()
            if "Seq Scan on calls" in line or "Seq Scan on appointments" in line]


def measure(sizes: list[int], rounds: int, repeat: int) -> list[dict]:
    """Both data sets exist side by side and are measured in alternation, so that a busy machine
    slows them alike: the minimum and the median over every run are reported."""
    with contextlib.ExitStack() as stack:
        conns = {}
        results = {}
        for n in sizes:
            dsn = stack.enter_context(scratch_database(f"{DB}_{n}"))
            conn = stack.enter_context(psycopg.connect(dsn, autocommit=True))
            conn.execute("set client_min_messages = warning")
            start = time.perf_counter()
            populate(conn, n)
            conns[n] = conn
            results[n] = {"n": n, "load_s": time.perf_counter() - start,
                          "appointments": conn.execute("select count(*) from appointments").fetchone()[0],
                          "window": conn.execute("select count(*) from calls "
                                                 "where created_at >= now() - interval '1 hour'").fetchone()[0],
                          "detect": [], "steady": []}
            conn.execute("select count(*) from booking_guard.detect('1 hour')")   # warm the session's plans
        for _ in range(rounds):
            for n, conn in conns.items():
                for _ in range(repeat):
                    ms, row = timed(conn, "select count(*) from booking_guard.detect('1 hour')")
                    results[n]["detect"].append(ms)
                    results[n]["findings"] = row[0]
        for n, conn in conns.items():
            results[n]["seq_scans"] = seq_scans_of_detection(conn)
            results[n]["monitor_first"], first = timed(conn, "select booking_guard.run_monitor()")
            results[n]["monitor_first_result"] = first[0]
        for _ in range(rounds):
            for n, conn in conns.items():
                results[n]["steady"].append(timed(conn, "select booking_guard.run_monitor()")[0])
        for n, conn in conns.items():
            results[n]["kpis_ms"] = min(timed(conn, "select count(*) from booking_guard.kpis('1 day')")[0]
                                        for _ in range(3))
            results[n]["report_ms"] = min(timed(conn, "select length(booking_guard.daily_report(current_date - 1))")[0]
                                          for _ in range(3))
        for n, conn in conns.items():
            results[n]["rec1_ms"], (results[n]["rec1"],) = timed(conn, "select booking_guard.reconcile()")
            results[n]["rec2_ms"], (results[n]["rec2"],) = timed(conn, "select booking_guard.reconcile()")
    for r in results.values():
        r["detect_min"], r["detect_median"] = min(r["detect"]), statistics.median(r["detect"])
        r["monitor_steady_min"], r["monitor_steady"] = min(r["steady"]), statistics.median(r["steady"])
    return [results[n] for n in sizes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    results = measure([int(n) for n in args.sizes.split(",")], args.rounds, args.repeat)

    print(f"machine: {machine()}")
    print(f"{'calls':>10} {'appts':>10} {'last hour':>9} {'findings':>8} {'detect min':>10} {'median':>8} "
          f"{'seq scans':>9} {'monitor 1st':>11} {'steady min':>10} {'median':>8}")
    for r in results:
        print(f"{r['n']:>10,} {r['appointments']:>10,} {r['window']:>9,} {r['findings']:>8} "
              f"{r['detect_min']:>8.1f}ms {r['detect_median']:>6.1f}ms {len(r['seq_scans']):>9} "
              f"{r['monitor_first']:>9.1f}ms {r['monitor_steady_min']:>8.1f}ms {r['monitor_steady']:>6.1f}ms")
    print(f"(detect: {len(results[0]['detect'])} runs per size, the sizes in alternation; run_monitor steady: "
          f"{len(results[0]['steady'])} runs)")
    for r in results:
        m = r["monitor_first_result"]
        print(f"{r['n']:,} calls: first run_monitor: {m['findings']} findings, {m['new']} new alerts, "
              f"{m['repaired']} repaired (rules in their default modes), {m['resolved']} resolved")
    for r in results:
        print(f"{r['n']:,} calls: kpis('1 day') {r['kpis_ms']:.1f} ms, daily_report(yesterday) {r['report_ms']:.1f} ms "
              f"(min of 3; a day holds ~33,000 calls in both sets)")
    for r in results:
        rec1, rec2 = r["rec1"], r["rec2"]
        scanned = rec1["calls_scanned"] + rec1["appointments_scanned"]
        kinds = ", ".join(f"{k} {rec1[k]:,}" for k in ("directions", "flags", "rolled_back", "customer_links", "orphans"))
        print(f"reconcile over {r['n']:,} calls + {r['appointments']:,} appointments ({scanned:,} rows): "
              f"{r['rec1_ms'] / 1000:.2f} s, {scanned / (r['rec1_ms'] / 1000):,.0f} rows/s, fixed {rec1['fixed']:,} "
              f"({kinds}); second run {r['rec2_ms'] / 1000:.2f} s, {scanned / (r['rec2_ms'] / 1000):,.0f} rows/s, "
              f"fixed {rec2['fixed']}")
    for r in results:
        print(f"{r['n']:,} calls: data generated, attached and analysed in {r['load_s']:.1f} s")
        for line in r["seq_scans"]:
            print(f"  sequential scan in a detection plan: {line}")
    big = max(results, key=lambda r: r["n"])
    small = min(results, key=lambda r: r["n"])
    if big is not small:
        # the baseline of each figure is the same measurement on the smaller set: a ratio near 1 is cost flat in size
        base = f"same at {small['n']:,} calls"
        rows = lambda r: r["rec1"]["calls_scanned"] + r["rec1"]["appointments_scanned"]  # noqa: E731
        emit("detection", [
            figure(f"detect('1 hour') median at {big['n']:,} calls", big["detect_median"], "ms", base,
                   small["detect_median"], "target <= 50 ms"),
            figure(f"run_monitor() steady median at {big['n']:,} calls", big["monitor_steady"], "ms", base,
                   small["monitor_steady"]),
            figure(f"kpis('1 day') at {big['n']:,} calls", big["kpis_ms"], "ms", base, small["kpis_ms"]),
            figure(f"reconcile() rows/s at {big['n']:,} calls", rows(big) / (big["rec1_ms"] / 1000), "rows/s", base,
                   rows(small) / (small["rec1_ms"] / 1000), "target >= 50,000 rows/s"),
        ])
    rate = (big["rec1"]["calls_scanned"] + big["rec1"]["appointments_scanned"]) / (big["rec1_ms"] / 1000)
    print(f"targets: detect('1 hour') at {big['n']:,} calls median {big['detect_median']:.1f} ms "
          f"(<= 50 ms: {'met' if big['detect_median'] <= 50 else 'NOT met'}); "
          f"reconcile {rate:,.0f} rows/s (>= 50,000: {'met' if rate >= 50000 else 'NOT met'})")


if __name__ == "__main__":
    main()
