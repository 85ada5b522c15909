//! Pending profiles (SPEC 9, S3): purchases made before the buyer had an account, claimed after
//! sign-up; the sign-up trigger's account creation; and the legacy single-pool import (SPEC 4,
//! `billing.migrate_single_pool`).
//!
//! One row per purchase: a purchase is identified by the e-mail, the checkout token and the
//! provider's customer (`pending_profiles_purchase_key`), so a later purchase by another buyer
//! of the same e-mail is a row of its own that its buyer claims (issue 11 item 3). A purchase
//! reaches an account only by a claim (or, for a repeat of a purchase that was claimed, the
//! claimer's account), never because an account has the e-mail (issue 11 item 2).
//!
//! Applying a purchase to an account never lowers what the account has: its credits are added
//! to the subscription pool through the credits core (the ledger holds), the higher plan of an
//! active subscription and the later billing cycle are kept. Lock order: the profile rows, then
//! the account row, then the subscription row (accounts before subscriptions, as everywhere).

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

/// A purchase's billing cycle: start defaults to now, end to start + the duration. Durations are
/// added in UTC (a year from Feb 29 is Feb 28, 30 days are 720 hours) whatever the session's
/// TimeZone. $1 start, $2 end, $3 the duration as an interval.
const CYCLE: &str = "
SELECT s.cycle_start, COALESCE($2, ((s.cycle_start AT TIME ZONE 'UTC') + $3::interval) AT TIME ZONE 'UTC')
  FROM (SELECT COALESCE($1, pg_catalog.now()) AS cycle_start) AS s";

/// The purchase with this identity, locked. $1 e-mail, $2 token, $3 provider, $4 provider user.
const PURCHASE: &str = "
SELECT p.id, p.claimed_by_user_id, p.billing_cycle_start, p.billing_cycle_end, p.credits::bigint,
       p.plan_id, COALESCE(pl.monthly_credits, 0)::bigint
  FROM billing.pending_profiles AS p
  LEFT JOIN billing.plans AS pl ON pl.plan_id = p.plan_id
 WHERE p.email = $1 AND p.token IS NOT DISTINCT FROM $2 AND p.provider IS NOT DISTINCT FROM $3
   AND p.provider_user_id IS NOT DISTINCT FROM $4
   FOR UPDATE OF p";

/// Record a new purchase. $1 e-mail, $2 token, $3 plan, $4 provider, $5 provider user,
/// $6 provider membership, $7 duration, $8 cycle start, $9 cycle end, $10 credits.
/// Nothing when a concurrent call recorded the same purchase first.
const INSERT_PROFILE: &str = "
INSERT INTO billing.pending_profiles AS p
       (email, token, plan_id, provider, provider_user_id, provider_membership_id, plan_duration,
        billing_cycle_start, billing_cycle_end, next_credit_renewal, credits)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, LEAST($9, (($8 AT TIME ZONE 'UTC') + '30 days'::interval) AT TIME ZONE 'UTC'), $10)
ON CONFLICT (email, token, provider, provider_user_id) DO NOTHING
RETURNING p.id";

/// A repeat of a recorded purchase. $1 e-mail, $2 id, $3 plan, $4 provider membership,
/// $5 duration, $6 cycle start, $7 cycle end, $8 credits, $9 a new cycle (used credits restart).
const UPDATE_PROFILE: &str = "
UPDATE billing.pending_profiles AS p
   SET plan_id                = $3,
       provider_membership_id = COALESCE($4, p.provider_membership_id),
       plan_duration          = $5,
       billing_cycle_start    = $6,
       billing_cycle_end      = $7,
       next_credit_renewal    = LEAST($7, (($6 AT TIME ZONE 'UTC') + '30 days'::interval) AT TIME ZONE 'UTC'),
       credits                = $8,
       used_credits           = CASE WHEN $9 THEN 0 ELSE p.used_credits END,
       updated_at             = pg_catalog.now()
 WHERE p.email = $1 AND p.id = $2
RETURNING p.id";

