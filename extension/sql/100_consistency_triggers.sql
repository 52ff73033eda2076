-- The consistency triggers, each governed by its rule's mode and rollout.
--
--   calls, BEFORE INSERT OR UPDATE (calls_before, C):
--     1. direction          rule missing_direction
--     2. customer link      rule customer_link
--     3. outcome vs flag    rules phantom_booking and outcome_flag_mismatch
--   appointments, AFTER DELETE OR UPDATE OF call_id (appointments_sync, C), and at COMMIT after
--   INSERT (the truth check, 110_truth_check.sql):
--     4. link sync          rule unlinked_appointment: the call's flags are recomputed from the
--                           appointments that remain linked
--
-- Setting appointment_made whenever the outcome says booked would, on its own, turn every phantom
-- booking into a call that looks booked: the flag is harmonised here, and the commit-time check
-- then decides whether an appointment stands behind it (a call claiming a booking without one is
-- rolled back to creation_failed). Deleting an appointment recomputes the call's flags from the
-- appointments that remain (a call may hold several): with none left it is unlinked and a booked
-- outcome becomes appointment_cancelled, instead of the flag flipping straight back.
--
-- Link sync runs at once when an appointment is deleted or moved, but for a new appointment the
-- flags are derived at COMMIT by the truth check: the application's own next statement usually
-- sets them anyway, and deriving them once at COMMIT saves every booking a second UPDATE of its
-- call.
--
-- Modes: observe alerts, correct repairs and alerts (auto_corrected, before/after in details),
-- enforce rejects the statement with BG002. Deriving a flag from the truth is not a correction:
-- link sync and the plain customer link (no link status given) are silent. Rule modes are looked
-- up only when a condition holds, so a consistent row costs no query. The triggers are C
-- (extension/src/booking_guard.c); the rules' actions stay here in PL/pgSQL, run as
-- booking_guard_worker.

create function booking_guard_internal.reject(rule_name text, call_id text, what text)
returns void
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
    raise exception 'booking rejected by rule %: call %', rule_name, call_id
        using errcode = 'BG002',
              detail = what,
              hint = format('The rule is in enforce mode. Write consistent rows, or relax it: '
                            'select booking_guard.set_rule(%L, ''correct'');', rule_name);
end
$$;

comment on function booking_guard_internal.reject(text, text, text) is
    'Raises BG002 for a rule in enforce mode, naming the rule and the call.';

create function booking_guard_internal.calls_rules()
returns trigger
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    company  text := new.company_id::text;
    call_key text := new.id::text;
    mode     text;
    was      jsonb;
begin
    -- 1. direction
    if new.direction is null then
        mode := booking_guard.rule_mode('missing_direction', company);
        if mode = 'enforce' then
            perform booking_guard_internal.reject('missing_direction', call_key, 'direction is null');
        elsif mode = 'correct' then
            new.direction := (select s.text_value from booking_guard.settings s where s.name = 'default_direction');
            perform booking_guard_internal.rule_alert('missing_direction', 'call', call_key,
                format('Call %s had no direction: set to %s', new.retell_call_id, new.direction),
                jsonb_build_object('before', jsonb_build_object('direction', null),
                                   'after', jsonb_build_object('direction', new.direction)), true);
        elsif mode = 'observe' then
            perform booking_guard_internal.rule_alert('missing_direction', 'call', call_key,
                format('Call %s has no direction', new.retell_call_id), '{}', false);
        end if;
    end if;

    -- 2. customer link: on insert, and when customer_id changes
    if new.customer_id is not null
       and (tg_op = 'INSERT' or old.customer_id is distinct from new.customer_id) then
        mode := booking_guard.rule_mode('customer_link', company);
        -- Only a status the application writes with the customer contradicts it; one carried over
        -- from the old row ('unlinked' while there was no customer) is what linking replaces.
        if mode in ('correct', 'enforce') and new.customer_link_status is distinct from 'linked' then
            if new.customer_link_status is not null
               and (tg_op = 'INSERT' or new.customer_link_status is distinct from old.customer_link_status) then
                if mode = 'enforce' then
                    perform booking_guard_internal.reject('customer_link', call_key,
                        format('customer_id %s is set but customer_link_status is %s', new.customer_id,
                               new.customer_link_status));
                end if;
                perform booking_guard_internal.rule_alert('customer_link', 'call', call_key,
                    format('Call %s has a customer but link status %s: set to linked', new.retell_call_id,
                           new.customer_link_status),
                    jsonb_build_object('before', jsonb_build_object('customer_link_status', new.customer_link_status),
                                       'after', jsonb_build_object('customer_link_status', 'linked')), true);
            end if;
        end if;
        if mode in ('correct', 'enforce') then
            new.customer_link_status := 'linked';
            new.customer_linked_at := now();
            new.customer_link_method := coalesce(new.customer_link_method, 'phone_match');
            new.customer_link_confidence := coalesce(new.customer_link_confidence, 100.00);
        elsif mode = 'observe' and new.customer_link_status is distinct from 'linked' then
            perform booking_guard_internal.rule_alert('customer_link', 'call', call_key,
                format('Call %s has a customer but link status %s', new.retell_call_id,
                       coalesce(new.customer_link_status, 'null')), '{}', false);
        end if;
    end if;

    -- 3a. phantom booking: the outcome claims a booking the flag denies. The flag is set; the
    -- commit-time truth check then decides whether an appointment stands behind it.
    if new.session_outcome = 'appointment_booked' and not coalesce(new.appointment_made, false) then
        mode := booking_guard.rule_mode('phantom_booking', company);
        was := jsonb_build_object('session_outcome', new.session_outcome, 'appointment_made', new.appointment_made);
        if mode = 'enforce' then
            perform booking_guard_internal.reject('phantom_booking', call_key,
                'session_outcome is appointment_booked but appointment_made is false');
        elsif mode = 'correct' then
            new.appointment_made := true;
            perform booking_guard_internal.rule_alert('phantom_booking', 'call', call_key,
                format('Call %s said appointment_booked with appointment_made false: flag set, appointment to be verified',
                       new.retell_call_id),
                jsonb_build_object('before', was, 'after', was || jsonb_build_object('appointment_made', true)), true);
        elsif mode = 'observe' then
            perform booking_guard_internal.rule_alert('phantom_booking', 'call', call_key,
                format('Call %s says appointment_booked but appointment_made is false', new.retell_call_id),
                jsonb_build_object('state', was), false);
        end if;
    end if;

    -- 3b. the flag claims a booking another outcome denies
    if coalesce(new.appointment_made, false) and new.session_outcome is not null
       and new.session_outcome <> 'appointment_booked' then
        mode := booking_guard.rule_mode('outcome_flag_mismatch', company);
        was := jsonb_build_object('session_outcome', new.session_outcome, 'appointment_made', new.appointment_made);
        if mode = 'enforce' then
            perform booking_guard_internal.reject('outcome_flag_mismatch', call_key,
                format('appointment_made is true but session_outcome is %s', new.session_outcome));
        elsif mode = 'correct' then
            new.session_outcome := 'appointment_booked';
            perform booking_guard_internal.rule_alert('outcome_flag_mismatch', 'call', call_key,
                format('Call %s had appointment_made true with outcome %s: outcome set to appointment_booked',
                       new.retell_call_id, was ->> 'session_outcome'),
                jsonb_build_object('before', was, 'after', was || jsonb_build_object('session_outcome', 'appointment_booked')),
                true);
        elsif mode = 'observe' then
            perform booking_guard_internal.rule_alert('outcome_flag_mismatch', 'call', call_key,
                format('Call %s has appointment_made true but outcome %s', new.retell_call_id, new.session_outcome),
                jsonb_build_object('state', was), false);
        end if;
    end if;

    return new;
