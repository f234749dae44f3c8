//! Point-in-time recovery in the cluster: the WAL receiver Deployment and its spool claim
//! (the base backup CronJob goes with the other CronJobs, `children::sync_cronjobs`),
//! `status.backups.pointInTimeRecovery` and the `PointInTimeRecoveryReady` condition.
//!
//! Where the status comes from, and why:
//! - receiver up or down: the Deployment's available replicas (the API server);
//! - slot retention and archiving lag: the primary (`slot::observe`, one query on the
//!   connection the operator already has), so it is right for every store;
//! - last base backup and the recoverable window: the base backup Job's termination
//!   message (`backup base` lists the store after its retention ran). The operator
//!   cannot mount a PVC store, and reading S3 itself would mean holding the bucket's keys:
//!   the Job that already has them reports instead. The window's end moves on as the
//!   receiver ships WAL; `windowCheckedTime` says when it was listed.
//!
//! Like every child, the Deployment and the claim are created only when absent, applied
//! only while the policy's controller ownerReference is on them, and an object of the same
//! name that is someone else's is left alone (`DeploymentNotOwned`).

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::fmt::Debug;

use super::backups::{self, termination_json, ts, Readiness};
use super::children::{controlled_by, is_conflict};
use super::context::FIELD_MANAGER;
use super::error::{Error, Result};
use super::status::{condition, AreaState, Children, Input, Status};
use crate::api::{DatabasePolicy, DatabasePolicyStatus, Mode, PitrStatus, PointInTimeRecovery};
use crate::backup::pitr::slot::{self, SlotFacts};
use crate::engine::{Area, Change};
use crate::jobs::pitr::{
    enabled, receiver_deployment, receiver_name, spool_claim_name, spool_pvc, BASE_BACKUP_ROLE,
};
use crate::reason::Reason;

/// The condition's type.
pub(crate) const CONDITION: &str = "PointInTimeRecoveryReady";
/// A receiver not available this long after its Deployment was created is down, not
/// starting (an image pull and the first connection take well under this).
const STARTUP_GRACE: Duration = Duration::from_secs(300);

// ------------------------------------------------------------------ API server side

/// Creates `want` when absent, applies it while the policy controls it, and refuses an
/// object of that name that is someone else's. Returns what the API server holds.
async fn ensure<K>(
    api: &Api<K>,
    policy: &DatabasePolicy,
    want: &K,
    kind: &'static str,
    reapply: bool,
) -> Result<K>
where
    K: Resource + Clone + Debug + Serialize + DeserializeOwned,
{
    let name = want.name_any();
    let ns = want.namespace().unwrap_or_default();
    let failed = |action| {
        let name = format!("{ns}/{name}");
        move |source| Error::Pitr {
            action,
            kind,
            name,
            source,
        }
    };
    let not_owned = || Error::NotOwned {
        kind,
        name: format!("{ns}/{name}"),
        wanted_by: "spec.backups.pointInTimeRecovery".to_string(),
    };
    match api.get_opt(&name).await.map_err(failed("reading"))? {
        Some(have) if controlled_by(&have, policy) => {
            if !reapply {
                return Ok(have);
            }
            api.patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(want),
            )
            .await
            .map_err(failed("applying"))
        }
        Some(_) => Err(not_owned()),
        None => {
            let post = PostParams {
                field_manager: Some(FIELD_MANAGER.to_string()),
                ..Default::default()
            };
            api.create(&post, want).await.map_err(|e| {
                if is_conflict(&e) {
                    // Created by someone else since the read: theirs.
                    not_owned()
                } else {
                    failed("creating")(e)
                }
            })
        }
    }
}

/// Deletes the object `name` when the policy controls it; one of another owner stays.
async fn remove<K>(
    api: &Api<K>,
    policy: &DatabasePolicy,
    name: &str,
    kind: &'static str,
    mode: Mode,
    pending: &mut Vec<Change>,
) -> Result<()>
where
    K: Resource + Clone + Debug + DeserializeOwned,
{
    let failed = |action| {
        let name = name.to_string();
        move |source| Error::Pitr {
            action,
            kind,
            name,
            source,
        }
    };
    let Some(have) = api.get_opt(name).await.map_err(failed("reading"))? else {
        return Ok(());
    };
    if !controlled_by(&have, policy) {
        return Ok(());
    }
    if mode == Mode::Plan {
        pending.push(Change::new(
            Area::Backups,
            format!("{kind}/{name}"),
            format!("delete {kind} {name} (point-in-time recovery is off)"),
            "",
        ));
        return Ok(());
    }
    tracing::info!(kind, name, "deleting: point-in-time recovery is off");
    api.delete(name, &DeleteParams::background())
        .await
        .map_err(failed("deleting"))?;
    Ok(())
}

/// What the receiver step found or did.
#[derive(Debug, Clone, Default)]
pub(crate) struct ReceiverSync {
    /// The Deployment as the API server holds it (None: PITR off, or Plan mode before
    /// its creation).
    pub deployment: Option<Deployment>,
    /// Changes not carried out (Plan mode).
    pub pending: Vec<Change>,
}

