//! Widgets (SPEC 7): ordered widgets across the app's widget tables.
//!
//! Sources are the tables registered with billing.register_widget_table (kept by oid, kind and
//! owner, checked on every use) plus plain tables in schema public named widget_<type> that
//! have the required columns and a trusted owner (superuser, member of the database owner or of
//! a role in `pg_billing.trusted_table_owners`). Each call reads the source list (one catalog
//! query through a kept plan) together with the columns the reading role may SELECT.
//!
//! The widget statements never run as the extension owner (issue 10 item 4, issue 11 item 1):
//! an end user's run as the request's end-user role, so the app's RLS and column grants decide
//! which rows and which `data` keys come back; a service caller's run as each table's owner.
//! Sources with different readers are read by separate statements and merged with built-in
//! jsonb functions only. The statements are cached by text (spi::read_dyn).

use std::collections::BTreeMap;

use pg_billing_core::identity::Caller;
use pg_billing_core::plans::{self, WidgetSource};
use pg_billing_core::BillingError;

use pgrx::pg_sys::{self, PgOid};
use pgrx::spi::{Spi, SpiClient};

use crate::apptables::{self, AppRelation};
use crate::boundary::{Args, BResult, Ret};
use crate::security;
use crate::spi::{self, col, uuid_arg, OrInternal, BOOL, UUID};
use crate::validate;

const OID: PgOid = PgOid::BuiltIn(pg_sys::BuiltinOid::OIDOID);
const TEXT_ARRAY: PgOid = PgOid::BuiltIn(pg_sys::BuiltinOid::TEXTARRAYOID);

/// Every widget source with what is needed to check and read it. $1 the reading role (NULL:
/// each table's owner), $2 the trusted owners' names (pg_billing.trusted_table_owners).
/// Columns: type, registered, oid, kind, owner, schema, table, intact (the registered oid
/// still names a relation of the registered kind and owner), reader, the columns reader may
/// SELECT (in table order).
const SOURCES: &str = "
WITH src AS (
    SELECT w.widget_type, true AS registered, w.table_oid::pg_catalog.oid AS rel, w.table_kind AS kind,
           w.table_owner::pg_catalog.oid AS owner
      FROM billing.widget_tables AS w
    UNION ALL
    SELECT pg_catalog.substr(c.relname, 8), false, c.oid, c.relkind, c.relowner
      FROM pg_catalog.pg_class AS c
      JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
      JOIN pg_catalog.pg_database AS d ON d.datname = pg_catalog.current_database()
     WHERE n.nspname = 'public'
       AND c.relkind IN ('r', 'p')
       AND c.relname ~ '^widget_[a-z0-9_]+$'
       AND NOT EXISTS (SELECT 1 FROM billing.widget_tables AS w WHERE w.widget_type = pg_catalog.substr(c.relname, 8))
       AND (SELECT pg_catalog.count(*) FROM pg_catalog.pg_attribute AS a
             WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
               AND (a.attname IN ('created_at', 'updated_at')
                    OR (a.attname = 'position' AND a.atttypid IN ('pg_catalog.int2'::pg_catalog.regtype,
                        'pg_catalog.int4'::pg_catalog.regtype, 'pg_catalog.int8'::pg_catalog.regtype))
                    OR (a.attname IN ('id', 'user_id') AND a.atttypid = 'pg_catalog.uuid'::pg_catalog.regtype)
                    OR (a.attname = 'is_active' AND a.atttypid = 'pg_catalog.bool'::pg_catalog.regtype))) = 6
       AND (pg_catalog.pg_has_role(c.relowner, d.datdba, 'MEMBER')
            OR EXISTS (SELECT 1 FROM pg_catalog.pg_roles AS t
                        WHERE t.rolname = ANY ($2) AND pg_catalog.pg_has_role(c.relowner, t.oid, 'MEMBER')))
)
SELECT s.widget_type, s.registered, s.rel, s.kind::pg_catalog.text, s.owner, n.nspname::pg_catalog.text,
       c.relname::pg_catalog.text,
       COALESCE(c.relkind = s.kind AND c.relowner = s.owner, false) AS intact,
       COALESCE($1, s.owner) AS reader,
       CASE WHEN c.oid IS NOT NULL THEN
           ARRAY(SELECT a.attname::pg_catalog.text FROM pg_catalog.pg_attribute AS a
                  WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                    AND pg_catalog.has_column_privilege(COALESCE($1, s.owner), c.oid, a.attnum, 'SELECT')
                  ORDER BY a.attnum)
       END AS columns
  FROM src AS s
  LEFT JOIN pg_catalog.pg_class AS c ON c.oid = s.rel
  LEFT JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
 ORDER BY 1";

