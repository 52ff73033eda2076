"""The runbooks: one page per alert type, review reason and Prometheus alert, each with the same four
parts, linked from every Prometheus rule, the status page and the relay."""

import re

from booking_guard.ops.runbooks import DEFAULT_BASE, PAGES, runbook_url
from conftest import ROOT

RUNBOOKS = ROOT / "docs" / "runbooks"


def test_the_pages_known_to_the_package_are_the_pages_of_docs_runbooks():
    assert {p.stem for p in RUNBOOKS.glob("*.md")} - {"README"} == PAGES


def test_every_alert_type_and_review_reason_has_a_page(db):
    names = {r[0] for r in db.execute("select alert_type from booking_guard_internal.alert_types()"
                                      " union select reason from booking_guard.review_priorities")}
    assert names - PAGES == set()


def test_a_url_per_page_and_the_index_for_anything_else():
    assert runbook_url("duplicate_booking", "http://docs.example/rb") == "http://docs.example/rb/duplicate_booking.md"
    assert runbook_url("reconcile_run", "http://docs.example/rb/") == "http://docs.example/rb/README.md"
    assert runbook_url(None).endswith("/docs/runbooks/README.md")


def test_every_page_says_what_it_means_and_how_to_confirm_fix_and_prevent_it():
    for page in sorted(PAGES):
        headings = re.findall(r"^## (\w+)", (RUNBOOKS / f"{page}.md").read_text(), re.M)
        assert headings == ["What", "Confirm", "Fix", "Prevent"], page


def test_every_prometheus_rule_links_its_page():
    rules = (ROOT / "monitoring" / "alerts.yml").read_text()
    alerts = re.findall(r"^\s+- alert: (\w+)$", rules, re.M)
    urls = re.findall(r"^\s+runbook_url: (\S+)$", rules, re.M)
    assert len(alerts) >= 8 and len(urls) == len(alerts)
    pages = [u.removeprefix(DEFAULT_BASE).removesuffix(".md") for u in urls]
    assert all(u == runbook_url(p) for u, p in zip(urls, pages, strict=True)), urls
    assert set(pages) <= PAGES and len(set(pages)) == len(pages), pages
