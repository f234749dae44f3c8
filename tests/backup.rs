//! `dbpolicy backup run | list | verify | prune` for real: a real PostgreSQL (the harness's
//! shared server, one database per test), the real pg_dump / pg_restore, a local
//! directory store, and an S3-compatible store served by moto (`moto_server`, installed
//! from PyPI by hack/install-deps.sh).

use dbpolicy_test_support as support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::moto::Moto;
use support::{dbpolicy_cmd, expect_code, RunOutput, TestDb};

const SCHEMA: &str = "
CREATE TABLE users (id int PRIMARY KEY, email text NOT NULL);
INSERT INTO users SELECT g, 'user' || g || '@example.com' FROM generate_series(1, 500) g;
CREATE TABLE audit_logs (id bigint, at date NOT NULL, msg text) PARTITION BY RANGE (at);
CREATE TABLE audit_logs_2026_10 PARTITION OF audit_logs FOR VALUES FROM ('2026-10-01') TO ('2026-11-01');
CREATE TABLE audit_logs_2026_11 PARTITION OF audit_logs FOR VALUES FROM ('2026-11-01') TO ('2026-12-01');
INSERT INTO audit_logs SELECT g, date '2026-10-01' + (g % 30), 'm' || g FROM generate_series(1, 300) g;
CREATE SCHEMA \"Quiz Data\";
CREATE TABLE \"Quiz Data\".\"Odd \"\"Name\" (x int);
INSERT INTO \"Quiz Data\".\"Odd \"\"Name\" VALUES (1), (2), (3);
CREATE TABLE empty_table (x int);
CREATE MATERIALIZED VIEW user_count AS SELECT count(*) AS n FROM users;
";

