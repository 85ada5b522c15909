-- Events out (issue 15), the event types without a rule: grant.expired (a write settles an expired
-- grant with credits left; a renewal or expire_subscription_credits ends subscription grants),
-- grant.voided (void_grant, clawback), hold.expired (a write settles an expired hold),
-- overdraft.entered (debt from 0 to > 0), subscription.changed (plan, status or period changed;
-- not for a replay, a stale event or no change), rate_limit.exceeded (once per user and hourly
-- bucket, at the first refused call). Time rules run across separate statements with explicit
-- short expiries that pg_sleep passes. Users 00000000-0000-0000-0000-0000001502xx.
-- Helpers live in schema tests, not pg_temp: on a Citus cluster a query that calls one may run on a worker.
CREATE SCHEMA tests;
GRANT USAGE ON SCHEMA tests TO PUBLIC;
SET TimeZone = 'UTC';
SET DateStyle = 'ISO, YMD';
-- single_node: false on a Citus cluster, where the sections marked 'single node only' are skipped
SELECT NOT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'citus') AS single_node \gset
CREATE FUNCTION tests.err(p_sql text) RETURNS text LANGUAGE plpgsql AS $f$
DECLARE st text; msg text;
BEGIN
    EXECUTE p_sql;
    RETURN 'no error';
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT;
    RETURN st || ': ' || msg;
END
$f$;
-- Grants and holds by label: keep(label, id) remembers an id; l(id) is its label ('-' for NULL).
CREATE TEMP TABLE lbl (label text PRIMARY KEY, id uuid NOT NULL UNIQUE);
CREATE FUNCTION tests.keep(p_label text, p_id text) RETURNS text LANGUAGE sql AS $f$
    INSERT INTO pg_temp.lbl VALUES (p_label, p_id::uuid) RETURNING label
$f$;
CREATE FUNCTION tests.l(p_id text) RETURNS text LANGUAGE sql AS $f$
    SELECT CASE WHEN p_id IS NULL THEN '-' ELSE COALESCE((SELECT label FROM pg_temp.lbl WHERE id = p_id::uuid), '?') END
$f$;
-- new_events(user): the user's events since the last call for that user, in id order: the
-- grant or hold by label, the payload without user_id, grant_id, hold_id (shown as labels) and
-- without clock times (checked apart where they matter).
CREATE TEMP TABLE seen (user_id uuid PRIMARY KEY, last_id bigint NOT NULL);
CREATE TEMP TABLE last_batch (n int, type text, payload jsonb);
CREATE FUNCTION tests.new_events(p_user uuid) RETURNS TABLE (type text, ref text, payload jsonb) LANGUAGE plpgsql AS $f$
DECLARE v_last bigint;
BEGIN
    SELECT s.last_id INTO v_last FROM pg_temp.seen AS s WHERE s.user_id = p_user;
    DELETE FROM pg_temp.last_batch;
    INSERT INTO pg_temp.last_batch
    SELECT row_number() OVER (ORDER BY e.id), e.type, e.payload FROM billing.events AS e
     WHERE e.user_id = p_user AND e.id > COALESCE(v_last, 0);
    INSERT INTO pg_temp.seen SELECT p_user, COALESCE(max(e.id), 0) FROM billing.events AS e WHERE e.user_id = p_user
    ON CONFLICT (user_id) DO UPDATE SET last_id = EXCLUDED.last_id;
    RETURN QUERY SELECT b.type, tests.l(COALESCE(b.payload ->> 'grant_id', b.payload ->> 'hold_id')),
                        b.payload - 'user_id' - 'grant_id' - 'hold_id' - 'expires_at' - 'bucket_start' - 'reset_at'
                   FROM pg_temp.last_batch AS b ORDER BY b.n;
END
$f$;
-- sleep_past(t): sleeps until the clock is a little past t
CREATE FUNCTION tests.sleep_past(p_t timestamptz) RETURNS boolean LANGUAGE sql AS $f$
    SELECT pg_sleep(greatest(0, extract(epoch FROM p_t - clock_timestamp())::float8) + 0.2);
    SELECT clock_timestamp() > p_t
