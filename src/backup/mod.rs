//! Backups: `dbpolicy backup run | list | verify | prune`, what the backup CronJob runs and
//! what people run by hand. `pg_dump` custom-format dumps streamed to a local directory or
//! an S3-compatible bucket ([`store`]), each committed by a manifest written last
//! ([`manifest`]), proven by a restore into a scratch database ([`verify`]) whose
//! conclusion is recorded beside it ([`state`]), and pruned by retention rules that count
//! only backups known good ([`prune`]). Point-in-time recovery (`backup wal-receive | base
//! | wal-fetch`, `dbpolicy restore`) is [`pitr`].
//!
//! Exit status: 0 when everything asked for succeeded, 1 otherwise; errors on stderr name
//! the step that failed.

pub(crate) mod list;
pub(crate) mod manifest;
pub mod pitr;
pub(crate) mod prune;
pub(crate) mod run;
pub(crate) mod state;
pub(crate) mod store;
pub(crate) mod tools;
pub(crate) mod verify;

use std::path::PathBuf;

use chrono::Utc;
use clap::{Args, Subcommand, ValueEnum};

use self::prune::Retention;
use self::store::{S3Config, Store, StoreConfig, StoreError};
use crate::reason::Reason;
use crate::units;

/// Environment variables the CronJob sets instead of flags (flags win).
pub(crate) const ENV_DIR: &str = "DBPOLICY_BACKUP_DIR";
pub(crate) const ENV_S3_BUCKET: &str = "DBPOLICY_BACKUP_S3_BUCKET";
pub(crate) const ENV_S3_ENDPOINT: &str = "DBPOLICY_BACKUP_S3_ENDPOINT";
pub(crate) const ENV_S3_REGION: &str = "DBPOLICY_BACKUP_S3_REGION";
pub const ENV_S3_PREFIX: &str = "DBPOLICY_BACKUP_S3_PREFIX";

#[derive(Args, Debug)]
pub struct BackupArgs {
    #[command(subcommand)]
    pub command: BackupCommand,
}

#[derive(Subcommand, Debug)]
pub enum BackupCommand {
    /// Dump the database into the store (then prune and verify when asked).
    Run(RunArgs),
    /// Show the backups in the store, each with its verification state.
    List(ListArgs),
    /// Restore a backup (the newest by default) into a scratch database and check it.
    Verify(VerifyArgs),
    /// Delete backups the retention rules no longer keep (never the newest good nor the
    /// newest verified one; damaged ones are not counted).
    Prune(PruneArgs),
    /// Point-in-time recovery: stream WAL through a replication slot into the store until
    /// stopped (what the WAL receiver Deployment runs).
    WalReceive(WalReceiveArgs),
    /// Point-in-time recovery: take a physical base backup (pg_basebackup), check it with
    /// pg_verifybackup and store it.
    Base(BaseArgs),
    /// Fetch one archived WAL file, verified, to PATH (what `restore_command` runs).
    WalFetch(WalFetchArgs),
}

#[derive(Args, Debug)]
pub struct WalReceiveArgs {
    /// libpq URI of the server; the role needs the REPLICATION attribute.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub cluster: pitr::ClusterArgs,
    /// Physical replication slot dbpolicy creates (if missing) and streams through.
    #[arg(long, env = "DBPOLICY_PITR_SLOT", default_value = "dbpolicy_pitr")]
    pub slot: String,
    /// Local directory pg_receivewal writes into. It must survive a restart of the
    /// receiver (a PersistentVolumeClaim): completed segments wait there for upload.
    #[arg(long, env = "DBPOLICY_PITR_SPOOL")]
    pub spool: PathBuf,
    /// The pg_receivewal to run (default: the newest in PATH or /usr/lib/postgresql/*/bin).
    #[arg(long, env = "DBPOLICY_PG_RECEIVEWAL")]
    pub pg_receivewal: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct BaseArgs {
    /// libpq URI of the server; the role needs the REPLICATION attribute.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub cluster: pitr::ClusterArgs,
    /// Where the backup is written and checked before upload (about twice the size of
    /// the database; default: the temporary directory).
    #[arg(long, env = "DBPOLICY_PITR_WORK_DIR")]
    pub work_dir: Option<PathBuf>,
    /// Then delete base backups (and their WAL) retention no longer keeps.
    #[command(flatten)]
    pub retention: RetentionArgs,
}

#[derive(Args, Debug)]
pub struct WalFetchArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub cluster: pitr::ClusterArgs,
    /// The WAL file name PostgreSQL asks for (`%f`).
    pub file: String,
    /// Where to write it (`%p`).
    pub path: PathBuf,
}

