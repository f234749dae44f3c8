//! Server-scope ownership (issue 14, case 3): settings and replication slots belong to the
//! whole server, so policies on two databases of one server are told apart through the
//! claims in `dbpolicy.server_claims` of the `postgres` database. Each test starts its own
//! throwaway server (ALTER SYSTEM and slots change the whole server).

use dbpolicy_test_support as support;

use std::time::Duration;

use sqlx::Connection;
use support::{
    cli, eventually, expect_code, policy, run_dbpolicy, run_dbpolicy_async, write_policy, PgServer,
    TestDb,
};

/// Longest wait for a CLI run (a bound, never an assertion).
const RUN: Duration = Duration::from_secs(120);
/// The advisory lock every claim write takes in the claims database (`server_claims`).
const CLAIMS_LOCK_KEY: i64 = 0x6462_7063_6c61_696d;

fn settings(name: &str, params: &str) -> String {
    policy(
        name,
        &format!("  serverSettings:\n    parameters:\n{params}"),
    )
}

fn slot_policy(name: &str, slot: &str) -> String {
    policy(
        name,
        &format!(
            "  safety: {{allowDestructive: true}}\n  replicas:\n    replicas:\n      - {{name: r1, connectionSecretRef: {{name: r1-conn}}, slot: {slot}}}\n"
        ),
    )
}

/// The value of `name` in postgresql.auto.conf (None: no line).
async fn written(server: &PgServer, name: &str) -> Option<String> {
    let mut c = server.connect().await;
    let v = sqlx::query_scalar(
        "SELECT setting FROM pg_file_settings WHERE sourcefile LIKE '%postgresql.auto.conf' AND name = $1 ORDER BY seqno DESC LIMIT 1",
    )
    .bind(name)
    .fetch_optional(&mut c)
    .await
    .unwrap();
    let _ = c.close().await;
    v
}

/// `kind name database policy value` rows of the claims table.
async fn claims(server: &PgServer) -> Vec<String> {
    let mut c = server.connect().await;
    let rows = sqlx::query_scalar(
        "SELECT concat_ws(' ', kind, name, database, policy, value) FROM dbpolicy.server_claims ORDER BY 1",
    )
    .fetch_all(&mut c)
    .await
    .unwrap_or_default();
    let _ = c.close().await;
    rows
}

/// `updated_at` of every claim, as text.
async fn claims_updated_at(server: &PgServer) -> Vec<String> {
    let mut c = server.connect().await;
    let rows = sqlx::query_scalar(
        "SELECT updated_at::text FROM dbpolicy.server_claims ORDER BY kind, name",
    )
    .fetch_all(&mut c)
    .await
    .unwrap();
    let _ = c.close().await;
    rows
}

async fn slots(server: &PgServer) -> Vec<String> {
    let mut c = server.connect().await;
    let v = sqlx::query_scalar("SELECT slot_name::text FROM pg_replication_slots ORDER BY 1")
        .fetch_all(&mut c)
        .await
        .unwrap();
    let _ = c.close().await;
    v
}

#[tokio::test]
async fn a_policy_on_another_database_that_wants_a_server_setting_gets_ownership_conflict() {
    let server = PgServer::start();
    let a = TestDb::on(&server).await;
    let b = TestDb::on(&server).await;
    let pa = settings("a", "      log_statement: ddl\n");
    expect_code(&cli("apply", a.url(), &pa), 0);
    assert_eq!(
        claims(&server).await,
        [format!("setting log_statement {} tests/a ddl", a.name())]
    );

    // Before this change, b's apply set `all`, a's next run set `ddl` back, and so on.
    let pb = settings("b", "      log_statement: all\n");
    let plan = cli("plan", b.url(), &pb);
    expect_code(&plan, 1);
    let expected = format!(
        "server setting log_statement is claimed server-wide by policy tests/a on database {} (it wants \"ddl\", this policy \"all\")",
        a.name()
    );
    assert!(
        plan.stdout.contains("OwnershipConflict") && plan.stdout.contains(&expected),
        "{}",
        plan.stdout
    );
    let apply = cli("apply", b.url(), &pb);
    expect_code(&apply, 1);
    assert_eq!(
        written(&server, "log_statement").await.as_deref(),
        Some("ddl")
    );

    // The same value is refused too: a owns it and resets it when it stops declaring it.
    expect_code(
        &cli(
            "apply",
            b.url(),
            &settings("b", "      log_statement: ddl\n"),
        ),
        1,
    );
    // A policy never conflicts with itself: a changes its own value, and re-applies.
    let pa2 = settings("a", "      log_statement: mod\n");
    expect_code(&cli("apply", a.url(), &pa2), 0);
    let stamp = claims_updated_at(&server).await;
    // Converged: the claim is read, not rewritten.
    expect_code(&cli("apply", a.url(), &pa2), 0);
    assert_eq!(claims_updated_at(&server).await, stamp);
    assert_eq!(
        written(&server, "log_statement").await.as_deref(),
        Some("mod")
    );
    assert_eq!(
        claims(&server).await,
        [format!("setting log_statement {} tests/a mod", a.name())]
    );

    // a stops declaring it: reset, claim released, b may take it.
    expect_code(
        &cli(
            "apply",
            a.url(),
            &settings("a", "      log_lock_waits: \"on\"\n"),
        ),
        0,
    );
    assert_eq!(written(&server, "log_statement").await, None);
    assert_eq!(
        claims(&server).await,
        [format!("setting log_lock_waits {} tests/a on", a.name())]
    );
    expect_code(&cli("apply", b.url(), &pb), 0);
    assert_eq!(
        written(&server, "log_statement").await.as_deref(),
        Some("all")
    );
    // a, unchanged, stays converged: the flip is gone.
    expect_code(
        &cli(
            "plan",
            a.url(),
            &settings("a", "      log_lock_waits: \"on\"\n"),
        ),
        0,
    );
}

