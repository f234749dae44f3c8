//! The Helm chart in `charts/dbpolicy`, through real Helm (`hack/install-helm.sh`): it
//! passes `helm lint --strict`, its CRD copy is current, `helm template` renders it over
//! several values files into manifests with restricted pod security and exactly the RBAC
//! the controller needs, values.schema.json refuses bad values, and what Helm renders is
//! accepted by a real kube-apiserver whose RBAC then grants the operator's ServiceAccount
//! what it needs and nothing more (tests/e2e_operator.rs runs the operator under it).

use dbpolicy_test_support as support;
use dbpolicy_test_support::envtest as support_envtest;
use dbpolicy_test_support::helm as support_helm;

use std::collections::BTreeSet;

use serde_json::{json, Value};
use support_envtest::{ApiServer, Envtest};
use support_helm::{chart_dir, helm, template, template_text, RELEASE_NAMESPACE};

/// What `dbpolicy run` does against the API: (API group, resource, verbs). The same list
/// as docs/operator.md's RBAC table: keep both in step with src/controller. The chart's
/// ClusterRole must grant exactly this.
const REQUIRED_RBAC: &[(&str, &str, &[&str])] = &[
    // The controller's watch; the finalizer is added and removed by JSON patch.
    (
        "dbpolicy.dev",
        "databasepolicies",
        &["get", "list", "watch", "patch"],
    ),
    // Status by server-side apply.
    ("dbpolicy.dev", "databasepolicies/status", &["patch"]),
    // Owner references with blockOwnerDeletion on child objects.
    ("dbpolicy.dev", "databasepolicies/finalizers", &["update"]),
    // Connection Secrets, watched so that a changed Secret re-triggers its policies; the
    // replicas' read-endpoint Secret by server-side apply (create: when it is new).
    ("", "secrets", &["get", "list", "watch", "create", "patch"]),
    // Backup pods' termination messages.
    ("", "pods", &["list"]),
    // Backup and refresh CronJobs and their Jobs.
    (
        "batch",
        "cronjobs",
        &["get", "list", "watch", "create", "patch", "delete"],
    ),
    (
        "batch",
        "jobs",
        &["get", "list", "watch", "create", "patch", "delete"],
    ),
    // Point-in-time recovery: the WAL receiver Deployment and its spool claim.
    ("apps", "deployments", &["get", "create", "patch", "delete"]),
    ("", "persistentvolumeclaims", &["get", "create", "delete"]),
    // Events through kube's Recorder (patch: repeats become a series).
    ("events.k8s.io", "events", &["create", "patch"]),
    // kube-lease-manager gets, creates and patches its Lease (never replaces or deletes it).
    ("coordination.k8s.io", "leases", &["get", "create", "patch"]),
];

fn manifests(values: Value) -> Vec<Value> {
    template(&values).unwrap_or_else(|e| panic!("helm template refused {values}: {e}"))
}

/// Helm's error for values it must refuse.
fn refused(values: Value) -> String {
    match template_text(&values) {
        Ok(text) => panic!("helm template accepted {values}:\n{text}"),
        Err(e) => e,
    }
}

#[test]
fn helm_lint_strict_passes() {
    let chart = chart_dir();
    let out = helm(&["lint", "--strict", chart.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "helm lint --strict charts/dbpolicy:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn kinds(docs: &[Value]) -> Vec<String> {
    let mut k: Vec<String> = docs
        .iter()
        .map(|d| d["kind"].as_str().unwrap().to_owned())
        .collect();
    k.sort();
    k
}

fn one<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<_> = docs.iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "expected one {kind}, got {}", found.len());
    found[0]
}

/// Every (group, resource, verb) the chart's ClusterRole and Roles grant, with where:
/// the ClusterRole (`None`) or the namespace of the Role.
fn grants(docs: &[Value]) -> BTreeSet<(Option<String>, String, String, String)> {
    let mut set = BTreeSet::new();
    for role in docs
        .iter()
        .filter(|d| d["kind"] == "ClusterRole" || d["kind"] == "Role")
    {
        let ns = role["metadata"]["namespace"].as_str().map(str::to_owned);
        assert_eq!(ns.is_some(), role["kind"] == "Role", "{role}");
        for rule in role["rules"].as_array().expect("rules") {
            let list = |k: &str| -> Vec<String> {
                rule[k]
                    .as_array()
                    .unwrap_or_else(|| panic!("rule without {k}: {rule}"))
                    .iter()
                    .map(|v| v.as_str().unwrap().to_owned())
                    .collect()
            };
            for g in list("apiGroups") {
                for r in list("resources") {
                    for v in list("verbs") {
                        set.insert((ns.clone(), g.clone(), r.clone(), v));
                    }
                }
            }
            assert!(rule.get("resourceNames").is_none() || rule["resourceNames"].is_array());
        }
    }
    set
}

