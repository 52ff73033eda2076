create function booking_guard_internal.relay_check(relay text, lease interval)
returns void
language plpgsql
immutable
set search_path = pg_catalog, pg_temp
as $$
begin
    if relay is null or relay !~ '\S' or length(relay) > 200 or lease is null or lease <= interval '0' or lease > interval '1 hour' then
        raise exception 'invalid relay claim: relay %, lease %', coalesce(quote_literal(relay), 'null'),
                        coalesce(lease::text, 'null')
            using errcode = 'BG005',
                  detail = 'A claim needs the name of the relay and a lease between 0 and 1 hour.',
                  hint = 'select * from booking_guard.claim_alerts(''relay-1'', 10, ''30 seconds'');';
    end if;
end
$$;

comment on function booking_guard_internal.relay_check(text, interval) is
    'Internal: BG005 unless relay is a name and lease is in (0, 1 hour].';

create function booking_guard.claim_alerts(relay text, max_alerts integer default 10, lease interval default '30 seconds')
returns setof booking_guard.alerts
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    perform booking_guard_internal.relay_check(relay, lease);
    if max_alerts is null or max_alerts not between 1 and 1000 then
        raise exception 'invalid max_alerts %', coalesce(max_alerts::text, 'null')
            using errcode = 'BG005',
                  detail = 'claim_alerts() claims between 1 and 1000 alerts at a time.',
                  hint = 'select * from booking_guard.claim_alerts(''relay-1'', 10);';
    end if;
    return query
    with candidates as (
        select a.id
          from booking_guard.alerts a
         where a.delivered_at is null
           and not exists (select from booking_guard.alert_claims c
                            where c.alert_id = a.id
                              and (c.claimed_until > now() or c.next_attempt_at > now()))
         order by a.id
         limit max_alerts
           for update of a skip locked
    ),
    claimed as (
        insert into booking_guard.alert_claims as c (alert_id, claimed_by, claimed_role, claimed_until, attempts)
        select x.id, relay, session_user, clock_timestamp() + lease, 1 from candidates x
        on conflict (alert_id) do update
           set claimed_by = excluded.claimed_by, claimed_role = excluded.claimed_role, claimed_until = excluded.claimed_until,
               attempts = c.attempts + 1
         -- checked against the latest committed claim, not this statement's snapshot
         where (c.claimed_until is null or c.claimed_until <= now()) and c.next_attempt_at <= now()
        returning c.alert_id
    )
    select a.* from booking_guard.alerts a where a.id in (select k.alert_id from claimed k) order by a.id;
end
$$;

comment on function booking_guard.claim_alerts(text, integer, interval) is
    'Claims up to max_alerts undelivered alerts for a relay until now() + lease (SKIP LOCKED: concurrent relays get different alerts); an expired or released claim can be claimed again.';

create function booking_guard.alerts_delivered(relay text, alert_ids bigint[])
returns integer
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    n  integer;
begin
    perform booking_guard_internal.relay_check(relay, interval '1 second');
    -- only what this relay (name and role) claimed: a relay cannot silence what it never sent
    with mine as (
        delete from booking_guard.alert_claims c
         where c.alert_id = any (alert_ids) and c.claimed_by = relay and c.claimed_role = session_user
        returning c.alert_id
    )
    update booking_guard.alerts a set delivered_at = now()
      from mine
     where a.id = mine.alert_id and a.delivered_at is null;
    get diagnostics n = row_count;
    return n;
end
$$;

comment on function booking_guard.alerts_delivered(text, bigint[]) is
    'Marks alerts delivered (alerts.delivered_at) and ends their claims, for the alerts this relay (name and session role) holds a claim on; returns how many it marked.';

create function booking_guard.alerts_failed(relay text, alert_ids bigint[], error text)
returns timestamptz
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_next  timestamptz;
begin
    perform booking_guard_internal.relay_check(relay, interval '1 second');
    update booking_guard.alert_claims c
       set claimed_by = null, claimed_until = null, last_error = left(error, 2000),
           next_attempt_at = clock_timestamp() + booking_guard.backoff_delay(greatest(c.attempts, 1), max_delay => '5 minutes')
     where c.alert_id = any (alert_ids) and c.claimed_by = relay and c.claimed_role = session_user;
    select max(c.next_attempt_at) into v_next from booking_guard.alert_claims c where c.alert_id = any (alert_ids);
    return v_next;
