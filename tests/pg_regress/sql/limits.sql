-- Resource limits (SPEC 6): an S5 app schema (agents, documents, products), register_resource
-- (validation: index on the user column, uuid column, names, tables only), check_resource_limit
-- (limit reached, -1 unlimited, unknown type), identifiers quoted safely, security.
-- Helpers live in schema tests, not pg_temp: on a Citus cluster a query that calls one may run on a worker.
CREATE SCHEMA tests;
GRANT USAGE ON SCHEMA tests TO PUBLIC;
BEGIN;
SET LOCAL TimeZone = 'UTC';
SET LOCAL DateStyle = 'ISO, YMD';
-- err(sql): 'SQLSTATE: message [hint]' instead of failing, so the file runs in one transaction.
CREATE FUNCTION tests.err(p_sql text) RETURNS text LANGUAGE plpgsql AS $f$
DECLARE st text; msg text; hint text;
BEGIN
    EXECUTE p_sql;
    RETURN 'no error';
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, hint = PG_EXCEPTION_HINT;
    RETURN regexp_replace(st || ': ' || msg || COALESCE(' [' || NULLIF(hint, '') || ']', ''),
                          '(?!e0000000-)[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}', '<uuid>', 'g');
END
$f$;
GRANT EXECUTE ON FUNCTION tests.err(text) TO PUBLIC;

-- ===== the app's schema (S5) =====
CREATE TABLE public.agents (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), user_id uuid NOT NULL, name text NOT NULL);
CREATE INDEX ON public.agents (user_id);
CREATE TABLE public.documents_rag (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), user_id uuid NOT NULL, title text);
CREATE INDEX ON public.documents_rag (user_id, title);
CREATE TABLE public.products (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), owner uuid NOT NULL, user_id uuid, sku text);
CREATE INDEX ON public.products (owner);
-- nothing registered yet: unknown type, 22023 saying none are registered
SELECT tests.err($$SELECT * FROM billing.check_resource_limit('e0000000-0000-4000-8000-000000000201', 'agents')$$);

-- ===== register_resource =====
SELECT billing.register_resource('agents', 'public.agents');
SELECT billing.register_resource('documents', 'public.documents_rag');
-- products counted by another column than user_id
SELECT billing.register_resource('products', 'public.products', 'owner');
SELECT resource_type, schema_name, table_name, user_column, limit_key FROM billing.resource_types ORDER BY resource_type;
-- a table without an index that starts with the user column: 22023 with a HINT giving the index
CREATE TABLE public.s5_notes (id uuid PRIMARY KEY, user_id uuid NOT NULL, body text);
CREATE INDEX ON public.s5_notes (body, user_id);
SELECT tests.err($$SELECT billing.register_resource('notes', 'public.s5_notes')$$);
-- the column is not a uuid: 22023
CREATE TABLE public.s5_text_owner (id uuid PRIMARY KEY, user_id text NOT NULL);
CREATE INDEX ON public.s5_text_owner (user_id);
SELECT tests.err($$SELECT billing.register_resource('text_owner', 'public.s5_text_owner')$$);
-- the column does not exist: 22023
SELECT tests.err($$SELECT billing.register_resource('agents2', 'public.agents', 'owner_id')$$);
-- bad type names: 22023
SELECT tests.err($$SELECT billing.register_resource('Agents', 'public.agents')$$);
SELECT tests.err($$SELECT billing.register_resource('agents-v2', 'public.agents')$$);
SELECT tests.err($$SELECT billing.register_resource('', 'public.agents')$$);
SELECT tests.err($$SELECT billing.register_resource('x; drop table public.agents', 'public.agents')$$);
SELECT tests.err($$SELECT billing.register_resource(NULL, 'public.agents')$$);
-- NULL table or column: 22023
SELECT tests.err($$SELECT billing.register_resource('agents2', NULL)$$);
SELECT tests.err($$SELECT billing.register_resource('agents2', 'public.agents', NULL)$$);
-- not a table (a view): 22023
-- (quietly: Citus warns that a view over a table of the coordinator stays local)
SET client_min_messages = error;
CREATE VIEW public.s5_agents_view AS SELECT * FROM public.agents;
RESET client_min_messages;
SELECT tests.err($$SELECT billing.register_resource('agents_view', 'public.s5_agents_view')$$);
-- the failed registrations left nothing behind
SELECT resource_type FROM billing.resource_types ORDER BY resource_type;

