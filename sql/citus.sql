-- Scale-out on Citus (0.6.0, issue 17): billing.distribute() turns an installed pg_billing on a
-- Citus coordinator into a distributed one. On a single node nothing here runs.
--
-- Every billing table is one of:
--   * a reference table (a copy on every node): the catalogs, small and read by every call;
--   * a local table of the coordinator: the registries of app tables (resource_types,
--     widget_tables), which name tables of the coordinator by oid (a worker has no such table,
--     and the functions that read them run on the coordinator);
--   * distributed by user_id, colocated with billing.accounts: every per-user table, so all of a
--     user's rows live in one shard group and every per-user statement is routed to one node;
--   * distributed by e-mail (member_emails, pending_profiles: keyed by the e-mail before a user
--     exists), or by event id (webhook_events).
-- A table the lists below do not name is an error, so a table added later cannot be forgotten.
--
-- Delegation (0.8.0): the internal functions in `delegated` below become force-delegated Citus
-- functions (distribution argument p_user_id, colocated with billing.accounts). Their public
-- function checks the caller on the coordinator, then calls them; Citus runs them on the worker
-- that holds the user (src/citus.rs).

CREATE FUNCTION billing.distribute(p_shard_count integer DEFAULT NULL) RETURNS jsonb
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
    -- (function, its distribution argument)
    delegated text[] := ARRAY['billing._consume_on_shard(uuid, integer, bigint, text[])', 'p_user_id',
                              'billing._record_usage_on_shard(uuid, bigint[])', 'p_user_id',
                              'billing._rate_limit_on_shard(uuid, text)', 'p_user_id',
                              'billing._grant_on_shard(uuid, integer, bigint[], text[])', 'p_user_id',
                              'billing._reserve_on_shard(uuid, integer, bigint, text[])', 'p_user_id'];
    shards integer;
    t text;
    q text;
    p record;
    n_policies integer := 0;
    n_reference integer := 0;
    n_distributed integer := 0;
    n_kept integer := 0;
    n_local integer := 0;
    n_delegated integer := 0;
    n_kept_functions integer := 0;
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
    -- After the tables: a delegated function is colocated with billing.accounts.
    FOR i IN 0 .. pg_catalog.array_length(delegated, 1) / 2 - 1 LOOP
        EXECUTE 'SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_object AS o
                                 WHERE o.classid = ''pg_catalog.pg_proc''::pg_catalog.regclass AND o.objid = $1
                                   AND o.distribution_argument_index IS NOT NULL AND o.force_delegation)'
            INTO STRICT q USING delegated[2 * i + 1]::pg_catalog.regprocedure;
        IF q = 'true' THEN
            n_kept_functions := n_kept_functions + 1;
        ELSE
            EXECUTE 'SELECT pg_catalog.create_distributed_function($1, $2, colocate_with => ''billing.accounts'', force_delegation => true)'
                USING delegated[2 * i + 1]::pg_catalog.regprocedure, delegated[2 * i + 2];
            n_delegated := n_delegated + 1;
        END IF;
    END LOOP;
    RETURN pg_catalog.jsonb_build_object(
        'functions_delegated', n_delegated,
        'functions_already_delegated', n_kept_functions,
        'policies_rewritten', n_policies,
        'reference_tables_created', n_reference,
        'distributed_tables_created', n_distributed,
        'tables_already_placed', n_kept,
        'tables_kept_local', n_local,
        'shard_count', shards);
END
$$;
COMMENT ON FUNCTION billing.distribute(integer) IS
'DBA only (no role is granted EXECUTE). On a Citus coordinator: makes the billing catalogs reference tables (except the registries of app tables, resource_types and widget_tables, which stay local to the coordinator, whose tables they name), distributes every per-user table by user_id colocated with billing.accounts (p_shard_count shards, default citus.shard_count), member_emails and pending_profiles by email and webhook_events by event_id, and rewrites the end-user row policies into a form Citus accepts. Then delegates the internal functions that run a call''s body on the worker holding its user (force_delegation, colocated with billing.accounts: 0.8.0 billing._consume_on_shard; 0.9.0 billing._record_usage_on_shard and billing._rate_limit_on_shard; 0.10.0 billing._grant_on_shard and billing._reserve_on_shard). Idempotent: a second call changes nothing. Fails with 0A000 when Citus is absent or this is not the coordinator.';

