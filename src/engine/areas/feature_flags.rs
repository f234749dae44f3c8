//! Feature flags: a table of flags the policy owns row by row (upserted when listed,
//! deleted when not), created with `feature_enabled(flag, subject)`, which buckets each
//! subject deterministically by hash so a 25% roll-out always picks the same 25% and a
//! larger percentage keeps everyone the smaller one had.

use std::collections::BTreeMap;

use sqlx::PgConnection;

use crate::api::{FeatureFlag, FeatureFlagsSpec, DEFAULT_SCHEMA};
use crate::engine::areas::{AreaModule, ObserveContext, ObserveError, PlanContext};
use crate::engine::ledger::Ledger;
use crate::engine::plan::{Area, AreaPlan, Change, LedgerOp, LockLevel};
use crate::pg::{quote_ident, quote_literal, QualifiedName};
use crate::reason::Reason;

const AREA: Area = Area::FeatureFlags;
pub(crate) const DEFAULT_TABLE: &str = "feature_flags";
pub(crate) const FUNCTION: &str = "feature_enabled";
/// Ledger item under the flags table's name: the policy that manages its rows. Two
/// policies sharing one flags table would delete each other's flags on every run.
pub(crate) const OWNED_TABLE: &str = "table";

pub(crate) fn table_name(spec: &FeatureFlagsSpec) -> QualifiedName {
    QualifiedName::new(
        spec.schema.as_deref().unwrap_or(DEFAULT_SCHEMA),
        spec.table.as_deref().unwrap_or(DEFAULT_TABLE),
    )
}

/// One flag as stored.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct FlagRow {
    pub name: String,
    pub enabled: bool,
    pub rollout_percentage: i32,
    pub description: Option<String>,
}

impl From<&FeatureFlag> for FlagRow {
    fn from(f: &FeatureFlag) -> Self {
        FlagRow {
            name: f.name.clone(),
            enabled: f.enabled,
            rollout_percentage: i32::from(f.rollout_percentage.unwrap_or(100)),
            description: f.description.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Observed {
    pub schema_exists: bool,
    pub table_exists: bool,
    /// Body (`prosrc`) of `feature_enabled(text, text)`, if it exists.
    pub function_body: Option<String>,
    pub rows: BTreeMap<String, FlagRow>,
    /// Set when a table of that name exists but is not a flags table.
    pub incompatible: Option<String>,
    /// Owners of the table and of `feature_enabled(text, text)`, where they exist.
    pub table_owner: Option<String>,
    pub function_owner: Option<String>,
    /// `spec.owner` names an existing role.
    pub owner_exists: bool,
}

pub(crate) async fn observe(
    conn: &mut PgConnection,
    spec: &FeatureFlagsSpec,
) -> Result<Observed, sqlx::Error> {
    let table = table_name(spec);
    type Row = (
        bool,
        bool,
        Option<String>,
        Option<String>,
        Option<String>,
        bool,
    );
    let (schema_exists, table_exists, function_body, table_owner, function_owner, owner_exists): Row =
        sqlx::query_as(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1),
                EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                        WHERE n.nspname = $1 AND c.relname = $2),
                (SELECT p.prosrc FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                 WHERE n.nspname = $1 AND p.proname = $3 AND p.proargtypes = '25 25'::oidvector),
                (SELECT pg_get_userbyid(c.relowner)::text FROM pg_class c
                 JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = $2),
                (SELECT pg_get_userbyid(p.proowner)::text FROM pg_proc p
                 JOIN pg_namespace n ON n.oid = p.pronamespace
                 WHERE n.nspname = $1 AND p.proname = $3 AND p.proargtypes = '25 25'::oidvector),
                EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $4)",
        )
        .bind(&table.schema)
        .bind(&table.name)
        .bind(FUNCTION)
        .bind(spec.owner.as_deref().unwrap_or(""))
        .fetch_one(&mut *conn)
        .await?;
    let mut observed = Observed {
        schema_exists,
        table_exists,
        function_body,
        table_owner,
        function_owner,
        owner_exists,
        ..Default::default()
    };
    if table_exists {
        // The table name comes from the spec; it is quoted like every identifier.
        let sql = format!(
            "SELECT name, enabled, rollout_percentage, description FROM {}",
            table.quoted()
        );
        match sqlx::query_as::<_, FlagRow>(&sql)
            .fetch_all(&mut *conn)
            .await
        {
            Ok(rows) => observed.rows = rows.into_iter().map(|r| (r.name.clone(), r)).collect(),
            Err(e)
                if matches!(
                    crate::pg::sqlstate(&e).as_deref(),
                    Some("42703") | Some("42804")
                ) =>
            {
                observed.incompatible = Some(crate::pg::error_summary(&e))
            }
            Err(e) => return Err(e),
        }
    }
    Ok(observed)
}

