"""pytest fixtures: one fresh database per test, cloned from a template that has the
reference application schema and the extension (pytest-postgresql against the server in
DATABASE_URL, which `make test` points at its throwaway cluster)."""

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict
from pytest_postgresql import factories

ROOT = Path(__file__).resolve().parents[2]
APP_SCHEMA = ROOT / "examples" / "app_schema.sql"

if "DATABASE_URL" not in os.environ:
    raise pytest.UsageError("DATABASE_URL is not set: run the tests with `make test` (or scripts/with-database)")
SERVER = conninfo_to_dict(os.environ["DATABASE_URL"])


def pg_tool(name: str) -> str:
    """A PostgreSQL 15 client program (pg_dump, psql), for dump and restore tests."""
    path = shutil.which(name, path="/usr/lib/postgresql/15/bin") or shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found")
    return path


def tool_args(dbname: str) -> list[str]:
    """Connection arguments of a client program for `dbname` on the test server."""
    args = ["-h", SERVER.get("host", "localhost"), "-p", str(SERVER.get("port", 5432)), "-d", dbname]
    if SERVER.get("user"):
        args += ["-U", SERVER["user"]]
    return args


def load_template(host: str, port: int, user: str, dbname: str, password: str | None, **_: object) -> None:
    with psycopg.connect(host=host, port=port, user=user, dbname=dbname, password=password, autocommit=True) as conn:
        conn.execute("set client_min_messages = warning")
        conn.execute(APP_SCHEMA.read_text())
        conn.execute("create extension booking_guard cascade")


postgresql_noproc = factories.postgresql_noproc(
    host=SERVER.get("host"),
    port=SERVER.get("port", 5432),
    user=SERVER.get("user"),
    password=SERVER.get("password"),
    dbname="bg_pytest",
    load=[load_template],
)
postgresql = factories.postgresql("postgresql_noproc")

empty_noproc = factories.postgresql_noproc(
    host=SERVER.get("host"),
    port=SERVER.get("port", 5432),
    user=SERVER.get("user"),
    password=SERVER.get("password"),
    dbname="bg_pytest_empty",
)
empty_db = factories.postgresql("empty_noproc")


@pytest.fixture
def db(postgresql: psycopg.Connection) -> psycopg.Connection:
    """The per-test database (schema + extension, not attached), in autocommit."""
    postgresql.autocommit = True
    return postgresql


@pytest.fixture
def connect(postgresql: psycopg.Connection) -> Iterator[Callable[..., psycopg.Connection]]:
    """Open more connections to the per-test database (for concurrency tests); closed after the test."""
    opened: list[psycopg.Connection] = []
    info = postgresql.info

    def _connect(**kwargs) -> psycopg.Connection:
        kwargs.setdefault("autocommit", True)
        conn = psycopg.connect(host=info.host, port=info.port, user=info.user, dbname=info.dbname,
                               password=info.password or None, **kwargs)
        opened.append(conn)
        return conn

    yield _connect
    for conn in opened:
        conn.close()


@pytest.fixture
def attached(db: psycopg.Connection) -> psycopg.Connection:
    """The per-test database with booking_guard attached to the reference tables."""
    db.execute("select booking_guard.attach('public.calls', 'public.appointments')")
    return db


@pytest.fixture
def core(attached: psycopg.Connection) -> psycopg.Connection:
    """Attached, claims judged at COMMIT (verification_grace 0), one company (id 1), customers 1 and 2."""
    attached.execute("select booking_guard.set_setting('verification_grace', '0')")
    attached.execute("insert into companies (id, name) values (1, 'Acme Dental')")
    attached.execute("insert into customers (id, company_id, name) values (1, 1, 'Ada'), (2, 1, 'Bob')")
    return attached


@pytest.fixture
def login_role(db: psycopg.Connection) -> Iterator[Callable[..., tuple[str, psycopg.Connection]]]:
    """Make login roles for one test (roles are cluster-wide): login_role(*member_of, grants=[...])
    creates a role that is a member of the given roles, runs each GRANT statement (`{role}` names
    it), and returns (name, an autocommit connection as it). Dropped with what they own afterwards."""
    made: list[tuple[str, psycopg.Connection]] = []

    def make(*member_of: str, grants: tuple[str, ...] = ()) -> tuple[str, psycopg.Connection]:
        name = f"bg_role_{uuid.uuid4().hex[:10]}"
        db.execute(f"create role {name} login")
        for role in member_of:
            db.execute(f"grant {role} to {name}")
        for grant in grants:
            db.execute(grant.format(role=name))
        conn = psycopg.connect(host=db.info.host, port=db.info.port, user=name, dbname=db.info.dbname,
                               autocommit=True)
        made.append((name, conn))
        return name, conn

    yield make
    for name, conn in made:
        conn.close()
        db.execute(f"reassign owned by {name} to current_user")
        db.execute(f"drop owned by {name}")
        db.execute(f"drop role {name}")


#: The privileges an application's own role has on its tables, and nothing on booking_guard.
APP_TABLE_GRANTS = (
    "grant select, insert, update, delete on calls, appointments, companies, customers, services, staff to {role}",
    "grant usage on all sequences in schema public to {role}",
)