#[tokio::test]
async fn release_frees_the_server_wide_claims_so_a_successor_on_another_database_adopts() {
    let server = PgServer::start();
    let a = TestDb::on(&server).await;
    let b = TestDb::on(&server).await;
    let pa = settings("a", "      log_min_duration_statement: 500ms\n");
    expect_code(&cli("apply", a.url(), &pa), 0);
    let pb = settings("b", "      log_min_duration_statement: 2s\n");
    expect_code(&cli("apply", b.url(), &pb), 1);

    let file = write_policy(&pa);
    let out = run_dbpolicy(
        ["release", "-f", file.path().to_str().unwrap()],
        Some(a.url()),
    );
    expect_code(&out, 0);
    assert!(
        out.stdout
            .contains("released server-wide setting log_min_duration_statement"),
        "{}",
        out.stdout
    );
    assert_eq!(claims(&server).await, Vec::<String>::new());
    // Retain: the value stays until the successor sets its own.
    assert_eq!(
        written(&server, "log_min_duration_statement")
            .await
            .as_deref(),
        Some("500ms")
    );
    expect_code(&cli("apply", b.url(), &pb), 0);
    assert_eq!(
        written(&server, "log_min_duration_statement")
            .await
            .as_deref(),
        Some("2s")
    );
    assert_eq!(
        claims(&server).await,
        [format!(
            "setting log_min_duration_statement {} tests/b 2s",
            b.name()
        )]
    );
}

#[tokio::test]
async fn a_dropped_database_leaves_no_claim_behind() {
    let server = PgServer::start();
    let a = TestDb::on(&server).await;
    let b = TestDb::on(&server).await;
    expect_code(
        &cli(
            "apply",
            a.url(),
            &settings("a", "      log_statement: ddl\n"),
        ),
        0,
    );
    drop(a); // DROP DATABASE: its policy can never release anything
    expect_code(
        &cli(
            "apply",
            b.url(),
            &settings("b", "      log_statement: all\n"),
        ),
        0,
    );
    assert_eq!(
        written(&server, "log_statement").await.as_deref(),
        Some("all")
    );
    assert_eq!(
        claims(&server).await,
        [format!("setting log_statement {} tests/b all", b.name())]
    );
}

