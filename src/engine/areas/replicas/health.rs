//! Replica health (pure): state and lag of each declared replica, from the primary's
//! senders and the replica's own probe; status, readiness and transitions for the
//! controller.

use super::*;

/// The health of one replica, as status reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub(crate) enum ReplicaState {
    /// In recovery and within its lag limits.
    Healthy,
    /// Over `maxLagSeconds` or `maxLagBytes`.
    Lagging,
    /// Could not be connected to within the timeout.
    Unreachable,
    /// Reachable but not a standby (promoted, or pointed at the wrong server).
    NotInRecovery,
    /// Not checked: nothing to connect with.
    Unknown,
}

impl ReplicaState {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ReplicaState::Healthy => "Healthy",
            ReplicaState::Lagging => "Lagging",
            ReplicaState::Unreachable => "Unreachable",
            ReplicaState::NotInRecovery => "NotInRecovery",
            ReplicaState::Unknown => "Unknown",
        }
    }
    /// The notice (and condition) reason of an unhealthy state.
    pub(crate) fn reason(self) -> Option<Reason> {
        match self {
            ReplicaState::Healthy => None,
            ReplicaState::Lagging => Some(Reason::ReplicaLagging),
            ReplicaState::Unreachable => Some(Reason::ReplicaUnreachable),
            ReplicaState::NotInRecovery => Some(Reason::ReplicaNotInRecovery),
            ReplicaState::Unknown => Some(Reason::ReplicaNotChecked),
        }
    }
}

/// Where a lag figure was measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) enum LagSource {
    /// `pg_stat_replication` on the primary.
    Primary,
    /// The replica's own replay position and timestamp.
    Replica,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ReplicaHealth {
    pub name: String,
    pub state: ReplicaState,
    pub lag_seconds: Option<f64>,
    pub lag_seconds_source: Option<LagSource>,
    pub lag_bytes: Option<i64>,
    pub lag_bytes_source: Option<LagSource>,
    pub slot: Option<String>,
    /// The WAL sender on the primary feeding this replica, when one could be matched.
    pub streaming: Option<String>,
    pub replay_paused: bool,
    pub checked_at: Option<String>,
    /// Why it is not healthy, for people.
    pub detail: Option<String>,
}

/// The WAL sender feeding a replica: through its slot (the slot's `active_pid`), else the
/// only sender whose `application_name` is the replica's name.
fn sender_for<'a>(
    replica: &ReplicaSpec,
    side: Option<&ReplicaSide>,
    observed: &'a Observed,
) -> Option<&'a Sender> {
    let slot_names = replica
        .slot
        .as_deref()
        .into_iter()
        .chain(side.and_then(|s| s.receiver_slot.as_deref()));
    for slot in slot_names {
        if let Some(pid) = observed.slots.get(slot).and_then(|s| s.active_pid) {
            if let Some(sender) = observed.senders.iter().find(|s| s.pid == pid) {
                return Some(sender);
            }
        }
    }
    let mut by_name = observed
        .senders
        .iter()
        .filter(|s| s.application_name == replica.name);
    match (by_name.next(), by_name.next()) {
        (Some(s), None) => Some(s),
        _ => None,
    }
}

/// A lag figure and where it was measured.
type Measured<T> = Option<(T, LagSource)>;

