//! Plans, subscriptions, usage metrics, resource and widget registries: the rules that need no
//! database.

use crate::error::{BillingError, Result};

pub const SUBSCRIPTION_STATUSES: [&str; 8] =
    ["free", "trialing", "active", "past_due", "canceled", "paused", "expired", "pending"];

/// Statuses whose new period (or new plan) grants the plan's monthly credits.
pub fn grants_credits(status: &str) -> bool {
    matches!(status, "active" | "trialing")
}

/// What an applied subscription event grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeriodGrant {
    /// Nothing.
    None,
    /// The period's first grant: the old subscription credits expire and these are granted.
    Renew(i64),
    /// An upgrade within the period: these are added (the difference to the new plan).
    TopUp(i64),
}

/// The credit rule of `upsert_subscription` (issue 10 item 1, issue 11 item 4). Credits are granted
/// only when the period really advances (`new_period`: a new subscription, or a start or end later
/// than the stored one) or, within one period, when the plan changes to one with more monthly
/// credits than the period has granted so far: then the difference tops the pool up. So a period
/// never grants more than the highest plan it had, however often the webhook repeats or the plan
/// flips; a downgrade within a period grants nothing and takes nothing back. `granted` is what the
/// period has granted so far; returns the grant and the new value of it.
pub fn period_grant(new_period: bool, status: &str, monthly: i64, granted: i64) -> (PeriodGrant, i64) {
    let granted = if new_period { 0 } else { granted };
    if !grants_credits(status) || monthly <= granted {
        return (PeriodGrant::None, granted);
    }
    if granted == 0 {
        (PeriodGrant::Renew(monthly), monthly)
    } else {
        (PeriodGrant::TopUp(monthly - granted), monthly)
    }
}

/// `p_name` must be one of `allowed` (22023 listing them otherwise).
pub fn one_of(name: &str, value: &str, allowed: &[&str]) -> Result<()> {
    if allowed.contains(&value) {
        Ok(())
    } else {
        Err(BillingError::invalid_with_hint(
            format!("{name} \"{}\" is not known", truncate(value, 64)),
            format!("{name} must be one of: {}", allowed.join(", ")),
        ))
    }
}

pub fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        format!("{}...", s.chars().take(max).collect::<String>())
    }
}

/// A name for a registry entry (resource type, widget type): lower-case identifier.
pub fn registry_name(name: &str, value: &str) -> Result<()> {
    let ok = !value.is_empty()
        && value.len() <= 63
        && value.as_bytes()[0].is_ascii_lowercase()
        && value.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_');
    if ok {
        Ok(())
    } else {
        Err(BillingError::invalid_with_hint(
            format!("{name} is not a valid name"),
            "use lower-case letters, digits and underscores, starting with a letter",
        ))
    }
}

/// Quote an SQL identifier the way `quote_ident` does (always quoted: safe for any name).
pub fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// One widget table as one reading role sees it: its type, where it lives, and the columns that
/// role may SELECT (they, and only they, make up `data`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WidgetSource {
    pub widget_type: String,
    pub schema: String,
    pub table: String,
    pub columns: Vec<String>,
}

/// The query over some widget sources for one user ($1 uuid, $2 boolean: include inactive),
/// ordered by position, then type, then id, aggregated into one jsonb array. `data` is built from
/// the source's listed columns only (never the whole row: a column the reading role may not
/// SELECT must not appear).
pub fn widgets_query(sources: &[WidgetSource]) -> String {
    if sources.is_empty() {
        return "SELECT '[]'::jsonb WHERE $1 IS NOT NULL OR $2 IS NOT NULL".to_string();
    }
    let parts: Vec<String> = sources
        .iter()
        .map(|s| {
            let cols: Vec<String> = s.columns.iter().map(|c| format!("w.{}", quote_ident(c))).collect();
            format!(
                "SELECT w.id, {ty}::text AS widget_type, w.position::integer AS position, w.is_active, \
                 (SELECT pg_catalog.to_jsonb(r) FROM (SELECT {cols}) AS r) AS data, w.created_at, w.updated_at \
                 FROM {schema}.{table} AS w WHERE w.user_id = $1 AND (w.is_active OR $2)",
                ty = quote_literal(&s.widget_type),
                cols = cols.join(", "),
                schema = quote_ident(&s.schema),
                table = quote_ident(&s.table),
            )
        })
        .collect();
    format!(
        "SELECT COALESCE(pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object(\
         'id', x.id, 'widget_type', x.widget_type, 'position', x.position, 'is_active', x.is_active, \
         'data', x.data, 'created_at', x.created_at, 'updated_at', x.updated_at) \
         ORDER BY x.position, x.widget_type, x.id), '[]'::jsonb) FROM ({}) AS x",
        parts.join(" UNION ALL ")
    )
}

/// Merge the jsonb arrays of several [`widgets_query`] results ($1 text[]: each array as text,
/// which keeps numbers exact) into one, in the same order. Only built-in functions run here.
pub const MERGE_WIDGETS: &str = "SELECT COALESCE(pg_catalog.jsonb_agg(e.value ORDER BY (e.value ->> 'position')::integer, \
     e.value ->> 'widget_type', (e.value ->> 'id')::uuid), '[]'::jsonb) \
     FROM pg_catalog.unnest($1::pg_catalog.text[]) AS p(t), pg_catalog.jsonb_array_elements(p.t::jsonb) AS e";

