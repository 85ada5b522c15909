-- Credit grants (issue 13): the spending order. Grants are spent by priority, then scoped before
-- unscoped, then expires_at (NULLS LAST), then effective_at, then created_at. One debit across
-- several grants writes one ledger row per grant (grant_id, pool balance after), and
-- consume_credits returns which grants paid what. Every statement is its own transaction, so
-- grants made by separate statements have distinct created_at.
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

-- ===== priority: the category defaults (subscription 10, rollover 20, promotional 30, refund 40, purchased 50) =====
-- created in the reverse of the spending order, so creation order (FIFO) would spend them wrongly
SELECT tests.keep('o1_purchased', billing.grant_credits('00000000-0000-0000-0000-000000130001', 10, 'purchased')) AS r;
SELECT tests.keep('o1_refund', billing.grant_credits('00000000-0000-0000-0000-000000130001', 10, 'refund')) AS r;
SELECT tests.keep('o1_promo', billing.grant_credits('00000000-0000-0000-0000-000000130001', 10, 'promotional')) AS r;
SELECT tests.keep('o1_rollover', billing.grant_credits('00000000-0000-0000-0000-000000130001', 10, 'rollover')) AS r;
SELECT tests.keep('o1_sub', billing.grant_credits('00000000-0000-0000-0000-000000130001', 10, 'subscription')) AS r;
SELECT * FROM tests.grants('00000000-0000-0000-0000-000000130001');
-- 35 credits: subscription 10, rollover 10, promotional 10, refund 5; purchased untouched
CREATE TEMP TABLE res (label text PRIMARY KEY, r jsonb);
-- txs(label): the ledger rows of a result's operation; cg(user): the user's grants. Queries that
-- label rows read them through these (on a Citus cluster the labels are on the coordinator only).
CREATE FUNCTION tests.txs(p_label text) RETURNS SETOF billing.credit_transactions LANGUAGE plpgsql AS $f$
DECLARE op uuid := (SELECT (r ->> 'transaction_id')::uuid FROM pg_temp.res WHERE label = p_label);
BEGIN RETURN QUERY SELECT * FROM billing.credit_transactions WHERE operation_id = op; END
$f$;
CREATE FUNCTION tests.cg(p_user uuid) RETURNS SETOF billing.credit_grants LANGUAGE plpgsql AS $f$
BEGIN RETURN QUERY SELECT * FROM billing.credit_grants WHERE user_id = p_user; END
$f$;
INSERT INTO res SELECT 'o1_c35', billing.consume_credits('00000000-0000-0000-0000-000000130001', 35, NULL, 'four grants', 'ref-o1')
RETURNING label, tests.paid(r) AS paid, r - 'transaction_id' - 'grants' AS r;
-- one ledger row per grant, in spending order, each with its grant and its pool's balance after
-- (subscription pool = subscription + rollover; purchased pool = purchased + refund + promotional)
SELECT t.type, t.pool, t.amount, t.balance_after, tests.l(t.grant_id) AS grant_label, t.description, t.reference_id
  FROM tests.txs('o1_c35') AS t
 ORDER BY t.id;
-- the result's grants are exactly the ledger rows of the operation
SELECT (SELECT count(*) FROM jsonb_array_elements((SELECT r -> 'grants' FROM res WHERE label = 'o1_c35')))
     = (SELECT count(*) FROM tests.txs('o1_c35'))
       AS one_ledger_row_per_grant;
SELECT * FROM tests.grants('00000000-0000-0000-0000-000000130001');
-- the next debit continues with refund, then purchased
INSERT INTO res SELECT 'o1_c8', billing.consume_credits('00000000-0000-0000-0000-000000130001', 8)
RETURNING label, tests.paid(r) AS paid, r - 'transaction_id' - 'grants' AS r;
SELECT tests.bal('00000000-0000-0000-0000-000000130001');

