//! Members (SPEC 8) and pending profiles (SPEC 9): e-mail normalisation, plan durations,
//! renewal-period date arithmetic (chrono `NaiveDate`s: calendar dates, no time zone; the SQL side
//! gives them as UTC dates) and the generation/overage decision. No database needed.

use chrono::{Datelike, Months, NaiveDate};

use crate::error::{BillingError, Result};

/// Longest e-mail address accepted (RFC 5321's path limit).
pub const MAX_EMAIL: usize = 254;

/// The one normalisation of e-mail addresses, used wherever pg_billing compares or keys them
/// (members, pending profiles, claims against the JWT's `email` claim, the accounts' e-mail
/// index): surrounding whitespace is trimmed and the ASCII letters `A`-`Z` are lower-cased;
/// every other character is kept exactly as given. Unicode case folding is deliberately not
/// used: it folds distinct characters into ASCII (U+212A KELVIN SIGN lower-cases to `k`, U+0130
/// to `i` + a combining dot), so an address an attacker registers could match a buyer's. SQL
/// spells the same rule `pg_catalog.translate(email, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ',
/// 'abcdefghijklmnopqrstuvwxyz')` ([`EMAIL_KEY_SQL`]).
pub fn email_key(raw: &str) -> String {
    raw.trim().to_ascii_lowercase()
}

/// [`email_key`] as the SQL expression over a column or parameter named `x`.
pub const EMAIL_KEY_SQL: &str = "pg_catalog.translate(x, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz')";

/// Normalise ([`email_key`]) and validate an e-mail address: one `@`, a non-empty local part, a
/// domain with a dot and no empty labels, no whitespace or control characters. `22023`
/// otherwise.
pub fn normalize_email(name: &str, value: Option<&str>) -> Result<String> {
    let raw = value.ok_or_else(|| BillingError::invalid(format!("{name} must not be NULL")))?;
    let email = email_key(raw);
    let malformed = || {
        BillingError::invalid_with_hint(
            format!("{name} is not a valid e-mail address"),
            "pass an address such as someone@example.com",
        )
    };
    if email.is_empty() || email.chars().count() > MAX_EMAIL {
        return Err(malformed());
    }
    if email.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(malformed());
    }
    let mut parts = email.split('@');
    let (Some(local), Some(domain), None) = (parts.next(), parts.next(), parts.next()) else {
        return Err(malformed());
    };
    if local.is_empty() || local.len() > 64 || domain.len() < 3 || !domain.contains('.') {
        return Err(malformed());
    }
    if domain.split('.').any(|label| label.is_empty() || label.starts_with('-') || label.ends_with('-')) {
        return Err(malformed());
    }
    Ok(email)
}

/// The billing cycle a pending profile's `p_plan_duration` stands for, as a PostgreSQL interval:
/// `monthly` is 30 days, `yearly` one year (SPEC 9).
pub fn plan_duration_interval(value: &str) -> Result<&'static str> {
    match value.trim().to_ascii_lowercase().as_str() {
        "monthly" | "month" => Ok("30 days"),
        "yearly" | "year" | "annual" | "annually" => Ok("1 year"),
        _ => Err(BillingError::invalid_with_hint(
            "p_plan_duration must be 'monthly' or 'yearly'",
            format!("it was '{value}'"),
        )),
    }
}

/// The canonical spelling stored in `pending_profiles.plan_duration`.
pub fn canonical_plan_duration(value: &str) -> Result<&'static str> {
    plan_duration_interval(value).map(|i| if i == "30 days" { "monthly" } else { "yearly" })
}

/// The first day of the month `months` months after `from`'s month (negative: before).
fn month_start(from: NaiveDate, months: i64) -> Option<NaiveDate> {
    let first = from.with_day(1)?;
    let n = Months::new(u32::try_from(months.unsigned_abs()).ok()?);
    if months >= 0 {
        first.checked_add_months(n)
    } else {
        first.checked_sub_months(n)
    }
}

/// `months` months after `from`'s month, on `anchor_day` clamped to the month's length: a
/// member renewing on the 31st renews on Feb 28/29, then on Mar 31 again (no drift to the 28th).
/// `None` only outside chrono's range (years beyond +-262,000).
pub fn add_months(from: NaiveDate, months: i64, anchor_day: u8) -> Option<NaiveDate> {
    let m = month_start(from, months)?;
    m.with_day(u32::from(anchor_day.clamp(1, 31).min(m.num_days_in_month())))
}

