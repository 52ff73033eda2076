"""The `booking-guard` command."""

import argparse
import json
import os
import re
import sys

from booking_guard import __version__

UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


def duration(value: str) -> float:
    """Seconds from '2.5', '500ms', '30s', '5m', '4h', '1d'."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|min|m|h|d)?\s*", value)
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration: {value!r} (examples: 30s, 5m, 4h)")
    seconds = float(match.group(1)) * UNITS[match.group(2) or "s"]
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"a duration must be positive: {value!r}")
    return seconds


def add_relay_options(parser: argparse.ArgumentParser) -> None:
    from booking_guard.connection import POOLER_MODES

    env = os.environ.get
    group = parser.add_argument_group("alert relay (Slack-compatible webhook, e-mail digest)")
    group.add_argument("--slack-webhook", default=env("BOOKING_GUARD_SLACK_WEBHOOK"),
                       help="incoming-webhook URL for new alerts (default: $BOOKING_GUARD_SLACK_WEBHOOK)")
    group.add_argument("--smtp-host", default=env("BOOKING_GUARD_SMTP_HOST"), help="SMTP server for the digest")
    group.add_argument("--smtp-port", type=int, default=int(env("BOOKING_GUARD_SMTP_PORT", "25")))
    group.add_argument("--smtp-from", default=env("BOOKING_GUARD_SMTP_FROM", "booking-guard@localhost"))
    group.add_argument("--smtp-to", action="append", default=None,
                       help="digest recipient (repeatable; default: $BOOKING_GUARD_SMTP_TO, comma-separated)")
    group.add_argument("--smtp-user", default=env("BOOKING_GUARD_SMTP_USER"))
    group.add_argument("--smtp-password", default=env("BOOKING_GUARD_SMTP_PASSWORD"),
                       help="(default: $BOOKING_GUARD_SMTP_PASSWORD; prefer the variable to the flag)")
    group.add_argument("--smtp-starttls", action="store_true")
    group.add_argument("--digest-every", type=duration, default=duration("4h"), help="digest period (default 4h)")
    group.add_argument("--poll-interval", type=duration, default=duration("5s"),
                       help="how often the relay looks for alerts without a NOTIFY (default 5s)")
    group.add_argument("--claim-lease", type=duration, default=duration("30s"),
                       help="how long a claimed alert is reserved for the relay that claimed it (default 30s)")
    group.add_argument("--relay-batch", type=int, default=10, help="alerts per webhook message (default 10)")
    group.add_argument("--relay-name", default=None, help="this relay's name in the claims (default host:pid)")
    group.add_argument("--pooler", choices=POOLER_MODES,
                       default=env("BOOKING_GUARD_POOLER", "auto"),
                       help="what is between the relay and PostgreSQL: with 'transaction' the relay does not LISTEN and"
                            " only polls (notifications need a direct or session-mode connection); 'auto' (default,"
                            " $BOOKING_GUARD_POOLER) assumes 'transaction' when it detects a pooler")


def relay_config(args: argparse.Namespace):
    from booking_guard.relay import RelayConfig

    recipients = args.smtp_to or [r.strip() for r in os.environ.get("BOOKING_GUARD_SMTP_TO", "").split(",") if r.strip()]
    if not args.slack_webhook and not (args.smtp_host and recipients):
        return None
    config = RelayConfig(dsn=args.dsn, slack_webhook=args.slack_webhook, smtp_host=args.smtp_host,
                         smtp_port=args.smtp_port, smtp_from=args.smtp_from, smtp_to=recipients,
                         smtp_user=args.smtp_user, smtp_password=args.smtp_password, smtp_starttls=args.smtp_starttls,
                         digest_every=args.digest_every, poll_interval=args.poll_interval, lease=args.claim_lease,
                         batch=args.relay_batch, pooler=args.pooler)
    if args.relay_name:
        config.name = args.relay_name
    return config


def check(dsn: str, since: str) -> int:
    import psycopg

    from booking_guard.display import render

    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(
            "select severity, rule, entity_type, entity_id, details::text as details from booking_guard.detect(%s::interval)"
            " order by array_position(array['critical', 'warning', 'info'], severity), rule, entity_id", (since,))
        rows = cur.fetchall()
        names = [c.name for c in cur.description]
    if not rows:
        print(f"booking_guard check: no findings in the last {since}")
        return 0
    print(render(names, [["" if v is None else str(v) for v in row] for row in rows], {"details": 70}), end="")
    severities = [row[0] for row in rows]
    print(f"{len(rows)} finding(s): {severities.count('critical')} critical, {severities.count('warning')} warning,"
          f" {severities.count('info')} info")
    return 2 if "critical" in severities else 1 if "warning" in severities else 0


def report(dsn: str, day: str | None, as_json: bool) -> int:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        if as_json:
            value = conn.execute("select booking_guard.daily_report_json(coalesce(%s::date, current_date))", (day,)).fetchone()[0]
            print(json.dumps(value, indent=2, default=str))
        else:
            print(conn.execute("select booking_guard.daily_report(coalesce(%s::date, current_date))", (day,)).fetchone()[0])
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="booking-guard", description=__doc__)
    parser.add_argument("--version", action="version", version=f"booking-guard {__version__}")
    parser.add_argument(
        "--dsn",
        default=os.environ.get("DATABASE_URL", ""),
        help="PostgreSQL connection string (default: $DATABASE_URL, else the PG* variables)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="load the reference schema, attach booking_guard and show what it guards")

    serve_cmd = commands.add_parser(
        "serve", help="/metrics, /healthz, the status page, verify_due() every second, the alert relay")
    serve_cmd.add_argument("--listen", default="127.0.0.1:9188", help="HOST:PORT to listen on (default 127.0.0.1:9188)")
    serve_cmd.add_argument("--scrape-timeout", type=duration, default=duration("1.5s"),
                           help="longest a scrape or the status page waits for the database (default 1.5s)")
    serve_cmd.add_argument("--verify-interval", type=duration, default=duration("1s"),
                           help="how often verify_due() runs (default 1s)")
    serve_cmd.add_argument("--no-verify", action="store_true", help="do not run the due-verification loop")
    serve_cmd.add_argument("--health-grace", type=duration, default=duration("60s"),
                           help="/healthz answers 503 when the verification loop or the relay has had no successful run"
                                " for this long plus its interval (default 60s)")
    add_relay_options(serve_cmd)

    relay_cmd = commands.add_parser("relay", help="only the alert relay")
    add_relay_options(relay_cmd)

    check_cmd = commands.add_parser("check", help="print detect()'s findings; exit 2 if any is critical, 1 if any is a"
                                                  " warning, 0 if clean")
    check_cmd.add_argument("--since", default="1 hour", help="window to check (a PostgreSQL interval, default '1 hour')")

    report_cmd = commands.add_parser("report", help="the daily consistency report")
    report_cmd.add_argument("--day", default=None, help="YYYY-MM-DD (default: today)")
    report_cmd.add_argument("--json", action="store_true", help="daily_report_json() instead of the text report")
    for name, help_text in (("simulate", "run the workload simulator (phone agents, a fake Cal.com, injected faults)"),
                            ("soak", "the simulator at scale, then the verdict against the ground truth; exit 1 if"
                                     " anything was missed, lost or flagged without cause")):
        sim_cmd = commands.add_parser(name, help=help_text)
        sim_cmd.add_argument("--calls", type=int, default=100_000 if name == "soak" else 1000)
        sim_cmd.add_argument("--workers", type=int, default=16 if name == "soak" else 4)
        sim_cmd.add_argument("--fault-rate", type=float, default=0.1, help="share of booking calls given a fault")
        sim_cmd.add_argument("--grace", type=duration, default=duration("1s"),
                             help="verification_grace for the run (default 1s; the seed's is 5s)")
        sim_cmd.add_argument("--cooldown", type=duration, default=duration("2s"),
                             help="breaker cooldown for appointment_booking:%% (default 2s; the seed's is 30s)")
        sim_cmd.add_argument("--monitor-every", type=duration, default=duration("1s"),
                             help="how often run_monitor() runs (pg_cron: every minute; default 1s)")
        sim_cmd.add_argument("--calcom-latency", type=duration, default=duration("2ms"))
        sim_cmd.add_argument("--calcom-failure-rate", type=float, default=0.005)
        sim_cmd.add_argument("--outage", type=str, action="append", default=None, metavar="AT:SECONDS",
                             help="a Cal.com outage when the fraction AT of the calls is placed (default 0.3:3)")
        sim_cmd.add_argument("--seed", type=int, default=1)
        sim_cmd.add_argument("--json", default=None, help="also write the verdict as JSON to this file")
    args = parser.parse_args(argv)

    if args.command == "demo":
        from booking_guard.demo import run

        return run(args.dsn)
    if args.command == "serve":
        from booking_guard.serve import ServeConfig, parse_listen, serve

        try:
            parse_listen(args.listen)
            relay = relay_config(args)
        except ValueError as error:   # also a $BOOKING_GUARD_POOLER that is not one of --pooler's choices
            parser.error(str(error))
        return serve(ServeConfig(dsn=args.dsn, listen=args.listen, scrape_timeout=args.scrape_timeout,
                                 verify_interval=args.verify_interval, verify=not args.no_verify,
                                 relay=relay, health_grace=args.health_grace))
    if args.command == "relay":
        import logging
        import signal
        import threading

        from booking_guard.relay import Relay

        try:
            config = relay_config(args)
        except ValueError as error:
            parser.error(str(error))
        if config is None:
            parser.error("relay: give --slack-webhook, or --smtp-host with --smtp-to")
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        Relay(config).run(stop)
        return 0
    if args.command in ("simulate", "soak"):
        from booking_guard.simulate import SimConfig

        try:
            outages = [(float(at), float(sec)) for at, sec in (o.split(":") for o in (args.outage or ["0.3:3"]))]
        except ValueError:
            parser.error("--outage takes AT:SECONDS, e.g. 0.3:3")
        config = SimConfig(calls=args.calls, workers=args.workers, fault_rate=args.fault_rate, grace=args.grace,
                           cooldown=args.cooldown, monitor_every=args.monitor_every, calcom_latency=args.calcom_latency,
                           calcom_failure_rate=args.calcom_failure_rate, outages=outages, seed=args.seed)
        if args.command == "soak":
            from booking_guard.soak import soak

            return soak(args.dsn, config, json_path=args.json)
        from booking_guard.soak import simulate_and_report

        return simulate_and_report(args.dsn, config)
    if args.command == "check":
        return check(args.dsn, args.since)
    if args.command == "report":
        return report(args.dsn, args.day, args.json)
    return 2


if __name__ == "__main__":
    sys.exit(main())
