//! Where backups live: a local directory (a PersistentVolumeClaim in the CronJob) or an
//! S3-compatible bucket, both through the `object_store` crate.
//!
//! Layout: `<prefix>/<database>/<id>.dump`, `<prefix>/<database>/<id>.manifest.json` and,
//! once verified, `<prefix>/<database>/<id>.verify.json`. Small objects (manifests,
//! verification records) are written in one atomic put: S3 shows an object whole or not
//! at all, and the local store writes a staging file and renames it.
//!
//! Commit protocol: the dump is streamed as a multipart upload, which both stores keep
//! invisible until it completes (S3 holds the parts under an upload id; the local store
//! writes a hidden `<name>#<n>` staging file and renames it). The upload is completed only
//! after `pg_dump` exited successfully, and the manifest is written last: an interrupted
//! or failed run leaves at worst a dump without a manifest, which is never listed as a
//! backup and which `prune` removes once it is old. (Renaming a finished dump instead would
//! cost a server-side copy on S3, limited to 5 GiB in one request.)

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::buffered::BufWriter;
use object_store::local::LocalFileSystem;
use object_store::path::{Path, PathPart};
use object_store::{BackoffConfig, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};

/// Which store, from the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StoreConfig {
    Dir(PathBuf),
    S3(S3Config),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct S3Config {
    pub bucket: String,
    /// `http(s)://host:port` of an S3-compatible server; AWS when absent.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub prefix: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreError {
    #[error("backup store {store}: cannot open: {reason}")]
    Open { store: String, reason: String },
    #[error("backup store {store}: {action} {key}: {source}")]
    Object {
        store: String,
        action: &'static str,
        key: String,
        source: Box<object_store::Error>,
    },
    #[error("backup store {store}: listing {prefix}: {source}")]
    List {
        store: String,
        prefix: String,
        source: Box<object_store::Error>,
    },
}

impl StoreError {
    /// The object does not exist (as opposed to a store that cannot be read).
    pub(crate) fn is_not_found(&self) -> bool {
        matches!(self, StoreError::Object { source, .. } if matches!(**source, object_store::Error::NotFound { .. }))
    }
}

/// One object found under the prefix: `<database>/<file>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    /// The database directory, as stored (path-encoded).
    pub database: String,
    pub file: String,
    pub size: u64,
    pub last_modified: DateTime<Utc>,
    /// The store's ETag: with the size and time, what tells one version of an object
    /// from another (a verification record names the version it read).
    pub e_tag: Option<String>,
}

pub(crate) struct Store {
    inner: Arc<dyn ObjectStore>,
    prefix: Path,
    description: String,
    /// The directory of a local store.
    local_root: Option<PathBuf>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.description)
    }
}

impl Store {
    /// Opens the store; a missing local directory is created only when `create` (a run),
    /// so that a mistyped `--dir` for list, verify or prune is an error, not a new empty
    /// store.
    pub(crate) fn open(config: &StoreConfig, create: bool) -> Result<Store, StoreError> {
        match config {
            StoreConfig::Dir(dir) => {
                let description = format!("directory {}", dir.display());
                let open_err = |reason: String| StoreError::Open {
                    store: description.clone(),
                    reason,
                };
                if create {
                    std::fs::create_dir_all(dir).map_err(|e| open_err(e.to_string()))?;
                } else if !dir.is_dir() {
                    return Err(open_err("no such directory".into()));
                }
                let dir = dir.canonicalize().map_err(|e| open_err(e.to_string()))?;
                let fs = LocalFileSystem::new_with_prefix(&dir)
                    .map_err(|e| open_err(e.to_string()))?
                    .with_automatic_cleanup(true);
                Ok(Store {
                    inner: Arc::new(fs),
                    prefix: Path::default(),
                    description,
                    local_root: Some(dir),
                })
            }
            StoreConfig::S3(s3) => {
                let prefix = s3.prefix.as_deref().unwrap_or("").trim_matches('/');
                let description = match &s3.endpoint {
                    Some(e) => format!("s3://{}/{prefix} at {e}", s3.bucket),
                    None => format!("s3://{}/{prefix}", s3.bucket),
                };
                // from_env picks up AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
                // AWS_SESSION_TOKEN (the CronJob sets them from the credentials Secret), and
                // web-identity or instance credentials when they are absent.
                let mut builder = AmazonS3Builder::from_env()
                    .with_bucket_name(&s3.bucket)
                    .with_region(s3.region.as_deref().unwrap_or("us-east-1"))
                    // S3-compatible servers (MinIO, Ceph, moto) want path-style requests.
                    .with_virtual_hosted_style_request(false)
                    // Fail within a minute rather than retrying for minutes on end.
                    .with_retry(RetryConfig {
                        backoff: BackoffConfig::default(),
                        max_retries: 4,
                        retry_timeout: Duration::from_secs(60),
                    });
                if let Some(endpoint) = &s3.endpoint {
                    builder = builder
                        .with_endpoint(endpoint)
                        .with_allow_http(endpoint.starts_with("http://"));
                }
                let s3_store = builder.build().map_err(|e| StoreError::Open {
                    store: description.clone(),
                    reason: e.to_string(),
                })?;
                Ok(Store {
                    inner: Arc::new(s3_store),
                    prefix: Path::from(prefix),
                    description,
                    local_root: None,
                })
            }
        }
    }