/// The receiver's spool claim and Deployment: created/applied while PITR is enabled,
/// deleted when it is not and `was_enabled` (the previous status had PITR: nothing is
/// read for the many policies that never used it). The claim goes after the Deployment;
/// Kubernetes keeps a claim in use until its pod is gone, and the pod ships what is
/// complete on SIGTERM.
pub(crate) async fn sync_receiver(
    client: &Client,
    policy: &DatabasePolicy,
    image: &str,
    mode: Mode,
    was_enabled: bool,
) -> Result<ReceiverSync> {
    let ns = policy
        .namespace()
        .ok_or(Error::MissingObjectKey("namespace"))?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
    let mut sync = ReceiverSync::default();
    let (Some(deployment), Some(claim)) = (receiver_deployment(policy, image), spool_pvc(policy))
    else {
        if was_enabled {
            let name = receiver_name(policy);
            remove(
                &deployments,
                policy,
                &name,
                "Deployment",
                mode,
                &mut sync.pending,
            )
            .await?;
            let name = spool_claim_name(policy);
            remove(
                &claims,
                policy,
                &name,
                "PersistentVolumeClaim",
                mode,
                &mut sync.pending,
            )
            .await?;
        }
        return Ok(sync);
    };
    if mode == Mode::Plan {
        let have = deployments
            .get_opt(&receiver_name(policy))
            .await
            .map_err(|source| Error::Pitr {
                action: "reading",
                kind: "Deployment",
                name: format!("{ns}/{}", receiver_name(policy)),
                source,
            })?;
        match have {
            Some(d) if controlled_by(&d, policy) => sync.deployment = Some(d),
            _ => sync.pending.push(Change::new(
                Area::Backups,
                format!("Deployment/{}", receiver_name(policy)),
                format!(
                    "create Deployment {} (the WAL receiver) and its spool claim {}",
                    receiver_name(policy),
                    spool_claim_name(policy)
                ),
                "",
            )),
        }
        return Ok(sync);
    }
    // A claim's spec is immutable once bound (its size can only grow, where the class
    // allows): created once, then left as it is.
    ensure(&claims, policy, &claim, "PersistentVolumeClaim", false).await?;
    sync.deployment = Some(ensure(&deployments, policy, &deployment, "Deployment", true).await?);
    Ok(sync)
}

// ------------------------------------------------------------------ pure: status

/// What `backup base` writes to its termination log.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
struct BaseMessage {
    result: String,
    #[serde(default)]
    base_backup: Option<String>,
    #[serde(default)]
    size_bytes: Option<i64>,
    #[serde(default)]
    window_earliest: Option<String>,
    #[serde(default)]
    window_latest: Option<String>,
    #[serde(default)]
    window_checked_at: Option<String>,
}

/// One finished base backup Job.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct BaseRun {
    pub run: backups::Run,
    pub base_backup: Option<String>,
    pub window_earliest: Option<Timestamp>,
    pub window_latest: Option<Timestamp>,
    pub window_checked: Option<Timestamp>,
}

/// The finished base backup runs, oldest first.
pub(crate) fn base_runs(jobs: &[Job], pods: &[Pod]) -> Vec<BaseRun> {
    let mut out: Vec<BaseRun> = jobs
        .iter()
        .filter_map(|job| {
            let run = backups::runs(std::slice::from_ref(job), pods).pop()?;
            let m: BaseMessage = termination_json(job, pods).unwrap_or_default();
            let ok = run.succeeded && m.result == "Succeeded";
            Some(BaseRun {
                base_backup: m.base_backup.filter(|_| ok),
                window_earliest: ts(m.window_earliest.as_deref()).filter(|_| ok),
                window_latest: ts(m.window_latest.as_deref()).filter(|_| ok),
                window_checked: ts(m.window_checked_at.as_deref()).filter(|_| ok),
                run,
            })
        })
        .collect();
    out.sort_by_key(|r| r.run.finished);
    out
}

/// `status.backups.pointInTimeRecovery`: the previous one, moved forward by the newest
/// runs (finished Jobs are deleted; their facts stay), the receiver and the slot.
/// `slot` None: the primary was not observed this time, the previous slot facts stay.
pub(crate) fn pitr_status(
    previous: Option<&PitrStatus>,
    p: &PointInTimeRecovery,
    receiver: Option<&Deployment>,
    runs: &[BaseRun],
    slot: Option<Option<&SlotFacts>>,
) -> PitrStatus {
    let mut s = previous.cloned().unwrap_or_default();
    if let Some(ok) = runs.iter().rev().find(|r| r.run.succeeded) {
        if ts(s.last_base_backup_time.as_deref()).is_none_or(|prev| ok.run.finished >= prev) {
            s.last_base_backup_time = Some(ok.run.finished.to_string());
            if ok.base_backup.is_some() {
                s.last_base_backup = ok.base_backup.clone();
            }
            if ok.run.size_bytes.is_some() {
                s.last_base_backup_bytes = ok.run.size_bytes;
            }
            if ok.window_checked.is_some() {
                s.earliest_recoverable_time = ok.window_earliest.map(|t| t.to_string());
                s.latest_recoverable_time = ok.window_latest.map(|t| t.to_string());
                s.window_checked_time = ok.window_checked.map(|t| t.to_string());
            }
        }
    }
    if let Some(bad) = runs.iter().rev().find(|r| !r.run.succeeded) {
        if ts(s.last_base_backup_failure_time.as_deref())
            .is_none_or(|prev| bad.run.finished >= prev)
        {
            s.last_base_backup_failure_time = Some(bad.run.finished.to_string());
            s.last_base_backup_failure_reason = bad.run.reason.clone();
        }
    }
    s.receiver_available = Some(receiver.is_some_and(available));
    s.slot = Some(p.slot().to_string());
    if let Some(facts) = slot {
        s.slot_active = Some(facts.is_some_and(|f| f.active));
        s.slot_retained_bytes = facts.and_then(|f| f.retained_bytes);
        s.archive_lag_bytes = facts.and_then(|f| f.lag_bytes);
    }
    s
}

fn available(d: &Deployment) -> bool {
    d.status
        .as_ref()
        .and_then(|s| s.available_replicas)
        .unwrap_or(0)
        >= 1
}

