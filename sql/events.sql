-- Events out (0.6.0; issue 15): an outbox written in the transaction of the change that caused
-- each event, rules that fire once, and delivery with per-user order. The mutators are Rust
-- (src/api/events.rs); the statements that only SQL can hold (the emit helper the subscription
-- trigger also uses, the rule sync, cleanup) are here.

-- The outbox. Every event of a user is written while that user's billing.accounts row is
-- locked, and its id is taken after the lock, so one user's events commit in id order; tx is
-- the writing transaction, so a consumer discovers an event only once no transaction that
-- began before it can still commit (billing.claim_events).
CREATE SEQUENCE billing.events_id_seq;
CREATE TABLE billing.events (
    user_id    uuid NOT NULL,
    id         bigint NOT NULL DEFAULT pg_catalog.nextval('billing.events_id_seq'),
    type       text NOT NULL,
    payload    jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    tx         pg_catalog.xid8 NOT NULL DEFAULT pg_catalog.pg_current_xact_id(),
    PRIMARY KEY (user_id, id)
);
ALTER SEQUENCE billing.events_id_seq OWNED BY billing.events.id;
CREATE INDEX events_id_idx ON billing.events (id);
CREATE INDEX events_tx_idx ON billing.events (tx);
COMMENT ON TABLE billing.events IS 'Billing events (balance.low, balance.depleted, balance.recovered, limit.reached, limit.cleared, grant.expired, grant.voided, hold.expired, overdraft.entered, subscription.changed, rate_limit.exceeded), written in the transaction of the change that caused them: none is lost, none exists for a rolled-back change. Consumers read them with billing.claim_events / billing.ack_events; end users SELECT their own rows (Supabase Realtime: add the table to the supabase_realtime publication). billing.cleanup_events deletes acknowledged ones.';

-- Consumers and their per-user cursors. horizon: every transaction older than it has finished
-- and its events have been discovered (a cursor row made or moved for its user).
CREATE TABLE billing.event_consumers (
    consumer   text PRIMARY KEY,
    horizon    pg_catalog.xid8 NOT NULL DEFAULT '0',
    created_at timestamptz NOT NULL DEFAULT pg_catalog.now()
);
COMMENT ON TABLE billing.event_consumers IS 'Event consumers (billing.claim_events makes one at its first claim): horizon is the transaction id below which every event has been discovered.';

CREATE TABLE billing.event_cursors (
    user_id       uuid NOT NULL,
    consumer      text NOT NULL,
    -- Every event of the user up to here is acknowledged by the consumer.
    acked_id      bigint NOT NULL DEFAULT 0,
    -- The highest id discovered for the user (pending while above acked_id), and a lower bound
    -- of the oldest pending one (claims take the users with the oldest pending events first).
    last_event_id bigint NOT NULL DEFAULT 0,
    pending_from  bigint NOT NULL DEFAULT 0,
    -- The claim in flight, if any: its id, the highest event it handed out, and until when.
    claim_id      uuid,
    claimed_up_to bigint,
    claimed_until timestamptz,
    -- The highest event ever handed out (since everything handed out was last acknowledged),
    -- and how often the oldest of them were handed out: an event up to handed_up_to is handed
    -- out again as deliveries + 1, a newer one as 1 (so deliveries > 1 means "maybe seen").
    handed_up_to  bigint NOT NULL DEFAULT 0,
    deliveries    integer NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, consumer)
);
CREATE INDEX event_cursors_pending_idx ON billing.event_cursors (consumer, pending_from) WHERE last_event_id > acked_id;
-- The claims in flight (ack_events).
CREATE INDEX event_cursors_claim_idx ON billing.event_cursors (consumer, claim_id) WHERE claim_id IS NOT NULL;
COMMENT ON TABLE billing.event_cursors IS 'Per consumer and user: what is acknowledged, what is pending and the claim in flight. A user''s events are in at most one claim of a consumer at a time, so each consumer sees each user''s events in order.';

-- Balance rules: a user's rule overrides the rule of the user's effective plan.
CREATE TABLE billing.user_balance_alerts (
    user_id    uuid PRIMARY KEY,
    threshold  bigint NOT NULL,
    hysteresis numeric NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT pg_catalog.now()
);
CREATE TABLE billing.plan_balance_alerts (
    plan_id    text PRIMARY KEY,
    threshold  bigint NOT NULL,
    hysteresis numeric NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT pg_catalog.now()
);
COMMENT ON TABLE billing.user_balance_alerts IS 'Balance alert rules for one user (billing.set_balance_alert with p_user_id); they override the plan''s.';
COMMENT ON TABLE billing.plan_balance_alerts IS 'Balance alert rules for the users of a plan (billing.set_balance_alert with p_plan_id).';

