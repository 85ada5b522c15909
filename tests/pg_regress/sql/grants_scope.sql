-- Credit grants (issue 13): scope. consume_credits with a feature spends the grants whose scope
-- admits it (and unscoped ones); without a feature (consume_credits with p_feature NULL,
-- consume_credits_v2, decrement_credits_with_log) only unscoped grants are spendable. PT402 when
-- only credits scoped to other features are left, and nothing changes.
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
-- txs(label): the ledger rows of a result's operation; cg(user): the user's grants. Queries that
-- label rows read them through these (on a Citus cluster the labels are on the coordinator only).
CREATE FUNCTION tests.txs(p_label text) RETURNS SETOF billing.credit_transactions LANGUAGE plpgsql AS $f$
DECLARE op uuid := (SELECT (r ->> 'transaction_id')::uuid FROM pg_temp.res WHERE label = p_label);
BEGIN RETURN QUERY SELECT * FROM billing.credit_transactions WHERE operation_id = op; END
$f$;
CREATE FUNCTION tests.cg(p_user uuid) RETURNS SETOF billing.credit_grants LANGUAGE plpgsql AS $f$
BEGIN RETURN QUERY SELECT * FROM billing.credit_grants WHERE user_id = p_user; END
$f$;

-- user 20: image+video 10 (promotional), chat 10 (promotional), unscoped 5 (purchased)
SELECT tests.keep('s_media', billing.grant_credits('00000000-0000-0000-0000-000000130020', 10, 'promotional', p_scope => ARRAY['image', 'video'])) AS r;
SELECT tests.keep('s_chat', billing.grant_credits('00000000-0000-0000-0000-000000130020', 10, 'promotional', p_scope => ARRAY['chat'])) AS r;
SELECT tests.keep('s_any', billing.grant_credits('00000000-0000-0000-0000-000000130020', 5, 'purchased')) AS r;
SELECT tests.bal('00000000-0000-0000-0000-000000130020');
-- available counts unscoped credits only
SELECT * FROM billing.get_user_credits('00000000-0000-0000-0000-000000130020');

-- a feature in scope: the media grant, then the unscoped one; never the chat grant
INSERT INTO res SELECT 'image_12', billing.consume_credits('00000000-0000-0000-0000-000000130020', 12, 'image')
RETURNING label, tests.paid(r) AS paid, r - 'transaction_id' - 'grants' AS r;
SELECT * FROM tests.grants('00000000-0000-0000-0000-000000130020');

-- no feature: only the unscoped grant (3 left) can pay, although 10 chat credits remain
SELECT tests.err($$SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000130020', 4)$$);
SELECT tests.err($$SELECT billing.consume_credits('00000000-0000-0000-0000-000000130020', 4)$$);
SELECT tests.err($$SELECT billing.decrement_credits_with_log('00000000-0000-0000-0000-000000130020', 4)$$);
SELECT tests.bal('00000000-0000-0000-0000-000000130020');
INSERT INTO res SELECT 'v2_3', billing.consume_credits_v2('00000000-0000-0000-0000-000000130020', 3)
RETURNING label, r - 'transaction_id' AS r;
SELECT t.pool, t.amount, tests.l(t.grant_id) AS grant_label FROM tests.txs('v2_3') AS t;

-- only other-scoped credits are left (chat 10): PT402 for image, video, no feature and the legacy alias
SELECT tests.err($$SELECT billing.consume_credits('00000000-0000-0000-0000-000000130020', 1, 'image')$$);
SELECT tests.err($$SELECT billing.consume_credits('00000000-0000-0000-0000-000000130020', 1, 'video')$$);
SELECT tests.err($$SELECT billing.consume_credits('00000000-0000-0000-0000-000000130020', 1)$$);
SELECT tests.err($$SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000130020', 1)$$);
SELECT tests.err($$SELECT billing.decrement_credits_with_log('00000000-0000-0000-0000-000000130020', 1)$$);
-- a feature is matched exactly (no case folding, no prefix)
SELECT tests.err($$SELECT billing.consume_credits('00000000-0000-0000-0000-000000130020', 1, 'Chat')$$);
SELECT tests.err($$SELECT billing.consume_credits('00000000-0000-0000-0000-000000130020', 1, 'cha')$$);
SELECT tests.bal('00000000-0000-0000-0000-000000130020');
SELECT * FROM tests.grants('00000000-0000-0000-0000-000000130020');
-- the chat feature spends the chat grant; more than it holds is PT402 and changes nothing
SELECT tests.err($$SELECT billing.consume_credits('00000000-0000-0000-0000-000000130020', 11, 'chat')$$);
INSERT INTO res SELECT 'chat_10', billing.consume_credits('00000000-0000-0000-0000-000000130020', 10, 'chat', 'all chat', 'ref-chat')
RETURNING label, tests.paid(r) AS paid, r - 'transaction_id' - 'grants' AS r;
SELECT * FROM tests.ledger('00000000-0000-0000-0000-000000130020');

-- user 21: a feature in scope of two grants of the same priority: the one expiring first, then
-- unscoped; a scoped grant's credits are not in available
SELECT now() + interval '5 days' AS d5, now() + interval '9 days' AS d9 \gset
SELECT tests.keep('s21_img_d9', billing.grant_credits('00000000-0000-0000-0000-000000130021', 4, 'promotional', p_expires_at => :'d9', p_scope => ARRAY['image'])) AS r;
SELECT tests.keep('s21_any_d5', billing.grant_credits('00000000-0000-0000-0000-000000130021', 4, 'promotional', p_expires_at => :'d5')) AS r;
SELECT tests.keep('s21_img_d5', billing.grant_credits('00000000-0000-0000-0000-000000130021', 4, 'promotional', p_expires_at => :'d5', p_scope => ARRAY['image', 'upscale'])) AS r;
SELECT available FROM billing.get_user_credits('00000000-0000-0000-0000-000000130021');
-- scoped (d5 before d9), then the unscoped one
SELECT tests.paid(billing.consume_credits('00000000-0000-0000-0000-000000130021', 10, 'image')) AS paid;
SELECT tests.paid(billing.consume_credits('00000000-0000-0000-0000-000000130021', 1, 'upscale')) AS paid;
SELECT * FROM tests.grants('00000000-0000-0000-0000-000000130021');

-- ===== consume_generation (members) has no feature: only unscoped grants pay beyond the pool =====
-- (in a transaction, rolled back: the member must not stay for members.sql)
BEGIN;
SELECT billing.upsert_member('grants-scope@example.com', 'free', '2124-02-15') ->> 'member_id' AS mid \gset
SELECT r ->> 'allowed' AS allowed, r ->> 'current_usage' AS usage FROM billing.consume_generation(:'mid', 10) AS r;
SELECT billing.grant_credits(:'mid', 5, 'promotional', p_scope => ARRAY['image']) ->> 'available' AS available;
SELECT tests.err(format('SELECT billing.consume_generation(%L, 1)', :'mid'));
SELECT billing.grant_credits(:'mid', 2, 'promotional') ->> 'available' AS available;
SELECT r ->> 'allowed' AS allowed, r ->> 'overage' AS overage, r ->> 'current_usage' AS usage FROM billing.consume_generation(:'mid', 1) AS r;
SELECT category, scope, amount, remaining FROM billing.credit_grants WHERE user_id = :'mid' ORDER BY category, scope NULLS FIRST;
ROLLBACK;

SELECT * FROM billing.verify_ledger();
SET client_min_messages = warning;
DROP SCHEMA tests CASCADE;
RESET client_min_messages;
