//! Materialized views: created from their definition when missing, replaced (destructive,
//! gated) when the definition changed — compared in PostgreSQL's own form, from a twin
//! view built in a scratch transaction — and checked to be refreshable as asked
//! (`concurrently` needs a unique index). Refreshes themselves run from `dbpolicy refresh`
//! on a schedule and are recorded in `dbpolicy.refreshes`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use sqlx::PgConnection;

use crate::api::{
    IndexesSpec, MaterializedView, MaterializedViewsSpec, TableTarget, DEFAULT_SCHEMA,
};
use crate::engine::plan::{Area, AreaPlan, Change, Hazard};
use crate::engine::scratch;
use crate::pg::{reason_for_sqlstate, QualifiedName};

const AREA: Area = Area::MaterializedViews;
const OWNED: &str = "view";
pub const DEFAULT_REFRESH_TIMEOUT: &str = "30m";

pub fn view_name(v: &MaterializedView) -> QualifiedName {
    QualifiedName::new(v.schema.as_deref().unwrap_or(DEFAULT_SCHEMA), &v.name)
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ViewState {
    /// `pg_class.relkind`; `m` for a materialized view.
    pub relkind: String,
    /// `pg_get_viewdef`, for materialized views.
    pub definition: Option<String>,
    pub populated: bool,
    /// Has a valid unique index without predicate: `REFRESH … CONCURRENTLY` can run.
    pub has_unique_index: bool,
}

/// One recorded refresh (`dbpolicy.refreshes`).
#[derive(Debug, Clone, PartialEq)]
pub struct LastRefresh {
    pub at: chrono::DateTime<chrono::Utc>,
    pub seconds: f64,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Observed {
    pub views: BTreeMap<QualifiedName, ViewState>,
    /// Desired definitions as PostgreSQL writes them, or (SQLSTATE, message).
    pub normalized: BTreeMap<QualifiedName, scratch::Normalized>,
    pub refreshes: BTreeMap<QualifiedName, LastRefresh>,
}

/// A twin temporary view of the same query.
const TWIN_BUILD: &str = "
            EXECUTE format('CREATE TEMP VIEW %I AS ', twin) || (item->>'definition');
            def := pg_get_viewdef(('pg_temp.' || quote_ident(twin))::regclass);";

/// A definition as a statement body: no trailing semicolon.
fn body(definition: &str) -> &str {
    definition.trim().trim_end_matches(';').trim_end()
}

pub async fn observe(
    conn: &mut PgConnection,
    spec: &MaterializedViewsSpec,
) -> Result<Observed, sqlx::Error> {
    let names: Vec<QualifiedName> = spec.views.iter().map(view_name).collect();
    let (schemas, rels): (Vec<String>, Vec<String>) = names
        .iter()
        .map(|q| (q.schema.clone(), q.name.clone()))
        .unzip();
    let rows: Vec<(String, String, String, Option<String>, bool, bool)> = sqlx::query_as(
        "SELECT n.nspname::text, c.relname::text, c.relkind::text,
                CASE WHEN c.relkind = 'm' THEN pg_get_viewdef(c.oid) END,
                c.relispopulated,
                EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisunique
                        AND i.indisvalid AND i.indpred IS NULL)
         FROM unnest($1::text[], $2::text[]) AS d(schema, name)
         JOIN pg_namespace n ON n.nspname = d.schema
         JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = d.name",
    )
    .bind(&schemas)
    .bind(&rels)
    .fetch_all(&mut *conn)
    .await?;
    let mut observed = Observed::default();
    for (schema, name, relkind, definition, populated, has_unique_index) in rows {
        observed.views.insert(
            QualifiedName::new(schema, name),
            ViewState {
                relkind,
                definition,
                populated,
                has_unique_index,
            },
        );
    }
    let items: Vec<serde_json::Value> = spec
        .views
        .iter()
        .enumerate()
        .filter_map(|(n, v)| v.definition.as_ref().map(|d| (n, v, d)))
        .map(|(n, v, d)| {
            let q = view_name(v);
            serde_json::json!({ "n": n, "schema": q.schema, "name": q.name, "definition": body(d) })
        })
        .collect();
    observed.normalized = scratch::twins(conn, TWIN_BUILD, items).await?;
    observed.refreshes = observe_refreshes(conn).await?;
    Ok(observed)
}

async fn observe_refreshes(
    conn: &mut PgConnection,
) -> Result<BTreeMap<QualifiedName, LastRefresh>, sqlx::Error> {
    let rows: Vec<(String, chrono::DateTime<chrono::Utc>, f64)> =
        match sqlx::query_as("SELECT view, refreshed_at, seconds FROM dbpolicy.refreshes")
            .fetch_all(&mut *conn)
            .await
        {
            Ok(rows) => rows,
            Err(e)
                if matches!(
                    crate::pg::sqlstate(&e).as_deref(),
                    Some("42P01") | Some("3F000")
                ) =>
            {
                Vec::new()
            }
            Err(e) => return Err(e),
        };
    Ok(rows
        .into_iter()
        .filter_map(|(view, at, seconds)| {
            QualifiedName::parse(&view).map(|q| (q, LastRefresh { at, seconds }))
        })
        .collect())
}

/// Views (re)created by a plan: the indexes area builds their indexes in the same run.
/// A replacement that will be refused (destructive, not allowed) recreates nothing.
pub fn recreated(plan: &AreaPlan, allow_destructive: bool) -> BTreeSet<QualifiedName> {
    let refused: BTreeSet<&str> = plan
        .changes
        .iter()
        .filter(|c| !allow_destructive && c.hazard == Hazard::Destructive)
        .map(|c| c.target.as_str())
        .collect();
    plan.changes
        .iter()
        .filter(|c| {
            c.sql.starts_with("CREATE MATERIALIZED VIEW") && !refused.contains(c.target.as_str())
        })
        .filter_map(|c| QualifiedName::parse(&c.target))
        .collect()
}

#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Create {
        name: QualifiedName,
        definition: String,
    },
    Replace {
        name: QualifiedName,
        definition: String,
    },
}

