-- settings and rules: every error path, and that an error writes nothing.
begin;
select plan(27);

select throws_ok($$select booking_guard.set_setting('no_such_setting', '1')$$, 'BG004',
                 'unknown setting "no_such_setting"', 'unknown setting name: BG004');
select throws_ok($$select booking_guard.set_setting('verification_grace', 'soon')$$, 'BG005',
                 'invalid value for setting "verification_grace": "soon" is not a valid interval',
                 'not an interval: BG005');
select throws_ok($$select booking_guard.set_setting('verification_grace', '2 hours')$$, 'BG005',
                 'value out of range for setting "verification_grace": 2 hours', 'above the maximum: BG005');
select throws_ok($$select booking_guard.set_setting('verification_grace', '-1 second')$$, 'BG005',
                 'value out of range for setting "verification_grace": -1 second', 'below the minimum: BG005');
select throws_ok($$select booking_guard.set_setting('verification_grace', null)$$, 'BG005',
                 'setting "verification_grace" cannot be set to null', 'null: BG005');
select throws_ok($$select booking_guard.set_setting('default_direction', 'sideways')$$, 'BG005',
                 'invalid value for setting "default_direction": "sideways"', 'not an allowed value: BG005');
select throws_ok($$select booking_guard.set_setting('validation_recent_window', '0')$$, 'BG005',
                 'value out of range for setting "validation_recent_window": 0', 'window below 1 s: BG005');
select is(booking_guard.setting('verification_grace'), '00:00:05', 'failed set_setting calls wrote nothing');
select is(booking_guard.setting('default_direction'), 'inbound', 'failed set_setting calls wrote nothing (text)');

select is(booking_guard.set_setting('verification_grace', '0'), '00:00:00', 'grace 0 is allowed');
select is(booking_guard.set_setting('verification_grace', '1 hour'), '01:00:00', 'grace 1 hour (the maximum) is allowed');
select is(booking_guard.set_setting('default_direction', 'outbound'), 'outbound', 'an allowed text value');
select is((select updated_by from booking_guard.settings where name = 'default_direction'), current_user,
          'set_setting records who changed it');
select is(booking_guard.setting('no_such_setting'), null, 'setting() of an unknown name is null');

-- the CHECK constraints hold even against a direct UPDATE
select throws_ok($$update booking_guard.settings set interval_value = '1 day' where name = 'verification_grace'$$,
                 '23514', null, 'CHECK: interval out of range');
select throws_ok($$update booking_guard.settings set text_value = 'up' where name = 'default_direction'$$,
                 '23514', null, 'CHECK: text value not allowed');
select throws_ok($$update booking_guard.settings set integer_value = 3 where name = 'verification_grace'$$,
                 '23514', null, 'CHECK: a second typed value');

-- rules
select throws_ok($$select booking_guard.set_rule('no_such_rule', 'observe')$$, 'BG004',
                 'unknown rule "no_such_rule"', 'unknown rule: BG004');
select throws_ok($$select booking_guard.set_rule('phantom_booking', 'shout')$$, 'BG005',
                 'invalid mode for rule "phantom_booking": "shout"', 'unknown mode: BG005');
select throws_ok($$select booking_guard.set_rule('phantom_booking', 'enforce', 101)$$, 'BG005',
                 'invalid rollout percentage for rule "phantom_booking": 101', 'rollout above 100: BG005');
select throws_ok($$select booking_guard.set_rule('phantom_booking', 'enforce', 10, 'loud')$$, 'BG005',
                 'invalid mode for rule "phantom_booking": "enforce"', 'unknown fallback mode: BG005');
select is((select mode from booking_guard.rules where name = 'phantom_booking'), 'correct', 'failed set_rule wrote nothing');

select is((booking_guard.set_rule('phantom_booking', 'enforce', 10, 'correct')).rollout_percent, 10, 'set_rule sets the rollout');

-- rollout: a stable ~10 % of companies
select is((select count(*) from generate_series(1, 10000) c
            where booking_guard.rule_mode('phantom_booking', c::text) = 'enforce') between 850 and 1150, true,
          'enforce at 10 % covers about 10 % of 10,000 companies');
select is((select count(*) from generate_series(1, 10000) c
            where booking_guard.rule_mode('phantom_booking', c::text) not in ('enforce', 'correct')), 0::bigint,
          'the others get the fallback mode');
select is(booking_guard.rollout_bucket('42'), (('x' || substr(md5('42'), 1, 8))::bit(32)::bigint % 100)::integer,
          'the bucket is the first 32 bits of md5(company_id) modulo 100 (stable across servers and upgrades)');
select is(booking_guard.rule_mode('no_such_rule', '1'), null, 'rule_mode of an unknown rule is null');

select * from finish();
rollback;