-- Limit rules and what each fired for each user.
CREATE TABLE billing.limit_alerts (
    metric     text NOT NULL,
    percent    integer NOT NULL,
    -- '' : every plan.
    plan_id    text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (metric, plan_id, percent)
);
COMMENT ON TABLE billing.limit_alerts IS 'Limit alert rules (billing.set_limit_alert): limit.reached when the metric (a monthly usage metric or a registered resource type) reaches percent of the plan''s limit; plan_id '''' = every plan.';

CREATE TABLE billing.limit_alert_state (
    user_id      uuid NOT NULL,
    metric       text NOT NULL,
    percent      integer NOT NULL,
    -- The usage period it fired in (monthly metrics; -infinity for resource counts).
    period_start timestamptz NOT NULL,
    reached_at   timestamptz,
    cleared_at   timestamptz,
    PRIMARY KEY (user_id, metric, percent)
);
COMMENT ON TABLE billing.limit_alert_state IS 'Per user and rule: the period a limit.reached fired in, and when it was cleared (limit.cleared).';

SELECT pg_catalog.pg_extension_config_dump('billing.events', '');
SELECT pg_catalog.pg_extension_config_dump('billing.events_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('billing.event_consumers', '');
SELECT pg_catalog.pg_extension_config_dump('billing.event_cursors', '');
SELECT pg_catalog.pg_extension_config_dump('billing.user_balance_alerts', '');
SELECT pg_catalog.pg_extension_config_dump('billing.plan_balance_alerts', '');
SELECT pg_catalog.pg_extension_config_dump('billing.limit_alerts', '');
SELECT pg_catalog.pg_extension_config_dump('billing.limit_alert_state', '');

ALTER TABLE billing.events ENABLE ROW LEVEL SECURITY;
ALTER TABLE billing.event_consumers ENABLE ROW LEVEL SECURITY;
ALTER TABLE billing.event_cursors ENABLE ROW LEVEL SECURITY;
ALTER TABLE billing.user_balance_alerts ENABLE ROW LEVEL SECURITY;
ALTER TABLE billing.plan_balance_alerts ENABLE ROW LEVEL SECURITY;
ALTER TABLE billing.limit_alerts ENABLE ROW LEVEL SECURITY;
ALTER TABLE billing.limit_alert_state ENABLE ROW LEVEL SECURITY;
-- End users read their own events (so Supabase Realtime postgres_changes delivers only theirs);
-- the other tables are the service's. anon has no account: a request as anon (its role, or its
-- JWT's role claim) reads no event whatever sub it claims.
CREATE POLICY events_read_own ON billing.events FOR SELECT
    USING (user_id = (SELECT billing.current_user_id())
           AND (SELECT CURRENT_USER::text <> 'anon'
                       AND COALESCE(NULLIF(pg_catalog.current_setting('request.jwt.claims', true), '')::jsonb ->> 'role', '') <> 'anon'));

INSERT INTO billing.api_functions (function_name, access) VALUES
    ('set_balance_alert', 'service'),
    ('set_limit_alert', 'service'),
    ('claim_events', 'service'),
    ('ack_events', 'service'),
    ('cleanup_events', 'service');

-- Write one event (internal). The caller holds the user's account lock (see billing.events).
CREATE FUNCTION billing._emit_event(p_user_id uuid, p_type text, p_payload jsonb) RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_id bigint;
BEGIN
    IF p_user_id IS NULL OR p_type IS NULL OR p_payload IS NULL THEN
        RAISE EXCEPTION 'an event needs a user, a type and a payload' USING ERRCODE = '22023';
    END IF;
    INSERT INTO billing.events (user_id, type, payload)
    VALUES (p_user_id, p_type, pg_catalog.jsonb_build_object('user_id', p_user_id) || p_payload)
    RETURNING id INTO v_id;
    IF COALESCE(NULLIF(pg_catalog.current_setting('pg_billing.notify_events', true), '')::boolean, false) THEN
        PERFORM pg_catalog.pg_notify('pg_billing_events', v_id::text);
    END IF;
    RETURN v_id;
END
$$;
COMMENT ON FUNCTION billing._emit_event(uuid, text, jsonb) IS 'Internal: writes one event (and, with pg_billing.notify_events on, NOTIFY pg_billing_events with its id). The caller holds the user''s account lock.';

-- The effective balance rule of one user (p_user_id) or of every account (NULL): the user's
-- rule, else the rule of the user's effective plan. Where it changes, the state is set from the
-- balance as it is, without an event: a rule set while the balance is below its threshold counts
-- as fired already, and fires again after a recovery to its re-arm level. A new account
-- (alert_state -1: no rule looked up yet) takes its rule armed, so its first write below the
-- threshold fires balance.low (src/api/events.rs runs this at an account's first write; SPEC 12
-- allows no triggers on billing tables).
CREATE FUNCTION billing._sync_balance_alerts(p_user_id uuid) RETURNS integer
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
COMMENT ON FUNCTION billing._sync_balance_alerts(uuid) IS 'Internal: recomputes the effective balance alert rule of one account (or, NULL, of every account) and sets its state from the balance, without an event; returns the accounts whose rule changed.';

CREATE FUNCTION billing.set_balance_alert(p_threshold bigint, p_user_id uuid DEFAULT NULL, p_plan_id text DEFAULT NULL,
                                          p_hysteresis numeric DEFAULT 0.1)
RETURNS jsonb LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pgb_set_balance_alert';
COMMENT ON FUNCTION billing.set_balance_alert(bigint, uuid, text, numeric) IS
'Service-only. A balance alert rule for one user (p_user_id) or for the users of a plan (p_plan_id): exactly one of the two (22023 otherwise); a user''s rule overrides the plan''s. p_threshold >= 1, NULL removes the rule; p_hysteresis 0 to 10 (default 0.1). After each credit write, with available = subscription + purchased - held - debt (stored): balance.low when it falls below the threshold, balance.depleted when it reaches 0 (each once per downward crossing), balance.recovered when it is back at ceil(threshold * (1 + hysteresis)), which re-arms the rule. Setting a rule fires nothing (below the threshold it counts as fired). Unknown plan: P0002. Returns {user_id or plan_id, threshold, hysteresis, rearm_at, accounts (whose effective rule changed)}.';

CREATE FUNCTION billing.set_limit_alert(p_metric text, p_percent integer, p_plan_id text DEFAULT NULL, p_enabled boolean DEFAULT true)
RETURNS jsonb LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pgb_set_limit_alert';
COMMENT ON FUNCTION billing.set_limit_alert(text, integer, text, boolean) IS
'Service-only. A limit alert rule: limit.reached when p_metric (messages, conversations, tokens_input, tokens_output, documents, generations: this period''s usage, checked by the record_*_usage functions; or a resource type registered with register_resource: its count, checked by check_resource_limit) reaches p_percent (1 to 1000) of the plan''s limit, once per user, rule and period; limit.cleared once when it is back below. p_plan_id NULL: every plan; unknown plan: P0002. p_enabled false removes the rule. Returns {metric, percent, plan_id, enabled}.';

CREATE FUNCTION billing._claim_events(p_consumer text, p_limit integer, p_visibility_timeout interval) RETURNS jsonb
LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pgb_claim_events';
COMMENT ON FUNCTION billing._claim_events(text, integer, interval) IS 'Internal: claim_events as a jsonb array.';

CREATE FUNCTION billing.claim_events(p_consumer text, p_limit integer DEFAULT 100, p_visibility_timeout interval DEFAULT '30 seconds')
RETURNS TABLE (claim_id uuid, id bigint, user_id uuid, type text, payload jsonb, created_at timestamptz, deliveries integer)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN QUERY
    SELECT (e ->> 'claim_id')::uuid, (e ->> 'id')::bigint, (e ->> 'user_id')::uuid, e ->> 'type', e -> 'payload',
           (e ->> 'created_at')::timestamptz, (e ->> 'deliveries')::integer
      FROM pg_catalog.jsonb_array_elements(billing._claim_events(p_consumer, p_limit, p_visibility_timeout)) AS e;
END
$$;
COMMENT ON FUNCTION billing.claim_events(text, integer, interval) IS
'Service-only. Up to p_limit (1 to 10000) events for consumer p_consumer (1 to 100 characters of A-Z a-z 0-9 _ . : -; made at its first claim, starting with every retained event), in id order, not acknowledged by it and not in another of its claims. Each user''s events come in order and are in at most one claim of the consumer at a time (its cursor row is taken FOR UPDATE SKIP LOCKED): several workers never get the same event while it is claimed. A claim lasts p_visibility_timeout (1 second to 1 day; default 30 s): what is not acknowledged by then is handed out again (deliveries: 1 the first time an event is handed out, more when it may have been seen before). At least once: acknowledge with ack_events after handling. An event is handed out once no transaction that began before it can still commit (a long writing transaction delays delivery, never loses an event); on a Citus cluster (billing.distribute()) once it is visible, after its user''s earlier events (README: Events on the cluster).';

CREATE FUNCTION billing.ack_events(p_consumer text, p_up_to_id bigint, p_claim_id uuid DEFAULT NULL)
RETURNS integer LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pgb_ack_events';
COMMENT ON FUNCTION billing.ack_events(text, bigint, uuid) IS
'Service-only. Acknowledge consumer p_consumer''s claimed events with id <= p_up_to_id (with p_claim_id: only those of that claim, so one worker never acknowledges another''s); they are never handed out to it again. Returns how many events it acknowledged (0 for a claim that timed out and was handed out again). Unknown consumer: P0002.';

CREATE FUNCTION billing.cleanup_events(p_older_than interval DEFAULT '7 days') RETURNS integer
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
COMMENT ON FUNCTION billing.cleanup_events(interval) IS
'Service-only maintenance: deletes events older than p_older_than (default 7 days, at least 1 hour) that every consumer has acknowledged (with no consumer: every such event). Returns events deleted.';
