//! Step 3, the connection Secrets: the primary's libpq URI from
//! `spec.database.connectionSecretRef`, each replica's from its own. The URIs live in
//! [`Targets`] only while the database steps run, and are never logged.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, ResourceExt};

use crate::api::{DatabasePolicy, SecretKeyRef};
use crate::controller::context::Context;
use crate::controller::error::{Error, Result};

/// Where the engine run connects.
pub(super) struct Targets {
    /// The primary's URI.
    pub url: String,
    /// Each replica's URI, by replica name.
    pub replica_urls: BTreeMap<String, String>,
    /// Why a replica has no URI (its Secret could not be read), by replica name.
    pub notes: BTreeMap<String, String>,
}

/// The primary's URI (its absence fails the reconcile), and the replicas' (an unreadable
/// one is only noted).
pub(super) async fn dereference(ctx: &Context, policy: &DatabasePolicy) -> Result<Targets> {
    let ns = policy
        .namespace()
        .ok_or(Error::MissingObjectKey("namespace"))?;
    let url = read_connection_uri(ctx, &ns, &policy.spec.database.connection_secret_ref).await?;
    let (replica_urls, notes) = read_replica_urls(ctx, &ns, policy).await;
    Ok(Targets {
        url,
        replica_urls,
        notes,
    })
}

/// Each replica's URL from its `connectionSecretRef` (same namespace). A replica whose
/// Secret cannot be read is left out (reported as not checked, with the note saying why):
/// it never fails the whole reconcile.
async fn read_replica_urls(
    ctx: &Context,
    ns: &str,
    policy: &DatabasePolicy,
) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let mut urls = BTreeMap::new();
    let mut notes = BTreeMap::new();
    for r in policy.spec.replicas.iter().flat_map(|r| &r.replicas) {
        match read_connection_uri(ctx, ns, &r.connection_secret_ref).await {
            Ok(url) => {
                urls.insert(r.name.clone(), url);
            }
            Err(e) => {
                let s = &r.connection_secret_ref;
                let why = match e {
                    Error::SecretNotFound { .. } => format!("Secret {ns}/{} not found", s.name),
                    Error::SecretKeyNotFound { key, .. } => {
                        format!("Secret {ns}/{} has no key {key:?}", s.name)
                    }
                    other => other.to_string(),
                };
                notes.insert(r.name.clone(), why);
            }
        }
    }
    (urls, notes)
}

/// The libpq URI from a `connectionSecretRef`. Surrounding whitespace (a trailing newline
/// from `kubectl create secret --from-file`) is dropped.
///
/// With the operator's watch cache the Secret is read from it (no API request); the cache
/// is complete before the first read (see `wait_until_ready`), and a Secret created or
/// changed later triggers the policies that reference it.
pub(super) async fn read_connection_uri(
    ctx: &Context,
    ns: &str,
    r: &SecretKeyRef,
) -> Result<String> {
    let key = r.effective_key().to_string();
    let secret = match &ctx.secret_cache {
        Some(store) => {
            // Resolves at once after the initial list; the controller keeps polling the
            // watch meanwhile, so this never waits on itself.
            let _ = store.wait_until_ready().await;
            crate::controller::cache::secret(store, ns, &r.name)
        }
        None => Api::<Secret>::namespaced(ctx.client.clone(), ns)
            .get_opt(&r.name)
            .await
            .map_err(|source| Error::SecretRead {
                namespace: ns.into(),
                name: r.name.clone(),
                source,
            })?
            .map(std::sync::Arc::new),
    };
    let secret = secret.ok_or_else(|| Error::SecretNotFound {
        namespace: ns.into(),
        name: r.name.clone(),
        key: key.clone(),
    })?;
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(&key))
        .ok_or_else(|| Error::SecretKeyNotFound {
            namespace: ns.into(),
            name: r.name.clone(),
            key: key.clone(),
        })?;
    let text = std::str::from_utf8(&bytes.0).map_err(|_| Error::SecretNotUtf8 {
        namespace: ns.into(),
        name: r.name.clone(),
        key,
    })?;
    Ok(text.trim().to_string())
}
