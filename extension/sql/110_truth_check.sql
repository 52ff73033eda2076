-- The commit-time truth check (rules missing_appointment and unlinked_appointment).
--
-- Deferred constraint triggers judge, at COMMIT, every call touched in the transaction whose flags
-- claim a booking, and every call whose appointments changed. With verification_grace > 0 (for
-- applications that write the appointment in a later transaction) the verdict waits on the due
-- list (table due_verifications) until verify_due() works through it once the grace has passed.
-- enforce is always judged at COMMIT: a transaction can only be rejected while it is committing.

-- What a rollback records on booking_guard's side, with booking_guard_owner's rights: an event, a
-- critical alert, and the end of the phantom_booking and outcome_flag_mismatch alerts of the call
-- whose correction (appointment_made or session_outcome set to a booking) the rollback undid: one
-- open alert per failed booking, pointing at what was done.
create function booking_guard_internal.record_rollback(call_id bigint, reason text, alert_type text,
                                                       retell_call_id text, details jsonb)
returns bigint
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_column
declare
    alert_id  bigint;
begin
    if record_rollback.alert_type is distinct from 'missing_appointment'
       and not exists (select from booking_guard.review_priorities p where p.reason = record_rollback.alert_type) then
        raise exception 'a rollback is alerted as missing_appointment or a review reason, not %',
                        coalesce(quote_literal(left(record_rollback.alert_type, 100)), 'null')
            using errcode = 'BG005',
                  detail = format('The alert type names why the booking did not stand: %s.',
                                  (select string_agg(p.reason, ', ' order by p.reason) from booking_guard.review_priorities p)),
                  hint = 'Leave alert_type out: it defaults to appointment_validation_failed.';
    end if;
    perform booking_guard_internal.log_event('rollback', record_rollback.alert_type, 'call', record_rollback.call_id::text,
                                             record_rollback.details);
    alert_id := booking_guard_internal.raise_alert(record_rollback.alert_type, 'critical', 'call',
        record_rollback.call_id::text,
        format('Call %s claimed a booking that does not stand (%s): rolled back to creation_failed',
               record_rollback.retell_call_id, record_rollback.reason),
        record_rollback.details, true);
    update booking_guard.alerts a
       set resolved_at = now(), details = a.details || jsonb_build_object('superseded_by', alert_id)
     where a.fingerprint in (concat_ws(':', 'phantom_booking', 'call', record_rollback.call_id::text),
                             concat_ws(':', 'outcome_flag_mismatch', 'call', record_rollback.call_id::text))
       and a.resolved_at is null;
    return alert_id;
end
$$;

comment on function booking_guard_internal.record_rollback(bigint, text, text, text, jsonb) is
    'rollback_on_failure(): the rollback event, its critical alert, and the end of the call''s phantom_booking and outcome_flag_mismatch alerts it supersedes; returns the alert id.';

-- The rollback of a call whose booking does not stand: its flags back to creation_failed, an
-- event and a critical alert. It runs with the caller's rights (the application's, or
-- booking_guard_worker's at COMMIT).
create function booking_guard.rollback_on_failure(call_id bigint, reason text,
                                                  alert_type text default 'appointment_validation_failed')
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_column
declare
    before    record;
    alert_id  bigint;
    details   jsonb;
begin
    if rollback_on_failure.call_id is null or rollback_on_failure.reason is null
       or length(rollback_on_failure.reason) > 500 then
        raise exception 'rollback_on_failure() needs a call id and a reason'
            using errcode = 'BG005',
                  detail = format('call_id: %s, reason: %s', coalesce(rollback_on_failure.call_id::text, 'null'),
                                  coalesce(rollback_on_failure.reason, 'null')),
                  hint = 'select booking_guard.rollback_on_failure(42, ''appointment_not_found'');';
    end if;
    perform booking_guard_internal.attached();   -- BG003 rather than "relation guarded_calls does not exist"
    select g.retell_call_id, g.session_outcome, g.appointment_made, g.appointment_link_status
      into before
      from booking_guard_internal.guarded_calls g
     where g.id = rollback_on_failure.call_id
       for no key update;
    if not found then
        raise exception 'unknown call %', rollback_on_failure.call_id
            using errcode = 'BG004',
                  detail = format('The attached calls table has no row with id %s.', rollback_on_failure.call_id),
                  hint = 'Pass the id of an existing call.';
    end if;
    update booking_guard_internal.guarded_calls g
       set appointment_made = false,
           session_outcome = 'creation_failed',
           appointment_link_status = 'creation_failed',
           updated_at = now()
     where g.id = rollback_on_failure.call_id;

    details := jsonb_build_object(
        'reason', rollback_on_failure.reason,
        'before', jsonb_build_object('session_outcome', before.session_outcome, 'appointment_made', before.appointment_made,
                                     'appointment_link_status', before.appointment_link_status),
        'after', jsonb_build_object('session_outcome', 'creation_failed', 'appointment_made', false,
                                    'appointment_link_status', 'creation_failed'));
    alert_id := booking_guard_internal.record_rollback(rollback_on_failure.call_id, rollback_on_failure.reason,
                                                       rollback_on_failure.alert_type, before.retell_call_id, details);
    return details || jsonb_build_object('alert_id', alert_id);
