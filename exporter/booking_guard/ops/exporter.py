"""The Prometheus collector: one `booking_guard.metrics()` call per target and scrape.

Every database call goes through `BoundedConnection`: one connection, re-established after
any error, and a deadline on each call that holds even when the server hangs (a call that
has not answered by then is abandoned and its socket shut down). So a scrape always answers
in time: with the series and `booking_guard_up 1`, or with `booking_guard_up 0` alone; every
series carries the label `database` naming its target (see targets.py).
Nothing touches the database before the first scrape (describe() is static), so the
exporter starts while the database is down.
"""

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

import psycopg
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from booking_guard.ops.connection import connect, set_local_timeouts

log = logging.getLogger("booking_guard.exporter")

T = TypeVar("T")

UP_HELP = "1 if the last scrape read booking_guard.metrics(), 0 if the database was unreachable, too slow or failed."
DURATION_HELP = "Duration of the last scrape of booking_guard.metrics(), in seconds."

METRICS_QUERY = "select name, type, help, labels, value from booking_guard.metrics()"

#: The label that names the target (the database) on every series.
LABEL = "database"


class Unavailable(Exception):
    """The database did not answer a call in time, or the call failed."""


class BoundedConnection:
    """One autocommit connection, used by one call at a time, each call bounded by `timeout` seconds.

    Each call is one transaction in which the server is also told to give up (statement_timeout,
    lock_timeout, set locally so that they also hold through a transaction pooler, see
    connection.py) a little before the client does. A call that outlives its deadline is
    abandoned: its socket is shut down, which ends it at once, and the next call connects again.
    """

    def __init__(self, dsn: str, timeout: float = 1.5, application_name: str = "booking-guard") -> None:
        self.dsn = dsn
        self.timeout = timeout
        self.application_name = application_name
        self._conn: psycopg.Connection | None = None
        self._busy = threading.Lock()

    def _connect(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = connect(self.dsn, self.application_name, connect_timeout=max(2, int(self.timeout + 0.999)))
        return self._conn

    def _bounded(self, conn: psycopg.Connection, fn: Callable[[psycopg.Connection], T]) -> T:
        statement_ms = max(100, int(self.timeout * 800))
        with conn.transaction():
            set_local_timeouts(conn, statement_ms, lock_ms=statement_ms)
            return fn(conn)

    def _discard(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):   # a broken connection may fail to close; it is gone either way
                conn.close()

    def _shut_down_socket(self) -> None:
        conn = self._conn
        if conn is None or conn.closed:
            return
        try:
            dup = socket.socket(fileno=os.dup(conn.pgconn.socket))
        except OSError:
            return
        try:
            dup.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        finally:
            dup.close()

    def call(self, fn: Callable[[psycopg.Connection], T]) -> T:
        deadline = time.monotonic() + self.timeout
        if not self._busy.acquire(timeout=self.timeout):
            raise Unavailable(f"the previous database call has not returned within {self.timeout:g} s")
        outcome: dict[str, object] = {}
        done = threading.Event()

        def work() -> None:
            try:
                outcome["value"] = self._bounded(self._connect(), fn)
            except Exception as error:  # noqa: BLE001 - reported to the caller as Unavailable
                outcome["error"] = error
                self._discard()
            finally:
                done.set()
                self._busy.release()

        threading.Thread(target=work, name=f"{self.application_name} db call", daemon=True).start()
        if not done.wait(max(0.0, deadline - time.monotonic())):
            self._shut_down_socket()   # the worker fails at once, discards the connection and releases the lock
            raise Unavailable(f"no answer from the database within {self.timeout:g} s")
        if "error" in outcome:
            error = outcome["error"]
            raise Unavailable(str(error).strip() or type(error).__name__) from error  # type: ignore[misc]
        return outcome["value"]  # type: ignore[return-value]

    def close(self) -> None:
        with self._busy:
            self._discard()


def _family_name(name: str, typ: str) -> str:
    if typ == "counter" and name.endswith("_total"):
        return name[: -len("_total")]
    if typ == "histogram":
        for suffix in ("_bucket", "_count", "_sum"):
            if name.endswith(suffix):
                return name[: -len(suffix)]
    return name


def _sample_order(sample_name: str, labels: dict[str, str]) -> tuple:
    # histograms: buckets by their bound, then _count and _sum, as prometheus_client writes them
    if sample_name.endswith("_bucket") and "le" in labels:
        return (0, float(labels["le"]), sorted(labels.items()))
    if sample_name.endswith("_count"):
        return (1, 0.0, sorted(labels.items()))
    if sample_name.endswith("_sum"):
        return (2, 0.0, sorted(labels.items()))
    return (0, 0.0, sorted(labels.items()))


def families(rows: Iterable[tuple], extra_labels: dict[str, str] | None = None) -> list[Metric]:
    """Metric families from metrics() rows (name, type, help, labels, value), each sample also
    given `extra_labels` (the target's `database`)."""
    grouped: dict[str, Metric] = {}
    for name, typ, help_text, labels, value in rows:
        if value is None:
            continue
        family = _family_name(name, typ)
        metric = grouped.get(family)
        if metric is None:
            metric = grouped[family] = Metric(family, help_text, typ)
        sample_labels = {str(k): str(v) for k, v in (labels or {}).items()}
        if extra_labels:
            sample_labels.update(extra_labels)
        if "le" in sample_labels:
            sample_labels["le"] = floatToGoString(float(sample_labels["le"].replace("+Inf", "inf")))
        metric.add_sample(name, sample_labels, float(value))
    for metric in grouped.values():
        metric.samples.sort(key=lambda s: _sample_order(s.name, s.labels))
    return [grouped[name] for name in sorted(grouped)]


class TargetScraper:
    """One target's scrape: booking_guard.metrics() through its BoundedConnection, every series
    labelled `database="<target>"`, then booking_guard_up and the scrape's duration. Shared by
    /metrics (every target) and /probe (this one), so a change of availability is logged once."""

    def __init__(self, name: str, db: BoundedConnection) -> None:
        self.name = name
        self.db = db
        self._was_up: bool | None = None

    def scrape(self) -> tuple[bool, list[Metric], float]:
        """(up, families with the `database` label, seconds the scrape took); never raises Unavailable."""
        started = time.monotonic()
        try:
            result = families(self.db.call(lambda conn: conn.execute(METRICS_QUERY).fetchall()), {LABEL: self.name})
            up = True
        except Unavailable as error:
            result = []
            up = False
            if self._was_up is not False:
                log.warning("[%s] booking_guard.metrics() unavailable: %s", self.name, error)
        if up and self._was_up is False:
            log.warning("[%s] booking_guard.metrics() available again", self.name)
        self._was_up = up
        return up, result, time.monotonic() - started


def _merge(scraped: list[list[Metric]]) -> list[Metric]:
    """One family per name, its samples target after target (as the exposition formats want: a
    family's HELP and TYPE once, each label set's samples together). A family whose type differs
    from the first target's (another extension version) is left out for that target."""
    merged: dict[str, Metric] = {}
    for metrics in scraped:
        for metric in metrics:
            into = merged.get(metric.name)
            if into is None:
                into = merged[metric.name] = Metric(metric.name, metric.documentation, metric.type)
            elif into.type != metric.type:
                log.warning("metric %s is a %s in one target and a %s in another: left out where it is a %s",
                            metric.name, into.type, metric.type, metric.type)
                continue
            into.samples.extend(metric.samples)
    return [merged[name] for name in sorted(merged)]


class MetricsCollector(Collector):
    """prometheus-client collector of booking_guard.metrics() for one or more targets, with
    booking_guard_up and booking_guard_scrape_duration_seconds per target (label `database`).

    The targets are scraped at the same time, each on its own connection and within its own
    timeout: a target that is down or slow shows as booking_guard_up{database=...} 0 and delays
    no other, so a scrape of any number of targets answers within the scrape timeout."""

    def __init__(self, scrapers: Sequence[TargetScraper]) -> None:
        self.scrapers = list(scrapers)

    def describe(self) -> list[Metric]:
        # static: registering the collector must not touch the database
        return [GaugeMetricFamily("booking_guard_up", UP_HELP, labels=[LABEL]),
                GaugeMetricFamily("booking_guard_scrape_duration_seconds", DURATION_HELP, labels=[LABEL])]

    def _scrape_all(self) -> list[tuple[bool, list[Metric], float]]:
        if len(self.scrapers) == 1:
            return [self.scrapers[0].scrape()]
        results: list[tuple[bool, list[Metric], float] | None] = [None] * len(self.scrapers)

        def one(i: int) -> None:
            results[i] = self.scrapers[i].scrape()

        threads = [threading.Thread(target=one, args=(i,), name=f"scrape {s.name}", daemon=True)
                   for i, s in enumerate(self.scrapers)]
        for thread in threads:
            thread.start()
        # each scrape is bounded by its connection's timeout; the margin only guards against a bug
        deadline = time.monotonic() + max(s.db.timeout for s in self.scrapers) + 1.0
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return [r if r is not None else (False, [], 0.0) for r in results]

    def collect(self) -> Iterable[Metric]:
        scraped = self._scrape_all()
        yield from _merge([metrics for _, metrics, _ in scraped])
        up = GaugeMetricFamily("booking_guard_up", UP_HELP, labels=[LABEL])
        took = GaugeMetricFamily("booking_guard_scrape_duration_seconds", DURATION_HELP, labels=[LABEL])
        for scraper, (is_up, _, seconds) in zip(self.scrapers, scraped, strict=True):
            up.add_metric([scraper.name], 1 if is_up else 0)
            took.add_metric([scraper.name], seconds)
        yield up
        yield took
