use super::*;
use std::collections::BTreeMap;

use crate::api::Mode;
use crate::controller::children;
use crate::controller::context::DEFAULT_JOB_IMAGE;
use crate::controller::fixtures::{
    condition, named_secret, test_context_with, test_policy, test_secret, Expect, Sent, NS,
};
use crate::jobs::cronjob::{backup_cronjob, refresh_cronjobs};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::core::v1::Secret;
use serde_json::{json, Value};
use sqlx::Connection;

const SPEC: &str = "database: {connectionSecretRef: {name: x}}\n";

/// Runs one reconcile against the mocked API server playing `scenario`.
async fn reconcile_with(
    policy: DatabasePolicy,
    scenario: Vec<Expect>,
) -> (Result<Action>, Vec<Sent>) {
    reconcile_on(true, policy, scenario).await
}

/// [`reconcile_with`], on an API server that serves batch/v1 CronJobs or not.
async fn reconcile_on(
    cronjobs: bool,
    policy: DatabasePolicy,
    scenario: Vec<Expect>,
) -> (Result<Action>, Vec<Sent>) {
    let (result, sent, _) = reconcile_metered(cronjobs, policy, scenario).await;
    (result, sent)
}

/// [`reconcile_on`], and the `/metrics` text afterwards.
async fn reconcile_metered(
    cronjobs: bool,
    policy: DatabasePolicy,
    scenario: Vec<Expect>,
) -> (Result<Action>, Vec<Sent>, String) {
    let (ctx, server) = test_context_with(cronjobs);
    let verifier = server.run(policy.clone(), scenario);
    let result = reconcile(Arc::new(policy), ctx.clone()).await;
    let mut registry = prometheus_client::registry::Registry::with_prefix("dbpolicy");
    ctx.metrics.clone().register(&mut registry);
    let metrics = crate::controller::metrics::encode(&registry);
    drop(ctx);
    let sent = tokio::time::timeout(Duration::from_secs(30), verifier)
        .await
        .expect("the scenario did not finish")
        .expect("the scenario failed");
    (result, sent, metrics)
}

fn all_bodies(sent: &[Sent]) -> String {
    sent.iter().map(|s| s.body.to_string()).collect()
}

#[tokio::test]
async fn adds_the_finalizer_first_and_nothing_else() {
    let (result, sent) = reconcile_with(test_policy(SPEC, false), vec![Expect::AddFinalizer]).await;
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
            Expect::ListCronJobs(vec![]),
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
        ["GET", "GET", "PATCH", "POST"]
    );
    let patch = &sent[2].body;
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
    let event = &sent[3].body;
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
    let (result, sent) = reconcile_with(test_policy(spec, true), vec![Expect::PatchStatus]).await;
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
            Expect::ListCronJobs(vec![]),
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
    let ready = condition(&sent[2].body, "Ready");
    assert_eq!(ready["reason"], "ConnectionFailed");
    assert!(ready["message"]
        .as_str()
        .unwrap()
        .contains("127.0.0.1:1/certquiz"));
    assert_eq!(sent[3].body["type"], "Warning");
    assert_eq!(sent[3].body["reason"], "ConnectionFailed");
    let everything = all_bodies(&sent);
    assert!(!everything.contains("hunter2"), "{everything}");
}

#[tokio::test]
async fn deletion_removes_the_finalizer_even_when_apply_never_ran() {
    let mut policy = test_policy(SPEC, true);
    policy.meta_mut().deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
    let (result, sent) = reconcile_with(
        policy,
        vec![
            Expect::GetSecret(None),
            Expect::CreateEvent,
            Expect::RemoveFinalizer,
        ],
    )
    .await;
    assert_eq!(result.unwrap(), Action::await_change());
    // The Secret is gone: deletion goes on, and the Warning says how to release.
    assert_eq!(sent[1].body["reason"], "ReleaseFailed");
    assert_eq!(sent[1].body["type"], "Warning");
    let note = sent[1].body["note"].as_str().unwrap();
    assert!(
        note.contains("dbpolicy release --policy-id default/test"),
        "{note}"
    );
    assert_eq!(
        sent[2].body,
        json!([
            {"op": "test", "path": "/metadata/finalizers/0", "value": "dbpolicy.dev/cleanup"},
            {"op": "remove", "path": "/metadata/finalizers/0"},
        ])
    );
}

async fn ledger_owners(url: &str) -> Vec<String> {
    let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
    let owners: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT policy FROM dbpolicy.managed ORDER BY 1")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    let _ = conn.close().await;
    owners
}

