-- booking_guard 0.1.0: the tables, sequences, indexes and seeded rows as 0.1.0 created them.
--
-- Frozen: 0.1.0 is released. Every later change to a table is a statement in the schema file of
-- the version that makes it (never an edit here), so that a fresh install and an update from any
-- released version end with the same tables, column for column.

create table booking_guard.settings (
    name            text primary key,
    kind            text not null check (kind in ('interval', 'integer', 'numeric', 'text', 'boolean')),
    interval_value  interval,
    integer_value   bigint,
    numeric_value   numeric,
    text_value      text,
    boolean_value   boolean,
    -- bounds of integer and numeric values; of interval values, in seconds
    min_value       numeric,
    max_value       numeric,
    allowed_values  text[],
    description     text not null,
    updated_at      timestamptz not null default now(),
    updated_by      name,
    constraint settings_value_of_its_kind check (
        num_nonnulls(interval_value, integer_value, numeric_value, text_value, boolean_value) = 1
        and case kind
                when 'interval' then interval_value is not null
                when 'integer' then integer_value is not null
                when 'numeric' then numeric_value is not null
                when 'text' then text_value is not null
                else boolean_value is not null
            end),
    constraint settings_value_in_range check (
        coalesce(extract(epoch from interval_value), integer_value, numeric_value)
            between coalesce(min_value, '-Infinity') and coalesce(max_value, 'Infinity')),
    constraint settings_value_allowed check (
        allowed_values is null or text_value = any (allowed_values))
);

comment on table booking_guard.settings is
    'booking_guard configuration: one typed, range-checked value per setting. Change with booking_guard.set_setting(name, value).';

insert into booking_guard.settings (name, kind, interval_value, text_value, min_value, max_value, allowed_values, description)
values
    ('verification_grace', 'interval', '5 seconds', null, 0, 3600, null,
     'How long a call may claim a booking before its appointment row must exist. 0: judged at COMMIT. Five seconds by default.'),
    ('validation_recent_window', 'interval', '5 minutes', null, 1, 86400, null,
     'validate_appointment_creation() reports appointment_stale for an appointment created longer ago than this.'),
    ('default_direction', 'text', null, 'inbound', null, null, array['inbound', 'outbound'],
     'Direction given to a call written without one (rule missing_direction).');

select pg_catalog.pg_extension_config_dump('booking_guard.settings', '');

create table booking_guard.rules (
    name             text primary key,
    severity         text not null check (severity in ('critical', 'warning', 'info')),
    mode             text not null check (mode in ('off', 'observe', 'correct', 'enforce')),
    rollout_percent  integer not null default 100 check (rollout_percent between 0 and 100),
    fallback_mode    text not null default 'observe' check (fallback_mode in ('off', 'observe', 'correct', 'enforce')),
    description      text not null,
    updated_at       timestamptz not null default now(),
    updated_by       name
);

comment on table booking_guard.rules is
    'One row per consistency rule: severity, mode (off/observe/correct/enforce) and the share of companies the mode applies to.';

insert into booking_guard.rules (name, severity, mode, description) values
    ('phantom_booking', 'critical', 'correct',
     'session_outcome = ''appointment_booked'' but appointment_made = false'),
    ('missing_appointment', 'critical', 'correct',
     'the call claims a booking but no appointment is linked to it once the verification grace has passed; correct rolls the call back to creation_failed and queues it for review'),
    ('missing_direction', 'warning', 'correct',
     'direction is null; correct sets the default_direction setting'),
    ('orphaned_appointment', 'warning', 'correct',
     'an appointment from retell_webhook whose call_id is null or points at no call; correct links it by calls.booking_id when exactly one call matches'),
    ('outcome_flag_mismatch', 'critical', 'correct',
     'appointment_made = true but session_outcome is another non-null outcome'),
    ('unlinked_appointment', 'critical', 'correct',
     'an appointment is linked to the call but the call says appointment_made = false'),
    ('booking_id_mismatch', 'warning', 'observe',
     'the call''s booking_id differs from its appointment''s calcom_v2_booking_id (validation check 3)'),
    ('duplicate_booking', 'critical', 'observe',
     'two appointments share one calcom_v2_booking_id (a retry that booked twice)'),
    ('customer_link', 'info', 'correct',
     'customer_id is set but customer_link_status is not linked');

select pg_catalog.pg_extension_config_dump('booking_guard.rules', '');

