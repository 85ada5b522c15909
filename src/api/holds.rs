//! Credit holds (0.5.0; issue 14): reserve_credits, capture_hold, release_hold, extend_hold,
//! increase_hold, set_max_active_holds. The reads (get_active_holds) and cleanup_holds are SQL in
//! sql/holds.sql; the rules are `pg_billing_core::holds`.
//!
//! A hold is a row of `billing.credit_holds`, never a ledger row. The account keeps the sum of its
//! active holds (`accounts.held`) and `next_hold_expiry_at` (at or before the earliest expiry of
//! an active hold), both changed only under the account lock, by the statements here and by
//! `credits::SETTLE_HOLDS` (lazy expiry: the first write after a hold's expiry marks it expired).
//! Every debit takes at most the spendable credits less `held` from the grants (`credits::DEBIT`),
//! so the credits a hold reserves are there when it is captured. A hold row is written only by the
//! transaction holding its account's lock (step 2 of the lock order in `api/mod.rs`), so a hold
//! resolves at most once: capture, release and expiry each check its status under that lock.

use pg_billing_core::grants as g;
use pg_billing_core::holds::{self as h, Over};
use pg_billing_core::idempotency;
use pg_billing_core::BillingError;
use pgrx::datum::TimestampWithTimeZone;
use pgrx::spi::{Spi, SpiClient};
use serde_json::{json, Value};

use crate::api::credits::{self, KeyScope};
use crate::boundary::{Args, BResult, Ret};
use crate::security;
use crate::api::credits::TEXTARRAY;
use crate::spi::{self, col, uuid_arg, uuid_text, INT4, INT8, JSONB, TEXT, TIMESTAMPTZ, UUID};
use crate::validate;

/// The user a hold belongs to. $1 hold.
const FIND_HOLD: &str = "
SELECT h.user_id FROM billing.credit_holds AS h WHERE h.id = $1 ORDER BY h.user_id LIMIT 1";

/// The account's cap on active holds and, when there is one, how many are active (read after
/// the expired ones were settled). $1 user.
const HOLD_CAP: &str = "
SELECT a.max_active_holds,
       CASE WHEN a.max_active_holds IS NULL THEN 0
            ELSE (SELECT pg_catalog.count(*) FROM billing.credit_holds AS h
                   WHERE h.user_id = $1 AND h.status = 'active')::bigint END
  FROM billing.accounts AS a WHERE a.user_id = $1";

/// A new hold and the account's held sum, under the account lock. $1 user, $2 hold id,
/// $3 amount, $4 feature, $5 TTL in microseconds, $6 key, $7 the clock. Returns the held sum
/// after and the expiry. (Times come as parameters and leave raw: Citus refuses non-immutable
/// functions in a modification's RETURNING and volatile ones in its WHERE.)
const CREATE_HOLD: &str = "
WITH hold AS (
    INSERT INTO billing.credit_holds AS h (user_id, id, amount, feature, expires_at, status, idempotency_key, created_at)
    VALUES ($1, $2, $3, $4, $7 + $5::double precision * interval '1 microsecond', 'active', $6, $7)
 RETURNING h.expires_at
)
UPDATE billing.accounts AS a
   SET held = a.held + $3,
       next_hold_expiry_at = LEAST(a.next_hold_expiry_at, hold.expires_at),
       updated_at = pg_catalog.now()
  FROM hold
 WHERE a.user_id = $1
RETURNING a.held, hold.expires_at";
/// With Citus, [`CREATE_HOLD`] in two statements, one per table (Citus runs a statement that
/// writes two tables as an INSERT ... SELECT through the node it was sent from): the hold (same
/// parameters; returns its expiry), then [`HOLD_ACCOUNT`].
const HOLD_ROW: &str = "
INSERT INTO billing.credit_holds AS h (user_id, id, amount, feature, expires_at, status, idempotency_key, created_at)
VALUES ($1, $2, $3, $4, $7 + $5::double precision * interval '1 microsecond', 'active', $6, $7)
RETURNING h.expires_at";
/// $1 user, $2 amount, $3 the hold's expiry. Returns the held sum after.
const HOLD_ACCOUNT: &str = "
UPDATE billing.accounts AS a
   SET held = a.held + $2, next_hold_expiry_at = LEAST(a.next_hold_expiry_at, $3), updated_at = pg_catalog.now()
 WHERE a.user_id = $1
