-- The delegated part of the functions that add credits (0.10.0, issue 17): billing._grant_on_shard,
-- which Citus runs on the worker that holds the user once billing.distribute() delegated it, for
-- add_purchased_credits, add_subscription_credits and refund_credits. Here it is called directly
-- (on one node it runs here; on a cluster Citus pushes the call down): it makes the grant as the
-- public functions do, its ledger rows with the ids it is given, and declines (NULL, nothing
-- changed) where an event could fire or the account must be made. Each statement is its own
-- transaction.
-- Errors without CONTEXT (on a cluster Citus adds the worker's address).
\set SHOW_CONTEXT never
-- Helpers live in schema tests, not pg_temp: on a Citus cluster a query that calls one may run on a worker.
CREATE SCHEMA tests;
GRANT USAGE ON SCHEMA tests TO PUBLIC;
-- state(user): the pools and debt, the grants, the ledger's sum and row count, the keys, the events:
-- what a declined call must not change.
CREATE FUNCTION tests.state(p_user uuid) RETURNS text LANGUAGE plpgsql AS $f$
DECLARE
    pools text;
    grants bigint;
    ledger text;
    keys bigint;
    events bigint;
BEGIN
    SELECT a.subscription_credits_balance || '/' || a.purchased_credits_balance || ' debt ' || a.debt INTO pools
      FROM billing.accounts AS a WHERE a.user_id = p_user;
    SELECT count(*) INTO grants FROM billing.credit_grants AS g WHERE g.user_id = p_user;
    SELECT COALESCE(sum(t.amount), 0) || ' in ' || count(*) || ' rows' INTO ledger FROM billing.credit_transactions AS t WHERE t.user_id = p_user;
    SELECT count(*) INTO keys FROM billing.idempotency_keys AS k WHERE k.user_id = p_user;
    SELECT count(*) INTO events FROM billing.events AS e WHERE e.user_id = p_user;
    RETURN 'pools ' || COALESCE(pools, '(no account)') || ', grants ' || grants || ', ledger ' || ledger || ', keys ' || keys
        || ', events ' || events;
END
$f$;
-- rows(user, first id): the user's ledger rows from that id on.
CREATE FUNCTION tests.rows(p_user uuid, p_from bigint) RETURNS TABLE (id bigint, type text, pool text, amount bigint, balance_after bigint, description text, reference_id text)
LANGUAGE plpgsql AS $f$
BEGIN
    -- (plpgsql: Citus cannot plan a SQL function whose parameters reach a distributed table.)
    RETURN QUERY SELECT t.id, t.type::text, t.pool::text, t.amount::bigint, t.balance_after::bigint, t.description, t.reference_id
      FROM billing.credit_transactions AS t WHERE t.user_id = p_user AND t.id >= p_from ORDER BY t.id;
END
$f$;

-- 1. No account: declined (add_purchased_credits makes it where the call started); refund_credits'
--    grant declined too (the coordinator then says P0002). Then the account exists.
SELECT billing._grant_on_shard('00000000-0000-0000-0000-0000000000c1', 100, '{900000101,900000102,900000103}', '{add_purchased_credits,NULL,NULL,NULL}') AS declined;
SELECT billing._grant_on_shard('00000000-0000-0000-0000-0000000000c1', 100, '{900000101,900000102,900000103}', '{refund_credits,NULL,NULL,NULL}') AS declined;
SELECT tests.state('00000000-0000-0000-0000-0000000000c1');
SELECT billing.add_purchased_credits('00000000-0000-0000-0000-0000000000c1', 100, 'first') ->> 'total_balance' AS total;

-- 2. The three functions' grants, as they make them: a purchase, a subscription grant (expiring
--    at the period end), a refund; the ledger rows with the ids given (the first of the three:
--    no debt to repay).
SELECT r ->> 'success' AS success, r ->> 'added' AS added, r ->> 'purchased_credits_balance' AS purchased,
       r ->> 'subscription_credits_balance' AS subscription, r ->> 'total_balance' AS total
  FROM billing._grant_on_shard('00000000-0000-0000-0000-0000000000c1', 50, '{900000101,900000102,900000103}', ARRAY['add_purchased_credits', 'on the shard', 'ref-1', NULL]) AS r;
