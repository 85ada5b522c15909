//! Members (SPEC 8, S1): per-member plan, a generation pool per renewal period, extra credits via
//! idempotent webhooks, usage status and the renewal reset.
//!
//! A member is an account (`member_id` = `user_id`). The pool is the subscription pool of the
//! credits core, extra credits are its purchased pool, and every change of credits goes through
//! `crate::api::credits` so the ledger holds. Rows are locked in one order everywhere:
//! `billing.member_emails`, then `billing.members`, then `billing.accounts`.
//!
//! Plan changes never lower what a member has (issue 11 item 2) and never mint credits
//! (item 4): an upgrade takes effect at once and tops the pool up by the difference to the
//! highest plan granted this period (`members.period_granted`); a downgrade is scheduled
//! (`members.next_plan_id`) and takes effect at the next renewal; usage is not reset.

use chrono::{Datelike, NaiveDate};
use pg_billing_core::members as m;
use pg_billing_core::BillingError;
use pgrx::datum::{Date, DatumWithOid, TimestampWithTimeZone};
use pgrx::pg_sys::{self, PgOid};
use pgrx::spi::{Spi, SpiClient};
use serde_json::{json, Value};

use crate::api::credits::{self, Pool};
use crate::api::{usage, webhooks};
use crate::boundary::{Args, BResult, Ret};
use crate::security;
use crate::spi::{self, col, uuid_arg, uuid_text, INT8, JSONB, TEXT, TIMESTAMPTZ, UUID};
use crate::validate;

pub const DATE: PgOid = PgOid::BuiltIn(pg_sys::BuiltinOid::DATEOID);

// ---------------------------------------------------------------------------------------------
// Statements
// ---------------------------------------------------------------------------------------------

/// A plan's monthly credits and overage rule. $1 plan id.
const PLAN: &str = "SELECT p.monthly_credits::bigint, p.allow_overage FROM billing.plans AS p WHERE p.plan_id = $1";

/// The known plans, for the 22023 hint.
const KNOWN_PLANS: &str =
    "SELECT pg_catalog.string_agg(p.plan_id, ', ' ORDER BY p.sort_order, p.plan_id) FROM billing.plans AS p";

/// The member id of an e-mail: the existing member, else an existing account with that e-mail
/// (compared the one way e-mails are: ASCII letters lower-cased, nothing else folded), else a new
/// id. The upsert locks the e-mail row, so concurrent upserts of one e-mail agree.
/// $1 e-mail, $2 the account [`ACCOUNT_BY_EMAIL`] found (NULL: none). (Two statements: Citus takes
/// no subquery in INSERT ... VALUES.)
const MEMBER_ID: &str = "
INSERT INTO billing.member_emails AS e (email, user_id)
VALUES ($1, COALESCE($2, pg_catalog.gen_random_uuid()))
ON CONFLICT (email) DO UPDATE SET email = EXCLUDED.email
RETURNING e.user_id";

