//! Usage metering, resource limits and API rate limits (SPEC 6).

use pg_billing_core::plans::{self, count_query};
use pg_billing_core::rate_limit;
use pg_billing_core::BillingError;
use pgrx::pg_sys;
use pgrx::spi::{Spi, SpiClient};
use serde_json::{json, Map, Value};

use crate::apptables::{self, AppRelation};
use crate::boundary::{Args, BResult, Ret};
use crate::api::credits::INT8ARRAY;
use crate::security;
use crate::spi::{self, col, uuid_arg, OrInternal, INT4, INT8, TEXT, TIMESTAMPTZ, UUID};
use pgrx::datum::TimestampWithTimeZone;
use crate::validate;

/// The user's current usage period, in a statement of its own: billing.current_usage_period reads
/// billing.subscriptions, so it never runs inside a statement on billing.usage_metrics (on Citus
/// that statement runs on a shard, where no other distributed statement may run). $1 user.
const PERIOD: &str = "SELECT p.period_start, p.period_end FROM billing.current_usage_period($1) AS p";

/// Add to the current period's counters in one upsert, so concurrent recorders never lose an
/// increment. $1 user, $2 messages, $3 conversations, $4 tokens in, $5 tokens out,
/// $6 documents, $7 chunks, $8 generations, $9 period start, $10 period end ([`PERIOD`]),
/// $11 now() (Citus takes no now() in ON CONFLICT ... SET).
const RECORD: &str = "
INSERT INTO billing.usage_metrics AS u
       (user_id, period_start, period_end, messages_count, conversations_count, tokens_input_count,
        tokens_output_count, documents_processed_count, chunks_stored_count, generations_count)
VALUES ($1, $9, $10, $2, $3, $4, $5, $6, $7, $8)
ON CONFLICT (user_id, period_start) DO UPDATE
   SET messages_count            = u.messages_count + EXCLUDED.messages_count,
       conversations_count       = u.conversations_count + EXCLUDED.conversations_count,
       tokens_input_count        = u.tokens_input_count + EXCLUDED.tokens_input_count,
       tokens_output_count       = u.tokens_output_count + EXCLUDED.tokens_output_count,
       documents_processed_count = u.documents_processed_count + EXCLUDED.documents_processed_count,
       chunks_stored_count       = u.chunks_stored_count + EXCLUDED.chunks_stored_count,
       generations_count         = u.generations_count + EXCLUDED.generations_count,
       updated_at                = $11";

