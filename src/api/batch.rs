//! Batches (0.6.0; issue 16): record_usage_batch and consume_credits_batch. Each item is read and
//! checked on its own (`pg_billing_core::batch`); one bad item is its own result and the others go
//! on, unless p_atomic. Results come back in the order of the items.

use pg_billing_core::batch::{self as b, UsageEvent};
use pg_billing_core::BillingError;
use pgrx::pg_sys;
use pgrx::spi::{Spi, SpiClient};
use serde_json::{json, Value};

use crate::api::credits::{self, KeyScope};
use crate::boundary::{Args, BResult, Ret};
use crate::security;
use crate::spi::{self, OrInternal};
use crate::validate;

const INT4ARRAY: pgrx::pg_sys::PgOid = pgrx::pg_sys::PgOid::BuiltIn(pgrx::pg_sys::BuiltinOid::INT4ARRAYOID);
const INT8ARRAY: pgrx::pg_sys::PgOid = pgrx::pg_sys::PgOid::BuiltIn(pgrx::pg_sys::BuiltinOid::INT8ARRAYOID);
const UUIDARRAY: pgrx::pg_sys::PgOid = pgrx::pg_sys::PgOid::BuiltIn(pgrx::pg_sys::BuiltinOid::UUIDARRAYOID);
const TEXTARRAY: pgrx::pg_sys::PgOid = pgrx::pg_sys::PgOid::BuiltIn(pgrx::pg_sys::BuiltinOid::TEXTARRAYOID);

fn error_result(index: usize, e: &BillingError) -> Value {
    json!({"index": index, "status": "error", "sqlstate": e.sqlstate(), "message": e.message()})
}

/// A jsonb argument (None: NULL).
fn jsonb_arg(a: &Args, n: usize) -> Option<Value> {
    // SAFETY: the declaration's argument n is jsonb.
    unsafe { pgrx::fcinfo::pg_getarg::<pgrx::JsonB>(a.0, n) }.map(|j| j.0)
}

