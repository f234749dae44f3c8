//! Safety of the executor against real PostgreSQL: every statement under lock_timeout, and
//! the per-database advisory lock that keeps concurrent runs from interleaving.

use dbpolicy_test_support as support;

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
            "(lock SHARE UPDATE EXCLUSIVE, long-operation timeout safety.indexBuildTimeout)\nCREATE INDEX CONCURRENTLY"
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
        long_operation_ms: 600_000,
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
        .own_timeout(OwnTimeout::LongOperation)
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
        long_operation_ms: 200,
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

    // Two builds in a row share one SET: the second also runs under its own timeout (each
    // build outlasts the policy's 1s), and the session is at the policy's after the last.
    let mut area = AreaPlan::new(Area::Indexes);
    area.changes = vec![build("first"), build("second")];
    let report = execute(
        &mut conn,
        &Plan { areas: vec![area] },
        false,
        "p",
        &timeouts,
    )
    .await;
    assert!(report.succeeded(), "{report:?}");
    assert_eq!(report.applied.len(), 2, "{report:?}");
    let now: String = sqlx::query_scalar("SHOW statement_timeout")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(now, "1s");
}

/// Daily partitions of `hist` from 2024-02-27, no default partition (with one, PostgreSQL
/// refuses CONCURRENTLY); with `retention: 2d` at [`DETACH_NOW`], 02-27 is detached.
fn detach_policy(safety: &str, retention: &str) -> String {
    policy(
        "slowdetach",
        &format!(
            "  safety: {{{safety}}}\n  partitions:\n    tables:\n      - {{table: hist, interval: Daily, premake: 1, startDate: '2024-02-27', defaultPartition: false{retention}}}\n"
        ),
    )
}

const DETACH_NOW: &str = "2024-03-01T00:00:00Z";

