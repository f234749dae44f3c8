//! The Kubernetes objects a policy owns besides its status: the backup and refresh CronJobs (server-side applied in Apply mode, reported as pending in Plan mode), the backup Jobs read back for status, and the read-endpoint Secret.
//!
//! The operator never adopts an object it did not create: a new child is created with a
//! plain POST (so an existing object of the same name is a conflict, never overwritten);
//! only a child whose controller ownerReference names the policy is server-side applied.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::reflector::Store;
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::Value;

use super::context::FIELD_MANAGER;
use super::error::{Error, Result};
use crate::api::{DatabasePolicy, Mode};
use crate::engine::{Area, Change};
use crate::jobs::cronjob::{
    backup_cronjob, refresh_cronjobs, MANAGED_BY, POLICY_LABEL, ROLE_LABEL,
};
use crate::jobs::pitr::{base_backup_cronjob, BASE_BACKUP_ROLE};

/// Every CronJob the policy asks for: one per scheduled view, one for backups, one for
/// point-in-time recovery's base backups.
pub(crate) fn desired_cronjobs(policy: &DatabasePolicy, image: &str) -> Vec<CronJob> {
    let mut jobs = refresh_cronjobs(policy, image);
    jobs.extend(backup_cronjob(policy, image));
    jobs.extend(base_backup_cronjob(policy, image));
    jobs
}

/// The label selector of the CronJobs of `policy`.
pub(crate) fn cronjob_selector(policy: &DatabasePolicy) -> String {
    format!(
        "app.kubernetes.io/managed-by={MANAGED_BY},{POLICY_LABEL}={}",
        policy.name_any()
    )
}

/// The area a CronJob serves, from its role label.
pub(crate) fn area_of(cj: &CronJob) -> Area {
    match cj.labels().get(ROLE_LABEL).map(String::as_str) {
        Some("backup") | Some(BASE_BACKUP_ROLE) => Area::Backups,
        _ => Area::MaterializedViews,
    }
}

/// Whether the policy controls `obj`: labels can be copied by hand, owner references are
/// what the operator wrote. The uid, when both sides have one, tells a policy from an
/// earlier one of the same name.
pub(crate) fn controlled_by<K: Resource>(obj: &K, policy: &DatabasePolicy) -> bool {
    obj.meta().owner_references.iter().flatten().any(|o| {
        o.controller == Some(true)
            && o.kind == DatabasePolicy::kind(&())
            && o.name == policy.name_any()
            && policy.meta().uid.as_ref().is_none_or(|uid| *uid == o.uid)
    })
}

/// An HTTP 409 from the API server: the object exists (AlreadyExists) or changed.
pub(crate) fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(r) if r.code == 409)
}

/// Whether every field of `want` has the same value in `have` (which the API server filled
/// with defaults): the desired object is already in place.
pub(crate) fn contains(have: &Value, want: &Value) -> bool {
    match (have, want) {
        (Value::Object(h), Value::Object(w)) => w
            .iter()
            .all(|(k, v)| v.is_null() || h.get(k).is_some_and(|hv| contains(hv, v))),
        (Value::Array(h), Value::Array(w)) => {
            h.len() == w.len() && h.iter().zip(w).all(|(a, b)| contains(a, b))
        }
        _ => have == want,
    }
}

fn name(cj: &CronJob) -> String {
    cj.name_any()
}

fn schedule(cj: &CronJob) -> &str {
    cj.spec.as_ref().map(|s| s.schedule.as_str()).unwrap_or("")
}

/// Whether the CronJob `have` (as the API server returned it) already is `want`: its spec,
/// labels and annotations hold every value `want` sets.
fn in_place(have: &CronJob, want: &CronJob) -> bool {
    let (Ok(h), Ok(w)) = (serde_json::to_value(have), serde_json::to_value(want)) else {
        return false;
    };
    contains(&h["spec"], &w["spec"])
        && contains(&h["metadata"]["labels"], &w["metadata"]["labels"])
        && contains(&h["metadata"]["annotations"], &w["metadata"]["annotations"])
}

