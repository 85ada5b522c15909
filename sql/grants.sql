-- Credit grants (0.4.0; issue 13). Mutators are Rust (src/api/grants.rs, src/api/credits.rs);
-- reads are SQL that checks the caller first.

INSERT INTO billing.api_functions (function_name, access) VALUES
    ('grant_credits', 'service'),
    ('void_grant', 'service'),
    ('set_overdraft_limit', 'service'),
    ('consume_credits', 'rpc'),
    ('get_credit_grants', 'rpc'),
    ('balance_at', 'rpc');

CREATE FUNCTION billing.grant_credits(p_user_id uuid, p_amount integer, p_category text, p_priority integer DEFAULT NULL,
                                      p_effective_at timestamptz DEFAULT pg_catalog.now(), p_expires_at timestamptz DEFAULT NULL,
                                      p_scope text[] DEFAULT NULL, p_description text DEFAULT NULL,
                                      p_reference_id text DEFAULT NULL, p_idempotency_key text DEFAULT NULL)
RETURNS jsonb LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pgb_grant_credits';
COMMENT ON FUNCTION billing.grant_credits(uuid, integer, text, integer, timestamptz, timestamptz, text[], text, text, text) IS
'Service-only. Grant p_amount credits of p_category (subscription, purchased, promotional, rollover, refund) with p_priority (0..100, lower spent first; default by category: subscription 10, rollover 20, promotional 30, refund 40, purchased 50), spendable from p_effective_at until p_expires_at (NULL = never), by any feature (p_scope NULL) or only the listed ones. A grant that starts now and has no scope pays the debt first. Creates the account if missing. Returns {grant_id, transaction_id, category, amount, priority, effective_at, expires_at, scope, debt_repaid, subscription_credits_balance, purchased_credits_balance, debt, total_balance, available}.';

CREATE FUNCTION billing.void_grant(p_grant_id uuid, p_reason text DEFAULT NULL, p_idempotency_key text DEFAULT NULL)
RETURNS jsonb LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pgb_void_grant';
COMMENT ON FUNCTION billing.void_grant(uuid, text, text) IS
'Service-only. Void what remains of a grant (a chargeback, a revoked promotion) and return it as voided_amount. Never twice: a later call returns already_voided = true and the first void''s amount. Unknown grant: P0002.';

CREATE FUNCTION billing.set_overdraft_limit(p_user_id uuid, p_limit integer)
RETURNS jsonb LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pgb_set_overdraft_limit';
COMMENT ON FUNCTION billing.set_overdraft_limit(uuid, integer) IS
'Service-only. Let debits take the account down to -p_limit (0, the default, stops at zero with PT402). What the grants cannot pay becomes debt, which the next grant pays first. A limit below the current debt allows no new debt. Creates the account if missing. Returns {user_id, overdraft_limit, debt}.';

CREATE FUNCTION billing.consume_credits(p_user_id uuid, p_amount integer, p_feature text DEFAULT NULL, p_description text DEFAULT NULL,
                                        p_reference_id text DEFAULT NULL, p_idempotency_key text DEFAULT NULL)
RETURNS jsonb LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pgb_consume_credits';
COMMENT ON FUNCTION billing.consume_credits(uuid, integer, text, text, text, text) IS
'Consume p_amount credits for p_feature from the grants that may pay for it (unscoped grants, and grants whose scope lists p_feature; with p_feature NULL only unscoped grants), in spending order: priority, scoped first, earliest expiry, earliest start, oldest. Beyond them, into overdraft up to the account''s limit. Returns {transaction_id, consumed, feature, grants: [{grant_id, category, amount}], debt_added, subscription_credits_balance, purchased_credits_balance, debt, total_balance, available}. Not enough: PT402 and nothing changes. End users: own account only.';

CREATE FUNCTION billing.get_credit_grants(p_user_id uuid, p_include_spent boolean DEFAULT false)
RETURNS TABLE (grant_id uuid, category text, amount bigint, remaining bigint, priority integer, effective_at timestamptz,
               expires_at timestamptz, scope text[], status text, voided_at timestamptz, source_transaction_id uuid,
               description text, reference_id text, created_at timestamptz)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM billing.authorize_user(p_user_id);
    RETURN QUERY
    SELECT s.id, s.category::text, s.amount, CASE WHEN s.status IN ('active', 'scheduled') THEN s.remaining ELSE 0 END,
           s.priority, s.effective_at, s.expires_at, s.scope, s.status, s.voided_at, s.source_transaction_id,
           s.description, s.reference_id, s.created_at
      FROM (SELECT g.*,
                   CASE WHEN g.voided_at IS NOT NULL THEN 'voided'
                        WHEN g.expires_at <= pg_catalog.now() OR g.settled_at IS NOT NULL THEN 'expired'
                        WHEN g.remaining = 0 THEN 'spent'
                        WHEN g.effective_at > pg_catalog.now() THEN 'scheduled'
                        ELSE 'active' END AS status
              FROM billing.credit_grants AS g
             WHERE g.user_id = p_user_id) AS s
     WHERE COALESCE(p_include_spent, false) OR s.status IN ('active', 'scheduled')
     ORDER BY s.priority, (s.scope IS NULL), s.expires_at, s.effective_at, s.created_at, s.id;
