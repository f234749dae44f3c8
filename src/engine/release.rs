//! Releasing a policy that is gone (the operator's finalizer, `dbpolicy release`): its
//! claims in the ledger (`dbpolicy.managed`) are deleted so that a successor policy can
//! adopt what it set without a hand edit; with `deletionPolicy: Reset` what it set is
//! reset first, by the engine itself (a run against an empty spec resets what the ledger
//! says the policy owns). Replication slots it created and that still exist are named, so
//! that the caller tells the user: a slot retains WAL until it is dropped. The policy's
//! server-wide claims (settings, slots: see [`super::server_claims`]) are released last.

use sqlx::{Connection, PgConnection};

use super::server_claims::{self, ClaimsTarget};
use super::{run_with, EngineError, Outcome, PolicyId, RunOptions, ADVISORY_LOCK_KEY};
use crate::api::{DatabasePolicySpec, Mode, Safety};
use crate::duration::pg_millis;
use crate::engine::areas::replicas::OWNED_SLOT;
use crate::engine::Area;

/// What a release did.
#[derive(Debug, Clone, Default)]
pub(crate) struct Released {
    /// The ledger rows deleted: (area, target, item).
    pub claims: Vec<(String, String, String)>,
    /// Replication slots the policy had created that still exist (Retain, or a Reset
    /// that could not drop them): they retain WAL until dropped.
    pub remaining_slots: Vec<String>,
    /// The reset run (`Reset` only).
    pub reset: Option<Outcome>,
    /// The server-wide claims released (kind, name), from the claims database.
    pub server_claims: Vec<server_claims::Item>,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ReleaseError {
    /// The reset run could not start (lock, session, invalid timeouts).
    #[error("resetting what the policy set: {0}")]
    Reset(#[from] EngineError),
    #[error("releasing the policy's claims in dbpolicy.managed: {0}")]
    Ledger(String),
    /// The database's claims were released, the server-wide ones not: releasing again
    /// once the claims database can be reached finishes the job.
    #[error("releasing the policy's server-wide claims in database {database} ({table}): {message}; run `dbpolicy release` again once it can be reached", table = server_claims::CLAIMS_TABLE)]
    ServerClaims { database: String, message: String },
}

impl ReleaseError {
    pub(crate) fn reason(&self) -> crate::reason::Reason {
        match self {
            ReleaseError::Reset(e) => e.reason(),
            ReleaseError::Ledger(_) | ReleaseError::ServerClaims { .. } => {
                crate::reason::Reason::ReleaseFailed
            }
        }
    }
}

/// The spec a Reset runs: no area, so the engine plans the reset of everything the ledger
/// says the policy owns; destructive changes (dropping its slots) allowed, since deleting a
/// policy with `deletionPolicy: Reset` asks for exactly that.
pub(crate) fn reset_spec(spec: &DatabasePolicySpec) -> DatabasePolicySpec {
    DatabasePolicySpec {
        database: spec.database.clone(),
        safety: Some(Safety {
            lock_timeout: Some(spec.lock_timeout().to_string()),
            statement_timeout: Some(spec.statement_timeout().to_string()),
            index_build_timeout: Some(spec.index_build_timeout().to_string()),
            allow_destructive: Some(true),
        }),
        ..Default::default()
    }
}

/// Resets (when `reset`) and releases what `policy` owns in the database of `conn`, and
/// its server-wide claims in the database `claims` names.
pub(crate) async fn release(
    conn: &mut PgConnection,
    spec: &DatabasePolicySpec,
    policy: &PolicyId,
    reset: bool,
    claims: &ClaimsTarget,
) -> Result<Released, ReleaseError> {
    let mut released = Released::default();
    if reset {
        let options = RunOptions {
            claims: claims.clone(),
            ..Default::default()
        };
        released.reset =
            Some(run_with(conn, &reset_spec(spec), Mode::Apply, policy, &options).await?);
    }
    let timeout =
        pg_millis(spec.statement_timeout()).map_err(|e| ReleaseError::Ledger(e.into()))?;
    // One transaction under the advisory lock every run takes: a run of the same policy
    // in flight finishes (and records) before its claims go. The lock is awaited the way
    // every run awaits it (polled, no snapshot held, so no deadlock with that run's
    // `CREATE INDEX CONCURRENTLY`), then released whatever happened.
    super::acquire_lock(conn, std::time::Duration::from_millis(timeout))
        .await
        .map_err(|e| ReleaseError::Ledger(e.to_string()))?;
    let result = claims_in_transaction(conn, policy, timeout, released).await;
    if result.is_ok() {
        // The policy's subscription to the drift event trigger went with its claims; the
        // trigger goes with the last one. Best effort: a trigger left behind only wakes
        // the operator for nothing, and the next release or turned-off policy drops it.
        if let Err(e) = super::ddl_notify::release(conn, timeout).await {
            tracing::warn!(error = %crate::pg::error_summary(&e), "could not drop the drift event trigger no policy uses any more");
        }
    }
    let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(ADVISORY_LOCK_KEY)
        .execute(&mut *conn)
        .await;
    let mut released = result?;
    // A policy with nothing server-wide must not fail its release because the claims
    // database is out of reach; one with server-wide items must say what it left.
    let server_wide = !server_claims::touched(spec, &Default::default()).is_empty()
        || released.claims.iter().any(|(area, _, item)| {
            area == Area::ServerSettings.as_str()
                || (area == Area::Replicas.as_str() && item == OWNED_SLOT)
        });
    match release_server_claims(conn, policy, timeout, claims).await {
        Ok(items) => released.server_claims = items,
        Err(e) if server_wide => return Err(e),
        Err(e) => tracing::debug!(error = %e, "no server-wide claims released"),
    }
    Ok(released)
}

/// Deletes every server-wide claim of (this database, `policy`) in the claims database.
async fn release_server_claims(
    conn: &mut PgConnection,
    policy: &PolicyId,
    timeout: u64,
    claims: &ClaimsTarget,
) -> Result<Vec<server_claims::Item>, ReleaseError> {
    let failed = |message: String| ReleaseError::ServerClaims {
        database: claims.database().to_string(),
        message,
    };
    let database: String = sqlx::query_scalar("SELECT current_database()::text")
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| ReleaseError::Ledger(crate::pg::error_summary(&e)))?;
    let me = server_claims::Claimant {
        database,
        policy: policy.0.clone(),
    };
    let mut c = server_claims::connect(claims, timeout)
        .await
        .map_err(|e| failed(e.to_string()))?;
    let items = server_claims::release_all(&mut c, &me)
        .await
        .map_err(|e| failed(crate::pg::error_summary(&e)));
    let _ = c.close().await;
    items
}

/// Deletes the policy's ledger rows and names the slots it leaves, in one transaction.
async fn claims_in_transaction(
    conn: &mut PgConnection,
    policy: &PolicyId,
    timeout: u64,
    mut released: Released,
) -> Result<Released, ReleaseError> {
    let ledger = |e: sqlx::Error| ReleaseError::Ledger(crate::pg::error_summary(&e));
    let mut tx = conn.begin().await.map_err(ledger)?;
    sqlx::Executor::execute(
        &mut *tx,
        format!("SET LOCAL statement_timeout = {timeout}; SET LOCAL lock_timeout = {timeout}")
            .as_str(),
    )
    .await
    .map_err(ledger)?;
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('dbpolicy.managed') IS NOT NULL")
        .fetch_one(&mut *tx)
        .await
        .map_err(ledger)?;
    if exists {
        released.claims = sqlx::query_as(
            "DELETE FROM dbpolicy.managed WHERE policy = $1 RETURNING area, target, item",
        )
        .bind(&policy.0)
        .fetch_all(&mut *tx)
        .await
        .map_err(ledger)?;
        released.claims.sort();
    }
    let slots: Vec<String> = released
        .claims
        .iter()
        .filter(|(area, _, item)| area == Area::Replicas.as_str() && item == OWNED_SLOT)
        .map(|(_, target, _)| target.clone())
        .collect();
    if !slots.is_empty() {
        released.remaining_slots = sqlx::query_scalar(
            "SELECT slot_name::text FROM pg_replication_slots WHERE slot_name = ANY($1) ORDER BY 1",
        )
        .bind(&slots)
        .fetch_all(&mut *tx)
        .await
        .map_err(ledger)?;
    }
    tx.commit().await.map_err(ledger)?;
    Ok(released)
}

/// The statement that drops a slot, for messages.
pub(crate) fn drop_slot_sql(slot: &str) -> String {
    format!(
        "SELECT pg_drop_replication_slot({})",
        crate::pg::quote_literal(slot)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reset_spec_has_no_area_and_allows_destructive_changes() {
        let spec: DatabasePolicySpec = serde_yaml::from_str(
            "database: {connectionSecretRef: {name: db}}\nsafety: {lockTimeout: 2s}\nautovacuum: {tables: []}\nfeatureFlags: {flags: []}\n",
        )
        .unwrap();
        let r = reset_spec(&spec);
        assert_eq!(
            crate::controller::status::spec_areas(&r),
            Vec::<Area>::new()
        );
        assert!(r.allow_destructive());
        assert_eq!(r.lock_timeout(), "2s");
        assert_eq!(r.database, spec.database);
    }

    #[test]
    fn slot_names_are_quoted_in_messages() {
        assert_eq!(
            drop_slot_sql("a'b"),
            "SELECT pg_drop_replication_slot('a''b')"
        );
    }
}
