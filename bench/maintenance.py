"""Maintenance does not block bookings: how long an application write to one call waits while the
scheduled jobs repair a large table.

1,000,000 calls, of which every tenth needs a repair (a missing direction, written with the rule
off). While a job runs, application writers update random calls among those (each write in its own
transaction) and time every statement. The scheduled job (CALL booking_guard.run_job(...)) commits
every job_batch_size rows and skips rows an application holds, so a write waits at most for one
batch. Measured side by side in one run:

  - the same writes with no job running (the baseline)
  - during CALL booking_guard.run_job('reconcile') over the million calls
  - during CALL booking_guard.run_job('run_monitor'), its first run over the hour's million calls
  - during select booking_guard.reconcile() (one transaction, as 0.1.0 ran it; informational)

Target: the longest write during a scheduled job <= 100 ms.

usage: bench/maintenance.py [--calls 1000000] [--writers 2] [--batch 1000]
"""

import argparse
import random
import statistics
import threading
import time

import psycopg
from _common import emit, figure, machine, scratch_database

DB = "bg_bench_maintenance"


def populate(dsn: str, calls: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("insert into companies (name) select 'company ' || i from generate_series(1, 100) i")
        # the rows are written before attaching (fast); then attached, as a DBA would on a live table
        conn.execute("""
            insert into calls (retell_call_id, company_id, direction, session_outcome)
            select 'c-' || i, 1 + i %% 100, case when i %% 10 = 0 then null else 'inbound' end, 'no_answer'
              from generate_series(1, %s) i""", (calls,))
        conn.execute("vacuum analyze calls")
        conn.execute("select booking_guard.attach('calls', 'appointments')")


def plant(dsn: str) -> list[int]:
    """Every tenth call without its direction again (the rule off while writing it): returns their ids."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("select booking_guard.set_rule('missing_direction', 'off')")
        conn.execute("update calls set direction = null where id % 10 = 0 and direction is not null")
        conn.execute("select booking_guard.set_rule('missing_direction', 'correct')")
        conn.execute("vacuum analyze calls")
        return [r[0] for r in conn.execute("select id from calls where direction is null")]


def write_while(dsn: str, ids: list[int], writers: int, work) -> tuple[list[float], float]:
    """Runs work() while `writers` threads update random calls among ids; returns every write's
    duration (seconds) and how long work() took."""
    stop = threading.Event()
    durations: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        mine = []
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                while not stop.is_set():
                    call_id = rng.choice(ids)
                    started = time.monotonic()
                    conn.execute("update calls set booking_details = '{}' where id = %s", (call_id,), prepare=True)
                    mine.append(time.monotonic() - started)
        except BaseException as error:   # noqa: BLE001 - reported below, a benchmark must not hide it
            errors.append(error)
        with lock:
            durations.extend(mine)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    started = time.monotonic()
    work()
    took = time.monotonic() - started
    stop.set()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(f"an application write failed: {errors[0]!r}")
    return durations, took


def summary(durations: list[float]) -> dict[str, float]:
    ms = sorted(d * 1000 for d in durations)
    return {"writes": len(ms), "p50": statistics.median(ms), "p99": ms[int(len(ms) * 0.99) - 1], "max": ms[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=1_000_000)
    parser.add_argument("--writers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1000)
    args = parser.parse_args()
    results: dict[str, tuple[dict[str, float], float, str]] = {}
    with scratch_database(DB) as dsn:
        populate(dsn, args.calls)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("select booking_guard.set_setting('job_batch_size', %s)", (str(args.batch),))
            # the first reconcile repairs what populate() planted; each run below gets a fresh plant
            ids = plant(dsn)
            durations, took = write_while(dsn, ids, args.writers, lambda: time.sleep(5))
            results["no job (baseline)"] = (summary(durations), took, "")

            ids = plant(dsn)
            durations, took = write_while(dsn, ids, args.writers,
                                          lambda: conn.execute("call booking_guard.run_job('reconcile')"))
            fixed = conn.execute("select counts ->> 'directions' from booking_guard.reconciliation_runs "
                                 "order by id desc limit 1").fetchone()[0]
            results["CALL run_job('reconcile')"] = (summary(durations), took, f"{fixed} directions repaired")

            ids = plant(dsn)
            durations, took = write_while(dsn, ids, args.writers,
                                          lambda: conn.execute("call booking_guard.run_job('run_monitor')"))
            found = conn.execute("select last_result -> 'counts' ->> 'repaired' from booking_guard.job_runs "
                                 "where job = 'run_monitor'").fetchone()[0]
            results["CALL run_job('run_monitor')"] = (summary(durations), took, f"{found} findings repaired")

            ids = plant(dsn)
            durations, took = write_while(dsn, ids, args.writers,
                                          lambda: conn.execute("select booking_guard.reconcile(%s)", (args.batch,)))
            results["select reconcile() (one transaction)"] = (summary(durations), took, "informational")

    print(f"machine: {machine()}")
    print(f"{args.calls:,} calls, every tenth to repair; {args.writers} application writers; job_batch_size {args.batch}")
    print(f"{'while':<38} {'job s':>7} {'writes':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>9}  note")
    for name, (s, took, note) in results.items():
        print(f"{name:<38} {took:>7.1f} {s['writes']:>7} {s['p50']:>8.2f} {s['p99']:>8.2f} {s['max']:>9.1f}  {note}")
    base = results["no job (baseline)"][0]["max"]
    figures = [figure(f"longest application write during {name}", s["max"], "ms", "longest write with no job", base,
                      "<= 100 ms" if name.startswith("CALL") else None)
               for name, (s, _, _) in results.items() if name != "no job (baseline)"]
    emit("maintenance", figures)


if __name__ == "__main__":
    main()