SELECT billing._grant_on_shard('00000000-0000-0000-0000-0000000000c1', 30, '{900000104,900000105,900000106}', ARRAY['add_subscription_credits', 'monthly', NULL, NULL]) ->> 'total_balance' AS total;
SELECT billing._grant_on_shard('00000000-0000-0000-0000-0000000000c1', 5, '{900000107,900000108,900000109}', ARRAY['refund_credits', 'a refund', 'ref-2', NULL]) ->> 'total_balance' AS total;
SELECT * FROM tests.rows('00000000-0000-0000-0000-0000000000c1', 900000000);
SELECT g.category, g.pool, g.amount, g.remaining, g.description FROM billing.credit_grants AS g
 WHERE g.user_id = '00000000-0000-0000-0000-0000000000c1' ORDER BY g.created_at, g.id;
SELECT tests.state('00000000-0000-0000-0000-0000000000c1');
-- A ledger id taken: the error rolls the grant back (23505), nothing changed.
\set VERBOSITY sqlstate
SELECT billing._grant_on_shard('00000000-0000-0000-0000-0000000000c1', 5, '{900000101,900000110,900000111}', '{add_purchased_credits,NULL,NULL,NULL}');
\set VERBOSITY default
SELECT tests.state('00000000-0000-0000-0000-0000000000c1');

-- 3. Debt: an overdraft drawn, then a purchase on the shard repays it (three ledger rows, the
--    three ids).
SELECT billing.set_overdraft_limit('00000000-0000-0000-0000-0000000000c2', 50) ->> 'overdraft_limit' AS overdraft_limit;
SELECT billing.add_purchased_credits('00000000-0000-0000-0000-0000000000c2', 10) ->> 'total_balance' AS total;
SELECT billing.consume_credits_v2('00000000-0000-0000-0000-0000000000c2', 30) ->> 'total_balance' AS total;
SELECT tests.state('00000000-0000-0000-0000-0000000000c2');
SELECT billing._grant_on_shard('00000000-0000-0000-0000-0000000000c2', 25, '{900000201,900000202,900000203}', '{add_purchased_credits,NULL,NULL,NULL}') ->> 'total_balance' AS total;
SELECT * FROM tests.rows('00000000-0000-0000-0000-0000000000c2', 900000000);
SELECT tests.state('00000000-0000-0000-0000-0000000000c2');

-- 4. A balance rule on the account: declined (balance.recovered could fire; events are numbered
--    where the call started); without the rule, granted again.
SELECT billing.set_balance_alert(p_threshold := 1000, p_user_id := '00000000-0000-0000-0000-0000000000c1') IS NOT NULL AS rule_set;
SELECT billing._grant_on_shard('00000000-0000-0000-0000-0000000000c1', 5, '{900000112,900000113,900000114}', '{add_purchased_credits,NULL,NULL,NULL}') AS declined;
SELECT tests.state('00000000-0000-0000-0000-0000000000c1');
SELECT billing.set_balance_alert(p_threshold := NULL, p_user_id := '00000000-0000-0000-0000-0000000000c1') IS NOT NULL AS rule_removed;
SELECT billing._grant_on_shard('00000000-0000-0000-0000-0000000000c1', 5, '{900000112,900000113,900000114}', '{add_purchased_credits,NULL,NULL,NULL}') ->> 'total_balance' AS total;

-- 5. A grant past its expiry, not settled yet: declined (its grant.expired event); the public
--    function settles it and grants; then the shard grants again. (The expiry passes between two
--    transactions: inside one, now() does not move.)
SELECT billing.grant_credits('00000000-0000-0000-0000-0000000000c1', 7, 'promotional', p_expires_at := pg_catalog.clock_timestamp() + interval '1 second') ->> 'success' AS granted;
SELECT pg_catalog.pg_sleep(1.2);
SELECT billing._grant_on_shard('00000000-0000-0000-0000-0000000000c1', 5, '{900000115,900000116,900000117}', '{add_purchased_credits,NULL,NULL,NULL}') AS declined;
SELECT tests.state('00000000-0000-0000-0000-0000000000c1');
SELECT billing.add_purchased_credits('00000000-0000-0000-0000-0000000000c1', 5) ->> 'total_balance' AS total;
SELECT e.type, e.payload ->> 'expired_amount' AS expired FROM billing.events AS e WHERE e.user_id = '00000000-0000-0000-0000-0000000000c1' ORDER BY e.id;
SELECT billing._grant_on_shard('00000000-0000-0000-0000-0000000000c1', 5, '{900000115,900000116,900000117}', '{add_purchased_credits,NULL,NULL,NULL}') ->> 'total_balance' AS total;

