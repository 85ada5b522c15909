-- Credit grants (issue 13): void_grant, clawback and rollover. void_grant voids the unused
-- remainder of a grant and returns it, never twice (already_voided), P0002 for an unknown grant,
-- and replays with an idempotency key. clawback_credits_from_transaction voids what remains of
-- that purchase's grant (not of the purchased pool). At renewal, min(what remains of the
-- subscription pool's grants, plan.rollover_max) becomes a rollover grant expiring at the new
-- period end; rollover_max 0 (the default) or no plan: no rollover.
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

-- ===== void_grant: the remainder, once =====
-- user 40: v_a purchased 10 (4 used), v_b promotional 5, v_c purchased 3 (priority 60)
SELECT tests.keep('v_a', billing.grant_credits('00000000-0000-0000-0000-000000130040', 10, 'purchased')) AS r;
SELECT tests.keep('v_b', billing.grant_credits('00000000-0000-0000-0000-000000130040', 5, 'promotional', 35)) AS r;
SELECT tests.keep('v_c', billing.grant_credits('00000000-0000-0000-0000-000000130040', 3, 'purchased', 60)) AS r;
SELECT tests.paid(billing.consume_credits('00000000-0000-0000-0000-000000130040', 9)) AS paid;
SELECT * FROM tests.grants('00000000-0000-0000-0000-000000130040');
INSERT INTO res SELECT 'void_a', billing.void_grant((SELECT id FROM g WHERE label = 'v_a'), 'fraud')
RETURNING label, r - 'grant_id' - 'transaction_id' - 'user_id' AS r;
SELECT (r ->> 'grant_id')::uuid = (SELECT id FROM g WHERE label = 'v_a') AS same_grant,
       (r ->> 'user_id')::uuid = '00000000-0000-0000-0000-000000130040' AS same_user
  FROM res WHERE label = 'void_a';
SELECT * FROM tests.grants('00000000-0000-0000-0000-000000130040');
SELECT void_reason, voided_at IS NOT NULL AS voided FROM billing.credit_grants WHERE id = (SELECT id FROM g WHERE label = 'v_a');
-- its ledger row: the grant, minus the remainder
SELECT t.type, t.pool, t.amount, t.balance_after, tests.l(t.grant_id) AS grant_label
  FROM tests.txs('void_a') AS t;
SELECT tests.bal('00000000-0000-0000-0000-000000130040');
-- a second void (another reason too): already_voided, the first amount, nothing changes
INSERT INTO res SELECT 'void_a_again', billing.void_grant((SELECT id FROM g WHERE label = 'v_a'), 'fraud')
RETURNING label, r - 'grant_id' - 'transaction_id' - 'user_id' AS r;
SELECT billing.void_grant((SELECT id FROM g WHERE label = 'v_a'), 'other') ->> 'voided_amount' AS voided_amount_again;
SELECT tests.bal('00000000-0000-0000-0000-000000130040');
-- the voided grant is never spent: v_c pays (v_b is spent), and then PT402 with v_a's 6 voided
SELECT tests.paid(billing.consume_credits('00000000-0000-0000-0000-000000130040', 2)) AS paid;
SELECT tests.err($$SELECT billing.consume_credits('00000000-0000-0000-0000-000000130040', 3)$$);
SELECT tests.l(grant_id) AS grant_label, remaining, status FROM billing.get_credit_grants('00000000-0000-0000-0000-000000130040', true);
-- a spent grant (v_b): nothing left to void
SELECT billing.void_grant((SELECT id FROM g WHERE label = 'v_b'), 'late') - 'grant_id' - 'transaction_id' - 'user_id' AS r;
SELECT tests.bal('00000000-0000-0000-0000-000000130040');
-- a grant that starts tomorrow: voided whole, never spendable
SELECT now() + interval '1 day' AS tomorrow \gset
SELECT tests.keep('v_tomorrow', billing.grant_credits('00000000-0000-0000-0000-000000130040', 7, 'promotional', p_effective_at => :'tomorrow')) AS r;
SELECT billing.void_grant((SELECT id FROM g WHERE label = 'v_tomorrow')) ->> 'voided_amount' AS voided_amount;
SELECT tests.l(grant_id) AS grant_label, remaining, status FROM billing.get_credit_grants('00000000-0000-0000-0000-000000130040', true);
-- unknown grant: P0002; NULL: 22023
SELECT tests.err($$SELECT billing.void_grant('00000000-0000-0000-0000-0000000000ff')$$);
SELECT tests.err($$SELECT billing.void_grant(NULL)$$);
SELECT tests.err($$SELECT billing.void_grant('00000000-0000-0000-0000-0000000000ff', repeat('r', 1001))$$);

