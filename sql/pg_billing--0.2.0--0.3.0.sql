-- pg_billing 0.2.0 -> 0.3.0: the review fixes (issue 10) and the security fixes (issue 11).
--
-- Idempotent (SPEC 12: Citus may run an upgrade script on every node): every statement may run
-- again on a database that has it already. tests/stress/upgrade.py runs this file a second time
-- after ALTER EXTENSION ... UPDATE and checks nothing changed, and compares the upgraded catalog
-- with a fresh 0.3.0 install.
--
-- Each section below names the issue items it carries.
\echo Use "ALTER EXTENSION pg_billing UPDATE TO '0.3.0'" to load this file. \quit

-- ===== Credits and subscriptions (issue 10 items 1, 2, 5, 6; issue 11 items 4, 6, 8d) =====

-- Idempotency keys in two namespaces per user (issue 11 item 6): end users' keys ('user') and
-- service callers' ('service') never collide. Keys written before 0.3.0 did not record who used
-- them: they go to the service namespace, and those of consume_credits_v2 (the one keyed
-- function end users may call) are copied into the user namespace too, so a retry across the
-- upgrade is still replayed, never applied twice.
-- (Added without a default and filled, so the table matches a fresh install: a column added with
-- a default keeps a "missing value" that a fresh table does not have.)
ALTER TABLE billing.idempotency_keys ADD COLUMN IF NOT EXISTS scope text;
UPDATE billing.idempotency_keys SET scope = 'service' WHERE scope IS NULL;
ALTER TABLE billing.idempotency_keys ALTER COLUMN scope SET NOT NULL;
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_constraint AS c
                    WHERE c.conrelid = 'billing.idempotency_keys'::pg_catalog.regclass AND c.conname = 'idempotency_keys_pkey'
                      AND pg_catalog.array_length(c.conkey, 1) = 3) THEN
        ALTER TABLE billing.idempotency_keys DROP CONSTRAINT idempotency_keys_pkey;
        ALTER TABLE billing.idempotency_keys ADD CONSTRAINT idempotency_keys_pkey PRIMARY KEY (user_id, scope, idempotency_key);
    END IF;
END
$$;
INSERT INTO billing.idempotency_keys (user_id, idempotency_key, request, response, created_at, scope)
SELECT k.user_id, k.idempotency_key, k.request, k.response, k.created_at, 'user'
  FROM billing.idempotency_keys AS k
 WHERE k.scope = 'service' AND k.request ->> 'operation' = 'consume_credits_v2'
ON CONFLICT (user_id, scope, idempotency_key) DO NOTHING;
COMMENT ON TABLE billing.idempotency_keys IS 'p_idempotency_key of credit mutators, per user and caller kind (scope: user or service): the request fingerprint and the first response, replayed on repeats. cleanup_idempotency_keys deletes old keys.';

-- What each subscription's current period has granted (issue 10 item 1, issue 11 item 4). A
-- subscription that 0.2.0 left active or trialing was granted its plan's monthly credits when its
-- period began.
ALTER TABLE billing.subscriptions ADD COLUMN IF NOT EXISTS period_credits_granted bigint;
ALTER TABLE billing.subscriptions ALTER COLUMN period_credits_granted SET DEFAULT 0;
UPDATE billing.subscriptions AS s
   SET period_credits_granted = CASE WHEN s.status IN ('active', 'trialing')
                                     THEN COALESCE((SELECT p.monthly_credits FROM billing.plans AS p WHERE p.plan_id = s.plan_id), 0)
                                     ELSE 0 END
 WHERE s.period_credits_granted IS NULL;
ALTER TABLE billing.subscriptions ALTER COLUMN period_credits_granted SET NOT NULL;

-- Subscription credits past their expiry read as 0 (issue 10 item 2).
CREATE OR REPLACE VIEW billing.user_credits WITH (security_invoker = true) AS
SELECT a.user_id,
       CASE WHEN a.subscription_credits_expire_at <= pg_catalog.now() THEN 0
            ELSE a.subscription_credits_balance END AS subscription_credits_balance,
       a.purchased_credits_balance,
       CASE WHEN a.subscription_credits_expire_at <= pg_catalog.now() THEN 0
            ELSE a.subscription_credits_balance END + a.purchased_credits_balance AS total_balance
  FROM billing.accounts AS a;
COMMENT ON VIEW billing.user_credits IS 'Each account''s two pools and their total; subscription credits past their expiry count as 0. Row security applies: end users see their own row.';

