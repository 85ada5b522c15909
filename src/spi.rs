//! SPI helpers: per-backend kept plans, and mapping SPI failures into `BillingError`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use pg_billing_core::BillingError;
use pgrx::datum::DatumWithOid;
use pgrx::pg_sys::{self, PgOid};
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiError, SpiTupleTable};

use crate::boundary::BResult;

pub trait OrInternal<T> {
    fn or_internal(self) -> BResult<T>;
}

impl<T> OrInternal<T> for Result<T, SpiError> {
    fn or_internal(self) -> BResult<T> {
        self.map_err(|e| BillingError::internal(format!("SPI: {e}")))
    }
}

thread_local! {
    /// Plans prepared once per backend and kept (SPI_keepplan); Postgres' plan cache re-plans
    /// them when the tables they use change.
    /// Keyed by the address of the statement's `&'static str`: hashing a pointer, not the text.
    static PLANS: RefCell<HashMap<usize, Rc<OwnedPreparedStatement>>> = RefCell::new(HashMap::new());
}

fn kept(client: &SpiClient<'_>, sql: &'static str, types: &[PgOid], mutating: bool) -> BResult<Rc<OwnedPreparedStatement>> {
    let key = sql.as_ptr() as usize;
    if let Some(p) = PLANS.with(|m| m.borrow().get(&key).cloned()) {
        return Ok(p);
    }
    let prepared = if mutating { client.prepare_mut(sql, types) } else { client.prepare(sql, types) };
    let p = Rc::new(prepared.or_internal()?.keep());
    PLANS.with(|m| m.borrow_mut().insert(key, p.clone()));
    Ok(p)
}

/// Run a statement that writes, through its kept plan.
pub fn write<'c>(client: &mut SpiClient<'c>, sql: &'static str, types: &[PgOid], args: &[DatumWithOid<'_>]) -> BResult<SpiTupleTable<'c>> {
    let plan = kept(client, sql, types, true)?;
    client.update(&*plan, None, args).or_internal()
}

/// Run a read-only statement, through its kept plan.
pub fn read<'c>(client: &SpiClient<'c>, sql: &'static str, types: &[PgOid], args: &[DatumWithOid<'_>]) -> BResult<SpiTupleTable<'c>> {
    let plan = kept(client, sql, types, false)?;
    client.select(&*plan, None, args).or_internal()
}

pub const UUID: PgOid = PgOid::BuiltIn(pg_sys::BuiltinOid::UUIDOID);
pub const INT8: PgOid = PgOid::BuiltIn(pg_sys::BuiltinOid::INT8OID);
pub const INT4: PgOid = PgOid::BuiltIn(pg_sys::BuiltinOid::INT4OID);
pub const TEXT: PgOid = PgOid::BuiltIn(pg_sys::BuiltinOid::TEXTOID);
pub const JSONB: PgOid = PgOid::BuiltIn(pg_sys::BuiltinOid::JSONBOID);
pub const TIMESTAMPTZ: PgOid = PgOid::BuiltIn(pg_sys::BuiltinOid::TIMESTAMPTZOID);
pub const BOOL: PgOid = PgOid::BuiltIn(pg_sys::BuiltinOid::BOOLOID);

/// The clock now (what `clock_timestamp()` returns), read in Rust: a write reads it once, after
/// it holds the account lock, and uses that one value both to decide which grants are live and
/// as its ledger rows' `created_at`, so no ledger row is dated after the expiry of a grant it
/// spent (a decision at T1 and a row written at T2 > T1 would be, when the grant expired
/// between the two).
///
/// Statements take the clock as a parameter rather than calling `clock_timestamp()`, also because
/// Citus refuses volatile functions in the WHERE and RETURNING of modifications (issue 17).
pub fn clock() -> BResult<pgrx::datum::TimestampWithTimeZone> {
    pgrx::datum::TimestampWithTimeZone::try_from(clock_us()).map_err(|_| BillingError::internal("the clock is out of range"))
}

