"""Calls partitioned by time: detection and the booking path at 10,000,000 calls, in monthly
partitions, beside the same rows in one table.

The calls span ten months, one partition each (1,000,000 calls a month, key (id, created_at));
appointments for 70 % of them, in monthly partitions too. The same rows go into an unpartitioned
pair of tables in a second database. Measured on both, in alternation: detect('1 hour') (median of
rounds), and the booking transaction (insert call, insert appointment, update flags) with pgbench
(1 client; TPS, median of rounds); then once each, the scheduled reconcile over every row
(CALL booking_guard.run_job('reconcile'), a batch per transaction).

usage: bench/partitions.py [--calls 10000000] [--months 10] [--rounds 3] [--seconds 5]
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import psycopg
from _common import emit, figure, machine, pgbench, scratch_database

BOOKING = """\
\\set company random(1, 100)
begin;
insert into calls (retell_call_id, company_id, direction, customer_id)
     values (gen_random_uuid()::text, :company, 'inbound', :company) returning id as call_id \\gset
insert into appointments (call_id, calcom_v2_booking_id, company_id, customer_id, source)
     values (:call_id, 'cal-' || :call_id, :company, :company, 'retell_webhook');
update calls
   set appointment_made = true, session_outcome = 'appointment_booked', booking_id = 'cal-' || :call_id,
       booking_confirmed = true, call_successful = true, updated_at = now()
 where id = :call_id;
