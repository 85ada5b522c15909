-- pg_billing 0.4.0 -> 0.5.0: credit holds (issue 14).
--
-- Idempotent (SPEC 12: Citus may run an upgrade script on every node): every statement may run
-- again on a database that has it already. tests/stress/upgrade.py runs this file a second time
-- after ALTER EXTENSION ... UPDATE and checks nothing changed, and compares the upgraded catalog
-- with a fresh 0.5.0 install.
\echo Use "ALTER EXTENSION pg_billing UPDATE TO '0.5.0'" to load this file. \quit

-- ===== Credit holds (issue 14) =====

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_type AS t
                    WHERE t.typname = 'hold_status' AND t.typnamespace = 'billing'::pg_catalog.regnamespace) THEN
        CREATE TYPE billing.hold_status AS ENUM ('active', 'captured', 'released', 'expired');
    END IF;
END
$$;

-- New columns are added without a default and filled, so the table matches a fresh install (a
-- column added with a default keeps a "missing value" that a fresh table does not have).
ALTER TABLE billing.accounts ADD COLUMN IF NOT EXISTS held bigint;
ALTER TABLE billing.accounts ADD COLUMN IF NOT EXISTS next_hold_expiry_at timestamptz;
ALTER TABLE billing.accounts ADD COLUMN IF NOT EXISTS max_active_holds integer;
UPDATE billing.accounts SET held = 0 WHERE held IS NULL;
ALTER TABLE billing.accounts ALTER COLUMN held SET DEFAULT 0;
ALTER TABLE billing.accounts ALTER COLUMN held SET NOT NULL;

CREATE TABLE IF NOT EXISTS billing.credit_holds (
    user_id         uuid NOT NULL,
    id              uuid NOT NULL,
    amount          bigint NOT NULL,
    -- The feature the job spends for (NULL: unscoped grants only), as in consume_credits.
    feature         text,
    expires_at      timestamptz NOT NULL,
    status          billing.hold_status NOT NULL DEFAULT 'active',
    -- What capture_hold debited (NULL unless captured).
    captured_amount bigint,
    idempotency_key text,
    created_at      timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    -- When it was captured or released, or (expired) its expiry.
    resolved_at     timestamptz,
    -- The capture's or release's result, returned again by a repeat.
    resolution      jsonb,
    PRIMARY KEY (user_id, id)
);
-- capture_hold, release_hold, extend_hold and increase_hold find a hold by its id alone.
CREATE INDEX IF NOT EXISTS credit_holds_id_idx ON billing.credit_holds (id);
-- The active holds of an account (settling, get_active_holds, the cap, the reads' held sum).
CREATE INDEX IF NOT EXISTS credit_holds_active_idx ON billing.credit_holds (user_id, expires_at) WHERE status = 'active';
COMMENT ON TABLE billing.credit_holds IS 'Credit holds: amount reserved for a job until expires_at; status active, captured (captured_amount debited), released or expired (a write after expires_at marks it). billing.accounts.held is the sum of the active holds'' amounts. Changed only through pg_billing functions.';

ALTER TABLE billing.credit_holds ENABLE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS credit_holds_read_own ON billing.credit_holds;
CREATE POLICY credit_holds_read_own ON billing.credit_holds FOR SELECT
    USING (user_id = (SELECT billing.current_user_id()));
-- (pg_extension_config_dump works only inside ALTER EXTENSION; a second run finds it done.)
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_extension AS e
                    WHERE e.extname = 'pg_billing' AND 'billing.credit_holds'::pg_catalog.regclass = ANY (e.extconfig)) THEN
        PERFORM pg_catalog.pg_extension_config_dump('billing.credit_holds', '');
    END IF;
END
$$;

