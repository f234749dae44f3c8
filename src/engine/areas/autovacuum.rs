//! Autovacuum: per-table storage parameters (`ALTER TABLE … SET/RESET (autovacuum_…)`).
//! Parameters this policy set and no longer lists are reset; parameters set by others are
//! left alone. Observed with one catalog query for all tables.

use std::collections::{BTreeMap, BTreeSet};

use sqlx::PgConnection;

use crate::api::{AutovacuumSpec, AutovacuumTable, DatabasePolicySpec, TableTarget};
use crate::engine::areas::{AreaModule, ObserveContext, ObserveError, PlanContext};
use crate::engine::ledger::Ledger;
use crate::engine::plan::{Area, AreaPlan, Change, Hazard, LockLevel};
use crate::pg::QualifiedName;
use crate::reason::Reason;

const AREA: Area = Area::Autovacuum;

/// The storage parameters of one table that this area manages, rendered as PostgreSQL
/// stores them. Destructured without `..` so a new spec field cannot be forgotten.
pub(crate) fn desired_options(t: &AutovacuumTable) -> BTreeMap<&'static str, String> {
    let AutovacuumTable {
        schema: _,
        table: _,
        enabled,
        vacuum_scale_factor,
        vacuum_threshold,
        vacuum_insert_scale_factor,
        vacuum_insert_threshold,
        analyze_scale_factor,
        analyze_threshold,
        vacuum_cost_delay,
        vacuum_cost_limit,
        freeze_min_age,
        freeze_max_age,
        freeze_table_age,
    } = t;
    let mut m = BTreeMap::new();
    let mut put = |k: &'static str, v: Option<String>| {
        if let Some(v) = v {
            m.insert(k, v);
        }
    };
    put("autovacuum_enabled", enabled.map(|b| b.to_string()));
    put(
        "autovacuum_vacuum_scale_factor",
        vacuum_scale_factor.map(|f| f.to_string()),
    );
    put(
        "autovacuum_vacuum_threshold",
        vacuum_threshold.map(|i| i.to_string()),
    );
    put(
        "autovacuum_vacuum_insert_scale_factor",
        vacuum_insert_scale_factor.map(|f| f.to_string()),
    );
    put(
        "autovacuum_vacuum_insert_threshold",
        vacuum_insert_threshold.map(|i| i.to_string()),
    );
    put(
        "autovacuum_analyze_scale_factor",
        analyze_scale_factor.map(|f| f.to_string()),
    );
    put(
        "autovacuum_analyze_threshold",
        analyze_threshold.map(|i| i.to_string()),
    );
    put(
        "autovacuum_vacuum_cost_delay",
        vacuum_cost_delay.map(|f| f.to_string()),
    );
    put(
        "autovacuum_vacuum_cost_limit",
        vacuum_cost_limit.map(|i| i.to_string()),
    );
    put(
        "autovacuum_freeze_min_age",
        freeze_min_age.map(|i| i.to_string()),
    );
    put(
        "autovacuum_freeze_max_age",
        freeze_max_age.map(|i| i.to_string()),
    );
    put(
        "autovacuum_freeze_table_age",
        freeze_table_age.map(|i| i.to_string()),
    );
    m
}

/// One table as the catalog shows it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TableState {
    /// `pg_class.relkind`: r (table), p (partitioned), m (materialized view), …
    pub relkind: String,
    pub options: BTreeMap<String, String>,
    /// The connecting role neither owns the table nor is a member of its owner role, so it
    /// may not change its storage parameters.
    pub not_owned: bool,
}

/// Tables that exist, keyed by name; a name that is absent does not exist.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Observed {
    pub tables: BTreeMap<QualifiedName, TableState>,
}