/// What a rate-limit check reads before it writes, in a statement on no billing table (the
/// helpers read billing.subscriptions and billing.plans; see [`PERIOD`]): the user's effective
/// plan, the current UTC hour bucket, its end as reset_at shows it, and the current usage
/// period. $1 user.
const RATE_CONTEXT: &str = "
SELECT billing.user_effective_plan($1), b.bucket, pg_catalog.to_json(b.bucket + interval '1 hour') #>> '{}',
       p.period_start, p.period_end
  FROM (SELECT pg_catalog.date_trunc('hour', pg_catalog.now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS bucket) AS b,
       billing.current_usage_period($1) AS p";
/// A plan's hourly limit (no row: the plan is gone, 0). $1 plan.
const RATE_LIMIT: &str = "SELECT p.api_rate_limit_hourly FROM billing.plans AS p WHERE p.plan_id = $1";

/// The upsert that counts one request in the hour bucket if the plan's hourly limit allows it:
/// the conflicting row is locked and the WHERE re-checked on its newest version, so with limit N
/// exactly N concurrent callers get a row back. The endpoint counts are set with jsonb_set
/// (immutable: Citus takes only immutable functions in ON CONFLICT ... SET). $1 user, $2 endpoint
/// key, $3 the most endpoints counted by name per bucket, $4 the key of the rest
/// (pg_billing_core::rate_limit), $5 the limit (not 0), $6 the bucket.
macro_rules! hit_sql {
    () => {
        "
    INSERT INTO billing.api_usage AS u (user_id, bucket_start, request_count, endpoint_counts)
    VALUES ($1, $6, 1, pg_catalog.jsonb_set('{}'::jsonb, ARRAY[$2::text], '1'::jsonb))
    ON CONFLICT (user_id, bucket_start) DO UPDATE
       SET request_count   = u.request_count + 1,
           endpoint_counts = pg_catalog.jsonb_set(u.endpoint_counts,
               ARRAY[CASE WHEN u.endpoint_counts ? $2::text
                            OR pg_catalog.jsonb_array_length(pg_catalog.jsonb_path_query_array(u.endpoint_counts, '$.keyvalue()')) < $3
                          THEN $2::text ELSE $4::text END],
               ((COALESCE((u.endpoint_counts ->> CASE WHEN u.endpoint_counts ? $2::text
                                                        OR pg_catalog.jsonb_array_length(pg_catalog.jsonb_path_query_array(u.endpoint_counts, '$.keyvalue()')) < $3
                                                      THEN $2::text ELSE $4::text END)::bigint, 0) + 1)::text)::jsonb)
     WHERE $5 < 0 OR u.request_count < $5
    RETURNING u.request_count"
    };
}

/// Count one request ([`hit_sql`]) and, when counted, count it in the period's api_calls_count
/// too, in one statement. $1 to $6 as [`hit_sql`], $7 period start, $8 period end, $9 now().
const RATE: &str = concat!(
    "WITH hit AS (",
    hit_sql!(),
    "
), monthly AS (
    INSERT INTO billing.usage_metrics AS m (user_id, period_start, period_end, api_calls_count)
    SELECT $1, $7, $8, 1 FROM hit
    ON CONFLICT (user_id, period_start) DO UPDATE
       SET api_calls_count = m.api_calls_count + 1, updated_at = $9
)
SELECT hit.request_count FROM hit"
);
/// With Citus the same in two statements, one per table: Citus runs the two-table statement as
/// an INSERT ... SELECT through the node it was sent from (measured on the cluster check's nodes:
/// a delegated check took 33 ms with it, 3 ms with two statements); the bucket row's lock orders
/// concurrent callers just the same. [`hit_sql`], then for a counted request [`MONTHLY`].
const HIT: &str = hit_sql!();
/// $1 user, $2 period start, $3 period end, $4 now().
const MONTHLY: &str = "
INSERT INTO billing.usage_metrics AS m (user_id, period_start, period_end, api_calls_count)
VALUES ($1, $2, $3, 1)
ON CONFLICT (user_id, period_start) DO UPDATE
   SET api_calls_count = m.api_calls_count + 1, updated_at = $4";

/// The registry entry of a resource type and the user's limit for it. $1 user, $2 type.
/// Columns: oid, kind, owner, schema, table (current names), intact (the registered oid still
/// names a plain table of the registered kind and owner), user column, limit, registered name.
const RESOURCE: &str = "
SELECT r.table_oid::pg_catalog.oid, r.table_kind::pg_catalog.text, r.table_owner::pg_catalog.oid,
       n.nspname::pg_catalog.text, c.relname::pg_catalog.text,
       COALESCE(c.relkind = r.table_kind AND c.relowner = r.table_owner::pg_catalog.oid AND c.relkind IN ('r', 'p'), false),
       r.user_column, billing.limit_value(billing.user_plan_limits($1), r.limit_key),
       pg_catalog.format('%I.%I', r.schema_name, r.table_name), r.resource_type
  FROM billing.resource_types AS r
  LEFT JOIN pg_catalog.pg_class AS c ON c.oid = r.table_oid
  LEFT JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
 WHERE r.resource_type = $2";
/// Every registry entry, same columns as RESOURCE. $1 user.
const RESOURCES: &str = "
SELECT r.table_oid::pg_catalog.oid, r.table_kind::pg_catalog.text, r.table_owner::pg_catalog.oid,
       n.nspname::pg_catalog.text, c.relname::pg_catalog.text,
       COALESCE(c.relkind = r.table_kind AND c.relowner = r.table_owner::pg_catalog.oid AND c.relkind IN ('r', 'p'), false),
       r.user_column, billing.limit_value(billing.user_plan_limits($1), r.limit_key),
       pg_catalog.format('%I.%I', r.schema_name, r.table_name), r.resource_type
  FROM billing.resource_types AS r
  LEFT JOIN pg_catalog.pg_class AS c ON c.oid = r.table_oid
  LEFT JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
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

/// Record usage. With limit rules (0.6.0) the account is locked first (the lock order: the
/// account before the usage row), then the rules of the user's plan are checked.
pub fn record(c: &mut SpiClient<'_>, user: &[u8; 16], d: Deltas) -> BResult<()> {
    let rules = crate::api::events::limit_rules_exist(c)?;
    if rules {
        crate::api::lock_account(c, user)?;
    }
    add_counts(c, user, d)?;
    if rules {
        crate::api::events::check_monthly_limits(c, user)?;
    }
    Ok(())
}

