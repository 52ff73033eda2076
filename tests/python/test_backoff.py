"""backoff_delay() in SQL and its Python twin: properties (hypothesis) and agreement; retry_with_backoff()."""

import math
from datetime import timedelta

import psycopg
import pytest
from booking_guard.app.booking import backoff_delay, retry_with_backoff
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# Durations in whole microseconds, as PostgreSQL's intervals hold them.
micros = st.integers(min_value=1, max_value=3_600_000_000).map(lambda us: us / 1_000_000)
attempts = st.integers(min_value=1, max_value=2**31 - 1)
small_attempts = st.integers(min_value=1, max_value=200)
factors = st.floats(min_value=1, max_value=100, allow_nan=False)
jitters = st.floats(min_value=0, max_value=1, allow_nan=False)
draws = st.floats(min_value=0, max_value=1, exclude_max=True, allow_nan=False)
strategies = st.sampled_from(["exponential", "full", "seed"])

DB_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

SQL = ("select extract(epoch from booking_guard.backoff_delay(%s, make_interval(secs => %s), %s,"
       " make_interval(secs => %s), %s, %s, %s))::float8")


def capped(attempt: int, base: float, factor: float, max_delay: float) -> float:
    """The exponential part, capped (what jitter is applied to)."""
    return backoff_delay(attempt, base, factor, max_delay, jitter=0.0, strategy="exponential", draw=0.0)


# ------------------------------------------------------------------------------- Python, pure

@given(attempt=attempts, base=micros, factor=factors, max_delay=micros, jitter=jitters, u=draws)
def test_exponential_within_bounds(attempt, base, factor, max_delay, jitter, u):
    cap = capped(attempt, base, factor, max_delay)
    delay = backoff_delay(attempt, base, factor, max_delay, jitter, "exponential", draw=u)
    assert 0 < cap <= max_delay
    assert cap <= delay <= cap * (1 + jitter)
    assert delay <= max_delay * (1 + jitter)


@given(attempt=attempts, base=micros, factor=factors, max_delay=micros, u=draws)
def test_full_jitter_never_above_the_cap(attempt, base, factor, max_delay, u):
    delay = backoff_delay(attempt, base, factor, max_delay, strategy="full", draw=u)
    assert 0 <= delay <= capped(attempt, base, factor, max_delay) <= max_delay


@given(attempt=small_attempts, base=micros, factor=factors, max_delay=micros)
def test_base_schedule_is_monotone(attempt, base, factor, max_delay):
    assert capped(attempt, base, factor, max_delay) <= capped(attempt + 1, base, factor, max_delay)


@given(attempt=st.integers(min_value=1, max_value=30))
def test_exponential_defaults_double_from_one_second(attempt):
    assert capped(attempt, 1.0, 2.0, 60.0) == min(60.0, 2.0 ** (attempt - 1))


@given(attempt=small_attempts, base=micros, factor=factors, max_delay=micros, jitter=jitters, u=draws)
def test_seed_is_the_former_name_of_exponential(attempt, base, factor, max_delay, jitter, u):
    assert backoff_delay(attempt, base, factor, max_delay, jitter, "seed", draw=u) == \
        backoff_delay(attempt, base, factor, max_delay, jitter, "exponential", draw=u)


@given(attempt=st.integers(max_value=0) | st.just(True))
def test_python_rejects_attempts_below_one(attempt):
    with pytest.raises(ValueError, match="attempt"):
        backoff_delay(attempt)


@given(jitter=st.floats(allow_nan=True).filter(lambda j: not 0 <= j <= 1))
def test_python_rejects_jitter_outside_0_1(jitter):
    with pytest.raises(ValueError, match="jitter"):
        backoff_delay(1, jitter=jitter)


def test_python_rejects_other_bad_arguments():
    for kwargs, word in (({"base": 0}, "base"), ({"max_delay": -1}, "max_delay"), ({"factor": 0.5}, "factor"),
                         ({"strategy": "decorrelated"}, "strategy"), ({"draw": 1.0}, "draw")):
        with pytest.raises(ValueError, match=word):
            backoff_delay(1, **kwargs)


# ------------------------------------------------------------------------------- SQL

@DB_SETTINGS
@given(attempt=attempts, base=micros, factor=factors, max_delay=micros, jitter=jitters, strategy=strategies, u=draws)
def test_sql_and_python_agree(db, attempt, base, factor, max_delay, jitter, strategy, u):
    in_sql = db.execute(SQL, (attempt, base, factor, max_delay, jitter, strategy, u)).fetchone()[0]
    in_python = backoff_delay(attempt, base, factor, max_delay, jitter, strategy, draw=u)
    assert math.isclose(in_sql, in_python, rel_tol=0, abs_tol=1e-6)   # intervals hold microseconds