/// `dbpolicy <args>` with `DATABASE_URL=url` and extra environment.
fn dbp(args: &[&str], url: Option<&str>, env: &[(&str, &str)]) -> RunOutput {
    let mut cmd = dbpolicy_cmd();
    cmd.args(args);
    if let Some(url) = url {
        cmd.env("DATABASE_URL", url);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("could not run {cmd:?}: {e}"));
    RunOutput {
        code: out
            .status
            .code()
            .unwrap_or_else(|| panic!("{cmd:?} was killed: {}", out.status)),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn dir_args(dir: &Path) -> Vec<String> {
    vec!["--dir".into(), dir.to_str().unwrap().into()]
}

fn with(base: &[&str], extra: &[String]) -> Vec<String> {
    base.iter()
        .map(|s| s.to_string())
        .chain(extra.iter().cloned())
        .collect()
}

fn run_args(args: &[String], url: Option<&str>, env: &[(&str, &str)]) -> RunOutput {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    dbp(&refs, url, env)
}

/// `backup list -o json`, parsed.
fn list_json(store: &[String], env: &[(&str, &str)]) -> Value {
    let out = run_args(&with(&["backup", "list", "-o", "json"], store), None, env);
    expect_code(&out, 0);
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("list output is not JSON ({e}):\n{}", out.stdout))
}

fn backup_ids(listing: &Value) -> Vec<String> {
    listing["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect()
}

/// The scratch database a verify run announced on stderr.
fn scratch_of(out: &RunOutput) -> String {
    let line = out
        .stderr
        .lines()
        .find(|l| l.contains("scratch database"))
        .unwrap_or_else(|| panic!("no scratch database announced:\n{}", out.stderr));
    line.split_whitespace()
        .find(|w| w.starts_with("dbpolicy_verify_"))
        .unwrap()
        .to_string()
}

async fn assert_dropped(db: &TestDb, scratch: &str) {
    let n: i64 = db
        .query_scalar(&format!(
            "SELECT count(*) FROM pg_database WHERE datname = '{scratch}'"
        ))
        .await;
    assert_eq!(n, 0, "scratch database {scratch} was left behind");
}

fn dump_path(dir: &Path, db: &TestDb, id: &str) -> PathBuf {
    dir.join(db.name()).join(format!("{id}.dump"))
}

#[tokio::test]
async fn run_list_verify_prune_with_a_local_directory() {
    let db = TestDb::new().await;
    db.exec(SCHEMA).await;
    let tmp = tempfile::tempdir().unwrap();
    let store = dir_args(&tmp.path().join("backups"));

    let term = tmp.path().join("termination-log");
    let term_env = [("DBPOLICY_TERMINATION_LOG", term.to_str().unwrap())];
    let mut ids = Vec::new();
    for round in 0..3 {
        let out = run_args(
            &with(&["backup", "run", "--compression", "9"], &store),
            Some(db.url()),
            &term_env,
        );
        expect_code(&out, 0);
        assert!(out.stdout.starts_with("backed up "), "{}", out.stdout);
        assert!(
            out.stderr.contains("backup: dumping database"),
            "progress on stderr: {}",
            out.stderr
        );
        let listing = list_json(&store, &[]);
        ids = backup_ids(&listing);
        assert_eq!(ids.len(), round + 1, "{listing:#}");
        db.exec(&format!(
            "INSERT INTO users VALUES ({}, 'late@example.com')",
            1000 + round
        ))
        .await;
    }

    // The outcome for the controller, in the container's termination message.
    let message: Value = serde_json::from_slice(&fs::read(&term).unwrap()).unwrap();
    assert_eq!(message["result"], "Succeeded", "{message}");
    assert_eq!(message["backup"], ids[2].as_str());
    assert!(message["sizeBytes"].as_u64().unwrap() > 0);

    // The manifest: what was dumped, from where, how big, and row counts at dump time.
    let listing = list_json(&store, &[]);
    let first = &listing["backups"][0];
    let m = &first["manifest"];
    assert_eq!(m["database"], db.name());
    assert_eq!(m["format"], "custom");
    assert_eq!(m["compression"], 9);
    assert!(m["serverVersion"]
        .as_str()
        .unwrap()
        .chars()
        .next()
        .unwrap()
        .is_ascii_digit());
    assert_eq!(m["sha256"].as_str().unwrap().len(), 64);
    let dump = dump_path(&tmp.path().join("backups"), &db, &ids[0]);
    assert_eq!(
        m["sizeBytes"].as_u64().unwrap(),
        fs::metadata(&dump).unwrap().len()
    );
    let rows = |m: &Value, schema: &str, table: &str| -> i64 {
        m["tables"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["schema"] == schema && t["table"] == table)
            .unwrap_or_else(|| panic!("{schema}.{table} not in {m:#}"))["rows"]
            .as_i64()
            .unwrap()
    };
    assert_eq!(rows(m, "public", "users"), 500);
    assert_eq!(rows(m, "public", "audit_logs_2026_10"), 300);
    assert_eq!(rows(m, "Quiz Data", "Odd \"Name"), 3);
    assert_eq!(rows(m, "public", "empty_table"), 0);
    assert_eq!(
        rows(&listing["backups"][2]["manifest"], "public", "users"),
        502
    );
    assert!(listing["leftovers"].as_array().unwrap().is_empty());

    // Text listing for people.
    let out = run_args(&with(&["backup", "list"], &store), None, &[]);
    expect_code(&out, 0);
    assert!(out.stdout.starts_with("DATABASE"), "{}", out.stdout);
    // Never verified yet: each backup says so, none claims to be fine.
    assert_eq!(
        out.stdout
            .lines()
            .filter(|l| l.ends_with("  unverified  -"))
            .count(),
        3,
        "{}",
        out.stdout
    );

    // Verify the newest, then a named older one: both restore and match their manifests,
    // and the scratch databases are gone afterwards.
    let out = run_args(&with(&["backup", "verify"], &store), Some(db.url()), &[]);
    expect_code(&out, 0);
    assert!(
        out.stdout
            .contains(&format!("verified {}/{}", db.name(), ids[2])),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("match the manifest"), "{}", out.stdout);
    assert_dropped(&db, &scratch_of(&out)).await;
    let out = run_args(
        &with(&["backup", "verify", "--backup", &ids[0]], &store),
        Some(db.url()),
        &[],
    );
    expect_code(&out, 0);
    assert!(out.stdout.contains(&ids[0]), "{}", out.stdout);
    assert_dropped(&db, &scratch_of(&out)).await;

    // Prune by count: the oldest goes, manifest and dump alike.
    let out = run_args(
        &with(&["backup", "prune", "--retention-count", "2"], &store),
        None,
        &[],
    );
    expect_code(&out, 0);
    assert!(
        out.stdout
            .contains(&format!("deleted {}/{}", db.name(), ids[0])),
        "{}",
        out.stdout
    );
    assert_eq!(backup_ids(&list_json(&store, &[])), ids[1..]);
    assert!(!dump.exists());

    // Prune by age: make both remaining backups look 40 days old. The older goes; the
    // newest stays although it is past retention too.
    let backups_dir = tmp.path().join("backups").join(db.name());
    for id in &ids[1..] {
        let path = backups_dir.join(format!("{id}.manifest.json"));
        let mut m: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        let old = chrono::DateTime::parse_from_rfc3339(m["finishedAt"].as_str().unwrap()).unwrap()
            - chrono::Duration::days(40);
        m["finishedAt"] = Value::String(old.to_rfc3339());
        fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();
    }
    let out = run_args(
        &with(
            &["backup", "prune", "--retention-days", "30", "--dry-run"],
            &store,
        ),
        None,
        &[],
    );
    expect_code(&out, 0);
    assert!(out.stdout.contains("would delete"), "{}", out.stdout);
    assert_eq!(
        backup_ids(&list_json(&store, &[])).len(),
        2,
        "a dry run deletes nothing"
    );
    let out = run_args(
        &with(&["backup", "prune", "--retention-days", "30"], &store),
        None,
        &[],
    );
    expect_code(&out, 0);
    assert_eq!(backup_ids(&list_json(&store, &[])), [ids[2].clone()]);

    // `run` with retention and --verify: dump, check, prune in one go (the CronJob's call).
    let out = run_args(
        &with(
            &["backup", "run", "--verify", "--retention-count", "1"],
            &store,
        ),
        Some(db.url()),
        &[],
    );
    expect_code(&out, 0);
    assert!(out.stdout.contains("verified"), "{}", out.stdout);
    assert!(
        out.stdout.contains("pruned: 1 backup(s) deleted"),
        "{}",
        out.stdout
    );
    let left = backup_ids(&list_json(&store, &[]));
    assert_eq!(left.len(), 1);
    assert_ne!(left[0], ids[2]);

    // A mistyped directory is an error, not a new empty store.
    let typo = dir_args(&tmp.path().join("backpus"));
    let out = run_args(&with(&["backup", "list"], &typo), None, &[]);
    expect_code(&out, 1);
    assert!(out.stderr.contains("no such directory"), "{}", out.stderr);
    assert!(!tmp.path().join("backpus").exists());

    // Without a retention rule prune refuses, loudly.
    let out = run_args(&with(&["backup", "prune"], &store), None, &[]);
    expect_code(&out, 1);
    assert!(out.stderr.contains("no retention rule"), "{}", out.stderr);
}

#[tokio::test]
async fn verify_fails_loudly_on_corrupted_and_truncated_dumps() {
    let db = TestDb::new().await;
    db.exec(SCHEMA).await;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("backups");
    let store = dir_args(&root);
    let out = run_args(
        &with(&["backup", "run", "--compression", "0"], &store),
        Some(db.url()),
        &[],
    );
    expect_code(&out, 0);
    let id = backup_ids(&list_json(&store, &[]))[0].clone();
    let dump = dump_path(&root, &db, &id);
    let original = fs::read(&dump).unwrap();

    // One flipped byte in the middle: the checksum catches it before any restore.
    let mut corrupted = original.clone();
    let mid = corrupted.len() / 2;
    corrupted[mid] ^= 0xff;
    fs::write(&dump, &corrupted).unwrap();
    let out = run_args(&with(&["backup", "verify"], &store), Some(db.url()), &[]);
    expect_code(&out, 1);
    assert!(
        out.stderr.contains("is corrupt") && out.stderr.contains("SHA-256"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("[BackupCorrupt]"), "{}", out.stderr);
    assert!(
        !out.stderr.contains("scratch database"),
        "no restore of a corrupt dump:\n{}",
        out.stderr
    );

    // Truncated: the size says so; list flags it too.
    fs::write(&dump, &original[..original.len() / 3]).unwrap();
    let out = run_args(
        &with(&["backup", "verify", "--backup", &id], &store),
        Some(db.url()),
        &[],
    );
    expect_code(&out, 1);
    assert!(out.stderr.contains("truncated"), "{}", out.stderr);
    let out = run_args(&with(&["backup", "list"], &store), None, &[]);
    assert!(out.stdout.contains("  incomplete  "), "{}", out.stdout);
    assert!(out.stdout.contains("cut short"), "{}", out.stdout);

    // A truncated dump whose manifest was made to agree: pg_restore itself fails, and the
    // scratch database is dropped anyway.
    let manifest_path = root.join(db.name()).join(format!("{id}.manifest.json"));
    let truncated = &original[..original.len() * 2 / 3];
    fs::write(&dump, truncated).unwrap();
    let mut m: Value = serde_json::from_slice(&fs::read(&manifest_path).unwrap()).unwrap();
    m["sizeBytes"] = truncated.len().into();
    m["sha256"] = sha256_hex(truncated).into();
    fs::write(&manifest_path, serde_json::to_vec(&m).unwrap()).unwrap();
    let out = run_args(&with(&["backup", "verify"], &store), Some(db.url()), &[]);
    expect_code(&out, 1);
    assert!(out.stderr.contains("pg_restore failed"), "{}", out.stderr);
    assert!(out.stderr.contains("[RestoreFailed]"), "{}", out.stderr);
    assert_dropped(&db, &scratch_of(&out)).await;

    // The original bytes verify again.
    fs::write(&dump, &original).unwrap();
    m["sizeBytes"] = original.len().into();
    m["sha256"] = sha256_hex(&original).into();
    fs::write(&manifest_path, serde_json::to_vec(&m).unwrap()).unwrap();
    let out = run_args(&with(&["backup", "verify"], &store), Some(db.url()), &[]);
    expect_code(&out, 0);

    // A manifest whose row counts disagree with the dump: a mismatch, named per table.
    m["tables"][0]["rows"] = 12345.into();
    fs::write(&manifest_path, serde_json::to_vec(&m).unwrap()).unwrap();
    let out = run_args(&with(&["backup", "verify"], &store), Some(db.url()), &[]);
    expect_code(&out, 1);
    assert!(
        out.stderr.contains("differs from its manifest") && out.stderr.contains("12345"),
        "{}",
        out.stderr
    );
    assert_dropped(&db, &scratch_of(&out)).await;
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A fake `pg_dump` (a shell script) that answers `--version` like the real one and
/// otherwise runs `body`.
fn fake_pg_dump(dir: &Path, body: &str) -> PathBuf {
    fake_pg_dump_version(dir, "pg_dump (PostgreSQL) 99.0", body)
}

fn fake_pg_dump_version(dir: &Path, version: &str, body: &str) -> PathBuf {
    let path = dir.join("pg_dump");
    fs::write(
        &path,
        format!(
            "#!/bin/sh\nif [ \"$1\" = --version ]; then echo '{version}'; exit 0; fi\n{body}\n"
        ),
    )
    .unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Every file under `dir`, hidden staging files included.
fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.path().is_dir() {
                out.extend(files_under(&e.path()));
            } else {
                out.push(e.path().display().to_string());
            }
        }
    }
    out
}

#[tokio::test]
async fn failed_and_interrupted_runs_leave_nothing_that_lists_as_a_backup() {
    let db = TestDb::new().await;
    db.exec(SCHEMA).await;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("backups");
    let store = dir_args(&root);

    // A database that does not exist: the connection fails, nothing is written.
    let bad_url = support::url_with_database(db.url(), &format!("{}_missing", db.name()));
    let term = tmp.path().join("termination-log");
    let out = run_args(
        &with(&["backup", "run"], &store),
        Some(&bad_url),
        &[("DBPOLICY_TERMINATION_LOG", term.to_str().unwrap())],
    );
    expect_code(&out, 1);
    let message: Value = serde_json::from_slice(&fs::read(&term).unwrap()).unwrap();
    assert_eq!(message["result"], "Failed", "{message}");
    assert_eq!(message["reason"], "ConnectionFailed", "{message}");
    assert!(
        out.stderr.contains("connect") && out.stderr.contains("backup run"),
        "{}",
        out.stderr
    );
    assert!(files_under(&root).is_empty(), "{:?}", files_under(&root));

    // pg_dump dies half-way through (12 MiB written, more than one upload part): the
    // upload is discarded and the run fails naming pg_dump.
    let fake = fake_pg_dump(
        tmp.path(),
        "head -c 12582912 /dev/zero\necho 'pg_dump: error: simulated failure' >&2\nexit 1",
    );
    let fake_arg = fake.to_str().unwrap().to_string();
    let out = run_args(
        &with(&["backup", "run", "--pg-dump", &fake_arg], &store),
        Some(db.url()),
        &[],
    );
    expect_code(&out, 1);
    assert!(
        out.stderr.contains("pg_dump failed") && out.stderr.contains("simulated failure"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("[DumpFailed]"), "{}", out.stderr);
    let listing = list_json(&store, &[]);
    assert!(backup_ids(&listing).is_empty(), "{listing:#}");
    assert!(
        files_under(&root)
            .iter()
            .all(|f| !f.ends_with(".dump") && !f.ends_with(".json")),
        "{:?}",
        files_under(&root)
    );

    // Killed mid-stream (SIGKILL: no clean-up code runs at all).
    let fake = fake_pg_dump(
        tmp.path(),
        "head -c 12582912 /dev/zero\nwhile sleep 0.2; do printf x || exit 1; done",
    );
    let mut child = dbpolicy_cmd()
        .args(with(
            &["backup", "run", "--pg-dump", fake.to_str().unwrap()],
            &store,
        ))
        .env("DATABASE_URL", db.url())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until part of the dump has reached the store.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !files_under(&root).iter().any(|f| f.contains(".dump#")) {
        assert!(
            Instant::now() < deadline,
            "the run never started uploading: {:?}",
            files_under(&root)
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it was killed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let listing = list_json(&store, &[]);
    assert!(backup_ids(&listing).is_empty(), "{listing:#}");

    // SIGTERM (a Job deleted, a node drained): the upload is aborted, its staging file
    // removed, and the run says so.
    let staged_before: Vec<String> = files_under(&root)
        .into_iter()
        .filter(|f| f.contains(".dump#"))
        .collect();
    let child = dbpolicy_cmd()
        .args(with(
            &["backup", "run", "--pg-dump", fake.to_str().unwrap()],
            &store,
        ))
        .env("DATABASE_URL", db.url())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while files_under(&root)
        .iter()
        .filter(|f| f.contains(".dump#"))
        .count()
        <= staged_before.len()
    {
        assert!(Instant::now() < deadline, "the run never started uploading");
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("interrupted by SIGTERM") && stderr.contains("[Interrupted]"),
        "{stderr}"
    );
    let staged_after: Vec<String> = files_under(&root)
        .into_iter()
        .filter(|f| f.contains(".dump#"))
        .collect();
    assert_eq!(
        staged_after, staged_before,
        "the aborted upload's staging file is gone"
    );
    assert!(backup_ids(&list_json(&store, &[])).is_empty());

    let out = run_args(&with(&["backup", "verify"], &store), Some(db.url()), &[]);
    expect_code(&out, 1);
    assert!(
        out.stderr.contains("no backup of database"),
        "{}",
        out.stderr
    );

    // After all that, a real run is the one and only backup.
    let out = run_args(&with(&["backup", "run"], &store), Some(db.url()), &[]);
    expect_code(&out, 0);
    assert_eq!(backup_ids(&list_json(&store, &[])).len(), 1);
}

#[tokio::test]
async fn a_table_lock_held_too_long_fails_the_run_instead_of_hanging_it() {
    let db = TestDb::new().await;
    db.exec(SCHEMA).await;
    let tmp = tempfile::tempdir().unwrap();
    let store = dir_args(&tmp.path().join("backups"));
    // A migration holding an exclusive lock.
    let mut holder = db.connect().await;
    sqlx::raw_sql("BEGIN; LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        .execute(&mut holder)
        .await
        .unwrap();
    let started = Instant::now();
    let out = run_args(
        &with(&["backup", "run", "--lock-wait-timeout", "1s"], &store),
        Some(db.url()),
        &[],
    );
    expect_code(&out, 1);
    assert!(started.elapsed() < Duration::from_secs(60));
    assert!(out.stderr.contains("LOCK TABLE"), "{}", out.stderr);
    assert!(!out.stderr.contains("slow statement"), "{}", out.stderr);
    assert!(backup_ids(&list_json(&store, &[])).is_empty());
    sqlx::raw_sql("ROLLBACK")
        .execute(&mut holder)
        .await
        .unwrap();
    let out = run_args(&with(&["backup", "run"], &store), Some(db.url()), &[]);
    expect_code(&out, 0);
}

#[tokio::test]
async fn the_password_travels_in_the_environment_only() {
    let db = TestDb::new().await;
    db.exec("CREATE TABLE t (x int); INSERT INTO t VALUES (1);")
        .await;
    let tmp = tempfile::tempdir().unwrap();
    let store = dir_args(&tmp.path().join("backups"));
    // The shared server trusts local connections, so any password connects.
    let url = db
        .url()
        .replacen("://postgres@", "://postgres:Sup3r%2Fsecret@", 1);
    assert_ne!(url, db.url(), "unexpected test URL shape: {}", db.url());
    let real = {
        let out = Command::new("sh")
            .args([
                "-c",
                "command -v pg_dump || ls /usr/lib/postgresql/*/bin/pg_dump | tail -1",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("pg_dump")
            .to_string()
    };
    let record = tmp.path().join("seen");
    let version = Command::new(&real).arg("--version").output().unwrap();
    let fake = fake_pg_dump_version(
        tmp.path(),
        String::from_utf8_lossy(&version.stdout).trim(),
        &format!(
            "echo \"args: $*\" > '{rec}'\necho \"password: $PGPASSWORD\" >> '{rec}'\necho \"database: $PGDATABASE\" >> '{rec}'\nexec '{real}' \"$@\"",
            rec = record.display()
        ),
    );
    let out = run_args(
        &with(
            &[
                "backup",
                "run",
                "--verify",
                "--pg-dump",
                fake.to_str().unwrap(),
            ],
            &store,
        ),
        Some(&url),
        &[],
    );
    expect_code(&out, 0);
    let seen = fs::read_to_string(&record).unwrap();
    assert!(seen.contains("password: Sup3r/secret"), "{seen}");
    assert!(seen.contains(&format!("database: {}", db.name())), "{seen}");
    let args = seen.lines().next().unwrap();
    assert!(
        !args.contains("secret") && !args.contains("postgres://"),
        "{args}"
    );
    assert!(
        !out.stdout.contains("secret") && !out.stderr.contains("secret"),
        "{out:?}"
    );
}

// ---------------------------------------------------------------------------------------
// S3-compatible store: moto (tests/support/moto.rs)
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn run_list_verify_prune_with_an_s3_compatible_store() {
    let moto = Moto::start();
    moto.create_bucket("dbpolicy-backups");
    let db = TestDb::new().await;
    db.exec(SCHEMA).await;
    // Incompressible-enough data past one 8 MiB upload part, to go through a multipart upload.
    db.exec("CREATE TABLE blobs AS SELECT g AS id, repeat(md5(g::text), 32) AS body FROM generate_series(1, 12000) g").await;
    let endpoint = moto.endpoint();
    let store: Vec<String> = [
        "--s3-bucket",
        "dbpolicy-backups",
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
    let creds = [
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
    ];

    let out = run_args(
        &with(&["backup", "run", "--compression", "0", "--verify"], &store),
        Some(db.url()),
        &creds,
    );
    expect_code(&out, 0);
    assert!(out.stdout.contains("verified"), "{}", out.stdout);
    let listing = list_json(&store, &creds);
    let ids = backup_ids(&listing);
    assert_eq!(ids.len(), 1, "{listing:#}");
    assert!(
        listing["backups"][0]["manifest"]["sizeBytes"]
            .as_u64()
            .unwrap()
            > 8 * 1024 * 1024
    );

    let out = run_args(&with(&["backup", "run"], &store), Some(db.url()), &creds);
    expect_code(&out, 0);
    assert_eq!(backup_ids(&list_json(&store, &creds)).len(), 2);
    let out = run_args(
        &with(&["backup", "verify", "--backup", &ids[0]], &store),
        Some(db.url()),
        &creds,
    );
    expect_code(&out, 0);
    assert_dropped(&db, &scratch_of(&out)).await;

    // A failed run through S3 leaves nothing listed.
    let tmp = tempfile::tempdir().unwrap();
    let fake = fake_pg_dump(tmp.path(), "head -c 12582912 /dev/zero\nexit 1");
    let out = run_args(
        &with(
            &["backup", "run", "--pg-dump", fake.to_str().unwrap()],
            &store,
        ),
        Some(db.url()),
        &creds,
    );
    expect_code(&out, 1);
    assert_eq!(backup_ids(&list_json(&store, &creds)).len(), 2);

    let out = run_args(
        &with(&["backup", "prune", "--retention-count", "1"], &store),
        None,
        &creds,
    );
    expect_code(&out, 0);
    // The newest stays, and so does the newest verified one (the first: the second run
    // did not verify), whatever the count says.
    let listing = list_json(&store, &creds);
    let left = backup_ids(&listing);
    assert_eq!(left.len(), 2, "{}", out.stdout);
    assert_eq!(left[0], ids[0]);
    assert_eq!(states(&listing), ["verified", "unverified"], "{listing:#}");
    assert!(
        out.stdout
            .contains("(verified): the newest verified backup"),
        "{}",
        out.stdout
    );

    // Wrong credentials: moto accepts any key, so check a missing bucket instead: a clear
    // error naming the store.
    let other: Vec<String> = store
        .iter()
        .map(|s| {
            if s == "dbpolicy-backups" {
                "no-such-bucket".to_string()
            } else {
                s.clone()
            }
        })
        .collect();
    let out = run_args(&with(&["backup", "list"], &other), None, &creds);
    expect_code(&out, 1);
    assert!(out.stderr.contains("no-such-bucket"), "{}", out.stderr);
}

// ---------------------------------------------------------------------------------------
// Verification state: list shows it, prune never keeps a damaged backup in place of a good one
// ---------------------------------------------------------------------------------------

/// Every backup's `state` in a JSON listing, oldest first.
fn states(listing: &Value) -> Vec<String> {
    listing["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            b["state"]
                .as_str()
                .unwrap_or_else(|| panic!("a backup without a state: {b:#}"))
                .to_string()
        })
        .collect()
}

/// Flips the byte in the middle: same size, different content.
fn flip_middle_byte(bytes: &mut [u8]) {
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
}

/// The line of `backup list`'s table for one backup.
fn list_line<'a>(text: &'a str, id: &str) -> &'a str {
    text.lines()
        .find(|l| !l.starts_with('#') && l.contains(id))
        .unwrap_or_else(|| panic!("{id} not listed:\n{text}"))
}

/// Three backups of `db` into `store`: the first two verified, the newest not; their ids.
fn three_backups(db: &TestDb, store: &[String], env: &[(&str, &str)]) -> Vec<String> {
    for verify in [true, true, false] {
        let mut args = with(&["backup", "run", "--compression", "0"], store);
        if verify {
            args.push("--verify".into());
        }
        let out = run_args(&args, Some(db.url()), env);
        expect_code(&out, 0);
    }
    let listing = list_json(store, env);
    assert_eq!(
        states(&listing),
        ["verified", "verified", "unverified"],
        "{listing:#}"
    );
    let text = run_args(&with(&["backup", "list"], store), None, env);
    expect_code(&text, 0);
    assert!(text.stdout.contains("STATE"), "{}", text.stdout);
    backup_ids(&listing)
}

/// The case, against either store: the newest dump gets one byte flipped (same
/// size), `verify` finds it and records it, `list` shows it, and `prune --retention-count 1`
/// keeps the newest good backup instead of the corrupt one.
fn corrupt_newest_is_recorded_and_not_retained(
    db: &TestDb,
    store: &[String],
    env: &[(&str, &str)],
    mut flip: impl FnMut(&str),
) {
    let ids = three_backups(db, store, env);
    let name = |i: usize| format!("{}/{}", db.name(), ids[i]);
    flip(&ids[2]);

    // A same-size flip is invisible to the cheap check: never verified, and not claimed to be.
    let listing = list_json(store, env);
    assert_eq!(states(&listing)[2], "unverified", "{listing:#}");

    let out = run_args(&with(&["backup", "verify"], store), Some(db.url()), env);
    expect_code(&out, 1);
    assert!(out.stderr.contains("[BackupCorrupt]"), "{}", out.stderr);
    assert!(out.stderr.contains(&ids[2]), "{}", out.stderr);

    // The result is recorded in the store: list shows it, with when it was checked.
    let listing = list_json(store, env);
    assert_eq!(
        states(&listing),
        ["verified", "verified", "corrupt"],
        "{listing:#}"
    );
    let newest = &listing["backups"][2];
    assert!(newest["checkedAt"].is_string(), "{newest:#}");
    assert_eq!(
        newest["verification"]["reason"], "BackupCorrupt",
        "{newest:#}"
    );
    let text = run_args(&with(&["backup", "list"], store), None, env);
    expect_code(&text, 0);
    let line = list_line(&text.stdout, &ids[2]);
    assert!(line.contains("corrupt"), "{}", text.stdout);
    assert!(!line.contains(" ok"), "{}", text.stdout);
    assert!(
        list_line(&text.stdout, &ids[1]).contains("verified"),
        "{}",
        text.stdout
    );

    // What prune would do is printed and nothing is deleted.
    let out = run_args(
        &with(
            &["backup", "prune", "--retention-count", "1", "--dry-run"],
            store,
        ),
        None,
        env,
    );
    expect_code(&out, 0);
    assert!(
        out.stdout.contains(&format!("would delete {}", name(0))),
        "{}",
        out.stdout
    );
    for kept in [1, 2] {
        assert!(
            !out.stdout.contains(&format!("would delete {}", name(kept))),
            "{}",
            out.stdout
        );
    }
    assert_eq!(backup_ids(&list_json(store, env)), ids);

    // The corrupt newest is not counted: the newest good backup is the one retained. The
    // corrupt one stays listed (not counted, inside the retention window) as evidence.
    let out = run_args(
        &with(&["backup", "prune", "--retention-count", "1"], store),
        None,
        env,
    );
    expect_code(&out, 0);
    assert!(
        out.stdout.contains(&format!("deleted {}", name(0))),
        "{}",
        out.stdout
    );
    let listing = list_json(store, env);
    assert_eq!(backup_ids(&listing), ids[1..], "{}", out.stdout);
    assert_eq!(states(&listing), ["verified", "corrupt"], "{listing:#}");
    // The good one still restores.
    let out = run_args(
        &with(&["backup", "verify", "--backup", &ids[1]], store),
        Some(db.url()),
        env,
    );
    expect_code(&out, 0);

    // A new good backup: the corrupt one falls out of the window with the older good one.
    let out = run_args(
        &with(
            &["backup", "run", "--verify", "--retention-count", "1"],
            store,
        ),
        Some(db.url()),
        env,
    );
    expect_code(&out, 0);
    let listing = list_json(store, env);
    assert_eq!(backup_ids(&listing).len(), 1, "{listing:#}");
    assert!(!ids.contains(&backup_ids(&listing)[0]));
    assert_eq!(states(&listing), ["verified"]);
    assert!(
        listing["leftovers"].as_array().unwrap().is_empty(),
        "{listing:#}"
    );
}

#[tokio::test]
async fn a_corrupt_newest_backup_is_recorded_and_never_kept_in_place_of_good_ones() {
    let db = TestDb::new().await;
    db.exec(SCHEMA).await;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("backups");
    let store = dir_args(&root);
    corrupt_newest_is_recorded_and_not_retained(&db, &store, &[], |id| {
        let path = dump_path(&root, &db, id);
        let mut bytes = fs::read(&path).unwrap();
        let size = bytes.len();
        flip_middle_byte(&mut bytes);
        fs::write(&path, &bytes).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().len() as usize, size);
    });
}

#[tokio::test]
async fn killed_and_truncated_backups_are_never_counted() {
    let db = TestDb::new().await;
    db.exec(SCHEMA).await;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("backups");
    let store = dir_args(&root);
    let ids = three_backups(&db, &store, &[]);
    let dir = root.join(db.name());

    // The newest dump cut short under its manifest (a copy of the store, or an older
    // writer, killed mid-file): incomplete, whatever was recorded before.
    let newest = dump_path(&root, &db, &ids[2]);
    let bytes = fs::read(&newest).unwrap();
    fs::write(&newest, &bytes[..bytes.len() / 2]).unwrap();
    // A verified backup whose dump then shrank is not verified any more.
    let middle = dump_path(&root, &db, &ids[1]);
    let bytes = fs::read(&middle).unwrap();
    fs::write(&middle, &bytes[..bytes.len() - 1]).unwrap();
    // A run killed after its upload completed, before its manifest (the commit): a dump
    // alone, newer than every backup.
    let killed = "29991231T235959.999Z";
    fs::copy(&newest, dir.join(format!("{killed}.dump"))).unwrap();

    let listing = list_json(&store, &[]);
    assert_eq!(backup_ids(&listing), ids, "{listing:#}");
    assert_eq!(
        states(&listing),
        ["verified", "incomplete", "incomplete"],
        "{listing:#}"
    );
    let leftovers = listing["leftovers"].as_array().unwrap();
    assert_eq!(leftovers.len(), 1, "{listing:#}");
    assert_eq!(leftovers[0]["file"], format!("{killed}.dump"));
    let text = run_args(&with(&["backup", "list"], &store), None, &[]);
    expect_code(&text, 0);
    for id in &ids[1..] {
        assert!(
            list_line(&text.stdout, id).contains("incomplete"),
            "{}",
            text.stdout
        );
    }
    assert!(
        text.stdout
            .lines()
            .any(|l| l.starts_with('#') && l.contains(killed) && l.contains("incomplete")),
        "{}",
        text.stdout
    );

    // Verify of the newest says so, loudly.
    let out = run_args(&with(&["backup", "verify"], &store), Some(db.url()), &[]);
    expect_code(&out, 1);
    assert!(out.stderr.contains("[BackupCorrupt]"), "{}", out.stderr);

    // Prune counts none of them: the only good backup is the one retained, and nothing
    // else is deleted (the damaged ones are inside the window; the killed run's dump is
    // younger than the grace period).
    let out = run_args(
        &with(&["backup", "prune", "--retention-count", "1"], &store),
        None,
        &[],
    );
    expect_code(&out, 0);
    assert!(
        out.stdout.contains("pruned: 0 backup(s) deleted"),
        "{}",
        out.stdout
    );
    let listing = list_json(&store, &[]);
    assert_eq!(backup_ids(&listing), ids, "{listing:#}");
    assert_eq!(states(&listing)[0], "verified");
    assert!(dir.join(format!("{killed}.dump")).exists());

    // Once a good backup is newer, the damaged ones age out with the rest.
    let out = run_args(
        &with(&["backup", "run", "--retention-count", "1"], &store),
        Some(db.url()),
        &[],
    );
    expect_code(&out, 0);
    let listing = list_json(&store, &[]);
    // The newest good backup is kept, and so is the newest verified one.
    assert_eq!(backup_ids(&listing)[0], ids[0], "{listing:#}");
    assert_eq!(states(&listing), ["verified", "unverified"], "{listing:#}");
    let newest = backup_ids(&listing)[1].clone();

    // A prune killed after deleting a backup's manifest (its first step): what remains is
    // leftovers, never a backup, and the next prune past the grace period removes them.
    fs::remove_file(dir.join(format!("{}.manifest.json", ids[0]))).unwrap();
    let listing = list_json(&store, &[]);
    assert_eq!(backup_ids(&listing), [newest.as_str()], "{listing:#}");
    let mut leftovers: Vec<String> = listing["leftovers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["file"].as_str().unwrap().to_string())
        .collect();
    leftovers.sort();
    let expected = [
        format!("{}.dump", ids[0]),
        format!("{}.verify.json", ids[0]),
        format!("{killed}.dump"),
    ];
    assert_eq!(leftovers, expected, "{listing:#}");
    for file in &expected {
        let status = Command::new("touch")
            .args(["-d", "3 days ago"])
            .arg(dir.join(file))
            .status()
            .unwrap();
        assert!(status.success());
    }
    let out = run_args(
        &with(&["backup", "prune", "--retention-count", "1"], &store),
        None,
        &[],
    );
    expect_code(&out, 0);
    assert!(
        out.stdout
            .contains("pruned: 0 backup(s) deleted, 1 kept, 3 leftover(s) deleted"),
        "{}",
        out.stdout
    );
    let listing = list_json(&store, &[]);
    assert_eq!(backup_ids(&listing), [newest], "{listing:#}");
    assert!(
        listing["leftovers"].as_array().unwrap().is_empty(),
        "{listing:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_newest_backup_in_s3_is_recorded_and_never_kept_in_place_of_good_ones() {
    use object_store::{ObjectStoreExt, PutPayload};
    let moto = Moto::start();
    moto.create_bucket("dbpolicy-verify");
    let db = TestDb::new().await;
    db.exec(SCHEMA).await;
    let endpoint = moto.endpoint();
    let store: Vec<String> = [
        "--s3-bucket",
        "dbpolicy-verify",
        "--s3-endpoint",
        &endpoint,
        "--s3-prefix",
        "quiz",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let creds = [
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
    ];
    // The test's own client rewrites the object, as bit rot or a bad copy would.
    let s3 = object_store::aws::AmazonS3Builder::new()
        .with_bucket_name("dbpolicy-verify")
        .with_region("us-east-1")
        .with_endpoint(&endpoint)
        .with_allow_http(true)
        .with_virtual_hosted_style_request(false)
        .with_access_key_id("testing")
        .with_secret_access_key("testing")
        .build()
        .unwrap();
    let runtime = tokio::runtime::Handle::current();
    let db_name = db.name().to_string();
    tokio::task::block_in_place(|| {
        corrupt_newest_is_recorded_and_not_retained(&db, &store, &creds, |id| {
            let key = object_store::path::Path::from(format!("quiz/{db_name}/{id}.dump"));
            runtime.block_on(async {
                let mut bytes = s3.get(&key).await.unwrap().bytes().await.unwrap().to_vec();
                flip_middle_byte(&mut bytes);
                s3.put(&key, PutPayload::from(bytes)).await.unwrap();
            });
        })
    });
}

// ---------------------------------------------------------------------------------------
// Point-in-time recovery settings go through serverSettings
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn pitr_settings_are_applied_with_the_restart_reported() {
    let server = support::PgServer::start();
    let db = TestDb::on(&server).await;
    let archive = tempfile::tempdir().unwrap();
    // The server runs as an unprivileged account: the archive must be writable by it.
    fs::set_permissions(archive.path(), fs::Permissions::from_mode(0o777)).unwrap();
    let a = archive.path().display();
    let policy = support::policy(
        "pitr",
        &format!(
            "  serverSettings:\n    parameters:\n      wal_level: logical\n      archive_mode: \"on\"\n      archive_command: \"test ! -f {a}/%f && cp %p {a}/%f\"\n"
        ),
    );
    // archive_command runs shell commands on the database host: denied unless the platform
    // team allows it with the CLI/operator flag (never the spec).
    let refused = support::cli("apply", db.url(), &policy);
    expect_code(&refused, 1);
    assert!(
        refused.stdout.contains("SettingNotAllowed"),
        "{}",
        refused.stdout
    );
    let file = support::write_policy(&policy);
    let path = file.path().to_str().unwrap();
    let allowed = |verb: &str| {
        support::run_dbpolicy(
            [verb, "-f", path, "--allow-setting", "archive_command"],
            Some(db.url()),
        )
    };
    let out = allowed("apply");
    expect_code(&out, 0);
    assert!(
        out.stdout.contains("restart required for:")
            && out.stdout.contains("archive_mode")
            && out.stdout.contains("wal_level"),
        "{}",
        out.stdout
    );
    // The server never restarts by itself; after a restart, WAL is archived.
    server.restart();
    assert_eq!(db.query_scalar::<String>("SHOW archive_mode").await, "on");
    assert_eq!(db.query_scalar::<String>("SHOW wal_level").await, "logical");
    db.exec("CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g")
        .await;
    db.query_scalar::<String>("SELECT pg_switch_wal()::text")
        .await;
    support::eventually(Duration::from_secs(30), || async {
        let n = fs::read_dir(archive.path()).map(|d| d.count()).unwrap_or(0);
        if n > 0 {
            Ok(n)
        } else {
            Err("no WAL segment archived yet")
        }
    })
    .await;
    let plan = allowed("plan");
    expect_code(&plan, 0);

    // Dumps run alongside archiving.
    let tmp = tempfile::tempdir().unwrap();
    let store = dir_args(&tmp.path().join("backups"));
    let out = run_args(
        &with(&["backup", "run", "--verify"], &store),
        Some(db.url()),
        &[],
    );
    expect_code(&out, 0);
}
