-- Security model (SPEC 2): caller identity, internal checks, the API catalog, grants, and
-- RPC exposure for PostgREST/Supabase.

CREATE FUNCTION billing.current_user_id() RETURNS uuid
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT COALESCE(
        NULLIF(pg_catalog.current_setting('request.jwt.claim.sub', true), ''),
        NULLIF(pg_catalog.current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub'
    )::uuid
$$;
COMMENT ON FUNCTION billing.current_user_id() IS 'The end user''s id, exactly as Supabase''s auth.uid() computes it from the request''s JWT claims; NULL without a sub claim.';

CREATE FUNCTION billing.authorize_user(p_user_id uuid) RETURNS void
LANGUAGE c STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS 'MODULE_PATHNAME', 'pgb_authorize_user';
COMMENT ON FUNCTION billing.authorize_user(uuid) IS 'Internal: raises 42501 unless the caller is a service caller or the end user p_user_id; 22023 for NULL.';

CREATE FUNCTION billing.require_service(p_function text) RETURNS void
LANGUAGE c STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS 'MODULE_PATHNAME', 'pgb_require_service';
COMMENT ON FUNCTION billing.require_service(text) IS 'Internal: raises 42501 when the request is an end user''s (pg_billing.end_user_roles).';

-- The argument of every cleanup_* function (0.2.0): service-only, an interval between p_at_least
-- and 1000 years, checked before anything is deleted.
CREATE FUNCTION billing.check_retention(p_function text, p_older_than interval, p_at_least interval, p_hint text)
RETURNS void LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET IntervalStyle = 'postgres' AS $$
BEGIN
    PERFORM billing.require_service(p_function);
    IF p_older_than IS NULL OR p_older_than < p_at_least OR p_older_than > interval '1000 years' THEN
        RAISE EXCEPTION 'p_older_than must be an interval between % and 1000 years',
                        CASE WHEN p_at_least = interval '0' THEN '0' ELSE p_at_least::text END
            USING ERRCODE = '22023', HINT = COALESCE(p_hint, 'pass an interval such as ''7 days''');
    END IF;
END
$$;
COMMENT ON FUNCTION billing.check_retention(text, interval, interval, text) IS 'Internal: raises 42501 for an end user and 22023 unless p_at_least <= p_older_than <= 1000 years (the cleanup_* functions).';

CREATE FUNCTION billing.is_end_user() RETURNS boolean
LANGUAGE c STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS 'MODULE_PATHNAME', 'pgb_is_end_user';
COMMENT ON FUNCTION billing.is_end_user() IS 'True when the request is an end user''s: its JWT role claim or its role is in pg_billing.end_user_roles.';

CREATE FUNCTION billing.check_argument(p_name text, p_value integer, p_min integer, p_max integer) RETURNS void
LANGUAGE c IMMUTABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS 'MODULE_PATHNAME', 'pgb_check_argument';
COMMENT ON FUNCTION billing.check_argument(text, integer, integer, integer) IS 'Internal: raises 22023 unless p_min <= p_value <= p_max (and p_value is not NULL).';

-- Every public function and who may call it: 'anon' (rpc, also for anon), 'rpc' (end users
-- act on themselves), 'service' (service callers only), 'dba' (service callers only, never
-- exposed as a wrapper: administration). Each domain's SQL file adds its rows; grants and
-- expose_rpc read them. Extension content, re-created by CREATE EXTENSION (not dumped).
CREATE TABLE billing.api_functions (
    function_name text PRIMARY KEY,
    access        text NOT NULL CHECK (access IN ('anon', 'rpc', 'service', 'dba'))
);
ALTER TABLE billing.api_functions ENABLE ROW LEVEL SECURITY;
CREATE POLICY api_functions_read ON billing.api_functions FOR SELECT USING (true);
COMMENT ON TABLE billing.api_functions IS 'pg_billing''s functions and who may call each: anon, rpc (authenticated end users, on themselves), service, or dba (service callers; not exposed by billing.expose_rpc).';

-- The DBA functions SPEC 2 gives service callers (0.3.0): EXECUTE for service_role, no wrapper.
INSERT INTO billing.api_functions (function_name, access) VALUES
    ('register_resource', 'dba'),
    ('register_widget_table', 'dba'),
    ('expose_rpc', 'dba'),
    ('unexpose_rpc', 'dba'),
    ('verify_ledger', 'dba');

CREATE FUNCTION billing.api_catalog() RETURNS TABLE (function_name text, access text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT f.function_name, f.access FROM billing.api_functions AS f WHERE f.access <> 'dba' ORDER BY f.function_name
$$;
COMMENT ON FUNCTION billing.api_catalog() IS 'The functions billing.expose_rpc exposes and who may call each: anon, rpc (authenticated end users, on themselves) or service.';

CREATE FUNCTION billing.apply_grants() RETURNS void
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

CREATE FUNCTION billing.expose_rpc(p_schema text DEFAULT 'public') RETURNS integer
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

CREATE FUNCTION billing.unexpose_rpc(p_schema text DEFAULT 'public') RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    f record;
    n integer := 0;
BEGIN
    PERFORM billing.require_service('billing.unexpose_rpc');
    FOR f IN
        SELECT p.oid::pg_catalog.regprocedure AS sig
          FROM pg_catalog.pg_proc AS p
          JOIN pg_catalog.pg_namespace AS ns ON ns.oid = p.pronamespace
          JOIN billing.api_catalog() AS c ON c.function_name = p.proname
         WHERE ns.nspname = p_schema AND ns.nspname <> 'billing'
           AND p.proowner = (SELECT r.oid FROM pg_catalog.pg_roles AS r WHERE r.rolname = CURRENT_USER)
           AND p.prolang = (SELECT oid FROM pg_catalog.pg_language WHERE lanname = 'sql')
           AND p.prosrc LIKE '%billing.' || pg_catalog.quote_ident(p.proname) || '(%'
    LOOP
        EXECUTE 'DROP FUNCTION ' || f.sig::text;
        n := n + 1;
    END LOOP;
    RETURN n;
END
$$;
COMMENT ON FUNCTION billing.unexpose_rpc(text) IS 'Service-only (DBA). Drops the wrappers billing.expose_rpc created in p_schema (functions of other roles are never dropped); returns how many.';