/// Where backups are stored: a directory, or an S3-compatible bucket.
#[derive(Args, Debug, Clone, Default)]
pub struct StoreArgs {
    /// Local directory (the PersistentVolumeClaim's mount in the CronJob).
    #[arg(long, env = ENV_DIR, conflicts_with = "s3_bucket")]
    pub dir: Option<PathBuf>,
    /// S3 bucket; credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.
    #[arg(long, env = ENV_S3_BUCKET)]
    pub s3_bucket: Option<String>,
    /// Endpoint of an S3-compatible server (default: AWS).
    #[arg(long, env = ENV_S3_ENDPOINT, requires = "s3_bucket")]
    pub s3_endpoint: Option<String>,
    /// Region of the bucket (default us-east-1).
    #[arg(long, env = ENV_S3_REGION, requires = "s3_bucket")]
    pub s3_region: Option<String>,
    /// Key prefix inside the bucket.
    #[arg(long, env = ENV_S3_PREFIX, requires = "s3_bucket")]
    pub s3_prefix: Option<String>,
}

/// Arguments of a `dbpolicy backup` command that cannot work, alone or together; each
/// message says which flag to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ArgsError {
    #[error("pass either --dir or --s3-bucket, not both")]
    TwoStores,
    #[error(
        "no backup store: pass --dir PATH or --s3-bucket NAME (or set {ENV_DIR} / {ENV_S3_BUCKET})"
    )]
    NoStore,
    #[error("no retention rule: pass --retention-days, --retention-count or both")]
    NoRetention,
    #[error("--retention-days must be at least 1")]
    ZeroRetentionDays,
    #[error("--retention-count must be at least 1")]
    ZeroRetentionCount,
    #[error("slot name {0:?}: use 1-63 lower-case letters, digits and underscores")]
    SlotName(String),
    #[error("{0:?}: use 1-63 letters, digits, '-' and '_'")]
    ClusterName(String),
    #[error(transparent)]
    Url(#[from] tools::UrlError),
}

impl StoreArgs {
    pub(crate) fn config(&self) -> Result<StoreConfig, ArgsError> {
        match (&self.dir, &self.s3_bucket) {
            (Some(dir), None) => Ok(StoreConfig::Dir(dir.clone())),
            (None, Some(bucket)) => Ok(StoreConfig::S3(S3Config {
                bucket: bucket.clone(),
                endpoint: self.s3_endpoint.clone().filter(|s| !s.is_empty()),
                region: self.s3_region.clone().filter(|s| !s.is_empty()),
                prefix: self.s3_prefix.clone().filter(|s| !s.is_empty()),
            })),
            (Some(_), Some(_)) => Err(ArgsError::TwoStores),
            (None, None) => Err(ArgsError::NoStore),
        }
    }
}

#[derive(Args, Debug, Clone, Default)]
pub struct RetentionArgs {
    /// Keep backups finished within this many days.
    #[arg(long, env = "DBPOLICY_BACKUP_RETENTION_DAYS")]
    pub retention_days: Option<u32>,
    /// Keep this many newest backups.
    #[arg(long, env = "DBPOLICY_BACKUP_RETENTION_COUNT")]
    pub retention_count: Option<u32>,
}

