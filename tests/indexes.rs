//! The indexes area against real PostgreSQL: concurrent builds, PostgreSQL-normalised
//! comparison (no perpetual drift), repair of an invalid index left by a failed concurrent
//! build, a failed replacement, builds interrupted by `kill -9`, drift, prune, bad input.

use dbpolicy_test_support as support;

use std::process::Stdio;
use std::time::Duration;

use sqlx::PgConnection;
use support::{cli, dbpolicy_cmd, eventually, expect_code, policy, write_policy, TestDb};

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

async fn ledger_items(db: &TestDb) -> Vec<String> {
    db.query_column::<String>(
        "SELECT target || ' ' || item FROM dbpolicy.managed WHERE area = 'indexes' ORDER BY 1",
    )
    .await
}

async fn index_valid(db: &TestDb, name: &str) -> Option<bool> {
    db.query_scalar::<Option<bool>>(&format!(
        "SELECT (SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass('{name}'))"
    ))
    .await
}

#[tokio::test]
async fn a_failed_replacement_no_longer_blocks_once_the_data_is_fixed() {
    let db = TestDb::new().await;
    db.exec(SCHEMA).await;
    db.exec("INSERT INTO codes VALUES ('a'), ('a'), ('b')")
        .await;
    let flags = "  featureFlags:\n    flags: [{name: after_indexes, enabled: true}]\n";
    let index = |unique: bool| {
        policy(
            "ix",
            &format!("  indexes:\n    indexes:\n      - {{name: codes_code, table: codes, columns: [code], unique: {unique}}}\n{flags}"),
        )
    };
    expect_code(&cli("apply", db.url(), &index(false)), 0);

    // A UNIQUE replacement over duplicates: the build beside the old index fails and
    // leaves it invalid; the old index and everything after the failure stay as they were.
    let out = cli("apply", db.url(), &index(true));
    expect_code(&out, 1);
    assert!(out.stdout.contains("23505"), "{}", out.stdout);
    assert_eq!(
        index_valid(&db, "codes_code_dbpolicy_new").await,
        Some(false)
    );
    assert_eq!(index_valid(&db, "codes_code").await, Some(true));

    // Fixed data: the invalid leftover is ours (its intent was committed before the build),
    // so it is dropped and built again, and the run goes on to the areas after indexes.
    db.exec("DELETE FROM codes WHERE ctid NOT IN (SELECT min(ctid) FROM codes GROUP BY code)")
        .await;
    let plan = cli("plan", db.url(), &index(true));
    expect_code(&plan, 2);
    assert!(
        plan.stdout
            .contains("drop public.codes_code_dbpolicy_new, an unusable replacement"),
        "{}",
        plan.stdout
    );
    let out = cli("apply", db.url(), &index(true));
    expect_code(&out, 0);
    assert!(indexdef(&db, "codes_code")
        .await
        .unwrap()
        .starts_with("CREATE UNIQUE INDEX codes_code"));
    assert_eq!(index_valid(&db, "codes_code_dbpolicy_new").await, None);
    assert!(
        db.query_scalar::<bool>("SELECT enabled FROM feature_flags WHERE name = 'after_indexes'")
            .await
    );
    assert_eq!(ledger_items(&db).await, ["public.codes_code index"]);
    expect_code(&cli("plan", db.url(), &index(true)), 0);
}

/// A session holding a snapshot: a concurrent build waits for it before it finishes.
async fn hold_snapshot(db: &TestDb) -> PgConnection {
    let mut c = db.connect().await;
    sqlx::raw_sql("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1")
        .execute(&mut c)
        .await
        .unwrap();
    c
}

