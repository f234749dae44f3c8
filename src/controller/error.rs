//! The controller's one error enum: each variant names the step that failed, and gives the metric label and the condition reason; no message ever carries the connection URI.

use crate::engine::EngineError;
use crate::pg::ConnectError;
use crate::reason::Reason;

#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// The object lacks a name or namespace (hand-made objects only).
    #[error("the DatabasePolicy has no {0}")]
    MissingObjectKey(&'static str),

    #[error("Secret {namespace}/{name} (spec.database.connectionSecretRef) not found: create it with a key {key:?} holding a postgres:// URI")]
    SecretNotFound {
        namespace: String,
        name: String,
        key: String,
    },

    #[error(
        "Secret {namespace}/{name} has no key {key:?} (spec.database.connectionSecretRef.key)"
    )]
    SecretKeyNotFound {
        namespace: String,
        name: String,
        key: String,
    },

    #[error("key {key:?} of Secret {namespace}/{name} is not UTF-8 text")]
    SecretNotUtf8 {
        namespace: String,
        name: String,
        key: String,
    },

    /// Reading the Secret failed for another reason than absence (RBAC, API server down).
    /// kube's error names the request, never the Secret's data.
    #[error("reading Secret {namespace}/{name}: {source}")]
    SecretRead {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },

    /// `ConnectError` names host, port and database only, never user or password.
    #[error("{0}")]
    Connect(#[from] ConnectError),

    #[error("{0}")]
    Engine(#[from] EngineError),

    /// The plan could not be carried out (a missing table, an invalid setting): nothing
    /// was applied.
    #[error("the plan has {count} error(s), nothing applied; first: {first}")]
    PlanErrors {
        count: usize,
        reason: Reason,
        first: String,
    },

    /// A statement failed; what came after it was not attempted.
    #[error("applying failed: {message}")]
    ApplyFailed { reason: Reason, message: String },

    #[error("writing status: {0}")]
    PatchStatus(#[source] kube::Error),

    /// Listing, applying or deleting the policy's CronJobs failed (status says so first).
    #[error("{action} CronJob(s) of the policy: {source}")]
    CronJobs {
        action: &'static str,
        #[source]
        source: kube::Error,
    },

    /// Reading, creating, applying or deleting the point-in-time recovery children (the
    /// WAL receiver Deployment, its spool claim) failed.
    #[error("{action} {kind} {name} (spec.backups.pointInTimeRecovery): {source}")]
    Pitr {
        action: &'static str,
        kind: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },

    /// Reading the backup CronJob's Jobs or their pods failed.
    #[error("reading the backup Jobs and their pods: {0}")]
    BackupJobs(#[source] kube::Error),

    /// Publishing the read-endpoint Secret failed. kube's error names the request, never
    /// the Secret's data.
    #[error("publishing the read-endpoint Secret {name}: {source}")]
    ReadEndpoint {
        name: String,
        #[source]
        source: kube::Error,
    },

    /// A child the policy would create exists and is not the policy's (no controller
    /// ownerReference naming it): it is left exactly as it is.
    #[error("{kind} {name} ({wanted_by}) exists and was not created by this policy: it is left unchanged; choose another name, or delete that {kind} to let the policy create its own")]
    NotOwned {
        kind: &'static str,
        name: String,
        wanted_by: String,
    },

    /// Releasing (and with `deletionPolicy: Reset`, resetting) a deleted policy.
    #[error("{0}")]
    Release(#[source] crate::engine::release::ReleaseError),

    #[error("adding the finalizer: {0}")]
    AddFinalizer(#[source] kube::Error),

    #[error("removing the finalizer: {0}")]
    RemoveFinalizer(#[source] kube::Error),

    #[error("finalizer: {0}")]
    Finalizer(String),
}

impl Error {
    /// Label of `dbpolicy_reconcile_errors_total`: the step that failed, in snake_case.
    pub(crate) fn metric_label(&self) -> &'static str {
        match self {
            Error::MissingObjectKey(_) => "missing_object_key",
            Error::SecretNotFound { .. } => "secret_not_found",
            Error::SecretKeyNotFound { .. } => "secret_key_not_found",
            Error::SecretNotUtf8 { .. } => "secret_not_utf8",
            Error::SecretRead { .. } => "secret_read",
            Error::Connect(_) => "connect",
            Error::Engine(_) => "engine",
            Error::PlanErrors { .. } => "plan",
            Error::ApplyFailed { .. } => "apply",
            Error::PatchStatus(_) => "patch_status",
            Error::CronJobs { .. } => "cronjobs",
            Error::BackupJobs(_) => "backup_jobs",
            Error::Pitr { .. } => "pitr",
            Error::ReadEndpoint { .. } => "read_endpoint",
            Error::NotOwned { .. } => "not_owned",
            Error::Release(_) => "release",
            Error::AddFinalizer(_) | Error::RemoveFinalizer(_) | Error::Finalizer(_) => "finalizer",
        }
    }

    /// The reason for the `Ready` condition and the Warning event.
    pub(crate) fn reason(&self) -> Reason {
        match self {
            Error::MissingObjectKey(_) => Reason::InvalidObject,
            Error::SecretNotFound { .. } => Reason::SecretNotFound,
            Error::SecretKeyNotFound { .. } => Reason::SecretKeyNotFound,
            Error::SecretNotUtf8 { .. } => Reason::InvalidConnectionUrl,
            Error::SecretRead { .. } => Reason::SecretReadFailed,
            Error::Connect(e) => e.reason(),
            Error::Engine(e) => e.reason(),
            Error::PlanErrors { reason, .. } | Error::ApplyFailed { reason, .. } => *reason,
            Error::PatchStatus(_) => Reason::StatusPatchFailed,
            Error::CronJobs { .. } => Reason::CronJobSyncFailed,
            Error::BackupJobs(_) => Reason::BackupStatusFailed,
            Error::Pitr { .. } => Reason::WalReceiverSyncFailed,
            Error::ReadEndpoint { .. } => Reason::ReadEndpointFailed,
            Error::NotOwned { kind, .. } => match *kind {
                "Secret" => Reason::SecretNotOwned,
                "CronJob" => Reason::CronJobNotOwned,
                "Deployment" => Reason::DeploymentNotOwned,
                "PersistentVolumeClaim" => Reason::PersistentVolumeClaimNotOwned,
                _ => Reason::NotOwned,
            },
            Error::Release(e) => e.reason(),
            Error::AddFinalizer(_) | Error::RemoveFinalizer(_) | Error::Finalizer(_) => {
                Reason::FinalizerFailed
            }
        }
    }

    pub(crate) fn from_finalizer(e: kube::runtime::finalizer::Error<Error>) -> Error {
        use kube::runtime::finalizer::Error as F;
        match e {
            F::ApplyFailed(e) | F::CleanupFailed(e) => e,
            F::AddFinalizer(e) => Error::AddFinalizer(e),
            F::RemoveFinalizer(e) => Error::RemoveFinalizer(e),
            other => Error::Finalizer(other.to_string()),
        }
    }
}

pub(crate) type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    const URI: &str = "postgres://app:hunter2@db.example:5432/certquiz";

    #[tokio::test]
    async fn messages_never_contain_the_uri_or_password() {
        // A real connection failure through the same path the reconciler uses.
        let connect = crate::pg::connect_one("postgres://app:hunter2@127.0.0.1:1/certquiz")
            .await
            .unwrap_err();
        let bad_url = crate::pg::connect_one("postgres://app:hunter2@:notaport/x")
            .await
            .unwrap_err();
        let errors = [
            Error::Connect(connect),
            Error::Connect(bad_url),
            Error::SecretNotFound {
                namespace: "ns".into(),
                name: "db".into(),
                key: "uri".into(),
            },
            Error::SecretKeyNotFound {
                namespace: "ns".into(),
                name: "db".into(),
                key: "uri".into(),
            },
            Error::SecretNotUtf8 {
                namespace: "ns".into(),
                name: "db".into(),
                key: "uri".into(),
            },
        ];
        for e in &errors {
            let text = format!("{e} {e:?}");
            assert!(!text.contains("hunter2"), "{text}");
            assert!(!text.contains(URI), "{text}");
        }
        assert_eq!(errors[0].reason(), "ConnectionFailed");
        assert_eq!(errors[0].metric_label(), "connect");
        assert_eq!(errors[1].reason(), "InvalidConnectionUrl");
        assert_eq!(errors[2].reason(), "SecretNotFound");
    }
}