pub(crate) fn create_table_sql(table: &QualifiedName) -> String {
    format!(
        "CREATE TABLE {} (
    name text PRIMARY KEY,
    enabled boolean NOT NULL DEFAULT false,
    rollout_percentage integer NOT NULL DEFAULT 100 CHECK (rollout_percentage BETWEEN 0 AND 100),
    description text,
    updated_at timestamptz NOT NULL DEFAULT now()
)",
        table.quoted()
    )
}

/// The body of `feature_enabled`. A subject's bucket (0-99) is a hash of flag and subject,
/// so buckets differ between flags (no user is first in every roll-out) and never move.
/// `hashtextextended` is the hash PostgreSQL itself relies on staying stable for hash
/// partitioning, so buckets survive upgrades.
pub(crate) fn function_body(table: &QualifiedName) -> String {
    format!(
        "
SELECT coalesce((
    SELECT f.enabled AND (
        f.rollout_percentage >= 100
        OR (subject IS NOT NULL
            AND ((pg_catalog.hashtextextended(f.name || '/' || subject, 0) & 9223372036854775807) % 100) < f.rollout_percentage))
    FROM {} f
    WHERE f.name = flag), false)
",
        table.quoted()
    )
}

/// SECURITY DEFINER so application roles and RLS policies can ask about a flag without
/// reading the table; the fixed search_path keeps that safe. The body is an ordinary
/// quoted literal: no dollar-quote tag that a table name could end early.
pub(crate) fn create_function_sql(table: &QualifiedName) -> String {
    format!(
        "CREATE OR REPLACE FUNCTION {}.{}(flag text, subject text) RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS {}",
        quote_ident(&table.schema),
        quote_ident(FUNCTION),
        quote_literal(&function_body(table))
    )
}

#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    CreateTable,
    ReplaceFunction,
    /// Hand the table to `spec.owner`.
    SetTableOwner(String),
    /// Hand `feature_enabled()` to `spec.owner`: a SECURITY DEFINER function runs with its
    /// owner's rights, which should be no more than reading the flags table.
    SetFunctionOwner(String),
    Upsert(FlagRow),
    Delete(String),
}

pub(crate) fn diff(spec: &FeatureFlagsSpec, observed: &Observed, plan: &mut AreaPlan) -> Vec<Op> {
    let table = table_name(spec);
    if !observed.schema_exists {
        plan.error(
            table.to_string(),
            Reason::SchemaNotFound,
            format!("schema {} does not exist", table.schema),
        );
        return Vec::new();
    }
    if let Some(why) = &observed.incompatible {
        plan.error(
            table.to_string(),
            Reason::IncompatibleFlagsTable,
            format!("{table} exists but is not a flags table: {why}"),
        );
        return Vec::new();
    }
    let mut ops = Vec::new();
    if !observed.table_exists {
        ops.push(Op::CreateTable);
    }
    if observed.function_body.as_deref() != Some(function_body(&table).as_str()) {
        ops.push(Op::ReplaceFunction);
    }
    if let Some(owner) = &spec.owner {
        if !observed.owner_exists {
            plan.error(
                table.to_string(),
                Reason::RoleNotFound,
                format!("featureFlags.owner {owner:?} does not exist; dbpolicy does not create roles: create it first (CREATE ROLE), then reconcile again"),
            );
            return Vec::new();
        }
        if observed.table_owner.as_ref() != Some(owner) {
            ops.push(Op::SetTableOwner(owner.clone()));
        }
        if observed.function_owner.as_ref() != Some(owner) {
            ops.push(Op::SetFunctionOwner(owner.clone()));
        }
    }
    for flag in &spec.flags {
        let want = FlagRow::from(flag);
        if observed.rows.get(&flag.name) != Some(&want) {
            ops.push(Op::Upsert(want));
        }
    }
    // A set, not a scan of the spec per stored row: that was quadratic (40 s at 100k flags).
    let listed: std::collections::HashSet<&str> =
        spec.flags.iter().map(|f| f.name.as_str()).collect();
    for name in observed.rows.keys() {
        if !listed.contains(name.as_str()) {
            ops.push(Op::Delete(name.clone()));
        }
    }
    ops
}