/// Lag in time and bytes, preferring what the primary measured: `replay_lag` comes from
/// the standby's own replies and does not grow while an idle primary writes nothing,
/// whereas the replica's last replay timestamp does. One exception: `replay_lag` is only
/// re-measured when replay moves, so while replay is paused behind received WAL it shows
/// the last (small) value; there the replica's replay age is the truth.
fn measure(
    sender: Option<&Sender>,
    side: Option<&ReplicaSide>,
    primary_lsn: Option<Lsn>,
) -> (Measured<f64>, Measured<i64>) {
    let caught_up_on_primary =
        sender.is_some_and(|s| matches!((s.replay_lsn, primary_lsn), (Some(r), Some(p)) if r >= p));
    let on_replica = side.and_then(|r| match (r.receive_lsn, r.replay_lsn) {
        // Everything received is replayed: behind only by what has not arrived, which
        // the byte lag shows; the replay timestamp would only measure idleness.
        (Some(recv), Some(replay)) if replay >= recv => Some((0.0, LagSource::Replica)),
        _ => r
            .last_replay_age_seconds
            .map(|v| (v.max(0.0), LagSource::Replica)),
    });
    let paused_behind = side.is_some_and(|r| {
        r.replay_paused == Some(true)
            && matches!((r.receive_lsn, r.replay_lsn), (Some(recv), Some(replay)) if replay < recv)
    });
    let seconds = match sender {
        _ if paused_behind && on_replica.is_some() => on_replica,
        Some(s) if s.replay_lag_seconds.is_some() => s
            .replay_lag_seconds
            .map(|v| (v.max(0.0), LagSource::Primary)),
        Some(_) if caught_up_on_primary => Some((0.0, LagSource::Primary)),
        _ => on_replica,
    };
    let bytes = match sender.and_then(|s| s.replay_lag_bytes) {
        Some(b) => Some((b.max(0), LagSource::Primary)),
        None => match (primary_lsn, side.and_then(|r| r.replay_lsn)) {
            (Some(p), Some(r)) => Some((p.bytes_since(r), LagSource::Replica)),
            _ => None,
        },
    };
    (seconds, bytes)
}

/// Each declared replica's health, from the primary's view and the replica's probe.
pub(crate) fn health(spec: &ReplicasSpec, observed: &Observed) -> Vec<ReplicaHealth> {
    spec.replicas
        .iter()
        .map(|replica| replica_health(replica, observed))
        .collect()
}

fn replica_health(replica: &ReplicaSpec, observed: &Observed) -> ReplicaHealth {
    let ReplicaSpec {
        name,
        connection_secret_ref: _,
        slot,
        max_lag_seconds,
        max_lag_bytes,
    } = replica;
    let probe = observed.probes.get(name);
    let side = match probe.map(|p| &p.result) {
        Some(ProbeResult::Reached(side)) => Some(side),
        _ => None,
    };
    let sender = sender_for(replica, side, observed);
    let (seconds, bytes) = measure(sender, side, observed.primary_lsn);
    let mut detail = None;
    let state = match probe.map(|p| &p.result) {
        None => {
            detail = Some("not checked: no connection URL for it".to_string());
            ReplicaState::Unknown
        }
        Some(ProbeResult::NotChecked { reason }) => {
            detail = Some(format!("not checked: {reason}"));
            ReplicaState::Unknown
        }
        Some(ProbeResult::Unreachable { message }) => {
            detail = Some(message.clone());
            ReplicaState::Unreachable
        }
        Some(ProbeResult::Reached(side)) if !side.in_recovery => {
            detail = Some(
                "the server is not in recovery (promoted, or not a standby): not a read replica"
                    .to_string(),
            );
            ReplicaState::NotInRecovery
        }
        Some(ProbeResult::Reached(_)) => {
            let mut over = Vec::new();
            if let (Some(max), Some((lag, _))) = (max_lag_seconds, seconds) {
                if lag > f64::from(*max) {
                    over.push(format!("replay lag {lag:.1}s exceeds maxLagSeconds {max}"));
                }
            }
            if let (Some(max), Some((lag, _))) = (max_lag_bytes, bytes) {
                if u64::try_from(lag).unwrap_or(0) > *max {
                    over.push(format!(
                        "replay lag {} ({lag} bytes) exceeds maxLagBytes {max}",
                        human_bytes(lag)
                    ));
                }
            }
            if over.is_empty() {
                ReplicaState::Healthy
            } else {
                detail = Some(over.join("; "));
                ReplicaState::Lagging
            }
        }
    };
    let replay_paused = side.and_then(|s| s.replay_paused).unwrap_or(false);
    if replay_paused {
        let note = "replay is paused on the replica (pg_wal_replay_resume() resumes it)";
        detail = Some(match detail {
            Some(d) => format!("{d}; {note}"),
            None => note.to_string(),
        });
    }
    ReplicaHealth {
        name: name.clone(),
        state,
        lag_seconds: seconds.map(|(v, _)| v),
        lag_seconds_source: seconds.map(|(_, s)| s),
        lag_bytes: bytes.map(|(v, _)| v),
        lag_bytes_source: bytes.map(|(_, s)| s),
        slot: slot.clone(),
        streaming: sender.map(|s| {
            format!(
                "pid {} from {} ({})",
                s.pid,
                s.client_addr.as_deref().unwrap_or("local socket"),
                s.state.as_deref().unwrap_or("state hidden")
            )
        }),
        replay_paused,
        checked_at: probe.and_then(|p| p.checked_at.clone()),
        detail,
    }
}

