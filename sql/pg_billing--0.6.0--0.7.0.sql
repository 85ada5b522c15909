-- pg_billing 0.6.0 -> 0.7.0: the speed of a debit (issue 13) and Citus routing (issue 17).
--
-- Idempotent (SPEC 12: Citus may run an upgrade script on every node): every statement may run
-- again on a database that has it already. tests/stress/upgrade.py runs this file a second time
-- after ALTER EXTENSION ... UPDATE and checks nothing changed, and compares the upgraded catalog
-- with a fresh 0.7.0 install.
\echo Use "ALTER EXTENSION pg_billing UPDATE TO '0.7.0'" to load this file. \quit

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
