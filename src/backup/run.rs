//! `dbpolicy backup run`: `pg_dump --format=custom` streamed into the store, then the
//! manifest.
//!
//! The row counts in the manifest come from the very snapshot the dump is taken from: a
//! repeatable-read transaction exports its snapshot and `pg_dump --snapshot` imports it, so
//! `verify` can demand exact equality. The transaction stays open until `pg_dump` is done
//! because an exported snapshot lives only as long as its transaction.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use chrono::Utc;
use sha2::{Digest, Sha256};
use sqlx::{Connection, PgConnection};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::manifest::{
    backup_id, Manifest, TableRows, DUMP_SUFFIX, MANIFEST_SUFFIX, MANIFEST_VERSION,
};
use super::store::Store;
use super::tools::{self, LibpqEnv};
use super::{ArgsError, BackupError};
use crate::pg::{error_summary, QualifiedName};
use crate::units;

/// How often progress is printed while the dump streams.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// How much of pg_dump's stderr an error message quotes.
const STDERR_TAIL: usize = 4000;

#[derive(Debug, Clone)]
pub(crate) struct RunOptions {
    /// `pg_dump --compress` level, 0-9.
    pub compression: u8,
    /// A specific pg_dump binary instead of the newest one found.
    pub pg_dump: Option<PathBuf>,
    /// How long to wait for a table lock (a migration holding one) before failing, rather
    /// than hanging a scheduled job for ever.
    pub lock_wait_timeout: Duration,
}

