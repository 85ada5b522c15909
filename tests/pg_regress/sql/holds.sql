-- Credit holds (issue 14): reserve credits before a job, capture what it cost, release the rest.
-- Available = spendable credits - active unexpired holds (- debt); every spending path and every
-- balance read respects it. Each rule below fails on 0.4.0 (no holds: the functions, the columns
-- and the subtraction do not exist). Time rules run across separate statements (each its own
-- transaction) with explicit short TTLs that pg_sleep passes.
-- Helpers live in schema tests, not pg_temp: on a Citus cluster a query that calls one may run on a worker.
CREATE SCHEMA tests;
GRANT USAGE ON SCHEMA tests TO PUBLIC;
-- single_node: false on a Citus cluster, where the sections marked 'single node only' are skipped
SELECT NOT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'citus') AS single_node \gset
SET TimeZone = 'UTC';
SET DateStyle = 'ISO, YMD';
CREATE FUNCTION tests.err(p_sql text) RETURNS text LANGUAGE plpgsql AS $f$
DECLARE st text; msg text; det text;
BEGIN
    EXECUTE p_sql;
    RETURN 'no error';
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL;
    RETURN regexp_replace(regexp_replace(st || ': ' || msg || COALESCE(' [' || NULLIF(det, '') || ']', ''),
                          '(?!00000000-0000-0000-0000-)[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}',
                          '<uuid>', 'g'), '\d{4}-\d\d-\d\dT[0-9:.]+Z', '<time>', 'g');
END
$f$;
-- Holds by label: hold(label, reserve_credits result) remembers the hold id; h(label) is it.
CREATE TEMP TABLE hl (label text PRIMARY KEY, id uuid NOT NULL);
GRANT SELECT, INSERT ON pg_temp.hl TO PUBLIC;
CREATE FUNCTION tests.hold(p_label text, r jsonb) RETURNS jsonb LANGUAGE sql AS $f$
    INSERT INTO pg_temp.hl VALUES (p_label, (r ->> 'hold_id')::uuid)
    RETURNING r - 'hold_id' - 'expires_at' - 'user_id'
$f$;
CREATE FUNCTION tests.h(p_label text) RETURNS uuid LANGUAGE sql STABLE AS $f$
    SELECT id FROM pg_temp.hl WHERE label = p_label
$f$;
-- hrow(label): the hold's row (its id looked up first: on a Citus cluster the row is read on a worker)
CREATE FUNCTION tests.hrow(p_label text) RETURNS SETOF billing.credit_holds LANGUAGE plpgsql AS $f$
DECLARE i uuid := tests.h(p_label);
BEGIN RETURN QUERY SELECT * FROM billing.credit_holds WHERE id = i; END
$f$;
-- clean(result): without random ids and clock times
CREATE FUNCTION tests.clean(r jsonb) RETURNS jsonb LANGUAGE sql AS $f$
    SELECT r - 'hold_id' - 'user_id' - 'transaction_id' - 'expires_at'
             || CASE WHEN r ? 'grants' THEN jsonb_build_object('grants', (SELECT COALESCE(jsonb_agg(e - 'grant_id'), '[]') FROM jsonb_array_elements(r -> 'grants') AS e)) ELSE '{}' END
$f$;
-- state(user): the stored held sum, the reads' available, and the books
CREATE FUNCTION tests.state(p_user uuid)
RETURNS TABLE (held bigint, available bigint, total bigint, active_holds bigint, ledger_ok boolean)
LANGUAGE plpgsql AS $f$
#variable_conflict use_column
BEGIN
    -- one statement each (on a Citus cluster a query on billing tables that calls a billing function fails)
    SELECT a.held INTO held FROM billing.accounts AS a WHERE a.user_id = p_user;
    IF NOT FOUND THEN RETURN; END IF;
    SELECT c.available, c.total_balance INTO available, total FROM billing.get_user_credits(p_user) AS c;
    active_holds := (SELECT count(*) FROM billing.get_active_holds(p_user));
    ledger_ok := NOT EXISTS (SELECT 1 FROM billing.verify_ledger(p_user));
    RETURN NEXT;
END
$f$;

