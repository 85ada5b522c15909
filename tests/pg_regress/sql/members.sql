-- Members (SPEC 8, S1): upsert_member, consume_generation, add_credits, get_usage_status,
-- reset_usage_for_due_members; every outcome and error path.
-- Helpers live in schema tests, not pg_temp: on a Citus cluster a query that calls one may run on a worker.
CREATE SCHEMA tests;
GRANT USAGE ON SCHEMA tests TO PUBLIC;
-- single_node: false on a Citus cluster, where the sections marked 'single node only' are skipped
SELECT NOT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'citus') AS single_node \gset
BEGIN;
SET LOCAL TimeZone = 'UTC';
SET LOCAL DateStyle = 'ISO, YMD';
-- err(sql): 'SQLSTATE: message [detail] (hint)' instead of failing; random uuids masked.
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
-- mid(email): the member id of an e-mail.
CREATE FUNCTION tests.mid(p_email text) RETURNS uuid LANGUAGE plpgsql AS $f$
BEGIN RETURN (
    SELECT e.user_id FROM billing.member_emails AS e WHERE e.email = p_email);
END
$f$;
-- st(email): a member's state: plan, dates, usage and both pools, ledger rows.
CREATE FUNCTION tests.st(p_email text) RETURNS text LANGUAGE plpgsql AS $f$
DECLARE u uuid := tests.mid(p_email); m billing.members; a billing.accounts;
BEGIN
    -- one table at a time (on a Citus cluster, members is distributed by user and e-mail apart)
    SELECT * INTO m FROM billing.members AS x WHERE x.user_id = u;
    IF NOT FOUND THEN RETURN NULL; END IF;
    SELECT * INTO a FROM billing.accounts AS x WHERE x.user_id = u;
    RETURN format('plan=%s renewal=%s anchor=%s start=%s usage=%s overage=%s sub=%s pur=%s ledger_rows=%s',
                  m.plan_id, m.renewal_date, m.anchor_day,
                  CASE WHEN m.period_start = (now() AT TIME ZONE 'UTC')::date THEN 'today' ELSE m.period_start::text END,
                  m.period_usage, m.period_overage,
                  a.subscription_credits_balance, a.purchased_credits_balance,
                  (SELECT count(*) FROM billing.credit_transactions AS t WHERE t.user_id = u));
END
$f$;
-- status(member): get_usage_status without the member id; a period that starts today (the UTC
-- date of now()) reads 'today'. The dates below lie in the 2120s so that no pool has lapsed.
CREATE FUNCTION tests.status(p_member uuid) RETURNS jsonb LANGUAGE sql AS $f$
    SELECT s - 'member_id' || CASE WHEN (s ->> 'period_start')::date = (now() AT TIME ZONE 'UTC')::date
                                   THEN '{"period_start": "today"}'::jsonb ELSE '{}'::jsonb END
      FROM billing.get_usage_status(p_member) AS s
$f$;
-- Results that carry random ids, by label.
CREATE TEMP TABLE res (label text PRIMARY KEY, r jsonb);

-- ===== upsert_member: a new member =====
INSERT INTO res SELECT 'alice_new', billing.upsert_member('  Alice@Example.COM ', 'pro', '2124-01-31', 'evt_m_1')
RETURNING label, r - 'member_id' AS r;
-- member_id is the account's user id; the account has the e-mail and the pro pool (500)
-- (ids read into psql variables: on a Citus cluster a query on billing tables runs on a worker)
SELECT r ->> 'member_id' AS alice_id FROM res WHERE label = 'alice_new' \gset
SELECT (r ->> 'member_id')::uuid = tests.mid('alice@example.com') AS member_id_matches,
       (SELECT a.email FROM billing.accounts AS a WHERE a.user_id = :'alice_id') AS account_email
  FROM res WHERE label = 'alice_new';
SELECT tests.st('alice@example.com');
-- the same webhook event again (even with other arguments): the first result, nothing changes
INSERT INTO res SELECT 'alice_replay', billing.upsert_member('alice@example.com', 'premium', NULL, 'evt_m_1')
RETURNING label, r - 'member_id' AS r;
SELECT (SELECT r ->> 'member_id' FROM res WHERE label = 'alice_replay')
     = (SELECT r ->> 'member_id' FROM res WHERE label = 'alice_new') AS same_member;