/// Tables whose rows a dump holds: ordinary and partition tables of user schemas, not
/// temporary ones nor those an extension owns (pg_dump leaves those to the extension).
const TABLES_SQL: &str = "\
SELECT n.nspname::text, c.relname::text
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r'
  AND c.relpersistence <> 't'
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname !~ '^pg_(toast|temp_|toast_temp_)'
  AND NOT EXISTS (
    SELECT 1 FROM pg_depend d
    WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')
ORDER BY 1, 2";

/// Exact row count of every table, in the connection's current snapshot. One count per
/// table: a backup reads every row anyway, and estimates could not be compared exactly.
pub(crate) async fn table_rows(conn: &mut PgConnection) -> Result<Vec<TableRows>, sqlx::Error> {
    let tables: Vec<(String, String)> = sqlx::query_as(TABLES_SQL).fetch_all(&mut *conn).await?;
    let mut out = Vec::with_capacity(tables.len());
    for (schema, table) in tables {
        let sql = format!(
            "SELECT count(*) FROM ONLY {}",
            QualifiedName::new(&schema, &table).quoted()
        );
        let rows: i64 = sqlx::query_scalar(&sql).fetch_one(&mut *conn).await?;
        out.push(TableRows {
            schema,
            table,
            rows,
        });
    }
    Ok(out)
}

/// What a successful run stored.
#[derive(Debug, Clone)]
pub(crate) struct Done {
    pub database_dir: String,
    pub manifest: Manifest,
}

pub(crate) async fn run(store: &Store, url: &str, opts: &RunOptions) -> Result<Done, BackupError> {
    let env = LibpqEnv::from_url(url).map_err(ArgsError::from)?;
    let mut conn = tools::connect(url).await.map_err(BackupError::Connect)?;
    let result = run_on(store, &env, &mut conn, opts).await;
    let _ = conn.close().await;
    result
}

async fn run_on(
    store: &Store,
    env: &LibpqEnv,
    conn: &mut PgConnection,
    opts: &RunOptions,
) -> Result<Done, BackupError> {
    let source = |what: &'static str| {
        move |e: sqlx::Error| BackupError::Source(format!("{what}: {}", error_summary(&e)))
    };
    let (database, server_version, version_num): (String, String, i32) = sqlx::query_as(
        "SELECT current_database()::text, current_setting('server_version'), current_setting('server_version_num')::int",
    )
    .fetch_one(&mut *conn)
    .await
    .map_err(source("reading the server version"))?;
    let pg_dump = tools::find(
        "pg_dump",
        opts.pg_dump.as_deref(),
        Some(tools::server_major(version_num)),
    )
    .await
    .map_err(BackupError::FindTool)?;

    let lock_ms = opts.lock_wait_timeout.as_millis();
    sqlx::raw_sql(&format!(
        "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; SET LOCAL row_security = off; SET LOCAL lock_timeout = {lock_ms}"
    ))
    .execute(&mut *conn)
        .await
        .map_err(source("starting the snapshot transaction"))?;
    let snapshot: String = sqlx::query_scalar("SELECT pg_export_snapshot()")
        .fetch_one(&mut *conn)
        .await
        .map_err(source("exporting a snapshot"))?;

    let started = Utc::now();
    let id = backup_id(started);
    let database_dir = Store::database_dir(&database);
    let dump_file = format!("{id}{DUMP_SUFFIX}");
    eprintln!(
        "backup: dumping database {database} (PostgreSQL {server_version}) with {} into {}",
        pg_dump.path.display(),
        store.describe()
    );

    let mut cmd = tokio::process::Command::new(&pg_dump.path);
    cmd.arg("--format=custom")
        .arg(format!("--compress={}", opts.compression))
        .arg(format!("--snapshot={snapshot}"))
        .arg(format!("--lock-wait-timeout={lock_ms}"))
        .arg("--no-password");
    // The connection, password included, goes through the environment, never argv.
    env.with_database(&database).apply(&mut cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| BackupError::Tool(format!("cannot start {}: {e}", pg_dump.path.display())))?;
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let stderr_task = tokio::spawn(async move {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf).await;
        buf
    });

    let (mut writer, key) = store.writer(&database_dir, &dump_file);
    let clock = Instant::now();
    let stream = async {
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        let mut last_report = Instant::now();
        loop {
            let n = stdout
                .read(&mut buf)
                .await
                .map_err(|e| format!("reading pg_dump's output: {e}"))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            writer
                .write_all(&buf[..n])
                .await
                .map_err(|e| format!("uploading: {e}"))?;
            size += n as u64;
            if last_report.elapsed() >= PROGRESS_EVERY {
                last_report = Instant::now();
                let secs = clock.elapsed().as_secs_f64().max(0.001);
                eprintln!(
                    "backup: {database}: {} streamed ({}/s)",
                    units::bytes(size),
                    units::bytes((size as f64 / secs) as u64)
                );
            }
        }
        Ok::<_, String>((size, hex(&hasher.finalize())))
    };
    // SIGTERM (the Job deleted, the node drained) and Ctrl-C abort the upload cleanly
    // instead of leaving its parts behind.
    let joined = tokio::select! {
        j = async { tokio::join!(stream, table_rows(&mut *conn)) } => Ok(j),
        signal = tools::interrupted() => Err(signal),
    };
    let (streamed, counted) = match joined {
        Ok(j) => j,
        Err(signal) => {
            let _ = child.start_kill();
            let _ = writer.abort().await;
            let _ = sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await;
            return Err(BackupError::Interrupted(signal));
        }
    };

    let outcome: Result<((u64, String), Vec<TableRows>), BackupError> = async {
        let streamed = match streamed {
            Ok(s) => s,
            Err(reason) => {
                let _ = child.start_kill();
                return Err(BackupError::Upload {
                    key: key.clone(),
                    reason,
                });
            }
        };
        let status = child
            .wait()
            .await
            .map_err(|e| BackupError::Tool(format!("waiting for pg_dump: {e}")))?;
        let stderr_bytes = stderr_task.await.unwrap_or_default();
        if !status.success() {
            return Err(BackupError::PgDump {
                status: status.to_string(),
                stderr: tools::tail(&stderr_bytes, STDERR_TAIL),
            });
        }
        let counted = counted
            .map_err(|e| BackupError::Source(format!("counting rows: {}", error_summary(&e))))?;
        Ok((streamed, counted))
    }
    .await;
    let ((size, sha256), tables) = match outcome {
        Ok(v) => v,
        Err(e) => {
            // Discard the upload: nothing of this run becomes visible.
            let _ = writer.abort().await;
            let _ = sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await;
            return Err(e);
        }
    };
    // Completing the multipart upload is what makes the dump visible.
    writer.shutdown().await.map_err(|e| BackupError::Upload {
        key: key.clone(),
        reason: e.to_string(),
    })?;
    let _ = sqlx::raw_sql("COMMIT").execute(&mut *conn).await;
    let finished = Utc::now();

    let manifest = Manifest {
        manifest_version: MANIFEST_VERSION,
        id: id.clone(),
        database: database.clone(),
        server_version,
        server_version_num: version_num,
        pg_dump_version: pg_dump.version.clone(),
        started_at: started,
        finished_at: finished,
        duration_seconds: (finished - started).num_milliseconds() as f64 / 1000.0,
        dump: dump_file,
        size_bytes: size,
        sha256,
        format: "custom".into(),
        compression: opts.compression,
        dbpolicy_version: env!("CARGO_PKG_VERSION").into(),
        tables,
    };
    // The commit point: from here on the backup exists.
    store
        .put(
            &database_dir,
            &format!("{id}{MANIFEST_SUFFIX}"),
            manifest.to_json(),
        )
        .await?;
    Ok(Done {
        database_dir,
        manifest,
    })
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_of_sha256() {
        assert_eq!(
            hex(&Sha256::digest(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
