//! Physical base backups: `pg_basebackup` in tar format (gzip, with the WAL it needs and
//! its backup manifest), checked by `pg_verifybackup` on an unpacked copy before anything
//! is stored, then uploaded: the tars, the manifest, and last the record that makes it a
//! base backup (start/stop LSN and time, checksums). A run killed before the record
//! leaves objects no record names, which `prune --pitr` removes.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::wal::{hex, Lsn, NotAnLsn};
use super::window::BaseInfo;
use super::PitrError;
use crate::backup::manifest::backup_id;
use crate::backup::store::Store;
use crate::backup::tools::{self, LibpqEnv};
use crate::backup::ArgsError;

pub(crate) const BASE_PREFIX: &str = "base-";
pub(crate) const RECORD_SUFFIX: &str = ".json";
/// The tars pg_basebackup writes, and their names in the store after `base-<id>.`.
pub(crate) const PARTS: [(&str, &str); 3] = [
    ("base.tar.gz", "base.tar.gz"),
    ("pg_wal.tar.gz", "pg_wal.tar.gz"),
    ("backup_manifest", "backup_manifest"),
];

/// The record of a base backup, written last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct BaseRecord {
    pub id: String,
    pub timeline: u32,
    pub start_lsn: Lsn,
    pub end_lsn: Lsn,
    pub wal_segment_size: u64,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    /// `pg_basebackup --version`.
    pub pg_basebackup_version: String,
    pub files: Vec<BaseFile>,
    pub dbpolicy_version: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct BaseFile {
    /// Object name in the store.
    pub object: String,
    /// Name pg_basebackup gave it.
    pub name: String,
    pub size_bytes: u64,
    pub sha256: String,
}

impl BaseRecord {
    pub(crate) fn info(&self) -> BaseInfo {
        BaseInfo {
            id: self.id.clone(),
            timeline: self.timeline,
            start_lsn: self.start_lsn,
            end_lsn: self.end_lsn,
            wal_segment_size: self.wal_segment_size,
            started_at: self.started_at,
            finished_at: self.finished_at,
        }
    }

    pub(crate) fn record_file(id: &str) -> String {
        format!("{BASE_PREFIX}{id}{RECORD_SUFFIX}")
    }
}

/// A `backup_manifest` (pg_basebackup's) whose WAL range cannot be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WalRangeError {
    #[error("backup_manifest is not JSON: {0}")]
    NotJson(#[source] serde_json::Error),
    #[error("backup_manifest has no WAL-Ranges")]
    NoRanges,
    #[error(
        "backup_manifest has {0} WAL ranges; a backup spanning a timeline switch is not supported"
    )]
    SeveralRanges(usize),
    #[error("WAL-Ranges has no {0}")]
    Missing(&'static str),
    #[error(transparent)]
    Lsn(#[from] NotAnLsn),
}

/// `WAL-Ranges` of a backup manifest: timeline, start and end LSN.
pub(crate) fn wal_range(manifest: &[u8]) -> Result<(u32, Lsn, Lsn), WalRangeError> {
    let v: serde_json::Value = serde_json::from_slice(manifest).map_err(WalRangeError::NotJson)?;
    let ranges = v
        .get("WAL-Ranges")
        .and_then(|r| r.as_array())
        .ok_or(WalRangeError::NoRanges)?;
    let [range] = &ranges[..] else {
        return Err(WalRangeError::SeveralRanges(ranges.len()));
    };
    let lsn = |k: &'static str| -> Result<Lsn, WalRangeError> {
        Ok(range
            .get(k)
            .and_then(|s| s.as_str())
            .ok_or(WalRangeError::Missing(k))?
            .parse()?)
    };
    let tli = range
        .get("Timeline")
        .and_then(|t| t.as_u64())
        .and_then(|t| u32::try_from(t).ok())
        .ok_or(WalRangeError::Missing("Timeline"))?;
    Ok((tli, lsn("Start-LSN")?, lsn("End-LSN")?))
}

/// Unpacks a (gzip) tar into `dir`, refusing entries that leave it. pg_basebackup writes
/// its WAL tar as several gzip members: all are read.
pub(crate) fn untar_gz(file: &Path, dir: &Path) -> Result<(), PitrError> {
    let f = std::fs::File::open(file)
        .map_err(|e| PitrError::Io(format!("opening {}: {e}", file.display())))?;
    let mut archive = tar::Archive::new(flate2::read::MultiGzDecoder::new(
        std::io::BufReader::new(f),
    ));
    archive.set_preserve_permissions(true);
    std::fs::create_dir_all(dir)
        .map_err(|e| PitrError::Io(format!("creating {}: {e}", dir.display())))?;
    let entries = archive
        .entries()
        .map_err(|e| PitrError::Io(format!("reading {}: {e}", file.display())))?;
    for entry in entries {
        let mut entry =
            entry.map_err(|e| PitrError::Io(format!("reading {}: {e}", file.display())))?;
        // `unpack_in` skips entries with `..` or an absolute path.
        entry.unpack_in(dir).map_err(|e| {
            PitrError::Io(format!(
                "unpacking {} into {}: {e}",
                file.display(),
                dir.display()
            ))
        })?;
    }
    Ok(())
}

