//! A backup's verification state: the record `verify` leaves beside the dump
//! (`<id>.verify.json`), and the state `list` and `prune` derive from that record and a
//! cheap check of what the store holds, without reading any dump.
//!
//! The record names the exact dump object it judged (size, last-modified time, ETag, as
//! the store lists them): a record about bytes that have since changed is stale. A stale
//! `verified` proves nothing about the new bytes (`unverified`); a stale `corrupt` or
//! `failed` stays so until a new verify says otherwise — evidence is needed to upgrade a
//! backup, never to downgrade it. [`assess`] is pure and unit-tested below.

use crate::reason::Reason;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::manifest::{read_record, Manifest, RecordError};

/// File name of a backup's verification record: `<id>.verify.json`.
pub(crate) const VERIFY_SUFFIX: &str = ".verify.json";
/// Version of the record format this build writes and reads.
pub(crate) const RECORD_VERSION: u32 = 1;
/// The detail of a backup no verify has looked at.
pub(crate) const NEVER_VERIFIED: &str = "never verified";
/// How much of an error message a record keeps.
const MESSAGE_MAX: usize = 2000;

/// The dump object as the store lists it; what a record is about.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub(crate) struct DumpObject {
    pub size_bytes: u64,
    pub last_modified: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub e_tag: Option<String>,
}

/// What a verify run concluded about the bytes it read.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub(crate) enum Outcome {
    /// Checksum matched, the restore succeeded and every table's row count matched.
    Verified,
    /// The bytes are not the ones the manifest recorded (size or SHA-256).
    Corrupt,
    /// The bytes match, but the restore failed or differed from the manifest.
    Failed,
}

/// `<id>.verify.json`: the last verification of a backup.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub(crate) struct VerifyRecord {
    pub record_version: u32,
    /// Backup id the record is about.
    pub backup: String,
    pub checked_at: DateTime<Utc>,
    pub outcome: Outcome,
    /// CamelCase reason of a failure (`BackupCorrupt`, `RestoreFailed`, `RestoreMismatch`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The dump object that was read.
    pub dump: DumpObject,
    /// SHA-256 of the bytes read, when they were read to the end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_seconds: Option<f64>,
    pub dbpolicy_version: String,
}

impl VerifyRecord {
    pub(crate) fn new(
        backup: &str,
        dump: DumpObject,
        outcome: Outcome,
        failure: Option<(Reason, String)>,
    ) -> VerifyRecord {
        let (reason, message) = match failure {
            Some((reason, message)) => (
                Some(reason.as_str().to_string()),
                Some(message.chars().take(MESSAGE_MAX).collect()),
            ),
            None => (None, None),
        };
        VerifyRecord {
            record_version: RECORD_VERSION,
            backup: backup.to_string(),
            checked_at: Utc::now(),
            outcome,
            reason,
            message,
            dump,
            sha256: None,
            restore_seconds: None,
            dbpolicy_version: env!("CARGO_PKG_VERSION").into(),
        }
    }

    pub(crate) fn outcome_word(&self) -> &'static str {
        match self.outcome {
            Outcome::Verified => "verified",
            Outcome::Corrupt => "corrupt",
            Outcome::Failed => "failed",
        }
    }

    pub(crate) fn to_json(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(self).expect("a record always serialises");
        out.push(b'\n');
        out
    }

    pub(crate) fn from_json(bytes: &[u8]) -> Result<VerifyRecord, RecordError> {
        read_record(bytes, "recordVersion", RECORD_VERSION)
    }
}

/// What `list` shows and `prune` decides on.
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "lowercase")]
pub(crate) enum State {
    /// Restored and matched its manifest, and the dump has not changed since.
    Verified,
    /// The dump is there with the recorded size; never verified, or changed since.
    Unverified,
    /// Its bytes are not the ones the manifest recorded.
    Corrupt,
    /// Its bytes match, but it did not restore to what the manifest recorded.
    Failed,
    /// The dump is missing or shorter than recorded (a killed copy or upload).
    Incomplete,
}

