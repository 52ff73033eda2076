"""booking_guard.metrics(): what each series counts, exactly once, without touching the booking path."""

import threading

import psycopg
import pytest
from support.planted_rows import lone_call


def series(conn: psycopg.Connection) -> dict[tuple[str, tuple], float]:
    rows = conn.execute("select name, labels, value from booking_guard.metrics()").fetchall()
    return {(name, tuple(sorted(labels.items()))): value for name, labels, value in rows}


def value(conn: psycopg.Connection, name: str, **labels: str) -> float | None:
    return series(conn).get((name, tuple(sorted(labels.items()))))


def test_every_row_is_well_formed_and_counters_start_at_zero(db):
    rows = db.execute("select name, type, help, labels, value from booking_guard.metrics()").fetchall()
    assert rows
    for name, typ, help_text, labels, val in rows:
        assert typ in ("counter", "gauge", "histogram"), name
        assert help_text
        assert isinstance(labels, dict)
        assert val is not None
        if typ == "counter":
            assert name.endswith("_total"), name
    names = {r[0] for r in rows}
    for seed_name in ("appointment_creation_success_total", "appointment_creation_failure_total",
                      "appointment_creation_duration_seconds_bucket", "appointment_validation_failure_total",
                      "data_inconsistency_detected_total", "data_inconsistency_auto_corrected_total",
                      "data_inconsistency_manual_review_total", "circuit_breaker_state_changes_total",
                      "circuit_breaker_fast_fail_total", "circuit_breaker_recovery_time_seconds_bucket",
                      "booking_guard_open_alerts", "booking_guard_review_queue_items", "booking_guard_due_verifications"):
        assert seed_name in names, seed_name
    # every rule's inconsistency counter exists at 0 before its first increase (rate() needs that sample)
    rules = [r[0] for r in db.execute("select name from booking_guard.rules").fetchall()]
    for rule in rules:
        assert value(db, "data_inconsistency_detected_total", type=rule) == 0


def test_a_phantom_booking_is_counted_once_and_opens_an_alert(attached):
    db = attached
    db.execute("select booking_guard.set_setting('verification_grace', '0')")
    before = series(db)
    lone_call(db, "phantom-1", session_outcome="appointment_booked", appointment_made=False)
    after = series(db)
    assert after[("data_inconsistency_detected_total", (("type", "phantom_booking"),))] == 1
    assert after[("data_inconsistency_detected_total", (("type", "missing_appointment"),))] == 1
    assert after[("data_inconsistency_auto_corrected_total", ())] == 2
    assert after[("data_inconsistency_manual_review_total", ())] == 1
    assert after[("booking_guard_open_alerts", (("rule", "missing_appointment"), ("severity", "critical")))] == 1
    assert after[("booking_guard_review_queue_items", (("status", "pending"),))] == 1
    assert before[("data_inconsistency_detected_total", (("type", "phantom_booking"),))] == 0
    # scraping again counts nothing twice
    assert series(db)[("data_inconsistency_detected_total", (("type", "phantom_booking"),))] == 1


def test_record_booking_feeds_the_creation_and_validation_series(attached):
    db = attached
    ok_call = lone_call(db, "ok-1")
    result = db.execute("select success from booking_guard.record_booking(%s, 'cal-ok-1')", (ok_call,)).fetchone()
    assert result == (True,)
    missing = db.execute("select coalesce(max(id), 0) + 1000 from calls").fetchone()[0]
    failed = db.execute("select success, reason from booking_guard.record_booking(%s, 'cal-missing')", (missing,)).fetchone()
    assert failed == (False, "call_not_found")
    s = series(db)
    assert s[("appointment_creation_success_total", ())] == 1
    assert s[("appointment_creation_failure_total", (("reason", "call_not_found"),))] == 1
    assert s[("appointment_creation_duration_seconds_count", ())] == 2
    assert s[("appointment_creation_duration_seconds_bucket", (("le", "+Inf"),))] == 2
    timed_ms = db.execute("select sum((details ->> 'duration_ms')::float8) from booking_guard.events"
                          " where kind = 'record_booking'").fetchone()[0]
    assert timed_ms > 0   # the sum is the durations the two calls logged, in seconds
    assert s[("appointment_creation_duration_seconds_sum", ())] == pytest.approx(timed_ms / 1000)
    buckets = sorted((float(dict(k[1])["le"].replace("+Inf", "inf")), v) for k, v in s.items()
                     if k[0] == "appointment_creation_duration_seconds_bucket")
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)   # cumulative
    assert s[("appointment_validation_total", ())] == 2
    assert s[("appointment_validation_failure_total", (("type", "call_not_found"),))] == 1
    assert s[("appointment_validation_success_rate", ())] == 0.5


