-- The manual review queue (table booking_guard.review_queue): what booking_guard could not or
-- should not fix by itself.
--
-- One open item (pending or in review) per call and reason; reviewers claim items with FOR UPDATE
-- SKIP LOCKED so that several can work the queue without taking the same item, and a claim left
-- unresolved for review_claim_timeout goes back to the queue.

create trigger review_priorities_replace_seeded_row
    before insert on booking_guard.review_priorities
    for each row execute function booking_guard_internal.replace_seeded_row('reason');

-- An alert and the review item that answers it. Resolving the item resolves its open alerts;
-- resolving an alert resolves its item once no other alert of the item is open, unless the alert
-- was auto-corrected (the repair closed the alert, the person's work on the item remains: a rolled
-- back booking still needs the customer called back). This is the one place that resolves either
-- side: resolve_alert(), resolve_review() and run_monitor() come here, and nothing here calls them.
create function booking_guard_internal.resolve_together(alert_id bigint, review_id bigint, resolution text, note text)
returns void
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_variable
declare
    item       bigint := review_id;
    corrected  boolean;
    r          booking_guard.review_queue;
begin
    if alert_id is not null then
        update booking_guard.alerts a set resolved_at = now()
         where a.id = alert_id and a.resolved_at is null
        returning a.review_id, a.auto_corrected into item, corrected;
        if item is not null
           and (corrected or exists (select from booking_guard.alerts x where x.review_id = item and x.resolved_at is null)) then
            item := null;
        end if;
    end if;
    if item is null then
        return;
    end if;
    update booking_guard.review_queue q
       set status = 'resolved', resolution = resolve_together.resolution, note = left(resolve_together.note, 10000),
           updated_at = now(), claimed_by = coalesce(q.claimed_by, session_user)
     where q.id = item and q.status <> 'resolved'
    returning q.* into r;
    if found then
        perform booking_guard_internal.log_event('review_resolved', r.reason, 'call', r.call_id::text,
            jsonb_strip_nulls(jsonb_build_object('review_id', r.id, 'resolution', r.resolution, 'subject', r.subject,
                                                 'with_alert', alert_id)));
    end if;
    if review_id is not null then
        update booking_guard.alerts a set resolved_at = now()
         where a.review_id = item and a.resolved_at is null;
    end if;
end
$$;

comment on function booking_guard_internal.resolve_together(bigint, bigint, text, text) is
    'Resolves an alert (alert_id) or a review item (review_id) with what belongs to it: an item''s open alerts; an alert''s item once its last open alert is resolved, unless that alert was auto-corrected. The only function that resolves either.';

-- booking_guard's own findings reach the queue through here, full or not: a rollback is never lost.
-- A new item is logged (an event), announced with NOTIFY booking_guard_review and its id only, and,
-- when at least as urgent as review_notify_priority, put in the relay's outbox (review_notifications).
create function booking_guard_internal.queue_review(call_id bigint, reason text, context jsonb default '{}',
                                                    subject text default null, alert_id bigint default null)
returns bigint
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_column
declare
    v_id        bigint;
    v_inserted  boolean;
    v_priority  integer;
begin
    if queue_review.reason is null or queue_review.reason !~ '^[a-z][a-z0-9_]{0,62}$'
       or queue_review.context is null or jsonb_typeof(queue_review.context) <> 'object'
       or pg_column_size(queue_review.context) > 1048576
       or queue_review.subject !~ '^[a-z_]+:\S' or length(queue_review.subject) > 300 then
        raise exception 'invalid review item for call %', coalesce(queue_review.call_id::text, 'null')
            using errcode = 'BG005',
                  detail = format('reason: %s, subject: %s, context: %s (%s bytes)', coalesce(left(queue_review.reason, 100), 'null'),
                                  coalesce(left(queue_review.subject, 100), 'null'),
                                  coalesce(left(queue_review.context::text, 200), 'null'),
                                  coalesce(pg_column_size(queue_review.context), 0)),
                  hint = 'Give a reason (a lower-case identifier such as calcom_booking_failed), a jsonb object as context '
                         'and, for an item about something other than the call, a subject such as booking:cal-123.';
    end if;
    v_priority := coalesce((select p.priority from booking_guard.review_priorities p where p.reason = queue_review.reason), 5);
    insert into booking_guard.review_queue as q (call_id, reason, context, priority, subject)
    values (queue_review.call_id, queue_review.reason, queue_review.context, v_priority, queue_review.subject)
    on conflict (coalesce(call_id, -1), reason, coalesce(subject, '')) where status <> 'resolved' do update
       set context = q.context || excluded.context, updated_at = now()
    returning q.id, q.xmax = 0 into v_id, v_inserted;   -- xmax 0: a new row, not the conflict update
    if queue_review.alert_id is not null then
        -- not an alert_storm's: a storm stands for many entities, not this item's
        update booking_guard.alerts a set review_id = v_id
         where a.id = queue_review.alert_id and a.review_id is null and a.alert_type <> 'alert_storm';
    end if;
    if v_inserted then
        perform booking_guard_internal.log_event('review', queue_review.reason, 'call', queue_review.call_id::text,
            jsonb_strip_nulls(jsonb_build_object('review_id', v_id, 'subject', queue_review.subject,
                                                 'alert_id', queue_review.alert_id)));
        perform pg_notify('booking_guard_review', v_id::text);
        if v_priority <= (select s.integer_value from booking_guard.settings s where s.name = 'review_notify_priority') then
            insert into booking_guard.review_notifications (review_id) values (v_id);
        end if;
    end if;
    return v_id;
