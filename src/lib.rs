//! pg_billing: a SaaS product's billing state and the functions that change it, inside PostgreSQL.
//!
//! Layout: `pg_billing_core` (the `core/` crate) holds the logic that needs no database; this
//! crate is the SQL-facing layer: `boundary` (fmgr entry points and SQLSTATE-preserving errors),
//! `security` (caller identity), `spi` (kept plans), and `api::*`, one module per domain. The
//! SQL objects are declared by hand in `sql/` and pulled in below, in order.

use pgrx::prelude::*;

pub mod api;
pub mod apptables;
pub mod boundary;
pub mod citus;
pub mod security;
pub mod spi;

pub use pg_billing_core::validate;

pgrx::pg_module_magic!();

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    security::init_gucs();
    citus::init_gucs();
    api::events::init();
}

extension_sql_file!("../sql/schema.sql", name = "schema", bootstrap);
extension_sql_file!("../sql/security.sql", name = "security", requires = ["schema"]);
extension_sql_file!("../sql/credits.sql", name = "credits", requires = ["security"]);
extension_sql_file!("../sql/grants.sql", name = "grants", requires = ["credits"]);
extension_sql_file!("../sql/holds.sql", name = "holds", requires = ["grants"]);
extension_sql_file!("../sql/plans.sql", name = "plans", requires = ["holds"]);
extension_sql_file!("../sql/usage.sql", name = "usage", requires = ["plans"]);
extension_sql_file!("../sql/widgets.sql", name = "widgets", requires = ["usage"]);
extension_sql_file!("../sql/members.sql", name = "members", requires = ["widgets"]);
extension_sql_file!("../sql/pending_profiles.sql", name = "pending_profiles", requires = ["members"]);
extension_sql_file!("../sql/events.sql", name = "events", requires = ["pending_profiles"]);
extension_sql_file!("../sql/batch.sql", name = "batch", requires = ["events"]);
extension_sql_file!("../sql/citus.sql", name = "citus", requires = ["batch"]);
extension_sql_file!("../sql/finalize.sql", name = "finalize", finalize);
