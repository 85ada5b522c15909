//! Credit grants (0.4.0): categories, their default priorities and pools, argument checks, and
//! the spending rule as an executable specification.
//!
//! The spending statement in `src/api/credits.rs` applies [`allocate`] inside one SQL statement
//! under the account's row lock; the tests here state the rule exhaustively, and the regression
//! tests check the statement against it.

use crate::error::{BillingError, Result};

/// A grant's category (`billing.grant_category`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Category {
    Subscription,
    Purchased,
    Promotional,
    Rollover,
    Refund,
}

/// One of the two pools the two-pool API reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool {
    Subscription,
    Purchased,
}

impl Category {
    pub const ALL: [Category; 5] =
        [Category::Subscription, Category::Purchased, Category::Promotional, Category::Rollover, Category::Refund];

    pub fn as_str(self) -> &'static str {
        match self {
            Category::Subscription => "subscription",
            Category::Purchased => "purchased",
            Category::Promotional => "promotional",
            Category::Rollover => "rollover",
            Category::Refund => "refund",
        }
    }

    /// The category a caller named (exact, lower case), or `22023`.
    pub fn parse(name: &str, value: &str) -> Result<Category> {
        Category::ALL.into_iter().find(|c| c.as_str() == value).ok_or_else(|| {
            BillingError::invalid_with_hint(
                format!("{name} is not a grant category"),
                "use one of subscription, purchased, promotional, rollover, refund",
            )
        })
    }

    /// Lower is spent first: plan credits that expire with the period, then what they rolled
    /// over, promotions, refunds, and what the user paid for last.
    pub fn default_priority(self) -> i32 {
        match self {
            Category::Subscription => 10,
            Category::Rollover => 20,
            Category::Promotional => 30,
            Category::Refund => 40,
            Category::Purchased => 50,
        }
    }

    /// Plan credits (subscription, rollover) count in the subscription pool; everything else in
    /// the purchased pool. The same rule is the generated column `credit_grants.pool`.
    pub fn pool(self) -> Pool {
        match self {
            Category::Subscription | Category::Rollover => Pool::Subscription,
            _ => Pool::Purchased,
        }
    }
}

/// A grant's priority: the category's default when not given, else 0..=100.
pub fn priority(name: &str, given: Option<i32>, category: Category) -> Result<i32> {
    match given {
        None => Ok(category.default_priority()),
        Some(p) if (0..=100).contains(&p) => Ok(p),
        Some(p) => Err(BillingError::invalid_with_hint(
            format!("{name} must be between 0 and 100"),
            format!("{name} was {p}; lower is spent first"),
        )),
    }
}

/// Longest feature name in a scope.
pub const MAX_FEATURE: usize = 64;
/// Most features in one scope.
pub const MAX_SCOPE: usize = 100;

/// A scope: NULL (any feature) or a non-empty list of non-empty feature names, without NULLs.
/// Duplicates are dropped; the order is kept.
pub fn scope(name: &str, given: Option<Vec<Option<String>>>) -> Result<Option<Vec<String>>> {
    let Some(items) = given else { return Ok(None) };
    if items.is_empty() {
        return Err(BillingError::invalid_with_hint(
            format!("{name} must not be an empty array"),
            format!("pass NULL for credits any feature may spend, or the features that may spend them"),
        ));
    }
    if items.len() > MAX_SCOPE {
        return Err(BillingError::invalid(format!("{name} has more than {MAX_SCOPE} features")));
    }
    let mut out: Vec<String> = Vec::with_capacity(items.len());
    for item in items {
        let Some(f) = item else { return Err(BillingError::invalid(format!("{name} must not contain NULL"))) };
        feature(name, &f)?;
        if !out.contains(&f) {
            out.push(f);
        }
    }
    Ok(Some(out))
}

/// A feature name: 1 to 64 characters, no NUL, not blank.
pub fn feature(name: &str, value: &str) -> Result<()> {
    if value.trim().is_empty() {
        return Err(BillingError::invalid(format!("{name} must not contain an empty feature name")));
    }
    if value.chars().count() > MAX_FEATURE || value.contains('\0') {
        return Err(BillingError::invalid_with_hint(
            format!("{name} holds an invalid feature name"),
            format!("feature names are 1 to {MAX_FEATURE} characters"),
        ));
    }
    Ok(())
}