RETURNING a.held";

/// One hold, locked (its account is locked already). $1 user, $2 hold, $3 the capture grace in
/// microseconds.
const LOAD_HOLD: &str = "
SELECT h.amount, h.feature, h.status::text, h.resolution,
       h.expires_at + $3::double precision * interval '1 microsecond' <= pg_catalog.clock_timestamp(),
       h.expires_at <= pg_catalog.clock_timestamp(),
       (pg_catalog.extract('epoch', h.expires_at) * 1000000)::bigint - 946684800000000
  FROM billing.credit_holds AS h
 WHERE h.user_id = $1 AND h.id = $2
   FOR UPDATE";

/// Resolve a hold (captured or released), under the account lock. $1 user, $2 hold, $3 status,
/// $4 captured amount (NULL for a release), $5 the result a repeat replays, $6 the credits it
/// stops reserving (its amount when it was active; 0 when it had expired), $7 the clock. When no
/// active hold is left, next_hold_expiry_at becomes NULL (nothing to settle).
const RESOLVE: &str = "
WITH hold AS (
    UPDATE billing.credit_holds AS h
       SET status = $3::billing.hold_status, captured_amount = $4, resolved_at = $7, resolution = $5
     WHERE h.user_id = $1 AND h.id = $2
 RETURNING 1
)
UPDATE billing.accounts AS a
   SET held = a.held - $6,
       next_hold_expiry_at = CASE WHEN a.held = $6 THEN NULL ELSE a.next_hold_expiry_at END,
       updated_at = pg_catalog.now()
 WHERE a.user_id = $1 AND EXISTS (SELECT 1 FROM hold)
RETURNING a.held";

/// A later expiry for an active hold (never an earlier one). $1 user, $2 hold, $3 TTL in
/// microseconds from $4, the clock. next_hold_expiry_at stays: it may stay before the earliest
/// expiry.
const EXTEND: &str = "
UPDATE billing.credit_holds AS h
   SET expires_at = GREATEST(h.expires_at, $4 + $3::double precision * interval '1 microsecond')
 WHERE h.user_id = $1 AND h.id = $2
RETURNING h.expires_at";

/// More credits on an active hold. $1 user, $2 hold, $3 delta.
const INCREASE: &str = "
WITH hold AS (
    UPDATE billing.credit_holds AS h SET amount = h.amount + $3
     WHERE h.user_id = $1 AND h.id = $2
 RETURNING h.amount, h.expires_at AS exp
)
UPDATE billing.accounts AS a SET held = a.held + $3, updated_at = pg_catalog.now()
  FROM hold
 WHERE a.user_id = $1
RETURNING a.held, hold.amount, hold.exp";

/// The cap on active holds. $1 user, $2 cap (NULL: none). [`HOLD_CAP`] then reads it back.
const SET_MAX: &str = "
UPDATE billing.accounts AS a SET max_active_holds = $2, updated_at = pg_catalog.now() WHERE a.user_id = $1";

/// How many holds of the user are active. $1 user.
const ACTIVE_HOLDS: &str = "
SELECT pg_catalog.count(*) FROM billing.credit_holds AS h WHERE h.user_id = $1 AND h.status = 'active'";

/// A timestamp as PostgreSQL microseconds (since 2000-01-01 UTC), as validate::iso_utc takes it.
fn pg_micros(t: Option<TimestampWithTimeZone>) -> i64 {
    t.map(|t| t.into_inner()).unwrap_or(0)
}

