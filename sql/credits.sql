-- Credits (SPEC 4). Mutators are Rust (src/api/credits.rs); reads are SQL that checks the
-- caller first.

INSERT INTO billing.api_functions (function_name, access) VALUES
    ('consume_credits_v2', 'rpc'),
    ('get_user_credits', 'rpc'),
    ('get_credit_history', 'rpc'),
    ('decrement_credits_with_log', 'rpc'),
    ('add_subscription_credits', 'service'),
    ('add_purchased_credits', 'service'),
    ('expire_subscription_credits', 'service'),
    ('renew_subscription_credits', 'service'),
    ('refund_credits', 'service'),
    ('clawback_credits_from_transaction', 'service'),
    ('increment_credits_with_log', 'service'),
    ('record_webhook_event', 'service'),
    ('cleanup_idempotency_keys', 'service'),
    ('cleanup_webhook_events', 'service');

CREATE FUNCTION billing.consume_credits_v2(p_user_id uuid, p_amount integer, p_description text DEFAULT NULL,
                                           p_reference_id text DEFAULT NULL, p_idempotency_key text DEFAULT NULL)
RETURNS jsonb LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pgb_consume_credits_v2';
COMMENT ON FUNCTION billing.consume_credits_v2(uuid, integer, text, text, text) IS
'Consume p_amount credits from the unscoped grants in spending order (subscription credits first, then purchased: FIFO; see consume_credits). Returns {success, transaction_id, consumed, subscription_used, purchased_used, subscription_credits_balance, purchased_credits_balance, total_balance}. Not enough credits: PT402 and nothing changes. End users: own account only. p_idempotency_key replays the first result.';

CREATE FUNCTION billing.add_subscription_credits(p_user_id uuid, p_amount integer, p_description text DEFAULT NULL,
                                                 p_reference_id text DEFAULT NULL, p_idempotency_key text DEFAULT NULL)
RETURNS jsonb LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pgb_add_subscription_credits';
COMMENT ON FUNCTION billing.add_subscription_credits(uuid, integer, text, text, text) IS
'Service-only. Grant p_amount subscription credits (they expire at period end); creates the account if missing. Returns {success, transaction_id, added, subscription_credits_balance, purchased_credits_balance, total_balance}.';

CREATE FUNCTION billing.add_purchased_credits(p_user_id uuid, p_amount integer, p_description text DEFAULT NULL,
                                              p_reference_id text DEFAULT NULL, p_idempotency_key text DEFAULT NULL)
RETURNS jsonb LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pgb_add_purchased_credits';
COMMENT ON FUNCTION billing.add_purchased_credits(uuid, integer, text, text, text) IS
'Service-only. Add p_amount purchased credits (never expire); creates the account if missing. The returned transaction_id identifies the purchase for clawback_credits_from_transaction.';

CREATE FUNCTION billing.expire_subscription_credits(p_user_id uuid, p_description text DEFAULT NULL,
                                                    p_idempotency_key text DEFAULT NULL)
RETURNS jsonb LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pgb_expire_subscription_credits';
COMMENT ON FUNCTION billing.expire_subscription_credits(uuid, text, text) IS
'Service-only. Zero the subscription pool (purchased credits stay), log billing.credit_expiration_events. Returns {expired_amount, subscription_credits_balance, purchased_credits_balance, ...}; a zero pool is a no-op with no event.';

CREATE FUNCTION billing.renew_subscription_credits(p_user_id uuid, p_amount integer, p_period_end timestamptz DEFAULT NULL,
                                                   p_idempotency_key text DEFAULT NULL)
RETURNS jsonb LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pgb_renew_subscription_credits';
COMMENT ON FUNCTION billing.renew_subscription_credits(uuid, integer, timestamptz, text) IS
'Service-only. The renewal webhook in one call: expire the subscription pool, then grant p_amount for the period ending p_period_end, atomically. Purchased credits are untouched. Creates the account if missing.';

CREATE FUNCTION billing.refund_credits(p_user_id uuid, p_amount integer, p_reason text DEFAULT NULL,
                                       p_reference_id text DEFAULT NULL, p_idempotency_key text DEFAULT NULL)
RETURNS jsonb LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pgb_refund_credits';
COMMENT ON FUNCTION billing.refund_credits(uuid, integer, text, text, text) IS
'Service-only. Return p_amount credits to the purchased pool of an existing account (P0002 otherwise).';

