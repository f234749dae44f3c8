//! Safety of the executor against real PostgreSQL: every statement under lock_timeout, and
//! the per-database advisory lock that keeps concurrent runs from interleaving.

mod support;

use std::time::{Duration, Instant};

use sqlx::Connection;
use support::{
    cli, eventually, expect_code, policy, run_dbpolicy_async, spawn_apply, write_policy, TestDb,
};

const LOCK_KEY: i64 = dbpolicy::engine::ADVISORY_LOCK_KEY;

#[tokio::test]
async fn a_held_table_lock_fails_within_lock_timeout_and_changes_nothing() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE busy (id int)").await;
    let p = policy(
        "locked",
        "  safety: {lockTimeout: 500ms, statementTimeout: 60s}\n  autovacuum:\n    tables: [{table: busy, vacuumScaleFactor: 0.01}]\n  featureFlags:\n    flags: [{name: a, enabled: true}]\n",
    );

    let mut holder = db.connect().await;
    sqlx::raw_sql("BEGIN; LOCK TABLE busy IN ACCESS EXCLUSIVE MODE")
        .execute(&mut holder)
        .await
        .unwrap();

    let started = Instant::now();
    let file = write_policy(&p);
    let out = run_dbpolicy_async(
        ["apply", "-f", file.path().to_str().unwrap()],
        Some(db.url()),
        Duration::from_secs(30),
    )
    .await;
    let elapsed = started.elapsed();
    expect_code(&out, 1);
    assert!(
        out.stdout.contains("LockTimeout") && out.stdout.contains("55P03"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("statement: ALTER TABLE \"public\".\"busy\""),
        "{}",
        out.stdout
    );
    // Far below the 60s statement timeout: the lock timeout is what ended the wait.
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");

    sqlx::raw_sql("ROLLBACK")
        .execute(&mut holder)
        .await
        .unwrap();
    let opts = db
        .query_scalar::<Option<Vec<String>>>(
            "SELECT reloptions FROM pg_class WHERE relname = 'busy'",
        )
        .await;
    assert_eq!(opts, None, "nothing changed on the table");
    let flags = db
        .query_scalar::<bool>("SELECT to_regclass('feature_flags') IS NOT NULL")
        .await;
    assert!(!flags, "later areas were not attempted");

    // Once the lock is gone the same policy applies.
    expect_code(&cli("apply", db.url(), &p), 0);
}

#[tokio::test]
async fn an_apply_waits_for_the_advisory_lock() {
    let db = TestDb::new().await;
    let p = policy(
        "waiting",
        "  featureFlags:\n    flags: [{name: a, enabled: true}]\n",
    );
    let mut other = db.connect().await;
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(LOCK_KEY)
        .execute(&mut other)
        .await
        .unwrap();

    let apply = spawn_apply(&p, db.url(), Duration::from_secs(60));
    // The CLI is connected and waiting for the advisory lock (polling it between pauses),
    // having changed nothing.
    eventually(Duration::from_secs(15), || async {
        let waiting = db
            .query_scalar::<i64>(&format!("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'dbpolicy' AND datname = '{}' AND query LIKE '%pg_try_advisory_lock%'", db.name()))
            .await;
        if waiting == 1 {
            Ok(())
        } else {
            Err("not waiting yet")
        }
    })
    .await;
    assert!(
        !db.query_scalar::<bool>("SELECT to_regclass('feature_flags') IS NOT NULL")
            .await
    );

    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(LOCK_KEY)
        .execute(&mut other)
        .await
        .unwrap();
    let out = apply.await.unwrap();
    expect_code(&out, 0);
    other.close().await.unwrap();
}

