-- Pending profiles (SPEC 9, S3) and the sign-up trigger billing.handle_new_user (SPEC 4):
-- upsert_pending_profile, claim_pending_profile (every outcome), get_unclaimed_pending_profiles,
-- delete_pending_profile, and their errors.
-- Helpers live in schema tests, not pg_temp: on a Citus cluster a query that calls one may run on a worker.
CREATE SCHEMA tests;
GRANT USAGE ON SCHEMA tests TO PUBLIC;
-- single_node: false on a Citus cluster, where the sections marked 'single node only' are skipped
SELECT NOT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'citus') AS single_node \gset
BEGIN;
SET LOCAL TimeZone = 'UTC';
SET LOCAL DateStyle = 'ISO, YMD';
CREATE FUNCTION tests.err(p_sql text) RETURNS text LANGUAGE plpgsql AS $f$
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
CREATE FUNCTION tests.pp(p_email text) RETURNS text LANGUAGE plpgsql AS $f$
BEGIN RETURN (
    SELECT format('token=%s plan=%s provider=%s/%s/%s duration=%s cycle=%s..%s next_renewal=%s credits=%s used=%s claimed=%s by=%s claimed_at_set=%s',
                  p.token, p.plan_id, p.provider, p.provider_user_id, p.provider_membership_id, p.plan_duration,
                  p.billing_cycle_start, p.billing_cycle_end, p.next_credit_renewal, p.credits, p.used_credits,
                  p.claimed, p.claimed_by_user_id, p.claimed_at IS NOT NULL)
      FROM billing.pending_profiles AS p WHERE p.email = p_email);
END
$f$;
-- acct(user): the account's e-mail, pools, ledger rows and subscription.
CREATE FUNCTION tests.acct(p_user uuid) RETURNS text LANGUAGE plpgsql AS $f$
BEGIN RETURN (
    SELECT format('email=%s sub=%s pur=%s expire_at=%s ledger_rows=%s subscription=%s',
                  a.email, a.subscription_credits_balance, a.purchased_credits_balance, a.subscription_credits_expire_at,
                  (SELECT count(*) FROM billing.credit_transactions AS t WHERE t.user_id = p_user),
                  (SELECT format('%s/%s/%s/%s %s..%s', s.plan_id, s.status, s.provider, s.provider_subscription_id,
                                 s.current_period_start, s.current_period_end)
                     FROM billing.subscriptions AS s WHERE s.user_id = p_user))
      FROM (SELECT 1) AS one LEFT JOIN billing.accounts AS a ON a.user_id = p_user);
END
$f$;
CREATE TEMP TABLE res (label text PRIMARY KEY, r jsonb);

-- ===== upsert_pending_profile: no account with the e-mail -> pending =====
INSERT INTO res SELECT 'bob', billing.upsert_pending_profile('  Bob@Example.COM', 'tok-bob', 'pro', 'whop', 'wu_1', 'mem_1',
                                                              'monthly', '2024-01-01 00:00+00', NULL, NULL, 'evt_pp_1')
RETURNING label, r - 'id' AS r;
SELECT (r ->> 'id')::uuid = (SELECT p.id FROM billing.pending_profiles AS p WHERE p.email = 'bob@example.com') AS id_matches
  FROM res WHERE label = 'bob';
-- cycle end: start + 30 days; credits: the plan's monthly_credits
SELECT tests.pp('bob@example.com');
-- the same event again: the first result, nothing changes
SELECT billing.upsert_pending_profile('bob@example.com', 'other', 'ultra', p_event_id => 'evt_pp_1') - 'id' AS r;
SELECT tests.pp('bob@example.com');
-- the same purchase again (same e-mail, token and provider customer) updates its pending
-- profile: one row per purchase
SELECT billing.upsert_pending_profile('bob@example.com', 'tok-bob', 'premium', 'whop', 'wu_1', 'mem_2', 'yearly',
                                      '2024-02-01 00:00+00', NULL, 1500) - 'id' AS r;
