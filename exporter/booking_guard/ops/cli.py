"""The `booking-guard` command: its parser, global options, exit codes, and the operator's commands
(serve, relay, check, report).

Other subpackages add commands of their own as `Command`s (booking_guard.sim's demo, simulate
and soak); booking_guard.cli puts them together, so that nothing here imports them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from booking_guard import __version__

UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2

DESCRIPTION = """\
booking_guard's command: serve the metrics, status page and alert relay of one database or a
fleet of them, check and report on consistency, and run the workload simulator."""

EPILOG = """\
Global options (--dsn) may come before or after the command: `booking-guard --dsn X check`
and `booking-guard check --dsn X` are the same. `booking-guard COMMAND --help` shows each
command's options and an example.

examples:
  booking-guard serve --dsn postgresql://bg_exporter@db1/clinics
  booking-guard serve --target clinics=postgresql://bg_exporter@db1/clinics --target 'dental=host=db2 dbname=dental'
  booking-guard check --since '1 day' --dsn postgresql://bg_exporter@db1/clinics

exit codes:
  0  success; check: no finding, or only info findings
  1  error: the database unreachable or a statement failed (one line on stderr);
     demo, simulate, soak: the run failed its verdict or a worker failed; check: a warning finding
  2  usage error: an unknown option, a bad value, an unusable target; check: a critical finding"""


@dataclass(frozen=True)
class Command:
    """A subcommand: how to add its options, and how to run it (returns the exit code)."""

    name: str
    help: str
    examples: tuple[str, ...]
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, argparse.ArgumentParser], int]
    notes: str = ""

    def epilog(self) -> str:
        text = ("examples:\n  " if len(self.examples) > 1 else "example:\n  ") + "\n  ".join(self.examples)
        return text + (f"\n\n{self.notes}" if self.notes else "")


def duration(value: str) -> float:
    """Seconds from '2.5', '500ms', '30s', '5m', '4h', '1d'."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|min|m|h|d)?\s*", value)
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration: {value!r} (examples: 30s, 5m, 4h)")
    seconds = float(match.group(1)) * UNITS[match.group(2) or "s"]
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"a duration must be positive: {value!r}")
    return seconds


def dsn_of(args: argparse.Namespace) -> str:
    """--dsn wherever it was given, else $DATABASE_URL, else "" (libpq's PG* variables)."""
    return args.dsn if args.dsn is not None else os.environ.get("DATABASE_URL", "")


def _global_options(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("--dsn", default=default, metavar="DSN",
                        help="PostgreSQL connection string (default: $DATABASE_URL, else the PG* variables)")


# --- serve and relay -------------------------------------------------------------------------------
def add_target_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "targets (the databases to watch; without these, --dsn or $DATABASE_URL is the one target, named after"
        " its database)")
    group.add_argument("--target", action="append", default=[], metavar="NAME=DSN",
                       help="a database and the name its series get in the label `database` (repeatable)")
    group.add_argument("--targets-file", default=None, metavar="FILE",
                       help="one target per line: NAME, white space, DSN; blank lines and lines starting with # are"
                            " skipped")


def targets_of(args: argparse.Namespace, parser: argparse.ArgumentParser):
    from booking_guard.ops.targets import TargetError, resolve

    try:
        return resolve(args.dsn, args.target, args.targets_file)
    except TargetError as error:
        parser.error(str(error))


def add_runbook_option(parser: argparse.ArgumentParser) -> None:
    from booking_guard.ops.runbooks import DEFAULT_BASE

    parser.add_argument("--runbook-base", default=os.environ.get("BOOKING_GUARD_RUNBOOK_BASE", DEFAULT_BASE),
                        metavar="URL",
                        help="where the runbook pages (docs/runbooks/*.md) are served: the status page and the relay's"
                             " messages link <URL><name>.md (default: $BOOKING_GUARD_RUNBOOK_BASE, else the project's"
                             " pages on GitHub)")


def add_relay_options(parser: argparse.ArgumentParser) -> None:
    from booking_guard.ops.connection import POOLER_MODES

    env = os.environ.get
    group = parser.add_argument_group("alert relay (Slack-compatible webhook, e-mail digest), one per target")
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


def relay_config(args: argparse.Namespace, dsn: str = ""):
    """The relay's configuration, or None when neither a webhook nor a digest is configured. Its
    `dsn` (and `database`) are set per target by serve."""
    from booking_guard.ops.relay import RelayConfig

    recipients = args.smtp_to or [r.strip() for r in os.environ.get("BOOKING_GUARD_SMTP_TO", "").split(",") if r.strip()]
    if not args.slack_webhook and not (args.smtp_host and recipients):
        return None
    config = RelayConfig(dsn=dsn, slack_webhook=args.slack_webhook, smtp_host=args.smtp_host,
                         smtp_port=args.smtp_port, smtp_from=args.smtp_from, smtp_to=recipients,
                         smtp_user=args.smtp_user, smtp_password=args.smtp_password, smtp_starttls=args.smtp_starttls,
                         digest_every=args.digest_every, poll_interval=args.poll_interval, lease=args.claim_lease,
                         batch=args.relay_batch, pooler=args.pooler, runbook_base=args.runbook_base)
    if args.relay_name:
        config.name = args.relay_name
    return config


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", default="127.0.0.1:9188", help="HOST:PORT to listen on (default 127.0.0.1:9188)")
    parser.add_argument("--scrape-timeout", type=duration, default=duration("1.5s"),
                        help="longest a scrape or the status page waits for a database (default 1.5s); the targets are"
                             " scraped at the same time, each within this")
    parser.add_argument("--verify-interval", type=duration, default=duration("1s"),
                        help="how often verify_due() runs in each target (default 1s)")
    parser.add_argument("--no-verify", action="store_true", help="do not run the due-verification loops")
    parser.add_argument("--health-grace", type=duration, default=duration("60s"),
                        help="/healthz answers 503 when a target's verification loop or relay has had no successful run"
                             " for this long plus its interval (default 60s)")
    add_runbook_option(parser)
    add_target_options(parser)
    add_relay_options(parser)


