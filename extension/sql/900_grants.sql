-- Privileges of the foundation objects. PUBLIC gets one function (below); each role gets what its job needs:
-- booking_guard_app      the booking path and the circuit breaker
-- booking_guard_monitor  read-only: views, metrics, reports (the exporter's role)
-- booking_guard_admin    settings, rules, review queue, attachment; also a monitor
-- This file runs last: it takes from PUBLIC what PostgreSQL grants it by default on every
-- function (EXECUTE). Each concern's file grants its own objects to the roles above.

revoke all on all functions in schema booking_guard from public;
revoke all on all tables in schema booking_guard from public;

-- The one exception: the WHEN clause of the calls-side truth check runs as whoever writes the
-- calls table, and tells only whether the row just written needs that check.
grant execute on function booking_guard.claim_check_needed(bigint) to public;

grant usage on schema booking_guard to booking_guard_app, booking_guard_monitor, booking_guard_admin;
grant booking_guard_monitor to booking_guard_admin;

grant select on booking_guard.settings, booking_guard.rules, booking_guard.required_columns,
                booking_guard.required_indexes, booking_guard.attachment
   to booking_guard_monitor;
grant execute on function booking_guard.setting(text), booking_guard.rule_mode(text, text),
                          booking_guard.rollout_bucket(text), booking_guard.environment()
   to booking_guard_monitor, booking_guard_app;

grant execute on function booking_guard.set_setting(text, text),
                          booking_guard.set_rule(text, text, integer, text),
                          booking_guard.attach(regclass, regclass),
                          booking_guard.detach()
   to booking_guard_admin;