fn opt(s: Option<&str>) -> Value {
    s.map(|s| Value::String(s.to_string())).unwrap_or(Value::Null)
}

fn grace_micros() -> i64 {
    i64::from(security::HOLD_CAPTURE_GRACE.get()) * 1_000_000
}

fn unknown_hold(hold: &[u8; 16]) -> BillingError {
    BillingError::NotFound {
        message: format!("no credit hold has id {}", uuid_text(hold)),
        hint: Some("pass the hold_id that reserve_credits returned (get_active_holds lists the active ones)".into()),
    }
}

fn find_hold(c: &mut SpiClient<'_>, hold: &[u8; 16]) -> BResult<[u8; 16]> {
    let t = spi::write(c, FIND_HOLD, &[UUID], &[uuid_arg(hold)])?;
    if t.is_empty() {
        return Err(unknown_hold(hold));
    }
    col::<pgrx::Uuid>(&t.first(), 1)?.map(|u| *u.as_bytes()).ok_or_else(|| BillingError::internal("hold without user"))
}

/// A hold as read under its account's lock.
struct Hold {
    amount: i64,
    feature: Option<String>,
    status: String,
    resolution: Option<Value>,
    /// Past its expiry plus the capture grace.
    past_grace: bool,
    /// Past its expiry.
    expired: bool,
    expires_micros: i64,
}

fn load(c: &mut SpiClient<'_>, user: &[u8; 16], hold: &[u8; 16]) -> BResult<Hold> {
    let t = spi::write(c, LOAD_HOLD, &[UUID, UUID, INT8], &[uuid_arg(user), uuid_arg(hold), grace_micros().into()])?;
    if t.is_empty() {
        return Err(unknown_hold(hold));
    }
    let t = t.first();
    Ok(Hold {
        amount: col::<i64>(&t, 1)?.unwrap_or(0),
        feature: col::<String>(&t, 2)?,
        status: col::<String>(&t, 3)?.unwrap_or_default(),
        resolution: col::<pgrx::JsonB>(&t, 4)?.map(|j| j.0),
        past_grace: col::<bool>(&t, 5)?.unwrap_or(false),
        expired: col::<bool>(&t, 6)?.unwrap_or(false),
        expires_micros: col::<i64>(&t, 7)?.unwrap_or(0),
    })
}

fn expired_error(hold: &[u8; 16], h: &Hold) -> BillingError {
    BillingError::HoldExpired {
        hold_id: uuid_text(hold),
        expired_at: validate::iso_utc(h.expires_micros),
        grace_seconds: i64::from(security::HOLD_CAPTURE_GRACE.get()),
    }
}

/// What a capture or release of a hold that is resolved already returns: the first result, with
/// already_resolved = true (an expired hold has none: its credits came back at the expiry).
fn replay(hold: &[u8; 16], user: &[u8; 16], h: &Hold) -> Value {
    let mut v = h.resolution.clone().unwrap_or_else(|| {
        json!({
            "success": true,
            "hold_id": uuid_text(hold),
            "user_id": uuid_text(user),
            "status": h.status,
            "captured": 0,
            "released": 0,
        })
    });
    v["already_resolved"] = json!(true);
    v
}

/// An active hold that has not expired, for extend_hold and increase_hold.
fn require_active(hold: &[u8; 16], h: &Hold) -> BResult<()> {
    match h.status.as_str() {
        "active" if !h.expired => Ok(()),
        "active" | "expired" => Err(expired_error(hold, h)),
        s => Err(BillingError::invalid_with_hint(
            format!("hold {} is already {s}", uuid_text(hold)),
            "only an active hold can be extended or increased; reserve_credits makes a new one",
        )),
    }
}

fn balances_json(v: &mut Value, b: &credits::Live, released: i64) {
    v["subscription_credits_balance"] = json!(b.sub);
    v["purchased_credits_balance"] = json!(b.pur);
    v["debt"] = json!(b.debt);
    v["total_balance"] = json!(b.total());
    // (Read before the hold's credits leave the held sum.)
    v["available"] = json!(b.available.saturating_add(released));
}

