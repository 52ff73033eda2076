"""Throughput of record_booking() beside the same booking written by plain SQL, with pgbench.

Each transaction books one fresh call (calls are created beforehand, beside a history of
100,000 booked calls; a sequence hands each transaction its own): the appointment is inserted
and the call linked and flagged. Three ways,
alternating in one run, on the same attached tables:

  record_booking  select booking_guard.record_booking(call, booking, '{"status": ..., "source": ...}')
                  (idempotency lock and lookup, subtransaction, validation, two events; 1 round trip)
  plain tx        begin; insert appointment; update call; commit   (what an application does; 5 round trips)
  plain 1-stmt    the same insert and update in one statement       (the tightest plain SQL; 1 round trip)

Prints TPS at 1 and 8 clients and the ratios. Target (issue 4): record_booking >= 0.7 x plain insert.
On a busy machine TPS follows the scheduler as much as the work, so it also prints the server
CPU time per booking (the backend's utime + stime from /proc, one connection, the server on
this machine), which the machine's load hardly moves.

usage: bench/record_booking.py [--seconds 5] [--rounds 2] [--clients 1,8] [--calls 600000] [--cpu-bookings 3000]
"""

import argparse
import statistics
import tempfile
from pathlib import Path

import psycopg
from _common import cpu_seconds, emit, figure, machine, pgbench, scratch_database

DB = "bg_bench_record_booking"
HISTORY = 100_000   # booked calls with their appointments before the run

FLAGS = ("appointment_made = true, session_outcome = 'appointment_booked', appointment_link_status = 'linked',"
         " appointment_linked_at = now(), booking_confirmed = true, call_successful = true, updated_at = now()")

SCRIPTS = {
    "record_booking": """\
select success from booking_guard.record_booking(nextval('bench_call_seq'), 'bk-' || currval('bench_call_seq'),
       '{"status": "confirmed", "source": "retell_webhook"}');
""",
    "plain tx": f"""\
begin;
select nextval('bench_call_seq') as cid \\gset
insert into appointments (call_id, calcom_v2_booking_id, status, source)
     values (:cid, 'bk-' || :cid, 'confirmed', 'retell_webhook');
update calls set {FLAGS}, booking_id = 'bk-' || :cid where id = :cid;
end;
""",
    "plain 1-stmt": f"""\
with c as (select nextval('bench_call_seq') as id),
     a as (insert into appointments (call_id, calcom_v2_booking_id, status, source)
           select id, 'bk-' || id, 'confirmed', 'retell_webhook' from c returning call_id, calcom_v2_booking_id)
update calls set {FLAGS}, booking_id = a.calcom_v2_booking_id from a where calls.id = a.call_id;
""",
}


