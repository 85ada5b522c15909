-- get_user_dashboard_stats (SPEC 6): one call with the effective plan and status, both credit
-- pools and their total, this period's usage counters, and each registered resource's count and
-- limit; for a user with nothing, after a subscription, credits, usage and resources, after the
-- subscription lapses; security.
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

-- the app's resources
CREATE TABLE public.agents (id serial PRIMARY KEY, user_id uuid NOT NULL);
CREATE INDEX ON public.agents (user_id);
CREATE TABLE public.documents_rag (id serial PRIMARY KEY, user_id uuid NOT NULL);
CREATE INDEX ON public.documents_rag (user_id);
CREATE TABLE public.products (id serial PRIMARY KEY, user_id uuid NOT NULL);
CREATE INDEX ON public.products (user_id);

-- ===== a user with nothing, no resource registered: free plan, zeros, empty resources =====
SELECT plan, plan_display_name, status, subscription_credits_balance, purchased_credits_balance, total_credits,
       period_start = date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS calendar_month,
       messages_count, conversations_count, tokens_input_count, tokens_output_count, api_calls_count,
       documents_processed_count, chunks_stored_count, generations_count, resources,
       limits = (SELECT p.limits FROM billing.plans AS p WHERE p.plan_id = 'free') AS free_limits
  FROM billing.get_user_dashboard_stats('e0000000-0000-4000-8000-000000000501');

SELECT billing.register_resource('agents', 'public.agents');
SELECT billing.register_resource('documents', 'public.documents_rag');
SELECT billing.register_resource('products', 'public.products');
SELECT resources FROM billing.get_user_dashboard_stats('e0000000-0000-4000-8000-000000000501');

-- ===== subscription, credits, usage, resources =====
SELECT billing.upsert_subscription('e0000000-0000-4000-8000-000000000501', 'pro', 'active',
                                   now() - interval '3 days', now() + interval '27 days') ->> 'credits_granted' AS granted;
SELECT billing.add_purchased_credits('e0000000-0000-4000-8000-000000000501', 250) ->> 'total_balance' AS total;
SELECT billing.consume_credits_v2('e0000000-0000-4000-8000-000000000501', 100) ->> 'total_balance' AS total;
SELECT billing.record_message_usage('e0000000-0000-4000-8000-000000000501', 100, 200);
SELECT billing.record_message_usage('e0000000-0000-4000-8000-000000000501', 30, 40);
SELECT billing.record_conversation_usage('e0000000-0000-4000-8000-000000000501');
SELECT billing.record_document_usage('e0000000-0000-4000-8000-000000000501', 17);
SELECT allowed FROM billing.check_api_rate_limit('e0000000-0000-4000-8000-000000000501', '/v1/chat');
SELECT allowed FROM billing.check_api_rate_limit('e0000000-0000-4000-8000-000000000501', '/v1/chat');
INSERT INTO public.agents (user_id) SELECT 'e0000000-0000-4000-8000-000000000501' FROM generate_series(1, 5);
INSERT INTO public.documents_rag (user_id) SELECT 'e0000000-0000-4000-8000-000000000501' FROM generate_series(1, 3);
-- another user's rows are not counted
INSERT INTO public.agents (user_id) VALUES ('e0000000-0000-4000-8000-000000000502');
INSERT INTO public.products (user_id) VALUES ('e0000000-0000-4000-8000-000000000502');
SELECT plan, plan_display_name, status, subscription_credits_balance, purchased_credits_balance, total_credits,
       period_start = now() - interval '3 days' AS sub_period_start, period_end = now() + interval '27 days' AS sub_period_end,
       messages_count, conversations_count, tokens_input_count, tokens_output_count, api_calls_count,
       documents_processed_count, chunks_stored_count, generations_count,
       limits = (SELECT p.limits FROM billing.plans AS p WHERE p.plan_id = 'pro') AS pro_limits
  FROM billing.get_user_dashboard_stats('e0000000-0000-4000-8000-000000000501');
-- each resource with its count and limit (pro: agents 5, documents 100, products 50)
SELECT r.key, r.value FROM billing.get_user_dashboard_stats('e0000000-0000-4000-8000-000000000501') AS d,
       jsonb_each(d.resources) AS r ORDER BY r.key;
