"""Body of booking_guard.environment(): what booking_guard runs on, for the demo and bug reports.

PL/Python runs in the server's own Python (Debian's system 3.11), not in the project's
virtual environment: standard library only.
"""

import platform


def environment(plpy):
    versions = plpy.execute(
        "select e.extversion, current_setting('server_version') as server_version,"
        " (select extversion from pg_catalog.pg_extension where extname = 'pg_cron') as pg_cron,"
        " current_setting('shared_preload_libraries') as preload"
        " from pg_catalog.pg_extension e where e.extname = 'booking_guard'"
    )[0]
    pg_cron = versions["pg_cron"] or ("preloaded, not created" if "pg_cron" in versions["preload"] else "absent")
    return [
        ("booking_guard", versions["extversion"]),
        ("postgresql", versions["server_version"]),
        ("plpython", platform.python_version()),
        ("pg_cron", pg_cron),
    ]
