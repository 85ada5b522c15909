//! Two-pool credits (SPEC 4): consume, grant, expire, renew, refund, claw back, legacy aliases.
//!
//! Each mutation is one statement: a row-locked `UPDATE`/upsert of `billing.accounts` whose SET
//! list applies the arithmetic of `pg_billing_core::credits` and records the per-pool deltas, and
//! data-modifying CTEs that append the ledger rows (one per pool touched) in the same statement.
//! At READ COMMITTED a concurrent writer waits for the row lock and then re-evaluates the WHERE
//! and SET expressions on the newest row version, so balances never go negative and no update
//! is lost.

use pg_billing_core::identity::Caller;
use pg_billing_core::idempotency::{self, Replay};
use pg_billing_core::{credits, BillingError};
use pgrx::datum::DatumWithOid;
use pgrx::spi::{Spi, SpiClient, SpiTupleTable};
use serde_json::{json, Value};

use crate::boundary::{Args, BResult, Ret};
use crate::security;
use crate::spi::{self, col, uuid_arg, uuid_text, BOOL, INT8, JSONB, TEXT, TIMESTAMPTZ, UUID};
use crate::validate;

// ---------------------------------------------------------------------------------------------
// Statements
// ---------------------------------------------------------------------------------------------

/// FIFO consumption, as two simple statements under the same row lock (the UPDATE takes it):
/// executor start-up of two small plans costs less than that of one CTE plan (measured with
/// callgrind; see benches/README.md). $1 user, $2 amount. No row: unknown account, not enough
/// credits, or subscription credits past their expiry still to settle (nothing changed; the
/// caller settles them, see [`SETTLE`], and tries again).
const DEBIT: &str = "
UPDATE billing.accounts AS a
   SET subscription_credits_balance = a.subscription_credits_balance - LEAST(a.subscription_credits_balance, $2),
       purchased_credits_balance    = a.purchased_credits_balance - ($2 - LEAST(a.subscription_credits_balance, $2)),
       last_subscription_delta      = -LEAST(a.subscription_credits_balance, $2),
       last_purchased_delta         = -($2 - LEAST(a.subscription_credits_balance, $2)),
       updated_at                   = pg_catalog.now()
 WHERE a.user_id = $1
   AND a.subscription_credits_balance + a.purchased_credits_balance >= $2
   AND (a.subscription_credits_expire_at IS NULL OR a.subscription_credits_expire_at > pg_catalog.now()
        OR a.subscription_credits_balance = 0)
RETURNING a.subscription_credits_balance, a.purchased_credits_balance, a.last_subscription_delta, a.last_purchased_delta";

/// One ledger row. $1 user, $2 operation, $3 type, $4 pool, $5 amount, $6 balance after,
/// $7 description, $8 reference, $9 idempotency key.
const LEDGER_ROW: &str = "
INSERT INTO billing.credit_transactions
       (user_id, operation_id, type, pool, amount, balance_after, description, reference_id, idempotency_key)
VALUES ($1, $2, $3, $4::billing.credit_pool, $5, $6, $7, $8, $9)";

/// Grant to one pool, creating the account if missing. $1 user, $2 to subscription, $3 to
/// purchased, $4 description, $5 reference, $6 key, $7 ledger type.
const GRANT: &str = "
WITH acct AS (
    INSERT INTO billing.accounts AS a
           (user_id, subscription_credits_balance, purchased_credits_balance, last_subscription_delta, last_purchased_delta)
    VALUES ($1, $2, $3, $2, $3)
    ON CONFLICT (user_id) DO UPDATE
       SET subscription_credits_balance = a.subscription_credits_balance + EXCLUDED.subscription_credits_balance,
           purchased_credits_balance    = a.purchased_credits_balance + EXCLUDED.purchased_credits_balance,
           last_subscription_delta      = EXCLUDED.subscription_credits_balance,
           last_purchased_delta         = EXCLUDED.purchased_credits_balance,
           updated_at                   = pg_catalog.now()
 RETURNING a.subscription_credits_balance AS sub, a.purchased_credits_balance AS pur,
           a.last_subscription_delta AS dsub, a.last_purchased_delta AS dpur
), op AS (
    SELECT pg_catalog.gen_random_uuid() AS id
), ledger AS (
    INSERT INTO billing.credit_transactions
           (user_id, operation_id, type, pool, amount, balance_after, description, reference_id, idempotency_key)
    SELECT $1, op.id, $7, e.pool, e.amount, e.balance_after, $4, $5, $6
      FROM acct CROSS JOIN op
     CROSS JOIN LATERAL (VALUES (1, 'subscription'::billing.credit_pool, acct.dsub, acct.sub),
                                (2, 'purchased'::billing.credit_pool, acct.dpur, acct.pur)) AS e(ord, pool, amount, balance_after)
     WHERE e.amount <> 0
     ORDER BY e.ord
)
SELECT op.id, acct.sub, acct.pur, acct.dsub, acct.dpur FROM acct CROSS JOIN op";

