-- Rules: what booking_guard checks, how loudly, and what it does about it (table booking_guard.rules).
--
-- One row per rule holds all of it: what a finding is about (entity_type) and what detection reads
-- (source), the severity, the default and current mode, the report label, the alert text, the
-- repair (in words, and which repair: repair_kind) and the report's action item. The built-in
-- rules' conditions are SQL in the detection functions (400_detection.sql), one spot each; a rule an
-- administrator declares (declare_rule() below) carries its own predicate and repair statement and
-- runs them as a role the administrator chose.
--
-- mode: off (not checked), observe (alert only), correct (alert and repair), enforce (reject the
-- offending transaction). rollout_percent applies `mode` to a stable share of companies (a hash of
-- company_id), the others get `fallback_mode`: a canary rollout is enforce at 10 %, then 50 %,
-- then 100 %. A declared rule is checked after the fact (by the monitor and reconcile), never as a
-- row is written: it can be off, observe or, with a repair statement, correct; never enforce.

create trigger rules_replace_seeded_row
    before insert on booking_guard.rules
    for each row execute function booking_guard_internal.replace_seeded_row('name');

create function booking_guard.rollout_bucket(company_id text)
returns integer
language sql
immutable
parallel safe
set search_path = pg_catalog, pg_temp
as $$
    -- md5, not hashtext(): its output is fixed forever, so a company stays in the same
    -- bucket across PostgreSQL upgrades and on every server.
    select (('x' || substr(md5(coalesce(company_id, '')), 1, 8))::bit(32)::bigint % 100)::integer
$$;

comment on function booking_guard.rollout_bucket(text) is
    'The stable bucket 0..99 of a company for rule rollouts: a rule at N percent applies its mode to buckets below N.';

-- C (extension/src/booking_guard.c), like the triggers that call it on the booking path: it
-- reads the rules once per transaction and again after this session changes them (the
-- trigger below). A rule changed by another session applies from the next transaction on.
create function booking_guard.rule_mode(rule_name text, company_id text default null)
returns text
language c
stable
as 'MODULE_PATHNAME', 'rule_mode';

comment on function booking_guard.rule_mode(text, text) is
    'The mode a rule applies to one company: its mode inside the rollout percentage, its fallback_mode outside; null for an unknown rule.';

create function booking_guard_internal.rules_changed()
returns trigger
language c
as 'MODULE_PATHNAME', 'rules_changed';

comment on function booking_guard_internal.rules_changed() is
    'Statement trigger on rules: this session reads the rules again at its next rule_mode().';

create trigger rules_changed
    after insert or update or delete or truncate on booking_guard.rules
    for each statement execute function booking_guard_internal.rules_changed();

create function booking_guard.set_rule(rule_name text, new_mode text, new_rollout_percent integer default null,
                                       new_fallback_mode text default null)
returns booking_guard.rules
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    modes constant text[] := array['off', 'observe', 'correct', 'enforce'];
    r     booking_guard.rules;
begin
    if not exists (select from booking_guard.rules where name = rule_name) then
        raise exception 'unknown rule "%"', rule_name
            using errcode = 'BG004',
                  detail = format('Known rules: %s.', (select string_agg(name, ', ' order by name) from booking_guard.rules)),
                  hint = 'select name, mode, description from booking_guard.rules;';
    end if;
    if new_mode is null or not new_mode = any (modes)
       or (new_fallback_mode is not null and not new_fallback_mode = any (modes)) then
        raise exception 'invalid mode for rule "%": "%"', rule_name, coalesce(new_mode, 'null')
            using errcode = 'BG005',
                  detail = format('mode %s, fallback_mode %s', coalesce(new_mode, 'null'), coalesce(new_fallback_mode, 'unchanged')),
                  hint = 'Modes are off, observe, correct and enforce.';
    end if;
    if exists (select from booking_guard.rules x where x.name = rule_name and x.predicate is not null)
       and ('enforce' in (new_mode, new_fallback_mode)
            or ('correct' in (new_mode, new_fallback_mode)
                and (select x.repair_statement from booking_guard.rules x where x.name = rule_name) is null)) then
        raise exception 'invalid mode for declared rule "%": "%"', rule_name, new_mode
            using errcode = 'BG005',
                  detail = format('mode %s, fallback_mode %s. A declared rule is checked after the fact: it can alert '
                                  '(observe) and, with a repair statement, repair (correct), never reject a write (enforce).',
                                  new_mode, coalesce(new_fallback_mode, 'unchanged')),
                  hint = 'Use observe, or declare the rule again with a repair statement to use correct.';
    end if;
    if new_rollout_percent is not null and new_rollout_percent not between 0 and 100 then
        raise exception 'invalid rollout percentage for rule "%": %', rule_name, new_rollout_percent
            using errcode = 'BG005',
                  detail = 'rollout_percent is the share of companies the mode applies to.',
                  hint = 'Give a percentage between 0 and 100.';
    end if;
    update booking_guard.rules
       set mode = new_mode,
           rollout_percent = coalesce(new_rollout_percent, rollout_percent),
           fallback_mode = coalesce(new_fallback_mode, fallback_mode),
           updated_at = now(),
           updated_by = session_user
     where name = rule_name
    returning * into r;
    return r;
