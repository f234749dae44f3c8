//! The executor: runs a plan on one connection that already holds the policy lock.
//! Consecutive transactional changes of an area (and of one group, when the area splits
//! its work, see `Change::group`) share one transaction (all or nothing);
//! statements PostgreSQL refuses inside a transaction run alone: intent before effect, the
//! intent to build what they record is committed before they run, and their ledger
//! entries are written in one transaction right after (see [`super::ledger`]).
//! A change with a timeout of its own (a concurrent index build or detach, a new view's
//! first fill) runs with `statement_timeout` set to it, and the policy's set back right
//! after: for the session around an autonomous change, failed or not; with `SET LOCAL`
//! around a change in a transaction (a failure rolls the whole transaction back anyway).
//! Destructive changes are refused unless the policy allows them.
//! The first failure stops the run: what follows may depend on it.

use serde::Serialize;
use sqlx::{Connection, PgConnection};

use super::plan::{Area, Change, Hazard, LedgerOp, OwnTimeout, Plan};
use super::{ledger, normcache};
use crate::pg::{error_summary, execute_one, sqlstate};
use crate::reason::Reason;

#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ApplyReport {
    pub applied: Vec<Change>,
    /// Destructive changes not run because `safety.allowDestructive` is off.
    pub refused: Vec<Change>,
    /// Changes not attempted because an earlier one failed.
    pub not_attempted: Vec<Change>,
    pub failure: Option<ApplyFailure>,
}

impl ApplyReport {
    pub fn succeeded(&self) -> bool {
        self.failure.is_none()
    }
    pub(crate) fn restart_required(&self) -> Vec<&str> {
        self.applied
            .iter()
            .filter(|c| c.requires_restart)
            .map(|c| c.target.as_str())
            .collect()
    }
}

#[derive(Debug, Clone, Serialize, thiserror::Error)]
#[serde(rename_all = "camelCase")]
#[error("{area}: {target}: {message}\n  statement: {statement}")]
pub struct ApplyFailure {
    pub area: Area,
    pub target: String,
    pub statement: String,
    /// From the SQLSTATE: `LockTimeout`, `StatementTimeout`, … (`ApplyFailed` otherwise)
    pub reason: Reason,
    pub sqlstate: Option<String>,
    pub message: String,
}

impl ApplyFailure {
    fn from_sqlx(change: &Change, statement: &str, e: &sqlx::Error) -> Self {
        let code = sqlstate(e);
        ApplyFailure {
            area: change.area,
            target: change.target.clone(),
            statement: statement.to_string(),
            reason: Reason::from_sqlstate(code.as_deref()).unwrap_or(Reason::ApplyFailed),
            sqlstate: code,
            message: error_summary(e),
        }
    }
}

/// The statement timeouts of a run, in milliseconds (0: none, as in PostgreSQL).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// `safety.statementTimeout`: what the session runs under.
    pub statement_ms: u64,
    /// `safety.indexBuildTimeout`, the long-operation timeout (see [`OwnTimeout`]).
    pub long_operation_ms: u64,
}

/// A `spec.safety` timeout PostgreSQL cannot be given (`validate_spec` refuses it first).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("spec.safety.{field}: {message}")]
pub struct InvalidTimeout {
    pub field: &'static str,
    pub message: String,
}

impl InvalidTimeout {
    pub(crate) fn reason(&self) -> Reason {
        Reason::InvalidSpec
    }
}

/// The `spec.safety.<field>` duration `value` in milliseconds, as PostgreSQL takes it.
pub(crate) fn millis(field: &'static str, value: &str) -> Result<u64, InvalidTimeout> {
    crate::duration::pg_millis(value).map_err(|e| InvalidTimeout {
        field,
        message: e.to_string(),
    })
}

