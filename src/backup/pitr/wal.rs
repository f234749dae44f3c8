//! WAL in the store: segment and LSN arithmetic, the commit protocol of one archived file
//! (compressed data first, then a small checksum record: a file without its record is not
//! archived), `wal-fetch` (what `restore_command` runs) and `wal-receive` (the receiver:
//! `pg_receivewal` into a spool directory, each completed file shipped, then removed).
//!
//! Why nothing is lost when the receiver is killed: `pg_receivewal` writes the segment
//! being received as `<name>.partial` and renames it only once it is complete and synced,
//! and the slot keeps on the server every byte not yet confirmed as synced. A completed
//! segment stays in the spool until both of its objects are stored; a restart uploads
//! what it finds there, and `pg_receivewal` resumes from the `.partial` file or, when the
//! spool is empty, from the slot. The spool must therefore outlive the process (a
//! PersistentVolumeClaim in Kubernetes).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::PitrError;
use crate::backup::store::Store;
use crate::backup::tools::{self, LibpqEnv};
use crate::backup::ArgsError;

/// A WAL position, printed as PostgreSQL does (`0/3000148`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct Lsn(pub u64);

impl Lsn {
    pub(crate) fn segno(self, segment_size: u64) -> u64 {
        self.0 / segment_size
    }
}

impl std::fmt::Display for Lsn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// Text that is not an LSN (`pub` as `Lsn` is: the error of its `FromStr`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an LSN (like 0/3000148)")]
pub struct NotAnLsn(String);

impl std::str::FromStr for Lsn {
    type Err = NotAnLsn;
    fn from_str(s: &str) -> Result<Lsn, NotAnLsn> {
        let bad = || NotAnLsn(s.to_string());
        let (hi, lo) = s.split_once('/').ok_or_else(bad)?;
        let ok =
            |p: &str| !p.is_empty() && p.len() <= 8 && p.bytes().all(|b| b.is_ascii_hexdigit());
        if !ok(hi) || !ok(lo) {
            return Err(bad());
        }
        let hi = u64::from_str_radix(hi, 16).map_err(|_| bad())?;
        let lo = u64::from_str_radix(lo, 16).map_err(|_| bad())?;
        Ok(Lsn(hi << 32 | lo))
    }
}

impl From<Lsn> for String {
    fn from(l: Lsn) -> String {
        l.to_string()
    }
}

impl TryFrom<String> for Lsn {
    type Error = NotAnLsn;
    fn try_from(s: String) -> Result<Lsn, NotAnLsn> {
        s.parse()
    }
}

/// A WAL segment file name: timeline and segment number (`000000010000000000000003`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct SegmentName {
    pub timeline: u32,
    pub segno: u64,
    segments_per_id: u64,
}

impl SegmentName {
    pub(crate) fn new(timeline: u32, segno: u64, segment_size: u64) -> SegmentName {
        SegmentName {
            timeline,
            segno,
            segments_per_id: 0x1_0000_0000 / segment_size.max(1),
        }
    }

    /// Parses a 24-hex-digit name; the segment size is needed to number it.
    pub(crate) fn parse(name: &str, segment_size: u64) -> Option<SegmentName> {
        if !is_segment_file(name) {
            return None;
        }
        let tli = u32::from_str_radix(&name[0..8], 16).ok()?;
        let hi = u64::from_str_radix(&name[8..16], 16).ok()?;
        let lo = u64::from_str_radix(&name[16..24], 16).ok()?;
        let per = 0x1_0000_0000 / segment_size.max(1);
        (lo < per).then(|| SegmentName::new(tli, hi * per + lo, segment_size))
    }
}

impl std::fmt::Display for SegmentName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let per = self.segments_per_id.max(1);
        write!(
            f,
            "{:08X}{:08X}{:08X}",
            self.timeline,
            self.segno / per,
            self.segno % per
        )
    }
}

/// `000000010000000000000003`: a WAL segment.
pub(crate) fn is_segment_file(name: &str) -> bool {
    name.len() == 24
        && name
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_lowercase())
}

