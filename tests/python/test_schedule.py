"""pg_cron for real: schedule_jobs() from a test database registers the jobs in cron's database
(cron.database_name = booking_guard, through dblink), idempotently; the registered commands do
their work and record their last success; a stalled job is alerted on; one real minute tick."""

import time

import psycopg
import pytest
from support.planted_rows import call, company

JOBS = {"daily_report": "5 0 * * *", "purge": "15 * * * *", "reconcile": "0 * * * *", "run_monitor": "* * * * *",
        "verify_due": "* * * * *"}


@pytest.fixture
def cron(db):
    """A connection to cron's database, with pg_cron created there; this test database's jobs removed afterwards."""
    cron_db = db.execute("select current_setting('cron.database_name', true)").fetchone()[0]
    if not cron_db:
        pytest.fail("pg_cron is not preloaded by this server (the sandbox preloads it)")
    info = db.info
    conn = psycopg.connect(host=info.host, port=info.port, user=info.user, dbname=cron_db,
                           password=info.password or None, autocommit=True)
    conn.execute("set client_min_messages = warning")
    conn.execute("create extension if not exists pg_cron")
    yield conn
    conn.execute("select cron.unschedule(jobid) from cron.job where database = %s", (info.dbname,))
    conn.close()


def command(db, job: str) -> str:
    return db.execute("select booking_guard_internal.job_command(%s)", (job,)).fetchone()[0]


def cron_jobs(cron, dbname: str) -> dict:
    rows = cron.execute("select jobname, schedule, command, active from cron.job where database = %s", (dbname,))
    return {r[0]: r[1:] for r in rows.fetchall()}


def test_schedule_jobs_registers_once(attached, cron):
    attached.execute("create extension dblink")
    dbname = attached.info.dbname
    rows = attached.execute("select job, schedule, command from booking_guard.schedule_jobs()").fetchall()
    assert {r[0]: r[1] for r in rows} == JOBS
    expected = {f"booking_guard.{job}@{dbname}": (schedule, command(attached, job), True) for job, schedule in JOBS.items()}
    assert cron_jobs(cron, dbname) == expected
    ids = sorted(r[0] for r in cron.execute("select jobid from cron.job where database = %s", (dbname,)).fetchall())
    # again: the same five jobs, not ten
    attached.execute("select * from booking_guard.schedule_jobs()")
    assert cron_jobs(cron, dbname) == expected
    assert sorted(r[0] for r in cron.execute("select jobid from cron.job where database = %s", (dbname,))) == ids
    status = attached.execute("select job, cron_jobid, cron_active, stalled from booking_guard.job_status()").fetchall()
    assert sorted((r[0], r[2], r[3]) for r in status) == [(job, True, False) for job in sorted(JOBS)]
    assert sorted(r[1] for r in status) == ids

    assert attached.execute("select booking_guard.unschedule_jobs()").fetchone()[0] == 5
    assert cron_jobs(cron, dbname) == {}


def test_registered_commands_do_their_work(attached, cron):
    attached.execute("create extension dblink")
    attached.execute("select * from booking_guard.schedule_jobs()")
    commands = dict(cron.execute("select jobname, command from cron.job where database = %s",
                                 (attached.info.dbname,)).fetchall())
    dbname = attached.info.dbname
    # an inconsistency the triggers leave alone, a call waiting on its due verification
    attached.execute("select booking_guard.set_rule('missing_direction', 'observe')")
    c = company(attached)
    attached.execute("select booking_guard.set_rule('missing_direction', 'off')")
    no_direction = call(attached, c, direction=None)
    attached.execute("select booking_guard.set_rule('missing_direction', 'observe')")
    claims = call(attached, c, session_outcome="appointment_booked", appointment_made=True)
    attached.execute("update booking_guard.due_verifications set due_at = now() - interval '1 second'")

    attached.execute(commands[f"booking_guard.run_monitor@{dbname}"])
    assert attached.execute("select entity_id from booking_guard.alerts where alert_type = 'missing_direction' "
                            "and resolved_at is null").fetchall() == [(str(no_direction),)]
    attached.execute(commands[f"booking_guard.verify_due@{dbname}"])
    assert attached.execute("select session_outcome from calls where id = %s", (claims,)).fetchone() \
        == ("creation_failed",)
    attached.execute("select booking_guard.set_rule('missing_direction', 'correct')")
    attached.execute(commands[f"booking_guard.reconcile@{dbname}"])
    assert attached.execute("select direction from calls where id = %s", (no_direction,)).fetchone() == ("inbound",)
    attached.execute(commands[f"booking_guard.daily_report@{dbname}"])
    attached.execute(commands[f"booking_guard.purge@{dbname}"])
    assert attached.execute("select day = current_date - 1 from booking_guard.reports").fetchall() == [(True,)]

    runs = attached.execute("select job, last_success_at is not null, last_error, runs from booking_guard.job_runs "
                            "order by job").fetchall()
    assert runs == [(job, True, None, 1) for job in sorted(JOBS)]
    result = attached.execute("select last_result from booking_guard.job_runs where job = 'verify_due'").fetchone()[0]
    assert result["judged"] == 1 and result["verdicts"] == {"rolled_back": 1}