const REQUIRED: [&str; 6] = ["id", "user_id", "position", "is_active", "created_at", "updated_at"];

/// One source as read from the catalog.
struct Source {
    widget_type: String,
    registered: bool,
    rel: AppRelation,
    intact: bool,
    reader: pg_sys::Oid,
    columns: Vec<String>,
}

impl Source {
    /// Whether the reading role may read the widget columns (else the source is not shown to it).
    fn readable(&self) -> bool {
        REQUIRED.iter().all(|r| self.columns.iter().any(|c| c == r))
    }

    fn name(&self) -> String {
        format!("{}.{}", plans::quote_ident(&self.rel.schema), plans::quote_ident(&self.rel.table))
    }

    /// Check that the relation is the one registered (or found) and lock it for the rest of
    /// the transaction, so the statement reads exactly it.
    fn check(&self) -> BResult<()> {
        if !self.intact {
            return Err(BillingError::NotFound {
                message: format!(
                    "the table registered for widget type \"{}\" was dropped or replaced since it was registered (it is no longer the same {} with the same owner)",
                    self.widget_type,
                    apptables::kind_name(self.rel.kind)
                ),
                hint: Some("check the table, then register it again with billing.register_widget_table".into()),
            });
        }
        if !apptables::lock_checked(&self.rel) {
            return Err(BillingError::NotFound {
                message: format!("widget table {} of type \"{}\" changed while it was being read", self.name(), self.widget_type),
                hint: Some("retry the call".into()),
            });
        }
        Ok(())
    }

    fn widget_source(&self) -> WidgetSource {
        WidgetSource {
            widget_type: self.widget_type.clone(),
            schema: self.rel.schema.clone(),
            table: self.rel.table.clone(),
            columns: self.columns.clone(),
        }
    }
}

/// The reading role for this caller: the end user's own role, or None (each table's owner).
fn reader_for(caller: &Caller) -> BResult<Option<pg_sys::Oid>> {
    match caller {
        Caller::Service => Ok(None),
        Caller::EndUser { role, .. } => apptables::end_user_reader(role).map(Some),
    }
}

fn sources(c: &SpiClient<'_>, reader: Option<pg_sys::Oid>) -> BResult<Vec<Source>> {
    let trusted = apptables::trusted_owners();
    let t = spi::read(c, SOURCES, &[OID, TEXT_ARRAY], &[reader.into(), trusted.into()])?;
    let mut out = Vec::new();
    for r in t {
        let row = (|| -> Result<Option<Source>, pgrx::spi::SpiError> {
            let (Some(widget_type), Some(registered), Some(oid), Some(kind), Some(owner), Some(intact), Some(reader)) = (
                r.get::<String>(1)?,
                r.get::<bool>(2)?,
                r.get::<pg_sys::Oid>(3)?,
                r.get::<String>(4)?,
                r.get::<pg_sys::Oid>(5)?,
                r.get::<bool>(8)?,
                r.get::<pg_sys::Oid>(9)?,
            ) else {
                return Ok(None);
            };
            Ok(Some(Source {
                widget_type,
                registered,
                rel: AppRelation {
                    oid,
                    kind: kind.bytes().next().unwrap_or(b'?'),
                    owner,
                    schema: r.get::<String>(6)?.unwrap_or_default(),
                    table: r.get::<String>(7)?.unwrap_or_default(),
                },
                intact,
                reader,
                columns: r.get::<Vec<String>>(10)?.unwrap_or_default(),
            }))
        })()
        .or_internal()?;
        match row {
            Some(s) => out.push(s),
            None => return Err(BillingError::internal("could not read the widget sources")),
        }
    }
    Ok(out)
}

/// The sources to read, checked and locked, grouped by reading role (one group for end users).
fn readable_groups(all: &[Source]) -> BResult<BTreeMap<u32, Vec<&Source>>> {
    let mut groups: BTreeMap<u32, Vec<&Source>> = BTreeMap::new();
    for s in all {
        // A registered table that was replaced is an error even if the reader cannot read it.
        if s.registered || s.readable() {
            s.check()?;
        }
        if s.readable() {
            groups.entry(s.reader.to_u32()).or_default().push(s);
        }
    }
    Ok(groups)
}

