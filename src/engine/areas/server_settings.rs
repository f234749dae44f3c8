//! Server settings: `ALTER SYSTEM SET/RESET` and `pg_reload_conf()`. Drift is judged
//! against `postgresql.auto.conf` as `pg_file_settings` shows it (what ALTER SYSTEM wrote),
//! values are checked against `pg_settings` before anything runs (ALTER SYSTEM cannot be
//! rolled back), and settings that wait for a restart are reported, never hidden.

use std::collections::{BTreeMap, BTreeSet};

use sqlx::PgConnection;

use crate::api::ServerSettingsSpec;
use crate::engine::ledger::Ledger;
use crate::engine::plan::{Area, AreaPlan, Change};
use crate::pg::{quote_ident, quote_literal};

const AREA: Area = Area::ServerSettings;
/// The ledger target under which owned parameters are recorded.
const TARGET: &str = "server";

/// A row of `pg_settings`.
#[derive(Debug, Clone, PartialEq, Default, sqlx::FromRow)]
pub struct SettingMeta {
    pub name: String,
    pub setting: Option<String>,
    pub unit: Option<String>,
    pub vartype: String,
    pub context: String,
    pub min_val: Option<String>,
    pub max_val: Option<String>,
    pub enumvals: Option<Vec<String>>,
    pub pending_restart: bool,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Observed {
    /// `pg_settings` rows of the parameters named by the spec or the ledger.
    pub meta: BTreeMap<String, SettingMeta>,
    /// `postgresql.auto.conf` as `pg_file_settings` reads it: parameter → value.
    pub auto_conf: BTreeMap<String, String>,
    /// Lines of the configuration files PostgreSQL could not apply.
    pub file_errors: BTreeMap<String, String>,
}

pub async fn observe(
    conn: &mut PgConnection,
    spec: &ServerSettingsSpec,
    ledger: &Ledger,
) -> Result<Observed, sqlx::Error> {
    let mut names: BTreeSet<String> = spec.parameters.keys().map(|k| k.to_lowercase()).collect();
    names.extend(ledger.items(AREA).map(|(_, item)| item.to_string()));
    let names: Vec<String> = names.into_iter().collect();
    let meta: Vec<SettingMeta> = sqlx::query_as(
        "SELECT name::text, setting, unit, vartype, context, min_val, max_val, enumvals, pending_restart
         FROM pg_settings WHERE name = ANY($1)",
    )
    .bind(&names)
    .fetch_all(&mut *conn)
    .await?;
    let files: Vec<FileSetting> = sqlx::query_as(
        "SELECT name::text, setting, error, coalesce(sourcefile LIKE '%postgresql.auto.conf', false)
         FROM pg_file_settings ORDER BY seqno",
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut observed = Observed {
        meta: meta.into_iter().map(|m| (m.name.clone(), m)).collect(),
        ..Default::default()
    };
    for (name, setting, error, is_auto) in files {
        let Some(name) = name else { continue };
        if let Some(error) = error {
            observed.file_errors.insert(name.clone(), error);
        }
        if is_auto {
            observed.auto_conf.insert(name, setting.unwrap_or_default());
        }
    }
    Ok(observed)
}

/// A line of `pg_file_settings`: name, value, error, whether it is in postgresql.auto.conf.
type FileSetting = (Option<String>, Option<String>, Option<String>, bool);

#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Set {
        name: String,
        value: String,
        restart: bool,
    },
    Reset {
        name: String,
        restart: bool,
    },
}