#[tokio::test]
async fn deletion_releases_the_claims_and_keeps_what_was_set() {
    let (url, name) = create_database().await;
    let policy = test_policy(FLAGS, true);
    let secret = || Expect::GetSecret(Some(test_secret(&url)));
    let (first, _) = reconcile_with(
        policy.clone(),
        vec![
            Expect::ListCronJobs(vec![]),
            secret(),
            Expect::PatchStatus,
            Expect::CreateEvent,
        ],
    )
    .await;
    first.unwrap();
    assert_eq!(ledger_owners(&url).await, ["default/test"]);
    let mut deleted = policy;
    deleted.meta_mut().deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
    let (result, sent) = reconcile_with(
        deleted,
        vec![secret(), Expect::CreateEvent, Expect::RemoveFinalizer],
    )
    .await;
    let owners = ledger_owners(&url).await;
    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    let flags: i64 = sqlx::query_scalar("SELECT count(*) FROM public.feature_flags")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    let _ = conn.close().await;
    drop_database(&name).await;
    assert_eq!(result.unwrap(), Action::await_change());
    assert!(owners.is_empty(), "claims left: {owners:?}");
    assert_eq!(flags, 2, "Retain (the default) keeps what the policy set");
    assert_eq!(sent[1].body["reason"], "Released");
    let note = sent[1].body["note"].as_str().unwrap();
    assert!(note.starts_with("deletionPolicy Retain:"), "{note}");
    assert!(note.contains("released "), "{note}");
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
            Expect::ListCronJobs(vec![]),
            Expect::GetSecret(Some(test_secret(&url))),
            Expect::PatchStatus,
            Expect::CreateEvent,
        ],
    )
    .await;
    drop_database(&name).await;
    assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(300)));
    let patch = &sent[2].body;
    let ready = condition(patch, "Ready");
    assert_eq!(ready["status"], "True", "{patch:#}");
    assert_eq!(ready["reason"], "Reconciled");
    assert_eq!(ready["observedGeneration"], 1);
    assert_eq!(condition(patch, "FeatureFlagsReady")["status"], "True");
    assert_eq!(condition(patch, "Drifted")["status"], "False");
    assert_eq!(patch["status"]["pendingChanges"], 0);
    assert_eq!(patch["status"]["mode"], "Apply");
    assert!(patch["status"].get("pendingPlan").is_none());
    let event = &sent[3].body;
    assert_eq!(event["type"], "Normal");
    assert_eq!(event["reason"], "Applied");
    assert_eq!(event["action"], "Apply");
    let note = event["note"].as_str().unwrap();
    assert!(
        note.starts_with("applied 4 change(s) (featureFlags 4): ")
            && note.contains("featureFlags new_quiz_engine: ")
            && note.contains("featureFlags ai_explanations: "),
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
            Expect::ListCronJobs(vec![]),
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
    let patch = &sent[2].body;
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
    assert_eq!(condition(patch, "Drifted")["reason"], "ChangesPending");
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
        vec![
            Expect::ListCronJobs(vec![]),
            secret(),
            Expect::PatchStatus,
            Expect::CreateEvent,
        ],
    )
    .await;
    first.unwrap();
    // The next drift check: a converged check writes only what changed (Drifted).
    let policy = with_status(policy, &sent[2].body);
    let (second, sent) = reconcile_with(
        policy.clone(),
        vec![Expect::ListCronJobs(vec![]), secret(), Expect::PatchStatus],
    )
    .await;
    second.unwrap();
    let before = policy.status.as_ref().unwrap();
    let ready = condition(&sent[2].body, "Ready");
    assert_eq!(
        serde_json::to_value(&before.conditions[0]).unwrap(),
        *ready,
        "Ready, with its lastTransitionTime, is unchanged"
    );
    let policy = with_status(policy, &sent[2].body);
    assert_eq!(condition(&sent[2].body, "Drifted")["reason"], "InSync");

    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::query(
        "UPDATE public.feature_flags SET enabled = NOT enabled WHERE name = 'new_quiz_engine'",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let _ = conn.close().await;

    let (third, sent, metrics) = reconcile_metered(
        true,
        policy,
        vec![
            Expect::ListCronJobs(vec![]),
            secret(),
            Expect::PatchStatus,
            Expect::CreateEvent,
        ],
    )
    .await;
    drop_database(&name).await;
    third.unwrap();
    let labels = format!("namespace=\"{NS}\",policy=\"test\"");
    for needle in [
        format!("dbpolicy_drift_detected_total{{{labels},area=\"featureFlags\"}} 1\n"),
        format!("dbpolicy_policy_ready{{{labels}}} 1\n"),
    ] {
        assert!(
            metrics.contains(&needle),
            "{needle} missing from\n{metrics}"
        );
    }
    assert!(
        !metrics.contains("dbpolicy_policy_pending_changes{"),
        "{metrics}"
    );
    let drifted = condition(&sent[2].body, "Drifted");
    assert_eq!(drifted["status"], "True", "{:#}", sent[2].body);
    assert_eq!(drifted["reason"], "DriftRepaired");
    assert!(drifted["message"]
        .as_str()
        .unwrap()
        .contains("featureFlags"));
    assert_eq!(condition(&sent[2].body, "Ready")["status"], "True");
    let event = &sent[3].body;
    assert_eq!(
        (event["type"].as_str(), event["reason"].as_str()),
        (Some("Normal"), Some("DriftRepaired"))
    );
    let note = event["note"].as_str().unwrap();
    assert!(
            note.starts_with("the database differed from the policy (featureFlags 1), repaired: featureFlags new_quiz_engine: "),
            "{note}"
        );
}

