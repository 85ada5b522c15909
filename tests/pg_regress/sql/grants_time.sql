-- Credit grants (issue 13): time. A grant that starts later is not spendable until it starts; a
-- grant that expired is never spent even though no job ran, reads show 0 for it without writing,
-- and the next write to the account settles it (an 'expiration' ledger row for the grant and one
-- credit_expiration_events row). Every statement is its own transaction; the times are explicit,
-- a second or two ahead of the clock, and pg_sleep passes them.
-- Helpers live in schema tests, not pg_temp: on a Citus cluster a query that calls one may run on a worker.
CREATE SCHEMA tests;
GRANT USAGE ON SCHEMA tests TO PUBLIC;
SET TimeZone = 'UTC';
SET DateStyle = 'ISO, YMD';
-- err(sql): runs sql and returns 'SQLSTATE: message [detail]' instead of failing. Random uuids
-- (not the fixed 00000000-0000-0000-0000-... test users) are masked.
CREATE FUNCTION tests.err(p_sql text) RETURNS text LANGUAGE plpgsql AS $f$
DECLARE st text; msg text; det text;
BEGIN
    EXECUTE p_sql;
    RETURN 'no error';
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL;
    RETURN regexp_replace(st || ': ' || msg || COALESCE(' [' || NULLIF(det, '') || ']', ''),
                          '(?!00000000-0000-0000-0000-)[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}',
                          '<uuid>', 'g');
END
$f$;
-- Grants by label: keep(label, grant_credits result) remembers the grant id and returns the
-- result without its random ids and clock times; l(grant id) is the label ('-' for NULL).
CREATE TEMP TABLE g (label text PRIMARY KEY, id uuid NOT NULL UNIQUE);
CREATE FUNCTION tests.keep(p_label text, r jsonb) RETURNS jsonb LANGUAGE sql AS $f$
    INSERT INTO pg_temp.g VALUES (p_label, (r ->> 'grant_id')::uuid)
    RETURNING r - 'grant_id' - 'transaction_id' - 'effective_at' - 'expires_at'
$f$;
-- name_new(user, label[, category]): labels the user's one grant (of that category) that has no
-- label yet (made by a two-pool function, which returns no grant_id); returns how many it labeled
CREATE FUNCTION tests.name_new(p_user uuid, p_label text, p_category text DEFAULT NULL) RETURNS bigint LANGUAGE plpgsql AS $f$
DECLARE ids uuid[]; n bigint;
BEGIN
    -- the user's grants first (on a Citus cluster, a worker reads them), then the labels
    SELECT array_agg(c.id) INTO ids FROM billing.credit_grants AS c
     WHERE c.user_id = p_user AND (p_category IS NULL OR c.category::text = p_category);
    INSERT INTO pg_temp.g SELECT p_label, x FROM unnest(ids) AS x WHERE x NOT IN (SELECT id FROM pg_temp.g);
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$f$;
CREATE FUNCTION tests.l(p_id uuid) RETURNS text LANGUAGE sql AS $f$
    SELECT CASE WHEN p_id IS NULL THEN '-' ELSE COALESCE((SELECT label FROM pg_temp.g WHERE id = p_id), '?') END
$f$;
-- paid(consume_credits result): which grants paid what, in the result's order
CREATE FUNCTION tests.paid(r jsonb) RETURNS text LANGUAGE sql AS $f$
    SELECT string_agg(tests.l((e ->> 'grant_id')::uuid) || ' ' || (e ->> 'category') || ' ' || (e ->> 'amount'), ', ' ORDER BY n)
      FROM jsonb_array_elements(r -> 'grants') WITH ORDINALITY AS x(e, n)
$f$;
-- grants(user): every grant of the user as stored, by label
CREATE FUNCTION tests.grants(p_user uuid)
RETURNS TABLE (label text, category text, amount bigint, remaining bigint, priority int, scope text[], voided bigint, depleted boolean)
LANGUAGE plpgsql AS $f$
#variable_conflict use_column
DECLARE rs billing.credit_grants[];
BEGIN
-- the rows first (on a Citus cluster, a worker reads them), then the labels
SELECT array_agg(c) INTO rs
      FROM billing.credit_grants AS c WHERE c.user_id = p_user;
