-- pg_billing schema: tables, indexes, the seeded plan catalog, views and RLS.
-- Rules (SPEC 12): every per-user table has user_id in its PRIMARY KEY/UNIQUE constraints,
-- ids are uuid or bigint, no foreign key leaves schema billing, no triggers on billing tables
-- (events, 0.6.0, are written by the functions themselves: src/api/events.rs).

-- The plan catalog: small shared lookup data (a Citus reference table when scaled out).
CREATE TABLE billing.plans (
    plan_id               text PRIMARY KEY CHECK (plan_id ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    display_name          text NOT NULL,
    description           text,
    price_monthly         numeric(12,2) NOT NULL DEFAULT 0 CHECK (price_monthly >= 0),
    price_yearly          numeric(12,2) NOT NULL DEFAULT 0 CHECK (price_yearly >= 0),
    currency              text NOT NULL DEFAULT 'usd',
    monthly_credits       integer NOT NULL DEFAULT 0 CHECK (monthly_credits >= 0),
    api_rate_limit_hourly integer NOT NULL DEFAULT 50 CHECK (api_rate_limit_hourly >= -1),
    limits                jsonb NOT NULL DEFAULT '{}' CHECK (pg_catalog.jsonb_typeof(limits) = 'object'),
    features              jsonb NOT NULL DEFAULT '[]',
    trial_days            integer NOT NULL DEFAULT 0 CHECK (trial_days >= 0),
    allow_overage         boolean NOT NULL DEFAULT false,
    sort_order            integer NOT NULL DEFAULT 0,
    is_active             boolean NOT NULL DEFAULT true,
    created_at            timestamptz NOT NULL DEFAULT pg_catalog.now(),
    updated_at            timestamptz NOT NULL DEFAULT pg_catalog.now(),
    -- At renewal, what remains of the expiring subscription credits, up to this many, rolls over
    -- into the new period as a `rollover` grant (0.4.0; 0 = nothing rolls over).
    rollover_max          integer NOT NULL DEFAULT 0 CONSTRAINT plans_rollover_max_check CHECK (rollover_max >= 0)
);
COMMENT ON TABLE billing.plans IS 'The plan catalog. limits keys: agents, documents, products, widgets_per_type, conversations_per_month, messages_per_month, tokens_input_per_month, tokens_output_per_month, api_calls_per_day, documents_per_month, generations_per_month; -1 = unlimited.';

-- The seeded catalog. pg_dump keeps every row of billing.plans (pg_extension_config_dump
-- below), so a restore must not seed again: its CREATE EXTENSION would write the default rows
-- and the restored rows (edits included) would then collide with them. Every pg_dump script
-- and pg_restore session sets row_security = off before CREATE EXTENSION, which an ordinary
-- session does not, so the seed is written only when row_security is on.
-- billing.seed_default_plans() writes any missing default rows at any time.
CREATE FUNCTION billing.seed_default_plans() RETURNS integer
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    WITH ins AS (
        INSERT INTO billing.plans AS p (plan_id, display_name, description, price_monthly, price_yearly,
                                        monthly_credits, api_rate_limit_hourly, limits, features,
                                        trial_days, allow_overage, sort_order)
        VALUES
        ('free', 'Free', 'Try the product', 0, 0, 10, 50,
         '{"agents": 1, "documents": 5, "products": 5, "widgets_per_type": 3, "conversations_per_month": 50, "messages_per_month": 100, "tokens_input_per_month": 100000, "tokens_output_per_month": 50000, "api_calls_per_day": 100, "documents_per_month": 10, "generations_per_month": 10}',
         '["basic_support"]', 0, false, 0),
        ('pro', 'Pro', 'For individuals', 19, 190, 500, 200,
         '{"agents": 5, "documents": 100, "products": 50, "widgets_per_type": 10, "conversations_per_month": 1000, "messages_per_month": 5000, "tokens_input_per_month": 2000000, "tokens_output_per_month": 1000000, "api_calls_per_day": 2000, "documents_per_month": 200, "generations_per_month": 500}',
         '["email_support", "custom_domain"]', 7, true, 1),
        ('premium', 'Premium', 'For growing teams', 49, 490, 2000, 500,
         '{"agents": 20, "documents": 1000, "products": 500, "widgets_per_type": 50, "conversations_per_month": 10000, "messages_per_month": 50000, "tokens_input_per_month": 20000000, "tokens_output_per_month": 10000000, "api_calls_per_day": 20000, "documents_per_month": 2000, "generations_per_month": 2000}',
         '["priority_support", "custom_domain", "analytics"]', 14, true, 2),
        ('ultra', 'Ultra', 'Unlimited scale', 199, 1990, 10000, 2000,
         '{"agents": -1, "documents": -1, "products": -1, "widgets_per_type": -1, "conversations_per_month": -1, "messages_per_month": -1, "tokens_input_per_month": -1, "tokens_output_per_month": -1, "api_calls_per_day": -1, "documents_per_month": -1, "generations_per_month": 10000}',
         '["dedicated_support", "custom_domain", "analytics", "sla"]', 14, true, 3)
        ON CONFLICT (plan_id) DO NOTHING
        RETURNING 1
    )
    SELECT pg_catalog.count(*)::integer FROM ins
$$;
COMMENT ON FUNCTION billing.seed_default_plans() IS 'Writes the default plans (free, pro, premium, ultra) that are missing; returns how many it wrote. Existing rows are never changed.';
SELECT billing.seed_default_plans() WHERE pg_catalog.current_setting('row_security') = 'on';

-- Credit amounts (0.7.0): a stored balance is never negative, a ledger row never moves 0. Domains,
-- not table CHECKs, so the check costs only where a statement assigns the column (see
-- billing.accounts).
CREATE DOMAIN billing.credit_balance AS bigint CONSTRAINT credit_balance_non_negative CHECK (VALUE >= 0);
COMMENT ON DOMAIN billing.credit_balance IS 'A stored credit balance (an account''s pool, a ledger row''s balance after): never negative.';
CREATE DOMAIN billing.credit_change AS bigint CONSTRAINT credit_change_non_zero CHECK (VALUE <> 0);
COMMENT ON DOMAIN billing.credit_change IS 'A ledger row''s signed amount: never 0.';

-- One row per user: the two credit pools.
CREATE TABLE billing.accounts (
    user_id                        uuid PRIMARY KEY,
    email                          text,
    subscription_credits_balance   billing.credit_balance NOT NULL DEFAULT 0,
    purchased_credits_balance      billing.credit_balance NOT NULL DEFAULT 0,
    subscription_credits_expire_at timestamptz,
    -- The signed change a write made to each pool (0.2.0 to 0.6.0; nothing read them). Not
    -- written since 0.7.0 (every assignment costs the hot path; a debit's split is in its result
    -- and its ledger rows); kept so that a client selecting them still works.
    last_subscription_delta        bigint NOT NULL DEFAULT 0,
    last_purchased_delta           bigint NOT NULL DEFAULT 0,
    created_at                     timestamptz NOT NULL DEFAULT pg_catalog.now(),
    updated_at                     timestamptz NOT NULL DEFAULT pg_catalog.now(),
    -- Overdraft (0.4.0): a debit may take the account down to -overdraft_limit; what it could not
    -- pay from grants is the debt, which the next grant pays first.
    overdraft_limit                bigint NOT NULL DEFAULT 0,
    debt                           bigint NOT NULL DEFAULT 0,
    -- No grant of this account expires before this instant (0.4.0): a write that finds it past
    -- settles the expired grants first. Kept at or before the earliest expiry (never after), so
    -- the hot path needs no look at the grants to know whether any expired.
    next_expiry_at                 timestamptz,
    -- Credit holds (0.5.0): the sum of the amounts of the account's active holds (billing.credit_holds),
    -- expired ones included until a write settles them, and an instant no active hold expires
    -- before (kept at or before the earliest expiry, like next_expiry_at; NULL: no active hold).
    -- Debits leave `held` credits for the holds; available = spendable - held - debt.
    held                           bigint NOT NULL DEFAULT 0,
    next_hold_expiry_at            timestamptz,
    -- At most this many active holds (NULL: no cap); reserve_credits raises PT429 beyond it.
    max_active_holds               integer,
    -- Balance alerts (0.6.0): the effective rule (the user's billing.user_balance_alerts row, else
    -- the one of the user's effective plan; NULL: none), the balance it re-arms at
    -- (ceil(threshold * (1 + hysteresis))), and its state: 0 armed, 1 balance.low fired, 2
    -- balance.depleted fired, -1 a new account whose rule was not looked up yet (its first write
    -- does). Kept by billing._sync_balance_alerts; the state moves only with an event
    -- (src/api/events.rs), so a write to an account without a rule costs nothing more.
    alert_threshold                bigint,
    alert_rearm                    bigint,
    alert_state                    smallint NOT NULL DEFAULT -1,
    -- The head (0.7.0): the first grant in spending order among the live grants without a scope,
    -- its pool, its remaining credits and until when it is sure to stay first (its expiry, or the
    -- earliest start of a grant that has not started). Written by every general debit, cleared
    -- (NULL) by every other write that changes the grants; a debit that this grant pays alone
    -- takes the hot path with it (src/api/credits.rs, FAST_ACCOUNT). A cache: NULL is always
    -- correct, billing.verify_ledger() checks a recorded head against the grants.
    head_grant                     uuid,
    head_subscription              boolean,
    head_remaining                 bigint,
    head_until                     timestamptz
    -- No table CHECK (0.7.0): the pools are of the domain billing.credit_balance, whose check
    -- is evaluated only where a statement assigns a pool, from an expression the type cache
    -- keeps planned; a table CHECK's expression is parsed again on every statement that writes
    -- the table (issue 13: about a fifth of a debit's instructions went to the two CHECKs of
    -- this table and the ledger). overdraft_limit and debt have none: set_overdraft_limit
    -- refuses a negative limit, a repayment never exceeds the debt, and billing.verify_ledger()
    -- checks the debt against its ledger rows. The one statement that adds to a pool (a new
    -- grant) evaluates the pools' sum plus what it adds: a total past 2^63-1 fails with 22003,
    -- so every stored account's total fits a bigint.
);
-- E-mails are compared one way everywhere: ASCII letters lower-cased, nothing else folded
-- (issue 11 item 8a; pg_billing_core::members::email_key).
CREATE INDEX accounts_email_idx ON billing.accounts (pg_catalog.translate(email, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz'));
COMMENT ON TABLE billing.accounts IS 'One row per user: the two pools (sums of the remaining credits of its grants: subscription + rollover grants, and purchased + refund + promotional grants), its overdraft limit and debt. Changed only through pg_billing functions.';

-- The two credit pools, and the debt an overdraft leaves (0.4.0) (an enum: the type enforces the
-- values, with no CHECK to evaluate).
CREATE TYPE billing.credit_pool AS ENUM ('subscription', 'purchased', 'debt');

-- Credit grants (0.4.0): every credit an account holds belongs to one grant.
CREATE TYPE billing.grant_category AS ENUM ('subscription', 'purchased', 'promotional', 'rollover', 'refund');

CREATE TABLE billing.credit_grants (
    user_id               uuid NOT NULL,
    id                    uuid NOT NULL,
    category              billing.grant_category NOT NULL,
    amount                bigint NOT NULL,
    remaining             bigint NOT NULL,
    -- Lower is spent first (0..100); see billing.grant_credits for the defaults.
    priority              integer NOT NULL,
    effective_at          timestamptz NOT NULL,
    expires_at            timestamptz,
    -- NULL: any spending; else only spending for one of these features.
    scope                 text[],
    voided_at             timestamptz,
    -- When a write expired what remained: at or after expires_at, or earlier when a renewal or
    -- expire_subscription_credits ended the grant (expires_at itself never moves back).
    settled_at            timestamptz,
    voided_amount         bigint,
    void_reason           text,
    -- The operation (ledger operation_id) that created the grant: for a purchase, the
    -- transaction_id clawback_credits_from_transaction takes.
    source_transaction_id uuid,
    idempotency_key       text,
    description           text,
    reference_id          text,
    -- Clock time, so grants made in one transaction keep the order they were made in.
    created_at            timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    -- Which of the two pools the grant's credits count in (subscription and rollover grants: the
    -- subscription pool; the others: the purchased pool), set when the grant is made.
    pool                  billing.credit_pool NOT NULL,
    -- remaining = 0: spent, voided or expired to the last credit. A flag the writes keep, rather
    -- than `remaining > 0` in the spending index's predicate: a debit changes remaining, and a
    -- column the index reads would make every debit a non-HOT update that writes new index
    -- entries.
    depleted              boolean NOT NULL DEFAULT false,
    -- No CHECK and no generated column here: PostgreSQL parses each one's expression again on
    -- every statement that writes the table, and this is the hot table. The statements keep
    -- 0 <= remaining <= amount (a debit takes at most what a grant holds, under the account
    -- lock), pool and depleted; billing.verify_ledger() checks all of it, and the accounts' CHECK
    -- keeps every pool sum >= 0.
    PRIMARY KEY (user_id, id)
);
-- The spending order (billing.consume_credits): priority, scoped before unscoped, earliest expiry
-- first (never-expiring last), then earliest start, oldest, id. Only grants with credits left.
CREATE INDEX credit_grants_spending_idx ON billing.credit_grants
    (user_id, priority, (scope IS NULL), expires_at, effective_at, created_at, id)
    WHERE NOT depleted AND voided_at IS NULL;
-- void_grant finds a grant by its id alone.
CREATE INDEX credit_grants_id_idx ON billing.credit_grants (id);
COMMENT ON TABLE billing.credit_grants IS 'Credit grants: amount granted, remaining, priority (lower spent first), effective_at, expires_at (NULL = never), scope (NULL = any feature), void. Spendable = effective_at <= now() < expires_at AND not voided AND remaining > 0 AND scope admits the feature, evaluated by the spending statement itself. Per grant, its ledger rows (credit_transactions.grant_id) sum to remaining.';

-- Credit holds (0.5.0): credits reserved before a job whose cost is known only at the end. A hold
-- is never a ledger row: capture_hold debits what the job cost (ledger type 'hold_capture',
-- reference_id = the hold id) and releases the rest.
CREATE TYPE billing.hold_status AS ENUM ('active', 'captured', 'released', 'expired');

CREATE TABLE billing.credit_holds (
    user_id         uuid NOT NULL,
    id              uuid NOT NULL,
    amount          bigint NOT NULL,
    -- The feature the job spends for (NULL: unscoped grants only), as in consume_credits.
    feature         text,
    expires_at      timestamptz NOT NULL,
    status          billing.hold_status NOT NULL DEFAULT 'active',
    -- What capture_hold debited (NULL unless captured).
    captured_amount bigint,
    idempotency_key text,
    created_at      timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    -- When it was captured or released, or (expired) its expiry.
    resolved_at     timestamptz,
    -- The capture's or release's result, returned again by a repeat.
    resolution      jsonb,
    PRIMARY KEY (user_id, id)
);
-- capture_hold, release_hold, extend_hold and increase_hold find a hold by its id alone.
CREATE INDEX credit_holds_id_idx ON billing.credit_holds (id);
-- The active holds of an account (settling, get_active_holds, the cap, the reads' held sum).
CREATE INDEX credit_holds_active_idx ON billing.credit_holds (user_id, expires_at) WHERE status = 'active';
COMMENT ON TABLE billing.credit_holds IS 'Credit holds: amount reserved for a job until expires_at; status active, captured (captured_amount debited), released or expired (a write after expires_at marks it). billing.accounts.held is the sum of the active holds'' amounts. Changed only through pg_billing functions.';

-- The ledger: one row per pool touched; the rows of one call share operation_id.
CREATE TABLE billing.credit_transactions (
    user_id         uuid NOT NULL,
    id              bigint GENERATED BY DEFAULT AS IDENTITY,
    operation_id    uuid NOT NULL,
    type            text NOT NULL,
    pool            billing.credit_pool NOT NULL,
    amount          billing.credit_change NOT NULL,
    balance_after   billing.credit_balance NOT NULL,
    description     text,
    reference_id    text,
    idempotency_key text,
    -- The moment the row was written (clock time, so rows of one transaction stay ordered and
    -- get_credit_history can page by time without splitting or skipping rows).
    created_at      timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    -- The grant the row changed (0.4.0); NULL on rows of the debt and on rows written before 0.4.0.
    grant_id        uuid,
    -- (0.7.0) amount <> 0 and balance_after >= 0 are the domains' checks, not a table CHECK
    -- (see billing.accounts).
    PRIMARY KEY (user_id, id)
);
CREATE INDEX credit_transactions_user_time_idx ON billing.credit_transactions (user_id, created_at DESC, id DESC);
CREATE INDEX credit_transactions_operation_idx ON billing.credit_transactions (operation_id);
COMMENT ON TABLE billing.credit_transactions IS 'Append-only credit ledger, one row per grant touched. amount is signed (grants > 0, consumption < 0); per user and pool the amounts sum to the balance, per grant to its remaining, and the debt rows to minus the debt (billing.verify_ledger checks it). balance_after: the pool''s balance after the row (for pool debt: the debt after it).';

CREATE TABLE billing.credit_expiration_events (
    user_id        uuid NOT NULL,
    id             bigint GENERATED BY DEFAULT AS IDENTITY,
    operation_id   uuid NOT NULL,
    expired_amount bigint NOT NULL CHECK (expired_amount > 0),
    description    text,
    created_at     timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (user_id, id)
);
COMMENT ON TABLE billing.credit_expiration_events IS 'One row each time subscription credits expired (never for a zero balance).';

-- Idempotency keys of credit mutators: the request's fingerprint and the first result.
CREATE TABLE billing.idempotency_keys (
    user_id         uuid NOT NULL,
    idempotency_key text NOT NULL,
    request         jsonb NOT NULL,
    response        jsonb,
    created_at      timestamptz NOT NULL DEFAULT pg_catalog.now(),
    -- Whose key it is (0.3.0): 'user' for an end user's call, 'service' for a service caller's.
    -- The two namespaces never collide, so an end user cannot block the backend's keyed calls.
    scope           text NOT NULL,
    CONSTRAINT idempotency_keys_pkey PRIMARY KEY (user_id, scope, idempotency_key)
);
COMMENT ON TABLE billing.idempotency_keys IS 'p_idempotency_key of credit mutators, per user and caller kind (scope: user or service): the request fingerprint and the first response, replayed on repeats. cleanup_idempotency_keys deletes old keys.';
-- For cleanup_idempotency_keys (0.2.0).
CREATE INDEX idempotency_keys_created_at_idx ON billing.idempotency_keys (created_at);

-- The idempotency keys of usage events (0.6.0; record_usage_batch): the period each event was
-- counted in, so a repeat returns it. Lean on purpose (one btree, a BRIN for retention): a batch
-- writes one row per keyed event.
CREATE TABLE billing.usage_event_keys (
    user_id         uuid NOT NULL,
    idempotency_key text NOT NULL,
    period_start    timestamptz NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (user_id, idempotency_key)
);
CREATE INDEX usage_event_keys_created_at_idx ON billing.usage_event_keys USING brin (created_at);
COMMENT ON TABLE billing.usage_event_keys IS 'idempotency_key of record_usage_batch events, per user, with the period each event counted in (a repeat returns it). cleanup_idempotency_keys deletes old keys.';

-- Clawbacks: at most one per purchase.
CREATE TABLE billing.clawbacks (
    user_id                 uuid NOT NULL,
    purchase_transaction_id uuid NOT NULL,
    response                jsonb,
    created_at              timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (user_id, purchase_transaction_id)
);
COMMENT ON TABLE billing.clawbacks IS 'One row per reversed purchase, so a chargeback is never applied twice.';

-- Webhook events: global provider event ids, keyed by themselves (SPEC 10, 12).
CREATE TABLE billing.webhook_events (
    event_id     text PRIMARY KEY,
    event_type   text NOT NULL,
    user_id      uuid,
    processed_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    result       jsonb
);
COMMENT ON TABLE billing.webhook_events IS 'Provider webhook event ids already processed (record_webhook_event). cleanup_webhook_events deletes old ids.';
-- For cleanup_webhook_events (0.2.0).
CREATE INDEX webhook_events_processed_at_idx ON billing.webhook_events (processed_at);

-- Balances as they are now (0.4.0): the sums of the live grants' remaining (started, not
-- expired, not voided), also before a write settles the expired ones.
CREATE VIEW billing.user_credits WITH (security_invoker = true) AS
SELECT a.user_id,
       COALESCE(g.sub, 0) AS subscription_credits_balance,
       COALESCE(g.pur, 0) AS purchased_credits_balance,
       COALESCE(g.sub, 0) + COALESCE(g.pur, 0) - a.debt AS total_balance,
       COALESCE(g.unscoped, 0) - a.debt
         - CASE WHEN a.held = 0 THEN 0
                WHEN a.next_hold_expiry_at > pg_catalog.now() THEN a.held
                ELSE COALESCE((SELECT pg_catalog.sum(h.amount) FROM billing.credit_holds AS h
                                WHERE h.user_id = a.user_id AND h.status = 'active' AND h.expires_at > pg_catalog.now())::bigint, 0) END
         AS available
  FROM billing.accounts AS a
  LEFT JOIN LATERAL (
        SELECT pg_catalog.sum(l.remaining) FILTER (WHERE l.pool = 'subscription')::bigint AS sub,
               pg_catalog.sum(l.remaining) FILTER (WHERE l.pool = 'purchased')::bigint AS pur,
               pg_catalog.sum(l.remaining) FILTER (WHERE l.scope IS NULL)::bigint AS unscoped
          FROM billing.credit_grants AS l
         WHERE l.user_id = a.user_id AND NOT l.depleted AND l.voided_at IS NULL
           AND l.effective_at <= pg_catalog.now()
           AND (l.expires_at IS NULL OR l.expires_at > pg_catalog.now())) AS g ON true;
COMMENT ON VIEW billing.user_credits IS 'Each account''s two pools, their total less the debt (billing.accounts.debt), and available: the credits any spending may use now, less the debt and the credits active holds reserve (holds past their expiry count as 0); expired, voided and not yet started grants count as 0. Row security applies: end users see their own row.';

-- pg_dump keeps the rows of every table.
SELECT pg_catalog.pg_extension_config_dump('billing.plans', '');
SELECT pg_catalog.pg_extension_config_dump('billing.accounts', '');
SELECT pg_catalog.pg_extension_config_dump('billing.credit_transactions', '');
SELECT pg_catalog.pg_extension_config_dump('billing.credit_transactions_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('billing.credit_expiration_events', '');
SELECT pg_catalog.pg_extension_config_dump('billing.credit_expiration_events_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('billing.idempotency_keys', '');
SELECT pg_catalog.pg_extension_config_dump('billing.usage_event_keys', '');
SELECT pg_catalog.pg_extension_config_dump('billing.clawbacks', '');
SELECT pg_catalog.pg_extension_config_dump('billing.webhook_events', '');
SELECT pg_catalog.pg_extension_config_dump('billing.credit_grants', '');
SELECT pg_catalog.pg_extension_config_dump('billing.credit_holds', '');
