-- get_user_credits, billing.user_credits, get_credit_history (order, p_limit bounds, p_before
-- paging) and billing.verify_ledger (SPEC 4).
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

-- ===== get_user_credits =====
-- unknown user: one row of zeros
SELECT * FROM billing.get_user_credits('00000000-0000-0000-0000-000000000049');
SELECT tests.err($$SELECT * FROM billing.get_user_credits(NULL)$$);
-- user 41: 12 subscription + 5 purchased; user 42: 3 purchased
SELECT billing.add_subscription_credits('00000000-0000-0000-0000-000000000041', 12) ->> 'total_balance' AS total;
SELECT billing.add_purchased_credits('00000000-0000-0000-0000-000000000041', 5) ->> 'total_balance' AS total;
SELECT billing.add_purchased_credits('00000000-0000-0000-0000-000000000042', 3) ->> 'total_balance' AS total;
SELECT * FROM billing.get_user_credits('00000000-0000-0000-0000-000000000041');
SELECT * FROM billing.get_user_credits('00000000-0000-0000-0000-000000000042');

-- ===== billing.user_credits: the same columns =====
SELECT * FROM billing.user_credits
 WHERE user_id IN ('00000000-0000-0000-0000-000000000041', '00000000-0000-0000-0000-000000000042', '00000000-0000-0000-0000-000000000049')
 ORDER BY user_id;
SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute
 WHERE attrelid = 'billing.user_credits'::regclass AND attnum > 0 ORDER BY attnum;
SELECT pg_get_function_result('billing.get_user_credits(uuid)'::regprocedure);

-- ===== get_credit_history =====
-- seven operations for user 43; the ledger rows get distinct, increasing times (all rows of this
-- transaction share now(), so the test sets created_at explicitly)
SELECT billing.add_subscription_credits('00000000-0000-0000-0000-000000000043', 10, 'op1') ->> 'total_balance' AS total;
SELECT billing.add_purchased_credits('00000000-0000-0000-0000-000000000043', 10, 'op2') ->> 'total_balance' AS total;
SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000000043', 3, 'op3') ->> 'total_balance' AS total;
SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000000043', 9, 'op4') ->> 'total_balance' AS total;
SELECT billing.refund_credits('00000000-0000-0000-0000-000000000043', 2, 'op5') ->> 'total_balance' AS total;
SELECT billing.add_subscription_credits('00000000-0000-0000-0000-000000000043', 4, 'op6') ->> 'total_balance' AS total;
SELECT billing.expire_subscription_credits('00000000-0000-0000-0000-000000000043', 'op7') ->> 'total_balance' AS total;
UPDATE billing.credit_transactions AS t
   -- 2030-01-01 00:00 UTC + n hours, with an IMMUTABLE function (Citus takes no STABLE one over columns in an UPDATE)
   SET created_at = pg_catalog.to_timestamp(1893456000 + 3600 * substr(t.description, 3)::integer)
 WHERE t.user_id = '00000000-0000-0000-0000-000000000043';
-- newest first (the two rows of op4 share a time: the later row first)
SELECT description, type, pool, amount, balance_after, created_at
  FROM billing.get_credit_history('00000000-0000-0000-0000-000000000043');
