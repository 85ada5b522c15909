-- billing.migrate_single_pool (SPEC 4, S4): importing legacy single-pool balances, splitting
-- purchased credits out of the purchase history without creating credits; idempotent; the
-- ledger holds. Also checks identifiers are validated against the catalog and quoted.
-- Helpers live in schema tests, not pg_temp: on a Citus cluster a query that calls one may run on a worker.
CREATE SCHEMA tests;
GRANT USAGE ON SCHEMA tests TO PUBLIC;
BEGIN;
SET LOCAL TimeZone = 'UTC';
SET LOCAL DateStyle = 'ISO, YMD';
CREATE FUNCTION tests.err(p_sql text) RETURNS text LANGUAGE plpgsql AS $f$
DECLARE st text; msg text; det text; hnt text;
BEGIN
    EXECUTE p_sql;
    RETURN 'no error';
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL, hnt = PG_EXCEPTION_HINT;
    RETURN regexp_replace(st || ': ' || msg || COALESCE(' [' || NULLIF(det, '') || ']', '') || COALESCE(' (' || NULLIF(hnt, '') || ')', ''),
                          '(?!00000000-0000-0000-0000-)[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}',
                          '<uuid>', 'g');
END
$f$;
-- pools(user): both pools and the ledger rows.
CREATE FUNCTION tests.pools(p_user uuid) RETURNS text LANGUAGE plpgsql AS $f$
BEGIN RETURN (
    SELECT format('sub=%s pur=%s ledger=[%s]',
                  a.subscription_credits_balance, a.purchased_credits_balance,
                  (SELECT string_agg(t.type || ' ' || t.pool || ' ' || t.amount, ', ' ORDER BY t.id)
                     FROM billing.credit_transactions AS t WHERE t.user_id = p_user))
      FROM (SELECT 1) AS one LEFT JOIN billing.accounts AS a ON a.user_id = p_user);
END
$f$;

-- ===== an S4-style legacy schema: profiles(credits) + credit_transactions(type, amount) =====
CREATE TABLE public.profiles (id uuid PRIMARY KEY, email text, credits integer);
CREATE TABLE public.credit_transactions (id bigserial PRIMARY KEY, user_id uuid, amount integer, type text, created_at timestamptz DEFAULT now());
INSERT INTO public.profiles VALUES
    ('00000000-0000-0000-0000-000000000a01', 'a@example.com', 500),  -- bought 200: 300 subscription + 200 purchased
    ('00000000-0000-0000-0000-000000000a02', 'b@example.com', 200),  -- bought 500, spent most: 0 + 200 (not 0 + 500)
    ('00000000-0000-0000-0000-000000000a03', 'c@example.com', 100),  -- never bought: 100 + 0
    ('00000000-0000-0000-0000-000000000a04', 'd@example.com', 0),    -- nothing left: an empty account
    ('00000000-0000-0000-0000-000000000a05', 'e@example.com', NULL), -- NULL balance: an empty account
    ('00000000-0000-0000-0000-000000000a06', 'f@example.com', 40);   -- already has an account (signed up)
INSERT INTO public.credit_transactions (user_id, amount, type) VALUES
    ('00000000-0000-0000-0000-000000000a01', 150, 'purchase'),
    ('00000000-0000-0000-0000-000000000a01', 50, 'purchase'),
    ('00000000-0000-0000-0000-000000000a01', -80, 'usage'),
    ('00000000-0000-0000-0000-000000000a01', 1000, 'subscription'),
    ('00000000-0000-0000-0000-000000000a02', 500, 'purchase'),
    ('00000000-0000-0000-0000-000000000a02', -300, 'usage'),
    ('00000000-0000-0000-0000-000000000a03', 100, 'bonus'),
    ('00000000-0000-0000-0000-000000000a03', -5, 'purchase'),   -- a negative "purchase" is not one
    ('00000000-0000-0000-0000-000000000a06', 30, 'purchase'),
    (NULL, 999, 'purchase');
SELECT billing.add_subscription_credits('00000000-0000-0000-0000-000000000a06', 10) ->> 'total_balance' AS existing_total;

