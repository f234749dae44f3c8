//! The reconciler: `finalizer()` as the single top-level step; Apply reads the Secret, runs the engine and writes status by server-side apply; Cleanup releases the policy.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{finalizer, Event as Finalizer};
use kube::{Api, Resource, ResourceExt};
use sqlx::Connection;
use tracing::{info, instrument, warn};

use super::context::{key, Context, FIELD_MANAGER, FINALIZER};
use super::error::{Error, Result};
use super::status::{self, Input};
use crate::api::{
    DatabasePolicy, DatabasePolicyStatus, SecretKeyRef, DEFAULT_DRIFT_CHECK_INTERVAL,
};
use crate::duration::parse_duration;
use crate::engine::{self, Outcome, PolicyId};

/// Entry point for the `Controller`: the finalizer decides between Apply and Cleanup.
/// Failures are counted and published here, once; `error_policy` only schedules the retry.
#[instrument(skip(policy, ctx), fields(policy = %key(&policy)))]
pub async fn reconcile(policy: Arc<DatabasePolicy>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_started();
    let result = reconcile_inner(policy.clone(), &ctx).await;
    match &result {
        Ok(_) => ctx.reset_backoff(&key(&policy)),
        Err(e) => {
            warn!(error = %e, reason = e.reason(), "reconcile failed");
            ctx.report_failure(&policy, e).await;
        }
    }
    result
}

async fn reconcile_inner(policy: Arc<DatabasePolicy>, ctx: &Arc<Context>) -> Result<Action> {
    let ns = policy
        .namespace()
        .ok_or(Error::MissingObjectKey("namespace"))?;
    let api: Api<DatabasePolicy> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, FINALIZER, policy, |event| async {
        match event {
            Finalizer::Apply(p) => apply(p, &api, ctx).await,
            Finalizer::Cleanup(p) => cleanup(p, ctx).await,
        }
    })
    .await
    .map_err(Error::from_finalizer)
}

/// Retry a failed policy with a per-policy exponential backoff; other policies go on.
pub fn error_policy(policy: Arc<DatabasePolicy>, _error: &Error, ctx: Arc<Context>) -> Action {
    Action::requeue(ctx.next_backoff(&key(&policy)))
}

/// `spec.driftCheckInterval`, or the default when it does not parse (the CRD's CEL rule
/// rejects such values, so this only guards objects written before the rule).
pub fn drift_interval(policy: &DatabasePolicy) -> Duration {
    parse_duration(policy.spec.drift_check_interval()).unwrap_or_else(|e| {
        warn!(policy = %key(policy), "spec.driftCheckInterval: {e}; using {DEFAULT_DRIFT_CHECK_INTERVAL}");
        parse_duration(DEFAULT_DRIFT_CHECK_INTERVAL).expect("default interval parses")
    })
}

async fn apply(
    policy: Arc<DatabasePolicy>,
    api: &Api<DatabasePolicy>,
    ctx: &Context,
) -> Result<Action> {
    let name = policy.name_any();
    let ns = policy
        .namespace()
        .ok_or(Error::MissingObjectKey("namespace"))?;
    let spec = &policy.spec;
    let interval = drift_interval(&policy);
    let input = Input {
        spec,
        generation: policy.meta().generation,
        previous: policy.status.as_ref(),
        now: Time(k8s_openapi::jiff::Timestamp::now()),
        drift_interval: interval,
    };

    if spec.is_suspended() {
        // Suspended: no Secret read, no database access, no requeue until the spec changes.
        patch_status(api, &name, &status::suspended(&input)).await?;
        return Ok(Action::await_change());
    }

    let outcome = async {
        let url = read_connection_uri(ctx, &ns, &spec.database.connection_secret_ref).await?;
        run_engine(url, &policy, PolicyId(key(&policy))).await
    }
    .await;
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => {
            patch_status(
                api,
                &name,
                &status::from_error(&input, e.reason(), &e.to_string()),
            )
            .await?;
            return Err(e);
        }
    };

    let mode = spec.effective_mode();
    let new_status = status::from_outcome(&input, &outcome);
    for area in status::drifted_areas(&input, &outcome, mode) {
        ctx.metrics.drifted(area);
    }
    let applied = status::applied_by_area(&outcome);
    for (area, n) in &applied {
        ctx.metrics.applied(*area, *n);
    }
    patch_status(api, &name, &new_status).await?;

    if !applied.is_empty() {
        let total: usize = applied.values().sum();
        info!(changes = total, "applied");
        ctx.publish(
            &policy,
            EventType::Normal,
            "Applied",
            "Apply",
            format!(
                "applied {total} change(s): {}",
                status::counts_note(&applied)
            ),
            true,
        )
        .await;
    }
    if let Some(report) = &outcome.report {
        if !report.refused.is_empty() {
            ctx.publish(
                &policy,
                EventType::Warning,
                "DestructiveChangesRefused",
                "Apply",
                format!(
                    "refused {} destructive change(s): {}; set spec.safety.allowDestructive: true to allow them",
                    report.refused.len(),
                    report
                        .refused
                        .iter()
                        .map(|c| format!("{} {}", c.area, c.target))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                false,
            )
            .await;
        }
    }
    failure_of(&outcome)?;
    Ok(Action::requeue(interval))
}

