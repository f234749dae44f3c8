//! The operator (`dbpolicy run`): a kube-runtime `Controller` on `DatabasePolicy`, re-triggered by the Secrets policies reference and by the databases' drift event triggers, behind a leader Lease, with an admin server.

pub(crate) mod admin;
pub(crate) mod backups;
pub(crate) mod cache;
pub(crate) mod children;
pub(crate) mod connections;
pub(crate) mod context;
pub(crate) mod ddl_listener;
pub(crate) mod error;
pub(crate) mod events;
pub(crate) mod lease;
pub mod metrics;
pub mod pitr;
pub(crate) mod policy_metrics;
pub(crate) mod process_metrics;
pub mod read_endpoint;
pub(crate) mod reconcile;
pub(crate) mod replicas;
pub(crate) mod status;

#[cfg(test)]
mod fixtures;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use futures::StreamExt;
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::Secret;
use kube::api::ListParams;
use kube::runtime::controller::{Config as ControllerConfig, Controller};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{watcher, PredicateConfig, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use tokio::sync::watch;

use crate::api::DatabasePolicy;
use crate::jobs;
pub(crate) use context::Context;

#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "WATCH_NAMESPACE")]
    pub namespace: Option<String>,
    /// Reconcile only policies matching this label selector (e.g. `team=quiz,tier!=dev`).
    #[arg(short = 'l', long)]
    pub selector: Option<String>,
    /// Most policies reconciled at once (each holds one database connection). Runs on
    /// one database take turns (its advisory lock), so this is about how many databases
    /// are worked on at once: 8 converged 2,000 policies over 10 databases in 54 s where
    /// 4 took 83 s (docs/performance.md).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..))]
    pub concurrency: u16,
    /// Address of the admin server: /metrics, /healthz, /readyz.
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub admin_addr: SocketAddr,
    /// Name of the coordination.k8s.io/v1 Lease that elects the active replica.
    #[arg(long, default_value = "dbpolicy-controller")]
    pub lease_name: String,
    /// Namespace of the Lease (default: the client's namespace).
    #[arg(long, env = "POD_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// This replica's identity in the Lease (default: hostname and process id).
    #[arg(long, env = "POD_NAME")]
    pub lease_identity: Option<String>,
    /// Run without a Lease. Only for a single replica (local development, tests).
    #[arg(long)]
    pub no_leader_election: bool,
    /// Image of the backup and refresh CronJobs (the operator's own image).
    #[arg(long, env = "DBPOLICY_IMAGE", default_value = context::DEFAULT_JOB_IMAGE)]
    pub job_image: String,
    /// Allow a server setting that is denied by default (it runs commands, loads code or
    /// can lock clients out: see docs/server-settings.md); repeatable, or comma-separated.
    /// Helm: `allowedServerSettings`. Policies cannot allow one themselves.
    #[arg(long = "allow-setting", value_name = "NAME", value_delimiter = ',')]
    pub allow_settings: Vec<String>,
}

/// Whether the API server serves `batch/v1` CronJobs (Kubernetes 1.21+). Discovery is
/// open to every authenticated client; an error counts as "no", with its reason logged.
pub(crate) async fn cronjobs_served(client: &Client) -> bool {
    match client.list_api_group_resources("batch/v1").await {
        Ok(list) => list.resources.iter().any(|r| r.name == "cronjobs"),
        Err(e) => {
            tracing::warn!(error = %e, "cannot discover batch/v1");
            false
        }
    }
}

/// The policy a backup Job belongs to, from its labels (its owner is the CronJob).
pub(crate) fn policy_for_job(job: &Job) -> Option<ObjectRef<DatabasePolicy>> {
    let name = job.labels().get(jobs::cronjob::POLICY_LABEL)?;
    Some(ObjectRef::new(name).within(&job.namespace()?))
}

/// The policies in `secret`'s namespace that read it (primary, replica or S3 credentials),
/// from the controller's cache.
pub(crate) fn policies_for_secret(
    policies: &[Arc<DatabasePolicy>],
    secret: &Secret,
) -> Vec<ObjectRef<DatabasePolicy>> {
    let ns = secret.namespace();
    let name = secret.name_any();
    policies
        .iter()
        .filter(|p| p.namespace() == ns && p.spec.referenced_secrets().any(|s| s == name))
        .map(|p| ObjectRef::from_obj(p.as_ref()))
        .collect()
}