/// Reads the spec's tables and the tables the ledger says we touched, in one query.
pub(crate) async fn observe(
    conn: &mut PgConnection,
    spec: &AutovacuumSpec,
    ledger: &Ledger,
) -> Result<Observed, sqlx::Error> {
    let mut names: BTreeSet<QualifiedName> = spec.tables.iter().map(|t| t.qualified()).collect();
    // The ledger lists a table's parameters together: each name parsed once.
    let mut last = None;
    names.extend(
        ledger
            .items(AREA)
            .filter(|(target, _)| last.replace(*target) != Some(*target))
            .filter_map(|(target, _)| QualifiedName::parse(target)),
    );
    let (schemas, tables): (Vec<String>, Vec<String>) =
        names.into_iter().map(|q| (q.schema, q.name)).unzip();
    let rows: Vec<(String, String, String, Vec<String>, bool)> = sqlx::query_as(
        "SELECT n.nspname::text, c.relname::text, c.relkind::text, coalesce(c.reloptions, '{}'),
                NOT pg_has_role(c.relowner, 'USAGE')
         FROM unnest($1::text[], $2::text[]) AS d(schema, name)
         JOIN pg_namespace n ON n.nspname = d.schema
         JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = d.name",
    )
    .bind(&schemas)
    .bind(&tables)
    .fetch_all(&mut *conn)
    .await?;
    let mut observed = Observed::default();
    for (schema, name, relkind, opts, not_owned) in rows {
        let options = opts
            .iter()
            .filter_map(|o| o.split_once('='))
            .filter(|(k, _)| k.starts_with("autovacuum_"))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        observed.tables.insert(
            QualifiedName::new(schema, name),
            TableState {
                relkind,
                options,
                not_owned,
            },
        );
    }
    Ok(observed)
}

/// A difference to close.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Set {
        table: QualifiedName,
        values: BTreeMap<String, String>,
    },
    Reset {
        table: QualifiedName,
        keys: Vec<String>,
    },
}

/// Whether two option values mean the same: numbers by value, booleans by meaning.
fn same_value(a: &str, b: &str) -> bool {
    if a == b {
        return true;
    }
    if let (Ok(x), Ok(y)) = (a.parse::<f64>(), b.parse::<f64>()) {
        return (x - y).abs() <= f64::EPSILON * x.abs().max(y.abs()).max(1.0);
    }
    match (parse_bool(a), parse_bool(b)) {
        (Some(x), Some(y)) => x == y,
        _ => false,
    }
}

fn parse_bool(s: &str) -> Option<bool> {
    match s.to_ascii_lowercase().as_str() {
        "true" | "on" | "yes" | "1" | "t" | "y" => Some(true),
        "false" | "off" | "no" | "0" | "f" | "n" => Some(false),
        _ => None,
    }
}

/// The differences between spec and catalog, and the problems that block them.
pub(crate) fn diff(
    spec: &AutovacuumSpec,
    observed: &Observed,
    ledger: &Ledger,
    plan: &mut AreaPlan,
) -> Vec<Op> {
    let mut ops = Vec::new();
    let mut desired: BTreeMap<QualifiedName, BTreeMap<&str, String>> = BTreeMap::new();
    for t in &spec.tables {
        let name = t.qualified();
        let want = desired_options(t);
        match observed.tables.get(&name) {
            None => plan.error(name.to_string(), Reason::TableNotFound, format!("table {name} does not exist")),
            Some(state) if state.relkind == "p" => plan.error(
                name.to_string(),
                Reason::PartitionedTable,
                format!("{name} is partitioned: autovacuum runs on its partitions, set the parameters there"),
            ),
            Some(state) if !matches!(state.relkind.as_str(), "r" | "m") => {
                plan.error(name.to_string(), Reason::NotATable, format!("{name} is not a table or materialized view"))
            }
            Some(state) => {
                let values: BTreeMap<String, String> = want
                    .iter()
                    .filter(|(k, v)| !state.options.get(**k).is_some_and(|cur| same_value(cur, v)))
                    .map(|(k, v)| (k.to_string(), v.clone()))
                    .collect();
                if !values.is_empty() {
                    ops.push(Op::Set { table: name.clone(), values });
                }
            }
        }
        desired.insert(name, want);
    }
    // Parameters the ledger says we set, that the spec no longer asks for, and that are
    // still there: reset them. The ledger lists a table's parameters together: its name is
    // parsed and looked up once, not once per parameter.
    let mut resets: BTreeMap<QualifiedName, Vec<String>> = BTreeMap::new();
    type Looked<'a> = (
        QualifiedName,
        Option<&'a BTreeMap<&'static str, String>>,
        Option<&'a TableState>,
    );
    let mut parsed: Option<(&str, Option<Looked>)> = None;
    for (target, key) in ledger.items(AREA) {
        if parsed.as_ref().is_none_or(|(t, _)| *t != target) {
            let looked = QualifiedName::parse(target).map(|table| {
                let (wanted, state) = (desired.get(&table), observed.tables.get(&table));
                (table, wanted, state)
            });
            parsed = Some((target, looked));
        }
        let Some((_, Some((table, wanted, state)))) = &parsed else {
            continue;
        };
        let still_wanted = wanted.is_some_and(|d| d.contains_key(key));
        let present = state.is_some_and(|s| s.options.contains_key(key));
        if !still_wanted && present {
            resets
                .entry(table.clone())
                .or_default()
                .push(key.to_string());
        }
    }
    ops.extend(
        resets
            .into_iter()
            .map(|(table, keys)| Op::Reset { table, keys }),
    );
    ops
}

