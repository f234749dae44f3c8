//! Benchmark of partition maintenance: dbpolicy against pg_partman's `run_maintenance()`,
//! in one run on the same server, on identical copies of 100 partitioned tables (daily,
//! premake 7, retention 30 days detaching, 60 days of history with rows).
//!
//!     cargo run --release --example bench_partitions
//!
//! `DBPOLICY_BENCH_ADMIN_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`) is a
//! superuser URL of the server; a scratch database is created there and dropped at the
//! end. pg_partman comes from Debian's `postgresql-<major>-partman` (hack/install-deps.sh);
//! without it only dbpolicy is measured and the run says so. Results: docs/partitions.md.

use std::time::{Duration, Instant};

use chrono::{Duration as Days, Utc};
use sqlx::{Connection, PgConnection};

use dbpolicy::api::{DatabasePolicySpec, Mode};
use dbpolicy::engine::{self, areas::partitions, PolicyId};

const TABLES: usize = 100;
const HISTORY_DAYS: i64 = 60;
const ROWS_PER_DAY: i64 = 24;
const NOOP_ROUNDS: usize = 5;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn spec(
    schema: &str,
    premake: u32,
    retention: Option<&str>,
    start: Option<&str>,
) -> DatabasePolicySpec {
    let mut yaml = String::from("database: {connectionSecretRef: {name: db}}\nsafety: {statementTimeout: 10m}\npartitions:\n  tables:\n");
    for i in 1..=TABLES {
        yaml.push_str(&format!(
            "    - {{schema: {schema}, table: t{i:03}, interval: Daily, premake: {premake}"
        ));
        if let Some(r) = retention {
            yaml.push_str(&format!(", retention: {r}"));
        }
        if let Some(s) = start {
            yaml.push_str(&format!(", startDate: '{s}'"));
        }
        yaml.push_str("}\n");
    }
    serde_yaml::from_str(&yaml).expect("benchmark spec")
}

/// One `dbpolicy apply` of `spec`, as the CLI runs it: with a second connection to the
/// database (`url`), opened when the plan has tables to maintain on it beside the first.
async fn ours(
    conn: &mut PgConnection,
    url: &str,
    spec: &DatabasePolicySpec,
) -> Res<(Duration, usize)> {
    let start = Instant::now();
    let outcome =
        engine::run_with_second(conn, url, spec, Mode::Apply, &PolicyId("bench/ours".into()))
            .await?;
    let took = start.elapsed();
    if let Some(e) = outcome.plan.errors().next() {
        return Err(format!("dbpolicy plan error: {e}").into());
    }
    let report = outcome.report.ok_or("nothing applied")?;
    if let Some(f) = report.failure {
        return Err(format!("dbpolicy apply failed: {f}").into());
    }
    Ok((took, report.applied.len()))
}

/// Time of `run_maintenance()` and the PL/pgSQL function calls it made.
async fn theirs(conn: &mut PgConnection) -> Res<(Duration, i64)> {
    let mut tx = conn.begin().await?;
    sqlx::raw_sql("SET LOCAL track_functions = 'pl'")
        .execute(&mut *tx)
        .await?;
    let start = Instant::now();
    sqlx::raw_sql("SELECT partman.run_maintenance(p_analyze := false, p_jobmon := false)")
        .execute(&mut *tx)
        .await?;
    let took = start.elapsed();
    let calls: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(calls), 0)::int8 FROM pg_stat_xact_user_functions WHERE schemaname = 'partman'",
    )
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok((took, calls))
}

