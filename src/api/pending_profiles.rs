//! Pending profiles (SPEC 9, S3): purchases made before the buyer had an account, keyed by
//! e-mail, claimed after sign-up; the sign-up trigger's account creation; and the legacy
//! single-pool import (SPEC 4, `billing.migrate_single_pool`).
//!
//! Applying a profile to an account goes through the credits core (`credits::renew`: the
//! profile's credits become the period's subscription credits, the ledger holds) and writes the
//! account's plan and billing cycle to `billing.subscriptions`. Lock order: the profile row,
//! then the account row, then the subscription row.

use pg_billing_core::identity::Caller;
use pg_billing_core::members as m;
use pg_billing_core::BillingError;
use pgrx::datum::TimestampWithTimeZone;
use pgrx::spi::{Spi, SpiClient};
use serde_json::{json, Value};

use crate::api::credits::{self, Pool};
use crate::api::members::{claim_event, plan, set_account_email, store_event};
use crate::boundary::{Args, BResult, Ret};
use crate::security;
use crate::spi::{self, col, uuid_arg, uuid_text, OrInternal, BOOL, INT8, TEXT, TIMESTAMPTZ, UUID};

const OID: pgrx::pg_sys::PgOid = pgrx::pg_sys::PgOid::BuiltIn(pgrx::pg_sys::BuiltinOid::OIDOID);
use crate::validate;

// ---------------------------------------------------------------------------------------------
// Statements
// ---------------------------------------------------------------------------------------------

/// The account that has this e-mail (the oldest when several do). $1 lower-cased e-mail.
const ACCOUNT_BY_EMAIL: &str = "
SELECT a.user_id FROM billing.accounts AS a
 WHERE pg_catalog.lower(a.email) = $1
 ORDER BY a.created_at, a.user_id LIMIT 1";

/// Record a purchase for an e-mail. $1 e-mail, $2 token, $3 plan, $4 provider, $5 provider user,
/// $6 provider membership, $7 duration, $8 cycle start, $9 cycle end, $10 credits, $11 the
/// account it is applied to now (NULL: pending), $12 the duration as an interval. Durations are
/// added in UTC (a year from Feb 29 is Feb 28, 30 days are 720 hours) whatever the session's
/// TimeZone: `timestamptz + interval` would step days and months in the session's zone.
const UPSERT_PROFILE: &str = "
INSERT INTO billing.pending_profiles AS p
       (email, token, plan_id, provider, provider_user_id, provider_membership_id, plan_duration,
        billing_cycle_start, billing_cycle_end, next_credit_renewal, credits, used_credits,
        claimed, claimed_by_user_id, claimed_at)
SELECT $1, $2, $3, $4, $5, $6, $7, s.cycle_start, s.cycle_end,
       LEAST(s.cycle_end, ((s.cycle_start AT TIME ZONE 'UTC') + '30 days'::interval) AT TIME ZONE 'UTC'), $10, 0,
       $11::uuid IS NOT NULL, $11, CASE WHEN $11::uuid IS NOT NULL THEN pg_catalog.now() END
  FROM (SELECT COALESCE($8, pg_catalog.now()) AS cycle_start,
               COALESCE($9, ((COALESCE($8, pg_catalog.now()) AT TIME ZONE 'UTC') + $12::interval) AT TIME ZONE 'UTC')
                   AS cycle_end) AS s
ON CONFLICT (email) DO UPDATE
   SET token                  = EXCLUDED.token,
       plan_id                = EXCLUDED.plan_id,
       provider               = EXCLUDED.provider,
       provider_user_id       = EXCLUDED.provider_user_id,
       provider_membership_id = EXCLUDED.provider_membership_id,
       plan_duration          = EXCLUDED.plan_duration,
       billing_cycle_start    = EXCLUDED.billing_cycle_start,
       billing_cycle_end      = EXCLUDED.billing_cycle_end,
       next_credit_renewal    = EXCLUDED.next_credit_renewal,
       credits                = EXCLUDED.credits,
       used_credits           = 0,
       claimed                = p.claimed OR EXCLUDED.claimed,
       claimed_by_user_id     = COALESCE(p.claimed_by_user_id, EXCLUDED.claimed_by_user_id),
       claimed_at             = COALESCE(p.claimed_at, EXCLUDED.claimed_at),
       updated_at             = pg_catalog.now()
