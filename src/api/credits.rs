//! Credits (SPEC 4) on credit grants (0.4.0): consume, grant, expire, renew, refund, claw back,
//! void, legacy aliases.
//!
//! Every credit belongs to a grant (`billing.credit_grants`); the two pools of the two-pool API
//! are sums of grants by category. Every mutation first locks the user's account row (the lock
//! order in `api/mod.rs`), then runs one statement that reads the grants with a fresh snapshot
//! (taken after the lock, so it sees every committed change), changes them, keeps the account's
//! stored pool sums and debt, and appends the ledger rows (one per grant touched) in data-modifying
//! CTEs. At READ COMMITTED a concurrent writer waits for the account lock, so no grant is ever
//! spent twice and no update is lost. The rules themselves are `pg_billing_core::grants`.

use pg_billing_core::grants::{self as g, Category};
use pg_billing_core::identity::Caller;
use pg_billing_core::idempotency::{self, Replay};
use pg_billing_core::BillingError;
use pgrx::datum::{DatumWithOid, TimestampWithTimeZone};
use pgrx::pg_sys::PgOid;
use pgrx::spi::{Spi, SpiClient, SpiTupleTable};
use serde_json::{json, Value};

use crate::boundary::{Args, BResult, Ret};
use crate::security;
use crate::spi::{self, col, uuid_arg, uuid_text, OrInternal, BOOL, INT4, INT8, JSONB, TEXT, TIMESTAMPTZ, UUID};
use crate::validate;

pub const TEXTARRAY: PgOid = PgOid::BuiltIn(pgrx::pg_sys::BuiltinOid::TEXTARRAYOID);
pub const INT8ARRAY: PgOid = PgOid::BuiltIn(pgrx::pg_sys::BuiltinOid::INT8ARRAYOID);
const UUIDARRAY: PgOid = PgOid::BuiltIn(pgrx::pg_sys::BuiltinOid::UUIDARRAYOID);

// ---------------------------------------------------------------------------------------------
// Statements
// ---------------------------------------------------------------------------------------------

// Time: a write compares grants' start and expiry with the clock read once it holds the account
// lock (`spi::clock`, kept in `Locked::now` and passed to the statements as a parameter), not
// with now(): now() is when the caller's transaction began, so a transaction that began before a
// grant was made (or waited on the lock while a grant expired) would otherwise not see the grant
// start (or would spend it expired). One reading per operation: what is due, what settles, which
// grants are live and the ledger rows' time are decided at the same instant.

/// Step 2 of the lock order: lock the account and read what a write needs. $1 user. Returns the
/// overdraft headroom (limit less debt, never below 0), the debt, the earliest time a grant may
/// expire (once the clock, read after the lock, has passed it the caller settles first:
/// [`SETTLE`]), the same for holds (then [`SETTLE_HOLDS`]), the credits the active holds reserve
/// (0.5.0), and whether the account has a balance rule or is new, its rule not looked up yet
/// (0.6.0: then `events::watch`). (No clock in the statement: Citus refuses non-immutable
/// functions in RETURNING, and the clock is read after the lock is held.)
const LOCK: &str = "
SELECT GREATEST(a.overdraft_limit - a.debt, 0), a.debt, LEAST(a.next_expiry_at, a.subscription_credits_expire_at),
       a.next_hold_expiry_at, a.held, a.alert_threshold IS NOT NULL, a.alert_state < 0
  FROM billing.accounts AS a WHERE a.user_id = $1 FOR UPDATE";

/// The same for a debit of $2: no row, and no lock taken (so no wait behind another writer),
/// when what the committed account stores, less what its holds reserve, and may overdraw cannot
/// pay $2 (stored pools hold at least what is spendable; the stored held sum is subtracted only
/// while no hold may have expired, since it counts expired holds until a write settles them);
/// the debit then fails as if it ran before the other writer. $3 the clock.
const LOCK_FOR_DEBIT: &str = "
SELECT GREATEST(a.overdraft_limit - a.debt, 0), a.debt, LEAST(a.next_expiry_at, a.subscription_credits_expire_at),
       a.next_hold_expiry_at, a.held, a.alert_threshold IS NOT NULL, a.alert_state < 0
  FROM billing.accounts AS a
 WHERE a.user_id = $1
   AND a.subscription_credits_balance + a.purchased_credits_balance + GREATEST(a.overdraft_limit - a.debt, 0)
       - CASE WHEN a.next_hold_expiry_at <= $3 THEN 0 ELSE a.held END >= $2
   FOR UPDATE";

/// The same, creating the account when there is none. $1 user.
const LOCK_OR_CREATE: &str = "
INSERT INTO billing.accounts AS a (user_id) VALUES ($1)
ON CONFLICT (user_id) DO UPDATE SET updated_at = a.updated_at
RETURNING GREATEST(a.overdraft_limit - a.debt, 0), a.debt, LEAST(a.next_expiry_at, a.subscription_credits_expire_at),
          a.next_hold_expiry_at, a.held, a.alert_threshold IS NOT NULL, a.alert_state < 0";

/// The general debit (any feature, several grants, overdraft), under the account lock: read the
/// live grants in spending order with a fresh snapshot (taken after the lock, so nothing changes
/// them until we commit), let `pg_billing_core::grants::take_in_order` decide what each pays, then
/// write: [`SPEND_GRANT`] per grant, [`SPEND_ACCOUNT`], and the ledger rows in one
/// [`LEDGER_ROWS`]. Simple statements with small plans cost far less per call than one statement
/// that does it all (benches/grants_callgrind.sh).
///
/// $1 user, $2 feature (NULL: only unscoped grants may pay), $3 the clock ([`spi::clock`], read
/// under the lock; also the ledger rows' time). Every grant that counts then (for the live pools
/// of consume_credits' result), in spending order, with whether the feature may spend it.
const LIVE_GRANTS: &str = "
SELECT g.id, g.pool = 'subscription', g.remaining, g.category::text, (g.scope IS NULL OR g.scope @> ARRAY[$2]),
       g.scope IS NULL, g.expires_at,
       (SELECT pg_catalog.min(s.effective_at) FROM billing.credit_grants AS s
         WHERE s.user_id = $1 AND NOT s.depleted AND s.voided_at IS NULL AND s.effective_at > $3)
  FROM billing.credit_grants AS g
 WHERE g.user_id = $1 AND NOT g.depleted AND g.voided_at IS NULL
   AND g.effective_at <= $3
   AND (g.expires_at IS NULL OR g.expires_at > $3)
 ORDER BY g.priority, (g.scope IS NULL), g.expires_at, g.effective_at, g.created_at, g.id";

/// $1 user, $2 grant, $3 credits it pays.
const SPEND_GRANT: &str = "
UPDATE billing.credit_grants AS g SET remaining = g.remaining - $3, depleted = (g.remaining = $3)
 WHERE g.user_id = $1 AND g.id = $2 AND g.remaining >= $3
RETURNING 1";

/// $1 user, $2 from the subscription pool, $3 from the purchased pool, $4 into debt; the head
/// after it (see [`FAST_ACCOUNT`]): $5 grant (NULL: none), $6 of the subscription pool,
/// $7 its remaining, $8 until when (its expiry or the next start; the account's own expiry
/// dates are folded in here).
const SPEND_ACCOUNT: &str = "
UPDATE billing.accounts AS a
   SET subscription_credits_balance = a.subscription_credits_balance - $2,
       purchased_credits_balance    = a.purchased_credits_balance - $3,
       debt                         = a.debt + $4,
       head_grant                   = $5,
       head_subscription            = $6,
       head_remaining               = $7,
       head_until                   = LEAST($8, a.next_expiry_at, a.subscription_credits_expire_at),
       updated_at                   = pg_catalog.now()
 WHERE a.user_id = $1
RETURNING a.subscription_credits_balance::bigint, a.purchased_credits_balance::bigint, a.debt";

/// The ledger rows of one operation, in order. $1 user, $2 operation, $3 type, $4 description,
/// $5 reference, $6 key, $7 pools, $8 amounts, $9 balances after, $10 grants (NULL for debt),
/// $11 the clock the grants were found live at.
const LEDGER_ROWS: &str = "
INSERT INTO billing.credit_transactions
       (user_id, operation_id, type, pool, amount, balance_after, description, reference_id, idempotency_key, grant_id, created_at)
SELECT $1, $2, $3, r.pool::billing.credit_pool, r.amount, r.after, $4, $5, $6, r.grant_id, $11
  FROM ROWS FROM (pg_catalog.unnest($7::text[]), pg_catalog.unnest($8::bigint[]), pg_catalog.unnest($9::bigint[]),
                  pg_catalog.unnest($10::uuid[])) WITH ORDINALITY AS r(pool, amount, after, grant_id, ord)
 ORDER BY r.ord";
// The fast path of a debit without a feature that the first grant in spending order pays alone
// (the usual case), in three simple statements instead of the general path's several (executor
// start-up dominates a call; benches/grants_callgrind.sh measures it):
//   1. [`FAST_ACCOUNT`] locks the account and takes the amount off the pool of its *head*: the
//      first grant in spending order among the live grants without a scope, as the account row
//      records it (0.7.0: head_grant, head_subscription, head_remaining, head_until). The head
//      is written by every general debit (which reads the live grants in order under the lock)
//      and cleared by every other write that changes the grants (a new grant, a void, an
//      expiry, a new period end); head_until is the soonest of the head's expiry, the earliest
//      start of a grant that has not started (which could come first), and the account's
//      next_expiry_at and subscription_credits_expire_at (a write past those settles first). Every fact the
//      UPDATE checks is on the row it locks, so a writer that committed meanwhile is seen (READ
//      COMMITTED re-checks the WHERE on the newest version). No row: nothing changed, take the
//      general path.
//   2. [`FAST_GRANT`] takes the amount off that grant, checking again with the clock now that the
//      lock is held (head_until too: a grant may have started or the head expired while we
//      waited). Past head_until, or no row (the head was wrong, which no write should leave):
//      [`FAST_UNDO`] puts the pool back and clears the head, and the general path runs.
//   3. [`LEDGER_ROW`] writes the one ledger row, dated with the clock step 2 checked.
// The account lock is taken before the grant row, as everywhere (api/mod.rs).