const RLS: &str = "database: {connectionSecretRef: {name: x}}
rowLevelSecurity:
  tables:
    - table: answers
      enabled: true
      force: true
      policies:
        - {name: answers_owner, command: All, using: \"owner = current_user\"}
";

/// Someone opens the table by hand: the repair is a Warning naming the policy and the
/// table, not a routine Normal event.
#[tokio::test]
async fn weakened_row_level_security_is_repaired_with_a_warning_naming_it() {
    let (url, name) = create_database().await;
    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::raw_sql("CREATE TABLE public.answers (id int, owner name)")
        .execute(&mut conn)
        .await
        .unwrap();
    let policy = test_policy(RLS, true);
    let secret = || Expect::GetSecret(Some(test_secret(&url)));
    let converge = |policy| {
        reconcile_with(
            policy,
            vec![
                Expect::ListCronJobs(vec![]),
                secret(),
                Expect::PatchStatus,
                Expect::CreateEvent,
            ],
        )
    };
    let (first, sent) = converge(policy.clone()).await;
    first.unwrap();
    assert_eq!(sent[3].body["reason"], "Applied", "{:#}", sent[3].body);
    let policy = with_status(policy, &sent[2].body);
    assert_eq!(condition(&sent[2].body, "Ready")["status"], "True");

    sqlx::raw_sql(
        "DROP POLICY answers_owner ON public.answers;
             ALTER TABLE public.answers NO FORCE ROW LEVEL SECURITY",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let (third, sent, metrics) = reconcile_metered(
        true,
        policy,
        vec![
            Expect::ListCronJobs(vec![]),
            secret(),
            Expect::PatchStatus,
            Expect::CreateEvent,
        ],
    )
    .await;
    let (enabled, forced, policies): (bool, bool, i64) = sqlx::query_as(
        "SELECT relrowsecurity, relforcerowsecurity,
                    (SELECT count(*) FROM pg_policy WHERE polrelid = c.oid)
             FROM pg_class c WHERE oid = 'public.answers'::regclass",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    let _ = conn.close().await;
    drop_database(&name).await;
    third.unwrap();
    assert_eq!((enabled, forced, policies), (true, true, 1), "repaired");
    let event = &sent[3].body;
    assert_eq!(
        (event["type"].as_str(), event["reason"].as_str()),
        (Some("Warning"), Some("SecurityDriftRepaired")),
        "{event:#}"
    );
    let note = event["note"].as_str().unwrap();
    assert!(
        note.starts_with(
            "row-level security was weakened outside the policy (2 change(s) to undo it)"
        ),
        "{note}"
    );
    assert!(
        note.contains("rowLevelSecurity public.answers: create policy answers_owner")
            && note.contains("rowLevelSecurity public.answers: force row level security"),
        "{note}"
    );
    assert!(
            metrics.contains("dbpolicy_drift_detected_total{namespace=\"default\",policy=\"test\",area=\"rowLevelSecurity\"} 1"),
            "{metrics}"
        );
}

const CHILDREN: &str = "database: {connectionSecretRef: {name: x}}
backups:
  schedule: '0 3 * * *'
  retention: {days: 30}
  storage: {pvc: {claimName: backups}}
materializedViews:
  views:
    - {name: stats, schedule: '*/15 * * * *', concurrently: true}
    - {name: manual}
";

fn rfc3339(secs_ago: i64) -> String {
    k8s_openapi::jiff::Timestamp::from_second(
        k8s_openapi::jiff::Timestamp::now().as_second() - secs_ago,
    )
    .unwrap()
    .to_string()
}

#[tokio::test]
async fn cronjobs_are_applied_and_backups_read_back_even_when_the_database_is_not_reachable() {
    let policy = test_policy(CHILDREN, true);
    let finished = rfc3339(3600);
    let job: Job = serde_json::from_value(json!({
        "metadata": {"name": "test-backup-1", "namespace": "default", "uid": "job-1",
            "labels": {"dbpolicy.dev/policy": "test", "dbpolicy.dev/job": "backup"}},
        "status": {"succeeded": 1, "startTime": finished, "completionTime": finished},
    }))
    .unwrap();
    let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "test-backup-1-abcde", "namespace": "default",
                "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": "test-backup-1", "uid": "job-1"}]},
            "status": {"containerStatuses": [{"name": "backup", "image": "i", "imageID": "", "ready": false,
                "restartCount": 0, "state": {"terminated": {"exitCode": 0, "finishedAt": finished,
                "message": "{\"result\":\"Succeeded\",\"sizeBytes\":123456}"}}}]},
        }))
        .unwrap();
    let (result, sent) = reconcile_with(
        policy.clone(),
        vec![
            Expect::ListCronJobs(vec![]),
            Expect::CreateCronJob("test-refresh-stats".into(), false),
            Expect::CreateCronJob("test-backup".into(), false),
            Expect::ListBackupJobs(vec![job]),
            Expect::ListBackupPods(vec![pod]),
            Expect::GetSecret(None),
            Expect::PatchStatus,
            Expect::CreateEvent,
        ],
    )
    .await;
    assert_eq!(result.unwrap_err().reason(), "SecretNotFound");
    // Exactly what the builders make, image from --job-image's default.
    let refresh = refresh_cronjobs(&policy, DEFAULT_JOB_IMAGE);
    assert_eq!(sent[1].body, serde_json::to_value(&refresh[0]).unwrap());
    let backup = backup_cronjob(&policy, DEFAULT_JOB_IMAGE).unwrap();
    assert_eq!(sent[2].body, serde_json::to_value(&backup).unwrap());
    assert_eq!(sent[2].body["apiVersion"], "batch/v1");
    assert_eq!(sent[2].body["kind"], "CronJob");
    assert_eq!(
        sent[2].body["metadata"]["ownerReferences"][0]["kind"],
        "DatabasePolicy"
    );
    assert_eq!(
        sent[2].body["metadata"]["ownerReferences"][0]["controller"],
        true
    );
    assert_eq!(
        sent[2].body["metadata"]["labels"],
        json!({"app.kubernetes.io/managed-by": "dbpolicy", "dbpolicy.dev/policy": "test", "dbpolicy.dev/job": "backup"})
    );
    assert_eq!(
        sent[2].body["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["image"],
        format!("ghcr.io/dbpolicy/dbpolicy:{}", env!("CARGO_PKG_VERSION"))
    );
    // Backups are reported although the database could not be reached.
    let patch = &sent[6].body;
    assert_eq!(condition(patch, "Ready")["reason"], "SecretNotFound");
    let backups = condition(patch, "BackupsReady");
    assert_eq!(
        (&backups["status"], &backups["reason"]),
        (&json!("True"), &json!("BackupSucceeded"))
    );
    assert_eq!(
        patch["status"]["backups"]["lastSuccessTime"],
        json!(finished)
    );
    assert_eq!(patch["status"]["backups"]["newestBackupBytes"], 123456);
    assert_eq!(
        condition(patch, "MaterializedViewsReady")["status"],
        "Unknown"
    );
}