/// [`grants`] without where.
fn granted(docs: &[Value]) -> BTreeSet<(String, String, String)> {
    grants(docs)
        .into_iter()
        .map(|(_, g, r, v)| (g, r, v))
        .collect()
}

fn required() -> BTreeSet<(String, String, String)> {
    REQUIRED_RBAC
        .iter()
        .flat_map(|(g, r, verbs)| {
            verbs
                .iter()
                .map(move |v| (g.to_string(), r.to_string(), v.to_string()))
        })
        .collect()
}

#[test]
fn chart_crd_is_a_copy_of_crds_dir() {
    let root = support_envtest::repo_root();
    let src = std::fs::read_to_string(root.join("crds/databasepolicy.yaml")).unwrap();
    let copy = std::fs::read_to_string(chart_dir().join("crds/databasepolicy.yaml"))
        .expect("charts/dbpolicy/crds/databasepolicy.yaml");
    assert!(
        src == copy,
        "charts/dbpolicy/crds/databasepolicy.yaml differs from crds/databasepolicy.yaml: \
         cp crds/databasepolicy.yaml charts/dbpolicy/crds/"
    );
    let entries: Vec<_> = std::fs::read_dir(chart_dir().join("crds"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        entries,
        ["databasepolicy.yaml"],
        "only the generated CRD in the chart's crds/"
    );
}

#[test]
fn default_values_render_a_restricted_deployment() {
    let docs = manifests(json!({}));
    assert_eq!(
        kinds(&docs),
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "Deployment",
            "Role",
            "RoleBinding",
            "Service",
            "ServiceAccount"
        ]
    );
    let dep = one(&docs, "Deployment");
    assert_eq!(dep["metadata"]["name"], "dbpolicy");
    assert_eq!(dep["metadata"]["namespace"], RELEASE_NAMESPACE);
    let pod = &dep["spec"]["template"];
    let spec = &pod["spec"];
    assert_eq!(spec["serviceAccountName"], "dbpolicy");

    // Restricted Pod Security Standard.
    let psc = &spec["securityContext"];
    assert_eq!(psc["runAsNonRoot"], true);
    assert_eq!(psc["runAsUser"], 65532);
    assert_eq!(psc["seccompProfile"]["type"], "RuntimeDefault");
    let containers = spec["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    let sc = &c["securityContext"];
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert!(sc.get("privileged").is_none());

    assert_eq!(
        c["image"], "dbpolicy/dbpolicy:0.1.0",
        "tag defaults to appVersion"
    );
    assert_eq!(
        c["args"],
        json!(["run", "--log-format=json", "--admin-addr=0.0.0.0:8080"])
    );
    let env: Vec<&str> = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        env,
        ["RUST_LOG", "POD_NAME", "POD_NAMESPACE", "DBPOLICY_IMAGE"]
    );
    // The CronJobs run the operator's own image.
    assert_eq!(c["env"][3]["value"], c["image"]);
    assert_eq!(
        c["env"][1]["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.name"
    );
    assert_eq!(
        c["env"][2]["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.namespace"
    );
    assert_eq!(c["ports"][0]["containerPort"], 8080);
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["livenessProbe"]["httpGet"]["port"], "http");
    assert!(c["resources"]["requests"]["memory"].is_string());
    assert!(c["resources"]["limits"]["memory"].is_string());
    // A read-only root filesystem needs a writable /tmp for pg_dump.
    assert_eq!(c["volumeMounts"][0]["mountPath"], "/tmp");
    assert!(spec["volumes"][0]["emptyDir"].is_object());

    // Selectors match what they select.
    let pod_labels = pod["metadata"]["labels"].as_object().unwrap();
    for (k, v) in dep["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(pod_labels.get(k), Some(v), "Deployment selector {k}");
    }
    let svc = one(&docs, "Service");
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], "http");
    for (k, v) in svc["spec"]["selector"].as_object().unwrap() {
        assert_eq!(pod_labels.get(k), Some(v), "Service selector {k}");
    }
    let crb = one(&docs, "ClusterRoleBinding");
    assert_eq!(
        crb["roleRef"]["name"],
        one(&docs, "ClusterRole")["metadata"]["name"]
    );
    assert_eq!(
        crb["subjects"],
        json!([{"kind": "ServiceAccount", "name": "dbpolicy", "namespace": "dbpolicy-system"}])
    );
    assert_eq!(one(&docs, "ServiceAccount")["metadata"]["name"], "dbpolicy");
}