create table booking_guard.required_columns (
    table_role      text not null check (table_role in ('calls', 'appointments')),
    column_name     name not null,
    accepted_types  text[] not null,
    primary key (table_role, column_name)
);

comment on table booking_guard.required_columns is
    'The columns attach() requires on the calls and appointments tables, with the types it accepts (format_type spelling).';

insert into booking_guard.required_columns (table_role, column_name, accepted_types)
select t.table_role, t.column_name, t.accepted_types::text[]
  from (values
    ('calls', 'id', '{integer,bigint}'),
    ('calls', 'retell_call_id', '{text,"character varying"}'),
    ('calls', 'company_id', '{integer,bigint,uuid,text,"character varying"}'),
    ('calls', 'direction', '{text,"character varying"}'),
    ('calls', 'session_outcome', '{text,"character varying"}'),
    ('calls', 'appointment_made', '{boolean}'),
    ('calls', 'appointment_link_status', '{text,"character varying"}'),
    ('calls', 'appointment_linked_at', '{"timestamp with time zone","timestamp without time zone"}'),
    ('calls', 'booking_id', '{text,"character varying"}'),
    ('calls', 'booking_details', '{jsonb}'),
    ('calls', 'booking_confirmed', '{boolean}'),
    ('calls', 'call_successful', '{boolean}'),
    ('calls', 'customer_id', '{integer,bigint}'),
    ('calls', 'customer_link_status', '{text,"character varying"}'),
    ('calls', 'customer_linked_at', '{"timestamp with time zone","timestamp without time zone"}'),
    ('calls', 'customer_link_method', '{text,"character varying"}'),
    ('calls', 'customer_link_confidence', '{numeric}'),
    ('calls', 'created_at', '{"timestamp with time zone","timestamp without time zone"}'),
    ('calls', 'updated_at', '{"timestamp with time zone","timestamp without time zone"}'),
    ('appointments', 'id', '{integer,bigint}'),
    ('appointments', 'call_id', '{integer,bigint}'),
    ('appointments', 'calcom_v2_booking_id', '{text,"character varying"}'),
    ('appointments', 'customer_id', '{integer,bigint}'),
    ('appointments', 'service_id', '{integer,bigint}'),
    ('appointments', 'staff_id', '{integer,bigint}'),
    ('appointments', 'source', '{text,"character varying"}'),
    ('appointments', 'created_at', '{"timestamp with time zone","timestamp without time zone"}'),
    ('appointments', 'updated_at', '{"timestamp with time zone","timestamp without time zone"}')
  ) as t (table_role, column_name, accepted_types);

create table booking_guard.required_indexes (
    table_role   text not null check (table_role in ('calls', 'appointments')),
    column_name  name not null,
    why          text not null,
    primary key (table_role, column_name)
);

comment on table booking_guard.required_indexes is
    'The single-column indexes attach() creates when no index leads with that column.';

insert into booking_guard.required_indexes (table_role, column_name, why) values
    ('calls', 'created_at', 'detection windows over recent calls'),
    ('calls', 'booking_id', 'linking orphaned appointments by booking id'),
    ('appointments', 'call_id', 'the truth of a call: its linked appointments'),
    ('appointments', 'calcom_v2_booking_id', 'idempotent record_booking and duplicate detection'),
    ('appointments', 'created_at', 'detection windows over recent appointments');

create table booking_guard.attached_tables (
    singleton           boolean primary key default true check (singleton),
    calls_table         regclass not null,
    appointments_table  regclass not null,
    attached_at         timestamptz not null default now(),
    attached_by         name not null default current_user,
    created_indexes     text[] not null default '{}'
);

comment on table booking_guard.attached_tables is
    'The one attached (calls, appointments) pair; read it through the attachment view.';

select pg_catalog.pg_extension_config_dump('booking_guard.attached_tables', '');

create table booking_guard.events (
    id           bigint generated always as identity primary key,
    at           timestamptz not null default clock_timestamp(),
    kind         text not null,
    rule         text,
    entity_type  text,
    entity_id    text,
    details      jsonb not null default '{}',
    -- The writing transaction: every event of a transaction older than the oldest one still
    -- running is final, which lets metrics fold events into counters exactly once without
    -- a lock on the booking path.
    xid          xid8 not null default pg_current_xact_id()
);

create index events_at_idx on booking_guard.events (at);

