"""The runbook links of the status page and the relay: one page per alert type and review reason."""

from booking_guard.ops.runbooks import PAGES, runbook_url
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
