-- API rate limits (SPEC 6): check_api_rate_limit counts one request in the current UTC hour when
-- the effective plan's api_rate_limit_hourly allows it: free 50/h (the 51st is refused),
-- remaining, reset_at = the next UTC hour, per-endpoint counts, -1 unlimited, 0 never allowed,
-- the monthly api_calls counter, security.
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
-- the start of the next UTC hour
CREATE FUNCTION tests.next_hour() RETURNS timestamptz LANGUAGE sql AS
$f$ SELECT (date_trunc('hour', now() AT TIME ZONE 'UTC') + interval '1 hour') AT TIME ZONE 'UTC' $f$;
GRANT EXECUTE ON FUNCTION tests.err(text), tests.next_hour() TO PUBLIC;
-- the calls, in order
CREATE TEMP TABLE calls (n int, endpoint text, allowed boolean, limit_value int, remaining int, reset_ok boolean);

-- ===== free plan (no subscription): 50 an hour =====
INSERT INTO calls
SELECT g, e.endpoint, r.allowed, r.limit_value, r.remaining, r.reset_at = tests.next_hour()
  FROM generate_series(1, 53) AS g
 CROSS JOIN LATERAL (SELECT CASE WHEN g % 3 = 0 THEN '/v1/snapshots' WHEN g % 3 = 1 THEN '/v1/render' END AS endpoint) AS e
 CROSS JOIN LATERAL billing.check_api_rate_limit('e0000000-0000-4000-8000-000000000301', e.endpoint) AS r;
-- one row per call, in order: remaining counts down, the 51st and later are refused
SELECT n, allowed, limit_value, remaining, reset_ok FROM calls WHERE n <= 3 OR n >= 48 ORDER BY n;
SELECT count(*) FILTER (WHERE allowed) AS allowed, count(*) FILTER (WHERE NOT allowed) AS refused,
       bool_and(reset_ok) AS reset_at_next_utc_hour,
       bool_and(remaining = CASE WHEN allowed THEN 50 - n ELSE 0 END) AS remaining_ok
  FROM calls;
