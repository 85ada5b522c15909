-- Pending profiles (SPEC 9, S3): a checkout without an account leaves a profile keyed by
-- e-mail; the buyer claims it after sign-up (or billing.handle_new_user claims it at sign-up).
-- Also the sign-up trigger function and the legacy single-pool import (SPEC 4).
-- Rust: src/api/pending_profiles.rs.

-- A global table keyed by the e-mail (like billing.webhook_events: the key is not a user's, so
-- user_id cannot lead it). One row per purchase: a purchase is identified by the e-mail, the
-- checkout token and the provider's customer (pending_profiles_purchase_key), so a later
-- purchase by another buyer of the same e-mail is a row of its own that its buyer claims
-- (issue 11 item 3). E-mails are normalised by lower-casing ASCII A-Z only (issue 11 item 8a).
-- Claimed rows are kept for audit.
CREATE TABLE billing.pending_profiles (
    email                  text NOT NULL
                           CONSTRAINT pending_profiles_email_check
                           CHECK (email = pg_catalog.translate(email, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz')),
    id                     uuid NOT NULL DEFAULT pg_catalog.gen_random_uuid(),
    token                  text,
    plan_id                text NOT NULL,
    provider               text,
    provider_user_id       text,
    provider_membership_id text,
    plan_duration          text NOT NULL DEFAULT 'monthly' CHECK (plan_duration IN ('monthly', 'yearly')),
    billing_cycle_start    timestamptz NOT NULL,
    billing_cycle_end      timestamptz NOT NULL,
    next_credit_renewal    timestamptz,
    credits                integer NOT NULL DEFAULT 0 CHECK (credits >= 0),
    used_credits           integer NOT NULL DEFAULT 0 CHECK (used_credits >= 0),
    claimed                boolean NOT NULL DEFAULT false,
    claimed_by_user_id     uuid,
    claimed_at             timestamptz,
    created_at             timestamptz NOT NULL DEFAULT pg_catalog.now(),
    updated_at             timestamptz NOT NULL DEFAULT pg_catalog.now(),
    CHECK (claimed = (claimed_by_user_id IS NOT NULL)),
    CHECK (billing_cycle_end >= billing_cycle_start),
    CONSTRAINT pending_profiles_pkey PRIMARY KEY (email, id),
    CONSTRAINT pending_profiles_purchase_key UNIQUE NULLS NOT DISTINCT (email, token, provider, provider_user_id)
);
-- id is random (gen_random_uuid); it is indexed for delete_pending_profile but not declared
-- unique on its own, so the table can be distributed by e-mail when scaled out.
CREATE INDEX pending_profiles_id_idx ON billing.pending_profiles (id);
CREATE INDEX pending_profiles_unclaimed_idx ON billing.pending_profiles (created_at) WHERE NOT claimed;
COMMENT ON TABLE billing.pending_profiles IS 'Purchases made before the buyer had an account: one row per purchase, identified by e-mail (ASCII letters lower-cased, nothing else folded), checkout token and provider customer; claimed with claim_pending_profile (or by billing.handle_new_user when the e-mail is confirmed). Claimed rows are kept (claimed, claimed_by_user_id, claimed_at).';

-- Legacy single-pool imports (billing.migrate_single_pool): one row per user and source table.
CREATE TABLE billing.legacy_imports (
    user_id              uuid NOT NULL,
    source_table         text NOT NULL,
    legacy_balance       bigint NOT NULL,
    purchases_sum        bigint NOT NULL,
    subscription_credits bigint NOT NULL,
    purchased_credits    bigint NOT NULL,
    imported_at          timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (user_id, source_table)
);
COMMENT ON TABLE billing.legacy_imports IS 'What billing.migrate_single_pool imported for each user from each legacy table, so re-running it imports nothing twice.';

SELECT pg_catalog.pg_extension_config_dump('billing.pending_profiles', '');
SELECT pg_catalog.pg_extension_config_dump('billing.legacy_imports', '');
ALTER TABLE billing.pending_profiles ENABLE ROW LEVEL SECURITY;
ALTER TABLE billing.legacy_imports ENABLE ROW LEVEL SECURITY;
-- End users see the profiles they claimed; unclaimed ones (with tokens) only service callers.
CREATE POLICY pending_profiles_read_own ON billing.pending_profiles FOR SELECT
    USING (claimed_by_user_id = (SELECT billing.current_user_id()));
CREATE POLICY legacy_imports_read_own ON billing.legacy_imports FOR SELECT
    USING (user_id = (SELECT billing.current_user_id()));
-- SELECT on billing.pending_profiles (never its token), billing.legacy_imports: billing.apply_grants() (end-user roles and service_role only).

INSERT INTO billing.api_functions (function_name, access) VALUES
    ('upsert_pending_profile', 'service'),
    ('claim_pending_profile', 'rpc'),
    ('get_unclaimed_pending_profiles', 'service'),
    ('delete_pending_profile', 'service');

CREATE FUNCTION billing.upsert_pending_profile(p_email text, p_token text DEFAULT NULL, p_plan_id text DEFAULT 'pro',
                                               p_provider text DEFAULT NULL, p_provider_user_id text DEFAULT NULL,
                                               p_provider_membership_id text DEFAULT NULL,
                                               p_plan_duration text DEFAULT 'monthly',
                                               p_billing_cycle_start timestamptz DEFAULT now(),
                                               p_billing_cycle_end timestamptz DEFAULT NULL,
                                               p_credits integer DEFAULT NULL, p_event_id text DEFAULT NULL)
RETURNS jsonb LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pgb_upsert_pending_profile';
COMMENT ON FUNCTION billing.upsert_pending_profile(text, text, text, text, text, text, text, timestamptz, timestamptz, integer, text) IS
'Service-only; the checkout webhook for a buyer who may have no account. A purchase is identified by the e-mail (ASCII letters lower-cased, nothing else folded), p_token and (p_provider, p_provider_user_id). A new purchase is kept pending, {status: ''pending'', id}, even when an account has this e-mail: it reaches an account only when its buyer claims it (claim_pending_profile with the token, or the sign-up trigger once the e-mail is confirmed), so a stranger who types someone''s e-mail at checkout changes nothing of theirs. A repeat of a purchase that was claimed (same e-mail, token and provider customer) is applied to the account that claimed it, {status: ''applied_to_account'', id, user_id, credits_granted}: a later billing cycle grants the purchase''s credits; within the same cycle only an increase tops up the difference. Applying never lowers what the account has: its credits are added to the subscription pool (expiring at the later of the two cycle ends), the higher plan (by monthly_credits) of an active subscription is kept, and the later billing cycle is kept. Cycle end defaults to start + 30 days (monthly) or + 1 year (yearly), added in UTC whatever the session''s TimeZone (so is next_credit_renewal, at most start + 30 days); credits default to the plan''s monthly_credits. A repeated p_event_id returns the first result with duplicate = true.';

CREATE FUNCTION billing.claim_pending_profile(p_user_id uuid, p_email text, p_token text DEFAULT NULL)
RETURNS jsonb LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pgb_claim_pending_profile';
COMMENT ON FUNCTION billing.claim_pending_profile(uuid, text, text) IS
'Claim the unclaimed purchases of p_email (compared after lower-casing ASCII letters only) for account p_user_id: every unclaimed profile of that e-mail whose token is p_token or that has no token. The account gets their credits (added to the subscription pool), plan and billing cycle, and the e-mail; the account is created when missing. Applying never lowers what an existing account has: the higher plan (by monthly_credits) of an active subscription and the later billing cycle are kept. Returns {success, error, profile_id, profile_ids, credits_granted, ...}: error is one sentence when no profile exists, the token does not match, or every profile of the e-mail was claimed by another account. Claiming again by the same user succeeds and changes nothing (already_claimed = true). End users: their own p_user_id and the email claim of their JWT only.';

CREATE FUNCTION billing.get_unclaimed_pending_profiles()
RETURNS SETOF billing.pending_profiles
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT billing.require_service('get_unclaimed_pending_profiles');
    SELECT p.* FROM billing.pending_profiles AS p WHERE NOT p.claimed ORDER BY p.created_at, p.email
$$;
COMMENT ON FUNCTION billing.get_unclaimed_pending_profiles() IS
'Service-only. The pending profiles nobody has claimed yet, oldest first.';

CREATE FUNCTION billing.delete_pending_profile(p_id uuid)
RETURNS boolean LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pgb_delete_pending_profile';
COMMENT ON FUNCTION billing.delete_pending_profile(uuid) IS
'Service-only. Delete the pending profile with id p_id (claimed or not); true when one was deleted, false when none has that id.';

-- Sign-up: account with the free plan's credits; the pending profiles of the same e-mail are
-- claimed only once the e-mail is confirmed (issue 10 item 3). Not in api_functions: only the
-- trigger calls it.
CREATE FUNCTION billing._on_new_user(p_user_id uuid, p_email text, p_claim boolean)
RETURNS jsonb LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pgb_on_new_user';
COMMENT ON FUNCTION billing._on_new_user(uuid, text, boolean) IS
'Internal, for billing.handle_new_user: creates the account of a new user with the free plan''s monthly_credits (once) and, when p_claim, claims the unclaimed pending profiles with the same e-mail. Returns {account_created, claimed}.';

CREATE FUNCTION billing.handle_new_user() RETURNS trigger
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

-- Legacy single-pool import (SPEC 4, S4). Not in api_functions: a DBA function (EXECUTE only
-- for the owner), and service-only inside as well.
CREATE FUNCTION billing._migrate_single_pool(p_table oid, p_user_column text, p_balance_column text, p_purchases oid)
RETURNS integer LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pgb_migrate_single_pool';
COMMENT ON FUNCTION billing._migrate_single_pool(oid, text, text, oid) IS
'Internal: the body of billing.migrate_single_pool.';

CREATE FUNCTION billing.migrate_single_pool(p_table regclass, p_user_column name, p_balance_column name,
                                            p_purchases regclass DEFAULT NULL)
RETURNS integer LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN billing._migrate_single_pool(p_table::oid, p_user_column::text, p_balance_column::text, p_purchases::oid);
END
$$;
COMMENT ON FUNCTION billing.migrate_single_pool(regclass, name, name, regclass) IS
'Service-only DBA function. Imports legacy single-pool balances: p_table has one balance per user (p_user_column uuid, p_balance_column integer/bigint/numeric; several rows of one user are summed). p_purchases, when given, is the legacy credit history (S4''s credit_transactions): a uuid user column (p_user_column when the history has a uuid column of that name, else user_id), amount, and type; rows with type = ''purchase'' and amount > 0 count as purchases. Each user gets purchased = least(balance, sum of purchases) and subscription = the rest, so no credits are created; an existing account gets them added. Ledger rows of type ''migration'' record the opening balances (verify_ledger stays empty). Each (user, table) is imported once (billing.legacy_imports), so re-running imports nothing twice. p_table and p_purchases are locked and read as their owners (never as the extension owner), so code in them (a view''s functions) runs with no more rights than its owner has. Returns the number of users imported.';