create index events_xid_idx on booking_guard.events (xid);

create index events_kind_at_idx on booking_guard.events (kind, at);

comment on table booking_guard.events is
    'Append-only log of what booking_guard did: kind (correction, rollback, verdict, alert, review, ...), rule, entity, details.';

select pg_catalog.pg_extension_config_dump('booking_guard.events', '');

select pg_catalog.pg_extension_config_dump('booking_guard.events_id_seq', '');

create table booking_guard.alerts (
    id               bigint generated always as identity primary key,
    alert_type       text not null,
    severity         text not null check (severity in ('critical', 'warning', 'info')),
    entity_type      text,
    entity_id        text,
    description      text not null,
    details          jsonb not null default '{}',
    fingerprint      text not null,
    occurrences      integer not null default 1 check (occurrences > 0),
    auto_corrected   boolean not null default false,
    detected_at      timestamptz not null default now(),
    last_seen_at     timestamptz not null default now(),
    acknowledged_at  timestamptz,
    acknowledged_by  name,
    resolved_at      timestamptz,
    delivered_at     timestamptz
);

create unique index alerts_one_open_per_fingerprint on booking_guard.alerts (fingerprint) where resolved_at is null;

create index alerts_detected_at_idx on booking_guard.alerts (detected_at);

create index alerts_undelivered_idx on booking_guard.alerts (id) where delivered_at is null;

comment on table booking_guard.alerts is
    'Alerts raised by booking_guard''s rules: one open alert per fingerprint (rule + entity), with occurrences, acknowledgement, resolution and delivery.';

select pg_catalog.pg_extension_config_dump('booking_guard.alerts', '');

select pg_catalog.pg_extension_config_dump('booking_guard.alerts_id_seq', '');

create table booking_guard.review_priorities (
    reason    text primary key,
    priority  integer not null check (priority between 1 and 100)
);

comment on table booking_guard.review_priorities is
    'Priority of a review reason (1 = most urgent); reasons not listed get 5.';

insert into booking_guard.review_priorities (reason, priority) values
    ('appointment_validation_failed', 1),
    ('calcom_booking_failed', 2),
    ('customer_creation_failed', 3),
    ('service_not_found', 4);

select pg_catalog.pg_extension_config_dump('booking_guard.review_priorities', '');

insert into booking_guard.settings (name, kind, interval_value, min_value, max_value, description) values
    ('review_claim_timeout', 'interval', '30 minutes', 60, 86400,
     'A review item claimed this long ago and not resolved goes back to the queue.');

create table booking_guard.review_queue (
    id          bigint generated always as identity primary key,
    call_id     bigint,
    reason      text not null,
    context     jsonb not null default '{}',
    priority    integer not null,
    status      text not null default 'pending' check (status in ('pending', 'in_review', 'resolved')),
    claimed_by  name,
    claimed_at  timestamptz,
    resolution  text check (resolution in ('fixed', 'dismissed', 'false_positive')),
    note        text,
    created_at  timestamptz not null default now(),
    updated_at  timestamptz not null default now(),
    check ((status = 'resolved') = (resolution is not null))
);

create unique index review_queue_one_open_per_call_reason
    on booking_guard.review_queue (coalesce(call_id, -1), reason) where status <> 'resolved';

create index review_queue_open_idx on booking_guard.review_queue (priority, created_at) where status <> 'resolved';

comment on table booking_guard.review_queue is
    'Calls waiting for a person: one open item per call and reason.';

select pg_catalog.pg_extension_config_dump('booking_guard.review_queue', '');

select pg_catalog.pg_extension_config_dump('booking_guard.review_queue_id_seq', '');

create table booking_guard.due_verifications (
    call_id      bigint primary key,
    due_at       timestamptz not null,
    enqueued_at  timestamptz not null default clock_timestamp()
);

create index due_verifications_due_at_idx on booking_guard.due_verifications (due_at);

comment on table booking_guard.due_verifications is
    'Calls that claim a booking without an appointment yet, to be judged by verify_due() once verification_grace has passed.';

select pg_catalog.pg_extension_config_dump('booking_guard.due_verifications', '');

insert into booking_guard.settings (name, kind, interval_value, min_value, max_value, description) values
    ('retry_claim_timeout', 'interval', '5 minutes', 1, 86400,
     'A retry claimed by a worker this long ago and not finished is handed out again (the worker is taken for dead).');