/// Zero the subscription pool. $1 user, $2 description, $3 key, $4 only when lapsed: true
/// settles credits past `subscription_credits_expire_at` (no row, and no lock, when there are
/// none), false expires whatever the pool holds. Either way the pool has no expiry afterwards.
const EXPIRE: &str = "
WITH acct AS (
    UPDATE billing.accounts AS a
       SET subscription_credits_balance   = 0,
           subscription_credits_expire_at = NULL,
           last_subscription_delta        = -a.subscription_credits_balance,
           last_purchased_delta           = 0,
           updated_at                     = pg_catalog.now()
     WHERE a.user_id = $1
       AND (NOT $4 OR a.subscription_credits_expire_at <= pg_catalog.now())
 RETURNING a.subscription_credits_balance AS sub, a.purchased_credits_balance AS pur,
           a.last_subscription_delta AS dsub
), op AS (
    SELECT pg_catalog.gen_random_uuid() AS id
), ledger AS (
    INSERT INTO billing.credit_transactions
           (user_id, operation_id, type, pool, amount, balance_after, description, idempotency_key)
    SELECT $1, op.id, 'expiration', 'subscription', acct.dsub, 0, $2, $3
      FROM acct CROSS JOIN op
     WHERE acct.dsub <> 0
), event AS (
    INSERT INTO billing.credit_expiration_events (user_id, operation_id, expired_amount, description)
    SELECT $1, op.id, -acct.dsub, $2
      FROM acct CROSS JOIN op
     WHERE acct.dsub <> 0
)
SELECT op.id, acct.sub, acct.pur, acct.dsub FROM acct CROSS JOIN op";

/// Expire then grant, atomically; creates the account if missing. $1 user, $2 amount,
/// $3 period end, $4 key.
const RENEW: &str = "
WITH acct AS (
    INSERT INTO billing.accounts AS a
           (user_id, subscription_credits_balance, subscription_credits_expire_at, last_subscription_delta, last_purchased_delta)
    VALUES ($1, $2, $3, 0, 0)
    ON CONFLICT (user_id) DO UPDATE
       SET subscription_credits_balance   = EXCLUDED.subscription_credits_balance,
           subscription_credits_expire_at = EXCLUDED.subscription_credits_expire_at,
           last_subscription_delta        = -a.subscription_credits_balance,
           last_purchased_delta           = 0,
           updated_at                     = pg_catalog.now()
 RETURNING a.subscription_credits_balance AS sub, a.purchased_credits_balance AS pur,
           a.last_subscription_delta AS expired_delta
), op AS (
    SELECT pg_catalog.gen_random_uuid() AS id
), ledger AS (
    INSERT INTO billing.credit_transactions
           (user_id, operation_id, type, pool, amount, balance_after, description, idempotency_key)
    SELECT $1, op.id, e.type, 'subscription', e.amount, e.balance_after, e.description, $4
      FROM acct CROSS JOIN op
     CROSS JOIN LATERAL (VALUES (1, 'expiration', acct.expired_delta, 0::bigint, 'expired at renewal'),
                                (2, 'renewal', $2, acct.sub, 'subscription renewal')) AS e(ord, type, amount, balance_after, description)
     WHERE e.amount <> 0
     ORDER BY e.ord
), event AS (
    INSERT INTO billing.credit_expiration_events (user_id, operation_id, expired_amount, description)
    SELECT $1, op.id, -acct.expired_delta, 'expired at renewal'
      FROM acct CROSS JOIN op
     WHERE acct.expired_delta <> 0
)
SELECT op.id, acct.sub, acct.pur, acct.expired_delta FROM acct CROSS JOIN op";

/// Take back up to $2 from the purchased pool. $1 user, $2 amount, $3 reason, $4 reference.
const CLAWBACK: &str = "
WITH acct AS (
    UPDATE billing.accounts AS a
       SET purchased_credits_balance = a.purchased_credits_balance - LEAST(a.purchased_credits_balance, $2),
           last_purchased_delta      = -LEAST(a.purchased_credits_balance, $2),
           last_subscription_delta   = 0,
           updated_at                = pg_catalog.now()
     WHERE a.user_id = $1
 RETURNING a.subscription_credits_balance AS sub, a.purchased_credits_balance AS pur,
           a.last_purchased_delta AS dpur
), op AS (
    SELECT pg_catalog.gen_random_uuid() AS id
), ledger AS (
    INSERT INTO billing.credit_transactions
           (user_id, operation_id, type, pool, amount, balance_after, description, reference_id)
    SELECT $1, op.id, 'clawback', 'purchased', acct.dpur, acct.pur, $3, $4
      FROM acct CROSS JOIN op
     WHERE acct.dpur <> 0
)
SELECT op.id, acct.sub, acct.pur, acct.dpur FROM acct CROSS JOIN op";

