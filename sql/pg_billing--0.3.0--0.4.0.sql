-- pg_billing 0.3.0 -> 0.4.0: credit grants (issue 13).
--
-- Idempotent (SPEC 12: Citus may run an upgrade script on every node): every statement may run
-- again on a database that has it already. tests/stress/upgrade.py runs this file a second time
-- after ALTER EXTENSION ... UPDATE and checks nothing changed, and compares the upgraded catalog
-- with a fresh 0.4.0 install.
\echo Use "ALTER EXTENSION pg_billing UPDATE TO '0.4.0'" to load this file. \quit

-- ===== Credit grants (issue 13) =====

-- The debt an overdraft leaves is a third ledger pool. (A value added in this transaction cannot
-- be named as a constant before it commits: the functions below compare pool::text.)
ALTER TYPE billing.credit_pool ADD VALUE IF NOT EXISTS 'debt';
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_type AS t
                    WHERE t.typname = 'grant_category' AND t.typnamespace = 'billing'::pg_catalog.regnamespace) THEN
        CREATE TYPE billing.grant_category AS ENUM ('subscription', 'purchased', 'promotional', 'rollover', 'refund');
    END IF;
END
$$;

-- New columns are added without a default and filled, so the tables match a fresh install (a
-- column added with a default keeps a "missing value" that a fresh table does not have).
ALTER TABLE billing.plans ADD COLUMN IF NOT EXISTS rollover_max integer;
UPDATE billing.plans SET rollover_max = 0 WHERE rollover_max IS NULL;
ALTER TABLE billing.plans ALTER COLUMN rollover_max SET DEFAULT 0;
ALTER TABLE billing.plans ALTER COLUMN rollover_max SET NOT NULL;
ALTER TABLE billing.plans DROP CONSTRAINT IF EXISTS plans_rollover_max_check;
ALTER TABLE billing.plans ADD CONSTRAINT plans_rollover_max_check CHECK (rollover_max >= 0);

ALTER TABLE billing.accounts ADD COLUMN IF NOT EXISTS overdraft_limit bigint;
ALTER TABLE billing.accounts ADD COLUMN IF NOT EXISTS debt bigint;
ALTER TABLE billing.accounts ADD COLUMN IF NOT EXISTS next_expiry_at timestamptz;
UPDATE billing.accounts SET overdraft_limit = 0 WHERE overdraft_limit IS NULL;
UPDATE billing.accounts SET debt = 0 WHERE debt IS NULL;
ALTER TABLE billing.accounts ALTER COLUMN overdraft_limit SET DEFAULT 0;
ALTER TABLE billing.accounts ALTER COLUMN overdraft_limit SET NOT NULL;
ALTER TABLE billing.accounts ALTER COLUMN debt SET DEFAULT 0;
ALTER TABLE billing.accounts ALTER COLUMN debt SET NOT NULL;
COMMENT ON TABLE billing.accounts IS 'One row per user: the two pools (sums of the remaining credits of its grants: subscription + rollover grants, and purchased + refund + promotional grants), its overdraft limit and debt. Changed only through pg_billing functions.';

ALTER TABLE billing.credit_transactions ADD COLUMN IF NOT EXISTS grant_id uuid;
COMMENT ON TABLE billing.credit_transactions IS 'Append-only credit ledger, one row per grant touched. amount is signed (grants > 0, consumption < 0); per user and pool the amounts sum to the balance, per grant to its remaining, and the debt rows to minus the debt (billing.verify_ledger checks it). balance_after: the pool''s balance after the row (for pool debt: the debt after it).';

