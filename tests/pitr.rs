//! Point-in-time recovery on real throwaway PostgreSQL servers: WAL streamed by
//! `dbpolicy backup wal-receive` into a local store, base backups by `backup base`,
//! `restore --target-time` holding exactly the rows committed up to the target, a receiver
//! killed mid-stream losing no WAL, a corrupt segment failing `verify --pitr`, and prune
//! keeping the window recoverable; and the same restore through an S3-compatible store
//! served by moto (tests/support/moto.rs).

use dbpolicy_test_support as support;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sqlx::PgConnection;
use support::moto::{self, Moto};
use support::{dbpolicy_cmd, eventually, run_dbpolicy, PgServer, PgServerOptions, RunOutput};

const WAIT: Duration = Duration::from_secs(120);

/// A primary with 1 MB WAL segments, ready for a replication client.
fn primary() -> PgServer {
    PgServer::start_with(
        PgServerOptions::new()
            .replication()
            .initdb_arg("--wal-segsize=1"),
    )
}

/// A store directory the server account can read too (`restore_command` runs as the
/// server's account), under /tmp for the same reason.
fn scratch(prefix: &str) -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

/// `dbpolicy backup wal-receive` in its own process group, so that a test can kill it
/// and its `pg_receivewal` at once, as a pod's deletion does.
struct Receiver(std::process::Child);

impl Receiver {
    fn start(url: &str, store: &Path, spool: &Path) -> Receiver {
        Self::start_on(url, &dir_store(store), spool)
    }

    /// With any store's flags (`--dir D` or `--s3-bucket B …`).
    fn start_on(url: &str, store: &[String], spool: &Path) -> Receiver {
        let mut cmd = dbpolicy_cmd();
        cmd.args(["backup", "wal-receive"])
            .args(store)
            .arg("--spool")
            .arg(spool)
            .env("DATABASE_URL", url)
            .process_group(0);
        Receiver(cmd.spawn().expect("start wal-receive"))
    }