const BALANCES: &str =
    "SELECT subscription_credits_balance, purchased_credits_balance FROM billing.accounts WHERE user_id = $1";

/// The purchase a clawback reverses: its user and how much it added to the purchased pool.
const FIND_PURCHASE: &str = "
SELECT t.user_id,
       pg_catalog.sum(t.amount) FILTER (WHERE t.pool = 'purchased' AND t.type = 'purchase' AND t.amount > 0)::bigint
  FROM billing.credit_transactions AS t
 WHERE t.operation_id = $1
 GROUP BY t.user_id";

const CLAIM_CLAWBACK: &str = "
INSERT INTO billing.clawbacks (user_id, purchase_transaction_id) VALUES ($1, $2)
ON CONFLICT (user_id, purchase_transaction_id) DO NOTHING RETURNING 1";
const LOAD_CLAWBACK: &str =
    "SELECT response FROM billing.clawbacks WHERE user_id = $1 AND purchase_transaction_id = $2";
const STORE_CLAWBACK: &str =
    "UPDATE billing.clawbacks SET response = $3 WHERE user_id = $1 AND purchase_transaction_id = $2";

/// Idempotency keys live in two namespaces per user ($4 scope): `user` for end users' calls and
/// `service` for service callers', so a key an end user can guess never blocks the backend's.
const CLAIM_KEY: &str = "
INSERT INTO billing.idempotency_keys (user_id, idempotency_key, request, scope) VALUES ($1, $2, $3, $4)
ON CONFLICT (user_id, scope, idempotency_key) DO NOTHING RETURNING 1";
const LOAD_KEY: &str =
    "SELECT request, response FROM billing.idempotency_keys WHERE user_id = $1 AND scope = $3 AND idempotency_key = $2";
const STORE_KEY: &str =
    "UPDATE billing.idempotency_keys SET response = $3 WHERE user_id = $1 AND scope = $4 AND idempotency_key = $2";

// ---------------------------------------------------------------------------------------------
// Shared pieces
// ---------------------------------------------------------------------------------------------

fn json_arg(v: &Value) -> DatumWithOid<'static> {
    pgrx::JsonB(v.clone()).into()
}

fn opt(s: Option<&str>) -> Value {
    s.map(|s| Value::String(s.to_string())).unwrap_or(Value::Null)
}

/// Whose namespace an idempotency key belongs to: end users' and service callers' keys never
/// collide (issue 11 item 6).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum KeyScope {
    User,
    Service,
}

impl KeyScope {
    pub fn of(caller: &Caller) -> KeyScope {
        match caller {
            Caller::EndUser { .. } => KeyScope::User,
            Caller::Service => KeyScope::Service,
        }
    }
    fn as_str(self) -> &'static str {
        match self {
            KeyScope::User => "user",
            KeyScope::Service => "service",
        }
    }
}

