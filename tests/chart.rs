//! The Helm chart in `charts/dbpolicy`, through real Helm (`hack/install-helm.sh`): it
//! passes `helm lint --strict`, its CRD copy is current, `helm template` renders it over
//! several values files into manifests with restricted pod security and exactly the RBAC
//! the controller needs, values.schema.json refuses bad values, and what Helm renders is
//! accepted by a real kube-apiserver whose RBAC then grants the operator's ServiceAccount
//! what it needs and nothing more (tests/e2e_operator.rs runs the operator under it).

mod support_envtest;
mod support_helm;

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

fn granted(docs: &[Value]) -> BTreeSet<(String, String, String)> {
    let role = one(docs, "ClusterRole");
    let mut set = BTreeSet::new();
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
                    set.insert((g.clone(), r.clone(), v));
                }
            }
        }
        assert!(rule.get("resourceNames").is_none() || rule["resourceNames"].is_array());
    }
    set
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
            "ClusterRole",
            "ClusterRoleBinding",
            "Deployment",
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
    assert!(missing.is_empty(), "the ClusterRole lacks {missing:?}");
    assert!(
        extra.is_empty(),
        "the ClusterRole grants more than needed: {extra:?}"
    );
    assert!(granted
        .iter()
        .all(|(g, r, v)| g != "*" && r != "*" && v != "*"));
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

/// What `helm template --kube-version 1.25.0` renders, as Helm printed it, against the full
/// kube-apiserver 1.20: accepted (schema of Deployment, Service, RBAC), and the ClusterRole authorises the ServiceAccount for every
/// required action and no neighbouring one (SubjectAccessReview via `kubectl auth can-i`).
#[test]
fn rendered_manifests_are_accepted_and_rbac_authorises_the_service_account() {
    let env = Envtest::start(ApiServer::Kube);
    env.install_crds();
    env.kubectl_ok(&["create", "namespace", RELEASE_NAMESPACE], None);
    let rendered = template_text(&json!({})).unwrap_or_else(|e| panic!("helm template: {e}"));
    env.kubectl_ok(&["apply", "-f", "-"], Some(&rendered));

    let sa = format!("system:serviceaccount:{RELEASE_NAMESPACE}:dbpolicy");
    let can = |verb: &str, group: &str, resource: &str| -> bool {
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
        let mut args = vec!["auth", "can-i", verb, &res, "-n", "apps", "--as", &sa];
        let sub_flag = sub.map(|s| format!("--subresource={s}"));
        args.extend(sub_flag.as_deref());
        let out = env.kubectl(&args, None);
        String::from_utf8_lossy(&out.stdout).trim() == "yes"
    };
    let mut wrong = Vec::new();
    for (g, r, v) in required() {
        if !can(&v, &g, &r) {
            wrong.push(format!("denied {v} {r}.{g}"));
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
        if can(v, g, r) {
            wrong.push(format!("allowed {v} {r}.{g}"));
        }
    }
    assert!(wrong.is_empty(), "{wrong:?}");
}
