//! Killed runs and concurrent runs, with the real `dbpolicy` binary against real
//! PostgreSQL: applies killed (SIGKILL) at random moments of a mixed plan are finished by
//! the next apply, and simultaneous applies wait for each other instead of deadlocking.
//! See docs/faults.md ("Crashes and concurrent runs").

use dbpolicy_test_support as support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use support::{
    cli, dbpolicy_cmd, expect_code, policy, quote_ident, spawn_apply, write_policy, PgServer,
    RunOutput, TestDb,
};

/// A table big enough that each concurrent build takes a noticeable moment, so a kill
/// often lands inside one.
const BIG: &str = "CREATE TABLE big (a int, b int, c text);
INSERT INTO big SELECT g, g % 1000, md5(g::text) FROM generate_series(1, 150000) g;
ANALYZE big";

/// For simultaneous runs: big enough that the builds overlap with the other runs' waits.
const SMALL: &str = "CREATE TABLE small (a int, b int, c text);
INSERT INTO small SELECT g, g % 1000, md5(g::text) FROM generate_series(1, 20000) g";

/// SplitMix64: a small seeded generator, so a failing run can be replayed from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// `DBPOLICY_CRASH_SEED` replays a run; otherwise a new seed, printed.
fn seed() -> u64 {
    match std::env::var("DBPOLICY_CRASH_SEED") {
        Ok(s) => s.parse().expect("DBPOLICY_CRASH_SEED is a number"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    }
}

/// How many changes `dbpolicy apply` said it applied.
fn applied(out: &RunOutput) -> usize {
    out.stdout
        .lines()
        .find_map(|l| {
            l.strip_prefix("# applied ")?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn simultaneous_applies_wait_for_each_other_and_never_deadlock() {
    let db = TestDb::new().await;
    db.exec(SMALL).await;
    let yaml = policy(
        "concurrent",
        "  indexes:\n    indexes:\n      - {name: small_a, table: small, columns: [a]}\n      - {name: small_ba, table: small, columns: [b, a]}\n      - {name: small_c, table: small, columns: [c]}\n",
    );
    for runs in [2, 4] {
        for trial in 0..10 {
            db.exec("DROP INDEX IF EXISTS small_a, small_ba, small_c; DROP SCHEMA IF EXISTS dbpolicy CASCADE")
                .await;
            let started = Instant::now();
            let handles: Vec<_> = (0..runs)
                .map(|_| spawn_apply(&yaml, db.url(), Duration::from_secs(120)))
                .collect();
            let mut outputs = Vec::new();
            for h in handles {
                outputs.push(h.await.unwrap());
            }
            let context = || {
                outputs
                    .iter()
                    .map(|o| format!("exit {}\n{}{}", o.code, o.stdout, o.stderr))
                    .collect::<Vec<_>>()
                    .join("\n---\n")
            };
            assert!(
                outputs.iter().all(|o| o.code == 0),
                "{runs} runs, trial {trial}: every run exits 0\n{}",
                context()
            );
            // One run built the three indexes; the others found nothing left to do.
            assert_eq!(
                outputs.iter().map(applied).sum::<usize>(),
                3,
                "{runs} runs, trial {trial}\n{}",
                context()
            );
            let plan = cli("plan", db.url(), &yaml);
            expect_code(&plan, 0);
            eprintln!(
                "{runs} simultaneous applies, trial {trial}: converged in {:?}",
                started.elapsed()
            );
        }
    }
}

/// Two versions of one mixed policy: every area changes between them, so each trial has a
/// full plan (settings, partitions created and retired, RLS, an index replaced and one
/// created).
fn mixed(version: usize) -> String {
    let (work_mem, owner, columns) = [("8MB", 1, "a"), ("12MB", 2, "a, b")][version % 2];
    policy(
        "crash",
        &format!(
            "  serverSettings:\n    parameters: {{work_mem: {work_mem}}}\n  \
             partitions:\n    tables:\n      \
             - {{table: events, interval: Monthly, premake: 3, retention: 12mo}}\n      \
             - {{table: logs, interval: Monthly, premake: 2, retention: 12mo, defaultPartition: false}}\n  \
             rowLevelSecurity:\n    tables: [{{table: accounts, policies: [{{name: own, using: \"owner = {owner}\"}}]}}]\n  \
             indexes:\n    indexes:\n      \
             - {{name: big_ab, table: big, columns: [{columns}]}}\n      \
             - {{name: big_c, table: big, columns: [c]}}\n"
        ),
    )
}

/// Puts back what every trial changes: partitioned tables with one partition past the
/// retention (`logs` has no default partition, so it is detached CONCURRENTLY), and no
/// `big_c`. `check_client` makes the database's sessions notice a dead client within
/// 10 ms and abort their statement (leaving an invalid index or a pending detach) instead
/// of finishing it.
async fn reset(db: &TestDb, check_client: bool) {
    db.exec(
        "DROP TABLE IF EXISTS events, logs, events_2020_01, logs_2020_01 CASCADE;
         CREATE TABLE events (id bigint, at timestamptz NOT NULL) PARTITION BY RANGE (at);
         CREATE TABLE events_2020_01 PARTITION OF events FOR VALUES FROM ('2020-01-01') TO ('2020-02-01');
         CREATE TABLE logs (id bigint, at timestamptz NOT NULL) PARTITION BY RANGE (at);
         CREATE TABLE logs_2020_01 PARTITION OF logs FOR VALUES FROM ('2020-01-01') TO ('2020-02-01');
         DROP INDEX IF EXISTS big_c",
    )
    .await;
    let db_name = quote_ident(db.name());
    db.exec(&if check_client {
        format!("ALTER DATABASE {db_name} SET client_connection_check_interval = 10")
    } else {
        format!("ALTER DATABASE {db_name} RESET client_connection_check_interval")
    })
    .await;
}

/// How a killed run ended.
enum Ending {
    /// Finished before the kill, with this exit code.
    Finished(Option<i32>),
    /// Killed while its session was doing this (`pg_stat_activity`: state and query).
    Killed(String),
}

/// `dbpolicy apply`, killed with SIGKILL after `delay` unless it finished first.
async fn apply_killed_after(db: &TestDb, yaml: &str, delay: Duration) -> Ending {
    let file = write_policy(yaml);
    let mut cmd = dbpolicy_cmd();
    cmd.args(["apply", "-f", file.path().to_str().unwrap()])
        .env("DATABASE_URL", db.url())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = tokio::process::Command::from(cmd)
        .kill_on_drop(true)
        .spawn()
        .expect("start dbpolicy");
    // The fault itself: the moment of the kill, not a wait for something.
    match tokio::time::timeout(delay, child.wait()).await {
        Ok(status) => Ending::Finished(status.expect("dbpolicy status").code()),
        Err(_) => {
            let doing = db
                .query_column::<String>(&format!(
                    // A backend still starting up has no state yet (NULL).
                    "SELECT coalesce(state, 'starting') || ': ' || left(regexp_replace(coalesce(query, ''), '\\s+', ' ', 'g'), 50)
                       FROM pg_stat_activity WHERE application_name = 'dbpolicy' AND datname = '{}'",
                    db.name()
                ))
                .await
                .join("; ");
            child.start_kill().expect("kill dbpolicy");
            child.wait().await.expect("reap dbpolicy");
            Ending::Killed(doing)
        }
    }
}

/// What must hold once an apply after a crash has succeeded, beyond an empty plan.
async fn check_finished(db: &TestDb, version: usize) -> Result<(), String> {
    let leftovers = db
        .query_column::<String>(
            "SELECT c.relname::text FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
              WHERE c.relname LIKE '%dbpolicy_new' OR NOT i.indisvalid",
        )
        .await;
    if !leftovers.is_empty() {
        return Err(format!("invalid or temporary indexes left: {leftovers:?}"));
    }
    let ledger = db
        .query_column::<String>(
            "SELECT target || ' ' || item FROM dbpolicy.managed WHERE area = 'indexes' ORDER BY 1",
        )
        .await;
    if ledger != ["public.big_ab index", "public.big_c index"] {
        return Err(format!(
            "the indexes are owned, no intent is left: {ledger:?}"
        ));
    }
    let want = ["(a)", "(a, b)"][version % 2];
    let def = db
        .query_scalar::<String>("SELECT pg_get_indexdef('big_ab'::regclass)")
        .await;
    if !def.ends_with(want) {
        return Err(format!("big_ab: {def}"));
    }
    let pending = db
        .query_scalar::<i64>(
            "SELECT count(*) FROM pg_inherits WHERE (to_jsonb(pg_inherits) ->> 'inhdetachpending')::bool",
        )
        .await;
    let retired = db
        .query_scalar::<i64>(
            "SELECT count(*) FROM pg_inherits WHERE inhrelid IN ('events_2020_01'::regclass, 'logs_2020_01'::regclass)",
        )
        .await;
    if pending != 0 || retired != 0 {
        return Err(format!(
            "{pending} detach(es) pending, {retired} partition(s) past retention attached"
        ));
    }
    let written = db
        .query_scalar::<String>(
            "SELECT setting FROM pg_file_settings WHERE name = 'work_mem' AND sourcefile LIKE '%postgresql.auto.conf' AND applied",
        )
        .await;
    if written != ["8MB", "12MB"][version % 2] {
        return Err(format!("work_mem written: {written}"));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn applies_killed_at_random_moments_are_finished_by_the_next_apply() {
    const TRIALS: usize = 20;
    // serverSettings changes the whole server: a throwaway one.
    let server = PgServer::start();
    let db = TestDb::on(&server).await;
    db.exec(BIG).await;
    db.exec("CREATE TABLE accounts (id int, owner int)").await;
    let seed = seed();
    eprintln!("seed {seed} (DBPOLICY_CRASH_SEED={seed} replays this run)");
    let mut rng = Rng(seed);

    // An uninterrupted apply sets the scale of the kill moments.
    reset(&db, false).await;
    let started = Instant::now();
    expect_code(&cli("apply", db.url(), &mixed(0)), 0);
    let full = started.elapsed();
    eprintln!("an uninterrupted apply takes {full:?}");

    let total = Instant::now();
    for trial in 1..=TRIALS {
        let version = trial % 2;
        let yaml = mixed(version);
        let check_client = rng.below(2) == 0;
        reset(&db, check_client).await;
        let delay = Duration::from_millis(rng.below(full.as_millis() as u64));
        let first = apply_killed_after(&db, &yaml, delay).await;
        let recovery = cli("apply", db.url(), &yaml);
        let plan = cli("plan", db.url(), &yaml);
        let ending = match &first {
            Ending::Killed(doing) => format!("killed during [{doing}]"),
            Ending::Finished(code) => format!("finished first, exit {code:?}"),
        };
        let context = format!(
            "seed {seed}, trial {trial}: after {delay:?}, {ending}, check_client {check_client}\n\
             --- the apply after it (exit {})\n{}{}\n--- plan (exit {})\n{}{}",
            recovery.code, recovery.stdout, recovery.stderr, plan.code, plan.stdout, plan.stderr
        );
        assert_eq!(recovery.code, 0, "{context}");
        assert!(
            plan.code == 0 && plan.stdout.contains("nothing to change"),
            "{context}"
        );
        if let Err(e) = check_finished(&db, version).await {
            panic!("{e}\n{context}");
        }
        eprintln!(
            "trial {trial}: after {delay:?}, {ending}, check_client {check_client}; the next apply applied {}",
            applied(&recovery)
        );
    }
    eprintln!("{TRIALS} trials in {:?}", total.elapsed());
}
