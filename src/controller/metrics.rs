//! Prometheus metrics of the controller (prometheus-client), registered once and encoded for `/metrics`.
//! Operator-wide ones here, per-policy ones in [`super::policy_metrics`], `process_*` in
//! [`super::process_metrics`]; [`registry`] builds them all, so that every family is in the
//! exposition (HELP and TYPE) from the first scrape, before its first sample.

use std::time::Instant;

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use super::error::Error;
use super::policy_metrics::PolicyMetrics;
use super::process_metrics::ProcessCollector;
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
    pub leader: Gauge,
    /// Per-policy series (`namespace`, `policy` labels), drift detections among them.
    pub policy: PolicyMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            reconciles: Counter::default(),
            errors: Family::default(),
            // 10ms … ~82s: a reconcile is a few catalog queries, or a long DDL.
            duration: Histogram::new(exponential_buckets(0.01, 2.0, 14)),
            changes_applied: Family::default(),
            leader: Gauge::default(),
            policy: PolicyMetrics::default(),
        }
    }
}

impl Metrics {
    /// Registers every metric in `registry`; returns the handles to update.
    pub(crate) fn register(self, registry: &mut Registry) -> Self {
        registry.register(
            "reconciles",
            "Reconciliations started",
            self.reconciles.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Failed reconciliations, by the step that failed",
            PresentFromStart(self.errors.clone()),
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
            PresentFromStart(self.changes_applied.clone()),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease and runs the controller",
            self.leader.clone(),
        );
        registry.register(
            "build",
            "The operator's version (value 1)",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        self.policy.register(registry);
        self
    }

    /// Counts a reconcile and times it until the guard drops (on every return path).
    pub(crate) fn reconcile_started(&self) -> ReconcileTimer {
        self.reconciles.inc();
        ReconcileTimer {
            start: Instant::now(),
            histogram: self.duration.clone(),
        }
    }

    pub(crate) fn reconcile_failed(&self, e: &Error) {
        self.errors
            .get_or_create(&ErrorLabels {
                error: e.metric_label().to_string(),
            })
            .inc();
    }

    pub(crate) fn applied(&self, area: Area, n: usize) {
        self.changes_applied
            .get_or_create(&AreaLabels {
                area: area.as_str().to_string(),
            })
            .inc_by(n as u64);
    }
}

/// A family whose HELP and TYPE are exposed before its first series: prometheus-client
/// leaves out empty families, and then a rule or dashboard cannot tell a metric without
/// series yet from a name that does not exist.
#[derive(Debug, Clone)]
pub(crate) struct PresentFromStart<M>(pub M);

impl<M: EncodeMetric> EncodeMetric for PresentFromStart<M> {
    fn encode(&self, encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        self.0.encode(encoder)
    }
    fn metric_type(&self) -> MetricType {
        self.0.metric_type()
    }
    fn is_empty(&self) -> bool {
        false
    }
}

/// The registry `/metrics` serves: the operator's metrics under `dbpolicy_`, the process
/// collector without prefix (`process_*`, as every client library names them).
pub fn registry() -> (Registry, Metrics) {
    let mut root = Registry::default();
    root.register_collector(Box::new(ProcessCollector));
    let metrics = Metrics::default().register(root.sub_registry_with_prefix("dbpolicy"));
    (root, metrics)
}

/// Observes the elapsed time into the duration histogram when dropped.
pub(crate) struct ReconcileTimer {
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

/// The sample names an exposition can hold, from its `# TYPE` lines (so families without
/// a series count too): a counter `x` is sampled as `x_total`, a histogram as
/// `x_bucket`/`x_sum`/`x_count`, an info as `x_info`. What alert rules and dashboards may
/// refer to.
pub fn exported_names(exposition: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    for line in exposition.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
            continue;
        };
        let suffixes: &[&str] = match kind {
            "counter" => &["_total", "_created"],
            "histogram" => &["_bucket", "_sum", "_count", "_created"],
            "summary" => &["", "_sum", "_count", "_created"],
            "info" => &["_info"],
            _ => &[""],
        };
        for s in suffixes {
            names.insert(format!("{name}{s}"));
        }
    }
    names
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
        m.policy.drifted("ns", "p", Area::Autovacuum);
        let text = encode(&registry);
        for needle in [
            "dbpolicy_reconciles_total 1",
            "dbpolicy_reconcile_errors_total{error=\"missing_object_key\"} 1",
            "dbpolicy_reconcile_duration_seconds_count 1",
            "dbpolicy_changes_applied_total{area=\"featureFlags\"} 3",
            "dbpolicy_drift_detected_total{namespace=\"ns\",policy=\"p\",area=\"autovacuum\"} 1",
            "dbpolicy_leader 0",
            "dbpolicy_build_info{version=\"0.1.0\"} 1",
        ] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
    }

    #[test]
    fn the_served_registry_has_every_family_and_the_process_metrics() {
        let (registry, _m) = registry();
        let text = encode(&registry);
        for needle in [
            "# TYPE dbpolicy_reconciles counter",
            "# TYPE dbpolicy_policy_ready gauge",
            "# TYPE dbpolicy_build info",
            "# TYPE process_cpu_seconds counter",
            "# TYPE process_resident_memory_bytes gauge",
            "# TYPE process_start_time_seconds gauge",
        ] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
        let names = exported_names(&text);
        assert!(names.contains("process_cpu_seconds_total"), "{names:?}");
        assert!(names.contains("dbpolicy_build_info"), "{names:?}");
        assert!(
            names.contains("dbpolicy_reconcile_duration_seconds_bucket"),
            "{names:?}"
        );
        assert!(names.contains("dbpolicy_policy_ready"), "{names:?}");
    }
}