/// A grant as the spending rule sees it (times in microseconds; `None` expiry = never).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub id: u32,
    pub priority: i32,
    pub scope: Option<Vec<String>>,
    pub effective_at: i64,
    pub expires_at: Option<i64>,
    pub created_at: i64,
    pub remaining: i64,
    pub voided: bool,
}

impl Grant {
    /// Spendable at `now` for `feature` (None: spending without a feature, which only unscoped
    /// grants pay).
    pub fn spendable(&self, now: i64, feature: Option<&str>) -> bool {
        self.remaining > 0
            && !self.voided
            && self.effective_at <= now
            && self.expires_at.is_none_or(|e| now < e)
            && match (&self.scope, feature) {
                (None, _) => true,
                (Some(s), Some(f)) => s.iter().any(|x| x == f),
                (Some(_), None) => false,
            }
    }

    /// The spending order's sort key: priority, scoped first, expiry (never last), start,
    /// creation, id.
    fn key(&self) -> (i32, bool, bool, i64, i64, i64, u32) {
        (
            self.priority,
            self.scope.is_none(),
            self.expires_at.is_none(),
            self.expires_at.unwrap_or(0),
            self.effective_at,
            self.created_at,
            self.id,
        )
    }
}

/// What a debit takes: `(grant id, credits)` in spending order, and the new debt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    pub taken: Vec<(u32, i64)>,
    pub new_debt: i64,
}

/// The spending rule: take `amount` from the spendable grants in spending order; what they
/// cannot pay becomes debt, allowed while the debt stays within `overdraft_limit`. Otherwise
/// `PT402` and nothing is taken.
pub fn allocate(
    grants: &[Grant],
    now: i64,
    feature: Option<&str>,
    amount: i64,
    debt: i64,
    overdraft_limit: i64,
) -> Result<Allocation> {
    if amount <= 0 {
        return Err(BillingError::invalid("the amount to consume must be a positive number"));
    }
    let mut live: Vec<&Grant> = grants.iter().filter(|g| g.spendable(now, feature)).collect();
    live.sort_by_key(|g| g.key());
    let remaining: Vec<i64> = live.iter().map(|g| g.remaining).collect();
    let (takes, short) = take_in_order(&remaining, amount, overdraft_limit.saturating_sub(debt))?;
    let taken = live.iter().zip(takes).filter(|(_, n)| *n > 0).map(|(g, n)| (g.id, n)).collect();
    Ok(Allocation { taken, new_debt: debt + short })
}

/// The debit itself, over the grants the spending may use, already in spending order (the
/// database returns them so, from the spending index): what each pays (0 once the amount is
/// covered) and what goes into debt. `PT402`, and nothing taken, when they and the overdraft
/// `headroom` fall short.
pub fn take_in_order(remaining: &[i64], amount: i64, headroom: i64) -> Result<(Vec<i64>, i64)> {
    let mut left = amount;
    let takes = remaining
        .iter()
        .map(|r| {
            let n = (*r).max(0).min(left);
            left -= n;
            n
        })
        .collect();
    if left > headroom.max(0) {
        return Err(BillingError::InsufficientCredits { needed: amount, subscription: 0, purchased: amount - left });
    }
    Ok((takes, left))
}

/// What a new grant of `amount` pays of an outstanding `debt`: all it can when it is effective
/// now and unscoped (credits any spending may use), nothing otherwise.
pub fn debt_repayment(amount: i64, debt: i64, effective_now: bool, scoped: bool) -> i64 {
    if effective_now && !scoped {
        amount.min(debt).max(0)
    } else {
        0
    }
}