RETURNING p.id, p.claimed_by_user_id";

/// Claim an unclaimed profile. $1 e-mail, $2 user, $3 token, $4 check the token.
const CLAIM: &str = "
UPDATE billing.pending_profiles AS p
   SET claimed = true, claimed_by_user_id = $2, claimed_at = pg_catalog.now(), updated_at = pg_catalog.now()
 WHERE p.email = $1 AND NOT p.claimed
   AND (NOT $4 OR p.token IS NULL OR p.token = $3)
RETURNING p.id, p.plan_id, GREATEST(p.credits - p.used_credits, 0)::bigint,
          p.billing_cycle_start, p.billing_cycle_end, p.next_credit_renewal,
          p.provider, p.provider_membership_id";

/// The profile of an e-mail as it is now, to say why a claim did not happen. $1 e-mail, $2 token.
const INSPECT: &str = "
SELECT p.claimed, p.claimed_by_user_id, (p.token IS NULL OR p.token = $2), p.id
  FROM billing.pending_profiles AS p WHERE p.email = $1";

/// Read a (just upserted, claimed) profile for applying it. $1 e-mail.
const PROFILE: &str = "
SELECT p.id, p.plan_id, GREATEST(p.credits - p.used_credits, 0)::bigint,
       p.billing_cycle_start, p.billing_cycle_end, p.next_credit_renewal,
       p.provider, p.provider_membership_id
  FROM billing.pending_profiles AS p WHERE p.email = $1";

const ACCOUNT_EXISTS: &str = "SELECT 1 FROM billing.accounts AS a WHERE a.user_id = $1";

/// The account's plan and billing cycle. $1 user, $2 plan, $3 provider, $4 provider membership,
/// $5 cycle start, $6 cycle end.
const SUBSCRIBE: &str = "
INSERT INTO billing.subscriptions AS s
       (user_id, plan_id, status, provider, provider_subscription_id, current_period_start, current_period_end)
VALUES ($1, $2, 'active', $3, $4, $5, $6)
ON CONFLICT (user_id) DO UPDATE
   SET plan_id                  = EXCLUDED.plan_id,
       status                   = 'active',
       provider                 = COALESCE(EXCLUDED.provider, s.provider),
       provider_subscription_id = COALESCE(EXCLUDED.provider_subscription_id, s.provider_subscription_id),
       current_period_start     = EXCLUDED.current_period_start,
       current_period_end       = EXCLUDED.current_period_end,
       trial_ends_at            = NULL,
       cancel_at_period_end     = false,
       expires_at               = NULL,
       updated_at               = pg_catalog.now()";

const DELETE_PROFILE: &str = "DELETE FROM billing.pending_profiles AS p WHERE p.id = $1 RETURNING 1";

/// Create a new user's account. $1 user, $2 e-mail.
const NEW_ACCOUNT: &str = "
INSERT INTO billing.accounts (user_id, email) VALUES ($1, $2)
ON CONFLICT (user_id) DO NOTHING RETURNING 1";

const FREE_CREDITS: &str = "SELECT p.monthly_credits::bigint FROM billing.plans AS p WHERE p.plan_id = 'free'";

// ---------------------------------------------------------------------------------------------
// Applying a profile to an account
// ---------------------------------------------------------------------------------------------

/// What an account receives from a profile.
struct Profile {
    id: [u8; 16],
    plan_id: String,
    credits: i64,
    cycle_start: Option<TimestampWithTimeZone>,
    cycle_end: Option<TimestampWithTimeZone>,
    next_renewal: Option<TimestampWithTimeZone>,
    provider: Option<String>,
    membership: Option<String>,
}

fn profile_row(t: &pgrx::spi::SpiTupleTable<'_>) -> BResult<Profile> {
    Ok(Profile {
        id: col::<pgrx::Uuid>(t, 1)?.map(|u| *u.as_bytes()).ok_or_else(|| BillingError::internal("profile without id"))?,
        plan_id: col::<String>(t, 2)?.unwrap_or_else(|| "free".into()),
        credits: col::<i64>(t, 3)?.unwrap_or(0),
        cycle_start: col::<TimestampWithTimeZone>(t, 4)?,
        cycle_end: col::<TimestampWithTimeZone>(t, 5)?,
        next_renewal: col::<TimestampWithTimeZone>(t, 6)?,
        provider: col::<String>(t, 7)?,
        membership: col::<String>(t, 8)?,
    })
}

