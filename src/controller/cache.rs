//! The watch caches a reconcile reads instead of the API: the Secrets policies reference and the CronJobs they own, trimmed to what is read; and which policy changes are worth a reconcile.
//!
//! Why a cache of whole Secrets (data included) rather than a metadata-only watch: a
//! metadata watch still needs `list`/`watch` on Secrets, and reading a referenced Secret
//! would then cost one GET per reconcile — the one request a steady-state reconcile may
//! not spend (issue 17). The cache costs memory instead, kept small by [`trim_secret`]
//! (no managedFields or annotations; no data of the Secrets no connection string
//! lives in: Helm releases and service-account tokens), and scoped by `--namespace`.
//! docs/operator.md ("API requests and caches") says the same for users.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

use futures::{Stream, StreamExt};
use k8s_openapi::api::batch::v1::CronJob;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};

use crate::api::DatabasePolicy;
use crate::jobs::cronjob::{MANAGED_BY, POLICY_LABEL};

/// Secret types whose data is never a connection string or credentials a policy reads,
/// and can be large (a Helm release is the whole rendered chart, gzipped, per revision).
const DATALESS_TYPES: &[&str] = &["helm.sh/release.v1", "kubernetes.io/service-account-token"];

/// What the cache keeps of a Secret: all but managedFields and annotations (kubectl's
/// last-applied annotation repeats the data), and no data in the types of [`DATALESS_TYPES`].
/// Labels and owner references stay: they tell the read-endpoint Secret the policy controls
/// from another owner's, and whether it is in place.
pub(crate) fn trim_secret(secret: &mut Secret) {
    let meta = secret.meta_mut();
    meta.managed_fields = None;
    meta.annotations = None;
    secret.string_data = None;
    if secret
        .type_
        .as_deref()
        .is_some_and(|t| DATALESS_TYPES.contains(&t))
    {
        secret.data = None;
    }
}

/// What the cache keeps of a policy: all but managedFields (never read, and about as large
/// as the rest of the object once status is written).
pub(crate) fn trim_policy(policy: &mut DatabasePolicy) {
    policy.meta_mut().managed_fields = None;
}

/// What the cache keeps of a CronJob: all but managedFields.
pub(crate) fn trim_cronjob(cronjob: &mut CronJob) {
    cronjob.meta_mut().managed_fields = None;
}

/// The policy watch's predicate: a change of the spec (generation) or of the metadata a
/// reconcile acts on (finalizers, deletion, labels, annotations such as
/// `dbpolicy.dev/reconcile-at`) is worth a reconcile; a change of status alone — the
/// operator's own write — is not.
pub(crate) fn policy_trigger(policy: &DatabasePolicy) -> Option<u64> {
    let meta = policy.meta();
    let mut h = DefaultHasher::new();
    meta.uid.hash(&mut h);
    meta.generation.hash(&mut h);
    meta.deletion_timestamp
        .as_ref()
        .map(|t| t.0.as_second())
        .hash(&mut h);
    meta.finalizers.hash(&mut h);
    meta.labels.hash(&mut h);
    meta.annotations.hash(&mut h);
    Some(h.finish())
}

/// The objects of a (reflected) watch stream that changed after the first complete list:
/// added, modified, deleted, and those of a later re-list (which may hide a change made
/// while the watch was broken). The first list is left out: every policy is reconciled
/// when the operator starts anyway, so mapping each Secret of that list to its policies
/// would only repeat those reconciles.
pub(crate) fn changes_after_first_list<K, S>(
    stream: S,
) -> impl Stream<Item = Result<K, watcher::Error>>
where
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
{
    let mut listed = false;
    stream.filter_map(move |event| {
        let out = match event {
            Ok(watcher::Event::Init) => None,
            Ok(watcher::Event::InitDone) => {
                listed = true;
                None
            }
            Ok(watcher::Event::InitApply(obj)) => listed.then_some(Ok(obj)),
            Ok(watcher::Event::Apply(obj) | watcher::Event::Delete(obj)) => Some(Ok(obj)),
            Err(e) => Some(Err(e)),
        };
        std::future::ready(out)
    })
}