-- ===== check_resource_limit on the free plan (agents 1, documents 5, products 5) =====
SELECT * FROM billing.check_resource_limit('e0000000-0000-4000-8000-000000000201', 'agents');
INSERT INTO public.agents (user_id, name) VALUES ('e0000000-0000-4000-8000-000000000201', 'first');
-- another user's rows are not counted
INSERT INTO public.agents (user_id, name) SELECT 'e0000000-0000-4000-8000-000000000202', 'a' || g FROM generate_series(1, 3) AS g;
-- at the limit: allowed false
SELECT * FROM billing.check_resource_limit('e0000000-0000-4000-8000-000000000201', 'agents');
INSERT INTO public.agents (user_id, name) VALUES ('e0000000-0000-4000-8000-000000000201', 'second (over)');
SELECT * FROM billing.check_resource_limit('e0000000-0000-4000-8000-000000000201', 'agents');
INSERT INTO public.documents_rag (user_id, title) SELECT 'e0000000-0000-4000-8000-000000000201', 'doc' || g FROM generate_series(1, 4) AS g;
SELECT * FROM billing.check_resource_limit('e0000000-0000-4000-8000-000000000201', 'documents');
INSERT INTO public.documents_rag (user_id, title) VALUES ('e0000000-0000-4000-8000-000000000201', 'doc5');
SELECT * FROM billing.check_resource_limit('e0000000-0000-4000-8000-000000000201', 'documents');
-- products are counted by owner, not by user_id
INSERT INTO public.products (owner, user_id, sku) VALUES
    ('e0000000-0000-4000-8000-000000000201', 'e0000000-0000-4000-8000-000000000202', 'p1'),
    ('e0000000-0000-4000-8000-000000000201', NULL, 'p2'),
    ('e0000000-0000-4000-8000-000000000202', 'e0000000-0000-4000-8000-000000000201', 'p3');
SELECT * FROM billing.check_resource_limit('e0000000-0000-4000-8000-000000000201', 'products');
-- unknown type: 22023 listing the known ones; NULL: 22023
SELECT tests.err($$SELECT * FROM billing.check_resource_limit('e0000000-0000-4000-8000-000000000201', 'widgets')$$);
SELECT tests.err($$SELECT * FROM billing.check_resource_limit('e0000000-0000-4000-8000-000000000201', NULL)$$);
SELECT tests.err($$SELECT * FROM billing.check_resource_limit(NULL, 'agents')$$);

-- ===== plans: premium (agents 20), ultra (-1 = unlimited), lapsed back to free =====
SELECT billing.upsert_subscription('e0000000-0000-4000-8000-000000000201', 'premium', 'active', now(), now() + interval '30 days') ->> 'applied' AS applied;
SELECT * FROM billing.check_resource_limit('e0000000-0000-4000-8000-000000000201', 'agents');
SELECT billing.upsert_subscription('e0000000-0000-4000-8000-000000000201', 'ultra', 'active', now(), now() + interval '30 days') ->> 'applied' AS applied;
SELECT r.* FROM unnest(ARRAY['agents', 'documents', 'products']) AS t(ty)
 CROSS JOIN LATERAL billing.check_resource_limit('e0000000-0000-4000-8000-000000000201', t.ty) AS r;
UPDATE billing.subscriptions SET status = 'canceled', current_period_start = now() - interval '31 days', current_period_end = now() - interval '1 day'
 WHERE user_id = 'e0000000-0000-4000-8000-000000000201';
SELECT * FROM billing.check_resource_limit('e0000000-0000-4000-8000-000000000201', 'agents');
-- a plan with a limit of 0 allows nothing; a plan without the key is unlimited
INSERT INTO billing.plans (plan_id, display_name, limits) VALUES ('test_limits_zero', 'Zero agents', '{"agents": 0}');
SELECT billing.upsert_subscription('e0000000-0000-4000-8000-000000000203', 'test_limits_zero', 'active', now(), now() + interval '30 days') ->> 'applied' AS applied;
SELECT * FROM billing.check_resource_limit('e0000000-0000-4000-8000-000000000203', 'agents');
SELECT * FROM billing.check_resource_limit('e0000000-0000-4000-8000-000000000203', 'documents');

