"""End to end: a real Prometheus (Debian's `prometheus`) on loopback scrapes the exporter and
evaluates monitoring/alerts.yml; a planted phantom booking makes DataInconsistenciesDetected
go pending, then firing, as seen through Prometheus's HTTP API."""

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT
from support.prometheus import PROMETHEUS, Prometheus
from support.services import dsn_of, running, wait_for


@pytest.fixture
def exporter_and_prometheus(attached, tmp_path) -> Iterator[tuple[object, Prometheus]]:
    if not Path(PROMETHEUS).exists():
        pytest.fail("prometheus is not installed (scripts/bootstrap installs it)")
    with running(dsn_of(attached)) as service:
        host, port = service.address
        prometheus = Prometheus(tmp_path, f"{host}:{port}")
        try:
            wait_for(prometheus.ready, 30, "Prometheus to be ready", prometheus.proc)
            yield attached, prometheus
        finally:
            prometheus.stop()


@pytest.mark.slow
def test_a_phantom_booking_fires_the_consistency_alert_in_prometheus(exporter_and_prometheus):
    db, prometheus = exporter_and_prometheus
    db.execute("select booking_guard.set_setting('verification_grace', '0')")

    def scraped_zero():
        result = prometheus.get("/api/v1/query", query='data_inconsistency_detected_total{type="phantom_booking"}')
        return [r for r in result["data"]["result"] if r["value"][1] == "0"]

    # the counter is in Prometheus at 0 before the booking, so rate() sees its first increase
    wait_for(scraped_zero, 30, "the first scrape of data_inconsistency_detected_total", prometheus.proc)
    assert prometheus.get("/api/v1/alerts")["data"]["alerts"] == []

    company = db.execute("insert into companies (name) values ('c') returning id").fetchone()[0]
    db.execute("insert into calls (retell_call_id, company_id, direction, session_outcome, appointment_made)"
               " values ('phantom-e2e', %s, 'inbound', 'appointment_booked', false)", (company,))

    seen: list[str] = []

    def state_of_alert(wanted: str):
        for alert in prometheus.get("/api/v1/alerts")["data"]["alerts"]:
            labels = alert["labels"]
            if labels.get("alertname") == "DataInconsistenciesDetected" and labels.get("type") == "phantom_booking":
                if not seen or seen[-1] != alert["state"]:
                    seen.append(alert["state"])
                if alert["state"] == wanted:
                    return alert
        return None

    wait_for(lambda: state_of_alert("pending"), 30, "DataInconsistenciesDetected to be pending", prometheus.proc)
    firing = wait_for(lambda: state_of_alert("firing"), 30, "DataInconsistenciesDetected to fire", prometheus.proc)
    assert seen[:2] == ["pending", "firing"]
    assert firing["labels"]["severity"] == "warning"
    assert firing["labels"]["job"] == "booking_guard"
    assert "phantom_booking" in firing["annotations"]["description"]
    # the exporter is up, and the critical rules stay silent
    names = {a["labels"]["alertname"] for a in prometheus.get("/api/v1/alerts")["data"]["alerts"]}
    assert "BookingGuardDatabaseDown" not in names and "CircuitBreakerOpen" not in names
    up = prometheus.get("/api/v1/query", query="booking_guard_up")["data"]["result"]
    assert [r["value"][1] for r in up] == ["1"]

    # a breaker that opens fires the critical CircuitBreakerOpen, named by its key
    for _ in range(3):
        db.execute("select booking_guard.circuit_record_failure('appointment_booking:service:42', 'timeout')")

    def breaker_alert():
        return [a for a in prometheus.get("/api/v1/alerts")["data"]["alerts"]
                if a["labels"].get("alertname") == "CircuitBreakerOpen" and a["state"] == "firing"]

    [breaker] = wait_for(breaker_alert, 30, "CircuitBreakerOpen to fire", prometheus.proc)
    assert breaker["labels"]["key"] == "appointment_booking:service:42"
    assert breaker["labels"]["severity"] == "critical"


@pytest.mark.slow
def test_every_dashboard_query_runs_in_prometheus(exporter_and_prometheus):
    _, prometheus = exporter_and_prometheus
    wait_for(lambda: prometheus.get("/api/v1/query", query="booking_guard_up")["data"]["result"], 30,
          "the first scrape", prometheus.proc)
    dashboard = json.loads((ROOT / "monitoring" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 15
    for expr in exprs:
        query = expr.replace("$instance", ".*").replace("$database", ".*").replace("$__rate_interval", "1m")
        result = prometheus.get("/api/v1/query", query=query)
        assert result["status"] == "success", (expr, result)
    # the rows top to bottom: the overview, then what needs action, then the rest
    rows = [p["title"] for p in sorted(dashboard["panels"], key=lambda p: p["gridPos"]["y"]) if p["type"] == "row"]
    assert rows[:6] == ["Overview", "Needs Action", "Success vs Failure Trends",
                        "Failure Breakdown and Circuit Breaker Status", "Data Consistency Alerts", "Validation Performance"]