// ---------------------------------------------------------------------------------------------
// SQL functions
// ---------------------------------------------------------------------------------------------

/// reserve_credits(p_user_id, p_amount, p_ttl, p_feature, p_idempotency_key, p_allow_partial).
/// On a Citus cluster the hold is made on the worker that holds the user when it can
/// ([`reserve_on_shard`]).
fn reserve_credits(a: &Args) -> BResult<Ret> {
    let user = validate::required("p_user_id", a.uuid(0))?;
    let caller = security::authorize_user(&user)?;
    let amount = validate::positive_amount("p_amount", a.int(1))?;
    let (months, days, micros) = validate::required("p_ttl", a.interval(2))?;
    let ttl = h::ttl("p_ttl", months, days, micros)?;
    let f = a.text(3);
    let feature = reserve_feature(f.as_deref())?;
    let k = a.text(4);
    let key = validate::key("p_idempotency_key", k.as_deref())?;
    let partial = a.boolean(5).unwrap_or(false);
    let scope = KeyScope::of(&caller);
    if let Some(r) = crate::citus::delegated(|c| {
        let request = vec![feature.map(str::to_string), key.map(str::to_string), Some(scope.as_str().to_string()),
                           Some(partial.to_string())];
        spi::write(c, RESERVE_ON_SHARD, &[UUID, INT4, INT8, TEXTARRAY], &[uuid_arg(&user), (amount as i32).into(), ttl.into(), request.into()])
    })? {
        return Ok(Ret::Datum(r));
    }
    let fp = reserve_fingerprint(amount, ttl, feature, partial);
    Spi::connect_mut(|c| {
        credits::idempotent(c, &user, scope, key, fp, |c| {
            reserve(c, &user, amount, ttl, feature, key, partial, false)?
                .ok_or_else(|| BillingError::internal("a hold that cannot decline declined"))
        })
    })
    .map(Ret::Json)
}
crate::billing_fn!(pg_finfo_pgb_reserve_credits, pgb_reserve_credits, reserve_credits);

fn reserve_feature(f: Option<&str>) -> BResult<Option<&str>> {
    if let Some(f) = f {
        g::feature("p_feature", f)?;
    }
    Ok(f)
}

/// The request a reserve_credits key stands for.
fn reserve_fingerprint(amount: i64, ttl: i64, feature: Option<&str>, partial: bool) -> Value {
    idempotency::fingerprint(
        "reserve_credits",
        &[("p_amount", json!(amount)), ("p_ttl_us", json!(ttl)), ("p_feature", opt(feature)), ("p_allow_partial", json!(partial))],
    )
}