/// Give `user` the profile's plan, credits (as this period's subscription credits, replacing the
/// subscription pool; purchased credits stay) and billing cycle, and `email` when given. Creates
/// the account when missing. Returns whether the account existed (a merge) before.
fn apply(c: &mut SpiClient<'_>, user: &[u8; 16], email: Option<&str>, p: &Profile) -> BResult<bool> {
    let existed = !spi::write(c, ACCOUNT_EXISTS, &[UUID], &[uuid_arg(user)])?.is_empty();
    credits::renew(c, user, p.credits, p.next_renewal.or(p.cycle_end), None)?;
    if let Some(email) = email {
        set_account_email(c, user, email)?;
    }
    spi::write(
        c,
        SUBSCRIBE,
        &[UUID, TEXT, TEXT, TEXT, TIMESTAMPTZ, TIMESTAMPTZ],
        &[
            uuid_arg(user),
            p.plan_id.as_str().into(),
            p.provider.as_deref().into(),
            p.membership.as_deref().into(),
            p.cycle_start.into(),
            p.cycle_end.into(),
        ],
    )?;
    Ok(existed)
}

/// Claim the profile of `email` for `user`: every outcome of SPEC 9 as `{success, error, ...}`.
/// Two concurrent claims: the second waits on the row lock of the first's UPDATE, re-checks
/// `NOT claimed` on the committed row and reports it claimed (by another account or by itself).
fn claim(c: &mut SpiClient<'_>, user: &[u8; 16], email: &str, token: Option<&str>, check_token: bool) -> BResult<Value> {
    for _ in 0..3 {
        let t = spi::write(c, CLAIM, &[TEXT, UUID, TEXT, BOOL], &[email.into(), uuid_arg(user), token.into(), check_token.into()])?;
        if !t.is_empty() {
            let p = profile_row(&t.first())?;
            let existed = apply(c, user, Some(email), &p)?;
            return Ok(json!({
                "success": true,
                "error": null,
                "profile_id": uuid_text(&p.id),
                "user_id": uuid_text(user),
                "plan": p.plan_id,
                "credits_granted": p.credits,
                "merged": existed,
                "account_created": !existed,
                "already_claimed": false,
            }));
        }
        let t = spi::write(c, INSPECT, &[TEXT, TEXT], &[email.into(), token.into()])?;
        if t.is_empty() {
            return Ok(failure("no pending profile exists for this e-mail address"));
        }
        let t = t.first();
        let claimed = col::<bool>(&t, 1)?.unwrap_or(false);
        let by = col::<pgrx::Uuid>(&t, 2)?.map(|u| *u.as_bytes());
        let token_ok = col::<bool>(&t, 3)?.unwrap_or(false);
        if claimed && by.as_ref() == Some(user) {
            let id = col::<pgrx::Uuid>(&t, 4)?.map(|u| uuid_text(u.as_bytes()));
            return Ok(json!({
                "success": true,
                "error": null,
                "profile_id": id,
                "user_id": uuid_text(user),
                "already_claimed": true,
            }));
        }
        if claimed {
            return Ok(failure("this pending profile was already claimed by another account"));
        }
        if check_token && !token_ok {
            return Ok(failure("the token does not match this pending profile"));
        }
        // Unclaimed and the token fits: a concurrent claim rolled back in between; try again.
    }
    Err(BillingError::internal("the pending profile kept changing while it was claimed"))
}

fn failure(error: &str) -> Value {
    json!({ "success": false, "error": error })
}

// ---------------------------------------------------------------------------------------------
// SQL functions
// ---------------------------------------------------------------------------------------------

