-- Credit grants (issue 13): reads. balance_at gives the balances and each grant's remaining as
-- they were at an earlier time, from the ledger; get_credit_grants lists grants in spending order
-- with their status (active, scheduled, expired, voided, spent; without p_include_spent only
-- active and scheduled); get_user_credits and billing.user_credits gain available (unscoped
-- credits spendable now, minus debt; the debt itself is billing.accounts.debt). Every statement
-- is its own transaction.
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
-- at(user, t): balance_at in one line, grants by label
CREATE FUNCTION tests.at(p_user uuid, p_at timestamptz) RETURNS text LANGUAGE sql AS $f$
    SELECT format('sub=%s pur=%s debt=%s total=%s grants=[%s]',
                  b ->> 'subscription_credits_balance', b ->> 'purchased_credits_balance', b ->> 'debt', b ->> 'total_balance',
                  (SELECT string_agg(tests.l((e ->> 'grant_id')::uuid) || ' ' || (e ->> 'category') || ' ' || (e ->> 'remaining')
                                     || CASE WHEN (e ->> 'spendable')::boolean THEN '' ELSE ' (not spendable)' END,
                                     ', ' ORDER BY tests.l((e ->> 'grant_id')::uuid))
                     FROM jsonb_array_elements(b -> 'grants') AS e))
      FROM billing.balance_at(p_user, p_at) AS b
$f$;
CREATE FUNCTION tests.sleep_past(p_t timestamptz) RETURNS boolean LANGUAGE sql AS $f$
    SELECT pg_sleep(greatest(0, extract(epoch FROM p_t - clock_timestamp())::float8) + 0.2);
    SELECT clock_timestamp() > p_t
$f$;

-- ===== balance_at: the past, from the ledger =====
SELECT clock_timestamp() AS t0 \gset
SELECT tests.keep('b_pur', billing.grant_credits('00000000-0000-0000-0000-000000130070', 10, 'purchased')) AS r;
SELECT clock_timestamp() AS t1 \gset
SELECT billing.consume_credits('00000000-0000-0000-0000-000000130070', 4) ->> 'total_balance' AS total;
SELECT clock_timestamp() AS t2 \gset
SELECT tests.keep('b_sub', billing.grant_credits('00000000-0000-0000-0000-000000130070', 5, 'subscription')) AS r;
SELECT clock_timestamp() AS t3 \gset
SELECT billing.consume_credits('00000000-0000-0000-0000-000000130070', 7) ->> 'total_balance' AS total;
SELECT clock_timestamp() AS t4 \gset
SELECT billing.void_grant((SELECT id FROM g WHERE label = 'b_pur')) ->> 'voided_amount' AS voided;
SELECT clock_timestamp() AS t5 \gset
SELECT billing.set_overdraft_limit('00000000-0000-0000-0000-000000130070', 5) ->> 'overdraft_limit' AS overdraft_limit;
SELECT billing.consume_credits('00000000-0000-0000-0000-000000130070', 3) ->> 'total_balance' AS total;
SELECT clock_timestamp() AS t6 \gset
SELECT tests.keep('b_repay', billing.grant_credits('00000000-0000-0000-0000-000000130070', 2, 'refund')) AS r;
SELECT clock_timestamp() AS t7 \gset
SELECT 't0 before anything' AS at, tests.at('00000000-0000-0000-0000-000000130070', :'t0') AS balance
UNION ALL SELECT 't1 granted 10', tests.at('00000000-0000-0000-0000-000000130070', :'t1')
UNION ALL SELECT 't2 used 4', tests.at('00000000-0000-0000-0000-000000130070', :'t2')
UNION ALL SELECT 't3 granted 5 subscription', tests.at('00000000-0000-0000-0000-000000130070', :'t3')
UNION ALL SELECT 't4 used 7', tests.at('00000000-0000-0000-0000-000000130070', :'t4')
UNION ALL SELECT 't5 voided the rest', tests.at('00000000-0000-0000-0000-000000130070', :'t5')
UNION ALL SELECT 't6 3 into debt', tests.at('00000000-0000-0000-0000-000000130070', :'t6')
UNION ALL SELECT 't7 2 repaid', tests.at('00000000-0000-0000-0000-000000130070', :'t7');
-- the whole answer at one time: its keys, the time and the user
SELECT b - 'grants' - 'at' - 'user_id' AS r, (b ->> 'at')::timestamptz = :'t2' AS at_as_asked,
       (b ->> 'user_id')::uuid = '00000000-0000-0000-0000-000000130070' AS same_user,
       jsonb_array_length(b -> 'grants') AS grants
  FROM billing.balance_at('00000000-0000-0000-0000-000000130070', :'t2') AS b;
-- now agrees with get_user_credits
SELECT tests.at('00000000-0000-0000-0000-000000130070', clock_timestamp()) AS now;
SELECT subscription_credits_balance, purchased_credits_balance, total_balance, available
  FROM billing.get_user_credits('00000000-0000-0000-0000-000000130070');