pub(crate) fn render(op: &Op) -> Change {
    match op {
        Op::Set { table, values } => {
            let assignments: Vec<String> = values
                .iter()
                .map(|(k, v)| format!("{k} = {}", render_value(v)))
                .collect();
            let mut change = Change::new(
                AREA,
                table.to_string(),
                format!(
                    "set {}",
                    values
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                format!(
                    "ALTER TABLE {} SET ({})",
                    table.quoted(),
                    assignments.join(", ")
                ),
            )
            // SHARE UPDATE EXCLUSIVE: every autovacuum_* storage parameter is declared
            // with that lock mode (reloptions.c; `AlterTableGetRelOptionsLockLevel` takes
            // the strongest of the keys set). It does not block reads or writes, but
            // queues behind DDL.
            .hazard(Hazard::Locking)
            .lock(LockLevel::ShareUpdateExclusive);
            for k in values.keys() {
                change = change.record(k);
            }
            change
        }
        Op::Reset { table, keys } => {
            let mut change = Change::new(
                AREA,
                table.to_string(),
                format!("reset {}", keys.join(", ")),
                format!("ALTER TABLE {} RESET ({})", table.quoted(), keys.join(", ")),
            )
            .hazard(Hazard::Locking)
            .lock(LockLevel::ShareUpdateExclusive);
            for k in keys {
                change = change.forget(k);
            }
            change
        }
    }
}

/// Values come from typed spec fields (numbers, booleans); quoting them as literals keeps
/// that true even if a value ever arrives from elsewhere.
fn render_value(v: &str) -> String {
    if v.parse::<f64>().is_ok() || v == "true" || v == "false" {
        v.to_string()
    } else {
        crate::pg::quote_literal(v)
    }
}

/// The catalog as it will be after `ops` (for tests of convergence).
pub(crate) fn simulate(observed: &Observed, ops: &[Op]) -> Observed {
    let mut next = observed.clone();
    for op in ops {
        match op {
            Op::Set { table, values } => {
                let t = next.tables.entry(table.clone()).or_default();
                t.options
                    .extend(values.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
            Op::Reset { table, keys } => {
                if let Some(t) = next.tables.get_mut(table) {
                    for k in keys {
                        t.options.remove(k);
                    }
                }
            }
        }
    }
    next
}

/// Storage parameters of tables, reset when the section leaves the spec.
pub struct Autovacuum;

impl AreaModule for Autovacuum {
    const AREA: Area = AREA;
    const RESETS_WHEN_REMOVED: bool = true;
    type Spec = AutovacuumSpec;
    type Observed = Observed;
    type Op = Op;

    fn section(spec: &DatabasePolicySpec) -> Option<&AutovacuumSpec> {
        spec.autovacuum.as_ref()
    }

    async fn observe(
        conn: &mut PgConnection,
        section: &AutovacuumSpec,
        ctx: ObserveContext<'_>,
    ) -> Result<Observed, ObserveError> {
        Ok(observe(conn, section, ctx.ledger).await?)
    }

    fn diff(
        section: &AutovacuumSpec,
        observed: &Observed,
        ctx: &PlanContext<'_>,
        plan: &mut AreaPlan,
    ) -> Vec<Op> {
        diff(section, observed, ctx.ledger, plan)
    }

    fn render(_: &AutovacuumSpec, op: &Op) -> Vec<Change> {
        vec![render(op)]
    }

    fn simulate(_: &AutovacuumSpec, observed: &Observed, ops: &[Op]) -> Observed {
        simulate(observed, ops)
    }

    fn finish(_: &AutovacuumSpec, observed: &Observed, plan: &mut AreaPlan) {
        plan.refuse_unowned(|target| {
            QualifiedName::parse(target)
                .and_then(|t| observed.tables.get(&t))
                .is_some_and(|t| t.not_owned)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::areas::convergence::converges;
    use proptest::prelude::*;

    fn plan(spec: &AutovacuumSpec, observed: &Observed, ledger: &Ledger) -> AreaPlan {
        let whole = DatabasePolicySpec::default();
        Autovacuum::plan(spec, observed, &mut PlanContext::new(&whole, ledger))
    }

    fn table(name: &str, scale: Option<f64>, threshold: Option<i64>) -> AutovacuumTable {
        AutovacuumTable {
            table: name.into(),
            vacuum_scale_factor: scale,
            vacuum_threshold: threshold,
            ..Default::default()
        }
    }

    fn observed(tables: &[(&str, &[(&str, &str)])]) -> Observed {
        Observed {
            tables: tables
                .iter()
                .map(|(n, opts)| {
                    let options = opts
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect();
                    (
                        QualifiedName::new("public", *n),
                        TableState {
                            relkind: "r".into(),
                            options,
                            not_owned: false,
                        },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn sets_missing_parameters_in_one_statement() {
        let spec = AutovacuumSpec {
            tables: vec![table("t", Some(0.01), Some(50))],
        };
        let p = plan(&spec, &observed(&[("t", &[])]), &Ledger::default());
        assert_eq!(p.changes.len(), 1);
        assert_eq!(
            p.changes[0].sql,
            r#"ALTER TABLE "public"."t" SET (autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_threshold = 50)"#
        );
        assert_eq!(p.changes[0].hazard, Hazard::Locking);
        // Autovacuum storage parameters: reads and writes go on.
        assert_eq!(p.changes[0].lock, LockLevel::ShareUpdateExclusive);
        assert_eq!(p.changes[0].ledger.len(), 2);
    }

    #[test]
    fn equal_values_are_not_drift() {
        let spec = AutovacuumSpec {
            tables: vec![table("t", Some(0.01), None)],
        };
        let p = plan(
            &spec,
            &observed(&[("t", &[("autovacuum_vacuum_scale_factor", "0.010")])]),
            &Ledger::default(),
        );
        assert!(p.changes.is_empty());
    }

    #[test]
    fn changed_value_is_set_again() {
        let spec = AutovacuumSpec {
            tables: vec![table("t", Some(0.01), None)],
        };
        let p = plan(
            &spec,
            &observed(&[("t", &[("autovacuum_vacuum_scale_factor", "0.2")])]),
            &Ledger::default(),
        );
        assert_eq!(
            p.changes[0].summary,
            "set autovacuum_vacuum_scale_factor=0.01"
        );
    }

    #[test]
    fn removed_parameters_are_reset_only_when_owned() {
        let spec = AutovacuumSpec {
            tables: vec![table("t", Some(0.01), None)],
        };
        let obs = observed(&[(
            "t",
            &[
                ("autovacuum_vacuum_scale_factor", "0.01"),
                ("autovacuum_vacuum_threshold", "50"),
                ("autovacuum_analyze_threshold", "7"),
            ],
        )]);
        let mut ledger = Ledger::for_policy("p");
        ledger.insert(AREA, "public.t", "autovacuum_vacuum_threshold", "p");
        let p = plan(&spec, &obs, &ledger);
        assert_eq!(p.changes.len(), 1);
        assert_eq!(
            p.changes[0].sql,
            r#"ALTER TABLE "public"."t" RESET (autovacuum_vacuum_threshold)"#
        );
        assert_eq!(p.changes[0].lock, LockLevel::ShareUpdateExclusive);
    }

    #[test]
    fn table_removed_from_spec_is_reset() {
        let spec = AutovacuumSpec { tables: vec![] };
        let mut ledger = Ledger::for_policy("p");
        ledger.insert(AREA, "public.t", "autovacuum_enabled", "p");
        let p = plan(
            &spec,
            &observed(&[("t", &[("autovacuum_enabled", "false")])]),
            &ledger,
        );
        assert_eq!(p.changes[0].summary, "reset autovacuum_enabled");
    }

    #[test]
    fn missing_and_partitioned_tables_are_errors() {
        let spec = AutovacuumSpec {
            tables: vec![
                table("nope", Some(0.1), None),
                table("parted", Some(0.1), None),
            ],
        };
        let mut obs = observed(&[("parted", &[])]);
        obs.tables.values_mut().for_each(|t| t.relkind = "p".into());
        let p = plan(&spec, &obs, &Ledger::default());
        assert!(p.changes.is_empty());
        assert_eq!(p.errors[0].reason, Reason::TableNotFound);
        assert_eq!(p.errors[0].target, "public.nope");
        assert_eq!(p.errors[1].reason, Reason::PartitionedTable);
    }

    #[test]
    fn identifiers_are_quoted() {
        let spec = AutovacuumSpec {
            tables: vec![table("we\"ird", Some(0.1), None)],
        };
        let p = plan(&spec, &observed(&[("we\"ird", &[])]), &Ledger::default());
        assert!(p.changes[0]
            .sql
            .starts_with(r#"ALTER TABLE "public"."we""ird" SET"#));
    }

    #[test]
    fn every_field_maps_to_an_option() {
        let t = AutovacuumTable {
            schema: None,
            table: "t".into(),
            enabled: Some(true),
            vacuum_scale_factor: Some(0.1),
            vacuum_threshold: Some(1),
            vacuum_insert_scale_factor: Some(0.1),
            vacuum_insert_threshold: Some(1),
            analyze_scale_factor: Some(0.1),
            analyze_threshold: Some(1),
            vacuum_cost_delay: Some(2.0),
            vacuum_cost_limit: Some(200),
            freeze_min_age: Some(1),
            freeze_max_age: Some(100000),
            freeze_table_age: Some(1),
        };
        assert_eq!(desired_options(&t).len(), 12);
    }

    fn arb_table() -> impl Strategy<Value = AutovacuumTable> {
        (
            prop::sample::select(vec!["a", "b", "c"]),
            prop::option::of(prop::bool::ANY),
            prop::option::of(0.0f64..1.0),
            prop::option::of(0i64..1000),
            prop::option::of(0i64..1000),
        )
            .prop_map(
                |(name, enabled, scale, threshold, analyze)| AutovacuumTable {
                    table: name.into(),
                    enabled,
                    vacuum_scale_factor: scale,
                    vacuum_threshold: threshold,
                    analyze_threshold: analyze,
                    ..Default::default()
                },
            )
    }

    fn arb_observed() -> impl Strategy<Value = Observed> {
        let key = prop::sample::select(vec![
            "autovacuum_enabled",
            "autovacuum_vacuum_threshold",
            "autovacuum_analyze_threshold",
        ]);
        let opts = prop::collection::btree_map(
            key.prop_map(String::from),
            (0i64..1000).prop_map(|i| i.to_string()),
            0..3,
        );
        prop::collection::btree_map(prop::sample::select(vec!["a", "b", "c"]), opts, 0..4).prop_map(
            |m| Observed {
                tables: m
                    .into_iter()
                    .map(|(n, options)| {
                        (
                            QualifiedName::new("public", n),
                            TableState {
                                relkind: "r".into(),
                                options,
                                not_owned: false,
                            },
                        )
                    })
                    .collect(),
            },
        )
    }

    proptest! {
        /// Convergence: after applying a plan, planning again yields nothing to do.
        #[test]
        fn applying_a_plan_converges(tables in prop::collection::vec(arb_table(), 0..4), obs in arb_observed(),
                                     owned in prop::collection::vec((prop::sample::select(vec!["a","b","c"]), prop::sample::select(vec!["autovacuum_enabled","autovacuum_vacuum_threshold"])), 0..4)) {
            let mut seen = BTreeSet::new();
            let tables: Vec<_> = tables.into_iter().filter(|t| seen.insert(t.table.clone())).collect();
            let spec = AutovacuumSpec { tables };
            let mut ledger = Ledger::for_policy("p");
            for (t, k) in owned { ledger.insert(AREA, &format!("public.{t}"), k, "p"); }
            converges::<Autovacuum>(&spec, &obs, &ledger, |_, _| Ok(()))?;
        }
    }
}
