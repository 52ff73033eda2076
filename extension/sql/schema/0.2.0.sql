-- booking_guard 0.2.0: what 0.2.0 changes in the tables, after 0.1.0's (schema/0.1.0.sql).
--
-- Run on a fresh install after 0.1.0's tables, and by the update from 0.1.0: both end with the
-- same tables. Frozen once 0.2.0 is released; a later change goes into the next version's file.

create schema booking_guard_internal;

-- The columns booking_guard_worker may write (attach() grants UPDATE on exactly these).
alter table booking_guard.required_columns add column written boolean not null default false;
update booking_guard.required_columns set written = true
 where (table_role, column_name) in (
       ('calls', 'direction'), ('calls', 'session_outcome'), ('calls', 'appointment_made'),
       ('calls', 'appointment_link_status'), ('calls', 'appointment_linked_at'), ('calls', 'customer_link_status'),
       ('calls', 'customer_linked_at'), ('calls', 'customer_link_method'), ('calls', 'customer_link_confidence'),
       ('calls', 'updated_at'), ('appointments', 'call_id'), ('appointments', 'updated_at'));
comment on column booking_guard.required_columns.written is
    'booking_guard writes this column (as booking_guard_worker): attach() grants UPDATE on it.';

-- Bounds: one role cannot grow booking_guard's tables, alerts or metric series without limit.
insert into booking_guard.settings (name, kind, integer_value, min_value, max_value, description) values
    ('alert_storm_threshold', 'integer', 100, 1, 1000000,
     'New alerts of one type per minute beyond which the rest are counted as occurrences of one alert_storm alert.'),
    ('review_queue_max_open', 'integer', 10000, 1, 10000000,
     'Open review items beyond which queue_for_review() refuses new ones (booking_guard''s own findings are still queued).'),
    ('circuit_max_keys', 'integer', 1000, 1, 1000000,
     'Circuit breaker keys beyond which a new key is refused (each key is a row and several metric series).'),
    ('retries_max_open', 'integer', 10000, 1, 10000000,
     'Pending and running retries beyond which schedule_retry() refuses new ones.'),
    ('job_batch_size', 'integer', 1000, 1, 1000000,
     'Rows (or findings) a scheduled job handles per transaction: the longest an application write waits for a job is one batch.');
insert into booking_guard.settings (name, kind, interval_value, min_value, max_value, description) values
    ('monitor_overlap', 'interval', '10 seconds', 0, 86400,
     'The scheduled run_monitor looks at rows created since its last run (or since the oldest transaction then writing began), less this much.'),
    ('monitor_recheck_interval', 'interval', '10 minutes', 0, 86400,
     'The scheduled run_monitor re-checks an open alert it did not see again at most this often.'),
    ('declared_rule_timeout', 'interval', '5 seconds', 0.1, 600,
     'The longest a declared rule''s predicate may run on one batch, or its repair on one finding; beyond it the rule finds or repairs nothing that time and a warning says so.');

-- Retention: how long each growing table keeps its rows; the purge job removes the rest.
insert into booking_guard.settings (name, kind, interval_value, min_value, max_value, description) values
    ('events_retention', 'interval', '30 days', 60, 315360000,
     'Events older than this are purged (once folded into the metric counters). Reports and KPIs look back at most this far: keep 8 days or more.'),
    ('alerts_retention', 'interval', '90 days', 60, 315360000,
     'Resolved alerts resolved longer ago than this are purged; open alerts never are.'),
    ('review_retention', 'interval', '180 days', 60, 315360000,
     'Resolved review items resolved longer ago than this are purged; open ones never are.'),
    ('retries_retention', 'interval', '30 days', 60, 315360000,
     'Finished retries (succeeded or failed) finished longer ago than this are purged.'),
    ('circuit_history_retention', 'interval', '90 days', 60, 315360000,
     'Circuit breaker transitions older than this are purged (once folded into the metric counters).'),
    ('runs_retention', 'interval', '90 days', 60, 315360000,
     'Reconciliation runs, alert digests and daily reports older than this are purged.');
