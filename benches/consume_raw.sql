\set uid random(1, :users)
WITH acct AS (
    UPDATE billing.accounts AS a
       SET subscription_credits_balance = a.subscription_credits_balance - LEAST(a.subscription_credits_balance, 1::bigint),
           purchased_credits_balance    = a.purchased_credits_balance - (1::bigint - LEAST(a.subscription_credits_balance, 1::bigint)),
           last_subscription_delta      = -LEAST(a.subscription_credits_balance, 1::bigint),
           last_purchased_delta         = -(1::bigint - LEAST(a.subscription_credits_balance, 1::bigint)),
           updated_at                   = now()
     WHERE a.user_id = ('00000000-0000-4000-8000-' || lpad(to_hex(:uid::integer), 12, '0'))::uuid
       AND a.subscription_credits_balance + a.purchased_credits_balance >= 1
 RETURNING a.user_id, a.subscription_credits_balance AS sub, a.purchased_credits_balance AS pur,
           a.last_subscription_delta AS dsub, a.last_purchased_delta AS dpur
), op AS (SELECT gen_random_uuid() AS id),
ledger AS (
    INSERT INTO billing.credit_transactions (user_id, operation_id, type, pool, amount, balance_after)
    SELECT acct.user_id, op.id, 'usage', 'subscription'::billing.credit_pool, acct.dsub, acct.sub FROM acct, op WHERE acct.dsub <> 0
    UNION ALL
    SELECT acct.user_id, op.id, 'usage', 'purchased'::billing.credit_pool, acct.dpur, acct.pur FROM acct, op WHERE acct.dpur <> 0
)
SELECT jsonb_build_object('success', true, 'transaction_id', op.id, 'consumed', 1,
                          'subscription_used', -acct.dsub, 'purchased_used', -acct.dpur,
                          'subscription_credits_balance', acct.sub, 'purchased_credits_balance', acct.pur,
                          'total_balance', acct.sub + acct.pur)
  FROM acct, op;
