//! The database-free half of pg_billing.
//!
//! Everything a billing engineer reasons about without a database lives here and is tested with
//! plain `cargo test`: the error type and its SQLSTATEs, argument validation, the FIFO split
//! across the two credit pools, idempotency comparison, and how a request's caller is resolved
//! from PostgREST's GUCs. The pgrx crate (`src/`) only parses arguments, runs SPI and maps errors.

pub mod batch;
pub mod credits;
pub mod error;
pub mod events;
pub mod grants;
pub mod holds;
pub mod idempotency;
pub mod identity;
pub mod ids;
pub mod members;
pub mod plans;
pub mod rate_limit;
pub mod validate;

pub use error::{BillingError, Result};