def _serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from booking_guard.ops.serve import ServeConfig, parse_listen, serve

    targets = targets_of(args, parser)
    try:
        parse_listen(args.listen)
        relay = relay_config(args)
    except ValueError as error:   # also a $BOOKING_GUARD_POOLER that is not one of --pooler's choices
        parser.error(str(error))
    return serve(ServeConfig(targets=targets, listen=args.listen, scrape_timeout=args.scrape_timeout,
                             verify_interval=args.verify_interval, verify=not args.no_verify,
                             relay=relay, health_grace=args.health_grace, runbook_base=args.runbook_base))


def _relay_arguments(parser: argparse.ArgumentParser) -> None:
    add_runbook_option(parser)
    add_target_options(parser)
    add_relay_options(parser)


def _relay(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import dataclasses
    import logging
    import signal
    import threading

    from booking_guard.ops.relay import Relay

    targets = targets_of(args, parser)
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
    relays = [Relay(dataclasses.replace(config, dsn=t.dsn, database=t.name)) for t in targets]
    threads = [threading.Thread(target=relay.run, args=(stop,), name=f"relay {t.name}", daemon=True)
               for relay, t in zip(relays, targets, strict=True)]
    for thread in threads:
        thread.start()
    while not stop.wait(1.0):
        pass
    for thread in threads:
        thread.join(timeout=5)
    return EXIT_OK


# --- check and report ------------------------------------------------------------------------------
def check(dsn: str, since: str) -> int:
    import psycopg

    from booking_guard.ops.display import render

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


def _check_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--since", default="1 hour", help="window to check (a PostgreSQL interval, default '1 hour')")


def _report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--day", default=None, help="YYYY-MM-DD (default: today)")
    parser.add_argument("--json", action="store_true", help="daily_report_json() instead of the text report")


COMMANDS = (
    Command("serve", "/metrics, /probe, /healthz, the status page, verify_due() every second and the alert relay, for"
                     " one database or several",
            ("booking-guard serve --dsn postgresql://bg_exporter@db1/clinics --slack-webhook https://hooks.slack.com/...",
             "booking-guard serve --targets-file /etc/booking-guard/targets --listen 0.0.0.0:9188",
             "booking-guard serve --target clinics=postgresql://bg_exporter@db1/clinics --target 'dental=host=db2 dbname=dental'"
             ),
            _serve_arguments, _serve,
            "/metrics serves every target, each series labelled database=\"NAME\"; /probe?target=NAME serves one.\n"
            "A targets file has one target per line, its name, white space, then its connection string:\n"
            "  clinics  postgresql://bg_exporter@db1/clinics\n"
            "  dental   host=db2 dbname=dental user=bg_exporter"),
    Command("relay", "only the alert relay (one per target)",
            ("booking-guard relay --dsn postgresql://bg_exporter@db1/clinics --smtp-host smtp.example.com"
             " --smtp-to oncall@example.com",),
            _relay_arguments, _relay),
    Command("check", "print detect()'s findings; exit 2 if any is critical, 1 if any is a warning, 0 if clean",
            ("booking-guard check --since '1 day' --dsn postgresql://bg_exporter@db1/clinics",),
            _check_arguments, lambda args, parser: check(dsn_of(args), args.since),
            "exit codes: 0 no finding, or only info findings; 1 a warning finding, or an error (the database\n"
            "unreachable: one line on stderr); 2 a critical finding, or a usage error"),
    Command("report", "the daily consistency report",
            ("booking-guard report --day 2026-11-24 --json --dsn postgresql://bg_exporter@db1/clinics",),
            _report_arguments, lambda args, parser: report(dsn_of(args), args.day, args.json)),
)


def build_parser(commands: Sequence[Command] = COMMANDS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="booking-guard", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"booking-guard {__version__}")
    _global_options(parser, None)
    # The same global options after the command: SUPPRESS keeps a subparser from overwriting, with its
    # default, a value given before the command.
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in commands:
        cmd = sub.add_parser(command.name, help=command.help, description=command.help, parents=[common],
                             epilog=command.epilog(),
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        command.add_arguments(cmd)
        cmd.set_defaults(_command=command, _parser=cmd)
    return parser


def main(argv: list[str] | None = None, commands: Sequence[Command] = COMMANDS) -> int:
    """Runs one command; returns its exit code (argparse exits 2 itself on a usage error)."""
    import psycopg

    args = build_parser(commands).parse_args(argv)
    command: Command = args._command
    try:
        return command.run(args, args._parser)
    except (psycopg.Error, OSError) as error:
        text = str(error).strip().splitlines()
        print(f"booking-guard {command.name}: error: {text[0] if text else type(error).__name__}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