def test_unbounded_reasons_become_other_and_malformed_details_do_not_stop_the_fold(db):
    db.execute("""select booking_guard_internal.log_event('validation', null, 'call', '1',
                  '{"success": false, "reason": "Call 12345 failed at 10:42!", "duration_ms": "slow"}')""")
    db.execute("""select booking_guard_internal.log_event('validation', null, 'call', '2',
                  '{"success": "maybe", "reason": null, "duration_ms": 1e400}')""")
    db.execute("""select booking_guard_internal.log_event('validation', null, 'call', '3',
                  '{"success": true, "duration_ms": 2}')""")
    s = series(db)
    assert s[("appointment_validation_failure_total", (("type", "other"),))] == 1
    assert s[("appointment_validation_total", ())] == 2          # the one without a boolean success is not a validation
    assert s[("appointment_validation_duration_seconds_count", ())] == 1
    assert s[("booking_guard_metrics_events_folded_total", ())] == 3
    for (name, labels), _ in s.items():
        for _, label_value in labels:
            assert "12345" not in label_value, (name, labels)


def test_each_event_is_folded_exactly_once_whatever_the_commit_order(db, connect):
    early = connect(autocommit=False)
    late = connect()
    # `early` takes its transaction id first and commits last: its events are folded after it commits
    early.execute("select pg_current_xact_id()")
    early.execute("select booking_guard_internal.log_event('review', 'r', 'call', '1')")
    late.execute("select booking_guard_internal.log_event('review', 'r', 'call', '2')")
    # the horizon waits for the oldest running transaction: `late` is delayed, not lost
    assert value(db, "data_inconsistency_manual_review_total") == 0
    assert db.execute("select count(*) from booking_guard.events where kind = 'review'").fetchone()[0] == 1
    early.commit()
    assert value(db, "data_inconsistency_manual_review_total") == 2
    assert value(db, "data_inconsistency_manual_review_total") == 2
    # a rolled-back transaction's events never count
    aborted = connect(autocommit=False)
    aborted.execute("select booking_guard_internal.log_event('review', 'r', 'call', '3')")
    aborted.rollback()
    assert value(db, "data_inconsistency_manual_review_total") == 2


def test_a_transaction_open_in_another_database_does_not_hold_the_fold_back(db, connect):
    info = db.info
    elsewhere = psycopg.connect(host=info.host, port=info.port, user=info.user, dbname="postgres",
                                password=info.password or None)
    try:
        # an old transaction of the cluster, in another database: it cannot write these events
        elsewhere.execute("select pg_current_xact_id()")
        db.execute("select booking_guard_internal.log_event('review', 'r', 'call', '1')")
        assert value(db, "data_inconsistency_manual_review_total") == 1
        # one open here still holds it: its events may yet commit
        here = connect(autocommit=False)
        here.execute("select pg_current_xact_id()")
        db.execute("select booking_guard_internal.log_event('review', 'r', 'call', '2')")
        assert value(db, "data_inconsistency_manual_review_total") == 1
        here.commit()
        assert value(db, "data_inconsistency_manual_review_total") == 2
    finally:
        elsewhere.close()