/// Claim the unclaimed profiles of an e-mail, locked in one order. $1 e-mail, $2 user,
/// $3 token, $4 check the token.
const CLAIM: &str = "
WITH c AS (
    SELECT p.email, p.id FROM billing.pending_profiles AS p
     WHERE p.email = $1 AND NOT p.claimed
       AND (NOT $4 OR p.token IS NULL OR p.token = $3)
     ORDER BY p.id
       FOR UPDATE OF p
)
UPDATE billing.pending_profiles AS p
   SET claimed = true, claimed_by_user_id = $2, claimed_at = pg_catalog.now(), updated_at = pg_catalog.now()
  FROM c
 WHERE p.email = c.email AND p.id = c.id AND NOT p.claimed
RETURNING p.id, p.created_at";

/// Why a claim did not happen: (profiles of the e-mail, one is claimable now, one is
/// unclaimed, the newest one this user claimed). $1 e-mail, $2 token, $3 user, $4 check the token.
const INSPECT: &str = "
SELECT pg_catalog.count(*)::bigint,
       COALESCE(pg_catalog.bool_or(NOT p.claimed AND (NOT $4 OR p.token IS NULL OR p.token = $2)), false),
       COALESCE(pg_catalog.bool_or(NOT p.claimed), false),
       (pg_catalog.array_agg(p.id ORDER BY p.claimed_at DESC, p.id) FILTER (WHERE p.claimed_by_user_id = $3))[1]
  FROM billing.pending_profiles AS p WHERE p.email = $1";

/// A profile, for applying it. $1 e-mail, $2 id.
const PROFILE: &str = "
SELECT p.id, p.plan_id, GREATEST(p.credits - p.used_credits, 0)::bigint,
       p.billing_cycle_start, p.billing_cycle_end, p.next_credit_renewal,
       p.provider, p.provider_membership_id, COALESCE(pl.monthly_credits, 0)::bigint
  FROM billing.pending_profiles AS p
  LEFT JOIN billing.plans AS pl ON pl.plan_id = p.plan_id
 WHERE p.email = $1 AND p.id = $2";

/// Create the account when missing (nothing is granted). $1 user.
const CREATE_ACCOUNT: &str = "INSERT INTO billing.accounts (user_id) VALUES ($1) ON CONFLICT (user_id) DO NOTHING RETURNING 1";

/// Lock the subscription and read what applying must not lower: its plan's credits, whether it
/// is in force, its period end. $1 user.
const LOCK_SUBSCRIPTION: &str = "
SELECT COALESCE(pl.monthly_credits, 0)::bigint,
       s.status IN ('active', 'trialing')
         AND (s.current_period_end IS NULL OR s.current_period_end > pg_catalog.now())
         AND (s.expires_at IS NULL OR s.expires_at > pg_catalog.now()),
       s.current_period_end, s.plan_id
  FROM billing.subscriptions AS s
  LEFT JOIN billing.plans AS pl ON pl.plan_id = s.plan_id
 WHERE s.user_id = $1
   FOR UPDATE OF s";

/// The account's plan and billing cycle from a purchase; $7 keeps the subscription's plan
/// (higher), $8 its billing cycle (later). $1 user, $2 plan, $3 provider, $4 provider
/// membership, $5 cycle start, $6 cycle end, $9 the purchase plan's monthly credits: what a new
/// period taken from the purchase has granted (so a later upsert_subscription for the same
/// period tops up only an upgrade; a kept period keeps its own count), $10 the transaction's
/// now() (a parameter: Citus takes no now() in ON CONFLICT ... SET).
const SUBSCRIBE: &str = "
INSERT INTO billing.subscriptions AS s
       (user_id, plan_id, status, provider, provider_subscription_id, current_period_start, current_period_end,
        period_credits_granted)
VALUES ($1, $2, 'active', $3, $4, $5, $6, $9)
ON CONFLICT (user_id) DO UPDATE
   SET plan_id                  = CASE WHEN $7 THEN s.plan_id ELSE EXCLUDED.plan_id END,
       status                   = 'active',
       provider                 = COALESCE(EXCLUDED.provider, s.provider),
       provider_subscription_id = COALESCE(EXCLUDED.provider_subscription_id, s.provider_subscription_id),
       current_period_start     = CASE WHEN $8 THEN s.current_period_start ELSE EXCLUDED.current_period_start END,
       current_period_end       = CASE WHEN $8 THEN s.current_period_end ELSE EXCLUDED.current_period_end END,
       period_credits_granted   = CASE WHEN $8 THEN s.period_credits_granted ELSE EXCLUDED.period_credits_granted END,
       trial_ends_at            = NULL,
       cancel_at_period_end     = false,
       expires_at               = NULL,
       updated_at               = $10";

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
    plan_credits: i64,
}

