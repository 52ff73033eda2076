-- Every privilege booking_guard gives, in one place (tests/expected/grants.txt holds the result, so
-- that a change here is a visible diff). docs/security.md says why each role has what it has.
--
-- Run last, and on every update: everything is revoked first, then granted exactly.

revoke all on schema booking_guard, booking_guard_internal from public;
revoke all on all tables in schema booking_guard, booking_guard_internal from public, booking_guard_app, booking_guard_monitor,
    booking_guard_serve, booking_guard_admin, booking_guard_owner, booking_guard_worker;
revoke all on all sequences in schema booking_guard, booking_guard_internal from public, booking_guard_app,
    booking_guard_monitor, booking_guard_serve, booking_guard_admin, booking_guard_owner, booking_guard_worker;
revoke all on all routines in schema booking_guard, booking_guard_internal from public, booking_guard_app,
    booking_guard_monitor, booking_guard_serve, booking_guard_admin, booking_guard_owner, booking_guard_worker;

-- booking_guard_owner: the identity of every SECURITY DEFINER function, with rights on booking_guard's
-- own tables and nothing else (it never touches the application's tables).
grant usage on schema booking_guard to booking_guard_owner;
grant usage, create on schema booking_guard_internal to booking_guard_owner;   -- create: the guarded views
grant select, insert, update, delete on all tables in schema booking_guard, booking_guard_internal to booking_guard_owner;
grant usage, select, update on all sequences in schema booking_guard, booking_guard_internal to booking_guard_owner;
grant execute on all routines in schema booking_guard, booking_guard_internal to booking_guard_owner;
do $owner$
declare
    f  regprocedure;
begin
    for f in
        select p.oid from pg_catalog.pg_proc p
         where p.pronamespace in ('booking_guard'::regnamespace, 'booking_guard_internal'::regnamespace) and p.prosecdef
    loop
        execute format('alter function %s owner to booking_guard_owner', f);
    end loop;
end
$owner$;

-- The WHEN clauses of the commit-time checks run as whoever writes the attached tables, and tell
-- only whether the row just written needs that check.
grant execute on function booking_guard_internal.claim_check_needed(bigint), booking_guard_internal.commit_check_possible()
   to public;

grant usage on schema booking_guard to booking_guard_app, booking_guard_monitor, booking_guard_serve, booking_guard_admin,
    booking_guard_worker;
grant usage on schema booking_guard_internal to booking_guard_app, booking_guard_monitor, booking_guard_serve,
    booking_guard_admin, booking_guard_worker;
grant booking_guard_monitor to booking_guard_admin, booking_guard_serve;

-- Functions any role of booking_guard may call: they read or compute, and write nothing.
grant execute on function booking_guard.setting(text), booking_guard.rule_mode(text, text), booking_guard.rollout_bucket(text),
                          booking_guard.environment(), booking_guard.help(), booking_guard_internal.attached()
   to booking_guard_app, booking_guard_monitor, booking_guard_admin, booking_guard_worker;
grant select on booking_guard.settings, booking_guard.attached_tables, booking_guard.validation_reasons
   to booking_guard_app, booking_guard_worker;

-- booking_guard_app: the booking path. record_booking() and rollback_on_failure() write the
-- application's tables with the application's own rights; what they record on booking_guard's side
-- goes through the narrow SECURITY DEFINER functions below.
grant execute on function
    booking_guard.record_booking(bigint, text, jsonb),
    booking_guard.validate_appointment_creation(bigint, bigint, text),
    booking_guard.rollback_on_failure(bigint, text, text),
    booking_guard.queue_for_review(bigint, text, jsonb),
    booking_guard.circuit_acquire(text), booking_guard.circuit_acquire(text[]),
    booking_guard.circuit_try_acquire(text), booking_guard.circuit_try_acquire(text[]),
    booking_guard.circuit_record_success(text, bigint, interval), booking_guard.circuit_record_success(text[], bigint, interval),
    booking_guard.circuit_record_failure(text, text, bigint, interval),
    booking_guard.circuit_record_failure(text[], text, bigint, interval), booking_guard.circuit_state(text),
    booking_guard.backoff_delay(integer, interval, double precision, interval, double precision, text, double precision),
    booking_guard.schedule_retry(bigint, text, jsonb, integer, interval),
    booking_guard.claim_retries(text, integer, timestamptz),
    booking_guard.finish_retry(bigint, boolean, text, text),
    booking_guard_internal.booking_failed(bigint, text, text, jsonb, jsonb, bigint),
    booking_guard_internal.log_validation(bigint, boolean, text, float8, bigint),
    booking_guard_internal.validation_verdict(bigint, bigint, text, float8, boolean, text, text, bigint, bigint, text, text,
                                              float8, float8),
    booking_guard_internal.booking_refused(bigint, text, text, jsonb, jsonb, jsonb),
    booking_guard_internal.record_rollback(bigint, text, text, text, jsonb)
   to booking_guard_app, booking_guard_admin;

-- booking_guard_monitor: read-only. It reads every table and view of booking_guard (attach() grants
-- it the guarded columns of the application's tables), and runs what computes from them. metrics()
-- folds new events into the metric counters first: a cache of the events, not a change of state.
grant select on all tables in schema booking_guard to booking_guard_monitor;
grant select on sequence booking_guard.circuit_fast_fails to booking_guard_monitor;
grant select on booking_guard_internal.circuit_windows to booking_guard_monitor;   -- circuit_status shows the windows
grant execute on function
    booking_guard.detect(interval), booking_guard.detect_rule(text, interval), booking_guard.check_call(bigint),
    booking_guard.daily_report(date), booking_guard.daily_report_json(date), booking_guard.kpis(interval),
    booking_guard.metrics(), booking_guard.fold_metrics(integer),
    booking_guard_internal.booking_ids_readable(),
    booking_guard_internal.fold_counters(integer, bigint, timestamptz, bigint[], bigint[]),
    booking_guard.job_status(), booking_guard.stalled_jobs(),
    booking_guard.circuit_state(text), booking_guard.circuit_fast_fail_total(),
    booking_guard_internal.findings(interval, text), booking_guard_internal.check_window(interval),
    booking_guard_internal.candidate_calls(timestamptz), booking_guard_internal.candidate_appointments(timestamptz),
    booking_guard_internal.candidate_bookings(timestamptz),
    booking_guard_internal.call_findings(bigint[], text, bigint, bigint),
    booking_guard_internal.appointment_findings(bigint[], text, bigint, bigint),
    booking_guard_internal.booking_findings(text[]), booking_guard_internal.failure_findings(timestamptz, text[]),
    booking_guard_internal.declared_findings(text, bigint[], text), booking_guard_internal.declared_matches(text, bigint[]),
    booking_guard_internal.within_grace(bigint, timestamptz),
    booking_guard_internal.is_inconsistency(text, jsonb), booking_guard_internal.check_day(date),
    booking_guard_internal.day_alerts(timestamptz, timestamptz),
    booking_guard_internal.circuit_snapshot(booking_guard.circuit_breakers),
    booking_guard_internal.circuit_policy(text),
    booking_guard_internal.circuit_advance(booking_guard.circuit_breakers, booking_guard_internal.circuit_windows,
                                           booking_guard.circuit_policies, timestamptz, boolean),
    booking_guard_internal.circuit_now(), booking_guard_internal.circuit_check_key(text),
    booking_guard_internal.circuit_window_empty(booking_guard_internal.circuit_windows),
    booking_guard_internal.circuit_window_trial(booking_guard_internal.circuit_windows, boolean, boolean),
    booking_guard_internal.circuit_window_at(booking_guard_internal.circuit_windows, text, timestamptz),
    booking_guard_internal.circuit_trial_verdict(booking_guard_internal.circuit_windows, booking_guard.circuit_policies),
    booking_guard_internal.circuit_rates_exceeded(booking_guard_internal.circuit_windows, integer, text),
    booking_guard_internal.circuit_minimum_calls(booking_guard.circuit_policies, text),
    booking_guard_internal.circuit_buckets(integer),
    booking_guard_internal.histogram_le(double precision, double precision[]),
    booking_guard_internal.metric_label_seeds(), booking_guard_internal.alert_types(),
    booking_guard_internal.cron_state(text), booking_guard_internal.cron_exec(text, text),
    booking_guard_internal.cron_connection(), booking_guard_internal.job_name(text)
   to booking_guard_monitor;

-- booking_guard_serve: what `booking-guard serve` does beyond reading (it is also a monitor): the
-- verification loop, and the alert relay, which can acknowledge only what it claimed.
grant execute on function
    booking_guard.verify_due(timestamptz), booking_guard_internal.run_job_steps(text, jsonb),
    booking_guard_internal.job_raise(jsonb),
    booking_guard.claim_alerts(text, integer, interval), booking_guard.alerts_delivered(text, bigint[]),
    booking_guard.alerts_failed(text, bigint[], text), booking_guard.claim_digest(text, interval, interval),
    booking_guard.digest_sent(text, timestamptz, integer, integer), booking_guard.digest_failed(text, timestamptz, text),
    booking_guard.claim_reviews(text, integer, interval), booking_guard.reviews_delivered(text, bigint[]),
    booking_guard.reviews_failed(text, bigint[], text)
   to booking_guard_serve;

-- booking_guard_admin: settings, rules, the review queue, breakers by hand, the jobs; attach() and
-- detach() with the rights of the tables' owner (who must hold this role): creating the triggers
-- needs EXECUTE on their functions.
grant execute on function
    booking_guard.set_setting(text, text), booking_guard.set_rule(text, text, integer, text),
    booking_guard.declare_rule(text, text, text, text, text, text, regrole, text, text), booking_guard.drop_rule(text),
    booking_guard_internal.store_declared_rule(text, text, text, text, regrole, text, text, text, text),
    booking_guard.attach(regclass, regclass), booking_guard.detach(), booking_guard.prepare_drop(),
    booking_guard.acknowledge_alert(bigint, name), booking_guard.resolve_alert(bigint),
    booking_guard.claim_review(name), booking_guard.resolve_review(bigint, text, text),
    booking_guard.circuit_reset(text), booking_guard.circuit_force_open(text, timestamptz),
    booking_guard.reconcile(integer), booking_guard.run_monitor(interval), booking_guard.verify_due(timestamptz),
    booking_guard.store_daily_report(date), booking_guard.purge(),
    booking_guard.schedule_jobs(text), booking_guard.unschedule_jobs(text),
    booking_guard_internal.run_job_steps(text, jsonb), booking_guard_internal.job_raise(jsonb),
    booking_guard_internal.attachment_lock(), booking_guard_internal.attachment_problems(text, regclass),
    booking_guard_internal.check_owner(text, regclass), booking_guard_internal.index_name(regclass, name),
    booking_guard_internal.grant_columns(regclass, regclass, boolean),
    booking_guard_internal.attachment_record(regclass, regclass, text[]), booking_guard_internal.attachment_forget(),
    booking_guard_internal.count_bookings_from(bigint),
    booking_guard_internal.drop_triggers(regclass[]), booking_guard_internal.install_triggers(regclass, regclass),
    booking_guard_internal.calls_before(), booking_guard_internal.calls_truth_check(),
    booking_guard_internal.appointments_sync(), booking_guard_internal.appointments_truth_check(),
    booking_guard_internal.cron_not_ready(text), booking_guard_internal.job_command(text),
    booking_guard_internal.job_scheduled(text, text, bigint), booking_guard_internal.cron_unreachable(text, text, text),
    booking_guard_internal.subscribed_tables(), booking_guard_internal.cron_state(text),
    booking_guard_internal.cron_exec(text, text), booking_guard_internal.cron_connection(), booking_guard_internal.job_name(text)
   to booking_guard_admin;
grant execute on procedure booking_guard.run_job(text) to booking_guard_admin;
grant insert, update, delete on booking_guard.review_priorities, booking_guard.circuit_policies to booking_guard_admin;

-- booking_guard_worker: the identity of booking_guard's own work on the application's tables (the
-- triggers' rules, the commit-time check, the jobs). It owns nothing; attach() grants it the columns
-- it reads and writes. A table owner's code on those tables runs with its rights when booking_guard
-- writes them: it can record alerts, events and review items, never change a rule or a setting.
grant select on all tables in schema booking_guard to booking_guard_worker;
grant insert, update, delete on booking_guard.due_verifications to booking_guard_worker;
grant insert on booking_guard.events to booking_guard_worker;
grant select, insert, delete on booking_guard_internal.monitor_queue to booking_guard_worker;
grant execute on function
    booking_guard.rollback_on_failure(bigint, text, text),
    booking_guard.daily_report(date), booking_guard.daily_report_json(date),
    booking_guard_internal.calls_rules(), booking_guard_internal.reject(text, text, text),
    booking_guard_internal.sync_call_flags(bigint, text), booking_guard_internal.judge_call(bigint, boolean, boolean),
    booking_guard_internal.record_rollback(bigint, text, text, text, jsonb),
    booking_guard_internal.raise_alert(text, text, text, text, text, jsonb, boolean),
    booking_guard_internal.rule_alert(text, text, text, text, jsonb, boolean),
    booking_guard_internal.log_event(text, text, text, text, jsonb),
    booking_guard_internal.queue_review(bigint, text, jsonb, text, bigint),
    booking_guard_internal.queue_orphan(bigint, text, bigint[], bigint),
    booking_guard_internal.queue_finding(booking_guard.finding, bigint, text),
    booking_guard_internal.job_begin(text, jsonb), booking_guard_internal.job_step(jsonb),
    booking_guard_internal.job_end(jsonb),
    booking_guard_internal.verify_step(jsonb), booking_guard_internal.reconcile_step(jsonb),
    booking_guard_internal.monitor_step(jsonb), booking_guard_internal.report_step(jsonb),
    booking_guard_internal.reconcile_batch(text, bigint, integer, bigint),
    booking_guard_internal.monitor_findings(booking_guard.finding[], jsonb, interval),
    booking_guard_internal.held_by_another(booking_guard.finding),
    booking_guard_internal.alert_recheck(bigint, boolean), booking_guard_internal.check_jobs(),
    booking_guard_internal.keep_report(date, text, jsonb),
    booking_guard_internal.purge_step(jsonb), booking_guard_internal.purge_batch(text, integer),
    booking_guard_internal.retention(text), booking_guard_internal.call_exists(bigint),
    booking_guard_internal.repair_finding(booking_guard.finding), booking_guard_internal.finding_holds(text, text, text, interval),
    booking_guard_internal.finding_description(booking_guard.finding),
    booking_guard_internal.findings(interval, text), booking_guard_internal.check_window(interval),
    booking_guard_internal.candidate_calls(timestamptz), booking_guard_internal.candidate_appointments(timestamptz),
    booking_guard_internal.candidate_bookings(timestamptz),
    booking_guard_internal.call_findings(bigint[], text, bigint, bigint),
    booking_guard_internal.appointment_findings(bigint[], text, bigint, bigint),
    booking_guard_internal.booking_findings(text[]), booking_guard_internal.failure_findings(timestamptz, text[]),
    booking_guard_internal.declared_findings(text, bigint[], text), booking_guard_internal.declared_matches(text, bigint[]),
    booking_guard_internal.declared_repair(text, bigint),
    booking_guard_internal.within_grace(bigint, timestamptz),
    booking_guard_internal.is_inconsistency(text, jsonb), booking_guard_internal.check_day(date),
    booking_guard_internal.day_alerts(timestamptz, timestamptz)
   to booking_guard_worker;
