-- Plans and subscriptions (SPEC 5): the seeded catalog, upsert_subscription (the webhook entry
-- point: create, update, idempotent event ids, out-of-order events, credits per period, 22023),
-- get_user_subscription, get_effective_plan for every status (grace period, trials, expires_at),
-- get_user_limits, process_expired_subscriptions, and the security checks of these functions.
-- Helpers live in schema tests, not pg_temp: on a Citus cluster a query that calls one may run on a worker.
CREATE SCHEMA tests;
GRANT USAGE ON SCHEMA tests TO PUBLIC;
-- single_node: false on a Citus cluster, where the sections marked 'single node only' are skipped
SELECT NOT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'citus') AS single_node \gset
BEGIN;
SET LOCAL TimeZone = 'UTC';
SET LOCAL DateStyle = 'ISO, YMD';
-- err(sql): 'SQLSTATE: message [hint]' instead of failing, so the file runs in one transaction.
-- Random uuids (anything but the fixed e0000000-... test users) are masked.
CREATE FUNCTION tests.err(p_sql text) RETURNS text LANGUAGE plpgsql AS $f$
DECLARE st text; msg text; hint text;
BEGIN
    EXECUTE p_sql;
    RETURN 'no error';
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, hint = PG_EXCEPTION_HINT;
    RETURN regexp_replace(st || ': ' || msg || COALESCE(' [' || NULLIF(hint, '') || ']', ''),
                          '(?!e0000000-)[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}', '<uuid>', 'g');
END
$f$;
-- sub(user): the stored subscription, without uuids and times (times compared to now()).
CREATE FUNCTION tests.sub(p_user uuid) RETURNS text LANGUAGE plpgsql AS $f$
DECLARE tx_now timestamptz := now();  -- a parameter: on a Citus cluster the query runs on a worker
BEGIN RETURN (
    SELECT COALESCE((SELECT format('plan=%s status=%s start_is_now=%s end_in_30d=%s cancel=%s provider=%s/%s last_event=%s expires_at_set=%s',
                                   s.plan_id, s.status, s.current_period_start = tx_now,
                                   s.current_period_end = tx_now + interval '30 days', s.cancel_at_period_end,
                                   s.provider, s.provider_subscription_id, s.last_event_id, s.expires_at IS NOT NULL)
                       FROM billing.subscriptions AS s WHERE s.user_id = p_user), 'no subscription'));
END
$f$;
-- bal(user): both credit pools and the number of ledger rows.
CREATE FUNCTION tests.bal(p_user uuid) RETURNS text LANGUAGE plpgsql AS $f$
BEGIN RETURN (
    SELECT format('sub=%s pur=%s ledger_rows=%s',
                  COALESCE(a.subscription_credits_balance::text, '-'),
                  COALESCE(a.purchased_credits_balance::text, '-'),
                  (SELECT count(*) FROM billing.credit_transactions AS t WHERE t.user_id = p_user))
      FROM (SELECT 1) AS one LEFT JOIN billing.accounts AS a ON a.user_id = p_user);
END
$f$;
GRANT EXECUTE ON FUNCTION tests.err(text) TO PUBLIC;

-- ===== the seeded catalog =====
SELECT plan_id, display_name, monthly_credits, api_rate_limit_hourly, is_active, sort_order
  FROM billing.plans WHERE plan_id IN ('free', 'pro', 'premium', 'ultra') ORDER BY sort_order;
-- S2 tiers: free 50/h, premium 500/h, ultra 2000/h
SELECT plan_id, api_rate_limit_hourly FROM billing.plans WHERE plan_id IN ('free', 'premium', 'ultra') ORDER BY sort_order;
-- every limits key of SPEC 5 is present in every seeded plan
SELECT p.plan_id, k.key, p.limits -> k.key AS value
  FROM billing.plans AS p
 CROSS JOIN unnest(ARRAY['agents', 'documents', 'products', 'widgets_per_type', 'conversations_per_month',
                         'messages_per_month', 'tokens_input_per_month', 'tokens_output_per_month',
                         'api_calls_per_day', 'documents_per_month', 'generations_per_month']) AS k(key)
 WHERE p.plan_id IN ('free', 'pro', 'premium', 'ultra') AND NOT (p.limits ? k.key);