impl RetentionArgs {
    fn retention(&self) -> Retention {
        Retention {
            days: self.retention_days,
            count: self.retention_count,
        }
    }
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Format {
    #[default]
    Custom,
    Directory,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// libpq URI of the database to dump; pg_dump gets it through its environment, never
    /// its arguments.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub retention: RetentionArgs,
    /// pg_dump compression level, 0-9.
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u8).range(0..=9))]
    pub compression: u8,
    /// Dump format; only `custom` can be streamed to the store.
    #[arg(long, value_enum, default_value_t = Format::Custom)]
    pub format: Format,
    /// After the dump, restore it into a scratch database and check it.
    #[arg(long)]
    pub verify: bool,
    /// Give up when a table lock cannot be had within this long (e.g. 30s, 10m).
    #[arg(long, default_value = "10m", value_parser = crate::duration::parse_duration)]
    pub lock_wait_timeout: std::time::Duration,
    /// The pg_dump to run (default: the newest in PATH or /usr/lib/postgresql/*/bin).
    #[arg(long, env = "DBPOLICY_PG_DUMP")]
    pub pg_dump: Option<PathBuf>,
    /// The pg_restore that --verify runs.
    #[arg(long, env = "DBPOLICY_PG_RESTORE")]
    pub pg_restore: Option<PathBuf>,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Text,
    Json,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// Only this database's backups.
    #[arg(long)]
    pub database: Option<String>,
    #[arg(short, long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// Show the point-in-time recovery window and base backups instead of dumps.
    #[arg(long)]
    pub pitr: bool,
    #[command(flatten)]
    pub cluster: pitr::ClusterArgs,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Server to restore into (a scratch database is created and dropped there); its
    /// database's backups are checked unless --database says otherwise.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    #[command(flatten)]
    pub store: StoreArgs,
    /// Backup id (as `backup list` shows it); default: the newest.
    #[arg(long)]
    pub backup: Option<String>,
    /// Check this database's backups (default: the one in --database-url).
    #[arg(long)]
    pub database: Option<String>,
    /// The pg_restore to run (default: the newest in PATH or /usr/lib/postgresql/*/bin).
    #[arg(long, env = "DBPOLICY_PG_RESTORE")]
    pub pg_restore: Option<PathBuf>,
    /// Check point-in-time recovery instead: restore base backup and WAL into a scratch
    /// directory, start a throwaway server there and check it reaches the target
    /// (default: the latest archived WAL).
    #[arg(long)]
    pub pitr: bool,
    #[command(flatten)]
    pub cluster: pitr::ClusterArgs,
    #[command(flatten)]
    pub target: pitr::TargetArgs,
    /// With --pitr: how long recovery may take.
    #[arg(long, default_value = "1h", value_parser = crate::duration::parse_duration)]
    pub recovery_timeout: std::time::Duration,
    /// With --pitr: keep the scratch data directory (its path is printed).
    #[arg(long)]
    pub keep: bool,
    /// With --pitr: the pg_ctl to run (pg_controldata beside it).
    #[arg(long, env = "DBPOLICY_PG_CTL")]
    pub pg_ctl: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct PruneArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub retention: RetentionArgs,
    /// Only this database's backups (default: every database in the store).
    #[arg(long)]
    pub database: Option<String>,
    /// Print what would be deleted, delete nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Prune point-in-time recovery base backups and their WAL instead of dumps.
    #[arg(long)]
    pub pitr: bool,
    #[command(flatten)]
    pub cluster: pitr::ClusterArgs,
}