-- the same numbers as the single-purpose functions
SELECT (SELECT d.resources -> 'agents' FROM billing.get_user_dashboard_stats('e0000000-0000-4000-8000-000000000501') AS d)
     = (SELECT jsonb_build_object('count', c.current_count, 'limit', c.max_allowed, 'allowed', c.allowed)
          FROM billing.check_resource_limit('e0000000-0000-4000-8000-000000000501', 'agents') AS c) AS agents_match;
SELECT (SELECT to_jsonb(u) FROM billing.get_user_current_usage('e0000000-0000-4000-8000-000000000501') AS u)
     = (SELECT jsonb_build_object('period_start', d.period_start, 'period_end', d.period_end, 'messages_count', d.messages_count,
                                  'conversations_count', d.conversations_count, 'tokens_input_count', d.tokens_input_count,
                                  'tokens_output_count', d.tokens_output_count, 'api_calls_count', d.api_calls_count,
                                  'documents_processed_count', d.documents_processed_count,
                                  'chunks_stored_count', d.chunks_stored_count, 'generations_count', d.generations_count)
          FROM billing.get_user_dashboard_stats('e0000000-0000-4000-8000-000000000501') AS d) AS usage_match;
SELECT (SELECT to_jsonb(c) - 'user_id' - 'available' FROM billing.get_user_credits('e0000000-0000-4000-8000-000000000501') AS c)
     = (SELECT jsonb_build_object('subscription_credits_balance', d.subscription_credits_balance,
                                  'purchased_credits_balance', d.purchased_credits_balance, 'total_balance', d.total_credits)
          FROM billing.get_user_dashboard_stats('e0000000-0000-4000-8000-000000000501') AS d) AS credits_match;

-- ===== ultra: unlimited resources =====
SELECT billing.upsert_subscription('e0000000-0000-4000-8000-000000000501', 'ultra', 'active',
                                   now() - interval '3 days', now() + interval '27 days') ->> 'credits_granted' AS granted;
SELECT plan, status, subscription_credits_balance, purchased_credits_balance, total_credits, resources
  FROM billing.get_user_dashboard_stats('e0000000-0000-4000-8000-000000000501');

-- ===== canceled, period over: the free plan, calendar month; process_expired_subscriptions =====
UPDATE billing.subscriptions SET status = 'canceled', current_period_start = now() - interval '40 days', current_period_end = now() - interval '10 days'
 WHERE user_id = 'e0000000-0000-4000-8000-000000000501';
SELECT plan, status, messages_count,
       period_start = date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS calendar_month, resources
  FROM billing.get_user_dashboard_stats('e0000000-0000-4000-8000-000000000501');
SELECT billing.process_expired_subscriptions() AS downgraded;
SELECT plan, status, subscription_credits_balance, purchased_credits_balance, total_credits
  FROM billing.get_user_dashboard_stats('e0000000-0000-4000-8000-000000000501');

-- ===== security =====
SELECT tests.err($$SELECT * FROM billing.get_user_dashboard_stats(NULL)$$);
SET LOCAL ROLE authenticated;
SELECT set_config('request.jwt.claims', '{"sub":"e0000000-0000-4000-8000-000000000502","role":"authenticated"}', true) IS NOT NULL AS claims_set;
SELECT plan, status, total_credits, messages_count, resources
  FROM billing.get_user_dashboard_stats('e0000000-0000-4000-8000-000000000502');
SELECT tests.err($$SELECT * FROM billing.get_user_dashboard_stats('e0000000-0000-4000-8000-000000000501')$$);
RESET ROLE;
SELECT set_config('request.jwt.claims', '', true) = '' AS claims_cleared;
SET LOCAL ROLE anon;
SELECT tests.err($$SELECT * FROM billing.get_user_dashboard_stats('e0000000-0000-4000-8000-000000000501')$$);
RESET ROLE;

SELECT count(*) AS ledger_mismatches FROM billing.verify_ledger();
ROLLBACK;
SET client_min_messages = warning;
DROP SCHEMA tests CASCADE;
RESET client_min_messages;