/// Lock levels: CREATE TABLE and CREATE OR REPLACE FUNCTION lock nothing anyone waits on
/// (the table is new; a function takes no relation lock); ALTER TABLE OWNER TO takes
/// ACCESS EXCLUSIVE (ALTER TABLE: forms not listed otherwise do); rows are written under
/// ROW EXCLUSIVE.
pub(crate) fn render(table: &QualifiedName, op: &Op) -> Change {
    match op {
        Op::CreateTable => Change::new(AREA, table.to_string(), "create the flags table", create_table_sql(table)),
        Op::ReplaceFunction => Change::new(
            AREA,
            format!("{}.{FUNCTION}", table.schema),
            "create or replace feature_enabled(flag, subject)",
            create_function_sql(table),
        ),
        Op::SetTableOwner(owner) => Change::new(
            AREA,
            table.to_string(),
            format!("hand the flags table to {owner}"),
            format!("ALTER TABLE {} OWNER TO {}", table.quoted(), quote_ident(owner)),
        )
        .lock(LockLevel::AccessExclusive),
        Op::SetFunctionOwner(owner) => Change::new(
            AREA,
            format!("{}.{FUNCTION}", table.schema),
            format!("hand feature_enabled(flag, subject) to {owner}"),
            format!(
                "ALTER FUNCTION {}.{}(text, text) OWNER TO {}",
                quote_ident(&table.schema),
                quote_ident(FUNCTION),
                quote_ident(owner)
            ),
        ),
        Op::Upsert(row) => Change::new(
            AREA,
            &row.name,
            format!("upsert flag {} (enabled={}, rollout={}%)", row.name, row.enabled, row.rollout_percentage),
            format!(
                "INSERT INTO {} (name, enabled, rollout_percentage, description) VALUES ({}, {}, {}, {})
ON CONFLICT (name) DO UPDATE SET enabled = EXCLUDED.enabled, rollout_percentage = EXCLUDED.rollout_percentage,
    description = EXCLUDED.description, updated_at = now()",
                table.quoted(),
                quote_literal(&row.name),
                row.enabled,
                row.rollout_percentage,
                row.description.as_deref().map(quote_literal).unwrap_or_else(|| "NULL".into())
            ),
        )
        .lock(LockLevel::RowExclusive),
        // The policy owns the rows of its flags table: a flag no longer listed is removed,
        // as its definition in Git was.
        Op::Delete(name) => Change::new(
            AREA,
            name,
            format!("delete flag {name} (no longer in the spec)"),
            format!("DELETE FROM {} WHERE name = {}", table.quoted(), quote_literal(name)),
        )
        .lock(LockLevel::RowExclusive),
    }
}

pub(crate) fn plan(spec: &FeatureFlagsSpec, observed: &Observed, ledger: &Ledger) -> AreaPlan {
    let mut plan = AreaPlan::new(AREA);
    let table = table_name(spec);
    let target = table.to_string();
    if let Some(owner) = ledger.owned_by_other(AREA, &target, OWNED_TABLE) {
        plan.error(
            &target,
            Reason::OwnershipConflict,
            format!("the flags table {target} is managed by policy {owner}: give this policy its own featureFlags.table"),
        );
        return plan;
    }
    let ops = diff(spec, observed, &mut plan);
    plan.changes = ops.iter().map(|op| render(&table, op)).collect();
    // The first change claims the table, in the same transaction as the change.
    if let Some(first) = plan.changes.first_mut() {
        if !ledger.contains(AREA, &target, OWNED_TABLE) {
            first.ledger.push(LedgerOp::Record {
                area: AREA,
                target,
                item: OWNED_TABLE.into(),
            });
        }
    }
    plan
}