def test_concurrent_writers_and_folds_count_every_event_once(db, connect):
    writers, per_writer = 4, 150
    errors: list[BaseException] = []

    def write(n: int) -> None:
        try:
            conn = connect()
            for i in range(per_writer):
                with conn.transaction():
                    conn.execute("select booking_guard_internal.log_event('review', 'r', 'call', %s)", (f"{n}-{i}",))
                    if i % 7 == 0:
                        conn.execute("select booking_guard_internal.log_event('review', 'r', 'call', %s)", (f"{n}-{i}-b",))
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    def fold(stop: threading.Event) -> None:
        try:
            conn = connect()
            while not stop.is_set():
                conn.execute("select booking_guard.fold_metrics(50)")
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    stop = threading.Event()
    folders = [threading.Thread(target=fold, args=(stop,)) for _ in range(2)]
    threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
    for t in folders + threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    for t in folders:
        t.join()
    assert errors == []
    expected = writers * (per_writer + len(range(0, per_writer, 7)))
    while db.execute("select booking_guard.fold_metrics(50)").fetchone()[0] > 0:
        pass
    assert value(db, "data_inconsistency_manual_review_total") == expected
    assert db.execute("select count(*) from booking_guard.events where kind = 'review'").fetchone()[0] == expected


def test_the_booking_path_never_waits_for_a_fold(attached, connect):
    folding = connect(autocommit=False)
    folding.execute("select booking_guard.fold_metrics()")    # holds the fold's locks until it ends
    booking = connect()
    booking.execute("set lock_timeout = '1s'")
    company = booking.execute("insert into companies (name) values ('c') returning id").fetchone()[0]
    with booking.transaction():
        call = booking.execute("insert into calls (retell_call_id, company_id, direction) values ('b1', %s, 'inbound')"
                               " returning id", (company,)).fetchone()[0]
        booking.execute("select booking_guard.record_booking(%s, 'cal-b1')", (call,))
    # and a scrape meanwhile answers at once (try-lock) instead of queueing behind the fold
    scrape = connect()
    scrape.execute("set statement_timeout = '1s'")
    assert scrape.execute("select count(*) from booking_guard.metrics()").fetchone()[0] > 0
    assert scrape.execute("select booking_guard.fold_metrics()").fetchone()[0] == 0
    folding.rollback()
    assert value(scrape, "appointment_creation_success_total") == 1


def test_a_scrape_reads_only_the_new_appointment_ids(attached, connect):
    db = attached
    db.execute("select booking_guard.set_setting('verification_grace', '0')")
    lone_call(db, "phantom-2", session_outcome="appointment_booked", appointment_made=False)
    booked = lone_call(db, "booked-2")
    # a table of some size, counted already: what a scrape reads is what came since
    db.execute("insert into appointments (call_id, calcom_v2_booking_id) select %s, 'cal-old-' || i"
               " from generate_series(1, 2000) i", (booked,))
    db.execute("analyze appointments")
    assert value(db, "appointment_creation_success_total") == 2000
    db.execute("insert into appointments (call_id, calcom_v2_booking_id) values (%s, 'cal-scan-1'), (%s, 'cal-scan-2')",
               (booked, booked))
    scraper = connect()   # a fresh session: its pending table statistics are this scrape's alone
    with scraper.transaction():
        assert scraper.execute("select count(*) from booking_guard.metrics() where value > 0").fetchone()[0] > 0
        reads = dict((name, (seq, idx, fetched)) for name, seq, idx, fetched in scraper.execute(
            """select relname, coalesce(seq_scan, 0), coalesce(idx_scan, 0), coalesce(idx_tup_fetch, 0)
                 from pg_stat_xact_user_tables
                where relid in ('public.calls'::regclass, 'public.appointments'::regclass,
                                'public.companies'::regclass)""").fetchall())
    # the calls are never read; of the appointments, only the rows added since the last fold, by index
    assert reads.get("calls", (0, 0, 0)) == (0, 0, 0)
    assert reads.get("companies", (0, 0, 0)) == (0, 0, 0)
    seq, idx, fetched = reads["appointments"]
    assert seq == 0 and idx >= 1
    assert fetched < 10   # the two new rows (and index bookkeeping), not the 2000 counted before
    assert value(db, "appointment_creation_success_total") == 2002