    pub(crate) fn describe(&self) -> &str {
        &self.description
    }

    /// Path-encoded name of a database's directory.
    pub(crate) fn database_dir(database: &str) -> String {
        PathPart::from(database).as_ref().to_string()
    }

    fn key(&self, database_dir: &str, file: &str) -> Path {
        let mut path = self.prefix.clone();
        for part in [database_dir, file] {
            // Both are already valid single parts (encoded, or our own file names).
            path = path.join(PathPart::from(part.to_string()));
        }
        path
    }

    fn object_err(
        &self,
        action: &'static str,
        key: &Path,
        source: object_store::Error,
    ) -> StoreError {
        StoreError::Object {
            store: self.description.clone(),
            action,
            key: key.to_string(),
            source: Box::new(source),
        }
    }

    /// A writer that streams an object as a multipart upload: invisible until `shutdown`
    /// completes it; `abort` discards it.
    pub(crate) fn writer(&self, database_dir: &str, file: &str) -> (BufWriter, String) {
        let key = self.key(database_dir, file);
        let shown = key.to_string();
        (
            BufWriter::with_capacity(self.inner.clone(), key, 8 * 1024 * 1024),
            shown,
        )
    }

    pub(crate) async fn put(
        &self,
        database_dir: &str,
        file: &str,
        bytes: Vec<u8>,
    ) -> Result<(), StoreError> {
        let key = self.key(database_dir, file);
        self.inner
            .put(&key, PutPayload::from(bytes))
            .await
            .map(drop)
            .map_err(|e| self.object_err("writing", &key, e))
    }

    pub(crate) async fn get(&self, database_dir: &str, file: &str) -> Result<Vec<u8>, StoreError> {
        let key = self.key(database_dir, file);
        let result = self
            .inner
            .get(&key)
            .await
            .map_err(|e| self.object_err("reading", &key, e))?;
        let bytes = result
            .bytes()
            .await
            .map_err(|e| self.object_err("reading", &key, e))?;
        Ok(bytes.to_vec())
    }

    /// Streams an object: each chunk is passed to `sink` as it arrives.
    pub(crate) async fn get_stream<F>(
        &self,
        database_dir: &str,
        file: &str,
        mut sink: F,
    ) -> Result<u64, StoreError>
    where
        F: FnMut(&[u8]) -> std::io::Result<()>,
    {
        let key = self.key(database_dir, file);
        let result = self
            .inner
            .get(&key)
            .await
            .map_err(|e| self.object_err("reading", &key, e))?;
        let mut stream = result.into_stream();
        let mut total = 0u64;
        while let Some(chunk) = stream
            .try_next()
            .await
            .map_err(|e| self.object_err("reading", &key, e))?
        {
            total += chunk.len() as u64;
            sink(&chunk).map_err(|e| {
                self.object_err(
                    "saving",
                    &key,
                    object_store::Error::Generic {
                        store: "local",
                        source: Box::new(e),
                    },
                )
            })?;
        }
        Ok(total)
    }