-- 6. Idempotency keys, in the service's namespace: claimed and stored with the grant, replayed
--    (also by the public function); reused for another request: declined, so that the public
--    function raises PT409 where the call started; a declined call leaves no key behind.
SELECT billing._grant_on_shard('00000000-0000-0000-0000-0000000000c1', 8, '{900000118,900000119,900000120}', ARRAY['add_purchased_credits', NULL, NULL, 'g-1']) ->> 'total_balance' AS total;
SELECT billing._grant_on_shard('00000000-0000-0000-0000-0000000000c1', 8, '{900000121,900000122,900000123}', ARRAY['add_purchased_credits', NULL, NULL, 'g-1']) ->> 'total_balance' AS replayed_total;
SELECT billing.add_purchased_credits('00000000-0000-0000-0000-0000000000c1', 8, p_idempotency_key := 'g-1') ->> 'total_balance' AS replayed_total;
SELECT billing._grant_on_shard('00000000-0000-0000-0000-0000000000c1', 9, '{900000121,900000122,900000123}', ARRAY['add_purchased_credits', NULL, NULL, 'g-1']) AS declined;
SELECT billing._grant_on_shard('00000000-0000-0000-0000-0000000000c1', 8, '{900000121,900000122,900000123}', ARRAY['add_subscription_credits', NULL, NULL, 'g-1']) AS declined;
\set VERBOSITY sqlstate
SELECT billing.add_purchased_credits('00000000-0000-0000-0000-0000000000c1', 9, p_idempotency_key := 'g-1');
\set VERBOSITY default
SELECT tests.state('00000000-0000-0000-0000-0000000000c1');
SELECT billing._grant_on_shard('00000000-0000-0000-0000-0000000000c3', 8, '{900000301,900000302,900000303}', ARRAY['add_purchased_credits', NULL, NULL, 'g-2']) AS declined;
SELECT tests.state('00000000-0000-0000-0000-0000000000c3');

-- 7. Arguments: a NULL argument is NULL (STRICT: Citus would crash pushing down a call whose
--    user is NULL); a non-positive amount, ids of another number or NULL, a request of another
--    length or naming another function are 22023.
SELECT billing._grant_on_shard(NULL, 1, '{1,2,3}', '{add_purchased_credits,NULL,NULL,NULL}') IS NULL AS null_user;
SELECT billing._grant_on_shard('00000000-0000-0000-0000-0000000000c1', 1, NULL, '{add_purchased_credits,NULL,NULL,NULL}') IS NULL AS null_ids;
SELECT billing._grant_on_shard('00000000-0000-0000-0000-0000000000c1', 0, '{900000124,900000125,900000126}', '{add_purchased_credits,NULL,NULL,NULL}');
SELECT billing._grant_on_shard('00000000-0000-0000-0000-0000000000c1', 1, '{900000124,900000125}', '{add_purchased_credits,NULL,NULL,NULL}');
SELECT billing._grant_on_shard('00000000-0000-0000-0000-0000000000c1', 1, '{900000124,NULL,900000126}', '{add_purchased_credits,NULL,NULL,NULL}');
SELECT billing._grant_on_shard('00000000-0000-0000-0000-0000000000c1', 1, '{900000124,900000125,900000126}', '{add_purchased_credits,NULL,NULL}');
SELECT billing._grant_on_shard('00000000-0000-0000-0000-0000000000c1', 1, '{900000124,900000125,900000126}', '{grant_credits,NULL,NULL,NULL}');
SELECT billing._grant_on_shard('00000000-0000-0000-0000-0000000000c1', 1, '{900000124,900000125,900000126}', '{NULL,NULL,NULL,NULL}');
SELECT tests.state('00000000-0000-0000-0000-0000000000c1');

-- 8. Nobody is granted it: the service calls the public functions.
SELECT r.rolname, has_function_privilege(r.rolname, 'billing._grant_on_shard(uuid, integer, bigint[], text[])', 'EXECUTE') AS may_execute
  FROM pg_roles AS r WHERE r.rolname IN ('anon', 'authenticated', 'service_role') ORDER BY 1;
SELECT has_function_privilege('public', 'billing._grant_on_shard(uuid, integer, bigint[], text[])', 'EXECUTE') AS public_may_execute;
-- The ledger still adds up.
SELECT count(*) AS discrepancies FROM billing.verify_ledger('00000000-0000-0000-0000-0000000000c1');
SELECT count(*) AS discrepancies FROM billing.verify_ledger('00000000-0000-0000-0000-0000000000c2');

DROP SCHEMA tests CASCADE;
