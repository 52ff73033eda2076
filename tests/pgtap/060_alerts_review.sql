-- Alerts (one open per fingerprint, acknowledge, resolve), the review queue (priorities, one open
-- item per call and reason, claims, resolutions) and the append-only events log.
-- NOTIFY and concurrent sessions need real ones: tests/python/test_alerts_review.py and the isolation
-- specs tests/isolation/specs/alert_dedup.spec and review_queue.spec.
begin;
select plan(70);
set local client_min_messages = warning;

-- every timestamp of one transaction is now(): move rows back in time to see what changes
create function pg_temp.age_alert(alert_id bigint) returns void language sql as $$
    update booking_guard.alerts
       set detected_at = detected_at - interval '1 hour', last_seen_at = last_seen_at - interval '1 hour',
           acknowledged_at = acknowledged_at - interval '1 hour', resolved_at = resolved_at - interval '1 hour'
     where id = alert_id
$$;
create function pg_temp.alert_events(fp text) returns bigint language sql as $$
    select count(*) from booking_guard.events e
     where e.kind = 'alert' and concat_ws(':', e.rule, e.entity_type, e.entity_id) = fp
$$;

-- ---- alerts: one open alert per fingerprint ----------------------------------------------

select isnt(booking_guard_internal.raise_alert('phantom_booking', 'critical', 'call', '42', 'first', '{"n": 1}'), null,
            'raise_alert returns the new alert''s id');
create temp table first_alert as select * from booking_guard.alerts where entity_id = '42';
select results_eq($$select alert_type, severity, entity_type, entity_id, description, details, fingerprint, occurrences,
                           auto_corrected, detected_at = now(), last_seen_at = now(), acknowledged_at, resolved_at
                      from booking_guard.alerts where entity_id = '42'$$,
                  $$values ('phantom_booking', 'critical', 'call', '42', 'first', '{"n": 1}'::jsonb,
                            'phantom_booking:call:42', 1, false, true, true, null::timestamptz, null::timestamptz)$$,
                  'a new alert: fingerprint rule:entity_type:entity_id, one occurrence, open');
select is(pg_temp.alert_events('phantom_booking:call:42'), 1::bigint, 'a new alert is logged as an event');

select pg_temp.age_alert(id) from first_alert;
select is(booking_guard_internal.raise_alert('phantom_booking', 'critical', 'call', '42', 'second', '{"n": 2}', true),
          (select id from first_alert), 'a repeat returns the open alert''s id');
select results_eq($$select occurrences, last_seen_at = now(), detected_at = now() - interval '1 hour',
                           description, details, auto_corrected
                      from booking_guard.alerts where fingerprint = 'phantom_booking:call:42'$$,
                  $$values (2, true, true, 'second', '{"n": 2}'::jsonb, true)$$,
                  'a repeat bumps occurrences and last_seen_at, keeps detected_at, takes the latest description and details');
select booking_guard_internal.raise_alert('phantom_booking', 'critical', 'call', '42', 'third', '{}', false);
select results_eq($$select occurrences, auto_corrected from booking_guard.alerts where fingerprint = 'phantom_booking:call:42'$$,
                  $$values (3, true)$$, 'once auto-corrected, an alert stays marked auto_corrected');
select is((select count(*) from booking_guard.alerts where fingerprint = 'phantom_booking:call:42'), 1::bigint,
          'repeats add no row');
select is(pg_temp.alert_events('phantom_booking:call:42'), 1::bigint, 'repeats log no event');

select isnt(booking_guard_internal.raise_alert('phantom_booking', 'critical', 'call', '43', 'other call'), (select id from first_alert),
            'another entity is another alert');
select isnt(booking_guard_internal.raise_alert('missing_appointment', 'critical', 'call', '42', 'other rule'), (select id from first_alert),
            'another rule on the same entity is another alert');
select is(booking_guard_internal.raise_alert('reconcile_run', 'info', null, null, 'no entity'),
          booking_guard_internal.raise_alert('reconcile_run', 'info', null, null, 'no entity again'),
          'an alert without entity has its own fingerprint too');
select is((select fingerprint from booking_guard.alerts where alert_type = 'reconcile_run'), 'reconcile_run',
          'the fingerprint of an alert without entity is its type');
select throws_ok($$insert into booking_guard.alerts (alert_type, severity, description, fingerprint)
                   values ('phantom_booking', 'critical', 'twin', 'phantom_booking:call:42')$$,
                 '23505', null, 'the table itself refuses a second open alert for a fingerprint');

