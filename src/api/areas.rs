//! The per-area sections of the spec. Every area is typed here, including those whose
//! reconciliation lands later, so the CRD is complete and stable from v1alpha1 on.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceRequirements;
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

use crate::pg::QualifiedName;

pub(crate) const DEFAULT_SCHEMA: &str = "public";

/// Implemented by every item that names a table (`schema` defaults to `public`).
pub(crate) trait TableTarget {
    fn schema(&self) -> Option<&str>;
    fn table(&self) -> &str;
    fn qualified(&self) -> QualifiedName {
        QualifiedName::new(self.schema().unwrap_or(DEFAULT_SCHEMA), self.table())
    }
}

macro_rules! table_target {
    ($($ty:ty),*) => {$(
        impl TableTarget for $ty {
            fn schema(&self) -> Option<&str> { self.schema.as_deref() }
            fn table(&self) -> &str { &self.table }
        }
    )*};
}
table_target!(RlsTable, PartitionedTable, AutovacuumTable, IndexSpec);

// ---------------------------------------------------------------- row-level security

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RowLevelSecuritySpec {
    /// Tables whose row-level security the policy sets.
    #[schemars(length(max = 5000))]
    pub tables: Vec<RlsTable>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RlsTable {
    /// Schema of the table (default `public`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub schema: Option<String>,
    /// Name of the table.
    #[schemars(length(min = 1, max = 63))]
    pub table: String,
    /// `ENABLE ROW LEVEL SECURITY` (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// `FORCE ROW LEVEL SECURITY`, so the table owner is subject to the policies too (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub force: Option<bool>,
    /// Own every policy of this table: policies not listed are dropped (needs `allowDestructive`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub own_all_policies: Option<bool>,
    /// The table's row-level security policies (`CREATE POLICY`).
    #[serde(default)]
    #[schemars(length(max = 100))]
    pub policies: Vec<RlsPolicy>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("!(has(self.command) && self.command == 'Insert' && has(self.using))").message("an Insert policy takes only withCheck, not using"))]
#[x_kube(validation = Rule::new("!(has(self.command) && (self.command == 'Select' || self.command == 'Delete') && has(self.withCheck))").message("a Select or Delete policy takes only using, not withCheck"))]
#[x_kube(validation = Rule::new("has(self.using) || has(self.withCheck)").message("a policy needs using, withCheck or both"))]
pub struct RlsPolicy {
    /// Name of the policy on its table.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// Command the policy applies to (default All).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<PolicyCommand>,
    /// Permissive (default) or Restrictive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<PolicyKind>,
    /// Roles the policy applies to (default PUBLIC). Roles are not created by this area.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 100))]
    pub roles: Option<Vec<String>>,
    /// SQL boolean expression for rows visible to the command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 10000))]
    pub using: Option<String>,
    /// SQL boolean expression new rows must satisfy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 10000))]
    pub with_check: Option<String>,
}

#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash,
)]
pub enum PolicyCommand {
    #[default]
    All,
    Select,
    Insert,
    Update,
    Delete,
}

#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash,
)]
pub enum PolicyKind {
    #[default]
    Permissive,
    Restrictive,
}