/// The oldest account with e-mail $1 (compared as [`MEMBER_ID`] says).
const ACCOUNT_BY_EMAIL: &str = "
SELECT a.user_id FROM billing.accounts AS a
 WHERE pg_catalog.translate(a.email, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz') = $1
 ORDER BY a.created_at, a.user_id LIMIT 1";

/// Lock an existing member (after its e-mail row, before its account) and read what a plan
/// change needs: its plan, that plan's credits, what plans granted this period. $1 member.
const LOCK_MEMBER_PLAN: &str = "
SELECT m.plan_id, COALESCE(p.monthly_credits, 0)::bigint, m.period_granted
  FROM billing.members AS m
  LEFT JOIN billing.plans AS p ON p.plan_id = m.plan_id
 WHERE m.user_id = $1
   FOR UPDATE OF m";

/// Create or update the member. $1 member, $2 e-mail, $3 plan in effect now, $4 renewal date
/// (NULL: keep, or one month from today for a new member), $5 the plan scheduled for the next
/// renewal (a downgrade), $6 what plans granted this period, $7 today, $8 now() (both from
/// [`spi::tx_today_now`]; Citus takes no now() in ON CONFLICT ... SET). Returns whether it was
/// inserted, the previous plan, the renewal date, and the period end. A plan change keeps the
/// period's usage (issue 11 item 4). "Today" is the UTC date of now() (not CURRENT_DATE, which
/// follows the session's TimeZone): renewals fall at UTC midnight.
const UPSERT_MEMBER: &str = "
INSERT INTO billing.members AS m (user_id, email, plan_id, renewal_date, anchor_day, period_start, period_granted, next_plan_id)
VALUES ($1, $2, $3, COALESCE($4, ($7 + '1 month'::interval)::date),
        pg_catalog.date_part('day', COALESCE($4, ($7 + '1 month'::interval)::date))::smallint,
        LEAST($7, (COALESCE($4, ($7 + '1 month'::interval)::date) - '1 month'::interval)::date), $6, $5)
ON CONFLICT (user_id) DO UPDATE
   SET email            = EXCLUDED.email,
       plan_id          = EXCLUDED.plan_id,
       previous_plan_id = m.plan_id,
       next_plan_id     = EXCLUDED.next_plan_id,
       period_granted   = EXCLUDED.period_granted,
       -- The current period never gets shorter (issue 11 item 2): an earlier date is ignored.
       renewal_date     = CASE WHEN $4 IS NULL OR $4 < m.renewal_date THEN m.renewal_date ELSE EXCLUDED.renewal_date END,
       anchor_day       = CASE WHEN $4 IS NULL OR $4 < m.renewal_date THEN m.anchor_day ELSE EXCLUDED.anchor_day END,
       updated_at       = $8
RETURNING (m.xmax = 0) AS inserted, m.previous_plan_id, m.renewal_date, (m.renewal_date::timestamp AT TIME ZONE 'UTC')";

/// Give the account its e-mail. $1 user, $2 e-mail.
const SET_EMAIL: &str = "
UPDATE billing.accounts AS a SET email = $2, updated_at = pg_catalog.now()
 WHERE a.user_id = $1 AND a.email IS DISTINCT FROM $2";

/// Lock a member and read what consume_generation needs. $1 member.
const LOCK_MEMBER: &str = "
SELECT m.plan_id, COALESCE(p.allow_overage, false), m.period_start
  FROM billing.members AS m
  LEFT JOIN billing.plans AS p ON p.plan_id = m.plan_id
 WHERE m.user_id = $1
   FOR UPDATE OF m";

/// Count a consumption. $1 member, $2 credits used, $3 overage.
const COUNT_USAGE: &str = "
UPDATE billing.members AS m
   SET period_usage = m.period_usage + $2, period_overage = m.period_overage + $3, updated_at = pg_catalog.now()
 WHERE m.user_id = $1
RETURNING m.period_usage";

/// Log overage. $1 member, $2 generations, $3 description.
const LOG_OVERAGE: &str = "
INSERT INTO billing.member_overage (user_id, period_start, generations, description)
SELECT $1, m.period_start, $2, $3 FROM billing.members AS m WHERE m.user_id = $1";

/// Create the account if missing (no ledger row: nothing is granted). $1 user.
const ENSURE_ACCOUNT: &str = "INSERT INTO billing.accounts (user_id) VALUES ($1) ON CONFLICT (user_id) DO NOTHING";

/// Does this member exist? $1 member.
const MEMBER_EXISTS: &str = "SELECT 1 FROM billing.members AS m WHERE m.user_id = $1";

/// The stored result of a webhook event. $1 event id.
const EVENT_RESULT: &str = "SELECT w.result FROM billing.webhook_events AS w WHERE w.event_id = $1";
/// Store a webhook event's result and user. $1 event id, $2 result, $3 user.
const STORE_EVENT_RESULT: &str =
    "UPDATE billing.webhook_events AS w SET result = $2, user_id = COALESCE(w.user_id, $3) WHERE w.event_id = $1";

/// Usage status. $1 member.
const STATUS: &str = "
SELECT pg_catalog.jsonb_build_object(
           'member_id', m.user_id,
           'email', m.email,
           'plan', m.plan_id,
           'current_usage', m.period_usage,
           'remaining', GREATEST(COALESCE(a.available, 0), 0),
           'pool_limit', m.period_usage + GREATEST(COALESCE(a.available, 0), 0),
           'extra_credits', COALESCE(a.purchased_credits_balance, 0),
           'overage', m.period_overage,
           'period_start', m.period_start,
           'renewal_date', m.renewal_date)
  FROM billing.members AS m
  LEFT JOIN billing.user_credits AS a ON a.user_id = m.user_id
 WHERE m.user_id = $1";

/// Members due on $1, in a fixed order.
const DUE: &str = "SELECT m.user_id FROM billing.members AS m WHERE m.renewal_date <= $1 ORDER BY m.user_id";

/// Lock one due member (it may have been reset concurrently). $1 member, $2 today.
const LOCK_DUE: &str = "
SELECT m.renewal_date, m.anchor_day::integer, COALESCE(p.monthly_credits, 0)::bigint
  FROM billing.members AS m
  LEFT JOIN billing.plans AS p ON p.plan_id = COALESCE(m.next_plan_id, m.plan_id)
 WHERE m.user_id = $1 AND m.renewal_date <= $2
   FOR UPDATE OF m";

/// Start the member's new period (on the plan scheduled for it, if any). $1 member, $2 period
/// start, $3 next renewal date, $4 the period's plan credits.
const START_PERIOD: &str = "
UPDATE billing.members AS m
   SET period_start = $2, renewal_date = $3, period_usage = 0, period_overage = 0, updated_at = pg_catalog.now(),
       plan_id = COALESCE(m.next_plan_id, m.plan_id),
       previous_plan_id = CASE WHEN m.next_plan_id IS NULL THEN m.previous_plan_id ELSE m.plan_id END,
       next_plan_id = NULL, period_granted = $4
 WHERE m.user_id = $1
RETURNING ($3::timestamp AT TIME ZONE 'UTC')";

// ---------------------------------------------------------------------------------------------
// Shared pieces
// ---------------------------------------------------------------------------------------------

fn json_arg(v: &Value) -> DatumWithOid<'static> {
    pgrx::JsonB(v.clone()).into()
}