-- available now leaves out what active holds reserve.
CREATE OR REPLACE VIEW billing.user_credits WITH (security_invoker = true) AS
SELECT a.user_id,
       COALESCE(g.sub, 0) AS subscription_credits_balance,
       COALESCE(g.pur, 0) AS purchased_credits_balance,
       COALESCE(g.sub, 0) + COALESCE(g.pur, 0) - a.debt AS total_balance,
       COALESCE(g.unscoped, 0) - a.debt
         - CASE WHEN a.held = 0 THEN 0
                WHEN a.next_hold_expiry_at > pg_catalog.now() THEN a.held
                ELSE COALESCE((SELECT pg_catalog.sum(h.amount) FROM billing.credit_holds AS h
                                WHERE h.user_id = a.user_id AND h.status = 'active' AND h.expires_at > pg_catalog.now())::bigint, 0) END
         AS available
  FROM billing.accounts AS a
  LEFT JOIN LATERAL (
        SELECT pg_catalog.sum(l.remaining) FILTER (WHERE l.pool = 'subscription')::bigint AS sub,
               pg_catalog.sum(l.remaining) FILTER (WHERE l.pool = 'purchased')::bigint AS pur,
               pg_catalog.sum(l.remaining) FILTER (WHERE l.scope IS NULL)::bigint AS unscoped
          FROM billing.credit_grants AS l
         WHERE l.user_id = a.user_id AND NOT l.depleted AND l.voided_at IS NULL
           AND l.effective_at <= pg_catalog.now()
           AND (l.expires_at IS NULL OR l.expires_at > pg_catalog.now())) AS g ON true;
COMMENT ON VIEW billing.user_credits IS 'Each account''s two pools, their total less the debt (billing.accounts.debt), and available: the credits any spending may use now, less the debt and the credits active holds reserve (holds past their expiry count as 0); expired, voided and not yet started grants count as 0. Row security applies: end users see their own row.';

INSERT INTO billing.api_functions (function_name, access) VALUES
    ('reserve_credits', 'rpc'),
    ('get_active_holds', 'rpc'),
    ('capture_hold', 'service'),
    ('release_hold', 'service'),
    ('extend_hold', 'service'),
    ('increase_hold', 'service'),
    ('set_max_active_holds', 'service'),
    ('cleanup_holds', 'service')
ON CONFLICT (function_name) DO NOTHING;

CREATE OR REPLACE FUNCTION billing.reserve_credits(p_user_id uuid, p_amount integer, p_ttl interval DEFAULT '5 minutes',
                                        p_feature text DEFAULT NULL, p_idempotency_key text DEFAULT NULL,
                                        p_allow_partial boolean DEFAULT false)
RETURNS jsonb LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pgb_reserve_credits';
COMMENT ON FUNCTION billing.reserve_credits(uuid, integer, interval, text, text, boolean) IS
'Hold p_amount credits for a job whose cost is known at the end, for p_ttl (1 second to 24 hours; default 5 minutes). The held credits stay in the balance but no spending can take them: available = spendable credits (for p_feature; NULL: unscoped) - active holds - debt. Not enough available: PT402 (p_allow_partial: hold what is available, at least 1). More active holds than the account''s max_active_holds: PT429. Returns {hold_id, user_id, held, requested, feature, expires_at, available}. p_idempotency_key replays the first result. End users: own account only; capture_hold, release_hold, extend_hold and increase_hold are the backend''s.';

CREATE OR REPLACE FUNCTION billing.capture_hold(p_hold_id uuid, p_amount integer, p_description text DEFAULT NULL,
                                     p_idempotency_key text DEFAULT NULL, p_over text DEFAULT 'available')
RETURNS jsonb LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pgb_capture_hold';
COMMENT ON FUNCTION billing.capture_hold(uuid, integer, text, text, text) IS
'Service-only. Charge what the job cost: debit p_amount (>= 0) in the spending order (ledger type hold_capture, reference_id = the hold id) and release the rest of the hold, atomically. Above the hold, p_over decides: available (default) takes the excess from the free balance and reports what even that cannot pay as unfunded; reject refuses with 22023 and changes nothing; overdraft may go below zero within the account''s overdraft limit (unfunded beyond it). A hold past its expiry plus pg_billing.hold_capture_grace (default 60 s): PT410; within the grace it is captured from the free balance (its credits came back at the expiry). A hold resolves once: a repeat (or a capture of a released hold) returns the first result with already_resolved = true. Returns {hold_id, user_id, status, requested, captured, unfunded, released, debt_added, grants, transaction_id, subscription_credits_balance, purchased_credits_balance, debt, total_balance, available, already_resolved}. Unknown hold: P0002.';

CREATE OR REPLACE FUNCTION billing.release_hold(p_hold_id uuid, p_idempotency_key text DEFAULT NULL)
RETURNS jsonb LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pgb_release_hold';
COMMENT ON FUNCTION billing.release_hold(uuid, text) IS
'Service-only. Give a hold''s credits back without charging (the job failed). A hold resolves once: releasing a resolved hold returns the first result (or, for a hold expired longer ago than pg_billing.hold_capture_grace, status expired) with already_resolved = true; within the grace a release resolves an expired hold as released (0 released: its credits came back at the expiry), so no capture can follow. Returns {hold_id, user_id, status, captured, released, subscription_credits_balance, purchased_credits_balance, debt, total_balance, available, already_resolved}. Unknown hold: P0002.';

