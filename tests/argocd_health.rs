//! The Argo CD health check (`charts/dbpolicy/argocd/health.lua`) run in Lua 5.1, as Argo
//! CD's gopher-lua runs it: the resource as the global `obj`, JSON arrays as 1-based
//! tables, absent fields as nil. The cases are Argo CD's own layout: `health_test.yaml`
//! naming `testdata/*.yaml` inputs and the expected status and message.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use mlua::{Lua, LuaSerdeExt, SerializeOptions, Table};
use serde::Deserialize;

#[derive(Deserialize)]
struct Cases {
    tests: Vec<Case>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Case {
    health_status: Expected,
    input_path: String,
}

#[derive(Deserialize, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
struct Expected {
    status: String,
    message: String,
}

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/dbpolicy/argocd")
}

/// Runs health.lua against `obj` and returns (status, message).
fn health(script: &str, obj: &serde_json::Value) -> Result<Expected, String> {
    let lua = Lua::new();
    // null → nil and no array metatable: what Argo CD's JSON → Lua conversion gives.
    let opts = SerializeOptions::new()
        .serialize_none_to_null(false)
        .serialize_unit_to_null(false)
        .set_array_metatable(false);
    let value = lua.to_value_with(obj, opts).map_err(|e| e.to_string())?;
    lua.globals().set("obj", value).map_err(|e| e.to_string())?;
    let hs: Table = lua
        .load(script)
        .set_name("health.lua")
        .eval()
        .map_err(|e| e.to_string())?;
    Ok(Expected {
        status: hs.get("status").map_err(|e| format!("status: {e}"))?,
        message: hs.get("message").map_err(|e| format!("message: {e}"))?,
    })
}

#[test]
fn health_check_matches_every_case() {
    let script = std::fs::read_to_string(dir().join("health.lua")).expect("health.lua");
    let cases: Cases = serde_yaml::from_str(
        &std::fs::read_to_string(dir().join("health_test.yaml")).expect("health_test.yaml"),
    )
    .expect("health_test.yaml parses");
    let mut failures = Vec::new();
    let mut used = BTreeSet::new();
    let mut statuses = BTreeSet::new();
    for case in &cases.tests {
        used.insert(case.input_path.clone());
        statuses.insert(case.health_status.status.clone());
        let path = dir().join(&case.input_path);
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let obj: serde_json::Value =
            serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        match health(&script, &obj) {
            Ok(got) if got == case.health_status => {}
            Ok(got) => failures.push(format!(
                "{}: expected {:?}, got {got:?}",
                case.input_path, case.health_status
            )),
            Err(e) => failures.push(format!("{}: the script failed: {e}", case.input_path)),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // Every input is a case, and every status the check can return is covered.
    let files: BTreeSet<String> = std::fs::read_dir(dir().join("testdata"))
        .unwrap()
        .map(|e| format!("testdata/{}", e.unwrap().file_name().to_string_lossy()))
        .collect();
    assert_eq!(
        files, used,
        "testdata files without a case (or cases without a file)"
    );
    let all: BTreeSet<String> = ["Healthy", "Progressing", "Degraded", "Suspended"]
        .map(String::from)
        .into();
    assert_eq!(statuses, all);
}

/// Every case's input is a valid DatabasePolicy for the operator's own types, so the
/// cases describe objects the controller can actually produce.
#[test]
fn case_inputs_are_database_policies() {
    for entry in std::fs::read_dir(dir().join("testdata")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let parsed: Result<dbpolicy::api::DatabasePolicy, _> = serde_yaml::from_str(&text);
        assert!(
            parsed.is_ok(),
            "{}: {}",
            path.display(),
            parsed.unwrap_err()
        );
    }
}

#[test]
fn sparse_statuses_do_not_crash_the_check() {
    // Argo CD shows a script error as Unknown health; the check must not error on the
    // shapes the API server can hold (an empty status, an empty conditions list).
    let script = std::fs::read_to_string(dir().join("health.lua")).unwrap();
    for obj in [
        serde_json::json!({"metadata": {"generation": 1}, "spec": {}, "status": {}}),
        serde_json::json!({"metadata": {"generation": 1}, "spec": {},
                           "status": {"observedGeneration": 1, "conditions": []}}),
        serde_json::json!({"metadata": {}, "status": {"observedGeneration": 1,
                           "conditions": [{"type": "Ready", "status": "False"}]}}),
    ] {
        let got = health(&script, &obj).unwrap_or_else(|e| panic!("{obj}: {e}"));
        assert!(
            ["Progressing", "Degraded"].contains(&got.status.as_str()),
            "{obj}: {got:?}"
        );
    }
}
