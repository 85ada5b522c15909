//! Credit holds (0.5.0; issue 14): reserve credits before a job whose cost is known only at the
//! end, capture what it cost, release the rest. The rules that need no database: the TTL, how
//! much a reservation holds, and how a capture is funded under each `p_over` policy.
//!
//! `src/api/holds.rs` applies them under the account lock; the regression tests check the SQL
//! functions against them.

use crate::error::{BillingError, Result};

/// Shortest hold: one second.
pub const MIN_TTL_MICROS: i64 = 1_000_000;
/// Longest hold: 24 hours (extend_hold renews it while a long job runs).
pub const MAX_TTL_MICROS: i64 = 86_400_000_000;

/// A hold's time to live from an interval's parts: 1 second to 24 hours, else `22023`.
/// Months are refused (a month has no fixed length); a day counts 24 hours.
pub fn ttl(name: &str, months: i32, days: i32, micros: i64) -> Result<i64> {
    let total = if months != 0 {
        None
    } else {
        (days as i64).checked_mul(86_400_000_000).and_then(|d| d.checked_add(micros))
    };
    match total {
        Some(t) if (MIN_TTL_MICROS..=MAX_TTL_MICROS).contains(&t) => Ok(t),
        _ => Err(BillingError::invalid_with_hint(
            format!("{name} must be between 1 second and 24 hours"),
            "extend_hold renews a hold for a job that runs longer",
        )),
    }
}

/// What capture_hold does with a `p_amount` above the hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Over {
    /// Take the excess from the free balance; report what even that cannot pay as `unfunded`.
    Available,
    /// Refuse (`22023`) and change nothing.
    Reject,
    /// Take the excess from the free balance, then into overdraft within the account's limit.
    Overdraft,
}

impl Over {
    pub fn parse(name: &str, value: &str) -> Result<Over> {
        match value {
            "available" => Ok(Over::Available),
            "reject" => Ok(Over::Reject),
            "overdraft" => Ok(Over::Overdraft),
            _ => Err(BillingError::invalid_with_hint(
                format!("{name} must be available, reject or overdraft"),
                "available: an excess comes from the free balance; reject: refuse an amount above the hold; overdraft: the excess may go into overdraft",
            )),
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Over::Available => "available",
            Over::Reject => "reject",
            Over::Overdraft => "overdraft",
        }
    }
}

/// How much a reservation of `requested` holds when `available` credits are free (spendable
/// less the other active holds). Not enough: `PT402`; with `allow_partial`, what is available
/// (at least 1).
pub fn reserve_amount(requested: i64, available: i64, allow_partial: bool) -> Option<i64> {
    if available >= requested {
        Some(requested)
    } else if allow_partial && available >= 1 {
        Some(available)
    } else {
        None
    }
}

/// How a capture of `amount` is funded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capture {
    /// Debited now (from grants in spending order, then as debt with `Overdraft`).
    pub debit: i64,
    /// What the job cost and nothing could pay (reported, never debited).
    pub unfunded: i64,
}

