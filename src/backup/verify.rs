//! `dbpolicy backup verify`: prove a backup restores. The dump is downloaded and its size
//! and SHA-256 checked against the manifest first (a damaged file fails here, with both
//! sums in the message); then `pg_restore --exit-on-error` loads it into a scratch database
//! `dbpolicy_verify_<random>` on the same server, and every table's row count is compared
//! with the manifest. The scratch database is dropped whatever happened, Ctrl-C and
//! SIGTERM included.
//!
//! What a verify concluded about the backup (verified, corrupt bytes, or a restore that
//! failed or differed) is recorded in the store as `<id>.verify.json`, one atomic put, for
//! `list` and `prune` ([`super::state`]). A verify that could not reach a conclusion (no
//! connection, no scratch database, interrupted) records nothing.

use std::io::Write;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Instant;

use sha2::{Digest, Sha256};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgConnection};
use tokio::io::AsyncReadExt;

use super::list::{self, Backup};
use super::manifest::compare_tables;
use super::run::{hex, table_rows};
use super::state::{DumpObject, Outcome, VerifyRecord};
use super::store::Store;
use super::tools::{self, LibpqEnv};
use super::{ArgsError, BackupError};
use crate::pg::{error_summary, quote_ident, quote_literal};
use crate::units;

const STDERR_TAIL: usize = 4000;

#[derive(Debug, Clone, Default)]
pub(crate) struct VerifyOptions {
    /// Backup id (`20261125T030000.000Z`); the newest when absent.
    pub backup: Option<String>,
    /// Database whose backups to check; the URL's database when absent.
    pub database: Option<String>,
    pub pg_restore: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub(crate) struct Verified {
    pub database: String,
    pub id: String,
    pub tables: usize,
    pub rows: i64,
    pub restore_seconds: f64,
}

pub(crate) async fn verify(
    store: &Store,
    url: &str,
    opts: &VerifyOptions,
) -> Result<Verified, BackupError> {
    let env = LibpqEnv::from_url(url).map_err(ArgsError::from)?;
    let mut conn = tools::connect(url).await.map_err(BackupError::Connect)?;
    let result = verify_on(store, url, &env, &mut conn, opts).await;
    let _ = conn.close().await;
    result
}

async fn verify_on(
    store: &Store,
    url: &str,
    env: &LibpqEnv,
    conn: &mut PgConnection,
    opts: &VerifyOptions,
) -> Result<Verified, BackupError> {
    let source = |what: &'static str| {
        move |e: sqlx::Error| BackupError::Source(format!("{what}: {}", error_summary(&e)))
    };
    let (current, version_num, encoding, collate, ctype): (String, i32, String, String, String) =
        sqlx::query_as(
            "SELECT current_database()::text, current_setting('server_version_num')::int, \
         pg_encoding_to_char(encoding)::text, datcollate::text, datctype::text \
         FROM pg_database WHERE datname = current_database()",
        )
        .fetch_one(&mut *conn)
        .await
        .map_err(source("reading the server"))?;
    let database = opts.database.clone().unwrap_or(current);
    let listing = list::scan(store, Some(&database)).await?;
    let dir = Store::database_dir(&database);
    let backup: &Backup = match &opts.backup {
        Some(id) => listing
            .find(&dir, id)
            .ok_or_else(|| BackupError::NotFound {
                what: format!("backup {id} of database {database}"),
                store: store.describe().to_string(),
            })?,
        None => listing.newest(&dir).ok_or_else(|| BackupError::NotFound {
            what: format!("backup of database {database}"),
            store: store.describe().to_string(),
        })?,
    };
    let name = format!("{}/{}", backup.database_dir, backup.id);
    eprintln!("backup: verifying {name} from {}", store.describe());
    let Some(dump) = backup.dump.clone() else {
        return Err(BackupError::Corrupt {
            backup: name,
            reason: "the dump is missing from the store".into(),
        });
    };
    let target = Target {
        url,
        env,
        version_num,
        encoding,
        collate,
        ctype,
    };
    let mut sha256 = None;
    let result = check(store, conn, backup, &target, opts, &mut sha256).await;
    let record = record_of(&backup.id, dump, &result, sha256);
    if let Some(record) = record {
        let file = backup.verify_file();
        match store
            .put(&backup.database_dir, &file, record.to_json())
            .await
        {
            Ok(()) => eprintln!(
                "backup: recorded {name} as {} in {}/{file}",
                record.outcome_word(),
                backup.database_dir
            ),
            Err(e) if result.is_ok() => {
                eprintln!("backup: {name} verified, but recording that failed");
                return Err(e.into());
            }
            Err(e) => eprintln!("backup: warning: recording the result failed: {e}"),
        }
    }
    result
}

