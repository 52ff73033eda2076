"""monitoring/grafana-dashboard.json against what the exporter serves: every panel's query names only
metrics a scrape returns, picks its series by `instance` and `database` (one exporter may serve
several databases), and the tables of alert types and review reasons link their runbooks."""

import json
import re

import pytest
from booking_guard.ops.exporter import BoundedConnection, MetricsCollector, TargetScraper
from conftest import ROOT
from prometheus_client import CollectorRegistry, generate_latest
from support.services import dsn_of

DASHBOARD = json.loads((ROOT / "monitoring" / "grafana-dashboard.json").read_text())

# PromQL words that are not metric names
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or", "unless",
            "inf", "nan"}


def panels() -> list[dict]:
    found = []
    for panel in DASHBOARD["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))   # the panels of a collapsed row
    return found


def exprs() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in panels() for t in p.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers that are not functions, keywords,
    label names of a grouping clause, or inside strings, matchers and range selectors."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)                  # strings
    text = re.sub(r"\{[^}]*\}", "", text)                             # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)                            # range selectors
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group(0)
        rest = text[match.end():].lstrip()
        if word in KEYWORDS or rest.startswith("("):
            continue
        names.add(word)
    return names


@pytest.fixture
def served(attached) -> set[str]:
    """The sample names of one scrape of a database that has seen a bit of everything."""
    db = attached
    db.execute("select booking_guard.set_setting('verification_grace', '0')")
    company = db.execute("insert into companies (name) values ('c') returning id").fetchone()[0]
    call = db.execute("insert into calls (retell_call_id, company_id, direction) values ('d-1', %s, 'inbound') returning id",
                      (company,)).fetchone()[0]
    db.execute("select booking_guard.record_booking(%s, 'cal-d-1')", (call,))
    db.execute("select booking_guard.record_booking(%s, 'cal-d-2')", (call + 1000,))          # refused: an alert, an item
    for _ in range(3):
        db.execute("select booking_guard.circuit_record_failure('appointment_booking:service:1', 'timeout')")
    db.execute("select booking_guard.circuit_reset('appointment_booking:service:1')")           # opened and recovered
    db.execute("update booking_guard.job_runs set scheduled_at = now()")                        # as schedule_jobs() does
    dsn = dsn_of(db)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MetricsCollector([TargetScraper("clinic", BoundedConnection(dsn, 10.0))]))
    text = generate_latest(registry).decode()
    names = {re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", line).group(0) for line in text.splitlines()
             if line and not line.startswith("#")}
    assert 'booking_guard_up{database="clinic"} 1.0' in text
    return names


def test_every_panel_query_names_only_served_metrics(served):
    assert len(exprs()) >= 20
    for title, expr in exprs():
        names = metric_names(expr)
        assert names, (title, expr)
        assert names <= served, (title, sorted(names - served))


def test_the_metric_name_parser(served):
    assert metric_names('sum by (database, type) (label_replace(booking_guard_open_alerts{a="b"}, "type", "$1",'
                        ' "rule", "(.*)")) * 1000') == {"booking_guard_open_alerts"}
    assert metric_names("count(circuit_breaker_state{state!=\"closed\"} == 1) or vector(0)") == {"circuit_breaker_state"}
    assert metric_names("histogram_quantile(0.95, sum by (le) (rate(x_bucket[5m])))") == {"x_bucket"}
    assert "no_such_metric" not in served


def test_every_series_is_picked_by_instance_and_database():
    for title, expr in exprs():
        selectors = re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*\{([^}]*)\}", expr)
        assert selectors, (title, expr)
        for matchers in selectors:
            assert 'instance=~"$instance"' in matchers and 'database=~"$database"' in matchers, (title, expr)


def test_the_database_variable_lists_the_exporters_databases():
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    database = variables["database"]
    assert database["type"] == "query" and database["multi"] and database["includeAll"]
    assert database["definition"] == 'label_values(booking_guard_up{instance=~"$instance"}, database)'
    assert variables["runbook_base"]["query"].endswith("/docs/runbooks/")


def test_the_on_call_panels_are_there_and_link_their_runbooks():
    by_title = {p["title"]: p for p in panels()}

    def links(panel: dict, field: str) -> list[str]:
        return [link["url"] for o in panel["fieldConfig"]["overrides"] if o["matcher"]["options"] == field
                for prop in o["properties"] if prop["id"] == "links" for link in prop["value"]]

    action = by_title["Open inconsistencies needing action, by type"]
    assert "booking_guard_open_inconsistencies" in action["targets"][0]["expr"]
    assert links(action, "type") == ["${runbook_base}${__value.raw}.md"]
    review = by_title["Review queue by priority"]
    assert "booking_guard_review_queue_open_items" in review["targets"][0]["expr"]
    assert links(review, "reason") == ["${runbook_base}${__value.raw}.md"]
    recent = by_title["Recent alerts: last detected per type, with its runbook"]
    assert any("booking_guard_alert_last_detected_timestamp_seconds" in t["expr"] for t in recent["targets"])
    assert links(recent, "type") == ["${runbook_base}${__value.raw}.md"]
    breakers = by_title["Circuit breakers: state and last opened"]
    assert any("circuit_breaker_last_opened_timestamp_seconds" in t["expr"] for t in breakers["targets"])
    assert links(breakers, "state") == ["${runbook_base}circuit_breaker_open.md"]