/// Per-replica status for `status.replicas`. Lag seconds are rounded to milliseconds.
pub(crate) fn status(spec: &ReplicasSpec, observed: &Observed) -> Vec<ReplicaStatus> {
    health(spec, observed).iter().map(to_status).collect()
}

pub(crate) fn to_status(h: &ReplicaHealth) -> ReplicaStatus {
    ReplicaStatus {
        name: h.name.clone(),
        state: h.state.as_str().to_string(),
        lag_seconds: h.lag_seconds.map(|s| (s * 1000.0).round() / 1000.0),
        lag_bytes: h.lag_bytes,
        slot: h.slot.clone(),
        last_check_time: h.checked_at.clone(),
    }
}

/// What the `ReplicasReady` condition says: `Ok` when every replica is healthy, else the
/// reason of the worst state (`ReplicaNotInRecovery` > `ReplicaUnreachable` >
/// `ReplicaLagging` > `ReplicaNotChecked`) and a message naming every unhealthy replica.
pub(crate) fn readiness(statuses: &[ReplicaStatus]) -> Result<(), (Reason, String)> {
    let unhealthy: Vec<(ReplicaState, &ReplicaStatus)> = statuses
        .iter()
        .map(|s| (parse_state(&s.state), s))
        .filter(|(state, _)| *state != ReplicaState::Healthy)
        .collect();
    let rank = |s: ReplicaState| match s {
        ReplicaState::NotInRecovery => 4,
        ReplicaState::Unreachable => 3,
        ReplicaState::Lagging => 2,
        ReplicaState::Unknown => 1,
        ReplicaState::Healthy => 0,
    };
    let Some(worst) = unhealthy.iter().map(|(s, _)| *s).max_by_key(|s| rank(*s)) else {
        return Ok(());
    };
    let message = unhealthy
        .iter()
        .map(|(state, s)| format!("{} is {}", s.name, state.as_str()))
        .collect::<Vec<_>>()
        .join(", ");
    Err((worst.reason().unwrap_or(Reason::ReplicaNotChecked), message))
}

fn parse_state(s: &str) -> ReplicaState {
    [
        ReplicaState::Healthy,
        ReplicaState::Lagging,
        ReplicaState::Unreachable,
        ReplicaState::NotInRecovery,
    ]
    .into_iter()
    .find(|st| st.as_str() == s)
    .unwrap_or(ReplicaState::Unknown)
}

/// A replica whose state changed between two checks (for Events: "crossed its lag limit",
/// "unreachable", "healthy again").
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Transition {
    pub name: String,
    /// None when the replica was not in the previous status.
    pub from: Option<String>,
    pub to: String,
    /// Whether it became healthy (a Normal event) or stopped being (a Warning).
    pub healthy: bool,
}

/// The replicas whose state changed from `previous` to `current`. A replica first seen
/// is a transition only when it is not healthy (nothing to tell about a healthy start).
pub(crate) fn transitions(
    previous: &[ReplicaStatus],
    current: &[ReplicaStatus],
) -> Vec<Transition> {
    current
        .iter()
        .filter_map(|now| {
            let before = previous.iter().find(|p| p.name == now.name);
            let healthy = now.state == ReplicaState::Healthy.as_str();
            match before {
                Some(b) if b.state == now.state => None,
                None if healthy => None,
                _ => Some(Transition {
                    name: now.name.clone(),
                    from: before.map(|b| b.state.clone()),
                    to: now.state.clone(),
                    healthy,
                }),
            }
        })
        .collect()
}

/// A lag in bytes (negative: none).
pub(crate) fn human_bytes(n: i64) -> String {
    crate::units::bytes(n.max(0) as u64)
}