/// The period a due member moves to on `today`: the renewal dates step monthly (on
/// `anchor_day`) from `renewal` until the next one is after `today`. Returns (period start, next
/// renewal date); `None` when the member is not due (`renewal > today`). A member several
/// periods behind lands in the period containing `today`, in one step.
pub fn advance_renewal(renewal: NaiveDate, anchor_day: u8, today: NaiveDate) -> Option<(NaiveDate, NaiveDate)> {
    if renewal > today {
        return None;
    }
    // Months from the renewal month to today's month, then adjust by at most one.
    let mut k = (today.year() as i64 - renewal.year() as i64) * 12 + (today.month() as i64 - renewal.month() as i64);
    let at = |k: i64| add_months(renewal, k, anchor_day);
    while k > 0 && at(k)? > today {
        k -= 1;
    }
    while at(k + 1)? <= today {
        k += 1;
    }
    // at(k) <= today < at(k + 1); k >= 0 because at(0) is on or before renewal <= today.
    Some((at(k)?.max(renewal), at(k + 1)?))
}

/// What a plan change within one renewal period grants (issue 11 item 4). `granted` is what plan
/// grants have given this period so far (the highest plan's credits seen this period), `credits`
/// the new plan's credits. An upgrade tops up the difference; a downgrade or a return to a plan
/// already paid for this period grants nothing. So flip-flopping between plans within one period
/// never grants more in total than the highest plan's credits. Returns (grant now, granted
/// this period afterwards).
pub fn plan_change_grant(granted: i64, credits: i64) -> (i64, i64) {
    let granted = granted.max(0);
    let credits = credits.max(0);
    if credits > granted {
        (credits - granted, credits)
    } else {
        (0, granted)
    }
}

/// What one `consume_generation` call does: how many credits it takes and how many generations
/// go beyond the member's credits as overage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Generation {
    pub from_credits: i64,
    pub overage: i64,
}

