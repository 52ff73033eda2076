"""The circuit breaker across real sessions: exact half-open admission and exactly one trip under
32-way races, no lock held between acquire and record, NOTIFY, the error's fields, roles, dump/restore.

Time is moved with booking_guard.clock_offset or stopped with booking_guard.clock_at (superuser only),
never slept through."""

import json
import subprocess
import threading
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from conftest import pg_tool, tool_args
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

SESSIONS = 32


def trip(conn: psycopg.Connection, key: str, failures: int = 3) -> None:
    for i in range(failures):
        conn.execute("select booking_guard.circuit_record_failure(%s, %s)", (key, f"down {i}"))
    assert conn.execute("select state from booking_guard.circuit_breakers where key = %s", (key,)).fetchone()[0] == "open"


def race(conns: list[psycopg.Connection], work) -> list:
    """Runs work(conn) in one thread per connection, all released at once; returns the outcomes."""
    barrier = threading.Barrier(len(conns))
    outcomes: list = [None] * len(conns)

    def run(i: int, conn: psycopg.Connection) -> None:
        barrier.wait()
        try:
            outcomes[i] = ("ok", work(conn))
        except psycopg.Error as error:
            outcomes[i] = (error.sqlstate, error)

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a session hung"
    return outcomes


def sessions(connect, n: int = SESSIONS, offset: str | None = None) -> list[psycopg.Connection]:
    conns = [connect() for _ in range(n)]
    if offset is not None:
        for c in conns:
            c.execute("select set_config('booking_guard.clock_offset', %s, false)", (offset,))
    return conns


@pytest.mark.parametrize("max_calls", [1, 3])
def test_32_sessions_racing_on_half_open_get_exactly_max_calls_permits(db, connect, max_calls):
    key = f"appointment_booking:service:{max_calls}"
    db.execute("""insert into booking_guard.circuit_policies (key_pattern, half_open_max_calls) values (%s, %s)""",
               (key, max_calls))
    conns = sessions(connect, offset="31 seconds")   # past the 30 s cooldown
    for round_ in range(5):
        if round_:
            db.execute("select booking_guard.circuit_reset(%s)", (key,))
        trip(db, key)
        outcomes = race(conns, lambda c: c.execute("select booking_guard.circuit_acquire(%s)", (key,)).fetchone()[0])
        kinds = Counter(kind for kind, _ in outcomes)
        assert kinds == {"ok": max_calls, "BG001": SESSIONS - max_calls}, (round_, kinds)
        rejected = [e for kind, e in outcomes if kind == "BG001"]
        assert all(json.loads(e.diag.message_detail) == {"key": key, "state": "half_open", "retry_after_seconds": 10}
                   for e in rejected)
        permits = db.execute("select count(*) from booking_guard.circuit_permits where key = %s", (key,)).fetchone()[0]
        assert permits == max_calls
        # exactly one open -> half_open, written by one of the admitted sessions
        assert db.execute("""select count(*) from booking_guard.circuit_transitions
                              where key = %s and to_state = 'half_open'""", (key,)).fetchone()[0] == round_ + 1


def test_32_sessions_failing_at_once_trip_exactly_once(db, connect):
    key = "appointment_booking:global"
    conns = sessions(connect)
    # every session holds a permit granted while closed, then all report failures at the same moment
    permits = [c.execute("select booking_guard.circuit_acquire(%s)", (key,)).fetchone()[0] for c in conns]
    by_conn = dict(zip(map(id, conns), permits, strict=True))
    outcomes = race(conns, lambda c: c.execute("select booking_guard.circuit_record_failure(%s, 'timeout', %s)",
                                               (key, by_conn[id(c)])).fetchone()[0])
    assert all(kind == "ok" for kind, _ in outcomes)
    states = Counter(state for _, state in outcomes)
    assert states == {"closed": 2, "open": SESSIONS - 2}   # the third failure opened it; the rest were late
    rows = db.execute("select from_state, to_state from booking_guard.circuit_transitions where key = %s", (key,)).fetchall()
    assert rows == [("closed", "open")]
    assert db.execute("select failure_count from booking_guard.circuit_breakers where key = %s", (key,)).fetchone()[0] == 3


def test_keys_are_isolated_under_concurrency_and_state_survives_reconnects(db, connect):
    conns = sessions(connect)
    keys = {id(c): f"appointment_booking:staff:{i}" for i, c in enumerate(conns)}

    def fail_three(c):
        return [c.execute("select booking_guard.circuit_record_failure(%s)", (keys[id(c)],)).fetchone()[0] for _ in range(3)]

    outcomes = race(conns, fail_three)
    assert all(result == ["closed", "closed", "open"] for _, result in outcomes)
    assert db.execute("""select count(*), count(distinct key) from booking_guard.circuit_transitions
                          where key like 'appointment_booking:staff:%'""").fetchone() == (SESSIONS, SESSIONS)
    assert db.execute("select booking_guard.circuit_state('appointment_booking:service:1')").fetchone()[0] == "closed"
    fresh = connect()
    assert fresh.execute("select booking_guard.circuit_state('appointment_booking:staff:0')").fetchone()[0] == "open"
    with pytest.raises(psycopg.Error) as caught:
        fresh.execute("select booking_guard.circuit_acquire('appointment_booking:staff:0')")
    assert caught.value.sqlstate == "BG001"


