//! Benchmark of the whole engine at scale. In a fresh database per size: 1, 100, 1,000 and
//! 5,000 tables, each with 2 row-level security policies and autovacuum settings, plus 100
//! partitioned tables (monthly, 2 ahead, a default partition). Measured, in one run:
//!
//! - observe + plan with nothing to change (`dbpolicy plan` on a converged database):
//!   median wall time, as a ratio against a trivial `SELECT 1` round trip measured on the
//!   same connection in the same run (so the ratios compare across machines), and the
//!   number of SQL round trips, which must not grow with the number of tables;
//! - the apply that converged each database (setup, timed once);
//! - the certquiz policy (examples/certquiz) applied from empty, median of 3 fresh
//!   databases, without `serverSettings` and `replicas`: on a shared server `ALTER SYSTEM`
//!   and a replication slot would change the whole server (tests/certquiz.rs applies the
//!   whole policy on a throwaway server);
//! - the size of target/release/dbpolicy.
//!
//!     cargo run --release --example bench_engine [-- SIZE...]
//!
//! `DBPOLICY_BENCH_ADMIN_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`) is a
//! superuser URL of the server; each scratch database is dropped at the end. hack/bench.sh
//! runs every benchmark; results are in docs/performance.md.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection};
use tracing_subscriber::layer::SubscriberExt;

use dbpolicy::api::{DatabasePolicySpec, Mode};
use dbpolicy::engine::{self, PolicyId};

const SIZES: [usize; 4] = [1, 100, 1_000, 5_000];
const PARTITIONED: usize = 100;
/// Runs of the no-op plan per size (median): fewer at the sizes where one run takes seconds.
fn noop_runs(tables: usize) -> usize {
    if tables >= 1_000 {
        3
    } else {
        7
    }
}
const CERTQUIZ_RUNS: usize = 3;

const CERTQUIZ_SCHEMA: &str = include_str!("certquiz/schema.sql");
const CERTQUIZ_SEED: &str = include_str!("certquiz/seed.sql");
const CERTQUIZ_POLICY: &str = include_str!("certquiz/policy.yaml");

type Res<T> = anyhow::Result<T>;

/// Counts the statements sqlx sends: `connect_one` logs each one at DEBUG as an event with
/// target `sqlx::query`, one per round trip.
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

fn spec(tables: usize) -> Res<DatabasePolicySpec> {
    let mut y = String::from(
        "database: {connectionSecretRef: {name: bench}}\nsafety: {lockTimeout: 5s, statementTimeout: 30m}\n",
    );
    y.push_str("rowLevelSecurity:\n  tables:\n");
    for i in 0..tables {
        y.push_str(&format!(
            "    - table: t{i:05}\n      policies:\n\
             \x20       - {{name: own, using: \"owner = nullif(current_setting('app.user_id', true), '')::int\", withCheck: \"owner = nullif(current_setting('app.user_id', true), '')::int\"}}\n\
             \x20       - {{name: published, command: Select, using: \"body <> '' AND id > 0\"}}\n"
        ));
    }
    y.push_str("autovacuum:\n  tables:\n");
    for i in 0..tables {
        y.push_str(&format!(
            "    - {{table: t{i:05}, vacuumScaleFactor: 0.05, vacuumThreshold: 50, analyzeScaleFactor: 0.02}}\n"
        ));
    }
    y.push_str("partitions:\n  tables:\n");
    for i in 0..PARTITIONED {
        y.push_str(&format!(
            "    - {{table: pt{i:03}, column: created_at, interval: Monthly, premake: 2, defaultPartition: true}}\n"
        ));
    }
    Ok(serde_yaml::from_str(&y)?)
}

/// One size: the converging apply, the no-op plan, and where the no-op time goes.
struct SizeResult {
    tables: usize,
    apply: Duration,
    applied: usize,
    noop: Duration,
    trips: u64,
    select1: Duration,
    /// Median time and round trips of each area's observer alone (with the ledger read), and
    /// of the pure plan.
    breakdown: Vec<(&'static str, Duration, u64)>,
}

async fn create_db(admin: &mut PgConnection, name: &str) -> Res<()> {
    // Two statements, two round trips: neither may run inside a (multi-statement) transaction.
    sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&mut *admin)
        .await?;
    sqlx::raw_sql(&format!("CREATE DATABASE {name} TEMPLATE template0"))
        .execute(&mut *admin)
        .await?;
    Ok(())
}