/// The counters' upsert in the user's current period.
fn add_counts(c: &mut SpiClient<'_>, user: &[u8; 16], d: Deltas) -> BResult<()> {
    let p = spi::write(c, PERIOD, &[UUID], &[uuid_arg(user)])?;
    let p = p.first();
    let (start, end) = (col::<TimestampWithTimeZone>(&p, 1)?, col::<TimestampWithTimeZone>(&p, 2)?);
    spi::write(
        c,
        RECORD,
        &[UUID, INT8, INT8, INT8, INT8, INT8, INT8, INT8, TIMESTAMPTZ, TIMESTAMPTZ, TIMESTAMPTZ],
        &[
            uuid_arg(user),
            d[0].into(),
            d[1].into(),
            d[2].into(),
            d[3].into(),
            d[4].into(),
            d[5].into(),
            d[6].into(),
            start.into(),
            end.into(),
            spi::tx_today_now()?.1.into(),
        ],
    )?;
    Ok(())
}

fn record_sql(a: &Args, function: &str, deltas: impl FnOnce(&Args) -> BResult<Deltas>) -> BResult<Ret> {
    security::require_service(function)?;
    let user = validate::required("p_user_id", a.uuid(0))?;
    let d = deltas(a)?;
    if crate::citus::delegated_done(|c| spi::write(c, USAGE_ON_SHARD, &[UUID, INT8ARRAY], &[uuid_arg(&user), d.to_vec().into()]))? {
        return Ok(Ret::Void);
    }
    Spi::connect_mut(|c| record(c, &user, d))?;
    Ok(Ret::Void)
}

/// The delegated part of the record_*_usage functions (0.9.0, issue 17): [`record_on_shard`],
/// called from the FROM list (Citus pushes a call down from inside a function only in that form).
const USAGE_ON_SHARD: &str = "SELECT r FROM billing._record_usage_on_shard($1, $2) AS r";

/// billing._record_usage_on_shard(p_user_id, p_deltas): on a Citus cluster, Citus runs this on
/// the worker that holds the user (force-delegated by billing.distribute(), colocated with
/// billing.accounts), after the record_*_usage function checked its caller on the coordinator:
/// the usage upsert of [`record`] ([`add_counts`]) in one round trip. `p_deltas` are the 7 counters of
/// [`Deltas`]. Declines (NULL, nothing written) when a monthly limit rule exists: its
/// `limit.*` events are numbered on the coordinator, which then records the usage itself.
/// Returns true when recorded. STRICT, no role is granted it (as billing._consume_on_shard).
fn record_on_shard(a: &Args) -> BResult<Ret> {
    let user = validate::required("p_user_id", a.uuid(0))?;
    security::require_service("_record_usage_on_shard")?;
    let deltas = validate::required("p_deltas", a.bigint_array(1))?;
    let d: Deltas = deltas
        .iter()
        .map(|v| v.filter(|v| *v >= 0))
        .collect::<Option<Vec<i64>>>()
        .and_then(|v| Deltas::try_from(v).ok())
        .ok_or_else(|| BillingError::invalid("p_deltas must be 7 counters, none NULL or negative"))?;
    Spi::connect_mut(|c| {
        if crate::api::events::limit_rules_exist_now(c)? {
            return Ok(Ret::Null);
        }
        add_counts(c, &user, d)?;
        Ok(Ret::Bool(true))
    })
}
crate::billing_fn!(pg_finfo_pgb_record_usage_on_shard, pgb_record_usage_on_shard, record_on_shard);

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
    if let Some(r) = crate::citus::delegated(|c| spi::write(c, RATE_ON_SHARD, &[UUID, TEXT], &[uuid_arg(&user), endpoint.as_str().into()]))? {
        return Ok(Ret::Datum(r));
    }
    Spi::connect_mut(|c| rate_check(c, &user, &endpoint, false))?
        .map(Ret::Json)
        .ok_or_else(|| BillingError::internal("the rate-limit check gave no result"))
}
crate::billing_fn!(pg_finfo_pgb_check_api_rate_limit, pgb_check_api_rate_limit, check_api_rate_limit);

