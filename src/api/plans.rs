//! Plans and subscriptions (SPEC 5): the webhook entry point and expiry processing.

use pg_billing_core::plans::{self, PeriodGrant, SUBSCRIPTION_STATUSES};
use pg_billing_core::BillingError;
use pgrx::datum::TimestampWithTimeZone;
use pgrx::spi::{Spi, SpiClient, SpiTupleTable};
use serde_json::json;

use crate::api::credits::{self, Pool};
use crate::api::webhooks;
use crate::boundary::{Args, BResult, Ret};
use crate::security;
use crate::spi::{self, col, uuid_arg, uuid_text, BOOL, INT8, TEXT, TIMESTAMPTZ, UUID};
use crate::validate;

const PLAN: &str = "SELECT p.monthly_credits FROM billing.plans AS p WHERE p.plan_id = $1";
const PLAN_IDS: &str = "SELECT pg_catalog.string_agg(p.plan_id, ', ' ORDER BY p.sort_order, p.plan_id) FROM billing.plans AS p";

/// Lock the current subscription (after the account: see `crate::api::lock_account`) and say
/// what the incoming event would change. $1 user, $2 event time, $3 new period start (NULL:
/// keep the stored one), $4 new period end.
/// The period advances when the start or the end is later than the stored one; an event whose
/// period starts before the stored one is about an older period, so it is stale too.
/// end_before_start: without $3 the stored start stays, and $4 is before it (the stored start,
/// for the message; NULL otherwise).
const LOCK: &str = "
SELECT (s.last_event_created_at IS NOT NULL AND $2 IS NOT NULL AND $2 < s.last_event_created_at)
       OR COALESCE($3 < s.current_period_start, false) AS stale,
       COALESCE($3 > s.current_period_start, false) OR COALESCE($4 > s.current_period_end, false) AS new_period,
       s.period_credits_granted,
       (SELECT pg_catalog.to_char(s.current_period_start AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')
         WHERE $3 IS NULL AND $4 < s.current_period_start) AS end_before_start
  FROM billing.subscriptions AS s
 WHERE s.user_id = $1
   FOR UPDATE";

/// $1 user, $2 plan, $3 status, $4 period start (NULL: the stored one, or now for a new
/// subscription), $5 period end, $6 trial end, $7 cancel at period end, $8 provider, $9 provider
/// subscription id, $10 event id, $11 event time, $12 credits the period has granted, $13 now()
/// (a parameter: Citus takes no now() in ON CONFLICT ... SET).
const UPSERT: &str = "
INSERT INTO billing.subscriptions AS s
       (user_id, plan_id, status, current_period_start, current_period_end, trial_ends_at, cancel_at_period_end,
        provider, provider_subscription_id, last_event_id, last_event_created_at, expires_at, period_credits_granted)
VALUES ($1, $2, $3, COALESCE($4, $13), $5, $6, $7, $8, $9, $10, $11, CASE WHEN $3 = 'expired' THEN $13 END, $12)
ON CONFLICT (user_id) DO UPDATE
   SET plan_id                  = EXCLUDED.plan_id,
       status                   = EXCLUDED.status,
       current_period_start     = COALESCE($4, s.current_period_start),
       period_credits_granted   = EXCLUDED.period_credits_granted,
       current_period_end       = EXCLUDED.current_period_end,
       trial_ends_at            = EXCLUDED.trial_ends_at,
       cancel_at_period_end     = EXCLUDED.cancel_at_period_end,
       provider                 = COALESCE(EXCLUDED.provider, s.provider),
       provider_subscription_id = COALESCE(EXCLUDED.provider_subscription_id, s.provider_subscription_id),
       last_event_id            = COALESCE(EXCLUDED.last_event_id, s.last_event_id),
       last_event_created_at    = GREATEST(EXCLUDED.last_event_created_at, s.last_event_created_at),
       expires_at               = CASE WHEN EXCLUDED.status = 'expired' THEN COALESCE(s.expires_at, $13) END,
       updated_at               = $13
 WHERE $11 IS NULL OR s.last_event_created_at IS NULL OR $11 >= s.last_event_created_at
RETURNING s.id, s.plan_id, s.status, s.current_period_end, s.trial_ends_at, s.expires_at";

/// The effective plan of a subscription's fields ($1 plan, $2 status, $3 period end, $4 trial end,
/// $5 expiry), in a statement of its own: billing.effective_plan_id reads billing.plans, and on
/// Citus a function that reads a table cannot run inside a statement on a distributed table (nor
/// may a modification's RETURNING call it).
const EFFECTIVE: &str = "SELECT billing.effective_plan_id($1, $2, $3, $4, $5)";

/// [`EFFECTIVE`] on the columns `first..first + 4` of the first row of `t` (plan, status, period
/// end, trial end, expiry).
pub fn effective_plan(c: &mut SpiClient<'_>, t: &SpiTupleTable<'_>, first: usize) -> BResult<Option<String>> {
    let (plan, status) = (col::<String>(t, first)?, col::<String>(t, first + 1)?);
    let (end, trial, expires) = (
        col::<TimestampWithTimeZone>(t, first + 2)?,
        col::<TimestampWithTimeZone>(t, first + 3)?,
        col::<TimestampWithTimeZone>(t, first + 4)?,
    );
    let e = spi::write(
        c,
        EFFECTIVE,
        &[TEXT, TEXT, TIMESTAMPTZ, TIMESTAMPTZ, TIMESTAMPTZ],
        &[plan.into(), status.into(), end.into(), trial.into(), expires.into()],
    )?;
    col::<String>(&e.first(), 1)
}

/// $1 user, $2 event id, $3 event time, $4 applied, $5 reason, $6 plan, $7 status.
const LOG_EVENT: &str = "
INSERT INTO billing.subscription_events (user_id, event_id, event_created_at, applied, reason, plan_id, status)
VALUES ($1, $2, $3, $4, $5, $6, $7)";

/// The subscriptions that still have a paid plan; a lapse is where their effective plan has become
/// the free plan.
macro_rules! paid {
    () => {
        "s.status IN ('active', 'trialing', 'canceled', 'past_due') AND s.plan_id <> 'free'"
    };
}

/// Subscriptions whose entitlement has lapsed (read without locks). The rows are read first and
/// billing.effective_plan_id runs on what they return: on Citus the CTE is a multi-shard read and
/// the function runs on the coordinator (it reads billing.plans, which no statement on a shard
/// may do).
const DUE: &str = concat!(
    "WITH c AS MATERIALIZED (SELECT s.user_id, s.plan_id, s.status, s.current_period_end, s.trial_ends_at, s.expires_at
                              FROM billing.subscriptions AS s WHERE ",
    paid!(),
    ")
SELECT c.user_id FROM c
 WHERE billing.effective_plan_id(c.plan_id, c.status, c.current_period_end, c.trial_ends_at, c.expires_at) = 'free'"
);

/// One paid subscription, locked; a row another transaction holds is skipped, never waited for.
/// $1 user. Its account is locked first (the lock order). [`EFFECTIVE`] then decides.
const LOCK_PAID: &str = concat!(
    "SELECT s.plan_id, s.status, s.current_period_end, s.trial_ends_at, s.expires_at
  FROM billing.subscriptions AS s WHERE s.user_id = $1 AND ",
    paid!(),
    " FOR UPDATE SKIP LOCKED"
);

/// Set one lapsed subscription expired on the free plan. $1 user, $2 now().
const EXPIRE_ONE: &str = "
UPDATE billing.subscriptions AS s
   SET status = 'expired', plan_id = 'free', expires_at = COALESCE(s.expires_at, $2), updated_at = $2
 WHERE s.user_id = $1";

fn unknown_plan(c: &SpiClient<'_>, plan: &str) -> BResult<BillingError> {
    let t = spi::read(c, PLAN_IDS, &[], &[])?;
    let known = col::<String>(&t.first(), 1)?.unwrap_or_default();
    Ok(BillingError::invalid_with_hint(
        format!("plan \"{}\" does not exist", plans::truncate(plan, 64)),
        format!("known plans: {known}"),
    ))
}

/// The monthly credits of a plan, or 22023 naming the known plans.
pub fn plan_monthly_credits(c: &SpiClient<'_>, plan: &str) -> BResult<i64> {
    let t = spi::read(c, PLAN, &[TEXT], &[plan.into()])?;
    if t.is_empty() {
        return Err(unknown_plan(c, plan)?);
    }
    Ok(col::<i32>(&t.first(), 1)?.unwrap_or(0) as i64)
}

/// upsert_subscription(p_user_id, p_plan_id, p_status, p_current_period_start, p_current_period_end,
/// p_trial_ends_at, p_cancel_at_period_end, p_provider, p_provider_subscription_id, p_event_id,
/// p_event_created_at)
fn upsert_subscription(a: &Args) -> BResult<Ret> {
    security::require_service("upsert_subscription")?;
    let user = validate::required("p_user_id", a.uuid(0))?;
    let plan = validate::required("p_plan_id", a.text(1))?;
    let status = validate::required("p_status", a.text(2))?;
    plans::one_of("p_status", &status, &SUBSCRIPTION_STATUSES)?;
    for (n, name) in [(3, "p_current_period_start"), (4, "p_current_period_end"), (5, "p_trial_ends_at")] {
        validate::sane_timestamp(name, a.timestamptz_micros(n))?;
    }
    let (start, end, trial) = (a.timestamptz(3), a.timestamptz(4), a.timestamptz(5));
    if let (Some(s), Some(e)) = (a.timestamptz_micros(3), a.timestamptz_micros(4)) {
        if e < s {
            return Err(BillingError::invalid_with_hint(
                "p_current_period_end is before p_current_period_start",
                format!("the period starts {} and ends {}", validate::iso_utc(s), validate::iso_utc(e)),
            ));
        }
    }
    let cancel = a.boolean(6).unwrap_or(false);
    let (pv, ps, ev) = (a.text(7), a.text(8), a.text(9));
    let provider = validate::key("p_provider", pv.as_deref())?;
    let provider_sub = validate::key("p_provider_subscription_id", ps.as_deref())?;
    let event_id = validate::key("p_event_id", ev.as_deref())?;
    let event_at = a.timestamptz(10);

    Spi::connect_mut(|c| {
        let monthly = plan_monthly_credits(c, &plan)?;
        if let Some(ev) = event_id {
            if !webhooks::record(c, ev, "subscription", Some(&user))? {
                return Ok(json!({"applied": false, "reason": "duplicate_event", "event_id": ev}));
            }
        }
        crate::api::lock_account(c, &user)?;
        let lock = spi::write(c, LOCK, &[UUID, TIMESTAMPTZ, TIMESTAMPTZ, TIMESTAMPTZ], &[uuid_arg(&user), event_at.into(), start.into(), end.into()])?;
        let (stale, new_period, granted_so_far, end_before) = if lock.is_empty() {
            // A new subscription without a period start starts now.
            // SAFETY: reads the transaction's start time (now()).
            let now = unsafe { pgrx::pg_sys::GetCurrentTransactionStartTimestamp() };
            let early = matches!((a.timestamptz_micros(3), a.timestamptz_micros(4)), (None, Some(e)) if e < now);
            (false, true, 0, early.then(|| validate::iso_utc(now)))
        } else {
            let l = lock.first();
            (col::<bool>(&l, 1)?.unwrap_or(false), col::<bool>(&l, 2)?.unwrap_or(false), col::<i64>(&l, 3)?.unwrap_or(0), col::<String>(&l, 4)?)
        };
        let (grant, granted_after) = plans::period_grant(new_period, &status, monthly, granted_so_far);
        let log = |c: &mut SpiClient<'_>, applied: bool, reason: &str| {
            spi::write(
                c,
                LOG_EVENT,
                &[UUID, TEXT, TIMESTAMPTZ, BOOL, TEXT, TEXT, TEXT],
                &[uuid_arg(&user), event_id.into(), event_at.into(), applied.into(), reason.into(), plan.as_str().into(), status.as_str().into()],
            )
            .map(|_| ())
        };
        if stale {
            log(c, false, "stale")?;
            return Ok(json!({"applied": false, "reason": "stale_event"}));
        }
        if let Some(start) = end_before {
            return Err(BillingError::invalid_with_hint(
                "p_current_period_end is before the period start",
                format!("p_current_period_start is NULL, so the period starts {start} (the stored start, or now for a new subscription); pass p_current_period_start"),
            ));
        }
        let before = crate::api::events::subscription_state(c, &user)?;
        let t = spi::write(
            c,
            UPSERT,
            &[UUID, TEXT, TEXT, TIMESTAMPTZ, TIMESTAMPTZ, TIMESTAMPTZ, BOOL, TEXT, TEXT, TEXT, TIMESTAMPTZ, INT8, TIMESTAMPTZ],
            &[
                uuid_arg(&user), plan.as_str().into(), status.as_str().into(), start.into(), end.into(), trial.into(),
                cancel.into(), provider.into(), provider_sub.into(), event_id.into(), event_at.into(), granted_after.into(),
                spi::tx_today_now()?.1.into(),
            ],
        )?;
        if t.is_empty() {
            // A newer event was applied concurrently between the lock and the upsert.
            log(c, false, "stale")?;
            return Ok(json!({"applied": false, "reason": "stale_event"}));
        }
        let t = t.first();
        let id = col::<pgrx::Uuid>(&t, 1)?.map(|u| uuid_text(u.as_bytes()));
        let effective = effective_plan(c, &t, 2)?;
        crate::api::events::subscription_written(c, &user, before)?;
        log(c, true, "applied")?;
        let granted = match grant {
            PeriodGrant::None => 0,
            PeriodGrant::Renew(n) => {
                credits::renew(c, &user, n, end, None)?;
                n
            }
            PeriodGrant::TopUp(n) => {
                let why = format!("plan changed to {plan} within the period");
                credits::grant(c, &user, Pool::Subscription, n, "plan_upgrade", Some(&why), None, None)?;
                n
            }
        };
        Ok(json!({
            "applied": true,
            "reason": "applied",
            "subscription_id": id,
            "user_id": uuid_text(&user),
            "plan_id": plan,
            "status": status,
            "effective_plan": effective,
            "credits_granted": granted,
        }))
    })
    .map(Ret::Json)
}
crate::billing_fn!(pg_finfo_pgb_upsert_subscription, pgb_upsert_subscription, upsert_subscription);

