-- Events out (issue 15), balance rules: billing.set_balance_alert fires balance.low when the
-- available balance (subscription + purchased - held - debt) falls below the threshold,
-- balance.depleted at zero, balance.recovered once it is back at ceil(threshold * (1 + hysteresis)),
-- and then re-arms. Once per downward crossing; setting a rule fires nothing; a user's rule
-- overrides the plan's; NULL removes a rule; every argument error has its SQLSTATE; a rolled-back
-- write leaves no event. Every statement is its own transaction (the events of a write are
-- written in its transaction). Users 00000000-0000-0000-0000-0000001501xx.
-- Helpers live in schema tests, not pg_temp: on a Citus cluster a query that calls one may run on a worker.
CREATE SCHEMA tests;
GRANT USAGE ON SCHEMA tests TO PUBLIC;
-- single_node: false on a Citus cluster, where the sections marked 'single node only' are skipped
SELECT NOT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'citus') AS single_node \gset
SET TimeZone = 'UTC';
SET DateStyle = 'ISO, YMD';
-- err(sql): 'SQLSTATE: message' instead of failing
CREATE FUNCTION tests.err(p_sql text) RETURNS text LANGUAGE plpgsql AS $f$
DECLARE st text; msg text;
BEGIN
    EXECUTE p_sql;
    RETURN 'no error';
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT;
    RETURN st || ': ' || msg;
END
$f$;
-- new_events(user): the user's events written since the last call for that user, in id order,
-- payload without user_id (checked apart, at the end), subscription.changed left out (see
-- events_types). No rows: nothing fired.
CREATE TEMP TABLE seen (user_id uuid PRIMARY KEY, last_id bigint NOT NULL);
CREATE FUNCTION tests.new_events(p_user uuid) RETURNS TABLE (type text, payload jsonb) LANGUAGE plpgsql AS $f$
DECLARE v_last bigint;
BEGIN
    SELECT s.last_id INTO v_last FROM pg_temp.seen AS s WHERE s.user_id = p_user;
    RETURN QUERY SELECT e.type, e.payload - 'user_id' FROM billing.events AS e
                  WHERE e.user_id = p_user AND e.id > COALESCE(v_last, 0) AND e.type <> 'subscription.changed' ORDER BY e.id;
    INSERT INTO pg_temp.seen SELECT p_user, COALESCE(max(e.id), 0) FROM billing.events AS e WHERE e.user_id = p_user
    ON CONFLICT (user_id) DO UPDATE SET last_id = EXCLUDED.last_id;
END
$f$;
-- st(user): the account's effective rule and its state (0 armed, 1 low fired, 2 depleted fired),
-- and the available balance
CREATE FUNCTION tests.st(p_user uuid)
RETURNS TABLE (alert_threshold bigint, alert_rearm bigint, alert_state smallint, available bigint)
LANGUAGE plpgsql AS $f$
#variable_conflict use_column
BEGIN
FOR alert_threshold, alert_rearm, alert_state, available IN
    SELECT a.alert_threshold, a.alert_rearm, a.alert_state,
           a.subscription_credits_balance + a.purchased_credits_balance - a.held - a.debt
      FROM billing.accounts AS a WHERE a.user_id = p_user
LOOP RETURN NEXT; END LOOP;
END
$f$;
-- total(r): the total_balance of a credit function's result
CREATE FUNCTION tests.total(r jsonb) RETURNS bigint LANGUAGE sql AS $f$ SELECT (r ->> 'total_balance')::bigint $f$;

-- ===== the tables and the defaults =====
SELECT column_name, data_type, column_default IS NOT NULL AS has_default, is_nullable
  FROM information_schema.columns
 WHERE table_schema = 'billing' AND table_name = 'accounts' AND column_name LIKE 'alert%' ORDER BY column_name;
SELECT column_name, data_type, is_nullable
  FROM information_schema.columns
 WHERE table_schema = 'billing' AND table_name = 'events' ORDER BY ordinal_position;
-- an account without a rule: no threshold, armed
SELECT tests.total(billing.add_purchased_credits('00000000-0000-0000-0000-000000150101', 1000)) AS total;
SELECT * FROM tests.st('00000000-0000-0000-0000-000000150101');
-- no rule, nothing fires however low it goes
SELECT tests.total(billing.consume_credits_v2('00000000-0000-0000-0000-000000150101', 995)) AS total;
SELECT * FROM tests.new_events('00000000-0000-0000-0000-000000150101');
SELECT tests.total(billing.add_purchased_credits('00000000-0000-0000-0000-000000150101', 995)) AS total;