impl Timeouts {
    pub(crate) fn from_spec(spec: &crate::api::DatabasePolicySpec) -> Result<Self, InvalidTimeout> {
        Ok(Timeouts {
            statement_ms: millis("statementTimeout", spec.statement_timeout())?,
            long_operation_ms: millis("indexBuildTimeout", spec.index_build_timeout())?,
        })
    }
    fn of(&self, timeout: OwnTimeout) -> u64 {
        match timeout {
            OwnTimeout::LongOperation => self.long_operation_ms,
        }
    }
}

/// Runs `plan` on `conn`, whose session runs under `timeouts.statement_ms`. `policy`
/// names the owner written to the ledger.
pub async fn execute(
    conn: &mut PgConnection,
    plan: &Plan,
    allow_destructive: bool,
    policy: &str,
    timeouts: &Timeouts,
) -> ApplyReport {
    execute_with(conn, None, plan, allow_destructive, policy, timeouts).await
}

/// [`execute`], given `second`, a connection to the same database with the same session
/// settings (the run's lock is held by `conn`): the changes of an area whose targets are
/// independent ([`Area::applies_in_parallel`]) run on both at once, each target's
/// changes in order on one of them.
pub(crate) async fn execute_with(
    conn: &mut PgConnection,
    second: Option<&mut PgConnection>,
    plan: &Plan,
    allow_destructive: bool,
    policy: &str,
    timeouts: &Timeouts,
) -> ApplyReport {
    let mut report = ApplyReport::default();
    let (runnable, refused) = runnable_and_refused(plan, allow_destructive);
    report.refused = refused.into_iter().cloned().collect();

    if runnable
        .iter()
        .any(|c| !c.ledger.is_empty() || !c.cache.is_empty())
    {
        if let Err(e) = bootstrap_ledger(conn).await {
            let first = runnable[0];
            report.failure = Some(ApplyFailure::from_sqlx(first, ledger::BOOTSTRAP_SQL, &e));
            report.not_attempted = runnable.into_iter().cloned().collect();
            return report;
        }
    }

    let groups = groups(&runnable);
    let mut main = Lane::new(conn, timeouts.statement_ms);
    let mut other = second.map(|c| Lane::new(c, timeouts.statement_ms));
    // What ran, per group index (with the rows of each statement), and the first failure.
    let mut done: Vec<Option<Vec<u64>>> = vec![None; groups.len()];
    let mut failure: Option<(usize, ApplyFailure)> = None;
    let mut next = 0;
    while next < groups.len() && failure.is_none() {
        let area = groups[next][0].area;
        let run = if other.is_some() && area.applies_in_parallel() {
            groups[next..]
                .iter()
                .take_while(|g| g[0].area == area)
                .count()
        } else {
            1
        };
        match (other.as_mut(), split_by_target(&groups, next..next + run)) {
            (Some(second), Some([a, b])) => {
                let stop = std::sync::atomic::AtomicBool::new(false);
                let (ra, rb) = tokio::join!(
                    main.run(&groups, &a, policy, timeouts, &stop),
                    second.run(&groups, &b, policy, timeouts, &stop),
                );
                for (i, rows) in ra.0.into_iter().chain(rb.0) {
                    done[i] = Some(rows);
                }
                // Both lanes may have failed: the one earlier in the plan is told.
                let mut failed: Vec<(usize, ApplyFailure)> = ra.1.into_iter().chain(rb.1).collect();
                failed.sort_by_key(|(i, _)| *i);
                if let Some(later) = failed.get(1) {
                    tracing::warn!(failure = %later.1, "a second lane failed too");
                }
                failure = failed.into_iter().next();
                // The second lane's session back to the policy's timeout, as the first's
                // is below (the connection is the run's and may be used again).
                if let Some(i) = b.first() {
                    let _ = second.timeout(groups[*i][0], timeouts.statement_ms).await;
                }
            }
            _ => {
                let never = std::sync::atomic::AtomicBool::new(false);
                let one_lane: Vec<usize> = (next..next + run).collect();
                let (ran, failed) = main.run(&groups, &one_lane, policy, timeouts, &never).await;
                for (i, rows) in ran {
                    done[i] = Some(rows);
                }
                failure = failed;
            }
        }
        next += run;
    }
    for (group, rows) in groups.iter().zip(&done) {
        match rows {
            Some(rows) => report
                .applied
                .extend(group.iter().zip(rows).map(|(c, rows)| Change {
                    rows_affected: c.reports_rows.then_some(*rows),
                    ..(*c).clone()
                })),
            None => report
                .not_attempted
                .extend(group.iter().map(|c| (*c).clone())),
        }
    }
    // The policy's timeout back for whatever the session runs next (after a failure too:
    // the first failure is the one told).
    if let Some(last) = runnable.last() {
        if let Err(e) = main.timeout(last, timeouts.statement_ms).await {
            failure.get_or_insert((usize::MAX, e));
        }
    }
    report.failure = failure.map(|(_, f)| f);
    report
}

