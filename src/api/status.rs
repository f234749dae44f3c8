//! Status of a `DatabasePolicy`: conditions keyed by type, a bounded pending-plan summary
//! and per-area details. No field here changes on every reconcile unless the world did
//! (no "last checked" clocks): a status write would otherwise wake the controller again.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

use super::Mode;

/// Most pending changes listed in status; the counts always cover all of them.
pub(crate) const MAX_PENDING_IN_STATUS: usize = 50;

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DatabasePolicyStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Effective mode (the spec's, or the default Apply).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    /// `Ready`, one per area present in the spec, and `Drifted`.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Number of changes not applied (Plan mode, refused as destructive, or failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_changes: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_plan: Option<PendingPlanSummary>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_settings: Option<ServerSettingsStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partitions: Option<Vec<PartitionTableStatus>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<Vec<ReplicaStatus>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backups: Option<BackupStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub materialized_views: Option<Vec<MaterializedViewStatus>>,
}

/// The pending plan, bounded: counts cover every change, the list at most
/// [`MAX_PENDING_IN_STATUS`] of them.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PendingPlanSummary {
    pub total: u32,
    pub destructive: u32,
    #[serde(default)]
    pub by_area: BTreeMap<String, u32>,
    #[serde(default)]
    pub changes: Vec<PendingChange>,
    #[serde(default)]
    pub truncated: bool,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PendingChange {
    pub area: String,
    pub target: String,
    pub hazard: String,
    /// The table lock the statement takes on its target (`ACCESS EXCLUSIVE`, `SHARE UPDATE
    /// EXCLUSIVE`, …); absent when it takes none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock: Option<String>,
    pub summary: String,
    /// The statement (`kubectl dbpolicy plan`); absent for changes to Kubernetes objects
    /// and for statements over 2000 bytes (`dbpolicy plan` prints those).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sql: Option<String>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServerSettingsStatus {
    /// Parameters whose new value waits for a server restart.
    #[serde(default)]
    pub restart_required: Vec<String>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PartitionTableStatus {
    pub table: String,
    pub partitions: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_bound: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub newest_bound: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows_in_default: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_maintenance: Option<String>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaStatus {
    pub name: String,
    /// Healthy, Lagging, Unreachable or NotInRecovery.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_seconds: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_bytes: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_check_time: Option<String>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BackupStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_schedule_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub newest_backup_bytes: Option<i64>,
    /// Point-in-time recovery (`spec.backups.pointInTimeRecovery`), when enabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub point_in_time_recovery: Option<PitrStatus>,
}

/// Where point-in-time recovery stands. The window is what the last base backup Job
/// listed in the store after its retention ran (only that Job deletes from it, so the
/// earliest time holds until the next one); the receiver extends the latest time
/// continuously after `windowCheckedTime` while `PointInTimeRecoveryReady` is True.
/// `dbpolicy backup list --pitr` shows the live window.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PitrStatus {
    /// The earliest time a restore can reach (the oldest kept base backup's end).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub earliest_recoverable_time: Option<String>,
    /// The latest time a restore could reach when the window was listed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_recoverable_time: Option<String>,
    /// When the window was listed (the last base backup Job's end).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_checked_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_base_backup: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_base_backup_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_base_backup_bytes: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_base_backup_failure_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_base_backup_failure_reason: Option<String>,
    /// Whether the receiver Deployment has an available replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receiver_available: Option<bool>,
    /// The replication slot, as the server reports it (absent: not checked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<String>,
    /// Whether a receiver is streaming through the slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot_active: Option<bool>,
    /// WAL the slot holds back on the server: `pg_current_wal_lsn() - restart_lsn`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot_retained_bytes: Option<i64>,
    /// WAL the server has written that the receiver has not made durable yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive_lag_bytes: Option<i64>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MaterializedViewStatus {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_refresh_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_refresh_seconds: Option<f64>,
}
