//! API rate limits (SPEC 6): how a request's endpoint is keyed in its hour bucket.
//!
//! Each user's hour bucket (`billing.api_usage`) keeps per-endpoint counts in one jsonb object,
//! rewritten on every request, so its size is bounded (0.3.0): a key is at most
//! `ENDPOINT_KEY_CHARS` characters of the endpoint, at most `MAX_ENDPOINTS` distinct endpoints
//! are counted by name per bucket, and requests to any further endpoint are counted under
//! `OTHER_ENDPOINTS`. The request itself is always counted in `request_count`.

use crate::error::Result;
use crate::validate;

/// Distinct endpoints counted by name in one user's hour bucket.
pub const MAX_ENDPOINTS: i32 = 32;
/// Characters of an endpoint kept in its key (longer endpoints share the key of their prefix).
pub const ENDPOINT_KEY_CHARS: usize = 64;
/// The key of requests to endpoints past the first `MAX_ENDPOINTS` of a bucket.
pub const OTHER_ENDPOINTS: &str = "(other)";
/// The key of requests without an endpoint.
pub const NO_ENDPOINT: &str = "*";

/// The key under which a request to `endpoint` is counted (before the per-bucket cap): NULL or
/// empty is `*`, anything else its first `ENDPOINT_KEY_CHARS` characters. An endpoint longer
/// than `validate::MAX_KEY` characters or containing NUL is `22023`, as before.
pub fn endpoint_key(endpoint: Option<&str>) -> Result<String> {
    Ok(match validate::key("p_endpoint", endpoint)? {
        None => NO_ENDPOINT.to_string(),
        Some(e) => e.chars().take(ENDPOINT_KEY_CHARS).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        assert_eq!(endpoint_key(None).unwrap(), "*");
        assert_eq!(endpoint_key(Some("")).unwrap(), "*");
        assert_eq!(endpoint_key(Some("/v1/render")).unwrap(), "/v1/render");
        let long = "é".repeat(200);
        let k = endpoint_key(Some(&long)).unwrap();
        assert_eq!(k.chars().count(), ENDPOINT_KEY_CHARS);
        assert!(long.starts_with(&k));
        assert_eq!(endpoint_key(Some(&"x".repeat(255))).unwrap().len(), ENDPOINT_KEY_CHARS);
        assert_eq!(endpoint_key(Some(&"x".repeat(256))).unwrap_err().sqlstate(), "22023");
        assert_eq!(endpoint_key(Some("a\0b")).unwrap_err().sqlstate(), "22023");
    }
}
