-- Usage metering, resource limits and API rate limits (SPEC 6). Hot paths are Rust
-- (src/api/usage.rs); reads are SQL that checks the caller first.

CREATE TABLE billing.usage_metrics (
    user_id                   uuid NOT NULL,
    period_start              timestamptz NOT NULL,
    period_end                timestamptz NOT NULL,
    messages_count            bigint NOT NULL DEFAULT 0,
    conversations_count       bigint NOT NULL DEFAULT 0,
    tokens_input_count        bigint NOT NULL DEFAULT 0,
    tokens_output_count       bigint NOT NULL DEFAULT 0,
    api_calls_count           bigint NOT NULL DEFAULT 0,
    documents_processed_count bigint NOT NULL DEFAULT 0,
    chunks_stored_count       bigint NOT NULL DEFAULT 0,
    generations_count         bigint NOT NULL DEFAULT 0,
    created_at                timestamptz NOT NULL DEFAULT pg_catalog.now(),
    updated_at                timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (user_id, period_start)
);
COMMENT ON TABLE billing.usage_metrics IS 'Usage counters per user and period (the subscription period when there is one, else the UTC calendar month).';

-- Hourly API request buckets (UTC) for check_api_rate_limit.
CREATE TABLE billing.api_usage (
    user_id         uuid NOT NULL,
    bucket_start    timestamptz NOT NULL,
    request_count   integer NOT NULL DEFAULT 0,
    endpoint_counts jsonb NOT NULL DEFAULT '{}',
    -- When the first call over the limit in this bucket wrote rate_limit.exceeded (0.6.0).
    exceeded_at     timestamptz,
    PRIMARY KEY (user_id, bucket_start)
);
CREATE INDEX api_usage_bucket_idx ON billing.api_usage (bucket_start);
COMMENT ON TABLE billing.api_usage IS 'API requests per user and UTC hour (check_api_rate_limit), with per-endpoint counts (at most 32 endpoints by name, keyed by their first 64 characters; further ones under (other)); cleanup_api_usage deletes old buckets.';

-- Where an app keeps its countable resources (agents, documents, products, ...).
CREATE TABLE billing.resource_types (
    resource_type text PRIMARY KEY,
    schema_name   text NOT NULL,
    table_name    text NOT NULL,
    user_column   text NOT NULL,
    limit_key     text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT pg_catalog.now(),
    table_oid     pg_catalog.regclass NOT NULL,
    table_kind    "char" NOT NULL,
    table_owner   pg_catalog.regrole NOT NULL
);
COMMENT ON TABLE billing.resource_types IS 'Resource types registered with billing.register_resource: the table and user column to count, and the plan limits key. table_oid, table_kind and table_owner are the table as registered: a count that finds the oid gone or its kind or owner changed refuses (P0002) until the table is registered again; schema_name and table_name are its name at registration.';

SELECT pg_catalog.pg_extension_config_dump('billing.usage_metrics', '');
SELECT pg_catalog.pg_extension_config_dump('billing.api_usage', '');
SELECT pg_catalog.pg_extension_config_dump('billing.resource_types', '');
ALTER TABLE billing.usage_metrics ENABLE ROW LEVEL SECURITY;
ALTER TABLE billing.api_usage ENABLE ROW LEVEL SECURITY;
ALTER TABLE billing.resource_types ENABLE ROW LEVEL SECURITY;
CREATE POLICY usage_metrics_read_own ON billing.usage_metrics FOR SELECT USING (user_id = (SELECT billing.current_user_id()));
CREATE POLICY api_usage_read_own ON billing.api_usage FOR SELECT USING (user_id = (SELECT billing.current_user_id()));
CREATE POLICY resource_types_read ON billing.resource_types FOR SELECT USING (true);
-- SELECT on billing.usage_metrics, billing.api_usage, billing.resource_types: billing.apply_grants() (end-user roles and service_role only).

