"""A real Prometheus (Debian's `prometheus`) on a free loopback port, evaluating the repository's
alert rules (monitoring/alerts.yml) with windows short enough for a test."""

import json
import re
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

from conftest import ROOT

from support.services import free_port

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


def fast_rules(source: str) -> str:
    """The real rules with test-sized windows: `for` of a few seconds, rate windows of 30 s."""
    rules = re.sub(r"for: \d+m", "for: 3s", source)
    return re.sub(r"\[(5|10)m\]", "[30s]", rules)


class Prometheus:
    def __init__(self, workdir: Path, target: str, scrape_configs: str | None = None) -> None:
        """Scrapes `target` (HOST:PORT) as job booking_guard, or what `scrape_configs` (YAML) says."""
        self.port = free_port()
        (workdir / "rules.yml").write_text(fast_rules((ROOT / "monitoring" / "alerts.yml").read_text()))
        (workdir / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
            "rule_files: [rules.yml]\n"
            + (scrape_configs or "scrape_configs:\n  - job_name: booking_guard\n"
                                 f"    static_configs:\n      - targets: ['{target}']\n"))
        self.log = open(workdir / "prometheus.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            cwd=workdir, stdout=self.log, stderr=subprocess.STDOUT)

    def get(self, path: str, **params: str) -> dict:
        url = f"http://127.0.0.1:{self.port}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