def test_nothing_is_held_between_acquire_and_record(db, connect):
    key = "appointment_booking:service:9"
    caller, other = connect(), connect()
    other.execute("set lock_timeout = '200ms'")
    trip(db, key)
    caller.execute("set booking_guard.clock_offset = '31 seconds'")
    other.execute("set booking_guard.clock_offset = '31 seconds'")
    permit = caller.execute("select booking_guard.circuit_acquire(%s)", (key,)).fetchone()[0]
    # the trial call is "running" in caller: it holds no lock at all
    assert caller.execute("""select count(*) from pg_locks l join pg_class c on c.oid = l.relation
                              where l.pid = pg_backend_pid() and c.relname like 'circuit%%'""").fetchone()[0] == 0
    assert db.execute("select count(*) from pg_locks where pid = %s and locktype in ('tuple', 'transactionid')",
                      (caller.info.backend_pid,)).fetchone()[0] == 0
    # another session is answered at once (a lock wait would end in 55P03 after 200 ms)
    with pytest.raises(psycopg.Error) as caught:
        other.execute("select booking_guard.circuit_acquire(%s)", (key,))
    assert caught.value.sqlstate == "BG001"
    assert other.execute("select booking_guard.circuit_record_failure(%s, 'late', 1)", (key,)).fetchone()[0] == "half_open"
    assert caller.execute("select booking_guard.circuit_record_success(%s, %s)", (key, permit)).fetchone()[0] == "half_open"


def test_closed_acquire_and_success_take_no_row_lock(db, connect):
    key = "appointment_booking:service:10"
    db.execute("select booking_guard.circuit_acquire(%s)", (key,))
    holder, caller = connect(autocommit=False), connect()
    caller.execute("set lock_timeout = '200ms'")
    holder.execute("select * from booking_guard.circuit_breakers where key = %s for update", (key,))
    try:
        # while another transaction holds the breaker row, the hot path still answers
        permit = caller.execute("select booking_guard.circuit_acquire(%s)", (key,)).fetchone()[0]
        assert caller.execute("select booking_guard.circuit_record_success(%s, %s)", (key, permit)).fetchone()[0] == "closed"
        # a failure must change the row, so it waits for the lock (and gives up after lock_timeout)
        with pytest.raises(psycopg.Error) as caught:
            caller.execute("select booking_guard.circuit_record_failure(%s)", (key,))
        assert caught.value.sqlstate == "55P03"
    finally:
        holder.rollback()


def test_transitions_are_notified_by_id(db, connect):
    """Any role may LISTEN on any channel: the notification carries the transition's id, and a
    listener with the monitor's rights reads the rest from circuit_transitions."""
    listener = connect()
    listener.execute("listen booking_guard_circuit")
    trip(db, "appointment_booking:service:11")
    db.execute("select booking_guard.circuit_reset('appointment_booking:service:11')")
    payloads = [int(n.payload) for n in listener.notifies(timeout=5, stop_after=2)]
    ids = [r[0] for r in db.execute("select id from booking_guard.circuit_transitions order by id").fetchall()]
    assert payloads == ids
    rows = db.execute("select key, from_state, to_state, reason from booking_guard.circuit_transitions "
                      "where id = any(%s) order by id", (payloads,)).fetchall()
    assert [r[:3] for r in rows] == [("appointment_booking:service:11", "closed", "open"),
                                     ("appointment_booking:service:11", "open", "closed")]
    assert rows[0][3] == "failure_threshold: 3 consecutive failures: down 2"


def test_rejection_error_carries_state_retry_after_and_hint(db):
    key = "appointment_booking:service:12"
    trip(db, key)
    with pytest.raises(psycopg.Error) as caught:
        db.execute("select booking_guard.circuit_acquire(%s)", (key,))
    diag = caught.value.diag
    assert diag.sqlstate == "BG001"
    assert diag.message_primary == f'circuit breaker "{key}" is open: call rejected'
    assert json.loads(diag.message_detail) == {"key": key, "state": "open", "retry_after_seconds": 30}
    assert "calcom_booking_failed" in diag.message_hint
    # raised by the function the client called: one line of context, not a stack of helpers
    assert diag.context.startswith("PL/pgSQL function booking_guard.circuit_acquire(text) line ")
    assert "\n" not in diag.context
    db.execute("set booking_guard.clock_offset = '20 seconds'")
    with pytest.raises(psycopg.Error) as caught:
        db.execute("select booking_guard.circuit_acquire(%s)", (key,))
    assert json.loads(caught.value.diag.message_detail)["retry_after_seconds"] == 10
    # rejected calls are fast fails, not failures
    assert db.execute("select failure_count from booking_guard.circuit_breakers where key = %s", (key,)).fetchone()[0] == 3
    assert db.execute("select booking_guard.circuit_fast_fail_total()").fetchone()[0] == 2


