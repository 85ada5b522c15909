-- The delegated parts of the usage recorders and of the rate-limit check (0.9.0, issue 17):
-- billing._record_usage_on_shard and billing._rate_limit_on_shard, which Citus runs on the worker
-- that holds the user once billing.distribute() delegated them. Here they are called directly (on
-- one node they run here; on a cluster Citus pushes the call down): they record or count as the
-- public functions do, and decline (NULL, nothing changed) where an event could result: a
-- monthly limit rule exists, or the hourly limit is reached. Each statement is its own
-- transaction.
-- Errors without CONTEXT (on a cluster Citus adds the worker's address).
\set SHOW_CONTEXT never
-- Helpers live in schema tests, not pg_temp: on a Citus cluster a query that calls one may run on a worker.
CREATE SCHEMA tests;
GRANT USAGE ON SCHEMA tests TO PUBLIC;
-- usage(user): the counters of the user's usage rows.
CREATE FUNCTION tests.usage(p_user uuid) RETURNS text LANGUAGE plpgsql AS $f$
DECLARE r text;
BEGIN
    SELECT pg_catalog.string_agg(pg_catalog.format('messages %s, conversations %s, tokens %s/%s, documents %s, chunks %s, generations %s, api calls %s',
                                 m.messages_count, m.conversations_count, m.tokens_input_count, m.tokens_output_count,
                                 m.documents_processed_count, m.chunks_stored_count, m.generations_count, m.api_calls_count), '; ')
      INTO r FROM billing.usage_metrics AS m WHERE m.user_id = p_user;
    RETURN COALESCE(r, 'no usage');
END
$f$;
-- events(user): the user's events, by type.
CREATE FUNCTION tests.events(p_user uuid) RETURNS text LANGUAGE plpgsql AS $f$
DECLARE r text;
BEGIN
    SELECT pg_catalog.string_agg(e.type, ', ' ORDER BY e.id) INTO r FROM billing.events AS e WHERE e.user_id = p_user;
    RETURN COALESCE(r, 'no events');
END
$f$;

-- 1. Usage: the 7 counters (messages, conversations, tokens in, tokens out, documents, chunks,
--    generations) added to the current period; the public recorders add to the same row.
SELECT billing._record_usage_on_shard('00000000-0000-0000-0000-0000000000e1', '{1,0,10,20,0,0,0}') AS recorded;
SELECT billing._record_usage_on_shard('00000000-0000-0000-0000-0000000000e1', '{0,1,0,0,1,5,2}') AS recorded;
SELECT tests.usage('00000000-0000-0000-0000-0000000000e1');
SELECT billing.record_message_usage('00000000-0000-0000-0000-0000000000e1', 3, 4);
SELECT tests.usage('00000000-0000-0000-0000-0000000000e1');

-- 2. A monthly limit rule exists (of any plan): declined, nothing recorded (its limit.* events
--    are numbered where the call started, which then records the usage itself); without it,
--    recorded again.
INSERT INTO billing.plans (plan_id, display_name, api_rate_limit_hourly) VALUES ('dlg_usage', 'Delegation', 2);
SELECT billing.set_limit_alert('messages', 100, 'dlg_usage') ->> 'enabled' AS rule_set;
SELECT billing._record_usage_on_shard('00000000-0000-0000-0000-0000000000e1', '{1,0,0,0,0,0,0}') AS declined;
SELECT tests.usage('00000000-0000-0000-0000-0000000000e1');
SELECT billing.set_limit_alert('messages', 100, 'dlg_usage', false) ->> 'enabled' AS rule_set;
SELECT billing._record_usage_on_shard('00000000-0000-0000-0000-0000000000e1', '{1,0,0,0,0,0,0}') AS recorded;
SELECT tests.usage('00000000-0000-0000-0000-0000000000e1');

-- 3. Arguments: a NULL argument is NULL (STRICT: Citus would crash pushing down a call whose user
--    is NULL); counters of another number, NULL or negative are 22023.
SELECT billing._record_usage_on_shard(NULL, '{1,0,0,0,0,0,0}') IS NULL AS null_user;
SELECT billing._record_usage_on_shard('00000000-0000-0000-0000-0000000000e1', NULL) IS NULL AS null_deltas;
SELECT billing._record_usage_on_shard('00000000-0000-0000-0000-0000000000e1', '{1,0,0,0,0,0}');
SELECT billing._record_usage_on_shard('00000000-0000-0000-0000-0000000000e1', '{1,0,0,0,0,0,NULL}');
SELECT billing._record_usage_on_shard('00000000-0000-0000-0000-0000000000e1', '{1,0,0,-1,0,0,0}');
SELECT tests.usage('00000000-0000-0000-0000-0000000000e1');

-- 4. The rate limit, 2 requests an hour: counted twice (in the hour's bucket, per endpoint, and in
--    the period's api calls), then declined with nothing counted and no event; the public check
--    then refuses the request and writes rate_limit.exceeded where the call started.
SELECT billing.upsert_subscription('00000000-0000-0000-0000-0000000000e2', 'dlg_usage', 'active', now(), now() + interval '30 days') ->> 'applied' AS applied;
SELECT r - 'reset_at' AS r, (r ->> 'reset_at')::timestamptz > now() AS resets_later
  FROM billing._rate_limit_on_shard('00000000-0000-0000-0000-0000000000e2', '/v1/render') AS r;
SELECT r - 'reset_at' AS r FROM billing._rate_limit_on_shard('00000000-0000-0000-0000-0000000000e2', '*') AS r;
SELECT billing._rate_limit_on_shard('00000000-0000-0000-0000-0000000000e2', '/v1/render') AS declined;
SELECT a.request_count, a.endpoint_counts FROM billing.api_usage AS a WHERE a.user_id = '00000000-0000-0000-0000-0000000000e2';
SELECT tests.usage('00000000-0000-0000-0000-0000000000e2'), tests.events('00000000-0000-0000-0000-0000000000e2');
SELECT allowed, limit_value, remaining FROM billing.check_api_rate_limit('00000000-0000-0000-0000-0000000000e2', '/v1/render');
SELECT tests.events('00000000-0000-0000-0000-0000000000e2');
-- an unlimited plan: never declined; the endpoint key as the public check makes it
UPDATE billing.plans SET api_rate_limit_hourly = -1 WHERE plan_id = 'dlg_usage';
SELECT r - 'reset_at' AS r FROM billing._rate_limit_on_shard('00000000-0000-0000-0000-0000000000e2', '/v1/render') AS r;
SELECT billing._rate_limit_on_shard('00000000-0000-0000-0000-0000000000e2', NULL) IS NULL AS null_endpoint;
SELECT billing._rate_limit_on_shard('00000000-0000-0000-0000-0000000000e2', repeat('x', 256));

-- 5. Nobody is granted them: end users and the service role go through the public functions.
SELECT f.fn, r.rolname, has_function_privilege(r.rolname, f.fn, 'EXECUTE') AS may_execute
  FROM (VALUES ('billing._record_usage_on_shard(uuid, bigint[])'), ('billing._rate_limit_on_shard(uuid, text)')) AS f(fn),
       pg_roles AS r
 WHERE r.rolname IN ('anon', 'authenticated', 'service_role')
 ORDER BY 1, 2;
SELECT f.fn, has_function_privilege('public', f.fn, 'EXECUTE') AS public_may_execute
  FROM (VALUES ('billing._record_usage_on_shard(uuid, bigint[])'), ('billing._rate_limit_on_shard(uuid, text)')) AS f(fn) ORDER BY 1;

-- What this file wrote: every row of its two users, and its plan.
CREATE FUNCTION tests.forget_users(p_users uuid[]) RETURNS bigint LANGUAGE plpgsql AS $f$
DECLARE t regclass; n bigint; total bigint := 0;
BEGIN
    FOR t IN SELECT c.oid::regclass FROM pg_catalog.pg_class AS c
               JOIN pg_catalog.pg_attribute AS a ON a.attrelid = c.oid AND a.attname = 'user_id' AND NOT a.attisdropped
              WHERE c.relnamespace = 'billing'::regnamespace AND c.relkind IN ('r', 'p') ORDER BY 1
    LOOP
        EXECUTE format('DELETE FROM %s WHERE user_id = ANY ($1)', t) USING p_users;
        GET DIAGNOSTICS n = ROW_COUNT;
        total := total + n;
    END LOOP;
    RETURN total;
END
$f$;
SELECT tests.forget_users(ARRAY['00000000-0000-0000-0000-0000000000e1', '00000000-0000-0000-0000-0000000000e2']::uuid[]) > 0 AS forgotten;
DELETE FROM billing.plans WHERE plan_id = 'dlg_usage';
SET client_min_messages = warning;
DROP SCHEMA tests CASCADE;
RESET client_min_messages;
