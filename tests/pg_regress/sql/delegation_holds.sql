-- The delegated part of reserve_credits (0.10.0, issue 17): billing._reserve_on_shard, which Citus
-- runs on the worker that holds the user once billing.distribute() delegated it. Here it is called
-- directly (on one node it runs here; on a cluster Citus pushes the call down): it makes the hold
-- as reserve_credits does, and declines (NULL, nothing changed) where an event could fire and where
-- reserve_credits fails (the coordinator then raises the error with its SQLSTATE). Each statement
-- is its own transaction.
-- Errors without CONTEXT (on a cluster Citus adds the worker's address).
\set SHOW_CONTEXT never
-- Helpers live in schema tests, not pg_temp: on a Citus cluster a query that calls one may run on a worker.
CREATE SCHEMA tests;
GRANT USAGE ON SCHEMA tests TO PUBLIC;
-- state(user): the pools, what the holds reserve, the holds by status, the keys, the events:
-- what a declined call must not change.
CREATE FUNCTION tests.state(p_user uuid) RETURNS text LANGUAGE plpgsql AS $f$
DECLARE
    acct text;
    holds text;
    keys bigint;
    events bigint;
BEGIN
    SELECT a.subscription_credits_balance || '/' || a.purchased_credits_balance || ' held ' || a.held INTO acct
      FROM billing.accounts AS a WHERE a.user_id = p_user;
    SELECT pg_catalog.string_agg(h.status || ' ' || h.amount || COALESCE(' ' || h.feature, ''), ', ' ORDER BY h.created_at, h.amount)
      INTO holds FROM billing.credit_holds AS h WHERE h.user_id = p_user;
    SELECT count(*) INTO keys FROM billing.idempotency_keys AS k WHERE k.user_id = p_user;
    SELECT count(*) INTO events FROM billing.events AS e WHERE e.user_id = p_user;
    RETURN 'pools ' || COALESCE(acct, '(no account)') || ', holds [' || COALESCE(holds, '') || '], keys ' || keys || ', events ' || events;
END
$f$;

-- 1. No account: declined (reserve_credits says P0002 where the call started).
SELECT billing._reserve_on_shard('00000000-0000-0000-0000-0000000000b1', 10, 60000000, '{NULL,NULL,user,false}') AS declined;
SELECT billing.add_purchased_credits('00000000-0000-0000-0000-0000000000b1', 100) ->> 'total_balance' AS total;

-- 2. A hold of 30 for a minute, as reserve_credits makes it; one for a feature (the credits it may
--    spend); then more than is free: declined (PT402 where the call started); with allow_partial,
--    what is free.
SELECT r ->> 'success' AS success, r ->> 'held' AS held, r ->> 'requested' AS requested, r ->> 'available' AS available,
       (r ->> 'expires_at')::timestamptz - now() BETWEEN interval '55 seconds' AND interval '65 seconds' AS expires_in_a_minute,
       r ->> 'user_id' AS user_id
  FROM billing._reserve_on_shard('00000000-0000-0000-0000-0000000000b1', 30, 60000000, '{NULL,NULL,user,false}') AS r;
SELECT billing._reserve_on_shard('00000000-0000-0000-0000-0000000000b1', 20, 60000000, '{chat,NULL,service,false}') ->> 'available' AS available;
SELECT tests.state('00000000-0000-0000-0000-0000000000b1');
SELECT billing._reserve_on_shard('00000000-0000-0000-0000-0000000000b1', 60, 60000000, '{NULL,NULL,service,false}') AS declined;
SELECT tests.state('00000000-0000-0000-0000-0000000000b1');
SELECT billing._reserve_on_shard('00000000-0000-0000-0000-0000000000b1', 60, 60000000, '{NULL,NULL,service,true}') ->> 'held' AS held_partially;
SELECT tests.state('00000000-0000-0000-0000-0000000000b1');
-- A hold made on the shard is captured and released as any other.
SELECT h.id AS hold_id FROM billing.credit_holds AS h WHERE h.user_id = '00000000-0000-0000-0000-0000000000b1' AND h.amount = 30 \gset
SELECT billing.capture_hold(:'hold_id', 25) ->> 'captured' AS captured;
SELECT tests.state('00000000-0000-0000-0000-0000000000b1');

-- 3. The cap on active holds: declined at the cap (reserve_credits raises PT429 where the call
--    started), nothing changed.
SELECT billing.set_max_active_holds('00000000-0000-0000-0000-0000000000b1', 2) ->> 'active_holds' AS active_holds;
SELECT billing.add_purchased_credits('00000000-0000-0000-0000-0000000000b1', 50) ->> 'total_balance' AS total;
SELECT billing._reserve_on_shard('00000000-0000-0000-0000-0000000000b1', 5, 60000000, '{NULL,NULL,service,false}') AS declined;
\set VERBOSITY sqlstate
SELECT billing.reserve_credits('00000000-0000-0000-0000-0000000000b1', 5);
\set VERBOSITY default
SELECT tests.state('00000000-0000-0000-0000-0000000000b1');
SELECT billing.set_max_active_holds('00000000-0000-0000-0000-0000000000b1', NULL) ->> 'active_holds' AS active_holds;

-- 4. A balance rule on the account: declined (an event could fire where the call started).
SELECT billing.set_balance_alert(p_threshold := 10, p_user_id := '00000000-0000-0000-0000-0000000000b1') IS NOT NULL AS rule_set;
SELECT billing._reserve_on_shard('00000000-0000-0000-0000-0000000000b1', 5, 60000000, '{NULL,NULL,service,false}') AS declined;
SELECT billing.set_balance_alert(p_threshold := NULL, p_user_id := '00000000-0000-0000-0000-0000000000b1') IS NOT NULL AS rule_removed;

-- 5. A hold past its expiry, not settled yet: declined (its hold.expired event); reserve_credits
--    settles it and holds; then the shard holds again. (The expiry passes between two
--    transactions: inside one, now() does not move.)
SELECT billing.reserve_credits('00000000-0000-0000-0000-0000000000b1', 4, interval '1 second') ->> 'held' AS held;
SELECT pg_catalog.pg_sleep(1.2);
SELECT billing._reserve_on_shard('00000000-0000-0000-0000-0000000000b1', 5, 60000000, '{NULL,NULL,service,false}') AS declined;
SELECT tests.state('00000000-0000-0000-0000-0000000000b1');
SELECT billing.reserve_credits('00000000-0000-0000-0000-0000000000b1', 5) ->> 'held' AS held;
SELECT e.type, e.payload ->> 'amount' AS amount FROM billing.events AS e WHERE e.user_id = '00000000-0000-0000-0000-0000000000b1' ORDER BY e.id;
SELECT billing._reserve_on_shard('00000000-0000-0000-0000-0000000000b1', 5, 60000000, '{NULL,NULL,service,false}') ->> 'held' AS held;
SELECT tests.state('00000000-0000-0000-0000-0000000000b1');

-- 6. Idempotency keys: claimed and stored with the hold, replayed (also by reserve_credits); each
--    namespace its own; reused for another request: declined (PT409 where the call started); a
--    declined call leaves no key behind.
SELECT billing._reserve_on_shard('00000000-0000-0000-0000-0000000000b1', 3, 60000000, '{NULL,h-1,service,false}') ->> 'hold_id' AS hold_id \gset first_
SELECT billing._reserve_on_shard('00000000-0000-0000-0000-0000000000b1', 3, 60000000, '{NULL,h-1,service,false}') ->> 'hold_id' = :'first_hold_id' AS replayed;
SELECT billing.reserve_credits('00000000-0000-0000-0000-0000000000b1', 3, interval '1 minute', p_idempotency_key := 'h-1') ->> 'hold_id' = :'first_hold_id' AS replayed;
SELECT billing._reserve_on_shard('00000000-0000-0000-0000-0000000000b1', 3, 60000000, '{NULL,h-1,user,false}') ->> 'hold_id' <> :'first_hold_id' AS user_namespace_new_hold;
SELECT billing._reserve_on_shard('00000000-0000-0000-0000-0000000000b1', 4, 60000000, '{NULL,h-1,service,false}') AS declined;
\set VERBOSITY sqlstate
SELECT billing.reserve_credits('00000000-0000-0000-0000-0000000000b1', 4, interval '1 minute', p_idempotency_key := 'h-1');
\set VERBOSITY default
SELECT billing._reserve_on_shard('00000000-0000-0000-0000-0000000000b1', 1000, 60000000, '{NULL,h-2,service,false}') AS declined;
SELECT tests.state('00000000-0000-0000-0000-0000000000b1');

-- 7. Arguments: a NULL argument is NULL (STRICT: Citus would crash pushing down a call whose user
--    is NULL); a non-positive amount, a TTL out of range, an unknown feature form, a request of
--    another length, a key without its scope, allow_partial not true or false are 22023.
SELECT billing._reserve_on_shard(NULL, 1, 60000000, '{NULL,NULL,service,false}') IS NULL AS null_user;
SELECT billing._reserve_on_shard('00000000-0000-0000-0000-0000000000b1', 1, NULL, '{NULL,NULL,service,false}') IS NULL AS null_ttl;
SELECT billing._reserve_on_shard('00000000-0000-0000-0000-0000000000b1', 0, 60000000, '{NULL,NULL,service,false}');
SELECT billing._reserve_on_shard('00000000-0000-0000-0000-0000000000b1', 1, 999999, '{NULL,NULL,service,false}');
SELECT billing._reserve_on_shard('00000000-0000-0000-0000-0000000000b1', 1, 86400000001, '{NULL,NULL,service,false}');
SELECT billing._reserve_on_shard('00000000-0000-0000-0000-0000000000b1', 1, 60000000, '{"",NULL,service,false}');
SELECT billing._reserve_on_shard('00000000-0000-0000-0000-0000000000b1', 1, 60000000, '{NULL,NULL,service}');
SELECT billing._reserve_on_shard('00000000-0000-0000-0000-0000000000b1', 1, 60000000, '{NULL,h-3,NULL,false}');
SELECT billing._reserve_on_shard('00000000-0000-0000-0000-0000000000b1', 1, 60000000, '{NULL,NULL,service,yes}');
SELECT tests.state('00000000-0000-0000-0000-0000000000b1');

-- 8. Nobody is granted it: callers go through reserve_credits.
SELECT r.rolname, has_function_privilege(r.rolname, 'billing._reserve_on_shard(uuid, integer, bigint, text[])', 'EXECUTE') AS may_execute
  FROM pg_roles AS r WHERE r.rolname IN ('anon', 'authenticated', 'service_role') ORDER BY 1;
SELECT has_function_privilege('public', 'billing._reserve_on_shard(uuid, integer, bigint, text[])', 'EXECUTE') AS public_may_execute;
SELECT count(*) AS discrepancies FROM billing.verify_ledger('00000000-0000-0000-0000-0000000000b1');

DROP SCHEMA tests CASCADE;