/// The delegated part of check_api_rate_limit (0.9.0, issue 17): [`rate_limit_on_shard`].
const RATE_ON_SHARD: &str = "SELECT r FROM billing._rate_limit_on_shard($1, $2) AS r";

/// billing._rate_limit_on_shard(p_user_id, p_endpoint): on a Citus cluster, Citus runs this on
/// the worker that holds the user (force-delegated by billing.distribute(), colocated with
/// billing.accounts), after check_api_rate_limit checked the caller on the coordinator: the
/// check of [`rate_check`] in one round trip. Declines (NULL) when the limit is reached, having
/// counted nothing: the `rate_limit.exceeded` event is numbered on the coordinator, which then
/// runs the check itself. `p_endpoint` is the endpoint key check_api_rate_limit made. STRICT, no
/// role is granted it (as billing._consume_on_shard).
fn rate_limit_on_shard(a: &Args) -> BResult<Ret> {
    let user = validate::required("p_user_id", a.uuid(0))?;
    security::authorize_user(&user)?;
    let endpoint = rate_limit::endpoint_key(a.text(1).as_deref())?;
    Ok(Spi::connect_mut(|c| rate_check(c, &user, &endpoint, true))?.map_or(Ret::Null, Ret::Json))
}
crate::billing_fn!(pg_finfo_pgb_rate_limit_on_shard, pgb_rate_limit_on_shard, rate_limit_on_shard);

/// One rate-limit check on this node: count the request if the plan's hourly limit allows it.
/// A refused request fires `rate_limit.exceeded`, or, `on_shard`, makes the check decline (None).
fn rate_check(c: &mut SpiClient<'_>, user: &[u8; 16], endpoint: &str, on_shard: bool) -> BResult<Option<Value>> {
    let t = spi::write(c, RATE_CONTEXT, &[UUID], &[uuid_arg(user)])?;
    let t = t.first();
    let plan = col::<String>(&t, 1)?;
    let bucket = col::<TimestampWithTimeZone>(&t, 2)?;
    let reset_at = col::<String>(&t, 3)?;
    let (start, end) = (col::<TimestampWithTimeZone>(&t, 4)?, col::<TimestampWithTimeZone>(&t, 5)?);
    let l = spi::write(c, RATE_LIMIT, &[TEXT], &[plan.into()])?;
    let limit = if l.is_empty() { 0 } else { col::<i32>(&l.first(), 1)?.unwrap_or(0) };
    // RATE's parameters; HIT's are the first six, MONTHLY's the user and the last three.
    let types = [UUID, TEXT, INT4, TEXT, INT4, TIMESTAMPTZ, TIMESTAMPTZ, TIMESTAMPTZ, TIMESTAMPTZ];
    let now = spi::tx_today_now()?.1;
    let args = || -> [pgrx::datum::DatumWithOid<'_>; 9] {
        [uuid_arg(user), endpoint.into(), rate_limit::MAX_ENDPOINTS.into(), rate_limit::OTHER_ENDPOINTS.into(), limit.into(),
         bucket.into(), start.into(), end.into(), now.into()]
    };
    let count = if limit == 0 {
        None
    } else if on_shard || crate::citus::loaded() {
        let h = spi::write(c, HIT, &types[..6], &args()[..6])?;
        let n = if h.is_empty() { None } else { col::<i32>(&h.first(), 1)? };
        if n.is_some() {
            let [u, _, _, _, _, _, s, e, t] = args();
            spi::write(c, MONTHLY, &[UUID, TIMESTAMPTZ, TIMESTAMPTZ, TIMESTAMPTZ], &[u, s, e, t])?;
        }
        n
    } else {
        let h = spi::write(c, RATE, &types, &args())?;
        if h.is_empty() {
            None
        } else {
            col::<i32>(&h.first(), 1)?
        }
    };
    if let (None, true, Some(bucket)) = (count, limit > 0, bucket) {
        if on_shard {
            return Ok(None);
        }
        crate::api::events::rate_limit_exceeded(c, user, endpoint, limit, bucket, reset_at.as_deref())?;
    }
    let remaining = match (limit, count) {
        (l, _) if l < 0 => -1,
        (l, Some(n)) => (l - n).max(0),
        (_, None) => 0,
    };
    Ok(Some(json!({"allowed": count.is_some(), "limit_value": limit, "remaining": remaining, "reset_at": reset_at})))
}