FOR label, category, amount, remaining, priority, scope, voided, depleted IN
    SELECT tests.l(c.id), c.category::text, c.amount, c.remaining, c.priority, c.scope, c.voided_amount, c.depleted
      FROM unnest(rs) AS c ORDER BY 1
LOOP RETURN NEXT; END LOOP;
END
$f$;
-- ledger(user): the user's ledger rows in order, the grant by label
CREATE FUNCTION tests.ledger(p_user uuid)
RETURNS TABLE (type text, pool text, amount bigint, balance_after bigint, grant_label text)
LANGUAGE plpgsql AS $f$
#variable_conflict use_column
DECLARE rs billing.credit_transactions[];
BEGIN
-- the rows first (on a Citus cluster, a worker reads them), then the labels
SELECT array_agg(t) INTO rs
      FROM billing.credit_transactions AS t WHERE t.user_id = p_user;
FOR type, pool, amount, balance_after, grant_label IN
    SELECT t.type, t.pool::text, t.amount, t.balance_after, tests.l(t.grant_id)
      FROM unnest(rs) AS t ORDER BY t.id
LOOP RETURN NEXT; END LOOP;
END
$f$;
-- bal(user): stored pools, debt and the number of ledger rows (to show that a failed call changed nothing)
CREATE FUNCTION tests.bal(p_user uuid) RETURNS text LANGUAGE plpgsql AS $f$
BEGIN RETURN (
    SELECT format('sub=%s pur=%s debt=%s ledger_rows=%s',
                  COALESCE(a.subscription_credits_balance::text, '-'),
                  COALESCE(a.purchased_credits_balance::text, '-'),
                  COALESCE(a.debt::text, '-'),
                  (SELECT count(*) FROM billing.credit_transactions AS t WHERE t.user_id = p_user))
      FROM (SELECT 1) AS one LEFT JOIN billing.accounts AS a ON a.user_id = p_user);
END
$f$;
-- sleep_past(t): sleeps until the clock is a little past t
CREATE FUNCTION tests.sleep_past(p_t timestamptz) RETURNS boolean LANGUAGE sql AS $f$
    SELECT pg_sleep(greatest(0, extract(epoch FROM p_t - clock_timestamp())::float8) + 0.2);
    SELECT clock_timestamp() > p_t
$f$;
-- stored(user): the stored grant rows and counts, to show that a read wrote nothing
CREATE FUNCTION tests.stored(p_user uuid) RETURNS text LANGUAGE plpgsql AS $f$
DECLARE events bigint; grants billing.credit_grants[];
BEGIN
    -- the rows first (on a Citus cluster, a worker reads them), then the labels
    events := (SELECT count(*) FROM billing.credit_expiration_events AS e WHERE e.user_id = p_user);
    SELECT array_agg(c) INTO grants FROM billing.credit_grants AS c WHERE c.user_id = p_user;
    RETURN (
    SELECT format('%s expiration_events=%s stored_remaining=%s', tests.bal(p_user), events,
                  (SELECT string_agg(tests.l(c.id) || ':' || c.remaining, ' ' ORDER BY tests.l(c.id))
                     FROM unnest(grants) AS c)));
END
$f$;

-- ===== a grant that starts later: not spendable now, spendable after it starts =====
SELECT clock_timestamp() + interval '2 seconds' AS start_at \gset
SELECT tests.keep('t_later', billing.grant_credits('00000000-0000-0000-0000-000000130030', 10, 'promotional',
       p_effective_at => :'start_at')) AS r;
SELECT effective_at = :'start_at' AS starts_as_given, expires_at IS NULL AS never_expires
  FROM billing.credit_grants WHERE id = (SELECT id FROM g WHERE label = 't_later');
-- before the start: scheduled, nothing available, PT402 (for a feature too), nothing written
SELECT tests.l(grant_id) AS grant_label, category, amount, remaining, status
  FROM billing.get_credit_grants('00000000-0000-0000-0000-000000130030');
