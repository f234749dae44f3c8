//! Faults while the engine works, against real PostgreSQL: the server restarted in the middle
//! of an apply, a long-running transaction holding the locks a change needs, and two
//! policies pointing at one database. No sleeps: the tests wait for what PostgreSQL reports
//! (`pg_stat_activity`) with `eventually`.

use dbpolicy_test_support as support;

use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection};
use support::{cli, eventually, expect_code, policy, spawn_apply, PgServer, TestDb};

/// Everything the areas tested here can change, as one comparable value: relations and
/// their options and RLS flags, policies, indexes, functions, schemas, and the entries of
/// the ledger. The ledger's own (empty) table is left out: an apply creates it before its
/// first change, and it stays when that change fails. So are intents (`intent:…` items):
/// a change that cannot run in a transaction commits one before it runs, and it stays
/// when the change fails, for the next run to find (docs/faults.md).
async fn fingerprint(db: &TestDb) -> String {
    let ledger = if db
        .query_scalar::<bool>("SELECT to_regclass('dbpolicy.managed') IS NOT NULL")
        .await
    {
        db.query_column::<String>(
            "SELECT concat_ws(' ', area, target, item, policy) FROM dbpolicy.managed
              WHERE item NOT LIKE 'intent:%' ORDER BY 1",
        )
        .await
        .join("|")
    } else {
        String::new()
    };
    let catalog = catalog_fingerprint(db).await;
    format!("{catalog} ledger [{ledger}]")
}

async fn catalog_fingerprint(db: &TestDb) -> String {
    db.query_scalar::<String>(
        "SELECT md5(coalesce(string_agg(x, '|' ORDER BY x), '')) FROM (
           SELECT format('rel %s.%s %s %s %s %s', n.nspname, c.relname, c.relkind, c.reloptions,
                         c.relrowsecurity, c.relforcerowsecurity) AS x
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast', 'dbpolicy')
              AND n.nspname NOT LIKE 'pg\\_%temp%'
           UNION ALL SELECT format('policy %s %s %s %s', polrelid::regclass, polname,
                                   pg_get_expr(polqual, polrelid), pg_get_expr(polwithcheck, polrelid)) FROM pg_policy
           UNION ALL SELECT format('index %s', pg_get_indexdef(indexrelid)) FROM pg_index i
             JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE i.indrelid >= 16384 AND n.nspname NOT IN ('dbpolicy', 'pg_toast')
           UNION ALL SELECT format('proc %s.%s', pronamespace::regnamespace, proname) FROM pg_proc
            WHERE pronamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace)
           UNION ALL SELECT 'schema ' || nspname FROM pg_namespace
            WHERE nspname NOT LIKE 'pg\\_%temp%' AND nspname <> 'dbpolicy'
         ) s",
    )
    .await
}

/// Waits until a `dbpolicy` session waits on a heavyweight lock (a table, row or
/// transaction lock), and returns its pid.
async fn dbpolicy_waiting_on_a_lock(db: &TestDb) -> i32 {
    eventually(Duration::from_secs(30), || async {
        let pids = db
            .query_column::<i32>(&format!(
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'dbpolicy'
                   AND datname = '{}' AND wait_event_type = 'Lock'",
                db.name()
            ))
            .await;
        match pids.as_slice() {
            [pid] => Ok(*pid),
            other => Err(format!("dbpolicy sessions waiting on a lock: {other:?}")),
        }
    })
    .await
}