/// max(position) + 1 over every source for $1 (0 when none).
pub fn next_position_query(sources: &[WidgetSource]) -> String {
    if sources.is_empty() {
        return "SELECT 0 WHERE $1 IS NOT NULL".to_string();
    }
    let parts: Vec<String> = sources
        .iter()
        .map(|s| format!("SELECT pg_catalog.max(w.position)::bigint AS p FROM {}.{} AS w WHERE w.user_id = $1",
                         quote_ident(&s.schema), quote_ident(&s.table)))
        .collect();
    format!("SELECT (COALESCE(pg_catalog.max(x.p), -1) + 1)::integer FROM ({}) AS x", parts.join(" UNION ALL "))
}

/// count(*) of $1's rows in one table.
pub fn count_query(schema: &str, table: &str, user_column: &str) -> String {
    format!(
        "SELECT pg_catalog.count(*)::integer FROM {}.{} AS t WHERE t.{} = $1",
        quote_ident(schema),
        quote_ident(table),
        quote_ident(user_column)
    )
}

pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Resource limit evaluation: -1 (or a missing key) is unlimited.
pub fn resource_allowed(count: i64, max: i64) -> bool {
    max < 0 || count < max
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_webhooks_grant_once_per_period() {
        let (g, n) = period_grant(true, "active", 500, 0);
        assert_eq!((g, n), (PeriodGrant::Renew(500), 500));
        for status in ["active", "trialing", "past_due", "canceled"] {
            assert_eq!(period_grant(false, status, 500, n), (PeriodGrant::None, 500));
        }
        // the next period grants again
        assert_eq!(period_grant(true, "active", 500, 500), (PeriodGrant::Renew(500), 500));
    }

    #[test]
    fn plan_flip_flops_never_exceed_the_highest_plan() {
        // pro (500) -> premium (2000) -> pro -> premium within one period: 2000 in all.
        let mut granted = 0;
        let mut total = 0;
        for (i, monthly) in [500, 2000, 500, 2000, 500, 2000].into_iter().enumerate() {
            let (g, n) = period_grant(i == 0, "active", monthly, granted);
            total += match g {
                PeriodGrant::None => 0,
                PeriodGrant::Renew(x) | PeriodGrant::TopUp(x) => x,
            };
            granted = n;
        }
        assert_eq!(total, 2000);
        assert_eq!(granted, 2000);
    }

    #[test]
    fn entitlement_within_a_period_grants_the_first_time() {
        // pending (no grant) -> active in the same period: the period's first grant.
        assert_eq!(period_grant(true, "pending", 500, 0), (PeriodGrant::None, 0));
        assert_eq!(period_grant(false, "active", 500, 0), (PeriodGrant::Renew(500), 500));
        // a downgrade grants nothing, an upgrade tops up the difference
        assert_eq!(period_grant(false, "active", 10, 500), (PeriodGrant::None, 500));
        assert_eq!(period_grant(false, "active", 2000, 500), (PeriodGrant::TopUp(1500), 2000));
        // a plan without credits
        assert_eq!(period_grant(true, "active", 0, 0), (PeriodGrant::None, 0));
    }

    #[test]
    fn statuses() {
        for s in SUBSCRIPTION_STATUSES {
            one_of("p_status", s, &SUBSCRIPTION_STATUSES).unwrap();
        }
        let e = one_of("p_status", "actve", &SUBSCRIPTION_STATUSES).unwrap_err();
        assert_eq!(e.sqlstate(), "22023");
        assert!(e.hint().unwrap().contains("past_due"));
        assert!(grants_credits("active") && grants_credits("trialing") && !grants_credits("past_due"));
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("widget_links"), "\"widget_links\"");
        assert_eq!(quote_ident("a\"; DROP TABLE x; --"), "\"a\"\"; DROP TABLE x; --\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(
            count_query("public", "agents", "owner"),
            "SELECT pg_catalog.count(*)::integer FROM \"public\".\"agents\" AS t WHERE t.\"owner\" = $1"
        );
    }

    #[test]
    fn widget_queries() {
        let s = vec![
            WidgetSource { widget_type: "links".into(), schema: "public".into(), table: "widget_links".into(), columns: vec!["id".into(), "label".into()] },
            WidgetSource { widget_type: "gallery".into(), schema: "app".into(), table: "Gallery".into(), columns: vec!["id".into(), "Odd \"col\"".into()] },
        ];
        let q = widgets_query(&s);
        assert_eq!(q.matches("UNION ALL").count(), 1);
        assert!(q.contains("FROM \"app\".\"Gallery\" AS w"));
        // data: the listed columns only, never the whole row
        assert!(q.contains("(SELECT pg_catalog.to_jsonb(r) FROM (SELECT w.\"id\", w.\"label\") AS r) AS data"));
        assert!(q.contains("w.\"Odd \"\"col\"\"\""));
        assert!(!q.contains("to_jsonb(w)"));
        assert!(q.contains("ORDER BY x.position, x.widget_type, x.id"));
        assert!(widgets_query(&[]).contains("'[]'"));
        assert!(next_position_query(&s).contains("-1) + 1"));
    }

    #[test]
    fn registry_names_and_limits() {
        registry_name("t", "agents").unwrap();
        assert!(registry_name("t", "Agents").is_err());
        assert!(registry_name("t", "a-b").is_err());
        assert!(resource_allowed(0, -1) && resource_allowed(4, 5) && !resource_allowed(5, 5) && !resource_allowed(0, 0));
    }
}