-- ===== The LLM story: reserve 500, the job costs 312, 188 come back =====
SELECT (billing.add_purchased_credits('00000000-0000-0000-0000-000000140001', 1000)) ->> 'total_balance' AS total;
SELECT tests.hold('llm', billing.reserve_credits('00000000-0000-0000-0000-000000140001', 500, '5 minutes'));
SELECT * FROM tests.state('00000000-0000-0000-0000-000000140001');
SELECT available FROM billing.user_credits WHERE user_id = '00000000-0000-0000-0000-000000140001';
SELECT total_credits, available FROM billing.get_user_dashboard_stats('00000000-0000-0000-0000-000000140001');
SELECT amount, feature, expires_at > now() + interval '4 minutes' AS five_minutes
  FROM billing.get_active_holds('00000000-0000-0000-0000-000000140001');
-- The held credits are not spendable by anything else, on every spending path.
SELECT tests.err($$SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000140001', 501)$$) AS v2_501;
SELECT tests.err($$SELECT billing.consume_credits('00000000-0000-0000-0000-000000140001', 501)$$) AS consume_501;
SELECT tests.err($$SELECT billing.decrement_credits_with_log('00000000-0000-0000-0000-000000140001', 501, 'usage')$$) AS decrement_501;
SELECT tests.err($$SELECT billing.reserve_credits('00000000-0000-0000-0000-000000140001', 501)$$) AS reserve_501;
-- Up to the rest is fine (the fast path's head grant covers the debit and the holds).
SELECT (billing.consume_credits_v2('00000000-0000-0000-0000-000000140001', 100)) ->> 'total_balance' AS total_after_100;
SELECT * FROM tests.state('00000000-0000-0000-0000-000000140001');
-- The job cost 312: captured in the spending order, 188 released, in one call.
SELECT tests.clean(billing.capture_hold(tests.h('llm'), 312, 'llm job')) AS capture;
SELECT * FROM tests.state('00000000-0000-0000-0000-000000140001');
SELECT tests.h('llm') AS llm_id \gset
SELECT t.type, t.amount, t.reference_id = :'llm_id' AS refers_to_hold, t.description
  FROM billing.credit_transactions AS t
 WHERE t.user_id = '00000000-0000-0000-0000-000000140001' AND t.type = 'hold_capture';
SELECT status, amount, captured_amount, resolved_at IS NOT NULL AS resolved
  FROM tests.hrow('llm');
-- A hold resolves once: a repeated capture (other amount too) and a release return the first
-- result; nothing more is debited.
SELECT tests.clean(billing.capture_hold(tests.h('llm'), 400)) AS capture_again;
SELECT tests.clean(billing.release_hold(tests.h('llm'))) ->> 'already_resolved' AS release_after_capture,
       billing.release_hold(tests.h('llm')) ->> 'captured' AS first_captured;
SELECT * FROM tests.state('00000000-0000-0000-0000-000000140001');

-- ===== Release; release twice =====
SELECT tests.hold('rel', billing.reserve_credits('00000000-0000-0000-0000-000000140001', 200));
SELECT tests.clean(billing.release_hold(tests.h('rel'))) AS release;
SELECT tests.clean(billing.release_hold(tests.h('rel'))) AS release_again;
SELECT tests.err(format('SELECT billing.capture_hold(%L, 10)', tests.h('rel'))) AS capture_released,
       billing.capture_hold(tests.h('rel'), 10) ->> 'status' AS status;
SELECT * FROM tests.state('00000000-0000-0000-0000-000000140001');

-- ===== Capturing more than the hold, under each p_over policy =====
-- 588 left; a hold of 100, so 488 free.
SELECT tests.hold('more', billing.reserve_credits('00000000-0000-0000-0000-000000140001', 100));
-- reject: 22023 and nothing changes
SELECT tests.err(format($$SELECT billing.capture_hold(%L, 101, p_over => 'reject')$$, tests.h('more'))) AS reject;
SELECT status FROM tests.hrow('more');
SELECT * FROM tests.state('00000000-0000-0000-0000-000000140001');
SELECT tests.err(format($$SELECT billing.capture_hold(%L, 10, p_over => 'sometimes')$$, tests.h('more'))) AS bad_policy;
SELECT tests.err(format($$SELECT billing.capture_hold(%L, -1)$$, tests.h('more'))) AS negative;
-- available: the excess from the free balance
SELECT tests.clean(billing.capture_hold(tests.h('more'), 130)) AS capture_130;
SELECT * FROM tests.state('00000000-0000-0000-0000-000000140001');
-- 458 left; hold 50, another hold 400 keeps 400 away: the capture of 200 gets 50 + 8 free, 142 unfunded.
SELECT tests.hold('more2', billing.reserve_credits('00000000-0000-0000-0000-000000140001', 50));
SELECT tests.hold('big', billing.reserve_credits('00000000-0000-0000-0000-000000140001', 400));
SELECT tests.clean(billing.capture_hold(tests.h('more2'), 200)) AS capture_unfunded;
SELECT * FROM tests.state('00000000-0000-0000-0000-000000140001');
-- The other hold's 400 are still all there.
SELECT tests.clean(billing.capture_hold(tests.h('big'), 400)) AS capture_big;
SELECT * FROM tests.state('00000000-0000-0000-0000-000000140001');
-- overdraft: beyond the grants, into debt within the limit; unfunded beyond the limit
SELECT (billing.add_purchased_credits('00000000-0000-0000-0000-000000140002', 100)) ->> 'total_balance' AS total;
SELECT (billing.set_overdraft_limit('00000000-0000-0000-0000-000000140002', 30)) ->> 'overdraft_limit' AS limit;
SELECT tests.hold('od', billing.reserve_credits('00000000-0000-0000-0000-000000140002', 80));
SELECT tests.clean(billing.capture_hold(tests.h('od'), 120, p_over => 'overdraft')) AS capture_overdraft;
SELECT * FROM tests.state('00000000-0000-0000-0000-000000140002');
SELECT tests.err($$SELECT billing.reserve_credits('00000000-0000-0000-0000-000000140002', 1, p_allow_partial => true)$$) AS reserve_in_debt;
-- 30 more: 20 repay the debt, 10 are left to hold.
SELECT (billing.add_purchased_credits('00000000-0000-0000-0000-000000140002', 30)) ->> 'total_balance' AS total;
SELECT tests.hold('od2', billing.reserve_credits('00000000-0000-0000-0000-000000140002', 10));
SELECT tests.clean(billing.capture_hold(tests.h('od2'), 50, p_over => 'overdraft')) AS capture_past_limit;
SELECT * FROM tests.state('00000000-0000-0000-0000-000000140002');

-- ===== Partial reserve and the cap =====
SELECT (billing.add_purchased_credits('00000000-0000-0000-0000-000000140003', 50)) ->> 'total_balance' AS total;
SELECT tests.hold('p1', billing.reserve_credits('00000000-0000-0000-0000-000000140003', 80, p_allow_partial => true)) AS partial;
SELECT tests.err($$SELECT billing.reserve_credits('00000000-0000-0000-0000-000000140003', 1, p_allow_partial => true)$$) AS nothing_left;
SELECT (billing.release_hold(tests.h('p1'))) ->> 'released' AS released;
SELECT billing.set_max_active_holds('00000000-0000-0000-0000-000000140003', 2) - 'user_id' AS cap;
SELECT tests.hold('c1', billing.reserve_credits('00000000-0000-0000-0000-000000140003', 1));
SELECT tests.hold('c2', billing.reserve_credits('00000000-0000-0000-0000-000000140003', 1));
SELECT tests.err($$SELECT billing.reserve_credits('00000000-0000-0000-0000-000000140003', 1)$$) AS third;
SELECT (billing.release_hold(tests.h('c1'))) ->> 'status' AS status;
SELECT tests.hold('c3', billing.reserve_credits('00000000-0000-0000-0000-000000140003', 1)) ->> 'held' AS after_release;
SELECT tests.err($$SELECT billing.set_max_active_holds('00000000-0000-0000-0000-000000140003', -1)$$) AS negative_cap;
SELECT billing.set_max_active_holds('00000000-0000-0000-0000-000000140003', NULL) - 'user_id' AS no_cap;

-- ===== Argument rules =====
SELECT tests.err($$SELECT billing.reserve_credits('00000000-0000-0000-0000-000000140003', 1, '0.5 seconds')$$) AS ttl_short;
SELECT tests.err($$SELECT billing.reserve_credits('00000000-0000-0000-0000-000000140003', 1, '24 hours 1 second')$$) AS ttl_long;
SELECT tests.err($$SELECT billing.reserve_credits('00000000-0000-0000-0000-000000140003', 1, '1 month')$$) AS ttl_month;
SELECT tests.err($$SELECT billing.reserve_credits('00000000-0000-0000-0000-000000140003', 1, NULL)$$) AS ttl_null;
SELECT tests.err($$SELECT billing.reserve_credits('00000000-0000-0000-0000-000000140003', 0)$$) AS amount_zero;
SELECT tests.err($$SELECT billing.reserve_credits('00000000-0000-0000-0000-000000140003', 1, p_feature => ' ')$$) AS blank_feature;
SELECT tests.err($$SELECT billing.reserve_credits('00000000-0000-0000-0000-000000149999', 1)$$) AS no_account;
SELECT tests.err($$SELECT billing.capture_hold('00000000-0000-0000-0000-000000149999', 1)$$) AS unknown_hold;
SELECT tests.err($$SELECT billing.release_hold(NULL)$$) AS null_hold;
SELECT billing.reserve_credits('00000000-0000-0000-0000-000000140003', 1, '24 hours') ->> 'held' AS ttl_day;
SELECT billing.reserve_credits('00000000-0000-0000-0000-000000140003', 1, '1 second') ->> 'held' AS ttl_second;

-- ===== Idempotency: a keyed repeat replays, other arguments are PT409 =====
SELECT (billing.reserve_credits('00000000-0000-0000-0000-000000140003', 2, p_idempotency_key => 'job-1')) ->> 'hold_id'
     = (billing.reserve_credits('00000000-0000-0000-0000-000000140003', 2, p_idempotency_key => 'job-1')) ->> 'hold_id' AS same_hold;
SELECT tests.err($$SELECT billing.reserve_credits('00000000-0000-0000-0000-000000140003', 3, p_idempotency_key => 'job-1')$$) AS other_amount;
SELECT count(*) AS keyed_holds FROM billing.credit_holds WHERE idempotency_key = 'job-1';

-- ===== increase_hold and extend_hold =====
SELECT (billing.add_purchased_credits('00000000-0000-0000-0000-000000140004', 100)) ->> 'total_balance' AS total;
SELECT tests.hold('inc', billing.reserve_credits('00000000-0000-0000-0000-000000140004', 60));
SELECT tests.err(format('SELECT billing.increase_hold(%L, 41)', tests.h('inc'))) AS increase_too_much;
SELECT tests.clean(billing.increase_hold(tests.h('inc'), 40)) AS increase;
SELECT * FROM tests.state('00000000-0000-0000-0000-000000140004');
SELECT tests.err(format('SELECT billing.increase_hold(%L, 0)', tests.h('inc'))) AS increase_zero;
SELECT (b.r ->> 'expires_at')::timestamptz > now() + interval '59 minutes' AS extended_an_hour, b.r ->> 'held' AS held
  FROM (SELECT billing.extend_hold(tests.h('inc'), '1 hour') AS r) AS b;
-- never earlier than it was
SELECT (billing.extend_hold(tests.h('inc'), '1 second') ->> 'expires_at')::timestamptz > now() + interval '59 minutes' AS kept;
SELECT tests.err(format($$SELECT billing.extend_hold(%L, '2 days')$$, tests.h('inc'))) AS extend_too_long;
SELECT (billing.release_hold(tests.h('inc'))) ->> 'released' AS released;
SELECT tests.err(format($$SELECT billing.extend_hold(%L, '1 hour')$$, tests.h('inc'))) AS extend_released;
SELECT tests.err(format($$SELECT billing.increase_hold(%L, 1)$$, tests.h('inc'))) AS increase_released;

-- ===== Expiry takes effect when read: a crashed worker's hold frees its credits by itself =====
SELECT tests.hold('crash', billing.reserve_credits('00000000-0000-0000-0000-000000140004', 70, '1 second'));
SELECT tests.hold('short', billing.reserve_credits('00000000-0000-0000-0000-000000140004', 10, '1 second'));
SELECT * FROM tests.state('00000000-0000-0000-0000-000000140004');
SELECT pg_sleep(1.3);
-- Reads show the credits back without any write (the stored held sum is not settled yet).
SELECT * FROM tests.state('00000000-0000-0000-0000-000000140004');
SELECT status FROM tests.hrow('crash');
-- extend and increase of an expired hold: PT410
SELECT tests.err(format($$SELECT billing.extend_hold(%L, '1 hour')$$, tests.h('crash'))) AS extend_expired;
-- The next write settles it: status expired, resolved at its expiry, the held sum 0.
SELECT (billing.consume_credits_v2('00000000-0000-0000-0000-000000140004', 95)) ->> 'total_balance' AS spend_it_all_but_5;
SELECT status, resolved_at = expires_at AS resolved_at_expiry FROM tests.hrow('crash');
SELECT * FROM tests.state('00000000-0000-0000-0000-000000140004');
-- Within pg_billing.hold_capture_grace (60 s by default) the expired hold is still captured,
-- from the free balance (its credits came back at the expiry): 5 are left, so 8 -> 5 + 3 unfunded.
SELECT tests.clean(billing.capture_hold(tests.h('crash'), 8)) AS capture_in_grace;
SELECT status, captured_amount FROM tests.hrow('crash');
-- Past the grace: PT410, a distinct SQLSTATE, and nothing changes (the hold stays expired).
SET pg_billing.hold_capture_grace = 0;
SELECT tests.err(format('SELECT billing.capture_hold(%L, 1)', tests.h('short'))) AS capture_expired;
SELECT status FROM tests.hrow('short');
-- releasing it reports the expiry
SELECT tests.clean(billing.release_hold(tests.h('short'))) AS release_expired;
RESET pg_billing.hold_capture_grace;
-- Within the grace a release resolves an expired hold (releasing 0: its credits are back
-- already), so no capture can follow it.
SELECT (billing.add_purchased_credits('00000000-0000-0000-0000-000000140004', 5)) ->> 'total_balance' AS total;
SELECT tests.hold('late', billing.reserve_credits('00000000-0000-0000-0000-000000140004', 5, '1 second'));
SELECT pg_sleep(1.2);
SELECT tests.clean(billing.release_hold(tests.h('late'))) AS release_in_grace;
SELECT tests.clean(billing.capture_hold(tests.h('late'), 5)) AS capture_after_release;
SELECT status, captured_amount FROM tests.hrow('late');
SHOW pg_billing.hold_capture_grace;
SELECT * FROM tests.state('00000000-0000-0000-0000-000000140004');

-- ===== Scoped holds: a hold for a feature may be funded by grants scoped to it =====
SELECT (billing.grant_credits('00000000-0000-0000-0000-000000140005', 50, 'promotional', p_scope => ARRAY['img'])) ->> 'available' AS unscoped_available;
SELECT tests.err($$SELECT billing.reserve_credits('00000000-0000-0000-0000-000000140005', 10)$$) AS unscoped_hold;
SELECT tests.hold('img', billing.reserve_credits('00000000-0000-0000-0000-000000140005', 30, p_feature => 'img'));
SELECT tests.err($$SELECT billing.consume_credits('00000000-0000-0000-0000-000000140005', 21, 'img')$$) AS consume_img_21;
SELECT (billing.consume_credits('00000000-0000-0000-0000-000000140005', 20, 'img')) ->> 'available' AS consume_img_20;
SELECT tests.clean(billing.capture_hold(tests.h('img'), 30)) AS capture_img;
SELECT * FROM tests.state('00000000-0000-0000-0000-000000140005');

-- ===== Members: consume_generation and the usage status leave held credits alone =====
SELECT (billing.upsert_member('holds-gen@example.com', 'free', '2190-01-31') ->> 'credits_granted') AS granted;
-- (the member's id read first: on a Citus cluster a call with it runs on the member's worker)
SELECT user_id AS gen_id FROM billing.members WHERE email = 'holds-gen@example.com' \gset
SELECT tests.hold('gen', billing.reserve_credits(:'gen_id', 9));
SELECT tests.err(format('SELECT billing.consume_generation(%L, 2)', :'gen_id')) AS generation_2;
SELECT r - 'member_id' - 'email' - 'period_start' - 'renewal_date' AS status
  FROM billing.get_usage_status(:'gen_id') AS r;
SELECT (billing.consume_generation(:'gen_id', 1)) ->> 'type' AS generation_1;
SELECT (billing.capture_hold(tests.h('gen'), 9)) ->> 'captured' AS captured;
SELECT count(*) AS mismatches FROM billing.verify_ledger(:'gen_id');

-- ===== End users: reserve on their own account only, see their own holds, never resolve =====
SELECT (billing.add_purchased_credits('00000000-0000-0000-0000-000000140006', 40)) ->> 'total_balance' AS total;
SELECT (billing.add_purchased_credits('00000000-0000-0000-0000-000000140001', 10)) ->> 'total_balance' AS total;
SELECT tests.hold('other', billing.reserve_credits('00000000-0000-0000-0000-000000140001', 5));
SET ROLE authenticated;
SELECT set_config('request.jwt.claims', '{"sub":"00000000-0000-0000-0000-000000140006","role":"authenticated"}', false) IS NOT NULL AS claims_set;
SELECT tests.hold('mine', billing.reserve_credits('00000000-0000-0000-0000-000000140006', 15));
SELECT tests.err($$SELECT billing.reserve_credits('00000000-0000-0000-0000-000000140001', 1)$$) AS reserve_other;
SELECT amount FROM billing.get_active_holds('00000000-0000-0000-0000-000000140006');
SELECT tests.err($$SELECT billing.get_active_holds('00000000-0000-0000-0000-000000140001')$$) AS read_other;
-- single node only: Citus reads the workers as the current role, and Supabase's authenticated role cannot log in
\if :single_node
SELECT user_id, amount, status FROM billing.credit_holds ORDER BY created_at;
\endif
-- single node only: Citus reads the workers as the current role, and Supabase's authenticated role cannot log in
\if :single_node
SELECT available FROM billing.user_credits;
\endif
SELECT tests.err(format('SELECT billing.capture_hold(%L, 0)', tests.h('mine'))) AS capture_own;
SELECT tests.err(format('SELECT billing.release_hold(%L)', tests.h('mine'))) AS release_own;
SELECT tests.err(format($$SELECT billing.extend_hold(%L, '1 hour')$$, tests.h('mine'))) AS extend_own;
SELECT tests.err(format('SELECT billing.increase_hold(%L, 1)', tests.h('mine'))) AS increase_own;
SELECT tests.err($$SELECT billing.cleanup_holds('30 days')$$) AS cleanup;
SELECT tests.err($$UPDATE billing.credit_holds SET status = 'released'$$) AS write_table;
RESET ROLE;
SELECT set_config('request.jwt.claims', '', false) = '' AS claims_cleared;
SELECT (billing.release_hold(tests.h('mine'))) ->> 'released' AS released;

-- ===== cleanup_holds keeps at least a day and never deletes an active hold =====
SELECT tests.err($$SELECT billing.cleanup_holds('1 hour')$$) AS too_short;
SELECT billing.cleanup_holds('1 day') AS deleted_recent;
-- (times moved with IMMUTABLE functions: Citus takes no STABLE one over columns in an UPDATE)
UPDATE billing.credit_holds SET resolved_at = (resolved_at AT TIME ZONE 'UTC' - interval '40 days') AT TIME ZONE 'UTC' WHERE id IN (tests.h('rel'), tests.h('llm'));
UPDATE billing.credit_holds SET created_at = (created_at AT TIME ZONE 'UTC' - interval '40 days') AT TIME ZONE 'UTC',
                                 expires_at = (expires_at AT TIME ZONE 'UTC' - interval '40 days') AT TIME ZONE 'UTC'
 WHERE id = tests.h('other');
SELECT billing.cleanup_holds() AS deleted_old;
SELECT (SELECT count(*) FROM tests.hrow('rel')) + (SELECT count(*) FROM tests.hrow('llm')) + (SELECT count(*) FROM tests.hrow('other')) AS rel_left;

-- Every account's books, held sums included.
SELECT count(*) AS mismatches FROM billing.verify_ledger();
SET client_min_messages = warning;
DROP SCHEMA tests CASCADE;
RESET client_min_messages;
