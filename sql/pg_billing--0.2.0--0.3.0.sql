-- pg_billing 0.2.0 -> 0.3.0: the review fixes (issue 10) and the security fixes (issue 11).
--
-- Idempotent (SPEC 12: Citus may run an upgrade script on every node): every statement may run
-- again on a database that has it already. tests/stress/upgrade.py runs this file a second time
-- after ALTER EXTENSION ... UPDATE and checks nothing changed, and compares the upgraded catalog
-- with a fresh 0.3.0 install.
--
-- Each section below names the issue items it carries.
\echo Use "ALTER EXTENSION pg_billing UPDATE TO '0.3.0'" to load this file. \quit

-- ===== Credits and subscriptions (issue 10 items 1, 2, 5, 6; issue 11 items 4, 6, 8d) =====

-- Idempotency keys in two namespaces per user (issue 11 item 6): end users' keys ('user') and
-- service callers' ('service') never collide. Keys written before 0.3.0 did not record who used
-- them: they go to the service namespace, and those of consume_credits_v2 (the one keyed
-- function end users may call) are copied into the user namespace too, so a retry across the
-- upgrade is still replayed, never applied twice.
-- (Added without a default and filled, so the table matches a fresh install: a column added with
-- a default keeps a "missing value" that a fresh table does not have.)
ALTER TABLE billing.idempotency_keys ADD COLUMN IF NOT EXISTS scope text;
UPDATE billing.idempotency_keys SET scope = 'service' WHERE scope IS NULL;
ALTER TABLE billing.idempotency_keys ALTER COLUMN scope SET NOT NULL;
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_constraint AS c
                    WHERE c.conrelid = 'billing.idempotency_keys'::pg_catalog.regclass AND c.conname = 'idempotency_keys_pkey'
                      AND pg_catalog.array_length(c.conkey, 1) = 3) THEN
        ALTER TABLE billing.idempotency_keys DROP CONSTRAINT idempotency_keys_pkey;
        ALTER TABLE billing.idempotency_keys ADD CONSTRAINT idempotency_keys_pkey PRIMARY KEY (user_id, scope, idempotency_key);
    END IF;
END
$$;
INSERT INTO billing.idempotency_keys (user_id, idempotency_key, request, response, created_at, scope)
SELECT k.user_id, k.idempotency_key, k.request, k.response, k.created_at, 'user'
  FROM billing.idempotency_keys AS k
 WHERE k.scope = 'service' AND k.request ->> 'operation' = 'consume_credits_v2'
ON CONFLICT (user_id, scope, idempotency_key) DO NOTHING;
COMMENT ON TABLE billing.idempotency_keys IS 'p_idempotency_key of credit mutators, per user and caller kind (scope: user or service): the request fingerprint and the first response, replayed on repeats. cleanup_idempotency_keys deletes old keys.';

-- What each subscription's current period has granted (issue 10 item 1, issue 11 item 4). A
-- subscription that 0.2.0 left active or trialing was granted its plan's monthly credits when its
-- period began.
ALTER TABLE billing.subscriptions ADD COLUMN IF NOT EXISTS period_credits_granted bigint;
ALTER TABLE billing.subscriptions ALTER COLUMN period_credits_granted SET DEFAULT 0;
UPDATE billing.subscriptions AS s
   SET period_credits_granted = CASE WHEN s.status IN ('active', 'trialing')
                                     THEN COALESCE((SELECT p.monthly_credits FROM billing.plans AS p WHERE p.plan_id = s.plan_id), 0)
                                     ELSE 0 END
 WHERE s.period_credits_granted IS NULL;
ALTER TABLE billing.subscriptions ALTER COLUMN period_credits_granted SET NOT NULL;

-- Subscription credits past their expiry read as 0 (issue 10 item 2).
-- (Guarded since 0.4.0, which gives the view more columns: a second run of this script on a
-- later release keeps that release's view.)
DO $do$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute AS a
                    WHERE a.attrelid = 'billing.user_credits'::pg_catalog.regclass AND a.attname = 'available') THEN
        EXECUTE $v$
CREATE OR REPLACE VIEW billing.user_credits WITH (security_invoker = true) AS
SELECT a.user_id,
       CASE WHEN a.subscription_credits_expire_at <= pg_catalog.now() THEN 0
            ELSE a.subscription_credits_balance END AS subscription_credits_balance,
       a.purchased_credits_balance,
       CASE WHEN a.subscription_credits_expire_at <= pg_catalog.now() THEN 0
            ELSE a.subscription_credits_balance END + a.purchased_credits_balance AS total_balance
  FROM billing.accounts AS a