-- bad input: BG005, nothing written
create temp table alert_count as select count(*) as n from booking_guard.alerts;
select throws_ok($$select booking_guard_internal.raise_alert('x', 'fatal', 'call', '1', 'd')$$, 'BG005',
                 'invalid alert: type x, severity fatal', 'an unknown severity: BG005');
select throws_ok($$select booking_guard_internal.raise_alert('x', null, 'call', '1', 'd')$$, 'BG005', null, 'a null severity: BG005');
select throws_ok($$select booking_guard_internal.raise_alert(null, 'info', 'call', '1', 'd')$$, 'BG005', null, 'a null type: BG005');
select throws_ok($$select booking_guard_internal.raise_alert('x', 'info', 'call', '1', null)$$, 'BG005', null, 'a null description: BG005');
select is((select count(*) from booking_guard.alerts), (select n from alert_count), 'bad alerts wrote nothing');
select lives_ok($$select booking_guard_internal.raise_alert('nulls', 'warning', 'call', '7', 'null details', null)$$,
                'null details are accepted ...');
select is((select details from booking_guard.alerts where alert_type = 'nulls'), '{}'::jsonb, '... and stored as {}');

-- ---- acknowledge_alert ----------------------------------------------------------------------

select results_eq($$select acknowledged_by, acknowledged_at = now(), resolved_at
                      from booking_guard.acknowledge_alert((select id from first_alert), 'alice')$$,
                  $$values ('alice'::name, true, null::timestamptz)$$, 'acknowledge_alert records who and when');
select pg_temp.age_alert(id) from first_alert;
select results_eq($$select acknowledged_by, acknowledged_at = now() - interval '1 hour'
                      from booking_guard.acknowledge_alert((select id from first_alert), 'bob')$$,
                  $$values ('alice'::name, true)$$, 'a second acknowledgement keeps the first (who and when)');
select is((select acknowledged_by from booking_guard.acknowledge_alert(
                  booking_guard_internal.raise_alert('ack_default', 'info', 'call', '1', 'd'))),
          current_user, 'acknowledged_by defaults to the current user');
select throws_ok($$select booking_guard.acknowledge_alert(987654)$$, 'BG004', 'unknown alert 987654',
                 'acknowledging an unknown alert: BG004');
select throws_ok($$select booking_guard.acknowledge_alert(null)$$, 'BG004', 'unknown alert null',
                 'acknowledging alert null: BG004');

-- ---- resolve_alert ------------------------------------------------------------------------------

select results_eq($$select resolved_at = now(), occurrences from booking_guard.resolve_alert((select id from first_alert))$$,
                  $$values (true, 3)$$, 'resolve_alert closes the alert');
select pg_temp.age_alert(id) from first_alert;
select is((select resolved_at from booking_guard.resolve_alert((select id from first_alert))), now() - interval '1 hour',
          'resolving twice keeps the first resolution');
select isnt(booking_guard_internal.raise_alert('phantom_booking', 'critical', 'call', '42', 'again'), (select id from first_alert),
            'after a resolution, a repeat opens a new alert');
select results_eq($$select occurrences, resolved_at is null, acknowledged_at is null from booking_guard.alerts
                     where fingerprint = 'phantom_booking:call:42' order by id$$,
                  $$values (3, false, false), (1, true, true)$$,
                  'the resolved alert keeps its history; the new one starts at one occurrence, unacknowledged');
select is(pg_temp.alert_events('phantom_booking:call:42'), 2::bigint, 'the new alert is logged as an event');
select throws_ok($$select booking_guard.resolve_alert(987654)$$, 'BG004', 'unknown alert 987654',
                 'resolving an unknown alert: BG004');
select throws_ok($$select booking_guard.resolve_alert(null)$$, 'BG004', null, 'resolving alert null: BG004');

-- ---- review queue: priorities --------------------------------------------------------------------

select results_eq($$select reason, priority from booking_guard.review_priorities
                     where reason in ('appointment_validation_failed', 'calcom_booking_failed', 'customer_creation_failed',
                                      'service_not_found', 'something_else') order by priority$$,
                  $$values ('appointment_validation_failed', 1), ('calcom_booking_failed', 2),
                           ('customer_creation_failed', 3), ('service_not_found', 4)$$,
                  'review_priorities holds the default mapping');
