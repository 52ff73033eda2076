-- Rules: what booking_guard checks, how loudly, and what it does about it (table booking_guard.rules).
--
-- mode: off (not checked), observe (alert only), correct (alert and repair), enforce (reject the
-- offending transaction). rollout_percent applies `mode` to a stable share of companies (a hash of
-- company_id), the others get `fallback_mode`: a canary rollout is enforce at 10 %, then 50 %,
-- then 100 %.

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