/// The plan's changes that run, and those refused: a destructive change unless the policy
/// allows them, and every change of its bundle.
fn runnable_and_refused(plan: &Plan, allow_destructive: bool) -> (Vec<&Change>, Vec<&Change>) {
    let refused_bundles: std::collections::BTreeSet<&str> = plan
        .changes()
        .filter(|c| !allow_destructive && c.hazard == Hazard::Destructive)
        .filter_map(|c| c.bundle.as_deref())
        .collect();
    plan.changes().partition(|c| {
        let refused_bundle = c
            .bundle
            .as_deref()
            .is_some_and(|b| refused_bundles.contains(b));
        (allow_destructive || c.hazard != Hazard::Destructive) && !refused_bundle
    })
}

/// Whether `plan` has changes a second connection would run beside the first: changes
/// that run (not refused) of an area that applies in parallel, on two targets or more.
pub(crate) fn uses_second_connection(plan: &Plan, allow_destructive: bool) -> bool {
    let (runnable, _) = runnable_and_refused(plan, allow_destructive);
    let mut parallel = runnable
        .into_iter()
        .filter(|c| c.area.applies_in_parallel());
    match parallel.next() {
        Some(first) => parallel.any(|c| c.target != first.target),
        None => false,
    }
}

/// The plan's changes as the executor runs them: consecutive transactional changes of one
/// area and group share a transaction; an autonomous change is a group of its own.
fn groups<'p>(runnable: &[&'p Change]) -> Vec<Vec<&'p Change>> {
    let mut groups: Vec<Vec<&Change>> = Vec::new();
    for change in runnable {
        match groups.last_mut() {
            Some(g)
                if change.transactional
                    && g[0].transactional
                    && g[0].area == change.area
                    && g[0].group == change.group =>
            {
                g.push(change)
            }
            _ => groups.push(vec![change]),
        }
    }
    groups
}

/// The groups of `range` in two lanes, each target's groups on one lane in plan order,
/// targets dealt to the lane with fewer statements so far; None when they have only one
/// target.
fn split_by_target(
    groups: &[Vec<&Change>],
    range: std::ops::Range<usize>,
) -> Option<[Vec<usize>; 2]> {
    let mut lane_of: std::collections::HashMap<&str, usize> = Default::default();
    let mut lanes: [Vec<usize>; 2] = Default::default();
    let mut load = [0usize; 2];
    for i in range {
        let target = groups[i][0].target.as_str();
        let lane = *lane_of
            .entry(target)
            .or_insert_with(|| if load[1] < load[0] { 1 } else { 0 });
        lanes[lane].push(i);
        load[lane] += groups[i].len();
    }
    (!lanes.iter().any(Vec::is_empty)).then_some(lanes)
}

/// A connection the executor runs groups on, and the `statement_timeout` its session
/// is under: a change's own timeout stays set for the next change that wants the same,
/// so a retention pass of thousands of DETACH … CONCURRENTLY does not pay two more round
/// trips each; the policy's is set back before anything else runs.
struct Lane<'c> {
    conn: &'c mut PgConnection,
    session_ms: u64,
}