fn owned_cronjob(spec: &str, name: &str) -> CronJob {
    let with = test_policy(spec, true);
    let mut jobs = refresh_cronjobs(&with, DEFAULT_JOB_IMAGE);
    jobs.extend(backup_cronjob(&with, DEFAULT_JOB_IMAGE));
    jobs.into_iter()
        .find(|c| c.metadata.name.as_deref() == Some(name))
        .unwrap()
}

#[tokio::test]
async fn cronjobs_no_longer_in_the_spec_are_deleted_and_only_those() {
    // The backups section was removed and the view unscheduled; one CronJob with our
    // labels but no owner reference (made by hand) is left alone.
    let spec = "database: {connectionSecretRef: {name: x}}
materializedViews:
  views:
    - {name: stats}
";
    let mut by_hand = owned_cronjob(CHILDREN, "test-refresh-stats");
    by_hand.metadata.name = Some("test-by-hand".into());
    by_hand.metadata.owner_references = None;
    let (result, sent) = reconcile_with(
        test_policy(spec, true),
        vec![
            Expect::ListCronJobs(vec![
                owned_cronjob(CHILDREN, "test-refresh-stats"),
                owned_cronjob(CHILDREN, "test-backup"),
                by_hand,
            ]),
            Expect::DeleteCronJob("test-refresh-stats".into()),
            Expect::DeleteCronJob("test-backup".into()),
            Expect::GetSecret(None),
            Expect::PatchStatus,
            Expect::CreateEvent,
        ],
    )
    .await;
    assert_eq!(result.unwrap_err().reason(), "SecretNotFound");
    for d in &sent[1..3] {
        assert_eq!(
            d.body,
            json!({"propagationPolicy": "Background"}),
            "its Jobs go with it"
        );
    }
    let patch = &sent[4].body;
    assert!(patch["status"].get("backups").is_none());
    assert!(condition_opt(patch, "BackupsReady").is_none());
}