fn micros(t: Option<TimestampWithTimeZone>) -> Option<i64> {
    t.map(|t| t.into_inner())
}

fn load_profile(c: &mut SpiClient<'_>, email: &str, id: &[u8; 16]) -> BResult<Profile> {
    let t = spi::write(c, PROFILE, &[TEXT, UUID], &[email.into(), uuid_arg(id)])?;
    if t.is_empty() {
        return Err(BillingError::internal("the pending profile vanished while it was applied"));
    }
    let t = t.first();
    Ok(Profile {
        id: col::<pgrx::Uuid>(&t, 1)?.map(|u| *u.as_bytes()).ok_or_else(|| BillingError::internal("profile without id"))?,
        plan_id: col::<String>(&t, 2)?.unwrap_or_else(|| "free".into()),
        credits: col::<i64>(&t, 3)?.unwrap_or(0),
        cycle_start: col::<TimestampWithTimeZone>(&t, 4)?,
        cycle_end: col::<TimestampWithTimeZone>(&t, 5)?,
        next_renewal: col::<TimestampWithTimeZone>(&t, 6)?,
        provider: col::<String>(&t, 7)?,
        membership: col::<String>(&t, 8)?,
        plan_credits: col::<i64>(&t, 9)?.unwrap_or(0),
    })
}

/// What applying did.
struct Applied {
    existed: bool,
    plan_kept: bool,
}

/// Give `user` the profile's `credits` (added to the subscription pool) and, unless the account
/// has better, its plan and billing cycle; and `email` when given. Creates the account when
/// missing. Never lowers what the account has (issue 11 item 2): an active subscription on a plan
/// with more monthly credits keeps its plan, one whose period ends later keeps its period, and
/// the pool only grows (expiring at the later date).
fn apply(c: &mut SpiClient<'_>, user: &[u8; 16], email: Option<&str>, p: &Profile, credits: i64) -> BResult<Applied> {
    let created = !spi::write(c, CREATE_ACCOUNT, &[UUID], &[uuid_arg(user)])?.is_empty();
    // The account first (accounts before subscriptions): does its subscription pool hold live
    // credits?
    let live_pool = credits::lock_live(c, user)?.is_some_and(|b| b.sub > 0);
    let t = spi::write(c, LOCK_SUBSCRIPTION, &[UUID], &[uuid_arg(user)])?;
    let (plan_kept, period_kept, subscribed) = if t.is_empty() {
        (false, false, false)
    } else {
        let t = t.first();
        let sub_credits = col::<i64>(&t, 1)?.unwrap_or(0);
        let in_force = col::<bool>(&t, 2)?.unwrap_or(false);
        let sub_end = micros(col::<TimestampWithTimeZone>(&t, 3)?);
        let sub_plan = col::<String>(&t, 4)?;
        let plan_kept = in_force && sub_plan.as_deref() != Some(p.plan_id.as_str()) && sub_credits > p.plan_credits;
        let period_kept = in_force && matches!((sub_end, micros(p.cycle_end)), (Some(s), Some(e)) if s >= e);
        (plan_kept, period_kept, true)
    };
    if !(subscribed && plan_kept && period_kept) {
        let before = crate::api::events::subscription_state(c, user)?;
        spi::write(
            c,
            SUBSCRIBE,
            &[UUID, TEXT, TEXT, TEXT, TIMESTAMPTZ, TIMESTAMPTZ, BOOL, BOOL, INT8, TIMESTAMPTZ],
            &[
                uuid_arg(user),
                p.plan_id.as_str().into(),
                p.provider.as_deref().into(),
                p.membership.as_deref().into(),
                p.cycle_start.into(),
                p.cycle_end.into(),
                plan_kept.into(),
                period_kept.into(),
                p.plan_credits.into(),
                spi::tx_today_now()?.1.into(),
            ],
        )?;
        crate::api::events::subscription_written(c, user, before)?;
    }
    if credits > 0 {
        credits::grant(c, user, Pool::Subscription, credits, "renewal", Some("subscription renewal"), None, None)?;
    }
    let expiry = p.next_renewal.or(p.cycle_end);
    if credits > 0 || !live_pool {
        // When the pool expires: the purchase's date when it held no live credits, else the later
        // of the two (never earlier).
        credits::set_period_end(c, user, expiry, live_pool)?;
    }
    if let Some(email) = email {
        set_account_email(c, user, email)?;
    }
    Ok(Applied { existed: !created, plan_kept })
}

