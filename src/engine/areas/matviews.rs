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
use crate::engine::areas::{AreaModule, Facts, ObserveContext, ObserveError, PlanContext};
use crate::engine::plan::{Area, AreaPlan, Change, Hazard, LockLevel, OwnTimeout};
use crate::engine::scratch;
use crate::pg::{grammar, quote_ident, QualifiedName};
use crate::reason::Reason;

const AREA: Area = Area::MaterializedViews;
const OWNED: &str = "view";
pub(crate) const DEFAULT_REFRESH_TIMEOUT: &str = "30m";

pub(crate) fn view_name(v: &MaterializedView) -> QualifiedName {
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
    /// The role that owns it (its query runs with this role's rights).
    pub owner: String,
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
    /// The `owner` roles of the spec that exist.
    pub roles: BTreeSet<String>,
}

/// A definition as a statement body, as PostgreSQL's grammar reads it: one plain query
/// (a final `;` removed), or why it is not one.
fn body(definition: &str) -> Result<&str, grammar::FragmentError> {
    grammar::check_query(definition)
}

/// A temporary view of the query (a view is never run when created), read back with
/// `pg_get_viewdef`.
fn twin(n: usize, name: QualifiedName, body: &str) -> scratch::Twin {
    let twin = scratch::twin_name(n);
    scratch::Twin {
        item: name,
        build: vec![format!("CREATE TEMP VIEW {} AS {body}", quote_ident(&twin))],
        read: "SELECT pg_get_viewdef(to_regclass($1))",
        read_arg: format!("pg_temp.{}", quote_ident(&twin)),
    }
}

pub(crate) async fn observe(
    conn: &mut PgConnection,
    spec: &MaterializedViewsSpec,
) -> Result<Observed, sqlx::Error> {
    let names: Vec<QualifiedName> = spec.views.iter().map(view_name).collect();
    let (schemas, rels): (Vec<String>, Vec<String>) = names
        .iter()
        .map(|q| (q.schema.clone(), q.name.clone()))
        .unzip();
    type Row = (String, String, String, Option<String>, bool, bool, String);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT n.nspname::text, c.relname::text, c.relkind::text,
                CASE WHEN c.relkind = 'm' THEN pg_get_viewdef(c.oid) END,
                c.relispopulated,
                EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisunique
                        AND i.indisvalid AND i.indpred IS NULL),
                pg_get_userbyid(c.relowner)::text
         FROM unnest($1::text[], $2::text[]) AS d(schema, name)
         JOIN pg_namespace n ON n.nspname = d.schema
         JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = d.name",
    )
    .bind(&schemas)
    .bind(&rels)
    .fetch_all(&mut *conn)
    .await?;
    let mut observed = Observed::default();
    for (schema, name, relkind, definition, populated, has_unique_index, owner) in rows {
        observed.views.insert(
            QualifiedName::new(schema, name),
            ViewState {
                relkind,
                definition,
                populated,
                has_unique_index,
                owner,
            },
        );
    }
    let items: Vec<scratch::Twin> = spec
        .views
        .iter()
        .enumerate()
        .filter_map(|(n, v)| v.definition.as_deref().map(|d| (n, v, d)))
        .filter_map(|(n, v, d)| body(d).ok().map(|b| twin(n, view_name(v), b)))
        .collect();
    observed.normalized = scratch::twins(conn, items).await?;
    let owners: Vec<&str> = spec
        .views
        .iter()
        .filter_map(|v| v.owner.as_deref())
        .collect();
    if !owners.is_empty() {
        let existing: Vec<String> =
            sqlx::query_scalar("SELECT rolname::text FROM pg_roles WHERE rolname = ANY($1)")
                .bind(&owners)
                .fetch_all(&mut *conn)
                .await?;
        observed.roles = existing.into_iter().collect();
    }
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
pub(crate) fn recreated(plan: &AreaPlan, allow_destructive: bool) -> BTreeSet<QualifiedName> {
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
        owner: Option<String>,
    },
    Replace {
        name: QualifiedName,
        definition: String,
        owner: Option<String>,
    },
    /// The view exists as desired but belongs to another role than `owner`.
    SetOwner { name: QualifiedName, owner: String },
}