/// One registered resource table, as read from the registry.
struct Resource {
    resource_type: String,
    rel: AppRelation,
    intact: bool,
    column: String,
    max: i64,
    registered_name: String,
}

fn resource_row(r: &pgrx::spi::SpiHeapTupleData<'_>) -> BResult<Resource> {
    let row = (|| -> Result<Option<Resource>, pgrx::spi::SpiError> {
        let (Some(oid), Some(kind), Some(owner), Some(intact), Some(column), Some(resource_type)) = (
            r.get::<pg_sys::Oid>(1)?,
            r.get::<String>(2)?,
            r.get::<pg_sys::Oid>(3)?,
            r.get::<bool>(6)?,
            r.get::<String>(7)?,
            r.get::<String>(10)?,
        ) else {
            return Ok(None);
        };
        Ok(Some(Resource {
            resource_type,
            rel: AppRelation {
                oid,
                kind: kind.bytes().next().unwrap_or(b'?'),
                owner,
                schema: r.get::<String>(4)?.unwrap_or_default(),
                table: r.get::<String>(5)?.unwrap_or_default(),
            },
            intact,
            column,
            max: r.get::<i64>(8)?.unwrap_or(-1),
            registered_name: r.get::<String>(9)?.unwrap_or_default(),
        }))
    })()
    .or_internal()?;
    row.ok_or_else(|| BillingError::internal("could not read the resource registry"))
}

/// Count the user's rows in a registered resource table: exactly the registered relation (oid,
/// kind and owner checked, locked), read as its owner (never as the extension owner), so no code
/// of another role runs with more rights than that role has. The count covers every row of the
/// user whatever the app's RLS shows the caller: it is what the plan limits (issue 11 item 1).
fn count_rows(c: &SpiClient<'_>, r: &Resource, user: &[u8; 16]) -> BResult<i64> {
    if !r.intact || !apptables::lock_checked(&r.rel) {
        return Err(BillingError::NotFound {
            message: format!(
                "the table registered for resource type \"{}\" ({}) was dropped or replaced since it was registered (it is no longer the same table with the same owner)",
                r.resource_type, r.registered_name
            ),
            hint: Some("check the table, then register it again with billing.register_resource".into()),
        });
    }
    let sql = count_query(&r.rel.schema, &r.rel.table, &r.column);
    let n = apptables::as_role(r.rel.owner, || -> BResult<_> {
        let t = spi::read_dyn(c, &sql, &[UUID], &[uuid_arg(user)])?;
        col::<i32>(&t.first(), 1)
    })?;
    Ok(n.unwrap_or(0) as i64)
}

/// billing._check_resource_limit(p_user_id, p_resource_type) -> jsonb; check_resource_limit unpacks it.
fn check_resource_limit(a: &Args) -> BResult<Ret> {
    let user = validate::required("p_user_id", a.uuid(0))?;
    security::authorize_user(&user)?;
    let ty = validate::required("p_resource_type", a.text(1))?;
    Spi::connect_mut(|c| {
        let t = spi::read(c, RESOURCE, &[UUID, TEXT], &[uuid_arg(&user), ty.as_str().into()])?;
        if t.is_empty() {
            let known = col::<String>(&spi::read(c, RESOURCE_TYPES, &[], &[])?.first(), 1)?.unwrap_or_default();
            return Err(BillingError::invalid_with_hint(
                format!("resource type \"{}\" is not registered", plans::truncate(&ty, 64)),
                format!("known resource types: {known}; register one with billing.register_resource"),
            ));
        }
        let mut resource = None;
        for row in t {
            resource = Some(resource_row(&row)?);
        }
        let r = resource.ok_or_else(|| BillingError::internal("could not read the resource registry"))?;
        let count = count_rows(c, &r, &user)?;
        crate::api::events::check_resource_limits(c, &user, &ty, count, r.max)?;
        Ok(json!({
            "allowed": plans::resource_allowed(count, r.max),
            "current_count": count,
            "max_allowed": r.max,
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
            rows.push(resource_row(&r)?);
        }
        let mut out = Map::new();
        for r in rows {
            let count = count_rows(c, &r, &user)?;
            out.insert(r.resource_type.clone(), json!({"count": count, "limit": r.max, "allowed": plans::resource_allowed(count, r.max)}));
        }
        Ok(Value::Object(out))
    })
    .map(Ret::Json)
}
crate::billing_fn!(pg_finfo_pgb_resource_usage, pgb_resource_usage, resource_usage);
