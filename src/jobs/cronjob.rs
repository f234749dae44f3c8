//! CronJobs the operator owns for a policy (one per scheduled materialized-view refresh;
//! backups later): deterministic names, an owner reference to the policy, restricted pod
//! security, credentials only from Secrets, `concurrencyPolicy: Forbid`.
//!
//! Why CronJobs rather than the operator's own scheduler: a refresh can run for minutes
//! and must survive operator restarts and leader hand-overs; Kubernetes already keeps the
//! schedule, history, retries and `kubectl get jobs` visibility, and the operator stays
//! stateless.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{CronJob, CronJobSpec, JobSpec, JobTemplateSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EnvVar, EnvVarSource, PodSecurityContext, PodSpec, PodTemplateSpec, SeccompProfile,
    SecretKeySelector, SecurityContext,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};

use crate::api::{DatabasePolicy, MaterializedView, DEFAULT_SCHEMA};
use crate::duration::parse_duration;
use crate::engine::areas::matviews::DEFAULT_REFRESH_TIMEOUT;

pub const MANAGED_BY: &str = "dbpolicy";
pub const POLICY_LABEL: &str = "dbpolicy.dev/policy";
pub const ROLE_LABEL: &str = "dbpolicy.dev/job";
/// Kubernetes limits CronJob names to 52 characters (the Job name gets a suffix).
const MAX_NAME: usize = 52;

/// `<policy>-<suffix>`, shortened with a stable hash when too long.
pub fn child_name(policy: &str, suffix: &str) -> String {
    let name = format!("{policy}-{suffix}").to_lowercase().replace(['_', '.'], "-");
    if name.len() <= MAX_NAME {
        return name;
    }
    // FNV-1a: stable across runs and versions, unlike std's hasher.
    let hash = name.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100000001b3));
    format!("{}-{:08x}", name[..MAX_NAME - 9].trim_end_matches('-'), hash as u32)
}

pub fn labels(policy: &DatabasePolicy, role: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/managed-by".to_string(), MANAGED_BY.to_string()),
        (POLICY_LABEL.to_string(), policy.name_any()),
        (ROLE_LABEL.to_string(), role.to_string()),
    ])
}

/// The database URL from the policy's connection Secret: never in args, logs or the spec.
fn database_url_env(policy: &DatabasePolicy) -> EnvVar {
    let r = &policy.spec.database.connection_secret_ref;
    EnvVar {
        name: "DATABASE_URL".into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector { name: r.name.clone(), key: r.effective_key().to_string(), optional: Some(false) }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A restricted-profile pod running `dbpolicy <args>` once.
fn job_template(policy: &DatabasePolicy, image: &str, args: Vec<String>, deadline_seconds: Option<i64>, role: &str) -> JobTemplateSpec {
    JobTemplateSpec {
        metadata: Some(ObjectMeta { labels: Some(labels(policy, role)), ..Default::default() }),
        spec: Some(JobSpec {
            backoff_limit: Some(2),
            active_deadline_seconds: deadline_seconds,
            ttl_seconds_after_finished: Some(86400),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta { labels: Some(labels(policy, role)), ..Default::default() }),
                spec: Some(PodSpec {
                    restart_policy: Some("Never".into()),
                    automount_service_account_token: Some(false),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(65532),
                        run_as_group: Some(65532),
                        seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..Default::default() }),
                        ..Default::default()
                    }),
                    containers: vec![Container {
                        name: role.into(),
                        image: Some(image.into()),
                        args: Some(args),
                        env: Some(vec![database_url_env(policy)]),
                        security_context: Some(SecurityContext {
                            allow_privilege_escalation: Some(false),
                            read_only_root_filesystem: Some(true),
                            run_as_non_root: Some(true),
                            capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Default::default() }),
                            ..Default::default()
                        }),
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
pub fn refresh_cronjob(policy: &DatabasePolicy, view: &MaterializedView, image: &str) -> Option<CronJob> {
    let schedule = view.schedule.clone()?;
    let qualified = format!("{}.{}", view.schema.as_deref().unwrap_or(DEFAULT_SCHEMA), view.name);
    let timeout = view.timeout.clone().unwrap_or_else(|| DEFAULT_REFRESH_TIMEOUT.into());
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
    let deadline = parse_duration(&timeout).ok().map(|d| d.as_secs() as i64 + 120);
    Some(CronJob {
        metadata: ObjectMeta {
            name: Some(child_name(&policy.name_any(), &format!("refresh-{}", view.name))),
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
pub fn refresh_cronjobs(policy: &DatabasePolicy, image: &str) -> Vec<CronJob> {
    policy
        .spec
        .materialized_views
        .iter()
        .flat_map(|m| &m.views)
        .filter_map(|v| refresh_cronjob(policy, v, image))
        .collect()
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
        assert_eq!(cj.metadata.name.as_deref(), Some("certquiz-refresh-category-statistics"));
        assert_eq!(cj.metadata.namespace.as_deref(), Some("quiz"));
        let owner = &cj.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!((owner.kind.as_str(), owner.controller), ("DatabasePolicy", Some(true)));
        let spec = cj.spec.as_ref().unwrap();
        assert_eq!(spec.concurrency_policy.as_deref(), Some("Forbid"));
        let pod = spec.job_template.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        let c = &pod.containers[0];
        assert_eq!(
            c.args.as_ref().unwrap(),
            &["refresh", "--view", "public.category_statistics", "--timeout", "10m", "--lock-timeout", "5s", "--concurrently"]
        );
        let env = &c.env.as_ref().unwrap()[0];
        assert_eq!(env.name, "DATABASE_URL");
        let secret = env.value_from.as_ref().unwrap().secret_key_ref.as_ref().unwrap();
        assert_eq!((secret.name.as_str(), secret.key.as_str()), ("certquiz-db", "uri"));
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.capabilities.as_ref().unwrap().drop.as_deref(), Some(&["ALL".to_string()][..]));
        assert_eq!(spec.job_template.spec.as_ref().unwrap().active_deadline_seconds, Some(720));
    }

    #[test]
    fn long_names_are_shortened_stably() {
        let long = child_name("a-very-long-policy-name-for-the-quiz-application", "refresh-category_statistics_by_month");
        assert!(long.len() <= MAX_NAME, "{long}");
        assert_eq!(long, child_name("a-very-long-policy-name-for-the-quiz-application", "refresh-category_statistics_by_month"));
        assert_ne!(long, child_name("a-very-long-policy-name-for-the-quiz-application", "refresh-category_statistics_by_week"));
    }
}