/// What rolls over at a renewal: what remains of the expiring subscription-pool grants, at most
/// the plan's `rollover_max` (0 = nothing).
pub fn rollover(remaining: i64, rollover_max: i64) -> i64 {
    remaining.clamp(0, rollover_max.max(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(id: u32, priority: i32, remaining: i64) -> Grant {
        Grant { id, priority, scope: None, effective_at: 0, expires_at: None, created_at: id as i64, remaining, voided: false }
    }

    #[test]
    fn categories_round_trip_with_defaults() {
        for c in Category::ALL {
            assert_eq!(Category::parse("p", c.as_str()).unwrap(), c);
        }
        assert_eq!(Category::parse("p_category", "bonus").unwrap_err().sqlstate(), "22023");
        assert_eq!(Category::parse("p_category", "Purchased").unwrap_err().sqlstate(), "22023");
        let order: Vec<i32> = [Category::Subscription, Category::Rollover, Category::Promotional, Category::Refund, Category::Purchased]
            .iter()
            .map(|c| c.default_priority())
            .collect();
        assert_eq!(order, vec![10, 20, 30, 40, 50]);
        assert_eq!(Category::Rollover.pool(), Pool::Subscription);
        assert_eq!(Category::Promotional.pool(), Pool::Purchased);
    }

    #[test]
    fn priorities_and_scopes_are_checked() {
        assert_eq!(priority("p", None, Category::Refund).unwrap(), 40);
        assert_eq!(priority("p", Some(0), Category::Refund).unwrap(), 0);
        assert_eq!(priority("p", Some(100), Category::Refund).unwrap(), 100);
        assert!(priority("p", Some(101), Category::Refund).is_err());
        assert!(priority("p", Some(-1), Category::Refund).is_err());
        assert_eq!(scope("s", None).unwrap(), None);
        assert!(scope("s", Some(vec![])).is_err());
        assert!(scope("s", Some(vec![None])).is_err());
        assert!(scope("s", Some(vec![Some(" ".into())])).is_err());
        assert!(scope("s", Some(vec![Some("x".repeat(65))])).is_err());
        assert_eq!(
            scope("s", Some(vec![Some("a".into()), Some("b".into()), Some("a".into())])).unwrap(),
            Some(vec!["a".to_string(), "b".to_string()])
        );
    }

    #[test]
    fn order_is_priority_scope_expiry_start_creation() {
        let mut a = g(1, 50, 10);
        let mut b = g(2, 10, 10);
        let mut c = g(3, 10, 10);
        c.scope = Some(vec!["img".into()]);
        // Priority first, then scoped before unscoped (for a feature the scope admits).
        let r = allocate(&[a.clone(), b.clone(), c.clone()], 0, Some("img"), 25, 0, 0).unwrap();
        assert_eq!(r.taken, vec![(3, 10), (2, 10), (1, 5)]);
        // Without a feature the scoped grant is not spendable.
        let r = allocate(&[a.clone(), b.clone(), c.clone()], 0, None, 15, 0, 0).unwrap();
        assert_eq!(r.taken, vec![(2, 10), (1, 5)]);
        // Same priority and scope: earliest expiry first, never-expiring last.
        a.priority = 10;
        a.expires_at = Some(100);
        b.expires_at = Some(50);
        let r = allocate(&[a.clone(), b.clone(), g(4, 10, 10)], 0, None, 25, 0, 0).unwrap();
        assert_eq!(r.taken, vec![(2, 10), (1, 10), (4, 5)]);
    }

    #[test]
    fn time_voids_and_scopes_gate_spending() {
        let mut later = g(1, 10, 10);
        later.effective_at = 100;
        let mut gone = g(2, 10, 10);
        gone.expires_at = Some(50);
        let mut void = g(3, 10, 10);
        void.voided = true;
        let grants = [later.clone(), gone.clone(), void, g(4, 60, 5)];
        // At 60: the first has not started, the second expired at 50, the third is void.
        assert_eq!(allocate(&grants, 60, None, 5, 0, 0).unwrap().taken, vec![(4, 5)]);
        assert_eq!(allocate(&grants, 60, None, 6, 0, 0).unwrap_err().sqlstate(), "PT402");
        // Expiry is exclusive: spendable at 49, not at 50.
        assert!(gone.spendable(49, None) && !gone.spendable(50, None));
        assert!(!later.spendable(99, None) && later.spendable(100, None));
    }

    #[test]
    fn overdraft_takes_everything_then_debt_within_the_limit() {
        let grants = [g(1, 10, 10)];
        let r = allocate(&grants, 0, None, 15, 0, 5).unwrap();
        assert_eq!(r, Allocation { taken: vec![(1, 10)], new_debt: 5 });
        assert_eq!(allocate(&grants, 0, None, 16, 0, 5).unwrap_err().sqlstate(), "PT402");
        // Existing debt counts against the limit; a lowered limit allows no new debt.
        assert_eq!(allocate(&[], 0, None, 3, 3, 5).unwrap_err().sqlstate(), "PT402");
        assert_eq!(allocate(&[], 0, None, 2, 3, 5).unwrap().new_debt, 5);
        assert_eq!(allocate(&grants, 0, None, 10, 7, 5).unwrap().new_debt, 7);
        assert_eq!(allocate(&grants, 0, None, 11, 7, 5).unwrap_err().sqlstate(), "PT402");
    }

    /// Exhaustive over small grids: a debit never takes more than a grant holds, takes exactly
    /// the amount less the new debt, and leaves a grant untouched only if every grant before it
    /// in spending order was emptied or the amount was covered.
    #[test]
    fn allocation_properties_hold_exhaustively() {
        for r1 in 0..6 {
            for r2 in 0..6 {
                for r3 in 0..6 {
                    for amount in 1..20 {
                        for limit in 0..4 {
                            let grants = [g(1, 30, r1), g(2, 10, r2), g(3, 20, r3)];
                            match allocate(&grants, 0, None, amount, 0, limit) {
                                Ok(a) => {
                                    let paid: i64 = a.taken.iter().map(|t| t.1).sum();
                                    assert_eq!(paid + a.new_debt, amount);
                                    assert!(a.new_debt <= limit);
                                    for (id, n) in &a.taken {
                                        let held = grants.iter().find(|x| x.id == *id).unwrap().remaining;
                                        assert!(*n > 0 && *n <= held);
                                    }
                                    if a.new_debt > 0 {
                                        assert_eq!(paid, r1 + r2 + r3, "debt taken while credits were left");
                                    }
                                    let ids: Vec<u32> = a.taken.iter().map(|t| t.0).collect();
                                    let want: Vec<u32> = [(2, r2), (3, r3), (1, r1)]
                                        .iter()
                                        .filter(|(_, r)| *r > 0)
                                        .map(|(i, _)| *i)
                                        .take(ids.len())
                                        .collect();
                                    assert_eq!(ids, want);
                                }
                                Err(e) => {
                                    assert_eq!(e.sqlstate(), "PT402");
                                    assert!(r1 + r2 + r3 + limit < amount);
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn take_in_order_takes_each_grant_before_the_next() {
        assert_eq!(take_in_order(&[3, 5, 7], 6, 0).unwrap(), (vec![3, 3, 0], 0));
        assert_eq!(take_in_order(&[3, 5], 8, 0).unwrap(), (vec![3, 5], 0));
        assert_eq!(take_in_order(&[3, 5], 10, 2).unwrap(), (vec![3, 5], 2));
        assert_eq!(take_in_order(&[3, 5], 11, 2).unwrap_err().sqlstate(), "PT402");
        assert_eq!(take_in_order(&[], 1, 1).unwrap(), (vec![], 1));
        assert_eq!(take_in_order(&[4], 2, -5).unwrap(), (vec![2], 0));
    }

    #[test]
    fn repayment_and_rollover() {
        assert_eq!(debt_repayment(100, 30, true, false), 30);
        assert_eq!(debt_repayment(20, 30, true, false), 20);
        assert_eq!(debt_repayment(100, 30, false, false), 0);
        assert_eq!(debt_repayment(100, 30, true, true), 0);
        assert_eq!(debt_repayment(100, 0, true, false), 0);
        assert_eq!(rollover(350, 200), 200);
        assert_eq!(rollover(150, 200), 150);
        assert_eq!(rollover(150, 0), 0);
        assert_eq!(rollover(-5, 200), 0);
    }
}