SELECT tests.pp('bob@example.com');
SELECT count(*) AS bob_rows FROM billing.pending_profiles WHERE email = 'bob@example.com';
-- defaults: plan pro, monthly, cycle starting now (no token: any claim with the e-mail works)
SELECT billing.upsert_pending_profile('erin@example.com') - 'id' AS r;
-- (now() read here: in a query on a Citus cluster's worker, now() is the worker's transaction start)
SELECT now() AS tx_now \gset
SELECT p.plan_id, p.plan_duration, p.token, p.credits, p.billing_cycle_end - p.billing_cycle_start AS cycle,
       p.billing_cycle_start = :'tx_now' AS starts_now
  FROM billing.pending_profiles AS p WHERE p.email = 'erin@example.com';
-- an explicit cycle end and 0 credits
SELECT billing.upsert_pending_profile('frank@example.com', NULL, 'free', NULL, NULL, NULL, 'monthly',
                                      '2024-03-01 00:00+00', '2024-03-15 00:00+00', 0) - 'id' AS r;
SELECT tests.pp('frank@example.com');
-- get_unclaimed_pending_profiles: every unclaimed row
SELECT email, plan_id, claimed FROM billing.get_unclaimed_pending_profiles() ORDER BY email;

-- ===== claim_pending_profile: every outcome =====
-- none found
SELECT billing.claim_pending_profile('00000000-0000-0000-0000-000000000901', 'nobody@example.com', 'x');
-- token mismatch (also: no token for a profile that has one); nothing changes
SELECT billing.claim_pending_profile('00000000-0000-0000-0000-000000000901', 'bob@example.com', 'wrong');
SELECT billing.claim_pending_profile('00000000-0000-0000-0000-000000000901', 'bob@example.com');
SELECT tests.pp('bob@example.com');
SELECT tests.acct('00000000-0000-0000-0000-000000000901');
-- success, creating the account: plan, credits (subscription), billing cycle, e-mail
INSERT INTO res SELECT 'bob_claim', billing.claim_pending_profile('00000000-0000-0000-0000-000000000901', 'BOB@example.com', 'tok-bob')
RETURNING label, r - 'profile_id' - 'profile_ids' AS r;
SELECT r -> 'profile_ids' = jsonb_build_array(r -> 'profile_id') AS one_profile_claimed FROM res WHERE label = 'bob_claim';
SELECT (r ->> 'profile_id')::uuid = (SELECT p.id FROM billing.pending_profiles AS p WHERE p.email = 'bob@example.com') AS profile_id_matches
  FROM res WHERE label = 'bob_claim';
SELECT tests.pp('bob@example.com');
SELECT tests.acct('00000000-0000-0000-0000-000000000901');
SELECT t.type, t.pool, t.amount, t.balance_after FROM billing.credit_transactions AS t
 WHERE t.user_id = '00000000-0000-0000-0000-000000000901' ORDER BY t.id;
SELECT billing.get_effective_plan('00000000-0000-0000-0000-000000000901') AS effective_plan;
-- claimed again by the same user: success, nothing changes
SELECT billing.claim_pending_profile('00000000-0000-0000-0000-000000000901', 'bob@example.com', 'tok-bob') - 'profile_id' AS r;
SELECT tests.acct('00000000-0000-0000-0000-000000000901');
-- claimed by another account
SELECT billing.claim_pending_profile('00000000-0000-0000-0000-000000000902', 'bob@example.com', 'tok-bob');
SELECT tests.acct('00000000-0000-0000-0000-000000000902');
-- claimed rows are kept, and no longer listed as unclaimed
SELECT email FROM billing.get_unclaimed_pending_profiles() ORDER BY email;

