//! Who is calling. PostgREST sets `role` (SET LOCAL ROLE) and `request.jwt.claims`; Supabase's
//! `auth.uid()` reads the `sub` claim. A caller is an *end user* when the request's role is one
//! of `pg_billing.end_user_roles`; everyone else holding EXECUTE is a *service* caller.

use serde_json::Value;

use crate::error::{BillingError, Result};

/// The raw request context, read from GUCs by the pgrx layer.
#[derive(Debug, Default, Clone)]
pub struct RequestContext<'a> {
    /// GUC `request.jwt.claims` (JSON), if set.
    pub claims: Option<&'a str>,
    /// GUC `request.jwt.claim.sub` (older PostgREST), if set.
    pub claim_sub: Option<&'a str>,
    /// GUC `role`: what SET ROLE set (`none` when not set).
    pub role: Option<&'a str>,
    /// The session user (the login role).
    pub session_user: &'a str,
    /// GUC `pg_billing.end_user_roles`: comma-separated.
    pub end_user_roles: &'a str,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Service,
    EndUser { role: String, user_id: Option<[u8; 16]>, email: Option<String> },
}

fn non_empty(s: Option<&str>) -> Option<&str> {
    s.map(str::trim).filter(|s| !s.is_empty())
}

pub use crate::ids::parse_uuid;

impl RequestContext<'_> {
    fn is_end_user_role(&self, role: &str) -> bool {
        self.end_user_roles.split(',').map(str::trim).any(|r| !r.is_empty() && r == role)
    }

    /// Resolve the caller. The request is an end user's when the JWT's `role` claim *or* the
    /// role in effect (SET ROLE, else the login role) is an end-user role: a session that is
    /// really `authenticated` cannot become a service caller by writing a claim, and a claim of
    /// `authenticated` makes even a privileged connection act as that end user.
    pub fn resolve(&self) -> Result<Caller> {
        let claims: Option<Value> = match non_empty(self.claims) {
            None => None,
            Some(text) => Some(serde_json::from_str(text).map_err(|_| {
                BillingError::forbidden("request.jwt.claims is not valid JSON, so the caller cannot be identified")
            })?),
        };
        let claim = |name: &str| {
            claims.as_ref().and_then(|c| c.get(name)).and_then(Value::as_str).map(str::to_string)
        };
        let set_role = non_empty(self.role).filter(|r| *r != "none").unwrap_or(self.session_user);
        let claim_role = claim("role");
        let end_user_role = match claim_role.as_deref() {
            Some(r) if self.is_end_user_role(r) => Some(r.to_string()),
            _ if self.is_end_user_role(set_role) => Some(set_role.to_string()),
            _ => None,
        };
        let Some(role) = end_user_role else {
            return Ok(Caller::Service);
        };
        let sub = non_empty(self.claim_sub).map(str::to_string).or_else(|| claim("sub"));
        let user_id = match sub {
            None => None,
            Some(s) => Some(parse_uuid(&s).ok_or_else(|| {
                BillingError::forbidden("the JWT's sub claim is not a uuid, so the caller cannot be identified")
            })?),
        };
        Ok(Caller::EndUser { role, user_id, email: claim("email") })
    }
}

impl Caller {
    /// An end user may act only on their own account; service callers on any.
    pub fn authorize_user(&self, user_id: &[u8; 16]) -> Result<()> {
        match self {
            Caller::Service => Ok(()),
            Caller::EndUser { user_id: None, role, .. } => Err(BillingError::Forbidden {
                message: format!("the {role} role must sign in to act on an account"),
                hint: Some("send a JWT whose sub claim is the user's id".into()),
            }),
            Caller::EndUser { user_id: Some(me), .. } if me == user_id => Ok(()),
            Caller::EndUser { .. } => Err(BillingError::Forbidden {
                message: "an end user may act only on their own account".into(),
                hint: Some("p_user_id must be the id in the JWT's sub claim".into()),
            }),
        }
    }

    /// Whether an end user's JWT `email` claim is `email` (already normalised with
    /// [`crate::members::normalize_email`]). The claim is normalised the same single way
    /// (ASCII-only lower-casing, see [`crate::members::email_key`]), so U+212A KELVIN SIGN in a
    /// claim never matches `k`. A caller without an `email` claim matches nothing; service
    /// callers have no claim to compare and match nothing either.
    pub fn email_claim_is(&self, email: &str) -> bool {
        match self {
            Caller::EndUser { email: Some(claim), .. } => {
                crate::members::normalize_email("email claim", Some(claim)).map(|c| c == email).unwrap_or(false)
            }
            _ => false,
        }
    }

