//! The replicas area against a real primary and a real streaming standby (`pg_basebackup
//! -R`) through the CLI: slot creation and idempotence, ownership of slots, replica
//! health and lag from both sides, lag over the limit, a replica down, the inactive-slot
//! warning and the read endpoint following health. Every test starts its own primary:
//! slots and replication are server-wide.

use dbpolicy_test_support as support;

use std::collections::BTreeMap;
use std::time::Duration;

use dbpolicy::api::{DatabasePolicy, ReplicaStatus};
use dbpolicy::controller::read_endpoint::{read_endpoint, ReadSource};
use serde_json::Value;
use sqlx::Row;
use support::{
    eventually, expect_code, policy, run_dbpolicy, write_policy, PgServer, PgServerOptions,
    RunOutput, TestDb,
};

const WAIT: Duration = Duration::from_secs(90);

fn primary() -> PgServer {
    PgServer::start_with(PgServerOptions::new().replication())
}

/// A policy with one replica `r1` (slot `r1_slot`) and the given extra replica fields.
fn spec(extra: &str, section: &str) -> String {
    policy(
        "replicas",
        &format!(
            "  safety: {{allowDestructive: true}}\n  replicas:\n    replicas:\n      - {{name: r1, connectionSecretRef: {{name: r1-conn}}, slot: r1_slot{extra}}}\n{section}"
        ),
    )
}

/// `dbpolicy <verb> -o json` with `--replica-url NAME=URL` for each of `replicas`.
fn run(verb: &str, db: &TestDb, yaml: &str, replicas: &[(&str, String)]) -> RunOutput {
    let file = write_policy(yaml);
    let mut args = vec![
        verb.to_string(),
        "-f".into(),
        file.path().to_str().unwrap().into(),
        "-o".into(),
        "json".into(),
        "--replica-timeout".into(),
        "3s".into(),
    ];
    for (name, url) in replicas {
        args.push("--replica-url".into());
        args.push(format!("{name}={url}"));
    }
    run_dbpolicy(args, Some(db.url()))
}

fn json(out: &RunOutput) -> Value {
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e})\n--- stdout\n{}\n--- stderr\n{}",
            out.stdout, out.stderr
        )
    })
}

fn statuses(doc: &Value) -> Vec<ReplicaStatus> {
    serde_json::from_value(doc["outcome"]["facts"]["replicas"].clone())
        .unwrap_or_else(|e| panic!("facts.replicas: {e}\n{doc:#}"))
}

