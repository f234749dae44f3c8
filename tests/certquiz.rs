//! The seed scenario end to end: examples/certquiz/schema.sql and seed.sql loaded into a
//! throwaway server (the policy changes server settings), the whole certquiz policy
//! applied from empty, and a second plan empty.

mod support;

use support::{cli, expect_code, PgServer, TestDb};

const SCHEMA: &str = include_str!("../examples/certquiz/schema.sql");
const SEED: &str = include_str!("../examples/certquiz/seed.sql");
const POLICY: &str = include_str!("../examples/certquiz/policy.yaml");

#[tokio::test]
async fn certquiz_policy_applies_from_empty_and_converges() {
    let server = PgServer::start();
    let db = TestDb::on(&server).await;
    db.exec(SCHEMA).await;
    db.exec(SEED).await;

    let plan = cli("plan", db.url(), POLICY);
    expect_code(&plan, 2);
    // Backups are the operator's CronJob: said, never silent.
    assert!(plan.stdout.contains("# skipped backups"), "{}", plan.stdout);

    let apply = cli("apply", db.url(), POLICY);
    expect_code(&apply, 0);
    let again = cli("plan", db.url(), POLICY);
    expect_code(&again, 0);
    assert!(
        again.stdout.contains("nothing to change"),
        "{}",
        again.stdout
    );

    // A sample of what the policy did, one per area.
    let flags = db
        .query_scalar::<i64>("SELECT count(*) FROM feature_flags")
        .await;
    assert_eq!(flags, 3);
    let rls = db.query_scalar::<bool>("SELECT relrowsecurity AND relforcerowsecurity FROM pg_class WHERE relname = 'user_progress'").await;
    assert!(rls);
    let indexes = db
        .query_scalar::<i64>("SELECT count(*) FROM pg_class WHERE relname IN ('idx_user_progress_ospf_accuracy', 'idx_audit_logs_action_time', 'category_statistics_category_key')")
        .await;
    assert_eq!(indexes, 3);
    let view_rows = db
        .query_scalar::<i64>("SELECT count(*) FROM category_statistics")
        .await;
    assert!(view_rows > 0, "the view aggregates the seed's progress");
    let partitions = db
        .query_scalar::<i64>(
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'audit_logs'::regclass",
        )
        .await;
    assert!(partitions >= 4, "{partitions} partitions");
    let reloptions = db
        .query_scalar::<Vec<String>>(
            "SELECT reloptions FROM pg_class WHERE relname = 'quiz_sessions'",
        )
        .await;
    assert!(
        reloptions.contains(&"autovacuum_vacuum_scale_factor=0.05".to_string()),
        "{reloptions:?}"
    );
    let slow = db
        .query_scalar::<String>(
            "SELECT setting FROM pg_file_settings WHERE name = 'log_min_duration_statement'",
        )
        .await;
    assert_eq!(slow, "500ms");
}
