//! CronJobs the operator owns for a policy (one per scheduled materialized-view refresh,
//! one for backups): deterministic names, an owner reference to the policy, restricted pod
//! security, credentials only from Secrets, `concurrencyPolicy: Forbid`.
//!
//! Why CronJobs rather than the operator's own scheduler: a refresh can run for minutes
//! and must survive operator restarts and leader hand-overs; Kubernetes already keeps the
//! schedule, history, retries and `kubectl get jobs` visibility, and the operator stays
//! stateless.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{CronJob, CronJobSpec, JobSpec, JobTemplateSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec, PodTemplateSpec,
    ResourceRequirements, SeccompProfile, SecretKeySelector, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};

use crate::api::{BackupRetention, BackupsSpec, DatabasePolicy, MaterializedView, DEFAULT_SCHEMA};
use crate::duration::parse_duration;
use crate::engine::areas::matviews::DEFAULT_REFRESH_TIMEOUT;

pub(crate) const MANAGED_BY: &str = "dbpolicy";
pub(crate) const POLICY_LABEL: &str = "dbpolicy.dev/policy";
pub(crate) const ROLE_LABEL: &str = "dbpolicy.dev/job";
/// Kubernetes limits CronJob names to 52 characters (the Job name gets a suffix).
const MAX_NAME: usize = 52;

/// `<policy>-<suffix>`, shortened with a stable hash when too long.
pub(crate) fn child_name(policy: &str, suffix: &str) -> String {
    let name = format!("{policy}-{suffix}")
        .to_lowercase()
        .replace(['_', '.'], "-");
    if name.len() <= MAX_NAME {
        return name;
    }
    // FNV-1a: stable across runs and versions, unlike std's hasher.
    let hash = name.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    });
    format!(
        "{}-{:08x}",
        name[..MAX_NAME - 9].trim_end_matches('-'),
        hash as u32
    )
}

pub(crate) fn labels(policy: &DatabasePolicy, role: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/managed-by".to_string(),
            MANAGED_BY.to_string(),
        ),
        (POLICY_LABEL.to_string(), policy.name_any()),
        (ROLE_LABEL.to_string(), role.to_string()),
    ])
}