CREATE OR REPLACE FUNCTION billing.get_user_credits(p_user_id uuid)
RETURNS TABLE (user_id uuid, subscription_credits_balance bigint, purchased_credits_balance bigint, total_balance bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT billing.authorize_user(p_user_id);
    SELECT p_user_id,
           COALESCE(c.subscription_credits_balance, 0),
           COALESCE(c.purchased_credits_balance, 0),
           COALESCE(c.total_balance, 0)
      FROM (SELECT 1) AS one
      LEFT JOIN billing.user_credits AS c ON c.user_id = p_user_id
$$;
COMMENT ON FUNCTION billing.get_user_credits(uuid) IS
'The user''s two pools and their total (zeros when the user has no account yet); subscription credits past their expiry (the period end) count as 0. End users: own only.';

-- An omitted period start keeps the stored one (issue 10 item 1).
CREATE OR REPLACE FUNCTION billing.upsert_subscription(p_user_id uuid, p_plan_id text, p_status text,
                                            p_current_period_start timestamptz DEFAULT NULL,
                                            p_current_period_end timestamptz DEFAULT NULL,
                                            p_trial_ends_at timestamptz DEFAULT NULL,
                                            p_cancel_at_period_end boolean DEFAULT false,
                                            p_provider text DEFAULT NULL,
                                            p_provider_subscription_id text DEFAULT NULL,
                                            p_event_id text DEFAULT NULL,
                                            p_event_created_at timestamptz DEFAULT NULL)
RETURNS jsonb LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pgb_upsert_subscription';
COMMENT ON FUNCTION billing.upsert_subscription(uuid, text, text, timestamptz, timestamptz, timestamptz, boolean, text, text, text, timestamptz) IS
'Service-only. The subscription webhook entry point: creates or updates the user''s subscription. p_event_id makes it idempotent; an event older (p_event_created_at) than the last applied one, or about an older period (its start before the stored one), is recorded but changes nothing. An omitted (NULL) p_current_period_start keeps the stored one (now for a new subscription). Credits: when the period advances (a new subscription, or a start or end later than the stored one) an active or trialing subscription renews the plan''s monthly_credits (the old subscription credits expire; the new ones expire at p_current_period_end); within a period, a change to a plan with more monthly_credits tops the pool up by the difference, a downgrade or a repeated event grants nothing. Returns {applied, reason, subscription_id, plan_id, status, effective_plan, credits_granted}.';
COMMENT ON FUNCTION billing.process_expired_subscriptions() IS
'Service-only maintenance (run it from pg_cron): every subscription whose effective plan has become free (canceled/past_due past period end + grace, trial ended, expires_at passed) is set to expired on the free plan, and its subscription credits expire, in one transaction. A user whose account or subscription another transaction holds is skipped, never waited for (the next run takes it), so the batch cannot deadlock. Returns the number downgraded.';

-- A purchase by any spelling reaches the purchased pool (issue 10 item 5).
COMMENT ON FUNCTION billing.increment_credits_with_log(uuid, integer, text, text, text) IS
'Service-only legacy alias. Type ''purchase'' (matched case-insensitively, spaces trimmed, and logged as purchase) adds to the purchased pool, any other type to the subscription pool. Returns the new total balance.';

-- ===== Widgets: the missing-column list in a fixed order (PostgreSQL 16-18 support, issue 12) =====
-- register_widget_table listed a table's missing widget columns in whatever order the plan gave
-- (string_agg without ORDER BY; PostgreSQL 17 plans it differently): now always in the order of
-- the required columns.
CREATE OR REPLACE FUNCTION billing.register_widget_table(p_widget_type text, p_table regclass) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_schema text;
    v_table text;
    v_missing text;
BEGIN
    PERFORM billing.require_service('billing.register_widget_table');
    IF p_widget_type IS NULL OR p_widget_type !~ '^[a-z][a-z0-9_]{0,62}$' THEN
        RAISE EXCEPTION 'p_widget_type must be a lower-case name such as links' USING ERRCODE = '22023';
    END IF;
    IF p_table IS NULL THEN
        RAISE EXCEPTION 'p_table must not be NULL' USING ERRCODE = '22023';
    END IF;
    SELECT n.nspname, c.relname INTO v_schema, v_table
      FROM pg_catalog.pg_class AS c JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
     WHERE c.oid = p_table AND c.relkind IN ('r', 'p', 'v', 'm', 'f');
    IF NOT FOUND THEN
        RAISE EXCEPTION '% is not a table or view', p_table USING ERRCODE = '22023';
    END IF;
    SELECT pg_catalog.string_agg(req.col, ', ' ORDER BY req.n) INTO v_missing
      FROM (VALUES (1, 'id', 'pg_catalog.uuid'::pg_catalog.regtype), (2, 'user_id', 'pg_catalog.uuid'::pg_catalog.regtype),
                   (3, 'position', 'pg_catalog.int4'::pg_catalog.regtype), (4, 'is_active', 'pg_catalog.bool'::pg_catalog.regtype),
                   (5, 'created_at', NULL), (6, 'updated_at', NULL)) AS req(n, col, typ)
     WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute AS a
                        WHERE a.attrelid = p_table AND a.attname = req.col AND a.attnum > 0 AND NOT a.attisdropped
                          AND (req.typ IS NULL OR a.atttypid = req.typ
                               OR (req.col = 'position' AND a.atttypid IN ('pg_catalog.int2'::pg_catalog.regtype,
                                                                          'pg_catalog.int8'::pg_catalog.regtype))));
    IF v_missing IS NOT NULL THEN
        RAISE EXCEPTION 'table % lacks the widget columns %', p_table, v_missing USING ERRCODE = '22023',
            HINT = 'a widget table needs id uuid, user_id uuid, position (smallint, integer or bigint), is_active boolean, created_at, updated_at';
    END IF;
    INSERT INTO billing.widget_tables AS w (widget_type, schema_name, table_name) VALUES (p_widget_type, v_schema, v_table)
    ON CONFLICT (widget_type) DO UPDATE SET schema_name = EXCLUDED.schema_name, table_name = EXCLUDED.table_name;
END
$$;
