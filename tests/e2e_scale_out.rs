//! Several operator processes against one real kube-apiserver 1.20 (`hack/envtest.sh`) and
//! the test PostgreSQL server: scale-out by label selector, leader-election hand-over
//! (SIGTERM and SIGKILL of the holder), and the API server stopped and restarted under a
//! running operator.
//!
//! Every operator runs the real binary with the Helm chart's ServiceAccount token, as
//! `tests/e2e_operator.rs` does. Which process reconciled what is read from each
//! process's `/metrics` (`dbpolicy_reconciles_total`, `dbpolicy_changes_applied_total`,
//! `dbpolicy_leader`) and its log. Nothing sleeps: every wait polls with a deadline.

use dbpolicy_test_support as support;
use dbpolicy_test_support::envtest as support_envtest;
use dbpolicy_test_support::helm as support_helm;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::TestDb;
use support_envtest::{process_running, wait_for, ApiServer, Envtest};

const NS: &str = "scale";
/// Where the operators' Leases are: the chart's release namespace.
const LEASE_NS: &str = support_helm::RELEASE_NAMESPACE;

/// The operator's Lease duration (`src/controller/lease.rs`).
const LEASE_DURATION: Duration = Duration::from_secs(15);
const WAIT: Duration = Duration::from_secs(30);

/// `dbpolicy run` as a child process with its own admin port and log, killed on drop.
struct Operator {
    name: String,
    child: Child,
    log: PathBuf,
    admin: String,
}

impl Operator {
    fn start(env: &Envtest, kubeconfig: &Path, name: &str, args: &[&str]) -> Operator {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let admin = format!("127.0.0.1:{port}");
        let log = env.run_dir().join(format!("operator-{name}.log"));
        let file = std::fs::File::create(&log).expect("operator log");
        let child = Command::new(env!("CARGO_BIN_EXE_dbpolicy"))
            // The Lease in the release namespace, where the chart's Role grants it.
            .args(["run", "--admin-addr", &admin, "--lease-namespace", LEASE_NS])
            .args(["--lease-identity", name])
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,dbpolicy=debug")
            .env_remove("DATABASE_URL")
            .env_remove("WATCH_NAMESPACE")
            .env_remove("POD_NAME")
            .env_remove("POD_NAMESPACE")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("start dbpolicy run");
        Operator {
            name: name.to_owned(),
            child,
            log,
            admin,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn running(&self) -> bool {
        process_running(self.pid())
    }

    #[track_caller]
    fn assert_running(&self) {
        assert!(
            self.running(),
            "operator {} exited; its log:\n{}",
            self.name,
            self.log_tail()
        );
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        let s = self.log_text();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// GET `path` from the admin server: (status code, body).
    fn get(&self, path: &str) -> Result<(u16, String), String> {
        support_envtest::http_get(&self.admin, path)
    }

    /// The sum of every sample of metric `name` (all label sets) on `/metrics`.
    fn metric(&self, name: &str) -> Result<f64, String> {
        let (code, body) = self.get("/metrics")?;
        if code != 200 {
            return Err(format!("/metrics answered {code}"));
        }
        Ok(metric_sum(&body, name))
    }

    #[track_caller]
    fn metric_now(&self, name: &str) -> f64 {
        self.metric(name)
            .unwrap_or_else(|e| panic!("{}: {name}: {e}", self.name))
    }

    fn reconciles(&self) -> f64 {
        self.metric_now("dbpolicy_reconciles_total")
    }

    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {sig} {}: {status}", self.pid());
    }

    /// Waits (polling) for the process to exit; its exit status.
    fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "operator {} still running {timeout:?} after the signal:\n{}",
                self.name,
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- last lines of operator {}'s log ({}):\n{}",
                self.name,
                self.log.display(),
                self.log_tail()
            );
        }
    }
}

