//! Step 4, one engine run (lock → observe → plan → apply) on a connection lent by
//! `ctx.connections`.

use crate::api::DatabasePolicy;
use crate::controller::context::{key, Context};
use crate::controller::error::Result;
use crate::engine::replica_health::ReplicaTargets;
use crate::engine::server_claims::ClaimsTarget;
use crate::engine::{self, Outcome, PolicyId, RunOptions};

use super::dereference::Targets;

/// The engine's session settings and advisory lock belong to the lent connection while
/// the run lasts; it is kept for the next run on the same URL only after a run that
/// succeeded and a reset. At most `--concurrency` runs are in flight at once.
pub(super) async fn run_engine(
    ctx: &Context,
    policy: &DatabasePolicy,
    targets: &Targets,
) -> Result<Outcome> {
    let spec = &policy.spec;
    let id = PolicyId(key(policy));
    let options = RunOptions {
        replicas: ReplicaTargets {
            urls: targets.replica_urls.clone(),
            ..Default::default()
        },
        allowed_settings: ctx.allowed_settings.clone(),
        claims: ClaimsTarget::for_policy_url(&targets.url),
        // One kept connection per database (controller/connections.rs): the operator runs
        // many policies at once, and a second connection per run would double what it
        // holds on every server.
        second_url: None,
    };
    let mut lease = ctx
        .connections
        .checkout(&targets.url, engine::lock_wait(spec))
        .await?;
    let result = engine::run_with(lease.conn(), spec, spec.effective_mode(), &id, &options).await;
    let succeeded =
        matches!(&result, Ok(o) if o.report.as_ref().is_none_or(|r| r.failure.is_none()));
    ctx.connections.checkin(lease, succeeded).await;
    Ok(result?)
}
