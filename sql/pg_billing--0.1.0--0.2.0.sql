-- pg_billing 0.1.0 -> 0.2.0: retention of idempotency keys and webhook event ids.
--
-- Idempotent (SPEC 12: Citus may run an upgrade script on every node): every statement may run
-- again on a database that has it already. tests/stress/upgrade.py runs this file a second time
-- after ALTER EXTENSION ... UPDATE and checks nothing changed, and compares the upgraded catalog
-- with a fresh 0.2.0 install.
--
-- What changes:
--   - billing.cleanup_idempotency_keys(interval) and billing.cleanup_webhook_events(interval),
--     service-only maintenance, with the indexes they use. The index builds take a SHARE lock on
--     billing.idempotency_keys and billing.webhook_events for as long as the build runs.
--   - The shared library: expire_subscription_credits on an empty subscription pool no longer
--     takes the account's row lock (no SQL change).
\echo Use "ALTER EXTENSION pg_billing UPDATE TO '0.2.0'" to load this file. \quit

CREATE INDEX IF NOT EXISTS idempotency_keys_created_at_idx ON billing.idempotency_keys (created_at);
CREATE INDEX IF NOT EXISTS webhook_events_processed_at_idx ON billing.webhook_events (processed_at);

COMMENT ON TABLE billing.idempotency_keys IS 'p_idempotency_key of credit mutators, per user: the request fingerprint and the first response, replayed on repeats. cleanup_idempotency_keys deletes old keys.';
COMMENT ON TABLE billing.webhook_events IS 'Provider webhook event ids already processed (record_webhook_event). cleanup_webhook_events deletes old ids.';

CREATE OR REPLACE FUNCTION billing.cleanup_idempotency_keys(p_older_than interval DEFAULT '30 days') RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n integer;
BEGIN
    PERFORM billing.require_service('cleanup_idempotency_keys');
    IF p_older_than IS NULL OR p_older_than < interval '1 day' OR p_older_than > interval '1000 years' THEN
        RAISE EXCEPTION 'p_older_than must be an interval between 1 day and 1000 years'
            USING ERRCODE = '22023', HINT = 'a repeat of a call whose key was deleted is applied again';
    END IF;
    DELETE FROM billing.idempotency_keys AS k WHERE k.created_at < pg_catalog.now() - p_older_than;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;
COMMENT ON FUNCTION billing.cleanup_idempotency_keys(interval) IS
'Service-only maintenance: forgets idempotency keys older than p_older_than (default 30 days, at least 1 day); returns keys deleted. A repeat with a forgotten key is applied again; the ledger keeps the key of every row.';

CREATE OR REPLACE FUNCTION billing.cleanup_webhook_events(p_older_than interval DEFAULT '90 days') RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n integer;
BEGIN
    PERFORM billing.require_service('cleanup_webhook_events');
    IF p_older_than IS NULL OR p_older_than < interval '1 day' OR p_older_than > interval '1000 years' THEN
        RAISE EXCEPTION 'p_older_than must be an interval between 1 day and 1000 years'
            USING ERRCODE = '22023', HINT = 'a redelivered event whose id was deleted is applied again';
    END IF;
    DELETE FROM billing.webhook_events AS e WHERE e.processed_at < pg_catalog.now() - p_older_than;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;
COMMENT ON FUNCTION billing.cleanup_webhook_events(interval) IS
'Service-only maintenance: forgets webhook event ids processed more than p_older_than ago (default 90 days, at least 1 day); returns ids deleted. A redelivery of a forgotten event is applied again (upsert_subscription given p_event_created_at still ignores an event older than the last one it applied).';

-- Like every function of a fresh install: nothing for PUBLIC; billing.apply_grants() gives
-- service_role what billing.api_functions lists.
REVOKE ALL ON FUNCTION billing.cleanup_idempotency_keys(interval) FROM PUBLIC;
REVOKE ALL ON FUNCTION billing.cleanup_webhook_events(interval) FROM PUBLIC;
INSERT INTO billing.api_functions (function_name, access) VALUES
    ('cleanup_idempotency_keys', 'service'),
    ('cleanup_webhook_events', 'service')
ON CONFLICT (function_name) DO NOTHING;
SELECT billing.apply_grants();