/// The server a scratch database is created on, and the source's encoding and locale.
struct Target<'a> {
    url: &'a str,
    env: &'a LibpqEnv,
    version_num: i32,
    encoding: String,
    collate: String,
    ctype: String,
}

/// The record of a verify's conclusion about the backup; None when it reached none.
fn record_of(
    id: &str,
    dump: DumpObject,
    result: &Result<Verified, BackupError>,
    sha256: Option<String>,
) -> Option<VerifyRecord> {
    let mut record = match result {
        Ok(_) => VerifyRecord::new(id, dump, Outcome::Verified, None),
        Err(e @ BackupError::Corrupt { reason, .. }) => VerifyRecord::new(
            id,
            dump,
            Outcome::Corrupt,
            Some((e.reason(), reason.clone())),
        ),
        Err(e @ (BackupError::PgRestore { .. } | BackupError::Mismatch { .. })) => {
            VerifyRecord::new(id, dump, Outcome::Failed, Some((e.reason(), e.to_string())))
        }
        Err(_) => return None,
    };
    record.sha256 = sha256;
    record.restore_seconds = result.as_ref().ok().map(|v| v.restore_seconds);
    Some(record)
}

/// Checksum, restore, row counts; `sha256` gets the dump's sum once it is read.
async fn check(
    store: &Store,
    conn: &mut PgConnection,
    backup: &Backup,
    target: &Target<'_>,
    opts: &VerifyOptions,
    sha256_out: &mut Option<String>,
) -> Result<Verified, BackupError> {
    let name = format!("{}/{}", backup.database_dir, backup.id);
    let Target {
        url,
        env,
        version_num,
        encoding,
        collate,
        ctype,
    } = target;
    let version_num = *version_num;
    // 1. The bytes: size and checksum before anything reads them.
    let tmp = tempfile::Builder::new()
        .prefix("dbpolicy-verify-")
        .suffix(".dump")
        .tempfile()
        .map_err(|e| {
            BackupError::Tool(format!(
                "creating a temporary file in {}: {e}",
                std::env::temp_dir().display()
            ))
        })?;
    let mut file = tmp
        .as_file()
        .try_clone()
        .map_err(|e| BackupError::Tool(e.to_string()))?;
    let mut hasher = Sha256::new();
    let size = store
        .get_stream(&backup.database_dir, &backup.dump_file(), |chunk| {
            hasher.update(chunk);
            file.write_all(chunk)
        })
        .await?;
    file.flush().map_err(|e| BackupError::Tool(e.to_string()))?;
    let sha256 = hex(&hasher.finalize());
    *sha256_out = Some(sha256.clone());
    let m = &backup.manifest;
    if size != m.size_bytes {
        return Err(BackupError::Corrupt {
            backup: name,
            reason: format!(
                "the dump is {size} bytes, the manifest recorded {} (truncated or overwritten)",
                m.size_bytes
            ),
        });
    }
    if sha256 != m.sha256 {
        return Err(BackupError::Corrupt {
            backup: name,
            reason: format!(
                "SHA-256 of the dump is {sha256}, the manifest recorded {}",
                m.sha256
            ),
        });
    }
    eprintln!("backup: {name}: {}, checksum ok", units::bytes(size));

    // 2. A restore into a scratch database, always dropped.
    let pg_restore = tools::find(
        "pg_restore",
        opts.pg_restore.as_deref(),
        tools::parse_major(&m.pg_dump_version),
    )
    .await
    .map_err(BackupError::FindTool)?;
    let scratch = scratch_name();
    let create = format!(
        "CREATE DATABASE {} TEMPLATE template0 ENCODING {} LC_COLLATE {} LC_CTYPE {}",
        quote_ident(&scratch),
        quote_literal(encoding),
        quote_literal(collate),
        quote_literal(ctype)
    );
    sqlx::raw_sql(&create)
        .execute(&mut *conn)
        .await
        .map_err(|e| {
            BackupError::Scratch(format!("CREATE DATABASE {scratch}: {}", error_summary(&e)))
        })?;
    let started = Instant::now();
    let restore = restore_and_count(url, env, &scratch, &pg_restore, tmp.path());
    let outcome = tokio::select! {
        r = restore => r,
        s = tools::interrupted() => Err(BackupError::Interrupted(s)),
    };
    let restore_seconds = started.elapsed().as_secs_f64();
    // `WITH (FORCE)` (PostgreSQL 13+) also ends a pg_restore an interruption left behind.
    let drop_sql = if version_num >= 130000 {
        format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            quote_ident(&scratch)
        )
    } else {
        format!("DROP DATABASE IF EXISTS {}", quote_ident(&scratch))
    };
    let dropped = sqlx::raw_sql(&drop_sql).execute(&mut *conn).await;
    if let (Err(e), Err(_)) = (&dropped, &outcome) {
        eprintln!(
            "backup: warning: dropping scratch database {scratch} failed too: {} (drop it by hand)",
            error_summary(e)
        );
    }
    let restored = outcome?;
    if let Err(e) = dropped {
        return Err(BackupError::Scratch(format!(
            "the backup restored, but dropping {scratch} failed: {} (drop it by hand)",
            error_summary(&e)
        )));
    }
    let problems = compare_tables(&m.tables, &restored);
    if !problems.is_empty() {
        return Err(BackupError::Mismatch {
            backup: name,
            problems,
        });
    }
    Ok(Verified {
        database: m.database.clone(),
        id: backup.id.clone(),
        tables: restored.len(),
        rows: restored.iter().map(|t| t.rows).sum(),
        restore_seconds,
    })
}