/// Why the Deployment has no available pod, from its conditions (a quota, an image
/// that cannot be pulled surfaces on the pod, not here).
fn unavailable_because(d: &Deployment) -> Option<String> {
    d.status
        .as_ref()?
        .conditions
        .iter()
        .flatten()
        .filter(|c| c.status != "True")
        .find_map(|c| c.message.clone())
}

/// Bytes in a condition message, in the one spelling of [`crate::units::bytes`] (a
/// negative figure, which PostgreSQL never reports here, reads as zero).
fn size(bytes: i64) -> String {
    crate::units::bytes(bytes.max(0) as u64)
}

/// What `PointInTimeRecoveryReady` says, worst first: the receiver down (nothing is
/// archived), the slot holding too much WAL (the server's disk fills), the receiver
/// behind, a failed or overdue base backup; else True with the window.
pub fn readiness(
    p: &PointInTimeRecovery,
    suspended: bool,
    status: &PitrStatus,
    receiver: Option<&Deployment>,
    base_created: Option<Timestamp>,
    now: Timestamp,
) -> Readiness {
    let ready = |status, reason, message: String| Readiness {
        status,
        reason,
        message,
    };
    if suspended {
        return ready(
            Status::Unknown,
            Reason::BackupsSuspended,
            "the WAL receiver is scaled to zero and base backups are suspended (spec.backups.suspend or spec.suspend); the slot retains WAL meanwhile".into(),
        );
    }
    let since = |t: Timestamp| Duration::try_from(now.duration_since(t)).unwrap_or(Duration::ZERO);
    let slot = p.slot();
    let retained = status.slot_retained_bytes.unwrap_or(0);
    let receiver_up = receiver.is_some_and(available);
    let created = receiver
        .and_then(|d| d.metadata.creation_timestamp.as_ref())
        .map(|t| t.0);
    let starting = created.is_none_or(|c| since(c) < STARTUP_GRACE);
    if !receiver_up {
        if starting {
            return ready(
                Status::Unknown,
                Reason::WalReceiverStarting,
                "the WAL receiver Deployment has no available pod yet".into(),
            );
        }
        let why = receiver
            .and_then(unavailable_because)
            .map(|m| format!(": {m}"))
            .unwrap_or_default();
        return ready(
            Status::False,
            Reason::WalReceiverDown,
            format!(
                "the WAL receiver Deployment has no available pod{why}; no WAL is archived and slot {slot} retains it on the server ({} so far)",
                size(retained)
            ),
        );
    }
    if status.slot_active == Some(false) {
        if starting {
            // The pod is up and creating the slot, or connecting.
            return ready(
                Status::Unknown,
                Reason::WalReceiverStarting,
                format!("the WAL receiver is up and not streaming through slot {slot} yet"),
            );
        }
        return ready(
            Status::False,
            Reason::WalReceiverDown,
            format!(
                "no receiver streams through slot {slot} (the pod is up but not connected: see its log); the slot retains {} of WAL",
                size(retained)
            ),
        );
    }
    let max_retained = p.max_slot_retained_bytes();
    if retained > 0 && retained as u64 > max_retained {
        return ready(
            Status::False,
            Reason::SlotRetainingTooMuch,
            format!(
                "slot {slot} retains {} of WAL on the server, over maxSlotRetainedBytes ({}); drop it with pg_drop_replication_slot('{slot}') if PITR is no longer wanted",
                size(retained),
                size(max_retained as i64)
            ),
        );
    }
    let lag = status.archive_lag_bytes.unwrap_or(0);
    let max_lag = p.max_archive_lag_bytes();
    if lag > 0 && lag as u64 > max_lag {
        return ready(
            Status::False,
            Reason::WalArchivingLagging,
            format!(
                "the WAL receiver is {} behind the server, over maxArchiveLagBytes ({})",
                size(lag),
                size(max_lag as i64)
            ),
        );
    }
    let success = ts(status.last_base_backup_time.as_deref());
    let failure = ts(status.last_base_backup_failure_time.as_deref());
    if let Some(f) = failure.filter(|f| success.is_none_or(|s| *f > s)) {
        return ready(
            Status::False,
            Reason::BaseBackupFailed,
            format!(
                "the last base backup failed at {f} ({}); see the logs of the {BASE_BACKUP_ROLE} Job",
                status
                    .last_base_backup_failure_reason
                    .as_deref()
                    .unwrap_or(Reason::BaseBackupFailed.as_str())
            ),
        );
    }
    let window = backups::window(&p.base_backup_schedule, now);
    match (success, window) {
        (None, Some(w)) if base_created.is_some_and(|c| since(c) > w) => ready(
            Status::False,
            Reason::BaseBackupOverdue,
            format!(
                "no base backup succeeded within {} of the CronJob's creation: nothing can be restored yet",
                crate::units::duration(w)
            ),
        ),
        (None, _) => ready(
            Status::Unknown,
            Reason::NoBaseBackupYet,
            format!(
                "WAL is archived; no base backup yet (schedule {:?}): nothing can be restored before the first one",
                p.base_backup_schedule
            ),
        ),
        (Some(s), Some(w)) if since(s) > w => ready(
            Status::False,
            Reason::BaseBackupOverdue,
            format!(
                "no base backup within {} (twice the schedule's interval); the last one finished at {s}",
                crate::units::duration(w)
            ),
        ),
        (Some(s), _) => ready(
            Status::True,
            Reason::Recoverable,
            format!(
                "WAL is archived through slot {slot}; last base backup at {s}; recoverable from {} (window listed at {})",
                status.earliest_recoverable_time.as_deref().unwrap_or("-"),
                status.window_checked_time.as_deref().unwrap_or("-")
            ),
        ),
    }
}

// ------------------------------------------------------------------ reconcile glue

