-- The head of the spending order (0.7.0, issue 13's speed): billing.accounts records the first
-- live grant without a scope, its pool, its remaining and until when it stays first, so a debit
-- that grant pays alone is one account update, one grant update and one ledger row. Every rule
-- of the spending order must still hold through it: a new grant that comes first, a grant that
-- starts between two calls, a voided or expired head, a head spent to 0, a head that cannot pay
-- what the holds leave. Each statement is its own transaction (the clock moves between them).
SET TimeZone = 'UTC';
-- paid(user): the grant that paid the user's latest debit, by category and priority.
CREATE FUNCTION pg_temp.paid(p_user uuid) RETURNS text LANGUAGE sql AS $f$
    SELECT g.category || '/' || g.priority || ' ' || t.amount
      FROM billing.credit_transactions AS t JOIN billing.credit_grants AS g ON g.user_id = t.user_id AND g.id = t.grant_id
     WHERE t.user_id = p_user AND t.amount < 0
     ORDER BY t.id DESC LIMIT 1
$f$;
-- head(user): what the account records (NULL: nothing recorded).
CREATE FUNCTION pg_temp.head(p_user uuid) RETURNS text LANGUAGE sql AS $f$
    SELECT CASE WHEN a.head_grant IS NULL THEN 'none'
                ELSE g.category || '/' || g.priority || ' remaining ' || a.head_remaining
                     || CASE WHEN a.head_until IS NULL THEN ', no end' ELSE ', until set' END END
      FROM billing.accounts AS a LEFT JOIN billing.credit_grants AS g ON g.user_id = a.user_id AND g.id = a.head_grant
     WHERE a.user_id = p_user
$f$;

-- 1. A purchase (priority 50) and a promotion (priority 30): the first debit takes the general
--    path and records the promotion as the head; the next ones take it from there.
SELECT billing.add_purchased_credits('00000000-0000-0000-0000-0000000000d1', 100, 'pi_head_1') ->> 'success' AS purchased;
SELECT billing.grant_credits('00000000-0000-0000-0000-0000000000d1', 5, 'promotional') ? 'grant_id' AS granted;
SELECT pg_temp.head('00000000-0000-0000-0000-0000000000d1');
SELECT billing.consume_credits_v2('00000000-0000-0000-0000-0000000000d1', 2) ->> 'purchased_credits_balance' AS purchased_after;
SELECT pg_temp.paid('00000000-0000-0000-0000-0000000000d1'), pg_temp.head('00000000-0000-0000-0000-0000000000d1');
SELECT billing.consume_credits_v2('00000000-0000-0000-0000-0000000000d1', 3) ->> 'purchased_credits_balance' AS purchased_after;
-- The promotion is spent to 0: the head says so, and the next debit cannot use it.
SELECT pg_temp.paid('00000000-0000-0000-0000-0000000000d1'), pg_temp.head('00000000-0000-0000-0000-0000000000d1');
SELECT billing.consume_credits_v2('00000000-0000-0000-0000-0000000000d1', 1) ->> 'purchased_credits_balance' AS purchased_after;
SELECT pg_temp.paid('00000000-0000-0000-0000-0000000000d1'), pg_temp.head('00000000-0000-0000-0000-0000000000d1');

-- 2. A new grant that comes first (subscription, priority 10) clears the head: the next debit is
--    paid by it, not by the purchase the head named.
SELECT billing.add_subscription_credits('00000000-0000-0000-0000-0000000000d1', 10) ->> 'success' AS added;
SELECT pg_temp.head('00000000-0000-0000-0000-0000000000d1');
SELECT billing.consume_credits_v2('00000000-0000-0000-0000-0000000000d1', 1) ->> 'subscription_used' AS subscription_used;
SELECT pg_temp.paid('00000000-0000-0000-0000-0000000000d1'), pg_temp.head('00000000-0000-0000-0000-0000000000d1');

-- 3. A grant that starts in two seconds, first in order (priority 0): the head recorded before
--    it starts stays good only until it starts.
SELECT billing.grant_credits('00000000-0000-0000-0000-0000000000d1', 50, 'promotional', 0,
                             pg_catalog.clock_timestamp() + interval '2 seconds') ? 'grant_id' AS granted;
SELECT billing.consume_credits_v2('00000000-0000-0000-0000-0000000000d1', 1) ->> 'subscription_used' AS subscription_used;
SELECT pg_temp.paid('00000000-0000-0000-0000-0000000000d1'), pg_temp.head('00000000-0000-0000-0000-0000000000d1');
SELECT a.head_until = (SELECT g.effective_at FROM billing.credit_grants AS g
                        WHERE g.user_id = a.user_id AND g.priority = 0) AS until_its_start
  FROM billing.accounts AS a WHERE a.user_id = '00000000-0000-0000-0000-0000000000d1';
SELECT billing.consume_credits_v2('00000000-0000-0000-0000-0000000000d1', 1) ->> 'subscription_used' AS subscription_used;
SELECT pg_temp.paid('00000000-0000-0000-0000-0000000000d1');
SELECT pg_catalog.pg_sleep(2.2);
SELECT billing.consume_credits_v2('00000000-0000-0000-0000-0000000000d1', 1) ->> 'subscription_used' AS subscription_used;
SELECT pg_temp.paid('00000000-0000-0000-0000-0000000000d1'), pg_temp.head('00000000-0000-0000-0000-0000000000d1');

-- 4. Voiding the head clears it: the next debit is paid by the grant after it.
SELECT billing.void_grant((SELECT g.id FROM billing.credit_grants AS g
                            WHERE g.user_id = '00000000-0000-0000-0000-0000000000d1' AND g.priority = 0),
                          'head voided') ->> 'voided_amount' AS voided;
SELECT pg_temp.head('00000000-0000-0000-0000-0000000000d1');
SELECT billing.consume_credits_v2('00000000-0000-0000-0000-0000000000d1', 1) ->> 'subscription_used' AS subscription_used;
SELECT pg_temp.paid('00000000-0000-0000-0000-0000000000d1');

-- 5. A head that expires between two calls (explicit expiry two seconds ahead) is not spent: the
--    write after it settles it (an 'expiration' row) and the next grant pays.
SELECT billing.grant_credits('00000000-0000-0000-0000-0000000000d2', 100, 'purchased') ? 'grant_id' AS granted;
SELECT billing.grant_credits('00000000-0000-0000-0000-0000000000d2', 20, 'promotional', 5, NULL,
                             pg_catalog.clock_timestamp() + interval '2 seconds') ? 'grant_id' AS granted;
SELECT billing.consume_credits_v2('00000000-0000-0000-0000-0000000000d2', 1) ->> 'purchased_credits_balance' AS purchased_after;
SELECT billing.consume_credits_v2('00000000-0000-0000-0000-0000000000d2', 1) ->> 'purchased_credits_balance' AS purchased_after;
SELECT pg_temp.paid('00000000-0000-0000-0000-0000000000d2'), pg_temp.head('00000000-0000-0000-0000-0000000000d2');
SELECT pg_catalog.pg_sleep(2.2);
SELECT billing.consume_credits_v2('00000000-0000-0000-0000-0000000000d2', 1) ->> 'purchased_credits_balance' AS purchased_after;
SELECT pg_temp.paid('00000000-0000-0000-0000-0000000000d2'), pg_temp.head('00000000-0000-0000-0000-0000000000d2');
SELECT t.type, t.amount FROM billing.credit_transactions AS t
 WHERE t.user_id = '00000000-0000-0000-0000-0000000000d2' ORDER BY t.id;

-- 6. Holds: the head pays alone only while it also covers what the active holds reserve; beyond
--    that the general path decides (here: 79 left, 70 held, so 9 are free: PT402).
SELECT billing.reserve_credits('00000000-0000-0000-0000-0000000000d2', 70, p_ttl := interval '10 minutes') ->> 'held' AS held;
SELECT billing.consume_credits_v2('00000000-0000-0000-0000-0000000000d2', 20) ->> 'purchased_credits_balance' AS purchased_after;
SELECT pg_temp.head('00000000-0000-0000-0000-0000000000d2');
SELECT billing.consume_credits_v2('00000000-0000-0000-0000-0000000000d2', 20);

-- 7. The books agree, heads included.
SELECT count(*) AS disagreeing FROM billing.verify_ledger();

-- 8. A recorded head that is wrong (written here directly, as no function does) is found by
--    verify_ledger, and a debit does not trust it: the grant update finds too few credits, the
--    account is put back and the general path pays, from the right grants in order.
SELECT billing.grant_credits('00000000-0000-0000-0000-0000000000d3', 10, 'refund') ? 'grant_id' AS granted;
SELECT billing.grant_credits('00000000-0000-0000-0000-0000000000d3', 100, 'purchased') ? 'grant_id' AS granted;
SELECT billing.consume_credits_v2('00000000-0000-0000-0000-0000000000d3', 1) ->> 'purchased_credits_balance' AS purchased_after;
SELECT pg_temp.head('00000000-0000-0000-0000-0000000000d3');
UPDATE billing.accounts SET head_remaining = head_remaining + 1000
 WHERE user_id = '00000000-0000-0000-0000-0000000000d3';
SELECT user_id FROM billing.verify_ledger();
SELECT billing.consume_credits_v2('00000000-0000-0000-0000-0000000000d3', 50) ->> 'purchased_credits_balance' AS purchased_after;
SELECT g.category, t.amount FROM billing.credit_transactions AS t JOIN billing.credit_grants AS g ON g.user_id = t.user_id AND g.id = t.grant_id
 WHERE t.user_id = '00000000-0000-0000-0000-0000000000d3' AND t.amount < 0 ORDER BY t.id;
SELECT pg_temp.head('00000000-0000-0000-0000-0000000000d3');
SELECT count(*) AS disagreeing FROM billing.verify_ledger();