def test_circuit_breaker_series(db):
    for _ in range(3):
        db.execute("select booking_guard.circuit_record_failure('appointment_booking:global', 'timeout')")
    with pytest.raises(psycopg.Error) as rejected:
        db.execute("select booking_guard.circuit_acquire('appointment_booking:global')")
    assert rejected.value.diag.sqlstate == "BG001"
    s = series(db)
    key = "appointment_booking:global"
    assert s[("circuit_breaker_state", (("key", key), ("state", "open")))] == 1
    assert s[("circuit_breaker_state", (("key", key), ("state", "closed")))] == 0
    assert s[("circuit_breaker_open_total", (("key", key),))] == 1
    assert s[("circuit_breaker_fast_fail_total", ())] == 1
    assert s[("circuit_breaker_recovery_time_seconds_count", ())] == 0
    db.execute("select booking_guard.circuit_reset(%s)", (key,))
    s = series(db)
    assert s[("circuit_breaker_state", (("key", key), ("state", "closed")))] == 1
    assert s[("circuit_breaker_state_changes_total", ())] == 2
    assert s[("circuit_breaker_recovery_time_seconds_count", ())] == 1
    assert s[("circuit_breaker_recovery_time_seconds_bucket", (("le", "1"),))] == 1
    # folded once: a second scrape does not count the transitions again
    assert series(db)[("circuit_breaker_open_total", (("key", key),))] == 1


def test_the_monitor_role_can_scrape_and_nothing_else(db):
    db.execute("create role bg_test_scraper login")
    try:
        db.execute("grant booking_guard_monitor to bg_test_scraper")
        with db.transaction():
            db.execute("set local role bg_test_scraper")
            assert db.execute("select count(*) from booking_guard.metrics()").fetchone()[0] > 0
            with pytest.raises(psycopg.errors.InsufficientPrivilege), db.transaction():
                db.execute("update booking_guard.metric_counters set value = 0")
    finally:
        db.execute("drop owned by bg_test_scraper")
        db.execute("drop role bg_test_scraper")


def test_fold_rejects_bad_input(db):
    with pytest.raises(psycopg.Error) as caught:
        db.execute("select booking_guard.fold_metrics(0)")
    assert caught.value.diag.sqlstate == "BG005"
    assert caught.value.diag.message_hint


def test_scheduled_jobs_export_their_last_success_and_period(attached):
    db = attached
    names = {(n, tuple(sorted(labels.items()))) for n, labels, _ in
             db.execute("select name, labels, value from booking_guard.metrics()").fetchall()}
    assert not any(n == "booking_guard_job_last_success_timestamp_seconds" for n, _ in names)   # nothing scheduled
    # what schedule_jobs() records when it registers the job with pg_cron
    db.execute("update booking_guard.job_runs set scheduled_at = now() - interval '3 hours' where job = 'reconcile'")
    scheduled = db.execute("select extract(epoch from scheduled_at)::float8 from booking_guard.job_runs"
                           " where job = 'reconcile'").fetchone()[0]
    assert value(db, "booking_guard_job_last_success_timestamp_seconds", scheduled_job="reconcile") == pytest.approx(scheduled)
    assert value(db, "booking_guard_job_expected_interval_seconds", scheduled_job="reconcile") == 3600
    db.execute("call booking_guard.run_job('reconcile')")
    assert db.execute("select last_error from booking_guard.job_runs where job = 'reconcile'").fetchone()[0] is None
    succeeded = db.execute("select extract(epoch from last_success_at)::float8 from booking_guard.job_runs"
                           " where job = 'reconcile'").fetchone()[0]
    assert succeeded > scheduled
    assert value(db, "booking_guard_job_last_success_timestamp_seconds", scheduled_job="reconcile") == pytest.approx(succeeded)


