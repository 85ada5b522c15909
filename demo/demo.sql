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
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'anon') THEN CREATE ROLE anon NOLOGIN; END IF;
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

\echo
\echo '=== Credit grants (0.4.0): a promo, a top-up, a rollover and a chargeback ==='
\set gus '''9a000000-0000-4000-8000-0000000000a9'''
\echo 'Every credit now belongs to a grant: a category, an amount, what remains, a priority (lower is spent first),'
\echo 'a start, an expiry and optionally a feature scope. The operator lets up to 200 unused Pro credits roll over into the next period.'
UPDATE billing.plans SET rollover_max = 200 WHERE plan_id = 'pro';
\echo 'Gus subscribes to Pro: the webhook grants the plan''s 500 credits for this period (a subscription grant, expiring at the period end).'
SELECT r->>'credits_granted' AS credits_granted, r->>'effective_plan' AS plan
  FROM billing.upsert_subscription(:gus, 'pro', 'active', now() - interval '2 days', now() + interval '28 days',
                                   p_event_id := 'evt_gus_1') AS r;
\echo 'Marketing gives him a welcome promo: 100 credits, valid 14 days.'
SELECT r->>'category' AS category, r->>'amount' AS amount, r->>'priority' AS priority, (r->>'expires_at')::timestamptz::date - current_date AS valid_days
  FROM billing.grant_credits(:gus, 100, 'promotional', p_expires_at := now() + interval '14 days',
                             p_description := 'Welcome promo, 14 days') AS r;
\echo 'He buys a 300-credit top-up today, and another 100 a little later (purchased credits never expire).'
SELECT r->>'added' AS added, r->>'purchased_credits_balance' AS purchased
  FROM billing.add_purchased_credits(:gus, 300, 'Top-up 300', 'stripe:pi_2001') AS r;
SELECT r->>'added' AS added, r->>'purchased_credits_balance' AS purchased
  FROM billing.add_purchased_credits(:gus, 100, 'Top-up 100', 'stripe:pi_2002') AS r;
\echo 'His grants, in the order they will be spent: subscription (priority 10), then the promo (30), then his purchases (50).'
SELECT category, amount, remaining, priority, status, expires_at::date - current_date AS expires_in_days, description
  FROM billing.get_credit_grants(:gus);
\echo 'He upscales a batch of 150 credits: consume_credits says which grants paid (the subscription grant, which expires first).'
SELECT r->>'consumed' AS consumed, g->>'category' AS paid_by, g->>'amount' AS amount, r->>'total_balance' AS total
  FROM billing.consume_credits(:gus, 150, p_description := 'batch upscale') AS r, jsonb_array_elements(r->'grants') AS g;
\echo 'The period ends and the renewal webhook grants the next 500. Of the 350 subscription credits left, 200 roll over'
\echo '(a rollover grant, expiring at the end of the new period); the other 150 expire.'
SELECT r->>'expired_amount' AS expired, r->>'added' AS added, r->>'subscription_credits_balance' AS subscription
  FROM billing.renew_subscription_credits(:gus, 500, now() + interval '1 month') AS r;
\echo 'His bank disputes the second top-up: the chargeback voids what is left of that purchase''s grant (once: a repeat changes nothing).'
SELECT r->>'voided_amount' AS voided, r->>'already_voided' AS already_voided, r->>'total_balance' AS total
  FROM billing.void_grant((SELECT grant_id FROM billing.get_credit_grants(:gus)
                            WHERE source_transaction_id = (SELECT operation_id FROM billing.credit_transactions
                                                            WHERE user_id = :gus AND reference_id = 'stripe:pi_2002')),
                          'chargeback pi_2002') AS r;
SELECT r->>'voided_amount' AS voided, r->>'already_voided' AS already_voided
  FROM billing.void_grant((SELECT id FROM billing.credit_grants WHERE user_id = :gus AND voided_at IS NOT NULL),
                          'chargeback pi_2002, delivered twice') AS r;
\echo 'All his grants, spent, expired and voided ones included (get_credit_grants with p_include_spent):'
SELECT category, amount, remaining, priority, status, expires_at::date - current_date AS expires_in_days, description
  FROM billing.get_credit_grants(:gus, true);