/// `indexes` is the spec's indexes section: a unique index declared there counts for
/// `concurrently` even before it is built.
pub fn diff(
    spec: &MaterializedViewsSpec,
    indexes: Option<&IndexesSpec>,
    observed: &Observed,
    plan: &mut AreaPlan,
) -> Vec<Op> {
    let mut ops = Vec::new();
    for v in &spec.views {
        let name = view_name(v);
        let target = name.to_string();
        let state = observed.views.get(&name);
        if let Some(s) = state {
            if s.relkind != "m" {
                plan.error(
                    target,
                    "NotAMaterializedView",
                    format!("{name} exists and is not a materialized view"),
                );
                continue;
            }
        }
        let mut will_exist = state.is_some();
        if let Some(definition) = &v.definition {
            let desired =
                match scratch::checked(observed.normalized.get(&name), "InvalidViewDefinition") {
                    Ok(d) => d,
                    Err((reason, message)) => {
                        plan.error(target, reason, format!("definition of {name}: {message}"));
                        continue;
                    }
                };
            match state {
                None => ops.push(Op::Create {
                    name: name.clone(),
                    definition: body(definition).to_string(),
                }),
                Some(s) if s.definition.as_deref().map(str::trim) != Some(desired.trim()) => ops
                    .push(Op::Replace {
                        name: name.clone(),
                        definition: body(definition).to_string(),
                    }),
                Some(_) => {}
            }
            will_exist = true;
        }
        if !will_exist {
            plan.error(
                target,
                "MaterializedViewNotFound",
                format!("{name} does not exist and the spec gives no definition to create it"),
            );
            continue;
        }
        if v.concurrently.unwrap_or(false) {
            let declared_unique = indexes.is_some_and(|ix| {
                ix.indexes.iter().any(|i| {
                    i.unique.unwrap_or(false) && i.where_clause.is_none() && i.qualified() == name
                })
            });
            let replaced = ops
                .iter()
                .any(|op| matches!(op, Op::Replace { name: n, .. } if *n == name));
            let has_unique = state.is_some_and(|s| s.has_unique_index) && !replaced;
            if !declared_unique && !has_unique {
                plan.error(
                    target,
                    "RequiresUniqueIndex",
                    format!("{name} is refreshed concurrently, which needs a unique index without WHERE on it: declare one under spec.indexes"),
                );
            }
        }
    }
    ops
}

pub fn render(op: &Op) -> Vec<Change> {
    match op {
        Op::Create { name, definition } => vec![Change::new(
            AREA,
            name.to_string(),
            "create the materialized view",
            format!("CREATE MATERIALIZED VIEW {} AS {definition}", name.quoted()),
        )
        .record(OWNED)],
        // Drop and create in one transaction: readers wait on the lock (bounded by
        // lock_timeout) rather than ever finding the view missing.
        Op::Replace { name, definition } => vec![
            Change::new(
                AREA,
                name.to_string(),
                "drop the view to replace its definition",
                format!("DROP MATERIALIZED VIEW {}", name.quoted()),
            )
            .hazard(Hazard::Destructive)
            .bundle(format!("replace view {name}")),
            Change::new(
                AREA,
                name.to_string(),
                "create the materialized view with the new definition",
                format!("CREATE MATERIALIZED VIEW {} AS {definition}", name.quoted()),
            )
            .hazard(Hazard::Locking)
            .record(OWNED)
            .bundle(format!("replace view {name}")),
        ],
    }
}

