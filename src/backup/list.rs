//! What the store holds: backups (a manifest, with or without its dump), leftovers of
//! interrupted runs, and manifests that cannot be read. Only a manifest makes a backup.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::manifest::{Manifest, DUMP_SUFFIX, MANIFEST_SUFFIX};
use super::store::{Entry, Store};
use super::BackupError;

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Backup {
    /// The database's directory in the store.
    pub database_dir: String,
    pub id: String,
    /// Size of the stored dump; None when it is missing.
    pub dump_size: Option<u64>,
    pub manifest: Manifest,
}

impl Backup {
    /// The dump is there with the size the manifest recorded (the checksum is `verify`'s).
    pub fn is_intact(&self) -> bool {
        self.dump_size == Some(self.manifest.size_bytes)
    }

    pub fn status(&self) -> String {
        match self.dump_size {
            None => "BROKEN: dump missing".into(),
            Some(n) if n != self.manifest.size_bytes => format!(
                "BROKEN: dump is {n} bytes, manifest says {}",
                self.manifest.size_bytes
            ),
            Some(_) => "ok".into(),
        }
    }

    pub fn dump_file(&self) -> String {
        format!("{}{DUMP_SUFFIX}", self.id)
    }
}

/// An object no manifest accounts for, or a manifest whose dump is gone.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Leftover {
    pub database_dir: String,
    pub file: String,
    pub size: u64,
    pub last_modified: DateTime<Utc>,
    pub why: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Unreadable {
    pub database_dir: String,
    pub file: String,
    pub reason: String,
}

#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Listing {
    /// Oldest first, per database.
    pub backups: Vec<Backup>,
    pub leftovers: Vec<Leftover>,
    pub unreadable: Vec<Unreadable>,
}

impl Listing {
    /// The newest backup of a database (by id, i.e. start time), intact or not: `verify`
    /// must fail on a damaged newest backup, not quietly check an older one.
    pub fn newest(&self, database_dir: &str) -> Option<&Backup> {
        self.backups
            .iter()
            .filter(|b| b.database_dir == database_dir)
            .max_by(|a, b| a.id.cmp(&b.id))
    }

    pub fn find(&self, database_dir: &str, id: &str) -> Option<&Backup> {
        let id = id
            .trim_end_matches(DUMP_SUFFIX)
            .trim_end_matches(MANIFEST_SUFFIX);
        self.backups
            .iter()
            .find(|b| b.database_dir == database_dir && b.id == id)
    }
}

/// Reads the store: one listing, then one read per manifest.
pub async fn scan(store: &Store, database: Option<&str>) -> Result<Listing, BackupError> {
    let dir = database.map(Store::database_dir);
    let entries = store.list(dir.as_deref()).await?;
    let mut listing = Listing::default();
    let find = |db: &str, file: &str| -> Option<&Entry> {
        entries.iter().find(|e| e.database == db && e.file == file)
    };
    for e in &entries {
        if let Some(id) = e.file.strip_suffix(MANIFEST_SUFFIX) {
            let bytes = store.get(&e.database, &e.file).await?;
            match Manifest::from_json(&bytes) {
                Ok(manifest) => {
                    let dump = find(&e.database, &format!("{id}{DUMP_SUFFIX}"));
                    if dump.is_none() {
                        listing.leftovers.push(Leftover {
                            database_dir: e.database.clone(),
                            file: e.file.clone(),
                            size: e.size,
                            last_modified: e.last_modified,
                            why: "manifest without its dump".into(),
                        });
                    }
                    listing.backups.push(Backup {
                        database_dir: e.database.clone(),
                        id: id.to_string(),
                        dump_size: dump.map(|d| d.size),
                        manifest,
                    });
                }
                Err(reason) => listing.unreadable.push(Unreadable {
                    database_dir: e.database.clone(),
                    file: e.file.clone(),
                    reason,
                }),
            }
        } else if let Some(id) = e.file.strip_suffix(DUMP_SUFFIX) {
            if find(&e.database, &format!("{id}{MANIFEST_SUFFIX}")).is_none() {
                listing.leftovers.push(Leftover {
                    database_dir: e.database.clone(),
                    file: e.file.clone(),
                    size: e.size,
                    last_modified: e.last_modified,
                    why: "dump without a manifest (an interrupted or failed run)".into(),
                });
            }
        }
    }
    listing
        .backups
        .sort_by(|a, b| (&a.database_dir, &a.id).cmp(&(&b.database_dir, &b.id)));
    Ok(listing)
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// The listing as a table for people.
pub fn render_text(listing: &Listing) -> String {
    let mut rows = vec![[
        "DATABASE".to_string(),
        "BACKUP".into(),
        "FINISHED".into(),
        "SIZE".into(),
        "DURATION".into(),
        "TABLES".into(),
        "ROWS".into(),
        "STATUS".into(),
    ]];
    for b in &listing.backups {
        let m = &b.manifest;
        rows.push([
            m.database.clone(),
            b.id.clone(),
            m.finished_at.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
            human_bytes(m.size_bytes),
            format!("{:.1}s", m.duration_seconds),
            m.tables.len().to_string(),
            m.total_rows().to_string(),
            b.status(),
        ]);
    }
    let widths: Vec<usize> = (0..8)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_for_people() {
        assert_eq!(human_bytes(12), "12 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 * 1024 * 1024 * 1024), "5.0 GiB");
    }
}