/// `00000002.history`: a timeline history file.
pub(crate) fn is_history_file(name: &str) -> bool {
    name.len() == 16
        && name.ends_with(".history")
        && name[..8]
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_lowercase())
}

/// What `restore_command` may ask for and the receiver may ship: nothing else ever
/// becomes an object name (the name comes from PostgreSQL's `%f`, or a directory).
pub(crate) fn is_wal_file(name: &str) -> bool {
    is_segment_file(name) || is_history_file(name)
}

/// Object names of an archived file.
pub(crate) const DATA_SUFFIX: &str = ".gz";
pub(crate) const RECORD_SUFFIX: &str = ".json";

/// The checksum record written after the data: what makes the file archived.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct WalRecord {
    pub file: String,
    /// Bytes of the file itself (the segment size for a segment).
    pub size_bytes: u64,
    /// SHA-256 of the file itself, checked after decompression.
    pub sha256: String,
    /// Bytes of the gzip object stored.
    pub stored_bytes: u64,
    pub archived_at: DateTime<Utc>,
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Compresses a WAL file and describes it.
pub(crate) fn pack(file: &str, raw: &[u8], now: DateTime<Utc>) -> (Vec<u8>, WalRecord) {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
    gz.write_all(raw).expect("writing to memory");
    let stored = gz.finish().expect("writing to memory");
    let record = WalRecord {
        file: file.to_string(),
        size_bytes: raw.len() as u64,
        sha256: hex(&Sha256::digest(raw)),
        stored_bytes: stored.len() as u64,
        archived_at: now,
    };
    (stored, record)
}

/// Decompresses an archived file and checks it against its record.
pub(crate) fn unpack(file: &str, stored: &[u8], record: &WalRecord) -> Result<Vec<u8>, PitrError> {
    let corrupt = |reason: String| PitrError::CorruptWal {
        file: file.to_string(),
        reason,
    };
    if record.file != file {
        return Err(corrupt(format!("its record names {:?}", record.file)));
    }
    let mut raw = Vec::with_capacity(record.size_bytes.min(1 << 30) as usize);
    flate2::read::GzDecoder::new(stored)
        .take(record.size_bytes + 1)
        .read_to_end(&mut raw)
        .map_err(|e| corrupt(format!("cannot be decompressed ({e})")))?;
    if raw.len() as u64 != record.size_bytes {
        return Err(corrupt(format!(
            "{} bytes after decompression, its record says {}",
            raw.len(),
            record.size_bytes
        )));
    }
    let sha = hex(&Sha256::digest(&raw));
    if sha != record.sha256 {
        return Err(corrupt(format!(
            "SHA-256 {sha} does not match its record ({})",
            record.sha256
        )));
    }
    Ok(raw)
}

/// Stores one completed WAL file: data, then record. Storing the same file again (a
/// receiver restarted before it removed its spool copy) is no error; a different file
/// under the same name is (two servers writing into one store).
pub(crate) async fn ship(
    store: &Store,
    dir: &str,
    file: &str,
    raw: &[u8],
) -> Result<WalRecord, PitrError> {
    let (stored, record) = pack(file, raw, Utc::now());
    if let Some(existing) = read_record(store, dir, file).await? {
        if existing.sha256 == record.sha256 {
            return Ok(existing);
        }
        return Err(PitrError::Conflict {
            file: file.to_string(),
            reason: format!(
                "the store already holds a different {file} (SHA-256 {}, this one {}): is another \
                 server archiving into the same place? Give each server its own --cluster name",
                existing.sha256, record.sha256
            ),
        });
    }
    store
        .put(dir, &format!("{file}{DATA_SUFFIX}"), stored)
        .await?;
    let json = serde_json::to_vec_pretty(&record).expect("a record always serialises");
    store
        .put(dir, &format!("{file}{RECORD_SUFFIX}"), json)
        .await?;
    Ok(record)
}