SELECT tests.st('alice@example.com');
-- same plan again, other case, no renewal date: nothing granted, renewal date kept
SELECT billing.upsert_member('ALICE@example.com', 'pro') - 'member_id' AS r;
SELECT tests.st('alice@example.com');
SELECT count(*) AS members_for_alice FROM billing.members WHERE email = 'alice@example.com';
-- a new renewal date (same plan) moves the date and its anchor day, grants nothing
SELECT billing.upsert_member('alice@example.com', 'pro', '2124-02-15') - 'member_id' AS r;
SELECT tests.st('alice@example.com');

-- ===== consume_generation within the pool =====
SELECT billing.consume_generation(tests.mid('alice@example.com'));
SELECT billing.consume_generation(tests.mid('alice@example.com'), 9, 'batch of 9');
SELECT tests.st('alice@example.com');
SELECT t.type, t.pool, t.amount, t.balance_after, t.description
  FROM billing.credit_transactions AS t WHERE t.user_id = :'alice_id' AND t.type = 'generation'
 ORDER BY t.id;

-- ===== plan upgrade: the pool is topped up by the difference, usage is kept (issue 11 item 4) =====
SELECT billing.upsert_member('alice@example.com', 'premium', NULL, 'evt_m_2') - 'member_id' AS r;
SELECT tests.st('alice@example.com');
SELECT t.type, t.pool, t.amount, t.balance_after
  FROM billing.credit_transactions AS t WHERE t.user_id = :'alice_id'
 ORDER BY t.id;
SELECT e.expired_amount FROM billing.credit_expiration_events AS e WHERE e.user_id = :'alice_id';

-- ===== add_credits: extra (purchased) credits, idempotent by event id =====
INSERT INTO res SELECT 'extra_1', billing.add_credits(tests.mid('alice@example.com'), 50, 'evt_c_1')
RETURNING label, r - 'transaction_id' - 'member_id' AS r;
INSERT INTO res SELECT 'extra_1_again', billing.add_credits(tests.mid('alice@example.com'), 50, 'evt_c_1')
RETURNING label, r - 'transaction_id' - 'member_id' AS r;
SELECT (SELECT r ->> 'transaction_id' FROM res WHERE label = 'extra_1')
     = (SELECT r ->> 'transaction_id' FROM res WHERE label = 'extra_1_again') AS replayed_first_transaction;
-- without an event id every call applies
SELECT billing.add_credits(tests.mid('alice@example.com'), 5) ->> 'purchased_credits_balance' AS purchased;
SELECT tests.st('alice@example.com');
SELECT t.type, t.pool, t.amount, t.description, t.reference_id
  FROM billing.credit_transactions AS t WHERE t.user_id = :'alice_id' AND t.type = 'purchase'
 ORDER BY t.id;
SELECT w.event_type, w.user_id = :'alice_id' AS user_recorded
  FROM billing.webhook_events AS w WHERE w.event_id IN ('evt_m_1', 'evt_m_2', 'evt_c_1') ORDER BY w.event_id;

-- ===== get_usage_status: pool_limit = current_usage + remaining =====
SELECT billing.consume_generation(tests.mid('alice@example.com'), 100);
SELECT tests.status(tests.mid('alice@example.com')) AS status;