/// A date argument (pgrx's `Args` has no date getter).
fn date_arg(a: &Args, n: usize) -> Option<Date> {
    // SAFETY: fcinfo is the live call's and argument n is declared `date` in sql/members.sql.
    unsafe { pgrx::fcinfo::pg_getarg::<Date>(a.0, n) }
}

fn ymd(d: Date) -> BResult<NaiveDate> {
    if !d.is_finite() {
        return Err(BillingError::invalid("dates must be finite (not infinity)"));
    }
    if !(1900..=9999).contains(&d.year()) {
        return Err(BillingError::invalid_with_hint("the date is out of range", "dates must fall in the years 1900 to 9999"));
    }
    NaiveDate::from_ymd_opt(d.year(), d.month().into(), d.day().into())
        .ok_or_else(|| BillingError::internal(format!("date {}-{}-{} is not a calendar date", d.year(), d.month(), d.day())))
}

fn to_date(d: NaiveDate) -> BResult<Date> {
    Date::new(d.year(), d.month() as u8, d.day() as u8).map_err(|e| BillingError::internal(format!("date {d}: {e}")))
}

/// Lock and read a plan's (monthly_credits, allow_overage), or 22023 naming the known plans.
pub fn plan(c: &mut SpiClient<'_>, plan_id: &str) -> BResult<(i64, bool)> {
    let t = spi::write(c, PLAN, &[TEXT], &[plan_id.into()])?;
    if !t.is_empty() {
        let t = t.first();
        return Ok((col::<i64>(&t, 1)?.unwrap_or(0), col::<bool>(&t, 2)?.unwrap_or(false)));
    }
    let known = spi::read(c, KNOWN_PLANS, &[], &[])?.first().get_one::<String>().ok().flatten().unwrap_or_default();
    Err(BillingError::invalid_with_hint(format!("plan '{plan_id}' does not exist"), format!("known plans: {known}")))
}

/// Claim a webhook event id. `Ok(None)`: first delivery, go on. `Ok(Some(v))`: a repeat (also
/// one that waited for a concurrent first delivery to commit); `v` is the first result with
/// `duplicate: true`.
pub fn claim_event(c: &mut SpiClient<'_>, event_id: Option<&str>, event_type: &str, user: Option<&[u8; 16]>) -> BResult<Option<Value>> {
    let Some(event_id) = event_id else { return Ok(None) };
    if webhooks::record(c, event_id, event_type, user)? {
        return Ok(None);
    }
    let t = spi::write(c, EVENT_RESULT, &[TEXT], &[event_id.into()])?;
    let mut v = if t.is_empty() { Value::Null } else { col::<pgrx::JsonB>(&t.first(), 1)?.map(|j| j.0).unwrap_or(Value::Null) };
    if !v.is_object() {
        v = json!({ "event_id": event_id });
    }
    v["duplicate"] = json!(true);
    Ok(Some(v))
}