/// The database URL from the policy's connection Secret: never in args, logs or the spec.
pub(crate) fn database_url_env(policy: &DatabasePolicy) -> EnvVar {
    let r = &policy.spec.database.connection_secret_ref;
    EnvVar {
        name: "DATABASE_URL".into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: r.name.clone(),
                key: r.effective_key().to_string(),
                optional: Some(false),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The pod half of the `restricted` Pod Security Standard: non-root (the image's
/// nonroot uid), the runtime's default seccomp profile.
pub(crate) fn restricted_pod_security() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(65532),
        run_as_group: Some(65532),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The container half: no privilege escalation, no capabilities, read-only root.
pub(crate) fn restricted_container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A restricted-profile pod running `dbpolicy <args>` once.
pub(crate) fn job_template(
    policy: &DatabasePolicy,
    image: &str,
    args: Vec<String>,
    deadline_seconds: Option<i64>,
    role: &str,
) -> JobTemplateSpec {
    JobTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels(policy, role)),
            ..Default::default()
        }),
        spec: Some(JobSpec {
            backoff_limit: Some(2),
            active_deadline_seconds: deadline_seconds,
            ttl_seconds_after_finished: Some(86400),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(policy, role)),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    restart_policy: Some("Never".into()),
                    automount_service_account_token: Some(false),
                    security_context: Some(restricted_pod_security()),
                    containers: vec![Container {
                        name: role.into(),
                        image: Some(image.into()),
                        args: Some(args),
                        env: Some(vec![database_url_env(policy)]),
                        security_context: Some(restricted_container_security()),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
    }
}

/// The CronJob refreshing one scheduled view; None when the view has no schedule.
pub(crate) fn refresh_cronjob(
    policy: &DatabasePolicy,
    view: &MaterializedView,
    image: &str,
) -> Option<CronJob> {
    let schedule = view.schedule.clone()?;
    let qualified = format!(
        "{}.{}",
        view.schema.as_deref().unwrap_or(DEFAULT_SCHEMA),
        view.name
    );
    let timeout = view
        .timeout
        .clone()
        .unwrap_or_else(|| DEFAULT_REFRESH_TIMEOUT.into());
    let mut args = vec![
        "refresh".to_string(),
        "--view".into(),
        qualified,
        "--timeout".into(),
        timeout.clone(),
        "--lock-timeout".into(),
        policy.spec.lock_timeout().to_string(),
    ];
    if view.concurrently.unwrap_or(false) {
        args.push("--concurrently".into());
    }
    // The pod may take a little longer than the statement it runs (start-up, connect).
    let deadline = parse_duration(&timeout)
        .ok()
        .map(|d| d.as_secs() as i64 + 120);
    Some(CronJob {
        metadata: ObjectMeta {
            name: Some(child_name(
                &policy.name_any(),
                &format!("refresh-{}", view.name),
            )),
            namespace: policy.namespace(),
            labels: Some(labels(policy, "refresh")),
            owner_references: policy.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        },
        spec: Some(CronJobSpec {
            schedule,
            concurrency_policy: Some("Forbid".into()),
            successful_jobs_history_limit: Some(3),
            failed_jobs_history_limit: Some(3),
            starting_deadline_seconds: Some(300),
            suspend: Some(policy.spec.is_suspended()),
            job_template: job_template(policy, image, args, deadline, "refresh"),
            ..Default::default()
        }),
        status: None,
    })
}

/// Every refresh CronJob the policy asks for.
pub(crate) fn refresh_cronjobs(policy: &DatabasePolicy, image: &str) -> Vec<CronJob> {
    policy
        .spec
        .materialized_views
        .iter()
        .flat_map(|m| &m.views)
        .filter_map(|v| refresh_cronjob(policy, v, image))
        .collect()
}

/// Where the backup job mounts the PersistentVolumeClaim of `storage.pvc`.
pub(crate) const BACKUP_MOUNT: &str = "/backups";

pub(crate) fn secret_env(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.into(),
                key: key.into(),
                optional: Some(false),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// How a pod reaches the database and the backup store: the store flags; the env
/// (`DATABASE_URL`, the S3 keys from the credentials Secret, `TMPDIR`); the volumes: `/tmp`
/// as an emptyDir (the root file system is read-only) and the claim of `storage.pvc` at
/// [`BACKUP_MOUNT`].
pub(crate) struct StoreMount {
    pub args: Vec<String>,
    pub env: Vec<EnvVar>,
    pub volumes: Vec<Volume>,
    pub mounts: Vec<VolumeMount>,
}

pub(crate) fn store_mount(policy: &DatabasePolicy, spec: &BackupsSpec) -> StoreMount {
    let mut args = Vec::new();
    let mut env = vec![database_url_env(policy)];
    let mut volumes = vec![Volume {
        name: "tmp".into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Default::default()
    }];
    let mut mounts = vec![VolumeMount {
        name: "tmp".into(),
        mount_path: "/tmp".into(),
        ..Default::default()
    }];
    if let Some(pvc) = &spec.storage.pvc {
        let sub = pvc.path.as_deref().unwrap_or("").trim_matches('/');
        let dir = if sub.is_empty() {
            BACKUP_MOUNT.to_string()
        } else {
            format!("{BACKUP_MOUNT}/{sub}")
        };
        args.extend(["--dir".into(), dir]);
        volumes.push(Volume {
            name: "backups".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: pvc.claim_name.clone(),
                read_only: Some(false),
            }),
            ..Default::default()
        });
        mounts.push(VolumeMount {
            name: "backups".into(),
            mount_path: BACKUP_MOUNT.into(),
            ..Default::default()
        });
    }
    if let Some(s3) = &spec.storage.s3 {
        args.extend(["--s3-bucket".into(), s3.bucket.clone()]);
        for (flag, value) in [
            ("--s3-endpoint", &s3.endpoint),
            ("--s3-region", &s3.region),
            ("--s3-prefix", &s3.prefix),
        ] {
            if let Some(v) = value {
                args.extend([flag.to_string(), v.clone()]);
            }
        }
        let secret = &s3.credentials_secret_ref.name;
        env.push(secret_env("AWS_ACCESS_KEY_ID", secret, "AWS_ACCESS_KEY_ID"));
        env.push(secret_env(
            "AWS_SECRET_ACCESS_KEY",
            secret,
            "AWS_SECRET_ACCESS_KEY",
        ));
    }
    env.push(EnvVar {
        name: "TMPDIR".into(),
        value: Some("/tmp".into()),
        ..Default::default()
    });
    StoreMount {
        args,
        env,
        volumes,
        mounts,
    }
}

/// `--retention-days` / `--retention-count`, as `backup run` and `backup base` take them.
pub(crate) fn retention_args(retention: Option<&BackupRetention>) -> Vec<String> {
    let mut args = Vec::new();
    if let Some(r) = retention {
        if let Some(days) = r.days {
            args.extend(["--retention-days".into(), days.to_string()]);
        }
        if let Some(count) = r.count {
            args.extend(["--retention-count".into(), count.to_string()]);
        }
    }
    args
}

/// A scheduled job that writes to the backup store (`backup run`, `backup base`).
pub(crate) struct StoreJob {
    pub name: String,
    pub role: &'static str,
    pub image: String,
    pub args: Vec<String>,
    pub mount: StoreMount,
    pub resources: Option<ResourceRequirements>,
    pub schedule: String,
    pub suspend: bool,
}

/// The CronJob of a [`StoreJob`]: one run at a time, no active deadline (a dump or a base
/// backup takes as long as the database is big), the store's volumes and env, and the
/// outcome in the termination message, where the controller reads it.
pub(crate) fn store_cronjob(policy: &DatabasePolicy, job: StoreJob) -> CronJob {
    let StoreJob {
        name,
        role,
        image,
        args,
        mount,
        resources,
        schedule,
        suspend,
    } = job;
    let mut template = job_template(policy, &image, args, None, role);
    if let Some(pod) = template
        .spec
        .as_mut()
        .and_then(|j| j.template.spec.as_mut())
    {
        // Files written to the volume belong to the job's group, whoever owns the claim.
        if let Some(sc) = pod.security_context.as_mut() {
            sc.fs_group = Some(65532);
            sc.fs_group_change_policy = Some("OnRootMismatch".into());
        }
        pod.volumes = Some(mount.volumes);
        let container = &mut pod.containers[0];
        container.env = Some(mount.env);
        container.volume_mounts = Some(mount.mounts);
        container.resources = resources;
        // The command writes its outcome (newest size and window, or the failure's reason)
        // to /dev/termination-log; a crash before that leaves the log tail.
        container.termination_message_policy = Some("FallbackToLogsOnError".into());
    }
    CronJob {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: policy.namespace(),
            labels: Some(labels(policy, role)),
            owner_references: policy.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        },
        spec: Some(CronJobSpec {
            schedule,
            concurrency_policy: Some("Forbid".into()),
            successful_jobs_history_limit: Some(3),
            failed_jobs_history_limit: Some(3),
            starting_deadline_seconds: Some(300),
            suspend: Some(suspend),
            job_template: template,
            ..Default::default()
        }),
        status: None,
    }
}