\echo 'His balance: 500 + 200 rolled over in the subscription pool, the promo and his 300 top-up in the purchased pool.'
SELECT subscription_credits_balance AS subscription, purchased_credits_balance AS purchased, total_balance AS total, available
  FROM billing.get_user_credits(:gus);
SELECT count(*) AS users_out_of_balance FROM billing.verify_ledger();
\echo
\echo 'End of the credit grants story.'

\echo
\echo '=== Credit holds (0.5.0): an LLM job reserves first, pays what it cost, and a crashed worker costs nothing ==='
\set hana '''b0000000-0000-4000-8000-0000000000b1'''
SELECT billing.add_purchased_credits(:hana, 1000) ->> 'purchased_credits_balance' AS hana_bought;
\echo 'Hana starts a long LLM call. The app reserves the worst case, 500 credits, for 5 minutes before it runs:'
SELECT r->>'hold_id' AS hold_id, r->>'held' AS held, r->>'available' AS available
  FROM billing.reserve_credits(:hana, 500, '5 minutes', p_idempotency_key := 'job-7') AS r \gset
\echo 'held' :held ', available' :available
\echo 'Her balance still shows 1000; what she can spend meanwhile is 500 (a second worker cannot take the held credits):'
SELECT total_balance, available FROM billing.get_user_credits(:hana);
\echo 'The job used 312 credits of tokens. The backend captures 312; the other 188 come back, atomically:'
SELECT r->>'captured' AS captured, r->>'released' AS released, r->>'total_balance' AS total_balance, r->>'available' AS available
  FROM billing.capture_hold(:'hold_id', 312, 'llm job 7') AS r;
\echo 'A retry of the capture (the worker timed out waiting) changes nothing:'
SELECT r->>'captured' AS captured, r->>'already_resolved' AS already_resolved FROM billing.capture_hold(:'hold_id', 312) AS r;
\echo 'Another job reserves 200 for 2 seconds, and its worker crashes. No job needs to run: once the hold expires, the credits are back.'
SELECT billing.reserve_credits(:hana, 200, '2 seconds') ->> 'held' AS held;
SELECT available AS available_while_held FROM billing.get_user_credits(:hana);
SELECT pg_sleep(2.2);
SELECT available AS available_after_expiry FROM billing.get_user_credits(:hana);
SELECT count(*) AS users_out_of_balance FROM billing.verify_ledger();
\echo
\echo 'End of the credit holds story.'

\echo
\echo '=== Events out (0.6.0): a low-balance alert that fires once, and a worker that drains the outbox ==='
\set ivy '''e1000000-0000-4000-8000-0000000000e1'''
\echo 'Ivy buys 500 credits. The app wants to e-mail her when she runs low, so it sets a balance rule on her account:'
\echo 'below 100 credits fire balance.low (once), and only after she is back at 110 (hysteresis 10%) may it fire again.'
SELECT billing.add_purchased_credits(:ivy, 500) ->> 'total_balance' AS balance;
SELECT r->>'threshold' AS threshold, r->>'rearm_at' AS rearm_at FROM billing.set_balance_alert(100, :ivy) AS r;
\echo 'Setting the rule fires nothing. She runs a job that costs 420: 80 left, below 100. The same transaction writes balance.low:'
SELECT billing.consume_credits_v2(:ivy, 420, 'big job') ->> 'total_balance' AS balance;
SELECT id, type, payload->>'available' AS available, payload->>'threshold' AS threshold FROM billing.events WHERE user_id = :ivy ORDER BY id;
\echo 'She keeps working (three more jobs of 10). She is still below 100, but the rule has fired already: no new event.'
SELECT count(billing.consume_credits_v2(:ivy, 10, 'small job')) AS jobs FROM generate_series(1, 3);
SELECT total_balance AS balance FROM billing.get_user_credits(:ivy);
SELECT count(*) AS ivys_events FROM billing.events WHERE user_id = :ivy;
\echo 'She tops up 200 (250 now, above 110): balance.recovered, and the rule is armed again.'
SELECT billing.add_purchased_credits(:ivy, 200) ->> 'total_balance' AS balance;
SELECT id, type, payload->>'available' AS available FROM billing.events WHERE user_id = :ivy ORDER BY id;
\echo 'Her app can show her own events (row-level security: a signed-in user reads only their rows, so Supabase Realtime'
\echo 'can stream billing.events to her browser):'
BEGIN;
SELECT set_config('role', 'authenticated', true) IS NOT NULL AS as_authenticated,
       set_config('request.jwt.claims', '{"sub":"e1000000-0000-4000-8000-0000000000e1","role":"authenticated"}', true) IS NOT NULL AS as_ivy;