/// Run `op` at most once per (user, scope, key): the first call stores its result, a repeat with
/// the same fingerprint replays it, anything else is `PT409`. A concurrent repeat waits on the
/// key's unique index until the first commits (then replays) or aborts (then runs).
pub fn idempotent(
    client: &mut SpiClient<'_>,
    user: &[u8; 16],
    scope: KeyScope,
    key: Option<&str>,
    fingerprint: Value,
    op: impl FnOnce(&mut SpiClient<'_>) -> BResult<Value>,
) -> BResult<Value> {
    let Some(key) = key else { return op(client) };
    let sc = scope.as_str();
    let claimed =
        spi::write(client, CLAIM_KEY, &[UUID, TEXT, JSONB, TEXT], &[uuid_arg(user), key.into(), json_arg(&fingerprint), sc.into()])?;
    if !claimed.is_empty() {
        let response = op(client)?;
        spi::write(client, STORE_KEY, &[UUID, TEXT, JSONB, TEXT], &[uuid_arg(user), key.into(), json_arg(&response), sc.into()])?;
        return Ok(response);
    }
    // The key exists and its transaction committed (we waited for it). Read it with a fresh
    // snapshot: a write-mode SPI statement takes one at READ COMMITTED.
    let t = spi::write(client, LOAD_KEY, &[UUID, TEXT, TEXT], &[uuid_arg(user), key.into(), sc.into()])?;
    let t = t.first();
    let stored = col::<pgrx::JsonB>(&t, 1)?.map(|j| j.0).unwrap_or(Value::Null);
    match idempotency::compare(key, &stored, &fingerprint) {
        Replay::Same => col::<pgrx::JsonB>(&t, 2)?
            .map(|j| j.0)
            .ok_or_else(|| BillingError::internal("an idempotency key has no stored response")),
        Replay::Conflict(e) => Err(e),
    }
}

/// The balances of an account, or `P0002`.
pub fn balances(client: &mut SpiClient<'_>, user: &[u8; 16]) -> BResult<credits::Balances> {
    let t = spi::write(client, BALANCES, &[UUID], &[uuid_arg(user)])?;
    if t.is_empty() {
        return Err(unknown_account(user));
    }
    let t = t.first();
    Ok(credits::Balances {
        subscription: col::<i64>(&t, 1)?.unwrap_or(0),
        purchased: col::<i64>(&t, 2)?.unwrap_or(0),
    })
}

fn unknown_account(user: &[u8; 16]) -> BillingError {
    BillingError::NotFound {
        message: format!("no credit account exists for user {}", uuid_text(user)),
        hint: Some("accounts are created by add_subscription_credits, add_purchased_credits or renew_subscription_credits".into()),
    }
}

struct Row {
    op: String,
    sub: i64,
    pur: i64,
    d1: i64,
}

fn row(t: SpiTupleTable<'_>) -> BResult<Row> {
    let t = t.first();
    let op = col::<pgrx::Uuid>(&t, 1)?.ok_or_else(|| BillingError::internal("statement returned no operation id"))?;
    Ok(Row {
        op: uuid_text(op.as_bytes()),
        sub: col::<i64>(&t, 2)?.unwrap_or(0),
        pur: col::<i64>(&t, 3)?.unwrap_or(0),
        d1: col::<i64>(&t, 4)?.unwrap_or(0),
    })
}

thread_local! {
    /// Seeded from the strong random source on first use in each backend (after fork).
    static OP_IDS: std::cell::RefCell<Option<pg_billing_core::ids::OpIds>> = const { std::cell::RefCell::new(None) };
}

/// A fresh operation id (a time-ordered version-7 uuid; see `pg_billing_core::ids`).
pub fn new_operation_id() -> BResult<[u8; 16]> {
    OP_IDS.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.is_none() {
            let mut seed = [0u8; 32];
            // SAFETY: writes exactly 32 bytes into seed.
            if !unsafe { pgrx::pg_sys::pg_strong_random(seed.as_mut_ptr().cast(), seed.len()) } {
                return Err(BillingError::internal("could not generate random values"));
            }
            *cell = Some(pg_billing_core::ids::OpIds::from_seed(seed));
        }
        // SAFETY: GetCurrentTimestamp only reads the clock.
        let pg_micros = unsafe { pgrx::pg_sys::GetCurrentTimestamp() };
        let unix_ms = (pg_micros.div_euclid(1000) + 946_684_800_000).max(0) as u64;
        cell.as_mut().map(|g| g.next_uuid_v7(unix_ms)).ok_or_else(|| BillingError::internal("no id generator"))
    })
}

/// FIFO consumption with its result as JSON (for idempotency records and Rust callers).
pub fn consume(
    client: &mut SpiClient<'_>,
    user: &[u8; 16],
    amount: i64,
    ledger_type: &str,
    description: Option<&str>,
    reference: Option<&str>,
    key: Option<&str>,
) -> BResult<Value> {
    Ok(debit(client, user, amount, ledger_type, description, reference, key)?.to_json())
}

/// What a consumption did: enough to build its JSON result (outside SPI for the hot path).
pub struct Debit {
    op: [u8; 16],
    amount: i64,
    sub: i64,
    pur: i64,
    dsub: i64,
    dpur: i64,
}

