-- pg_billing 0.2.0 -> 0.3.0: the review fixes (issue 10) and the security fixes (issue 11).
--
-- Idempotent (SPEC 12: Citus may run an upgrade script on every node): every statement may run
-- again on a database that has it already. tests/stress/upgrade.py runs this file a second time
-- after ALTER EXTENSION ... UPDATE and checks nothing changed, and compares the upgraded catalog
-- with a fresh 0.3.0 install.
--
-- Each section below names the issue items it carries.
\echo Use "ALTER EXTENSION pg_billing UPDATE TO '0.3.0'" to load this file. \quit


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