end
$$;

comment on function booking_guard.rollback_on_failure(bigint, text, text) is
    'Rolls a call whose booking does not stand back: sets it to creation_failed (appointment_made false), logs the rollback and raises a critical alert; returns before/after.';

-- The verdict on one call. from_due: called by verify_due(), so the grace is over.
-- appointments_changed: the call gained or lost an appointment in the committing transaction.
-- Then the flags are derived from the appointments (link sync) rather than judged as the
-- application's claim, and the call row is locked before the appointments are counted: a
-- concurrent transaction changing this call's appointments holds that lock until it commits,
-- so whichever of the two judges last sees both changes.
create function booking_guard_internal.judge_call(call_id bigint, from_due boolean default false,
                                                  appointments_changed boolean default false)
returns text
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    c        record;
    claims   boolean;
    has_one  boolean;
    mode     text;
    grace    interval;
    locked   boolean := appointments_changed;
    rolled   jsonb;
begin
    -- Read optimistically; lock and read again only when something has to be done, so that a
    -- consistent booking costs two index lookups at COMMIT and writes nothing.
    loop
        if locked then
            select g.company_id::text as company, g.retell_call_id, g.appointment_made, g.session_outcome,
                   g.appointment_link_status
              into c from booking_guard_internal.guarded_calls g where g.id = judge_call.call_id for no key update;
        else
            select g.company_id::text as company, g.retell_call_id, g.appointment_made, g.session_outcome,
                   g.appointment_link_status
              into c from booking_guard_internal.guarded_calls g where g.id = judge_call.call_id;
        end if;
        if not found then
            delete from booking_guard.due_verifications d where d.call_id = judge_call.call_id;
            return 'gone';
        end if;
        -- is true / is not distinct from: a null outcome or link status is no claim, and a null
        -- here would send every ordinary call (outcome 'no_answer', no link status) down the
        -- unlinked_appointment path with a false critical alert
        claims := c.appointment_made is true or c.session_outcome is not distinct from 'appointment_booked'
                  or c.appointment_link_status is not distinct from 'linked';
        has_one := exists (select from booking_guard_internal.guarded_appointments a where a.call_id = judge_call.call_id);
        if claims = has_one and (not has_one or c.appointment_made is true) then
            -- The application set the booking flags itself (appointment_made and session_outcome,
            -- usually never the link): link sync would have set appointment_link_status when the
            -- appointment arrived, so derive it now.
            if has_one and appointments_changed and c.appointment_link_status is distinct from 'linked'
               and booking_guard.rule_mode('unlinked_appointment', c.company) in ('correct', 'enforce') then
                perform booking_guard_internal.sync_call_flags(judge_call.call_id);
                return 'derived';
            end if;
            if from_due then
                delete from booking_guard.due_verifications d where d.call_id = judge_call.call_id;
            end if;
            return 'ok';
        end if;
        exit when locked;
        locked := true;
    end loop;

    if claims and not has_one then
        mode := booking_guard.rule_mode('missing_appointment', c.company);
        if from_due and mode = 'enforce' then
            -- the claim was committed before the rule was enforced: there is no transaction left
            -- to reject, and raising here would stop verify_due() at this call for good
            mode := 'correct';
        end if;
        if mode = 'off' then
            return 'off';
        end if;
        if mode = 'enforce' then
            perform booking_guard_internal.reject('missing_appointment', judge_call.call_id::text,
                format('Call %s (%s) claims a booking (session_outcome %s, appointment_made %s, appointment_link_status %s) '
                       'but no appointment is linked to it.', judge_call.call_id, c.retell_call_id, c.session_outcome,
                       c.appointment_made, c.appointment_link_status));
        end if;
        grace := (select s.interval_value from booking_guard.settings s where s.name = 'verification_grace');
        if not from_due and grace > interval '0' then
            insert into booking_guard.due_verifications as d (call_id, due_at)
            values (judge_call.call_id, clock_timestamp() + grace)
            on conflict on constraint due_verifications_pkey do nothing;
            return 'deferred';
        end if;
        delete from booking_guard.due_verifications d where d.call_id = judge_call.call_id;
        if mode = 'observe' then
            perform booking_guard_internal.rule_alert('missing_appointment', 'call', judge_call.call_id::text,
                format('Call %s claims a booking but no appointment is linked to it', c.retell_call_id),
                jsonb_build_object('session_outcome', c.session_outcome, 'appointment_made', c.appointment_made,
                                   'appointment_link_status', c.appointment_link_status), false);
            return 'alerted';
        end if;
        rolled := booking_guard.rollback_on_failure(judge_call.call_id, 'no appointment linked at verification',
                                                    'missing_appointment');
        perform booking_guard_internal.queue_review(judge_call.call_id, 'appointment_validation_failed',
            rolled || jsonb_build_object('rule', 'missing_appointment', 'retell_call_id', c.retell_call_id),
            alert_id => (rolled ->> 'alert_id')::bigint);
        return 'rolled_back';
    end if;

    -- An appointment is linked, but the flags deny it (rule unlinked_appointment).
    mode := booking_guard.rule_mode('unlinked_appointment', c.company);
    if from_due and mode = 'enforce' then
        mode := 'correct';   -- as above: verify_due() judges committed rows
    end if;
    if appointments_changed and mode in ('correct', 'enforce') then
        -- the flags lag behind an appointment of this transaction: derive them, silently
        perform booking_guard_internal.sync_call_flags(judge_call.call_id);
        return 'derived';
    elsif mode = 'enforce' then
        perform booking_guard_internal.reject('unlinked_appointment', judge_call.call_id::text,
            format('Call %s (%s) has a linked appointment but appointment_made is %s.', judge_call.call_id,
                   c.retell_call_id, coalesce(c.appointment_made::text, 'null')));
    elsif mode = 'correct' then
        perform booking_guard_internal.sync_call_flags(judge_call.call_id);
        perform booking_guard_internal.rule_alert('unlinked_appointment', 'call', judge_call.call_id::text,
            format('Call %s has a linked appointment but said it had none: flags set from the appointment', c.retell_call_id),
            jsonb_build_object('before', jsonb_build_object('session_outcome', c.session_outcome,
                                                            'appointment_made', c.appointment_made,
                                                            'appointment_link_status', c.appointment_link_status),
                               'after', jsonb_build_object('session_outcome', 'appointment_booked',
                                                           'appointment_made', true, 'appointment_link_status', 'linked')),
            true);
        return 'corrected';
    elsif mode = 'observe' then
        perform booking_guard_internal.rule_alert('unlinked_appointment', 'call', judge_call.call_id::text,
            format('Call %s has a linked appointment but appointment_made is %s', c.retell_call_id,
                   coalesce(c.appointment_made::text, 'null')), '{}', false);
        return 'alerted';
    end if;
    return 'off';
