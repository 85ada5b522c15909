//! Statements over the app's own tables (widget tables, resource tables, legacy balances).
//!
//! pg_billing runs as the extension owner, a superuser. Code in an app's table (a view's
//! functions, RLS policies, a type's cast to json, ...) belongs to that table's owner, so no
//! statement over an app table runs as the extension owner (issue 11 item 1):
//! - end users (see [`security::caller`]) read with the request's own role: the app's RLS and
//!   column grants decide what they see ([`end_user_reader`]);
//! - service callers read as the table's owner ([`as_role`] with the owner recorded at
//!   registration), so the table's code never runs with more rights than its owner has.
//!
//! Registered tables are kept by oid, kind and owner and checked when used ([`lock_checked`]);
//! tables found by name (`public.widget_<type>`) must be plain tables owned by a trusted role
//! ([`trusted_owners`]).

use std::ffi::{CStr, CString};

use pg_billing_core::BillingError;
use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::pg_sys;

use crate::boundary::BResult;
use crate::security;

pub static TRUSTED_TABLE_OWNERS: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c""));

pub fn init_gucs() {
    // SUSET: trusting an owner lets its tables into every user's widget page.
    GucRegistry::define_string_guc(
        c"pg_billing.trusted_table_owners",
        c"Roles whose tables public.widget_<type> are widget tables without registration.",
        c"Comma-separated role names; superusers and members of the database owner are always trusted.",
        &TRUSTED_TABLE_OWNERS,
        GucContext::Suset,
        GucFlags::default(),
    );
}

/// The roles named in `pg_billing.trusted_table_owners`.
pub fn trusted_owners() -> Vec<String> {
    TRUSTED_TABLE_OWNERS
        .get()
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_default()
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

fn role_name(role: pg_sys::Oid) -> Option<String> {
    // SAFETY: GetUserNameFromId with noerr returns NULL or a palloc'd name.
    unsafe {
        let p = pg_sys::GetUserNameFromId(role, true);
        if p.is_null() {
            None
        } else {
            Some(CStr::from_ptr(p).to_string_lossy().into_owned())
        }
    }
}

/// The role an end user's reads of app tables run as: the role in effect outside pg_billing
/// (SET ROLE, as PostgREST does) when it is an end-user role; otherwise (a privileged session
/// that sent end-user claims) the end-user role the claims name. Never the extension owner.
pub fn end_user_reader(claimed_role: &str) -> BResult<pg_sys::Oid> {
    // SAFETY: GetOuterUserId has no preconditions inside a transaction.
    let outer = unsafe { pg_sys::GetOuterUserId() };
    if let Some(name) = role_name(outer) {
        if security::is_end_user_role(&name) {
            return Ok(outer);
        }
    }
    let c = CString::new(claimed_role).map_err(|_| BillingError::forbidden("the request's role name is not valid"))?;
    // SAFETY: c is a valid C string; missing_ok returns InvalidOid instead of raising.
    let oid = unsafe { pg_sys::get_role_oid(c.as_ptr(), true) };
    if oid == pg_sys::InvalidOid {
        return Err(BillingError::Forbidden {
            message: format!("the end-user role {claimed_role} does not exist, so the app's tables cannot be read with its rights"),
            hint: Some("create the role, or fix pg_billing.end_user_roles".into()),
        });
    }
    Ok(oid)
}

/// Restores the user id and security context saved by [`as_role`], on every path out of it
/// (a Postgres error inside reaches us as a Rust panic and unwinds through this).
struct Restore {
    user: pg_sys::Oid,
    context: i32,
}

impl Drop for Restore {
    fn drop(&mut self) {
        // SAFETY: only sets two backend globals back to the values read before.
        unsafe { pg_sys::SetUserIdAndSecContext(self.user, self.context) }
    }
}

/// Run `f` with `role` as the current user, in a security-restricted operation (the way
/// PostgreSQL runs index expressions and REFRESH MATERIALIZED VIEW as the table owner): code
/// that runs inside cannot SET ROLE, create temporary objects or leave GUC changes behind (they
/// are rolled back when `f` returns). Privileges, RLS and SECURITY INVOKER code are `role`'s.
pub fn as_role<R>(role: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
    let mut user = pg_sys::InvalidOid;
    let mut context: i32 = 0;
    // SAFETY: plain reads and writes of backend globals; Restore puts them back.
    let nest = unsafe {
        pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
        pg_sys::SetUserIdAndSecContext(
            role,
            context | (pg_sys::SECURITY_LOCAL_USERID_CHANGE | pg_sys::SECURITY_RESTRICTED_OPERATION) as i32,
        );
        pg_sys::NewGUCNestLevel()
    };
    let restore = Restore { user, context };
    let out = f();
    // SAFETY: pops the GUC nest level opened above, undoing any SET made inside. On an error
    // path this is skipped: the error aborts the (sub)transaction, which pops it.
    unsafe { pg_sys::AtEOXact_GUC(false, nest) };
    drop(restore);
    out
}

/// An app relation as it was registered or found: oid, kind, owner and name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppRelation {
    pub oid: pg_sys::Oid,
    pub kind: u8,
    pub owner: pg_sys::Oid,
    pub schema: String,
    pub table: String,
}

/// Lock `rel` (ACCESS SHARE, as a read would) and check that the relation with that oid is still
/// the one read from the catalog: same kind, owner and name. After this the name resolves to
/// exactly this relation until the transaction ends (it cannot be dropped or renamed).
pub fn lock_checked(rel: &AppRelation) -> bool {
    // SAFETY: LockRelationOid takes a lock on an oid (existing or not); the syscache tuple is a
    // pg_class row, read through its C struct, and released before returning.
    unsafe {
        pg_sys::LockRelationOid(rel.oid, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let tuple = pg_sys::SearchSysCache1(pg_sys::SysCacheIdentifier::RELOID as i32, pg_sys::Datum::from(rel.oid.to_u32()));
        if tuple.is_null() {
            return false;
        }
        let form = pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_class>(tuple);
        let name = CStr::from_ptr((*form).relname.data.as_ptr()).to_string_lossy().into_owned();
        let namespace = pg_sys::get_namespace_name((*form).relnamespace);
        let schema = if namespace.is_null() { String::new() } else { CStr::from_ptr(namespace).to_string_lossy().into_owned() };
        let ok = (*form).relkind as u8 == rel.kind && (*form).relowner == rel.owner && name == rel.table && schema == rel.schema;
        pg_sys::ReleaseSysCache(tuple);
        ok
    }
}

/// A relkind as SQL writes it.
pub fn kind_name(kind: u8) -> &'static str {
    match kind {
        b'r' => "table",
        b'p' => "partitioned table",
        b'v' => "view",
        b'm' => "materialized view",
        b'f' => "foreign table",
        _ => "relation",
    }
}
