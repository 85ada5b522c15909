-- Credit grants (issue 13): argument errors (22023), idempotency keys, and who may do what:
-- grant_credits, void_grant and set_overdraft_limit are service-only (42501 for end users);
-- consume_credits, get_credit_grants and balance_at are rpc (own account only, 42501 otherwise);
-- end users read their own grants (RLS) and write none. One transaction, rolled back.
-- Helpers live in schema tests, not pg_temp: on a Citus cluster a query that calls one may run on a worker.
CREATE SCHEMA tests;
GRANT USAGE ON SCHEMA tests TO PUBLIC;
-- single_node: false on a Citus cluster, where the sections marked 'single node only' are skipped
SELECT NOT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'citus') AS single_node \gset
BEGIN;
SET LOCAL TimeZone = 'UTC';
SET LOCAL DateStyle = 'ISO, YMD';
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
GRANT SELECT ON g TO PUBLIC;  -- the end-user parts read it too
CREATE TEMP TABLE res (label text PRIMARY KEY, r jsonb);
-- cg(user): the user's grants (read first: on a Citus cluster a query on billing tables runs on a worker)
CREATE FUNCTION tests.cg(p_user uuid) RETURNS SETOF billing.credit_grants LANGUAGE plpgsql AS $f$
BEGIN RETURN QUERY SELECT * FROM billing.credit_grants WHERE user_id = p_user; END
$f$;
GRANT SELECT ON res TO PUBLIC;
-- user 80 ("me") and 81 ("other")
SELECT tests.keep('e_me', billing.grant_credits('00000000-0000-0000-0000-000000130080', 10, 'purchased')) AS r;
SELECT tests.keep('e_other', billing.grant_credits('00000000-0000-0000-0000-000000130081', 10, 'purchased')) AS r;
SELECT now() + interval '1 day' AS tomorrow, now() + interval '2 days' AS in2days, now() - interval '1 second' AS past \gset

-- ===== grant_credits: 22023, nothing changes =====
SELECT tests.err($$SELECT billing.grant_credits('00000000-0000-0000-0000-000000130080', 5, 'bonus')$$);
SELECT tests.err($$SELECT billing.grant_credits('00000000-0000-0000-0000-000000130080', 5, 'Purchased')$$);
SELECT tests.err($$SELECT billing.grant_credits('00000000-0000-0000-0000-000000130080', 5, '')$$);
SELECT tests.err($$SELECT billing.grant_credits('00000000-0000-0000-0000-000000130080', 5, NULL)$$);
SELECT tests.err($$SELECT billing.grant_credits('00000000-0000-0000-0000-000000130080', 5, 'purchased', -1)$$);
SELECT tests.err($$SELECT billing.grant_credits('00000000-0000-0000-0000-000000130080', 5, 'purchased', 101)$$);
SELECT tests.err($$SELECT billing.grant_credits('00000000-0000-0000-0000-000000130080', 5, 'purchased', 2147483647)$$);
SELECT tests.err($$SELECT billing.grant_credits('00000000-0000-0000-0000-000000130080', 0, 'purchased')$$);
SELECT tests.err($$SELECT billing.grant_credits('00000000-0000-0000-0000-000000130080', -5, 'purchased')$$);
SELECT tests.err($$SELECT billing.grant_credits('00000000-0000-0000-0000-000000130080', NULL, 'purchased')$$);
SELECT tests.err($$SELECT billing.grant_credits(NULL, 5, 'purchased')$$);
-- expires_at <= effective_at, or already past
SELECT tests.err(format('SELECT billing.grant_credits(%L, 5, %L, p_effective_at => %L, p_expires_at => %L)',
                          '00000000-0000-0000-0000-000000130080', 'promotional', :'tomorrow', :'tomorrow'));
SELECT tests.err(format('SELECT billing.grant_credits(%L, 5, %L, p_effective_at => %L, p_expires_at => %L)',
                          '00000000-0000-0000-0000-000000130080', 'promotional', :'in2days', :'tomorrow'));
SELECT tests.err(format('SELECT billing.grant_credits(%L, 5, %L, p_expires_at => %L)',
                          '00000000-0000-0000-0000-000000130080', 'promotional', :'past'));
SELECT tests.err(format('SELECT billing.grant_credits(%L, 5, %L, p_expires_at => %L)',
                          '00000000-0000-0000-0000-000000130080', 'promotional', now()));