SELECT count(*) AS events_ivy_can_read, count(DISTINCT user_id) AS users FROM billing.events;
COMMIT;
\echo
\echo 'The outbox also holds what happened in the stories above: Ada''s and Gus''s renewals ended their subscription'
\echo 'grants, Gus subscribed, his chargeback voided a grant.'
\echo 'A worker (the e-mail sender) claims a batch. Each user''s events come in order, and no other worker of the'
\echo 'consumer gets them while they are claimed.'
CREATE TEMP TABLE batch AS SELECT * FROM billing.claim_events('emails', 100);
SELECT b.id, coalesce(n.who, left(b.user_id::text, 8)) AS who, b.type,
       CASE WHEN b.type LIKE 'balance.%' THEN 'available ' || (b.payload->>'available') || ', threshold ' || (b.payload->>'threshold')
            WHEN b.type = 'grant.expired' THEN (b.payload->>'expired_amount') || ' ' || (b.payload->>'category') || ' credits expired'
            WHEN b.type = 'grant.voided' THEN (b.payload->>'voided_amount') || ' credits voided: ' || (b.payload->>'reason')
            WHEN b.type = 'subscription.changed' THEN 'plan ' || (b.payload->>'plan_id') || ', ' || (b.payload->>'status')
            ELSE b.payload::text END AS what,
       b.deliveries
  FROM batch AS b
  LEFT JOIN (VALUES (:ada::uuid, 'Ada'), (:gus::uuid, 'Gus'), (:hana::uuid, 'Hana'), (:ivy::uuid, 'Ivy')) AS n(uid, who) ON n.uid = b.user_id
 ORDER BY b.id;
SELECT claim_id, max(id) AS up_to FROM batch GROUP BY claim_id \gset
\echo 'It sends the e-mails, then acknowledges the batch (up to the highest id it got, for its claim id).'
\echo 'Acknowledged events are never handed to this consumer again:'
SELECT billing.ack_events('emails', :up_to, :'claim_id') AS acknowledged;
SELECT count(*) AS left_to_claim FROM billing.claim_events('emails', 100);
\echo
\echo 'Ivy spends 200 again (50 left): the rule had re-armed, so balance.low fires a second time.'
SELECT billing.consume_credits_v2(:ivy, 200, 'another big job') ->> 'total_balance' AS balance;
\echo 'The worker claims it, with a 1-second visibility timeout, and crashes before acknowledging.'
SELECT id, type, deliveries FROM billing.claim_events('emails', 100, '1 second');
SELECT pg_sleep(1.1);
\echo 'The claim times out and the next worker gets the same event again (at least once; deliveries counts the hand-outs):'
SELECT claim_id AS claim2, id, type, deliveries FROM billing.claim_events('emails', 100) \gset
\echo 'event' :id :type 'delivery' :deliveries
SELECT billing.ack_events('emails', :id, :'claim2') AS acknowledged;
SELECT count(*) AS left_to_claim FROM billing.claim_events('emails', 100);
\echo
\echo 'End of the events story.'

\echo
\echo '=== S2: a snapshots API with hourly rate limits by tier (free 50/h, premium 500/h, ultra 2000/h) ==='
\set bob '''b0000000-0000-4000-8000-00000000000b'''
SELECT plan_id, display_name, api_rate_limit_hourly AS requests_per_hour FROM billing.plans ORDER BY sort_order;
\echo 'Bob is on the free plan. His API calls check_api_rate_limit before each snapshot; the 51st request this hour is refused, with what X-RateLimit-* headers need.'
SELECT count(*) FILTER (WHERE a) AS allowed, count(*) FILTER (WHERE NOT a) AS refused
  FROM (SELECT (billing.check_api_rate_limit(:bob, '/v1/snapshots')).allowed AS a FROM generate_series(1, 55)) AS calls;
