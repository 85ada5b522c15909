//! Idempotency keys: a repeat with the same key and the same arguments replays the first result;
//! the same key with anything else is a conflict (`PT409`).

use serde_json::{Map, Value};

use crate::error::BillingError;

/// The canonical description of one request: the operation and its arguments. Stored with the
/// key and compared on every repeat.
pub fn fingerprint(operation: &str, args: &[(&str, Value)]) -> Value {
    let mut m = Map::new();
    m.insert("operation".into(), Value::String(operation.into()));
    let mut a = Map::new();
    for (k, v) in args {
        a.insert((*k).into(), v.clone());
    }
    m.insert("args".into(), Value::Object(a));
    Value::Object(m)
}

/// What to do with a key that was found already stored.
#[derive(Debug, PartialEq)]
pub enum Replay {
    /// Same operation, same arguments: return the stored result and change nothing.
    Same,
    /// Anything else: raise `PT409`.
    Conflict(BillingError),
}

/// Compare a stored fingerprint with the current one. Argument maps compare as JSON values,
/// so key order does not matter, but `null` and a missing argument are different requests
/// only when the operation records them differently (it always records every argument).
pub fn compare(key: &str, stored: &Value, current: &Value) -> Replay {
    if stored == current {
        return Replay::Same;
    }
    let op = |v: &Value| v.get("operation").and_then(Value::as_str).unwrap_or("?").to_string();
    Replay::Conflict(BillingError::IdempotencyConflict {
        key: key.to_string(),
        first_operation: op(stored),
        operation: op(current),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn same_request_replays() {
        let a = fingerprint("consume_credits_v2", &[("p_amount", json!(5)), ("p_description", Value::Null)]);
        let b = fingerprint("consume_credits_v2", &[("p_description", Value::Null), ("p_amount", json!(5))]);
        assert_eq!(compare("k", &a, &b), Replay::Same);
    }

    #[test]
    fn different_arguments_conflict() {
        let a = fingerprint("consume_credits_v2", &[("p_amount", json!(5))]);
        let b = fingerprint("consume_credits_v2", &[("p_amount", json!(6))]);
        match compare("k", &a, &b) {
            Replay::Conflict(e) => assert_eq!(e.sqlstate(), "PT409"),
            other => panic!("expected a conflict, got {other:?}"),
        }
        let c = fingerprint("consume_credits_v2", &[("p_amount", json!(5)), ("p_description", json!("x"))]);
        assert!(matches!(compare("k", &a, &c), Replay::Conflict(_)));
    }

    #[test]
    fn different_operation_conflicts_and_says_which() {
        let a = fingerprint("add_purchased_credits", &[("p_amount", json!(5))]);
        let b = fingerprint("consume_credits_v2", &[("p_amount", json!(5))]);
        match compare("k", &a, &b) {
            Replay::Conflict(e) => {
                assert!(e.detail().unwrap().contains("add_purchased_credits"));
                assert!(e.detail().unwrap().contains("consume_credits_v2"));
            }
            other => panic!("expected a conflict, got {other:?}"),
        }
    }

    #[test]
    fn null_and_empty_string_differ() {
        let a = fingerprint("refund_credits", &[("p_reason", Value::Null)]);
        let b = fingerprint("refund_credits", &[("p_reason", json!(""))]);
        assert!(matches!(compare("k", &a, &b), Replay::Conflict(_)));
    }
}