-- unknown user: zeros, no grants; NULL arguments: 22023
SELECT tests.at('00000000-0000-0000-0000-000000130079', clock_timestamp()) AS unknown_user;
SELECT tests.err($$SELECT billing.balance_at(NULL, now())$$);
SELECT tests.err($$SELECT billing.balance_at('00000000-0000-0000-0000-000000130070', NULL)$$);

-- ===== get_credit_grants: status and order =====
-- user 71: one grant of each status
SELECT clock_timestamp() + interval '3 seconds' AS end_at, now() + interval '1 day' AS tomorrow \gset
SELECT tests.keep('c_active', billing.grant_credits('00000000-0000-0000-0000-000000130071', 5, 'purchased', p_description => 'pack', p_reference_id => 'order-1')) AS r;
SELECT tests.keep('c_scheduled', billing.grant_credits('00000000-0000-0000-0000-000000130071', 6, 'promotional', p_effective_at => :'tomorrow')) AS r;
SELECT tests.keep('c_expired', billing.grant_credits('00000000-0000-0000-0000-000000130071', 7, 'promotional', 20, p_expires_at => :'end_at')) AS r;
SELECT tests.keep('c_voided', billing.grant_credits('00000000-0000-0000-0000-000000130071', 8, 'refund')) AS r;
SELECT tests.keep('c_spent', billing.grant_credits('00000000-0000-0000-0000-000000130071', 2, 'promotional', 1)) AS r;
SELECT tests.keep('c_scoped', billing.grant_credits('00000000-0000-0000-0000-000000130071', 4, 'promotional', 1, p_scope => ARRAY['image'])) AS r;
SELECT billing.void_grant((SELECT id FROM g WHERE label = 'c_voided')) ->> 'voided_amount' AS voided;
SELECT tests.paid(billing.consume_credits('00000000-0000-0000-0000-000000130071', 3)) AS paid;
SELECT tests.sleep_past(:'end_at') AS ended;
-- default: active and scheduled only, in spending order
SELECT tests.l(grant_id) AS grant_label, category, amount, remaining, priority, scope, status,
       effective_at > now() AS starts_later, expires_at IS NOT NULL AS expires, voided_at IS NOT NULL AS voided,
       source_transaction_id IS NOT NULL AS has_source, description, reference_id
  FROM billing.get_credit_grants('00000000-0000-0000-0000-000000130071');
-- with spent, voided and expired ones
SELECT tests.l(grant_id) AS grant_label, category, amount, remaining, priority, status
  FROM billing.get_credit_grants('00000000-0000-0000-0000-000000130071', true);
SELECT tests.l(grant_id) AS grant_label, status FROM billing.get_credit_grants('00000000-0000-0000-0000-000000130071', false);
-- available: unscoped and spendable now (c_active 5); not the scoped, scheduled or expired credits
SELECT subscription_credits_balance, purchased_credits_balance, total_balance, available
  FROM billing.get_user_credits('00000000-0000-0000-0000-000000130071');
-- the grants of a purchase name its transaction
SELECT billing.add_purchased_credits('00000000-0000-0000-0000-000000130072', 9, 'pack 9', 'order-9') ->> 'total_balance' AS total;
SELECT operation_id AS purchase_op FROM billing.credit_transactions WHERE user_id = '00000000-0000-0000-0000-000000130072' AND amount = 9 \gset
SELECT category, amount, remaining, status, description, reference_id,
       source_transaction_id = :'purchase_op' AS source_is_purchase
  FROM billing.get_credit_grants('00000000-0000-0000-0000-000000130072');
-- an unknown user: no rows; NULL: 22023
SELECT count(*) AS unknown_user_grants FROM billing.get_credit_grants('00000000-0000-0000-0000-000000130079', true);
SELECT tests.err($$SELECT * FROM billing.get_credit_grants(NULL)$$);

-- ===== get_user_credits and billing.user_credits: available at the end (the debt is billing.accounts.debt) =====
SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute
 WHERE attrelid = 'billing.user_credits'::regclass AND attnum > 0 ORDER BY attnum;
SELECT pg_get_function_result('billing.get_user_credits(uuid)'::regprocedure);
-- user 73 in debt: available = spendable unscoped - debt, total_balance = the pools - debt
SELECT billing.set_overdraft_limit('00000000-0000-0000-0000-000000130073', 10) ->> 'debt' AS debt;
SELECT billing.consume_credits('00000000-0000-0000-0000-000000130073', 6) ->> 'debt' AS debt;
SELECT tests.keep('a_scoped', billing.grant_credits('00000000-0000-0000-0000-000000130073', 20, 'promotional', p_scope => ARRAY['chat'])) AS r;
SELECT * FROM billing.user_credits WHERE user_id = '00000000-0000-0000-0000-000000130073';
SELECT (SELECT to_jsonb(c) FROM billing.get_user_credits('00000000-0000-0000-0000-000000130073') AS c)
     = (SELECT to_jsonb(v) FROM billing.user_credits AS v WHERE v.user_id = '00000000-0000-0000-0000-000000130073') AS same_row;
SELECT * FROM billing.get_user_credits('00000000-0000-0000-0000-000000130079');

SELECT * FROM billing.verify_ledger();
SET client_min_messages = warning;
DROP SCHEMA tests CASCADE;
RESET client_min_messages;