fn flags(n: usize, enabled: bool) -> String {
    let mut y = String::from("  featureFlags:\n    flags:\n");
    for i in 0..n {
        y.push_str(&format!("      - {{name: f{i:03}, enabled: {enabled}}}\n"));
    }
    y
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_in_the_middle_of_an_apply_rolls_back_and_the_next_apply_converges() {
    let server = PgServer::start();
    let db = TestDb::on(&server).await;
    db.exec("CREATE TABLE hot (id int)").await;
    expect_code(
        &cli("apply", db.url(), &policy("restart", &flags(200, false))),
        0,
    );

    // v2 changes autovacuum (its own transaction, first) and all 200 flags (one
    // transaction). A row lock on f100 holds the flags transaction after 100 upserts.
    let v2 = policy(
        "restart",
        &format!(
            "  safety: {{lockTimeout: 2min, statementTimeout: 2min}}\n  autovacuum:\n    tables: [{{table: hot, vacuumThreshold: 42}}]\n{}",
            flags(200, true)
        ),
    );
    let mut holder = db.connect().await;
    sqlx::raw_sql("BEGIN; SELECT * FROM feature_flags WHERE name = 'f100' FOR UPDATE")
        .execute(&mut holder)
        .await
        .unwrap();
    let apply = spawn_apply(&v2, db.url(), Duration::from_secs(120));
    dbpolicy_waiting_on_a_lock(&db).await;
    let in_flight = db
        .query_scalar::<i64>("SELECT count(*) FROM feature_flags WHERE enabled")
        .await;
    assert_eq!(in_flight, 0, "uncommitted upserts are invisible to others");

    let started = Instant::now();
    tokio::task::block_in_place(|| server.restart());
    let out = apply.await.unwrap();
    expect_code(&out, 1);
    assert!(
        out.stdout.contains("FAILED featureFlags: f100")
            && ["57P01", "ServerShutdown", "ConnectionFailed", "connection"]
                .iter()
                .any(|s| out.stdout.contains(s)),
        "the CLI says which change failed and why\n{}\n{}",
        out.stdout,
        out.stderr
    );
    assert!(out.stdout.contains("not attempted"), "{}", out.stdout);
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the CLI did not hang on the dead connection"
    );
    drop(holder);

    // The flags transaction rolled back whole; the autovacuum one, committed before, stays.
    let enabled = db
        .query_scalar::<i64>("SELECT count(*) FROM feature_flags WHERE enabled")
        .await;
    assert_eq!(enabled, 0, "nothing of the interrupted transaction is left");
    let opts = db
        .query_scalar::<Option<Vec<String>>>(
            "SELECT reloptions FROM pg_class WHERE relname = 'hot'",
        )
        .await;
    assert_eq!(
        opts,
        Some(vec!["autovacuum_vacuum_threshold=42".to_string()])
    );

    let again = cli("apply", db.url(), &v2);
    expect_code(&again, 0);
    assert!(
        again.stdout.contains("applied 200 change(s)"),
        "{}",
        again.stdout
    );
    let plan = cli("plan", db.url(), &v2);
    expect_code(&plan, 0);
    assert!(plan.stdout.contains("nothing to change"), "{}", plan.stdout);
    assert_eq!(
        db.query_scalar::<i64>("SELECT count(*) FROM feature_flags WHERE enabled")
            .await,
        200
    );
}

/// One area's change and a lock a long-running transaction holds that the change needs.
struct Blocked {
    area: &'static str,
    setup: &'static str,
    /// Run in the holder's open transaction.
    holder: &'static str,
    spec: &'static str,
}

#[tokio::test]
async fn every_area_gives_up_at_the_lock_timeout_and_changes_nothing() {
    let cases = [
        Blocked {
            area: "autovacuum",
            setup: "CREATE TABLE t (id int)",
            // What a plain CREATE INDEX holds for its whole build.
            holder: "LOCK TABLE t IN SHARE MODE",
            spec: "  autovacuum:\n    tables: [{table: t, vacuumScaleFactor: 0.01}]\n",
        },
        Blocked {
            area: "rowLevelSecurity",
            setup: "CREATE TABLE t (id int)",
            // An open read transaction.
            holder: "SELECT * FROM t",
            spec: "  rowLevelSecurity:\n    tables: [{table: t, policies: [{name: p, using: \"id > 0\"}]}]\n",
        },
        Blocked {
            area: "partitions",
            setup: "CREATE TABLE t (id int, at timestamptz NOT NULL) PARTITION BY RANGE (at)",
            holder: "SELECT * FROM t",
            spec: "  partitions:\n    tables: [{table: t, interval: Monthly, premake: 1}]\n",
        },
        Blocked {
            area: "indexes",
            setup: "CREATE TABLE t (id int)",
            // What VACUUM and ANALYZE hold.
            holder: "LOCK TABLE t IN SHARE UPDATE EXCLUSIVE MODE",
            spec: "  indexes:\n    indexes: [{name: t_id, table: t, columns: [id]}]\n",
        },
        Blocked {
            area: "featureFlags",
            setup: "CREATE TABLE feature_flags (name text PRIMARY KEY, enabled boolean NOT NULL DEFAULT false,
                      rollout_percentage integer NOT NULL DEFAULT 100, description text,
                      updated_at timestamptz NOT NULL DEFAULT now());
                    INSERT INTO feature_flags (name) VALUES ('a')",
            // A row lock: an application updating the flag.
            holder: "SELECT * FROM feature_flags WHERE name = 'a' FOR UPDATE",
            spec: "  featureFlags:\n    flags: [{name: a, enabled: true}]\n",
        },
    ];
    let lock_timeout = Duration::from_millis(300);
    for case in cases {
        let db = TestDb::new().await;
        db.exec(case.setup).await;
        let before = fingerprint(&db).await;
        let mut holder = db.connect().await;
        sqlx::raw_sql(&format!("BEGIN; {}", case.holder))
            .execute(&mut holder)
            .await
            .unwrap();

        let yaml = policy(
            "locked",
            &format!(
                "  safety: {{lockTimeout: 300ms, statementTimeout: 2min}}\n{}",
                case.spec
            ),
        );
        let started = Instant::now();
        let out = cli("apply", db.url(), &yaml);
        let elapsed = started.elapsed();
        expect_code(&out, 1);
        let text = format!("{}{}", out.stdout, out.stderr);
        assert!(
            text.contains("LockTimeout") && text.contains("55P03"),
            "{}: {text}",
            case.area
        );
        assert!(
            text.contains(case.area),
            "{}: the failure names the area: {text}",
            case.area
        );
        // Far below the 2 minute statement timeout: the lock timeout ended the wait.
        assert!(
            elapsed < lock_timeout + Duration::from_secs(10),
            "{}: took {elapsed:?}",
            case.area
        );
        sqlx::raw_sql("ROLLBACK")
            .execute(&mut holder)
            .await
            .unwrap();
        assert_eq!(
            fingerprint(&db).await,
            before,
            "{}: nothing changed",
            case.area
        );
        holder.close().await.unwrap();

        // Once the lock is released the same policy converges.
        expect_code(&cli("apply", db.url(), &yaml), 0);
        expect_code(&cli("plan", db.url(), &yaml), 0);
    }
}