end
$$;

comment on function booking_guard.set_rule(text, text, integer, text) is
    'Sets a rule''s mode, and optionally its rollout percentage and fallback mode; unknown rule (BG004) or bad value (BG005) writes nothing.';

-- ---- rules users declare ----
--
-- An administrator declares a rule of their own in SQL: a predicate over the calls or the
-- appointments, a severity, a mode (observe or off; correct later with set_rule() when it has a
-- repair statement) and optionally a repair statement. It is then detected, alerted and deduplicated,
-- repaired by the monitor and reconcile, counted in the metrics and listed in the daily report like a
-- built-in rule. Its SQL runs with the rights of run_as, a role the declarer must be a member of,
-- that is neither a superuser nor one of booking_guard's own roles (booking_guard_owner,
-- booking_guard_worker): the C module switches to it as it switches to the worker. The SQL is checked
-- when the rule is declared: parsed, planned and its privileges checked as run_as; bad SQL is BG005
-- with the parser's message.

-- C (extension/src/booking_guard.c): checks a rule as run_as and stores it as booking_guard_owner.
create function booking_guard_internal.store_declared_rule(rule_name text, entity text, predicate text,
                                                           repair_statement text, run_as regrole, severity text,
                                                           mode text, description text, label text)
returns void
language c
as 'MODULE_PATHNAME', 'store_declared_rule';

comment on function booking_guard_internal.store_declared_rule(text, text, text, text, regrole, text, text, text, text) is
    'declare_rule(): checks that the caller is a member of run_as, that run_as is neither a superuser nor booking_guard''s, and the SQL as run_as (BG005 with the parser''s message), then stores the rule as booking_guard_owner.';

-- C: a declared rule's predicate on the given ids, and its repair statement on one id, as its role.
create function booking_guard_internal.declared_matches(rule_name text, ids bigint[])
returns bigint[]
language c
strict
as 'MODULE_PATHNAME', 'declared_matches';

comment on function booking_guard_internal.declared_matches(text, bigint[]) is
    'The ids among the given ones (calls or appointments) on which a declared rule''s predicate holds, the predicate run as the rule''s role.';

create function booking_guard_internal.declared_repair(rule_name text, entity_id bigint)
returns bigint
language c
strict
as 'MODULE_PATHNAME', 'declared_repair';

comment on function booking_guard_internal.declared_repair(text, bigint) is
    'Runs a declared rule''s repair statement ($1 the entity''s id) as the rule''s role; returns the rows it processed.';

create function booking_guard.declare_rule(rule_name text, entity text, predicate text, severity text, mode text,
                                           description text, run_as regrole, repair text default null,
                                           label text default null)
returns booking_guard.rules
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_variable
declare
    max_declared  constant integer := 100;
    bad           text;
    r             booking_guard.rules;
