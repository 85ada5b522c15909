-- consume_credits_v2 and decrement_credits_with_log (SPEC 4): FIFO split, PT402, P0002,
-- argument checks (22023) and idempotency keys (replay, PT409, empty key = no key).
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

-- ===== FIFO: subscription pool first, then purchased =====
-- user 1: 10 subscription + 5 purchased
SELECT billing.add_subscription_credits('00000000-0000-0000-0000-000000000001', 10) - 'transaction_id' AS r;
SELECT billing.add_purchased_credits('00000000-0000-0000-0000-000000000001', 5) - 'transaction_id' AS r;

-- 4 from the subscription pool only: one ledger row
INSERT INTO res SELECT 'c_sub_only', billing.consume_credits_v2('00000000-0000-0000-0000-000000000001', 4, 'first', 'ref-1')
RETURNING label, r - 'transaction_id' AS r;
-- exact boundary: exactly what is left in the subscription pool (6), purchased untouched
INSERT INTO res SELECT 'c_sub_exact', billing.consume_credits_v2('00000000-0000-0000-0000-000000000001', 6)
RETURNING label, r - 'transaction_id' AS r;
SELECT tests.bal('00000000-0000-0000-0000-000000000001');
-- refill the subscription pool, then a split: 10 from subscription + 2 from purchased
SELECT billing.add_subscription_credits('00000000-0000-0000-0000-000000000001', 10) ->> 'total_balance' AS total;
INSERT INTO res SELECT 'c_split', billing.consume_credits_v2('00000000-0000-0000-0000-000000000001', 12, 'split', 'ref-2')
RETURNING label, r - 'transaction_id' AS r;
-- purchased pool only (subscription is empty), exactly the whole remaining total
INSERT INTO res SELECT 'c_pur_exact', billing.consume_credits_v2('00000000-0000-0000-0000-000000000001', 3)
RETURNING label, r - 'transaction_id' AS r;
SELECT tests.bal('00000000-0000-0000-0000-000000000001');

-- every result's transaction_id is the operation_id of exactly the ledger rows it wrote
-- (one row per pool touched, amounts negative, balance_after per pool)
SELECT res.label, t.type, t.pool, t.amount, t.balance_after, t.description, t.reference_id, t.idempotency_key
  FROM res JOIN billing.credit_transactions AS t ON t.operation_id = (res.r ->> 'transaction_id')::uuid
 ORDER BY t.id;
SELECT count(DISTINCT r ->> 'transaction_id') AS distinct_ids, count(*) AS calls FROM res;

