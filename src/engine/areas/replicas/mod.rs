//! Replicas: the physical replication slots a policy keeps on the primary, the health and
//! lag of each declared replica (the read endpoint the operator publishes from that health
//! is [`crate::controller::read_endpoint`]).
//!
//! The primary is observed with two queries whatever the number of replicas or slots (one
//! over `pg_replication_slots`, one over `pg_stat_replication`). What the replicas say
//! about themselves is probed by [`crate::engine::replica_health`] (I/O on other
//! servers) and handed in as [`Probe`]s: everything here is pure.
//!
//! Slots are created with their WAL reserved at once and recorded in the ledger; only
//! slots the ledger says this policy created are ever dropped, and only as destructive
//! changes. Slots the policy did not create are never touched, but every inactive slot
//! that retains WAL is reported loudly: it keeps WAL until the disk fills.

use std::collections::{BTreeMap, BTreeSet};

use sqlx::PgConnection;

use crate::api::{ReplicaSpec, ReplicaStatus, ReplicasSpec};
use crate::engine::areas::{AreaModule, Facts, ObserveContext, ObserveError, PlanContext};
use crate::engine::ledger::Ledger;
use crate::engine::plan::{Area, AreaPlan, Change, Hazard};
use crate::pg::quote_literal;
use crate::reason::Reason;

const AREA: Area = Area::Replicas;
/// Ledger item of a slot; the ledger target is the slot name.
pub(crate) const OWNED_SLOT: &str = "physicalSlot";

mod health;
mod observe;
mod slots;

pub(crate) use health::*;
pub(crate) use observe::*;
pub(crate) use slots::*;

/// Replicas: the primary's physical slots for them, and their health (probed on the
/// replicas themselves, see [`crate::engine::replica_health`]).
pub struct Replicas;

impl AreaModule for Replicas {
    const AREA: Area = AREA;
    const RESETS_WHEN_REMOVED: bool = true;
    type Spec = ReplicasSpec;
    type Observed = Observed;
    type Op = Op;

    fn section(spec: &crate::api::DatabasePolicySpec) -> Option<&ReplicasSpec> {
        spec.replicas.as_ref()
    }

    /// The primary's slots and senders, then the probes of the replicas (started before
    /// the run took its lock; none when the front has no URLs for them).
    async fn observe(
        conn: &mut PgConnection,
        _section: &ReplicasSpec,
        mut ctx: ObserveContext<'_>,
    ) -> Result<Observed, ObserveError> {
        let mut observed = observe(conn).await?;
        if let Some(probes) = ctx.probes().await {
            observed.probes = probes;
        }
        Ok(observed)
    }

    fn diff(
        section: &ReplicasSpec,
        observed: &Observed,
        ctx: &PlanContext<'_>,
        plan: &mut AreaPlan,
    ) -> Vec<Op> {
        diff(section, observed, ctx.ledger, plan)
    }

    fn render(_: &ReplicasSpec, op: &Op) -> Vec<Change> {
        vec![render(op)]
    }

    fn simulate(_: &ReplicasSpec, observed: &Observed, ops: &[Op]) -> Observed {
        simulate(observed, ops)
    }

    /// Refused on a standby; replica health as notices.
    fn plan(section: &ReplicasSpec, observed: &Observed, ctx: &mut PlanContext<'_>) -> AreaPlan {
        plan(section, observed, ctx.ledger)
    }

    /// Replica health for status; the WAL each slot retains, for metrics, whether or not
    /// the spec still has replicas.
    fn facts(section: Option<&ReplicasSpec>, observed: &Observed, facts: &mut Facts) {
        facts.replicas = section.map(|s| status(s, observed));
        facts.slot_retained_bytes = Some(
            observed
                .slots
                .iter()
                .filter_map(|(name, slot)| slot.retained_bytes.map(|b| (name.clone(), b)))
                .collect(),
        );
    }
}

#[cfg(test)]
mod tests;
