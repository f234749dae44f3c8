//! Step 6, the status: built by the pure builders of `status.rs` from what the steps
//! found, the policy's metrics recorded from it, and written by server-side apply when it
//! differs from the status the policy has.

use std::collections::BTreeMap;

use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};

use super::sync_children::Gathered;
use crate::api::{DatabasePolicy, DatabasePolicyStatus};
use crate::controller::context::{Context, FIELD_MANAGER};
use crate::controller::error::{Error, Result};
use crate::controller::status::{self, Input};
use crate::controller::{ddl_listener, pitr};
use crate::engine::{self, Area, Outcome};

/// What the status step found that the Events step tells.
pub(super) struct Written {
    /// Areas in which the database had drifted from a converged policy.
    pub drifted: Vec<Area>,
    /// Changes applied by this run, per area.
    pub applied: BTreeMap<Area, usize>,
}

/// The status after an engine run: the engine's outcome with what the other steps found.
pub(super) async fn update_status(
    ctx: &Context,
    api: &Api<DatabasePolicy>,
    policy: &DatabasePolicy,
    input: &Input<'_>,
    outcome: &Outcome,
    gathered: &mut Gathered,
) -> Result<Written> {
    let mode = policy.spec.effective_mode();
    let found = &mut gathered.found;
    let pitr_ready = gathered.pitr.report(policy, input, found);
    let mut new_status = status::from_outcome_with(input, outcome, found);
    pitr::add_condition(input, &mut new_status, pitr_ready.as_ref());
    ddl_listener::add_condition(input, &mut new_status, outcome.drift_trigger.as_ref());
    let drifted = status::drifted_areas(input, outcome, mode);
    let (ns, name) = (policy.namespace().unwrap_or_default(), policy.name_any());
    for area in &drifted {
        ctx.metrics.policy.drifted(&ns, &name, *area);
    }
    let pending = status::pending(outcome, mode, found);
    record_metrics(ctx, policy, &new_status, Some((outcome, &pending)));
    let applied = status::applied_by_area(outcome);
    for (area, n) in &applied {
        ctx.metrics.applied(*area, *n);
    }
    patch_status(api, policy, &new_status).await?;
    Ok(Written { drifted, applied })
}

/// The status when the database could not be observed (step 3 or 4 failed with `e`):
/// Ready says why, the engine's areas are Unknown, what the Kubernetes side found stays.
/// Returns `e` once status is written.
pub(super) async fn update_status_unobserved(
    ctx: &Context,
    api: &Api<DatabasePolicy>,
    policy: &DatabasePolicy,
    input: &Input<'_>,
    mut gathered: Gathered,
    e: Error,
) -> Result<Action> {
    let pitr_ready = gathered.pitr.report(policy, input, &mut gathered.found);
    let mut new_status =
        status::from_error_with(input, e.reason(), &e.to_string(), &gathered.found);
    pitr::add_condition(input, &mut new_status, pitr_ready.as_ref());
    ddl_listener::keep_condition(input, &mut new_status);
    record_metrics(ctx, policy, &new_status, None);
    patch_status(api, policy, &new_status).await?;
    Err(e)
}

/// The policy's metrics from the status about to be written; `found` is what the engine
/// run found (None when the database was not observed: those series stay as they were).
pub(super) fn record_metrics(
    ctx: &Context,
    policy: &DatabasePolicy,
    status: &DatabasePolicyStatus,
    found: Option<(&Outcome, &[engine::Change])>,
) {
    let snapshot = crate::controller::policy_metrics::snapshot(
        &policy.spec,
        status,
        found.map(|(_, pending)| pending),
        found.and_then(|(o, _)| o.facts.replicas.as_deref()),
        found.and_then(|(o, _)| o.facts.slot_retained_bytes.as_ref()),
        k8s_openapi::jiff::Timestamp::now(),
    );
    ctx.metrics.policy.record(
        &policy.namespace().unwrap_or_default(),
        &policy.name_any(),
        &snapshot,
    );
}

/// Server-side apply of the whole status under the operator's field manager, on the
/// `/status` subresource: the operator never writes `spec`. Nothing is sent when the
/// status is the one the policy already has (the steady state: the builders keep
/// `lastTransitionTime` and the replicas' figures unless something changed), so a
/// no-op drift check costs no API request.
pub(super) async fn patch_status(
    api: &Api<DatabasePolicy>,
    policy: &DatabasePolicy,
    status: &DatabasePolicyStatus,
) -> Result<()> {
    if status::unchanged(policy.status.as_ref(), status) {
        return Ok(());
    }
    let patch = serde_json::json!({
        "apiVersion": DatabasePolicy::api_version(&()),
        "kind": DatabasePolicy::kind(&()),
        "status": status,
    });
    api.patch_status(
        &policy.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(Error::PatchStatus)?;
    Ok(())
}
