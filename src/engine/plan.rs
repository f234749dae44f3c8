//! A plan is data: ordered changes, each with its area, target, SQL and hazard. It prints
//! as SQL for people, serialises to JSON for machines and to a bounded summary for status.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::api::{PendingChange, PendingPlanSummary, MAX_PENDING_IN_STATUS};
use crate::reason::Reason;

pub use super::areas::Area;

/// What a change risks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Hazard {
    /// No lock that blocks reads or writes, nothing lost.
    Safe,
    /// Takes a table lock (bounded by lock_timeout) that can queue behind or block traffic.
    Locking,
    /// Changes the whole PostgreSQL server, every database and session, when the
    /// configuration is reloaded (or at the next restart): `ALTER SYSTEM`, `pg_reload_conf()`.
    Server,
    /// Drops or deletes something the policy did not create in this run; refused unless
    /// `safety.allowDestructive`.
    Destructive,
}

impl Hazard {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Hazard::Safe => "safe",
            Hazard::Locking => "locking",
            Hazard::Server => "server",
            Hazard::Destructive => "destructive",
        }
    }
}

/// The strongest table-level lock a change takes on a relation that already exists: its
/// target, or (partitions) the parent, its default or the partition detached. PostgreSQL's
/// eight modes, weakest first, and `None` for statements that take no relation lock anyone
/// could queue behind: `ALTER SYSTEM`, functions, replication slots, a relation created
/// by the same statement. Ordered by strength, so a plan's strongest lock is its max.
///
/// Each level below was checked against the PostgreSQL documentation ("Explicit
/// Locking", table 13.2, and the Notes/Description of each command) and, where the docs
/// are silent, the source (`tablecmds.c` `AlterTableGetLockLevel`,
/// `AlterTableGetRelOptionsLockLevel`; `policy.c` opens the table in
/// `AccessExclusiveLock` for CREATE, ALTER and DROP POLICY). It is what the change takes
/// on its target; a statement that also reads other tables takes ACCESS SHARE on those.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum LockLevel {
    /// No relation lock that traffic or DDL could wait on.
    #[default]
    None,
    /// SELECT; conflicts only with ACCESS EXCLUSIVE.
    AccessShare,
    /// INSERT, UPDATE, DELETE.
    RowExclusive,
    /// VACUUM, CREATE INDEX CONCURRENTLY, DROP INDEX CONCURRENTLY, ATTACH PARTITION and
    /// DETACH … CONCURRENTLY (on the parent), ALTER TABLE SET/RESET of autovacuum storage
    /// parameters, ALTER INDEX RENAME (PostgreSQL 12+): reads and writes go on, other DDL
    /// and VACUUM wait.
    ShareUpdateExclusive,
    /// CREATE INDEX (not concurrently): blocks writes, not reads.
    Share,
    /// Blocks writes and other DDL, not reads (what a row move holds on a parent).
    ShareRowExclusive,
    /// REFRESH MATERIALIZED VIEW CONCURRENTLY: blocks everything but reads.
    Exclusive,
    /// Most ALTER TABLE forms, DROP, CREATE/ALTER/DROP POLICY, ENABLE/FORCE ROW LEVEL
    /// SECURITY, CREATE TABLE … PARTITION OF (on the parent), DETACH (on the partition;
    /// plain DETACH on the parent too), non-concurrent REFRESH, OWNER TO: blocks reads too, while it waits (up to lock_timeout) and while
    /// it holds the lock.
    AccessExclusive,
}

impl LockLevel {
    /// PostgreSQL's name of the mode (as in `LOCK TABLE … IN <mode> MODE`).
    pub(crate) fn as_sql(self) -> &'static str {
        match self {
            LockLevel::None => "none",
            LockLevel::AccessShare => "ACCESS SHARE",
            LockLevel::RowExclusive => "ROW EXCLUSIVE",
            LockLevel::ShareUpdateExclusive => "SHARE UPDATE EXCLUSIVE",
            LockLevel::Share => "SHARE",
            LockLevel::ShareRowExclusive => "SHARE ROW EXCLUSIVE",
            LockLevel::Exclusive => "EXCLUSIVE",
            LockLevel::AccessExclusive => "ACCESS EXCLUSIVE",
        }
    }
}

