//! Batches (0.6.0; issue 16): the items of record_usage_batch and consume_credits_batch, read
//! and checked one by one, so one bad item is reported as its own result and the others go on.

use serde_json::{Map, Value};

use crate::error::{BillingError, Result};

/// The most items one batch may hold.
pub const MAX_ITEMS: usize = 10_000;

/// How far back an event's occurred_at may lie (35 days) and ahead (5 minutes), in microseconds.
pub const MAX_PAST_MICROS: i64 = 35 * 86_400_000_000;
pub const MAX_FUTURE_MICROS: i64 = 5 * 60_000_000;

/// The usage metrics an event may count, in the order of billing.usage_metrics' columns that
/// RECORD_BATCH (src/api/batch.rs) adds them to.
pub const METRICS: &[&str] =
    &["messages", "conversations", "tokens_input", "tokens_output", "documents", "chunks", "generations", "api_calls"];

/// The array of a batch argument: a JSON array of 1 to 10,000 objects.
pub fn items<'a>(name: &str, v: &'a Value) -> Result<&'a Vec<Value>> {
    match v {
        Value::Array(a) if !a.is_empty() && a.len() <= MAX_ITEMS => Ok(a),
        Value::Array(a) if a.is_empty() => Err(BillingError::invalid(format!("{name} is an empty array"))),
        Value::Array(a) => Err(BillingError::invalid_with_hint(
            format!("{name} holds {} items, more than {MAX_ITEMS}", a.len()),
            "split it into batches of at most 10000",
        )),
        _ => Err(BillingError::invalid_with_hint(format!("{name} must be a JSON array"), "pass [{...}, {...}]")),
    }
}

fn object<'a>(v: &'a Value) -> Result<&'a Map<String, Value>> {
    v.as_object().ok_or_else(|| BillingError::invalid("each item must be a JSON object"))
}

fn field<'a>(o: &'a Map<String, Value>, k: &str) -> Option<&'a Value> {
    o.get(k).filter(|v| !v.is_null())
}

fn known_fields(o: &Map<String, Value>, known: &[&str]) -> Result<()> {
    match o.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(BillingError::invalid_with_hint(
            format!("unknown field \"{}\"", crate::plans::truncate(k, 64)),
            format!("an item's fields: {}", known.join(", ")),
        )),
        None => Ok(()),
    }
}

/// A uuid in its text form.
pub fn uuid(name: &str, v: Option<&Value>) -> Result<[u8; 16]> {
    let s = match v {
        Some(Value::String(s)) => s,
        Some(_) => return Err(BillingError::invalid(format!("{name} must be a uuid string"))),
        None => return Err(BillingError::invalid(format!("{name} is missing"))),
    };
    crate::ids::parse_uuid(s).ok_or_else(|| BillingError::invalid(format!("{name} is not a uuid")))
}

fn text<'a>(name: &str, v: Option<&'a Value>, max: usize) -> Result<Option<&'a str>> {
    match v {
        None => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Err(BillingError::invalid(format!("{name} must not be empty"))),
        Some(Value::String(s)) if s.chars().count() > max => {
            Err(BillingError::invalid(format!("{name} must be at most {max} characters")))
        }
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(BillingError::invalid(format!("{name} must be a string"))),
    }
}

fn integer(name: &str, v: Option<&Value>, min: i64, max: i64) -> Result<Option<i64>> {
    match v {
        None => Ok(None),
        Some(Value::Number(n)) => match n.as_i64() {
            Some(i) if (min..=max).contains(&i) => Ok(Some(i)),
            _ => Err(BillingError::invalid(format!("{name} must be an integer from {min} to {max}"))),
        },
        Some(_) => Err(BillingError::invalid(format!("{name} must be a number"))),
    }
}