$v$;
    END IF;
END
$do$;
COMMENT ON VIEW billing.user_credits IS 'Each account''s two pools and their total; subscription credits past their expiry count as 0. Row security applies: end users see their own row.';

-- (Guarded since 0.4.0, which gives the function another column: a second run of this script
-- on a later release keeps that release's function.)
DO $do$
BEGIN
    IF pg_catalog.pg_get_function_result('billing.get_user_credits(uuid)'::pg_catalog.regprocedure) NOT LIKE '%available%' THEN
        EXECUTE $v$
CREATE OR REPLACE FUNCTION billing.get_user_credits(p_user_id uuid)
RETURNS TABLE (user_id uuid, subscription_credits_balance bigint, purchased_credits_balance bigint, total_balance bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $f$
    SELECT billing.authorize_user(p_user_id);
    SELECT p_user_id,
           COALESCE(c.subscription_credits_balance, 0),
           COALESCE(c.purchased_credits_balance, 0),
           COALESCE(c.total_balance, 0)
      FROM (SELECT 1) AS one
      LEFT JOIN billing.user_credits AS c ON c.user_id = p_user_id
$f$;
$v$;
    END IF;
END
$do$;
COMMENT ON FUNCTION billing.get_user_credits(uuid) IS
'The user''s two pools and their total (zeros when the user has no account yet); subscription credits past their expiry (the period end) count as 0. End users: own only.';

-- An omitted period start keeps the stored one (issue 10 item 1).
CREATE OR REPLACE FUNCTION billing.upsert_subscription(p_user_id uuid, p_plan_id text, p_status text,
                                            p_current_period_start timestamptz DEFAULT NULL,
                                            p_current_period_end timestamptz DEFAULT NULL,
                                            p_trial_ends_at timestamptz DEFAULT NULL,
                                            p_cancel_at_period_end boolean DEFAULT false,
                                            p_provider text DEFAULT NULL,
                                            p_provider_subscription_id text DEFAULT NULL,
                                            p_event_id text DEFAULT NULL,
                                            p_event_created_at timestamptz DEFAULT NULL)
RETURNS jsonb LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pgb_upsert_subscription';
COMMENT ON FUNCTION billing.upsert_subscription(uuid, text, text, timestamptz, timestamptz, timestamptz, boolean, text, text, text, timestamptz) IS
'Service-only. The subscription webhook entry point: creates or updates the user''s subscription. p_event_id makes it idempotent; an event older (p_event_created_at) than the last applied one, or about an older period (its start before the stored one), is recorded but changes nothing. An omitted (NULL) p_current_period_start keeps the stored one (now for a new subscription). Credits: when the period advances (a new subscription, or a start or end later than the stored one) an active or trialing subscription renews the plan''s monthly_credits (the old subscription credits expire; the new ones expire at p_current_period_end); within a period, a change to a plan with more monthly_credits tops the pool up by the difference, a downgrade or a repeated event grants nothing. Returns {applied, reason, subscription_id, plan_id, status, effective_plan, credits_granted}.';
COMMENT ON FUNCTION billing.process_expired_subscriptions() IS
'Service-only maintenance (run it from pg_cron): every subscription whose effective plan has become free (canceled/past_due past period end + grace, trial ended, expires_at passed) is set to expired on the free plan, and its subscription credits expire, in one transaction. A user whose account or subscription another transaction holds is skipped, never waited for (the next run takes it), so the batch cannot deadlock. Returns the number downgraded.';

-- A purchase by any spelling reaches the purchased pool (issue 10 item 5).
COMMENT ON FUNCTION billing.increment_credits_with_log(uuid, integer, text, text, text) IS
'Service-only legacy alias. Type ''purchase'' (matched case-insensitively, spaces trimmed, and logged as purchase) adds to the purchased pool, any other type to the subscription pool. Returns the new total balance.';



-- ---------------------------------------------------------------------------------------------
-- Issue 10 item 8: billing dates in UTC whatever the session's TimeZone. (Item 11, the uuid and
-- chrono crates, changes only the library.) The Rust statements of upsert_member (today is the
-- UTC date of now()) and upsert_pending_profile (durations added in UTC) are in the library;
-- here: reset_usage_for_due_members' default p_today (was CURRENT_DATE), effective_plan_id (the
-- grace period added in UTC) and the COMMENTs.
-- CREATE OR REPLACE may change a parameter's default expression (only removing one is refused).
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION billing.reset_usage_for_due_members(p_today date DEFAULT (pg_catalog.now() AT TIME ZONE 'UTC')::date)
RETURNS integer LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pgb_reset_usage_for_due_members';
COMMENT ON FUNCTION billing.reset_usage_for_due_members(date) IS
'Service-only; run daily. p_today defaults to today''s date in UTC (whatever the session''s TimeZone; renewal dates are UTC dates). For every member whose renewal_date <= p_today: renews the subscription pool to the plan''s monthly_credits (expiring the rest; extra credits stay), sets usage to 0 and moves renewal_date monthly past p_today (members several periods behind catch up in one step). Returns the number of members reset; re-running the same day resets nothing.';

