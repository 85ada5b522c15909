-- The PL/pgSQL reference for the benchmark: consume_credits_v2 written the way the seed apps
-- write RPCs today (SELECT ... FOR UPDATE, UPDATE, INSERT), with the same behaviour as
-- billing.consume_credits_v2: the same caller check (end-user roles, JWT sub), the same argument
-- checks and SQLSTATEs, the same idempotency handling (per-user key, request fingerprint,
-- stored response, PT409), the same ledger rows and the same JSON result, on the same tables.
CREATE SCHEMA IF NOT EXISTS bench;

CREATE OR REPLACE FUNCTION bench.consume_credits_plpgsql(p_user_id uuid, p_amount integer, p_description text DEFAULT NULL,
                                                         p_reference_id text DEFAULT NULL, p_idempotency_key text DEFAULT NULL)
RETURNS jsonb LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_claims      jsonb;
    v_claim_role  text;
    v_role        text;
    v_roles       text[];
    v_sub_text    text;
    v_me          uuid;
    v_key         text := NULLIF(p_idempotency_key, '');
    v_request     jsonb;
    v_stored      jsonb;
    v_response    jsonb;
    v_sub         bigint;
    v_pur         bigint;
    v_from_sub    bigint;
    v_from_pur    bigint;
    v_op          uuid := pg_catalog.gen_random_uuid();
BEGIN
    IF p_user_id IS NULL THEN
        RAISE EXCEPTION 'p_user_id must not be NULL' USING ERRCODE = '22023';
    END IF;
    -- Who is calling: an end user when the JWT role claim or the role in effect is an end-user role.
    v_roles := pg_catalog.string_to_array(COALESCE(pg_catalog.current_setting('pg_billing.end_user_roles', true), 'anon,authenticated'), ',');
    v_claims := NULLIF(pg_catalog.current_setting('request.jwt.claims', true), '')::jsonb;
    v_claim_role := v_claims ->> 'role';
    v_role := NULLIF(pg_catalog.current_setting('role'), 'none');
    IF v_role IS NULL THEN v_role := session_user; END IF;
    IF v_claim_role = ANY (v_roles) OR v_role = ANY (v_roles) THEN
        v_sub_text := COALESCE(NULLIF(pg_catalog.current_setting('request.jwt.claim.sub', true), ''), v_claims ->> 'sub');
        v_me := v_sub_text::uuid;
        IF v_me IS NULL THEN
            RAISE EXCEPTION 'the % role must sign in to act on an account', COALESCE(v_claim_role, v_role) USING ERRCODE = '42501';
        ELSIF v_me <> p_user_id THEN
            RAISE EXCEPTION 'an end user may act only on their own account' USING ERRCODE = '42501';
        END IF;
    END IF;
    IF p_amount IS NULL OR p_amount <= 0 THEN
        RAISE EXCEPTION 'p_amount must be a positive whole number' USING ERRCODE = '22023';
    END IF;
    IF pg_catalog.length(p_description) > 1000 THEN
        RAISE EXCEPTION 'p_description is too long' USING ERRCODE = '22023';
    END IF;
    IF pg_catalog.length(p_reference_id) > 255 OR pg_catalog.length(v_key) > 255 THEN
        RAISE EXCEPTION 'p_reference_id or p_idempotency_key is too long' USING ERRCODE = '22023';
    END IF;

    IF v_key IS NOT NULL THEN
        v_request := pg_catalog.jsonb_build_object('operation', 'consume_credits_v2', 'args',
            pg_catalog.jsonb_build_object('p_amount', p_amount, 'p_description', p_description,
                                          'p_reference_id', NULLIF(p_reference_id, '')));
        INSERT INTO billing.idempotency_keys (user_id, idempotency_key, request) VALUES (p_user_id, v_key, v_request)
        ON CONFLICT (user_id, idempotency_key) DO NOTHING;
        IF NOT FOUND THEN
            SELECT k.request, k.response INTO v_stored, v_response
              FROM billing.idempotency_keys AS k WHERE k.user_id = p_user_id AND k.idempotency_key = v_key;
            IF v_stored = v_request THEN
                RETURN v_response;
            END IF;
            RAISE EXCEPTION 'this idempotency key was already used with different arguments' USING ERRCODE = 'PT409';
        END IF;
    END IF;

    SELECT a.subscription_credits_balance, a.purchased_credits_balance INTO v_sub, v_pur
      FROM billing.accounts AS a WHERE a.user_id = p_user_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no credit account exists for user %', p_user_id USING ERRCODE = 'P0002';
    END IF;
    IF v_sub + v_pur < p_amount THEN
        RAISE EXCEPTION 'not enough credits for this operation' USING ERRCODE = 'PT402',
            DETAIL = pg_catalog.format('needed %s, available %s (subscription %s, purchased %s)', p_amount, v_sub + v_pur, v_sub, v_pur);
    END IF;
    v_from_sub := LEAST(v_sub, p_amount);
    v_from_pur := p_amount - v_from_sub;
    UPDATE billing.accounts AS a
       SET subscription_credits_balance = a.subscription_credits_balance - v_from_sub,
           purchased_credits_balance    = a.purchased_credits_balance - v_from_pur,
           last_subscription_delta      = -v_from_sub,
           last_purchased_delta         = -v_from_pur,
           updated_at                   = pg_catalog.now()
     WHERE a.user_id = p_user_id;
    IF v_from_sub > 0 THEN
        INSERT INTO billing.credit_transactions (user_id, operation_id, type, pool, amount, balance_after, description, reference_id, idempotency_key)
        VALUES (p_user_id, v_op, 'usage', 'subscription', -v_from_sub, v_sub - v_from_sub, p_description, NULLIF(p_reference_id, ''), v_key);
    END IF;
    IF v_from_pur > 0 THEN
        INSERT INTO billing.credit_transactions (user_id, operation_id, type, pool, amount, balance_after, description, reference_id, idempotency_key)
        VALUES (p_user_id, v_op, 'usage', 'purchased', -v_from_pur, v_pur - v_from_pur, p_description, NULLIF(p_reference_id, ''), v_key);
    END IF;
    v_response := pg_catalog.jsonb_build_object(
        'success', true, 'transaction_id', v_op, 'consumed', p_amount,
        'subscription_used', v_from_sub, 'purchased_used', v_from_pur,
        'subscription_credits_balance', v_sub - v_from_sub, 'purchased_credits_balance', v_pur - v_from_pur,
        'total_balance', v_sub - v_from_sub + v_pur - v_from_pur);
    IF v_key IS NOT NULL THEN
        UPDATE billing.idempotency_keys AS k SET response = v_response WHERE k.user_id = p_user_id AND k.idempotency_key = v_key;
    END IF;
    RETURN v_response;
END
$$;
