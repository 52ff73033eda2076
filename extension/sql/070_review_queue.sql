-- The manual review queue (table booking_guard.review_queue): what booking_guard could not or
-- should not fix by itself.
--
-- One open item (pending or in review) per call and reason; reviewers claim items with FOR UPDATE
-- SKIP LOCKED so that several can work the queue without taking the same item, and a claim left
-- unresolved for review_claim_timeout goes back to the queue.

create trigger review_priorities_replace_seeded_row
    before insert on booking_guard.review_priorities
    for each row execute function booking_guard_internal.replace_seeded_row('reason');

-- booking_guard's own findings reach the queue through here, full or not: a rollback is never lost.
create function booking_guard_internal.queue_review(call_id bigint, reason text, context jsonb default '{}')
returns bigint
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_column
declare
    v_id        bigint;
    v_inserted  boolean;
begin
    if queue_review.reason is null or queue_review.reason !~ '^[a-z][a-z0-9_]{0,62}$'
       or queue_review.context is null or jsonb_typeof(queue_review.context) <> 'object'
       or pg_column_size(queue_review.context) > 1048576 then
        raise exception 'invalid review item for call %', coalesce(queue_review.call_id::text, 'null')
            using errcode = 'BG005',
                  detail = format('reason: %s, context: %s (%s bytes)', coalesce(left(queue_review.reason, 100), 'null'),
                                  coalesce(left(queue_review.context::text, 200), 'null'),
                                  coalesce(pg_column_size(queue_review.context), 0)),
                  hint = 'Give a reason (a lower-case identifier such as calcom_booking_failed) and a jsonb object as context.';
    end if;
    insert into booking_guard.review_queue as q (call_id, reason, context, priority)
    values (queue_review.call_id, queue_review.reason, queue_review.context,
            coalesce((select p.priority from booking_guard.review_priorities p where p.reason = queue_review.reason), 5))
    on conflict (coalesce(call_id, -1), reason) where status <> 'resolved' do update
       set context = q.context || excluded.context, updated_at = now()
    returning q.id, q.xmax = 0 into v_id, v_inserted;   -- xmax 0: a new row, not the conflict update
    if v_inserted then
        perform booking_guard_internal.log_event('review', queue_review.reason, 'call', queue_review.call_id::text,
                                                 jsonb_build_object('review_id', v_id));
    end if;
    return v_id;
end
$$;

comment on function booking_guard_internal.queue_review(bigint, text, jsonb) is
    'Queues a call for a person (booking_guard''s own findings; no cap); a call already queued for the same reason keeps its one open item (context merged).';

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
                      and q.reason = queue_for_review.reason and q.status <> 'resolved') then
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
    update booking_guard.review_queue
       set status = 'resolved', resolution = resolve_review.resolution, note = resolve_review.note, updated_at = now(),
           claimed_by = coalesce(claimed_by, session_user)
     where id = review_id
    returning * into r;
    perform booking_guard_internal.log_event('review_resolved', r.reason, 'call', r.call_id::text,
                                    jsonb_build_object('review_id', r.id, 'resolution', r.resolution));
    return r;
end
$$;

comment on function booking_guard.resolve_review(bigint, text, text) is
    'Closes a review item as fixed, dismissed or false_positive (the false positive rate KPI reads these).';