/// upsert_pending_profile(p_email, p_token, p_plan_id, p_provider, p_provider_user_id,
/// p_provider_membership_id, p_plan_duration, p_billing_cycle_start, p_billing_cycle_end,
/// p_credits, p_event_id)
fn upsert_pending_profile(a: &Args) -> BResult<Ret> {
    security::require_service("upsert_pending_profile")?;
    let e = a.text(0);
    let email = m::normalize_email("p_email", e.as_deref())?;
    let (tok, prov, prov_user, prov_member) = (a.text(1), a.text(3), a.text(4), a.text(5));
    let token = validate::key("p_token", tok.as_deref())?;
    let plan_id = a.text(2).unwrap_or_else(|| "pro".into());
    let provider = validate::key("p_provider", prov.as_deref())?;
    let provider_user = validate::key("p_provider_user_id", prov_user.as_deref())?;
    let membership = validate::key("p_provider_membership_id", prov_member.as_deref())?;
    let duration_arg = a.text(6).unwrap_or_else(|| "monthly".into());
    let duration = m::canonical_plan_duration(&duration_arg)?;
    let interval = m::plan_duration_interval(duration)?;
    validate::sane_timestamp("p_billing_cycle_start", a.timestamptz_micros(7))?;
    validate::sane_timestamp("p_billing_cycle_end", a.timestamptz_micros(8))?;
    let (start, end) = (a.timestamptz(7), a.timestamptz(8));
    if let (Some(s), Some(e)) = (start, end) {
        if e.into_inner() < s.into_inner() {
            return Err(BillingError::invalid("p_billing_cycle_end must not be before p_billing_cycle_start"));
        }
    }
    let credits_arg = a.int(9);
    if let Some(n) = credits_arg {
        if n < 0 {
            return Err(BillingError::invalid_with_hint("p_credits must not be negative", format!("p_credits was {n}")));
        }
    }
    let ev = a.text(10);
    let event_id = validate::key("p_event_id", ev.as_deref())?;
    Spi::connect_mut(|c| {
        let (monthly, _) = plan(c, &plan_id)?;
        if let Some(replay) = claim_event(c, event_id, "upsert_pending_profile", None)? {
            return Ok(replay);
        }
        let credits_n = credits_arg.map(i64::from).unwrap_or(monthly);
        let t = spi::write(c, ACCOUNT_BY_EMAIL, &[TEXT], &[email.as_str().into()])?;
        let account = if t.is_empty() { None } else { col::<pgrx::Uuid>(&t.first(), 1)?.map(|u| *u.as_bytes()) };
        let account_arg = match &account {
            Some(u) => uuid_arg(u),
            None => pgrx::datum::DatumWithOid::null::<pgrx::Uuid>(),
        };
        let t = spi::write(
            c,
            UPSERT_PROFILE,
            &[TEXT, TEXT, TEXT, TEXT, TEXT, TEXT, TEXT, TIMESTAMPTZ, TIMESTAMPTZ, INT8, UUID, TEXT],
            &[
                email.as_str().into(),
                token.into(),
                plan_id.as_str().into(),
                provider.into(),
                provider_user.into(),
                membership.into(),
                duration.into(),
                start.into(),
                end.into(),
                credits_n.into(),
                account_arg,
                interval.into(),
            ],
        )?;
        let t = t.first();
        let id = col::<pgrx::Uuid>(&t, 1)?.map(|u| uuid_text(u.as_bytes()));
        let claimed_by = col::<pgrx::Uuid>(&t, 2)?.map(|u| *u.as_bytes());
        // An account with this e-mail takes the purchase now; else the account that claimed the
        // profile earlier (its e-mail changed since).
        let target = account.or(claimed_by);
        let result = match target {
            None => json!({ "status": "pending", "id": id, "duplicate": false }),
            Some(user) => {
                let t = spi::write(c, PROFILE, &[TEXT], &[email.as_str().into()])?;
                let p = profile_row(&t.first())?;
                // The account that claimed the profile earlier keeps its (changed) e-mail.
                apply(c, &user, account.map(|_| email.as_str()), &p)?;
                json!({
                    "status": "applied_to_account",
                    "id": id,
                    "user_id": uuid_text(&user),
                    "credits_granted": p.credits,
                    "duplicate": false,
                })
            }
        };
        store_event(c, event_id, &result, target.as_ref())?;
        Ok(result)
    })
    .map(Ret::Json)
}
crate::billing_fn!(pg_finfo_pgb_upsert_pending_profile, pgb_upsert_pending_profile, upsert_pending_profile);

