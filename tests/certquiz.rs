//! The seed scenario end to end: examples/certquiz/schema.sql and seed.sql loaded into a
//! throwaway server (the policy changes server settings), the whole certquiz policy
//! applied from empty, and a second plan empty.

use dbpolicy_test_support as support;

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

/// The replica is an overlay (examples/certquiz-replica), rendered by kustomize: the base
/// has none, so the quick start can be Ready without a standby; the overlay adds exactly
/// `spec.replicas` and, applied, creates the slot (the replica is reported as not checked).
#[tokio::test]
async fn the_replica_overlay_adds_only_the_replica_and_applies() {
    let root = env!("CARGO_MANIFEST_DIR");
    let render = |dir: &str| {
        let out = std::process::Command::new("kubectl")
            .args(["kustomize", &format!("{root}/{dir}")])
            .output()
            .expect("kubectl (kustomize) on PATH");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let spec = |yaml: &str| {
        let (policies, _) = dbpolicy::cli::parse_policies(yaml).expect("a valid policy");
        assert_eq!(policies.len(), 1);
        serde_json::to_value(&policies[0].spec).unwrap()
    };
    let base = spec(POLICY);
    assert!(base.get("replicas").is_none(), "the base has no replica");
    assert_eq!(spec(&render("examples/certquiz")), base);
    let overlay = render("examples/certquiz-replica");
    let mut with_replica = spec(&overlay);
    let replicas = with_replica
        .as_object_mut()
        .unwrap()
        .remove("replicas")
        .expect("the overlay adds spec.replicas");
    assert_eq!(with_replica, base, "and nothing else");
    assert_eq!(replicas["replicas"][0]["slot"], "certquiz_replica_1");

    let server = PgServer::start();
    let db = TestDb::on(&server).await;
    db.exec(SCHEMA).await;
    db.exec(SEED).await;
    let apply = cli("apply", db.url(), &overlay);
    expect_code(&apply, 0);
    assert!(
        apply
            .stdout
            .contains("pg_create_physical_replication_slot('certquiz_replica_1', true)")
            || apply.stdout.contains("create physical replication slot"),
        "{}",
        apply.stdout
    );
    let slots = db
        .query_column::<String>("SELECT slot_name::text FROM pg_replication_slots")
        .await;
    assert_eq!(slots, ["certquiz_replica_1"]);
}

/// examples/least-privilege.yaml on the certquiz schema: the view and the flags function
/// belong to the narrow roles it names, and the plan converges.
#[tokio::test]
async fn least_privilege_example_applies_and_converges() {
    let db = TestDb::new().await;
    db.exec(SCHEMA).await;
    db.exec(SEED).await;
    // The example's role names are fixed; roles are per server, so they are tracked and
    // dropped with the database (the tests of one run do not share them).
    for role in ["reporting", "flags_reader"] {
        db.track_role(role);
        db.exec(&format!(
            "DO $$ BEGIN CREATE ROLE {role} NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$"
        ))
        .await;
    }
    db.exec("GRANT SELECT ON exams, user_progress TO reporting; CREATE SCHEMA flags")
        .await;
    let policy = include_str!("../examples/least-privilege.yaml");
    expect_code(&cli("apply", db.url(), policy), 0);
    expect_code(&cli("plan", db.url(), policy), 0);
    let owners = db
        .query_column::<String>(
            "SELECT matviewowner::text FROM pg_matviews WHERE matviewname = 'exam_readiness'
             UNION ALL SELECT pg_get_userbyid(proowner)::text FROM pg_proc
              WHERE proname = 'feature_enabled' AND pronamespace = 'flags'::regnamespace",
        )
        .await;
    assert_eq!(owners, ["reporting", "flags_reader"]);
}