pub fn plan(
    spec: &MaterializedViewsSpec,
    indexes: Option<&IndexesSpec>,
    observed: &Observed,
) -> AreaPlan {
    let mut plan = AreaPlan::new(AREA);
    let ops = diff(spec, indexes, observed, &mut plan);
    plan.changes = ops.iter().flat_map(render).collect();
    plan
}

/// Last refresh per declared view, for status.
pub fn status(
    spec: &MaterializedViewsSpec,
    observed: &Observed,
) -> Vec<crate::api::MaterializedViewStatus> {
    spec.views
        .iter()
        .map(|v| {
            let name = view_name(v);
            let last = observed.refreshes.get(&name);
            crate::api::MaterializedViewStatus {
                name: name.to_string(),
                last_refresh_time: last
                    .map(|r| r.at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
                last_refresh_seconds: last.map(|r| (r.seconds * 1000.0).round() / 1000.0),
            }
        })
        .collect()
}

// ------------------------------------------------------------------ refresh

pub const REFRESHES_BOOTSTRAP_SQL: &str = "CREATE SCHEMA IF NOT EXISTS dbpolicy;
CREATE TABLE IF NOT EXISTS dbpolicy.refreshes (
    view text PRIMARY KEY,
    refreshed_at timestamptz NOT NULL,
    seconds double precision NOT NULL,
    was_concurrent boolean NOT NULL
)";

#[derive(Debug, Clone, serde::Serialize)]
pub struct RefreshOutcome {
    pub view: String,
    pub concurrently: bool,
    pub seconds: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    #[error("{view}: {message}")]
    NotRefreshable {
        view: String,
        reason: &'static str,
        message: String,
    },
    #[error("{view}: {message}")]
    Failed {
        view: String,
        reason: &'static str,
        message: String,
    },
}

/// Refreshes one view: `CONCURRENTLY` when asked and possible (populated, unique index),
/// under its own statement timeout, and records when and how long in `dbpolicy.refreshes`.
pub async fn refresh(
    conn: &mut PgConnection,
    view: &QualifiedName,
    concurrently: bool,
    timeout: Duration,
    lock_timeout: Duration,
) -> Result<RefreshOutcome, RefreshError> {
    let failed = |e: sqlx::Error| RefreshError::Failed {
        view: view.to_string(),
        reason: reason_for_sqlstate(crate::pg::sqlstate(&e).as_deref()),
        message: crate::pg::error_summary(&e),
    };
    let state: Option<(String, bool, bool)> = sqlx::query_as(
        "SELECT c.relkind::text, c.relispopulated,
                EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisunique AND i.indisvalid AND i.indpred IS NULL)
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = $2",
    )
    .bind(&view.schema)
    .bind(&view.name)
    .fetch_optional(&mut *conn)
    .await
    .map_err(failed)?;
    let Some((relkind, populated, unique)) = state else {
        return Err(RefreshError::NotRefreshable {
            view: view.to_string(),
            reason: "MaterializedViewNotFound",
            message: "does not exist".into(),
        });
    };
    if relkind != "m" {
        return Err(RefreshError::NotRefreshable {
            view: view.to_string(),
            reason: "NotAMaterializedView",
            message: "is not a materialized view".into(),
        });
    }
    if concurrently && !unique {
        return Err(RefreshError::NotRefreshable {
            view: view.to_string(),
            reason: "RequiresUniqueIndex",
            message: "REFRESH … CONCURRENTLY needs a unique index without WHERE on the view".into(),
        });
    }
    // A never-populated view cannot be refreshed concurrently; the first refresh fills it.
    let concurrently = concurrently && populated;
    sqlx::Executor::execute(
        &mut *conn,
        format!(
            "SET statement_timeout = {}; SET lock_timeout = {}",
            timeout.as_millis(),
            lock_timeout.as_millis()
        )
        .as_str(),
    )
    .await
    .map_err(failed)?;
    let started = Instant::now();
    let sql = format!(
        "REFRESH MATERIALIZED VIEW {}{}",
        if concurrently { "CONCURRENTLY " } else { "" },
        view.quoted()
    );
    sqlx::Executor::execute(&mut *conn, sql.as_str())
        .await
        .map_err(failed)?;
    let seconds = started.elapsed().as_secs_f64();
    sqlx::Executor::execute(&mut *conn, REFRESHES_BOOTSTRAP_SQL)
        .await
        .map_err(failed)?;
    sqlx::query(
        "INSERT INTO dbpolicy.refreshes (view, refreshed_at, seconds, was_concurrent) VALUES ($1, now(), $2, $3)
         ON CONFLICT (view) DO UPDATE SET refreshed_at = EXCLUDED.refreshed_at, seconds = EXCLUDED.seconds,
             was_concurrent = EXCLUDED.was_concurrent",
    )
    .bind(view.to_string())
    .bind(seconds)
    .bind(concurrently)
    .execute(&mut *conn)
    .await
    .map_err(failed)?;
    Ok(RefreshOutcome {
        view: view.to_string(),
        concurrently,
        seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::IndexSpec;

    fn view(name: &str, def: Option<&str>, concurrently: bool) -> MaterializedView {
        MaterializedView {
            name: name.into(),
            definition: def.map(String::from),
            concurrently: Some(concurrently),
            ..Default::default()
        }
    }

    fn observed(views: &[(&str, &str, bool)], normalized: &[(&str, &str)]) -> Observed {
        let mut o = Observed::default();
        for (n, def, unique) in views {
            o.views.insert(
                QualifiedName::new("public", *n),
                ViewState {
                    relkind: "m".into(),
                    definition: Some(def.to_string()),
                    populated: true,
                    has_unique_index: *unique,
                },
            );
        }
        for (n, d) in normalized {
            o.normalized
                .insert(QualifiedName::new("public", *n), Ok(d.to_string()));
        }
        o
    }

    #[test]
    fn missing_view_is_created_and_recorded() {
        let spec = MaterializedViewsSpec {
            views: vec![view("v", Some("SELECT 1 AS k;"), false)],
        };
        let p = plan(&spec, None, &observed(&[], &[("v", " SELECT 1 AS k;")]));
        assert_eq!(p.changes.len(), 1);
        assert_eq!(
            p.changes[0].sql,
            r#"CREATE MATERIALIZED VIEW "public"."v" AS SELECT 1 AS k"#
        );
        assert_eq!(
            recreated(&p, false),
            [QualifiedName::new("public", "v")].into()
        );
    }

    #[test]
    fn same_normalised_definition_is_no_change() {
        let spec = MaterializedViewsSpec {
            views: vec![view("v", Some("select 1 as k"), false)],
        };
        assert!(plan(
            &spec,
            None,
            &observed(
                &[("v", " SELECT 1 AS k;", false)],
                &[("v", " SELECT 1 AS k;")]
            )
        )
        .changes
        .is_empty());
    }

    #[test]
    fn changed_definition_is_a_destructive_replace_in_one_transaction() {
        let spec = MaterializedViewsSpec {
            views: vec![view("v", Some("select 2 as k"), false)],
        };
        let p = plan(
            &spec,
            None,
            &observed(
                &[("v", " SELECT 1 AS k;", false)],
                &[("v", " SELECT 2 AS k;")],
            ),
        );
        assert_eq!(p.changes.len(), 2);
        assert_eq!(p.changes[0].hazard, Hazard::Destructive);
        assert!(p.changes.iter().all(|c| c.transactional));
    }

    #[test]
    fn concurrently_needs_a_unique_index_existing_or_declared() {
        let spec = MaterializedViewsSpec {
            views: vec![view("v", None, true)],
        };
        let p = plan(&spec, None, &observed(&[("v", "x", false)], &[]));
        assert_eq!(p.errors[0].reason, "RequiresUniqueIndex");
        assert!(plan(&spec, None, &observed(&[("v", "x", true)], &[]))
            .errors
            .is_empty());
        let ix = IndexesSpec {
            indexes: vec![IndexSpec {
                name: "k".into(),
                table: "v".into(),
                columns: vec!["k".into()],
                unique: Some(true),
                ..Default::default()
            }],
            prune: None,
        };
        assert!(plan(&spec, Some(&ix), &observed(&[("v", "x", false)], &[]))
            .errors
            .is_empty());
    }

    #[test]
    fn missing_view_without_definition_and_bad_definitions_are_errors() {
        let spec = MaterializedViewsSpec {
            views: vec![
                view("nope", None, false),
                view("bad", Some("SELECT nope FROM t"), false),
            ],
        };
        let mut o = observed(&[], &[]);
        o.normalized.insert(
            QualifiedName::new("public", "bad"),
            Err((
                Some("42703".into()),
                "column \"nope\" does not exist".into(),
            )),
        );
        let p = plan(&spec, None, &o);
        assert_eq!(p.errors[0].reason, "MaterializedViewNotFound");
        assert_eq!(p.errors[1].reason, "ColumnNotFound");
        assert!(p.changes.is_empty());
    }
}
