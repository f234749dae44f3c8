//! Point-in-time recovery: WAL streamed over the replication protocol into the backup
//! store ([`wal`]), physical base backups ([`base`]), the recoverable window and retention
//! ([`window`], pure), and restores to a time, an LSN or the latest WAL ([`restore`]).
//!
//! Store layout, under the store's prefix, in one directory per server
//! (`pitr.<cluster>`): `<walfile>.gz` and its checksum record `<walfile>.json`;
//! `base-<id>.{base.tar.gz,pg_wal.tar.gz,backup_manifest}` and the record
//! `base-<id>.json`, written last. No name ends in `.dump`, `.manifest.json` or
//! `.verify.json`, so the logical dumps' listing and prune never touch these.

pub(crate) mod base;
pub(crate) mod restore;
pub mod slot;
pub(crate) mod wal;
pub(crate) mod window;

use std::path::PathBuf;

use chrono::{DateTime, Utc};
use clap::Args;
use serde::Serialize;

use self::base::{BaseRecord, BASE_PREFIX};
use self::wal::{SegmentName, DATA_SUFFIX, RECORD_SUFFIX};
use self::window::{PitrRetention, SegmentInfo, Target};
use super::store::{Entry, Store, StoreError};
use super::tools::ToolError;
use super::{ArgsError, StoreArgs};
use crate::reason::Reason;

/// Default segment size when no base backup tells it (PostgreSQL's default).
const DEFAULT_SEGMENT_SIZE: u64 = 16 * 1024 * 1024;
/// How old an object no record names must be before prune deletes it: a base backup
/// being uploaded right now has no record yet.
const LEFTOVER_GRACE_HOURS: i64 = 24;