insert into booking_guard.jobs (job, schedule, expected_every, description) values
    ('purge', '15 * * * *', '1 hour', 'removes what is past its retention (purge())');
insert into booking_guard.job_runs (job) values ('purge') on conflict (job) do nothing;

-- The entities a run of the scheduled monitor still has to look at (one run at a time).
create table booking_guard_internal.monitor_queue (
    kind       text not null check (kind in ('call', 'appointment', 'booking')),
    entity_id  text not null,
    primary key (kind, entity_id)
);
comment on table booking_guard_internal.monitor_queue is
    'run_monitor: the candidates of the current run not looked at yet, taken a batch at a time.';

-- Job leases, skips and the monitor's watermark.
alter table booking_guard.job_runs
    add column running_pid      integer,
    add column running_since    timestamptz,
    add column watermark        timestamptz,
    add column skips            bigint not null default 0,
    add column last_skipped_at  timestamptz;
insert into booking_guard.job_runs (job) select j.job from booking_guard.jobs j on conflict (job) do nothing;
comment on column booking_guard.job_runs.running_pid is 'The backend running the job now (its lease); null when none is.';
comment on column booking_guard.job_runs.watermark is 'run_monitor: the rows created before this were looked at by an earlier run.';
comment on column booking_guard.job_runs.skips is 'Runs that found another run of the job in progress and did nothing.';

-- A relay acknowledges only what it claimed: the claiming session's role, beside the relay's name.
alter table booking_guard.alert_claims add column claimed_role name;
alter table booking_guard.alert_digests add column claimed_role name;

-- New alerts of a type in the last minute (alert storms).
create index alerts_type_detected_at_idx on booking_guard.alerts (alert_type, detected_at);

-- The validation reasons, in one place: validation, metrics labels and clients read them.
create table booking_guard.validation_reasons (
    reason       text primary key check (reason ~ '^[a-z][a-z0-9_]{0,62}$'),
    description  text not null
);
comment on table booking_guard.validation_reasons is
    'The reasons validate_appointment_creation() gives, ok first; metrics label failures with these (anything else is other).';
insert into booking_guard.validation_reasons (reason, description) values
    ('ok', 'the appointment stands: it exists, is linked to the call, carries the expected booking id and is recent'),
    ('call_not_found', 'the call does not exist'),
    ('appointment_not_found', 'no appointment by the given id, or none linked to the call and none carrying the booking id'),
    ('appointment_not_linked', 'the appointment''s call_id is not the call'),
    ('booking_id_mismatch', 'the appointment''s calcom_v2_booking_id differs from the given booking id, or the call''s'),
    ('appointment_stale', 'the appointment was created longer ago than validation_recent_window');

-- 0.1.0's descriptions named documents outside the repository; a fresh install already has these.
update booking_guard.rules set description = regexp_replace(description, ' \(seed [^)]*\)', '', 'g')
 where description ~ '\(seed ';
update booking_guard.settings set description = replace(description, 'The seed waited 5 s.', 'Five seconds by default.')
 where name = 'verification_grace';
update booking_guard.rules
   set description = 'the call''s booking_id differs from its appointment''s calcom_v2_booking_id'
 where name = 'booking_id_mismatch';
comment on table booking_guard.review_priorities is
    'Priority of a review reason (1 = most urgent); reasons not listed get 5.';
comment on table booking_guard.review_queue is
    'Calls waiting for a person: one open item per call and reason.';
comment on table booking_guard.circuit_policies is
    'Circuit breaker policy per key pattern (LIKE syntax, e.g. appointment_booking:service:%); the longest matching pattern wins, the row % is the default.';