begin
    bad := case
        when rule_name is null or rule_name !~ '^[a-z][a-z0-9_]{0,62}$'
            then format('name %s: a lower-case identifier of at most 63 characters', coalesce(quote_literal(left(rule_name, 100)), 'null'))
        when entity is null or entity not in ('call', 'appointment')
            then format('entity %s: call (the predicate reads c, a row of the attached calls table) or appointment (a)',
                        coalesce(quote_literal(left(entity, 100)), 'null'))
        when predicate is null or predicate !~ '\S' or length(predicate) > 4000
            then 'predicate: a boolean SQL expression of at most 4000 characters'
        when severity is null or severity not in ('critical', 'warning', 'info')
            then format('severity %s: critical, warning or info', coalesce(quote_literal(left(severity, 100)), 'null'))
        when mode is null or mode not in ('observe', 'off')
            then format('mode %s: observe or off (correct afterwards with set_rule(), when the rule has a repair)',
                        coalesce(quote_literal(left(mode, 100)), 'null'))
        when description is null or description !~ '\S' or length(description) > 1000
            then 'description: what the rule finds, at most 1000 characters'
        when run_as is null
            then 'run_as: the role the rule''s SQL runs as'
        when repair is not null and (repair !~ '\S' or length(repair) > 4000)
            then 'repair: one SQL statement of at most 4000 characters, $1 the entity''s id'
        when label is not null and (label !~ '\S' or length(label) > 200)
            then 'label: the rule''s name in the daily report, at most 200 characters'
    end;
    if bad is not null then
        raise exception 'invalid rule: %', bad
            using errcode = 'BG005',
                  detail = format('declare_rule(%s, ...) writes nothing.', coalesce(quote_literal(left(rule_name, 100)), 'null')),
                  hint = 'select booking_guard.declare_rule(rule_name => ''transfer_without_booking'', entity => ''call'', '
                         'predicate => $p$c.session_outcome = ''transferred'' and c.appointment_made$p$, severity => ''warning'', '
                         'mode => ''observe'', description => ''...'', run_as => ''rules_reader'');';
    end if;
    if exists (select from booking_guard.rules x where x.name = rule_name and x.predicate is null) then
        raise exception 'rule "%" is built in', rule_name
            using errcode = 'BG005',
                  detail = 'A declared rule cannot take the name of a built-in one.',
                  hint = 'Choose another name; a built-in rule''s mode is set with set_rule().';
    end if;
    if exists (select from booking_guard_internal.alert_types() t where t.alert_type = rule_name)
       and not exists (select from booking_guard.rules x where x.name = rule_name) then
        raise exception 'rule name "%" is an alert type of booking_guard', rule_name
            using errcode = 'BG005',
                  detail = 'Alerts and metrics tell their types apart by name: a rule may not share one with a review reason or booking_guard''s own alerts.',
                  hint = 'Choose another name.';
    end if;
    if not exists (select from booking_guard.rules x where x.name = rule_name)
       and (select count(*) from booking_guard.rules x where x.predicate is not null) >= max_declared then
        raise exception 'too many declared rules'
            using errcode = 'BG005',
                  detail = format('At most %s rules can be declared (each runs on every batch of the monitor and is a metric label).',
                                  max_declared),
                  hint = 'Drop one you no longer need: select booking_guard.drop_rule(''name'');';
    end if;
    perform booking_guard_internal.store_declared_rule(rule_name, entity, predicate, repair, run_as, severity, mode,
                                                        description,
                                                        coalesce(label, initcap(replace(rule_name, '_', ' '))));
    select * into r from booking_guard.rules x where x.name = rule_name;
    return r;
end
$$;

comment on function booking_guard.declare_rule(text, text, text, text, text, text, regrole, text, text) is
    'Declares a rule of your own (or replaces one you declared): a boolean SQL predicate over a call (c) or an appointment (a), severity, mode observe or off, a description, the role its SQL runs as (you must be a member; not a superuser nor booking_guard''s own), an optional repair statement ($1 the id) and report label. Bad SQL is BG005 with the parser''s message.';

create function booking_guard.drop_rule(rule_name text)
returns booking_guard.rules
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_variable
declare
    r  booking_guard.rules;
    n  bigint;
begin
    select * into r from booking_guard.rules x where x.name = rule_name for update;
    if not found then
        raise exception 'unknown rule "%"', coalesce(left(rule_name, 100), 'null')
            using errcode = 'BG004',
                  detail = format('Declared rules: %s.', coalesce((select string_agg(x.name, ', ' order by x.name)
                                                                     from booking_guard.rules x where x.predicate is not null), 'none')),
                  hint = 'select name, description from booking_guard.rules where predicate is not null;';
    end if;
    if r.predicate is null then
        raise exception 'rule "%" is built in', rule_name
            using errcode = 'BG005',
                  detail = 'Only declared rules can be dropped.',
                  hint = format('Turn it off instead: select booking_guard.set_rule(%L, ''off'');', rule_name);
    end if;
    delete from booking_guard.rules x where x.name = rule_name;
    -- its open alerts end with it: nothing checks them any more
    update booking_guard.alerts a
       set resolved_at = now(), details = a.details || jsonb_build_object('rule_dropped', true)
     where a.alert_type = rule_name and a.resolved_at is null;
    get diagnostics n = row_count;
    perform booking_guard_internal.log_event('rule', rule_name, null, null,
        jsonb_build_object('dropped', true, 'by', session_user, 'alerts_resolved', n));
    return r;
end
$$;

comment on function booking_guard.drop_rule(text) is
    'Drops a declared rule and resolves its open alerts; returns the rule as it was. BG004 unknown rule, BG005 for a built-in one (turn it off with set_rule()).';