/// A statement timeout of its own, instead of the policy's `safety.statementTimeout`,
/// for a statement that is long by nature but holds no lock that blocks traffic. The
/// executor resolves it against the spec and sets it around that statement only (with
/// `SET` around an autonomous statement, restored right after; with `SET LOCAL` inside a
/// transaction, the policy's set back after it), so what follows runs under the policy's
/// timeout again. Modelled on stripe/pg-schema-diff, which gives `CREATE INDEX
/// CONCURRENTLY` and `DROP INDEX CONCURRENTLY` their own 20-minute timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum OwnTimeout {
    /// `safety.indexBuildTimeout`, the long-operation timeout (default 20m; `0s` for
    /// none). One field for every statement of this kind, as they are alike for whoever
    /// sizes it (long by nature, no traffic waits on them): concurrent index builds and
    /// drops and `DETACH PARTITION … CONCURRENTLY`, which wait for every transaction older
    /// than themselves, and the first fill of a new materialized view, which nobody can
    /// read before it commits.
    LongOperation,
}

impl OwnTimeout {
    /// The `spec.safety` field that sets it.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            OwnTimeout::LongOperation => "indexBuildTimeout",
        }
    }
}

/// Bookkeeping of what the policy owns, written in the same transaction as the change it
/// belongs to, so "removed from the spec" can be told from "never managed". For a change
/// that cannot run in a transaction, intents are committed before it runs (see
/// [`crate::engine::ledger`]): a run killed in the middle leaves a trace of what it began.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "op", rename_all = "camelCase")]
pub enum LedgerOp {
    /// This policy is about to build `target` (committed before the statement runs).
    Intend {
        area: Area,
        target: String,
        item: String,
    },
    /// This policy owns `target` (clears its intent).
    Record {
        area: Area,
        target: String,
        item: String,
    },
    /// This policy neither owns nor is building `target` any more (clears both).
    Forget {
        area: Area,
        target: String,
        item: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Change {
    pub area: Area,
    /// What the change is about: a table, a parameter, a flag.
    pub target: String,
    /// One line for people and for status.
    pub summary: String,
    /// One SQL statement.
    pub sql: String,
    pub hazard: Hazard,
    /// The lock the statement takes on its target (see [`LockLevel`]).
    pub lock: LockLevel,
    /// Runs under this timeout rather than the policy's statement timeout.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<OwnTimeout>,
    /// False for statements PostgreSQL refuses inside a transaction block
    /// (`ALTER SYSTEM`, `CREATE INDEX CONCURRENTLY`, `DETACH … CONCURRENTLY`).
    pub transactional: bool,
    /// The new value only takes effect after a server restart.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub requires_restart: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ledger: Vec<LedgerOp>,
    /// The executor reports how many rows the statement affected (e.g. rows moved).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub reports_rows: bool,
    /// Set by the executor on applied changes that report rows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rows_affected: Option<u64>,
    /// Changes that only make sense together (build new, drop old, rename): when one is
    /// refused as destructive, the executor refuses the whole bundle.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bundle: Option<String>,
    /// Splits an area's transaction: consecutive transactional changes share one only when
    /// their groups are equal too (partitions: per table, so a run over many tables does
    /// not hold thousands of locks at once and exhaust the lock table).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Normalisation cache rows the executor writes in the change's transaction (see
    /// [`super::normcache`]): bookkeeping, not part of the plan people read.
    #[serde(skip)]
    pub cache: Vec<super::normcache::Record>,
}

impl Change {
    pub fn new(
        area: Area,
        target: impl Into<String>,
        summary: impl Into<String>,
        sql: impl Into<String>,
    ) -> Self {
        Change {
            area,
            target: target.into(),
            summary: summary.into(),
            sql: sql.into(),
            hazard: Hazard::Safe,
            lock: LockLevel::None,
            timeout: None,
            transactional: true,
            requires_restart: false,
            ledger: Vec::new(),
            reports_rows: false,
            rows_affected: None,
            bundle: None,
            group: None,
            cache: Vec::new(),
        }
    }
    /// Records `row` in the normalisation cache when this change commits.
    pub(crate) fn cache(mut self, row: Option<super::normcache::Record>) -> Self {
        self.cache.extend(row);
        self
    }
    pub(crate) fn bundle(mut self, key: impl Into<String>) -> Self {
        self.bundle = Some(key.into());
        self
    }
    pub(crate) fn hazard(mut self, hazard: Hazard) -> Self {
        self.hazard = hazard;
        self
    }
    /// The lock the statement takes on its target.
    pub fn lock(mut self, lock: LockLevel) -> Self {
        self.lock = lock;
        self
    }
    /// Runs the statement under its own timeout (see [`OwnTimeout`]).
    pub fn own_timeout(mut self, timeout: OwnTimeout) -> Self {
        self.timeout = Some(timeout);
        self
    }
    pub fn autonomous(mut self) -> Self {
        self.transactional = false;
        self
    }
    /// Puts the change in a transaction group of its area (see [`Change::group`]).
    pub(crate) fn in_group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }
    /// Asks the executor to report the rows the statement affected.
    pub(crate) fn reports_rows(mut self) -> Self {
        self.reports_rows = true;
        self
    }
    pub(crate) fn restart(mut self, requires_restart: bool) -> Self {
        self.requires_restart = requires_restart;
        self
    }
    pub(crate) fn record(mut self, item: impl Into<String>) -> Self {
        self.ledger.push(LedgerOp::Record {
            area: self.area,
            target: self.target.clone(),
            item: item.into(),
        });
        self
    }
    pub(crate) fn forget(mut self, item: impl Into<String>) -> Self {
        self.ledger.push(LedgerOp::Forget {
            area: self.area,
            target: self.target.clone(),
            item: item.into(),
        });
        self
    }
    /// Records ownership under a ledger target other than the change's own.
    pub(crate) fn record_under(
        mut self,
        target: impl Into<String>,
        item: impl Into<String>,
    ) -> Self {
        self.ledger.push(LedgerOp::Record {
            area: self.area,
            target: target.into(),
            item: item.into(),
        });
        self
    }
    /// Declares, before the change runs, that it builds `target` (see [`LedgerOp::Intend`]).
    pub(crate) fn intend_under(
        mut self,
        target: impl Into<String>,
        item: impl Into<String>,
    ) -> Self {
        self.ledger.push(LedgerOp::Intend {
            area: self.area,
            target: target.into(),
            item: item.into(),
        });
        self
    }
    pub(crate) fn forget_under(
        mut self,
        target: impl Into<String>,
        item: impl Into<String>,
    ) -> Self {
        self.ledger.push(LedgerOp::Forget {
            area: self.area,
            target: target.into(),
            item: item.into(),
        });
        self
    }
}

/// Something in the spec that cannot be carried out against this database (a missing
/// table, an unknown setting, an invalid value). It names the target; nothing is applied
/// while a plan has one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PlanError {
    pub area: Area,
    pub target: String,
    /// For conditions: `TableNotFound`, `UnknownSetting`, `InvalidValue`, …
    pub reason: Reason,
    pub message: String,
}