insert into booking_guard.review_priorities (reason, priority) values ('retry_exhausted', 2);

create sequence booking_guard.retries_id_seq;

comment on sequence booking_guard.retries_id_seq is 'Ids of booking_guard.retries.';

create table booking_guard.retries (
    id            bigint primary key default nextval('booking_guard.retries_id_seq'),
    call_id       bigint,
    operation     text not null check (operation <> ''),
    payload       jsonb not null default '{}' check (jsonb_typeof(payload) = 'object'),
    status        text not null default 'pending' check (status in ('pending', 'running', 'succeeded', 'failed')),
    attempts      integer not null default 0 check (attempts >= 0),
    max_attempts  integer not null check (max_attempts between 1 and 100),
    due_at        timestamptz not null,
    claimed_by    text,
    claimed_at    timestamptz,
    last_error    text,
    -- one element per finished (or abandoned) attempt: attempt, at, ok, error, worker
    history       jsonb not null default '[]',
    created_at    timestamptz not null default now(),
    updated_at    timestamptz not null default now(),
    finished_at   timestamptz,
    check (attempts <= max_attempts),
    check ((status = 'running') = (claimed_at is not null)),
    check ((status in ('succeeded', 'failed')) = (finished_at is not null))
);

create index retries_open_idx on booking_guard.retries (due_at) where status in ('pending', 'running');

create index retries_call_id_idx on booking_guard.retries (call_id);

comment on table booking_guard.retries is
    'Operations to be tried again by a worker: due_at from backoff_delay(), claims that expire, the history of every attempt.';

select pg_catalog.pg_extension_config_dump('booking_guard.retries', '');

select pg_catalog.pg_extension_config_dump('booking_guard.retries_id_seq', '');

create sequence booking_guard.circuit_seq;

comment on sequence booking_guard.circuit_seq is
    'Permits and circuit_transitions ids, from one sequence so that a permit can be ordered against the transitions of its key.';

create sequence booking_guard.circuit_fast_fails;

comment on sequence booking_guard.circuit_fast_fails is
    'Calls rejected by circuit_acquire (BG001), all keys: nextval() survives the rollback of the rejected call. Read it with circuit_fast_fail_total().';

create table booking_guard.circuit_policies (
    key_pattern          text primary key check (key_pattern <> ''),
    failure_threshold    integer not null default 3 check (failure_threshold between 1 and 1000),
    cooldown             interval not null default '30 seconds'
                         check (cooldown > interval '0' and cooldown <= interval '1 day'),
    success_threshold    integer not null default 2 check (success_threshold between 1 and 1000),
    half_open_max_calls  integer not null default 1 check (half_open_max_calls between 1 and 1000),
    call_timeout         interval not null default '10 seconds'
                         check (call_timeout > interval '0' and call_timeout <= interval '1 hour')
);

comment on table booking_guard.circuit_policies is
    'Circuit breaker policy per key pattern (LIKE syntax, e.g. appointment_booking:service:%); the longest matching pattern wins, the row % is the default.';

insert into booking_guard.circuit_policies
       (key_pattern, failure_threshold, cooldown, success_threshold, half_open_max_calls, call_timeout)
values ('%', 3, '30 seconds', 2, 1, '10 seconds');

create table booking_guard.circuit_breakers (
    key              text primary key check (key ~ '\S' and length(key) <= 255 and key !~ '[[:cntrl:]]'),
    state            text not null default 'closed' check (state in ('closed', 'open', 'half_open')),
    failure_count    integer not null default 0 check (failure_count >= 0),
    success_count    integer not null default 0 check (success_count >= 0),
    last_failure_at  timestamptz,
    opened_at        timestamptz,
    closed_at        timestamptz,
    forced_until     timestamptz,
    updated_at       timestamptz not null default now(),
    check (state = 'closed' or opened_at is not null),
    check (forced_until is null or state = 'open')
);

comment on table booking_guard.circuit_breakers is
    'Stored state of each circuit breaker key. Time-driven transitions are written lazily: read the effective state with circuit_state(key) or the circuit_status view.';

create table booking_guard.circuit_transitions (
    id          bigint primary key default nextval('booking_guard.circuit_seq'),
    key         text not null,
    from_state  text not null check (from_state in ('closed', 'open', 'half_open')),
    to_state    text not null check (to_state in ('closed', 'open', 'half_open')),
    at          timestamptz not null,
    reason      text not null,
    check (from_state <> to_state)
);