/// A future that resolves on SIGTERM or ctrl-c, shareable by every part that stops.
fn shutdown_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let ctrl_c = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        #[cfg(unix)]
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let term = std::future::pending::<()>();
        tokio::select! {
            _ = ctrl_c => {}
            _ = term => {}
        }
        tracing::info!("shutdown requested: finishing running reconciles");
        let _ = tx.send(true);
    });
    rx
}

fn stopped(
    rx: &watch::Receiver<bool>,
) -> impl std::future::Future<Output = ()> + Send + Sync + 'static {
    let mut rx = rx.clone();
    async move {
        let _ = rx.wait_for(|stop| *stop).await;
    }
}

/// Runs the operator until SIGTERM/ctrl-c (Ok) or until the leader Lease is lost (Err, so
/// the process exits and restarts as a candidate: reconciles must never overlap).
pub(crate) async fn run(args: RunArgs) -> anyhow::Result<()> {
    let allowed_settings = crate::engine::AllowedSettings::new(&args.allow_settings)
        .map_err(|e| anyhow::anyhow!(e))?;
    for name in allowed_settings.names() {
        tracing::warn!(
            setting = name,
            "policies may set this server setting, denied by default (--allow-setting)"
        );
    }
    let client = Client::try_default()
        .await
        .context("no Kubernetes client configuration (in-cluster service account or KUBECONFIG)")?;
    let policies: Api<DatabasePolicy> = match &args.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    policies
        .list(&ListParams::default().limit(1))
        .await
        .context("cannot list DatabasePolicies: is the CRD installed (`dbpolicy crd | kubectl apply -f -`) and may this account list them?")?;

    let (registry, metrics) = metrics::registry();
    let ready = admin::Readiness::default();
    let stop = shutdown_signal();
    let listener = tokio::net::TcpListener::bind(args.admin_addr)
        .await
        .with_context(|| format!("cannot listen on --admin-addr {}", args.admin_addr))?;
    let admin_task = admin::serve(listener, Arc::new(registry), ready.clone(), stopped(&stop));

    let identity = args
        .lease_identity
        .clone()
        .unwrap_or_else(lease::default_identity);
    let leadership = if args.no_leader_election {
        None
    } else {
        let config = lease::LeaseConfig {
            name: args.lease_name.clone(),
            namespace: args
                .lease_namespace
                .clone()
                .unwrap_or_else(|| client.default_namespace().to_string()),
            identity: identity.clone(),
        };
        let mut leadership = lease::start(client.clone(), &config)
            .await
            .with_context(|| {
                format!(
                    "cannot get or create Lease {}/{} (RBAC: leases get, create, patch)",
                    config.namespace, config.name
                )
            })?;
        // A standby replica is ready too: were readiness to wait for the Lease, a rolling
        // update would wait forever for a new pod while the old one holds it.
        ready.set(true);
        tracing::info!(lease = %config.name, namespace = %config.namespace, %identity, "waiting for the leader lease");
        let mut stop_rx = stop.clone();
        enum Wait {
            Acquired(bool),
            Released,
            Stop,
        }
        loop {
            let outcome = tokio::select! {
                acquired = leadership.acquired() => Wait::Acquired(acquired),
                _ = lease::released(client.clone(), &config) => Wait::Released,
                _ = stop_rx.wait_for(|s| *s) => Wait::Stop,
            };
            match outcome {
                Wait::Acquired(true) => break,
                Wait::Acquired(false) => {
                    anyhow::bail!("leader election ended before the lease was acquired")
                }
                Wait::Stop => {
                    leadership.release().await;
                    let _ = admin_task.await;
                    return Ok(());
                }
                // The holder released the Lease: a new election takes it at once, instead
                // of sleeping until the expiry the old one last read.
                Wait::Released => {
                    tracing::info!(lease = %config.name, "the leader released the lease: competing for it now");
                    leadership.release().await;
                    leadership =
                        lease::start(client.clone(), &config)
                            .await
                            .with_context(|| {
                                format!("cannot get Lease {}/{}", config.namespace, config.name)
                            })?;
                }
            }
        }
        tracing::info!(%identity, "acquired the leader lease");
        Some(leadership)
    };
    metrics.leader.set(1);

    let cronjobs = cronjobs_served(&client).await;
    if !cronjobs {
        tracing::warn!(
            "this API server does not serve batch/v1 CronJob (Kubernetes 1.21+): running without the backup and refresh CronJobs; policies that need them say CronJobsUnsupported"
        );
    }
    let mut wc = watcher::Config::default();
    if let Some(sel) = &args.selector {
        wc = wc.labels(sel);
    }
    let (secrets, cronjob_api, job_api): (Api<Secret>, Api<CronJob>, Api<Job>) =
        match &args.namespace {
            Some(ns) => (
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
            ),
            None => (
                Api::all(client.clone()),
                Api::all(client.clone()),
                Api::all(client.clone()),
            ),
        };

    // The policies, cached without managedFields; only a change of spec or metadata
    // triggers a reconcile, never the operator's own status write.
    let (policy_store, policy_writer) = reflector::store();
    let policy_stream = watcher(policies, wc)
        .default_backoff()
        .modify(cache::trim_policy)
        .reflect(policy_writer)
        .applied_objects()
        .predicate_filter(cache::policy_trigger, PredicateConfig::default());
    // Secrets: the watch cache every Secret read is served from (see cache.rs for why a
    // cache of data rather than a metadata-only watch); a Secret created, changed or
    // deleted triggers the policies that reference it, and no other.
    let (secret_store, secret_writer) = reflector::store();
    let secret_stream = cache::changes_after_first_list(
        watcher(secrets, watcher::Config::default())
            .default_backoff()
            .modify(cache::trim_secret)
            .reflect(secret_writer),
    );
    // Children: a CronJob changed or deleted by hand is put back (and read from this cache,
    // never listed); a finished backup Job updates status.backups at once.
    let (cronjob_store, cronjob_writer) = reflector::store();
    let managed = watcher::Config::default().labels("app.kubernetes.io/managed-by=dbpolicy");
    let cronjob_stream = cache::changes_after_first_list(
        watcher(cronjob_api, managed)
            .default_backoff()
            .modify(cache::trim_cronjob)
            .reflect(cronjob_writer),
    );

    // Drift notifications (spec.driftDetection.eventTrigger): the listeners name the
    // policies to check now; reconciles of one policy never overlap all the same.
    let (drift_tx, drift_rx) = futures::channel::mpsc::unbounded();
    let ctx = Arc::new(
        Context::new(client.clone(), Some(identity), metrics.clone())
            .with_jobs(args.job_image.clone(), cronjobs)
            .with_allowed_settings(allowed_settings.clone())
            .with_caches(secret_store, cronjobs.then_some(cronjob_store))
            .with_ddl_listeners(ddl_listener::DdlListeners::new(
                drift_tx,
                metrics.policy.clone(),
            )),
    );
    let mapper_store = policy_store.clone();
    let lost = leadership.as_ref().map(|l| l.lost());
    let controller = Controller::for_stream(policy_stream, policy_store)
        .watches_stream(secret_stream, move |secret| {
            policies_for_secret(&mapper_store.state(), &secret)
        })
        .reconcile_on(drift_rx)
        .with_config(ControllerConfig::default().concurrency(args.concurrency));
    let controller = if cronjobs {
        let backup_jobs = watcher::Config::default().labels("dbpolicy.dev/job=backup");
        controller
            .owns_stream(cronjob_stream)
            .watches(job_api, backup_jobs, |job| policy_for_job(&job))
    } else {
        controller
    };
    let controller = controller.graceful_shutdown_on(stopped(&stop));
    let controller = match lost {
        Some(lost) => controller.graceful_shutdown_on(lost),
        None => controller,
    };
    ready.set(true);
    tracing::info!(
        namespace = args.namespace.as_deref().unwrap_or("(all)"),
        concurrency = args.concurrency,
        "controller running"
    );
    controller
        .run(reconcile::reconcile, reconcile::error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((obj, _)) => tracing::debug!(policy = %obj, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "reconcile error"),
            }
        })
        .await;
    metrics.leader.set(0);
    ready.set(false);

    let lost_lease = leadership.as_ref().is_some_and(|l| !l.is_leader()) && !*stop.borrow();
    if let Some(l) = leadership {
        l.release().await;
    }
    if lost_lease {
        anyhow::bail!("lost the leader lease: exiting so that reconciles never overlap");
    }
    let _ = admin_task.await;
    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::fixtures::{test_policy, test_secret, NS};

    #[test]
    fn a_secret_change_maps_to_the_policies_that_read_it() {
        let spec = "database: {connectionSecretRef: {name: x}}\n";
        let reader = Arc::new(test_policy(spec, true));
        let mut elsewhere = test_policy(spec, true);
        elsewhere.metadata.namespace = Some("other".into());
        let mut other_secret = test_policy(spec, true);
        other_secret.metadata.name = Some("b".into());
        other_secret.spec.database.connection_secret_ref.name = "another".into();
        let all = vec![reader.clone(), Arc::new(elsewhere), Arc::new(other_secret)];
        let refs = policies_for_secret(&all, &test_secret("postgres://x"));
        assert_eq!(refs, vec![ObjectRef::from_obj(reader.as_ref())]);
        assert_eq!(refs[0].namespace.as_deref(), Some(NS));
    }

    #[test]
    fn a_replica_or_s3_secret_change_maps_to_its_policy() {
        let spec = "database: {connectionSecretRef: {name: x}}
replicas: {replicas: [{name: r1, connectionSecretRef: {name: r1-db}}]}
backups:
  schedule: '0 3 * * *'
  storage: {s3: {bucket: b, credentialsSecretRef: {name: s3-creds}}}
";
        let policy = Arc::new(test_policy(spec, true));
        let all = vec![policy.clone()];
        for name in ["r1-db", "s3-creds", "test-db"] {
            let secret = crate::controller::fixtures::named_secret(name, "x");
            assert_eq!(
                policies_for_secret(&all, &secret),
                vec![ObjectRef::from_obj(policy.as_ref())],
                "{name}"
            );
        }
        let unrelated = crate::controller::fixtures::named_secret("test-read", "x");
        assert!(policies_for_secret(&all, &unrelated).is_empty());
    }

    #[test]
    fn a_backup_job_maps_to_its_policy() {
        let job: Job = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "certquiz-backup-29000000", "namespace": "quiz",
                "labels": {"dbpolicy.dev/policy": "certquiz", "dbpolicy.dev/job": "backup"}},
        }))
        .unwrap();
        assert_eq!(
            policy_for_job(&job),
            Some(ObjectRef::new("certquiz").within("quiz"))
        );
        assert_eq!(policy_for_job(&Job::default()), None);
    }

    #[test]
    fn run_flags_parse_with_their_defaults() {
        use clap::Parser;
        let cli = crate::cli::Cli::try_parse_from(["dbpolicy", "run"]).unwrap();
        let crate::cli::Command::Run(args) = cli.command else {
            panic!("not run")
        };
        assert_eq!(args.concurrency, 8);
        assert_eq!(args.admin_addr.to_string(), "0.0.0.0:8080");
        assert_eq!(args.lease_name, "dbpolicy-controller");
        assert!(!args.no_leader_election);
        if std::env::var_os("DBPOLICY_IMAGE").is_none() {
            assert_eq!(
                args.job_image,
                format!("ghcr.io/dbpolicy/dbpolicy:{}", env!("CARGO_PKG_VERSION"))
            );
        }
        let cli = crate::cli::Cli::try_parse_from([
            "dbpolicy",
            "run",
            "--namespace",
            "apps",
            "-l",
            "team=quiz",
            "--concurrency",
            "2",
            "--admin-addr",
            "127.0.0.1:9090",
            "--no-leader-election",
            "--log-format",
            "json",
            "--job-image",
            "registry.local/dbpolicy:dev",
        ])
        .unwrap();
        let crate::cli::Command::Run(args) = cli.command else {
            panic!("not run")
        };
        assert_eq!(args.namespace.as_deref(), Some("apps"));
        assert_eq!(args.selector.as_deref(), Some("team=quiz"));
        assert_eq!(args.concurrency, 2);
        assert!(args.no_leader_election);
        assert_eq!(args.job_image, "registry.local/dbpolicy:dev");
        assert!(
            crate::cli::Cli::try_parse_from(["dbpolicy", "run", "--concurrency", "0"]).is_err()
        );
    }
}
