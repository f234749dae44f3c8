//! The autovacuum area against real PostgreSQL through the CLI: apply from empty,
//! idempotence, drift, removal from the spec, bad input.

use dbpolicy_test_support as support;

use support::{cli, expect_code, policy, TestDb};

const SCHEMA: &str = "CREATE TABLE user_progress (id int PRIMARY KEY, n int);
                      CREATE TABLE quiz_sessions (id int PRIMARY KEY);";

async fn reloptions(db: &TestDb, table: &str) -> Vec<String> {
    let mut opts: Vec<String> = db
        .query_scalar::<Option<Vec<String>>>(&format!(
            "SELECT reloptions FROM pg_class WHERE oid = '{table}'::regclass"
        ))
        .await
        .unwrap_or_default();
    opts.sort();
    opts
}

fn spec(tables: &str) -> String {
    policy("av", &format!("  autovacuum:\n    tables:\n{tables}"))
}

#[tokio::test]
async fn apply_from_empty_then_idempotent() {
    let db = TestDb::new().await;
    db.exec(SCHEMA).await;
    let p = spec("      - {table: user_progress, vacuumScaleFactor: 0.05, analyzeScaleFactor: 0.02, vacuumThreshold: 100}\n      - {table: quiz_sessions, enabled: true, vacuumCostLimit: 1000}\n");

    let plan = cli("plan", db.url(), &p);
    expect_code(&plan, 2);
    assert!(
        plan.stdout
            .contains("-- [locking] public.user_progress: set"),
        "{}",
        plan.stdout
    );
    assert!(
        reloptions(&db, "user_progress").await.is_empty(),
        "plan changes nothing"
    );

    expect_code(&cli("apply", db.url(), &p), 0);
    assert_eq!(
        reloptions(&db, "user_progress").await,
        [
            "autovacuum_analyze_scale_factor=0.02",
            "autovacuum_vacuum_scale_factor=0.05",
            "autovacuum_vacuum_threshold=100"
        ]
    );
    assert_eq!(
        reloptions(&db, "quiz_sessions").await,
        [
            "autovacuum_enabled=true",
            "autovacuum_vacuum_cost_limit=1000"
        ]
    );

    let again = cli("plan", db.url(), &p);
    expect_code(&again, 0);
    assert!(again.stdout.contains("nothing to change"));
}

#[tokio::test]
async fn drift_is_detected_and_repaired() {
    let db = TestDb::new().await;
    db.exec(SCHEMA).await;
    let p = spec("      - {table: user_progress, vacuumScaleFactor: 0.05}\n");
    expect_code(&cli("apply", db.url(), &p), 0);

    db.exec("ALTER TABLE user_progress SET (autovacuum_vacuum_scale_factor = 0.2)")
        .await;
    let plan = cli("plan", db.url(), &p);
    expect_code(&plan, 2);
    assert!(plan
        .stdout
        .contains("set autovacuum_vacuum_scale_factor=0.05"));

    expect_code(&cli("apply", db.url(), &p), 0);
    assert_eq!(
        reloptions(&db, "user_progress").await,
        ["autovacuum_vacuum_scale_factor=0.05"]
    );
    expect_code(&cli("plan", db.url(), &p), 0);
}

