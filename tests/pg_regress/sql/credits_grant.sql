-- add_subscription_credits, add_purchased_credits, increment_credits_with_log (SPEC 4):
-- pools, ledger rows, account creation, argument checks (22023), idempotency.
-- Helpers live in schema tests, not pg_temp: on a Citus cluster a query that calls one may run on a worker.
CREATE SCHEMA tests;
GRANT USAGE ON SCHEMA tests TO PUBLIC;
BEGIN;
SET LOCAL TimeZone = 'UTC';
SET LOCAL DateStyle = 'ISO, YMD';
-- err(sql): runs sql and returns 'SQLSTATE: message [detail]' instead of failing, so the
-- file runs in one transaction. Random uuids (not the fixed 00000000-0000-0000-0000-... test
-- users) are masked.
CREATE FUNCTION tests.err(p_sql text) RETURNS text LANGUAGE plpgsql AS $f$
DECLARE st text; msg text; det text;
BEGIN
    EXECUTE p_sql;
    RETURN 'no error';
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL;
    RETURN regexp_replace(st || ': ' || msg || COALESCE(' [' || NULLIF(det, '') || ']', ''),
                          '(?!00000000-0000-0000-0000-)[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}',
                          '<uuid>', 'g');
END
$f$;
-- bal(user): both pools and the number of ledger rows (to show that a failed call changed nothing).
CREATE FUNCTION tests.bal(p_user uuid) RETURNS text LANGUAGE plpgsql AS $f$
BEGIN RETURN (
    SELECT format('sub=%s pur=%s ledger_rows=%s',
                  COALESCE(a.subscription_credits_balance::text, '-'),
                  COALESCE(a.purchased_credits_balance::text, '-'),
                  (SELECT count(*) FROM billing.credit_transactions AS t WHERE t.user_id = p_user))
      FROM (SELECT 1) AS one LEFT JOIN billing.accounts AS a ON a.user_id = p_user);
END
$f$;
-- Results of calls, by label: r - 'transaction_id' is deterministic.
CREATE TEMP TABLE res (label text PRIMARY KEY, r jsonb);

-- ===== add_subscription_credits =====
-- creates the account when missing
SELECT tests.bal('00000000-0000-0000-0000-000000000011');
INSERT INTO res SELECT 'sub_1', billing.add_subscription_credits('00000000-0000-0000-0000-000000000011', 100, 'monthly grant', 'inv-1')
RETURNING label, r - 'transaction_id' AS r;
INSERT INTO res SELECT 'sub_2', billing.add_subscription_credits('00000000-0000-0000-0000-000000000011', 50)
RETURNING label, r - 'transaction_id' AS r;
SELECT tests.bal('00000000-0000-0000-0000-000000000011');

-- ===== add_purchased_credits =====
-- to an existing account: only the purchased pool grows
INSERT INTO res SELECT 'pur_1', billing.add_purchased_credits('00000000-0000-0000-0000-000000000011', 25, 'credit pack', 'pi_123')
RETURNING label, r - 'transaction_id' AS r;
-- creates the account when missing
INSERT INTO res SELECT 'pur_new', billing.add_purchased_credits('00000000-0000-0000-0000-000000000012', 7)
RETURNING label, r - 'transaction_id' AS r;
SELECT user_id, subscription_credits_balance, purchased_credits_balance, total_balance
  FROM billing.user_credits WHERE user_id IN ('00000000-0000-0000-0000-000000000011', '00000000-0000-0000-0000-000000000012')
 ORDER BY user_id;

-- one ledger row per grant, under the returned transaction_id
SELECT res.label, t.user_id, t.type, t.pool, t.amount, t.balance_after, t.description, t.reference_id
  FROM res JOIN billing.credit_transactions AS t ON t.operation_id = (res.r ->> 'transaction_id')::uuid
 ORDER BY t.id;
SELECT count(DISTINCT r ->> 'transaction_id') AS distinct_ids, count(*) AS calls FROM res;

