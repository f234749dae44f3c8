//! Step 1, a suspended policy: no Secret read, no database access, no requeue until the
//! spec changes. Its CronJobs are paused (the builders set `suspend`) and the WAL receiver
//! scaled to zero (its slot keeps the WAL meanwhile); in Plan mode nothing is changed.

use kube::runtime::controller::Action;
use kube::Api;

use super::update_status::{patch_status, record_metrics};
use crate::api::{DatabasePolicy, Mode};
use crate::controller::context::Context;
use crate::controller::error::Result;
use crate::controller::status::{self, Input};
use crate::controller::{children, pitr};

/// Pauses the children, writes the `Suspended` status; a failure to pause is returned
/// after status is written.
pub(super) async fn suspend(
    ctx: &Context,
    api: &Api<DatabasePolicy>,
    policy: &DatabasePolicy,
    input: &Input<'_>,
) -> Result<Action> {
    let mode = policy.spec.effective_mode();
    let mut paused = None;
    if mode == Mode::Apply && ctx.cronjobs_supported {
        paused = children::sync_cronjobs(
            &ctx.client,
            ctx.cronjob_cache.as_ref(),
            policy,
            &ctx.job_image,
            mode,
        )
        .await
        .err();
    }
    if mode == Mode::Apply && pitr::enabled_in(policy) {
        let scaled = pitr::sync_receiver(&ctx.client, policy, &ctx.job_image, mode, false).await;
        paused = paused.or(scaled.err());
    }
    ctx.ddl_listeners
        .unsubscribe(&kube::runtime::reflector::ObjectRef::from_obj(policy));
    let new_status = status::suspended(input);
    record_metrics(ctx, policy, &new_status, None);
    patch_status(api, policy, &new_status).await?;
    match paused {
        Some(e) => Err(e),
        None => Ok(Action::await_change()),
    }
}
