//! Widgets (SPEC 7): ordered widgets across the app's widget tables.
//!
//! Sources are the tables registered with billing.register_widget_table plus tables in schema
//! public named widget_<type> that have the required columns. Each call reads the source list
//! (one small catalog query through a kept plan); the UNION ALL statement over the sources is
//! built once per backend and rebuilt only when that list changes, and its plan is kept.

use std::cell::RefCell;

use pg_billing_core::identity::Caller;
use pg_billing_core::plans::{self, WidgetSource};
use pg_billing_core::BillingError;

use pgrx::spi::{Spi, SpiClient};

use crate::boundary::{Args, BResult, Ret};
use crate::security;
use crate::spi::{self, col, uuid_arg, BOOL, UUID};
use crate::validate;

const SOURCES: &str = "
SELECT w.widget_type, w.schema_name, w.table_name
  FROM billing.widget_tables AS w
UNION ALL
SELECT pg_catalog.substr(c.relname, 8), n.nspname::text, c.relname::text
  FROM pg_catalog.pg_class AS c
  JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
 WHERE n.nspname = 'public'
   AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
   AND c.relname ~ '^widget_[a-z0-9_]+$'
   AND NOT EXISTS (SELECT 1 FROM billing.widget_tables AS w WHERE w.widget_type = pg_catalog.substr(c.relname, 8))
   AND (SELECT pg_catalog.count(*) FROM pg_catalog.pg_attribute AS a
         WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
           AND (a.attname IN ('created_at', 'updated_at')
                OR (a.attname = 'position' AND a.atttypid IN ('pg_catalog.int2'::pg_catalog.regtype,
                    'pg_catalog.int4'::pg_catalog.regtype, 'pg_catalog.int8'::pg_catalog.regtype))
                OR (a.attname IN ('id', 'user_id') AND a.atttypid = 'pg_catalog.uuid'::pg_catalog.regtype)
                OR (a.attname = 'is_active' AND a.atttypid = 'pg_catalog.bool'::pg_catalog.regtype))) = 6
 ORDER BY 1";

struct Built {
    sources: Vec<WidgetSource>,
    widgets_sql: String,
    next_position_sql: String,
}

thread_local! {
    static BUILT: RefCell<Option<Built>> = const { RefCell::new(None) };
}

fn sources(c: &SpiClient<'_>) -> BResult<Vec<WidgetSource>> {
    let t = spi::read(c, SOURCES, &[], &[])?;
    let mut out = Vec::new();
    for r in t {
        let get = |n| r.get::<String>(n).ok().flatten();
        match (get(1), get(2), get(3)) {
            (Some(widget_type), Some(schema), Some(table)) => out.push(WidgetSource { widget_type, schema, table }),
            _ => return Err(BillingError::internal("could not read the widget sources")),
        }
    }
    Ok(out)
}

/// The statements for the current sources, rebuilt only when the sources changed.
fn built<R>(c: &SpiClient<'_>, f: impl FnOnce(&Built) -> BResult<R>) -> BResult<R> {
    let current = sources(c)?;
    let fresh = BUILT.with(|b| b.borrow().as_ref().map(|b| b.sources == current).unwrap_or(false));
    if !fresh {
        let b = Built {
            widgets_sql: plans::widgets_query(&current),
            next_position_sql: plans::next_position_query(&current),
            sources: current,
        };
        BUILT.with(|cell| *cell.borrow_mut() = Some(b));
    }
    BUILT.with(|cell| match cell.borrow().as_ref() {
        Some(b) => f(b),
        None => Err(BillingError::internal("widget statements were not built")),
    })
}

/// billing._user_widgets(p_user_id, p_active_only) -> jsonb array; get_user_widgets_ordered unpacks it.
fn user_widgets(a: &Args) -> BResult<Ret> {
    let user = validate::required("p_user_id", a.uuid(0))?;
    let active_only = a.boolean(1).unwrap_or(true);
    // Anyone (anon included) may read a user's active widgets (a public page); inactive ones
    // only the owner or a service caller.
    let full = match security::caller()? {
        Caller::Service => true,
        Caller::EndUser { user_id: Some(me), .. } => me == user,
        Caller::EndUser { .. } => false,
    };
    let include_inactive = !active_only && full;
    Spi::connect(|c| {
        let sql = built(c, |b| Ok(b.widgets_sql.clone()))?;
        let t = spi::read_dyn(c, &sql, &[UUID, BOOL], &[uuid_arg(&user), include_inactive.into()])?;
        let d = spi::transfer(&t.first(), 1, false, -1)?;
        d.ok_or_else(|| BillingError::internal("the widgets query returned NULL"))
    })
    .map(Ret::Datum)
}
crate::billing_fn!(pg_finfo_pgb_user_widgets, pgb_user_widgets, user_widgets);

/// get_next_widget_position(p_user_id)
fn get_next_widget_position(a: &Args) -> BResult<Ret> {
    let user = validate::required("p_user_id", a.uuid(0))?;
    security::authorize_user(&user)?;
    Spi::connect(|c| {
        let sql = built(c, |b| Ok(b.next_position_sql.clone()))?;
        let t = spi::read_dyn(c, &sql, &[UUID], &[uuid_arg(&user)])?;
        Ok(col::<i32>(&t.first(), 1)?.unwrap_or(0))
    })
    .map(Ret::Int)
}
crate::billing_fn!(pg_finfo_pgb_get_next_widget_position, pgb_get_next_widget_position, get_next_widget_position);

/// count_user_widgets_by_type(p_user_id, p_widget_type)
fn count_user_widgets_by_type(a: &Args) -> BResult<Ret> {
    let user = validate::required("p_user_id", a.uuid(0))?;
    let ty = validate::required("p_widget_type", a.text(1))?;
    Spi::connect(|c| {
        let source = built(c, |b| Ok(b.sources.iter().find(|s| s.widget_type == ty).cloned()))?;
        let Some(s) = source else {
            let known = built(c, |b| Ok(b.sources.iter().map(|s| s.widget_type.clone()).collect::<Vec<_>>().join(", ")))?;
            return Err(BillingError::invalid_with_hint(
                format!("widget type \"{}\" is not known", plans::truncate(&ty, 64)),
                format!("known widget types: {}", if known.is_empty() { "(none)".into() } else { known }),
            ));
        };
        let t = spi::read_dyn(c, &plans::count_query(&s.schema, &s.table, "user_id"), &[UUID], &[uuid_arg(&user)])?;
        Ok(col::<i32>(&t.first(), 1)?.unwrap_or(0))
    })
    .map(Ret::Int)
}
crate::billing_fn!(pg_finfo_pgb_count_user_widgets_by_type, pgb_count_user_widgets_by_type, count_user_widgets_by_type);