/// `indexes` is the spec's indexes section: a unique index declared there counts for
/// `concurrently` even before it is built.
pub(crate) fn diff(
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
                    Reason::NotAMaterializedView,
                    format!("{name} exists and is not a materialized view"),
                );
                continue;
            }
        }
        let mut will_exist = state.is_some();
        if let Some(definition) = &v.definition {
            let definition = match body(definition) {
                Ok(b) => b,
                Err(e) => {
                    plan.error(
                        target,
                        Reason::InvalidViewDefinition,
                        format!("definition of {name} {e}"),
                    );
                    continue;
                }
            };
            let desired = match scratch::checked(
                observed.normalized.get(&name),
                Reason::InvalidViewDefinition,
            ) {
                Ok(d) => d,
                Err((reason, message)) => {
                    plan.error(target, reason, format!("definition of {name}: {message}"));
                    continue;
                }
            };
            if let Some(owner) = v.owner.as_deref().filter(|o| !observed.roles.contains(*o)) {
                plan.error(
                    target,
                    Reason::RoleNotFound,
                    format!("owner {owner:?} of {name} does not exist; dbpolicy does not create roles: create it first (CREATE ROLE), then reconcile again"),
                );
                continue;
            }
            let owner = v.owner.clone();
            match state {
                None => ops.push(Op::Create {
                    name: name.clone(),
                    definition: definition.to_string(),
                    owner,
                }),
                Some(s) if s.definition.as_deref().map(str::trim) != Some(desired.trim()) => ops
                    .push(Op::Replace {
                        name: name.clone(),
                        definition: definition.to_string(),
                        owner,
                    }),
                Some(s) => {
                    if let Some(owner) = owner.filter(|o| *o != s.owner) {
                        ops.push(Op::SetOwner {
                            name: name.clone(),
                            owner,
                        });
                    }
                }
            }
            will_exist = true;
        }
        if !will_exist {
            plan.error(
                target,
                Reason::MaterializedViewNotFound,
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
                    Reason::RequiresUniqueIndex,
                    format!("{name} is refreshed concurrently, which needs a unique index without WHERE on it: declare one under spec.indexes"),
                );
            }
        }
    }
    ops
}

/// Creating a view runs its query with the creating role's rights. With an `owner`, the
/// view is created empty (nothing runs), handed to the owner, then filled by a refresh,
/// which PostgreSQL runs with the owner's rights: the query never runs as the operator.
/// The statement that fills the view runs under `fill`'s timeout when given.
fn create(
    name: &QualifiedName,
    definition: &str,
    owner: Option<&str>,
    fill: Option<OwnTimeout>,
) -> Vec<Change> {
    let target = name.to_string();
    let fill_timeout = |c: Change| match fill {
        Some(t) => c.own_timeout(t),
        None => c,
    };
    match owner {
        None => vec![fill_timeout(
            Change::new(
                AREA,
                &target,
                "create the materialized view",
                format!("CREATE MATERIALIZED VIEW {} AS {definition}", name.quoted()),
            )
            // The view is new; the query reads its tables under ACCESS SHARE.
            .lock(LockLevel::AccessShare),
        )],
        Some(owner) => vec![
            Change::new(
                AREA,
                &target,
                "create the materialized view, empty",
                format!(
                    "CREATE MATERIALIZED VIEW {} AS {definition} WITH NO DATA",
                    name.quoted()
                ),
            )
            // Analysing the query locks its tables in ACCESS SHARE; nothing runs.
            .lock(LockLevel::AccessShare),
            Change::new(
                AREA,
                &target,
                format!("hand it to its owner {owner}"),
                format!(
                    "ALTER MATERIALIZED VIEW {} OWNER TO {}",
                    name.quoted(),
                    quote_ident(owner)
                ),
            )
            .lock(LockLevel::AccessExclusive),
            fill_timeout(
                Change::new(
                    AREA,
                    &target,
                    format!("fill it, with {owner}'s rights"),
                    format!("REFRESH MATERIALIZED VIEW {}", name.quoted()),
                )
                // Not concurrently (the view is empty): ACCESS EXCLUSIVE on the view,
                // which nobody can read yet anyway, in the transaction that created it.
                .lock(LockLevel::AccessExclusive),
            ),
        ],
    }
}

