//! Argument checks shared by every function. All failures are `22023` with the parameter's name.

use chrono::Datelike;

use crate::error::{BillingError, Result};

/// Longest free text (descriptions, reasons) stored in the ledger.
pub const MAX_TEXT: usize = 1000;
/// Longest identifier-like text (reference ids, idempotency keys, event ids, providers).
pub const MAX_KEY: usize = 255;

pub fn required<T>(name: &str, value: Option<T>) -> Result<T> {
    value.ok_or_else(|| BillingError::invalid(format!("{name} must not be NULL")))
}

/// A credit amount: present and > 0.
pub fn positive_amount(name: &str, value: Option<i32>) -> Result<i64> {
    let v = required(name, value)?;
    if v <= 0 {
        return Err(BillingError::invalid_with_hint(
            format!("{name} must be a positive whole number"),
            format!("{name} was {v}"),
        ));
    }
    Ok(v as i64)
}

fn bounded<'a>(name: &str, value: Option<&'a str>, max: usize) -> Result<Option<&'a str>> {
    match value {
        Some(v) if v.chars().count() > max => Err(BillingError::invalid_with_hint(
            format!("{name} is too long"),
            format!("at most {max} characters are allowed"),
        )),
        Some(v) if v.contains('\0') => Err(BillingError::invalid(format!("{name} contains a NUL character"))),
        other => Ok(other),
    }
}

/// Optional free text (description, reason).
pub fn text<'a>(name: &str, value: Option<&'a str>) -> Result<Option<&'a str>> {
    bounded(name, value, MAX_TEXT)
}

/// Optional short key (reference id, idempotency key). Empty strings count as absent.
pub fn key<'a>(name: &str, value: Option<&'a str>) -> Result<Option<&'a str>> {
    Ok(bounded(name, value, MAX_KEY)?.filter(|v| !v.is_empty()))
}

/// A required short key, such as a webhook event id.
pub fn required_key<'a>(name: &str, value: Option<&'a str>) -> Result<&'a str> {
    key(name, value)?.ok_or_else(|| BillingError::invalid(format!("{name} must not be NULL or empty")))
}

/// A ledger transaction type given by a legacy caller: any non-empty text up to 64 characters
/// (SPEC 4: `purchase` goes to the purchased pool, anything else to the subscription pool).
pub fn transaction_type(name: &str, value: &str) -> Result<()> {
    if value.trim().is_empty() {
        return Err(BillingError::invalid(format!("{name} must not be empty")));
    }
    bounded(name, Some(value), 64).map(|_| ())
}

/// Does a legacy transaction type name a purchase? Compared case-insensitively after trimming
/// spaces, so `Purchase`, `PURCHASE` and `purchase ` reach the purchased pool (which never
/// expires) instead of landing, silently, in the subscription pool (issue 10 item 5).
pub fn is_purchase_type(value: &str) -> bool {
    value.trim().eq_ignore_ascii_case("purchase")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts() {
        assert_eq!(positive_amount("p_amount", Some(5)).unwrap(), 5);
        assert_eq!(positive_amount("p_amount", Some(i32::MAX)).unwrap(), i32::MAX as i64);
        for bad in [None, Some(0), Some(-1), Some(i32::MIN)] {
            assert_eq!(positive_amount("p_amount", bad).unwrap_err().sqlstate(), "22023");
        }
        assert!(positive_amount("p_amount", None).unwrap_err().message().contains("p_amount"));
    }

    #[test]
    fn texts_and_keys() {
        assert_eq!(text("d", Some("ok")).unwrap(), Some("ok"));
        assert!(text("d", Some(&"x".repeat(MAX_TEXT + 1))).is_err());
        assert_eq!(text("d", Some(&"é".repeat(MAX_TEXT))).unwrap().map(str::len), Some(2 * MAX_TEXT));
        assert_eq!(key("k", Some("")).unwrap(), None);
        assert!(key("k", Some(&"k".repeat(MAX_KEY + 1))).is_err());
        assert!(required_key("e", Some("")).is_err());
        assert!(required_key("e", None).is_err());
    }

    #[test]
    fn transaction_types() {
        for ok in ["purchase", "usage", "bonus_2024", "admin-grant", "Bonus", "promo:2024", "récompense", "subscription renewal"] {
            transaction_type("t", ok).unwrap();
        }
        for bad in ["", "   ", &"a".repeat(65)] {
            assert_eq!(transaction_type("t", bad).unwrap_err().sqlstate(), "22023");
        }
    }

    #[test]
    fn purchase_types() {
        for p in ["purchase", "Purchase", "PURCHASE", "purchase ", " Purchase\t"] {
            assert!(is_purchase_type(p), "{p:?}");
        }
        for other in ["purchases", "purchased", "credit_purchase", "pur chase", "usage", "", "\u{212A}purchase"] {
            assert!(!is_purchase_type(other), "{other:?}");
        }
    }
}

