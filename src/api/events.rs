//! Events out (0.6.0; issue 15): the outbox writer, the balance and limit rules, and delivery
//! (claim_events, ack_events). The rules themselves are `pg_billing_core::events`; the table is
//! described in sql/events.sql.
//!
//! Writing: every event of a user is written under that user's account lock (step 2 of the lock
//! order in `api/mod.rs`), its id taken after the lock, so one user's events commit in id order
//! and a consumer that reads a user's events by id range never skips one.
//!
//! Balance rules cost nothing on a write to an account without one: the statements that lock an
//! account (or the fast debit's UPDATE) return whether it has a rule (`accounts.alert_threshold`),
//! and only then is the account watched: when the outermost pg_billing call returns,
//! [`scope`] runs [`BALANCE_CHECK`] for each watched account, in the same transaction and under
//! the lock it still holds. Limit rules are known per backend ([`limit_rules_exist`], reset by a
//! relcache invalidation that set_limit_alert sends), so usage recording without rules runs no
//! extra statement either.
//!
//! Delivery: a consumer discovers events by transaction horizon (every event of a transaction
//! older than the oldest one still running is final), keeps one cursor per user, and claims the
//! cursors it hands out FOR UPDATE SKIP LOCKED, so a user's events are in one claim at a time.
//! On a Citus cluster (billing.events distributed) claims and acks take [`cluster`] instead: no
//! transaction-id horizon, one statement per shard.

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicI8, Ordering};

use pg_billing_core::events::{self as ev, AlertState};
use pg_billing_core::BillingError;
use pgrx::pg_sys;
use pgrx::spi::{Spi, SpiClient};
use serde_json::{json, Value};

use crate::boundary::{Args, BResult, Ret};
use crate::security;
use crate::spi::{self, col, uuid_arg, uuid_text, OrInternal, INT4, INT8, JSONB, TEXT, TIMESTAMPTZ, UUID};
use crate::validate;

// ---------------------------------------------------------------------------------------------
// Writing events
// ---------------------------------------------------------------------------------------------

const EMIT: &str = "SELECT billing._emit_event($1, $2, $3)";

/// Write one event for `user`. The caller holds the user's account lock.
pub fn emit(c: &mut SpiClient<'_>, user: &[u8; 16], event_type: &str, payload: Value) -> BResult<()> {
    spi::write(c, EMIT, &[UUID, TEXT, JSONB], &[uuid_arg(user), event_type.into(), pgrx::JsonB(payload).into()])?;
    Ok(())
}