def test_folds_in_batches_of_whole_transactions(db):
    with db.transaction():   # one transaction bigger than the batch: folded whole, in one run
        db.execute("select booking_guard_internal.log_event('review', 'r', 'call', i::text) from generate_series(1, 120) i")
    for n in range(3):        # then three transactions of 30
        with db.transaction():
            db.execute("select booking_guard_internal.log_event('review', 'r', 'call', %s || i) from generate_series(1, 30) i",
                       (f"t{n}-",))
    runs = [db.execute("select booking_guard.fold_metrics(50)").fetchone()[0] for _ in range(5)]
    # whole transactions: the 51st event is in the next transaction, so each run stops before it
    assert runs == [120, 30, 30, 30, 0]
    assert value(db, "data_inconsistency_manual_review_total") == 210


# -- every booking counted, whatever wrote it ----------------------------------------------

def gaps(conn: psycopg.Connection) -> list[tuple[int, int]]:
    return conn.execute("select lo, hi from booking_guard.metric_booking_gaps order by lo").fetchall()


def test_every_booking_is_counted_whatever_wrote_it(attached):
    db = attached
    db.execute("select booking_guard.set_setting('verification_grace', '0')")
    by_function, by_sql = lone_call(db, "fn-1"), lone_call(db, "sql-1")
    assert db.execute("select success from booking_guard.record_booking(%s, 'cal-fn-1')", (by_function,)).fetchone() == (True,)
    retry = db.execute("select success, created from booking_guard.record_booking(%s, 'cal-fn-1')", (by_function,)).fetchone()
    assert retry == (True, False)   # recorded before: no second appointment, no second booking
    with db.transaction():
        db.execute("insert into appointments (call_id, calcom_v2_booking_id) values (%s, 'cal-sql-1')", (by_sql,))
        db.execute("update calls set appointment_made = true, session_outcome = 'appointment_booked' where id = %s", (by_sql,))
    db.execute("insert into appointments (call_id, calcom_v2_booking_id, source) values (null, 'cal-hook-1', 'retell_webhook')")
    # bookings that did not stand: a refusal, a claim with no appointment (rolled back at COMMIT),
    # and a refusal whose call is rolled back (counted once, not once more for the rollback)
    nowhere = db.execute("select max(id) + 1000 from calls").fetchone()[0]
    assert db.execute("select reason from booking_guard.record_booking(%s, 'cal-none')", (nowhere,)).fetchone() == (
        "call_not_found",)
    lone_call(db, "claim-1", session_outcome="appointment_booked", appointment_made=True)
    other = lone_call(db, "other-1", booking_id="cal-expected")
    refused = db.execute("select reason from booking_guard.record_booking(%s, 'cal-other')", (other,)).fetchone()[0]
    assert db.execute("select session_outcome from calls where id = %s", (other,)).fetchone() == ("creation_failed",)
    s = series(db)
    assert s[("appointment_creation_success_total", ())] == 3
    failures = {dict(labels)["reason"]: v for (name, labels), v in s.items()
                if name == "appointment_creation_failure_total" and v}
    assert failures == {"call_not_found": 1, "appointment_not_found": 1, refused: 1}
    # durations exist for record_booking()'s calls only
    assert s[("appointment_creation_duration_seconds_count", ())] == 4
    # the status page's window: 3 written (1 through record_booking), 3 that did not stand
    windows = dict(db.execute("select name, sum(value) from booking_guard.metric_windows group by 1").fetchall())
    assert (windows["creation_success"], windows["creation_recorded"], windows["creation_failed"]) == (3, 1, 3)