END
$$;
COMMENT ON FUNCTION billing.get_credit_grants(uuid, boolean) IS
'The user''s grants in spending order, with status active, scheduled (starts later), expired (also when a renewal or expire_subscription_credits ended it early: settled_at), voided or spent; remaining counts only for active and scheduled grants. Without p_include_spent only active and scheduled grants. End users: own only.';

CREATE FUNCTION billing.balance_at(p_user_id uuid, p_at timestamptz)
RETURNS jsonb
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_result jsonb;
BEGIN
    PERFORM billing.authorize_user(p_user_id);
    PERFORM billing.check_argument('p_at', CASE WHEN p_at IS NULL THEN NULL ELSE 0 END, 0, 0);
    -- From the ledger: each grant's remaining is the sum of its rows written by p_at; rows
    -- without a grant are the pools' history from before 0.4.0 (converted to grants by the
    -- upgrade with rows that bring them to 0) and the debt.
    WITH rows AS (
        SELECT t.grant_id, t.pool::text AS pool, t.amount
          FROM billing.credit_transactions AS t
         WHERE t.user_id = p_user_id AND t.created_at <= p_at
    ), per_grant AS (
        SELECT r.grant_id, pg_catalog.sum(r.amount)::bigint AS remaining
          FROM rows AS r WHERE r.grant_id IS NOT NULL GROUP BY r.grant_id
    ), grants AS (
        SELECT g.id, g.category, g.pool::text AS pool, p.remaining, g.scope IS NULL AS unscoped,
               g.effective_at <= p_at AND (g.expires_at IS NULL OR p_at < g.expires_at)
                 AND (g.voided_at IS NULL OR g.voided_at > p_at)
                 AND (g.settled_at IS NULL OR g.settled_at > p_at) AS spendable,
               g.priority, g.expires_at, g.effective_at, g.created_at
          FROM per_grant AS p
          JOIN billing.credit_grants AS g ON g.user_id = p_user_id AND g.id = p.grant_id
    ), pools AS (
        SELECT COALESCE(pg_catalog.sum(r.amount) FILTER (WHERE r.pool = 'subscription'), 0)::bigint AS sub,
               COALESCE(pg_catalog.sum(r.amount) FILTER (WHERE r.pool = 'purchased'), 0)::bigint AS pur,
               COALESCE(-pg_catalog.sum(r.amount) FILTER (WHERE r.pool = 'debt'), 0)::bigint AS debt
          FROM rows AS r WHERE r.grant_id IS NULL
    ), live AS (
        SELECT COALESCE(pg_catalog.sum(g.remaining) FILTER (WHERE g.spendable AND g.pool = 'subscription'), 0)::bigint AS sub,
               COALESCE(pg_catalog.sum(g.remaining) FILTER (WHERE g.spendable AND g.pool = 'purchased'), 0)::bigint AS pur,
               COALESCE(pg_catalog.sum(g.remaining) FILTER (WHERE g.spendable AND g.unscoped), 0)::bigint AS unscoped
          FROM grants AS g
    )
    SELECT pg_catalog.jsonb_build_object(
               'user_id', p_user_id,
               'at', p_at,
               'subscription_credits_balance', pools.sub + live.sub,
               'purchased_credits_balance', pools.pur + live.pur,
               'debt', pools.debt,
               'total_balance', pools.sub + live.sub + pools.pur + live.pur - pools.debt,
               'available', pools.sub + pools.pur + live.unscoped - pools.debt,
               'grants', COALESCE((SELECT pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object(
                                              'grant_id', g.id, 'category', g.category, 'remaining', g.remaining,
                                              'spendable', g.spendable)
                                          ORDER BY g.priority, (NOT g.unscoped) DESC, g.expires_at, g.effective_at, g.created_at, g.id)
                                     FROM grants AS g), '[]'::jsonb))
      INTO v_result
      FROM pools CROSS JOIN live;
    RETURN v_result;
END
$$;
COMMENT ON FUNCTION billing.balance_at(uuid, timestamptz) IS
'The user''s balances as they were at p_at, from the ledger: {user_id, at, subscription_credits_balance, purchased_credits_balance, debt, total_balance, available, grants: [{grant_id, category, remaining, spendable}]}; a grant counts in the balances when it was spendable at p_at (started, not expired, not voided). End users: own only.';