impl<'c> Lane<'c> {
    fn new(conn: &'c mut PgConnection, session_ms: u64) -> Self {
        Lane { conn, session_ms }
    }

    /// Runs the groups `indexes` in order until one fails or `stop` is set (by the other
    /// lane's failure: what follows may depend on what failed). Returns the rows of
    /// each group that ran, and the failure.
    async fn run(
        &mut self,
        groups: &[Vec<&Change>],
        indexes: &[usize],
        policy: &str,
        timeouts: &Timeouts,
        stop: &std::sync::atomic::AtomicBool,
    ) -> (Vec<(usize, Vec<u64>)>, Option<(usize, ApplyFailure)>) {
        use std::sync::atomic::Ordering;
        let mut ran = Vec::with_capacity(indexes.len());
        for &i in indexes {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let group = &groups[i];
            let first = group[0];
            let result = if first.transactional {
                // A transaction starts under the policy's timeout (its own ones are LOCAL).
                match self.timeout(first, timeouts.statement_ms).await {
                    Ok(()) => run_transaction(self.conn, group, policy, timeouts).await,
                    Err(e) => Err(e),
                }
            } else {
                run_autonomous(self, first, policy, timeouts).await
            };
            match result {
                Ok(rows) => ran.push((i, rows)),
                Err(failure) => {
                    stop.store(true, Ordering::Relaxed);
                    let _ = self.timeout(first, timeouts.statement_ms).await;
                    return (ran, Some((i, failure)));
                }
            }
        }
        (ran, None)
    }

    /// `SET statement_timeout` for the session unless it is already `ms`.
    async fn timeout(&mut self, change: &Change, ms: u64) -> Result<(), ApplyFailure> {
        if self.session_ms != ms {
            set_statement_timeout(self.conn, change, Scope::Session, ms).await?;
            self.session_ms = ms;
        }
        Ok(())
    }
}

/// Creates the ledger and the normalisation cache beside it (fixed text, no spec text).
pub(crate) async fn bootstrap_ledger(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    let mut tx = conn.begin().await?;
    sqlx::Executor::execute(&mut *tx, ledger::BOOTSTRAP_SQL).await?;
    sqlx::Executor::execute(&mut *tx, normcache::BOOTSTRAP_SQL).await?;
    tx.commit().await
}

/// Runs a group in one transaction; returns the rows each statement affected.
async fn run_transaction(
    conn: &mut PgConnection,
    group: &[&Change],
    policy: &str,
    timeouts: &Timeouts,
) -> Result<Vec<u64>, ApplyFailure> {
    let mut tx = conn
        .begin()
        .await
        .map_err(|e| ApplyFailure::from_sqlx(group[0], "BEGIN", &e))?;
    let mut rows = Vec::with_capacity(group.len());
    for change in group {
        if let Some(own) = change.timeout {
            set_statement_timeout(&mut tx, change, Scope::Local, timeouts.of(own)).await?;
        }
        // One statement, alone in one extended-protocol message (see `execute_one`).
        let done = execute_one(&mut tx, &change.sql)
            .await
            .map_err(|e| ApplyFailure::from_sqlx(change, &change.sql, &e))?;
        rows.push(done.rows_affected());
        if change.timeout.is_some() {
            // The rest of the transaction runs under the policy's timeout again.
            set_statement_timeout(&mut tx, change, Scope::Local, timeouts.statement_ms).await?;
        }
    }
    // All or nothing, so the group's bookkeeping is written once, after its statements:
    // an intent would announce what commits with it anyway.
    let last = group[group.len() - 1];
    let ops: Vec<LedgerOp> = group.iter().flat_map(|c| outcome_ops(c).cloned()).collect();
    ledger::write_all(&mut tx, &ops, policy)
        .await
        .map_err(|e| ApplyFailure::from_sqlx(last, "(ledger)", &e))?;
    // One row per key, the last change's (the statement keeps one per key, not in order).
    let mut last_of: std::collections::HashMap<&str, &normcache::Record> = Default::default();
    for record in group.iter().flat_map(|c| c.cache.iter()) {
        last_of.insert(record.key.as_str(), record);
    }
    let cache: Vec<normcache::Record> = last_of.into_values().cloned().collect();
    normcache::write(&mut tx, &cache, policy)
        .await
        .map_err(|e| ApplyFailure::from_sqlx(last, "(normalisation cache)", &e))?;
    // Dropping `tx` on an early return rolls back.
    tx.commit()
        .await
        .map_err(|e| ApplyFailure::from_sqlx(group[group.len() - 1], "COMMIT", &e))?;
    Ok(rows)
}