def test_stalled_job_is_alerted(attached, cron):
    attached.execute("create extension dblink")
    attached.execute("select * from booking_guard.schedule_jobs()")
    attached.execute("update booking_guard.job_runs set scheduled_at = now() - interval '1 day', "
                     "last_success_at = now() - interval '10 minutes' where job = 'verify_due'")
    attached.execute("update booking_guard.job_runs set last_success_at = now() where job <> 'verify_due'")
    attached.execute("call booking_guard.run_job('run_monitor')")
    assert attached.execute("select entity_id from booking_guard.alerts where alert_type = 'job_stalled' "
                            "and resolved_at is null").fetchall() == [("verify_due",)]
    assert attached.execute("select job from booking_guard.job_status() where stalled").fetchall() == [("verify_due",)]
    attached.execute("call booking_guard.run_job('verify_due')")
    attached.execute("call booking_guard.run_job('run_monitor')")
    assert attached.execute("select count(*) from booking_guard.alerts where alert_type = 'job_stalled' "
                            "and resolved_at is null").fetchone()[0] == 0


def test_failed_job_is_recorded_not_raised(attached):
    """pg_cron's CALL succeeds; job_runs records the failure (the monitor alerts on a stale success)."""
    attached.execute("select booking_guard.detach()")
    attached.execute("call booking_guard.run_job('run_monitor')")
    row = attached.execute("select last_success_at, last_error, failures from booking_guard.job_runs "
                           "where job = 'run_monitor'").fetchone()
    assert row[0] is None and row[1].startswith("BG003") and row[2] == 1
    with pytest.raises(psycopg.Error) as caught:
        attached.execute("call booking_guard.run_job('nope')")
    assert caught.value.diag.sqlstate == "BG004"


def test_without_dblink_a_notice_and_nothing_else(attached, cron):
    notices = []
    attached.add_notice_handler(lambda d: notices.append((d.message_primary or "", d.message_detail or "")))
    attached.execute("set client_min_messages = notice")
    rows = attached.execute("select * from booking_guard.schedule_jobs()").fetchall()
    assert rows == []
    assert any("nothing was scheduled" in primary and "dblink" in detail for primary, detail in notices)
    assert cron_jobs(cron, attached.info.dbname) == {}
    assert attached.execute("select count(*) from booking_guard.job_runs where scheduled_at is not null").fetchone()[0] == 0


def test_help_lists_the_everyday_queries(db):
    topics = dict(db.execute("select topic, query from booking_guard.help()").fetchall())
    assert topics["what is wrong now (last hour)"] == "select * from booking_guard.inconsistencies;"
    assert len(topics) >= 15


@pytest.mark.slow
def test_one_real_minute_tick(attached, cron):
    """pg_cron itself runs the monitor within a minute and a bit: the alert and the last success appear."""
    attached.execute("create extension dblink")
    attached.execute("select booking_guard.set_rule('missing_direction', 'observe')")
    attached.execute("select booking_guard.set_rule('missing_direction', 'off')")
    no_direction = call(attached, company(attached), direction=None)
    attached.execute("select booking_guard.set_rule('missing_direction', 'observe')")
    attached.execute("select * from booking_guard.schedule_jobs()")
    deadline = time.monotonic() + 75
    while time.monotonic() < deadline:
        done = attached.execute("select last_success_at is not null from booking_guard.job_runs "
                                "where job = 'run_monitor'").fetchone()
        if done and done[0]:
            break
        time.sleep(1)
    else:
        details = cron.execute("select status, return_message from cron.job_run_details d join cron.job j using (jobid) "
                               "where j.database = %s", (attached.info.dbname,)).fetchall()
        pytest.fail(f"pg_cron did not run the monitor within 75 s: {details}")
    assert attached.execute("select entity_id from booking_guard.alerts where alert_type = 'missing_direction'"
                            ).fetchall() == [(str(no_direction),)]
    status = attached.execute("select cron_last_status from booking_guard.job_status() where job = 'run_monitor'"
                              ).fetchone()[0]
    assert status in ("succeeded", "running")


def test_pg_cron_missing_says_what_to_do(attached):
    notices = []
    attached.add_notice_handler(lambda d: notices.append((d.message_primary or "", d.message_detail or "",
                                                          d.message_hint or "")))
    attached.execute("set client_min_messages = notice")
    attached.execute("create extension dblink")
    # a "cron database" without pg_cron: the server's postgres database
    conninfo = attached.execute("select replace(booking_guard_internal.cron_connection(), "
                                "quote_literal(current_setting('cron.database_name')), 'postgres')").fetchone()[0]
    assert attached.execute("select booking_guard_internal.cron_state(%s)", (conninfo,)).fetchone()[0] == "not_created"
    assert attached.execute("select * from booking_guard.schedule_jobs(%s)", (conninfo,)).fetchall() == []
    assert "does not exist in cron.database_name" in notices[-1][1]
    # what a server without pg_cron in shared_preload_libraries is told
    attached.execute("select booking_guard_internal.cron_not_ready('not_loaded')")
    assert notices[-1][0].endswith("nothing was scheduled")
    assert "shared_preload_libraries" in notices[-1][1] and "shared_preload_libraries" in notices[-1][2]
    assert attached.execute("select count(*) from booking_guard.job_runs where scheduled_at is not null").fetchone()[0] == 0
