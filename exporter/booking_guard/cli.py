"""The `booking-guard` command: the operator's commands (booking_guard.ops.cli) and the
simulator's (booking_guard.sim.cli). The one module that sees both: ops never imports sim."""

import sys

from booking_guard.ops import cli as ops_cli
from booking_guard.sim import cli as sim_cli

COMMANDS = (*ops_cli.COMMANDS, *sim_cli.COMMANDS)


def main(argv: list[str] | None = None) -> int:
    return ops_cli.main(argv, COMMANDS)


if __name__ == "__main__":
    sys.exit(main())
