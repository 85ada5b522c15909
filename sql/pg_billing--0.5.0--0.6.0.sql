-- pg_billing 0.5.0 -> 0.6.0: events out (issue 15).
--
-- Idempotent (SPEC 12: Citus may run an upgrade script on every node): every statement may run
-- again on a database that has it already. tests/stress/upgrade.py runs this file a second time
-- after ALTER EXTENSION ... UPDATE and checks nothing changed, and compares the upgraded catalog
-- with a fresh 0.6.0 install.
\echo Use "ALTER EXTENSION pg_billing UPDATE TO '0.6.0'" to load this file. \quit

-- ===== Events out (issue 15) =====

-- New columns are added without a default and filled, so the table matches a fresh install (a
-- column added with a default keeps a "missing value" that a fresh table does not have).
ALTER TABLE billing.accounts ADD COLUMN IF NOT EXISTS alert_threshold bigint;
ALTER TABLE billing.accounts ADD COLUMN IF NOT EXISTS alert_rearm bigint;
ALTER TABLE billing.accounts ADD COLUMN IF NOT EXISTS alert_state smallint;
-- (Accounts of older releases have no rule: armed; a new account starts at -1, not looked up.)
UPDATE billing.accounts SET alert_state = 0 WHERE alert_state IS NULL;
ALTER TABLE billing.accounts ALTER COLUMN alert_state SET DEFAULT -1;
ALTER TABLE billing.accounts ALTER COLUMN alert_state SET NOT NULL;

-- rate_limit.exceeded is written once per bucket.
ALTER TABLE billing.api_usage ADD COLUMN IF NOT EXISTS exceeded_at timestamptz;

-- The idempotency keys of record_usage_batch events (issue 16), and their retention.
CREATE TABLE IF NOT EXISTS billing.usage_event_keys (
    user_id         uuid NOT NULL,
    idempotency_key text NOT NULL,
    period_start    timestamptz NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (user_id, idempotency_key)
);
CREATE INDEX IF NOT EXISTS usage_event_keys_created_at_idx ON billing.usage_event_keys USING brin (created_at);
COMMENT ON TABLE billing.usage_event_keys IS 'idempotency_key of record_usage_batch events, per user, with the period each event counted in (a repeat returns it). cleanup_idempotency_keys deletes old keys.';
ALTER TABLE billing.usage_event_keys ENABLE ROW LEVEL SECURITY;
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_extension AS e
                    WHERE e.extname = 'pg_billing' AND 'billing.usage_event_keys'::pg_catalog.regclass = ANY (e.extconfig)) THEN
        PERFORM pg_catalog.pg_extension_config_dump('billing.usage_event_keys', '');
    END IF;
END
$$;
CREATE OR REPLACE FUNCTION billing.cleanup_idempotency_keys(p_older_than interval DEFAULT '30 days') RETURNS integer
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

-- The outbox. Every event of a user is written while that user's billing.accounts row is
-- locked, and its id is taken after the lock, so one user's events commit in id order; tx is
-- the writing transaction, so a consumer discovers an event only once no transaction that
-- began before it can still commit (billing.claim_events).
CREATE SEQUENCE IF NOT EXISTS billing.events_id_seq;
CREATE TABLE IF NOT EXISTS billing.events (
    user_id    uuid NOT NULL,
    id         bigint NOT NULL DEFAULT pg_catalog.nextval('billing.events_id_seq'),
    type       text NOT NULL,
    payload    jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    tx         pg_catalog.xid8 NOT NULL DEFAULT pg_catalog.pg_current_xact_id(),
    PRIMARY KEY (user_id, id)
);
ALTER SEQUENCE billing.events_id_seq OWNED BY billing.events.id;
CREATE INDEX IF NOT EXISTS events_id_idx ON billing.events (id);
CREATE INDEX IF NOT EXISTS events_tx_idx ON billing.events (tx);
COMMENT ON TABLE billing.events IS 'Billing events (balance.low, balance.depleted, balance.recovered, limit.reached, limit.cleared, grant.expired, grant.voided, hold.expired, overdraft.entered, subscription.changed, rate_limit.exceeded), written in the transaction of the change that caused them: none is lost, none exists for a rolled-back change. Consumers read them with billing.claim_events / billing.ack_events; end users SELECT their own rows (Supabase Realtime: add the table to the supabase_realtime publication). billing.cleanup_events deletes acknowledged ones.';

-- Consumers and their per-user cursors. horizon: every transaction older than it has finished
-- and its events have been discovered (a cursor row made or moved for its user).
CREATE TABLE IF NOT EXISTS billing.event_consumers (
    consumer   text PRIMARY KEY,
    horizon    pg_catalog.xid8 NOT NULL DEFAULT '0',
    created_at timestamptz NOT NULL DEFAULT pg_catalog.now()
);
COMMENT ON TABLE billing.event_consumers IS 'Event consumers (billing.claim_events makes one at its first claim): horizon is the transaction id below which every event has been discovered.';