end;
"""


def populate(conn: psycopg.Connection, calls: int, months: int, partitioned: bool) -> None:
    conn.execute("insert into companies (name) select 'company ' || i from generate_series(1, 100) i")
    conn.execute("insert into customers (company_id, name) select i, 'customer ' || i from generate_series(1, 100) i")
    if partitioned:
        conn.execute("create table calls_template (like calls including defaults including constraints)")
        conn.execute("create table appointments_template (like appointments including defaults including constraints)")
        for table in ("calls", "appointments"):
            conn.execute(f"alter table {table}_template alter column id drop identity if exists")
        conn.execute("drop table appointments, calls")
        for table in ("calls", "appointments"):
            conn.execute(f"create sequence {table}_id_seq")
            conn.execute(f"create table {table} (like {table}_template including defaults) partition by range (created_at)")
            conn.execute(f"alter table {table} alter column id set default nextval('{table}_id_seq')")
            conn.execute(f"alter table {table} add primary key (id, created_at)")
            for m in range(months):
                upper = "maxvalue" if m == months - 1 else \
                    f"(date_trunc('month', now()) - interval '{months - 2 - m} months')"
                conn.execute(f"create table {table}_m{m} partition of {table} for values "
                             f"from (date_trunc('month', now()) - interval '{months - 1 - m} months') to ({upper})")
    conn.execute(f"""
        insert into calls (id, retell_call_id, company_id, direction, session_outcome, appointment_made,
                           appointment_link_status, booking_id, customer_id, customer_link_status, created_at, updated_at)
        select i, 'c-' || i, 1 + i % 100, 'inbound',
               case when i % 10 < 7 then 'appointment_booked' else 'no_booking' end, i % 10 < 7,
               case when i % 10 < 7 then 'linked' end, case when i % 10 < 7 then 'cal-' || i end,
               1 + i % 100, 'linked', at, at
          from (select i, date_trunc('month', now()) - interval '{months - 1} months'
                          + (now() - (date_trunc('month', now()) - interval '{months - 1} months')) * (i::float8 / {calls})
                          - interval '1 second' as at
                  from generate_series(1, {calls}) i) s""")
    conn.execute("""
        insert into appointments (id, call_id, calcom_v2_booking_id, company_id, customer_id, source, created_at, updated_at)
        select id, id, booking_id, company_id, customer_id, 'retell_webhook', created_at, created_at
          from calls where booking_id is not null""")
    if partitioned:
        conn.execute(f"select setval('calls_id_seq', {calls})")
        conn.execute(f"select setval('appointments_id_seq', {calls})")
    else:
        conn.execute(f"select setval(pg_get_serial_sequence('calls', 'id'), {calls})")
        conn.execute(f"select setval(pg_get_serial_sequence('appointments', 'id'), {calls})")
    conn.execute("select booking_guard.attach('calls', 'appointments')")
    conn.execute("select booking_guard.set_setting('verification_grace', '0')")
    conn.execute("vacuum analyze")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=10_000_000)
    parser.add_argument("--months", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    args = parser.parse_args()
    names = {"partitioned": "bg_bench_partitioned", "one table": "bg_bench_unpartitioned"}
    results: dict[str, dict] = {}
    with scratch_database(names["partitioned"]) as part_dsn, scratch_database(names["one table"]) as flat_dsn, \
            tempfile.TemporaryDirectory() as tmp:
        dsns = {"partitioned": part_dsn, "one table": flat_dsn}
        for kind, dsn in dsns.items():
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("set client_min_messages = warning")
                started = time.monotonic()
                populate(conn, args.calls, args.months, kind == "partitioned")
                results[kind] = {"load_s": time.monotonic() - started, "detect": [], "tps": [],
                                 "window": conn.execute("select count(*) from calls "
                                                        "where created_at >= now() - interval '1 hour'").fetchone()[0]}
        # detect first: the booking rounds add thousands of calls to the last hour, and detect's cost
        # follows the rows of its window (that is what it is measured against the table size for)
        for _ in range(args.rounds):
            for kind, dsn in dsns.items():
                with psycopg.connect(dsn, autocommit=True) as conn:
                    conn.execute("select count(*) from booking_guard.detect('1 hour')")   # the session's plans
                    started = time.perf_counter()
                    conn.execute("select count(*) from booking_guard.detect('1 hour')")
                    results[kind]["detect"].append((time.perf_counter() - started) * 1000)
        for _ in range(args.rounds):
            for kind in dsns:
                results[kind]["tps"].append(pgbench(names[kind], [(BOOKING, 1)], 1, args.seconds, Path(tmp)))
        for kind, dsn in dsns.items():
            with psycopg.connect(dsn, autocommit=True) as conn:
                # the scheduled reconcile over every row (a batch per transaction), once per layout
                started = time.perf_counter()
                conn.execute("call booking_guard.run_job('reconcile')")
                results[kind]["reconcile_s"] = time.perf_counter() - started
                results[kind]["alerts"] = conn.execute("select count(*) from booking_guard.alerts").fetchone()[0]
    print(f"machine: {machine()}")
    print(f"{args.calls:,} calls over {args.months} months ({args.calls // args.months:,} a month), 70 % booked")
    print(f"{'tables':<12} {'load s':>7} {'last hour':>9} {'detect ms':>10} {'booking tps':>12} "
          f"{'reconcile s':>12} {'rows/s':>9} {'alerts':>7}")
    for kind, r in results.items():
        print(f"{kind:<12} {r['load_s']:>7.0f} {r['window']:>9,} {statistics.median(r['detect']):>10.1f} "
              f"{statistics.median(r['tps']):>12.0f} {r['reconcile_s']:>12.1f} {args.calls / r['reconcile_s']:>9,.0f} "
              f"{r['alerts']:>7}")
    part, flat = results["partitioned"], results["one table"]
    emit("partitions", [
        figure(f"detect('1 hour') at {args.calls:,} calls in {args.months} monthly partitions",
               statistics.median(part["detect"]), "ms", "same rows in one table", statistics.median(flat["detect"])),
        figure(f"booking TPS (1 client) at {args.calls:,} calls in monthly partitions",
               statistics.median(part["tps"]), "tps", "same rows in one table", statistics.median(flat["tps"])),
        figure(f"scheduled reconcile over {args.calls:,} calls in monthly partitions",
               part["reconcile_s"], "s", "same rows in one table", flat["reconcile_s"]),
    ])


if __name__ == "__main__":
    main()