#[tokio::test]
async fn a_writer_queued_behind_a_blocked_change_waits_no_longer_than_the_lock_timeout() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE orders (id serial PRIMARY KEY, owner int NOT NULL)")
        .await;
    // A long report holds ACCESS SHARE; ENABLE ROW LEVEL SECURITY needs ACCESS EXCLUSIVE and
    // queues behind it, and every writer that comes later queues behind that request.
    let mut report = db.connect().await;
    sqlx::raw_sql("BEGIN; SELECT count(*) FROM orders")
        .execute(&mut report)
        .await
        .unwrap();

    let lock_timeout = Duration::from_secs(2);
    let yaml = policy(
        "queue",
        "  safety: {lockTimeout: 2s, statementTimeout: 2min}\n  rowLevelSecurity:\n    tables: [{table: orders, policies: [{name: own, using: \"owner = 1\"}]}]\n",
    );
    let apply = spawn_apply(&yaml, db.url(), Duration::from_secs(60));
    let ours = dbpolicy_waiting_on_a_lock(&db).await;

    // Production traffic: an INSERT, which conflicts with the queued ACCESS EXCLUSIVE.
    let mut writer = db.connect().await;
    let writer_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut writer)
        .await
        .unwrap();
    let insert = async {
        let started = Instant::now();
        let result = sqlx::raw_sql("INSERT INTO orders (owner) VALUES (1)")
            .execute(&mut writer)
            .await;
        (result, started.elapsed())
    };
    // The writer really queued behind our ALTER (not behind the report, which it does not
    // conflict with) — or has already got through.
    let queued = eventually(Duration::from_secs(30), || async {
        let blocked_by = db
            .query_column::<i32>(&format!("SELECT unnest(pg_blocking_pids({writer_pid}))"))
            .await;
        let done = db.query_scalar::<i64>("SELECT count(*) FROM orders").await;
        if blocked_by.contains(&ours) || done == 1 {
            Ok(())
        } else {
            Err(format!("writer blocked by {blocked_by:?}"))
        }
    });
    let ((result, waited), ()) = tokio::join!(insert, queued);
    result.expect("the writer's INSERT succeeds");
    assert!(
        waited < lock_timeout + Duration::from_secs(3),
        "the writer waited {waited:?}, more than lockTimeout {lock_timeout:?} + 3s"
    );

    let out = apply.await.unwrap();
    expect_code(&out, 1);
    assert!(out.stdout.contains("LockTimeout"), "{}", out.stdout);
    let rls = db
        .query_scalar::<bool>("SELECT relrowsecurity FROM pg_class WHERE relname = 'orders'")
        .await;
    assert!(!rls, "nothing applied");
    sqlx::raw_sql("COMMIT").execute(&mut report).await.unwrap();
    report.close().await.unwrap();
    writer.close().await.unwrap();
}

async fn ledger_owners(db: &TestDb) -> Vec<String> {
    db.query_column::<String>(
        "SELECT DISTINCT area || ' ' || policy FROM dbpolicy.managed ORDER BY 1",
    )
    .await
}