/// Make a hold of `amount` (or, `partial`, of what is free) for `ttl` microseconds, under the
/// account lock. `on_shard` (a Citus worker, [`reserve_on_shard`]): None, nothing changed, where
/// the lock finds an event could fire ([`credits::lock_quiet`]).
#[allow(clippy::too_many_arguments)]
fn reserve(
    c: &mut SpiClient<'_>,
    user: &[u8; 16],
    amount: i64,
    ttl: i64,
    feature: Option<&str>,
    key: Option<&str>,
    partial: bool,
    on_shard: bool,
) -> BResult<Option<Value>> {
    let l = if on_shard {
        match credits::lock_quiet(c, user)? {
            Some(l) => l,
            None => return Ok(None),
        }
    } else {
        credits::lock(c, user, false)?
    };
    let t = spi::write(c, HOLD_CAP, &[UUID], &[uuid_arg(user)])?;
    let t = t.first();
    if let Some(max) = col::<i32>(&t, 1)? {
        let active = col::<i64>(&t, 2)?.unwrap_or(0);
        if active >= i64::from(max) {
            return Err(BillingError::LimitExceeded {
                message: "the account has as many active holds as it may (max_active_holds)".into(),
                limit: i64::from(max),
                current: active,
            });
        }
    }
    let (sub, pur) = credits::spendable(c, user, feature)?;
    let free = sub.saturating_add(pur).saturating_sub(l.held);
    let Some(n) = h::reserve_amount(amount, free, partial) else {
        let (sub, pur) = credits::after_holds(sub, pur, l.held);
        return Err(BillingError::InsufficientCredits { needed: amount, subscription: sub, purchased: pur });
    };
    let id = credits::new_operation_id()?;
    let types = [UUID, UUID, INT8, TEXT, INT8, TEXT, TIMESTAMPTZ];
    let args = [uuid_arg(user), uuid_arg(&id), n.into(), feature.into(), ttl.into(), key.into(), spi::clock()?.into()];
    let expires = if on_shard || crate::citus::loaded() {
        let t = spi::write(c, HOLD_ROW, &types, &args)?;
        let expires = col::<TimestampWithTimeZone>(&t.first(), 1)?;
        if spi::write(c, HOLD_ACCOUNT, &[UUID, INT8, TIMESTAMPTZ], &[uuid_arg(user), n.into(), expires.into()])?.is_empty() {
            return Err(BillingError::internal("the account vanished under its lock"));
        }
        pg_micros(expires)
    } else {
        let t = spi::write(c, CREATE_HOLD, &types, &args)?;
        if t.is_empty() {
            return Err(BillingError::internal("the account vanished under its lock"));
        }
        pg_micros(col::<TimestampWithTimeZone>(&t.first(), 2)?)
    };
    Ok(Some(json!({
        "success": true,
        "hold_id": uuid_text(&id),
        "user_id": uuid_text(user),
        "held": n,
        "requested": amount,
        "feature": feature,
        "expires_at": validate::iso_utc(expires),
        "available": free.saturating_sub(n).saturating_sub(l.debt),
    })))
}

/// The delegated part of reserve_credits (0.10.0, issue 17): [`reserve_on_shard`].
const RESERVE_ON_SHARD: &str = "SELECT r FROM billing._reserve_on_shard($1, $2, $3, $4) AS r";

/// billing._reserve_on_shard(p_user_id, p_amount, p_ttl_us, p_request): on a Citus cluster,
/// Citus runs this on the worker that holds the user (force-delegated by billing.distribute(),
/// colocated with billing.accounts), after reserve_credits checked the caller on the
/// coordinator: the hold of [`reserve`] under the account lock, in one round trip. `p_ttl_us` is
/// the TTL in microseconds; `p_request` is `{feature, idempotency_key, key_scope,
/// allow_partial}` (`key_scope` 'user' or 'service', the caller's namespace on the coordinator;
/// `allow_partial` 'true' or 'false'). Declines (NULL, nothing changed) where an event could fire
/// (no account, a balance rule or a new account, a grant or hold due to settle) and where
/// reserve_credits fails (not enough credits, the cap on active holds, a key used for another
/// request): the coordinator then runs the call and raises the error itself (a custom SQLSTATE
/// raised here would reach the client as XX000). STRICT, no role is granted it (as
/// billing._consume_on_shard).
fn reserve_on_shard(a: &Args) -> BResult<Ret> {
    let user = validate::required("p_user_id", a.uuid(0))?;
    // Only the owner can call it; the check reserve_credits makes, in case a grant changes.
    security::authorize_user(&user)?;
    let amount = validate::positive_amount("p_amount", a.int(1))?;
    let ttl = h::ttl("p_ttl_us", 0, 0, validate::required("p_ttl_us", a.bigint(2))?)?;
    let request = validate::required("p_request", a.text_array(3))?;
    let [f, k, sc, p] = <[Option<String>; 4]>::try_from(request).map_err(|r| {
        BillingError::invalid_with_hint("p_request must have 4 elements", format!("it has {}", r.len()))
    })?;
    let feature = reserve_feature(f.as_deref())?;
    let key = validate::key("p_idempotency_key", k.as_deref())?;
    let scope = KeyScope::given(sc.as_deref(), key, "p_request[3]")?;
    let partial = match p.as_deref() {
        Some("true") => true,
        Some("false") => false,
        _ => return Err(BillingError::invalid("allow_partial (p_request[4]) must be 'true' or 'false'")),
    };
    let fp = reserve_fingerprint(amount, ttl, feature, partial);
    let r = Spi::connect_mut(|c| {
        credits::idempotent_unless_declined(c, &user, scope, key, fp, |c| reserve(c, &user, amount, ttl, feature, key, partial, true))
    });
    match r {
        Ok(r) => Ok(r.map_or(Ret::Null, |(v, _)| Ret::Json(v))),
        // Declined: nothing was written (these fail before the hold is made; the key, if any,
        // was forgotten again). The coordinator raises them with their SQLSTATE.
        Err(BillingError::IdempotencyConflict { .. } | BillingError::InsufficientCredits { .. } | BillingError::LimitExceeded { .. }) => {
            Ok(Ret::Null)
        }
        Err(e) => Err(e),
    }
}
crate::billing_fn!(pg_finfo_pgb_reserve_on_shard, pgb_reserve_on_shard, reserve_on_shard);