end
$$;

comment on function booking_guard_internal.judge_call(bigint, boolean, boolean) is
    'The truth check of one call: its flags against its linked appointments, applied by the rules missing_appointment and unlinked_appointment.';

-- C (extension/src/booking_guard.c): judge_call() of the row's call, as booking_guard_worker.
create function booking_guard_internal.calls_truth_check()
returns trigger
language c
as 'MODULE_PATHNAME', 'calls_truth_check';

comment on function booking_guard_internal.calls_truth_check() is
    'Deferred constraint trigger on the attached calls table (C): judges the call at COMMIT.';

-- C (extension/src/booking_guard.c): it runs at COMMIT for every appointment a booking
-- writes, and almost always finds the call verified by calls_before() after the appointment
-- was written (the usual booking: appointment, then flags); otherwise it runs judge_call().
create function booking_guard_internal.appointments_truth_check()
returns trigger
language c
as 'MODULE_PATHNAME', 'appointments_truth_check';

comment on function booking_guard_internal.appointments_truth_check() is
    'Deferred constraint trigger on the attached appointments table (C): judges, at COMMIT, the calls whose appointments changed, unless calls_before() verified the call after this appointment was written.';

-- The WHEN clause of the calls-side constraint triggers: a row whose claim calls_before()
-- verified, or that claims nothing new, queues no check at all. It reads (and clears) a mark
-- of the current transaction only, so any role may run it.
create function booking_guard_internal.claim_check_needed(call_id bigint)
returns boolean
language c
volatile
as 'MODULE_PATHNAME', 'claim_check_needed';