-- empty scope, or an empty or NULL feature in it
SELECT tests.err($$SELECT billing.grant_credits('00000000-0000-0000-0000-000000130080', 5, 'promotional', p_scope => '{}')$$);
SELECT tests.err($$SELECT billing.grant_credits('00000000-0000-0000-0000-000000130080', 5, 'promotional', p_scope => ARRAY[NULL]::text[])$$);
SELECT tests.err($$SELECT billing.grant_credits('00000000-0000-0000-0000-000000130080', 5, 'promotional', p_scope => ARRAY['image', ''])$$);
-- texts too long (the limits of the other credit functions)
SELECT tests.err($$SELECT billing.grant_credits('00000000-0000-0000-0000-000000130080', 5, 'promotional', p_description => repeat('d', 1001))$$);
SELECT tests.err($$SELECT billing.grant_credits('00000000-0000-0000-0000-000000130080', 5, 'promotional', p_reference_id => repeat('r', 256))$$);
SELECT tests.err($$SELECT billing.grant_credits('00000000-0000-0000-0000-000000130080', 5, 'promotional', p_idempotency_key => repeat('k', 256))$$);
SELECT tests.bal('00000000-0000-0000-0000-000000130080'), (SELECT count(*) FROM tests.cg('00000000-0000-0000-0000-000000130080')) AS grants;
-- the bounds are accepted: priority 0 and 100, every category
SELECT tests.keep('e_p0', billing.grant_credits('00000000-0000-0000-0000-000000130080', 1, 'subscription', 0)) AS r;
SELECT tests.keep('e_p100', billing.grant_credits('00000000-0000-0000-0000-000000130080', 1, 'rollover', 100)) AS r;
SELECT tests.keep('e_refund', billing.grant_credits('00000000-0000-0000-0000-000000130080', 1, 'refund')) AS r;
SELECT tests.keep('e_promo', billing.grant_credits('00000000-0000-0000-0000-000000130080', 1, 'promotional', p_scope => ARRAY['image', 'video'])) AS r;
SELECT (r ->> 'grant_id') IS NOT NULL AS has_grant_id, (r ->> 'transaction_id') IS NOT NULL AS has_transaction_id,
       (r ->> 'effective_at')::timestamptz = now() AS effective_now, r -> 'expires_at' AS expires_at
  FROM billing.grant_credits('00000000-0000-0000-0000-000000130080', 1, 'purchased') AS r;
SELECT tests.name_new('00000000-0000-0000-0000-000000130080', 'e_plain') AS labeled;

-- ===== grant_credits with an idempotency key =====
INSERT INTO res SELECT 'grant_key', billing.grant_credits('00000000-0000-0000-0000-000000130080', 3, 'promotional', p_description => 'promo', p_idempotency_key => 'promo-1')
RETURNING label, tests.keep('e_key', r) AS r;
SELECT billing.grant_credits('00000000-0000-0000-0000-000000130080', 3, 'promotional', p_description => 'promo', p_idempotency_key => 'promo-1')
       = (SELECT r FROM res WHERE label = 'grant_key') AS identical_json;
SELECT tests.err($$SELECT billing.grant_credits('00000000-0000-0000-0000-000000130080', 4, 'promotional', p_description => 'promo', p_idempotency_key => 'promo-1')$$);
SELECT tests.err($$SELECT billing.grant_credits('00000000-0000-0000-0000-000000130080', 3, 'purchased', p_description => 'promo', p_idempotency_key => 'promo-1')$$);
SELECT tests.err($$SELECT billing.grant_credits('00000000-0000-0000-0000-000000130080', 3, 'promotional', 31, p_description => 'promo', p_idempotency_key => 'promo-1')$$);
SELECT tests.err($$SELECT billing.grant_credits('00000000-0000-0000-0000-000000130080', 3, 'promotional', p_scope => ARRAY['x'], p_description => 'promo', p_idempotency_key => 'promo-1')$$);
SELECT tests.err($$SELECT billing.consume_credits('00000000-0000-0000-0000-000000130080', 3, NULL, NULL, NULL, 'promo-1')$$);
SELECT count(*) AS grants_with_key FROM billing.credit_grants WHERE user_id = '00000000-0000-0000-0000-000000130080' AND idempotency_key = 'promo-1';

