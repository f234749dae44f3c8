//! The CRD against a real API server: the upstream apiextensions-apiserver 1.36 started by
//! `hack/envtest.sh` (its own etcd, run directory and random ports per test).
//!
//! Covered here: the generated CRD is accepted and Established, the names (short names,
//! category) and printer columns work in `kubectl get`, the certquiz example is valid, and
//! schema and CEL rules reject bad specs at `kubectl apply` time with messages that name
//! the field. The full kube-apiserver 1.20 has no CEL and no server-side field validation,
//! so these checks need the newer CRD server; `e2e_operator.rs` uses the full one.

use dbpolicy_test_support::envtest as support_envtest;

use std::time::Duration;

use serde_json::Value;
use support_envtest::{repo_root, wait_for, ApiServer, Envtest};

/// A valid policy that touches every section the bad variants below break.
const BASE: &str = r#"
apiVersion: dbpolicy.dev/v1alpha1
kind: DatabasePolicy
metadata:
  name: base
  namespace: default
spec:
  database:
    connectionSecretRef: {name: app-db}
  mode: Plan
  safety: {lockTimeout: 5s, statementTimeout: 60s}
  rowLevelSecurity:
    tables:
      - table: user_progress
        policies:
          - {name: own_rows, command: Insert, withCheck: "user_id = 1"}
  backups:
    schedule: "0 3 * * *"
    retention: {days: 30}
    storage:
      pvc: {claimName: backups}
  featureFlags:
    flags:
      - {name: new_engine, enabled: true, rolloutPercentage: 25}
"#;

fn base() -> serde_yaml::Value {
    serde_yaml::from_str(BASE).expect("BASE parses")
}

/// `value` at a dotted path (numeric segments index lists), created as maps when missing.
fn at<'a>(mut value: &'a mut serde_yaml::Value, path: &str) -> &'a mut serde_yaml::Value {
    for seg in path.split('.') {
        value = match seg.parse::<usize>() {
            Ok(i) => &mut value[i],
            Err(_) => {
                if value.get(seg).is_none() {
                    value[seg] = serde_yaml::Value::Mapping(Default::default());
                }
                &mut value[seg]
            }
        };
    }
    value
}

/// As JSON for kubectl: re-emitted YAML would be read by kubectl's YAML 1.1 parser, which
/// turns an unquoted `on` (a string to serde_yaml) into a boolean.
fn json(v: &serde_yaml::Value) -> String {
    serde_json::to_string(v).expect("serialise")
}

fn apply(env: &Envtest, doc: &str) -> std::process::Output {
    env.kubectl(&["apply", "-f", "-"], Some(doc))
}

fn get_json(env: &Envtest, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    serde_json::from_str(&env.kubectl_ok(&all, None)).expect("kubectl -o json")
}

#[test]
fn crd_is_established_with_names_short_names_and_category() {
    let env = Envtest::start(ApiServer::Crd);
    env.install_crds();

    let crd = get_json(&env, &["get", "crd", "databasepolicies.dbpolicy.dev"]);
    let conditions = crd["status"]["conditions"].as_array().expect("conditions");
    for wanted in ["NamesAccepted", "Established"] {
        let c = conditions
            .iter()
            .find(|c| c["type"] == wanted)
            .unwrap_or_else(|| panic!("no {wanted} condition: {conditions:?}"));
        assert_eq!(c["status"], "True", "{wanted}: {c}");
    }
    assert_eq!(
        crd["status"]["acceptedNames"]["shortNames"],
        serde_json::json!(["dbpol", "dbp"])
    );

    let resources = env.kubectl_ok(
        &["api-resources", "--api-group=dbpolicy.dev", "-o", "wide"],
        None,
    );
    let row = resources
        .lines()
        .find(|l| l.starts_with("databasepolicies"))
        .unwrap_or_else(|| panic!("databasepolicies not discovered:\n{resources}"));
    for want in [
        "dbpol,dbp",
        "dbpolicy.dev/v1alpha1",
        "true",
        "DatabasePolicy",
        "dbpolicy",
    ] {
        assert!(row.contains(want), "{want:?} missing from {row:?}");
    }

    // Every name kubectl offers resolves: plural, singular, kind, short names, category.
    for name in [
        "databasepolicies",
        "databasepolicy",
        "DatabasePolicy",
        "dbpol",
        "dbp",
    ] {
        let out = env.kubectl(&["get", name, "-A"], None);
        assert!(
            out.status.success(),
            "kubectl get {name}: {}",
            support_envtest::text(&out)
        );
    }
    let out = env.kubectl(&["get", "dbpolicy", "-A"], None);
    assert!(
        out.status.success(),
        "category get: {}",
        support_envtest::text(&out)
    );
}

