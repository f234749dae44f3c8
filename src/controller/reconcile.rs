//! The reconciler: `finalizer()` as the single top-level step; Apply reads the Secret (from the watch cache), runs the engine and writes status by server-side apply when it changed; Cleanup releases the policy.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::batch::v1::CronJob;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{finalizer, Event as Finalizer};
use kube::{Api, Resource, ResourceExt};
use sqlx::Connection;
use tracing::{info, instrument, warn};

use super::context::{key, Context, FIELD_MANAGER, FINALIZER};
use super::error::{Error, Result};
use super::status::{self, AreaState, Children, Input, Status};
use super::{backups, children, events, pitr, replicas};
use crate::api::{
    DatabasePolicy, DatabasePolicyStatus, DeletionPolicy, Mode, SecretKeyRef,
    DEFAULT_DRIFT_CHECK_INTERVAL, MAX_DRIFT_CHECK_INTERVAL, MIN_DRIFT_CHECK_INTERVAL,
};
use crate::duration::{parse_bounded, parse_duration};
use crate::engine::replica_health::ReplicaTargets;
use crate::engine::server_claims::ClaimsTarget;
use crate::engine::{self, release, Area, Outcome, PolicyId, RunOptions};

/// Entry point for the `Controller`: the finalizer decides between Apply and Cleanup.
/// Failures are counted and published here, once; `error_policy` only schedules the retry.
#[instrument(skip(policy, ctx), fields(policy = %key(&policy)))]
pub async fn reconcile(policy: Arc<DatabasePolicy>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_started();
    let result = reconcile_inner(policy.clone(), &ctx).await;
    match &result {
        Ok(_) => ctx.reset_backoff(&key(&policy)),
        Err(e) => {
            warn!(error = %e, reason = e.reason(), "reconcile failed");
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
pub fn error_policy(policy: Arc<DatabasePolicy>, _error: &Error, ctx: Arc<Context>) -> Action {
    Action::requeue(ctx.next_backoff(&key(&policy)))
}

/// `spec.driftCheckInterval`, or the default when it does not parse or lies outside
/// 10s..24h (the CRD's CEL rule rejects such values, so this only guards objects written
/// before the rule or on API servers without CEL; the engine reports them as InvalidSpec).
pub fn drift_interval(policy: &DatabasePolicy) -> Duration {
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

async fn apply(
    policy: Arc<DatabasePolicy>,
    api: &Api<DatabasePolicy>,
    ctx: &Context,
) -> Result<Action> {
    let name = policy.name_any();
    let ns = policy
        .namespace()
        .ok_or(Error::MissingObjectKey("namespace"))?;
    let spec = &policy.spec;
    let interval = drift_interval(&policy);
    let input = Input {
        spec,
        generation: policy.meta().generation,
        previous: policy.status.as_ref(),
        now: Time(k8s_openapi::jiff::Timestamp::now()),
        drift_interval: interval,
    };
    let mode = spec.effective_mode();

    if spec.is_suspended() {
        // Suspended: no Secret read, no database access, no requeue until the spec changes.
        // The CronJobs are paused too (the builders set `suspend`); Plan mode changes nothing.
        let paused = if mode == Mode::Apply && ctx.cronjobs_supported {
            children::sync_cronjobs(
                &ctx.client,
                ctx.cronjob_cache.as_ref(),
                &policy,
                &ctx.job_image,
                mode,
            )
            .await
            .err()
        } else {
            None
        };
        // The WAL receiver is scaled to zero (its slot keeps the WAL meanwhile).
        let paused = match (mode, pitr::enabled_in(&policy)) {
            (Mode::Apply, true) => {
                paused.or(
                    pitr::sync_receiver(&ctx.client, &policy, &ctx.job_image, mode, false)
                        .await
                        .err(),
                )
            }
            _ => paused,
        };
        let new_status = status::suspended(&input);
        record_metrics(ctx, &policy, &new_status, None);
        patch_status(api, &policy, &new_status).await?;
        return match paused {
            Some(e) => Err(e),
            None => Ok(Action::await_change()),
        };
    }

    // Kubernetes objects first: they do not depend on the database being reachable.
    let (mut found, mut child_error, base_cronjob) =
        cronjobs_and_backups(ctx, &policy, &input).await;
    // Point-in-time recovery: the receiver Deployment, the base backup Jobs.
    let mut pitr = pitr::gather(
        &ctx.client,
        &policy,
        &ctx.job_image,
        &input,
        base_cronjob.as_ref(),
        &mut found,
    )
    .await;
    if let Some(e) = pitr.take_error() {
        child_error.get_or_insert(e);
    }

    let outcome = async {
        let url = read_connection_uri(ctx, &ns, &spec.database.connection_secret_ref).await?;
        let (replica_urls, notes) = read_replica_urls(ctx, &ns, &policy).await;
        let options = RunOptions {
            replicas: ReplicaTargets {
                urls: replica_urls.clone(),
                ..Default::default()
            },
            allowed_settings: ctx.allowed_settings.clone(),
            claims: ClaimsTarget::for_policy_url(&url),
            // One kept connection per database (controller/connections.rs): the operator
            // runs many policies at once, and a second connection per run would double
            // what it holds on every server.
            observe_url: None,
        };
        let outcome =
            run_engine(ctx, url.clone(), &policy, PolicyId(key(&policy)), options).await?;
        Ok::<_, Error>((outcome, url, replica_urls, notes))
    }
    .await;
    let (outcome, url, replica_urls, notes) = match outcome {
        Ok(o) => o,
        Err(e) => {
            let pitr_ready = pitr.report(&policy, &input, &mut found);
            let mut new_status =
                status::from_error_with(&input, e.reason(), &e.to_string(), &found);
            pitr::add_condition(&input, &mut new_status, pitr_ready.as_ref());
            record_metrics(ctx, &policy, &new_status, None);
            patch_status(api, &policy, &new_status).await?;
            return Err(e);
        }
    };

    // Replicas: health into status, the read endpoint published (Apply mode only).
    let mut replica_events = Vec::new();
    if let (Some(rspec), Some(current)) = (&spec.replicas, &outcome.facts.replicas) {
        let previous = policy.status.as_ref().and_then(|s| s.replicas.as_deref());
        replica_events = replicas::replica_events(previous.unwrap_or(&[]), current);
        found.areas.extend(replicas::replicas_area(current, &notes));
        found.replicas = Some(replicas::stable_statuses(rspec, previous, current.clone()));
        if mode == Mode::Apply {
            let secret_name = children::read_endpoint_secret_name(&policy)
                .unwrap_or_else(|| format!("{name}-read"));
            let endpoint = super::read_endpoint::read_endpoint(rspec, current, &url, &replica_urls);
            let secret =
                children::read_endpoint_secret(&policy, &secret_name, endpoint.secret_data());
            if let Err(e) = children::publish_read_endpoint(
                &ctx.client,
                ctx.secret_cache.as_ref(),
                &policy,
                &secret,
            )
            .await
            {
                found.areas.push(AreaState {
                    area: Area::Replicas,
                    status: Status::False,
                    reason: e.reason().to_string(),
                    message: e.to_string(),
                });
                child_error.get_or_insert(e);
            }
        }
    }
    pitr.observe(&policy, &url).await;
    drop(url);

    let pitr_ready = pitr.report(&policy, &input, &mut found);
    let mut new_status = status::from_outcome_with(&input, &outcome, &found);
    pitr::add_condition(&input, &mut new_status, pitr_ready.as_ref());
    let drifted_areas = status::drifted_areas(&input, &outcome, mode);
    for area in &drifted_areas {
        ctx.metrics.policy.drifted(&ns, &name, *area);
    }
    let pending = status::pending(&outcome, mode, &found);
    record_metrics(ctx, &policy, &new_status, Some((&outcome, &pending)));
    let applied = status::applied_by_area(&outcome);
    for (area, n) in &applied {
        ctx.metrics.applied(*area, *n);
    }
    patch_status(api, &policy, &new_status).await?;

    if !applied.is_empty() {
        let total: usize = applied.values().sum();
        info!(changes = total, "applied");
    }
    // Drift gets one Event naming what drifted and whether it was repaired (a Warning
    // when row-level security had been weakened); other change sets an `Applied` one.
    let note = if !drifted_areas.is_empty() {
        let drifted: Vec<&engine::Change> = outcome
            .plan
            .changes()
            .filter(|c| drifted_areas.contains(&c.area))
            .collect();
        let repaired = mode == Mode::Apply
            && outcome
                .report
                .as_ref()
                .is_some_and(|r| r.succeeded() && r.refused.is_empty());
        Some((events::drift(&drifted, repaired), repaired))
    } else if !applied.is_empty() {
        let changes: Vec<&engine::Change> = outcome
            .report
            .iter()
            .flat_map(|r| r.applied.iter())
            .collect();
        Some((events::applied(&changes), true))
    } else {
        None
    };
    if let Some((n, distinct)) = note {
        // A repair is a change set of its own; drift left in place folds into a series.
        ctx.publish(&policy, n.type_, n.reason, "Apply", n.note, distinct)
            .await;
    }
    if let Some(report) = &outcome.report {
        if !report.refused.is_empty() {
            ctx.publish(
                &policy,
                EventType::Warning,
                "DestructiveChangesRefused",
                "Apply",
                format!(
                    "refused {} destructive change(s): {}; set spec.safety.allowDestructive: true to allow them",
                    report.refused.len(),
                    report
                        .refused
                        .iter()
                        .map(|c| format!("{} {}", c.area, c.target))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                false,
            )
            .await;
        }
    }
    for (type_, reason, note) in replica_events {
        ctx.publish(&policy, type_, reason, "CheckReplicas", note, true)
            .await;
    }
    failure_of(&outcome)?;
    if let Some(e) = child_error {
        return Err(e);
    }
    Ok(Action::requeue(interval))
}

/// The policy's metrics from the status about to be written; `found` is what the engine
/// run found (None when the database was not observed: those series stay as they were).
fn record_metrics(
    ctx: &Context,
    policy: &DatabasePolicy,
    status: &DatabasePolicyStatus,
    found: Option<(&Outcome, &[engine::Change])>,
) {
    let snapshot = super::policy_metrics::snapshot(
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

/// The CronJobs (applied, or pending in Plan mode) and the backups' status and condition.
/// A failure is said in the areas it concerns and returned, to be retried once status
/// is written. Also the base backup CronJob of point-in-time recovery as applied.
async fn cronjobs_and_backups(
    ctx: &Context,
    policy: &DatabasePolicy,
    input: &Input<'_>,
) -> (Children, Option<Error>, Option<CronJob>) {
    let mut found = Children::default();
    let spec = &policy.spec;
    let mode = spec.effective_mode();
    let desired = children::desired_cronjobs(policy, &ctx.job_image);
    let needing: Vec<Area> = {
        let mut a: Vec<Area> = desired.iter().map(children::area_of).collect();
        a.dedup();
        a
    };
    let state = |area, status, reason: &str, message: String| AreaState {
        area,
        status,
        reason: reason.to_string(),
        message,
    };
    if !ctx.cronjobs_supported {
        for area in needing {
            let what = match area {
                Area::Backups => "spec.backups runs as a batch/v1 CronJob: no backup is taken",
                _ => "the refresh schedules run as batch/v1 CronJobs: the views are reconciled but not refreshed on schedule",
            };
            found.areas.push(state(
                area,
                Status::Unknown,
                "CronJobsUnsupported",
                format!("{what}; this API server does not serve batch/v1 CronJob (Kubernetes 1.21 or later does)"),
            ));
        }
        return (found, None, None);
    }
    let sync = match children::sync_cronjobs(
        &ctx.client,
        ctx.cronjob_cache.as_ref(),
        policy,
        &ctx.job_image,
        mode,
    )
    .await
    {
        Ok(s) => s,
        Err(e) => {
            for area in needing {
                found
                    .areas
                    .push(state(area, Status::False, e.reason(), e.to_string()));
            }
            return (found, Some(e), None);
        }
    };
    let mut error = None;
    if let Some(b) = &spec.backups {
        match children::backup_jobs(&ctx.client, policy).await {
            Ok((jobs, pods)) => {
                let runs = backups::runs(&jobs, &pods);
                let previous = input.previous.and_then(|s| s.backups.as_ref());
                let status = backups::backup_status(previous, sync.backup.as_ref(), &runs);
                let created = sync
                    .backup
                    .as_ref()
                    .and_then(|c| c.metadata.creation_timestamp.as_ref())
                    .map(|t| t.0);
                let r = backups::readiness(
                    &b.schedule,
                    spec.is_suspended() || b.suspend.unwrap_or(false),
                    &status,
                    backups::last_failure_message(&runs).as_deref(),
                    created,
                    input.now.0,
                );
                found
                    .areas
                    .push(state(Area::Backups, r.status, r.reason, r.message));
                found.backups = Some(status);
            }
            Err(e) => {
                found.areas.push(state(
                    Area::Backups,
                    Status::Unknown,
                    e.reason(),
                    e.to_string(),
                ));
                error = Some(e);
            }
        }
    }
    let mut pending_areas: Vec<Area> = sync.pending.iter().map(|c| c.area).collect();
    pending_areas.sort();
    pending_areas.dedup();
    for area in pending_areas {
        let n = sync.pending.iter().filter(|c| c.area == area).count();
        found.areas.push(state(
            area,
            Status::False,
            "PlanPending",
            format!("{n} CronJob change(s) pending (spec.mode is Plan; see status.pendingPlan)"),
        ));
    }
    found.pending = sync.pending;
    (found, error, sync.base_backup)
}

/// Each replica's URL from its `connectionSecretRef` (same namespace). A replica whose
/// Secret cannot be read is left out (reported as not checked, with the note saying why):
/// it never fails the whole reconcile.
async fn read_replica_urls(
    ctx: &Context,
    ns: &str,
    policy: &DatabasePolicy,
) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let mut urls = BTreeMap::new();
    let mut notes = BTreeMap::new();
    for r in policy.spec.replicas.iter().flat_map(|r| &r.replicas) {
        match read_connection_uri(ctx, ns, &r.connection_secret_ref).await {
            Ok(url) => {
                urls.insert(r.name.clone(), url);
            }
            Err(e) => {
                let s = &r.connection_secret_ref;
                let why = match e {
                    Error::SecretNotFound { .. } => format!("Secret {ns}/{} not found", s.name),
                    Error::SecretKeyNotFound { key, .. } => {
                        format!("Secret {ns}/{} has no key {key:?}", s.name)
                    }
                    other => other.to_string(),
                };
                notes.insert(r.name.clone(), why);
            }
        }
    }
    (urls, notes)
}

/// A plan with errors or a failed statement is a failure: retried with backoff, told as
/// a Warning. Status already says it, area by area.
fn failure_of(outcome: &Outcome) -> Result<()> {
    let errors: Vec<_> = outcome.plan.errors().collect();
    if let Some(first) = errors.first() {
        return Err(Error::PlanErrors {
            count: errors.len(),
            reason: first.reason.to_string(),
            first: first.to_string(),
        });
    }
    if let Some(f) = outcome.report.as_ref().and_then(|r| r.failure.as_ref()) {
        return Err(Error::ApplyFailed {
            reason: f.reason.to_string(),
            message: format!("{}: {}: {}", f.area, f.target, f.message),
        });
    }
    Ok(())
}

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
async fn cleanup(policy: Arc<DatabasePolicy>, ctx: &Context) -> Result<Action> {
    // The policy is going: its series go now, whatever the release below does.
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
                "ReleaseFailed",
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
        "Released",
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
                "ResetIncomplete",
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
            "ReplicationSlotRetained",
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

/// The libpq URI from `spec.database.connectionSecretRef`. Surrounding whitespace (a
/// trailing newline from `kubectl create secret --from-file`) is dropped.
///
/// With the operator's watch cache the Secret is read from it (no API request); the cache
/// is complete before the first read (see `wait_until_ready`), and a Secret created or
/// changed later triggers the policies that reference it.
async fn read_connection_uri(ctx: &Context, ns: &str, r: &SecretKeyRef) -> Result<String> {
    let key = r.effective_key().to_string();
    let secret = match &ctx.secret_cache {
        Some(store) => {
            // Resolves at once after the initial list; the controller keeps polling the
            // watch meanwhile, so this never waits on itself.
            let _ = store.wait_until_ready().await;
            super::cache::secret(store, ns, &r.name)
        }
        None => Api::<Secret>::namespaced(ctx.client.clone(), ns)
            .get_opt(&r.name)
            .await
            .map_err(|source| Error::SecretRead {
                namespace: ns.into(),
                name: r.name.clone(),
                source,
            })?
            .map(std::sync::Arc::new),
    };
    let secret = secret.ok_or_else(|| Error::SecretNotFound {
        namespace: ns.into(),
        name: r.name.clone(),
        key: key.clone(),
    })?;
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(&key))
        .ok_or_else(|| Error::SecretKeyNotFound {
            namespace: ns.into(),
            name: r.name.clone(),
            key: key.clone(),
        })?;
    let text = std::str::from_utf8(&bytes.0).map_err(|_| Error::SecretNotUtf8 {
        namespace: ns.into(),
        name: r.name.clone(),
        key,
    })?;
    Ok(text.trim().to_string())
}

/// One connection per run, lent by `ctx.connections`: the engine's session settings and
/// advisory lock belong to it while the run lasts, and it is kept for the next run on the
/// same URL only after a run that succeeded and a reset. At most `--concurrency` runs are
/// in flight at once.
async fn run_engine(
    ctx: &Context,
    url: String,
    policy: &DatabasePolicy,
    id: PolicyId,
    options: RunOptions,
) -> Result<Outcome> {
    let spec = &policy.spec;
    let mut lease = ctx
        .connections
        .checkout(&url, engine::lock_wait(spec))
        .await?;
    let result = engine::run_with(lease.conn(), spec, spec.effective_mode(), &id, &options).await;
    let succeeded =
        matches!(&result, Ok(o) if o.report.as_ref().is_none_or(|r| r.failure.is_none()));
    ctx.connections.checkin(lease, succeeded).await;
    Ok(result?)
}

/// Server-side apply of the whole status under the operator's field manager, on the
/// `/status` subresource: the operator never writes `spec`. Nothing is sent when the
/// status is the one the policy already has (the steady state: the builders keep
/// `lastTransitionTime` and the replicas' figures unless something changed), so a
/// no-op drift check costs no API request.
async fn patch_status(
    api: &Api<DatabasePolicy>,
    policy: &DatabasePolicy,
    status: &DatabasePolicyStatus,
) -> Result<()> {
    if status::unchanged(policy.status.as_ref(), status) {
        return Ok(());
    }
    let name = policy.name_any();
    let name = name.as_str();
    let patch = serde_json::json!({
        "apiVersion": DatabasePolicy::api_version(&()),
        "kind": DatabasePolicy::kind(&()),
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(Error::PatchStatus)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::context::DEFAULT_JOB_IMAGE;
    use crate::controller::fixtures::{
        condition, named_secret, test_context_with, test_policy, test_secret, Expect, Sent, NS,
    };
    use crate::jobs::cronjob::{backup_cronjob, refresh_cronjobs};
    use k8s_openapi::api::batch::v1::{CronJob, Job};
    use k8s_openapi::api::core::v1::Pod;
    use serde_json::{json, Value};

    const SPEC: &str = "database: {connectionSecretRef: {name: x}}\n";

    /// Runs one reconcile against the mocked API server playing `scenario`.
    async fn reconcile_with(
        policy: DatabasePolicy,
        scenario: Vec<Expect>,
    ) -> (Result<Action>, Vec<Sent>) {
        reconcile_on(true, policy, scenario).await
    }

    /// [`reconcile_with`], on an API server that serves batch/v1 CronJobs or not.
    async fn reconcile_on(
        cronjobs: bool,
        policy: DatabasePolicy,
        scenario: Vec<Expect>,
    ) -> (Result<Action>, Vec<Sent>) {
        let (result, sent, _) = reconcile_metered(cronjobs, policy, scenario).await;
        (result, sent)
    }

    /// [`reconcile_on`], and the `/metrics` text afterwards.
    async fn reconcile_metered(
        cronjobs: bool,
        policy: DatabasePolicy,
        scenario: Vec<Expect>,
    ) -> (Result<Action>, Vec<Sent>, String) {
        let (ctx, server) = test_context_with(cronjobs);
        let verifier = server.run(policy.clone(), scenario);
        let result = reconcile(Arc::new(policy), ctx.clone()).await;
        let mut registry = prometheus_client::registry::Registry::with_prefix("dbpolicy");
        ctx.metrics.clone().register(&mut registry);
        let metrics = crate::controller::metrics::encode(&registry);
        drop(ctx);
        let sent = tokio::time::timeout(Duration::from_secs(30), verifier)
            .await
            .expect("the scenario did not finish")
            .expect("the scenario failed");
        (result, sent, metrics)
    }

    fn all_bodies(sent: &[Sent]) -> String {
        sent.iter().map(|s| s.body.to_string()).collect()
    }

    #[tokio::test]
    async fn adds_the_finalizer_first_and_nothing_else() {
        let (result, sent) =
            reconcile_with(test_policy(SPEC, false), vec![Expect::AddFinalizer]).await;
        assert_eq!(result.unwrap(), Action::await_change());
        assert_eq!(
            sent[0].body,
            json!([
                {"op": "test", "path": "/metadata/finalizers", "value": null},
                {"op": "add", "path": "/metadata/finalizers", "value": ["dbpolicy.dev/cleanup"]},
            ])
        );
    }

    #[tokio::test]
    async fn missing_secret_is_secret_not_found_without_database_access() {
        let spec = "database: {connectionSecretRef: {name: x}}\nfeatureFlags: {flags: []}\n";
        let (result, sent) = reconcile_with(
            test_policy(spec, true),
            vec![
                Expect::ListCronJobs(vec![]),
                Expect::GetSecret(None),
                Expect::PatchStatus,
                Expect::CreateEvent,
            ],
        )
        .await;
        let err = result.unwrap_err();
        assert_eq!(err.reason(), "SecretNotFound");
        assert_eq!(err.metric_label(), "secret_not_found");
        assert_eq!(
            sent.iter()
                .map(|s| s.request.split(' ').next().unwrap())
                .collect::<Vec<_>>(),
            ["GET", "GET", "PATCH", "POST"]
        );
        let patch = &sent[2].body;
        assert_eq!(patch["apiVersion"], "dbpolicy.dev/v1alpha1");
        assert_eq!(patch["kind"], "DatabasePolicy");
        assert_eq!(patch["status"]["observedGeneration"], 1);
        let ready = condition(patch, "Ready");
        assert_eq!(ready["status"], "False");
        assert_eq!(ready["reason"], "SecretNotFound");
        assert!(ready["message"]
            .as_str()
            .unwrap()
            .contains("default/test-db"));
        assert_eq!(condition(patch, "FeatureFlagsReady")["status"], "Unknown");
        assert_eq!(condition(patch, "Drifted")["status"], "Unknown");
        let event = &sent[3].body;
        assert_eq!(event["type"], "Warning");
        assert_eq!(event["reason"], "SecretNotFound");
        assert_eq!(event["action"], "Reconcile");
        assert_eq!(event["regarding"]["kind"], "DatabasePolicy");
        assert_eq!(event["regarding"]["name"], "test");
        assert_eq!(event["reportingController"], "dbpolicy.dev/controller");
    }

    #[tokio::test]
    async fn suspended_policy_says_so_and_reads_nothing() {
        let spec = "database: {connectionSecretRef: {name: x}}\nsuspend: true\nmode: Plan\n";
        let (result, sent) =
            reconcile_with(test_policy(spec, true), vec![Expect::PatchStatus]).await;
        assert_eq!(result.unwrap(), Action::await_change());
        let patch = &sent[0].body;
        let ready = condition(patch, "Ready");
        assert_eq!(ready["status"], "False");
        assert_eq!(ready["reason"], "Suspended");
        assert_eq!(patch["status"]["mode"], "Plan");
        assert_eq!(patch["status"]["observedGeneration"], 1);
    }

    #[tokio::test]
    async fn unreachable_database_is_connection_failed_and_no_password_leaks() {
        let (result, sent) = reconcile_with(
            test_policy(SPEC, true),
            vec![
                Expect::ListCronJobs(vec![]),
                Expect::GetSecret(Some(test_secret(
                    "postgres://app:hunter2@127.0.0.1:1/certquiz\n",
                ))),
                Expect::PatchStatus,
                Expect::CreateEvent,
            ],
        )
        .await;
        let err = result.unwrap_err();
        assert_eq!(err.reason(), "ConnectionFailed");
        assert_eq!(err.metric_label(), "connect");
        assert!(!err.to_string().contains("hunter2"));
        let ready = condition(&sent[2].body, "Ready");
        assert_eq!(ready["reason"], "ConnectionFailed");
        assert!(ready["message"]
            .as_str()
            .unwrap()
            .contains("127.0.0.1:1/certquiz"));
        assert_eq!(sent[3].body["type"], "Warning");
        assert_eq!(sent[3].body["reason"], "ConnectionFailed");
        let everything = all_bodies(&sent);
        assert!(!everything.contains("hunter2"), "{everything}");
    }

    #[tokio::test]
    async fn deletion_removes_the_finalizer_even_when_apply_never_ran() {
        let mut policy = test_policy(SPEC, true);
        policy.meta_mut().deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
        let (result, sent) = reconcile_with(
            policy,
            vec![
                Expect::GetSecret(None),
                Expect::CreateEvent,
                Expect::RemoveFinalizer,
            ],
        )
        .await;
        assert_eq!(result.unwrap(), Action::await_change());
        // The Secret is gone: deletion goes on, and the Warning says how to release.
        assert_eq!(sent[1].body["reason"], "ReleaseFailed");
        assert_eq!(sent[1].body["type"], "Warning");
        let note = sent[1].body["note"].as_str().unwrap();
        assert!(
            note.contains("dbpolicy release --policy-id default/test"),
            "{note}"
        );
        assert_eq!(
            sent[2].body,
            json!([
                {"op": "test", "path": "/metadata/finalizers/0", "value": "dbpolicy.dev/cleanup"},
                {"op": "remove", "path": "/metadata/finalizers/0"},
            ])
        );
    }

    async fn ledger_owners(url: &str) -> Vec<String> {
        let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
        let owners: Vec<String> =
            sqlx::query_scalar("SELECT DISTINCT policy FROM dbpolicy.managed ORDER BY 1")
                .fetch_all(&mut conn)
                .await
                .unwrap();
        let _ = conn.close().await;
        owners
    }

    #[tokio::test]
    async fn deletion_releases_the_claims_and_keeps_what_was_set() {
        let (url, name) = create_database().await;
        let policy = test_policy(FLAGS, true);
        let secret = || Expect::GetSecret(Some(test_secret(&url)));
        let (first, _) = reconcile_with(
            policy.clone(),
            vec![
                Expect::ListCronJobs(vec![]),
                secret(),
                Expect::PatchStatus,
                Expect::CreateEvent,
            ],
        )
        .await;
        first.unwrap();
        assert_eq!(ledger_owners(&url).await, ["default/test"]);
        let mut deleted = policy;
        deleted.meta_mut().deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
        let (result, sent) = reconcile_with(
            deleted,
            vec![secret(), Expect::CreateEvent, Expect::RemoveFinalizer],
        )
        .await;
        let owners = ledger_owners(&url).await;
        let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
        let flags: i64 = sqlx::query_scalar("SELECT count(*) FROM public.feature_flags")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        let _ = conn.close().await;
        drop_database(&name).await;
        assert_eq!(result.unwrap(), Action::await_change());
        assert!(owners.is_empty(), "claims left: {owners:?}");
        assert_eq!(flags, 2, "Retain (the default) keeps what the policy set");
        assert_eq!(sent[1].body["reason"], "Released");
        let note = sent[1].body["note"].as_str().unwrap();
        assert!(note.starts_with("deletionPolicy Retain:"), "{note}");
        assert!(note.contains("released "), "{note}");
    }

    /// A fresh database on the local server (`DBPOLICY_TEST_ADMIN_URL`, default
    /// postgres://postgres@127.0.0.1:5432/postgres), dropped by `drop_database`.
    async fn create_database() -> (String, String) {
        let admin = admin_url();
        let name = format!(
            "dbpolicy_ctrl_{}_{}",
            std::process::id(),
            k8s_openapi::jiff::Timestamp::now().as_nanosecond() % 1_000_000_000
        );
        let mut conn = sqlx::PgConnection::connect(&admin)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL at {admin} is needed for this test: {e}"));
        sqlx::raw_sql(&format!("CREATE DATABASE \"{name}\" TEMPLATE template0"))
            .execute(&mut conn)
            .await
            .unwrap();
        let _ = conn.close().await;
        let (base, _) = admin.rsplit_once('/').unwrap();
        (format!("{base}/{name}"), name)
    }

    fn admin_url() -> String {
        std::env::var("DBPOLICY_TEST_ADMIN_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
    }

    async fn drop_database(name: &str) {
        let mut conn = sqlx::PgConnection::connect(&admin_url()).await.unwrap();
        let _ = sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .execute(&mut conn)
            .await;
    }

    const FLAGS: &str = "database: {connectionSecretRef: {name: x}}
featureFlags:
  flags:
    - {name: new_quiz_engine, enabled: true, rolloutPercentage: 25}
    - {name: ai_explanations, enabled: false}
";

    #[tokio::test]
    async fn applies_against_a_real_database_then_reports_ready_and_an_event() {
        let (url, name) = create_database().await;
        let (result, sent) = reconcile_with(
            test_policy(FLAGS, true),
            vec![
                Expect::ListCronJobs(vec![]),
                Expect::GetSecret(Some(test_secret(&url))),
                Expect::PatchStatus,
                Expect::CreateEvent,
            ],
        )
        .await;
        drop_database(&name).await;
        assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(300)));
        let patch = &sent[2].body;
        let ready = condition(patch, "Ready");
        assert_eq!(ready["status"], "True", "{patch:#}");
        assert_eq!(ready["reason"], "Reconciled");
        assert_eq!(ready["observedGeneration"], 1);
        assert_eq!(condition(patch, "FeatureFlagsReady")["status"], "True");
        assert_eq!(condition(patch, "Drifted")["status"], "False");
        assert_eq!(patch["status"]["pendingChanges"], 0);
        assert_eq!(patch["status"]["mode"], "Apply");
        assert!(patch["status"].get("pendingPlan").is_none());
        let event = &sent[3].body;
        assert_eq!(event["type"], "Normal");
        assert_eq!(event["reason"], "Applied");
        assert_eq!(event["action"], "Apply");
        let note = event["note"].as_str().unwrap();
        assert!(
            note.starts_with("applied 4 change(s) (featureFlags 4): ")
                && note.contains("featureFlags new_quiz_engine: ")
                && note.contains("featureFlags ai_explanations: "),
            "{note}"
        );
    }

    #[tokio::test]
    async fn plan_mode_reports_the_plan_and_changes_nothing() {
        let (url, name) = create_database().await;
        let spec = format!("{FLAGS}mode: Plan\n");
        let (result, sent) = reconcile_with(
            test_policy(&spec, true),
            vec![
                Expect::ListCronJobs(vec![]),
                Expect::GetSecret(Some(test_secret(&url))),
                Expect::PatchStatus,
            ],
        )
        .await;
        let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
        let tables: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_tables WHERE tablename = 'feature_flags' OR schemaname = 'dbpolicy'",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap();
        let _ = conn.close().await;
        drop_database(&name).await;
        assert_eq!(tables, 0, "Plan mode created something");
        assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(300)));
        let patch = &sent[2].body;
        let ready = condition(patch, "Ready");
        assert_eq!(
            (&ready["status"], &ready["reason"]),
            (&json!("False"), &json!("PlanPending"))
        );
        let pending = patch["status"]["pendingChanges"].as_u64().unwrap();
        assert!(pending > 0);
        let plan: &Value = &patch["status"]["pendingPlan"];
        assert_eq!(plan["total"].as_u64(), Some(pending));
        assert_eq!(plan["byArea"]["featureFlags"].as_u64(), Some(pending));
        assert_eq!(condition(patch, "Drifted")["reason"], "ChangesPending");
    }

    fn with_status(mut policy: DatabasePolicy, patch: &Value) -> DatabasePolicy {
        policy.status = Some(serde_json::from_value(patch["status"].clone()).unwrap());
        policy
    }

    #[tokio::test]
    async fn drift_in_the_database_is_repaired_and_reported() {
        let (url, name) = create_database().await;
        let policy = test_policy(FLAGS, true);
        let secret = || Expect::GetSecret(Some(test_secret(&url)));
        let (first, sent) = reconcile_with(
            policy.clone(),
            vec![
                Expect::ListCronJobs(vec![]),
                secret(),
                Expect::PatchStatus,
                Expect::CreateEvent,
            ],
        )
        .await;
        first.unwrap();
        // The next drift check: a converged check writes only what changed (Drifted).
        let policy = with_status(policy, &sent[2].body);
        let (second, sent) = reconcile_with(
            policy.clone(),
            vec![Expect::ListCronJobs(vec![]), secret(), Expect::PatchStatus],
        )
        .await;
        second.unwrap();
        let before = policy.status.as_ref().unwrap();
        let ready = condition(&sent[2].body, "Ready");
        assert_eq!(
            serde_json::to_value(&before.conditions[0]).unwrap(),
            *ready,
            "Ready, with its lastTransitionTime, is unchanged"
        );
        let policy = with_status(policy, &sent[2].body);
        assert_eq!(condition(&sent[2].body, "Drifted")["reason"], "InSync");

        let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
        sqlx::query(
            "UPDATE public.feature_flags SET enabled = NOT enabled WHERE name = 'new_quiz_engine'",
        )
        .execute(&mut conn)
        .await
        .unwrap();
        let _ = conn.close().await;

        let (third, sent, metrics) = reconcile_metered(
            true,
            policy,
            vec![
                Expect::ListCronJobs(vec![]),
                secret(),
                Expect::PatchStatus,
                Expect::CreateEvent,
            ],
        )
        .await;
        drop_database(&name).await;
        third.unwrap();
        let labels = format!("namespace=\"{NS}\",policy=\"test\"");
        for needle in [
            format!("dbpolicy_drift_detected_total{{{labels},area=\"featureFlags\"}} 1\n"),
            format!("dbpolicy_policy_ready{{{labels}}} 1\n"),
        ] {
            assert!(
                metrics.contains(&needle),
                "{needle} missing from\n{metrics}"
            );
        }
        assert!(
            !metrics.contains("dbpolicy_policy_pending_changes{"),
            "{metrics}"
        );
        let drifted = condition(&sent[2].body, "Drifted");
        assert_eq!(drifted["status"], "True", "{:#}", sent[2].body);
        assert_eq!(drifted["reason"], "DriftRepaired");
        assert!(drifted["message"]
            .as_str()
            .unwrap()
            .contains("featureFlags"));
        assert_eq!(condition(&sent[2].body, "Ready")["status"], "True");
        let event = &sent[3].body;
        assert_eq!(
            (event["type"].as_str(), event["reason"].as_str()),
            (Some("Normal"), Some("DriftRepaired"))
        );
        let note = event["note"].as_str().unwrap();
        assert!(
            note.starts_with("the database differed from the policy (featureFlags 1), repaired: featureFlags new_quiz_engine: "),
            "{note}"
        );
    }

    const RLS: &str = "database: {connectionSecretRef: {name: x}}
rowLevelSecurity:
  tables:
    - table: answers
      enabled: true
      force: true
      policies:
        - {name: answers_owner, command: All, using: \"owner = current_user\"}
";

    /// Someone opens the table by hand: the repair is a Warning naming the policy and the
    /// table, not a routine Normal event.
    #[tokio::test]
    async fn weakened_row_level_security_is_repaired_with_a_warning_naming_it() {
        let (url, name) = create_database().await;
        let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
        sqlx::raw_sql("CREATE TABLE public.answers (id int, owner name)")
            .execute(&mut conn)
            .await
            .unwrap();
        let policy = test_policy(RLS, true);
        let secret = || Expect::GetSecret(Some(test_secret(&url)));
        let converge = |policy| {
            reconcile_with(
                policy,
                vec![
                    Expect::ListCronJobs(vec![]),
                    secret(),
                    Expect::PatchStatus,
                    Expect::CreateEvent,
                ],
            )
        };
        let (first, sent) = converge(policy.clone()).await;
        first.unwrap();
        assert_eq!(sent[3].body["reason"], "Applied", "{:#}", sent[3].body);
        let policy = with_status(policy, &sent[2].body);
        assert_eq!(condition(&sent[2].body, "Ready")["status"], "True");

        sqlx::raw_sql(
            "DROP POLICY answers_owner ON public.answers;
             ALTER TABLE public.answers NO FORCE ROW LEVEL SECURITY",
        )
        .execute(&mut conn)
        .await
        .unwrap();
        let (third, sent, metrics) = reconcile_metered(
            true,
            policy,
            vec![
                Expect::ListCronJobs(vec![]),
                secret(),
                Expect::PatchStatus,
                Expect::CreateEvent,
            ],
        )
        .await;
        let (enabled, forced, policies): (bool, bool, i64) = sqlx::query_as(
            "SELECT relrowsecurity, relforcerowsecurity,
                    (SELECT count(*) FROM pg_policy WHERE polrelid = c.oid)
             FROM pg_class c WHERE oid = 'public.answers'::regclass",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap();
        let _ = conn.close().await;
        drop_database(&name).await;
        third.unwrap();
        assert_eq!((enabled, forced, policies), (true, true, 1), "repaired");
        let event = &sent[3].body;
        assert_eq!(
            (event["type"].as_str(), event["reason"].as_str()),
            (Some("Warning"), Some("SecurityDriftRepaired")),
            "{event:#}"
        );
        let note = event["note"].as_str().unwrap();
        assert!(
            note.starts_with(
                "row-level security was weakened outside the policy (2 change(s) to undo it)"
            ),
            "{note}"
        );
        assert!(
            note.contains("rowLevelSecurity public.answers: create policy answers_owner")
                && note.contains("rowLevelSecurity public.answers: force row level security"),
            "{note}"
        );
        assert!(
            metrics.contains("dbpolicy_drift_detected_total{namespace=\"default\",policy=\"test\",area=\"rowLevelSecurity\"} 1"),
            "{metrics}"
        );
    }

    const CHILDREN: &str = "database: {connectionSecretRef: {name: x}}
backups:
  schedule: '0 3 * * *'
  retention: {days: 30}
  storage: {pvc: {claimName: backups}}
materializedViews:
  views:
    - {name: stats, schedule: '*/15 * * * *', concurrently: true}
    - {name: manual}
";

    fn rfc3339(secs_ago: i64) -> String {
        k8s_openapi::jiff::Timestamp::from_second(
            k8s_openapi::jiff::Timestamp::now().as_second() - secs_ago,
        )
        .unwrap()
        .to_string()
    }

    #[tokio::test]
    async fn cronjobs_are_applied_and_backups_read_back_even_when_the_database_is_not_reachable() {
        let policy = test_policy(CHILDREN, true);
        let finished = rfc3339(3600);
        let job: Job = serde_json::from_value(json!({
            "metadata": {"name": "test-backup-1", "namespace": "default", "uid": "job-1",
                "labels": {"dbpolicy.dev/policy": "test", "dbpolicy.dev/job": "backup"}},
            "status": {"succeeded": 1, "startTime": finished, "completionTime": finished},
        }))
        .unwrap();
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "test-backup-1-abcde", "namespace": "default",
                "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": "test-backup-1", "uid": "job-1"}]},
            "status": {"containerStatuses": [{"name": "backup", "image": "i", "imageID": "", "ready": false,
                "restartCount": 0, "state": {"terminated": {"exitCode": 0, "finishedAt": finished,
                "message": "{\"result\":\"Succeeded\",\"sizeBytes\":123456}"}}}]},
        }))
        .unwrap();
        let (result, sent) = reconcile_with(
            policy.clone(),
            vec![
                Expect::ListCronJobs(vec![]),
                Expect::CreateCronJob("test-refresh-stats".into(), false),
                Expect::CreateCronJob("test-backup".into(), false),
                Expect::ListBackupJobs(vec![job]),
                Expect::ListBackupPods(vec![pod]),
                Expect::GetSecret(None),
                Expect::PatchStatus,
                Expect::CreateEvent,
            ],
        )
        .await;
        assert_eq!(result.unwrap_err().reason(), "SecretNotFound");
        // Exactly what the builders make, image from --job-image's default.
        let refresh = refresh_cronjobs(&policy, DEFAULT_JOB_IMAGE);
        assert_eq!(sent[1].body, serde_json::to_value(&refresh[0]).unwrap());
        let backup = backup_cronjob(&policy, DEFAULT_JOB_IMAGE).unwrap();
        assert_eq!(sent[2].body, serde_json::to_value(&backup).unwrap());
        assert_eq!(sent[2].body["apiVersion"], "batch/v1");
        assert_eq!(sent[2].body["kind"], "CronJob");
        assert_eq!(
            sent[2].body["metadata"]["ownerReferences"][0]["kind"],
            "DatabasePolicy"
        );
        assert_eq!(
            sent[2].body["metadata"]["ownerReferences"][0]["controller"],
            true
        );
        assert_eq!(
            sent[2].body["metadata"]["labels"],
            json!({"app.kubernetes.io/managed-by": "dbpolicy", "dbpolicy.dev/policy": "test", "dbpolicy.dev/job": "backup"})
        );
        assert_eq!(
            sent[2].body["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
                ["image"],
            format!("ghcr.io/dbpolicy/dbpolicy:{}", env!("CARGO_PKG_VERSION"))
        );
        // Backups are reported although the database could not be reached.
        let patch = &sent[6].body;
        assert_eq!(condition(patch, "Ready")["reason"], "SecretNotFound");
        let backups = condition(patch, "BackupsReady");
        assert_eq!(
            (&backups["status"], &backups["reason"]),
            (&json!("True"), &json!("BackupSucceeded"))
        );
        assert_eq!(
            patch["status"]["backups"]["lastSuccessTime"],
            json!(finished)
        );
        assert_eq!(patch["status"]["backups"]["newestBackupBytes"], 123456);
        assert_eq!(
            condition(patch, "MaterializedViewsReady")["status"],
            "Unknown"
        );
    }

    fn owned_cronjob(spec: &str, name: &str) -> CronJob {
        let with = test_policy(spec, true);
        let mut jobs = refresh_cronjobs(&with, DEFAULT_JOB_IMAGE);
        jobs.extend(backup_cronjob(&with, DEFAULT_JOB_IMAGE));
        jobs.into_iter()
            .find(|c| c.metadata.name.as_deref() == Some(name))
            .unwrap()
    }

    #[tokio::test]
    async fn cronjobs_no_longer_in_the_spec_are_deleted_and_only_those() {
        // The backups section was removed and the view unscheduled; one CronJob with our
        // labels but no owner reference (made by hand) is left alone.
        let spec = "database: {connectionSecretRef: {name: x}}
materializedViews:
  views:
    - {name: stats}
";
        let mut by_hand = owned_cronjob(CHILDREN, "test-refresh-stats");
        by_hand.metadata.name = Some("test-by-hand".into());
        by_hand.metadata.owner_references = None;
        let (result, sent) = reconcile_with(
            test_policy(spec, true),
            vec![
                Expect::ListCronJobs(vec![
                    owned_cronjob(CHILDREN, "test-refresh-stats"),
                    owned_cronjob(CHILDREN, "test-backup"),
                    by_hand,
                ]),
                Expect::DeleteCronJob("test-refresh-stats".into()),
                Expect::DeleteCronJob("test-backup".into()),
                Expect::GetSecret(None),
                Expect::PatchStatus,
                Expect::CreateEvent,
            ],
        )
        .await;
        assert_eq!(result.unwrap_err().reason(), "SecretNotFound");
        for d in &sent[1..3] {
            assert_eq!(
                d.body,
                json!({"propagationPolicy": "Background"}),
                "its Jobs go with it"
            );
        }
        let patch = &sent[4].body;
        assert!(patch["status"].get("backups").is_none());
        assert!(condition_opt(patch, "BackupsReady").is_none());
    }

    fn condition_opt<'a>(patch: &'a Value, type_: &str) -> Option<&'a Value> {
        patch["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == type_)
    }

    #[tokio::test]
    async fn without_batch_v1_cronjobs_the_spec_that_needs_them_says_so() {
        let (result, sent) = reconcile_on(
            false,
            test_policy(CHILDREN, true),
            vec![
                Expect::GetSecret(None),
                Expect::PatchStatus,
                Expect::CreateEvent,
            ],
        )
        .await;
        assert_eq!(result.unwrap_err().reason(), "SecretNotFound");
        let backups = condition(&sent[1].body, "BackupsReady");
        assert_eq!(backups["status"], "Unknown");
        assert_eq!(backups["reason"], "CronJobsUnsupported");
        assert!(backups["message"].as_str().unwrap().contains("batch/v1"));
    }

    #[tokio::test]
    async fn replicas_publish_the_read_endpoint_and_a_missing_secret_is_one_unknown_replica() {
        let (url, name) = create_database().await;
        // r1 points at the primary itself (not in recovery); r2's Secret does not exist.
        let spec = "database: {connectionSecretRef: {name: x}}
replicas:
  replicas:
    - {name: r1, connectionSecretRef: {name: r1-db}, maxLagSeconds: 30}
    - {name: r2, connectionSecretRef: {name: r2-db}}
  fallbackToPrimary: true
";
        let (result, sent) = reconcile_with(
            test_policy(spec, true),
            vec![
                Expect::ListCronJobs(vec![]),
                Expect::GetSecret(Some(test_secret(&url))),
                Expect::GetNamedSecret("r1-db".into(), Some(named_secret("r1-db", &url))),
                Expect::GetNamedSecret("r2-db".into(), None),
                Expect::GetNamedSecret("test-read".into(), None),
                Expect::CreateSecret("test-read".into()),
                Expect::PatchStatus,
                Expect::CreateEvent,
                Expect::CreateEvent,
            ],
        )
        .await;
        drop_database(&name).await;
        assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(300)));
        let secret = &sent[5].body;
        assert_eq!(secret["apiVersion"], "v1");
        assert_eq!(secret["kind"], "Secret");
        assert_eq!(secret["type"], "Opaque");
        assert_eq!(secret["metadata"]["name"], "test-read");
        assert_eq!(secret["metadata"]["namespace"], "default");
        assert_eq!(
            secret["metadata"]["ownerReferences"][0]["kind"],
            "DatabasePolicy"
        );
        assert_eq!(secret["metadata"]["ownerReferences"][0]["name"], "test");
        let data: BTreeMap<String, String> = secret["data"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| {
                let b: k8s_openapi::ByteString = serde_json::from_value(v.clone()).unwrap();
                (k.clone(), String::from_utf8(b.0).unwrap())
            })
            .collect();
        assert_eq!(
            data,
            BTreeMap::from([
                ("DATABASE_READ_URL".to_string(), url.clone()),
                ("DATABASE_READ_URLS".to_string(), url.clone()),
                ("DATABASE_READ_SOURCE".to_string(), "primary".to_string()),
            ]),
            "no replica is healthy: the primary, as fallbackToPrimary says"
        );
        let patch = &sent[6].body;
        let replicas = &patch["status"]["replicas"];
        assert_eq!(replicas[0]["name"], "r1");
        assert_eq!(replicas[0]["state"], "NotInRecovery");
        assert_eq!(replicas[1]["state"], "Unknown");
        let ready = condition(patch, "ReplicasReady");
        assert_eq!(
            (&ready["status"], &ready["reason"]),
            (&json!("False"), &json!("ReplicaNotInRecovery"))
        );
        assert!(
            ready["message"]
                .as_str()
                .unwrap()
                .contains("r2: Secret default/r2-db not found"),
            "{ready}"
        );
        assert_eq!(condition(patch, "Ready")["reason"], "ReplicaNotInRecovery");
        let events: Vec<(&Value, &Value)> = sent[7..]
            .iter()
            .map(|s| (&s.body["type"], &s.body["reason"]))
            .collect();
        assert_eq!(
            events,
            [
                (&json!("Warning"), &json!("ReplicaNotInRecovery")),
                (&json!("Warning"), &json!("ReplicaNotChecked")),
            ]
        );
        // The URLs are in the Secret and nowhere else.
        for s in sent
            .iter()
            .filter(|s| !s.request.contains("/secrets/test-read"))
        {
            assert!(
                !s.body.to_string().contains(&url),
                "{}: {}",
                s.request,
                s.body
            );
        }
    }

    #[tokio::test]
    async fn a_read_endpoint_secret_of_another_owner_is_never_changed_or_owned() {
        let (url, name) = create_database().await;
        let spec = "database: {connectionSecretRef: {name: x}}
replicas:
  replicas:
    - {name: r1, connectionSecretRef: {name: r1-db}}
  readEndpointSecretName: app-env
";
        // The application's own Secret, and one the policy created earlier (its ownerRef).
        let theirs = named_secret("app-env", "postgres://app-owned");
        let (result, sent) = reconcile_with(
            test_policy(spec, true),
            vec![
                Expect::ListCronJobs(vec![]),
                Expect::GetSecret(Some(test_secret(&url))),
                Expect::GetNamedSecret("r1-db".into(), Some(named_secret("r1-db", &url))),
                Expect::GetNamedSecret("app-env".into(), Some(theirs)),
                Expect::PatchStatus,
                Expect::CreateEvent,
                Expect::CreateEvent,
            ],
        )
        .await;
        drop_database(&name).await;
        let err = result.unwrap_err();
        assert_eq!(err.reason(), "SecretNotOwned");
        let patch = &sent[4].body;
        let replicas = condition(patch, "ReplicasReady");
        assert_eq!(
            (&replicas["status"], &replicas["reason"]),
            (&json!("False"), &json!("SecretNotOwned")),
            "{patch:#}"
        );
        let message = replicas["message"].as_str().unwrap();
        assert!(
            message.starts_with("Secret default/app-env (spec.replicas.readEndpointSecretName) exists and was not created by this policy"),
            "{message}"
        );
        assert_eq!(condition(patch, "Ready")["status"], "False");
        assert!(
            !sent
                .iter()
                .any(|s| s.request.contains("/secrets/app-env") && !s.request.starts_with("GET")),
            "the application's Secret was written"
        );

        // A Secret this policy created (controller ownerReference with its uid) is applied.
        let policy = test_policy(spec, true);
        let mut ours = named_secret("app-env", "x");
        ours.metadata.owner_references = policy.controller_owner_ref(&()).map(|o| vec![o]);
        let (url, name) = create_database().await;
        let (_, sent) = reconcile_with(
            policy,
            vec![
                Expect::ListCronJobs(vec![]),
                Expect::GetSecret(Some(test_secret(&url))),
                Expect::GetNamedSecret("r1-db".into(), Some(named_secret("r1-db", &url))),
                Expect::GetNamedSecret("app-env".into(), Some(ours)),
                Expect::ApplySecret("app-env".into()),
                Expect::PatchStatus,
                Expect::CreateEvent,
            ],
        )
        .await;
        drop_database(&name).await;
        assert_eq!(sent[4].body["metadata"]["name"], "app-env");
    }

    #[tokio::test]
    async fn a_cronjob_of_another_owner_is_never_taken_over() {
        // test-backup exists but is not the policy's (the create answers AlreadyExists);
        // test-refresh-stats is the policy's own and in place: not applied again.
        let (result, sent) = reconcile_with(
            test_policy(CHILDREN, true),
            vec![
                Expect::ListCronJobs(vec![owned_cronjob(CHILDREN, "test-refresh-stats")]),
                Expect::CreateCronJob("test-backup".into(), true),
                Expect::GetSecret(None),
                Expect::PatchStatus,
                Expect::CreateEvent,
            ],
        )
        .await;
        assert_eq!(result.unwrap_err().reason(), "SecretNotFound");
        let backups = condition(&sent[3].body, "BackupsReady");
        assert_eq!(
            (&backups["status"], &backups["reason"]),
            (&json!("False"), &json!("CronJobNotOwned")),
            "{backups}"
        );
        assert!(backups["message"].as_str().unwrap().starts_with(
            "CronJob default/test-backup (spec.backups) exists and was not created by this policy"
        ));
    }

    #[tokio::test]
    async fn plan_mode_reports_cronjobs_as_pending_and_creates_none() {
        let (url, name) = create_database().await;
        let spec = "database: {connectionSecretRef: {name: x}}
mode: Plan
backups: {schedule: '0 3 * * *', storage: {pvc: {claimName: backups}}}
";
        let (result, sent) = reconcile_with(
            test_policy(spec, true),
            vec![
                Expect::ListCronJobs(vec![]),
                Expect::ListBackupJobs(vec![]),
                Expect::GetSecret(Some(test_secret(&url))),
                Expect::PatchStatus,
            ],
        )
        .await;
        drop_database(&name).await;
        assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(300)));
        let patch = &sent[3].body;
        assert_eq!(patch["status"]["pendingChanges"], 1);
        let plan = &patch["status"]["pendingPlan"];
        assert_eq!(plan["byArea"]["backups"], 1);
        assert_eq!(plan["changes"][0]["target"], "CronJob/test-backup");
        assert_eq!(
            plan["changes"][0]["summary"],
            "create CronJob test-backup (schedule 0 3 * * *)"
        );
        let backups = condition(patch, "BackupsReady");
        assert_eq!(backups["reason"], "PlanPending", "{backups}");
        assert_eq!(condition(patch, "Ready")["reason"], "PlanPending");
        assert_eq!(patch["status"]["backups"], json!({}));
    }

    /// [`reconcile_with`] on a context that reads Secrets and CronJobs from watch caches
    /// holding these objects, as `dbpolicy run` does.
    async fn reconcile_cached(
        policy: DatabasePolicy,
        secrets: Vec<Secret>,
        cronjobs: Vec<CronJob>,
        scenario: Vec<Expect>,
    ) -> (Result<Action>, Vec<Sent>) {
        let (ctx, server) = crate::controller::fixtures::test_context_cached(secrets, cronjobs);
        let verifier = server.run(policy.clone(), scenario);
        let result = reconcile(Arc::new(policy), ctx.clone()).await;
        drop(ctx);
        let sent = tokio::time::timeout(Duration::from_secs(30), verifier)
            .await
            .expect("the scenario did not finish")
            .expect("the scenario failed");
        (result, sent)
    }

    /// Issue 17: a steady-state reconcile (nothing changed in the database, the Secret or
    /// the spec) sends no API request at all: the Secret comes from the watch cache, and the
    /// status it would write is the one the policy has. The mocked API server fails on any
    /// request beyond the scenario.
    #[tokio::test]
    async fn a_steady_state_reconcile_sends_no_api_request() {
        let (url, name) = create_database().await;
        let secrets = || vec![*test_secret(&url)];
        let policy = test_policy(FLAGS, true);
        let (first, sent) = reconcile_cached(
            policy.clone(),
            secrets(),
            vec![],
            vec![Expect::PatchStatus, Expect::CreateEvent],
        )
        .await;
        first.unwrap();
        // The first check after the apply finds the database in sync: Drifted says so.
        let policy = with_status(policy, &sent[0].body);
        let (second, sent) =
            reconcile_cached(policy.clone(), secrets(), vec![], vec![Expect::PatchStatus]).await;
        second.unwrap();
        assert_eq!(condition(&sent[0].body, "Drifted")["reason"], "InSync");
        let policy = with_status(policy, &sent[0].body);
        for _ in 0..2 {
            let (steady, sent) = reconcile_cached(policy.clone(), secrets(), vec![], vec![]).await;
            assert_eq!(steady.unwrap(), Action::requeue(Duration::from_secs(300)));
            assert!(sent.is_empty());
        }
        // The Secret changed (another password, the same database): read from the cache,
        // still no request, and the database is reached with the new value.
        let moved = format!("{url}?application_name=rotated");
        let (rotated, sent) =
            reconcile_cached(policy.clone(), vec![*test_secret(&moved)], vec![], vec![]).await;
        rotated.unwrap();
        assert!(sent.is_empty());
        // A Secret missing from the cache is SecretNotFound, without a GET.
        let (missing, _) = reconcile_cached(
            policy,
            vec![],
            vec![],
            vec![Expect::PatchStatus, Expect::CreateEvent],
        )
        .await;
        drop_database(&name).await;
        assert_eq!(missing.unwrap_err().reason(), "SecretNotFound");
    }

    /// CronJobs come from the watch cache; one in place (as the API server returns it, with
    /// defaults and status) is not applied again, a changed one is, and nothing is listed.
    #[tokio::test]
    async fn cronjobs_in_place_are_neither_listed_nor_applied_again() {
        let spec = "database: {connectionSecretRef: {name: x}}
materializedViews: {views: [{name: stats, schedule: '*/15 * * * *'}, {name: daily, schedule: '0 1 * * *'}]}
";
        let policy = test_policy(spec, true);
        let served: Vec<CronJob> = refresh_cronjobs(&policy, DEFAULT_JOB_IMAGE)
            .into_iter()
            .map(|mut cj| {
                let spec = cj.spec.as_mut().unwrap();
                spec.concurrency_policy.get_or_insert("Allow".into());
                spec.job_template.spec.as_mut().unwrap().completions = Some(1);
                cj.metadata.resource_version = Some("7".into());
                cj.metadata.creation_timestamp =
                    Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
                cj
            })
            .collect();
        let sync = |cached: Vec<CronJob>, scenario: Vec<Expect>| {
            let policy = policy.clone();
            async move {
                let (ctx, server) =
                    crate::controller::fixtures::test_context_cached(vec![], cached);
                let verifier = server.run(policy.clone(), scenario);
                let result = children::sync_cronjobs(
                    &ctx.client,
                    ctx.cronjob_cache.as_ref(),
                    &policy,
                    &ctx.job_image,
                    Mode::Apply,
                )
                .await;
                drop(ctx);
                (result, verifier.await.expect("the scenario failed"))
            }
        };
        let (result, sent) = sync(served.clone(), vec![]).await;
        result.unwrap();
        assert!(sent.is_empty(), "{sent:?}");

        let mut changed = served.clone();
        changed[1].spec.as_mut().unwrap().schedule = "0 2 * * *".into();
        let name = changed[1].name_any();
        let (result, _) = sync(changed, vec![Expect::ApplyCronJob(name)]).await;
        result.unwrap();

        // Not in the cache yet (created a moment ago): the create conflicts, the owner
        // reference says it is ours, and it is applied, not reported as another's.
        let (result, sent) = sync(
            served[..1].to_vec(),
            vec![
                Expect::CreateCronJob(served[1].name_any(), true),
                Expect::GetCronJob(Box::new(served[1].clone())),
                Expect::ApplyCronJob(served[1].name_any()),
            ],
        )
        .await;
        result.unwrap();
        assert_eq!(sent.len(), 3);
    }

    /// The read-endpoint Secret in the cache with the data to publish is not written again;
    /// changed data is applied; another owner's is never written, and no GET is sent.
    #[tokio::test]
    async fn the_read_endpoint_secret_in_place_is_not_written_again() {
        let policy = test_policy(
            "database: {connectionSecretRef: {name: x}}\nreplicas: {replicas: []}\n",
            true,
        );
        let data = |v: &str| BTreeMap::from([("DATABASE_READ_URL".to_string(), v.to_string())]);
        let ours = children::read_endpoint_secret(&policy, "test-read", data("postgres://r1"));
        let publish = |cached: Vec<Secret>, want: Secret, scenario: Vec<Expect>| {
            let policy = policy.clone();
            async move {
                let (ctx, server) =
                    crate::controller::fixtures::test_context_cached(cached, vec![]);
                let verifier = server.run(policy.clone(), scenario);
                let result = children::publish_read_endpoint(
                    &ctx.client,
                    ctx.secret_cache.as_ref(),
                    &policy,
                    &want,
                )
                .await;
                drop(ctx);
                (result, verifier.await.expect("the scenario failed"))
            }
        };
        let (result, sent) = publish(vec![ours.clone()], ours.clone(), vec![]).await;
        result.unwrap();
        assert!(sent.is_empty());

        let moved = children::read_endpoint_secret(&policy, "test-read", data("postgres://r2"));
        let (result, _) = publish(
            vec![ours.clone()],
            moved,
            vec![Expect::ApplySecret("test-read".into())],
        )
        .await;
        result.unwrap();

        let mut theirs = ours.clone();
        theirs.metadata.owner_references = None;
        let (result, sent) = publish(vec![theirs], ours.clone(), vec![]).await;
        assert_eq!(result.unwrap_err().reason(), "SecretNotOwned");
        assert!(sent.is_empty());

        let (result, _) = publish(
            vec![],
            ours.clone(),
            vec![Expect::CreateSecret("test-read".into())],
        )
        .await;
        result.unwrap();
    }

    /// Schema-valid specs with hostile values where the schema allows them (durations of
    /// any size, schedules, names), reconciled through the mocked API: never a panic.
    mod no_panic {
        use super::*;
        use proptest::prelude::*;

        fn spec() -> impl Strategy<Value = serde_json::Value> {
            let duration = "[0-9]{1,22}(ms|s|m|min|h|d)";
            (
                (duration, duration, duration),
                (any::<Option<bool>>(), any::<bool>(), any::<bool>()),
                ("[0-9*/,-]{1,12} [0-9*/,-]{1,8} \\* \\* \\*", "[a-z0-9_]{1,63}", "[a-z0-9-]{1,40}"),
                any::<bool>(),
            )
                .prop_map(|((drift, lock, statement), (suspend, plan, reset), (schedule, slot, name), s3)| {
                    let storage = if s3 {
                        json!({"s3": {"bucket": "bucket", "credentialsSecretRef": {"name": name}}})
                    } else {
                        json!({"pvc": {"claimName": name}})
                    };
                    json!({
                        "database": {"connectionSecretRef": {"name": "x"}},
                        "driftCheckInterval": drift,
                        "suspend": suspend,
                        "mode": if plan { "Plan" } else { "Apply" },
                        "deletionPolicy": if reset { "Reset" } else { "Retain" },
                        "safety": {"lockTimeout": lock, "statementTimeout": statement},
                        "backups": {"schedule": schedule, "storage": storage},
                        "materializedViews": {"views": [{"name": name, "schedule": schedule}]},
                        "replicas": {"replicas": [
                            {"name": name, "connectionSecretRef": {"name": name}, "slot": slot},
                        ], "readEndpointSecretName": name},
                        "featureFlags": {"flags": [{"name": "f", "enabled": true}]},
                    })
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
            #[test]
            fn reconcile_never_panics(spec in spec(), secret in any::<bool>(), deleted in any::<bool>(), cronjobs in any::<bool>()) {
                let mut policy = test_policy("database: {connectionSecretRef: {name: x}}\n", true);
                policy.spec = serde_json::from_value(spec).unwrap();
                policy.spec.database.connection_secret_ref.name = crate::controller::fixtures::SECRET.into();
                if deleted {
                    policy.meta_mut().deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
                }
                // A database that refuses at once: the run goes as far as it can without one.
                let secret = secret.then(|| test_secret("postgres://u:pw@127.0.0.1:1/db?connect_timeout=1"));
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                rt.block_on(async {
                    let (ctx, server) = test_context_with(cronjobs);
                    let served = server.serve_anything(policy.clone(), secret);
                    let result = reconcile(Arc::new(policy), ctx.clone()).await;
                    drop(ctx);
                    served.await.expect("the mocked API server did not panic");
                    if let Err(e) = result {
                        let text = e.to_string();
                        prop_assert!(!text.contains("pw@"), "{text}");
                        prop_assert!(!text.lines().next().unwrap_or("").ends_with(':'), "{text}");
                    }
                    Ok(())
                })?;
            }
        }
    }
}
