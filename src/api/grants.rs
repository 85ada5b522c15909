//! Credit grants (0.4.0): grant_credits, void_grant, set_overdraft_limit. Spending is
//! `credits::debit`; the reads (get_credit_grants, balance_at) are SQL in sql/grants.sql.

use pg_billing_core::grants::{self as g, Category};
use pg_billing_core::idempotency;
use pg_billing_core::BillingError;
use pgrx::spi::Spi;
use serde_json::{json, Value};

use crate::api::credits::{self, Expiry, KeyScope, NewGrant};
use crate::boundary::{Args, BResult, Ret};
use crate::security;
use crate::spi::{self, col, uuid_arg, uuid_text, INT8, UUID};
use crate::validate;

/// The grant void_grant names: its user, and when and how much it was voided. $1 grant.
const FIND_GRANT: &str = "
SELECT g.user_id, g.voided_at IS NOT NULL, g.voided_amount
  FROM billing.credit_grants AS g WHERE g.id = $1
 ORDER BY g.user_id LIMIT 1";

/// Set the overdraft limit, under the account lock. $1 user, $2 limit.
const SET_OVERDRAFT: &str = "
UPDATE billing.accounts AS a SET overdraft_limit = $2, updated_at = pg_catalog.now()
 WHERE a.user_id = $1
RETURNING a.overdraft_limit, a.debt";

fn iso(micros: Option<i64>) -> Value {
    micros.map(|m| Value::String(validate::iso_utc(m))).unwrap_or(Value::Null)
}

fn balances_json(v: &mut Value, b: &credits::Live) {
    v["subscription_credits_balance"] = json!(b.sub);
    v["purchased_credits_balance"] = json!(b.pur);
    v["debt"] = json!(b.debt);
    v["total_balance"] = json!(b.total());
    v["available"] = json!(b.available);
}

/// grant_credits(p_user_id, p_amount, p_category, p_priority, p_effective_at, p_expires_at,
///               p_scope, p_description, p_reference_id, p_idempotency_key)
fn grant_credits(a: &Args) -> BResult<Ret> {
    security::require_service("grant_credits")?;
    let user = validate::required("p_user_id", a.uuid(0))?;
    let amount = validate::positive_amount("p_amount", a.int(1))?;
    let category = Category::parse("p_category", &validate::required("p_category", a.text(2))?)?;
    let priority = g::priority("p_priority", a.int(3), category)?;
    let effective_micros = a.timestamptz_micros(4);
    let expires_micros = a.timestamptz_micros(5);
    validate::sane_timestamp("p_effective_at", effective_micros)?;
    validate::sane_timestamp("p_expires_at", expires_micros)?;
    // SAFETY: GetCurrentTransactionStartTimestamp only reads the transaction's start time (now()).
    let now = unsafe { pgrx::pg_sys::GetCurrentTransactionStartTimestamp() };
    let effective = effective_micros.unwrap_or(now);
    // (Against an explicit start only: the default start, now(), is another instant in a retry,
    // which must replay; against now, below, once the key is known to be new.)
    let explicit_start = effective_micros.is_some_and(|e| e != now);
    if explicit_start && expires_micros.is_some_and(|e| e <= effective) {
        return Err(BillingError::invalid_with_hint(
            "p_expires_at must be later than p_effective_at and than now",
            "pass NULL for credits that never expire",
        ));
    }
    // The request as a retry sees it: p_effective_at defaults to now(), which is another instant
    // in a retry's transaction, so "starts when made" is recorded as such, not as the instant.
    let effective_fp = if effective_micros.is_none_or(|e| e == now) { Value::Null } else { iso(effective_micros) };
    let scope = g::scope("p_scope", a.text_array(6))?;
    let (d, r, k) = (a.text(7), a.text(8), a.text(9));
    let description = validate::text("p_description", d.as_deref())?;
    let reference = validate::key("p_reference_id", r.as_deref())?;
    let key = validate::key("p_idempotency_key", k.as_deref())?;
    let fp = idempotency::fingerprint(
        "grant_credits",
        &[
            ("p_amount", json!(amount)),
            ("p_category", json!(category.as_str())),
            ("p_priority", json!(priority)),
            ("p_effective_at", effective_fp),
            ("p_expires_at", iso(expires_micros)),
            ("p_scope", json!(scope)),
            ("p_description", json!(description)),
            ("p_reference_id", json!(reference)),
        ],
    );
    Spi::connect_mut(|c| {
        credits::idempotent(c, &user, KeyScope::Service, key, fp, |c| {
            // Checked once the key is known to be new: a retry after the expiry replays.
            if expires_micros.is_some_and(|e| e <= now) {
                return Err(BillingError::invalid_with_hint(
                    "p_expires_at must be later than p_effective_at and than now",
                    "pass NULL for credits that never expire",
                ));
            }
            let n = NewGrant {
                category,
                amount,
                priority,
                effective_at: a.timestamptz(4),
                effective_now: effective <= now,
                expiry: Expiry::At(a.timestamptz(5)),
                scope: scope.clone(),
                ledger_type: "grant",
                description,
                reference,
                key,
            };
            let created = credits::create(c, &user, &n)?;
            let b = credits::live(c, &user)?;
            let mut v = json!({
                "success": true,
                "grant_id": uuid_text(&created.grant_id),
                "transaction_id": uuid_text(&created.op),
                "category": category.as_str(),
                "amount": amount,
                "priority": priority,
                "effective_at": validate::iso_utc(effective),
                "expires_at": iso(expires_micros),
                "scope": scope,
                "debt_repaid": created.repaid,
            });
            balances_json(&mut v, &b);
            Ok(v)
        })
    })
    .map(Ret::Json)
}
crate::billing_fn!(pg_finfo_pgb_grant_credits, pgb_grant_credits, grant_credits);