/// The cached Secret `ns/name`.
pub(crate) fn secret(
    store: &Store<Secret>,
    ns: &str,
    name: &str,
) -> Option<std::sync::Arc<Secret>> {
    store.get(&ObjectRef::new(name).within(ns))
}

/// The cached CronJobs labelled as the policy's (ownership is checked by the caller).
pub(crate) fn cronjobs_of(store: &Store<CronJob>, policy: &DatabasePolicy) -> Vec<CronJob> {
    let ns = policy.namespace();
    let name = policy.name_any();
    let mut found: Vec<CronJob> = store
        .state()
        .iter()
        .filter(|cj| {
            cj.namespace() == ns
                && cj
                    .labels()
                    .get("app.kubernetes.io/managed-by")
                    .map(String::as_str)
                    == Some(MANAGED_BY)
                && cj.labels().get(POLICY_LABEL) == Some(&name)
        })
        .map(|cj| cj.as_ref().clone())
        .collect();
    found.sort_by_key(|cj| cj.name_any());
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::fixtures::{named_secret, test_policy};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;

    #[test]
    fn a_secret_keeps_its_data_and_owner_but_not_its_bulk() {
        let mut s = *named_secret("db", "postgres://x");
        s.metadata.annotations = Some(
            [(
                "kubectl.kubernetes.io/last-applied-configuration".to_string(),
                "{…the data again…}".to_string(),
            )]
            .into(),
        );
        s.metadata.managed_fields = Some(vec![ManagedFieldsEntry::default()]);
        s.metadata.owner_references = Some(vec![Default::default()]);
        trim_secret(&mut s);
        assert!(s.metadata.annotations.is_none() && s.metadata.managed_fields.is_none());
        assert_eq!(s.metadata.owner_references.as_ref().map(Vec::len), Some(1));
        assert_eq!(s.data.as_ref().unwrap()["uri"].0, b"postgres://x");

        let mut release = *named_secret("sh.helm.release.v1.app.v7", "H4sI…");
        release.type_ = Some("helm.sh/release.v1".into());
        trim_secret(&mut release);
        assert!(release.data.is_none());
    }

    #[tokio::test]
    async fn the_first_list_triggers_nothing_later_changes_and_relists_do() {
        use watcher::Event;
        let s = |n: &str| *named_secret(n, "x");
        let events = vec![
            Event::Init,
            Event::InitApply(s("a")),
            Event::InitApply(s("b")),
            Event::InitDone,
            Event::Apply(s("a")),
            Event::Delete(s("b")),
            Event::Init,
            Event::InitApply(s("c")),
            Event::InitDone,
        ];
        let names: Vec<String> =
            changes_after_first_list(futures::stream::iter(events.into_iter().map(Ok)))
                .map(|r: Result<Secret, _>| r.unwrap().name_any())
                .collect()
                .await;
        assert_eq!(names, ["a", "b", "c"]);
    }

    #[test]
    fn only_spec_and_metadata_changes_trigger_a_reconcile() {
        let spec = "database: {connectionSecretRef: {name: x}}\n";
        let p = test_policy(spec, true);
        let base = policy_trigger(&p);

        let mut status_only = p.clone();
        status_only.status = Some(Default::default());
        status_only.metadata.resource_version = Some("2".into());
        status_only.metadata.managed_fields = Some(vec![ManagedFieldsEntry::default()]);
        assert_eq!(
            policy_trigger(&status_only),
            base,
            "the operator's own status write"
        );

        let mut changed = Vec::new();
        let mut q = p.clone();
        q.metadata.generation = Some(2);
        changed.push(q);
        let mut q = p.clone();
        q.metadata.finalizers = None;
        changed.push(q);
        let mut q = p.clone();
        q.metadata.annotations =
            Some([("dbpolicy.dev/reconcile-at".to_string(), "now".to_string())].into());
        changed.push(q);
        let mut q = p.clone();
        q.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        ));
        changed.push(q);
        for q in changed {
            assert_ne!(policy_trigger(&q), base, "{:?}", q.metadata);
        }
    }
}
