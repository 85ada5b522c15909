//! SQL-facing functions, one module per domain. Each `fn(&Args) -> BResult<Ret>` parses its
//! arguments, checks the caller, runs SPI and returns; `billing_fn!` turns it into the C entry
//! point that `sql/` declares.

pub mod batch;
pub mod credits;
pub mod events;
pub mod grants;
pub mod holds;
pub mod members;
pub mod pending_profiles;
pub mod plans;
pub mod usage;
pub mod webhooks;
pub mod widgets;

use crate::boundary::BResult;
use crate::spi::{self, uuid_arg, UUID};

// The lock order (issue 10 item 6), written here once. A call that locks more than one row takes
// them in this order and no other, so two calls can never wait for each other in a cycle (40P01):
//   1. the row the call is about when it is found by e-mail or id: `billing.member_emails` then
//      `billing.members` (members), or one `billing.pending_profiles` row (claims);
//   2. the user's account (`billing.accounts`), through `lock_account` or a statement that
//      updates it;
//   3. the user's subscription (`billing.subscriptions`);
//   4. rows no other lock waits behind (ledger and event inserts, usage upserts, and credit
//      holds: a `billing.credit_holds` row is written only by the holder of its account's lock,
//      so a hold found by id alone is read without a lock, then its account is locked, then the
//      hold row).
// A path that would otherwise lock the subscription before the account (a subscription webhook,
// the expiry job) calls `lock_account` (or `try_lock_account`) first.

/// Lock the user's account row, creating an empty account when there is none (so the lock
/// exists to be taken: a concurrent creator waits here, not after it has locked a subscription).
const LOCK_ACCOUNT: &str = "
INSERT INTO billing.accounts AS a (user_id) VALUES ($1)
ON CONFLICT (user_id) DO UPDATE SET updated_at = a.updated_at
RETURNING 1";
const TRY_LOCK_ACCOUNT: &str = "SELECT 1 FROM billing.accounts AS a WHERE a.user_id = $1 FOR UPDATE SKIP LOCKED";
const ACCOUNT_EXISTS: &str = "SELECT 1 FROM billing.accounts AS a WHERE a.user_id = $1";

/// Step 1 of the lock order: lock (or create and lock) the user's account.
pub fn lock_account(c: &mut pgrx::spi::SpiClient<'_>, user: &[u8; 16]) -> BResult<()> {
    spi::write(c, LOCK_ACCOUNT, &[UUID], &[uuid_arg(user)]).map(|_| ())
}

/// Step 1 without waiting, for batch jobs: false when another transaction holds the account
/// (skip the user this run); true when it is now locked or there is no account.
pub fn try_lock_account(c: &mut pgrx::spi::SpiClient<'_>, user: &[u8; 16]) -> BResult<bool> {
    if !spi::write(c, TRY_LOCK_ACCOUNT, &[UUID], &[uuid_arg(user)])?.is_empty() {
        return Ok(true);
    }
    Ok(spi::write(c, ACCOUNT_EXISTS, &[UUID], &[uuid_arg(user)])?.is_empty())
}