/// capture_hold(p_hold_id, p_amount, p_description, p_idempotency_key, p_over)
fn capture_hold(a: &Args) -> BResult<Ret> {
    security::require_service("capture_hold")?;
    let hold = validate::required("p_hold_id", a.uuid(0))?;
    let amount = i64::from(validate::required("p_amount", a.int(1))?);
    if amount < 0 {
        return Err(BillingError::invalid_with_hint("p_amount must not be negative", "pass what the job cost; 0 releases the whole hold"));
    }
    let (d, k) = (a.text(2), a.text(3));
    let description = validate::text("p_description", d.as_deref())?;
    let key = validate::key("p_idempotency_key", k.as_deref())?;
    let over = Over::parse("p_over", a.text(4).as_deref().unwrap_or("available"))?;
    let hold_text = uuid_text(&hold);
    let fp = idempotency::fingerprint(
        "capture_hold",
        &[("p_hold_id", json!(hold_text)), ("p_amount", json!(amount)), ("p_description", opt(description)), ("p_over", json!(over.as_str()))],
    );
    Spi::connect_mut(|c| {
        let user = find_hold(c, &hold)?;
        credits::idempotent(c, &user, KeyScope::Service, key, fp, |c| {
            let l = credits::lock(c, &user, false)?;
            let hr = load(c, &user, &hold)?;
            match hr.status.as_str() {
                "captured" | "released" => return Ok(replay(&hold, &user, &hr)),
                "expired" if hr.past_grace => return Err(expired_error(&hold, &hr)),
                "active" | "expired" => {}
                s => return Err(BillingError::internal(format!("hold status {s}"))),
            }
            // An active hold's credits are reserved for it; an expired one's (captured within
            // the grace) went back to the balance at its expiry and come from the free balance.
            let counted = if hr.status == "active" { hr.amount } else { 0 };
            let others = l.held.saturating_sub(counted);
            let feature = hr.feature.as_deref();
            let (sub, pur) = credits::spendable(c, &user, feature)?;
            let cap = sub.saturating_add(pur).saturating_sub(others);
            let headroom = if over == Over::Overdraft { l.headroom } else { 0 };
            let plan = h::plan_capture(amount, hr.amount, over, cap, headroom)?;
            let op = credits::new_operation_id()?;
            let d = if plan.debit > 0 {
                match credits::debit_locked(
                    c, &user, &op, plan.debit, feature, headroom, others, l.now, true, "hold_capture", description, Some(&hold_text), key,
                )? {
                    Some(d) => Some(d),
                    None => return Err(credits::insufficient(c, &user, plan.debit, feature, others)?),
                }
            } else {
                None
            };
            let b = credits::live(c, &user)?;
            let mut v = json!({
                "success": true,
                "hold_id": hold_text,
                "user_id": uuid_text(&user),
                "status": "captured",
                "requested": amount,
                "captured": plan.debit,
                "unfunded": plan.unfunded,
                "released": counted - amount.min(counted),
                "debt_added": d.as_ref().map(|d| d.short).unwrap_or(0),
                "grants": d.as_ref().and_then(|d| d.grants.clone()).unwrap_or_else(|| json!([])),
                "transaction_id": d.as_ref().map(|d| Value::String(uuid_text(&d.op))).unwrap_or(Value::Null),
            });
            balances_json(&mut v, &b, counted);
            v["already_resolved"] = json!(false);
            spi::write(
                c,
                RESOLVE,
                &[UUID, UUID, TEXT, INT8, JSONB, INT8, TIMESTAMPTZ],
                &[uuid_arg(&user), uuid_arg(&hold), "captured".into(), Some(plan.debit).into(), pgrx::JsonB(v.clone()).into(), counted.into(),
                  spi::clock()?.into()],
            )?;
            Ok(v)
        })
    })
    .map(Ret::Json)
}
crate::billing_fn!(pg_finfo_pgb_capture_hold, pgb_capture_hold, capture_hold);