impl State {
    /// A backup one could restore from, as far as anyone knows: counted by retention.
    pub(crate) fn is_good(self) -> bool {
        matches!(self, State::Verified | State::Unverified)
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            State::Verified => "verified",
            State::Unverified => "unverified",
            State::Corrupt => "corrupt",
            State::Failed => "failed",
            State::Incomplete => "incomplete",
        }
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A backup's state, why, and when a verify last judged these very bytes.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Assessment {
    pub state: State,
    /// One sentence for people.
    pub detail: String,
    pub checked_at: Option<DateTime<Utc>>,
}

/// The state of a backup from its manifest, its dump as listed (None: missing) and its
/// verification record (None: none; Err: unreadable).
pub(crate) fn assess(
    manifest: &Manifest,
    id: &str,
    dump: Option<&DumpObject>,
    record: Option<&Result<VerifyRecord, RecordError>>,
) -> Assessment {
    let at = |t: DateTime<Utc>| t.format("%Y-%m-%dT%H:%M:%SZ").to_string();
    let plain = |state, detail: String| Assessment {
        state,
        detail,
        checked_at: None,
    };
    let Some(dump) = dump else {
        return plain(
            State::Incomplete,
            "the dump is missing from the store".into(),
        );
    };
    let expected = manifest.size_bytes;
    if dump.size_bytes < expected {
        return plain(
            State::Incomplete,
            format!(
                "the dump is {} bytes, the manifest recorded {expected}: cut short",
                dump.size_bytes
            ),
        );
    }
    if dump.size_bytes > expected {
        return plain(
            State::Corrupt,
            format!(
                "the dump is {} bytes, the manifest recorded {expected}",
                dump.size_bytes
            ),
        );
    }
    let record = match record {
        None => return plain(State::Unverified, NEVER_VERIFIED.into()),
        Some(Err(reason)) => {
            return plain(
                State::Unverified,
                format!("the verification record is unreadable ({reason}); verify again"),
            )
        }
        Some(Ok(r)) => r,
    };
    let failure = || {
        let reason = record.reason.as_deref().unwrap_or("VerifyFailed");
        match &record.message {
            Some(m) => format!("{reason}: {}", m.lines().next().unwrap_or_default()),
            None => reason.to_string(),
        }
    };
    let current = record.backup == id && record.dump == *dump;
    match (record.outcome, current) {
        (Outcome::Verified, true) => Assessment {
            state: State::Verified,
            detail: format!(
                "restored and matched its manifest at {}",
                at(record.checked_at)
            ),
            checked_at: Some(record.checked_at),
        },
        (Outcome::Verified, false) => plain(
            State::Unverified,
            format!(
                "verified at {}, but the dump changed since; verify again",
                at(record.checked_at)
            ),
        ),
        (outcome, current) => Assessment {
            state: if outcome == Outcome::Corrupt {
                State::Corrupt
            } else {
                State::Failed
            },
            detail: if current {
                failure()
            } else {
                format!(
                    "{} (at {}); the dump changed since: verify again",
                    failure(),
                    at(record.checked_at)
                )
            },
            checked_at: Some(record.checked_at),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn manifest(size: u64) -> Manifest {
        let started = Utc.with_ymd_and_hms(2026, 11, 25, 3, 0, 0).unwrap();
        Manifest {
            manifest_version: super::super::manifest::MANIFEST_VERSION,
            id: "B".into(),
            database: "app".into(),
            server_version: "15".into(),
            server_version_num: 150000,
            pg_dump_version: "pg_dump (PostgreSQL) 15.0".into(),
            started_at: started,
            finished_at: started,
            duration_seconds: 0.0,
            dump: "B.dump".into(),
            size_bytes: size,
            sha256: "00".repeat(32),
            format: "custom".into(),
            compression: 6,
            dbpolicy_version: "0".into(),
            tables: vec![],
        }
    }

    fn object(size: u64, minute: u32) -> DumpObject {
        DumpObject {
            size_bytes: size,
            last_modified: Utc.with_ymd_and_hms(2026, 11, 25, 3, minute, 0).unwrap(),
            e_tag: Some(format!("e{minute}")),
        }
    }

    fn record(outcome: Outcome, dump: DumpObject) -> Result<VerifyRecord, RecordError> {
        let failure =
            (outcome != Outcome::Verified).then(|| (Reason::BackupCorrupt, "bad\nmore".into()));
        Ok(VerifyRecord::new("B", dump, outcome, failure))
    }

    fn state(
        size: u64,
        dump: Option<DumpObject>,
        rec: Option<Result<VerifyRecord, RecordError>>,
    ) -> State {
        assess(&manifest(size), "B", dump.as_ref(), rec.as_ref()).state
    }

    #[test]
    fn the_cheap_check_comes_first() {
        let v = || Some(record(Outcome::Verified, object(10, 1)));
        assert_eq!(state(10, None, v()), State::Incomplete);
        assert_eq!(state(10, Some(object(9, 1)), v()), State::Incomplete);
        assert_eq!(state(10, Some(object(11, 1)), v()), State::Corrupt);
        assert_eq!(state(10, Some(object(10, 1)), v()), State::Verified);
        assert_eq!(state(10, Some(object(10, 1)), None), State::Unverified);
    }

    #[test]
    fn records_speak_only_for_the_bytes_they_read() {
        let now = object(10, 1);
        let later = object(10, 2);
        let v = |o| Some(record(o, now.clone()));
        assert_eq!(
            state(10, Some(later.clone()), v(Outcome::Verified)),
            State::Unverified
        );
        // Evidence is needed to upgrade, never to downgrade.
        assert_eq!(
            state(10, Some(later.clone()), v(Outcome::Corrupt)),
            State::Corrupt
        );
        assert_eq!(
            state(10, Some(later.clone()), v(Outcome::Failed)),
            State::Failed
        );
        assert_eq!(
            state(10, Some(now.clone()), v(Outcome::Corrupt)),
            State::Corrupt
        );
        assert_eq!(
            state(10, Some(now.clone()), v(Outcome::Failed)),
            State::Failed
        );
        // A record of another backup (copied by hand) proves nothing.
        let mut other = record(Outcome::Verified, now.clone()).unwrap();
        other.backup = "A".into();
        assert_eq!(
            state(10, Some(now.clone()), Some(Ok(other))),
            State::Unverified
        );
        // Only the ETag differs (same size and time): changed.
        let mut etag = now.clone();
        etag.e_tag = Some("other".into());
        assert_eq!(
            state(10, Some(etag), v(Outcome::Verified)),
            State::Unverified
        );
        let unreadable = Some(VerifyRecord::from_json(b"not JSON"));
        assert!(matches!(unreadable, Some(Err(RecordError::NotJson(_)))));
        assert_eq!(state(10, Some(now), unreadable), State::Unverified);
    }

    #[test]
    fn details_say_when_and_why() {
        let now = object(10, 1);
        let a = assess(
            &manifest(10),
            "B",
            Some(&now),
            Some(&record(Outcome::Corrupt, now.clone())),
        );
        assert_eq!(a.detail, "BackupCorrupt: bad");
        assert!(a.checked_at.is_some());
        let a = assess(
            &manifest(10),
            "B",
            Some(&now),
            Some(&record(Outcome::Verified, now.clone())),
        );
        assert!(a.detail.contains("2026-"), "{}", a.detail);
        let a = assess(&manifest(10), "B", Some(&object(4, 1)), None);
        assert!(
            a.detail.contains("4 bytes") && a.detail.contains("10"),
            "{}",
            a.detail
        );
    }

    #[test]
    fn records_round_trip_and_refuse_unknown_versions() {
        let r = record(Outcome::Failed, object(10, 1)).unwrap();
        let json = r.to_json();
        let text = String::from_utf8(json.clone()).unwrap();
        assert!(
            text.contains("\"checkedAt\"") && text.contains("\"failed\""),
            "{text}"
        );
        assert_eq!(VerifyRecord::from_json(&json).unwrap(), r);
        let mut v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        v["recordVersion"] = 9.into();
        assert!(VerifyRecord::from_json(v.to_string().as_bytes())
            .unwrap_err()
            .to_string()
            .contains("recordVersion 9"));
        assert!(VerifyRecord::from_json(b"").is_err());
        let long = VerifyRecord::new(
            "B",
            object(1, 1),
            Outcome::Failed,
            Some((Reason::RestoreFailed, "x".repeat(10_000))),
        );
        assert_eq!(long.message.unwrap().len(), MESSAGE_MAX);
    }
}