fn condition_opt<'a>(patch: &'a Value, type_: &str) -> Option<&'a Value> {
    patch["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

#[tokio::test]
async fn without_batch_v1_cronjobs_the_spec_that_needs_them_says_so() {
    let (result, sent) = reconcile_on(
        false,
        test_policy(CHILDREN, true),
        vec![
            Expect::GetSecret(None),
            Expect::PatchStatus,
            Expect::CreateEvent,
        ],
    )
    .await;
    assert_eq!(result.unwrap_err().reason(), "SecretNotFound");
    let backups = condition(&sent[1].body, "BackupsReady");
    assert_eq!(backups["status"], "Unknown");
    assert_eq!(backups["reason"], "CronJobsUnsupported");
    assert!(backups["message"].as_str().unwrap().contains("batch/v1"));
}

#[tokio::test]
async fn replicas_publish_the_read_endpoint_and_a_missing_secret_is_one_unknown_replica() {
    let (url, name) = create_database().await;
    // r1 points at the primary itself (not in recovery); r2's Secret does not exist.
    let spec = "database: {connectionSecretRef: {name: x}}
replicas:
  replicas:
    - {name: r1, connectionSecretRef: {name: r1-db}, maxLagSeconds: 30}
    - {name: r2, connectionSecretRef: {name: r2-db}}
  fallbackToPrimary: true
";
    let (result, sent) = reconcile_with(
        test_policy(spec, true),
        vec![
            Expect::ListCronJobs(vec![]),
            Expect::GetSecret(Some(test_secret(&url))),
            Expect::GetNamedSecret("r1-db".into(), Some(named_secret("r1-db", &url))),
            Expect::GetNamedSecret("r2-db".into(), None),
            Expect::GetNamedSecret("test-read".into(), None),
            Expect::CreateSecret("test-read".into()),
            Expect::PatchStatus,
            Expect::CreateEvent,
            Expect::CreateEvent,
        ],
    )
    .await;
    drop_database(&name).await;
    assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(300)));
    let secret = &sent[5].body;
    assert_eq!(secret["apiVersion"], "v1");
    assert_eq!(secret["kind"], "Secret");
    assert_eq!(secret["type"], "Opaque");
    assert_eq!(secret["metadata"]["name"], "test-read");
    assert_eq!(secret["metadata"]["namespace"], "default");
    assert_eq!(
        secret["metadata"]["ownerReferences"][0]["kind"],
        "DatabasePolicy"
    );
    assert_eq!(secret["metadata"]["ownerReferences"][0]["name"], "test");
    let data: BTreeMap<String, String> = secret["data"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            let b: k8s_openapi::ByteString = serde_json::from_value(v.clone()).unwrap();
            (k.clone(), String::from_utf8(b.0).unwrap())
        })
        .collect();
    assert_eq!(
        data,
        BTreeMap::from([
            ("DATABASE_READ_URL".to_string(), url.clone()),
            ("DATABASE_READ_URLS".to_string(), url.clone()),
            ("DATABASE_READ_SOURCE".to_string(), "primary".to_string()),
        ]),
        "no replica is healthy: the primary, as fallbackToPrimary says"
    );
    let patch = &sent[6].body;
    let replicas = &patch["status"]["replicas"];
    assert_eq!(replicas[0]["name"], "r1");
    assert_eq!(replicas[0]["state"], "NotInRecovery");
    assert_eq!(replicas[1]["state"], "Unknown");
    let ready = condition(patch, "ReplicasReady");
    assert_eq!(
        (&ready["status"], &ready["reason"]),
        (&json!("False"), &json!("ReplicaNotInRecovery"))
    );
    assert!(
        ready["message"]
            .as_str()
            .unwrap()
            .contains("r2: Secret default/r2-db not found"),
        "{ready}"
    );
    assert_eq!(condition(patch, "Ready")["reason"], "ReplicaNotInRecovery");
    let events: Vec<(&Value, &Value)> = sent[7..]
        .iter()
        .map(|s| (&s.body["type"], &s.body["reason"]))
        .collect();
    assert_eq!(
        events,
        [
            (&json!("Warning"), &json!("ReplicaNotInRecovery")),
            (&json!("Warning"), &json!("ReplicaNotChecked")),
        ]
    );
    // The URLs are in the Secret and nowhere else.
    for s in sent
        .iter()
        .filter(|s| !s.request.contains("/secrets/test-read"))
    {
        assert!(
            !s.body.to_string().contains(&url),
            "{}: {}",
            s.request,
            s.body
        );
    }
}