/// One variant per step.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PitrError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Args(#[from] ArgsError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Tool(String),
    #[error(transparent)]
    FindTool(#[from] ToolError),
    #[error("{0}")]
    Io(String),
    #[error("WAL receiver: {0}")]
    Receiver(String),
    #[error("base backup: {0}")]
    BaseBackup(String),
    #[error("base backup: {0}")]
    BaseManifest(#[from] base::WalRangeError),
    #[error("archived WAL file {file} is corrupt: {reason}")]
    CorruptWal { file: String, reason: String },
    #[error("base backup object {object} is corrupt: {reason}")]
    CorruptBase { object: String, reason: String },
    #[error("archiving {file}: {reason}")]
    Conflict { file: String, reason: String },
    #[error(transparent)]
    NoBase(#[from] window::NotRecoverable),
    #[error("point-in-time restore from base backup {base} failed verification: {reason}")]
    VerifyFailed { base: String, reason: String },
    #[error("interrupted by {0}")]
    Interrupted(&'static str),
}

impl PitrError {
    /// CamelCase reason, for conditions and metrics.
    pub(crate) fn reason(&self) -> Reason {
        match self {
            PitrError::Usage(_) | PitrError::Args(_) => Reason::InvalidArguments,
            PitrError::Store(_) => Reason::StoreFailed,
            PitrError::Tool(_) | PitrError::FindTool(_) => Reason::ToolFailed,
            PitrError::Io(_) => Reason::LocalIoFailed,
            PitrError::Receiver(_) => Reason::WalReceiverFailed,
            PitrError::BaseBackup(_) | PitrError::BaseManifest(_) => Reason::BaseBackupFailed,
            PitrError::CorruptWal { .. } => Reason::WalCorrupt,
            PitrError::CorruptBase { .. } => Reason::BaseBackupCorrupt,
            PitrError::Conflict { .. } => Reason::WalConflict,
            PitrError::NoBase(_) => Reason::TargetNotRecoverable,
            PitrError::VerifyFailed { .. } => Reason::PitrVerifyFailed,
            PitrError::Interrupted(_) => Reason::Interrupted,
        }
    }
}

/// Which server's WAL and base backups, in the store.
#[derive(Args, Debug, Clone)]
pub struct ClusterArgs {
    /// Name of the server's directory in the store (`pitr.<NAME>`); one per server.
    #[arg(long, env = "DBPOLICY_PITR_CLUSTER", default_value = "main", value_parser = parse_cluster)]
    pub cluster: String,
}

fn parse_cluster(s: &str) -> Result<String, ArgsError> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    ok.then(|| s.to_string())
        .ok_or_else(|| ArgsError::ClusterName(s.to_string()))
}

impl ClusterArgs {
    pub(crate) fn dir(&self) -> String {
        format!("pitr.{}", self.cluster)
    }
}

/// Everything committed in a server's directory, from one listing and one read per base
/// backup record (segment records are not read: their listing time is their time, see
/// [`window::archived_by`]).
#[derive(Debug, Default, Clone)]
pub(crate) struct Catalog {
    /// Oldest first.
    pub bases: Vec<BaseRecord>,
    pub segments: Vec<SegmentInfo>,
    /// Objects no record names: uploads a kill interrupted.
    pub leftovers: Vec<Entry>,
    pub unreadable: Vec<(String, String)>,
}

pub(crate) async fn scan(store: &Store, dir: &str) -> Result<Catalog, PitrError> {
    let entries: Vec<Entry> = store
        .list(Some(dir))
        .await?
        .into_iter()
        .filter(|e| e.database == dir)
        .collect();
    let has = |f: &str| entries.iter().any(|e| e.file == f);
    let mut cat = Catalog::default();
    for e in &entries {
        if e.file.starts_with(BASE_PREFIX) && e.file.ends_with(base::RECORD_SUFFIX) {
            let bytes = store.get(dir, &e.file).await?;
            match serde_json::from_slice::<BaseRecord>(&bytes) {
                Ok(r) if BaseRecord::record_file(&r.id) == e.file => cat.bases.push(r),
                Ok(_) => cat
                    .unreadable
                    .push((e.file.clone(), "names another base backup".into())),
                Err(err) => cat.unreadable.push((e.file.clone(), err.to_string())),
            }
        }
    }
    cat.bases.sort_by(|a, b| a.id.cmp(&b.id));
    let size = cat
        .bases
        .last()
        .map_or(DEFAULT_SEGMENT_SIZE, |b| b.wal_segment_size);
    for e in &entries {
        if let Some(id_part) = e.file.strip_prefix(BASE_PREFIX) {
            let named = cat
                .bases
                .iter()
                .any(|b| id_part.starts_with(&format!("{}.", b.id)));
            if !named {
                cat.leftovers.push(e.clone());
            }
        } else if let Some(f) = e.file.strip_suffix(RECORD_SUFFIX) {
            if let Some(name) = SegmentName::parse(f, size) {
                if has(&format!("{f}{DATA_SUFFIX}")) {
                    cat.segments.push(SegmentInfo {
                        name,
                        archived_at: window::archived_by(e.last_modified),
                    });
                }
            }
        } else if let Some(f) = e.file.strip_suffix(DATA_SUFFIX) {
            if wal::is_wal_file(f) && !has(&format!("{f}{RECORD_SUFFIX}")) {
                cat.leftovers.push(e.clone());
            }
        }
    }
    cat.segments.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(cat)
}

/// The `restore_command` for a store: this very binary, with the store flags it was
/// given (credentials stay in the environment, never in the command).
pub(crate) fn restore_command(
    store: &StoreArgs,
    cluster: &ClusterArgs,
) -> Result<String, PitrError> {
    // The server's OS user runs this command: `DBPOLICY_RESTORE_BIN` names a copy it can
    // execute when this binary sits where it cannot (e.g. under root's home directory).
    let exe = match std::env::var_os("DBPOLICY_RESTORE_BIN") {
        Some(path) => std::path::PathBuf::from(path),
        None => std::env::current_exe()
            .map_err(|e| PitrError::Io(format!("finding the dbpolicy binary: {e}")))?,
    };
    let mut words = vec![
        exe.display().to_string(),
        "backup".into(),
        "wal-fetch".into(),
    ];
    if let Some(d) = &store.dir {
        let abs =
            std::path::absolute(d).map_err(|e| PitrError::Io(format!("{}: {e}", d.display())))?;
        words.extend(["--dir".into(), abs.display().to_string()]);
    }
    let mut flag = |name: &str, v: &Option<String>| {
        if let Some(v) = v.as_ref().filter(|v| !v.is_empty()) {
            words.extend([name.to_string(), v.clone()]);
        }
    };
    flag("--s3-bucket", &store.s3_bucket);
    flag("--s3-endpoint", &store.s3_endpoint);
    flag("--s3-region", &store.s3_region);
    flag("--s3-prefix", &store.s3_prefix);
    words.extend(["--cluster".into(), cluster.cluster.clone()]);
    let mut cmd: Vec<String> = words.iter().map(|w| restore::shell_word(w)).collect();
    cmd.extend(["%f".into(), "%p".into()]);
    Ok(cmd.join(" "))
}

/// The window and each base backup, for `backup list --pitr`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct PitrListing {
    pub cluster_dir: String,
    pub window: window::Window,
    pub segments: usize,
    pub latest_segment: Option<String>,
    pub leftovers: Vec<String>,
}

pub(crate) fn listing(dir: &str, cat: &Catalog) -> PitrListing {
    let infos: Vec<_> = cat.bases.iter().map(BaseRecord::info).collect();
    PitrListing {
        cluster_dir: dir.to_string(),
        window: window::window(&infos, &cat.segments),
        segments: cat.segments.len(),
        latest_segment: cat.segments.last().map(|s| s.name.to_string()),
        leftovers: cat.leftovers.iter().map(|e| e.file.clone()).collect(),
    }
}

pub(crate) fn render_text(l: &PitrListing) -> String {
    let show = |t: Option<DateTime<Utc>>| t.map_or("-".to_string(), |t| t.to_rfc3339());
    let mut s = format!(
        "# {}: recoverable from {} to {} ({} WAL segment(s) archived, latest {})\n",
        l.cluster_dir,
        show(l.window.earliest),
        show(l.window.latest),
        l.segments,
        l.latest_segment.as_deref().unwrap_or("-")
    );
    s.push_str(
        "BASE BACKUP           RECOVERABLE FROM           TO                         SEGMENTS\n",
    );
    for r in &l.window.bases {
        s.push_str(&format!(
            "{:<21} {:<26} {:<26} {}\n",
            r.base,
            r.from.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            r.to.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            r.segments
        ));
        if let Some(g) = &r.gap_at {
            s.push_str(&format!(
                "# {}: WAL segment {g} is missing: recovery from it stops there\n",
                r.base
            ));
        }
    }
    for f in &l.leftovers {
        s.push_str(&format!(
            "# leftover {f}: an upload a kill interrupted (prune --pitr removes it)\n"
        ));
    }
    s
}

/// What a prune did.
#[derive(Debug, Default)]
pub(crate) struct Pruned {
    pub bases: Vec<String>,
    pub segments: usize,
    pub leftovers: usize,
}

/// Deletes whole base backups first (record first: from then on it is not a base
/// backup), then the WAL no kept base backup needs, then old leftovers. A prune killed
/// half-way leaves leftovers or WAL older than every base backup: the next one removes
/// them, and the window stays recoverable throughout.
pub(crate) async fn prune(
    store: &Store,
    dir: &str,
    retention: PitrRetention,
    dry_run: bool,
    mut say: impl FnMut(String),
) -> Result<Pruned, PitrError> {
    let cat = scan(store, dir).await?;
    let infos: Vec<_> = cat.bases.iter().map(BaseRecord::info).collect();
    let now = Utc::now();
    let plan = window::plan_prune(&infos, &cat.segments, retention, now);
    let verb = if dry_run { "would delete" } else { "deleted" };
    let mut done = Pruned::default();
    for id in &plan.delete_bases {
        let record = cat
            .bases
            .iter()
            .find(|b| &b.id == id)
            .expect("planned from these");
        if !dry_run {
            store.delete(dir, &BaseRecord::record_file(id)).await?;
            for f in &record.files {
                store.delete(dir, &f.object).await?;
            }
        }
        say(format!("{verb} base backup {id}"));
        done.bases.push(id.clone());
    }
    for s in &plan.delete_segments {
        if !dry_run {
            let name = s.to_string();
            store.delete(dir, &format!("{name}{RECORD_SUFFIX}")).await?;
            store.delete(dir, &format!("{name}{DATA_SUFFIX}")).await?;
        }
        done.segments += 1;
    }
    if let (Some(first), Some(last)) = (plan.delete_segments.first(), plan.delete_segments.last()) {
        say(format!(
            "{verb} {} WAL segment(s) {first} … {last}: older than the oldest base backup kept",
            plan.delete_segments.len()
        ));
    }
    for e in &cat.leftovers {
        if now.signed_duration_since(e.last_modified)
            >= chrono::Duration::hours(LEFTOVER_GRACE_HOURS)
        {
            if !dry_run {
                store.delete(dir, &e.file).await?;
            }
            say(format!("{verb} leftover {}", e.file));
            done.leftovers += 1;
        }
    }
    for id in &plan.keep_bases {
        say(format!("keep base backup {id}"));
    }
    Ok(done)
}

/// `--target-time`, `--target-lsn`, `--latest`: exactly one.
#[derive(Args, Debug, Clone, Default)]
#[group(required = false, multiple = false)]
pub struct TargetArgs {
    /// Recover up to this time (RFC 3339, e.g. 2026-11-25T03:12:00Z): transactions
    /// committed at or before it are kept, later ones are not.
    #[arg(long, value_parser = restore::parse_time)]
    pub target_time: Option<DateTime<Utc>>,
    /// Recover up to this WAL position (e.g. 0/3000148).
    #[arg(long)]
    pub target_lsn: Option<wal::Lsn>,
    /// Recover everything archived.
    #[arg(long)]
    pub latest: bool,
}

impl TargetArgs {
    pub(crate) fn target(&self) -> Option<Target> {
        match (self.target_time, self.target_lsn, self.latest) {
            (Some(t), _, _) => Some(Target::Time(t)),
            (_, Some(l), _) => Some(Target::Lsn(l)),
            (_, _, true) => Some(Target::Latest),
            _ => None,
        }
    }
}

/// `dbpolicy restore`.
#[derive(Args, Debug)]
pub struct RestoreArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    #[command(flatten)]
    pub target: TargetArgs,
    /// The new data directory (absent or empty).
    #[arg(long)]
    pub to: PathBuf,
    /// What the server does on reaching the target.
    #[arg(long, value_enum, default_value_t = restore::Action::Promote)]
    pub action: restore::Action,
}