#[test]
fn certquiz_example_is_accepted_and_printer_columns_fill_from_status() {
    let env = Envtest::start(ApiServer::Crd);
    env.install_crds();

    // Only the DatabasePolicy documents: this server has no Secrets.
    let path = repo_root().join("examples/certquiz/policy.yaml");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let policies: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).expect("certquiz YAML parses"))
        .filter(|v: &serde_yaml::Value| v["kind"] == "DatabasePolicy")
        .collect();
    assert_eq!(
        policies.len(),
        1,
        "certquiz/policy.yaml holds one DatabasePolicy"
    );
    let doc = json(&policies[0]);
    // Client-side apply with kubectl's default strict server-side field validation, then
    // the same document by server-side apply: both accept it unchanged.
    let out = apply(&env, &doc);
    assert!(
        out.status.success(),
        "certquiz policy rejected:\n{}",
        support_envtest::text(&out)
    );
    env.kubectl_ok(
        &[
            "apply",
            "--server-side",
            "--field-manager=e2e",
            "--force-conflicts",
            "-f",
            "-",
        ],
        Some(&doc),
    );
    let stored = get_json(&env, &["get", "dbpol", "certquiz", "-n", "default"]);
    let sent: Value = serde_json::to_value(&policies[0]["spec"]).unwrap();
    assert_eq!(
        stored["spec"], sent,
        "the server changed the spec (pruned or defaulted fields)"
    );

    let table = env.kubectl_ok(&["get", "dbpol", "-n", "default"], None);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "READY", "REASON", "MODE", "PENDING", "LAST", "BACKUP", "AGE"],
        "{table}"
    );
    let wide = env.kubectl_ok(&["get", "dbp", "-n", "default", "-o", "wide"], None);
    assert!(
        wide.lines().next().unwrap().trim_end().ends_with("MESSAGE"),
        "{wide}"
    );

    // What the operator writes through the status subresource shows in the columns.
    let three_days_ago = (chrono::Utc::now() - chrono::Duration::days(3))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let status = serde_json::json!({"status": {
        "observedGeneration": 1,
        "mode": "Apply",
        "pendingChanges": 3,
        "backups": {"lastSuccessTime": three_days_ago},
        "conditions": [{
            "type": "Ready", "status": "False", "reason": "RestartRequired",
            "message": "shared_buffers waits for a restart",
            "lastTransitionTime": three_days_ago, "observedGeneration": 1
        }]
    }});
    env.kubectl_ok(
        &[
            "patch",
            "dbpol",
            "certquiz",
            "-n",
            "default",
            "--subresource=status",
            "--type=merge",
            "-p",
            &status.to_string(),
        ],
        None,
    );
    let wide = env.kubectl_ok(
        &[
            "get",
            "dbpol",
            "certquiz",
            "-n",
            "default",
            "-o",
            "wide",
            "--no-headers",
        ],
        None,
    );
    let cols: Vec<&str> = wide.split_whitespace().collect();
    assert_eq!(
        &cols[..5],
        ["certquiz", "False", "RestartRequired", "Apply", "3"],
        "{wide}"
    );
    assert!(
        wide.contains("shared_buffers waits for a restart"),
        "{wide}"
    );
    // Last Backup is a date column: kubectl shows its age, not the raw timestamp.
    assert_eq!(cols[5], "3d", "{wide}");

    // Status is a subresource: writing it does not bump the generation, a spec edit does.
    let obj = get_json(&env, &["get", "dbpol", "certquiz", "-n", "default"]);
    assert_eq!(obj["metadata"]["generation"], 1);
    env.kubectl_ok(
        &[
            "patch",
            "dbpol",
            "certquiz",
            "-n",
            "default",
            "--type=merge",
            "-p",
            r#"{"spec":{"mode":"Plan"}}"#,
        ],
        None,
    );
    let obj = get_json(&env, &["get", "dbpol", "certquiz", "-n", "default"]);
    assert_eq!(obj["metadata"]["generation"], 2);
    assert_eq!(obj["status"]["observedGeneration"], 1);
}

/// Each case: what it breaks, the YAML path to set, the value, and the fragments the
/// error must contain (the field path and the rule's message).
struct Bad {
    what: &'static str,
    path: &'static str,
    value: &'static str,
    expect: &'static [&'static str],
}