async fn partitions_per_table(conn: &mut PgConnection, schema: &str) -> Res<(i64, i64)> {
    Ok(sqlx::query_as(
        "SELECT min(n), max(n) FROM (SELECT count(*) AS n FROM pg_inherits i
           JOIN pg_class p ON p.oid = i.inhparent JOIN pg_namespace s ON s.oid = p.relnamespace
          WHERE s.nspname = $1 AND p.relkind = 'p' GROUP BY p.oid) x",
    )
    .bind(schema)
    .fetch_one(&mut *conn)
    .await?)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> Res<()> {
    let admin_url = std::env::var("DBPOLICY_BENCH_ADMIN_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let mut admin = PgConnection::connect(&admin_url).await?;
    let version: String = sqlx::query_scalar("SELECT current_setting('server_version')")
        .fetch_one(&mut admin)
        .await?;
    let partman: Option<String> = sqlx::query_scalar(
        "SELECT default_version FROM pg_available_extensions WHERE name = 'pg_partman'",
    )
    .fetch_optional(&mut admin)
    .await?;
    if partman.is_none() {
        let major = version.split('.').next().unwrap_or("<major>");
        eprintln!(
            "pg_partman is NOT installed on this server, so there is nothing to compare with: \
             install it with hack/install-deps.sh (Debian: apt-get install postgresql-{major}-partman) \
             and run again. Measuring dbpolicy alone."
        );
    }
    let db = format!("dbpolicy_bench_{}", std::process::id());
    sqlx::raw_sql(&format!("CREATE DATABASE {db} TEMPLATE template0"))
        .execute(&mut admin)
        .await?;
    let url = dbpolicy::pg::url_with_database(&admin_url, &db);
    let result = bench(&url, partman.as_deref(), &version).await;
    if std::env::var_os("DBPOLICY_BENCH_KEEP").is_some() {
        eprintln!("DBPOLICY_BENCH_KEEP: kept database {db}");
    } else {
        let _ = sqlx::raw_sql(&format!("DROP DATABASE {db} WITH (FORCE)"))
            .execute(&mut admin)
            .await;
    }
    result
}

async fn bench(url: &str, partman: Option<&str>, version: &str) -> Res<()> {
    let mut conn = PgConnection::connect(url).await?;
    let today = Utc::now().date_naive();
    let first_day = today - Days::days(HISTORY_DAYS);
    println!(
        "PostgreSQL {version}, pg_partman {}; {TABLES} tables, daily, premake 7, retention 30 days (detach), \
         {HISTORY_DAYS} days of history, {ROWS_PER_DAY} rows a day per table",
        partman.unwrap_or("not installed")
    );

    println!(
        "dbpolicy runs as the CLI does: a second connection maintains half the tables beside the first"
    );
    eprintln!("setting up {TABLES} tables per copy…");
    let mut ddl = String::from("CREATE SCHEMA ours; CREATE SCHEMA theirs;\n");
    for schema in ["ours", "theirs"] {
        for i in 1..=TABLES {
            ddl.push_str(&format!(
                "CREATE TABLE {schema}.t{i:03} (id bigint GENERATED ALWAYS AS IDENTITY, created_at timestamptz NOT NULL, payload text) PARTITION BY RANGE (created_at);
                 CREATE INDEX ON {schema}.t{i:03} (created_at);\n"
            ));
        }
    }
    sqlx::raw_sql(&ddl).execute(&mut conn).await?;

    // History for ours: partitions from 60 days ago to today and a default (by dbpolicy
    // itself, untimed).
    let setup = spec("ours", 0, None, Some(&first_day.to_string()));
    ours(&mut conn, url, &setup).await?;
    if partman.is_some() {
        // The same history for pg_partman: create_parent from 60 days ago with premake 7,
        // then the future partitions removed so its first maintenance has them to create.
        sqlx::raw_sql("CREATE SCHEMA partman; CREATE EXTENSION pg_partman SCHEMA partman")
            .execute(&mut conn)
            .await?;
        for i in 1..=TABLES {
            sqlx::query(
                "SELECT partman.create_parent($1, 'created_at', 'native', 'daily', p_premake := 7,
                        p_start_partition := $2, p_jobmon := false)",
            )
            .bind(format!("theirs.t{i:03}"))
            .bind(first_day.to_string())
            .execute(&mut conn)
            .await?;
            let mut drop = String::new();
            for d in 1..=8 {
                let day = today + Days::days(d);
                drop.push_str(&format!(
                    "DROP TABLE IF EXISTS theirs.t{i:03}_p{};",
                    day.format("%Y_%m_%d")
                ));
            }
            sqlx::raw_sql(&drop).execute(&mut conn).await?;
        }
        sqlx::raw_sql(
            "UPDATE partman.part_config SET premake = 7, retention = '30 days', retention_keep_table = true,
                    infinite_time_partitions = true",
        )
        .execute(&mut conn)
        .await?;
    }
    // One table a transaction: all of them in one would lock every partition of both
    // copies at once (12,000+ locks, past the default lock table of 64 x 100 slots).
    for schema in ["ours", "theirs"]
        .iter()
        .take(if partman.is_some() { 2 } else { 1 })
    {
        for i in 1..=TABLES {
            let rows = format!(
                "INSERT INTO {schema}.t{i:03} (created_at, payload)
                 SELECT '{first_day}'::timestamptz + g * interval '1 day' / {ROWS_PER_DAY}, 'row ' || g
                 FROM generate_series(0, {}) g",
                (HISTORY_DAYS + 1) * ROWS_PER_DAY - 1
            );
            sqlx::raw_sql(&rows).execute(&mut conn).await?;
        }
    }
    sqlx::raw_sql("ANALYZE").execute(&mut conn).await?;
    let (lo, hi) = partitions_per_table(&mut conn, "ours").await?;
    println!("before: ours {lo}..{hi} partitions per table (incl. default)");
    if partman.is_some() {
        let (lo, hi) = partitions_per_table(&mut conn, "theirs").await?;
        println!("before: pg_partman {lo}..{hi} partitions per table (incl. default)");
    }

    // Catalog round trips of our observer: the same for 1 table as for 100.
    let maintain = spec("ours", 7, Some("30d"), None);
    let one = {
        let mut s = maintain.partitions.clone().unwrap();
        s.tables.truncate(1);
        partitions::observe(&mut conn, &s, Utc::now())
            .await?
            .queries
    };
    let started = Instant::now();
    let all = partitions::observe(&mut conn, maintain.partitions.as_ref().unwrap(), Utc::now())
        .await?
        .queries;
    eprintln!(
        "(observe of {TABLES} tables before maintenance: {:.1} ms)",
        ms(started.elapsed())
    );

    // First maintenance: dbpolicy, then pg_partman.
    let (ours_first, changes) = ours(&mut conn, url, &maintain).await?;
    println!(
        "dbpolicy first maintenance: {:.1} ms ({changes} statements applied)",
        ms(ours_first)
    );
    let theirs_first = if partman.is_some() {
        let (t, calls) = theirs(&mut conn).await?;
        println!(
            "pg_partman first maintenance: {:.1} ms ({calls} PL/pgSQL function calls)",
            ms(t)
        );
        Some((t, calls))
    } else {
        None
    };
    let (lo, hi) = partitions_per_table(&mut conn, "ours").await?;
    println!("after: ours {lo}..{hi} partitions per table (incl. default)");
    if partman.is_some() {
        let (lo, hi) = partitions_per_table(&mut conn, "theirs").await?;
        println!("after: pg_partman {lo}..{hi} partitions per table (incl. default)");
    }

    // No-op maintenance, alternating, median of several rounds.
    let mut ours_noop = Vec::new();
    let mut theirs_noop = Vec::new();
    let mut noop_calls = 0;
    for _ in 0..NOOP_ROUNDS {
        let (t, n) = ours(&mut conn, url, &maintain).await?;
        if n != 0 {
            return Err(format!(
                "dbpolicy's second run applied {n} change(s): it did not converge"
            )
            .into());
        }
        ours_noop.push(t);
        if partman.is_some() {
            let (t, calls) = theirs(&mut conn).await?;
            theirs_noop.push(t);
            noop_calls = calls;
        }
    }
    let ours_noop = median(ours_noop);
    println!(
        "dbpolicy no-op maintenance: {:.1} ms (median of {NOOP_ROUNDS})",
        ms(ours_noop)
    );
    println!(
        "dbpolicy catalog queries per maintenance: {one} for 1 table, {all} for {TABLES} tables"
    );
    if let Some((theirs_first, calls)) = theirs_first {
        let theirs_noop = median(theirs_noop);
        println!("pg_partman no-op maintenance: {:.1} ms (median of {NOOP_ROUNDS}; {noop_calls} PL/pgSQL function calls)", ms(theirs_noop));
        let r1 = ms(ours_first) / ms(theirs_first);
        let r2 = ms(ours_noop) / ms(theirs_noop);
        println!();
        println!("| maintenance | dbpolicy | pg_partman | ratio ours/pg_partman |");
        println!("|---|---|---|---|");
        println!(
            "| first (create 7 ahead, detach 30 old, per table) | {:.0} ms | {:.0} ms | {r1:.2} |",
            ms(ours_first),
            ms(theirs_first)
        );
        println!(
            "| no-op | {:.0} ms | {:.0} ms | {r2:.2} |",
            ms(ours_noop),
            ms(theirs_noop)
        );
        println!(
            "| catalog round trips | {all} (constant) | {calls} PL/pgSQL calls (per table) | |"
        );
        let verdict = if r1 <= 0.4 && r2 <= 0.5 {
            "met"
        } else {
            "NOT met"
        };
        println!(
            "\ntarget (first maintenance at most 0.4 of pg_partman's, no-op at most half): {verdict}"
        );
    }
    conn.close().await?;
    Ok(())
}
