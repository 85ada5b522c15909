-- Pending profiles (SPEC 9, S3) and the sign-up trigger billing.handle_new_user (SPEC 4):
-- upsert_pending_profile, claim_pending_profile (every outcome), get_unclaimed_pending_profiles,
-- delete_pending_profile, and their errors.
BEGIN;
SET LOCAL TimeZone = 'UTC';
SET LOCAL DateStyle = 'ISO, YMD';
CREATE FUNCTION pg_temp.err(p_sql text) RETURNS text LANGUAGE plpgsql AS $f$
DECLARE st text; msg text; det text; hnt text;
BEGIN
    EXECUTE p_sql;
    RETURN 'no error';
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL, hnt = PG_EXCEPTION_HINT;
    RETURN regexp_replace(st || ': ' || msg || COALESCE(' [' || NULLIF(det, '') || ']', '') || COALESCE(' (' || NULLIF(hnt, '') || ')', ''),
                          '(?!00000000-0000-0000-0000-)[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}',
                          '<uuid>', 'g');
END
$f$;
-- pp(email): a profile's state (no random ids, no timestamps of now()).
CREATE FUNCTION pg_temp.pp(p_email text) RETURNS text LANGUAGE sql AS $f$
    SELECT format('token=%s plan=%s provider=%s/%s/%s duration=%s cycle=%s..%s next_renewal=%s credits=%s used=%s claimed=%s by=%s claimed_at_set=%s',
                  p.token, p.plan_id, p.provider, p.provider_user_id, p.provider_membership_id, p.plan_duration,
                  p.billing_cycle_start, p.billing_cycle_end, p.next_credit_renewal, p.credits, p.used_credits,
                  p.claimed, p.claimed_by_user_id, p.claimed_at IS NOT NULL)
      FROM billing.pending_profiles AS p WHERE p.email = p_email
$f$;
-- acct(user): the account's e-mail, pools, ledger rows and subscription.
CREATE FUNCTION pg_temp.acct(p_user uuid) RETURNS text LANGUAGE sql AS $f$
    SELECT format('email=%s sub=%s pur=%s expire_at=%s ledger_rows=%s subscription=%s',
                  a.email, a.subscription_credits_balance, a.purchased_credits_balance, a.subscription_credits_expire_at,
                  (SELECT count(*) FROM billing.credit_transactions AS t WHERE t.user_id = p_user),
                  (SELECT format('%s/%s/%s/%s %s..%s', s.plan_id, s.status, s.provider, s.provider_subscription_id,
                                 s.current_period_start, s.current_period_end)
                     FROM billing.subscriptions AS s WHERE s.user_id = p_user))
      FROM (SELECT 1) AS one LEFT JOIN billing.accounts AS a ON a.user_id = p_user
$f$;
CREATE TEMP TABLE res (label text PRIMARY KEY, r jsonb);

-- ===== upsert_pending_profile: no account with the e-mail -> pending =====
INSERT INTO res SELECT 'bob', billing.upsert_pending_profile('  Bob@Example.COM', 'tok-bob', 'pro', 'whop', 'wu_1', 'mem_1',
                                                              'monthly', '2024-01-01 00:00+00', NULL, NULL, 'evt_pp_1')
RETURNING label, r - 'id' AS r;
SELECT (r ->> 'id')::uuid = (SELECT p.id FROM billing.pending_profiles AS p WHERE p.email = 'bob@example.com') AS id_matches
  FROM res WHERE label = 'bob';
-- cycle end: start + 30 days; credits: the plan's monthly_credits
SELECT pg_temp.pp('bob@example.com');
-- the same event again: the first result, nothing changes
SELECT billing.upsert_pending_profile('bob@example.com', 'other', 'ultra', p_event_id => 'evt_pp_1') - 'id' AS r;
SELECT pg_temp.pp('bob@example.com');
-- a new purchase for the same e-mail updates the pending profile (one row per e-mail)
SELECT billing.upsert_pending_profile('bob@example.com', 'tok-bob', 'premium', 'whop', 'wu_1', 'mem_2', 'yearly',
                                      '2024-02-01 00:00+00', NULL, 1500) - 'id' AS r;