-- ===== the pool first, then extra credits; beyond them overage (premium allows it) =====
-- (1890: the 10 used before the upgrade still count in this period's usage)
SELECT billing.consume_generation(tests.mid('alice@example.com'), 1890);
SELECT billing.consume_generation(tests.mid('alice@example.com'), 50, 'into extra credits');
SELECT tests.st('alice@example.com');
-- 10 more with 5 credits left: 5 from credits, 5 overage (type overage, still allowed)
SELECT billing.consume_generation(tests.mid('alice@example.com'), 10, 'past the pool');
-- no credits at all: all overage
SELECT billing.consume_generation(tests.mid('alice@example.com'), 3);
SELECT tests.st('alice@example.com');
SELECT CASE WHEN o.period_start = (now() AT TIME ZONE 'UTC')::date THEN 'today' ELSE o.period_start::text END AS period_start, o.generations, o.description, o.billed_at
  FROM billing.member_overage AS o WHERE o.user_id = :'alice_id' ORDER BY o.id;
SELECT tests.status(tests.mid('alice@example.com')) AS status;
-- every generation (overage included) is counted in the monthly usage metering
SELECT u.generations_count FROM billing.usage_metrics AS u WHERE u.user_id = :'alice_id';

-- ===== a plan without overage (free): PT402 and nothing changes =====
SELECT billing.upsert_member('bob@example.com', 'free', '2124-03-10') - 'member_id' AS r;
SELECT tests.mid('bob@example.com') AS bob_id \gset
SELECT billing.consume_generation(tests.mid('bob@example.com'), 8);
SELECT tests.st('bob@example.com');
SELECT tests.err(format('SELECT billing.consume_generation(%L, 3)', tests.mid('bob@example.com')));
SELECT tests.st('bob@example.com');
SELECT count(*) AS bob_overage_rows FROM billing.member_overage WHERE user_id = :'bob_id';
-- extra credits make it possible: 2 from the pool, 1 from extra credits
SELECT billing.add_credits(tests.mid('bob@example.com'), 1) ->> 'total_balance' AS total;
SELECT billing.consume_generation(tests.mid('bob@example.com'), 3);
SELECT tests.err(format('SELECT billing.consume_generation(%L)', tests.mid('bob@example.com')));
SELECT tests.status(tests.mid('bob@example.com')) AS status;

-- ===== an existing account with the e-mail becomes the member =====
SELECT billing.add_purchased_credits('00000000-0000-0000-0000-000000000801', 7) ->> 'total_balance' AS total;
UPDATE billing.accounts SET email = 'Carol@Example.com' WHERE user_id = '00000000-0000-0000-0000-000000000801';
SELECT billing.upsert_member('carol@example.com', 'pro', '2124-03-31') ->> 'member_id' AS member_id;
SELECT tests.st('carol@example.com');
-- a new member without a renewal date renews one month from today
SELECT billing.upsert_member('dave@example.com', 'pro') ->> 'renewal_date'
     = to_char(current_date + interval '1 month', 'YYYY-MM-DD') AS renews_in_a_month;

-- ===== reset_usage_for_due_members =====
-- before: alice renews 2124-02-15, bob 2124-03-10, carol 2124-03-31, dave next month (in real
-- time: earlier than all of these, so dave is due in the first run and again in the third)
SELECT billing.reset_usage_for_due_members('2124-02-14') AS reset_only_dave;
-- alice is due (on her renewal date); bob and carol are not yet
SELECT billing.reset_usage_for_due_members('2124-02-15') AS reset_alice;
SELECT tests.st('alice@example.com');
-- the same day again: nothing more
SELECT billing.reset_usage_for_due_members('2124-02-15') AS reset_again;
-- several periods behind: alice, bob, carol (and dave) land in the period containing the day in one
-- step; carol (anchor day 31) renews on the last day of short months; extra credits are untouched
SELECT billing.reset_usage_for_due_members('2124-06-12') AS reset_four;
SELECT tests.st('alice@example.com');
SELECT tests.st('bob@example.com');
SELECT tests.st('carol@example.com');
-- June 30: carol (June has 30 days) and alice (renews on the 15th) are due; carol's next
-- renewal is July 31, not July 30
SELECT billing.reset_usage_for_due_members('2124-06-30') AS reset_carol_and_alice;
SELECT tests.st('carol@example.com');
SELECT tests.status(tests.mid('bob@example.com')) AS status;
-- the renewal is a credits-core renewal: expiration (logged) + renewal rows
SELECT t.type, t.pool, t.amount, t.balance_after
  FROM billing.credit_transactions AS t WHERE t.user_id = :'bob_id' ORDER BY t.id;
SELECT a.subscription_credits_expire_at FROM billing.accounts AS a WHERE a.user_id = :'bob_id';

-- ===== argument errors (22023), unknown members (P0002) =====
SELECT tests.err($$SELECT billing.upsert_member(NULL, 'pro')$$);
SELECT tests.err($$SELECT billing.upsert_member('not-an-email', 'pro')$$);
SELECT tests.err($$SELECT billing.upsert_member('a@b', 'pro')$$);
SELECT tests.err($$SELECT billing.upsert_member('a b@example.com', 'pro')$$);
SELECT tests.err($$SELECT billing.upsert_member('x@example.com', 'gold')$$);
SELECT tests.err($$SELECT billing.upsert_member('x@example.com', NULL)$$);
SELECT tests.err($$SELECT billing.upsert_member('x@example.com', 'pro', 'infinity')$$);
SELECT tests.err($$SELECT billing.upsert_member('x@example.com', 'pro', NULL, repeat('e', 256))$$);
SELECT count(*) AS no_member_x FROM billing.member_emails WHERE email = 'x@example.com';
SELECT tests.err($$SELECT billing.consume_generation(NULL)$$);
SELECT tests.err($$SELECT billing.consume_generation('00000000-0000-0000-0000-000000000899')$$);
SELECT tests.err(format('SELECT billing.consume_generation(%L, 0)', tests.mid('alice@example.com')));
SELECT tests.err(format('SELECT billing.consume_generation(%L, -2)', tests.mid('alice@example.com')));
SELECT tests.err(format('SELECT billing.consume_generation(%L, NULL)', tests.mid('alice@example.com')));
SELECT tests.err(format('SELECT billing.consume_generation(%L, 1, %L)', tests.mid('alice@example.com'), repeat('d', 1001)));
SELECT tests.err($$SELECT billing.add_credits('00000000-0000-0000-0000-000000000899', 5, 'evt_c_unknown')$$);
SELECT count(*) AS unknown_member_event_not_recorded FROM billing.webhook_events WHERE event_id = 'evt_c_unknown';
SELECT tests.err(format('SELECT billing.add_credits(%L, 0)', tests.mid('alice@example.com')));
SELECT tests.err(format('SELECT billing.add_credits(%L, NULL)', tests.mid('alice@example.com')));
SELECT tests.err($$SELECT billing.add_credits(NULL, 5)$$);
SELECT tests.err($$SELECT billing.get_usage_status('00000000-0000-0000-0000-000000000899')$$);
SELECT tests.err($$SELECT billing.get_usage_status(NULL)$$);
SELECT tests.err($$SELECT billing.reset_usage_for_due_members(NULL)$$);

-- ===== end users (PostgREST: SET LOCAL ROLE + JWT claims) =====
CREATE TEMP TABLE ids AS SELECT tests.mid('alice@example.com') AS alice, tests.mid('bob@example.com') AS bob;
GRANT SELECT ON ids TO PUBLIC;
SELECT set_config('test.alice', alice::text, true) IS NOT NULL AS alice_set FROM ids;
SELECT set_config('test.bob', bob::text, true) IS NOT NULL AS bob_set FROM ids;
SET LOCAL ROLE authenticated;
SELECT set_config('request.jwt.claims', json_build_object('sub', current_setting('test.bob'), 'role', 'authenticated')::text, true) IS NOT NULL AS claims_set;
-- bob on himself: allowed
SELECT billing.consume_generation(current_setting('test.bob')::uuid) AS own_generation;
SELECT billing.get_usage_status(current_setting('test.bob')::uuid) - 'member_id' AS own_status;
-- bob on alice: 42501
SELECT tests.err($$SELECT billing.consume_generation(current_setting('test.alice')::uuid)$$);
SELECT tests.err($$SELECT billing.get_usage_status(current_setting('test.alice')::uuid)$$);
-- service-only functions: 42501 (not even granted to authenticated)
SELECT tests.err($$SELECT billing.upsert_member('bob@example.com', 'ultra')$$);
SELECT tests.err($$SELECT billing.add_credits(current_setting('test.bob')::uuid, 1000)$$);
SELECT tests.err($$SELECT billing.reset_usage_for_due_members('2030-01-01')$$);
-- row security: bob reads only his own member row
-- single node only: Citus refuses an end user's read of rows postgres wrote earlier in this transaction
\if :single_node
SELECT count(*) AS visible_members FROM billing.members;
\endif
-- anon: no identity
SET LOCAL ROLE anon;
SELECT set_config('request.jwt.claims', '{"role":"anon"}', true) IS NOT NULL AS claims_set;
SELECT tests.err($$SELECT billing.get_usage_status(current_setting('test.bob')::uuid)$$);
RESET ROLE;
SELECT set_config('request.jwt.claims', '', true) = '' AS claims_cleared;
-- bob's state: only his own generation changed it
SELECT tests.st('bob@example.com');

-- ===== issue 11 item 4: plan flip-flops within one period mint nothing =====
-- plan_pool(email): plan, scheduled plan, renewal date, usage and pools (no dates of today).
CREATE FUNCTION tests.plan_pool(p_email text) RETURNS text LANGUAGE plpgsql AS $f$
DECLARE u uuid := tests.mid(p_email); m billing.members; a billing.accounts;
BEGIN
    SELECT * INTO m FROM billing.members AS x WHERE x.user_id = u;
    IF NOT FOUND THEN RETURN NULL; END IF;
    SELECT * INTO a FROM billing.accounts AS x WHERE x.user_id = u;
    RETURN format('plan=%s next=%s renewal=%s usage=%s sub=%s pur=%s',
                  m.plan_id, m.next_plan_id, m.renewal_date, m.period_usage,
                  a.subscription_credits_balance, a.purchased_credits_balance);
END
$f$;
-- pro -> premium -> pro -> premium with unchanged dates: 500 + 1500 = premium's 2000 in total
SELECT billing.upsert_member('flip@example.com', 'pro', '2124-09-10') ->> 'credits_granted' AS granted;
SELECT tests.mid('flip@example.com') AS flip_id \gset
SELECT billing.consume_generation(tests.mid('flip@example.com'), 100) ->> 'current_usage' AS usage;
SELECT r ->> 'plan' AS plan, r ->> 'scheduled_plan' AS scheduled, r ->> 'credits_granted' AS granted
  FROM (VALUES (1, 'premium'), (2, 'pro'), (3, 'premium'), (4, 'pro'), (5, 'premium')) AS v(n, plan),
       LATERAL billing.upsert_member('flip@example.com', v.plan, '2124-09-10') AS r ORDER BY v.n;
-- usage was not reset by the plan changes; the pool is 2000 - 100
SELECT tests.plan_pool('flip@example.com');
SELECT sum(t.amount) FILTER (WHERE t.amount > 0) AS granted_in_period
  FROM billing.credit_transactions AS t WHERE t.user_id = :'flip_id';

-- ===== issue 11 item 2: a membership webhook never lowers what a member has =====
-- a downgrade (a stranger's checkout with the member's e-mail, or the member's own) waits for
-- the next renewal: plan, pool and usage stay for this period
SELECT billing.upsert_member('flip@example.com', 'free', '2124-09-10') - 'member_id' AS r;
SELECT tests.plan_pool('flip@example.com');
-- an earlier renewal date would shorten the period (and expire the pool early): ignored
SELECT billing.upsert_member('flip@example.com', 'free', '2124-08-20') ->> 'renewal_date' AS renewal_kept;
-- going back to the current plan cancels the scheduled downgrade
SELECT billing.upsert_member('flip@example.com', 'premium') ->> 'scheduled_plan' AS scheduled;
SELECT billing.upsert_member('flip@example.com', 'pro') ->> 'scheduled_plan' AS scheduled;
-- at the renewal the scheduled plan takes effect with its own pool
SELECT billing.reset_usage_for_due_members('2124-09-10') >= 1 AS reset;
SELECT tests.plan_pool('flip@example.com');
SELECT billing.upsert_member('flip@example.com', 'premium') ->> 'credits_granted' AS upgrade_granted;
-- an existing account with a bigger pool that becomes a member keeps it (0.2.0: replaced by 500)
SELECT billing.add_subscription_credits('00000000-0000-0000-0000-000000000802', 5000) ->> 'total_balance' AS total;
UPDATE billing.accounts SET email = 'rich@example.com' WHERE user_id = '00000000-0000-0000-0000-000000000802';
SELECT billing.upsert_member('rich@example.com', 'pro', '2124-10-01') ->> 'credits_granted' AS granted;
SELECT tests.plan_pool('rich@example.com');

-- ===== issue 11 item 8a: e-mails are not Unicode-folded into ASCII =====
-- an account kate@example.com; a member with U+212A KELVIN SIGN instead of 'K' is someone else
INSERT INTO billing.accounts (user_id, email) VALUES ('00000000-0000-0000-0000-000000000803', 'Kate@Example.com');
SELECT (billing.upsert_member(U&'\212Aate@example.com', 'pro') ->> 'member_id')::uuid
       <> '00000000-0000-0000-0000-000000000803' AS kelvin_is_not_kate;
SELECT (billing.upsert_member('KATE@example.com', 'pro') ->> 'member_id')::uuid
       = '00000000-0000-0000-0000-000000000803' AS ascii_case_still_matches;
SELECT count(*) AS kate_rows FROM billing.member_emails WHERE email IN ('kate@example.com', U&'\212Aate@example.com');

-- ===== catalog: access and comments =====
SELECT f.function_name, f.access FROM billing.api_catalog() AS f
 WHERE f.function_name IN ('upsert_member', 'consume_generation', 'add_credits', 'get_usage_status', 'reset_usage_for_due_members')
 ORDER BY 1;
SELECT p.proname, has_function_privilege('authenticated', p.oid, 'EXECUTE') AS authenticated_may,
       has_function_privilege('anon', p.oid, 'EXECUTE') AS anon_may,
       obj_description(p.oid, 'pg_proc') IS NOT NULL AS documented
  FROM pg_proc AS p
 WHERE p.pronamespace = 'billing'::regnamespace
   AND p.proname IN ('upsert_member', 'consume_generation', 'add_credits', 'get_usage_status', 'reset_usage_for_due_members')
 ORDER BY 1;

-- the ledger matches every balance
SELECT * FROM billing.verify_ledger();
ROLLBACK;
SET client_min_messages = warning;
DROP SCHEMA tests CASCADE;
RESET client_min_messages;
