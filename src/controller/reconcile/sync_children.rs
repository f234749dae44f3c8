//! Step 2, the Kubernetes side: the policy's CronJobs (applied, or pending in Plan mode),
//! the backups' state read back from their Jobs, and point-in-time recovery's children
//! (the WAL receiver Deployment, the base backup Jobs). A failure is said in the areas it
//! concerns and kept, to be returned once status is written.

use k8s_openapi::api::batch::v1::CronJob;

use crate::api::DatabasePolicy;
use crate::controller::context::Context;
use crate::controller::error::Error;
use crate::controller::status::{AreaState, Children, Input, Status};
use crate::controller::{backups, children, pitr};
use crate::engine::Area;
use crate::reason::Reason;

/// What the Kubernetes side found, for the steps after the engine run.
#[derive(Debug)]
pub(super) struct Gathered {
    /// Area states, pending child changes, `status.backups` (see [`Children`]).
    pub found: Children,
    /// Point-in-time recovery's facts so far (the slot is read after the engine run).
    pub pitr: pitr::Pitr,
    /// The first failure (already in `found`), returned once status is written.
    pub error: Option<Error>,
}

/// Syncs the CronJobs, reads the backups' state, then point-in-time recovery's children.
pub(super) async fn sync_children(
    ctx: &Context,
    policy: &DatabasePolicy,
    input: &Input<'_>,
) -> Gathered {
    let (mut found, mut error, base_cronjob) = cronjobs_and_backups(ctx, policy, input).await;
    let mut pitr = pitr::gather(
        &ctx.client,
        policy,
        &ctx.job_image,
        input,
        base_cronjob.as_ref(),
        &mut found,
    )
    .await;
    if let Some(e) = pitr.take_error() {
        error.get_or_insert(e);
    }
    Gathered { found, pitr, error }
}

/// The CronJobs (applied, or pending in Plan mode) and the backups' status and condition.
/// Also the base backup CronJob of point-in-time recovery as applied.
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
    if !ctx.cronjobs_supported {
        for area in needing {
            let what = match area {
                Area::Backups => "spec.backups runs as a batch/v1 CronJob: no backup is taken",
                _ => "the refresh schedules run as batch/v1 CronJobs: the views are reconciled but not refreshed on schedule",
            };
            found.areas.push(AreaState::new(
                area,
                Status::Unknown,
                Reason::CronJobsUnsupported,
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
                found.areas.push(AreaState::failed(area, &e));
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
                    .push(AreaState::new(Area::Backups, r.status, r.reason, r.message));
                found.backups = Some(status);
            }
            Err(e) => {
                let mut state = AreaState::failed(Area::Backups, &e);
                state.status = Status::Unknown;
                found.areas.push(state);
                error = Some(e);
            }
        }
    }
    let mut pending_areas: Vec<Area> = sync.pending.iter().map(|c| c.area).collect();
    pending_areas.sort();
    pending_areas.dedup();
    for area in pending_areas {
        let n = sync.pending.iter().filter(|c| c.area == area).count();
        found.areas.push(AreaState::new(
            area,
            Status::False,
            Reason::PlanPending,
            format!("{n} CronJob change(s) pending (spec.mode is Plan; see status.pendingPlan)"),
        ));
    }
    found.pending = sync.pending;
    (found, error, sync.base_backup)
}
