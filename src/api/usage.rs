//! Usage metering, resource limits and API rate limits (SPEC 6).

use pg_billing_core::plans::{self, count_query};
use pg_billing_core::rate_limit;
use pg_billing_core::BillingError;
use pgrx::spi::{Spi, SpiClient};
use serde_json::{json, Map, Value};

use crate::boundary::{Args, BResult, Ret};
use crate::security;
use crate::spi::{self, col, uuid_arg, INT4, INT8, TEXT, UUID};
use crate::validate;

/// Add to the current period's counters in one upsert, so concurrent recorders never lose an
/// increment. $1 user, $2 messages, $3 conversations, $4 tokens in, $5 tokens out,
/// $6 documents, $7 chunks, $8 generations.
const RECORD: &str = "
INSERT INTO billing.usage_metrics AS u
       (user_id, period_start, period_end, messages_count, conversations_count, tokens_input_count,
        tokens_output_count, documents_processed_count, chunks_stored_count, generations_count)
SELECT $1, p.period_start, p.period_end, $2, $3, $4, $5, $6, $7, $8
  FROM billing.current_usage_period($1) AS p
ON CONFLICT (user_id, period_start) DO UPDATE
   SET messages_count            = u.messages_count + EXCLUDED.messages_count,
       conversations_count       = u.conversations_count + EXCLUDED.conversations_count,
       tokens_input_count        = u.tokens_input_count + EXCLUDED.tokens_input_count,
       tokens_output_count       = u.tokens_output_count + EXCLUDED.tokens_output_count,
       documents_processed_count = u.documents_processed_count + EXCLUDED.documents_processed_count,
       chunks_stored_count       = u.chunks_stored_count + EXCLUDED.chunks_stored_count,
       generations_count         = u.generations_count + EXCLUDED.generations_count,
       updated_at                = pg_catalog.now()";

