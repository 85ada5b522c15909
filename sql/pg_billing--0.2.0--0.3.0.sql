-- pg_billing 0.2.0 -> 0.3.0: the review fixes (issue 10) and the security fixes (issue 11).
--
-- Idempotent (SPEC 12: Citus may run an upgrade script on every node): every statement may run
-- again on a database that has it already. tests/stress/upgrade.py runs this file a second time
-- after ALTER EXTENSION ... UPDATE and checks nothing changed, and compares the upgraded catalog
-- with a fresh 0.3.0 install.
--
-- Each section below names the issue items it carries.
\echo Use "ALTER EXTENSION pg_billing UPDATE TO '0.3.0'" to load this file. \quit


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