/// void_grant(p_grant_id, p_reason, p_idempotency_key)
fn void_grant(a: &Args) -> BResult<Ret> {
    security::require_service("void_grant")?;
    let grant = validate::required("p_grant_id", a.uuid(0))?;
    let (r, k) = (a.text(1), a.text(2));
    let reason = validate::text("p_reason", r.as_deref())?;
    let key = validate::key("p_idempotency_key", k.as_deref())?;
    Spi::connect_mut(|c| {
        let t = spi::write(c, FIND_GRANT, &[UUID], &[uuid_arg(&grant)])?;
        if t.is_empty() {
            return Err(BillingError::NotFound {
                message: format!("no credit grant has id {}", uuid_text(&grant)),
                hint: Some("pass the grant_id that grant_credits returned (get_credit_grants lists them)".into()),
            });
        }
        let user = col::<pgrx::Uuid>(&t.first(), 1)?.map(|u| *u.as_bytes()).ok_or_else(|| BillingError::internal("grant without user"))?;
        let fp = idempotency::fingerprint("void_grant", &[("p_grant_id", json!(uuid_text(&grant))), ("p_reason", json!(reason))]);
        credits::idempotent(c, &user, KeyScope::Service, key, fp, |c| {
            credits::lock(c, &user, false)?;
            let op = credits::new_operation_id()?;
            let voided = credits::void_locked(c, &user, &grant, &op, reason, "void", key, None)?;
            let (amount, already, tx) = match voided {
                Some((n, _)) => (n, false, if n > 0 { Value::String(uuid_text(&op)) } else { Value::Null }),
                None => {
                    // Void already (perhaps by a call we waited for): report the first void.
                    let t = spi::write(c, FIND_GRANT, &[UUID], &[uuid_arg(&grant)])?;
                    (col::<i64>(&t.first(), 3)?.unwrap_or(0), true, Value::Null)
                }
            };
            let b = credits::live(c, &user)?;
            let mut v = json!({
                "success": true,
                "grant_id": uuid_text(&grant),
                "user_id": uuid_text(&user),
                "voided_amount": amount,
                "already_voided": already,
                "transaction_id": tx,
            });
            balances_json(&mut v, &b);
            Ok(v)
        })
    })
    .map(Ret::Json)
}
crate::billing_fn!(pg_finfo_pgb_void_grant, pgb_void_grant, void_grant);

/// set_overdraft_limit(p_user_id, p_limit)
fn set_overdraft_limit(a: &Args) -> BResult<Ret> {
    security::require_service("set_overdraft_limit")?;
    let user = validate::required("p_user_id", a.uuid(0))?;
    let limit = validate::required("p_limit", a.int(1))?;
    if limit < 0 {
        return Err(BillingError::invalid_with_hint(
            "p_limit must not be negative",
            "0 allows no overdraft; a limit L lets a debit take the balance down to -L",
        ));
    }
    Spi::connect_mut(|c| {
        credits::lock(c, &user, true)?;
        let t = spi::write(c, SET_OVERDRAFT, &[UUID, INT8], &[uuid_arg(&user), (limit as i64).into()])?;
        let t = t.first();
        Ok(json!({
            "success": true,
            "user_id": uuid_text(&user),
            "overdraft_limit": col::<i64>(&t, 1)?.unwrap_or(0),
            "debt": col::<i64>(&t, 2)?.unwrap_or(0),
        }))
    })
    .map(Ret::Json)
}
crate::billing_fn!(pg_finfo_pgb_set_overdraft_limit, pgb_set_overdraft_limit, set_overdraft_limit);
