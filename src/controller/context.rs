//! What every reconcile shares: the API client, the event recorder, the metrics and the per-policy retry backoff.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::batch::v1::CronJob;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::Store;
use kube::{Client, Resource, ResourceExt};

use super::error::Error;
use super::metrics::Metrics;
use crate::api::DatabasePolicy;
use crate::reason::Reason;

/// The field manager of every server-side apply the operator sends (status, children).
pub(crate) const FIELD_MANAGER: &str = "dbpolicy";
/// Name of the controller in Events' `reportingController`.
pub(crate) const CONTROLLER_NAME: &str = "dbpolicy.dev/controller";
/// The finalizer the operator puts on every policy it reconciles.
pub(crate) const FINALIZER: &str = "dbpolicy.dev/cleanup";

/// First retry after a failure; doubled per consecutive failure up to [`MAX_BACKOFF`].
pub(crate) const MIN_BACKOFF: Duration = Duration::from_secs(5);
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// The image of the backup and refresh Jobs unless `--job-image` / `DBPOLICY_IMAGE` says
/// otherwise: the operator's own, at its own version.
pub(crate) const DEFAULT_JOB_IMAGE: &str =
    concat!("ghcr.io/dbpolicy/dbpolicy:", env!("CARGO_PKG_VERSION"));

/// Events notes are limited to 1 KiB by the API.
const MAX_NOTE: usize = 1000;

pub(crate) struct Context {
    pub client: Client,
    /// Repeats of one event (same type, reason, action, object) within minutes become a
    /// series on the first Event, keeping the first note: right for a failure that
    /// repeats, wrong for change sets, which each get their own Event (see `publish`).
    pub recorder: Recorder,
    reporter: Reporter,
    pub metrics: Metrics,
    /// Consecutive failures per policy (`namespace/name`), for the retry backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// Image of the backup and refresh CronJobs.
    pub job_image: String,
    /// Whether the API server serves `batch/v1` CronJobs (discovered at start-up).
    pub cronjobs_supported: bool,
    /// Server settings denied by default that the platform team allows (`--allow-setting`).
    pub allowed_settings: crate::engine::AllowedSettings,
    /// The operator's watch cache of Secrets (`dbpolicy run`): Secrets are read from it,
    /// never fetched. None: one GET per Secret read (tests of the request sequence).
    pub secret_cache: Option<Store<Secret>>,
    /// The watch cache of the operator's CronJobs: none listed per reconcile when set.
    pub cronjob_cache: Option<Store<CronJob>>,
    /// Database connections kept between runs, one per connection URL.
    pub connections: super::connections::Connections,
    /// LISTEN connections of the policies with the drift event trigger, one per URL
    /// (`dbpolicy run`); without it, none.
    pub ddl_listeners: super::ddl_listener::DdlListeners,
}

impl Context {
    pub(crate) fn new(client: Client, instance: Option<String>, metrics: Metrics) -> Self {
        let reporter = Reporter {
            controller: CONTROLLER_NAME.into(),
            instance,
        };
        Context {
            recorder: Recorder::new(client.clone(), reporter.clone()),
            reporter,
            client,
            metrics,
            failures: Mutex::new(HashMap::new()),
            job_image: DEFAULT_JOB_IMAGE.to_string(),
            cronjobs_supported: true,
            allowed_settings: Default::default(),
            secret_cache: None,
            cronjob_cache: None,
            connections: Default::default(),
            ddl_listeners: Default::default(),
        }
    }

    /// Listens for the drift event trigger's notifications (`dbpolicy run`).
    pub(crate) fn with_ddl_listeners(
        mut self,
        listeners: super::ddl_listener::DdlListeners,
    ) -> Self {
        self.ddl_listeners = listeners;
        self
    }

    /// Reads Secrets and the policies' CronJobs from these watch caches instead of the API.
    pub(crate) fn with_caches(
        mut self,
        secrets: Store<Secret>,
        cronjobs: Option<Store<CronJob>>,
    ) -> Self {
        self.secret_cache = Some(secrets);
        self.cronjob_cache = cronjobs;
        self
    }

    /// The denied server settings that policies may set (`--allow-setting`).
    pub(crate) fn with_allowed_settings(mut self, allowed: crate::engine::AllowedSettings) -> Self {
        self.allowed_settings = allowed;
        self
    }

    /// The image of the CronJobs, and whether the API server can hold them.
    pub(crate) fn with_jobs(mut self, image: impl Into<String>, cronjobs_supported: bool) -> Self {
        self.job_image = image.into();
        self.cronjobs_supported = cronjobs_supported;
        self
    }

    /// The delay before retrying a policy that just failed: 5s, 10s, 20s, … up to 5m.
    pub(crate) fn next_backoff(&self, key: &str) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = failures.entry(key.to_string()).or_insert(0);
        let delay = MIN_BACKOFF
            .saturating_mul(1u32 << (*n).min(16))
            .min(MAX_BACKOFF);
        *n = n.saturating_add(1);
        delay
    }

    pub(crate) fn reset_backoff(&self, key: &str) {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        failures.remove(key);
    }

    /// Publishes an Event about `policy`. A failure to publish is logged, never fatal:
    /// the status already says what the event says. `distinct` events (applied change
    /// sets, whose notes differ) go through a fresh Recorder, so that they are never folded
    /// into the series of an earlier one.
    pub(crate) async fn publish(
        &self,
        policy: &DatabasePolicy,
        type_: EventType,
        reason: Reason,
        action: &str,
        note: String,
        distinct: bool,
    ) {
        let event = Event {
            type_,
            reason: reason.as_str().into(),
            note: Some(bounded(note)),
            action: action.into(),
            secondary: None,
        };
        let fresh;
        let recorder = if distinct {
            fresh = Recorder::new(self.client.clone(), self.reporter.clone());
            &fresh
        } else {
            &self.recorder
        };
        if let Err(e) = recorder.publish(&event, &policy.object_ref(&())).await {
            tracing::warn!(policy = %key(policy), %reason, error = %e, "could not publish event");
        }
    }

    /// The one place a failure is counted and told as a Warning event.
    pub(crate) async fn report_failure(&self, policy: &DatabasePolicy, error: &Error) {
        self.metrics.reconcile_failed(error);
        self.publish(
            policy,
            EventType::Warning,
            error.reason(),
            "Reconcile",
            error.to_string(),
            false,
        )
        .await;
    }
}

/// `namespace/name`, the key of a policy in logs, backoff and the ledger.
pub(crate) fn key(policy: &DatabasePolicy) -> String {
    format!(
        "{}/{}",
        policy.namespace().unwrap_or_default(),
        policy.name_any()
    )
}

fn bounded(note: String) -> String {
    if note.len() <= MAX_NOTE {
        return note;
    }
    let mut end = MAX_NOTE;
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &note[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn backoff_doubles_and_resets() {
        let (service, _handle) = tower_test::mock::pair::<
            http::Request<kube::client::Body>,
            http::Response<kube::client::Body>,
        >();
        let ctx = Context::new(
            Client::new(service, "default"),
            Some("t".into()),
            Metrics::default(),
        );
        let delays: Vec<u64> = (0..8).map(|_| ctx.next_backoff("a/b").as_secs()).collect();
        assert_eq!(delays, [5, 10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(ctx.next_backoff("a/c").as_secs(), 5);
        ctx.reset_backoff("a/b");
        assert_eq!(ctx.next_backoff("a/b").as_secs(), 5);
        assert!(bounded("x".repeat(5000)).len() <= MAX_NOTE + 3);
    }
}