#[tokio::test]
async fn a_read_endpoint_secret_of_another_owner_is_never_changed_or_owned() {
    let (url, name) = create_database().await;
    let spec = "database: {connectionSecretRef: {name: x}}
replicas:
  replicas:
    - {name: r1, connectionSecretRef: {name: r1-db}}
  readEndpointSecretName: app-env
";
    // The application's own Secret, and one the policy created earlier (its ownerRef).
    let theirs = named_secret("app-env", "postgres://app-owned");
    let (result, sent) = reconcile_with(
        test_policy(spec, true),
        vec![
            Expect::ListCronJobs(vec![]),
            Expect::GetSecret(Some(test_secret(&url))),
            Expect::GetNamedSecret("r1-db".into(), Some(named_secret("r1-db", &url))),
            Expect::GetNamedSecret("app-env".into(), Some(theirs)),
            Expect::PatchStatus,
            Expect::CreateEvent,
            Expect::CreateEvent,
        ],
    )
    .await;
    drop_database(&name).await;
    let err = result.unwrap_err();
    assert_eq!(err.reason(), "SecretNotOwned");
    let patch = &sent[4].body;
    let replicas = condition(patch, "ReplicasReady");
    assert_eq!(
        (&replicas["status"], &replicas["reason"]),
        (&json!("False"), &json!("SecretNotOwned")),
        "{patch:#}"
    );
    let message = replicas["message"].as_str().unwrap();
    assert!(
            message.starts_with("Secret default/app-env (spec.replicas.readEndpointSecretName) exists and was not created by this policy"),
            "{message}"
        );
    assert_eq!(condition(patch, "Ready")["status"], "False");
    assert!(
        !sent
            .iter()
            .any(|s| s.request.contains("/secrets/app-env") && !s.request.starts_with("GET")),
        "the application's Secret was written"
    );

    // A Secret this policy created (controller ownerReference with its uid) is applied.
    let policy = test_policy(spec, true);
    let mut ours = named_secret("app-env", "x");
    ours.metadata.owner_references = policy.controller_owner_ref(&()).map(|o| vec![o]);
    let (url, name) = create_database().await;
    let (_, sent) = reconcile_with(
        policy,
        vec![
            Expect::ListCronJobs(vec![]),
            Expect::GetSecret(Some(test_secret(&url))),
            Expect::GetNamedSecret("r1-db".into(), Some(named_secret("r1-db", &url))),
            Expect::GetNamedSecret("app-env".into(), Some(ours)),
            Expect::ApplySecret("app-env".into()),
            Expect::PatchStatus,
            Expect::CreateEvent,
        ],
    )
    .await;
    drop_database(&name).await;
    assert_eq!(sent[4].body["metadata"]["name"], "app-env");
}

#[tokio::test]
async fn a_cronjob_of_another_owner_is_never_taken_over() {
    // test-backup exists but is not the policy's (the create answers AlreadyExists);
    // test-refresh-stats is the policy's own and in place: not applied again.
    let (result, sent) = reconcile_with(
        test_policy(CHILDREN, true),
        vec![
            Expect::ListCronJobs(vec![owned_cronjob(CHILDREN, "test-refresh-stats")]),
            Expect::CreateCronJob("test-backup".into(), true),
            Expect::GetSecret(None),
            Expect::PatchStatus,
            Expect::CreateEvent,
        ],
    )
    .await;
    assert_eq!(result.unwrap_err().reason(), "SecretNotFound");
    let backups = condition(&sent[3].body, "BackupsReady");
    assert_eq!(
        (&backups["status"], &backups["reason"]),
        (&json!("False"), &json!("CronJobNotOwned")),
        "{backups}"
    );
    assert!(backups["message"].as_str().unwrap().starts_with(
        "CronJob default/test-backup (spec.backups) exists and was not created by this policy"
    ));
}

#[tokio::test]
async fn plan_mode_reports_cronjobs_as_pending_and_creates_none() {
    let (url, name) = create_database().await;
    let spec = "database: {connectionSecretRef: {name: x}}
mode: Plan
backups: {schedule: '0 3 * * *', storage: {pvc: {claimName: backups}}}
";
    let (result, sent) = reconcile_with(
        test_policy(spec, true),
        vec![
            Expect::ListCronJobs(vec![]),
            Expect::ListBackupJobs(vec![]),
            Expect::GetSecret(Some(test_secret(&url))),
            Expect::PatchStatus,
        ],
    )
    .await;
    drop_database(&name).await;
    assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(300)));
    let patch = &sent[3].body;
    assert_eq!(patch["status"]["pendingChanges"], 1);
    let plan = &patch["status"]["pendingPlan"];
    assert_eq!(plan["byArea"]["backups"], 1);
    assert_eq!(plan["changes"][0]["target"], "CronJob/test-backup");
    assert_eq!(
        plan["changes"][0]["summary"],
        "create CronJob test-backup (schedule 0 3 * * *)"
    );
    let backups = condition(patch, "BackupsReady");
    assert_eq!(backups["reason"], "PlanPending", "{backups}");
    assert_eq!(condition(patch, "Ready")["reason"], "PlanPending");
    assert_eq!(patch["status"]["backups"], json!({}));
}

/// [`reconcile_with`] on a context that reads Secrets and CronJobs from watch caches
/// holding these objects, as `dbpolicy run` does.
async fn reconcile_cached(
    policy: DatabasePolicy,
    secrets: Vec<Secret>,
    cronjobs: Vec<CronJob>,
    scenario: Vec<Expect>,
) -> (Result<Action>, Vec<Sent>) {
    let (ctx, server) = crate::controller::fixtures::test_context_cached(secrets, cronjobs);
    let verifier = server.run(policy.clone(), scenario);
    let result = reconcile(Arc::new(policy), ctx.clone()).await;
    drop(ctx);
    let sent = tokio::time::timeout(Duration::from_secs(30), verifier)
        .await
        .expect("the scenario did not finish")
        .expect("the scenario failed");
    (result, sent)
}