@pytest.fixture
def login_role(db):
    """A login role made for one test (roles are cluster-wide): yields a function that connects as it."""
    name = f"bg_circuit_{uuid.uuid4().hex[:8]}"
    created: list[str] = []

    def make(member_of: str) -> psycopg.Connection:
        db.execute(f"create role {name} login in role {member_of}")
        created.append(name)
        return psycopg.connect(host=db.info.host, port=db.info.port, user=name, dbname=db.info.dbname, autocommit=True)

    yield make
    for role in created:
        db.execute(f"drop role if exists {role}")


def test_app_role_uses_the_breaker_and_cannot_skew_its_clock(db, login_role):
    with login_role("booking_guard_app") as app:
        permit = app.execute("select booking_guard.circuit_acquire('appointment_booking:service:13')").fetchone()[0]
        assert app.execute("select booking_guard.circuit_record_failure('appointment_booking:service:13', 'x', %s)",
                           (permit,)).fetchone()[0] == "closed"
        assert app.execute("select booking_guard.circuit_state('appointment_booking:service:13')").fetchone()[0] == "closed"
        for statement in ("select booking_guard.circuit_reset('appointment_booking:service:13')",
                          "update booking_guard.circuit_breakers set failure_count = 0",
                          "select * from booking_guard.circuit_status"):
            with pytest.raises(psycopg.Error) as caught:
                app.execute(statement)
            assert caught.value.sqlstate == "42501", statement
        # the test clock is a superuser's knob: a skewed app could keep a breaker open for everyone
        app.execute("set booking_guard.clock_offset = '1 hour'")
        with pytest.raises(psycopg.Error) as caught:
            app.execute("select booking_guard.circuit_record_failure('appointment_booking:service:13')")
        assert caught.value.sqlstate == "BG005"
        assert "superusers" in caught.value.diag.message_primary
    assert db.execute("select failure_count from booking_guard.circuit_breakers "
                      "where key = 'appointment_booking:service:13'").fetchone()[0] == 1


def test_monitor_role_reads_status_without_writing(db, login_role):
    trip(db, "appointment_booking:service:14")
    db.execute("set booking_guard.clock_offset = '31 seconds'")
    with login_role("booking_guard_monitor") as monitor:
        monitor.execute("set booking_guard.clock_offset = '31 seconds'")   # refused for non-superusers ...
        with pytest.raises(psycopg.Error) as caught:
            monitor.execute("select state from booking_guard.circuit_status")
        assert caught.value.sqlstate == "BG005"
        monitor.execute("reset booking_guard.clock_offset")
        row = monitor.execute("""select state, retry_after is not null, opened_total
                                   from booking_guard.circuit_status where key = 'appointment_booking:service:14'""").fetchone()
        assert row == ("open", True, 1)
        assert monitor.execute("select booking_guard.circuit_fast_fail_total()").fetchone()[0] == 0
        with pytest.raises(psycopg.Error) as caught:
            monitor.execute("select booking_guard.circuit_acquire('appointment_booking:service:14')")
        assert caught.value.sqlstate == "42501"
    # ... and the superuser's skewed clock sees it half-open, without anything written
    assert db.execute("select state from booking_guard.circuit_status").fetchone()[0] == "half_open"
    assert db.execute("select count(*) from booking_guard.circuit_transitions").fetchone()[0] == 1


