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
    let mut y = rls_autovacuum_yaml(tables);
    y.push_str("partitions:\n  tables:\n");
    for i in 0..PARTITIONED {
        y.push_str(&format!(
            "    - {{table: pt{i:03}, column: created_at, interval: Monthly, premake: 2, defaultPartition: true}}\n"
        ));
    }
    Ok(serde_yaml::from_str(&y)?)
}

/// The spec's row-level security and autovacuum sections: what the catalog floor and
/// schemainspect are compared with.
fn rls_autovacuum_yaml(tables: usize) -> String {
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
    y
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
    /// Whole processes, paired runs, medians: `dbpolicy plan` (RLS + autovacuum, nothing to
    /// change), the catalog floor (`psql`), schemainspect (None when not installed).
    processes: Option<Processes>,
}

struct Processes {
    dbpolicy: Duration,
    floor: Duration,
    schemainspect: Option<Duration>,
    /// The 1-minute load average before each pair of runs, lowest and highest: wall times on
    /// a shared machine mean little without it.
    load: (f64, f64),
}

/// The 1-minute load average (0 when /proc/loadavg cannot be read).
fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// One read of every policy expression (`pg_get_expr`) and every table's reloptions: the
/// least any drift check of these two areas has to do.
const FLOOR_SQL: &str =
    "SELECT c.relname, c.reloptions, p.polname, p.polcmd, p.polpermissive, p.polroles,
       pg_get_expr(p.polqual, p.polrelid), pg_get_expr(p.polwithcheck, p.polrelid)
FROM pg_class c LEFT JOIN pg_policy p ON p.polrelid = c.oid
WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p')";

/// PyPI's schemainspect, run as its users do: one process that inspects the database.
const SCHEMAINSPECT_PY: &str = "import sys
from sqlbag import S
from schemainspect import get_inspector
with S(sys.argv[1]) as s:
    i = get_inspector(s)
    assert len(i.rlspolicies) > 0, 'schemainspect saw no policies'
";

fn release_bin() -> std::path::PathBuf {
    let target = std::env::var("CARGO_TARGET_DIR")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/target").to_string());
    std::path::Path::new(&target).join("release/dbpolicy")
}

fn schemainspect_python() -> Option<String> {
    let python = std::env::var("DBPOLICY_BENCH_SCHEMAINSPECT").unwrap_or_else(|_| {
        format!(
            "{}/.cache/dbpolicy-bench/venv/bin/python",
            std::env::var("HOME").unwrap_or_default()
        )
    });
    std::path::Path::new(&python).exists().then_some(python)
}

