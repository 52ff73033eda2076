"""What record_booking() costs beside the same booking written by the application itself.

Each transaction books one fresh call (the calls are created beforehand, beside a history of
100,000 booked calls with their appointments; a sequence hands each transaction its own). Four
ways, alternating in one run, on the same tables:

  bare            begin; insert appointment; update call; commit
                  the tables NOT attached: no booking_guard at all, and none of its guarantees
                  (4 round trips)
  plain           begin; take the call id; insert appointment; update call; commit
                  the application's own insert and update on the ATTACHED tables (booking_guard's
                  triggers fire), without record_booking()'s guarantees: 0.1.0's "plain tx",
                  statement for statement (5 round trips)
  DIY             the guarantees record_booking() gives, written by the application in one
                  transaction on the attached tables: lock the booking id and look it up
                  (idempotency), insert the appointment, update the call, the validation query
                  (call, appointment, link, booking id, recency), one log row in a table of its
                  own; begin and commit (7 round trips)
  record_booking  select booking_guard.record_booking(call, booking, '{"status": ..., "source": ...}')
                  (1 round trip)

The DIY transaction serialises on the booking id with a transaction advisory lock, the cheapest
lock an application has for a row that does not exist yet (booking_guard itself takes a row lock
in its own table: an advisory key is one any role can take). Its log table has a primary key and
an index on the time, which is what reading "the last hour's bookings" needs.

Prints TPS at 1 and 8 clients (pgbench -M prepared) and the ratio record_booking / DIY (target
>= 0.9), and the server CPU per booking of each way (the backend's utime + stime from /proc, one
connection, prepared statements, the server on this machine) with every ratio between them. The
CPU target, record_booking / plain <= 1.3, is set against plain: the baseline it was first
measured against (an application's insert and update on tables booking_guard guards), so what it
bounds is what record_booking() adds to booking the call by hand on the same tables. bare (not
attached) is the stricter baseline: it also counts the triggers every write to the guarded tables
pays, record_booking() or not. On a busy machine TPS follows the scheduler as much as the work;
the CPU per booking hardly moves with the load. Each CPU figure is the least disturbed of
--rounds rounds (interference only ever adds CPU); the medians are printed beside them.

Also where one record_booking() call spends its time (pg_stat_user_functions, track_functions =
all, this connection only). Writes its output and figures to bench/results/record_booking.txt and
.json as well as to scripts/run-bench's report.

usage: bench/record_booking.py [--seconds 5] [--rounds 3] [--clients 1,8] [--calls 1500000] [--cpu-bookings 3000]
"""

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
from pathlib import Path

import psycopg
from _common import ROOT, cpu_seconds, emit, figure, machine, pgbench, scratch_database, server_is_local

DB = "bg_bench_record_booking"
HISTORY = 100_000   # booked calls with their appointments before the run
WAYS = ("bare", "plain", "DIY", "record_booking")

FLAGS = ("appointment_made = true, session_outcome = 'appointment_booked', appointment_link_status = 'linked',"
         " appointment_linked_at = now(), booking_confirmed = true, call_successful = true, updated_at = now()")

# The statements of each way, one round trip each, as pgbench and the CPU measurement run them.
# :cid is the call, :aid the appointment the insert returned.
BARE = [
    "begin",
    "insert into appointments (call_id, calcom_v2_booking_id, status, source)"
    " values (nextval('bench_call_seq'), 'bk-' || currval('bench_call_seq'), 'confirmed', 'retell_webhook')"
    " returning call_id as cid",
    f"update calls set {FLAGS}, booking_id = 'bk-' || :cid where id = :cid",
    "commit",
]

PLAIN = [
    "begin",
    "select nextval('bench_call_seq') as cid",
    "insert into appointments (call_id, calcom_v2_booking_id, status, source)"
    " values (:cid, 'bk-' || :cid, 'confirmed', 'retell_webhook')",
    f"update calls set {FLAGS}, booking_id = 'bk-' || :cid where id = :cid",
    "commit",
]

