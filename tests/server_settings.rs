//! The serverSettings area against a throwaway PostgreSQL server (ALTER SYSTEM changes the
//! whole server, so these tests never touch the shared one).

mod support;

use std::time::Duration;

use support::{cli, eventually, expect_code, policy, PgServer, TestDb};

fn spec(params: &str) -> String {
    policy(
        "settings",
        &format!("  serverSettings:\n    parameters:\n{params}"),
    )
}

async fn auto_conf(db: &TestDb) -> Vec<String> {
    db.query_column::<String>(
        "SELECT name || '=' || setting FROM pg_file_settings WHERE sourcefile LIKE '%postgresql.auto.conf' ORDER BY name",
    )
    .await
}

async fn show(db: &TestDb, name: &str) -> String {
    db.query_scalar::<String>(&format!("SELECT current_setting('{name}')"))
        .await
}

#[tokio::test]
async fn apply_from_empty_drift_and_removal() {
    let server = PgServer::start();
    let db = TestDb::on(&server).await;
    db.exec("ALTER SYSTEM SET work_mem = '8MB'").await; // someone else's
    let p = spec("      log_min_duration_statement: 500ms\n      log_checkpoints: \"on\"\n      log_lock_waits: true\n");

    let plan = cli("plan", db.url(), &p);
    expect_code(&plan, 2);
    assert!(
        plan.stdout
            .contains(r#"ALTER SYSTEM SET "log_min_duration_statement" = '500ms';"#),
        "{}",
        plan.stdout
    );
    assert!(plan.stdout.contains("SELECT pg_reload_conf();"));

    expect_code(&cli("apply", db.url(), &p), 0);
    assert_eq!(
        auto_conf(&db).await,
        [
            "log_checkpoints=on",
            "log_lock_waits=on",
            "log_min_duration_statement=500ms",
            "work_mem=8MB"
        ]
    );
    // Reloaded: new sessions see the values.
    eventually(Duration::from_secs(10), || async {
        match show(&db, "log_min_duration_statement").await.as_str() {
            "500ms" => Ok(()),
            other => Err(other.to_string()),
        }
    })
    .await;
    expect_code(&cli("plan", db.url(), &p), 0);

    // Drift: changed by hand.
    db.exec("ALTER SYSTEM SET log_min_duration_statement = '2s'")
        .await;
    let plan = cli("plan", db.url(), &p);
    expect_code(&plan, 2);
    assert!(plan
        .stdout
        .contains("set log_min_duration_statement = 500ms"));
    expect_code(&cli("apply", db.url(), &p), 0);
    expect_code(&cli("plan", db.url(), &p), 0);

    // Removal: only what the policy set is reset; work_mem stays.
    let fewer = spec("      log_min_duration_statement: 500ms\n");
    let plan = cli("plan", db.url(), &fewer);
    expect_code(&plan, 2);
    assert!(
        plan.stdout
            .contains(r#"ALTER SYSTEM RESET "log_checkpoints";"#),
        "{}",
        plan.stdout
    );
    expect_code(&cli("apply", db.url(), &fewer), 0);
    assert_eq!(
        auto_conf(&db).await,
        ["log_min_duration_statement=500ms", "work_mem=8MB"]
    );
    expect_code(&cli("plan", db.url(), &fewer), 0);
}

#[tokio::test]
async fn bad_input_names_the_setting_and_changes_nothing() {
    let server = PgServer::start();
    let db = TestDb::on(&server).await;
    for (params, needle, reason) in [
        (
            "      log_min_duration_statement: 500ms\n      no_such_setting: 1\n",
            "no_such_setting",
            "UnknownSetting",
        ),
        (
            "      log_min_duration_statement: 500ms\n      work_mem: lots\n",
            "work_mem",
            "InvalidValue",
        ),
        (
            "      log_min_duration_statement: 500ms\n      log_statement: sometimes\n",
            "log_statement",
            "InvalidValue",
        ),
        (
            "      log_min_duration_statement: 5GB\n",
            "log_min_duration_statement",
            "InvalidValue",
        ),
    ] {
        for verb in ["plan", "apply"] {
            let out = cli(verb, db.url(), &spec(params));
            expect_code(&out, 1);
            assert!(
                out.stdout.contains(needle) && out.stdout.contains(reason),
                "{needle}: {}",
                out.stdout
            );
        }
        assert!(
            auto_conf(&db).await.is_empty(),
            "nothing applied for {needle}"
        );
    }
}

#[tokio::test]
async fn settings_needing_a_restart_are_reported_until_restarted() {
    let server = PgServer::start();
    let db = TestDb::on(&server).await;
    let p = spec("      max_connections: 120\n");
    let plan = cli("plan", db.url(), &p);
    expect_code(&plan, 2);
    assert!(
        plan.stdout.contains("[safe, needs restart]"),
        "{}",
        plan.stdout
    );

    let out = cli("apply", db.url(), &p);
    expect_code(&out, 0);
    assert!(
        out.stdout.contains("restart required for: max_connections"),
        "{}",
        out.stdout
    );

    // Nothing left to change, but the waiting restart is said, not hidden.
    let plan = eventually(Duration::from_secs(10), || async {
        let out = cli("plan", db.url(), &p);
        if out.stdout.contains("RestartRequired") {
            Ok(out)
        } else {
            Err(out.stdout)
        }
    })
    .await;
    expect_code(&plan, 0);
    assert_eq!(show(&db, "max_connections").await, "100");

    server.restart();
    assert_eq!(show(&db, "max_connections").await, "120");
    let plan = cli("plan", db.url(), &p);
    expect_code(&plan, 0);
    assert!(!plan.stdout.contains("RestartRequired"), "{}", plan.stdout);
}