/// Runs `dbpolicy apply` and kills it (SIGKILL) while its concurrent build waits for a
/// snapshot `holder` keeps, and waits until the orphaned session is gone. With `aborts`
/// (the database sets `client_connection_check_interval`), the session notices its dead
/// client while still waiting and aborts the build, leaving it invalid; otherwise the
/// snapshot is released and PostgreSQL finishes the build without its client.
async fn kill_apply_during_build(db: &TestDb, yaml: &str, aborts: bool) {
    let mut holder = hold_snapshot(db).await;
    let file = write_policy(yaml);
    let mut child = dbpolicy_cmd()
        .args(["apply", "-f", file.path().to_str().unwrap()])
        .env("DATABASE_URL", db.url())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start dbpolicy");
    let sessions = |condition: &'static str| {
        format!(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'dbpolicy' AND datname = '{}' {condition}",
            db.name()
        )
    };
    let waiting = sessions(
        "AND query LIKE 'CREATE %INDEX CONCURRENTLY%' AND wait_event_type = 'Lock' AND state = 'active'",
    );
    eventually(Duration::from_secs(30), || async {
        match db.query_scalar::<i64>(&waiting).await {
            1 => Ok(()),
            n => Err(format!("{n} builds waiting")),
        }
    })
    .await;
    child.kill().expect("kill dbpolicy");
    child.wait().expect("reap dbpolicy");
    let any = sessions("");
    let orphan_gone = || async {
        eventually(Duration::from_secs(30), || async {
            match db.query_scalar::<i64>(&any).await {
                0 => Ok(()),
                n => Err(format!("{n} dbpolicy sessions left")),
            }
        })
        .await
    };
    if aborts {
        orphan_gone().await;
    }
    sqlx::raw_sql("COMMIT").execute(&mut holder).await.unwrap();
    orphan_gone().await;
}

#[tokio::test]
async fn an_index_built_by_a_killed_run_is_owned_by_the_next_run() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE codes (code text, n int)").await;
    let index = |columns: &str| {
        spec(
            &format!(
                "    indexes:\n      - {{name: codes_code, table: codes, columns: [{columns}]}}\n"
            ),
            "",
        )
    };
    kill_apply_during_build(&db, &index("code"), false).await;
    // PostgreSQL finished the build after its client died; the ledger holds the intent
    // committed before the build, not the ownership written after it.
    assert_eq!(index_valid(&db, "codes_code").await, Some(true));
    assert_eq!(ledger_items(&db).await, ["public.codes_code intent:index"]);

    let out = cli("apply", db.url(), &index("code"));
    expect_code(&out, 0);
    assert!(
        out.stdout
            .contains("record the index an interrupted run built"),
        "{}",
        out.stdout
    );
    assert_eq!(ledger_items(&db).await, ["public.codes_code index"]);
    expect_code(&cli("plan", db.url(), &index("code")), 0);

    // Owned: a later change to it is no longer refused as destructive.
    let out = cli("apply", db.url(), &index("code, n"));
    expect_code(&out, 0);
    assert!(indexdef(&db, "codes_code")
        .await
        .unwrap()
        .contains("(code, n)"));
    expect_code(&cli("plan", db.url(), &index("code, n")), 0);
}

#[tokio::test]
async fn a_replacement_interrupted_by_a_kill_is_finished_by_the_next_run() {
    // Finished by PostgreSQL after the kill (a valid replacement is swapped in), or aborted
    // with the client (an invalid one is dropped and built again).
    for check_client in [false, true] {
        let db = TestDb::new().await;
        db.exec("CREATE TABLE codes (code text, n int); INSERT INTO codes SELECT g::text, g FROM generate_series(1, 1000) g")
            .await;
        let index = |columns: &str| {
            spec(
                &format!("    indexes:\n      - {{name: codes_code, table: codes, columns: [{columns}]}}\n"),
                "",
            )
        };
        expect_code(&cli("apply", db.url(), &index("code")), 0);
        if check_client {
            // For this database only: new sessions check for a dead client every 10 ms.
            db.exec(&format!(
                "ALTER DATABASE {} SET client_connection_check_interval = 10",
                support::quote_ident(db.name())
            ))
            .await;
        }
        kill_apply_during_build(&db, &index("code, n"), check_client).await;
        assert_eq!(
            index_valid(&db, "codes_code_dbpolicy_new").await,
            Some(!check_client),
            "check_client {check_client}"
        );

        let out = cli("apply", db.url(), &index("code, n"));
        expect_code(&out, 0);
        assert_eq!(
            out.stdout
                .contains("build the new definition beside the old"),
            check_client,
            "a finished replacement is not built again\n{}",
            out.stdout
        );
        assert!(indexdef(&db, "codes_code")
            .await
            .unwrap()
            .contains("(code, n)"));
        assert_eq!(index_valid(&db, "codes_code").await, Some(true));
        assert_eq!(index_valid(&db, "codes_code_dbpolicy_new").await, None);
        assert_eq!(ledger_items(&db).await, ["public.codes_code index"]);
        expect_code(&cli("plan", db.url(), &index("code, n")), 0);
    }
}
