-- Credit holds (0.5.0; issue 14). Mutators are Rust (src/api/holds.rs); reads are SQL that
-- checks the caller first.

INSERT INTO billing.api_functions (function_name, access) VALUES
    ('reserve_credits', 'rpc'),
    ('get_active_holds', 'rpc'),
    ('capture_hold', 'service'),
    ('release_hold', 'service'),
    ('extend_hold', 'service'),
    ('increase_hold', 'service'),
    ('set_max_active_holds', 'service'),
    ('cleanup_holds', 'service');

CREATE FUNCTION billing.reserve_credits(p_user_id uuid, p_amount integer, p_ttl interval DEFAULT '5 minutes',
                                        p_feature text DEFAULT NULL, p_idempotency_key text DEFAULT NULL,
                                        p_allow_partial boolean DEFAULT false)
RETURNS jsonb LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pgb_reserve_credits';
COMMENT ON FUNCTION billing.reserve_credits(uuid, integer, interval, text, text, boolean) IS
'Hold p_amount credits for a job whose cost is known at the end, for p_ttl (1 second to 24 hours; default 5 minutes). The held credits stay in the balance but no spending can take them: available = spendable credits (for p_feature; NULL: unscoped) - active holds - debt. Not enough available: PT402 (p_allow_partial: hold what is available, at least 1). More active holds than the account''s max_active_holds: PT429. Returns {hold_id, user_id, held, requested, feature, expires_at, available}. p_idempotency_key replays the first result. End users: own account only; capture_hold, release_hold, extend_hold and increase_hold are the backend''s.';

CREATE FUNCTION billing.capture_hold(p_hold_id uuid, p_amount integer, p_description text DEFAULT NULL,
                                     p_idempotency_key text DEFAULT NULL, p_over text DEFAULT 'available')
RETURNS jsonb LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pgb_capture_hold';
COMMENT ON FUNCTION billing.capture_hold(uuid, integer, text, text, text) IS
'Service-only. Charge what the job cost: debit p_amount (>= 0) in the spending order (ledger type hold_capture, reference_id = the hold id) and release the rest of the hold, atomically. Above the hold, p_over decides: available (default) takes the excess from the free balance and reports what even that cannot pay as unfunded; reject refuses with 22023 and changes nothing; overdraft may go below zero within the account''s overdraft limit (unfunded beyond it). A hold past its expiry plus pg_billing.hold_capture_grace (default 60 s): PT410; within the grace it is captured from the free balance (its credits came back at the expiry). A hold resolves once: a repeat (or a capture of a released hold) returns the first result with already_resolved = true. Returns {hold_id, user_id, status, requested, captured, unfunded, released, debt_added, grants, transaction_id, subscription_credits_balance, purchased_credits_balance, debt, total_balance, available, already_resolved}. Unknown hold: P0002.';

CREATE FUNCTION billing.release_hold(p_hold_id uuid, p_idempotency_key text DEFAULT NULL)
RETURNS jsonb LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pgb_release_hold';
COMMENT ON FUNCTION billing.release_hold(uuid, text) IS
'Service-only. Give a hold''s credits back without charging (the job failed). A hold resolves once: releasing a resolved hold returns the first result (or, for a hold expired longer ago than pg_billing.hold_capture_grace, status expired) with already_resolved = true; within the grace a release resolves an expired hold as released (0 released: its credits came back at the expiry), so no capture can follow. Returns {hold_id, user_id, status, captured, released, subscription_credits_balance, purchased_credits_balance, debt, total_balance, available, already_resolved}. Unknown hold: P0002.';

CREATE FUNCTION billing.extend_hold(p_hold_id uuid, p_ttl interval)
RETURNS jsonb LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pgb_extend_hold';
COMMENT ON FUNCTION billing.extend_hold(uuid, interval) IS
'Service-only. Keep an active hold until now + p_ttl (1 second to 24 hours; never earlier than it was). An expired hold: PT410; a captured or released one: 22023. Returns {hold_id, user_id, held, expires_at}.';

CREATE FUNCTION billing.increase_hold(p_hold_id uuid, p_delta integer, p_idempotency_key text DEFAULT NULL)
RETURNS jsonb LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pgb_increase_hold';
COMMENT ON FUNCTION billing.increase_hold(uuid, integer, text) IS
'Service-only. Hold p_delta more credits on an active hold (its expiry stays). Not enough available: PT402 and nothing changes; an expired hold: PT410; a captured or released one: 22023. Returns {hold_id, user_id, added, held, expires_at, available}.';

CREATE FUNCTION billing.set_max_active_holds(p_user_id uuid, p_max integer)
RETURNS jsonb LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pgb_set_max_active_holds';
COMMENT ON FUNCTION billing.set_max_active_holds(uuid, integer) IS
'Service-only. Cap the account''s active holds at p_max (NULL: no cap, the default; 0: none allowed): reserve_credits raises PT429 at the cap. Holds already active stay. Creates the account if missing. Returns {user_id, max_active_holds, active_holds}.';

CREATE FUNCTION billing.get_active_holds(p_user_id uuid)
RETURNS TABLE (hold_id uuid, amount bigint, feature text, expires_at timestamptz, created_at timestamptz)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM billing.authorize_user(p_user_id);
    RETURN QUERY
    SELECT h.id, h.amount, h.feature, h.expires_at, h.created_at
      FROM billing.credit_holds AS h
     WHERE h.user_id = p_user_id AND h.status = 'active' AND h.expires_at > pg_catalog.now()
     ORDER BY h.expires_at, h.created_at, h.id;
END
$$;
COMMENT ON FUNCTION billing.get_active_holds(uuid) IS
'The user''s active holds (not captured, released or past their expiry), earliest expiry first. End users: own only.';

-- Retention: resolved holds (captured, released, expired and settled) are kept for at least a day,
-- so a repeated capture or release within a day still finds its first result.
CREATE FUNCTION billing.cleanup_holds(p_older_than interval DEFAULT '30 days') RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_cutoff timestamptz;
    n bigint;
BEGIN
    PERFORM billing.check_retention('cleanup_holds', p_older_than, interval '1 day', 'a repeated capture or release of a deleted hold fails with P0002');
    v_cutoff := pg_catalog.now() - p_older_than;
    DELETE FROM billing.credit_holds AS h
     WHERE h.status <> 'active' AND h.resolved_at < v_cutoff;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n::integer;
END
$$;
COMMENT ON FUNCTION billing.cleanup_holds(interval) IS
'Service-only maintenance: deletes holds resolved (captured, released, or expired and settled by a later write) more than p_older_than ago (default 30 days, at least 1 day); returns holds deleted. Active rows are never deleted (an expired one is settled by its account''s next write). Nothing depends on it running.';