    /// Makes the object absent: one that is already gone (a prune that was killed and
    /// re-run, two prunes at once) is no error.
    pub(crate) async fn delete(&self, database_dir: &str, file: &str) -> Result<(), StoreError> {
        let key = self.key(database_dir, file);
        match self.inner.delete(&key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.object_err("deleting", &key, e)),
        }
    }

    /// Staging files (`<name>#<digits>`) of uploads a killed run never completed, older
    /// than `age`, in a local store; `object_store` hides them from listings. (S3 keeps
    /// such parts under an upload id: a bucket lifecycle rule aborting incomplete
    /// multipart uploads removes those.)
    pub(crate) fn stale_staging_files(
        &self,
        database_dir: Option<&str>,
        age: Duration,
    ) -> Vec<PathBuf> {
        let Some(root) = &self.local_root else {
            return Vec::new();
        };
        let dirs: Vec<PathBuf> = match database_dir {
            Some(db) => vec![root.join(db)],
            None => std::fs::read_dir(root)
                .map(|rd| {
                    rd.flatten()
                        .map(|e| e.path())
                        .filter(|p| p.is_dir())
                        .collect()
                })
                .unwrap_or_default(),
        };
        let mut out = Vec::new();
        for dir in dirs {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let staged = name
                    .rsplit_once('#')
                    .is_some_and(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
                let old = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|e| e >= age);
                if staged && old {
                    out.push(entry.path());
                }
            }
        }
        out.sort();
        out
    }

    /// Every `<database>/<file>` under the prefix (of one database when given); other
    /// objects are ignored.
    pub(crate) async fn list(&self, database: Option<&str>) -> Result<Vec<Entry>, StoreError> {
        let base = match database {
            Some(db) => self.prefix.clone().join(PathPart::from(db)),
            None => self.prefix.clone(),
        };
        let base_opt = (base.parts_count() > 0).then_some(&base);
        let objects: Vec<_> = self
            .inner
            .list(base_opt)
            .try_collect()
            .await
            .map_err(|source| StoreError::List {
                store: self.description.clone(),
                prefix: base.to_string(),
                source: Box::new(source),
            })?;
        let mut entries = Vec::new();
        for meta in objects {
            let Some(rest) = meta.location.prefix_match(&self.prefix) else {
                continue;
            };
            let parts: Vec<String> = rest.map(|p| p.as_ref().to_string()).collect();
            if let [database, file] = &parts[..] {
                entries.push(Entry {
                    database: database.clone(),
                    file: file.clone(),
                    size: meta.size,
                    last_modified: meta.last_modified,
                    e_tag: meta.e_tag,
                });
            }
        }
        entries.sort_by(|a, b| (&a.database, &a.file).cmp(&(&b.database, &b.file)));
        Ok(entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn local_store_commits_on_completion_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&StoreConfig::Dir(dir.path().join("backups")), true).unwrap();
        assert!(Store::open(&StoreConfig::Dir(dir.path().join("typo")), false).is_err());
        let db = Store::database_dir("app");
        let (mut w, key) = store.writer(&db, "1.dump");
        assert_eq!(key, "app/1.dump");
        w.write_all(&vec![7u8; 9 * 1024 * 1024]).await.unwrap();
        // Parts are written, but nothing is listed before completion.
        assert!(store.list(None).await.unwrap().is_empty());
        w.shutdown().await.unwrap();
        let (mut aborted, _) = store.writer(&db, "2.dump");
        aborted
            .write_all(&vec![1u8; 9 * 1024 * 1024])
            .await
            .unwrap();
        aborted.abort().await.unwrap();
        store
            .put(&db, "1.manifest.json", b"{}".to_vec())
            .await
            .unwrap();
        let entries = store.list(None).await.unwrap();
        let files: Vec<_> = entries
            .iter()
            .map(|e| (e.database.as_str(), e.file.as_str(), e.size))
            .collect();
        assert_eq!(
            files,
            [
                ("app", "1.dump", 9 * 1024 * 1024),
                ("app", "1.manifest.json", 2)
            ]
        );
        assert_eq!(store.list(Some("other")).await.unwrap(), []);
        assert_eq!(store.get(&db, "1.manifest.json").await.unwrap(), b"{}");
        store.delete(&db, "1.dump").await.unwrap();
        assert_eq!(store.list(Some("app")).await.unwrap().len(), 1);
        // Deleting what is gone is no error.
        store.delete(&db, "1.dump").await.unwrap();
    }

    #[test]
    fn finds_stale_staging_files_of_killed_uploads() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&StoreConfig::Dir(dir.path().to_path_buf()), false).unwrap();
        std::fs::create_dir(dir.path().join("app")).unwrap();
        for f in ["1.dump#3", "1.dump", "1.manifest.json", "odd#name"] {
            std::fs::write(dir.path().join("app").join(f), b"x").unwrap();
        }
        let found = store.stale_staging_files(None, Duration::ZERO);
        assert_eq!(
            found,
            [dir.path().canonicalize().unwrap().join("app/1.dump#3")]
        );
        assert_eq!(
            store.stale_staging_files(Some("app"), Duration::ZERO).len(),
            1
        );
        assert!(store
            .stale_staging_files(None, Duration::from_secs(3600))
            .is_empty());
        assert!(store
            .stale_staging_files(Some("other"), Duration::ZERO)
            .is_empty());
    }

    #[test]
    fn database_names_are_path_safe() {
        assert_eq!(Store::database_dir("app"), "app");
        assert!(!Store::database_dir("a/b").contains('/'));
    }
}
