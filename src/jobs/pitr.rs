//! The Kubernetes objects of point-in-time recovery (`spec.backups.pointInTimeRecovery`):
//! the WAL receiver Deployment with its spool PersistentVolumeClaim, and the base backup
//! CronJob. Pure builders; the controller applies them (`controller::pitr`).
//!
//! Why a Deployment for the receiver: it streams without end and must come back after a
//! node drain or a crash; one replica with `Recreate`, because two receivers on one slot
//! would fight over it (PostgreSQL lets one connection use a slot at a time) and the
//! spool claim is ReadWriteOnce. Why its own claim: `pg_receivewal` confirms WAL to the
//! server once it is synced in the spool, and the slot then releases it, so the spool
//! must outlive the pod (an `emptyDir` would lose confirmed WAL on a reschedule).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy};
use k8s_openapi::api::batch::v1::CronJob;
use k8s_openapi::api::core::v1::{
    EmptyDirVolumeSource, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PersistentVolumeClaimVolumeSource, PodSpec, PodTemplateSpec, Volume, VolumeMount,
    VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::{Resource, ResourceExt};

use super::cronjob::{
    child_name, labels, restricted_container_security, restricted_pod_security, retention_args,
    store_cronjob, store_mount, StoreJob, StoreMount,
};
use crate::api::{BackupsSpec, DatabasePolicy, PointInTimeRecovery};

/// Role labels (`dbpolicy.dev/job`) of the PITR objects.
pub(crate) const RECEIVER_ROLE: &str = "wal-receiver";
pub(crate) const BASE_BACKUP_ROLE: &str = "base-backup";
/// Where the receiver mounts its spool claim.
pub(crate) const SPOOL_MOUNT: &str = "/spool";
/// Where the base backup is written and checked before upload.
pub(crate) const WORK_MOUNT: &str = "/work";
/// The receiver ships what is complete on SIGTERM before it exits: time for that.
const RECEIVER_GRACE_SECONDS: i64 = 120;

/// The PITR section when the policy runs it (backups present, PITR not disabled).
pub(crate) fn enabled(policy: &DatabasePolicy) -> Option<(&BackupsSpec, &PointInTimeRecovery)> {
    let b = policy.spec.backups.as_ref()?;
    Some((b, b.pitr()?))
}

pub(crate) fn receiver_name(policy: &DatabasePolicy) -> String {
    child_name(&policy.name_any(), RECEIVER_ROLE)
}

pub(crate) fn spool_claim_name(policy: &DatabasePolicy) -> String {
    child_name(&policy.name_any(), "wal-spool")
}

pub(crate) fn base_backup_name(policy: &DatabasePolicy) -> String {
    child_name(&policy.name_any(), BASE_BACKUP_ROLE)
}

fn meta(policy: &DatabasePolicy, name: String, role: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: policy.namespace(),
        labels: Some(labels(policy, role)),
        owner_references: policy.controller_owner_ref(&()).map(|o| vec![o]),
        ..Default::default()
    }
}

fn suspended(policy: &DatabasePolicy, b: &BackupsSpec) -> bool {
    policy.spec.is_suspended() || b.suspend.unwrap_or(false)
}

/// The store's mount plus `--cluster`, which every PITR pod needs.
fn pitr_mount(policy: &DatabasePolicy, b: &BackupsSpec, p: &PointInTimeRecovery) -> StoreMount {
    let mut m = store_mount(policy, b);
    m.args
        .extend(["--cluster".to_string(), p.cluster().to_string()]);
    m
}

/// The receiver's spool: ReadWriteOnce, `spoolSize`, `spoolStorageClassName`.
pub(crate) fn spool_pvc(policy: &DatabasePolicy) -> Option<PersistentVolumeClaim> {
    let (_, p) = enabled(policy)?;
    Some(PersistentVolumeClaim {
        metadata: meta(policy, spool_claim_name(policy), RECEIVER_ROLE),
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: p.spool_storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_string(),
                    Quantity(p.spool_size().to_string()),
                )])),
                ..Default::default()
            }),
            ..Default::default()
        }),
        status: None,
    })
}

