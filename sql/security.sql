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
-- act on themselves), 'service' (service callers only). Each domain's SQL file adds its rows;
-- grants and expose_rpc read them. Extension content, re-created by CREATE EXTENSION (not dumped).
CREATE TABLE billing.api_functions (
    function_name text PRIMARY KEY,
    access        text NOT NULL CHECK (access IN ('anon', 'rpc', 'service'))
);
ALTER TABLE billing.api_functions ENABLE ROW LEVEL SECURITY;
CREATE POLICY api_functions_read ON billing.api_functions FOR SELECT USING (true);
COMMENT ON TABLE billing.api_functions IS 'The functions billing.expose_rpc exposes and who may call each: anon, rpc (authenticated end users, on themselves) or service.';

CREATE FUNCTION billing.api_catalog() RETURNS TABLE (function_name text, access text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT f.function_name, f.access FROM billing.api_functions AS f ORDER BY f.function_name
$$;
COMMENT ON FUNCTION billing.api_catalog() IS 'The functions billing.expose_rpc exposes and who may call each: anon, rpc (authenticated end users, on themselves) or service.';

CREATE FUNCTION billing.apply_grants() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    f record;
    has_anon boolean := EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'anon');
    has_auth boolean := EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'authenticated');
    has_service boolean := EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'service_role');
BEGIN
    PERFORM billing.require_service('billing.apply_grants');
    FOR f IN
        SELECT p.oid::pg_catalog.regprocedure AS sig, c.access
          FROM billing.api_catalog() AS c
          JOIN pg_catalog.pg_proc AS p
            ON p.proname = c.function_name AND p.pronamespace = 'billing'::pg_catalog.regnamespace
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
    IF has_service THEN
        GRANT USAGE ON SCHEMA billing TO service_role;
        GRANT SELECT ON ALL TABLES IN SCHEMA billing TO service_role;
    END IF;
END
$$;
COMMENT ON FUNCTION billing.apply_grants() IS 'Service-only. (Re)applies pg_billing''s grants for the roles that exist now (anon, authenticated, service_role): CREATE EXTENSION and expose_rpc call it; call it again after creating those roles.';

CREATE FUNCTION billing.expose_rpc(p_schema text DEFAULT 'public') RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    f record;
    n integer := 0;
    call_args text;
    body text;
    ddl text;
    target text;
BEGIN
    PERFORM billing.require_service('billing.expose_rpc');
    IF p_schema IS NULL OR NOT EXISTS (SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = p_schema) THEN
        RAISE EXCEPTION 'schema % does not exist', pg_catalog.quote_literal(COALESCE(p_schema, 'NULL'))
            USING ERRCODE = '22023', HINT = 'create the schema first, or pass the schema PostgREST exposes (usually public)';
    END IF;
    IF p_schema IN ('billing', 'pg_catalog', 'information_schema') THEN
        RAISE EXCEPTION 'wrappers cannot be created in schema %', p_schema USING ERRCODE = '22023';
    END IF;
    PERFORM billing.apply_grants();
    FOR f IN
        SELECT p.oid, p.proname, p.pronargs, p.proretset, p.provolatile, c.access
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
COMMENT ON FUNCTION billing.expose_rpc(text) IS 'Service-only. Creates (or refreshes) in p_schema thin SECURITY INVOKER wrappers with the names, parameters and results of pg_billing''s API, so supabase.rpc(''consume_credits_v2'', {...}) works unchanged; re-run after ALTER EXTENSION UPDATE. Returns the number of wrappers.';

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
           AND p.prolang = (SELECT oid FROM pg_catalog.pg_language WHERE lanname = 'sql')
           AND p.prosrc LIKE '%billing.' || pg_catalog.quote_ident(p.proname) || '(%'
    LOOP
        EXECUTE 'DROP FUNCTION ' || f.sig::text;
        n := n + 1;
    END LOOP;
    RETURN n;
END
$$;
COMMENT ON FUNCTION billing.unexpose_rpc(text) IS 'Service-only. Drops the wrappers billing.expose_rpc created in p_schema; returns how many.';