-- ===== re-registering replaces the entry; p_limit_key =====
SELECT billing.register_resource('documents', 'public.documents_rag', 'user_id', 'documents_per_month');
SELECT resource_type, table_name, user_column, limit_key FROM billing.resource_types WHERE resource_type = 'documents';
SELECT * FROM billing.check_resource_limit('e0000000-0000-4000-8000-000000000202', 'documents');
SELECT billing.register_resource('documents', 'public.documents_rag');

-- ===== identifiers are quoted: odd schema, table and column names =====
CREATE SCHEMA "s5 app""; drop schema public; --";
CREATE TABLE "s5 app""; drop schema public; --"."weird ""name" ("user id" uuid NOT NULL, label text);
CREATE INDEX ON "s5 app""; drop schema public; --"."weird ""name" ("user id");
SELECT billing.register_resource('weird', '"s5 app""; drop schema public; --"."weird ""name"', 'user id', 'products');
SELECT resource_type, schema_name, table_name, user_column, limit_key FROM billing.resource_types WHERE resource_type = 'weird';
INSERT INTO "s5 app""; drop schema public; --"."weird ""name" VALUES
    ('e0000000-0000-4000-8000-000000000202', 'a'), ('e0000000-0000-4000-8000-000000000202', 'b'), ('e0000000-0000-4000-8000-000000000201', 'c');
SELECT * FROM billing.check_resource_limit('e0000000-0000-4000-8000-000000000202', 'weird');
-- a table name that looks like SQL
CREATE TABLE public."agents WHERE true; --" (user_id uuid NOT NULL);
CREATE INDEX ON public."agents WHERE true; --" (user_id);
SELECT billing.register_resource('tricky', 'public."agents WHERE true; --"', 'user_id', 'agents');
SELECT * FROM billing.check_resource_limit('e0000000-0000-4000-8000-000000000202', 'tricky');
-- everything still exists
SELECT count(*) AS agents_rows FROM public.agents;
SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'public') AS public_exists;

-- ===== security =====
SET LOCAL ROLE authenticated;
SELECT set_config('request.jwt.claims', '{"sub":"e0000000-0000-4000-8000-000000000202","role":"authenticated"}', true) IS NOT NULL AS claims_set;
-- own: works
SELECT * FROM billing.check_resource_limit('e0000000-0000-4000-8000-000000000202', 'agents');
-- another user's: 42501
SELECT tests.err($$SELECT * FROM billing.check_resource_limit('e0000000-0000-4000-8000-000000000201', 'agents')$$);
-- service-only: register_resource, 42501
SELECT tests.err($$SELECT billing.register_resource('agents', 'public.agents')$$);
-- the registry is readable, not writable
SELECT count(*) > 0 AS registry_readable FROM billing.resource_types;
SELECT tests.err($$DELETE FROM billing.resource_types$$);
RESET ROLE;
SELECT set_config('request.jwt.claims', '{"sub":"e0000000-0000-4000-8000-000000000202","role":"authenticated"}', true) IS NOT NULL AS claims_set;
SELECT tests.err($$SELECT billing.register_resource('agents', 'public.agents')$$);
SELECT tests.err($$SELECT * FROM billing.check_resource_limit('e0000000-0000-4000-8000-000000000201', 'agents')$$);
SELECT set_config('request.jwt.claims', '', true) = '' AS claims_cleared;
SET LOCAL ROLE anon;
SELECT tests.err($$SELECT * FROM billing.check_resource_limit('e0000000-0000-4000-8000-000000000201', 'agents')$$);
RESET ROLE;
-- the registry is unchanged
SELECT resource_type, table_name, user_column, limit_key FROM billing.resource_types ORDER BY resource_type;

SELECT count(*) AS ledger_mismatches FROM billing.verify_ledger();
ROLLBACK;
SET client_min_messages = warning;
DROP SCHEMA tests CASCADE;
RESET client_min_messages;
