//! The serverSettings area against a throwaway PostgreSQL server (ALTER SYSTEM changes the
//! whole server, so these tests never touch the shared one).

use dbpolicy_test_support as support;

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
        plan.stdout.contains("[server, needs restart]"),
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

/// `dbpolicy <verb> -f <policy> [extra…]` against `url`.
fn cli_with(verb: &str, url: &str, policy_yaml: &str, extra: &[&str]) -> support::RunOutput {
    let file = support::write_policy(policy_yaml);
    let path = file.path().to_str().expect("utf-8 temp path").to_string();
    let mut args = vec![verb, "-f", path.as_str()];
    args.extend_from_slice(extra);
    support::run_dbpolicy(args, Some(url))
}

/// Issue 12: settings that run commands or load code are the platform team's to allow
/// (`--allow-setting`), never the policy author's; whatever the spelling of the name.
#[tokio::test]
async fn settings_that_run_commands_or_load_code_are_denied_unless_allowed() {
    let server = PgServer::start();
    let db = TestDb::on(&server).await;
    let p = spec(
        "      log_min_duration_statement: 500ms\n      ARCHIVE_command: \"/bin/true %p\"\n      session_preload_libraries: no_such_lib\n",
    );
    for verb in ["plan", "apply"] {
        let out = cli(verb, db.url(), &p);
        expect_code(&out, 1);
        for field in ["ARCHIVE_command", "session_preload_libraries"] {
            assert!(
                out.stdout
                    .contains(&format!("spec.serverSettings.parameters.{field}"))
                    && out.stdout.contains("SettingNotAllowed")
                    && out.stdout.contains("--allow-setting"),
                "{field}: {}",
                out.stdout
            );
        }
    }
    assert!(auto_conf(&db).await.is_empty(), "nothing applied");

    // Allowing one is not enough while the other is still denied.
    let out = cli_with(
        "apply",
        db.url(),
        &p,
        &["--allow-setting", "archive_command"],
    );
    expect_code(&out, 1);
    assert!(
        !out.stdout.contains("parameters.ARCHIVE_command"),
        "{}",
        out.stdout
    );
    assert!(auto_conf(&db).await.is_empty(), "nothing applied");

    // The platform team allows archive_command (case-insensitively): applied, converged.
    let allowed =
        spec("      log_min_duration_statement: 500ms\n      ARCHIVE_command: \"/bin/true %p\"\n");
    let flags = ["--allow-setting", "Archive_Command"];
    let plan = cli_with("plan", db.url(), &allowed, &flags);
    expect_code(&plan, 2);
    assert!(
        plan.stdout.contains("[server]"),
        "honest hazard: {}",
        plan.stdout
    );
    expect_code(&cli_with("apply", db.url(), &allowed, &flags), 0);
    assert_eq!(
        auto_conf(&db).await,
        [
            "archive_command=/bin/true %p",
            "log_min_duration_statement=500ms"
        ]
    );
    expect_code(&cli_with("plan", db.url(), &allowed, &flags), 0);
}

/// Issue 13: a value PostgreSQL rejects writes nothing. Values of session-settable
/// parameters are refused at plan time by PostgreSQL's own check; one that only ALTER
/// SYSTEM can check (a `sighup` parameter) is refused there, and what the run had already
/// written is restored, so postgresql.auto.conf ends as it began.
#[tokio::test]
async fn a_value_postgresql_rejects_leaves_postgresql_auto_conf_as_it_was() {
    let server = PgServer::start();
    let db = TestDb::on(&server).await;
    db.exec("ALTER SYSTEM SET work_mem = '8MB'").await; // someone else's
    db.exec("SELECT pg_reload_conf()").await;

    // Checked by PostgreSQL itself before anything runs (set_config's check hooks).
    for (params, needle) in [
        (
            "      work_mem: 16MB\n      TimeZone: Mars/Olympus\n",
            "TimeZone",
        ),
        (
            "      work_mem: 16MB\n      search_path: '\"unclosed'\n",
            "search_path",
        ),
    ] {
        let out = cli("apply", db.url(), &spec(params));
        expect_code(&out, 1);
        assert!(
            out.stdout.contains(needle) && out.stdout.contains("InvalidValue"),
            "{needle}: {}",
            out.stdout
        );
        assert_eq!(auto_conf(&db).await, ["work_mem=8MB"], "{needle}");
    }

    // log_checkpoints and log_timezone (sighup) can only be checked by ALTER SYSTEM, so
    // they run first: log_checkpoints is written, log_timezone refused, and the run
    // restores what it wrote.
    let bad = spec(
        "      work_mem: 16MB\n      log_checkpoints: \"on\"\n      log_timezone: Mars/Olympus\n",
    );
    let out = cli("apply", db.url(), &bad);
    expect_code(&out, 1);
    assert!(out.stdout.contains("log_timezone"), "{}", out.stdout);
    assert!(out.stdout.contains("restored"), "{}", out.stdout);
    assert_eq!(auto_conf(&db).await, ["work_mem=8MB"], "{}", out.stdout);
    assert_eq!(show(&db, "work_mem").await, "8MB");

    // With the bad line fixed, the run converges, and the live values are the written ones.
    let good =
        spec("      work_mem: 16MB\n      log_checkpoints: \"on\"\n      log_timezone: UTC\n");
    expect_code(&cli("apply", db.url(), &good), 0);
    assert_eq!(
        auto_conf(&db).await,
        ["log_checkpoints=on", "log_timezone=UTC", "work_mem=16MB"]
    );
    eventually(Duration::from_secs(10), || async {
        match show(&db, "work_mem").await.as_str() {
            "16MB" => Ok(()),
            other => Err(other.to_string()),
        }
    })
    .await;
    expect_code(&cli("plan", db.url(), &good), 0);
}