def test_dump_and_restore_keep_breakers_history_and_permit_order(db):
    db.execute("insert into booking_guard.circuit_policies (key_pattern, failure_threshold) values ('appointment_booking:%', 2)")
    db.execute("update booking_guard.circuit_policies set cooldown = '45 seconds' where key_pattern = '%'")
    old_permit = db.execute("select booking_guard.circuit_acquire('appointment_booking:global')").fetchone()[0]
    trip(db, "appointment_booking:global", failures=2)
    db.execute("select booking_guard.circuit_force_open('other')")
    source, target = db.info.dbname, f"{db.info.dbname}_restored"
    admin = psycopg.connect(host=db.info.host, port=db.info.port, user=db.info.user, dbname="postgres", autocommit=True)
    try:
        admin.execute(f'drop database if exists "{target}"')
        admin.execute(f'create database "{target}"')
        dump = subprocess.run([pg_tool("pg_dump"), *tool_args(source)], check=True, capture_output=True, text=True)
        restore = subprocess.run([pg_tool("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", *tool_args(target)],
                                 input=dump.stdout, capture_output=True, text=True)
        assert restore.returncode == 0, restore.stderr
        with psycopg.connect(host=db.info.host, port=db.info.port, user=db.info.user, dbname=target,
                             autocommit=True) as restored:
            assert restored.execute("""select key_pattern, failure_threshold, cooldown::text from booking_guard.circuit_policies
                                        order by key_pattern""").fetchall() == [
                ("%", 3, "00:00:45"), ("appointment_booking:%", 2, "00:00:30")]
            assert restored.execute("select key, state from booking_guard.circuit_breakers order by key").fetchall() == [
                ("appointment_booking:global", "open"), ("other", "open")]
            assert restored.execute("select count(*) from booking_guard.circuit_transitions").fetchone()[0] == 2
            # the permit sequence continues: a new permit is newer than every restored transition
            restored.execute("select booking_guard.circuit_reset('appointment_booking:global')")
            new_permit = restored.execute("select booking_guard.circuit_acquire('appointment_booking:global')").fetchone()[0]
            assert new_permit > restored.execute("select max(id) from booking_guard.circuit_transitions").fetchone()[0]
            # so a failure reported with it counts, and the pre-dump permit's does not
            assert restored.execute("select booking_guard.circuit_record_failure('appointment_booking:global', 'x', %s)",
                                    (old_permit,)).fetchone()[0] == "closed"
            restored.execute("select booking_guard.circuit_record_failure('appointment_booking:global', 'x', %s)",
                             (new_permit,))
            assert restored.execute("""select failure_count from booking_guard.circuit_breakers
                                        where key = 'appointment_booking:global'""").fetchone()[0] == 1
    finally:
        admin.execute(f'drop database if exists "{target}" with (force)')
        admin.close()


# ---- the state machine against a model, on a stopped clock (exact boundaries included)

BASE = datetime(2030, 1, 1, tzinfo=UTC)
POLICY = {"failure_threshold": 3, "cooldown": 30, "success_threshold": 2, "half_open_max_calls": 2, "call_timeout": 10}


class Model:
    """The breaker's documented contract (docs/circuit-breaker.md) in plain Python, eager where the SQL is lazy."""

    def __init__(self) -> None:
        self.exists = False
        self.state, self.fc, self.sc = "closed", 0, 0
        self.opened_at: float | None = None
        self.forced_until: float | None = None
        self.trials: dict[int, tuple[float, float]] = {}   # permit -> (granted, expires)
        self.closed_permits: dict[int, int] = {}           # permit -> transitions when granted
        self.transitions: list[tuple[str, str, float]] = []

    def move(self, to: str, at: float) -> None:
        self.transitions.append((self.state, to, at))
        self.state = to
        self.trials.clear()

    def advance(self, now: float) -> None:
        while True:
            if self.state == "open":
                reopen = max(self.opened_at + POLICY["cooldown"], self.forced_until or float("-inf"))
                if now < reopen:
                    return
                self.move("half_open", reopen)
                self.sc, self.forced_until = 0, None
            elif self.state == "half_open":
                expired = sorted((e, p) for p, (_, e) in self.trials.items() if e < now)
                if not expired:
                    return
                at = expired[0][0]
                self.move("open", at)
                self.opened_at, self.sc, self.fc = at, 0, self.fc + 1
            else:
                return

    def acquire(self, now: float, permit: int | None) -> str | None:
        """None when admitted (the permit is the server's), else the state that rejected."""
        self.exists = True
        self.advance(now)
        if self.state == "closed":
            self.closed_permits[permit] = len(self.transitions)
            return None
        if self.state == "open" or len(self.trials) >= POLICY["half_open_max_calls"]:
            return self.state
        self.trials[permit] = (now, now + POLICY["call_timeout"])
        return None

    def record(self, now: float, permit: int | None, ok: bool) -> str:
        if not self.exists and ok:
            return "closed"
        self.exists = True
        self.advance(now)
        if self.state == "closed":
            counts = permit is None or self.closed_permits.get(permit) == len(self.transitions)
        elif self.state == "half_open":
            if permit is None and self.trials:
                permit = min(self.trials, key=lambda p: (self.trials[p][0], p))
            counts = self.trials.pop(permit, None) is not None
        else:
            counts = False
        if counts and ok:
            if self.state == "closed":
                self.fc = 0
            else:
                self.sc += 1
                if self.sc >= POLICY["success_threshold"]:
                    self.move("closed", now)
                    self.fc = self.sc = 0
        elif counts:
            self.fc += 1
            if self.state == "half_open" or self.fc >= POLICY["failure_threshold"]:
                self.move("open", now)
                self.opened_at, self.sc = now, 0
        return self.state

    def reset(self, now: float) -> bool:
        if not self.exists:
            return False
        self.advance(now)
        if self.state != "closed":
            self.move("closed", now)
        self.fc = self.sc = 0
        self.forced_until = None
        return True

    def force_open(self, now: float, until: float) -> bool:
        if until <= now:
            return False
        self.exists = True
        self.advance(now)
        if self.state != "open":
            self.move("open", now)
            self.opened_at = now
        self.sc, self.forced_until = 0, until
        return True


STEPS = st.sampled_from([0, 0, 1, 5, 9, 10, 11, 20, 29, 30, 31, 45])
OPS = st.lists(st.one_of(
    st.tuples(st.just("wait"), STEPS),
    st.tuples(st.just("wait"), st.sampled_from([10, 30])),
    st.tuples(st.just("acquire"), st.just(0)),
    st.tuples(st.just("acquire"), st.just(0)),
    st.tuples(st.just("failure"), st.just(-1)),
    st.tuples(st.just("success"), st.integers(-1, 6)),     # index of a permit obtained earlier; -1: none
    st.tuples(st.just("failure"), st.integers(-1, 6)),
    st.tuples(st.just("reset"), st.just(0)),
    st.tuples(st.just("force_open"), st.sampled_from([-5, 0, 10, 40, 100])),
), min_size=5, max_size=40)


F, W, A = ("failure", -1), ("wait", 30), ("acquire", 0)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
@example(ops=[F, F, F, W, A])                                        # the cooldown's end admits
@example(ops=[F, F, F, ("wait", 29), A, ("wait", 1), A])             # rejected at 29 s, admitted at 30 s
@example(ops=[F, F, F, ("wait", 31), A, ("wait", 10), A, A, ("wait", 1), A])   # a lease ends after 10 s, not at 10 s
@example(ops=[A, F, F, F, ("wait", 31), A, ("success", 0), ("success", 1), ("success", -1), A])   # stale and null permits
@example(ops=[F, F, F, ("wait", 31), A, A, ("success", 0), ("success", 1), A])   # two trial successes close it
def test_the_breaker_follows_the_model(db, ops):
    key = f"model:{uuid.uuid4().hex}"
    db.execute("""insert into booking_guard.circuit_policies
                  values ('model:%%', %(failure_threshold)s, %(cooldown)s * interval '1 second', %(success_threshold)s,
                          %(half_open_max_calls)s, %(call_timeout)s * interval '1 second')
                  on conflict do nothing""", POLICY)
    model, now, permits = Model(), 0.0, []

    def at(t: float) -> None:
        db.execute("select set_config('booking_guard.clock_at', %s, false)", ((BASE + timedelta(seconds=t)).isoformat(),))

    def call(sql: str, *args):
        try:
            return "ok", db.execute(sql, args).fetchone()[0]
        except psycopg.Error as error:
            return error.sqlstate, error

    at(now)
    try:
        for op, arg in ops:
            if op == "wait":
                now += arg
                at(now)
            elif op == "acquire":
                kind, value = call("select booking_guard.circuit_acquire(%s)", key)
                if kind == "ok":
                    permits.append(value)
                    assert model.acquire(now, value) is None, (op, now)
                else:
                    assert kind == "BG001"
                    assert model.acquire(now, None) == json.loads(value.diag.message_detail)["state"]
            elif op in ("success", "failure"):
                permit = permits[arg % len(permits)] if permits and arg >= 0 else None
                if op == "success":
                    kind, value = call("select booking_guard.circuit_record_success(%s, %s)", key, permit)
                else:
                    kind, value = call("select booking_guard.circuit_record_failure(%s, 'x', %s)", key, permit)
                assert (kind, value) == ("ok", model.record(now, permit, op == "success")), (op, permit, now)
            elif op == "reset":
                kind, _ = call("select (booking_guard.circuit_reset(%s)).state", key)
                assert (kind == "ok") == model.reset(now)
                assert kind in ("ok", "BG004")
            else:
                until = BASE + timedelta(seconds=now + arg)
                kind, _ = call("select (booking_guard.circuit_force_open(%s, %s)).state", key, until)
                assert (kind == "ok") == model.force_open(now, now + arg)
                assert kind in ("ok", "BG005")
            model.advance(now)
            assert db.execute("select booking_guard.circuit_state(%s)", (key,)).fetchone()[0] == model.state, (op, now)
        # the log: what is written is the model's history, the rest is pending (and counted by circuit_status)
        written = db.execute("""select from_state, to_state, extract(epoch from at - %s)::float8
                                  from booking_guard.circuit_transitions where key = %s order by id""", (BASE, key)).fetchall()
        assert written == model.transitions[:len(written)]
        if model.exists:
            status = db.execute("""select state_changes_total, opened_total, failure_count, success_count
                                     from booking_guard.circuit_status where key = %s""", (key,)).fetchone()
            opens = sum(1 for _, to, _ in model.transitions if to == "open")
            assert status == (len(model.transitions), opens, model.fc, model.sc)
    finally:
        db.execute("reset booking_guard.clock_at")


# ---- policies with rates: exact under races, and against a model of resilience4j's count-based window

RATE_POLICY = """insert into booking_guard.circuit_policies
                     (key_pattern, sliding_window_type, sliding_window_size, minimum_number_of_calls, half_open_max_calls)
                 values (%s, 'count_based', %s, %s, %s)"""


def window(db: psycopg.Connection, key: str) -> tuple:
    return db.execute("select b.state, w.calls, w.failures, w.slow_calls from booking_guard.circuit_breakers b "
                      "join booking_guard_internal.circuit_windows w using (key) where key = %s", (key,)).fetchone()


def test_32_sessions_failing_at_once_under_a_failure_rate_trip_exactly_once(db, connect):
    key = "rated:global"
    db.execute(RATE_POLICY, ("rated:%", 10, 10, 1))
    conns = sessions(connect)
    for _ in range(5):
        db.execute("select booking_guard.circuit_record_success(%s, booking_guard.circuit_acquire(%s), '100 ms')", (key, key))
    permits = {id(c): c.execute("select booking_guard.circuit_acquire(%s)", (key,)).fetchone()[0] for c in conns}
    outcomes = race(conns, lambda c: c.execute("select booking_guard.circuit_record_failure(%s, 'timeout', %s, '1 s')",
                                               (key, permits[id(c)])).fetchone()[0])
    assert all(kind == "ok" for kind, _ in outcomes)
    # in whatever order the row lock serialised them: 4 failures below the minimum of 10 calls, the
    # 5th makes 5 of 10 (50 %) and opens it, the other 27 come while it is open and count for nothing
    assert Counter(state for _, state in outcomes) == {"closed": 4, "open": SESSIONS - 4}
    assert db.execute("select from_state, to_state, reason from booking_guard.circuit_transitions where key = %s",
                      (key,)).fetchall() == [("closed", "open", "failure_rate: 5 of 10 calls failed (50.00% >= 50.00%): timeout")]
    assert window(db, key) == ("open", 10, 5, 0)


def test_results_from_32_sessions_are_all_in_the_window(db, connect):
    """No result is lost or counted twice when sessions report at once (no trip: below the minimum)."""
    key = "rated:busy"
    db.execute(RATE_POLICY, ("rated:%", 1000, 1000, 1))
    conns = sessions(connect)

    def report(c: psycopg.Connection) -> int:
        failures = 0
        for i in range(30):
            permit = c.execute("select booking_guard.circuit_acquire(%s)", (key,)).fetchone()[0]
            if (permit + i) % 3 == 0:
                c.execute("select booking_guard.circuit_record_failure(%s, 'x', %s, '2 minutes')", (key, permit))
                failures += 1
            else:
                c.execute("select booking_guard.circuit_record_success(%s, %s, '1 second')", (key, permit))
        return failures

    outcomes = race(conns, report)
    assert all(kind == "ok" for kind, _ in outcomes)
    failed = sum(n for _, n in outcomes)
    assert window(db, key) == ("closed", SESSIONS * 30, failed, failed)


def test_32_sessions_racing_on_half_open_with_rates_share_the_permitted_calls_in_all(db, connect):
    key = "rated:service:1"
    db.execute(RATE_POLICY, ("rated:%", 10, 10, 3))
    db.execute("select booking_guard.circuit_force_open(%s, clock_timestamp() + interval '1 second')", (key,))
    conns = sessions(connect, offset="31 seconds")
    outcomes = race(conns, lambda c: c.execute("select booking_guard.circuit_acquire(%s)", (key,)).fetchone()[0])
    assert Counter(kind for kind, _ in outcomes) == {"ok": 3, "BG001": SESSIONS - 3}
    admitted = [permit for kind, permit in outcomes if kind == "ok"]
    success = "select booking_guard.circuit_record_success(%s, %s, '1 s')"
    assert conns[0].execute(success, (key, admitted[0])).fetchone()[0] == "half_open"
    # a reported trial frees no slot: the three trial calls of this half-open period are given
    outcomes = race(conns, lambda c: c.execute("select * from booking_guard.circuit_try_acquire(%s)", (key,)).fetchone())
    assert all(kind == "ok" and not row[0] and row[1] == "half_open" for kind, row in outcomes)
    assert conns[0].execute("select booking_guard.circuit_record_failure(%s, 'x', %s, '1 s')",
                            (key, admitted[1])).fetchone()[0] == "half_open"
    assert conns[0].execute(success, (key, admitted[2])).fetchone()[0] == "closed"


def test_32_sessions_under_composed_scopes_share_the_global_trial(db, connect):
    db.execute("select booking_guard.circuit_force_open('appointment_booking:global', clock_timestamp() + interval '1 second')")
    conns = sessions(connect, offset="31 seconds")
    scopes = {id(c): ["appointment_booking:global", f"appointment_booking:service:{i}"] for i, c in enumerate(conns)}
    outcomes = race(conns, lambda c: c.execute("select booking_guard.circuit_acquire(%s::text[])",
                                               (scopes[id(c)],)).fetchone()[0])
    assert Counter(kind for kind, _ in outcomes) == {"ok": 1, "BG001": SESSIONS - 1}
    refused_by = {json.loads(e.diag.message_detail)["key"] for kind, e in outcomes if kind == "BG001"}
    assert refused_by == {"appointment_booking:global"}
    permit = next(p for kind, p in outcomes if kind == "ok")
    assert db.execute("select key from booking_guard.circuit_permits where permit = %s", (permit,)).fetchall() == [
        ("appointment_booking:global",)]
    # a refused call leaves nothing behind (not even its service's new breaker), and is a fast fail
    assert db.execute("select count(*) from booking_guard.circuit_breakers where key like 'appointment_booking:service:%%'"
                      ).fetchone()[0] == 1
    assert db.execute("select booking_guard.circuit_fast_fail_total()").fetchone()[0] == SESSIONS - 1


RATE = {"size": 4, "minimum": 3, "permitted": 2, "failure_rate": 50, "slow_rate": 50, "slow_after": 1.0,
        "cooldown": 30, "call_timeout": 10}


class RateModel:
    """resilience4j's count-based breaker with booking_guard's leases and late permits, in plain Python:
    the window holds the last `size` calls and opens the breaker at `minimum` calls (at most `size`)
    when a rate reaches its threshold; half-open admits `permitted` trial calls in all and decides
    on their rates once min(minimum, permitted) have reported; a trial lease that runs out is a
    failed (and, past slow_after, slow) trial call at its end."""

    def __init__(self) -> None:
        self.exists = False
        self.state = "closed"
        self.window: list[tuple[bool, bool]] = []     # (failed, slow), oldest first
        self.trial = [0, 0, 0]                         # half-open: calls, failures, slow calls reported
        self.reopened = False                          # open because of the trial calls (their counts stay on show)
        self.opened_at = 0.0
        self.trials: dict[int, tuple[float, float]] = {}
        self.closed_permits: dict[int, int] = {}
        self.transitions: list[tuple[str, str, float]] = []

    def move(self, to: str, at: float) -> None:
        self.reopened = self.state == "half_open" and to == "open"
        self.transitions.append((self.state, to, at))
        self.state = to
        self.trials.clear()
        if to != "open":
            self.window, self.trial = [], [0, 0, 0]

    @staticmethod
    def exceeded(calls: int, failures: int, slow: int) -> bool:
        return failures * 100 >= RATE["failure_rate"] * calls or slow * 100 >= RATE["slow_rate"] * calls

    def trial_result(self, failed: bool, slow: bool, at: float) -> None:
        self.trial = [self.trial[0] + 1, self.trial[1] + failed, self.trial[2] + slow]
        if self.trial[0] >= min(RATE["minimum"], RATE["permitted"]):
            if self.exceeded(*self.trial):
                self.move("open", at)
                self.opened_at = at
            else:
                self.move("closed", at)

    def advance(self, now: float) -> None:
        while True:
            if self.state == "open" and now >= self.opened_at + RATE["cooldown"]:
                self.move("half_open", self.opened_at + RATE["cooldown"])
            elif self.state == "half_open":
                expired = sorted((e, p) for p, (_, e) in self.trials.items() if e < now)
                if not expired:
                    return
                at, permit = expired[0]
                del self.trials[permit]
                self.trial_result(True, RATE["call_timeout"] > RATE["slow_after"], at)
            else:
                return

    def acquire(self, now: float, permit: int | None) -> str | None:
        self.exists = True
        self.advance(now)
        if self.state == "closed":
            self.closed_permits[permit] = len(self.transitions)
            return None
        if self.state == "open" or len(self.trials) + self.trial[0] >= RATE["permitted"]:
            return self.state
        self.trials[permit] = (now, now + RATE["call_timeout"])
        return None

    def record(self, now: float, permit: int | None, ok: bool, took: float) -> str:
        if not self.exists and ok:
            return "closed"
        self.exists = True
        self.advance(now)
        slow = took > RATE["slow_after"]
        if self.state == "closed":
            if permit is None or self.closed_permits.get(permit) == len(self.transitions):
                self.window = (self.window + [(not ok, slow)])[-RATE["size"]:]
                calls, failures, slows = len(self.window), sum(f for f, _ in self.window), sum(s for _, s in self.window)
                if calls >= min(RATE["minimum"], RATE["size"]) and self.exceeded(calls, failures, slows):
                    self.move("open", now)
                    self.opened_at = now
        elif self.state == "half_open":
            if permit is None and self.trials:
                permit = min(self.trials, key=lambda p: (self.trials[p][0], p))
            if self.trials.pop(permit, None) is not None:
                self.trial_result(not ok, slow, now)
        return self.state

    def reset(self, now: float) -> bool:
        if not self.exists:
            return False
        self.advance(now)
        if self.state != "closed":
            self.move("closed", now)
        self.window, self.trial = [], [0, 0, 0]
        return True

    def counts(self) -> tuple[int, int, int]:
        if self.state == "half_open" or self.reopened:
            return tuple(self.trial)
        return len(self.window), sum(f for f, _ in self.window), sum(s for _, s in self.window)


RATE_OPS = st.lists(st.one_of(
    st.tuples(st.just("wait"), st.sampled_from([0, 1, 5, 9, 10, 11, 29, 30, 31])),
    st.tuples(st.just("acquire"), st.just(0)),
    st.tuples(st.just("acquire"), st.just(0)),
    st.tuples(st.sampled_from(["success", "failure"]), st.tuples(st.integers(-1, 6), st.sampled_from([0.5, 1.0, 2.0]))),
    st.tuples(st.sampled_from(["success", "failure"]), st.tuples(st.just(-1), st.sampled_from([0.5, 2.0]))),
    st.tuples(st.just("reset"), st.just(0)),
), min_size=5, max_size=45)

S, Fl = ("success", (-1, 0.5)), ("failure", (-1, 0.5))


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=RATE_OPS)
@example(ops=[A, Fl, Fl, S, ("wait", 30), A, A, A, ("success", (1, 0.5)), ("success", (2, 0.5))])   # opens, 2 trials close it
@example(ops=[A, Fl, S, Fl, ("wait", 30), A, ("wait", 11), A, A])             # a lost trial fails; the next decides
@example(ops=[A, S, S, ("success", (-1, 2.0)), ("failure", (-1, 2.0)), S, S, S])   # slow calls, then the window slides
@example(ops=[A, S, ("success", (-1, 2.0)), ("success", (0, 2.0)), ("wait", 30), A, A, ("wait", 11)])   # both leases end
def test_the_rate_breaker_follows_the_model(db, ops):
    key = f"ratemodel:{uuid.uuid4().hex}"
    db.execute("""insert into booking_guard.circuit_policies
                      (key_pattern, sliding_window_type, sliding_window_size, minimum_number_of_calls, half_open_max_calls,
                       failure_rate_threshold, slow_call_rate_threshold, slow_call_duration_threshold, cooldown, call_timeout)
                  values ('ratemodel:%%', 'count_based', %(size)s, %(minimum)s, %(permitted)s, %(failure_rate)s, %(slow_rate)s,
                          %(slow_after)s * interval '1 second', %(cooldown)s * interval '1 second',
                          %(call_timeout)s * interval '1 second')
                  on conflict do nothing""", RATE)
    model, now, permits = RateModel(), 0.0, []

    def at(t: float) -> None:
        db.execute("select set_config('booking_guard.clock_at', %s, false)", ((BASE + timedelta(seconds=t)).isoformat(),))

    at(now)
    try:
        for op, arg in ops:
            if op == "wait":
                now += arg
                at(now)
            elif op == "acquire":
                row = db.execute("select allowed, state, permit from booking_guard.circuit_try_acquire(%s)", (key,)).fetchone()
                if row[0]:
                    permits.append(row[2])
                    assert model.acquire(now, row[2]) is None, (op, now)
                else:
                    assert model.acquire(now, None) == row[1], (op, now)
            elif op in ("success", "failure"):
                index, took = arg
                permit = permits[index % len(permits)] if permits and index >= 0 else None
                if op == "success":
                    state = db.execute("select booking_guard.circuit_record_success(%s, %s, %s)",
                                       (key, permit, timedelta(seconds=took))).fetchone()[0]
                else:
                    state = db.execute("select booking_guard.circuit_record_failure(%s, 'x', %s, %s)",
                                       (key, permit, timedelta(seconds=took))).fetchone()[0]
                assert state == model.record(now, permit, op == "success", took), (op, permit, now)
            else:
                try:
                    db.execute("select booking_guard.circuit_reset(%s)", (key,))
                    assert model.reset(now)
                except psycopg.Error as error:
                    assert error.sqlstate == "BG004" and not model.reset(now)
            model.advance(now)
            if model.exists:
                status = db.execute("""select state, window_calls, window_failures, window_slow_calls
                                         from booking_guard.circuit_status where key = %s""", (key,)).fetchone()
                assert status == (model.state, *model.counts()), (op, now)
        written = db.execute("""select from_state, to_state, extract(epoch from at - %s)::float8
                                  from booking_guard.circuit_transitions where key = %s order by id""", (BASE, key)).fetchall()
        assert written == model.transitions[:len(written)]
    finally:
        db.execute("reset booking_guard.clock_at")