CREATE TABLE IF NOT EXISTS billing.credit_grants (
    user_id               uuid NOT NULL,
    id                    uuid NOT NULL,
    category              billing.grant_category NOT NULL,
    amount                bigint NOT NULL,
    remaining             bigint NOT NULL,
    -- Lower is spent first (0..100); see billing.grant_credits for the defaults.
    priority              integer NOT NULL,
    effective_at          timestamptz NOT NULL,
    expires_at            timestamptz,
    -- NULL: any spending; else only spending for one of these features.
    scope                 text[],
    voided_at             timestamptz,
    -- When a write expired what remained: at or after expires_at, or earlier when a renewal or
    -- expire_subscription_credits ended the grant (expires_at itself never moves back).
    settled_at            timestamptz,
    voided_amount         bigint,
    void_reason           text,
    -- The operation (ledger operation_id) that created the grant: for a purchase, the
    -- transaction_id clawback_credits_from_transaction takes.
    source_transaction_id uuid,
    idempotency_key       text,
    description           text,
    reference_id          text,
    -- Clock time, so grants made in one transaction keep the order they were made in.
    created_at            timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    -- Which of the two pools the grant's credits count in (subscription and rollover grants: the
    -- subscription pool; the others: the purchased pool), set when the grant is made.
    pool                  billing.credit_pool NOT NULL,
    -- remaining = 0: spent, voided or expired to the last credit. A flag the writes keep, rather
    -- than `remaining > 0` in the spending index's predicate: a debit changes remaining, and a
    -- column the index reads would make every debit a non-HOT update that writes new index
    -- entries.
    depleted              boolean NOT NULL DEFAULT false,
    -- No CHECK and no generated column here: PostgreSQL parses each one's expression again on
    -- every statement that writes the table, and this is the hot table. The statements keep
    -- 0 <= remaining <= amount (a debit takes at most what a grant holds, under the account
    -- lock), pool and depleted; billing.verify_ledger() checks all of it, and the accounts' CHECK
    -- keeps every pool sum >= 0.
    PRIMARY KEY (user_id, id)
);
-- The spending order (billing.consume_credits): priority, scoped before unscoped, earliest expiry
-- first (never-expiring last), then earliest start, oldest, id. Only grants with credits left.
CREATE INDEX IF NOT EXISTS credit_grants_spending_idx ON billing.credit_grants
    (user_id, priority, (scope IS NULL), expires_at, effective_at, created_at, id)
    WHERE NOT depleted AND voided_at IS NULL;
-- void_grant finds a grant by its id alone.
CREATE INDEX IF NOT EXISTS credit_grants_id_idx ON billing.credit_grants (id);
COMMENT ON TABLE billing.credit_grants IS 'Credit grants: amount granted, remaining, priority (lower spent first), effective_at, expires_at (NULL = never), scope (NULL = any feature), void. Spendable = effective_at <= now() < expires_at AND not voided AND remaining > 0 AND scope admits the feature, evaluated by the spending statement itself. Per grant, its ledger rows (credit_transactions.grant_id) sum to remaining.';

ALTER TABLE billing.credit_grants ENABLE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS credit_grants_read_own ON billing.credit_grants;
CREATE POLICY credit_grants_read_own ON billing.credit_grants FOR SELECT
    USING (user_id = (SELECT billing.current_user_id()));
-- (pg_extension_config_dump works only inside ALTER EXTENSION; a second run finds it done.)
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_extension AS e
                    WHERE e.extname = 'pg_billing' AND 'billing.credit_grants'::pg_catalog.regclass = ANY (e.extconfig)) THEN
        PERFORM pg_catalog.pg_extension_config_dump('billing.credit_grants', '');
    END IF;
END
$$;

-- Each account's pools become grants, with balances unchanged; accounts that have grants were
-- converted already (a second run changes nothing). The subscription pool becomes one
-- subscription grant expiring at the period end; the purchased pool becomes one purchased grant
-- per purchase that is not clawed back, newest first, each holding at most what it added (so a
-- clawback by transaction voids what is left of that purchase; FIFO spent the oldest first), and
-- one more for what no purchase accounts for (refunds, migrations). The ledger gets, per pool,
-- a row that takes the pool's balance off the pool (no grant) and one row per grant that puts
-- its share back: the pools' sums stay, and from here each grant's rows sum to its remaining.
DO $$
DECLARE
    a record;
    p record;
    op uuid;
    gid uuid;
    left_over bigint;
    share bigint;
    running bigint;
