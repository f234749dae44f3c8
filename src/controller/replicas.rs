//! Pure steps of the replicas area on the controller's side: `status.replicas` without churn, the `ReplicasReady` condition and the Events of state changes. No URL ever reaches these.

use std::collections::BTreeMap;

use kube::runtime::events::EventType;

use super::status::{AreaState, Status};
use crate::api::{ReplicaStatus, ReplicasSpec};
use crate::engine::areas::replicas::{readiness, transitions, ReplicaState};
use crate::engine::Area;
use crate::reason::Reason;

/// Smallest lag changes worth a status write: lag moves on every check of a live replica,
/// and every status write wakes the controller again.
const MIN_SECONDS_STEP: f64 = 1.0;
const MIN_BYTES_STEP: i64 = 1 << 20;

fn moved_f(a: Option<f64>, b: Option<f64>, step: f64) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => (a - b).abs() >= step,
        (None, None) => false,
        _ => true,
    }
}

fn moved_i(a: Option<i64>, b: Option<i64>, step: i64) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => (a - b).abs() >= step,
        (None, None) => false,
        _ => true,
    }
}

/// `status.replicas` without churn: a replica's entry (lag figures and the
/// `lastCheckTime` of the check that measured them) is only replaced when its state or
/// slot changed, or its lag moved by a step worth telling: a tenth of its limit, at least
/// 1 s or 1 MiB. Otherwise the previous entry stays as it was, so a steady state writes
/// the same status. The state itself is always current.
pub(crate) fn stable_statuses(
    spec: &ReplicasSpec,
    previous: Option<&[ReplicaStatus]>,
    current: Vec<ReplicaStatus>,
) -> Vec<ReplicaStatus> {
    current
        .into_iter()
        .map(|now| {
            let Some(before) = previous.into_iter().flatten().find(|p| p.name == now.name) else {
                return now;
            };
            let replica = spec.replicas.iter().find(|r| r.name == now.name);
            let seconds_step = replica
                .and_then(|r| r.max_lag_seconds)
                .map_or(MIN_SECONDS_STEP, |m| {
                    (f64::from(m) / 10.0).max(MIN_SECONDS_STEP)
                });
            let bytes_step = replica
                .and_then(|r| r.max_lag_bytes)
                .map_or(MIN_BYTES_STEP, |m| {
                    (i64::try_from(m / 10).unwrap_or(i64::MAX)).max(MIN_BYTES_STEP)
                });
            let changed = before.state != now.state
                || before.slot != now.slot
                || moved_f(before.lag_seconds, now.lag_seconds, seconds_step)
                || moved_i(before.lag_bytes, now.lag_bytes, bytes_step);
            if changed {
                now
            } else {
                before.clone()
            }
        })
        .collect()
}

/// `ReplicasReady` from replica health, when not all are healthy: False for a replica
/// lagging, unreachable or promoted; Unknown when some could only not be checked (no
/// Secret for it). `notes` says why a replica was not checked. None: all healthy, the
/// engine's state of the area (its slots) stands.
pub(crate) fn replicas_area(
    statuses: &[ReplicaStatus],
    notes: &BTreeMap<String, String>,
) -> Option<AreaState> {
    let (reason, message) = readiness(statuses).err()?;
    let mut message = message;
    if !notes.is_empty() {
        let why: Vec<String> = notes.iter().map(|(n, w)| format!("{n}: {w}")).collect();
        message = format!("{message} ({})", why.join("; "));
    }
    Some(AreaState {
        area: Area::Replicas,
        status: if reason == Reason::ReplicaNotChecked {
            Status::Unknown
        } else {
            Status::False
        },
        reason,
        message,
    })
}

/// One Event per replica whose state changed: a Warning with the state's reason
/// (`ReplicaLagging` when it crossed its lag limit), a Normal `ReplicaHealthy` when it
/// recovered.
pub(crate) fn replica_events(
    previous: &[ReplicaStatus],
    current: &[ReplicaStatus],
) -> Vec<(EventType, Reason, String)> {
    transitions(previous, current)
        .into_iter()
        .map(|t| {
            let from = t.from.as_deref().unwrap_or("not seen before");
            if t.healthy {
                (
                    EventType::Normal,
                    Reason::ReplicaHealthy,
                    format!("replica {} is Healthy again (was {from})", t.name),
                )
            } else {
                let state = current
                    .iter()
                    .find(|c| c.name == t.name)
                    .map(describe)
                    .unwrap_or_default();
                let reason = [
                    ReplicaState::Lagging,
                    ReplicaState::Unreachable,
                    ReplicaState::NotInRecovery,
                ]
                .into_iter()
                .find(|s| s.as_str() == t.to)
                .and_then(|s| s.reason())
                .unwrap_or(Reason::ReplicaNotChecked);
                (
                    EventType::Warning,
                    reason,
                    format!("replica {} is {} (was {from}){state}", t.name, t.to),
                )
            }
        })
        .collect()
}