-- ===== PT402: not enough credits, nothing changes =====
-- empty account (exists, balance 0)
SELECT tests.err($$SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000000001', 1)$$);
SELECT tests.bal('00000000-0000-0000-0000-000000000001');
-- user 2: 5 + 5; one more than the total fails and changes neither pool
SELECT billing.add_subscription_credits('00000000-0000-0000-0000-000000000002', 5) ->> 'total_balance' AS total;
SELECT billing.add_purchased_credits('00000000-0000-0000-0000-000000000002', 5) ->> 'total_balance' AS total;
SELECT tests.err($$SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000000002', 11)$$);
SELECT tests.err($$SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000000002', 2147483647)$$);
SELECT tests.err($$SELECT billing.decrement_credits_with_log('00000000-0000-0000-0000-000000000002', 11)$$);
SELECT tests.bal('00000000-0000-0000-0000-000000000002');
-- exactly the total: both pools emptied, never negative
INSERT INTO res SELECT 'c_total_exact', billing.consume_credits_v2('00000000-0000-0000-0000-000000000002', 10)
RETURNING label, r - 'transaction_id' AS r;
SELECT tests.bal('00000000-0000-0000-0000-000000000002');

-- ===== P0002: unknown account (no account is created) =====
SELECT tests.err($$SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000000009', 1)$$);
SELECT tests.err($$SELECT billing.decrement_credits_with_log('00000000-0000-0000-0000-000000000009', 1)$$);
SELECT count(*) AS accounts_of_unknown_user FROM billing.accounts WHERE user_id = '00000000-0000-0000-0000-000000000009';

-- ===== 22023: bad arguments =====
SELECT tests.err($$SELECT billing.consume_credits_v2(NULL, 1)$$);
SELECT tests.err($$SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000000002', NULL)$$);
SELECT tests.err($$SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000000002', 0)$$);
SELECT tests.err($$SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000000002', -5)$$);
SELECT tests.err($$SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000000009', 0)$$);
SELECT tests.err($$SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000000002', 1, repeat('d', 1001))$$);
SELECT tests.err($$SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000000002', 1, NULL, repeat('r', 256))$$);
SELECT tests.err($$SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000000002', 1, NULL, NULL, repeat('k', 256))$$);
SELECT tests.err($$SELECT billing.decrement_credits_with_log(NULL, 1)$$);
SELECT tests.err($$SELECT billing.decrement_credits_with_log('00000000-0000-0000-0000-000000000002', NULL)$$);
SELECT tests.err($$SELECT billing.decrement_credits_with_log('00000000-0000-0000-0000-000000000002', 0)$$);
SELECT tests.err($$SELECT billing.decrement_credits_with_log('00000000-0000-0000-0000-000000000002', -1)$$);
SELECT tests.err($$SELECT billing.decrement_credits_with_log('00000000-0000-0000-0000-000000000002', 1, 'Usage')$$);
SELECT tests.err($$SELECT billing.decrement_credits_with_log('00000000-0000-0000-0000-000000000002', 1, 'usage; drop table x')$$);
SELECT tests.err($$SELECT billing.decrement_credits_with_log('00000000-0000-0000-0000-000000000002', 1, 'usage', repeat('d', 1001))$$);
SELECT tests.err($$SELECT billing.decrement_credits_with_log('00000000-0000-0000-0000-000000000002', 1, 'usage', NULL, repeat('r', 256))$$);
-- the longest accepted texts: 1000-character description (counted in characters), 255-character reference and key
SELECT billing.add_purchased_credits('00000000-0000-0000-0000-000000000002', 10) ->> 'total_balance' AS total;
SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000000002', 1, repeat('é', 1000), repeat('r', 255), repeat('k', 255)) ->> 'total_balance' AS total;
SELECT length(description), length(reference_id), length(idempotency_key)
  FROM billing.credit_transactions WHERE user_id = '00000000-0000-0000-0000-000000000002' AND amount = -1;
SELECT tests.bal('00000000-0000-0000-0000-000000000002');

-- ===== decrement_credits_with_log: legacy FIFO alias returning the new total =====
-- user 3: 3 subscription + 4 purchased
SELECT billing.add_subscription_credits('00000000-0000-0000-0000-000000000003', 3) ->> 'total_balance' AS total;
SELECT billing.add_purchased_credits('00000000-0000-0000-0000-000000000003', 4) ->> 'total_balance' AS total;
SELECT billing.decrement_credits_with_log('00000000-0000-0000-0000-000000000003', 2);
SELECT billing.decrement_credits_with_log('00000000-0000-0000-0000-000000000003', 1, 'generation', 'exact boundary', 'img-1');
SELECT billing.decrement_credits_with_log('00000000-0000-0000-0000-000000000003', 3, 'generation');
SELECT tests.err($$SELECT billing.decrement_credits_with_log('00000000-0000-0000-0000-000000000003', 2)$$);
SELECT billing.decrement_credits_with_log('00000000-0000-0000-0000-000000000003', 1);
SELECT type, pool, amount, balance_after, description, reference_id
  FROM billing.credit_transactions WHERE user_id = '00000000-0000-0000-0000-000000000003' ORDER BY id;

-- ===== idempotency =====
-- user 4: 20 subscription credits
SELECT billing.add_subscription_credits('00000000-0000-0000-0000-000000000004', 20) ->> 'total_balance' AS total;
INSERT INTO res SELECT 'k1_first', billing.consume_credits_v2('00000000-0000-0000-0000-000000000004', 3, 'desc', 'ref', 'key-1')
RETURNING label, r - 'transaction_id' AS r;
SELECT tests.bal('00000000-0000-0000-0000-000000000004');
-- same key, same arguments: the identical JSON (same transaction_id), nothing changes
INSERT INTO res SELECT 'k1_repeat', billing.consume_credits_v2('00000000-0000-0000-0000-000000000004', 3, 'desc', 'ref', 'key-1')
RETURNING label, r - 'transaction_id' AS r;
SELECT (SELECT r FROM res WHERE label = 'k1_first') = (SELECT r FROM res WHERE label = 'k1_repeat') AS identical_json;
SELECT tests.bal('00000000-0000-0000-0000-000000000004');
-- the replay is the first result even after the balance moved on
SELECT billing.add_subscription_credits('00000000-0000-0000-0000-000000000004', 100) ->> 'total_balance' AS total;
SELECT (billing.consume_credits_v2('00000000-0000-0000-0000-000000000004', 3, 'desc', 'ref', 'key-1')
        = (SELECT r FROM res WHERE label = 'k1_first')) AS identical_json_later;
SELECT tests.bal('00000000-0000-0000-0000-000000000004');
-- same key with other arguments: PT409, nothing changes
SELECT tests.err($$SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000000004', 4, 'desc', 'ref', 'key-1')$$);
SELECT tests.err($$SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000000004', 3, 'other', 'ref', 'key-1')$$);
SELECT tests.err($$SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000000004', 3, 'desc', NULL, 'key-1')$$);
SELECT tests.err($$SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000000004', 3, NULL, 'ref', 'key-1')$$);
-- same key used by another function: PT409 both ways
SELECT tests.err($$SELECT billing.add_purchased_credits('00000000-0000-0000-0000-000000000004', 3, 'desc', 'ref', 'key-1')$$);
SELECT billing.add_purchased_credits('00000000-0000-0000-0000-000000000004', 7, NULL, NULL, 'key-buy') ->> 'total_balance' AS total;
SELECT tests.err($$SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000000004', 7, NULL, NULL, 'key-buy')$$);
SELECT tests.bal('00000000-0000-0000-0000-000000000004');
-- the key is stored on the ledger rows of the first call only
SELECT idempotency_key, count(*) FROM billing.credit_transactions
 WHERE user_id = '00000000-0000-0000-0000-000000000004' GROUP BY 1 ORDER BY 1;
-- a failed call (PT402) does not use up its key: after a top-up the same key applies
SELECT tests.err($$SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000000004', 500, NULL, NULL, 'key-big')$$);
SELECT tests.bal('00000000-0000-0000-0000-000000000004');
SELECT billing.add_purchased_credits('00000000-0000-0000-0000-000000000004', 400) ->> 'total_balance' AS total;
SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000000004', 500, NULL, NULL, 'key-big') - 'transaction_id' AS r;
SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000000004', 500, NULL, NULL, 'key-big') - 'transaction_id' AS replay;
SELECT tests.bal('00000000-0000-0000-0000-000000000004');
-- empty-string key = no key: both calls apply, no key is stored
INSERT INTO res SELECT 'empty_1', billing.consume_credits_v2('00000000-0000-0000-0000-000000000004', 1, NULL, NULL, '')
RETURNING label, r - 'transaction_id' AS r;
INSERT INTO res SELECT 'empty_2', billing.consume_credits_v2('00000000-0000-0000-0000-000000000004', 1, NULL, NULL, '')
RETURNING label, r - 'transaction_id' AS r;
SELECT (SELECT r ->> 'transaction_id' FROM res WHERE label = 'empty_1')
    <> (SELECT r ->> 'transaction_id' FROM res WHERE label = 'empty_2') AS different_operations;
SELECT count(*) AS rows_with_empty_key FROM billing.credit_transactions WHERE idempotency_key = '';
SELECT count(*) AS stored_empty_keys FROM billing.idempotency_keys WHERE idempotency_key = '';
SELECT tests.bal('00000000-0000-0000-0000-000000000004');

-- ===== the ledger matches every balance =====
SELECT count(*) AS ledger_mismatches FROM billing.verify_ledger();
ROLLBACK;
SET client_min_messages = warning;
DROP SCHEMA tests CASCADE;
RESET client_min_messages;
