"""The workload simulator, the soak, the demo and the fake Cal.com (`booking-guard simulate`,
`soak`, `demo`). May import booking_guard.app and booking_guard.ops; nothing imports it but the
`booking-guard` command (booking_guard.cli).

The reference application schema (calls, appointments, companies, ...) is package data,
data/app_schema.sql, so that an installed wheel runs the demo outside a checkout;
examples/app_schema.sql in the repository is a symbolic link to it.
"""

from importlib.resources import files


def app_schema() -> str:
    """The SQL of the reference application schema (the tables booking_guard attaches to)."""
    return files(__name__).joinpath("data", "app_schema.sql").read_text(encoding="utf-8")
