-- Widgets (SPEC 7) and the dashboard. src/api/widgets.rs builds the query over the sources.

CREATE TABLE billing.widget_tables (
    widget_type text PRIMARY KEY,
    schema_name text NOT NULL,
    table_name  text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    table_oid   pg_catalog.regclass NOT NULL,
    table_kind  "char" NOT NULL,
    table_owner pg_catalog.regrole NOT NULL
);
COMMENT ON TABLE billing.widget_tables IS 'Widget tables registered with billing.register_widget_table (plain tables public.widget_<type> with the required columns and a trusted owner are found without registration). table_oid, table_kind and table_owner are the relation as registered: a call that finds the oid gone or its kind or owner changed refuses (P0002) until the table is registered again; schema_name and table_name are its name at registration.';
SELECT pg_catalog.pg_extension_config_dump('billing.widget_tables', '');
ALTER TABLE billing.widget_tables ENABLE ROW LEVEL SECURITY;
CREATE POLICY widget_tables_read ON billing.widget_tables FOR SELECT USING (true);
-- SELECT on billing.widget_tables: billing.apply_grants() (end-user roles and service_role only).

INSERT INTO billing.api_functions (function_name, access) VALUES
    ('get_user_widgets_ordered', 'anon'),
    ('get_next_widget_position', 'rpc'),
    ('count_user_widgets_by_type', 'anon');

CREATE FUNCTION billing.register_widget_table(p_widget_type text, p_table regclass) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_schema text;
    v_table text;
    v_kind "char";
    v_owner pg_catalog.oid;
    v_missing text;
BEGIN
    PERFORM billing.require_service('billing.register_widget_table');
    IF p_widget_type IS NULL OR p_widget_type !~ '^[a-z][a-z0-9_]{0,62}$' THEN
        RAISE EXCEPTION 'p_widget_type must be a lower-case name such as links' USING ERRCODE = '22023';
    END IF;
    IF p_table IS NULL THEN
        RAISE EXCEPTION 'p_table must not be NULL' USING ERRCODE = '22023';
    END IF;
    SELECT n.nspname, c.relname, c.relkind, c.relowner INTO v_schema, v_table, v_kind, v_owner
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
    INSERT INTO billing.widget_tables AS w (widget_type, schema_name, table_name, table_oid, table_kind, table_owner)
    VALUES (p_widget_type, v_schema, v_table, p_table, v_kind, v_owner::pg_catalog.regrole)
    ON CONFLICT (widget_type) DO UPDATE
       SET schema_name = EXCLUDED.schema_name, table_name = EXCLUDED.table_name, table_oid = EXCLUDED.table_oid,
           table_kind = EXCLUDED.table_kind, table_owner = EXCLUDED.table_owner;
END
$$;
COMMENT ON FUNCTION billing.register_widget_table(text, regclass) IS 'Service-only. Register an app table (or view) of widgets of type p_widget_type (columns id uuid, user_id uuid, position, is_active boolean, created_at, updated_at). The relation is kept by oid with its kind and owner: dropped and re-created, or given another owner, it must be registered again. Plain tables public.widget_<type> with those columns and a trusted owner (superuser, member of the database owner or of a role in pg_billing.trusted_table_owners) need no registration.';

CREATE FUNCTION billing._user_widgets(p_user_id uuid, p_active_only boolean) RETURNS jsonb
LANGUAGE c STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS 'MODULE_PATHNAME', 'pgb_user_widgets';
COMMENT ON FUNCTION billing._user_widgets(uuid, boolean) IS 'Internal: get_user_widgets_ordered as one jsonb array.';

CREATE FUNCTION billing.get_user_widgets_ordered(p_user_id uuid, p_active_only boolean DEFAULT true)
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
COMMENT ON FUNCTION billing.get_user_widgets_ordered(uuid, boolean) IS 'The user''s widgets across every widget table, ordered by position, then type, then id; data is the row as JSON, with the columns the reading role may SELECT. End users (anon too) read with their own role: the tables'' RLS and column grants decide which rows and columns they get (a table whose widget columns they cannot read is skipped). Service callers read each table as its owner (every row and column). Anyone may read active widgets; inactive ones (p_active_only = false) only the owner or a service caller.';

CREATE FUNCTION billing.get_next_widget_position(p_user_id uuid) RETURNS integer
LANGUAGE c STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS 'MODULE_PATHNAME', 'pgb_get_next_widget_position';
COMMENT ON FUNCTION billing.get_next_widget_position(uuid) IS 'The position for a new widget: the highest position over all the user''s widget tables + 1, 0 when none. End users: own only, read with their own role (RLS and grants apply); service callers: as each table''s owner.';

CREATE FUNCTION billing.count_user_widgets_by_type(p_user_id uuid, p_widget_type text) RETURNS integer
LANGUAGE c STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS 'MODULE_PATHNAME', 'pgb_count_user_widgets_by_type';
COMMENT ON FUNCTION billing.count_user_widgets_by_type(uuid, text) IS 'How many widgets of p_widget_type the user has, active or not (what the widgets_per_type limit counts). End users count the rows their own role may see (RLS applies; 42501 when it may not read user_id); service callers count as the table''s owner. Unknown type: 22023.';

CREATE FUNCTION billing.get_user_dashboard_stats(p_user_id uuid)
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
COMMENT ON FUNCTION billing.get_user_dashboard_stats(uuid) IS 'One call for a dashboard: effective plan and status, both credit pools and their total, this period''s usage counters, each registered resource''s count and limit (resources: {type: {count, limit, allowed}}), and (0.5.0) available: what any spending may use now, less the debt and the credits active holds reserve (as get_user_credits). End users: own only.';