/// The CronJob running `dbpolicy backup run` for the policy; None without `spec.backups`.
///
/// Storage settings are flags (nothing secret, and `kubectl describe` shows them); the
/// database URL and S3 keys come from Secrets as environment variables. The root file
/// system is read-only, so `/tmp` (where `--verify` downloads the dump) is an emptyDir.
pub(crate) fn backup_cronjob(policy: &DatabasePolicy, image: &str) -> Option<CronJob> {
    let spec = policy.spec.backups.as_ref()?;
    let mut mount = store_mount(policy, spec);
    let mut args = vec![
        "backup".to_string(),
        "run".into(),
        "--compression".into(),
        spec.compression.unwrap_or(6).to_string(),
    ];
    args.append(&mut mount.args);
    args.extend(retention_args(spec.retention.as_ref()));
    if spec.verify.unwrap_or(false) {
        args.push("--verify".into());
    }
    Some(store_cronjob(
        policy,
        StoreJob {
            name: child_name(&policy.name_any(), "backup"),
            role: "backup",
            image: spec.image.as_deref().unwrap_or(image).to_string(),
            args,
            mount,
            resources: spec.resources.clone(),
            schedule: spec.schedule.clone(),
            suspend: policy.spec.is_suspended() || spec.suspend.unwrap_or(false),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> DatabasePolicy {
        let mut p: DatabasePolicy = serde_yaml::from_str(
            "apiVersion: dbpolicy.dev/v1alpha1\nkind: DatabasePolicy\nmetadata: {name: certquiz, namespace: quiz, uid: 1234-5678}\nspec:\n  database: {connectionSecretRef: {name: certquiz-db}}\n  materializedViews:\n    views:\n      - {name: category_statistics, schedule: '*/15 * * * *', concurrently: true, timeout: 10m}\n      - {name: unscheduled}\n",
        )
        .unwrap();
        p.metadata.uid = Some("1234-5678".into());
        p
    }

    #[test]
    fn one_cronjob_per_scheduled_view() {
        let jobs = refresh_cronjobs(&policy(), "ghcr.io/dbpolicy/dbpolicy:0.1.0");
        assert_eq!(jobs.len(), 1);
        let cj = &jobs[0];
        assert_eq!(
            cj.metadata.name.as_deref(),
            Some("certquiz-refresh-category-statistics")
        );
        assert_eq!(cj.metadata.namespace.as_deref(), Some("quiz"));
        let owner = &cj.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.controller),
            ("DatabasePolicy", Some(true))
        );
        let spec = cj.spec.as_ref().unwrap();
        assert_eq!(spec.concurrency_policy.as_deref(), Some("Forbid"));
        let pod = spec
            .job_template
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap();
        let c = &pod.containers[0];
        assert_eq!(
            c.args.as_ref().unwrap(),
            &[
                "refresh",
                "--view",
                "public.category_statistics",
                "--timeout",
                "10m",
                "--lock-timeout",
                "5s",
                "--concurrently"
            ]
        );
        let env = &c.env.as_ref().unwrap()[0];
        assert_eq!(env.name, "DATABASE_URL");
        let secret = env
            .value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap();
        assert_eq!(
            (secret.name.as_str(), secret.key.as_str()),
            ("certquiz-db", "uri")
        );
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(
            sc.capabilities.as_ref().unwrap().drop.as_deref(),
            Some(&["ALL".to_string()][..])
        );
        assert_eq!(
            spec.job_template
                .spec
                .as_ref()
                .unwrap()
                .active_deadline_seconds,
            Some(720)
        );
    }

    #[test]
    fn long_names_are_shortened_stably() {
        let long = child_name(
            "a-very-long-policy-name-for-the-quiz-application",
            "refresh-category_statistics_by_month",
        );
        assert!(long.len() <= MAX_NAME, "{long}");
        assert_eq!(
            long,
            child_name(
                "a-very-long-policy-name-for-the-quiz-application",
                "refresh-category_statistics_by_month"
            )
        );
        assert_ne!(
            long,
            child_name(
                "a-very-long-policy-name-for-the-quiz-application",
                "refresh-category_statistics_by_week"
            )
        );
    }
}

#[cfg(test)]
mod backup_tests {
    use super::*;
    use serde_json::Value;

    const IMAGE: &str = "ghcr.io/dbpolicy/dbpolicy:0.1.0";

    use crate::jobs::test_policy as policy;

    fn pvc_policy() -> DatabasePolicy {
        policy(
            "  backups:\n    schedule: '0 3 * * *'\n    retention: {days: 30}\n    storage: {pvc: {claimName: certquiz-backups, path: /nightly/}}\n    compression: 9\n    verify: true\n    resources: {requests: {cpu: 100m, memory: 256Mi}, limits: {memory: 1Gi}}\n",
        )
    }

    fn s3_policy() -> DatabasePolicy {
        policy(
            "  backups:\n    schedule: '@daily'\n    retention: {days: 7, count: 10}\n    storage:\n      s3: {bucket: quiz-backups, endpoint: 'https://minio.storage:9000', region: eu-west-1, prefix: certquiz, credentialsSecretRef: {name: s3-creds}}\n    image: registry.local/dbpolicy:dev\n    suspend: true\n",
        )
    }

    fn pod(cj: &CronJob) -> &PodSpec {
        cj.spec
            .as_ref()
            .unwrap()
            .job_template
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
    }

    fn env_secret(c: &Container, name: &str) -> (String, String) {
        let e = c
            .env
            .as_ref()
            .unwrap()
            .iter()
            .find(|e| e.name == name)
            .unwrap_or_else(|| panic!("no env {name}"));
        assert!(e.value.is_none(), "{name} must come from a Secret");
        let s = e
            .value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap();
        (s.name.clone(), s.key.clone())
    }

    #[test]
    fn no_backups_section_no_cronjob() {
        assert!(backup_cronjob(&policy(""), IMAGE).is_none());
    }

    #[test]
    fn pvc_backup_cronjob() {
        let cj = backup_cronjob(&pvc_policy(), IMAGE).unwrap();
        assert_eq!(cj.metadata.name.as_deref(), Some("certquiz-backup"));
        assert_eq!(cj.metadata.namespace.as_deref(), Some("quiz"));
        let owner = &cj.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str(), owner.controller),
            ("DatabasePolicy", "certquiz", Some(true))
        );
        assert_eq!(cj.metadata.labels.as_ref().unwrap()[ROLE_LABEL], "backup");
        let spec = cj.spec.as_ref().unwrap();
        assert_eq!(spec.schedule, "0 3 * * *");
        assert_eq!(spec.concurrency_policy.as_deref(), Some("Forbid"));
        assert_eq!(
            (
                spec.successful_jobs_history_limit,
                spec.failed_jobs_history_limit
            ),
            (Some(3), Some(3))
        );
        assert_eq!(spec.suspend, Some(false));
        assert_eq!(
            spec.job_template
                .spec
                .as_ref()
                .unwrap()
                .active_deadline_seconds,
            None
        );
        let pod = pod(&cj);
        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some(IMAGE));
        assert_eq!(
            c.args.as_ref().unwrap(),
            &[
                "backup",
                "run",
                "--compression",
                "9",
                "--dir",
                "/backups/nightly",
                "--retention-days",
                "30",
                "--verify"
            ]
        );
        assert_eq!(
            env_secret(c, "DATABASE_URL"),
            ("certquiz-db".into(), "uri".into())
        );
        assert!(!c
            .env
            .as_ref()
            .unwrap()
            .iter()
            .any(|e| e.name.starts_with("AWS_")));
        let volumes = pod.volumes.as_ref().unwrap();
        assert_eq!(volumes[0].name, "tmp");
        assert!(volumes[0].empty_dir.is_some());
        assert_eq!(
            volumes[1]
                .persistent_volume_claim
                .as_ref()
                .unwrap()
                .claim_name,
            "certquiz-backups"
        );
        let mounts: Vec<(&str, &str)> = c
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .map(|m| (m.name.as_str(), m.mount_path.as_str()))
            .collect();
        assert_eq!(mounts, [("tmp", "/tmp"), ("backups", "/backups")]);
        let resources = c.resources.as_ref().unwrap();
        assert_eq!(resources.limits.as_ref().unwrap()["memory"].0, "1Gi");
        // Restricted pod security, and a group that can write to the claim.
        let psc = pod.security_context.as_ref().unwrap();
        assert_eq!(
            (psc.run_as_non_root, psc.fs_group),
            (Some(true), Some(65532))
        );
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(
            (sc.read_only_root_filesystem, sc.allow_privilege_escalation),
            (Some(true), Some(false))
        );
        assert_eq!(pod.automount_service_account_token, Some(false));
        assert_eq!(
            c.termination_message_policy.as_deref(),
            Some("FallbackToLogsOnError")
        );
    }

    #[test]
    fn s3_backup_cronjob() {
        let cj = backup_cronjob(&s3_policy(), IMAGE).unwrap();
        let spec = cj.spec.as_ref().unwrap();
        assert_eq!(
            spec.suspend,
            Some(true),
            "backups.suspend pauses the schedule"
        );
        let pod = pod(&cj);
        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some("registry.local/dbpolicy:dev"));
        assert_eq!(
            c.args.as_ref().unwrap(),
            &[
                "backup",
                "run",
                "--compression",
                "6",
                "--s3-bucket",
                "quiz-backups",
                "--s3-endpoint",
                "https://minio.storage:9000",
                "--s3-region",
                "eu-west-1",
                "--s3-prefix",
                "certquiz",
                "--retention-days",
                "7",
                "--retention-count",
                "10"
            ]
        );
        assert_eq!(
            env_secret(c, "AWS_ACCESS_KEY_ID"),
            ("s3-creds".into(), "AWS_ACCESS_KEY_ID".into())
        );
        assert_eq!(
            env_secret(c, "AWS_SECRET_ACCESS_KEY"),
            ("s3-creds".into(), "AWS_SECRET_ACCESS_KEY".into())
        );
        assert_eq!(
            pod.volumes.as_ref().unwrap().len(),
            1,
            "only /tmp without a claim"
        );
        // A suspended policy suspends its backups too.
        let mut p = pvc_policy();
        p.spec.suspend = Some(true);
        assert_eq!(
            backup_cronjob(&p, IMAGE).unwrap().spec.unwrap().suspend,
            Some(true)
        );
    }

    #[test]
    fn the_args_parse_as_the_cli_expects() {
        use clap::Parser;
        for p in [pvc_policy(), s3_policy()] {
            let cj = backup_cronjob(&p, IMAGE).unwrap();
            let args = pod(&cj).containers[0].args.clone().unwrap();
            let cli = crate::cli::Cli::try_parse_from(
                std::iter::once("dbpolicy".to_string()).chain(args),
            )
            .unwrap_or_else(|e| panic!("{e}"));
            assert!(matches!(cli.command, crate::cli::Command::Backup(_)));
        }
    }

    /// Required properties of the types used, from the published Kubernetes 1.33 OpenAPI
    /// definitions (`io.k8s.api.batch.v1.CronJobSpec` etc.).
    fn check_required(path: &str, v: &Value, errors: &mut Vec<String>) {
        let Some(obj) = v.as_object() else {
            if let Some(items) = v.as_array() {
                for (i, item) in items.iter().enumerate() {
                    check_required(&format!("{path}[{i}]"), item, errors);
                }
            }
            return;
        };
        let field = path
            .rsplit('.')
            .next()
            .unwrap_or("")
            .split('[')
            .next()
            .unwrap_or("");
        let required: &[&str] = match field {
            "" => &["apiVersion", "kind", "metadata", "spec"],
            "spec" if path == ".spec" => &["schedule", "jobTemplate"],
            "spec" if path.ends_with("jobTemplate.spec") => &["template"],
            "spec" if path.ends_with("template.spec") => &["containers"],
            "containers" => &["name", "image"],
            "env" => &["name"],
            "secretKeyRef" => &["key", "name"],
            "volumes" => &["name"],
            "volumeMounts" => &["name", "mountPath"],
            "persistentVolumeClaim" => &["claimName"],
            "ownerReferences" => &["apiVersion", "kind", "name", "uid"],
            "seccompProfile" => &["type"],
            _ => &[],
        };
        for r in required {
            if obj.get(*r).is_none_or(|x| x.is_null()) {
                errors.push(format!("{path}: required field {r} is missing"));
            }
        }
        for (k, child) in obj {
            check_required(&format!("{path}.{k}"), child, errors);
        }
    }

    fn dns_label(s: &str, max: usize) -> bool {
        !s.is_empty()
            && s.len() <= max
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !s.starts_with('-')
            && !s.ends_with('-')
    }

    #[test]
    fn manifest_is_a_valid_batch_v1_cronjob() {
        for p in [pvc_policy(), s3_policy()] {
            let cj = backup_cronjob(&p, IMAGE).unwrap();
            let value = serde_json::to_value(&cj).unwrap();
            assert_eq!(value["apiVersion"], "batch/v1");
            assert_eq!(value["kind"], "CronJob");
            let mut errors = Vec::new();
            check_required("", &value, &mut errors);
            assert!(errors.is_empty(), "{errors:#?}");
            // Enumerations of the schema.
            let spec = &value["spec"];
            assert!(["Allow", "Forbid", "Replace"]
                .contains(&spec["concurrencyPolicy"].as_str().unwrap()));
            let pod = &spec["jobTemplate"]["spec"]["template"]["spec"];
            assert!(
                ["Never", "OnFailure"].contains(&pod["restartPolicy"].as_str().unwrap()),
                "Job pods never restart Always"
            );
            assert_eq!(
                pod["securityContext"]["seccompProfile"]["type"],
                "RuntimeDefault"
            );
            assert!(["Always", "OnRootMismatch"].contains(
                &pod["securityContext"]["fsGroupChangePolicy"]
                    .as_str()
                    .unwrap()
            ));
            assert!(["File", "FallbackToLogsOnError"].contains(
                &pod["containers"][0]["terminationMessagePolicy"]
                    .as_str()
                    .unwrap()
            ));
            // Names: a CronJob name of at most 52 characters; DNS labels for containers and volumes.
            assert!(dns_label(value["metadata"]["name"].as_str().unwrap(), 52));
            for c in pod["containers"].as_array().unwrap() {
                assert!(dns_label(c["name"].as_str().unwrap(), 63));
            }
            for v in pod["volumes"].as_array().unwrap() {
                assert!(dns_label(v["name"].as_str().unwrap(), 63));
            }
            for (k, v) in value["metadata"]["labels"].as_object().unwrap() {
                assert!(
                    k.len() <= 63 + 254 && v.as_str().unwrap().len() <= 63,
                    "{k}={v}"
                );
            }
            // Every mount names a volume of the pod.
            let volumes: Vec<&str> = pod["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v["name"].as_str().unwrap())
                .collect();
            for m in pod["containers"][0]["volumeMounts"].as_array().unwrap() {
                assert!(volumes.contains(&m["name"].as_str().unwrap()));
            }
            // Round trip through the batch/v1 type: an unknown or misspelt field would be
            // dropped here and the documents would differ.
            let back: CronJob = serde_json::from_value(value.clone()).unwrap();
            assert_eq!(back, cj);
            assert_eq!(serde_json::to_value(&back).unwrap(), value);
            let yaml = serde_yaml::to_string(&cj).unwrap();
            let from_yaml: CronJob = serde_yaml::from_str(&yaml).unwrap();
            assert_eq!(from_yaml, cj);
        }
    }
}
