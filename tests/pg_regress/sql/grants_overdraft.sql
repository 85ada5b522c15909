-- Credit grants (issue 13): overdraft and debt. set_overdraft_limit(L): a debit takes every
-- spendable grant and the rest becomes debt, down to -L and no further (PT402 beyond, nothing
-- changes). The next grant that is effective now and unscoped repays the debt first (its own row,
-- then a 'debt_repayment' row on the grant and one on pool 'debt'); a grant that starts later or
-- is scoped does not.
-- Helpers live in schema tests, not pg_temp: on a Citus cluster a query that calls one may run on a worker.
CREATE SCHEMA tests;
GRANT USAGE ON SCHEMA tests TO PUBLIC;
SET TimeZone = 'UTC';
SET DateStyle = 'ISO, YMD';
-- err(sql): runs sql and returns 'SQLSTATE: message [detail]' instead of failing. Random uuids
-- (not the fixed 00000000-0000-0000-0000-... test users) are masked.
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
-- Grants by label: keep(label, grant_credits result) remembers the grant id and returns the
-- result without its random ids and clock times; l(grant id) is the label ('-' for NULL).
CREATE TEMP TABLE g (label text PRIMARY KEY, id uuid NOT NULL UNIQUE);
CREATE FUNCTION tests.keep(p_label text, r jsonb) RETURNS jsonb LANGUAGE sql AS $f$
    INSERT INTO pg_temp.g VALUES (p_label, (r ->> 'grant_id')::uuid)
    RETURNING r - 'grant_id' - 'transaction_id' - 'effective_at' - 'expires_at'
$f$;
-- name_new(user, label[, category]): labels the user's one grant (of that category) that has no
-- label yet (made by a two-pool function, which returns no grant_id); returns how many it labeled
CREATE FUNCTION tests.name_new(p_user uuid, p_label text, p_category text DEFAULT NULL) RETURNS bigint LANGUAGE plpgsql AS $f$
DECLARE ids uuid[]; n bigint;
BEGIN
    -- the user's grants first (on a Citus cluster, a worker reads them), then the labels
    SELECT array_agg(c.id) INTO ids FROM billing.credit_grants AS c
     WHERE c.user_id = p_user AND (p_category IS NULL OR c.category::text = p_category);
    INSERT INTO pg_temp.g SELECT p_label, x FROM unnest(ids) AS x WHERE x NOT IN (SELECT id FROM pg_temp.g);
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$f$;
CREATE FUNCTION tests.l(p_id uuid) RETURNS text LANGUAGE sql AS $f$
    SELECT CASE WHEN p_id IS NULL THEN '-' ELSE COALESCE((SELECT label FROM pg_temp.g WHERE id = p_id), '?') END
$f$;
-- paid(consume_credits result): which grants paid what, in the result's order
CREATE FUNCTION tests.paid(r jsonb) RETURNS text LANGUAGE sql AS $f$
    SELECT string_agg(tests.l((e ->> 'grant_id')::uuid) || ' ' || (e ->> 'category') || ' ' || (e ->> 'amount'), ', ' ORDER BY n)
      FROM jsonb_array_elements(r -> 'grants') WITH ORDINALITY AS x(e, n)
$f$;
-- grants(user): every grant of the user as stored, by label
CREATE FUNCTION tests.grants(p_user uuid)
RETURNS TABLE (label text, category text, amount bigint, remaining bigint, priority int, scope text[], voided bigint, depleted boolean)
LANGUAGE plpgsql AS $f$
#variable_conflict use_column
DECLARE rs billing.credit_grants[];
BEGIN
-- the rows first (on a Citus cluster, a worker reads them), then the labels
SELECT array_agg(c) INTO rs
      FROM billing.credit_grants AS c WHERE c.user_id = p_user;
FOR label, category, amount, remaining, priority, scope, voided, depleted IN
    SELECT tests.l(c.id), c.category::text, c.amount, c.remaining, c.priority, c.scope, c.voided_amount, c.depleted
      FROM unnest(rs) AS c ORDER BY 1
