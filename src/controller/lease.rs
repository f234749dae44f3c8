//! Leader election through a `coordination.k8s.io/v1` Lease (kube-lease-manager): only the holder runs the controller, and it releases the Lease on shutdown.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder, LeaseManagerError};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How long a holder that stopped renewing keeps the lease (client-go's default), and how
/// long before expiry the holder renews it.
pub(crate) const LEASE_DURATION_SECONDS: u64 = 15;
pub(crate) const LEASE_GRACE_SECONDS: u64 = 5;

#[derive(Debug, Clone)]
pub(crate) struct LeaseConfig {
    pub name: String,
    pub namespace: String,
    /// Unique per replica: the pod name.
    pub identity: String,
}

/// A running election: a background task that acquires and renews the Lease, and the
/// channel on which it says whether this replica holds it.
pub(crate) struct Leadership {
    rx: watch::Receiver<bool>,
    task: JoinHandle<Result<LeaseManager, LeaseManagerError>>,
}

/// Gets or creates the Lease and starts competing for it.
pub(crate) async fn start(
    client: Client,
    config: &LeaseConfig,
) -> Result<Leadership, LeaseManagerError> {
    let manager = LeaseManagerBuilder::new(client, &config.name)
        .with_namespace(&config.namespace)
        .with_identity(&config.identity)
        .with_duration(LEASE_DURATION_SECONDS)
        .with_grace(LEASE_GRACE_SECONDS)
        .build()
        .await?;
    let (rx, task) = manager.watch().await;
    Ok(Leadership { rx, task })
}

impl Leadership {
    /// Waits until this replica holds the Lease; false when the election loop ended.
    pub(crate) async fn acquired(&mut self) -> bool {
        self.rx.wait_for(|leader| *leader).await.is_ok()
    }

    /// A future that resolves when this replica no longer holds the Lease.
    pub(crate) fn lost(&self) -> impl std::future::Future<Output = ()> + Send + Sync + 'static {
        let mut rx = self.rx.clone();
        async move {
            let _ = rx.wait_for(|leader| !*leader).await;
        }
    }

    pub(crate) fn is_leader(&self) -> bool {
        *self.rx.borrow()
    }

    /// Closing the channel makes the election task release the Lease (if held) and stop,
    /// so a successor takes over at once instead of after the lease duration.
    pub(crate) async fn release(self) {
        drop(self.rx);
        match tokio::time::timeout(Duration::from_secs(5), self.task).await {
            Ok(Ok(Ok(_))) => tracing::info!("leader lease released"),
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "releasing the leader lease failed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "leader election task failed"),
            Err(_) => tracing::warn!("releasing the leader lease timed out"),
        }
    }
}

/// How often a standby reads the Lease to notice that its holder released it.
pub(crate) const RELEASE_POLL: Duration = Duration::from_secs(1);

/// Resolves when the Lease has no holder: its holder released it (SIGTERM).
/// kube-lease-manager's standby sleeps until the expiry of the lease it last read, so
/// without this a released Lease would wait out the rest of its duration. Each read comes
/// a second after the last, which leaves a fresh election the time to take a Lease that had
/// no holder; read errors count as "still held".
pub(crate) async fn released(client: Client, config: &LeaseConfig) {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    loop {
        tokio::time::sleep(RELEASE_POLL).await;
        let Ok(lease) = api.get(&config.name).await else {
            continue;
        };
        if lease
            .spec
            .and_then(|s| s.holder_identity)
            .is_none_or(|h| h.is_empty())
        {
            return;
        }
    }
}

/// The replica's identity: `POD_NAME` when set (the Deployment passes it), else the
/// hostname and the process id, so two processes on one machine never share it.
pub(crate) fn default_identity() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "dbpolicy".into());
    format!("{host}-{}", std::process::id())
}
