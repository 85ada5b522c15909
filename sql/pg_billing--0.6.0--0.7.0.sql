-- pg_billing 0.6.0 -> 0.7.0: the speed of a debit (issue 13) and Citus routing (issue 17).
--
-- Idempotent (SPEC 12: Citus may run an upgrade script on every node): every statement may run
-- again on a database that has it already. tests/stress/upgrade.py runs this file a second time
-- after ALTER EXTENSION ... UPDATE and checks nothing changed, and compares the upgraded catalog
-- with a fresh 0.7.0 install.
\echo Use "ALTER EXTENSION pg_billing UPDATE TO '0.7.0'" to load this file. \quit

-- ===== A distributed cluster (issue 17): the workers first =====
-- On a Citus coordinator whose billing tables are distributed (billing.distribute() of 0.6.0),
-- this script's ALTER TABLEs reach the shards on the workers, where the domains it creates do not
-- exist yet (Citus runs ALTER EXTENSION on the workers only after the coordinator's script, and
-- does not send the objects an extension script creates). So the workers' extension is updated
-- to 0.7.0 first, as Citus would update it (DDL propagation off: their own catalog only);
-- a worker already at 0.7.0 is left as it is, so the script may run again. Nothing runs
-- without Citus or on a worker.
DO $$
DECLARE distributed boolean; failed text;
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'citus') THEN
        EXECUTE $q$
            SELECT (SELECT l.groupid FROM pg_catalog.pg_dist_local_group AS l) = 0
                   AND EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition AS p
                                WHERE p.logicalrelid = 'billing.accounts'::pg_catalog.regclass)$q$
        INTO distributed;
        IF distributed THEN
            EXECUTE $q$
                SELECT pg_catalog.string_agg(w.nodename || ':' || w.nodeport || ': ' || w.result, '; ')
                  FROM pg_catalog.run_command_on_workers(
                           'SET LOCAL citus.enable_ddl_propagation TO off; ALTER EXTENSION pg_billing UPDATE TO ''0.7.0''') AS w
                 WHERE NOT w.success$q$
            INTO failed;
            IF failed IS NOT NULL THEN
                RAISE EXCEPTION 'pg_billing could not be updated to 0.7.0 on the Citus workers: %', failed;
            END IF;
        END IF;
    END IF;
END
$$;

-- ===== The cost of a debit (issue 13) =====

-- The pools and the ledger's amounts are checked by domains instead of table CHECKs: a table
-- CHECK's expression is parsed again on every statement that writes the table, a domain's check
-- is kept planned in the type cache and runs only where a statement assigns the column.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_type AS t
                    WHERE t.typname = 'credit_balance' AND t.typnamespace = 'billing'::pg_catalog.regnamespace) THEN
        CREATE DOMAIN billing.credit_balance AS bigint CONSTRAINT credit_balance_non_negative CHECK (VALUE >= 0);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_type AS t
                    WHERE t.typname = 'credit_change' AND t.typnamespace = 'billing'::pg_catalog.regnamespace) THEN
        CREATE DOMAIN billing.credit_change AS bigint CONSTRAINT credit_change_non_zero CHECK (VALUE <> 0);
    END IF;
END
$$;
COMMENT ON DOMAIN billing.credit_balance IS 'A stored credit balance (an account''s pool, a ledger row''s balance after): never negative.';
COMMENT ON DOMAIN billing.credit_change IS 'A ledger row''s signed amount: never 0.';

ALTER TABLE billing.accounts DROP CONSTRAINT IF EXISTS accounts_balances_non_negative;
ALTER TABLE billing.credit_transactions DROP CONSTRAINT IF EXISTS credit_transactions_amount_check;
DO $$
BEGIN
    -- Each column once: the type changes without a rewrite (a domain over the same type), but
    -- every stored value is checked against the domain.
    IF (SELECT a.atttypid FROM pg_catalog.pg_attribute AS a
         WHERE a.attrelid = 'billing.accounts'::pg_catalog.regclass AND a.attname = 'subscription_credits_balance')
       <> 'billing.credit_balance'::pg_catalog.regtype THEN
        ALTER TABLE billing.accounts
            ALTER COLUMN subscription_credits_balance TYPE billing.credit_balance,
            ALTER COLUMN purchased_credits_balance TYPE billing.credit_balance;
    END IF;
    IF (SELECT a.atttypid FROM pg_catalog.pg_attribute AS a
         WHERE a.attrelid = 'billing.credit_transactions'::pg_catalog.regclass AND a.attname = 'amount')
       <> 'billing.credit_change'::pg_catalog.regtype THEN
        ALTER TABLE billing.credit_transactions
            ALTER COLUMN amount TYPE billing.credit_change,
            ALTER COLUMN balance_after TYPE billing.credit_balance;
    END IF;