CREATE OR REPLACE FUNCTION billing.extend_hold(p_hold_id uuid, p_ttl interval)
RETURNS jsonb LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pgb_extend_hold';
COMMENT ON FUNCTION billing.extend_hold(uuid, interval) IS
'Service-only. Keep an active hold until now + p_ttl (1 second to 24 hours; never earlier than it was). An expired hold: PT410; a captured or released one: 22023. Returns {hold_id, user_id, held, expires_at}.';

CREATE OR REPLACE FUNCTION billing.increase_hold(p_hold_id uuid, p_delta integer, p_idempotency_key text DEFAULT NULL)
RETURNS jsonb LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pgb_increase_hold';
COMMENT ON FUNCTION billing.increase_hold(uuid, integer, text) IS
'Service-only. Hold p_delta more credits on an active hold (its expiry stays). Not enough available: PT402 and nothing changes; an expired hold: PT410; a captured or released one: 22023. Returns {hold_id, user_id, added, held, expires_at, available}.';

CREATE OR REPLACE FUNCTION billing.set_max_active_holds(p_user_id uuid, p_max integer)
RETURNS jsonb LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pgb_set_max_active_holds';
COMMENT ON FUNCTION billing.set_max_active_holds(uuid, integer) IS
'Service-only. Cap the account''s active holds at p_max (NULL: no cap, the default; 0: none allowed): reserve_credits raises PT429 at the cap. Holds already active stay. Creates the account if missing. Returns {user_id, max_active_holds, active_holds}.';