/// release_hold(p_hold_id, p_idempotency_key)
fn release_hold(a: &Args) -> BResult<Ret> {
    security::require_service("release_hold")?;
    let hold = validate::required("p_hold_id", a.uuid(0))?;
    let k = a.text(1);
    let key = validate::key("p_idempotency_key", k.as_deref())?;
    let hold_text = uuid_text(&hold);
    let fp = idempotency::fingerprint("release_hold", &[("p_hold_id", json!(hold_text))]);
    Spi::connect_mut(|c| {
        let user = find_hold(c, &hold)?;
        credits::idempotent(c, &user, KeyScope::Service, key, fp, |c| {
            credits::lock(c, &user, false)?;
            let hr = load(c, &user, &hold)?;
            // An expired hold is final once the capture grace has passed; within it a capture
            // could still resolve it, so a release resolves it first (releasing 0: its credits
            // came back at the expiry) and a later capture returns this release.
            let counted = match hr.status.as_str() {
                "active" => hr.amount,
                "expired" if !hr.past_grace => 0,
                _ => return Ok(replay(&hold, &user, &hr)),
            };
            let b = credits::live(c, &user)?;
            let mut v = json!({
                "success": true,
                "hold_id": hold_text,
                "user_id": uuid_text(&user),
                "status": "released",
                "captured": 0,
                "released": counted,
            });
            balances_json(&mut v, &b, counted);
            v["already_resolved"] = json!(false);
            spi::write(
                c,
                RESOLVE,
                &[UUID, UUID, TEXT, INT8, JSONB, INT8, TIMESTAMPTZ],
                &[uuid_arg(&user), uuid_arg(&hold), "released".into(), None::<i64>.into(), pgrx::JsonB(v.clone()).into(), counted.into(),
                  spi::clock()?.into()],
            )?;
            Ok(v)
        })
    })
    .map(Ret::Json)
}
crate::billing_fn!(pg_finfo_pgb_release_hold, pgb_release_hold, release_hold);