/// Runs `cmd` to completion; its time, or why it failed.
fn timed(cmd: &mut std::process::Command, expect: i32) -> Res<Duration> {
    let start = Instant::now();
    let out = cmd.output()?;
    let took = start.elapsed();
    anyhow::ensure!(
        out.status.code() == Some(expect),
        "{cmd:?} exited with {} (expected {expect}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(took)
}

/// `dbpolicy plan`, the catalog floor and schemainspect, each a whole process, in turn
/// (paired), `runs` times; medians.
fn processes(url: &str, tables: usize, runs: usize) -> Res<Processes> {
    let bin = release_bin();
    anyhow::ensure!(
        bin.exists(),
        "{} missing: cargo build --release",
        bin.display()
    );
    let mut file = tempfile::NamedTempFile::new()?;
    let spec = rls_autovacuum_yaml(tables)
        .lines()
        .map(|l| format!("  {l}\n"))
        .collect::<String>();
    std::io::Write::write_all(
        &mut file,
        format!("apiVersion: dbpolicy.dev/v1alpha1\nkind: DatabasePolicy\nmetadata: {{name: engine, namespace: bench}}\nspec:\n{spec}").as_bytes(),
    )?;
    let python = schemainspect_python();
    let (mut ours, mut floor, mut inspect) = (Vec::new(), Vec::new(), Vec::new());
    let mut load = (f64::MAX, 0.0f64);
    for _ in 0..runs {
        let now = load_average();
        load = (load.0.min(now), load.1.max(now));
        ours.push(timed(
            std::process::Command::new(&bin)
                .args(["plan", "-f"])
                .arg(file.path())
                .env("DATABASE_URL", url)
                .env_remove("RUST_LOG"),
            0,
        )?);
        floor.push(timed(
            std::process::Command::new("psql").args([
                url,
                "-X",
                "-q",
                "-At",
                "-o",
                "/dev/null",
                "-c",
                FLOOR_SQL,
            ]),
            0,
        )?);
        if let Some(python) = &python {
            inspect.push(timed(
                std::process::Command::new(python)
                    .args(["-c", SCHEMAINSPECT_PY])
                    .arg(url.replacen("postgres://", "postgresql+psycopg2://", 1)),
                0,
            )?);
        }
    }
    Ok(Processes {
        dbpolicy: median(ours),
        floor: median(floor),
        schemainspect: (!inspect.is_empty()).then(|| median(inspect)),
        load,
    })
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
    let processes = if tables >= 1_000 {
        Some(processes(url, tables, 5)?)
    } else {
        None
    };
    Ok(SizeResult {
        tables,
        apply,
        applied: report.applied.len(),
        noop: median(times),
        trips: per_run,
        select1,
        breakdown,
        processes,
    })
}

const FLAG_COUNTS: [usize; 2] = [10_000, 100_000];

/// The feature flags no-op at 10k and 100k flags: (flags, median no-op plan).
async fn bench_flags(admin: &mut PgConnection, admin_url: &str) -> Res<Vec<(usize, Duration)>> {
    let mut out = Vec::new();
    for n in FLAG_COUNTS {
        let db = format!("dbpolicy_bench_flags_{}_{n}", std::process::id());
        create_db(admin, &db).await?;
        let url = dbpolicy::pg::url_with_database(admin_url, &db);
        let result = async {
            let mut conn = dbpolicy::pg::connect_one(&url).await?;
            let flags = |n: usize| {
                let mut y = String::from(
                    "database: {connectionSecretRef: {name: bench}}\nfeatureFlags:\n  flags:\n",
                );
                for i in 0..n {
                    y.push_str(&format!("    - {{name: f{i:06}, enabled: true}}\n"));
                }
                serde_yaml::from_str::<DatabasePolicySpec>(&y)
            };
            let policy = PolicyId("bench/flags".into());
            // The table, function and ownership by one apply; the rows in one statement
            // (a hundred thousand upserts would only measure the apply).
            engine::run(&mut conn, &flags(1)?, Mode::Apply, &policy).await?;
            sqlx::raw_sql(&format!(
                "INSERT INTO public.feature_flags (name, enabled, rollout_percentage)
                 SELECT 'f' || lpad(i::text, 6, '0'), true, 100 FROM generate_series(0, {}) AS i
                 ON CONFLICT DO NOTHING",
                n - 1
            ))
            .execute(&mut conn)
            .await?;
            let spec = flags(n)?;
            let mut times = Vec::new();
            for _ in 0..3 {
                let start = Instant::now();
                let outcome = engine::run(&mut conn, &spec, Mode::Plan, &policy).await?;
                times.push(start.elapsed());
                anyhow::ensure!(
                    outcome.plan.is_empty(),
                    "{n} flags: the plan is not empty:\n{}",
                    outcome
                        .plan
                        .render_sql()
                        .lines()
                        .take(5)
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
            conn.close().await?;
            Ok(median(times))
        }
        .await;
        drop_db(admin, &db).await;
        let took = result?;
        eprintln!("  {n} flags: no-op {took:.1?}");
        out.push((n, took));
    }
    Ok(out)
}

const PARENT_COUNTS: [usize; 2] = [100, 1_000];

/// The partitions no-op at 100 and 1,000 partitioned parents (monthly, premake 2, a
/// default partition: 4 partitions each): (parents, median no-op plan).
async fn bench_parents(admin: &mut PgConnection, admin_url: &str) -> Res<Vec<(usize, Duration)>> {
    let mut out = Vec::new();
    for n in PARENT_COUNTS {
        let db = format!("dbpolicy_bench_parents_{}_{n}", std::process::id());
        create_db(admin, &db).await?;
        let url = dbpolicy::pg::url_with_database(admin_url, &db);
        let result = async {
            let mut conn = dbpolicy::pg::connect_one(&url).await?;
            let mut ddl = String::new();
            let mut yaml = String::from(
                "database: {connectionSecretRef: {name: bench}}\npartitions:\n  tables:\n",
            );
            for i in 0..n {
                ddl.push_str(&format!(
                    "CREATE TABLE p{i:04} (id bigint, at timestamptz NOT NULL) PARTITION BY RANGE (at);\n"
                ));
                yaml.push_str(&format!(
                    "    - {{table: p{i:04}, interval: Monthly, premake: 2}}\n"
                ));
            }
            sqlx::raw_sql(&ddl).execute(&mut conn).await?;
            let spec: DatabasePolicySpec = serde_yaml::from_str(&yaml)?;
            let policy = PolicyId("bench/parents".into());
            engine::run_with_second(&mut conn, &url, &spec, Mode::Apply, &policy).await?;
            let mut times = Vec::new();
            for _ in 0..3 {
                let start = Instant::now();
                let outcome = engine::run(&mut conn, &spec, Mode::Plan, &policy).await?;
                times.push(start.elapsed());
                anyhow::ensure!(
                    outcome.plan.is_empty(),
                    "{n} parents: the plan is not empty"
                );
            }
            conn.close().await?;
            Ok(median(times))
        }
        .await;
        drop_db(admin, &db).await;
        let took = result?;
        eprintln!("  {n} partitioned parents: no-op {took:.1?}");
        out.push((n, took));
    }
    Ok(out)
}

/// A no-op plan's time against the size of one area, each size beside the smallest.
fn print_linearity(title: &str, unit: &str, rows: &Res<Vec<(usize, Duration)>>, target: &str) {
    match rows {
        Ok(rows) => {
            println!("{title}");
            println!();
            println!("| {unit} | no-op plan | × the smallest |");
            println!("|---:|---:|---:|");
            for (n, took) in rows {
                println!(
                    "| {n} | {:.1} ms | {:.1} |",
                    took.as_secs_f64() * 1000.0,
                    took.as_secs_f64() / rows[0].1.as_secs_f64()
                );
            }
            println!("{target}");
        }
        Err(e) => println!("{unit} FAILED: {e:#}"),
    }
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
    eprintln!("feature flags:");
    let flags = bench_flags(&mut admin, &admin_url).await;
    eprintln!("partitioned parents:");
    let parents = bench_parents(&mut admin, &admin_url).await;
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
    println!("Whole processes on the same database, paired runs (dbpolicy, floor, schemainspect in turn), median of 5: `dbpolicy plan` with the row-level security and autovacuum sections, nothing to change (it observes on two connections at once, the floor reads on one); the catalog floor: one `psql` read of every policy expression (`pg_get_expr`) and every table's reloptions; schemainspect (PyPI) inspecting the database.");
    println!();
    println!("| tables | `dbpolicy plan`, no change | catalog floor (`psql`) | ratio (target ≤ 1.5) | schemainspect | ratio (target ≤ 0.33) | load average |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for r in &ok {
        if let Some(p) = &r.processes {
            let (inspect, ratio) = match p.schemainspect {
                Some(t) => (
                    format!("{:.0} ms", t.as_secs_f64() * 1000.0),
                    format!("{:.2}", p.dbpolicy.as_secs_f64() / t.as_secs_f64()),
                ),
                None => ("not installed".into(), "".into()),
            };
            println!(
                "| {} | {:.0} ms | {:.0} ms | {:.2} | {inspect} | {ratio} | {:.1}–{:.1} |",
                r.tables,
                p.dbpolicy.as_secs_f64() * 1000.0,
                p.floor.as_secs_f64() * 1000.0,
                p.dbpolicy.as_secs_f64() / p.floor.as_secs_f64(),
                p.load.0,
                p.load.1,
            );
        }
    }
    if schemainspect_python().is_none() {
        println!("\nschemainspect: not found; install it with `python3 -m venv ~/.cache/dbpolicy-bench/venv && ~/.cache/dbpolicy-bench/venv/bin/pip install schemainspect sqlbag psycopg2-binary`, or set DBPOLICY_BENCH_SCHEMAINSPECT to a Python that has it");
    }
    println!();
    print_linearity(
        "Feature flags, no-op plan (in process, median of 3) against the number of flags:",
        "flags",
        &flags,
        "(target: 100,000 flags within 12× the time of 10,000)",
    );
    println!();
    print_linearity(
        "Partitions, no-op plan (in process, median of 3) against the number of partitioned parents (monthly, 4 partitions each):",
        "partitioned parents",
        &parents,
        "(linear: 1,000 parents within 12× the time of 100)",
    );
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
    if !constant || results.iter().any(|r| r.is_err()) || flags.is_err() {
        std::process::exit(1);
    }
    Ok(())
}