#[tokio::test]
async fn two_policies_on_one_database_are_reported_as_a_conflict_never_fought_over() {
    // serverSettings changes the whole server: a throwaway one.
    let server = PgServer::start();
    let db = TestDb::on(&server).await;
    db.exec("CREATE TABLE t (id int, owner int)").await;
    let spec = |threshold: u32, expr: &str, column: &str, work_mem: &str, flag: &str| {
        format!(
            "  autovacuum:\n    tables: [{{table: t, vacuumThreshold: {threshold}}}]\n  \
             rowLevelSecurity:\n    tables: [{{table: t, policies: [{{name: p, using: \"{expr}\"}}]}}]\n  \
             indexes:\n    indexes: [{{name: t_ix, table: t, columns: [{column}]}}]\n  \
             serverSettings:\n    parameters: {{work_mem: {work_mem}}}\n  \
             featureFlags:\n    flags: [{{name: {flag}, enabled: true}}]\n"
        )
    };
    let a = policy("a", &spec(10, "owner = 1", "id", "8MB", "from_a"));
    let b = policy("b", &spec(20, "owner = 2", "owner", "16MB", "from_b"));
    expect_code(&cli("apply", db.url(), &a), 0);
    let before = fingerprint(&db).await;
    let flags_before = db
        .query_column::<String>("SELECT name FROM feature_flags")
        .await;
    let settings = "SELECT string_agg(name || '=' || setting, ',' ORDER BY name) FROM pg_file_settings WHERE sourcefile LIKE '%postgresql.auto.conf'";
    let settings_before = db.query_scalar::<String>(settings).await;

    for verb in ["plan", "apply"] {
        let out = cli(verb, db.url(), &b);
        expect_code(&out, 1);
        for area in [
            "autovacuum",
            "rowLevelSecurity",
            "indexes",
            "serverSettings",
            "featureFlags",
        ] {
            let line = out
                .stdout
                .lines()
                .find(|l| l.contains("OwnershipConflict") && l.contains(area));
            let line = line.unwrap_or_else(|| {
                panic!("{verb}: no conflict reported for {area}:\n{}", out.stdout)
            });
            assert!(
                line.contains("tests/a"),
                "the conflict names the owner: {line}"
            );
        }
        assert!(
            out.stdout.contains("nothing was applied") || verb == "plan",
            "{}",
            out.stdout
        );
    }
    assert_eq!(fingerprint(&db).await, before, "policy b changed nothing");
    assert_eq!(
        db.query_column::<String>("SELECT name FROM feature_flags")
            .await,
        flags_before
    );
    assert_eq!(db.query_scalar::<String>(settings).await, settings_before);
    // Policy a still sees its database as it left it: nothing to fight back over.
    let again = cli("plan", db.url(), &a);
    expect_code(&again, 0);
    assert!(
        ledger_owners(&db)
            .await
            .iter()
            .all(|o| o.ends_with("tests/a")),
        "{:?}",
        ledger_owners(&db).await
    );

    // A second policy with its own flags table is no conflict.
    db.exec("CREATE SCHEMA other").await;
    let c = policy(
        "c",
        "  featureFlags:\n    schema: other\n    flags: [{name: from_c, enabled: true}]\n",
    );
    expect_code(&cli("apply", db.url(), &c), 0);
    expect_code(&cli("plan", db.url(), &a), 0);
}

#[tokio::test]
async fn a_connection_lost_before_the_apply_leaves_nothing_behind() {
    // The session is killed while dbpolicy waits for the advisory lock (polling it, so
    // between two polls it shows as idle after `pg_try_advisory_lock`): nothing was
    // observed or changed, and the error says the connection went away.
    let db = TestDb::new().await;
    let mut other = PgConnection::connect(db.url()).await.unwrap();
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(dbpolicy::engine::ADVISORY_LOCK_KEY)
        .execute(&mut other)
        .await
        .unwrap();
    let before = fingerprint(&db).await;
    let apply = spawn_apply(
        &policy("killed", &flags(3, true)),
        db.url(),
        Duration::from_secs(60),
    );
    let pid = eventually(Duration::from_secs(30), || async {
        let pids = db
            .query_column::<i32>(&format!(
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'dbpolicy' AND datname = '{}' AND query LIKE '%pg_try_advisory_lock%'",
                db.name()
            ))
            .await;
        pids.first().copied().ok_or("not waiting yet")
    })
    .await;
    assert!(
        db.query_scalar::<bool>(&format!("SELECT pg_terminate_backend({pid})"))
            .await
    );
    let out = apply.await.unwrap();
    expect_code(&out, 1);
    assert!(
        out.stderr.contains("error: tests/killed:"),
        "{}",
        out.stderr
    );
    assert_eq!(fingerprint(&db).await, before);
    other.close().await.unwrap();
}