create index circuit_transitions_key_id_idx on booking_guard.circuit_transitions (key, id);

create index circuit_transitions_at_idx on booking_guard.circuit_transitions (at);

comment on table booking_guard.circuit_transitions is
    'Every state change of every breaker (never a same-state row), for open counts, recovery times and the dashboard; reason starts with a code (failure_threshold, half_open_failure, call_timeout, cooldown_elapsed, forced_until_passed, success_threshold, reset, forced_open).';

create table booking_guard.circuit_permits (
    permit      bigint primary key,
    key         text not null,
    granted_at  timestamptz not null,
    expires_at  timestamptz not null
);

create index circuit_permits_key_expires_idx on booking_guard.circuit_permits (key, expires_at);

comment on table booking_guard.circuit_permits is
    'Outstanding half-open trial permits and their leases; every transition of a key deletes its permits, so a result of an older permit is late and ignored.';

select pg_catalog.pg_extension_config_dump('booking_guard.circuit_policies', '');

select pg_catalog.pg_extension_config_dump('booking_guard.circuit_breakers', '');

select pg_catalog.pg_extension_config_dump('booking_guard.circuit_transitions', '');

select pg_catalog.pg_extension_config_dump('booking_guard.circuit_seq', '');

select pg_catalog.pg_extension_config_dump('booking_guard.circuit_fast_fails', '');

insert into booking_guard.rules (name, severity, mode, description) values
    ('recent_failures', 'warning', 'observe',
     'validation failures in the window: calls whose validate_appointment_creation() failed (events of kind validation with success false)');

create table booking_guard.detection_rules (
    rule         text primary key,
    entity_type  text not null check (entity_type in ('call', 'appointment', 'booking')),
    view_name    name not null unique,
    label        text not null,
    repair       text not null,
    action       text not null
);

comment on table booking_guard.detection_rules is
    'The rules detect() checks: the entity each finding is about, its view, its report label and what correct mode repairs.';

insert into booking_guard.detection_rules (rule, entity_type, view_name, label, repair, action) values
    ('phantom_booking', 'call', 'phantom_booking_findings',
     'Phantom Bookings (session_outcome mismatch)',
     'flags set from the appointment rows; with no appointment past the grace, rolled back to creation_failed and queued for review',
     'Find where the application sets session_outcome without appointment_made'),
    ('missing_appointment', 'call', 'missing_appointment_findings',
     'Missing Appointments (appointment_made=1 but no appt)',
     'rolled back to creation_failed and queued for review',
     'Check the booking path (calendar booked, local record missing); rebook from the review queue'),
    ('missing_direction', 'call', 'missing_direction_findings',
     'Missing Direction',
     'direction set to the default_direction setting',
     'Make the application send direction; booking_guard fills in the default meanwhile'),
    ('orphaned_appointment', 'appointment', 'orphaned_appointment_findings',
     'Orphaned Appointments',
     'linked to the call whose booking_id matches, when exactly one does; several: queued for review',
     'Check the calendar webhook: appointments arrive without their call'),
    ('outcome_flag_mismatch', 'call', 'outcome_flag_mismatch_findings',
     'Outcome/Flag Mismatches (appointment_made=1, other outcome)',
     'flags set from the appointment rows; with none, rolled back to creation_failed',
     'Find where the application sets appointment_made without the outcome'),
    ('unlinked_appointment', 'call', 'unlinked_appointment_findings',
     'Unlinked Appointments (appointment exists, appointment_made=0)',
     'flags set from the appointment rows',
     'Find where the application links appointments without setting the call''s flags'),
    ('booking_id_mismatch', 'call', 'booking_id_mismatch_findings',
     'Booking ID Mismatches',
     'none (alert only)',
     'Compare the call''s booking_id with the calendar booking'),
    ('duplicate_booking', 'booking', 'duplicate_booking_findings',
     'Duplicate Bookings (one booking id, several appointments)',
     'none (alert only)',
     'A retry booked twice: cancel the duplicate in the calendar'),
    ('customer_link', 'call', 'customer_link_findings',
     'Customer Link Status',
     'customer_link_status set to linked',
     'Make the application set customer_link_status with customer_id'),
    ('recent_failures', 'call', 'recent_failures_findings',
     'Validation Failures',
     'none (alert only)',
     'Look at the validation reasons of the failing calls');