    /// Service-only functions refuse end users even if they were granted EXECUTE by mistake.
    pub fn require_service(&self, function: &str) -> Result<()> {
        match self {
            Caller::Service => Ok(()),
            Caller::EndUser { role, .. } => Err(BillingError::Forbidden {
                message: format!("{function} may be called only by a service role, not by {role}"),
                hint: Some("call it from your backend with the service_role key".into()),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROLES: &str = "anon,authenticated";
    const U1: &str = "11111111-1111-1111-1111-111111111111";

    fn ctx<'a>(claims: Option<&'a str>, role: Option<&'a str>, session: &'a str) -> RequestContext<'a> {
        RequestContext { claims, claim_sub: None, role, session_user: session, end_user_roles: ROLES }
    }

    #[test]
    fn postgres_without_claims_is_service() {
        assert_eq!(ctx(None, Some("none"), "postgres").resolve().unwrap(), Caller::Service);
        assert_eq!(ctx(Some(""), None, "postgres").resolve().unwrap(), Caller::Service);
    }

    #[test]
    fn postgrest_authenticated_request() {
        let claims = format!(r#"{{"sub":"{U1}","role":"authenticated","email":"a@b.c"}}"#);
        let c = ctx(Some(&claims), Some("authenticated"), "authenticator").resolve().unwrap();
        let me = parse_uuid(U1).unwrap();
        assert_eq!(c, Caller::EndUser { role: "authenticated".into(), user_id: Some(me), email: Some("a@b.c".into()) });
        c.authorize_user(&me).unwrap();
        let other = parse_uuid("22222222-2222-2222-2222-222222222222").unwrap();
        assert_eq!(c.authorize_user(&other).unwrap_err().sqlstate(), "42501");
        assert_eq!(c.require_service("add_purchased_credits").unwrap_err().sqlstate(), "42501");
    }

    #[test]
    fn email_claims_compare_without_unicode_folding() {
        let claims = format!(r#"{{"sub":"{U1}","role":"authenticated","email":" Kate@Example.COM"}}"#);
        let c = ctx(Some(&claims), Some("authenticated"), "authenticator").resolve().unwrap();
        assert!(c.email_claim_is("kate@example.com"));
        // U+212A KELVIN SIGN: lower-cases to 'k' under Unicode rules, but is another address
        let claims = format!("{{\"sub\":\"{U1}\",\"role\":\"authenticated\",\"email\":\"\u{212A}ate@example.com\"}}");
        let c = ctx(Some(&claims), Some("authenticated"), "authenticator").resolve().unwrap();
        assert!(!c.email_claim_is("kate@example.com"));
        assert!(c.email_claim_is("\u{212A}ate@example.com"));
        assert!(!Caller::Service.email_claim_is("kate@example.com"));
    }

    #[test]
    fn service_role_request() {
        let c = ctx(Some(r#"{"role":"service_role"}"#), Some("service_role"), "authenticator").resolve().unwrap();
        assert_eq!(c, Caller::Service);
    }

    #[test]
    fn anon_has_no_identity() {
        let c = ctx(Some(r#"{"role":"anon"}"#), Some("anon"), "authenticator").resolve().unwrap();
        let me = parse_uuid(U1).unwrap();
        assert_eq!(c.authorize_user(&me).unwrap_err().sqlstate(), "42501");
    }

    #[test]
    fn forged_service_claim_does_not_lift_an_end_user_role() {
        let c = ctx(Some(r#"{"role":"service_role"}"#), Some("authenticated"), "authenticator").resolve().unwrap();
        assert!(matches!(c, Caller::EndUser { .. }));
        // logged in directly as an end-user role, no SET ROLE
        let c = ctx(Some(r#"{"role":"service_role"}"#), Some("none"), "anon").resolve().unwrap();
        assert!(matches!(c, Caller::EndUser { .. }));
    }

    #[test]
    fn set_role_without_claims() {
        let c = ctx(None, Some("authenticated"), "postgres").resolve().unwrap();
        assert!(matches!(c, Caller::EndUser { user_id: None, .. }));
    }

    #[test]
    fn legacy_claim_sub_guc_wins() {
        let mut r = ctx(Some(r#"{"role":"authenticated","sub":"22222222-2222-2222-2222-222222222222"}"#), Some("authenticated"), "x");
        r.claim_sub = Some(U1);
        match r.resolve().unwrap() {
            Caller::EndUser { user_id, .. } => assert_eq!(user_id, parse_uuid(U1)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn malformed_claims_are_refused() {
        assert_eq!(ctx(Some("{not json"), Some("authenticated"), "x").resolve().unwrap_err().sqlstate(), "42501");
        assert_eq!(ctx(Some(r#"{"role":"authenticated","sub":"nope"}"#), None, "x").resolve().unwrap_err().sqlstate(), "42501");
    }

    #[test]
    fn custom_end_user_roles() {
        let mut r = ctx(None, Some("web_user"), "x");
        assert_eq!(r.resolve().unwrap(), Caller::Service);
        r.end_user_roles = "web_user, anon";
        assert!(matches!(r.resolve().unwrap(), Caller::EndUser { .. }));
    }

    #[test]
    fn uuid_forms() {
        let a = parse_uuid(U1).unwrap();
        assert_eq!(parse_uuid("{11111111-1111-1111-1111-111111111111}"), Some(a));
        assert_eq!(parse_uuid("11111111111111111111111111111111"), Some(a));
        // A hyphen out of place: PostgreSQL refuses it, and so does the uuid crate (0.2.0's
        // hand-written parser accepted it).
        assert_eq!(parse_uuid("1111111-1111-1111-1111-1111111111111"), None);
        assert_eq!(parse_uuid("zz111111-1111-1111-1111-111111111111"), None);
        assert_eq!(parse_uuid(""), None);
    }
}