/// A capture of `amount` against a hold of `hold` credits (`counted`: whether they are still
/// reserved, false for a hold captured within the grace after its expiry). `grant_cap`: what the
/// grants may pay for this capture (spendable for the hold's feature less the OTHER active
/// holds); `headroom`: the overdraft left (limit less debt).
pub fn plan_capture(amount: i64, hold: i64, over: Over, grant_cap: i64, headroom: i64) -> Result<Capture> {
    if amount > hold && over == Over::Reject {
        return Err(BillingError::invalid_with_hint(
            format!("p_amount ({amount}) exceeds the hold ({hold})"),
            "pass p_over => 'available' or 'overdraft' to charge the excess, or increase_hold before capturing",
        ));
    }
    let from_grants = amount.min(grant_cap.max(0));
    let from_debt = if over == Over::Overdraft { (amount - from_grants).min(headroom.max(0)) } else { 0 };
    Ok(Capture { debit: from_grants + from_debt, unfunded: amount - from_grants - from_debt })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_is_one_second_to_a_day() {
        assert_eq!(ttl("t", 0, 0, 1_000_000).unwrap(), 1_000_000);
        assert_eq!(ttl("t", 0, 1, 0).unwrap(), MAX_TTL_MICROS);
        assert_eq!(ttl("t", 0, 0, 999_999).unwrap_err().sqlstate(), "22023");
        assert_eq!(ttl("t", 0, 1, 1).unwrap_err().sqlstate(), "22023");
        assert_eq!(ttl("t", 1, 0, 0).unwrap_err().sqlstate(), "22023");
        assert_eq!(ttl("t", 0, 0, -5).unwrap_err().sqlstate(), "22023");
        assert_eq!(ttl("t", 0, i32::MAX, i64::MAX).unwrap_err().sqlstate(), "22023");
        assert_eq!(ttl("t", 0, -1, 86_400_000_000 + 5_000_000).unwrap(), 5_000_000);
    }

    #[test]
    fn policies_parse() {
        assert_eq!(Over::parse("p", "available").unwrap(), Over::Available);
        assert_eq!(Over::parse("p", "overdraft").unwrap().as_str(), "overdraft");
        assert_eq!(Over::parse("p", "Reject").unwrap_err().sqlstate(), "22023");
    }

    #[test]
    fn reservations_hold_what_is_available() {
        assert_eq!(reserve_amount(5, 10, false), Some(5));
        assert_eq!(reserve_amount(10, 10, false), Some(10));
        assert_eq!(reserve_amount(11, 10, false), None);
        assert_eq!(reserve_amount(11, 10, true), Some(10));
        assert_eq!(reserve_amount(11, 0, true), None);
        assert_eq!(reserve_amount(11, -3, true), None);
    }

    #[test]
    fn captures_by_policy() {
        // Less than the hold: all of it from grants.
        assert_eq!(plan_capture(312, 500, Over::Available, 500, 0).unwrap(), Capture { debit: 312, unfunded: 0 });
        // More: the excess from the free balance, unfunded beyond it.
        assert_eq!(plan_capture(600, 500, Over::Available, 550, 100).unwrap(), Capture { debit: 550, unfunded: 50 });
        assert_eq!(plan_capture(600, 500, Over::Reject, 550, 100).unwrap_err().sqlstate(), "22023");
        assert_eq!(plan_capture(500, 500, Over::Reject, 500, 0).unwrap(), Capture { debit: 500, unfunded: 0 });
        // Overdraft: into debt within the headroom.
        assert_eq!(plan_capture(600, 500, Over::Overdraft, 550, 30).unwrap(), Capture { debit: 580, unfunded: 20 });
        assert_eq!(plan_capture(600, 500, Over::Overdraft, 550, 100).unwrap(), Capture { debit: 600, unfunded: 0 });
        // Zero costs nothing; a negative cap pays nothing.
        assert_eq!(plan_capture(0, 500, Over::Reject, 500, 0).unwrap(), Capture { debit: 0, unfunded: 0 });
        assert_eq!(plan_capture(5, 5, Over::Available, -3, 0).unwrap(), Capture { debit: 0, unfunded: 5 });
    }

    #[test]
    fn captures_never_take_more_than_asked_exhaustively() {
        for amount in 0..12 {
            for hold in 1..8 {
                for cap in -2..12 {
                    for headroom in 0..5 {
                        for over in [Over::Available, Over::Reject, Over::Overdraft] {
                            match plan_capture(amount, hold, over, cap, headroom) {
                                Ok(c) => {
                                    assert_eq!(c.debit + c.unfunded, amount);
                                    assert!(c.debit >= 0 && c.unfunded >= 0);
                                    let debt = c.debit - amount.min(cap.max(0));
                                    assert!(debt <= if over == Over::Overdraft { headroom } else { 0 });
                                }
                                Err(_) => assert!(over == Over::Reject && amount > hold),
                            }
                        }
                    }
                }
            }
        }
    }
}
