//! Per-policy metrics (labels `namespace`, `policy`): what each reconcile found, as
//! numbers to alert on. [`snapshot`] is pure (status and findings in, figures out);
//! [`PolicyMetrics::record`] replaces the policy's series with it, removing those that no
//! longer apply (a replica taken out of the spec, an area with nothing pending), and
//! [`PolicyMetrics::forget`] removes all of a deleted policy's series.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::Hash;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use super::metrics::PresentFromStart;
use crate::api::{DatabasePolicySpec, DatabasePolicyStatus, ReplicaStatus};
use crate::engine::{Area, Change};

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct PolicyLabels {
    pub namespace: String,
    pub policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct PendingLabels {
    pub namespace: String,
    pub policy: String,
    pub area: String,
    pub hazard: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct AreaLabels {
    pub namespace: String,
    pub policy: String,
    pub area: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct ReplicaLabels {
    pub namespace: String,
    pub policy: String,
    pub replica: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct SlotLabels {
    pub namespace: String,
    pub policy: String,
    pub slot: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// One replica's figures; None where not measured (unreachable) or not set in the spec.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct ReplicaFigures {
    pub lag_seconds: Option<f64>,
    pub lag_bytes: Option<i64>,
    pub max_lag_seconds: Option<f64>,
    pub max_lag_bytes: Option<i64>,
}

/// The backups' figures; None where there is nothing to say yet.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct BackupFigures {
    pub last_success_seconds: Option<f64>,
    pub last_size_bytes: Option<i64>,
    /// The interval of `spec.backups.schedule` (its two latest firings apart).
    pub interval_seconds: Option<f64>,
}

/// What one reconcile found about a policy, in numbers. A `None` part was not observed
/// at this check (the database was not reachable): its series stay as last exported.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Snapshot {
    pub ready: bool,
    /// Changes not carried out, by (area, hazard); only non-zero counts.
    pub pending: Option<BTreeMap<(String, String), i64>>,
    pub replicas: Option<BTreeMap<String, ReplicaFigures>>,
    /// WAL retained by each replication slot of the server, in bytes.
    pub slots: Option<BTreeMap<String, i64>>,
    /// None: the spec has no backups (no series).
    pub backups: Option<BackupFigures>,
}

/// The figures of a policy from the status just written and what the run found.
/// `pending` and `replicas`/`slots` are None when the database was not observed.
pub(crate) fn snapshot(
    spec: &DatabasePolicySpec,
    status: &DatabasePolicyStatus,
    pending: Option<&[Change]>,
    replicas: Option<&[ReplicaStatus]>,
    slots: Option<&BTreeMap<String, i64>>,
    now: k8s_openapi::jiff::Timestamp,
) -> Snapshot {
    let ready = status
        .conditions
        .iter()
        .any(|c| c.type_ == super::status::READY && c.status == "True");
    let pending = pending.map(|changes| {
        let mut m = BTreeMap::new();
        for c in changes {
            *m.entry((c.area.as_str().to_string(), c.hazard.as_str().to_string()))
                .or_insert(0) += 1;
        }
        m
    });
    let replicas: Option<BTreeMap<String, ReplicaFigures>> =
        spec.replicas.as_ref().and_then(|rspec| {
            let found = replicas?;
            Some(
                rspec
                    .replicas
                    .iter()
                    .map(|r| {
                        let s = found.iter().find(|s| s.name == r.name);
                        let figures = ReplicaFigures {
                            lag_seconds: s.and_then(|s| s.lag_seconds),
                            lag_bytes: s.and_then(|s| s.lag_bytes),
                            max_lag_seconds: r.max_lag_seconds.map(f64::from),
                            max_lag_bytes: r.max_lag_bytes.and_then(|b| i64::try_from(b).ok()),
                        };
                        (r.name.clone(), figures)
                    })
                    .collect(),
            )
        });
    let backups = spec.backups.as_ref().map(|b| {
        let found = status.backups.as_ref();
        BackupFigures {
            last_success_seconds: found
                .and_then(|f| f.last_success_time.as_deref())
                .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
                .map(|t| t.as_second() as f64),
            last_size_bytes: found.and_then(|f| f.newest_backup_bytes),
            interval_seconds: super::backups::window(&b.schedule, now)
                .map(|w| w.as_secs_f64() / 2.0),
        }
    });
    Snapshot {
        ready,
        pending,
        replicas,
        slots: slots.cloned(),
        backups,
    }
}

/// The label sets a policy has exported, to remove those that no longer apply.
#[derive(Debug, Default)]
struct Exported {
    pending: BTreeSet<PendingLabels>,
    replicas: BTreeSet<ReplicaLabels>,
    slots: BTreeSet<SlotLabels>,
    drift: BTreeSet<AreaLabels>,
}

#[derive(Clone, Debug, Default)]
pub struct PolicyMetrics {
    pub ready: Family<PolicyLabels, Gauge>,
    pub pending: Family<PendingLabels, Gauge>,
    pub drift: Family<AreaLabels, Counter>,
    pub drift_notifications: Family<PolicyLabels, Counter>,
    pub replica_lag_seconds: Family<ReplicaLabels, FloatGauge>,
    pub replica_lag_bytes: Family<ReplicaLabels, Gauge>,
    pub replica_max_lag_seconds: Family<ReplicaLabels, FloatGauge>,
    pub replica_max_lag_bytes: Family<ReplicaLabels, Gauge>,
    pub slot_retained: Family<SlotLabels, Gauge>,
    pub backup_last_success: Family<PolicyLabels, FloatGauge>,
    pub backup_last_size: Family<PolicyLabels, Gauge>,
    pub backup_interval: Family<PolicyLabels, FloatGauge>,
    exported: Arc<Mutex<HashMap<PolicyLabels, Exported>>>,
}

/// Sets `value` on `labels`, or removes the series when there is no value.
fn set_or_remove<S, N, A>(family: &Family<S, Gauge<N, A>>, labels: &S, value: Option<N>)
where
    S: Clone + Hash + Eq,
    Gauge<N, A>: Default,
    A: prometheus_client::metrics::gauge::Atomic<N>,
{
    match value {
        Some(v) => {
            family.get_or_create(labels).set(v);
        }
        None => {
            family.remove(labels);
        }
    }
}

impl PolicyMetrics {
    pub(crate) fn register(&self, registry: &mut Registry) {
        registry.register(
            "policy_ready",
            "1 when the policy's Ready condition is True, else 0",
            PresentFromStart(self.ready.clone()),
        );
        registry.register(
            "policy_pending_changes",
            "Changes found but not carried out (Plan mode, refused, not attempted), by area and hazard",
            PresentFromStart(self.pending.clone()),
        );
        registry.register(
            "drift_detected",
            "Checks that found a database differing from a policy it had converged to, by policy and area",
            PresentFromStart(self.drift.clone()),
        );
        registry.register(
            "drift_notifications",
            "Checks of a policy asked for by its database's drift event trigger (spec.driftDetection.eventTrigger), after debouncing",
            PresentFromStart(self.drift_notifications.clone()),
        );
        registry.register_with_unit(
            "replica_lag",
            "Replay lag of a replica, as last measured",
            Unit::Seconds,
            PresentFromStart(self.replica_lag_seconds.clone()),
        );
        registry.register_with_unit(
            "replica_lag",
            "WAL not yet replayed by a replica, as last measured",
            Unit::Bytes,
            PresentFromStart(self.replica_lag_bytes.clone()),
        );
        registry.register_with_unit(
            "replica_max_lag",
            "spec.replicas[].maxLagSeconds: above it the replica is Lagging",
            Unit::Seconds,
            PresentFromStart(self.replica_max_lag_seconds.clone()),
        );
        registry.register_with_unit(
            "replica_max_lag",
            "spec.replicas[].maxLagBytes: above it the replica is Lagging",
            Unit::Bytes,
            PresentFromStart(self.replica_max_lag_bytes.clone()),
        );
        registry.register_with_unit(
            "slot_retained_wal",
            "WAL a replication slot of the server keeps from being removed",
            Unit::Bytes,
            PresentFromStart(self.slot_retained.clone()),
        );
        registry.register_with_unit(
            "backup_last_success_timestamp",
            "When the newest successful backup finished (Unix time)",
            Unit::Seconds,
            PresentFromStart(self.backup_last_success.clone()),
        );
        registry.register_with_unit(
            "backup_last_size",
            "Size of the newest successful backup",
            Unit::Bytes,
            PresentFromStart(self.backup_last_size.clone()),
        );
        registry.register_with_unit(
            "backup_schedule_interval",
            "Time between two runs of spec.backups.schedule",
            Unit::Seconds,
            PresentFromStart(self.backup_interval.clone()),
        );
    }

    fn exported(&self) -> std::sync::MutexGuard<'_, HashMap<PolicyLabels, Exported>> {
        self.exported.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a check that found drift in `area` of the policy.
    pub(crate) fn drifted(&self, namespace: &str, policy: &str, area: Area) {
        let labels = AreaLabels {
            namespace: namespace.into(),
            policy: policy.into(),
            area: area.as_str().into(),
        };
        self.drift.get_or_create(&labels).inc();
        let key = PolicyLabels {
            namespace: namespace.into(),
            policy: policy.into(),
        };
        self.exported().entry(key).or_default().drift.insert(labels);
    }

    /// Counts a check of the policy asked for by a drift notification.
    pub(crate) fn drift_notified(&self, namespace: &str, policy: &str) {
        let key = PolicyLabels {
            namespace: namespace.into(),
            policy: policy.into(),
        };
        self.drift_notifications.get_or_create(&key).inc();
    }

    /// Replaces the policy's series with `snap`.
    pub(crate) fn record(&self, namespace: &str, policy: &str, snap: &Snapshot) {
        let key = PolicyLabels {
            namespace: namespace.into(),
            policy: policy.into(),
        };
        let mut all = self.exported();
        let exported = all.entry(key.clone()).or_default();
        self.ready.get_or_create(&key).set(i64::from(snap.ready));

        if let Some(pending) = &snap.pending {
            let now: BTreeSet<PendingLabels> = pending
                .iter()
                .map(|((area, hazard), n)| {
                    let l = PendingLabels {
                        namespace: namespace.into(),
                        policy: policy.into(),
                        area: area.clone(),
                        hazard: hazard.clone(),
                    };
                    self.pending.get_or_create(&l).set(*n);
                    l
                })
                .collect();
            for gone in exported.pending.difference(&now) {
                self.pending.remove(gone);
            }
            exported.pending = now;
        }

        if let Some(replicas) = &snap.replicas {
            let mut now = BTreeSet::new();
            for (name, f) in replicas {
                let l = ReplicaLabels {
                    namespace: namespace.into(),
                    policy: policy.into(),
                    replica: name.clone(),
                };
                set_or_remove(&self.replica_lag_seconds, &l, f.lag_seconds);
                set_or_remove(&self.replica_lag_bytes, &l, f.lag_bytes);
                set_or_remove(&self.replica_max_lag_seconds, &l, f.max_lag_seconds);
                set_or_remove(&self.replica_max_lag_bytes, &l, f.max_lag_bytes);
                now.insert(l);
            }
            for gone in exported.replicas.difference(&now) {
                self.remove_replica(gone);
            }
            exported.replicas = now;
        }

        if let Some(slots) = &snap.slots {
            let now: BTreeSet<SlotLabels> = slots
                .iter()
                .map(|(slot, bytes)| {
                    let l = SlotLabels {
                        namespace: namespace.into(),
                        policy: policy.into(),
                        slot: slot.clone(),
                    };
                    self.slot_retained.get_or_create(&l).set(*bytes);
                    l
                })
                .collect();
            for gone in exported.slots.difference(&now) {
                self.slot_retained.remove(gone);
            }
            exported.slots = now;
        }

        let b = snap.backups.clone().unwrap_or_default();
        set_or_remove(&self.backup_last_success, &key, b.last_success_seconds);
        set_or_remove(&self.backup_last_size, &key, b.last_size_bytes);
        set_or_remove(&self.backup_interval, &key, b.interval_seconds);
    }

    fn remove_replica(&self, l: &ReplicaLabels) {
        self.replica_lag_seconds.remove(l);
        self.replica_lag_bytes.remove(l);
        self.replica_max_lag_seconds.remove(l);
        self.replica_max_lag_bytes.remove(l);
    }

    /// Removes every series of a deleted policy.
    pub(crate) fn forget(&self, namespace: &str, policy: &str) {
        let key = PolicyLabels {
            namespace: namespace.into(),
            policy: policy.into(),
        };
        let exported = self.exported().remove(&key).unwrap_or_default();
        self.ready.remove(&key);
        self.drift_notifications.remove(&key);
        self.backup_last_success.remove(&key);
        self.backup_last_size.remove(&key);
        self.backup_interval.remove(&key);
        for l in &exported.pending {
            self.pending.remove(l);
        }
        for l in &exported.replicas {
            self.remove_replica(l);
        }
        for l in &exported.slots {
            self.slot_retained.remove(l);
        }
        for l in &exported.drift {
            self.drift.remove(l);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::BackupStatus;
    use crate::controller::metrics::encode;
    use crate::engine::Hazard;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
    use k8s_openapi::jiff::Timestamp;

    fn registry() -> (Registry, PolicyMetrics) {
        let mut r = Registry::with_prefix("dbpolicy");
        let m = PolicyMetrics::default();
        m.register(&mut r);
        (r, m)
    }

    fn spec() -> DatabasePolicySpec {
        serde_yaml::from_str(
            "database: {connectionSecretRef: {name: x}}
replicas:
  replicas:
    - {name: r1, connectionSecretRef: {name: a}, maxLagSeconds: 30, maxLagBytes: 1048576}
    - {name: r2, connectionSecretRef: {name: b}}
backups:
  schedule: '0 3 * * *'
  storage: {pvc: {claimName: backups}}
",
        )
        .unwrap()
    }

    fn ready_status(ready: bool) -> DatabasePolicyStatus {
        DatabasePolicyStatus {
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: if ready { "True" } else { "False" }.into(),
                reason: "x".into(),
                message: String::new(),
                observed_generation: None,
                last_transition_time: Time(Timestamp::UNIX_EPOCH),
            }],
            backups: Some(BackupStatus {
                last_success_time: Some("2026-11-29T03:00:41Z".into()),
                newest_backup_bytes: Some(123_456),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn replica(name: &str, secs: Option<f64>, bytes: Option<i64>) -> ReplicaStatus {
        ReplicaStatus {
            name: name.into(),
            state: "Healthy".into(),
            lag_seconds: secs,
            lag_bytes: bytes,
            slot: None,
            last_check_time: None,
        }
    }

    #[test]
    fn every_family_prints_its_help_and_type_before_any_policy() {
        let (r, _m) = registry();
        let text = encode(&r);
        for family in [
            "dbpolicy_policy_ready gauge",
            "dbpolicy_policy_pending_changes gauge",
            "dbpolicy_drift_detected counter",
            "dbpolicy_replica_lag_seconds gauge",
            "dbpolicy_replica_lag_bytes gauge",
            "dbpolicy_replica_max_lag_seconds gauge",
            "dbpolicy_replica_max_lag_bytes gauge",
            "dbpolicy_slot_retained_wal_bytes gauge",
            "dbpolicy_backup_last_success_timestamp_seconds gauge",
            "dbpolicy_backup_last_size_bytes gauge",
            "dbpolicy_backup_schedule_interval_seconds gauge",
        ] {
            assert!(
                text.contains(&format!("# TYPE {family}\n")),
                "{family} missing from\n{text}"
            );
        }
        assert!(!text.contains("namespace="), "no series yet:\n{text}");
    }

    #[test]
    fn a_snapshot_becomes_series_and_stale_ones_are_removed() {
        let (r, m) = registry();
        let spec = spec();
        let now: Timestamp = "2026-11-29T12:00:00Z".parse().unwrap();
        let changes = vec![
            Change::new(Area::FeatureFlags, "a", "set a", "SELECT 1"),
            Change::new(Area::FeatureFlags, "b", "drop b", "SELECT 1").hazard(Hazard::Destructive),
            Change::new(Area::FeatureFlags, "c", "drop c", "SELECT 1").hazard(Hazard::Destructive),
        ];
        let found = [
            replica("r1", Some(1.5), Some(2048)),
            replica("r2", None, None),
        ];
        let slots = BTreeMap::from([("r1_slot".to_string(), 4096i64)]);
        let snap = snapshot(
            &spec,
            &ready_status(false),
            Some(&changes),
            Some(&found),
            Some(&slots),
            now,
        );
        m.record("quiz", "certquiz", &snap);
        m.drifted("quiz", "certquiz", Area::RowLevelSecurity);
        let text = encode(&r);
        let l = "namespace=\"quiz\",policy=\"certquiz\"";
        for needle in [
            format!("dbpolicy_policy_ready{{{l}}} 0\n"),
            format!("dbpolicy_policy_pending_changes{{{l},area=\"featureFlags\",hazard=\"safe\"}} 1\n"),
            format!("dbpolicy_policy_pending_changes{{{l},area=\"featureFlags\",hazard=\"destructive\"}} 2\n"),
            format!("dbpolicy_drift_detected_total{{{l},area=\"rowLevelSecurity\"}} 1\n"),
            format!("dbpolicy_replica_lag_seconds{{{l},replica=\"r1\"}} 1.5\n"),
            format!("dbpolicy_replica_lag_bytes{{{l},replica=\"r1\"}} 2048\n"),
            format!("dbpolicy_replica_max_lag_seconds{{{l},replica=\"r1\"}} 30.0\n"),
            format!("dbpolicy_replica_max_lag_bytes{{{l},replica=\"r1\"}} 1048576\n"),
            format!("dbpolicy_slot_retained_wal_bytes{{{l},slot=\"r1_slot\"}} 4096\n"),
            format!("dbpolicy_backup_last_success_timestamp_seconds{{{l}}} 1795921241.0\n"),
            format!("dbpolicy_backup_last_size_bytes{{{l}}} 123456\n"),
            format!("dbpolicy_backup_schedule_interval_seconds{{{l}}} 86400.0\n"),
        ] {
            assert!(text.contains(&needle), "{needle} missing from\n{text}");
        }
        // r2 was not measured and has no limits: no series rather than a made-up 0.
        assert!(!text.contains("replica=\"r2\""), "{text}");

        // Next check: ready, nothing pending, r1 gone from the spec, the slot dropped;
        // the database not observed leaves nothing else out.
        let mut fewer = spec.clone();
        fewer.replicas.as_mut().unwrap().replicas.remove(0);
        let snap = snapshot(
            &fewer,
            &ready_status(true),
            Some(&[]),
            Some(&found),
            Some(&BTreeMap::new()),
            now,
        );
        m.record("quiz", "certquiz", &snap);
        let text = encode(&r);
        assert!(
            text.contains(&format!("dbpolicy_policy_ready{{{l}}} 1\n")),
            "{text}"
        );
        for gone in ["pending_changes{", "replica=\"r1\"", "slot=\""] {
            assert!(!text.contains(gone), "{gone} still in\n{text}");
        }
        // Not observed (None): what was exported stays.
        m.record(
            "quiz",
            "certquiz",
            &snapshot(
                &spec,
                &ready_status(false),
                Some(&changes),
                Some(&found),
                Some(&slots),
                now,
            ),
        );
        m.record(
            "quiz",
            "certquiz",
            &snapshot(&spec, &ready_status(false), None, None, None, now),
        );
        let text = encode(&r);
        assert!(text.contains("hazard=\"destructive\"} 2"), "{text}");
        assert!(text.contains("slot=\"r1_slot\"} 4096"), "{text}");
    }

    #[test]
    fn a_deleted_policy_leaves_no_series_and_others_keep_theirs() {
        let (r, m) = registry();
        let spec = spec();
        let now: Timestamp = "2026-11-29T12:00:00Z".parse().unwrap();
        let changes = vec![Change::new(Area::Indexes, "i", "create i", "SELECT 1")];
        let found = [replica("r1", Some(0.5), Some(10))];
        let slots = BTreeMap::from([("s".to_string(), 1i64)]);
        for name in ["gone", "kept"] {
            m.record(
                "quiz",
                name,
                &snapshot(
                    &spec,
                    &ready_status(true),
                    Some(&changes),
                    Some(&found),
                    Some(&slots),
                    now,
                ),
            );
            m.drifted("quiz", name, Area::Indexes);
        }
        m.forget("quiz", "gone");
        let text = encode(&r);
        assert!(!text.contains("policy=\"gone\""), "{text}");
        let kept = text.matches("policy=\"kept\"").count();
        assert_eq!(kept, 11, "{text}");
        assert!(text.contains("# TYPE dbpolicy_policy_ready gauge"));
    }

    /// What a fleet costs a scrape: 1000 policies with a replica, a slot, backups, two
    /// pending (area, hazard) pairs and a drift area each (12 series) print about 1 KB each.
    /// `cargo test --lib exposition_of_a_fleet -- --nocapture` prints size and time.
    #[test]
    fn exposition_of_a_fleet_is_about_a_kilobyte_per_policy() {
        let (registry, m) = crate::controller::metrics::registry();
        for i in 0..1000 {
            let snap = Snapshot {
                ready: true,
                pending: Some(BTreeMap::from([
                    (("featureFlags".into(), "safe".into()), 2),
                    (("indexes".into(), "locking".into()), 1),
                ])),
                replicas: Some(BTreeMap::from([(
                    "r1".into(),
                    ReplicaFigures {
                        lag_seconds: Some(1.5),
                        lag_bytes: Some(10),
                        max_lag_seconds: Some(30.0),
                        max_lag_bytes: Some(1000),
                    },
                )])),
                slots: Some(BTreeMap::from([("r1_slot".into(), 4096)])),
                backups: Some(BackupFigures {
                    last_success_seconds: Some(1.0),
                    last_size_bytes: Some(2),
                    interval_seconds: Some(86400.0),
                }),
            };
            let name = format!("policy-{i:04}");
            m.policy.record("apps", &name, &snap);
            m.policy.drifted("apps", &name, Area::FeatureFlags);
        }
        let start = std::time::Instant::now();
        let text = encode(&registry);
        let took = start.elapsed();
        let per_policy = text.matches("policy=\"policy-0001\"").count();
        eprintln!(
            "1000 policies: {} bytes, {} lines, encoded in {took:?}",
            text.len(),
            text.lines().count()
        );
        assert_eq!(per_policy, 12, "{text}");
        assert!(text.len() < 1_200_000, "{} bytes", text.len());
    }
}