#[test]
fn overrides_render_service_monitor_namespace_and_extras() {
    let docs = manifests(json!({
        "metrics": {"serviceMonitor": {"enabled": true, "labels": {"release": "prom"}}},
        "watchNamespace": "apps",
        "image": {"tag": "1.2.3"},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "extraEnv": [{"name": "EXTRA", "value": "1"}],
        "podAnnotations": {"a": "b"},
    }));
    assert_eq!(
        kinds(&docs),
        [
            "Deployment",
            "Role",
            "Role",
            "RoleBinding",
            "RoleBinding",
            "Service",
            "ServiceAccount",
            "ServiceMonitor"
        ]
    );
    let sm = one(&docs, "ServiceMonitor");
    assert_eq!(sm["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(sm["metadata"]["labels"]["release"], "prom");
    assert_eq!(sm["spec"]["endpoints"][0]["port"], "http");
    assert_eq!(sm["spec"]["endpoints"][0]["path"], "/metrics");
    assert_eq!(sm["spec"]["endpoints"][0]["interval"], "30s");
    let svc = one(&docs, "Service");
    for (k, v) in sm["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(
            svc["metadata"]["labels"][k], *v,
            "ServiceMonitor selects the Service by {k}"
        );
    }

    let dep = one(&docs, "Deployment");
    let spec = &dep["spec"]["template"]["spec"];
    let c = &spec["containers"][0];
    assert_eq!(
        c["args"],
        json!([
            "run",
            "--log-format=json",
            "--admin-addr=0.0.0.0:8080",
            "--namespace=apps"
        ])
    );
    assert_eq!(c["image"], "dbpolicy/dbpolicy:1.2.3");
    assert_eq!(c["env"][4], json!({"name": "EXTRA", "value": "1"}));
    assert_eq!(spec["nodeSelector"], json!({"kubernetes.io/os": "linux"}));
    assert_eq!(
        dep["spec"]["template"]["metadata"]["annotations"],
        json!({"a": "b"})
    );

    // RBAC and ServiceAccount can be left to the cluster's owners.
    let docs = manifests(
        json!({"rbac": {"create": false}, "serviceAccount": {"create": false, "name": "ops"},
                                "metrics": {"service": {"enabled": false}}}),
    );
    assert_eq!(kinds(&docs), ["Deployment"]);
    assert_eq!(
        docs[0]["spec"]["template"]["spec"]["serviceAccountName"],
        "ops"
    );

    // A ServiceMonitor without its Service is refused.
    let err = refused(
        json!({"metrics": {"service": {"enabled": false}, "serviceMonitor": {"enabled": true}}}),
    );
    assert!(err.contains("needs metrics.service.enabled"), "{err}");
}

/// `allowedServerSettings` is the platform team's allowance of denied server settings:
/// one `--allow-setting` per name on the operator; none by default; a list of names.
#[test]
fn allowed_server_settings_render_operator_flags() {
    let args = |over: Value| {
        let docs = manifests(over);
        one(&docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"].clone()
    };
    let defaults = args(json!({}));
    assert!(
        !defaults.to_string().contains("--allow-setting"),
        "{defaults}"
    );
    assert_eq!(
        args(json!({"allowedServerSettings": ["archive_command", "shared_preload_libraries"]})),
        json!([
            "run",
            "--log-format=json",
            "--admin-addr=0.0.0.0:8080",
            "--allow-setting=archive_command",
            "--allow-setting=shared_preload_libraries"
        ])
    );
    let err = refused(json!({"allowedServerSettings": "archive_command"}));
    assert!(
        err.contains("/allowedServerSettings") && err.contains("want array"),
        "{err}"
    );
    let err = refused(json!({"allowedServerSettings": ["archive_command; x"]}));
    assert!(err.contains("/allowedServerSettings/0"), "{err}");
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(chart_dir().join("values.schema.json")).unwrap(),
    )
    .unwrap();
    let items = &schema["properties"]["allowedServerSettings"]["items"];
    assert_eq!(items["type"], "string");
    assert!(items["pattern"].is_string(), "names only: {items}");
}

#[test]
fn cluster_role_grants_exactly_what_the_controller_needs() {
    let docs = manifests(json!({}));
    let granted = granted(&docs);
    let required = required();
    let missing: Vec<_> = required.difference(&granted).collect();
    let extra: Vec<_> = granted.difference(&required).collect();
    assert!(missing.is_empty(), "the chart's roles lack {missing:?}");
    assert!(
        extra.is_empty(),
        "the chart's roles grant more than needed: {extra:?}"
    );
    assert!(granted
        .iter()
        .all(|(g, r, v)| g != "*" && r != "*" && v != "*"));
    // Leases only in the release namespace, whatever the scope of the rest.
    for (ns, g, _, _) in grants(&docs) {
        if g == "coordination.k8s.io" {
            assert_eq!(ns.as_deref(), Some(RELEASE_NAMESPACE));
        }
    }
}

/// `watchNamespace`: the same rules, as a Role in that namespace (and the Lease's Role in
/// the release namespace); nothing cluster-wide.
#[test]
fn watch_namespace_renders_namespaced_roles_only() {
    let docs = manifests(json!({"watchNamespace": "apps"}));
    assert!(
        !docs
            .iter()
            .any(|d| d["kind"] == "ClusterRole" || d["kind"] == "ClusterRoleBinding"),
        "cluster-scoped RBAC with watchNamespace"
    );
    assert_eq!(granted(&docs), required());
    for (ns, g, r, v) in grants(&docs) {
        let want = if g == "coordination.k8s.io" {
            RELEASE_NAMESPACE
        } else {
            "apps"
        };
        assert_eq!(ns.as_deref(), Some(want), "{v} {r}.{g}");
    }
    for binding in docs.iter().filter(|d| d["kind"] == "RoleBinding") {
        let role = docs
            .iter()
            .find(|d| d["kind"] == "Role" && d["metadata"]["name"] == binding["roleRef"]["name"])
            .expect("the bound Role");
        assert_eq!(
            binding["metadata"]["namespace"],
            role["metadata"]["namespace"]
        );
        assert_eq!(
            binding["subjects"],
            json!([{"kind": "ServiceAccount", "name": "dbpolicy", "namespace": RELEASE_NAMESPACE}])
        );
    }
}

#[test]
fn values_schema_accepts_the_defaults_and_rejects_bad_values() {
    manifests(json!({}));
    manifests(json!({"metrics": {"serviceMonitor": {"enabled": true}}}));
    manifests(json!({"watchNamespace": "apps"}));
    for (bad, expect) in [
        (json!({"replicaCount": "two"}), "at '/replicaCount'"),
        (
            json!({"image": {"pullPolicy": "Sometimes"}}),
            "at '/image/pullPolicy'",
        ),
        (json!({"logFormat": "xml"}), "at '/logFormat'"),
        (json!({"metrics": {"port": 70000}}), "at '/metrics/port'"),
        (
            json!({"metrics": {"servicemonitor": {"enabled": true}}}),
            "'servicemonitor' not allowed",
        ),
        (json!({"replicas": 2}), "'replicas' not allowed"),
    ] {
        let err = refused(bad.clone());
        assert!(
            err.contains("schema") && err.contains(expect),
            "{bad}: expected {expect:?} in Helm's error:\n{err}"
        );
    }
}

/// `kubectl auth can-i VERB RESOURCE.GROUP` as the chart's ServiceAccount, in namespace
/// `ns` (None: across all namespaces, i.e. cluster-wide).
fn can(env: &Envtest, verb: &str, group: &str, resource: &str, ns: Option<&str>) -> bool {
    let sa = format!("system:serviceaccount:{RELEASE_NAMESPACE}:dbpolicy");
    // kubectl auth can-i takes resource.group, and a subresource as a flag (a
    // `resource/x` argument would name an object).
    let (resource, sub) = match resource.split_once('/') {
        Some((r, sub)) => (r, Some(sub)),
        None => (resource, None),
    };
    let res = if group.is_empty() {
        resource.to_owned()
    } else {
        format!("{resource}.{group}")
    };
    let mut args = vec!["auth", "can-i", verb, &res, "--as", &sa];
    match ns {
        Some(ns) => args.extend(["-n", ns]),
        None => args.push("--all-namespaces"),
    }
    let sub_flag = sub.map(|s| format!("--subresource={s}"));
    args.extend(sub_flag.as_deref());
    let out = env.kubectl(&args, None);
    String::from_utf8_lossy(&out.stdout).trim() == "yes"
}

/// Renders the chart with `values`, applies it, and checks as the ServiceAccount that every
/// required action is allowed in `watched` (the Lease's in the release namespace) and no
/// neighbouring one; returns what was wrong.
fn rbac_mismatches(env: &Envtest, values: &Value, watched: &str) -> Vec<String> {
    let rendered = template_text(values).unwrap_or_else(|e| panic!("helm template: {e}"));
    env.kubectl_ok(&["apply", "-f", "-"], Some(&rendered));
    let ns_of = |g: &str| {
        if g == "coordination.k8s.io" {
            RELEASE_NAMESPACE
        } else {
            watched
        }
    };
    let mut wrong = Vec::new();
    for (g, r, v) in required() {
        if !can(env, &v, &g, &r, Some(ns_of(&g))) {
            wrong.push(format!("denied {v} {r}.{g} in {}", ns_of(&g)));
        }
    }
    for (v, g, r) in [
        ("delete", "", "secrets"),
        ("update", "", "secrets"),
        ("update", "dbpolicy.dev", "databasepolicies"),
        ("update", "dbpolicy.dev", "databasepolicies/status"),
        ("patch", "dbpolicy.dev", "databasepolicies/finalizers"),
        ("get", "", "configmaps"),
        ("delete", "dbpolicy.dev", "databasepolicies"),
        ("create", "dbpolicy.dev", "databasepolicies"),
        ("delete", "coordination.k8s.io", "leases"),
        ("create", "", "pods"),
        ("update", "", "namespaces"),
    ] {
        if can(env, v, g, r, Some(ns_of(g))) {
            wrong.push(format!("allowed {v} {r}.{g} in {}", ns_of(g)));
        }
    }
    wrong
}

/// What `helm template --kube-version 1.25.0` renders, as Helm printed it, against the full
/// kube-apiserver 1.20: accepted (schema of Deployment, Service, RBAC), and the ClusterRole
/// authorises the ServiceAccount for every required action in any namespace and no
/// neighbouring one (SubjectAccessReview via `kubectl auth can-i`); Leases only in the
/// release namespace.
#[test]
fn rendered_manifests_are_accepted_and_rbac_authorises_the_service_account() {
    let env = Envtest::start(ApiServer::Kube);
    env.install_crds();
    env.kubectl_ok(&["create", "namespace", RELEASE_NAMESPACE], None);
    let mut wrong = rbac_mismatches(&env, &json!({}), "apps");
    if !can(&env, "watch", "", "secrets", None) {
        wrong.push("denied watch secrets cluster-wide".into());
    }
    if can(
        &env,
        "create",
        "coordination.k8s.io",
        "leases",
        Some("apps"),
    ) {
        wrong.push("allowed create leases outside the release namespace".into());
    }
    assert!(wrong.is_empty(), "{wrong:?}");
}

/// `watchNamespace: apps`: the same actions in `apps`, none in another namespace or
/// cluster-wide; and the operator itself, as that ServiceAccount with `--namespace apps`
/// as the chart runs it, reconciles a policy in `apps` to Ready and never touches one in
/// another namespace (RBAC would forbid it: it does not even list there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_namespace_rbac_is_namespaced_and_the_operator_works_under_it() {
    let db = support::TestDb::new().await;
    let env = Envtest::start(ApiServer::Kube);
    env.install_crds();
    for ns in [RELEASE_NAMESPACE, "apps", "other"] {
        env.kubectl_ok(&["create", "namespace", ns], None);
    }
    let values = json!({"watchNamespace": "apps"});
    let mut wrong = rbac_mismatches(&env, &values, "apps");
    for (v, g, r) in required() {
        if g == "coordination.k8s.io" {
            continue;
        }
        if can(&env, &v, &g, &r, Some("other")) {
            wrong.push(format!("allowed {v} {r}.{g} in other"));
        }
        if can(&env, &v, &g, &r, None) {
            wrong.push(format!("allowed {v} {r}.{g} cluster-wide"));
        }
    }
    assert!(wrong.is_empty(), "{wrong:?}");

    // The Deployment's arguments, as rendered.
    let docs = manifests(values);
    let args: Vec<String> = one(&docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
        ["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect();
    assert!(args.contains(&"--namespace=apps".to_owned()), "{args:?}");

    for ns in ["apps", "other"] {
        env.kubectl_ok(
            &[
                "create",
                "secret",
                "generic",
                "app-db",
                "-n",
                ns,
                &format!("--from-literal=uri={}", db.url()),
            ],
            None,
        );
        let policy = json!({
            "apiVersion": "dbpolicy.dev/v1alpha1", "kind": "DatabasePolicy",
            "metadata": {"name": "quiz", "namespace": ns},
            "spec": {"database": {"connectionSecretRef": {"name": "app-db"}},
                     "featureFlags": {"flags": [{"name": "new_engine", "enabled": true}]}},
        });
        env.kubectl_ok(&["apply", "-f", "-"], Some(&policy.to_string()));
    }

    let kubeconfig = env.kubeconfig_for_service_account(RELEASE_NAMESPACE, "dbpolicy");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let log = env.run_dir().join("operator-namespaced.log");
    let file = std::fs::File::create(&log).expect("operator log");
    let mut args = args;
    args.retain(|a| !a.starts_with("--admin-addr") && !a.starts_with("--log-format"));
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_dbpolicy"))
        .args(&args)
        .arg(format!("--admin-addr=127.0.0.1:{port}"))
        .env("KUBECONFIG", &kubeconfig)
        .env("POD_NAMESPACE", RELEASE_NAMESPACE)
        .env("POD_NAME", "dbpolicy-0")
        .env("RUST_LOG", "info")
        .env_remove("DATABASE_URL")
        .env_remove("WATCH_NAMESPACE")
        .stdin(std::process::Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .expect("start dbpolicy run");
    struct Kill<'a>(&'a mut std::process::Child, &'a std::path::Path);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
            if std::thread::panicking() {
                eprintln!(
                    "--- the operator's log:\n{}",
                    std::fs::read_to_string(self.1).unwrap_or_default()
                );
            }
        }
    }
    let guard = Kill(&mut child, &log);

    let ready = |ns: &str| -> Option<String> {
        let obj: Value = serde_json::from_str(
            &env.kubectl_ok(&["get", "dbpol", "quiz", "-n", ns, "-o", "json"], None),
        )
        .unwrap();
        obj["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == "Ready")
            .map(|c| c["status"].as_str().unwrap_or("").to_owned())
    };
    support_envtest::wait_for(
        std::time::Duration::from_secs(60),
        "apps/quiz Ready=True",
        || match ready("apps").as_deref() {
            Some("True") => Ok(()),
            other => Err(format!("Ready {other:?}")),
        },
    );
    // The policy in `apps` was reconciled; the one in `other`, created at the same time,
    // has no status and no finalizer.
    assert_eq!(ready("other"), None);
    let other: Value = serde_json::from_str(
        &env.kubectl_ok(&["get", "dbpol", "quiz", "-n", "other", "-o", "json"], None),
    )
    .unwrap();
    assert!(other["metadata"]["finalizers"].is_null(), "{other}");
    // And the operator's identity may not even read there.
    let as_operator = |args: &[&str]| {
        let out = env
            .kubectl_cmd()
            .args(args)
            .env("KUBECONFIG", &kubeconfig)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    for args in [
        &["get", "secret", "app-db", "-n", "other"][..],
        &["get", "dbpol", "-A"][..],
        &["get", "secrets", "-A"][..],
    ] {
        let err = as_operator(args);
        assert!(
            err.contains("Forbidden") || err.contains("forbidden"),
            "{args:?}: {err}"
        );
    }
    drop(guard);
}