/// Store the first result of a webhook event.
pub fn store_event(c: &mut SpiClient<'_>, event_id: Option<&str>, result: &Value, user: Option<&[u8; 16]>) -> BResult<()> {
    if let Some(event_id) = event_id {
        let user_arg = match user {
            Some(u) => uuid_arg(u),
            None => DatumWithOid::null::<pgrx::Uuid>(),
        };
        spi::write(c, STORE_EVENT_RESULT, &[TEXT, JSONB, UUID], &[event_id.into(), json_arg(result), user_arg])?;
    }
    Ok(())
}

/// Give an account its e-mail (the account must exist).
pub fn set_account_email(c: &mut SpiClient<'_>, user: &[u8; 16], email: &str) -> BResult<()> {
    spi::write(c, SET_EMAIL, &[UUID, TEXT], &[uuid_arg(user), email.into()])?;
    Ok(())
}

fn unknown_member(user: &[u8; 16]) -> BillingError {
    BillingError::NotFound {
        message: format!("no member has id {}", uuid_text(user)),
        hint: Some("members are created by upsert_member".into()),
    }
}

// ---------------------------------------------------------------------------------------------
// SQL functions
// ---------------------------------------------------------------------------------------------

/// upsert_member(p_email, p_plan_id, p_renewal_date, p_event_id)
fn upsert_member(a: &Args) -> BResult<Ret> {
    security::require_service("upsert_member")?;
    let e = a.text(0);
    let email = m::normalize_email("p_email", e.as_deref())?;
    let plan_id = validate::required("p_plan_id", a.text(1))?;
    let renewal = date_arg(a, 2).map(ymd).transpose()?.map(to_date).transpose()?;
    let ev = a.text(3);
    let event_id = validate::key("p_event_id", ev.as_deref())?;
    Spi::connect_mut(|c| {
        let (monthly, _) = plan(c, &plan_id)?;
        if let Some(replay) = claim_event(c, event_id, "upsert_member", None)? {
            return Ok(replay);
        }
        let known = spi::write(c, ACCOUNT_BY_EMAIL, &[TEXT], &[email.as_str().into()])?;
        let known = if known.is_empty() { None } else { col::<pgrx::Uuid>(&known.first(), 1)? };
        let t = spi::write(c, MEMBER_ID, &[TEXT, UUID], &[email.as_str().into(), known.into()])?;
        let user = col::<pgrx::Uuid>(&t.first(), 1)?
            .map(|u| *u.as_bytes())
            .ok_or_else(|| BillingError::internal("member e-mail row without id"))?;
        // What the member has now, locked (e-mail row, member row, then account row).
        let t = spi::write(c, LOCK_MEMBER_PLAN, &[UUID], &[uuid_arg(&user)])?;
        let current = if t.is_empty() {
            None
        } else {
            let t = t.first();
            Some((col::<String>(&t, 1)?.unwrap_or_default(), col::<i64>(&t, 2)?.unwrap_or(0), col::<i64>(&t, 3)?.unwrap_or(0)))
        };
        // Never lower what the member has (issue 11 item 2): a plan with fewer credits is
        // scheduled for the next renewal; an upgrade takes effect now and tops up the difference
        // (issue 11 item 4: within one period, plan changes never grant more in total than the
        // highest plan's credits).
        let (plan_now, scheduled, top_up, granted_after) = match &current {
            None => (plan_id.clone(), None, 0, monthly),
            Some((cur, _, granted)) if *cur == plan_id => (cur.clone(), None, 0, *granted),
            Some((_, cur_credits, granted)) if monthly >= *cur_credits => {
                let (grant, after) = m::plan_change_grant(*granted, monthly);
                (plan_id.clone(), None, grant, after)
            }
            Some((cur, _, granted)) => (cur.clone(), Some(plan_id.clone()), 0, *granted),
        };
        let (today, now) = spi::tx_today_now()?;
        let t = spi::write(
            c,
            UPSERT_MEMBER,
            &[UUID, TEXT, TEXT, DATE, TEXT, INT8, DATE, TIMESTAMPTZ],
            &[
                uuid_arg(&user),
                email.as_str().into(),
                plan_now.as_str().into(),
                renewal.into(),
                scheduled.as_deref().into(),
                granted_after.into(),
                today.into(),
                now.into(),
            ],
        )?;
        let t = t.first();
        let inserted = col::<bool>(&t, 1)?.unwrap_or(false);
        let previous = col::<String>(&t, 2)?;
        let renewal_text = col::<pgrx::datum::Date>(&t, 3)?.map(|d| format!("{:04}-{:02}-{:02}", d.year(), d.month(), d.day()));
        let period_end = col::<TimestampWithTimeZone>(&t, 4)?;
        let plan_changed = !inserted && previous.as_deref() != Some(plan_now.as_str());
        // The account (step 2 of the lock order) and its live subscription pool.
        let pool = credits::lock_live(c, &user)?.map(|b| b.sub).unwrap_or(0);
        let granted = if inserted && pool == 0 {
            // A new member: the plan's credits are the period's subscription credits.
            credits::renew(c, &user, monthly, period_end, None)?;
            monthly
        } else if inserted {
            // An existing account became the member: its pool is topped up to the plan's
            // credits, never lowered, and expires at the later date.
            let grant = (monthly - pool).max(0);
            if grant > 0 {
                credits::grant(c, &user, Pool::Subscription, grant, "renewal", Some("subscription renewal"), None, None)?;
                credits::set_period_end(c, &user, period_end, true)?;
            }
            grant
        } else if top_up > 0 {
            credits::grant(c, &user, Pool::Subscription, top_up, "plan_upgrade", Some("plan upgrade within the period"), None, None)?;
            top_up
        } else {
            // Make sure the account exists (a member row without an account cannot happen
            // through pg_billing, but restores and manual edits can).
            spi::write(c, ENSURE_ACCOUNT, &[UUID], &[uuid_arg(&user)])?;
            0
        };
        set_account_email(c, &user, &email)?;
        let result = json!({
            "member_id": uuid_text(&user),
            "email": email,
            "plan": plan_now,
            "scheduled_plan": scheduled,
            "previous_plan": if inserted { Value::Null } else { json!(previous) },
            "created": inserted,
            "plan_changed": plan_changed,
            "credits_granted": granted,
            "renewal_date": renewal_text,
            "duplicate": false,
        });
        store_event(c, event_id, &result, Some(&user))?;
        Ok(result)
    })
    .map(Ret::Json)
}
crate::billing_fn!(pg_finfo_pgb_upsert_member, pgb_upsert_member, upsert_member);