async fn run_autonomous(
    lane: &mut Lane<'_>,
    change: &Change,
    policy: &str,
    timeouts: &Timeouts,
) -> Result<Vec<u64>, ApplyFailure> {
    let intents = intents(change);
    if !intents.is_empty() {
        // What the change intends is written under the policy's timeout, not the one a
        // change before it left set.
        lane.timeout(change, timeouts.statement_ms).await?;
    }
    write_ledger(lane.conn, change, &intents, policy).await?;
    // Outside any transaction, a plain SET lasts for the session; it stays for the next
    // change that wants the same (see `Lane`).
    let wanted = change
        .timeout
        .map_or(timeouts.statement_ms, |own| timeouts.of(own));
    lane.timeout(change, wanted).await?;
    // On failure the lane sets the policy's timeout back before it returns.
    let done = execute_one(&mut *lane.conn, &change.sql)
        .await
        .map_err(|e| ApplyFailure::from_sqlx(change, &change.sql, &e))?;
    let outcome: Vec<LedgerOp> = outcome_ops(change).cloned().collect();
    write_ledger(lane.conn, change, &outcome, policy).await?;
    Ok(vec![done.rows_affected()])
}

/// How long a `SET` lasts.
#[derive(Clone, Copy)]
enum Scope {
    /// The session: outside a transaction, the only scope there is.
    Session,
    /// The transaction: a rollback restores the timeout before it.
    Local,
}

/// `SET [LOCAL] statement_timeout` (a number the engine computed, no spec text).
async fn set_statement_timeout(
    conn: &mut PgConnection,
    change: &Change,
    scope: Scope,
    ms: u64,
) -> Result<(), ApplyFailure> {
    let sql = match scope {
        Scope::Session => format!("SET statement_timeout = {ms}"),
        Scope::Local => format!("SET LOCAL statement_timeout = {ms}"),
    };
    sqlx::Executor::execute(&mut *conn, sql.as_str())
        .await
        .map(|_| ())
        .map_err(|e| ApplyFailure::from_sqlx(change, &sql, &e))
}

/// What an autonomous change commits before it runs, so a run killed while it runs (or
/// between it and its ledger entries) leaves a trace the next run finds: the intents it
/// declares, and the intent to build everything it records.
pub(crate) fn intents(change: &Change) -> Vec<LedgerOp> {
    change
        .ledger
        .iter()
        .filter_map(|op| match op {
            LedgerOp::Intend { .. } => Some(op.clone()),
            LedgerOp::Record { area, target, item } => Some(LedgerOp::Intend {
                area: *area,
                target: target.clone(),
                item: item.clone(),
            }),
            LedgerOp::Forget { .. } => None,
        })
        .collect()
}

/// What a change records and forgets once it has run (recording clears the intent).
fn outcome_ops(change: &Change) -> impl Iterator<Item = &LedgerOp> {
    change
        .ledger
        .iter()
        .filter(|op| !matches!(op, LedgerOp::Intend { .. }))
}

