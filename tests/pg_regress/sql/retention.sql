-- Retention (0.2.0): cleanup_idempotency_keys and cleanup_webhook_events forget keys and event ids
-- older than an interval (at least 1 day), keep younger ones (which still replay / deduplicate),
-- refuse shorter or NULL intervals (22023, nothing deleted), and are service-only (42501).
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
                          '(?!f0000000-)[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}', '<uuid>', 'g');
END
$f$;
GRANT EXECUTE ON FUNCTION tests.err(text) TO PUBLIC;

-- ===== idempotency keys =====
SELECT (billing.add_purchased_credits('f0000000-0000-4000-8000-000000000001', 100)) ->> 'total_balance' AS granted;
SELECT r ->> 'consumed' AS consumed, r ->> 'total_balance' AS total
  FROM billing.consume_credits_v2('f0000000-0000-4000-8000-000000000001', 10, NULL, NULL, 'old-key') AS r;
SELECT r ->> 'consumed' AS consumed, r ->> 'total_balance' AS total
  FROM billing.consume_credits_v2('f0000000-0000-4000-8000-000000000001', 10, NULL, NULL, 'new-key') AS r;
-- the first key was used 40 days ago, the second 12 hours ago
UPDATE billing.idempotency_keys SET created_at = now() - interval '40 days'
 WHERE user_id = 'f0000000-0000-4000-8000-000000000001' AND idempotency_key = 'old-key';
UPDATE billing.idempotency_keys SET created_at = now() - interval '12 hours'
 WHERE user_id = 'f0000000-0000-4000-8000-000000000001' AND idempotency_key = 'new-key';
-- too short, NULL, absurd: 22023, nothing deleted
SELECT tests.err($$SELECT billing.cleanup_idempotency_keys('23 hours')$$);
SELECT tests.err($$SELECT billing.cleanup_idempotency_keys('-1 day')$$);
SELECT tests.err($$SELECT billing.cleanup_idempotency_keys(NULL)$$);
SELECT tests.err($$SELECT billing.cleanup_idempotency_keys('2000 years')$$);
SELECT count(*) AS keys FROM billing.idempotency_keys WHERE user_id = 'f0000000-0000-4000-8000-000000000001';
-- default 30 days: the 40-day-old key goes, the young one stays
SELECT billing.cleanup_idempotency_keys() AS deleted;
SELECT billing.cleanup_idempotency_keys() AS deleted_again;
SELECT idempotency_key FROM billing.idempotency_keys WHERE user_id = 'f0000000-0000-4000-8000-000000000001';
-- the young key still replays (nothing consumed) ...
SELECT r ->> 'consumed' AS consumed, r ->> 'total_balance' AS total
  FROM billing.consume_credits_v2('f0000000-0000-4000-8000-000000000001', 10, NULL, NULL, 'new-key') AS r;
-- ... the forgotten one is applied again, as documented
SELECT r ->> 'consumed' AS consumed, r ->> 'total_balance' AS total
  FROM billing.consume_credits_v2('f0000000-0000-4000-8000-000000000001', 10, NULL, NULL, 'old-key') AS r;
-- the ledger keeps every row's key
SELECT idempotency_key, count(*) AS ledger_rows FROM billing.credit_transactions
 WHERE user_id = 'f0000000-0000-4000-8000-000000000001' AND idempotency_key IS NOT NULL
 GROUP BY idempotency_key ORDER BY idempotency_key;
-- exactly 1 day: the 12-hour-old key stays
SELECT billing.cleanup_idempotency_keys('1 day') AS deleted_1_day;
SELECT count(*) FROM billing.verify_ledger();

-- ===== webhook event ids =====
SELECT billing.record_webhook_event('evt_old', 'invoice.paid') AS first_old;
SELECT billing.record_webhook_event('evt_new', 'invoice.paid') AS first_new;
UPDATE billing.webhook_events SET processed_at = now() - interval '100 days' WHERE event_id = 'evt_old';
SELECT tests.err($$SELECT billing.cleanup_webhook_events('1 hour')$$);
SELECT tests.err($$SELECT billing.cleanup_webhook_events(NULL)$$);
SELECT billing.cleanup_webhook_events() AS deleted;
SELECT billing.cleanup_webhook_events() AS deleted_again;
SELECT event_id FROM billing.webhook_events WHERE event_id IN ('evt_old', 'evt_new');
SELECT billing.record_webhook_event('evt_new', 'invoice.paid') AS new_is_still_known;
SELECT billing.record_webhook_event('evt_old', 'invoice.paid') AS old_is_new_again;

