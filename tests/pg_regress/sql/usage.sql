-- Usage metering (SPEC 6): record_message_usage, record_conversation_usage, record_document_usage,
-- get_user_current_usage (calendar month without a subscription, the subscription period with
-- one), check_monthly_limit for every metric (api_calls: today's hourly buckets), -1 = unlimited,
-- reset_monthly_usage, cleanup_api_usage, argument errors (22023) and security (42501).
-- Helpers live in schema tests, not pg_temp: on a Citus cluster a query that calls one may run on a worker.
CREATE SCHEMA tests;
GRANT USAGE ON SCHEMA tests TO PUBLIC;
-- single_node: false on a Citus cluster, where the sections marked 'single node only' are skipped
SELECT NOT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'citus') AS single_node \gset
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
-- usage(user): the counters of get_user_current_usage, without the period.
CREATE FUNCTION tests.usage(p_user uuid) RETURNS text LANGUAGE sql AS $f$
    SELECT format('messages=%s conversations=%s tokens_in=%s tokens_out=%s api_calls=%s documents=%s chunks=%s generations=%s',
                  u.messages_count, u.conversations_count, u.tokens_input_count, u.tokens_output_count,
                  u.api_calls_count, u.documents_processed_count, u.chunks_stored_count, u.generations_count)
      FROM billing.get_user_current_usage(p_user) AS u
$f$;
-- the UTC calendar month, for comparisons
CREATE FUNCTION tests.month_start() RETURNS timestamptz LANGUAGE sql AS
$f$ SELECT date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' $f$;
CREATE FUNCTION tests.month_end() RETURNS timestamptz LANGUAGE sql AS
$f$ SELECT (date_trunc('month', now() AT TIME ZONE 'UTC') + interval '1 month') AT TIME ZONE 'UTC' $f$;
GRANT EXECUTE ON FUNCTION tests.err(text), tests.usage(uuid) TO PUBLIC;

-- ===== nothing recorded: zeros, the calendar month, no row written =====
SELECT tests.usage('e0000000-0000-4000-8000-000000000101');
SELECT period_start = tests.month_start() AS start_is_month, period_end = tests.month_end() AS end_is_next_month
  FROM billing.get_user_current_usage('e0000000-0000-4000-8000-000000000101');
SELECT count(*) AS rows FROM billing.usage_metrics WHERE user_id = 'e0000000-0000-4000-8000-000000000101';

