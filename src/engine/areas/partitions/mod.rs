//! Partitions: time-range partitions of tables declared `PARTITION BY RANGE` on a date,
//! timestamp or timestamptz column. Keeps `premake` future partitions, an optional
//! DEFAULT partition, partitions back to `startDate`, moves rows that landed in the default
//! into the partition created for them, and retires partitions past the retention
//! (detach by default, drop only with `retentionPolicy: Drop` and `allowDestructive`).
//!
//! Ownership is by name: a partition is ours when it is named `<table>_<suffix>` with the
//! suffix of its interval (see [`suffix`]) and its bounds are exactly that interval. Every
//! other partition is reported and never touched. Observed with one catalog query for all
//! tables, plus one query (UNION ALL over the default partitions) counting the rows of each
//! default partition and of the ranges about to be created. The planner is pure: the
//! clock is part of what is observed ([`Observed::now`]), so tests inject time.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Datelike, Months, NaiveDate, NaiveDateTime, Utc};
use sqlx::{PgConnection, Row};

use crate::api::{PartitionInterval, PartitionTableStatus, PartitionedTable, PartitionsSpec};
use crate::api::{RetentionPolicy, TableTarget};
use crate::duration::{parse_retention, Retention};
use crate::engine::areas::{AreaModule, Facts, ObserveContext, ObserveError, PlanContext};
use crate::engine::plan::{Area, AreaPlan, Change, Hazard, LockLevel};
use crate::pg::{quote_ident, quote_literal, QualifiedName};
use crate::reason::Reason;

const AREA: Area = Area::Partitions;

/// PostgreSQL truncates identifiers to 63 bytes; names we build must fit.
const MAX_IDENT: usize = 63;
/// Longest suffix with its underscore (`_2024_01_31`): every name of ours starts with the
/// table name cut to leave room for it, which is what the observer searches by.
const LONGEST_SUFFIX: usize = 11;
/// Default `premake`.
pub(crate) const DEFAULT_PREMAKE: u32 = 4;
/// A guard against a `startDate` decades back with daily partitions.
pub(crate) const MAX_PARTITIONS_PER_RUN: usize = 5000;
/// `DETACH … CONCURRENTLY` exists from PostgreSQL 14 on.
const CONCURRENT_DETACH_VERSION: i32 = 140_000;

mod calendar;
mod layout;
mod observe;
mod render;

pub(crate) use calendar::*;
pub(crate) use layout::*;
pub use observe::*;
pub(crate) use render::*;

/// Most ops of one table in one transaction. Each takes a few locks (the new partition,
/// its indexes, the parent) held to the end of its transaction: a whole run in one would
/// exhaust the server's lock table (`max_locks_per_transaction`) on a large policy.
pub(crate) const OPS_PER_TRANSACTION: usize = 50;

pub(crate) fn plan(spec: &PartitionsSpec, observed: &Observed) -> AreaPlan {
    let mut plan = AreaPlan::new(AREA);
    let ops = diff(spec, observed, &mut plan);
    // One transaction per table (per OPS_PER_TRANSACTION of its ops): a table's creates,
    // row moves and detaches are all or nothing, and locks are let go table by table.
    let mut groups: Vec<Vec<&Op>> = Vec::new();
    let mut last: Option<&QualifiedName> = None;
    for op in &ops {
        let table = op_table(op);
        match groups.last_mut() {
            Some(g) if last == Some(table) && g.len() < OPS_PER_TRANSACTION => g.push(op),
            _ => groups.push(vec![op]),
        }
        last = Some(table);
    }
    for (n, group) in groups.iter().enumerate() {
        let table = op_table(group[0]);
        let key = format!("{table}#{}", n + 1);
        // A row move locks the parent SHARE ROW EXCLUSIVE first; the other ops of its
        // transaction (CREATE … PARTITION OF, DETACH) take ACCESS EXCLUSIVE on it. Taking
        // that one first, before any partition, means no lock upgrade in the middle, which
        // could deadlock with a reader waiting behind the default partition's lock.
        let moves = group
            .iter()
            .any(|o| matches!(o, Op::CreateMovingRows { .. }));
        // (Autonomous ops run outside the transaction: they do not count.)
        let others = group
            .iter()
            .any(|o| !matches!(o, Op::CreateMovingRows { .. }) && !is_autonomous(o));
        if moves && others {
            plan.changes
                .push(lock_parent(table, ParentLock::AccessExclusive).in_group(key.clone()));
        }
        plan.changes.extend(
            group
                .iter()
                .flat_map(|op| render(op))
                .map(|c| c.in_group(key.clone())),
        );
    }
    plan
}

