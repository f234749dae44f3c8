//! The operator's side of drift in seconds: one LISTEN connection per database URL whose
//! policies have the drift event trigger (`engine::ddl_notify`), turning its notifications
//! into reconciles of those policies, debounced.
//!
//! Why per URL and not per policy: the trigger notifies every session listening on its
//! database, so two policies on one database share one connection (and both are checked).
//! Why debounced: a migration of a thousand DDL statements sends a thousand notifications;
//! a check starts [`QUIET`] after the last one (at most [`MAX_DELAY`] after the first), so
//! it causes one reconcile, and the reconcile sees the migration finished. A lost
//! connection is re-established with a growing pause, and the policies are checked once it
//! is back: notifications sent meanwhile are lost. The poll of `driftCheckInterval` stays
//! the fallback. URLs hold passwords: they are map keys only, never logged.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::channel::mpsc::UnboundedSender;
use futures::StreamExt;
use kube::runtime::reflector::ObjectRef;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use tokio::time::Instant;

use super::policy_metrics::PolicyMetrics;
use super::status::{condition, Input, Status};
use crate::api::{DatabasePolicy, DatabasePolicyStatus};
use crate::engine::ddl_notify::{self, TriggerState};
use crate::reason::Reason;

/// The condition type that says whether drift is reported within seconds.
pub(crate) const CONDITION: &str = "DriftEventTrigger";
/// A check starts this long after the last notification of a burst.
pub(crate) const QUIET: Duration = Duration::from_millis(500);
/// … and at the latest this long after the first, should the burst never pause.
pub(crate) const MAX_DELAY: Duration = Duration::from_secs(10);
/// Pause before reconnecting after a failure: doubling from the first, up to the last.
const RECONNECT: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(60));
/// Connecting and `LISTEN` are bounded like every other statement of the operator.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

type PolicyRef = ObjectRef<DatabasePolicy>;

/// When the burst of notifications seen so far should be answered by a check.
#[derive(Debug, Clone, Default)]
pub(crate) struct Debounce {
    first: Option<Instant>,
    last: Option<Instant>,
}

impl Debounce {
    /// A notification that wants a check arrived at `now`.
    pub(crate) fn notify(&mut self, now: Instant) {
        self.first.get_or_insert(now);
        self.last = Some(now);
    }
    /// When to check: [`QUIET`] after the last notification, at most [`MAX_DELAY`] after
    /// the first; None when nothing waits.
    pub(crate) fn due(&self) -> Option<Instant> {
        Some((self.last? + QUIET).min(self.first? + MAX_DELAY))
    }
    /// The check was asked for: the next notification starts a new burst.
    pub(crate) fn clear(&mut self) {
        *self = Debounce::default();
    }
}

struct Listener {
    subscribers: Arc<Mutex<HashSet<PolicyRef>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Default)]
struct Listeners {
    by_url: HashMap<String, Listener>,
    url_of: HashMap<PolicyRef, String>,
}

/// The listeners of one operator. Without a trigger channel (tests of the request
/// sequence, the CLI) it listens to nothing.
#[derive(Default)]
pub(crate) struct DdlListeners {
    inner: Mutex<Listeners>,
    trigger: Option<(UnboundedSender<PolicyRef>, PolicyMetrics)>,
}