create temp table queued as
select r.n, r.reason, booking_guard.queue_for_review(100 + r.n, r.reason) as id
  from unnest(array['service_not_found', 'appointment_validation_failed', 'something_else',
                    'customer_creation_failed', 'calcom_booking_failed']) with ordinality r(reason, n);
select results_eq($$select r.reason, q.priority, q.status, q.call_id
                      from queued r join booking_guard.review_queue q on q.id = r.id order by r.n$$,
                  $$values ('service_not_found', 4, 'pending', 101::bigint), ('appointment_validation_failed', 1, 'pending', 102),
                           ('something_else', 5, 'pending', 103), ('customer_creation_failed', 3, 'pending', 104),
                           ('calcom_booking_failed', 2, 'pending', 105)$$,
                  'queue_for_review: the default priorities, 5 for any other reason');

-- ---- one open item per call and reason ------------------------------------------------------------

select is(booking_guard.queue_for_review(102, 'appointment_validation_failed', '{"attempt": 2}'),
          (select id from booking_guard.review_queue where call_id = 102),
          'queueing a call again for the same reason returns its open item');
select is((select context from booking_guard.review_queue where call_id = 102), '{"attempt": 2}'::jsonb,
          'the new context is merged into the open item');
select booking_guard.queue_for_review(102, 'appointment_validation_failed', '{"attempt": 3, "by": "monitor"}');
select results_eq($$select count(*), min(context::text) from booking_guard.review_queue where call_id = 102$$,
                  $$values (1::bigint, '{"by": "monitor", "attempt": 3}')$$, 'still one item, context merged again');
select is((select count(*) from booking_guard.events where kind = 'review' and entity_id = '102'), 1::bigint,
          'only the new item was logged as an event');
select isnt(booking_guard.queue_for_review(102, 'calcom_booking_failed'),
            (select id from booking_guard.review_queue where call_id = 102 and reason = 'appointment_validation_failed'),
            'another reason for the same call is another item');
select is(booking_guard.queue_for_review(null, 'orphaned_appointment', '{"appointment_id": 9}'),
          booking_guard.queue_for_review(null, 'orphaned_appointment', '{"appointment_id": 10}'),
          'items without a call are one open item per reason');
select throws_ok($$select booking_guard.queue_for_review(1, null)$$, 'BG005', 'invalid review reason: null',
                 'a null reason: BG005');
select throws_ok($$select booking_guard.queue_for_review(1, 'x', '[1, 2]')$$, 'BG005', null, 'a context that is no object: BG005');
select throws_ok($$select booking_guard.queue_for_review(1, 'x', null)$$, 'BG005', null, 'a null context: BG005');
select is((select count(*) from booking_guard.review_queue where call_id = 1), 0::bigint, 'bad items wrote nothing');

-- ---- claim_review ---------------------------------------------------------------------------------

-- expected order: priority, then age, then id (one item made older than the others)
update booking_guard.review_queue set created_at = created_at - interval '1 minute' where call_id = 105;
create temp table expected_order as
select id, row_number() over (order by priority, created_at, id) as n
  from booking_guard.review_queue where status = 'pending';
select is((select count(*) from expected_order), 7::bigint, 'seven pending items');
create temp table claimed (n serial, id bigint, status text, claimed_by name, fresh boolean);
do $$
begin
    for i in 1..(select count(*) from expected_order) loop
        insert into claimed (id, status, claimed_by, fresh)
        select c.id, c.status, c.claimed_by, c.claimed_at = now() and c.updated_at = now()
          from booking_guard.claim_review('alice') c;
    end loop;
end
$$;
select results_eq($$select id from claimed order by n$$, $$select id from expected_order order by n$$,
                  'claim_review hands out the most urgent, then the oldest item first');
select is((select (select id from expected_order where n = 1) = q.id and q.priority = 1
             from booking_guard.review_queue q where q.call_id = 102 and q.reason = 'appointment_validation_failed'),
          true, 'the first claim is the priority 1 item');
select ok((select bool_and(status = 'in_review' and claimed_by = 'alice' and fresh) from claimed),
          'a claimed item is in review, by the reviewer, since now');
select is_empty($$select * from booking_guard.claim_review('bob')$$, 'nothing left to claim: no row');