CREATE FUNCTION billing.clawback_credits_from_transaction(p_transaction_id uuid, p_reason text DEFAULT NULL)
RETURNS jsonb LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pgb_clawback_credits_from_transaction';
COMMENT ON FUNCTION billing.clawback_credits_from_transaction(uuid, text) IS
'Service-only. Reverse a purchase (chargeback): remove up to the purchase''s amount from what is left in the purchased pool and report {clawed_back, shortfall, ...balances}. Never twice for one purchase: a repeat returns the first result with already_clawed_back = true.';

CREATE FUNCTION billing.increment_credits_with_log(p_user_id uuid, p_amount integer, p_transaction_type text,
                                                   p_description text DEFAULT NULL, p_reference_id text DEFAULT NULL)
RETURNS integer LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pgb_increment_credits_with_log';
COMMENT ON FUNCTION billing.increment_credits_with_log(uuid, integer, text, text, text) IS
'Service-only legacy alias. Type ''purchase'' (matched case-insensitively, spaces trimmed, and logged as purchase) adds to the purchased pool, any other type to the subscription pool. Returns the new total balance.';

CREATE FUNCTION billing.decrement_credits_with_log(p_user_id uuid, p_amount integer, p_transaction_type text DEFAULT 'usage',
                                                   p_description text DEFAULT NULL, p_reference_id text DEFAULT NULL)
RETURNS integer LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pgb_decrement_credits_with_log';
COMMENT ON FUNCTION billing.decrement_credits_with_log(uuid, integer, text, text, text) IS
'Legacy alias of FIFO consumption (consume_credits_v2) that returns the new total balance. End users: own account only.';

CREATE FUNCTION billing.record_webhook_event(p_event_id text, p_event_type text, p_user_id uuid DEFAULT NULL)
RETURNS boolean LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pgb_record_webhook_event';
COMMENT ON FUNCTION billing.record_webhook_event(text, text, uuid) IS
'Service-only. Record a provider webhook event id: true the first time, false for every later delivery (also concurrent ones).';

-- Retention (0.2.0). A key or event id is remembered for at least a day, so a client's or a
-- provider's retries within a day can never apply twice.
CREATE FUNCTION billing.cleanup_idempotency_keys(p_older_than interval DEFAULT '30 days') RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_cutoff timestamptz;
    n_keys bigint;
    n_usage bigint;
BEGIN
    PERFORM billing.check_retention('cleanup_idempotency_keys', p_older_than, interval '1 day', 'a repeat of a call whose key was deleted is applied again');
    -- The cut-off is a value, not an expression of now(): Citus refuses non-IMMUTABLE functions
    -- in the WHERE of a DELETE on a distributed table.
    v_cutoff := pg_catalog.now() - p_older_than;
    DELETE FROM billing.idempotency_keys AS k WHERE k.created_at < v_cutoff;
    GET DIAGNOSTICS n_keys = ROW_COUNT;
    DELETE FROM billing.usage_event_keys AS u WHERE u.created_at < v_cutoff;
    GET DIAGNOSTICS n_usage = ROW_COUNT;
    RETURN (n_keys + n_usage)::integer;
END
$$;
COMMENT ON FUNCTION billing.cleanup_idempotency_keys(interval) IS
'Service-only maintenance: forgets idempotency keys (of the credit functions and, 0.6.0, of record_usage_batch events) older than p_older_than (default 30 days, at least 1 day); returns keys deleted. A repeat with a forgotten key is applied again; the ledger keeps the key of every row.';

CREATE FUNCTION billing.cleanup_webhook_events(p_older_than interval DEFAULT '90 days') RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_cutoff timestamptz;
    n bigint;
BEGIN
    PERFORM billing.check_retention('cleanup_webhook_events', p_older_than, interval '1 day', 'a redelivered event whose id was deleted is applied again');
    v_cutoff := pg_catalog.now() - p_older_than;
    DELETE FROM billing.webhook_events AS e WHERE e.processed_at < v_cutoff;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n::integer;
END
$$;
COMMENT ON FUNCTION billing.cleanup_webhook_events(interval) IS
'Service-only maintenance: forgets webhook event ids processed more than p_older_than ago (default 90 days, at least 1 day); returns ids deleted. A redelivery of a forgotten event is applied again (upsert_subscription given p_event_created_at still ignores an event older than the last one it applied).';