/// Generations use credits while any remain; beyond them they are overage when the plan allows
/// it, otherwise the call is refused with `PT402` and nothing changes.
pub fn plan_generation(subscription: i64, purchased: i64, count: i64, allow_overage: bool) -> Result<Generation> {
    if count <= 0 {
        return Err(BillingError::invalid("p_count must be a positive whole number"));
    }
    let available = subscription.max(0).saturating_add(purchased.max(0));
    if available >= count {
        return Ok(Generation { from_credits: count, overage: 0 });
    }
    if !allow_overage {
        return Err(BillingError::InsufficientCredits { needed: count, subscription, purchased });
    }
    Ok(Generation { from_credits: available, overage: count - available })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn emails_are_lower_cased_and_trimmed() {
        assert_eq!(normalize_email("p_email", Some("  Alice@Example.COM ")).unwrap(), "alice@example.com");
        assert_eq!(normalize_email("p_email", Some("a.b+tag@sub.example.co.uk")).unwrap(), "a.b+tag@sub.example.co.uk");
    }

    #[test]
    fn malformed_emails_are_22023() {
        for bad in ["", "alice", "alice@", "@example.com", "a@b", "a@@b.com", "a@b@c.com", "a b@c.com",
                    "a@exa mple.com", "a@.com", "a@com.", "a@-x.com", "a@x..com", "a\u{0}@x.com"] {
            let e = normalize_email("p_email", Some(bad)).unwrap_err();
            assert_eq!(e.sqlstate(), "22023", "{bad:?}");
        }
        assert!(normalize_email("p_email", None).unwrap_err().message().contains("NULL"));
        let long = format!("{}@example.com", "a".repeat(250));
        assert!(normalize_email("p_email", Some(&long)).is_err());
    }

    #[test]
    fn only_ascii_letters_are_folded() {
        assert_eq!(normalize_email("p_email", Some("KATE@Example.com")).unwrap(), "kate@example.com");
        // U+212A KELVIN SIGN is not folded to 'k' (Unicode lower-casing would do that)
        let kelvin = normalize_email("p_email", Some("\u{212A}ate@example.com")).unwrap();
        assert_eq!(kelvin, "\u{212A}ate@example.com");
        assert_ne!(kelvin, "kate@example.com");
        // other non-ASCII letters are kept as given, not case-folded
        assert_eq!(normalize_email("p_email", Some("\u{00C4}nne@Example.com")).unwrap(), "\u{00C4}nne@example.com");
        assert_eq!(email_key(" \u{0130}Z@x.io "), "\u{0130}z@x.io");
        assert!(EMAIL_KEY_SQL.contains("translate"));
    }

    #[test]
    fn plan_flip_flops_grant_the_highest_plan_once() {
        // pro (500) -> premium (2000) -> pro -> premium within one period: 2000 in total
        let (g1, granted) = plan_change_grant(500, 2000);
        let (g2, granted) = plan_change_grant(granted, 500);
        let (g3, granted) = plan_change_grant(granted, 2000);
        assert_eq!((g1, g2, g3, granted), (1500, 0, 0, 2000));
        assert_eq!(500 + g1 + g2 + g3, 2000);
        assert_eq!(plan_change_grant(0, 10), (10, 10));
        assert_eq!(plan_change_grant(-5, -1), (0, 0));
    }

    #[test]
    fn plan_durations() {
        assert_eq!(plan_duration_interval("monthly").unwrap(), "30 days");
        assert_eq!(plan_duration_interval("Yearly").unwrap(), "1 year");
        assert_eq!(canonical_plan_duration("annual").unwrap(), "yearly");
        assert_eq!(plan_duration_interval("weekly").unwrap_err().sqlstate(), "22023");
    }

    fn d(y: i32, m: u32, day: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, day).unwrap()
    }

    #[test]
    fn months_clamp_to_the_anchor_day() {
        assert_eq!(add_months(d(2024, 1, 31), 1, 31), Some(d(2024, 2, 29)));
        assert_eq!(add_months(d(2024, 1, 1), 2, 31), Some(d(2024, 3, 31)));
        assert_eq!(add_months(d(2024, 11, 30), 3, 15), Some(d(2025, 2, 15)));
        assert_eq!(add_months(d(2024, 1, 10), -1, 10), Some(d(2023, 12, 10)));
        assert_eq!(add_months(d(1900, 1, 31), 1, 31), Some(d(1900, 2, 28)));
        assert_eq!(add_months(d(2000, 1, 31), 1, 31), Some(d(2000, 2, 29)));
        assert_eq!(add_months(d(2023, 3, 31), 1, 31), Some(d(2023, 4, 30)));
        assert_eq!(add_months(NaiveDate::MAX, 1, 1), None);
    }

    #[test]
    fn not_due_is_none() {
        assert_eq!(advance_renewal(d(2024, 5, 2), 2, d(2024, 5, 1)), None);
    }

    #[test]
    fn due_today_moves_one_month() {
        let r = advance_renewal(d(2024, 5, 1), 1, d(2024, 5, 1)).unwrap();
        assert_eq!(r, (d(2024, 5, 1), d(2024, 6, 1)));
    }

    #[test]
    fn several_periods_behind_lands_in_todays_period() {
        let r = advance_renewal(d(2024, 1, 15), 15, d(2024, 4, 20)).unwrap();
        assert_eq!(r, (d(2024, 4, 15), d(2024, 5, 15)));
        let r = advance_renewal(d(2024, 1, 15), 15, d(2024, 4, 14)).unwrap();
        assert_eq!(r, (d(2024, 3, 15), d(2024, 4, 15)));
        let r = advance_renewal(d(2022, 12, 31), 31, d(2024, 2, 29)).unwrap();
        assert_eq!(r, (d(2024, 2, 29), d(2024, 3, 31)));
        let r = advance_renewal(d(2022, 12, 31), 31, d(2024, 2, 28)).unwrap();
        assert_eq!(r, (d(2024, 1, 31), d(2024, 2, 29)));
    }

    #[test]
    fn end_of_month_anchor_does_not_drift() {
        // Stored renewal date Feb 29 with anchor 31: next is Mar 31, not Mar 29.
        let r = advance_renewal(d(2024, 2, 29), 31, d(2024, 3, 1)).unwrap();
        assert_eq!(r, (d(2024, 2, 29), d(2024, 3, 31)));
    }

    /// Exhaustive over two years of days and every anchor: the result always brackets today,
    /// the next renewal is after today and on the anchor (clamped), and nothing is due again.
    #[test]
    fn advance_properties() {
        for anchor in 1..=31u8 {
            let renewal = add_months(d(2023, 1, 1), 0, anchor).unwrap();
            for today in d(2023, 1, 1).iter_days().take(730) {
                if let Some((from, next)) = advance_renewal(renewal, anchor, today) {
                    assert!(from <= today && today < next, "{renewal:?} {today:?} {from:?} {next:?}");
                    assert_eq!(next.day(), u32::from(anchor.min(next.num_days_in_month())));
                    assert_eq!(advance_renewal(next, anchor, today), None);
                } else {
                    assert!(renewal > today);
                }
            }
        }
    }

    /// 0.2.0's hand-written calendar, kept to check chrono's arithmetic against it.
    mod before {
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
        pub struct Ymd {
            pub year: i32,
            pub month: u8,
            pub day: u8,
        }

        fn is_leap(year: i32) -> bool {
            (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
        }

        pub fn days_in_month(year: i32, month: u8) -> u8 {
            match month {
                1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
                4 | 6 | 9 | 11 => 30,
                _ if is_leap(year) => 29,
                _ => 28,
            }
        }

        pub fn add_months(year: i32, month: u8, months: i64, anchor_day: u8) -> Ymd {
            let index = year as i64 * 12 + (month as i64 - 1) + months;
            let y = index.div_euclid(12) as i32;
            let m = (index.rem_euclid(12) + 1) as u8;
            let d = anchor_day.clamp(1, 31).min(days_in_month(y, m));
            Ymd { year: y, month: m, day: d }
        }

        pub fn advance_renewal(renewal: Ymd, anchor_day: u8, today: Ymd) -> Option<(Ymd, Ymd)> {
            if renewal > today {
                return None;
            }
            let mut k = (today.year as i64 - renewal.year as i64) * 12 + (today.month as i64 - renewal.month as i64);
            let at = |k: i64| add_months(renewal.year, renewal.month, k, anchor_day);
            while k > 0 && at(k) > today {
                k -= 1;
            }
            while at(k + 1) <= today {
                k += 1;
            }
            Some((at(k).max(renewal), at(k + 1)))
        }
    }

    fn old(x: NaiveDate) -> before::Ymd {
        before::Ymd { year: x.year(), month: x.month() as u8, day: x.day() as u8 }
    }

    /// A date in the years pg_billing accepts (1900 to 9999).
    fn date() -> impl Strategy<Value = NaiveDate> {
        (0i64..2_921_939).prop_map(|n| d(1900, 1, 1) + chrono::Days::new(n as u64))
    }

    proptest! {
        #[test]
        fn add_months_as_before(from in date(), months in -1200i64..1200, anchor in 0u8..40) {
            let new = add_months(from, months, anchor);
            let expected = before::add_months(from.year(), from.month() as u8, months, anchor);
            prop_assert_eq!(new.map(old), Some(expected));
            prop_assert_eq!(from.num_days_in_month(), before::days_in_month(from.year(), from.month() as u8));
        }

        #[test]
        fn advance_renewal_as_before(renewal in date(), anchor in 1u8..=31, ahead in -400i64..4000) {
            let today = renewal + chrono::TimeDelta::days(ahead);
            let new = advance_renewal(renewal, anchor, today);
            let expected = before::advance_renewal(old(renewal), anchor, old(today));
            prop_assert_eq!(new.map(|(a, b)| (old(a), old(b))), expected);
        }
    }

    #[test]
    fn generations_within_credits() {
        assert_eq!(plan_generation(5, 3, 6, false).unwrap(), Generation { from_credits: 6, overage: 0 });
        assert_eq!(plan_generation(0, 3, 3, false).unwrap(), Generation { from_credits: 3, overage: 0 });
    }

    #[test]
    fn generations_beyond_credits() {
        assert_eq!(plan_generation(2, 1, 5, true).unwrap(), Generation { from_credits: 3, overage: 2 });
        assert_eq!(plan_generation(0, 0, 1, true).unwrap(), Generation { from_credits: 0, overage: 1 });
        let e = plan_generation(2, 1, 5, false).unwrap_err();
        assert_eq!(e, BillingError::InsufficientCredits { needed: 5, subscription: 2, purchased: 1 });
        assert_eq!(plan_generation(2, 1, 0, true).unwrap_err().sqlstate(), "22023");
    }
}