/// One variant per step; the message names what failed and, where it helps, what to do.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BackupError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Args(#[from] ArgsError),
    #[error("connect: {0}")]
    Connect(#[from] crate::pg::ConnectError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Tool(String),
    #[error(transparent)]
    FindTool(#[from] tools::ToolError),
    #[error("source database: {0}")]
    Source(String),
    #[error("pg_dump failed ({status}); nothing was stored:\n{stderr}")]
    PgDump { status: String, stderr: String },
    #[error("upload of {key} failed; nothing was stored: {reason}")]
    Upload { key: String, reason: String },
    #[error("no {what} in {store}")]
    NotFound { what: String, store: String },
    #[error("backup {backup} is corrupt: {reason}")]
    Corrupt { backup: String, reason: String },
    #[error("pg_restore failed ({status}):\n{stderr}")]
    PgRestore { status: String, stderr: String },
    #[error("backup {backup} restored, but differs from its manifest:\n  {}", problems.join("\n  "))]
    Mismatch {
        backup: String,
        problems: Vec<String>,
    },
    #[error("scratch database: {0}")]
    Scratch(String),
    #[error("interrupted by {0}")]
    Interrupted(&'static str),
    #[error(transparent)]
    Pitr(#[from] pitr::PitrError),
}

impl BackupError {
    /// CamelCase reason, for conditions and metrics.
    pub(crate) fn reason(&self) -> Reason {
        match self {
            BackupError::Usage(_) | BackupError::Args(_) => Reason::InvalidArguments,
            BackupError::Connect(e) => e.reason(),
            BackupError::Store(_) => Reason::StoreFailed,
            BackupError::Tool(_) | BackupError::FindTool(_) => Reason::ToolFailed,
            BackupError::Source(_) => Reason::SourceReadFailed,
            BackupError::PgDump { .. } => Reason::DumpFailed,
            BackupError::Upload { .. } => Reason::UploadFailed,
            BackupError::NotFound { .. } => Reason::BackupNotFound,
            BackupError::Corrupt { .. } => Reason::BackupCorrupt,
            BackupError::PgRestore { .. } => Reason::RestoreFailed,
            BackupError::Mismatch { .. } => Reason::RestoreMismatch,
            BackupError::Scratch(_) => Reason::ScratchDatabaseFailed,
            BackupError::Interrupted(_) => Reason::Interrupted,
            BackupError::Pitr(e) => e.reason(),
        }
    }
}

/// Runs a `dbpolicy backup` command; the exit status.
pub(crate) async fn run(args: BackupArgs) -> u8 {
    let (what, result) = match args.command {
        BackupCommand::Run(a) => ("backup run", cmd_run(a).await),
        BackupCommand::List(a) => ("backup list", cmd_list(a).await),
        BackupCommand::Verify(a) => ("backup verify", cmd_verify(a).await),
        BackupCommand::Prune(a) => ("backup prune", cmd_prune(a).await),
        BackupCommand::WalReceive(a) => ("backup wal-receive", cmd_wal_receive(a).await),
        BackupCommand::Base(a) => ("backup base", cmd_base(a).await),
        BackupCommand::WalFetch(a) => ("backup wal-fetch", cmd_wal_fetch(a).await),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {what}: {e} [{}]", e.reason());
            1
        }
    }
}

fn open(store: &StoreArgs, create: bool) -> Result<Store, BackupError> {
    let config = store.config()?;
    Ok(Store::open(&config, create)?)
}

fn need_url(url: Option<String>) -> Result<String, BackupError> {
    url.filter(|u| !u.is_empty()).ok_or_else(|| {
        BackupError::Usage("no database: pass --database-url or set DATABASE_URL".into())
    })
}

/// Where `backup run` leaves its outcome for the operator: `DBPOLICY_TERMINATION_LOG`, or
/// the container's `/dev/termination-log` when there is one. Kubernetes copies the file
/// into the pod status (`state.terminated.message`, at most 4096 bytes), so the
/// controller learns the newest backup's size or the failure's reason without reading
/// the store or the logs.
fn termination_log() -> Option<PathBuf> {
    match std::env::var_os("DBPOLICY_TERMINATION_LOG") {
        Some(p) if !p.is_empty() => Some(PathBuf::from(p)),
        _ => Some(PathBuf::from("/dev/termination-log")).filter(|p| p.exists()),
    }
}

/// The termination message: one small JSON object.
pub(crate) fn termination_message(
    stored: Option<&manifest::Manifest>,
    error: Option<&BackupError>,
) -> String {
    let mut doc = serde_json::Map::new();
    doc.insert(
        "result".into(),
        if error.is_none() {
            "Succeeded"
        } else {
            "Failed"
        }
        .into(),
    );
    if let Some(m) = stored {
        doc.insert("database".into(), m.database.clone().into());
        doc.insert("backup".into(), m.id.clone().into());
        doc.insert("sizeBytes".into(), m.size_bytes.into());
        doc.insert("finishedAt".into(), m.finished_at.to_rfc3339().into());
    }
    if let Some(e) = error {
        doc.insert("reason".into(), e.reason().as_str().into());
        let message: String = e.to_string().chars().take(1500).collect();
        doc.insert("message".into(), message.into());
    }
    serde_json::Value::Object(doc).to_string()
}

async fn cmd_run(a: RunArgs) -> Result<(), BackupError> {
    let mut stored = None;
    let result = run_steps(a, &mut stored).await;
    if let Some(path) = termination_log() {
        let message = termination_message(stored.as_ref(), result.as_ref().err());
        if let Err(e) = std::fs::write(&path, message) {
            eprintln!("backup: warning: writing {}: {e}", path.display());
        }
    }
    result
}

async fn run_steps(a: RunArgs, stored: &mut Option<manifest::Manifest>) -> Result<(), BackupError> {
    if a.format != Format::Custom {
        return Err(BackupError::Usage(
            "--format directory is not supported: a directory-format dump cannot be streamed to the store; use custom".into(),
        ));
    }
    let retention = a.retention.retention();
    if retention.is_set() {
        retention.validate()?;
    }
    let url = need_url(a.database_url)?;
    let store = open(&a.store, true)?;
    let opts = run::RunOptions {
        compression: a.compression,
        pg_dump: a.pg_dump,
        lock_wait_timeout: a.lock_wait_timeout,
    };
    let done = run::run(&store, &url, &opts).await?;
    let m = stored.insert(done.manifest);
    println!(
        "backed up {}/{}: {} in {:.1}s, {} table(s), {} row(s), sha256 {}",
        done.database_dir,
        m.id,
        units::bytes(m.size_bytes),
        m.duration_seconds,
        m.tables.len(),
        m.total_rows(),
        m.sha256
    );
    if a.verify {
        let opts = verify::VerifyOptions {
            backup: Some(m.id.clone()),
            database: Some(m.database.clone()),
            pg_restore: a.pg_restore,
        };
        print_verified(verify::verify(&store, &url, &opts).await?);
    }
    if retention.is_set() {
        prune_and_print(&store, Some(&m.database), retention, false).await?;
    }
    Ok(())
}

async fn cmd_wal_receive(a: WalReceiveArgs) -> Result<(), BackupError> {
    let url = need_url(a.database_url)?;
    let store = open(&a.store, true)?;
    let opts = pitr::wal::ReceiveOptions {
        url,
        slot: a.slot,
        spool: a.spool,
        pg_receivewal: a.pg_receivewal,
        poll: std::time::Duration::from_secs(1),
    };
    match pitr::wal::receive(&store, &a.cluster.dir(), &opts).await {
        // Stopped by Kubernetes (or Ctrl-C) after shipping what was complete: success.
        Err(pitr::PitrError::Interrupted(s)) => {
            eprintln!("wal-receive: stopped by {s}; the slot keeps what was not received");
            Ok(())
        }
        other => Ok(other?),
    }
}

/// Runs `backup base` and leaves its outcome in the termination log, as `backup run`
/// does, so the operator learns the last base backup without reading the store.
async fn cmd_base(a: BaseArgs) -> Result<(), BackupError> {
    let mut stored = None;
    let mut window = None;
    let result = base_steps(a, &mut stored, &mut window).await;
    if let Some(path) = termination_log() {
        let mut doc = serde_json::Map::new();
        doc.insert(
            "result".into(),
            if result.is_ok() {
                "Succeeded"
            } else {
                "Failed"
            }
            .into(),
        );
        if let Some(r) = &stored {
            doc.insert("baseBackup".into(), r.id.clone().into());
            doc.insert("finishedAt".into(), r.finished_at.to_rfc3339().into());
            doc.insert("startLsn".into(), r.start_lsn.to_string().into());
            doc.insert("endLsn".into(), r.end_lsn.to_string().into());
            let size: u64 = r.files.iter().map(|f| f.size_bytes).sum();
            doc.insert("sizeBytes".into(), size.into());
        }
        // The window after retention ran, for status: the operator cannot list a PVC store.
        if let Some((earliest, latest, at)) = window {
            if let Some(t) = earliest {
                doc.insert("windowEarliest".into(), t.to_rfc3339().into());
            }
            if let Some(t) = latest {
                doc.insert("windowLatest".into(), t.to_rfc3339().into());
            }
            doc.insert("windowCheckedAt".into(), at.to_rfc3339().into());
        }
        if let Err(e) = &result {
            doc.insert("reason".into(), e.reason().as_str().into());
            let message: String = e.to_string().chars().take(1500).collect();
            doc.insert("message".into(), message.into());
        }
        let message = serde_json::Value::Object(doc).to_string();
        if let Err(e) = std::fs::write(&path, message) {
            eprintln!("backup: warning: writing {}: {e}", path.display());
        }
    }
    result
}

/// The recoverable window (earliest, latest) and when it was listed.
type WindowSeen = (
    Option<chrono::DateTime<chrono::Utc>>,
    Option<chrono::DateTime<chrono::Utc>>,
    chrono::DateTime<chrono::Utc>,
);

async fn base_steps(
    a: BaseArgs,
    stored: &mut Option<pitr::base::BaseRecord>,
    window: &mut Option<WindowSeen>,
) -> Result<(), BackupError> {
    let url = need_url(a.database_url)?;
    let retention = a.retention.retention();
    let store = open(&a.store, true)?;
    let dir = a.cluster.dir();
    let opts = pitr::base::BaseOptions {
        work_dir: a.work_dir,
        ..Default::default()
    };
    let r = stored.insert(pitr::base::run(&store, &dir, &url, &opts).await?);
    let size: u64 = r.files.iter().map(|f| f.size_bytes).sum();
    println!(
        "base backup {dir}/{}: {} checked by pg_verifybackup, WAL {} to {} on timeline {}, finished {}",
        r.id,
        units::bytes(size),
        r.start_lsn,
        r.end_lsn,
        r.timeline,
        r.finished_at.to_rfc3339()
    );
    if retention.is_set() {
        pitr_prune(&store, &dir, retention, false).await?;
    }
    let listed = pitr::listing(&dir, &pitr::scan(&store, &dir).await?);
    println!(
        "{dir}: recoverable from {} to {}",
        listed
            .window
            .earliest
            .map_or("-".into(), |t| t.to_rfc3339()),
        listed.window.latest.map_or("-".into(), |t| t.to_rfc3339())
    );
    *window = Some((
        listed.window.earliest,
        listed.window.latest,
        chrono::Utc::now(),
    ));
    Ok(())
}

async fn pitr_prune(
    store: &Store,
    dir: &str,
    r: Retention,
    dry_run: bool,
) -> Result<(), BackupError> {
    let retention = pitr::window::PitrRetention {
        days: r.days,
        count: r.count,
    };
    let done = pitr::prune(store, dir, retention, dry_run, |l| println!("{l}")).await?;
    println!(
        "pruned {dir}: {} base backup(s), {} WAL segment(s), {} leftover(s) {}",
        done.bases.len(),
        done.segments,
        done.leftovers,
        if dry_run {
            "would be deleted"
        } else {
            "deleted"
        }
    );
    Ok(())
}

async fn cmd_wal_fetch(a: WalFetchArgs) -> Result<(), BackupError> {
    let store = open(&a.store, false)?;
    if pitr::wal::fetch(&store, &a.cluster.dir(), &a.file, &a.path).await? {
        Ok(())
    } else {
        // PostgreSQL asks for files past the end of the archive: normal, not an error
        // worth a loud message, but the exit status must say "not there".
        Err(BackupError::NotFound {
            what: format!("archived WAL file {}", a.file),
            store: store.describe().to_string(),
        })
    }
}

async fn cmd_list(a: ListArgs) -> Result<(), BackupError> {
    let store = open(&a.store, false)?;
    if a.pitr {
        let dir = a.cluster.dir();
        let cat = pitr::scan(&store, &dir).await?;
        let l = pitr::listing(&dir, &cat);
        match a.output {
            Output::Text => print!("{}", pitr::render_text(&l)),
            Output::Json => println!("{}", serde_json::to_string_pretty(&l).unwrap_or_default()),
        }
        return Ok(());
    }
    let listing = list::scan(&store, a.database.as_deref()).await?;
    match a.output {
        Output::Text => print!("{}", list::render_text(&listing)),
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&listing).unwrap_or_default()
        ),
    }
    Ok(())
}