SELECT allowed, limit_value AS "X-RateLimit-Limit", remaining AS "X-RateLimit-Remaining", reset_at = date_trunc('hour', now()) + interval '1 hour' AS resets_next_hour
  FROM billing.check_api_rate_limit(:bob, '/v1/snapshots');
\echo 'He upgrades to Ultra. The provider''s webhook calls upsert_subscription (idempotent by event id); his limit is now 2000/hour at once.'
SELECT r->>'applied' AS applied, r->>'effective_plan' AS effective_plan, r->>'credits_granted' AS credits_granted
  FROM billing.upsert_subscription(:bob, 'ultra', 'active', now() - interval '20 days', now() + interval '10 days',
                                   p_provider := 'stripe', p_event_id := 'evt_up_1', p_event_created_at := now() - interval '1 minute') AS r;
SELECT allowed, limit_value, remaining FROM billing.check_api_rate_limit(:bob, '/v1/snapshots');
\echo 'The provider delivers an older event late (a "past_due" from before the upgrade). It is recorded but changes nothing:'
SELECT r->>'applied' AS applied, r->>'reason' AS reason
  FROM billing.upsert_subscription(:bob, 'ultra', 'past_due', p_event_id := 'evt_old_0', p_event_created_at := now() - interval '2 days') AS r;
\echo 'Later he cancels; the period ends (the event moves the period end into the past) and the nightly job downgrades him to free.'
SELECT billing.upsert_subscription(:bob, 'ultra', 'canceled', now() - interval '20 days', now() - interval '1 day',
                                   p_cancel_at_period_end := true, p_event_id := 'evt_cancel_2') ->> 'effective_plan' AS effective_plan_now;
SELECT billing.process_expired_subscriptions() AS downgraded;
SELECT plan_name, status FROM billing.get_user_subscription(:bob);
SELECT limit_value FROM billing.check_api_rate_limit(:bob, '/v1/snapshots');

\echo
\echo '=== S5: a link-in-bio + AI agents platform: plan limits, usage metering, widgets, dashboard ==='
\set cleo '''c0000000-0000-4000-8000-00000000000c'''
CREATE TABLE public.agents (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), user_id uuid NOT NULL, name text);
CREATE INDEX ON public.agents (user_id);
CREATE TABLE public.widget_links (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), user_id uuid NOT NULL, position integer NOT NULL,
    is_active boolean NOT NULL DEFAULT true, title text, url text, created_at timestamptz DEFAULT now(), updated_at timestamptz DEFAULT now());
CREATE TABLE public.widget_youtube (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), user_id uuid NOT NULL, position integer NOT NULL,
    is_active boolean NOT NULL DEFAULT true, video_id text, created_at timestamptz DEFAULT now(), updated_at timestamptz DEFAULT now());
-- what Supabase's default privileges give the API roles: visitors read widgets with their own rights
GRANT SELECT ON public.widget_links, public.widget_youtube TO anon, authenticated;
\echo 'The app tells pg_billing where its agents live; widget_<type> tables are found on their own.'
SELECT billing.register_resource('agents', 'public.agents');
\echo 'Cleo is on Pro (5 agents). She has 5 already, so creating a 6th is refused by the limit check the app runs first:'
SELECT billing.upsert_subscription(:cleo, 'pro', 'active', now() - interval '3 days', now() + interval '27 days') ->> 'applied' AS subscribed;
INSERT INTO public.agents (user_id, name) SELECT :cleo, 'agent ' || i FROM generate_series(1, 5) AS i;
SELECT allowed, current_count, max_allowed FROM billing.check_resource_limit(:cleo, 'agents');
\echo 'Her agents chat; the backend meters every message and its tokens, and checks the monthly message limit.'
SELECT count(*) AS messages_recorded FROM (SELECT billing.record_message_usage(:cleo, 120, 380) FROM generate_series(1, 12)) AS calls;
SELECT billing.record_conversation_usage(:cleo), billing.record_document_usage(:cleo, 40);
SELECT messages_count, tokens_input_count, tokens_output_count, conversations_count, documents_processed_count, chunks_stored_count
  FROM billing.get_user_current_usage(:cleo);
