-- upsert_subscription grants a period's credits once (issue 10 item 1), and plan flip-flops
-- within a period never add up to more than the highest plan's monthly credits (issue 11 item 4).
-- Every call below is its own transaction: now() moves between them, as it does between the
-- webhooks a provider sends. Period dates are explicit (fixed once, from the clock, below).
-- Helpers live in schema tests, not pg_temp: on a Citus cluster a query that calls one may run on a worker.
CREATE SCHEMA tests;
GRANT USAGE ON SCHEMA tests TO PUBLIC;
SET TimeZone = 'UTC';
SELECT date_trunc('month', now()) + interval '1 year' AS p0,
       date_trunc('month', now()) + interval '1 year 1 month' AS p1,
       date_trunc('month', now()) + interval '1 year 2 months' AS p2 \gset
CREATE FUNCTION tests.bal(p_user uuid) RETURNS text LANGUAGE plpgsql AS $f$
BEGIN RETURN (
    SELECT format('sub=%s pur=%s granted_in_period=%s',
                  COALESCE(a.subscription_credits_balance::text, '-'), COALESCE(a.purchased_credits_balance::text, '-'),
                  (SELECT s.period_credits_granted FROM billing.subscriptions AS s WHERE s.user_id = p_user))
      FROM (SELECT 1) AS one LEFT JOIN billing.accounts AS a ON a.user_id = p_user);
END
$f$;

-- ===== the reproduction from the review: no period start given, the same webhook twice =====
SELECT billing.upsert_subscription('a1000000-0000-4000-8000-000000000001', 'pro', 'active',
       p_current_period_end => now() + interval '30 days') ->> 'credits_granted' AS granted;
SELECT billing.consume_credits_v2('a1000000-0000-4000-8000-000000000001', 100) ->> 'subscription_credits_balance' AS sub_after_use;
SELECT pg_sleep(0.01);
-- the same event again, in a new transaction (now() has moved): nothing granted, the pool is kept
-- (the period end read first: on a Citus cluster the call runs on the user's worker)
SELECT current_period_end AS period_end FROM billing.subscriptions WHERE user_id = 'a1000000-0000-4000-8000-000000000001' \gset
SELECT billing.upsert_subscription('a1000000-0000-4000-8000-000000000001', 'pro', 'active',
       p_current_period_end => :'period_end') ->> 'credits_granted' AS granted_again;
SELECT tests.bal('a1000000-0000-4000-8000-000000000001');
-- an omitted start keeps the stored one
SELECT current_period_start < now() AS start_kept FROM billing.subscriptions WHERE user_id = 'a1000000-0000-4000-8000-000000000001';

-- ===== explicit periods: repeats, metadata and cancel-flag updates grant nothing =====
SELECT billing.upsert_subscription('a1000000-0000-4000-8000-000000000002', 'pro', 'active', :'p0', :'p1') ->> 'credits_granted' AS first;
SELECT billing.consume_credits_v2('a1000000-0000-4000-8000-000000000002', 100) ->> 'subscription_credits_balance' AS sub_after_use;
SELECT billing.upsert_subscription('a1000000-0000-4000-8000-000000000002', 'pro', 'active', :'p0', :'p1') ->> 'credits_granted' AS repeat;
SELECT billing.upsert_subscription('a1000000-0000-4000-8000-000000000002', 'pro', 'active', :'p0', :'p1',
       p_provider => 'stripe', p_provider_subscription_id => 'sub_1') ->> 'credits_granted' AS metadata;
SELECT billing.upsert_subscription('a1000000-0000-4000-8000-000000000002', 'pro', 'active', :'p0', :'p1',
       p_cancel_at_period_end => true) ->> 'credits_granted' AS cancel_flag;
SELECT billing.upsert_subscription('a1000000-0000-4000-8000-000000000002', 'pro', 'past_due', :'p0', :'p1') ->> 'credits_granted' AS past_due;
SELECT billing.upsert_subscription('a1000000-0000-4000-8000-000000000002', 'pro', 'active', :'p0', :'p1') ->> 'credits_granted' AS active_again;
SELECT tests.bal('a1000000-0000-4000-8000-000000000002');
-- the period advances: the old credits expire and the new period's are granted
SELECT billing.upsert_subscription('a1000000-0000-4000-8000-000000000002', 'pro', 'active', :'p1', :'p2') ->> 'credits_granted' AS next_period;
SELECT tests.bal('a1000000-0000-4000-8000-000000000002');
-- an older period (an event out of order without p_event_created_at) grants nothing
SELECT billing.upsert_subscription('a1000000-0000-4000-8000-000000000002', 'pro', 'active', :'p0', :'p1') ->> 'reason' AS older_period;
SELECT type, amount, balance_after FROM billing.credit_transactions
 WHERE user_id = 'a1000000-0000-4000-8000-000000000002' ORDER BY created_at, id;

-- ===== plan flip-flops within one period: pro -> premium -> pro -> premium =====
SELECT billing.upsert_subscription('a1000000-0000-4000-8000-000000000003', 'pro', 'active', :'p0', :'p1') ->> 'credits_granted' AS pro;
SELECT billing.upsert_subscription('a1000000-0000-4000-8000-000000000003', 'premium', 'active', :'p0', :'p1') ->> 'credits_granted' AS premium_tops_up;
SELECT billing.upsert_subscription('a1000000-0000-4000-8000-000000000003', 'pro', 'active', :'p0', :'p1') ->> 'credits_granted' AS downgrade;
SELECT billing.upsert_subscription('a1000000-0000-4000-8000-000000000003', 'premium', 'active', :'p0', :'p1') ->> 'credits_granted' AS premium_again;
SELECT billing.upsert_subscription('a1000000-0000-4000-8000-000000000003', 'ultra', 'active', :'p0', :'p1') ->> 'credits_granted' AS ultra_tops_up;
SELECT billing.upsert_subscription('a1000000-0000-4000-8000-000000000003', 'premium', 'active', :'p0', :'p1') ->> 'credits_granted' AS downgrade_again;
-- granted in the period: the highest plan's monthly credits (ultra: 10000), no more
SELECT sum(amount) FILTER (WHERE amount > 0) AS granted FROM billing.credit_transactions WHERE user_id = 'a1000000-0000-4000-8000-000000000003' \gset
SELECT :'granted'::numeric AS granted_in_period, tests.bal('a1000000-0000-4000-8000-000000000003');

-- ===== entitled later in the same period: pending -> active grants once =====
SELECT billing.upsert_subscription('a1000000-0000-4000-8000-000000000004', 'pro', 'pending', :'p0', :'p1') ->> 'credits_granted' AS pending;
SELECT billing.upsert_subscription('a1000000-0000-4000-8000-000000000004', 'pro', 'active', :'p0', :'p1') ->> 'credits_granted' AS activated;
SELECT billing.upsert_subscription('a1000000-0000-4000-8000-000000000004', 'pro', 'active', :'p0', :'p1') ->> 'credits_granted' AS repeat;
SELECT tests.bal('a1000000-0000-4000-8000-000000000004');

SELECT count(*) AS ledger_mismatches FROM billing.verify_ledger();
SET client_min_messages = warning;
DROP SCHEMA tests CASCADE;
RESET client_min_messages;
