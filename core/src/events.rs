//! Events out (0.6.0; issue 15): the rules that need no database. A balance rule's state machine
//! (when balance.low, balance.depleted and balance.recovered fire), when a limit rule fires
//! limit.reached or limit.cleared, and the arguments of the delivery functions.
//!
//! `src/api/events.rs` applies them under the account lock; the regression tests check the SQL
//! functions against them.

use crate::error::{BillingError, Result};

/// A balance rule's state, stored in `billing.accounts.alert_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertState {
    /// Fires balance.low at the next fall below the threshold.
    Armed = 0,
    /// balance.low fired; balance.depleted fires at zero.
    Low = 1,
    /// balance.depleted fired.
    Depleted = 2,
}

impl AlertState {
    pub fn from_i16(v: i16) -> AlertState {
        match v {
            1 => AlertState::Low,
            2 => AlertState::Depleted,
            _ => AlertState::Armed,
        }
    }
}

/// The state after a write leaves `available` credits, for a rule with `threshold` that re-arms
/// at `rearm` (>= threshold). At or below zero: depleted. Below the threshold: low, unless it
/// fired depleted already (it re-arms only by recovering). At or above the re-arm level: armed.
/// Between the threshold and the re-arm level: unchanged (the hysteresis band).
/// `src/api/events.rs` BALANCE_CHECK computes the same in SQL (the regression tests check both).
pub fn next_state(state: AlertState, available: i64, threshold: i64, rearm: i64) -> AlertState {
    if available <= 0 {
        AlertState::Depleted
    } else if available < threshold {
        if state == AlertState::Depleted {
            AlertState::Depleted
        } else {
            AlertState::Low
        }
    } else if available >= rearm {
        AlertState::Armed
    } else {
        state
    }
}

/// The events a state change fires, in order.
pub fn transition_events(from: AlertState, to: AlertState) -> &'static [&'static str] {
    use AlertState::*;
    match (from, to) {
        (Armed, Low) => &["balance.low"],
        (Armed, Depleted) => &["balance.low", "balance.depleted"],
        (Low, Depleted) => &["balance.depleted"],
        (Low, Armed) | (Depleted, Armed) => &["balance.recovered"],
        _ => &[],
    }
}

/// The state a rule starts in when it is set or changes (no event): armed when the balance is at
/// or above the threshold, else as if it had fired.
pub fn initial_state(available: i64, threshold: i64) -> AlertState {
    if available >= threshold {
        AlertState::Armed
    } else if available > 0 {
        AlertState::Low
    } else {
        AlertState::Depleted
    }
}

pub const MAX_HYSTERESIS: f64 = 10.0;

/// p_threshold of set_balance_alert: NULL removes the rule, else at least 1.
pub fn threshold(value: Option<i64>) -> Result<Option<i64>> {
    match value {
        Some(t) if t < 1 => Err(BillingError::invalid_with_hint(
            "p_threshold must be at least 1",
            "balance.depleted already fires at zero; pass NULL to remove the rule",
        )),
        v => Ok(v),
    }
}

/// p_hysteresis of set_balance_alert: 0 to 10.
pub fn hysteresis(value: Option<f64>) -> Result<f64> {
    match value {
        Some(h) if (0.0..=MAX_HYSTERESIS).contains(&h) => Ok(h),
        Some(_) => Err(BillingError::invalid_with_hint(
            "p_hysteresis must be between 0 and 10",
            "the rule re-arms once the balance is back at threshold * (1 + p_hysteresis)",
        )),
        None => Err(BillingError::invalid("p_hysteresis must not be NULL")),
    }
}

/// The monthly usage metrics a limit rule may watch, with their plan limits keys and their
/// billing.usage_metrics columns.
pub const MONTHLY_METRICS: &[(&str, &str, &str)] = &[
    ("messages", "messages_per_month", "messages_count"),
    ("conversations", "conversations_per_month", "conversations_count"),
    ("tokens_input", "tokens_input_per_month", "tokens_input_count"),
    ("tokens_output", "tokens_output_per_month", "tokens_output_count"),
    ("documents", "documents_per_month", "documents_processed_count"),
    ("generations", "generations_per_month", "generations_count"),
];