/// FIFO consumption: debit, then the ledger rows (one per pool touched), under the account's
/// row lock. Shared by consume_credits_v2, decrement_credits_with_log and the members domain.
pub fn debit(
    client: &mut SpiClient<'_>,
    user: &[u8; 16],
    amount: i64,
    ledger_type: &str,
    description: Option<&str>,
    reference: Option<&str>,
    key: Option<&str>,
) -> BResult<Debit> {
    let mut attempts = 0;
    let t = loop {
        let t = spi::write(client, DEBIT, &[UUID, INT8], &[uuid_arg(user), amount.into()])?;
        if !t.is_empty() {
            break t.first();
        }
        attempts += 1;
        if settle(client, user)? {
            continue;
        }
        let b = balances(client, user)?;
        credits::fifo_split(b, amount)?;
        if attempts >= 3 {
            return Err(BillingError::InsufficientCredits { needed: amount, subscription: b.subscription, purchased: b.purchased });
        }
    };
    let (sub, pur) = (col::<i64>(&t, 1)?.unwrap_or(0), col::<i64>(&t, 2)?.unwrap_or(0));
    let (dsub, dpur) = (col::<i64>(&t, 3)?.unwrap_or(0), col::<i64>(&t, 4)?.unwrap_or(0));
    let op = new_operation_id()?;
    for (pool, delta, after) in [("subscription", dsub, sub), ("purchased", dpur, pur)] {
        if delta != 0 {
            spi::write(
                client,
                LEDGER_ROW,
                &[UUID, UUID, TEXT, TEXT, INT8, INT8, TEXT, TEXT, TEXT],
                &[uuid_arg(user), uuid_arg(&op), ledger_type.into(), pool.into(), delta.into(), after.into(),
                  description.into(), reference.into(), key.into()],
            )?;
        }
    }
    Ok(Debit { op, amount, sub, pur, dsub, dpur })
}

impl Debit {
    /// consume_credits_v2's result as a JSON value.
    fn to_json(&self) -> Value {
        json!({
            "success": true,
            "transaction_id": uuid_text(&self.op),
            "consumed": self.amount,
            "subscription_used": -self.dsub,
            "purchased_used": -self.dpur,
            "subscription_credits_balance": self.sub,
            "purchased_credits_balance": self.pur,
            "total_balance": self.sub.saturating_add(self.pur),
        })
    }

    /// The same result built directly as jsonb in the caller's memory context (the hot path).
    fn to_jsonb(&self) -> pgrx::pg_sys::Datum {
        use crate::boundary::{jsonb_object, JVal};
        let op = uuid_text(&self.op);
        jsonb_object(&[
            ("success", JVal::Bool(true)),
            ("transaction_id", JVal::Str(&op)),
            ("consumed", JVal::Int(self.amount)),
            ("subscription_used", JVal::Int(-self.dsub)),
            ("purchased_used", JVal::Int(-self.dpur)),
            ("subscription_credits_balance", JVal::Int(self.sub)),
            ("purchased_credits_balance", JVal::Int(self.pur)),
            ("total_balance", JVal::Int(self.sub.saturating_add(self.pur))),
        ])
    }
}

#[derive(Clone, Copy)]
pub enum Pool {
    Subscription,
    Purchased,
}

#[allow(clippy::too_many_arguments)]
pub fn grant(
    client: &mut SpiClient<'_>,
    user: &[u8; 16],
    pool: Pool,
    amount: i64,
    ledger_type: &str,
    description: Option<&str>,
    reference: Option<&str>,
    key: Option<&str>,
) -> BResult<Value> {
    let (to_sub, to_pur) = match pool {
        Pool::Subscription => (amount, 0i64),
        Pool::Purchased => (0i64, amount),
    };
    settle(client, user)?;
    let t = spi::write(
        client,
        GRANT,
        &[UUID, INT8, INT8, TEXT, TEXT, TEXT, TEXT],
        &[uuid_arg(user), to_sub.into(), to_pur.into(), description.into(), reference.into(), key.into(), ledger_type.into()],
    )?;
    let r = row(t)?;
    Ok(json!({
        "success": true,
        "transaction_id": r.op,
        "added": amount,
        "subscription_credits_balance": r.sub,
        "purchased_credits_balance": r.pur,
        "total_balance": r.sub.saturating_add(r.pur),
    }))
}

fn legacy_total(v: &Value) -> BResult<Ret> {
    let total = v.get("total_balance").and_then(Value::as_i64).unwrap_or(0);
    i32::try_from(total).map(Ret::Int).map_err(|_| BillingError::OutOfRange {
        message: "the new total does not fit the integer this legacy function returns".into(),
        detail: Some(format!("total balance {total}")),
    })
}

// ---------------------------------------------------------------------------------------------
// SQL functions
// ---------------------------------------------------------------------------------------------

