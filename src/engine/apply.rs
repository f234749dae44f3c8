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
    let mut report = ApplyReport::default();
    let refused_bundles: std::collections::BTreeSet<&str> = plan
        .changes()
        .filter(|c| !allow_destructive && c.hazard == Hazard::Destructive)
        .filter_map(|c| c.bundle.as_deref())
        .collect();
    let (runnable, refused): (Vec<&Change>, Vec<&Change>) = plan.changes().partition(|c| {
        let refused_bundle = c
            .bundle
            .as_deref()
            .is_some_and(|b| refused_bundles.contains(b));
        (allow_destructive || c.hazard != Hazard::Destructive) && !refused_bundle
    });
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

    // The session's statement_timeout as the loop leaves it: a change's own timeout stays
    // set for the next change that wants the same, so a retention pass of thousands of
    // DETACH … CONCURRENTLY does not pay two more round trips each; the policy's is set
    // back before anything else runs and before this returns.
    let mut session_ms = timeouts.statement_ms;
    let mut rest = runnable.as_slice();
    while let Some(first) = rest.first() {
        // A group: consecutive transactional changes of one area and group, or one
        // autonomous change.
        let len = if first.transactional {
            rest.iter()
                .take_while(|c| c.transactional && c.area == first.area && c.group == first.group)
                .count()
        } else {
            1
        };
        let (group, tail) = rest.split_at(len);
        let result = if first.transactional {
            // A transaction starts under the policy's timeout (its own ones are LOCAL).
            match set_session_timeout(conn, first, &mut session_ms, timeouts.statement_ms).await {
                Ok(()) => run_transaction(conn, group, policy, timeouts).await,
                Err(e) => Err(e),
            }
        } else {
            run_autonomous(conn, first, policy, timeouts, &mut session_ms).await
        };
        match result {
            Ok(rows) => report
                .applied
                .extend(group.iter().zip(rows).map(|(c, rows)| Change {
                    rows_affected: c.reports_rows.then_some(rows),
                    ..(*c).clone()
                })),
            Err(failure) => {
                // The statement failed or its bookkeeping did: the policy's timeout back
                // for whatever the session runs next (the first failure is the one told).
                let _ =
                    set_session_timeout(conn, first, &mut session_ms, timeouts.statement_ms).await;
                report.failure = Some(failure);
                report.not_attempted = rest.iter().map(|c| (*c).clone()).collect();
                return report;
            }
        }
        rest = tail;
    }
    if let Some(last) = runnable.last() {
        if let Err(e) =
            set_session_timeout(conn, last, &mut session_ms, timeouts.statement_ms).await
        {
            report.failure = Some(e);
        }
    }
    report
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
    conn: &mut PgConnection,
    change: &Change,
    policy: &str,
    timeouts: &Timeouts,
    session_ms: &mut u64,
) -> Result<Vec<u64>, ApplyFailure> {
    let intents = intents(change);
    if !intents.is_empty() {
        // What the change intends is written under the policy's timeout, not the one a
        // change before it left set.
        set_session_timeout(conn, change, session_ms, timeouts.statement_ms).await?;
    }
    write_ledger(conn, change, &intents, policy).await?;
    // Outside any transaction, a plain SET lasts for the session; it stays for the next
    // change that wants the same (see `execute`).
    let wanted = change
        .timeout
        .map_or(timeouts.statement_ms, |own| timeouts.of(own));
    set_session_timeout(conn, change, session_ms, wanted).await?;
    // On failure `execute` sets the policy's timeout back before it returns.
    let done = execute_one(&mut *conn, &change.sql)
        .await
        .map_err(|e| ApplyFailure::from_sqlx(change, &change.sql, &e))?;
    let outcome: Vec<LedgerOp> = outcome_ops(change).cloned().collect();
    write_ledger(conn, change, &outcome, policy).await?;
    Ok(vec![done.rows_affected()])
}

/// `SET statement_timeout` for the session unless it is already `ms`.
async fn set_session_timeout(
    conn: &mut PgConnection,
    change: &Change,
    session_ms: &mut u64,
    ms: u64,
) -> Result<(), ApplyFailure> {
    if *session_ms != ms {
        set_statement_timeout(conn, change, Scope::Session, ms).await?;
        *session_ms = ms;
    }
    Ok(())
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