const BAD: &[Bad] = &[
    Bad {
        what: "a name of 40 Cyrillic letters: 40 characters but 80 bytes",
        path: "spec.rowLevelSecurity.tables.0.table",
        value: "яяяяяяяяяяяяяяяяяяяяяяяяяяяяяяяяяяяяяяяя",
        expect: &["spec.rowLevelSecurity.tables[0].table", "at most 63 bytes"],
    },
    Bad {
        what: "backups storage with both pvc and s3",
        path: "spec.backups.storage.s3",
        value: "{bucket: dumps, credentialsSecretRef: {name: s3-creds}}",
        expect: &[
            "spec.backups.storage",
            "storage needs exactly one of pvc or s3",
        ],
    },
    Bad {
        what: "backups storage with neither pvc nor s3",
        path: "spec.backups.storage",
        value: "{}",
        expect: &[
            "spec.backups.storage",
            "storage needs exactly one of pvc or s3",
        ],
    },
    Bad {
        what: "RLS Insert policy with using",
        path: "spec.rowLevelSecurity.tables.0.policies.0.using",
        value: "user_id = 1",
        expect: &[
            "spec.rowLevelSecurity.tables[0].policies[0]",
            "an Insert policy takes only withCheck, not using",
        ],
    },
    Bad {
        what: "RLS Select policy with withCheck",
        path: "spec.rowLevelSecurity.tables.0.policies.0.command",
        value: "Select",
        expect: &["a Select or Delete policy takes only using, not withCheck"],
    },
    Bad {
        what: "lockTimeout that is not a duration",
        path: "spec.safety.lockTimeout",
        value: "soon",
        expect: &[
            "spec.safety.lockTimeout",
            "must be a duration such as 500ms, 5s or 1m",
        ],
    },
    Bad {
        what: "unknown field (strict field validation)",
        path: "spec.bogusField",
        value: "1",
        expect: &["unknown field \"spec.bogusField\""],
    },
    Bad {
        what: "unknown field inside an area",
        path: "spec.backups.keepForever",
        value: "true",
        expect: &["unknown field \"spec.backups.keepForever\""],
    },
    Bad {
        what: "rolloutPercentage above 100",
        path: "spec.featureFlags.flags.0.rolloutPercentage",
        value: "150",
        expect: &[
            "spec.featureFlags.flags[0].rolloutPercentage",
            "should be less than or equal to 100",
        ],
    },
    Bad {
        what: "mode outside the enum",
        path: "spec.mode",
        value: "Foo",
        expect: &[
            "spec.mode",
            "Unsupported value: \"Foo\"",
            "\"Apply\"",
            "\"Plan\"",
        ],
    },
    Bad {
        what: "backup schedule that is not cron",
        path: "spec.backups.schedule",
        value: "nightly",
        expect: &[
            "spec.backups.schedule",
            "must be a 5-field cron expression or a @macro",
        ],
    },
    Bad {
        what: "empty backup retention",
        path: "spec.backups.retention",
        value: "{}",
        expect: &[
            "spec.backups.retention",
            "retention needs days, count or both",
        ],
    },
    Bad {
        what: "empty Secret name",
        path: "spec.database.connectionSecretRef.name",
        value: "\"\"",
        expect: &[
            "spec.database.connectionSecretRef.name",
            "at least 1 chars long",
        ],
    },
    Bad {
        what: "bad flag name",
        path: "spec.featureFlags.flags.0.name",
        value: "no spaces please",
        expect: &[
            "spec.featureFlags.flags[0].name",
            "flag names are letters, digits",
        ],
    },
];

#[test]
fn invalid_policies_are_rejected_with_messages_naming_the_field() {
    let env = Envtest::start(ApiServer::Crd);
    env.install_crds();

    // The base is valid: every failure below comes from the one change the case makes.
    let out = apply(&env, BASE);
    assert!(
        out.status.success(),
        "BASE rejected:\n{}",
        support_envtest::text(&out)
    );
    env.kubectl_ok(&["delete", "dbpol", "base", "-n", "default"], None);

    let mut failures = Vec::new();
    for (i, case) in BAD.iter().enumerate() {
        let mut doc = base();
        doc["metadata"]["name"] = format!("bad-{i}").into();
        *at(&mut doc, case.path) = serde_yaml::from_str(case.value).expect("case value");
        let out = apply(&env, &json(&doc));
        let msg = support_envtest::text(&out);
        if out.status.success() {
            failures.push(format!("{}: accepted\n{msg}", case.what));
            continue;
        }
        let missing: Vec<_> = case.expect.iter().filter(|e| !msg.contains(**e)).collect();
        if !missing.is_empty() {
            failures.push(format!("{}: message lacks {missing:?}:\n{msg}", case.what));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));

    // Nothing was stored.
    let list = get_json(&env, &["get", "dbpol", "-A"]);
    assert_eq!(
        list["items"],
        serde_json::json!([]),
        "bad policies were stored"
    );
}

#[test]
fn finalizer_holds_deletion_until_removed() {
    let env = Envtest::start(ApiServer::Crd);
    env.install_crds();
    apply(&env, BASE);
    env.kubectl_ok(
        &[
            "patch",
            "dbpol",
            "base",
            "-n",
            "default",
            "--type=merge",
            "-p",
            r#"{"metadata":{"finalizers":["dbpolicy.dev/cleanup"]}}"#,
        ],
        None,
    );
    env.kubectl_ok(
        &["delete", "dbpol", "base", "-n", "default", "--wait=false"],
        None,
    );
    // The finalizer holds the object: deletionTimestamp set, object still there.
    let obj = get_json(&env, &["get", "dbpol", "base", "-n", "default"]);
    assert!(obj["metadata"]["deletionTimestamp"].is_string(), "{obj}");
    env.kubectl_ok(
        &[
            "patch",
            "dbpol",
            "base",
            "-n",
            "default",
            "--type=merge",
            "-p",
            r#"{"metadata":{"finalizers":null}}"#,
        ],
        None,
    );
    wait_for(Duration::from_secs(20), "policy deleted", || {
        let out = env.kubectl(&["get", "dbpol", "base", "-n", "default"], None);
        if out.status.success() {
            Err("still there".into())
        } else {
            Ok(())
        }
    });
}