-- the bucket: this UTC hour, 50 requests (refused ones are not counted), per endpoint
SELECT bucket_start = date_trunc('hour', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS this_hour,
       request_count, endpoint_counts
  FROM billing.api_usage WHERE user_id = 'e0000000-0000-4000-8000-000000000301';
SELECT (SELECT sum(value::int) FROM jsonb_each_text(endpoint_counts)) AS endpoint_total
  FROM billing.api_usage WHERE user_id = 'e0000000-0000-4000-8000-000000000301';
-- the allowed ones are counted in the monthly api_calls too, and in today's api_calls
SELECT api_calls_count FROM billing.get_user_current_usage('e0000000-0000-4000-8000-000000000301');
SELECT allowed, current_usage, limit_value FROM billing.check_monthly_limit('e0000000-0000-4000-8000-000000000301', 'api_calls');
-- still refused
SELECT allowed, limit_value, remaining FROM billing.check_api_rate_limit('e0000000-0000-4000-8000-000000000301', '/v1/render');
-- a previous hour's bucket does not count against this hour
INSERT INTO billing.api_usage (user_id, bucket_start, request_count)
VALUES ('e0000000-0000-4000-8000-000000000302', date_trunc('hour', now()) - interval '1 hour', 50);
SELECT allowed, limit_value, remaining, reset_at = tests.next_hour() AS reset_ok
  FROM billing.check_api_rate_limit('e0000000-0000-4000-8000-000000000302');

-- ===== the plan's limit: premium 500, ultra 2000, lapsed to free 50 =====
SELECT billing.upsert_subscription('e0000000-0000-4000-8000-000000000303', 'premium', 'active', now(), now() + interval '30 days') ->> 'applied' AS applied;
SELECT allowed, limit_value, remaining FROM billing.check_api_rate_limit('e0000000-0000-4000-8000-000000000303', '/v1/a');
SELECT billing.upsert_subscription('e0000000-0000-4000-8000-000000000303', 'ultra', 'active', now(), now() + interval '30 days') ->> 'applied' AS applied;
SELECT allowed, limit_value, remaining FROM billing.check_api_rate_limit('e0000000-0000-4000-8000-000000000303', '/v1/a');
UPDATE billing.subscriptions SET status = 'past_due', current_period_start = now() - interval '31 days', current_period_end = now() - interval '1 day'
 WHERE user_id = 'e0000000-0000-4000-8000-000000000303';
SELECT allowed, limit_value, remaining FROM billing.check_api_rate_limit('e0000000-0000-4000-8000-000000000303', '/v1/a');
SELECT request_count, endpoint_counts FROM billing.api_usage WHERE user_id = 'e0000000-0000-4000-8000-000000000303';

-- ===== -1: unlimited (still counted); 0: never allowed (nothing counted) =====
-- (the endpoint argument depends on g so that the call runs once per row)
INSERT INTO billing.plans (plan_id, display_name, api_rate_limit_hourly) VALUES ('test_rl_unlimited', 'Unlimited API', -1), ('test_rl_zero', 'No API', 0);
SELECT billing.upsert_subscription('e0000000-0000-4000-8000-000000000304', 'test_rl_unlimited', 'active', now(), now() + interval '30 days') ->> 'applied' AS applied;
SELECT billing.upsert_subscription('e0000000-0000-4000-8000-000000000305', 'test_rl_zero', 'active', now(), now() + interval '30 days') ->> 'applied' AS applied;
SELECT count(*) FILTER (WHERE r.allowed) AS allowed, min(r.limit_value) AS limit_value, max(r.remaining) AS remaining,
       bool_and(r.reset_at = tests.next_hour()) AS reset_ok
  FROM generate_series(1, 120) AS g
 CROSS JOIN LATERAL billing.check_api_rate_limit('e0000000-0000-4000-8000-000000000304', CASE WHEN g > 0 THEN '/v1/x' END) AS r;
SELECT request_count, endpoint_counts FROM billing.api_usage WHERE user_id = 'e0000000-0000-4000-8000-000000000304';
SELECT count(*) FILTER (WHERE r.allowed) AS allowed, min(r.limit_value) AS limit_value, max(r.remaining) AS remaining,
       bool_and(r.reset_at = tests.next_hour()) AS reset_ok
  FROM generate_series(1, 3) AS g
 CROSS JOIN LATERAL billing.check_api_rate_limit('e0000000-0000-4000-8000-000000000305', CASE WHEN g > 0 THEN '/v1/x' END) AS r;
SELECT count(*) AS buckets FROM billing.api_usage WHERE user_id = 'e0000000-0000-4000-8000-000000000305';
SELECT api_calls_count FROM billing.get_user_current_usage('e0000000-0000-4000-8000-000000000305');

-- ===== per-endpoint counts are bounded (0.3.0) =====
-- 0.2.0 added a key per distinct endpoint, of up to 255 characters, to the one row rewritten on
-- every request (unbounded on unlimited plans). Now: at most 32 endpoints by name per bucket,
-- each key the endpoint's first 64 characters, every further endpoint under "(other)".
SELECT billing.upsert_subscription('e0000000-0000-4000-8000-000000000307', 'test_rl_unlimited', 'active', now(), now() + interval '30 days') ->> 'applied' AS applied;
-- 300 distinct 255-character endpoints
SELECT count(*) FILTER (WHERE r.allowed) AS allowed
  FROM generate_series(1, 300) AS g
 CROSS JOIN LATERAL billing.check_api_rate_limit('e0000000-0000-4000-8000-000000000307',
                                                 '/v1/' || g || '/' || repeat('x', 250 - length(g::text))) AS r;
-- an endpoint counted by name keeps being counted by name; a new one goes to "(other)"
SELECT r.allowed FROM billing.check_api_rate_limit('e0000000-0000-4000-8000-000000000307', '/v1/1/' || repeat('x', 249)) AS r;
SELECT r.allowed FROM billing.check_api_rate_limit('e0000000-0000-4000-8000-000000000307', '/v1/brand-new') AS r;
SELECT request_count,
       (SELECT count(*) FROM jsonb_object_keys(endpoint_counts)) AS keys,
       endpoint_counts ->> '(other)' AS other,
       endpoint_counts ->> ('/v1/1/' || repeat('x', 58)) AS first_endpoint,
       (SELECT max(length(k)) FROM jsonb_object_keys(endpoint_counts) AS k) AS longest_key,
       (SELECT sum(value::int) FROM jsonb_each_text(endpoint_counts)) = request_count AS every_request_counted,
       pg_column_size(endpoint_counts) < 4000 AS row_stays_small
  FROM billing.api_usage WHERE user_id = 'e0000000-0000-4000-8000-000000000307';
-- longer than 255 characters (or with NUL): 22023 as before, nothing counted
SELECT tests.err($$SELECT * FROM billing.check_api_rate_limit('e0000000-0000-4000-8000-000000000307', repeat('y', 256))$$);
SELECT request_count FROM billing.api_usage WHERE user_id = 'e0000000-0000-4000-8000-000000000307';

-- ===== arguments =====
SELECT tests.err($$SELECT * FROM billing.check_api_rate_limit(NULL)$$);
SELECT tests.err($$SELECT * FROM billing.check_api_rate_limit(NULL, '/v1/x')$$);

-- ===== security =====
SET LOCAL ROLE authenticated;
SELECT set_config('request.jwt.claims', '{"sub":"e0000000-0000-4000-8000-000000000306","role":"authenticated"}', true) IS NOT NULL AS claims_set;
-- own: counted
SELECT allowed, limit_value, remaining, reset_at = tests.next_hour() AS reset_ok
  FROM billing.check_api_rate_limit('e0000000-0000-4000-8000-000000000306', '/v1/me');
-- single node only: Citus refuses an end user's read of rows postgres wrote earlier in this transaction
\if :single_node
SELECT request_count, endpoint_counts FROM billing.api_usage;
\endif
-- another user's: 42501, nothing counted
SELECT tests.err($$SELECT * FROM billing.check_api_rate_limit('e0000000-0000-4000-8000-000000000302', '/v1/x')$$);
-- no direct writes to the buckets
SELECT tests.err($$UPDATE billing.api_usage SET request_count = 0$$);
RESET ROLE;
SELECT set_config('request.jwt.claims', '', true) = '' AS claims_cleared;
SET LOCAL ROLE anon;
SELECT tests.err($$SELECT * FROM billing.check_api_rate_limit('e0000000-0000-4000-8000-000000000302', '/v1/x')$$);
RESET ROLE;
SELECT request_count FROM billing.api_usage WHERE user_id = 'e0000000-0000-4000-8000-000000000302' ORDER BY bucket_start;

ROLLBACK;
SET client_min_messages = warning;
DROP SCHEMA tests CASCADE;
RESET client_min_messages;