END
$$;

-- The head of the spending order, recorded on the account (a cache: NULL until the next general
-- debit writes it). Added without defaults, so the table matches a fresh install.
ALTER TABLE billing.accounts ADD COLUMN IF NOT EXISTS head_grant uuid;
ALTER TABLE billing.accounts ADD COLUMN IF NOT EXISTS head_subscription boolean;
ALTER TABLE billing.accounts ADD COLUMN IF NOT EXISTS head_remaining bigint;
ALTER TABLE billing.accounts ADD COLUMN IF NOT EXISTS head_until timestamptz;

-- verify_ledger also checks the recorded head.
CREATE OR REPLACE FUNCTION billing.verify_ledger(p_user_id uuid DEFAULT NULL)
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

-- Plan-wide balance rules and reset_monthly_usage as multi-shard statements Citus accepts (issue 17):
-- no table-reading helper called per row (see sql/events.sql and sql/usage.sql).
CREATE OR REPLACE FUNCTION billing._sync_balance_alerts(p_user_id uuid) RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_plan text;
    v_users uuid[];
    n bigint;
    m bigint;
BEGIN
    IF p_user_id IS NOT NULL THEN
        -- One account (its first write): its effective plan first (user_effective_plan reads
        -- billing.subscriptions and billing.plans, so it is evaluated here, never inside the
        -- statement on billing.accounts: on Citus a shard's).
        v_plan := billing.user_effective_plan(p_user_id);
        UPDATE billing.accounts AS a
           SET alert_threshold = r.threshold,
               alert_rearm = r.rearm,
               alert_state = CASE WHEN a.alert_state < 0 OR r.threshold IS NULL OR r.available >= r.threshold THEN 0
                                  WHEN r.available > 0 THEN 1 ELSE 2 END
          FROM (SELECT a.user_id,
                       COALESCE(u.threshold, p.threshold) AS threshold,
                       CASE WHEN u.user_id IS NOT NULL THEN pg_catalog.ceil(u.threshold * (1 + u.hysteresis))::bigint
                            WHEN p.plan_id IS NOT NULL THEN pg_catalog.ceil(p.threshold * (1 + p.hysteresis))::bigint END AS rearm,
                       a.subscription_credits_balance + a.purchased_credits_balance - a.held - a.debt AS available
                  FROM billing.accounts AS a
                  LEFT JOIN billing.user_balance_alerts AS u ON u.user_id = a.user_id
                  LEFT JOIN billing.plan_balance_alerts AS p ON p.plan_id = v_plan
                 WHERE a.user_id = p_user_id) AS r
         WHERE a.user_id = r.user_id AND a.user_id = p_user_id
           AND (a.alert_threshold IS DISTINCT FROM r.threshold OR a.alert_rearm IS DISTINCT FROM r.rearm OR a.alert_state < 0);
    ELSE
        -- Every account (a plan's rule changed), in a few multi-shard statements on Citus: each
        -- account's effective plan is computed from a read of the accounts and their
        -- subscriptions (effective_plan_id reads billing.plans, so it runs on the rows this read
        -- returns: on Citus on the coordinator, never inside a statement on a shard), then the
        -- accounts of each plan are updated in one statement, with that plan's rule.
        n := 0;
        FOR v_plan, v_users IN
            WITH c AS MATERIALIZED (
                SELECT a.user_id, s.plan_id, s.status, s.current_period_end, s.trial_ends_at, s.expires_at
                  FROM billing.accounts AS a LEFT JOIN billing.subscriptions AS s ON s.user_id = a.user_id)
            SELECT e.plan_id, pg_catalog.array_agg(e.user_id ORDER BY e.user_id)
              FROM (SELECT c.user_id,
                           billing.effective_plan_id(c.plan_id, c.status, c.current_period_end, c.trial_ends_at, c.expires_at) AS plan_id
                      FROM c) AS e
             GROUP BY e.plan_id ORDER BY e.plan_id
        LOOP
            UPDATE billing.accounts AS a
               SET alert_threshold = r.threshold,
                   alert_rearm = r.rearm,
                   alert_state = CASE WHEN a.alert_state < 0 OR r.threshold IS NULL OR r.available >= r.threshold THEN 0
                                      WHEN r.available > 0 THEN 1 ELSE 2 END
              FROM (SELECT a.user_id,
                           COALESCE(u.threshold, p.threshold) AS threshold,
                           CASE WHEN u.user_id IS NOT NULL THEN pg_catalog.ceil(u.threshold * (1 + u.hysteresis))::bigint
                                WHEN p.plan_id IS NOT NULL THEN pg_catalog.ceil(p.threshold * (1 + p.hysteresis))::bigint END AS rearm,
                           a.subscription_credits_balance + a.purchased_credits_balance - a.held - a.debt AS available
                      FROM billing.accounts AS a
                      LEFT JOIN billing.user_balance_alerts AS u ON u.user_id = a.user_id
                      LEFT JOIN billing.plan_balance_alerts AS p ON p.plan_id = v_plan
                     WHERE a.user_id = ANY (v_users)) AS r
             WHERE a.user_id = r.user_id AND a.user_id = ANY (v_users)
               AND (a.alert_threshold IS DISTINCT FROM r.threshold OR a.alert_rearm IS DISTINCT FROM r.rearm OR a.alert_state < 0);
            GET DIAGNOSTICS m = ROW_COUNT;
            n := n + m;
        END LOOP;
        RETURN n::integer;
    END IF;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n::integer;
END
$$;

CREATE OR REPLACE FUNCTION billing.reset_monthly_usage() RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_now timestamptz := pg_catalog.now();
    v_month_start timestamptz := pg_catalog.date_trunc('month', pg_catalog.now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    v_month_end timestamptz := (pg_catalog.date_trunc('month', pg_catalog.now() AT TIME ZONE 'UTC') + interval '1 month') AT TIME ZONE 'UTC';
    n bigint;
BEGIN
    PERFORM billing.require_service('reset_monthly_usage');
    -- Each user's current period as billing.current_usage_period gives it (the subscription
    -- period when now() is inside it, else the UTC calendar month), from the subscription joined
    -- here rather than that function called per row (it reads billing.subscriptions): on Citus
    -- this is one multi-shard statement, and no statement on a shard may read another
    -- distributed table.
    INSERT INTO billing.usage_metrics (user_id, period_start, period_end)
    SELECT l.user_id,
           CASE WHEN s.current_period_start IS NOT NULL AND s.current_period_end IS NOT NULL
                 AND v_now >= s.current_period_start AND v_now < s.current_period_end
                THEN s.current_period_start ELSE v_month_start END,
           CASE WHEN s.current_period_start IS NOT NULL AND s.current_period_end IS NOT NULL
                 AND v_now >= s.current_period_start AND v_now < s.current_period_end
                THEN s.current_period_end ELSE v_month_end END
      FROM (SELECT DISTINCT ON (u.user_id) u.user_id, u.period_end
              FROM billing.usage_metrics AS u
             ORDER BY u.user_id, u.period_start DESC) AS l
      LEFT JOIN billing.subscriptions AS s ON s.user_id = l.user_id
     WHERE l.period_end <= v_now
    ON CONFLICT (user_id, period_start) DO NOTHING;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n::integer;
END
$$;

-- expose_rpc on a Citus coordinator (issue 17): its distributed commands run sequentially.
CREATE OR REPLACE FUNCTION billing.expose_rpc(p_schema text DEFAULT 'public') RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    f record;
    planted record;
    n integer := 0;
    call_args text;
    body text;
    ddl text;
    target text;
    me oid := (SELECT r.oid FROM pg_catalog.pg_roles AS r WHERE r.rolname = CURRENT_USER);
    nsp oid;
BEGIN
    PERFORM billing.require_service('billing.expose_rpc');
    -- On a Citus coordinator (issue 17) the grants below touch distributed tables over several
    -- connections per node, and a function created afterwards must reach each node over one:
    -- this transaction's distributed commands run sequentially.
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'citus') THEN
        PERFORM pg_catalog.set_config('citus.multi_shard_modify_mode', 'sequential', true);
    END IF;
    IF p_schema IS NULL OR NOT EXISTS (SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = p_schema) THEN
        RAISE EXCEPTION 'schema % does not exist', pg_catalog.quote_literal(COALESCE(p_schema, 'NULL'))
            USING ERRCODE = '22023', HINT = 'create the schema first, or pass the schema PostgREST exposes (usually public)';
    END IF;
    IF p_schema IN ('billing', 'information_schema') OR p_schema LIKE 'pg\_%' THEN
        RAISE EXCEPTION 'wrappers cannot be created in schema %', p_schema USING ERRCODE = '22023';
    END IF;
    nsp := (SELECT ns.oid FROM pg_catalog.pg_namespace AS ns WHERE ns.nspname = p_schema);
    -- Never adopt a function another role planted (0.3.0): CREATE OR REPLACE would keep its
    -- owner, who could later rewrite the "wrapper" that backends call with the service key. Any
    -- function of p_schema with an API function's name must be ours (the extension owner's).
    SELECT p.oid::pg_catalog.regprocedure AS fn, p.proowner::pg_catalog.regrole AS owner INTO planted
      FROM pg_catalog.pg_proc AS p JOIN billing.api_catalog() AS c ON c.function_name = p.proname
     WHERE p.pronamespace = nsp AND p.proowner <> me
     ORDER BY p.oid::pg_catalog.regprocedure::text LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'function % is owned by role %, not by %: billing.expose_rpc does not adopt or replace functions of other roles',
                        planted.fn, planted.owner, CURRENT_USER
            USING ERRCODE = '42501',
                  HINT = pg_catalog.format('drop it (or, after reading its body, ALTER FUNCTION %s OWNER TO %I), then run expose_rpc again; let only trusted roles create in schema %I',
                                           planted.fn, CURRENT_USER, p_schema);
    END IF;
    PERFORM billing.apply_grants();
    FOR f IN
        SELECT p.oid, p.proname, p.pronargs, p.proargtypes, p.proretset, p.provolatile, c.access
          FROM billing.api_catalog() AS c
          JOIN pg_catalog.pg_proc AS p
            ON p.proname = c.function_name AND p.pronamespace = 'billing'::pg_catalog.regnamespace
         ORDER BY p.proname
    LOOP
        SELECT COALESCE(pg_catalog.string_agg('$' || i, ', ' ORDER BY i), '')
          INTO call_args FROM pg_catalog.generate_series(1, f.pronargs) AS i;
        body := pg_catalog.format(CASE WHEN f.proretset THEN 'SELECT * FROM billing.%I(%s)' ELSE 'SELECT billing.%I(%s)' END,
                                  f.proname, call_args);
        target := pg_catalog.format('%I.%I(%s)', p_schema, f.proname, pg_catalog.pg_get_function_identity_arguments(f.oid));
        ddl := pg_catalog.format(
            'CREATE OR REPLACE FUNCTION %I.%I(%s) RETURNS %s LANGUAGE sql %s SECURITY INVOKER SET search_path = pg_catalog, pg_temp AS %L',
            p_schema, f.proname, pg_catalog.pg_get_function_arguments(f.oid), pg_catalog.pg_get_function_result(f.oid),
            CASE f.provolatile WHEN 'i' THEN 'IMMUTABLE' WHEN 's' THEN 'STABLE' ELSE 'VOLATILE' END, body);
        BEGIN
            EXECUTE ddl;
        EXCEPTION WHEN invalid_function_definition THEN
            -- The result type changed in an upgrade: replace the old wrapper.
            EXECUTE 'DROP FUNCTION ' || target;
            EXECUTE ddl;
        END;
        -- A function planted after the check above (a concurrent CREATE FUNCTION) keeps its
        -- owner through CREATE OR REPLACE: refuse rather than leave another role's wrapper.
        SELECT p.oid::pg_catalog.regprocedure AS fn, p.proowner::pg_catalog.regrole AS owner INTO planted
          FROM pg_catalog.pg_proc AS p
         WHERE p.pronamespace = nsp AND p.proname = f.proname AND p.proargtypes = f.proargtypes AND p.proowner <> me;
        IF FOUND THEN
            RAISE EXCEPTION 'function % is owned by role %, not by %: billing.expose_rpc does not adopt or replace functions of other roles',
                            planted.fn, planted.owner, CURRENT_USER
                USING ERRCODE = '42501';
        END IF;
        EXECUTE pg_catalog.format('COMMENT ON FUNCTION %s IS %L', target, pg_catalog.obj_description(f.oid, 'pg_proc'));
        EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', target);
        IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'service_role') THEN
            EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO service_role', target);
        END IF;
        IF f.access IN ('rpc', 'anon') AND EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'authenticated') THEN
            EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO authenticated', target);
        END IF;
        IF f.access = 'anon' AND EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'anon') THEN
            EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO anon', target);
        END IF;
        n := n + 1;
    END LOOP;
    RETURN n;