/// The catalog as it will be after `ops` (for tests of convergence).
pub(crate) fn simulate(observed: &Observed, ops: &[Op]) -> Observed {
    let mut next = observed.clone();
    let range_child = |table: &QualifiedName, partition: &str, range: &Range| Child {
        name: in_schema(table, partition),
        bound: Bound::Range {
            from: range.lo(),
            to: range.hi(),
        },
        detach_pending: false,
    };
    for op in ops {
        let Some(state) = next.tables.get_mut(op_table(op)) else {
            continue;
        };
        match op {
            Op::Create {
                table,
                partition,
                range,
                ..
            } => state.children.push(range_child(table, partition, range)),
            Op::CreateMovingRows {
                table,
                partition,
                range,
                rows,
                ..
            } => {
                state.children.push(range_child(table, partition, range));
                if let Some(d) = state.default_rows.as_mut() {
                    d.in_range.remove(&range.lo());
                    d.total -= rows;
                }
            }
            Op::CreateDefault {
                table, partition, ..
            } => {
                state.children.push(Child {
                    name: in_schema(table, partition),
                    bound: Bound::Default,
                    detach_pending: false,
                });
                state.default_rows = Some(DefaultRows::default());
            }
            Op::Detach { partition, .. }
            | Op::FinalizeDetach { partition, .. }
            | Op::Drop { partition, .. } => {
                state.children.retain(|c| &c.name != partition);
                if !matches!(op, Op::Drop { .. }) {
                    state.other_relations.insert(partition.name.clone());
                }
            }
        }
    }
    next
}

/// Status per declared table (tables with errors are left out: their condition says why).
pub(crate) fn status(spec: &PartitionsSpec, observed: &Observed) -> Vec<PartitionTableStatus> {
    let mut out = Vec::new();
    for t in &spec.tables {
        let name = t.qualified();
        let Some(state) = observed.tables.get(&name) else {
            continue;
        };
        if validate_table(t, state).is_err() {
            continue;
        }
        let ranges: Vec<(i64, i64)> = state
            .children
            .iter()
            .filter_map(|c| match c.bound {
                Bound::Range { from, to } => Some((from, to)),
                _ => None,
            })
            .collect();
        let has_default = state.children.iter().any(|c| c.bound == Bound::Default);
        // The next moment the plan changes by the clock alone: the next interval boundary
        // (premake moves on), or the next partition of ours to age past the retention.
        let today = observed.now.date_naive();
        let mut next_due = next(t.interval, floor(t.interval, today))
            .and_hms_opt(0, 0, 0)
            .expect("midnight")
            .and_utc();
        if let (Some(r), Ok(l)) = (
            t.retention.as_deref().and_then(|r| parse_retention(r).ok()),
            layout(t, state, observed),
        ) {
            if let Some(start) = l.ours.keys().next() {
                let end = next(t.interval, *start)
                    .and_hms_opt(0, 0, 0)
                    .expect("midnight");
                let due = match r {
                    Retention::Days(n) => end + chrono::Duration::days(n as i64),
                    Retention::Weeks(n) => end + chrono::Duration::weeks(n as i64),
                    Retention::Months(n) => end.checked_add_months(Months::new(n)).unwrap_or(end),
                    Retention::Years(n) => end
                        .checked_add_months(Months::new(n.saturating_mul(12)))
                        .unwrap_or(end),
                };
                next_due = next_due.min(due.and_utc().max(observed.now));
            }
        }
        out.push(PartitionTableStatus {
            table: name.to_string(),
            partitions: ranges.len() as u32,
            oldest_bound: ranges.iter().map(|r| r.0).min().map(describe_micros),
            newest_bound: ranges.iter().map(|r| r.1).max().map(describe_micros),
            rows_in_default: has_default
                .then(|| state.default_rows.as_ref().map(|d| d.total))
                .flatten(),
            next_maintenance: Some(next_due.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
        });
    }
    out
}

/// Range partitions on a calendar grid: premade ahead, retired behind, rows moved out of
/// the default partition.
pub struct Partitions;

impl AreaModule for Partitions {
    const AREA: Area = AREA;
    // Each partitioned table's creates, row moves and detaches lock that table and its
    // partitions; tables are maintained in any order. (Two tables whose partitions
    // reference one table by foreign key both lock it briefly: one waits for the other's
    // transaction, under `lock_timeout`.)
    const APPLIES_IN_PARALLEL: bool = true;
    type Spec = PartitionsSpec;
    type Observed = Observed;
    type Op = Op;

    fn section(spec: &crate::api::DatabasePolicySpec) -> Option<&PartitionsSpec> {
        spec.partitions.as_ref()
    }

    /// The clock is read here, once: the plan is a pure function of what was observed.
    async fn observe(
        conn: &mut PgConnection,
        section: &PartitionsSpec,
        ctx: ObserveContext<'_>,
    ) -> Result<Observed, ObserveError> {
        let now = ctx.now()?;
        Ok(observe(conn, section, now).await?)
    }

    fn diff(
        section: &PartitionsSpec,
        observed: &Observed,
        _ctx: &PlanContext<'_>,
        plan: &mut AreaPlan,
    ) -> Vec<Op> {
        diff(section, observed, plan)
    }

    fn render(_: &PartitionsSpec, op: &Op) -> Vec<Change> {
        render(op)
    }

    fn simulate(_: &PartitionsSpec, observed: &Observed, ops: &[Op]) -> Observed {
        simulate(observed, ops)
    }

    /// One transaction per table (see [`plan`]).
    fn plan(section: &PartitionsSpec, observed: &Observed, _ctx: &mut PlanContext<'_>) -> AreaPlan {
        plan(section, observed)
    }

    fn facts(section: Option<&PartitionsSpec>, observed: &Observed, facts: &mut Facts) {
        facts.partitions = section.map(|s| status(s, observed));
    }
}

#[cfg(test)]
mod tests;