SELECT pg_temp.pp('bob@example.com');
SELECT count(*) AS bob_rows FROM billing.pending_profiles WHERE email = 'bob@example.com';
-- defaults: plan pro, monthly, cycle starting now (no token: any claim with the e-mail works)
SELECT billing.upsert_pending_profile('erin@example.com') - 'id' AS r;
SELECT p.plan_id, p.plan_duration, p.token, p.credits, p.billing_cycle_end - p.billing_cycle_start AS cycle,
       p.billing_cycle_start = now() AS starts_now
  FROM billing.pending_profiles AS p WHERE p.email = 'erin@example.com';
-- an explicit cycle end and 0 credits
SELECT billing.upsert_pending_profile('frank@example.com', NULL, 'free', NULL, NULL, NULL, 'monthly',
                                      '2024-03-01 00:00+00', '2024-03-15 00:00+00', 0) - 'id' AS r;
SELECT pg_temp.pp('frank@example.com');
-- get_unclaimed_pending_profiles: every unclaimed row
SELECT email, plan_id, claimed FROM billing.get_unclaimed_pending_profiles() ORDER BY email;

-- ===== claim_pending_profile: every outcome =====
-- none found
SELECT billing.claim_pending_profile('00000000-0000-0000-0000-000000000901', 'nobody@example.com', 'x');
-- token mismatch (also: no token for a profile that has one); nothing changes
SELECT billing.claim_pending_profile('00000000-0000-0000-0000-000000000901', 'bob@example.com', 'wrong');
SELECT billing.claim_pending_profile('00000000-0000-0000-0000-000000000901', 'bob@example.com');
SELECT pg_temp.pp('bob@example.com');
SELECT pg_temp.acct('00000000-0000-0000-0000-000000000901');
-- success, creating the account: plan, credits (subscription), billing cycle, e-mail
INSERT INTO res SELECT 'bob_claim', billing.claim_pending_profile('00000000-0000-0000-0000-000000000901', 'BOB@example.com', 'tok-bob')
RETURNING label, r - 'profile_id' AS r;
SELECT (r ->> 'profile_id')::uuid = (SELECT p.id FROM billing.pending_profiles AS p WHERE p.email = 'bob@example.com') AS profile_id_matches
  FROM res WHERE label = 'bob_claim';
SELECT pg_temp.pp('bob@example.com');
SELECT pg_temp.acct('00000000-0000-0000-0000-000000000901');
SELECT t.type, t.pool, t.amount, t.balance_after FROM billing.credit_transactions AS t
 WHERE t.user_id = '00000000-0000-0000-0000-000000000901' ORDER BY t.id;
SELECT billing.get_effective_plan('00000000-0000-0000-0000-000000000901') AS effective_plan;
-- claimed again by the same user: success, nothing changes
SELECT billing.claim_pending_profile('00000000-0000-0000-0000-000000000901', 'bob@example.com', 'tok-bob') - 'profile_id' AS r;
SELECT pg_temp.acct('00000000-0000-0000-0000-000000000901');
-- claimed by another account
SELECT billing.claim_pending_profile('00000000-0000-0000-0000-000000000902', 'bob@example.com', 'tok-bob');
SELECT pg_temp.acct('00000000-0000-0000-0000-000000000902');
-- claimed rows are kept, and no longer listed as unclaimed
SELECT email FROM billing.get_unclaimed_pending_profiles() ORDER BY email;

-- merge into an existing account: its subscription pool is replaced, purchased credits stay,
-- its e-mail becomes the claimed one
SELECT billing.add_subscription_credits('00000000-0000-0000-0000-000000000903', 10) ->> 'total_balance' AS total;
SELECT billing.add_purchased_credits('00000000-0000-0000-0000-000000000903', 25) ->> 'total_balance' AS total;
SELECT billing.claim_pending_profile('00000000-0000-0000-0000-000000000903', 'erin@example.com') - 'profile_id' AS r;
SELECT pg_temp.acct('00000000-0000-0000-0000-000000000903') LIKE 'email=erin@example.com sub=500 pur=25 %' AS merged;
SELECT e.expired_amount FROM billing.credit_expiration_events AS e WHERE e.user_id = '00000000-0000-0000-0000-000000000903';