pub(crate) fn simulate(spec: &FeatureFlagsSpec, observed: &Observed, ops: &[Op]) -> Observed {
    let mut next = observed.clone();
    for op in ops {
        match op {
            Op::CreateTable => {
                next.table_exists = true;
                next.table_owner = Some("operator".into());
            }
            Op::SetTableOwner(o) => next.table_owner = Some(o.clone()),
            Op::SetFunctionOwner(o) => next.function_owner = Some(o.clone()),
            Op::ReplaceFunction => {
                next.function_body = Some(function_body(&table_name(spec)));
                next.function_owner.get_or_insert_with(|| "operator".into());
            }
            Op::Upsert(row) => {
                next.rows.insert(row.name.clone(), row.clone());
            }
            Op::Delete(name) => {
                next.rows.remove(name);
            }
        }
    }
    next
}

/// Feature flags: a table of flags and the function that reads it.
pub struct FeatureFlags;

impl AreaModule for FeatureFlags {
    const AREA: Area = AREA;
    type Spec = FeatureFlagsSpec;
    type Observed = Observed;
    type Op = Op;

    fn section(spec: &crate::api::DatabasePolicySpec) -> Option<&FeatureFlagsSpec> {
        spec.feature_flags.as_ref()
    }

    async fn observe(
        conn: &mut PgConnection,
        section: &FeatureFlagsSpec,
        _ctx: ObserveContext<'_>,
    ) -> Result<Observed, ObserveError> {
        Ok(observe(conn, section).await?)
    }

    fn diff(
        section: &FeatureFlagsSpec,
        observed: &Observed,
        _ctx: &PlanContext<'_>,
        plan: &mut AreaPlan,
    ) -> Vec<Op> {
        diff(section, observed, plan)
    }

    fn render(section: &FeatureFlagsSpec, op: &Op) -> Vec<Change> {
        vec![render(&table_name(section), op)]
    }

    fn simulate(section: &FeatureFlagsSpec, observed: &Observed, ops: &[Op]) -> Observed {
        simulate(section, observed, ops)
    }