SELECT allowed, current_usage, limit_value FROM billing.check_monthly_limit(:cleo, 'messages');
\echo 'Her public page: widgets from every widget table, in position order (an anonymous visitor sees only active ones).'
INSERT INTO public.widget_links (user_id, position, title, url, is_active) VALUES
    (:cleo, 0, 'My shop', 'https://shop.example', true), (:cleo, 2, 'Old blog', 'https://blog.example', false);
INSERT INTO public.widget_youtube (user_id, position, video_id) VALUES (:cleo, 1, 'dQw4w9WgXcQ');
SELECT position, widget_type, COALESCE(data->>'title', data->>'video_id') AS content, is_active
  FROM billing.get_user_widgets_ordered(:cleo, p_active_only := false);
BEGIN;
SELECT set_config('role', 'anon', true) IS NOT NULL AS as_anon, set_config('request.jwt.claims', '{"role":"anon"}', true) IS NOT NULL AS jwt_set;
SELECT position, widget_type FROM billing.get_user_widgets_ordered('c0000000-0000-4000-8000-00000000000c', false);
COMMIT;
SELECT billing.get_next_widget_position(:cleo) AS next_position, billing.count_user_widgets_by_type(:cleo, 'links') AS links;
\echo 'One call for her dashboard:'
SELECT plan, status, total_credits, messages_count, resources->'agents' AS agents
  FROM billing.get_user_dashboard_stats(:cleo);
SELECT count(*) AS users_out_of_balance FROM billing.verify_ledger();
\echo
\echo 'End of the S2 and S5 stories.'

\echo
\echo '=== S1: an image-generation app with members: a pool of generations per month, extra credits that survive renewal ==='
\echo 'Dana buys the Pro membership (500 generations a month). The payment webhook upserts her member record by e-mail (any case).'
SELECT r->>'created' AS created, r->>'plan' AS plan, r->>'credits_granted' AS generations_granted
  FROM billing.upsert_member('Dana@Example.com', 'pro', (current_date + 20), 'wh_evt_100') AS r;
\set dana '(SELECT user_id FROM billing.members WHERE email = ''dana@example.com'')'
\echo 'The webhook is delivered twice; the second delivery changes nothing.'
SELECT r->>'duplicate' AS duplicate FROM billing.upsert_member('dana@example.com', 'pro', (current_date + 20), 'wh_evt_100') AS r;
\echo 'She generates 480 images, then buys 50 extra credits (an idempotent webhook: delivered twice, applied once).'
SELECT count(*) AS generations FROM (SELECT billing.consume_generation(:dana, 1) FROM generate_series(1, 480)) AS g;
SELECT billing.add_credits(:dana, 50, 'wh_evt_101') IS NOT NULL AS added, billing.add_credits(:dana, 50, 'wh_evt_101') ->> 'duplicate' AS second_delivery_duplicate;
SELECT status->>'plan' AS plan, status->>'current_usage' AS used, status->>'remaining' AS remaining, status->>'pool_limit' AS pool_limit
  FROM billing.get_usage_status(:dana) AS status;
\echo 'A batch of 40 uses the rest of her month''s pool, then her extra credits.'
SELECT r->>'type' AS type, r->>'current_usage' AS used, r->>'remaining' AS remaining FROM billing.consume_generation(:dana, 40, 'batch') AS r;
\echo 'Her renewal date comes: the daily job resets her pool to 500 and moves the date a month on. Extra credits survive renewal.'
SELECT billing.reset_usage_for_due_members(current_date + 20) AS members_reset;
SELECT status->>'current_usage' AS used, status->>'remaining' AS remaining, (status->>'renewal_date')::date - current_date AS days_to_next_renewal
  FROM billing.get_usage_status(:dana) AS status;
SELECT subscription_credits_balance AS pool, purchased_credits_balance AS extra FROM billing.get_user_credits(:dana);