/// Writes `ops` in one transaction of their own.
async fn write_ledger(
    conn: &mut PgConnection,
    change: &Change,
    ops: &[LedgerOp],
    policy: &str,
) -> Result<(), ApplyFailure> {
    if ops.is_empty() {
        return Ok(());
    }
    let failed = |e: sqlx::Error| ApplyFailure::from_sqlx(change, "(ledger)", &e);
    let mut tx = conn.begin().await.map_err(failed)?;
    ledger::write_all(&mut tx, ops, policy)
        .await
        .map_err(failed)?;
    tx.commit().await.map_err(failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(area: Area, target: &str, group: &str) -> Change {
        Change::new(area, target, "", "SELECT 1").in_group(group.to_string())
    }

    #[test]
    fn consecutive_transactional_changes_of_one_group_share_a_transaction() {
        let a1 = change(Area::Partitions, "a", "a#1");
        let a2 = change(Area::Partitions, "a", "a#1");
        let detach = change(Area::Partitions, "a", "a#1").autonomous();
        let a3 = change(Area::Partitions, "a", "a#1");
        let b = change(Area::Partitions, "b", "b#2");
        let other_area = change(Area::Indexes, "b", "b#2");
        let runnable = vec![&a1, &a2, &detach, &a3, &b, &other_area];
        let sizes: Vec<usize> = groups(&runnable).iter().map(Vec::len).collect();
        assert_eq!(sizes, [2, 1, 1, 1, 1]);
    }

    #[test]
    fn a_target_stays_on_one_lane_and_targets_are_dealt_by_load() {
        let changes = [
            change(Area::Partitions, "a", "a#1"),
            change(Area::Partitions, "a", "a#1"),
            change(Area::Partitions, "b", "b#2"),
            change(Area::Partitions, "c", "c#3"),
            change(Area::Partitions, "a", "a#4"),
            change(Area::Partitions, "d", "d#5"),
        ];
        let runnable: Vec<&Change> = changes.iter().collect();
        let groups = groups(&runnable);
        // a (2 statements) on lane 0; b on lane 1; c on lane 1 (1 < 2); a's second
        // group after a's first; d on either when even: lane 0 holds 3, lane 1 holds 2.
        assert_eq!(
            split_by_target(&groups, 0..groups.len()),
            Some([vec![0, 3], vec![1, 2, 4]])
        );
    }

    #[test]
    fn one_target_is_one_lane() {
        let changes = [
            change(Area::Partitions, "a", "a#1"),
            change(Area::Partitions, "a", "a#2"),
        ];
        let runnable: Vec<&Change> = changes.iter().collect();
        let groups = groups(&runnable);
        assert_eq!(split_by_target(&groups, 0..2), None);
    }

    #[test]
    fn only_an_area_applying_in_parallel_over_two_targets_wants_a_second_connection() {
        let plan = |changes: Vec<Change>| {
            let mut area = super::super::plan::AreaPlan::new(changes[0].area);
            area.changes = changes;
            Plan { areas: vec![area] }
        };
        assert!(!uses_second_connection(
            &plan(vec![
                change(Area::Partitions, "a", "a#1"),
                change(Area::Partitions, "a", "a#2"),
            ]),
            false
        ));
        assert!(!uses_second_connection(
            &plan(vec![
                change(Area::Indexes, "a", "a"),
                change(Area::Indexes, "b", "b"),
            ]),
            false
        ));
        let two = || {
            vec![
                change(Area::Partitions, "a", "a#1"),
                change(Area::Partitions, "b", "b#2"),
            ]
        };
        assert!(uses_second_connection(&plan(two()), false));
        // Refused changes do not run: a plan whose second table only has a refused drop
        // has one table to work on.
        let mut refused = two();
        refused[1].hazard = Hazard::Destructive;
        assert!(!uses_second_connection(&plan(refused.clone()), false));
        assert!(uses_second_connection(&plan(refused), true));
    }
}
