//! The injection suite: every SQL-fragment field and every name field of a policy, times
//! payloads a hostile policy author would try (string continuation after `E''`, nested and
//! spec-chosen dollar-quote tags, `--` and `/* */` comments, `;`, NUL, Unicode look-alikes,
//! 100k-character strings), through the real CLI against real PostgreSQL. Each payload
//! tries to drop a canary table and to run a shell command that creates a canary file
//! (`COPY … TO PROGRAM`); neither `plan` nor `apply` may ever touch either, whatever the
//! exit code.

use dbpolicy_test_support as support;

use std::path::{Path, PathBuf};

use dbpolicy::api::Mode;
use dbpolicy::engine::{self, PolicyId};
use serde_json::{json, Value};
use support::{cli, TestDb};

const SETUP: &str = "CREATE TABLE t (id int PRIMARY KEY, owner int NOT NULL, note text);
CREATE TABLE events (id bigint NOT NULL, created_at timestamptz NOT NULL) PARTITION BY RANGE (created_at);
CREATE TABLE canary (id int);
INSERT INTO canary VALUES (42)";

/// What every payload tries to run: drop the canary table and create the canary file.
fn smuggled(file: &str) -> String {
    format!("DROP TABLE canary; COPY (SELECT 1) TO PROGRAM 'touch {file}'")
}

/// Ways out of a fragment or a quoted name, each carrying `evil` (the smuggled SQL).
fn payloads(evil: &str) -> Vec<(&'static str, String)> {
    vec![
        ("plain ;", format!("true); {evil}; --")),
        (
            "string continuation after E''",
            format!("E'a'\n'\\''); {evil}; --'"),
        ),
        (
            "continuation, second quote escaped",
            format!("E'x'\n'y'); {evil}; --"),
        ),
        (
            "nested dollar quotes",
            format!("$a$ $b$ $a$); {evil}; -- $b$"),
        ),
        (
            "spec-chosen dollar tag",
            format!("x$dbpolicy$; {evil}; $dbpolicy$"),
        ),
        (
            "dollar tag of the input",
            format!("$dbpolicy_input$); {evil}; --"),
        ),
        ("line comment", format!("true -- c\n); {evil}; --")),
        (
            "carriage-return comment",
            format!("true -- c\r); {evil}; --"),
        ),
        ("block comment", format!("true /* ) */ ); {evil}; /* */")),
        (
            "nested block comment",
            format!("/* /* */ ); {evil}; -- */ true"),
        ),
        ("NUL byte", format!("true\0); {evil}; --")),
        ("identifier quote", format!("x\"); {evil}; --")),
        ("literal quote", format!("x'); {evil}; --")),
        ("Unicode look-alikes", format!("true）；{evil}；--")),
        (
            "100k characters",
            format!("'{}'); {evil}; --", "x".repeat(100_000)),
        ),
        ("backslash quote", format!("'\\'); {evil}; --")),
    ]
}

/// Builds the policy's sections around one payload.
type SpecOf = fn(&str) -> Value;

/// Every field that carries spec text into SQL, as a function from the payload to a spec.
fn fields() -> Vec<(&'static str, SpecOf)> {
    vec![
        (
            "rowLevelSecurity…using",
            |p| json!({"rowLevelSecurity": {"tables": [{"table": "t", "policies": [{"name": "p", "using": p}]}]}}),
        ),
        (
            "rowLevelSecurity…withCheck",
            |p| json!({"rowLevelSecurity": {"tables": [{"table": "t", "policies": [{"name": "p", "command": "Insert", "withCheck": p}]}]}}),
        ),
        (
            "rowLevelSecurity…name",
            |p| json!({"rowLevelSecurity": {"tables": [{"table": "t", "policies": [{"name": p, "using": "true"}]}]}}),
        ),
        (
            "rowLevelSecurity…roles",
            |p| json!({"rowLevelSecurity": {"tables": [{"table": "t", "policies": [{"name": "p", "using": "true", "roles": [p]}]}]}}),
        ),
        (
            "rowLevelSecurity.tables[].table",
            |p| json!({"rowLevelSecurity": {"tables": [{"table": p, "policies": [{"name": "p", "using": "true"}]}]}}),
        ),
        (
            "rowLevelSecurity.tables[].schema",
            |p| json!({"rowLevelSecurity": {"tables": [{"schema": p, "table": "t", "policies": [{"name": "p", "using": "true"}]}]}}),
        ),
        (
            "indexes…columns",
            |p| json!({"indexes": {"indexes": [{"name": "i", "table": "t", "columns": [p]}]}}),
        ),
        (
            "indexes…where",
            |p| json!({"indexes": {"indexes": [{"name": "i", "table": "t", "columns": ["owner"], "where": p}]}}),
        ),
        (
            "indexes…where (partitioned)",
            |p| json!({"indexes": {"indexes": [{"name": "i", "table": "events", "columns": ["id"], "where": p}]}}),
        ),
        (
            "indexes…name",
            |p| json!({"indexes": {"indexes": [{"name": p, "table": "t", "columns": ["owner"]}]}}),
        ),
        (
            "materializedViews…definition",
            |p| json!({"materializedViews": {"views": [{"name": "v", "definition": format!("SELECT {p}")}]}}),
        ),
        (
            "materializedViews…definition (whole)",
            |p| json!({"materializedViews": {"views": [{"name": "v", "definition": p}]}}),
        ),
        (
            "materializedViews…name",
            |p| json!({"materializedViews": {"views": [{"name": p, "definition": "SELECT 1 AS one"}]}}),
        ),
        (
            "materializedViews…owner",
            |p| json!({"materializedViews": {"views": [{"name": "v", "owner": p, "definition": "SELECT 1 AS one"}]}}),
        ),
        (
            "featureFlags.table",
            |p| json!({"featureFlags": {"table": p, "flags": [{"name": "f", "enabled": true}]}}),
        ),
        (
            "featureFlags.schema",
            |p| json!({"featureFlags": {"schema": p, "flags": [{"name": "f", "enabled": true}]}}),
        ),
        (
            "featureFlags…description",
            |p| json!({"featureFlags": {"flags": [{"name": "f", "enabled": true, "description": p}]}}),
        ),
        (
            "autovacuum.tables[].table",
            |p| json!({"autovacuum": {"tables": [{"table": p, "vacuumScaleFactor": 0.05}]}}),
        ),
        (
            "partitions.tables[].table",
            |p| json!({"partitions": {"tables": [{"table": p, "interval": "Monthly"}]}}),
        ),
        (
            "serverSettings value",
            |p| json!({"serverSettings": {"parameters": {"application_name": p}}}),
        ),
    ]
}

