"""docs/reference/ says what the catalog says: every public function has an entry with its current
signature and a COMMENT, every generated page is current, and the docs' index and links lead
somewhere. scripts/sql-reference writes the pages; these tests regenerate them in memory from a
fresh install and compare."""

import importlib.machinery
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import psycopg
from support.markdown import broken_links, markdown_links

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "sql-reference"
DOCS = ROOT / "docs"
REFERENCE = DOCS / "reference"


def load_generator():
    """scripts/sql-reference as a module (it is a script, without a .py name)."""
    loader = importlib.machinery.SourceFileLoader("sql_reference", str(SCRIPT))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


generator = load_generator()
REGENERATE = f"\n\nRegenerate with: {generator.REGENERATE}"


def test_every_function_has_a_comment(db):
    undocumented = db.execute("""
        select p.oid::regprocedure::text
          from pg_proc p
         where p.pronamespace in ('booking_guard'::regnamespace, 'booking_guard_internal'::regnamespace)
           and obj_description(p.oid, 'pg_proc') is null
         order by 1""").fetchall()
    assert undocumented == [], "functions without COMMENT ON: " + ", ".join(f for (f,) in undocumented)


def test_every_public_function_has_an_entry_with_its_current_signature(db):
    problems = generator.entry_problems(db, (REFERENCE / "functions.md").read_text())
    assert problems == [], "\n".join(problems) + REGENERATE


def test_the_generated_pages_are_current(db):
    problems = generator.page_problems(generator.generate(db), generator.read_pages(REFERENCE))
    assert problems == [], "\n".join(problems) + REGENERATE


def test_the_hand_written_tables_cover_the_catalog(db):
    # every SQLSTATE raised has a meaning, every metric its labels, every C function what it raises
    problems = generator.catalog_problems(db)
    assert problems == [], "\n".join(problems)


def test_a_new_function_without_comment_or_entry_is_reported(db):
    db.execute("create function booking_guard.undocumented_example(n integer) returns integer"
               " language sql immutable as 'select n'")
    problems = generator.problems(db, REFERENCE)
    assert "booking_guard.undocumented_example(n integer) has no COMMENT ON" in problems
    assert "booking_guard.undocumented_example(n integer) has no entry in docs/reference/functions.md" in problems
    assert any(p.startswith("docs/reference/functions.md is stale:") and "+### `undocumented_example(n integer)`" in p
               for p in problems)


def test_a_changed_signature_is_reported_as_stale(db):
    db.execute("alter function booking_guard.help() rename to help_topics")
    problems = generator.entry_problems(db, (REFERENCE / "functions.md").read_text())
    assert problems == [
        "booking_guard.help_topics() has no entry in docs/reference/functions.md",
        "docs/reference/functions.md has an entry for help(), which is not in the catalog (removed, or its signature changed)",
    ]


def test_a_changed_comment_or_setting_makes_the_pages_stale(db):
    db.execute("comment on function booking_guard.resolve_alert(bigint) is 'Closes an alert, differently.'")
    db.execute("select booking_guard.set_setting('job_batch_size', '2000')")
    stale = {p.split(" is stale")[0] for p in generator.page_problems(generator.generate(db), generator.read_pages(REFERENCE))}
    assert stale == {"docs/reference/functions.md", "docs/reference/settings.md"}


def test_the_command_checks_a_database_in_place(db):
    info = db.info
    dsn = f"host={info.host} port={info.port} user={info.user} dbname={info.dbname}"
    current = subprocess.run([sys.executable, str(SCRIPT), "--check", "--in-place", "--dsn", dsn],
                             capture_output=True, text=True, timeout=120)
    assert current.returncode == 0, current.stdout + current.stderr
    db.execute("comment on function booking_guard.resolve_alert(bigint) is 'Closes an alert, differently.'")
    stale = subprocess.run([sys.executable, str(SCRIPT), "--check", "--in-place", "--dsn", dsn],
                           capture_output=True, text=True, timeout=120)
    assert stale.returncode == 1
    assert "docs/reference/functions.md is stale" in stale.stdout
    assert "+Closes an alert, differently." in stale.stdout
    assert "scripts/sql-reference" in stale.stderr