/// extend_hold(p_hold_id, p_ttl)
fn extend_hold(a: &Args) -> BResult<Ret> {
    security::require_service("extend_hold")?;
    let hold = validate::required("p_hold_id", a.uuid(0))?;
    let (months, days, micros) = validate::required("p_ttl", a.interval(1))?;
    let ttl = h::ttl("p_ttl", months, days, micros)?;
    Spi::connect_mut(|c| {
        let user = find_hold(c, &hold)?;
        credits::lock(c, &user, false)?;
        let hr = load(c, &user, &hold)?;
        require_active(&hold, &hr)?;
        let t = spi::write(c, EXTEND, &[UUID, UUID, INT8, TIMESTAMPTZ], &[uuid_arg(&user), uuid_arg(&hold), ttl.into(), spi::clock()?.into()])?;
        let expires = pg_micros(col::<TimestampWithTimeZone>(&t.first(), 1)?);
        Ok(json!({
            "success": true,
            "hold_id": uuid_text(&hold),
            "user_id": uuid_text(&user),
            "held": hr.amount,
            "expires_at": validate::iso_utc(expires),
        }))
    })
    .map(Ret::Json)
}
crate::billing_fn!(pg_finfo_pgb_extend_hold, pgb_extend_hold, extend_hold);

/// increase_hold(p_hold_id, p_delta, p_idempotency_key)
fn increase_hold(a: &Args) -> BResult<Ret> {
    security::require_service("increase_hold")?;
    let hold = validate::required("p_hold_id", a.uuid(0))?;
    let delta = validate::positive_amount("p_delta", a.int(1))?;
    let k = a.text(2);
    let key = validate::key("p_idempotency_key", k.as_deref())?;
    let hold_text = uuid_text(&hold);
    let fp = idempotency::fingerprint("increase_hold", &[("p_hold_id", json!(hold_text)), ("p_delta", json!(delta))]);
    Spi::connect_mut(|c| {
        let user = find_hold(c, &hold)?;
        credits::idempotent(c, &user, KeyScope::Service, key, fp, |c| {
            let l = credits::lock(c, &user, false)?;
            let hr = load(c, &user, &hold)?;
            require_active(&hold, &hr)?;
            let feature = hr.feature.as_deref();
            let (sub, pur) = credits::spendable(c, &user, feature)?;
            let free = sub.saturating_add(pur).saturating_sub(l.held);
            if free < delta {
                let (sub, pur) = credits::after_holds(sub, pur, l.held);
                return Err(BillingError::InsufficientCredits { needed: delta, subscription: sub, purchased: pur });
            }
            let t = spi::write(c, INCREASE, &[UUID, UUID, INT8], &[uuid_arg(&user), uuid_arg(&hold), delta.into()])?;
            let t = t.first();
            Ok(json!({
                "success": true,
                "hold_id": hold_text,
                "user_id": uuid_text(&user),
                "added": delta,
                "held": col::<i64>(&t, 2)?.unwrap_or(0),
                "expires_at": validate::iso_utc(pg_micros(col::<TimestampWithTimeZone>(&t, 3)?)),
                "available": free.saturating_sub(delta).saturating_sub(l.debt),
            }))
        })
    })
    .map(Ret::Json)
}
crate::billing_fn!(pg_finfo_pgb_increase_hold, pgb_increase_hold, increase_hold);

/// set_max_active_holds(p_user_id, p_max)
fn set_max_active_holds(a: &Args) -> BResult<Ret> {
    security::require_service("set_max_active_holds")?;
    let user = validate::required("p_user_id", a.uuid(0))?;
    let max = a.int(1);
    if max.is_some_and(|m| m < 0) {
        return Err(BillingError::invalid_with_hint(
            "p_max must not be negative",
            "NULL allows any number of active holds; 0 allows none",
        ));
    }
    Spi::connect_mut(|c| {
        credits::lock(c, &user, true)?;
        spi::write(c, SET_MAX, &[UUID, INT4], &[uuid_arg(&user), max.into()])?;
        let t = spi::write(c, ACTIVE_HOLDS, &[UUID], &[uuid_arg(&user)])?;
        Ok(json!({
            "success": true,
            "user_id": uuid_text(&user),
            "max_active_holds": max,
            "active_holds": col::<i64>(&t.first(), 1)?.unwrap_or(0),
        }))
    })
    .map(Ret::Json)
}
crate::billing_fn!(pg_finfo_pgb_set_max_active_holds, pgb_set_max_active_holds, set_max_active_holds);