-- ===== upsert_pending_profile for an e-mail that has an account: applied directly =====
SELECT billing.upsert_pending_profile('Erin@example.com', NULL, 'ultra', 'stripe', NULL, 'sub_9', 'monthly',
                                      '2024-05-01 00:00+00', NULL, NULL, 'evt_pp_2') - 'id' AS r;
SELECT pg_temp.acct('00000000-0000-0000-0000-000000000903');
-- the profile row is kept as claimed by that account
SELECT pg_temp.pp('erin@example.com');
-- a purchase for a claimed profile whose account changed its e-mail goes to that account, which
-- keeps its new e-mail
UPDATE billing.accounts SET email = 'bob.new@example.com' WHERE user_id = '00000000-0000-0000-0000-000000000901';
SELECT billing.upsert_pending_profile('bob@example.com', 'tok-bob', 'pro', p_billing_cycle_start => '2024-06-01 00:00+00') - 'id' AS r;
SELECT pg_temp.acct('00000000-0000-0000-0000-000000000901');
SELECT pg_temp.pp('bob@example.com');

-- ===== handle_new_user: a Supabase-style users table =====
CREATE TABLE pg_temp.users (id uuid PRIMARY KEY, email text);
CREATE TRIGGER on_user_created AFTER INSERT ON pg_temp.users FOR EACH ROW EXECUTE FUNCTION billing.handle_new_user();
SELECT billing.upsert_pending_profile('grace@example.com', 'tok-g', 'premium', p_billing_cycle_start => '2024-07-01 00:00+00') - 'id' AS r;
-- a plain sign-up: the free plan's credits
INSERT INTO pg_temp.users VALUES ('00000000-0000-0000-0000-000000000911', 'Heidi@Example.com');
SELECT pg_temp.acct('00000000-0000-0000-0000-000000000911');
-- a sign-up with a pending profile's e-mail: claimed in the same transaction (no token needed:
-- the e-mail is the sign-up's)
INSERT INTO pg_temp.users VALUES ('00000000-0000-0000-0000-000000000912', 'grace@example.com');
SELECT pg_temp.acct('00000000-0000-0000-0000-000000000912');
SELECT pg_temp.pp('grace@example.com');
SELECT t.type, t.pool, t.amount, t.balance_after FROM billing.credit_transactions AS t
 WHERE t.user_id = '00000000-0000-0000-0000-000000000912' ORDER BY t.id;
-- no e-mail, or a malformed one: the account is created, nothing is claimed
INSERT INTO pg_temp.users VALUES ('00000000-0000-0000-0000-000000000913', NULL), ('00000000-0000-0000-0000-000000000914', 'Not An Email');
SELECT pg_temp.acct('00000000-0000-0000-0000-000000000913');
SELECT pg_temp.acct('00000000-0000-0000-0000-000000000914');
-- an account that already exists keeps its credits (no second free grant)
SELECT billing._on_new_user('00000000-0000-0000-0000-000000000911', 'heidi@example.com');
SELECT pg_temp.acct('00000000-0000-0000-0000-000000000911');
-- an e-mail whose profile another account claimed: nothing claimed
SELECT billing._on_new_user('00000000-0000-0000-0000-000000000915', 'bob@example.com');
SELECT pg_temp.pp('bob@example.com');

-- ===== delete_pending_profile =====
SELECT billing.delete_pending_profile((SELECT p.id FROM billing.pending_profiles AS p WHERE p.email = 'frank@example.com')) AS deleted;
SELECT billing.delete_pending_profile('00000000-0000-0000-0000-000000000999') AS deleted_unknown;
SELECT count(*) AS frank_rows FROM billing.pending_profiles WHERE email = 'frank@example.com';