/// What applying the desired CronJobs would do, as changes (Plan mode). Pure.
pub(crate) fn pending_cronjobs(desired: &[CronJob], existing: &[CronJob]) -> Vec<Change> {
    let mut pending = Vec::new();
    for d in desired {
        let target = format!("CronJob/{}", name(d));
        let summary = match existing.iter().find(|e| name(e) == name(d)) {
            None => format!("create CronJob {} (schedule {})", name(d), schedule(d)),
            Some(e) => {
                if in_place(e, d) {
                    continue;
                }
                format!("update CronJob {} (schedule {})", name(d), schedule(d))
            }
        };
        pending.push(Change::new(area_of(d), target, summary, ""));
    }
    for e in existing {
        if !desired.iter().any(|d| name(d) == name(e)) {
            pending.push(Change::new(
                area_of(e),
                format!("CronJob/{}", name(e)),
                format!("delete CronJob {} (no longer in the spec)", name(e)),
                "",
            ));
        }
    }
    pending
}

/// What the CronJob step found or did.
#[derive(Debug, Clone, Default)]
pub(crate) struct CronJobSync {
    /// Changes not carried out (Plan mode).
    pub pending: Vec<Change>,
    /// The backup CronJob as the API server last returned it (its status holds
    /// `lastScheduleTime`).
    pub backup: Option<CronJob>,
    /// The base backup CronJob of point-in-time recovery, likewise.
    pub base_backup: Option<CronJob>,
}

fn role(cj: &CronJob) -> Option<&str> {
    cj.labels().get(ROLE_LABEL).map(String::as_str)
}

/// Finds the policy's CronJobs (in the operator's watch cache when given, else by a LIST);
/// in Apply mode applies each desired one that is not already in place (server-side apply,
/// field manager `dbpolicy`, forced) and deletes those no longer desired (with their Jobs);
/// in Plan mode changes nothing and reports what it would do. Nothing is sent when every
/// CronJob is in place.
pub(crate) async fn sync_cronjobs(
    client: &Client,
    cache: Option<&Store<CronJob>>,
    policy: &DatabasePolicy,
    image: &str,
    mode: Mode,
) -> Result<CronJobSync> {
    let ns = policy
        .namespace()
        .ok_or(Error::MissingObjectKey("namespace"))?;
    let api: Api<CronJob> = Api::namespaced(client.clone(), &ns);
    let err = |action| move |source| Error::CronJobs { action, source };
    let listed = match cache {
        Some(store) => {
            let _ = store.wait_until_ready().await;
            super::cache::cronjobs_of(store, policy)
        }
        None => {
            api.list(&ListParams::default().labels(&cronjob_selector(policy)))
                .await
                .map_err(err("listing"))?
                .items
        }
    };
    let existing: Vec<CronJob> = listed
        .into_iter()
        .filter(|cj| controlled_by(cj, policy))
        .collect();
    let desired = desired_cronjobs(policy, image);
    let existing_role = |r: &str| existing.iter().find(|e| role(e) == Some(r)).cloned();
    if mode == Mode::Plan {
        return Ok(CronJobSync {
            pending: pending_cronjobs(&desired, &existing),
            backup: existing_role("backup"),
            base_backup: existing_role(BASE_BACKUP_ROLE),
        });
    }
    let mut sync = CronJobSync::default();
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let not_owned = |d: &CronJob| Error::NotOwned {
        kind: "CronJob",
        name: format!("{ns}/{}", name(d)),
        wanted_by: match role(d) {
            Some(BASE_BACKUP_ROLE) => "spec.backups.pointInTimeRecovery",
            Some("backup") => "spec.backups",
            _ => "spec.materializedViews",
        }
        .to_string(),
    };
    for d in &desired {
        let applied = match existing.iter().find(|e| name(e) == name(d)) {
            Some(e) if in_place(e, d) => e.clone(),
            Some(_) => api
                .patch(&name(d), &params, &Patch::Apply(d))
                .await
                .map_err(err("applying"))?,
            None => {
                // Not ours (or not there): create, and never take over one that exists.
                let post = PostParams {
                    field_manager: Some(FIELD_MANAGER.to_string()),
                    ..Default::default()
                };
                match api.create(&post, d).await {
                    Ok(created) => created,
                    Err(source) if is_conflict(&source) && cache.is_none() => {
                        return Err(not_owned(d))
                    }
                    Err(source) if is_conflict(&source) => {
                        // The cache may not hold a CronJob this operator created a moment
                        // ago: ours when its owner reference says so, else another's.
                        match api.get_opt(&name(d)).await.map_err(err("reading"))? {
                            Some(found) if controlled_by(&found, policy) => api
                                .patch(&name(d), &params, &Patch::Apply(d))
                                .await
                                .map_err(err("applying"))?,
                            _ => return Err(not_owned(d)),
                        }
                    }
                    Err(source) => {
                        return Err(Error::CronJobs {
                            action: "creating",
                            source,
                        })
                    }
                }
            }
        };
        match role(d) {
            Some("backup") => sync.backup = Some(applied),
            Some(BASE_BACKUP_ROLE) => sync.base_backup = Some(applied),
            _ => {}
        }
    }
    for e in existing
        .iter()
        .filter(|e| !desired.iter().any(|d| name(d) == name(e)))
    {
        tracing::info!(cronjob = %name(e), "deleting a CronJob no longer in the spec");
        api.delete(&name(e), &DeleteParams::background())
            .await
            .map_err(err("deleting"))?;
    }
    Ok(sync)
}