create table booking_guard.reconciliation_runs (
    id           bigint generated always as identity primary key,
    started_at   timestamptz not null default clock_timestamp(),
    finished_at  timestamptz,
    batch_size   integer not null,
    counts       jsonb not null default '{}',
    error        text,
    run_by       name not null default session_user
);

create index reconciliation_runs_started_at_idx on booking_guard.reconciliation_runs (started_at);

comment on table booking_guard.reconciliation_runs is
    'One row per reconcile() run: start, end, what it scanned and repaired (counts), and the error if it failed.';

create table booking_guard.reports (
    day           date primary key,
    generated_at  timestamptz not null default now(),
    report        text not null,
    facts         jsonb not null
);

comment on table booking_guard.reports is
    'One stored daily report per day (text and facts), written by store_daily_report() (the 00:05 job).';

select pg_catalog.pg_extension_config_dump('booking_guard.reports', '');

create table booking_guard.jobs (
    job             text primary key,
    schedule        text not null,
    expected_every  interval not null,
    description     text not null
);

comment on table booking_guard.jobs is
    'The periodic jobs schedule_jobs() registers with pg_cron: name, cron schedule, how often a success is expected.';

insert into booking_guard.jobs (job, schedule, expected_every, description) values
    ('run_monitor', '* * * * *', '1 minute', 'detection and alerts over the last hour (run_monitor()), then the job health check'),
    ('verify_due', '* * * * *', '1 minute', 'the due verifications whose grace has passed (verify_due()), a backstop for the exporter''s loop'),
    ('reconcile', '0 * * * *', '1 hour', 'reconciliation over the whole tables (reconcile())'),
    ('daily_report', '5 0 * * *', '1 day', 'yesterday''s daily report, stored in reports (store_daily_report())');

create table booking_guard.job_runs (
    job              text primary key references booking_guard.jobs (job),
    scheduled_at     timestamptz,
    cron_database    text,
    cron_jobid       bigint,
    last_started_at  timestamptz,
    last_success_at  timestamptz,
    last_failure_at  timestamptz,
    last_error       text,
    last_result      jsonb,
    runs             bigint not null default 0,
    failures         bigint not null default 0
);

comment on table booking_guard.job_runs is
    'Per job: when it was scheduled (and the pg_cron job id), when it last started, succeeded and failed, its last error and result.';

create table booking_guard.metric_definitions (
    name     text primary key check (name ~ '^[a-z_][a-z0-9_]*$'),
    type     text not null check (type in ('counter', 'gauge', 'histogram')),
    help     text not null,
    buckets  double precision[] check ((type = 'histogram') = (buckets is not null))
);

comment on table booking_guard.metric_definitions is
    'The metric families metrics() exports: name (a counter''s with _total), type, help and, for histograms, the upper bounds of the buckets.';