COMMENT ON FUNCTION billing.upsert_member(text, text, date, text) IS
'Service-only; the membership webhook. Creates or updates the member with this e-mail (lower-cased; an existing account with that e-mail becomes the member): plan and, when given, renewal date (default: one month from today''s date in UTC, whatever the session''s TimeZone). A new member or a plan change gets the plan''s monthly_credits as the period''s subscription credits (replacing the previous pool; extra credits stay) and starts its usage at 0. Returns {member_id, email, plan, previous_plan, created, plan_changed, credits_granted, renewal_date, duplicate}. A repeated p_event_id changes nothing and returns the first result with duplicate = true. Unknown plan or malformed e-mail: 22023.';

COMMENT ON FUNCTION billing.upsert_pending_profile(text, text, text, text, text, text, text, timestamptz, timestamptz, integer, text) IS
'Service-only; the checkout webhook for a buyer who may have no account. Keyed by lower-cased e-mail. When an account has this e-mail (or the profile was claimed already), the purchase is applied to it at once (plan, credits as subscription credits, billing cycle) and the profile row is kept as claimed: {status: ''applied_to_account'', id, user_id}; otherwise {status: ''pending'', id}. Cycle end defaults to start + 30 days (monthly) or + 1 year (yearly), added in UTC whatever the session''s TimeZone (so is next_credit_renewal, at most start + 30 days); credits default to the plan''s monthly_credits. A repeated p_event_id returns the first result with duplicate = true.';

CREATE OR REPLACE FUNCTION billing.effective_plan_id(p_plan_id text, p_status text, p_current_period_end timestamptz,
                                          p_trial_ends_at timestamptz, p_expires_at timestamptz)
RETURNS text LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE
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
    END
$$;
COMMENT ON FUNCTION billing.effective_plan_id(text, text, timestamptz, timestamptz, timestamptz) IS
'The plan a subscription entitles to now: free when there is none, when it is expired, paused or pending, past expires_at, canceled or past_due past the period end plus pg_billing.grace_period, a trial past its end plus the grace period, or its plan no longer exists; otherwise its plan. The grace period is added in UTC, whatever the session''s TimeZone (''1 day'' is always 24 hours).';


-- ---------------------------------------------------------------------------------------------
-- Issue 10 item 4 and issue 11 item 1: the app's own tables (widgets, resources, legacy import)
-- are read with the caller's rights (end users) or the table owner's (service callers), never
-- as the extension owner; registered tables are kept by oid, kind and owner.
-- Registries: existing rows get the relation their stored name resolves to now (a name that
-- resolves to nothing gets oid 0, kind '-', owner 0: using it is refused with P0002 until the
-- table is registered again). The functions' new code is in the library; the SQL below carries
-- the registration functions and the comments.
-- ---------------------------------------------------------------------------------------------
ALTER TABLE billing.widget_tables ADD COLUMN IF NOT EXISTS table_oid pg_catalog.regclass;
ALTER TABLE billing.widget_tables ADD COLUMN IF NOT EXISTS table_kind "char";
ALTER TABLE billing.widget_tables ADD COLUMN IF NOT EXISTS table_owner pg_catalog.regrole;
UPDATE billing.widget_tables AS t
   SET table_oid = COALESCE(c.oid, 0::pg_catalog.oid)::pg_catalog.regclass,
       table_kind = COALESCE(c.relkind, '-'),
       table_owner = COALESCE(c.relowner, 0::pg_catalog.oid)::pg_catalog.regrole
  FROM billing.widget_tables AS o
  LEFT JOIN pg_catalog.pg_class AS c
         ON c.oid = pg_catalog.to_regclass(pg_catalog.format('%I.%I', o.schema_name, o.table_name))
 WHERE o.widget_type = t.widget_type
   AND (t.table_oid IS NULL OR t.table_kind IS NULL OR t.table_owner IS NULL);