-- ===== an explicit priority overrides the category's default =====
SELECT tests.keep('o2_sub', billing.grant_credits('00000000-0000-0000-0000-000000130002', 5, 'subscription')) AS r;
SELECT tests.keep('o2_purchased_p5', billing.grant_credits('00000000-0000-0000-0000-000000130002', 5, 'purchased', 5)) AS r;
SELECT tests.keep('o2_promo_p0', billing.grant_credits('00000000-0000-0000-0000-000000130002', 5, 'promotional', 0)) AS r;
SELECT tests.keep('o2_refund_p100', billing.grant_credits('00000000-0000-0000-0000-000000130002', 5, 'refund', 100)) AS r;
SELECT tests.keep('o2_rollover', billing.grant_credits('00000000-0000-0000-0000-000000130002', 5, 'rollover')) AS r;
-- promotional (0), purchased (5), subscription (10), rollover (20), refund (100)
SELECT tests.paid(billing.consume_credits('00000000-0000-0000-0000-000000130002', 23)) AS paid;
SELECT * FROM tests.grants('00000000-0000-0000-0000-000000130002');

-- ===== scoped before unscoped, at the same priority =====
-- the unscoped grant is older; with a feature in scope, the scoped grant is spent first
SELECT tests.keep('o3_unscoped', billing.grant_credits('00000000-0000-0000-0000-000000130003', 10, 'promotional')) AS r;
SELECT tests.keep('o3_scoped', billing.grant_credits('00000000-0000-0000-0000-000000130003', 10, 'promotional', p_scope => ARRAY['image'])) AS r;
SELECT tests.paid(billing.consume_credits('00000000-0000-0000-0000-000000130003', 4, 'image')) AS paid;
SELECT tests.paid(billing.consume_credits('00000000-0000-0000-0000-000000130003', 8, 'image')) AS paid;
-- priority comes before scope: a scoped grant of a later priority waits for an unscoped earlier one
SELECT tests.keep('o3_scoped_p60', billing.grant_credits('00000000-0000-0000-0000-000000130003', 10, 'purchased', 60, p_scope => ARRAY['image'])) AS r;
SELECT tests.keep('o3_unscoped_p40', billing.grant_credits('00000000-0000-0000-0000-000000130003', 3, 'refund')) AS r;
SELECT tests.paid(billing.consume_credits('00000000-0000-0000-0000-000000130003', 12, 'image')) AS paid;
SELECT * FROM tests.grants('00000000-0000-0000-0000-000000130003');

-- ===== expires_at: earliest first, never-expiring last =====
SELECT now() + interval '10 days' AS soon, now() + interval '30 days' AS late \gset
SELECT tests.keep('o4_never', billing.grant_credits('00000000-0000-0000-0000-000000130004', 5, 'promotional')) AS r;
SELECT tests.keep('o4_late', billing.grant_credits('00000000-0000-0000-0000-000000130004', 5, 'promotional', p_expires_at => :'late')) AS r;
SELECT tests.keep('o4_soon', billing.grant_credits('00000000-0000-0000-0000-000000130004', 5, 'promotional', p_expires_at => :'soon')) AS r;
SELECT tests.paid(billing.consume_credits('00000000-0000-0000-0000-000000130004', 12)) AS paid;
-- the same through consume_credits_v2 (the two-pool result; the ledger rows name the grants)
SELECT tests.keep('o4_late2', billing.grant_credits('00000000-0000-0000-0000-000000130004', 5, 'promotional', p_expires_at => :'late')) AS r;
INSERT INTO res SELECT 'o4_v2', billing.consume_credits_v2('00000000-0000-0000-0000-000000130004', 6)
RETURNING label, r - 'transaction_id' AS r;
SELECT t.pool, t.amount, t.balance_after, tests.l(t.grant_id) AS grant_label
  FROM tests.txs('o4_v2') AS t
 ORDER BY t.id;
SELECT * FROM tests.grants('00000000-0000-0000-0000-000000130004');

-- ===== effective_at: the earlier start first (both already started; the later-created starts earlier) =====
SELECT now() - interval '1 hour' AS start_1h, now() - interval '2 hours' AS start_2h \gset
SELECT tests.keep('o5_1h_ago', billing.grant_credits('00000000-0000-0000-0000-000000130005', 5, 'promotional', p_effective_at => :'start_1h')) AS r;
SELECT tests.keep('o5_2h_ago', billing.grant_credits('00000000-0000-0000-0000-000000130005', 5, 'promotional', p_effective_at => :'start_2h')) AS r;
SELECT tests.paid(billing.consume_credits('00000000-0000-0000-0000-000000130005', 7)) AS paid;