/// consume_generation(p_member_id, p_count, p_description)
fn consume_generation(a: &Args) -> BResult<Ret> {
    let user = validate::required("p_member_id", a.uuid(0))?;
    security::authorize_user(&user)?;
    let count = validate::positive_amount("p_count", a.int(1))?;
    let d = a.text(2);
    let description = validate::text("p_description", d.as_deref())?;
    Spi::connect_mut(|c| {
        let t = spi::write(c, LOCK_MEMBER, &[UUID], &[uuid_arg(&user)])?;
        if t.is_empty() {
            return Err(unknown_member(&user));
        }
        let allow_overage = col::<bool>(&t.first(), 2)?.unwrap_or(false);
        // The member's account and its live pools (expired grants settled).
        // (Generations spend only unscoped grants: scoped credits do not count here, and neither
        // do the credits active holds reserve.)
        let (sub, pur) = credits::lock_live(c, &user)?.map(|b| b.unscoped_after_holds()).unwrap_or((0, 0));
        let g = m::plan_generation(sub, pur, count, allow_overage)?;
        let (remaining, kind) = if g.from_credits > 0 {
            let v = credits::consume(c, &user, g.from_credits, "generation", description, None, None)?;
            (v["total_balance"].as_i64().unwrap_or(0), if g.overage > 0 { "overage" } else { "generation" })
        } else {
            (sub.saturating_add(pur), "overage")
        };
        let t = spi::write(c, COUNT_USAGE, &[UUID, INT8, INT8], &[uuid_arg(&user), g.from_credits.into(), g.overage.into()])?;
        let usage = col::<i64>(&t.first(), 1)?.unwrap_or(0);
        if g.overage > 0 {
            spi::write(c, LOG_OVERAGE, &[UUID, INT8, TEXT], &[uuid_arg(&user), g.overage.into(), description.into()])?;
        }
        // SPEC 6's monthly metering counts every generation, overage included.
        usage::record(c, &user, [0, 0, 0, 0, 0, 0, count])?;
        Ok(json!({
            "allowed": true,
            "type": kind,
            "current_usage": usage,
            "pool_limit": usage.saturating_add(remaining),
            "remaining": remaining,
            "overage": g.overage,
        }))
    })
    .map(Ret::Json)
}
crate::billing_fn!(pg_finfo_pgb_consume_generation, pgb_consume_generation, consume_generation);