    /// Refused when another policy owns the table; the first change claims it.
    fn plan(
        section: &FeatureFlagsSpec,
        observed: &Observed,
        ctx: &mut PlanContext<'_>,
    ) -> AreaPlan {
        plan(section, observed, ctx.ledger)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn flag(name: &str, enabled: bool, pct: Option<u8>) -> FeatureFlag {
        FeatureFlag {
            name: name.into(),
            enabled,
            rollout_percentage: pct,
            description: None,
        }
    }

    fn existing(rows: &[FlagRow]) -> Observed {
        let spec = FeatureFlagsSpec::default();
        Observed {
            schema_exists: true,
            table_exists: true,
            function_body: Some(function_body(&table_name(&spec))),
            rows: rows.iter().map(|r| (r.name.clone(), r.clone())).collect(),
            incompatible: None,
            ..Default::default()
        }
    }

    #[test]
    fn from_empty_creates_table_function_and_rows() {
        let spec = FeatureFlagsSpec {
            flags: vec![flag("new_quiz", true, Some(25))],
            ..Default::default()
        };
        let p = plan(
            &spec,
            &Observed {
                schema_exists: true,
                ..Default::default()
            },
            &Ledger::default(),
        );
        let summaries: Vec<&str> = p.changes.iter().map(|c| c.summary.as_str()).collect();
        assert_eq!(
            summaries,
            vec![
                "create the flags table",
                "create or replace feature_enabled(flag, subject)",
                "upsert flag new_quiz (enabled=true, rollout=25%)"
            ]
        );
        assert!(p.changes[0]
            .sql
            .starts_with(r#"CREATE TABLE "public"."feature_flags""#));
        // A new table and a function lock nothing anyone waits on; rows, ROW EXCLUSIVE.
        let locks: Vec<LockLevel> = p.changes.iter().map(|c| c.lock).collect();
        assert_eq!(
            locks,
            [LockLevel::None, LockLevel::None, LockLevel::RowExclusive]
        );
    }

    #[test]
    fn handing_the_table_over_takes_access_exclusive() {
        let t = QualifiedName::new("public", "feature_flags");
        let lock = |op: &Op| render(&t, op).lock;
        assert_eq!(
            lock(&Op::SetTableOwner("app".into())),
            LockLevel::AccessExclusive
        );
        assert_eq!(lock(&Op::SetFunctionOwner("app".into())), LockLevel::None);
        assert_eq!(lock(&Op::Delete("x".into())), LockLevel::RowExclusive);
    }

    #[test]
    fn unchanged_flags_are_no_change_and_others_are_deleted() {
        let spec = FeatureFlagsSpec {
            flags: vec![flag("a", true, None)],
            ..Default::default()
        };
        let rows = [
            FlagRow::from(&flag("a", true, Some(100))),
            FlagRow::from(&flag("old", false, None)),
        ];
        let p = plan(&spec, &existing(&rows), &Ledger::default());
        assert_eq!(p.changes.len(), 1);
        assert_eq!(
            p.changes[0].sql,
            r#"DELETE FROM "public"."feature_flags" WHERE name = 'old'"#
        );
    }

    #[test]
    fn changed_flag_is_upserted_with_quoted_values() {
        let mut f = flag("a", false, Some(10));
        f.description = Some("it's new".into());
        let spec = FeatureFlagsSpec {
            flags: vec![f],
            ..Default::default()
        };
        let p = plan(
            &spec,
            &existing(&[FlagRow::from(&flag("a", true, Some(10)))]),
            &Ledger::default(),
        );
        assert!(p.changes[0]
            .sql
            .contains("VALUES ('a', false, 10, 'it''s new')"));
    }

    #[test]
    fn missing_schema_and_foreign_table_are_errors() {
        let spec = FeatureFlagsSpec {
            schema: Some("nope".into()),
            ..Default::default()
        };
        assert_eq!(
            plan(&spec, &Observed::default(), &Ledger::default()).errors[0].reason,
            Reason::SchemaNotFound
        );
        let o = Observed {
            incompatible: Some("column \"enabled\" does not exist".into()),
            ..existing(&[])
        };
        assert_eq!(
            plan(&FeatureFlagsSpec::default(), &o, &Ledger::default()).errors[0].reason,
            Reason::IncompatibleFlagsTable
        );
    }

    #[test]
    fn an_outdated_function_is_replaced() {
        let o = Observed {
            function_body: Some("SELECT true".into()),
            ..existing(&[])
        };
        assert_eq!(
            plan(&FeatureFlagsSpec::default(), &o, &Ledger::default()).changes[0].summary,
            "create or replace feature_enabled(flag, subject)"
        );
    }

    #[test]
    fn the_first_change_claims_the_table_and_another_policy_is_refused() {
        let spec = FeatureFlagsSpec {
            flags: vec![flag("a", true, None)],
            ..Default::default()
        };
        let mut ledger = Ledger::for_policy("ns/a");
        let p = plan(&spec, &existing(&[]), &ledger);
        let claim = LedgerOp::Record {
            area: AREA,
            target: "public.feature_flags".into(),
            item: OWNED_TABLE.into(),
        };
        assert_eq!(p.changes[0].ledger, vec![claim]);
        ledger.apply_ops(&p.changes[0].ledger);
        let again = plan(
            &FeatureFlagsSpec::default(),
            &existing(&[FlagRow::from(&flag("a", true, None))]),
            &ledger,
        );
        assert!(again.changes[0].ledger.is_empty(), "claimed once");

        let mut other = Ledger::for_policy("ns/b");
        other.insert(AREA, "public.feature_flags", OWNED_TABLE, "ns/a");
        let refused = plan(&spec, &existing(&[]), &other);
        assert!(refused.changes.is_empty());
        assert_eq!(refused.errors[0].reason, Reason::OwnershipConflict);
        assert!(refused.errors[0].message.contains("ns/a"));
    }

    proptest! {
        #[test]
        fn applying_a_plan_converges(
            desired in prop::collection::btree_map("[a-c]", (prop::bool::ANY, prop::option::of(0u8..=100)), 0..3),
            current in prop::collection::btree_map("[a-d]", (prop::bool::ANY, 0i32..=100), 0..4),
            table_exists in prop::bool::ANY,
        ) {
            let spec = FeatureFlagsSpec { flags: desired.iter().map(|(n, (e, p))| flag(n, *e, *p)).collect(), ..Default::default() };
            let mut o = existing(&current.iter().map(|(n, (e, p))| FlagRow { name: n.clone(), enabled: *e, rollout_percentage: *p, description: None }).collect::<Vec<_>>());
            if !table_exists { o.table_exists = false; o.rows.clear(); o.function_body = None; }
            crate::engine::areas::convergence::converges::<FeatureFlags>(&spec, &o, &Ledger::default(), |_, _| Ok(()))?;
        }
    }
}
