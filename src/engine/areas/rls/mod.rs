//! Row-level security: `ENABLE`/`FORCE ROW LEVEL SECURITY` per table and its policies
//! (`CREATE`/`ALTER`/`DROP POLICY`). Observed with one catalog query for all tables, one
//! for the roles the policies name, and one normalisation pass that has PostgreSQL rewrite
//! every desired `USING`/`WITH CHECK` expression into the form `pg_get_expr` shows, inside
//! a transaction that is always rolled back, so a rewritten expression is never drift. The
//! normalisation cache ([`normcache`]) answers both sides of that comparison for every
//! policy unchanged since it was recorded: a drift check with nothing to change neither
//! normalises nor deparses.

use std::collections::{BTreeMap, BTreeSet};

use sqlx::PgConnection;

use crate::api::{
    PolicyCommand, PolicyKind, RlsPolicy, RlsTable, RowLevelSecuritySpec, TableTarget,
};
use crate::engine::areas::{AfterApply, AreaModule, ObserveContext, ObserveError, PlanContext};
use crate::engine::ledger::Ledger;
use crate::engine::normcache;
use crate::engine::plan::{Area, AreaPlan, Change, Hazard, LockLevel};
use crate::engine::scratch;
use crate::pg::grammar::check_expression;
use crate::pg::{execute_one, quote_ident, QualifiedName};
use crate::reason::Reason;

const AREA: Area = Area::RowLevelSecurity;

/// How PUBLIC is spelled in role sets: `public` is reserved, so no role can have that name.
pub const PUBLIC: &str = "public";

/// One policy as the catalog shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyState {
    pub command: PolicyCommand,
    pub kind: PolicyKind,
    /// Role names, [`PUBLIC`] for PUBLIC.
    pub roles: BTreeSet<String>,
    /// `pg_get_expr(polqual)`.
    pub using: Option<String>,
    /// `pg_get_expr(polwithcheck)`.
    pub with_check: Option<String>,
}

/// One table as the catalog shows it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TableState {
    /// `pg_class.relkind`: r (table), p (partitioned table), v (view), …
    pub relkind: String,
    pub enabled: bool,
    pub force: bool,
    /// The connecting role neither owns the table nor is a member of its owner role: it may
    /// not create policies on it or enable RLS.
    pub not_owned: bool,
    pub policies: BTreeMap<String, PolicyState>,
}

/// A desired policy's expressions as PostgreSQL stores them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Normalized {
    pub using: Option<String>,
    pub with_check: Option<String>,
}

/// Why PostgreSQL refused a desired policy during normalisation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpressionError {
    pub sqlstate: Option<String>,
    pub message: String,
}

/// What the live database holds for the spec's tables.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Observed {
    /// Tables that exist; a name that is absent does not exist.
    pub tables: BTreeMap<QualifiedName, TableState>,
    /// The roles named by the spec that exist.
    pub roles: BTreeSet<String>,
    /// Per (table, policy name): the desired expressions in PostgreSQL's own form, or
    /// PostgreSQL's refusal. A policy absent here is compared as written.
    pub normalized: BTreeMap<(QualifiedName, String), Result<Normalized, ExpressionError>>,
    /// Per (table, policy name): the key of its desired expressions in the normalisation
    /// cache ([`normcache`]), for the changes that create or alter it to record.
    pub cache_keys: BTreeMap<(QualifiedName, String), String>,
    /// Items normalised on a twin this run whose form the catalog already shows: recorded
    /// in the cache after a successful apply, so the next check needs no twin for them.
    pub cache_fill: Vec<normcache::Record>,
    /// How many twin tables this run built (0 on a no-op whose cache is up to date).
    pub twins: usize,
}

mod normalize;
mod observe;
mod plan;

use normalize::*;
pub use observe::*;
pub(crate) use plan::*;

/// Row-level security of tables: enable/force flags and policies.
pub struct RowLevelSecurity;

impl AreaModule for RowLevelSecurity {
    const AREA: Area = AREA;
    /// Its catalog read fingerprints every table's columns and versions every policy (and
    /// deparses those the cache does not answer): at thousands of tables the longest query
    /// of a drift check.
    const OWN_CONNECTION: bool = true;
    type Spec = RowLevelSecuritySpec;
    type Observed = Observed;
    type Op = Op;

    fn section(spec: &crate::api::DatabasePolicySpec) -> Option<&RowLevelSecuritySpec> {
        spec.row_level_security.as_ref()
    }

    async fn observe(
        conn: &mut PgConnection,
        section: &RowLevelSecuritySpec,
        _ctx: ObserveContext<'_>,
    ) -> Result<Observed, ObserveError> {
        Ok(observe(conn, section).await?)
    }

    fn diff(
        section: &RowLevelSecuritySpec,
        observed: &Observed,
        ctx: &PlanContext<'_>,
        plan: &mut AreaPlan,
    ) -> Vec<Op> {
        diff(section, observed, ctx.ledger, plan)
    }

    fn render(_: &RowLevelSecuritySpec, op: &Op) -> Vec<Change> {
        render(op)
    }

    fn simulate(_: &RowLevelSecuritySpec, observed: &Observed, ops: &[Op]) -> Observed {
        simulate(observed, ops)
    }

    fn finish(_: &RowLevelSecuritySpec, observed: &Observed, plan: &mut AreaPlan) {
        plan.refuse_unowned(|target| {
            QualifiedName::parse(target)
                .and_then(|t| observed.tables.get(&t))
                .is_some_and(|t| t.not_owned)
        });
    }

    /// After a successful apply, records the normalisations this run made of items the
    /// catalog already showed right (see [`normcache`]).
    async fn after_apply(conn: &mut PgConnection, observed: &Observed, ctx: AfterApply<'_>) {
        if ctx.report.succeeded() {
            fill_cache(conn, &observed.cache_fill, ctx.policy).await;
        }
    }
}

/// Records the normalisations of items the catalog already showed right (a database
/// converged before the cache existed, or a stale row), so the next check needs no twin for
/// them. Only a cache: a failure is logged, not fatal.
async fn fill_cache(conn: &mut PgConnection, rows: &[normcache::Record], policy: &str) {
    if rows.is_empty() {
        return;
    }
    let written = async {
        crate::engine::apply::bootstrap_ledger(conn).await?;
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        normcache::write(&mut tx, rows, policy).await?;
        tx.commit().await
    }
    .await;
    if let Err(e) = written {
        tracing::warn!(
            error = %crate::pg::error_summary(&e),
            "could not record normalised expressions in {}; the next drift check normalises them again",
            normcache::CACHE_TABLE
        );
    }
}

#[cfg(test)]
mod tests;