LOOP RETURN NEXT; END LOOP;
END
$f$;
-- ledger(user): the user's ledger rows in order, the grant by label
CREATE FUNCTION tests.ledger(p_user uuid)
RETURNS TABLE (type text, pool text, amount bigint, balance_after bigint, grant_label text)
LANGUAGE plpgsql AS $f$
#variable_conflict use_column
DECLARE rs billing.credit_transactions[];
BEGIN
-- the rows first (on a Citus cluster, a worker reads them), then the labels
SELECT array_agg(t) INTO rs
      FROM billing.credit_transactions AS t WHERE t.user_id = p_user;
FOR type, pool, amount, balance_after, grant_label IN
    SELECT t.type, t.pool::text, t.amount, t.balance_after, tests.l(t.grant_id)
      FROM unnest(rs) AS t ORDER BY t.id
LOOP RETURN NEXT; END LOOP;
END
$f$;
-- bal(user): stored pools, debt and the number of ledger rows (to show that a failed call changed nothing)
CREATE FUNCTION tests.bal(p_user uuid) RETURNS text LANGUAGE plpgsql AS $f$
BEGIN RETURN (
    SELECT format('sub=%s pur=%s debt=%s ledger_rows=%s',
                  COALESCE(a.subscription_credits_balance::text, '-'),
                  COALESCE(a.purchased_credits_balance::text, '-'),
                  COALESCE(a.debt::text, '-'),
                  (SELECT count(*) FROM billing.credit_transactions AS t WHERE t.user_id = p_user))
      FROM (SELECT 1) AS one LEFT JOIN billing.accounts AS a ON a.user_id = p_user);
END
$f$;
CREATE TEMP TABLE res (label text PRIMARY KEY, r jsonb);
-- op(label): the ledger rows of a result's operation
CREATE FUNCTION tests.op(p_label text)
RETURNS TABLE (type text, pool text, amount bigint, balance_after bigint, grant_label text)
LANGUAGE plpgsql AS $f$
#variable_conflict use_column
DECLARE rs billing.credit_transactions[];
BEGIN
-- the rows first (on a Citus cluster, a worker reads them), then the labels
SELECT array_agg(t) INTO rs
      FROM billing.credit_transactions AS t
     WHERE t.operation_id = (SELECT (r ->> 'transaction_id')::uuid FROM pg_temp.res WHERE label = p_label);
FOR type, pool, amount, balance_after, grant_label IN
    SELECT t.type, t.pool::text, t.amount, t.balance_after, tests.l(t.grant_id)
      FROM unnest(rs) AS t
     ORDER BY t.id
LOOP RETURN NEXT; END LOOP;
END
$f$;

-- ===== the default limit is 0: PT402 as before =====
SELECT tests.keep('d_a', billing.grant_credits('00000000-0000-0000-0000-000000130060', 10, 'purchased')) AS r;
SELECT overdraft_limit, debt FROM billing.accounts WHERE user_id = '00000000-0000-0000-0000-000000130060';
SELECT tests.err($$SELECT billing.consume_credits('00000000-0000-0000-0000-000000130060', 11)$$);
SELECT tests.bal('00000000-0000-0000-0000-000000130060');

