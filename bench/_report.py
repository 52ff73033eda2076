"""The benchmark report. scripts/run-bench keeps each benchmark's run on its own, then builds the
report of all of them:

    python bench/_report.py keep NAME EXIT_STATUS FIGURES_JSON
        bench/results/figures/NAME.json: the figures the benchmark wrote (bench/_common.emit), its
        status, the date, the machine, the load average and the versions of that run
    python bench/_report.py report
        bench/results/latest.md and latest.json from every kept run, each row with its run's date
"""

import json
import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path

import psycopg
from _common import ROOT, conninfo, machine

RESULTS = ROOT / "bench" / "results"
KEPT = RESULTS / "figures"


def versions() -> dict:
    with psycopg.connect(conninfo("postgres")) as conn:
        pg = conn.execute("select version()").fetchone()[0].split(" on ")[0]
    control = (ROOT / "extension" / "booking_guard.control").read_text()
    ext = next(line.split("'")[1] for line in control.splitlines() if line.startswith("default_version"))
    return {"booking_guard": ext, "postgresql": pg, "python": platform.python_version(), "psycopg": psycopg.__version__}


def keep(name: str, exit_status: str, figures_file: Path) -> None:
    figures = json.loads(figures_file.read_text()) if figures_file.exists() else []
    run = {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
           "load_average": round(os.getloadavg()[0], 1), "versions": versions(),
           "status": "ok" if exit_status == "0" else f"failed (exit {exit_status})", "figures": figures}
    KEPT.mkdir(parents=True, exist_ok=True)
    (KEPT / f"{name}.json").write_text(json.dumps(run, indent=2) + "\n")


def num(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:,.3g}"


def report() -> None:
    runs = {path.stem: json.loads(path.read_text()) for path in sorted(KEPT.glob("*.json"))}
    (RESULTS / "latest.json").write_text(json.dumps({"benchmarks": runs}, indent=2) + "\n")
    lines = ["# booking_guard benchmarks", "",
             "Each figure beside its baseline, measured in the same run of its benchmark; ratio = figure / "
             "baseline. What each benchmark printed is in `output/<benchmark>.txt`.", "",
             "| benchmark | run | load | booking_guard | figure | value | baseline | baseline value | ratio | target |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for bench, run in runs.items():
        head = f"| {bench} | {run['date']} | {run['load_average']} | {run['versions']['booking_guard']} |"
        if not run["figures"] or run["status"] != "ok":
            lines.append(f"{head} {run['status']} | | | | | |")
        for f in run["figures"]:
            ratio = "–" if f["ratio"] is None else f"{f['ratio']:.2f}"
            lines.append(f"{head} {f['name']} | {num(f['value'])} {f['unit']} | {f['baseline_name']} | "
                         f"{num(f['baseline'])} {f['unit']} | {ratio} | {f['target'] or ''} |")
    machines = {json.dumps(run["machine"], sort_keys=True) for run in runs.values()}
    pgs = {run["versions"]["postgresql"] for run in runs.values()}
    lines += ["", "Machine: " + "; ".join(f"{m['cpu']}, kernel {m['kernel']}" for m in map(json.loads, sorted(machines)))
              + ". " + "; ".join(sorted(pgs)) + "."]
    (RESULTS / "latest.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> int:
    if sys.argv[1:2] == ["keep"] and len(sys.argv) == 5:
        keep(sys.argv[2], sys.argv[3], Path(sys.argv[4]))
    elif sys.argv[1:] == ["report"]:
        report()
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