BEGIN
    FOR a IN
        SELECT x.user_id, x.subscription_credits_balance AS sub, x.purchased_credits_balance AS pur,
               x.subscription_credits_expire_at AS sub_end
          FROM billing.accounts AS x
         WHERE (x.subscription_credits_balance > 0 OR x.purchased_credits_balance > 0)
           AND NOT EXISTS (SELECT 1 FROM billing.credit_grants AS g WHERE g.user_id = x.user_id)
         ORDER BY x.user_id
    LOOP
        op := pg_catalog.gen_random_uuid();
        IF a.sub > 0 THEN
            gid := pg_catalog.gen_random_uuid();
            INSERT INTO billing.credit_grants (user_id, id, category, amount, remaining, priority, effective_at, expires_at,
                                               source_transaction_id, description, pool, depleted)
            VALUES (a.user_id, gid, 'subscription', a.sub, a.sub, 10, pg_catalog.now(), a.sub_end, op,
                    'subscription credits before 0.4.0', 'subscription', false);
            INSERT INTO billing.credit_transactions (user_id, operation_id, type, pool, amount, balance_after, description, grant_id)
            VALUES (a.user_id, op, 'grant_conversion', 'subscription', -a.sub, 0, 'subscription pool converted to grants', NULL),
                   (a.user_id, op, 'grant_conversion', 'subscription', a.sub, a.sub, 'subscription pool converted to grants', gid);
        END IF;
        IF a.pur > 0 THEN
            INSERT INTO billing.credit_transactions (user_id, operation_id, type, pool, amount, balance_after, description, grant_id)
            VALUES (a.user_id, op, 'grant_conversion', 'purchased', -a.pur, 0, 'purchased pool converted to grants', NULL);
            left_over := a.pur;
            running := 0;
            FOR p IN
                SELECT t.operation_id, pg_catalog.sum(t.amount)::bigint AS amount, pg_catalog.max(t.created_at) AS at
                  FROM billing.credit_transactions AS t
                 WHERE t.user_id = a.user_id AND t.type = 'purchase' AND t.pool = 'purchased' AND t.amount > 0
                   AND NOT EXISTS (SELECT 1 FROM billing.clawbacks AS c
                                    WHERE c.user_id = a.user_id AND c.purchase_transaction_id = t.operation_id)
                 GROUP BY t.operation_id
                 ORDER BY pg_catalog.max(t.created_at) DESC, t.operation_id DESC
            LOOP
                EXIT WHEN left_over = 0;
                share := LEAST(p.amount, left_over);
                gid := pg_catalog.gen_random_uuid();
                -- Created as of the purchase, so the spending order among purchases stays oldest first.
                INSERT INTO billing.credit_grants (user_id, id, category, amount, remaining, priority, effective_at, expires_at,
                                                   source_transaction_id, description, created_at, pool, depleted)
                VALUES (a.user_id, gid, 'purchased', p.amount, share, 50, p.at, NULL, p.operation_id,
                        'purchase before 0.4.0', p.at, 'purchased', false);
                running := running + share;
                INSERT INTO billing.credit_transactions (user_id, operation_id, type, pool, amount, balance_after, description, grant_id)
                VALUES (a.user_id, op, 'grant_conversion', 'purchased', share, running, 'purchased pool converted to grants', gid);
                left_over := left_over - share;
            END LOOP;
            IF left_over > 0 THEN
                gid := pg_catalog.gen_random_uuid();
                INSERT INTO billing.credit_grants (user_id, id, category, amount, remaining, priority, effective_at, expires_at,
                                                   source_transaction_id, description, pool, depleted)
                VALUES (a.user_id, gid, 'purchased', left_over, left_over, 50, pg_catalog.now(), NULL, op,
                        'purchased credits before 0.4.0', 'purchased', false);
                running := running + left_over;
                INSERT INTO billing.credit_transactions (user_id, operation_id, type, pool, amount, balance_after, description, grant_id)
                VALUES (a.user_id, op, 'grant_conversion', 'purchased', left_over, running, 'purchased pool converted to grants', gid);
            END IF;
        END IF;
        UPDATE billing.accounts AS x
           SET next_expiry_at = CASE WHEN a.sub > 0 THEN a.sub_end END
         WHERE x.user_id = a.user_id;
    END LOOP;
END
$$;

CREATE OR REPLACE VIEW billing.user_credits WITH (security_invoker = true) AS
SELECT a.user_id,
       COALESCE(g.sub, 0) AS subscription_credits_balance,
       COALESCE(g.pur, 0) AS purchased_credits_balance,
       COALESCE(g.sub, 0) + COALESCE(g.pur, 0) - a.debt AS total_balance,
       COALESCE(g.unscoped, 0) - a.debt AS available
  FROM billing.accounts AS a
  LEFT JOIN LATERAL (
        SELECT pg_catalog.sum(l.remaining) FILTER (WHERE l.pool = 'subscription')::bigint AS sub,
               pg_catalog.sum(l.remaining) FILTER (WHERE l.pool = 'purchased')::bigint AS pur,
               pg_catalog.sum(l.remaining) FILTER (WHERE l.scope IS NULL)::bigint AS unscoped
          FROM billing.credit_grants AS l
         WHERE l.user_id = a.user_id AND NOT l.depleted AND l.voided_at IS NULL
           AND l.effective_at <= pg_catalog.now()
           AND (l.expires_at IS NULL OR l.expires_at > pg_catalog.now())) AS g ON true;
