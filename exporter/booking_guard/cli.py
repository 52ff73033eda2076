"""The `booking-guard` command."""

import argparse
import os
import sys

from booking_guard import __version__


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
    args = parser.parse_args(argv)

    if args.command == "demo":
        from booking_guard.demo import run

        return run(args.dsn)
    return 2


if __name__ == "__main__":
    sys.exit(main())