#[tokio::test]
async fn concurrent_applies_never_interleave() {
    // From empty, each run plans `CREATE TABLE feature_flags` (no IF NOT EXISTS): without
    // the lock, runs planning from the same state would collide and fail.
    let db = TestDb::new().await;
    let flags: String = (0..200)
        .map(|i| {
            format!(
                "      - {{name: f{i}, enabled: true, rolloutPercentage: {}}}\n",
                i % 100
            )
        })
        .collect();
    let p = policy("race", &format!("  featureFlags:\n    flags:\n{flags}"));
    let runs: Vec<_> = (0..4)
        .map(|_| spawn_apply(&p, db.url(), Duration::from_secs(60)))
        .collect();
    let mut created = 0;
    for run in runs {
        let out = run.await.unwrap();
        expect_code(&out, 0);
        if out.stdout.contains("create the flags table") {
            created += 1;
        }
    }
    assert_eq!(
        created, 1,
        "exactly one run created the table; the others saw it"
    );
    assert_eq!(
        db.query_scalar::<i64>("SELECT count(*) FROM feature_flags")
            .await,
        200
    );
    expect_code(&cli("plan", db.url(), &p), 0);
}

/// A role that can read a table but does not own it: the plan names the missing privilege
/// for every area that would alter the table, and apply changes nothing at all (before,
/// autovacuum was committed and RLS then failed half-way).
#[tokio::test]
async fn a_role_that_does_not_own_the_table_gets_a_plan_error_and_nothing_changes() {
    let db = TestDb::new().await;
    let reader = db.unique_role("reader");
    db.exec(&format!(
        "CREATE TABLE t (id int, owner_id int);
         CREATE ROLE {reader} LOGIN;
         GRANT SELECT ON t TO {reader};
         CREATE SCHEMA dbpolicy; GRANT ALL ON SCHEMA dbpolicy TO {reader}"
    ))
    .await;
    let p = policy(
        "notowner",
        "  autovacuum:\n    tables: [{table: t, vacuumScaleFactor: 0.01}]\n  rowLevelSecurity:\n    tables:\n      - table: t\n        policies: [{name: own, using: \"owner_id = 1\"}]\n",
    );
    let url = db.url_as(&reader);
    for verb in ["plan", "apply"] {
        let out = cli(verb, &url, &p);
        expect_code(&out, 1);
        assert_eq!(
            out.stdout.matches("InsufficientPrivilege").count(),
            2,
            "{verb}: one error per area\n{}\n{}",
            out.stdout,
            out.stderr
        );
    }
    assert_eq!(
        db.query_scalar::<String>(
            "SELECT coalesce(array_to_string(reloptions, ','), '') || ' rls=' || relrowsecurity FROM pg_class WHERE relname = 't'"
        )
        .await,
        " rls=false"
    );
    // Once the role owns it (and may create the ledger), the same policy applies.
    db.exec(&format!(
        "ALTER TABLE t OWNER TO {reader}; GRANT CREATE ON DATABASE \"{}\" TO {reader}",
        db.name()
    ))
    .await;
    expect_code(&cli("apply", &url, &p), 0);
}

/// An index expression that sleeps 300 ms per row: IMMUTABLE is a lie PostgreSQL takes on
/// trust, which lets a build take as long as the test needs, with no table of any size.
const SLOW_INDEX_SCHEMA: &str = "
CREATE FUNCTION slow(i int) RETURNS int LANGUAGE plpgsql IMMUTABLE AS $$ BEGIN PERFORM pg_sleep(0.3); RETURN i; END $$;
CREATE TABLE slowly (id int);
INSERT INTO slowly SELECT generate_series(1, 5);";

fn slow_index_policy(safety: &str) -> String {
    policy(
        "slowbuild",
        &format!(
            "  safety: {{{safety}}}\n  indexes:\n    indexes: [{{name: slowly_slow, table: slowly, columns: [\"slow(id)\"]}}]\n"
        ),
    )
}

