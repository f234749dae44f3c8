//! A plan is data: ordered changes, each with its area, target, SQL and hazard. It prints
//! as SQL for people, serialises to JSON for machines and to a bounded summary for status.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::api::{PendingChange, PendingPlanSummary, MAX_PENDING_IN_STATUS};

/// The areas of a policy, in the order the executor applies them: settings first (they
/// may matter to what follows), then structure (partitions, views, then the indexes that
/// may sit on those views) before the policies that read it, data last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Area {
    ServerSettings,
    Autovacuum,
    Partitions,
    MaterializedViews,
    Indexes,
    RowLevelSecurity,
    FeatureFlags,
    Replicas,
    Backups,
}

impl Area {
    pub const ALL: [Area; 9] = [
        Area::ServerSettings,
        Area::Autovacuum,
        Area::Partitions,
        Area::MaterializedViews,
        Area::Indexes,
        Area::RowLevelSecurity,
        Area::FeatureFlags,
        Area::Replicas,
        Area::Backups,
    ];

    /// The spec field of the area.
    pub fn as_str(self) -> &'static str {
        match self {
            Area::ServerSettings => "serverSettings",
            Area::Autovacuum => "autovacuum",
            Area::Partitions => "partitions",
            Area::Indexes => "indexes",
            Area::MaterializedViews => "materializedViews",
            Area::RowLevelSecurity => "rowLevelSecurity",
            Area::FeatureFlags => "featureFlags",
            Area::Replicas => "replicas",
            Area::Backups => "backups",
        }
    }

    /// The area's condition type in status.
    pub fn condition_type(self) -> &'static str {
        match self {
            Area::ServerSettings => "ServerSettingsReady",
            Area::Autovacuum => "AutovacuumReady",
            Area::Partitions => "PartitionsReady",
            Area::Indexes => "IndexesReady",
            Area::MaterializedViews => "MaterializedViewsReady",
            Area::RowLevelSecurity => "RowLevelSecurityReady",
            Area::FeatureFlags => "FeatureFlagsReady",
            Area::Replicas => "ReplicasReady",
            Area::Backups => "BackupsReady",
        }
    }
}

impl std::fmt::Display for Area {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

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
    pub fn as_str(self) -> &'static str {
        match self {
            Hazard::Safe => "safe",
            Hazard::Locking => "locking",
            Hazard::Server => "server",
            Hazard::Destructive => "destructive",
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
    pub fn cache(mut self, row: Option<super::normcache::Record>) -> Self {
        self.cache.extend(row);
        self
    }
    pub fn bundle(mut self, key: impl Into<String>) -> Self {
        self.bundle = Some(key.into());
        self
    }
    pub fn hazard(mut self, hazard: Hazard) -> Self {
        self.hazard = hazard;
        self
    }
    pub fn autonomous(mut self) -> Self {
        self.transactional = false;
        self
    }
    /// Puts the change in a transaction group of its area (see [`Change::group`]).
    pub fn in_group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }
    /// Asks the executor to report the rows the statement affected.
    pub fn reports_rows(mut self) -> Self {
        self.reports_rows = true;
        self
    }
    pub fn restart(mut self, requires_restart: bool) -> Self {
        self.requires_restart = requires_restart;
        self
    }
    pub fn record(mut self, item: impl Into<String>) -> Self {
        self.ledger.push(LedgerOp::Record {
            area: self.area,
            target: self.target.clone(),
            item: item.into(),
        });
        self
    }
    pub fn forget(mut self, item: impl Into<String>) -> Self {
        self.ledger.push(LedgerOp::Forget {
            area: self.area,
            target: self.target.clone(),
            item: item.into(),
        });
        self
    }
    /// Records ownership under a ledger target other than the change's own.
    pub fn record_under(mut self, target: impl Into<String>, item: impl Into<String>) -> Self {
        self.ledger.push(LedgerOp::Record {
            area: self.area,
            target: target.into(),
            item: item.into(),
        });
        self
    }
    /// Declares, before the change runs, that it builds `target` (see [`LedgerOp::Intend`]).
    pub fn intend_under(mut self, target: impl Into<String>, item: impl Into<String>) -> Self {
        self.ledger.push(LedgerOp::Intend {
            area: self.area,
            target: target.into(),
            item: item.into(),
        });
        self
    }
    pub fn forget_under(mut self, target: impl Into<String>, item: impl Into<String>) -> Self {
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
    /// CamelCase, for conditions: `TableNotFound`, `UnknownSetting`, `InvalidValue`, …
    pub reason: String,
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
    pub reason: String,
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
    pub fn skipped(area: Area, why: impl Into<String>) -> Self {
        AreaPlan {
            skipped: Some(why.into()),
            ..AreaPlan::new(area)
        }
    }
    pub fn error(&mut self, target: impl Into<String>, reason: &str, message: impl Into<String>) {
        self.errors.push(PlanError {
            area: self.area,
            target: target.into(),
            reason: reason.into(),
            message: message.into(),
        });
    }
    /// Turns the changes to tables the connecting role may not alter into one
    /// `InsufficientPrivilege` error per table, before anything runs: PostgreSQL lets only
    /// a table's owner (or a member of the owner role) alter it, and finding out half-way
    /// through an apply would leave earlier areas committed.
    pub fn refuse_unowned(&mut self, not_owned: impl Fn(&str) -> bool) {
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
                "InsufficientPrivilege",
                format!("the connecting role does not own {target}: only its owner (or a member of the owner role) may change it; GRANT the owner role to the connecting role, or connect as the owner"),
            );
        }
    }
    pub fn notice(&mut self, target: impl Into<String>, reason: &str, message: impl Into<String>) {
        self.notices.push(Notice {
            area: self.area,
            target: target.into(),
            reason: reason.into(),
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
    pub fn notices(&self) -> impl Iterator<Item = &Notice> {
        self.areas.iter().flat_map(|a| a.notices.iter())
    }
    pub fn skipped(&self) -> impl Iterator<Item = (Area, &str)> {
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
    pub fn area(&self, area: Area) -> Option<&AreaPlan> {
        self.areas.iter().find(|a| a.area == area)
    }
    pub fn count_by_hazard(&self, hazard: Hazard) -> usize {
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
                let _ = writeln!(
                    out,
                    "-- [{}{restart}] {}: {}",
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
