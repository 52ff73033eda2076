"""booking_guard.app's circuit(): acquire, record with the call's duration, a typed CircuitOpen read
from BG001's JSON DETAIL, composed scopes, and call_timeout (a worker thread, or asyncio for call_async)."""

import asyncio
import importlib
import threading

import booking_guard.app as app
import psycopg
import pytest
from booking_guard.app import CircuitOpen, circuit
from booking_guard.app.circuit import CallTimeout, call_async
from booking_guard.app.circuit import CircuitOpen as CircuitOpenFromModule

# the module itself: booking_guard.app's attribute `circuit` is the class it exports
circuit_module = importlib.import_module("booking_guard.app.circuit")

KEY = "appointment_booking:service:42"


class SlotTaken(Exception):
    """A business answer from the booking service, not a failure of it."""


def breaker(conn: psycopg.Connection, key: str = KEY) -> tuple:
    return conn.execute("""select state, failure_count, success_count from booking_guard.circuit_breakers
                            where key = %s""", (key,)).fetchone()


def test_app_exports_the_circuit_breaker():
    assert app.circuit is circuit and CircuitOpen is CircuitOpenFromModule
    assert {"CallTimeout", "CircuitOpen", "call_async", "circuit"} <= set(app.__all__)


def test_success_is_recorded_and_resets_the_streak(db):
    db.execute("select booking_guard.circuit_record_failure(%s, 'earlier')", (KEY,))
    with circuit(db, KEY) as permit:
        assert isinstance(permit, int) and permit > 0
    assert breaker(db) == ("closed", 0, 0)


def test_an_exception_is_recorded_as_a_failure_with_its_text_and_reraised(db):
    for _ in range(3):
        with pytest.raises(TimeoutError), circuit(db, KEY):
            raise TimeoutError("Cal.com did not answer in 10 s")
    assert breaker(db) == ("open", 3, 0)
    reason = db.execute("select reason from booking_guard.circuit_transitions where key = %s", (KEY,)).fetchone()[0]
    assert reason == "failure_threshold: 3 consecutive failures: TimeoutError: Cal.com did not answer in 10 s"


def test_rejection_raises_circuit_open_without_running_the_block(db):
    for _ in range(3):
        db.execute("select booking_guard.circuit_record_failure(%s)", (KEY,))
    ran = False
    with pytest.raises(CircuitOpen) as caught, circuit(db, KEY):
        ran = True
    assert not ran
    rejected = caught.value
    assert (rejected.key, rejected.state) == (KEY, "open")
    assert rejected.retry_after == 30.0
    assert isinstance(rejected.__cause__, psycopg.Error) and rejected.__cause__.sqlstate == "BG001"
    assert breaker(db) == ("open", 3, 0)   # a rejection is not a failure
    # the pattern of the README: hand the call to the review queue
    call_id = 7
    db.execute("select booking_guard.queue_for_review(%s, 'calcom_booking_failed', jsonb_build_object('circuit_key', %s::text))",
               (call_id, rejected.key))
    assert db.execute("select reason, priority from booking_guard.review_queue where call_id = %s", (call_id,)).fetchone() == (
        "calcom_booking_failed", 2)


def test_half_open_rejection_and_trial_results(db, connect):
    for _ in range(3):
        db.execute("select booking_guard.circuit_record_failure(%s)", (KEY,))
    trial, other = connect(), connect()
    for conn in (trial, other):
        conn.execute("set booking_guard.clock_offset = '31 seconds'")
    with circuit(trial, KEY):
        with pytest.raises(CircuitOpen) as caught, circuit(other, KEY):
            pass
        assert caught.value.state == "half_open"
        assert caught.value.retry_after == 10.0   # when the trial's lease ends
    assert breaker(db)[0] == "half_open" and breaker(db)[2] == 1
    with circuit(trial, KEY):
        pass
    assert breaker(db) == ("closed", 0, 0)


def test_forced_open_has_no_retry_after(db):
    db.execute("select booking_guard.circuit_force_open(%s)", (KEY,))
    with pytest.raises(CircuitOpen) as caught, circuit(db, KEY):
        pass
    assert caught.value.retry_after is None and caught.value.state == "open"


def test_ignored_exceptions_count_as_successes(db):
    db.execute("select booking_guard.circuit_record_failure(%s)", (KEY,))
    with pytest.raises(SlotTaken), circuit(db, KEY, ignore=(SlotTaken,)):
        raise SlotTaken("14:00 is gone")
    assert breaker(db) == ("closed", 0, 0)