pub(crate) fn render(op: &Op) -> Vec<Change> {
    match op {
        Op::Create {
            name,
            definition,
            owner,
        } => {
            // A new view is filled under the long-operation timeout: nobody can read it
            // before its transaction commits, so the query may take as long as it takes.
            // That transaction is its own, so no lock another view's change took waits
            // on the fill.
            let group = format!("create {name}");
            let mut changes: Vec<Change> = create(
                name,
                definition,
                owner.as_deref(),
                Some(OwnTimeout::LongOperation),
            )
            .into_iter()
            .map(|c| c.in_group(&group))
            .collect();
            if let Some(last) = changes.pop() {
                changes.push(last.record(OWNED));
            }
            changes
        }
        // Drop and create in one transaction: readers wait on the lock (bounded by
        // lock_timeout) rather than ever finding the view missing.
        Op::Replace {
            name,
            definition,
            owner,
        } => {
            let bundle = format!("replace view {name}");
            let mut changes = vec![Change::new(
                AREA,
                name.to_string(),
                "drop the view to replace its definition",
                format!("DROP MATERIALIZED VIEW {}", name.quoted()),
            )
            .hazard(Hazard::Destructive)
            .lock(LockLevel::AccessExclusive)
            .bundle(&bundle)];
            // Refilled under the policy's statement timeout: readers of the view wait on
            // its ACCESS EXCLUSIVE (bounded by their lock_timeout) until the fill commits.
            let created = create(name, definition, owner.as_deref(), None);
            let n = created.len();
            for (i, c) in created.into_iter().enumerate() {
                // The view was dropped in this transaction: its ACCESS EXCLUSIVE is held
                // to the commit, whatever the statements recreating it take.
                let c = c
                    .hazard(Hazard::Locking)
                    .lock(LockLevel::AccessExclusive)
                    .bundle(&bundle);
                changes.push(if i + 1 == n { c.record(OWNED) } else { c });
            }
            changes
        }
        Op::SetOwner { name, owner } => vec![Change::new(
            AREA,
            name.to_string(),
            format!("hand the view to its owner {owner}"),
            format!(
                "ALTER MATERIALIZED VIEW {} OWNER TO {}",
                name.quoted(),
                quote_ident(owner)
            ),
        )
        .hazard(Hazard::Locking)
        .lock(LockLevel::AccessExclusive)],
    }
}