ALTER TABLE billing.widget_tables ALTER COLUMN table_oid SET NOT NULL;
ALTER TABLE billing.widget_tables ALTER COLUMN table_kind SET NOT NULL;
ALTER TABLE billing.widget_tables ALTER COLUMN table_owner SET NOT NULL;
ALTER TABLE billing.resource_types ADD COLUMN IF NOT EXISTS table_oid pg_catalog.regclass;
ALTER TABLE billing.resource_types ADD COLUMN IF NOT EXISTS table_kind "char";
ALTER TABLE billing.resource_types ADD COLUMN IF NOT EXISTS table_owner pg_catalog.regrole;
UPDATE billing.resource_types AS t
   SET table_oid = COALESCE(c.oid, 0::pg_catalog.oid)::pg_catalog.regclass,
       table_kind = COALESCE(c.relkind, '-'),
       table_owner = COALESCE(c.relowner, 0::pg_catalog.oid)::pg_catalog.regrole
  FROM billing.resource_types AS o
  LEFT JOIN pg_catalog.pg_class AS c
         ON c.oid = pg_catalog.to_regclass(pg_catalog.format('%I.%I', o.schema_name, o.table_name))
 WHERE o.resource_type = t.resource_type
   AND (t.table_oid IS NULL OR t.table_kind IS NULL OR t.table_owner IS NULL);
ALTER TABLE billing.resource_types ALTER COLUMN table_oid SET NOT NULL;
ALTER TABLE billing.resource_types ALTER COLUMN table_kind SET NOT NULL;
ALTER TABLE billing.resource_types ALTER COLUMN table_owner SET NOT NULL;
COMMENT ON TABLE billing.widget_tables IS 'Widget tables registered with billing.register_widget_table (plain tables public.widget_<type> with the required columns and a trusted owner are found without registration). table_oid, table_kind and table_owner are the relation as registered: a call that finds the oid gone or its kind or owner changed refuses (P0002) until the table is registered again; schema_name and table_name are its name at registration.';

CREATE OR REPLACE FUNCTION billing.register_widget_table(p_widget_type text, p_table regclass) RETURNS void
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

COMMENT ON FUNCTION billing.get_user_widgets_ordered(uuid, boolean) IS 'The user''s widgets across every widget table, ordered by position, then type, then id; data is the row as JSON, with the columns the reading role may SELECT. End users (anon too) read with their own role: the tables'' RLS and column grants decide which rows and columns they get (a table whose widget columns they cannot read is skipped). Service callers read each table as its owner (every row and column). Anyone may read active widgets; inactive ones (p_active_only = false) only the owner or a service caller.';

COMMENT ON FUNCTION billing.get_next_widget_position(uuid) IS 'The position for a new widget: the highest position over all the user''s widget tables + 1, 0 when none. End users: own only, read with their own role (RLS and grants apply); service callers: as each table''s owner.';

COMMENT ON FUNCTION billing.count_user_widgets_by_type(uuid, text) IS 'How many widgets of p_widget_type the user has, active or not (what the widgets_per_type limit counts). End users count the rows their own role may see (RLS applies; 42501 when it may not read user_id); service callers count as the table''s owner. Unknown type: 22023.';

COMMENT ON TABLE billing.resource_types IS 'Resource types registered with billing.register_resource: the table and user column to count, and the plan limits key. table_oid, table_kind and table_owner are the table as registered: a count that finds the oid gone or its kind or owner changed refuses (P0002) until the table is registered again; schema_name and table_name are its name at registration.';

