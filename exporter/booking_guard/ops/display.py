"""Plain-text tables and headings for the terminal (demo, check, report)."""

import textwrap
from collections.abc import Iterable

import psycopg


def heading(title: str) -> str:
    return f"\n{title}\n{'=' * len(title)}"


def table(cursor: psycopg.Cursor, wrap: dict[str, int] | None = None) -> str:
    """Render a cursor's rows as an aligned text table; columns named in `wrap` are wrapped."""
    names = [column.name for column in cursor.description]
    rows = [["" if value is None else str(value) for value in row] for row in cursor.fetchall()]
    return render(names, rows, wrap or {})


def render(names: list[str], rows: Iterable[list[str]], wrap: dict[str, int]) -> str:
    # Each row becomes one or more physical lines when a wrapped cell is long.
    physical: list[list[str]] = []
    for row in rows:
        cells = [(textwrap.wrap(cell, wrap[name]) or [""]) if name in wrap else [cell]
                 for name, cell in zip(names, row, strict=True)]
        for line in range(max(len(c) for c in cells)):
            physical.append([c[line] if line < len(c) else "" for c in cells])
    widths = [max([len(name)] + [len(line[i]) for line in physical]) for i, name in enumerate(names)]
    out = ["  ".join(name.ljust(w) for name, w in zip(names, widths, strict=True)).rstrip(),
           "  ".join("-" * w for w in widths)]
    out += ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in physical]
    if not physical:
        out.append("(none)")
    return "\n".join(out) + "\n"