fn metric_sum(body: &str, name: &str) -> f64 {
    body.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The timestamps (RFC 3339, UTC, fixed width: they sort as text) of the log lines that
/// show a reconcile running or ending.
fn reconcile_times(log: &str) -> Vec<String> {
    log.lines()
        .map(strip_ansi)
        .filter(|l| {
            [
                "reconciling object",
                "reconciled policy=",
                "reconcile error",
            ]
            .iter()
            .any(|n| l.contains(n))
        })
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-byte
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The kube-apiserver with the CRD, namespace `scale`, the Secret `db` (the test
/// database's URI) and the chart's RBAC; returns the server and a kubeconfig acting as the
/// chart's ServiceAccount.
fn cluster(db: &TestDb) -> (Envtest, PathBuf) {
    let env = Envtest::start(ApiServer::Kube);
    env.install_crds();
    env.kubectl_ok(&["create", "namespace", NS], None);
    env.kubectl_ok(
        &[
            "create",
            "secret",
            "generic",
            "db",
            "-n",
            NS,
            &format!("--from-literal=uri={}", db.url()),
        ],
        None,
    );
    let kubeconfig = support_helm::install_rbac(&env);
    (env, kubeconfig)
}

/// The schema a policy's flags table lives in: one per policy, so policies sharing the
/// database never share a flags table or `feature_enabled()`.
fn schema_of(policy: &str) -> String {
    policy.replace('-', "_")
}

/// A policy managing one flag, `f`, in its own schema's flags table.
fn apply_policy(env: &Envtest, name: &str, shard: Option<&str>, rollout: u8) {
    let mut metadata = json!({"name": name, "namespace": NS});
    if let Some(shard) = shard {
        metadata["labels"] = json!({ "shard": shard });
    }
    let doc = json!({
        "apiVersion": "dbpolicy.dev/v1alpha1", "kind": "DatabasePolicy",
        "metadata": metadata,
        "spec": {
            "database": {"connectionSecretRef": {"name": "db"}},
            "driftCheckInterval": "10s",
            "featureFlags": {"schema": schema_of(name), "flags": [
                {"name": "f", "enabled": true, "rolloutPercentage": rollout},
            ]},
        },
    });
    // 1.20 has no server-side field validation, and kubectl cannot read the CRD's nullable
    // enums from its OpenAPI.
    env.kubectl_ok(
        &["apply", "--validate=false", "-f", "-"],
        Some(&doc.to_string()),
    );
}

fn get(env: &Envtest, name: &str) -> Value {
    serde_json::from_str(&env.kubectl_ok(&["get", "dbpol", name, "-n", NS, "-o", "json"], None))
        .expect("json")
}

/// Waits until `name`'s status describes its current generation with Ready=True, while
/// every operator in `ops` keeps running.
#[track_caller]
fn wait_ready(env: &Envtest, ops: &[&Operator], name: &str) -> Value {
    wait_ready_within(WAIT, env, ops, name)
}

#[track_caller]
fn wait_ready_within(timeout: Duration, env: &Envtest, ops: &[&Operator], name: &str) -> Value {
    wait_for(
        timeout,
        &format!("{NS}/{name}: Ready for its generation"),
        || {
            for op in ops {
                op.assert_running();
            }
            let obj = get(env, name);
            let generation = &obj["metadata"]["generation"];
            let ready = obj["status"]["conditions"]
                .as_array()
                .and_then(|c| c.iter().find(|c| c["type"] == "Ready"));
            if obj["status"]["observedGeneration"] == *generation
                && ready.is_some_and(|r| r["status"] == "True")
            {
                Ok(obj)
            } else {
                Err(format!("generation {generation}, status {}", obj["status"]))
            }
        },
    )
}

async fn rollout(db: &TestDb, policy: &str) -> Option<i32> {
    let schema = schema_of(policy);
    let exists: Option<String> = db
        .query_scalar(&format!(
            "SELECT to_regclass('{schema}.feature_flags')::text"
        ))
        .await;
    exists?;
    let rows: Vec<i32> = db
        .query_column(&format!(
            "SELECT rollout_percentage FROM {schema}.feature_flags WHERE name = 'f'"
        ))
        .await;
    rows.first().copied()
}

fn lease_holder(env: &Envtest, lease: &str) -> String {
    env.kubectl_ok(
        &[
            "get",
            "lease",
            lease,
            "-n",
            LEASE_NS,
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ],
        None,
    )
}

#[track_caller]
fn wait_leader(op: &Operator) {
    wait_for(WAIT, &format!("{} holds its Lease", op.name), || {
        op.assert_running();
        match op.metric("dbpolicy_leader") {
            Ok(1.0) => Ok(()),
            other => Err(format!("dbpolicy_leader: {other:?}")),
        }
    });
}

/// Two deployments split the policies by label selector, each with its own Lease: each
/// reconciles exactly its own policies, a policy no selector matches is left alone, and a
/// relabelled policy moves to the other shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn label_selector_shards_split_the_policies() {
    let db = TestDb::new().await;
    let policies = [
        ("pol-a1", "a"),
        ("pol-a2", "a"),
        ("pol-b1", "b"),
        ("pol-c1", "c"),
    ];
    for (name, _) in &policies {
        db.exec(&format!("CREATE SCHEMA {}", schema_of(name))).await;
    }
    let (env, kubeconfig) = cluster(&db);
    for (name, shard) in &policies {
        apply_policy(&env, name, Some(shard), 10);
    }
    let a = Operator::start(
        &env,
        &kubeconfig,
        "shard-a",
        &["--selector", "shard=a", "--lease-name", "dbpolicy-shard-a"],
    );
    let b = Operator::start(
        &env,
        &kubeconfig,
        "shard-b",
        &["-l", "shard=b", "--lease-name", "dbpolicy-shard-b"],
    );
    for name in ["pol-a1", "pol-a2", "pol-b1"] {
        wait_ready(&env, &[&a, &b], name);
        assert_eq!(rollout(&db, name).await, Some(10), "{name}");
    }
    // Both shards lead at once: distinct Leases.
    wait_leader(&a);
    wait_leader(&b);
    assert_eq!(lease_holder(&env, "dbpolicy-shard-a"), "shard-a");
    assert_eq!(lease_holder(&env, "dbpolicy-shard-b"), "shard-b");

    // Each process applied the changes of its own policies only: 3 per policy (the flags
    // table, feature_enabled(), the flag).
    let changes = "dbpolicy_changes_applied_total";
    wait_for(WAIT, "changes counted by shard", || {
        let got = (a.metric(changes)?, b.metric(changes)?);
        if got == (6.0, 3.0) {
            Ok(())
        } else {
            Err(format!("(shard-a, shard-b) = {got:?}"))
        }
    });
    assert!(a.reconciles() > 0.0 && b.reconciles() > 0.0);

    // No selector matches pol-c1: no status, no finalizer, nothing in its schema.
    let c1 = get(&env, "pol-c1");
    assert!(c1["status"].is_null(), "pol-c1 was reconciled: {c1}");
    assert!(c1["metadata"]["finalizers"].is_null(), "{c1}");
    assert_eq!(rollout(&db, "pol-c1").await, None);

    // Each log names its own policies only.
    let (log_a, log_b) = (a.log_text(), b.log_text());
    for own in ["pol-a1", "pol-a2"] {
        assert!(log_a.contains(own), "shard-a's log lacks {own}:\n{log_a}");
    }
    assert!(
        log_b.contains("pol-b1"),
        "shard-b's log lacks pol-b1:\n{log_b}"
    );
    for (log, shard, others) in [
        (&log_a, "shard-a", ["pol-b1", "pol-c1"]),
        (&log_b, "shard-b", ["pol-a1", "pol-c1"]),
    ] {
        for other in others {
            assert!(!log.contains(other), "{shard}'s log names {other}:\n{log}");
        }
    }

    // Relabelled to shard b, pol-c1 is taken up by shard-b, and shard-a never sees it.
    env.kubectl_ok(
        &[
            "label",
            "dbpol",
            "pol-c1",
            "-n",
            NS,
            "shard=b",
            "--overwrite",
        ],
        None,
    );
    wait_ready(&env, &[&a, &b], "pol-c1");
    assert_eq!(rollout(&db, "pol-c1").await, Some(10));
    wait_for(WAIT, "shard-b counts pol-c1's changes", || {
        let got = (a.metric(changes)?, b.metric(changes)?);
        if got == (6.0, 6.0) {
            Ok(())
        } else {
            Err(format!("(shard-a, shard-b) = {got:?}"))
        }
    });
    assert!(b.log_text().contains("pol-c1"));
    assert!(
        !a.log_text().contains("pol-c1"),
        "shard-a reconciled pol-c1"
    );
}

/// Two replicas, one Lease: the standby reconciles nothing; after `signal` to the holder
/// the standby takes over within `takeover` and reconciles a policy edited afterwards,
/// and at no moment did both reconcile.
async fn hand_over(signal: &str, takeover: Duration) {
    const LEASE: &str = "dbpolicy-ha";
    let db = TestDb::new().await;
    db.exec(&format!("CREATE SCHEMA {}", schema_of("pol-ha")))
        .await;
    let (env, kubeconfig) = cluster(&db);
    apply_policy(&env, "pol-ha", None, 10);
    let mut first = Operator::start(&env, &kubeconfig, "ha-1", &["--lease-name", LEASE]);
    wait_leader(&first);
    let second = Operator::start(&env, &kubeconfig, "ha-2", &["--lease-name", LEASE]);
    wait_ready(&env, &[&first, &second], "pol-ha");
    assert_eq!(rollout(&db, "pol-ha").await, Some(10));
    // The standby is ready (it read the Lease) but not leading, and reconciles nothing
    // while the holder goes on (driftCheckInterval 10s: the holder's counter grows).
    wait_for(WAIT, "the standby is ready", || {
        match second.get("/readyz") {
            Ok((200, _)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    let before = first.reconciles();
    wait_for(WAIT, "the holder requeues the policy", || {
        second.assert_running();
        let (holder, standby) = (first.reconciles(), second.reconciles());
        assert_eq!(standby, 0.0, "the standby reconciled while ha-1 led");
        if holder > before {
            Ok(())
        } else {
            Err(format!("holder {holder}"))
        }
    });
    assert_eq!(second.metric_now("dbpolicy_leader"), 0.0);
    assert_eq!(lease_holder(&env, LEASE), "ha-1");

    let killed = Instant::now();
    first.signal(signal);
    // Until the standby leads: whenever the standby has reconciled, the old holder must no
    // longer be leading. Its leader gauge drops to 0 before it releases the Lease, so
    // reading the standby's counter first and the holder's gauge second never reports a
    // proper hand-over as overlap.
    wait_for(
        LEASE_DURATION + Duration::from_secs(15),
        "the standby takes over",
        || {
            second.assert_running();
            let standby_reconciles = second.reconciles();
            let holder_leading = first.metric("dbpolicy_leader").unwrap_or(0.0) == 1.0;
            assert!(
                !(standby_reconciles > 0.0 && holder_leading),
                "both replicas reconciling: ha-2 has {standby_reconciles} reconciles while ha-1 leads"
            );
            if second.metric_now("dbpolicy_leader") == 1.0 {
                Ok(())
            } else {
                Err("ha-2 not leading yet".to_owned())
            }
        },
    );
    let took = killed.elapsed();
    eprintln!("{signal}: ha-2 took over {took:?} after the signal");
    assert!(
        took < takeover,
        "ha-2 took over after {took:?}, more than {takeover:?}"
    );
    let status = first.wait_exit(Duration::from_secs(20));
    if signal == "-TERM" {
        assert!(status.success(), "ha-1 after SIGTERM: {status}");
        let log = first.log_text();
        assert!(
            log.contains("leader lease released"),
            "{}",
            first.log_tail()
        );
    }
    assert_eq!(lease_holder(&env, LEASE), "ha-2");
    // The logs agree: ha-1's last reconcile ended before ha-2's first began.
    let last_of_first = reconcile_times(&first.log_text()).last().cloned();
    let first_of_second = reconcile_times(&second.log_text()).first().cloned();
    assert!(last_of_first.is_some(), "ha-1 logged no reconcile");
    if let Some(second_started) = &first_of_second {
        assert!(
            last_of_first.as_ref() < Some(second_started),
            "overlap: ha-1 reconciled at {last_of_first:?}, ha-2 already at {second_started}"
        );
    }

    // A change after the hand-over is reconciled by the new holder.
    let before = second.reconciles();
    apply_policy(&env, "pol-ha", None, 60);
    wait_ready(&env, &[&second], "pol-ha");
    assert_eq!(rollout(&db, "pol-ha").await, Some(60));
    assert!(second.reconciles() > before);
}

/// The holder finishes its reconciles, releases the Lease and exits 0; the standby, which
/// reads the Lease every second, takes it at once instead of waiting out the lease
/// duration (before that fix: 13 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_hand_over_on_sigterm() {
    hand_over("-TERM", Duration::from_secs(6)).await;
}

/// A killed holder releases nothing: the standby takes the Lease once it expired (at most
/// its duration after the last renewal), after a random pause of up to a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_hand_over_on_sigkill() {
    hand_over("-KILL", LEASE_DURATION + Duration::from_secs(5)).await;
}

/// The API server stops (etcd keeps the data) under a running operator and comes back on
/// the same port: the operator keeps running, keeps its Lease, and reconciles an edit
/// made after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_survives_an_api_server_restart() {
    let db = TestDb::new().await;
    db.exec(&format!("CREATE SCHEMA {}", schema_of("pol-api")))
        .await;
    let (env, kubeconfig) = cluster(&db);
    apply_policy(&env, "pol-api", None, 10);
    let op = Operator::start(&env, &kubeconfig, "api", &["--lease-name", "dbpolicy-api"]);
    wait_ready(&env, &[&op], "pol-api");
    wait_leader(&op);
    let pid = op.pid();

    let logged = op.log_text().len();
    let stopped = Instant::now();
    env.stop_apiserver();
    // Down until the operator has noticed: its watches and the Lease renewal fail.
    wait_for(WAIT, "the operator notices the API server is gone", || {
        op.assert_running();
        let log = op.log_text();
        let new = log.get(logged..).unwrap_or_default();
        if new.contains("error") || new.contains("ERROR") || new.contains("WARN") {
            Ok(())
        } else {
            Err(format!("nothing logged yet:\n{new}"))
        }
    });
    op.assert_running();
    assert_eq!(
        op.get("/healthz").map(|r| r.0),
        Ok(200),
        "healthz while down"
    );
    env.restart_apiserver();
    eprintln!("the API server was down for {:?}", stopped.elapsed());

    // The watches come back after kube-runtime's watcher backoff (0.8 s doubling up to
    // 30 s, with jitter), so the edit is seen at most about 30 s after the restart.
    let back = Instant::now();
    apply_policy(&env, "pol-api", None, 70);
    wait_ready_within(Duration::from_secs(90), &env, &[&op], "pol-api");
    eprintln!(
        "the edit was reconciled {:?} after the restart",
        back.elapsed()
    );
    assert_eq!(rollout(&db, "pol-api").await, Some(70));
    op.assert_running();
    assert_eq!(op.pid(), pid);
    assert_eq!(op.metric_now("dbpolicy_leader"), 1.0);
    assert_eq!(lease_holder(&env, "dbpolicy-api"), "api");
}