-- ===== void_grant with an idempotency key =====
SELECT tests.keep('v_d', billing.grant_credits('00000000-0000-0000-0000-000000130040', 8, 'promotional')) AS r;
INSERT INTO res SELECT 'void_d', billing.void_grant((SELECT id FROM g WHERE label = 'v_d'), 'promo withdrawn', 'void-d')
RETURNING label, r - 'grant_id' - 'transaction_id' - 'user_id' AS r;
-- the same key and arguments: the identical result (already_voided stays false), nothing changes
SELECT billing.void_grant((SELECT id FROM g WHERE label = 'v_d'), 'promo withdrawn', 'void-d')
       = (SELECT r FROM res WHERE label = 'void_d') AS identical_json;
SELECT tests.bal('00000000-0000-0000-0000-000000130040');
-- the same key with other arguments, or used by another function: PT409
SELECT tests.err(format('SELECT billing.void_grant(%L, %L, %L)', (SELECT id FROM g WHERE label = 'v_d'), 'other reason', 'void-d'));
SELECT tests.err($$SELECT billing.add_purchased_credits('00000000-0000-0000-0000-000000130040', 1, NULL, NULL, 'void-d')$$);
SELECT * FROM tests.ledger('00000000-0000-0000-0000-000000130040');

-- ===== clawback_credits_from_transaction voids what remains of that purchase's grant =====
-- user 41: purchases A (30), B (20), C (10)
INSERT INTO res SELECT 'buy_a', billing.add_purchased_credits('00000000-0000-0000-0000-000000130041', 30, 'pack A')
RETURNING label, r - 'transaction_id' AS r;
SELECT tests.name_new('00000000-0000-0000-0000-000000130041', 'buy_a') AS labeled;
INSERT INTO res SELECT 'buy_b', billing.add_purchased_credits('00000000-0000-0000-0000-000000130041', 20, 'pack B')
RETURNING label, r - 'transaction_id' AS r;
SELECT tests.name_new('00000000-0000-0000-0000-000000130041', 'buy_b') AS labeled;
INSERT INTO res SELECT 'buy_c', billing.add_purchased_credits('00000000-0000-0000-0000-000000130041', 10, 'pack C')
RETURNING label, r - 'transaction_id' AS r;
SELECT tests.name_new('00000000-0000-0000-0000-000000130041', 'buy_c') AS labeled;
-- each purchase's grant keeps its transaction
SELECT tests.l(c.id) AS grant_label, c.category, c.amount,
       c.source_transaction_id = (SELECT (r ->> 'transaction_id')::uuid FROM res WHERE res.label = tests.l(c.id)) AS source_is_purchase
  FROM tests.cg('00000000-0000-0000-0000-000000130041') AS c ORDER BY 1;
-- 35 used: all of A, 5 of B
SELECT tests.paid(billing.consume_credits('00000000-0000-0000-0000-000000130041', 35)) AS paid;
-- B: its 15 left are voided, shortfall 5; C's 10 stay although the purchased pool has 25
INSERT INTO res SELECT 'claw_b', billing.clawback_credits_from_transaction((SELECT (r ->> 'transaction_id')::uuid FROM res WHERE label = 'buy_b'), 'chargeback B')
RETURNING label, r - 'transaction_id' - 'original_transaction_id' AS r;
SELECT * FROM tests.grants('00000000-0000-0000-0000-000000130041');
SELECT t.type, t.pool, t.amount, t.balance_after, tests.l(t.grant_id) AS grant_label
  FROM tests.txs('claw_b') AS t;