/// The replicas area's notices as (reason, target, message).
fn notices(doc: &Value) -> Vec<(String, String, String)> {
    doc["outcome"]["plan"]["areas"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["area"] == "replicas")
        .flat_map(|a| a["notices"].as_array().cloned().unwrap_or_default())
        .map(|n| {
            (
                n["reason"].as_str().unwrap_or("").to_string(),
                n["target"].as_str().unwrap_or("").to_string(),
                n["message"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

fn replica(doc: &Value, name: &str) -> ReplicaStatus {
    statuses(doc)
        .into_iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no status for {name}\n{doc:#}"))
}

async fn slots(server: &PgServer) -> Vec<String> {
    let mut conn = server.connect().await;
    let names: Vec<String> =
        sqlx::query_scalar("SELECT slot_name::text FROM pg_replication_slots ORDER BY 1")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    names
}

/// Waits until a standby streams through `slot` and has replayed everything the primary
/// has written so far.
async fn wait_streaming(primary: &PgServer, slot: &str) {
    eventually(WAIT, || async {
        let mut conn = primary.connect().await;
        let row = sqlx::query(
            "SELECT s.active, r.replay_lsn >= pg_current_wal_lsn() AS caught_up
             FROM pg_replication_slots s LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid
             WHERE s.slot_name = $1",
        )
        .bind(slot)
        .fetch_one(&mut conn)
        .await
        .map_err(|e| e.to_string())?;
        let active: bool = row.get("active");
        let caught_up: Option<bool> = row.get("caught_up");
        if active && caught_up == Some(true) {
            Ok(())
        } else {
            Err(format!("active {active}, caught up {caught_up:?}"))
        }
    })
    .await;
}

async fn on_standby(standby: &PgServer, sql: &str) {
    let mut conn = standby.connect().await;
    sqlx::raw_sql(sql)
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{sql} on the standby: {e}"));
}

fn parsed(yaml: &str) -> DatabasePolicy {
    serde_yaml::from_str(yaml).expect("the test policy parses")
}

#[tokio::test]
async fn slots_are_created_once_and_only_owned_ones_dropped() {
    let server = primary();
    let db = TestDb::on(&server).await;
    db.exec("SELECT pg_create_physical_replication_slot('someone_else')")
        .await;
    let p = spec("", "");

    let plan = run("plan", &db, &p, &[]);
    expect_code(&plan, 2);
    let sql: Vec<String> = json(&plan)["outcome"]["plan"]["areas"][0]["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["sql"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        sql,
        ["SELECT pg_create_physical_replication_slot('r1_slot', true)"]
    );
    assert_eq!(
        slots(&server).await,
        ["someone_else"],
        "plan changes nothing"
    );

    expect_code(&run("apply", &db, &p, &[]), 0);
    assert_eq!(slots(&server).await, ["r1_slot", "someone_else"]);
    let reserved: bool = db
        .query_scalar(
            "SELECT restart_lsn IS NOT NULL FROM pg_replication_slots WHERE slot_name = 'r1_slot'",
        )
        .await;
    assert!(reserved, "WAL is reserved from creation on");

    // Idempotent: nothing to change, and the text output says so.
    let again = run_dbpolicy(
        ["plan", "-f", write_policy(&p).path().to_str().unwrap()],
        Some(db.url()),
    );
    expect_code(&again, 0);
    assert!(
        again.stdout.contains("# nothing to change"),
        "{}",
        again.stdout
    );
    assert!(
        again.stdout.contains("# replica r1: Unknown"),
        "{}",
        again.stdout
    );
    assert!(
        again
            .stderr
            .contains("pass --replica-url r1=URL or set DBPOLICY_REPLICA_R1_URL"),
        "{}",
        again.stderr
    );

    // Declaring a slot someone else created does not make it ours.
    let theirs = spec(
        "",
        "      - {name: r2, connectionSecretRef: {name: r2-conn}, slot: someone_else}\n",
    );
    expect_code(&run("apply", &db, &theirs, &[]), 0);

    // Removed from the spec: only the policy's own slot is dropped, and only as a
    // destructive change.
    let none = policy("replicas", "  replicas:\n    replicas: []\n");
    let refused = run("apply", &db, &none, &[]);
    expect_code(&refused, 2);
    let doc = json(&refused);
    let refused_changes = doc["outcome"]["report"]["refused"].as_array().unwrap();
    assert_eq!(refused_changes.len(), 1, "{doc:#}");
    assert_eq!(
        refused_changes[0]["sql"],
        "SELECT pg_drop_replication_slot('r1_slot')"
    );
    assert_eq!(slots(&server).await, ["r1_slot", "someone_else"]);

    let allowed = policy(
        "replicas",
        "  safety: {allowDestructive: true}\n  replicas:\n    replicas: []\n",
    );
    expect_code(&run("apply", &db, &allowed, &[]), 0);
    assert_eq!(slots(&server).await, ["someone_else"]);
    expect_code(&run("plan", &db, &allowed, &[]), 0);
}

#[tokio::test]
async fn healthy_replica_is_measured_from_both_sides() {
    let server = primary();
    let db = TestDb::on(&server).await;
    let p = spec(", maxLagSeconds: 60, maxLagBytes: 104857600", "");
    expect_code(&run("apply", &db, &p, &[]), 0);
    let standby = server.start_standby_using_slot("r1_slot");
    db.exec("CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g")
        .await;
    wait_streaming(&server, "r1_slot").await;

    let urls = [("r1", standby.url(db.name()))];
    let doc = eventually(WAIT, || async {
        let out = run("plan", &db, &p, &urls);
        let doc = json(&out);
        let r = replica(&doc, "r1");
        if r.state == "Healthy" {
            Ok(doc)
        } else {
            Err(format!("{r:?}"))
        }
    })
    .await;
    let r = replica(&doc, "r1");
    assert_eq!(r.slot.as_deref(), Some("r1_slot"));
    let seconds = r.lag_seconds.expect("lag in seconds measured");
    let bytes = r.lag_bytes.expect("lag in bytes measured");
    assert!((0.0..60.0).contains(&seconds), "{r:?}");
    assert!((0..104_857_600).contains(&bytes), "{r:?}");
    assert!(r.last_check_time.is_some());
    assert!(
        notices(&doc)
            .iter()
            .all(|(reason, _, _)| !reason.starts_with("Replica")),
        "{:?}",
        notices(&doc)
    );

    // The text output reports it too; the URL given in the environment works as well.
    let file = write_policy(&p);
    let mut cmd = support::dbpolicy_cmd();
    cmd.args(["plan", "-f", file.path().to_str().unwrap()])
        .env("DATABASE_URL", db.url())
        .env("DBPOLICY_REPLICA_R1_URL", standby.url(db.name()));
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("# replica r1: Healthy, lag "),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The read endpoint is the replica.
    let policy = parsed(&p);
    let spec = policy.spec.replicas.as_ref().unwrap();
    let urls: BTreeMap<String, String> = BTreeMap::from([("r1".into(), standby.url("app"))]);
    let e = read_endpoint(spec, &statuses(&doc), &server.url("app"), &urls);
    assert_eq!(e.source, ReadSource::Replicas);
    assert_eq!(e.secret_data()["DATABASE_READ_URL"], standby.url("app"));
}

#[tokio::test]
async fn lag_over_the_limit_is_detected_and_the_endpoint_follows() {
    let server = primary();
    let db = TestDb::on(&server).await;
    let p = spec(", maxLagBytes: 1024", "    fallbackToPrimary: true\n");
    expect_code(&run("apply", &db, &p, &[]), 0);
    let standby = server.start_standby_using_slot("r1_slot");
    db.exec("CREATE TABLE t (id int, pad text)").await;
    wait_streaming(&server, "r1_slot").await;
    let urls = [("r1", standby.url(db.name()))];
    let policy = parsed(&p);
    let spec = policy.spec.replicas.as_ref().unwrap();
    let endpoint_urls = BTreeMap::from([("r1".to_string(), standby.url("app"))]);

    on_standby(&standby, "SELECT pg_wal_replay_pause()").await;
    db.exec("INSERT INTO t SELECT g, repeat('x', 100) FROM generate_series(1, 5000) g")
        .await;
    let doc = eventually(WAIT, || async {
        let doc = json(&run("plan", &db, &p, &urls));
        let r = replica(&doc, "r1");
        if r.state == "Lagging" {
            Ok(doc)
        } else {
            Err(format!("{r:?}"))
        }
    })
    .await;
    let r = replica(&doc, "r1");
    assert!(r.lag_bytes.unwrap() > 1024, "{r:?}");
    let lagging: Vec<_> = notices(&doc)
        .into_iter()
        .filter(|(reason, _, _)| reason == "ReplicaLagging")
        .collect();
    assert_eq!(lagging.len(), 1, "{:?}", notices(&doc));
    assert_eq!(lagging[0].1, "r1");
    assert!(
        lagging[0].2.contains("exceeds maxLagBytes 1024"),
        "{lagging:?}"
    );
    assert!(lagging[0].2.contains("replay is paused"), "{lagging:?}");
    // Lagging: the endpoint falls back to the primary, as the spec asks.
    let e = read_endpoint(spec, &statuses(&doc), &server.url("app"), &endpoint_urls);
    assert_eq!(e.source, ReadSource::Primary);
    assert_eq!(
        e.database_read_url.as_deref(),
        Some(server.url("app").as_str())
    );

    on_standby(&standby, "SELECT pg_wal_replay_resume()").await;
    let doc = eventually(WAIT, || async {
        let doc = json(&run("plan", &db, &p, &urls));
        let r = replica(&doc, "r1");
        if r.state == "Healthy" {
            Ok(doc)
        } else {
            Err(format!("{r:?}"))
        }
    })
    .await;
    let e = read_endpoint(spec, &statuses(&doc), &server.url("app"), &endpoint_urls);
    assert_eq!(e.source, ReadSource::Replicas);
    assert_eq!(e.healthy_urls, [standby.url("app")]);
}

#[tokio::test]
async fn a_replica_down_or_not_in_recovery_is_unhealthy() {
    let server = primary();
    let db = TestDb::on(&server).await;
    let p = spec(
        "",
        "      - {name: wrong, connectionSecretRef: {name: wrong-conn}}\n",
    );
    expect_code(&run("apply", &db, &p, &[]), 0);
    let standby = server.start_standby_using_slot("r1_slot");
    wait_streaming(&server, "r1_slot").await;
    // `wrong` points at the primary itself: reachable, but not a standby.
    let urls = [
        ("r1", standby.url(db.name())),
        ("wrong", db.url().to_string()),
    ];
    let doc = eventually(WAIT, || async {
        let doc = json(&run("plan", &db, &p, &urls));
        let r = replica(&doc, "r1");
        if r.state == "Healthy" {
            Ok(doc)
        } else {
            Err(format!("{r:?}"))
        }
    })
    .await;
    assert_eq!(replica(&doc, "wrong").state, "NotInRecovery");
    assert!(notices(&doc)
        .iter()
        .any(|(reason, target, _)| reason == "ReplicaNotInRecovery" && target == "wrong"));

    standby.stop();
    // With a password in the URL this time: it must appear nowhere.
    let urls = [
        (
            "r1",
            format!(
                "postgres://postgres:hunter2@127.0.0.1:{}/{}",
                standby.port(),
                db.name()
            ),
        ),
        ("wrong", db.url().to_string()),
    ];
    let started = std::time::Instant::now();
    let out = run("plan", &db, &p, &urls);
    assert!(
        !out.stdout.contains("hunter2") && !out.stderr.contains("hunter2"),
        "{}\n{}",
        out.stdout,
        out.stderr
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "a down replica must not hold up the run"
    );
    expect_code(&out, 0);
    let doc = json(&out);
    let r = replica(&doc, "r1");
    assert_eq!(r.state, "Unreachable", "{r:?}");
    let unreachable: Vec<_> = notices(&doc)
        .into_iter()
        .filter(|(reason, _, _)| reason == "ReplicaUnreachable")
        .collect();
    assert_eq!(unreachable.len(), 1, "{:?}", notices(&doc));
    assert!(
        unreachable[0]
            .2
            .contains(&format!("127.0.0.1:{}", standby.port())),
        "{unreachable:?}"
    );

    // Nothing healthy and no fallback: no endpoint.
    let policy = parsed(&p);
    let spec = policy.spec.replicas.as_ref().unwrap();
    let endpoint_urls = BTreeMap::from([
        ("r1".to_string(), standby.url("app")),
        ("wrong".to_string(), server.url("app")),
    ]);
    let e = read_endpoint(spec, &statuses(&doc), &server.url("app"), &endpoint_urls);
    assert_eq!(e.source, ReadSource::None);
    assert_eq!(e.secret_data()["DATABASE_READ_URL"], "");
}

#[tokio::test]
async fn an_inactive_slot_retaining_wal_is_reported_loudly() {
    let server = primary();
    let db = TestDb::on(&server).await;
    let p = spec("", "");
    expect_code(&run("apply", &db, &p, &[]), 0);
    // No standby ever attaches; WAL piles up behind the slot.
    db.exec("CREATE TABLE t AS SELECT g, repeat('x', 200) AS pad FROM generate_series(1, 50000) g")
        .await;
    db.exec("SELECT pg_switch_wal()").await;
    db.exec("INSERT INTO t SELECT g, 'y' FROM generate_series(1, 1000) g")
        .await;

    let out = run("plan", &db, &p, &[]);
    expect_code(&out, 0);
    let doc = json(&out);
    let warning: Vec<_> = notices(&doc)
        .into_iter()
        .filter(|(reason, _, _)| reason == "InactiveSlotRetainingWal")
        .collect();
    assert_eq!(warning.len(), 1, "{:?}", notices(&doc));
    assert_eq!(warning[0].1, "r1_slot");
    let retained: i64 = db
        .query_scalar(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::int8 FROM pg_replication_slots WHERE slot_name = 'r1_slot'",
        )
        .await;
    assert!(retained > 4 * 1024 * 1024, "retained {retained}");
    // The message carries the retained bytes (at least what was written when it was read).
    let message = &warning[0].2;
    assert!(
        message.starts_with("WARNING: inactive physical replication slot r1_slot retains"),
        "{message}"
    );
    let bytes: i64 = message
        .split(" (")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no byte count in {message}"));
    assert!(bytes > 4 * 1024 * 1024 && bytes <= retained, "{message}");

    // The text output shows it as a notice.
    let text = run_dbpolicy(
        ["plan", "-f", write_policy(&p).path().to_str().unwrap()],
        Some(db.url()),
    );
    assert!(
        text.stdout
            .contains("# notice replicas: r1_slot: WARNING: inactive physical replication slot"),
        "{}",
        text.stdout
    );
}
