//! Checks the API server cannot make (or that the CLI must make without one): durations,
//! uniqueness of names inside lists, and the per-item CEL rules, so `dbpolicy plan` refuses
//! the same YAML `kubectl apply` would.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Deserializer};

use super::*;
use crate::duration::parse_duration;
use crate::pg::grammar;

mod name_bytes;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("spec.{path}: {message}")]
pub struct ValidationError {
    pub path: String,
    pub message: String,
}

fn err(path: impl Into<String>, message: impl Into<String>) -> ValidationError {
    ValidationError {
        path: path.into(),
        message: message.into(),
    }
}

/// Every problem in the spec, in field order; empty when the spec is valid.
pub fn validate_spec(spec: &DatabasePolicySpec) -> Vec<ValidationError> {
    let mut errors = Vec::new();
    name_bytes(spec, &mut errors);
    relation_names_shared(spec, &mut errors);
    let mut duration = |path: &str, value: Option<&str>| {
        if let Some(v) = value {
            if let Err(e) = parse_duration(v) {
                errors.push(err(path, e));
            }
        }
    };
    duration("driftCheckInterval", spec.drift_check_interval.as_deref());
    if let Some(s) = &spec.safety {
        duration("safety.lockTimeout", s.lock_timeout.as_deref());
        duration("safety.statementTimeout", s.statement_timeout.as_deref());
        duration("safety.indexBuildTimeout", s.index_build_timeout.as_deref());
    }
    errors.extend(duration_bounds(spec));
    if let Some(rls) = &spec.row_level_security {
        unique(
            &mut errors,
            "rowLevelSecurity.tables",
            rls.tables.iter().map(|t| t.qualified().to_string()),
        );
        for (i, t) in rls.tables.iter().enumerate() {
            let at = format!("rowLevelSecurity.tables[{i}]");
            unique(
                &mut errors,
                &format!("{at}.policies"),
                t.policies.iter().map(|p| p.name.clone()),
            );
            for (j, p) in t.policies.iter().enumerate() {
                let at = format!("{at}.policies[{j}]");
                let cmd = p.command.unwrap_or_default();
                if cmd == PolicyCommand::Insert && p.using.is_some() {
                    errors.push(err(&at, "an Insert policy takes only withCheck, not using"));
                }
                if matches!(cmd, PolicyCommand::Select | PolicyCommand::Delete)
                    && p.with_check.is_some()
                {
                    errors.push(err(
                        &at,
                        "a Select or Delete policy takes only using, not withCheck",
                    ));
                }
                if p.using.is_none() && p.with_check.is_none() {
                    errors.push(err(&at, "a policy needs using, withCheck or both"));
                }
            }
        }
    }
    if let Some(p) = &spec.partitions {
        unique(
            &mut errors,
            "partitions.tables",
            p.tables.iter().map(|t| t.qualified().to_string()),
        );
        for (i, t) in p.tables.iter().enumerate() {
            if let Some(d) = &t.start_date {
                if chrono::NaiveDate::parse_from_str(d, "%Y-%m-%d").is_err() {
                    errors.push(err(
                        format!("partitions.tables[{i}].startDate"),
                        format!("{d:?} is not a date YYYY-MM-DD"),
                    ));
                }
            }
            if let Some(r) = &t.retention {
                if crate::duration::parse_retention(r).is_err() {
                    errors.push(err(
                        format!("partitions.tables[{i}].retention"),
                        format!("{r:?} is not a retention such as 30d, 12w, 6mo or 2y"),
                    ));
                }
            }
        }
    }
    if let Some(a) = &spec.autovacuum {
        unique(
            &mut errors,
            "autovacuum.tables",
            a.tables.iter().map(|t| t.qualified().to_string()),
        );
    }
    if let Some(s) = &spec.server_settings {
        // PostgreSQL compares parameter names case-insensitively: two spellings of one
        // name would silently pick one value.
        let mut seen: std::collections::BTreeMap<String, &String> = Default::default();
        for (name, value) in &s.parameters {
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
            {
                errors.push(err(
                    format!("serverSettings.parameters.{name}"),
                    "parameter names are letters, digits, '_' and '.'",
                ));
            }
            if let Some(first) = seen.insert(name.to_lowercase(), name) {
                errors.push(err(
                    format!("serverSettings.parameters.{name}"),
                    format!("same parameter as serverSettings.parameters.{first} (names are case-insensitive): keep one"),
                ));
            }
            if value.contains(['\n', '\r', '\0']) {
                errors.push(err(
                    format!("serverSettings.parameters.{name}"),
                    "a value cannot contain a line break or NUL (postgresql.auto.conf holds one line per setting)",
                ));
            }
        }
    }
    if let Some(r) = &spec.replicas {
        unique(
            &mut errors,
            "replicas.replicas",
            r.replicas.iter().map(|r| r.name.clone()),
        );
    }
    if let Some(b) = &spec.backups {
        if b.storage.pvc.is_some() == b.storage.s3.is_some() {
            errors.push(err(
                "backups.storage",
                "storage needs exactly one of pvc or s3",
            ));
        }
    }
    if let Some(f) = &spec.feature_flags {
        unique(
            &mut errors,
            "featureFlags.flags",
            f.flags.iter().map(|f| f.name.clone()),
        );
        for (i, flag) in f.flags.iter().enumerate() {
            if flag.rollout_percentage.is_some_and(|p| p > 100) {
                errors.push(err(
                    format!("featureFlags.flags[{i}].rolloutPercentage"),
                    "must be between 0 and 100",
                ));
            }
            let valid = !flag.name.is_empty()
                && flag.name.len() <= 128
                && flag
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_.:-".contains(c))
                && flag
                    .name
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphanumeric());
            if !valid {
                errors.push(err(
                    format!("featureFlags.flags[{i}].name"),
                    format!(
                        "{:?}: flag names are letters, digits and _ . : - (at most 128)",
                        flag.name
                    ),
                ));
            }
        }
    }
    if let Some(m) = &spec.materialized_views {
        unique(
            &mut errors,
            "materializedViews.views",
            m.views.iter().map(|v| {
                format!(
                    "{}.{}",
                    v.schema.as_deref().unwrap_or(DEFAULT_SCHEMA),
                    v.name
                )
            }),
        );
    }
    if let Some(rls) = &spec.row_level_security {
        for (i, t) in rls.tables.iter().enumerate() {
            for (j, p) in t.policies.iter().enumerate() {
                for (field, e) in [("using", &p.using), ("withCheck", &p.with_check)] {
                    if let Some(e) = e {
                        if let Err(why) = grammar::check_expression(e) {
                            errors.push(err(
                                format!("rowLevelSecurity.tables[{i}].policies[{j}].{field}"),
                                why.to_string(),
                            ));
                        }
                    }
                }
            }
        }
    }
    if let Some(m) = &spec.materialized_views {
        for (i, v) in m.views.iter().enumerate() {
            if let Some(d) = &v.definition {
                if let Err(why) = grammar::check_query(d) {
                    errors.push(err(
                        format!("materializedViews.views[{i}].definition"),
                        why.to_string(),
                    ));
                }
            }
        }
    }
    if let Some(ix) = &spec.indexes {
        for (i, idx) in ix.indexes.iter().enumerate() {
            for (j, c) in idx.columns.iter().enumerate() {
                if let Err(why) = grammar::check_index_key(c) {
                    errors.push(err(
                        format!("indexes.indexes[{i}].columns[{j}]"),
                        why.to_string(),
                    ));
                }
            }
            if let Some(w) = &idx.where_clause {
                if let Err(why) = grammar::check_expression(w) {
                    errors.push(err(format!("indexes.indexes[{i}].where"), why.to_string()));
                }
            }
        }
        unique(
            &mut errors,
            "indexes.indexes",
            ix.indexes.iter().map(|i| {
                format!(
                    "{}.{}",
                    i.schema.as_deref().unwrap_or(DEFAULT_SCHEMA),
                    i.name
                )
            }),
        );
        for (i, idx) in ix.indexes.iter().enumerate() {
            if idx.columns.is_empty() {
                errors.push(err(
                    format!("indexes.indexes[{i}].columns"),
                    "at least one column or expression",
                ));
            }
        }
    }
    errors
}

