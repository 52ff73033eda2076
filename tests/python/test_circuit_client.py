"""booking_guard.app's circuit(): acquire, record, and a typed CircuitOpen."""

import booking_guard.app as app
import psycopg
import pytest
from booking_guard.app import CircuitOpen, circuit
from booking_guard.app.circuit import CircuitOpen as CircuitOpenFromModule

KEY = "appointment_booking:service:42"


class SlotTaken(Exception):
    """A business answer from the booking service, not a failure of it."""


def breaker(conn: psycopg.Connection, key: str = KEY) -> tuple:
    return conn.execute("""select state, failure_count, success_count from booking_guard.circuit_breakers
                            where key = %s""", (key,)).fetchone()


def test_app_exports_the_circuit_breaker():
    assert app.circuit is circuit and CircuitOpen is CircuitOpenFromModule
    assert {"CircuitOpen", "circuit"} <= set(app.__all__)


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