$f$;

-- ===== grant.expired: one per grant a write settles with credits left =====
-- user 201: g_exp (10, priority 5) and g_spent (4, priority 1) expire in 1 second; g_last never
SELECT clock_timestamp() + interval '1 second' AS end_at \gset
SELECT tests.keep('g_exp', billing.grant_credits('00000000-0000-0000-0000-000000150201', 10, 'promotional', 5, p_expires_at => :'end_at') ->> 'grant_id');
SELECT tests.keep('g_spent', billing.grant_credits('00000000-0000-0000-0000-000000150201', 4, 'promotional', 1, p_expires_at => :'end_at') ->> 'grant_id');
SELECT tests.keep('g_last', billing.grant_credits('00000000-0000-0000-0000-000000150201', 20, 'purchased') ->> 'grant_id');
-- g_spent is spent before its end: nothing left to expire
SELECT billing.consume_credits('00000000-0000-0000-0000-000000150201', 4) ->> 'total_balance' AS total;
SELECT * FROM tests.new_events('00000000-0000-0000-0000-000000150201');
SELECT tests.sleep_past(:'end_at') AS ended;
-- a read settles nothing, writes no event
SELECT total_balance, available FROM billing.get_user_credits('00000000-0000-0000-0000-000000150201');
SELECT * FROM tests.new_events('00000000-0000-0000-0000-000000150201');
-- the next write settles g_exp (10 left): one grant.expired, none for g_spent
SELECT billing.consume_credits('00000000-0000-0000-0000-000000150201', 1) ->> 'total_balance' AS total;
SELECT * FROM tests.new_events('00000000-0000-0000-0000-000000150201');
SELECT (payload ->> 'expires_at')::timestamptz = :'end_at' AS expires_at_as_granted
  FROM billing.events WHERE user_id = '00000000-0000-0000-0000-000000150201' AND type = 'grant.expired';
-- settled once: the next write writes no second one
SELECT billing.consume_credits('00000000-0000-0000-0000-000000150201', 1) ->> 'total_balance' AS total;
SELECT * FROM tests.new_events('00000000-0000-0000-0000-000000150201');
-- a grant as the settling write, two expired grants: one event each
SELECT clock_timestamp() + interval '1 second' AS end_at \gset
SELECT tests.keep('g_a', billing.grant_credits('00000000-0000-0000-0000-000000150202', 3, 'promotional', p_expires_at => :'end_at') ->> 'grant_id');
SELECT tests.keep('g_b', billing.grant_credits('00000000-0000-0000-0000-000000150202', 5, 'purchased', p_expires_at => :'end_at', p_scope => ARRAY['image']) ->> 'grant_id');
SELECT tests.sleep_past(:'end_at') AS ended;
SELECT tests.keep('g_c', billing.grant_credits('00000000-0000-0000-0000-000000150202', 1, 'purchased') ->> 'grant_id');
SELECT type, ref, payload ->> 'category' AS category, payload ->> 'pool' AS pool, payload ->> 'expired_amount' AS expired_amount
  FROM tests.new_events('00000000-0000-0000-0000-000000150202') ORDER BY ref;
