//! The operator over a policy's whole life (issue 14), against real API servers started by
//! `hack/envtest.sh` and real PostgreSQL:
//!
//! - an existing Secret of the application named by `replicas.readEndpointSecretName` is
//!   `SecretNotOwned`: never overwritten, never given an ownerReference (kube-apiserver 1.20);
//! - a replica's connection Secret created after the policy re-triggers it at once (no
//!   drift check in between: `driftCheckInterval: 24h`);
//! - deletion releases the policy's claims in `dbpolicy.managed`, so a successor of another
//!   name adopts the same flags without a hand edit; Retain keeps what was set;
//! - a replication slot the policy created is reported in a Warning Event on deletion
//!   (Retain) or dropped (`deletionPolicy: Reset`) (a throwaway server: slots are server-wide);
//! - a server setting is owned server-wide: a policy on another database of the same server
//!   that wants another value is `OwnershipConflict` naming the owner, and the value is not
//!   flipped; the owner's deletion frees it for the other (a throwaway server);
//! - `driftCheckInterval` outside 10s..24h is refused by the CRD server's CEL rule.
//!
//! The CronJob half of "never adopt" runs against the mocked API (1.20 serves no batch/v1
//! CronJob): `controller::reconcile::tests::a_cronjob_of_another_owner_is_never_taken_over`.

use dbpolicy_test_support as support;
use dbpolicy_test_support::envtest as support_envtest;
use dbpolicy_test_support::helm as support_helm;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use support::{PgServer, PgServerOptions, TestDb};
use support_envtest::{wait_for, ApiServer, Envtest};

const NS: &str = "e2e";
const WAIT: Duration = Duration::from_secs(60);

/// `dbpolicy run` as the chart's ServiceAccount (the chart's RBAC), killed on drop; its
/// log is shown when a test fails.
struct Operator {
    child: Child,
    log: PathBuf,
}

impl Operator {
    fn start(env: &Envtest) -> Operator {
        let kubeconfig = support_helm::install_rbac(env);
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let log = env.run_dir().join("operator.log");
        let file = std::fs::File::create(&log).expect("operator log");
        let child = Command::new(env!("CARGO_BIN_EXE_dbpolicy"))
            .args(["run", "--no-leader-election", "--admin-addr"])
            .arg(format!("127.0.0.1:{port}"))
            .env("KUBECONFIG", &kubeconfig)
            .env("RUST_LOG", "info,dbpolicy=debug")
            .env_remove("DATABASE_URL")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("start dbpolicy run");
        Operator { child, log }
    }

    fn assert_running(&mut self) {
        if let Ok(Some(exit)) = self.child.try_wait() {
            panic!("the operator exited ({exit})");
        }
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let s = std::fs::read_to_string(&self.log).unwrap_or_default();
            let lines: Vec<&str> = s.lines().collect();
            eprintln!(
                "--- last lines of the operator's log ({}):\n{}",
                self.log.display(),
                lines[lines.len().saturating_sub(40)..].join("\n")
            );
        }
    }
}

fn apply(env: &Envtest, doc: &Value) {
    // 1.20 has no server-side field validation, and kubectl cannot read the CRD's nullable
    // enums from its OpenAPI.
    env.kubectl_ok(
        &["apply", "--validate=false", "-f", "-"],
        Some(&doc.to_string()),
    );
}

fn policy(name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "dbpolicy.dev/v1alpha1", "kind": "DatabasePolicy",
        "metadata": {"name": name, "namespace": NS},
        "spec": spec,
    })
}

fn secret(env: &Envtest, name: &str, key: &str, value: &str) {
    env.kubectl_ok(
        &[
            "create",
            "secret",
            "generic",
            name,
            "-n",
            NS,
            &format!("--from-literal={key}={value}"),
        ],
        None,
    );
}

fn get(env: &Envtest, kind: &str, name: &str) -> Value {
    serde_json::from_str(&env.kubectl_ok(&["get", kind, name, "-n", NS, "-o", "json"], None))
        .expect("json")
}