/// $1 user, $2 amount, $3 the clock. Only when the head also covers what the active holds
/// reserve (0.5.0), and no grant or hold may have expired (otherwise the general path decides).
/// `$extra`: more conditions ([`FAST_ACCOUNT_QUIET`]).
macro_rules! fast_account {
    ($extra:literal) => {
        concat!("
UPDATE billing.accounts AS a
   SET subscription_credits_balance = a.subscription_credits_balance - CASE WHEN a.head_subscription THEN $2 ELSE 0 END,
       purchased_credits_balance    = a.purchased_credits_balance - CASE WHEN a.head_subscription THEN 0 ELSE $2 END,
       head_remaining               = a.head_remaining - $2,
       updated_at                   = pg_catalog.now()
 WHERE a.user_id = $1 AND a.head_remaining >= $2 + a.held
   AND NOT COALESCE(a.head_until <= $3 OR a.next_hold_expiry_at <= $3, false)", $extra, "
RETURNING a.subscription_credits_balance::bigint, a.purchased_credits_balance::bigint, a.debt, a.head_grant, a.head_subscription,
          a.alert_threshold IS NOT NULL, a.alert_state < 0, a.head_until")
    };
}
const FAST_ACCOUNT: &str = fast_account!("");
/// [`FAST_ACCOUNT`] for a debit that may write no event (run on a Citus worker: see
/// [`consume_on_shard`]): not on an account with a balance rule, or whose rule was never looked
/// up (a new account).
const FAST_ACCOUNT_QUIET: &str = fast_account!("
   AND a.alert_threshold IS NULL AND a.alert_state >= 0");

/// $1 user, $2 grant, $3 amount, $4 the clock ([`spi::clock`], read under the lock).
const FAST_GRANT: &str = "
UPDATE billing.credit_grants AS g SET remaining = g.remaining - $3, depleted = (g.remaining = $3)
 WHERE g.user_id = $1 AND g.id = $2 AND g.remaining >= $3 AND g.voided_at IS NULL
   AND g.effective_at <= $4
   AND (g.expires_at IS NULL OR g.expires_at > $4)";

/// Undo [`FAST_ACCOUNT`] and forget the head. $1 user, $2 amount, $3 it was the subscription pool.
const FAST_UNDO: &str = "
UPDATE billing.accounts AS a
   SET subscription_credits_balance = a.subscription_credits_balance + CASE WHEN $3 THEN $2 ELSE 0 END,
       purchased_credits_balance    = a.purchased_credits_balance + CASE WHEN $3 THEN 0 ELSE $2 END,
       head_grant = NULL, head_subscription = NULL, head_remaining = NULL, head_until = NULL
 WHERE a.user_id = $1";

/// One ledger row. $1 user, $2 operation, $3 type, $4 pool, $5 amount, $6 balance after,
/// $7 description, $8 reference, $9 idempotency key, $10 grant, $11 the clock it was found live at.
const LEDGER_ROW: &str = "
INSERT INTO billing.credit_transactions
       (user_id, operation_id, type, pool, amount, balance_after, description, reference_id, idempotency_key, grant_id, created_at)
VALUES ($1, $2, $3, $4::billing.credit_pool, $5, $6, $7, $8, $9, $10, $11)";

/// [`LEDGER_ROW`] with its id ($12) given: on a Citus worker ([`consume_on_shard`]), whose own
/// sequence numbers from 1 like every node's, the coordinator's sequence gives it. No row: the
/// user has a row with that id (a caller's mistake: the coordinator's ids are new).
const LEDGER_ROW_ID: &str = "
INSERT INTO billing.credit_transactions
       (user_id, operation_id, type, pool, amount, balance_after, description, reference_id, idempotency_key, grant_id, created_at, id)
VALUES ($1, $2, $3, $4::billing.credit_pool, $5, $6, $7, $8, $9, $10, $11, $12)
ON CONFLICT (user_id, id) DO NOTHING
RETURNING 1";

/// One new grant and its ledger rows, under the account lock. $1 user, $2 operation, $3 grant id,
/// $4 category, $5 amount, $6 priority, $7 effective_at (NULL: now), $8 expires_at, $9 scope,
/// $10 ledger type, $11 description, $12 reference, $13 key, $14 debt it repays, $15 expire at
/// the subscription period end (accounts.subscription_credits_expire_at) instead of $8.
/// The ledger: the grant's +amount, then (when it repays debt) -repaid on the grant and +repaid
/// on the debt. With Citus the same in three statements ([`GRANT_ACCOUNT`]).
const CREATE_GRANT: &str = "
WITH gr AS (
    INSERT INTO billing.credit_grants AS g
           (user_id, id, category, amount, remaining, priority, effective_at, expires_at, scope,
            source_transaction_id, idempotency_key, description, reference_id, pool, depleted)
    SELECT $1, $3, $4::billing.grant_category, $5, $5 - $14, $6, COALESCE($7, pg_catalog.now()),
           CASE WHEN $15 THEN a.subscription_credits_expire_at ELSE $8 END, $9, $2, $13, $11, $12,
           CASE WHEN $4 IN ('subscription', 'rollover') THEN 'subscription'::billing.credit_pool
                ELSE 'purchased'::billing.credit_pool END,
           $5 = $14
      FROM billing.accounts AS a WHERE a.user_id = $1
 RETURNING g.pool, g.expires_at
), acct AS (
    UPDATE billing.accounts AS a
       SET subscription_credits_balance = a.subscription_credits_balance + CASE WHEN gr.pool = 'subscription' THEN $5 - $14 ELSE 0 END,
           purchased_credits_balance    = a.purchased_credits_balance + CASE WHEN gr.pool = 'purchased' THEN $5 - $14 ELSE 0 END,
           debt                         = a.debt - $14,
           next_expiry_at               = LEAST(a.next_expiry_at, gr.expires_at),
           head_grant = NULL, head_subscription = NULL, head_remaining = NULL, head_until = NULL,
           updated_at                   = pg_catalog.now()
      FROM gr
     -- (0.7.0) The pools' total after this grant must fit a bigint: past 2^63-1 the sum fails
     -- with 22003 (it is never negative otherwise).
     WHERE a.user_id = $1 AND (a.subscription_credits_balance + a.purchased_credits_balance) + ($5 - $14) >= 0
 RETURNING a.subscription_credits_balance AS sub, a.purchased_credits_balance AS pur, a.debt, gr.pool
), ledger AS (
    INSERT INTO billing.credit_transactions
           (user_id, operation_id, type, pool, amount, balance_after, description, reference_id, idempotency_key, grant_id)
    SELECT $1, $2, e.type, e.pool, e.amount, e.balance_after, $11, $12, $13, e.grant_id
      FROM acct
     CROSS JOIN LATERAL (VALUES
            (1, $10, acct.pool, $5, CASE acct.pool WHEN 'subscription' THEN acct.sub ELSE acct.pur END + $14, $3),
            (2, 'debt_repayment', acct.pool, -$14, CASE acct.pool WHEN 'subscription' THEN acct.sub ELSE acct.pur END, $3),
            (3, 'debt_repayment', 'debt'::billing.credit_pool, $14, acct.debt, NULL::uuid))
            AS e(ord, type, pool, amount, balance_after, grant_id)
     WHERE e.amount <> 0
     ORDER BY e.ord
)
SELECT acct.sub, acct.pur, acct.debt FROM acct";

// With Citus, [`CREATE_GRANT`] in three statements, one per table: Citus runs a statement that
// writes several tables as an INSERT ... SELECT through the node it was sent from (measured on the
// cluster check's nodes: a grant delegated to a worker cost 10 ms of the workers' CPU with the one
// statement). The account first (the grant's expiry may be the account's period end), then the
// grant, then its ledger rows.

/// $1 user, $2 the grant counts in the subscription pool, $3 what it adds to its pool (amount
/// less the debt it repays), $4 the debt it repays, $5 it expires at the subscription period end,
/// $6 its expiry otherwise. Returns the pools and debt after, and the period end.
const GRANT_ACCOUNT: &str = "
UPDATE billing.accounts AS a
   SET subscription_credits_balance = a.subscription_credits_balance + CASE WHEN $2 THEN $3 ELSE 0 END,
       purchased_credits_balance    = a.purchased_credits_balance + CASE WHEN $2 THEN 0 ELSE $3 END,
       debt                         = a.debt - $4,
       next_expiry_at               = LEAST(a.next_expiry_at, CASE WHEN $5 THEN a.subscription_credits_expire_at ELSE $6 END),
       head_grant = NULL, head_subscription = NULL, head_remaining = NULL, head_until = NULL,
       updated_at                   = pg_catalog.now()
 WHERE a.user_id = $1 AND (a.subscription_credits_balance + a.purchased_credits_balance) + $3 >= 0
RETURNING a.subscription_credits_balance::bigint, a.purchased_credits_balance::bigint, a.debt, a.subscription_credits_expire_at";

/// $1 user, $2 grant id, $3 category, $4 amount, $5 remaining, $6 priority, $7 effective_at
/// (NULL: now), $8 expires_at, $9 scope, $10 operation, $11 key, $12 description, $13 reference,
/// $14 pool.
const GRANT_ROW: &str = "
INSERT INTO billing.credit_grants
       (user_id, id, category, amount, remaining, priority, effective_at, expires_at, scope,
        source_transaction_id, idempotency_key, description, reference_id, pool, depleted)
VALUES ($1, $2, $3::billing.grant_category, $4, $5, $6, COALESCE($7, pg_catalog.now()), $8, $9, $10, $11, $12, $13,
        $14::billing.credit_pool, $5 = 0)";

/// The grant's ledger row, and when it repays debt the repayment's two (as [`CREATE_GRANT`]
/// writes them). $1 user, $2 operation, $3 ledger type, $4 pool, $5 amount, $6 its balance after,
/// $7 description, $8 reference, $9 key, $10 grant, $11 the rows' ids (NULL: from the sequence; on
/// a Citus worker, [`grant_on_shard`], drawn by the coordinator from its sequence: a worker's own
/// would repeat the coordinator's numbers); repaid: $12 the debt repaid, $13 the pool after it,
/// $14 the debt after.
macro_rules! ledger_id {
    ($i:literal) => {
        concat!("COALESCE(($11::bigint[])[", $i, "], pg_catalog.nextval('billing.credit_transactions_id_seq'::pg_catalog.regclass))")
    };
}
const GRANT_LEDGER: &str = concat!("
INSERT INTO billing.credit_transactions
       (user_id, operation_id, type, pool, amount, balance_after, description, reference_id, idempotency_key, grant_id, id)
VALUES ($1, $2, $3, $4::billing.credit_pool, $5, $6, $7, $8, $9, $10, ", ledger_id!(1), ")");
const GRANT_LEDGER_REPAID: &str = concat!("
INSERT INTO billing.credit_transactions
       (user_id, operation_id, type, pool, amount, balance_after, description, reference_id, idempotency_key, grant_id, id)
VALUES ($1, $2, $3, $4::billing.credit_pool, $5, $6, $7, $8, $9, $10, ", ledger_id!(1), "),
       ($1, $2, 'debt_repayment', $4::billing.credit_pool, -$12, $13, $7, $8, $9, $10, ", ledger_id!(2), "),
       ($1, $2, 'debt_repayment', 'debt'::billing.credit_pool, $12, $14, $7, $8, $9, NULL, ", ledger_id!(3), ")");

/// Expire grants, under the account lock: those past their expiry, and with $3 false every
/// grant of the subscription pool too. $1 user, $2 operation, $3 only the expired ones,
/// $4 description, $5 key, $6 credits of the expired ones that a renewal rolls over (the
/// expiration event records only what was lost). One 'expiration' ledger row per grant, one
/// credit_expiration_events row. Afterwards the subscription period end is cleared when it has
/// passed (or always, with $3 false), and next_expiry_at is the earliest expiry left. Returns the
/// pools after, what left each, and the grants ended with credits left (for grant.expired).
/// $7 the clock.
const SETTLE: &str = "
WITH clock AS MATERIALIZED (
    SELECT $7::timestamptz AS at
), gone AS (
    SELECT g.id, g.pool, g.remaining, g.category, g.expires_at,
           pg_catalog.row_number() OVER (ORDER BY g.priority, g.expires_at, g.effective_at, g.created_at, g.id) AS ord
      FROM billing.credit_grants AS g CROSS JOIN clock
     WHERE g.user_id = $1 AND NOT g.depleted AND g.voided_at IS NULL
       AND (g.expires_at <= clock.at OR (NOT $3 AND g.pool = 'subscription'))
), upd AS (
    -- settled_at: when it ended (get_credit_grants reads it as expired, balance_at as not
    -- spendable from then on, also when a renewal ended it before its expiry).
    UPDATE billing.credit_grants AS g
       SET remaining = 0,
           depleted = true,
           settled_at = clock.at
      FROM gone CROSS JOIN clock
     WHERE g.user_id = $1 AND g.id = gone.id
), sums AS (
    SELECT COALESCE(pg_catalog.sum(gone.remaining) FILTER (WHERE gone.pool = 'subscription'), 0)::bigint AS sub,
           COALESCE(pg_catalog.sum(gone.remaining) FILTER (WHERE gone.pool = 'purchased'), 0)::bigint AS pur
      FROM gone
), acct AS (
    UPDATE billing.accounts AS a
       SET subscription_credits_balance   = a.subscription_credits_balance - sums.sub,
           purchased_credits_balance      = a.purchased_credits_balance - sums.pur,
           subscription_credits_expire_at = CASE WHEN NOT $3 OR a.subscription_credits_expire_at <= (SELECT clock.at FROM clock) THEN NULL
                                                 ELSE a.subscription_credits_expire_at END,
           next_expiry_at                 = (SELECT pg_catalog.min(l.expires_at) FROM billing.credit_grants AS l
                                              WHERE l.user_id = $1 AND NOT l.depleted AND l.voided_at IS NULL
                                                AND l.expires_at > (SELECT clock.at FROM clock) AND ($3 OR l.pool <> 'subscription')),
           head_grant = NULL, head_subscription = NULL, head_remaining = NULL, head_until = NULL,
           updated_at                     = pg_catalog.now()
      FROM sums
     WHERE a.user_id = $1
 RETURNING a.subscription_credits_balance AS sub, a.purchased_credits_balance AS pur, sums.sub AS dsub, sums.pur AS dpur
), ledger AS (
    -- Dated with the operation's clock, as the debit that may follow in the same call is.
    INSERT INTO billing.credit_transactions
           (user_id, operation_id, type, pool, amount, balance_after, description, idempotency_key, grant_id, created_at)
    SELECT $1, $2, 'expiration', gone.pool, -gone.remaining,
           CASE gone.pool WHEN 'subscription' THEN acct.sub ELSE acct.pur END
             + COALESCE(pg_catalog.sum(gone.remaining) OVER (PARTITION BY gone.pool ORDER BY gone.ord DESC
                                                             ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0),
           CASE WHEN gone.pool = 'subscription' THEN $4 ELSE 'grant expired' END, $5, gone.id, (SELECT clock.at FROM clock)
      FROM gone CROSS JOIN acct
     ORDER BY gone.ord
), event AS (
    INSERT INTO billing.credit_expiration_events (user_id, operation_id, expired_amount, description)
    SELECT $1, $2, acct.dsub + acct.dpur - $6, $4 FROM acct WHERE acct.dsub + acct.dpur - $6 > 0
)
SELECT acct.sub, acct.pur, acct.dsub, acct.dpur,
       (SELECT pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object(
                   'grant_id', gone.id, 'category', gone.category, 'pool', gone.pool, 'expired_amount', gone.remaining,
                   'expires_at', pg_catalog.to_char(gone.expires_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'))
                 ORDER BY gone.ord)
          FROM gone WHERE gone.remaining > 0)
  FROM acct";

/// Holds past their expiry (0.5.0), under the account lock: they become `expired` (resolved at
/// their expiry), their credits leave the account's held sum, and next_hold_expiry_at becomes
/// the earliest expiry of the holds left (NULL: none). Returns the held sum after and the holds
/// that expired (for hold.expired). $1 user, $2 the clock.
const SETTLE_HOLDS: &str = "
WITH clock AS MATERIALIZED (
    SELECT $2::timestamptz AS at
), gone AS (
    UPDATE billing.credit_holds AS h
       SET status = 'expired', resolved_at = h.expires_at
      FROM clock
     WHERE h.user_id = $1 AND h.status = 'active' AND h.expires_at <= clock.at
 RETURNING h.id, h.amount, h.feature, h.expires_at
), acct AS (
    UPDATE billing.accounts AS a
       SET held = a.held - COALESCE((SELECT pg_catalog.sum(gone.amount) FROM gone), 0),
           next_hold_expiry_at = (SELECT pg_catalog.min(h.expires_at) FROM billing.credit_holds AS h CROSS JOIN clock
                                   WHERE h.user_id = $1 AND h.status = 'active' AND h.expires_at > clock.at)
     WHERE a.user_id = $1
 RETURNING a.held
)
SELECT acct.held,
       (SELECT pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object(
                   'hold_id', gone.id, 'amount', gone.amount, 'feature', gone.feature,
                   'expires_at', pg_catalog.to_char(gone.expires_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'))
                 ORDER BY gone.expires_at, gone.id)
          FROM gone)
  FROM acct";

/// Void what remains of one grant, under the account lock. $1 user, $2 grant, $3 operation,
/// $4 reason, $5 ledger type, $6 key, $7 reference. No row: the grant is void already.
const VOID: &str = "
WITH v AS (
    SELECT g.id, g.pool, g.remaining, g.category FROM billing.credit_grants AS g
     WHERE g.user_id = $1 AND g.id = $2 AND g.voided_at IS NULL
), upd AS (
    UPDATE billing.credit_grants AS g
       SET remaining = 0, depleted = true, voided_at = pg_catalog.now(), voided_amount = v.remaining, void_reason = $4
      FROM v
     WHERE g.user_id = $1 AND g.id = v.id
), acct AS (
    UPDATE billing.accounts AS a
       SET subscription_credits_balance = a.subscription_credits_balance - CASE WHEN v.pool = 'subscription' THEN v.remaining ELSE 0 END,
           purchased_credits_balance    = a.purchased_credits_balance - CASE WHEN v.pool = 'purchased' THEN v.remaining ELSE 0 END,
           head_grant = NULL, head_subscription = NULL, head_remaining = NULL, head_until = NULL,
           updated_at                   = pg_catalog.now()
      FROM v
     WHERE a.user_id = $1
 RETURNING a.subscription_credits_balance AS sub, a.purchased_credits_balance AS pur, a.debt, v.remaining, v.pool, v.category
), ledger AS (
    INSERT INTO billing.credit_transactions
           (user_id, operation_id, type, pool, amount, balance_after, description, reference_id, idempotency_key, grant_id)
    SELECT $1, $3, $5, acct.pool, -acct.remaining, CASE acct.pool WHEN 'subscription' THEN acct.sub ELSE acct.pur END,
           $4, $7, $6, $2
      FROM acct WHERE acct.remaining > 0
)
SELECT acct.remaining, acct.sub, acct.pur, acct.debt, acct.pool::text, acct.category::text FROM acct";

/// The live pools as billing.user_credits shows them, the debt, the unscoped credits (what
/// spending without a feature can use) by pool, and what the holds reserve (read under the
/// account lock after settling, so the stored sum is exact). $1 user.
const LIVE: &str = "
SELECT COALESCE(pg_catalog.sum(g.remaining) FILTER (WHERE g.pool = 'subscription'), 0)::bigint,
       COALESCE(pg_catalog.sum(g.remaining) FILTER (WHERE g.pool = 'purchased'), 0)::bigint,
       a.debt,
       COALESCE(pg_catalog.sum(g.remaining) FILTER (WHERE g.pool = 'subscription' AND g.scope IS NULL), 0)::bigint,
       COALESCE(pg_catalog.sum(g.remaining) FILTER (WHERE g.pool = 'purchased' AND g.scope IS NULL), 0)::bigint,
       a.held
  FROM billing.accounts AS a
  LEFT JOIN billing.credit_grants AS g
    ON g.user_id = a.user_id AND NOT g.depleted AND g.voided_at IS NULL
   AND g.effective_at <= pg_catalog.clock_timestamp()
   AND (g.expires_at IS NULL OR g.expires_at > pg_catalog.clock_timestamp())
 WHERE a.user_id = $1
 GROUP BY a.debt, a.held";

/// What a feature (or, NULL, spending without one) could spend now, by pool. $1 user, $2 feature,
/// $3 the clock (a parameter, read by the caller: Citus plans a `(SELECT clock_timestamp())`
/// subquery as a query of its own).
const SPENDABLE: &str = "
SELECT COALESCE(pg_catalog.sum(g.remaining) FILTER (WHERE g.pool = 'subscription'), 0)::bigint,
       COALESCE(pg_catalog.sum(g.remaining) FILTER (WHERE g.pool = 'purchased'), 0)::bigint
  FROM billing.credit_grants AS g
 WHERE g.user_id = $1 AND NOT g.depleted AND g.voided_at IS NULL
   AND g.effective_at <= $3
   AND (g.expires_at IS NULL OR g.expires_at > $3)
   AND (g.scope IS NULL OR g.scope @> ARRAY[$2])";

/// What a renewal may roll over: what remains of the subscription-pool grants that started and
/// had not expired by the renewal less the grace period (pg_billing.grace_period: a renewal
/// webhook that arrives just after the period end still rolls the last period over), and the
/// plan's cap (the user's subscription's plan, else the member's plan; none: 0). Read before
/// the renewal settles anything. $1 user.
const ROLLOVER: &str = "
SELECT COALESCE((SELECT pg_catalog.sum(g.remaining) FROM billing.credit_grants AS g
                  WHERE g.user_id = $1 AND NOT g.depleted AND g.voided_at IS NULL AND g.pool = 'subscription'
                    AND g.effective_at <= (SELECT pg_catalog.clock_timestamp())
                    AND (g.expires_at IS NULL
                         OR g.expires_at > (SELECT pg_catalog.clock_timestamp() - billing.grace_period()))), 0)::bigint,
       COALESCE((SELECT p.rollover_max FROM billing.subscriptions AS s JOIN billing.plans AS p ON p.plan_id = s.plan_id
                  WHERE s.user_id = $1),
                (SELECT p.rollover_max FROM billing.members AS m JOIN billing.plans AS p ON p.plan_id = m.plan_id
                  WHERE m.user_id = $1), 0)::bigint";

/// The subscription period end, for the pool and its live subscription grants. $1 user, $2 the
/// date, $3 keep a later date already set (else set $2).
const SET_PERIOD_END: &str = "
WITH a AS (
    UPDATE billing.accounts AS a
       SET subscription_credits_expire_at = CASE WHEN NOT $3 OR a.subscription_credits_expire_at IS NULL THEN $2
                                                 ELSE GREATEST(a.subscription_credits_expire_at, $2) END,
           next_expiry_at = LEAST(a.next_expiry_at,
                                  CASE WHEN NOT $3 OR a.subscription_credits_expire_at IS NULL THEN $2
                                       ELSE GREATEST(a.subscription_credits_expire_at, $2) END),
           head_grant = NULL, head_subscription = NULL, head_remaining = NULL, head_until = NULL
     WHERE a.user_id = $1
 RETURNING a.subscription_credits_expire_at AS e
)
UPDATE billing.credit_grants AS g SET expires_at = a.e
  FROM a
 WHERE g.user_id = $1 AND g.category = 'subscription' AND NOT g.depleted AND g.voided_at IS NULL
   AND (g.expires_at IS NULL OR g.expires_at > pg_catalog.now())
   AND g.expires_at IS DISTINCT FROM a.e";

/// The purchase grant a clawback voids. $1 user, $2 the purchase's operation.
const PURCHASE_GRANT: &str = "
SELECT g.id FROM billing.credit_grants AS g
 WHERE g.user_id = $1 AND g.source_transaction_id = $2 AND g.category = 'purchased'
 ORDER BY g.created_at, g.id LIMIT 1";

const BALANCES: &str =
    "SELECT subscription_credits_balance, purchased_credits_balance, debt, held FROM billing.accounts WHERE user_id = $1";

/// The purchase a clawback reverses: its user and how much it added to the purchased pool.
const FIND_PURCHASE: &str = "
SELECT t.user_id,
       pg_catalog.sum(t.amount) FILTER (WHERE t.pool = 'purchased' AND t.type = 'purchase' AND t.amount > 0)::bigint
  FROM billing.credit_transactions AS t
 WHERE t.operation_id = $1
 GROUP BY t.user_id";

const CLAIM_CLAWBACK: &str = "
INSERT INTO billing.clawbacks (user_id, purchase_transaction_id) VALUES ($1, $2)
ON CONFLICT (user_id, purchase_transaction_id) DO NOTHING RETURNING 1";
const LOAD_CLAWBACK: &str =
    "SELECT response FROM billing.clawbacks WHERE user_id = $1 AND purchase_transaction_id = $2";
const STORE_CLAWBACK: &str =
    "UPDATE billing.clawbacks SET response = $3 WHERE user_id = $1 AND purchase_transaction_id = $2";

/// Idempotency keys live in two namespaces per user ($4 scope): `user` for end users' calls and
/// `service` for service callers', so a key an end user can guess never blocks the backend's.
const CLAIM_KEY: &str = "
INSERT INTO billing.idempotency_keys (user_id, idempotency_key, request, scope) VALUES ($1, $2, $3, $4)
ON CONFLICT (user_id, scope, idempotency_key) DO NOTHING RETURNING 1";
const LOAD_KEY: &str =
    "SELECT request, response FROM billing.idempotency_keys WHERE user_id = $1 AND scope = $3 AND idempotency_key = $2";
const STORE_KEY: &str =
    "UPDATE billing.idempotency_keys SET response = $3 WHERE user_id = $1 AND scope = $4 AND idempotency_key = $2";
const FORGET_KEY: &str =
    "DELETE FROM billing.idempotency_keys WHERE user_id = $1 AND scope = $3 AND idempotency_key = $2 AND response IS NULL";

// ---------------------------------------------------------------------------------------------
// Shared pieces
// ---------------------------------------------------------------------------------------------

fn json_arg(v: &Value) -> DatumWithOid<'static> {
    pgrx::JsonB(v.clone()).into()
}

fn opt(s: Option<&str>) -> Value {
    s.map(|s| Value::String(s.to_string())).unwrap_or(Value::Null)
}

/// Whose namespace an idempotency key belongs to: end users' and service callers' keys never
/// collide (issue 11 item 6).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum KeyScope {
    User,
    Service,
}

impl KeyScope {
    pub fn of(caller: &Caller) -> KeyScope {
        match caller {
            Caller::EndUser { .. } => KeyScope::User,
            Caller::Service => KeyScope::Service,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            KeyScope::User => "user",
            KeyScope::Service => "service",
        }
    }

    /// The namespace a delegated call was given (`key_scope` in its request), required with a key.
    pub fn given(scope: Option<&str>, key: Option<&str>, position: &str) -> BResult<KeyScope> {
        match scope {
            Some("user") => Ok(KeyScope::User),
            Some("service") => Ok(KeyScope::Service),
            _ if key.is_none() => Ok(KeyScope::Service),
            _ => Err(BillingError::invalid(format!("the key scope ({position}) must be 'user' or 'service' when an idempotency key is given"))),
        }
    }
}

/// Run `op` at most once per (user, scope, key): the first call stores its result, a repeat with
/// the same fingerprint replays it, anything else is `PT409`. A concurrent repeat waits on the
/// key's unique index until the first commits (then replays) or aborts (then runs).
pub fn idempotent(
    client: &mut SpiClient<'_>,
    user: &[u8; 16],
    scope: KeyScope,
    key: Option<&str>,
    fingerprint: Value,
    op: impl FnOnce(&mut SpiClient<'_>) -> BResult<Value>,
) -> BResult<Value> {
    idempotent_replayed(client, user, scope, key, fingerprint, op).map(|(v, _)| v)
}

/// [`idempotent`], also saying whether the result is a replay. When `op` fails, its key is
/// forgotten again (0.6.0): a batch that goes on after a failed item leaves no key without a
/// result behind (a single call's error rolls the key back with everything else anyway).
pub fn idempotent_replayed(
    client: &mut SpiClient<'_>,
    user: &[u8; 16],
    scope: KeyScope,
    key: Option<&str>,
    fingerprint: Value,
    op: impl FnOnce(&mut SpiClient<'_>) -> BResult<Value>,
) -> BResult<(Value, bool)> {
    idempotent_unless_declined(client, user, scope, key, fingerprint, |c| op(c).map(Some))?
        .ok_or_else(|| BillingError::internal("an operation that cannot decline declined"))
}

/// [`idempotent_replayed`] for an `op` that may decline (None: it changed nothing): then the key
/// is forgotten again and the result is None (a delegated debit, [`consume_on_shard`]).
pub fn idempotent_unless_declined(
    client: &mut SpiClient<'_>,
    user: &[u8; 16],
    scope: KeyScope,
    key: Option<&str>,
    fingerprint: Value,
    op: impl FnOnce(&mut SpiClient<'_>) -> BResult<Option<Value>>,
) -> BResult<Option<(Value, bool)>> {
    let Some(key) = key else { return op(client).map(|v| v.map(|v| (v, false))) };
    let sc = scope.as_str();
    let claimed =
        spi::write(client, CLAIM_KEY, &[UUID, TEXT, JSONB, TEXT], &[uuid_arg(user), key.into(), json_arg(&fingerprint), sc.into()])?;
    if !claimed.is_empty() {
        let response = match op(client) {
            Ok(Some(r)) => r,
            Ok(None) => {
                spi::write(client, FORGET_KEY, &[UUID, TEXT, TEXT], &[uuid_arg(user), key.into(), sc.into()])?;
                return Ok(None);
            }
            Err(e) => {
                spi::write(client, FORGET_KEY, &[UUID, TEXT, TEXT], &[uuid_arg(user), key.into(), sc.into()])?;
                return Err(e);
            }
        };
        spi::write(client, STORE_KEY, &[UUID, TEXT, JSONB, TEXT], &[uuid_arg(user), key.into(), json_arg(&response), sc.into()])?;
        return Ok(Some((response, false)));
    }
    // The key exists and its transaction committed (we waited for it). Read it with a fresh
    // snapshot: a write-mode SPI statement takes one at READ COMMITTED.
    let t = spi::write(client, LOAD_KEY, &[UUID, TEXT, TEXT], &[uuid_arg(user), key.into(), sc.into()])?;
    let t = t.first();
    let stored = col::<pgrx::JsonB>(&t, 1)?.map(|j| j.0).unwrap_or(Value::Null);
    match idempotency::compare(key, &stored, &fingerprint) {
        Replay::Same => col::<pgrx::JsonB>(&t, 2)?
            .map(|j| Some((j.0, true)))
            .ok_or_else(|| BillingError::internal("an idempotency key has no stored response")),
        Replay::Conflict(e) => Err(e),
    }
}

/// An account's stored pools (the sums of its grants' remaining, expired ones included until a
/// write settles them) and debt.
pub struct Stored {
    pub subscription: i64,
    pub purchased: i64,
    pub debt: i64,
    /// What the holds reserve, expired ones included until a write settles them (0.5.0).
    pub held: i64,
}

/// The stored balances of an account, or `P0002`.
pub fn balances(client: &mut SpiClient<'_>, user: &[u8; 16]) -> BResult<Stored> {
    let t = spi::write(client, BALANCES, &[UUID], &[uuid_arg(user)])?;
    if t.is_empty() {
        return Err(unknown_account(user));
    }
    let t = t.first();
    Ok(Stored {
        subscription: col::<i64>(&t, 1)?.unwrap_or(0),
        purchased: col::<i64>(&t, 2)?.unwrap_or(0),
        debt: col::<i64>(&t, 3)?.unwrap_or(0),
        held: col::<i64>(&t, 4)?.unwrap_or(0),
    })
}

fn unknown_account(user: &[u8; 16]) -> BillingError {
    BillingError::NotFound {
        message: format!("no credit account exists for user {}", uuid_text(user)),
        hint: Some("accounts are created by add_subscription_credits, add_purchased_credits or renew_subscription_credits".into()),
    }
}

thread_local! {
    /// Seeded from the strong random source on first use in each backend (after fork).
    static OP_IDS: std::cell::RefCell<Option<pg_billing_core::ids::OpIds>> = const { std::cell::RefCell::new(None) };
}

/// A fresh operation id (a time-ordered version-7 uuid; see `pg_billing_core::ids`). Grant ids
/// come from the same generator.
pub fn new_operation_id() -> BResult<[u8; 16]> {
    OP_IDS.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.is_none() {
            let mut seed = [0u8; 32];
            // SAFETY: writes exactly 32 bytes into seed.
            if !unsafe { pgrx::pg_sys::pg_strong_random(seed.as_mut_ptr().cast(), seed.len()) } {
                return Err(BillingError::internal("could not generate random values"));
            }
            *cell = Some(pg_billing_core::ids::OpIds::from_seed(seed));
        }
        // SAFETY: GetCurrentTimestamp only reads the clock.
        let pg_micros = unsafe { pgrx::pg_sys::GetCurrentTimestamp() };
        let unix_ms = (pg_micros.div_euclid(1000) + 946_684_800_000).max(0) as u64;
        cell.as_mut().map(|g| g.next_uuid_v7(unix_ms)).ok_or_else(|| BillingError::internal("no id generator"))
    })
}

// ---------------------------------------------------------------------------------------------
// The account lock and lazy expiry
// ---------------------------------------------------------------------------------------------

/// What the account lock returned.
#[derive(Clone, Copy)]
pub struct Locked {
    /// How far below zero a debit may still go (overdraft limit less debt, >= 0).
    pub headroom: i64,
    pub debt: i64,
    /// A grant may have expired since the last write.
    pub due: bool,
    /// A hold may have expired since the last write (0.5.0).
    pub holds_due: bool,
    /// What the active holds reserve (exact once [`lock`] has settled the expired holds).
    pub held: i64,
    /// The operation's clock, read once the lock is held: what is due, what settles and which
    /// grants are live are all decided at this one instant (a grant expiring between two
    /// readings would be neither settled nor spendable, and the stored pools would still count it).
    pub now: TimestampWithTimeZone,
}

fn locked(t: SpiTupleTable<'_>, user: &[u8; 16]) -> BResult<Option<Locked>> {
    locked_unless(t, user, false)
}

/// [`locked`]; `quiet` (a call on a Citus worker, which writes no event): None also when the
/// account has a balance rule or is new (a balance event could fire) or a grant or a hold is due
/// to settle (`grant.expired`, `hold.expired`). The lock is taken either way.
fn locked_unless(t: SpiTupleTable<'_>, user: &[u8; 16], quiet: bool) -> BResult<Option<Locked>> {
    if t.is_empty() {
        return Ok(None);
    }
    let t = t.first();
    let (rule, new) = (col::<bool>(&t, 6)?.unwrap_or(false), col::<bool>(&t, 7)?.unwrap_or(false));
    if quiet && (rule || new) {
        return Ok(None);
    }
    crate::api::events::watch_if(user, rule, new);
    // The clock after the lock is held: what expired while we waited for it is due too.
    let now = spi::clock()?;
    let passed = |i| col::<TimestampWithTimeZone>(&t, i).map(|v| v.is_some_and(|at| at.into_inner() <= now.into_inner()));
    let l = Locked {
        headroom: col::<i64>(&t, 1)?.unwrap_or(0),
        debt: col::<i64>(&t, 2)?.unwrap_or(0),
        due: passed(3)?,
        holds_due: passed(4)?,
        held: col::<i64>(&t, 5)?.unwrap_or(0),
        now,
    };
    Ok(Some(l).filter(|l| !(quiet && (l.due || l.holds_due))))
}

/// Expire the holds past their expiry (the caller holds the account lock): [`SETTLE_HOLDS`].
/// Returns what the active holds reserve afterwards.
fn settle_holds(c: &mut SpiClient<'_>, user: &[u8; 16], now: TimestampWithTimeZone) -> BResult<i64> {
    let t = spi::write(c, SETTLE_HOLDS, &[UUID, TIMESTAMPTZ], &[uuid_arg(user), now.into()])?;
    if t.is_empty() {
        return Err(unknown_account(user));
    }
    let t = t.first();
    let held = col::<i64>(&t, 1)?.unwrap_or(0);
    if let Some(Value::Array(gone)) = col::<pgrx::JsonB>(&t, 2)?.map(|j| j.0) {
        for h in gone {
            crate::api::events::emit(c, user, "hold.expired", h)?;
        }
    }
    Ok(held)
}

/// Settle what the lock found due: expired grants, expired holds.
fn settle_due(c: &mut SpiClient<'_>, user: &[u8; 16], l: &mut Locked) -> BResult<()> {
    if l.due {
        settle_locked(c, user, l.now)?;
    }
    if l.holds_due {
        l.held = settle_holds(c, user, l.now)?;
        l.holds_due = false;
    }
    Ok(())
}

/// Lock the user's account (step 2 of the lock order) and settle expired grants. `create`: make
/// the account when there is none; otherwise a missing account is `P0002`.
pub fn lock(c: &mut SpiClient<'_>, user: &[u8; 16], create: bool) -> BResult<Locked> {
    let t = if create {
        spi::write(c, LOCK_OR_CREATE, &[UUID], &[uuid_arg(user)])?
    } else {
        spi::write(c, LOCK, &[UUID], &[uuid_arg(user)])?
    };
    let mut l = locked(t, user)?.ok_or_else(|| unknown_account(user))?;
    settle_due(c, user, &mut l)?;
    Ok(l)
}

/// Grants past their expiry are never spent (the spending statement checks each grant's expiry)
/// and read as 0; the first write to the account afterwards calls this, which logs their
/// expiration (one ledger row per grant, one `billing.credit_expiration_events` row) in the
/// caller's transaction. The caller holds the account lock. Returns the credits that expired.
fn settle_locked(c: &mut SpiClient<'_>, user: &[u8; 16], now: TimestampWithTimeZone) -> BResult<i64> {
    let op = new_operation_id()?;
    let s = expire_grants(c, user, &op, true, Some("expired at period end"), None, 0, Some(now))?;
    Ok(s.dsub + s.dpur)
}

/// The account lock for a call on a Citus worker (a delegated body, which writes no event): None
/// when there is no account, the account has a balance rule or is new, or a grant or hold is due
/// to settle ([`locked_unless`]); the body then declines.
pub fn lock_quiet(c: &mut SpiClient<'_>, user: &[u8; 16]) -> BResult<Option<Locked>> {
    let t = spi::write(c, LOCK, &[UUID], &[uuid_arg(user)])?;
    locked_unless(t, user, true)
}

/// Lock the account and settle its expired grants (for callers outside this module).
pub fn settle(c: &mut SpiClient<'_>, user: &[u8; 16]) -> BResult<()> {
    let t = spi::write(c, LOCK, &[UUID], &[uuid_arg(user)])?;
    if let Some(mut l) = locked(t, user)? {
        settle_due(c, user, &mut l)?;
    }
    Ok(())
}

/// Lock the account (when there is one), settle its expired grants, and read its live pools.
/// None: no account.
pub fn lock_live(c: &mut SpiClient<'_>, user: &[u8; 16]) -> BResult<Option<Live>> {
    let t = spi::write(c, LOCK, &[UUID], &[uuid_arg(user)])?;
    let Some(mut l) = locked(t, user)? else { return Ok(None) };
    settle_due(c, user, &mut l)?;
    live(c, user).map(Some)
}

/// Set the subscription period end of the pool and of its live subscription grants: `date`, or
/// with `keep_later` the later of it and the one set.
pub fn set_period_end(c: &mut SpiClient<'_>, user: &[u8; 16], date: Option<TimestampWithTimeZone>, keep_later: bool) -> BResult<()> {
    spi::write(c, SET_PERIOD_END, &[UUID, TIMESTAMPTZ, BOOL], &[uuid_arg(user), date.into(), keep_later.into()]).map(|_| ())
}

/// What [`SETTLE`] did: the stored pools after, and what expired from each.
struct Settled {
    sub: i64,
    pur: i64,
    dsub: i64,
    dpur: i64,
}

#[allow(clippy::too_many_arguments)]
fn expire_grants(
    c: &mut SpiClient<'_>,
    user: &[u8; 16],
    op: &[u8; 16],
    only_expired: bool,
    description: Option<&str>,
    key: Option<&str>,
    rolled_over: i64,
    now: Option<TimestampWithTimeZone>,
) -> BResult<Settled> {
    let now = match now {
        Some(t) => t,
        None => spi::clock()?,
    };
    let t = spi::write(
        c,
        SETTLE,
        &[UUID, UUID, BOOL, TEXT, TEXT, INT8, TIMESTAMPTZ],
        &[uuid_arg(user), uuid_arg(op), only_expired.into(), description.into(), key.into(), rolled_over.into(), now.into()],
    )?;
    if t.is_empty() {
        return Err(unknown_account(user));
    }
    let t = t.first();
    let s = Settled {
        sub: col::<i64>(&t, 1)?.unwrap_or(0),
        pur: col::<i64>(&t, 2)?.unwrap_or(0),
        dsub: col::<i64>(&t, 3)?.unwrap_or(0),
        dpur: col::<i64>(&t, 4)?.unwrap_or(0),
    };
    if let Some(Value::Array(gone)) = col::<pgrx::JsonB>(&t, 5)?.map(|j| j.0) {
        // What a renewal rolls over comes back as a rollover grant: attributed to the ended
        // grants in their order, the rest of each is lost.
        let mut roll = rolled_over.max(0);
        for mut g in gone {
            let amount = g["expired_amount"].as_i64().unwrap_or(0);
            let r = roll.min(amount);
            roll -= r;
            g["rolled_over"] = json!(r);
            g["lost"] = json!(amount - r);
            g["ended_by"] = json!(if only_expired { "expiry" } else { "period_end" });
            g["subscription_credits_balance"] = json!(s.sub);
            g["purchased_credits_balance"] = json!(s.pur);
            crate::api::events::emit(c, user, "grant.expired", g)?;
        }
    }
    Ok(s)
}

/// The live pools (what billing.user_credits shows) after a write.
#[derive(Clone, Copy, Default)]
pub struct Live {
    pub sub: i64,
    pub pur: i64,
    pub debt: i64,
    /// Unscoped credits (what spending without a feature may use), by pool.
    pub unscoped_sub: i64,
    pub unscoped_pur: i64,
    /// What the active holds reserve (0.5.0).
    pub held: i64,
    /// Unscoped credits less the debt and the holds.
    pub available: i64,
}

impl Live {
    pub fn total(&self) -> i64 {
        self.sub.saturating_add(self.pur).saturating_sub(self.debt)
    }

    /// The unscoped credits by pool less what the holds reserve (taken from the purchased pool
    /// first: only the sum matters to a debit).
    pub fn unscoped_after_holds(&self) -> (i64, i64) {
        after_holds(self.unscoped_sub, self.unscoped_pur, self.held)
    }
}

/// Two pools' credits less `held` (from the purchased pool first), never below 0.
pub fn after_holds(sub: i64, pur: i64, held: i64) -> (i64, i64) {
    let from_pur = pur.min(held.max(0));
    let from_sub = sub.min(held.max(0) - from_pur);
    (sub - from_sub, pur - from_pur)
}

pub fn live(c: &mut SpiClient<'_>, user: &[u8; 16]) -> BResult<Live> {
    let t = spi::write(c, LIVE, &[UUID], &[uuid_arg(user)])?;
    if t.is_empty() {
        return Ok(Live::default());
    }
    let t = t.first();
    let n = |i| col::<i64>(&t, i).map(|v| v.unwrap_or(0));
    let (usub, upur, debt, held) = (n(4)?, n(5)?, n(3)?, n(6)?);
    Ok(Live {
        sub: n(1)?,
        pur: n(2)?,
        debt,
        unscoped_sub: usub,
        unscoped_pur: upur,
        held,
        available: usub.saturating_add(upur).saturating_sub(debt).saturating_sub(held),
    })
}

// ---------------------------------------------------------------------------------------------
// Spending
// ---------------------------------------------------------------------------------------------

/// FIFO consumption with its result as JSON (for idempotency records and Rust callers).
pub fn consume(
    client: &mut SpiClient<'_>,
    user: &[u8; 16],
    amount: i64,
    ledger_type: &str,
    description: Option<&str>,
    reference: Option<&str>,
    key: Option<&str>,
) -> BResult<Value> {
    Ok(debit(client, user, amount, None, false, ledger_type, description, reference, key)?.to_json())
}

/// What a consumption did: enough to build its JSON result (outside SPI for the hot path).
pub struct Debit {
    pub op: [u8; 16],
    pub amount: i64,
    /// Taken from each pool, and into debt.
    pub dsub: i64,
    pub dpur: i64,
    pub short: i64,
    pub debt: i64,
    /// The stored pools after the debit, and what the same kind of spending could still use.
    pub sub: i64,
    pub pur: i64,
    pub admitted: i64,
    pub grants: Option<Value>,
    /// The live pools after (consume_credits only).
    pub live_sub: i64,
    pub live_pur: i64,
}

/// A debit: the fast path when it applies, else lock, settle expired grants when due, and
/// [`general_debit`].
/// `feature`: the feature spending (None: only unscoped grants pay). Shared by consume_credits,
/// consume_credits_v2, decrement_credits_with_log and the members domain.
#[allow(clippy::too_many_arguments)]
pub fn debit(
    client: &mut SpiClient<'_>,
    user: &[u8; 16],
    amount: i64,
    feature: Option<&str>,
    with_grants: bool,
    ledger_type: &str,
    description: Option<&str>,
    reference: Option<&str>,
    key: Option<&str>,
) -> BResult<Debit> {
    if feature.is_none() && !with_grants {
        if let Some(d) = fast_debit(client, user, amount, ledger_type, description, reference, key, None)? {
            return Ok(d);
        }
    }
    let t = spi::write(client, LOCK_FOR_DEBIT, &[UUID, INT8, TIMESTAMPTZ], &[uuid_arg(user), amount.into(), spi::clock()?.into()])?;
    let mut l = match locked(t, user)? {
        Some(l) => l,
        None => {
            // Unknown account (P0002), or too little stored and overdraft left: PT402 without
            // taking the lock.
            let held = balances(client, user)?.held;
            return Err(insufficient(client, user, amount, feature, held)?);
        }
    };
    settle_due(client, user, &mut l)?;
    let op = new_operation_id()?;
    match general_debit(client, user, &op, amount, feature, with_grants, l.headroom, l.held, l.now, ledger_type, description, reference, key)? {
        Some(d) => Ok(d),
        None => Err(insufficient(client, user, amount, feature, l.held)?),
    }
}

/// [`general_debit`] for callers outside this module (capture_hold), under the account lock they
/// hold (expired grants and holds settled): `held` is what the other active holds reserve (the
/// grants pay at most what they hold less that), `headroom` the overdraft this debit may use,
/// `now` the clock of the lock ([`Locked::now`]). None: the grants and the headroom fall short,
/// nothing changed.
#[allow(clippy::too_many_arguments)]
pub fn debit_locked(
    client: &mut SpiClient<'_>,
    user: &[u8; 16],
    op: &[u8; 16],
    amount: i64,
    feature: Option<&str>,
    headroom: i64,
    held: i64,
    now: TimestampWithTimeZone,
    with_grants: bool,
    ledger_type: &str,
    description: Option<&str>,
    reference: Option<&str>,
    key: Option<&str>,
) -> BResult<Option<Debit>> {
    general_debit(client, user, op, amount, feature, with_grants, headroom, held, now, ledger_type, description, reference, key)
}

/// A live grant as [`LIVE_GRANTS`] returns it.
struct LiveGrant {
    id: [u8; 16],
    subscription_pool: bool,
    remaining: i64,
    category: String,
    admits: bool,
    unscoped: bool,
    expires_at: Option<TimestampWithTimeZone>,
}

/// The general debit (see [`LIVE_GRANTS`]), under the account lock the caller holds.
#[allow(clippy::too_many_arguments)]
fn general_debit(
    c: &mut SpiClient<'_>,
    user: &[u8; 16],
    op: &[u8; 16],
    amount: i64,
    feature: Option<&str>,
    with_grants: bool,
    headroom: i64,
    held: i64,
    clock: TimestampWithTimeZone,
    ledger_type: &str,
    description: Option<&str>,
    reference: Option<&str>,
    key: Option<&str>,
) -> BResult<Option<Debit>> {
    let mut live = Vec::new();
    // The earliest start of a grant that has not started (the same on every row).
    let mut next_start: Option<TimestampWithTimeZone> = None;
    for row in spi::write(c, LIVE_GRANTS, &[UUID, TEXT, TIMESTAMPTZ], &[uuid_arg(user), feature.into(), clock.into()])? {
        next_start = row.get::<TimestampWithTimeZone>(8).or_internal()?;
        live.push(LiveGrant {
            id: row.get::<pgrx::Uuid>(1).or_internal()?.map(|u| *u.as_bytes()).ok_or_else(|| BillingError::internal("grant without id"))?,
            subscription_pool: row.get::<bool>(2).or_internal()?.unwrap_or(false),
            remaining: row.get::<i64>(3).or_internal()?.unwrap_or(0),
            category: row.get::<String>(4).or_internal()?.unwrap_or_default(),
            admits: row.get::<bool>(5).or_internal()?.unwrap_or(false),
            unscoped: row.get::<bool>(6).or_internal()?.unwrap_or(false),
            expires_at: row.get::<TimestampWithTimeZone>(7).or_internal()?,
        });
    }
    let admitted: Vec<&LiveGrant> = live.iter().filter(|g| g.admits).collect();
    let remaining: Vec<i64> = admitted.iter().map(|g| g.remaining).collect();
    // (0.5.0) The grants pay at most what they hold less what the active holds reserve; the
    // rest is overdraft within the headroom, or nothing changes (None).
    let cap = amount.min(remaining.iter().sum::<i64>().saturating_sub(held).max(0));
    let short = amount - cap;
    if short > headroom {
        return Ok(None);
    }
    let (takes, _) = g::take_in_order(&remaining, cap, 0)?;
    let paid: Vec<(&LiveGrant, i64)> = admitted.iter().copied().zip(takes).filter(|(_, n)| *n > 0).collect();
    for (gr, n) in &paid {
        if spi::write(c, SPEND_GRANT, &[UUID, UUID, INT8], &[uuid_arg(user), uuid_arg(&gr.id), (*n).into()])?.is_empty() {
            return Err(BillingError::internal("a grant changed under the account lock"));
        }
    }
    let dsub: i64 = paid.iter().filter(|(gr, _)| gr.subscription_pool).map(|(_, n)| n).sum();
    let dpur: i64 = paid.iter().filter(|(gr, _)| !gr.subscription_pool).map(|(_, n)| n).sum();
    // The head after this debit (see FAST_ACCOUNT): the first live grant without a scope that
    // still holds credits, valid until it expires or a grant that has not started starts.
    let after = |gr: &LiveGrant| gr.remaining - paid.iter().find(|(p, _)| p.id == gr.id).map_or(0, |(_, n)| *n);
    let head = live.iter().find(|gr| gr.unscoped && after(gr) > 0);
    let head_until = match (head.and_then(|h| h.expires_at), next_start) {
        (Some(a), Some(b)) => Some(if a < b { a } else { b }),
        (a, b) => a.or(b),
    };
    let t = spi::write(
        c,
        SPEND_ACCOUNT,
        &[UUID, INT8, INT8, INT8, UUID, BOOL, INT8, TIMESTAMPTZ],
        &[uuid_arg(user), dsub.into(), dpur.into(), short.into(), head.map(|h| pgrx::Uuid::from_bytes(h.id)).into(),
          head.map(|h| h.subscription_pool).into(), head.map(after).into(), head_until.into()],
    )?;
    if t.is_empty() {
        return Err(unknown_account(user));
    }
    let t = t.first();
    let n = |i| col::<i64>(&t, i).map(|v| v.unwrap_or(0));
    let (sub, pur, debt) = (n(1)?, n(2)?, n(3)?);
    if short > 0 && debt == short {
        crate::api::events::emit(
            c,
            user,
            "overdraft.entered",
            json!({"debt": debt, "overdraft_limit": headroom, "overdraft_headroom_left": headroom - short, "subscription_credits_balance": sub, "purchased_credits_balance": pur}),
        )?;
    }
    // Ledger rows in spending order; balance_after: the pool's stored balance after the row.
    let (mut sub_after, mut pur_after) = (sub + dsub, pur + dpur);
    let (mut pools, mut amounts, mut afters, mut grants) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (gr, n) in &paid {
        let after = if gr.subscription_pool {
            sub_after -= n;
            sub_after
        } else {
            pur_after -= n;
            pur_after
        };
        pools.push(if gr.subscription_pool { "subscription" } else { "purchased" }.to_string());
        amounts.push(-n);
        afters.push(after);
        grants.push(Some(pgrx::Uuid::from_bytes(gr.id)));
    }
    if short > 0 {
        pools.push("debt".to_string());
        amounts.push(-short);
        afters.push(debt);
        grants.push(None);
    }
    if !amounts.is_empty() {
        spi::write(
            c,
            LEDGER_ROWS,
            &[UUID, UUID, TEXT, TEXT, TEXT, TEXT, TEXTARRAY, INT8ARRAY, INT8ARRAY, UUIDARRAY, TIMESTAMPTZ],
            &[uuid_arg(user), uuid_arg(op), ledger_type.into(), description.into(), reference.into(), key.into(),
              pools.into(), amounts.into(), afters.into(), grants.into(), clock.into()],
        )?;
    }
    let live_sum = |pred: &dyn Fn(&LiveGrant) -> bool| live.iter().filter(|g| pred(g)).map(|g| g.remaining).sum::<i64>();
    Ok(Some(Debit {
        op: *op,
        amount,
        dsub,
        dpur,
        short,
        debt,
        sub,
        pur,
        // What the same kind of spending could still use: less what the holds reserve.
        admitted: live_sum(&|g| g.admits) - dsub - dpur - held,
        grants: with_grants.then(|| {
            Value::Array(
                paid.iter()
                    .map(|(gr, n)| json!({"grant_id": uuid_text(&gr.id), "category": gr.category, "amount": n}))
                    .collect(),
            )
        }),
        live_sub: live_sum(&|g| g.subscription_pool) - dsub,
        live_pur: live_sum(&|g| !g.subscription_pool) - dpur,
    }))
}

/// The fast path (see [`FAST_ACCOUNT`]): None when it does not apply and nothing changed.
/// `on_shard`: on a Citus worker ([`consume_on_shard`]), the id of the ledger row, and only where
/// no balance rule could fire ([`FAST_ACCOUNT_QUIET`]).
#[allow(clippy::too_many_arguments)]
fn fast_debit(
    c: &mut SpiClient<'_>,
    user: &[u8; 16],
    amount: i64,
    ledger_type: &str,
    description: Option<&str>,
    reference: Option<&str>,
    key: Option<&str>,
    on_shard: Option<i64>,
) -> BResult<Option<Debit>> {
    let sql = if on_shard.is_some() { FAST_ACCOUNT_QUIET } else { FAST_ACCOUNT };
    let t = spi::write(c, sql, &[UUID, INT8, TIMESTAMPTZ], &[uuid_arg(user), amount.into(), spi::clock()?.into()])?;
    if t.is_empty() {
        return Ok(None);
    }
    let t = t.first();
    let n = |i| col::<i64>(&t, i).map(|v| v.unwrap_or(0));
    let (sub, pur, debt) = (n(1)?, n(2)?, n(3)?);
    let grant = col::<pgrx::Uuid>(&t, 4)?.map(|u| *u.as_bytes()).ok_or_else(|| BillingError::internal("no grant"))?;
    let is_sub = col::<bool>(&t, 5)?.unwrap_or(false);
    crate::api::events::watch_if(user, col::<bool>(&t, 6)?.unwrap_or(false), col::<bool>(&t, 7)?.unwrap_or(false));
    let until = col::<TimestampWithTimeZone>(&t, 8)?;
    let clock = spi::clock()?;
    if until.is_some_and(|u| u <= clock)
        || spi::write(c, FAST_GRANT, &[UUID, UUID, INT8, TIMESTAMPTZ], &[uuid_arg(user), uuid_arg(&grant), amount.into(), clock.into()])?
            .is_empty()
    {
        spi::write(c, FAST_UNDO, &[UUID, INT8, BOOL], &[uuid_arg(user), amount.into(), is_sub.into()])?;
        return Ok(None);
    }
    let op = new_operation_id()?;
    let (pool, after) = if is_sub { ("subscription", sub) } else { ("purchased", pur) };
    // (The id last: LEDGER_ROW's parameters are the first 11.)
    let (sql, n) = match on_shard {
        None => (LEDGER_ROW, 11),
        Some(_) => (LEDGER_ROW_ID, 12),
    };
    let t = spi::write(
        c,
        sql,
        &[UUID, UUID, TEXT, TEXT, INT8, INT8, TEXT, TEXT, TEXT, UUID, TIMESTAMPTZ, INT8][..n],
        &[uuid_arg(user), uuid_arg(&op), ledger_type.into(), pool.into(), (-amount).into(), after.into(),
          description.into(), reference.into(), key.into(), uuid_arg(&grant), clock.into(), on_shard.unwrap_or(0).into()][..n],
    )?;
    if let Some(id) = on_shard.filter(|_| t.is_empty()) {
        // The error rolls back the debit with the call.
        return Err(BillingError::invalid_with_hint("p_ledger_id is taken", format!("the user has a ledger row with id {id}")));
    }
    let (dsub, dpur) = if is_sub { (amount, 0) } else { (0, amount) };
    Ok(Some(Debit { op, amount, dsub, dpur, short: 0, debt, sub, pur, admitted: 0, grants: None, live_sub: 0, live_pur: 0 }))
}

/// PT402 with what `feature` could spend now, by pool, less what the holds reserve (`held`).
pub fn insufficient(c: &mut SpiClient<'_>, user: &[u8; 16], amount: i64, feature: Option<&str>, held: i64) -> BResult<BillingError> {
    let (sub, pur) = spendable(c, user, feature)?;
    let (sub, pur) = after_holds(sub, pur, held);
    Ok(BillingError::InsufficientCredits { needed: amount, subscription: sub, purchased: pur })
}

/// What `feature` (None: spending without one) could spend now, by pool, before holds.
pub fn spendable(c: &mut SpiClient<'_>, user: &[u8; 16], feature: Option<&str>) -> BResult<(i64, i64)> {
    let t = spi::write(c, SPENDABLE, &[UUID, TEXT, TIMESTAMPTZ], &[uuid_arg(user), feature.into(), spi::clock()?.into()])?;
    let t = t.first();
    Ok((col::<i64>(&t, 1)?.unwrap_or(0), col::<i64>(&t, 2)?.unwrap_or(0)))
}

impl Debit {
    fn total(&self) -> i64 {
        self.sub.saturating_add(self.pur).saturating_sub(self.debt)
    }

    /// consume_credits_v2's result as a JSON value.
    pub fn to_json(&self) -> Value {
        json!({
            "success": true,
            "transaction_id": uuid_text(&self.op),
            "consumed": self.amount,
            "subscription_used": self.dsub,
            "purchased_used": self.dpur,
            "subscription_credits_balance": self.sub,
            "purchased_credits_balance": self.pur,
            "total_balance": self.total(),
        })
    }

    /// The same result built directly as jsonb in the caller's memory context (the hot path).
    fn to_jsonb(&self) -> pgrx::pg_sys::Datum {
        use crate::boundary::{jsonb_object, JVal};
        let op = uuid_text(&self.op);
        // Keys in jsonb's own order (shorter first, then bytewise): jsonb sorts an object's keys,
        // and PostgreSQL's sort returns at once on input already in order.
        jsonb_object(&[
            ("success", JVal::Bool(true)),
            ("consumed", JVal::Int(self.amount)),
            ("total_balance", JVal::Int(self.total())),
            ("purchased_used", JVal::Int(self.dpur)),
            ("transaction_id", JVal::Str(&op)),
            ("subscription_used", JVal::Int(self.dsub)),
            ("purchased_credits_balance", JVal::Int(self.pur)),
            ("subscription_credits_balance", JVal::Int(self.sub)),
        ])
    }

    /// consume_credits' result: which grants paid what, the debt, and the live pools (like
    /// get_user_credits: grants not started, expired or voided count as 0).
    fn to_grants_json(&self, feature: Option<&str>) -> Value {
        json!({
            "success": true,
            "transaction_id": uuid_text(&self.op),
            "consumed": self.amount,
            "feature": feature,
            "grants": self.grants.clone().unwrap_or_else(|| json!([])),
            "debt_added": self.short,
            "subscription_credits_balance": self.live_sub,
            "purchased_credits_balance": self.live_pur,
            "debt": self.debt,
            "total_balance": self.live_sub.saturating_add(self.live_pur).saturating_sub(self.debt),
            "available": self.admitted.saturating_sub(self.debt),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Granting
// ---------------------------------------------------------------------------------------------

/// The pool a two-pool caller grants to.
#[derive(Clone, Copy)]
pub enum Pool {
    Subscription,
    Purchased,
}

/// When a new grant expires.
#[derive(Clone, Copy)]
pub enum Expiry {
    /// At the subscription period end (accounts.subscription_credits_expire_at; none: never).
    PeriodEnd,
    At(Option<TimestampWithTimeZone>),
}

/// A grant to create.
pub struct NewGrant<'a> {
    pub category: Category,
    pub amount: i64,
    pub priority: i32,
    /// None: now.
    pub effective_at: Option<TimestampWithTimeZone>,
    /// Whether it starts now (or earlier), i.e. may repay debt.
    pub effective_now: bool,
    pub expiry: Expiry,
    pub scope: Option<Vec<String>>,
    pub ledger_type: &'a str,
    pub description: Option<&'a str>,
    pub reference: Option<&'a str>,
    pub key: Option<&'a str>,
}

/// What creating a grant did, and the account's stored pools and debt afterwards.
pub struct Created {
    pub grant_id: [u8; 16],
    pub op: [u8; 16],
    pub repaid: i64,
    pub sub: i64,
    pub pur: i64,
    pub debt: i64,
}

impl Created {
    pub fn total(&self) -> i64 {
        self.sub.saturating_add(self.pur).saturating_sub(self.debt)
    }
}

/// Create a grant under the account lock the caller holds (`locked`), with operation `op`.
/// `ledger_ids`: on a Citus worker ([`grant_on_shard`]), the ids of its ledger rows.
fn create_locked(
    c: &mut SpiClient<'_>,
    user: &[u8; 16],
    op: &[u8; 16],
    l: &Locked,
    n: &NewGrant<'_>,
    ledger_ids: Option<&[i64; 3]>,
) -> BResult<Created> {
    let id = new_operation_id()?;
    let repaid = g::debt_repayment(n.amount, l.debt, n.effective_now, n.scope.is_some());
    let (period, at) = match n.expiry {
        Expiry::PeriodEnd => (true, None),
        Expiry::At(t) => (false, t),
    };
    if ledger_ids.is_some() || crate::citus::loaded() {
        return create_split(c, user, op, &id, n, repaid, ledger_ids);
    }
    let t = spi::write(
        c,
        CREATE_GRANT,
        &[UUID, UUID, UUID, TEXT, INT8, INT4, TIMESTAMPTZ, TIMESTAMPTZ, TEXTARRAY, TEXT, TEXT, TEXT, TEXT, INT8, BOOL],
        &[
            uuid_arg(user),
            uuid_arg(op),
            uuid_arg(&id),
            n.category.as_str().into(),
            n.amount.into(),
            n.priority.into(),
            n.effective_at.into(),
            at.into(),
            n.scope.clone().into(),
            n.ledger_type.into(),
            n.description.into(),
            n.reference.into(),
            n.key.into(),
            repaid.into(),
            period.into(),
        ],
    )?;
    if t.is_empty() {
        return Err(unknown_account(user));
    }
    let t = t.first();
    Ok(Created {
        grant_id: id,
        op: *op,
        repaid,
        sub: col::<i64>(&t, 1)?.unwrap_or(0),
        pur: col::<i64>(&t, 2)?.unwrap_or(0),
        debt: col::<i64>(&t, 3)?.unwrap_or(0),
    })
}

/// [`create_locked`] with Citus: [`GRANT_ACCOUNT`], [`GRANT_ROW`], [`GRANT_LEDGER`] (or
/// [`GRANT_LEDGER_REPAID`]).
fn create_split(
    c: &mut SpiClient<'_>,
    user: &[u8; 16],
    op: &[u8; 16],
    id: &[u8; 16],
    n: &NewGrant<'_>,
    repaid: i64,
    ledger_ids: Option<&[i64; 3]>,
) -> BResult<Created> {
    let subscription = n.category.pool() == g::Pool::Subscription;
    let (period, at) = match n.expiry {
        Expiry::PeriodEnd => (true, None),
        Expiry::At(t) => (false, t),
    };
    let added = n.amount - repaid;
    let t = spi::write(
        c,
        GRANT_ACCOUNT,
        &[UUID, BOOL, INT8, INT8, BOOL, TIMESTAMPTZ],
        &[uuid_arg(user), subscription.into(), added.into(), repaid.into(), period.into(), at.into()],
    )?;
    if t.is_empty() {
        return Err(unknown_account(user));
    }
    let t = t.first();
    let (sub, pur, debt) = (col::<i64>(&t, 1)?.unwrap_or(0), col::<i64>(&t, 2)?.unwrap_or(0), col::<i64>(&t, 3)?.unwrap_or(0));
    let expires = if period { col::<TimestampWithTimeZone>(&t, 4)? } else { at };
    let pool = if subscription { "subscription" } else { "purchased" };
    spi::write(
        c,
        GRANT_ROW,
        &[UUID, UUID, TEXT, INT8, INT8, INT4, TIMESTAMPTZ, TIMESTAMPTZ, TEXTARRAY, UUID, TEXT, TEXT, TEXT, TEXT],
        &[uuid_arg(user), uuid_arg(id), n.category.as_str().into(), n.amount.into(), added.into(), n.priority.into(),
          n.effective_at.into(), expires.into(), n.scope.clone().into(), uuid_arg(op), n.key.into(), n.description.into(),
          n.reference.into(), pool.into()],
    )?;
    let after = if subscription { sub } else { pur };
    let ids = ledger_ids.map(|i| i.to_vec());
    let row = [uuid_arg(user), uuid_arg(op), n.ledger_type.into(), pool.into(), n.amount.into(), (after + repaid).into(),
               n.description.into(), n.reference.into(), n.key.into(), uuid_arg(id), ids.into(), repaid.into(), after.into(), debt.into()];
    let types = [UUID, UUID, TEXT, TEXT, INT8, INT8, TEXT, TEXT, TEXT, UUID, INT8ARRAY, INT8, INT8, INT8];
    if repaid == 0 {
        spi::write(c, GRANT_LEDGER, &types[..11], &row[..11])?;
    } else {
        spi::write(c, GRANT_LEDGER_REPAID, &types, &row)?;
    }
    Ok(Created { grant_id: *id, op: *op, repaid, sub, pur, debt })
}

/// Lock (creating the account when missing), settle, and create one grant in its own operation.
pub fn create(c: &mut SpiClient<'_>, user: &[u8; 16], n: &NewGrant<'_>) -> BResult<Created> {
    let l = lock(c, user, true)?;
    let op = new_operation_id()?;
    create_locked(c, user, &op, &l, n, None)
}

/// The two-pool grant: a subscription grant that expires at the period end, a purchased grant
/// (a refund grant for ledger type `refund`) that never does. Creates the account if missing.
#[allow(clippy::too_many_arguments)]
pub fn grant(
    client: &mut SpiClient<'_>,
    user: &[u8; 16],
    pool: Pool,
    amount: i64,
    ledger_type: &str,
    description: Option<&str>,
    reference: Option<&str>,
    key: Option<&str>,
) -> BResult<Value> {
    let n = two_pool_grant(pool, amount, ledger_type, description, reference, key);
    create(client, user, &n).map(|created| created.to_added_json(amount))
}

/// The grant of [`grant`].
fn two_pool_grant<'a>(
    pool: Pool,
    amount: i64,
    ledger_type: &'a str,
    description: Option<&'a str>,
    reference: Option<&'a str>,
    key: Option<&'a str>,
) -> NewGrant<'a> {
    let (category, expiry) = match pool {
        Pool::Subscription => (Category::Subscription, Expiry::PeriodEnd),
        Pool::Purchased if ledger_type == "refund" => (Category::Refund, Expiry::At(None)),
        Pool::Purchased => (Category::Purchased, Expiry::At(None)),
    };
    NewGrant {
        category,
        amount,
        priority: category.default_priority(),
        effective_at: None,
        effective_now: true,
        expiry,
        scope: None,
        ledger_type,
        description,
        reference,
        key,
    }
}

impl Created {
    /// The result of the functions that add credits (add_purchased_credits and the like).
    fn to_added_json(&self, amount: i64) -> Value {
        json!({
            "success": true,
            "transaction_id": uuid_text(&self.op),
            "added": amount,
            "subscription_credits_balance": self.sub,
            "purchased_credits_balance": self.pur,
            "total_balance": self.total(),
        })
    }
}

fn legacy_total(v: &Value) -> BResult<Ret> {
    let total = v.get("total_balance").and_then(Value::as_i64).unwrap_or(0);
    i32::try_from(total).map(Ret::Int).map_err(|_| BillingError::OutOfRange {
        message: "the new total does not fit the integer this legacy function returns".into(),
        detail: Some(format!("total balance {total}")),
    })
}

// ---------------------------------------------------------------------------------------------
// SQL functions
// ---------------------------------------------------------------------------------------------

/// The request a consume_credits_v2 key stands for (consume_credits_batch items use the same, so
/// a key replays across the two).
pub fn consume_v2_fingerprint(amount: i64, description: Option<&str>, reference: Option<&str>) -> Value {
    idempotency::fingerprint(
        "consume_credits_v2",
        &[("p_amount", json!(amount)), ("p_description", opt(description)), ("p_reference_id", opt(reference))],
    )
}

/// consume_credits_v2(p_user_id, p_amount, p_description, p_reference_id, p_idempotency_key)
fn consume_credits_v2(a: &Args) -> BResult<Ret> {
    let user = validate::required("p_user_id", a.uuid(0))?;
    let caller = security::authorize_user(&user)?;
    let amount = validate::positive_amount("p_amount", a.int(1))?;
    let (d, r, k) = (a.text(2), a.text(3), a.text(4));
    let description = validate::text("p_description", d.as_deref())?;
    let reference = validate::key("p_reference_id", r.as_deref())?;
    let key = validate::key("p_idempotency_key", k.as_deref())?;
    let scope = KeyScope::of(&caller);
    if let Some(r) = crate::citus::delegated(|c| {
        let id = col::<i64>(&spi::write(c, LEDGER_ID, &[], &[])?.first(), 1)?.ok_or_else(|| BillingError::internal("no ledger id"))?;
        let request = vec![description.map(str::to_string), reference.map(str::to_string), key.map(str::to_string),
                           Some(scope.as_str().to_string())];
        spi::write(c, ON_SHARD, &[UUID, INT4, INT8, TEXTARRAY], &[uuid_arg(&user), (amount as i32).into(), id.into(), request.into()])
    })? {
        return Ok(Ret::Datum(r));
    }
    if key.is_none() {
        let d = Spi::connect_mut(|c| debit(c, &user, amount, None, false, "usage", description, reference, None))?;
        return Ok(Ret::Datum(d.to_jsonb()));
    }
    let fp = consume_v2_fingerprint(amount, description, reference);
    Spi::connect_mut(|c| idempotent(c, &user, scope, key, fp, |c| consume(c, &user, amount, "usage", description, reference, key)))
        .map(Ret::Json)
}
crate::billing_fn!(pg_finfo_pgb_consume_credits_v2, pgb_consume_credits_v2, consume_credits_v2);

/// The delegated part of consume_credits_v2 (issue 17): [`consume_on_shard`], called from the
/// FROM list (Citus pushes a call down from inside a function only in that form).
const ON_SHARD: &str = "SELECT r FROM billing._consume_on_shard($1, $2, $3, $4) AS r";
/// The id of its ledger row, from the coordinator's sequence (every node's numbers from 1).
const LEDGER_ID: &str = "SELECT pg_catalog.nextval('billing.credit_transactions_id_seq'::pg_catalog.regclass)";

/// billing._consume_on_shard(p_user_id, p_amount, p_ledger_id, p_request): on a Citus
/// cluster, Citus runs this on the worker that holds the user (force-delegated by
/// billing.distribute(), colocated with billing.accounts), after consume_credits_v2 checked the
/// caller on the coordinator. It takes the fast path only when no event can result (no balance
/// rule on the account): events are numbered on the coordinator (README, "Events on the
/// cluster"); its ledger row takes the id `p_ledger_id` the coordinator drew from its sequence (a
/// worker's own sequence would repeat the coordinator's numbers). `p_request` is
/// `{description, reference_id, idempotency_key, key_scope}` (NULL elements allowed): the
/// function is STRICT because Citus crashes pushing down a call whose distribution argument is
/// NULL, and PostgreSQL folds a STRICT call with a NULL argument to NULL before Citus sees it.
/// Returns consume_credits_v2's result (with a key: claimed, stored or replayed as
/// consume_credits_v2 does, in the caller's namespace `key_scope`), or NULL when the fast path
/// does not apply (nothing changed; the coordinator then runs the general debit). No role is
/// granted it: the coordinator calls it as the extension owner.
fn consume_on_shard(a: &Args) -> BResult<Ret> {
    let user = validate::required("p_user_id", a.uuid(0))?;
    // Only the owner can call it; the check consume_credits_v2 makes, in case a grant changes.
    security::authorize_user(&user)?;
    let amount = validate::positive_amount("p_amount", a.int(1))?;
    let id = validate::required("p_ledger_id", a.bigint(2))?;
    let request = validate::required("p_request", a.text_array(3))?;
    let [d, r, k, sc] = <[Option<String>; 4]>::try_from(request).map_err(|r| {
        BillingError::invalid_with_hint("p_request must have 4 elements", format!("it has {}", r.len()))
    })?;
    let description = validate::text("p_description", d.as_deref())?;
    let reference = validate::key("p_reference_id", r.as_deref())?;
    let key = validate::key("p_idempotency_key", k.as_deref())?;
    if key.is_none() {
        return match Spi::connect_mut(|c| fast_debit(c, &user, amount, "usage", description, reference, None, Some(id)))? {
            Some(d) => Ok(Ret::Datum(d.to_jsonb())),
            None => Ok(Ret::Null),
        };
    }
    // The key's namespace is the caller's on the coordinator (here the caller is the owner).
    let scope = KeyScope::given(sc.as_deref(), key, "p_request[4]")?;
    let fp = consume_v2_fingerprint(amount, description, reference);
    let r = Spi::connect_mut(|c| {
        idempotent_unless_declined(c, &user, scope, key, fp, |c| {
            Ok(fast_debit(c, &user, amount, "usage", description, reference, key, Some(id))?.map(|d| d.to_json()))
        })
    });
    match r {
        Ok(r) => Ok(r.map_or(Ret::Null, |(v, _)| Ret::Json(v))),
        // A key used for another request: declined (it wrote nothing), so the coordinator raises
        // PT409 itself. Raised here it would reach the client as XX000: Citus passes a worker's
        // SQLSTATE on, but pgrx re-raises an error caught in SPI with the codes it knows only.
        Err(BillingError::IdempotencyConflict { .. }) => Ok(Ret::Null),
        Err(e) => Err(e),
    }
}
crate::billing_fn!(pg_finfo_pgb_consume_on_shard, pgb_consume_on_shard, consume_on_shard);

/// consume_credits(p_user_id, p_amount, p_feature, p_description, p_reference_id, p_idempotency_key)
fn consume_credits(a: &Args) -> BResult<Ret> {
    let user = validate::required("p_user_id", a.uuid(0))?;
    let caller = security::authorize_user(&user)?;
    let amount = validate::positive_amount("p_amount", a.int(1))?;
    let (f, d, r, k) = (a.text(2), a.text(3), a.text(4), a.text(5));
    if let Some(f) = f.as_deref() {
        g::feature("p_feature", f)?;
    }
    let feature = f.as_deref();
    let description = validate::text("p_description", d.as_deref())?;
    let reference = validate::key("p_reference_id", r.as_deref())?;
    let key = validate::key("p_idempotency_key", k.as_deref())?;
    let fp = idempotency::fingerprint(
        "consume_credits",
        &[("p_amount", json!(amount)), ("p_feature", opt(feature)), ("p_description", opt(description)), ("p_reference_id", opt(reference))],
    );
    Spi::connect_mut(|c| {
        idempotent(c, &user, KeyScope::of(&caller), key, fp, |c| {
            Ok(debit(c, &user, amount, feature, true, "usage", description, reference, key)?.to_grants_json(feature))
        })
    })
    .map(Ret::Json)
}
crate::billing_fn!(pg_finfo_pgb_consume_credits, pgb_consume_credits, consume_credits);

/// The functions that add credits by [`grant`] (and may be delegated, [`grant_on_shard`]): the
/// pool, the ledger type, and the name of the text argument.
#[derive(Clone, Copy)]
enum Adding {
    Purchased,
    Subscription,
    Refund,
}

impl Adding {
    fn of(function: &str) -> Option<Adding> {
        match function {
            "add_purchased_credits" => Some(Adding::Purchased),
            "add_subscription_credits" => Some(Adding::Subscription),
            "refund_credits" => Some(Adding::Refund),
            _ => None,
        }
    }

    fn function(self) -> &'static str {
        match self {
            Adding::Purchased => "add_purchased_credits",
            Adding::Subscription => "add_subscription_credits",
            Adding::Refund => "refund_credits",
        }
    }

    fn pool(self) -> Pool {
        match self {
            Adding::Subscription => Pool::Subscription,
            Adding::Purchased | Adding::Refund => Pool::Purchased,
        }
    }

    fn ledger_type(self) -> &'static str {
        match self {
            Adding::Purchased => "purchase",
            Adding::Subscription => "subscription_grant",
            Adding::Refund => "refund",
        }
    }

    fn text_argument(self) -> &'static str {
        match self {
            Adding::Refund => "p_reason",
            Adding::Purchased | Adding::Subscription => "p_description",
        }
    }

    /// The request a key stands for.
    fn fingerprint(self, amount: i64, text: Option<&str>, reference: Option<&str>) -> Value {
        idempotency::fingerprint(
            self.function(),
            &[("p_amount", json!(amount)), (self.text_argument(), opt(text)), ("p_reference_id", opt(reference))],
        )
    }
}

/// add_purchased_credits, add_subscription_credits, refund_credits(p_user_id, p_amount, text,
/// p_reference_id, p_idempotency_key). On a Citus cluster the grant runs on the worker that
/// holds the user when it can ([`grant_on_shard`]).
fn adding_credits(a: &Args, adding: Adding) -> BResult<Ret> {
    security::require_service(adding.function())?;
    let user = validate::required("p_user_id", a.uuid(0))?;
    let amount = validate::positive_amount("p_amount", a.int(1))?;
    let (d, r, k) = (a.text(2), a.text(3), a.text(4));
    let text = validate::text(adding.text_argument(), d.as_deref())?;
    let reference = validate::key("p_reference_id", r.as_deref())?;
    let key = validate::key("p_idempotency_key", k.as_deref())?;
    if let Some(r) = crate::citus::delegated(|c| {
        let t = spi::write(c, LEDGER_IDS, &[], &[])?;
        let t = t.first();
        let ids = vec![col::<i64>(&t, 1)?, col::<i64>(&t, 2)?, col::<i64>(&t, 3)?];
        let request = vec![Some(adding.function().to_string()), text.map(str::to_string), reference.map(str::to_string),
                           key.map(str::to_string)];
        spi::write(c, GRANT_ON_SHARD, &[UUID, INT4, INT8ARRAY, TEXTARRAY], &[uuid_arg(&user), (amount as i32).into(), ids.into(), request.into()])
    })? {
        return Ok(Ret::Datum(r));
    }
    let fp = adding.fingerprint(amount, text, reference);
    Spi::connect_mut(|c| {
        idempotent(c, &user, KeyScope::Service, key, fp, |c| {
            if let Adding::Refund = adding {
                // A refund goes back to an existing account (accounts are never deleted).
                balances(c, &user)?;
            }
            grant(c, &user, adding.pool(), amount, adding.ledger_type(), text, reference, key)
        })
    })
    .map(Ret::Json)
}

/// The delegated part of the functions that add credits (0.10.0, issue 17): [`grant_on_shard`].
const GRANT_ON_SHARD: &str = "SELECT r FROM billing._grant_on_shard($1, $2, $3, $4) AS r";
/// The ids of its ledger rows (a grant writes up to 3), from the coordinator's sequence.
const LEDGER_IDS: &str = "
SELECT pg_catalog.nextval('billing.credit_transactions_id_seq'::pg_catalog.regclass),
       pg_catalog.nextval('billing.credit_transactions_id_seq'::pg_catalog.regclass),
       pg_catalog.nextval('billing.credit_transactions_id_seq'::pg_catalog.regclass)";

/// billing._grant_on_shard(p_user_id, p_amount, p_ledger_ids, p_request): on a Citus cluster,
/// Citus runs this on the worker that holds the user (force-delegated by billing.distribute(),
/// colocated with billing.accounts), after add_purchased_credits, add_subscription_credits or
/// refund_credits checked the caller on the coordinator: the grant of [`grant`] under the account
/// lock, in one round trip. `p_request` is `{function, text, reference_id, idempotency_key}`
/// (the text is p_description or, for refund_credits, p_reason); the key is claimed, stored or
/// replayed in the service's namespace as the function does. Its ledger rows take the ids
/// `p_ledger_ids` (3, drawn by the coordinator from its sequence; a grant that repays no debt
/// uses the first). Declines (NULL, nothing changed) where an event could fire or the account
/// must be made: no account, a balance rule or a new account, a grant or hold due to settle, a
/// key used for another request (the coordinator raises PT409: a custom SQLSTATE raised here would
/// reach the client as XX000). STRICT, no role is granted it (as billing._consume_on_shard).
fn grant_on_shard(a: &Args) -> BResult<Ret> {
    let user = validate::required("p_user_id", a.uuid(0))?;
    security::require_service("_grant_on_shard")?;
    let amount = validate::positive_amount("p_amount", a.int(1))?;
    let ids = validate::required("p_ledger_ids", a.bigint_array(2))?;
    let ids = <[Option<i64>; 3]>::try_from(ids)
        .ok()
        .and_then(|[x, y, z]| Some([x?, y?, z?]))
        .ok_or_else(|| BillingError::invalid("p_ledger_ids must be 3 ids, none NULL"))?;
    let request = validate::required("p_request", a.text_array(3))?;
    let [f, d, r, k] = <[Option<String>; 4]>::try_from(request).map_err(|r| {
        BillingError::invalid_with_hint("p_request must have 4 elements", format!("it has {}", r.len()))
    })?;
    let adding = f.as_deref().and_then(Adding::of).ok_or_else(|| {
        BillingError::invalid("p_request[1] must be add_purchased_credits, add_subscription_credits or refund_credits")
    })?;
    let text = validate::text(adding.text_argument(), d.as_deref())?;
    let reference = validate::key("p_reference_id", r.as_deref())?;
    let key = validate::key("p_idempotency_key", k.as_deref())?;
    let fp = adding.fingerprint(amount, text, reference);
    let r = Spi::connect_mut(|c| {
        idempotent_unless_declined(c, &user, KeyScope::Service, key, fp, |c| {
            let Some(l) = lock_quiet(c, &user)? else { return Ok(None) };
            let op = new_operation_id()?;
            let n = two_pool_grant(adding.pool(), amount, adding.ledger_type(), text, reference, key);
            Ok(Some(create_locked(c, &user, &op, &l, &n, Some(&ids))?.to_added_json(amount)))
        })
    });
    match r {
        Ok(r) => Ok(r.map_or(Ret::Null, |(v, _)| Ret::Json(v))),
        Err(BillingError::IdempotencyConflict { .. }) => Ok(Ret::Null),
        Err(e) => Err(e),
    }
}
crate::billing_fn!(pg_finfo_pgb_grant_on_shard, pgb_grant_on_shard, grant_on_shard);

/// add_subscription_credits(p_user_id, p_amount, p_description, p_reference_id, p_idempotency_key)
fn add_subscription_credits(a: &Args) -> BResult<Ret> {
    adding_credits(a, Adding::Subscription)
}
crate::billing_fn!(pg_finfo_pgb_add_subscription_credits, pgb_add_subscription_credits, add_subscription_credits);

/// add_purchased_credits(p_user_id, p_amount, p_description, p_reference_id, p_idempotency_key)
fn add_purchased_credits(a: &Args) -> BResult<Ret> {
    adding_credits(a, Adding::Purchased)
}
crate::billing_fn!(pg_finfo_pgb_add_purchased_credits, pgb_add_purchased_credits, add_purchased_credits);

/// refund_credits(p_user_id, p_amount, p_reason, p_reference_id, p_idempotency_key)
fn refund_credits(a: &Args) -> BResult<Ret> {
    adding_credits(a, Adding::Refund)
}
crate::billing_fn!(pg_finfo_pgb_refund_credits, pgb_refund_credits, refund_credits);

pub fn expire(c: &mut SpiClient<'_>, user: &[u8; 16], description: Option<&str>, key: Option<&str>) -> BResult<Value> {
    // Read first, without a lock: an empty subscription pool (the common case for a scheduled
    // job) is a no-op that answers from this one snapshot and never waits behind a user's open
    // transaction. Otherwise lock, and expire what the newest version holds.
    let b = balances(c, user)?;
    let (op, expired, sub, pur, debt) = if b.subscription == 0 {
        (Value::Null, 0, b.subscription, b.purchased, b.debt)
    } else {
        let t = spi::write(c, LOCK, &[UUID], &[uuid_arg(user)])?;
        let l = locked(t, user)?.ok_or_else(|| unknown_account(user))?;
        let op = new_operation_id()?;
        let s = expire_grants(c, user, &op, false, description, key, 0, None)?;
        (if s.dsub + s.dpur != 0 { Value::String(uuid_text(&op)) } else { Value::Null }, s.dsub, s.sub, s.pur, l.debt)
    };
    Ok(json!({
        "success": true,
        "transaction_id": op,
        "expired_amount": expired,
        "subscription_credits_balance": sub,
        "purchased_credits_balance": pur,
        "total_balance": sub.saturating_add(pur).saturating_sub(debt),
    }))
}

/// expire_subscription_credits(p_user_id, p_description, p_idempotency_key)
fn expire_subscription_credits(a: &Args) -> BResult<Ret> {
    security::require_service("expire_subscription_credits")?;
    let user = validate::required("p_user_id", a.uuid(0))?;
    let (d, k) = (a.text(1), a.text(2));
    let description = validate::text("p_description", d.as_deref())?;
    let key = validate::key("p_idempotency_key", k.as_deref())?;
    let fp = idempotency::fingerprint("expire_subscription_credits", &[("p_description", opt(description))]);
    Spi::connect_mut(|c| idempotent(c, &user, KeyScope::Service, key, fp, |c| expire(c, &user, description, key))).map(Ret::Json)
}
crate::billing_fn!(pg_finfo_pgb_expire_subscription_credits, pgb_expire_subscription_credits, expire_subscription_credits);

/// The renewal, in one operation under the account lock: the subscription pool's grants expire;
/// what they held that had not expired, up to the plan's rollover_max, becomes a `rollover`
/// grant; then `amount` is granted for the period ending `period_end` (both expire then).
pub fn renew(
    c: &mut SpiClient<'_>,
    user: &[u8; 16],
    amount: i64,
    period_end: Option<TimestampWithTimeZone>,
    key: Option<&str>,
) -> BResult<Value> {
    // Lock without settling: what the renewal rolls over is read first (see ROLLOVER).
    let t = spi::write(c, LOCK_OR_CREATE, &[UUID], &[uuid_arg(user)])?;
    let l = locked(t, user)?.ok_or_else(|| unknown_account(user))?;
    let t = spi::write(c, ROLLOVER, &[UUID], &[uuid_arg(user)])?;
    let t = t.first();
    let rolled = g::rollover(col::<i64>(&t, 1)?.unwrap_or(0), col::<i64>(&t, 2)?.unwrap_or(0));
    let op = new_operation_id()?;
    let s = expire_grants(c, user, &op, false, Some("expired at renewal"), key, rolled, None)?;
    set_period_end(c, user, period_end, false)?;
    let mut l = l;
    if rolled > 0 {
        let n = NewGrant {
            category: Category::Rollover,
            amount: rolled,
            priority: Category::Rollover.default_priority(),
            effective_at: None,
            effective_now: true,
            expiry: Expiry::PeriodEnd,
            scope: None,
            ledger_type: "rollover",
            description: Some("rolled over at renewal"),
            reference: None,
            key,
        };
        let r = create_locked(c, user, &op, &l, &n, None)?;
        l.debt = r.debt;
    }
    let n = NewGrant {
        category: Category::Subscription,
        amount,
        priority: Category::Subscription.default_priority(),
        effective_at: None,
        effective_now: true,
        expiry: Expiry::PeriodEnd,
        scope: None,
        ledger_type: "renewal",
        description: Some("subscription renewal"),
        reference: None,
        key,
    };
    let b = create_locked(c, user, &op, &l, &n, None)?;
    Ok(json!({
        "success": true,
        "transaction_id": uuid_text(&op),
        "expired_amount": s.dsub - rolled,
        "added": amount,
        "subscription_credits_balance": b.sub,
        "purchased_credits_balance": b.pur,
        "total_balance": b.total(),
    }))
}

/// renew_subscription_credits(p_user_id, p_amount, p_period_end, p_idempotency_key)
fn renew_subscription_credits(a: &Args) -> BResult<Ret> {
    security::require_service("renew_subscription_credits")?;
    let user = validate::required("p_user_id", a.uuid(0))?;
    let amount = validate::positive_amount("p_amount", a.int(1))?;
    let period_end = a.timestamptz(2);
    // The instant, in a form independent of the session's TimeZone and DateStyle.
    let period_end_iso = a.timestamptz_micros(2).map(validate::iso_utc);
    let k = a.text(3);
    let key = validate::key("p_idempotency_key", k.as_deref())?;
    let fp = idempotency::fingerprint(
        "renew_subscription_credits",
        &[("p_amount", json!(amount)), ("p_period_end", opt(period_end_iso.as_deref()))],
    );
    Spi::connect_mut(|c| {
        idempotent(c, &user, KeyScope::Service, key, fp, |c| {
            let mut v = renew(c, &user, amount, period_end, key)?;
            v["period_end"] = opt(period_end_iso.as_deref());
            Ok(v)
        })
    })
    .map(Ret::Json)
}
crate::billing_fn!(pg_finfo_pgb_renew_subscription_credits, pgb_renew_subscription_credits, renew_subscription_credits);

/// Void what remains of `grant` (the account is locked and settled by the caller). Returns the
/// credits voided and the stored pools after, or None when the grant was void already.
#[allow(clippy::too_many_arguments)]
pub fn void_locked(
    c: &mut SpiClient<'_>,
    user: &[u8; 16],
    grant: &[u8; 16],
    op: &[u8; 16],
    reason: Option<&str>,
    ledger_type: &str,
    key: Option<&str>,
    reference: Option<&str>,
) -> BResult<Option<(i64, Stored)>> {
    let t = spi::write(
        c,
        VOID,
        &[UUID, UUID, UUID, TEXT, TEXT, TEXT, TEXT],
        &[uuid_arg(user), uuid_arg(grant), uuid_arg(op), reason.into(), ledger_type.into(), key.into(), reference.into()],
    )?;
    if t.is_empty() {
        return Ok(None);
    }
    let t = t.first();
    let n = |i| col::<i64>(&t, i).map(|v| v.unwrap_or(0));
    let (voided, stored) = (n(1)?, Stored { subscription: n(2)?, purchased: n(3)?, debt: n(4)?, held: 0 });
    crate::api::events::emit(
        c,
        user,
        "grant.voided",
        json!({
            "grant_id": uuid_text(grant),
            "pool": col::<String>(&t, 5)?,
            "category": col::<String>(&t, 6)?,
            "voided_amount": voided,
            "reason": reason,
            "ledger_type": ledger_type,
            "subscription_credits_balance": stored.subscription,
            "purchased_credits_balance": stored.purchased,
            "debt": stored.debt,
        }),
    )?;
    Ok(Some((voided, stored)))
}

/// clawback_credits_from_transaction(p_transaction_id, p_reason)
fn clawback_credits_from_transaction(a: &Args) -> BResult<Ret> {
    security::require_service("clawback_credits_from_transaction")?;
    let purchase = validate::required("p_transaction_id", a.uuid(0))?;
    let r = a.text(1);
    let reason = validate::text("p_reason", r.as_deref())?;
    Spi::connect_mut(|c| {
        let t = spi::write(c, FIND_PURCHASE, &[UUID], &[uuid_arg(&purchase)])?;
        if t.is_empty() {
            return Err(BillingError::NotFound {
                message: format!("no credit transaction has id {}", uuid_text(&purchase)),
                hint: Some("pass the transaction_id that add_purchased_credits returned".into()),
            });
        }
        let t = t.first();
        let user = col::<pgrx::Uuid>(&t, 1)?.map(|u| *u.as_bytes()).ok_or_else(|| BillingError::internal("ledger row without user"))?;
        let Some(amount) = col::<i64>(&t, 2)? else {
            return Err(BillingError::invalid_with_hint(
                format!("transaction {} is not a purchase", uuid_text(&purchase)),
                "only credits added by add_purchased_credits (type 'purchase') can be clawed back",
            ));
        };
        // Step 2 of the lock order before the clawback row (step 4).
        lock(c, &user, false)?;
        let claimed = spi::write(c, CLAIM_CLAWBACK, &[UUID, UUID], &[uuid_arg(&user), uuid_arg(&purchase)])?;
        if claimed.is_empty() {
            // Never twice for one purchase: replay the first clawback's result.
            let t = spi::write(c, LOAD_CLAWBACK, &[UUID, UUID], &[uuid_arg(&user), uuid_arg(&purchase)])?;
            let mut v = col::<pgrx::JsonB>(&t.first(), 1)?.map(|j| j.0).unwrap_or(Value::Null);
            v["already_clawed_back"] = json!(true);
            return Ok(v);
        }
        let reference = uuid_text(&purchase);
        // What remains of the purchase's grant is voided.
        let grant = spi::write(c, PURCHASE_GRANT, &[UUID, UUID], &[uuid_arg(&user), uuid_arg(&purchase)])?;
        let grant = if grant.is_empty() { None } else { col::<pgrx::Uuid>(&grant.first(), 1)?.map(|u| *u.as_bytes()) };
        let op = new_operation_id()?;
        let voided = match grant {
            Some(id) => void_locked(c, &user, &id, &op, reason, "clawback", None, Some(&reference))?,
            None => None,
        };
        let (taken, b) = match voided {
            Some(v) => v,
            None => (0, balances(c, &user)?),
        };
        let v = json!({
            "success": true,
            "transaction_id": if taken != 0 { Value::String(uuid_text(&op)) } else { Value::Null },
            "original_transaction_id": reference,
            "user_id": uuid_text(&user),
            "clawed_back": taken,
            "shortfall": amount - taken,
            "subscription_credits_balance": b.subscription,
            "purchased_credits_balance": b.purchased,
            "total_balance": b.subscription.saturating_add(b.purchased).saturating_sub(b.debt),
            "already_clawed_back": false,
        });
        spi::write(c, STORE_CLAWBACK, &[UUID, UUID, JSONB], &[uuid_arg(&user), uuid_arg(&purchase), json_arg(&v)])?;
        Ok(v)
    })
    .map(Ret::Json)
}
crate::billing_fn!(pg_finfo_pgb_clawback_credits_from_transaction, pgb_clawback_credits_from_transaction, clawback_credits_from_transaction);

/// increment_credits_with_log(p_user_id, p_amount, p_transaction_type, p_description, p_reference_id)
fn increment_credits_with_log(a: &Args) -> BResult<Ret> {
    security::require_service("increment_credits_with_log")?;
    let user = validate::required("p_user_id", a.uuid(0))?;
    let amount = validate::positive_amount("p_amount", a.int(1))?;
    let ty = validate::required("p_transaction_type", a.text(2))?;
    validate::transaction_type("p_transaction_type", &ty)?;
    let (d, r) = (a.text(3), a.text(4));
    let description = validate::text("p_description", d.as_deref())?;
    let reference = validate::key("p_reference_id", r.as_deref())?;
    // A purchase by any spelling goes to the purchased pool and is logged as 'purchase'.
    let (pool, ty) = if validate::is_purchase_type(&ty) { (Pool::Purchased, "purchase".to_string()) } else { (Pool::Subscription, ty) };
    let v = Spi::connect_mut(|c| grant(c, &user, pool, amount, &ty, description, reference, None))?;
    legacy_total(&v)
}
crate::billing_fn!(pg_finfo_pgb_increment_credits_with_log, pgb_increment_credits_with_log, increment_credits_with_log);

/// decrement_credits_with_log(p_user_id, p_amount, p_transaction_type, p_description, p_reference_id)
fn decrement_credits_with_log(a: &Args) -> BResult<Ret> {
    let user = validate::required("p_user_id", a.uuid(0))?;
    security::authorize_user(&user)?;
    let amount = validate::positive_amount("p_amount", a.int(1))?;
    let ty = a.text(2).unwrap_or_else(|| "usage".to_string());
    validate::transaction_type("p_transaction_type", &ty)?;
    let (d, r) = (a.text(3), a.text(4));
    let description = validate::text("p_description", d.as_deref())?;
    let reference = validate::key("p_reference_id", r.as_deref())?;
    let v = Spi::connect_mut(|c| consume(c, &user, amount, &ty, description, reference, None))?;
    legacy_total(&v)
}
crate::billing_fn!(pg_finfo_pgb_decrement_credits_with_log, pgb_decrement_credits_with_log, decrement_credits_with_log);