-- subscription grants a renewal ends: grant.expired with what was left
SELECT billing.renew_subscription_credits('00000000-0000-0000-0000-000000150203', 8, now() + interval '30 days') ->> 'subscription_credits_balance' AS renewed;
-- (ids read first: a query on a billing table that calls a label helper would run on a Citus worker)
SELECT id AS g_sub1 FROM billing.credit_grants WHERE user_id = '00000000-0000-0000-0000-000000150203' AND category = 'subscription' \gset
SELECT tests.keep('g_sub1', :'g_sub1');
SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000150203', 3) ->> 'total_balance' AS total;
SELECT * FROM tests.new_events('00000000-0000-0000-0000-000000150203');
SELECT billing.renew_subscription_credits('00000000-0000-0000-0000-000000150203', 9, now() + interval '60 days') ->> 'subscription_credits_balance' AS renewed;
SELECT id AS g_sub2 FROM billing.credit_grants WHERE user_id = '00000000-0000-0000-0000-000000150203' AND category = 'subscription' AND amount = 9 \gset
SELECT tests.keep('g_sub2', :'g_sub2');
SELECT * FROM tests.new_events('00000000-0000-0000-0000-000000150203');
-- expire_subscription_credits ends the new one (9 left); a second call finds nothing: no event
SELECT billing.expire_subscription_credits('00000000-0000-0000-0000-000000150203') ->> 'expired_amount' AS expired;
SELECT * FROM tests.new_events('00000000-0000-0000-0000-000000150203');
SELECT billing.expire_subscription_credits('00000000-0000-0000-0000-000000150203') ->> 'expired_amount' AS expired_again;
SELECT * FROM tests.new_events('00000000-0000-0000-0000-000000150203');
-- a renewal that finds nothing left writes no grant.expired
SELECT billing.renew_subscription_credits('00000000-0000-0000-0000-000000150203', 2, now() + interval '90 days') ->> 'subscription_credits_balance' AS renewed;
SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000150203', 2) ->> 'total_balance' AS total;
SELECT billing.renew_subscription_credits('00000000-0000-0000-0000-000000150203', 2, now() + interval '120 days') ->> 'subscription_credits_balance' AS renewed;
SELECT * FROM tests.new_events('00000000-0000-0000-0000-000000150203');

-- ===== grant.voided: void_grant and clawback =====
SELECT tests.keep('v_promo', billing.grant_credits('00000000-0000-0000-0000-000000150204', 30, 'promotional') ->> 'grant_id');
SELECT billing.consume_credits('00000000-0000-0000-0000-000000150204', 12) ->> 'total_balance' AS total;
SELECT billing.void_grant((SELECT id FROM lbl WHERE label = 'v_promo'), 'chargeback') ->> 'voided_amount' AS voided;
SELECT * FROM tests.new_events('00000000-0000-0000-0000-000000150204');
-- voiding again: already voided, no second event
SELECT billing.void_grant((SELECT id FROM lbl WHERE label = 'v_promo'), 'again') ->> 'already_voided' AS already_voided;
SELECT * FROM tests.new_events('00000000-0000-0000-0000-000000150204');
-- a clawback of a purchase voids (part of) its grant
SELECT billing.add_purchased_credits('00000000-0000-0000-0000-000000150204', 50) ->> 'transaction_id' AS purchase_tx \gset
SELECT id AS v_purchase FROM billing.credit_grants WHERE user_id = '00000000-0000-0000-0000-000000150204' AND category = 'purchased' \gset
SELECT tests.keep('v_purchase', :'v_purchase');
SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000150204', 20) ->> 'total_balance' AS total;
SELECT billing.clawback_credits_from_transaction(:'purchase_tx', 'fraud') ->> 'clawed_back' AS clawed_back;
SELECT * FROM tests.new_events('00000000-0000-0000-0000-000000150204');
SELECT billing.clawback_credits_from_transaction(:'purchase_tx', 'fraud') ->> 'already_clawed_back' AS already;
SELECT * FROM tests.new_events('00000000-0000-0000-0000-000000150204');

-- ===== hold.expired: when a write settles an expired hold =====
SELECT billing.add_purchased_credits('00000000-0000-0000-0000-000000150205', 100) ->> 'total_balance' AS total;
SELECT tests.keep('h_expiring', billing.reserve_credits('00000000-0000-0000-0000-000000150205', 30, '1 second', p_feature => 'llm') ->> 'hold_id');
SELECT tests.keep('h_released', billing.reserve_credits('00000000-0000-0000-0000-000000150205', 20, '1 second') ->> 'hold_id');
SELECT tests.keep('h_captured', billing.reserve_credits('00000000-0000-0000-0000-000000150205', 10, '1 second') ->> 'hold_id');
SELECT billing.release_hold((SELECT id FROM lbl WHERE label = 'h_released')) ->> 'status' AS released;
SELECT billing.capture_hold((SELECT id FROM lbl WHERE label = 'h_captured'), 4) ->> 'status' AS captured;
SELECT * FROM tests.new_events('00000000-0000-0000-0000-000000150205');
SELECT tests.sleep_past((SELECT expires_at FROM billing.credit_holds WHERE id = (SELECT id FROM lbl WHERE label = 'h_expiring'))) AS ended;
-- a read settles nothing
SELECT count(*) AS active_holds FROM billing.get_active_holds('00000000-0000-0000-0000-000000150205');
SELECT * FROM tests.new_events('00000000-0000-0000-0000-000000150205');
-- the next write: hold.expired for h_expiring only
SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000150205', 1) ->> 'total_balance' AS total;
SELECT * FROM tests.new_events('00000000-0000-0000-0000-000000150205');
SELECT (e.payload ->> 'expires_at')::timestamptz = h.expires_at AS expires_at_of_hold
  FROM billing.events AS e JOIN billing.credit_holds AS h ON h.user_id = e.user_id AND h.id = (e.payload ->> 'hold_id')::uuid
 WHERE e.user_id = '00000000-0000-0000-0000-000000150205' AND e.type = 'hold.expired';
SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000150205', 1) ->> 'total_balance' AS total;
SELECT * FROM tests.new_events('00000000-0000-0000-0000-000000150205');

-- ===== overdraft.entered: debt from 0 to more than 0 =====
SELECT billing.add_purchased_credits('00000000-0000-0000-0000-000000150206', 10) ->> 'total_balance' AS total;
SELECT billing.set_overdraft_limit('00000000-0000-0000-0000-000000150206', 50) - 'user_id' AS od;
SELECT * FROM tests.new_events('00000000-0000-0000-0000-000000150206');
SELECT billing.consume_credits('00000000-0000-0000-0000-000000150206', 30) ->> 'debt' AS debt;
SELECT * FROM tests.new_events('00000000-0000-0000-0000-000000150206');
-- more debt: nothing
SELECT billing.consume_credits('00000000-0000-0000-0000-000000150206', 5) ->> 'debt' AS debt;
SELECT * FROM tests.new_events('00000000-0000-0000-0000-000000150206');
-- repaid (30 credits: 25 repay the debt), then into debt again: a second overdraft.entered
SELECT billing.add_purchased_credits('00000000-0000-0000-0000-000000150206', 30) ->> 'total_balance' AS total;
SELECT * FROM tests.new_events('00000000-0000-0000-0000-000000150206');
SELECT billing.consume_credits('00000000-0000-0000-0000-000000150206', 8) ->> 'debt' AS debt;
SELECT * FROM tests.new_events('00000000-0000-0000-0000-000000150206');
-- a capture into overdraft is a debit too
SELECT billing.grant_credits('00000000-0000-0000-0000-000000150206', 13, 'purchased') ->> 'debt' AS debt;
SELECT tests.keep('h_od', billing.reserve_credits('00000000-0000-0000-0000-000000150206', 10) ->> 'hold_id');
SELECT billing.capture_hold((SELECT id FROM lbl WHERE label = 'h_od'), 20, p_over => 'overdraft') ->> 'debt' AS debt;
SELECT * FROM tests.new_events('00000000-0000-0000-0000-000000150206');
-- a PT402 (beyond the limit) writes nothing
SELECT tests.err($$SELECT billing.consume_credits('00000000-0000-0000-0000-000000150206', 1000)$$) AS beyond_limit;
SELECT * FROM tests.new_events('00000000-0000-0000-0000-000000150206');

-- ===== subscription.changed =====
-- a new subscription
SELECT billing.upsert_subscription('00000000-0000-0000-0000-000000150207', 'pro', 'active', '2040-01-01 00:00+00', '2040-02-01 00:00+00',
       p_event_id => 'ev15_1', p_event_created_at => '2039-12-31 00:00+00') ->> 'applied' AS applied;
SELECT * FROM tests.new_events('00000000-0000-0000-0000-000000150207');
-- the same event again (a replay): nothing
SELECT billing.upsert_subscription('00000000-0000-0000-0000-000000150207', 'pro', 'active', '2040-01-01 00:00+00', '2040-02-01 00:00+00',
       p_event_id => 'ev15_1', p_event_created_at => '2039-12-31 00:00+00') ->> 'applied' AS applied;