-- Whether billing.<t> is already a Citus table (reference or distributed).
CREATE FUNCTION billing._citus_placed(p_table text) RETURNS boolean
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

-- The delegated part of consume_credits_v2 (0.8.0, issue 17): the fast path of a debit,
-- run by Citus on the worker that holds the user once billing.distribute() has delegated it
-- (src/api/credits.rs, consume_on_shard). No role is granted it (finalize.sql revokes PUBLIC).
CREATE FUNCTION billing._consume_on_shard(p_user_id uuid, p_amount integer, p_ledger_id bigint, p_request text[])
RETURNS jsonb LANGUAGE c VOLATILE STRICT SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pgb_consume_on_shard';
COMMENT ON FUNCTION billing._consume_on_shard(uuid, integer, bigint, text[]) IS 'Internal (consume_credits_v2 on a Citus cluster, after it checked the caller): a debit by the fast path only, and only when no balance rule could fire (events are numbered on the coordinator); its ledger row takes the id p_ledger_id, drawn by the coordinator from its sequence. p_request is {description, reference_id, idempotency_key, key_scope}; the key is claimed, stored or replayed in the caller''s namespace key_scope (user or service) as consume_credits_v2 does. STRICT: Citus crashes pushing down a call whose distribution argument is NULL, and a STRICT call with a NULL argument is folded to NULL before Citus sees it. Returns consume_credits_v2''s result, or NULL having changed nothing (the caller then runs the general debit). billing.distribute() makes it a force-delegated Citus function, run on the worker that holds p_user_id.';

-- The delegated part of the functions that add credits (0.10.0, issue 17): the grant of
-- add_purchased_credits, add_subscription_credits and refund_credits, run by Citus on the worker
-- that holds the user (src/api/credits.rs, grant_on_shard). No role is granted it.
CREATE FUNCTION billing._grant_on_shard(p_user_id uuid, p_amount integer, p_ledger_ids bigint[], p_request text[])
RETURNS jsonb LANGUAGE c VOLATILE STRICT SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pgb_grant_on_shard';
COMMENT ON FUNCTION billing._grant_on_shard(uuid, integer, bigint[], text[]) IS 'Internal (add_purchased_credits, add_subscription_credits and refund_credits on a Citus cluster, after they checked the caller): the grant under the account lock, unless an event could fire or the account must be made (no account, a balance rule or a new account, a grant or hold due to settle: events are numbered on the coordinator). Its ledger rows take the ids p_ledger_ids (3, drawn by the coordinator from its sequence). p_request is {function, text, reference_id, idempotency_key} (text: p_description, or p_reason for refund_credits); the key is claimed, stored or replayed in the service''s namespace as the function does. Returns the function''s result, or NULL having changed nothing (the caller then runs the grant itself). STRICT (see billing._consume_on_shard). billing.distribute() makes it a force-delegated Citus function, run on the worker that holds p_user_id.';

-- The delegated part of reserve_credits (0.10.0, issue 17): the hold, run by Citus on the worker
-- that holds the user (src/api/holds.rs, reserve_on_shard). No role is granted it.
CREATE FUNCTION billing._reserve_on_shard(p_user_id uuid, p_amount integer, p_ttl_us bigint, p_request text[])
RETURNS jsonb LANGUAGE c VOLATILE STRICT SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pgb_reserve_on_shard';
COMMENT ON FUNCTION billing._reserve_on_shard(uuid, integer, bigint, text[]) IS 'Internal (reserve_credits on a Citus cluster, after it checked the caller): the hold under the account lock, unless an event could fire (no account, a balance rule or a new account, a grant or hold due to settle: events are numbered on the coordinator) or reserve_credits fails (not enough credits, the cap on active holds, a key used for another request: the coordinator raises the error with its SQLSTATE). p_ttl_us is the TTL in microseconds; p_request is {feature, idempotency_key, key_scope, allow_partial} (key_scope: the caller''s namespace, user or service; allow_partial: true or false). Returns reserve_credits''s result, or NULL having changed nothing (the caller then makes the hold itself). STRICT (see billing._consume_on_shard). billing.distribute() makes it a force-delegated Citus function, run on the worker that holds p_user_id.';