/// Issue 17: a steady-state reconcile (nothing changed in the database, the Secret or
/// the spec) sends no API request at all: the Secret comes from the watch cache, and the
/// status it would write is the one the policy has. The mocked API server fails on any
/// request beyond the scenario.
#[tokio::test]
async fn a_steady_state_reconcile_sends_no_api_request() {
    let (url, name) = create_database().await;
    let secrets = || vec![*test_secret(&url)];
    let policy = test_policy(FLAGS, true);
    let (first, sent) = reconcile_cached(
        policy.clone(),
        secrets(),
        vec![],
        vec![Expect::PatchStatus, Expect::CreateEvent],
    )
    .await;
    first.unwrap();
    // The first check after the apply finds the database in sync: Drifted says so.
    let policy = with_status(policy, &sent[0].body);
    let (second, sent) =
        reconcile_cached(policy.clone(), secrets(), vec![], vec![Expect::PatchStatus]).await;
    second.unwrap();
    assert_eq!(condition(&sent[0].body, "Drifted")["reason"], "InSync");
    let policy = with_status(policy, &sent[0].body);
    for _ in 0..2 {
        let (steady, sent) = reconcile_cached(policy.clone(), secrets(), vec![], vec![]).await;
        assert_eq!(steady.unwrap(), Action::requeue(Duration::from_secs(300)));
        assert!(sent.is_empty());
    }
    // The Secret changed (another password, the same database): read from the cache,
    // still no request, and the database is reached with the new value.
    let moved = format!("{url}?application_name=rotated");
    let (rotated, sent) =
        reconcile_cached(policy.clone(), vec![*test_secret(&moved)], vec![], vec![]).await;
    rotated.unwrap();
    assert!(sent.is_empty());
    // A Secret missing from the cache is SecretNotFound, without a GET.
    let (missing, _) = reconcile_cached(
        policy,
        vec![],
        vec![],
        vec![Expect::PatchStatus, Expect::CreateEvent],
    )
    .await;
    drop_database(&name).await;
    assert_eq!(missing.unwrap_err().reason(), "SecretNotFound");
}

/// CronJobs come from the watch cache; one in place (as the API server returns it, with
/// defaults and status) is not applied again, a changed one is, and nothing is listed.
#[tokio::test]
async fn cronjobs_in_place_are_neither_listed_nor_applied_again() {
    let spec = "database: {connectionSecretRef: {name: x}}
materializedViews: {views: [{name: stats, schedule: '*/15 * * * *'}, {name: daily, schedule: '0 1 * * *'}]}
";
    let policy = test_policy(spec, true);
    let served: Vec<CronJob> = refresh_cronjobs(&policy, DEFAULT_JOB_IMAGE)
        .into_iter()
        .map(|mut cj| {
            let spec = cj.spec.as_mut().unwrap();
            spec.concurrency_policy.get_or_insert("Allow".into());
            spec.job_template.spec.as_mut().unwrap().completions = Some(1);
            cj.metadata.resource_version = Some("7".into());
            cj.metadata.creation_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
            cj
        })
        .collect();
    let sync = |cached: Vec<CronJob>, scenario: Vec<Expect>| {
        let policy = policy.clone();
        async move {
            let (ctx, server) = crate::controller::fixtures::test_context_cached(vec![], cached);
            let verifier = server.run(policy.clone(), scenario);
            let result = children::sync_cronjobs(
                &ctx.client,
                ctx.cronjob_cache.as_ref(),
                &policy,
                &ctx.job_image,
                Mode::Apply,
            )
            .await;
            drop(ctx);
            (result, verifier.await.expect("the scenario failed"))
        }
    };
    let (result, sent) = sync(served.clone(), vec![]).await;
    result.unwrap();
    assert!(sent.is_empty(), "{sent:?}");

    let mut changed = served.clone();
    changed[1].spec.as_mut().unwrap().schedule = "0 2 * * *".into();
    let name = changed[1].name_any();
    let (result, _) = sync(changed, vec![Expect::ApplyCronJob(name)]).await;
    result.unwrap();

    // Not in the cache yet (created a moment ago): the create conflicts, the owner
    // reference says it is ours, and it is applied, not reported as another's.
    let (result, sent) = sync(
        served[..1].to_vec(),
        vec![
            Expect::CreateCronJob(served[1].name_any(), true),
            Expect::GetCronJob(Box::new(served[1].clone())),
            Expect::ApplyCronJob(served[1].name_any()),
        ],
    )
    .await;
    result.unwrap();
    assert_eq!(sent.len(), 3);
}

