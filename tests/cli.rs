//! The CLI contract outside checks rely on: exit codes, `--output json`, several documents,
//! `crd`, and errors that say what failed without leaking credentials.

use dbpolicy_test_support as support;

use support::{cli, expect_code, policy, run_dbpolicy, write_policy, TestDb};

#[tokio::test]
async fn json_plan_for_machines_and_several_documents() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int)").await;
    let a = policy("a", "  autovacuum:\n    tables: [{table: t, vacuumThreshold: 10}]\n  rowLevelSecurity:\n    tables: []\n  backups: {schedule: '0 3 * * *', storage: {pvc: {claimName: x}}}\n");
    let b = policy(
        "b",
        "  featureFlags:\n    flags: [{name: x, enabled: true}]\n",
    );
    let file = write_policy(&format!("{a}\n---\n{b}"));
    let path = file.path().to_str().unwrap();

    let out = run_dbpolicy(["plan", "-f", path, "--output", "json"], Some(db.url()));
    expect_code(&out, 2);
    let doc: serde_json::Value =
        serde_json::from_str(&out.stdout).expect("plan --output json is JSON");
    let runs = doc.as_array().expect("one entry per policy");
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0]["policy"], "tests/a");
    let areas = runs[0]["outcome"]["plan"]["areas"].as_array().unwrap();
    let change = &areas.iter().find(|a| a["area"] == "autovacuum").unwrap()["changes"][0];
    assert_eq!(change["hazard"], "locking");
    assert_eq!(
        change["sql"],
        "ALTER TABLE \"public\".\"t\" SET (autovacuum_vacuum_threshold = 10)"
    );
    // Areas this front does not reconcile are said, never silent.
    assert!(areas
        .iter()
        .any(|a| a["area"] == "backups" && a["skipped"].is_string()));

    expect_code(&run_dbpolicy(["apply", "-f", path], Some(db.url())), 0);
    let out = run_dbpolicy(["plan", "-f", path, "--output", "json"], Some(db.url()));
    expect_code(&out, 0);
}

#[test]
fn crd_command_prints_the_checked_in_crd() {
    let out = run_dbpolicy(["crd"], None);
    expect_code(&out, 0);
    let on_disk = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/crds/databasepolicy.yaml"
    ))
    .unwrap();
    assert_eq!(out.stdout, on_disk);
}

#[test]
fn connection_errors_are_clear_and_never_show_the_password() {
    let p = policy("conn", "  featureFlags:\n    flags: []\n");
    let file = write_policy(&p);
    let path = file.path().to_str().unwrap();

    let out = run_dbpolicy(["plan", "-f", path], None);
    expect_code(&out, 1);
    assert!(out.stderr.contains("--database-url"), "{}", out.stderr);

    // Nothing listens on port 1.
    let out = run_dbpolicy(
        ["plan", "-f", path],
        Some("postgres://app:s3cret-pw@127.0.0.1:1/db"),
    );
    expect_code(&out, 1);
    assert!(
        out.stderr.contains("cannot connect to 127.0.0.1:1/db"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("s3cret-pw") && !out.stdout.contains("s3cret-pw"));

    let out = run_dbpolicy(["plan", "-f", path], Some("not a url s3cret-pw"));
    expect_code(&out, 1);
    assert!(!out.stderr.contains("s3cret-pw"), "{}", out.stderr);
}

#[tokio::test]
async fn wrong_password_is_reported_without_it() {
    let db = TestDb::new().await;
    let role = db.unique_role("pw");
    db.exec(&format!("CREATE ROLE {role} LOGIN PASSWORD 'right-pw'"))
        .await;
    // The shared server trusts 127.0.0.1, so a wrong password still gets in there; what
    // matters here is that no output ever carries it.
    let url = db
        .url_as(&role)
        .replacen(&format!("{role}@"), &format!("{role}:wrong-pw-123@"), 1);
    let out = cli(
        "plan",
        &url,
        &policy("pw", "  featureFlags:\n    flags: []\n"),
    );
    assert!(!out.stdout.contains("wrong-pw-123") && !out.stderr.contains("wrong-pw-123"));
}

/// Statements in logs are cut to a few hundred characters (sqlx logs whole statements) and
/// carry no ANSI colour when stderr is not a terminal, in text and in JSON.
#[tokio::test]
async fn log_lines_cut_statements_and_have_no_colour_off_a_terminal() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int, owner int)").await;
    // An expression of some 5,000 characters reaches several logged statements.
    let long = vec!["owner = 1"; 500].join(" OR ");
    let file = write_policy(&policy(
        "logs",
        &format!("  rowLevelSecurity:\n    tables:\n      - table: t\n        policies: [{{name: own, using: \"{long}\"}}]\n"),
    ));
    let path = file.path().to_str().unwrap();
    for format in ["text", "json"] {
        let mut cmd = support::dbpolicy_cmd();
        cmd.args(["plan", "-f", path, "--log-format", format])
            .env("DATABASE_URL", db.url())
            .env("RUST_LOG", "sqlx=debug");
        let out = cmd.output().expect("run dbpolicy");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{format}: {stderr}");
        assert!(
            stderr.lines().count() > 3,
            "{format}: sqlx logged its statements:\n{stderr}"
        );
        assert!(
            !stderr.contains('\u{1b}'),
            "{format}: no escape codes into a pipe:\n{stderr}"
        );
        for line in stderr.lines() {
            assert!(
                line.len() < 1_500,
                "{format}: a log line of {} bytes: {}…",
                line.len(),
                &line[..200]
            );
            if format == "json" {
                serde_json::from_str::<serde_json::Value>(line)
                    .unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            }
        }
        assert!(
            stderr.contains("more bytes)"),
            "{format}: a long statement was cut, and says so:\n{stderr}"
        );
    }
}
