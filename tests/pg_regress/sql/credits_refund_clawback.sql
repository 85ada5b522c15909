-- refund_credits and clawback_credits_from_transaction (SPEC 4): refunds go to the purchased
-- pool; a clawback reverses a purchase at most once, reporting any shortfall.
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

-- ===== refund_credits =====
-- unknown account: P0002, no account created
SELECT tests.err($$SELECT billing.refund_credits('00000000-0000-0000-0000-000000000039', 5)$$);
SELECT tests.bal('00000000-0000-0000-0000-000000000039');
-- user 31: 10 subscription credits; a refund goes to the purchased pool
SELECT billing.add_subscription_credits('00000000-0000-0000-0000-000000000031', 10) ->> 'total_balance' AS total;
INSERT INTO res SELECT 'refund_1', billing.refund_credits('00000000-0000-0000-0000-000000000031', 4, 'failed upscale', 'job-7')
RETURNING label, r - 'transaction_id' AS r;
SELECT t.type, t.pool, t.amount, t.balance_after, t.description, t.reference_id
  FROM billing.credit_transactions AS t
 WHERE t.operation_id = (SELECT (r ->> 'transaction_id')::uuid FROM res WHERE label = 'refund_1');
-- bad arguments: 22023, nothing changes
SELECT tests.err($$SELECT billing.refund_credits(NULL, 4)$$);
SELECT tests.err($$SELECT billing.refund_credits('00000000-0000-0000-0000-000000000031', NULL)$$);
SELECT tests.err($$SELECT billing.refund_credits('00000000-0000-0000-0000-000000000031', 0)$$);
SELECT tests.err($$SELECT billing.refund_credits('00000000-0000-0000-0000-000000000031', -4)$$);
SELECT tests.err($$SELECT billing.refund_credits('00000000-0000-0000-0000-000000000031', 4, repeat('r', 1001))$$);
SELECT tests.err($$SELECT billing.refund_credits('00000000-0000-0000-0000-000000000031', 4, NULL, repeat('r', 256))$$);
SELECT tests.err($$SELECT billing.refund_credits('00000000-0000-0000-0000-000000000031', 4, NULL, NULL, repeat('k', 256))$$);
SELECT tests.bal('00000000-0000-0000-0000-000000000031');
-- idempotency
INSERT INTO res SELECT 'refund_key', billing.refund_credits('00000000-0000-0000-0000-000000000031', 6, 'outage', 'job-8', 'refund-job-8')
RETURNING label, r - 'transaction_id' AS r;
SELECT billing.refund_credits('00000000-0000-0000-0000-000000000031', 6, 'outage', 'job-8', 'refund-job-8')
       = (SELECT r FROM res WHERE label = 'refund_key') AS identical_json;
SELECT tests.err($$SELECT billing.refund_credits('00000000-0000-0000-0000-000000000031', 7, 'outage', 'job-8', 'refund-job-8')$$);
SELECT tests.err($$SELECT billing.refund_credits('00000000-0000-0000-0000-000000000031', 6, 'other', 'job-8', 'refund-job-8')$$);
SELECT tests.err($$SELECT billing.add_purchased_credits('00000000-0000-0000-0000-000000000031', 6, 'outage', 'job-8', 'refund-job-8')$$);
SELECT tests.bal('00000000-0000-0000-0000-000000000031');
-- an idempotent refund to an unknown account is P0002 too, and does not use up its key
SELECT tests.err($$SELECT billing.refund_credits('00000000-0000-0000-0000-000000000039', 5, NULL, NULL, 'refund-x')$$);
SELECT count(*) AS stored_keys FROM billing.idempotency_keys WHERE user_id = '00000000-0000-0000-0000-000000000039';

-- ===== clawback_credits_from_transaction =====
-- user 32: purchases A (30) and B (20), then 100 subscription credits
INSERT INTO res SELECT 'buy_a', billing.add_purchased_credits('00000000-0000-0000-0000-000000000032', 30, 'pack A')
RETURNING label, r - 'transaction_id' AS r;
INSERT INTO res SELECT 'buy_b', billing.add_purchased_credits('00000000-0000-0000-0000-000000000032', 20, 'pack B')
RETURNING label, r - 'transaction_id' AS r;
SELECT billing.add_subscription_credits('00000000-0000-0000-0000-000000000032', 100) ->> 'total_balance' AS total;
-- use all 100 subscription credits and 10 purchased: 0 + 40 left
INSERT INTO res SELECT 'use', billing.consume_credits_v2('00000000-0000-0000-0000-000000000032', 110)
RETURNING label, r - 'transaction_id' AS r;

-- full clawback of A: 30 of the 40 purchased credits; subscription pool untouched
SELECT billing.add_subscription_credits('00000000-0000-0000-0000-000000000032', 8) ->> 'total_balance' AS total;
INSERT INTO res SELECT 'claw_a', billing.clawback_credits_from_transaction((SELECT (r ->> 'transaction_id')::uuid FROM res WHERE label = 'buy_a'), 'chargeback A')
RETURNING label, r - 'transaction_id' - 'original_transaction_id' AS r;
SELECT (SELECT r ->> 'original_transaction_id' FROM res WHERE label = 'claw_a')
     = (SELECT r ->> 'transaction_id' FROM res WHERE label = 'buy_a') AS original_is_purchase;
