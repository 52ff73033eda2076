-- The commit-time truth check (rules missing_appointment and unlinked_appointment).
--
-- Deferred constraint triggers judge, at COMMIT, every call touched in the transaction
-- whose flags claim a booking, and every call whose appointments changed. The seed slept
-- 5 s in a job; here the verdict is at COMMIT, or, with verification_grace > 0 (for
-- applications that write the appointment in a later transaction), on the due list that
-- verify_due() works through once the grace has passed. enforce is always judged at
-- COMMIT: a transaction can only be rejected while it is committing.

create table booking_guard.due_verifications (
    call_id      bigint primary key,
    due_at       timestamptz not null,
    enqueued_at  timestamptz not null default clock_timestamp()
);

create index due_verifications_due_at_idx on booking_guard.due_verifications (due_at);

comment on table booking_guard.due_verifications is
    'Calls that claim a booking without an appointment yet, to be judged by verify_due() once verification_grace has passed.';

-- History, not configuration, but it must survive pg_dump / pg_restore like the rest.
select pg_catalog.pg_extension_config_dump('booking_guard.due_verifications', '');

create function booking_guard.rollback_on_failure(call_id bigint, reason text,
                                                  alert_type text default 'appointment_validation_failed')
returns jsonb
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_column
declare
    before    record;
    alert_id  bigint;
    details   jsonb;
begin
    if rollback_on_failure.call_id is null or rollback_on_failure.reason is null then
        raise exception 'rollback_on_failure() needs a call id and a reason'
            using errcode = 'BG005',
                  detail = format('call_id: %s, reason: %s', coalesce(rollback_on_failure.call_id::text, 'null'),
                                  coalesce(rollback_on_failure.reason, 'null')),
                  hint = 'select booking_guard.rollback_on_failure(42, ''appointment_not_found'');';
    end if;
    perform booking_guard.attached();   -- BG003 rather than "relation guarded_calls does not exist"
    select g.retell_call_id, g.session_outcome, g.appointment_made, g.appointment_link_status
      into before
      from booking_guard.guarded_calls g
     where g.id = rollback_on_failure.call_id
       for no key update;
    if not found then
        raise exception 'unknown call %', rollback_on_failure.call_id
            using errcode = 'BG004',
                  detail = format('The attached calls table has no row with id %s.', rollback_on_failure.call_id),
                  hint = 'Pass the id of an existing call.';
    end if;
    update booking_guard.guarded_calls g
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
    perform booking_guard.log_event('rollback', rollback_on_failure.alert_type, 'call', rollback_on_failure.call_id::text,
                                    details);
    alert_id := booking_guard.raise_alert(rollback_on_failure.alert_type, 'critical', 'call',
        rollback_on_failure.call_id::text,
        format('Call %s claimed a booking that does not stand (%s): rolled back to creation_failed',
               before.retell_call_id, rollback_on_failure.reason),
        details, true);
    -- A phantom_booking or outcome_flag_mismatch alert whose correction (appointment_made or
    -- session_outcome set to a booking) this rollback undid is superseded: one open alert per
    -- failed booking, pointing at what was done.
    update booking_guard.alerts a
       set resolved_at = now(), details = a.details || jsonb_build_object('superseded_by', alert_id)
     where a.fingerprint in (concat_ws(':', 'phantom_booking', 'call', rollback_on_failure.call_id::text),
                             concat_ws(':', 'outcome_flag_mismatch', 'call', rollback_on_failure.call_id::text))
       and a.resolved_at is null;
    return details || jsonb_build_object('alert_id', alert_id);
end
$$;

comment on function booking_guard.rollback_on_failure(bigint, text, text) is
    'The seed''s rollbackOnFailure: sets the call to creation_failed (appointment_made false), logs the rollback and raises a critical alert; returns before/after.';

-- The verdict on one call. from_due: called by verify_due(), so the grace is over.
-- appointments_changed: the call gained or lost an appointment in the committing transaction.
-- Then the flags are derived from the appointments (seed trigger 4) rather than judged as the
-- application's claim, and the call row is locked before the appointments are counted: a
-- concurrent transaction changing this call's appointments holds that lock until it commits,
-- so whichever of the two judges last sees both changes.
create function booking_guard.judge_call(call_id bigint, from_due boolean default false,
                                         appointments_changed boolean default false)