/// consume_credits_v2(p_user_id, p_amount, p_description, p_reference_id, p_idempotency_key)
fn consume_credits_v2(a: &Args) -> BResult<Ret> {
    let user = validate::required("p_user_id", a.uuid(0))?;
    let caller = security::authorize_user(&user)?;
    let amount = validate::positive_amount("p_amount", a.int(1))?;
    let (d, r, k) = (a.text(2), a.text(3), a.text(4));
    let description = validate::text("p_description", d.as_deref())?;
    let reference = validate::key("p_reference_id", r.as_deref())?;
    let key = validate::key("p_idempotency_key", k.as_deref())?;
    if key.is_none() {
        let d = Spi::connect_mut(|c| debit(c, &user, amount, "usage", description, reference, None))?;
        return Ok(Ret::Datum(d.to_jsonb()));
    }
    let fp = idempotency::fingerprint(
        "consume_credits_v2",
        &[("p_amount", json!(amount)), ("p_description", opt(description)), ("p_reference_id", opt(reference))],
    );
    Spi::connect_mut(|c| {
        idempotent(c, &user, KeyScope::of(&caller), key, fp, |c| consume(c, &user, amount, "usage", description, reference, key))
    })
    .map(Ret::Json)
}
crate::billing_fn!(pg_finfo_pgb_consume_credits_v2, pgb_consume_credits_v2, consume_credits_v2);

fn add_credits_to(a: &Args, function: &'static str, pool: Pool, ledger_type: &'static str) -> BResult<Ret> {
    security::require_service(function)?;
    let user = validate::required("p_user_id", a.uuid(0))?;
    let amount = validate::positive_amount("p_amount", a.int(1))?;
    let (d, r, k) = (a.text(2), a.text(3), a.text(4));
    let description = validate::text("p_description", d.as_deref())?;
    let reference = validate::key("p_reference_id", r.as_deref())?;
    let key = validate::key("p_idempotency_key", k.as_deref())?;
    let fp = idempotency::fingerprint(
        function,
        &[("p_amount", json!(amount)), ("p_description", opt(description)), ("p_reference_id", opt(reference))],
    );
    Spi::connect_mut(|c| {
        idempotent(c, &user, KeyScope::Service, key, fp, |c| grant(c, &user, pool, amount, ledger_type, description, reference, key))
    })
    .map(Ret::Json)
}

/// add_subscription_credits(p_user_id, p_amount, p_description, p_reference_id, p_idempotency_key)
fn add_subscription_credits(a: &Args) -> BResult<Ret> {
    add_credits_to(a, "add_subscription_credits", Pool::Subscription, "subscription_grant")
}
crate::billing_fn!(pg_finfo_pgb_add_subscription_credits, pgb_add_subscription_credits, add_subscription_credits);

/// add_purchased_credits(p_user_id, p_amount, p_description, p_reference_id, p_idempotency_key)
fn add_purchased_credits(a: &Args) -> BResult<Ret> {
    add_credits_to(a, "add_purchased_credits", Pool::Purchased, "purchase")
}
crate::billing_fn!(pg_finfo_pgb_add_purchased_credits, pgb_add_purchased_credits, add_purchased_credits);

/// refund_credits(p_user_id, p_amount, p_reason, p_reference_id, p_idempotency_key)
fn refund_credits(a: &Args) -> BResult<Ret> {
    security::require_service("refund_credits")?;
    let user = validate::required("p_user_id", a.uuid(0))?;
    let amount = validate::positive_amount("p_amount", a.int(1))?;
    let (d, r, k) = (a.text(2), a.text(3), a.text(4));
    let reason = validate::text("p_reason", d.as_deref())?;
    let reference = validate::key("p_reference_id", r.as_deref())?;
    let key = validate::key("p_idempotency_key", k.as_deref())?;
    let fp = idempotency::fingerprint(
        "refund_credits",
        &[("p_amount", json!(amount)), ("p_reason", opt(reason)), ("p_reference_id", opt(reference))],
    );
    Spi::connect_mut(|c| {
        idempotent(c, &user, KeyScope::Service, key, fp, |c| {
            // A refund goes back to an existing account (accounts are never deleted).
            balances(c, &user)?;
            grant(c, &user, Pool::Purchased, amount, "refund", reason, reference, key)
        })
    })
    .map(Ret::Json)
}
crate::billing_fn!(pg_finfo_pgb_refund_credits, pgb_refund_credits, refund_credits);

/// Subscription credits past their expiry (`subscription_credits_expire_at`, the period end a
/// renewal set) are gone even when no job expired them (SPEC 4): reads show 0, and the first
/// write that touches the account afterwards calls this, which logs the expiration (ledger row
/// and `billing.credit_expiration_events`) in the caller's transaction. Returns whether any
/// credits expired. Takes no lock when nothing is due.
pub fn settle(c: &mut SpiClient<'_>, user: &[u8; 16]) -> BResult<bool> {
    let t = spi::write(
        c,
        EXPIRE,
        &[UUID, TEXT, TEXT, BOOL],
        &[uuid_arg(user), Some("expired at period end").into(), None::<&str>.into(), true.into()],
    )?;
    if t.is_empty() {
        return Ok(false);
    }
    Ok(row(t)?.d1 != 0)
}