fn condition(obj: &Value, ty: &str) -> Value {
    obj["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == ty))
        .cloned()
        .unwrap_or(Value::Null)
}

/// Waits until `check` accepts the policy's current status (for its current generation).
#[track_caller]
fn wait_status(
    env: &Envtest,
    op: &mut Operator,
    name: &str,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    wait_for(WAIT, &format!("{name}: {what}"), || {
        op.assert_running();
        let obj = get(env, "dbpol", name);
        if obj["status"]["observedGeneration"] == obj["metadata"]["generation"] && check(&obj) {
            Ok(obj)
        } else {
            Err(obj["status"].to_string())
        }
    })
}

fn ready_is(obj: &Value, status: &str, reason: &str) -> bool {
    let ready = condition(obj, "Ready");
    ready["status"] == status && ready["reason"] == reason
}

/// The Events about `name` with `reason`, as (type, note).
fn events(env: &Envtest, name: &str, reason: &str) -> Vec<(String, String)> {
    let list: Value =
        serde_json::from_str(&env.kubectl_ok(&["get", "events", "-n", NS, "-o", "json"], None))
            .unwrap();
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["involvedObject"]["name"] == name && e["reason"] == reason)
        .map(|e| {
            (
                e["type"].as_str().unwrap_or("").to_string(),
                e["message"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

#[track_caller]
fn wait_event(env: &Envtest, name: &str, reason: &str) -> (String, String) {
    wait_for(WAIT, &format!("an Event {reason} about {name}"), || {
        events(env, name, reason)
            .pop()
            .ok_or_else(|| "none yet".to_string())
    })
}

fn kube_with_namespace() -> Envtest {
    let env = Envtest::start(ApiServer::Kube);
    env.install_crds();
    env.kubectl_ok(&["create", "namespace", NS], None);
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_takes_over_a_secret_and_watches_replica_secrets() {
    let db = TestDb::new().await;
    let env = kube_with_namespace();
    secret(&env, "app-db", "uri", db.url());
    // The application's own Secret, under the name the policy asks for.
    secret(&env, "app-env", "DATABASE_READ_URL", "postgres://app-owned");
    apply(
        &env,
        &policy(
            "reader",
            json!({
                "database": {"connectionSecretRef": {"name": "app-db"}},
                // No drift check during the test: only a watch can re-trigger the policy.
                "driftCheckInterval": "24h",
                "replicas": {
                    "replicas": [{"name": "r1", "connectionSecretRef": {"name": "r1-db"}}],
                    "readEndpointSecretName": "app-env",
                },
            }),
        ),
    );
    let mut op = Operator::start(&env);

    // 1. The application's Secret: a condition, never written, never owned.
    let obj = wait_status(&env, &mut op, "reader", "Ready=False SecretNotOwned", |o| {
        ready_is(o, "False", "SecretNotOwned")
    });
    let replicas = condition(&obj, "ReplicasReady");
    assert_eq!(replicas["reason"], "SecretNotOwned", "{replicas}");
    let message = condition(&obj, "Ready")["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        message.contains("Secret e2e/app-env (spec.replicas.readEndpointSecretName) exists and was not created by this policy"),
        "{message}"
    );
    let app = get(&env, "secret", "app-env");
    assert_eq!(
        app["data"],
        json!({"DATABASE_READ_URL": "cG9zdGdyZXM6Ly9hcHAtb3duZWQ="}),
        "the application's Secret was changed"
    );
    assert!(
        app["metadata"].get("ownerReferences").is_none(),
        "the application's Secret got an owner: {}",
        app["metadata"]
    );
    // The replica's Secret does not exist yet: not checked, said so.
    assert_eq!(obj["status"]["replicas"][0]["state"], "Unknown", "{obj}");

    // 5. The replica's Secret appears: the policy is reconciled now, not in 24h.
    secret(&env, "r1-db", "uri", db.url());
    wait_status(&env, &mut op, "reader", "r1 checked", |o| {
        o["status"]["replicas"][0]["state"] == "NotInRecovery"
    });

    // Another name: the policy creates its own Secret, owned by it.
    env.kubectl_ok(
        &[
            "patch",
            "dbpol",
            "reader",
            "-n",
            NS,
            "--type=merge",
            "-p",
            r#"{"spec":{"replicas":{"readEndpointSecretName":"reader-read"}}}"#,
        ],
        None,
    );
    let read = wait_for(WAIT, "reader-read is published", || {
        op.assert_running();
        let out = env.kubectl(
            &["get", "secret", "reader-read", "-n", NS, "-o", "json"],
            None,
        );
        if out.status.success() {
            Ok(serde_json::from_slice::<Value>(&out.stdout).unwrap())
        } else {
            Err(support_envtest::text(&out))
        }
    });
    assert_eq!(read["metadata"]["ownerReferences"][0]["name"], "reader");
    assert_eq!(read["metadata"]["ownerReferences"][0]["controller"], true);
    drop(op);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletion_releases_claims_for_a_successor() {
    let db = TestDb::new().await;
    let env = kube_with_namespace();
    secret(&env, "app-db", "uri", db.url());
    let flags = |name: &str, rollout: u8| {
        policy(
            name,
            json!({
                "database": {"connectionSecretRef": {"name": "app-db"}},
                "featureFlags": {"flags": [
                    {"name": "new_engine", "enabled": true, "rolloutPercentage": rollout},
                ]},
            }),
        )
    };
    apply(&env, &flags("first", 25));
    let mut op = Operator::start(&env);
    wait_status(&env, &mut op, "first", "Ready", |o| {
        ready_is(o, "True", "Reconciled")
    });
    let owners: Vec<String> = db
        .query_column("SELECT DISTINCT policy FROM dbpolicy.managed")
        .await;
    assert_eq!(owners, ["e2e/first"]);

    env.kubectl_ok(
        &["delete", "dbpol", "first", "-n", NS, "--timeout=60s"],
        None,
    );
    let (type_, note) = wait_event(&env, "first", "Released");
    assert_eq!(type_, "Normal");
    assert!(note.starts_with("deletionPolicy Retain:"), "{note}");
    let owners: Vec<String> = db
        .query_column("SELECT DISTINCT policy FROM dbpolicy.managed")
        .await;
    assert!(owners.is_empty(), "claims left after deletion: {owners:?}");
    let rollout: Vec<i32> = db
        .query_column("SELECT rollout_percentage FROM public.feature_flags")
        .await;
    assert_eq!(rollout, [25], "Retain keeps what the policy set");

    // A successor of another name takes over the same flags: no OwnershipConflict.
    apply(&env, &flags("successor", 50));
    wait_status(&env, &mut op, "successor", "Ready", |o| {
        ready_is(o, "True", "Reconciled")
    });
    let rollout: Vec<i32> = db
        .query_column("SELECT rollout_percentage FROM public.feature_flags")
        .await;
    assert_eq!(rollout, [50]);
    drop(op);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_created_slot_is_reported_on_retain_and_dropped_on_reset() {
    // Replication slots are server-wide: a throwaway server of its own.
    let server = PgServer::start_with(PgServerOptions::new().replication());
    let db = TestDb::on(&server).await;
    let env = kube_with_namespace();
    secret(&env, "app-db", "uri", db.url());
    let with_slot = |name: &str, slot: &str, deletion: &str| {
        policy(
            name,
            json!({
                "database": {"connectionSecretRef": {"name": "app-db"}},
                "deletionPolicy": deletion,
                "replicas": {"replicas": [
                    {"name": "r1", "connectionSecretRef": {"name": "r1-db"}, "slot": slot},
                ]},
            }),
        )
    };
    apply(&env, &with_slot("keeper", "keeper_slot", "Retain"));
    apply(&env, &with_slot("resetter", "resetter_slot", "Reset"));
    let mut op = Operator::start(&env);
    let slots = || async {
        db.query_column::<String>("SELECT slot_name::text FROM pg_replication_slots ORDER BY 1")
            .await
    };
    for name in ["keeper", "resetter"] {
        wait_status(&env, &mut op, name, "replicas reconciled", |o| {
            !condition(o, "ReplicasReady").is_null()
        });
    }
    assert_eq!(slots().await, ["keeper_slot", "resetter_slot"]);

    env.kubectl_ok(
        &["delete", "dbpol", "keeper", "-n", NS, "--timeout=60s"],
        None,
    );
    let (type_, note) = wait_event(&env, "keeper", "ReplicationSlotRetained");
    assert_eq!(type_, "Warning");
    assert!(
        note.contains("keeper_slot") && note.contains("pg_drop_replication_slot('keeper_slot')"),
        "{note}"
    );
    assert_eq!(slots().await, ["keeper_slot", "resetter_slot"]);

    env.kubectl_ok(
        &["delete", "dbpol", "resetter", "-n", NS, "--timeout=60s"],
        None,
    );
    let (_, note) = wait_event(&env, "resetter", "Released");
    assert!(note.starts_with("deletionPolicy Reset: reset "), "{note}");
    assert_eq!(slots().await, ["keeper_slot"]);
    assert!(events(&env, "resetter", "ReplicationSlotRetained").is_empty());
    drop(op);
}

/// Issue 14, case 3: two policies on two databases of one server set `log_statement`
/// differently. Before, each reconcile flipped it back; now the second is refused with
/// `OwnershipConflict` naming the first, until the first is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_setting_has_one_owner_across_the_databases_of_a_server() {
    // ALTER SYSTEM changes the whole server: a throwaway one.
    let server = PgServer::start();
    let a = TestDb::on(&server).await;
    let b = TestDb::on(&server).await;
    let env = kube_with_namespace();
    secret(&env, "a-db", "uri", a.url());
    secret(&env, "b-db", "uri", b.url());
    let logging = |name: &str, secret: &str, value: &str| {
        policy(
            name,
            json!({
                "database": {"connectionSecretRef": {"name": secret}},
                "serverSettings": {"parameters": {"log_statement": value}},
            }),
        )
    };
    let written = || async {
        let mut c = server.connect().await;
        let v: Option<String> = sqlx::query_scalar(
            "SELECT setting FROM pg_file_settings WHERE sourcefile LIKE '%postgresql.auto.conf' AND name = 'log_statement'",
        )
        .fetch_optional(&mut c)
        .await
        .unwrap();
        v
    };
    apply(&env, &logging("first", "a-db", "ddl"));
    let mut op = Operator::start(&env);
    wait_status(&env, &mut op, "first", "Ready", |o| {
        ready_is(o, "True", "Reconciled")
    });
    apply(&env, &logging("second", "b-db", "all"));
    let obj = wait_status(&env, &mut op, "second", "OwnershipConflict", |o| {
        condition(o, "ServerSettingsReady")["reason"] == "OwnershipConflict"
    });
    let message = condition(&obj, "ServerSettingsReady")["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        message.contains(&format!(
            "server setting log_statement is claimed server-wide by policy e2e/first on database {}",
            a.name()
        )),
        "{message}"
    );
    assert_eq!(condition(&obj, "Ready")["status"], "False");
    // The first policy's next reconcile finds nothing to fix: no flip.
    assert_eq!(written().await.as_deref(), Some("ddl"));
    // A spec edit: a new generation, reconciled at once.
    patch(
        &env,
        "first",
        json!({"spec": {"driftCheckInterval": "11m"}}),
    );
    wait_status(&env, &mut op, "first", "Ready", |o| {
        ready_is(o, "True", "Reconciled")
    });
    assert_eq!(written().await.as_deref(), Some("ddl"));

    // The owner is deleted (Retain): its claim goes, the other policy takes over.
    env.kubectl_ok(
        &["delete", "dbpol", "first", "-n", NS, "--timeout=60s"],
        None,
    );
    let (_, note) = wait_event(&env, "first", "Released");
    assert!(
        note.contains("1 server-wide claim(s) in dbpolicy.server_claims"),
        "{note}"
    );
    patch(
        &env,
        "second",
        json!({"spec": {"driftCheckInterval": "11m"}}),
    );
    wait_status(&env, &mut op, "second", "Ready", |o| {
        ready_is(o, "True", "Reconciled")
    });
    assert_eq!(written().await.as_deref(), Some("all"));
    drop(op);
}

#[test]
fn drift_check_interval_bounds_are_enforced_by_the_api_server() {
    // The CRD server serves no Namespaces: the policy goes to `default`.
    let env = Envtest::start(ApiServer::Crd);
    env.install_crds();
    let doc = |interval: &str| {
        let mut p = policy(
            "bounds",
            json!({
                "database": {"connectionSecretRef": {"name": "db"}},
                "driftCheckInterval": interval,
            }),
        );
        p["metadata"]["namespace"] = json!("default");
        p.to_string()
    };
    for bad in ["0s", "9999ms", "25h", "2d", "999999999999999d", "1441min"] {
        let err = env.kubectl_err(&["apply", "--server-side", "-f", "-"], Some(&doc(bad)));
        assert!(
            err.contains("spec.driftCheckInterval") && err.contains("must be between 10s and 24h"),
            "{bad}: {err}"
        );
    }
    for good in ["10s", "10000ms", "5m", "90min", "24h", "1d"] {
        env.kubectl_ok(&["apply", "--server-side", "-f", "-"], Some(&doc(good)));
    }
    // The format rule still speaks for itself, once.
    let err = env.kubectl_err(&["apply", "--server-side", "-f", "-"], Some(&doc("soon")));
    assert!(
        err.contains("must be a duration such as 30s, 5m or 1h"),
        "{err}"
    );
    assert!(!err.contains("between 10s and 24h"), "{err}");
}

fn patch(env: &Envtest, name: &str, patch: Value) {
    env.kubectl_ok(
        &[
            "patch",
            "dbpol",
            name,
            "-n",
            NS,
            "--type=merge",
            "-p",
            &patch.to_string(),
        ],
        None,
    );
}

async fn rollout(db: &TestDb) -> Vec<i32> {
    db.query_column("SELECT rollout_percentage FROM public.feature_flags ORDER BY name")
        .await
}

/// Conditions each say one true thing (Plan-mode edits are pending, not drift; a suspended
/// policy's areas are not checked; an invalid spec's message is one line), and the
/// `dbpolicy.dev/reconcile-at` annotation forces a check now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditions_say_one_true_thing_and_an_annotation_forces_a_check() {
    let db = TestDb::new().await;
    let env = kube_with_namespace();
    secret(&env, "app-db", "uri", db.url());
    let flags = |extra: Value| {
        let mut spec = json!({
            "database": {"connectionSecretRef": {"name": "app-db"}},
            "driftCheckInterval": "24h",
            "featureFlags": {"flags": [
                {"name": "a", "enabled": true, "rolloutPercentage": 25},
            ]},
        });
        support_helm::merge(&mut spec, &extra);
        spec
    };
    apply(&env, &policy("flags", flags(json!({}))));
    // 1.20 has no CEL: the operator refuses what the CRD's rule would have.
    apply(
        &env,
        &policy("fast", flags(json!({"driftCheckInterval": "2s"}))),
    );
    let mut op = Operator::start(&env);
    wait_status(&env, &mut op, "flags", "Ready", |o| {
        ready_is(o, "True", "Reconciled")
    });

    let bad = wait_status(&env, &mut op, "fast", "InvalidSpec", |o| {
        ready_is(o, "False", "InvalidSpec")
    });
    let message = condition(&bad, "Ready")["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        message,
        "invalid policy: spec.driftCheckInterval: \"2s\" is out of range: between 10s and 1d"
    );

    // The annotation: drift repaired now, with the next drift check a day away.
    db.exec("UPDATE public.feature_flags SET rollout_percentage = 99")
        .await;
    env.kubectl_ok(
        &[
            "annotate",
            "dbpol",
            "flags",
            "-n",
            NS,
            "--overwrite",
            "dbpolicy.dev/reconcile-at=2026-01-01T00:00:00Z",
        ],
        None,
    );
    support::eventually(WAIT, || async {
        match rollout(&db).await.as_slice() {
            [25] => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let repaired = wait_status(&env, &mut op, "flags", "DriftRepaired", |o| {
        condition(o, "Drifted")["reason"] == "DriftRepaired"
    });
    assert_eq!(condition(&repaired, "Drifted")["status"], "True");

    // Plan mode: a spec edit is pending, not drift.
    patch(
        &env,
        "flags",
        json!({"spec": {"mode": "Plan", "featureFlags": {"flags": [
            {"name": "a", "enabled": true, "rolloutPercentage": 25},
            {"name": "b", "enabled": false},
        ]}}}),
    );
    let planned = wait_status(&env, &mut op, "flags", "PlanPending", |o| {
        ready_is(o, "False", "PlanPending")
    });
    let drifted = condition(&planned, "Drifted");
    assert_eq!(
        (&drifted["status"], &drifted["reason"]),
        (&json!("False"), &json!("ChangesPending")),
        "{drifted}"
    );

    // Suspended: the areas say they are not being checked.
    patch(&env, "flags", json!({"spec": {"suspend": true}}));
    let suspended = wait_status(&env, &mut op, "flags", "Suspended", |o| {
        ready_is(o, "False", "Suspended")
    });
    for ty in ["FeatureFlagsReady", "Drifted"] {
        let c = condition(&suspended, ty);
        assert_eq!(
            (&c["status"], &c["reason"]),
            (&json!("Unknown"), &json!("Suspended")),
            "{ty}: {c}"
        );
    }
    drop(op);
}
