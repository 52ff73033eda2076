"""The README and docs/ as a newcomer uses them: the tour's SQL runs as written and prints what its
comments say, every relative link resolves, and the README stays a short front page."""

import re
import subprocess

import psycopg
from conftest import APP_SCHEMA, ROOT, pg_tool, tool_args
from support.markdown import broken_links

README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]


def tour_sql() -> str:
    """The SQL of the tour's step 2: the psql here-document of the README."""
    found = re.search(r"psql <<'SQL'\n(.*?)\nSQL\n", README.read_text(), flags=re.DOTALL)
    assert found, "the README's tour has no psql <<'SQL' block"
    return found.group(1)


def test_the_tour_prints_what_its_comments_say(empty_db: psycopg.Connection):
    dbname = empty_db.info.dbname
    empty_db.commit()
    run = [pg_tool("psql"), "-X", "-v", "ON_ERROR_STOP=1", *tool_args(dbname)]
    subprocess.run([*run, "-q", "-f", str(APP_SCHEMA)], check=True, capture_output=True, text=True)
    sql = tour_sql()
    out = subprocess.run(run, input=sql, check=True, capture_output=True, text=True).stdout
    rows = [re.sub(r"\s*\|\s*", " | ", line.strip()) for line in out.splitlines()]
    # each commented select: every row its comment names ("a, b | c" is the rows a | c and b | c)
    expectations = [c for c in re.findall(r"^select .*?;\s+-- (.+)$", sql, flags=re.MULTILINE) if "|" in c]
    assert expectations, "the tour's selects say nothing about their results"
    for expected in expectations:
        first, *rest = [part.strip() for part in expected.split("|")]
        for value in first.split(", "):
            line = " | ".join([value, *rest])
            assert any(row.startswith(line) for row in rows), f"{line!r} not in the tour's output:\n{out}"


def test_every_relative_link_resolves():
    assert broken_links(PAGES, ROOT) == []


def test_the_readme_is_a_front_page():
    text = README.read_text()
    assert len(text.splitlines()) <= 120
    for command in ("make demo", "make test"):
        assert f"\n{command}" in text
    assert "docs/README.md" in text