SELECT billing.migrate_single_pool('public.profiles', 'id', 'credits', 'public.credit_transactions') AS imported;
SELECT p.id, p.credits AS legacy, tests.pools(p.id) FROM public.profiles AS p ORDER BY p.id;
-- totals are preserved exactly (plus the existing account's own 10)
SELECT sum(p.credits) AS legacy_total,
       (SELECT sum(a.subscription_credits_balance + a.purchased_credits_balance) - 10 FROM billing.accounts AS a
         WHERE a.user_id IN (SELECT id FROM public.profiles)) AS imported_total
  FROM public.profiles AS p;
SELECT i.user_id, i.source_table, i.legacy_balance, i.purchases_sum, i.subscription_credits, i.purchased_credits
  FROM billing.legacy_imports AS i ORDER BY i.user_id;
SELECT DISTINCT t.reference_id, t.description FROM billing.credit_transactions AS t WHERE t.type = 'migration' ORDER BY 2;
-- re-running imports nothing twice
SELECT billing.migrate_single_pool('public.profiles', 'id', 'credits', 'public.credit_transactions') AS imported_again;
-- a user added to the legacy table later is imported by the next run
INSERT INTO public.profiles VALUES ('00000000-0000-0000-0000-000000000a07', 'g@example.com', 70);
SELECT billing.migrate_single_pool('public.profiles', 'id', 'credits', 'public.credit_transactions') AS imported_new;
SELECT tests.pools('00000000-0000-0000-0000-000000000a07');
-- imported purchased credits survive an expiration, like any purchased credits
SELECT billing.expire_subscription_credits('00000000-0000-0000-0000-000000000a01') ->> 'purchased_credits_balance' AS purchased_after_expiry;

-- ===== without a purchase history: everything is subscription credit =====
CREATE TABLE public."Legacy Users" ("User Id" uuid, "Credit Balance" numeric(12,2));
INSERT INTO public."Legacy Users" VALUES
    ('00000000-0000-0000-0000-000000000b01', 12.75),  -- fractions are dropped, never rounded up
    ('00000000-0000-0000-0000-000000000b02', 5),
    ('00000000-0000-0000-0000-000000000b02', 6),      -- several rows of one user are summed
    (NULL, 100);
SELECT billing.migrate_single_pool('public."Legacy Users"', 'User Id', 'Credit Balance') AS imported_quoted;
SELECT tests.pools('00000000-0000-0000-0000-000000000b01');
SELECT tests.pools('00000000-0000-0000-0000-000000000b02');
SELECT i.source_table FROM billing.legacy_imports AS i WHERE i.user_id = '00000000-0000-0000-0000-000000000b02';
-- purchases table whose user column has the same name as p_table's
CREATE TABLE public.legacy_buys ("User Id" uuid, amount bigint, type varchar(20));
INSERT INTO public.legacy_buys VALUES ('00000000-0000-0000-0000-000000000c01', 8, 'purchase');
CREATE TABLE public.legacy_wallets ("User Id" uuid, "Credit Balance" bigint);
INSERT INTO public.legacy_wallets VALUES ('00000000-0000-0000-0000-000000000c01', 10);
SELECT billing.migrate_single_pool('public.legacy_wallets', 'User Id', 'Credit Balance', 'public.legacy_buys') AS imported_same_column;
SELECT tests.pools('00000000-0000-0000-0000-000000000c01');

-- ===== errors: columns validated against the catalog (22023), nothing imported =====
SELECT tests.err($$SELECT billing.migrate_single_pool('public.profiles', 'nope', 'credits')$$);
SELECT tests.err($$SELECT billing.migrate_single_pool('public.profiles', 'id', 'nope')$$);
SELECT tests.err($$SELECT billing.migrate_single_pool('public.profiles', 'email', 'credits')$$);
SELECT tests.err($$SELECT billing.migrate_single_pool('public.profiles', 'id', 'email')$$);
SELECT tests.err($$SELECT billing.migrate_single_pool('public.profiles', 'id; DROP TABLE public.profiles', 'credits')$$);
SELECT tests.err($$SELECT billing.migrate_single_pool('public.profiles', 'id', 'credits', 'public."Legacy Users"')$$);
CREATE TABLE public.no_type (user_id uuid, amount integer);
SELECT tests.err($$SELECT billing.migrate_single_pool('public.profiles', 'id', 'credits', 'public.no_type')$$);
CREATE TABLE public.text_amount (user_id uuid, amount text, type text);
SELECT tests.err($$SELECT billing.migrate_single_pool('public.profiles', 'id', 'credits', 'public.text_amount')$$);
SELECT tests.err($$SELECT billing.migrate_single_pool(NULL, 'id', 'credits')$$);
SELECT tests.err($$SELECT billing.migrate_single_pool('public.profiles', NULL, 'credits')$$);
SELECT tests.err($$SELECT billing.migrate_single_pool('public.profiles', 'id', NULL)$$);
-- (an unknown table fails in PostgreSQL's own regclass input, before the call: 42P01)
SELECT tests.err($$SELECT billing.migrate_single_pool('public.no_such_table', 'id', 'credits')$$);
CREATE SEQUENCE public.not_a_table;
SELECT tests.err($$SELECT billing.migrate_single_pool('public.not_a_table', 'id', 'credits')$$);
SELECT count(*) AS profiles_still_there FROM public.profiles;

-- ===== only the owner may run it; service-only inside as well =====
SELECT has_function_privilege('service_role', 'billing.migrate_single_pool(regclass, name, name, regclass)', 'EXECUTE') AS service_role_may,
       has_function_privilege('authenticated', 'billing.migrate_single_pool(regclass, name, name, regclass)', 'EXECUTE') AS authenticated_may,
       has_function_privilege('authenticated', 'billing._migrate_single_pool(oid, text, text, oid)', 'EXECUTE') AS authenticated_may_internal,
       obj_description('billing.migrate_single_pool(regclass, name, name, regclass)'::regprocedure, 'pg_proc') IS NOT NULL AS documented;
SELECT count(*) AS in_api_catalog FROM billing.api_catalog() WHERE function_name LIKE '%migrate%';
SELECT set_config('request.jwt.claims', '{"sub":"00000000-0000-0000-0000-000000000a01","role":"authenticated"}', true) IS NOT NULL AS claims_set;
SELECT tests.err($$SELECT billing.migrate_single_pool('public.profiles', 'id', 'credits')$$);
SELECT set_config('request.jwt.claims', '', true) = '' AS claims_cleared;

SELECT * FROM billing.verify_ledger();
ROLLBACK;
SET client_min_messages = warning;
DROP SCHEMA tests CASCADE;
RESET client_min_messages;
