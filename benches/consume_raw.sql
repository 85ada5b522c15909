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
    SELECT acct.user_id, op.id, 'usage', e.pool, e.amount, e.balance_after
      FROM acct CROSS JOIN op
     CROSS JOIN LATERAL (VALUES (1, 'subscription', acct.dsub, acct.sub), (2, 'purchased', acct.dpur, acct.pur)) AS e(ord, pool, amount, balance_after)
     WHERE e.amount <> 0
)
SELECT op.id, acct.sub, acct.pur, acct.dsub, acct.dpur FROM acct CROSS JOIN op;