-- ===== errors =====
SELECT pg_temp.err($$SELECT billing.upsert_pending_profile(NULL)$$);
SELECT pg_temp.err($$SELECT billing.upsert_pending_profile('nope')$$);
SELECT pg_temp.err($$SELECT billing.upsert_pending_profile('x@example.com', p_plan_id => 'gold')$$);
SELECT pg_temp.err($$SELECT billing.upsert_pending_profile('x@example.com', p_plan_duration => 'weekly')$$);
SELECT pg_temp.err($$SELECT billing.upsert_pending_profile('x@example.com', p_credits => -1)$$);
SELECT pg_temp.err($$SELECT billing.upsert_pending_profile('x@example.com', p_billing_cycle_start => '2024-02-01', p_billing_cycle_end => '2024-01-01')$$);
SELECT pg_temp.err($$SELECT billing.upsert_pending_profile('x@example.com', p_token => repeat('t', 256))$$);
SELECT count(*) AS no_profile_x FROM billing.pending_profiles WHERE email = 'x@example.com';
SELECT pg_temp.err($$SELECT billing.claim_pending_profile(NULL, 'bob@example.com')$$);
SELECT pg_temp.err($$SELECT billing.claim_pending_profile('00000000-0000-0000-0000-000000000901', NULL)$$);
SELECT pg_temp.err($$SELECT billing.claim_pending_profile('00000000-0000-0000-0000-000000000901', 'bob')$$);
SELECT pg_temp.err($$SELECT billing.delete_pending_profile(NULL)$$);
SELECT pg_temp.err($$SELECT billing._on_new_user(NULL, 'a@example.com')$$);

-- ===== end users =====
SELECT billing.upsert_pending_profile('ivan@example.com', 'tok-i', 'pro', p_billing_cycle_start => '2024-08-01 00:00+00') - 'id' AS r;
SET LOCAL ROLE authenticated;
SELECT set_config('request.jwt.claims', '{"sub":"00000000-0000-0000-0000-000000000921","role":"authenticated","email":"Ivan@Example.com"}', true) IS NOT NULL AS claims_set;
-- another user's id: 42501
SELECT pg_temp.err($$SELECT billing.claim_pending_profile('00000000-0000-0000-0000-000000000922', 'ivan@example.com', 'tok-i')$$);
-- an e-mail other than the JWT's: 42501
SELECT pg_temp.err($$SELECT billing.claim_pending_profile('00000000-0000-0000-0000-000000000921', 'bob@example.com', 'tok-bob')$$);
-- the service-only functions: 42501
SELECT pg_temp.err($$SELECT billing.upsert_pending_profile('ivan@example.com')$$);
SELECT pg_temp.err($$SELECT * FROM billing.get_unclaimed_pending_profiles()$$);
SELECT pg_temp.err($$SELECT billing.delete_pending_profile('00000000-0000-0000-0000-000000000999')$$);
-- own id and own e-mail (any case): claimed
SELECT billing.claim_pending_profile('00000000-0000-0000-0000-000000000921', 'ivan@example.com', 'tok-i') - 'profile_id' AS r;
-- row security: the user sees the profile they claimed, and only that one
SELECT email, claimed FROM billing.pending_profiles;
-- a JWT without an email claim cannot claim
SELECT set_config('request.jwt.claims', '{"sub":"00000000-0000-0000-0000-000000000921","role":"authenticated"}', true) IS NOT NULL AS claims_set;
SELECT pg_temp.err($$SELECT billing.claim_pending_profile('00000000-0000-0000-0000-000000000921', 'ivan@example.com', 'tok-i')$$);
RESET ROLE;
SELECT set_config('request.jwt.claims', '', true) = '' AS claims_cleared;
SELECT pg_temp.acct('00000000-0000-0000-0000-000000000921');

-- ===== catalog =====
SELECT f.function_name, f.access FROM billing.api_catalog() AS f
 WHERE f.function_name IN ('upsert_pending_profile', 'claim_pending_profile', 'get_unclaimed_pending_profiles',
                           'delete_pending_profile', 'handle_new_user', '_on_new_user')
 ORDER BY 1;
SELECT p.proname, has_function_privilege('authenticated', p.oid, 'EXECUTE') AS authenticated_may,
       has_function_privilege('anon', p.oid, 'EXECUTE') AS anon_may,
       obj_description(p.oid, 'pg_proc') IS NOT NULL AS documented
  FROM pg_proc AS p
 WHERE p.pronamespace = 'billing'::regnamespace
   AND p.proname IN ('upsert_pending_profile', 'claim_pending_profile', 'get_unclaimed_pending_profiles',
                     'delete_pending_profile', 'handle_new_user', '_on_new_user')
 ORDER BY 1;

SELECT * FROM billing.verify_ledger();
ROLLBACK;