-- ===== a user's rule: low, once; hysteresis; recovered; low again; depleted =====
-- setting it fires nothing (1000 available >= 100: armed); rearm_at = ceil(100 * 1.1) = 110
SELECT billing.set_balance_alert(100, '00000000-0000-0000-0000-000000150101') AS rule;
SELECT * FROM tests.st('00000000-0000-0000-0000-000000150101');
SELECT * FROM tests.new_events('00000000-0000-0000-0000-000000150101');
-- 150: above the threshold, nothing
SELECT tests.total(billing.consume_credits_v2('00000000-0000-0000-0000-000000150101', 850)) AS total;
SELECT * FROM tests.new_events('00000000-0000-0000-0000-000000150101');
-- 100: at the threshold is not below it, nothing
SELECT tests.total(billing.consume_credits_v2('00000000-0000-0000-0000-000000150101', 50)) AS total;
SELECT * FROM tests.new_events('00000000-0000-0000-0000-000000150101');
-- 99: below, balance.low
SELECT tests.total(billing.consume_credits_v2('00000000-0000-0000-0000-000000150101', 1)) AS total;
SELECT * FROM tests.new_events('00000000-0000-0000-0000-000000150101');
SELECT * FROM tests.st('00000000-0000-0000-0000-000000150101');
-- 80, still below: fired once, nothing more
SELECT tests.total(billing.consume_credits(  '00000000-0000-0000-0000-000000150101', 19)) AS total;
SELECT * FROM tests.new_events('00000000-0000-0000-0000-000000150101');
-- back above the threshold but below rearm_at (109): nothing, and it does not re-arm
SELECT tests.total(billing.add_purchased_credits('00000000-0000-0000-0000-000000150101', 29)) AS total;
SELECT * FROM tests.new_events('00000000-0000-0000-0000-000000150101');
SELECT * FROM tests.st('00000000-0000-0000-0000-000000150101');
-- so dropping below again (95) fires nothing: hysteresis
SELECT tests.total(billing.consume_credits_v2('00000000-0000-0000-0000-000000150101', 14)) AS total;
SELECT * FROM tests.new_events('00000000-0000-0000-0000-000000150101');
-- 110 = rearm_at: balance.recovered, armed again
SELECT tests.total(billing.add_purchased_credits('00000000-0000-0000-0000-000000150101', 15)) AS total;
SELECT * FROM tests.new_events('00000000-0000-0000-0000-000000150101');
SELECT * FROM tests.st('00000000-0000-0000-0000-000000150101');
-- more credits: nothing (already armed)
SELECT tests.total(billing.add_purchased_credits('00000000-0000-0000-0000-000000150101', 10)) AS total;
SELECT * FROM tests.new_events('00000000-0000-0000-0000-000000150101');
-- 99 again: balance.low again (a second downward crossing)
SELECT billing.decrement_credits_with_log('00000000-0000-0000-0000-000000150101', 21) AS total;
SELECT * FROM tests.new_events('00000000-0000-0000-0000-000000150101');
-- to 0 after low: balance.depleted only
SELECT tests.total(billing.consume_credits_v2('00000000-0000-0000-0000-000000150101', 99)) AS total;
SELECT * FROM tests.new_events('00000000-0000-0000-0000-000000150101');
SELECT * FROM tests.st('00000000-0000-0000-0000-000000150101');
-- 50, then 109: below rearm_at, nothing; 110: recovered (from depleted)
SELECT tests.total(billing.add_purchased_credits('00000000-0000-0000-0000-000000150101', 50)) AS total;
SELECT tests.total(billing.add_purchased_credits('00000000-0000-0000-0000-000000150101', 59)) AS total;
SELECT * FROM tests.new_events('00000000-0000-0000-0000-000000150101');
SELECT tests.total(billing.add_subscription_credits('00000000-0000-0000-0000-000000150101', 1)) AS total;
SELECT * FROM tests.new_events('00000000-0000-0000-0000-000000150101');
-- from armed straight to 0 in one write: balance.low, then balance.depleted, in that order
SELECT tests.total(billing.consume_credits_v2('00000000-0000-0000-0000-000000150101', 110)) AS total;
SELECT * FROM tests.new_events('00000000-0000-0000-0000-000000150101');
SELECT * FROM tests.st('00000000-0000-0000-0000-000000150101');
-- a failed write (PT402) writes no event
SELECT tests.err($$SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000150101', 1)$$) AS consume_at_zero;
SELECT * FROM tests.new_events('00000000-0000-0000-0000-000000150101');
SELECT tests.total(billing.add_purchased_credits('00000000-0000-0000-0000-000000150101', 500)) AS total;
SELECT * FROM tests.new_events('00000000-0000-0000-0000-000000150101');

-- ===== hysteresis and rearm_at =====
SELECT billing.set_balance_alert(100, '00000000-0000-0000-0000-000000150101', p_hysteresis => 0) ->> 'rearm_at' AS h0;
SELECT billing.set_balance_alert(100, '00000000-0000-0000-0000-000000150101', p_hysteresis => 1.5) ->> 'rearm_at' AS h1_5;
SELECT billing.set_balance_alert(7, '00000000-0000-0000-0000-000000150101') ->> 'rearm_at' AS t7_default;
SELECT billing.set_balance_alert(3, '00000000-0000-0000-0000-000000150101', p_hysteresis => 0.5) ->> 'rearm_at' AS t3_h0_5;
SELECT billing.set_balance_alert(1, '00000000-0000-0000-0000-000000150101', p_hysteresis => 10) ->> 'rearm_at' AS t1_h10;
SELECT user_id, threshold, hysteresis FROM billing.user_balance_alerts WHERE user_id = '00000000-0000-0000-0000-000000150101';
-- hysteresis 0: re-arms as soon as the balance is back at the threshold
SELECT billing.set_balance_alert(100, '00000000-0000-0000-0000-000000150101', p_hysteresis => 0) ->> 'rearm_at' AS rearm_at;
SELECT tests.total(billing.consume_credits_v2('00000000-0000-0000-0000-000000150101', 401)) AS total;
SELECT tests.total(billing.add_purchased_credits('00000000-0000-0000-0000-000000150101', 1)) AS total;
SELECT type, payload ->> 'available' AS available, payload ->> 'rearm_at' AS rearm_at
  FROM tests.new_events('00000000-0000-0000-0000-000000150101');
-- none of these settings fired anything
SELECT * FROM tests.st('00000000-0000-0000-0000-000000150101');

-- ===== setting a rule fires nothing; the state follows the balance =====
-- 50 available, threshold 100: as if low had fired; nothing now, nothing at 10
SELECT tests.total(billing.add_purchased_credits('00000000-0000-0000-0000-000000150102', 50)) AS total;
SELECT billing.set_balance_alert(100, '00000000-0000-0000-0000-000000150102') AS rule;
SELECT * FROM tests.st('00000000-0000-0000-0000-000000150102');
SELECT tests.total(billing.consume_credits_v2('00000000-0000-0000-0000-000000150102', 40)) AS total;
SELECT * FROM tests.new_events('00000000-0000-0000-0000-000000150102');
-- at 0: depleted (low counts as fired)
SELECT tests.total(billing.consume_credits_v2('00000000-0000-0000-0000-000000150102', 10)) AS total;
SELECT * FROM tests.new_events('00000000-0000-0000-0000-000000150102');
-- setting the rule again at 0 fires nothing either; the state stays fired
SELECT billing.set_balance_alert(20, '00000000-0000-0000-0000-000000150102') - 'user_id' AS rule;
SELECT * FROM tests.st('00000000-0000-0000-0000-000000150102');
SELECT * FROM tests.new_events('00000000-0000-0000-0000-000000150102');
-- 22 = ceil(20 * 1.1): recovered
SELECT tests.total(billing.add_purchased_credits('00000000-0000-0000-0000-000000150102', 22)) AS total;
SELECT * FROM tests.new_events('00000000-0000-0000-0000-000000150102');
-- a rule on an account that is above the threshold is armed; lowering the threshold below the
-- balance while fired re-arms without an event
SELECT billing.set_balance_alert(50, '00000000-0000-0000-0000-000000150102') - 'user_id' AS rule;
SELECT * FROM tests.st('00000000-0000-0000-0000-000000150102');
SELECT billing.set_balance_alert(10, '00000000-0000-0000-0000-000000150102') - 'user_id' AS rule;
SELECT * FROM tests.st('00000000-0000-0000-0000-000000150102');
SELECT * FROM tests.new_events('00000000-0000-0000-0000-000000150102');

-- ===== holds and debt count: available = spendable - held - debt =====
-- a reservation crosses the threshold (low); releasing it recovers
SELECT tests.total(billing.add_purchased_credits('00000000-0000-0000-0000-000000150103', 100)) AS total;
SELECT billing.set_balance_alert(50, '00000000-0000-0000-0000-000000150103', p_hysteresis => 0.2) ->> 'rearm_at' AS rearm_at;
SELECT (billing.reserve_credits('00000000-0000-0000-0000-000000150103', 60)) ->> 'available' AS available_after_reserve;
SELECT * FROM tests.new_events('00000000-0000-0000-0000-000000150103');
-- (the hold's id read first: on a Citus cluster the call runs on the user's worker)
SELECT id AS hold_id FROM billing.credit_holds WHERE user_id = '00000000-0000-0000-0000-000000150103' AND status = 'active' \gset
SELECT billing.release_hold(:'hold_id') ->> 'available' AS available_after_release;
SELECT * FROM tests.new_events('00000000-0000-0000-0000-000000150103');
-- a reservation of everything: low and depleted; capturing part of it gives the rest back: recovered
SELECT (billing.reserve_credits('00000000-0000-0000-0000-000000150103', 100)) ->> 'available' AS available_after_reserve;
SELECT type, payload ->> 'available' AS available, payload ->> 'held' AS held FROM tests.new_events('00000000-0000-0000-0000-000000150103');
SELECT id AS hold_id FROM billing.credit_holds WHERE user_id = '00000000-0000-0000-0000-000000150103' AND status = 'active' \gset
SELECT billing.capture_hold(:'hold_id', 30) ->> 'available' AS available_after_capture;
SELECT type, payload ->> 'available' AS available, payload ->> 'held' AS held FROM tests.new_events('00000000-0000-0000-0000-000000150103');
-- overdraft: the debt is subtracted; below zero is depleted
SELECT billing.set_overdraft_limit('00000000-0000-0000-0000-000000150103', 100) - 'user_id' AS od;
SELECT tests.total(billing.consume_credits('00000000-0000-0000-0000-000000150103', 90)) AS total;
SELECT type, payload ->> 'available' AS available, payload ->> 'debt' AS debt FROM tests.new_events('00000000-0000-0000-0000-000000150103');
-- a grant that repays the debt and leaves 70: recovered (rearm_at 60)
SELECT (billing.grant_credits('00000000-0000-0000-0000-000000150103', 90, 'purchased')) ->> 'available' AS available;
SELECT type, payload ->> 'available' AS available, payload ->> 'debt' AS debt FROM tests.new_events('00000000-0000-0000-0000-000000150103');
SELECT billing.set_balance_alert(NULL, '00000000-0000-0000-0000-000000150103') - 'user_id' AS removed;

-- ===== a plan's rule; a user's rule overrides it; NULL removes a rule =====
INSERT INTO billing.plans (plan_id, display_name, monthly_credits) VALUES ('ev_bal_plan', 'Events balance plan', 0), ('ev_bal_other', 'Events other plan', 0);
SELECT billing.upsert_subscription('00000000-0000-0000-0000-000000150104', 'ev_bal_plan', 'active', now(), now() + interval '30 days') ->> 'applied' AS applied;
SELECT billing.upsert_subscription('00000000-0000-0000-0000-000000150105', 'ev_bal_plan', 'active', now(), now() + interval '30 days') ->> 'applied' AS applied;
SELECT tests.total(billing.add_purchased_credits('00000000-0000-0000-0000-000000150104', 100)) AS total;
SELECT tests.total(billing.add_purchased_credits('00000000-0000-0000-0000-000000150105', 300)) AS total;
-- the plan's rule applies to both accounts on the plan (accounts = 2)
SELECT billing.set_balance_alert(50, p_plan_id => 'ev_bal_plan') AS plan_rule;
SELECT plan_id, threshold, hysteresis FROM billing.plan_balance_alerts WHERE plan_id = 'ev_bal_plan';
SELECT * FROM tests.st('00000000-0000-0000-0000-000000150104');
-- user 105's own rule overrides it (accounts = 1)
SELECT billing.set_balance_alert(200, '00000000-0000-0000-0000-000000150105') AS user_rule;
SELECT * FROM tests.st('00000000-0000-0000-0000-000000150105');
-- 104 crosses the plan's 50: rule 'plan'
SELECT tests.total(billing.consume_credits_v2('00000000-0000-0000-0000-000000150104', 51)) AS total;
SELECT * FROM tests.new_events('00000000-0000-0000-0000-000000150104');
-- 105 at 150 is below its own 200 (the plan's 50 does not matter): rule 'user'
SELECT tests.total(billing.consume_credits_v2('00000000-0000-0000-0000-000000150105', 150)) AS total;
SELECT * FROM tests.new_events('00000000-0000-0000-0000-000000150105');
-- changing the plan's rule again does not touch 105 (accounts = 1: only 104)
SELECT billing.set_balance_alert(60, p_plan_id => 'ev_bal_plan') AS plan_rule;
SELECT * FROM tests.st('00000000-0000-0000-0000-000000150105');
-- removing 105's rule: the plan's (60) applies again, 150 is above it: armed, no event
SELECT billing.set_balance_alert(NULL, '00000000-0000-0000-0000-000000150105') AS removed;
SELECT * FROM billing.user_balance_alerts WHERE user_id = '00000000-0000-0000-0000-000000150105';
SELECT * FROM tests.st('00000000-0000-0000-0000-000000150105');
SELECT * FROM tests.new_events('00000000-0000-0000-0000-000000150105');
SELECT tests.total(billing.consume_credits_v2('00000000-0000-0000-0000-000000150105', 100)) AS total;
SELECT type, payload ->> 'rule' AS rule, payload ->> 'plan_id' AS plan_id, payload ->> 'threshold' AS threshold
  FROM tests.new_events('00000000-0000-0000-0000-000000150105');
-- removing a rule that does not exist: accounts = 0
SELECT billing.set_balance_alert(NULL, '00000000-0000-0000-0000-000000150105') AS removed_again;
-- a user who leaves the plan leaves its rule (upsert_subscription to another plan)
SELECT billing.upsert_subscription('00000000-0000-0000-0000-000000150104', 'ev_bal_other', 'active', now(), now() + interval '30 days') ->> 'applied' AS applied;
SELECT * FROM tests.st('00000000-0000-0000-0000-000000150104');
-- removing the plan's rule: no rule left; nothing fires
SELECT billing.set_balance_alert(NULL, p_plan_id => 'ev_bal_plan') AS plan_removed;
SELECT count(*) AS plan_rules FROM billing.plan_balance_alerts WHERE plan_id = 'ev_bal_plan';
SELECT * FROM tests.st('00000000-0000-0000-0000-000000150105');
SELECT tests.total(billing.consume_credits_v2('00000000-0000-0000-0000-000000150105', 50)) AS total;
SELECT * FROM tests.new_events('00000000-0000-0000-0000-000000150105');

-- ===== argument errors, each with its SQLSTATE; none changes anything =====
SELECT tests.err($$SELECT billing.set_balance_alert(10)$$) AS neither;
SELECT tests.err($$SELECT billing.set_balance_alert(10, '00000000-0000-0000-0000-000000150101', 'ev_bal_plan')$$) AS both;
SELECT tests.err($$SELECT billing.set_balance_alert(NULL)$$) AS null_neither;
SELECT tests.err($$SELECT billing.set_balance_alert(0, '00000000-0000-0000-0000-000000150101')$$) AS threshold_0;
SELECT tests.err($$SELECT billing.set_balance_alert(-5, p_plan_id => 'ev_bal_plan')$$) AS threshold_negative;
SELECT tests.err($$SELECT billing.set_balance_alert(10, '00000000-0000-0000-0000-000000150101', p_hysteresis => -0.1)$$) AS hysteresis_negative;
SELECT tests.err($$SELECT billing.set_balance_alert(10, '00000000-0000-0000-0000-000000150101', p_hysteresis => 10.01)$$) AS hysteresis_10_01;
SELECT tests.err($$SELECT billing.set_balance_alert(10, '00000000-0000-0000-0000-000000150101', p_hysteresis => NULL)$$) AS hysteresis_null;
SELECT tests.err($$SELECT billing.set_balance_alert(10, p_plan_id => 'no_such_plan')$$) AS unknown_plan;
SELECT tests.err($$SELECT billing.set_balance_alert(NULL, p_plan_id => 'no_such_plan')$$) AS unknown_plan_remove;
SELECT user_id, threshold, hysteresis FROM billing.user_balance_alerts WHERE user_id = '00000000-0000-0000-0000-000000150101';
SELECT count(*) AS plan_rules FROM billing.plan_balance_alerts WHERE plan_id IN ('ev_bal_plan', 'no_such_plan');
-- a rule for a user who has no account yet makes the account, armed (like any new account): the
-- first purchase (above the threshold) fires nothing, then the rule works as for any account
SELECT billing.set_balance_alert(30, '00000000-0000-0000-0000-000000150106') - 'user_id' AS rule_before_account;
SELECT tests.total(billing.add_purchased_credits('00000000-0000-0000-0000-000000150106', 40)) AS total;
SELECT * FROM tests.st('00000000-0000-0000-0000-000000150106');
SELECT tests.total(billing.consume_credits_v2('00000000-0000-0000-0000-000000150106', 20)) AS total;
SELECT type, payload ->> 'available' AS available FROM tests.new_events('00000000-0000-0000-0000-000000150106');

-- ===== a rolled-back write leaves no event (and the rule's state rolls back with it) =====
SELECT tests.total(billing.add_purchased_credits('00000000-0000-0000-0000-000000150107', 100)) AS total;
SELECT billing.set_balance_alert(50, '00000000-0000-0000-0000-000000150107') ->> 'rearm_at' AS rearm_at;
BEGIN;
SELECT tests.total(billing.consume_credits_v2('00000000-0000-0000-0000-000000150107', 100)) AS total;
-- inside the transaction: low and depleted, written by this transaction
-- single node only: events.tx is the id of the writing transaction on the node that holds the user (event delivery's design; issue 17)
\if :single_node
SELECT type, tx = pg_current_xact_id() AS this_transaction, created_at BETWEEN now() AND clock_timestamp() AS during_it
  FROM billing.events WHERE user_id = '00000000-0000-0000-0000-000000150107' ORDER BY id;
\endif
ROLLBACK;
SELECT count(*) AS events_after_rollback FROM billing.events WHERE user_id = '00000000-0000-0000-0000-000000150107';
SELECT * FROM tests.st('00000000-0000-0000-0000-000000150107');
-- the same write committed fires them (the rule was armed all along)
SELECT tests.total(billing.consume_credits_v2('00000000-0000-0000-0000-000000150107', 100)) AS total;
SELECT type FROM tests.new_events('00000000-0000-0000-0000-000000150107');
-- a savepoint rolled back takes its events with it
BEGIN;
SELECT tests.total(billing.add_purchased_credits('00000000-0000-0000-0000-000000150107', 60)) AS total;
SAVEPOINT s;
SELECT tests.total(billing.consume_credits_v2('00000000-0000-0000-0000-000000150107', 60)) AS total;
ROLLBACK TO SAVEPOINT s;
COMMIT;
SELECT type, payload ->> 'available' AS available FROM tests.new_events('00000000-0000-0000-0000-000000150107');
SELECT * FROM tests.st('00000000-0000-0000-0000-000000150107');

-- ===== every event: payload.user_id is the row's user; one user's events in id order of commit =====
SELECT count(*) AS events,
       count(*) FILTER (WHERE payload ->> 'user_id' IS DISTINCT FROM user_id::text) AS wrong_user,
       count(*) FILTER (WHERE type NOT IN ('balance.low', 'balance.depleted', 'balance.recovered')) AS other_types
  FROM billing.events WHERE user_id::text LIKE '00000000-0000-0000-0000-0000001501%';
SELECT count(*) AS ledger_mismatches FROM billing.verify_ledger();
-- leave no rule and no plan behind (other tests list the plans)
CREATE TEMP TABLE rule_users AS SELECT user_id FROM billing.user_balance_alerts WHERE user_id::text LIKE '00000000-0000-0000-0000-0000001501%';
SELECT count(billing.set_balance_alert(NULL, u)) AS removed
  FROM (SELECT user_id FROM rule_users ORDER BY 1) AS x(u);
DELETE FROM billing.subscriptions WHERE user_id::text LIKE '00000000-0000-0000-0000-0000001501%';
DELETE FROM billing.plans WHERE plan_id IN ('ev_bal_plan', 'ev_bal_other');
SET client_min_messages = warning;
DROP SCHEMA tests CASCADE;
RESET client_min_messages;
