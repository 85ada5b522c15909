//! SQL-facing functions, one module per domain. Each `fn(&Args) -> BResult<Ret>` parses its
//! arguments, checks the caller, runs SPI and returns; `billing_fn!` turns it into the C entry
//! point that `sql/` declares.

pub mod credits;
pub mod members;
pub mod pending_profiles;
pub mod plans;
pub mod usage;
pub mod webhooks;
pub mod widgets;