-- ===== 22023 for both grant functions; nothing changes, no account created =====
SELECT tests.err($$SELECT billing.add_subscription_credits(NULL, 1)$$);
SELECT tests.err($$SELECT billing.add_subscription_credits('00000000-0000-0000-0000-000000000013', NULL)$$);
SELECT tests.err($$SELECT billing.add_subscription_credits('00000000-0000-0000-0000-000000000013', 0)$$);
SELECT tests.err($$SELECT billing.add_subscription_credits('00000000-0000-0000-0000-000000000013', -10)$$);
SELECT tests.err($$SELECT billing.add_subscription_credits('00000000-0000-0000-0000-000000000013', 1, repeat('d', 1001))$$);
SELECT tests.err($$SELECT billing.add_subscription_credits('00000000-0000-0000-0000-000000000013', 1, NULL, repeat('r', 256))$$);
SELECT tests.err($$SELECT billing.add_subscription_credits('00000000-0000-0000-0000-000000000013', 1, NULL, NULL, repeat('k', 256))$$);
SELECT tests.err($$SELECT billing.add_purchased_credits(NULL, 1)$$);
SELECT tests.err($$SELECT billing.add_purchased_credits('00000000-0000-0000-0000-000000000013', NULL)$$);
SELECT tests.err($$SELECT billing.add_purchased_credits('00000000-0000-0000-0000-000000000013', 0)$$);
SELECT tests.err($$SELECT billing.add_purchased_credits('00000000-0000-0000-0000-000000000013', -1)$$);
SELECT tests.err($$SELECT billing.add_purchased_credits('00000000-0000-0000-0000-000000000013', 1, repeat('d', 1001))$$);
SELECT tests.err($$SELECT billing.add_purchased_credits('00000000-0000-0000-0000-000000000013', 1, NULL, repeat('r', 256))$$);
SELECT tests.err($$SELECT billing.add_purchased_credits('00000000-0000-0000-0000-000000000013', 1, NULL, NULL, repeat('k', 256))$$);
SELECT tests.bal('00000000-0000-0000-0000-000000000013');
-- the longest accepted texts
SELECT billing.add_purchased_credits('00000000-0000-0000-0000-000000000013', 1, repeat('d', 1000), repeat('r', 255), repeat('k', 255)) ->> 'total_balance' AS total;
SELECT tests.bal('00000000-0000-0000-0000-000000000013');

-- ===== idempotency =====
INSERT INTO res SELECT 'idem_sub', billing.add_subscription_credits('00000000-0000-0000-0000-000000000014', 30, 'grant', 'inv-9', 'grant-key')
RETURNING label, r - 'transaction_id' AS r;
-- repeat: identical JSON, nothing added
SELECT billing.add_subscription_credits('00000000-0000-0000-0000-000000000014', 30, 'grant', 'inv-9', 'grant-key')
       = (SELECT r FROM res WHERE label = 'idem_sub') AS identical_json;
SELECT tests.bal('00000000-0000-0000-0000-000000000014');
-- other arguments or another function with that key: PT409
SELECT tests.err($$SELECT billing.add_subscription_credits('00000000-0000-0000-0000-000000000014', 31, 'grant', 'inv-9', 'grant-key')$$);
SELECT tests.err($$SELECT billing.add_subscription_credits('00000000-0000-0000-0000-000000000014', 30, 'grant', 'inv-10', 'grant-key')$$);
SELECT tests.err($$SELECT billing.add_purchased_credits('00000000-0000-0000-0000-000000000014', 30, 'grant', 'inv-9', 'grant-key')$$);
SELECT tests.bal('00000000-0000-0000-0000-000000000014');
INSERT INTO res SELECT 'idem_pur', billing.add_purchased_credits('00000000-0000-0000-0000-000000000014', 12, NULL, NULL, 'buy-key')
RETURNING label, r - 'transaction_id' AS r;
SELECT billing.add_purchased_credits('00000000-0000-0000-0000-000000000014', 12, NULL, NULL, 'buy-key')
       = (SELECT r FROM res WHERE label = 'idem_pur') AS identical_json;
SELECT tests.err($$SELECT billing.add_purchased_credits('00000000-0000-0000-0000-000000000014', 12, 'x', NULL, 'buy-key')$$);
-- empty key = no key: applies twice
SELECT billing.add_purchased_credits('00000000-0000-0000-0000-000000000014', 1, NULL, NULL, '') ->> 'total_balance' AS total;
SELECT billing.add_purchased_credits('00000000-0000-0000-0000-000000000014', 1, NULL, NULL, '') ->> 'total_balance' AS total;
SELECT tests.bal('00000000-0000-0000-0000-000000000014');

