"""The workload simulator: phone-agent workers booking appointments, with injected faults.

N worker threads, each with its own connection, place calls the way an unguarded application
does: a call row, a booking in Cal.com (a real local HTTP server, booking_guard.sim.fake_calcom)
under the circuit breaker (booking_guard.app.circuit), then the appointment and the call's
flags, either through booking_guard.record_booking() or by raw SQL as an unguarded application's own
createLocalRecord + trackBooking do. A share of the calls gets a fault injected, and every
injected fault is written to `sim.faults` (ground truth, in the simulated database, not in the
extension) right after the transaction that injected it committed:

    kind                  what the buggy application / the world did
    calcom_failure        Cal.com answered 503, or the breaker rejected the call while Cal.com was down
    local_insert_failed   Cal.com booked, the appointment insert failed, trackBooking still said booked
    worker_died           the call was flagged as booked, then the worker died before the appointment
    null_direction        the call was written without a direction
    orphan_appointment    the appointment was written without its call (call_id null)
    appointment_deleted   a booked call's appointment was deleted
    double_booking        two workers booked the same call (two Cal.com bookings, record_booking each)
    retry_double_booked   a retry recorded the same Cal.com booking twice (raw SQL, or record_booking)

Beside the workers run what a deployment runs: verify_due() and fold_metrics() every `verify_every`
seconds (as `booking-guard serve` does) and run_monitor() every `monitor_every` seconds (pg_cron runs it
every minute; the simulator may run it more often), and a LISTEN on booking_guard_alert that
collects every alert id notified, so the soak can check that no alert was lost.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import psycopg
from psycopg.types.json import Jsonb

from booking_guard.app import CircuitOpen, circuit, record_booking
from booking_guard.sim import app_schema
from booking_guard.sim.fake_calcom import CalcomClient, CalcomError, FakeCalcom

FAULT_KINDS = ("calcom_failure", "local_insert_failed", "worker_died", "null_direction", "orphan_appointment",
               "appointment_deleted", "double_booking", "retry_double_booked")
# What booking_guard is expected to do about each kind (the soak's verdict reads this):
#   commit   detected when the faulty transaction commits (triggers)
#   grace    detected by verify_due() once verification_grace has passed
#   monitor  detected by run_monitor() (or reconcile())
#   queue    handled by the application through the breaker and the review queue
EXPECTED = {"calcom_failure": "queue", "local_insert_failed": "commit", "worker_died": "grace",
            "null_direction": "commit", "orphan_appointment": "monitor", "appointment_deleted": "commit",
            "double_booking": "commit", "retry_double_booked": "monitor"}
# The faults injected by the simulator's own choice (calcom_failure comes from the fake Cal.com).
DEFAULT_MIX = {"local_insert_failed": 1, "worker_died": 1, "null_direction": 1, "orphan_appointment": 1,
               "appointment_deleted": 1, "double_booking": 1, "retry_double_booked": 1}

SIM_SCHEMA = """
create schema if not exists sim;
create table if not exists sim.runs (
    id           serial primary key,
    started_at   timestamptz not null default clock_timestamp(),
    finished_at  timestamptz,
    config       jsonb not null,
    stats        jsonb
);
-- Ground truth: one row per injected fault, written after the transaction that injected it
-- committed (committed_at is that moment, taken on the server's clock).
create table if not exists sim.faults (
    id              bigserial primary key,
    run_id          integer not null references sim.runs (id),
    kind            text not null,
    path            text not null,
    expected        text not null,
    call_id         bigint,
    appointment_id  bigint,
    booking_id      text,
    outcome         text,
    committed_at    timestamptz not null,
    details         jsonb not null default '{}'
);
create index if not exists faults_run_call_idx on sim.faults (run_id, call_id);
-- Every booking the application committed (the appointment and its call's flags), written in the
-- same transaction: at the end each must still have its appointment, unless deleted on purpose.
create table if not exists sim.bookings (
    run_id        integer not null,
    call_id       bigint not null,
    booking_id    text not null,
    path          text not null,
    committed_at  timestamptz not null default clock_timestamp()
);
"""


@dataclass
class SimConfig:
    calls: int = 1000
    workers: int = 4
    #: share of calls that get an injected fault (besides Cal.com's own failures)
    fault_rate: float = 0.1
    fault_mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    #: share of calls that try to book at all (the others end as information calls)
    booking_share: float = 0.6
    #: share of clean bookings written by raw SQL (the application's createLocalRecord + trackBooking)
    raw_sql_share: float = 0.3
    calcom_latency: float = 0.002
    #: seconds a worker waits between two calls (0: as fast as it can; the demo paces itself with it)
    think_time: float = 0.0
    calcom_failure_rate: float = 0.005
    #: Cal.com outages: (fraction of the calls placed when it starts, seconds it lasts)
    outages: list[tuple[float, float]] = field(default_factory=list)
    #: verification_grace for the run (the default 5 s makes a demo wait; say what you use)
    grace: float = 1.0
    #: breaker cooldown for appointment_booking:% during the run (the default 30 s, shortened)
    cooldown: float = 2.0
    verify_every: float = 1.0
    monitor_every: float = 1.0
    monitor_window: str = "1 hour"
    services: int = 3
    companies: int = 5
    seed: int = 1


@dataclass
class SimResult:
    run_id: int
    calls: int
    seconds: float
    fault_counts: dict[str, int]
    calcom: dict[str, int]
    calcom_ledger: dict[str, dict]
    notified_alerts: set[int]
    worker_errors: list[str]
    driver_errors: list[str]
    breaker_rejections: int
    verify_runs: int
    monitor_runs: int


def prepare(conn: psycopg.Connection, config: SimConfig) -> int:
    """Reference schema, extension, attachment, reference data, the run's settings, sim schema; a new run id."""
    conn.execute("set client_min_messages = warning")
    if conn.execute("select to_regclass('public.calls') is null").fetchone()[0]:
        conn.execute(app_schema())
    conn.execute("create extension if not exists booking_guard cascade")
    if conn.execute("select not exists (select from booking_guard.attachment)").fetchone()[0]:
        conn.execute("select booking_guard.attach('public.calls', 'public.appointments')")
    conn.execute(SIM_SCHEMA)
    have = conn.execute("select count(*) from companies").fetchone()[0]
    for c in range(have, config.companies):
        company = conn.execute("insert into companies (name) values (%s) returning id", (f"Clinic {c + 1}",)).fetchone()[0]
        conn.execute("insert into staff (company_id, name) values (%s, %s)", (company, f"Dr. {c + 1}"))
        for s in range(config.services):
            conn.execute("insert into services (company_id, name, calcom_event_type_id) values (%s, %s, %s)",
                         (company, f"Service {s + 1}", 1000 * (c + 1) + s))
    conn.execute("select booking_guard.set_setting('verification_grace', %s)", (f"{config.grace} seconds",))
    # a new run starts with closed breakers (a previous run may have left one open)
    conn.execute("select booking_guard.circuit_reset(key) from booking_guard.circuit_breakers where state <> 'closed'")
    conn.execute(
        "insert into booking_guard.circuit_policies (key_pattern, cooldown) values ('appointment_booking:%%', %s)"
        " on conflict (key_pattern) do update set cooldown = excluded.cooldown", (f"{config.cooldown} seconds",))
    return conn.execute("insert into sim.runs (config) values (%s) returning id",
                        (Jsonb({k: v for k, v in asdict(config).items()}),)).fetchone()[0]


class _Shared:
    """What the workers share: the call counter, the outage schedule, the tallies."""

    def __init__(self, config: SimConfig, calcom: FakeCalcom, progress: Callable[[int, int], None] | None) -> None:
        self.config = config
        self.calcom = calcom
        self.progress = progress
        self.lock = threading.Lock()
        self.counter = itertools.count()
        self.done = 0
        self.faults: Counter[str] = Counter()
        self.errors: list[str] = []
        self.rejections = 0
        self.outages = sorted((int(f * config.calls), s) for f, s in config.outages)

    def next_call(self) -> int | None:
        with self.lock:
            n = next(self.counter)
            if n >= self.config.calls:
                return None
            while self.outages and n >= self.outages[0][0]:
                self.calcom.outage_for(self.outages.pop(0)[1])
            return n

    def finished_one(self) -> None:
        with self.lock:
            self.done += 1
            done = self.done
        if self.progress is not None:
            self.progress(done, self.config.calls)


class Worker:
    """One phone agent: its own database connection(s) and Cal.com connection."""

    def __init__(self, number: int, dsn: str, run_id: int, shared: _Shared) -> None:
        self.number = number
        self.dsn = dsn
        self.run_id = run_id
        self.shared = shared
        self.config = shared.config
        self.rng = random.Random(f"{self.config.seed}-{number}")
        self.conn = self._connect()
        self.other: psycopg.Connection | None = None   # the second "worker" of a double booking
        self.calcom = CalcomClient(shared.calcom.port)
        self.companies = [r[0] for r in self.conn.execute("select id from companies order by id")]
        self.services = {c: [r[0] for r in self.conn.execute(
            "select id from services where company_id = %s order by id", (c,))] for c in self.companies}

    def _connect(self) -> psycopg.Connection:
        conn = psycopg.connect(self.dsn, autocommit=True, application_name="booking_guard_sim")
        conn.add_notice_handler(lambda notice: None)
        return conn

    def close(self) -> None:
        self.calcom.close()
        for conn in (self.conn, self.other):
            if conn is not None:
                conn.close()

    def run(self) -> None:
        try:
            while (n := self.shared.next_call()) is not None:
                try:
                    self.place_call(n)
                except Exception as error:   # recorded and reported: the soak fails on any
                    with self.shared.lock:
                        self.shared.errors.append(f"worker {self.number}, call #{n}: {type(error).__name__}: {error}")
                    if self.conn.closed or self.conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                        self.conn.close()
                        self.conn = self._connect()
                self.shared.finished_one()
                if self.config.think_time:
                    time.sleep(self.config.think_time * (0.5 + self.rng.random()))
        finally:
            self.close()

    # -- ground truth ------------------------------------------------------------------------

    def fault(self, kind: str, path: str, call_id: int | None, *, appointment_id: int | None = None,
              booking_id: str | None = None, outcome: str | None = None, **details: object) -> None:
        """Records an injected fault; called right after the transaction that injected it committed."""
        self.conn.execute(
            "insert into sim.faults (run_id, kind, path, expected, call_id, appointment_id, booking_id, outcome,"
            " committed_at, details) values (%s, %s, %s, %s, %s, %s, %s, %s, clock_timestamp(), %s)",
            (self.run_id, kind, path, EXPECTED[kind], call_id, appointment_id, booking_id, outcome, Jsonb(details)))
        with self.shared.lock:
            self.shared.faults[kind] += 1

    # -- one call --------------------------------------------------------------------------

    def place_call(self, n: int) -> None:
        rng = self.rng
        company = rng.choice(self.companies)
        service = rng.choice(self.services[company])
        books = rng.random() < self.config.booking_share
        kind = None
        if books and rng.random() < self.config.fault_rate:
            kinds = list(self.config.fault_mix)
            kind = rng.choices(kinds, weights=[self.config.fault_mix[k] for k in kinds])[0]
        direction = None if kind == "null_direction" else rng.choice(("inbound", "outbound"))
        retell = f"sim-{self.run_id}-{n}"
        call_id = self.conn.execute(
            "insert into calls (retell_call_id, company_id, direction) values (%s, %s, %s) returning id",
            (retell, company, direction)).fetchone()[0]
        if kind == "null_direction":
            self.fault(kind, "raw_sql", call_id)
        if not books:
            self.conn.execute("update calls set session_outcome = %s, call_successful = true, updated_at = now()"
                              " where id = %s", (rng.choice(("information_provided", "no_availability", "hung_up")),
                                                 call_id))
            return
        details = {"call": retell, "service_id": service, "start": f"2026-12-{1 + n % 28:02d}T{8 + n % 9:02d}:00Z"}
        uid = self.book_in_calcom(call_id, service, details)
        if uid is None:
            return
        appointment = {"company_id": company, "service_id": service, "starts_at": details["start"],
                       "status": "confirmed"}
        if kind in (None, "null_direction"):
            self.book_clean(call_id, uid, appointment)
        else:
            getattr(self, f"inject_{kind}")(call_id, uid, appointment, service, details)

    def book_in_calcom(self, call_id: int, service: int, details: dict) -> str | None:
        """The Cal.com booking under the breaker; on failure the call goes to the review queue, as an unguarded application's
        queueManualBooking does, and the failure is ground truth."""
        key = f"appointment_booking:service:{service}"
        try:
            with circuit(self.conn, key):
                return self.calcom.book(details)
        except (CalcomError, CircuitOpen) as error:
            rejected = isinstance(error, CircuitOpen)
            if rejected:
                with self.shared.lock:
                    self.shared.rejections += 1
            with self.conn.transaction():
                self.conn.execute("update calls set session_outcome = 'booking_failed', call_successful = false,"
                                  " updated_at = now() where id = %s", (call_id,))
                self.conn.execute("select booking_guard.queue_for_review(%s, 'calcom_booking_failed', %s)",
                                  (call_id, Jsonb({"circuit_key": key, "error": str(error), "booking": details})))
            self.fault("calcom_failure", "calcom", call_id, outcome="rejected_by_breaker" if rejected else "http_error",
                       error=str(error))
            return None

    def book_clean(self, call_id: int, uid: str, appointment: dict) -> None:
        if self.rng.random() < self.config.raw_sql_share:
            with self.conn.transaction():
                self.raw_booking(self.conn, call_id, uid, appointment)
                self.ledger(call_id, uid, "raw_sql")
        else:
            with self.conn.transaction():
                result = record_booking(self.conn, call_id, uid, appointment)
                if result.success:
                    self.ledger(call_id, uid, "record_booking")
            if not result.success:
                raise RuntimeError(f"a clean booking failed validation: {result.reason} {result.details}")

    def ledger(self, call_id: int, uid: str, path: str, conn: psycopg.Connection | None = None) -> None:
        (conn or self.conn).execute("insert into sim.bookings (run_id, call_id, booking_id, path) values (%s, %s, %s, %s)",
                                    (self.run_id, call_id, uid, path))

    @staticmethod
    def raw_booking(conn: psycopg.Connection, call_id: int, uid: str, appointment: dict) -> int:
        """The application's createLocalRecord then trackBooking, as plain SQL; the appointment's id."""
        appointment_id = conn.execute(
            "insert into appointments (call_id, calcom_v2_booking_id, company_id, service_id, starts_at, status)"
            " values (%s, %s, %s, %s, %s, %s) returning id",
            (call_id, uid, appointment["company_id"], appointment["service_id"], appointment["starts_at"],
             appointment["status"])).fetchone()[0]
        conn.execute("update calls set appointment_made = true, session_outcome = 'appointment_booked', booking_id = %s,"
                     " booking_confirmed = true, call_successful = true, updated_at = now() where id = %s",
                     (uid, call_id))
        return appointment_id

    # -- the faults --------------------------------------------------------------------------

    def inject_local_insert_failed(self, call_id: int, uid: str, appointment: dict, service: int, details: dict) -> None:
        # createLocalRecord fails (here: an appointment that ends before it starts) ...
        try:
            with self.conn.transaction():
                self.conn.execute(
                    "insert into appointments (call_id, calcom_v2_booking_id, company_id, service_id, starts_at, ends_at)"
                    " values (%s, %s, %s, %s, %s::timestamptz, %s::timestamptz - interval '1 hour')",
                    (call_id, uid, appointment["company_id"], service, appointment["starts_at"], appointment["starts_at"]))
        except psycopg.errors.CheckViolation:
            pass
        else:
            raise RuntimeError("the failing appointment insert did not fail")
        # ... and trackBooking says booked anyway (a phantom booking: the flag is left false)
        self.conn.execute("update calls set session_outcome = 'appointment_booked', booking_id = %s,"
                          " booking_details = %s, updated_at = now() where id = %s", (uid, Jsonb(details), call_id))
        self.fault("local_insert_failed", "raw_sql", call_id, booking_id=uid)

    def inject_worker_died(self, call_id: int, uid: str, appointment: dict, service: int, details: dict) -> None:
        self.conn.execute("update calls set appointment_made = true, session_outcome = 'appointment_booked',"
                          " appointment_link_status = 'linked', booking_id = %s, updated_at = now() where id = %s",
                          (uid, call_id))
        self.fault("worker_died", "raw_sql", call_id, booking_id=uid)
        # the worker dies: its connection goes away without a goodbye, and a new worker takes its place
        self.conn.close()
        self.conn = self._connect()

    def inject_orphan_appointment(self, call_id: int, uid: str, appointment: dict, service: int, details: dict) -> None:
        # the calendar's webhook wrote the appointment before (and without) its call; the call knows the booking id
        with self.conn.transaction():
            self.conn.execute("update calls set booking_id = %s, updated_at = now() where id = %s", (uid, call_id))
            appointment_id = self.conn.execute(
                "insert into appointments (call_id, calcom_v2_booking_id, company_id, service_id, starts_at, status)"
                " values (null, %s, %s, %s, %s, %s) returning id",
                (uid, appointment["company_id"], service, appointment["starts_at"], appointment["status"])).fetchone()[0]
        self.fault("orphan_appointment", "raw_sql", call_id, appointment_id=appointment_id, booking_id=uid)

    def inject_appointment_deleted(self, call_id: int, uid: str, appointment: dict, service: int, details: dict) -> None:
        with self.conn.transaction():
            appointment_id = self.raw_booking(self.conn, call_id, uid, appointment)
            self.ledger(call_id, uid, "raw_sql")
        self.conn.execute("delete from appointments where id = %s", (appointment_id,))
        self.fault("appointment_deleted", "raw_sql", call_id, appointment_id=appointment_id, booking_id=uid,
                   outcome="deleted")

    def inject_double_booking(self, call_id: int, uid: str, appointment: dict, service: int, details: dict) -> None:
        # A second worker took the same call and booked it in Cal.com too; both record their booking at once.
        try:
            second = self.calcom.book({**details, "by": "second worker"})
        except CalcomError:
            # Cal.com refused the second worker: no double booking happened, the first books as usual
            self.book_clean(call_id, uid, appointment)
            return
        if self.other is None or self.other.closed:
            self.other = self._connect()
        outcome: dict[str, object] = {}

        def second_worker() -> None:
            try:
                with self.other.transaction():
                    result = record_booking(self.other, call_id, second, appointment)
                    if result.success:
                        self.ledger(call_id, second, "record_booking", self.other)
                outcome["second"] = result.reason
            except Exception as error:
                outcome["second"] = f"error: {error}"

        with self.conn.transaction():
            first = record_booking(self.conn, call_id, uid, appointment)
            if first.success:
                self.ledger(call_id, uid, "record_booking")
            thread = threading.Thread(target=second_worker, name="second-worker")
            thread.start()   # its update of the call waits for this transaction's lock, or runs after it
        thread.join(60)
        if thread.is_alive():
            raise RuntimeError("the second worker of a double booking did not finish in 60 s")
        self.fault("double_booking", "record_booking", call_id, booking_id=second,
                   outcome=f"first {first.reason}, second {outcome['second']}", first_booking_id=uid)

    def inject_retry_double_booked(self, call_id: int, uid: str, appointment: dict, service: int, details: dict) -> None:
        if self.rng.random() < 0.5:
            # through record_booking: the retry finds the booking recorded and writes nothing
            with self.conn.transaction():
                record_booking(self.conn, call_id, uid, appointment)
                self.ledger(call_id, uid, "record_booking")
            retry = record_booking(self.conn, call_id, uid, appointment)
            self.fault("retry_double_booked", "record_booking", call_id, appointment_id=retry.appointment_id,
                       booking_id=uid, outcome="created" if retry.created else "idempotent")
        else:
            # the application's createLocalRecord retried after a timeout that had in fact committed
            with self.conn.transaction():
                self.raw_booking(self.conn, call_id, uid, appointment)
                self.ledger(call_id, uid, "raw_sql")
            with self.conn.transaction():
                appointment_id = self.raw_booking(self.conn, call_id, uid, appointment)
            self.fault("retry_double_booked", "raw_sql", call_id, appointment_id=appointment_id, booking_id=uid,
                       outcome="second appointment committed")


class _Driver(threading.Thread):
    """Runs one SQL statement every `every` seconds until stopped (verify_due, run_monitor)."""

    def __init__(self, dsn: str, name: str, query: str, every: float, stop: threading.Event, errors: list[str]) -> None:
        super().__init__(name=name, daemon=True)
        self.dsn, self.query, self.every, self.stop, self.errors = dsn, query, every, stop, errors
        self.runs = 0

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True, application_name=f"booking_guard_sim_{self.name}") as conn:
            conn.add_notice_handler(lambda notice: None)
            while not self.stop.wait(self.every):
                try:
                    conn.execute(self.query).fetchall()
                    self.runs += 1
                except psycopg.errors.DeadlockDetected as error:
                    # the next period runs it again; counted so that the report shows it
                    self.errors.append(f"{self.name}: {error}")


class _Listener(threading.Thread):
    """LISTEN booking_guard_alert: every alert id notified (only committed alerts are notified)."""

    def __init__(self, dsn: str, stop: threading.Event) -> None:
        super().__init__(name="alert-listener", daemon=True)
        self.stop = stop
        self.ids: set[int] = set()
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.conn.execute("listen booking_guard_alert")

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                for notify in self.conn.notifies(timeout=0.2):
                    self.ids.add(int(notify.payload))
            for notify in self.conn.notifies(timeout=0.2):   # what was sent before stop
                self.ids.add(int(notify.payload))
        finally:
            self.conn.close()


def settle(dsn: str, grace: float) -> dict:
    """The end of a run: wait out the grace of the last claims, judge them, monitor, reconcile, monitor."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.add_notice_handler(lambda notice: None)
        deadline = time.monotonic() + grace + 30
        # bounded: every due verification falls due within the grace
        while conn.execute("select exists (select from booking_guard.due_verifications"
                           " where due_at > clock_timestamp())").fetchone()[0]:
            if time.monotonic() > deadline:
                raise RuntimeError("due verifications still waiting 30 s after their grace")
            time.sleep(0.1)
        verified = conn.execute("select count(*) from booking_guard.verify_due()").fetchone()[0]
        first = conn.execute("select booking_guard.run_monitor()").fetchone()[0]
        reconciled = conn.execute("select booking_guard.reconcile()").fetchone()[0]
        second = conn.execute("select booking_guard.run_monitor()").fetchone()[0]
    return {"verified": verified, "monitor": first, "reconcile": reconciled, "monitor_after": second}


def run(dsn: str, config: SimConfig, progress: Callable[[int, int], None] | None = None) -> tuple[SimResult, dict]:
    """Prepares the database, runs the workload, settles it; returns the result and what settle() did."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.add_notice_handler(lambda notice: None)
        run_id = prepare(conn, config)
    started = time.monotonic()
    stop = threading.Event()            # the listener: until everything is settled
    stop_drivers = threading.Event()    # verify_due, run_monitor, fold_metrics: until the workers are done
    driver_errors: list[str] = []
    with FakeCalcom(latency=config.calcom_latency, failure_rate=config.calcom_failure_rate, seed=config.seed,
                    max_lifetime=7200) as calcom:
        shared = _Shared(config, calcom, progress)
        listener = _Listener(dsn, stop)
        drivers = [_Driver(dsn, "verify_due", "select * from booking_guard.verify_due()", config.verify_every,
                           stop_drivers, driver_errors),
                   _Driver(dsn, "run_monitor", f"select booking_guard.run_monitor('{config.monitor_window}')",
                           config.monitor_every, stop_drivers, driver_errors),
                   _Driver(dsn, "fold_metrics", "select booking_guard.fold_metrics()", config.verify_every, stop_drivers,
                           driver_errors)]
        workers = [Worker(i, dsn, run_id, shared) for i in range(config.workers)]
        threads = [threading.Thread(target=w.run, name=f"worker-{w.number}") for w in workers]
        for t in [listener, *drivers, *threads]:
            t.start()
        for t in threads:
            t.join()
        seconds = time.monotonic() - started
        # the drivers stop before the settling runs the same jobs (a verify_due() and a run_monitor() at
        # once can deadlock on one call: the driver runs it again next period, the settling would fail)
        stop_drivers.set()
        for t in drivers:
            t.join(30)
        settled = settle(dsn, config.grace)
        stop.set()
        listener.join(30)
        ledger = dict(calcom.ledger)
        counts = dict(calcom.counts)
    with psycopg.connect(dsn, autocommit=True) as conn:
        stats = {"seconds": round(seconds, 2), "faults": dict(shared.faults), "calcom": counts,
                 "worker_errors": len(shared.errors), "rejections": shared.rejections}
        conn.execute("update sim.runs set finished_at = clock_timestamp(), stats = %s where id = %s",
                     (Jsonb(stats), run_id))
    result = SimResult(run_id=run_id, calls=config.calls, seconds=seconds, fault_counts=dict(shared.faults),
                       calcom=counts, calcom_ledger=ledger, notified_alerts=listener.ids, worker_errors=shared.errors,
                       driver_errors=driver_errors, breaker_rejections=shared.rejections,
                       verify_runs=drivers[0].runs, monitor_runs=drivers[1].runs)
    return result, settled