end
$$;

comment on function booking_guard.alerts_failed(text, bigint[], text) is
    'Releases a relay''s claims after a failed send: the next attempt is due after backoff_delay(attempts) (at most 5 minutes); returns when.';

-- The e-mail digest of a period lists the alerts detected and the urgent review items queued in it.
-- Both are dated by their transaction's start (now()), so a period is claimed only once no
-- transaction of this database that began before its end is still open: by then everything it
-- lists has committed, and each alert and item is in exactly one digest. A period's digest that
-- failed is tried again (the oldest unsent first); a relay that was down starts the next period
-- where the last one ended, at most 7 days back.
create function booking_guard.claim_digest(relay text, every interval default '4 hours', lease interval default '1 minute')
returns table (period_start timestamptz, period_end timestamptz)
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_column
declare
    v_end     timestamptz;
    v_oldest  timestamptz;
begin
    perform booking_guard_internal.relay_check(relay, lease);
    if every is null or every < interval '1 second' or every > interval '7 days' then
        raise exception 'invalid digest period %', coalesce(every::text, 'null')
            using errcode = 'BG005',
                  detail = 'A digest covers between 1 second and 7 days.',
                  hint = 'select * from booking_guard.claim_digest(''relay-1'', ''4 hours'');';
    end if;
    -- the last period that ended a moment ago
    v_end := date_bin(every, now() - least(every * 0.1, interval '1 minute'), timestamptz '2000-01-01 00:00+00');
    insert into booking_guard.alert_digests (period_end, period_start)
    select v_end, greatest(coalesce(max(d.period_end), v_end - every), v_end - interval '7 days')
      from booking_guard.alert_digests d
     where d.period_end < v_end
    on conflict (period_end) do nothing;
    -- when the oldest transaction still open here began (a prepared one counts as open from any time;
    -- autovacuum writes no alert)
    v_oldest := case when exists (select from pg_catalog.pg_prepared_xacts x where x.database = current_database())
                     then '-infinity'
                     else (select min(a.xact_start) from pg_catalog.pg_stat_activity a
                            where a.datname = current_database() and a.pid <> pg_backend_pid()
                              and a.backend_type <> 'autovacuum worker') end;
    return query
    update booking_guard.alert_digests d
       set claimed_by = relay, claimed_role = session_user, claimed_until = clock_timestamp() + lease, attempts = d.attempts + 1
     where d.period_end = (select x.period_end from booking_guard.alert_digests x
                            where x.sent_at is null and x.period_end <= v_end
                              and (x.claimed_until is null or x.claimed_until <= now()) and x.next_attempt_at <= now()
                              and (v_oldest is null or v_oldest >= x.period_end)
                            order by x.period_end
                            limit 1
                              for update skip locked)
    returning d.period_start, d.period_end;
end
$$;

comment on function booking_guard.claim_digest(text, interval, interval) is
    'Claims the oldest e-mail digest not sent yet (periods of length every, aligned to midnight UTC, the last one just ended) whose alerts and review items have all committed (no transaction that began before its end is open); no row otherwise.';

create function booking_guard.digest_sent(relay text, period_end timestamptz, alerts integer, review_items integer default 0)
returns boolean
language sql
security definer
set search_path = pg_catalog, pg_temp
as $$
    with mine as (
        update booking_guard.alert_digests d
           set sent_at = now(), alerts = digest_sent.alerts, review_items = digest_sent.review_items, claimed_until = null
         where d.period_end = digest_sent.period_end and d.sent_at is null
           and d.claimed_by = digest_sent.relay and d.claimed_role = session_user
        returning 1
    )
    select exists (select from mine)
$$;

comment on function booking_guard.digest_sent(text, timestamptz, integer, integer) is
    'Marks a period''s digest sent (alerts and review_items = how many it listed; 0 when there was nothing to send), if this relay (name and session role) claimed it; true when it did.';