-- Circuit breaker: besides N consecutive failures, a breaker may open on the failure rate or the
-- slow-call rate over a sliding window of its last calls (count_based) or last seconds (time_based).
alter table booking_guard.circuit_policies
    add column sliding_window_type text not null default 'consecutive',
    add column sliding_window_size integer not null default 100,
    add column minimum_number_of_calls integer not null default 100,
    add column failure_rate_threshold numeric(5, 2) not null default 50,
    add column slow_call_rate_threshold numeric(5, 2) not null default 100,
    add column slow_call_duration_threshold interval not null default '60 seconds',
    add constraint circuit_policies_sliding_window_type_check
        check (sliding_window_type in ('consecutive', 'count_based', 'time_based')),
    add constraint circuit_policies_sliding_window_size_check
        check (sliding_window_size between 1 and 3600 and (sliding_window_type <> 'count_based' or sliding_window_size <= 1000)),
    add constraint circuit_policies_minimum_number_of_calls_check check (minimum_number_of_calls between 1 and 100000),
    add constraint circuit_policies_failure_rate_threshold_check check (failure_rate_threshold > 0 and failure_rate_threshold <= 100),
    add constraint circuit_policies_slow_call_rate_threshold_check
        check (slow_call_rate_threshold > 0 and slow_call_rate_threshold <= 100),
    add constraint circuit_policies_slow_call_duration_threshold_check
        check (slow_call_duration_threshold > interval '0' and slow_call_duration_threshold <= interval '1 day'),
    add constraint circuit_policies_key_pattern_length_check
        check (length(key_pattern) <= 255 and key_pattern !~ '[[:cntrl:]]');
comment on column booking_guard.circuit_policies.sliding_window_type is
    'consecutive: open after failure_threshold consecutive failures (the default); count_based: on the rates over the last sliding_window_size calls; time_based: over the last sliding_window_size seconds.';
comment on column booking_guard.circuit_policies.sliding_window_size is
    'Calls (count_based, 1 to 1000) or seconds (time_based, 1 to 3600) the rates are taken over.';
comment on column booking_guard.circuit_policies.minimum_number_of_calls is
    'Calls the window must hold before its rates can open the breaker (count_based: at most the window size).';
comment on column booking_guard.circuit_policies.failure_rate_threshold is
    'Percent of failed calls in the window at or above which the breaker opens (count_based and time_based).';
comment on column booking_guard.circuit_policies.slow_call_rate_threshold is
    'Percent of slow calls in the window at or above which the breaker opens (count_based and time_based).';
comment on column booking_guard.circuit_policies.slow_call_duration_threshold is
    'A call that took longer than this is slow.';

-- The window of a breaker whose policy has one is a row of booking_guard_internal.circuit_windows;
-- the breaker row says which kind (so that a success of a key without one reads nothing more).
alter table booking_guard.circuit_breakers
    add column window_type text,
    add column last_transition_id bigint;
comment on column booking_guard.circuit_breakers.window_type is
    'count_based or time_based: the key has a sliding window (booking_guard_internal.circuit_windows); null: its policy counts consecutive failures.';
comment on column booking_guard.circuit_breakers.last_transition_id is
    'The id of the key''s latest transition: a result of a permit granted before it (a lower number) is late and ignored.';
update booking_guard.circuit_breakers b
   set last_transition_id = (select max(t.id) from booking_guard.circuit_transitions t where t.key = b.key);