impl std::fmt::Display for PlanError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {}: {} ({})",
            self.area, self.target, self.message, self.reason
        )
    }
}

/// A fact worth telling that is not a change: a restart waiting, a partition left alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Notice {
    pub area: Area,
    pub target: String,
    pub reason: Reason,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AreaPlan {
    pub area: Area,
    pub changes: Vec<Change>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<PlanError>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notices: Vec<Notice>,
    /// Set when this front does not reconcile the area (and why); never silent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
}

impl AreaPlan {
    pub fn new(area: Area) -> Self {
        AreaPlan {
            area,
            changes: Vec::new(),
            errors: Vec::new(),
            notices: Vec::new(),
            skipped: None,
        }
    }
    pub(crate) fn skipped(area: Area, why: impl Into<String>) -> Self {
        AreaPlan {
            skipped: Some(why.into()),
            ..AreaPlan::new(area)
        }
    }
    pub(crate) fn error(
        &mut self,
        target: impl Into<String>,
        reason: Reason,
        message: impl Into<String>,
    ) {
        self.errors.push(PlanError {
            area: self.area,
            target: target.into(),
            reason,
            message: message.into(),
        });
    }
    /// Turns the changes to tables the connecting role may not alter into one
    /// `InsufficientPrivilege` error per table, before anything runs: PostgreSQL lets only
    /// a table's owner (or a member of the owner role) alter it, and finding out half-way
    /// through an apply would leave earlier areas committed.
    pub(crate) fn refuse_unowned(&mut self, not_owned: impl Fn(&str) -> bool) {
        let mut refused = std::collections::BTreeSet::new();
        self.changes.retain(|c| {
            let keep = !not_owned(&c.target);
            if !keep {
                refused.insert(c.target.clone());
            }
            keep
        });
        for target in refused {
            self.error(
                &target,
                Reason::InsufficientPrivilege,
                format!("the connecting role does not own {target}: only its owner (or a member of the owner role) may change it; GRANT the owner role to the connecting role, or connect as the owner"),
            );
        }
    }
    pub(crate) fn notice(
        &mut self,
        target: impl Into<String>,
        reason: Reason,
        message: impl Into<String>,
    ) {
        self.notices.push(Notice {
            area: self.area,
            target: target.into(),
            reason,
            message: message.into(),
        });
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    pub areas: Vec<AreaPlan>,
}

impl Plan {
    pub fn changes(&self) -> impl Iterator<Item = &Change> {
        self.areas.iter().flat_map(|a| a.changes.iter())
    }
    pub fn errors(&self) -> impl Iterator<Item = &PlanError> {
        self.areas.iter().flat_map(|a| a.errors.iter())
    }
    pub(crate) fn notices(&self) -> impl Iterator<Item = &Notice> {
        self.areas.iter().flat_map(|a| a.notices.iter())
    }
    pub(crate) fn skipped(&self) -> impl Iterator<Item = (Area, &str)> {
        self.areas
            .iter()
            .filter_map(|a| a.skipped.as_deref().map(|why| (a.area, why)))
    }
    pub fn is_empty(&self) -> bool {
        self.changes().next().is_none()
    }
    pub fn has_errors(&self) -> bool {
        self.errors().next().is_some()
    }
    pub(crate) fn area(&self, area: Area) -> Option<&AreaPlan> {
        self.areas.iter().find(|a| a.area == area)
    }
    pub(crate) fn count_by_hazard(&self, hazard: Hazard) -> usize {
        self.changes().filter(|c| c.hazard == hazard).count()
    }

