-- The second baseline (issue 16 item 1): consume_credits_v2 exactly as the seed apps write it
-- today, on its own tables: profiles with two balance columns; a ledger with a random uuid
-- primary key and one (user_id, created_at) index; no caller check, no idempotency, no
-- argument checks beyond what the statements themselves refuse. SELECT ... FOR UPDATE, UPDATE,
-- INSERT.
CREATE SCHEMA IF NOT EXISTS bench_seed;

CREATE TABLE IF NOT EXISTS bench_seed.profiles (
    id                   uuid PRIMARY KEY,
    subscription_credits integer NOT NULL DEFAULT 0,
    purchased_credits    integer NOT NULL DEFAULT 0,
    updated_at           timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS bench_seed.credit_transactions (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id     uuid NOT NULL,
    amount      integer NOT NULL,
    type        text NOT NULL,
    description text,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS credit_transactions_user_created_idx ON bench_seed.credit_transactions (user_id, created_at);

CREATE OR REPLACE FUNCTION bench_seed.consume_credits_v2(p_user_id uuid, p_amount integer, p_description text DEFAULT NULL)
RETURNS jsonb LANGUAGE plpgsql SECURITY DEFINER SET search_path = public AS $$
DECLARE
    v_sub integer;
    v_pur integer;
    v_from_sub integer;
    v_from_pur integer;
BEGIN
    SELECT subscription_credits, purchased_credits INTO v_sub, v_pur
      FROM bench_seed.profiles WHERE id = p_user_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'profile not found';
    END IF;
    IF v_sub + v_pur < p_amount THEN
        RETURN jsonb_build_object('success', false, 'error', 'insufficient_credits');
    END IF;
    v_from_sub := LEAST(v_sub, p_amount);
    v_from_pur := p_amount - v_from_sub;
    UPDATE bench_seed.profiles
       SET subscription_credits = subscription_credits - v_from_sub,
           purchased_credits = purchased_credits - v_from_pur,
           updated_at = now()
     WHERE id = p_user_id;
    INSERT INTO bench_seed.credit_transactions (user_id, amount, type, description)
    VALUES (p_user_id, -p_amount, 'usage', p_description);
    RETURN jsonb_build_object('success', true, 'subscription_used', v_from_sub, 'purchased_used', v_from_pur,
                              'subscription_credits_balance', v_sub - v_from_sub, 'purchased_credits_balance', v_pur - v_from_pur);
END
$$;
