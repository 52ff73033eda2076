-- The manual review queue: what booking_guard could not or should not fix by itself.
--
-- One open item (pending or in review) per call and reason; reviewers claim items with
-- FOR UPDATE SKIP LOCKED so that several can work the queue without taking the same item,
-- and a claim left unresolved for review_claim_timeout goes back to the queue.

create table booking_guard.review_priorities (
    reason    text primary key,
    priority  integer not null check (priority between 1 and 100)
);

comment on table booking_guard.review_priorities is
    'Priority of a review reason (1 = most urgent); reasons not listed get 5, as in the seed.';

create trigger review_priorities_replace_seeded_row
    before insert on booking_guard.review_priorities
    for each row execute function booking_guard.replace_seeded_row('reason');

insert into booking_guard.review_priorities (reason, priority) values
    ('appointment_validation_failed', 1),
    ('calcom_booking_failed', 2),
    ('customer_creation_failed', 3),
    ('service_not_found', 4);

select pg_catalog.pg_extension_config_dump('booking_guard.review_priorities', '');

insert into booking_guard.settings (name, kind, interval_value, min_value, max_value, description) values
    ('review_claim_timeout', 'interval', '30 minutes', 60, 86400,
     'A review item claimed this long ago and not resolved goes back to the queue.');

create table booking_guard.review_queue (
    id          bigint generated always as identity primary key,
    call_id     bigint,
    reason      text not null,
    context     jsonb not null default '{}',
    priority    integer not null,
    status      text not null default 'pending' check (status in ('pending', 'in_review', 'resolved')),
    claimed_by  name,
    claimed_at  timestamptz,
    resolution  text check (resolution in ('fixed', 'dismissed', 'false_positive')),
    note        text,
    created_at  timestamptz not null default now(),
    updated_at  timestamptz not null default now(),
    check ((status = 'resolved') = (resolution is not null))
);

create unique index review_queue_one_open_per_call_reason
    on booking_guard.review_queue (coalesce(call_id, -1), reason) where status <> 'resolved';
create index review_queue_open_idx on booking_guard.review_queue (priority, created_at) where status <> 'resolved';

comment on table booking_guard.review_queue is
    'Calls waiting for a person (the seed''s manual_review_queue): one open item per call and reason.';

-- History, not configuration, but it must survive pg_dump / pg_restore like the rest.
select pg_catalog.pg_extension_config_dump('booking_guard.review_queue', '');
select pg_catalog.pg_extension_config_dump('booking_guard.review_queue_id_seq', '');

create function booking_guard.queue_for_review(call_id bigint, reason text, context jsonb default '{}')
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
    if queue_for_review.reason is null or queue_for_review.context is null
       or jsonb_typeof(queue_for_review.context) <> 'object' then
        raise exception 'invalid review item for call %', coalesce(queue_for_review.call_id::text, 'null')
            using errcode = 'BG005',
                  detail = format('reason: %s, context: %s', coalesce(queue_for_review.reason, 'null'),
                                  coalesce(queue_for_review.context::text, 'null')),
                  hint = 'Give a reason and a jsonb object as context.';
    end if;
    insert into booking_guard.review_queue as q (call_id, reason, context, priority)
    values (queue_for_review.call_id, queue_for_review.reason, queue_for_review.context,
            coalesce((select p.priority from booking_guard.review_priorities p where p.reason = queue_for_review.reason), 5))
    on conflict (coalesce(call_id, -1), reason) where status <> 'resolved' do update
       set context = q.context || excluded.context, updated_at = now()
    returning q.id, q.xmax = 0 into v_id, v_inserted;   -- xmax 0: a new row, not the conflict update
    if v_inserted then
        perform booking_guard.log_event('review', queue_for_review.reason, 'call', queue_for_review.call_id::text,
                                        jsonb_build_object('review_id', v_id));
    end if;
    return v_id;
end
$$;

comment on function booking_guard.queue_for_review(bigint, text, jsonb) is
    'Queues a call for a person; a call already queued for the same reason keeps its one open item (context merged).';

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
    perform booking_guard.log_event('review_resolved', r.reason, 'call', r.call_id::text,
                                    jsonb_build_object('review_id', r.id, 'resolution', r.resolution));
    return r;
end
$$;

comment on function booking_guard.resolve_review(bigint, text, text) is
    'Closes a review item as fixed, dismissed or false_positive (the false positive rate KPI reads these).';

grant select on booking_guard.review_queue, booking_guard.review_priorities to booking_guard_monitor;
grant execute on function booking_guard.queue_for_review(bigint, text, jsonb) to booking_guard_app, booking_guard_admin;
grant execute on function booking_guard.claim_review(name), booking_guard.resolve_review(bigint, text, text)
   to booking_guard_admin;
grant insert, update, delete on booking_guard.review_priorities to booking_guard_admin;