    /// The plan as an annotated SQL script.
    pub fn render_sql(&self) -> String {
        let mut out = String::new();
        for area in &self.areas {
            if area.changes.is_empty() {
                continue;
            }
            let _ = writeln!(out, "-- area: {}", area.area);
            for c in &area.changes {
                let restart = if c.requires_restart {
                    ", needs restart"
                } else {
                    ""
                };
                // After the summary, so `-- [hazard] target: summary` stays greppable.
                let mut takes = Vec::new();
                if c.lock != LockLevel::None {
                    takes.push(format!("lock {}", c.lock.as_sql()));
                }
                if let Some(t) = c.timeout {
                    // Says why a DETACH or a view's fill runs under `indexBuildTimeout`.
                    takes.push(format!("long-operation timeout safety.{}", t.as_str()));
                }
                let takes = if takes.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", takes.join(", "))
                };
                let _ = writeln!(
                    out,
                    "-- [{}{restart}] {}: {}{takes}",
                    c.hazard.as_str(),
                    c.target,
                    c.summary
                );
                let _ = writeln!(out, "{};", c.sql.trim_end_matches(';'));
            }
            out.push('\n');
        }
        out
    }

    /// The bounded summary that goes into status.
    pub fn summary(&self) -> PendingPlanSummary {
        let mut by_area = BTreeMap::new();
        for c in self.changes() {
            *by_area.entry(c.area.as_str().to_string()).or_insert(0u32) += 1;
        }
        let total = self.changes().count();
        PendingPlanSummary {
            total: total as u32,
            destructive: self.count_by_hazard(Hazard::Destructive) as u32,
            by_area,
            changes: self
                .changes()
                .take(MAX_PENDING_IN_STATUS)
                .map(|c| PendingChange {
                    area: c.area.as_str().into(),
                    target: c.target.clone(),
                    hazard: c.hazard.as_str().into(),
                    lock: (c.lock != LockLevel::None).then(|| c.lock.as_sql().into()),
                    summary: truncate(&c.summary, 200),
                    sql: (!c.sql.is_empty() && c.sql.len() <= MAX_SQL_IN_STATUS)
                        .then(|| c.sql.clone()),
                })
                .collect(),
            truncated: total > MAX_PENDING_IN_STATUS,
        }
    }
}

