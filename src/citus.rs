//! Citus (issue 17): delegation of a call's body to the worker that holds its user.
//!
//! On a cluster every pg_billing function runs on the coordinator, where PostgREST's `role` and
//! `request.jwt.claims` are set, and sends each statement to the worker that holds the user. A
//! delegated body instead runs on that worker in one round trip: the public function checks the
//! caller on the coordinator first, then calls an internal function that `billing.distribute()`
//! made a force-delegated Citus function (distribution argument `p_user_id`, colocated with
//! `billing.accounts`), from the FROM list of a query (Citus pushes a call down from inside a
//! function only in that form). The internal function returns NULL when it cannot finish the call
//! on the worker, having changed nothing, and the coordinator then runs the call as before.
//!
//! On a single node (Citus not loaded) nothing here runs: the check is a flag read once per
//! backend. `pg_billing.citus_delegation = off` turns delegation off (the bodies then run on the
//! coordinator, as in 0.7.0).

use std::cell::Cell;

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::pg_sys;
use pgrx::spi::{Spi, SpiClient, SpiTupleTable};

use crate::boundary::BResult;
use crate::spi;

pub static DELEGATION: GucSetting<bool> = GucSetting::<bool>::new(true);

pub fn init_gucs() {
    // USERSET: turning it off only makes the caller's own calls take the coordinator's path.
    GucRegistry::define_bool_guc(
        c"pg_billing.citus_delegation",
        c"On a Citus cluster, run delegable calls on the worker that holds their user.",
        c"The caller is checked on the coordinator first; off runs every call on the coordinator.",
        &DELEGATION,
        GucContext::Userset,
        GucFlags::default(),
    );
}

thread_local! {
    /// Whether Citus is loaded in this backend (shared_preload_libraries: fixed for its life).
    static CITUS: Cell<Option<bool>> = const { Cell::new(None) };
}

/// Whether Citus is loaded here (its GUCs exist), read once per backend.
pub fn loaded() -> bool {
    CITUS.with(|c| {
        c.get().unwrap_or_else(|| {
            // SAFETY: GetConfigOption with missing_ok only reads the GUC table.
            let v = unsafe { !pg_sys::GetConfigOption(c"citus.version".as_ptr(), true, false).is_null() };
            c.set(Some(v));
            v
        })
    })
}

/// Run `call` (a query whose column 1 is the internal function's result) when Citus is loaded
/// and delegation is on, and `read` its first row: None when it did not run or gave no row.
fn run<F, R>(call: F, read: impl FnOnce(&SpiTupleTable<'_>) -> BResult<Option<R>>) -> BResult<Option<R>>
where
    F: for<'c> FnOnce(&mut SpiClient<'c>) -> BResult<SpiTupleTable<'c>>,
{
    if !loaded() || !DELEGATION.get() {
        return Ok(None);
    }
    Spi::connect_mut(|c| {
        let t = call(c)?;
        if t.is_empty() {
            return Ok(None);
        }
        read(&t.first())
    })
}

/// [`run`] for an internal function whose result is a boolean: whether it finished the call
/// (true; NULL or no row: it did not). A boolean is read, not copied as a varlena as
/// [`delegated`] copies (the coordinator crashed on that, 0.9.0's cluster check).
pub fn delegated_done<F>(call: F) -> BResult<bool>
where
    F: for<'c> FnOnce(&mut SpiClient<'c>) -> BResult<SpiTupleTable<'c>>,
{
    Ok(run(call, |t| spi::col::<bool>(t, 1))?.unwrap_or(false))
}

/// [`run`] for an internal function whose result is a varlena such as jsonb: its result, copied
/// out of SPI, or None when it did not finish the call (NULL), when Citus is not loaded, or when
/// delegation is off. Where the internal function is not a distributed function (distribute()
/// not run), Citus runs it on this node: the same result, without the round trip saved.
pub fn delegated<F>(call: F) -> BResult<Option<pg_sys::Datum>>
where
    F: for<'c> FnOnce(&mut SpiClient<'c>) -> BResult<SpiTupleTable<'c>>,
{
    run(call, |t| spi::transfer(t, 1, false, -1))
}