/// What one reconcile gathered about point-in-time recovery.
#[derive(Debug, Default)]
pub(crate) struct Pitr {
    receiver: Option<Deployment>,
    base_created: Option<Timestamp>,
    runs: Vec<BaseRun>,
    /// None: not observed this time; Some(None): the slot does not exist.
    slot: Option<Option<SlotFacts>>,
    /// Reading the base Jobs or syncing the receiver failed (already in `found`).
    error: Option<Error>,
    /// What the condition says when that happened.
    failure: Option<Verdict>,
}

/// `PointInTimeRecoveryReady`'s status, reason and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Verdict {
    pub status: Status,
    pub reason: Reason,
    pub message: String,
}

impl From<Readiness> for Verdict {
    fn from(r: Readiness) -> Self {
        Verdict {
            status: r.status,
            reason: r.reason,
            message: r.message,
        }
    }
}

/// Whether the policy runs point-in-time recovery.
pub(crate) fn enabled_in(policy: &DatabasePolicy) -> bool {
    enabled(policy).is_some()
}

/// Syncs the receiver and reads the base backup Jobs; failures go into `found` as the
/// Backups area's state and are kept to be returned once status is written.
pub(crate) async fn gather(
    client: &Client,
    policy: &DatabasePolicy,
    image: &str,
    input: &Input<'_>,
    base_cronjob: Option<&CronJob>,
    found: &mut Children,
) -> Pitr {
    let mode = policy.spec.effective_mode();
    let was_enabled = input
        .previous
        .and_then(|s| s.backups.as_ref())
        .is_some_and(|b| b.point_in_time_recovery.is_some());
    let mut out = Pitr {
        base_created: base_cronjob
            .and_then(|c| c.metadata.creation_timestamp.as_ref())
            .map(|t| t.0),
        ..Default::default()
    };
    match sync_receiver(client, policy, image, mode, was_enabled).await {
        Ok(sync) => {
            out.receiver = sync.deployment;
            found.pending.extend(sync.pending);
        }
        Err(e) => {
            fail(found, &e);
            out.failure = Some(failed(&e));
            out.error = Some(e);
        }
    }
    if enabled(policy).is_some() {
        match super::children::jobs_of_role(client, policy, BASE_BACKUP_ROLE).await {
            Ok((jobs, pods)) => out.runs = base_runs(&jobs, &pods),
            Err(e) => {
                fail(found, &e);
                out.failure.get_or_insert(failed(&e));
                out.error.get_or_insert(e);
            }
        }
    }
    out
}

fn failed(e: &Error) -> Verdict {
    Verdict {
        status: Status::False,
        reason: e.reason(),
        message: e.to_string(),
    }
}

/// The Backups area fails with `e` (a worse state already there stays).
fn fail(found: &mut Children, e: &Error) {
    overlay_backups(&mut found.areas, AreaState::failed(Area::Backups, e));
}

/// Puts `state` over the Backups area's entry when it is worse (False over anything
/// else); the first False stays.
fn overlay_backups(areas: &mut Vec<AreaState>, state: AreaState) {
    match areas.iter_mut().find(|a| a.area == Area::Backups) {
        Some(a) if a.status != Status::False && state.status == Status::False => *a = state,
        Some(_) => {}
        None if state.status == Status::False => areas.push(state),
        None => {}
    }
}

impl Pitr {
    /// The failure to return once status is written (it is in `found` already).
    pub(crate) fn take_error(&mut self) -> Option<Error> {
        self.error.take()
    }

    /// Reads the slot on the primary; a failure leaves it unobserved (status keeps the
    /// previous facts) and is logged: it never fails the reconcile.
    pub(crate) async fn observe(&mut self, policy: &DatabasePolicy, url: &str) {
        let Some((_, p)) = enabled(policy) else {
            return;
        };
        let facts = async {
            let mut conn = crate::pg::connect_one(url)
                .await
                .map_err(|e| e.to_string())?;
            slot::observe(&mut conn, p.slot())
                .await
                .map_err(|e| crate::pg::error_summary(&e))
        }
        .await;
        match facts {
            Ok(f) => self.slot = Some(f),
            Err(e) => tracing::warn!(slot = p.slot(), "reading the PITR slot: {e}"),
        }
    }

    /// Fills `status.backups.pointInTimeRecovery` in `found` (removes it when PITR is
    /// off) and, when the receiver or the base backups are not ready, makes the Backups
    /// area say so. Returns the condition's state, None when PITR is off.
    pub(crate) fn report(
        &self,
        policy: &DatabasePolicy,
        input: &Input<'_>,
        found: &mut Children,
    ) -> Option<Verdict> {
        let Some((b, p)) = enabled(policy) else {
            // Off: the previous PITR status goes too (found.backups is None when the
            // dumps' status was not read, e.g. without batch/v1 CronJobs).
            let had = input
                .previous
                .and_then(|s| s.backups.as_ref())
                .is_some_and(|b| b.point_in_time_recovery.is_some());
            if had && found.backups.is_none() {
                found.backups = input.previous.and_then(|s| s.backups.clone());
            }
            if let Some(backups) = found.backups.as_mut() {
                backups.point_in_time_recovery = None;
            }
            return None;
        };
        let previous = input
            .previous
            .and_then(|s| s.backups.as_ref())
            .and_then(|b| b.point_in_time_recovery.as_ref());
        let status = pitr_status(
            previous,
            p,
            self.receiver.as_ref(),
            &self.runs,
            self.slot.as_ref().map(Option::as_ref),
        );
        let suspended = policy.spec.is_suspended() || b.suspend.unwrap_or(false);
        let r = match &self.failure {
            Some(f) => f.clone(),
            None => readiness(
                p,
                suspended,
                &status,
                self.receiver.as_ref(),
                self.base_created,
                input.now.0,
            )
            .into(),
        };
        if self.failure.is_none() {
            overlay_backups(
                &mut found.areas,
                AreaState {
                    area: Area::Backups,
                    status: r.status,
                    reason: r.reason,
                    message: format!("point-in-time recovery: {}", r.message),
                },
            );
        }
        let backups = found.backups.get_or_insert_with(|| {
            input
                .previous
                .and_then(|s| s.backups.clone())
                .unwrap_or_default()
        });
        backups.point_in_time_recovery = Some(status);
        Some(r)
    }
}