-- ===== a limit of 5: down to -5 and no further =====
SELECT billing.set_overdraft_limit('00000000-0000-0000-0000-000000130060', 5) - 'user_id' AS r;
-- 14: the grant's 10, then 4 of debt
INSERT INTO res SELECT 'debit_14', billing.consume_credits('00000000-0000-0000-0000-000000130060', 14, NULL, 'into debt')
RETURNING label, tests.paid(r) AS paid, r - 'transaction_id' - 'grants' AS r;
SELECT * FROM tests.op('debit_14');
SELECT tests.bal('00000000-0000-0000-0000-000000130060');
-- 2 more would make the debt 6 > 5: PT402, nothing changes
SELECT tests.err($$SELECT billing.consume_credits('00000000-0000-0000-0000-000000130060', 2)$$);
SELECT tests.err($$SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000130060', 2)$$);
SELECT tests.err($$SELECT billing.decrement_credits_with_log('00000000-0000-0000-0000-000000130060', 2)$$);
SELECT tests.bal('00000000-0000-0000-0000-000000130060');
-- exactly to the limit through the two-pool function: debt 5, total -5
INSERT INTO res SELECT 'v2_1', billing.consume_credits_v2('00000000-0000-0000-0000-000000130060', 1)
RETURNING label, r - 'transaction_id' AS r;
SELECT * FROM tests.op('v2_1');
SELECT tests.err($$SELECT billing.consume_credits('00000000-0000-0000-0000-000000130060', 1)$$);
SELECT * FROM billing.get_user_credits('00000000-0000-0000-0000-000000130060');
SELECT total_balance, available FROM billing.user_credits WHERE user_id = '00000000-0000-0000-0000-000000130060';
-- lowering the limit below the debt is allowed; the debt stays, no new overdraft
SELECT billing.set_overdraft_limit('00000000-0000-0000-0000-000000130060', 2) - 'user_id' AS r;
SELECT tests.err($$SELECT billing.consume_credits('00000000-0000-0000-0000-000000130060', 1)$$);
-- bad limits: 22023, nothing changes
SELECT tests.err($$SELECT billing.set_overdraft_limit('00000000-0000-0000-0000-000000130060', -1)$$);
SELECT tests.err($$SELECT billing.set_overdraft_limit('00000000-0000-0000-0000-000000130060', NULL)$$);
SELECT tests.err($$SELECT billing.set_overdraft_limit(NULL, 5)$$);
SELECT overdraft_limit, debt FROM billing.accounts WHERE user_id = '00000000-0000-0000-0000-000000130060';

-- ===== repayment: only a grant effective now and unscoped repays =====
SELECT now() + interval '1 day' AS tomorrow \gset
-- starts tomorrow: no repayment
SELECT tests.keep('d_tomorrow', billing.grant_credits('00000000-0000-0000-0000-000000130060', 3, 'promotional', p_effective_at => :'tomorrow')) AS r;
-- scoped: no repayment, but it pays for its feature without adding debt
SELECT tests.keep('d_image', billing.grant_credits('00000000-0000-0000-0000-000000130060', 3, 'promotional', p_scope => ARRAY['image'])) AS r;
INSERT INTO res SELECT 'image_2', billing.consume_credits('00000000-0000-0000-0000-000000130060', 2, 'image')
RETURNING label, tests.paid(r) AS paid, r ->> 'debt_added' AS debt_added, r ->> 'debt' AS debt, r ->> 'available' AS available;
SELECT tests.bal('00000000-0000-0000-0000-000000130060');
-- unscoped, effective now: the debt (5) is repaid first, 3 of the 8 remain
INSERT INTO res SELECT 'repay', billing.grant_credits('00000000-0000-0000-0000-000000130060', 8, 'purchased')
RETURNING label, tests.keep('d_repay', r) AS r;
SELECT * FROM tests.op('repay');
SELECT * FROM tests.grants('00000000-0000-0000-0000-000000130060');
SELECT tests.bal('00000000-0000-0000-0000-000000130060');
SELECT total_balance, available FROM billing.get_user_credits('00000000-0000-0000-0000-000000130060');
-- the repaid grant's rest pays as usual; no debt left to repay by the next grant
SELECT tests.paid(billing.consume_credits('00000000-0000-0000-0000-000000130060', 3)) AS paid;
SELECT tests.keep('d_after', billing.grant_credits('00000000-0000-0000-0000-000000130060', 1, 'promotional')) ->> 'debt_repaid' AS debt_repaid;
SELECT * FROM tests.ledger('00000000-0000-0000-0000-000000130060');

-- ===== the two-pool grants repay too, partly when smaller than the debt =====
SELECT billing.set_overdraft_limit('00000000-0000-0000-0000-000000130061', 10) - 'user_id' AS r;
SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000130061', 6) - 'transaction_id' AS r;
SELECT billing.add_purchased_credits('00000000-0000-0000-0000-000000130061', 4) - 'transaction_id' AS r;
SELECT tests.name_new('00000000-0000-0000-0000-000000130061', 'd61_purchase') AS labeled;
SELECT tests.bal('00000000-0000-0000-0000-000000130061');
SELECT billing.add_subscription_credits('00000000-0000-0000-0000-000000130061', 5) - 'transaction_id' AS r;
SELECT tests.name_new('00000000-0000-0000-0000-000000130061', 'd61_subscription') AS labeled;
SELECT tests.bal('00000000-0000-0000-0000-000000130061');
SELECT * FROM tests.ledger('00000000-0000-0000-0000-000000130061');

-- ===== credits and debt together: all of the credits or nothing =====
SELECT billing.set_overdraft_limit('00000000-0000-0000-0000-000000130062', 3) - 'user_id' AS r;
SELECT tests.keep('d62', billing.grant_credits('00000000-0000-0000-0000-000000130062', 5, 'purchased')) AS r;
-- 9 = 5 + 4 of debt > 3: PT402, the grant is not touched
SELECT tests.err($$SELECT billing.consume_credits('00000000-0000-0000-0000-000000130062', 9)$$);
SELECT * FROM tests.grants('00000000-0000-0000-0000-000000130062');
-- 8 = 5 + 3: exactly the limit
SELECT tests.paid(r) AS paid, r ->> 'debt_added' AS debt_added, r ->> 'total_balance' AS total
  FROM billing.consume_credits('00000000-0000-0000-0000-000000130062', 8) AS r;
SELECT tests.err($$SELECT billing.consume_credits('00000000-0000-0000-0000-000000130062', 1)$$);
-- an idempotent replay of a debit into debt adds no second debt
SELECT billing.set_overdraft_limit('00000000-0000-0000-0000-000000130062', 10) - 'user_id' AS r;
INSERT INTO res SELECT 'debt_key', billing.consume_credits('00000000-0000-0000-0000-000000130062', 2, NULL, NULL, NULL, 'debt-key')
RETURNING label, r - 'transaction_id' - 'grants' AS r;
SELECT billing.consume_credits('00000000-0000-0000-0000-000000130062', 2, NULL, NULL, NULL, 'debt-key') = (SELECT r FROM res WHERE label = 'debt_key') AS identical_json;
SELECT tests.bal('00000000-0000-0000-0000-000000130062');
-- ===== credits the debit cannot use (scoped, starting later) do not widen the overdraft =====
-- user 63: limit 5, 10 image-only credits and 10 that start tomorrow; the stored pool holds 20
SELECT billing.set_overdraft_limit('00000000-0000-0000-0000-000000130063', 5) - 'user_id' AS r;
SELECT tests.keep('d63_image', billing.grant_credits('00000000-0000-0000-0000-000000130063', 10, 'promotional', p_scope => ARRAY['image'])) ->> 'available' AS available;
SELECT tests.keep('d63_tomorrow', billing.grant_credits('00000000-0000-0000-0000-000000130063', 10, 'purchased', p_effective_at => :'tomorrow')) ->> 'available' AS available;
-- 6 without a feature: all of it would be debt, 6 > 5: PT402, nothing changes
SELECT tests.err($$SELECT billing.consume_credits('00000000-0000-0000-0000-000000130063', 6)$$);
SELECT tests.err($$SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000130063', 6)$$);
SELECT tests.bal('00000000-0000-0000-0000-000000130063');
-- 5: exactly the limit, the other grants untouched
SELECT tests.paid(r) AS paid, r ->> 'debt_added' AS debt_added, r ->> 'debt' AS debt, r ->> 'available' AS available
  FROM billing.consume_credits('00000000-0000-0000-0000-000000130063', 5) AS r;
-- for the image feature the scoped grant pays, but no further debt: 11 is PT402, 10 is paid
SELECT tests.err($$SELECT billing.consume_credits('00000000-0000-0000-0000-000000130063', 11, 'image')$$);
SELECT tests.paid(r) AS paid, r ->> 'debt_added' AS debt_added, r ->> 'debt' AS debt
  FROM billing.consume_credits('00000000-0000-0000-0000-000000130063', 10, 'image') AS r;
SELECT * FROM tests.grants('00000000-0000-0000-0000-000000130063');

-- a user without an account: set_overdraft_limit creates it
SELECT billing.set_overdraft_limit('00000000-0000-0000-0000-000000130069', 1) - 'user_id' AS r;
SELECT tests.bal('00000000-0000-0000-0000-000000130069');

SELECT * FROM billing.verify_ledger();
SET client_min_messages = warning;
DROP SCHEMA tests CASCADE;
RESET client_min_messages;
