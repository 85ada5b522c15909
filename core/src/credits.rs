//! The two-pool credit arithmetic.
//!
//! The SQL statements in `src/api/credits.rs` apply exactly this arithmetic inside one
//! row-locked `UPDATE` (so it is atomic under concurrency); this module is its executable
//! specification, checked here exhaustively and by property, and by the regression tests
//! against the database.

use crate::error::{BillingError, Result};

/// An account's two pools.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Balances {
    pub subscription: i64,
    pub purchased: i64,
}

impl Balances {
    pub fn total(&self) -> i64 {
        self.subscription.saturating_add(self.purchased)
    }
}

/// How a consumption is taken from the pools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Split {
    pub subscription: i64,
    pub purchased: i64,
}

/// FIFO consumption: the subscription pool (which expires first) is used before the purchased
/// pool. Fails with `PT402` and takes nothing when the total is short.
pub fn fifo_split(balances: Balances, amount: i64) -> Result<Split> {
    if amount <= 0 {
        return Err(BillingError::invalid("the amount to consume must be a positive number"));
    }
    if balances.total() < amount {
        return Err(BillingError::InsufficientCredits {
            needed: amount,
            subscription: balances.subscription,
            purchased: balances.purchased,
        });
    }
    let from_subscription = balances.subscription.min(amount);
    Ok(Split { subscription: from_subscription, purchased: amount - from_subscription })
}

/// A clawback takes back up to `amount` from the purchased pool; the rest is the shortfall.
pub fn clawback_split(purchased_balance: i64, amount: i64) -> (i64, i64) {
    let taken = purchased_balance.clamp(0, amount.max(0));
    (taken, amount.max(0) - taken)
}

/// What an S4-style single-pool balance becomes: purchased credits are what the purchase history
/// can account for, never more than the balance; the rest is subscription credit. The total is
/// preserved exactly, so a migration never creates credits.
pub fn split_legacy_balance(balance: i64, purchases_sum: i64) -> Balances {
    let balance = balance.max(0);
    let purchased = purchases_sum.clamp(0, balance);
    Balances { subscription: balance - purchased, purchased }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(subscription: i64, purchased: i64) -> Balances {
        Balances { subscription, purchased }
    }

    #[test]
    fn subscription_pool_is_used_first() {
        assert_eq!(fifo_split(b(10, 5), 4).unwrap(), Split { subscription: 4, purchased: 0 });
        assert_eq!(fifo_split(b(10, 5), 10).unwrap(), Split { subscription: 10, purchased: 0 });
        assert_eq!(fifo_split(b(10, 5), 12).unwrap(), Split { subscription: 10, purchased: 2 });
        assert_eq!(fifo_split(b(0, 5), 5).unwrap(), Split { subscription: 0, purchased: 5 });
    }

    #[test]
    fn short_total_takes_nothing() {
        let err = fifo_split(b(3, 4), 8).unwrap_err();
        assert_eq!(err, BillingError::InsufficientCredits { needed: 8, subscription: 3, purchased: 4 });
        assert_eq!(fifo_split(b(0, 0), 1).unwrap_err().sqlstate(), "PT402");
    }

    #[test]
    fn non_positive_amounts_are_rejected() {
        assert_eq!(fifo_split(b(3, 4), 0).unwrap_err().sqlstate(), "22023");
        assert_eq!(fifo_split(b(3, 4), -1).unwrap_err().sqlstate(), "22023");
    }

    /// Exhaustive over a small grid: the split never over-draws a pool, always sums to the
    /// amount, and touches purchased credits only when the subscription pool is empty.
    #[test]
    fn split_properties_hold_exhaustively() {
        for sub in 0..40 {
            for pur in 0..40 {
                for amount in 1..90 {
                    match fifo_split(b(sub, pur), amount) {
                        Ok(s) => {
                            assert_eq!(s.subscription + s.purchased, amount);
                            assert!(s.subscription <= sub && s.purchased <= pur);
                            assert!(s.subscription >= 0 && s.purchased >= 0);
                            if s.purchased > 0 {
                                assert_eq!(s.subscription, sub, "purchased used before subscription ran out");
                            }
                        }
                        Err(e) => {
                            assert!(sub + pur < amount);
                            assert_eq!(e.sqlstate(), "PT402");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn huge_balances_do_not_overflow() {
        let s = fifo_split(b(i64::MAX, i64::MAX), i64::MAX).unwrap();
        assert_eq!(s, Split { subscription: i64::MAX, purchased: 0 });
        assert_eq!(b(i64::MAX, 1).total(), i64::MAX);
    }

    #[test]
    fn clawback_reports_shortfall() {
        assert_eq!(clawback_split(100, 30), (30, 0));
        assert_eq!(clawback_split(10, 30), (10, 20));
        assert_eq!(clawback_split(0, 30), (0, 30));
    }

    #[test]
    fn legacy_split_never_creates_credits() {
        // S4's GREATEST(0, balance - purchased) would give 0 + 500 = 500 from a balance of 200.
        assert_eq!(split_legacy_balance(200, 500), b(0, 200));
        assert_eq!(split_legacy_balance(500, 200), b(300, 200));
        assert_eq!(split_legacy_balance(0, 0), b(0, 0));
        for balance in 0..60 {
            for purchases in 0..60 {
                let s = split_legacy_balance(balance, purchases);
                assert_eq!(s.total(), balance);
                assert!(s.purchased <= purchases);
            }
        }
    }
}