pub fn expire(c: &mut SpiClient<'_>, user: &[u8; 16], description: Option<&str>, key: Option<&str>) -> BResult<Value> {
    // Read first, without a lock: an empty subscription pool (the common case for a scheduled
    // job) is a no-op that answers from this one snapshot and never waits behind a user's open
    // transaction. Otherwise the UPDATE locks the row and expires what the newest version holds.
    let b = balances(c, user)?;
    let (op, expired, sub, pur) = if b.subscription == 0 {
        (Value::Null, 0, b.subscription, b.purchased)
    } else {
        let t = spi::write(c, EXPIRE, &[UUID, TEXT, TEXT, BOOL], &[uuid_arg(user), description.into(), key.into(), false.into()])?;
        if t.is_empty() {
            return Err(unknown_account(user));
        }
        let r = row(t)?;
        (if r.d1 != 0 { Value::String(r.op) } else { Value::Null }, -r.d1, r.sub, r.pur)
    };
    Ok(json!({
        "success": true,
        "transaction_id": op,
        "expired_amount": expired,
        "subscription_credits_balance": sub,
        "purchased_credits_balance": pur,
        "total_balance": sub.saturating_add(pur),
    }))
}

/// expire_subscription_credits(p_user_id, p_description, p_idempotency_key)
fn expire_subscription_credits(a: &Args) -> BResult<Ret> {
    security::require_service("expire_subscription_credits")?;
    let user = validate::required("p_user_id", a.uuid(0))?;
    let (d, k) = (a.text(1), a.text(2));
    let description = validate::text("p_description", d.as_deref())?;
    let key = validate::key("p_idempotency_key", k.as_deref())?;
    let fp = idempotency::fingerprint("expire_subscription_credits", &[("p_description", opt(description))]);
    Spi::connect_mut(|c| idempotent(c, &user, KeyScope::Service, key, fp, |c| expire(c, &user, description, key))).map(Ret::Json)
}
crate::billing_fn!(pg_finfo_pgb_expire_subscription_credits, pgb_expire_subscription_credits, expire_subscription_credits);

/// Expire, then grant `amount` as the new period's subscription credits, in one statement.
pub fn renew(
    c: &mut SpiClient<'_>,
    user: &[u8; 16],
    amount: i64,
    period_end: Option<pgrx::datum::TimestampWithTimeZone>,
    key: Option<&str>,
) -> BResult<Value> {
    let t = spi::write(c, RENEW, &[UUID, INT8, TIMESTAMPTZ, TEXT], &[uuid_arg(user), amount.into(), period_end.into(), key.into()])?;
    let r = row(t)?;
    Ok(json!({
        "success": true,
        "transaction_id": r.op,
        "expired_amount": -r.d1,
        "added": amount,
        "subscription_credits_balance": r.sub,
        "purchased_credits_balance": r.pur,
        "total_balance": r.sub.saturating_add(r.pur),
    }))
}

/// renew_subscription_credits(p_user_id, p_amount, p_period_end, p_idempotency_key)
fn renew_subscription_credits(a: &Args) -> BResult<Ret> {
    security::require_service("renew_subscription_credits")?;
    let user = validate::required("p_user_id", a.uuid(0))?;
    let amount = validate::positive_amount("p_amount", a.int(1))?;
    let period_end = a.timestamptz(2);
    // The instant, in a form independent of the session's TimeZone and DateStyle.
    let period_end_iso = a.timestamptz_micros(2).map(validate::iso_utc);
    let k = a.text(3);
    let key = validate::key("p_idempotency_key", k.as_deref())?;
    let fp = idempotency::fingerprint(
        "renew_subscription_credits",
        &[("p_amount", json!(amount)), ("p_period_end", opt(period_end_iso.as_deref()))],
    );
    Spi::connect_mut(|c| {
        idempotent(c, &user, KeyScope::Service, key, fp, |c| {
            let mut v = renew(c, &user, amount, period_end, key)?;
            v["period_end"] = opt(period_end_iso.as_deref());
            Ok(v)
        })
    })
    .map(Ret::Json)
}
crate::billing_fn!(pg_finfo_pgb_renew_subscription_credits, pgb_renew_subscription_credits, renew_subscription_credits);