-- an expired claim comes back
update booking_guard.review_queue set claimed_at = now() - interval '29 minutes' where call_id = 101;
select is_empty($$select * from booking_guard.claim_review('bob')$$, 'a claim younger than review_claim_timeout stays');
update booking_guard.review_queue set claimed_at = now() - interval '31 minutes' where call_id = 101;
select results_eq($$select call_id, status, claimed_by from booking_guard.claim_review('bob')$$,
                  $$values (101::bigint, 'in_review', 'bob'::name)$$,
                  'a claim older than review_claim_timeout (30 minutes) goes to the next reviewer');
select is_empty($$select * from booking_guard.claim_review('carol')$$, '... once');
select booking_guard.set_setting('review_claim_timeout', '5 minutes');
update booking_guard.review_queue set claimed_at = now() - interval '6 minutes' where call_id = 103;
select results_eq($$select call_id, claimed_by from booking_guard.claim_review('carol')$$,
                  $$values (103::bigint, 'carol'::name)$$, 'the timeout is the review_claim_timeout setting');

-- ---- resolve_review ---------------------------------------------------------------------------------

select results_eq($$select status, resolution, note, claimed_by, updated_at = now()
                      from booking_guard.resolve_review((select id from booking_guard.review_queue where call_id = 101),
                                                        'fixed', 'rebooked by phone')$$,
                  $$values ('resolved', 'fixed', 'rebooked by phone', 'bob'::name, true)$$,
                  'resolve_review: fixed, with its note, by the claimer');
select results_eq($$select resolution, note from booking_guard.resolve_review(
                        (select id from booking_guard.review_queue where call_id = 103), 'dismissed')$$,
                  $$values ('dismissed', null::text)$$, 'resolve_review: dismissed, without a note');
select results_eq($$select resolution, claimed_by from booking_guard.resolve_review(
                        booking_guard.queue_for_review(200, 'service_not_found'), 'false_positive', 'service exists')$$,
                  $$values ('false_positive', session_user::name)$$,
                  'resolve_review: false_positive; an unclaimed item is resolved by the session user');
select is((select count(*) from booking_guard.events where kind = 'review_resolved'), 3::bigint,
          'each resolution is logged as an event');
select is((select details ->> 'resolution' from booking_guard.events where kind = 'review_resolved' and entity_id = '200'),
          'false_positive', 'the event carries the resolution (the false positive rate KPI)');
select throws_ok($$select booking_guard.resolve_review((select id from booking_guard.review_queue where call_id = 101), 'fixed')$$,
                 'BG005', null, 'resolving a resolved item: BG005');
select throws_ok($$select booking_guard.resolve_review((select id from booking_guard.review_queue where call_id = 104), 'done')$$,
                 'BG005', 'invalid resolution "done"', 'an unknown resolution: BG005');
select throws_ok($$select booking_guard.resolve_review((select id from booking_guard.review_queue where call_id = 104), null)$$,
                 'BG005', 'invalid resolution "null"', 'a null resolution: BG005');
select throws_ok($$select booking_guard.resolve_review(987654, 'fixed')$$, 'BG004', 'unknown review item 987654',
                 'resolving an unknown item: BG004');
select is((select status from booking_guard.review_queue where call_id = 104), 'in_review', 'failed resolutions wrote nothing');
select isnt(booking_guard.queue_for_review(101, 'service_not_found'),
            (select id from booking_guard.review_queue where call_id = 101 and status = 'resolved'),
            'after a resolution, queueing the call for the same reason opens a new item');
select results_eq($$select status from booking_guard.review_queue where call_id = 101 order by id$$,
                  $$values ('resolved'), ('pending')$$, 'the resolved item stays as it was');

-- ---- events: append-only -------------------------------------------------------------------------

select cmp_ok(booking_guard_internal.log_event('test', 'some_rule', 'call', '1'), '>', 0::bigint, 'log_event returns the id');
select is((select details from booking_guard.events where kind = 'test'), '{}'::jsonb, 'details default to {}');
select throws_ok($$update booking_guard.events set kind = 'rewritten'$$, 'BG005', 'booking_guard.events is append-only',
                 'UPDATE of events: BG005');
select throws_ok($$delete from booking_guard.events$$, 'BG005', 'booking_guard.events is append-only',
                 'DELETE of events: BG005');
select isnt((select count(*) from booking_guard.events where kind <> 'rewritten'), 0::bigint, 'the events are all still there');

select * from finish();
rollback;
