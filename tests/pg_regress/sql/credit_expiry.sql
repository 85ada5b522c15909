-- Subscription credits expire at period end even when no job runs (issue 10 item 2): reads show 0
-- without writing; the first write that touches the account logs the expiration (ledger row and
-- credit_expiration_events) in its own transaction. Each statement is its own transaction.
-- Helpers live in schema tests, not pg_temp: on a Citus cluster a query that calls one may run on a worker.
CREATE SCHEMA tests;
GRANT USAGE ON SCHEMA tests TO PUBLIC;
SET TimeZone = 'UTC';
CREATE FUNCTION tests.stored(p_user uuid) RETURNS text LANGUAGE plpgsql AS $f$
BEGIN RETURN (
    SELECT format('stored sub=%s pur=%s ledger_rows=%s expiration_events=%s',
                  a.subscription_credits_balance, a.purchased_credits_balance,
                  (SELECT count(*) FROM billing.credit_transactions AS t WHERE t.user_id = p_user),
                  (SELECT count(*) FROM billing.credit_expiration_events AS e WHERE e.user_id = p_user))
      FROM billing.accounts AS a WHERE a.user_id = p_user);
END
$f$;

-- ===== a period that ended (an explicit past timestamp) =====
SELECT billing.add_purchased_credits('a2000000-0000-4000-8000-000000000001', 20) ->> 'total_balance' AS purchased;
SELECT billing.renew_subscription_credits('a2000000-0000-4000-8000-000000000001', 100, '2020-01-31 00:00:00+00') ->> 'subscription_credits_balance' AS granted;
-- reads: the lapsed credits count as 0, and reading writes nothing
SELECT * FROM billing.get_user_credits('a2000000-0000-4000-8000-000000000001');
SELECT subscription_credits_balance, purchased_credits_balance, total_balance FROM billing.user_credits
 WHERE user_id = 'a2000000-0000-4000-8000-000000000001';
SELECT subscription_credits_balance, purchased_credits_balance, total_credits FROM billing.get_user_dashboard_stats('a2000000-0000-4000-8000-000000000001');
SELECT tests.stored('a2000000-0000-4000-8000-000000000001');
-- stored balances still agree with the ledger (nothing was expired in either yet)
SELECT count(*) AS ledger_mismatches FROM billing.verify_ledger('a2000000-0000-4000-8000-000000000001');
-- consumption: only the purchased credits can pay; the expiration is logged by this write
SELECT billing.consume_credits_v2('a2000000-0000-4000-8000-000000000001', 5) - 'transaction_id' AS consumed;
SELECT tests.stored('a2000000-0000-4000-8000-000000000001');
SELECT type, pool, amount, balance_after, description FROM billing.credit_transactions
 WHERE user_id = 'a2000000-0000-4000-8000-000000000001' ORDER BY created_at, id;
SELECT expired_amount, description FROM billing.credit_expiration_events WHERE user_id = 'a2000000-0000-4000-8000-000000000001';
-- more than the purchased credits: PT402, and the failed call changes nothing
DO $$ BEGIN
    PERFORM billing.consume_credits_v2('a2000000-0000-4000-8000-000000000001', 16);
EXCEPTION WHEN OTHERS THEN RAISE NOTICE '%: %', SQLSTATE, SQLERRM;
END $$;

-- ===== the first write is a grant: the expiration is logged before it =====
SELECT billing.renew_subscription_credits('a2000000-0000-4000-8000-000000000002', 70, '2020-01-31 00:00:00+00') ->> 'subscription_credits_balance' AS granted;
SELECT billing.add_subscription_credits('a2000000-0000-4000-8000-000000000002', 5) - 'transaction_id' AS bonus;
SELECT type, pool, amount, balance_after FROM billing.credit_transactions
 WHERE user_id = 'a2000000-0000-4000-8000-000000000002' ORDER BY created_at, id;
-- the bonus has no expiry of its own: it stays
SELECT subscription_credits_balance FROM billing.user_credits WHERE user_id = 'a2000000-0000-4000-8000-000000000002';

-- ===== a short period, across transactions: valid, then gone =====
SELECT billing.renew_subscription_credits('a2000000-0000-4000-8000-000000000003', 40, now() + interval '1 second') ->> 'subscription_credits_balance' AS granted;
SELECT subscription_credits_balance AS before_end FROM billing.get_user_credits('a2000000-0000-4000-8000-000000000003');
SELECT pg_sleep(1.2);
SELECT subscription_credits_balance AS after_end FROM billing.get_user_credits('a2000000-0000-4000-8000-000000000003');
DO $$ BEGIN
    PERFORM billing.consume_credits_v2('a2000000-0000-4000-8000-000000000003', 1);
EXCEPTION WHEN OTHERS THEN RAISE NOTICE '%: %', SQLSTATE, SQLERRM;
END $$;
-- expire_subscription_credits after the end logs the lapsed amount once
SELECT billing.expire_subscription_credits('a2000000-0000-4000-8000-000000000003') - 'transaction_id' AS expired;
SELECT billing.expire_subscription_credits('a2000000-0000-4000-8000-000000000003') - 'transaction_id' AS again;
SELECT tests.stored('a2000000-0000-4000-8000-000000000003');

SELECT count(*) AS ledger_mismatches FROM billing.verify_ledger();
SET client_min_messages = warning;
DROP SCHEMA tests CASCADE;
RESET client_min_messages;