SELECT tests.bal('00000000-0000-0000-0000-000000000032');
-- its ledger row: type clawback, purchased pool, reference = the purchase's transaction_id
SELECT t.type, t.pool, t.amount, t.balance_after, t.description,
       t.reference_id = (SELECT r ->> 'transaction_id' FROM res WHERE label = 'buy_a') AS references_purchase
  FROM billing.credit_transactions AS t
 WHERE t.operation_id = (SELECT (r ->> 'transaction_id')::uuid FROM res WHERE label = 'claw_a');

-- a second call returns the first result with already_clawed_back = true and changes nothing
INSERT INTO res SELECT 'claw_a_again', billing.clawback_credits_from_transaction((SELECT (r ->> 'transaction_id')::uuid FROM res WHERE label = 'buy_a'), 'chargeback A')
RETURNING label, r - 'transaction_id' - 'original_transaction_id' AS r;
SELECT (SELECT r - 'already_clawed_back' FROM res WHERE label = 'claw_a_again')
     = (SELECT r - 'already_clawed_back' FROM res WHERE label = 'claw_a') AS same_result;
-- also with another reason
SELECT billing.clawback_credits_from_transaction((SELECT (r ->> 'transaction_id')::uuid FROM res WHERE label = 'buy_a'), 'again')
       - 'transaction_id' - 'original_transaction_id' AS r;
SELECT tests.bal('00000000-0000-0000-0000-000000000032');

-- partial clawback of B (20) with only 10 purchased credits left: 10 taken, shortfall 10
INSERT INTO res SELECT 'claw_b', billing.clawback_credits_from_transaction((SELECT (r ->> 'transaction_id')::uuid FROM res WHERE label = 'buy_b'))
RETURNING label, r - 'transaction_id' - 'original_transaction_id' AS r;
SELECT tests.bal('00000000-0000-0000-0000-000000000032');
SELECT billing.clawback_credits_from_transaction((SELECT (r ->> 'transaction_id')::uuid FROM res WHERE label = 'buy_b'))
       - 'transaction_id' - 'original_transaction_id' AS r;
SELECT tests.bal('00000000-0000-0000-0000-000000000032');

-- purchase C (5), all of it used: nothing left to take, shortfall 5, no ledger row
INSERT INTO res SELECT 'buy_c', billing.add_purchased_credits('00000000-0000-0000-0000-000000000032', 5, 'pack C')
RETURNING label, r - 'transaction_id' AS r;
SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000000032', 13) ->> 'total_balance' AS total;
INSERT INTO res SELECT 'claw_c', billing.clawback_credits_from_transaction((SELECT (r ->> 'transaction_id')::uuid FROM res WHERE label = 'buy_c'))
RETURNING label, r - 'original_transaction_id' AS r;
SELECT tests.bal('00000000-0000-0000-0000-000000000032');

-- every clawback ledger row of user 32
SELECT type, pool, amount, balance_after, description FROM billing.credit_transactions
 WHERE user_id = '00000000-0000-0000-0000-000000000032' AND type = 'clawback' ORDER BY id;

-- errors: unknown id (P0002), NULL (22023), not a purchase (22023), reason too long (22023)
SELECT tests.err($$SELECT billing.clawback_credits_from_transaction('00000000-0000-0000-0000-0000000000ff')$$);
SELECT tests.err($$SELECT billing.clawback_credits_from_transaction(NULL)$$);
SELECT tests.err(format('SELECT billing.clawback_credits_from_transaction(%L)', (SELECT r ->> 'transaction_id' FROM res WHERE label = 'use')));
SELECT tests.err(format('SELECT billing.clawback_credits_from_transaction(%L)', (SELECT r ->> 'transaction_id' FROM res WHERE label = 'refund_1')));
INSERT INTO res SELECT 'grant_sub', billing.add_subscription_credits('00000000-0000-0000-0000-000000000032', 3)
RETURNING label, r - 'transaction_id' AS r;
SELECT tests.err(format('SELECT billing.clawback_credits_from_transaction(%L)', (SELECT r ->> 'transaction_id' FROM res WHERE label = 'grant_sub')));
SELECT tests.err(format('SELECT billing.clawback_credits_from_transaction(%L)', (SELECT r ->> 'transaction_id' FROM res WHERE label = 'claw_a')));
SELECT billing.add_purchased_credits('00000000-0000-0000-0000-000000000032', 9) ->> 'total_balance' AS total;
INSERT INTO res SELECT 'buy_d', billing.add_purchased_credits('00000000-0000-0000-0000-000000000032', 4, 'pack D')
RETURNING label, r - 'transaction_id' AS r;
SELECT tests.err(format('SELECT billing.clawback_credits_from_transaction(%L, %L)', (SELECT r ->> 'transaction_id' FROM res WHERE label = 'buy_d'), repeat('r', 1001)));
SELECT tests.bal('00000000-0000-0000-0000-000000000032');
-- a failed clawback did not mark the purchase as clawed back
SELECT billing.clawback_credits_from_transaction((SELECT (r ->> 'transaction_id')::uuid FROM res WHERE label = 'buy_d'), 'chargeback D')
       - 'transaction_id' - 'original_transaction_id' AS r;
SELECT tests.bal('00000000-0000-0000-0000-000000000032');

-- ===== the ledger matches every balance =====
SELECT count(*) AS ledger_mismatches FROM billing.verify_ledger();
ROLLBACK;
SET client_min_messages = warning;
DROP SCHEMA tests CASCADE;
RESET client_min_messages;