#[tokio::test]
async fn removal_resets_only_what_the_policy_set() {
    let db = TestDb::new().await;
    db.exec(SCHEMA).await;
    // Set by someone else: must survive.
    db.exec("ALTER TABLE user_progress SET (autovacuum_analyze_threshold = 7)")
        .await;
    let both = spec("      - {table: user_progress, vacuumScaleFactor: 0.05, vacuumThreshold: 100}\n      - {table: quiz_sessions, enabled: false}\n");
    expect_code(&cli("apply", db.url(), &both), 0);

    // One parameter removed, one table removed.
    let fewer = spec("      - {table: user_progress, vacuumScaleFactor: 0.05}\n");
    let plan = cli("plan", db.url(), &fewer);
    expect_code(&plan, 2);
    assert!(
        plan.stdout.contains("reset autovacuum_vacuum_threshold"),
        "{}",
        plan.stdout
    );
    assert!(
        plan.stdout.contains("reset autovacuum_enabled"),
        "{}",
        plan.stdout
    );
    expect_code(&cli("apply", db.url(), &fewer), 0);
    assert_eq!(
        reloptions(&db, "user_progress").await,
        [
            "autovacuum_analyze_threshold=7",
            "autovacuum_vacuum_scale_factor=0.05"
        ]
    );
    assert!(reloptions(&db, "quiz_sessions").await.is_empty());
    expect_code(&cli("plan", db.url(), &fewer), 0);

    // The whole section removed.
    let none = policy("av", "");
    expect_code(&cli("apply", db.url(), &none), 0);
    assert_eq!(
        reloptions(&db, "user_progress").await,
        ["autovacuum_analyze_threshold=7"]
    );
    expect_code(&cli("plan", db.url(), &none), 0);
}

#[tokio::test]
async fn bad_input_is_a_clear_error_and_changes_nothing() {
    let db = TestDb::new().await;
    db.exec(SCHEMA).await;

    // A missing table among valid ones: nothing is applied, the table is named.
    let p = spec("      - {table: user_progress, vacuumScaleFactor: 0.05}\n      - {table: no_such_table, vacuumScaleFactor: 0.05}\n");
    for verb in ["plan", "apply"] {
        let out = cli(verb, db.url(), &p);
        expect_code(&out, 1);
        assert!(
            out.stdout.contains("public.no_such_table") && out.stdout.contains("TableNotFound"),
            "{}",
            out.stdout
        );
    }
    assert!(reloptions(&db, "user_progress").await.is_empty());

    // An unknown parameter and an invalid value are refused before the database is touched.
    for (body, needle) in [
        (
            "      - {table: user_progress, vacuumScaleFactr: 0.05}\n",
            "unknown field `vacuumScaleFactr`",
        ),
        (
            "      - {table: user_progress, vacuumScaleFactor: lots}\n",
            "vacuumScaleFactor",
        ),
    ] {
        let out = cli("apply", db.url(), &spec(body));
        expect_code(&out, 1);
        assert!(out.stderr.contains(needle), "{needle}: {}", out.stderr);
    }
    // Out of PostgreSQL's range: PostgreSQL's own message, nothing changed.
    let out = cli(
        "apply",
        db.url(),
        &spec("      - {table: user_progress, vacuumScaleFactor: 0.05, vacuumCostLimit: 20000}\n"),
    );
    expect_code(&out, 1);
    assert!(
        out.stdout.contains("autovacuum_vacuum_cost_limit"),
        "{}",
        out.stdout
    );
    assert!(
        reloptions(&db, "user_progress").await.is_empty(),
        "the failed ALTER rolled back"
    );
}

#[tokio::test]
async fn two_policies_on_one_database_never_fight() {
    let db = TestDb::new().await;
    db.exec(SCHEMA).await;
    let a = policy(
        "a",
        "  autovacuum:\n    tables: [{table: user_progress, vacuumThreshold: 10}]\n",
    );
    expect_code(&cli("apply", db.url(), &a), 0);

    // Another policy without the section does not reset what `a` owns.
    let b_empty = policy("b", "  autovacuum:\n    tables: []\n");
    expect_code(&cli("apply", db.url(), &b_empty), 0);
    assert_eq!(
        reloptions(&db, "user_progress").await,
        ["autovacuum_vacuum_threshold=10"]
    );

    // Another policy wanting a different value is refused, naming the owner.
    let b = policy(
        "b",
        "  autovacuum:\n    tables: [{table: user_progress, vacuumThreshold: 20}]\n",
    );
    let out = cli("apply", db.url(), &b);
    expect_code(&out, 1);
    assert!(
        out.stdout.contains("OwnershipConflict") && out.stdout.contains("tests/a"),
        "{}",
        out.stdout
    );
    assert_eq!(
        reloptions(&db, "user_progress").await,
        ["autovacuum_vacuum_threshold=10"]
    );
    expect_code(&cli("plan", db.url(), &a), 0);
}