def test_a_booking_committed_after_a_later_one_is_counted_once(attached, connect):
    db = attached
    c = lone_call(db, "late-1")
    slow = connect(autocommit=False)
    slow.execute("insert into appointments (call_id, calcom_v2_booking_id) values (%s, 'cal-slow')", (c,))
    db.execute("insert into appointments (call_id, calcom_v2_booking_id) values (%s, 'cal-fast')", (c,))
    assert value(db, "appointment_creation_success_total") == 1
    [(lo, hi)] = gaps(db)                              # the slow one's id: not visible yet, kept
    assert lo == hi
    assert value(db, "appointment_creation_success_total") == 1   # its transaction is open: the gap stays
    assert gaps(db) == [(lo, hi)]
    slow.commit()
    assert value(db, "appointment_creation_success_total") == 2
    assert gaps(db) == []
    assert value(db, "appointment_creation_success_total") == 2


def test_a_rolled_back_booking_leaves_a_gap_that_goes_once_its_transaction_ended(attached, connect):
    db = attached
    c = lone_call(db, "aborted-1")
    aborted = connect(autocommit=False)
    aborted.execute("insert into appointments (call_id, calcom_v2_booking_id) values (%s, 'cal-never')", (c,))
    db.execute("insert into appointments (call_id, calcom_v2_booking_id) values (%s, 'cal-after')", (c,))
    assert value(db, "appointment_creation_success_total") == 1
    assert len(gaps(db)) == 1
    aborted.rollback()
    for _ in range(3):   # the fold after the one that saw no open transaction drops it
        assert value(db, "appointment_creation_success_total") == 1
    assert gaps(db) == []


def test_concurrent_bookings_and_folds_count_every_appointment_once(attached, connect):
    db = attached
    c = lone_call(db, "busy-1")
    writers, per_writer = 4, 60
    errors: list[BaseException] = []

    def write(n: int) -> None:
        try:
            conn = connect(autocommit=False)
            for i in range(per_writer):
                conn.execute("insert into appointments (call_id, calcom_v2_booking_id) values (%s, %s)", (c, f"w{n}-{i}"))
                if i % 5 == 0:
                    conn.execute("insert into appointments (call_id, calcom_v2_booking_id) values (%s, %s)",
                                 (c, f"w{n}-{i}-b"))
                if i % 7 == 3:
                    conn.rollback()
                else:
                    conn.commit()
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    def fold(stop: threading.Event) -> None:
        try:
            conn = connect()
            while not stop.is_set():
                conn.execute("select booking_guard.fold_metrics(25)")
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    stop = threading.Event()
    folders = [threading.Thread(target=fold, args=(stop,)) for _ in range(2)]
    threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
    for t in folders + threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    for t in folders:
        t.join()
    assert errors == []
    for _ in range(3):
        while db.execute("select booking_guard.fold_metrics(25)").fetchone()[0] > 0:
            pass
    written = db.execute("select count(*) from appointments").fetchone()[0]
    assert written > writers * per_writer / 2
    assert value(db, "appointment_creation_success_total") == written
    assert gaps(db) == []


def test_open_inconsistencies_are_only_what_a_person_must_act_on(db):
    """What the status page and booking_guard_open_inconsistencies count: not the corrected, the superseded,
    the resolved, a failure rate or a stalled job."""
    plant = "select booking_guard_internal.raise_alert(%s, %s, 'call', %s, 'planted', %s::jsonb, %s)"
    wanted = db.execute(plant, ("phantom_booking", "critical", "1", "{}", False)).fetchone()[0]
    db.execute(plant, ("missing_direction", "warning", "2", "{}", True))                            # auto-corrected
    db.execute(plant, ("missing_appointment", "critical", "3", '{"superseded_by": "rollback"}', False))
    db.execute(plant, ("recent_failures", "warning", "4", "{}", False))                             # a rate, no record
    db.execute(plant, ("job_stalled", "critical", "5", "{}", False))                                # operations, not data
    resolved = db.execute(plant, ("outcome_flag_mismatch", "warning", "6", "{}", False)).fetchone()[0]
    db.execute("select booking_guard.resolve_alert(%s)", (resolved,))
    assert db.execute("select id from booking_guard.open_inconsistencies").fetchall() == [(wanted,)]
    assert db.execute("select count(*) from booking_guard.alerts where resolved_at is null").fetchone()[0] == 5
