"""Builds bench/results/latest.md and latest.json from the figures the benchmarks wrote to
$BENCH_JSON_DIR (bench/_common.emit), with the machine, the versions and the date.

    python bench/_report.py FIGURES_DIR STATUS_FILE
"""

import json
import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path

import psycopg
from _common import ROOT, conninfo, machine


def versions() -> dict:
    with psycopg.connect(conninfo("postgres")) as conn:
        pg = conn.execute("select version()").fetchone()[0].split(" on ")[0]
    control = (ROOT / "extension" / "booking_guard.control").read_text()
    ext = next(line.split("'")[1] for line in control.splitlines() if line.startswith("default_version"))
    return {"booking_guard": ext, "postgresql": pg, "python": platform.python_version(), "psycopg": psycopg.__version__}


def main() -> int:
    figures_dir, status_file = Path(sys.argv[1]), Path(sys.argv[2])
    status = dict(line.split() for line in status_file.read_text().splitlines() if line.strip())
    report = {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
              "load_average": round(os.getloadavg()[0], 1), "versions": versions(), "benchmarks": {}}
    for bench in sorted(status):
        path = figures_dir / f"{bench}.json"
        report["benchmarks"][bench] = {"status": "ok" if status[bench] == "0" else f"failed (exit {status[bench]})",
                                       "figures": json.loads(path.read_text()) if path.exists() else []}
    out = ROOT / "bench" / "results"
    (out / "latest.json").write_text(json.dumps(report, indent=2) + "\n")

    m, v = report["machine"], report["versions"]
    lines = [f"# booking_guard benchmarks, {report['date']}", "",
             f"Machine: {m['cpu']}, kernel {m['kernel']}, load average {report['load_average']} at the end. "
             f"Versions: booking_guard {v['booking_guard']}, {v['postgresql']}, Python {v['python']}, "
             f"psycopg {v['psycopg']}.", "",
             "Each figure beside its baseline, measured in the same run; ratio = figure / baseline. "
             "The raw output of every benchmark is in `latest.txt`.", "",
             "| benchmark | figure | value | baseline | baseline value | ratio | target |",
             "|---|---|---|---|---|---|---|"]

    def num(x: float | None) -> str:
        if x is None:
            return "–"
        return f"{x:,.0f}" if abs(x) >= 100 else f"{x:,.3g}"

    for bench, b in report["benchmarks"].items():
        if not b["figures"]:
            lines.append(f"| {bench} | {b['status']} | | | | | |")
        for f in b["figures"]:
            ratio = "–" if f["ratio"] is None else f"{f['ratio']:.2f}"
            lines.append(f"| {bench} | {f['name']} | {num(f['value'])} {f['unit']} | {f['baseline_name']} | "
                         f"{num(f['baseline'])} {f['unit']} | {ratio} | {f['target'] or ''} |")
    (out / "latest.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
