"""The `booking-guard` command's conventions: global options before or after the command, an
example in every command's --help, and the exit codes its epilog and the README document."""

import subprocess
import sys

import pytest
from booking_guard import cli
from booking_guard.ops import cli as ops_cli
from conftest import ROOT
from support.services import dsn_of, free_port

COMMANDS = [c.name for c in cli.COMMANDS]


def booking_guard(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "booking_guard.cli", *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, env=env)


def test_every_command_is_there():
    assert COMMANDS == ["serve", "relay", "check", "report", "demo", "simulate", "soak"]


@pytest.mark.parametrize("argv, dsn", [
    (["--dsn", "host=before", "check"], "host=before"),
    (["check", "--dsn", "host=after"], "host=after"),
    (["check", "--since", "1 day", "--dsn", "host=after"], "host=after"),
    (["--dsn", "host=before", "check", "--dsn", "host=after"], "host=after"),   # the later one wins
    (["check"], None),                                                          # then $DATABASE_URL
])
def test_global_options_go_before_or_after_the_command(argv, dsn):
    parser = ops_cli.build_parser(cli.COMMANDS)
    assert parser.parse_args(argv).dsn == dsn


@pytest.mark.parametrize("command", COMMANDS)
def test_global_options_are_accepted_after_every_command(command):
    args = ops_cli.build_parser(cli.COMMANDS).parse_args([command, "--dsn", "host=after"])
    assert args.dsn == "host=after" and args.command == command


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_help_shows_an_example(command, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main([command, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "example" in out and f"booking-guard {command} " in out.split("example", 1)[1]
    assert "--dsn DSN" in out                       # the global option, after the command too


def test_the_epilog_documents_the_exit_codes(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    codes = out.split("exit codes:", 1)[1]
    for line in ("0  success", "1  error", "2  usage error"):
        assert line in codes
    assert "check: a critical finding" in codes and "check: a warning finding" in codes


def test_a_usage_error_exits_2():
    for args in (["serve", "--no-such-option"], ["check", "--dsn"], ["nonsense"], [], ["serve", "--listen", "nowhere"]):
        result = booking_guard(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert "usage: booking-guard" in result.stderr


def test_an_unreachable_database_exits_1_with_one_line():
    nowhere = f"host=127.0.0.1 port={free_port()} user=nobody dbname=nothing connect_timeout=2"
    for command in ("check", "report"):
        result = booking_guard(command, "--dsn", nowhere)
        assert result.returncode == 1, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"booking-guard {command}: error: "), result.stderr
        assert "Traceback" not in result.stderr


def test_check_exits_1_on_a_warning_and_2_on_a_critical_finding(attached):
    db = attached
    assert booking_guard("check", "--dsn", dsn_of(db)).returncode == 0
    db.execute("select booking_guard.set_rule('missing_direction', 'observe')")
    company = db.execute("insert into companies (name) values ('c') returning id").fetchone()[0]
    db.execute("insert into calls (retell_call_id, company_id) values ('no-direction', %s)", (company,))
    warning = booking_guard("check", "--dsn", dsn_of(db))
    assert warning.returncode == 1 and "missing_direction" in warning.stdout, warning.stdout + warning.stderr
    db.execute("select booking_guard.set_rule('phantom_booking', 'observe')")
    db.execute("select booking_guard.set_setting('verification_grace', '1 hour')")
    db.execute("insert into calls (retell_call_id, company_id, direction, session_outcome, appointment_made)"
               " values ('phantom-cli', %s, 'inbound', 'appointment_booked', false)", (company,))
    critical = booking_guard("check", "--dsn", dsn_of(db))
    assert critical.returncode == 2 and "phantom_booking" in critical.stdout, critical.stdout + critical.stderr