def populate(dsn: str, calls: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("insert into companies (name) select 'company ' || i from generate_series(1, 100) i")
        conn.execute("""
            insert into calls (retell_call_id, company_id, direction)
            select 'call-' || i, 1 + i %% 100, 'inbound' from generate_series(1, %s) i""", (calls,))
        # A history of booked calls, as any running system has: with empty appointments the
        # plans the booking path keeps for the session would be planned for an empty table.
        conn.execute("""
            insert into calls (retell_call_id, company_id, direction, session_outcome, appointment_made,
                               appointment_link_status, booking_id)
            select 'booked-' || i, 1 + i %% 100, 'inbound', 'appointment_booked', true, 'linked', 'booked-' || i
              from generate_series(1, %s) i""", (HISTORY,))
        conn.execute("""
            insert into appointments (call_id, calcom_v2_booking_id, company_id, status, source)
            select id, booking_id, company_id, 'confirmed', 'retell_webhook' from calls where booking_id is not null""")
        conn.execute("create sequence bench_call_seq")
        conn.execute("select booking_guard.attach('calls', 'appointments')")
        conn.execute("select booking_guard.set_setting('verification_grace', '0')")
        conn.execute("vacuum analyze")


def server_cpu_per_booking(dsn: str, bookings: int, rounds: int) -> dict[str, float] | None:
    """Microseconds of server CPU per booking, each way, alternating; None when the server is not local."""
    spent: dict[str, list[float]] = {name: [] for name in SCRIPTS}
    insert = ("insert into appointments (call_id, calcom_v2_booking_id, status, source)"
              " values (%(cid)s, 'bk-' || %(cid)s, 'confirmed', 'retell_webhook')")
    update = f"update calls set {FLAGS}, booking_id = 'bk-' || %(cid)s where id = %(cid)s"
    with psycopg.connect(dsn, autocommit=True) as conn:
        pid = conn.info.backend_pid
        if not Path(f"/proc/{pid}/stat").exists():
            return None

        def book(name: str) -> None:
            if name == "plain tx":   # the pgbench script's statements, one round trip each
                with conn.transaction():
                    cid = conn.execute("select nextval('bench_call_seq')", prepare=True).fetchone()[0]
                    conn.execute(insert, {"cid": cid}, prepare=True)
                    conn.execute(update, {"cid": cid}, prepare=True)
            else:
                conn.execute(SCRIPTS[name].strip().rstrip(";"), prepare=True)

        for _ in range(rounds):
            for name in SCRIPTS:
                for _ in range(50):
                    book(name)
                before = cpu_seconds(pid)
                for _ in range(bookings):
                    book(name)
                spent[name].append((cpu_seconds(pid) - before) / bookings * 1e6)
    return {name: statistics.median(values) for name, values in spent.items()}


def inside_record_booking(dsn: str, bookings: int) -> list[tuple[str, float, float]]:
    """Where a record_booking() call spends its time: (function, total us, self us) per booking,
    from the server's function statistics (track_functions = all, this connection only)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("set track_functions = 'all'")
        conn.execute("select pg_stat_reset()")
        for _ in range(bookings):
            conn.execute(SCRIPTS["record_booking"].strip().rstrip(";"), prepare=True)
        conn.execute("select pg_stat_force_next_flush()")   # flushed as this backend goes idle
        with psycopg.connect(dsn, autocommit=True) as reader:
            return reader.execute("""
                select funcname, total_time * 1000 / %(n)s, self_time * 1000 / %(n)s
                  from pg_stat_user_functions where schemaname = 'booking_guard'
                 order by total_time desc""", {"n": bookings}).fetchall()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", default="1,8")
    parser.add_argument("--calls", type=int, default=600_000)
    parser.add_argument("--cpu-bookings", type=int, default=3000)
    args = parser.parse_args()
    results: dict[tuple[str, int], list[float]] = {}
    with scratch_database(DB) as dsn, tempfile.TemporaryDirectory() as tmp:
        populate(dsn, args.calls)
        for clients in (int(c) for c in args.clients.split(",")):
            for _ in range(args.rounds):
                for name, body in SCRIPTS.items():
                    results.setdefault((name, clients), []).append(pgbench(DB, [(body, 1)], clients, args.seconds, Path(tmp)))
        cpu = server_cpu_per_booking(dsn, args.cpu_bookings, args.rounds)
        inside = inside_record_booking(dsn, args.cpu_bookings)
        with psycopg.connect(dsn, autocommit=True) as conn:
            used, appointments, duplicates, inconsistent, failed, alerts = conn.execute("""
                select (select last_value from bench_call_seq), (select count(*) - %s from appointments),
                       (select count(*) from (select from appointments group by calcom_v2_booking_id having count(*) > 1) d),
                       (select count(*) from calls c where c.appointment_made
                           and not exists (select from appointments a where a.call_id = c.id)),
                       (select count(*) from booking_guard.events where kind = 'record_booking'
                           and not (details ->> 'success')::boolean),
                       (select count(*) from booking_guard.alerts where alert_type <> 'missing_direction')""",
                (HISTORY,)).fetchone()
    if used > args.calls:
        raise SystemExit(f"ran out of prepared calls ({used} > {args.calls}): raise --calls")
    print(f"machine: {machine()}")
    print(f"pgbench -M prepared, {args.seconds} s per run, median of {args.rounds} rounds, alternating")
    print(f"{'clients':>7} {'record_booking':>15} {'plain tx':>10} {'plain 1-stmt':>13} {'rb/plain tx':>12} {'rb/1-stmt':>10}")
    for clients in sorted({c for _, c in results}):
        tps = {name: statistics.median(results[(name, clients)]) for name in SCRIPTS}
        print(f"{clients:>7} {tps['record_booking']:>15.0f} {tps['plain tx']:>10.0f} {tps['plain 1-stmt']:>13.0f}"
              f" {tps['record_booking'] / tps['plain tx']:>12.2f} {tps['record_booking'] / tps['plain 1-stmt']:>10.2f}")
    if cpu is not None:
        print(f"server CPU per booking (us), 1 connection, {args.cpu_bookings} bookings each, median of {args.rounds}:"
              f" record_booking {cpu['record_booking']:.0f}, plain tx {cpu['plain tx']:.0f},"
              f" plain 1-stmt {cpu['plain 1-stmt']:.0f}; plain tx / record_booking"
              f" {cpu['plain tx'] / cpu['record_booking']:.2f}, 1-stmt / record_booking"
              f" {cpu['plain 1-stmt'] / cpu['record_booking']:.2f}")
    print("inside one record_booking() call (us per booking; total includes the functions it calls):")
    for function, total, own in inside:
        print(f"  {function:<32} total {total:7.1f}   self {own:7.1f}")
    print(f"bookings: {appointments:,} appointments for {used:,} calls; duplicate booking ids: {duplicates}; "
          f"calls flagged without appointment: {inconsistent}; failed record_booking: {failed}; alerts: {alerts}")
    print("target: record_booking >= 0.7 x plain insert")
    figures = []
    for clients in sorted({c for _, c in results}):
        tps = {name: statistics.median(results[(name, clients)]) for name in SCRIPTS}
        figures += [figure(f"record_booking TPS, {clients} client(s)", tps["record_booking"], "tps", base,
                           tps[base], ">= 0.7" if base == "plain tx" else None) for base in ("plain tx", "plain 1-stmt")]
    if cpu is not None:
        # CPU per booking: lower is better, so the baseline is the numerator (plain / record_booking, as printed)
        figures.append(figure("server CPU per booking, plain tx / record_booking", cpu["plain tx"], "us",
                              "record_booking", cpu["record_booking"]))
    # each function's share of a record_booking() call: the first row is record_booking itself
    figures += [figure(f"inside record_booking: {function}", total, "us", "record_booking", inside[0][1])
                for function, total, _ in inside[1:4]]
    emit("record_booking", figures)


if __name__ == "__main__":
    main()
