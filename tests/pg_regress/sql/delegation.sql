-- The delegated part of consume_credits_v2 (0.8.0, issue 17): billing._consume_on_shard, which
-- Citus runs on the worker that holds the user once billing.distribute() delegated it. Here it is
-- called directly (on one node it runs here; on a cluster Citus pushes the call down): it debits
-- by the fast path only, with the ledger id it is given, and declines (NULL, nothing changed)
-- wherever the fast path does not apply or an event could result; keys are claimed, replayed or
-- refused as consume_credits_v2 does, in the namespace it is given. Each statement is its own
-- transaction.
-- Errors without CONTEXT (on a cluster Citus adds the worker's address).
\set SHOW_CONTEXT never
-- Helpers live in schema tests, not pg_temp: on a Citus cluster a query that calls one may run on a worker.
CREATE SCHEMA tests;
GRANT USAGE ON SCHEMA tests TO PUBLIC;
-- state(user): the pools, the ledger's sum and row count, the keys: what a declined call must not change.
CREATE FUNCTION tests.state(p_user uuid) RETURNS text LANGUAGE plpgsql AS $f$
DECLARE
    pools text;
    ledger text;
    keys bigint;
BEGIN
    SELECT a.subscription_credits_balance || '/' || a.purchased_credits_balance INTO pools FROM billing.accounts AS a WHERE a.user_id = p_user;
    SELECT COALESCE(sum(t.amount), 0) || ' in ' || count(*) || ' rows' INTO ledger FROM billing.credit_transactions AS t WHERE t.user_id = p_user;
    SELECT count(*) INTO keys FROM billing.idempotency_keys AS k WHERE k.user_id = p_user;
    RETURN 'pools ' || pools || ', ledger ' || ledger || ', keys ' || keys;
END
$f$;

-- 1. No head recorded yet (a purchase, never debited): declined; consume_credits_v2's general
--    path records the head; then the shard function debits, its ledger row with the given id.
SELECT billing.add_purchased_credits('00000000-0000-0000-0000-0000000000f1', 100, 'pi_delegation_1') ->> 'success' AS purchased;
SELECT billing._consume_on_shard('00000000-0000-0000-0000-0000000000f1', 5, 900000001, '{NULL,NULL,NULL,NULL}') AS declined;
SELECT tests.state('00000000-0000-0000-0000-0000000000f1');
SELECT billing.consume_credits_v2('00000000-0000-0000-0000-0000000000f1', 10) ->> 'total_balance' AS total;
SELECT r ->> 'success' AS success, r ->> 'consumed' AS consumed, r ->> 'purchased_used' AS purchased_used,
       r ->> 'total_balance' AS total
  FROM billing._consume_on_shard('00000000-0000-0000-0000-0000000000f1', 5, 900000001, ARRAY['on the shard', 'ref-1', NULL, NULL]) AS r;
SELECT t.id, t.amount, t.description, t.reference_id, t.type, t.pool
  FROM billing.credit_transactions AS t WHERE t.user_id = '00000000-0000-0000-0000-0000000000f1' AND t.id = 900000001;
SELECT tests.state('00000000-0000-0000-0000-0000000000f1');
-- The same ledger id again: refused (22023), nothing changed.
SELECT billing._consume_on_shard('00000000-0000-0000-0000-0000000000f1', 5, 900000001, '{NULL,NULL,NULL,NULL}');
SELECT tests.state('00000000-0000-0000-0000-0000000000f1');

-- 2. More than the head holds: declined (the coordinator's general path says PT402).
SELECT billing._consume_on_shard('00000000-0000-0000-0000-0000000000f1', 1000, 900000002, '{NULL,NULL,NULL,NULL}') AS declined;
SELECT tests.state('00000000-0000-0000-0000-0000000000f1');

-- 3. A balance rule on the account: declined (an event could fire; events are numbered where the
--    call started); without the rule, debited again.
SELECT billing.set_balance_alert(p_threshold := 10, p_user_id := '00000000-0000-0000-0000-0000000000f1') IS NOT NULL AS rule_set;
SELECT billing._consume_on_shard('00000000-0000-0000-0000-0000000000f1', 1, 900000003, '{NULL,NULL,NULL,NULL}') AS declined;
SELECT tests.state('00000000-0000-0000-0000-0000000000f1');
SELECT billing.set_balance_alert(p_threshold := NULL, p_user_id := '00000000-0000-0000-0000-0000000000f1') IS NOT NULL AS rule_removed;
SELECT billing._consume_on_shard('00000000-0000-0000-0000-0000000000f1', 1, 900000004, '{NULL,NULL,NULL,NULL}') ->> 'total_balance' AS total;

-- 4. Idempotency keys: claimed and stored with the debit, replayed; reused for another request:
--    declined, so that consume_credits_v2 raises PT409 where the call started (a custom SQLSTATE
--    raised on a worker would reach the client as XX000); each namespace its own; a declined
--    call leaves no key behind.
SELECT billing._consume_on_shard('00000000-0000-0000-0000-0000000000f1', 2, 900000005, ARRAY[NULL, NULL, 'k-1', 'service']) ->> 'total_balance' AS total;
SELECT billing._consume_on_shard('00000000-0000-0000-0000-0000000000f1', 2, 900000006, ARRAY[NULL, NULL, 'k-1', 'service']) ->> 'total_balance' AS replayed_total;
SELECT t.operation_id::text AS first_operation FROM billing.credit_transactions AS t
 WHERE t.user_id = '00000000-0000-0000-0000-0000000000f1' AND t.id = 900000005 \gset
SELECT billing._consume_on_shard('00000000-0000-0000-0000-0000000000f1', 2, 900000006, ARRAY[NULL, NULL, 'k-1', 'service']) ->> 'transaction_id'
     = :'first_operation' AS same_transaction;
SELECT billing._consume_on_shard('00000000-0000-0000-0000-0000000000f1', 3, 900000007, ARRAY[NULL, NULL, 'k-1', 'service']) AS declined;
-- consume_credits_v2 with the same key, as the service: the same request, replayed; another: PT409.
SELECT billing.consume_credits_v2('00000000-0000-0000-0000-0000000000f1', 2, p_idempotency_key := 'k-1') ->> 'total_balance' AS replayed_total;
\set VERBOSITY sqlstate
SELECT billing.consume_credits_v2('00000000-0000-0000-0000-0000000000f1', 3, p_idempotency_key := 'k-1');
\set VERBOSITY default
SELECT billing._consume_on_shard('00000000-0000-0000-0000-0000000000f1', 2, 900000008, ARRAY[NULL, NULL, 'k-1', 'user']) ->> 'total_balance' AS user_namespace_total;
SELECT tests.state('00000000-0000-0000-0000-0000000000f1');
SELECT billing._consume_on_shard('00000000-0000-0000-0000-0000000000f1', 1000, 900000009, ARRAY[NULL, NULL, 'k-2', 'service']) AS declined;
SELECT tests.state('00000000-0000-0000-0000-0000000000f1');
SELECT billing._consume_on_shard('00000000-0000-0000-0000-0000000000f1', 2, 900000010, ARRAY[NULL, NULL, 'k-3', 'nobody']);

-- 5. Arguments: a NULL argument is NULL (the function is STRICT: Citus would crash pushing down
--    a call whose user is NULL); a non-positive amount or a request of another length is 22023;
--    an unknown user is declined.
SELECT billing._consume_on_shard(NULL, 1, 900000011, '{NULL,NULL,NULL,NULL}') IS NULL AS null_user;
SELECT billing._consume_on_shard('00000000-0000-0000-0000-0000000000f1', 1, NULL, '{NULL,NULL,NULL,NULL}') IS NULL AS null_id;
SELECT billing._consume_on_shard('00000000-0000-0000-0000-0000000000f1', 0, 900000011, '{NULL,NULL,NULL,NULL}');
SELECT billing._consume_on_shard('00000000-0000-0000-0000-0000000000f1', 1, 900000011, '{NULL,NULL,NULL}');
SELECT billing._consume_on_shard('00000000-0000-0000-0000-0000000000f2', 1, 900000011, '{NULL,NULL,NULL,NULL}') AS declined;
SELECT tests.state('00000000-0000-0000-0000-0000000000f1');

-- 6. Nobody is granted it: end users and the service role go through consume_credits_v2.
SELECT r.rolname, has_function_privilege(r.rolname, 'billing._consume_on_shard(uuid, integer, bigint, text[])', 'EXECUTE') AS may_execute
  FROM pg_roles AS r WHERE r.rolname IN ('anon', 'authenticated', 'service_role') ORDER BY 1;
SELECT has_function_privilege('public', 'billing._consume_on_shard(uuid, integer, bigint, text[])', 'EXECUTE') AS public_may_execute;
-- The ledger still adds up.
SELECT count(*) AS discrepancies FROM billing.verify_ledger('00000000-0000-0000-0000-0000000000f1');

DROP SCHEMA tests CASCADE;