/// process_expired_subscriptions()
fn process_expired_subscriptions(_a: &Args) -> BResult<Ret> {
    security::require_service("process_expired_subscriptions")?;
    Spi::connect_mut(|c| {
        let due = spi::uuid_column(spi::write(c, DUE, &[], &[])?)?;
        let mut n = 0;
        for user in &due {
            // Lock order: the account, then the subscription. A row another transaction holds is
            // skipped (the next run takes it), so the batch never waits and cannot deadlock.
            if !crate::api::try_lock_account(c, user)? {
                continue;
            }
            let before = crate::api::events::subscription_state(c, user)?;
            let t = spi::write(c, LOCK_PAID, &[UUID], &[uuid_arg(user)])?;
            if t.is_empty() || effective_plan(c, &t.first(), 1)?.as_deref() != Some("free") {
                continue;
            }
            spi::write(c, EXPIRE_ONE, &[UUID, TIMESTAMPTZ], &[uuid_arg(user), spi::tx_today_now()?.1.into()])?;
            crate::api::events::subscription_written(c, user, before)?;
            n += 1;
            match credits::expire(c, user, Some("subscription expired"), None) {
                Ok(_) | Err(BillingError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    })
    .map(Ret::Int)
}
crate::billing_fn!(pg_finfo_pgb_process_expired_subscriptions, pgb_process_expired_subscriptions, process_expired_subscriptions);

