-- expire_subscription_credits and renew_subscription_credits (SPEC 4): only the subscription
-- pool expires, billing.credit_expiration_events, zero-balance no-op, P0002, idempotency.
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

-- ===== expire_subscription_credits =====
-- unknown account: P0002, nothing created
SELECT tests.err($$SELECT billing.expire_subscription_credits('00000000-0000-0000-0000-000000000029')$$);
SELECT tests.bal('00000000-0000-0000-0000-000000000029');
-- bad arguments: 22023
SELECT tests.err($$SELECT billing.expire_subscription_credits(NULL)$$);
SELECT tests.err($$SELECT billing.expire_subscription_credits('00000000-0000-0000-0000-000000000021', repeat('d', 1001))$$);
SELECT tests.err($$SELECT billing.expire_subscription_credits('00000000-0000-0000-0000-000000000021', NULL, repeat('k', 256))$$);

-- user 21: 30 subscription + 5 purchased
SELECT billing.add_subscription_credits('00000000-0000-0000-0000-000000000021', 30) ->> 'total_balance' AS total;
SELECT billing.add_purchased_credits('00000000-0000-0000-0000-000000000021', 5) ->> 'total_balance' AS total;
INSERT INTO res SELECT 'expire_1', billing.expire_subscription_credits('00000000-0000-0000-0000-000000000021', 'period ended')
RETURNING label, r - 'transaction_id' AS r;
SELECT tests.bal('00000000-0000-0000-0000-000000000021');
-- the expiration's ledger row, under the returned transaction_id
SELECT t.type, t.pool, t.amount, t.balance_after, t.description
  FROM billing.credit_transactions AS t
 WHERE t.operation_id = (SELECT (r ->> 'transaction_id')::uuid FROM res WHERE label = 'expire_1');
-- and one expiration event
SELECT user_id, expired_amount, description FROM billing.credit_expiration_events
 WHERE user_id = '00000000-0000-0000-0000-000000000021' ORDER BY id;

-- zero subscription balance: a no-op, no event, no ledger row, no transaction_id
INSERT INTO res SELECT 'expire_zero', billing.expire_subscription_credits('00000000-0000-0000-0000-000000000021')
RETURNING label, r;
SELECT tests.bal('00000000-0000-0000-0000-000000000021');
SELECT count(*) AS events FROM billing.credit_expiration_events WHERE user_id = '00000000-0000-0000-0000-000000000021';
-- an account with only purchased credits: also a no-op
SELECT billing.add_purchased_credits('00000000-0000-0000-0000-000000000022', 9) ->> 'total_balance' AS total;
SELECT billing.expire_subscription_credits('00000000-0000-0000-0000-000000000022');
SELECT tests.bal('00000000-0000-0000-0000-000000000022');
SELECT count(*) AS events FROM billing.credit_expiration_events WHERE user_id = '00000000-0000-0000-0000-000000000022';

-- idempotency: a repeated expiration with its key does not expire credits granted since
SELECT billing.add_subscription_credits('00000000-0000-0000-0000-000000000022', 40) ->> 'total_balance' AS total;
INSERT INTO res SELECT 'expire_key', billing.expire_subscription_credits('00000000-0000-0000-0000-000000000022', 'cycle 1', 'exp-1')
RETURNING label, r - 'transaction_id' AS r;
SELECT billing.add_subscription_credits('00000000-0000-0000-0000-000000000022', 15) ->> 'total_balance' AS total;
SELECT billing.expire_subscription_credits('00000000-0000-0000-0000-000000000022', 'cycle 1', 'exp-1')
       = (SELECT r FROM res WHERE label = 'expire_key') AS identical_json;
SELECT tests.bal('00000000-0000-0000-0000-000000000022');
SELECT tests.err($$SELECT billing.expire_subscription_credits('00000000-0000-0000-0000-000000000022', 'cycle 2', 'exp-1')$$);
SELECT tests.err($$SELECT billing.add_subscription_credits('00000000-0000-0000-0000-000000000022', 1, NULL, NULL, 'exp-1')$$);
SELECT tests.bal('00000000-0000-0000-0000-000000000022');
SELECT expired_amount, description FROM billing.credit_expiration_events
 WHERE user_id = '00000000-0000-0000-0000-000000000022' ORDER BY id;

-- ===== renew_subscription_credits =====
-- creates the account when missing: a grant, nothing to expire
INSERT INTO res SELECT 'renew_new', billing.renew_subscription_credits('00000000-0000-0000-0000-000000000023', 100, '2030-01-31 00:00:00+00')
RETURNING label, r - 'transaction_id' - 'period_end' AS r, (r ->> 'period_end')::timestamptz = '2030-01-31 00:00:00+00' AS period_end_ok;
SELECT subscription_credits_expire_at = '2030-01-31 00:00:00+00' AS expire_at_set
  FROM billing.accounts WHERE user_id = '00000000-0000-0000-0000-000000000023';
SELECT count(*) AS events FROM billing.credit_expiration_events WHERE user_id = '00000000-0000-0000-0000-000000000023';
-- buy 20, use 30 of the 100: 70 subscription + 20 purchased
SELECT billing.add_purchased_credits('00000000-0000-0000-0000-000000000023', 20) ->> 'total_balance' AS total;
SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000000023', 30) ->> 'total_balance' AS total;
-- renewal: the 70 left expire, 100 granted, purchased credits kept
INSERT INTO res SELECT 'renew_2', billing.renew_subscription_credits('00000000-0000-0000-0000-000000000023', 100, '2030-02-28 00:00:00+00')
RETURNING label, r - 'transaction_id' - 'period_end' AS r, (r ->> 'period_end')::timestamptz = '2030-02-28 00:00:00+00' AS period_end_ok;
SELECT tests.bal('00000000-0000-0000-0000-000000000023');
SELECT subscription_credits_expire_at = '2030-02-28 00:00:00+00' AS expire_at_set
  FROM billing.accounts WHERE user_id = '00000000-0000-0000-0000-000000000023';