pub fn diff(
    spec: &ServerSettingsSpec,
    observed: &Observed,
    ledger: &Ledger,
    plan: &mut AreaPlan,
) -> Vec<Op> {
    let mut ops = Vec::new();
    let desired: BTreeMap<String, &String> = spec
        .parameters
        .iter()
        .map(|(k, v)| (k.to_lowercase(), v))
        .collect();
    for (name, value) in &desired {
        let restart = match observed.meta.get(name) {
            Some(meta) => {
                if let Err(why) = check_value(meta, value) {
                    plan.error(
                        name,
                        "InvalidValue",
                        format!("invalid value {value:?} for {name}: {why}"),
                    );
                    continue;
                }
                if meta.context == "internal" {
                    plan.error(
                        name,
                        "ReadOnlySetting",
                        format!("{name} is fixed when the server is built and cannot be set"),
                    );
                    continue;
                }
                if meta.pending_restart {
                    plan.notice(
                        name,
                        "RestartRequired",
                        format!("{name} = {value} waits for a server restart"),
                    );
                }
                meta.context == "postmaster"
            }
            // Custom (dotted) parameters belong to extensions that may load later; PostgreSQL
            // accepts them as placeholders. Plain unknown names are mistakes.
            None if name.contains('.') => false,
            None => {
                plan.error(
                    name,
                    "UnknownSetting",
                    format!("{name} is not a PostgreSQL server setting"),
                );
                continue;
            }
        };
        if let Some(error) = observed.file_errors.get(name) {
            plan.notice(
                name,
                "SettingNotApplied",
                format!("{name}: PostgreSQL did not apply the configured value: {error}"),
            );
        }
        let same = observed
            .auto_conf
            .get(name)
            .is_some_and(|cur| same_setting(cur, value));
        if !same {
            ops.push(Op::Set {
                name: name.clone(),
                value: (*value).clone(),
                restart,
            });
        }
    }
    for (_, name) in ledger.items(AREA) {
        if !desired.contains_key(name) && observed.auto_conf.contains_key(name) {
            let restart = observed
                .meta
                .get(name)
                .is_some_and(|m| m.context == "postmaster");
            ops.push(Op::Reset {
                name: name.to_string(),
                restart,
            });
        }
    }
    ops
}

fn same_setting(current: &str, desired: &str) -> bool {
    current == desired || current.eq_ignore_ascii_case(desired)
}

/// `"a"` or `"ext"."param"`: parameter names are identifiers, possibly dotted.
fn quote_param(name: &str) -> String {
    name.split('.')
        .map(quote_ident)
        .collect::<Vec<_>>()
        .join(".")
}

pub fn render(op: &Op) -> Change {
    match op {
        Op::Set {
            name,
            value,
            restart,
        } => Change::new(
            AREA,
            name,
            format!("set {name} = {value}"),
            format!(
                "ALTER SYSTEM SET {} = {}",
                quote_param(name),
                quote_literal(value)
            ),
        )
        .autonomous()
        .restart(*restart)
        .record_under(TARGET, name),
        Op::Reset { name, restart } => Change::new(
            AREA,
            name,
            format!("reset {name}"),
            format!("ALTER SYSTEM RESET {}", quote_param(name)),
        )
        .autonomous()
        .restart(*restart)
        .forget_under(TARGET, name),
    }
}

pub fn plan(spec: &ServerSettingsSpec, observed: &Observed, ledger: &Ledger) -> AreaPlan {
    let mut plan = AreaPlan::new(AREA);
    let ops = diff(spec, observed, ledger, &mut plan);
    plan.changes = ops.iter().map(render).collect();
    if !plan.changes.is_empty() {
        plan.changes.push(
            Change::new(
                AREA,
                "server",
                "reload the configuration",
                "SELECT pg_reload_conf()",
            )
            .autonomous(),
        );
    }
    plan
}

pub fn simulate(observed: &Observed, ops: &[Op]) -> Observed {
    let mut next = observed.clone();
    for op in ops {
        match op {
            Op::Set { name, value, .. } => {
                next.auto_conf.insert(name.clone(), value.clone());
            }
            Op::Reset { name, .. } => {
                next.auto_conf.remove(name);
            }
        }
    }
    next
}

// ------------------------------------------------------------------ value checks

