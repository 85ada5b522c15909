-- Security model (SPEC 2): end users act only on themselves (42501 otherwise), service-only
-- functions refuse end users (by privilege and by the internal check), RLS on every table,
-- no end-user writes, expose_rpc/unexpose_rpc, SECURITY DEFINER + pinned search_path, comments.
-- An end-user request is made as PostgREST makes it: SET LOCAL ROLE + request.jwt.claims.
-- Helpers live in schema tests, not pg_temp: on a Citus cluster a query that calls one may run on a worker.
-- Transactions: an end user's (or service_role's) direct read of billing tables comes first in
-- its transaction, before any call that writes: on a Citus cluster no role may read a shard that
-- another role (here the functions' owner) wrote earlier in the same transaction. So the
-- balances are committed as the file goes, and the users' rows are deleted at its end; what
-- changes no balance (roles, schemas, grants, wrappers) is rolled back.
CREATE SCHEMA tests;
GRANT USAGE ON SCHEMA tests TO PUBLIC;
SET TimeZone = 'UTC';
SET DateStyle = 'ISO, YMD';
-- err(sql): runs sql and returns 'SQLSTATE: message [detail]' instead of failing, so a
-- transaction goes on after an error. Random uuids (not the fixed 00000000-0000-0000-0000-...
-- test users) are masked.
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
GRANT SELECT ON res TO PUBLIC;  -- the end-user parts read it too

-- user 51 ("me") and user 52 ("other"), set up by the service caller (postgres)
SELECT billing.add_subscription_credits('00000000-0000-0000-0000-000000000051', 20) ->> 'total_balance' AS total;
SELECT billing.add_purchased_credits('00000000-0000-0000-0000-000000000051', 5) ->> 'total_balance' AS total;
SELECT billing.add_subscription_credits('00000000-0000-0000-0000-000000000052', 30) ->> 'total_balance' AS total;
INSERT INTO res SELECT 'buy_52', billing.add_purchased_credits('00000000-0000-0000-0000-000000000052', 9)
RETURNING label, r - 'transaction_id' AS r;
SELECT billing.expire_subscription_credits('00000000-0000-0000-0000-000000000052') ->> 'expired_amount' AS expired;
SELECT billing.add_subscription_credits('00000000-0000-0000-0000-000000000052', 30) ->> 'total_balance' AS total;
SELECT billing.expire_subscription_credits('00000000-0000-0000-0000-000000000051') ->> 'expired_amount' AS expired;
SELECT billing.add_subscription_credits('00000000-0000-0000-0000-000000000051', 20) ->> 'total_balance' AS total;

-- ===== an authenticated end user (PostgREST: SET LOCAL ROLE + JWT claims) =====
BEGIN;
SET LOCAL ROLE authenticated;
SELECT set_config('request.jwt.claims', '{"sub":"00000000-0000-0000-0000-000000000051","role":"authenticated"}', true) IS NOT NULL AS claims_set;
SELECT current_user, billing.current_user_id();
-- RLS: only the own rows are visible (on a Citus cluster none: the policy runs on the workers,
-- which PostgREST's transaction-local claims do not reach, so end users' direct reads fail closed;
-- security_1.out)
SELECT user_id, subscription_credits_balance, purchased_credits_balance FROM billing.accounts ORDER BY user_id;
SELECT * FROM billing.user_credits ORDER BY user_id;
SELECT DISTINCT user_id FROM billing.credit_transactions;
SELECT count(*) FROM billing.credit_transactions WHERE user_id = '00000000-0000-0000-0000-000000000052';
SELECT user_id, expired_amount FROM billing.credit_expiration_events;
-- tables without end-user read access
SELECT tests.err($$SELECT count(*) FROM billing.idempotency_keys$$);
SELECT tests.err($$SELECT count(*) FROM billing.clawbacks$$);
SELECT tests.err($$SELECT count(*) FROM billing.webhook_events$$);
-- no writes, not even to the own rows
SELECT tests.err($$INSERT INTO billing.accounts (user_id, purchased_credits_balance) VALUES ('00000000-0000-0000-0000-000000000053', 100)$$);
SELECT tests.err($$UPDATE billing.accounts SET purchased_credits_balance = 1000000 WHERE user_id = '00000000-0000-0000-0000-000000000051'$$);
SELECT tests.err($$DELETE FROM billing.accounts WHERE user_id = '00000000-0000-0000-0000-000000000051'$$);
SELECT tests.err($$INSERT INTO billing.credit_transactions (user_id, operation_id, type, pool, amount, balance_after) VALUES ('00000000-0000-0000-0000-000000000051', gen_random_uuid(), 'purchase', 'purchased', 100, 105)$$);
SELECT tests.err($$UPDATE billing.credit_transactions SET amount = 1000 WHERE user_id = '00000000-0000-0000-0000-000000000051'$$);
SELECT tests.err($$DELETE FROM billing.credit_transactions$$);
SELECT tests.err($$TRUNCATE billing.credit_transactions$$);
SELECT tests.err($$INSERT INTO billing.credit_expiration_events (user_id, operation_id, expired_amount) VALUES ('00000000-0000-0000-0000-000000000051', gen_random_uuid(), 1)$$);
SELECT tests.err($$INSERT INTO billing.idempotency_keys (user_id, idempotency_key, request) VALUES ('00000000-0000-0000-0000-000000000051', 'k', '{}')$$);
SELECT tests.err($$INSERT INTO billing.webhook_events (event_id, event_type) VALUES ('evt_forged', 'x')$$);
SELECT tests.err($$UPDATE billing.plans SET monthly_credits = 1000000$$);
-- an end user cannot redefine who is an end user
SELECT tests.err($$SET pg_billing.end_user_roles = ''$$);
SELECT tests.err($$SELECT set_config('pg_billing.end_user_roles', 'nobody', true)$$);
-- own account: works
SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000000051', 2) - 'transaction_id' AS r;
SELECT billing.decrement_credits_with_log('00000000-0000-0000-0000-000000000051', 1);
SELECT * FROM billing.get_user_credits('00000000-0000-0000-0000-000000000051');
SELECT type, pool, amount FROM billing.get_credit_history('00000000-0000-0000-0000-000000000051', 3);
-- another user's account: 42501, nothing changes
SELECT tests.err($$SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000000052', 1)$$);
SELECT tests.err($$SELECT billing.decrement_credits_with_log('00000000-0000-0000-0000-000000000052', 1)$$);
SELECT tests.err($$SELECT * FROM billing.get_user_credits('00000000-0000-0000-0000-000000000052')$$);
SELECT tests.err($$SELECT * FROM billing.get_credit_history('00000000-0000-0000-0000-000000000052')$$);
SELECT tests.err($$SELECT * FROM billing.get_user_credits('00000000-0000-0000-0000-000000000059')$$);
-- NULL is a bad argument before anything else
SELECT tests.err($$SELECT billing.consume_credits_v2(NULL, 1)$$);
-- service-only functions: EXECUTE is revoked from authenticated
SELECT tests.err($$SELECT billing.add_subscription_credits('00000000-0000-0000-0000-000000000051', 1)$$);
SELECT tests.err($$SELECT billing.add_purchased_credits('00000000-0000-0000-0000-000000000051', 1)$$);
SELECT tests.err($$SELECT billing.expire_subscription_credits('00000000-0000-0000-0000-000000000051')$$);
SELECT tests.err($$SELECT billing.renew_subscription_credits('00000000-0000-0000-0000-000000000051', 1)$$);
SELECT tests.err($$SELECT billing.refund_credits('00000000-0000-0000-0000-000000000051', 1)$$);
SELECT tests.err($$SELECT billing.clawback_credits_from_transaction('00000000-0000-0000-0000-0000000000ff')$$);
SELECT tests.err($$SELECT billing.increment_credits_with_log('00000000-0000-0000-0000-000000000051', 1, 'purchase')$$);
SELECT tests.err($$SELECT billing.record_webhook_event('evt_sec_1', 'test')$$);
SELECT tests.err($$SELECT * FROM billing.verify_ledger()$$);
SELECT tests.err($$SELECT billing.expose_rpc('public')$$);
SELECT tests.err($$SELECT billing.unexpose_rpc('public')$$);
SELECT tests.err($$SELECT billing.apply_grants()$$);
SELECT tests.err($$SELECT billing.authorize_user('00000000-0000-0000-0000-000000000052')$$);
COMMIT;

-- ===== a forged role claim does not make an end user a service caller =====
BEGIN;
SET LOCAL ROLE authenticated;
SELECT set_config('request.jwt.claims', '{"sub":"00000000-0000-0000-0000-000000000051","role":"service_role"}', true) IS NOT NULL AS claims_set;
SELECT count(*) AS visible_accounts FROM billing.accounts;
SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000000051', 1) ->> 'total_balance' AS total;
SELECT tests.err($$SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000000052', 1)$$);
SELECT tests.err($$SELECT * FROM billing.get_user_credits('00000000-0000-0000-0000-000000000052')$$);
SELECT tests.err($$SELECT billing.add_purchased_credits('00000000-0000-0000-0000-000000000051', 1)$$);

-- ===== broken or missing identities =====
-- the legacy request.jwt.claim.sub setting also identifies the user
SELECT set_config('request.jwt.claims', '', true) = '' AS claims_cleared;
SELECT set_config('request.jwt.claim.sub', '00000000-0000-0000-0000-000000000051', true) IS NOT NULL AS sub_set;
SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000000051', 1) ->> 'total_balance' AS total;
SELECT tests.err($$SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000000052', 1)$$);
SELECT set_config('request.jwt.claim.sub', '', true) = '' AS sub_cleared;
COMMIT;
-- authenticated without any sub claim
BEGIN;
SET LOCAL ROLE authenticated;
SELECT set_config('request.jwt.claims', '{"role":"authenticated"}', true) IS NOT NULL AS claims_set;
SELECT count(*) AS visible_accounts FROM billing.accounts;
SELECT tests.err($$SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000000051', 1)$$);
SELECT tests.err($$SELECT * FROM billing.get_user_credits('00000000-0000-0000-0000-000000000051')$$);
-- a sub that is not a uuid, claims that are not JSON
SELECT set_config('request.jwt.claims', '{"sub":"not-a-uuid","role":"authenticated"}', true) IS NOT NULL AS claims_set;
SELECT tests.err($$SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000000051', 1)$$);
SELECT set_config('request.jwt.claims', '{not json', true) IS NOT NULL AS claims_set;
SELECT tests.err($$SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000000051', 1)$$);
SELECT set_config('request.jwt.claims', '', true) = '' AS claims_cleared;
-- SET ROLE authenticated without any JWT is still an end user (without identity)
SELECT tests.err($$SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000000051', 1)$$);

-- ===== anon (no sub) =====
SET LOCAL ROLE anon;
SELECT set_config('request.jwt.claims', '{"role":"anon"}', true) IS NOT NULL AS claims_set;
-- no EXECUTE on rpc functions that are not marked anon
SELECT tests.err($$SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000000051', 1)$$);
SELECT tests.err($$SELECT * FROM billing.get_user_credits('00000000-0000-0000-0000-000000000051')$$);
SELECT tests.err($$SELECT * FROM billing.get_credit_history('00000000-0000-0000-0000-000000000051')$$);
SELECT tests.err($$SELECT billing.decrement_credits_with_log('00000000-0000-0000-0000-000000000051', 1)$$);
SELECT tests.err($$SELECT billing.add_purchased_credits('00000000-0000-0000-0000-000000000051', 1)$$);
-- and no rows through RLS
SELECT a.n AS accounts, u.n AS user_credits, t.n AS ledger_rows
  FROM (SELECT count(*) AS n FROM billing.accounts) AS a, (SELECT count(*) AS n FROM billing.user_credits) AS u,
       (SELECT count(*) AS n FROM billing.credit_transactions) AS t;
SELECT tests.err($$INSERT INTO billing.accounts (user_id) VALUES ('00000000-0000-0000-0000-000000000053')$$);
RESET ROLE;

-- ===== the internal checks (what protects the functions if EXECUTE were granted) =====
-- postgres (bypasses EXECUTE checks) with anon claims: anon must sign in
SELECT tests.err($$SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000000051', 1)$$);
SELECT tests.err($$SELECT billing.decrement_credits_with_log('00000000-0000-0000-0000-000000000051', 1)$$);
SELECT tests.err($$SELECT * FROM billing.get_user_credits('00000000-0000-0000-0000-000000000051')$$);
SELECT tests.err($$SELECT * FROM billing.get_credit_history('00000000-0000-0000-0000-000000000051')$$);
SELECT tests.err($$SELECT billing.add_purchased_credits('00000000-0000-0000-0000-000000000051', 1)$$);
-- postgres with an authenticated user's claims is that end user: every service-only function refuses
SELECT set_config('request.jwt.claims', '{"sub":"00000000-0000-0000-0000-000000000051","role":"authenticated"}', true) IS NOT NULL AS claims_set;
SELECT billing.is_end_user();
SELECT tests.err($$SELECT billing.add_subscription_credits('00000000-0000-0000-0000-000000000051', 1)$$);
SELECT tests.err($$SELECT billing.add_purchased_credits('00000000-0000-0000-0000-000000000051', 1)$$);
SELECT tests.err($$SELECT billing.expire_subscription_credits('00000000-0000-0000-0000-000000000051')$$);
SELECT tests.err($$SELECT billing.renew_subscription_credits('00000000-0000-0000-0000-000000000051', 1)$$);
SELECT tests.err($$SELECT billing.refund_credits('00000000-0000-0000-0000-000000000051', 1)$$);
SELECT tests.err(format('SELECT billing.clawback_credits_from_transaction(%L)', (SELECT r ->> 'transaction_id' FROM res WHERE label = 'buy_52')));
SELECT tests.err($$SELECT billing.increment_credits_with_log('00000000-0000-0000-0000-000000000051', 1, 'purchase')$$);
SELECT tests.err($$SELECT billing.record_webhook_event('evt_sec_1', 'test')$$);
SELECT tests.err($$SELECT * FROM billing.verify_ledger()$$);
SELECT tests.err($$SELECT billing.expose_rpc('public')$$);
SELECT tests.err($$SELECT billing.unexpose_rpc('public')$$);
SELECT tests.err($$SELECT billing.apply_grants()$$);
SELECT tests.err($$SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000000052', 1)$$);
-- authenticated granted EXECUTE by mistake: the internal check still refuses
GRANT EXECUTE ON FUNCTION billing.add_purchased_credits(uuid, integer, text, text, text) TO authenticated;
GRANT EXECUTE ON FUNCTION billing.clawback_credits_from_transaction(uuid, text) TO authenticated;
SET LOCAL ROLE authenticated;
SELECT tests.err($$SELECT billing.add_purchased_credits('00000000-0000-0000-0000-000000000051', 1000)$$);
SELECT tests.err(format('SELECT billing.clawback_credits_from_transaction(%L)', (SELECT r ->> 'transaction_id' FROM res WHERE label = 'buy_52')));
RESET ROLE;
REVOKE EXECUTE ON FUNCTION billing.add_purchased_credits(uuid, integer, text, text, text) FROM authenticated;
REVOKE EXECUTE ON FUNCTION billing.clawback_credits_from_transaction(uuid, text) FROM authenticated;
-- an authenticated claim makes even service_role act as that end user
SET LOCAL ROLE service_role;
SELECT tests.err($$SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000000052', 1)$$);
SELECT tests.err($$SELECT billing.add_purchased_credits('00000000-0000-0000-0000-000000000051', 1)$$);
RESET ROLE;
SELECT set_config('request.jwt.claims', '', true) = '' AS claims_cleared;

COMMIT;

-- ===== service callers act on any user =====
BEGIN;
SET LOCAL ROLE service_role;
SELECT count(*) AS visible_accounts FROM billing.accounts WHERE user_id IN ('00000000-0000-0000-0000-000000000051', '00000000-0000-0000-0000-000000000052');
SELECT billing.add_purchased_credits('00000000-0000-0000-0000-000000000052', 1) ->> 'total_balance' AS total;
SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000000051', 1) ->> 'total_balance' AS total;
-- PostgREST with the service key: role claim service_role
SELECT set_config('request.jwt.claims', '{"role":"service_role"}', true) IS NOT NULL AS claims_set;
SELECT billing.add_subscription_credits('00000000-0000-0000-0000-000000000052', 1) ->> 'total_balance' AS total;
SELECT * FROM billing.get_user_credits('00000000-0000-0000-0000-000000000051');
SELECT billing.record_webhook_event('evt_sec_1', 'test');
RESET ROLE;
SELECT set_config('request.jwt.claims', '', true) = '' AS claims_cleared;
SELECT tests.bal('00000000-0000-0000-0000-000000000051') AS me, tests.bal('00000000-0000-0000-0000-000000000052') AS other;
COMMIT;

-- ===== grants (SPEC 2): rpc functions for authenticated, service-only ones for service_role only =====
BEGIN;
SELECT c.function_name, c.access,
       has_function_privilege('anon', p.oid, 'EXECUTE') AS anon,
       has_function_privilege('authenticated', p.oid, 'EXECUTE') AS authenticated,
       has_function_privilege('service_role', p.oid, 'EXECUTE') AS service_role,
       EXISTS (SELECT 1 FROM aclexplode(p.proacl) AS a WHERE a.grantee = 0) AS public
  FROM billing.api_catalog() AS c
  JOIN pg_proc AS p ON p.proname = c.function_name AND p.pronamespace = 'billing'::regnamespace
 WHERE c.function_name IN ('consume_credits_v2', 'get_user_credits', 'get_credit_history', 'decrement_credits_with_log',
                           'add_subscription_credits', 'add_purchased_credits', 'expire_subscription_credits',
                           'renew_subscription_credits', 'refund_credits', 'clawback_credits_from_transaction',
                           'increment_credits_with_log', 'record_webhook_event')
 ORDER BY c.access, c.function_name;
-- every API function: grants match its access (no rows)
SELECT c.function_name, c.access
  FROM billing.api_catalog() AS c
  JOIN pg_proc AS p ON p.proname = c.function_name AND p.pronamespace = 'billing'::regnamespace
 WHERE has_function_privilege('anon', p.oid, 'EXECUTE') <> (c.access = 'anon')
    OR has_function_privilege('authenticated', p.oid, 'EXECUTE') <> (c.access IN ('rpc', 'anon'))
    OR NOT has_function_privilege('service_role', p.oid, 'EXECUTE')
    OR EXISTS (SELECT 1 FROM aclexplode(p.proacl) AS a WHERE a.grantee = 0);
-- every billing function outside the API (internal helpers, maintenance) is not executable by
-- end users; current_user_id() (auth.uid()) is the only one for PUBLIC (no rows)
SELECT p.oid::regprocedure
  FROM pg_proc AS p
 WHERE p.pronamespace = 'billing'::regnamespace
   AND p.proname NOT IN (SELECT function_name FROM billing.api_catalog())
   AND p.proname <> 'current_user_id'
   AND (has_function_privilege('anon', p.oid, 'EXECUTE') OR has_function_privilege('authenticated', p.oid, 'EXECUTE'));
-- end users have no write privilege on any billing table, view or sequence (no rows)
SELECT c.relname, r.rolname, w.priv
  FROM pg_class AS c
 CROSS JOIN (VALUES ('anon'), ('authenticated')) AS r(rolname)
 CROSS JOIN (VALUES ('INSERT'), ('UPDATE'), ('DELETE'), ('TRUNCATE'), ('REFERENCES'), ('TRIGGER')) AS w(priv)
 WHERE c.relnamespace = 'billing'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm')
   AND has_table_privilege(r.rolname, c.oid, w.priv)
UNION ALL
SELECT c.relname, r.rolname, 'USAGE'
  FROM pg_class AS c CROSS JOIN (VALUES ('anon'), ('authenticated')) AS r(rolname)
 WHERE c.relnamespace = 'billing'::regnamespace AND c.relkind = 'S'
   AND (has_sequence_privilege(r.rolname, c.oid, 'USAGE') OR has_sequence_privilege(r.rolname, c.oid, 'UPDATE'));
-- what end users may read (RLS filters the rows)
SELECT c.relname, has_table_privilege('authenticated', c.oid, 'SELECT') AS authenticated,
       has_table_privilege('anon', c.oid, 'SELECT') AS anon
  FROM pg_class AS c
 WHERE c.relnamespace = 'billing'::regnamespace
   AND c.relname IN ('accounts', 'credit_transactions', 'credit_expiration_events', 'idempotency_keys',
                     'clawbacks', 'webhook_events', 'user_credits')
 ORDER BY c.relname;

-- ===== catalog guarantees =====
-- the extension lives in schema billing and is not relocatable
SELECT extnamespace::regnamespace AS schema, extrelocatable FROM pg_extension WHERE extname = 'pg_billing';
-- every billing function is SECURITY DEFINER or a plain SQL helper (no rows)
SELECT p.oid::regprocedure, l.lanname
  FROM pg_proc AS p JOIN pg_language AS l ON l.oid = p.prolang
 WHERE p.pronamespace = 'billing'::regnamespace AND NOT p.prosecdef AND l.lanname <> 'sql';
-- functions that are not SECURITY DEFINER touch no billing table or view (no rows)
SELECT p.oid::regprocedure, c.relname
  FROM pg_proc AS p
  JOIN pg_class AS c ON c.relnamespace = 'billing'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm')
 WHERE p.pronamespace = 'billing'::regnamespace AND NOT p.prosecdef
   AND p.prosrc ~* ('\mbilling\.' || c.relname || '\M');
-- every billing function pins an empty search_path (no rows)
SELECT p.oid::regprocedure, p.proconfig
  FROM pg_proc AS p
 WHERE p.pronamespace = 'billing'::regnamespace
   AND NOT COALESCE('search_path=pg_catalog, pg_temp' = ANY (p.proconfig), false);
-- every billing function has a COMMENT (no rows)
SELECT p.oid::regprocedure
  FROM pg_proc AS p
 WHERE p.pronamespace = 'billing'::regnamespace AND COALESCE(obj_description(p.oid, 'pg_proc'), '') = '';
-- every billing table has row level security enabled (no rows), and a comment
SELECT c.relname
  FROM pg_class AS c
 WHERE c.relnamespace = 'billing'::regnamespace AND c.relkind IN ('r', 'p')
   AND (NOT c.relrowsecurity OR COALESCE(obj_description(c.oid, 'pg_class'), '') = '');
-- the credit tables and their read-own policies
SELECT c.relname, c.relrowsecurity, count(pol.polname) AS policies
  FROM pg_class AS c LEFT JOIN pg_policy AS pol ON pol.polrelid = c.oid
 WHERE c.relnamespace = 'billing'::regnamespace
   AND c.relname IN ('accounts', 'credit_transactions', 'credit_expiration_events', 'idempotency_keys', 'clawbacks', 'webhook_events')
 GROUP BY c.relname, c.relrowsecurity ORDER BY c.relname;
-- views run with the caller's rights, so RLS applies through them
SELECT c.relname, c.reloptions FROM pg_class AS c
 WHERE c.relnamespace = 'billing'::regnamespace AND c.relkind = 'v'
   AND NOT COALESCE('security_invoker=true' = ANY (c.reloptions), false);

-- ===== expose_rpc / unexpose_rpc =====
SELECT billing.expose_rpc('public') = (SELECT count(*) FROM billing.api_catalog()) AS exposed_all;
-- idempotent: a second run refreshes the same wrappers
SELECT billing.expose_rpc('public') = (SELECT count(*) FROM billing.api_catalog()) AS exposed_all_again;
-- each wrapper has exactly the name, arguments and result of its function (no rows) ...
SELECT c.function_name
  FROM billing.api_catalog() AS c
  JOIN pg_proc AS b ON b.proname = c.function_name AND b.pronamespace = 'billing'::regnamespace
  LEFT JOIN pg_proc AS w ON w.proname = c.function_name AND w.pronamespace = 'public'::regnamespace
 WHERE w.oid IS NULL
    OR pg_get_function_arguments(w.oid) <> pg_get_function_arguments(b.oid)
    OR pg_get_function_result(w.oid) <> pg_get_function_result(b.oid);
-- ... is SECURITY INVOKER with a pinned search_path, has the comment and the grants (no rows)
SELECT w.oid::regprocedure
  FROM billing.api_catalog() AS c
  JOIN pg_proc AS w ON w.proname = c.function_name AND w.pronamespace = 'public'::regnamespace
  JOIN pg_proc AS b ON b.proname = c.function_name AND b.pronamespace = 'billing'::regnamespace
 WHERE w.prosecdef
    OR NOT COALESCE('search_path=pg_catalog, pg_temp' = ANY (w.proconfig), false)
    OR obj_description(w.oid, 'pg_proc') IS DISTINCT FROM obj_description(b.oid, 'pg_proc')
    OR has_function_privilege('anon', w.oid, 'EXECUTE') <> (c.access = 'anon')
    OR has_function_privilege('authenticated', w.oid, 'EXECUTE') <> (c.access IN ('rpc', 'anon'))
    OR NOT has_function_privilege('service_role', w.oid, 'EXECUTE')
    OR EXISTS (SELECT 1 FROM aclexplode(w.proacl) AS a WHERE a.grantee = 0);
-- no SECURITY DEFINER function in the exposed schema
SELECT count(*) AS security_definer_in_public FROM pg_proc WHERE pronamespace = 'public'::regnamespace AND prosecdef;
SELECT pg_get_function_arguments('public.consume_credits_v2'::regproc);
-- the wrappers with named arguments, as supabase.rpc('consume_credits_v2', {p_user_id, p_amount}) calls them
SET LOCAL ROLE authenticated;
SELECT set_config('request.jwt.claims', '{"sub":"00000000-0000-0000-0000-000000000051","role":"authenticated"}', true) IS NOT NULL AS claims_set;
SELECT public.consume_credits_v2(p_user_id => '00000000-0000-0000-0000-000000000051', p_amount => 2, p_description => 'via rpc')
       - 'transaction_id' AS r;
SELECT public.consume_credits_v2(p_amount => 1, p_user_id => '00000000-0000-0000-0000-000000000051', p_idempotency_key => 'rpc-1') ->> 'total_balance' AS total;
SELECT public.consume_credits_v2(p_amount => 1, p_user_id => '00000000-0000-0000-0000-000000000051', p_idempotency_key => 'rpc-1') ->> 'total_balance' AS replayed_total;
SELECT public.decrement_credits_with_log(p_user_id => '00000000-0000-0000-0000-000000000051', p_amount => 1);
SELECT * FROM public.get_user_credits(p_user_id => '00000000-0000-0000-0000-000000000051');
SELECT description, amount FROM public.get_credit_history(p_user_id => '00000000-0000-0000-0000-000000000051', p_limit => 2);
SELECT tests.err($$SELECT public.consume_credits_v2(p_user_id => '00000000-0000-0000-0000-000000000052', p_amount => 1)$$);
SELECT tests.err($$SELECT * FROM public.get_user_credits(p_user_id => '00000000-0000-0000-0000-000000000052')$$);
SELECT tests.err($$SELECT public.consume_credits_v2(p_user_id => '00000000-0000-0000-0000-000000000051', p_amount => 1000)$$);
SELECT tests.err($$SELECT public.add_purchased_credits(p_user_id => '00000000-0000-0000-0000-000000000051', p_amount => 1000)$$);
SELECT tests.err($$SELECT public.increment_credits_with_log(p_user_id => '00000000-0000-0000-0000-000000000051', p_amount => 1000, p_transaction_type => 'purchase')$$);
SELECT tests.err($$SELECT billing.unexpose_rpc('public')$$);
RESET ROLE;
SELECT set_config('request.jwt.claims', '', true) = '' AS claims_cleared;
-- a service caller through a wrapper
SET LOCAL ROLE service_role;
SELECT public.add_purchased_credits(p_user_id => '00000000-0000-0000-0000-000000000052', p_amount => 3, p_reference_id => 'rpc') ->> 'total_balance' AS total;
RESET ROLE;
-- bad schemas: 22023
SELECT tests.err($$SELECT billing.expose_rpc('nope')$$);
SELECT tests.err($$SELECT billing.expose_rpc(NULL)$$);
SELECT tests.err($$SELECT billing.expose_rpc('billing')$$);
SELECT tests.err($$SELECT billing.expose_rpc('pg_catalog')$$);
-- another schema works the same, and unexpose removes only that schema's wrappers
CREATE SCHEMA rpc_test;
SELECT billing.expose_rpc('rpc_test') = (SELECT count(*) FROM billing.api_catalog()) AS exposed_all;
SELECT billing.unexpose_rpc('rpc_test') = (SELECT count(*) FROM billing.api_catalog()) AS removed_all;
SELECT count(*) AS left_in_rpc_test FROM pg_proc WHERE pronamespace = 'rpc_test'::regnamespace;
SELECT count(*) = (SELECT count(*) FROM billing.api_catalog()) AS public_untouched
  FROM pg_proc WHERE pronamespace = 'public'::regnamespace AND proname IN (SELECT function_name FROM billing.api_catalog());
-- unexpose_rpc drops the wrappers (and nothing else); a second run drops nothing
CREATE FUNCTION public.consume_credits_v2(p_note text) RETURNS text LANGUAGE sql AS $f$ SELECT p_note $f$;
SELECT billing.unexpose_rpc('public') = (SELECT count(*) FROM billing.api_catalog()) AS removed_all;
SELECT billing.unexpose_rpc('public') AS removed_again;
SELECT p.oid::regprocedure FROM pg_proc AS p
 WHERE p.pronamespace = 'public'::regnamespace AND p.proname IN (SELECT function_name FROM billing.api_catalog());
SELECT count(*) = (SELECT count(*) FROM billing.api_catalog()) AS billing_functions_kept FROM pg_proc
 WHERE pronamespace = 'billing'::regnamespace AND proname IN (SELECT function_name FROM billing.api_catalog());

-- ===== 0.3.0: the DBA functions are for service callers too (issue 10 item 7, SPEC 2) =====
-- access 'dba': EXECUTE for service_role only, never for PUBLIC / anon / authenticated (no rows)
SELECT f.function_name
  FROM billing.api_functions AS f
  JOIN pg_proc AS p ON p.proname = f.function_name AND p.pronamespace = 'billing'::regnamespace
 WHERE f.access = 'dba'
   AND (NOT has_function_privilege('service_role', p.oid, 'EXECUTE')
        OR has_function_privilege('anon', p.oid, 'EXECUTE') OR has_function_privilege('authenticated', p.oid, 'EXECUTE')
        OR EXISTS (SELECT 1 FROM aclexplode(p.proacl) AS a WHERE a.grantee = 0));
SELECT function_name FROM billing.api_functions WHERE access = 'dba' ORDER BY 1;
-- and they are not part of the exposed API
SELECT count(*) AS dba_in_api_catalog FROM billing.api_catalog() WHERE access = 'dba' OR function_name IN ('verify_ledger', 'expose_rpc');
CREATE TABLE public.sec_things (id bigint PRIMARY KEY, user_id uuid NOT NULL);
CREATE INDEX ON public.sec_things (user_id);
CREATE TABLE public.sec_widgets (id uuid PRIMARY KEY, user_id uuid NOT NULL, position integer NOT NULL,
                                 is_active boolean NOT NULL, created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL);
CREATE SCHEMA rpc_svc;
-- service_role (0.2.0: permission denied for each)
SET LOCAL ROLE service_role;
SELECT tests.err($$SELECT count(*) FROM billing.verify_ledger()$$) AS verify_ledger;
SELECT tests.err($$SELECT billing.register_resource('sec_things', 'public.sec_things')$$) AS register_resource;
SELECT tests.err($$SELECT billing.register_widget_table('secw', 'public.sec_widgets')$$) AS register_widget_table;
SELECT tests.err($$SELECT billing.expose_rpc('rpc_svc')$$) AS expose_rpc;
RESET ROLE;
SELECT resource_type, table_name FROM billing.resource_types WHERE resource_type = 'sec_things';
SELECT widget_type, table_name FROM billing.widget_tables WHERE widget_type = 'secw';
-- the wrappers service_role created are the whole API, belong to the extension owner, and no
-- DBA function is exposed
SELECT count(*) = (SELECT count(*) FROM billing.api_catalog()) AS exposed_all,
       count(*) FILTER (WHERE p.proowner <> e.extowner) AS not_the_owners
  FROM pg_proc AS p, pg_extension AS e
 WHERE e.extname = 'pg_billing' AND p.pronamespace = 'rpc_svc'::regnamespace;
SELECT p.proname FROM pg_proc AS p JOIN billing.api_functions AS f ON f.function_name = p.proname
 WHERE p.pronamespace = 'rpc_svc'::regnamespace AND f.access = 'dba';
SET LOCAL ROLE service_role;
SELECT tests.err($$SELECT billing.unexpose_rpc('rpc_svc')$$) AS unexpose_rpc;
RESET ROLE;
SELECT count(*) AS left_in_rpc_svc FROM pg_proc WHERE pronamespace = 'rpc_svc'::regnamespace;
-- end users still may not (42501)
SET LOCAL ROLE authenticated;
SELECT set_config('request.jwt.claims', '{"sub":"00000000-0000-0000-0000-000000000051","role":"authenticated"}', true) IS NOT NULL AS claims_set;
SELECT tests.err($$SELECT billing.register_resource('sec_things', 'public.sec_things')$$);
SELECT tests.err($$SELECT billing.register_widget_table('secw', 'public.sec_widgets')$$);
SELECT tests.err($$SELECT billing.expose_rpc('rpc_svc')$$);
RESET ROLE;
-- service_role carrying an end user's claims is that end user: refused inside
SET LOCAL ROLE service_role;
SELECT tests.err($$SELECT billing.register_resource('sec_things', 'public.sec_things')$$);
SELECT tests.err($$SELECT count(*) FROM billing.verify_ledger()$$);
SELECT tests.err($$SELECT billing.unexpose_rpc('rpc_svc')$$);
RESET ROLE;
SELECT set_config('request.jwt.claims', '', true) = '' AS claims_cleared;

-- ===== 0.3.0: expose_rpc never adopts a function another role planted (issue 11 item 5) =====
-- A role with CREATE on the target schema plants add_purchased_credits first. 0.2.0's CREATE OR
-- REPLACE kept the planter as owner, who could then rewrite the backend's "wrapper".
-- The planter, its schema and grant are committed first, and it may log in: on a Citus cluster
-- its CREATE FUNCTION reaches the workers over connections opened as that role.
ROLLBACK;
CREATE ROLE sec_planter LOGIN;
CREATE SCHEMA rpc_plant;
GRANT USAGE, CREATE ON SCHEMA rpc_plant TO sec_planter;
BEGIN;
SET LOCAL ROLE sec_planter;
CREATE FUNCTION rpc_plant.add_purchased_credits(p_user_id uuid, p_amount integer, p_description text DEFAULT NULL,
                                                p_reference_id text DEFAULT NULL, p_idempotency_key text DEFAULT NULL)
RETURNS jsonb LANGUAGE sql AS $f$ SELECT '{"planted": true}'::jsonb $f$;
RESET ROLE;
-- refused (42501, naming the function and its owner), by the owner and by service_role alike
SELECT tests.err($$SELECT billing.expose_rpc('rpc_plant')$$);
SET LOCAL ROLE service_role;
SELECT tests.err($$SELECT billing.expose_rpc('rpc_plant')$$);
RESET ROLE;
-- nothing was created, and the planted function is still the planter's own code, not a wrapper
SELECT p.oid::regprocedure, p.proowner::regrole, p.prosrc LIKE '%planted%' AS planted_body
  FROM pg_proc AS p WHERE p.pronamespace = 'rpc_plant'::regnamespace;
-- an overload with other arguments (PostgREST could route a call to it) is refused too
SET LOCAL ROLE sec_planter;
DROP FUNCTION rpc_plant.add_purchased_credits(uuid, integer, text, text, text);
CREATE FUNCTION rpc_plant.consume_credits_v2(p_user_id uuid, p_amount integer) RETURNS jsonb
LANGUAGE sql AS $f$ SELECT '{"planted": true}'::jsonb $f$;
RESET ROLE;
SELECT tests.err($$SELECT billing.expose_rpc('rpc_plant')$$);
SELECT count(*) AS functions_in_rpc_plant FROM pg_proc WHERE pronamespace = 'rpc_plant'::regnamespace;
-- once it is gone (committed: on a Citus cluster the wrappers would wait on the planter's
-- connection in the same transaction), expose_rpc works and every wrapper is the extension
-- owner's (no rows) ...
SET LOCAL ROLE sec_planter;
DROP FUNCTION rpc_plant.consume_credits_v2(uuid, integer);
RESET ROLE;
COMMIT;
BEGIN;
SELECT billing.expose_rpc('rpc_plant') = (SELECT count(*) FROM billing.api_catalog()) AS exposed_all;
SELECT p.oid::regprocedure, p.proowner::regrole
  FROM pg_proc AS p, pg_extension AS e
 WHERE e.extname = 'pg_billing' AND p.pronamespace = 'rpc_plant'::regnamespace AND p.proowner <> e.extowner;
-- ... which the planter can neither rewrite nor drop
SET LOCAL ROLE sec_planter;
SELECT tests.err($$CREATE OR REPLACE FUNCTION rpc_plant.add_purchased_credits(p_user_id uuid, p_amount integer, p_description text DEFAULT NULL, p_reference_id text DEFAULT NULL, p_idempotency_key text DEFAULT NULL) RETURNS jsonb LANGUAGE sql AS 'SELECT NULL::jsonb'$$);
SELECT tests.err($$DROP FUNCTION rpc_plant.add_purchased_credits(uuid, integer, text, text, text)$$);
-- a look-alike planted next to the wrappers ...
CREATE FUNCTION rpc_plant.get_user_credits(p_note text) RETURNS text LANGUAGE sql AS $f$ SELECT 'billing.get_user_credits(' || p_note $f$;
RESET ROLE;
-- ... makes a refresh refuse, and unexpose_rpc drops only the wrappers, never another role's function
SELECT tests.err($$SELECT billing.expose_rpc('rpc_plant')$$);
SELECT billing.unexpose_rpc('rpc_plant') = (SELECT count(*) FROM billing.api_catalog()) AS removed_wrappers;
SELECT p.oid::regprocedure, p.proowner::regrole FROM pg_proc AS p WHERE p.pronamespace = 'rpc_plant'::regnamespace;
-- schemas of the system are refused
SELECT tests.err($$SELECT billing.expose_rpc('pg_toast')$$);
ROLLBACK;
DROP SCHEMA rpc_plant;
DROP OWNED BY sec_planter;
DROP ROLE sec_planter;

-- ===== 0.3.0: billing rows only for end-user roles and service callers (issue 11 item 7) =====
-- A role with no billing grants writes request.jwt.claims (any role can) to pass RLS as user 51:
-- 0.2.0 granted SELECT to PUBLIC, so it read user 51's e-mail, balances, ledger, subscription and
-- pending profile (with its token). Now: permission denied on every billing table.
INSERT INTO billing.pending_profiles (email, token, plan_id, billing_cycle_start, billing_cycle_end,
                                      claimed, claimed_by_user_id, claimed_at)
VALUES ('sec51@example.com', 'tok-secret-51', 'pro', now(), now() + interval '30 days',
        true, '00000000-0000-0000-0000-000000000051', now());
SELECT billing.upsert_subscription('00000000-0000-0000-0000-000000000051', 'pro', 'active', now(), now() + interval '30 days') IS NOT NULL AS subscribed;
BEGIN;
CREATE ROLE sec_nobody NOLOGIN;
SET LOCAL ROLE sec_nobody;
SELECT set_config('request.jwt.claims', '{"sub":"00000000-0000-0000-0000-000000000051","role":"authenticated"}', true) IS NOT NULL AS claims_set;
SELECT tests.err($$SELECT count(*) FROM billing.accounts$$) AS accounts;
SELECT tests.err($$SELECT count(*) FROM billing.user_credits$$) AS user_credits;
SELECT tests.err($$SELECT count(*) FROM billing.credit_transactions$$) AS ledger;
SELECT tests.err($$SELECT count(*) FROM billing.subscriptions$$) AS subscriptions;
SELECT tests.err($$SELECT token FROM billing.pending_profiles$$) AS pending_profiles;
SELECT tests.err($$SELECT count(*) FROM billing.members$$) AS members;
SELECT tests.err($$SELECT count(*) FROM billing.usage_metrics$$) AS usage_metrics;
RESET ROLE;
-- no billing table or view grants anything to PUBLIC, and such a role can read none (no rows)
SELECT c.relname FROM pg_class AS c
 WHERE c.relnamespace = 'billing'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm')
   AND (EXISTS (SELECT 1 FROM aclexplode(c.relacl) AS a WHERE a.grantee = 0)
        OR has_table_privilege('sec_nobody', c.oid, 'SELECT')
        OR has_any_column_privilege('sec_nobody', c.oid, 'SELECT'));
-- service_role reads every billing table (no rows)
SELECT c.relname FROM pg_class AS c
 WHERE c.relnamespace = 'billing'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm')
   AND NOT has_table_privilege('service_role', c.oid, 'SELECT');
-- the end user still reads their own rows, the claimed profile without its token (none on a cluster)
SET LOCAL ROLE authenticated;
SELECT user_id FROM billing.accounts;
SELECT user_id, plan_id, status FROM billing.subscriptions;
SELECT email, plan_id, claimed FROM billing.pending_profiles;
SELECT tests.err($$SELECT token FROM billing.pending_profiles$$) AS token;
SELECT tests.err($$SELECT * FROM billing.pending_profiles$$) AS star;
SELECT tests.err($$SELECT count(*) FROM billing.pending_profiles WHERE token = 'tok-secret-51'$$) AS guess;
RESET ROLE;
-- no token column of any billing table is readable by anon or authenticated (no rows)
SELECT c.relname, a.attname, r.rolname
  FROM pg_class AS c JOIN pg_attribute AS a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
 CROSS JOIN (VALUES ('anon'), ('authenticated')) AS r(rolname)
 WHERE c.relnamespace = 'billing'::regnamespace AND a.attname ~ '(^|_)token(_|$)'
   AND has_column_privilege(r.rolname, c.oid, a.attnum, 'SELECT');
SELECT has_column_privilege('service_role', 'billing.pending_profiles', 'token', 'SELECT') AS service_reads_tokens;
SELECT set_config('request.jwt.claims', '', true) = '' AS claims_cleared;
ROLLBACK;
-- the end-user roles are those of pg_billing.end_user_roles that exist (a transaction of its own:
-- on a Citus cluster the grants are DDL on shards, refused once other roles' connections read them)
BEGIN;
CREATE ROLE sec_webuser NOLOGIN;
SET LOCAL pg_billing.end_user_roles = 'anon, authenticated, sec_webuser, sec_missing_role';
SELECT billing.apply_grants();
SELECT has_table_privilege('sec_webuser', 'billing.accounts', 'SELECT') AS accounts,
       has_table_privilege('sec_webuser', 'billing.idempotency_keys', 'SELECT') AS idempotency_keys,
       has_column_privilege('sec_webuser', 'billing.pending_profiles', 'email', 'SELECT') AS profile_email,
       has_column_privilege('sec_webuser', 'billing.pending_profiles', 'token', 'SELECT') AS profile_token;
RESET pg_billing.end_user_roles;

-- ===== the ledger matches every balance =====
SELECT count(*) AS ledger_mismatches FROM billing.verify_ledger();
ROLLBACK;
-- what this file committed: the rows of its users, its pending profile and webhook event
CREATE FUNCTION tests.forget_users(p_users uuid[]) RETURNS bigint LANGUAGE plpgsql AS $f$
DECLARE t regclass; n bigint; total bigint := 0;
BEGIN
    FOR t IN SELECT c.oid::regclass FROM pg_catalog.pg_class AS c
               JOIN pg_catalog.pg_attribute AS a ON a.attrelid = c.oid AND a.attname = 'user_id' AND NOT a.attisdropped
              WHERE c.relnamespace = 'billing'::regnamespace AND c.relkind IN ('r', 'p') ORDER BY 1
    LOOP
        EXECUTE format('DELETE FROM %s WHERE user_id = ANY ($1)', t) USING p_users;
        GET DIAGNOSTICS n = ROW_COUNT;
        total := total + n;
    END LOOP;
    RETURN total;
END
$f$;
SELECT tests.forget_users(ARRAY['00000000-0000-0000-0000-000000000051', '00000000-0000-0000-0000-000000000052']::uuid[]) > 0 AS forgotten;
DELETE FROM billing.pending_profiles WHERE email = 'sec51@example.com';
DELETE FROM billing.webhook_events WHERE event_id = 'evt_sec_1';
SET client_min_messages = warning;
DROP SCHEMA tests CASCADE;
RESET client_min_messages;