SELECT plan_id, limits ->> 'agents' AS agents, limits ->> 'messages_per_month' AS messages,
       limits ->> 'widgets_per_type' AS widgets_per_type, limits ->> 'api_calls_per_day' AS api_calls_per_day
  FROM billing.plans WHERE plan_id IN ('free', 'pro', 'premium', 'ultra') ORDER BY sort_order;

-- ===== upsert_subscription: a new active subscription =====
-- (now() and the plans' limits read here: in a query on a Citus cluster's worker, now() is the
-- worker's transaction start, and a query on billing tables that calls a billing function fails)
SELECT now() AS tx_now \gset
SELECT (SELECT limits FROM billing.plans WHERE plan_id = 'free') AS free_limits, (SELECT limits FROM billing.plans WHERE plan_id = 'premium') AS premium_limits \gset
-- user 1 has no subscription: get_user_subscription gives the free plan row
SELECT id IS NULL AS no_id, user_id, plan_name, plan_display_name, status, limits = :'free_limits' AS free_limits,
       current_period_start, current_period_end, trial_ends_at, cancel_at_period_end
  FROM billing.get_user_subscription('e0000000-0000-4000-8000-000000000001');
SELECT billing.get_effective_plan('e0000000-0000-4000-8000-000000000001');
SELECT billing.get_user_limits('e0000000-0000-4000-8000-000000000001') = (SELECT limits FROM billing.plans WHERE plan_id = 'free') AS free_limits;
-- new: applied, premium's 2000 monthly credits granted as subscription credits
SELECT billing.upsert_subscription('e0000000-0000-4000-8000-000000000001', 'premium', 'active', now(), now() + interval '30 days',
                                   NULL, false, 'stripe', 'sub_1', 'evt_1', now() - interval '1 hour') - 'subscription_id' AS r;
SELECT tests.sub('e0000000-0000-4000-8000-000000000001');
SELECT tests.bal('e0000000-0000-4000-8000-000000000001');
SELECT type, pool, amount, balance_after FROM billing.credit_transactions
 WHERE user_id = 'e0000000-0000-4000-8000-000000000001' ORDER BY id;
SELECT s.id AS sub_id FROM billing.subscriptions AS s WHERE s.user_id = 'e0000000-0000-4000-8000-000000000001' \gset
SELECT id = :'sub_id' AS same_id,
       user_id, plan_name, plan_display_name, status,
       limits = :'premium_limits' AS premium_limits,
       current_period_start = :'tx_now' AS start_ok, current_period_end = :'tx_now'::timestamptz + interval '30 days' AS end_ok,
       trial_ends_at, cancel_at_period_end
  FROM billing.get_user_subscription('e0000000-0000-4000-8000-000000000001');
SELECT billing.get_effective_plan('e0000000-0000-4000-8000-000000000001');
SELECT billing.get_user_limits('e0000000-0000-4000-8000-000000000001') = (SELECT limits FROM billing.plans WHERE plan_id = 'premium') AS premium_limits;
SELECT event_id, event_created_at = :'tx_now'::timestamptz - interval '1 hour' AS at_ok, applied, plan_id, status
  FROM billing.subscription_events WHERE user_id = 'e0000000-0000-4000-8000-000000000001' ORDER BY id;

-- ===== the same p_event_id again (webhook redelivery): applied false, nothing changes =====
SELECT billing.upsert_subscription('e0000000-0000-4000-8000-000000000001', 'ultra', 'active', now(), now() + interval '30 days',
                                   NULL, false, 'stripe', 'sub_1', 'evt_1', now()) - 'subscription_id' AS r;
SELECT tests.sub('e0000000-0000-4000-8000-000000000001');
SELECT tests.bal('e0000000-0000-4000-8000-000000000001');

-- ===== update in the same period: cancel at period end; no new credits =====
SELECT billing.upsert_subscription('e0000000-0000-4000-8000-000000000001', 'premium', 'active', now(), now() + interval '30 days',
                                   NULL, true, NULL, NULL, 'evt_2', now() - interval '30 minutes') - 'subscription_id' AS r;
-- provider ids are kept when the event does not carry them
SELECT tests.sub('e0000000-0000-4000-8000-000000000001');
SELECT tests.bal('e0000000-0000-4000-8000-000000000001');
SELECT cancel_at_period_end FROM billing.get_user_subscription('e0000000-0000-4000-8000-000000000001');

-- ===== a stale event (older than the last applied one): recorded with applied=false, nothing changes =====
SELECT billing.upsert_subscription('e0000000-0000-4000-8000-000000000001', 'free', 'canceled', now(), now() + interval '30 days',
                                   NULL, false, NULL, NULL, 'evt_0', now() - interval '2 hours') - 'subscription_id' AS r;
SELECT tests.sub('e0000000-0000-4000-8000-000000000001');
SELECT tests.bal('e0000000-0000-4000-8000-000000000001');
SELECT billing.get_effective_plan('e0000000-0000-4000-8000-000000000001');
SELECT event_id, applied, plan_id, status, event_created_at = :'tx_now'::timestamptz - interval '2 hours' AS at_ok
  FROM billing.subscription_events WHERE user_id = 'e0000000-0000-4000-8000-000000000001' ORDER BY id;
-- the last applied event time is still the newest one
SELECT last_event_created_at = :'tx_now'::timestamptz - interval '30 minutes' AS last_at_ok
  FROM billing.subscriptions WHERE user_id = 'e0000000-0000-4000-8000-000000000001';

-- ===== plan change (upgrade) in the same period: the new plan's credits (old ones expire) =====
SELECT billing.upsert_subscription('e0000000-0000-4000-8000-000000000001', 'ultra', 'active', now(), now() + interval '30 days',
                                   NULL, false, NULL, NULL, 'evt_3', now() - interval '10 minutes') - 'subscription_id' AS r;
SELECT tests.sub('e0000000-0000-4000-8000-000000000001');
SELECT tests.bal('e0000000-0000-4000-8000-000000000001');

-- ===== a new period (renewal): credits renewed, purchased credits untouched =====
SELECT billing.add_purchased_credits('e0000000-0000-4000-8000-000000000001', 70) ->> 'total_balance' AS total;
SELECT billing.consume_credits_v2('e0000000-0000-4000-8000-000000000001', 500) ->> 'total_balance' AS total;
SELECT billing.upsert_subscription('e0000000-0000-4000-8000-000000000001', 'ultra', 'active', now() + interval '1 second', now() + interval '30 days',
                                   NULL, false, NULL, NULL, 'evt_4', now()) - 'subscription_id' AS r;
SELECT tests.bal('e0000000-0000-4000-8000-000000000001');
SELECT type, pool, amount, balance_after FROM billing.credit_transactions
 WHERE user_id = 'e0000000-0000-4000-8000-000000000001' ORDER BY id;

-- ===== past_due with a new period: no credits granted =====
SELECT billing.upsert_subscription('e0000000-0000-4000-8000-000000000002', 'premium', 'past_due', now(), now() + interval '30 days') - 'subscription_id' AS r;
SELECT tests.bal('e0000000-0000-4000-8000-000000000002');
SELECT billing.upsert_subscription('e0000000-0000-4000-8000-000000000002', 'premium', 'past_due', now() + interval '1 second', now() + interval '30 days') - 'subscription_id' AS r;
SELECT tests.bal('e0000000-0000-4000-8000-000000000002');

-- ===== trialing: credits granted for a new trial =====
SELECT billing.upsert_subscription('e0000000-0000-4000-8000-000000000003', 'pro', 'trialing', now(), now() + interval '7 days',
                                   now() + interval '7 days') - 'subscription_id' AS r;
SELECT tests.bal('e0000000-0000-4000-8000-000000000003');

-- ===== 22023: unknown plan, unknown status, NULL arguments; nothing changes =====
SELECT tests.err($$SELECT billing.upsert_subscription('e0000000-0000-4000-8000-000000000001', 'platinum', 'active')$$);
SELECT tests.err($$SELECT billing.upsert_subscription('e0000000-0000-4000-8000-000000000001', 'premium', 'activ')$$);
SELECT tests.err($$SELECT billing.upsert_subscription(NULL, 'premium', 'active')$$);
SELECT tests.err($$SELECT billing.upsert_subscription('e0000000-0000-4000-8000-000000000001', NULL, 'active')$$);
SELECT tests.err($$SELECT billing.upsert_subscription('e0000000-0000-4000-8000-000000000001', 'premium', NULL)$$);
SELECT tests.err($$SELECT billing.upsert_subscription('e0000000-0000-4000-8000-000000000009', 'platinum', 'active', p_event_id => 'evt_bad')$$);
-- a period that ends before it starts is a bad argument too (SPEC 3: 22023, not a constraint error)
SELECT left(tests.err($$SELECT billing.upsert_subscription('e0000000-0000-4000-8000-000000000001', 'ultra', 'active', now(), now() - interval '1 day')$$), 6) AS sqlstate;
-- ... also when p_current_period_start is omitted: a new subscription would start now, an
-- existing one keeps its stored start (0.6.0; was 23514 from the table's CHECK)
SELECT left(tests.err($$SELECT billing.upsert_subscription('e0000000-0000-4000-8000-000000000001', 'ultra', 'active', NULL, now() - interval '1 day')$$), 6) AS sqlstate;
SELECT left(tests.err($$SELECT billing.upsert_subscription('e0000000-0000-4000-8000-000000000077', 'ultra', 'active', NULL, now() - interval '1 day')$$), 6) AS sqlstate;
SELECT tests.sub('e0000000-0000-4000-8000-000000000001');
SELECT tests.bal('e0000000-0000-4000-8000-000000000001');
SELECT tests.sub('e0000000-0000-4000-8000-000000000009');
-- the failed call did not consume its event id: a corrected redelivery is applied
SELECT billing.upsert_subscription('e0000000-0000-4000-8000-000000000009', 'pro', 'active', p_event_id => 'evt_bad') ->> 'applied' AS applied;
SELECT tests.sub('e0000000-0000-4000-8000-000000000009');

-- ===== get_effective_plan for every status =====
-- Users 1x are written directly with the period/trial/expiry they need (now() is fixed in this
-- transaction, so "past" and "future" are exact).
CREATE TEMP TABLE cases (n int, user_id uuid, plan_id text, status text, period_end timestamptz, trial_end timestamptz, expires_at timestamptz, note text);
-- subs(): every subscription, read first (joined to cases on a Citus cluster's coordinator)
CREATE FUNCTION tests.subs() RETURNS SETOF billing.subscriptions LANGUAGE plpgsql AS $f$
BEGIN RETURN QUERY SELECT * FROM billing.subscriptions; END
$f$;
INSERT INTO cases VALUES
 (1,  'e0000000-0000-4000-8000-000000000011', 'premium', 'active',   now() + interval '10 days', NULL, NULL, 'active in period'),
 (2,  'e0000000-0000-4000-8000-000000000012', 'premium', 'active',   now() - interval '1 day',   NULL, NULL, 'active past period end (renewal webhook late)'),
 (3,  'e0000000-0000-4000-8000-000000000013', 'premium', 'trialing', now() + interval '10 days', now() + interval '1 day', NULL, 'trialing, trial not over'),
 (4,  'e0000000-0000-4000-8000-000000000014', 'premium', 'trialing', now() + interval '10 days', now() - interval '5 days', NULL, 'trialing 5 days past trial end'),
 (5,  'e0000000-0000-4000-8000-000000000015', 'premium', 'canceled', now() + interval '1 day',   NULL, NULL, 'canceled before period end'),
 (6,  'e0000000-0000-4000-8000-000000000016', 'premium', 'canceled', now() - interval '1 day',   NULL, NULL, 'canceled 1 day past period end'),
 (7,  'e0000000-0000-4000-8000-000000000017', 'premium', 'canceled', now() - interval '5 days',  NULL, NULL, 'canceled 5 days past period end'),
 (8,  'e0000000-0000-4000-8000-000000000018', 'premium', 'past_due', now() + interval '1 day',   NULL, NULL, 'past_due before period end'),
 (9,  'e0000000-0000-4000-8000-000000000019', 'premium', 'past_due', now() - interval '1 day',   NULL, NULL, 'past_due 1 day past period end'),
 (10, 'e0000000-0000-4000-8000-00000000001a', 'premium', 'past_due', now() - interval '5 days',  NULL, NULL, 'past_due 5 days past period end'),
 (11, 'e0000000-0000-4000-8000-00000000001b', 'premium', 'expired',  now() + interval '10 days', NULL, NULL, 'expired'),
 (12, 'e0000000-0000-4000-8000-00000000001c', 'premium', 'active',   now() + interval '10 days', NULL, now() - interval '1 minute', 'active, expires_at passed'),
 (13, 'e0000000-0000-4000-8000-00000000001d', 'premium', 'active',   now() + interval '10 days', NULL, now() + interval '1 day', 'active, expires_at in the future'),
 (14, 'e0000000-0000-4000-8000-00000000001e', 'free',    'free',     NULL, NULL, NULL, 'free'),
 (15, 'e0000000-0000-4000-8000-00000000001f', 'pro',     'canceled', NULL, NULL, NULL, 'canceled without a period end');
INSERT INTO billing.subscriptions (user_id, plan_id, status, current_period_start, current_period_end, trial_ends_at, expires_at)
SELECT user_id, plan_id, status, now() - interval '30 days', period_end, trial_end, expires_at FROM cases;
-- no grace period (the default)
SELECT c.n, c.note, c.status, billing.get_effective_plan(c.user_id) AS effective,
       (SELECT s.plan_name FROM billing.get_user_subscription(c.user_id) AS s) AS subscription_plan,
       billing.get_user_limits(c.user_id) = (SELECT p.limits FROM billing.plans AS p WHERE p.plan_id = billing.get_effective_plan(c.user_id)) AS limits_match
  FROM cases AS c ORDER BY c.n;
-- with a 3 day grace period: canceled/past_due 1 day past the end keep their plan, 5 days do not
SET LOCAL pg_billing.grace_period = '3 days';
SELECT c.n, c.note, billing.get_effective_plan(c.user_id) AS effective_with_grace
  FROM cases AS c WHERE c.status IN ('canceled', 'past_due', 'expired') ORDER BY c.n;
RESET pg_billing.grace_period;
SELECT billing.get_effective_plan('e0000000-0000-4000-8000-000000000016') AS after_reset;
-- the subscription through upsert: status expired sets expires_at and means free
SELECT billing.upsert_subscription('e0000000-0000-4000-8000-000000000004', 'premium', 'expired', now() - interval '30 days', now() - interval '1 day') - 'subscription_id' AS r;
SELECT tests.sub('e0000000-0000-4000-8000-000000000004');
SELECT tests.bal('e0000000-0000-4000-8000-000000000004');

-- ===== process_expired_subscriptions =====
-- credits for some of the lapsed users: subscription credits expire, purchased ones stay
SELECT billing.add_subscription_credits('e0000000-0000-4000-8000-000000000016', 300) ->> 'total_balance' AS total;
SELECT billing.add_purchased_credits('e0000000-0000-4000-8000-000000000016', 40) ->> 'total_balance' AS total;
SELECT billing.add_subscription_credits('e0000000-0000-4000-8000-000000000014', 25) ->> 'total_balance' AS total;
SELECT billing.add_subscription_credits('e0000000-0000-4000-8000-000000000011', 60) ->> 'total_balance' AS total;
-- a free-plan row whose period ended (not downgraded: it is already free)
INSERT INTO billing.subscriptions (user_id, plan_id, status, current_period_start, current_period_end)
VALUES ('e0000000-0000-4000-8000-000000000020', 'free', 'active', now() - interval '60 days', now() - interval '30 days');
SELECT billing.add_subscription_credits('e0000000-0000-4000-8000-000000000020', 10) ->> 'total_balance' AS total;
-- with a grace period of 3 days, the rows 1 day past their end are not due yet
SET LOCAL pg_billing.grace_period = '3 days';
SELECT billing.process_expired_subscriptions() AS downgraded_with_grace;
SELECT c.n, c.note, s.plan_id, s.status FROM cases AS c JOIN tests.subs() AS s USING (user_id) ORDER BY c.n;
RESET pg_billing.grace_period;
-- without it, 6 and 9 are due too (4, 7, 10, 12 and 15 went above); 2 (active, its renewal
-- webhook late), 11 (already expired) and 14 (free) are not touched
SELECT billing.process_expired_subscriptions() AS downgraded;
SELECT c.n, c.note, s.plan_id, s.status, s.expires_at IS NOT NULL AS expires_at_set,
       billing.get_effective_plan(c.user_id) AS effective
  FROM cases AS c JOIN tests.subs() AS s USING (user_id) ORDER BY c.n;
-- nothing left to do
SELECT billing.process_expired_subscriptions() AS downgraded_again;
-- subscription credits expired and logged; purchased credits kept; in-period users untouched
SELECT tests.bal('e0000000-0000-4000-8000-000000000016') AS canceled_user;
SELECT tests.bal('e0000000-0000-4000-8000-000000000014') AS trial_user;
SELECT tests.bal('e0000000-0000-4000-8000-000000000011') AS active_user;
SELECT tests.sub('e0000000-0000-4000-8000-000000000020') AS free_plan_row;
SELECT tests.bal('e0000000-0000-4000-8000-000000000020') AS free_plan_row;
SELECT user_id, expired_amount FROM billing.credit_expiration_events
 WHERE user_id IN ('e0000000-0000-4000-8000-000000000016', 'e0000000-0000-4000-8000-000000000014',
                   'e0000000-0000-4000-8000-000000000011', 'e0000000-0000-4000-8000-000000000020')
 ORDER BY user_id;
SELECT plan_name, status, limits = (SELECT limits FROM billing.plans WHERE plan_id = 'free') AS free_limits
  FROM billing.get_user_subscription('e0000000-0000-4000-8000-000000000016');
-- a new webhook after the downgrade brings the user back, with credits
SELECT billing.upsert_subscription('e0000000-0000-4000-8000-000000000016', 'pro', 'active', now(), now() + interval '30 days') - 'subscription_id' AS r;
SELECT tests.sub('e0000000-0000-4000-8000-000000000016');
SELECT tests.bal('e0000000-0000-4000-8000-000000000016');

-- ===== security =====
SELECT billing.upsert_subscription('e0000000-0000-4000-8000-000000000031', 'premium', 'active', now(), now() + interval '30 days') ->> 'applied' AS applied;
SET LOCAL ROLE authenticated;
SELECT set_config('request.jwt.claims', '{"sub":"e0000000-0000-4000-8000-000000000030","role":"authenticated"}', true) IS NOT NULL AS claims_set;
-- own id: works
SELECT plan_name, status FROM billing.get_user_subscription('e0000000-0000-4000-8000-000000000030');
SELECT billing.get_effective_plan('e0000000-0000-4000-8000-000000000030');
SELECT billing.get_user_limits('e0000000-0000-4000-8000-000000000030') ->> 'agents' AS agents;
-- another user's id: 42501
SELECT tests.err($$SELECT * FROM billing.get_user_subscription('e0000000-0000-4000-8000-000000000031')$$);
SELECT tests.err($$SELECT billing.get_effective_plan('e0000000-0000-4000-8000-000000000031')$$);
SELECT tests.err($$SELECT billing.get_user_limits('e0000000-0000-4000-8000-000000000031')$$);
-- NULL: 22023
SELECT tests.err($$SELECT billing.get_effective_plan(NULL)$$);
-- service-only: 42501, even on their own id
SELECT tests.err($$SELECT billing.upsert_subscription('e0000000-0000-4000-8000-000000000030', 'ultra', 'active')$$);
SELECT tests.err($$SELECT billing.process_expired_subscriptions()$$);
-- no writes to the tables either
SELECT tests.err($$UPDATE billing.subscriptions SET plan_id = 'ultra'$$);
SELECT tests.err($$INSERT INTO billing.subscriptions (user_id, plan_id, status) VALUES ('e0000000-0000-4000-8000-000000000030', 'ultra', 'active')$$);
-- RLS: another user's subscription is invisible
-- single node only: Citus refuses an end user's read of rows postgres wrote earlier in this transaction
\if :single_node
SELECT count(*) AS visible FROM billing.subscriptions;
\endif
RESET ROLE;
-- the internal check holds even if EXECUTE were granted by mistake (claims say authenticated)
SELECT set_config('request.jwt.claims', '{"sub":"e0000000-0000-4000-8000-000000000030","role":"authenticated"}', true) IS NOT NULL AS claims_set;
SELECT tests.err($$SELECT billing.upsert_subscription('e0000000-0000-4000-8000-000000000030', 'ultra', 'active')$$);
SELECT tests.err($$SELECT billing.process_expired_subscriptions()$$);
SELECT set_config('request.jwt.claims', '', true) = '' AS claims_cleared;
-- anon: no identity, no access
SET LOCAL ROLE anon;
SELECT set_config('request.jwt.claims', '{"role":"anon"}', true) IS NOT NULL AS claims_set;
SELECT tests.err($$SELECT billing.get_effective_plan('e0000000-0000-4000-8000-000000000031')$$);
SELECT tests.err($$SELECT * FROM billing.get_user_subscription('e0000000-0000-4000-8000-000000000031')$$);
RESET ROLE;
SELECT set_config('request.jwt.claims', '', true) = '' AS claims_cleared;
-- the denied calls changed nothing
SELECT tests.sub('e0000000-0000-4000-8000-000000000030');
SELECT tests.sub('e0000000-0000-4000-8000-000000000031');

SELECT count(*) AS ledger_mismatches FROM billing.verify_ledger();
ROLLBACK;
SET client_min_messages = warning;
DROP SCHEMA tests CASCADE;
RESET client_min_messages;