thread_local! {
    /// Accounts the current call wrote to that have a balance rule, or are new (their rule not
    /// looked up yet: true).
    static WATCHED: RefCell<Vec<([u8; 16], bool)>> = const { RefCell::new(Vec::new()) };
    /// How deep pg_billing calls are nested (a function called from another's SQL).
    static DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// The account has a balance rule (`rule`) or is new (`new`: no rule looked up yet) and this
/// call holds its lock: check it before returning. Neither: nothing to do.
pub fn watch_if(user: &[u8; 16], rule: bool, new: bool) {
    if !rule && !new {
        return;
    }
    WATCHED.with(|w| {
        let mut w = w.borrow_mut();
        match w.iter_mut().find(|(u, _)| u == user) {
            Some(e) => e.1 |= new,
            None => w.push((*user, new)),
        }
    });
}

struct Depth;
impl Drop for Depth {
    fn drop(&mut self) {
        DEPTH.with(|d| d.set(d.get().saturating_sub(1)));
    }
}

/// Run one SQL-facing call; when the outermost call succeeds, check the balance rules of the
/// accounts it watched (their locks are still held: same transaction). A call that fails leaves
/// nothing watched (its transaction, or subtransaction, is rolled back with its events).
pub fn scope<T>(body: impl FnOnce() -> BResult<T>) -> BResult<T> {
    let outermost = DEPTH.with(|d| {
        let v = d.get();
        d.set(v + 1);
        v == 0
    });
    if outermost {
        WATCHED.with(|w| w.borrow_mut().clear());
    }
    let guard = Depth;
    let r = body();
    drop(guard);
    if !outermost {
        return r;
    }
    let users = WATCHED.with(|w| std::mem::take(&mut *w.borrow_mut()));
    match r {
        Ok(v) if !users.is_empty() => {
            Spi::connect_mut(|c| users.iter().try_for_each(|(u, new)| check_balance(c, u, *new)))?;
            Ok(v)
        }
        other => other,
    }
}

/// Move an account's balance rule to the state its balance is in now, under its lock, and write
/// the events of the move. $1 user. (pg_billing_core::events::next_state, in SQL.)
const BALANCE_CHECK: &str = "
WITH cur AS (
    SELECT a.alert_state AS s, a.alert_threshold AS t, a.alert_rearm AS r,
           a.subscription_credits_balance + a.purchased_credits_balance - a.held - a.debt AS av
      FROM billing.accounts AS a
     WHERE a.user_id = $1 AND a.alert_threshold IS NOT NULL AND a.alert_state >= 0
), nxt AS (
    SELECT cur.s, cur.t, cur.r, cur.av,
           (CASE WHEN cur.av <= 0 THEN 2
                 WHEN cur.av < cur.t THEN CASE WHEN cur.s = 2 THEN 2 ELSE 1 END
                 WHEN cur.av >= cur.r THEN 0
                 ELSE cur.s END)::smallint AS n
      FROM cur
)
UPDATE billing.accounts AS a SET alert_state = nxt.n
  FROM nxt
 WHERE a.user_id = $1 AND nxt.n <> nxt.s
RETURNING nxt.s, nxt.n, nxt.av, nxt.t, nxt.r, a.subscription_credits_balance, a.purchased_credits_balance, a.held, a.debt";

/// Whose rule fired (the user's, else its plan's), read only when [`BALANCE_CHECK`] changed the
/// state (Citus allows no subquery or non-immutable function in a modification's RETURNING).
/// $1 user.
const RULE_OWNER: &str = "SELECT EXISTS (SELECT 1 FROM billing.user_balance_alerts AS u WHERE u.user_id = $1)";
/// The user's effective plan, in a statement of its own (user_effective_plan reads
/// billing.subscriptions: inside a statement on a distributed table Citus would run it on the
/// shard's node, where no distributed statement may run). $1 user.
const EFFECTIVE_PLAN: &str = "SELECT billing.user_effective_plan($1)";

fn check_balance(c: &mut SpiClient<'_>, user: &[u8; 16], new: bool) -> BResult<()> {
    if new {
        // A new account (its rule, the user's or its plan's, armed), or one whose plan changed
        // (the new plan's rule, its state from the balance as it is now, no event): SPEC 12
        // allows no trigger to do it.
        spi::write(c, SYNC, &[UUID], &[uuid_arg(user)])?;
    }
    let t = spi::write(c, BALANCE_CHECK, &[UUID], &[uuid_arg(user)])?;
    if t.is_empty() {
        return Ok(());
    }
    let t = t.first();
    let from = AlertState::from_i16(col::<i16>(&t, 1)?.unwrap_or(0));
    let to = AlertState::from_i16(col::<i16>(&t, 2)?.unwrap_or(0));
    let n = |i| col::<i64>(&t, i).map(|v| v.unwrap_or(0));
    let own = col::<bool>(&spi::write(c, RULE_OWNER, &[UUID], &[uuid_arg(user)])?.first(), 1)?.unwrap_or(false);
    let plan = col::<String>(&spi::write(c, EFFECTIVE_PLAN, &[UUID], &[uuid_arg(user)])?.first(), 1)?;
    let payload = json!({
        "available": n(3)?,
        "threshold": n(4)?,
        "rearm_at": n(5)?,
        "subscription_credits_balance": n(6)?,
        "purchased_credits_balance": n(7)?,
        "held": n(8)?,
        "debt": n(9)?,
        "rule": if own { "user" } else { "plan" },
        "plan_id": plan,
    });
    for e in ev::transition_events(from, to) {
        emit(c, user, e, payload.clone())?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// subscription.changed
// ---------------------------------------------------------------------------------------------

/// A subscription as subscription.changed compares and reports it. $1 user.
const SUBSCRIPTION: &str = "
SELECT pg_catalog.jsonb_build_object(
         'plan_id', s.plan_id, 'status', s.status,
         'current_period_start', pg_catalog.to_char(s.current_period_start AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),
         'current_period_end', pg_catalog.to_char(s.current_period_end AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),
         'trial_ends_at', pg_catalog.to_char(s.trial_ends_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),
         'expires_at', pg_catalog.to_char(s.expires_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')),
       s.plan_id, s.status, s.current_period_end, s.trial_ends_at, s.expires_at
  FROM billing.subscriptions AS s WHERE s.user_id = $1";
const ANY_PLAN_RULE: &str = "SELECT EXISTS (SELECT 1 FROM billing.plan_balance_alerts)";
const SUBSCRIPTION_FIELDS: [&str; 6] = ["plan_id", "status", "current_period_start", "current_period_end", "trial_ends_at", "expires_at"];

/// The user's subscription now (None: none), for [`subscription_written`]. The caller holds the
/// account lock.
pub fn subscription_state(c: &mut SpiClient<'_>, user: &[u8; 16]) -> BResult<Option<Value>> {
    let t = spi::write(c, SUBSCRIPTION, &[UUID], &[uuid_arg(user)])?;
    if t.is_empty() {
        return Ok(None);
    }
    let t = t.first();
    let Some(mut v) = col::<pgrx::JsonB>(&t, 1)?.map(|j| j.0) else { return Ok(None) };
    // (its own statement: see plans::EFFECTIVE)
    v["effective_plan_id"] = json!(crate::api::plans::effective_plan(c, &t, 2)?);
    Ok(Some(v))
}

/// After a write to the user's subscription (`before`: [`subscription_state`] before it; the
/// account lock held throughout): subscription.changed when its plan, status or dates changed,
/// and the user moves to the new plan's balance rule. Every path that writes a subscription calls
/// this (SPEC 12 allows no triggers on billing tables).
pub fn subscription_written(c: &mut SpiClient<'_>, user: &[u8; 16], before: Option<Value>) -> BResult<()> {
    let Some(mut after) = subscription_state(c, user)? else { return Ok(()) };
    if let Some(b) = &before {
        if SUBSCRIPTION_FIELDS.iter().all(|k| b[k] == after[k]) {
            return Ok(());
        }
    }
    after["previous_plan_id"] = before.as_ref().map(|b| b["plan_id"].clone()).unwrap_or(Value::Null);
    after["previous_status"] = before.as_ref().map(|b| b["status"].clone()).unwrap_or(Value::Null);
    emit(c, user, "subscription.changed", after)?;
    // The new plan's rule is looked up when the call ends (with the balance the call leaves:
    // credits a renewal grants in this call fire nothing, they are where the rule starts from).
    if col::<bool>(&spi::write(c, ANY_PLAN_RULE, &[], &[])?.first(), 1)?.unwrap_or(false) {
        watch_if(user, false, true);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Balance rules
// ---------------------------------------------------------------------------------------------

const PLAN_EXISTS: &str = "SELECT 1 FROM billing.plans AS p WHERE p.plan_id = $1";
const PLAN_IDS: &str = "SELECT COALESCE(pg_catalog.string_agg(p.plan_id, ', ' ORDER BY p.plan_id), '(none)') FROM billing.plans AS p";

/// $1 user, $2 threshold, $3 hysteresis (numeric as text), $4 now() (Citus takes no now() in
/// ON CONFLICT ... SET). Returns the re-arm level.
const SET_USER_RULE: &str = "
INSERT INTO billing.user_balance_alerts AS u (user_id, threshold, hysteresis) VALUES ($1, $2, $3::numeric)
ON CONFLICT (user_id) DO UPDATE SET threshold = EXCLUDED.threshold, hysteresis = EXCLUDED.hysteresis, updated_at = $4
RETURNING pg_catalog.ceil(u.threshold * (1 + u.hysteresis))::bigint";
const DROP_USER_RULE: &str = "DELETE FROM billing.user_balance_alerts AS u WHERE u.user_id = $1";
/// $1 plan, $2 threshold, $3 hysteresis (numeric as text), $4 now().
const SET_PLAN_RULE: &str = "
INSERT INTO billing.plan_balance_alerts AS p (plan_id, threshold, hysteresis) VALUES ($1, $2, $3::numeric)
ON CONFLICT (plan_id) DO UPDATE SET threshold = EXCLUDED.threshold, hysteresis = EXCLUDED.hysteresis, updated_at = $4
RETURNING pg_catalog.ceil(p.threshold * (1 + p.hysteresis))::bigint";
const DROP_PLAN_RULE: &str = "DELETE FROM billing.plan_balance_alerts AS p WHERE p.plan_id = $1";
const SYNC: &str = "SELECT billing._sync_balance_alerts($1)";
const HYSTERESIS_IN_RANGE: &str = "SELECT $1::numeric BETWEEN 0 AND 10";

fn require_plan(c: &mut SpiClient<'_>, plan: &str) -> BResult<()> {
    if spi::write(c, PLAN_EXISTS, &[TEXT], &[plan.into()])?.is_empty() {
        let known = col::<String>(&spi::write(c, PLAN_IDS, &[], &[])?.first(), 1)?.unwrap_or_default();
        return Err(BillingError::NotFound {
            message: format!("plan \"{}\" does not exist", pg_billing_core::plans::truncate(plan, 64)),
            hint: Some(format!("known plans: {known}")),
        });
    }
    Ok(())
}

/// set_balance_alert(p_threshold, p_user_id, p_plan_id, p_hysteresis)
fn set_balance_alert(a: &Args) -> BResult<Ret> {
    security::require_service("set_balance_alert")?;
    let threshold = ev::threshold(a.bigint(0))?;
    let user = a.uuid(1);
    let plan = a.text(2);
    let hysteresis_text = a.numeric_text(3);
    let hysteresis = ev::hysteresis(match &hysteresis_text {
        Some(h) => Some(h.parse::<f64>().unwrap_or(f64::NAN)),
        None => None,
    })?;
    let h = hysteresis_text.unwrap_or_default();
    // (The float check above reads the decimal approximately; the exact bound is checked in SQL.)
    let exact = Spi::connect_mut(|c| col::<bool>(&spi::write(c, HYSTERESIS_IN_RANGE, &[TEXT], &[h.as_str().into()])?.first(), 1))?;
    if exact != Some(true) {
        ev::hysteresis(Some(f64::NAN))?;
    }
    if user.is_some() == plan.is_some() {
        return Err(BillingError::invalid_with_hint(
            "pass exactly one of p_user_id and p_plan_id",
            "a user's rule overrides the rule of the user's plan",
        ));
    }
    Spi::connect_mut(|c| {
        let (rearm, who) = if let Some(user) = user {
            crate::api::lock_account(c, &user)?;
            let rearm = match threshold {
                Some(t) => col::<i64>(&spi::write(c, SET_USER_RULE, &[UUID, INT8, TEXT, TIMESTAMPTZ], &[uuid_arg(&user), t.into(), h.as_str().into(), spi::tx_today_now()?.1.into()])?.first(), 1)?,
                None => {
                    spi::write(c, DROP_USER_RULE, &[UUID], &[uuid_arg(&user)])?;
                    None
                }
            };
            (rearm, json!({"user_id": uuid_text(&user)}))
        } else {
            let plan = plan.unwrap_or_default();
            require_plan(c, &plan)?;
            let rearm = match threshold {
                Some(t) => col::<i64>(&spi::write(c, SET_PLAN_RULE, &[TEXT, INT8, TEXT, TIMESTAMPTZ], &[plan.as_str().into(), t.into(), h.as_str().into(), spi::tx_today_now()?.1.into()])?.first(), 1)?,
                None => {
                    spi::write(c, DROP_PLAN_RULE, &[TEXT], &[plan.as_str().into()])?;
                    None
                }
            };
            (rearm, json!({"plan_id": plan}))
        };
        let accounts = col::<i32>(&spi::write(c, SYNC, &[UUID], &[user.as_ref().map(|u| pgrx::Uuid::from_bytes(*u)).into()])?.first(), 1)?;
        let mut v = who;
        v["threshold"] = json!(threshold);
        v["hysteresis"] = if threshold.is_some() { json!(hysteresis) } else { Value::Null };
        v["rearm_at"] = json!(rearm);
        v["accounts"] = json!(accounts.unwrap_or(0));
        Ok(v)
    })
    .map(Ret::Json)
}
crate::billing_fn!(pg_finfo_pgb_set_balance_alert, pgb_set_balance_alert, set_balance_alert);

// ---------------------------------------------------------------------------------------------
// Limit rules
// ---------------------------------------------------------------------------------------------

/// Whether any limit rule exists, as this backend last read it: -1 unknown, 0 no, 1 yes. Reset by
/// any relcache invalidation; set_limit_alert sends one for billing.limit_alerts.
static LIMIT_RULES: AtomicI8 = AtomicI8::new(-1);

// Called by PostgreSQL's invalidation processing; it only stores an atomic, so it cannot raise.
unsafe extern "C-unwind" fn reset_limit_rules(_arg: pg_sys::Datum, _relid: pg_sys::Oid) {
    LIMIT_RULES.store(-1, Ordering::Relaxed);
}

/// Register the invalidation callback (from _PG_init).
pub fn init() {
    // SAFETY: called once from _PG_init; the callback only stores an atomic.
    unsafe { pg_sys::CacheRegisterRelcacheCallback(Some(reset_limit_rules), pg_sys::Datum::from(0)) };
}

const ANY_LIMIT_RULE: &str = "SELECT EXISTS (SELECT 1 FROM billing.limit_alerts)";
const LIMIT_RULES_OID: &str = "SELECT 'billing.limit_alerts'::pg_catalog.regclass::pg_catalog.oid";

pub fn limit_rules_exist(c: &mut SpiClient<'_>) -> BResult<bool> {
    match LIMIT_RULES.load(Ordering::Relaxed) {
        0 => Ok(false),
        1 => Ok(true),
        _ => {
            let yes = col::<bool>(&spi::write(c, ANY_LIMIT_RULE, &[], &[])?.first(), 1)?.unwrap_or(false);
            LIMIT_RULES.store(i8::from(yes), Ordering::Relaxed);
            Ok(yes)
        }
    }
}

/// Whether any limit rule exists, read now, not from the backend's cache: on a Citus worker the
/// rules are a reference table's placement, and set_limit_alert's invalidation (sent on the
/// coordinator) never reaches the worker's backends (the delegated recorders read this).
pub fn limit_rules_exist_now(c: &mut SpiClient<'_>) -> BResult<bool> {
    Ok(col::<bool>(&spi::write(c, ANY_LIMIT_RULE, &[], &[])?.first(), 1)?.unwrap_or(false))
}

const RESOURCE_TYPE_EXISTS: &str = "SELECT 1 FROM billing.resource_types AS r WHERE r.resource_type = $1";
const ADD_LIMIT_RULE: &str = "
INSERT INTO billing.limit_alerts (metric, percent, plan_id) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING";
const DROP_LIMIT_RULE: &str = "DELETE FROM billing.limit_alerts AS l WHERE l.metric = $1 AND l.percent = $2 AND l.plan_id = $3";

/// set_limit_alert(p_metric, p_percent, p_plan_id, p_enabled)
fn set_limit_alert(a: &Args) -> BResult<Ret> {
    security::require_service("set_limit_alert")?;
    let metric = validate::required("p_metric", a.text(0))?;
    let percent = ev::percent(a.int(1))?;
    let plan = a.text(2);
    let enabled = validate::required("p_enabled", a.boolean(3))?;
    Spi::connect_mut(|c| {
        if !ev::is_monthly_metric(&metric) && spi::write(c, RESOURCE_TYPE_EXISTS, &[TEXT], &[metric.as_str().into()])?.is_empty() {
            return Err(BillingError::invalid_with_hint(
                format!("p_metric \"{}\" is neither a monthly metric nor a registered resource type", pg_billing_core::plans::truncate(&metric, 64)),
                format!(
                    "monthly metrics: {}; resource types are registered with billing.register_resource",
                    ev::MONTHLY_METRICS.iter().map(|(m, _, _)| *m).collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        if let Some(p) = &plan {
            require_plan(c, p)?;
        }
        let key = plan.clone().unwrap_or_default();
        let sql = if enabled { ADD_LIMIT_RULE } else { DROP_LIMIT_RULE };
        spi::write(c, sql, &[TEXT, INT4, TEXT], &[metric.as_str().into(), percent.into(), key.as_str().into()])?;
        // Every backend reads the rules again (their cached "no rule" would miss this one).
        let oid = col::<pg_sys::Oid>(&spi::write(c, LIMIT_RULES_OID, &[], &[])?.first(), 1)?
            .ok_or_else(|| BillingError::internal("billing.limit_alerts is missing"))?;
        // SAFETY: a transactional invalidation of an existing relation, sent at commit.
        unsafe { pg_sys::CacheInvalidateRelcacheByRelid(oid) };
        LIMIT_RULES.store(-1, Ordering::Relaxed);
        Ok(json!({"metric": metric, "percent": percent, "plan_id": plan, "enabled": enabled}))
    })
    .map(Ret::Json)
}
crate::billing_fn!(pg_finfo_pgb_set_limit_alert, pgb_set_limit_alert, set_limit_alert);

/// What the monthly rules of a user are checked against, in a statement on no billing table
/// (the helpers read billing.subscriptions and billing.plans: on Citus they never run inside a
/// statement on a distributed table): the current period, the effective plan and its limits.
/// $1 user.
const MONTHLY_CONTEXT: &str = "
SELECT p.period_start, p.period_end, billing.user_effective_plan($1), billing.user_plan_limits($1)
  FROM billing.current_usage_period($1) AS p";

/// The monthly rules of a user's plan with the limit and this period's usage, after a record
/// (pg_billing_core::events::MONTHLY_METRICS names the same keys and columns). $1 user, $2 plan,
/// $3 its limits, $4 period start, $5 period end ([`MONTHLY_CONTEXT`]).
const MONTHLY_RULES: &str = "
SELECT DISTINCT ON (l.metric, l.percent) l.metric, l.percent, $2::text,
       billing.limit_value($3, CASE l.metric WHEN 'messages' THEN 'messages_per_month'
                                             WHEN 'conversations' THEN 'conversations_per_month'
                                             WHEN 'tokens_input' THEN 'tokens_input_per_month'
                                             WHEN 'tokens_output' THEN 'tokens_output_per_month'
                                             WHEN 'documents' THEN 'documents_per_month'
                                             WHEN 'generations' THEN 'generations_per_month' END),
       COALESCE(CASE l.metric WHEN 'messages' THEN u.messages_count
                              WHEN 'conversations' THEN u.conversations_count
                              WHEN 'tokens_input' THEN u.tokens_input_count
                              WHEN 'tokens_output' THEN u.tokens_output_count
                              WHEN 'documents' THEN u.documents_processed_count
                              WHEN 'generations' THEN u.generations_count END, 0)::bigint,
       $4::timestamptz, $5::timestamptz
  FROM billing.limit_alerts AS l
  LEFT JOIN billing.usage_metrics AS u ON u.user_id = $1 AND u.period_start = $4
 WHERE l.metric IN ('messages', 'conversations', 'tokens_input', 'tokens_output', 'documents', 'generations')
   AND (l.plan_id = '' OR l.plan_id = $2)
 ORDER BY l.metric, l.percent";

/// The rules of one resource type for a user's plan. $1 user, $2 type.
const RESOURCE_RULES: &str = "
SELECT DISTINCT l.percent, pl.plan_id
  FROM billing.limit_alerts AS l CROSS JOIN (SELECT billing.user_effective_plan($1) AS plan_id) AS pl
 WHERE l.metric = $2 AND (l.plan_id = '' OR l.plan_id = pl.plan_id)
 ORDER BY l.percent";

/// The rule's open state (fired, not cleared): whether it fired in period $4. $1 user, $2 metric,
/// $3 percent.
const RULE_OPEN: &str = "
SELECT s.period_start = $4, pg_catalog.to_char(s.period_start AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')
  FROM billing.limit_alert_state AS s
 WHERE s.user_id = $1 AND s.metric = $2 AND s.percent = $3 AND s.reached_at IS NOT NULL AND s.cleared_at IS NULL";
const RULE_CLEAR: &str = "
UPDATE billing.limit_alert_state AS s SET cleared_at = pg_catalog.now()
 WHERE s.user_id = $1 AND s.metric = $2 AND s.percent = $3";
const RULE_REACH: &str = "
INSERT INTO billing.limit_alert_state AS s (user_id, metric, percent, period_start, reached_at)
VALUES ($1, $2, $3, $4, pg_catalog.now())
ON CONFLICT (user_id, metric, percent) DO UPDATE
   SET period_start = EXCLUDED.period_start, reached_at = EXCLUDED.reached_at, cleared_at = NULL";

/// One limit rule evaluated against usage.
struct LimitEval {
    metric: String,
    percent: i32,
    plan_id: Option<String>,
    limit: i64,
    used: i64,
    /// The period (monthly metrics); None for a resource count.
    period: Option<(pgrx::datum::TimestampWithTimeZone, pgrx::datum::TimestampWithTimeZone)>,
}

fn iso(t: Option<pgrx::datum::TimestampWithTimeZone>) -> Value {
    t.map(|t| {
        let micros: pg_sys::TimestampTz = t.into();
        Value::String(validate::iso_utc(micros))
    })
    .unwrap_or(Value::Null)
}

/// Apply one rule (the caller holds the account lock): limit.cleared and limit.reached.
fn apply_limit(c: &mut SpiClient<'_>, user: &[u8; 16], r: &LimitEval) -> BResult<()> {
    let period_start = match r.period {
        Some((s, _)) => s,
        None => pgrx::datum::TimestampWithTimeZone::negative_infinity(),
    };
    let t = spi::write(
        c,
        RULE_OPEN,
        &[UUID, TEXT, INT4, spi::TIMESTAMPTZ],
        &[uuid_arg(user), r.metric.as_str().into(), r.percent.into(), period_start.into()],
    )?;
    let (open, open_period) = if t.is_empty() {
        (None, Value::Null)
    } else {
        let t = t.first();
        (Some(col::<bool>(&t, 1)?.unwrap_or(false)), col::<String>(&t, 2)?.map(Value::String).unwrap_or(Value::Null))
    };
    let fire = ev::fire_at(r.limit, r.percent);
    let step = ev::limit_step(r.used, fire, open);
    let payload = |period: Value, end: Value| {
        json!({
            "metric": r.metric,
            "percent": r.percent,
            "plan_id": r.plan_id,
            "limit_value": r.limit,
            "current_usage": r.used,
            "threshold_value": fire,
            "period_start": period,
            "period_end": end,
        })
    };
    let args = [uuid_arg(user), r.metric.as_str().into(), r.percent.into()];
    if step.clear {
        spi::write(c, RULE_CLEAR, &[UUID, TEXT, INT4], &args)?;
        let same = open == Some(true);
        let end = if same { r.period.map(|(_, e)| iso(Some(e))).unwrap_or(Value::Null) } else { Value::Null };
        emit(c, user, "limit.cleared", payload(if r.period.is_some() { open_period } else { Value::Null }, end))?;
    }
    if step.reach {
        spi::write(
            c,
            RULE_REACH,
            &[UUID, TEXT, INT4, spi::TIMESTAMPTZ],
            &[uuid_arg(user), r.metric.as_str().into(), r.percent.into(), period_start.into()],
        )?;
        let (s, e) = match r.period {
            Some((s, e)) => (iso(Some(s)), iso(Some(e))),
            None => (Value::Null, Value::Null),
        };
        emit(c, user, "limit.reached", payload(s, e))?;
    }
    Ok(())
}

/// After a usage record (the caller locked the account first): the monthly rules.
pub fn check_monthly_limits(c: &mut SpiClient<'_>, user: &[u8; 16]) -> BResult<()> {
    let mut rules = Vec::new();
    let t = spi::write(c, MONTHLY_CONTEXT, &[UUID], &[uuid_arg(user)])?;
    let t = t.first();
    let (start, end) = (col::<pgrx::datum::TimestampWithTimeZone>(&t, 1)?, col::<pgrx::datum::TimestampWithTimeZone>(&t, 2)?);
    let (plan, limits) = (col::<String>(&t, 3)?, col::<pgrx::JsonB>(&t, 4)?);
    let args = [uuid_arg(user), plan.into(), limits.into(), start.into(), end.into()];
    for row in spi::write(c, MONTHLY_RULES, &[UUID, TEXT, JSONB, TIMESTAMPTZ, TIMESTAMPTZ], &args)? {
        let s = row.get::<pgrx::datum::TimestampWithTimeZone>(6).or_internal()?;
        let e = row.get::<pgrx::datum::TimestampWithTimeZone>(7).or_internal()?;
        rules.push(LimitEval {
            metric: row.get::<String>(1).or_internal()?.unwrap_or_default(),
            percent: row.get::<i32>(2).or_internal()?.unwrap_or(100),
            plan_id: row.get::<String>(3).or_internal()?,
            limit: row.get::<i64>(4).or_internal()?.unwrap_or(-1),
            used: row.get::<i64>(5).or_internal()?.unwrap_or(0),
            period: s.zip(e),
        });
    }
    rules.iter().try_for_each(|r| apply_limit(c, user, r))
}

/// After a resource count: the rules of that resource type. Locks the account (the caller holds
/// no other billing row lock).
pub fn check_resource_limits(c: &mut SpiClient<'_>, user: &[u8; 16], resource_type: &str, count: i64, limit: i64) -> BResult<()> {
    if !limit_rules_exist(c)? {
        return Ok(());
    }
    let mut rules = Vec::new();
    for row in spi::write(c, RESOURCE_RULES, &[UUID, TEXT], &[uuid_arg(user), resource_type.into()])? {
        rules.push(LimitEval {
            metric: resource_type.to_string(),
            percent: row.get::<i32>(1).or_internal()?.unwrap_or(100),
            plan_id: row.get::<String>(2).or_internal()?,
            limit,
            used: count,
            period: None,
        });
    }
    if rules.is_empty() {
        return Ok(());
    }
    crate::api::lock_account(c, user)?;
    rules.iter().try_for_each(|r| apply_limit(c, user, r))
}

/// rate_limit.exceeded, once per user and hourly bucket: at the first refused call that finds
/// the account free (this call holds the bucket's row, so waiting for the account could close a
/// cycle with a transaction that holds the account and waits for the bucket; a call that finds
/// the account busy leaves the event to the next refused call). $1 user, $2 bucket.
const EXCEEDED: &str = "
UPDATE billing.api_usage AS u SET exceeded_at = pg_catalog.now()
 WHERE u.user_id = $1 AND u.bucket_start = $2 AND u.exceeded_at IS NULL
RETURNING u.request_count";

pub fn rate_limit_exceeded(
    c: &mut SpiClient<'_>,
    user: &[u8; 16],
    endpoint: &str,
    limit: i32,
    bucket: pgrx::datum::TimestampWithTimeZone,
    reset_at: Option<&str>,
) -> BResult<()> {
    if !crate::api::try_lock_account(c, user)? {
        return Ok(());
    }
    // try_lock_account is also true when there is no account: make (and lock) it.
    crate::api::lock_account(c, user)?;
    let t = spi::write(c, EXCEEDED, &[UUID, spi::TIMESTAMPTZ], &[uuid_arg(user), bucket.into()])?;
    if t.is_empty() {
        return Ok(());
    }
    let count = col::<i32>(&t.first(), 1)?.unwrap_or(0);
    emit(
        c,
        user,
        "rate_limit.exceeded",
        json!({"endpoint": endpoint, "limit_value": limit, "request_count": count, "bucket_start": iso(Some(bucket)), "reset_at": reset_at}),
    )
}

// ---------------------------------------------------------------------------------------------
// Delivery
// ---------------------------------------------------------------------------------------------

/// Make the consumer at its first claim. $1 consumer. (Only when it is not there: ON CONFLICT
/// alone would wait for any claim in flight that moved the consumer's horizon.)
const CONSUMER: &str = "INSERT INTO billing.event_consumers (consumer) SELECT $1 WHERE NOT EXISTS (SELECT 1 FROM billing.event_consumers AS k WHERE k.consumer = $1) ON CONFLICT DO NOTHING";

/// Events restored from a dump of another cluster carry that cluster's transaction ids, which
/// may lie ahead of this one's: they are final, so mark them so (tx 0), and start a consumer whose
/// horizon lies ahead again from 0 (discovery is idempotent: acknowledged events stay so).
const RESTORED_EVENTS: &str = "
UPDATE billing.events AS e SET tx = '0' WHERE e.tx >= pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot())";
const RESTORED_CONSUMERS: &str = "
UPDATE billing.event_consumers AS k SET horizon = '0' WHERE k.horizon > pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot())";

/// Discover the events of the transactions that finished since the consumer's horizon: make or
/// move each user's cursor, and move the horizon to the oldest transaction still running. One
/// worker of a consumer discovers at a time (the consumer row, taken SKIP LOCKED: the others claim
/// from the cursors as they are). $1 consumer.
const DISCOVER: &str = "
WITH k AS (
    SELECT k.horizon FROM billing.event_consumers AS k WHERE k.consumer = $1 FOR UPDATE SKIP LOCKED
), h AS (
    SELECT pg_catalog.pg_snapshot_xmin(pg_catalog.pg_current_snapshot()) AS upto
), found AS (
    SELECT e.user_id, pg_catalog.max(e.id) AS last, pg_catalog.min(e.id) AS first
      FROM billing.events AS e, k, h
     WHERE e.tx >= k.horizon AND e.tx < h.upto
     GROUP BY e.user_id
), cur AS (
    INSERT INTO billing.event_cursors AS c (user_id, consumer, last_event_id, pending_from)
    SELECT found.user_id, $1, found.last, found.first FROM found ORDER BY found.user_id
    ON CONFLICT (user_id, consumer) DO UPDATE
       SET last_event_id = EXCLUDED.last_event_id,
           pending_from = CASE WHEN c.last_event_id > c.acked_id THEN c.pending_from
                               ELSE GREATEST(EXCLUDED.pending_from, c.acked_id + 1) END
     WHERE EXCLUDED.last_event_id > c.last_event_id
)
UPDATE billing.event_consumers AS k SET horizon = h.upto
  FROM h
 WHERE k.consumer = $1 AND EXISTS (SELECT 1 FROM k AS locked) AND k.horizon < h.upto";

/// Hand out up to $2 events of the users whose cursors are free, oldest pending first. $1
/// consumer, $2 limit, $3 claim id, $4 visibility timeout in microseconds.
const CLAIM: &str = "
WITH cur AS (
    SELECT c.user_id, c.acked_id, c.last_event_id, c.deliveries, c.handed_up_to
      FROM billing.event_cursors AS c
     WHERE c.consumer = $1 AND c.last_event_id > c.acked_id
       AND (c.claimed_until IS NULL OR c.claimed_until <= pg_catalog.clock_timestamp())
     ORDER BY c.pending_from
     LIMIT $2
       FOR UPDATE SKIP LOCKED
), ev AS (
    SELECT e.user_id, e.id, e.type, e.payload, e.created_at,
           CASE WHEN e.id <= cur.handed_up_to THEN cur.deliveries + 1 ELSE 1 END AS deliveries
      FROM cur
     CROSS JOIN LATERAL (SELECT e.user_id, e.id, e.type, e.payload, e.created_at
                           FROM billing.events AS e
                          WHERE e.user_id = cur.user_id AND e.id > cur.acked_id AND e.id <= cur.last_event_id
                          ORDER BY e.id
                          LIMIT $2) AS e
     ORDER BY e.id
     LIMIT $2
), got AS (
    SELECT ev.user_id, pg_catalog.max(ev.id) AS up_to, pg_catalog.max(ev.deliveries) AS deliveries FROM ev GROUP BY ev.user_id
), upd AS (
    UPDATE billing.event_cursors AS c
       SET claim_id = $3, claimed_up_to = got.up_to,
           claimed_until = pg_catalog.clock_timestamp() + $4::double precision * interval '1 microsecond',
           deliveries = got.deliveries,
           handed_up_to = GREATEST(c.handed_up_to, got.up_to)
      FROM got
     WHERE c.user_id = got.user_id AND c.consumer = $1
)
SELECT COALESCE(pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object(
           'claim_id', $3, 'id', ev.id, 'user_id', ev.user_id, 'type', ev.type, 'payload', ev.payload,
           'created_at', ev.created_at, 'deliveries', ev.deliveries) ORDER BY ev.id), '[]'::jsonb)
  FROM ev";

/// _claim_events(p_consumer, p_limit, p_visibility_timeout) -> jsonb; claim_events unpacks it.
fn claim_events(a: &Args) -> BResult<Ret> {
    security::require_service("claim_events")?;
    let consumer = a.text(0);
    let consumer = ev::consumer(consumer.as_deref())?.to_string();
    let limit = ev::claim_limit(a.int(1))?;
    let (m, d, us) = validate::required("p_visibility_timeout", a.interval(2))?;
    let timeout = ev::visibility_timeout(m, d, us)?;
    let claim = crate::api::credits::new_operation_id()?;
    Spi::connect_mut(|c| {
        // Insert only when missing: on a Citus cluster billing.event_consumers is a reference
        // table, where an upsert locks the whole table until commit (Citus serializes
        // non-commutative writes to replicated tables), so every claim would wait for every
        // other claim's transaction. A read takes no such lock.
        if spi::write(c, CONSUMER_EXISTS, &[TEXT], &[consumer.as_str().into()])?.is_empty() {
            spi::write(c, CONSUMER, &[TEXT], &[consumer.as_str().into()])?;
        }
        if events_distributed(c)? {
            return cluster::claim(c, &consumer, limit, &claim, timeout);
        }
        spi::write(c, RESTORED_EVENTS, &[], &[])?;
        spi::write(c, RESTORED_CONSUMERS, &[], &[])?;
        spi::write(c, DISCOVER, &[TEXT], &[consumer.as_str().into()])?;
        let t = spi::write(
            c,
            CLAIM,
            &[TEXT, INT8, UUID, INT8],
            &[consumer.as_str().into(), limit.into(), uuid_arg(&claim), timeout.into()],
        )?;
        Ok(col::<pgrx::JsonB>(&t.first(), 1)?.map(|j| j.0).unwrap_or_else(|| json!([])))
    })
    .map(Ret::Json)
}
crate::billing_fn!(pg_finfo_pgb_claim_events, pgb_claim_events, claim_events);

const CONSUMER_EXISTS: &str = "SELECT 1 FROM billing.event_consumers AS k WHERE k.consumer = $1";

/// Acknowledge claimed events up to $2 (of claim $3, or of any claim). $1 consumer. Returns how
/// many events it acknowledged. The cursors are locked in user order (as discovery makes them),
/// so an ack and a discovery never wait for each other in a cycle.
const ACK: &str = "
WITH before AS (
    SELECT c.user_id, c.acked_id AS old, c.claim_id
      FROM billing.event_cursors AS c
     WHERE c.consumer = $1 AND c.claim_id IS NOT NULL AND ($3::uuid IS NULL OR c.claim_id = $3)
       AND c.acked_id < LEAST(c.claimed_up_to, $2)
     ORDER BY c.user_id
       FOR UPDATE
), acked AS (
    UPDATE billing.event_cursors AS c
       SET acked_id      = LEAST(c.claimed_up_to, $2),
           pending_from  = GREATEST(c.pending_from, LEAST(c.claimed_up_to, $2) + 1),
           claim_id      = CASE WHEN $2 >= c.claimed_up_to THEN NULL ELSE c.claim_id END,
           claimed_until = CASE WHEN $2 >= c.claimed_up_to THEN NULL ELSE c.claimed_until END,
           -- everything ever handed out acknowledged: what comes next is new
           deliveries    = CASE WHEN LEAST(c.claimed_up_to, $2) >= c.handed_up_to THEN 0 ELSE c.deliveries END,
           handed_up_to  = CASE WHEN LEAST(c.claimed_up_to, $2) >= c.handed_up_to THEN 0 ELSE c.handed_up_to END,
           claimed_up_to = CASE WHEN $2 >= c.claimed_up_to THEN NULL ELSE c.claimed_up_to END
      FROM before
     WHERE c.user_id = before.user_id AND c.consumer = $1
       -- again on the row as it is now: a claim that took the cursor while this ack waited for
       -- its lock is another claim, and stays (the values of `before` are a copy from before the
       -- wait when the update re-checks a row another transaction changed).
       AND c.claim_id = before.claim_id AND c.acked_id < LEAST(c.claimed_up_to, $2)
    RETURNING c.user_id, before.old, c.acked_id AS new
)
SELECT pg_catalog.count(e.id)::integer
  FROM acked JOIN billing.events AS e ON e.user_id = acked.user_id AND e.id > acked.old AND e.id <= acked.new";

/// ack_events(p_consumer, p_up_to_id, p_claim_id)
fn ack_events(a: &Args) -> BResult<Ret> {
    security::require_service("ack_events")?;
    let consumer = a.text(0);
    let consumer = ev::consumer(consumer.as_deref())?.to_string();
    let up_to = validate::required("p_up_to_id", a.bigint(1))?;
    let claim = a.uuid(2);
    Spi::connect_mut(|c| {
        if spi::write(c, CONSUMER_EXISTS, &[TEXT], &[consumer.as_str().into()])?.is_empty() {
            return Err(BillingError::NotFound {
                message: format!("no event consumer is named \"{consumer}\""),
                hint: Some("a consumer is made by its first claim_events call".into()),
            });
        }
        if events_distributed(c)? {
            return cluster::ack(c, &consumer, up_to, claim.as_ref());
        }
        let t = spi::write(
            c,
            ACK,
            &[TEXT, INT8, UUID],
            &[consumer.as_str().into(), up_to.into(), claim.map(pgrx::Uuid::from_bytes).into()],
        )?;
        Ok(col::<i32>(&t.first(), 1)?.unwrap_or(0))
    })
    .map(Ret::Int)
}
crate::billing_fn!(pg_finfo_pgb_ack_events, pgb_ack_events, ack_events);

// ---------------------------------------------------------------------------------------------
// Delivery on a Citus cluster (issue 17)
// ---------------------------------------------------------------------------------------------

/// Whether Citus is installed here (pg_dist_partition exists): one catalog lookup per claim or
/// ack on a single node, which then takes the path above unchanged.
const CITUS_PRESENT: &str = "SELECT pg_catalog.to_regclass('pg_catalog.pg_dist_partition') IS NOT NULL";
/// Whether billing.distribute() has distributed billing.events (only run when Citus is there).
const EVENTS_DISTRIBUTED: &str =
    "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition AS p WHERE p.logicalrelid = 'billing.events'::pg_catalog.regclass)";

/// Whether billing.events is a Citus distributed table (then claims and acks take [`cluster`]).
fn events_distributed(c: &mut SpiClient<'_>) -> BResult<bool> {
    if !col::<bool>(&spi::read(c, CITUS_PRESENT, &[], &[])?.first(), 1)?.unwrap_or(false) {
        return Ok(false);
    }
    Ok(col::<bool>(&spi::read(c, EVENTS_DISTRIBUTED, &[], &[])?.first(), 1)?.unwrap_or(false))
}

/// Delivery when billing.events and billing.event_cursors are distributed by user_id (colocated:
/// a user's events and cursors live in one shard group).
///
/// Why not the single-node path: its discovery compares the writing transaction's id with a
/// transaction-id horizon, and on Citus the `tx` column holds the coordinator's id (Citus
/// evaluates a modification's functions there) while the row commits on a worker, after the
/// coordinator's own commit when the transaction spans two workers (two-phase commit): an event
/// could be passed by the horizon before it is visible, and be skipped. And its claim locks the
/// cursors of many users in one statement (`FOR UPDATE SKIP LOCKED` over every shard), which
/// Citus refuses ("could not run distributed query with FOR UPDATE/SHARE commands").
///
/// Here nothing depends on transaction ids. A user's events commit in id order (each is written
/// under the user's account lock, its id taken after the lock), so the user's visible events
/// above what the consumer acknowledged are always a gap-free run: an event of a transaction in
/// flight is invisible until it commits and is found by the first claim after that; one of a
/// rolled-back transaction is never visible.
///
/// A claim (1) reads, over every shard without locking, the first `p_limit` events by id of the
/// users whose cursor is free (or who have none yet); (2) groups those users by shard and, shard
/// after shard in shard-id order, makes their missing cursors and then claims with one statement
/// routed to that shard: the free cursors `FOR UPDATE SKIP LOCKED`, their events up to the
/// largest id of step 1, and the cursors' claim; (3) while it has room and other claims in flight
/// held some of those cursors, repeats (1) and (2) past the users it tried, for users that have a
/// cursor (at most [`ROUNDS`] rounds); (4) returns every round's events in id order.
/// An ack finds the cursors of the claim without locking, then acknowledges shard by shard in
/// shard-id order, each statement locking its cursors in user order. Every lock a claim or an ack
/// waits for is taken in that one order (shard id, then user) and claims skip locked cursors, so
/// they never wait for each other in a cycle.
mod cluster {
    use super::*;

    const UUID_ARRAY: pgrx::pg_sys::PgOid = pgrx::pg_sys::PgOid::BuiltIn(pg_sys::BuiltinOid::UUIDARRAYOID);
    const BOOL_ARRAY: pgrx::pg_sys::PgOid = pgrx::pg_sys::PgOid::BuiltIn(pg_sys::BuiltinOid::BOOLARRAYOID);

    /// The first $2 unacknowledged events by id of the users whose cursor of consumer $1 is not
    /// in a live claim at $3 (the clock), but users $4 (tried already), and whether the user has a
    /// cursor yet. Every shard, no locks.
    const CANDIDATES: &str = "
SELECT e.user_id, e.id, c.user_id IS NULL
  FROM billing.events AS e
  LEFT JOIN billing.event_cursors AS c ON c.user_id = e.user_id AND c.consumer = $1
 WHERE e.id > COALESCE(c.acked_id, 0)
   AND (c.claimed_until IS NULL OR c.claimed_until <= $3)
   AND NOT (e.user_id = ANY ($4))
 ORDER BY e.id
 LIMIT $2";

    /// Users $1 (with flags $2: needs a cursor) by the shard of billing.event_cursors they live
    /// in, in shard-id order: (shard, users, users needing a cursor). Runs on the coordinator.
    const BY_SHARD: &str = "
SELECT x.s, pg_catalog.array_agg(x.u ORDER BY x.u), pg_catalog.array_agg(x.u ORDER BY x.u) FILTER (WHERE x.n)
  FROM (SELECT t.u, t.n, pg_catalog.get_shard_id_for_distribution_column('billing.event_cursors', t.u) AS s
          FROM ROWS FROM (pg_catalog.unnest($1::uuid[]), pg_catalog.unnest($2::boolean[])) AS t (u, n)) AS x
 GROUP BY x.s
 ORDER BY x.s";

    /// Cursors of consumer $1 for users $2 (one shard's), in user order.
    const NEW_CURSORS: &str = "
INSERT INTO billing.event_cursors AS c (user_id, consumer)
SELECT t.u, $1 FROM pg_catalog.unnest($2::uuid[]) AS t (u) ORDER BY t.u
ON CONFLICT (user_id, consumer) DO NOTHING";

    /// The claim on one shard: users $5 (all in that shard), events up to id $6, at most $2 of
    /// them, as claim $3 for $4 microseconds from $7 (the clock). As the single-node CLAIM.
    const CLAIM: &str = "
WITH cur AS (
    SELECT c.user_id, c.acked_id, c.deliveries, c.handed_up_to
      FROM billing.event_cursors AS c
     WHERE c.consumer = $1 AND c.user_id = ANY ($5)
       AND (c.claimed_until IS NULL OR c.claimed_until <= $7)
     ORDER BY c.user_id
       FOR UPDATE SKIP LOCKED
), ev AS (
    SELECT e.user_id, e.id, e.type, e.payload, e.created_at,
           CASE WHEN e.id <= cur.handed_up_to THEN cur.deliveries + 1 ELSE 1 END AS deliveries
      FROM cur JOIN billing.events AS e ON e.user_id = cur.user_id AND e.id > cur.acked_id AND e.id <= $6
     WHERE e.user_id = ANY ($5)
     ORDER BY e.id
     LIMIT $2
), got AS (
    SELECT ev.user_id, pg_catalog.max(ev.id) AS up_to, pg_catalog.max(ev.deliveries) AS deliveries FROM ev GROUP BY ev.user_id
), upd AS (
    UPDATE billing.event_cursors AS c
       SET claim_id = $3, claimed_up_to = got.up_to,
           claimed_until = $7 + $4::double precision * interval '1 microsecond',
           deliveries = got.deliveries,
           handed_up_to = GREATEST(c.handed_up_to, got.up_to),
           last_event_id = GREATEST(c.last_event_id, got.up_to)
      FROM got
     WHERE c.user_id = got.user_id AND c.consumer = $1 AND c.user_id = ANY ($5)
)
SELECT COALESCE(pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object(
           'claim_id', $3, 'id', ev.id, 'user_id', ev.user_id, 'type', ev.type, 'payload', ev.payload,
           'created_at', ev.created_at, 'deliveries', ev.deliveries) ORDER BY ev.id), '[]'::jsonb)
  FROM ev";

    /// The users whose cursor of consumer $1 holds claimed events up to $2 to acknowledge (of
    /// claim $3, or of any). Every shard, no locks.
    const ACK_USERS: &str = "
SELECT c.user_id, false
  FROM billing.event_cursors AS c
 WHERE c.consumer = $1 AND c.claim_id IS NOT NULL AND ($3::uuid IS NULL OR c.claim_id = $3)
   AND c.acked_id < LEAST(c.claimed_up_to, $2)";

    /// The single-node ACK on one shard: users $4 (all in that shard).
    const ACK: &str = "
WITH before AS (
    SELECT c.user_id, c.acked_id AS old, c.claim_id
      FROM billing.event_cursors AS c
     WHERE c.consumer = $1 AND c.user_id = ANY ($4) AND c.claim_id IS NOT NULL AND ($3::uuid IS NULL OR c.claim_id = $3)
       AND c.acked_id < LEAST(c.claimed_up_to, $2)
     ORDER BY c.user_id
       FOR UPDATE
), acked AS (
    UPDATE billing.event_cursors AS c
       SET acked_id      = LEAST(c.claimed_up_to, $2),
           pending_from  = GREATEST(c.pending_from, LEAST(c.claimed_up_to, $2) + 1),
           claim_id      = CASE WHEN $2 >= c.claimed_up_to THEN NULL ELSE c.claim_id END,
           claimed_until = CASE WHEN $2 >= c.claimed_up_to THEN NULL ELSE c.claimed_until END,
           deliveries    = CASE WHEN LEAST(c.claimed_up_to, $2) >= c.handed_up_to THEN 0 ELSE c.deliveries END,
           handed_up_to  = CASE WHEN LEAST(c.claimed_up_to, $2) >= c.handed_up_to THEN 0 ELSE c.handed_up_to END,
           claimed_up_to = CASE WHEN $2 >= c.claimed_up_to THEN NULL ELSE c.claimed_up_to END
      FROM before
     WHERE c.user_id = before.user_id AND c.consumer = $1 AND c.user_id = ANY ($4)
       AND c.claim_id = before.claim_id AND c.acked_id < LEAST(c.claimed_up_to, $2)
    RETURNING c.user_id, before.old, c.acked_id AS new
)
SELECT pg_catalog.count(e.id)::integer
  FROM acked JOIN billing.events AS e ON e.user_id = acked.user_id AND e.id > acked.old AND e.id <= acked.new
 WHERE e.user_id = ANY ($4)";

    type Shard = (Vec<pgrx::Uuid>, Vec<pgrx::Uuid>);

    /// Group `users` (flag: needs a cursor) by shard, in shard-id order.
    fn by_shard(c: &mut SpiClient<'_>, users: Vec<pgrx::Uuid>, flags: Vec<bool>) -> BResult<Vec<Shard>> {
        let mut out = Vec::new();
        for row in spi::read(c, BY_SHARD, &[UUID_ARRAY, BOOL_ARRAY], &[users.into(), flags.into()])? {
            let all = row.get::<Vec<pgrx::Uuid>>(2).or_internal()?.unwrap_or_default();
            let new = row.get::<Vec<pgrx::Uuid>>(3).or_internal()?.unwrap_or_default();
            out.push((all, new));
        }
        Ok(out)
    }

    /// Rounds of a claim: when other claims hold the cursors of the users a round found (claims
    /// in flight that are not committed yet, which the lock-free read cannot see), the next round
    /// looks past those users, as the single-node claim's SKIP LOCKED does in one statement.
    const ROUNDS: usize = 8;

    pub fn claim(c: &mut SpiClient<'_>, consumer: &str, limit: i64, claim: &[u8; 16], timeout: i64) -> BResult<Value> {
        let now = spi::clock()?;
        let mut events: Vec<Value> = Vec::new();
        let mut tried: Vec<pgrx::Uuid> = Vec::new();
        for round in 0..ROUNDS {
            let left = limit - events.len() as i64;
            if left <= 0 {
                break;
            }
            let mut users: Vec<pgrx::Uuid> = Vec::new();
            let mut flags: Vec<bool> = Vec::new();
            let mut seen = std::collections::HashSet::new();
            let mut up_to = 0i64;
            let excluded = tried.clone();
            for row in spi::read(c, CANDIDATES, &[TEXT, INT8, TIMESTAMPTZ, UUID_ARRAY], &[consumer.into(), left.into(), now.into(), excluded.into()])? {
                let (Some(u), Some(id)) = (row.get::<pgrx::Uuid>(1).or_internal()?, row.get::<i64>(2).or_internal()?) else { continue };
                let new = row.get::<bool>(3).or_internal()?.unwrap_or(false);
                // A user without a cursor only in the first round: making cursors may wait for
                // another claim making the same one, and every wait must come in shard order.
                if new && round > 0 {
                    continue;
                }
                up_to = up_to.max(id);
                if seen.insert(*u.as_bytes()) {
                    users.push(u);
                    flags.push(new);
                }
            }
            if users.is_empty() {
                break;
            }
            tried.extend(users.iter().copied());
            for (all, new) in by_shard(c, users, flags)? {
                let left = limit - events.len() as i64;
                if left <= 0 {
                    break;
                }
                if !new.is_empty() {
                    spi::write(c, NEW_CURSORS, &[TEXT, UUID_ARRAY], &[consumer.into(), new.into()])?;
                }
                let t = spi::write(
                    c,
                    CLAIM,
                    &[TEXT, INT8, UUID, INT8, UUID_ARRAY, INT8, TIMESTAMPTZ],
                    &[consumer.into(), left.into(), uuid_arg(claim), timeout.into(), all.into(), up_to.into(), now.into()],
                )?;
                if let Some(Value::Array(got)) = col::<pgrx::JsonB>(&t.first(), 1)?.map(|j| j.0) {
                    events.extend(got);
                }
            }
        }
        events.sort_by_key(|e| e["id"].as_i64().unwrap_or(0));
        Ok(Value::Array(events))
    }

    pub fn ack(c: &mut SpiClient<'_>, consumer: &str, up_to: i64, claim: Option<&[u8; 16]>) -> BResult<i32> {
        let claim_arg = || claim.map(|u| pgrx::Uuid::from_bytes(*u));
        let mut users: Vec<pgrx::Uuid> = Vec::new();
        for row in spi::read(c, ACK_USERS, &[TEXT, INT8, UUID], &[consumer.into(), up_to.into(), claim_arg().into()])? {
            if let Some(u) = row.get::<pgrx::Uuid>(1).or_internal()? {
                users.push(u);
            }
        }
        if users.is_empty() {
            return Ok(0);
        }
        let flags = vec![false; users.len()];
        let mut n = 0;
        for (all, _) in by_shard(c, users, flags)? {
            let t = spi::write(c, ACK, &[TEXT, INT8, UUID, UUID_ARRAY], &[consumer.into(), up_to.into(), claim_arg().into(), all.into()])?;
            n += col::<i32>(&t.first(), 1)?.unwrap_or(0);
        }
        Ok(n)
    }
}