INSERT INTO billing.api_functions (function_name, access) VALUES
    ('record_message_usage', 'service'),
    ('record_conversation_usage', 'service'),
    ('record_document_usage', 'service'),
    ('get_user_current_usage', 'rpc'),
    ('check_monthly_limit', 'rpc'),
    ('check_resource_limit', 'rpc'),
    ('check_api_rate_limit', 'rpc'),
    ('cleanup_api_usage', 'service'),
    ('reset_monthly_usage', 'service'),
    ('get_user_dashboard_stats', 'rpc');

-- Internal helpers (no caller check: EXECUTE is revoked from PUBLIC; callers check first).
CREATE FUNCTION billing.user_effective_plan(p_user_id uuid) RETURNS text
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
COMMENT ON FUNCTION billing.user_effective_plan(uuid) IS 'Internal: the effective plan of a user, without a caller check.';

CREATE FUNCTION billing.user_plan_limits(p_user_id uuid) RETURNS jsonb
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
COMMENT ON FUNCTION billing.user_plan_limits(uuid) IS 'Internal: the limits of a user''s effective plan, without a caller check.';

CREATE FUNCTION billing.limit_value(p_limits jsonb, p_key text) RETURNS bigint
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN pg_catalog.jsonb_typeof(p_limits -> p_key) = 'number'
                THEN pg_catalog.trunc((p_limits ->> p_key)::numeric)::bigint
                ELSE -1 END
$$;
COMMENT ON FUNCTION billing.limit_value(jsonb, text) IS 'A limit from a plan''s limits: the number under p_key; -1 (unlimited) when the key is missing or not a number.';

CREATE FUNCTION billing.current_usage_period(p_user_id uuid, OUT period_start timestamptz, OUT period_end timestamptz)
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
COMMENT ON FUNCTION billing.current_usage_period(uuid) IS 'The user''s current usage period: the subscription period when now() is inside it, else the UTC calendar month.';

CREATE FUNCTION billing.check_choice(p_name text, p_value text, p_allowed text[]) RETURNS void
LANGUAGE plpgsql IMMUTABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF p_value IS NULL OR NOT (p_value = ANY (p_allowed)) THEN
        RAISE EXCEPTION '% % is not known', p_name, pg_catalog.quote_literal(pg_catalog.left(COALESCE(p_value, 'NULL'), 64))
            USING ERRCODE = '22023', HINT = pg_catalog.format('%s must be one of: %s', p_name, pg_catalog.array_to_string(p_allowed, ', '));
    END IF;
END
$$;
COMMENT ON FUNCTION billing.check_choice(text, text, text[]) IS 'Internal: raises 22023 unless p_value is one of p_allowed.';

-- Recorders (service-only).
CREATE FUNCTION billing.record_message_usage(p_user_id uuid, p_tokens_input integer, p_tokens_output integer) RETURNS void
LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS 'MODULE_PATHNAME', 'pgb_record_message_usage';
COMMENT ON FUNCTION billing.record_message_usage(uuid, integer, integer) IS 'Service-only. Count one message and its tokens in the user''s current period (one upsert: concurrent recorders never lose an increment).';

CREATE FUNCTION billing.record_conversation_usage(p_user_id uuid) RETURNS void
LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS 'MODULE_PATHNAME', 'pgb_record_conversation_usage';
COMMENT ON FUNCTION billing.record_conversation_usage(uuid) IS 'Service-only. Count one conversation in the user''s current period.';

CREATE FUNCTION billing.record_document_usage(p_user_id uuid, p_chunks integer) RETURNS void
LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS 'MODULE_PATHNAME', 'pgb_record_document_usage';
COMMENT ON FUNCTION billing.record_document_usage(uuid, integer) IS 'Service-only. Count one processed document and p_chunks stored chunks in the user''s current period.';

-- The delegated part of the recorders (0.9.0, issue 17; src/api/usage.rs, record_on_shard).
CREATE FUNCTION billing._record_usage_on_shard(p_user_id uuid, p_deltas bigint[]) RETURNS boolean
LANGUAGE c VOLATILE STRICT SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS 'MODULE_PATHNAME', 'pgb_record_usage_on_shard';
COMMENT ON FUNCTION billing._record_usage_on_shard(uuid, bigint[]) IS 'Internal (the record_*_usage functions on a Citus cluster, after they checked the caller): the usage upsert, unless a monthly limit rule exists (its limit.* events are numbered on the coordinator). p_deltas are the 7 counters: messages, conversations, tokens in, tokens out, documents, chunks, generations. Returns true when recorded, NULL having changed nothing (the caller then records the usage itself). STRICT (see billing._consume_on_shard). billing.distribute() makes it a force-delegated Citus function, run on the worker that holds p_user_id.';