/// billing._user_widgets(p_user_id, p_active_only) -> jsonb array; get_user_widgets_ordered unpacks it.
fn user_widgets(a: &Args) -> BResult<Ret> {
    let user = validate::required("p_user_id", a.uuid(0))?;
    let active_only = a.boolean(1).unwrap_or(true);
    let caller = security::caller()?;
    // Anyone (anon included) may read a user's active widgets (a public page); inactive ones
    // only the owner or a service caller.
    let full = match &caller {
        Caller::Service => true,
        Caller::EndUser { user_id: Some(me), .. } => *me == user,
        Caller::EndUser { .. } => false,
    };
    let include_inactive = !active_only && full;
    let reader = reader_for(&caller)?;
    Spi::connect(|c| {
        let all = sources(c, reader)?;
        let groups = readable_groups(&all)?;
        let mut parts = Vec::new();
        for (role, group) in &groups {
            let sql = plans::widgets_query(&group.iter().map(|s| s.widget_source()).collect::<Vec<_>>());
            let role = pg_sys::Oid::from(*role);
            let args = [uuid_arg(&user), include_inactive.into()];
            if groups.len() == 1 {
                let d = apptables::as_role(role, || -> BResult<_> {
                    let t = spi::read_dyn(c, &sql, &[UUID, BOOL], &args)?;
                    spi::transfer(&t.first(), 1, false, -1)
                })?;
                return d.ok_or_else(|| BillingError::internal("the widgets query returned NULL"));
            }
            let text = apptables::as_role(role, || -> BResult<_> {
                let t = spi::read_dyn(c, &format!("SELECT ({sql})::pg_catalog.text"), &[UUID, BOOL], &args)?;
                col::<String>(&t.first(), 1)
            })?;
            parts.push(text.unwrap_or_else(|| "[]".into()));
        }
        // No source, or several readers (service callers, tables of different owners): merge
        // as the extension owner with built-in jsonb functions only.
        let t = spi::read(c, plans::MERGE_WIDGETS, &[TEXT_ARRAY], &[parts.into()])?;
        let d = spi::transfer(&t.first(), 1, false, -1)?;
        d.ok_or_else(|| BillingError::internal("the widgets query returned NULL"))
    })
    .map(Ret::Datum)
}
crate::billing_fn!(pg_finfo_pgb_user_widgets, pgb_user_widgets, user_widgets);

/// get_next_widget_position(p_user_id)
fn get_next_widget_position(a: &Args) -> BResult<Ret> {
    let user = validate::required("p_user_id", a.uuid(0))?;
    let caller = security::authorize_user(&user)?;
    let reader = reader_for(&caller)?;
    Spi::connect(|c| {
        let all = sources(c, reader)?;
        let groups = readable_groups(&all)?;
        let mut next = 0;
        for (role, group) in &groups {
            let sql = plans::next_position_query(&group.iter().map(|s| s.widget_source()).collect::<Vec<_>>());
            let n = apptables::as_role(pg_sys::Oid::from(*role), || -> BResult<_> {
                let t = spi::read_dyn(c, &sql, &[UUID], &[uuid_arg(&user)])?;
                col::<i32>(&t.first(), 1)
            })?;
            next = next.max(n.unwrap_or(0));
        }
        Ok(next)
    })
    .map(Ret::Int)
}
crate::billing_fn!(pg_finfo_pgb_get_next_widget_position, pgb_get_next_widget_position, get_next_widget_position);

/// count_user_widgets_by_type(p_user_id, p_widget_type)
fn count_user_widgets_by_type(a: &Args) -> BResult<Ret> {
    let user = validate::required("p_user_id", a.uuid(0))?;
    let ty = validate::required("p_widget_type", a.text(1))?;
    let reader = reader_for(&security::caller()?)?;
    Spi::connect(|c| {
        let all = sources(c, reader)?;
        let Some(s) = all.iter().find(|s| s.widget_type == ty) else {
            let known = all.iter().map(|s| s.widget_type.clone()).collect::<Vec<_>>().join(", ");
            return Err(BillingError::invalid_with_hint(
                format!("widget type \"{}\" is not known", plans::truncate(&ty, 64)),
                format!("known widget types: {}", if known.is_empty() { "(none)".into() } else { known }),
            ));
        };
        s.check()?;
        if !s.columns.iter().any(|c| c == "user_id") {
            return Err(BillingError::Forbidden {
                message: format!("the caller's role may not read the user_id column of widget table {}", s.name()),
                hint: Some("grant SELECT on the widget table to the end-user roles (and let RLS decide which rows they see)".into()),
            });
        }
        let sql = plans::count_query(&s.rel.schema, &s.rel.table, "user_id");
        let n = apptables::as_role(s.reader, || -> BResult<_> {
            let t = spi::read_dyn(c, &sql, &[UUID], &[uuid_arg(&user)])?;
            col::<i32>(&t.first(), 1)
        })?;
        Ok(n.unwrap_or(0))
    })
    .map(Ret::Int)
}
crate::billing_fn!(pg_finfo_pgb_count_user_widgets_by_type, pgb_count_user_widgets_by_type, count_user_widgets_by_type);