/// add_credits(p_member_id, p_credits, p_event_id)
fn add_credits(a: &Args) -> BResult<Ret> {
    security::require_service("add_credits")?;
    let user = validate::required("p_member_id", a.uuid(0))?;
    let amount = validate::positive_amount("p_credits", a.int(1))?;
    let ev = a.text(2);
    let event_id = validate::key("p_event_id", ev.as_deref())?;
    Spi::connect_mut(|c| {
        if spi::write(c, MEMBER_EXISTS, &[UUID], &[uuid_arg(&user)])?.is_empty() {
            return Err(unknown_member(&user));
        }
        if let Some(replay) = claim_event(c, event_id, "add_credits", Some(&user))? {
            return Ok(replay);
        }
        let mut v = credits::grant(c, &user, Pool::Purchased, amount, "purchase", Some("extra credits"), event_id, None)?;
        v["member_id"] = json!(uuid_text(&user));
        v["extra_credits"] = v["purchased_credits_balance"].clone();
        v["duplicate"] = json!(false);
        store_event(c, event_id, &v, Some(&user))?;
        Ok(v)
    })
    .map(Ret::Json)
}
crate::billing_fn!(pg_finfo_pgb_add_credits, pgb_add_credits, add_credits);

/// get_usage_status(p_member_id)
fn get_usage_status(a: &Args) -> BResult<Ret> {
    let user = validate::required("p_member_id", a.uuid(0))?;
    security::authorize_user(&user)?;
    Spi::connect(|c| {
        let t = spi::read(c, STATUS, &[UUID], &[uuid_arg(&user)])?;
        if t.is_empty() {
            return Err(unknown_member(&user));
        }
        col::<pgrx::JsonB>(&t.first(), 1)?.map(|j| j.0).ok_or_else(|| BillingError::internal("empty usage status"))
    })
    .map(Ret::Json)
}
crate::billing_fn!(pg_finfo_pgb_get_usage_status, pgb_get_usage_status, get_usage_status);

/// reset_usage_for_due_members(p_today)
fn reset_usage_for_due_members(a: &Args) -> BResult<Ret> {
    security::require_service("reset_usage_for_due_members")?;
    let today_date = validate::required("p_today", date_arg(a, 0))?;
    let today = ymd(today_date)?;
    Spi::connect_mut(|c| {
        let due = spi::uuid_column(spi::write(c, DUE, &[DATE], &[today_date.into()])?)?;
        let mut n = 0;
        for user in due {
            // Locked in user_id order; a member reset concurrently is no longer due and skipped.
            let t = spi::write(c, LOCK_DUE, &[UUID, DATE], &[uuid_arg(&user), today_date.into()])?;
            if t.is_empty() {
                continue;
            }
            let t = t.first();
            let renewal = col::<Date>(&t, 1)?.ok_or_else(|| BillingError::internal("member without renewal date"))?;
            let anchor = col::<i32>(&t, 2)?.unwrap_or(1).clamp(1, 31) as u8;
            let monthly = col::<i64>(&t, 3)?.unwrap_or(0);
            let Some((start, next)) = m::advance_renewal(ymd(renewal)?, anchor, today) else { continue };
            let t = spi::write(
                c,
                START_PERIOD,
                &[UUID, DATE, DATE, INT8],
                &[uuid_arg(&user), to_date(start)?.into(), to_date(next)?.into(), monthly.into()],
            )?;
            let period_end = col::<TimestampWithTimeZone>(&t.first(), 1)?;
            credits::renew(c, &user, monthly, period_end, None)?;
            n += 1;
        }
        Ok(n)
    })
    .map(Ret::Int)
}
crate::billing_fn!(pg_finfo_pgb_reset_usage_for_due_members, pgb_reset_usage_for_due_members, reset_usage_for_due_members);