/// The backup CronJob's Jobs and their pods (same labels, set by the Job template). No pod
/// request when there is no Job.
pub(crate) async fn backup_jobs(
    client: &Client,
    policy: &DatabasePolicy,
) -> Result<(Vec<Job>, Vec<Pod>)> {
    jobs_of_role(client, policy, "backup").await
}

/// The Jobs (and their pods) of the policy's CronJob with role label `role`.
pub(crate) async fn jobs_of_role(
    client: &Client,
    policy: &DatabasePolicy,
    role: &str,
) -> Result<(Vec<Job>, Vec<Pod>)> {
    let ns = policy
        .namespace()
        .ok_or(Error::MissingObjectKey("namespace"))?;
    let selector = format!("{POLICY_LABEL}={},{ROLE_LABEL}={role}", policy.name_any());
    let lp = ListParams::default().labels(&selector);
    let jobs = Api::<Job>::namespaced(client.clone(), &ns)
        .list(&lp)
        .await
        .map_err(Error::BackupJobs)?
        .items;
    if jobs.is_empty() {
        return Ok((jobs, Vec::new()));
    }
    let pods = Api::<Pod>::namespaced(client.clone(), &ns)
        .list(&lp)
        .await
        .map_err(Error::BackupJobs)?
        .items;
    Ok((jobs, pods))
}

/// `spec.replicas.readEndpointSecretName`, default `<policy>-read`.
pub(crate) fn read_endpoint_secret_name(policy: &DatabasePolicy) -> Option<String> {
    let r = policy.spec.replicas.as_ref()?;
    Some(
        r.read_endpoint_secret_name
            .clone()
            .unwrap_or_else(|| format!("{}-read", policy.name_any())),
    )
}

/// The read-endpoint Secret, owned by the policy. Its `Debug` would show the data: never
/// log it.
pub(crate) fn read_endpoint_secret(
    policy: &DatabasePolicy,
    name: &str,
    data: BTreeMap<String, String>,
) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: policy.namespace(),
            labels: Some(BTreeMap::from([
                (
                    "app.kubernetes.io/managed-by".to_string(),
                    MANAGED_BY.to_string(),
                ),
                (POLICY_LABEL.to_string(), policy.name_any()),
            ])),
            owner_references: policy.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(
            data.into_iter()
                .map(|(k, v)| (k, ByteString(v.into_bytes())))
                .collect(),
        ),
        ..Default::default()
    }
}

/// Publishes the read-endpoint Secret: created when absent, server-side applied when the
/// policy controls it (an unchanged Secret is a no-op write), and never touched when it
/// belongs to someone else (`SecretNotOwned`: an application's Secret of that name keeps
/// its data and gets no ownerReference, which would let garbage collection delete it).
///
/// With the operator's watch cache of Secrets the existing Secret is read from it, and a
/// Secret already holding the data, labels and owner sent is not written again.
pub(crate) async fn publish_read_endpoint(
    client: &Client,
    cache: Option<&Store<Secret>>,
    policy: &DatabasePolicy,
    secret: &Secret,
) -> Result<()> {
    let name = secret.name_any();
    let ns = secret.namespace().unwrap_or_default();
    let api = Api::<Secret>::namespaced(client.clone(), &ns);
    let failed = |source| Error::ReadEndpoint {
        name: format!("{ns}/{name}"),
        source,
    };
    let not_owned = || Error::NotOwned {
        kind: "Secret",
        name: format!("{ns}/{name}"),
        wanted_by: "spec.replicas.readEndpointSecretName".to_string(),
    };
    let apply = || async {
        api.patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(secret),
        )
        .await
        .map(drop)
        .map_err(failed)
    };
    let existing = match cache {
        Some(store) => super::cache::secret(store, &ns, &name).map(|s| s.as_ref().clone()),
        None => api.get_opt(&name).await.map_err(failed)?,
    };
    match existing {
        Some(existing) if controlled_by(&existing, policy) => {
            if !secret_in_place(&existing, secret) {
                apply().await?;
            }
        }
        Some(_) => return Err(not_owned()),
        None => {
            let post = PostParams {
                field_manager: Some(FIELD_MANAGER.to_string()),
                ..Default::default()
            };
            match api.create(&post, secret).await {
                Ok(_) => {}
                // Created by someone else since the read: theirs. With the cache, possibly
                // by this operator a moment ago (not cached yet): the owner tells.
                Err(e) if is_conflict(&e) && cache.is_some() => {
                    match api.get_opt(&name).await.map_err(failed)? {
                        Some(found) if controlled_by(&found, policy) => apply().await?,
                        _ => return Err(not_owned()),
                    }
                }
                Err(e) if is_conflict(&e) => return Err(not_owned()),
                Err(e) => return Err(failed(e)),
            }
        }
    }
    Ok(())
}