pub fn is_monthly_metric(metric: &str) -> bool {
    MONTHLY_METRICS.iter().any(|(m, _, _)| *m == metric)
}

/// p_percent of set_limit_alert: 1 to 1000.
pub fn percent(value: Option<i32>) -> Result<i32> {
    match value {
        Some(p) if (1..=1000).contains(&p) => Ok(p),
        Some(p) => Err(BillingError::invalid_with_hint(
            "p_percent must be between 1 and 1000",
            format!("p_percent was {p}; 100 fires when the limit is reached"),
        )),
        None => Err(BillingError::invalid("p_percent must not be NULL")),
    }
}

/// The usage at which a rule of `percent` fires for `limit`: ceil(limit * percent / 100). None
/// when the limit does not bound anything (unlimited, -1, or 0: nothing is allowed at all).
pub fn fire_at(limit: i64, percent: i32) -> Option<i64> {
    if limit <= 0 {
        return None;
    }
    let n = (limit as i128) * (percent as i128);
    Some(((n + 99) / 100).min(i64::MAX as i128) as i64)
}

/// What a limit rule does after usage is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitStep {
    /// limit.cleared for the period it had fired in.
    pub clear: bool,
    /// limit.reached for the current period.
    pub reach: bool,
}

/// `open`: Some(in the current period?) when the rule has fired and not cleared, else None.
/// An open rule clears when usage is back below (or the limit no longer bounds it), or when it
/// fired in an earlier period; a rule that is not open (or has just cleared) reaches when usage
/// is at or above where it fires.
pub fn limit_step(used: i64, fire: Option<i64>, open: Option<bool>) -> LimitStep {
    let over = matches!(fire, Some(f) if used >= f);
    let clear = match open {
        Some(true) => !over,
        Some(false) => true,
        None => false,
    };
    LimitStep { clear, reach: over && open != Some(true) }
}

/// p_consumer: 1 to 100 characters of A-Z a-z 0-9 _ . : -.
pub fn consumer(value: Option<&str>) -> Result<&str> {
    match value {
        Some(c)
            if !c.is_empty()
                && c.len() <= 100
                && c.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-')) =>
        {
            Ok(c)
        }
        Some(_) => Err(BillingError::invalid_with_hint(
            "p_consumer must be 1 to 100 characters of A-Z, a-z, 0-9, _, ., : or -",
            "name each consumer after what it feeds, such as 'webhooks' or 'email'",
        )),
        None => Err(BillingError::invalid("p_consumer must not be NULL")),
    }
}

/// p_limit of claim_events: 1 to 10000.
pub fn claim_limit(value: Option<i32>) -> Result<i64> {
    match value {
        Some(n) if (1..=10_000).contains(&n) => Ok(n as i64),
        _ => Err(BillingError::invalid("p_limit must be between 1 and 10000")),
    }
}