fn sha256_file(path: &Path) -> Result<(u64, String), PitrError> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)
        .map_err(|e| PitrError::Io(format!("reading {}: {e}", path.display())))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f
            .read(&mut buf)
            .map_err(|e| PitrError::Io(format!("reading {}: {e}", path.display())))?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((n, hex(&h.finalize())))
}

async fn upload_file(store: &Store, dir: &str, object: &str, path: &Path) -> Result<(), PitrError> {
    use tokio::io::AsyncReadExt;
    let (mut w, key) = store.writer(dir, object);
    let mut f = tokio::fs::File::open(path)
        .await
        .map_err(|e| PitrError::Io(format!("reading {}: {e}", path.display())))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let k = f
            .read(&mut buf)
            .await
            .map_err(|e| PitrError::Io(format!("reading {}: {e}", path.display())))?;
        if k == 0 {
            break;
        }
        if let Err(e) = w.write_all(&buf[..k]).await {
            let _ = w.abort().await;
            return Err(PitrError::Io(format!("uploading {key}: {e}")));
        }
    }
    w.shutdown()
        .await
        .map_err(|e| PitrError::Io(format!("uploading {key}: {e}")))
}

#[derive(Debug, Clone, Default)]
pub(crate) struct BaseOptions {
    pub pg_basebackup: Option<PathBuf>,
    pub pg_verifybackup: Option<PathBuf>,
    /// Where the backup is written and checked before upload (default: the system's
    /// temporary directory); needs about twice the database's size.
    pub work_dir: Option<PathBuf>,
}

/// `dbpolicy backup base`.
pub(crate) async fn run(
    store: &Store,
    dir: &str,
    url: &str,
    opts: &BaseOptions,
) -> Result<BaseRecord, PitrError> {
    let env = LibpqEnv::from_url(url).map_err(ArgsError::from)?;
    let basebackup = tools::find("pg_basebackup", opts.pg_basebackup.as_deref(), None)
        .await
        .map_err(PitrError::FindTool)?;
    let verifybackup = tools::find("pg_verifybackup", opts.pg_verifybackup.as_deref(), None)
        .await
        .map_err(PitrError::FindTool)?;
    let work = match &opts.work_dir {
        Some(d) => tempfile::Builder::new()
            .prefix("dbpolicy-base-")
            .tempdir_in(d),
        None => tempfile::Builder::new().prefix("dbpolicy-base-").tempdir(),
    }
    .map_err(|e| PitrError::Io(format!("creating a work directory: {e}")))?;
    let out_dir = work.path().join("backup");
    let started_at = Utc::now();
    let id = backup_id(started_at);
    let mut cmd = tokio::process::Command::new(&basebackup.path);
    env.apply(&mut cmd);
    cmd.arg("-D")
        .arg(&out_dir)
        .args([
            "--format=tar",
            "--gzip",
            "--wal-method=stream",
            "--checkpoint=fast",
        ])
        .args(["--manifest-checksums=SHA256", "--no-password"])
        .arg(format!("--label=dbpolicy {id}"))
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = cmd
        .output()
        .await
        .map_err(|e| PitrError::Tool(format!("{}: {e}", basebackup.path.display())))?;
    if !out.status.success() {
        return Err(PitrError::BaseBackup(format!(
            "pg_basebackup failed ({}); nothing was stored:\n{}",
            out.status,
            tools::tail(&out.stderr, 3000)
        )));
    }
    let mut produced: Vec<String> = std::fs::read_dir(&out_dir)
        .map_err(|e| PitrError::Io(format!("reading {}: {e}", out_dir.display())))?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    produced.sort();
    let expected: Vec<&str> = PARTS.iter().map(|(n, _)| *n).collect();
    if produced.iter().any(|p| !expected.contains(&p.as_str())) {
        return Err(PitrError::BaseBackup(format!(
            "pg_basebackup wrote {produced:?}: tablespaces outside the data directory are not \
             supported yet; nothing was stored"
        )));
    }
    // pg_verifybackup 15 reads plain backups only: check an unpacked copy.
    let check = work.path().join("check");
    untar_gz(&out_dir.join("base.tar.gz"), &check)?;
    untar_gz(&out_dir.join("pg_wal.tar.gz"), &check.join("pg_wal"))?;
    std::fs::copy(
        out_dir.join("backup_manifest"),
        check.join("backup_manifest"),
    )
    .map_err(|e| PitrError::Io(format!("copying backup_manifest: {e}")))?;
    let out = tokio::process::Command::new(&verifybackup.path)
        .arg(&check)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| PitrError::Tool(format!("{}: {e}", verifybackup.path.display())))?;
    if !out.status.success() {
        return Err(PitrError::BaseBackup(format!(
            "pg_verifybackup found the new base backup damaged ({}); nothing was stored:\n{}",
            out.status,
            tools::tail(&out.stderr, 3000)
        )));
    }
    let manifest = std::fs::read(out_dir.join("backup_manifest"))
        .map_err(|e| PitrError::Io(format!("reading backup_manifest: {e}")))?;
    let (timeline, start_lsn, end_lsn) = wal_range(&manifest)?;
    let wal_segment_size = segment_size_in(&check.join("pg_wal"))?;
    // The check copy is no longer needed: free its space before uploading.
    let _ = std::fs::remove_dir_all(&check);
    let mut files = Vec::new();
    for (name, suffix) in PARTS {
        let path = out_dir.join(name);
        let (size_bytes, sha256) = sha256_file(&path)?;
        let object = format!("{BASE_PREFIX}{id}.{suffix}");
        upload_file(store, dir, &object, &path).await?;
        files.push(BaseFile {
            object,
            name: name.to_string(),
            size_bytes,
            sha256,
        });
    }
    let record = BaseRecord {
        id: id.clone(),
        timeline,
        start_lsn,
        end_lsn,
        wal_segment_size,
        started_at,
        finished_at: Utc::now(),
        pg_basebackup_version: basebackup.version.clone(),
        files,
        dbpolicy_version: env!("CARGO_PKG_VERSION").to_string(),
    };
    let json = serde_json::to_vec_pretty(&record).expect("a record always serialises");
    store.put(dir, &BaseRecord::record_file(&id), json).await?;
    Ok(record)
}