end
$$;

comment on function booking_guard_internal.calls_rules() is
    'Steps 1-3 of the calls trigger (direction, customer link, outcome vs flag), each by its rule''s mode: run by calls_before() for a row a rule has something to do with.';

-- The trigger itself: see calls_before() in extension/src/booking_guard.c. It runs calls_rules()
-- above only for a row one of those rules acts on, and does the plain customer link and the claim
-- check (step 4, against the appointments, now) itself.
create function booking_guard_internal.calls_before()
returns trigger
language c
as 'MODULE_PATHNAME', 'calls_before';

comment on function booking_guard_internal.calls_before() is
    'Trigger on the attached calls table (C): steps 1-3 through calls_rules() when a rule acts, the plain customer link, and the claim checked against the appointments.';

-- Recomputes a call's flags from the appointments linked to it (link sync, reconciliation).
-- The call row is locked before the appointments are counted, and the count is a statement
-- of its own: under READ COMMITTED it then sees every appointment committed by a
-- transaction that held the lock before us. Two sessions changing the appointments of one
-- call are thereby serialised on the call row and the last one computes from the truth.
create function booking_guard_internal.sync_call_flags(call_id bigint, governing_rule text default null)
returns boolean
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    c        record;
    has_one  boolean;
begin
    select g.company_id::text as company, g.appointment_made, g.session_outcome, g.appointment_link_status
      into c
      from booking_guard_internal.guarded_calls g
     where g.id = sync_call_flags.call_id
       for no key update;
    if not found
       or (governing_rule is not null
           and booking_guard.rule_mode(governing_rule, c.company) not in ('correct', 'enforce')) then
        return false;
    end if;
    has_one := exists (select from booking_guard_internal.guarded_appointments a where a.call_id = sync_call_flags.call_id);
    if has_one then
        if c.appointment_made is true and c.session_outcome = 'appointment_booked'
           and c.appointment_link_status = 'linked' then
            return false;
        end if;
        update booking_guard_internal.guarded_calls g
           set appointment_made = true,
               session_outcome = 'appointment_booked',
               appointment_link_status = 'linked',
               appointment_linked_at = coalesce(g.appointment_linked_at, now()),
               updated_at = now()
         where g.id = sync_call_flags.call_id;
    else
        if c.appointment_made is not true and c.session_outcome is distinct from 'appointment_booked'
           and c.appointment_link_status is distinct from 'linked' then
            return false;
        end if;
        update booking_guard_internal.guarded_calls g
           set appointment_made = false,
               session_outcome = case when g.session_outcome = 'appointment_booked' then 'appointment_cancelled'
                                      else g.session_outcome end,
               appointment_link_status = 'unlinked',
               updated_at = now()
         where g.id = sync_call_flags.call_id;
    end if;
    return true;
end
$$;

comment on function booking_guard_internal.sync_call_flags(bigint, text) is
    'Sets a call''s appointment_made, session_outcome and appointment_link_status from the appointments linked to it (only where governing_rule, if given, corrects); true if it changed them.';

-- C (extension/src/booking_guard.c): sync_call_flags() of the call that lost and the call that
-- gained an appointment, in id order, as booking_guard_worker.
create function booking_guard_internal.appointments_sync()
returns trigger
language c
as 'MODULE_PATHNAME', 'appointments_sync';

comment on function booking_guard_internal.appointments_sync() is
    'Trigger on the attached appointments table (C), on DELETE and UPDATE OF call_id: recomputes the flags of the calls that lost or gained an appointment.';