CREATE FUNCTION billing.get_user_credits(p_user_id uuid)
RETURNS TABLE (user_id uuid, subscription_credits_balance bigint, purchased_credits_balance bigint, total_balance bigint,
               available bigint)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM billing.authorize_user(p_user_id);
    RETURN QUERY
    SELECT p_user_id,
           COALESCE(c.subscription_credits_balance, 0),
           COALESCE(c.purchased_credits_balance, 0),
           COALESCE(c.total_balance, 0),
           COALESCE(c.available, 0)
      FROM (SELECT 1) AS one
      LEFT JOIN billing.user_credits AS c ON c.user_id = p_user_id;
END
$$;
COMMENT ON FUNCTION billing.get_user_credits(uuid) IS
'The user''s two pools, their total less the debt, and available: the credits any spending may use now, less the debt (zeros when the user has no account yet); expired, voided and not yet started grants count as 0. End users: own only.';

CREATE FUNCTION billing.get_credit_history(p_user_id uuid, p_limit integer DEFAULT 50, p_before timestamptz DEFAULT NULL)
RETURNS SETOF billing.credit_transactions
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM billing.authorize_user(p_user_id);
    PERFORM billing.check_argument('p_limit', COALESCE(p_limit, 50), 1, 1000);
    -- Rows carry their clock time; the rare rows written in the same microsecond are all
    -- included (WITH TIES), so paging with p_before = the last row's created_at never skips one.
    RETURN QUERY
    SELECT p.*
      FROM (SELECT t.*
              FROM billing.credit_transactions AS t
             WHERE t.user_id = p_user_id
               AND t.created_at < COALESCE(p_before, 'infinity'::timestamptz)
             ORDER BY t.created_at DESC
             FETCH FIRST COALESCE(p_limit, 50) ROWS WITH TIES) AS p
     ORDER BY p.created_at DESC, p.id DESC;
END
$$;
COMMENT ON FUNCTION billing.get_credit_history(uuid, integer, timestamptz) IS
'The user''s ledger rows, newest first: p_limit (1..1000, default 50) rows, older than p_before when given; rows written in the same microsecond are never split across pages (a page may then hold one or two more than p_limit). Page with p_before = the last row''s created_at. End users: own only.';