end
$$;

comment on function booking_guard_internal.queue_review(bigint, text, jsonb, text, bigint) is
    'Queues a call (or, with a subject, a booking, appointment or retry) for a person (booking_guard''s own findings; no cap); what is queued already keeps its one open item (context merged). alert_id links the alert the item answers. A new item sends NOTIFY booking_guard_review with its id and, if urgent, goes to the relay''s outbox.';

-- What an application queues: bounded, so that one role cannot flood the people reading the queue.
create function booking_guard.queue_for_review(call_id bigint, reason text, context jsonb default '{}')
returns bigint
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_column
declare
    v_max   bigint := (select s.integer_value from booking_guard.settings s where s.name = 'review_queue_max_open');
    v_open  bigint;
begin
    if pg_column_size(queue_for_review.context) > 65536 then
        raise exception 'review context too large: % bytes', pg_column_size(queue_for_review.context)
            using errcode = 'BG005',
                  detail = 'A review item''s context holds what a person needs to act: at most 64 kB.',
                  hint = 'Keep ids and a short summary in the context, not whole documents.';
    end if;
    if queue_for_review.reason is null or queue_for_review.reason !~ '^[a-z][a-z0-9_]{0,62}$' then
        raise exception 'invalid review reason: %', coalesce(quote_literal(left(queue_for_review.reason, 100)), 'null')
            using errcode = 'BG005',
                  detail = 'A reason is a lower-case identifier of at most 63 characters.',
                  hint = 'select reason, priority from booking_guard.review_priorities;';
    end if;
    if not exists (select from booking_guard.review_queue q
                    where coalesce(q.call_id, -1) = coalesce(queue_for_review.call_id, -1)
                      and q.reason = queue_for_review.reason and q.subject is null and q.status <> 'resolved') then
        v_open := (select count(*) from (select from booking_guard.review_queue q where q.status <> 'resolved' limit v_max) o);
        if v_open >= v_max then
            raise exception 'the review queue is full: % open items', v_open
                using errcode = 'BG005',
                      detail = format('review_queue_max_open is %s; booking_guard''s own findings are still queued.', v_max),
                      hint = 'Work the queue (booking_guard.claim_review()), or raise the limit: '
                             'select booking_guard.set_setting(''review_queue_max_open'', ''20000'');';
        end if;
    end if;
    return booking_guard_internal.queue_review(queue_for_review.call_id, queue_for_review.reason, queue_for_review.context);
end
$$;

comment on function booking_guard.queue_for_review(bigint, text, jsonb) is
    'Queues a call for a person; a call already queued for the same reason keeps its one open item (context merged). At most review_queue_max_open open items; the context at most 64 kB (BG005).';

create function booking_guard.claim_review(reviewer name default current_user)
returns setof booking_guard.review_queue
language sql
security definer
set search_path = pg_catalog, pg_temp
as $$
    update booking_guard.review_queue q
       set status = 'in_review', claimed_by = coalesce(reviewer, session_user), claimed_at = now(), updated_at = now()
     where q.id = (select c.id
                     from booking_guard.review_queue c
                    where c.status = 'pending'
                       or (c.status = 'in_review'
                           and c.claimed_at < now() - (select s.interval_value from booking_guard.settings s
                                                        where s.name = 'review_claim_timeout'))
                    order by c.priority, c.created_at, c.id
                    limit 1
                      for update skip locked)
    returning q.*
$$;

comment on function booking_guard.claim_review(name) is
    'Gives the most urgent unclaimed review item to a reviewer (SKIP LOCKED: concurrent reviewers never get the same one); no row when the queue is empty.';

create function booking_guard.resolve_review(review_id bigint, resolution text, note text default null)
returns booking_guard.review_queue
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_column
declare
    r  booking_guard.review_queue;
begin
    if length(resolve_review.note) > 10000 then
        raise exception 'review note too long: % characters', length(resolve_review.note)
            using errcode = 'BG005',
                  detail = 'A note says what was done: at most 10,000 characters.',
                  hint = 'Keep the note short; link to a ticket for the rest.';
    end if;
    if resolve_review.resolution is null or resolve_review.resolution not in ('fixed', 'dismissed', 'false_positive') then
        raise exception 'invalid resolution "%"', coalesce(resolve_review.resolution, 'null')
            using errcode = 'BG005',
                  detail = 'A review is resolved as fixed, dismissed or false_positive.',
                  hint = 'select booking_guard.resolve_review(42, ''fixed'', ''rebooked by phone'');';
    end if;
    select * into r from booking_guard.review_queue where id = review_id for update;
    if not found then
        raise exception 'unknown review item %', coalesce(review_id::text, 'null')
            using errcode = 'BG004',
                  detail = format('No review item has id %s.', coalesce(review_id::text, 'null')),
                  hint = 'select id, call_id, reason from booking_guard.review_queue where status <> ''resolved'';';
    end if;
    if r.status = 'resolved' then
        raise exception 'review item % is already resolved', review_id
            using errcode = 'BG005',
                  detail = format('Resolved as %s at %s.', r.resolution, r.updated_at),
                  hint = 'A resolved item stays as it is; queue the call again if it needs more work.';
    end if;
    perform booking_guard_internal.resolve_together(null, review_id, resolve_review.resolution, resolve_review.note);
    select * into r from booking_guard.review_queue where id = review_id;
    return r;
end
$$;

comment on function booking_guard.resolve_review(bigint, text, text) is
    'Closes a review item as fixed, dismissed or false_positive (the false positive rate KPI reads these), and the alerts it answers.';