/// A plan with errors or a failed statement is a failure: retried with backoff, told as
/// a Warning. Status already says it, area by area.
fn failure_of(outcome: &Outcome) -> Result<()> {
    let errors: Vec<_> = outcome.plan.errors().collect();
    if let Some(first) = errors.first() {
        return Err(Error::PlanErrors {
            count: errors.len(),
            reason: first.reason.clone(),
            first: first.to_string(),
        });
    }
    if let Some(f) = outcome.report.as_ref().and_then(|r| r.failure.as_ref()) {
        return Err(Error::ApplyFailed {
            reason: f.reason.clone(),
            message: format!("{}: {}: {}", f.area, f.target, f.message),
        });
    }
    Ok(())
}

/// Deletion. Nothing is removed from the database yet, and nothing here needs the
/// database, so deletion never hangs on an unreachable server or a deleted Secret, and
/// it is safe when Apply never ran.
///
/// What the policy set is recorded in the database's ledger (`dbpolicy.managed`, owner
/// `namespace/name`). A future cleanup, opt-in per policy, would: read the Secret (and
/// skip, with an event, when it or the database is gone), take the advisory lock, plan
/// against an empty spec restricted to the ledger entries this policy owns (resetting
/// storage parameters and `ALTER SYSTEM` settings, deleting its flag rows), apply that
/// plan and forget the entries. Child objects (CronJobs) carry owner references and are
/// collected by Kubernetes' garbage collector.
async fn cleanup(policy: Arc<DatabasePolicy>, ctx: &Context) -> Result<Action> {
    ctx.publish(
        &policy,
        EventType::Normal,
        "Released",
        "Cleanup",
        "finalizer removed; what the policy set in the database is left in place (recorded in dbpolicy.managed)".into(),
        false,
    )
    .await;
    Ok(Action::await_change())
}