def test_a_keyboard_interrupt_reports_nothing(db):
    with pytest.raises(KeyboardInterrupt), circuit(db, KEY):
        raise KeyboardInterrupt
    assert breaker(db) == ("closed", 0, 0)


def test_non_autocommit_connection_gets_its_own_transactions(connect):
    conn = connect(autocommit=False)
    with pytest.raises(ValueError), circuit(conn, KEY):
        raise ValueError("bad gateway")
    # committed: another session sees the failure
    assert breaker(connect()) == ("closed", 1, 0)
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_a_connection_inside_a_transaction_is_refused(connect):
    conn = connect(autocommit=False)
    conn.execute("select 1")   # opens a transaction
    with pytest.raises(RuntimeError, match="inside a transaction"), circuit(conn, KEY):
        pass
    conn.rollback()
    assert breaker(connect()) is None   # nothing acquired, nothing written


def test_circuit_open_parses_keys_with_commas(db):
    key = "appointment_booking:service:1, state: open, key: x"
    for _ in range(3):
        db.execute("select booking_guard.circuit_record_failure(%s)", (key,))
    with pytest.raises(CircuitOpen) as caught, circuit(db, key):
        pass
    assert caught.value.key == key


# ---- durations, composed scopes, call_timeout

RATED = "rated:service:1"


@pytest.fixture
def rated(db):
    """A rate policy for rated:*: a window of 4 calls, a call over 1 s is slow, 75 % slow calls open it."""
    db.execute("""insert into booking_guard.circuit_policies
                      (key_pattern, sliding_window_type, sliding_window_size, minimum_number_of_calls,
                       slow_call_duration_threshold, slow_call_rate_threshold)
                  values ('rated:%', 'count_based', 4, 4, '1 second', 75)""")
    return db


def window(conn: psycopg.Connection, key: str = RATED) -> tuple:
    return conn.execute("select calls, failures, slow_calls from booking_guard_internal.circuit_windows where key = %s",
                        (key,)).fetchone()


