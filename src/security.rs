//! The security model (SPEC 2): who is calling, read from the request's GUCs.

use std::ffi::{CStr, CString};

use pg_billing_core::identity::{Caller, RequestContext};
use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::pg_sys;

use crate::boundary::{Args, BResult, Ret};
use crate::validate;

pub static END_USER_ROLES: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"anon,authenticated"));
pub static GRACE_PERIOD: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"0"));
/// How long after a hold's expiry capture_hold still accepts it (seconds; 0.5.0).
pub static HOLD_CAPTURE_GRACE: GucSetting<i32> = GucSetting::<i32>::new(60);
/// Whether every event also sends NOTIFY pg_billing_events (0.6.0).
pub static NOTIFY_EVENTS: GucSetting<bool> = GucSetting::<bool>::new(false);

pub fn init_gucs() {
    // SUSET: an end user who can run SQL must not be able to declare themselves a service
    // caller (or extend their own grace period).
    GucRegistry::define_string_guc(
        c"pg_billing.end_user_roles",
        c"Roles whose requests are end users acting on their own account.",
        c"Comma-separated role names; a request is an end user's when its JWT role claim or its role is listed.",
        &END_USER_ROLES,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"pg_billing.grace_period",
        c"How long a canceled or past-due subscription keeps its plan after the period ends.",
        c"An interval, such as '3 days'; 0 means none.",
        &GRACE_PERIOD,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_billing.hold_capture_grace",
        c"How long after a credit hold's expiry capture_hold still captures it.",
        c"A duration up to 1 hour (default 60 s); later captures fail with PT410. The hold's credits went back to the balance at its expiry, so a capture within the grace takes them from the free balance.",
        &HOLD_CAPTURE_GRACE,
        0,
        3600,
        GucContext::Suset,
        GucFlags::UNIT_S,
    );
    // USERSET: it only adds a NOTIFY to the caller's own transactions (set it per database or
    // role, e.g. ALTER DATABASE ... SET pg_billing.notify_events = on).
    GucRegistry::define_bool_guc(
        c"pg_billing.notify_events",
        c"Whether every billing event also sends NOTIFY pg_billing_events with its id.",
        c"Off by default. On: a worker can LISTEN pg_billing_events instead of polling claim_events; the notification is sent at commit, never for a rolled-back change.",
        &NOTIFY_EVENTS,
        GucContext::Userset,
        GucFlags::default(),
    );
    crate::apptables::init_gucs();
}

/// Whether `role` is listed in `pg_billing.end_user_roles`.
pub fn is_end_user_role(role: &str) -> bool {
    END_USER_ROLES
        .get()
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .any(|r| !r.is_empty() && r == role)
}

fn guc(name: &CStr) -> Option<String> {
    // SAFETY: GetConfigOption with missing_ok returns NULL or a string valid until the next GUC change.
    unsafe {
        let p = pg_sys::GetConfigOption(name.as_ptr(), true, false);
        if p.is_null() {
            None
        } else {
            Some(CStr::from_ptr(p).to_string_lossy().into_owned())
        }
    }
}

fn session_user() -> String {
    // SAFETY: the session user always exists while the session runs.
    unsafe {
        let p = pg_sys::GetUserNameFromId(pg_sys::GetSessionUserId(), true);
        if p.is_null() {
            String::new()
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    }
}

/// The caller of the current request.
pub fn caller() -> BResult<Caller> {
    let claims = guc(c"request.jwt.claims");
    let claim_sub = guc(c"request.jwt.claim.sub");
    let role = guc(c"role");
    // The login role matters only when no SET ROLE is in effect.
    let session = if role.as_deref().map(|r| r.is_empty() || r == "none").unwrap_or(true) { session_user() } else { String::new() };
    let roles = END_USER_ROLES
        .get()
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_default();
    RequestContext {
        claims: claims.as_deref(),
        claim_sub: claim_sub.as_deref(),
        role: role.as_deref(),
        session_user: &session,
        end_user_roles: &roles,
    }
    .resolve()
}

/// Check that the caller may act on `user_id`.
pub fn authorize_user(user_id: &[u8; 16]) -> BResult<Caller> {
    let c = caller()?;
    c.authorize_user(user_id)?;
    Ok(c)
}

/// Check that the caller is a service caller.
pub fn require_service(function: &str) -> BResult<()> {
    caller()?.require_service(function)
}

/// `billing.authorize_user(p_user_id uuid) RETURNS void`: raises 42501 unless the caller may act
/// on that user. Used by the SQL-language read functions before they read.
fn authorize_user_sql(a: &Args) -> BResult<Ret> {
    let user = validate::required("p_user_id", a.uuid(0))?;
    authorize_user(&user)?;
    Ok(Ret::Void)
}
crate::billing_fn!(pg_finfo_pgb_authorize_user, pgb_authorize_user, authorize_user_sql);

/// `billing.require_service(p_function text) RETURNS void`.
fn require_service_sql(a: &Args) -> BResult<Ret> {
    let f = a.text(0).unwrap_or_else(|| "this function".into());
    require_service(&f)?;
    Ok(Ret::Void)
}
crate::billing_fn!(pg_finfo_pgb_require_service, pgb_require_service, require_service_sql);

/// `billing.is_end_user() RETURNS boolean`.
fn is_end_user_sql(_a: &Args) -> BResult<Ret> {
    Ok(Ret::Bool(matches!(caller()?, Caller::EndUser { .. })))
}
crate::billing_fn!(pg_finfo_pgb_is_end_user, pgb_is_end_user, is_end_user_sql);

/// `billing.check_argument(p_name text, p_value integer, p_min integer, p_max integer) RETURNS void`:
/// 22023 unless p_min <= p_value <= p_max. For SQL-language functions' integer arguments.
fn check_argument_sql(a: &Args) -> BResult<Ret> {
    let name = a.text(0).unwrap_or_else(|| "argument".into());
    let v = validate::required(&name, a.int(1))?;
    let (lo, hi) = (a.int(2).unwrap_or(i32::MIN), a.int(3).unwrap_or(i32::MAX));
    if v < lo || v > hi {
        return Err(pg_billing_core::BillingError::invalid_with_hint(
            format!("{name} is out of range"),
            format!("{name} must be between {lo} and {hi}; it was {v}"),
        ));
    }
    Ok(Ret::Void)
}
crate::billing_fn!(pg_finfo_pgb_check_argument, pgb_check_argument, check_argument_sql);