/// clawback_credits_from_transaction(p_transaction_id, p_reason)
fn clawback_credits_from_transaction(a: &Args) -> BResult<Ret> {
    security::require_service("clawback_credits_from_transaction")?;
    let purchase = validate::required("p_transaction_id", a.uuid(0))?;
    let r = a.text(1);
    let reason = validate::text("p_reason", r.as_deref())?;
    Spi::connect_mut(|c| {
        let t = spi::write(c, FIND_PURCHASE, &[UUID], &[uuid_arg(&purchase)])?;
        if t.is_empty() {
            return Err(BillingError::NotFound {
                message: format!("no credit transaction has id {}", uuid_text(&purchase)),
                hint: Some("pass the transaction_id that add_purchased_credits returned".into()),
            });
        }
        let t = t.first();
        let user = col::<pgrx::Uuid>(&t, 1)?.map(|u| *u.as_bytes()).ok_or_else(|| BillingError::internal("ledger row without user"))?;
        let Some(amount) = col::<i64>(&t, 2)? else {
            return Err(BillingError::invalid_with_hint(
                format!("transaction {} is not a purchase", uuid_text(&purchase)),
                "only credits added by add_purchased_credits (type 'purchase') can be clawed back",
            ));
        };
        let claimed = spi::write(c, CLAIM_CLAWBACK, &[UUID, UUID], &[uuid_arg(&user), uuid_arg(&purchase)])?;
        if claimed.is_empty() {
            // Never twice for one purchase: replay the first clawback's result.
            let t = spi::write(c, LOAD_CLAWBACK, &[UUID, UUID], &[uuid_arg(&user), uuid_arg(&purchase)])?;
            let mut v = col::<pgrx::JsonB>(&t.first(), 1)?.map(|j| j.0).unwrap_or(Value::Null);
            v["already_clawed_back"] = json!(true);
            return Ok(v);
        }
        let reference = uuid_text(&purchase);
        settle(c, &user)?;
        let t = spi::write(c, CLAWBACK, &[UUID, INT8, TEXT, TEXT], &[uuid_arg(&user), amount.into(), reason.into(), reference.as_str().into()])?;
        let r = row(t)?;
        let taken = -r.d1;
        let v = json!({
            "success": true,
            "transaction_id": if taken != 0 { Value::String(r.op) } else { Value::Null },
            "original_transaction_id": reference,
            "user_id": uuid_text(&user),
            "clawed_back": taken,
            "shortfall": amount - taken,
            "subscription_credits_balance": r.sub,
            "purchased_credits_balance": r.pur,
            "total_balance": r.sub.saturating_add(r.pur),
            "already_clawed_back": false,
        });
        spi::write(c, STORE_CLAWBACK, &[UUID, UUID, JSONB], &[uuid_arg(&user), uuid_arg(&purchase), json_arg(&v)])?;
        Ok(v)
    })
    .map(Ret::Json)
}
crate::billing_fn!(pg_finfo_pgb_clawback_credits_from_transaction, pgb_clawback_credits_from_transaction, clawback_credits_from_transaction);

/// increment_credits_with_log(p_user_id, p_amount, p_transaction_type, p_description, p_reference_id)
fn increment_credits_with_log(a: &Args) -> BResult<Ret> {
    security::require_service("increment_credits_with_log")?;
    let user = validate::required("p_user_id", a.uuid(0))?;
    let amount = validate::positive_amount("p_amount", a.int(1))?;
    let ty = validate::required("p_transaction_type", a.text(2))?;
    validate::transaction_type("p_transaction_type", &ty)?;
    let (d, r) = (a.text(3), a.text(4));
    let description = validate::text("p_description", d.as_deref())?;
    let reference = validate::key("p_reference_id", r.as_deref())?;
    // A purchase by any spelling goes to the purchased pool and is logged as 'purchase'.
    let (pool, ty) = if validate::is_purchase_type(&ty) { (Pool::Purchased, "purchase".to_string()) } else { (Pool::Subscription, ty) };
    let v = Spi::connect_mut(|c| grant(c, &user, pool, amount, &ty, description, reference, None))?;
    legacy_total(&v)
}
crate::billing_fn!(pg_finfo_pgb_increment_credits_with_log, pgb_increment_credits_with_log, increment_credits_with_log);

/// decrement_credits_with_log(p_user_id, p_amount, p_transaction_type, p_description, p_reference_id)
fn decrement_credits_with_log(a: &Args) -> BResult<Ret> {
    let user = validate::required("p_user_id", a.uuid(0))?;
    security::authorize_user(&user)?;
    let amount = validate::positive_amount("p_amount", a.int(1))?;
    let ty = a.text(2).unwrap_or_else(|| "usage".to_string());
    validate::transaction_type("p_transaction_type", &ty)?;
    let (d, r) = (a.text(3), a.text(4));
    let description = validate::text("p_description", d.as_deref())?;
    let reference = validate::key("p_reference_id", r.as_deref())?;
    let v = Spi::connect_mut(|c| consume(c, &user, amount, &ty, description, reference, None))?;
    legacy_total(&v)
}
crate::billing_fn!(pg_finfo_pgb_decrement_credits_with_log, pgb_decrement_credits_with_log, decrement_credits_with_log);