-- again: already clawed back, nothing changes
SELECT billing.clawback_credits_from_transaction((SELECT (r ->> 'transaction_id')::uuid FROM res WHERE label = 'buy_b'), 'chargeback B')
       ->> 'already_clawed_back' AS already_clawed_back;
SELECT tests.bal('00000000-0000-0000-0000-000000130041');
-- A, all of it used: nothing to void, shortfall 30, C untouched
SELECT billing.clawback_credits_from_transaction((SELECT (r ->> 'transaction_id')::uuid FROM res WHERE label = 'buy_a'))
       - 'transaction_id' - 'original_transaction_id' AS r;
SELECT * FROM tests.grants('00000000-0000-0000-0000-000000130041');
-- a voided purchase's grant is void too: void_grant on it is already_voided
SELECT billing.void_grant((SELECT id FROM g WHERE label = 'buy_b')) ->> 'already_voided' AS already_voided;
SELECT tests.bal('00000000-0000-0000-0000-000000130041');

-- ===== rollover (in a transaction, so the plan change is undone) =====
BEGIN;
SELECT date_trunc('month', now()) + interval '1 year' AS p0,
       date_trunc('month', now()) + interval '1 year 1 month' AS p1,
       date_trunc('month', now()) + interval '1 year 2 months' AS p2,
       date_trunc('month', now()) + interval '1 year 3 months' AS p3 \gset
SELECT plan_id, monthly_credits, rollover_max FROM billing.plans WHERE plan_id IN ('pro', 'premium') ORDER BY plan_id;
UPDATE billing.plans SET rollover_max = 200 WHERE plan_id = 'pro';
-- user 50 on pro (500 a month, rollover up to 200): 350 used, 150 left at renewal
SELECT billing.upsert_subscription('00000000-0000-0000-0000-000000130050', 'pro', 'active', :'p0', :'p1') ->> 'credits_granted' AS granted;
SELECT tests.name_new('00000000-0000-0000-0000-000000130050', 'r_sub_p1') AS labeled;
SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000130050', 350) ->> 'subscription_credits_balance' AS sub_left;
-- renewal: all 150 roll over (under the cap), nothing lost; the new period's 500 on top
SELECT billing.renew_subscription_credits('00000000-0000-0000-0000-000000130050', 500, :'p2') - 'transaction_id' - 'period_end' AS r;
SELECT tests.name_new('00000000-0000-0000-0000-000000130050', 'r_roll_p2', 'rollover') AS labeled,
       tests.name_new('00000000-0000-0000-0000-000000130050', 'r_sub_p2', 'subscription') AS labeled;
SELECT tests.l(c.id) AS grant_label, c.category, c.amount, c.remaining, c.priority, c.expires_at = :'p2' AS expires_at_new_period_end
  FROM tests.cg('00000000-0000-0000-0000-000000130050') AS c ORDER BY 1;
SELECT * FROM tests.ledger('00000000-0000-0000-0000-000000130050');
SELECT count(*) AS expiration_events FROM billing.credit_expiration_events WHERE user_id = '00000000-0000-0000-0000-000000130050';
SELECT tests.bal('00000000-0000-0000-0000-000000130050');
-- spending: the subscription grant (priority 10) before the rollover grant (20)
SELECT tests.paid(billing.consume_credits('00000000-0000-0000-0000-000000130050', 100)) AS paid;
-- the webhook's renewal (the period moves on): 400 + 150 left, capped at 200, 350 lost
SELECT billing.upsert_subscription('00000000-0000-0000-0000-000000130050', 'pro', 'active', :'p2', :'p3') ->> 'credits_granted' AS granted;
SELECT tests.name_new('00000000-0000-0000-0000-000000130050', 'r_roll_p3', 'rollover') AS labeled,
       tests.name_new('00000000-0000-0000-0000-000000130050', 'r_sub_p3', 'subscription') AS labeled;