/// Longer statements (a huge partition list, a long policy expression) are left out of
/// status rather than cut: a cut statement must never look runnable.
const MAX_SQL_IN_STATUS: usize = 2000;

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan_with(n: usize) -> Plan {
        let mut a = AreaPlan::new(Area::FeatureFlags);
        for i in 0..n {
            let hazard = if i % 2 == 0 {
                Hazard::Safe
            } else {
                Hazard::Destructive
            };
            a.changes.push(
                Change::new(Area::FeatureFlags, format!("f{i}"), "upsert", "SELECT 1")
                    .hazard(hazard),
            );
        }
        Plan { areas: vec![a] }
    }

    #[test]
    fn summary_is_bounded_but_counts_everything() {
        let s = plan_with(120).summary();
        assert_eq!(s.total, 120);
        assert_eq!(s.destructive, 60);
        assert_eq!(s.by_area["featureFlags"], 120);
        assert_eq!(s.changes.len(), MAX_PENDING_IN_STATUS);
        assert!(s.truncated);
        assert!(s.changes.iter().all(|c| c.sql.is_some()));
        let mut p = Plan::default();
        let mut a = AreaPlan::new(Area::FeatureFlags);
        a.changes.push(Change::new(
            Area::FeatureFlags,
            "long",
            "s",
            "x".repeat(2001),
        ));
        a.changes
            .push(Change::new(Area::FeatureFlags, "k8s", "create CronJob", ""));
        p.areas.push(a);
        let s = p.summary();
        assert_eq!(s.changes[0].sql, None);
        assert_eq!(s.changes[1].sql, None);
    }

    #[test]
    fn renders_sql_with_area_and_hazard() {
        let sql = plan_with(2).render_sql();
        assert!(sql.contains("-- area: featureFlags"));
        assert!(sql.contains("-- [safe] f0: upsert\nSELECT 1;"));
        assert!(sql.contains("-- [destructive] f1"));
    }

    #[test]
    fn lock_and_own_timeout_show_in_sql_json_and_status() {
        let mut a = AreaPlan::new(Area::Indexes);
        a.changes.push(
            Change::new(
                Area::Indexes,
                "public.t_a",
                "create index",
                "CREATE INDEX …",
            )
            .autonomous()
            .lock(LockLevel::ShareUpdateExclusive)
            .own_timeout(OwnTimeout::LongOperation),
        );
        a.changes.push(Change::new(
            Area::Indexes,
            "public.t_a",
            "adopt",
            "SELECT 1",
        ));
        let p = Plan { areas: vec![a] };
        let sql = p.render_sql();
        assert!(
            sql.contains("-- [safe] public.t_a: create index (lock SHARE UPDATE EXCLUSIVE, long-operation timeout safety.indexBuildTimeout)\nCREATE INDEX …;"),
            "{sql}"
        );
        assert!(
            sql.contains("-- [safe] public.t_a: adopt\nSELECT 1;"),
            "{sql}"
        );
        let json = serde_json::to_value(&p).unwrap();
        let c = &json["areas"][0]["changes"];
        assert_eq!(c[0]["lock"], "shareUpdateExclusive");
        assert_eq!(c[0]["timeout"], "longOperation");
        assert_eq!(c[1]["lock"], "none");
        assert!(c[1].get("timeout").is_none());
        let s = p.summary();
        assert_eq!(s.changes[0].lock.as_deref(), Some("SHARE UPDATE EXCLUSIVE"));
        assert_eq!(s.changes[1].lock, None);
    }

    #[test]
    fn lock_levels_are_ordered_by_strength() {
        assert!(LockLevel::None < LockLevel::AccessShare);
        assert!(LockLevel::ShareUpdateExclusive < LockLevel::Share);
        assert!(LockLevel::Exclusive < LockLevel::AccessExclusive);
    }

    #[test]
    fn truncates_on_char_boundary() {
        assert_eq!(truncate("ééé", 3), "é…");
    }

    #[test]
    fn areas_are_ordered_settings_first() {
        let mut v = Area::ALL.to_vec();
        v.sort();
        assert_eq!(v, Area::ALL.to_vec());
        assert_eq!(v[0], Area::ServerSettings);
    }
}