pub(crate) async fn cmd_restore(a: RestoreArgs) -> u8 {
    let result = async {
        let target = a.target.target().ok_or_else(|| {
            PitrError::Usage("say what to recover to: --target-time T, --target-lsn L or --latest".into())
        })?;
        let store = open(&a.store)?;
        let dir = a.cluster.dir();
        let cat = scan(&store, &dir).await?;
        let cmd = restore_command(&a.store, &a.cluster)?;
        let r = restore::restore(&store, &dir, &cat, &target, &a.to, &cmd, a.action).await?;
        println!(
            "restored base backup {} into {}; PostgreSQL will recover it to {target} when started \
             (fetching WAL with: {cmd})",
            r.base.id,
            r.dir.display()
        );
        println!(
            "next: chown -R postgres {0}; then start it, e.g. pg_ctl -D {0} -l {0}/restore.log start",
            r.dir.display()
        );
        Ok::<_, PitrError>(())
    }
    .await;
    report("restore", result)
}

pub(crate) fn open(store: &StoreArgs) -> Result<Store, PitrError> {
    let config = store.config()?;
    Store::open(&config, false).map_err(PitrError::from)
}

pub(crate) fn report(what: &str, result: Result<(), PitrError>) -> u8 {
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {what}: {e} [{}]", e.reason());
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn restore_takes_exactly_one_target() {
        use crate::cli::{Cli, Command};
        let parse = |args: &[&str]| {
            let mut all = vec!["dbpolicy", "restore", "--dir", "/b", "--to", "/r"];
            all.extend(args);
            Cli::try_parse_from(all)
        };
        let Command::Restore(a) = parse(&["--target-time", "2026-11-25T03:12:00Z"])
            .unwrap()
            .command
        else {
            panic!("restore")
        };
        assert!(matches!(a.target.target(), Some(Target::Time(_))));
        assert_eq!(a.cluster.dir(), "pitr.main");
        assert!(parse(&["--target-time", "2026-11-25T03:12:00Z", "--latest"]).is_err());
        assert!(parse(&["--target-lsn", "nonsense"]).is_err());
        assert!(parse(&["--latest", "--cluster", "../x"]).is_err());
    }

    #[test]
    fn restore_command_quotes_the_store_and_keeps_percent_signs_literal() {
        let store = StoreArgs {
            dir: Some(PathBuf::from("/backups/it's 100%")),
            ..Default::default()
        };
        let cluster = ClusterArgs {
            cluster: "main".into(),
        };
        let cmd = restore_command(&store, &cluster).unwrap();
        assert!(
            cmd.contains("'backup' 'wal-fetch' '--dir' '/backups/it'\\''s 100%%'"),
            "{cmd}"
        );
        assert!(cmd.ends_with("'--cluster' 'main' %f %p"), "{cmd}");
    }
}