-- merge into an existing account: the purchase's credits are added to its subscription pool
-- (nothing expires, issue 11 item 2), purchased credits stay, its e-mail becomes the claimed one
SELECT billing.add_subscription_credits('00000000-0000-0000-0000-000000000903', 10) ->> 'total_balance' AS total;
SELECT billing.add_purchased_credits('00000000-0000-0000-0000-000000000903', 25) ->> 'total_balance' AS total;
SELECT billing.claim_pending_profile('00000000-0000-0000-0000-000000000903', 'erin@example.com') - 'profile_id' - 'profile_ids' AS r;
SELECT tests.acct('00000000-0000-0000-0000-000000000903') LIKE 'email=erin@example.com sub=510 pur=25 %' AS merged;
SELECT count(*) AS expirations FROM billing.credit_expiration_events AS e WHERE e.user_id = '00000000-0000-0000-0000-000000000903';

-- ===== upsert_pending_profile for an e-mail that has an account: a new purchase stays pending =====
-- (issue 11 item 2: the typed e-mail is not proof of who bought; the buyer claims it)
SELECT billing.upsert_pending_profile('Erin@example.com', NULL, 'ultra', 'stripe', NULL, 'sub_9', 'monthly',
                                      '2024-05-01 00:00+00', NULL, NULL, 'evt_pp_2') - 'id' AS r;
-- 903 keeps its pool and plan (0.2.0: ultra with 10000 applied at once)
SELECT a.subscription_credits_balance, s.plan_id FROM billing.accounts AS a JOIN billing.subscriptions AS s USING (user_id)
 WHERE a.user_id = '00000000-0000-0000-0000-000000000903';
-- two rows for erin now: the purchase 903 claimed and the new one, pending
SELECT p.plan_id, p.provider, p.claimed, p.claimed_by_user_id FROM billing.pending_profiles AS p
 WHERE p.email = 'erin@example.com' ORDER BY p.claimed DESC;
-- a repeat of a claimed purchase (same token and provider customer) goes to the account that
-- claimed it, which keeps its new e-mail; a later cycle grants its credits (added)
UPDATE billing.accounts SET email = 'bob.new@example.com' WHERE user_id = '00000000-0000-0000-0000-000000000901';
SELECT billing.upsert_pending_profile('bob@example.com', 'tok-bob', 'pro', 'whop', 'wu_1', p_billing_cycle_start => '2024-06-01 00:00+00') - 'id' AS r;
SELECT tests.acct('00000000-0000-0000-0000-000000000901');
SELECT tests.pp('bob@example.com');
-- the same cycle again (a repeated webhook): nothing more
SELECT billing.upsert_pending_profile('bob@example.com', 'tok-bob', 'pro', 'whop', 'wu_1', p_billing_cycle_start => '2024-06-01 00:00+00') - 'id' AS r;
SELECT tests.acct('00000000-0000-0000-0000-000000000901');

-- ===== handle_new_user: a Supabase-style users table (issue 10 item 3) =====
CREATE TABLE pg_temp.users (id uuid PRIMARY KEY, email text, email_confirmed_at timestamptz, confirmed_at timestamptz);
CREATE TRIGGER on_user_created AFTER INSERT OR UPDATE OF email_confirmed_at ON pg_temp.users
    FOR EACH ROW EXECUTE FUNCTION billing.handle_new_user();