/// p_visibility_timeout of claim_events from an interval's parts: 1 second to 1 day.
pub fn visibility_timeout(months: i32, days: i32, micros: i64) -> Result<i64> {
    let total = if months != 0 { None } else { (days as i64).checked_mul(86_400_000_000).and_then(|d| d.checked_add(micros)) };
    match total {
        Some(t) if (1_000_000..=86_400_000_000).contains(&t) => Ok(t),
        _ => Err(BillingError::invalid_with_hint(
            "p_visibility_timeout must be between 1 second and 1 day",
            "events not acknowledged within it are handed out again",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use AlertState::*;

    #[test]
    fn fires_once_per_crossing_and_rearms_above_the_band() {
        // threshold 100, re-arm 110
        let mut s = Armed;
        let mut fired = Vec::new();
        for avail in [150, 99, 80, 105, 95, 109, 110, 90, 0, 5, 0, 120] {
            let n = next_state(s, avail, 100, 110);
            fired.extend(transition_events(s, n).iter().map(|e| (avail, *e)));
            s = n;
        }
        assert_eq!(
            fired,
            vec![
                (99, "balance.low"),
                (110, "balance.recovered"),
                (90, "balance.low"),
                (0, "balance.depleted"),
                (120, "balance.recovered"),
            ]
        );
    }

    #[test]
    fn straight_to_zero_fires_low_then_depleted() {
        assert_eq!(transition_events(Armed, next_state(Armed, 0, 100, 110)), &["balance.low", "balance.depleted"]);
        assert_eq!(transition_events(Armed, next_state(Armed, -5, 100, 110)), &["balance.low", "balance.depleted"]);
    }

    #[test]
    fn zero_hysteresis_rearms_at_the_threshold() {
        assert_eq!(next_state(Low, 100, 100, 100), Armed);
        assert_eq!(next_state(Low, 99, 100, 100), Low);
    }

    #[test]
    fn initial_state_never_fires() {
        assert_eq!(initial_state(100, 100), Armed);
        assert_eq!(initial_state(99, 100), Low);
        assert_eq!(initial_state(0, 100), Depleted);
    }

    #[test]
    fn arguments() {
        assert!(threshold(Some(0)).is_err());
        assert_eq!(threshold(None).unwrap(), None);
        assert!(hysteresis(Some(-0.1)).is_err());
        assert!(hysteresis(Some(10.5)).is_err());
        assert!(percent(Some(0)).is_err());
        assert!(percent(Some(1001)).is_err());
        assert_eq!(percent(Some(80)).unwrap(), 80);
        assert!(consumer(Some("")).is_err());
        assert!(consumer(Some("a b")).is_err());
        assert!(consumer(Some(&"x".repeat(101))).is_err());
        assert_eq!(consumer(Some("webhooks:v1")).unwrap(), "webhooks:v1");
        assert!(claim_limit(Some(0)).is_err());
        assert!(claim_limit(Some(10_001)).is_err());
        assert!(visibility_timeout(0, 0, 999_999).is_err());
        assert!(visibility_timeout(1, 0, 0).is_err());
        assert_eq!(visibility_timeout(0, 1, 0).unwrap(), 86_400_000_000);
        assert!(visibility_timeout(0, 1, 1).is_err());
    }

    #[test]
    fn limit_rules() {
        assert_eq!(fire_at(100, 80), Some(80));
        assert_eq!(fire_at(3, 50), Some(2));
        assert_eq!(fire_at(-1, 80), None);
        assert_eq!(fire_at(0, 80), None);
        // Not fired yet: reach when over.
        assert_eq!(limit_step(79, Some(80), None), LimitStep { clear: false, reach: false });
        assert_eq!(limit_step(80, Some(80), None), LimitStep { clear: false, reach: true });
        // Fired this period, still over: nothing.
        assert_eq!(limit_step(90, Some(80), Some(true)), LimitStep { clear: false, reach: false });
        // Fired this period, back below (fewer resources): clear.
        assert_eq!(limit_step(70, Some(80), Some(true)), LimitStep { clear: true, reach: false });
        // Fired in an earlier period: clear it; over again in the new one: reach.
        assert_eq!(limit_step(5, Some(80), Some(false)), LimitStep { clear: true, reach: false });
        assert_eq!(limit_step(85, Some(80), Some(false)), LimitStep { clear: true, reach: true });
        // Cleared this period (resource count went down), over again: reach again.
        assert_eq!(limit_step(85, Some(80), None), LimitStep { clear: false, reach: true });
        // Unlimited now (plan change): an open rule clears.
        assert_eq!(limit_step(85, None, Some(true)), LimitStep { clear: true, reach: false });
    }
}