/// The WAL receiver: `dbpolicy backup wal-receive` in one restricted pod, `Recreate`,
/// zero replicas while backups are suspended.
pub(crate) fn receiver_deployment(policy: &DatabasePolicy, image: &str) -> Option<Deployment> {
    let (b, p) = enabled(policy)?;
    let StoreMount {
        args: store_args,
        env,
        mut volumes,
        mut mounts,
    } = pitr_mount(policy, b, p);
    let mut args = vec!["backup".to_string(), "wal-receive".into()];
    args.extend(store_args);
    args.extend([
        "--slot".into(),
        p.slot().to_string(),
        "--spool".into(),
        SPOOL_MOUNT.into(),
    ]);
    volumes.push(Volume {
        name: "spool".into(),
        persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
            claim_name: spool_claim_name(policy),
            read_only: Some(false),
        }),
        ..Default::default()
    });
    mounts.push(VolumeMount {
        name: "spool".into(),
        mount_path: SPOOL_MOUNT.into(),
        ..Default::default()
    });
    let labels = labels(policy, RECEIVER_ROLE);
    let mut pod_security = restricted_pod_security();
    // Files on the claims belong to the pod's group, whoever owns the volume's root.
    pod_security.fs_group = Some(65532);
    pod_security.fs_group_change_policy = Some("OnRootMismatch".into());
    let image = b.image.as_deref().unwrap_or(image);
    Some(Deployment {
        metadata: meta(policy, receiver_name(policy), RECEIVER_ROLE),
        spec: Some(DeploymentSpec {
            replicas: Some(if suspended(policy, b) { 0 } else { 1 }),
            selector: LabelSelector {
                match_labels: Some(labels.clone()),
                ..Default::default()
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("Recreate".into()),
                ..Default::default()
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    termination_grace_period_seconds: Some(RECEIVER_GRACE_SECONDS),
                    security_context: Some(pod_security),
                    containers: vec![k8s_openapi::api::core::v1::Container {
                        name: RECEIVER_ROLE.into(),
                        image: Some(image.into()),
                        args: Some(args),
                        env: Some(env),
                        volume_mounts: Some(mounts),
                        resources: p.resources.clone(),
                        security_context: Some(restricted_container_security()),
                        termination_message_policy: Some("FallbackToLogsOnError".into()),
                        ..Default::default()
                    }],
                    volumes: Some(volumes),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        status: None,
    })
}

/// The base backups: `dbpolicy backup base` on `baseBackupSchedule`, its retention
/// pruning base backups and WAL together. The backup is written and checked in an
/// emptyDir before upload (about twice the database's size on the node).
pub(crate) fn base_backup_cronjob(policy: &DatabasePolicy, image: &str) -> Option<CronJob> {
    let (b, p) = enabled(policy)?;
    let mut mount = pitr_mount(policy, b, p);
    let mut args = vec!["backup".to_string(), "base".into()];
    args.append(&mut mount.args);
    args.extend(["--work-dir".into(), WORK_MOUNT.into()]);
    args.extend(retention_args(p.retention.as_ref()));
    mount.volumes.push(Volume {
        name: "work".into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Default::default()
    });
    mount.mounts.push(VolumeMount {
        name: "work".into(),
        mount_path: WORK_MOUNT.into(),
        ..Default::default()
    });
    Some(store_cronjob(
        policy,
        StoreJob {
            name: base_backup_name(policy),
            role: BASE_BACKUP_ROLE,
            image: b.image.as_deref().unwrap_or(image).to_string(),
            args,
            mount,
            resources: p.resources.clone(),
            schedule: p.base_backup_schedule.clone(),
            suspend: suspended(policy, b),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::cronjob::{POLICY_LABEL, ROLE_LABEL};
    use clap::Parser;

    const IMAGE: &str = "ghcr.io/dbpolicy/dbpolicy:0.1.0";

    use crate::jobs::test_policy as policy;

    const PVC: &str = "  backups:\n    schedule: '0 3 * * *'\n    storage: {pvc: {claimName: certquiz-backups}}\n    pointInTimeRecovery:\n      baseBackupSchedule: '0 2 * * 0'\n      retention: {count: 4}\n      slot: quiz_pitr\n      cluster: quiz\n      spoolSize: 2Gi\n      spoolStorageClassName: fast\n";
    const S3: &str = "  backups:\n    schedule: '0 3 * * *'\n    storage:\n      s3: {bucket: quiz-backups, endpoint: 'https://minio:9000', credentialsSecretRef: {name: s3-creds}}\n    image: registry.local/dbpolicy:dev\n    pointInTimeRecovery: {baseBackupSchedule: '@daily', retention: {days: 14}}\n";

    fn owned_by_policy(meta: &ObjectMeta) {
        let o = &meta.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (
                o.kind.as_str(),
                o.name.as_str(),
                o.uid.as_str(),
                o.controller
            ),
            ("DatabasePolicy", "certquiz", "1234-5678", Some(true))
        );
        assert_eq!(meta.namespace.as_deref(), Some("quiz"));
    }

    #[test]
    fn nothing_without_pitr_or_when_disabled() {
        let no_pitr =
            policy("  backups: {schedule: '0 3 * * *', storage: {pvc: {claimName: b}}}\n");
        let off = policy(&PVC.replace(
            "pointInTimeRecovery:\n",
            "pointInTimeRecovery:\n      enabled: false\n",
        ));
        for p in [policy(""), no_pitr, off] {
            assert!(receiver_deployment(&p, IMAGE).is_none());
            assert!(spool_pvc(&p).is_none());
            assert!(base_backup_cronjob(&p, IMAGE).is_none());
        }
    }

    #[test]
    fn receiver_is_one_recreated_restricted_pod_with_a_persistent_spool() {
        let p = policy(PVC);
        let d = receiver_deployment(&p, IMAGE).unwrap();
        assert_eq!(d.metadata.name.as_deref(), Some("certquiz-wal-receiver"));
        owned_by_policy(&d.metadata);
        let spec = d.spec.as_ref().unwrap();
        assert_eq!(spec.replicas, Some(1));
        assert_eq!(
            spec.strategy.as_ref().unwrap().type_.as_deref(),
            Some("Recreate")
        );
        let selector = spec.selector.match_labels.as_ref().unwrap();
        assert_eq!(selector[ROLE_LABEL], RECEIVER_ROLE);
        assert_eq!(selector[POLICY_LABEL], "certquiz");
        assert_eq!(
            spec.template.metadata.as_ref().unwrap().labels.as_ref(),
            Some(selector),
            "the selector matches the pods"
        );
        let pod = spec.template.spec.as_ref().unwrap();
        let psc = pod.security_context.as_ref().unwrap();
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(
            psc.seccomp_profile.as_ref().unwrap().type_,
            "RuntimeDefault"
        );
        assert_eq!(pod.automount_service_account_token, Some(false));
        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some(IMAGE));
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(
            (
                sc.read_only_root_filesystem,
                sc.allow_privilege_escalation,
                sc.run_as_non_root
            ),
            (Some(true), Some(false), Some(true))
        );
        assert_eq!(
            sc.capabilities.as_ref().unwrap().drop.as_deref(),
            Some(&["ALL".to_string()][..])
        );
        assert_eq!(
            c.args.as_ref().unwrap(),
            &[
                "backup",
                "wal-receive",
                "--dir",
                "/backups",
                "--cluster",
                "quiz",
                "--slot",
                "quiz_pitr",
                "--spool",
                "/spool"
            ]
        );
        let env = c.env.as_ref().unwrap();
        assert_eq!(env[0].name, "DATABASE_URL");
        assert!(env[0].value.is_none(), "from the Secret, never inline");
        let mounts: Vec<(&str, &str)> = c
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .map(|m| (m.name.as_str(), m.mount_path.as_str()))
            .collect();
        assert_eq!(
            mounts,
            [
                ("tmp", "/tmp"),
                ("backups", "/backups"),
                ("spool", "/spool")
            ]
        );
        let claims: Vec<&str> = pod
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .filter_map(|v| v.persistent_volume_claim.as_ref())
            .map(|c| c.claim_name.as_str())
            .collect();
        assert_eq!(claims, ["certquiz-backups", "certquiz-wal-spool"]);

        let pvc = spool_pvc(&p).unwrap();
        assert_eq!(pvc.metadata.name.as_deref(), Some("certquiz-wal-spool"));
        owned_by_policy(&pvc.metadata);
        let ps = pvc.spec.unwrap();
        assert_eq!(ps.storage_class_name.as_deref(), Some("fast"));
        assert_eq!(ps.access_modes.unwrap(), ["ReadWriteOnce"]);
        assert_eq!(ps.resources.unwrap().requests.unwrap()["storage"].0, "2Gi");
    }

    #[test]
    fn suspended_backups_scale_the_receiver_to_zero_and_suspend_base_backups() {
        let mut p = policy(PVC);
        p.spec.suspend = Some(true);
        let d = receiver_deployment(&p, IMAGE).unwrap();
        assert_eq!(d.spec.unwrap().replicas, Some(0));
        let cj = base_backup_cronjob(&p, IMAGE).unwrap();
        assert_eq!(cj.spec.unwrap().suspend, Some(true));
    }

    #[test]
    fn base_backup_cronjob_runs_backup_base_with_retention() {
        let p = policy(S3);
        let cj = base_backup_cronjob(&p, IMAGE).unwrap();
        assert_eq!(cj.metadata.name.as_deref(), Some("certquiz-base-backup"));
        owned_by_policy(&cj.metadata);
        let spec = cj.spec.as_ref().unwrap();
        assert_eq!(spec.schedule, "@daily");
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
        assert_eq!(c.image.as_deref(), Some("registry.local/dbpolicy:dev"));
        assert_eq!(
            c.args.as_ref().unwrap(),
            &[
                "backup",
                "base",
                "--s3-bucket",
                "quiz-backups",
                "--s3-endpoint",
                "https://minio:9000",
                "--cluster",
                "main",
                "--work-dir",
                "/work",
                "--retention-days",
                "14"
            ]
        );
        let names: Vec<&str> = c
            .env
            .as_ref()
            .unwrap()
            .iter()
            .map(|e| e.name.as_str())
            .collect();
        assert_eq!(
            names,
            [
                "DATABASE_URL",
                "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY",
                "TMPDIR"
            ]
        );
        assert_eq!(
            c.security_context
                .as_ref()
                .unwrap()
                .read_only_root_filesystem,
            Some(true)
        );
        assert_eq!(
            c.termination_message_policy.as_deref(),
            Some("FallbackToLogsOnError")
        );
    }

    #[test]
    fn the_args_parse_as_the_cli_expects() {
        for p in [policy(PVC), policy(S3)] {
            let d = receiver_deployment(&p, IMAGE).unwrap();
            let cj = base_backup_cronjob(&p, IMAGE).unwrap();
            let receiver_args = d.spec.unwrap().template.spec.unwrap().containers[0]
                .args
                .clone()
                .unwrap();
            let base_args = cj
                .spec
                .unwrap()
                .job_template
                .spec
                .unwrap()
                .template
                .spec
                .unwrap()
                .containers[0]
                .args
                .clone()
                .unwrap();
            for args in [receiver_args, base_args] {
                let cli = crate::cli::Cli::try_parse_from(
                    std::iter::once("dbpolicy".to_string()).chain(args.clone()),
                )
                .unwrap_or_else(|e| panic!("{args:?}: {e}"));
                assert!(matches!(cli.command, crate::cli::Command::Backup(_)));
            }
        }
    }

    #[test]
    fn the_example_is_a_valid_policy_with_every_pitr_object() {
        let p: DatabasePolicy =
            serde_yaml::from_str(include_str!("../../examples/pitr.yaml")).unwrap();
        let errors = crate::api::validate_spec(&p.spec);
        assert!(errors.is_empty(), "{errors:?}");
        let d = receiver_deployment(&p, IMAGE).expect("receiver");
        assert_eq!(
            d.metadata.name.as_deref(),
            Some("certquiz-pitr-wal-receiver")
        );
        assert_eq!(
            spool_pvc(&p).unwrap().metadata.name.as_deref(),
            Some("certquiz-pitr-wal-spool")
        );
        let cj = base_backup_cronjob(&p, IMAGE).expect("base backups");
        assert_eq!(
            cj.metadata.name.as_deref(),
            Some("certquiz-pitr-base-backup")
        );
        let args = d.spec.unwrap().template.spec.unwrap().containers[0]
            .args
            .clone()
            .unwrap();
        assert!(
            args.windows(2).any(|w| w == ["--slot", "certquiz_pitr"]),
            "{args:?}"
        );
        assert!(
            args.windows(2).any(|w| w == ["--cluster", "certquiz"]),
            "{args:?}"
        );
    }

    #[test]
    fn manifests_round_trip_through_their_api_types() {
        let p = policy(PVC);
        let d = receiver_deployment(&p, IMAGE).unwrap();
        let v = serde_json::to_value(&d).unwrap();
        assert_eq!(
            (v["apiVersion"].as_str(), v["kind"].as_str()),
            (Some("apps/v1"), Some("Deployment"))
        );
        assert_eq!(serde_json::from_value::<Deployment>(v).unwrap(), d);
        let pvc = spool_pvc(&p).unwrap();
        let v = serde_json::to_value(&pvc).unwrap();
        assert_eq!(v["kind"], "PersistentVolumeClaim");
        assert_eq!(
            serde_json::from_value::<PersistentVolumeClaim>(v).unwrap(),
            pvc
        );
        let cj = base_backup_cronjob(&p, IMAGE).unwrap();
        let v = serde_json::to_value(&cj).unwrap();
        assert_eq!(v["apiVersion"], "batch/v1");
        assert_eq!(serde_json::from_value::<CronJob>(v).unwrap(), cj);
    }
}
