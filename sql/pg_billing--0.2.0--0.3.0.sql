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
CREATE OR REPLACE VIEW billing.user_credits WITH (security_invoker = true) AS
SELECT a.user_id,
       CASE WHEN a.subscription_credits_expire_at <= pg_catalog.now() THEN 0
            ELSE a.subscription_credits_balance END AS subscription_credits_balance,
       a.purchased_credits_balance,
       CASE WHEN a.subscription_credits_expire_at <= pg_catalog.now() THEN 0
            ELSE a.subscription_credits_balance END + a.purchased_credits_balance AS total_balance
  FROM billing.accounts AS a;
COMMENT ON VIEW billing.user_credits IS 'Each account''s two pools and their total; subscription credits past their expiry count as 0. Row security applies: end users see their own row.';

CREATE OR REPLACE FUNCTION billing.get_user_credits(p_user_id uuid)
RETURNS TABLE (user_id uuid, subscription_credits_balance bigint, purchased_credits_balance bigint, total_balance bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT billing.authorize_user(p_user_id);
    SELECT p_user_id,
           COALESCE(c.subscription_credits_balance, 0),
           COALESCE(c.purchased_credits_balance, 0),
           COALESCE(c.total_balance, 0)
      FROM (SELECT 1) AS one
      LEFT JOIN billing.user_credits AS c ON c.user_id = p_user_id
$$;
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