CREATE OR REPLACE FUNCTION billing.get_active_holds(p_user_id uuid)
RETURNS TABLE (hold_id uuid, amount bigint, feature text, expires_at timestamptz, created_at timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT billing.authorize_user(p_user_id);
    SELECT h.id, h.amount, h.feature, h.expires_at, h.created_at
      FROM billing.credit_holds AS h
     WHERE h.user_id = p_user_id AND h.status = 'active' AND h.expires_at > pg_catalog.now()
     ORDER BY h.expires_at, h.created_at, h.id
$$;
COMMENT ON FUNCTION billing.get_active_holds(uuid) IS
'The user''s active holds (not captured, released or past their expiry), earliest expiry first. End users: own only.';

-- Retention: resolved holds (captured, released, expired and settled) are kept for at least a day,
-- so a repeated capture or release within a day still finds its first result.
CREATE OR REPLACE FUNCTION billing.cleanup_holds(p_older_than interval DEFAULT '30 days') RETURNS integer
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT billing.check_retention('cleanup_holds', p_older_than, interval '1 day', 'a repeated capture or release of a deleted hold fails with P0002');
    WITH gone AS (
        DELETE FROM billing.credit_holds AS h
         WHERE h.status <> 'active' AND h.resolved_at < pg_catalog.now() - p_older_than
        RETURNING 1)
    SELECT pg_catalog.count(*)::integer FROM gone;
$$;
COMMENT ON FUNCTION billing.cleanup_holds(interval) IS
'Service-only maintenance: deletes holds resolved (captured, released, or expired and settled by a later write) more than p_older_than ago (default 30 days, at least 1 day); returns holds deleted. Active rows are never deleted (an expired one is settled by its account''s next write). Nothing depends on it running.';

-- The dashboard gains available (a column at the end: its result type changes, so it is created
-- again, once: a second run finds the new result and keeps it).
DO $$
BEGIN
    IF pg_catalog.pg_get_function_result('billing.get_user_dashboard_stats(uuid)'::pg_catalog.regprocedure) NOT LIKE '%available%' THEN
        DROP FUNCTION billing.get_user_dashboard_stats(uuid);
    END IF;
END
$$;
CREATE OR REPLACE FUNCTION billing.get_user_dashboard_stats(p_user_id uuid)
RETURNS TABLE (plan text, plan_display_name text, status text,
               subscription_credits_balance bigint, purchased_credits_balance bigint, total_credits bigint,
               period_start timestamptz, period_end timestamptz,
               messages_count bigint, conversations_count bigint, tokens_input_count bigint, tokens_output_count bigint,
               api_calls_count bigint, documents_processed_count bigint, chunks_stored_count bigint, generations_count bigint,
               resources jsonb, limits jsonb, available bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT billing.authorize_user(p_user_id);
    SELECT s.plan_name, s.plan_display_name, s.status,
           c.subscription_credits_balance, c.purchased_credits_balance, c.total_balance,
           u.period_start, u.period_end, u.messages_count, u.conversations_count, u.tokens_input_count,
           u.tokens_output_count, u.api_calls_count, u.documents_processed_count, u.chunks_stored_count,
           u.generations_count, billing._resource_usage(p_user_id), s.limits, c.available
      FROM billing.get_user_subscription(p_user_id) AS s,
           billing.get_user_credits(p_user_id) AS c,
           billing.get_user_current_usage(p_user_id) AS u
$$;
COMMENT ON FUNCTION billing.get_user_dashboard_stats(uuid) IS 'One call for a dashboard: effective plan and status, both credit pools and their total, this period''s usage counters, each registered resource''s count and limit (resources: {type: {count, limit, allowed}}), and (0.5.0) available: what any spending may use now, less the debt and the credits active holds reserve (as get_user_credits). End users: own only.';

-- verify_ledger also checks the held sums.
CREATE OR REPLACE FUNCTION billing.verify_ledger(p_user_id uuid DEFAULT NULL)
RETURNS TABLE (user_id uuid, subscription_credits_balance bigint, subscription_ledger_sum bigint,
               purchased_credits_balance bigint, purchased_ledger_sum bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT billing.require_service('billing.verify_ledger');
    -- (pool::text: the upgrade to 0.4.0 adds the value 'debt' and creates this function in one
    -- transaction, where the new value cannot be named as a constant.)
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
                OR g.pool::text <> CASE WHEN g.category::text IN ('subscription', 'rollover') THEN 'subscription' ELSE 'purchased' END)
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
$$;
COMMENT ON FUNCTION billing.verify_ledger(uuid) IS
'Service-only, for DBAs and tests: the users (all, or p_user_id) whose books disagree: a pool balance that differs from the sum of its ledger rows or of its grants'' remaining, a grant whose ledger rows do not sum to its remaining (or whose remaining is outside 0..amount, or whose pool or depleted flag is wrong), or a debt that differs from its ledger rows, or (0.5.0) a held sum that differs from the amounts of the active holds (or a hold whose amount is not positive, or whose captured_amount is set unless it was captured). Empty means consistent.';

-- ===== end of credit holds =====

-- ===== Grants (last: apply_grants() grants every function above; end users may read their own holds) =====
CREATE OR REPLACE FUNCTION billing.apply_grants() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    f record;
    r record;
    ro text;
    cols text;
    has_anon boolean := EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'anon');
    has_auth boolean := EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'authenticated');
    has_service boolean := EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'service_role');
    -- The end-user roles of pg_billing.end_user_roles (default anon,authenticated) that exist.
    end_users text[] := ARRAY(
        SELECT rl.rolname::text FROM pg_catalog.pg_roles AS rl
         WHERE rl.rolname::text IN (SELECT pg_catalog.btrim(x)
                                      FROM pg_catalog.unnest(pg_catalog.string_to_array(
                                               COALESCE(pg_catalog.current_setting('pg_billing.end_user_roles', true),
                                                        'anon,authenticated'), ',')) AS x)
         ORDER BY rl.rolname);
    -- Every role whose table privileges this function manages: end-user roles, anon,
    -- authenticated and service_role, where they exist.
    managed text[] := ARRAY(
        SELECT rl.rolname::text FROM pg_catalog.pg_roles AS rl
         WHERE rl.rolname::text = ANY (end_users || ARRAY['anon', 'authenticated', 'service_role'])
         ORDER BY rl.rolname);
    -- The relations end users may SELECT (RLS shows them their own rows; plans, resource_types
    -- and widget_tables are catalogs). Every other billing relation is the owner's and
    -- service_role's only. Token columns (token, token_hash, claim_token, ...: the word token
    -- between underscores) are never granted to end users.
    readable text[] := ARRAY['accounts', 'api_usage', 'credit_expiration_events', 'credit_grants', 'credit_holds', 'credit_transactions',
                             'legacy_imports', 'member_overage', 'members', 'pending_profiles', 'plans',
                             'resource_types', 'subscription_events', 'subscriptions', 'usage_metrics',
                             'user_credits', 'widget_tables'];
