"""The simulator's commands of `booking-guard`: demo, simulate and soak (see booking_guard.cli)."""

from __future__ import annotations

import argparse

from booking_guard.ops.cli import Command, dsn_of, duration


def _sim_arguments(name: str):
    def add(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--calls", type=int, default=100_000 if name == "soak" else 1000)
        parser.add_argument("--workers", type=int, default=16 if name == "soak" else 4)
        parser.add_argument("--fault-rate", type=float, default=0.1, help="share of booking calls given a fault")
        parser.add_argument("--grace", type=duration, default=duration("1s"),
                            help="verification_grace for the run (default 1s; the extension's default is 5s)")
        parser.add_argument("--cooldown", type=duration, default=duration("2s"),
                            help="breaker cooldown for appointment_booking:%% (default 2s; the policy's default is 30s)")
        parser.add_argument("--monitor-every", type=duration, default=duration("1s"),
                            help="how often run_monitor() runs (pg_cron: every minute; default 1s)")
        parser.add_argument("--calcom-latency", type=duration, default=duration("2ms"))
        parser.add_argument("--calcom-failure-rate", type=float, default=0.005)
        parser.add_argument("--outage", type=str, action="append", default=None, metavar="AT:SECONDS",
                            help="a Cal.com outage when the fraction AT of the calls is placed (default 0.3:3)")
        parser.add_argument("--seed", type=int, default=1)
        parser.add_argument("--json", default=None, help="also write the verdict as JSON to this file")

    return add


def _sim_config(args: argparse.Namespace, parser: argparse.ArgumentParser):
    from booking_guard.sim.simulate import SimConfig

    try:
        outages = [(float(at), float(sec)) for at, sec in (o.split(":") for o in (args.outage or ["0.3:3"]))]
    except ValueError:
        parser.error("--outage takes AT:SECONDS, e.g. 0.3:3")
    return SimConfig(calls=args.calls, workers=args.workers, fault_rate=args.fault_rate, grace=args.grace,
                     cooldown=args.cooldown, monitor_every=args.monitor_every, calcom_latency=args.calcom_latency,
                     calcom_failure_rate=args.calcom_failure_rate, outages=outages, seed=args.seed)


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--serve", action="store_true",
                        help="after the story, keep serving the database (status page, /metrics, verify_due()) until"
                             " Ctrl-C, and print the URLs and the psql line")
    parser.add_argument("--listen", default="127.0.0.1:9188",
                        help="HOST:PORT of the status page and /metrics with --serve (default 127.0.0.1:9188)")


def _demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import signal
    import threading

    from booking_guard.ops.serve import parse_listen
    from booking_guard.sim.demo import run

    if not args.serve:
        return run(dsn_of(args))
    try:
        parse_listen(args.listen)
    except ValueError as error:
        parser.error(str(error))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return run(dsn_of(args), listen=args.listen, stop=stop)


def _simulate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from booking_guard.sim.soak import simulate_and_report

    return simulate_and_report(dsn_of(args), _sim_config(args, parser))


def _soak(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from booking_guard.sim.soak import soak

    return soak(dsn_of(args), _sim_config(args, parser), json_path=args.json)


COMMANDS = (
    Command("demo", "load the reference schema, attach booking_guard, run a faulty workload and tell what it made of it",
            ("booking-guard demo --dsn postgresql://postgres@/scratch",
             "booking-guard demo --serve --listen 127.0.0.1:9188 --dsn postgresql://postgres@/scratch"),
            _demo_arguments, _demo,
            "Use a throwaway database: the demo creates the reference tables and the extension, attaches\n"
            "booking_guard and shortens two settings. With --serve it then serves that database until Ctrl-C.\n"
            "Exit 1 when its verdict fails (anything missed, lost or flagged without cause)."),
    Command("simulate", "run the workload simulator (phone agents, a fake Cal.com, injected faults)",
            ("booking-guard simulate --calls 1000 --workers 4 --fault-rate 0.2 --dsn postgresql://postgres@/scratch",),
            _sim_arguments("simulate"), _simulate,
            "The ground truth goes to sim.faults of that database. Exit 1 when a worker failed."),
    Command("soak", "the simulator at scale, then the verdict against the ground truth; exit 1 if anything was missed,"
                    " lost or flagged without cause",
            ("booking-guard soak --calls 10000 --workers 8 --grace 2s --json verdict.json --dsn postgresql://postgres@/scratch",),
            _sim_arguments("soak"), _soak,
            "Exit 0 when the verdict passes, 1 when anything was missed, lost, inconsistent or flagged without cause."),
)
