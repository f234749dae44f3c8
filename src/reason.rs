//! The reasons users see in conditions, plan errors, Events and metric labels: one enum,
//! spelled as the CamelCase strings status has always carried, with the one SQLSTATE
//! mapping ([`Reason::from_sqlstate`], by code only) and the severity `Ready` ranks by.

use std::fmt;

macro_rules! reasons {
    ($($(#[$doc:meta])* $name:ident,)*) => {
        /// A condition reason. Its text ([`Reason::as_str`], `Display`, serde) is the
        /// variant's name, so conditions, status and metric labels read as before.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum Reason {
            $($(#[$doc])* $name,)*
        }

        impl Reason {
            /// Every reason, in declaration order.
            pub(crate) const ALL: &'static [Reason] = &[$(Reason::$name,)*];

            /// The CamelCase text of the reason.
            pub(crate) const fn as_str(self) -> &'static str {
                match self {
                    $(Reason::$name => stringify!($name),)*
                }
            }
        }
    };
}

reasons! {
    // From PostgreSQL's SQLSTATE (see `from_sqlstate`).
    LockTimeout,
    StatementTimeout,
    TableNotFound,
    ColumnNotFound,
    ObjectNotFound,
    FunctionNotFound,
    SyntaxError,
    InvalidPolicyExpression,
    InvalidParameterValue,
    InsufficientPrivilege,
    Deadlock,
    ObjectNotInPrerequisiteState,
    ConnectionFailed,
    AuthenticationFailed,
    ServerShutdown,
    /// A statement failed with a SQLSTATE that says nothing more specific.
    ApplyFailed,

    // The engine's run.
    InvalidSpec,
    InvalidConnectionUrl,
    ConcurrentApply,
    InvalidClock,
    OwnershipConflict,
    /// The database where server-wide items are claimed cannot be read or written.
    ServerClaimsUnavailable,
    ReleaseFailed,

    // Plan errors and notices of the areas.
    InvalidValue,
    SchemaNotFound,
    RoleNotFound,
    InvalidRoles,
    NameTaken,
    NameInUse,
    PartitionedTable,
    NotATable,
    UnknownSetting,
    DuplicateSetting,
    SettingNotAllowed,
    SessionOnlySetting,
    ReadOnlySetting,
    SettingNotApplied,
    RestartRequired,
    NotLoaded,
    NotPartitioned,
    UnsupportedPartitionStrategy,
    UnsupportedPartitionKey,
    UnsupportedKeyType,
    OverlappingPartition,
    PartitionNotManaged,
    DefaultPartitionKept,
    TooManyPartitions,
    TriggerFiresOnMove,
    InvalidRetention,
    InvalidStartDate,
    InvalidIndexDefinition,
    InvalidViewDefinition,
    MaterializedViewNotFound,
    NotAMaterializedView,
    RequiresUniqueIndex,
    ColumnMismatch,
    IncompatibleFlagsTable,
    PolicyNoLongerListed,
    InvalidSlotName,
    DuplicateSlot,
    SlotInUse,
    SlotLost,
    SlotTypeMismatch,
    InactiveSlotRetainingWal,
    PrimaryInRecovery,

    // Replica health.
    ReplicaHealthy,
    ReplicaLagging,
    ReplicaUnreachable,
    ReplicaNotInRecovery,
    ReplicaNotChecked,

    // Area states the controller derives from a run.
    Reconciled,
    NotReconciled,
    PlanPending,
    NotAttempted,
    DestructiveChangesRefused,
    /// `spec.suspend` is true: Ready, and every area and Drifted as not checked.
    Suspended,

    // `Drifted`.
    InSync,
    DriftDetected,
    DriftRepaired,
    /// Plan mode: the policy asks for changes not yet made (not drift).
    ChangesPending,
    /// The database is being brought to a new generation of the policy (not drift).
    Converging,

    // Events only: what a run or a deletion did.
    /// A change set applied for other reasons than drift (a spec edit, a first run).
    Applied,
    /// Drift that weakened row-level security, repaired / left in place (a Warning).
    SecurityDriftRepaired,
    SecurityDriftDetected,
    /// A deleted policy's claims released.
    Released,
    /// `deletionPolicy: Reset` could not reset everything.
    ResetIncomplete,
    /// A replication slot the deleted policy created remains (it retains WAL).
    ReplicationSlotRetained,

    // `BackupsReady`, from the backup CronJob's Jobs.
    BackupSucceeded,
    BackupFailed,
    BackupOverdue,
    NoBackupYet,
    BackupsSuspended,
    /// `spec.backups.schedule` is not a cron expression the operator can evaluate.
    InvalidSchedule,

    // `PointInTimeRecoveryReady` (and the Backups area while it is not ready).
    Recoverable,
    WalReceiverStarting,
    WalReceiverDown,
    SlotRetainingTooMuch,
    WalArchivingLagging,
    BaseBackupFailed,
    BaseBackupOverdue,
    NoBaseBackupYet,

    // The controller's own steps.
    InvalidObject,
    SecretNotFound,
    SecretKeyNotFound,
    SecretReadFailed,
    StatusPatchFailed,
    CronJobSyncFailed,
    CronJobsUnsupported,
    BackupStatusFailed,
    ReadEndpointFailed,
    SecretNotOwned,
    CronJobNotOwned,
    DeploymentNotOwned,
    PersistentVolumeClaimNotOwned,
    NotOwned,
    /// Syncing point-in-time recovery's children (the WAL receiver) failed.
    WalReceiverSyncFailed,
    FinalizerFailed,
    /// `spec.driftDetection.eventTrigger`: the `DriftEventTrigger` condition.
    EventTriggerActive,
    EventTriggerNotInstalled,
    EventTriggerNotPermitted,

    // The backup job's own failures (`dbpolicy backup …`): its exit line and the
    // termination message the controller reads (`status.backups.lastFailureReason`).
    InvalidArguments,
    StoreFailed,
    ToolFailed,
    SourceReadFailed,
    DumpFailed,
    UploadFailed,
    BackupNotFound,
    BackupCorrupt,
    RestoreFailed,
    RestoreMismatch,
    ScratchDatabaseFailed,
    /// The job was stopped (SIGTERM) before it finished.
    Interrupted,
    LocalIoFailed,
    WalReceiverFailed,
    WalCorrupt,
    BaseBackupCorrupt,
    WalConflict,
    TargetNotRecoverable,
    PitrVerifyFailed,
}

impl Reason {
    /// The reason PostgreSQL's SQLSTATE names, by code only (never by message text);
    /// None when the code says nothing more specific than "the statement failed": each
    /// caller then names its own fallback (`ApplyFailed`, `InvalidIndexDefinition`, …).
    pub(crate) fn from_sqlstate(code: Option<&str>) -> Option<Reason> {
        Some(match code? {
            "55P03" => Reason::LockTimeout,
            "57014" => Reason::StatementTimeout,
            "42P01" => Reason::TableNotFound,
            "42703" => Reason::ColumnNotFound,
            "42704" => Reason::ObjectNotFound,
            "42883" => Reason::FunctionNotFound,
            "42601" => Reason::SyntaxError,
            "42804" | "42846" => Reason::InvalidPolicyExpression,
            "22023" | "22P02" => Reason::InvalidParameterValue,
            "42501" => Reason::InsufficientPrivilege,
            "40P01" => Reason::Deadlock,
            "55000" => Reason::ObjectNotInPrerequisiteState,
            c if c.starts_with("08") => Reason::ConnectionFailed,
            c if c.starts_with("28") => Reason::AuthenticationFailed,
            c if c.starts_with("57P") => Reason::ServerShutdown,
            _ => return None,
        })
    }

    /// [`Reason::from_sqlstate`] of a sqlx error, `fallback` when it names nothing
    /// specific (or is not PostgreSQL's).
    pub(crate) fn of_error(e: &sqlx::Error, fallback: Reason) -> Reason {
        Reason::from_sqlstate(crate::pg::sqlstate(e).as_deref()).unwrap_or(fallback)
    }

    /// How bad a failing area with this reason is, to pick the one `Ready` shows: a
    /// pending plan least, another owner's object in the way most (nothing the next check
    /// can fix by itself).
    pub(crate) fn severity(self) -> u8 {
        match self {
            Reason::PlanPending => 1,
            Reason::DestructiveChangesRefused => 2,
            Reason::RestartRequired | Reason::SettingNotApplied => 3,
            Reason::NotAttempted => 4,
            Reason::SecretNotOwned
            | Reason::CronJobNotOwned
            | Reason::DeploymentNotOwned
            | Reason::PersistentVolumeClaimNotOwned
            | Reason::NotOwned => 6,
            // Every other reason a False area carries is a failure the next check may fix.
            _ => 5,
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Reason {
    type Err = UnknownReason;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Reason::ALL
            .iter()
            .copied()
            .find(|r| r.as_str() == s)
            .ok_or(UnknownReason)
    }
}

/// Text that is not one of the [`Reason`]s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not a known reason")]
pub struct UnknownReason;

impl serde::Serialize for Reason {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl PartialEq<&str> for Reason {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<str> for Reason {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl From<Reason> for String {
    fn from(r: Reason) -> String {
        r.as_str().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_the_variant_name_and_reads_back() {
        for r in Reason::ALL {
            assert_eq!(r.as_str().parse::<Reason>(), Ok(*r));
            assert!(r.as_str().chars().next().unwrap().is_ascii_uppercase());
            assert_eq!(
                serde_json::to_string(r).unwrap(),
                format!("\"{}\"", r.as_str())
            );
        }
        assert_eq!(Reason::LockTimeout.to_string(), "LockTimeout");
        assert!("lockTimeout".parse::<Reason>().is_err());
    }

    #[test]
    fn sqlstates_by_code() {
        assert_eq!(
            Reason::from_sqlstate(Some("55P03")),
            Some(Reason::LockTimeout)
        );
        assert_eq!(
            Reason::from_sqlstate(Some("08006")),
            Some(Reason::ConnectionFailed)
        );
        assert_eq!(
            Reason::from_sqlstate(Some("28P01")),
            Some(Reason::AuthenticationFailed)
        );
        assert_eq!(Reason::from_sqlstate(Some("XX000")), None);
        assert_eq!(Reason::from_sqlstate(None), None);
    }

    #[test]
    fn severity_ranks_pending_below_failures_below_foreign_objects() {
        assert!(Reason::PlanPending.severity() < Reason::DestructiveChangesRefused.severity());
        assert!(Reason::NotAttempted.severity() < Reason::LockTimeout.severity());
        assert!(Reason::LockTimeout.severity() < Reason::SecretNotOwned.severity());
        assert_eq!(Reason::BackupFailed.severity(), 5);
        assert_eq!(Reason::DeploymentNotOwned.severity(), 6);
    }
}
