"""The status page, rendered by a real browser (Debian's headless Chromium)."""

import re
import shutil
import subprocess
import tempfile
import urllib.request
from pathlib import Path

import pytest
from test_exporter import dsn_of, running

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def chromium(url: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed (scripts/bootstrap installs it)")
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args, url],
        capture_output=True, text=True, timeout=90)


def plant_phantom_booking(db) -> None:
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
    db.execute("select booking_guard.record_booking(%s, 'cal-page-missing')", (call + 1000,))


def test_status_page_in_chromium_shows_the_planted_inconsistency(db, tmp_path):
    with running(dsn_of(db)) as service:
        host, port = service.address
        url = f"http://{host}:{port}/"
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200
            clean = response.read().decode()
        assert re.search(r'<span class="inconsistency-count">0</span>', clean)
        assert "<script" not in clean.lower()

        plant_phantom_booking(db)
        expected = db.execute("select count(*) from booking_guard.alerts where resolved_at is null").fetchone()[0]
        assert expected >= 1

        profile = Path(tempfile.mkdtemp(prefix="chromium-", dir=tmp_path))
        dom = chromium(url, profile, "--dump-dom")
        assert dom.returncode == 0, dom.stderr[-2000:]
        counts = re.findall(r'<span class="inconsistency-count">(\d+)</span>', dom.stdout)
        assert counts == [str(expected)]
        assert "appointment_booking:staff:7" in dom.stdout
        assert "missing_appointment" in dom.stdout            # the recent alerts table
        assert "appointment_validation_failed" in dom.stdout  # the review queue
        assert "50.0%" in dom.stdout                          # success rate: one booking recorded, one failed
        assert re.search(r'id="trends">.*?class="col"', dom.stdout, re.S)
        assert "call_not_found" in dom.stdout                 # failure breakdown

        shot = tmp_path / "status-page.png"
        result = chromium(url, profile, f"--screenshot={shot}", "--window-size=1280,1600")
        assert result.returncode == 0, result.stderr[-2000:]
        assert shot.exists()
        data = shot.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(data) > 20_000   # a rendered page, not a blank one