-- the full ledger row type
SELECT pg_get_function_result('billing.get_credit_history(uuid,integer,timestamptz)'::regprocedure);
-- p_limit
SELECT description, pool, amount FROM billing.get_credit_history('00000000-0000-0000-0000-000000000043', 2);
SELECT count(*) FROM billing.get_credit_history('00000000-0000-0000-0000-000000000043', 1);
SELECT count(*) FROM billing.get_credit_history('00000000-0000-0000-0000-000000000043', 1000);
SELECT count(*) FROM billing.get_credit_history('00000000-0000-0000-0000-000000000043', NULL);
SELECT tests.err($$SELECT * FROM billing.get_credit_history('00000000-0000-0000-0000-000000000043', 0)$$);
SELECT tests.err($$SELECT * FROM billing.get_credit_history('00000000-0000-0000-0000-000000000043', 1001)$$);
SELECT tests.err($$SELECT * FROM billing.get_credit_history('00000000-0000-0000-0000-000000000043', -1)$$);
SELECT tests.err($$SELECT * FROM billing.get_credit_history(NULL)$$);
-- p_before: rows strictly older than it, newest first; paging with the oldest time of each page
SELECT description, amount FROM billing.get_credit_history('00000000-0000-0000-0000-000000000043', 2, '2030-01-01 04:00:00+00');
SELECT description, amount FROM billing.get_credit_history('00000000-0000-0000-0000-000000000043', 2, '2030-01-01 03:30:00+00');
SELECT description, amount FROM billing.get_credit_history('00000000-0000-0000-0000-000000000043', 50, '2030-01-01 01:00:00+00');
WITH RECURSIVE pages(page, oldest, n) AS (
    SELECT 1, min(h.created_at), count(*)
      FROM billing.get_credit_history('00000000-0000-0000-0000-000000000043', 3) AS h
    UNION ALL
    SELECT p.page + 1, (SELECT min(h.created_at) FROM billing.get_credit_history('00000000-0000-0000-0000-000000000043', 3, p.oldest) AS h),
           (SELECT count(*) FROM billing.get_credit_history('00000000-0000-0000-0000-000000000043', 3, p.oldest))
      FROM pages AS p WHERE p.n > 0
)
SELECT page, oldest, n FROM pages ORDER BY page;
-- p_limit defaults to 50 (also when NULL)
SELECT count(*) AS grants FROM (SELECT billing.add_subscription_credits('00000000-0000-0000-0000-000000000044', 1)
                                  FROM generate_series(1, 60)) AS g;
SELECT count(*) FROM billing.get_credit_history('00000000-0000-0000-0000-000000000044');
SELECT count(*) FROM billing.get_credit_history('00000000-0000-0000-0000-000000000044', NULL);
SELECT count(*) FROM billing.get_credit_history('00000000-0000-0000-0000-000000000044', 1000);
-- unknown user: no rows; other users' rows never appear
SELECT count(*) FROM billing.get_credit_history('00000000-0000-0000-0000-000000000049');
SELECT DISTINCT user_id FROM billing.get_credit_history('00000000-0000-0000-0000-000000000041');

-- ===== verify_ledger =====
SELECT * FROM billing.verify_ledger();
SELECT * FROM billing.verify_ledger('00000000-0000-0000-0000-000000000043');
-- it finds a balance that differs from its ledger (changed behind the functions' back) ...
UPDATE billing.accounts SET purchased_credits_balance = purchased_credits_balance + 7
 WHERE user_id = '00000000-0000-0000-0000-000000000042';
SELECT * FROM billing.verify_ledger();
SELECT * FROM billing.verify_ledger('00000000-0000-0000-0000-000000000042');
SELECT count(*) FROM billing.verify_ledger('00000000-0000-0000-0000-000000000041');
-- ... and ledger rows without an account
UPDATE billing.accounts SET purchased_credits_balance = purchased_credits_balance - 7
 WHERE user_id = '00000000-0000-0000-0000-000000000042';
INSERT INTO billing.credit_transactions (user_id, operation_id, type, pool, amount, balance_after)
VALUES ('00000000-0000-0000-0000-000000000048', gen_random_uuid(), 'purchase', 'purchased', 4, 4);
SELECT * FROM billing.verify_ledger();
DELETE FROM billing.credit_transactions WHERE user_id = '00000000-0000-0000-0000-000000000048';

-- ===== the ledger matches every balance =====
SELECT count(*) AS ledger_mismatches FROM billing.verify_ledger();
ROLLBACK;
SET client_min_messages = warning;
DROP SCHEMA tests CASCADE;
RESET client_min_messages;
