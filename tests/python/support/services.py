"""The services tests run and talk to: `booking-guard serve` in this process on a free loopback
port, reading what it answers, and waiting for something another process does."""

import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import psycopg
import pytest
from booking_guard.ops.serve import ServeConfig, Service
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families
from psycopg.conninfo import make_conninfo

T = TypeVar("T")


def dsn_of(conn: psycopg.Connection) -> str:
    """A connection string to the database `conn` is connected to, as the same user."""
    info = conn.info
    return make_conninfo(host=info.host, port=info.port, user=info.user, dbname=info.dbname,
                         password=info.password or None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(dsn: str, **options: object) -> Iterator[Service]:
    """`booking-guard serve` for one database on a free loopback port (no verification loop unless asked)."""
    service = Service(ServeConfig(dsn=dsn, listen="127.0.0.1:0", verify=False, **options))
    service.start()
    try:
        yield service
    finally:
        service.shutdown()


def get(service: Service, path: str, accept: str | None = None) -> tuple[int, str]:
    """(status, body) of a GET of `path` from the service, whatever the status."""
    host, port = service.address
    request = urllib.request.Request(f"http://{host}:{port}{path}", headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


SELECTOR = re.compile(r'(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})?')
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def sample(text: str, selector: str, database: str | None = None) -> float | None:
    """The value of the series `name{label="value",...}` in an exposition, or None when it is absent.

    Every series serve exports has a `database` label (its target): `database` names the one wanted;
    without it the selector must match one series only, whatever its database."""
    match = SELECTOR.fullmatch(selector)
    assert match, selector
    wanted = dict(LABEL.findall(match.group("labels") or ""))
    found = []
    parse = openmetrics_families if text.rstrip().endswith("# EOF") else text_string_to_metric_families
    for family in parse(text):
        for s in family.samples:
            labels = dict(s.labels)
            if s.name != match.group("name") or "database" not in labels:
                continue
            got = labels.pop("database")
            if labels == wanted and (database is None or got == database):
                found.append(s.value)
    assert len(found) <= 1, f"{selector} matches {len(found)} series: give the database"
    return found[0] if found else None


def wait_for(condition: Callable[[], T], seconds: float, what: str, proc: subprocess.Popen | None = None) -> T:
    """Poll `condition` until it returns something true, and return that; fail the test when
    `seconds` pass first, or at once when `proc` (the process expected to bring it about) exits."""
    deadline = time.monotonic() + seconds
    while True:
        result = condition()
        if result:
            return result
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{proc.args[0]} exited with {proc.returncode} while waiting for {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {seconds} s waiting for {what}")
        time.sleep(0.05)