/// Checks a value as PostgreSQL would, from `pg_settings` metadata, so that one bad value
/// refuses the whole area before any `ALTER SYSTEM` (which cannot be rolled back) runs.
pub fn check_value(meta: &SettingMeta, value: &str) -> Result<(), String> {
    match meta.vartype.as_str() {
        "bool" => parse_pg_bool(value)
            .map(|_| ())
            .ok_or_else(|| "expected on or off".to_string()),
        "enum" => {
            let allowed = meta.enumvals.clone().unwrap_or_default();
            if allowed.iter().any(|a| a.eq_ignore_ascii_case(value.trim())) {
                Ok(())
            } else {
                Err(format!("expected one of {}", allowed.join(", ")))
            }
        }
        "integer" | "real" => {
            let v = parse_number_with_unit(value, meta.unit.as_deref(), meta.vartype == "integer")?;
            let min = meta.min_val.as_deref().and_then(|m| m.parse::<f64>().ok());
            let max = meta.max_val.as_deref().and_then(|m| m.parse::<f64>().ok());
            if let (Some(min), Some(max)) = (min, max) {
                if v < min || v > max {
                    let unit = meta
                        .unit
                        .as_deref()
                        .map(|u| format!(" {u}"))
                        .unwrap_or_default();
                    return Err(format!("out of range {min}..{max}{unit}"));
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

fn parse_pg_bool(v: &str) -> Option<bool> {
    let v = v.trim().to_ascii_lowercase();
    let matches = |word: &str, min: usize| v.len() >= min && word.starts_with(v.as_str());
    if matches("true", 1) || matches("yes", 1) || matches("on", 2) || v == "1" {
        Some(true)
    } else if matches("false", 1) || matches("no", 1) || matches("off", 2) || v == "0" {
        Some(false)
    } else {
        None
    }
}

const MEMORY_UNITS: [(&str, f64); 5] = [
    ("B", 1.0),
    ("kB", 1024.0),
    ("MB", 1048576.0),
    ("GB", 1073741824.0),
    ("TB", 1099511627776.0),
];
const TIME_UNITS: [(&str, f64); 6] = [
    ("us", 0.001),
    ("ms", 1.0),
    ("s", 1000.0),
    ("min", 60000.0),
    ("h", 3600000.0),
    ("d", 86400000.0),
];

/// Size in bytes or time in ms of one `unit` of pg_settings (`8kB`, `ms`, `s`, …).
fn base_unit(unit: &str) -> Option<(f64, bool)> {
    let (mult, name) = match unit.find(|c: char| !c.is_ascii_digit()) {
        Some(0) | None => (1.0, unit),
        Some(i) => (unit[..i].parse::<f64>().ok()?, &unit[i..]),
    };
    if let Some((_, f)) = MEMORY_UNITS.iter().find(|(u, _)| *u == name) {
        return Some((mult * f, true));
    }
    TIME_UNITS
        .iter()
        .find(|(u, _)| *u == name)
        .map(|(_, f)| (mult * f, false))
}

/// The value expressed in the parameter's own unit.
fn parse_number_with_unit(value: &str, unit: Option<&str>, integer: bool) -> Result<f64, String> {
    let v = value.trim();
    let split = v
        .find(|c: char| {
            !(c.is_ascii_digit() || c == '.' || c == '-' || c == '+' || c == 'e' || c == 'E')
        })
        .unwrap_or(v.len());
    let (num, suffix) = (v[..split].trim(), v[split..].trim());
    let n: f64 = num.parse().map_err(|_| "expected a number".to_string())?;
    if integer && suffix.is_empty() && num.contains('.') {
        return Err("expected an integer".into());
    }
    if suffix.is_empty() {
        return Ok(n);
    }
    let Some((param_base, param_is_memory)) = unit.and_then(base_unit) else {
        return Err(format!("this parameter takes no unit, got {suffix:?}"));
    };
    let table: &[(&str, f64)] = if param_is_memory {
        &MEMORY_UNITS
    } else {
        &TIME_UNITS
    };
    let Some((_, f)) = table.iter().find(|(u, _)| *u == suffix) else {
        let valid: Vec<&str> = table.iter().map(|(u, _)| *u).collect();
        return Err(format!(
            "unknown unit {suffix:?}, valid units are {}",
            valid.join(", ")
        ));
    };
    Ok(n * f / param_base)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn meta(
        name: &str,
        vartype: &str,
        unit: Option<&str>,
        min: &str,
        max: &str,
        context: &str,
    ) -> SettingMeta {
        SettingMeta {
            name: name.into(),
            setting: Some("0".into()),
            unit: unit.map(String::from),
            vartype: vartype.into(),
            context: context.into(),
            min_val: Some(min.into()),
            max_val: Some(max.into()),
            enumvals: None,
            pending_restart: false,
        }
    }

    fn observed() -> Observed {
        let mut o = Observed::default();
        for m in [
            meta(
                "log_min_duration_statement",
                "integer",
                Some("ms"),
                "-1",
                "2147483647",
                "superuser",
            ),
            meta(
                "max_connections",
                "integer",
                None,
                "1",
                "262143",
                "postmaster",
            ),
            meta(
                "shared_buffers",
                "integer",
                Some("8kB"),
                "16",
                "1073741823",
                "postmaster",
            ),
            meta(
                "work_mem",
                "integer",
                Some("kB"),
                "64",
                "2147483647",
                "user",
            ),
            meta(
                "random_page_cost",
                "real",
                None,
                "0",
                "1.79769e+308",
                "user",
            ),
            meta("log_checkpoints", "bool", None, "", "", "sighup"),
            meta("block_size", "integer", None, "8192", "8192", "internal"),
            SettingMeta {
                enumvals: Some(vec![
                    "none".into(),
                    "ddl".into(),
                    "mod".into(),
                    "all".into(),
                ]),
                ..meta("log_statement", "enum", None, "", "", "superuser")
            },
        ] {
            o.meta.insert(m.name.clone(), m);
        }
        o
    }

    fn spec(pairs: &[(&str, &str)]) -> ServerSettingsSpec {
        ServerSettingsSpec {
            parameters: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn sets_and_reloads() {
        let p = plan(
            &spec(&[("log_min_duration_statement", "500ms")]),
            &observed(),
            &Ledger::default(),
        );
        assert_eq!(p.changes.len(), 2);
        assert_eq!(
            p.changes[0].sql,
            r#"ALTER SYSTEM SET "log_min_duration_statement" = '500ms'"#
        );
        assert!(!p.changes[0].transactional);
        assert_eq!(p.changes[1].sql, "SELECT pg_reload_conf()");
        assert_eq!(p.changes[0].ledger.len(), 1);
    }

    #[test]
    fn matching_auto_conf_is_no_change() {
        let mut o = observed();
        o.auto_conf.insert("log_statement".into(), "ddl".into());
        assert!(
            plan(&spec(&[("log_statement", "DDL")]), &o, &Ledger::default())
                .changes
                .is_empty()
        );
    }

    #[test]
    fn restart_settings_are_flagged_and_reported() {
        let mut o = observed();
        let p = plan(&spec(&[("max_connections", "200")]), &o, &Ledger::default());
        assert!(p.changes[0].requires_restart);
        o.auto_conf.insert("max_connections".into(), "200".into());
        o.meta.get_mut("max_connections").unwrap().pending_restart = true;
        let p = plan(&spec(&[("max_connections", "200")]), &o, &Ledger::default());
        assert!(p.changes.is_empty());
        assert_eq!(p.notices[0].reason, "RestartRequired");
    }

    #[test]
    fn owned_settings_removed_from_spec_are_reset() {
        let mut o = observed();
        o.auto_conf.insert("work_mem".into(), "64MB".into());
        o.auto_conf.insert("log_statement".into(), "all".into());
        let mut ledger = Ledger::for_policy("p");
        ledger.insert(AREA, TARGET, "work_mem", "p");
        let p = plan(&spec(&[]), &o, &ledger);
        assert_eq!(p.changes[0].sql, r#"ALTER SYSTEM RESET "work_mem""#);
        assert_eq!(
            p.changes.len(),
            2,
            "reset + reload; log_statement is not ours"
        );
    }

    #[test]
    fn unknown_and_invalid_settings_are_errors_naming_the_setting() {
        let p = plan(
            &spec(&[
                ("no_such_setting", "1"),
                ("work_mem", "lots"),
                ("log_checkpoints", "maybe"),
                ("block_size", "8192"),
                ("my.custom", "x"),
            ]),
            &observed(),
            &Ledger::default(),
        );
        let reasons: Vec<(&str, &str)> = p
            .errors
            .iter()
            .map(|e| (e.target.as_str(), e.reason.as_str()))
            .collect();
        assert_eq!(
            reasons,
            vec![
                ("block_size", "ReadOnlySetting"),
                ("log_checkpoints", "InvalidValue"),
                ("no_such_setting", "UnknownSetting"),
                ("work_mem", "InvalidValue")
            ]
        );
        // the custom parameter is still planned; the engine refuses the plan as a whole
        assert_eq!(p.changes[0].target, "my.custom");
        assert_eq!(p.changes[0].sql, r#"ALTER SYSTEM SET "my"."custom" = 'x'"#);
    }

    #[test]
    fn value_checks_follow_units_and_ranges() {
        let o = observed();
        let ok = |n: &str, v: &str| check_value(&o.meta[n], v);
        assert!(ok("shared_buffers", "128MB").is_ok());
        assert!(ok("shared_buffers", "16").is_ok());
        assert!(ok("shared_buffers", "64kB").is_err(), "below 16 pages");
        assert!(ok("work_mem", "4GB").is_ok());
        assert!(ok("work_mem", "4 GB").is_ok());
        assert!(ok("work_mem", "4Gb").is_err());
        assert!(ok("log_min_duration_statement", "1s").is_ok());
        assert!(ok("log_min_duration_statement", "-1").is_ok());
        assert!(ok("log_min_duration_statement", "-2").is_err());
        assert!(ok("log_min_duration_statement", "5MB").is_err());
        assert!(ok("max_connections", "100ms").is_err());
        assert!(ok("max_connections", "1.5").is_err());
        assert!(ok("random_page_cost", "1.1").is_ok());
        assert!(ok("log_checkpoints", "on").is_ok());
        assert!(
            ok("log_checkpoints", "of").is_ok(),
            "PostgreSQL takes unique prefixes"
        );
        assert!(ok("log_checkpoints", "o").is_err());
        assert!(ok("log_statement", "mod").is_ok());
        assert!(ok("log_statement", "some").is_err());
    }

    #[test]
    fn values_are_quoted() {
        let p = plan(
            &spec(&[("my.x", "a'; DROP TABLE t; --")]),
            &observed(),
            &Ledger::default(),
        );
        assert_eq!(
            p.changes[0].sql,
            r#"ALTER SYSTEM SET "my"."x" = 'a''; DROP TABLE t; --'"#
        );
    }

    proptest! {
        #[test]
        fn applying_a_plan_converges(
            desired in prop::collection::btree_map(prop::sample::select(vec!["work_mem", "log_statement", "log_checkpoints"]), prop::sample::select(vec!["on", "all", "64MB"]), 0..3),
            current in prop::collection::btree_map(prop::sample::select(vec!["work_mem", "log_statement", "log_checkpoints", "max_connections"]), prop::sample::select(vec!["on", "all", "64MB", "1"]), 0..4),
            owned in prop::collection::vec(prop::sample::select(vec!["work_mem", "log_statement", "max_connections"]), 0..3),
        ) {
            let spec = ServerSettingsSpec { parameters: desired.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect() };
            let mut o = observed();
            o.auto_conf = current.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            let mut ledger = Ledger::for_policy("p");
            for n in owned { ledger.insert(AREA, TARGET, n, "p"); }
            let mut scratch = AreaPlan::new(AREA);
            let ops = diff(&spec, &o, &ledger, &mut scratch);
            let after = simulate(&o, &ops);
            for c in ops.iter().map(render) { ledger.apply_ops(&c.ledger); }
            let mut again = AreaPlan::new(AREA);
            // invalid values never become ops, so they never need converging
            prop_assert!(diff(&spec, &after, &ledger, &mut again).is_empty());
        }
    }
}