/// Adds `PointInTimeRecoveryReady` to a status built by `status::from_*` (which know
/// only the areas); without PITR the condition is simply absent.
pub(crate) fn add_condition(
    input: &Input<'_>,
    status: &mut DatabasePolicyStatus,
    r: Option<&Verdict>,
) {
    status.conditions.retain(|c| c.type_ != CONDITION);
    if let Some(r) = r {
        let c: Condition = condition(input, CONDITION, r.status, r.reason, &r.message);
        status.conditions.push(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn spec() -> PointInTimeRecovery {
        serde_yaml::from_str("{baseBackupSchedule: '0 2 * * *', slot: quiz_pitr}").unwrap()
    }

    fn deployment(available: i32, created: &str) -> Deployment {
        serde_json::from_value(json!({
            "metadata": {"name": "certquiz-wal-receiver", "creationTimestamp": created},
            "spec": {"selector": {}, "template": {}},
            "status": {"availableReplicas": available, "conditions": [
                {"type": "Available", "status": if available > 0 {"True"} else {"False"},
                 "message": "Deployment does not have minimum availability."}]},
        }))
        .unwrap()
    }

    fn base_job(name: &str, finished: &str, ok: bool) -> (Job, Pod) {
        let status = if ok {
            json!({"succeeded": 1, "startTime": finished, "completionTime": finished})
        } else {
            json!({"failed": 3, "startTime": finished, "conditions": [{"type": "Failed", "status": "True",
                "reason": "BackoffLimitExceeded", "lastTransitionTime": finished}]})
        };
        let message = if ok {
            json!({"result": "Succeeded", "baseBackup": format!("id-{name}"), "sizeBytes": 4096,
                "windowEarliest": "2026-11-20T02:00:41Z", "windowLatest": finished,
                "windowCheckedAt": finished})
        } else {
            json!({"result": "Failed", "reason": "BaseBackupFailed", "message": "pg_basebackup: error: connection refused"})
        };
        let job = serde_json::from_value(json!({
            "metadata": {"name": name, "uid": format!("uid-{name}")}, "status": status}))
        .unwrap();
        let pod = serde_json::from_value(json!({
            "metadata": {"name": format!("{name}-x"), "ownerReferences": [
                {"apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": format!("uid-{name}")}]},
            "status": {"containerStatuses": [{"name": "base-backup", "image": "i", "imageID": "",
                "ready": false, "restartCount": 0,
                "state": {"terminated": {"exitCode": 0, "finishedAt": finished, "message": message.to_string()}}}]},
        }))
        .unwrap();
        (job, pod)
    }

    fn runs(list: &[(&str, &str, bool)]) -> Vec<BaseRun> {
        let (jobs, pods): (Vec<Job>, Vec<Pod>) =
            list.iter().map(|(n, t, ok)| base_job(n, t, *ok)).unzip();
        base_runs(&jobs, &pods)
    }

    const NOW: &str = "2026-11-25T12:00:00Z";

    fn healthy() -> SlotFacts {
        SlotFacts {
            active: true,
            retained_bytes: Some(8 << 20),
            lag_bytes: Some(8 << 20),
        }
    }

    fn state(status: &PitrStatus, receiver: Option<&Deployment>) -> Readiness {
        readiness(
            &spec(),
            false,
            status,
            receiver,
            Some(at("2026-11-01T00:00:00Z")),
            at(NOW),
        )
    }

    #[test]
    fn status_takes_the_newest_base_backup_and_its_window() {
        let p = spec();
        let d = deployment(1, "2026-11-01T00:00:00Z");
        let runs = runs(&[
            ("b-1", "2026-11-24T02:05:00Z", true),
            ("b-2", "2026-11-25T02:03:00Z", false),
        ]);
        let s = pitr_status(None, &p, Some(&d), &runs, Some(Some(&healthy())));
        assert_eq!(s.last_base_backup.as_deref(), Some("id-b-1"));
        assert_eq!(
            s.last_base_backup_time.as_deref(),
            Some("2026-11-24T02:05:00Z")
        );
        assert_eq!(s.last_base_backup_bytes, Some(4096));
        assert_eq!(
            s.earliest_recoverable_time.as_deref(),
            Some("2026-11-20T02:00:41Z")
        );
        assert_eq!(
            s.latest_recoverable_time.as_deref(),
            Some("2026-11-24T02:05:00Z")
        );
        assert_eq!(
            s.last_base_backup_failure_reason.as_deref(),
            Some("BaseBackupFailed")
        );
        assert_eq!(
            (s.receiver_available, s.slot_active),
            (Some(true), Some(true))
        );
        assert_eq!(s.slot.as_deref(), Some("quiz_pitr"));
        assert_eq!(state(&s, Some(&d)).reason, "BaseBackupFailed");

        // Jobs are deleted by their history limit: what they said stays; an unobserved
        // slot keeps its previous facts.
        let later = pitr_status(Some(&s), &p, Some(&d), &[], None);
        assert_eq!(later.last_base_backup, s.last_base_backup);
        assert_eq!(later.slot_retained_bytes, Some(8 << 20));
        // A newer success clears the failure and moves the window.
        let newer = runs_after(&s);
        assert_eq!(
            newer.latest_recoverable_time.as_deref(),
            Some("2026-11-25T02:10:00Z")
        );
        let r = state(&newer, Some(&d));
        assert_eq!(
            (r.status, r.reason),
            (Status::True, Reason::Recoverable),
            "{}",
            r.message
        );
        assert!(r.message.contains("2026-11-20T02:00:41Z"), "{}", r.message);
    }

    fn runs_after(s: &PitrStatus) -> PitrStatus {
        pitr_status(
            Some(s),
            &spec(),
            Some(&deployment(1, "2026-11-01T00:00:00Z")),
            &runs(&[("b-3", "2026-11-25T02:10:00Z", true)]),
            Some(Some(&healthy())),
        )
    }

    #[test]
    fn receiver_down_slot_retention_and_lag_each_have_their_reason() {
        let ok = runs_after(&PitrStatus::default());
        let up = deployment(1, "2026-11-01T00:00:00Z");
        assert_eq!(state(&ok, Some(&up)).status, Status::True);

        // Just created: starting, not down.
        let new = deployment(0, "2026-11-25T11:59:00Z");
        assert_eq!(state(&ok, Some(&new)).reason, "WalReceiverStarting");
        assert_eq!(state(&ok, None).reason, "WalReceiverStarting");
        // Unavailable for long: down, with the Deployment's own words.
        let down = deployment(0, "2026-11-01T00:00:00Z");
        let r = state(&ok, Some(&down));
        assert_eq!(
            (r.status, r.reason),
            (Status::False, Reason::WalReceiverDown)
        );
        assert!(r.message.contains("minimum availability"), "{}", r.message);
        // Pod up but nobody on the slot: starting for a while after the creation, then down.
        let mut idle = ok.clone();
        idle.slot_active = Some(false);
        assert_eq!(state(&idle, Some(&up)).reason, "WalReceiverDown");
        let young = deployment(1, "2026-11-25T11:58:00Z");
        assert_eq!(state(&idle, Some(&young)).reason, "WalReceiverStarting");

        let mut retaining = ok.clone();
        retaining.slot_retained_bytes = Some(2 << 30);
        retaining.archive_lag_bytes = Some(2 << 30);
        let r = state(&retaining, Some(&up));
        assert_eq!(
            (r.status, r.reason),
            (Status::False, Reason::SlotRetainingTooMuch)
        );
        assert!(
            r.message.contains("2.0 GiB") && r.message.contains("1.0 GiB"),
            "{}",
            r.message
        );

        let mut lagging = ok.clone();
        lagging.archive_lag_bytes = Some(100 << 20);
        let r = state(&lagging, Some(&up));
        assert_eq!(
            (r.status, r.reason),
            (Status::False, Reason::WalArchivingLagging)
        );
        // Thresholds come from the spec.
        let mut p = spec();
        p.max_archive_lag_bytes = Some(200 << 20);
        let r = readiness(&p, false, &lagging, Some(&up), None, at(NOW));
        assert_eq!(r.status, Status::True);

        // Suspended outranks everything: the receiver is scaled to zero on purpose.
        let r = readiness(&spec(), true, &ok, Some(&down), None, at(NOW));
        assert_eq!(
            (r.status, r.reason),
            (Status::Unknown, Reason::BackupsSuspended)
        );
    }

    #[test]
    fn base_backups_missing_or_overdue() {
        let up = deployment(1, "2026-11-01T00:00:00Z");
        let none = pitr_status(None, &spec(), Some(&up), &[], Some(Some(&healthy())));
        let young = readiness(
            &spec(),
            false,
            &none,
            Some(&up),
            Some(at("2026-11-25T11:00:00Z")),
            at(NOW),
        );
        assert_eq!(
            (young.status, young.reason),
            (Status::Unknown, Reason::NoBaseBackupYet)
        );
        let old = state(&none, Some(&up));
        assert_eq!(
            (old.status, old.reason),
            (Status::False, Reason::BaseBackupOverdue)
        );
        // A daily schedule: 48 h without a base backup is overdue.
        let stale = pitr_status(
            None,
            &spec(),
            Some(&up),
            &runs(&[("b-1", "2026-11-22T02:05:00Z", true)]),
            Some(Some(&healthy())),
        );
        let r = state(&stale, Some(&up));
        assert_eq!(
            (r.status, r.reason),
            (Status::False, Reason::BaseBackupOverdue),
            "{}",
            r.message
        );
    }

    #[test]
    fn pitr_failures_show_in_the_backups_area_without_hiding_a_worse_one() {
        let mut areas = vec![AreaState {
            area: Area::Backups,
            status: Status::True,
            reason: Reason::BackupSucceeded,
            message: "ok".into(),
        }];
        let down = AreaState {
            area: Area::Backups,
            status: Status::False,
            reason: Reason::WalReceiverDown,
            message: "down".into(),
        };
        overlay_backups(&mut areas, down.clone());
        assert_eq!(areas[0].reason, "WalReceiverDown");
        let mut failing = vec![AreaState {
            reason: Reason::BackupFailed,
            ..down.clone()
        }];
        overlay_backups(&mut failing, down);
        assert_eq!(
            failing[0].reason, "BackupFailed",
            "the dump's failure stays"
        );
        let mut fine = areas.clone();
        fine[0].status = Status::True;
        fine[0].reason = Reason::BackupSucceeded;
        overlay_backups(
            &mut fine,
            AreaState {
                area: Area::Backups,
                status: Status::True,
                reason: Reason::Recoverable,
                message: String::new(),
            },
        );
        assert_eq!(
            fine[0].reason, "BackupSucceeded",
            "True over True: the dump's says it"
        );
    }

    // ------------------------------------------------------------ mocked API server

    mod mocked {
        use super::*;
        use crate::controller::context::DEFAULT_JOB_IMAGE;
        use crate::controller::fixtures::{
            condition, test_context_with, test_policy, Expect, Sent, NS,
        };
        use crate::jobs::pitr::base_backup_cronjob;
        use serde_json::Value;
        use std::sync::Arc;

        const SPEC: &str = "database: {connectionSecretRef: {name: x}}
backups:
  schedule: '0 3 * * *'
  storage: {pvc: {claimName: backups}}
  pointInTimeRecovery: {baseBackupSchedule: '0 2 * * *', retention: {count: 2}}
";

        async fn reconcile_with(
            policy: DatabasePolicy,
            scenario: Vec<Expect>,
        ) -> (Result<kube::runtime::controller::Action>, Vec<Sent>) {
            let (ctx, server) = test_context_with(true);
            let verifier = server.run(policy.clone(), scenario);
            let result =
                crate::controller::reconcile::reconcile(Arc::new(policy), ctx.clone()).await;
            drop(ctx);
            let sent = tokio::time::timeout(Duration::from_secs(30), verifier)
                .await
                .expect("the scenario did not finish")
                .expect("the scenario failed");
            (result, sent)
        }

        fn missing(what: &str) -> Expect {
            Expect::Request(
                format!("GET {what}"),
                404,
                Some(
                    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "reason": "NotFound", "code": 404, "message": "not found"}),
                ),
            )
        }

        fn deployments() -> String {
            format!("/apis/apps/v1/namespaces/{NS}/deployments")
        }
        fn claims() -> String {
            format!("/api/v1/namespaces/{NS}/persistentvolumeclaims")
        }
        fn base_jobs(items: Value) -> Vec<Expect> {
            let sel = format!(
                "labelSelector=dbpolicy.dev/policy=test,dbpolicy.dev/job={BASE_BACKUP_ROLE}"
            );
            let list = |kind: &str, items: &Value| json!({"apiVersion": "v1", "kind": kind, "metadata": {}, "items": items});
            let mut v = vec![Expect::Request(
                format!("GET /apis/batch/v1/namespaces/{NS}/jobs?{sel}"),
                200,
                Some(list("JobList", &items["jobs"])),
            )];
            if items["jobs"].as_array().is_some_and(|a| !a.is_empty()) {
                v.push(Expect::Request(
                    format!("GET /api/v1/namespaces/{NS}/pods?{sel}"),
                    200,
                    Some(list("PodList", &items["pods"])),
                ));
            }
            v
        }

        #[tokio::test]
        async fn the_base_backup_cronjob_and_the_receiver_are_created_and_reported() {
            let policy = test_policy(SPEC, true);
            let (job, pod) = base_job("test-base-backup-1", "2026-11-25T02:05:00Z", true);
            let mut scenario = vec![
                Expect::ListCronJobs(vec![]),
                Expect::CreateCronJob("test-backup".into(), false),
                Expect::CreateCronJob("test-base-backup".into(), false),
                Expect::ListBackupJobs(vec![]),
                missing(&format!("{}/test-wal-spool", claims())),
                Expect::Request(
                    format!("POST {}?fieldManager=dbpolicy", claims()),
                    201,
                    None,
                ),
                missing(&format!("{}/test-wal-receiver", deployments())),
                Expect::Request(
                    format!("POST {}?fieldManager=dbpolicy", deployments()),
                    201,
                    None,
                ),
            ];
            scenario.extend(base_jobs(json!({"jobs": [job], "pods": [pod]})));
            scenario.extend([
                Expect::GetSecret(None),
                Expect::PatchStatus,
                Expect::CreateEvent,
            ]);
            let (result, sent) = reconcile_with(policy.clone(), scenario).await;
            assert_eq!(result.unwrap_err().reason(), "SecretNotFound");
            let base = base_backup_cronjob(&policy, DEFAULT_JOB_IMAGE).unwrap();
            assert_eq!(sent[2].body, serde_json::to_value(&base).unwrap());
            assert_eq!(
                sent[5].body,
                serde_json::to_value(spool_pvc(&policy).unwrap()).unwrap()
            );
            let d = receiver_deployment(&policy, DEFAULT_JOB_IMAGE).unwrap();
            assert_eq!(sent[7].body, serde_json::to_value(&d).unwrap());
            assert_eq!(
                sent[7].body["metadata"]["ownerReferences"][0]["controller"],
                true
            );

            let patch = &sent[11].body;
            let pitr = &patch["status"]["backups"]["pointInTimeRecovery"];
            assert_eq!(pitr["lastBaseBackup"], "id-test-base-backup-1", "{patch:#}");
            assert_eq!(pitr["earliestRecoverableTime"], "2026-11-20T02:00:41Z");
            assert_eq!(pitr["receiverAvailable"], false);
            assert!(
                pitr.get("slotActive").is_none(),
                "the database was not reached"
            );
            let c = condition(patch, CONDITION);
            assert_eq!(
                (&c["status"], &c["reason"]),
                (&json!("Unknown"), &json!("WalReceiverStarting"))
            );
        }

        #[tokio::test]
        async fn a_base_backup_cronjob_of_another_owner_is_never_taken_over() {
            let policy = test_policy(SPEC, true);
            let mut scenario = vec![
                Expect::ListCronJobs(vec![]),
                Expect::CreateCronJob("test-backup".into(), false),
                Expect::CreateCronJob("test-base-backup".into(), true),
                missing(&format!("{}/test-wal-spool", claims())),
                Expect::Request(
                    format!("POST {}?fieldManager=dbpolicy", claims()),
                    201,
                    None,
                ),
                missing(&format!("{}/test-wal-receiver", deployments())),
                Expect::Request(
                    format!("POST {}?fieldManager=dbpolicy", deployments()),
                    201,
                    None,
                ),
            ];
            scenario.extend(base_jobs(json!({"jobs": []})));
            scenario.extend([
                Expect::GetSecret(None),
                Expect::PatchStatus,
                Expect::CreateEvent,
            ]);
            let (result, sent) = reconcile_with(policy, scenario).await;
            assert_eq!(result.unwrap_err().reason(), "SecretNotFound");
            assert!(
                !sent
                    .iter()
                    .any(|s| s.request.starts_with("PATCH /apis/batch")),
                "never applied over theirs"
            );
            let b = condition(&sent[9].body, "BackupsReady");
            assert_eq!(
                (&b["status"], &b["reason"]),
                (&json!("False"), &json!("CronJobNotOwned"))
            );
            assert!(
                b["message"].as_str().unwrap().starts_with(
                    "CronJob default/test-base-backup (spec.backups.pointInTimeRecovery) exists and was not created by this policy"
                ),
                "{b}"
            );
        }

        #[tokio::test]
        async fn a_deployment_of_another_owner_is_left_alone() {
            let policy = test_policy(SPEC, true);
            let theirs = json!({"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "test-wal-receiver", "namespace": NS},
                "spec": {"selector": {}, "template": {}}});
            let mut owned_claim = serde_json::to_value(spool_pvc(&policy).unwrap()).unwrap();
            owned_claim["metadata"]["uid"] = json!("claim-1");
            let mut scenario = vec![
                Expect::ListCronJobs(vec![]),
                Expect::CreateCronJob("test-backup".into(), false),
                Expect::CreateCronJob("test-base-backup".into(), false),
                Expect::ListBackupJobs(vec![]),
                Expect::Request(
                    format!("GET {}/test-wal-spool", claims()),
                    200,
                    Some(owned_claim),
                ),
                Expect::Request(
                    format!("GET {}/test-wal-receiver", deployments()),
                    200,
                    Some(theirs),
                ),
            ];
            scenario.extend(base_jobs(json!({"jobs": []})));
            scenario.extend([
                Expect::GetSecret(None),
                Expect::PatchStatus,
                Expect::CreateEvent,
            ]);
            let (result, sent) = reconcile_with(policy, scenario).await;
            assert_eq!(result.unwrap_err().reason(), "SecretNotFound");
            assert!(
                !sent
                    .iter()
                    .any(|s| s.request.starts_with("PATCH /apis/apps")
                        || s.request.starts_with("POST /apis/apps")),
                "never written: {:?}",
                sent.iter().map(|s| &s.request).collect::<Vec<_>>()
            );
            let patch = &sent[8].body;
            let c = condition(patch, CONDITION);
            assert_eq!(
                (&c["status"], &c["reason"]),
                (&json!("False"), &json!("DeploymentNotOwned"))
            );
            assert!(c["message"]
                .as_str()
                .unwrap()
                .contains("default/test-wal-receiver"));
            // BackupsReady says the worse news first: the dumps are overdue (the fixture's
            // CronJob is old and has no Job); Ready is False either way.
            assert_eq!(condition(patch, "BackupsReady")["status"], "False");
        }

        #[tokio::test]
        async fn turning_pitr_off_deletes_the_receiver_and_its_claim_and_the_condition() {
            let spec = SPEC.replace("{baseBackupSchedule", "{enabled: false, baseBackupSchedule");
            let mut policy = test_policy(&spec, true);
            let on = test_policy(SPEC, true);
            policy.status = Some(DatabasePolicyStatus {
                backups: Some(crate::api::BackupStatus {
                    point_in_time_recovery: Some(PitrStatus::default()),
                    ..Default::default()
                }),
                conditions: vec![Condition {
                    type_: CONDITION.into(),
                    status: "True".into(),
                    reason: "Recoverable".into(),
                    message: String::new(),
                    observed_generation: None,
                    last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(at(
                        NOW,
                    )),
                }],
                ..Default::default()
            });
            let base = base_backup_cronjob(&on, DEFAULT_JOB_IMAGE).unwrap();
            let ok =
                json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"});
            let scenario = vec![
                Expect::ListCronJobs(vec![base]),
                Expect::CreateCronJob("test-backup".into(), false),
                Expect::DeleteCronJob("test-base-backup".into()),
                Expect::ListBackupJobs(vec![]),
                Expect::Request(
                    format!("GET {}/test-wal-receiver", deployments()),
                    200,
                    Some(
                        serde_json::to_value(receiver_deployment(&on, DEFAULT_JOB_IMAGE).unwrap())
                            .unwrap(),
                    ),
                ),
                Expect::Request(
                    format!("DELETE {}/test-wal-receiver?", deployments()),
                    200,
                    Some(ok.clone()),
                ),
                Expect::Request(
                    format!("GET {}/test-wal-spool", claims()),
                    200,
                    Some(serde_json::to_value(spool_pvc(&on).unwrap()).unwrap()),
                ),
                Expect::Request(
                    format!("DELETE {}/test-wal-spool?", claims()),
                    200,
                    Some(ok),
                ),
                Expect::GetSecret(None),
                Expect::PatchStatus,
                Expect::CreateEvent,
            ];
            let (result, sent) = reconcile_with(policy, scenario).await;
            assert_eq!(result.unwrap_err().reason(), "SecretNotFound");
            assert_eq!(sent[5].body["propagationPolicy"], "Background");
            let patch = &sent[9].body;
            assert!(
                patch["status"]["backups"]
                    .get("pointInTimeRecovery")
                    .is_none(),
                "{patch:#}"
            );
            assert!(
                !patch["status"]["conditions"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|c| c["type"] == CONDITION),
                "{patch:#}"
            );
        }
    }
}