CREATE TABLE IF NOT EXISTS billing.event_cursors (
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
CREATE INDEX IF NOT EXISTS event_cursors_pending_idx ON billing.event_cursors (consumer, pending_from) WHERE last_event_id > acked_id;
-- The claims in flight (ack_events).
CREATE INDEX IF NOT EXISTS event_cursors_claim_idx ON billing.event_cursors (consumer, claim_id) WHERE claim_id IS NOT NULL;
COMMENT ON TABLE billing.event_cursors IS 'Per consumer and user: what is acknowledged, what is pending and the claim in flight. A user''s events are in at most one claim of a consumer at a time, so each consumer sees each user''s events in order.';

-- Balance rules: a user's rule overrides the rule of the user's effective plan.
CREATE TABLE IF NOT EXISTS billing.user_balance_alerts (
    user_id    uuid PRIMARY KEY,
    threshold  bigint NOT NULL,
    hysteresis numeric NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT pg_catalog.now()
);
CREATE TABLE IF NOT EXISTS billing.plan_balance_alerts (
    plan_id    text PRIMARY KEY,
    threshold  bigint NOT NULL,
    hysteresis numeric NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT pg_catalog.now()
);
COMMENT ON TABLE billing.user_balance_alerts IS 'Balance alert rules for one user (billing.set_balance_alert with p_user_id); they override the plan''s.';
COMMENT ON TABLE billing.plan_balance_alerts IS 'Balance alert rules for the users of a plan (billing.set_balance_alert with p_plan_id).';

-- Limit rules and what each fired for each user.
CREATE TABLE IF NOT EXISTS billing.limit_alerts (
    metric     text NOT NULL,
    percent    integer NOT NULL,
    -- '' : every plan.
    plan_id    text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (metric, plan_id, percent)
);
COMMENT ON TABLE billing.limit_alerts IS 'Limit alert rules (billing.set_limit_alert): limit.reached when the metric (a monthly usage metric or a registered resource type) reaches percent of the plan''s limit; plan_id '''' = every plan.';

CREATE TABLE IF NOT EXISTS billing.limit_alert_state (
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

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_extension AS e
                    WHERE e.extname = 'pg_billing' AND 'billing.events'::pg_catalog.regclass = ANY (e.extconfig)) THEN
        PERFORM pg_catalog.pg_extension_config_dump('billing.events', '');
    END IF;
END
$$;
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_extension AS e
                    WHERE e.extname = 'pg_billing' AND 'billing.events_id_seq'::pg_catalog.regclass = ANY (e.extconfig)) THEN
        PERFORM pg_catalog.pg_extension_config_dump('billing.events_id_seq', '');
    END IF;
END
$$;
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_extension AS e
                    WHERE e.extname = 'pg_billing' AND 'billing.event_consumers'::pg_catalog.regclass = ANY (e.extconfig)) THEN
        PERFORM pg_catalog.pg_extension_config_dump('billing.event_consumers', '');
    END IF;
END
$$;
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_extension AS e
                    WHERE e.extname = 'pg_billing' AND 'billing.event_cursors'::pg_catalog.regclass = ANY (e.extconfig)) THEN
        PERFORM pg_catalog.pg_extension_config_dump('billing.event_cursors', '');
    END IF;
END
$$;
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_extension AS e
                    WHERE e.extname = 'pg_billing' AND 'billing.user_balance_alerts'::pg_catalog.regclass = ANY (e.extconfig)) THEN
        PERFORM pg_catalog.pg_extension_config_dump('billing.user_balance_alerts', '');
    END IF;
END
$$;
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_extension AS e
                    WHERE e.extname = 'pg_billing' AND 'billing.plan_balance_alerts'::pg_catalog.regclass = ANY (e.extconfig)) THEN
        PERFORM pg_catalog.pg_extension_config_dump('billing.plan_balance_alerts', '');
    END IF;
END
$$;
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_extension AS e
                    WHERE e.extname = 'pg_billing' AND 'billing.limit_alerts'::pg_catalog.regclass = ANY (e.extconfig)) THEN
        PERFORM pg_catalog.pg_extension_config_dump('billing.limit_alerts', '');
    END IF;
END
$$;
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_extension AS e
                    WHERE e.extname = 'pg_billing' AND 'billing.limit_alert_state'::pg_catalog.regclass = ANY (e.extconfig)) THEN
        PERFORM pg_catalog.pg_extension_config_dump('billing.limit_alert_state', '');
    END IF;
END
$$;

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
DROP POLICY IF EXISTS events_read_own ON billing.events;
CREATE POLICY events_read_own ON billing.events FOR SELECT
    USING (user_id = (SELECT billing.current_user_id())
           AND (SELECT CURRENT_USER::text <> 'anon'
                       AND COALESCE(NULLIF(pg_catalog.current_setting('request.jwt.claims', true), '')::jsonb ->> 'role', '') <> 'anon'));

INSERT INTO billing.api_functions (function_name, access) VALUES
    ('set_balance_alert', 'service'),
    ('set_limit_alert', 'service'),
    ('claim_events', 'service'),
    ('ack_events', 'service'),
    ('cleanup_events', 'service')
ON CONFLICT (function_name) DO NOTHING;

-- Write one event (internal). The caller holds the user's account lock (see billing.events).
CREATE OR REPLACE FUNCTION billing._emit_event(p_user_id uuid, p_type text, p_payload jsonb) RETURNS bigint
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
CREATE OR REPLACE FUNCTION billing._sync_balance_alerts(p_user_id uuid) RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_plan text;
    n bigint;
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
        -- Every account (a plan's rule changed).
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
                  LEFT JOIN billing.plan_balance_alerts AS p ON p.plan_id = billing.user_effective_plan(a.user_id)) AS r
         WHERE a.user_id = r.user_id
           AND (a.alert_threshold IS DISTINCT FROM r.threshold OR a.alert_rearm IS DISTINCT FROM r.rearm OR a.alert_state < 0);
    END IF;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n::integer;
END
$$;
COMMENT ON FUNCTION billing._sync_balance_alerts(uuid) IS 'Internal: recomputes the effective balance alert rule of one account (or, NULL, of every account) and sets its state from the balance, without an event; returns the accounts whose rule changed.';

CREATE OR REPLACE FUNCTION billing.set_balance_alert(p_threshold bigint, p_user_id uuid DEFAULT NULL, p_plan_id text DEFAULT NULL,
                                          p_hysteresis numeric DEFAULT 0.1)
RETURNS jsonb LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pgb_set_balance_alert';
COMMENT ON FUNCTION billing.set_balance_alert(bigint, uuid, text, numeric) IS
'Service-only. A balance alert rule for one user (p_user_id) or for the users of a plan (p_plan_id): exactly one of the two (22023 otherwise); a user''s rule overrides the plan''s. p_threshold >= 1, NULL removes the rule; p_hysteresis 0 to 10 (default 0.1). After each credit write, with available = subscription + purchased - held - debt (stored): balance.low when it falls below the threshold, balance.depleted when it reaches 0 (each once per downward crossing), balance.recovered when it is back at ceil(threshold * (1 + hysteresis)), which re-arms the rule. Setting a rule fires nothing (below the threshold it counts as fired). Unknown plan: P0002. Returns {user_id or plan_id, threshold, hysteresis, rearm_at, accounts (whose effective rule changed)}.';

CREATE OR REPLACE FUNCTION billing.set_limit_alert(p_metric text, p_percent integer, p_plan_id text DEFAULT NULL, p_enabled boolean DEFAULT true)
RETURNS jsonb LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pgb_set_limit_alert';
COMMENT ON FUNCTION billing.set_limit_alert(text, integer, text, boolean) IS
'Service-only. A limit alert rule: limit.reached when p_metric (messages, conversations, tokens_input, tokens_output, documents, generations: this period''s usage, checked by the record_*_usage functions; or a resource type registered with register_resource: its count, checked by check_resource_limit) reaches p_percent (1 to 1000) of the plan''s limit, once per user, rule and period; limit.cleared once when it is back below. p_plan_id NULL: every plan; unknown plan: P0002. p_enabled false removes the rule. Returns {metric, percent, plan_id, enabled}.';

CREATE OR REPLACE FUNCTION billing._claim_events(p_consumer text, p_limit integer, p_visibility_timeout interval) RETURNS jsonb
LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pgb_claim_events';
COMMENT ON FUNCTION billing._claim_events(text, integer, interval) IS 'Internal: claim_events as a jsonb array.';

CREATE OR REPLACE FUNCTION billing.claim_events(p_consumer text, p_limit integer DEFAULT 100, p_visibility_timeout interval DEFAULT '30 seconds')
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
'Service-only. Up to p_limit (1 to 10000) events for consumer p_consumer (1 to 100 characters of A-Z a-z 0-9 _ . : -; made at its first claim, starting with every retained event), in id order, not acknowledged by it and not in another of its claims. Each user''s events come in order and are in at most one claim of the consumer at a time (its cursor row is taken FOR UPDATE SKIP LOCKED): several workers never get the same event while it is claimed. A claim lasts p_visibility_timeout (1 second to 1 day; default 30 s): what is not acknowledged by then is handed out again (deliveries: 1 the first time an event is handed out, more when it may have been seen before). At least once: acknowledge with ack_events after handling. An event is handed out once no transaction that began before it can still commit (a long writing transaction delays delivery, never loses an event).';

CREATE OR REPLACE FUNCTION billing.ack_events(p_consumer text, p_up_to_id bigint, p_claim_id uuid DEFAULT NULL)
RETURNS integer LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pgb_ack_events';
COMMENT ON FUNCTION billing.ack_events(text, bigint, uuid) IS
'Service-only. Acknowledge consumer p_consumer''s claimed events with id <= p_up_to_id (with p_claim_id: only those of that claim, so one worker never acknowledges another''s); they are never handed out to it again. Returns how many events it acknowledged (0 for a claim that timed out and was handed out again). Unknown consumer: P0002.';

CREATE OR REPLACE FUNCTION billing.cleanup_events(p_older_than interval DEFAULT '7 days') RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_cutoff timestamptz;
    v_consumers text[];
    v_horizon pg_catalog.xid8;
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
    DELETE FROM billing.events AS e
     WHERE e.created_at < v_cutoff
       AND (v_consumers IS NULL
            OR (e.tx < v_horizon
                AND (SELECT pg_catalog.count(*) FROM billing.event_cursors AS c
                      WHERE c.user_id = e.user_id AND c.consumer = ANY (v_consumers) AND c.acked_id >= e.id)
                    = pg_catalog.cardinality(v_consumers)));
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n::integer;
END
$$;
COMMENT ON FUNCTION billing.cleanup_events(interval) IS
'Service-only maintenance: deletes events older than p_older_than (default 7 days, at least 1 hour) that every consumer has acknowledged (with no consumer: every such event). Returns events deleted.';

-- Batches (0.6.0; issue 16): record_usage_batch and consume_credits_batch (src/api/batch.rs).

INSERT INTO billing.api_functions (function_name, access) VALUES
    ('record_usage_batch', 'service'),
    ('consume_credits_batch', 'service')
ON CONFLICT (function_name) DO NOTHING;

CREATE OR REPLACE FUNCTION billing.record_usage_batch(p_events jsonb, p_atomic boolean DEFAULT false)
RETURNS jsonb LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pgb_record_usage_batch';
COMMENT ON FUNCTION billing.record_usage_batch(jsonb, boolean) IS
'Service-only. Record up to 10000 usage events [{user_id, metric, value (default 1), idempotency_key, occurred_at}] in one call: metric is messages, conversations, tokens_input, tokens_output, documents, chunks, generations or api_calls; occurred_at (RFC 3339, default now) from 35 days ago to 5 minutes ahead counts in the period it falls in (the subscription''s period, else the period of the user''s usage row that holds it, else its UTC calendar month). Each idempotency_key counts once per user: a repeat (in this batch or an earlier one) is a success with status duplicate and the first result. Returns one result per event, in order: {index, status: applied | duplicate | error, period_start | first | sqlstate and message}. A bad event is its own error result and the others are recorded, unless p_atomic (then 22023 and nothing is recorded).';

CREATE OR REPLACE FUNCTION billing.consume_credits_batch(p_items jsonb, p_atomic boolean DEFAULT false)
RETURNS jsonb LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pgb_consume_credits_batch';
COMMENT ON FUNCTION billing.consume_credits_batch(jsonb, boolean) IS
'Service-only. Up to 10000 debits [{user_id, amount, description, reference_id, idempotency_key}], each as consume_credits_v2 (FIFO across the pools; keys in the service''s namespace, so a repeat replays). Returns one result per item, in order: {index, status: applied | duplicate | error, result | sqlstate and message}. An item that fails (PT402, P0002, PT409, a bad item: 22023) is its own error result and changes nothing; the others are applied, unless p_atomic (then the whole call fails with 22023 naming the item, and nothing is applied). Items are applied user by user (each user''s items in their order).';

-- check_resource_limit writes limit.reached / limit.cleared now: VOLATILE.
CREATE OR REPLACE FUNCTION billing._check_resource_limit(p_user_id uuid, p_resource_type text) RETURNS jsonb
LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS 'MODULE_PATHNAME', 'pgb_check_resource_limit';
COMMENT ON FUNCTION billing._check_resource_limit(uuid, text) IS 'Internal: check_resource_limit as jsonb.';

CREATE OR REPLACE FUNCTION billing.check_resource_limit(p_user_id uuid, p_resource_type text)
RETURNS TABLE (allowed boolean, current_count integer, max_allowed integer, resource_type text)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN QUERY
    SELECT (r ->> 'allowed')::boolean, (r ->> 'current_count')::integer,
           LEAST((r ->> 'max_allowed')::bigint, 2147483647)::integer, r ->> 'resource_type'
      FROM billing._check_resource_limit(p_user_id, p_resource_type) AS r;
END
$$;
COMMENT ON FUNCTION billing.check_resource_limit(uuid, text) IS 'Counts the user''s rows in the table registered for p_resource_type (billing.register_resource) against the effective plan''s limit: allowed = unlimited (-1) or count < max. The count runs as the table''s owner on exactly the registered table (P0002 when it was dropped or replaced since). Unknown type: 22023 listing the known ones. End users: own only.';


-- Internal functions are nobody's but the owner's (a fresh install revokes every function from
-- PUBLIC; apply_grants() below grants the API).
REVOKE ALL ON FUNCTION billing._emit_event(uuid, text, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION billing._sync_balance_alerts(uuid) FROM PUBLIC;
REVOKE ALL ON FUNCTION billing._claim_events(text, integer, interval) FROM PUBLIC;
-- ===== end of events out =====

-- ===== Scale-out on Citus (issue 17): billing.distribute(), from sql/citus.sql =====
-- Scale-out on Citus (0.6.0, issue 17): billing.distribute() turns an installed pg_billing on a
-- Citus coordinator into a distributed one. On a single node nothing here runs.
--
-- Every billing table is one of:
--   * a reference table (a copy on every node): the catalogs, small and read by every call;
--   * distributed by user_id, colocated with billing.accounts: every per-user table, so all of a
--     user's rows live in one shard group and every per-user statement is routed to one node;
--   * distributed by e-mail (member_emails, pending_profiles: keyed by the e-mail before a user
--     exists), or by event id (webhook_events).
-- A table the lists below do not name is an error, so a table added later cannot be forgotten.

CREATE OR REPLACE FUNCTION billing.distribute(p_shard_count integer DEFAULT NULL) RETURNS jsonb
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    reference text[] := ARRAY['plans', 'plan_balance_alerts', 'limit_alerts', 'event_consumers', 'api_functions',
                              'resource_types', 'widget_tables'];
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
       AND c.relname <> ALL (reference || by_user || ARRAY[other[1], other[4], other[7]]);
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
        'shard_count', shards);
END
$$;
COMMENT ON FUNCTION billing.distribute(integer) IS
'DBA only (no role is granted EXECUTE). On a Citus coordinator: makes the billing catalogs reference tables, distributes every per-user table by user_id colocated with billing.accounts (p_shard_count shards, default citus.shard_count), member_emails and pending_profiles by email and webhook_events by event_id, and rewrites the end-user row policies into a form Citus accepts. Idempotent: a second call changes nothing. Fails with 0A000 when Citus is absent or this is not the coordinator.';

-- Whether billing.<t> is already a Citus table (reference or distributed).
CREATE OR REPLACE FUNCTION billing._citus_placed(p_table text) RETURNS boolean
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    placed boolean;
BEGIN
    EXECUTE 'SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition WHERE logicalrelid = $1)'
        INTO placed USING ('billing.' || pg_catalog.quote_ident(p_table))::pg_catalog.regclass;
    RETURN placed;
END
$$;
COMMENT ON FUNCTION billing._citus_placed(text) IS 'Internal (billing.distribute): whether billing.<p_table> is already a Citus table.';

-- Nobody's but the owner's (a fresh install revokes every function from PUBLIC; neither is in
-- billing.api_functions, so apply_grants() grants neither).
REVOKE ALL ON FUNCTION billing.distribute(integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION billing._citus_placed(text) FROM PUBLIC;
-- ===== end of scale-out on Citus =====

-- ===== Citus-routable SQL functions (issue 17): from sql/*.sql =====
-- On Citus a LANGUAGE sql function cannot pass its parameters to a statement on a distributed
-- table (Citus plans such statements only with their parameters bound, as PL/pgSQL does), a
-- DELETE on one may not compute now() in its WHERE, and a function that reads a billing table may
-- not run inside a statement on a shard. These functions are PL/pgSQL now: same parameters,
-- results, errors, volatility, comments and grants.
CREATE OR REPLACE FUNCTION billing.cleanup_webhook_events(p_older_than interval DEFAULT '90 days') RETURNS integer
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
CREATE OR REPLACE FUNCTION billing.get_user_credits(p_user_id uuid)
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
CREATE OR REPLACE FUNCTION billing.get_credit_history(p_user_id uuid, p_limit integer DEFAULT 50, p_before timestamptz DEFAULT NULL)
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
        OR COALESCE(acct.user_id, ledger.user_id) IN (SELECT b.user_id FROM bad_grants AS b);
END
$$;
CREATE OR REPLACE FUNCTION billing.get_credit_grants(p_user_id uuid, p_include_spent boolean DEFAULT false)
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
CREATE OR REPLACE FUNCTION billing.balance_at(p_user_id uuid, p_at timestamptz)
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
CREATE OR REPLACE FUNCTION billing.get_active_holds(p_user_id uuid)
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
CREATE OR REPLACE FUNCTION billing.cleanup_holds(p_older_than interval DEFAULT '30 days') RETURNS integer
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
CREATE OR REPLACE FUNCTION billing.effective_plan_id(p_plan_id text, p_status text, p_current_period_end timestamptz,
                                          p_trial_ends_at timestamptz, p_expires_at timestamptz)
RETURNS text LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN CASE
        WHEN p_plan_id IS NULL THEN 'free'
        WHEN p_expires_at IS NOT NULL AND p_expires_at <= pg_catalog.now() THEN 'free'
        WHEN p_status IN ('expired', 'paused', 'pending') THEN 'free'
        WHEN p_status IN ('canceled', 'past_due')
             AND (p_current_period_end IS NULL
                  OR pg_catalog.now() > ((p_current_period_end AT TIME ZONE 'UTC') + billing.grace_period()) AT TIME ZONE 'UTC') THEN 'free'
        WHEN p_status = 'trialing' AND p_trial_ends_at IS NOT NULL
             AND pg_catalog.now() > ((p_trial_ends_at AT TIME ZONE 'UTC') + billing.grace_period()) AT TIME ZONE 'UTC' THEN 'free'
        WHEN NOT EXISTS (SELECT 1 FROM billing.plans AS p WHERE p.plan_id = p_plan_id) THEN 'free'
        ELSE p_plan_id
    END;
END
$$;
CREATE OR REPLACE FUNCTION billing.get_effective_plan(p_user_id uuid) RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM billing.authorize_user(p_user_id);
    RETURN billing.user_effective_plan(p_user_id);
END
$$;
CREATE OR REPLACE FUNCTION billing.get_user_limits(p_user_id uuid) RETURNS jsonb
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_plan text;
    v_limits jsonb;
BEGIN
    -- (checks the caller)
    v_plan := billing.get_effective_plan(p_user_id);
    SELECT p.limits INTO v_limits FROM billing.plans AS p WHERE p.plan_id = v_plan;
    RETURN v_limits;
END
$$;
CREATE OR REPLACE FUNCTION billing.get_user_subscription(p_user_id uuid)
RETURNS TABLE (id uuid, user_id uuid, plan_name text, plan_display_name text, status text, limits jsonb,
               current_period_start timestamptz, current_period_end timestamptz, trial_ends_at timestamptz,
               cancel_at_period_end boolean)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_sub billing.subscriptions;
    v_plan text;
BEGIN
    PERFORM billing.authorize_user(p_user_id);
    -- The subscription first, then its effective plan: effective_plan_id reads billing.plans, so
    -- it is evaluated here, never inside the statement on billing.subscriptions (on Citus that
    -- statement runs on a shard, where no other distributed statement may run).
    SELECT s.* INTO v_sub FROM billing.subscriptions AS s WHERE s.user_id = p_user_id;
    v_plan := billing.effective_plan_id(v_sub.plan_id, v_sub.status, v_sub.current_period_end, v_sub.trial_ends_at, v_sub.expires_at);
    RETURN QUERY
    SELECT v_sub.id, p_user_id, p.plan_id, p.display_name, COALESCE(v_sub.status, 'free'), p.limits,
           v_sub.current_period_start, v_sub.current_period_end, v_sub.trial_ends_at, COALESCE(v_sub.cancel_at_period_end, false)
      FROM billing.plans AS p
     WHERE p.plan_id = v_plan;
END
$$;
CREATE OR REPLACE FUNCTION billing.user_effective_plan(p_user_id uuid) RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_sub billing.subscriptions;
BEGIN
    -- effective_plan_id reads billing.plans: evaluated here, not inside the statement on
    -- billing.subscriptions (see get_user_subscription). No subscription: all NULL, free.
    SELECT s.* INTO v_sub FROM billing.subscriptions AS s WHERE s.user_id = p_user_id;
    RETURN billing.effective_plan_id(v_sub.plan_id, v_sub.status, v_sub.current_period_end, v_sub.trial_ends_at, v_sub.expires_at);
END
$$;
CREATE OR REPLACE FUNCTION billing.user_plan_limits(p_user_id uuid) RETURNS jsonb
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_plan text;
    v_limits jsonb;
BEGIN
    v_plan := billing.user_effective_plan(p_user_id);
    SELECT p.limits INTO v_limits FROM billing.plans AS p WHERE p.plan_id = v_plan;
    RETURN COALESCE(v_limits, '{}'::jsonb);
END
$$;
CREATE OR REPLACE FUNCTION billing.current_usage_period(p_user_id uuid, OUT period_start timestamptz, OUT period_end timestamptz)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_start timestamptz;
    v_end timestamptz;
BEGIN
    SELECT s.current_period_start, s.current_period_end INTO v_start, v_end
      FROM billing.subscriptions AS s WHERE s.user_id = p_user_id;
    IF v_start IS NOT NULL AND v_end IS NOT NULL AND pg_catalog.now() >= v_start AND pg_catalog.now() < v_end THEN
        period_start := v_start;
        period_end := v_end;
    ELSE
        period_start := pg_catalog.date_trunc('month', pg_catalog.now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
        period_end := (pg_catalog.date_trunc('month', pg_catalog.now() AT TIME ZONE 'UTC') + interval '1 month') AT TIME ZONE 'UTC';
    END IF;
END
$$;
CREATE OR REPLACE FUNCTION billing.get_user_current_usage(p_user_id uuid)
RETURNS TABLE (period_start timestamptz, period_end timestamptz, messages_count bigint, conversations_count bigint,
               tokens_input_count bigint, tokens_output_count bigint, api_calls_count bigint,
               documents_processed_count bigint, chunks_stored_count bigint, generations_count bigint)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_start timestamptz;
    v_end timestamptz;
BEGIN
    PERFORM billing.authorize_user(p_user_id);
    -- The period first: current_usage_period reads billing.subscriptions, so it is evaluated
    -- here, never inside the statement on billing.usage_metrics (on Citus a shard's).
    SELECT p.period_start, p.period_end INTO v_start, v_end FROM billing.current_usage_period(p_user_id) AS p;
    RETURN QUERY
    SELECT v_start, v_end,
           COALESCE(u.messages_count, 0), COALESCE(u.conversations_count, 0),
           COALESCE(u.tokens_input_count, 0), COALESCE(u.tokens_output_count, 0), COALESCE(u.api_calls_count, 0),
           COALESCE(u.documents_processed_count, 0), COALESCE(u.chunks_stored_count, 0), COALESCE(u.generations_count, 0)
      FROM (SELECT 1) AS one
      LEFT JOIN billing.usage_metrics AS u ON u.user_id = p_user_id AND u.period_start = v_start;
END
$$;
CREATE OR REPLACE FUNCTION billing.check_monthly_limit(p_user_id uuid, p_metric text)
RETURNS TABLE (allowed boolean, current_usage bigint, limit_value bigint, metric text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_limit bigint;
    v_current bigint;
    v_start timestamptz;
BEGIN
    PERFORM billing.authorize_user(p_user_id);
    PERFORM billing.check_choice('p_metric', p_metric,
        ARRAY['messages', 'conversations', 'tokens_input', 'tokens_output', 'documents', 'api_calls', 'generations']);
    v_limit := billing.limit_value(billing.user_plan_limits(p_user_id),
                   CASE p_metric WHEN 'messages' THEN 'messages_per_month'
                                 WHEN 'conversations' THEN 'conversations_per_month'
                                 WHEN 'tokens_input' THEN 'tokens_input_per_month'
                                 WHEN 'tokens_output' THEN 'tokens_output_per_month'
                                 WHEN 'documents' THEN 'documents_per_month'
                                 WHEN 'api_calls' THEN 'api_calls_per_day'
                                 WHEN 'generations' THEN 'generations_per_month' END);
    IF p_metric = 'api_calls' THEN
        SELECT COALESCE(pg_catalog.sum(a.request_count), 0)::bigint INTO v_current
          FROM billing.api_usage AS a
         WHERE a.user_id = p_user_id
           AND a.bucket_start >= pg_catalog.date_trunc('day', pg_catalog.now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    ELSE
        -- The period first (current_usage_period reads billing.subscriptions; see get_user_current_usage).
        SELECT p.period_start INTO v_start FROM billing.current_usage_period(p_user_id) AS p;
        SELECT CASE p_metric WHEN 'messages' THEN u.messages_count
                             WHEN 'conversations' THEN u.conversations_count
                             WHEN 'tokens_input' THEN u.tokens_input_count
                             WHEN 'tokens_output' THEN u.tokens_output_count
                             WHEN 'documents' THEN u.documents_processed_count
                             WHEN 'generations' THEN u.generations_count END INTO v_current
          FROM billing.usage_metrics AS u
         WHERE u.user_id = p_user_id AND u.period_start = v_start;
    END IF;
    RETURN QUERY SELECT v_limit < 0 OR COALESCE(v_current, 0) < v_limit, COALESCE(v_current, 0), v_limit, p_metric;
END
$$;
CREATE OR REPLACE FUNCTION billing.check_api_rate_limit(p_user_id uuid, p_endpoint text DEFAULT NULL)
RETURNS TABLE (allowed boolean, limit_value integer, remaining integer, reset_at timestamptz)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN QUERY
    SELECT (r ->> 'allowed')::boolean, (r ->> 'limit_value')::integer, (r ->> 'remaining')::integer, (r ->> 'reset_at')::timestamptz
      FROM billing._check_api_rate_limit(p_user_id, p_endpoint) AS r;
END
$$;
CREATE OR REPLACE FUNCTION billing.cleanup_api_usage(p_older_than interval DEFAULT '7 days') RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_cutoff timestamptz;
    n bigint;
BEGIN
    PERFORM billing.check_retention('cleanup_api_usage', p_older_than, interval '1 day', NULL);
    v_cutoff := pg_catalog.now() - p_older_than;
    DELETE FROM billing.api_usage AS a WHERE a.bucket_start < v_cutoff;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n::integer;
END
$$;
CREATE OR REPLACE FUNCTION billing.reset_monthly_usage() RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_now timestamptz := pg_catalog.now();
    n bigint;
BEGIN
    PERFORM billing.require_service('reset_monthly_usage');
    INSERT INTO billing.usage_metrics (user_id, period_start, period_end)
    SELECT l.user_id, p.period_start, p.period_end
      FROM (SELECT DISTINCT ON (u.user_id) u.user_id, u.period_end
              FROM billing.usage_metrics AS u
             ORDER BY u.user_id, u.period_start DESC) AS l
      CROSS JOIN LATERAL billing.current_usage_period(l.user_id) AS p
     WHERE l.period_end <= v_now
    ON CONFLICT (user_id, period_start) DO NOTHING;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n::integer;
END
$$;
CREATE OR REPLACE FUNCTION billing.get_user_dashboard_stats(p_user_id uuid)
RETURNS TABLE (plan text, plan_display_name text, status text,
               subscription_credits_balance bigint, purchased_credits_balance bigint, total_credits bigint,
               period_start timestamptz, period_end timestamptz,
               messages_count bigint, conversations_count bigint, tokens_input_count bigint, tokens_output_count bigint,
               api_calls_count bigint, documents_processed_count bigint, chunks_stored_count bigint, generations_count bigint,
               resources jsonb, limits jsonb, available bigint)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM billing.authorize_user(p_user_id);
    RETURN QUERY
    SELECT s.plan_name, s.plan_display_name, s.status,
           c.subscription_credits_balance, c.purchased_credits_balance, c.total_balance,
           u.period_start, u.period_end, u.messages_count, u.conversations_count, u.tokens_input_count,
           u.tokens_output_count, u.api_calls_count, u.documents_processed_count, u.chunks_stored_count,
           u.generations_count, billing._resource_usage(p_user_id), s.limits, c.available
      FROM billing.get_user_subscription(p_user_id) AS s,
           billing.get_user_credits(p_user_id) AS c,
           billing.get_user_current_usage(p_user_id) AS u;
END
$$;
CREATE OR REPLACE FUNCTION billing.get_user_widgets_ordered(p_user_id uuid, p_active_only boolean DEFAULT true)
RETURNS TABLE (id uuid, widget_type text, "position" integer, is_active boolean, data jsonb,
               created_at timestamptz, updated_at timestamptz)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN QUERY
    SELECT (w.e ->> 'id')::uuid, w.e ->> 'widget_type', (w.e ->> 'position')::integer, (w.e ->> 'is_active')::boolean,
           w.e -> 'data', (w.e ->> 'created_at')::timestamptz, (w.e ->> 'updated_at')::timestamptz
      FROM pg_catalog.jsonb_array_elements(billing._user_widgets(p_user_id, p_active_only)) WITH ORDINALITY AS w(e, n)
     ORDER BY w.n;
END
$$;
CREATE OR REPLACE FUNCTION billing.migrate_single_pool(p_table regclass, p_user_column name, p_balance_column name,
                                            p_purchases regclass DEFAULT NULL)
RETURNS integer LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN billing._migrate_single_pool(p_table::oid, p_user_column::text, p_balance_column::text, p_purchases::oid);
END
$$;
-- ===== end of Citus-routable SQL functions =====

-- ===== Grants (last: apply_grants() grants every function above; end users may read their own events) =====
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
    readable text[] := ARRAY['accounts', 'api_usage', 'credit_expiration_events', 'credit_grants', 'credit_holds', 'credit_transactions', 'events',
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