END
$$;
COMMENT ON FUNCTION billing.expose_rpc(text) IS 'Service-only (DBA). Creates (or refreshes) in p_schema thin SECURITY INVOKER wrappers, owned by the extension owner, with the names, parameters and results of pg_billing''s API, so supabase.rpc(''consume_credits_v2'', {...}) works unchanged; re-run after ALTER EXTENSION UPDATE. Refuses (42501, naming the function and its owner) when p_schema holds a function with an API function''s name that another role owns. Returns the number of wrappers.';

-- ===== Event delivery on a Citus cluster (issue 17, branch citus-events) =====

-- Claims and acks on a distributed billing.events use no transaction-id horizon
-- (src/api/events.rs, mod cluster), so cleanup_events deletes what every consumer acknowledged
-- without comparing horizons there. Unchanged on a single node.
CREATE OR REPLACE FUNCTION billing.cleanup_events(p_older_than interval DEFAULT '7 days') RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_cutoff timestamptz;
    v_consumers text[];
    v_horizon pg_catalog.xid8;
    v_cluster boolean := false;
    n bigint;
BEGIN
    PERFORM billing.check_retention('cleanup_events', p_older_than, interval '1 hour', 'a consumer made after the cleanup does not see deleted events');
    v_cutoff := pg_catalog.now() - p_older_than;
    -- The consumers first (on Citus a reference table, which a correlated subquery of a
    -- statement on a distributed table may not read): an event goes when it is older than the
    -- cut-off and, for every consumer, the consumer's horizon is past its transaction and the
    -- consumer's cursor of its user has acknowledged it (with no consumer: every such event).
    SELECT pg_catalog.array_agg(k.consumer), pg_catalog.min(k.horizon) INTO v_consumers, v_horizon
      FROM billing.event_consumers AS k;
    -- On Citus (billing.events distributed) claims use no horizon (src/api/events.rs, mod
    -- cluster): there an acknowledgement by every consumer is enough.
    IF pg_catalog.to_regclass('pg_catalog.pg_dist_partition') IS NOT NULL THEN
        v_cluster := billing._citus_placed('events');
    END IF;
    IF v_cluster THEN
        DELETE FROM billing.events AS e
         WHERE e.created_at < v_cutoff
           AND (v_consumers IS NULL
                OR (SELECT pg_catalog.count(*) FROM billing.event_cursors AS c
                     WHERE c.user_id = e.user_id AND c.consumer = ANY (v_consumers) AND c.acked_id >= e.id)
                   = pg_catalog.cardinality(v_consumers));
    ELSE
        DELETE FROM billing.events AS e
         WHERE e.created_at < v_cutoff
           AND (v_consumers IS NULL
                OR (e.tx < v_horizon
                    AND (SELECT pg_catalog.count(*) FROM billing.event_cursors AS c
                          WHERE c.user_id = e.user_id AND c.consumer = ANY (v_consumers) AND c.acked_id >= e.id)
                        = pg_catalog.cardinality(v_consumers)));
    END IF;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n::integer;
