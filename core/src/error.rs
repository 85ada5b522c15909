//! One error type for the whole extension, mapped to the SQLSTATEs of SPEC section 3.

use std::fmt;

pub type Result<T, E = BillingError> = std::result::Result<T, E>;

/// Every way a pg_billing call can fail. Variants carry the numbers a caller needs; the message is
/// one sentence and the numbers also go to DETAIL/HINT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BillingError {
    /// `22023`: NULL where required, amount <= 0, unknown type/metric/plan, malformed value.
    InvalidArgument { message: String, hint: Option<String> },
    /// `22003`: a result would not fit its type (e.g. a balance past 2^63-1, a legacy integer total).
    OutOfRange { message: String, detail: Option<String> },
    /// `P0002`: unknown user, account or id.
    NotFound { message: String, hint: Option<String> },
    /// `42501`: acting on another user, or an end user calling a service-only function.
    Forbidden { message: String, hint: Option<String> },
    /// `PT402`: the account holds fewer credits than the call needs.
    InsufficientCredits { needed: i64, subscription: i64, purchased: i64 },
    /// `PT429`: a limit or rate limit was exceeded by a function that raises instead of returning
    /// `allowed = false`.
    LimitExceeded { message: String, limit: i64, current: i64 },
    /// `PT409`: an idempotency key was reused with different arguments.
    IdempotencyConflict { key: String, first_operation: String, operation: String },
    /// `PT410`: a credit hold expired (past its expiry plus `pg_billing.hold_capture_grace`) before
    /// it was captured or extended (0.5.0). Its credits went back to the balance at the expiry.
    HoldExpired { hold_id: String, expired_at: String, grace_seconds: i64 },
    /// `XX000`: a bug in pg_billing. Never caused by a caller's input.
    Internal { message: String },
}

impl BillingError {
    pub fn invalid(message: impl Into<String>) -> Self {
        BillingError::InvalidArgument { message: message.into(), hint: None }
    }

    pub fn invalid_with_hint(message: impl Into<String>, hint: impl Into<String>) -> Self {
        BillingError::InvalidArgument { message: message.into(), hint: Some(hint.into()) }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        BillingError::NotFound { message: message.into(), hint: None }
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        BillingError::Forbidden { message: message.into(), hint: None }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        BillingError::Internal { message: message.into() }
    }

    /// The five-character SQLSTATE.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            BillingError::InvalidArgument { .. } => "22023",
            BillingError::OutOfRange { .. } => "22003",
            BillingError::NotFound { .. } => "P0002",
            BillingError::Forbidden { .. } => "42501",
            BillingError::InsufficientCredits { .. } => "PT402",
            BillingError::LimitExceeded { .. } => "PT429",
            BillingError::IdempotencyConflict { .. } => "PT409",
            BillingError::HoldExpired { .. } => "PT410",
            BillingError::Internal { .. } => "XX000",
        }
    }

    /// The primary message: one sentence a person understands.
    pub fn message(&self) -> String {
        match self {
            BillingError::InvalidArgument { message, .. }
            | BillingError::OutOfRange { message, .. }
            | BillingError::NotFound { message, .. }
            | BillingError::Forbidden { message, .. }
            | BillingError::LimitExceeded { message, .. } => message.clone(),
            BillingError::InsufficientCredits { .. } => {
                "not enough credits for this operation".to_string()
            }
            BillingError::IdempotencyConflict { .. } => {
                "this idempotency key was already used with different arguments".to_string()
            }
            BillingError::HoldExpired { .. } => "the credit hold has expired".to_string(),
            BillingError::Internal { message } => format!("pg_billing internal error: {message}"),
        }
    }

    /// DETAIL: the numbers behind the message.
    pub fn detail(&self) -> Option<String> {
        match self {
            BillingError::InsufficientCredits { needed, subscription, purchased } => Some(format!(
                "needed {needed}, available {} (subscription {subscription}, purchased {purchased})",
                subscription.saturating_add(*purchased)
            )),
            BillingError::LimitExceeded { limit, current, .. } => {
                Some(format!("limit {limit}, current {current}"))
            }
            BillingError::IdempotencyConflict { key, first_operation, operation } => {
                if first_operation == operation {
                    Some(format!("key \"{key}\" was first used by {first_operation} with other arguments"))
                } else {
                    Some(format!("key \"{key}\" was first used by {first_operation}, not {operation}"))
                }
            }
            BillingError::OutOfRange { detail, .. } => detail.clone(),
            BillingError::HoldExpired { hold_id, expired_at, grace_seconds } => Some(format!(
                "hold {hold_id} expired at {expired_at}; captures are accepted until {grace_seconds} s after the expiry (pg_billing.hold_capture_grace)"
            )),
            _ => None,
        }
    }

    /// HINT: what the caller can do about it.
    pub fn hint(&self) -> Option<String> {
        match self {
            BillingError::InvalidArgument { hint, .. }
            | BillingError::NotFound { hint, .. }
            | BillingError::Forbidden { hint, .. } => hint.clone(),
            BillingError::InsufficientCredits { needed, subscription, purchased } => Some(format!(
                "add at least {} credits or consume fewer",
                needed.saturating_sub(subscription.saturating_add(*purchased))
            )),
            BillingError::IdempotencyConflict { .. } => {
                Some("use a new idempotency key for a different request".to_string())
            }
            BillingError::HoldExpired { .. } => Some(
                "its credits went back to the balance: charge the job with consume_credits, or reserve again; extend_hold keeps a long job's hold alive"
                    .to_string(),
            ),
            BillingError::Internal { .. } => {
                Some("this is a bug in pg_billing; please report it with the statement".to_string())
            }
            _ => None,
        }
    }
}