/// PostgreSQL names are at most 63 bytes (NAMEDATALEN - 1); a longer one is silently
/// truncated, then never converges. The fields that are names are the ones whose schema
/// says `maxLength: 63` (see `crd::name_byte_rules`, which gives the API server the same
/// rule): this walks the spec beside its own schema, so a new name field is covered.
fn name_bytes(spec: &DatabasePolicySpec, errors: &mut Vec<ValidationError>) {
    static SCHEMA: std::sync::OnceLock<serde_json::Value> = std::sync::OnceLock::new();
    let schema = SCHEMA.get_or_init(|| {
        let crd = serde_json::to_value(crate::crd::crd()).expect("the CRD serialises");
        crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"].clone()
    });
    errors.extend(name_bytes::check(schema, spec));
}

/// Tables, views and indexes share one namespace per schema: a materialized view and an
/// index of one name cannot both exist, and would half-apply.
fn relation_names_shared(spec: &DatabasePolicySpec, errors: &mut Vec<ValidationError>) {
    let (Some(views), Some(indexes)) = (&spec.materialized_views, &spec.indexes) else {
        return;
    };
    for (i, ix) in indexes.indexes.iter().enumerate() {
        let schema = ix.schema.as_deref().unwrap_or(DEFAULT_SCHEMA);
        if views
            .views
            .iter()
            .any(|v| v.name == ix.name && v.schema.as_deref().unwrap_or(DEFAULT_SCHEMA) == schema)
        {
            errors.push(err(
                format!("indexes.indexes[{i}].name"),
                format!("{schema}.{} is also the name of a materialized view of this policy; tables, views and indexes share one namespace per schema", ix.name),
            ));
        }
    }
}

