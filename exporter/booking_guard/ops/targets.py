"""The databases one `booking-guard serve` (or `relay`) watches: its targets.

A target is a name and a connection string. The name is what /metrics puts in the `database`
label of every series, what `/probe?target=NAME` and `/?target=NAME` ask for, and what /healthz
reports under `targets`: letters, digits, `_`, `.` and `-`, at most 63 characters, unique.

Where targets come from, on the command line:

- `--target NAME=DSN`, repeatable;
- `--targets-file FILE`: one target per line, the name, white space, then the connection string
  (the rest of the line, so a key=value string may contain spaces); blank lines and lines
  starting with `#` are skipped:

      # name    connection string
      clinics   postgresql://bg_exporter@db1.internal/clinics
      dental    host=db2.internal dbname=dental user=bg_exporter

- neither: `--dsn` or $DATABASE_URL (or the PG* variables) as one target named after the
  database the connection string names (`dbname`, else $PGDATABASE), else `default`.

Targets are read once, at start; the exporter never connects anywhere else (/probe takes a
configured name, never a connection string).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from psycopg.conninfo import conninfo_to_dict

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
DEFAULT_NAME = "default"


class TargetError(ValueError):
    """A target that cannot be used: a bad name, a duplicate, an unreadable file, a bad line."""


@dataclass(frozen=True)
class Target:
    name: str
    dsn: str

    def __post_init__(self) -> None:
        check_name(self.name)


def check_name(name: str) -> str:
    if not NAME.fullmatch(name):
        # never echo what may be a connection string with a password in it
        shown = "(it looks like a connection string: write NAME=DSN)" if ":" in name or "@" in name else repr(name[:63])
        raise TargetError(f"bad target name {shown}: 1 to 63 letters, digits, '_', '.' or '-', starting with a letter"
                          " or digit")
    return name


def implicit_name(dsn: str) -> str:
    """The name of the one target --dsn / $DATABASE_URL gives: its database, made label-safe, or 'default'."""
    try:
        dbname = conninfo_to_dict(dsn).get("dbname") if dsn else None
    except Exception:   # noqa: BLE001 - a DSN libpq cannot parse fails at connect time, with libpq's message
        dbname = None
    dbname = dbname or os.environ.get("PGDATABASE")
    if not dbname:
        return DEFAULT_NAME
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", str(dbname))[:63].lstrip("_.-")
    return name or DEFAULT_NAME


def parse_target(value: str) -> Target:
    """`NAME=DSN` (the DSN may itself contain '=': only the first one splits)."""
    name, sep, dsn = value.partition("=")
    if not sep or not dsn.strip():
        raise TargetError("--target wants NAME=DSN, e.g. --target clinics=postgresql://bg_exporter@db1/clinics")
    return Target(check_name(name.strip()), dsn.strip())


def parse_targets_file(path: str | Path) -> list[Target]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise TargetError(f"cannot read the targets file {str(path)!r}: {error.strerror or error}") from error
    targets: list[Target] = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        name, *rest = stripped.split(None, 1)
        if not rest:
            raise TargetError(f"{path}:{number}: a target line is a name, white space, then its connection string")
        try:
            targets.append(Target(check_name(name), rest[0].strip()))
        except TargetError as error:
            raise TargetError(f"{path}:{number}: {error}") from None
    return targets


def unique(targets: Iterable[Target]) -> list[Target]:
    seen: set[str] = set()
    result: list[Target] = []
    for target in targets:
        if target.name in seen:
            raise TargetError(f"target {target.name!r} is given twice: each target needs a name of its own")
        seen.add(target.name)
        result.append(target)
    return result


def resolve(dsn: str | None, target_args: Iterable[str] = (), targets_file: str | None = None) -> list[Target]:
    """The targets of a command line: --target and --targets-file, else the one of --dsn / $DATABASE_URL.

    `dsn` is None when --dsn was not given (then $DATABASE_URL applies). Giving --dsn together
    with --target or --targets-file is an error: which name would it get?
    """
    explicit = [parse_target(value) for value in target_args]
    if targets_file is not None:
        explicit += parse_targets_file(targets_file)
    if explicit:
        if dsn is not None:
            raise TargetError("give either --dsn or --target/--targets-file (name the --dsn database with"
                              " --target NAME=DSN)")
        return unique(explicit)
    if targets_file is not None:
        raise TargetError(f"the targets file {targets_file!r} names no target")
    dsn = os.environ.get("DATABASE_URL", "") if dsn is None else dsn
    return [Target(implicit_name(dsn), dsn)]