async fn cmd_verify(a: VerifyArgs) -> Result<(), BackupError> {
    if a.pitr {
        let store = open(&a.store, false)?;
        let dir = a.cluster.dir();
        let target = a.target.target().unwrap_or(pitr::window::Target::Latest);
        let cat = pitr::scan(&store, &dir).await?;
        let cmd = pitr::restore_command(&a.store, &a.cluster)?;
        let opts = pitr::restore::VerifyOptions {
            pg_ctl: a.pg_ctl,
            timeout: a.recovery_timeout,
            keep: a.keep,
        };
        let v = pitr::restore::verify(&store, &dir, &cat, &target, &cmd, &opts).await?;
        println!(
            "verified point-in-time recovery of {dir} to {target} from base backup {} in {:.1}s{}{}",
            v.base,
            v.seconds,
            v.stopped.map(|s| format!(": {s}")).unwrap_or_default(),
            v.scratch
                .map(|p| format!(" (kept in {})", p.display()))
                .unwrap_or_default()
        );
        return Ok(());
    }
    let url = need_url(a.database_url)?;
    let store = open(&a.store, false)?;
    let opts = verify::VerifyOptions {
        backup: a.backup,
        database: a.database,
        pg_restore: a.pg_restore,
    };
    print_verified(verify::verify(&store, &url, &opts).await?);
    Ok(())
}