DIY = [
    "begin",
    # idempotency: serialise on the booking id, then look it up (a booking recorded before would
    # be returned as it is; in this benchmark every booking is new)
    "select c.id as cid, pg_advisory_xact_lock(hashtextextended('bk-' || c.id, 0)) as locked,"
    " (select a.id from appointments a where a.calcom_v2_booking_id = 'bk-' || c.id"
    "   order by a.call_id = c.id desc, a.id limit 1) as existing"
    " from (select nextval('bench_call_seq') as id) c",
    "insert into appointments (call_id, calcom_v2_booking_id, status, source)"
    " values (:cid, 'bk-' || :cid, 'confirmed', 'retell_webhook') returning id as aid",
    f"update calls set {FLAGS}, booking_id = coalesce(booking_id, 'bk-' || :cid) where id = :cid",
    # the validation: the call exists, the appointment exists, is linked to it, carries the booking
    # id (the call's too, when it has one) and is recent
    "select a.id is not null and a.calcom_v2_booking_id = 'bk-' || :cid"
    " and coalesce(c.booking_id = a.calcom_v2_booking_id, true) and a.created_at > now() - interval '5 minutes' as ok,"
    " c.retell_call_id, c.booking_id, a.created_at"
    " from calls c left join appointments a on a.id = :aid and a.call_id = c.id where c.id = :cid",
    "insert into booking_log (call_id, booking_id, success, details)"
    " values (:cid, 'bk-' || :cid, true, jsonb_build_object('appointment_id', :aid::bigint, 'reason', 'ok'))",
    "commit",
]

RECORD_BOOKING = [
    "select success from booking_guard.record_booking(nextval('bench_call_seq'), 'bk-' || currval('bench_call_seq'),"
    " '{\"status\": \"confirmed\", \"source\": \"retell_webhook\"}')",
]

STATEMENTS = {"bare": BARE, "plain": PLAIN, "DIY": DIY, "record_booking": RECORD_BOOKING}


def pgbench_script(statements: list[str]) -> str:
    """The statements as a pgbench script: a statement that returns a column named like a later
    :variable keeps it (\\gset)."""
    lines = []
    for stmt in statements:
        lines.append(stmt + (r" \gset" if " as cid" in stmt or " as aid" in stmt else ";"))
    return "\n".join(lines) + "\n"