@DB_SETTINGS
@given(attempt=attempts, base=micros, factor=factors, max_delay=micros, jitter=jitters, strategy=strategies)
def test_sql_random_within_bounds(db, attempt, base, factor, max_delay, jitter, strategy):
    cap = capped(attempt, base, factor, max_delay)
    low, high = db.execute(
        f"select min(d), max(d) from (select ({SQL.removeprefix('select ')}) as d from generate_series(1, 50)) s",
        (attempt, base, factor, max_delay, jitter, strategy, None)).fetchone()
    if strategy in ("exponential", "seed"):
        assert cap - 1e-6 <= low <= high <= cap * (1 + jitter) + 1e-6
    else:
        assert 0 <= low <= high <= cap + 1e-6


@DB_SETTINGS
@given(attempt=st.integers(min_value=-2**31, max_value=0), jitter=st.floats(allow_nan=False).filter(lambda j: not 0 <= j <= 1))
def test_sql_rejects_what_python_rejects(db, attempt, jitter):
    for args in ((attempt, 0.1), (1, jitter)):
        with pytest.raises(psycopg.Error) as caught:
            db.execute("select booking_guard.backoff_delay(%s, jitter => %s)", args)
        assert caught.value.diag.sqlstate == "BG005"
        with pytest.raises(ValueError):
            backoff_delay(args[0], jitter=args[1])


def test_sql_defaults_are_the_python_defaults(db):
    for attempt in (1, 2, 3, 4, 7, 40):
        in_sql = db.execute("select booking_guard.backoff_delay(%s, draw => 0.25)", (attempt,)).fetchone()[0]
        assert in_sql == timedelta(seconds=round(backoff_delay(attempt, draw=0.25), 6))


# ------------------------------------------------------------------------------- retry_with_backoff

class Flaky:
    def __init__(self, failures: int, error: type[Exception] = ConnectionError):
        self.failures, self.error, self.calls = failures, error, 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error(f"failure {self.calls}")
        return "booked"


def test_retry_sleeps_the_exponential_schedule_then_succeeds():
    slept: list[float] = []
    fn = Flaky(failures=3)
    result = retry_with_backoff(fn, max_attempts=4, sleep=slept.append, rng=lambda: 0.5)
    assert result == "booked" and fn.calls == 4
    assert slept == [backoff_delay(n, draw=0.5) for n in (1, 2, 3)] == [1.05, 2.1, 4.2]


def test_retry_reraises_the_last_error_after_max_attempts():
    slept: list[float] = []
    fn = Flaky(failures=10)
    with pytest.raises(ConnectionError, match="failure 3"):
        retry_with_backoff(fn, sleep=slept.append, rng=lambda: 0.0)
    assert fn.calls == 3 and slept == [1.0, 2.0]   # the default: 3 attempts, no sleep after the last


def test_retry_does_not_retry_other_errors():
    fn = Flaky(failures=1, error=KeyError)
    with pytest.raises(KeyError):
        retry_with_backoff(fn, retry_on=ConnectionError, sleep=lambda _: pytest.fail("slept"))
    assert fn.calls == 1


def test_retry_reports_each_retry_and_follows_full_jitter():
    seen: list[tuple[int, str, float]] = []
    retry_with_backoff(Flaky(failures=2), max_attempts=3, strategy="full", max_delay=1.5, sleep=lambda _: None,
                       rng=lambda: 0.5, on_retry=lambda n, e, d: seen.append((n, str(e), d)))
    assert seen == [(1, "failure 1", 0.5), (2, "failure 2", 0.75)]


@given(max_attempts=st.integers(min_value=1, max_value=8), failures=st.integers(min_value=0, max_value=10))
def test_retry_attempts_and_sleeps(max_attempts, failures):
    slept: list[float] = []
    fn = Flaky(failures=failures)
    if failures < max_attempts:
        assert retry_with_backoff(fn, max_attempts, sleep=slept.append, rng=lambda: 0.0) == "booked"
        assert fn.calls == failures + 1
    else:
        with pytest.raises(ConnectionError):
            retry_with_backoff(fn, max_attempts, sleep=slept.append, rng=lambda: 0.0)
        assert fn.calls == max_attempts
    assert slept == [min(60.0, 2.0 ** n) for n in range(fn.calls - 1)]


def test_retry_rejects_bad_arguments():
    for kwargs in ({"max_attempts": 0}, {"jitter": 2}, {"strategy": "x"}):
        with pytest.raises(ValueError):
            retry_with_backoff(lambda: None, **kwargs)