SELECT * FROM tests.new_events('00000000-0000-0000-0000-000000150207');
-- another event that changes nothing: nothing
SELECT billing.upsert_subscription('00000000-0000-0000-0000-000000150207', 'pro', 'active', '2040-01-01 00:00+00', '2040-02-01 00:00+00',
       p_event_id => 'ev15_2', p_event_created_at => '2039-12-31 01:00+00') ->> 'applied' AS applied;
SELECT * FROM tests.new_events('00000000-0000-0000-0000-000000150207');
-- the plan changes
SELECT billing.upsert_subscription('00000000-0000-0000-0000-000000150207', 'premium', 'active', '2040-01-01 00:00+00', '2040-02-01 00:00+00',
       p_event_id => 'ev15_3', p_event_created_at => '2039-12-31 02:00+00') ->> 'applied' AS applied;
SELECT * FROM tests.new_events('00000000-0000-0000-0000-000000150207');
-- a stale event (older than the last applied one): recorded, not applied, no event
SELECT billing.upsert_subscription('00000000-0000-0000-0000-000000150207', 'free', 'canceled', '2040-01-01 00:00+00', '2040-02-01 00:00+00',
       p_event_id => 'ev15_4', p_event_created_at => '2039-12-31 01:30+00') ->> 'reason' AS reason;
SELECT * FROM tests.new_events('00000000-0000-0000-0000-000000150207');
-- the status changes (canceled at period end)
SELECT billing.upsert_subscription('00000000-0000-0000-0000-000000150207', 'premium', 'canceled', '2040-01-01 00:00+00', '2040-02-01 00:00+00',
       p_cancel_at_period_end => true, p_event_id => 'ev15_5', p_event_created_at => '2039-12-31 03:00+00') ->> 'applied' AS applied;