insert into booking_guard.metric_definitions (name, type, help, buckets) values
    ('appointment_creation_success_total', 'counter',
     'Bookings recorded by booking_guard.record_booking() that passed validation.', null),
    ('appointment_creation_failure_total', 'counter',
     'Bookings that booking_guard.record_booking() could not record, by reason.', null),
    ('appointment_creation_duration_seconds', 'histogram',
     'Duration of booking_guard.record_booking() calls, successful or not.',
     '{0.005,0.01,0.025,0.05,0.1,0.25,0.5,1,2.5,5,10}'),
    ('appointment_validation_total', 'counter',
     'Post-booking validations run (booking_guard.validate_appointment_creation()).', null),
    ('appointment_validation_failure_total', 'counter',
     'Post-booking validations that failed, by type (the validation reason).', null),
    ('appointment_validation_duration_seconds', 'histogram',
     'Duration of post-booking validations.',
     '{0.001,0.0025,0.005,0.01,0.025,0.05,0.1,0.25,0.5,1}'),
    ('appointment_validation_success_rate', 'gauge',
     'Share of post-booking validations that passed over the last 24 hours (0 to 1; absent when none ran).', null),
    ('data_inconsistency_detected_total', 'counter',
     'Inconsistencies detected (new alerts), by type (the rule).', null),
    ('data_inconsistency_auto_corrected_total', 'counter',
     'Inconsistencies detected and corrected by booking_guard (new alerts marked auto_corrected).', null),
    ('data_inconsistency_manual_review_total', 'counter',
     'Items put on the manual review queue.', null),
    ('circuit_breaker_state', 'gauge',
     'Effective state of each circuit breaker: 1 for its current state, 0 for the two others.', null),
    ('circuit_breaker_open_total', 'counter',
     'Times each circuit breaker opened.', null),
    ('circuit_breaker_state_changes_total', 'counter',
     'State changes of all circuit breakers.', null),
    ('circuit_breaker_fast_fail_total', 'counter',
     'Calls rejected by an open (or saturated half-open) circuit breaker without being tried.', null),
    ('circuit_breaker_recovery_time_seconds', 'histogram',
     'Time from a circuit breaker opening to closing again.',
     '{1,5,10,30,60,120,300,600,1800,3600}'),
    ('booking_guard_open_alerts', 'gauge',
     'Open (unresolved) alerts, by rule and severity.', null),
    ('booking_guard_review_queue_items', 'gauge',
     'Open items of the manual review queue, by status.', null),
    ('booking_guard_due_verifications', 'gauge',
     'Calls waiting for their verification grace to pass (booking_guard.due_verifications).', null),
    ('booking_guard_due_verifications_overdue', 'gauge',
     'Calls on the due list whose grace passed more than 10 seconds ago: nothing is running verify_due().', null),
    ('booking_guard_job_last_success_timestamp_seconds', 'gauge',
     'When each scheduled job (schedule_jobs()) last succeeded, or was scheduled if that is later (Unix time).', null),
    ('booking_guard_job_expected_interval_seconds', 'gauge',
     'How often each scheduled job is expected to succeed (booking_guard.jobs.expected_every), in seconds.', null),
    ('booking_guard_metrics_events_folded_total', 'counter',
     'Events folded into the metric counters.', null),
    ('booking_guard_metrics_last_fold_timestamp_seconds', 'gauge',
     'When events were last folded into the metric counters (Unix time).', null);

create table booking_guard.metric_counters (
    name        text not null,
    labels      jsonb not null default '{}',
    value       double precision not null default 0,
    updated_at  timestamptz not null default now(),
    primary key (name, labels)
);

comment on table booking_guard.metric_counters is
    'Counter totals folded from booking_guard.events by fold_metrics(): one row per series (a histogram''s buckets are stored per bucket, not cumulated).';

create table booking_guard.metric_windows (
    name    text not null,
    bucket  timestamptz not null,
    value   double precision not null default 0,
    primary key (name, bucket)
);

comment on table booking_guard.metric_windows is
    'Per-5-minute totals of the last two days folded from booking_guard.events: rates over a window without scanning the events.';

create table booking_guard.metric_fold_state (
    singleton      boolean primary key default true check (singleton),
    horizon        xid8 not null,
    folded_at      timestamptz,
    events_folded  bigint not null default 0,
    runs           bigint not null default 0
);

comment on table booking_guard.metric_fold_state is
    'Where fold_metrics() stopped: the events of every transaction with an xid below horizon are in metric_counters.';

insert into booking_guard.metric_fold_state (horizon) values (pg_catalog.pg_snapshot_xmin(pg_catalog.pg_current_snapshot()));

create table booking_guard.metric_circuit_marks (
    key         text primary key,
    last_id     bigint not null,
    open_since  timestamptz
);

comment on table booking_guard.metric_circuit_marks is
    'Per breaker key: the last circuit_transitions id folded into the metrics, and when its current outage began (for the recovery time).';

create table booking_guard.alert_claims (
    alert_id         bigint primary key references booking_guard.alerts (id) on delete cascade,
    claimed_by       text,
    claimed_until    timestamptz,
    attempts         integer not null default 0,
    next_attempt_at  timestamptz not null default now(),
    last_error       text
);

comment on table booking_guard.alert_claims is
    'Delivery state of alerts not delivered yet: who holds the claim and until when, attempts, when the next may start, the last error.';

create table booking_guard.alert_digests (
    period_end       timestamptz primary key,
    period_start     timestamptz not null,
    claimed_by       text,
    claimed_until    timestamptz,
    attempts         integer not null default 0,
    next_attempt_at  timestamptz not null default now(),
    last_error       text,
    sent_at          timestamptz,
    alerts           integer
);

comment on table booking_guard.alert_digests is
    'E-mail digests: one row per period, claimed by a relay, sent_at once sent (alerts = 0: nothing to send).';