pub(crate) async fn read_record(
    store: &Store,
    dir: &str,
    file: &str,
) -> Result<Option<WalRecord>, PitrError> {
    match store.get(dir, &format!("{file}{RECORD_SUFFIX}")).await {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| PitrError::CorruptWal {
                file: file.to_string(),
                reason: format!("its checksum record is unreadable ({e})"),
            }),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// `dbpolicy backup wal-fetch FILE PATH`: one archived file, verified, written to `PATH`
/// atomically (a temporary file renamed), as `restore_command` needs. `Ok(false)` when
/// the store does not hold it, which PostgreSQL takes as "the archive ends here".
pub(crate) async fn fetch(
    store: &Store,
    dir: &str,
    file: &str,
    to: &Path,
) -> Result<bool, PitrError> {
    if !is_wal_file(file) {
        return Err(PitrError::Usage(format!(
            "{file:?} is not a WAL segment or timeline history file name"
        )));
    }
    let Some(record) = read_record(store, dir, file).await? else {
        return Ok(false);
    };
    let stored = store
        .get(dir, &format!("{file}{DATA_SUFFIX}"))
        .await
        .map_err(|e| {
            if e.is_not_found() {
                PitrError::CorruptWal {
                    file: file.to_string(),
                    reason: "its checksum record is stored but its data is missing".into(),
                }
            } else {
                e.into()
            }
        })?;
    let raw = unpack(file, &stored, &record)?;
    let tmp = to.with_extension("dbpolicy-fetch");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&raw)?;
        f.sync_all()?;
        std::fs::rename(&tmp, to)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        PitrError::Io(format!("writing {}: {e}", to.display()))
    })?;
    Ok(true)
}

/// How the receiver runs.
#[derive(Debug, Clone)]
pub(crate) struct ReceiveOptions {
    pub url: String,
    pub slot: String,
    pub spool: PathBuf,
    pub pg_receivewal: Option<PathBuf>,
    /// How often the spool is scanned for completed files.
    pub poll: Duration,
}

/// A replication slot name PostgreSQL accepts: lower-case letters, digits, underscore.
pub(crate) fn check_slot_name(slot: &str) -> Result<(), ArgsError> {
    if slot.is_empty()
        || slot.len() > 63
        || !slot
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(ArgsError::SlotName(slot.to_string()));
    }
    Ok(())
}

/// Completed WAL files in the spool, oldest first (history files before segments, as a
/// new timeline's history precedes its segments).
pub(crate) fn completed_files(spool: &Path) -> Result<Vec<String>, PitrError> {
    let rd = std::fs::read_dir(spool)
        .map_err(|e| PitrError::Io(format!("reading the spool {}: {e}", spool.display())))?;
    let mut files: Vec<String> = rd
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| is_wal_file(n))
        .collect();
    files.sort_by_key(|n| (!is_history_file(n), n.clone()));
    Ok(files)
}

/// Removes `.partial` files that hold only zero bytes. `pg_receivewal` fills a new
/// segment file with zeros before writing any WAL into it; killed during that, it leaves a
/// file of an odd size that it then refuses to start with ("should be 0 or <segment
/// size> bytes"). Such a file holds no WAL (nothing was confirmed from it, so the slot
/// still has it), and removing it lets the restart resume from the slot.
pub(crate) fn remove_empty_partials(spool: &Path) -> Result<Vec<String>, PitrError> {
    let rd = std::fs::read_dir(spool)
        .map_err(|e| PitrError::Io(format!("reading the spool {}: {e}", spool.display())))?;
    let mut removed = Vec::new();
    for entry in rd.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(seg) = name.strip_suffix(".partial") else {
            continue;
        };
        if !is_segment_file(seg) {
            continue;
        }
        let path = entry.path();
        let mut f = std::fs::File::open(&path)
            .map_err(|e| PitrError::Io(format!("reading {}: {e}", path.display())))?;
        let mut buf = vec![0u8; 1 << 16];
        let mut only_zeros = true;
        loop {
            let n = f
                .read(&mut buf)
                .map_err(|e| PitrError::Io(format!("reading {}: {e}", path.display())))?;
            if n == 0 {
                break;
            }
            if buf[..n].iter().any(|&b| b != 0) {
                only_zeros = false;
                break;
            }
        }
        if only_zeros {
            std::fs::remove_file(&path)
                .map_err(|e| PitrError::Io(format!("removing {}: {e}", path.display())))?;
            removed.push(name);
        }
    }
    Ok(removed)
}

