//! Step 5, `spec.replicas` after the engine run: each replica's health into status, and
//! in Apply mode the read-endpoint Secret published from it (`read_endpoint.rs`).

use kube::runtime::events::EventType;
use kube::ResourceExt;

use super::dereference::Targets;
use super::sync_children::Gathered;
use crate::api::{DatabasePolicy, Mode};
use crate::controller::context::Context;
use crate::controller::status::AreaState;
use crate::controller::{children, read_endpoint, replicas};
use crate::engine::{Area, Outcome};
use crate::reason::Reason;

/// An Event about one replica whose state changed: (type, reason, note).
pub(super) type ReplicaEvent = (EventType, Reason, String);

/// Puts the replicas' area state and `status.replicas` into `gathered.found`, publishes
/// the read endpoint; a failure to publish it is kept in `gathered`. Returns the Events of
/// the replicas whose state changed since the previous status.
pub(super) async fn publish_replicas(
    ctx: &Context,
    policy: &DatabasePolicy,
    targets: &Targets,
    outcome: &Outcome,
    gathered: &mut Gathered,
) -> Vec<ReplicaEvent> {
    let (Some(rspec), Some(current)) = (&policy.spec.replicas, &outcome.facts.replicas) else {
        return Vec::new();
    };
    let found = &mut gathered.found;
    let previous = policy.status.as_ref().and_then(|s| s.replicas.as_deref());
    let events = replicas::replica_events(previous.unwrap_or(&[]), current);
    found
        .areas
        .extend(replicas::replicas_area(current, &targets.notes));
    found.replicas = Some(replicas::stable_statuses(rspec, previous, current.clone()));
    if policy.spec.effective_mode() != Mode::Apply {
        return events;
    }
    let secret_name = children::read_endpoint_secret_name(policy)
        .unwrap_or_else(|| format!("{}-read", policy.name_any()));
    let endpoint =
        read_endpoint::read_endpoint(rspec, current, &targets.url, &targets.replica_urls);
    let secret = children::read_endpoint_secret(policy, &secret_name, endpoint.secret_data());
    if let Err(e) =
        children::publish_read_endpoint(&ctx.client, ctx.secret_cache.as_ref(), policy, &secret)
            .await
    {
        found.areas.push(AreaState::failed(Area::Replicas, &e));
        gathered.error.get_or_insert(e);
    }
    events
}
