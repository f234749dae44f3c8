//! `dbpolicy release` (what the operator's finalizer runs on deletion) against real
//! PostgreSQL: a successor policy adopts what a released one set without a hand edit;
//! `--reset` (or `spec.deletionPolicy: Reset`) resets first; a replication slot the policy
//! created is named when it stays (Retain) and dropped on Reset. Slots are server-wide:
//! that test starts its own server.

use dbpolicy_test_support as support;

use support::{
    cli, expect_code, policy, run_dbpolicy, write_policy, PgServer, PgServerOptions, TestDb,
};

fn autovacuum(name: &str, table: &str, threshold: u32) -> String {
    policy(
        name,
        &format!("  autovacuum:\n    tables: [{{table: {table}, vacuumThreshold: {threshold}}}]\n"),
    )
}

async fn reloptions(db: &TestDb, table: &str) -> Option<String> {
    db.query_scalar(&format!(
        "SELECT array_to_string(reloptions, ',') FROM pg_class WHERE oid = 'public.{table}'::regclass"
    ))
    .await
}

async fn claims(db: &TestDb) -> Vec<String> {
    db.query_column("SELECT policy || ' ' || area || ' ' || target || ' ' || item FROM dbpolicy.managed ORDER BY 1")
        .await
}

#[tokio::test]
async fn a_released_policy_leaves_what_it_set_and_a_successor_adopts_it() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (id int)").await;
    let first = autovacuum("first", "t", 10);
    let successor = autovacuum("successor", "t", 20);
    expect_code(&cli("apply", db.url(), &first), 0);

    // Before: the successor is refused, the table is owned by the first policy.
    let refused = cli("apply", db.url(), &successor);
    expect_code(&refused, 1);
    assert!(
        refused.stdout.contains("OwnershipConflict") && refused.stdout.contains("tests/first"),
        "{}",
        refused.stdout
    );

    let file = write_policy(&first);
    let out = run_dbpolicy(
        ["release", "-f", file.path().to_str().unwrap()],
        Some(db.url()),
    );
    expect_code(&out, 0);
    assert!(
        out.stdout.contains("# released 1 claim(s) of tests/first"),
        "{}",
        out.stdout
    );
    // Retain: what it set stays.
    assert_eq!(
        reloptions(&db, "t").await.as_deref(),
        Some("autovacuum_vacuum_threshold=10")
    );
    assert!(claims(&db).await.is_empty());

    expect_code(&cli("apply", db.url(), &successor), 0);
    assert_eq!(
        reloptions(&db, "t").await.as_deref(),
        Some("autovacuum_vacuum_threshold=20")
    );
    assert_eq!(
        claims(&db).await,
        ["tests/successor autovacuum public.t autovacuum_vacuum_threshold"]
    );

    // Released by id alone (no file at hand), with a reset first: the setting goes too.
    let out = run_dbpolicy(
        ["release", "--policy-id", "tests/successor", "--reset"],
        Some(db.url()),
    );
    expect_code(&out, 0);
    assert_eq!(reloptions(&db, "t").await, None, "{}", out.stdout);
    assert!(claims(&db).await.is_empty());

    // Releasing what owns nothing is fine; no id and no file is refused by the parser.
    let out = run_dbpolicy(["release", "--policy-id", "tests/none"], Some(db.url()));
    expect_code(&out, 0);
    assert!(
        out.stdout.contains("# released 0 claim(s)"),
        "{}",
        out.stdout
    );
    expect_code(&run_dbpolicy(["release"], Some(db.url())), 2);
}

#[tokio::test]
async fn a_slot_it_created_is_named_when_retained_and_dropped_on_reset() {
    let server = PgServer::start_with(PgServerOptions::new().replication());
    let db = TestDb::on(&server).await;
    let spec = |deletion: &str| {
        policy(
            "replicas",
            &format!("  {deletion}replicas:\n    replicas:\n      - {{name: r1, connectionSecretRef: {{name: r1-conn}}, slot: r1_slot}}\n"),
        )
    };
    let slots = || async {
        db.query_column::<String>("SELECT slot_name::text FROM pg_replication_slots ORDER BY 1")
            .await
    };
    let retain = spec("");
    expect_code(&cli("apply", db.url(), &retain), 0);
    assert_eq!(slots().await, ["r1_slot"]);
    let file = write_policy(&retain);
    let out = run_dbpolicy(
        ["release", "-f", file.path().to_str().unwrap()],
        Some(db.url()),
    );
    expect_code(&out, 0);
    assert!(
        out.stderr
            .contains("replication slot r1_slot created by this policy remains")
            && out
                .stderr
                .contains("SELECT pg_drop_replication_slot('r1_slot')"),
        "{}",
        out.stderr
    );
    assert_eq!(slots().await, ["r1_slot"], "Retain drops nothing");

    // A slot the policy did not create is never taken over: the retained one is dropped by
    // hand before a Reset policy creates its own.
    db.exec("SELECT pg_drop_replication_slot('r1_slot')").await;
    let reset = spec("deletionPolicy: Reset\n  ");
    expect_code(&cli("apply", db.url(), &reset), 0);
    assert_eq!(slots().await, ["r1_slot"]);
    let file = write_policy(&reset);
    let out = run_dbpolicy(
        ["release", "-f", file.path().to_str().unwrap()],
        Some(db.url()),
    );
    expect_code(&out, 0);
    assert!(slots().await.is_empty(), "{}\n{}", out.stdout, out.stderr);
    assert!(!out.stderr.contains("remains"), "{}", out.stderr);
}