/// `dbpolicy <verb>` at [`DETACH_NOW`], without blocking the runtime (a reader runs beside).
async fn at_detach_now(verb: &str, url: &str, yaml: &str) -> support::RunOutput {
    let file = write_policy(yaml);
    let mut cmd = tokio::process::Command::from(support::dbpolicy_cmd());
    cmd.arg(verb)
        .arg("-f")
        .arg(file.path())
        .env("DATABASE_URL", url)
        .env("DBPOLICY_NOW", DETACH_NOW)
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("dbpolicy finishes")
        .expect("run dbpolicy");
    support::RunOutput {
        code: out.status.code().expect("exit code"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[tokio::test]
async fn a_concurrent_detach_runs_under_the_long_operation_timeout_not_the_policys() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE hist (at timestamptz NOT NULL) PARTITION BY RANGE (at)")
        .await;
    let create = at_detach_now("apply", db.url(), &detach_policy("", "")).await;
    expect_code(&create, 0);

    let p = detach_policy("lockTimeout: 30s, statementTimeout: 1s", ", retention: 2d");
    let plan = at_detach_now("plan", db.url(), &p).await;
    expect_code(&plan, 2);
    assert!(
        plan.stdout.contains(
            "(lock ACCESS EXCLUSIVE, long-operation timeout safety.indexBuildTimeout)\nALTER TABLE \"public\".\"hist\" DETACH PARTITION \"public\".\"hist_2024_02_27\" CONCURRENTLY"
        ),
        "{}",
        plan.stdout
    );

    // A reader of the table for 2 s at least: the detach waits for it, longer than the
    // policy's 1s statementTimeout, and succeeds under the default indexBuildTimeout (20m).
    let mut reader = db.connect().await;
    let reading = async {
        sqlx::query("SELECT count(*) FROM hist, pg_sleep(2)")
            .execute(&mut reader)
            .await
            .map(drop)
    };
    let applying = async {
        eventually(Duration::from_secs(30), || async {
            let held = db
                .query_scalar::<i64>(
                    "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
                     WHERE c.relname = 'hist_2024_02_27' AND l.granted AND l.pid <> pg_backend_pid()",
                )
                .await;
            if held > 0 {
                Ok(())
            } else {
                Err("the reader holds no lock on the partition yet")
            }
        })
        .await;
        at_detach_now("apply", db.url(), &p).await
    };
    let (read, out) = tokio::join!(reading, applying);
    expect_code(&out, 0);
    read.expect("the reader is not disturbed");
    let attached = db
        .query_scalar::<i64>(
            "SELECT count(*) FROM pg_inherits WHERE inhrelid = 'hist_2024_02_27'::regclass",
        )
        .await;
    assert_eq!(attached, 0, "detached, and kept as a table");
    expect_code(&at_detach_now("plan", db.url(), &p).await, 0);
}

/// A materialized view whose query takes 1.5 s at least.
fn slow_view_policy(safety: &str) -> String {
    policy(
        "slowview",
        &format!(
            "  safety: {{{safety}}}\n  materializedViews:\n    views: [{{name: slow_view, definition: 'SELECT 1 AS one FROM pg_sleep(1.5)'}}]\n"
        ),
    )
}

#[tokio::test]
async fn a_new_views_first_fill_runs_under_the_long_operation_timeout_not_the_policys() {
    let db = TestDb::new().await;
    let p = slow_view_policy("statementTimeout: 1s");
    let plan = cli("plan", db.url(), &p);
    expect_code(&plan, 2);
    assert!(
        plan.stdout.contains(
            "(lock ACCESS SHARE, long-operation timeout safety.indexBuildTimeout)\nCREATE MATERIALIZED VIEW"
        ),
        "{}",
        plan.stdout
    );

    // Cut off by a long-operation timeout shorter than the query, whatever the policy's
    // statementTimeout says; the view's transaction is rolled back.
    let short = slow_view_policy("statementTimeout: 60s, indexBuildTimeout: 500ms");
    let out = cli("apply", db.url(), &short);
    expect_code(&out, 1);
    assert!(
        out.stdout.contains("StatementTimeout") && out.stdout.contains("57014"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("statement: CREATE MATERIALIZED VIEW"),
        "{}",
        out.stdout
    );
    let views = db
        .query_scalar::<i64>("SELECT count(*) FROM pg_matviews WHERE matviewname = 'slow_view'")
        .await;
    assert_eq!(views, 0);

    // Longer than the policy's 1s, under the default indexBuildTimeout (20m): filled.
    expect_code(&cli("apply", db.url(), &p), 0);
    let populated = db
        .query_scalar::<bool>("SELECT ispopulated FROM pg_matviews WHERE matviewname = 'slow_view'")
        .await;
    assert!(populated);
    expect_code(&cli("plan", db.url(), &p), 0);
}

#[tokio::test]
async fn an_own_timeout_inside_a_transaction_is_set_back_for_the_rest_of_it() {
    use dbpolicy::engine::apply::{execute, Timeouts};
    use dbpolicy::engine::plan::{Area, AreaPlan, Change, LockLevel, OwnTimeout, Plan};
    use dbpolicy::reason::Reason;

    let db = TestDb::new().await;
    let mut conn = db.connect().await;
    // The session as the engine sets it up: the policy's timeout, 1s.
    sqlx::raw_sql("SET statement_timeout = 1000")
        .execute(&mut conn)
        .await
        .unwrap();
    let timeouts = Timeouts {
        statement_ms: 1000,
        long_operation_ms: 600_000,
    };
    // Transactional, as a new view's fill: SET LOCAL around it.
    let fill = Change::new(
        Area::MaterializedViews,
        "public.v",
        "fill",
        "CREATE MATERIALIZED VIEW v AS SELECT 1 AS one FROM pg_sleep(1.5)",
    )
    .lock(LockLevel::AccessShare)
    .own_timeout(OwnTimeout::LongOperation);
    // In the same transaction after it, a statement of 1.5 s: the policy's 1s cancels it.
    let next = Change::new(
        Area::MaterializedViews,
        "public.v",
        "slow statement",
        "SELECT pg_sleep(1.5)",
    );
    let mut area = AreaPlan::new(Area::MaterializedViews);
    area.changes = vec![fill.clone(), next];
    let report = execute(
        &mut conn,
        &Plan { areas: vec![area] },
        false,
        "p",
        &timeouts,
    )
    .await;
    let failure = report.failure.expect("the slow statement is cancelled");
    assert_eq!(failure.reason, Reason::StatementTimeout, "{failure:?}");
    assert_eq!(failure.statement, "SELECT pg_sleep(1.5)");
    assert!(report.applied.is_empty(), "one transaction, rolled back");

    // Alone, the fill commits; the session is at the policy's timeout after it.
    let mut area = AreaPlan::new(Area::MaterializedViews);
    area.changes = vec![fill];
    let report = execute(
        &mut conn,
        &Plan { areas: vec![area] },
        false,
        "p",
        &timeouts,
    )
    .await;
    assert!(report.succeeded(), "{report:?}");
    let now: String = sqlx::query_scalar("SHOW statement_timeout")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(now, "1s");
}