/// The libpq URI from `spec.database.connectionSecretRef`. Surrounding whitespace (a
/// trailing newline from `kubectl create secret --from-file`) is dropped.
async fn read_connection_uri(ctx: &Context, ns: &str, r: &SecretKeyRef) -> Result<String> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let key = r.effective_key().to_string();
    let secret = secrets
        .get_opt(&r.name)
        .await
        .map_err(|source| Error::SecretRead {
            namespace: ns.into(),
            name: r.name.clone(),
            source,
        })?
        .ok_or_else(|| Error::SecretNotFound {
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

/// One connection per run: the engine's session settings and advisory lock belong to it.
///
/// The engine runs on a blocking-pool thread that drives it with the runtime's handle:
/// its futures are not provably `Send` (`sqlx::raw_sql(..).execute(conn)` trips rustc's
/// "not general enough" limitation), and the controller's reconcilers must be. At most
/// `--concurrency` such threads exist at once.
async fn run_engine(url: String, policy: &DatabasePolicy, id: PolicyId) -> Result<Outcome> {
    let spec = policy.spec.clone();
    let handle = tokio::runtime::Handle::current();
    let task = tokio::task::spawn_blocking(move || {
        handle.block_on(async move {
            let mut conn = crate::pg::connect_one(&url).await?;
            let result = engine::run(&mut conn, &spec, spec.effective_mode(), &id).await;
            let _ = conn.close().await;
            Ok(result?)
        })
    });
    task.await
        .unwrap_or_else(|e| Err(Error::EngineTask(e.to_string())))
}

/// Server-side apply of the whole status under the operator's field manager, on the
/// `/status` subresource: the operator never writes `spec`.
async fn patch_status(
    api: &Api<DatabasePolicy>,
    name: &str,
    status: &DatabasePolicyStatus,
) -> Result<()> {
    let patch = serde_json::json!({
        "apiVersion": DatabasePolicy::api_version(&()),
        "kind": DatabasePolicy::kind(&()),
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(Error::PatchStatus)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::fixtures::{
        condition, test_context, test_policy, test_secret, Expect, Sent,
    };
    use serde_json::{json, Value};

    const SPEC: &str = "database: {connectionSecretRef: {name: x}}\n";

    /// Runs one reconcile against the mocked API server playing `scenario`.
    async fn reconcile_with(
        policy: DatabasePolicy,
        scenario: Vec<Expect>,
    ) -> (Result<Action>, Vec<Sent>) {
        let (ctx, server) = test_context();
        let verifier = server.run(policy.clone(), scenario);
        let result = reconcile(Arc::new(policy), ctx.clone()).await;
        drop(ctx);
        let sent = tokio::time::timeout(Duration::from_secs(30), verifier)
            .await
            .expect("the scenario did not finish")
            .expect("the scenario failed");
        (result, sent)
    }

    fn all_bodies(sent: &[Sent]) -> String {
        sent.iter().map(|s| s.body.to_string()).collect()
    }

    #[tokio::test]
    async fn adds_the_finalizer_first_and_nothing_else() {
        let (result, sent) =
            reconcile_with(test_policy(SPEC, false), vec![Expect::AddFinalizer]).await;
        assert_eq!(result.unwrap(), Action::await_change());
        assert_eq!(
            sent[0].body,
            json!([
                {"op": "test", "path": "/metadata/finalizers", "value": null},
                {"op": "add", "path": "/metadata/finalizers", "value": ["dbpolicy.dev/cleanup"]},
            ])
        );
    }

    #[tokio::test]
    async fn missing_secret_is_secret_not_found_without_database_access() {
        let spec = "database: {connectionSecretRef: {name: x}}\nfeatureFlags: {flags: []}\n";
        let (result, sent) = reconcile_with(
            test_policy(spec, true),
            vec![
                Expect::GetSecret(None),
                Expect::PatchStatus,
                Expect::CreateEvent,
            ],
        )
        .await;
        let err = result.unwrap_err();
        assert_eq!(err.reason(), "SecretNotFound");
        assert_eq!(err.metric_label(), "secret_not_found");
        assert_eq!(
            sent.iter()
                .map(|s| s.request.split(' ').next().unwrap())
                .collect::<Vec<_>>(),
            ["GET", "PATCH", "POST"]
        );
        let patch = &sent[1].body;
        assert_eq!(patch["apiVersion"], "dbpolicy.dev/v1alpha1");
        assert_eq!(patch["kind"], "DatabasePolicy");
        assert_eq!(patch["status"]["observedGeneration"], 1);
        let ready = condition(patch, "Ready");
        assert_eq!(ready["status"], "False");
        assert_eq!(ready["reason"], "SecretNotFound");
        assert!(ready["message"]
            .as_str()
            .unwrap()
            .contains("default/test-db"));
        assert_eq!(condition(patch, "FeatureFlagsReady")["status"], "Unknown");
        assert_eq!(condition(patch, "Drifted")["status"], "Unknown");
        let event = &sent[2].body;
        assert_eq!(event["type"], "Warning");
        assert_eq!(event["reason"], "SecretNotFound");
        assert_eq!(event["action"], "Reconcile");
        assert_eq!(event["regarding"]["kind"], "DatabasePolicy");
        assert_eq!(event["regarding"]["name"], "test");
        assert_eq!(event["reportingController"], "dbpolicy.dev/controller");
    }

    #[tokio::test]
    async fn suspended_policy_says_so_and_reads_nothing() {
        let spec = "database: {connectionSecretRef: {name: x}}\nsuspend: true\nmode: Plan\n";
        let (result, sent) =
            reconcile_with(test_policy(spec, true), vec![Expect::PatchStatus]).await;
        assert_eq!(result.unwrap(), Action::await_change());
        let patch = &sent[0].body;
        let ready = condition(patch, "Ready");
        assert_eq!(ready["status"], "False");
        assert_eq!(ready["reason"], "Suspended");
        assert_eq!(patch["status"]["mode"], "Plan");
        assert_eq!(patch["status"]["observedGeneration"], 1);
    }

    #[tokio::test]
    async fn unreachable_database_is_connection_failed_and_no_password_leaks() {
        let (result, sent) = reconcile_with(
            test_policy(SPEC, true),
            vec![
                Expect::GetSecret(Some(test_secret(
                    "postgres://app:hunter2@127.0.0.1:1/certquiz\n",
                ))),
                Expect::PatchStatus,
                Expect::CreateEvent,
            ],
        )
        .await;
        let err = result.unwrap_err();
        assert_eq!(err.reason(), "ConnectionFailed");
        assert_eq!(err.metric_label(), "connect");
        assert!(!err.to_string().contains("hunter2"));
        let ready = condition(&sent[1].body, "Ready");
        assert_eq!(ready["reason"], "ConnectionFailed");
        assert!(ready["message"]
            .as_str()
            .unwrap()
            .contains("127.0.0.1:1/certquiz"));
        assert_eq!(sent[2].body["type"], "Warning");
        assert_eq!(sent[2].body["reason"], "ConnectionFailed");
        let everything = all_bodies(&sent);
        assert!(!everything.contains("hunter2"), "{everything}");
    }

    #[tokio::test]
    async fn deletion_removes_the_finalizer_even_when_apply_never_ran() {
        let mut policy = test_policy(SPEC, true);
        policy.meta_mut().deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
        let (result, sent) =
            reconcile_with(policy, vec![Expect::CreateEvent, Expect::RemoveFinalizer]).await;
        assert_eq!(result.unwrap(), Action::await_change());
        assert_eq!(sent[0].body["reason"], "Released");
        assert_eq!(sent[0].body["type"], "Normal");
        assert_eq!(
            sent[1].body,
            json!([
                {"op": "test", "path": "/metadata/finalizers/0", "value": "dbpolicy.dev/cleanup"},
                {"op": "remove", "path": "/metadata/finalizers/0"},
            ])
        );
    }

    /// A fresh database on the local server (`DBPOLICY_TEST_ADMIN_URL`, default
    /// postgres://postgres@127.0.0.1:5432/postgres), dropped by `drop_database`.
    async fn create_database() -> (String, String) {
        let admin = admin_url();
        let name = format!(
            "dbpolicy_ctrl_{}_{}",
            std::process::id(),
            k8s_openapi::jiff::Timestamp::now().as_nanosecond() % 1_000_000_000
        );
        let mut conn = sqlx::PgConnection::connect(&admin)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL at {admin} is needed for this test: {e}"));
        sqlx::raw_sql(&format!("CREATE DATABASE \"{name}\" TEMPLATE template0"))
            .execute(&mut conn)
            .await
            .unwrap();
        let _ = conn.close().await;
        let (base, _) = admin.rsplit_once('/').unwrap();
        (format!("{base}/{name}"), name)
    }

    fn admin_url() -> String {
        std::env::var("DBPOLICY_TEST_ADMIN_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
    }

    async fn drop_database(name: &str) {
        let mut conn = sqlx::PgConnection::connect(&admin_url()).await.unwrap();
        let _ = sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .execute(&mut conn)
            .await;
    }

    const FLAGS: &str = "database: {connectionSecretRef: {name: x}}
featureFlags:
  flags:
    - {name: new_quiz_engine, enabled: true, rolloutPercentage: 25}
    - {name: ai_explanations, enabled: false}
";

    #[tokio::test]
    async fn applies_against_a_real_database_then_reports_ready_and_an_event() {
        let (url, name) = create_database().await;
        let (result, sent) = reconcile_with(
            test_policy(FLAGS, true),
            vec![
                Expect::GetSecret(Some(test_secret(&url))),
                Expect::PatchStatus,
                Expect::CreateEvent,
            ],
        )
        .await;
        drop_database(&name).await;
        assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(300)));
        let patch = &sent[1].body;
        let ready = condition(patch, "Ready");
        assert_eq!(ready["status"], "True", "{patch:#}");
        assert_eq!(ready["reason"], "Reconciled");
        assert_eq!(ready["observedGeneration"], 1);
        assert_eq!(condition(patch, "FeatureFlagsReady")["status"], "True");
        assert_eq!(condition(patch, "Drifted")["status"], "False");
        assert_eq!(patch["status"]["pendingChanges"], 0);
        assert_eq!(patch["status"]["mode"], "Apply");
        assert!(patch["status"].get("pendingPlan").is_none());
        let event = &sent[2].body;
        assert_eq!(event["type"], "Normal");
        assert_eq!(event["reason"], "Applied");
        assert_eq!(event["action"], "Apply");
        let note = event["note"].as_str().unwrap();
        assert!(
            note.starts_with("applied ") && note.contains("featureFlags"),
            "{note}"
        );
    }

    #[tokio::test]
    async fn plan_mode_reports_the_plan_and_changes_nothing() {
        let (url, name) = create_database().await;
        let spec = format!("{FLAGS}mode: Plan\n");
        let (result, sent) = reconcile_with(
            test_policy(&spec, true),
            vec![
                Expect::GetSecret(Some(test_secret(&url))),
                Expect::PatchStatus,
            ],
        )
        .await;
        let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
        let tables: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_tables WHERE tablename = 'feature_flags' OR schemaname = 'dbpolicy'",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap();
        let _ = conn.close().await;
        drop_database(&name).await;
        assert_eq!(tables, 0, "Plan mode created something");
        assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(300)));
        let patch = &sent[1].body;
        let ready = condition(patch, "Ready");
        assert_eq!(
            (&ready["status"], &ready["reason"]),
            (&json!("False"), &json!("PlanPending"))
        );
        let pending = patch["status"]["pendingChanges"].as_u64().unwrap();
        assert!(pending > 0);
        let plan: &Value = &patch["status"]["pendingPlan"];
        assert_eq!(plan["total"].as_u64(), Some(pending));
        assert_eq!(plan["byArea"]["featureFlags"].as_u64(), Some(pending));
        assert_eq!(condition(patch, "Drifted")["reason"], "DriftDetected");
    }

    fn with_status(mut policy: DatabasePolicy, patch: &Value) -> DatabasePolicy {
        policy.status = Some(serde_json::from_value(patch["status"].clone()).unwrap());
        policy
    }

    #[tokio::test]
    async fn drift_in_the_database_is_repaired_and_reported() {
        let (url, name) = create_database().await;
        let policy = test_policy(FLAGS, true);
        let secret = || Expect::GetSecret(Some(test_secret(&url)));
        let (first, sent) = reconcile_with(
            policy.clone(),
            vec![secret(), Expect::PatchStatus, Expect::CreateEvent],
        )
        .await;
        first.unwrap();
        // The status write wakes the controller: a converged check writes the same status.
        let policy = with_status(policy, &sent[1].body);
        let (second, sent) =
            reconcile_with(policy.clone(), vec![secret(), Expect::PatchStatus]).await;
        second.unwrap();
        let before = policy.status.as_ref().unwrap();
        let ready = condition(&sent[1].body, "Ready");
        assert_eq!(
            serde_json::to_value(&before.conditions[0]).unwrap(),
            *ready,
            "Ready, with its lastTransitionTime, is unchanged"
        );
        let policy = with_status(policy, &sent[1].body);
        assert_eq!(condition(&sent[1].body, "Drifted")["reason"], "InSync");

        let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
        sqlx::query(
            "UPDATE public.feature_flags SET enabled = NOT enabled WHERE name = 'new_quiz_engine'",
        )
        .execute(&mut conn)
        .await
        .unwrap();
        let _ = conn.close().await;

        let (third, sent) = reconcile_with(
            policy,
            vec![secret(), Expect::PatchStatus, Expect::CreateEvent],
        )
        .await;
        drop_database(&name).await;
        third.unwrap();
        let drifted = condition(&sent[1].body, "Drifted");
        assert_eq!(drifted["status"], "True", "{:#}", sent[1].body);
        assert_eq!(drifted["reason"], "DriftRepaired");
        assert!(drifted["message"]
            .as_str()
            .unwrap()
            .contains("featureFlags"));
        assert_eq!(condition(&sent[1].body, "Ready")["status"], "True");
        assert_eq!(sent[2].body["reason"], "Applied");
    }
}