-- one operation: expiration then grant, both under the returned transaction_id
SELECT res.label, t.type, t.pool, t.amount, t.balance_after
  FROM res JOIN billing.credit_transactions AS t ON t.operation_id = (res.r ->> 'transaction_id')::uuid
 WHERE res.label LIKE 'renew%' ORDER BY t.id;
SELECT expired_amount FROM billing.credit_expiration_events
 WHERE user_id = '00000000-0000-0000-0000-000000000023' ORDER BY id;
-- renewing with a smaller amount after everything was used: nothing expires
SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000000023', 120) ->> 'total_balance' AS total;
INSERT INTO res SELECT 'renew_3', billing.renew_subscription_credits('00000000-0000-0000-0000-000000000023', 10)
RETURNING label, r - 'transaction_id' - 'period_end' AS r, r ->> 'period_end' AS period_end;
SELECT count(*) AS events FROM billing.credit_expiration_events WHERE user_id = '00000000-0000-0000-0000-000000000023';
SELECT tests.bal('00000000-0000-0000-0000-000000000023');

-- bad arguments: 22023, nothing changes
SELECT tests.err($$SELECT billing.renew_subscription_credits(NULL, 10)$$);
SELECT tests.err($$SELECT billing.renew_subscription_credits('00000000-0000-0000-0000-000000000023', NULL)$$);
SELECT tests.err($$SELECT billing.renew_subscription_credits('00000000-0000-0000-0000-000000000023', 0)$$);
SELECT tests.err($$SELECT billing.renew_subscription_credits('00000000-0000-0000-0000-000000000023', -10)$$);
SELECT tests.err($$SELECT billing.renew_subscription_credits('00000000-0000-0000-0000-000000000023', 10, NULL, repeat('k', 256))$$);
SELECT tests.err($$SELECT billing.renew_subscription_credits('00000000-0000-0000-0000-000000000028', 0)$$);
SELECT tests.bal('00000000-0000-0000-0000-000000000023');
SELECT tests.bal('00000000-0000-0000-0000-000000000028');

-- idempotency: the renewal webhook delivered twice applies once
SELECT billing.add_subscription_credits('00000000-0000-0000-0000-000000000024', 8) ->> 'total_balance' AS total;
SELECT billing.add_purchased_credits('00000000-0000-0000-0000-000000000024', 3) ->> 'total_balance' AS total;
INSERT INTO res SELECT 'renew_key', billing.renew_subscription_credits('00000000-0000-0000-0000-000000000024', 50, '2030-03-31 00:00:00+00', 'inv-2030-03')
RETURNING label, r - 'transaction_id' - 'period_end' AS r, (r ->> 'period_end')::timestamptz = '2030-03-31 00:00:00+00' AS period_end_ok;
SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000000024', 5) ->> 'total_balance' AS total;
SELECT billing.renew_subscription_credits('00000000-0000-0000-0000-000000000024', 50, '2030-03-31 00:00:00+00', 'inv-2030-03')
       = (SELECT r FROM res WHERE label = 'renew_key') AS identical_json;
SELECT tests.bal('00000000-0000-0000-0000-000000000024');
-- the same instant in another session TimeZone or DateStyle, or written with another offset, is the
-- same argument: a replay ('no error'), nothing changes
SET LOCAL TimeZone = 'America/New_York';
SELECT tests.err($$SELECT billing.renew_subscription_credits('00000000-0000-0000-0000-000000000024', 50, '2030-03-31 00:00:00+00', 'inv-2030-03')$$);
SET LOCAL TimeZone = 'UTC';
SET LOCAL DateStyle = 'Postgres, MDY';
SELECT tests.err($$SELECT billing.renew_subscription_credits('00000000-0000-0000-0000-000000000024', 50, '2030-03-31 00:00:00+00', 'inv-2030-03')$$);
SET LOCAL DateStyle = 'ISO, YMD';
SELECT tests.err($$SELECT billing.renew_subscription_credits('00000000-0000-0000-0000-000000000024', 50, '2030-03-30 20:00:00-04', 'inv-2030-03')$$);
SELECT tests.bal('00000000-0000-0000-0000-000000000024');
-- other arguments with the key: PT409, nothing changes
SELECT tests.err($$SELECT billing.renew_subscription_credits('00000000-0000-0000-0000-000000000024', 51, '2030-03-31 00:00:00+00', 'inv-2030-03')$$);
SELECT tests.err($$SELECT billing.renew_subscription_credits('00000000-0000-0000-0000-000000000024', 50, '2030-04-30 00:00:00+00', 'inv-2030-03')$$);
SELECT tests.err($$SELECT billing.renew_subscription_credits('00000000-0000-0000-0000-000000000024', 50, NULL, 'inv-2030-03')$$);
SELECT tests.err($$SELECT billing.expire_subscription_credits('00000000-0000-0000-0000-000000000024', NULL, 'inv-2030-03')$$);
SELECT tests.bal('00000000-0000-0000-0000-000000000024');
SELECT expired_amount FROM billing.credit_expiration_events
 WHERE user_id = '00000000-0000-0000-0000-000000000024' ORDER BY id;

-- ===== the ledger matches every balance =====
SELECT count(*) AS ledger_mismatches FROM billing.verify_ledger();
ROLLBACK;
SET client_min_messages = warning;
DROP SCHEMA tests CASCADE;
RESET client_min_messages;
