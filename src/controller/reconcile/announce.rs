//! Step 7, the Events of what the run did, once status is written: drift (repaired or
//! not), a change set applied, destructive changes refused, replicas whose state changed.

use kube::runtime::events::EventType;
use tracing::info;

use super::publish_replicas::ReplicaEvent;
use super::update_status::Written;
use crate::api::{DatabasePolicy, Mode};
use crate::controller::context::Context;
use crate::controller::events;
use crate::engine::{Change, Outcome};
use crate::reason::Reason;

pub(super) async fn announce(
    ctx: &Context,
    policy: &DatabasePolicy,
    outcome: &Outcome,
    written: &Written,
    replica_events: Vec<ReplicaEvent>,
) {
    let mode = policy.spec.effective_mode();
    if !written.applied.is_empty() {
        let total: usize = written.applied.values().sum();
        info!(changes = total, "applied");
    }
    // Drift gets one Event naming what drifted and whether it was repaired (a Warning
    // when row-level security had been weakened); other change sets an `Applied` one.
    let note = if !written.drifted.is_empty() {
        let drifted: Vec<&Change> = outcome
            .plan
            .changes()
            .filter(|c| written.drifted.contains(&c.area))
            .collect();
        let repaired = mode == Mode::Apply
            && outcome
                .report
                .as_ref()
                .is_some_and(|r| r.succeeded() && r.refused.is_empty());
        Some((events::drift(&drifted, repaired), repaired))
    } else if !written.applied.is_empty() {
        let changes: Vec<&Change> = outcome
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
        ctx.publish(policy, n.type_, n.reason, "Apply", n.note, distinct)
            .await;
    }
    if let Some(report) = &outcome.report {
        if !report.refused.is_empty() {
            ctx.publish(
                policy,
                EventType::Warning,
                Reason::DestructiveChangesRefused,
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
        ctx.publish(policy, type_, reason, "CheckReplicas", note, true)
            .await;
    }
}
