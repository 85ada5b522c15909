-- Issue 10 item 8: every billing date is computed in UTC, whatever the session's TimeZone.
-- Pacific/Kiritimati (UTC+14) and Pacific/Pago_Pago (UTC-11) are 25 hours apart: at any instant
-- their local dates differ, and at least one of them differs from the UTC date. In 0.2.0 members
-- created at the same instant in the two zones got different renewal dates (CURRENT_DATE), the
-- default reset date followed the session's zone, and a yearly cycle from Feb 28 ended a day
-- early in Kiritimati and a 1-day grace period lasted 23 hours across a daylight-saving change
-- (timestamptz + interval steps days and months in the session's zone).
-- Helpers live in schema tests, not pg_temp: on a Citus cluster a query that calls one may run on a worker.
CREATE SCHEMA tests;
GRANT USAGE ON SCHEMA tests TO PUBLIC;
BEGIN;
SET LOCAL DateStyle = 'ISO, YMD';
-- utc_today(): the UTC date of this transaction's instant (now() does not move within it).
CREATE FUNCTION tests.utc_today() RETURNS date LANGUAGE sql AS $f$
    SELECT (now() AT TIME ZONE 'UTC')::date
$f$;
-- rel(d): a date relative to today in UTC.
CREATE FUNCTION tests.rel(d date) RETURNS text LANGUAGE sql AS $f$
    SELECT CASE d WHEN tests.utc_today() THEN 'today'
                  WHEN tests.utc_today() + 1 THEN 'tomorrow'
                  WHEN (tests.utc_today() + interval '1 month')::date THEN 'today + 1 month'
                  WHEN (tests.utc_today() + 1 - interval '1 month')::date THEN 'tomorrow - 1 month'
                  ELSE 'today + ' || (d - tests.utc_today()) || ' days' END
$f$;
-- m(email): a member's dates, and whether its credits expire at 00:00 UTC of its renewal date.
CREATE FUNCTION tests.m(p_email text) RETURNS text LANGUAGE plpgsql AS $f$
BEGIN RETURN (
    SELECT format('renewal=%s start=%s credits_expire_at_utc_midnight_of_renewal=%s',
                  tests.rel(m.renewal_date), tests.rel(m.period_start),
                  a.subscription_credits_expire_at = (m.renewal_date::timestamp AT TIME ZONE 'UTC'))
      FROM billing.members AS m JOIN billing.accounts AS a ON a.user_id = m.user_id
     WHERE m.email = p_email);
END
$f$;
SELECT (now() AT TIME ZONE 'Pacific/Kiritimati')::date <> (now() AT TIME ZONE 'Pacific/Pago_Pago')::date AS local_dates_differ;

-- ===== upsert_member without a renewal date: one month from today in UTC, in every zone =====
SET LOCAL TimeZone = 'Pacific/Kiritimati';
SELECT r ->> 'renewal_date' = to_char(tests.utc_today() + interval '1 month', 'YYYY-MM-DD') AS east_renews_a_utc_month_from_today
  FROM billing.upsert_member('tz-east@example.com', 'pro') AS r;
SET LOCAL TimeZone = 'Pacific/Pago_Pago';
SELECT r ->> 'renewal_date' = to_char(tests.utc_today() + interval '1 month', 'YYYY-MM-DD') AS west_renews_a_utc_month_from_today
  FROM billing.upsert_member('tz-west@example.com', 'pro') AS r;
SET LOCAL TimeZone = 'UTC';
SELECT e.renewal_date = w.renewal_date AS same_renewal, e.period_start = w.period_start AS same_period_start,
       e.anchor_day = w.anchor_day AS same_anchor
  FROM (SELECT * FROM billing.members WHERE email = 'tz-east@example.com') AS e
  JOIN (SELECT * FROM billing.members WHERE email = 'tz-west@example.com') AS w ON true;
SELECT tests.m('tz-east@example.com') AS east, tests.m('tz-west@example.com') AS west;

-- ===== reset_usage_for_due_members(): p_today defaults to today in UTC, in every zone =====
SELECT (billing.upsert_member('tz-due@example.com', 'pro', tests.utc_today())) ->> 'created' AS due_created;
SELECT (billing.upsert_member('tz-tomorrow@example.com', 'pro', tests.utc_today() + 1)) ->> 'created' AS tomorrow_created;
SAVEPOINT before_reset;
SET LOCAL TimeZone = 'Pacific/Kiritimati';
SELECT billing.reset_usage_for_due_members() >= 1 AS east_reset_ran;
SET LOCAL TimeZone = 'UTC';
-- the member due today (UTC) moved a month on; the one due tomorrow did not
SELECT tests.m('tz-due@example.com') AS due_after_east_reset, tests.m('tz-tomorrow@example.com') AS tomorrow_after_east_reset;
ROLLBACK TO SAVEPOINT before_reset;
SET LOCAL TimeZone = 'Pacific/Pago_Pago';
SELECT billing.reset_usage_for_due_members() >= 1 AS west_reset_ran;
SET LOCAL TimeZone = 'UTC';
SELECT tests.m('tz-due@example.com') AS due_after_west_reset, tests.m('tz-tomorrow@example.com') AS tomorrow_after_west_reset;
-- the default is the UTC date (the function's signature)
SELECT pg_get_function_arguments('billing.reset_usage_for_due_members(date)'::regprocedure) AS reset_arguments;

-- ===== pending profiles: the cycle's length is added in UTC =====
-- 2024-02-28 12:00 UTC is Feb 29 02:00 in Kiritimati and Feb 28 01:00 in Pago Pago; a year on is
-- 2025-02-28 12:00 UTC in both (0.2.0: 2025-02-27 12:00 UTC from Kiritimati).
SET LOCAL TimeZone = 'Pacific/Kiritimati';
SELECT billing.upsert_pending_profile('tz-pp-east@example.com', p_plan_duration => 'yearly',
                                      p_billing_cycle_start => '2024-02-28 12:00+00') ->> 'status' AS east_status;
SET LOCAL TimeZone = 'Pacific/Pago_Pago';
SELECT billing.upsert_pending_profile('tz-pp-west@example.com', p_plan_duration => 'yearly',
                                      p_billing_cycle_start => '2024-02-28 12:00+00') ->> 'status' AS west_status;
-- 30 days across a daylight-saving change are 720 hours (0.2.0 in New York: 719)
SET LOCAL TimeZone = 'America/New_York';
SELECT billing.upsert_pending_profile('tz-pp-dst@example.com', p_billing_cycle_start => '2024-03-01 12:00+00') ->> 'status' AS dst_status;
SET LOCAL TimeZone = 'UTC';
SELECT p.email, p.plan_duration, p.billing_cycle_start, p.billing_cycle_end, p.next_credit_renewal
  FROM billing.pending_profiles AS p WHERE p.email LIKE 'tz-pp-%' ORDER BY p.email;

-- ===== effective_plan_id: the grace period is added in UTC =====
-- A zone (POSIX rule) that sprang forward an hour 12 hours ago: there the local day that holds
-- the change is 23 hours long. A canceled period that ended 23h30m ago with a 1-day grace is
-- still in grace (24 hours); 0.2.0 added a local day (23 hours) and said free.
SET LOCAL pg_billing.grace_period = '1 day';
DO $$
DECLARE t timestamp := date_trunc('hour', (now() AT TIME ZONE 'UTC') - interval '12 hours');
        n integer := extract(doy FROM t)::integer - 1;
BEGIN
    EXECUTE format('SET LOCAL TimeZone = %L',
                   format('XST0XDT,%s/%s,%s/0', n, extract(hour FROM t), (n + 180) % 365));
END
$$;
SELECT (extract(epoch FROM (now() - interval '23 hours 30 minutes') + interval '1 day' - now()) / 60)::integer AS local_day_after_the_end_minus_now_minutes;
SELECT billing.effective_plan_id('pro', 'canceled', now() - interval '23 hours 30 minutes', NULL, NULL) AS ended_23h30m_ago,
       billing.effective_plan_id('pro', 'canceled', now() - interval '24 hours 30 minutes', NULL, NULL) AS ended_24h30m_ago,
       billing.effective_plan_id('pro', 'trialing', NULL, now() - interval '23 hours 30 minutes', NULL) AS trial_ended_23h30m_ago;
SET LOCAL TimeZone = 'UTC';

-- the ledger matches every balance
SELECT * FROM billing.verify_ledger();
ROLLBACK;
SET client_min_messages = warning;
DROP SCHEMA tests CASCADE;
RESET client_min_messages;
