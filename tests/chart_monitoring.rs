//! The chart's monitoring: the PrometheusRule and the Grafana dashboard ConfigMap, through
//! real Helm. Both render only when asked for; the rules pass `promtool check rules`
//! (Debian's `prometheus` package, `hack/install-deps.sh`) and behave as documented under
//! `promtool test rules`; and every metric the rules and the dashboard query is one the
//! operator exports, read from the exposition of the registry `/metrics` serves.

use dbpolicy_test_support::helm as support_helm;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use serde_json::{json, Value};
use support_helm::template;

const ENABLED: &str = r#"{"metrics": {"prometheusRule": {"enabled": true, "labels": {"release": "prom"}},
                                  "grafanaDashboard": {"enabled": true}}}"#;

fn render(values: Value) -> Vec<Value> {
    template(&values).unwrap_or_else(|e| panic!("helm template refused {values}: {e}"))
}

fn find<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn enabled() -> Vec<Value> {
    render(serde_json::from_str(ENABLED).unwrap())
}

/// `promtool`: `DBPOLICY_PROMTOOL`, else the one on PATH (Debian's `prometheus` package).
fn promtool() -> PathBuf {
    if let Some(p) = std::env::var_os("DBPOLICY_PROMTOOL").filter(|v| !v.is_empty()) {
        return PathBuf::from(p);
    }
    let found = std::env::var_os("PATH")
        .map(|path| {
            std::env::split_paths(&path)
                .map(|d| d.join("promtool"))
                .find(|p| p.is_file())
        })
        .unwrap_or_default();
    found.expect(
        "promtool not found: run hack/install-deps.sh (Debian's prometheus package) or set DBPOLICY_PROMTOOL",
    )
}

/// The rule groups of the rendered PrometheusRule, as a rules file promtool reads.
fn rules_file(docs: &[Value]) -> tempfile::NamedTempFile {
    let rule = find(docs, "PrometheusRule");
    assert_eq!(rule.len(), 1);
    let file = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
    let groups = json!({"groups": rule[0]["spec"]["groups"]});
    std::fs::write(file.path(), serde_yaml::to_string(&groups).unwrap()).unwrap();
    file
}