async fn drop_db(admin: &mut PgConnection, name: &str) {
    if let Err(e) = sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(admin)
        .await
    {
        eprintln!("warning: could not drop {name}: {e}");
    }
}

async fn select1(conn: &mut PgConnection) -> Res<Duration> {
    let mut times = Vec::with_capacity(201);
    for _ in 0..201 {
        let start = Instant::now();
        sqlx::query_scalar::<_, i32>("SELECT 1")
            .fetch_one(&mut *conn)
            .await?;
        times.push(start.elapsed());
    }
    Ok(median(times))
}

async fn bench_size(url: &str, tables: usize, trips: &dyn Fn() -> u64) -> Res<SizeResult> {
    let mut conn = dbpolicy::pg::connect_one(url).await?;
    let started = Instant::now();
    // In batches: one multi-statement query is one transaction, and each new table holds
    // locks until it commits (max_locks_per_transaction).
    let mut ddl = Vec::new();
    for i in 0..tables {
        ddl.push(format!(
            "CREATE TABLE t{i:05} (id bigint PRIMARY KEY, owner int NOT NULL, body text NOT NULL DEFAULT '');"
        ));
    }
    for i in 0..PARTITIONED {
        ddl.push(format!(
            "CREATE TABLE pt{i:03} (id bigint NOT NULL, created_at timestamptz NOT NULL, payload text) PARTITION BY RANGE (created_at);"
        ));
    }
    for batch in ddl.chunks(200) {
        sqlx::raw_sql(&batch.concat()).execute(&mut conn).await?;
    }
    eprintln!(
        "  {tables} tables + {PARTITIONED} partitioned tables created in {:.1?}",
        started.elapsed()
    );

    let spec = spec(tables)?;
    let policy = PolicyId("bench/engine".into());
    let start = Instant::now();
    let outcome = engine::run(&mut conn, &spec, Mode::Apply, &policy).await?;
    let apply = start.elapsed();
    if let Some(e) = outcome.plan.errors().next() {
        anyhow::bail!("{tables} tables: plan error: {e}");
    }
    let report = outcome
        .report
        .ok_or_else(|| anyhow::anyhow!("nothing applied"))?;
    if let Some(f) = &report.failure {
        anyhow::bail!("{tables} tables: apply failed: {f}");
    }
    eprintln!(
        "  converged with {} changes in {apply:.1?}",
        report.applied.len()
    );

    let select1 = select1(&mut conn).await?;
    let runs = noop_runs(tables);
    let mut times = Vec::with_capacity(runs);
    let before = trips();
    for _ in 0..runs {
        let start = Instant::now();
        let outcome = engine::run(&mut conn, &spec, Mode::Plan, &policy).await?;
        times.push(start.elapsed());
        anyhow::ensure!(
            outcome.plan.is_empty() && !outcome.plan.has_errors(),
            "{tables} tables: the plan after apply is not empty:\n{}",
            outcome.plan.render_sql()
        );
    }
    let per_run = (trips() - before) / runs as u64;

    // Where the time goes: each area observed alone, then the pure plan.
    let mut breakdown = Vec::new();
    let areas: [(&'static str, DatabasePolicySpec); 3] = [
        (
            "rowLevelSecurity observe",
            DatabasePolicySpec {
                autovacuum: None,
                partitions: None,
                ..spec.clone()
            },
        ),
        (
            "autovacuum observe",
            DatabasePolicySpec {
                row_level_security: None,
                partitions: None,
                ..spec.clone()
            },
        ),
        (
            "partitions observe",
            DatabasePolicySpec {
                row_level_security: None,
                autovacuum: None,
                ..spec.clone()
            },
        ),
    ];
    for (what, only) in &areas {
        let mut t = Vec::new();
        let before = trips();
        for _ in 0..runs {
            let start = Instant::now();
            engine::observe(&mut conn, only, &policy).await?;
            t.push(start.elapsed());
        }
        breakdown.push((*what, median(t), (trips() - before) / runs as u64));
    }
    let observed = engine::observe(&mut conn, &spec, &policy).await?;
    let mut t = Vec::new();
    for _ in 0..runs {
        let start = Instant::now();
        let plan = engine::plan(&spec, &observed);
        t.push(start.elapsed());
        anyhow::ensure!(plan.is_empty(), "the pure plan is not empty");
    }
    breakdown.push(("plan (pure)", median(t), 0));
    conn.close().await?;
    Ok(SizeResult {
        tables,
        apply,
        applied: report.applied.len(),
        noop: median(times),
        trips: per_run,
        select1,
        breakdown,
    })
}

/// certquiz from empty: (median apply, changes, round trips of one apply, SELECT 1).
async fn bench_certquiz(
    admin: &mut PgConnection,
    admin_url: &str,
    trips: &dyn Fn() -> u64,
) -> Res<(Duration, usize, u64, Duration)> {
    let (policies, _) =
        dbpolicy::cli::parse_policies(CERTQUIZ_POLICY).map_err(anyhow::Error::msg)?;
    let mut spec = policies.into_iter().next().expect("one policy").spec;
    spec.server_settings = None;
    spec.replicas = None;
    let db = format!("dbpolicy_bench_certquiz_{}", std::process::id());
    let mut times = Vec::new();
    let (mut changes, mut round_trips, mut one) = (0, 0, Duration::ZERO);
    for _ in 0..CERTQUIZ_RUNS {
        create_db(admin, &db).await?;
        let url = dbpolicy::pg::url_with_database(admin_url, &db);
        let result = async {
            let mut conn = dbpolicy::pg::connect_one(&url).await?;
            sqlx::raw_sql(CERTQUIZ_SCHEMA).execute(&mut conn).await?;
            sqlx::raw_sql(CERTQUIZ_SEED).execute(&mut conn).await?;
            one = select1(&mut conn).await?;
            let before = trips();
            let start = Instant::now();
            let outcome = engine::run(
                &mut conn,
                &spec,
                Mode::Apply,
                &PolicyId("default/certquiz".into()),
            )
            .await?;
            let took = start.elapsed();
            round_trips = trips() - before;
            if let Some(e) = outcome.plan.errors().next() {
                anyhow::bail!("certquiz: plan error: {e}");
            }
            let report = outcome
                .report
                .ok_or_else(|| anyhow::anyhow!("certquiz: nothing applied"))?;
            if let Some(f) = &report.failure {
                anyhow::bail!("certquiz: apply failed: {f}");
            }
            changes = report.applied.len();
            let again = engine::run(
                &mut conn,
                &spec,
                Mode::Plan,
                &PolicyId("default/certquiz".into()),
            )
            .await?;
            anyhow::ensure!(
                again.plan.is_empty(),
                "certquiz did not converge:\n{}",
                again.plan.render_sql()
            );
            conn.close().await?;
            Ok(took)
        }
        .await;
        drop_db(admin, &db).await;
        times.push(result?);
    }
    Ok((median(times), changes, round_trips, one))
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map_or("unknown CPU".to_string(), |m| m.trim().to_string());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    format!("{cpus} CPUs ({model}), {mem_gib:.1} GiB memory")
}

fn binary_size() -> String {
    let target = std::env::var("CARGO_TARGET_DIR")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/target").to_string());
    let path = std::path::Path::new(&target).join("release/dbpolicy");
    match std::fs::metadata(&path) {
        Ok(m) => format!(
            "{:.1} MiB ({} bytes, {})",
            m.len() as f64 / 1024.0 / 1024.0,
            m.len(),
            path.display()
        ),
        Err(_) => format!(
            "not built ({} missing: cargo build --release)",
            path.display()
        ),
    }
}

#[tokio::main]
async fn main() -> Res<()> {
    let sizes: Vec<usize> = {
        let args: Vec<usize> = std::env::args()
            .skip(1)
            .map(|a| a.parse())
            .collect::<Result<_, _>>()?;
        if args.is_empty() {
            SIZES.to_vec()
        } else {
            args
        }
    };
    let counter = Arc::new(AtomicU64::new(0));
    tracing::subscriber::set_global_default(
        tracing_subscriber::registry().with(RoundTrips(counter.clone())),
    )?;
    let trips = || counter.load(Ordering::Relaxed);

    let admin_url = std::env::var("DBPOLICY_BENCH_ADMIN_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let mut admin = PgConnection::connect(&admin_url).await?;
    let version: String = sqlx::query_scalar("SELECT version()")
        .fetch_one(&mut admin)
        .await?;
    let settings: String = sqlx::query_scalar(
        "SELECT string_agg(name || '=' || current_setting(name), ', ' ORDER BY name) FROM pg_settings
          WHERE name IN ('shared_buffers', 'max_locks_per_transaction', 'fsync', 'synchronous_commit')",
    )
    .fetch_one(&mut admin)
    .await?;
    println!("machine: {}", machine());
    println!("server: {version} ({settings})");
    println!("binary: target/release/dbpolicy {}", binary_size());

    let mut results = Vec::new();
    for &tables in &sizes {
        eprintln!("{tables} tables:");
        let db = format!("dbpolicy_bench_engine_{}_{tables}", std::process::id());
        create_db(&mut admin, &db).await?;
        let result = bench_size(
            &dbpolicy::pg::url_with_database(&admin_url, &db),
            tables,
            &trips,
        )
        .await;
        drop_db(&mut admin, &db).await;
        match result {
            Ok(r) => results.push(Ok(r)),
            Err(e) => {
                eprintln!("  FAILED: {e:#}");
                results.push(Err((tables, format!("{e:#}"))));
            }
        }
    }
    eprintln!("certquiz:");
    let certquiz = bench_certquiz(&mut admin, &admin_url, &trips).await;
    admin.close().await?;

    println!();
    println!("Observe + plan with nothing to change (`dbpolicy plan` on a converged database: session setup, advisory lock, observe, plan; median of 7 runs, 3 from 1,000 tables on); `SELECT 1` = one trivial round trip on the same connection, same run (median of 201); ratio = observe + plan / `SELECT 1`.");
    println!();
    println!("| tables (2 RLS policies + autovacuum each) | partitioned tables | observe + plan, no change | `SELECT 1` | ratio | SQL round trips | converging apply (changes) |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let mut trip_counts = Vec::new();
    for r in &results {
        match r {
            Ok(r) => {
                trip_counts.push(r.trips);
                println!(
                    "| {} | {PARTITIONED} | {:.1} ms | {:.1} µs | {:.0} | {} | {:.1} s ({}) |",
                    r.tables,
                    r.noop.as_secs_f64() * 1000.0,
                    r.select1.as_secs_f64() * 1e6,
                    r.noop.as_secs_f64() / r.select1.as_secs_f64(),
                    r.trips,
                    r.apply.as_secs_f64(),
                    r.applied
                );
            }
            Err((tables, e)) => println!(
                "| {tables} | {PARTITIONED} | FAILED: {} | | | | |",
                e.replace('\n', " ").replace('|', "\\|")
            ),
        }
    }
    let ok: Vec<&SizeResult> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    if let Some(first) = ok.first() {
        println!();
        print!("| where the no-op time goes (round trips) |");
        for r in &ok {
            print!(" {} tables |", r.tables);
        }
        println!();
        println!("|---|{}", "---:|".repeat(ok.len()));
        for (i, (what, _, _)) in first.breakdown.iter().enumerate() {
            print!("| {what} |");
            for r in &ok {
                let (_, took, n) = r.breakdown[i];
                print!(" {:.1} ms ({n}) |", took.as_secs_f64() * 1000.0);
            }
            println!();
        }
    }
    println!();
    let constant = trip_counts.windows(2).all(|w| w[0] == w[1]);
    println!(
        "round trips constant across sizes: {} ({trip_counts:?})",
        if constant { "yes" } else { "NO" }
    );
    println!();
    match certquiz {
        Ok((took, changes, round_trips, one)) => {
            println!("| certquiz apply from empty (without serverSettings, replicas) | changes | SQL round trips | × `SELECT 1` |");
            println!("|---:|---:|---:|---:|");
            println!(
                "| {:.1} ms (median of {CERTQUIZ_RUNS}) | {changes} | {round_trips} | {:.0} |",
                took.as_secs_f64() * 1000.0,
                took.as_secs_f64() / one.as_secs_f64()
            );
        }
        Err(e) => println!("certquiz apply FAILED: {e:#}"),
    }
    println!("\nbinary size: {}", binary_size());
    if !constant || results.iter().any(|r| r.is_err()) {
        std::process::exit(1);
    }
    Ok(())
}