    fn kill(&mut self) {
        // The whole process group (dbpolicy and its pg_receivewal), with kill(1): the crate
        // forbids unsafe code, and this is a test's process, not the product's.
        let group = format!("-{}", self.0.id());
        let _ = std::process::Command::new("kill")
            .args(["-KILL", "--", &group])
            .status();
        let _ = self.0.wait();
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `restore_command` runs as the server's OS user, which cannot reach a binary under
/// root's home (CI's target directory): the runs of this test name a copy it can execute
/// through `DBPOLICY_RESTORE_BIN`, inherited by every `dbpolicy` they start.
fn restore_binary_for_the_server_user() {
    static COPY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let path = COPY.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("dbpolicy-pitr-bin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.join("dbpolicy");
        std::fs::copy(env!("CARGO_BIN_EXE_dbpolicy"), &path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    });
    std::env::set_var("DBPOLICY_RESTORE_BIN", path);
}

fn dir_store(store: &Path) -> Vec<String> {
    vec!["--dir".into(), store.display().to_string()]
}

fn dbp(args: &[&str], store: &Path) -> RunOutput {
    dbp_on(args, &dir_store(store), None)
}

/// `dbpolicy ARGS` with the store's flags right after the (sub)command words.
fn dbp_on(args: &[&str], store: &[String], url: Option<&str>) -> RunOutput {
    let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let at = if all[0] == "backup" { 2 } else { 1 };
    all.splice(at..at, store.iter().cloned());
    run_dbpolicy(&all, url)
}

fn ok(out: RunOutput, what: &str) -> RunOutput {
    assert!(
        out.success(),
        "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.code,
        out.stdout,
        out.stderr
    );
    out
}

async fn scalar<T>(conn: &mut PgConnection, sql: &str) -> T
where
    T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + Unpin,
{
    sqlx::query_scalar(sql)
        .fetch_one(conn)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

async fn exec(conn: &mut PgConnection, sql: &str) {
    sqlx::raw_sql(sql)
        .execute(conn)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// Ends the current segment and returns its name.
async fn switch(conn: &mut PgConnection) -> String {
    scalar(conn, "SELECT pg_walfile_name(pg_switch_wal())").await
}

/// Waits until the receiver has archived `segment` (its checksum record is stored).
async fn archived(store: &Path, segment: &str) {
    let record = store.join("pitr.main").join(format!("{segment}.json"));
    eventually(WAIT, || async {
        if record.exists() {
            Ok(())
        } else {
            Err(format!("{} not archived yet", record.display()))
        }
    })
    .await;
}

fn list(store: &Path) -> serde_json::Value {
    list_on(&dir_store(store))
}

fn list_on(store: &[String]) -> serde_json::Value {
    let out = ok(
        dbp_on(&["backup", "list", "--pitr", "-o", "json"], store, None),
        "list --pitr",
    );
    serde_json::from_str(&out.stdout).unwrap()
}

fn segment_files(store: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(store.join("pitr.main"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter_map(|n| n.strip_suffix(".json").map(str::to_string))
        .filter(|n| n.len() == 24)
        .collect();
    v.sort();
    v
}

/// Commits t1, t2 and t3 into `t`, and returns the WAL file t2 is written to and a target
/// time after t2's commit and before t3's (commit timestamps come from the same clock, and
/// clock_timestamp() moves on between statements).
async fn three_commits_around_a_target(conn: &mut PgConnection) -> (String, String) {
    exec(conn, "INSERT INTO t VALUES (1)").await; // t1
    let seg_t2: String = scalar(conn, "SELECT pg_walfile_name(pg_current_wal_lsn())").await;
    exec(conn, "INSERT INTO t VALUES (2)").await; // t2
    let target: String = scalar(
        conn,
        "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
    )
    .await;
    exec(conn, "SELECT pg_sleep(0.01)").await; // strictly after the target
    exec(conn, "INSERT INTO t VALUES (3)").await; // t3
    (seg_t2, target)
}

/// The ids in `t` of a restored server, once it has left recovery.
async fn rows_once_recovered(restored: &PgServer) -> Vec<i32> {
    eventually(WAIT, || {
        let url = restored.admin_url();
        async move {
            let mut c = <PgConnection as sqlx::Connection>::connect(&url)
                .await
                .map_err(|e| e.to_string())?;
            if scalar::<bool>(&mut c, "SELECT pg_is_in_recovery()").await {
                return Err("still recovering".to_string());
            }
            Ok(scalar::<Vec<i32>>(
                &mut c,
                "SELECT coalesce(array_agg(id ORDER BY id), '{}') FROM t",
            )
            .await)
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn restore_to_a_time_holds_exactly_the_rows_committed_before_it() {
    restore_binary_for_the_server_user();
    let pg = primary();
    let store = scratch("dbpolicy-pitr-store-");
    let spool = scratch("dbpolicy-pitr-spool-");
    let url = pg.admin_url();
    let mut conn = pg.connect().await;
    let _receiver = Receiver::start(&url, store.path(), spool.path());
    exec(&mut conn, "CREATE TABLE t (id int PRIMARY KEY)").await;
    // As the CronJob runs it: the outcome also lands in the termination log.
    let termination = store.path().join("termination-log");
    let out = dbpolicy_cmd()
        .args(["backup", "base", "--dir"])
        .arg(store.path())
        .env("DATABASE_URL", &url)
        .env("DBPOLICY_TERMINATION_LOG", &termination)
        .output()
        .unwrap();
    let base = ok(
        RunOutput {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        },
        "backup base",
    );
    let message: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&termination).unwrap()).unwrap();
    assert_eq!(message["result"], "Succeeded", "{message}");
    assert!(
        message["baseBackup"].is_string() && message["endLsn"].is_string(),
        "{message}"
    );
    // The window after the backup, for the operator's status: it starts at the backup's end.
    assert_eq!(
        message["windowEarliest"]
            .as_str()
            .map(|t| t[..19].to_string()),
        message["finishedAt"].as_str().map(|t| t[..19].to_string()),
        "{message}"
    );
    assert!(message["windowCheckedAt"].is_string(), "{message}");
    std::fs::remove_file(&termination).unwrap();
    assert!(
        base.stdout.contains("checked by pg_verifybackup"),
        "{}",
        base.stdout
    );

    let (seg_t2, target) = three_commits_around_a_target(&mut conn).await;
    let last = switch(&mut conn).await;
    archived(store.path(), &last).await;

    let window = list(store.path());
    assert!(window["window"]["earliest"].is_string(), "{window}");
    assert_eq!(
        window["window"]["bases"][0]["gapAt"],
        serde_json::Value::Null
    );

    // Restore to the target and look at the rows.
    let work = scratch("dbpolicy-pitr-restore-");
    let to = work.path().join("data");
    let out = ok(
        dbp(
            &[
                "restore",
                "--target-time",
                &target,
                "--to",
                to.to_str().unwrap(),
            ],
            store.path(),
        ),
        "restore",
    );
    assert!(to.join("recovery.signal").exists(), "{}", out.stdout);
    let restored = PgServer::adopt(&to);
    let ids = rows_once_recovered(&restored).await;
    assert_eq!(
        ids,
        [1, 2],
        "restored to {target}:\n{}",
        restored.log_tail(3000)
    );
    drop(restored);

    // verify --pitr reaches the same target.
    let out = ok(
        dbp(
            &["backup", "verify", "--pitr", "--target-time", &target],
            store.path(),
        ),
        "verify --pitr",
    );
    assert!(
        out.stdout.contains("verified point-in-time recovery"),
        "{}",
        out.stdout
    );

    // A corrupt segment between the base backup and the target fails verify.
    let object = store.path().join("pitr.main").join(format!("{seg_t2}.gz"));
    let mut bytes = std::fs::read(&object).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    bytes[mid + 1] ^= 0xff;
    std::fs::write(&object, bytes).unwrap();
    let out = dbp(
        &["backup", "verify", "--pitr", "--target-time", &target],
        store.path(),
    );
    assert_eq!(
        out.code, 1,
        "verify must fail:\n{}\n{}",
        out.stdout, out.stderr
    );
    assert!(out.stderr.contains("PitrVerifyFailed"), "{}", out.stderr);
    assert!(
        out.stderr
            .contains(&format!("archived WAL file {seg_t2} is corrupt")),
        "the server log names the corrupt segment:\n{}",
        out.stderr
    );
    // wal-fetch on its own says the same.
    let out = dbp(
        &["backup", "wal-fetch", &seg_t2, "/tmp/never-written"],
        store.path(),
    );
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("WalCorrupt"), "{}", out.stderr);
    assert!(!Path::new("/tmp/never-written").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_receiver_loses_no_wal_and_prune_keeps_the_window_recoverable() {
    restore_binary_for_the_server_user();
    let pg = primary();
    let store = scratch("dbpolicy-pitr-store-");
    let spool = scratch("dbpolicy-pitr-spool-");
    let url = pg.admin_url();
    let store_arg = store.path().to_str().unwrap().to_string();
    let mut conn = pg.connect().await;
    let mut receiver = Receiver::start(&url, store.path(), spool.path());
    exec(&mut conn, "CREATE TABLE t (id int)").await;
    ok(
        run_dbpolicy(["backup", "base", "--dir", &store_arg], Some(&url)),
        "first backup base",
    );
    let first_segment = segment_files(store.path()).first().cloned();
    for i in 0..3 {
        exec(
            &mut conn,
            &format!("INSERT INTO t SELECT generate_series(1, 2000) + {i}"),
        )
        .await;
        let s = switch(&mut conn).await;
        archived(store.path(), &s).await;
    }
    // Killed mid-stream: rows are being written and a segment is half received.
    exec(&mut conn, "INSERT INTO t SELECT generate_series(1, 3000)").await;
    receiver.kill();
    // While it is down the server goes on; the slot keeps the WAL.
    for _ in 0..3 {
        exec(&mut conn, "INSERT INTO t SELECT generate_series(1, 2000)").await;
        switch(&mut conn).await;
    }
    let _receiver = Receiver::start(&url, store.path(), spool.path());
    exec(&mut conn, "INSERT INTO t VALUES (-1)").await;
    let last = switch(&mut conn).await;
    archived(store.path(), &last).await;

    // Every segment from the base backup's first to the last one: no gap.
    let w = list(store.path());
    let reach = &w["window"]["bases"][0];
    assert_eq!(reach["gapAt"], serde_json::Value::Null, "{w}");
    let segs = segment_files(store.path());
    assert_eq!(segs.last(), Some(&last));
    assert!(first_segment.is_none_or(|f| segs[0] <= f));
    let total: i64 = scalar(&mut conn, "SELECT count(*) FROM t").await;

    // A second base backup, more WAL, then keep only the newest base backup.
    ok(
        run_dbpolicy(["backup", "base", "--dir", &store_arg], Some(&url)),
        "second backup base",
    );
    exec(&mut conn, "INSERT INTO t VALUES (-2)").await;
    let last = switch(&mut conn).await;
    archived(store.path(), &last).await;
    let before = segment_files(store.path()).len();
    let out = ok(
        dbp(
            &["backup", "prune", "--pitr", "--retention-count", "1"],
            store.path(),
        ),
        "prune --pitr",
    );
    assert!(
        out.stdout.contains("pruned pitr.main: 1 base backup(s)"),
        "{}",
        out.stdout
    );
    let w = list(store.path());
    let bases = w["window"]["bases"].as_array().unwrap();
    assert_eq!(bases.len(), 1, "{w}");
    assert_eq!(bases[0]["gapAt"], serde_json::Value::Null, "{w}");
    let after = segment_files(store.path());
    assert!(
        after.len() < before,
        "WAL before the kept base backup is gone"
    );
    assert_eq!(after.last(), Some(&last));

    // And what is left recovers: to the latest WAL, with every row.
    let work = scratch("dbpolicy-pitr-restore-");
    let to = work.path().join("data");
    ok(
        dbp(
            &["restore", "--latest", "--to", to.to_str().unwrap()],
            store.path(),
        ),
        "restore --latest",
    );
    let restored = PgServer::adopt(&to);
    let n: i64 = eventually(WAIT, || {
        let url = restored.admin_url();
        async move {
            let mut c = <PgConnection as sqlx::Connection>::connect(&url)
                .await
                .map_err(|e| e.to_string())?;
            if scalar::<bool>(&mut c, "SELECT pg_is_in_recovery()").await {
                return Err("still recovering".to_string());
            }
            Ok(scalar::<i64>(&mut c, "SELECT count(*) FROM t").await)
        }
    })
    .await;
    assert_eq!(n, total + 1, "{}", restored.log_tail(3000));
    drop(restored);
    ok(
        dbp(&["backup", "verify", "--pitr", "--latest"], store.path()),
        "verify --pitr --latest after prune",
    );
}

/// What the operator reads on the primary for `status.backups.pointInTimeRecovery`
/// (`backup::pitr::slot::observe`), with a real receiver: no slot before it starts, an
/// active slot less than a segment behind while it streams, and once it is killed an
/// inactive slot whose retained WAL grows with what the server writes, until
/// `PointInTimeRecoveryReady` says `SlotRetainingTooMuch`.
#[tokio::test]
async fn the_slot_the_operator_reads_follows_the_receiver() {
    use dbpolicy::backup::pitr::slot;
    let pg = primary();
    let store = scratch("dbpolicy-pitr-store-");
    let spool = scratch("dbpolicy-pitr-spool-");
    let url = pg.admin_url();
    let mut conn = pg.connect().await;
    assert_eq!(
        slot::observe(&mut conn, "dbpolicy_pitr").await.unwrap(),
        None
    );

    let mut receiver = Receiver::start(&url, store.path(), spool.path());
    exec(
        &mut conn,
        "CREATE TABLE t AS SELECT g FROM generate_series(1, 20000) g",
    )
    .await;
    exec(&mut conn, "SELECT pg_switch_wal()").await;
    // Streaming: active, and behind by less than one (1 MB) segment once the switch is
    // received (pg_receivewal confirms a segment when it is synced in the spool).
    let streaming = eventually(WAIT, || async {
        let mut conn = pg.connect().await;
        {
            match slot::observe(&mut conn, "dbpolicy_pitr").await.unwrap() {
                Some(f) if f.active && f.lag_bytes.is_some_and(|l| l < 1 << 20) => Ok(f),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    assert!(
        streaming.retained_bytes.is_some_and(|r| r < 1 << 20),
        "{streaming:?}"
    );

    receiver.kill();
    exec(
        &mut conn,
        "CREATE TABLE u AS SELECT g, md5(g::text) FROM generate_series(1, 60000) g",
    )
    .await;
    exec(&mut conn, "SELECT pg_switch_wal()").await;
    let down = eventually(WAIT, || async {
        let mut conn = pg.connect().await;
        {
            match slot::observe(&mut conn, "dbpolicy_pitr").await.unwrap() {
                Some(f) if !f.active => Ok(f),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    let retained = down.retained_bytes.expect("the slot reserved WAL");
    assert!(
        retained > 2 << 20,
        "the WAL written since the kill is held: {down:?}"
    );

    // What the condition makes of it, through the operator's own code.
    let p: dbpolicy::api::PointInTimeRecovery =
        serde_yaml::from_str("{baseBackupSchedule: '@daily', maxSlotRetainedBytes: 1048576}")
            .unwrap();
    let status = dbpolicy::api::PitrStatus {
        receiver_available: Some(true),
        slot_active: Some(down.active),
        slot_retained_bytes: down.retained_bytes,
        archive_lag_bytes: down.lag_bytes,
        ..Default::default()
    };
    let deployment: k8s_openapi::api::apps::v1::Deployment =
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "r", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"selector": {}, "template": {}},
            "status": {"availableReplicas": 1},
        }))
        .unwrap();
    let now = k8s_openapi::jiff::Timestamp::now();
    let r = dbpolicy::controller::pitr::readiness(&p, false, &status, Some(&deployment), None, now);
    // The pod is up but nothing streams: the receiver is down, and its slot grows.
    assert_eq!(r.reason, "WalReceiverDown", "{}", r.message);
    let mut streaming_again = status.clone();
    streaming_again.slot_active = Some(true);
    let r = dbpolicy::controller::pitr::readiness(
        &p,
        false,
        &streaming_again,
        Some(&deployment),
        None,
        now,
    );
    assert_eq!(r.reason, "SlotRetainingTooMuch", "{}", r.message);
}

/// The restore test again, with every object in an S3-compatible bucket (moto): the
/// receiver streams WAL into it, the base backup goes there, and the restored server's
/// `restore_command` fetches each segment from it with `backup wal-fetch`.
#[tokio::test(flavor = "multi_thread")]
async fn restore_to_a_time_through_an_s3_store() {
    restore_binary_for_the_server_user();
    // The restored server runs `restore_command` with the environment it was started
    // with (runuser keeps it), which must carry the keys, as the runbook says: the adopted
    // server below inherits this process's.
    for (k, v) in moto::CREDENTIALS {
        std::env::set_var(k, v);
    }
    let moto = Moto::start();
    moto.create_bucket("dbpolicy-pitr");
    let endpoint = moto.endpoint();
    let store: Vec<String> = [
        "--s3-bucket",
        "dbpolicy-pitr",
        "--s3-endpoint",
        &endpoint,
        "--s3-region",
        "eu-west-1",
        "--s3-prefix",
        "team/quiz",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let pg = primary();
    let spool = scratch("dbpolicy-pitr-spool-");
    let url = pg.admin_url();
    let mut conn = pg.connect().await;
    let _receiver = Receiver::start_on(&url, &store, spool.path());
    exec(&mut conn, "CREATE TABLE t (id int PRIMARY KEY)").await;
    let out = ok(
        dbp_on(&["backup", "base"], &store, Some(&url)),
        "backup base into S3",
    );
    assert!(
        out.stdout.contains("checked by pg_verifybackup"),
        "{}",
        out.stdout
    );

    let (seg_t2, target) = three_commits_around_a_target(&mut conn).await;
    let last = switch(&mut conn).await;
    // Archived once the bucket lists it (segment names of one timeline sort in order).
    let window = eventually(WAIT, || async {
        let l = list_on(&store);
        match l["latestSegment"].as_str() {
            Some(s) if s >= last.as_str() => Ok(l),
            _ => Err(format!("{last} not archived yet: {l}")),
        }
    })
    .await;
    assert!(window["window"]["earliest"].is_string(), "{window}");
    assert_eq!(
        window["window"]["bases"][0]["gapAt"],
        serde_json::Value::Null,
        "{window}"
    );

    let work = scratch("dbpolicy-pitr-restore-");
    let to = work.path().join("data");
    let out = ok(
        dbp_on(
            &[
                "restore",
                "--target-time",
                &target,
                "--to",
                to.to_str().unwrap(),
            ],
            &store,
            None,
        ),
        "restore from S3",
    );
    let conf = std::fs::read_to_string(to.join("postgresql.auto.conf")).unwrap();
    assert!(
        conf.contains("wal-fetch") && conf.contains("--s3-bucket") && !conf.contains("testing"),
        "restore_command reads S3, credentials stay out of it:\n{conf}\n{}",
        out.stdout
    );
    let restored = PgServer::adopt(&to);
    let ids = rows_once_recovered(&restored).await;
    assert_eq!(
        ids,
        [1, 2],
        "restored to {target}:\n{}",
        restored.log_tail(3000)
    );
    assert!(
        restored.log_tail(20000).contains("restored log file"),
        "WAL came through restore_command:\n{}",
        restored.log_tail(3000)
    );
    drop(restored);

    let out = ok(
        dbp_on(
            &["backup", "verify", "--pitr", "--target-time", &target],
            &store,
            None,
        ),
        "verify --pitr against S3",
    );
    assert!(
        out.stdout.contains("verified point-in-time recovery"),
        "{}",
        out.stdout
    );

    // Bit rot in the bucket (the test's own client rewrites one object): the checksum
    // kept beside it makes verify fail, naming the segment.
    corrupt_s3_object(&endpoint, &format!("team/quiz/pitr.main/{seg_t2}.gz")).await;
    let out = dbp_on(
        &["backup", "verify", "--pitr", "--target-time", &target],
        &store,
        None,
    );
    assert_eq!(out.code, 1, "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stderr
            .contains(&format!("archived WAL file {seg_t2} is corrupt")),
        "{}",
        out.stderr
    );
}

/// Flips two bytes in the middle of one object of the moto bucket `dbpolicy-pitr`.
async fn corrupt_s3_object(endpoint: &str, key: &str) {
    use object_store::{ObjectStoreExt, PutPayload};
    let s3 = object_store::aws::AmazonS3Builder::new()
        .with_bucket_name("dbpolicy-pitr")
        .with_region("eu-west-1")
        .with_endpoint(endpoint)
        .with_allow_http(true)
        .with_virtual_hosted_style_request(false)
        .with_access_key_id("testing")
        .with_secret_access_key("testing")
        .build()
        .unwrap();
    let key = object_store::path::Path::from(key);
    let mut bytes = s3
        .get(&key)
        .await
        .unwrap_or_else(|e| panic!("{key}: {e}"))
        .bytes()
        .await
        .unwrap()
        .to_vec();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    bytes[mid + 1] ^= 0xff;
    s3.put(&key, PutPayload::from(bytes)).await.unwrap();
}