/// Every valid event in one statement, in (user, key) order: the keys are claimed
/// (billing.usage_event_keys, with the period: cleanup_idempotency_keys forgets them too), the
/// events whose key was new (or that have none) are added up per user and period and upserted
/// into billing.usage_metrics in (user, period) order. An event counts in the period it occurred
/// in: for a user without a subscription its UTC calendar month (as current_usage_period), else
/// the subscription's period when it falls inside it, else the period of the user's usage row
/// that holds it, else its UTC calendar month. Returns the index and period of each event applied.
/// The subscriptions of the batch's users, and the usage rows of those with an event outside
/// their subscription's period, are read first (materialized: on Citus, multi-shard reads whose
/// rows the rest of the statement joins on the coordinator; Citus does not join per-event rows
/// with a distributed table). $1 users, $2 metrics (index into pg_billing_core::batch::METRICS),
/// $3 values, $4 keys, $5 occurred_at (PostgreSQL microseconds), $6 indexes, $7 now() (Citus
/// takes no now() in ON CONFLICT ... SET).
const RECORD_BATCH: &str = "
WITH ev AS (
    SELECT e.u, e.m, e.v, e.k, 'epoch'::timestamptz + (e.t + 946684800000000)::double precision * interval '1 microsecond' AS t, e.o
      FROM ROWS FROM (pg_catalog.unnest($1::uuid[]), pg_catalog.unnest($2::int[]), pg_catalog.unnest($3::bigint[]),
                      pg_catalog.unnest($4::text[]), pg_catalog.unnest($5::bigint[]), pg_catalog.unnest($6::int[]))
           AS e(u, m, v, k, t, o)
), s AS MATERIALIZED (
    SELECT s.user_id, s.current_period_start, s.current_period_end FROM billing.subscriptions AS s WHERE s.user_id = ANY ($1)
), m AS MATERIALIZED (
    SELECT m.user_id, m.period_start, m.period_end FROM billing.usage_metrics AS m
     WHERE m.user_id = ANY (ARRAY(SELECT DISTINCT ev.u FROM ev JOIN s ON s.user_id = ev.u
                                   WHERE (ev.t >= s.current_period_start AND ev.t < s.current_period_end) IS NOT TRUE))
), per AS (
    SELECT ev.u, ev.m, ev.v, ev.k, ev.t, ev.o, p.ps, p.pe
      FROM ev
      LEFT JOIN s ON s.user_id = ev.u
     CROSS JOIN LATERAL (
        SELECT CASE WHEN s.user_id IS NULL
                    THEN pg_catalog.date_trunc('month', ev.t AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
                    WHEN ev.t >= s.current_period_start AND ev.t < s.current_period_end THEN s.current_period_start
                    ELSE COALESCE((SELECT m.period_start FROM m
                                    WHERE m.user_id = ev.u AND m.period_start <= ev.t AND m.period_end > ev.t
                                    ORDER BY m.period_start DESC LIMIT 1),
                                  pg_catalog.date_trunc('month', ev.t AT TIME ZONE 'UTC') AT TIME ZONE 'UTC') END AS ps) AS p0
     CROSS JOIN LATERAL (
        SELECT p0.ps,
               CASE WHEN s.user_id IS NOT NULL AND p0.ps = s.current_period_start THEN s.current_period_end
                    WHEN s.user_id IS NULL THEN ((p0.ps AT TIME ZONE 'UTC') + interval '1 month') AT TIME ZONE 'UTC'
                    ELSE COALESCE((SELECT m.period_end FROM m WHERE m.user_id = ev.u AND m.period_start = p0.ps),
                                  ((p0.ps AT TIME ZONE 'UTC') + interval '1 month') AT TIME ZONE 'UTC') END AS pe) AS p
), keys AS (
    INSERT INTO billing.usage_event_keys AS k (user_id, idempotency_key, period_start)
    SELECT per.u, per.k, per.ps FROM per WHERE per.k IS NOT NULL
     ORDER BY per.u, per.k
    ON CONFLICT (user_id, idempotency_key) DO NOTHING
    RETURNING k.user_id, k.idempotency_key
), fresh AS (
    SELECT per.* FROM per LEFT JOIN keys ON keys.user_id = per.u AND keys.idempotency_key = per.k
     WHERE per.k IS NULL OR keys.user_id IS NOT NULL
), agg AS (
    SELECT fresh.u, fresh.ps, pg_catalog.min(fresh.pe) AS pe,
           COALESCE(pg_catalog.sum(fresh.v) FILTER (WHERE fresh.m = 0), 0)::bigint AS c0,
           COALESCE(pg_catalog.sum(fresh.v) FILTER (WHERE fresh.m = 1), 0)::bigint AS c1,
           COALESCE(pg_catalog.sum(fresh.v) FILTER (WHERE fresh.m = 2), 0)::bigint AS c2,
           COALESCE(pg_catalog.sum(fresh.v) FILTER (WHERE fresh.m = 3), 0)::bigint AS c3,
           COALESCE(pg_catalog.sum(fresh.v) FILTER (WHERE fresh.m = 4), 0)::bigint AS c4,
           COALESCE(pg_catalog.sum(fresh.v) FILTER (WHERE fresh.m = 5), 0)::bigint AS c5,
           COALESCE(pg_catalog.sum(fresh.v) FILTER (WHERE fresh.m = 6), 0)::bigint AS c6,
           COALESCE(pg_catalog.sum(fresh.v) FILTER (WHERE fresh.m = 7), 0)::bigint AS c7
      FROM fresh GROUP BY fresh.u, fresh.ps
), up AS (
    INSERT INTO billing.usage_metrics AS um
           (user_id, period_start, period_end, messages_count, conversations_count, tokens_input_count, tokens_output_count,
            documents_processed_count, chunks_stored_count, generations_count, api_calls_count)
    SELECT agg.u, agg.ps, agg.pe, agg.c0, agg.c1, agg.c2, agg.c3, agg.c4, agg.c5, agg.c6, agg.c7
      FROM agg ORDER BY agg.u, agg.ps
    ON CONFLICT (user_id, period_start) DO UPDATE
       SET messages_count            = um.messages_count + EXCLUDED.messages_count,
           conversations_count       = um.conversations_count + EXCLUDED.conversations_count,
           tokens_input_count        = um.tokens_input_count + EXCLUDED.tokens_input_count,
           tokens_output_count       = um.tokens_output_count + EXCLUDED.tokens_output_count,
           documents_processed_count = um.documents_processed_count + EXCLUDED.documents_processed_count,
           chunks_stored_count       = um.chunks_stored_count + EXCLUDED.chunks_stored_count,
           generations_count         = um.generations_count + EXCLUDED.generations_count,
           api_calls_count           = um.api_calls_count + EXCLUDED.api_calls_count,
           updated_at                = $7
)
SELECT fresh.o, (pg_catalog.extract('epoch', fresh.ps) * 1000000)::bigint - 946684800000000 FROM fresh";

/// The first result of each repeated key. $1 users, $2 keys.
const FIRST_RESULTS: &str = "
SELECT k.user_id, k.idempotency_key, (pg_catalog.extract('epoch', k.period_start) * 1000000)::bigint - 946684800000000
  FROM ROWS FROM (pg_catalog.unnest($1::uuid[]), pg_catalog.unnest($2::text[])) AS d(u, k)
  JOIN billing.usage_event_keys AS k ON k.user_id = d.u AND k.idempotency_key = d.k";

/// record_usage_batch(p_events, p_atomic)
fn record_usage_batch(a: &Args) -> BResult<Ret> {
    security::require_service("record_usage_batch")?;
    let events = validate::required("p_events", jsonb_arg(a, 0))?;
    let atomic = validate::required("p_atomic", a.boolean(1))?;
    let items = b::items("p_events", &events)?;
    // SAFETY: reads the transaction's start time.
    let now = unsafe { pg_sys::GetCurrentTransactionStartTimestamp() };
    let mut results: Vec<Value> = vec![Value::Null; items.len()];
    let mut ok: Vec<(usize, UsageEvent)> = Vec::with_capacity(items.len());
    // A key repeated within the batch: the first one counts, the others are duplicates of it.
    let mut seen: std::collections::HashMap<([u8; 16], String), usize> = std::collections::HashMap::new();
    let mut repeats: Vec<(usize, usize)> = Vec::new();
    for (i, v) in items.iter().enumerate() {
        match b::usage_event(v, now) {
            Ok(e) => {
                if let Some(k) = &e.key {
                    if let Some(&first) = seen.get(&(e.user, k.clone())) {
                        repeats.push((i, first));
                        continue;
                    }
                    seen.insert((e.user, k.clone()), i);
                }
                ok.push((i, e));
            }
            Err(e) if atomic => {
                return Err(BillingError::invalid_with_hint(format!("p_events[{i}]: {}", e.message()), "p_atomic: nothing was recorded"));
            }
            Err(e) => results[i] = error_result(i, &e),
        }
    }
    let order = b::by_user(&ok, |e| e.user);
    let ok: Vec<&(usize, UsageEvent)> = order.iter().map(|&i| &ok[i]).collect();
    let users: Vec<pgrx::Uuid> = ok.iter().map(|(_, e)| pgrx::Uuid::from_bytes(e.user)).collect();
    Spi::connect_mut(|c| {
        // With limit rules, the accounts first (the lock order), in user order.
        let rules = crate::api::events::limit_rules_exist(c)?;
        let mut distinct: Vec<[u8; 16]> = ok.iter().map(|(_, e)| e.user).collect();
        distinct.dedup();
        if rules {
            for u in &distinct {
                crate::api::lock_account(c, u)?;
            }
        }
        let mut applied = std::collections::HashSet::new();
        if !ok.is_empty() {
            let t = spi::write(
                c,
                RECORD_BATCH,
                &[UUIDARRAY, INT4ARRAY, INT8ARRAY, TEXTARRAY, INT8ARRAY, INT4ARRAY, spi::TIMESTAMPTZ],
                &[
                    users.clone().into(),
                    ok.iter().map(|(_, e)| e.metric as i32).collect::<Vec<i32>>().into(),
                    ok.iter().map(|(_, e)| e.value).collect::<Vec<i64>>().into(),
                    ok.iter().map(|(_, e)| e.key.clone()).collect::<Vec<Option<String>>>().into(),
                    ok.iter().map(|(_, e)| e.occurred_at).collect::<Vec<i64>>().into(),
                    ok.iter().map(|(i, _)| *i as i32).collect::<Vec<i32>>().into(),
                    spi::tx_today_now()?.1.into(),
                ],
            )?;
            for row in t {
                let i = row.get::<i32>(1).or_internal()?.unwrap_or(-1) as usize;
                let ps = row.get::<i64>(2).or_internal()?.unwrap_or(0);
                applied.insert(i);
                if let Some(r) = results.get_mut(i) {
                    *r = json!({"index": i, "status": "applied", "period_start": validate::iso_utc(ps)});
                }
            }
        }
        // Keys seen before this batch: their first result.
        let dup: Vec<&(usize, UsageEvent)> = ok.iter().copied().filter(|(i, _)| !applied.contains(i)).collect();
        if !dup.is_empty() {
            let t = spi::write(
                c,
                FIRST_RESULTS,
                &[UUIDARRAY, TEXTARRAY],
                &[
                    dup.iter().map(|(_, e)| pgrx::Uuid::from_bytes(e.user)).collect::<Vec<_>>().into(),
                    dup.iter().map(|(_, e)| e.key.clone()).collect::<Vec<Option<String>>>().into(),
                ],
            )?;
            let mut first = std::collections::HashMap::new();
            for row in t {
                let u = row.get::<pgrx::Uuid>(1).or_internal()?.map(|u| *u.as_bytes()).unwrap_or_default();
                let k = row.get::<String>(2).or_internal()?.unwrap_or_default();
                let ps = row.get::<i64>(3).or_internal()?;
                first.insert((u, k), json!({"status": "applied", "period_start": ps.map(validate::iso_utc)}));
            }
            for (i, e) in dup {
                let f = first.get(&(e.user, e.key.clone().unwrap_or_default())).cloned().unwrap_or(Value::Null);
                results[*i] = json!({"index": i, "status": "duplicate", "first": f});
            }
        }
        if rules {
            for u in &distinct {
                crate::api::events::check_monthly_limits(c, u)?;
            }
        }
        Ok(())
    })?;
    for (i, first) in repeats {
        // The first result as a later batch would see it: {status, period_start}.
        let f = match &results[first] {
            r if r["status"] == "duplicate" => r["first"].clone(),
            r => json!({"status": r["status"], "period_start": r["period_start"]}),
        };
        results[i] = json!({"index": i, "status": "duplicate", "first": f});
    }
    Ok(Ret::Json(Value::Array(results)))
}
crate::billing_fn!(pg_finfo_pgb_record_usage_batch, pgb_record_usage_batch, record_usage_batch);

/// consume_credits_batch(p_items, p_atomic)
fn consume_credits_batch(a: &Args) -> BResult<Ret> {
    security::require_service("consume_credits_batch")?;
    let items_v = validate::required("p_items", jsonb_arg(a, 0))?;
    let atomic = validate::required("p_atomic", a.boolean(1))?;
    let items = b::items("p_items", &items_v)?;
    let mut results: Vec<Value> = vec![Value::Null; items.len()];
    let mut ok = Vec::with_capacity(items.len());
    for (i, v) in items.iter().enumerate() {
        match b::consume_item(v) {
            Ok(it) => ok.push((i, it)),
            Err(e) if atomic => {
                return Err(BillingError::invalid_with_hint(format!("p_items[{i}]: {}", e.message()), "p_atomic: nothing was consumed"));
            }
            Err(e) => results[i] = error_result(i, &e),
        }
    }
    // Each user's items in their order, the users in one order (the accounts are locked in it).
    let order = b::by_user(&ok, |it| it.user);
    Spi::connect_mut(|c| {
        for &k in &order {
            let (i, it) = &ok[k];
            let r = consume_one(c, it);
            match r {
                Ok((v, replayed)) => {
                    results[*i] = json!({"index": i, "status": if replayed { "duplicate" } else { "applied" }, "result": v});
                }
                Err(e) if atomic => {
                    return Err(BillingError::invalid_with_hint(
                        format!("p_items[{i}]: {} ({})", e.message(), e.sqlstate()),
                        "p_atomic: nothing was consumed",
                    ));
                }
                // Only failures that wrote nothing come here (see credits::debit and
                // credits::idempotent_replayed): the other items go on.
                Err(e @ (BillingError::InsufficientCredits { .. } | BillingError::NotFound { .. } | BillingError::IdempotencyConflict { .. })) => {
                    results[*i] = error_result(*i, &e);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    })?;
    Ok(Ret::Json(Value::Array(results)))
}
crate::billing_fn!(pg_finfo_pgb_consume_credits_batch, pgb_consume_credits_batch, consume_credits_batch);

/// One item, as consume_credits_v2 with the service's key namespace.
fn consume_one(c: &mut SpiClient<'_>, it: &b::ConsumeItem) -> BResult<(Value, bool)> {
    let (d, r, k) = (it.description.as_deref(), it.reference.as_deref(), it.key.as_deref());
    let fp = credits::consume_v2_fingerprint(it.amount, d, r);
    credits::idempotent_replayed(c, &it.user, KeyScope::Service, k, fp, |c| {
        credits::consume(c, &it.user, it.amount, "usage", d, r, k)
    })
}