def metric_labels(conn: psycopg.Connection) -> dict[str, set[str]]:
    """The label names metrics() exports, per family (a histogram's le left out)."""
    families = {name: kind for name, kind in conn.execute("select name, type from booking_guard.metric_definitions")}
    found: dict[str, set[str]] = {}
    for name, labels in conn.execute("select name, labels from booking_guard.metrics()"):
        family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in families else name
        found.setdefault(family, set()).update(set(labels) - {"le"})
    return found


def test_the_documented_metric_labels_are_those_metrics_exports(core):
    db = core
    # something behind every family: bookings (one refused), a validation, an open breaker, an alert
    # and a review item (a phantom booking), a scheduled job
    call = db.execute("insert into calls (retell_call_id, company_id, direction) values ('ref-1', 1, 'inbound')"
                      " returning id").fetchone()[0]
    assert db.execute("select success from booking_guard.record_booking(%s, 'cal-ref-1')", (call,)).fetchone() == (True,)
    assert db.execute("select reason from booking_guard.record_booking(%s, 'cal-ref-2')", (call + 1000,)).fetchone() \
        == ("call_not_found",)
    db.execute("insert into calls (retell_call_id, company_id, direction, session_outcome, appointment_made)"
               " values ('ref-phantom', 1, 'inbound', 'appointment_booked', false)")
    for _ in range(3):
        db.execute("select booking_guard.circuit_record_failure('appointment_booking:global', 'timeout')")
    db.execute("update booking_guard.job_runs set scheduled_at = now() where job = 'reconcile'")

    exported = metric_labels(db)
    documented = {name: set(labels) for name, labels in generator.METRIC_LABELS.items()}
    families = {name for (name,) in db.execute("select name from booking_guard.metric_definitions")}
    assert set(exported) == families, "families metrics() did not export: " + ", ".join(sorted(families - set(exported)))
    assert {f: exported[f] for f in families} == {f: documented.get(f) for f in families}


def test_the_docs_index_lists_every_page():
    index = DOCS / "README.md"
    linked = {(DOCS / target.split("#")[0]).resolve() for target in markdown_links(index)}
    pages = {p.resolve() for p in DOCS.glob("*.md") if p != index}
    pages |= {p.resolve() for p in DOCS.glob("*/README.md")}
    assert pages - linked == set(), "pages of docs/ not in docs/README.md: " + ", ".join(
        sorted(str(p.relative_to(DOCS)) for p in pages - linked))


def test_the_links_of_the_index_architecture_and_reference_resolve():
    pages = [DOCS / "README.md", DOCS / "architecture.md", *sorted(REFERENCE.glob("*.md"))]
    assert broken_links(pages, ROOT) == []


def test_the_rules_page_lists_every_built_in_rule_as_the_catalog_has_it(db):
    """docs/rules.md is written by hand: its table of built-in rules must name each rule with the
    entity, severity and default mode of its row, and say 'nothing' exactly for the rules without a
    repair."""
    row = re.compile(r"^\| `([a-z_]+)` \| (\w+) \| .* \| (critical|warning|info) \| (\w+) \| (.*) \|$")
    documented = {}
    for line in (DOCS / "rules.md").read_text().splitlines():
        match = row.match(line)
        if match:
            name, entity, severity, mode, repair = match.groups()
            documented[name] = (entity, severity, mode, not repair.startswith("nothing"))
    catalog = {name: (entity, severity, mode, repairs) for name, entity, severity, mode, repairs in db.execute(
        "select name, entity_type, severity, default_mode, repair_kind is not null from booking_guard.rules"
        " where predicate is null")}
    assert documented == catalog
