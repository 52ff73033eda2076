"""Shared plumbing of the benchmarks: a scratch database on the server in DATABASE_URL."""

import contextlib
import json
import os
import platform
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

ROOT = Path(__file__).resolve().parents[1]
APP_SCHEMA = ROOT / "examples" / "app_schema.sql"


def server() -> dict:
    if "DATABASE_URL" not in os.environ:
        raise SystemExit("DATABASE_URL is not set: run benchmarks with `make bench` (or scripts/with-database)")
    return conninfo_to_dict(os.environ["DATABASE_URL"])


def conninfo(dbname: str) -> str:
    return make_conninfo(**{**server(), "dbname": dbname})


@contextlib.contextmanager
def scratch_database(name: str) -> Iterator[str]:
    """A fresh database with the reference schema and the extension (not attached); dropped afterwards."""
    with psycopg.connect(conninfo("postgres"), autocommit=True) as admin:
        admin.execute(f'drop database if exists "{name}" with (force)')
        admin.execute(f'create database "{name}"')
    try:
        with psycopg.connect(conninfo(name), autocommit=True) as conn:
            conn.execute("set client_min_messages = warning")
            conn.execute(APP_SCHEMA.read_text())
            conn.execute("create extension booking_guard cascade")
        yield conninfo(name)
    finally:
        with psycopg.connect(conninfo("postgres"), autocommit=True) as admin:
            admin.execute(f'drop database if exists "{name}" with (force)')


def pg_env(dbname: str) -> dict[str, str]:
    """Environment for libpq command-line tools (pgbench, psql) pointing at `dbname`."""
    info = server()
    env = dict(os.environ)
    env.pop("DATABASE_URL", None)
    for key, var in (("host", "PGHOST"), ("port", "PGPORT"), ("user", "PGUSER"), ("password", "PGPASSWORD")):
        if info.get(key):
            env[var] = str(info[key])
    env["PGDATABASE"] = dbname
    return env


def pgbench(dbname: str, scripts: list[tuple[str, int]], clients: int, seconds: int, workdir: Path) -> float:
    """TPS of pgbench (prepared statements) running the weighted scripts [(body, weight)] on `dbname`."""
    args = ["pgbench", "-n", "-M", "prepared", "-c", str(clients), "-j", str(min(clients, 4)), "-T", str(seconds)]
    for i, (body, weight) in enumerate(scripts):
        path = workdir / f"script{i}.sql"
        path.write_text(body)
        args += ["-f", f"{path}@{weight}"]
    out = subprocess.run(args, env=pg_env(dbname), capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"pgbench failed:\n{out.stdout}\n{out.stderr}")
    return float(re.search(r"tps = ([\d.]+)", out.stdout).group(1))


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a local server process has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_is_local(conn: psycopg.Connection) -> bool:
    return Path(f"/proc/{conn.info.backend_pid}/stat").exists()


def machine() -> dict[str, str]:
    with psycopg.connect(conninfo("postgres")) as conn:
        version = conn.execute("select current_setting('server_version')").fetchone()[0]
    return {
        "cpu": subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip() + " cores",
        "python": platform.python_version(),
        "postgresql": version,
        "kernel": platform.release(),
    }


def figure(name: str, value: float, unit: str, baseline_name: str, baseline: float, target: str | None = None) -> dict:
    """One figure of a benchmark beside its baseline measured in the same run (for scripts/run-bench's report)."""
    return {"name": name, "value": value, "unit": unit, "baseline_name": baseline_name, "baseline": baseline,
            "ratio": value / baseline if baseline else None, "target": target}


def emit(bench: str, figures: list[dict]) -> None:
    """Writes the figures to $BENCH_JSON_DIR/<bench>.json when run by scripts/run-bench; the printed output stays."""
    out = os.environ.get("BENCH_JSON_DIR")
    if out:
        Path(out, f"{bench}.json").write_text(json.dumps(figures, indent=2))