comment on function booking_guard_internal.claim_check_needed(bigint) is
    'WHEN clause of the calls-side truth check: false when calls_before() found the row just written needs no check at COMMIT (its claim verified, or nothing claimed).';

-- The WHEN clause of the appointments-side constraint trigger: false inside booking_guard's own
-- writes as booking_guard_worker, where PostgreSQL does not allow queuing a deferred trigger.
create function booking_guard_internal.commit_check_possible()
returns boolean
language c
volatile
as 'MODULE_PATHNAME', 'commit_check_possible';

comment on function booking_guard_internal.commit_check_possible() is
    'WHEN clause of the appointments-side truth check: false inside booking_guard''s own writes (a security-restricted operation, where no deferred trigger may be queued; what they write needs no check).';

-- The due list's verdicts, batch by batch (a job step: 440_schedule.sql), as booking_guard_worker.
create function booking_guard_internal.verify_step(state jsonb)
returns jsonb
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    as_of     timestamptz := coalesce((state -> 'args' ->> 'as_of')::timestamptz, clock_timestamp());
    batch     integer := (select s.integer_value from booking_guard.settings s where s.name = 'job_batch_size');
    due       bigint;
    verdicts  jsonb := '[]';
begin
    perform booking_guard_internal.attached();
    for due in
        select d.call_id from booking_guard.due_verifications d
         where d.due_at <= as_of
         order by d.due_at
         limit batch
           for update skip locked
    loop
        -- Off the list first: whatever the verdict (ok, repaired, alerted, rule off), the grace
        -- is over and the call is judged once; a later change of the call queues it anew.
        delete from booking_guard.due_verifications d where d.call_id = due;
        verdicts := verdicts || jsonb_build_object('call_id', due, 'verdict', booking_guard_internal.judge_call(due, true));
    end loop;
    return state || jsonb_build_object('verdicts', coalesce(state -> 'verdicts', '[]') || verdicts,
                                       'done', jsonb_array_length(verdicts) < batch);
end
$$;

comment on function booking_guard_internal.verify_step(jsonb) is
    'Job verify_due, one step: judges up to job_batch_size calls whose grace has passed (SKIP LOCKED: concurrent runs share the work).';

create function booking_guard.verify_due(as_of timestamptz default clock_timestamp())
returns table (call_id bigint, verdict text)
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    result  jsonb;
begin
    if as_of is null or (as_of > clock_timestamp() + interval '1 second'
                         and not coalesce((select r.rolsuper from pg_catalog.pg_roles r where r.rolname = current_user), false)) then
        raise exception 'verify_due() cannot judge calls before their grace has passed'
            using errcode = 'BG005',
                  detail = format('as_of: %s, now: %s', coalesce(as_of::text, 'null'), clock_timestamp()),
                  hint = 'Call booking_guard.verify_due() without an argument; a later as_of is for superusers (tests).';
    end if;
    result := booking_guard_internal.run_job_steps('verify_due', jsonb_build_object('as_of', as_of));
    perform booking_guard_internal.job_raise(result);
    return query select (v ->> 'call_id')::bigint, v ->> 'verdict' from jsonb_array_elements(result -> 'verdicts') v;
end
$$;

comment on function booking_guard.verify_due(timestamptz) is
    'Judges the calls on the due list whose verification grace has passed (by now; a later as_of only for superusers); concurrent callers share the work (SKIP LOCKED). Runs as booking_guard_worker.';