/// The WAL segment size: the size of the segments `pg_basebackup` streamed.
fn segment_size_in(pg_wal: &Path) -> Result<u64, PitrError> {
    let rd = std::fs::read_dir(pg_wal)
        .map_err(|e| PitrError::Io(format!("reading {}: {e}", pg_wal.display())))?;
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if super::wal::is_segment_file(&name) {
            let len = e.metadata().map(|m| m.len()).unwrap_or(0);
            if len.is_power_of_two() && (1 << 20..=1 << 30).contains(&len) {
                return Ok(len);
            }
        }
    }
    Err(PitrError::BaseBackup(
        "the base backup holds no WAL segment to learn the segment size from".into(),
    ))
}

/// Downloads one part of a base backup to `to`, checking its SHA-256.
pub(crate) async fn download(
    store: &Store,
    dir: &str,
    file: &BaseFile,
    to: &Path,
) -> Result<(), PitrError> {
    use std::io::Write;
    let mut f = std::fs::File::create(to)
        .map_err(|e| PitrError::Io(format!("creating {}: {e}", to.display())))?;
    let mut h = Sha256::new();
    store
        .get_stream(dir, &file.object, |chunk| {
            h.update(chunk);
            f.write_all(chunk)
        })
        .await?;
    let sha = hex(&h.finalize());
    if sha != file.sha256 {
        return Err(PitrError::CorruptBase {
            object: file.object.clone(),
            reason: format!("SHA-256 {sha} does not match its record ({})", file.sha256),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_wal_range_of_a_backup_manifest() {
        let m = br#"{"PostgreSQL-Backup-Manifest-Version": 1, "Files": [],
            "WAL-Ranges": [{ "Timeline": 1, "Start-LSN": "0/2000028", "End-LSN": "0/2000100" }]}"#;
        assert_eq!(wal_range(m).unwrap(), (1, Lsn(0x200_0028), Lsn(0x200_0100)));
        assert!(wal_range(b"{}").is_err());
        assert!(wal_range(br#"{"WAL-Ranges": []}"#)
            .unwrap_err()
            .to_string()
            .contains("0 WAL ranges"));
        assert!(wal_range(
            br#"{"WAL-Ranges": [{"Timeline": 1, "Start-LSN": "x", "End-LSN": "0/1"}]}"#
        )
        .is_err());
    }

    #[test]
    fn untar_refuses_to_leave_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let tgz = dir.path().join("evil.tar.gz");
        {
            let f = std::fs::File::create(&tgz).unwrap();
            let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
                f,
                flate2::Compression::fast(),
            ));
            let mut h = tar::Header::new_gnu();
            h.set_size(1);
            h.set_mode(0o600);
            // Bypass the builder's own path checks.
            h.as_gnu_mut().unwrap().name[..12].copy_from_slice(b"../escaped\0\0");
            h.set_cksum();
            b.append(&h, &b"x"[..]).unwrap();
            let mut h = tar::Header::new_gnu();
            h.set_size(1);
            h.set_mode(0o600);
            b.append_data(&mut h, "PG_VERSION", &b"5"[..]).unwrap();
            b.into_inner().unwrap().finish().unwrap();
        }
        let out = dir.path().join("out");
        untar_gz(&tgz, &out).unwrap();
        assert!(out.join("PG_VERSION").exists());
        assert!(!dir.path().join("escaped").exists());
    }
}
