//! Benchmark of the row-level security area: 1,000 tables with 3 policies each in a fresh
//! database, plan time when nothing changes and after one change, as ratios against a
//! trivial `SELECT 1` round trip measured in the same run (so the numbers compare across
//! machines), and the number of SQL round trips.
//!
//!     cargo run --release --example bench_rls [-- TABLES]
//!
//! `DATABASE_URL` is a superuser URL of the server to use (default
//! `postgres://postgres@127.0.0.1:5432/postgres`); the benchmark creates and drops its own
//! database and role there.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dbpolicy::api::{DatabasePolicySpec, Mode, RowLevelSecuritySpec};
use dbpolicy::engine::areas::{rls, AreaModule, PlanContext};
use dbpolicy::engine::{self, Ledger, PolicyId};
use sqlx::postgres::{PgConnectOptions, PgSslMode};
use sqlx::{ConnectOptions, Connection, PgConnection};

/// A TCP proxy in front of the server that counts round trips: the frontend messages that
/// make the server answer and wait (`Q` simple query, `S` sync of an extended query).
async fn counting_proxy(upstream: String) -> anyhow::Result<(u16, Arc<AtomicU64>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let count = Arc::new(AtomicU64::new(0));
    let counter = count.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                continue;
            };
            tokio::spawn(relay(client, server, counter.clone()));
        }
    });
    Ok((port, count))
}

async fn relay(
    client: tokio::net::TcpStream,
    server: tokio::net::TcpStream,
    count: Arc<AtomicU64>,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_server, mut to_server) = server.into_split();
    tokio::spawn(async move { tokio::io::copy(&mut from_server, &mut to_client).await });
    // The startup message has no type byte; every later one has.
    let mut typed = false;
    loop {
        let mut head = vec![0u8; if typed { 5 } else { 4 }];
        from_client.read_exact(&mut head).await?;
        let len = u32::from_be_bytes(head[head.len() - 4..].try_into().unwrap()) as usize;
        let mut body = vec![0u8; len.saturating_sub(4)];
        from_client.read_exact(&mut body).await?;
        if typed && matches!(head[0], b'Q' | b'S') {
            count.fetch_add(1, Ordering::Relaxed);
        }
        to_server.write_all(&head).await?;
        to_server.write_all(&body).await?;
        typed = true;
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// (median and fastest duration, last value) of `runs` evaluations of `$e` (which may
/// `.await`). Both are reported: on a shared machine the fastest run is the better
/// estimate of the cost, the median of what to expect.
macro_rules! time {
    ($runs:expr, $e:expr) => {{
        let mut times = Vec::with_capacity($runs);
        let mut last = None;
        for _ in 0..$runs {
            let start = Instant::now();
            last = Some($e);
            times.push(start.elapsed());
        }
        let fastest = *times.iter().min().expect("at least one run");
        ((median(times), fastest), last.expect("at least one run"))
    }};
}

fn spec_yaml(tables: usize, reader: &str, variant: &str) -> String {
    let mut y = String::from(
        "database: {connectionSecretRef: {name: bench}}\nrowLevelSecurity:\n  tables:\n",
    );
    for i in 0..tables {
        let own = if i == 0 {
            variant
        } else {
            "user_id = current_setting('app.current_user_id')::uuid"
        };
        y.push_str(&format!(
            "    - table: t{i:04}\n      force: true\n      policies:\n\
             \x20       - {{name: own, using: \"{own}\", withCheck: \"user_id = current_setting('app.current_user_id')::uuid\"}}\n\
             \x20       - {{name: read_org, command: Select, roles: [\"{reader}\"], using: \"org IN (1, 2, 3) AND body <> ''\"}}\n\
             \x20       - {{name: add, command: Insert, kind: Restrictive, withCheck: \"EXISTS (SELECT 1 FROM orgs o WHERE o.id = org)\"}}\n"
        ));
    }
    y
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let tables: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1000);
    let admin_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let pid = std::process::id();
    let db = format!("dbpolicy_bench_rls_{pid}");
    let reader = format!("dbpolicy_bench_reader_{pid}");
    let admin_opts: PgConnectOptions = admin_url.parse()?;
    let mut admin = PgConnection::connect_with(&admin_opts).await?;
    // One statement each: CREATE/DROP DATABASE refuse the implicit transaction of a batch.
    for sql in [
        format!("CREATE DATABASE {db}"),
        format!("CREATE ROLE {reader}"),
    ] {
        sqlx::raw_sql(&sql).execute(&mut admin).await?;
    }
    let result = bench(admin_opts.clone().database(&db), tables, &reader).await;
    // Cleanup runs whatever happened, and reports rather than hides a failure.
    for sql in [
        format!("DROP DATABASE {db} WITH (FORCE)"),
        format!("DROP ROLE {reader}"),
    ] {
        if let Err(e) = sqlx::raw_sql(&sql).execute(&mut admin).await {
            eprintln!("cleanup: {sql}: {e}");
        }
    }
    result
}