/// Whether the Secret `have` already holds `want`'s data (exactly: a key removed from the
/// endpoint must go), type and labels.
fn secret_in_place(have: &Secret, want: &Secret) -> bool {
    let labels_in = want
        .labels()
        .iter()
        .all(|(k, v)| have.labels().get(k) == Some(v));
    have.data == want.data && have.type_ == want.type_ && labels_in
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(spec: &str) -> DatabasePolicy {
        let mut p = crate::controller::fixtures::test_policy(spec, true);
        p.metadata.name = Some("certquiz".into());
        p
    }

    const SPEC: &str = "database: {connectionSecretRef: {name: x}}
backups: {schedule: '0 3 * * *', storage: {pvc: {claimName: b}}}
materializedViews: {views: [{name: stats, schedule: '*/15 * * * *'}, {name: manual}]}
";

    #[test]
    fn plan_mode_reports_creations_updates_and_deletions() {
        let p = policy(SPEC);
        let desired = desired_cronjobs(&p, "img:1");
        assert_eq!(
            desired.iter().map(name).collect::<Vec<_>>(),
            ["certquiz-refresh-stats", "certquiz-backup"]
        );
        let created = pending_cronjobs(&desired, &[]);
        assert_eq!(
            created
                .iter()
                .map(|c| (c.area, c.summary.as_str()))
                .collect::<Vec<_>>(),
            [
                (
                    Area::MaterializedViews,
                    "create CronJob certquiz-refresh-stats (schedule */15 * * * *)"
                ),
                (
                    Area::Backups,
                    "create CronJob certquiz-backup (schedule 0 3 * * *)"
                ),
            ]
        );
        // What the API server returns has defaults and status added: still in place.
        let mut existing: Vec<CronJob> = desired.clone();
        for cj in &mut existing {
            let spec = cj.spec.as_mut().unwrap();
            spec.job_template.spec.as_mut().unwrap().completions = Some(1);
            cj.metadata.resource_version = Some("7".into());
        }
        assert!(pending_cronjobs(&desired, &existing).is_empty());
        existing[1].spec.as_mut().unwrap().schedule = "0 4 * * *".into();
        let old = {
            let mut cj = desired[0].clone();
            cj.metadata.name = Some("certquiz-refresh-gone".into());
            cj
        };
        existing.push(old);
        let pending = pending_cronjobs(&desired, &existing);
        let summaries: Vec<&str> = pending.iter().map(|c| c.summary.as_str()).collect();
        assert_eq!(
            summaries,
            [
                "update CronJob certquiz-backup (schedule 0 3 * * *)",
                "delete CronJob certquiz-refresh-gone (no longer in the spec)",
            ]
        );
    }

    #[test]
    fn only_controlled_cronjobs_are_ours() {
        let p = policy(SPEC);
        let mut cj = desired_cronjobs(&p, "img")[0].clone();
        assert!(controlled_by(&cj, &p));
        cj.metadata.owner_references = None;
        assert!(!controlled_by(&cj, &p), "labels alone are not ownership");
    }

    #[test]
    fn read_endpoint_secret_is_owned_and_named() {
        let p = policy("database: {connectionSecretRef: {name: x}}\nreplicas: {replicas: []}\n");
        assert_eq!(
            read_endpoint_secret_name(&p).as_deref(),
            Some("certquiz-read")
        );
        let s = read_endpoint_secret(
            &p,
            "certquiz-read",
            BTreeMap::from([("K".into(), "v".into())]),
        );
        let owner = &s.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.controller),
            ("DatabasePolicy", Some(true))
        );
        assert_eq!(s.data.unwrap()["K"].0, b"v");
    }
}