CREATE FUNCTION billing.get_user_current_usage(p_user_id uuid)
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
COMMENT ON FUNCTION billing.get_user_current_usage(uuid) IS 'The user''s usage counters for the current period (zeros when nothing was recorded). End users: own only.';

CREATE FUNCTION billing.check_monthly_limit(p_user_id uuid, p_metric text)
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
COMMENT ON FUNCTION billing.check_monthly_limit(uuid, text) IS 'Whether the user is under their plan''s limit for p_metric (messages, conversations, tokens_input, tokens_output, documents, generations: this period; api_calls: today, UTC). limit_value -1 = unlimited. Unknown metric: 22023. End users: own only.';

CREATE FUNCTION billing._check_resource_limit(p_user_id uuid, p_resource_type text) RETURNS jsonb
LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS 'MODULE_PATHNAME', 'pgb_check_resource_limit';
COMMENT ON FUNCTION billing._check_resource_limit(uuid, text) IS 'Internal: check_resource_limit as jsonb.';

CREATE FUNCTION billing.check_resource_limit(p_user_id uuid, p_resource_type text)
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

CREATE FUNCTION billing._resource_usage(p_user_id uuid) RETURNS jsonb
LANGUAGE c STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS 'MODULE_PATHNAME', 'pgb_resource_usage';
COMMENT ON FUNCTION billing._resource_usage(uuid) IS 'Internal: every registered resource''s count and limit for the user, as jsonb {type: {count, limit, allowed}}.';

CREATE FUNCTION billing.register_resource(p_resource_type text, p_table regclass, p_user_column name DEFAULT 'user_id',
                                          p_limit_key text DEFAULT NULL) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_schema text;
    v_table text;
    v_kind "char";
    v_owner pg_catalog.oid;
BEGIN
    PERFORM billing.require_service('billing.register_resource');
    IF p_resource_type IS NULL OR p_resource_type !~ '^[a-z][a-z0-9_]{0,62}$' THEN
        RAISE EXCEPTION 'p_resource_type must be a lower-case name such as agents' USING ERRCODE = '22023';
    END IF;
    IF p_table IS NULL OR p_user_column IS NULL THEN
        RAISE EXCEPTION 'p_table and p_user_column must not be NULL' USING ERRCODE = '22023';
    END IF;
    SELECT n.nspname, c.relname, c.relkind, c.relowner INTO v_schema, v_table, v_kind, v_owner
      FROM pg_catalog.pg_class AS c JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
     WHERE c.oid = p_table AND c.relkind IN ('r', 'p');
    IF NOT FOUND THEN
        RAISE EXCEPTION '% is not a table', p_table USING ERRCODE = '22023';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute AS a
                    WHERE a.attrelid = p_table AND a.attname = p_user_column AND a.attnum > 0 AND NOT a.attisdropped
                      AND a.atttypid = 'pg_catalog.uuid'::pg_catalog.regtype) THEN
        RAISE EXCEPTION 'table % has no uuid column %', p_table, pg_catalog.quote_ident(p_user_column) USING ERRCODE = '22023';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_index AS i
                    WHERE i.indrelid = p_table AND i.indkey[0] = (SELECT a.attnum FROM pg_catalog.pg_attribute AS a
                                                                  WHERE a.attrelid = p_table AND a.attname = p_user_column)) THEN
        RAISE EXCEPTION 'table % has no index that starts with column %', p_table, pg_catalog.quote_ident(p_user_column)
            USING ERRCODE = '22023',
                  HINT = pg_catalog.format('without one every limit check scans the whole table; create it first: CREATE INDEX ON %s (%I);', p_table, p_user_column);
    END IF;
    INSERT INTO billing.resource_types AS r (resource_type, schema_name, table_name, user_column, limit_key,
                                             table_oid, table_kind, table_owner)
    VALUES (p_resource_type, v_schema, v_table, p_user_column, COALESCE(p_limit_key, p_resource_type),
            p_table, v_kind, v_owner::pg_catalog.regrole)
    ON CONFLICT (resource_type) DO UPDATE
       SET schema_name = EXCLUDED.schema_name, table_name = EXCLUDED.table_name,
           user_column = EXCLUDED.user_column, limit_key = EXCLUDED.limit_key,
           table_oid = EXCLUDED.table_oid, table_kind = EXCLUDED.table_kind, table_owner = EXCLUDED.table_owner;