-- A closed breaker with a window takes every result in one UPDATE of this row: it carries what that
-- needs (the values of the policy it was built for, whether the breaker is closed, its latest
-- transition), and has no CHECK constraints (PostgreSQL prepares a table's CHECKs again for every
-- UPDATE statement; the functions that write it keep its invariants, and its size is bounded by the
-- policy's: at most 1000 bytes or 60 buckets). Not dumped: after a restore a window starts afresh.
create table booking_guard_internal.circuit_windows (
    key                           text primary key,
    policy_pattern                text not null,
    sliding_window_type           text not null,
    sliding_window_size           integer not null,
    bucket_width                  integer,
    minimum_number_of_calls       integer not null,
    failure_rate_threshold        numeric(5, 2) not null,
    slow_call_rate_threshold      numeric(5, 2) not null,
    slow_call_duration_threshold  interval not null,
    closed                        boolean not null,
    last_transition_id            bigint,
    calls                         integer not null,
    failures                      integer not null,
    slow_calls                    integer not null,
    head                          bigint not null,
    outcomes                      bytea,
    buckets                       integer[]
);
comment on table booking_guard_internal.circuit_windows is
    'The sliding window of each breaker whose policy has one: its calls, failures and slow calls (half-open: of the trial calls), the calls themselves (count_based: a ring of one byte per call, 1 failed, 2 slow, at call number mod size) or per-bucket totals (time_based: calls, failures, slow calls per bucket, at bucket number mod bucket count), head (count_based: calls recorded; time_based: the newest bucket), the values of the policy row it was built for (policy_pattern; minimum_number_of_calls as it applies while closed), and, copied from the breaker, whether it is closed and its latest transition.';

-- A permit of a call under several scopes is a trial permit of each half-open one.
alter table booking_guard.circuit_permits drop constraint circuit_permits_pkey;
alter table booking_guard.circuit_permits add constraint circuit_permits_pkey primary key (key, permit);
comment on table booking_guard.circuit_permits is
    'Outstanding half-open trial permits per key and their leases; every transition of a key deletes its permits, so a result of an older permit is late and ignored.';
comment on table booking_guard.circuit_transitions is
    'Every state change of every breaker (never a same-state row), for open counts, recovery times and the dashboard; reason starts with a code (failure_threshold, failure_rate, slow_call_rate, half_open_failure, trial_rates, call_timeout, cooldown_elapsed, forced_until_passed, success_threshold, reset, forced_open).';

-- ---- What the on-call sees: review items for findings, alerts and items closed together,
-- ---- notifications of urgent items, every booking counted ------------------------------------

-- A review item may be about something other than a call: a calendar booking held twice
-- (booking:<id>), an orphaned appointment (appointment:<id>), an exhausted retry (retry:<id>).
-- One open item per call, reason and subject; items about a call alone have no subject.
alter table booking_guard.review_queue
    add column subject text check (subject ~ '^[a-z_]+:\S' and length(subject) <= 300);
drop index booking_guard.review_queue_one_open_per_call_reason;
create unique index review_queue_one_open_per_subject
    on booking_guard.review_queue (coalesce(call_id, -1), reason, coalesce(subject, '')) where status <> 'resolved';
comment on column booking_guard.review_queue.subject is
    'What the item is about when it is not the call alone: booking:<calcom id>, appointment:<id>, retry:<id>.';

-- The alert a review item answers: resolving the item resolves its alerts, and resolving an alert
-- that was not auto-corrected resolves its item once no other alert of it is open.
alter table booking_guard.alerts add column review_id bigint;
create index alerts_review_id_idx on booking_guard.alerts (review_id) where review_id is not null;
comment on column booking_guard.alerts.review_id is
    'The review item that answers this alert (booking_guard.review_queue.id), if any.';

-- Urgent review items reach the alert relay's channels: an outbox row per item to send to the
-- webhook (claimed, sent, deleted), review_queue.delivered_at once sent.
insert into booking_guard.settings (name, kind, integer_value, min_value, max_value, description) values
    ('review_notify_priority', 'integer', 2, 0, 100,
     'A new review item of this priority or a more urgent one (a lower number) is sent to the alert relay''s webhook and listed in its e-mail digest; 0 sends none.');
alter table booking_guard.review_queue add column delivered_at timestamptz;
comment on column booking_guard.review_queue.delivered_at is
    'When the alert relay''s webhook accepted the item (urgent items only, see the setting review_notify_priority).';
create table booking_guard.review_notifications (
    review_id        bigint primary key references booking_guard.review_queue (id) on delete cascade,
    claimed_by       text,
    claimed_role     name,
    claimed_until    timestamptz,
    attempts         integer not null default 0,
    next_attempt_at  timestamptz not null default now(),
    last_error       text
);
comment on table booking_guard.review_notifications is
    'Urgent review items not sent to the webhook yet: who holds the claim and until when, attempts, when the next may start, the last error.';
alter table booking_guard.alert_digests add column review_items integer;
comment on column booking_guard.alert_digests.review_items is
    'How many urgent review items the digest listed.';

-- Priorities of the findings no rule may decide (docs/review-queue.md explains the scale).
insert into booking_guard.review_priorities (reason, priority) values
    ('duplicate_booking', 2), ('orphaned_appointment', 3), ('ambiguous_orphan', 3)
on conflict (reason) do nothing;

-- Every booking counted: appointment_creation_success_total counts the appointment rows, whatever
-- wrote them, from a mark on their ids (ids of rows not visible yet are kept as gaps until every
-- transaction that could still commit them has ended).
alter table booking_guard.metric_fold_state add column booking_mark bigint;
comment on column booking_guard.metric_fold_state.booking_mark is
    'fold_metrics(): the appointments with an id up to this one are counted (or in metric_booking_gaps); null until attached.';
create table booking_guard.metric_booking_gaps (
    lo        bigint primary key,
    hi        bigint not null check (hi >= lo),
    noted_at  timestamptz not null
);
comment on table booking_guard.metric_booking_gaps is
    'Appointment ids below the booking mark not seen yet (a transaction still writing, rolled back, or an unused id), counted if they appear before every transaction open at noted_at has ended.';
-- an update of an attached database counts from now on (a fresh install starts at attach())
do $mark$
declare
    t  regclass := (select a.appointments_table from booking_guard.attached_tables a);
    m  bigint;
begin
    if t is not null then
        execute format('select coalesce(max(id), 0) from %s', t) into m;
        update booking_guard.metric_fold_state set booking_mark = m;
    end if;
end
$mark$;

update booking_guard.metric_definitions
   set help = 'Bookings written, by any path (record_booking(), plain SQL, the calendar webhook): the appointment rows, counted once each as they appear.'
 where name = 'appointment_creation_success_total';
update booking_guard.metric_definitions
   set help = 'Bookings that did not stand, by reason: refused by record_booking() (the validation reason), calls rolled back for want of an appointment (appointment_not_found), rollbacks the application reported.'
 where name = 'appointment_creation_failure_total';
update booking_guard.metric_definitions
   set help = 'Duration of booking_guard.record_booking() calls, successful or not (plain-SQL and webhook bookings carry no duration).'
 where name = 'appointment_creation_duration_seconds';
insert into booking_guard.metric_definitions (name, type, help, buckets) values
    ('booking_guard_open_inconsistencies', 'gauge',
     'Open inconsistencies that need a person, by type and severity: unresolved alerts of the detection rules and of failed booking validations, not auto-corrected.', null),
    ('booking_guard_alert_last_detected_timestamp_seconds', 'gauge',
     'When the last alert of each type was raised (Unix time).', null),
    ('booking_guard_review_queue_open_items', 'gauge',
     'Open review items (pending and in review), by priority and reason.', null),
    ('circuit_breaker_last_opened_timestamp_seconds', 'gauge',
     'When each circuit breaker last opened (Unix time); absent for a breaker that never opened.', null);
alter table booking_guard.metric_fold_state add column booking_settle_before timestamptz;
comment on column booking_guard.metric_fold_state.booking_settle_before is
    'fold_metrics(): the gaps noted before this time may be dropped by the next fold (when the oldest transaction then open began).';
-- the metrics count new appointments by id: attach() makes sure an index leads with it
insert into booking_guard.required_indexes (table_role, column_name, why) values
    ('appointments', 'id', 'counting new appointments by id for the booking metrics');
-- the outbox is the only mark of an urgent item not sent yet: dumped and restored with the items
select pg_catalog.pg_extension_config_dump('booking_guard.review_notifications', '');

-- One row per rule holds its whole definition: what the finding is about, what detection reads,
-- its default mode, its report label, the alert text, what correct mode repairs and how, the
-- report's action item; and for a rule an administrator declares (declare_rule()), its predicate,
-- its repair statement and the role both run as. The built-in rules' predicates are SQL in the
-- detection function of their entity, one spot each; everything else about a rule is read from here
-- (detection, the monitor, reconcile, the triggers' alerts, the daily report, metrics).
alter table booking_guard.rules
    add column entity_type       text,
    add column source            text,
    add column default_mode      text,
    add column label             text,
    add column alert_text        text,
    add column repair            text,
    add column repair_kind       text,
    add column action            text,
    add column predicate         text,
    add column repair_statement  text,
    add column run_as            regrole,
    add column declared_by       name,
    add column declared_at       timestamptz;

update booking_guard.rules r
   set entity_type = d.entity_type, source = d.source, default_mode = d.default_mode, label = d.label,
       alert_text = d.alert_text, repair = d.repair, repair_kind = d.repair_kind, action = d.action
  from (values
    ('phantom_booking', 'call', 'calls', 'correct',
     'Phantom Bookings (session_outcome mismatch)',
     'says appointment_booked but appointment_made is false',
     'flags set from the appointment rows; with no appointment past the grace, rolled back to creation_failed and queued for review',
     'call_flags',
     'Find where the application sets session_outcome without appointment_made'),
    ('missing_appointment', 'call', 'calls', 'correct',
     'Missing Appointments (appointment_made=1 but no appt)',
     'claims a booking but no appointment is linked',
     'rolled back to creation_failed and queued for review',
     'call_flags',
     'Check the booking path (calendar booked, local record missing); rebook from the review queue'),
    ('missing_direction', 'call', 'calls', 'correct',
     'Missing Direction',
     'has no direction',
     'direction set to the default_direction setting',
     'default_direction',
     'Make the application send direction; booking_guard fills in the default meanwhile'),
    ('orphaned_appointment', 'appointment', 'appointments', 'correct',
     'Orphaned Appointments',
     'is linked to no call',
     'linked to the call whose booking_id matches, when exactly one does; several: queued for review',
     'orphan_link',
     'Check the calendar webhook: appointments arrive without their call'),
    ('outcome_flag_mismatch', 'call', 'calls', 'correct',
     'Outcome/Flag Mismatches (appointment_made=1, other outcome)',
     'has appointment_made true but outcome {session_outcome}',
     'flags set from the appointment rows; with none, rolled back to creation_failed',
     'call_flags',
     'Find where the application sets appointment_made without the outcome'),
    ('unlinked_appointment', 'call', 'calls', 'correct',
     'Unlinked Appointments (appointment exists, appointment_made=0)',
     'has a linked appointment but appointment_made is false',
     'flags set from the appointment rows',
     'call_flags',
     'Find where the application links appointments without setting the call''s flags'),
    ('booking_id_mismatch', 'call', 'calls', 'observe',
     'Booking ID Mismatches',
     'has booking_id {booking_id}, its appointments {appointment_booking_ids}',
     null, null,
     'Compare the call''s booking_id with the calendar booking'),
    ('duplicate_booking', 'booking', 'bookings', 'observe',
     'Duplicate Bookings (one booking id, several appointments)',
     'is held by {appointments} appointments',
     null, null,
     'A retry booked twice: cancel the duplicate in the calendar'),
    ('customer_link', 'call', 'calls', 'correct',
     'Customer Link Status',
     'has a customer but link status {customer_link_status}',
     'customer_link_status set to linked',
     'customer_link',
     'Make the application set customer_link_status with customer_id'),
    ('recent_failures', 'call', 'validation_events', 'observe',
     'Validation Failures',
     'failed validation {failures} time(s)',
     null, null,
     'Look at the validation reasons of the failing calls')
  ) as d (name, entity_type, source, default_mode, label, alert_text, repair, repair_kind, action)
 where r.name = d.name;

alter table booking_guard.rules
    alter column entity_type set not null,
    alter column source set not null,
    alter column default_mode set not null,
    alter column label set not null,
    alter column alert_text set not null,
    alter column action set not null,
    add constraint rules_name_is_an_identifier check (name ~ '^[a-z][a-z0-9_]{0,62}$'),
    add constraint rules_entity_type_known check (entity_type in ('call', 'appointment', 'booking')),
    add constraint rules_source_known check (source in ('calls', 'appointments', 'bookings', 'validation_events')),
    add constraint rules_default_mode_known check (default_mode in ('off', 'observe', 'correct', 'enforce')),
    add constraint rules_repair_kind_known
        check (repair_kind in ('call_flags', 'default_direction', 'customer_link', 'orphan_link', 'statement')),
    add constraint rules_texts_bounded
        check (length(description) <= 1000 and length(label) <= 200 and length(alert_text) <= 1000
               and length(repair) <= 1000 and length(action) <= 1000),
    add constraint rules_declared_sql_bounded check (length(predicate) <= 4000 and length(repair_statement) <= 4000),
    -- a declared rule has its predicate, its role and who declared it; a built-in rule none of them
    add constraint rules_declared_complete
        check (num_nulls(predicate, run_as, declared_by, declared_at) in (0, 4)),
    -- a declared rule reads the rows of its entity, repairs with its statement (if any), and is
    -- checked after the fact: it can alert and repair, never reject a write (enforce)
    add constraint rules_declared_shape
        check (predicate is null
               or (entity_type in ('call', 'appointment') and source = entity_type || 's'
                   and repair_kind is not distinct from case when repair_statement is not null then 'statement' end
                   and mode <> 'enforce' and fallback_mode <> 'enforce'
                   and (mode <> 'correct' or repair_statement is not null)
                   and (fallback_mode <> 'correct' or repair_statement is not null))),
    add constraint rules_statement_is_declared check (repair_statement is null or predicate is not null);

comment on column booking_guard.rules.entity_type is 'What a finding of the rule is about: call, appointment or booking (a calendar booking id).';
comment on column booking_guard.rules.source is
    'What detection reads to check the rule: the calls, the appointments, the booking ids of the appointments, or the validation events.';
comment on column booking_guard.rules.default_mode is 'The mode the rule has on a fresh install (built-in) or was declared with.';
comment on column booking_guard.rules.label is 'The rule''s name in the daily report.';
comment on column booking_guard.rules.alert_text is
    'The alert''s description after the entity; {key} is replaced by that fact of the finding (its details).';
comment on column booking_guard.rules.repair is 'What correct mode repairs, in words; null: the rule only alerts.';
comment on column booking_guard.rules.repair_kind is
    'How correct mode repairs: call_flags, default_direction, customer_link, orphan_link (built-in repairs) or statement (a declared rule''s repair_statement); null: none.';
comment on column booking_guard.rules.action is 'What to do about the rule''s findings: the daily report''s action item.';
comment on column booking_guard.rules.predicate is
    'A declared rule''s condition: one boolean SQL expression over the row (c for a call, a for an appointment); null for a built-in rule.';
comment on column booking_guard.rules.repair_statement is
    'A declared rule''s repair in correct mode: one SQL statement, $1 the entity''s id; null: it only alerts.';
comment on column booking_guard.rules.run_as is
    'The role a declared rule''s predicate and repair statement run as (never a superuser nor booking_guard''s own roles).';
comment on column booking_guard.rules.declared_by is 'Who declared the rule (null: built-in).';
comment on column booking_guard.rules.declared_at is 'When the rule was declared (null: built-in).';

comment on table booking_guard.rules is
    'One row per consistency rule, built-in or declared: its definition (entity, severity, default mode, label, alert text, repair, action; a declared rule''s predicate, repair statement and role) and its mode, rollout and fallback mode.';

-- Its rows moved into booking_guard.rules (entity_type, label, repair, action).
drop table booking_guard.detection_rules;