/// Claim the unclaimed profiles of `email` (with `token`, or without a token when
/// `check_token` is false) for `user`: every outcome of SPEC 9 as `{success, error, ...}`.
/// Two concurrent claims: the second waits on the row locks of the first's UPDATE, re-checks
/// `NOT claimed` on the committed rows and reports them claimed (by another account or by itself).
fn claim(c: &mut SpiClient<'_>, user: &[u8; 16], email: &str, token: Option<&str>, check_token: bool) -> BResult<Value> {
    for _ in 0..3 {
        let t = spi::write(c, CLAIM, &[TEXT, UUID, TEXT, BOOL], &[email.into(), uuid_arg(user), token.into(), check_token.into()])?;
        let mut ids: Vec<(i64, [u8; 16])> = Vec::new();
        for row in t {
            let id = row.get::<pgrx::Uuid>(1).or_internal()?.map(|u| *u.as_bytes());
            let at = row.get::<TimestampWithTimeZone>(2).or_internal()?.map(|t| t.into_inner()).unwrap_or(0);
            if let Some(id) = id {
                ids.push((at, id));
            }
        }
        if !ids.is_empty() {
            // Oldest purchase first, so the newest one's plan and cycle are applied last.
            ids.sort();
            let (mut granted, mut merged, mut plan_now, mut last) = (0i64, None, String::new(), None);
            for (_, id) in &ids {
                let p = load_profile(c, email, id)?;
                let a = apply(c, user, Some(email), &p, p.credits)?;
                granted = granted.saturating_add(p.credits);
                merged.get_or_insert(a.existed);
                if !a.plan_kept {
                    plan_now = p.plan_id.clone();
                }
                last = Some(p);
            }
            let merged = merged.unwrap_or(false);
            let last = last.ok_or_else(|| BillingError::internal("claimed without a profile"))?;
            if plan_now.is_empty() {
                plan_now = current_plan(c, user)?.unwrap_or(last.plan_id.clone());
            }
            return Ok(json!({
                "success": true,
                "error": null,
                "profile_id": uuid_text(&last.id),
                "profile_ids": ids.iter().map(|(_, id)| uuid_text(id)).collect::<Vec<_>>(),
                "user_id": uuid_text(user),
                "plan": plan_now,
                "credits_granted": granted,
                "merged": merged,
                "account_created": !merged,
                "already_claimed": false,
            }));
        }
        let t = spi::write(c, INSPECT, &[TEXT, TEXT, UUID, BOOL], &[email.into(), token.into(), uuid_arg(user), check_token.into()])?;
        let t = t.first();
        let n = col::<i64>(&t, 1)?.unwrap_or(0);
        let claimable = col::<bool>(&t, 2)?.unwrap_or(false);
        let unclaimed = col::<bool>(&t, 3)?.unwrap_or(false);
        let mine = col::<pgrx::Uuid>(&t, 4)?.map(|u| uuid_text(u.as_bytes()));
        if n == 0 {
            return Ok(failure("no pending profile exists for this e-mail address"));
        }
        if claimable {
            // A concurrent claim rolled back in between; try again.
            continue;
        }
        if let Some(id) = mine {
            return Ok(json!({
                "success": true,
                "error": null,
                "profile_id": id,
                "user_id": uuid_text(user),
                "already_claimed": true,
            }));
        }
        if unclaimed {
            return Ok(failure("the token does not match this pending profile"));
        }
        return Ok(failure("this pending profile was already claimed by another account"));
    }
    Err(BillingError::internal("the pending profile kept changing while it was claimed"))
}

const CURRENT_PLAN: &str = "SELECT s.plan_id FROM billing.subscriptions AS s WHERE s.user_id = $1";