/// An RFC 3339 timestamp (`2026-12-02T10:00:00Z`, `...+02:00`, fractions to microseconds) as
/// PostgreSQL microseconds since 2000-01-01 UTC.
pub fn rfc3339_micros(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = b.get(r)?;
        if part.iter().all(u8::is_ascii_digit) {
            std::str::from_utf8(part).ok()?.parse().ok()
        } else {
            None
        }
    };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (y, mo, d, h, mi, sec) = (num(0..4)?, num(5..7)?, num(8..10)?, num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || d < 1 || d > days_in_month(y, mo) || h > 23 || mi > 59 || sec > 59 {
        return None;
    }
    let mut i = 19;
    let mut frac = 0i64;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        let digits = &s[start..i];
        if digits.is_empty() {
            return None;
        }
        let mut micro = String::from(&digits[..digits.len().min(6)]);
        while micro.len() < 6 {
            micro.push('0');
        }
        frac = micro.parse().ok()?;
    }
    let offset = match b.get(i) {
        Some(b'Z' | b'z') if i + 1 == b.len() => 0,
        Some(sign @ (b'+' | b'-')) if i + 6 == b.len() && b[i + 3] == b':' => {
            let (oh, om) = (num(i + 1..i + 3)?, num(i + 4..i + 6)?);
            if oh > 23 || om > 59 {
                return None;
            }
            let o = (oh * 60 + om) * 60_000_000;
            if *sign == b'+' { o } else { -o }
        }
        _ => return None,
    };
    let days = days_from_civil(y, mo, d) - days_from_civil(2000, 1, 1);
    Some(((days * 86_400 + h * 3600 + mi * 60 + sec) * 1_000_000 + frac) - offset)
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// One usage event of record_usage_batch.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageEvent {
    pub user: [u8; 16],
    /// Index into [`METRICS`].
    pub metric: usize,
    pub value: i64,
    pub key: Option<String>,
    /// PostgreSQL microseconds.
    pub occurred_at: i64,
}

/// Read one event; `now` is the transaction's start (PostgreSQL microseconds).
pub fn usage_event(v: &Value, now: i64) -> Result<UsageEvent> {
    let o = object(v)?;
    known_fields(o, &["user_id", "metric", "value", "idempotency_key", "occurred_at"])?;
    let user = uuid("user_id", field(o, "user_id"))?;
    let metric = match field(o, "metric") {
        Some(Value::String(m)) => METRICS.iter().position(|x| x == m).ok_or_else(|| {
            BillingError::invalid_with_hint(
                format!("metric \"{}\" is not known", crate::plans::truncate(m, 64)),
                format!("metric must be one of: {}", METRICS.join(", ")),
            )
        })?,
        Some(_) => return Err(BillingError::invalid("metric must be a string")),
        None => return Err(BillingError::invalid("metric is missing")),
    };
    let value = integer("value", field(o, "value"), 0, i32::MAX as i64)?.unwrap_or(1);
    let key = text("idempotency_key", field(o, "idempotency_key"), 255)?.map(str::to_string);
    let occurred_at = match field(o, "occurred_at") {
        None => now,
        Some(Value::String(s)) => rfc3339_micros(s).ok_or_else(|| {
            BillingError::invalid_with_hint(
                "occurred_at is not an RFC 3339 timestamp",
                "such as 2026-12-02T10:00:00Z or 2026-12-02T11:00:00.5+01:00",
            )
        })?,
        Some(_) => return Err(BillingError::invalid("occurred_at must be a string")),
    };
    if occurred_at < now - MAX_PAST_MICROS || occurred_at > now + MAX_FUTURE_MICROS {
        return Err(BillingError::invalid_with_hint(
            "occurred_at is outside the accepted window",
            "events are accepted from 35 days ago to 5 minutes ahead",
        ));
    }
    Ok(UsageEvent { user, metric, value, key, occurred_at })
}

/// One item of consume_credits_batch.
#[derive(Debug, Clone, PartialEq)]
pub struct ConsumeItem {
    pub user: [u8; 16],
    pub amount: i64,
    pub description: Option<String>,
    pub reference: Option<String>,
    pub key: Option<String>,
}

pub fn consume_item(v: &Value) -> Result<ConsumeItem> {
    let o = object(v)?;
    known_fields(o, &["user_id", "amount", "description", "reference_id", "idempotency_key"])?;
    let user = uuid("user_id", field(o, "user_id"))?;
    let amount = integer("amount", field(o, "amount"), 1, i32::MAX as i64)?
        .ok_or_else(|| BillingError::invalid("amount is missing"))?;
    Ok(ConsumeItem {
        user,
        amount,
        description: text("description", field(o, "description"), 1000)?.map(str::to_string),
        reference: text("reference_id", field(o, "reference_id"), 255)?.map(str::to_string),
        key: text("idempotency_key", field(o, "idempotency_key"), 255)?.map(str::to_string),
    })
}