async fn restore_and_count(
    url: &str,
    env: &LibpqEnv,
    scratch: &str,
    pg_restore: &tools::Tool,
    dump: &std::path::Path,
) -> Result<Vec<super::manifest::TableRows>, BackupError> {
    eprintln!(
        "backup: restoring into scratch database {scratch} with {}",
        pg_restore.path.display()
    );
    let mut cmd = tokio::process::Command::new(&pg_restore.path);
    // Owners and grants name roles the scratch database's server may not have; what is
    // checked is that the data comes back.
    // pg_restore insists on --dbname; the scratch name is no secret, the rest of the
    // connection comes from the environment.
    cmd.args([
        "--exit-on-error",
        "--no-owner",
        "--no-privileges",
        "--no-password",
    ])
    .arg(format!("--dbname={scratch}"))
    .arg(dump);
    env.with_database(scratch).apply(&mut cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| {
        BackupError::Tool(format!("cannot start {}: {e}", pg_restore.path.display()))
    })?;
    let mut stderr = child.stderr.take().expect("piped stderr");
    let mut err_bytes = Vec::new();
    let _ = stderr.read_to_end(&mut err_bytes).await;
    let status = child
        .wait()
        .await
        .map_err(|e| BackupError::Tool(format!("waiting for pg_restore: {e}")))?;
    if !status.success() {
        return Err(BackupError::PgRestore {
            status: status.to_string(),
            stderr: tools::tail(&err_bytes, STDERR_TAIL),
        });
    }
    let opts: PgConnectOptions = url.parse().map_err(|_| {
        BackupError::Usage("the database URL is not a valid postgres:// URI".into())
    })?;
    let opts = opts
        .database(scratch)
        .application_name("dbpolicy-verify")
        .log_statements(tracing::log::LevelFilter::Debug)
        .log_slow_statements(tracing::log::LevelFilter::Off, std::time::Duration::MAX);
    let mut conn = PgConnection::connect_with(&opts).await.map_err(|e| {
        BackupError::Scratch(format!("connecting to {scratch}: {}", error_summary(&e)))
    })?;
    let counted = async {
        sqlx::raw_sql("SET row_security = off")
            .execute(&mut conn)
            .await?;
        table_rows(&mut conn).await
    }
    .await
    .map_err(|e| {
        BackupError::Scratch(format!("counting rows in {scratch}: {}", error_summary(&e)))
    });
    let _ = conn.close().await;
    counted
}

/// `dbpolicy_verify_` and 16 random hex digits.
fn scratch_name() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.write_u32(std::process::id());
    format!("dbpolicy_verify_{:016x}", h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_names_are_valid_and_distinct() {
        let a = scratch_name();
        let b = scratch_name();
        assert!(a.starts_with("dbpolicy_verify_") && a.len() == 32, "{a}");
        assert!(a
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_'));
        assert_ne!(a, b);
    }
}