/// Two applies on two databases that plan at the same time, both seeing the setting free:
/// the claims are taken before anything changes, one at a time, so exactly one wins and the
/// other changes nothing. The claims lock is held by the test until both runs wait on it,
/// so both have planned from "free" (deterministic, no timing).
#[tokio::test(flavor = "multi_thread")]
async fn two_concurrent_applies_on_two_databases_never_both_win() {
    let server = PgServer::start();
    let a = TestDb::on(&server).await;
    let b = TestDb::on(&server).await;
    let pa = write_policy(&settings("a", "      log_statement: ddl\n"));
    let pb = write_policy(&settings("b", "      log_statement: all\n"));
    // Bootstrapped, so the runs observe an empty claims table.
    expect_code(
        &cli(
            "apply",
            a.url(),
            &settings("a", "      log_lock_waits: \"on\"\n"),
        ),
        0,
    );
    let mut holder = server.connect().await;
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(CLAIMS_LOCK_KEY)
        .execute(&mut holder)
        .await
        .unwrap();

    let (ua, ub) = (a.url().to_string(), b.url().to_string());
    let (fa, fb) = (
        pa.path().to_str().unwrap().to_string(),
        pb.path().to_str().unwrap().to_string(),
    );
    let run_a =
        tokio::spawn(async move { run_dbpolicy_async(["apply", "-f", &fa], Some(&ua), RUN).await });
    let run_b =
        tokio::spawn(async move { run_dbpolicy_async(["apply", "-f", &fb], Some(&ub), RUN).await });
    // Both runs have observed and planned, and wait to claim.
    eventually(RUN, || async {
        let mut c = server.connect().await;
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
        )
        .fetch_one(&mut c)
        .await
        .unwrap();
        let _ = c.close().await;
        if waiting == 2 {
            Ok(())
        } else {
            Err(format!("{waiting} run(s) waiting for the claims lock"))
        }
    })
    .await;
    assert_eq!(written(&server, "log_statement").await, None);
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(CLAIMS_LOCK_KEY)
        .execute(&mut holder)
        .await
        .unwrap();
    let _ = holder.close().await;
    let (oa, ob) = (run_a.await.unwrap(), run_b.await.unwrap());

    let (winner, loser, value, db) = match (oa.code, ob.code) {
        (0, 1) => ("tests/a", &ob, "ddl", a.name()),
        (1, 0) => ("tests/b", &oa, "all", b.name()),
        _ => panic!(
            "exactly one must win: a exited {} ({}{}), b exited {} ({}{})",
            oa.code, oa.stdout, oa.stderr, ob.code, ob.stdout, ob.stderr
        ),
    };
    let text = format!("{}{}", loser.stdout, loser.stderr);
    assert!(
        text.contains("OwnershipConflict")
            && text.contains(&format!(
                "server setting log_statement was claimed server-wide by policy {winner} on database {db} while this run planned: nothing was changed"
            )),
        "{text}"
    );
    assert_eq!(
        written(&server, "log_statement").await.as_deref(),
        Some(value)
    );
    let rows = claims(&server).await;
    assert!(
        rows.contains(&format!("setting log_statement {db} {winner} {value}")),
        "{rows:?}"
    );
    assert_eq!(
        rows.iter()
            .filter(|r| r.starts_with("setting log_statement "))
            .count(),
        1
    );
}

#[tokio::test]
async fn a_slot_claimed_by_another_databases_policy_is_an_ownership_conflict() {
    let server = PgServer::start();
    let a = TestDb::on(&server).await;
    let b = TestDb::on(&server).await;
    expect_code(&cli("apply", a.url(), &slot_policy("a", "shared_slot")), 0);
    assert_eq!(slots(&server).await, ["shared_slot"]);

    let pb = slot_policy("b", "shared_slot");
    let plan = cli("plan", b.url(), &pb);
    expect_code(&plan, 1);
    assert!(
        plan.stdout.contains(&format!(
            "replication slot shared_slot is claimed server-wide by policy tests/a on database {}",
            a.name()
        )),
        "{}",
        plan.stdout
    );

    // a's deletion with Reset drops its slot and frees the claim; b creates and owns it.
    let file = write_policy(&slot_policy("a", "shared_slot"));
    let out = run_dbpolicy(
        ["release", "--reset", "-f", file.path().to_str().unwrap()],
        Some(a.url()),
    );
    expect_code(&out, 0);
    // The reset run dropped the slot and released its claim with it.
    assert_eq!(slots(&server).await, Vec::<String>::new());
    assert_eq!(claims(&server).await, Vec::<String>::new());
    expect_code(&cli("apply", b.url(), &pb), 0);
    assert_eq!(slots(&server).await, ["shared_slot"]);
    assert_eq!(
        claims(&server).await,
        [format!("slot shared_slot {} tests/b", b.name())]
    );
}

/// Without CONNECT on the claims database, server-wide items are refused with a reason
/// that says so, never changed unchecked; other areas are not affected.
#[tokio::test]
async fn an_unreachable_claims_database_refuses_server_wide_items_with_a_specific_reason() {
    let server = PgServer::start();
    let db = TestDb::on(&server).await;
    let role = "app_owner";
    db.exec(&format!(
        "CREATE ROLE {role} LOGIN REPLICATION; REVOKE CONNECT ON DATABASE postgres FROM PUBLIC;
         GRANT CONNECT, CREATE ON DATABASE {} TO {role}; CREATE TABLE t (id int); ALTER TABLE t OWNER TO {role}",
        db.name()
    ))
    .await;
    let url = db.url_as(role);
    let p = slot_policy("a", "app_slot");
    let out = cli("apply", &url, &p);
    expect_code(&out, 1);
    assert!(
        out.stdout.contains("ServerClaimsUnavailable")
            && out.stdout.contains(
                "replication slot app_slot belongs to the whole server, and which policy owns it is recorded in database postgres, which could not be read"
            )
            && out.stdout.contains("permission denied for database"),
        "{}",
        out.stdout
    );
    assert_eq!(slots(&server).await, Vec::<String>::new());

    // A policy with nothing server-wide is not affected.
    let av = policy(
        "a",
        "  autovacuum:\n    tables: [{table: t, vacuumThreshold: 10}]\n",
    );
    expect_code(&cli("apply", &url, &av), 0);
}