fn current_plan(c: &mut SpiClient<'_>, user: &[u8; 16]) -> BResult<Option<String>> {
    let t = spi::write(c, CURRENT_PLAN, &[UUID], &[uuid_arg(user)])?;
    if t.is_empty() {
        return Ok(None);
    }
    col::<String>(&t.first(), 1)
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
        let t = spi::read(c, CYCLE, &[TIMESTAMPTZ, TIMESTAMPTZ, TEXT], &[start.into(), end.into(), interval.into()])?;
        let t = t.first();
        let cycle_start = col::<TimestampWithTimeZone>(&t, 1)?;
        let cycle_end = col::<TimestampWithTimeZone>(&t, 2)?;
        // Without p_billing_cycle_start the cycle starts now: an end already past is refused
        // here (22023), not by the table's CHECK (23514).
        if let (Some(s), Some(e)) = (micros(cycle_start), micros(cycle_end)) {
            if e < s {
                return Err(BillingError::invalid_with_hint(
                    "p_billing_cycle_end is before the cycle start",
                    format!("the cycle starts {} (now, as p_billing_cycle_start is NULL) and ends {}", validate::iso_utc(s), validate::iso_utc(e)),
                ));
            }
        }
        let identity = [email.as_str().into(), token.into(), provider.into(), provider_user.into()];
        let mut outcome = None;
        for _ in 0..3 {
            let t = spi::write(c, PURCHASE, &[TEXT, TEXT, TEXT, TEXT], &identity)?;
            if t.is_empty() {
                // A new purchase: pending until its buyer claims it, whoever has the e-mail.
                let t = spi::write(
                    c,
                    INSERT_PROFILE,
                    &[TEXT, TEXT, TEXT, TEXT, TEXT, TEXT, TEXT, TIMESTAMPTZ, TIMESTAMPTZ, INT8],
                    &[
                        email.as_str().into(),
                        token.into(),
                        plan_id.as_str().into(),
                        provider.into(),
                        provider_user.into(),
                        membership.into(),
                        duration.into(),
                        cycle_start.into(),
                        cycle_end.into(),
                        credits_n.into(),
                    ],
                )?;
                if t.is_empty() {
                    continue; // recorded concurrently: read it again, locked
                }
                let id = col::<pgrx::Uuid>(&t.first(), 1)?.map(|u| uuid_text(u.as_bytes()));
                outcome = Some((json!({ "status": "pending", "id": id, "duplicate": false }), None));
                break;
            }
            let t = t.first();
            let id = col::<pgrx::Uuid>(&t, 1)?.map(|u| *u.as_bytes()).ok_or_else(|| BillingError::internal("profile without id"))?;
            let claimed_by = col::<pgrx::Uuid>(&t, 2)?.map(|u| *u.as_bytes());
            let (old_start_ts, old_end_ts) = (col::<TimestampWithTimeZone>(&t, 3)?, col::<TimestampWithTimeZone>(&t, 4)?);
            let (old_start, old_end) = (micros(old_start_ts), micros(old_end_ts));
            let old_credits = col::<i64>(&t, 5)?.unwrap_or(0);
            let old_plan = col::<String>(&t, 6)?.unwrap_or_else(|| plan_id.clone());
            let old_plan_credits = col::<i64>(&t, 7)?.unwrap_or(0);
            let Some(user) = claimed_by else {
                // Not claimed yet: the buyer's purchase changed; nothing reaches an account.
                spi::write(
                    c,
                    UPDATE_PROFILE,
                    &[TEXT, UUID, TEXT, TEXT, TEXT, TIMESTAMPTZ, TIMESTAMPTZ, INT8, BOOL],
                    &[
                        email.as_str().into(),
                        uuid_arg(&id),
                        plan_id.as_str().into(),
                        membership.into(),
                        duration.into(),
                        cycle_start.into(),
                        cycle_end.into(),
                        credits_n.into(),
                        true.into(),
                    ],
                )?;
                outcome = Some((json!({ "status": "pending", "id": uuid_text(&id), "duplicate": false }), None));
                break;
            };
            // A repeat of a purchase its buyer claimed: it goes to that account. A later cycle
            // grants the purchase's credits; within the same cycle only an increase tops up the
            // difference (a repeated or flip-flopping webhook mints nothing).
            let advanced = matches!((micros(cycle_end), old_end), (Some(n), Some(o)) if n > o)
                || matches!((micros(cycle_start), old_start), (Some(n), Some(o)) if n > o);
            let upgraded = monthly > old_plan_credits;
            let (grant, stored_credits, stored_plan, s_start, s_end) = if advanced {
                (credits_n, credits_n, plan_id.clone(), cycle_start, cycle_end)
            } else {
                // the stored cycle stays; the higher plan and credits are kept
                let (grant, stored) = m::plan_change_grant(old_credits, credits_n);
                let higher = if upgraded { plan_id.clone() } else { old_plan };
                (grant, stored, higher, old_start_ts, old_end_ts)
            };
            spi::write(
                c,
                UPDATE_PROFILE,
                &[TEXT, UUID, TEXT, TEXT, TEXT, TIMESTAMPTZ, TIMESTAMPTZ, INT8, BOOL],
                &[
                    email.as_str().into(),
                    uuid_arg(&id),
                    stored_plan.as_str().into(),
                    membership.into(),
                    duration.into(),
                    s_start.into(),
                    s_end.into(),
                    stored_credits.into(),
                    advanced.into(),
                ],
            )?;
            if advanced || upgraded || grant > 0 {
                let p = load_profile(c, &email, &id)?;
                // The account that claimed it keeps its own (possibly changed) e-mail.
                apply(c, &user, None, &p, grant)?;
            }
            outcome = Some((
                json!({
                    "status": "applied_to_account",
                    "id": uuid_text(&id),
                    "user_id": uuid_text(&user),
                    "credits_granted": grant,
                    "duplicate": false,
                }),
                Some(user),
            ));
            break;
        }
        let (result, target) = outcome.ok_or_else(|| BillingError::internal("the pending profile kept changing while it was recorded"))?;
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
    if matches!(caller, Caller::EndUser { .. }) && !caller.email_claim_is(&email) {
        return Err(BillingError::Forbidden {
            message: "an end user may claim only the pending profile of their own e-mail address".into(),
            hint: Some("p_email must be the email claim of the JWT".into()),
        });
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

/// The sign-up: the account with the free plan's credits, and, when `claim_profiles`, the
/// unclaimed pending profiles of the e-mail. Not granted to anyone (only the SECURITY DEFINER
/// trigger function calls it), and it does not check the caller: a sign-up may run in any session.
fn sign_up(user: [u8; 16], raw: Option<String>, claim_profiles: bool) -> BResult<Ret> {
    // A sign-up never fails because of its e-mail: a malformed one is stored as given
    // (normalised) and claims nothing.
    let email = raw.as_deref().map(|e| m::normalize_email("email", Some(e)));
    let stored = match &email {
        Some(Ok(e)) => Some(e.clone()),
        // (kept only while it fits the e-mail index; a longer one is dropped)
        Some(Err(_)) => raw.as_deref().map(m::email_key).filter(|e| e.chars().count() <= m::MAX_EMAIL),
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
            Some(Ok(e)) if claim_profiles => claim(c, &user, e, None, false)?["success"].as_bool().unwrap_or(false),
            _ => false,
        };
        Ok(json!({ "account_created": created, "claimed": claimed }))
    })
    .map(Ret::Json)
}

/// _on_new_user(p_user_id, p_email, p_claim), called by the trigger function
/// billing.handle_new_user once it knows whether the e-mail is confirmed. The same C symbol
/// served 0.2.0's two-argument `_on_new_user(p_user_id, p_email)` (released scripts name it, so
/// it stays): called with two arguments (a 0.2.0 declaration still in place before `ALTER
/// EXTENSION ... UPDATE`) it claims nothing, so a 0.2.0 trigger running on this library cannot
/// hand a buyer's purchase to an unconfirmed sign-up.
fn on_new_user(a: &Args) -> BResult<Ret> {
    let user = validate::required("id", a.uuid(0))?;
    // SAFETY: fcinfo is the live call's; nargs is how many arguments the caller passed.
    let nargs = unsafe { (*a.0).nargs };
    let claim_profiles = nargs > 2 && a.boolean(2).unwrap_or(false);
    sign_up(user, a.text(1), claim_profiles)
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