END
$$;
COMMENT ON FUNCTION billing.register_resource(text, regclass, name, text) IS 'Service-only. Tell pg_billing where an app keeps a countable resource: check_resource_limit(p_resource_type) counts the user''s rows of p_table by p_user_column (uuid, indexed) against the plan limit p_limit_key (default: the type name). The table is kept by oid with its kind and owner and counted as its owner: dropped and re-created (or replaced by a view), or given another owner, it must be registered again. Re-registering replaces the entry.';

CREATE FUNCTION billing._check_api_rate_limit(p_user_id uuid, p_endpoint text) RETURNS jsonb
LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS 'MODULE_PATHNAME', 'pgb_check_api_rate_limit';
COMMENT ON FUNCTION billing._check_api_rate_limit(uuid, text) IS 'Internal: check_api_rate_limit as jsonb.';

-- The delegated part of the rate-limit check (0.9.0, issue 17; src/api/usage.rs, rate_limit_on_shard).
CREATE FUNCTION billing._rate_limit_on_shard(p_user_id uuid, p_endpoint text) RETURNS jsonb
LANGUAGE c VOLATILE STRICT SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS 'MODULE_PATHNAME', 'pgb_rate_limit_on_shard';
COMMENT ON FUNCTION billing._rate_limit_on_shard(uuid, text) IS 'Internal (check_api_rate_limit on a Citus cluster, after it checked the caller): the check of one request, unless the limit is reached (the rate_limit.exceeded event is numbered on the coordinator). p_endpoint is the endpoint key. Returns check_api_rate_limit''s result as jsonb, or NULL having counted nothing (the caller then runs the check itself). STRICT (see billing._consume_on_shard). billing.distribute() makes it a force-delegated Citus function, run on the worker that holds p_user_id.';

CREATE FUNCTION billing.check_api_rate_limit(p_user_id uuid, p_endpoint text DEFAULT NULL)
RETURNS TABLE (allowed boolean, limit_value integer, remaining integer, reset_at timestamptz)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN QUERY
    SELECT (r ->> 'allowed')::boolean, (r ->> 'limit_value')::integer, (r ->> 'remaining')::integer, (r ->> 'reset_at')::timestamptz
      FROM billing._check_api_rate_limit(p_user_id, p_endpoint) AS r;
END
$$;
COMMENT ON FUNCTION billing.check_api_rate_limit(uuid, text) IS 'Counts one API request in the current UTC hour when the effective plan''s api_rate_limit_hourly allows it, in one statement (with limit N, exactly N concurrent callers are allowed). Returns what X-RateLimit-* headers need: allowed, limit_value (-1 unlimited), remaining, reset_at. The bucket counts requests per endpoint too: the first 32 distinct endpoints of the hour by name (their first 64 characters), any further one under (other); p_endpoint longer than 255 characters is 22023. End users: own only.';

CREATE FUNCTION billing.cleanup_api_usage(p_older_than interval DEFAULT '7 days') RETURNS integer
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
COMMENT ON FUNCTION billing.cleanup_api_usage(interval) IS 'Service-only maintenance: deletes API usage buckets older than p_older_than (default 7 days, at least 1 day: a shorter interval is 22023 and deletes nothing, so the current hour''s bucket is never deleted); returns rows deleted.';

CREATE FUNCTION billing.reset_monthly_usage() RETURNS integer
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
COMMENT ON FUNCTION billing.reset_monthly_usage() IS 'Service-only maintenance: opens the current period''s (zeroed) usage row for every user whose latest period has ended; returns how many periods it opened. Old periods are kept for history.';