END
$$;
COMMENT ON FUNCTION billing.claim_events(text, integer, interval) IS
'Service-only. Up to p_limit (1 to 10000) events for consumer p_consumer (1 to 100 characters of A-Z a-z 0-9 _ . : -; made at its first claim, starting with every retained event), in id order, not acknowledged by it and not in another of its claims. Each user''s events come in order and are in at most one claim of the consumer at a time (its cursor row is taken FOR UPDATE SKIP LOCKED): several workers never get the same event while it is claimed. A claim lasts p_visibility_timeout (1 second to 1 day; default 30 s): what is not acknowledged by then is handed out again (deliveries: 1 the first time an event is handed out, more when it may have been seen before). At least once: acknowledge with ack_events after handling. An event is handed out once no transaction that began before it can still commit (a long writing transaction delays delivery, never loses an event); on a Citus cluster (billing.distribute()) once it is visible, after its user''s earlier events (README: Events on the cluster).';

-- ===== The registries of app tables stay local on a Citus coordinator (issue 17) =====
-- billing.resource_types and billing.widget_tables name tables of the coordinator by oid; 0.6.0's
-- distribute() made them reference tables, copied to workers that have no such table.
CREATE OR REPLACE FUNCTION billing.distribute(p_shard_count integer DEFAULT NULL) RETURNS jsonb
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    reference text[] := ARRAY['plans', 'plan_balance_alerts', 'limit_alerts', 'event_consumers', 'api_functions'];
    -- Kept local on the coordinator (0.7.0). 0.6.0 made them reference tables, which Citus cannot
    -- turn back into local ones while they belong to the extension (undistribute_table refuses):
    -- on such a cluster register_resource and register_widget_table still fail (README).
    coordinator text[] := ARRAY['resource_types', 'widget_tables'];
    -- accounts first: the others are colocated with it.
    by_user text[] := ARRAY['accounts', 'credit_grants', 'credit_holds', 'credit_transactions', 'credit_expiration_events',
                            'idempotency_keys', 'usage_event_keys', 'clawbacks', 'subscriptions', 'subscription_events',
                            'members', 'member_overage', 'legacy_imports', 'api_usage', 'usage_metrics', 'events',
                            'event_cursors', 'user_balance_alerts', 'limit_alert_state'];
    -- (table, distribution column, colocate with)
    other text[] := ARRAY['member_emails', 'email', 'none',
                          'pending_profiles', 'email', 'billing.member_emails',
                          'webhook_events', 'event_id', 'none'];
    shards integer;
    t text;
    q text;
    p record;
    n_policies integer := 0;
    n_reference integer := 0;
    n_distributed integer := 0;
    n_kept integer := 0;
    n_local integer := 0;
    unknown text;
    i integer;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'citus') THEN
        RAISE EXCEPTION 'billing.distribute() needs Citus, and the citus extension is not installed in this database'
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'On a Citus coordinator run CREATE EXTENSION citus first. On a single PostgreSQL node pg_billing needs no distribute().';
    END IF;
    EXECUTE 'SELECT pg_catalog.citus_is_coordinator()' INTO STRICT q;
    IF q IS DISTINCT FROM 'true' THEN
        RAISE EXCEPTION 'billing.distribute() runs on the Citus coordinator, and this node is a worker'
            USING ERRCODE = 'feature_not_supported', HINT = 'Connect to the coordinator and call it there.';
    END IF;
    IF p_shard_count IS NOT NULL AND (p_shard_count < 1 OR p_shard_count > 64000) THEN
        RAISE EXCEPTION 'p_shard_count must be between 1 and 64000, got %', p_shard_count
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    shards := COALESCE(p_shard_count, pg_catalog.current_setting('citus.shard_count')::integer);

    SELECT pg_catalog.string_agg(c.relname, ', ' ORDER BY c.relname) INTO unknown
      FROM pg_catalog.pg_class AS c
     WHERE c.relnamespace = 'billing'::pg_catalog.regnamespace AND c.relkind IN ('r', 'p')
       AND c.relname <> ALL (reference || coordinator || by_user || ARRAY[other[1], other[4], other[7]]);
    IF unknown IS NOT NULL THEN
        RAISE EXCEPTION 'billing.distribute() does not know how to place these billing tables: %', unknown
            USING ERRCODE = 'internal_error';
    END IF;

    -- Row security in a form Citus accepts on distributed tables: the end user's id compared by a
    -- function call, not by a scalar subquery (on a single node the subquery is an initplan,
    -- evaluated once per query; Citus refuses subqueries in policies).
    FOR p IN
        SELECT c.relname, pol.polname, pg_catalog.pg_get_expr(pol.polqual, pol.polrelid) AS qual
          FROM pg_catalog.pg_policy AS pol JOIN pg_catalog.pg_class AS c ON c.oid = pol.polrelid
         WHERE c.relnamespace = 'billing'::pg_catalog.regnamespace
           AND pg_catalog.pg_get_expr(pol.polqual, pol.polrelid) LIKE '%SELECT%'
         ORDER BY c.relname, pol.polname
    LOOP
        q := pg_catalog.replace(p.qual, '( SELECT billing.current_user_id() AS current_user_id)', 'billing.current_user_id()');
        IF p.polname = 'events_read_own' THEN
            -- anon reads no event whatever sub it claims (sql/events.sql), without the subquery.
            q := $q$user_id = billing.current_user_id() AND CURRENT_USER::text <> 'anon'
                    AND COALESCE(NULLIF(pg_catalog.current_setting('request.jwt.claims', true), '')::jsonb ->> 'role', '') <> 'anon'$q$;
        END IF;
        IF q LIKE '%SELECT%' THEN
            RAISE EXCEPTION 'the policy % on billing.% has a subquery Citus refuses: %', p.polname, p.relname, p.qual
                USING ERRCODE = 'internal_error';
        END IF;
        EXECUTE pg_catalog.format('ALTER POLICY %I ON billing.%I USING (%s)', p.polname, p.relname, q);
        n_policies := n_policies + 1;
    END LOOP;

    FOREACH t IN ARRAY reference LOOP
        IF billing._citus_placed(t) THEN
            n_kept := n_kept + 1;
        ELSE
            EXECUTE 'SELECT pg_catalog.create_reference_table($1)' USING ('billing.' || pg_catalog.quote_ident(t))::pg_catalog.regclass;
            n_reference := n_reference + 1;
        END IF;
    END LOOP;
    FOREACH t IN ARRAY coordinator LOOP
        IF billing._citus_placed(t) THEN
            RAISE WARNING 'billing.% is a reference table (placed by pg_billing 0.6.0): app tables cannot be registered in it on this cluster', t
                USING HINT = 'README, Scale-out on Citus: registries of app tables.';
            n_kept := n_kept + 1;
        ELSE
            n_local := n_local + 1;
        END IF;
    END LOOP;
    FOREACH t IN ARRAY by_user LOOP
        IF billing._citus_placed(t) THEN
            n_kept := n_kept + 1;
        ELSIF t = 'accounts' THEN
            EXECUTE 'SELECT pg_catalog.create_distributed_table($1, ''user_id'', colocate_with => ''none'', shard_count => $2)'
                USING 'billing.accounts'::pg_catalog.regclass, shards;
            n_distributed := n_distributed + 1;
        ELSE
            EXECUTE 'SELECT pg_catalog.create_distributed_table($1, ''user_id'', colocate_with => ''billing.accounts'')'
                USING ('billing.' || pg_catalog.quote_ident(t))::pg_catalog.regclass;
            n_distributed := n_distributed + 1;
        END IF;
    END LOOP;
    FOR i IN 0 .. pg_catalog.array_length(other, 1) / 3 - 1 LOOP
        t := other[3 * i + 1];
        IF billing._citus_placed(t) THEN
            n_kept := n_kept + 1;
        ELSIF other[3 * i + 3] = 'none' THEN
            EXECUTE 'SELECT pg_catalog.create_distributed_table($1, $2, colocate_with => ''none'', shard_count => $3)'
                USING ('billing.' || pg_catalog.quote_ident(t))::pg_catalog.regclass, other[3 * i + 2], shards;
            n_distributed := n_distributed + 1;
        ELSE
            EXECUTE 'SELECT pg_catalog.create_distributed_table($1, $2, colocate_with => $3)'
                USING ('billing.' || pg_catalog.quote_ident(t))::pg_catalog.regclass, other[3 * i + 2], other[3 * i + 3];
            n_distributed := n_distributed + 1;
        END IF;
    END LOOP;
    RETURN pg_catalog.jsonb_build_object(
        'policies_rewritten', n_policies,
        'reference_tables_created', n_reference,
        'distributed_tables_created', n_distributed,
        'tables_already_placed', n_kept,
        'tables_kept_local', n_local,
        'shard_count', shards);
END
$$;
COMMENT ON FUNCTION billing.distribute(integer) IS
'DBA only (no role is granted EXECUTE). On a Citus coordinator: makes the billing catalogs reference tables (except the registries of app tables, resource_types and widget_tables, which stay local to the coordinator, whose tables they name), distributes every per-user table by user_id colocated with billing.accounts (p_shard_count shards, default citus.shard_count), member_emails and pending_profiles by email and webhook_events by event_id, and rewrites the end-user row policies into a form Citus accepts. Idempotent: a second call changes nothing. Fails with 0A000 when Citus is absent or this is not the coordinator.';