/// The order a batch touches its users in (by user, stable): every batch locks rows in the same
/// order, so two batches never wait for each other in a cycle.
pub fn by_user<T>(items: &[(usize, T)], user: impl Fn(&T) -> [u8; 16]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by_key(|&i| user(&items[i].1));
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW: i64 = 848_102_400_000_000; // 2026-11-16T00:00:00Z in PostgreSQL microseconds

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339_micros("2000-01-01T00:00:00Z"), Some(0));
        assert_eq!(rfc3339_micros("2000-01-01T01:00:00+01:00"), Some(0));
        assert_eq!(rfc3339_micros("1999-12-31T23:59:59.5Z"), Some(-500_000));
        assert_eq!(rfc3339_micros("2026-11-16T00:00:00Z"), Some(NOW));
        assert_eq!(rfc3339_micros("2024-02-29T00:00:00.1234567Z"), rfc3339_micros("2024-02-29T00:00:00.123456Z"));
        assert_eq!(rfc3339_micros("2023-02-29T00:00:00Z"), None);
        assert_eq!(rfc3339_micros("2026-11-16"), None);
        assert_eq!(rfc3339_micros("2026-11-16T00:00:00"), None);
        assert_eq!(rfc3339_micros("2026-11-16T24:00:00Z"), None);
        assert_eq!(rfc3339_micros("2026-11-16T00:00:00.Z"), None);
    }

    #[test]
    fn events() {
        let u = "e0000000-0000-4000-8000-000000000001";
        let e = usage_event(&json!({"user_id": u, "metric": "tokens_input", "value": 7, "idempotency_key": "k1"}), NOW).unwrap();
        assert_eq!((e.metric, e.value, e.key.as_deref(), e.occurred_at), (2, 7, Some("k1"), NOW));
        assert_eq!(usage_event(&json!({"user_id": u, "metric": "messages"}), NOW).unwrap().value, 1);
        for bad in [
            json!({"metric": "messages"}),
            json!({"user_id": "nope", "metric": "messages"}),
            json!({"user_id": u, "metric": "unknown"}),
            json!({"user_id": u, "metric": "messages", "value": -1}),
            json!({"user_id": u, "metric": "messages", "value": 1.5}),
            json!({"user_id": u, "metric": "messages", "extra": 1}),
            json!({"user_id": u, "metric": "messages", "idempotency_key": ""}),
            json!({"user_id": u, "metric": "messages", "occurred_at": "2026-10-01T00:00:00Z"}),
            json!({"user_id": u, "metric": "messages", "occurred_at": "2026-11-16T00:06:00Z"}),
            json!([1]),
        ] {
            let err = usage_event(&bad, NOW).unwrap_err();
            assert_eq!(err.sqlstate(), "22023", "{bad}");
        }
        assert!(usage_event(&json!({"user_id": u, "metric": "messages", "occurred_at": "2026-10-13T00:00:00Z"}), NOW).is_ok());
        assert!(usage_event(&json!({"user_id": u, "metric": "messages", "occurred_at": "2026-11-16T00:04:59Z"}), NOW).is_ok());
    }

    #[test]
    fn consume_items_and_batches() {
        let u = "e0000000-0000-4000-8000-000000000001";
        assert_eq!(consume_item(&json!({"user_id": u, "amount": 5})).unwrap().amount, 5);
        assert!(consume_item(&json!({"user_id": u, "amount": 0})).is_err());
        assert!(consume_item(&json!({"user_id": u})).is_err());
        assert!(items("p_items", &json!([])).is_err());
        assert!(items("p_items", &json!({})).is_err());
        assert!(items("p_items", &Value::Array(vec![json!({}); MAX_ITEMS + 1])).is_err());
        assert_eq!(items("p_items", &json!([{}])).unwrap().len(), 1);
        let v = vec![(0, 3u8), (1, 1u8), (2, 3u8), (3, 2u8)];
        assert_eq!(by_user(&v, |x| [*x; 16]), vec![1, 3, 0, 2]);
    }
}