CREATE OR REPLACE FUNCTION billing.register_resource(p_resource_type text, p_table regclass, p_user_column name DEFAULT 'user_id',
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

COMMENT ON FUNCTION billing.check_resource_limit(uuid, text) IS 'Counts the user''s rows in the table registered for p_resource_type (billing.register_resource) against the effective plan''s limit: allowed = unlimited (-1) or count < max. The count runs as the table''s owner on exactly the registered table (P0002 when it was dropped or replaced since). Unknown type: 22023 listing the known ones. End users: own only.';

COMMENT ON FUNCTION billing.migrate_single_pool(regclass, name, name, regclass) IS
'Service-only DBA function. Imports legacy single-pool balances: p_table has one balance per user (p_user_column uuid, p_balance_column integer/bigint/numeric; several rows of one user are summed). p_purchases, when given, is the legacy credit history (S4''s credit_transactions): a uuid user column (p_user_column when the history has a uuid column of that name, else user_id), amount, and type; rows with type = ''purchase'' and amount > 0 count as purchases. Each user gets purchased = least(balance, sum of purchases) and subscription = the rest, so no credits are created; an existing account gets them added. Ledger rows of type ''migration'' record the opening balances (verify_ledger stays empty). Each (user, table) is imported once (billing.legacy_imports), so re-running imports nothing twice. p_table and p_purchases are locked and read as their owners (never as the extension owner), so code in them (a view''s functions) runs with no more rights than its owner has. Returns the number of users imported.';

-- =============================================================================================
-- Checkout, sign-up and members: issue 10 item 3 (the sign-up trigger claims only confirmed
-- e-mails), issue 11 item 2 (a purchase never lowers what an account or member has), item 3
-- (pending profiles are keyed by purchase: e-mail, token, provider customer), item 4 for members
-- (plan changes within a period grant at most the highest plan's credits; usage is kept) and
-- item 8a (e-mails are normalised by lower-casing ASCII A-Z only, everywhere).
-- =============================================================================================

-- 11.8a: one e-mail normalisation. Stored e-mails were lower-cased with Unicode rules before;
-- they satisfy the new checks as they are (only ASCII letters must be lower case).
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_indexes AS i
                    WHERE i.schemaname = 'billing' AND i.indexname = 'accounts_email_idx'
                      AND i.indexdef LIKE '%translate(%') THEN
        DROP INDEX IF EXISTS billing.accounts_email_idx;
        CREATE INDEX accounts_email_idx ON billing.accounts (pg_catalog.translate(email, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz'));
    END IF;
END
$$;
ALTER TABLE billing.members DROP CONSTRAINT IF EXISTS members_email_check;
ALTER TABLE billing.members ADD CONSTRAINT members_email_check
    CHECK (email = pg_catalog.translate(email, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz'));
ALTER TABLE billing.member_emails DROP CONSTRAINT IF EXISTS member_emails_email_check;
ALTER TABLE billing.member_emails ADD CONSTRAINT member_emails_email_check
    CHECK (email = pg_catalog.translate(email, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz'));
ALTER TABLE billing.pending_profiles DROP CONSTRAINT IF EXISTS pending_profiles_email_check;
ALTER TABLE billing.pending_profiles ADD CONSTRAINT pending_profiles_email_check
    CHECK (email = pg_catalog.translate(email, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz'));

-- 11.3: one pending profile per purchase. The 0.2.0 rows are one per e-mail, so they satisfy
-- both new keys; the primary key (email, id) keeps the e-mail leading (distribution column).
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_constraint AS c
                    WHERE c.conrelid = 'billing.pending_profiles'::regclass
                      AND c.conname = 'pending_profiles_purchase_key') THEN
        ALTER TABLE billing.pending_profiles DROP CONSTRAINT pending_profiles_pkey;
        ALTER TABLE billing.pending_profiles ADD CONSTRAINT pending_profiles_pkey PRIMARY KEY (email, id);
        ALTER TABLE billing.pending_profiles ADD CONSTRAINT pending_profiles_purchase_key
            UNIQUE NULLS NOT DISTINCT (email, token, provider, provider_user_id);
    END IF;
END
$$;
COMMENT ON TABLE billing.pending_profiles IS 'Purchases made before the buyer had an account: one row per purchase, identified by e-mail (ASCII letters lower-cased, nothing else folded), checkout token and provider customer; claimed with claim_pending_profile (or by billing.handle_new_user when the e-mail is confirmed). Claimed rows are kept (claimed, claimed_by_user_id, claimed_at).';

-- 11.4 / 11.2 (members): what plans granted this period, and a downgrade scheduled for the next
-- renewal. Existing members are taken to have been granted their plan's credits this period.
-- (Added without a default, then filled, then given its default: ADD COLUMN ... DEFAULT would
-- leave a "missing value" in the catalog that a fresh install does not have.)
ALTER TABLE billing.members ADD COLUMN IF NOT EXISTS period_granted bigint;
UPDATE billing.members AS m
   SET period_granted = COALESCE((SELECT p.monthly_credits FROM billing.plans AS p WHERE p.plan_id = m.plan_id), 0)
 WHERE m.period_granted IS NULL;
ALTER TABLE billing.members ALTER COLUMN period_granted SET DEFAULT 0, ALTER COLUMN period_granted SET NOT NULL;
ALTER TABLE billing.members ADD COLUMN IF NOT EXISTS next_plan_id text;
COMMENT ON TABLE billing.member_emails IS 'E-mail of each member (ASCII letters lower-cased, nothing else folded) and its member_id; upsert_member is keyed by it.';
COMMENT ON FUNCTION billing.upsert_member(text, text, date, text) IS
'Service-only; the membership webhook. Creates or updates the member with this e-mail (trimmed, ASCII letters lower-cased, nothing else folded; an existing account with that e-mail becomes the member): plan and, when given, renewal date (default: one month from today''s date in UTC, whatever the session''s TimeZone). A new member gets the plan''s monthly_credits as the period''s subscription credits (an existing account''s pool is topped up to them, never lowered; extra credits stay). Never lowers what a member has: a plan with more (or as many) monthly credits takes effect at once and tops the pool up by the difference to the highest plan granted this period, so plan changes within one period never grant more than the highest plan''s credits; a plan with fewer credits is scheduled (scheduled_plan) and takes effect at the next renewal; usage is not reset by a plan change; an existing member''s renewal date only moves later (an earlier p_renewal_date is ignored, so the current period never gets shorter). Returns {member_id, email, plan, scheduled_plan, previous_plan, created, plan_changed, credits_granted, renewal_date, duplicate}. A repeated p_event_id changes nothing and returns the first result with duplicate = true. Unknown plan or malformed e-mail: 22023.';
COMMENT ON FUNCTION billing.reset_usage_for_due_members(date) IS
'Service-only; run daily. p_today defaults to today''s date in UTC (whatever the session''s TimeZone; renewal dates are UTC dates). For every member whose renewal_date <= p_today: applies a scheduled downgrade, renews the subscription pool to the plan''s monthly_credits (expiring the rest; extra credits stay), sets usage to 0 and moves renewal_date monthly past p_today (members several periods behind catch up in one step). Returns the number of members reset; re-running the same day resets nothing.';

-- 11.2 / 11.3: comments of the pending-profile functions (their C symbols are unchanged).
COMMENT ON FUNCTION billing.upsert_pending_profile(text, text, text, text, text, text, text, timestamptz, timestamptz, integer, text) IS
'Service-only; the checkout webhook for a buyer who may have no account. A purchase is identified by the e-mail (ASCII letters lower-cased, nothing else folded), p_token and (p_provider, p_provider_user_id). A new purchase is kept pending, {status: ''pending'', id}, even when an account has this e-mail: it reaches an account only when its buyer claims it (claim_pending_profile with the token, or the sign-up trigger once the e-mail is confirmed), so a stranger who types someone''s e-mail at checkout changes nothing of theirs. A repeat of a purchase that was claimed (same e-mail, token and provider customer) is applied to the account that claimed it, {status: ''applied_to_account'', id, user_id, credits_granted}: a later billing cycle grants the purchase''s credits; within the same cycle only an increase tops up the difference. Applying never lowers what the account has: its credits are added to the subscription pool (expiring at the later of the two cycle ends), the higher plan (by monthly_credits) of an active subscription is kept, and the later billing cycle is kept. Cycle end defaults to start + 30 days (monthly) or + 1 year (yearly), added in UTC whatever the session''s TimeZone (so is next_credit_renewal, at most start + 30 days); credits default to the plan''s monthly_credits. A repeated p_event_id returns the first result with duplicate = true.';
COMMENT ON FUNCTION billing.claim_pending_profile(uuid, text, text) IS
'Claim the unclaimed purchases of p_email (compared after lower-casing ASCII letters only) for account p_user_id: every unclaimed profile of that e-mail whose token is p_token or that has no token. The account gets their credits (added to the subscription pool), plan and billing cycle, and the e-mail; the account is created when missing. Applying never lowers what an existing account has: the higher plan (by monthly_credits) of an active subscription and the later billing cycle are kept. Returns {success, error, profile_id, profile_ids, credits_granted, ...}: error is one sentence when no profile exists, the token does not match, or every profile of the e-mail was claimed by another account. Claiming again by the same user succeeds and changes nothing (already_claimed = true). End users: their own p_user_id and the email claim of their JWT only.';

-- 10.3: the sign-up trigger claims only once the e-mail is confirmed. _on_new_user gains
-- p_claim (same C symbol: called with 0.2.0's two arguments it claims nothing).
DROP FUNCTION IF EXISTS billing._on_new_user(uuid, text);
CREATE OR REPLACE FUNCTION billing._on_new_user(p_user_id uuid, p_email text, p_claim boolean)
RETURNS jsonb LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pgb_on_new_user';
COMMENT ON FUNCTION billing._on_new_user(uuid, text, boolean) IS
'Internal, for billing.handle_new_user: creates the account of a new user with the free plan''s monthly_credits (once) and, when p_claim, claims the unclaimed pending profiles with the same e-mail. Returns {account_created, claimed}.';
REVOKE ALL ON FUNCTION billing._on_new_user(uuid, text, boolean) FROM PUBLIC;

CREATE OR REPLACE FUNCTION billing.handle_new_user() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_column text;
    v_on_insert boolean := false;
    v_arg text;
BEGIN
    FOREACH v_arg IN ARRAY COALESCE(TG_ARGV, ARRAY[]::text[]) LOOP
        IF v_arg = 'claim_on_insert' THEN
            v_on_insert := true;
        ELSE
            RAISE EXCEPTION 'billing.handle_new_user: unknown trigger argument %', pg_catalog.quote_literal(v_arg)
                USING ERRCODE = '22023', HINT = 'the only argument is ''claim_on_insert'', for a users table without email_confirmed_at or confirmed_at';
        END IF;
    END LOOP;
    -- The column that says the e-mail is confirmed: email_confirmed_at, else confirmed_at
    -- (Supabase has both; its confirmed_at is also set by a confirmed phone).
    SELECT a.attname::text INTO v_column
      FROM pg_catalog.pg_attribute AS a
     WHERE a.attrelid = TG_RELID AND a.attnum > 0 AND NOT a.attisdropped
       AND a.attname IN ('email_confirmed_at', 'confirmed_at')
     ORDER BY a.attname = 'email_confirmed_at' DESC
     LIMIT 1;
    IF TG_OP = 'INSERT' THEN
        IF v_column = 'email_confirmed_at' THEN
            PERFORM billing._on_new_user(NEW.id, NEW.email, NEW.email_confirmed_at IS NOT NULL);
        ELSIF v_column = 'confirmed_at' THEN
            PERFORM billing._on_new_user(NEW.id, NEW.email, NEW.confirmed_at IS NOT NULL);
        ELSE
            PERFORM billing._on_new_user(NEW.id, NEW.email, v_on_insert);
        END IF;
    ELSIF TG_OP = 'UPDATE' THEN
        -- Claims when the e-mail becomes confirmed (NULL -> a value), once.
        IF v_column = 'email_confirmed_at' THEN
            IF OLD.email_confirmed_at IS NULL AND NEW.email_confirmed_at IS NOT NULL THEN
                PERFORM billing._on_new_user(NEW.id, NEW.email, true);
            END IF;
        ELSIF v_column = 'confirmed_at' THEN
            IF OLD.confirmed_at IS NULL AND NEW.confirmed_at IS NOT NULL THEN
                PERFORM billing._on_new_user(NEW.id, NEW.email, true);
            END IF;
        END IF;
    END IF;
    RETURN NEW;
END
$$;
COMMENT ON FUNCTION billing.handle_new_user() IS
'Trigger function for a users table with columns id uuid and email text (Supabase auth.users). Supabase: CREATE TRIGGER on_auth_user_created AFTER INSERT OR UPDATE OF email_confirmed_at ON auth.users FOR EACH ROW EXECUTE FUNCTION billing.handle_new_user(); Every new row gets its account with the free plan''s credits. Pending profiles with the same e-mail are claimed only once the e-mail is confirmed: on INSERT when email_confirmed_at (or, in a table without it, confirmed_at) is already set, on UPDATE when it goes from NULL to a value; a second confirmation claims nothing more. A table with neither column claims on INSERT only when the trigger is created with the argument ''claim_on_insert'' (...EXECUTE FUNCTION billing.handle_new_user(''claim_on_insert'')), for tables whose e-mails are verified before the row is inserted.';

-- ===== grants: issue 10 item 7 (DBA functions for service_role), issue 11 items 5 (expose_rpc
-- never adopts another role's function), 7 (no billing rows for PUBLIC; no readable claim
-- tokens), 8(b) (bounded per-endpoint rate-limit counts: Rust; the comments here) and 8(c)
-- (cleanup_api_usage keeps at least one day). billing.apply_grants() at the end revokes and
-- re-grants every billing relation and API function, so it must run after every section that
-- creates or re-creates a table, view or API function: keep this section last (or call it again
-- at the end of the script).
ALTER TABLE billing.api_functions DROP CONSTRAINT IF EXISTS api_functions_access_check;
ALTER TABLE billing.api_functions ADD CONSTRAINT api_functions_access_check CHECK (access IN ('anon', 'rpc', 'service', 'dba'));
COMMENT ON TABLE billing.api_functions IS 'pg_billing''s functions and who may call each: anon, rpc (authenticated end users, on themselves), service, or dba (service callers; not exposed by billing.expose_rpc).';
INSERT INTO billing.api_functions (function_name, access) VALUES
    ('register_resource', 'dba'),
    ('register_widget_table', 'dba'),
    ('expose_rpc', 'dba'),
    ('unexpose_rpc', 'dba'),
    ('verify_ledger', 'dba')
ON CONFLICT (function_name) DO UPDATE SET access = EXCLUDED.access;

-- 11.8(b): the bounded per-endpoint counts, described where users read them.
COMMENT ON TABLE billing.api_usage IS 'API requests per user and UTC hour (check_api_rate_limit), with per-endpoint counts (at most 32 endpoints by name, keyed by their first 64 characters; further ones under (other)); cleanup_api_usage deletes old buckets.';
COMMENT ON FUNCTION billing.check_api_rate_limit(uuid, text) IS 'Counts one API request in the current UTC hour when the effective plan''s api_rate_limit_hourly allows it, in one statement (with limit N, exactly N concurrent callers are allowed). Returns what X-RateLimit-* headers need: allowed, limit_value (-1 unlimited), remaining, reset_at. The bucket counts requests per endpoint too: the first 32 distinct endpoints of the hour by name (their first 64 characters), any further one under (other); p_endpoint longer than 255 characters is 22023. End users: own only.';

CREATE OR REPLACE FUNCTION billing.api_catalog() RETURNS TABLE (function_name text, access text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT f.function_name, f.access FROM billing.api_functions AS f WHERE f.access <> 'dba' ORDER BY f.function_name
$$;
COMMENT ON FUNCTION billing.api_catalog() IS 'The functions billing.expose_rpc exposes and who may call each: anon, rpc (authenticated end users, on themselves) or service.';

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
    readable text[] := ARRAY['accounts', 'api_usage', 'credit_expiration_events', 'credit_transactions',
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

CREATE OR REPLACE FUNCTION billing.unexpose_rpc(p_schema text DEFAULT 'public') RETURNS integer
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

CREATE OR REPLACE FUNCTION billing.cleanup_api_usage(p_older_than interval DEFAULT '7 days') RETURNS integer
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT billing.check_retention('cleanup_api_usage', p_older_than, interval '1 day', NULL);
    WITH gone AS (DELETE FROM billing.api_usage AS a WHERE a.bucket_start < pg_catalog.now() - p_older_than RETURNING 1)
    SELECT pg_catalog.count(*)::integer FROM gone;
$$;
COMMENT ON FUNCTION billing.cleanup_api_usage(interval) IS 'Service-only maintenance: deletes API usage buckets older than p_older_than (default 7 days, at least 1 day: a shorter interval is 22023 and deletes nothing, so the current hour''s bucket is never deleted); returns rows deleted.';

-- 0.2.0 granted SELECT on these to PUBLIC; apply_grants() below revokes it from every billing
-- relation and grants SELECT to the end-user roles and service_role only.
REVOKE SELECT ON billing.plans FROM PUBLIC;
REVOKE SELECT ON billing.accounts FROM PUBLIC;
REVOKE SELECT ON billing.credit_transactions FROM PUBLIC;
REVOKE SELECT ON billing.credit_expiration_events FROM PUBLIC;
REVOKE SELECT ON billing.user_credits FROM PUBLIC;
REVOKE SELECT ON billing.members FROM PUBLIC;
REVOKE SELECT ON billing.member_overage FROM PUBLIC;
REVOKE SELECT ON billing.pending_profiles FROM PUBLIC;
REVOKE SELECT ON billing.legacy_imports FROM PUBLIC;
REVOKE SELECT ON billing.subscriptions FROM PUBLIC;
REVOKE SELECT ON billing.subscription_events FROM PUBLIC;
REVOKE SELECT ON billing.usage_metrics FROM PUBLIC;
REVOKE SELECT ON billing.api_usage FROM PUBLIC;
REVOKE SELECT ON billing.resource_types FROM PUBLIC;
REVOKE SELECT ON billing.widget_tables FROM PUBLIC;
SELECT billing.apply_grants();
-- ===== end of grants =====