impl DdlListeners {
    /// Listeners that send the policies to check to `trigger` (the controller's
    /// `reconcile_on` stream) and count each in `metrics`.
    pub(crate) fn new(trigger: UnboundedSender<PolicyRef>, metrics: PolicyMetrics) -> Self {
        DdlListeners {
            inner: Mutex::default(),
            trigger: Some((trigger, metrics)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Listeners> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many connections listen now.
    #[cfg(test)]
    fn listening(&self) -> usize {
        self.lock().by_url.len()
    }

    /// Follows the engine's word on the policy's trigger: listens on `url` for it when
    /// the trigger is active, else stops (turned off, not permitted, failed).
    pub(crate) fn follow(&self, policy: &DatabasePolicy, url: &str, state: Option<&TriggerState>) {
        let r = ObjectRef::from_obj(policy);
        match state {
            Some(s) if s.is_active() => self.subscribe(r, url),
            _ => self.unsubscribe(&r),
        }
    }

    /// Listens on `url` for `policy` (moving it from the URL it was on, if another).
    pub(crate) fn subscribe(&self, policy: PolicyRef, url: &str) {
        let Some((trigger, metrics)) = &self.trigger else {
            return;
        };
        let mut inner = self.lock();
        if inner.url_of.get(&policy).map(String::as_str) == Some(url) {
            return;
        }
        remove(&mut inner, &policy);
        let listener = inner.by_url.entry(url.to_string()).or_insert_with(|| {
            let subscribers = Arc::new(Mutex::new(HashSet::new()));
            let task = tokio::spawn(listen(
                url.to_string(),
                subscribers.clone(),
                trigger.clone(),
                metrics.clone(),
            ));
            Listener { subscribers, task }
        });
        listener
            .subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(policy.clone());
        inner.url_of.insert(policy, url.to_string());
    }

    /// Stops listening for `policy`; the connection closes with its last policy.
    pub(crate) fn unsubscribe(&self, policy: &PolicyRef) {
        remove(&mut self.lock(), policy);
    }
}

fn remove(inner: &mut Listeners, policy: &PolicyRef) {
    let Some(url) = inner.url_of.remove(policy) else {
        return;
    };
    let empty = inner.by_url.get(&url).is_none_or(|l| {
        let mut s = l.subscribers.lock().unwrap_or_else(|p| p.into_inner());
        s.remove(policy);
        s.is_empty()
    });
    if empty {
        inner.by_url.remove(&url);
    }
}

/// Asks for a check of every policy listening on this connection.
fn check_all(
    subscribers: &Mutex<HashSet<PolicyRef>>,
    trigger: &UnboundedSender<PolicyRef>,
    metrics: &PolicyMetrics,
    why: &str,
) {
    let policies: Vec<PolicyRef> = subscribers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .cloned()
        .collect();
    for p in policies {
        tracing::debug!(policy = %p, why, "drift event: checking the policy now");
        metrics.drift_notified(p.namespace.as_deref().unwrap_or_default(), &p.name);
        let _ = trigger.unbounded_send(p);
    }
}

/// Why a listener could not start; its text goes to the log, never the URL.
#[derive(Debug, thiserror::Error)]
enum ListenError {
    #[error("the database URL is not a valid postgres:// URI")]
    InvalidUrl,
    /// The server's error, summarised by `pg::error_summary` (no connection string).
    #[error("{0}")]
    Database(String),
    #[error("timed out after {0:?}")]
    TimedOut(Duration),
}

async fn connect(url: &str) -> Result<PgListener, ListenError> {
    let opts: PgConnectOptions = url.parse().map_err(|_| ListenError::InvalidUrl)?;
    let opts = opts.application_name("dbpolicy-drift-listener");
    // A pool of one is what PgListener reconnects through.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(CONNECT_TIMEOUT)
        .max_lifetime(None)
        .idle_timeout(None)
        .connect_lazy_with(opts);
    let listen = async {
        let mut l = PgListener::connect_with(&pool).await?;
        l.listen(ddl_notify::CHANNEL).await?;
        Ok::<_, sqlx::Error>(l)
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, listen).await {
        Ok(Ok(l)) => Ok(l),
        Ok(Err(e)) => Err(ListenError::Database(crate::pg::error_summary(&e))),
        Err(_) => Err(ListenError::TimedOut(CONNECT_TIMEOUT)),
    }
}

/// One connection's loop, until aborted: listen, debounce, ask for checks; reconnect
/// with a growing pause after a failure.
async fn listen(
    url: String,
    subscribers: Arc<Mutex<HashSet<PolicyRef>>>,
    trigger: UnboundedSender<PolicyRef>,
    metrics: PolicyMetrics,
) {
    let mut pause = RECONNECT.0;
    let mut connected_before = false;
    loop {
        let listener = match connect(&url).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?pause, "drift listener cannot connect; the poll goes on meanwhile");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(RECONNECT.1);
                continue;
            }
        };
        if connected_before {
            // Notifications sent while it was away are lost: look now.
            check_all(&subscribers, &trigger, &metrics, "reconnected");
        }
        connected_before = true;
        pause = RECONNECT.0;
        // The stream keeps an unfinished receive across the select's other branch, so no
        // message is lost half read.
        let mut received = Box::pin(futures::stream::unfold(listener, |mut l| async move {
            let r = l.try_recv().await;
            Some((r, l))
        }));
        let mut debounce = Debounce::default();
        loop {
            let due = debounce.due();
            tokio::select! {
                r = received.next() => match r {
                    Some(Ok(Some(n))) => {
                        let payload = n.payload();
                        if ddl_notify::wants_check(payload) {
                            if let Some(p) = ddl_notify::Payload::parse(payload) {
                                tracing::debug!(ddl = %p.summary(), "drift event");
                            }
                            debounce.notify(Instant::now());
                        }
                    }
                    // Lost and re-established (PgListener's eager reconnect).
                    Some(Ok(None)) => check_all(&subscribers, &trigger, &metrics, "reconnected"),
                    Some(Err(e)) => {
                        tracing::warn!(error = %crate::pg::error_summary(&e), "drift listener lost its connection");
                        break;
                    }
                    None => break,
                },
                _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                    debounce.clear();
                    check_all(&subscribers, &trigger, &metrics, "notified");
                }
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(RECONNECT.1);
    }
}

/// The `DriftEventTrigger` condition from the run's word on the trigger; none when the
/// spec does not ask for it. Never part of `Ready`: the poll goes on without it.
pub(crate) fn add_condition(
    input: &Input<'_>,
    status: &mut DatabasePolicyStatus,
    state: Option<&TriggerState>,
) {
    status.conditions.retain(|c| c.type_ != CONDITION);
    let Some(state) = state else {
        return;
    };
    let (s, reason, message) = match state {
        TriggerState::Active => (
            Status::True,
            Reason::EventTriggerActive,
            "a hand change of a table, index, policy or materialized view is checked within seconds (LISTEN dbpolicy_drift); the poll of driftCheckInterval goes on as the fallback".to_string(),
        ),
        TriggerState::NotInstalled => (
            Status::False,
            Reason::EventTriggerNotInstalled,
            "Plan mode changes nothing: the event trigger is not installed; drift is found by the poll of driftCheckInterval".to_string(),
        ),
        TriggerState::NotPermitted { message } => (
            Status::False,
            Reason::EventTriggerNotPermitted,
            message.clone(),
        ),
        TriggerState::Failed { reason, message } => (Status::False, *reason, message.clone()),
    };
    status
        .conditions
        .push(condition(input, CONDITION, s, reason, &message));
}

/// When the run did not get as far as the trigger (the database not reached), the last
/// word on it stands, as long as the spec still asks for it.
pub(crate) fn keep_condition(input: &Input<'_>, status: &mut DatabasePolicyStatus) {
    status.conditions.retain(|c| c.type_ != CONDITION);
    if !input.spec.drift_event_trigger() {
        return;
    }
    if let Some(c) = input
        .previous
        .and_then(|p| p.conditions.iter().find(|c| c.type_ == CONDITION))
    {
        status.conditions.push(c.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_answered_once_after_it_pauses() {
        let t0 = Instant::now();
        let mut d = Debounce::default();
        assert_eq!(d.due(), None);
        // A migration: a thousand statements, 2 ms apart (2 s in all).
        let mut checks = 0;
        for i in 0..1000u64 {
            let now = t0 + Duration::from_millis(2 * i);
            if d.due().is_some_and(|due| due <= now) {
                checks += 1;
                d.clear();
            }
            d.notify(now);
        }
        assert_eq!(checks, 0, "no check while the burst goes on");
        let last = t0 + Duration::from_millis(2 * 999);
        assert_eq!(d.due(), Some(last + QUIET));
        d.clear();
        assert_eq!(d.due(), None);
    }

    #[test]
    fn a_burst_that_never_pauses_is_checked_within_the_max_delay() {
        let t0 = Instant::now();
        let mut d = Debounce::default();
        let mut checks = Vec::new();
        for i in 0..30_000u64 {
            let now = t0 + Duration::from_millis(i);
            if d.due().is_some_and(|due| due <= now) {
                checks.push(now - t0);
                d.clear();
            }
            d.notify(now);
        }
        assert_eq!(
            checks,
            [MAX_DELAY, MAX_DELAY * 2],
            "one check per MAX_DELAY"
        );
    }

    #[test]
    fn one_hand_change_is_checked_after_the_quiet_time() {
        let t0 = Instant::now();
        let mut d = Debounce::default();
        d.notify(t0);
        assert_eq!(d.due(), Some(t0 + QUIET));
    }

    fn policy(ns: &str, name: &str) -> PolicyRef {
        ObjectRef::new(name).within(ns)
    }

    #[tokio::test]
    async fn policies_on_one_url_share_a_listener_which_goes_with_the_last() {
        let (tx, _rx) = futures::channel::mpsc::unbounded();
        let l = DdlListeners::new(tx, PolicyMetrics::default());
        // Connections to a closed port fail and retry in the background: nothing here
        // waits for them.
        let a = "postgres://u:secret@127.0.0.1:1/a";
        let b = "postgres://u:secret@127.0.0.1:1/b";
        l.subscribe(policy("ns", "p1"), a);
        l.subscribe(policy("ns", "p2"), a);
        assert_eq!(l.listening(), 1);
        l.subscribe(policy("ns", "p2"), b);
        assert_eq!(l.listening(), 2, "p2 moved to its new URL");
        l.unsubscribe(&policy("ns", "p1"));
        assert_eq!(l.listening(), 1);
        l.unsubscribe(&policy("ns", "p2"));
        l.unsubscribe(&policy("ns", "p2"));
        assert_eq!(l.listening(), 0);

        let off = DdlListeners::default();
        off.subscribe(policy("ns", "p1"), a);
        assert_eq!(off.listening(), 0, "no trigger channel: no listener");
    }

    async fn next(
        rx: &mut futures::channel::mpsc::UnboundedReceiver<PolicyRef>,
        secs: u64,
    ) -> Option<PolicyRef> {
        tokio::time::timeout(Duration::from_secs(secs), rx.next())
            .await
            .ok()
            .flatten()
    }

    /// Against the local PostgreSQL (`DBPOLICY_TEST_ADMIN_URL`), on its maintenance
    /// database: NOTIFY and sessions only, nothing is created.
    #[tokio::test]
    async fn notifications_ask_for_one_check_and_a_lost_connection_for_another() {
        use sqlx::Connection;
        let url = std::env::var("DBPOLICY_TEST_ADMIN_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let mut admin = sqlx::PgConnection::connect(&url).await.expect("connect");
        let listeners = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND application_name = 'dbpolicy-drift-listener'";
        let count = |sql: String| {
            let url = url.clone();
            async move {
                let mut c = sqlx::PgConnection::connect(&url).await.expect("connect");
                let n: i64 = sqlx::query_scalar(&sql).fetch_one(&mut c).await.unwrap();
                let _ = c.close().await;
                n
            }
        };
        let wait_for = |sql: String, want: i64| async move {
            for _ in 0..300 {
                if count(sql.clone()).await == want {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            panic!("{sql}: never {want}");
        };
        let (tx, mut rx) = futures::channel::mpsc::unbounded();
        let metrics = PolicyMetrics::default();
        let l = DdlListeners::new(tx, metrics.clone());
        let p = policy("ns", "p");
        l.subscribe(p.clone(), &url);
        wait_for(format!("{listeners} AND query LIKE 'LISTEN%'"), 1).await;
        // A burst (one migration's worth, committed at once) and DDL that concerns
        // nothing managed: one check.
        let relevant = r#"{"tag":"ALTER TABLE","objects":[["table","public.t"]],"more":0}"#;
        let other = r#"{"tag":"CREATE FUNCTION","objects":[["function","public.f()"]],"more":0}"#;
        let mut burst = String::from("BEGIN;");
        for _ in 0..100 {
            burst.push_str(&format!(
                "SELECT pg_notify('dbpolicy_drift', '{relevant}');"
            ));
        }
        burst.push_str("COMMIT");
        sqlx::raw_sql(&burst).execute(&mut admin).await.unwrap();
        assert_eq!(next(&mut rx, 30).await, Some(p.clone()));
        sqlx::raw_sql(&format!("SELECT pg_notify('dbpolicy_drift', '{other}')"))
            .execute(&mut admin)
            .await
            .unwrap();
        assert_eq!(
            next(&mut rx, 2).await,
            None,
            "one check per burst, none for other DDL"
        );

        // The connection killed: re-established, and a check for what may have been missed.
        sqlx::raw_sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() \
             AND application_name = 'dbpolicy-drift-listener'",
        )
        .execute(&mut admin)
        .await
        .unwrap();
        assert_eq!(next(&mut rx, 60).await, Some(p.clone()));
        let labels = super::super::policy_metrics::PolicyLabels {
            namespace: "ns".into(),
            policy: "p".into(),
        };
        assert_eq!(metrics.drift_notifications.get_or_create(&labels).get(), 2);

        // The last policy gone: so is the connection.
        l.unsubscribe(&p);
        wait_for(listeners.to_string(), 0).await;
        let _ = admin.close().await;
    }

    #[test]
    fn the_condition_says_why_drift_is_polled() {
        let spec: crate::api::DatabasePolicySpec = serde_yaml::from_str(
            "database: {connectionSecretRef: {name: x}}\ndriftDetection: {eventTrigger: true}\n",
        )
        .unwrap();
        let input_after = |previous| Input {
            spec: &spec,
            generation: Some(1),
            previous,
            now: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ),
            drift_interval: Duration::from_secs(300),
        };
        let input = input_after(None);
        let mut status = DatabasePolicyStatus::default();
        let denied = TriggerState::NotPermitted {
            message: "role app is not a superuser".into(),
        };
        add_condition(&input, &mut status, Some(&denied));
        let c = &status.conditions[0];
        assert_eq!(
            (c.type_.as_str(), c.status.as_str(), c.reason.as_str()),
            (CONDITION, "False", "EventTriggerNotPermitted")
        );
        add_condition(&input, &mut status, Some(&TriggerState::Active));
        assert_eq!(status.conditions.len(), 1);
        assert_eq!(status.conditions[0].reason, "EventTriggerActive");
        let previous = status.clone();
        let mut failed = DatabasePolicyStatus::default();
        keep_condition(&input_after(Some(&previous)), &mut failed);
        assert_eq!(failed.conditions, previous.conditions);
        add_condition(&input, &mut status, None);
        assert!(status.conditions.is_empty());
    }
}