-- ===== consume_credits: 22023 and P0002 =====
SELECT tests.err($$SELECT billing.consume_credits('00000000-0000-0000-0000-000000130080', 0)$$);
SELECT tests.err($$SELECT billing.consume_credits('00000000-0000-0000-0000-000000130080', -1)$$);
SELECT tests.err($$SELECT billing.consume_credits('00000000-0000-0000-0000-000000130080', NULL)$$);
SELECT tests.err($$SELECT billing.consume_credits(NULL, 1)$$);
SELECT tests.err($$SELECT billing.consume_credits('00000000-0000-0000-0000-000000130089', 1)$$);
SELECT tests.err($$SELECT billing.consume_credits('00000000-0000-0000-0000-000000130080', 1, NULL, repeat('d', 1001))$$);
SELECT count(*) AS accounts_of_unknown_user FROM billing.accounts WHERE user_id = '00000000-0000-0000-0000-000000130089';
-- consume_credits with a key: replay, and PT409 for another feature
INSERT INTO res SELECT 'consume_key', billing.consume_credits('00000000-0000-0000-0000-000000130080', 2, 'image', NULL, NULL, 'use-1')
RETURNING label, tests.paid(r) AS paid, r - 'transaction_id' - 'grants' AS r;
SELECT billing.consume_credits('00000000-0000-0000-0000-000000130080', 2, 'image', NULL, NULL, 'use-1')
       = (SELECT r FROM res WHERE label = 'consume_key') AS identical_json;
SELECT tests.err($$SELECT billing.consume_credits('00000000-0000-0000-0000-000000130080', 2, 'video', NULL, NULL, 'use-1')$$);
SELECT tests.bal('00000000-0000-0000-0000-000000130080');

-- ===== privileges =====
SELECT p.proname, c.access,
       has_function_privilege('anon', p.oid, 'EXECUTE') AS anon,
       has_function_privilege('authenticated', p.oid, 'EXECUTE') AS authenticated,
       has_function_privilege('service_role', p.oid, 'EXECUTE') AS service_role,
       EXISTS (SELECT 1 FROM aclexplode(p.proacl) AS a WHERE a.grantee = 0) AS public,
       p.prosecdef, p.proconfig
  FROM pg_proc AS p LEFT JOIN billing.api_catalog() AS c ON c.function_name = p.proname
 WHERE p.pronamespace = 'billing'::regnamespace
   AND p.proname IN ('grant_credits', 'void_grant', 'consume_credits', 'get_credit_grants', 'balance_at', 'set_overdraft_limit')
 ORDER BY p.proname;
SELECT has_table_privilege('authenticated', 'billing.credit_grants', 'SELECT') AS authenticated_select,
       has_table_privilege('authenticated', 'billing.credit_grants', 'INSERT,UPDATE,DELETE,TRUNCATE') AS authenticated_write,
       has_table_privilege('anon', 'billing.credit_grants', 'INSERT,UPDATE,DELETE,TRUNCATE') AS anon_write,
       EXISTS (SELECT 1 FROM pg_class AS c, aclexplode(c.relacl) AS a WHERE c.oid = 'billing.credit_grants'::regclass AND a.grantee = 0) AS public,
       (SELECT relrowsecurity FROM pg_class WHERE oid = 'billing.credit_grants'::regclass) AS rls;
SELECT p.oid::regprocedure, obj_description(p.oid, 'pg_proc') IS NOT NULL AS documented
  FROM pg_proc AS p
 WHERE p.pronamespace = 'billing'::regnamespace
   AND p.proname IN ('grant_credits', 'void_grant', 'consume_credits', 'get_credit_grants', 'balance_at', 'set_overdraft_limit')
 ORDER BY 1;