/// The policy document: the fixed header and `spec` merged with the area sections.
fn document(sections: Value) -> String {
    let mut spec = json!({"database": {"connectionSecretRef": {"name": "db"}}});
    for (k, v) in sections.as_object().expect("sections are an object") {
        spec[k] = v.clone();
    }
    let doc = json!({
        "apiVersion": "dbpolicy.dev/v1alpha1",
        "kind": "DatabasePolicy",
        "metadata": {"name": "injection", "namespace": "tests"},
        "spec": spec,
    });
    serde_yaml::to_string(&doc).expect("a JSON value serialises as YAML")
}

/// The canary table still holds its row and the canary file does not exist.
async fn assert_untouched(db: &TestDb, file: &Path, context: &dyn Fn() -> String) {
    assert!(
        !file.exists(),
        "a shell command ran on the database host: {}",
        context()
    );
    let canary: Option<i32> = sqlx::query_scalar("SELECT max(id) FROM canary")
        .fetch_one(&mut db.connect().await)
        .await
        .unwrap_or_else(|e| panic!("the canary table is gone ({e}): {}", context()));
    assert_eq!(canary, Some(42), "the canary row changed: {}", context());
}

fn canary_file(db: &TestDb) -> PathBuf {
    let file = std::env::temp_dir().join(format!(
        "dbpolicy-canary-{}-{}",
        std::process::id(),
        db.name()
    ));
    let _ = std::fs::remove_file(&file);
    file
}

/// Every field × every payload, through the engine that `plan`, `apply` and the operator
/// share, in Plan and in Apply mode, on one connection (fast enough to try them all).
#[tokio::test(flavor = "multi_thread")]
async fn no_field_runs_smuggled_sql_or_commands_in_plan_or_apply() {
    let db = TestDb::new().await;
    db.exec(SETUP).await;
    let file = canary_file(&db);
    let evil = smuggled(file.to_str().expect("utf-8 temp path"));
    let mut conn = db.connect().await;
    let id = PolicyId("tests/injection".into());

    let mut runs = 0;
    for (field, spec_of) in fields() {
        for (payload_name, payload) in payloads(&evil) {
            let yaml = document(spec_of(&payload));
            let spec = match dbpolicy::cli::parse_policies(&yaml) {
                Ok((policies, _)) => policies[0].spec.clone(),
                // The YAML itself refused (e.g. a NUL byte in a name): nothing ran.
                Err(_) => continue,
            };
            for mode in [Mode::Plan, Mode::Apply] {
                let outcome = engine::run(&mut conn, &spec, mode, &id).await;
                runs += 1;
                let context = || {
                    format!(
                        "{mode:?} with {payload_name:?} in {field}: {}",
                        match &outcome {
                            Ok(o) => format!("{:?}", o.plan.errors().collect::<Vec<_>>()),
                            Err(e) => e.to_string(),
                        }
                        .chars()
                        .take(2000)
                        .collect::<String>()
                    )
                };
                assert_untouched(&db, &file, &context).await;
            }
        }
    }
    assert!(runs >= fields().len() * 2, "only {runs} runs");
    let _ = std::fs::remove_file(&file);
}

/// The same, through the real binary (`dbpolicy plan` / `apply`), one payload per field.
#[tokio::test(flavor = "multi_thread")]
async fn the_cli_runs_no_smuggled_sql_for_any_field() {
    let db = TestDb::new().await;
    db.exec(SETUP).await;
    let file = canary_file(&db);
    let evil = smuggled(file.to_str().expect("utf-8 temp path"));
    let payload = &payloads(&evil)[1].1; // string continuation after E''
    for (field, spec_of) in fields() {
        let yaml = document(spec_of(payload));
        for verb in ["plan", "apply"] {
            let out = cli(verb, db.url(), &yaml);
            let context = || {
                format!(
                    "{verb} with a continuation in {field}: exit {}\n{}\n{}",
                    out.code, out.stdout, out.stderr
                )
            };
            // A crash (panic) is a failure too, not only a breach.
            assert!([0, 1, 2].contains(&out.code), "{}", context());
            assert_untouched(&db, &file, &context).await;
        }
    }
    let _ = std::fs::remove_file(&file);
}

/// The payloads as fragments: PostgreSQL's grammar check refuses every one before any
/// statement is built.
#[test]
fn fragment_payloads_are_refused_by_the_grammar_check() {
    let evil = smuggled("/tmp/never");
    for (name, payload) in payloads(&evil) {
        assert!(
            dbpolicy::pg::grammar::check_expression(&payload).is_err(),
            "expression accepted: {name}"
        );
        assert!(
            dbpolicy::pg::grammar::check_index_key(&payload).is_err(),
            "index key accepted: {name}"
        );
        assert!(
            dbpolicy::pg::grammar::check_query(&format!("SELECT {payload}")).is_err(),
            "query accepted: {name}"
        );
    }
}
