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
use dbpolicy::engine::{self, areas::rls, Ledger, PolicyId};
use sqlx::{Connection, PgConnection};
use tracing_subscriber::layer::SubscriberExt;

/// Counts the statements sqlx sends (one event per round trip, `sqlx::query` target).
struct RoundTrips(Arc<AtomicU64>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for RoundTrips {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if event.metadata().target().starts_with("sqlx::query") {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// (median duration, last value) of `runs` evaluations of `$e` (which may `.await`).
macro_rules! time {
    ($runs:expr, $e:expr) => {{
        let mut times = Vec::with_capacity($runs);
        let mut last = None;
        for _ in 0..$runs {
            let start = Instant::now();
            last = Some($e);
            times.push(start.elapsed());
        }
        (median(times), last.expect("at least one run"))
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
    let counter = Arc::new(AtomicU64::new(0));
    tracing::subscriber::set_global_default(
        tracing_subscriber::registry().with(RoundTrips(counter.clone())),
    )?;
    let trips = || counter.load(Ordering::Relaxed);

    let admin_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let pid = std::process::id();
    let db = format!("dbpolicy_bench_rls_{pid}");
    let reader = format!("dbpolicy_bench_reader_{pid}");
    let mut admin = PgConnection::connect(&admin_url).await?;
    sqlx::raw_sql(&format!("CREATE DATABASE {db}; CREATE ROLE {reader}"))
        .execute(&mut admin)
        .await?;
    let url = match admin_url.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{db}"),
        None => anyhow::bail!("DATABASE_URL has no database path"),
    };
    let result = bench(&url, tables, &reader, &trips).await;
    sqlx::raw_sql(&format!(
        "DROP DATABASE {db} WITH (FORCE); DROP ROLE {reader}"
    ))
    .execute(&mut admin)
    .await?;
    result
}

async fn bench(
    url: &str,
    tables: usize,
    reader: &str,
    trips: &dyn Fn() -> u64,
) -> anyhow::Result<()> {
    let mut conn = dbpolicy::pg::connect_one(url).await?;
    let started = Instant::now();
    let mut ddl = String::from("CREATE TABLE orgs (id int PRIMARY KEY);\n");
    for i in 0..tables {
        ddl.push_str(&format!(
            "CREATE TABLE t{i:04} (id bigint PRIMARY KEY, user_id uuid NOT NULL, org int NOT NULL, body text NOT NULL DEFAULT '');\n"
        ));
    }
    sqlx::raw_sql(&ddl).execute(&mut conn).await?;
    println!(
        "setup: {tables} tables created in {:.2?}",
        started.elapsed()
    );

    let policy = PolicyId("bench/rls".into());
    let base: DatabasePolicySpec = serde_yaml::from_str(&spec_yaml(
        tables,
        reader,
        "user_id = current_setting('app.current_user_id')::uuid",
    ))?;
    let changed: DatabasePolicySpec = serde_yaml::from_str(&spec_yaml(
        tables,
        reader,
        "user_id = current_setting('app.owner')::uuid",
    ))?;

    let start = Instant::now();
    let outcome = engine::run(&mut conn, &base, Mode::Apply, &policy).await?;
    let applied = outcome.report.as_ref().map_or(0, |r| r.applied.len());
    anyhow::ensure!(
        outcome.report.as_ref().is_some_and(|r| r.succeeded()) && !outcome.plan.has_errors(),
        "apply failed: {:?}",
        outcome.plan.errors().collect::<Vec<_>>()
    );
    println!(
        "apply:  {applied} changes ({} policies) in {:.2?}",
        tables * 3,
        start.elapsed()
    );

    let runs = 7;
    let (select1, _) = time!(
        201,
        sqlx::query_scalar::<_, i32>("SELECT 1")
            .fetch_one(&mut conn)
            .await?
    );

    let before = trips();
    let (noop, outcome) = time!(
        runs,
        engine::run(&mut conn, &base, Mode::Plan, &policy).await
    );
    let noop_trips = (trips() - before) / runs as u64;
    let outcome = outcome?;
    anyhow::ensure!(
        outcome.plan.is_empty(),
        "no-op plan is not empty:\n{}",
        outcome.plan.render_sql()
    );

    let before = trips();
    let (one, outcome) = time!(
        runs,
        engine::run(&mut conn, &changed, Mode::Plan, &policy).await
    );
    let one_trips = (trips() - before) / runs as u64;
    let pending = outcome?.plan.changes().count();
    anyhow::ensure!(pending == 1, "expected 1 pending change, got {pending}");

    // The area alone: its observer (catalog, roles, normalisation) and its pure planner.
    let rls_spec: &RowLevelSecuritySpec = base.row_level_security.as_ref().expect("section");
    let before = trips();
    let (observe, observed) = time!(runs, rls::observe(&mut conn, rls_spec).await);
    let observe_trips = (trips() - before) / runs as u64;
    let observed = observed?;
    let ledger = Ledger::for_policy(&policy.0);
    let (pure, _) = time!(runs, rls::plan(rls_spec, &observed, &ledger));

    let ratio = |d: Duration| d.as_secs_f64() / select1.as_secs_f64();
    println!();
    println!(
        "{tables} tables x 3 policies, median of {runs} runs; SELECT 1 round trip = {select1:.2?}"
    );
    println!("| measurement                        |       time |  x SELECT 1 | round trips |");
    println!("|------------------------------------|-----------:|------------:|------------:|");
    let row = |what: &str, d: Duration, n: Option<u64>| {
        println!(
            "| {what:<34} | {:>10} | {:>11.0} | {:>11} |",
            format!("{d:.2?}"),
            ratio(d),
            n.map_or("-".to_string(), |n| n.to_string())
        )
    };
    row("dbpolicy plan, no change", noop, Some(noop_trips));
    row("dbpolicy plan, one policy changed", one, Some(one_trips));
    row(
        "rls observe (catalog+roles+normal.)",
        observe,
        Some(observe_trips),
    );
    row("rls plan (pure)", pure, Some(0));
    conn.close().await?;
    Ok(())
}
