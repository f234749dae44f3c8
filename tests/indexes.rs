//! The indexes area against real PostgreSQL: concurrent builds, PostgreSQL-normalised
//! comparison (no perpetual drift), repair of an invalid index left by a failed concurrent
//! build, drift, prune, bad input.

mod support;

use support::{cli, expect_code, policy, TestDb};

const SCHEMA: &str = "
CREATE TABLE user_progress (id serial PRIMARY KEY, user_id uuid NOT NULL, category_stats jsonb NOT NULL DEFAULT '{}');
CREATE TABLE audit_logs (id bigint, action text, created_at timestamptz NOT NULL) PARTITION BY RANGE (created_at);
CREATE TABLE audit_logs_2024_01 PARTITION OF audit_logs FOR VALUES FROM ('2024-01-01') TO ('2024-02-01');
CREATE TABLE codes (code text);";

fn spec(indexes: &str, extra: &str) -> String {
    policy("ix", &format!("{extra}  indexes:\n{indexes}"))
}

const CERTQUIZ_INDEXES: &str = "    indexes:
      - name: idx_user_progress_ospf_accuracy
        table: user_progress
        columns: [\"((category_stats->'ospf'->>'accuracy')::numeric)\"]
      - name: idx_audit_logs_action_time
        table: audit_logs
        columns: [action, created_at DESC]
        where: action IN ('login', 'exam_submitted')
      - {name: idx_user_progress_user, table: user_progress, columns: [user_id], method: Hash}
";

async fn indexdef(db: &TestDb, name: &str) -> Option<String> {
    db.query_scalar::<Option<String>>(&format!("SELECT pg_get_indexdef(to_regclass('{name}'))"))
        .await
}

#[tokio::test]
async fn expression_and_partial_indexes_converge() {
    let db = TestDb::new().await;
    db.exec(SCHEMA).await;
    let p = spec(CERTQUIZ_INDEXES, "");
    let plan = cli("plan", db.url(), &p);
    expect_code(&plan, 2);
    assert!(
        plan.stdout
            .contains("CREATE INDEX CONCURRENTLY \"idx_user_progress_ospf_accuracy\""),
        "{}",
        plan.stdout
    );
    // Partitioned tables cannot be indexed concurrently: a plain build, said to lock.
    assert!(
        plan.stdout
            .contains("-- [locking] public.idx_audit_logs_action_time"),
        "{}",
        plan.stdout
    );

    expect_code(&cli("apply", db.url(), &p), 0);
    let def = indexdef(&db, "idx_user_progress_ospf_accuracy")
        .await
        .unwrap();
    assert!(
        def.contains("((((category_stats -> 'ospf'::text) ->> 'accuracy'::text))::numeric)"),
        "{def}"
    );
    let partial = indexdef(&db, "idx_audit_logs_action_time").await.unwrap();
    assert!(
        partial.contains("WHERE (action = ANY (ARRAY['login'::text, 'exam_submitted'::text]))"),
        "{partial}"
    );
    // The partition got its own index from the parent.
    let on_partition = db
        .query_scalar::<i64>(
            "SELECT count(*) FROM pg_indexes WHERE tablename = 'audit_logs_2024_01'",
        )
        .await;
    assert_eq!(on_partition, 1);

    // PostgreSQL rewrote both expressions; comparing its own form means no drift.
    let again = cli("plan", db.url(), &p);
    expect_code(&again, 0);
}

#[tokio::test]
async fn drift_is_repaired() {
    let db = TestDb::new().await;
    db.exec(SCHEMA).await;
    let p = spec(CERTQUIZ_INDEXES, "");
    expect_code(&cli("apply", db.url(), &p), 0);

    db.exec("DROP INDEX idx_user_progress_user").await;
    db.exec("DROP INDEX idx_user_progress_ospf_accuracy; CREATE INDEX idx_user_progress_ospf_accuracy ON user_progress (id)").await;
    let plan = cli("plan", db.url(), &p);
    expect_code(&plan, 2);
    assert!(
        plan.stdout
            .contains("build the new definition beside the old"),
        "{}",
        plan.stdout
    );
    expect_code(&cli("apply", db.url(), &p), 0);
    assert!(indexdef(&db, "idx_user_progress_ospf_accuracy")
        .await
        .unwrap()
        .contains("accuracy"));
    assert!(indexdef(&db, "idx_user_progress_user")
        .await
        .unwrap()
        .contains("USING hash"));
    expect_code(&cli("plan", db.url(), &p), 0);
}

#[tokio::test]
async fn an_invalid_index_left_by_a_failed_concurrent_build_is_rebuilt() {
    let db = TestDb::new().await;
    db.exec(SCHEMA).await;
    db.exec("INSERT INTO codes VALUES ('a'), ('a')").await;
    let p = spec("    indexes:\n      - {name: codes_code_key, table: codes, columns: [code], unique: true}\n", "");
    let out = cli("apply", db.url(), &p);
    expect_code(&out, 1);
    assert!(out.stdout.contains("23505"), "{}", out.stdout);
    let valid = db
        .query_scalar::<bool>(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = 'codes_code_key'::regclass",
        )
        .await;
    assert!(!valid, "the failed concurrent build left an invalid index");

    db.exec("DELETE FROM codes").await;
    let plan = cli("plan", db.url(), &p);
    expect_code(&plan, 2);
    assert!(
        plan.stdout.contains("drop the invalid index"),
        "{}",
        plan.stdout
    );
    expect_code(&cli("apply", db.url(), &p), 0);
    let valid = db
        .query_scalar::<bool>(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = 'codes_code_key'::regclass",
        )
        .await;
    assert!(valid);
    expect_code(&cli("plan", db.url(), &p), 0);
}

#[tokio::test]
async fn prune_needs_ownership_and_allow_destructive() {
    let db = TestDb::new().await;
    db.exec(SCHEMA).await;
    db.exec("CREATE INDEX someone_elses ON codes (code)").await;
    expect_code(
        &cli(
            "apply",
            db.url(),
            &spec(
                "    indexes:\n      - {name: mine, table: codes, columns: [code]}\n",
                "",
            ),
        ),
        0,
    );

    let pruned = "    prune: true\n    indexes: []\n";
    let out = cli("apply", db.url(), &spec(pruned, ""));
    expect_code(&out, 2);
    assert!(
        out.stdout
            .contains("refused [destructive] indexes public.mine"),
        "{}",
        out.stdout
    );
    assert!(indexdef(&db, "mine").await.is_some());

    expect_code(
        &cli(
            "apply",
            db.url(),
            &spec(pruned, "  safety: {allowDestructive: true}\n"),
        ),
        0,
    );
    assert!(indexdef(&db, "mine").await.is_none());
    assert!(
        indexdef(&db, "someone_elses").await.is_some(),
        "never created by the policy: never dropped"
    );
}

#[tokio::test]
async fn bad_input_names_the_index_and_changes_nothing() {
    let db = TestDb::new().await;
    db.exec(SCHEMA).await;
    for (indexes, needle) in [
        ("      - {name: ok, table: codes, columns: [code]}\n      - {name: bad, table: codes, columns: [nope]}\n", "ColumnNotFound"),
        ("      - {name: ok, table: codes, columns: [code]}\n      - {name: bad, table: no_table, columns: [code]}\n", "TableNotFound"),
        ("      - {name: ok, table: codes, columns: [code]}\n      - {name: bad, table: codes, columns: [\"code) WHERE (true\"]}\n", "indexes.indexes[1].columns[0]"),
        ("      - {name: codes, table: user_progress, columns: [id]}\n", "NameInUse"),
    ] {
        let out = cli("apply", db.url(), &spec(&format!("    indexes:\n{indexes}"), ""));
        expect_code(&out, 1);
        assert!(out.stdout.contains(needle) || out.stderr.contains(needle), "{needle}: {}{}", out.stdout, out.stderr);
        assert!(indexdef(&db, "ok").await.is_none());
    }
}