class Clock:
    """A stand-in for booking_guard.app.circuit's clock: each reading is `step` seconds after the last."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 1000.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_the_call_duration_is_reported_for_the_slow_call_rate(rated, monkeypatch):
    monkeypatch.setattr(circuit_module, "_clock", Clock(2.5))   # acquire at +2.5 s, the result at +5 s
    with circuit(rated, RATED):
        pass
    monkeypatch.setattr(circuit_module, "_clock", Clock(0.25))
    with circuit(rated, RATED):
        pass
    assert window(rated) == (2, 0, 1)
    assert rated.execute("select booking_guard.circuit_record_success(%s, null, '2 s')", (RATED,)).fetchone()[0] == "closed"
    assert rated.execute("select booking_guard.circuit_record_success(%s, null, '2 s')", (RATED,)).fetchone()[0] == "open"


def test_bg001_is_read_from_its_json_detail(db):
    key = 'appointment_booking:service:1 "quoted", {json}'
    for _ in range(3):
        db.execute("select booking_guard.circuit_record_failure(%s)", (key,))
    with pytest.raises(CircuitOpen) as caught, circuit(db, key):
        pass
    assert (caught.value.key, caught.value.state, caught.value.retry_after) == (key, "open", 30.0)
    assert str(caught.value) == f'circuit breaker "{key}" is open: call rejected'


def test_composed_scopes_are_refused_by_any_and_recorded_to_all(db):
    scopes = ["appointment_booking:service:3", "appointment_booking:staff:7", "appointment_booking:global"]
    with pytest.raises(ValueError), circuit(db, scopes):
        raise ValueError("502 from Cal.com")
    assert db.execute("select count(*) from booking_guard.circuit_breakers where failure_count = 1").fetchone()[0] == 3
    db.execute("select booking_guard.circuit_force_open('appointment_booking:staff:7')")
    ran = False
    with pytest.raises(CircuitOpen) as caught, circuit(db, scopes):
        ran = True
    assert not ran
    assert (caught.value.key, caught.value.retry_after) == ("appointment_booking:staff:7", None)
    with circuit(db, scopes[::2]):   # the same call without the staff scope
        pass
    assert breaker(db, "appointment_booking:global") == ("closed", 0, 0)


def test_call_returns_the_result_and_reports_success(db):
    assert circuit(db, KEY, call_timeout=30).call(lambda a, b: a + b, 2, b=3) == 5
    assert circuit(db, KEY).call(str.upper, "ok") == "OK"
    db.execute("select booking_guard.circuit_record_failure(%s)", (KEY,))
    assert circuit(db, KEY, call_timeout=30).call(int, "7") == 7
    assert breaker(db) == ("closed", 0, 0)


def test_call_reports_an_exception_of_the_worker_and_reraises_it(db):
    def fail() -> None:
        raise ConnectionError("Cal.com refused")

    def taken() -> None:
        raise SlotTaken("14:00 is gone")

    with pytest.raises(ConnectionError, match="Cal.com refused"):
        circuit(db, KEY, call_timeout=30).call(fail)
    assert breaker(db) == ("closed", 1, 0)
    with pytest.raises(SlotTaken):
        circuit(db, KEY, call_timeout=30, ignore=(SlotTaken,)).call(taken)
    assert breaker(db) == ("closed", 0, 0)   # a business answer is a success


def test_a_call_past_call_timeout_is_abandoned_and_counted_as_a_failure(db):
    release, finished = threading.Event(), threading.Event()

    def hang() -> str:
        release.wait()            # stands for a calendar API that does not answer
        finished.set()
        return "booked, too late"

    try:
        with pytest.raises(CallTimeout) as caught:
            circuit(db, KEY, call_timeout=0.2).call(hang)
        assert isinstance(caught.value, TimeoutError) and caught.value.call_timeout == 0.2
        assert breaker(db) == ("closed", 1, 0)
        assert not finished.is_set()   # reported while the call still runs
    finally:
        release.set()
    assert finished.wait(30)
    # the abandoned call finished afterwards: nothing more is reported
    assert breaker(db) == ("closed", 1, 0)


def test_an_abandoned_call_reports_its_error_text(db):
    release = threading.Event()
    db.execute("insert into booking_guard.circuit_policies (key_pattern, failure_threshold) values (%s, 1)", (KEY,))
    try:
        with pytest.raises(CallTimeout):
            circuit(db, KEY, call_timeout=0.1).call(release.wait)
    finally:
        release.set()
    reason = db.execute("select reason from booking_guard.circuit_transitions where key = %s", (KEY,)).fetchone()[0]
    assert reason == (f"failure_threshold: 1 consecutive failures: CallTimeout: the call under '{KEY}' "
                      "did not finish within 0.1 s and was abandoned")


def test_a_with_block_past_call_timeout_is_reported_as_a_failure_but_not_undone(db, monkeypatch):
    monkeypatch.setattr(circuit_module, "_clock", Clock(3.0))
    with circuit(db, KEY, call_timeout=2) as permit:
        result = "booked"
    assert result == "booked" and permit > 0
    assert breaker(db) == ("closed", 1, 0)


def test_call_timeout_must_be_positive(db):
    for bad in (0, -1.0):
        with pytest.raises(ValueError, match="call_timeout"):
            circuit(db, KEY, call_timeout=bad)
    assert breaker(db) is None


def test_call_async_cancels_a_coroutine_past_call_timeout(db):
    info = db.info
    cancelled = []

    async def hang() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    async def own_timeout() -> None:
        raise TimeoutError("the HTTP client's own timeout")

    async def book(n: int) -> int:
        return n * 2

    async def scenario() -> None:
        async with await psycopg.AsyncConnection.connect(host=info.host, port=info.port, user=info.user,
                                                         dbname=info.dbname, autocommit=True) as conn:
            assert await call_async(conn, KEY, book, 21, call_timeout=5) == 42
            with pytest.raises(CallTimeout):
                await call_async(conn, KEY, hang, call_timeout=0.1)
            with pytest.raises(TimeoutError) as caught:
                await call_async(conn, [KEY, "appointment_booking:global"], own_timeout, call_timeout=5)
            assert not isinstance(caught.value, CallTimeout)

    asyncio.run(scenario())
    assert cancelled == [True]
    assert breaker(db) == ("closed", 2, 0)
    assert breaker(db, "appointment_booking:global") == ("closed", 1, 0)


def test_call_async_raises_circuit_open(db):
    info = db.info
    db.execute("select booking_guard.circuit_force_open(%s)", (KEY,))
    ran = []

    async def book() -> None:
        ran.append(True)

    async def scenario() -> CircuitOpen:
        async with await psycopg.AsyncConnection.connect(host=info.host, port=info.port, user=info.user,
                                                         dbname=info.dbname, autocommit=True) as conn:
            with pytest.raises(CircuitOpen) as caught:
                await call_async(conn, KEY, book)
            return caught.value

    rejected = asyncio.run(scenario())
    assert not ran
    assert (rejected.key, rejected.state, rejected.retry_after) == (KEY, "open", None)
