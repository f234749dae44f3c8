//! The `DatabasePolicy` custom resource (`dbpolicy.dev/v1alpha1`): spec per area, status.
//!
//! Optional fields carry no schema defaults on purpose: defaults inside list items make
//! Argo CD report a perpetual diff, so every default lives in code (the `effective_*`
//! accessors) and effective values are reported back in status.

mod areas;
mod status;
mod validate;

pub use areas::*;
pub use status::*;
pub use validate::{validate_spec, ValidationError};

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

pub(crate) const API_GROUP: &str = "dbpolicy.dev";
pub(crate) const API_VERSION: &str = "v1alpha1";
pub(crate) const DEFAULT_SECRET_KEY: &str = "uri";
pub(crate) const DEFAULT_LOCK_TIMEOUT: &str = "5s";
pub(crate) const DEFAULT_STATEMENT_TIMEOUT: &str = "60s";
/// The statement timeout of a concurrent index build or drop: as stripe/pg-schema-diff,
/// 20 minutes; such a statement blocks no reads or writes while it runs.
pub(crate) const DEFAULT_INDEX_BUILD_TIMEOUT: &str = "20m";
pub(crate) const DEFAULT_DRIFT_CHECK_INTERVAL: &str = "5m";
/// Bounds of `spec.driftCheckInterval`, checked by the CRD's CEL rule and `validate_spec`.
pub const MIN_DRIFT_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
pub const MAX_DRIFT_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(86_400);

/// Policy for one PostgreSQL database: what its row-level security, partitions, autovacuum and
/// server settings, replicas, backups, feature flags, materialized views and indexes must be.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "dbpolicy.dev",
    version = "v1alpha1",
    kind = "DatabasePolicy",
    plural = "databasepolicies",
    shortname = "dbpol",
    shortname = "dbp",
    category = "dbpolicy",
    namespaced,
    status = "DatabasePolicyStatus",
    doc = "DatabasePolicy reconciles row-level security, partitions, autovacuum and server settings, replicas, backups, feature flags, materialized views and indexes of one PostgreSQL database.",
    printcolumn = r#"{"name": "Ready", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name": "Reason", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name": "Mode", "type": "string", "jsonPath": ".status.mode"}"#,
    printcolumn = r#"{"name": "Pending", "type": "integer", "jsonPath": ".status.pendingChanges"}"#,
    printcolumn = r#"{"name": "Last Backup", "type": "date", "jsonPath": ".status.backups.lastSuccessTime"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name": "Message", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Ready\")].message", "priority": 1}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DatabasePolicySpec {
    /// The database this policy governs.
    pub database: DatabaseRef,
    /// `Apply` (default) changes the database; `Plan` only reports what would change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    /// Stop reconciling this policy (nothing is observed or changed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspend: Option<bool>,
    /// How often the live database is compared with the policy: 10s to 24h (default 5m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("self.matches('^[0-9]+(ms|s|m|min|h|d)$')").message("must be a duration such as 30s, 5m or 1h"))]
    // Nine digits at most keep the arithmetic far from int64 overflow; `ms` before `s` and
    // `min` before `m`, since the shorter unit is a suffix of the longer.
    #[x_kube(validation = Rule::new("!self.matches('^[0-9]{1,9}(ms|s|m|min|h|d)$') ? !self.matches('^[0-9]+(ms|s|m|min|h|d)$') : [int(self.find('^[0-9]+')) * (self.endsWith('ms') ? 1 : self.endsWith('min') ? 60000 : self.endsWith('s') ? 1000 : self.endsWith('m') ? 60000 : self.endsWith('h') ? 3600000 : 86400000)].all(ms, ms >= 10000 && ms <= 86400000)").message("must be between 10s and 24h"))]
    pub drift_check_interval: Option<String>,
    /// Faster drift detection than the `driftCheckInterval` poll (which stays as the
    /// fallback).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift_detection: Option<DriftDetection>,
    /// What deleting this policy does to the database: `Retain` (default) leaves everything
    /// it set in place; `Reset` resets what it set (server settings, autovacuum parameters)
    /// and drops the replication slots it created. Either way its claims in
    /// `dbpolicy.managed` are released, so that another policy can take over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_policy: Option<DeletionPolicy>,
    /// Timeouts and the opt-in for destructive changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub safety: Option<Safety>,
    /// Row-level security: enabled and forced per table, and the tables' policies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub row_level_security: Option<RowLevelSecuritySpec>,
    /// Time-range partitions: created ahead, a default partition, retention.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partitions: Option<PartitionsSpec>,
    /// Per-table autovacuum storage parameters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autovacuum: Option<AutovacuumSpec>,
    /// Server settings by `ALTER SYSTEM` (they apply to the whole server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_settings: Option<ServerSettingsSpec>,
    /// Replicas: a replication slot each, health and lag, the read-endpoint Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<ReplicasSpec>,
    /// Scheduled `pg_dump` backups, run by a CronJob of the operator's image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backups: Option<BackupsSpec>,
    /// Feature flags: rows of a flags table in the database.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feature_flags: Option<FeatureFlagsSpec>,
    /// Materialized views and their refresh schedules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub materialized_views: Option<MaterializedViewsSpec>,
    /// Expression and partial indexes, built `CONCURRENTLY`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub indexes: Option<IndexesSpec>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DatabaseRef {
    /// Secret in the policy's namespace whose key holds a libpq URI for the primary.
    pub connection_secret_ref: SecretKeyRef,
}