async fn cmd_prune(a: PruneArgs) -> Result<(), BackupError> {
    let store = open(&a.store, false)?;
    if a.pitr {
        let r = a.retention.retention();
        if !r.is_set() {
            return Err(BackupError::Usage(
                "prune --pitr needs --retention-days or --retention-count".into(),
            ));
        }
        return pitr_prune(&store, &a.cluster.dir(), r, a.dry_run).await;
    }
    prune_and_print(
        &store,
        a.database.as_deref(),
        a.retention.retention(),
        a.dry_run,
    )
    .await
}

/// Prints what prune will do (every backup with its state and the reason for its
/// verdict) before it deletes anything, then each deletion as it completes.
async fn prune_and_print(
    store: &Store,
    database: Option<&str>,
    retention: Retention,
    dry_run: bool,
) -> Result<(), BackupError> {
    let plan = prune::plan(store, database, retention, Utc::now()).await?;
    let delete = if dry_run {
        "would delete"
    } else {
        "will delete"
    };
    for d in &plan.decisions {
        let verb = if d.keep { "keep" } else { delete };
        println!("{verb} {} ({}): {}", d.name(), d.state, d.why);
    }
    for l in &plan.leftovers {
        println!("{delete} leftover {}/{}: {}", l.database_dir, l.file, l.why);
    }
    for f in &plan.staging_files {
        println!(
            "{delete} leftover {}: staging file of an upload that never completed",
            f.display()
        );
    }
    let deleted = plan.decisions.iter().filter(|d| !d.keep).count();
    let kept = plan.decisions.len() - deleted;
    let leftovers = plan.leftovers.len() + plan.staging_files.len();
    let verb = if dry_run {
        "would be deleted"
    } else {
        let report = prune::execute(store, &plan, |line| println!("{line}")).await?;
        debug_assert_eq!(report.deleted.len(), deleted);
        "deleted"
    };
    println!("pruned: {deleted} backup(s) {verb}, {kept} kept, {leftovers} leftover(s) {verb}");
    Ok(())
}

fn print_verified(v: verify::Verified) {
    println!(
        "verified {}/{}: restored in {:.1}s, {} table(s) and {} row(s) match the manifest",
        v.database, v.id, v.restore_seconds, v.tables, v.rows
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn termination_messages_are_small_json_without_secrets() {
        let e = BackupError::PgDump {
            status: "exit status: 1".into(),
            stderr: "x".repeat(10_000),
        };
        let v: serde_json::Value =
            serde_json::from_str(&termination_message(None, Some(&e))).unwrap();
        assert_eq!(v["result"], "Failed");
        assert_eq!(v["reason"], "DumpFailed");
        assert!(
            v.to_string().len() < 4096,
            "Kubernetes keeps at most 4096 bytes"
        );
        let ok: serde_json::Value = serde_json::from_str(&termination_message(None, None)).unwrap();
        assert_eq!(ok["result"], "Succeeded");
    }
}
