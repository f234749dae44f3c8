//! The featureFlags area against real PostgreSQL: the flags table and `feature_enabled()`
//! created from empty, upserts, drift, deletion of flags removed from the spec, bad input,
//! and the deterministic bucketing the roll-out relies on.

use dbpolicy_test_support as support;

use support::{cli, expect_code, policy, TestDb};

fn spec(flags: &str) -> String {
    policy("flags", &format!("  featureFlags:\n    flags:\n{flags}"))
}

async fn flags(db: &TestDb) -> Vec<String> {
    db.query_column::<String>(
        "SELECT name || ':' || enabled || ':' || rollout_percentage || ':' || coalesce(description, '') FROM feature_flags ORDER BY name",
    )
    .await
}

async fn enabled_count(db: &TestDb, flag: &str) -> i64 {
    db.query_scalar::<i64>(&format!(
        "SELECT count(*) FROM generate_series(1, 10000) i WHERE feature_enabled('{flag}', 'user-' || i)"
    ))
    .await
}

#[tokio::test]
async fn apply_from_empty_idempotence_and_bucketing() {
    let db = TestDb::new().await;
    let p = spec(
        "      - {name: new_quiz_engine, enabled: true, rolloutPercentage: 25, description: gradual}\n      - {name: category_stats_v2, enabled: true}\n      - {name: ai_explanations, enabled: false}\n",
    );
    let plan = cli("plan", db.url(), &p);
    expect_code(&plan, 2);
    assert!(plan.stdout.contains("create the flags table"));
    expect_code(&cli("apply", db.url(), &p), 0);
    assert_eq!(
        flags(&db).await,
        [
            "ai_explanations:false:100:",
            "category_stats_v2:true:100:",
            "new_quiz_engine:true:25:gradual"
        ]
    );
    expect_code(&cli("plan", db.url(), &p), 0);

    // 25% of subjects, the same ones every time; full and disabled flags as expected.
    let quarter = enabled_count(&db, "new_quiz_engine").await;
    assert!(
        (2200..=2800).contains(&quarter),
        "{quarter} of 10000 for a 25% roll-out"
    );
    assert_eq!(enabled_count(&db, "new_quiz_engine").await, quarter);
    assert_eq!(enabled_count(&db, "category_stats_v2").await, 10000);
    assert_eq!(enabled_count(&db, "ai_explanations").await, 0);
    assert_eq!(enabled_count(&db, "no_such_flag").await, 0);
    db.exec("CREATE TABLE early AS SELECT i FROM generate_series(1, 10000) i WHERE feature_enabled('new_quiz_engine', 'user-' || i)").await;

    // Widening the roll-out keeps everyone who had it.
    let wider = spec("      - {name: new_quiz_engine, enabled: true, rolloutPercentage: 50, description: gradual}\n      - {name: category_stats_v2, enabled: true}\n      - {name: ai_explanations, enabled: false}\n");
    expect_code(&cli("apply", db.url(), &wider), 0);
    let lost = db
        .query_scalar::<i64>(
            "SELECT count(*) FROM early WHERE NOT feature_enabled('new_quiz_engine', 'user-' || i)",
        )
        .await;
    assert_eq!(lost, 0);
    let half = enabled_count(&db, "new_quiz_engine").await;
    assert!((4500..=5500).contains(&half), "{half}");
}

#[tokio::test]
async fn drift_and_removal() {
    let db = TestDb::new().await;
    let two = spec("      - {name: a, enabled: true}\n      - {name: b, enabled: false, rolloutPercentage: 10}\n");
    expect_code(&cli("apply", db.url(), &two), 0);

    db.exec("UPDATE feature_flags SET enabled = false WHERE name = 'a'; INSERT INTO feature_flags (name, enabled) VALUES ('rogue', true)").await;
    let plan = cli("plan", db.url(), &two);
    expect_code(&plan, 2);
    assert!(plan.stdout.contains("upsert flag a"), "{}", plan.stdout);
    assert!(plan.stdout.contains("delete flag rogue"), "{}", plan.stdout);
    expect_code(&cli("apply", db.url(), &two), 0);
    assert_eq!(flags(&db).await, ["a:true:100:", "b:false:10:"]);

    let one = spec("      - {name: a, enabled: true}\n");
    expect_code(&cli("apply", db.url(), &one), 0);
    assert_eq!(flags(&db).await, ["a:true:100:"]);
    expect_code(&cli("plan", db.url(), &one), 0);
}