/// Issue 13: a value written to postgresql.auto.conf but never loaded (a run killed
/// between ALTER SYSTEM and pg_reload_conf(), or a manual ALTER SYSTEM) is drift, and a
/// reload fixes it; a reset never loaded likewise.
#[tokio::test]
async fn written_but_never_loaded_is_drift_and_reloaded() {
    let server = PgServer::start();
    let db = TestDb::on(&server).await;
    let p = spec("      log_min_duration_statement: 500ms\n      work_mem: 16MB\n");
    // What a run killed before its reload leaves behind.
    db.exec("ALTER SYSTEM SET log_min_duration_statement = '500ms'")
        .await;
    db.exec("ALTER SYSTEM SET work_mem = '16MB'").await;
    assert_eq!(show(&db, "work_mem").await, "4MB");

    let plan = cli("plan", db.url(), &p);
    expect_code(&plan, 2);
    assert!(
        plan.stdout.contains("SELECT pg_reload_conf();"),
        "{}",
        plan.stdout
    );
    assert!(plan.stdout.contains("NotLoaded"), "{}", plan.stdout);
    assert!(!plan.stdout.contains("ALTER SYSTEM"), "{}", plan.stdout);
    expect_code(&cli("apply", db.url(), &p), 0);
    assert_eq!(show(&db, "work_mem").await, "16MB");
    assert_eq!(show(&db, "log_min_duration_statement").await, "500ms");
    expect_code(&cli("plan", db.url(), &p), 0);

    // The policy drops work_mem, which it set; someone resets it by hand without
    // reloading: the live value still comes from the removed line, the reset is not loaded.
    let more = spec("      log_min_duration_statement: 500ms\n      work_mem: 32MB\n");
    expect_code(&cli("apply", db.url(), &more), 0);
    eventually(Duration::from_secs(10), || async {
        match show(&db, "work_mem").await.as_str() {
            "32MB" => Ok(()),
            other => Err(other.to_string()),
        }
    })
    .await;
    db.exec("ALTER SYSTEM RESET work_mem").await;
    let fewer = spec("      log_min_duration_statement: 500ms\n");
    let plan = cli("plan", db.url(), &fewer);
    expect_code(&plan, 2);
    assert!(
        plan.stdout.contains("SELECT pg_reload_conf();"),
        "{}",
        plan.stdout
    );
    expect_code(&cli("apply", db.url(), &fewer), 0);
    assert_eq!(show(&db, "work_mem").await, "4MB");
    expect_code(&cli("plan", db.url(), &fewer), 0);
}

/// Issue 13: names are matched as PostgreSQL matches them, case-insensitively, shown
/// with pg_settings' spelling; two spellings of one parameter are refused.
#[tokio::test]
async fn names_are_case_insensitive_and_duplicates_are_refused() {
    let server = PgServer::start();
    let db = TestDb::on(&server).await;
    let p = spec("      TimeZone: Europe/Paris\n      WORK_MEM: 16MB\n");
    let plan = cli("plan", db.url(), &p);
    expect_code(&plan, 2);
    assert!(
        plan.stdout
            .contains(r#"ALTER SYSTEM SET "TimeZone" = 'Europe/Paris';"#),
        "{}",
        plan.stdout
    );
    assert!(
        plan.stdout
            .contains(r#"ALTER SYSTEM SET "work_mem" = '16MB';"#),
        "{}",
        plan.stdout
    );
    expect_code(&cli("apply", db.url(), &p), 0);
    expect_code(&cli("plan", db.url(), &p), 0);
    // Another spelling of the same parameters is the same policy.
    let same = spec("      timezone: Europe/Paris\n      work_mem: 16MB\n");
    expect_code(&cli("plan", db.url(), &same), 0);

    let dup = spec("      WORK_MEM: 8MB\n      work_mem: 16MB\n");
    for verb in ["plan", "apply"] {
        let out = cli(verb, db.url(), &dup);
        expect_code(&out, 1);
        let all = format!("{}{}", out.stdout, out.stderr);
        assert!(
            all.contains("serverSettings.parameters")
                && all.contains("WORK_MEM")
                && all.contains("work_mem"),
            "{all}"
        );
    }
    assert_eq!(
        auto_conf(&db).await,
        ["TimeZone=Europe/Paris", "work_mem=16MB"]
    );
}
