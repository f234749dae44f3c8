//! `kubectl dbpolicy` against the real kube-apiserver of `hack/envtest.sh`: the binary,
//! symlinked as `kubectl-dbpolicy` into a directory on PATH, is found and run by kubectl
//! itself; `status` and `plan` read what the operator wrote through the status
//! subresource, `reconcile` sets the force-reconcile annotation and nothing else, and a
//! missing policy is an error with exit status 1.

use dbpolicy_test_support::envtest as support_envtest;

use std::path::Path;
use std::process::Output;

use serde_json::{json, Value};
use support_envtest::{text, ApiServer, Envtest};

const POLICY: &str = "apiVersion: dbpolicy.dev/v1alpha1
kind: DatabasePolicy
metadata: {name: certquiz, namespace: quiz, annotations: {team: quiz}}
spec:
  database: {connectionSecretRef: {name: certquiz-db}}
  mode: Plan
  featureFlags:
    flags:
      - {name: new_quiz_engine, enabled: true}
";

/// `kubectl dbpolicy ARGS` with the plugin directory first on PATH.
fn plugin(env: &Envtest, dir: &Path, args: &[&str]) -> Output {
    let path = std::env::join_paths(std::iter::once(dir.to_path_buf()).chain(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
    ))
    .unwrap();
    let mut cmd = env.kubectl_cmd();
    cmd.env("PATH", path).arg("dbpolicy").args(args);
    cmd.output().expect("kubectl runs")
}

fn ok(out: Output) -> String {
    assert!(out.status.success(), "failed: {}", text(&out));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn kubectl_dbpolicy_status_plan_and_reconcile() {
    let env = Envtest::start(ApiServer::Kube);
    env.install_crds();
    env.kubectl_ok(&["create", "namespace", "quiz"], None);
    env.kubectl_ok(&["apply", "-f", "-"], Some(POLICY));

    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(
        env!("CARGO_BIN_EXE_dbpolicy"),
        dir.path().join("kubectl-dbpolicy"),
    )
    .unwrap();
    let listed = env
        .kubectl_cmd()
        .env(
            "PATH",
            format!(
                "{}:{}",
                dir.path().display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .args(["plugin", "list"])
        .output()
        .unwrap();
    assert!(
        text(&listed).contains("kubectl-dbpolicy"),
        "{}",
        text(&listed)
    );

    // Before the operator wrote anything.
    let out = ok(plugin(
        &env,
        dir.path(),
        &["status", "certquiz", "-n", "quiz"],
    ));
    assert!(out.contains("Generation:  1 (observed never)"), "{out}");
    assert!(out.contains("No area reported yet."), "{out}");
    let out = ok(plugin(
        &env,
        dir.path(),
        &["plan", "certquiz", "-n", "quiz"],
    ));
    assert_eq!(out, "-- quiz/certquiz: nothing pending\n");

    // What the operator writes in Plan mode.
    let status = json!({"status": {
        "observedGeneration": 1,
        "mode": "Plan",
        "pendingChanges": 1,
        "conditions": [
            {"type": "Ready", "status": "False", "reason": "PlanPending",
             "message": "featureFlags: 1 change(s) pending (spec.mode is Plan; see status.pendingPlan)",
             "lastTransitionTime": "2026-11-29T10:00:00Z", "observedGeneration": 1},
            {"type": "FeatureFlagsReady", "status": "False", "reason": "PlanPending",
             "message": "1 change(s) pending (spec.mode is Plan; see status.pendingPlan)",
             "lastTransitionTime": "2026-11-29T10:00:00Z", "observedGeneration": 1},
            {"type": "Drifted", "status": "False", "reason": "ChangesPending", "message": "pending, not drift",
             "lastTransitionTime": "2026-11-29T10:00:00Z", "observedGeneration": 1},
        ],
        "pendingPlan": {"total": 1, "destructive": 0, "byArea": {"featureFlags": 1}, "truncated": false,
            "changes": [{"area": "featureFlags", "target": "new_quiz_engine", "hazard": "safe",
                "summary": "upsert flag new_quiz_engine (enabled=true, rollout=100%)",
                "sql": "INSERT INTO public.feature_flags (name, enabled) VALUES ('new_quiz_engine', true)"}]},
    }});
    env.kubectl_ok(
        &[
            "patch",
            "dbpol",
            "certquiz",
            "-n",
            "quiz",
            "--subresource=status",
            "--type=merge",
            "-p",
            &status.to_string(),
        ],
        None,
    );
    let out = ok(plugin(
        &env,
        dir.path(),
        &["status", "certquiz", "-n", "quiz"],
    ));
    assert!(
        out.contains(
            "Ready:       False PlanPending: featureFlags: 1 change(s) pending (spec.mode is Plan; see status.pendingPlan)"
        ),
        "{out}"
    );
    assert!(
        out.contains("featureFlags  False   PlanPending  1        1 change(s) pending"),
        "{out}"
    );
    let out = ok(plugin(
        &env,
        dir.path(),
        &["plan", "certquiz", "-n", "quiz"],
    ));
    assert!(
        out.contains("-- featureFlags new_quiz_engine [safe]: upsert flag new_quiz_engine (enabled=true, rollout=100%)\nINSERT INTO public.feature_flags (name, enabled) VALUES ('new_quiz_engine', true);\n"),
        "{out}"
    );

    // reconcile: the annotation is set, the spec and other annotations are not touched.
    let before: Value = serde_json::from_str(&env.kubectl_ok(
        &["get", "dbpol", "certquiz", "-n", "quiz", "-o", "json"],
        None,
    ))
    .unwrap();
    let out = ok(plugin(
        &env,
        dir.path(),
        &["reconcile", "certquiz", "-n", "quiz"],
    ));
    assert!(
        out.starts_with(
            "databasepolicy quiz/certquiz: reconcile requested (dbpolicy.dev/reconcile-at="
        ),
        "{out}"
    );
    let after: Value = serde_json::from_str(&env.kubectl_ok(
        &["get", "dbpol", "certquiz", "-n", "quiz", "-o", "json"],
        None,
    ))
    .unwrap();
    let stamp = after["metadata"]["annotations"]["dbpolicy.dev/reconcile-at"]
        .as_str()
        .unwrap();
    assert!(out.contains(stamp), "{out}");
    assert_eq!(after["metadata"]["annotations"]["team"], "quiz");
    assert_eq!(after["spec"], before["spec"]);
    assert_eq!(
        after["metadata"]["generation"],
        before["metadata"]["generation"]
    );
    assert_ne!(
        after["metadata"]["resourceVersion"], before["metadata"]["resourceVersion"],
        "the object changed, so the controller's watch wakes"
    );

    // Errors: a missing policy, exit status 1 and a message naming it.
    let missing = plugin(&env, dir.path(), &["status", "nope", "-n", "quiz"]);
    assert_eq!(missing.status.code(), Some(1), "{}", text(&missing));
    assert!(
        text(&missing).contains("databasepolicy quiz/nope not found"),
        "{}",
        text(&missing)
    );
    let missing = plugin(&env, dir.path(), &["reconcile", "nope", "-n", "quiz"]);
    assert_eq!(missing.status.code(), Some(1), "{}", text(&missing));
    assert!(
        env.kubectl(&["get", "dbpol", "nope", "-n", "quiz"], None)
            .status
            .code()
            != Some(0)
    );
}
