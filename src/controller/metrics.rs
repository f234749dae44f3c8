//! Prometheus metrics of the controller (prometheus-client), registered once and encoded for `/metrics`.

use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use super::error::Error;
use crate::engine::Area;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub error: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AreaLabels {
    pub area: String,
}

/// Every metric the controller exports, under the `dbpolicy_` prefix.
#[derive(Clone)]
pub struct Metrics {
    pub reconciles: Counter,
    pub errors: Family<ErrorLabels, Counter>,
    pub duration: Histogram,
    pub changes_applied: Family<AreaLabels, Counter>,
    pub drift_detected: Family<AreaLabels, Counter>,
    pub leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            reconciles: Counter::default(),
            errors: Family::default(),
            // 10ms … ~82s: a reconcile is a few catalog queries, or a long DDL.
            duration: Histogram::new(exponential_buckets(0.01, 2.0, 14)),
            changes_applied: Family::default(),
            drift_detected: Family::default(),
            leader: Gauge::default(),
        }
    }
}

impl Metrics {
    /// Registers every metric in `registry`; returns the handles to update.
    pub fn register(self, registry: &mut Registry) -> Self {
        registry.register(
            "reconciles",
            "Reconciliations started",
            self.reconciles.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Failed reconciliations, by the step that failed",
            self.errors.clone(),
        );
        registry.register_with_unit(
            "reconcile_duration",
            "Duration of a reconciliation",
            Unit::Seconds,
            self.duration.clone(),
        );
        registry.register(
            "changes_applied",
            "Changes applied to databases, by area",
            self.changes_applied.clone(),
        );
        registry.register(
            "drift_detected",
            "Checks that found a database differing from a policy it had converged to, by area",
            self.drift_detected.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease and runs the controller",
            self.leader.clone(),
        );
        self
    }

    /// Counts a reconcile and times it until the guard drops (on every return path).
    pub fn reconcile_started(&self) -> ReconcileTimer {
        self.reconciles.inc();
        ReconcileTimer {
            start: Instant::now(),
            histogram: self.duration.clone(),
        }
    }

    pub fn reconcile_failed(&self, e: &Error) {
        self.errors
            .get_or_create(&ErrorLabels {
                error: e.metric_label().to_string(),
            })
            .inc();
    }

    pub fn applied(&self, area: Area, n: usize) {
        self.changes_applied
            .get_or_create(&AreaLabels {
                area: area.as_str().to_string(),
            })
            .inc_by(n as u64);
    }

    pub fn drifted(&self, area: Area) {
        self.drift_detected
            .get_or_create(&AreaLabels {
                area: area.as_str().to_string(),
            })
            .inc();
    }
}

/// Observes the elapsed time into the duration histogram when dropped.
pub struct ReconcileTimer {
    start: Instant,
    histogram: Histogram,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed().as_secs_f64());
    }
}

/// The text exposition of `registry`.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_timer() {
        let mut registry = Registry::with_prefix("dbpolicy");
        let m = Metrics::default().register(&mut registry);
        {
            let _t = m.reconcile_started();
        }
        m.reconcile_failed(&Error::MissingObjectKey("name"));
        m.applied(Area::FeatureFlags, 3);
        m.drifted(Area::Autovacuum);
        let text = encode(&registry);
        for needle in [
            "dbpolicy_reconciles_total 1",
            "dbpolicy_reconcile_errors_total{error=\"missing_object_key\"} 1",
            "dbpolicy_reconcile_duration_seconds_count 1",
            "dbpolicy_changes_applied_total{area=\"featureFlags\"} 3",
            "dbpolicy_drift_detected_total{area=\"autovacuum\"} 1",
            "dbpolicy_leader 0",
        ] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
    }
}