SELECT tests.l(c.id) AS grant_label, c.category, c.amount, c.remaining, c.expires_at = :'p3' AS expires_at_new_period_end
  FROM tests.cg('00000000-0000-0000-0000-000000130050') AS c ORDER BY 1;
SELECT expired_amount FROM billing.credit_expiration_events WHERE user_id = '00000000-0000-0000-0000-000000130050' ORDER BY id;
SELECT tests.bal('00000000-0000-0000-0000-000000130050');
SELECT subscription_credits_balance, purchased_credits_balance, total_balance, available
  FROM billing.get_user_credits('00000000-0000-0000-0000-000000130050');
-- a rollover exactly at the cap: 200 left -> 200 roll over, nothing lost
SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000130050', 500) ->> 'subscription_credits_balance' AS sub_left;
SELECT billing.renew_subscription_credits('00000000-0000-0000-0000-000000130050', 500, :'p3'::timestamptz + interval '1 month') - 'transaction_id' - 'period_end' AS r;
SELECT category, remaining FROM billing.credit_grants
 WHERE user_id = '00000000-0000-0000-0000-000000130050' AND remaining > 0 ORDER BY priority;

-- user 51 on premium (rollover_max 0, the default): no rollover grant, all of it expires
SELECT billing.upsert_subscription('00000000-0000-0000-0000-000000130051', 'premium', 'active', :'p0', :'p1') ->> 'credits_granted' AS granted;
SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000130051', 100) ->> 'subscription_credits_balance' AS sub_left;
SELECT billing.renew_subscription_credits('00000000-0000-0000-0000-000000130051', 2000, :'p2') - 'transaction_id' - 'period_end' AS r;
SELECT category, amount, remaining FROM billing.credit_grants WHERE user_id = '00000000-0000-0000-0000-000000130051' ORDER BY created_at, amount, remaining;
SELECT count(*) AS rollover_grants FROM billing.credit_grants WHERE user_id = '00000000-0000-0000-0000-000000130051' AND category = 'rollover';

-- user 52 without a plan: no rollover
SELECT billing.renew_subscription_credits('00000000-0000-0000-0000-000000130052', 50, :'p1') ->> 'subscription_credits_balance' AS granted;
SELECT billing.renew_subscription_credits('00000000-0000-0000-0000-000000130052', 60, :'p2') - 'transaction_id' - 'period_end' AS r;
SELECT count(*) AS rollover_grants FROM billing.credit_grants WHERE user_id = '00000000-0000-0000-0000-000000130052' AND category = 'rollover';

-- user 53 on pro: purchased credits neither roll over nor expire at renewal
SELECT billing.upsert_subscription('00000000-0000-0000-0000-000000130053', 'pro', 'active', :'p0', :'p1') ->> 'credits_granted' AS granted;
SELECT billing.add_purchased_credits('00000000-0000-0000-0000-000000130053', 30) ->> 'total_balance' AS total;
SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000130053', 450) ->> 'subscription_credits_balance' AS sub_left;
SELECT billing.renew_subscription_credits('00000000-0000-0000-0000-000000130053', 500, :'p2') - 'transaction_id' - 'period_end' AS r;
SELECT category, amount, remaining FROM billing.credit_grants WHERE user_id = '00000000-0000-0000-0000-000000130053' AND remaining > 0 ORDER BY priority;
-- rollover_max must not be negative
-- (a Citus cluster names the shard, plans_<n>: masked)
SELECT regexp_replace(split_part(tests.err($$UPDATE billing.plans SET rollover_max = -1 WHERE plan_id = 'pro'$$), ' [', 1),
                      'relation "plans_[0-9]+"', 'relation "plans"') AS err;
SELECT * FROM billing.verify_ledger();
ROLLBACK;

SELECT * FROM billing.verify_ledger();
SET client_min_messages = warning;
DROP SCHEMA tests CASCADE;
RESET client_min_messages;