// ---------------------------------------------------------------- partitions

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PartitionsSpec {
    /// Partitioned tables whose partitions the policy manages.
    #[schemars(length(max = 5000))]
    pub tables: Vec<PartitionedTable>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PartitionedTable {
    /// Schema of the table (default `public`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub schema: Option<String>,
    /// A table declared `PARTITION BY RANGE` on a timestamp, timestamptz or date column.
    #[schemars(length(min = 1, max = 63))]
    pub table: String,
    /// The partition key column; checked against the table's declaration when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub column: Option<String>,
    /// Width of each partition.
    pub interval: PartitionInterval,
    /// Future partitions kept ahead of now (default 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub premake: Option<u32>,
    /// Create partitions from this date on (YYYY-MM-DD); default: the current interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 10))]
    #[x_kube(validation = Rule::new("self.matches('^[0-9]{4}-[0-9]{2}-[0-9]{2}$')").message("must be a date YYYY-MM-DD"))]
    pub start_date: Option<String>,
    /// Keep a DEFAULT partition for rows outside every range (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_partition: Option<bool>,
    /// Partitions entirely older than this are retired, e.g. `30d`, `12w`, `6mo`, `2y`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    #[x_kube(validation = Rule::new("self.matches('^[0-9]+(d|w|mo|y)$')").message("must be a retention such as 30d, 12w, 6mo or 2y"))]
    pub retention: Option<String>,
    /// What retiring means: Detach (default) or Drop (needs `allowDestructive`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_policy: Option<RetentionPolicy>,
}

#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash,
)]
pub enum PartitionInterval {
    Daily,
    Weekly,
    #[default]
    Monthly,
    Quarterly,
    Yearly,
}

#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash,
)]
pub enum RetentionPolicy {
    #[default]
    Detach,
    Drop,
}

// ---------------------------------------------------------------- autovacuum

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AutovacuumSpec {
    /// Tables whose autovacuum storage parameters the policy sets.
    #[schemars(length(max = 5000))]
    pub tables: Vec<AutovacuumTable>,
}

/// Per-table autovacuum storage parameters. A parameter left out is reset if this policy
/// set it before; parameters set by others are left alone.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AutovacuumTable {
    /// Schema of the table (default `public`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub schema: Option<String>,
    /// Name of the table.
    #[schemars(length(min = 1, max = 63))]
    pub table: String,
    /// `autovacuum_enabled`
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// `autovacuum_vacuum_scale_factor`
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 100.0))]
    pub vacuum_scale_factor: Option<f64>,
    /// `autovacuum_vacuum_threshold`
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 2147483647))]
    pub vacuum_threshold: Option<i64>,
    /// `autovacuum_vacuum_insert_scale_factor`
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 100.0))]
    pub vacuum_insert_scale_factor: Option<f64>,
    /// `autovacuum_vacuum_insert_threshold` (-1 disables insert-triggered vacuums)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = -1, max = 2147483647))]
    pub vacuum_insert_threshold: Option<i64>,
    /// `autovacuum_analyze_scale_factor`
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 100.0))]
    pub analyze_scale_factor: Option<f64>,
    /// `autovacuum_analyze_threshold`
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 2147483647))]
    pub analyze_threshold: Option<i64>,
    /// `autovacuum_vacuum_cost_delay` in milliseconds
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = -1.0, max = 100.0))]
    pub vacuum_cost_delay: Option<f64>,
    /// `autovacuum_vacuum_cost_limit`
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = -1, max = 10000))]
    pub vacuum_cost_limit: Option<i64>,
    /// `autovacuum_freeze_min_age`
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = -1, max = 1000000000))]
    pub freeze_min_age: Option<i64>,
    /// `autovacuum_freeze_max_age`
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = -1, max = 2000000000))]
    pub freeze_max_age: Option<i64>,
    /// `autovacuum_freeze_table_age`
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = -1, max = 2000000000))]
    pub freeze_table_age: Option<i64>,
}

// ---------------------------------------------------------------- server settings

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServerSettingsSpec {
    /// `ALTER SYSTEM` parameters, e.g. `log_min_duration_statement: "500ms"`. Values are
    /// strings, as in postgresql.conf. Parameters removed from here are `RESET` if this
    /// policy set them. Settings that need a restart are applied and reported, not hidden.
    #[serde(default, deserialize_with = "crate::api::validate::string_map")]
    pub parameters: BTreeMap<String, String>,
}

