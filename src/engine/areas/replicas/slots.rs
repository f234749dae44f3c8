//! Physical replication slots (pure): created for declared replicas with WAL reserved,
//! dropped only when the ledger says this policy created them.

use super::*;

/// A difference to close.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    CreateSlot { name: String },
    DropSlot { name: String },
}

/// Slot names PostgreSQL accepts (`ReplicationSlotValidateName`).
fn valid_slot_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// The slot changes, and the problems that block them.
pub(crate) fn diff(
    spec: &ReplicasSpec,
    observed: &Observed,
    ledger: &Ledger,
    plan: &mut AreaPlan,
) -> Vec<Op> {
    let mut ops = Vec::new();
    let mut declared: BTreeMap<&str, &str> = BTreeMap::new();
    for replica in &spec.replicas {
        let Some(slot) = replica.slot.as_deref() else {
            continue;
        };
        if !valid_slot_name(slot) {
            plan.error(
                slot,
                Reason::InvalidSlotName,
                format!(
                    "replica {}: slot name {slot:?} must be 1-63 lower-case letters, digits and underscores",
                    replica.name
                ),
            );
            continue;
        }
        if let Some(other) = declared.insert(slot, &replica.name) {
            plan.error(
                slot,
                Reason::DuplicateSlot,
                format!(
                    "replicas {other} and {} both declare slot {slot}: a slot feeds one standby",
                    replica.name
                ),
            );
            continue;
        }
        match observed.slots.get(slot) {
            None => ops.push(Op::CreateSlot {
                name: slot.to_string(),
            }),
            Some(s) if s.slot_type != "physical" => plan.error(
                slot,
                Reason::SlotTypeMismatch,
                format!(
                    "replica {}: slot {slot} exists but is a {} slot, not a physical one; it was not created by this policy and is left alone",
                    replica.name, s.slot_type
                ),
            ),
            Some(s) if s.wal_status.as_deref() == Some("lost") => plan.notice(
                slot,
                Reason::SlotLost,
                format!(
                    "slot {slot} of replica {} has lost WAL the standby still needs: the standby must be rebuilt (pg_basebackup)",
                    replica.name
                ),
            ),
            Some(_) => {}
        }
    }
    // Slots this policy created and no longer declares.
    let owned: BTreeSet<&str> = ledger
        .items(AREA)
        .filter(|(_, item)| *item == OWNED_SLOT)
        .map(|(target, _)| target)
        .collect();
    for name in owned {
        if declared.contains_key(name) {
            continue;
        }
        match observed.slots.get(name) {
            // Gone already (dropped by hand): nothing to do.
            None => {}
            Some(s) if s.active => plan.notice(
                name,
                Reason::SlotInUse,
                format!(
                    "slot {name} is no longer declared but a standby streams through it (pid {}): it is dropped once the standby stops using it",
                    s.active_pid.map_or("?".to_string(), |p| p.to_string())
                ),
            ),
            Some(_) => ops.push(Op::DropSlot {
                name: name.to_string(),
            }),
        }
    }
    ops
}

/// Loud notices for inactive slots that keep WAL: any slot, declared or not, created by
/// this policy or not (the disk fills all the same).
fn inactive_slot_notices(observed: &Observed, plan: &mut AreaPlan) {
    for (name, slot) in &observed.slots {
        let Some(bytes) = slot.retained_bytes.filter(|b| *b > 0) else {
            continue;
        };
        if slot.active {
            continue;
        }
        plan.notice(
            name.clone(),
            Reason::InactiveSlotRetainingWal,
            format!(
                "WARNING: inactive {} replication slot {name} retains {} ({bytes} bytes) of WAL (wal_status {}): WAL is kept until a consumer uses the slot, and can fill the disk; attach its standby, or drop the slot if it is abandoned",
                slot.slot_type,
                human_bytes(bytes),
                slot.wal_status.as_deref().unwrap_or("unknown"),
            ),
        );
    }
}

pub(crate) fn render(op: &Op) -> Change {
    match op {
        // Slot creation is not undone by a rollback: run it alone, then record it.
        Op::CreateSlot { name } => Change::new(
            AREA,
            name.clone(),
            "create physical replication slot (WAL reserved now)",
            format!(
                "SELECT pg_create_physical_replication_slot({}, true)",
                quote_literal(name)
            ),
        )
        .autonomous()
        .record(OWNED_SLOT),
        Op::DropSlot { name } => Change::new(
            AREA,
            name.clone(),
            "drop replication slot no longer declared (its standby must resync from scratch)",
            format!("SELECT pg_drop_replication_slot({})", quote_literal(name)),
        )
        .autonomous()
        .hazard(Hazard::Destructive)
        .forget(OWNED_SLOT),
    }
}

/// Slot changes plus notices: inactive slots retaining WAL and replicas not healthy.
pub(crate) fn plan(spec: &ReplicasSpec, observed: &Observed, ledger: &Ledger) -> AreaPlan {
    let mut plan = AreaPlan::new(AREA);
    if observed.primary_in_recovery {
        plan.error(
            "primary",
            Reason::PrimaryInRecovery,
            "the policy's database is in recovery (a standby): slots and replica lag are managed on the primary",
        );
        return plan;
    }
    let ops = diff(spec, observed, ledger, &mut plan);
    plan.changes = ops.iter().map(render).collect();
    inactive_slot_notices(observed, &mut plan);
    for h in health(spec, observed) {
        if let Some(reason) = h.state.reason() {
            plan.notice(
                h.name.clone(),
                reason,
                format!(
                    "replica {} is {}: {}{}",
                    h.name,
                    h.state.as_str(),
                    h.detail.as_deref().unwrap_or("no detail"),
                    lag_text(&h)
                ),
            );
        }
    }
    plan
}

fn lag_text(h: &ReplicaHealth) -> String {
    let mut parts = Vec::new();
    if let Some(s) = h.lag_seconds {
        parts.push(format!("{s:.1}s"));
    }
    if let Some(b) = h.lag_bytes {
        parts.push(format!("{b} bytes"));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!(" (lag {})", parts.join(", "))
    }
}

/// The slots as they will be after `ops` (for tests of convergence).
pub(crate) fn simulate(observed: &Observed, ops: &[Op]) -> Observed {
    let mut next = observed.clone();
    for op in ops {
        match op {
            Op::CreateSlot { name } => {
                next.slots.insert(
                    name.clone(),
                    Slot {
                        slot_type: "physical".into(),
                        wal_status: Some("reserved".into()),
                        retained_bytes: Some(0),
                        ..Default::default()
                    },
                );
            }
            Op::DropSlot { name } => {
                next.slots.remove(name);
            }
        }
    }
    next
}