/// claim_pending_profile(p_user_id, p_email, p_token)
fn claim_pending_profile(a: &Args) -> BResult<Ret> {
    let user = validate::required("p_user_id", a.uuid(0))?;
    let caller = security::authorize_user(&user)?;
    let e = a.text(1);
    let email = m::normalize_email("p_email", e.as_deref())?;
    if let Caller::EndUser { email: jwt_email, .. } = &caller {
        let mine = jwt_email.as_deref().and_then(|j| m::normalize_email("email claim", Some(j)).ok());
        if mine.as_deref() != Some(email.as_str()) {
            return Err(BillingError::Forbidden {
                message: "an end user may claim only the pending profile of their own e-mail address".into(),
                hint: Some("p_email must be the email claim of the JWT".into()),
            });
        }
    }
    let tok = a.text(2);
    let token = validate::key("p_token", tok.as_deref())?;
    Spi::connect_mut(|c| claim(c, &user, &email, token, true)).map(Ret::Json)
}
crate::billing_fn!(pg_finfo_pgb_claim_pending_profile, pgb_claim_pending_profile, claim_pending_profile);

/// delete_pending_profile(p_id)
fn delete_pending_profile(a: &Args) -> BResult<Ret> {
    security::require_service("delete_pending_profile")?;
    let id = validate::required("p_id", a.uuid(0))?;
    Spi::connect_mut(|c| Ok(!spi::write(c, DELETE_PROFILE, &[UUID], &[uuid_arg(&id)])?.is_empty())).map(Ret::Bool)
}
crate::billing_fn!(pg_finfo_pgb_delete_pending_profile, pgb_delete_pending_profile, delete_pending_profile);

/// _on_new_user(p_user_id, p_email), called by the trigger function billing.handle_new_user.
/// Not granted to anyone (only the SECURITY DEFINER trigger function calls it), and it does not
/// check the caller: a sign-up may run in any session.
fn on_new_user(a: &Args) -> BResult<Ret> {
    let user = validate::required("id", a.uuid(0))?;
    let raw = a.text(1);
    // A sign-up never fails because of its e-mail: a malformed one is stored as given
    // (lower-cased) and claims nothing.
    let email = raw.as_deref().map(|e| m::normalize_email("email", Some(e)));
    let stored = match &email {
        Some(Ok(e)) => Some(e.clone()),
        // (kept only while it fits the e-mail index; a longer one is dropped)
        Some(Err(_)) => raw.as_deref().map(|e| e.trim().to_lowercase()).filter(|e| e.chars().count() <= m::MAX_EMAIL),
        None => None,
    };
    Spi::connect_mut(|c| {
        let created = !spi::write(c, NEW_ACCOUNT, &[UUID, TEXT], &[uuid_arg(&user), stored.as_deref().into()])?.is_empty();
        if created {
            let free = spi::read(c, FREE_CREDITS, &[], &[])?;
            let free = if free.is_empty() { 0 } else { col::<i64>(&free.first(), 1)?.unwrap_or(0) };
            if free > 0 {
                credits::grant(c, &user, Pool::Subscription, free, "signup_grant", Some("free plan credits"), None, None)?;
            }
        }
        let claimed = match &email {
            Some(Ok(e)) => claim(c, &user, e, None, false)?["success"].as_bool().unwrap_or(false),
            _ => false,
        };
        Ok(json!({ "account_created": created, "claimed": claimed }))
    })
    .map(Ret::Json)
}
crate::billing_fn!(pg_finfo_pgb_on_new_user, pgb_on_new_user, on_new_user);

// ---------------------------------------------------------------------------------------------
// Legacy single-pool import (SPEC 4): billing.migrate_single_pool
// ---------------------------------------------------------------------------------------------

/// A relation: its name as SQL text (schema-qualified under the empty search_path, quoted as
/// needed), kind, owner, schema and name; or nothing. $1 oid.
const RELATION: &str = "
SELECT c.oid::pg_catalog.regclass::text, c.relkind::pg_catalog.text, c.relowner, n.nspname::pg_catalog.text, c.relname::pg_catalog.text
  FROM pg_catalog.pg_class AS c JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
 WHERE c.oid = $1 AND c.relkind IN ('r', 'p', 'v', 'm', 'f')";

/// A column's type, or nothing. $1 relation oid, $2 column name.
const COLUMN_TYPE: &str = "
SELECT pg_catalog.format_type(a.atttypid, NULL) FROM pg_catalog.pg_attribute AS a
 WHERE a.attrelid = $1 AND a.attname = $2 AND a.attnum > 0 AND NOT a.attisdropped";