\echo
\echo '=== S3: checkout without an account, claimed after sign-up ==='
\echo 'Eve pays on the checkout page before she has an account. The payment webhook keeps a pending profile for her e-mail.'
SELECT r->>'status' AS status FROM billing.upsert_pending_profile('eve@example.com', p_token := 'tok-eve-1', p_plan_id := 'premium',
       p_provider := 'lemonsqueezy', p_credits := 300, p_event_id := 'ls_evt_1') AS r;
SELECT email, plan_id, credits, claimed FROM billing.get_unclaimed_pending_profiles();
\echo 'She signs up (user e0...e). Claiming with a wrong token fails with a sentence; with the right one it succeeds, once.'
SELECT billing.claim_pending_profile('e0000000-0000-4000-8000-00000000000e', 'eve@example.com', 'wrong') AS wrong_token;
SELECT billing.claim_pending_profile('e0000000-0000-4000-8000-00000000000e', 'eve@example.com', 'tok-eve-1') ->> 'success' AS claimed;
SELECT billing.claim_pending_profile('e0000000-0000-4000-8000-00000000000e', 'eve@example.com', 'tok-eve-1') ->> 'success' AS claimed_again_is_fine;
SELECT billing.claim_pending_profile('f0000000-0000-4000-8000-00000000000f', 'eve@example.com', 'tok-eve-1') ->> 'error' AS someone_else;
\echo 'Her account now has the plan and the credits; the claimed profile is kept for audit.'
SELECT plan_name, status FROM billing.get_user_subscription('e0000000-0000-4000-8000-00000000000e');
SELECT subscription_credits_balance, total_balance FROM billing.get_user_credits('e0000000-0000-4000-8000-00000000000e');
SELECT email, claimed, claimed_by_user_id = 'e0000000-0000-4000-8000-00000000000e' AS by_eve FROM billing.pending_profiles;
\echo 'Someone else types Eve''s e-mail at checkout and buys the cheaper Pro plan with no credits. The purchase stays'
\echo 'pending for its own buyer (who claims it with their token): Eve''s plan and credits do not change.'
SELECT r->>'status' AS status FROM billing.upsert_pending_profile('Eve@example.com', p_token := 'tok-other', p_plan_id := 'pro',
       p_provider := 'lemonsqueezy', p_provider_user_id := 'cus_other', p_credits := 0) AS r;
SELECT plan_name, status FROM billing.get_user_subscription('e0000000-0000-4000-8000-00000000000e');
SELECT subscription_credits_balance, total_balance FROM billing.get_user_credits('e0000000-0000-4000-8000-00000000000e');
SELECT count(*) AS users_out_of_balance FROM billing.verify_ledger();
\echo
\echo 'End of the S1 and S3 stories.'

\echo
\echo '=== Operations: the nightly maintenance job (0.2.0) ==='
\echo 'Months pass (we age the rows by editing their timestamps). The nightly job forgets old idempotency keys,'
\echo 'webhook event ids and rate-limit buckets; balances and the ledger are untouched.'
UPDATE billing.idempotency_keys SET created_at = created_at - interval '45 days';
UPDATE billing.webhook_events SET processed_at = processed_at - interval '120 days';
UPDATE billing.api_usage SET bucket_start = bucket_start - interval '10 days';
SELECT billing.cleanup_idempotency_keys() AS keys_forgotten, billing.cleanup_webhook_events() AS event_ids_forgotten,
       billing.cleanup_api_usage() AS rate_buckets_deleted;
\echo 'Period end: Finn only ever bought credits, so expiring his empty subscription pool is a no-op (no lock, no'
\echo 'ledger row). Eve''s period ended, so her pool expires; purchased credits never do.'
SELECT billing.add_purchased_credits('f1000000-0000-4000-8000-0000000000f1', 25) ->> 'purchased_credits_balance' AS finn_bought;
SELECT r->>'expired_amount' AS finn_expired, r->>'transaction_id' IS NULL AS no_ledger_row
  FROM billing.expire_subscription_credits('f1000000-0000-4000-8000-0000000000f1') AS r;
SELECT r->>'expired_amount' AS eve_expired, r->>'subscription_credits_balance' AS left_in_pool
  FROM billing.expire_subscription_credits('e0000000-0000-4000-8000-00000000000e') AS r;
SELECT count(*) AS users_out_of_balance FROM billing.verify_ledger();
\echo
\echo 'End of the demo.'
