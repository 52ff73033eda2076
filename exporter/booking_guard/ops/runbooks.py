"""Links to the runbooks: one page per alert type, review reason and Prometheus alert in
docs/runbooks/ (<name>.md), and the index (README.md) for anything else.

The pages ship with the repository, not with the package, so the status page and the relay link to
where the docs are served: `--runbook-base` (default: the project's pages on GitHub, the base the
Prometheus rules' runbook_url use). tests/python/test_runbooks.py keeps PAGES equal to the pages.
"""

from urllib.parse import quote

DEFAULT_BASE = "https://github.com/booking-guard/booking_guard/blob/main/docs/runbooks/"

#: The pages of docs/runbooks/ (without .md), the index aside.
PAGES = frozenset({
    # booking_guard's rules (alert types, and review reasons for duplicate_booking and orphaned_appointment)
    "phantom_booking", "missing_appointment", "missing_direction", "orphaned_appointment", "outcome_flag_mismatch",
    "unlinked_appointment", "booking_id_mismatch", "duplicate_booking", "customer_link", "recent_failures",
    # its other alert types and review reasons
    "appointment_validation_failed", "job_stalled", "alert_storm", "calcom_booking_failed", "retry_exhausted",
    "customer_creation_failed", "service_not_found", "ambiguous_orphan",
    # the Prometheus alerts of monitoring/alerts.yml
    "appointment_creation_high_failure_rate", "circuit_breaker_open", "data_inconsistencies_detected",
    "post_booking_validation_failures", "booking_guard_database_down", "booking_guard_exporter_down",
    "reconciliation_schedule_stalled",
})


def runbook_url(name: str | None, base: str = DEFAULT_BASE) -> str:
    """The page of an alert type or review reason, or the index when it has none."""
    base = base if base.endswith("/") else base + "/"
    page = name if name in PAGES else "README"
    return f"{base}{quote(page)}.md"
