-- End users cannot block the backend's keyed operations (issue 11 item 6): keys of end users'
-- calls and of service calls live in separate namespaces; within each, SPEC 4's rule holds.
SET TimeZone = 'UTC';
SELECT billing.add_subscription_credits('a3000000-0000-4000-8000-000000000001', 50, p_idempotency_key => 'grant-1') ->> 'total_balance' AS granted;
-- the end user guesses the backend's next keys and uses them first
BEGIN;
SET LOCAL ROLE authenticated;
SELECT set_config('request.jwt.claims', '{"sub":"a3000000-0000-4000-8000-000000000001","role":"authenticated"}', true) IS NOT NULL AS claims_set;
SELECT billing.consume_credits_v2('a3000000-0000-4000-8000-000000000001', 1, p_idempotency_key => 'expire-2026-12') ->> 'consumed' AS user_consumed;
SELECT billing.consume_credits_v2('a3000000-0000-4000-8000-000000000001', 1, p_idempotency_key => 'refund-in_1') ->> 'consumed' AS user_consumed;
SELECT billing.consume_credits_v2('a3000000-0000-4000-8000-000000000001', 1, p_idempotency_key => 'grant-1') ->> 'consumed' AS user_consumed;
COMMIT;
-- the backend's calls with those keys run (0.2.0: PT409)
SELECT billing.expire_subscription_credits('a3000000-0000-4000-8000-000000000001', 'period end', 'expire-2026-12') ->> 'expired_amount' AS expired;
SELECT billing.refund_credits('a3000000-0000-4000-8000-000000000001', 3, 'refund', 'in_1', 'refund-in_1') ->> 'purchased_credits_balance' AS refunded;
-- within the service namespace SPEC 4's rule holds: the backend's own key for another operation is PT409
SELECT billing.consume_credits_v2('a3000000-0000-4000-8000-000000000001', 2, p_idempotency_key => 'expire-2026-12') ->> 'consumed' AS service_consumed;
-- within each namespace the first result replays, and other arguments are PT409
SELECT billing.add_subscription_credits('a3000000-0000-4000-8000-000000000001', 50, p_idempotency_key => 'grant-1') ->> 'total_balance' AS replayed_total;
BEGIN;
SET LOCAL ROLE authenticated;
SELECT set_config('request.jwt.claims', '{"sub":"a3000000-0000-4000-8000-000000000001","role":"authenticated"}', true) IS NOT NULL AS claims_set;
SELECT billing.consume_credits_v2('a3000000-0000-4000-8000-000000000001', 1, p_idempotency_key => 'expire-2026-12') ->> 'total_balance' AS user_replay_total;
SAVEPOINT s;
SELECT billing.consume_credits_v2('a3000000-0000-4000-8000-000000000001', 2, p_idempotency_key => 'expire-2026-12');
ROLLBACK TO SAVEPOINT s;
COMMIT;
DO $$ BEGIN
    PERFORM billing.expire_subscription_credits('a3000000-0000-4000-8000-000000000001', 'other text', 'expire-2026-12');
EXCEPTION WHEN OTHERS THEN RAISE NOTICE '%: %', SQLSTATE, SQLERRM;
END $$;
SELECT scope, idempotency_key, request ->> 'operation' AS operation FROM billing.idempotency_keys
 WHERE user_id = 'a3000000-0000-4000-8000-000000000001' ORDER BY scope, idempotency_key;
SELECT * FROM billing.get_user_credits('a3000000-0000-4000-8000-000000000001');
SELECT count(*) AS ledger_mismatches FROM billing.verify_ledger();