async fn bench(opts: PgConnectOptions, tables: usize, reader: &str) -> anyhow::Result<()> {
    let mut conn = PgConnection::connect_with(&opts).await?;
    // A second session through the counting proxy (no TLS, so the proxy can read it).
    let (port, trips) = counting_proxy(format!("{}:{}", opts.get_host(), opts.get_port())).await?;
    let mut counted = PgConnection::connect_with(
        &opts
            .clone()
            .host("127.0.0.1")
            .port(port)
            .ssl_mode(PgSslMode::Disable)
            .log_statements(tracing::log::LevelFilter::Off),
    )
    .await?;
    let trips = || trips.load(Ordering::Relaxed);

    let started = Instant::now();
    sqlx::raw_sql("CREATE TABLE orgs (id int PRIMARY KEY)")
        .execute(&mut conn)
        .await?;
    // A hundred tables per transaction: one transaction for all would run out of lock slots.
    for chunk in (0..tables).collect::<Vec<_>>().chunks(100) {
        let ddl: String = chunk
            .iter()
            .map(|i| format!("CREATE TABLE t{i:04} (id bigint PRIMARY KEY, user_id uuid NOT NULL, org int NOT NULL, body text NOT NULL DEFAULT '');\n"))
            .collect();
        sqlx::raw_sql(&ddl).execute(&mut conn).await?;
    }
    println!(
        "setup:  {tables} tables created in {:.2?}",
        started.elapsed()
    );

    let policy = PolicyId("bench/rls".into());
    let own = "user_id = current_setting('app.current_user_id')::uuid";
    let base: DatabasePolicySpec = serde_yaml::from_str(&spec_yaml(tables, reader, own))?;
    let changed: DatabasePolicySpec = serde_yaml::from_str(&spec_yaml(
        tables,
        reader,
        "user_id = current_setting('app.owner')::uuid",
    ))?;

    let start = Instant::now();
    let outcome = engine::run(&mut conn, &base, Mode::Apply, &policy).await?;
    anyhow::ensure!(
        outcome.report.as_ref().is_some_and(|r| r.succeeded()) && !outcome.plan.has_errors(),
        "apply failed: {:?}",
        outcome.plan.errors().collect::<Vec<_>>()
    );
    let applied = outcome.report.as_ref().map_or(0, |r| r.applied.len());
    println!(
        "apply:  {applied} changes ({} policies) in {:.2?}",
        tables * 3,
        start.elapsed()
    );

    let runs = 7;
    let ((select1, _), _) = time!(
        201,
        sqlx::query_scalar::<_, i32>("SELECT 1")
            .fetch_one(&mut conn)
            .await?
    );

    let (noop, outcome) = time!(
        runs,
        engine::run(&mut conn, &base, Mode::Plan, &policy).await
    );
    let outcome = outcome?;
    anyhow::ensure!(
        outcome.plan.is_empty(),
        "no-op plan is not empty:\n{}",
        outcome.plan.render_sql()
    );
    let (one, outcome) = time!(
        runs,
        engine::run(&mut conn, &changed, Mode::Plan, &policy).await
    );
    let pending = outcome?.plan.changes().count();
    anyhow::ensure!(pending == 1, "expected 1 pending change, got {pending}");

    // The engine's two steps, without the session setup and the lock.
    let (eng_observe, observed_all) = time!(runs, engine::observe(&mut conn, &base, &policy).await);
    let observed_all = observed_all?;
    let (eng_plan, _) = time!(runs, engine::plan(&base, &observed_all));

    // The area alone: its observer (catalog, roles, normalisation) and its pure planner.
    let rls_spec: &RowLevelSecuritySpec = base.row_level_security.as_ref().expect("section");
    let (observe, observed) = time!(runs, rls::observe(&mut conn, rls_spec).await);
    let observed = observed?;
    let ledger = Ledger::for_policy(&policy.0);
    let (pure, _) = time!(
        runs,
        rls::RowLevelSecurity::plan(rls_spec, &observed, &mut PlanContext::new(&base, &ledger))
    );

    // Round trips, once each, on the counted session, after one run to warm it up (the
    // first use of a statement on a session costs one more round trip to prepare it).
    engine::run(&mut counted, &base, Mode::Plan, &policy).await?;
    let count = |before: u64| trips() - before;
    let b = trips();
    engine::run(&mut counted, &base, Mode::Plan, &policy).await?;
    let noop_trips = count(b);
    let b = trips();
    engine::run(&mut counted, &changed, Mode::Plan, &policy).await?;
    let one_trips = count(b);
    let b = trips();
    engine::observe(&mut counted, &base, &policy).await?;
    let eng_observe_trips = count(b);
    let b = trips();
    rls::observe(&mut counted, rls_spec).await?;
    let observe_trips = count(b);

    let ratio = |d: Duration| d.as_secs_f64() / select1.as_secs_f64();
    println!();
    println!(
        "{tables} tables x 3 policies, {runs} runs each; SELECT 1 round trip (median of 201) = {select1:.2?}"
    );
    println!("| measurement                           |     median |    fastest | median / SELECT 1 | fastest / SELECT 1 | round trips |");
    println!("|---------------------------------------|-----------:|-----------:|------------------:|-------------------:|------------:|");
    let row = |what: &str, (median, fastest): (Duration, Duration), n: u64| {
        println!(
            "| {what:<37} | {:>10} | {:>10} | {:>17.0} | {:>18.0} | {n:>11} |",
            format!("{median:.2?}"),
            format!("{fastest:.2?}"),
            ratio(median),
            ratio(fastest),
        )
    };
    row("dbpolicy plan, no change", noop, noop_trips);
    row("dbpolicy plan, one policy changed", one, one_trips);
    row("engine observe (all areas)", eng_observe, eng_observe_trips);
    row("engine plan (pure, all areas)", eng_plan, 0);
    row(
        "rls observe (catalog, roles, normal.)",
        observe,
        observe_trips,
    );
    row("rls plan (pure)", pure, 0);
    conn.close().await?;
    counted.close().await?;
    Ok(())
}