#[tokio::test]
async fn a_concurrent_index_build_runs_under_its_own_timeout_not_the_policys() {
    let db = TestDb::new().await;
    db.exec(SLOW_INDEX_SCHEMA).await;

    // The plan says which lock the build takes and which timeout it runs under.
    let p = slow_index_policy("statementTimeout: 1s");
    let plan = cli("plan", db.url(), &p);
    expect_code(&plan, 2);
    assert!(
        plan.stdout.contains(
            "(lock SHARE UPDATE EXCLUSIVE, timeout safety.indexBuildTimeout)\nCREATE INDEX CONCURRENTLY"
        ),
        "{}",
        plan.stdout
    );

    // Its own timeout applies: set below what five sleeps of 300 ms take at least, the
    // build is cancelled (whatever the policy's statementTimeout says).
    let short = slow_index_policy("statementTimeout: 60s, indexBuildTimeout: 500ms");
    let out = cli("apply", db.url(), &short);
    expect_code(&out, 1);
    assert!(
        out.stdout.contains("StatementTimeout") && out.stdout.contains("57014"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("statement: CREATE INDEX CONCURRENTLY"),
        "{}",
        out.stdout
    );

    // The build takes longer than the policy's 1s statementTimeout (1.5 s of sleeps at
    // least) and succeeds under the default indexBuildTimeout (20m), repairing the
    // invalid index the cancelled build left (its drop runs under the same timeout).
    expect_code(&cli("apply", db.url(), &p), 0);
    let valid = db
        .query_scalar::<bool>(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = 'slowly_slow'::regclass",
        )
        .await;
    assert!(valid);
    expect_code(&cli("plan", db.url(), &p), 0);
}

#[tokio::test]
async fn the_policys_statement_timeout_applies_again_after_an_own_timeout() {
    use dbpolicy::engine::apply::{execute, Timeouts};
    use dbpolicy::engine::plan::{Area, AreaPlan, Change, LockLevel, OwnTimeout, Plan};
    use dbpolicy::reason::Reason;

    let db = TestDb::new().await;
    db.exec(SLOW_INDEX_SCHEMA).await;
    let mut conn = db.connect().await;
    // The session as the engine sets it up: the policy's timeout, 1s.
    sqlx::raw_sql("SET statement_timeout = 1000")
        .execute(&mut conn)
        .await
        .unwrap();
    let timeouts = Timeouts {
        statement_ms: 1000,
        index_build_ms: 600_000,
    };
    let build = |name: &str| {
        Change::new(
            Area::Indexes,
            format!("public.{name}"),
            "build",
            format!("CREATE INDEX CONCURRENTLY {name} ON slowly (slow(id))"),
        )
        .autonomous()
        .lock(LockLevel::ShareUpdateExclusive)
        .own_timeout(OwnTimeout::IndexBuild)
    };
    // After the build, a statement of 1.5 s at least: the policy's 1s cancels it.
    let next = Change::new(
        Area::Indexes,
        "public.slowly",
        "slow statement",
        "SELECT pg_sleep(1.5)",
    )
    .autonomous();
    let mut area = AreaPlan::new(Area::Indexes);
    area.changes = vec![build("built"), next];
    let report = execute(
        &mut conn,
        &Plan { areas: vec![area] },
        false,
        "p",
        &timeouts,
    )
    .await;
    assert_eq!(report.applied.len(), 1, "{report:?}");
    let failure = report.failure.expect("the slow statement is cancelled");
    assert_eq!(failure.reason, Reason::StatementTimeout, "{failure:?}");
    assert_eq!(failure.statement, "SELECT pg_sleep(1.5)");

    // Restored after a failed build too: a build cancelled by its own (short) timeout
    // leaves the session at the policy's.
    let mut area = AreaPlan::new(Area::Indexes);
    area.changes = vec![build("cancelled")];
    let short = Timeouts {
        statement_ms: 1000,
        index_build_ms: 200,
    };
    let report = execute(&mut conn, &Plan { areas: vec![area] }, false, "p", &short).await;
    assert_eq!(
        report.failure.map(|f| f.reason),
        Some(Reason::StatementTimeout)
    );
    let now: String = sqlx::query_scalar("SHOW statement_timeout")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(now, "1s");
}