SELECT available FROM billing.get_user_credits('00000000-0000-0000-0000-000000130030');
SELECT tests.err($$SELECT billing.consume_credits('00000000-0000-0000-0000-000000130030', 1)$$);
SELECT tests.err($$SELECT billing.consume_credits('00000000-0000-0000-0000-000000130030', 1, 'image')$$);
SELECT tests.err($$SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000130030', 1)$$);
SELECT tests.stored('00000000-0000-0000-0000-000000130030');
-- t_now (priority 31) pays while t_later has not started; once started, t_later (priority 30) pays first
SELECT tests.keep('t_now', billing.grant_credits('00000000-0000-0000-0000-000000130030', 3, 'promotional', 31)) AS r;
SELECT tests.paid(billing.consume_credits('00000000-0000-0000-0000-000000130030', 2)) AS paid_before_start;
SELECT tests.sleep_past(:'start_at') AS started;
SELECT tests.l(grant_id) AS grant_label, remaining, status
  FROM billing.get_credit_grants('00000000-0000-0000-0000-000000130030');
SELECT available FROM billing.get_user_credits('00000000-0000-0000-0000-000000130030');
SELECT tests.paid(billing.consume_credits('00000000-0000-0000-0000-000000130030', 4)) AS paid_after_start;
SELECT * FROM tests.ledger('00000000-0000-0000-0000-000000130030');

-- ===== a grant that starts later, in the results of writes =====
-- README: the two-pool functions' results report the account's stored pools (which hold a grant
-- that has not started yet), the reads and grant_credits the live ones (without it). This shows
-- where they differ (result_matches_reads = f). user 34: 10 purchased now, 100 from tomorrow.
SELECT now() + interval '1 day' AS tomorrow \gset
CREATE TEMP TABLE res34 (label text PRIMARY KEY, r jsonb);
-- same_as_reads(label): whether the stored result's balances equal get_user_credits now
CREATE FUNCTION tests.same_as_reads(p_label text) RETURNS TABLE (label text, result_total bigint, reads_total bigint, result_matches_reads boolean)
LANGUAGE sql AS $f$
    SELECT s.label, COALESCE((s.r ->> 'total_balance')::bigint, (s.r #>> '{}')::bigint), c.total_balance,
           COALESCE((s.r ->> 'total_balance')::bigint, (s.r #>> '{}')::bigint) = c.total_balance
           AND COALESCE((s.r ->> 'subscription_credits_balance')::bigint, c.subscription_credits_balance) = c.subscription_credits_balance
           AND COALESCE((s.r ->> 'purchased_credits_balance')::bigint, c.purchased_credits_balance) = c.purchased_credits_balance
      FROM pg_temp.res34 AS s, billing.get_user_credits('00000000-0000-0000-0000-000000130034') AS c
     WHERE s.label = p_label
$f$;
INSERT INTO res34 SELECT 'add_purchased', billing.add_purchased_credits('00000000-0000-0000-0000-000000130034', 10);
INSERT INTO res34 SELECT 'grant_tomorrow', billing.grant_credits('00000000-0000-0000-0000-000000130034', 100, 'promotional', p_effective_at => :'tomorrow');
SELECT * FROM tests.same_as_reads('grant_tomorrow');
INSERT INTO res34 SELECT 'consume_credits_v2', billing.consume_credits_v2('00000000-0000-0000-0000-000000130034', 2);
SELECT * FROM tests.same_as_reads('consume_credits_v2');
INSERT INTO res34 SELECT 'consume_credits', billing.consume_credits('00000000-0000-0000-0000-000000130034', 1);
SELECT * FROM tests.same_as_reads('consume_credits');
INSERT INTO res34 SELECT 'decrement_credits_with_log', to_jsonb(billing.decrement_credits_with_log('00000000-0000-0000-0000-000000130034', 1));
SELECT * FROM tests.same_as_reads('decrement_credits_with_log');
INSERT INTO res34 SELECT 'refund_credits', billing.refund_credits('00000000-0000-0000-0000-000000130034', 1);
SELECT * FROM tests.same_as_reads('refund_credits');
INSERT INTO res34 SELECT 'add_subscription_credits', billing.add_subscription_credits('00000000-0000-0000-0000-000000130034', 4);
SELECT * FROM tests.same_as_reads('add_subscription_credits');
INSERT INTO res34 SELECT 'renew_subscription_credits', billing.renew_subscription_credits('00000000-0000-0000-0000-000000130034', 5);
SELECT * FROM tests.same_as_reads('renew_subscription_credits');
INSERT INTO res34 SELECT 'clawback', billing.clawback_credits_from_transaction((SELECT (r ->> 'transaction_id')::uuid FROM res34 WHERE label = 'add_purchased'));
SELECT * FROM tests.same_as_reads('clawback');
SELECT subscription_credits_balance, purchased_credits_balance, total_balance, available
  FROM billing.get_user_credits('00000000-0000-0000-0000-000000130034');

-- ===== expiry between two calls: never spent once expired, reads show 0, the next write settles it =====
-- user 31: promotional 10 expiring in 2 seconds (spent first: priority 5), purchased 10 that never expires
SELECT clock_timestamp() + interval '2 seconds' AS end_at \gset
SELECT tests.keep('t_expiring', billing.grant_credits('00000000-0000-0000-0000-000000130031', 10, 'promotional', 5,
       p_expires_at => :'end_at')) AS r;
SELECT tests.keep('t_lasting', billing.grant_credits('00000000-0000-0000-0000-000000130031', 10, 'purchased')) AS r;
-- before the end: it pays first
SELECT tests.paid(billing.consume_credits('00000000-0000-0000-0000-000000130031', 3)) AS paid_before_end;
SELECT subscription_credits_balance, purchased_credits_balance, total_balance, available
  FROM billing.get_user_credits('00000000-0000-0000-0000-000000130031');
SELECT tests.stored('00000000-0000-0000-0000-000000130031');
SELECT tests.sleep_past(:'end_at') AS ended;
-- after the end, no job has run: every read shows 0 for it, and reading writes nothing
SELECT subscription_credits_balance, purchased_credits_balance, total_balance, available
  FROM billing.get_user_credits('00000000-0000-0000-0000-000000130031');
SELECT purchased_credits_balance, total_balance, available FROM billing.user_credits
 WHERE user_id = '00000000-0000-0000-0000-000000130031';
SELECT tests.l(grant_id) AS grant_label, remaining, status
  FROM billing.get_credit_grants('00000000-0000-0000-0000-000000130031', true);
SELECT tests.l(grant_id) AS grant_label, remaining, status
  FROM billing.get_credit_grants('00000000-0000-0000-0000-000000130031');
SELECT b - 'at' - 'user_id' - 'grants' AS balance_now,
       (SELECT string_agg(tests.l((e ->> 'grant_id')::uuid) || ' remaining=' || (e ->> 'remaining') || ' spendable=' || (e ->> 'spendable'), ', ' ORDER BY tests.l((e ->> 'grant_id')::uuid))
          FROM jsonb_array_elements(b -> 'grants') AS e) AS grants_now
  FROM billing.balance_at('00000000-0000-0000-0000-000000130031', clock_timestamp()) AS b;
SELECT tests.stored('00000000-0000-0000-0000-000000130031');
-- more than the live 10: PT402, although the stored balance (17) would cover it; nothing written
SELECT tests.err($$SELECT billing.consume_credits('00000000-0000-0000-0000-000000130031', 11)$$);
SELECT tests.err($$SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000130031', 11)$$);
SELECT tests.stored('00000000-0000-0000-0000-000000130031');
-- the next write: only the lasting grant pays, and the expired remainder (7) is settled
CREATE TEMP TABLE res (label text PRIMARY KEY, r jsonb);
INSERT INTO res SELECT 'after_end', billing.consume_credits('00000000-0000-0000-0000-000000130031', 4)
RETURNING label, tests.paid(r) AS paid, r - 'transaction_id' - 'grants' AS r;
SELECT tests.stored('00000000-0000-0000-0000-000000130031');
SELECT * FROM tests.ledger('00000000-0000-0000-0000-000000130031');
SELECT expired_amount FROM billing.credit_expiration_events WHERE user_id = '00000000-0000-0000-0000-000000130031';
-- settled once: the next write logs no second expiration
SELECT tests.paid(billing.consume_credits('00000000-0000-0000-0000-000000130031', 1)) AS paid;
SELECT count(*) FILTER (WHERE type = 'expiration') AS expiration_rows,
       (SELECT count(*) FROM billing.credit_expiration_events WHERE user_id = '00000000-0000-0000-0000-000000130031') AS expiration_events
  FROM billing.credit_transactions WHERE user_id = '00000000-0000-0000-0000-000000130031';
SELECT tests.l(grant_id) AS grant_label, remaining, status
  FROM billing.get_credit_grants('00000000-0000-0000-0000-000000130031', true);

-- ===== a scoped grant expiring, and a grant as the settling write =====
-- user 32: image-only 6 expiring in 1 second, unscoped 2
SELECT clock_timestamp() + interval '1 second' AS end_at \gset
SELECT tests.keep('t_img_expiring', billing.grant_credits('00000000-0000-0000-0000-000000130032', 6, 'promotional',
       p_expires_at => :'end_at', p_scope => ARRAY['image'])) AS r;
SELECT tests.keep('t_any', billing.grant_credits('00000000-0000-0000-0000-000000130032', 2, 'purchased')) AS r;
SELECT tests.sleep_past(:'end_at') AS ended;
SELECT tests.err($$SELECT billing.consume_credits('00000000-0000-0000-0000-000000130032', 3, 'image')$$);
SELECT tests.stored('00000000-0000-0000-0000-000000130032');
-- a grant is a write too: it settles the expired grant before its own row
SELECT tests.keep('t_new', billing.grant_credits('00000000-0000-0000-0000-000000130032', 5, 'promotional')) AS r;
SELECT * FROM tests.ledger('00000000-0000-0000-0000-000000130032');
SELECT expired_amount FROM billing.credit_expiration_events WHERE user_id = '00000000-0000-0000-0000-000000130032';
SELECT tests.paid(billing.consume_credits('00000000-0000-0000-0000-000000130032', 3, 'image')) AS paid;

-- ===== void_grant after the expiry: the write settles the expiry first, nothing is left to void =====
SELECT clock_timestamp() + interval '1 second' AS end_at \gset
SELECT tests.keep('t_void_late', billing.grant_credits('00000000-0000-0000-0000-000000130035', 7, 'promotional',
       p_expires_at => :'end_at')) ->> 'available' AS available;
SELECT tests.keep('t_void_keep', billing.grant_credits('00000000-0000-0000-0000-000000130035', 3, 'purchased')) ->> 'available' AS available;
SELECT tests.sleep_past(:'end_at') AS ended;
SELECT billing.void_grant((SELECT id FROM g WHERE label = 't_void_late'), 'too late') - 'grant_id' - 'transaction_id' - 'user_id' AS r;
SELECT * FROM tests.ledger('00000000-0000-0000-0000-000000130035');
SELECT expired_amount FROM billing.credit_expiration_events WHERE user_id = '00000000-0000-0000-0000-000000130035';

-- ===== a subscription grant from add_subscription_credits expires at the period end renewal set =====
SELECT clock_timestamp() + interval '2 seconds' AS end_at \gset
SELECT billing.renew_subscription_credits('00000000-0000-0000-0000-000000130033', 8, :'end_at') ->> 'subscription_credits_balance' AS renewed;
SELECT billing.add_subscription_credits('00000000-0000-0000-0000-000000130033', 2) ->> 'subscription_credits_balance' AS topped_up;
SELECT category, amount, expires_at = :'end_at' AS expires_at_period_end
  FROM billing.credit_grants WHERE user_id = '00000000-0000-0000-0000-000000130033' ORDER BY amount;
SELECT billing.add_purchased_credits('00000000-0000-0000-0000-000000130033', 1) ->> 'total_balance' AS total;
SELECT tests.sleep_past(:'end_at') AS ended;
SELECT subscription_credits_balance, purchased_credits_balance, total_balance, available
  FROM billing.get_user_credits('00000000-0000-0000-0000-000000130033');
SELECT tests.err($$SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000130033', 2)$$);
SELECT billing.consume_credits_v2('00000000-0000-0000-0000-000000130033', 1) - 'transaction_id' AS r;
SELECT type, pool, amount, balance_after FROM billing.credit_transactions
 WHERE user_id = '00000000-0000-0000-0000-000000130033' ORDER BY id;
SELECT expired_amount FROM billing.credit_expiration_events WHERE user_id = '00000000-0000-0000-0000-000000130033';

SELECT * FROM billing.verify_ledger();
SET client_min_messages = warning;
DROP SCHEMA tests CASCADE;
RESET client_min_messages;