BEGIN
    PERFORM billing.require_service('billing.apply_grants');
    FOR f IN
        SELECT p.oid::pg_catalog.regprocedure AS sig, c.access
          FROM billing.api_functions AS c
          JOIN pg_catalog.pg_proc AS p
            ON p.proname = c.function_name AND p.pronamespace = 'billing'::pg_catalog.regnamespace
         ORDER BY p.oid::pg_catalog.regprocedure::text
    LOOP
        EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f.sig);
        IF has_service THEN
            EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO service_role', f.sig);
        END IF;
        IF has_auth THEN
            EXECUTE pg_catalog.format(CASE WHEN f.access IN ('rpc', 'anon') THEN 'GRANT EXECUTE ON FUNCTION %s TO authenticated'
                                                                            ELSE 'REVOKE ALL ON FUNCTION %s FROM authenticated' END, f.sig);
        END IF;
        IF has_anon THEN
            EXECUTE pg_catalog.format(CASE WHEN f.access = 'anon' THEN 'GRANT EXECUTE ON FUNCTION %s TO anon'
                                                                  ELSE 'REVOKE ALL ON FUNCTION %s FROM anon' END, f.sig);
        END IF;
    END LOOP;
    IF has_anon THEN GRANT USAGE ON SCHEMA billing TO anon; END IF;
    IF has_auth THEN GRANT USAGE ON SCHEMA billing TO authenticated; END IF;
    IF has_service THEN GRANT USAGE ON SCHEMA billing TO service_role; END IF;
    -- Tables and views (0.3.0): nothing for PUBLIC (any role can write request.jwt.claims, so
    -- RLS alone does not keep other roles out); SELECT for end-user roles on the readable
    -- relations, and for service_role on every relation. Revoked first, then granted in a fixed
    -- order, so the privileges are the same whatever was granted before.
    FOR r IN
        SELECT c.oid::pg_catalog.regclass AS rel, c.relname::text AS relname
          FROM pg_catalog.pg_class AS c
         WHERE c.relnamespace = 'billing'::pg_catalog.regnamespace AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
         ORDER BY c.relname
    LOOP
        EXECUTE pg_catalog.format('REVOKE ALL ON TABLE %s FROM PUBLIC', r.rel);
        FOREACH ro IN ARRAY managed LOOP
            EXECUTE pg_catalog.format('REVOKE ALL ON TABLE %s FROM %I', r.rel, ro);
        END LOOP;
        IF r.relname = ANY (readable) THEN
            SELECT pg_catalog.string_agg(pg_catalog.quote_ident(a.attname), ', ' ORDER BY a.attnum) INTO cols
              FROM pg_catalog.pg_attribute AS a
             WHERE a.attrelid = r.rel AND a.attnum > 0 AND NOT a.attisdropped AND a.attname !~ '(^|_)token(_|$)';
            FOREACH ro IN ARRAY end_users LOOP
                IF EXISTS (SELECT 1 FROM pg_catalog.pg_attribute AS a
                            WHERE a.attrelid = r.rel AND a.attnum > 0 AND NOT a.attisdropped AND a.attname ~ '(^|_)token(_|$)') THEN
                    EXECUTE pg_catalog.format('GRANT SELECT (%s) ON TABLE %s TO %I', cols, r.rel, ro);
                ELSE
                    EXECUTE pg_catalog.format('GRANT SELECT ON TABLE %s TO %I', r.rel, ro);
                END IF;
            END LOOP;
        END IF;
        IF has_service THEN
            EXECUTE pg_catalog.format('GRANT SELECT ON TABLE %s TO service_role', r.rel);
        END IF;
    END LOOP;
END
$$;
COMMENT ON FUNCTION billing.apply_grants() IS 'Service-only. (Re)applies pg_billing''s grants for the roles that exist now: EXECUTE on the API (billing.api_functions) for anon / authenticated / service_role; SELECT on the end-user tables for the roles of pg_billing.end_user_roles (columns holding tokens excepted) and on every billing table for service_role; nothing for PUBLIC. CREATE EXTENSION and expose_rpc call it; call it again after creating those roles or changing pg_billing.end_user_roles.';

SELECT billing.apply_grants();
-- ===== end of grants =====
