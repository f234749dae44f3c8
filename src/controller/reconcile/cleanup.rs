//! Cleanup, the finalizer's other arm: the deleted policy's claims released in the
//! database (and with `deletionPolicy: Reset`, what it set reset first), told in Events.

use std::sync::Arc;

use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::ResourceExt;
use sqlx::Connection;
use tracing::warn;

use super::dereference::read_connection_uri;
use super::verdict::failure_of;
use crate::api::{DatabasePolicy, DeletionPolicy, Mode};
use crate::controller::context::{key, Context};
use crate::controller::error::{Error, Result};
use crate::controller::status;
use crate::engine::server_claims::ClaimsTarget;
use crate::engine::{release, PolicyId};
use crate::reason::Reason;

/// Deletion, per `spec.deletionPolicy`: the policy's claims in the database's ledger
/// (`dbpolicy.managed`) are released so that a successor can adopt what it set; with
/// `Reset` (Apply mode, not suspended) what it set is reset and its slots dropped first.
/// A replication slot it created that remains is told in a Warning Event (it retains WAL).
///
/// Deletion never hangs: when the Secret or the database cannot be reached the finalizer
/// is still removed, and a Warning Event says what was left and how to release it with
/// `dbpolicy release`. Safe when Apply never ran (no ledger: nothing to release). Child
/// objects (CronJobs, the read-endpoint Secret) carry owner references and are collected
/// by Kubernetes' garbage collector.
pub(super) async fn cleanup(policy: Arc<DatabasePolicy>, ctx: &Context) -> Result<Action> {
    // The policy is going: its series and its drift listener go now, whatever the
    // release below does.
    ctx.ddl_listeners
        .unsubscribe(&kube::runtime::reflector::ObjectRef::from_obj(
            policy.as_ref(),
        ));
    ctx.metrics
        .policy
        .forget(&policy.namespace().unwrap_or_default(), &policy.name_any());
    let id = PolicyId(key(&policy));
    let spec = &policy.spec;
    let wants_reset = spec.effective_deletion_policy() == DeletionPolicy::Reset;
    let reset = wants_reset && spec.effective_mode() == Mode::Apply && !spec.is_suspended();
    let result = async {
        let ns = policy
            .namespace()
            .ok_or(Error::MissingObjectKey("namespace"))?;
        let url = read_connection_uri(ctx, &ns, &spec.database.connection_secret_ref).await?;
        let mut conn = crate::pg::connect_one(&url).await?;
        let claims = ClaimsTarget::for_policy_url(&url);
        drop(url);
        let released = release::release(&mut conn, spec, &id, reset, &claims).await;
        let _ = conn.close().await;
        released.map_err(Error::Release)
    }
    .await;
    let released = match result {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "could not release the policy's claims");
            ctx.publish(
                &policy,
                EventType::Warning,
                Reason::ReleaseFailed,
                "Cleanup",
                format!(
                    "deleted without releasing its claims: {e}. What it set stays in the database and is recorded as owned by {id} in dbpolicy.managed; release it with `dbpolicy release --policy-id {id} --database-url URL`{}",
                    if reset { " --reset" } else { "" },
                    id = id.0
                ),
                false,
            )
            .await;
            return Ok(Action::await_change());
        }
    };
    let mut note = match &released.reset {
        Some(outcome) => {
            let applied: usize = status::applied_by_area(outcome).values().sum();
            format!("deletionPolicy Reset: reset {applied} change(s); ")
        }
        None if wants_reset => format!(
            "deletionPolicy Reset not carried out (the policy is {}): what it set is left in place; ",
            if spec.is_suspended() { "suspended" } else { "in Plan mode" }
        ),
        None => "deletionPolicy Retain: what the policy set is left in place; ".to_string(),
    };
    note.push_str(&format!(
        "released {} claim(s) in dbpolicy.managed",
        released.claims.len()
    ));
    if !released.server_claims.is_empty() {
        note.push_str(&format!(
            " and {} server-wide claim(s) in {}",
            released.server_claims.len(),
            crate::engine::server_claims::CLAIMS_TABLE
        ));
    }
    ctx.publish(
        &policy,
        EventType::Normal,
        Reason::Released,
        "Cleanup",
        note,
        false,
    )
    .await;
    if let Some(outcome) = &released.reset {
        if let Err(e) = failure_of(outcome) {
            ctx.publish(
                &policy,
                EventType::Warning,
                Reason::ResetIncomplete,
                "Cleanup",
                format!("deletionPolicy Reset: {e}; what was not reset is left in place"),
                false,
            )
            .await;
        }
    }
    if !released.remaining_slots.is_empty() {
        ctx.publish(
            &policy,
            EventType::Warning,
            Reason::ReplicationSlotRetained,
            "Cleanup",
            format!(
                "replication slot(s) {} created by this policy remain and retain WAL until dropped; when no replica uses them: {}",
                released.remaining_slots.join(", "),
                released
                    .remaining_slots
                    .iter()
                    .map(|s| release::drop_slot_sql(s))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
            false,
        )
        .await;
    }
    Ok(Action::await_change())
}