COMMENT ON VIEW billing.user_credits IS 'Each account''s two pools, their total less the debt (billing.accounts.debt), and available: the credits any spending may use now, less the debt; expired, voided and not yet started grants count as 0. Row security applies: end users see their own row.';

INSERT INTO billing.api_functions (function_name, access) VALUES
    ('grant_credits', 'service'),
    ('void_grant', 'service'),
    ('set_overdraft_limit', 'service'),
    ('consume_credits', 'rpc'),
    ('get_credit_grants', 'rpc'),
    ('balance_at', 'rpc')
ON CONFLICT (function_name) DO NOTHING;

CREATE OR REPLACE FUNCTION billing.grant_credits(p_user_id uuid, p_amount integer, p_category text, p_priority integer DEFAULT NULL,
                                      p_effective_at timestamptz DEFAULT pg_catalog.now(), p_expires_at timestamptz DEFAULT NULL,
                                      p_scope text[] DEFAULT NULL, p_description text DEFAULT NULL,
                                      p_reference_id text DEFAULT NULL, p_idempotency_key text DEFAULT NULL)
RETURNS jsonb LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pgb_grant_credits';
COMMENT ON FUNCTION billing.grant_credits(uuid, integer, text, integer, timestamptz, timestamptz, text[], text, text, text) IS
'Service-only. Grant p_amount credits of p_category (subscription, purchased, promotional, rollover, refund) with p_priority (0..100, lower spent first; default by category: subscription 10, rollover 20, promotional 30, refund 40, purchased 50), spendable from p_effective_at until p_expires_at (NULL = never), by any feature (p_scope NULL) or only the listed ones. A grant that starts now and has no scope pays the debt first. Creates the account if missing. Returns {grant_id, transaction_id, category, amount, priority, effective_at, expires_at, scope, debt_repaid, subscription_credits_balance, purchased_credits_balance, debt, total_balance, available}.';

CREATE OR REPLACE FUNCTION billing.void_grant(p_grant_id uuid, p_reason text DEFAULT NULL, p_idempotency_key text DEFAULT NULL)
RETURNS jsonb LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pgb_void_grant';
COMMENT ON FUNCTION billing.void_grant(uuid, text, text) IS
'Service-only. Void what remains of a grant (a chargeback, a revoked promotion) and return it as voided_amount. Never twice: a later call returns already_voided = true and the first void''s amount. Unknown grant: P0002.';

CREATE OR REPLACE FUNCTION billing.set_overdraft_limit(p_user_id uuid, p_limit integer)
RETURNS jsonb LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pgb_set_overdraft_limit';
COMMENT ON FUNCTION billing.set_overdraft_limit(uuid, integer) IS
'Service-only. Let debits take the account down to -p_limit (0, the default, stops at zero with PT402). What the grants cannot pay becomes debt, which the next grant pays first. A limit below the current debt allows no new debt. Creates the account if missing. Returns {user_id, overdraft_limit, debt}.';

CREATE OR REPLACE FUNCTION billing.consume_credits(p_user_id uuid, p_amount integer, p_feature text DEFAULT NULL, p_description text DEFAULT NULL,
                                        p_reference_id text DEFAULT NULL, p_idempotency_key text DEFAULT NULL)
RETURNS jsonb LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pgb_consume_credits';
COMMENT ON FUNCTION billing.consume_credits(uuid, integer, text, text, text, text) IS
'Consume p_amount credits for p_feature from the grants that may pay for it (unscoped grants, and grants whose scope lists p_feature; with p_feature NULL only unscoped grants), in spending order: priority, scoped first, earliest expiry, earliest start, oldest. Beyond them, into overdraft up to the account''s limit. Returns {transaction_id, consumed, feature, grants: [{grant_id, category, amount}], debt_added, subscription_credits_balance, purchased_credits_balance, debt, total_balance, available}. Not enough: PT402 and nothing changes. End users: own account only.';