/// The legacy balances per user: source table, user column, balance column. Run as the table's
/// owner (issue 11 item 1), so a view's functions never run as the extension owner.
fn balances_query(table: &str, user: &str, balance: &str) -> String {
    use pg_billing_core::plans::quote_ident;
    format!(
        "SELECT t.{u}, pg_catalog.floor(pg_catalog.sum(t.{b})::pg_catalog.numeric)::pg_catalog.int8 \
           FROM {table} AS t WHERE t.{u} IS NOT NULL GROUP BY 1",
        u = quote_ident(user),
        b = quote_ident(balance),
    )
}

/// The legacy purchases per user: history table, its user column. Run as that table's owner.
fn purchases_query(table: &str, user: &str) -> String {
    use pg_billing_core::plans::quote_ident;
    format!(
        "SELECT p.{u}, pg_catalog.floor(pg_catalog.sum(p.amount)::pg_catalog.numeric)::pg_catalog.int8 \
           FROM {table} AS p WHERE p.type = 'purchase' AND p.amount > 0 AND p.{u} IS NOT NULL GROUP BY 1",
        u = quote_ident(user),
    )
}

/// Record one user's import; nothing when it was imported before. $1 user, $2 source table,
/// $3 legacy balance, $4 purchases, $5 subscription part, $6 purchased part.
const RECORD_IMPORT: &str = "
INSERT INTO billing.legacy_imports (user_id, source_table, legacy_balance, purchases_sum, subscription_credits, purchased_credits)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (user_id, source_table) DO NOTHING RETURNING 1";

const ENSURE_ACCOUNT: &str = "INSERT INTO billing.accounts (user_id) VALUES ($1) ON CONFLICT (user_id) DO NOTHING";

fn oid_arg(a: &Args, n: usize) -> Option<pgrx::pg_sys::Oid> {
    // SAFETY: fcinfo is the live call's and argument n is declared `oid` in sql/pending_profiles.sql.
    unsafe { pgrx::fcinfo::pg_getarg::<pgrx::pg_sys::Oid>(a.0, n) }
}

/// The relation `oid` names (a table or view), locked for the rest of the transaction and
/// checked after the lock, so the import reads exactly it.
fn relation(c: &SpiClient<'_>, oid: pgrx::pg_sys::Oid, param: &str) -> BResult<(String, crate::apptables::AppRelation)> {
    let t = spi::read(c, RELATION, &[OID], &[oid.into()])?;
    if t.is_empty() {
        return Err(BillingError::invalid_with_hint(format!("{param} is not a table or view"), "pass a table such as 'public.profiles'"));
    }
    let t = t.first();
    let name = col::<String>(&t, 1)?.ok_or_else(|| BillingError::internal("relation without a name"))?;
    let rel = crate::apptables::AppRelation {
        oid,
        kind: col::<String>(&t, 2)?.and_then(|k| k.bytes().next()).unwrap_or(b'?'),
        owner: col::<pgrx::pg_sys::Oid>(&t, 3)?.ok_or_else(|| BillingError::internal("relation without an owner"))?,
        schema: col::<String>(&t, 4)?.unwrap_or_default(),
        table: col::<String>(&t, 5)?.unwrap_or_default(),
    };
    if !crate::apptables::lock_checked(&rel) {
        return Err(BillingError::NotFound { message: format!("{param} ({name}) changed while it was being read"), hint: Some("retry the call".into()) });
    }
    Ok((name, rel))
}

/// Run a (user uuid, bigint) query as `role`; rows with a NULL user are skipped.
fn per_user_sums(c: &SpiClient<'_>, role: pgrx::pg_sys::Oid, query: &str) -> BResult<Vec<([u8; 16], i64)>> {
    crate::apptables::as_role(role, || -> BResult<_> {
        c.select(query, None, &[])
            .or_internal()?
            .map(|r| -> Result<_, pgrx::spi::SpiError> { Ok((r.get::<pgrx::Uuid>(1)?.map(|u| *u.as_bytes()), r.get::<i64>(2)?.unwrap_or(0))) })
            .collect::<Result<Vec<_>, _>>()
            .or_internal()
            .map(|v| v.into_iter().filter_map(|(u, n)| u.map(|u| (u, n))).collect())
    })
}

fn column_type(c: &SpiClient<'_>, oid: pgrx::pg_sys::Oid, column: &str) -> BResult<Option<String>> {
    let t = spi::read(c, COLUMN_TYPE, &[OID, TEXT], &[oid.into(), column.into()])?;
    if t.is_empty() {
        return Ok(None);
    }
    col::<String>(&t.first(), 1)
}