fn run_promtool(args: &[&str]) -> String {
    let out = Command::new(promtool())
        .args(args)
        .output()
        .expect("promtool runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

/// Names of the operator's series in a PromQL expression: every identifier with its
/// prefixes (label values are quoted and carry none).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut current = String::new();
    for ch in expr.chars().chain(std::iter::once(' ')) {
        if ch.is_ascii_alphanumeric() || ch == '_' || ch == ':' {
            current.push(ch);
        } else {
            if current.starts_with("dbpolicy_") || current.starts_with("process_") {
                names.insert(current.clone());
            }
            current.clear();
        }
    }
    names
}

/// The names `/metrics` can hold, from the registry it serves (every family is in the
/// exposition before its first series).
fn exported() -> BTreeSet<String> {
    let (registry, _metrics) = dbpolicy::controller::metrics::registry();
    let text = dbpolicy::controller::metrics::encode(&registry);
    dbpolicy::controller::metrics::exported_names(&text)
}

#[test]
fn monitoring_renders_only_when_enabled_with_the_sidecar_label() {
    let defaults = render(json!({}));
    assert!(find(&defaults, "PrometheusRule").is_empty());
    assert!(find(&defaults, "ConfigMap").is_empty());

    let docs = enabled();
    let rule = find(&docs, "PrometheusRule")[0];
    assert_eq!(rule["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(rule["metadata"]["namespace"], "dbpolicy-system");
    assert_eq!(rule["metadata"]["labels"]["release"], "prom");
    let alerts: Vec<&str> = rule["spec"]["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["alert"].as_str().unwrap())
        .collect();
    assert_eq!(
        alerts,
        [
            "DBPolicyNotReady",
            "DBPolicyDriftRepeating",
            "DBPolicyReplicaLagSeconds",
            "DBPolicyReplicaLagBytes",
            "DBPolicyBackupOverdue",
            "DBPolicySlotRetainingWAL"
        ]
    );

    let cm = find(&docs, "ConfigMap");
    assert_eq!(cm.len(), 1);
    assert_eq!(cm[0]["metadata"]["labels"]["grafana_dashboard"], "1");
    let dashboard: Value =
        serde_json::from_str(cm[0]["data"]["dbpolicy.json"].as_str().unwrap()).unwrap();
    assert_eq!(dashboard["uid"], "dbpolicy");

    // Another sidecar label, another namespace, thresholds from values.
    let docs = render(json!({"metrics": {
        "prometheusRule": {"enabled": true, "notReadyFor": "30m", "slotRetainedBytes": 5368709120u64},
        "grafanaDashboard": {"enabled": true, "namespace": "monitoring", "labels": {"dashboards": "ops"}}}}));
    let cm = find(&docs, "ConfigMap")[0];
    assert_eq!(cm["metadata"]["namespace"], "monitoring");
    assert_eq!(cm["metadata"]["labels"]["dashboards"], "ops");
    let rules = &find(&docs, "PrometheusRule")[0]["spec"]["groups"][0]["rules"];
    assert_eq!(rules[0]["for"], "30m");
    assert_eq!(
        rules[5]["expr"],
        "dbpolicy_slot_retained_wal_bytes > 5368709120"
    );

    // values.schema.json refuses what would break the rules.
    for bad in [
        json!({"metrics": {"prometheusRule": {"notReadyFor": "soon"}}}),
        json!({"metrics": {"prometheusRule": {"driftRepeats": 0}}}),
        json!({"metrics": {"prometheusRule": {"unknown": true}}}),
        json!({"metrics": {"grafanaDashboard": {"namespace": "Not_A_Namespace"}}}),
    ] {
        assert!(template(&bad).is_err(), "accepted {bad}");
    }
}

#[test]
fn rules_pass_promtool_and_fire_as_documented() {
    let docs = enabled();
    let rules = rules_file(&docs);
    let path = rules.path().to_str().unwrap();
    let out = run_promtool(&["check", "rules", path]);
    assert!(out.contains("SUCCESS: 6 rules found"), "{out}");

    // Series over time (1m steps) and the alerts expected at given times.
    let test = json!({
        "rule_files": [path],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                {"series": "dbpolicy_policy_ready{namespace=\"quiz\",policy=\"down\"}", "values": "0x30"},
                {"series": "dbpolicy_policy_ready{namespace=\"quiz\",policy=\"up\"}", "values": "1x30"},
                {"series": "dbpolicy_drift_detected_total{namespace=\"quiz\",policy=\"down\",area=\"rowLevelSecurity\"}", "values": "0 1 2 3 4 4 4 4 4 4 4"},
                {"series": "dbpolicy_replica_lag_seconds{namespace=\"quiz\",policy=\"up\",replica=\"r1\"}", "values": "60x10"},
                {"series": "dbpolicy_replica_max_lag_seconds{namespace=\"quiz\",policy=\"up\",replica=\"r1\"}", "values": "30x10"},
                {"series": "dbpolicy_replica_lag_seconds{namespace=\"quiz\",policy=\"up\",replica=\"r2\"}", "values": "10x10"},
                {"series": "dbpolicy_replica_max_lag_seconds{namespace=\"quiz\",policy=\"up\",replica=\"r2\"}", "values": "30x10"},
                {"series": "dbpolicy_replica_lag_bytes{namespace=\"quiz\",policy=\"up\",replica=\"r1\"}", "values": "100x10"},
                {"series": "dbpolicy_replica_max_lag_bytes{namespace=\"quiz\",policy=\"up\",replica=\"r1\"}", "values": "1000x10"},
                // Last success at t=0 (Unix 0) on an hourly schedule: overdue after 1h + 1h of grace.
                {"series": "dbpolicy_backup_last_success_timestamp_seconds{namespace=\"quiz\",policy=\"up\"}", "values": "0x200"},
                {"series": "dbpolicy_backup_schedule_interval_seconds{namespace=\"quiz\",policy=\"up\"}", "values": "3600x200"},
                {"series": "dbpolicy_slot_retained_wal_bytes{namespace=\"quiz\",policy=\"up\",slot=\"gone\"}", "values": "2147483648x20"},
                {"series": "dbpolicy_slot_retained_wal_bytes{namespace=\"quiz\",policy=\"up\",slot=\"fine\"}", "values": "1024x20"},
            ],
            "alert_rule_test": [
                {"eval_time": "10m", "alertname": "DBPolicyNotReady", "exp_alerts": []},
                {"eval_time": "16m", "alertname": "DBPolicyNotReady", "exp_alerts": [
                    {"exp_labels": {"severity": "warning", "namespace": "quiz", "policy": "down"},
                     "exp_annotations": {"summary": "DatabasePolicy quiz/down is not Ready", "description": "The policy's Ready condition has not been True for 15m; `kubectl dbpolicy status down -n quiz` says why."}}]},
                {"eval_time": "2m", "alertname": "DBPolicyDriftRepeating", "exp_alerts": []},
                {"eval_time": "5m", "alertname": "DBPolicyDriftRepeating", "exp_alerts": [
                    {"exp_labels": {"severity": "warning", "namespace": "quiz", "policy": "down"},
                     "exp_annotations": {"summary": "DatabasePolicy quiz/down keeps drifting", "description": "The database was changed away from the policy 4 times in 1h; something (a person, a migration, another tool) keeps undoing it. The Events name what drifted."}}]},
                {"eval_time": "3m", "alertname": "DBPolicyReplicaLagSeconds", "exp_alerts": []},
                {"eval_time": "6m", "alertname": "DBPolicyReplicaLagSeconds", "exp_alerts": [
                    {"exp_labels": {"severity": "warning", "namespace": "quiz", "policy": "up", "replica": "r1"},
                     "exp_annotations": {"summary": "Replica r1 of quiz/up lags more than its maxLagSeconds", "description": "Replay lag 1m 0s, above spec.replicas[].maxLagSeconds."}}]},
                {"eval_time": "6m", "alertname": "DBPolicyReplicaLagBytes", "exp_alerts": []},
                {"eval_time": "119m", "alertname": "DBPolicyBackupOverdue", "exp_alerts": []},
                {"eval_time": "121m", "alertname": "DBPolicyBackupOverdue", "exp_alerts": [
                    {"exp_labels": {"severity": "warning", "namespace": "quiz", "policy": "up"},
                     "exp_annotations": {"summary": "No recent backup of quiz/up", "description": "The newest successful backup is 2h 1m 0s old, more than the schedule's interval plus 3600s of grace."}}]},
                {"eval_time": "5m", "alertname": "DBPolicySlotRetainingWAL", "exp_alerts": []},
                {"eval_time": "11m", "alertname": "DBPolicySlotRetainingWAL", "exp_alerts": [
                    {"exp_labels": {"severity": "warning", "namespace": "quiz", "policy": "up", "slot": "gone"},
                     "exp_annotations": {"summary": "Replication slot gone retains too much WAL", "description": "The slot keeps 2GiB of WAL on the server of quiz/up; a slot whose consumer is gone retains WAL until the disk fills."}}]},
            ]
        }]
    });
    let tests = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
    std::fs::write(tests.path(), serde_yaml::to_string(&test).unwrap()).unwrap();
    run_promtool(&["test", "rules", tests.path().to_str().unwrap()]);
}

#[test]
fn rules_and_dashboard_use_only_metrics_the_operator_exports() {
    let exported = exported();
    let docs = enabled();

    let mut used = BTreeSet::new();
    let rule = find(&docs, "PrometheusRule")[0];
    for r in rule["spec"]["groups"][0]["rules"].as_array().unwrap() {
        used.extend(metric_names(r["expr"].as_str().unwrap()));
    }
    let cm = find(&docs, "ConfigMap")[0];
    let dashboard: Value =
        serde_json::from_str(cm["data"]["dbpolicy.json"].as_str().unwrap()).unwrap();
    let mut exprs = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().into_iter().flatten() {
            used.extend(metric_names(t["expr"].as_str().unwrap()));
            exprs += 1;
        }
    }
    for v in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["query"]["query"].as_str() {
            used.extend(metric_names(q));
        }
    }
    assert!(exprs >= 15, "the dashboard has {exprs} queries");
    // The rules and the dashboard cover what the issue asks to see.
    for name in [
        "dbpolicy_policy_ready",
        "dbpolicy_policy_pending_changes",
        "dbpolicy_drift_detected_total",
        "dbpolicy_replica_lag_seconds",
        "dbpolicy_replica_lag_bytes",
        "dbpolicy_slot_retained_wal_bytes",
        "dbpolicy_backup_last_success_timestamp_seconds",
        "dbpolicy_backup_last_size_bytes",
        "dbpolicy_build_info",
        "process_resident_memory_bytes",
    ] {
        assert!(used.contains(name), "{name} is used nowhere: {used:?}");
    }
    let unknown: Vec<&String> = used.difference(&exported).collect();
    assert!(
        unknown.is_empty(),
        "queried but not exported: {unknown:?}\nexported: {exported:?}"
    );
    // The check can fail: a misspelt name is caught.
    assert!(!exported.contains("dbpolicy_policy_readyy"));
}
