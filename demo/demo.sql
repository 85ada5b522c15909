-- pg_billing demo: the S4 image upscaler's credits, told as a story.
\set QUIET on
\pset footer off
\set ON_ERROR_STOP on
CREATE EXTENSION pg_billing;
\set ada '''a0000000-0000-4000-8000-00000000000a'''
\echo
\echo '=== S4: an image upscaler with two credit pools ==='
\echo 'Ada subscribes to the Pro plan. The subscription webhook grants 500 credits for this billing period.'
SELECT r->>'added' AS added, r->>'subscription_credits_balance' AS subscription, r->>'purchased_credits_balance' AS purchased
  FROM billing.add_subscription_credits(:ada, 500, 'Pro plan, November') AS r;
\echo 'She buys a 200-credit pack. Purchased credits never expire.'
SELECT r->>'added' AS added, r->>'subscription_credits_balance' AS subscription, r->>'purchased_credits_balance' AS purchased
  FROM billing.add_purchased_credits(:ada, 200, '200-credit pack', 'stripe:pi_1001') AS r;
\echo 'She upscales a batch that costs 650 credits. FIFO: the subscription pool (which expires first) is used up before the purchased one.'
SELECT r->>'consumed' AS consumed, r->>'subscription_used' AS from_subscription, r->>'purchased_used' AS from_purchased,
       r->>'subscription_credits_balance' AS subscription, r->>'purchased_credits_balance' AS purchased
  FROM billing.consume_credits_v2(:ada, 650, 'batch upscale x4', 'job-77') AS r;
\echo 'Her browser retries the next request with the same idempotency key: it is applied once, and the retry gets the same answer.'
SELECT r->>'consumed' AS consumed, r->>'total_balance' AS total, r->>'transaction_id' = s->>'transaction_id' AS same_transaction
  FROM billing.consume_credits_v2(:ada, 10, 'upscale', 'job-78', 'req-78') AS r,
       billing.consume_credits_v2(:ada, 10, 'upscale', 'job-78', 'req-78') AS s;
\echo 'She tries a job that needs more than she has. It is refused with SQLSTATE PT402 (HTTP 402 through PostgREST) and nothing changes:'
DO $$
BEGIN
  PERFORM billing.consume_credits_v2('a0000000-0000-4000-8000-00000000000a', 1000, 'huge job');
EXCEPTION WHEN OTHERS THEN
  RAISE NOTICE 'refused: SQLSTATE %: %', SQLSTATE, SQLERRM;
END $$;
SELECT subscription_credits_balance AS subscription, purchased_credits_balance AS purchased, total_balance AS total
  FROM billing.get_user_credits(:ada);
\echo 'December: the renewal webhook expires what is left of November''s subscription credits and grants 500 new ones, in one call. Her purchased credits survive.'
SELECT billing.add_subscription_credits(:ada, 25, 'promo') IS NOT NULL AS promo_granted;
SELECT r->>'expired_amount' AS expired, r->>'added' AS added, r->>'subscription_credits_balance' AS subscription, r->>'purchased_credits_balance' AS purchased
  FROM billing.renew_subscription_credits(:ada, 500, now() + interval '1 month') AS r;
\echo 'A failed upscale is refunded to the purchased pool.'
SELECT r->>'added' AS refunded, r->>'purchased_credits_balance' AS purchased, r->>'total_balance' AS total
  FROM billing.refund_credits(:ada, 15, 'upscale failed', 'job-79') AS r;
\echo 'Her ledger (get_credit_history, shown oldest first here): one row per pool touched, with the balance after each.'
SELECT type, pool, amount, balance_after, description
  FROM billing.get_credit_history(:ada, 20) ORDER BY created_at, id;
\echo 'Expirations are logged too:'
SELECT expired_amount, description FROM billing.credit_expiration_events WHERE user_id = :ada ORDER BY id;
\echo 'The ledger and the balances agree (billing.verify_ledger() lists users whose balances differ from their ledger; empty means consistent):'
SELECT count(*) AS users_out_of_balance FROM billing.verify_ledger();
\echo 'Finally, the Supabase/PostgREST recipe: expose the API in schema public, then call it as the signed-in user, as supabase.rpc() does.'
DO $$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'authenticated') THEN CREATE ROLE authenticated NOLOGIN; END IF;
END $$;
SELECT billing.expose_rpc('public') AS wrappers_created;
BEGIN;
SELECT set_config('role', 'authenticated', true) IS NOT NULL AS as_authenticated,
       set_config('request.jwt.claims', '{"sub":"a0000000-0000-4000-8000-00000000000a","role":"authenticated"}', true) IS NOT NULL AS jwt_set;
SELECT r->>'consumed' AS consumed, r->>'total_balance' AS total
  FROM public.consume_credits_v2(p_user_id := 'a0000000-0000-4000-8000-00000000000a', p_amount := 5) AS r;
DO $$
BEGIN
  PERFORM public.consume_credits_v2(p_user_id := 'b0000000-0000-4000-8000-00000000000b', p_amount := 5);
EXCEPTION WHEN OTHERS THEN
  RAISE NOTICE 'spending someone else''s credits: SQLSTATE %: %', SQLSTATE, SQLERRM;
END $$;
COMMIT;
\echo
\echo 'End of the S4 story.'