/// Last refresh per declared view, for status.
pub(crate) fn status(
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

pub(crate) const REFRESHES_BOOTSTRAP_SQL: &str = "CREATE SCHEMA IF NOT EXISTS dbpolicy;
CREATE TABLE IF NOT EXISTS dbpolicy.refreshes (
    view text PRIMARY KEY,
    refreshed_at timestamptz NOT NULL,
    seconds double precision NOT NULL,
    was_concurrent boolean NOT NULL
)";

#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct RefreshOutcome {
    pub view: String,
    pub concurrently: bool,
    pub seconds: f64,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum RefreshError {
    #[error("{view}: {message}")]
    NotRefreshable {
        view: String,
        reason: Reason,
        message: String,
    },
    #[error("{view}: {message}")]
    Failed {
        view: String,
        reason: Reason,
        message: String,
    },
}

/// Refreshes one view: `CONCURRENTLY` when asked and possible (populated, unique index),
/// under its own statement timeout, and records when and how long in `dbpolicy.refreshes`.
pub(crate) async fn refresh(
    conn: &mut PgConnection,
    view: &QualifiedName,
    concurrently: bool,
    timeout: Duration,
    lock_timeout: Duration,
) -> Result<RefreshOutcome, RefreshError> {
    let failed = |e: sqlx::Error| RefreshError::Failed {
        view: view.to_string(),
        reason: Reason::of_error(&e, Reason::ApplyFailed),
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
            reason: Reason::MaterializedViewNotFound,
            message: "does not exist".into(),
        });
    };
    if relkind != "m" {
        return Err(RefreshError::NotRefreshable {
            view: view.to_string(),
            reason: Reason::NotAMaterializedView,
            message: "is not a materialized view".into(),
        });
    }
    if concurrently && !unique {
        return Err(RefreshError::NotRefreshable {
            view: view.to_string(),
            reason: Reason::RequiresUniqueIndex,
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
    crate::pg::execute_one(&mut *conn, &sql)
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

/// Materialized views: created, replaced when their query changes, handed to an owner.
pub struct MaterializedViews;

impl AreaModule for MaterializedViews {
    const AREA: Area = AREA;
    type Spec = MaterializedViewsSpec;
    type Observed = Observed;
    type Op = Op;

    fn section(spec: &crate::api::DatabasePolicySpec) -> Option<&MaterializedViewsSpec> {
        spec.materialized_views.as_ref()
    }

    async fn observe(
        conn: &mut PgConnection,
        section: &MaterializedViewsSpec,
        _ctx: ObserveContext<'_>,
    ) -> Result<Observed, ObserveError> {
        Ok(observe(conn, section).await?)
    }

    fn diff(
        section: &MaterializedViewsSpec,
        observed: &Observed,
        ctx: &PlanContext<'_>,
        plan: &mut AreaPlan,
    ) -> Vec<Op> {
        diff(section, ctx.spec.indexes.as_ref(), observed, plan)
    }

    fn render(_: &MaterializedViewsSpec, op: &Op) -> Vec<Change> {
        render(op)
    }

    fn simulate(_: &MaterializedViewsSpec, observed: &Observed, ops: &[Op]) -> Observed {
        simulate(observed, ops)
    }

    /// Also tells the indexes, planned next, which views this plan builds again.
    fn plan(
        section: &MaterializedViewsSpec,
        observed: &Observed,
        ctx: &mut PlanContext<'_>,
    ) -> AreaPlan {
        let mut plan = AreaPlan::new(AREA);
        let ops = Self::diff(section, observed, ctx, &mut plan);
        plan.changes = ops.iter().flat_map(render).collect();
        ctx.recreated_views = recreated(&plan, ctx.spec.allow_destructive());
        plan
    }

    fn facts(section: Option<&MaterializedViewsSpec>, observed: &Observed, facts: &mut Facts) {
        facts.materialized_views = section.map(|s| status(s, observed));
    }
}

/// The catalog as it will be after `ops` (for tests of convergence).
pub(crate) fn simulate(observed: &Observed, ops: &[Op]) -> Observed {
    let mut next = observed.clone();
    for op in ops {
        match op {
            Op::Create { name, owner, .. } | Op::Replace { name, owner, .. } => {
                let before = next.views.remove(name).unwrap_or_default();
                let definition = next.normalized.get(name).and_then(|d| d.clone().ok());
                next.views.insert(
                    name.clone(),
                    ViewState {
                        relkind: "m".into(),
                        definition,
                        populated: true,
                        // Dropping the view dropped its indexes.
                        has_unique_index: false,
                        owner: owner.clone().unwrap_or(before.owner),
                    },
                );
            }
            Op::SetOwner { name, owner } => {
                if let Some(v) = next.views.get_mut(name) {
                    v.owner = owner.clone();
                }
            }
        }
    }
    next
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::IndexSpec;
    use crate::engine::ledger::Ledger;

    fn plan(
        spec: &MaterializedViewsSpec,
        indexes: Option<&IndexesSpec>,
        observed: &Observed,
    ) -> AreaPlan {
        let whole = crate::api::DatabasePolicySpec {
            indexes: indexes.cloned(),
            ..Default::default()
        };
        let ledger = Ledger::default();
        MaterializedViews::plan(spec, observed, &mut PlanContext::new(&whole, &ledger))
    }

    fn view(name: &str, def: Option<&str>, concurrently: bool) -> MaterializedView {
        MaterializedView {
            name: name.into(),
            definition: def.map(String::from),
            concurrently: Some(concurrently),
            ..Default::default()
        }
    }

    #[test]
    fn an_owned_view_is_created_empty_handed_over_then_filled() {
        let mut v = view("v", Some("SELECT 1"), false);
        v.owner = Some("reporting".into());
        let spec = MaterializedViewsSpec { views: vec![v] };
        let mut o = observed(&[], &[("v", "SELECT 1;")]);
        o.roles.insert("reporting".into());
        let p = plan(&spec, None, &o);
        let sql: Vec<&str> = p.changes.iter().map(|c| c.sql.as_str()).collect();
        assert_eq!(
            sql,
            [
                "CREATE MATERIALIZED VIEW \"public\".\"v\" AS SELECT 1 WITH NO DATA",
                "ALTER MATERIALIZED VIEW \"public\".\"v\" OWNER TO \"reporting\"",
                "REFRESH MATERIALIZED VIEW \"public\".\"v\"",
            ]
        );
        assert!(p.changes[2].ledger.len() == 1 && p.changes[0].ledger.is_empty());
        // Creating reads the query's tables; handing over and filling lock the new view.
        let locks: Vec<LockLevel> = p.changes.iter().map(|c| c.lock).collect();
        assert_eq!(
            locks,
            [
                LockLevel::AccessShare,
                LockLevel::AccessExclusive,
                LockLevel::AccessExclusive
            ]
        );
        // The fill, under the long-operation timeout, in a transaction of the view's own.
        let timeouts: Vec<Option<OwnTimeout>> = p.changes.iter().map(|c| c.timeout).collect();
        assert_eq!(timeouts, [None, None, Some(OwnTimeout::LongOperation)]);
        assert!(p
            .changes
            .iter()
            .all(|c| c.transactional && c.group.as_deref() == Some("create public.v")));

        // An existing view of another owner is handed over; a missing role is an error.
        let o2 = observed(&[("v", "SELECT 1;", false)], &[("v", "SELECT 1;")]);
        let p = plan(&spec, None, &o2);
        assert_eq!(p.errors[0].reason, Reason::RoleNotFound);
        let mut o3 = o2.clone();
        o3.roles.insert("reporting".into());
        let p = plan(&spec, None, &o3);
        assert_eq!(
            p.changes[0].sql,
            "ALTER MATERIALIZED VIEW \"public\".\"v\" OWNER TO \"reporting\""
        );
        assert_eq!(p.changes[0].lock, LockLevel::AccessExclusive);
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
                    owner: "postgres".into(),
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
        // The drop's ACCESS EXCLUSIVE is held to the commit: readers wait, never miss it.
        assert!(p
            .changes
            .iter()
            .all(|c| c.lock == LockLevel::AccessExclusive && c.timeout.is_none()));
    }

    #[test]
    fn concurrently_needs_a_unique_index_existing_or_declared() {
        let spec = MaterializedViewsSpec {
            views: vec![view("v", None, true)],
        };
        let p = plan(&spec, None, &observed(&[("v", "x", false)], &[]));
        assert_eq!(p.errors[0].reason, Reason::RequiresUniqueIndex);
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
        assert_eq!(p.errors[0].reason, Reason::MaterializedViewNotFound);
        assert_eq!(p.errors[1].reason, Reason::ColumnNotFound);
        assert!(p.changes.is_empty());
    }

    proptest::proptest! {
        /// Whatever views exist (with the desired query or another, of this owner or
        /// another), applying the plan converges.
        #[test]
        fn applying_a_plan_converges(
            wanted in proptest::collection::btree_map(0usize..3, (proptest::option::of(proptest::bool::ANY), proptest::bool::ANY), 0..3),
            existing in proptest::collection::btree_map(0usize..3, (proptest::bool::ANY, proptest::bool::ANY), 0..3),
        ) {
            let query = |same: bool| if same { "SELECT 1 AS k;" } else { "SELECT 2 AS k;" };
            let views = wanted
                .iter()
                .map(|(i, (owner, defined))| {
                    let mut v = view(&format!("v{i}"), defined.then_some("SELECT 1 AS k"), false);
                    v.owner = owner.map(|o| if o { "reporting".into() } else { "postgres".into() });
                    v
                })
                .collect();
            let spec = MaterializedViewsSpec { views };
            let current: Vec<(String, &str, bool)> = existing
                .iter()
                .map(|(i, (same, unique))| (format!("v{i}"), query(*same), *unique))
                .collect();
            let current: Vec<(&str, &str, bool)> =
                current.iter().map(|(n, q, u)| (n.as_str(), *q, *u)).collect();
            let names: Vec<String> = (0..3).map(|i| format!("v{i}")).collect();
            let normalized: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), query(true))).collect();
            let mut o = observed(&current, &normalized);
            o.roles.extend(["reporting".to_string(), "postgres".to_string()]);
            crate::engine::areas::convergence::converges::<MaterializedViews>(&spec, &o, &Ledger::default(), |_, _| Ok(()))?;
        }
    }
}