/// Ships every completed file of the spool, then removes it locally; the count shipped.
pub(crate) async fn ship_spool(store: &Store, dir: &str, spool: &Path) -> Result<usize, PitrError> {
    let mut n = 0;
    for file in completed_files(spool)? {
        let path = spool.join(&file);
        let raw = std::fs::read(&path)
            .map_err(|e| PitrError::Io(format!("reading {}: {e}", path.display())))?;
        let record = ship(store, dir, &file, &raw).await?;
        std::fs::remove_file(&path)
            .map_err(|e| PitrError::Io(format!("removing {}: {e}", path.display())))?;
        println!(
            "archived {file}: {} bytes stored, sha256 {}",
            record.stored_bytes, record.sha256
        );
        n += 1;
    }
    Ok(n)
}

fn receivewal_command(
    tool: &Path,
    env: &LibpqEnv,
    spool: &Path,
    slot: &str,
) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(tool);
    env.apply(&mut cmd);
    cmd.arg("-D")
        .arg(spool)
        .args(["--slot", slot, "--no-password"]);
    cmd.stdin(Stdio::null());
    cmd
}

/// `dbpolicy backup wal-receive`: creates the slot if missing, runs `pg_receivewal` and
/// ships completed files until it exits or a signal arrives; then ships what is complete
/// and stops. Returns only on a failure or a signal.
pub(crate) async fn receive(
    store: &Store,
    dir: &str,
    opts: &ReceiveOptions,
) -> Result<(), PitrError> {
    check_slot_name(&opts.slot)?;
    let env = LibpqEnv::from_url(&opts.url).map_err(ArgsError::from)?;
    let tool = tools::find("pg_receivewal", opts.pg_receivewal.as_deref(), None)
        .await
        .map_err(PitrError::FindTool)?;
    std::fs::create_dir_all(&opts.spool)
        .map_err(|e| PitrError::Io(format!("creating the spool {}: {e}", opts.spool.display())))?;
    // Files completed before a kill go first.
    ship_spool(store, dir, &opts.spool).await?;
    for f in remove_empty_partials(&opts.spool)? {
        eprintln!("wal-receive: removed {f}: a segment file killed while being zero-filled, holding no WAL");
    }
    // --create-slot reserves WAL at once; --if-not-exists makes a restart a no-op.
    let out = receivewal_command(&tool.path, &env, &opts.spool, &opts.slot)
        .args(["--create-slot", "--if-not-exists"])
        .output()
        .await
        .map_err(|e| PitrError::Tool(format!("{}: {e}", tool.path.display())))?;
    if !out.status.success() {
        return Err(PitrError::Receiver(format!(
            "creating the replication slot {} failed ({}): {}",
            opts.slot,
            out.status,
            tools::tail(&out.stderr, 2000)
        )));
    }
    let mut child = receivewal_command(&tool.path, &env, &opts.spool, &opts.slot)
        // Confirm progress to the server often: the slot then retains less.
        .args(["--status-interval=1"])
        .kill_on_drop(true)
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| PitrError::Tool(format!("{}: {e}", tool.path.display())))?;
    eprintln!(
        "wal-receive: streaming through slot {} into {} ({})",
        opts.slot,
        opts.spool.display(),
        store.describe()
    );
    let signal = tools::interrupted();
    tokio::pin!(signal);
    let result = loop {
        tokio::select! {
            s = &mut signal => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                ship_spool(store, dir, &opts.spool).await?;
                break Err(PitrError::Interrupted(s));
            }
            status = child.wait() => {
                ship_spool(store, dir, &opts.spool).await?;
                break Err(PitrError::Receiver(format!(
                    "pg_receivewal exited ({}); its messages are above. The slot keeps the WAL \
                     not yet received: restart to resume",
                    status.map_or_else(|e| e.to_string(), |s| s.to_string())
                )));
            }
            _ = tokio::time::sleep(opts.poll) => {
                if let Err(e) = ship_spool(store, dir, &opts.spool).await {
                    let _ = child.start_kill();
                    break Err(e);
                }
            }
        }
    };
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsns_print_and_parse_like_postgres() {
        let l: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(l.0, 0x16_B374_D848);
        assert_eq!(l.to_string(), "16/B374D848");
        for bad in ["", "0", "/1", "1/", "x/1", "1/2/3", "123456789/0", "-1/0"] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad}");
        }
        let json = serde_json::to_string(&Lsn(0x300_0148)).unwrap();
        assert_eq!(json, "\"0/3000148\"");
    }

    #[test]
    fn segment_names() {
        const MB16: u64 = 16 * 1024 * 1024;
        let s = SegmentName::new(1, Lsn(0x1_0300_0148).segno(MB16), MB16);
        assert_eq!(s.to_string(), "000000010000000100000003");
        assert_eq!(SegmentName::parse(&s.to_string(), MB16), Some(s));
        // 1 MB segments: 4096 per "log id".
        let s = SegmentName::new(2, 4097, 1024 * 1024);
        assert_eq!(s.to_string(), "000000020000000100000001");
        assert!(SegmentName::parse("000000010000000000000100", MB16).is_none());
        assert!(SegmentName::parse("00000001000000000000000g", MB16).is_none());
        assert!(is_wal_file("00000002.history"));
        for bad in [
            "../../etc/passwd",
            "000000010000000000000003.partial",
            "00000002.HISTORY",
            "0000000a.history",
            "",
        ] {
            assert!(!is_wal_file(bad), "{bad}");
        }
    }

    #[test]
    fn packed_files_round_trip_and_corruption_is_caught() {
        let raw: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let name = "000000010000000000000003";
        let (mut stored, record) = pack(name, &raw, Utc::now());
        assert!(stored.len() < raw.len());
        assert_eq!(unpack(name, &stored, &record).unwrap(), raw);
        assert!(unpack("000000010000000000000004", &stored, &record).is_err());
        let mid = stored.len() / 2;
        stored[mid] ^= 0xff;
        let e = unpack(name, &stored, &record).unwrap_err().to_string();
        assert!(e.contains(name), "{e}");
    }

    #[test]
    fn spool_lists_completed_files_only() {
        let dir = tempfile::tempdir().unwrap();
        for f in [
            "000000010000000000000004",
            "000000010000000000000005.partial",
            "00000002.history",
            "000000010000000000000003",
            "junk",
        ] {
            std::fs::write(dir.path().join(f), b"x").unwrap();
        }
        assert_eq!(
            completed_files(dir.path()).unwrap(),
            [
                "00000002.history",
                "000000010000000000000003",
                "000000010000000000000004"
            ]
        );
        assert!(check_slot_name("dbpolicy_pitr").is_ok());
        // A torn zero-filled segment goes; one with WAL in it stays.
        std::fs::write(
            dir.path().join("000000010000000000000006.partial"),
            vec![0u8; 876_544],
        )
        .unwrap();
        let mut wal = vec![0u8; 4096];
        wal[0] = 0x10;
        std::fs::write(dir.path().join("000000010000000000000005.partial"), wal).unwrap();
        assert_eq!(
            remove_empty_partials(dir.path()).unwrap(),
            ["000000010000000000000006.partial"]
        );
        assert!(dir.path().join("000000010000000000000005.partial").exists());
        assert!(check_slot_name("x; drop").is_err());
    }
}