/// A key of a Secret in the policy's namespace. Credentials never appear in the spec.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretKeyRef {
    /// Name of the Secret in the policy's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key inside the Secret (default `uri`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub key: Option<String>,
}

impl SecretKeyRef {
    pub(crate) fn effective_key(&self) -> &str {
        self.key.as_deref().unwrap_or(DEFAULT_SECRET_KEY)
    }
}

#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum Mode {
    #[default]
    Apply,
    Plan,
}

/// What deleting a policy does to what it set (`spec.deletionPolicy`).
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum DeletionPolicy {
    /// Leave what the policy set in place; only its claims are released.
    #[default]
    Retain,
    /// Reset what the policy set and drop the replication slots it created.
    Reset,
}

/// How drift is noticed besides the `driftCheckInterval` poll (`spec.driftDetection`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DriftDetection {
    /// Install an event trigger (`ddl_command_end`, `sql_drop`) in the database that
    /// notifies the operator over LISTEN/NOTIFY when a table, index, policy or
    /// materialized view changes, so that drift is repaired within seconds (default
    /// false). Needs a superuser connection; without one the `DriftEventTrigger`
    /// condition says `EventTriggerNotPermitted` and the poll goes on. `ALTER SYSTEM` and
    /// data changes (feature flags) fire no event trigger: only the poll sees them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_trigger: Option<bool>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Safety {
    /// `lock_timeout` for every statement (default 5s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("self.matches('^[0-9]+(ms|s|m|min|h|d)$')").message("must be a duration such as 500ms, 5s or 1m"))]
    pub lock_timeout: Option<String>,
    /// `statement_timeout` for every statement (default 60s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("self.matches('^[0-9]+(ms|s|m|min|h|d)$')").message("must be a duration such as 30s, 5m or 1h"))]
    pub statement_timeout: Option<String>,
    /// The long-operation timeout: `statement_timeout` of `CREATE INDEX CONCURRENTLY`,
    /// `DROP INDEX CONCURRENTLY`, `DETACH PARTITION … CONCURRENTLY` and the first fill of a
    /// new materialized view instead of `statementTimeout` (default 20m; `0s` for none).
    /// Long by nature, they block no reads or writes: the concurrent ones wait for every
    /// older transaction, and nobody can read a new view before it is filled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("self.matches('^[0-9]+(ms|s|m|min|h|d)$')").message("must be a duration such as 20m, 2h or 0s (no limit)"))]
    pub index_build_timeout: Option<String>,
    /// Allow changes that drop or delete what the operator did not create in this run
    /// (policies, partitions, indexes, replication slots, replaced views). Default false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_destructive: Option<bool>,
}

impl DatabasePolicySpec {
    pub(crate) fn effective_mode(&self) -> Mode {
        self.mode.unwrap_or_default()
    }
    /// The names of every Secret (in the policy's namespace) the policy reads: the
    /// primary's, each replica's and the S3 credentials. A change to any of them must
    /// re-trigger the policy.
    pub(crate) fn referenced_secrets(&self) -> impl Iterator<Item = &str> {
        let primary = std::iter::once(self.database.connection_secret_ref.name.as_str());
        let replicas = self
            .replicas
            .iter()
            .flat_map(|r| &r.replicas)
            .map(|r| r.connection_secret_ref.name.as_str());
        let s3 = self
            .backups
            .as_ref()
            .and_then(|b| b.storage.s3.as_ref())
            .map(|s| s.credentials_secret_ref.name.as_str());
        primary.chain(replicas).chain(s3)
    }
    pub(crate) fn effective_deletion_policy(&self) -> DeletionPolicy {
        self.deletion_policy.unwrap_or_default()
    }
    pub(crate) fn is_suspended(&self) -> bool {
        self.suspend.unwrap_or(false)
    }
    pub(crate) fn allow_destructive(&self) -> bool {
        self.safety
            .as_ref()
            .and_then(|s| s.allow_destructive)
            .unwrap_or(false)
    }
    pub(crate) fn lock_timeout(&self) -> &str {
        self.safety
            .as_ref()
            .and_then(|s| s.lock_timeout.as_deref())
            .unwrap_or(DEFAULT_LOCK_TIMEOUT)
    }
    pub(crate) fn statement_timeout(&self) -> &str {
        self.safety
            .as_ref()
            .and_then(|s| s.statement_timeout.as_deref())
            .unwrap_or(DEFAULT_STATEMENT_TIMEOUT)
    }
    pub(crate) fn index_build_timeout(&self) -> &str {
        self.safety
            .as_ref()
            .and_then(|s| s.index_build_timeout.as_deref())
            .unwrap_or(DEFAULT_INDEX_BUILD_TIMEOUT)
    }
    /// `spec.driftDetection.eventTrigger` (default false).
    pub fn drift_event_trigger(&self) -> bool {
        self.drift_detection
            .as_ref()
            .and_then(|d| d.event_trigger)
            .unwrap_or(false)
    }
    pub(crate) fn drift_check_interval(&self) -> &str {
        self.drift_check_interval
            .as_deref()
            .unwrap_or(DEFAULT_DRIFT_CHECK_INTERVAL)
    }
}