#[tokio::test]
async fn application_roles_can_ask_without_reading_the_table() {
    let db = TestDb::new().await;
    expect_code(
        &cli(
            "apply",
            db.url(),
            &spec("      - {name: a, enabled: true}\n"),
        ),
        0,
    );
    let role = db.unique_role("app");
    db.exec(&format!("CREATE ROLE {role} LOGIN")).await;
    let mut conn = sqlx_connect(&db.url_as(&role)).await;
    let on: bool = sqlx::query_scalar("SELECT feature_enabled('a', 'someone')")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert!(on);
    let denied = sqlx::query("SELECT * FROM feature_flags")
        .execute(&mut conn)
        .await
        .unwrap_err();
    assert_eq!(support::sqlstate(&denied).as_deref(), Some("42501"));
}

async fn sqlx_connect(url: &str) -> sqlx::PgConnection {
    use sqlx::Connection;
    sqlx::PgConnection::connect(url).await.unwrap()
}

#[tokio::test]
async fn bad_input_is_refused_and_changes_nothing() {
    let db = TestDb::new().await;
    for (flags, needle) in [
        (
            "      - {name: \"bad name\", enabled: true}\n",
            "featureFlags.flags[0].name",
        ),
        (
            "      - {name: a, enabled: true, rolloutPercentage: 150}\n",
            "rolloutPercentage",
        ),
        ("      - {name: a, enabled: yes please}\n", "enabled"),
        (
            "      - {name: a, enabled: true}\n      - {name: a, enabled: false}\n",
            "a is listed more than once",
        ),
    ] {
        let out = cli("apply", db.url(), &spec(flags));
        expect_code(&out, 1);
        assert!(out.stderr.contains(needle), "{needle}: {}", out.stderr);
    }
    let exists = db
        .query_scalar::<bool>("SELECT to_regclass('feature_flags') IS NOT NULL")
        .await;
    assert!(!exists, "nothing was created");

    // A table of that name that is not a flags table is never touched.
    db.exec("CREATE TABLE feature_flags (id int)").await;
    let out = cli(
        "apply",
        db.url(),
        &spec("      - {name: a, enabled: true}\n"),
    );
    expect_code(&out, 1);
    assert!(
        out.stdout.contains("IncompatibleFlagsTable")
            && out.stdout.contains("public.feature_flags"),
        "{}",
        out.stdout
    );
    let fn_exists = db
        .query_scalar::<bool>("SELECT to_regproc('feature_enabled') IS NOT NULL")
        .await;
    assert!(!fn_exists);
}

/// With `owner`, the flags table and the SECURITY DEFINER `feature_enabled()` belong to that
/// role (the function runs with its rights, not the operator's), and the plan converges.
/// A table name holding the old fixed dollar-quote tag cannot end the function body.
#[tokio::test]
async fn owner_gets_the_table_and_the_security_definer_function() {
    let db = TestDb::new().await;
    let owner = db.unique_role("flags_owner");
    db.exec(&format!("CREATE ROLE {owner} NOLOGIN")).await;
    let p = policy(
        "flags",
        &format!(
            "  featureFlags:\n    owner: {owner}\n    table: \"x$dbpolicy$flags\"\n    flags:\n      - {{name: a, enabled: true}}\n"
        ),
    );
    expect_code(&cli("apply", db.url(), &p), 0);
    expect_code(&cli("plan", db.url(), &p), 0);
    let owners = db
        .query_column::<String>(
            "SELECT pg_get_userbyid(relowner)::text FROM pg_class WHERE relname = 'x$dbpolicy$flags'
             UNION ALL
             SELECT pg_get_userbyid(proowner)::text FROM pg_proc WHERE proname = 'feature_enabled'",
        )
        .await;
    assert_eq!(owners, [owner.clone(), owner.clone()]);
    assert!(
        db.query_scalar::<bool>("SELECT feature_enabled('a', 'u1')")
            .await
    );

    let missing = policy(
        "flags",
        "  featureFlags:\n    owner: no_such_role_anywhere\n    flags: []\n",
    );
    let out = cli("plan", db.url(), &missing);
    expect_code(&out, 1);
    assert!(out.stdout.contains("RoleNotFound"), "{}", out.stdout);
}