SELECT billing.upsert_pending_profile('grace@example.com', 'tok-g', 'premium', p_billing_cycle_start => '2024-07-01 00:00+00') - 'id' AS r;
-- a plain sign-up: the free plan's credits
INSERT INTO pg_temp.users VALUES ('00000000-0000-0000-0000-000000000911', 'Heidi@Example.com');
SELECT tests.acct('00000000-0000-0000-0000-000000000911');
-- a sign-up with a pending profile's e-mail, not confirmed yet (Supabase inserts the row with
-- email_confirmed_at NULL; confirmed_at set by a confirmed phone does not count): the account
-- is created, the buyer's purchase is NOT claimed
INSERT INTO pg_temp.users VALUES ('00000000-0000-0000-0000-000000000912', 'grace@example.com', NULL, '2024-07-01 10:00+00');
SELECT tests.acct('00000000-0000-0000-0000-000000000912');
SELECT tests.pp('grace@example.com');
-- the e-mail is confirmed: claimed in the same transaction (no token needed: the e-mail is the
-- sign-up's, and confirmed)
UPDATE pg_temp.users SET email_confirmed_at = '2024-07-02 00:00+00' WHERE id = '00000000-0000-0000-0000-000000000912';
SELECT tests.acct('00000000-0000-0000-0000-000000000912');
SELECT tests.pp('grace@example.com');
SELECT t.type, t.pool, t.amount, t.balance_after FROM billing.credit_transactions AS t
 WHERE t.user_id = '00000000-0000-0000-0000-000000000912' ORDER BY t.id;
-- a second confirmation (and any other update) does nothing
UPDATE pg_temp.users SET email_confirmed_at = '2024-07-03 00:00+00' WHERE id = '00000000-0000-0000-0000-000000000912';
UPDATE pg_temp.users SET email = 'grace@example.com' WHERE id = '00000000-0000-0000-0000-000000000912';
SELECT tests.acct('00000000-0000-0000-0000-000000000912');
-- a sign-up that is confirmed already claims at once
SELECT billing.upsert_pending_profile('judy@example.com', 'tok-j', 'pro', p_billing_cycle_start => '2024-07-01 00:00+00') ->> 'status' AS status;
INSERT INTO pg_temp.users VALUES ('00000000-0000-0000-0000-000000000916', 'Judy@example.com', '2024-07-05 00:00+00');
SELECT tests.pp('judy@example.com');
-- a table with confirmed_at only: the same rule on that column
CREATE TABLE pg_temp.users2 (id uuid PRIMARY KEY, email text, confirmed_at timestamptz);
CREATE TRIGGER on_user2 AFTER INSERT OR UPDATE ON pg_temp.users2 FOR EACH ROW EXECUTE FUNCTION billing.handle_new_user();
SELECT billing.upsert_pending_profile('kim@example.com', 'tok-k', 'pro', p_billing_cycle_start => '2024-07-01 00:00+00') ->> 'status' AS status;
INSERT INTO pg_temp.users2 VALUES ('00000000-0000-0000-0000-000000000917', 'kim@example.com', NULL);
SELECT tests.pp('kim@example.com');
UPDATE pg_temp.users2 SET confirmed_at = '2024-07-06 00:00+00' WHERE id = '00000000-0000-0000-0000-000000000917';
SELECT tests.pp('kim@example.com');
-- a table without a confirmation column claims only when the DBA says its e-mails are verified
CREATE TABLE pg_temp.users3 (id uuid PRIMARY KEY, email text);
CREATE TRIGGER on_user3 AFTER INSERT ON pg_temp.users3 FOR EACH ROW EXECUTE FUNCTION billing.handle_new_user();
SELECT billing.upsert_pending_profile('leo@example.com', 'tok-l', 'pro', p_billing_cycle_start => '2024-07-01 00:00+00') ->> 'status' AS status;
INSERT INTO pg_temp.users3 VALUES ('00000000-0000-0000-0000-000000000918', 'leo@example.com');
SELECT tests.pp('leo@example.com');
SELECT tests.acct('00000000-0000-0000-0000-000000000918');
CREATE TABLE pg_temp.users4 (id uuid PRIMARY KEY, email text);
CREATE TRIGGER on_user4 AFTER INSERT ON pg_temp.users4 FOR EACH ROW EXECUTE FUNCTION billing.handle_new_user('claim_on_insert');
INSERT INTO pg_temp.users4 VALUES ('00000000-0000-0000-0000-000000000919', 'leo@example.com');
SELECT tests.pp('leo@example.com');
-- an unknown trigger argument: 22023
CREATE TABLE pg_temp.users5 (id uuid PRIMARY KEY, email text);
CREATE TRIGGER on_user5 AFTER INSERT ON pg_temp.users5 FOR EACH ROW EXECUTE FUNCTION billing.handle_new_user('claim-on-insert');
SELECT tests.err($$INSERT INTO pg_temp.users5 VALUES ('00000000-0000-0000-0000-000000000920', 'x@example.com')$$);
-- no e-mail, or a malformed one: the account is created, nothing is claimed
INSERT INTO pg_temp.users VALUES ('00000000-0000-0000-0000-000000000913', NULL, now()), ('00000000-0000-0000-0000-000000000914', 'Not An Email', now());
SELECT tests.acct('00000000-0000-0000-0000-000000000913');
SELECT tests.acct('00000000-0000-0000-0000-000000000914');
-- an account that already exists keeps its credits (no second free grant)
SELECT billing._on_new_user('00000000-0000-0000-0000-000000000911', 'heidi@example.com', true);
SELECT tests.acct('00000000-0000-0000-0000-000000000911');
-- an e-mail whose profile another account claimed: nothing claimed
SELECT billing._on_new_user('00000000-0000-0000-0000-000000000915', 'bob@example.com', true);
SELECT tests.pp('bob@example.com');

-- ===== delete_pending_profile =====
SELECT p.id AS frank_id FROM billing.pending_profiles AS p WHERE p.email = 'frank@example.com' \gset
SELECT billing.delete_pending_profile(:'frank_id') AS deleted;
SELECT billing.delete_pending_profile('00000000-0000-0000-0000-000000000999') AS deleted_unknown;
SELECT count(*) AS frank_rows FROM billing.pending_profiles WHERE email = 'frank@example.com';

-- ===== errors =====
SELECT tests.err($$SELECT billing.upsert_pending_profile(NULL)$$);
-- a cycle end already past, without a start (the cycle starts now): 22023, not the CHECK's 23514 (0.6.0)
SELECT left(tests.err($$SELECT billing.upsert_pending_profile('past-end@example.com', p_billing_cycle_start => NULL, p_billing_cycle_end => now() - interval '1 day')$$), 6) AS sqlstate;
SELECT tests.err($$SELECT billing.upsert_pending_profile('nope')$$);
SELECT tests.err($$SELECT billing.upsert_pending_profile('x@example.com', p_plan_id => 'gold')$$);
SELECT tests.err($$SELECT billing.upsert_pending_profile('x@example.com', p_plan_duration => 'weekly')$$);
SELECT tests.err($$SELECT billing.upsert_pending_profile('x@example.com', p_credits => -1)$$);
SELECT tests.err($$SELECT billing.upsert_pending_profile('x@example.com', p_billing_cycle_start => '2024-02-01', p_billing_cycle_end => '2024-01-01')$$);
SELECT tests.err($$SELECT billing.upsert_pending_profile('x@example.com', p_token => repeat('t', 256))$$);
SELECT count(*) AS no_profile_x FROM billing.pending_profiles WHERE email = 'x@example.com';
SELECT tests.err($$SELECT billing.claim_pending_profile(NULL, 'bob@example.com')$$);
SELECT tests.err($$SELECT billing.claim_pending_profile('00000000-0000-0000-0000-000000000901', NULL)$$);
SELECT tests.err($$SELECT billing.claim_pending_profile('00000000-0000-0000-0000-000000000901', 'bob')$$);
SELECT tests.err($$SELECT billing.delete_pending_profile(NULL)$$);
SELECT tests.err($$SELECT billing._on_new_user(NULL, 'a@example.com', true)$$);

-- ===== end users =====
SELECT billing.upsert_pending_profile('ivan@example.com', 'tok-i', 'pro', p_billing_cycle_start => '2024-08-01 00:00+00') - 'id' AS r;
SET LOCAL ROLE authenticated;
SELECT set_config('request.jwt.claims', '{"sub":"00000000-0000-0000-0000-000000000921","role":"authenticated","email":"Ivan@Example.com"}', true) IS NOT NULL AS claims_set;
-- another user's id: 42501
SELECT tests.err($$SELECT billing.claim_pending_profile('00000000-0000-0000-0000-000000000922', 'ivan@example.com', 'tok-i')$$);
-- an e-mail other than the JWT's: 42501
SELECT tests.err($$SELECT billing.claim_pending_profile('00000000-0000-0000-0000-000000000921', 'bob@example.com', 'tok-bob')$$);
-- the service-only functions: 42501
SELECT tests.err($$SELECT billing.upsert_pending_profile('ivan@example.com')$$);
SELECT tests.err($$SELECT * FROM billing.get_unclaimed_pending_profiles()$$);
SELECT tests.err($$SELECT billing.delete_pending_profile('00000000-0000-0000-0000-000000000999')$$);
-- own id and own e-mail (any case): claimed
SELECT billing.claim_pending_profile('00000000-0000-0000-0000-000000000921', 'ivan@example.com', 'tok-i') - 'profile_id' - 'profile_ids' AS r;
-- row security: the user sees the profile they claimed, and only that one
-- single node only: Citus refuses an end user's read of rows postgres wrote earlier in this transaction
\if :single_node
SELECT email, claimed FROM billing.pending_profiles;
\endif
-- a JWT without an email claim cannot claim
SELECT set_config('request.jwt.claims', '{"sub":"00000000-0000-0000-0000-000000000921","role":"authenticated"}', true) IS NOT NULL AS claims_set;
SELECT tests.err($$SELECT billing.claim_pending_profile('00000000-0000-0000-0000-000000000921', 'ivan@example.com', 'tok-i')$$);
RESET ROLE;
SELECT set_config('request.jwt.claims', '', true) = '' AS claims_cleared;
SELECT tests.acct('00000000-0000-0000-0000-000000000921');

-- ===== issue 11 item 2: a stranger's checkout never lowers a paying customer's account =====
-- (future cycles, so the subscription is in force whatever the day the test runs)
SELECT billing.upsert_pending_profile('victim@example.com', 'tok-v', 'ultra', 'stripe', 'cus_victim', NULL, 'monthly',
                                      '2030-01-01 00:00+00') ->> 'status' AS status;
SELECT billing.claim_pending_profile('00000000-0000-0000-0000-000000000931', 'victim@example.com', 'tok-v') ->> 'credits_granted' AS granted;
SELECT tests.acct('00000000-0000-0000-0000-000000000931');
-- the attack: another customer's 'pro' checkout with 0 credits typed with the victim's e-mail
SELECT billing.upsert_pending_profile(p_email := 'Victim@example.com', p_plan_id := 'pro',
                                      p_provider_user_id := 'cus_other', p_credits := 0) ->> 'status' AS status;
SELECT tests.acct('00000000-0000-0000-0000-000000000931');
-- even claimed by the victim (it has no token), it lowers nothing: ultra, 10000, the later cycle stay
SELECT billing.claim_pending_profile('00000000-0000-0000-0000-000000000931', 'victim@example.com', 'tok-v') - 'profile_id' - 'profile_ids' AS r;
SELECT tests.acct('00000000-0000-0000-0000-000000000931');
-- the victim's own later purchase of a lower plan in the same cycle: credits added, ultra kept
SELECT billing.upsert_pending_profile('victim@example.com', 'tok-v2', 'pro', 'stripe', 'cus_victim', NULL, 'monthly',
                                      '2030-01-10 00:00+00') ->> 'status' AS status;
SELECT billing.claim_pending_profile('00000000-0000-0000-0000-000000000931', 'victim@example.com', 'tok-v2') ->> 'plan' AS plan_after;
SELECT tests.acct('00000000-0000-0000-0000-000000000931');

-- ===== issue 11 item 3: a later purchase of a claimed e-mail reaches its own buyer =====
SELECT billing.upsert_pending_profile('shared@corp.com', 'tok-A', 'pro', 'stripe', 'cus_A', NULL, 'monthly',
                                      '2030-01-01 00:00+00') ->> 'status' AS status;
SELECT billing.claim_pending_profile('00000000-0000-0000-0000-000000000941', 'shared@corp.com', 'tok-A') ->> 'success' AS a_claimed;
-- B now holds the address and buys with another token and customer: pending, not A's
SELECT billing.upsert_pending_profile('shared@corp.com', 'tok-B', 'premium', 'stripe', 'cus_B', NULL, 'monthly',
                                      '2030-01-05 00:00+00') ->> 'status' AS status;
SELECT tests.acct('00000000-0000-0000-0000-000000000941');
-- A claiming again with A's token: already claimed, nothing more (B's purchase needs B's token)
SELECT billing.claim_pending_profile('00000000-0000-0000-0000-000000000941', 'shared@corp.com', 'tok-A') - 'profile_id' AS r;
-- B claims the purchase with its token and gets it
SELECT billing.claim_pending_profile('00000000-0000-0000-0000-000000000942', 'shared@corp.com', 'tok-B') - 'profile_id' - 'profile_ids' AS r;
SELECT tests.acct('00000000-0000-0000-0000-000000000942');
SELECT tests.acct('00000000-0000-0000-0000-000000000941');
SELECT p.token, p.plan_id, p.claimed_by_user_id FROM billing.pending_profiles AS p WHERE p.email = 'shared@corp.com' ORDER BY p.token;
-- A's own purchase renewing (same token and customer, next cycle) still goes to A
SELECT billing.upsert_pending_profile('shared@corp.com', 'tok-A', 'pro', 'stripe', 'cus_A', NULL, 'monthly',
                                      '2030-01-31 00:00+00') - 'id' AS r;

-- ===== a claimed purchase's repeats within one cycle never mint (issue 11 item 4, issue 10 item 1) =====
-- pro -> premium -> pro -> premium in the same cycle: 500 + 1500 in total, the premium amount
SELECT billing.upsert_pending_profile('flip@example.com', 'tok-f', 'pro', 'stripe', 'cus_f', NULL, 'monthly',
                                      '2030-03-01 00:00+00') ->> 'status' AS status;
SELECT billing.claim_pending_profile('00000000-0000-0000-0000-000000000951', 'flip@example.com', 'tok-f') ->> 'credits_granted' AS granted;
SELECT r ->> 'credits_granted' AS granted FROM (VALUES ('premium'), ('pro'), ('premium'), ('premium')) AS v(plan),
       LATERAL billing.upsert_pending_profile('flip@example.com', 'tok-f', v.plan, 'stripe', 'cus_f', NULL, 'monthly',
                                              '2030-03-01 00:00+00') AS r;
SELECT tests.acct('00000000-0000-0000-0000-000000000951');

-- ===== issue 11 item 8a: e-mails are not Unicode-folded into ASCII =====
-- U+212A KELVIN SIGN lower-cases to 'k' under Unicode rules; here it stays another address
SELECT billing.upsert_pending_profile('kate@example.com', 'tok-kate', 'pro', p_billing_cycle_start => '2030-01-01 00:00+00') ->> 'status' AS status;
SELECT billing.upsert_pending_profile(U&'\212Aate@Example.com', 'tok-kelvin', 'free', p_billing_cycle_start => '2030-01-01 00:00+00') ->> 'status' AS status;
SELECT p.email = U&'\212Aate@example.com' AS kelvin_kept, p.token FROM billing.pending_profiles AS p
 WHERE p.token IN ('tok-kate', 'tok-kelvin') ORDER BY p.token;
SET LOCAL ROLE authenticated;
SELECT set_config('request.jwt.claims', '{"sub":"00000000-0000-0000-0000-000000000961","role":"authenticated","email":"\u212Aate@example.com"}', true) IS NOT NULL AS claims_set;
-- the JWT's e-mail is not kate's: 42501
SELECT tests.err($$SELECT billing.claim_pending_profile('00000000-0000-0000-0000-000000000961', 'kate@example.com', 'tok-kate')$$);
RESET ROLE;
SELECT set_config('request.jwt.claims', '', true) = '' AS claims_cleared;
SELECT tests.pp('kate@example.com');
-- the accounts' e-mail index uses the same normalisation
SELECT pg_catalog.pg_get_indexdef('billing.accounts_email_idx'::regclass) LIKE '%translate(email%' AS index_ascii_only;

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
SET client_min_messages = warning;
DROP SCHEMA tests CASCADE;
RESET client_min_messages;