/// Count one request in the current UTC hour bucket if the plan's hourly limit allows it, in one
/// statement: the conflicting row is locked and the WHERE re-checked on its newest version, so
/// with limit N exactly N concurrent callers get a row back. $1 user, $2 endpoint key, $3 the
/// most endpoints counted by name per bucket, $4 the key of the rest (pg_billing_core::rate_limit).
const RATE: &str = "
WITH lim AS (
    SELECT COALESCE((SELECT p.api_rate_limit_hourly FROM billing.plans AS p
                      WHERE p.plan_id = billing.user_effective_plan($1)), 0) AS l,
           pg_catalog.date_trunc('hour', pg_catalog.now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS bucket
), hit AS (
    INSERT INTO billing.api_usage AS u (user_id, bucket_start, request_count, endpoint_counts)
    SELECT $1, lim.bucket, 1, pg_catalog.jsonb_build_object($2::text, 1) FROM lim WHERE lim.l <> 0
    ON CONFLICT (user_id, bucket_start) DO UPDATE
       SET request_count   = u.request_count + 1,
           endpoint_counts = u.endpoint_counts || pg_catalog.jsonb_build_object(
               CASE WHEN u.endpoint_counts ? $2::text
                      OR pg_catalog.jsonb_array_length(pg_catalog.jsonb_path_query_array(u.endpoint_counts, '$.keyvalue()')) < $3
                    THEN $2::text ELSE $4::text END,
               COALESCE((u.endpoint_counts ->> CASE WHEN u.endpoint_counts ? $2::text
                                                      OR pg_catalog.jsonb_array_length(pg_catalog.jsonb_path_query_array(u.endpoint_counts, '$.keyvalue()')) < $3
                                                    THEN $2::text ELSE $4::text END)::bigint, 0) + 1)
     WHERE (SELECT lim.l FROM lim) < 0 OR u.request_count < (SELECT lim.l FROM lim)
    RETURNING u.request_count
), monthly AS (
    INSERT INTO billing.usage_metrics AS m (user_id, period_start, period_end, api_calls_count)
    SELECT $1, p.period_start, p.period_end, 1 FROM hit, billing.current_usage_period($1) AS p
    ON CONFLICT (user_id, period_start) DO UPDATE
       SET api_calls_count = m.api_calls_count + 1, updated_at = pg_catalog.now()
)
SELECT lim.l, pg_catalog.to_json(lim.bucket + interval '1 hour') #>> '{}', (SELECT hit.request_count FROM hit)
  FROM lim";

/// The registry entry of a resource type and the user's limit for it. $1 user, $2 type.
const RESOURCE: &str = "
SELECT r.schema_name, r.table_name, r.user_column, billing.limit_value(billing.user_plan_limits($1), r.limit_key)
  FROM billing.resource_types AS r
 WHERE r.resource_type = $2";
const RESOURCES: &str = "
SELECT r.resource_type, r.schema_name, r.table_name, r.user_column,
       billing.limit_value(billing.user_plan_limits($1), r.limit_key)
  FROM billing.resource_types AS r
 ORDER BY r.resource_type";
const RESOURCE_TYPES: &str =
    "SELECT COALESCE(pg_catalog.string_agg(r.resource_type, ', ' ORDER BY r.resource_type), '(none registered)') FROM billing.resource_types AS r";

fn non_negative(name: &str, v: Option<i32>) -> BResult<i64> {
    let v = validate::required(name, v)?;
    if v < 0 {
        return Err(BillingError::invalid_with_hint(format!("{name} must not be negative"), format!("{name} was {v}")));
    }
    Ok(v as i64)
}

/// Usage deltas: messages, conversations, tokens in, tokens out, documents, chunks, generations.
pub type Deltas = [i64; 7];

pub fn record(c: &mut SpiClient<'_>, user: &[u8; 16], d: Deltas) -> BResult<()> {
    spi::write(
        c,
        RECORD,
        &[UUID, INT8, INT8, INT8, INT8, INT8, INT8, INT8],
        &[uuid_arg(user), d[0].into(), d[1].into(), d[2].into(), d[3].into(), d[4].into(), d[5].into(), d[6].into()],
    )?;
    Ok(())
}

fn record_sql(a: &Args, function: &str, deltas: impl FnOnce(&Args) -> BResult<Deltas>) -> BResult<Ret> {
    security::require_service(function)?;
    let user = validate::required("p_user_id", a.uuid(0))?;
    let d = deltas(a)?;
    Spi::connect_mut(|c| record(c, &user, d))?;
    Ok(Ret::Void)
}

/// record_message_usage(p_user_id, p_tokens_input, p_tokens_output)
fn record_message_usage(a: &Args) -> BResult<Ret> {
    record_sql(a, "record_message_usage", |a| {
        Ok([1, 0, non_negative("p_tokens_input", a.int(1))?, non_negative("p_tokens_output", a.int(2))?, 0, 0, 0])
    })
}
crate::billing_fn!(pg_finfo_pgb_record_message_usage, pgb_record_message_usage, record_message_usage);

/// record_conversation_usage(p_user_id)
fn record_conversation_usage(a: &Args) -> BResult<Ret> {
    record_sql(a, "record_conversation_usage", |_| Ok([0, 1, 0, 0, 0, 0, 0]))
}
crate::billing_fn!(pg_finfo_pgb_record_conversation_usage, pgb_record_conversation_usage, record_conversation_usage);

/// record_document_usage(p_user_id, p_chunks)
fn record_document_usage(a: &Args) -> BResult<Ret> {
    record_sql(a, "record_document_usage", |a| Ok([0, 0, 0, 0, 1, non_negative("p_chunks", a.int(1))?, 0]))
}
crate::billing_fn!(pg_finfo_pgb_record_document_usage, pgb_record_document_usage, record_document_usage);

/// billing._check_api_rate_limit(p_user_id, p_endpoint) -> jsonb; check_api_rate_limit unpacks it.
fn check_api_rate_limit(a: &Args) -> BResult<Ret> {
    let user = validate::required("p_user_id", a.uuid(0))?;
    security::authorize_user(&user)?;
    let endpoint = rate_limit::endpoint_key(a.text(1).as_deref())?;
    Spi::connect_mut(|c| {
        let t = spi::write(
            c,
            RATE,
            &[UUID, TEXT, INT4, TEXT],
            &[uuid_arg(&user), endpoint.as_str().into(), rate_limit::MAX_ENDPOINTS.into(), rate_limit::OTHER_ENDPOINTS.into()],
        )?;
        let t = t.first();
        let limit = col::<i32>(&t, 1)?.unwrap_or(0);
        let reset_at = col::<String>(&t, 2)?;
        let count = col::<i32>(&t, 3)?;
        let remaining = match (limit, count) {
            (l, _) if l < 0 => -1,
            (l, Some(n)) => (l - n).max(0),
            (_, None) => 0,
        };
        Ok(json!({"allowed": count.is_some(), "limit_value": limit, "remaining": remaining, "reset_at": reset_at}))
    })
    .map(Ret::Json)
}
crate::billing_fn!(pg_finfo_pgb_check_api_rate_limit, pgb_check_api_rate_limit, check_api_rate_limit);

fn count_rows(c: &SpiClient<'_>, schema: &str, table: &str, column: &str, user: &[u8; 16]) -> BResult<i64> {
    let t = spi::read_dyn(c, &count_query(schema, table, column), &[UUID], &[uuid_arg(user)])?;
    Ok(col::<i32>(&t.first(), 1)?.unwrap_or(0) as i64)
}

/// billing._check_resource_limit(p_user_id, p_resource_type) -> jsonb; check_resource_limit unpacks it.
fn check_resource_limit(a: &Args) -> BResult<Ret> {
    let user = validate::required("p_user_id", a.uuid(0))?;
    security::authorize_user(&user)?;
    let ty = validate::required("p_resource_type", a.text(1))?;
    Spi::connect(|c| {
        let t = spi::read(c, RESOURCE, &[UUID, TEXT], &[uuid_arg(&user), ty.as_str().into()])?;
        if t.is_empty() {
            let known = col::<String>(&spi::read(c, RESOURCE_TYPES, &[], &[])?.first(), 1)?.unwrap_or_default();
            return Err(BillingError::invalid_with_hint(
                format!("resource type \"{}\" is not registered", plans::truncate(&ty, 64)),
                format!("known resource types: {known}; register one with billing.register_resource"),
            ));
        }
        let t = t.first();
        let (schema, table, column) = (
            col::<String>(&t, 1)?.unwrap_or_default(),
            col::<String>(&t, 2)?.unwrap_or_default(),
            col::<String>(&t, 3)?.unwrap_or_default(),
        );
        let max = col::<i64>(&t, 4)?.unwrap_or(-1);
        let count = count_rows(c, &schema, &table, &column, &user)?;
        Ok(json!({
            "allowed": plans::resource_allowed(count, max),
            "current_count": count,
            "max_allowed": max,
            "resource_type": ty,
        }))
    })
    .map(Ret::Json)
}
crate::billing_fn!(pg_finfo_pgb_check_resource_limit, pgb_check_resource_limit, check_resource_limit);

/// billing._resource_usage(p_user_id) -> jsonb {type: {count, limit, allowed}} for the dashboard.
fn resource_usage(a: &Args) -> BResult<Ret> {
    let user = validate::required("p_user_id", a.uuid(0))?;
    security::authorize_user(&user)?;
    Spi::connect(|c| {
        let t = spi::read(c, RESOURCES, &[UUID], &[uuid_arg(&user)])?;
        let mut rows = Vec::new();
        for r in t {
            let get = |n| r.get::<String>(n).map(|v| v.unwrap_or_default());
            let row = (get(1), get(2), get(3), get(4), r.get::<i64>(5));
            match row {
                (Ok(ty), Ok(s), Ok(tb), Ok(col_), Ok(max)) => rows.push((ty, s, tb, col_, max.unwrap_or(-1))),
                _ => return Err(BillingError::internal("could not read the resource registry")),
            }
        }
        let mut out = Map::new();
        for (ty, schema, table, column, max) in rows {
            let count = count_rows(c, &schema, &table, &column, &user)?;
            out.insert(ty, json!({"count": count, "limit": max, "allowed": plans::resource_allowed(count, max)}));
        }
        Ok(Value::Object(out))
    })
    .map(Ret::Json)
}
crate::billing_fn!(pg_finfo_pgb_resource_usage, pgb_resource_usage, resource_usage);
