"""How `booking-guard serve` and `booking-guard relay` connect, so that they work directly against
PostgreSQL and through a connection pooler in transaction mode (PgBouncer `pool_mode = transaction`).

A transaction pooler hands each transaction to whichever server connection is free, so nothing
may outlive a transaction:

- no startup `options` (PgBouncer refuses them: "unsupported startup parameter: options"):
  timeouts are set with `set_config(..., true)`, i.e. `SET LOCAL`, inside each transaction
  (`set_local_timeouts`), which ends with the transaction whatever connection it ran on;
- no automatic prepared statements (`prepare_threshold=None`): psycopg prepares a statement on
  the server connection it happens to run on and expects it on the next one ("prepared statement
  _pg3_0 already exists" or "does not exist");
- no LISTEN: it would register a server connection that other clients then use (the relay polls
  instead, see relay.py).
"""

import psycopg

#: --pooler: what sits between booking-guard and PostgreSQL. "auto" detects a pooler (see
#: `behind_pooler`) and then assumes transaction pooling, the mode that breaks session state.
POOLER_MODES = ("auto", "none", "session", "transaction")


def connect(dsn: str, application_name: str, connect_timeout: int = 5) -> psycopg.Connection:
    """An autocommit connection for serve's loops and scrapes.

    Automatic prepared statements are off always, not only when a pooler is detected: these
    connections run a handful of one-line calls of booking_guard's functions, whose own plans
    PostgreSQL caches server-side, so preparing them client-side saves next to nothing, while a
    pooler that goes undetected would turn the fifth execution of a statement into an error.
    """
    try:
        return psycopg.connect(dsn, autocommit=True, connect_timeout=connect_timeout,
                               application_name=application_name, prepare_threshold=None)
    except psycopg.OperationalError as error:
        if "unsupported startup parameter: options" not in str(error):
            raise
        # booking-guard sends none itself: they come from the DSN or PGOPTIONS
        raise psycopg.OperationalError(
            f"{str(error).strip()} (the pooler refuses libpq options, which came from the DSN or $PGOPTIONS:"
            " booking-guard needs none, remove them)") from error


def set_local_timeouts(conn: psycopg.Connection, statement_ms: int, lock_ms: int | None = None) -> None:
    """statement_timeout (and lock_timeout) for the rest of the current transaction only.

    Must run inside a transaction (`with conn.transaction():`): outside one it would last for
    the server connection's session, which a pooler shares with other clients.
    """
    if lock_ms is None:
        conn.execute("select set_config('statement_timeout', %s, true)", (f"{statement_ms}ms",))
    else:
        conn.execute("select set_config('statement_timeout', %s, true), set_config('lock_timeout', %s, true)",
                     (f"{statement_ms}ms", f"{lock_ms}ms"))


def behind_pooler(conn: psycopg.Connection) -> bool:
    """True when a pooler stands between this connection and its server process.

    PostgreSQL announces its process id when a connection starts (BackendKeyData, the key a
    cancel request names). A pooler that hands a client's transactions to different server
    processes cannot pass one process's key on: PgBouncer announces a key of its own, in every
    pool mode. So the announced id differs from the one the server reports. A plain TCP proxy or
    NAT passes the key through, and LISTEN works through it. The check cannot tell session
    pooling from transaction pooling: `--pooler session` says which.
    """
    announced = conn.info.backend_pid
    if not announced:   # no key announced at all: nothing to compare, take it as direct
        return False
    return conn.execute("select pg_backend_pid()").fetchone()[0] != announced