// ---------------------------------------------------------------- replicas

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReplicasSpec {
    /// The replicas of this primary, each checked for health and lag.
    #[schemars(length(max = 100))]
    pub replicas: Vec<ReplicaSpec>,
    /// Secret published with `DATABASE_READ_URL` for applications (default `<policy>-read`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub read_endpoint_secret_name: Option<String>,
    /// When no replica is healthy, publish the primary as the read endpoint (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback_to_primary: Option<bool>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReplicaSpec {
    /// Name of the replica (in status and Events).
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// Secret holding a libpq URI for the replica.
    pub connection_secret_ref: crate::api::SecretKeyRef,
    /// Physical replication slot kept on the primary for this replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9_]{1,63}$')").message("slot names are lower-case letters, digits and underscores"))]
    pub slot: Option<String>,
    /// Replay lag, in seconds, above which the replica is `Lagging`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_lag_seconds: Option<u32>,
    /// WAL bytes not yet replayed above which the replica is `Lagging`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_lag_bytes: Option<u64>,
}

// ---------------------------------------------------------------- backups

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackupsSpec {
    /// Cron schedule of the backup CronJob, e.g. `0 3 * * *`.
    #[schemars(length(max = 100))]
    #[x_kube(validation = Rule::new("self.split(' ').size() == 5 || self.startsWith('@')").message("must be a 5-field cron expression or a @macro"))]
    pub schedule: String,
    /// How long dumps are kept: `days`, `count` or both (a dump is kept while either keeps it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<BackupRetention>,
    /// Where dumps are stored: exactly one of `pvc` or `s3`.
    pub storage: BackupStorage,
    /// pg_dump format: Custom (the default and only one: compressed, streamable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<DumpFormat>,
    /// Compression level 0-9 for pg_dump (default 6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 9))]
    pub compression: Option<u8>,
    /// Restore each backup into a scratch database and check it (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<bool>,
    /// Image for the backup job (default: the operator's own image).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Pause the schedule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspend: Option<bool>,
    /// Point-in-time recovery into the same storage: WAL streamed continuously over the
    /// replication protocol (no `archive_command`, no shell on the database host) plus
    /// scheduled physical base backups. The connection's role needs REPLICATION. See
    /// docs/pitr.md.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub point_in_time_recovery: Option<PointInTimeRecovery>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PointInTimeRecovery {
    /// Run the WAL receiver and the base backups (default true); false stops them and
    /// keeps what is stored (the slot is kept too: drop it by hand to release its WAL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Physical replication slot dbpolicy creates and streams through (default
    /// `dbpolicy_pitr`). It retains WAL on the server while the receiver is down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9_]+$"))]
    pub slot: Option<String>,
    /// Name of this server's directory in the storage, `pitr.<cluster>` (default `main`).
    /// One per server: two servers must never share it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[A-Za-z0-9_-]+$"))]
    pub cluster: Option<String>,
    /// Cron schedule of the base backup CronJob, e.g. `0 2 * * 0` (weekly). WAL replay
    /// from the last base backup is what a restore costs: take them often enough.
    #[schemars(length(max = 100))]
    #[x_kube(validation = Rule::new("self.split(' ').size() == 5 || self.startsWith('@')").message("must be a 5-field cron expression or a @macro"))]
    pub base_backup_schedule: String,
    /// Base backups to keep; WAL older than the oldest kept base backup is deleted with
    /// them, so the window stays recoverable. The newest base backup is always kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<BackupRetention>,
    /// Size of the receiver's spool volume (default `1Gi`): completed WAL segments wait
    /// there for upload, and it must survive the receiver's restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 32))]
    pub spool_size: Option<String>,
    /// StorageClass of the spool volume (default: the cluster's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub spool_storage_class_name: Option<String>,
    /// Report `WalArchivingLagging` when the receiver is this many bytes of WAL behind the
    /// server (`pg_current_wal_lsn()` minus the position the receiver has made durable in
    /// its spool, read on the server; default 64 MiB). The segment being filled counts
    /// until it is complete, so keep this above the server's `wal_segment_size` (16 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_archive_lag_bytes: Option<u64>,
    /// Report `SlotRetainingTooMuch` when the slot holds back more WAL than this many
    /// bytes (`pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)`; default 1 GiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_slot_retained_bytes: Option<u64>,
    /// Check a restore to the latest WAL after each base backup (`backup verify --pitr`
    /// in a scratch directory; default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

impl BackupsSpec {
    /// The point-in-time recovery section when it asks for the receiver and base backups
    /// to run (present and not `enabled: false`).
    pub(crate) fn pitr(&self) -> Option<&PointInTimeRecovery> {
        self.point_in_time_recovery
            .as_ref()
            .filter(|p| p.enabled.unwrap_or(true))
    }
}

impl PointInTimeRecovery {
    pub(crate) const DEFAULT_SLOT: &'static str = "dbpolicy_pitr";
    pub(crate) const DEFAULT_CLUSTER: &'static str = "main";
    pub(crate) const DEFAULT_SPOOL_SIZE: &'static str = "1Gi";
    pub(crate) const DEFAULT_MAX_ARCHIVE_LAG_BYTES: u64 = 64 * 1024 * 1024;
    pub(crate) const DEFAULT_MAX_SLOT_RETAINED_BYTES: u64 = 1024 * 1024 * 1024;

    pub(crate) fn slot(&self) -> &str {
        self.slot.as_deref().unwrap_or(Self::DEFAULT_SLOT)
    }
    pub(crate) fn cluster(&self) -> &str {
        self.cluster.as_deref().unwrap_or(Self::DEFAULT_CLUSTER)
    }
    pub(crate) fn spool_size(&self) -> &str {
        self.spool_size
            .as_deref()
            .unwrap_or(Self::DEFAULT_SPOOL_SIZE)
    }
    pub(crate) fn max_archive_lag_bytes(&self) -> u64 {
        self.max_archive_lag_bytes
            .unwrap_or(Self::DEFAULT_MAX_ARCHIVE_LAG_BYTES)
    }
    pub(crate) fn max_slot_retained_bytes(&self) -> u64 {
        self.max_slot_retained_bytes
            .unwrap_or(Self::DEFAULT_MAX_SLOT_RETAINED_BYTES)
    }
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("has(self.days) || has(self.count)").message("retention needs days, count or both"))]
pub struct BackupRetention {
    /// Keep the dumps finished within this many days.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub days: Option<u32>,
    /// Keep the newest this many dumps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub count: Option<u32>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("has(self.pvc) != has(self.s3)").message("storage needs exactly one of pvc or s3"))]
pub struct BackupStorage {
    /// A PersistentVolumeClaim in the policy's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<PvcStorage>,
    /// An S3-compatible bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Storage>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PvcStorage {
    /// Name of the PersistentVolumeClaim.
    #[schemars(length(min = 1, max = 253))]
    pub claim_name: String,
    /// Directory inside the volume (default `/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct S3Storage {
    /// Name of the bucket.
    #[schemars(length(min = 3, max = 63))]
    pub bucket: String,
    /// Endpoint of an S3-compatible store (default AWS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Region of the bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Key prefix of the dumps inside the bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// Secret with `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`.
    pub credentials_secret_ref: LocalObjectRef,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalObjectRef {
    /// Name of the Secret in the policy's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
/// Only the custom format: it is compressed, streams to any store, and restores
/// selectively. (A directory-format dump cannot be streamed to object storage.)
pub enum DumpFormat {
    #[default]
    Custom,
}

// ---------------------------------------------------------------- feature flags

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FeatureFlagsSpec {
    /// Schema of the flags table and of `feature_enabled()` (default `public`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub schema: Option<String>,
    /// Name of the flags table (default `feature_flags`). The policy owns its rows:
    /// flags not listed here are deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub table: Option<String>,
    /// Role that owns the flags table and the SECURITY DEFINER function
    /// `feature_enabled()`, which runs with its owner's rights. When omitted both belong to
    /// the operator's database role (see docs/security.md). The role must exist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub owner: Option<String>,
    /// The flags: each is upserted; a flag no longer listed is deleted.
    #[serde(default)]
    #[schemars(length(max = 10000))]
    pub flags: Vec<FeatureFlag>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FeatureFlag {
    /// Name of the flag.
    #[schemars(length(max = 128))]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$')").message("flag names are letters, digits and _ . : - (at most 128)"))]
    pub name: String,
    /// Whether the flag is on.
    pub enabled: bool,
    /// Share of subjects (0-100) for whom the flag is on when enabled (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub rollout_percentage: Option<u8>,
    /// Free text stored with the flag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1000))]
    pub description: Option<String>,
}

// ---------------------------------------------------------------- materialized views

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MaterializedViewsSpec {
    /// Materialized views the policy manages.
    #[schemars(length(max = 1000))]
    pub views: Vec<MaterializedView>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MaterializedView {
    /// Schema of the view (default `public`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub schema: Option<String>,
    /// Name of the materialized view.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// The view's query; created when missing. A changed definition replaces the view
    /// (destructive, needs `allowDestructive`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 100000))]
    pub definition: Option<String>,
    /// Cron schedule of refreshes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 100))]
    #[x_kube(validation = Rule::new("self.split(' ').size() == 5 || self.startsWith('@')").message("must be a 5-field cron expression or a @macro"))]
    pub schedule: Option<String>,
    /// Role that owns the view. A materialized view's query runs with its owner's rights at
    /// creation and at every refresh: name a role with only the privileges the query needs.
    /// When omitted the view belongs to the operator's database role (see docs/security.md).
    /// The role must exist; dbpolicy does not create roles.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub owner: Option<String>,
    /// `REFRESH … CONCURRENTLY` (needs a unique index on the view; default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrently: Option<bool>,
    /// statement_timeout of one refresh (default 30m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("self.matches('^[0-9]+(ms|s|m|min|h|d)$')").message("must be a duration such as 30s, 5m or 1h"))]
    pub timeout: Option<String>,
}

// ---------------------------------------------------------------- indexes

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IndexesSpec {
    /// Indexes the policy manages.
    #[schemars(length(max = 5000))]
    pub indexes: Vec<IndexSpec>,
    /// Drop indexes this policy created earlier that are no longer listed (needs `allowDestructive`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prune: Option<bool>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IndexSpec {
    /// Name of the index.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// Schema of the table (default `public`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub schema: Option<String>,
    /// Name of the table.
    #[schemars(length(min = 1, max = 63))]
    pub table: String,
    /// Column names or parenthesised expressions, e.g. `user_id` or `((category_stats->>'ospf')::numeric)`.
    #[schemars(length(min = 1, max = 32))]
    pub columns: Vec<String>,
    /// Predicate of a partial index.
    #[serde(default, rename = "where", skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 10000))]
    pub where_clause: Option<String>,
    /// Access method (default Btree).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<IndexMethod>,
    /// A unique index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unique: Option<bool>,
}

#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum IndexMethod {
    #[default]
    Btree,
    Hash,
    Gin,
    Gist,
    Brin,
    Spgist,
}

#[cfg(test)]
mod pitr_tests {
    use super::*;

    #[test]
    fn point_in_time_recovery_reads_from_yaml() {
        let b: BackupsSpec = serde_yaml::from_str(
            "schedule: '0 3 * * *'\nstorage: {pvc: {claimName: backups}}\npointInTimeRecovery:\n  baseBackupSchedule: '0 2 * * 0'\n  retention: {count: 4}\n  slot: dbpolicy_pitr\n",
        )
        .unwrap();
        let p = b.point_in_time_recovery.unwrap();
        assert_eq!(p.base_backup_schedule, "0 2 * * 0");
        assert_eq!(p.retention.unwrap().count, Some(4));
        assert!(serde_yaml::from_str::<PointInTimeRecovery>(
            "baseBackupSchedule: x\nsurprise: 1\n"
        )
        .is_err());
    }
}