CREATE OR REPLACE FUNCTION billing.get_credit_grants(p_user_id uuid, p_include_spent boolean DEFAULT false)
RETURNS TABLE (grant_id uuid, category text, amount bigint, remaining bigint, priority integer, effective_at timestamptz,
               expires_at timestamptz, scope text[], status text, voided_at timestamptz, source_transaction_id uuid,
               description text, reference_id text, created_at timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT billing.authorize_user(p_user_id);
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
     ORDER BY s.priority, (s.scope IS NULL), s.expires_at, s.effective_at, s.created_at, s.id
$$;
COMMENT ON FUNCTION billing.get_credit_grants(uuid, boolean) IS
'The user''s grants in spending order, with status active, scheduled (starts later), expired (also when a renewal or expire_subscription_credits ended it early: settled_at), voided or spent; remaining counts only for active and scheduled grants. Without p_include_spent only active and scheduled grants. End users: own only.';

CREATE OR REPLACE FUNCTION billing.balance_at(p_user_id uuid, p_at timestamptz)
RETURNS jsonb
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT billing.authorize_user(p_user_id);
    SELECT billing.check_argument('p_at', CASE WHEN p_at IS NULL THEN NULL ELSE 0 END, 0, 0);
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
      FROM pools CROSS JOIN live
$$;
COMMENT ON FUNCTION billing.balance_at(uuid, timestamptz) IS
'The user''s balances as they were at p_at, from the ledger: {user_id, at, subscription_credits_balance, purchased_credits_balance, debt, total_balance, available, grants: [{grant_id, category, remaining, spendable}]}; a grant counts in the balances when it was spendable at p_at (started, not expired, not voided). End users: own only.';

-- get_user_credits gains a column (available): its result type changes, so it is created
-- again (once: a second run finds the new result and keeps it).
DO $$
BEGIN
    IF pg_catalog.pg_get_function_result('billing.get_user_credits(uuid)'::pg_catalog.regprocedure) NOT LIKE '%available%' THEN
        DROP FUNCTION billing.get_user_credits(uuid);
    END IF;
END
$$;
CREATE OR REPLACE FUNCTION billing.get_user_credits(p_user_id uuid)
RETURNS TABLE (user_id uuid, subscription_credits_balance bigint, purchased_credits_balance bigint, total_balance bigint,
               available bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT billing.authorize_user(p_user_id);
    SELECT p_user_id,
           COALESCE(c.subscription_credits_balance, 0),
           COALESCE(c.purchased_credits_balance, 0),
           COALESCE(c.total_balance, 0),
           COALESCE(c.available, 0)
      FROM (SELECT 1) AS one
      LEFT JOIN billing.user_credits AS c ON c.user_id = p_user_id
$$;
COMMENT ON FUNCTION billing.get_user_credits(uuid) IS
'The user''s two pools, their total less the debt, and available: the credits any spending may use now, less the debt (zeros when the user has no account yet); expired, voided and not yet started grants count as 0. End users: own only.';

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
        SELECT a.user_id, a.subscription_credits_balance AS sub, a.purchased_credits_balance AS pur, a.debt
          FROM billing.accounts AS a
         WHERE p_user_id IS NULL OR a.user_id = p_user_id
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
     WHERE COALESCE(acct.sub, 0) <> COALESCE(ledger.sub, 0)
        OR COALESCE(acct.pur, 0) <> COALESCE(ledger.pur, 0)
        OR COALESCE(acct.debt, 0) <> -COALESCE(ledger.debt, 0)
        OR acct.debt < 0
        OR COALESCE(acct.sub, 0) <> COALESCE(gs.sub, 0)
        OR COALESCE(acct.pur, 0) <> COALESCE(gs.pur, 0)
        OR COALESCE(acct.user_id, ledger.user_id) IN (SELECT b.user_id FROM bad_grants AS b)
$$;
COMMENT ON FUNCTION billing.verify_ledger(uuid) IS
'Service-only, for DBAs and tests: the users (all, or p_user_id) whose books disagree: a pool balance that differs from the sum of its ledger rows or of its grants'' remaining, a grant whose ledger rows do not sum to its remaining (or whose remaining is outside 0..amount, or whose pool or depleted flag is wrong), or a debt that differs from its ledger rows. Empty means consistent.';

COMMENT ON FUNCTION billing.consume_credits_v2(uuid, integer, text, text, text) IS
'Consume p_amount credits from the unscoped grants in spending order (subscription credits first, then purchased: FIFO; see consume_credits). Returns {success, transaction_id, consumed, subscription_used, purchased_used, subscription_credits_balance, purchased_credits_balance, total_balance}. Not enough credits: PT402 and nothing changes. End users: own account only. p_idempotency_key replays the first result.';

-- ===== end of credit grants =====

-- ===== Grants (last: apply_grants() grants every function above) =====
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
    readable text[] := ARRAY['accounts', 'api_usage', 'credit_expiration_events', 'credit_grants', 'credit_transactions',
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
