-- pg_billing 0.1.0 -> 0.2.0: retention of idempotency keys and webhook event ids.
--
-- Idempotent (SPEC 12: Citus may run an upgrade script on every node): every statement may run
-- again on a database that has it already. tests/stress/upgrade.py runs this file a second time
-- after ALTER EXTENSION ... UPDATE and checks nothing changed, and compares the upgraded catalog
-- with a fresh 0.2.0 install.
--
-- What changes:
--   - billing.cleanup_idempotency_keys(interval) and billing.cleanup_webhook_events(interval),
--     service-only maintenance, with the indexes they use; the internal billing.check_retention,
--     which cleanup_api_usage now also uses. The index builds take a SHARE lock on
--     billing.idempotency_keys and billing.webhook_events for as long as the build runs.
--   - The shared library: expire_subscription_credits on an empty subscription pool no longer
--     takes the account's row lock (no SQL change).
\echo Use "ALTER EXTENSION pg_billing UPDATE TO '0.2.0'" to load this file. \quit

CREATE INDEX IF NOT EXISTS idempotency_keys_created_at_idx ON billing.idempotency_keys (created_at);
CREATE INDEX IF NOT EXISTS webhook_events_processed_at_idx ON billing.webhook_events (processed_at);

COMMENT ON TABLE billing.idempotency_keys IS 'p_idempotency_key of credit mutators, per user: the request fingerprint and the first response, replayed on repeats. cleanup_idempotency_keys deletes old keys.';
COMMENT ON TABLE billing.webhook_events IS 'Provider webhook event ids already processed (record_webhook_event). cleanup_webhook_events deletes old ids.';

-- The argument of every cleanup_* function (0.2.0): service-only, an interval between p_at_least
-- and 1000 years, checked before anything is deleted.
CREATE OR REPLACE FUNCTION billing.check_retention(p_function text, p_older_than interval, p_at_least interval, p_hint text)
RETURNS void LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET IntervalStyle = 'postgres' AS $$
BEGIN
    PERFORM billing.require_service(p_function);
    IF p_older_than IS NULL OR p_older_than < p_at_least OR p_older_than > interval '1000 years' THEN
        RAISE EXCEPTION 'p_older_than must be an interval between % and 1000 years',
                        CASE WHEN p_at_least = interval '0' THEN '0' ELSE p_at_least::text END
            USING ERRCODE = '22023', HINT = COALESCE(p_hint, 'pass an interval such as ''7 days''');
    END IF;
END
$$;
COMMENT ON FUNCTION billing.check_retention(text, interval, interval, text) IS 'Internal: raises 42501 for an end user and 22023 unless p_at_least <= p_older_than <= 1000 years (the cleanup_* functions).';

CREATE OR REPLACE FUNCTION billing.cleanup_idempotency_keys(p_older_than interval DEFAULT '30 days') RETURNS integer
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT billing.check_retention('cleanup_idempotency_keys', p_older_than, interval '1 day', 'a repeat of a call whose key was deleted is applied again');
    WITH gone AS (DELETE FROM billing.idempotency_keys AS k WHERE k.created_at < pg_catalog.now() - p_older_than RETURNING 1)
    SELECT pg_catalog.count(*)::integer FROM gone;
$$;
COMMENT ON FUNCTION billing.cleanup_idempotency_keys(interval) IS
'Service-only maintenance: forgets idempotency keys older than p_older_than (default 30 days, at least 1 day); returns keys deleted. A repeat with a forgotten key is applied again; the ledger keeps the key of every row.';

CREATE OR REPLACE FUNCTION billing.cleanup_webhook_events(p_older_than interval DEFAULT '90 days') RETURNS integer
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT billing.check_retention('cleanup_webhook_events', p_older_than, interval '1 day', 'a redelivered event whose id was deleted is applied again');
    WITH gone AS (DELETE FROM billing.webhook_events AS e WHERE e.processed_at < pg_catalog.now() - p_older_than RETURNING 1)
    SELECT pg_catalog.count(*)::integer FROM gone;
$$;
COMMENT ON FUNCTION billing.cleanup_webhook_events(interval) IS
'Service-only maintenance: forgets webhook event ids processed more than p_older_than ago (default 90 days, at least 1 day); returns ids deleted. A redelivery of a forgotten event is applied again (upsert_subscription given p_event_created_at still ignores an event older than the last one it applied).';

-- 0.1.0's cleanup_api_usage, now on the shared argument check (same checks and result; its 22023 now has a hint).
CREATE OR REPLACE FUNCTION billing.cleanup_api_usage(p_older_than interval DEFAULT '7 days') RETURNS integer
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT billing.check_retention('cleanup_api_usage', p_older_than, interval '0', NULL);
    WITH gone AS (DELETE FROM billing.api_usage AS a WHERE a.bucket_start < pg_catalog.now() - p_older_than RETURNING 1)
    SELECT pg_catalog.count(*)::integer FROM gone;
$$;
COMMENT ON FUNCTION billing.cleanup_api_usage(interval) IS 'Service-only maintenance: deletes API usage buckets older than p_older_than (default 7 days); returns rows deleted.';

-- Like every function of a fresh install: nothing for PUBLIC; billing.apply_grants() gives
-- service_role what billing.api_functions lists.
REVOKE ALL ON FUNCTION billing.check_retention(text, interval, interval, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION billing.cleanup_idempotency_keys(interval) FROM PUBLIC;
REVOKE ALL ON FUNCTION billing.cleanup_webhook_events(interval) FROM PUBLIC;
INSERT INTO billing.api_functions (function_name, access) VALUES
    ('cleanup_idempotency_keys', 'service'),
    ('cleanup_webhook_events', 'service')
ON CONFLICT (function_name) DO NOTHING;
SELECT billing.apply_grants();
