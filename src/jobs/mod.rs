//! The operator's CronJobs: their manifests ([`cronjob`], for the refresh and the backup
//! jobs) and the refresh command they run ([`refresh`]); the backup commands are
//! [`crate::backup`].

pub(crate) mod cronjob;
pub(crate) mod pitr;
pub(crate) mod refresh;

/// A policy named `quiz/certquiz` with the given `spec.backups` lines, for the job
/// builders' tests.
#[cfg(test)]
pub(crate) fn test_policy(backups: &str) -> crate::api::DatabasePolicy {
    let mut p: crate::api::DatabasePolicy = serde_yaml::from_str(&format!(
        "apiVersion: dbpolicy.dev/v1alpha1\nkind: DatabasePolicy\nmetadata: {{name: certquiz, namespace: quiz}}\nspec:\n  database: {{connectionSecretRef: {{name: certquiz-db}}}}\n{backups}"
    ))
    .unwrap();
    p.metadata.uid = Some("1234-5678".into());
    p
}