CREATE FUNCTION billing.verify_ledger(p_user_id uuid DEFAULT NULL)
RETURNS TABLE (user_id uuid, subscription_credits_balance bigint, subscription_ledger_sum bigint,
               purchased_credits_balance bigint, purchased_ledger_sum bigint)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM billing.require_service('billing.verify_ledger');
    -- (pool::text: the upgrade to 0.4.0 adds the value 'debt' and creates this function in one
    -- transaction, where the new value cannot be named as a constant.)
    RETURN QUERY
    WITH ledger AS (
        SELECT t.user_id,
               pg_catalog.sum(t.amount) FILTER (WHERE t.pool::text = 'subscription')::bigint AS sub,
               pg_catalog.sum(t.amount) FILTER (WHERE t.pool::text = 'purchased')::bigint AS pur,
               pg_catalog.sum(t.amount) FILTER (WHERE t.pool::text = 'debt')::bigint AS debt
          FROM billing.credit_transactions AS t
         WHERE p_user_id IS NULL OR t.user_id = p_user_id
         GROUP BY t.user_id
    ), acct AS (
        SELECT a.user_id, a.subscription_credits_balance AS sub, a.purchased_credits_balance AS pur, a.debt, a.held
          FROM billing.accounts AS a
         WHERE p_user_id IS NULL OR a.user_id = p_user_id
    ), hold_sums AS (
        -- Per user (0.5.0): the stored held sum must be the sum of the active holds' amounts.
        SELECT h.user_id,
               COALESCE(pg_catalog.sum(h.amount) FILTER (WHERE h.status::text = 'active'), 0)::bigint AS held,
               pg_catalog.bool_or(h.amount <= 0 OR (h.status::text = 'captured') <> (h.captured_amount IS NOT NULL)) AS bad
          FROM billing.credit_holds AS h
         WHERE p_user_id IS NULL OR h.user_id = p_user_id
         GROUP BY h.user_id
    ), grant_sums AS (
        -- Per user: the stored pools must be the sums of the grants' remaining.
        SELECT g.user_id,
               pg_catalog.sum(g.remaining) FILTER (WHERE g.pool::text = 'subscription')::bigint AS sub,
               pg_catalog.sum(g.remaining) FILTER (WHERE g.pool::text = 'purchased')::bigint AS pur
          FROM billing.credit_grants AS g
         WHERE p_user_id IS NULL OR g.user_id = p_user_id
         GROUP BY g.user_id
    ), bad_grants AS (
        -- Per grant: its ledger rows must sum to its remaining.
        SELECT DISTINCT g.user_id
          FROM billing.credit_grants AS g
          LEFT JOIN (SELECT t.user_id, t.grant_id, pg_catalog.sum(t.amount)::bigint AS s
                       FROM billing.credit_transactions AS t
                      WHERE t.grant_id IS NOT NULL AND (p_user_id IS NULL OR t.user_id = p_user_id)
                      GROUP BY t.user_id, t.grant_id) AS l
            ON l.user_id = g.user_id AND l.grant_id = g.id
         WHERE (p_user_id IS NULL OR g.user_id = p_user_id)
           AND (g.remaining <> COALESCE(l.s, 0)
                -- and what the table has no CHECK for (see schema.sql)
                OR g.remaining < 0 OR g.remaining > g.amount OR g.amount <= 0
                OR g.priority NOT BETWEEN 0 AND 100
                OR g.depleted <> (g.remaining = 0)
                OR g.pool::text <> CASE WHEN g.category::text IN ('subscription', 'rollover') THEN 'subscription' ELSE 'purchased' END)    ), bad_heads AS (
        -- (0.7.0) A recorded head (billing.accounts.head_grant) must be a grant of the account
        -- without a scope, not voided, of the pool recorded, with the remaining recorded.
        SELECT a.user_id
          FROM billing.accounts AS a
          LEFT JOIN billing.credit_grants AS g ON g.user_id = a.user_id AND g.id = a.head_grant
         WHERE a.head_grant IS NOT NULL AND (p_user_id IS NULL OR a.user_id = p_user_id)
           AND (g.id IS NULL OR g.scope IS NOT NULL OR g.voided_at IS NOT NULL
                OR g.remaining IS DISTINCT FROM a.head_remaining
                OR (g.pool::text = 'subscription') IS DISTINCT FROM a.head_subscription)
    )
    SELECT COALESCE(acct.user_id, ledger.user_id),
           COALESCE(acct.sub, 0), COALESCE(ledger.sub, 0),
           COALESCE(acct.pur, 0), COALESCE(ledger.pur, 0)
      FROM acct
      FULL JOIN ledger ON ledger.user_id = acct.user_id
      LEFT JOIN grant_sums AS gs ON gs.user_id = COALESCE(acct.user_id, ledger.user_id)
      LEFT JOIN hold_sums AS hs ON hs.user_id = COALESCE(acct.user_id, ledger.user_id)
     WHERE COALESCE(acct.held, 0) <> COALESCE(hs.held, 0) OR COALESCE(hs.bad, false)
        OR COALESCE(acct.sub, 0) <> COALESCE(ledger.sub, 0)
        OR COALESCE(acct.pur, 0) <> COALESCE(ledger.pur, 0)
        OR COALESCE(acct.debt, 0) <> -COALESCE(ledger.debt, 0)
        OR acct.debt < 0
        OR COALESCE(acct.sub, 0) <> COALESCE(gs.sub, 0)
        OR COALESCE(acct.pur, 0) <> COALESCE(gs.pur, 0)
        OR COALESCE(acct.user_id, ledger.user_id) IN (SELECT b.user_id FROM bad_grants AS b)
        OR COALESCE(acct.user_id, ledger.user_id) IN (SELECT b.user_id FROM bad_heads AS b);
END
$$;
COMMENT ON FUNCTION billing.verify_ledger(uuid) IS
'Service-only, for DBAs and tests: the users (all, or p_user_id) whose books disagree: a pool balance that differs from the sum of its ledger rows or of its grants'' remaining, a grant whose ledger rows do not sum to its remaining (or whose remaining is outside 0..amount, or whose pool or depleted flag is wrong), or a debt that differs from its ledger rows, or (0.5.0) a held sum that differs from the amounts of the active holds (or a hold whose amount is not positive, or whose captured_amount is set unless it was captured), or (0.7.0) a recorded head of the spending order that is not the grant it says (billing.accounts.head_grant: its remaining, pool, scope or void). Empty means consistent.';