create function booking_guard.digest_failed(relay text, period_end timestamptz, error text)
returns timestamptz
language sql
security definer
set search_path = pg_catalog, pg_temp
as $$
    update booking_guard.alert_digests d
       set claimed_by = null, claimed_until = null, last_error = left(digest_failed.error, 2000),
           next_attempt_at = clock_timestamp() + booking_guard.backoff_delay(greatest(d.attempts, 1), max_delay => '5 minutes')
     where d.period_end = digest_failed.period_end and d.claimed_by = digest_failed.relay
       and d.claimed_role = session_user
    returning d.next_attempt_at
$$;

comment on function booking_guard.digest_failed(text, timestamptz, text) is
    'Releases a failed digest: the next attempt is due after backoff_delay(attempts) (at most 5 minutes); returns when.';

-- Urgent review items (priority up to review_notify_priority) to the webhook: the outbox
-- review_notifications, claimed with SKIP LOCKED for a lease like alerts (claim_alerts()), the row
-- deleted and review_queue.delivered_at set once sent, the next attempt after a backoff when not.
create function booking_guard.claim_reviews(relay text, max_items integer default 10, lease interval default '30 seconds')
returns setof booking_guard.review_queue
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    perform booking_guard_internal.relay_check(relay, lease);
    if max_items is null or max_items not between 1 and 1000 then
        raise exception 'invalid max_items %', coalesce(max_items::text, 'null')
            using errcode = 'BG005',
                  detail = 'claim_reviews() claims between 1 and 1000 review items at a time.',
                  hint = 'select * from booking_guard.claim_reviews(''relay-1'', 10);';
    end if;
    return query
    with claimed as (
        update booking_guard.review_notifications n
           set claimed_by = relay, claimed_role = session_user, claimed_until = clock_timestamp() + lease,
               attempts = n.attempts + 1
         where n.review_id in (select x.review_id from booking_guard.review_notifications x
                                where (x.claimed_until is null or x.claimed_until <= now()) and x.next_attempt_at <= now()
                                order by x.review_id
                                limit max_items
                                  for update skip locked)
        returning n.review_id
    )
    select q.* from booking_guard.review_queue q where q.id in (select c.review_id from claimed c) order by q.id;
end
$$;

comment on function booking_guard.claim_reviews(text, integer, interval) is
    'Claims up to max_items urgent review items not sent yet for a relay until now() + lease (SKIP LOCKED: concurrent relays get different items); an expired or released claim can be claimed again.';

create function booking_guard.reviews_delivered(relay text, review_ids bigint[])
returns integer
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    n  integer;
begin
    perform booking_guard_internal.relay_check(relay, interval '1 second');
    -- only what this relay (name and role) claimed
    with mine as (
        delete from booking_guard.review_notifications n
         where n.review_id = any (review_ids) and n.claimed_by = relay and n.claimed_role = session_user
        returning n.review_id
    )
    update booking_guard.review_queue q set delivered_at = now()
      from mine
     where q.id = mine.review_id;
    get diagnostics n = row_count;
    return n;
end
$$;

comment on function booking_guard.reviews_delivered(text, bigint[]) is
    'Marks urgent review items sent (review_queue.delivered_at) and ends their claims, for the items this relay (name and session role) holds a claim on; returns how many it marked.';

create function booking_guard.reviews_failed(relay text, review_ids bigint[], error text)
returns timestamptz
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_next  timestamptz;
begin
    perform booking_guard_internal.relay_check(relay, interval '1 second');
    update booking_guard.review_notifications n
       set claimed_by = null, claimed_until = null, last_error = left(error, 2000),
           next_attempt_at = clock_timestamp() + booking_guard.backoff_delay(greatest(n.attempts, 1), max_delay => '5 minutes')
     where n.review_id = any (review_ids) and n.claimed_by = relay and n.claimed_role = session_user;
    select max(n.next_attempt_at) into v_next from booking_guard.review_notifications n where n.review_id = any (review_ids);
    return v_next;
end
$$;

comment on function booking_guard.reviews_failed(text, bigint[], text) is
    'Releases a relay''s claims on review items after a failed send: the next attempt is due after backoff_delay(attempts) (at most 5 minutes); returns when.';