fn describe(s: &ReplicaStatus) -> String {
    let mut parts = Vec::new();
    if let Some(l) = s.lag_seconds {
        parts.push(format!("{l:.1}s"));
    }
    if let Some(b) = s.lag_bytes {
        parts.push(format!("{b} bytes"));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!(": replay lag {}", parts.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ReplicaSpec;

    fn st(
        name: &str,
        state: &str,
        lag: Option<f64>,
        bytes: Option<i64>,
        at: &str,
    ) -> ReplicaStatus {
        ReplicaStatus {
            name: name.into(),
            state: state.into(),
            lag_seconds: lag,
            lag_bytes: bytes,
            slot: None,
            last_check_time: Some(at.into()),
        }
    }

    fn spec() -> ReplicasSpec {
        ReplicasSpec {
            replicas: vec![ReplicaSpec {
                name: "r1".into(),
                max_lag_seconds: Some(30),
                max_lag_bytes: Some(64 << 20),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn small_lag_moves_keep_the_previous_entry() {
        let before = vec![st("r1", "Healthy", Some(0.2), Some(1200), "t1")];
        let now = vec![st("r1", "Healthy", Some(1.9), Some(900_000), "t2")];
        assert_eq!(
            stable_statuses(&spec(), Some(&before), now),
            before,
            "under 3 s and 6.4 MiB"
        );
        let now = vec![st("r1", "Healthy", Some(4.0), Some(900_000), "t2")];
        assert_eq!(stable_statuses(&spec(), Some(&before), now.clone()), now);
        let now = vec![st("r1", "Lagging", Some(0.2), Some(1200), "t2")];
        assert_eq!(
            stable_statuses(&spec(), Some(&before), now.clone()),
            now,
            "a state change"
        );
        let now = vec![st("r1", "Healthy", Some(0.3), None, "t2")];
        assert_eq!(
            stable_statuses(&spec(), Some(&before), now.clone()),
            now,
            "a figure gone"
        );
        assert_eq!(stable_statuses(&spec(), None, now.clone()), now);
    }

    #[test]
    fn readiness_is_false_unless_replicas_could_only_not_be_checked() {
        assert_eq!(
            replicas_area(&[st("r1", "Healthy", None, None, "t")], &BTreeMap::new()),
            None
        );
        let notes = BTreeMap::from([(
            "r2".to_string(),
            "Secret default/r2-db not found".to_string(),
        )]);
        let a = replicas_area(
            &[
                st("r1", "Healthy", None, None, "t"),
                st("r2", "Unknown", None, None, "t"),
            ],
            &notes,
        )
        .unwrap();
        assert_eq!(
            (a.status, a.reason.as_str()),
            (Status::Unknown, "ReplicaNotChecked")
        );
        assert!(
            a.message.contains("r2 is Unknown")
                && a.message.contains("Secret default/r2-db not found"),
            "{}",
            a.message
        );
        let a = replicas_area(
            &[
                st("r1", "Lagging", Some(40.0), None, "t"),
                st("r2", "Unknown", None, None, "t"),
            ],
            &notes,
        )
        .unwrap();
        assert_eq!(
            (a.status, a.reason.as_str()),
            (Status::False, "ReplicaLagging")
        );
    }

    #[test]
    fn crossing_the_lag_limit_is_a_warning_and_recovery_a_normal_event() {
        let healthy = vec![st("r1", "Healthy", Some(0.1), Some(0), "t1")];
        let lagging = vec![st("r1", "Lagging", Some(42.0), Some(80 << 20), "t2")];
        let events = replica_events(&healthy, &lagging);
        assert_eq!(events.len(), 1);
        let (ty, reason, note) = &events[0];
        assert_eq!((ty, *reason), (&EventType::Warning, Reason::ReplicaLagging));
        assert_eq!(
            note,
            "replica r1 is Lagging (was Healthy): replay lag 42.0s, 83886080 bytes"
        );
        let events = replica_events(&lagging, &healthy);
        assert_eq!(
            (&events[0].0, events[0].1),
            (&EventType::Normal, Reason::ReplicaHealthy)
        );
        assert!(replica_events(&healthy, &healthy).is_empty());
        assert!(
            replica_events(&[], &healthy).is_empty(),
            "a healthy start is no news"
        );
        let down = vec![st("r1", "Unreachable", None, None, "t3")];
        assert_eq!(replica_events(&healthy, &down)[0].1, "ReplicaUnreachable");
    }
}