/// `driftCheckInterval` between 10s and 24h (the CRD's CEL rule says the same): a drift
/// check every few milliseconds would keep PostgreSQL busy, one beyond a day is no check.
/// Values that do not parse are reported by `validate_spec` already.
pub(crate) fn duration_bounds(spec: &DatabasePolicySpec) -> Vec<ValidationError> {
    use crate::duration::parse_bounded;
    let mut errors = Vec::new();
    if let Some(v) = spec.drift_check_interval.as_deref() {
        if parse_duration(v).is_ok() {
            if let Err(e) = parse_bounded(v, MIN_DRIFT_CHECK_INTERVAL, MAX_DRIFT_CHECK_INTERVAL) {
                errors.push(err("driftCheckInterval", e));
            }
        }
    }
    errors
}

fn unique(errors: &mut Vec<ValidationError>, path: &str, names: impl Iterator<Item = String>) {
    let mut seen = HashSet::new();
    for name in names {
        if !seen.insert(name.clone()) {
            errors.push(err(path, format!("{name} is listed more than once")));
        }
    }
}

/// Accepts `key: 500` and `key: on` as well as `key: "500"`: postgresql.conf values are
/// strings, but YAML authors write numbers and booleans unquoted.
pub(crate) fn string_map<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        S(String),
        I(i64),
        F(f64),
        B(bool),
    }
    let raw = BTreeMap::<String, Scalar>::deserialize(d)?;
    Ok(raw
        .into_iter()
        .map(|(k, v)| {
            let v = match v {
                Scalar::S(s) => s,
                Scalar::I(i) => i.to_string(),
                Scalar::F(f) => f.to_string(),
                Scalar::B(b) => {
                    if b {
                        "on".into()
                    } else {
                        "off".into()
                    }
                }
            };
            (k, v)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> DatabasePolicySpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn minimal_spec_is_valid() {
        let s = spec("database: {connectionSecretRef: {name: db}}");
        assert!(validate_spec(&s).is_empty());
        assert_eq!(s.lock_timeout(), "5s");
        assert_eq!(s.index_build_timeout(), "20m");
        assert_eq!(s.effective_mode(), Mode::Apply);
    }

    #[test]
    fn reports_duplicates_and_bad_durations() {
        let s = spec(
            r#"
database: {connectionSecretRef: {name: db}}
safety: {lockTimeout: soon, indexBuildTimeout: 1.5h}
autovacuum:
  tables: [{table: a}, {table: a, schema: public}]
featureFlags:
  flags: [{name: "bad name", enabled: true}]
"#,
        );
        let errors: Vec<String> = validate_spec(&s).iter().map(|e| e.to_string()).collect();
        assert_eq!(errors.len(), 4, "{errors:?}");
        assert!(errors[0].starts_with("spec.safety.lockTimeout"));
        assert!(errors[1].starts_with("spec.safety.indexBuildTimeout"));
        assert!(errors[2].contains("public.a is listed more than once"));
        assert!(errors[3].contains("featureFlags.flags[0].name"));
    }

    #[test]
    fn policy_rules_mirror_cel() {
        let s = spec(
            r#"
database: {connectionSecretRef: {name: db}}
rowLevelSecurity:
  tables:
    - table: t
      policies:
        - {name: a, command: Insert, using: "true"}
        - {name: b, command: Select, withCheck: "true"}
        - {name: c}
"#,
        );
        assert_eq!(validate_spec(&s).len(), 3);
    }

    #[test]
    fn fragments_are_checked_with_postgres_grammar_and_named_by_path() {
        let s = spec(
            r#"
database: {connectionSecretRef: {name: db}}
rowLevelSecurity:
  tables:
    - table: t
      policies:
        - {name: a, using: "E'a'\n'\\''); DROP TABLE x; --'"}
materializedViews:
  views: [{name: v, definition: "SELECT 1; DROP TABLE t"}]
indexes:
  indexes: [{name: i, table: t, columns: ["a) WHERE (true"], where: "true); DROP TABLE t; --"}]
"#,
        );
        let errors: Vec<String> = validate_spec(&s).iter().map(|e| e.to_string()).collect();
        assert_eq!(errors.len(), 4, "{errors:?}");
        assert!(errors[0].starts_with("spec.rowLevelSecurity.tables[0].policies[0].using: "));
        assert!(errors[1].starts_with("spec.materializedViews.views[0].definition: "));
        assert!(errors[2].starts_with("spec.indexes.indexes[0].columns[0]: "));
        assert!(errors[3].starts_with("spec.indexes.indexes[0].where: "));
    }

    #[test]
    fn names_are_limited_in_bytes_and_views_and_indexes_share_names() {
        let cyrillic = "я".repeat(40); // 40 characters, 80 bytes
        let s = spec(&format!(
            r#"
database: {{connectionSecretRef: {{name: db}}}}
autovacuum:
  tables: [{{table: "{cyrillic}", vacuumScaleFactor: 0.1}}]
materializedViews:
  views: [{{name: stats, definition: "SELECT 1"}}]
indexes:
  indexes: [{{name: stats, table: t, columns: [a]}}, {{name: "{ok}", table: t, columns: [a]}}]
"#,
            ok = "я".repeat(31)
        ));
        let errors: Vec<String> = validate_spec(&s).iter().map(|e| e.to_string()).collect();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(
            errors[0].starts_with("spec.autovacuum.tables[0].table: "),
            "{errors:?}"
        );
        assert!(errors[0].contains("80 bytes"));
        assert!(
            errors[1].starts_with("spec.indexes.indexes[0].name: "),
            "{errors:?}"
        );
    }

    #[test]
    fn unknown_fields_are_refused() {
        let r: Result<DatabasePolicySpec, _> =
            serde_yaml::from_str("database: {connectionSecretRef: {name: db}}\nautovaccum: {}");
        assert!(r
            .unwrap_err()
            .to_string()
            .contains("unknown field `autovaccum`"));
    }

    #[test]
    fn server_parameters_accept_scalars() {
        let s = spec("database: {connectionSecretRef: {name: db}}\nserverSettings: {parameters: {a: 500, b: true, c: '1GB', d: 0.5}}");
        let p = &s.server_settings.unwrap().parameters;
        assert_eq!(p["a"], "500");
        assert_eq!(p["b"], "on");
        assert_eq!(p["c"], "1GB");
        assert_eq!(p["d"], "0.5");
    }

    #[test]
    fn server_parameters_spelled_twice_or_with_line_breaks_are_refused() {
        let s = spec("database: {connectionSecretRef: {name: db}}\nserverSettings: {parameters: {WORK_MEM: 8MB, work_mem: 16MB, TimeZone: UTC, log_line_prefix: \"a\\nb\"}}");
        let errors: Vec<String> = validate_spec(&s).iter().map(|e| e.to_string()).collect();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(
            errors[0].starts_with("spec.serverSettings.parameters.log_line_prefix: "),
            "{errors:?}"
        );
        assert!(
            errors[1].starts_with("spec.serverSettings.parameters.work_mem: same parameter as serverSettings.parameters.WORK_MEM"),
            "{errors:?}"
        );
    }
}
