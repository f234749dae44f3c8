//! What the store holds: backups (a manifest, with or without its dump, and its
//! verification state), leftovers of interrupted runs and prunes, and manifests that
//! cannot be read. Only a manifest makes a backup. One listing of the store, then one read
//! per manifest and per verification record: no dump is read.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::manifest::{Manifest, DUMP_SUFFIX, MANIFEST_SUFFIX};
use super::state::{self, DumpObject, State, VerifyRecord, VERIFY_SUFFIX};
use super::store::{Entry, Store};
use super::BackupError;
use crate::units;

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Backup {
    /// The database's directory in the store.
    pub database_dir: String,
    pub id: String,
    /// Size of the stored dump; None when it is missing.
    pub dump_size: Option<u64>,
    /// The stored dump as listed; None when it is missing.
    pub dump: Option<DumpObject>,
    /// `verified`, `unverified`, `corrupt`, `failed` or `incomplete`.
    pub state: State,
    /// Why, in one sentence.
    pub state_detail: String,
    /// When a verify last judged the dump as it is now.
    pub checked_at: Option<DateTime<Utc>>,
    /// The last verification record, current or stale.
    pub verification: Option<VerifyRecord>,
    pub manifest: Manifest,
}

impl Backup {
    pub(crate) fn dump_file(&self) -> String {
        format!("{}{DUMP_SUFFIX}", self.id)
    }

    pub(crate) fn verify_file(&self) -> String {
        format!("{}{VERIFY_SUFFIX}", self.id)
    }
}

/// An object no manifest accounts for: the dump of a run killed before its commit (or of
/// a prune killed after deleting the manifest), or a verification record left alone.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Leftover {
    pub database_dir: String,
    pub file: String,
    pub size: u64,
    pub last_modified: DateTime<Utc>,
    pub why: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Unreadable {
    pub database_dir: String,
    pub file: String,
    pub reason: String,
}

#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Listing {
    /// Oldest first, per database.
    pub backups: Vec<Backup>,
    pub leftovers: Vec<Leftover>,
    pub unreadable: Vec<Unreadable>,
}

impl Listing {
    /// The newest backup of a database (by id, i.e. start time), whatever its state:
    /// `verify` must fail on a damaged newest backup, not quietly check an older one.
    pub(crate) fn newest(&self, database_dir: &str) -> Option<&Backup> {
        self.backups
            .iter()
            .filter(|b| b.database_dir == database_dir)
            .max_by(|a, b| a.id.cmp(&b.id))
    }

    pub(crate) fn find(&self, database_dir: &str, id: &str) -> Option<&Backup> {
        let id = id
            .trim_end_matches(DUMP_SUFFIX)
            .trim_end_matches(MANIFEST_SUFFIX)
            .trim_end_matches(VERIFY_SUFFIX);
        self.backups
            .iter()
            .find(|b| b.database_dir == database_dir && b.id == id)
    }
}

fn dump_object(e: &Entry) -> DumpObject {
    DumpObject {
        size_bytes: e.size,
        last_modified: e.last_modified,
        e_tag: e.e_tag.clone(),
    }
}

/// Reads the store: one listing, then one read per manifest and verification record.
pub(crate) async fn scan(store: &Store, database: Option<&str>) -> Result<Listing, BackupError> {
    let dir = database.map(Store::database_dir);
    let entries = store.list(dir.as_deref()).await?;
    let mut listing = Listing::default();
    let find = |db: &str, file: &str| -> Option<&Entry> {
        entries.iter().find(|e| e.database == db && e.file == file)
    };
    let leftover = |e: &Entry, why: &str| Leftover {
        database_dir: e.database.clone(),
        file: e.file.clone(),
        size: e.size,
        last_modified: e.last_modified,
        why: why.into(),
    };
    for e in &entries {
        if let Some(id) = e.file.strip_suffix(MANIFEST_SUFFIX) {
            let bytes = store.get(&e.database, &e.file).await?;
            let manifest = match Manifest::from_json(&bytes) {
                Ok(m) => m,
                Err(why) => {
                    listing.unreadable.push(Unreadable {
                        database_dir: e.database.clone(),
                        file: e.file.clone(),
                        reason: why.to_string(),
                    });
                    continue;
                }
            };
            let dump = find(&e.database, &format!("{id}{DUMP_SUFFIX}")).map(dump_object);
            let record = match find(&e.database, &format!("{id}{VERIFY_SUFFIX}")) {
                Some(r) => Some(VerifyRecord::from_json(
                    &store.get(&r.database, &r.file).await?,
                )),
                None => None,
            };
            let assessment = state::assess(&manifest, id, dump.as_ref(), record.as_ref());
            listing.backups.push(Backup {
                database_dir: e.database.clone(),
                id: id.to_string(),
                dump_size: dump.as_ref().map(|d| d.size_bytes),
                dump,
                state: assessment.state,
                state_detail: assessment.detail,
                checked_at: assessment.checked_at,
                verification: record.and_then(Result::ok),
                manifest,
            });
        } else if let Some(id) = e.file.strip_suffix(DUMP_SUFFIX) {
            if find(&e.database, &format!("{id}{MANIFEST_SUFFIX}")).is_none() {
                listing.leftovers.push(leftover(
                    e,
                    "incomplete: a dump without a manifest (a run killed before its commit, \
                     or a prune killed half-way); never a backup",
                ));
            }
        } else if let Some(id) = e.file.strip_suffix(VERIFY_SUFFIX) {
            if find(&e.database, &format!("{id}{MANIFEST_SUFFIX}")).is_none() {
                listing.leftovers.push(leftover(
                    e,
                    "a verification record without its backup (a prune killed half-way)",
                ));
            }
        }
    }
    listing
        .backups
        .sort_by(|a, b| (&a.database_dir, &a.id).cmp(&(&b.database_dir, &b.id)));
    Ok(listing)
}

/// The listing as a table for people: one row per backup with its state and when it was
/// last checked, then a `#` line for each backup that is not known good, each leftover
/// and each unreadable manifest.
pub(crate) fn render_text(listing: &Listing) -> String {
    let mut rows = vec![[
        "DATABASE".to_string(),
        "BACKUP".into(),
        "FINISHED".into(),
        "SIZE".into(),
        "DURATION".into(),
        "TABLES".into(),
        "ROWS".into(),
        "STATE".into(),
        "CHECKED".into(),
    ]];
    for b in &listing.backups {
        let m = &b.manifest;
        rows.push([
            m.database.clone(),
            b.id.clone(),
            m.finished_at.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
            units::bytes(m.size_bytes),
            format!("{:.1}s", m.duration_seconds),
            m.tables.len().to_string(),
            m.total_rows().to_string(),
            b.state.to_string(),
            b.checked_at.map_or("-".to_string(), |t| {
                t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
            }),
        ]);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    if listing.backups.is_empty() {
        out.push_str("# no backups\n");
    }
    for b in &listing.backups {
        if b.state != State::Verified && b.state_detail != state::NEVER_VERIFIED {
            out.push_str(&format!(
                "# {}/{} {}: {}\n",
                b.database_dir, b.id, b.state, b.state_detail
            ));
        }
    }
    for l in &listing.leftovers {
        out.push_str(&format!(
            "# leftover {}/{}: {}\n",
            l.database_dir, l.file, l.why
        ));
    }
    for u in &listing.unreadable {
        out.push_str(&format!(
            "# unreadable manifest {}/{}: {}\n",
            u.database_dir, u.file, u.reason
        ));
    }
    out
}