-- ===== increment_credits_with_log: legacy alias, returns the new total =====
-- creates the account; 'purchase' goes to the purchased pool
SELECT billing.increment_credits_with_log('00000000-0000-0000-0000-000000000015', 5, 'purchase', 'pack', 'pi_1');
-- any other (valid) type goes to the subscription pool
SELECT billing.increment_credits_with_log('00000000-0000-0000-0000-000000000015', 7, 'bonus');
SELECT billing.increment_credits_with_log('00000000-0000-0000-0000-000000000015', 11, 'subscription', 'renewal');
SELECT billing.increment_credits_with_log('00000000-0000-0000-0000-000000000015', 2, 'admin_grant_2024');
SELECT subscription_credits_balance, purchased_credits_balance, total_balance
  FROM billing.user_credits WHERE user_id = '00000000-0000-0000-0000-000000000015';
SELECT type, pool, amount, balance_after, description, reference_id
  FROM billing.credit_transactions WHERE user_id = '00000000-0000-0000-0000-000000000015' ORDER BY id;
-- a purchase by any spelling (case-insensitive, spaces trimmed) reaches the purchased pool, which
-- never expires, and is logged as 'purchase' (issue 10 item 5; 0.2.0 put these 3 credits in the
-- subscription pool)
SELECT billing.increment_credits_with_log('00000000-0000-0000-0000-000000000015', 1, 'Purchase');
SELECT billing.increment_credits_with_log('00000000-0000-0000-0000-000000000015', 1, 'PURCHASE');
SELECT billing.increment_credits_with_log('00000000-0000-0000-0000-000000000015', 1, 'purchase ');
SELECT tests.bal('00000000-0000-0000-0000-000000000015');
SELECT type, pool, amount FROM billing.credit_transactions
 WHERE user_id = '00000000-0000-0000-0000-000000000015' AND amount = 1 ORDER BY id;
-- other legacy types are free-form (apps used their own names) and go to the subscription pool
SELECT tests.err($$SELECT billing.increment_credits_with_log('00000000-0000-0000-0000-000000000015', 1, '1bonus')$$);
SELECT tests.err($$SELECT billing.increment_credits_with_log('00000000-0000-0000-0000-000000000015', 1, 'x''; DROP TABLE billing.accounts; --')$$);
SELECT tests.err($$SELECT billing.increment_credits_with_log('00000000-0000-0000-0000-000000000015', 1, repeat('a', 64))$$);
-- empty or NULL types, bad amounts: 22023, nothing changes
SELECT tests.bal('00000000-0000-0000-0000-000000000015');
SELECT tests.err($$SELECT billing.increment_credits_with_log('00000000-0000-0000-0000-000000000015', 1, NULL)$$);
SELECT tests.err($$SELECT billing.increment_credits_with_log('00000000-0000-0000-0000-000000000015', 1, '')$$);
SELECT tests.err($$SELECT billing.increment_credits_with_log('00000000-0000-0000-0000-000000000015', 1, repeat('a', 65))$$);
SELECT tests.err($$SELECT billing.increment_credits_with_log('00000000-0000-0000-0000-000000000015', 0, 'bonus')$$);
SELECT tests.err($$SELECT billing.increment_credits_with_log('00000000-0000-0000-0000-000000000015', -3, 'purchase')$$);
SELECT tests.err($$SELECT billing.increment_credits_with_log('00000000-0000-0000-0000-000000000015', NULL, 'purchase')$$);
SELECT tests.err($$SELECT billing.increment_credits_with_log(NULL, 1, 'purchase')$$);
SELECT tests.err($$SELECT billing.increment_credits_with_log('00000000-0000-0000-0000-000000000015', 1, 'bonus', repeat('d', 1001))$$);
SELECT tests.err($$SELECT billing.increment_credits_with_log('00000000-0000-0000-0000-000000000015', 1, 'bonus', NULL, repeat('r', 256))$$);
SELECT tests.bal('00000000-0000-0000-0000-000000000015');
-- a 63-character type is valid
SELECT billing.increment_credits_with_log('00000000-0000-0000-0000-000000000015', 1, repeat('a', 63));
-- a total beyond the legacy integer result is refused and changes nothing
SELECT billing.add_subscription_credits('00000000-0000-0000-0000-000000000015', 2147483647) ->> 'total_balance' AS total;
SELECT tests.bal('00000000-0000-0000-0000-000000000015');
SELECT tests.err($$SELECT billing.increment_credits_with_log('00000000-0000-0000-0000-000000000015', 1, 'bonus')$$);
SELECT tests.bal('00000000-0000-0000-0000-000000000015');

-- ===== the ledger matches every balance =====
SELECT count(*) AS ledger_mismatches FROM billing.verify_ledger();
ROLLBACK;
SET client_min_messages = warning;
DROP SCHEMA tests CASCADE;
RESET client_min_messages;