/// [`clock`] as PostgreSQL's TimestampTz (microseconds since 2000-01-01), for comparisons in Rust.
fn clock_us() -> pg_sys::TimestampTz {
    // SAFETY: GetCurrentTimestamp reads the system clock; it has no preconditions.
    unsafe { pg_sys::GetCurrentTimestamp() }
}

/// The transaction's start (what `now()` returns) and its UTC date, as parameters for statements
/// Citus must route (it takes no `now()` in ON CONFLICT ... SET or RETURNING).
pub fn tx_today_now() -> BResult<(pgrx::datum::Date, pgrx::datum::TimestampWithTimeZone)> {
    // SAFETY: GetCurrentTransactionStartTimestamp only reads the transaction's start time.
    let now = unsafe { pg_sys::GetCurrentTransactionStartTimestamp() };
    let days = i32::try_from(now.div_euclid(86_400_000_000)).map_err(|_| BillingError::internal("the clock is out of range"))?;
    let today = pgrx::datum::Date::try_from(days).map_err(|_| BillingError::internal("the clock is out of range"))?;
    let now = pgrx::datum::TimestampWithTimeZone::try_from(now).map_err(|_| BillingError::internal("the clock is out of range"))?;
    Ok((today, now))
}

/// A uuid argument for SPI.
pub fn uuid_arg(bytes: &[u8; 16]) -> DatumWithOid<'static> {
    pgrx::Uuid::from_bytes(*bytes).into()
}

/// A uuid as text, the way Postgres prints it.
pub use pg_billing_core::ids::uuid_text;

/// Read column `n` (1-based) of the first row.
pub fn col<T: pgrx::FromDatum + pgrx::IntoDatum>(t: &SpiTupleTable<'_>, n: usize) -> BResult<Option<T>> {
    t.get::<T>(n).or_internal()
}

thread_local! {
    /// Kept plans of statements built at run time from registries (resource and widget tables).
    /// The key is the statement text, so a changed registry simply uses a new plan.
    static DYN_PLANS: RefCell<HashMap<String, Rc<OwnedPreparedStatement>>> = RefCell::new(HashMap::new());
}

/// Run a read-only statement built at run time, through a kept plan.
pub fn read_dyn<'c>(client: &SpiClient<'c>, sql: &str, types: &[PgOid], args: &[DatumWithOid<'_>]) -> BResult<SpiTupleTable<'c>> {
    let plan = match DYN_PLANS.with(|m| m.borrow().get(sql).cloned()) {
        Some(p) => p,
        None => {
            let p = Rc::new(client.prepare(sql, types).or_internal()?.keep());
            DYN_PLANS.with(|m| {
                let mut m = m.borrow_mut();
                // Registries change rarely; bound the cache anyway.
                if m.len() > 256 {
                    m.clear();
                }
                m.insert(sql.to_string(), p.clone());
            });
            p
        }
    };
    client.select(&*plan, None, args).or_internal()
}

/// Copy a datum out of SPI's memory into the caller's (upper executor) context, so it can be
/// returned after SPI is left.
pub fn transfer(t: &SpiTupleTable<'_>, n: usize, by_value: bool, typlen: i32) -> BResult<Option<pg_sys::Datum>> {
    match t.get_datum_by_ordinal(n).or_internal()? {
        None => Ok(None),
        // SAFETY: the datum belongs to the current SPI tuple table; SPI_datumTransfer copies it
        // into the memory context that was current when SPI was connected.
        Some(d) => Ok(Some(unsafe { pg_sys::SPI_datumTransfer(d, by_value, typlen) })),
    }
}

/// The uuids in column 1 of every row.
pub fn uuid_column(t: SpiTupleTable<'_>) -> BResult<Vec<[u8; 16]>> {
    let mut out = Vec::new();
    for row in t {
        if let Some(u) = row.get::<pgrx::Uuid>(1).or_internal()? {
            out.push(*u.as_bytes());
        }
    }
    Ok(out)
}