SELECT * FROM tests.new_events('00000000-0000-0000-0000-000000150207');
-- the period changes (a renewal): subscription.changed (and grant.expired for the period's credits)
SELECT billing.upsert_subscription('00000000-0000-0000-0000-000000150207', 'premium', 'active', '2040-02-01 00:00+00', '2040-03-01 00:00+00',
       p_event_id => 'ev15_6', p_event_created_at => '2040-02-01 00:00+00') ->> 'applied' AS applied;
SELECT type, payload ->> 'plan_id' AS plan_id, payload ->> 'status' AS status, payload ->> 'previous_status' AS previous_status,
       payload ->> 'current_period_start' AS period_start, payload ->> 'category' AS category, payload ->> 'expired_amount' AS expired_amount
  FROM tests.new_events('00000000-0000-0000-0000-000000150207');
-- without event ids: a call that changes nothing writes nothing; a trial end is a change
SELECT now() AS p_start, now() + interval '7 days' AS p_end \gset
SELECT billing.upsert_subscription('00000000-0000-0000-0000-000000150208', 'pro', 'trialing', :'p_start', :'p_end', :'p_end') ->> 'applied' AS applied;
SELECT type, payload ->> 'plan_id' AS plan_id, payload ->> 'status' AS status, payload ->> 'previous_plan_id' AS previous_plan_id
  FROM tests.new_events('00000000-0000-0000-0000-000000150208');
SELECT billing.upsert_subscription('00000000-0000-0000-0000-000000150208', 'pro', 'trialing', :'p_start', :'p_end', :'p_end') ->> 'applied' AS applied;
SELECT type FROM tests.new_events('00000000-0000-0000-0000-000000150208');
SELECT billing.upsert_subscription('00000000-0000-0000-0000-000000150208', 'pro', 'trialing', :'p_start', :'p_end', (:'p_end'::timestamptz) - interval '1 day') ->> 'applied' AS applied;
SELECT type, (payload ->> 'trial_ends_at')::timestamptz = (:'p_end'::timestamptz) - interval '1 day' AS trial_ends_at
  FROM tests.new_events('00000000-0000-0000-0000-000000150208');
-- process_expired_subscriptions: a subscription canceled whose period ended goes to free (expired)
SELECT billing.upsert_subscription('00000000-0000-0000-0000-000000150209', 'pro', 'canceled', now() - interval '40 days', now() - interval '10 days') ->> 'applied' AS applied;
SELECT type, payload ->> 'plan_id' AS plan_id, payload ->> 'status' AS status FROM tests.new_events('00000000-0000-0000-0000-000000150209');
SELECT billing.process_expired_subscriptions() >= 1 AS downgraded;
SELECT type, payload - 'current_period_start' - 'current_period_end' AS payload
  FROM tests.new_events('00000000-0000-0000-0000-000000150209') WHERE type = 'subscription.changed';
SELECT billing.process_expired_subscriptions() >= 0 AS again;
SELECT type FROM tests.new_events('00000000-0000-0000-0000-000000150209');
-- the period fields are the subscription's
SELECT (e.payload ->> 'current_period_start')::timestamptz = s.current_period_start AS start_ok,
       (e.payload ->> 'current_period_end')::timestamptz = s.current_period_end AS end_ok
  FROM billing.events AS e JOIN billing.subscriptions AS s USING (user_id)
 WHERE e.user_id = '00000000-0000-0000-0000-000000150207'
   AND e.id = (SELECT max(id) FROM billing.events WHERE user_id = '00000000-0000-0000-0000-000000150207' AND type = 'subscription.changed');

-- ===== rate_limit.exceeded: once per user and hourly bucket, at the first refused call =====
INSERT INTO billing.plans (plan_id, display_name, api_rate_limit_hourly) VALUES ('ev_rl_two', 'Two calls', 2), ('ev_rl_none', 'No calls', 0);
SELECT billing.upsert_subscription('00000000-0000-0000-0000-000000150210', 'ev_rl_two', 'active', now(), now() + interval '30 days') ->> 'applied' AS applied;
SELECT type FROM tests.new_events('00000000-0000-0000-0000-000000150210') WHERE type <> 'subscription.changed';
SELECT allowed, remaining FROM billing.check_api_rate_limit('00000000-0000-0000-0000-000000150210', '/v1/a');
SELECT allowed, remaining FROM billing.check_api_rate_limit('00000000-0000-0000-0000-000000150210', '/v1/a');
SELECT type FROM tests.new_events('00000000-0000-0000-0000-000000150210') WHERE type <> 'subscription.changed';
-- the first refused call: the event, with the endpoint of that call
SELECT allowed, remaining FROM billing.check_api_rate_limit('00000000-0000-0000-0000-000000150210', '/v1/b');
SELECT * FROM tests.new_events('00000000-0000-0000-0000-000000150210');
SELECT (payload ->> 'bucket_start')::timestamptz = date_trunc('hour', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS bucket_is_this_hour,
       (payload ->> 'reset_at')::timestamptz = (date_trunc('hour', now() AT TIME ZONE 'UTC') + interval '1 hour') AT TIME ZONE 'UTC' AS reset_at_next_hour
  FROM billing.events WHERE user_id = '00000000-0000-0000-0000-000000150210' AND type = 'rate_limit.exceeded';
-- later refusals in the same bucket: nothing
SELECT count(*) FILTER (WHERE NOT r.allowed) AS refused
  FROM generate_series(1, 5) AS g CROSS JOIN LATERAL billing.check_api_rate_limit('00000000-0000-0000-0000-000000150210', CASE WHEN g > 0 THEN '/v1/c' END) AS r;
SELECT * FROM tests.new_events('00000000-0000-0000-0000-000000150210');
-- a plan allowing no calls (0): every call is refused, and no rate_limit.exceeded is written
-- (the implementation fires only for a limit above 0: a refused call there counts nothing)
SELECT billing.upsert_subscription('00000000-0000-0000-0000-000000150211', 'ev_rl_none', 'active', now(), now() + interval '30 days') ->> 'applied' AS applied;
SELECT allowed FROM billing.check_api_rate_limit('00000000-0000-0000-0000-000000150211');
SELECT allowed FROM billing.check_api_rate_limit('00000000-0000-0000-0000-000000150211');
SELECT * FROM tests.new_events('00000000-0000-0000-0000-000000150211') WHERE type <> 'subscription.changed';
-- the check of an end user on their own account writes the event too (the function is the writer)
SELECT billing.upsert_subscription('00000000-0000-0000-0000-000000150212', 'ev_rl_two', 'active', now(), now() + interval '30 days') ->> 'applied' AS applied;
BEGIN;
SET LOCAL ROLE authenticated;
SELECT set_config('request.jwt.claims', '{"sub":"00000000-0000-0000-0000-000000150212","role":"authenticated"}', true) IS NOT NULL AS claims_set;
SELECT g, r.allowed FROM generate_series(1, 3) AS g CROSS JOIN LATERAL billing.check_api_rate_limit('00000000-0000-0000-0000-000000150212', '/v1/x' || g) AS r;
-- and reads it through RLS (their own events only)
-- single node only: Citus refuses an end user's read of rows the owner wrote earlier in this transaction
\if :single_node
SELECT type, payload ->> 'endpoint' AS endpoint FROM billing.events ORDER BY id;
\endif
COMMIT;
SELECT type, payload ->> 'endpoint' AS endpoint FROM billing.events WHERE user_id = '00000000-0000-0000-0000-000000150212';
-- an unlimited plan never fires
SELECT billing.upsert_subscription('00000000-0000-0000-0000-000000150213', 'ultra', 'active', now(), now() + interval '30 days') ->> 'applied' AS applied;
SELECT count(*) FILTER (WHERE r.allowed) AS allowed
  FROM generate_series(1, 60) AS g CROSS JOIN LATERAL billing.check_api_rate_limit('00000000-0000-0000-0000-000000150213', CASE WHEN g > 0 THEN '/v1/x' END) AS r;
SELECT count(*) AS rate_events FROM billing.events WHERE user_id = '00000000-0000-0000-0000-000000150213' AND type = 'rate_limit.exceeded';

-- ===== a renewal with rollover: grant.expired says what rolled over and what was lost =====
INSERT INTO billing.plans (plan_id, display_name, monthly_credits, rollover_max) VALUES ('ev_roll', 'Rolls 30 over', 100, 30);
SELECT billing.upsert_subscription('00000000-0000-0000-0000-000000150214', 'ev_roll', 'active', now(), now() + interval '30 days') ->> 'credits_granted' AS granted;
SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000150214', 20) ->> 'total_balance' AS total;
SELECT count(*) AS before_renewal FROM billing.events WHERE user_id = '00000000-0000-0000-0000-000000150214' AND type = 'grant.expired';
SELECT billing.renew_subscription_credits('00000000-0000-0000-0000-000000150214', 100, now() + interval '60 days') ->> 'success' AS renewed;
SELECT payload ->> 'expired_amount' AS expired_amount, payload ->> 'rolled_over' AS rolled_over, payload ->> 'lost' AS lost,
       payload ->> 'ended_by' AS ended_by
  FROM billing.events WHERE user_id = '00000000-0000-0000-0000-000000150214' AND type = 'grant.expired';
SELECT sum(expired_amount) AS expiration_events FROM billing.credit_expiration_events WHERE user_id = '00000000-0000-0000-0000-000000150214';

-- ===== every event of this file: payload.user_id is the row's user; the types seen =====
SELECT type, count(*) AS events,
       count(*) FILTER (WHERE payload ->> 'user_id' IS DISTINCT FROM user_id::text) AS wrong_user
  FROM billing.events WHERE user_id::text LIKE '00000000-0000-0000-0000-0000001502%' GROUP BY type ORDER BY type;
SELECT count(*) AS ledger_mismatches FROM billing.verify_ledger();
-- leave no plan, subscription or API bucket behind (other tests list plans and count buckets)
DELETE FROM billing.api_usage WHERE user_id::text LIKE '00000000-0000-0000-0000-0000001502%';
DELETE FROM billing.subscriptions WHERE user_id::text LIKE '00000000-0000-0000-0000-0000001502%';
DELETE FROM billing.plans WHERE plan_id IN ('ev_rl_two', 'ev_rl_none', 'ev_roll');
SET client_min_messages = warning;
DROP SCHEMA tests CASCADE;
RESET client_min_messages;