/// A PostgreSQL timestamptz (microseconds since 2000-01-01 00:00 UTC) as ISO 8601 in UTC, the
/// same text whatever the session's TimeZone and DateStyle (for fingerprints and results).
/// Years before 1 are astronomical (0 is 1 BC), as in ISO 8601.
pub fn iso_utc(pg_micros: i64) -> String {
    if pg_micros == i64::MAX {
        return "infinity".into();
    }
    if pg_micros == i64::MIN {
        return "-infinity".into();
    }
    /// Days in 400 Gregorian years: the calendar repeats after them.
    const CYCLE_DAYS: i64 = 146_097;
    let secs = pg_micros.div_euclid(1_000_000);
    let micros = pg_micros.rem_euclid(1_000_000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // PostgreSQL reaches year 294,276 and chrono +-262,143: compute the date within its 400-year
    // cycle from 2000-01-01 (a cycle start) and add the whole cycles to the year.
    let cycles = days.div_euclid(CYCLE_DAYS);
    let date = PG_EPOCH + chrono::Days::new(days.rem_euclid(CYCLE_DAYS) as u64);
    let y = i64::from(date.year()) + 400 * cycles;
    format!(
        "{y:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        date.month(),
        date.day(),
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

/// PostgreSQL's epoch, 2000-01-01.
const PG_EPOCH: chrono::NaiveDate = match chrono::NaiveDate::from_ymd_opt(2000, 1, 1) {
    Some(d) => d,
    None => panic!("2000-01-01 is a date"),
};

#[cfg(test)]
mod time_tests {
    use super::iso_utc;
    use proptest::prelude::*;

    /// 0.2.0's hand-written calendar (Howard Hinnant's civil_from_days), kept to check chrono's.
    fn iso_utc_before(pg_micros: i64) -> String {
        const UNIX_TO_PG_DAYS: i64 = 10_957;
        let secs = pg_micros.div_euclid(1_000_000);
        let micros = pg_micros.rem_euclid(1_000_000);
        let days = secs.div_euclid(86_400) + UNIX_TO_PG_DAYS;
        let sod = secs.rem_euclid(86_400);
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = doy - (153 * mp + 2) / 5 + 1;
        let m = if mp < 10 { mp + 3 } else { mp - 9 };
        let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
        format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}Z", sod / 3600, sod % 3600 / 60, sod % 60)
    }

    /// PostgreSQL's timestamp range: 4714-11-24 BC 00:00 to 294276-12-31 23:59:59.999999 UTC.
    const PG_MIN: i64 = -211_813_488_000_000_000;
    const PG_MAX: i64 = 9_223_371_331_200_000_000 - 1;

    proptest! {
        /// Fingerprints stored by 0.2.0 hold this text: it must not change.
        #[test]
        fn iso_utc_as_before(t in PG_MIN..PG_MAX) {
            prop_assert_eq!(iso_utc(t), iso_utc_before(t));
        }

        #[test]
        fn iso_utc_as_before_near_2000(t in -4_000_000_000_000_000i64..4_000_000_000_000_000) {
            prop_assert_eq!(iso_utc(t), iso_utc_before(t));
        }
    }

    #[test]
    fn iso_utc_extremes() {
        for t in [PG_MIN, PG_MIN + 1, PG_MAX, PG_MAX - 1, 0, -1, 1, i64::MAX - 1, i64::MIN + 1] {
            assert_eq!(iso_utc(t), iso_utc_before(t), "{t}");
        }
        assert_eq!(iso_utc(PG_MIN), "-4713-11-24T00:00:00.000000Z");
        assert_eq!(iso_utc(PG_MAX), "294276-12-31T23:59:59.999999Z");
    }

    #[test]
    fn iso_utc_matches_postgres() {
        assert_eq!(iso_utc(0), "2000-01-01T00:00:00.000000Z");
        assert_eq!(iso_utc(-1), "1999-12-31T23:59:59.999999Z");
        // SELECT extract(epoch from '2030-03-31 12:34:56.5+00'::timestamptz - '2000-01-01+00') * 1e6
        assert_eq!(iso_utc(954_506_096_500_000), "2030-03-31T12:34:56.500000Z");
        assert_eq!(iso_utc(4_107_456_000_000_000), "2130-02-28T00:00:00.000000Z");
        assert_eq!(iso_utc(i64::MAX), "infinity");
        assert_eq!(iso_utc(i64::MIN), "-infinity");
    }
}

/// PostgreSQL microseconds (since 2000-01-01 UTC) of 1900-01-01 and of 9999-12-31 23:59:59.
const MIN_SANE_MICROS: i64 = -3_155_673_600_000_000;
const MAX_SANE_MICROS: i64 = 252_455_615_999_000_000;

/// A timestamp argument that pg_billing does arithmetic on (adds periods to) must fall in the
/// years 1900 to 9999, so that arithmetic cannot leave PostgreSQL's range (22023, not 22008).
pub fn sane_timestamp(name: &str, pg_micros: Option<i64>) -> Result<()> {
    match pg_micros {
        Some(t) if !(MIN_SANE_MICROS..=MAX_SANE_MICROS).contains(&t) => Err(BillingError::invalid_with_hint(
            format!("{name} is out of range"),
            "timestamps must fall in the years 1900 to 9999",
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod sane_tests {
    use super::*;

    #[test]
    fn sane_timestamps() {
        sane_timestamp("t", None).unwrap();
        sane_timestamp("t", Some(0)).unwrap();
        sane_timestamp("t", Some(MIN_SANE_MICROS)).unwrap();
        sane_timestamp("t", Some(MAX_SANE_MICROS)).unwrap();
        assert_eq!(iso_utc(MAX_SANE_MICROS), "9999-12-31T23:59:59.000000Z");
        assert_eq!(iso_utc(MIN_SANE_MICROS), "1900-01-01T00:00:00.000000Z");
        for bad in [i64::MAX, i64::MIN, MAX_SANE_MICROS + 1, MIN_SANE_MICROS - 1] {
            assert_eq!(sane_timestamp("t", Some(bad)).unwrap_err().sqlstate(), "22023");
        }
    }
}