-- ===== a member's extra credits: the event id is what makes add_credits apply once =====
SELECT (billing.upsert_member('ret@example.com', 'pro')) IS NOT NULL AS member;
SELECT r ->> 'duplicate' AS duplicate, r ->> 'extra_credits' AS extra_credits
  FROM billing.add_credits((SELECT (billing.upsert_member('ret@example.com', 'pro')) ->> 'member_id')::uuid, 5, 'evt_credits') AS r;
SELECT r ->> 'duplicate' AS duplicate, r ->> 'extra_credits' AS extra_credits
  FROM billing.add_credits((SELECT (billing.upsert_member('ret@example.com', 'pro')) ->> 'member_id')::uuid, 5, 'evt_credits') AS r;
UPDATE billing.webhook_events SET processed_at = now() - interval '2 days' WHERE event_id = 'evt_credits';
SELECT billing.cleanup_webhook_events('3 days') AS deleted_3_days;
SELECT billing.cleanup_webhook_events('1 day') AS deleted_1_day;

-- ===== API usage buckets: cleanup_api_usage keeps at least one day (0.3.0) =====
-- 0.2.0 accepted '0' and deleted the current hour's buckets (everyone's rate limit reset).
SELECT allowed FROM billing.check_api_rate_limit('f0000000-0000-4000-8000-000000000002', '/v1/now');
INSERT INTO billing.api_usage (user_id, bucket_start, request_count)
VALUES ('f0000000-0000-4000-8000-000000000002', date_trunc('hour', now()) - interval '2 days', 5),
       ('f0000000-0000-4000-8000-000000000002', date_trunc('hour', now()) - interval '23 hours', 4);
SELECT tests.err($$SELECT billing.cleanup_api_usage('0')$$);
SELECT tests.err($$SELECT billing.cleanup_api_usage('1 hour')$$);
SELECT tests.err($$SELECT billing.cleanup_api_usage('23 hours 59 minutes')$$);
SELECT tests.err($$SELECT billing.cleanup_api_usage(NULL)$$);
SELECT count(*) AS buckets FROM billing.api_usage WHERE user_id = 'f0000000-0000-4000-8000-000000000002';
-- exactly 1 day: only the 2-day-old bucket goes; this hour's and the 23-hour-old one stay
SELECT billing.cleanup_api_usage('1 day') >= 1 AS deleted_1_day;
SELECT request_count, bucket_start = date_trunc('hour', now()) AS this_hour
  FROM billing.api_usage WHERE user_id = 'f0000000-0000-4000-8000-000000000002' ORDER BY bucket_start;

-- ===== security =====
SET LOCAL ROLE authenticated;
SELECT set_config('request.jwt.claims', '{"sub":"f0000000-0000-4000-8000-000000000001","role":"authenticated"}', true) IS NOT NULL AS claims_set;
SELECT tests.err($$SELECT billing.cleanup_idempotency_keys()$$);
SELECT tests.err($$SELECT billing.cleanup_webhook_events()$$);
SELECT tests.err($$DELETE FROM billing.idempotency_keys$$);
RESET ROLE;
-- claims of an end user without SET ROLE: still refused by the check inside
SELECT tests.err($$SELECT billing.cleanup_idempotency_keys()$$);
SELECT tests.err($$SELECT billing.cleanup_webhook_events()$$);
SELECT set_config('request.jwt.claims', '', true) = '' AS claims_cleared;
SET LOCAL ROLE anon;
SELECT tests.err($$SELECT billing.cleanup_idempotency_keys()$$);
SELECT tests.err($$SELECT billing.cleanup_webhook_events()$$);
RESET ROLE;
-- the service role may
SET LOCAL ROLE service_role;
SELECT billing.cleanup_idempotency_keys() AS service_deleted;
SELECT billing.cleanup_webhook_events() AS service_deleted;
RESET ROLE;
ROLLBACK;
SET client_min_messages = warning;
DROP SCHEMA tests CASCADE;
RESET client_min_messages;
