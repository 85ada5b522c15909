-- Batches (issue 16 item 3): record_usage_batch and consume_credits_batch. One result per item in
-- the items' order; a bad item is its own error and the others go on (unless p_atomic); an
-- idempotency key counts once, within a batch and across batches; occurred_at counts in its own
-- period. Each rule below fails on 0.5.0 (the functions do not exist).
-- Helpers live in schema tests, not pg_temp: on a Citus cluster a query that calls one may run on a worker.
CREATE SCHEMA tests;
GRANT USAGE ON SCHEMA tests TO PUBLIC;
SET TimeZone = 'UTC';
SET DateStyle = 'ISO, YMD';
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
-- results(r): one line per item, without transaction ids and clock-dependent periods
CREATE FUNCTION tests.results(r jsonb) RETURNS SETOF text LANGUAGE sql AS $f$
    SELECT (e ->> 'index') || ' ' || (e ->> 'status') || ' '
           || COALESCE(e ->> 'sqlstate' || ' ' || (e ->> 'message'),
                       ((e -> 'result') - 'transaction_id')::text,
                       ((e -> 'first') - 'period_start')::text,
                       CASE WHEN e ->> 'period_start' = pg_catalog.to_char(pg_catalog.date_trunc('month', now() AT TIME ZONE 'UTC'), 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
                            THEN 'this month' ELSE e ->> 'period_start' END)
      FROM jsonb_array_elements(r) WITH ORDINALITY AS x(e, n) ORDER BY n
$f$;
CREATE FUNCTION tests.usage(p_user uuid) RETURNS TABLE (period text, messages bigint, tokens_input bigint, generations bigint)
LANGUAGE plpgsql AS $f$
#variable_conflict use_column
BEGIN
FOR period, messages, tokens_input, generations IN
    SELECT CASE WHEN u.period_start = pg_catalog.date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' THEN 'this month'
                ELSE 'earlier: ' || u.period_start::date::text END,
           u.messages_count, u.tokens_input_count, u.generations_count
      FROM billing.usage_metrics AS u WHERE u.user_id = p_user ORDER BY u.period_start
LOOP RETURN NEXT; END LOOP;
END
$f$;

-- record_usage_batch: applied, repeated key (in the batch), unknown metric, a bad uuid, a
-- negative value, an unknown field, occurred_at too old / too far ahead / not a timestamp,
-- no key (always applied), another metric.
SELECT tests.results(billing.record_usage_batch(jsonb_build_array(
    jsonb_build_object('user_id', '00000000-0000-0000-0000-00000000b001', 'metric', 'messages', 'value', 2, 'idempotency_key', 'k1'),
    jsonb_build_object('user_id', '00000000-0000-0000-0000-00000000b001', 'metric', 'messages', 'value', 2, 'idempotency_key', 'k1'),
    jsonb_build_object('user_id', '00000000-0000-0000-0000-00000000b001', 'metric', 'minutes'),
    jsonb_build_object('user_id', 'not-a-uuid', 'metric', 'messages'),
    jsonb_build_object('user_id', '00000000-0000-0000-0000-00000000b001', 'metric', 'messages', 'value', -1),
    jsonb_build_object('user_id', '00000000-0000-0000-0000-00000000b001', 'metric', 'messages', 'colour', 'red'),
    jsonb_build_object('user_id', '00000000-0000-0000-0000-00000000b001', 'metric', 'messages',
                       'occurred_at', to_char((now() - interval '36 days') AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')),
    jsonb_build_object('user_id', '00000000-0000-0000-0000-00000000b001', 'metric', 'messages',
                       'occurred_at', to_char((now() + interval '10 minutes') AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')),
    jsonb_build_object('user_id', '00000000-0000-0000-0000-00000000b001', 'metric', 'messages', 'occurred_at', 'yesterday'),
    jsonb_build_object('user_id', '00000000-0000-0000-0000-00000000b001', 'metric', 'messages'),
    jsonb_build_object('user_id', '00000000-0000-0000-0000-00000000b001', 'metric', 'tokens_input', 'value', 500, 'idempotency_key', 'k2'))));
SELECT * FROM tests.usage('00000000-0000-0000-0000-00000000b001');
-- the same keys in a later batch: duplicates with the first result, nothing counted again
SELECT tests.results(billing.record_usage_batch(jsonb_build_array(
    jsonb_build_object('user_id', '00000000-0000-0000-0000-00000000b001', 'metric', 'messages', 'value', 2, 'idempotency_key', 'k1'),
    jsonb_build_object('user_id', '00000000-0000-0000-0000-00000000b001', 'metric', 'tokens_input', 'value', 500, 'idempotency_key', 'k2'),
    -- a key is per user: another user's k1 is new
    jsonb_build_object('user_id', '00000000-0000-0000-0000-00000000b002', 'metric', 'generations', 'value', 3, 'idempotency_key', 'k1'))));
SELECT * FROM tests.usage('00000000-0000-0000-0000-00000000b001');
SELECT * FROM tests.usage('00000000-0000-0000-0000-00000000b002');
-- an event of an earlier month counts in that month (a user without a subscription: calendar months)
SELECT tests.results(billing.record_usage_batch(jsonb_build_array(
    jsonb_build_object('user_id', '00000000-0000-0000-0000-00000000b003', 'metric', 'messages',
                       'occurred_at', to_char(date_trunc('month', now() AT TIME ZONE 'UTC') - interval '1 second', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')))))
       IS NOT NULL AS recorded;
SELECT count(*) AS rows, bool_and(period <> 'this month') AS in_the_earlier_month, sum(messages) AS messages
  FROM tests.usage('00000000-0000-0000-0000-00000000b003');
-- p_atomic: one bad event and nothing is recorded
SELECT tests.err($$SELECT billing.record_usage_batch(jsonb_build_array(
    jsonb_build_object('user_id', '00000000-0000-0000-0000-00000000b004', 'metric', 'messages'),
    jsonb_build_object('user_id', '00000000-0000-0000-0000-00000000b004', 'metric', 'minutes')), p_atomic => true)$$);
SELECT count(*) AS rows FROM tests.usage('00000000-0000-0000-0000-00000000b004');
-- the batch itself: not an array, empty, too long, NULL
SELECT tests.err($$SELECT billing.record_usage_batch('{}')$$);
SELECT tests.err($$SELECT billing.record_usage_batch('[]')$$);
SELECT tests.err($$SELECT billing.record_usage_batch((SELECT jsonb_agg('{}'::jsonb) FROM generate_series(1, 10001)))$$);
SELECT tests.err($$SELECT billing.record_usage_batch(NULL)$$);

-- consume_credits_batch: applied, not enough credits (its own error, nothing changed), a key's
-- repeat (duplicate, the first result), an unknown account, a bad item, the next item applied.
SELECT billing.add_purchased_credits('00000000-0000-0000-0000-00000000b011', 10) ->> 'purchased_credits_balance' AS balance;
SELECT tests.results(billing.consume_credits_batch(jsonb_build_array(
    jsonb_build_object('user_id', '00000000-0000-0000-0000-00000000b011', 'amount', 4, 'idempotency_key', 'c1'),
    jsonb_build_object('user_id', '00000000-0000-0000-0000-00000000b011', 'amount', 40, 'idempotency_key', 'c2'),
    jsonb_build_object('user_id', '00000000-0000-0000-0000-00000000b011', 'amount', 4, 'idempotency_key', 'c1'),
    jsonb_build_object('user_id', '00000000-0000-0000-0000-00000000b099', 'amount', 1),
    jsonb_build_object('user_id', '00000000-0000-0000-0000-00000000b011', 'amount', 0),
    jsonb_build_object('user_id', '00000000-0000-0000-0000-00000000b011', 'amount', 5, 'description', 'last'))));
SELECT purchased_credits_balance FROM billing.accounts WHERE user_id = '00000000-0000-0000-0000-00000000b011';
-- the failed keyed item left no key behind: the same key now succeeds (after a top-up)
SELECT billing.add_purchased_credits('00000000-0000-0000-0000-00000000b011', 100) ->> 'purchased_credits_balance' AS balance;
SELECT tests.results(billing.consume_credits_batch(jsonb_build_array(
    jsonb_build_object('user_id', '00000000-0000-0000-0000-00000000b011', 'amount', 40, 'idempotency_key', 'c2'))));
-- the key of a consume_credits_v2 call (service namespace) replays in a batch, and another
-- amount with it is PT409 for that item only
SELECT billing.consume_credits_v2('00000000-0000-0000-0000-00000000b011', 1, NULL, NULL, 'v2-key') ->> 'consumed' AS consumed;
SELECT tests.results(billing.consume_credits_batch(jsonb_build_array(
    jsonb_build_object('user_id', '00000000-0000-0000-0000-00000000b011', 'amount', 1, 'idempotency_key', 'v2-key'),
    jsonb_build_object('user_id', '00000000-0000-0000-0000-00000000b011', 'amount', 2, 'idempotency_key', 'v2-key'))));
-- p_atomic: a failing item fails the whole call and nothing is consumed
SELECT tests.err($$SELECT billing.consume_credits_batch(jsonb_build_array(
    jsonb_build_object('user_id', '00000000-0000-0000-0000-00000000b011', 'amount', 1),
    jsonb_build_object('user_id', '00000000-0000-0000-0000-00000000b011', 'amount', 100000)), p_atomic => true)$$);
SELECT purchased_credits_balance FROM billing.accounts WHERE user_id = '00000000-0000-0000-0000-00000000b011';
SELECT count(*) AS keys_without_result FROM billing.idempotency_keys WHERE response IS NULL;

-- service only
CREATE ROLE batch_end_user;
SET ROLE batch_end_user;
SELECT tests.err($$SELECT billing.record_usage_batch('[]')$$);
SELECT tests.err($$SELECT billing.consume_credits_batch('[]')$$);
RESET ROLE;
DROP ROLE batch_end_user;
SELECT count(*) AS ledger_mismatches FROM billing.verify_ledger();
-- leave no usage rows of an earlier month behind (reset_monthly_usage in usage.sql counts them)
DELETE FROM billing.usage_metrics WHERE user_id::text LIKE '00000000-0000-0000-0000-00000000b0%';
SET client_min_messages = warning;
DROP SCHEMA tests CASCADE;
RESET client_min_messages;