/// The read-endpoint Secret in the cache with the data to publish is not written again;
/// changed data is applied; another owner's is never written, and no GET is sent.
#[tokio::test]
async fn the_read_endpoint_secret_in_place_is_not_written_again() {
    let policy = test_policy(
        "database: {connectionSecretRef: {name: x}}\nreplicas: {replicas: []}\n",
        true,
    );
    let data = |v: &str| BTreeMap::from([("DATABASE_READ_URL".to_string(), v.to_string())]);
    let ours = children::read_endpoint_secret(&policy, "test-read", data("postgres://r1"));
    let publish = |cached: Vec<Secret>, want: Secret, scenario: Vec<Expect>| {
        let policy = policy.clone();
        async move {
            let (ctx, server) = crate::controller::fixtures::test_context_cached(cached, vec![]);
            let verifier = server.run(policy.clone(), scenario);
            let result = children::publish_read_endpoint(
                &ctx.client,
                ctx.secret_cache.as_ref(),
                &policy,
                &want,
            )
            .await;
            drop(ctx);
            (result, verifier.await.expect("the scenario failed"))
        }
    };
    let (result, sent) = publish(vec![ours.clone()], ours.clone(), vec![]).await;
    result.unwrap();
    assert!(sent.is_empty());

    let moved = children::read_endpoint_secret(&policy, "test-read", data("postgres://r2"));
    let (result, _) = publish(
        vec![ours.clone()],
        moved,
        vec![Expect::ApplySecret("test-read".into())],
    )
    .await;
    result.unwrap();

    let mut theirs = ours.clone();
    theirs.metadata.owner_references = None;
    let (result, sent) = publish(vec![theirs], ours.clone(), vec![]).await;
    assert_eq!(result.unwrap_err().reason(), "SecretNotOwned");
    assert!(sent.is_empty());

    let (result, _) = publish(
        vec![],
        ours.clone(),
        vec![Expect::CreateSecret("test-read".into())],
    )
    .await;
    result.unwrap();
}

/// Schema-valid specs with hostile values where the schema allows them (durations of
/// any size, schedules, names), reconciled through the mocked API: never a panic.
mod no_panic {
    use super::*;
    use proptest::prelude::*;

    fn spec() -> impl Strategy<Value = serde_json::Value> {
        let duration = "[0-9]{1,22}(ms|s|m|min|h|d)";
        (
            (duration, duration, duration),
            (any::<Option<bool>>(), any::<bool>(), any::<bool>()),
            (
                "[0-9*/,-]{1,12} [0-9*/,-]{1,8} \\* \\* \\*",
                "[a-z0-9_]{1,63}",
                "[a-z0-9-]{1,40}",
            ),
            any::<bool>(),
        )
            .prop_map(
                |((drift, lock, statement), (suspend, plan, reset), (schedule, slot, name), s3)| {
                    let storage = if s3 {
                        json!({"s3": {"bucket": "bucket", "credentialsSecretRef": {"name": name}}})
                    } else {
                        json!({"pvc": {"claimName": name}})
                    };
                    json!({
                        "database": {"connectionSecretRef": {"name": "x"}},
                        "driftCheckInterval": drift,
                        "suspend": suspend,
                        "mode": if plan { "Plan" } else { "Apply" },
                        "deletionPolicy": if reset { "Reset" } else { "Retain" },
                        "safety": {"lockTimeout": lock, "statementTimeout": statement},
                        "backups": {"schedule": schedule, "storage": storage},
                        "materializedViews": {"views": [{"name": name, "schedule": schedule}]},
                        "replicas": {"replicas": [
                            {"name": name, "connectionSecretRef": {"name": name}, "slot": slot},
                        ], "readEndpointSecretName": name},
                        "featureFlags": {"flags": [{"name": "f", "enabled": true}]},
                    })
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
        #[test]
        fn reconcile_never_panics(spec in spec(), secret in any::<bool>(), deleted in any::<bool>(), cronjobs in any::<bool>()) {
            let mut policy = test_policy("database: {connectionSecretRef: {name: x}}\n", true);
            policy.spec = serde_json::from_value(spec).unwrap();
            policy.spec.database.connection_secret_ref.name = crate::controller::fixtures::SECRET.into();
            if deleted {
                policy.meta_mut().deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
            }
            // A database that refuses at once: the run goes as far as it can without one.
            let secret = secret.then(|| test_secret("postgres://u:pw@127.0.0.1:1/db?connect_timeout=1"));
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let (ctx, server) = test_context_with(cronjobs);
                let served = server.serve_anything(policy.clone(), secret);
                let result = reconcile(Arc::new(policy), ctx.clone()).await;
                drop(ctx);
                served.await.expect("the mocked API server did not panic");
                if let Err(e) = result {
                    let text = e.to_string();
                    prop_assert!(!text.contains("pw@"), "{text}");
                    prop_assert!(!text.lines().next().unwrap_or("").ends_with(':'), "{text}");
                }
                Ok(())
            })?;
        }
    }
}
