//! The manifest written beside each dump: what was dumped, from which server, when, how big,
//! its SHA-256, and the row count of every table at dump time (what `verify` checks a
//! restore against). It is written last: a dump without one is not a backup.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Version of the manifest format this build writes and reads.
pub(crate) const MANIFEST_VERSION: u32 = 1;

/// Why a JSON record of the store (a manifest, a verification record) cannot be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RecordError {
    #[error("not JSON: {0}")]
    NotJson(#[source] serde_json::Error),
    /// Written by another (newer) dbpolicy: `field` is the record's version field.
    #[error("{field} {} is not supported (this dbpolicy reads {supported})", found.map_or("missing".to_string(), |v| v.to_string()))]
    Version {
        field: &'static str,
        found: Option<u64>,
        supported: u32,
    },
    #[error("{path}: {source}")]
    Field {
        path: String,
        #[source]
        source: serde_json::Error,
    },
}

/// Reads a record of version `supported` (in its field `field`) from `bytes`.
pub(crate) fn read_record<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    field: &'static str,
    supported: u32,
) -> Result<T, RecordError> {
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(RecordError::NotJson)?;
    let found = value.get(field).and_then(|v| v.as_u64());
    if found != Some(u64::from(supported)) {
        return Err(RecordError::Version {
            field,
            found,
            supported,
        });
    }
    serde_path_to_error::deserialize(value).map_err(|e| RecordError::Field {
        path: e.path().to_string(),
        source: e.into_inner(),
    })
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Manifest {
    pub manifest_version: u32,
    /// Backup id: the UTC start time, `20261125T030000.123Z`.
    pub id: String,
    pub database: String,
    /// `SHOW server_version` of the source server.
    pub server_version: String,
    pub server_version_num: i32,
    /// `pg_dump --version` of the client that wrote the dump.
    pub pg_dump_version: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub duration_seconds: f64,
    /// File name of the dump, beside this manifest.
    pub dump: String,
    pub size_bytes: u64,
    /// Lower-case hex SHA-256 of the dump as stored.
    pub sha256: String,
    /// `custom` (`pg_dump --format=custom`).
    pub format: String,
    pub compression: u8,
    pub dbpolicy_version: String,
    /// Row count of every table, in the snapshot the dump was taken from.
    pub tables: Vec<TableRows>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct TableRows {
    pub schema: String,
    pub table: String,
    pub rows: i64,
}

impl Manifest {
    pub(crate) fn to_json(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(self).expect("a manifest always serialises");
        out.push(b'\n');
        out
    }

    pub(crate) fn from_json(bytes: &[u8]) -> Result<Manifest, RecordError> {
        read_record(bytes, "manifestVersion", MANIFEST_VERSION)
    }

    pub(crate) fn total_rows(&self) -> i64 {
        self.tables.iter().map(|t| t.rows).sum()
    }
}

/// File names of a backup: `<id>.dump` and `<id>.manifest.json`.
pub(crate) const DUMP_SUFFIX: &str = ".dump";
pub(crate) const MANIFEST_SUFFIX: &str = ".manifest.json";

/// Backup id of a start time; ids sort in time order.
pub(crate) fn backup_id(started: DateTime<Utc>) -> String {
    started.format("%Y%m%dT%H%M%S%.3fZ").to_string()
}

/// Differences between the tables of a manifest and those of a restore, as sentences;
/// empty when they match.
pub(crate) fn compare_tables(expected: &[TableRows], actual: &[TableRows]) -> Vec<String> {
    let mut problems = Vec::new();
    for e in expected {
        match actual
            .iter()
            .find(|a| a.schema == e.schema && a.table == e.table)
        {
            None => problems.push(format!(
                "table {}.{} is missing from the restore",
                e.schema, e.table
            )),
            Some(a) if a.rows != e.rows => problems.push(format!(
                "table {}.{} has {} row(s) in the restore, {} at dump time",
                e.schema, e.table, a.rows, e.rows
            )),
            Some(_) => {}
        }
    }
    for a in actual {
        if !expected
            .iter()
            .any(|e| e.schema == a.schema && e.table == a.table)
        {
            problems.push(format!(
                "table {}.{} is in the restore but not in the manifest",
                a.schema, a.table
            ));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    pub(crate) fn sample() -> Manifest {
        let started = Utc.with_ymd_and_hms(2026, 11, 25, 3, 0, 0).unwrap();
        Manifest {
            manifest_version: MANIFEST_VERSION,
            id: backup_id(started),
            database: "certquiz".into(),
            server_version: "15.20".into(),
            server_version_num: 150020,
            pg_dump_version: "pg_dump (PostgreSQL) 15.20".into(),
            started_at: started,
            finished_at: started + chrono::Duration::seconds(2),
            duration_seconds: 2.0,
            dump: "20261125T030000.000Z.dump".into(),
            size_bytes: 1234,
            sha256: "ab".repeat(32),
            format: "custom".into(),
            compression: 6,
            dbpolicy_version: "0.1.0".into(),
            tables: vec![TableRows {
                schema: "public".into(),
                table: "users".into(),
                rows: 3,
            }],
        }
    }

    #[test]
    fn round_trips_and_names_fields_in_camel_case() {
        let m = sample();
        let json = m.to_json();
        let text = String::from_utf8(json.clone()).unwrap();
        assert!(
            text.contains("\"serverVersion\"") && text.contains("\"sha256\""),
            "{text}"
        );
        assert_eq!(Manifest::from_json(&json).unwrap(), m);
        assert_eq!(m.id, "20261125T030000.000Z");
    }

    #[test]
    fn rejects_unknown_versions_and_garbage() {
        let mut v: serde_json::Value = serde_json::from_slice(&sample().to_json()).unwrap();
        v["manifestVersion"] = 2.into();
        let e = Manifest::from_json(v.to_string().as_bytes()).unwrap_err();
        assert!(e.to_string().contains("manifestVersion 2"), "{e}");
        assert!(Manifest::from_json(b"{").is_err());
        v["manifestVersion"] = 1.into();
        v["sizeBytes"] = "big".into();
        assert!(Manifest::from_json(v.to_string().as_bytes())
            .unwrap_err()
            .to_string()
            .contains("sizeBytes"));
    }

    #[test]
    fn compares_tables() {
        let t = |table: &str, rows| TableRows {
            schema: "public".into(),
            table: table.into(),
            rows,
        };
        assert!(compare_tables(&[t("a", 1), t("b", 2)], &[t("b", 2), t("a", 1)]).is_empty());
        let p = compare_tables(&[t("a", 1), t("b", 2)], &[t("a", 0), t("c", 5)]);
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(p[0].contains("public.a has 0 row(s)"));
        assert!(p[1].contains("public.b is missing"));
        assert!(p[2].contains("public.c is in the restore"));
    }
}