def populate(dsn: str, calls: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("insert into companies (name) select 'company ' || i from generate_series(1, 100) i")
        conn.execute("""
            insert into calls (retell_call_id, company_id, direction)
            select 'call-' || i, 1 + i %% 100, 'inbound' from generate_series(1, %s) i""", (calls,))
        # A history of booked calls, as any running system has: with empty appointments the
        # plans kept for the session would be planned for an empty table.
        conn.execute("""
            insert into calls (retell_call_id, company_id, direction, session_outcome, appointment_made,
                               appointment_link_status, booking_id)
            select 'booked-' || i, 1 + i %% 100, 'inbound', 'appointment_booked', true, 'linked', 'booked-' || i
              from generate_series(1, %s) i""", (HISTORY,))
        conn.execute("""
            insert into appointments (call_id, calcom_v2_booking_id, company_id, status, source)
            select id, booking_id, company_id, 'confirmed', 'retell_webhook' from calls where booking_id is not null""")
        conn.execute("create sequence bench_call_seq")
        # the application's own log of its bookings (DIY)
        conn.execute("""
            create table booking_log (
                id          bigint generated always as identity primary key,
                at          timestamptz not null default clock_timestamp(),
                call_id     bigint not null,
                booking_id  text not null,
                success     boolean not null,
                details     jsonb not null)""")
        conn.execute("create index booking_log_at_idx on booking_log (at)")
        # attach once for its indexes: the bare way then runs detached on the same tables
        conn.execute("select booking_guard.attach('calls', 'appointments')")
        conn.execute("select booking_guard.set_setting('verification_grace', '0')")
        conn.execute("vacuum analyze")


@contextlib.contextmanager
def attached_for(conn: psycopg.Connection, way: str):
    """The tables detached for the bare way, attached for the others."""
    if way == "bare":
        conn.execute("select booking_guard.detach()")
    try:
        yield
    finally:
        if way == "bare":
            conn.execute("select booking_guard.attach('calls', 'appointments')")


def book(conn: psycopg.Connection, way: str) -> None:
    """One booking the given way: the pgbench script's statements, prepared, one round trip each."""
    found: dict[str, object] = {}
    for stmt in STATEMENTS[way]:
        if stmt in ("begin", "commit"):
            conn.execute(stmt)
            continue
        sql = stmt.replace(":cid", "%(cid)s").replace(":aid", "%(aid)s")
        cur = conn.execute(sql, found if "%(" in sql else None, prepare=True)
        if cur.description is not None:
            row = cur.fetchone()
            found.update({col.name: value for col, value in zip(cur.description, row, strict=True)
                          if col.name in ("cid", "aid")})


def order(round_no: int) -> tuple[str, ...]:
    """The ways in a rotating order: a drift of the machine's speed during the run spreads over all."""
    k = round_no % len(WAYS)
    return WAYS[k:] + WAYS[:k]


def server_cpu_per_booking(dsn: str, bookings: int, rounds: int) -> dict[str, list[float]] | None:
    """Microseconds of server CPU per booking, each way, per round; None when the server is not local."""
    spent: dict[str, list[float]] = {way: [] for way in WAYS}
    with psycopg.connect(dsn, autocommit=True) as admin, psycopg.connect(dsn, autocommit=True) as conn:
        if not server_is_local(conn):
            return None
        pid = conn.info.backend_pid
        for round_no in range(rounds):
            for way in order(round_no):
                with attached_for(admin, way):
                    for _ in range(100):   # warm this way's plans and caches
                        book(conn, way)
                    before = cpu_seconds(pid)
                    for _ in range(bookings):
                        book(conn, way)
                    spent[way].append((cpu_seconds(pid) - before) / bookings * 1e6)
    return spent


def inside_record_booking(dsn: str, bookings: int) -> list[tuple[str, float, float]]:
    """Where a record_booking() call spends its time: (function, total us, self us) per booking,
    from the server's function statistics (track_functions = all, this connection only)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("set track_functions = 'all'")
        for _ in range(100):
            book(conn, "record_booking")
        conn.execute("select pg_stat_reset()")
        for _ in range(bookings):
            book(conn, "record_booking")
        conn.execute("select pg_stat_force_next_flush()")   # flushed as this backend goes idle
        with psycopg.connect(dsn, autocommit=True) as reader:
            return reader.execute("""
                select schemaname || '.' || funcname, total_time * 1000 / %(n)s, self_time * 1000 / %(n)s
                  from pg_stat_user_functions
                 where schemaname in ('booking_guard', 'booking_guard_internal') and calls > 0
                 order by total_time desc""", {"n": bookings}).fetchall()


def run(args: argparse.Namespace) -> list[dict]:
    tps: dict[tuple[str, int], list[float]] = {}
    with scratch_database(DB) as dsn, tempfile.TemporaryDirectory() as tmp:
        populate(dsn, args.calls)
        with psycopg.connect(dsn, autocommit=True) as admin:
            for clients in (int(c) for c in args.clients.split(",")):
                for round_no in range(args.rounds):
                    for way in order(round_no):
                        with attached_for(admin, way):
                            tps.setdefault((way, clients), []).append(
                                pgbench(DB, [(pgbench_script(STATEMENTS[way]), 1)], clients, args.seconds, Path(tmp)))
        cpu = server_cpu_per_booking(dsn, args.cpu_bookings, args.rounds)
        inside = inside_record_booking(dsn, args.cpu_bookings)
        with psycopg.connect(dsn, autocommit=True) as conn:
            used, booked, duplicates, inconsistent, failed, alerts, logged = conn.execute("""
                select (select last_value from bench_call_seq), (select count(*) - %s from appointments),
                       (select count(*) from (select from appointments group by calcom_v2_booking_id having count(*) > 1) d),
                       (select count(*) from calls c where c.appointment_made
                           and not exists (select from appointments a where a.call_id = c.id)),
                       (select count(*) from booking_guard.events where kind = 'record_booking'
                           and not (details ->> 'success')::boolean),
                       (select count(*) from booking_guard.alerts),
                       (select count(*) from booking_guard.events where kind = 'record_booking')""",
                (HISTORY,)).fetchone()
    if used > args.calls:
        raise SystemExit(f"ran out of prepared calls ({used} > {args.calls}): raise --calls")

    print(f"machine: {machine()}")
    print(f"pgbench -M prepared, {args.seconds} s per run, median of {args.rounds} rounds, the ways in rotating order")
    print(f"{'clients':>7} {'bare':>8} {'plain':>8} {'DIY':>8} {'record_booking':>15}"
          f" {'rb/DIY':>7} {'rb/plain':>9} {'rb/bare':>8}")
    medians = {key: statistics.median(values) for key, values in tps.items()}
    clients_run = sorted({c for _, c in tps})
    for clients in clients_run:
        bare, plain, diy, rb = (medians[(way, clients)] for way in WAYS)
        print(f"{clients:>7} {bare:>8.0f} {plain:>8.0f} {diy:>8.0f} {rb:>15.0f}"
              f" {rb / diy:>7.2f} {rb / plain:>9.2f} {rb / bare:>8.2f}")
    figures = []
    for clients in clients_run:
        rb = medians[("record_booking", clients)]
        figures.append(figure(f"record_booking TPS, {clients} client(s)", rb, "tps",
                              "DIY", medians[("DIY", clients)], ">= 0.9"))
        for base in ("plain", "bare"):
            figures.append(figure(f"record_booking TPS, {clients} client(s)", rb, "tps", base, medians[(base, clients)]))
    if cpu is not None:
        least = {way: min(values) for way, values in cpu.items()}
        median = {way: statistics.median(values) for way, values in cpu.items()}
        ratios = (("record_booking", "plain"), ("record_booking", "DIY"), ("record_booking", "bare"),
                  ("DIY", "plain"), ("DIY", "bare"), ("plain", "bare"))
        print(f"server CPU per booking (us), 1 connection, {args.cpu_bookings} bookings per way and round, "
              f"least disturbed of {args.rounds} rounds, then the medians:")
        names = {"record_booking": "rb"}
        heads = [f"{names.get(a, a)}/{names.get(b, b)}" for a, b in ratios]
        print(f"{'bare':>8} {'plain':>8} {'DIY':>8} {'record_booking':>15} " + " ".join(f"{h:>10}" for h in heads))
        for label, of in (("", least), ("   (medians)", median)):
            print(f"{of['bare']:>8.0f} {of['plain']:>8.0f} {of['DIY']:>8.0f} {of['record_booking']:>15.0f} "
                  + " ".join(f"{of[a] / of[b]:>10.2f}" for a, b in ratios) + label)
        print("the CPU target is rb/plain <= 1.3: plain (the application's insert and update on the attached tables)"
              " is the baseline it was set against")
        figures.append(figure("server CPU per booking, record_booking", least["record_booking"], "us",
                              "plain", least["plain"], "<= 1.3"))
        for base in ("DIY", "bare"):
            figures.append(figure("server CPU per booking, record_booking", least["record_booking"], "us",
                                  base, least[base]))
    print("inside one record_booking() call (us per booking, timed by the server; total includes the functions it calls):")
    for function, total, own in inside:
        print(f"  {function:<50} total {total:7.1f}   self {own:7.1f}")
    print(f"bookings: {booked:,} appointments for {used:,} calls; duplicate booking ids: {duplicates}; "
          f"calls flagged without appointment: {inconsistent}; record_booking events: {logged:,}, failed: {failed}; "
          f"alerts: {alerts}")
    print("targets: record_booking TPS >= 0.9 x DIY at every client count; server CPU per booking <= 1.3 x plain")
    if duplicates or inconsistent or failed or alerts:
        raise SystemExit("the benchmark's bookings were not all consistent: the figures above are not comparable")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", default="1,8")
    parser.add_argument("--calls", type=int, default=1_500_000,
                        help="calls created beforehand, one per booking: more than all the ways book in the run")
    parser.add_argument("--cpu-bookings", type=int, default=3000)
    args = parser.parse_args()
    printed = io.StringIO()

    class Tee(io.TextIOBase):
        def write(self, text: str) -> int:
            printed.write(text)
            return sys.__stdout__.write(text)

        def flush(self) -> None:
            sys.__stdout__.flush()

    with contextlib.redirect_stdout(Tee()):
        figures = run(args)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "record_booking.txt").write_text(printed.getvalue())
    (out / "record_booking.json").write_text(json.dumps({"args": vars(args), "figures": figures}, indent=2) + "\n")
    emit("record_booking", figures)


if __name__ == "__main__":
    main()