-- ===== an authenticated end user (PostgREST: SET LOCAL ROLE + JWT claims) =====
SET LOCAL ROLE authenticated;
SELECT set_config('request.jwt.claims', '{"sub":"00000000-0000-0000-0000-000000130080","role":"authenticated"}', true) IS NOT NULL AS claims_set;
-- own account: the rpc functions work
SELECT tests.paid(billing.consume_credits('00000000-0000-0000-0000-000000130080', 1)) AS paid;
SELECT tests.l(grant_id) AS grant_label, remaining, status FROM billing.get_credit_grants('00000000-0000-0000-0000-000000130080') ORDER BY 1;
SELECT (billing.balance_at('00000000-0000-0000-0000-000000130080', now()) ->> 'total_balance') IS NOT NULL AS own_balance_at;
SELECT available FROM billing.get_user_credits('00000000-0000-0000-0000-000000130080');
-- single node only: Citus refuses an end user's read of rows postgres wrote earlier in this transaction
\if :single_node
SELECT user_id, overdraft_limit, debt FROM billing.accounts;
\endif
-- the service-only functions: 42501, even on the own account
SELECT tests.err($$SELECT billing.grant_credits('00000000-0000-0000-0000-000000130080', 1000, 'purchased')$$);
SELECT tests.err(format('SELECT billing.void_grant(%L)', (SELECT id FROM g WHERE label = 'e_other')));
SELECT tests.err(format('SELECT billing.void_grant(%L)', (SELECT id FROM g WHERE label = 'e_me')));
SELECT tests.err($$SELECT billing.set_overdraft_limit('00000000-0000-0000-0000-000000130080', 1000)$$);
-- another user's account: 42501
SELECT tests.err($$SELECT billing.consume_credits('00000000-0000-0000-0000-000000130081', 1)$$);
SELECT tests.err($$SELECT * FROM billing.get_credit_grants('00000000-0000-0000-0000-000000130081')$$);
SELECT tests.err($$SELECT * FROM billing.get_credit_grants('00000000-0000-0000-0000-000000130081', true)$$);
SELECT tests.err($$SELECT billing.balance_at('00000000-0000-0000-0000-000000130081', now())$$);
SELECT tests.err($$SELECT billing.balance_at('00000000-0000-0000-0000-000000130089', now())$$);
-- RLS: only the own grants are visible; no writes
-- single node only: Citus refuses an end user's read of rows postgres wrote earlier in this transaction
\if :single_node
SELECT DISTINCT user_id FROM billing.credit_grants;
\endif
SELECT tests.err($$UPDATE billing.credit_grants SET remaining = 1000 WHERE user_id = '00000000-0000-0000-0000-000000130080'$$);
SELECT tests.err($$INSERT INTO billing.credit_grants (user_id, id, category, amount, remaining, priority, effective_at) VALUES ('00000000-0000-0000-0000-000000130080', gen_random_uuid(), 'purchased', 100, 100, 50, now())$$);
SELECT tests.err($$DELETE FROM billing.credit_grants$$);
SELECT tests.err($$UPDATE billing.accounts SET overdraft_limit = 1000, debt = 0$$);
RESET ROLE;
-- postgres carrying an end user's claims is that end user: the internal check refuses
SELECT tests.err($$SELECT billing.grant_credits('00000000-0000-0000-0000-000000130080', 1000, 'purchased')$$);
SELECT tests.err(format('SELECT billing.void_grant(%L)', (SELECT id FROM g WHERE label = 'e_other')));
SELECT tests.err($$SELECT billing.set_overdraft_limit('00000000-0000-0000-0000-000000130080', 1000)$$);
SELECT tests.err($$SELECT billing.balance_at('00000000-0000-0000-0000-000000130081', now())$$);
SELECT set_config('request.jwt.claims', '', true) = '' AS claims_cleared;

-- ===== anon: no EXECUTE, no rows =====
SET LOCAL ROLE anon;
SELECT set_config('request.jwt.claims', '{"role":"anon"}', true) IS NOT NULL AS claims_set;
SELECT tests.err($$SELECT billing.consume_credits('00000000-0000-0000-0000-000000130080', 1)$$);
SELECT tests.err($$SELECT * FROM billing.get_credit_grants('00000000-0000-0000-0000-000000130080')$$);
SELECT tests.err($$SELECT billing.balance_at('00000000-0000-0000-0000-000000130080', now())$$);
-- single node only: Citus refuses an end user's read of rows postgres wrote earlier in this transaction
\if :single_node
SELECT count(*) AS visible_grants FROM billing.credit_grants;
\endif
RESET ROLE;
SELECT set_config('request.jwt.claims', '', true) = '' AS claims_cleared;

-- ===== service_role acts on any user =====
SET LOCAL ROLE service_role;
SELECT billing.grant_credits('00000000-0000-0000-0000-000000130081', 2, 'refund') ->> 'amount' AS granted;
SELECT billing.void_grant((SELECT id FROM g WHERE label = 'e_other')) ->> 'voided_amount' AS voided;
SELECT billing.set_overdraft_limit('00000000-0000-0000-0000-000000130081', 3) ->> 'overdraft_limit' AS overdraft_limit;
SELECT count(*) AS grants_of_81 FROM billing.get_credit_grants('00000000-0000-0000-0000-000000130081', true);
RESET ROLE;
SELECT tests.bal('00000000-0000-0000-0000-000000130080') AS me, tests.bal('00000000-0000-0000-0000-000000130081') AS other;

SELECT * FROM billing.verify_ledger();
ROLLBACK;
SET client_min_messages = warning;
DROP SCHEMA tests CASCADE;
RESET client_min_messages;