-- ===== created_at: otherwise the oldest grant first =====
SELECT tests.keep('o6_first', billing.grant_credits('00000000-0000-0000-0000-000000130006', 2, 'purchased')) AS r;
SELECT tests.keep('o6_second', billing.grant_credits('00000000-0000-0000-0000-000000130006', 2, 'purchased')) AS r;
SELECT tests.keep('o6_third', billing.grant_credits('00000000-0000-0000-0000-000000130006', 2, 'purchased')) AS r;
SELECT tests.keep('o6_fourth', billing.grant_credits('00000000-0000-0000-0000-000000130006', 2, 'purchased')) AS r;
SELECT tests.paid(billing.consume_credits('00000000-0000-0000-0000-000000130006', 5)) AS paid;
-- add_purchased_credits makes purchased grants spent in the same order
SELECT billing.add_purchased_credits('00000000-0000-0000-0000-000000130006', 4) ->> 'total_balance' AS total;
SELECT tests.name_new('00000000-0000-0000-0000-000000130006', 'o6_add_purchased') AS labeled;
SELECT tests.paid(billing.consume_credits('00000000-0000-0000-0000-000000130006', 4)) AS paid;
SELECT * FROM tests.grants('00000000-0000-0000-0000-000000130006');

-- ===== priority comes before expiry: a purchased grant expiring tomorrow waits for a promotion that never expires =====
SELECT now() + interval '1 day' AS tomorrow \gset
SELECT tests.keep('o7_purchased_tomorrow', billing.grant_credits('00000000-0000-0000-0000-000000130007', 5, 'purchased', p_expires_at => :'tomorrow')) AS r;
SELECT tests.keep('o7_promo_never', billing.grant_credits('00000000-0000-0000-0000-000000130007', 5, 'promotional')) AS r;
SELECT tests.paid(billing.consume_credits('00000000-0000-0000-0000-000000130007', 6)) AS paid;
-- the two-pool functions keep their results: add_subscription_credits, then consume_credits_v2 and the legacy alias
SELECT billing.add_subscription_credits('00000000-0000-0000-0000-000000130007', 3) - 'transaction_id' AS r;
SELECT tests.name_new('00000000-0000-0000-0000-000000130007', 'o7_add_subscription') AS labeled;
SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000130007', 5) - 'transaction_id' AS r;
SELECT billing.decrement_credits_with_log('00000000-0000-0000-0000-000000130007', 2) AS total;
SELECT * FROM tests.ledger('00000000-0000-0000-0000-000000130007');
SELECT tests.bal('00000000-0000-0000-0000-000000130007');

-- ===== the two-pool functions make grants of their category (and its default priority) =====
SELECT billing.add_subscription_credits('00000000-0000-0000-0000-000000130008', 1, 'add_subscription_credits') ->> 'added' AS added;
SELECT billing.add_purchased_credits('00000000-0000-0000-0000-000000130008', 2, 'add_purchased_credits') ->> 'added' AS added;
SELECT billing.refund_credits('00000000-0000-0000-0000-000000130008', 3, 'refund_credits') ->> 'added' AS added;
SELECT billing.increment_credits_with_log('00000000-0000-0000-0000-000000130008', 4, 'Purchase', 'increment purchase') AS total;
SELECT billing.increment_credits_with_log('00000000-0000-0000-0000-000000130008', 5, 'bonus', 'increment bonus') AS total;
SELECT description, category, amount, priority, scope, expires_at IS NULL AS never_expires, effective_at <= now() AS started
  FROM billing.credit_grants WHERE user_id = '00000000-0000-0000-0000-000000130008' ORDER BY created_at;
-- and they are spent in spending order: subscription (10, oldest first), refund (40), purchased (50, oldest first)
SELECT string_agg(c.description || ' ' || (x.e ->> 'amount'), ', ' ORDER BY x.n) AS paid
  FROM billing.consume_credits('00000000-0000-0000-0000-000000130008', 15) AS r
 CROSS JOIN LATERAL jsonb_array_elements(r -> 'grants') WITH ORDINALITY AS x(e, n)
  JOIN billing.credit_grants AS c ON c.id = (x.e ->> 'grant_id')::uuid;

SELECT * FROM billing.verify_ledger();
SET client_min_messages = warning;
DROP SCHEMA tests CASCADE;
RESET client_min_messages;