fn require_column(c: &SpiClient<'_>, oid: pgrx::pg_sys::Oid, table: &str, column: &str, allowed: &[&str], what: &str) -> BResult<()> {
    match column_type(c, oid, column)? {
        None => Err(BillingError::invalid_with_hint(
            format!("{table} has no column {column}"),
            format!("{what} must be a column of {table}"),
        )),
        Some(ty) if allowed.contains(&ty.as_str()) => Ok(()),
        Some(ty) => Err(BillingError::invalid_with_hint(
            format!("column {column} of {table} has type {ty}"),
            format!("{what} must have type {}", allowed.join(", ")),
        )),
    }
}

const NUMBERS: &[&str] = &["smallint", "integer", "bigint", "numeric"];

/// _migrate_single_pool(p_table, p_user_column, p_balance_column, p_purchases), called by
/// billing.migrate_single_pool.
fn migrate_single_pool(a: &Args) -> BResult<Ret> {
    security::require_service("migrate_single_pool")?;
    let table_oid = validate::required("p_table", oid_arg(a, 0))?;
    let user_column = validate::required("p_user_column", a.text(1))?;
    let balance_column = validate::required("p_balance_column", a.text(2))?;
    let purchases_oid = oid_arg(a, 3);
    Spi::connect_mut(|c| {
        let (table, table_rel) = relation(c, table_oid, "p_table")?;
        require_column(c, table_oid, &table, &user_column, &["uuid"], "p_user_column")?;
        require_column(c, table_oid, &table, &balance_column, NUMBERS, "p_balance_column")?;
        let purchases = match purchases_oid {
            None => None,
            Some(oid) => {
                let (name, rel) = relation(c, oid, "p_purchases")?;
                // The history's user column: a uuid column with the same name as in p_table,
                // else user_id (S4: profiles.id, credit_transactions.user_id next to its own
                // bigint id).
                let same = column_type(c, oid, &user_column)?.as_deref() == Some("uuid");
                let user = if same { user_column.clone() } else { "user_id".to_string() };
                require_column(c, oid, &name, &user, &["uuid"], "the purchases' user column (p_user_column or user_id)")?;
                require_column(c, oid, &name, "amount", NUMBERS, "amount")?;
                require_column(c, oid, &name, "type", &["text", "character varying"], "type")?;
                Some((name, user, rel))
            }
        };
        // The app's tables are read as their owners, each in its own statement; the rest
        // (billing tables) as the extension owner.
        let mut balances = per_user_sums(c, table_rel.owner, &balances_query(&table, &user_column, &balance_column))?;
        let bought: std::collections::HashMap<[u8; 16], i64> = match &purchases {
            None => Default::default(),
            Some((name, user, rel)) => per_user_sums(c, rel.owner, &purchases_query(name, user))?.into_iter().collect(),
        };
        balances.sort_by(|a, b| a.0.cmp(&b.0));
        let rows: Vec<([u8; 16], i64, i64)> =
            balances.into_iter().map(|(u, b)| (u, b, bought.get(&u).copied().unwrap_or(0))).collect();
        let mut imported = 0;
        for (user, balance, purchased_sum) in rows {
            let split = pg_billing_core::credits::split_legacy_balance(balance, purchased_sum);
            let claimed = spi::write(
                c,
                RECORD_IMPORT,
                &[UUID, TEXT, INT8, INT8, INT8, INT8],
                &[uuid_arg(&user), table.as_str().into(), balance.into(), purchased_sum.into(), split.subscription.into(), split.purchased.into()],
            )?;
            if claimed.is_empty() {
                continue; // imported concurrently
            }
            let reference = Some(table.as_str());
            spi::write(c, ENSURE_ACCOUNT, &[UUID], &[uuid_arg(&user)])?;
            if split.subscription > 0 {
                credits::grant(c, &user, Pool::Subscription, split.subscription, "migration", Some("legacy balance (subscription part)"), reference, None)?;
            }
            if split.purchased > 0 {
                credits::grant(c, &user, Pool::Purchased, split.purchased, "migration", Some("legacy balance (purchased part)"), reference, None)?;
            }
            imported += 1;
        }
        Ok(imported)
    })
    .map(Ret::Int)
}
crate::billing_fn!(pg_finfo_pgb_migrate_single_pool, pgb_migrate_single_pool, migrate_single_pool);