returns text
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    c        record;
    claims   boolean;
    has_one  boolean;
    mode     text;
    grace    interval;
    locked   boolean := appointments_changed;
begin
    -- Read optimistically; lock and read again only when something has to be done, so that a
    -- consistent booking costs two index lookups at COMMIT and writes nothing.
    loop
        if locked then
            select g.company_id::text as company, g.retell_call_id, g.appointment_made, g.session_outcome,
                   g.appointment_link_status
              into c from booking_guard.guarded_calls g where g.id = judge_call.call_id for no key update;
        else
            select g.company_id::text as company, g.retell_call_id, g.appointment_made, g.session_outcome,
                   g.appointment_link_status
              into c from booking_guard.guarded_calls g where g.id = judge_call.call_id;
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
        has_one := exists (select from booking_guard.guarded_appointments a where a.call_id = judge_call.call_id);
        if claims = has_one and (not has_one or c.appointment_made is true) then
            -- The application set the booking flags itself (the seed's trackBooking sets
            -- appointment_made and session_outcome, never the link): trigger 4 would have set
            -- appointment_link_status when the appointment arrived, so derive it now.
            if has_one and appointments_changed and c.appointment_link_status is distinct from 'linked'
               and booking_guard.rule_mode('unlinked_appointment', c.company) in ('correct', 'enforce') then
                perform booking_guard.sync_call_flags(judge_call.call_id);
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
            perform booking_guard.reject('missing_appointment', judge_call.call_id::text,
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
            perform booking_guard.raise_alert('missing_appointment', 'critical', 'call', judge_call.call_id::text,
                format('Call %s claims a booking but no appointment is linked to it', c.retell_call_id),
                jsonb_build_object('session_outcome', c.session_outcome, 'appointment_made', c.appointment_made,
                                   'appointment_link_status', c.appointment_link_status), false);
            return 'alerted';
        end if;
        perform booking_guard.queue_for_review(judge_call.call_id, 'appointment_validation_failed',
            booking_guard.rollback_on_failure(judge_call.call_id, 'no appointment linked at verification',
                                              'missing_appointment')
            || jsonb_build_object('rule', 'missing_appointment', 'retell_call_id', c.retell_call_id));
        return 'rolled_back';
    end if;

    -- An appointment is linked, but the flags deny it (rule unlinked_appointment).
    mode := booking_guard.rule_mode('unlinked_appointment', c.company);
    if from_due and mode = 'enforce' then
        mode := 'correct';   -- as above: verify_due() judges committed rows
    end if;
    if appointments_changed and mode in ('correct', 'enforce') then
        -- the flags lag behind an appointment of this transaction: derive them, silently
        perform booking_guard.sync_call_flags(judge_call.call_id);
        return 'derived';
    elsif mode = 'enforce' then
        perform booking_guard.reject('unlinked_appointment', judge_call.call_id::text,
            format('Call %s (%s) has a linked appointment but appointment_made is %s.', judge_call.call_id,
                   c.retell_call_id, coalesce(c.appointment_made::text, 'null')));
    elsif mode = 'correct' then
        perform booking_guard.sync_call_flags(judge_call.call_id);
        perform booking_guard.raise_alert('unlinked_appointment', 'critical', 'call', judge_call.call_id::text,
            format('Call %s has a linked appointment but said it had none: flags set from the appointment', c.retell_call_id),
            jsonb_build_object('before', jsonb_build_object('session_outcome', c.session_outcome,
                                                            'appointment_made', c.appointment_made,
                                                            'appointment_link_status', c.appointment_link_status),
                               'after', jsonb_build_object('session_outcome', 'appointment_booked',
                                                           'appointment_made', true, 'appointment_link_status', 'linked')),
            true);
        return 'corrected';
    elsif mode = 'observe' then
        perform booking_guard.raise_alert('unlinked_appointment', 'critical', 'call', judge_call.call_id::text,
            format('Call %s has a linked appointment but appointment_made is %s', c.retell_call_id,
                   coalesce(c.appointment_made::text, 'null')), '{}', false);
        return 'alerted';
    end if;
    return 'off';
end
$$;

comment on function booking_guard.judge_call(bigint, boolean, boolean) is
    'The truth check of one call: its flags against its linked appointments, applied by the rules missing_appointment and unlinked_appointment.';

create function booking_guard.calls_truth_check()
returns trigger
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    perform booking_guard.judge_call(new.id);
    return null;
end
$$;

comment on function booking_guard.calls_truth_check() is
    'Deferred constraint trigger on the attached calls table: judges the call at COMMIT.';

-- C (extension/src/booking_path.c): it runs at COMMIT for every appointment a booking
-- writes, and almost always finds the call verified by calls_before() after the appointment
-- was written (the usual booking: appointment, then flags); otherwise it runs judge_call().
create function booking_guard.appointments_truth_check()
returns trigger
language c
as 'MODULE_PATHNAME', 'appointments_truth_check';

comment on function booking_guard.appointments_truth_check() is
    'Deferred constraint trigger on the attached appointments table (C): judges, at COMMIT, the calls whose appointments changed, unless calls_before() verified the call after this appointment was written.';

-- The WHEN clause of the calls-side constraint triggers: a row whose claim calls_before()
-- verified, or that claims nothing new, queues no check at all. It reads (and clears) a mark
-- of the current transaction only, so any role may run it.
create function booking_guard.claim_check_needed(call_id bigint)
returns boolean
language c
volatile
as 'MODULE_PATHNAME', 'claim_check_needed';

comment on function booking_guard.claim_check_needed(bigint) is
    'WHEN clause of the calls-side truth check: false when calls_before() found the row just written needs no check at COMMIT (its claim verified, or nothing claimed).';

create function booking_guard.verify_due(as_of timestamptz default clock_timestamp())
returns table (call_id bigint, verdict text)
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_column
declare
    due  bigint;
begin
    perform booking_guard.attached();
    for due in
        select d.call_id from booking_guard.due_verifications d
         where d.due_at <= verify_due.as_of
         order by d.due_at
           for update skip locked
    loop
        -- Off the list first: whatever the verdict (ok, repaired, alerted, rule off), the grace
        -- is over and the call is judged once; a later change of the call queues it anew.
        delete from booking_guard.due_verifications d where d.call_id = due;
        call_id := due;
        verdict := booking_guard.judge_call(due, true);
        return next;
    end loop;
end
$$;

comment on function booking_guard.verify_due(timestamptz) is
    'Judges the calls on the due list whose verification grace has passed by as_of (default: now); concurrent callers share the work (SKIP LOCKED).';

create function booking_guard.install_triggers(calls regclass, appointments regclass)
returns void
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
    execute format('create trigger booking_guard_calls_before before insert or update on %s
                    for each row execute function booking_guard.calls_before()', calls);
    execute format('create constraint trigger booking_guard_calls_truth_insert after insert on %s
                    deferrable initially deferred for each row
                    when (booking_guard.claim_check_needed(new.id))
                    execute function booking_guard.calls_truth_check()', calls);
    execute format('create constraint trigger booking_guard_calls_truth_update after update on %s
                    deferrable initially deferred for each row
                    when (booking_guard.claim_check_needed(new.id))
                    execute function booking_guard.calls_truth_check()', calls);
    execute format('create trigger booking_guard_appointments_sync after delete or update of call_id on %s
                    for each row execute function booking_guard.appointments_sync()', appointments);
    execute format('create constraint trigger booking_guard_appointments_truth after insert or delete or update of call_id on %s
                    deferrable initially deferred for each row
                    execute function booking_guard.appointments_truth_check()', appointments);
end
$$;

comment on function booking_guard.install_triggers(regclass, regclass) is
    'Creates booking_guard''s triggers on the attached tables (used by attach(); detach() drops every booking_guard_* trigger).';

grant execute on function booking_guard.rollback_on_failure(bigint, text, text) to booking_guard_app, booking_guard_admin;
grant execute on function booking_guard.verify_due(timestamptz) to booking_guard_app, booking_guard_admin;
grant select on booking_guard.due_verifications to booking_guard_monitor;
