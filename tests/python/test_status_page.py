"""The status page, rendered by a real browser (Debian's headless Chromium)."""

import re
import shutil
import subprocess
import tempfile
import urllib.request
from pathlib import Path

import pytest
from support.services import dsn_of, running

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def chromium(url: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed (scripts/bootstrap installs it)")
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args, url],
        capture_output=True, text=True, timeout=90)


RUNBOOKS = "http://runbooks.example/booking_guard/"


def plant(db) -> None:
    """A day in the life: bookings by record_booking() and by plain SQL, a phantom booking (corrected at
    once and queued for a call back), a booking for a call that does not exist (a person must look),
    a calendar failure the application queued, and a breaker that opened."""
    db.execute("select booking_guard.attach('calls', 'appointments')")
    db.execute("select booking_guard.set_setting('verification_grace', '0')")
    company = db.execute("insert into companies (name) values ('c') returning id").fetchone()[0]
    db.execute("insert into calls (retell_call_id, company_id, direction, session_outcome, appointment_made)"
               " values ('phantom-page', %s, 'inbound', 'appointment_booked', false)", (company,))
    for _ in range(3):
        db.execute("select booking_guard.circuit_record_failure('appointment_booking:staff:7', 'timeout')")
    call = db.execute("insert into calls (retell_call_id, company_id, direction) values ('booked-page', %s, 'inbound')"
                      " returning id", (company,)).fetchone()[0]
    db.execute("select booking_guard.record_booking(%s, 'cal-page')", (call,))
    raw = db.execute("insert into calls (retell_call_id, company_id, direction) values ('raw-page', %s, 'inbound')"
                     " returning id", (company,)).fetchone()[0]
    with db.transaction():
        db.execute("insert into appointments (call_id, calcom_v2_booking_id) values (%s, 'cal-raw-page')", (raw,))
        db.execute("update calls set appointment_made = true, session_outcome = 'appointment_booked' where id = %s", (raw,))
    db.execute("select booking_guard.record_booking(%s, 'cal-page-missing')", (call + 1000,))
    db.execute("select booking_guard.queue_for_review(%s, 'calcom_booking_failed', '{\"error\": \"HTTP 503\"}')", (raw + 1,))


def test_status_page_in_chromium_shows_what_the_on_call_needs(db, tmp_path):
    with running(dsn_of(db), runbook_base=RUNBOOKS) as service:
        host, port = service.address
        url = f"http://{host}:{port}/"
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200
            clean = response.read().decode()
        assert re.search(r'<span class="inconsistency-count">0</span>', clean)
        assert "<script" not in clean.lower()

        plant(db)
        needing = db.execute("select count(*) from booking_guard.open_inconsistencies").fetchone()[0]
        corrected = db.execute("select count(*) from booking_guard.alerts where resolved_at is null and auto_corrected"
                               ).fetchone()[0]
        assert needing == 1 and corrected >= 1   # the refused booking; the phantom's alerts were corrected

        profile = Path(tempfile.mkdtemp(prefix="chromium-", dir=tmp_path))
        dom = chromium(url, profile, "--dump-dom")
        assert dom.returncode == 0, dom.stderr[-2000:]
        page = dom.stdout
        counts = re.findall(r'<span class="inconsistency-count">(\d+)</span>', page)
        assert counts == [str(needing)]
        # the success rate covers every booking: 2 written (record_booking and plain SQL), 2 that did not
        # stand (the refusal, the phantom rolled back); the latency says it is record_booking()'s alone
        assert re.search(r'id="success-rate">.*?50\.0%.*?of 4 bookings: 2 written, 2 did not stand', page, re.S)
        assert "2 appointment rows (1 through record_booking(), 1 by plain SQL or the calendar webhook)" in page
        assert re.search(r'id="latency">.*?record_booking\(\) calls only \(2 timed\)', page, re.S)
        # what needs action: the refused booking, linked to its runbook and its review item
        action = re.search(r'id="needs-action">(.*?)</section>', page, re.S).group(1)
        assert f'<a class="runbook" href="{RUNBOOKS}appointment_validation_failed.md">appointment_validation_failed</a>' \
            in action
        assert "cal-page-missing" in action and re.search(r"<td>#\d+</td>", action)
        assert "missing_appointment" not in action     # corrected: not a person's job
        # recent alerts link their runbooks too
        alerts = re.search(r'id="alerts">(.*?)</section>', page, re.S).group(1)
        assert f'href="{RUNBOOKS}missing_appointment.md"' in alerts
        # the review queue by priority: P1 (the rolled back phantom, the refused booking), P2 (the calendar failure)
        by_priority = re.search(r'id="review-by-priority">(.*?)</table>', page, re.S).group(1)
        rows = re.findall(r'>P(\d+)</td><td><a class="runbook" href="[^"]+">(\w+)</a></td><td>(\d+)</td>', by_priority)
        assert rows == [("1", "appointment_validation_failed", "2"), ("2", "calcom_booking_failed", "1")]
        assert "P1: 2 · P2: 1" in page
        # each breaker with its state and when it last opened
        breakers = re.search(r'id="circuit-breakers">(.*?)</section>', page, re.S).group(1)
        assert "appointment_booking:staff:7" in breakers and 'class="state open"' in breakers
        assert re.search(r'class="opened">\d+ s ago \(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC\)', breakers)
        assert re.search(r'id="trends">.*?class="col"', page, re.S)
        assert "call_not_found" in page                 # failure breakdown

        shot = tmp_path / "status-page.png"
        result = chromium(url, profile, f"--screenshot={shot}", "--window-size=1280,2200")
        assert result.returncode == 0, result.stderr[-2000:]
        assert shot.exists()
        data = shot.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(data) > 20_000   # a rendered page, not a blank one