-- ===== recorders (no subscription: the calendar month's row) =====
SELECT billing.record_message_usage('e0000000-0000-4000-8000-000000000101', 120, 340);
SELECT billing.record_message_usage('e0000000-0000-4000-8000-000000000101', 0, 0);
SELECT billing.record_message_usage('e0000000-0000-4000-8000-000000000101', 5, 7);
SELECT billing.record_conversation_usage('e0000000-0000-4000-8000-000000000101');
SELECT billing.record_conversation_usage('e0000000-0000-4000-8000-000000000101');
SELECT billing.record_document_usage('e0000000-0000-4000-8000-000000000101', 12);
SELECT billing.record_document_usage('e0000000-0000-4000-8000-000000000101', 0);
SELECT tests.usage('e0000000-0000-4000-8000-000000000101');
SELECT count(*) AS rows, bool_and(period_start = tests.month_start() AND period_end = tests.month_end()) AS calendar_month
  FROM billing.usage_metrics WHERE user_id = 'e0000000-0000-4000-8000-000000000101';

-- ===== 22023: negative or NULL arguments; nothing recorded =====
SELECT tests.err($$SELECT billing.record_message_usage('e0000000-0000-4000-8000-000000000101', -1, 5)$$);
SELECT tests.err($$SELECT billing.record_message_usage('e0000000-0000-4000-8000-000000000101', 5, -1)$$);
SELECT tests.err($$SELECT billing.record_message_usage('e0000000-0000-4000-8000-000000000101', NULL, 5)$$);
SELECT tests.err($$SELECT billing.record_message_usage('e0000000-0000-4000-8000-000000000101', 5, NULL)$$);
SELECT tests.err($$SELECT billing.record_message_usage(NULL, 1, 1)$$);
SELECT tests.err($$SELECT billing.record_conversation_usage(NULL)$$);
SELECT tests.err($$SELECT billing.record_document_usage('e0000000-0000-4000-8000-000000000101', -3)$$);
SELECT tests.err($$SELECT billing.record_document_usage('e0000000-0000-4000-8000-000000000101', NULL)$$);
SELECT tests.err($$SELECT billing.record_document_usage(NULL, 1)$$);
SELECT tests.err($$SELECT * FROM billing.get_user_current_usage(NULL)$$);
SELECT tests.usage('e0000000-0000-4000-8000-000000000101');

-- ===== with a subscription: the subscription's period =====
SELECT billing.upsert_subscription('e0000000-0000-4000-8000-000000000102', 'pro', 'active',
                                   now() - interval '10 days', now() + interval '20 days') ->> 'applied' AS applied;
SELECT tests.usage('e0000000-0000-4000-8000-000000000102');
SELECT period_start = now() - interval '10 days' AS start_is_sub, period_end = now() + interval '20 days' AS end_is_sub
  FROM billing.get_user_current_usage('e0000000-0000-4000-8000-000000000102');
SELECT billing.record_message_usage('e0000000-0000-4000-8000-000000000102', 10, 20);
SELECT billing.record_conversation_usage('e0000000-0000-4000-8000-000000000102');
SELECT tests.usage('e0000000-0000-4000-8000-000000000102');
-- (now() read here: in a query on a Citus cluster's worker, now() is the worker's transaction start)
SELECT now() AS tx_now \gset
SELECT count(*) AS rows, bool_and(period_start = :'tx_now'::timestamptz - interval '10 days' AND period_end = :'tx_now'::timestamptz + interval '20 days') AS sub_period
  FROM billing.usage_metrics WHERE user_id = 'e0000000-0000-4000-8000-000000000102';
-- a subscription whose period is over (renewal not yet received): back to the calendar month
SELECT billing.upsert_subscription('e0000000-0000-4000-8000-000000000103', 'pro', 'active',
                                   now() - interval '40 days', now() - interval '10 days') ->> 'applied' AS applied;
SELECT period_start = tests.month_start() AS start_is_month, period_end = tests.month_end() AS end_is_next_month
  FROM billing.get_user_current_usage('e0000000-0000-4000-8000-000000000103');

-- ===== check_monthly_limit: every metric on the free plan (user 101: no subscription) =====
-- a generation and today's API calls, written directly (another system records generations;
-- check_api_rate_limit fills the hourly buckets): this hour and an earlier hour of today count,
-- yesterday's bucket does not
UPDATE billing.usage_metrics SET generations_count = 4 WHERE user_id = 'e0000000-0000-4000-8000-000000000101';
INSERT INTO billing.api_usage (user_id, bucket_start, request_count) VALUES
    ('e0000000-0000-4000-8000-000000000101', date_trunc('hour', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', 30),
    ('e0000000-0000-4000-8000-000000000101', date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' - interval '1 hour', 500);
SELECT m.* FROM unnest(ARRAY['messages', 'conversations', 'tokens_input', 'tokens_output', 'documents', 'api_calls', 'generations']) AS k(metric)
 CROSS JOIN LATERAL billing.check_monthly_limit('e0000000-0000-4000-8000-000000000101', k.metric) AS m;
-- an earlier hour of today counts too (unless this hour is the first of the day)
INSERT INTO billing.api_usage (user_id, bucket_start, request_count)
SELECT 'e0000000-0000-4000-8000-000000000101', date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', 20
 WHERE date_trunc('day', now() AT TIME ZONE 'UTC') <> date_trunc('hour', now() AT TIME ZONE 'UTC')
ON CONFLICT (user_id, bucket_start) DO UPDATE SET request_count = billing.api_usage.request_count + 20;
SELECT allowed, current_usage = 30 + CASE WHEN date_trunc('day', now() AT TIME ZONE 'UTC') <> date_trunc('hour', now() AT TIME ZONE 'UTC')
                                         THEN 20 ELSE 0 END AS current_usage_ok, limit_value
  FROM billing.check_monthly_limit('e0000000-0000-4000-8000-000000000101', 'api_calls');
-- at the limit: allowed false (free: 100 messages a month)
SELECT billing.record_message_usage('e0000000-0000-4000-8000-000000000101', 1, 1) FROM generate_series(1, 96);
SELECT * FROM billing.check_monthly_limit('e0000000-0000-4000-8000-000000000101', 'messages');
SELECT billing.record_message_usage('e0000000-0000-4000-8000-000000000101', 1, 1);
SELECT * FROM billing.check_monthly_limit('e0000000-0000-4000-8000-000000000101', 'messages');
SELECT billing.record_message_usage('e0000000-0000-4000-8000-000000000101', 1, 1);
SELECT * FROM billing.check_monthly_limit('e0000000-0000-4000-8000-000000000101', 'messages');
-- api_calls at the daily limit (free: 100 a day); only this hour's bucket is kept, with 100
DELETE FROM billing.api_usage
 WHERE user_id = 'e0000000-0000-4000-8000-000000000101' AND bucket_start <> date_trunc('hour', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
UPDATE billing.api_usage SET request_count = 99 WHERE user_id = 'e0000000-0000-4000-8000-000000000101';
SELECT allowed, current_usage, limit_value FROM billing.check_monthly_limit('e0000000-0000-4000-8000-000000000101', 'api_calls');
UPDATE billing.api_usage SET request_count = 100 WHERE user_id = 'e0000000-0000-4000-8000-000000000101';
SELECT allowed, current_usage, limit_value FROM billing.check_monthly_limit('e0000000-0000-4000-8000-000000000101', 'api_calls');
-- unknown metric: 22023; NULL: 22023
SELECT tests.err($$SELECT * FROM billing.check_monthly_limit('e0000000-0000-4000-8000-000000000101', 'widgets')$$);
SELECT tests.err($$SELECT * FROM billing.check_monthly_limit('e0000000-0000-4000-8000-000000000101', NULL)$$);
SELECT tests.err($$SELECT * FROM billing.check_monthly_limit(NULL, 'messages')$$);
-- the pro subscription's limits (user 102), nothing recorded for some metrics
SELECT m.* FROM unnest(ARRAY['messages', 'conversations', 'tokens_input', 'tokens_output', 'documents', 'api_calls', 'generations']) AS k(metric)
 CROSS JOIN LATERAL billing.check_monthly_limit('e0000000-0000-4000-8000-000000000102', k.metric) AS m;

-- ===== -1 = unlimited (ultra), and a missing limits key is unlimited too =====
SELECT billing.upsert_subscription('e0000000-0000-4000-8000-000000000104', 'ultra', 'active', now(), now() + interval '30 days') ->> 'applied' AS applied;
SELECT billing.record_message_usage('e0000000-0000-4000-8000-000000000104', 1000000, 2000000) FROM generate_series(1, 3);
SELECT m.* FROM unnest(ARRAY['messages', 'conversations', 'tokens_input', 'tokens_output', 'documents', 'api_calls', 'generations']) AS k(metric)
 CROSS JOIN LATERAL billing.check_monthly_limit('e0000000-0000-4000-8000-000000000104', k.metric) AS m;
INSERT INTO billing.plans (plan_id, display_name, limits) VALUES ('test_usage_nolimits', 'No limits key', '{"messages_per_month": 0}');
SELECT billing.upsert_subscription('e0000000-0000-4000-8000-000000000105', 'test_usage_nolimits', 'active', now(), now() + interval '30 days') ->> 'applied' AS applied;
-- 0 = nothing allowed; a key that is not there = unlimited
SELECT * FROM billing.check_monthly_limit('e0000000-0000-4000-8000-000000000105', 'messages');
SELECT * FROM billing.check_monthly_limit('e0000000-0000-4000-8000-000000000105', 'conversations');

-- ===== a lapsed subscription's usage is checked against the free plan =====
UPDATE billing.subscriptions SET status = 'canceled', current_period_end = now() + interval '1 second'
 WHERE user_id = 'e0000000-0000-4000-8000-000000000102';
SELECT limit_value FROM billing.check_monthly_limit('e0000000-0000-4000-8000-000000000102', 'messages');
UPDATE billing.subscriptions SET current_period_end = now() - interval '1 second'
 WHERE user_id = 'e0000000-0000-4000-8000-000000000102';
SELECT limit_value FROM billing.check_monthly_limit('e0000000-0000-4000-8000-000000000102', 'messages');

-- ===== reset_monthly_usage: opens the current period for users whose period ended =====
-- user 106 has only last month's row (written directly); user 101 has the current one
INSERT INTO billing.usage_metrics (user_id, period_start, period_end, messages_count)
VALUES ('e0000000-0000-4000-8000-000000000106', tests.month_start() - interval '1 month', tests.month_start(), 77);
SELECT tests.usage('e0000000-0000-4000-8000-000000000106');
SELECT billing.reset_monthly_usage() AS opened;
SELECT period_start = tests.month_start() AS current_month, period_end = tests.month_end() AS ends_next_month, messages_count
  FROM billing.usage_metrics WHERE user_id = 'e0000000-0000-4000-8000-000000000106' ORDER BY period_start;
SELECT tests.usage('e0000000-0000-4000-8000-000000000106');
-- again: nothing to open
SELECT billing.reset_monthly_usage() AS opened_again;
-- usage recorded after the reset goes to the new row
SELECT billing.record_message_usage('e0000000-0000-4000-8000-000000000106', 1, 2);
SELECT messages_count, tokens_input_count FROM billing.usage_metrics
 WHERE user_id = 'e0000000-0000-4000-8000-000000000106' ORDER BY period_start;
-- a user whose subscription period ended and renewed: the new row follows the new period
INSERT INTO billing.usage_metrics (user_id, period_start, period_end, messages_count)
VALUES ('e0000000-0000-4000-8000-000000000107', now() - interval '35 days', now() - interval '5 days', 9);
SELECT billing.upsert_subscription('e0000000-0000-4000-8000-000000000107', 'pro', 'active', now() - interval '5 days', now() + interval '25 days') ->> 'applied' AS applied;
SELECT billing.reset_monthly_usage() AS opened;
SELECT period_start = :'tx_now'::timestamptz - interval '5 days' AS sub_period, messages_count
  FROM billing.usage_metrics WHERE user_id = 'e0000000-0000-4000-8000-000000000107' ORDER BY period_start;

-- ===== cleanup_api_usage =====
INSERT INTO billing.api_usage (user_id, bucket_start, request_count) VALUES
    ('e0000000-0000-4000-8000-000000000108', date_trunc('hour', now()) - interval '10 days', 3),
    ('e0000000-0000-4000-8000-000000000108', date_trunc('hour', now()) - interval '8 days', 3),
    ('e0000000-0000-4000-8000-000000000108', date_trunc('hour', now()) - interval '2 days', 3),
    ('e0000000-0000-4000-8000-000000000108', date_trunc('hour', now()), 3);
SELECT count(*) AS buckets FROM billing.api_usage;
-- default: older than 7 days (the two of user 108; user 101's is this hour's)
SELECT billing.cleanup_api_usage() AS deleted;
SELECT billing.cleanup_api_usage() AS deleted_again;
SELECT billing.cleanup_api_usage('1 day') AS deleted_1_day;
SELECT count(*) AS buckets_of_108 FROM billing.api_usage WHERE user_id = 'e0000000-0000-4000-8000-000000000108';
-- a negative interval or NULL: 22023, nothing deleted
SELECT tests.err($$SELECT billing.cleanup_api_usage('-1 day')$$);
SELECT tests.err($$SELECT billing.cleanup_api_usage(NULL)$$);
SELECT count(*) AS buckets_of_108 FROM billing.api_usage WHERE user_id = 'e0000000-0000-4000-8000-000000000108';

-- ===== security =====
SET LOCAL ROLE authenticated;
SELECT set_config('request.jwt.claims', '{"sub":"e0000000-0000-4000-8000-000000000101","role":"authenticated"}', true) IS NOT NULL AS claims_set;
-- own: works
SELECT tests.usage('e0000000-0000-4000-8000-000000000101');
SELECT allowed, current_usage, limit_value FROM billing.check_monthly_limit('e0000000-0000-4000-8000-000000000101', 'messages');
-- another user's: 42501
SELECT tests.err($$SELECT * FROM billing.get_user_current_usage('e0000000-0000-4000-8000-000000000102')$$);
SELECT tests.err($$SELECT * FROM billing.check_monthly_limit('e0000000-0000-4000-8000-000000000102', 'messages')$$);
-- service-only: 42501, even for the own id
SELECT tests.err($$SELECT billing.record_message_usage('e0000000-0000-4000-8000-000000000101', 1, 1)$$);
SELECT tests.err($$SELECT billing.record_conversation_usage('e0000000-0000-4000-8000-000000000101')$$);
SELECT tests.err($$SELECT billing.record_document_usage('e0000000-0000-4000-8000-000000000101', 1)$$);
SELECT tests.err($$SELECT billing.cleanup_api_usage()$$);
SELECT tests.err($$SELECT billing.reset_monthly_usage()$$);
-- no direct writes
SELECT tests.err($$UPDATE billing.usage_metrics SET messages_count = 0$$);
SELECT tests.err($$DELETE FROM billing.api_usage$$);
-- RLS: only the own rows
-- single node only: Citus refuses an end user's read of rows postgres wrote earlier in this transaction
\if :single_node
SELECT count(DISTINCT user_id) AS users_visible FROM billing.usage_metrics;
SELECT count(DISTINCT user_id) AS users_visible FROM billing.api_usage;
\endif
RESET ROLE;
-- the internal checks hold without the privilege check (claims say authenticated)
SELECT set_config('request.jwt.claims', '{"sub":"e0000000-0000-4000-8000-000000000101","role":"authenticated"}', true) IS NOT NULL AS claims_set;
SELECT tests.err($$SELECT billing.record_message_usage('e0000000-0000-4000-8000-000000000101', 1, 1)$$);
SELECT tests.err($$SELECT billing.record_conversation_usage('e0000000-0000-4000-8000-000000000101')$$);
SELECT tests.err($$SELECT billing.record_document_usage('e0000000-0000-4000-8000-000000000101', 1)$$);
SELECT tests.err($$SELECT billing.cleanup_api_usage()$$);
SELECT tests.err($$SELECT billing.reset_monthly_usage()$$);
SELECT tests.err($$SELECT * FROM billing.get_user_current_usage('e0000000-0000-4000-8000-000000000102')$$);
SELECT set_config('request.jwt.claims', '', true) = '' AS claims_cleared;
-- anon: no access
SET LOCAL ROLE anon;
SELECT tests.err($$SELECT * FROM billing.get_user_current_usage('e0000000-0000-4000-8000-000000000101')$$);
SELECT tests.err($$SELECT * FROM billing.check_monthly_limit('e0000000-0000-4000-8000-000000000101', 'messages')$$);
RESET ROLE;
-- the denied calls changed nothing
SELECT tests.usage('e0000000-0000-4000-8000-000000000101');

SELECT count(*) AS ledger_mismatches FROM billing.verify_ledger();
ROLLBACK;
SET client_min_messages = warning;
DROP SCHEMA tests CASCADE;
RESET client_min_messages;
