"""The scheduled monitor's cost follows the new rows, not the window.

For each size, the last hour holds N calls (10,000, 100,000, 1,000,000 an hour, created evenly over
the hour); the scheduled monitor (CALL booking_guard.run_job('run_monitor')) runs once over them
(its first run looks at the whole hour), then, for each round, 1,000 new calls arrive (1 % of them
with a missing direction written with the rule off) and the scheduled monitor runs again. That
steady-state run must cost the same whatever N: it looks at the rows created since its last run
(its watermark), not at the hour. Beside it, the function run_monitor('1 hour'), which looks at
the whole window every time, as 0.1.0's job did: run after the steady rounds, since each leaves the
whole window's rows dead in the monitor's queue until vacuum; the scheduled run right after them is
shown apart ("next after window").

With --declared N, each size then declares N rules of its own (a predicate on the calls, run as a
role that may read them) and measures the same rounds again: what declared rules add to the monitor.

usage: bench/monitor_steady.py [--sizes 10000,100000,1000000] [--rounds 5] [--new 1000] [--declared 0]
"""

import argparse
import statistics
import time
import uuid

import psycopg
from _common import emit, figure, machine, scratch_database


def populate(conn: psycopg.Connection, n: int) -> None:
    conn.execute("insert into companies (name) select 'company ' || i from generate_series(1, 100) i")
    conn.execute("""
        insert into calls (retell_call_id, company_id, direction, session_outcome, created_at, updated_at)
        select 'c-' || i, 1 + i %% 100, 'inbound', 'no_answer', at, at
          from (select i, now() - interval '1 hour' + (i * interval '3600 seconds' / %(n)s) - interval '5 seconds' as at
                  from generate_series(1, %(n)s) i) s""", {"n": n})
    conn.execute("select booking_guard.attach('calls', 'appointments')")
    conn.execute("vacuum analyze calls")


def arrive(conn: psycopg.Connection, new: int, batch: int) -> None:
    conn.execute("select booking_guard.set_rule('missing_direction', 'off')")
    conn.execute("""
        insert into calls (retell_call_id, company_id, direction, session_outcome)
        select 'new-' || %(b)s || '-' || i, 1 + i %% 100, case when i %% 100 = 0 then null else 'inbound' end, 'no_answer'
          from generate_series(1, %(n)s) i""", {"n": new, "b": batch})
    conn.execute("select booking_guard.set_rule('missing_direction', 'correct')")


def declare(conn: psycopg.Connection, role: str, n: int) -> None:
    """N declared rules on the calls, each an indexed-column comparison, run as `role`."""
    conn.execute(f"grant select on calls, appointments to {role}")
    for i in range(n):
        conn.execute("select booking_guard.declare_rule(%s, 'call', %s, 'info', 'observe', 'a bench rule', %s)",
                     (f"bench_rule_{i}", f"c.session_outcome = 'bench_{i}' and c.direction = 'outbound'", role))


def rounds(conn: psycopg.Connection, n_rounds: int, new: int, first_batch: int) -> tuple[list[float], list[float], float]:
    """The steady rounds, then the whole-window runs, then one scheduled run after them. A whole-window
    run queues every call of the hour and leaves as many dead rows in the monitor's queue, which the
    next scheduled run reads until vacuum removes them: interleaved, they made the steady rounds at
    1,000,000 calls look 4-6 times dearer than they are. So the steady rounds start from a vacuumed
    queue, and the cost of the run right after a whole window is shown apart. Uses batches
    first_batch .. first_batch + n_rounds."""
    conn.execute("vacuum booking_guard_internal.monitor_queue")
    steady = []
    for r in range(n_rounds):
        arrive(conn, new, first_batch + r)
        steady.append(timed(conn, "call booking_guard.run_job('run_monitor')"))
    window = [timed(conn, "select booking_guard.run_monitor('1 hour')") for _ in range(n_rounds)]
    arrive(conn, new, first_batch + n_rounds)
    after_window = timed(conn, "call booking_guard.run_job('run_monitor')")
    return steady, window, after_window


def timed(conn: psycopg.Connection, query: str) -> float:
    started = time.perf_counter()
    conn.execute(query)
    return (time.perf_counter() - started) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new", type=int, default=1000)
    parser.add_argument("--declared", type=int, default=0)
    args = parser.parse_args()
    results = []
    role = f"bg_bench_rules_{uuid.uuid4().hex[:8]}"
    for n in (int(x) for x in args.sizes.split(",")):
        with scratch_database(f"bg_bench_monitor_{n}") as dsn, psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("set client_min_messages = warning")
            populate(conn, n)
            first = timed(conn, "call booking_guard.run_job('run_monitor')")
            steady, window, after = rounds(conn, args.rounds, args.new, 0)
            result = {"n": n, "first": first, "steady": statistics.median(steady), "steady_min": min(steady),
                      "window": statistics.median(window), "after_window": after}
            if args.declared:
                conn.execute(f"create role {role} nologin")
                try:
                    declare(conn, role, args.declared)
                    steady, window, after = rounds(conn, args.rounds, args.new, args.rounds + 1)
                    result |= {"steady_declared": statistics.median(steady), "steady_declared_min": min(steady),
                               "window_declared": statistics.median(window), "after_window_declared": after}
                    conn.execute("select booking_guard.drop_rule(name) from booking_guard.rules where predicate is not null")
                    conn.execute(f"revoke all on calls, appointments from {role}")
                finally:
                    conn.execute(f"drop role {role}")
            result["left_unrepaired"] = conn.execute("select count(*) from calls where direction is null").fetchone()[0]
            results.append(result)
    print(f"machine: {machine()}")
    print(f"{'calls/hour':>11} {'first run':>10} {'steady median':>14} {'steady min':>11} {'whole window':>13}"
          f" {'next after window':>18}")
    for r in results:
        print(f"{r['n']:>11,} {r['first']:>8.0f}ms {r['steady']:>12.1f}ms {r['steady_min']:>9.1f}ms "
              f"{r['window']:>11.1f}ms {r['after_window']:>16.1f}ms")
    print(f"each steady run after {args.new:,} new calls; medians of {args.rounds} rounds; "
          f"calls left with no direction: {[r['left_unrepaired'] for r in results]}")
    if args.declared:
        print(f"with {args.declared} declared rules:")
        for r in results:
            print(f"{r['n']:>11,} {'':>10} {r['steady_declared']:>12.1f}ms {r['steady_declared_min']:>9.1f}ms "
                  f"{r['window_declared']:>11.1f}ms {r['after_window_declared']:>16.1f}ms")
    base = results[0]
    declared = [
        figure(f"scheduled run_monitor, steady state, {r['n']:,} calls an hour, {args.declared} declared rules",
               r["steady_declared"], "ms", "same without declared rules", r["steady"])
        for r in results if args.declared]
    emit("monitor_steady", declared + [
        figure(f"scheduled run_monitor, steady state, {r['n']:,} calls an hour", r["steady"], "ms",
               f"same at {base['n']:,} calls an hour", base["steady"], "flat (ratio near 1)")
        for r in results[1:]] + [
        figure(f"run_monitor('1 hour') (the whole window), {r['n']:,} calls an hour", r["window"], "ms",
               f"same at {base['n']:,} calls an hour", base["window"])
        for r in results[1:]])


if __name__ == "__main__":
    main()