impl fmt::Display for BillingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message(), self.sqlstate())
    }
}

impl std::error::Error for BillingError {}

/// PostgreSQL's `MAKE_SQLSTATE`: five characters packed six bits each.
pub fn encode_sqlstate(code: &str) -> i32 {
    let b = code.as_bytes();
    debug_assert_eq!(b.len(), 5);
    let six = |c: u8| ((c.wrapping_sub(b'0')) & 0x3F) as i32;
    six(b[0]) + (six(b[1]) << 6) + (six(b[2]) << 12) + (six(b[3]) << 18) + (six(b[4]) << 24)
}

/// The inverse of [`encode_sqlstate`], for tests and messages.
pub fn decode_sqlstate(code: i32) -> String {
    (0..5).map(|i| (((code >> (6 * i)) & 0x3F) as u8 + b'0') as char).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_match_the_spec_table() {
        assert_eq!(BillingError::invalid("x").sqlstate(), "22023");
        assert_eq!(BillingError::not_found("x").sqlstate(), "P0002");
        assert_eq!(BillingError::forbidden("x").sqlstate(), "42501");
        let e = BillingError::InsufficientCredits { needed: 5, subscription: 1, purchased: 2 };
        assert_eq!(e.sqlstate(), "PT402");
        assert_eq!(e.detail().unwrap(), "needed 5, available 3 (subscription 1, purchased 2)");
        assert_eq!(e.hint().unwrap(), "add at least 2 credits or consume fewer");
        let e = BillingError::IdempotencyConflict {
            key: "k".into(),
            first_operation: "add_purchased_credits".into(),
            operation: "consume_credits_v2".into(),
        };
        assert_eq!(e.sqlstate(), "PT409");
        assert!(e.detail().unwrap().contains("not consume_credits_v2"));
        let e = BillingError::HoldExpired { hold_id: "h".into(), expired_at: "t".into(), grace_seconds: 60 };
        assert_eq!(e.sqlstate(), "PT410");
        assert!(e.detail().unwrap().contains("60 s"));
    }

    #[test]
    fn sqlstate_encoding_matches_postgres() {
        // ERRCODE_INSUFFICIENT_PRIVILEGE = MAKE_SQLSTATE('4','2','5','0','1') = 16877 in PG's errcodes.h
        // ERRCODE_INVALID_PARAMETER_VALUE ('22023') = 50331778 + ... ; check round trips and known values.
        assert_eq!(encode_sqlstate("42501"), 4 + (2 << 6) + (5 << 12) + (0 << 18) + (1 << 24));
        for code in ["22023", "22003", "P0002", "42501", "PT402", "PT409", "PT410", "PT429", "XX000"] {
            assert_eq!(decode_sqlstate(encode_sqlstate(code)), code);
        }
        assert_ne!(encode_sqlstate("PT402"), encode_sqlstate("XX000"));
    }
}
