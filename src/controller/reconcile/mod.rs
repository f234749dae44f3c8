//! The reconciler: `finalizer()` as the single top-level step, and Apply as a list of
//! named steps (one module each), in the spirit of stackable's dereference → validate →
//! build → apply → update_status:
//!
//! 1. [`suspend`]: a suspended policy pauses its children and says so; nothing else runs.
//! 2. [`sync_children`]: the CronJobs, the backups' state, point-in-time recovery's
//!    children. First, because they do not depend on the database being reachable.
//! 3. [`dereference`]: the connection Secrets (the primary's URI, each replica's).
//! 4. [`run_engine`]: one engine run (lock → observe → plan → apply) on a lent connection.
//! 5. [`publish_replicas`]: replica health into status, the read-endpoint Secret.
//! 6. [`update_status`]: conditions, metrics, status by server-side apply when it changed.
//! 7. [`announce`]: the Events of what the run did (drift, applied, refused, replicas).
//! 8. [`verdict`]: requeue after the drift-check interval, or the failure to retry.
//!
//! A failure of steps 2 or 5 is written into status first and returned at the end; a
//! failure of steps 3 or 4 is written into status at once (the database was not observed)
//! and returned. Cleanup (deletion) is [`cleanup`].

mod announce;
mod cleanup;
mod dereference;
mod publish_replicas;
mod run_engine;
mod suspend;
mod sync_children;
mod update_status;
mod verdict;

#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{finalizer, Event as Finalizer};
use kube::{Api, Resource, ResourceExt};
use tracing::{instrument, warn};

use super::context::{key, Context, FINALIZER};
use super::error::{Error, Result};
use super::status::Input;
use crate::api::{
    DatabasePolicy, DEFAULT_DRIFT_CHECK_INTERVAL, MAX_DRIFT_CHECK_INTERVAL,
    MIN_DRIFT_CHECK_INTERVAL,
};
use crate::duration::{parse_bounded, parse_duration};

use announce::announce;
use cleanup::cleanup;
use dereference::dereference;
use publish_replicas::publish_replicas;
use run_engine::run_engine;
use suspend::suspend;
use sync_children::sync_children;
use update_status::{update_status, update_status_unobserved};
use verdict::verdict;

/// Entry point for the `Controller`: the finalizer decides between Apply and Cleanup.
/// Failures are counted and published here, once; `error_policy` only schedules the retry.
#[instrument(skip(policy, ctx), fields(policy = %key(&policy)))]
pub(crate) async fn reconcile(policy: Arc<DatabasePolicy>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_started();
    let result = reconcile_inner(policy.clone(), &ctx).await;
    match &result {
        Ok(_) => ctx.reset_backoff(&key(&policy)),
        Err(e) => {
            warn!(error = %e, reason = %e.reason(), "reconcile failed");
            ctx.report_failure(&policy, e).await;
        }
    }
    result
}

async fn reconcile_inner(policy: Arc<DatabasePolicy>, ctx: &Arc<Context>) -> Result<Action> {
    let ns = policy
        .namespace()
        .ok_or(Error::MissingObjectKey("namespace"))?;
    let api: Api<DatabasePolicy> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, FINALIZER, policy, |event| async {
        match event {
            Finalizer::Apply(p) => apply(p, &api, ctx).await,
            Finalizer::Cleanup(p) => cleanup(p, ctx).await,
        }
    })
    .await
    .map_err(Error::from_finalizer)
}

/// Retry a failed policy with a per-policy exponential backoff; other policies go on.
pub(crate) fn error_policy(
    policy: Arc<DatabasePolicy>,
    _error: &Error,
    ctx: Arc<Context>,
) -> Action {
    Action::requeue(ctx.next_backoff(&key(&policy)))
}

/// `spec.driftCheckInterval`, or the default when it does not parse or lies outside
/// 10s..24h (the CRD's CEL rule rejects such values, so this only guards objects written
/// before the rule or on API servers without CEL; the engine reports them as InvalidSpec).
pub(crate) fn drift_interval(policy: &DatabasePolicy) -> Duration {
    parse_bounded(
        policy.spec.drift_check_interval(),
        MIN_DRIFT_CHECK_INTERVAL,
        MAX_DRIFT_CHECK_INTERVAL,
    )
    .unwrap_or_else(|e| {
        warn!(policy = %key(policy), "spec.driftCheckInterval: {e}; using {DEFAULT_DRIFT_CHECK_INTERVAL}");
        parse_duration(DEFAULT_DRIFT_CHECK_INTERVAL).expect("default interval parses")
    })
}

/// The Apply arm: the steps, in order. Each step's module says what it owns.
async fn apply(
    policy: Arc<DatabasePolicy>,
    api: &Api<DatabasePolicy>,
    ctx: &Context,
) -> Result<Action> {
    let input = input(&policy);
    if policy.spec.is_suspended() {
        return suspend(ctx, api, &policy, &input).await;
    }
    let mut children = sync_children(ctx, &policy, &input).await;
    let targets = match dereference(ctx, &policy).await {
        Ok(t) => t,
        Err(e) => return update_status_unobserved(ctx, api, &policy, &input, children, e).await,
    };
    let outcome = match run_engine(ctx, &policy, &targets).await {
        Ok(o) => o,
        Err(e) => return update_status_unobserved(ctx, api, &policy, &input, children, e).await,
    };
    // Drift in seconds: listen on this database while its event trigger is installed.
    ctx.ddl_listeners
        .follow(&policy, &targets.url, outcome.drift_trigger.as_ref());
    let replica_events = publish_replicas(ctx, &policy, &targets, &outcome, &mut children).await;
    children.pitr.observe(&policy, &targets.url).await;
    // The connection URIs go here: nothing after this talks to the database.
    drop(targets);
    let written = update_status(ctx, api, &policy, &input, &outcome, &mut children).await?;
    announce(ctx, &policy, &outcome, &written, replica_events).await;
    verdict(&outcome, children.error, input.drift_interval)
}

/// What every status builder needs besides the finding: the spec, the previous status,
/// the clock read once for this reconcile.
fn input(policy: &DatabasePolicy) -> Input<'_> {
    Input {
        spec: &policy.spec,
        generation: policy.meta().generation,
        previous: policy.status.as_ref(),
        now: Time(k8s_openapi::jiff::Timestamp::now()),
        drift_interval: drift_interval(policy),
    }
}
