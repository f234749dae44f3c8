//! Test fixtures: a mocked API server (tower-test) that plays a scenario of expected requests, checks each one and records what was sent.

use std::sync::Arc;

use http::{Request, Response, StatusCode};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::ByteString;
use kube::client::Body;
use kube::{Client, Resource, ResourceExt};
use serde_json::{json, Value};

use super::context::Context;
use super::metrics::Metrics;
use crate::api::{DatabasePolicy, DatabasePolicySpec};

type ApiServerHandle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// A request the reconciler sent, as the API server received it.
#[derive(Debug, Clone)]
pub(crate) struct Sent {
    /// `METHOD /path?query`
    pub request: String,
    pub body: Value,
}

/// One expected request and the answer the mocked API server gives.
#[derive(Debug, Clone)]
pub(crate) enum Expect {
    /// The JSON patch that adds the finalizer.
    AddFinalizer,
    /// The JSON patch that removes it.
    RemoveFinalizer,
    /// GET of the connection Secret, answered with it (or 404 when None).
    GetSecret(Option<Box<Secret>>),
    /// Server-side apply on /status.
    PatchStatus,
    /// An Event created through the Recorder.
    CreateEvent,
    /// LIST of the policy's CronJobs (by label selector), answered with these.
    ListCronJobs(Vec<CronJob>),
    /// Server-side apply of the CronJob of this name; the answer is what was sent, with a
    /// creation time.
    ApplyCronJob(String),
    /// POST of a new CronJob of this name; answered 409 AlreadyExists when the bool is
    /// true (someone else's CronJob has that name), else with what was sent.
    CreateCronJob(String, bool),
    /// GET of a CronJob, answered with it.
    GetCronJob(Box<CronJob>),
    /// DELETE of the CronJob of this name, with its Jobs (background propagation).
    DeleteCronJob(String),
    /// LIST of the backup Jobs of the policy, answered with these.
    ListBackupJobs(Vec<Job>),
    /// LIST of their pods, answered with these.
    ListBackupPods(Vec<Pod>),
    /// GET of the Secret of this name (a replica's), answered with it (or 404 when None).
    GetNamedSecret(String, Option<Box<Secret>>),
    /// Server-side apply of the Secret of this name (the read endpoint).
    ApplySecret(String),
    /// POST of a new Secret of this name (the read endpoint).
    CreateSecret(String),
    /// Any request, matched as `METHOD path?query` with the query decoded; answered with
    /// this status and body, or (None) with what was sent.
    Request(String, u16, Option<Value>),
}

/// The expected requests, in order.
pub(crate) type Scenario = Vec<Expect>;

pub(crate) struct ApiServerVerifier(ApiServerHandle);

pub(crate) const NS: &str = "default";
pub(crate) const NAME: &str = "test";
pub(crate) const SECRET: &str = "test-db";

pub(crate) fn not_found(what: &str) -> (StatusCode, Value) {
    (
        StatusCode::NOT_FOUND,
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "reason": "NotFound", "code": 404,
            "message": format!("{what} not found"),
        }),
    )
}

fn already_exists(what: &str) -> (StatusCode, Value) {
    (
        StatusCode::CONFLICT,
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "reason": "AlreadyExists", "code": 409,
            "message": format!("{what} already exists"),
        }),
    )
}

fn list(api_version: &str, kind: &str, items: Value) -> Value {
    json!({"apiVersion": api_version, "kind": kind, "metadata": {"resourceVersion": "1"}, "items": items})
}

/// `METHOD path?query` with the query decoded, for readable assertions.
fn decoded(what: &str) -> String {
    match what.split_once('?') {
        Some((path, query)) => {
            let pairs: Vec<String> = url::form_urlencoded::parse(query.as_bytes())
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            format!("{path}?{}", pairs.join("&"))
        }
        None => what.to_string(),
    }
}

fn policy_path() -> String {
    format!("/apis/dbpolicy.dev/v1alpha1/namespaces/{NS}/databasepolicies/{NAME}")
}

impl ApiServerVerifier {
    /// Plays `scenario` against the reconciler; the task returns every request sent and
    /// fails on an unexpected one, or when a request is missing or one too many.
    pub(crate) fn run(
        self,
        policy: DatabasePolicy,
        scenario: Scenario,
    ) -> tokio::task::JoinHandle<Vec<Sent>> {
        tokio::spawn(async move {
            let mut handle = self.0;
            let mut sent = Vec::new();
            for expect in scenario {
                let (request, send) = handle
                    .next_request()
                    .await
                    .unwrap_or_else(|| panic!("expected {expect:?}, but no request came"));
                let what = format!("{} {}", request.method(), request.uri());
                let bytes = request.into_body().collect_bytes().await.unwrap();
                let body: Value = if bytes.is_empty() {
                    Value::Null
                } else {
                    serde_json::from_slice(&bytes).unwrap()
                };
                let (status, reply) = match &expect {
                    Expect::AddFinalizer => {
                        assert_eq!(what, format!("PATCH {}?", policy_path()));
                        let mut p = policy.clone();
                        p.finalizers_mut().push(super::context::FINALIZER.into());
                        (StatusCode::OK, serde_json::to_value(p).unwrap())
                    }
                    Expect::RemoveFinalizer => {
                        assert_eq!(what, format!("PATCH {}?", policy_path()));
                        let mut p = policy.clone();
                        p.finalizers_mut().clear();
                        (StatusCode::OK, serde_json::to_value(p).unwrap())
                    }
                    Expect::GetSecret(secret) => {
                        assert_eq!(
                            what,
                            format!("GET /api/v1/namespaces/{NS}/secrets/{SECRET}")
                        );
                        match secret {
                            Some(s) => (StatusCode::OK, serde_json::to_value(s).unwrap()),
                            None => (
                                StatusCode::NOT_FOUND,
                                json!({
                                    "kind": "Status", "apiVersion": "v1", "metadata": {},
                                    "status": "Failure", "reason": "NotFound", "code": 404,
                                    "message": format!("secrets \"{SECRET}\" not found"),
                                }),
                            ),
                        }
                    }
                    Expect::PatchStatus => {
                        assert_eq!(
                            what,
                            format!(
                                "PATCH {}/status?&force=true&fieldManager=dbpolicy",
                                policy_path()
                            )
                        );
                        let mut p = serde_json::to_value(&policy).unwrap();
                        p["status"] = body["status"].clone();
                        (StatusCode::OK, p)
                    }
                    Expect::CreateEvent => {
                        assert_eq!(
                            what,
                            format!("POST /apis/events.k8s.io/v1/namespaces/{NS}/events?")
                        );
                        (StatusCode::CREATED, body.clone())
                    }
                    Expect::ListCronJobs(items) => {
                        assert_eq!(
                            decoded(&what),
                            format!("GET /apis/batch/v1/namespaces/{NS}/cronjobs?labelSelector=app.kubernetes.io/managed-by=dbpolicy,dbpolicy.dev/policy={NAME}")
                        );
                        (
                            StatusCode::OK,
                            list(
                                "batch/v1",
                                "CronJobList",
                                serde_json::to_value(items).unwrap(),
                            ),
                        )
                    }
                    Expect::ApplyCronJob(name) => {
                        assert_eq!(
                            what,
                            format!("PATCH /apis/batch/v1/namespaces/{NS}/cronjobs/{name}?&force=true&fieldManager=dbpolicy")
                        );
                        let mut reply = body.clone();
                        reply["metadata"]["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
                        (StatusCode::OK, reply)
                    }
                    Expect::CreateCronJob(name, exists) => {
                        assert_eq!(
                            what,
                            format!("POST /apis/batch/v1/namespaces/{NS}/cronjobs?&fieldManager=dbpolicy")
                        );
                        assert_eq!(body["metadata"]["name"], json!(name));
                        if *exists {
                            already_exists(&format!("cronjobs.batch \"{name}\""))
                        } else {
                            let mut reply = body.clone();
                            reply["metadata"]["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
                            (StatusCode::CREATED, reply)
                        }
                    }
                    Expect::GetCronJob(cj) => {
                        assert_eq!(
                            what,
                            format!(
                                "GET /apis/batch/v1/namespaces/{NS}/cronjobs/{}",
                                cj.name_any()
                            )
                        );
                        (StatusCode::OK, serde_json::to_value(cj).unwrap())
                    }
                    Expect::DeleteCronJob(name) => {
                        assert_eq!(
                            what,
                            format!("DELETE /apis/batch/v1/namespaces/{NS}/cronjobs/{name}?")
                        );
                        (
                            StatusCode::OK,
                            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}),
                        )
                    }
                    Expect::ListBackupJobs(items) => {
                        assert_eq!(
                            decoded(&what),
                            format!("GET /apis/batch/v1/namespaces/{NS}/jobs?labelSelector=dbpolicy.dev/policy={NAME},dbpolicy.dev/job=backup")
                        );
                        (
                            StatusCode::OK,
                            list("batch/v1", "JobList", serde_json::to_value(items).unwrap()),
                        )
                    }
                    Expect::ListBackupPods(items) => {
                        assert_eq!(
                            decoded(&what),
                            format!("GET /api/v1/namespaces/{NS}/pods?labelSelector=dbpolicy.dev/policy={NAME},dbpolicy.dev/job=backup")
                        );
                        (
                            StatusCode::OK,
                            list("v1", "PodList", serde_json::to_value(items).unwrap()),
                        )
                    }
                    Expect::GetNamedSecret(name, secret) => {
                        assert_eq!(what, format!("GET /api/v1/namespaces/{NS}/secrets/{name}"));
                        match secret {
                            Some(s) => (StatusCode::OK, serde_json::to_value(s).unwrap()),
                            None => not_found(&format!("secrets \"{name}\"")),
                        }
                    }
                    Expect::ApplySecret(name) => {
                        assert_eq!(
                            what,
                            format!("PATCH /api/v1/namespaces/{NS}/secrets/{name}?&force=true&fieldManager=dbpolicy")
                        );
                        (StatusCode::OK, body.clone())
                    }
                    Expect::CreateSecret(name) => {
                        assert_eq!(
                            what,
                            format!("POST /api/v1/namespaces/{NS}/secrets?&fieldManager=dbpolicy")
                        );
                        assert_eq!(body["metadata"]["name"], json!(name));
                        (StatusCode::CREATED, body.clone())
                    }
                    Expect::Request(expected, code, reply) => {
                        assert_eq!(decoded(&what), *expected);
                        (
                            StatusCode::from_u16(*code).unwrap(),
                            reply.clone().unwrap_or_else(|| body.clone()),
                        )
                    }
                };
                send.send_response(
                    Response::builder()
                        .status(status)
                        .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                        .unwrap(),
                );
                sent.push(Sent {
                    request: what,
                    body,
                });
            }
            // Every client clone is gone once the test drops the context: nothing else may
            // have been sent.
            if let Some((request, _)) = handle.next_request().await {
                panic!(
                    "unexpected request after the scenario: {} {}",
                    request.method(),
                    request.uri()
                );
            }
            sent
        })
    }
}

impl ApiServerVerifier {
    /// Answers every request plausibly, whatever the order (for property tests, where the
    /// requests depend on the generated spec): GET of a Secret answers `secret` (or 404),
    /// a LIST an empty list, POST/PATCH echo what was sent (with the policy around a
    /// status patch), DELETE succeeds. Returns how many requests were answered.
    pub(crate) fn serve_anything(
        self,
        policy: DatabasePolicy,
        secret: Option<Box<Secret>>,
    ) -> tokio::task::JoinHandle<usize> {
        tokio::spawn(async move {
            let mut handle = self.0;
            let mut n = 0;
            while let Some((request, send)) = handle.next_request().await {
                n += 1;
                let method = request.method().clone();
                let path = request.uri().path().to_string();
                let bytes = request.into_body().collect_bytes().await.unwrap();
                let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let is_list = !path.contains("/secrets/")
                    && !path.ends_with(&format!("/{NAME}"))
                    && !path.ends_with("/status");
                let (status, reply) = match method.as_str() {
                    "GET" if path.contains("/secrets/") => match &secret {
                        Some(s) if path.ends_with(&format!("/{SECRET}")) => {
                            (StatusCode::OK, serde_json::to_value(s).unwrap())
                        }
                        _ => not_found("secrets"),
                    },
                    "GET" if is_list => (StatusCode::OK, list("v1", "List", json!([]))),
                    "GET" => not_found(&path),
                    "PATCH" if path.ends_with("/status") => {
                        let mut p = serde_json::to_value(&policy).unwrap();
                        p["status"] = body["status"].clone();
                        (StatusCode::OK, p)
                    }
                    "PATCH" if path.ends_with(&format!("databasepolicies/{NAME}")) => {
                        (StatusCode::OK, serde_json::to_value(&policy).unwrap())
                    }
                    "POST" => (StatusCode::CREATED, body),
                    "DELETE" => (
                        StatusCode::OK,
                        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}),
                    ),
                    _ => (StatusCode::OK, body),
                };
                send.send_response(
                    Response::builder()
                        .status(status)
                        .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                        .unwrap(),
                );
            }
            n
        })
    }
}

/// A context whose client talks to the mocked API server.
///
/// A context on an API server that serves batch/v1 CronJobs or not.
pub(crate) fn test_context_with(cronjobs: bool) -> (Arc<Context>, ApiServerVerifier) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, NS);
    let ctx = Context::new(client, Some("test-instance".into()), Metrics::default())
        .with_jobs(super::context::DEFAULT_JOB_IMAGE, cronjobs);
    (Arc::new(ctx), ApiServerVerifier(handle))
}

/// A policy named `default/test` reading Secret `test-db`, with the operator's finalizer
/// (so that Apply runs) unless `finalized` is false.
pub(crate) fn test_policy(spec_yaml: &str, finalized: bool) -> DatabasePolicy {
    let mut spec: DatabasePolicySpec = serde_yaml::from_str(spec_yaml).unwrap();
    spec.database.connection_secret_ref.name = SECRET.into();
    let mut p = DatabasePolicy::new(NAME, spec);
    p.meta_mut().namespace = Some(NS.into());
    p.meta_mut().generation = Some(1);
    p.meta_mut().uid = Some("7c1c4b6e-0000-4000-8000-000000000001".into());
    p.meta_mut().resource_version = Some("1".into());
    if finalized {
        p.finalizers_mut().push(super::context::FINALIZER.into());
    }
    p
}

pub(crate) fn test_secret(uri: &str) -> Box<Secret> {
    named_secret(SECRET, uri)
}

/// A Secret `name` with key `uri`.
pub(crate) fn named_secret(name: &str, uri: &str) -> Box<Secret> {
    let mut s = Secret::default();
    s.metadata.name = Some(name.into());
    s.metadata.namespace = Some(NS.into());
    s.data = Some([("uri".to_string(), ByteString(uri.as_bytes().to_vec()))].into());
    Box::new(s)
}

/// The condition of `type_` in a status patch body.
pub(crate) fn condition<'a>(status_patch: &'a Value, type_: &str) -> &'a Value {
    status_patch["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
        .unwrap_or_else(|| panic!("no condition {type_} in {status_patch:#}"))
}

/// A complete watch cache holding `objects`, as the operator's are once listed.
pub(crate) fn filled_store<K>(objects: Vec<K>) -> kube::runtime::reflector::Store<K>
where
    K: kube::runtime::reflector::Lookup + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Default,
{
    use kube::runtime::watcher::Event;
    let (store, mut writer) = kube::runtime::reflector::store();
    writer.apply_watcher_event(&Event::Init);
    for o in objects {
        writer.apply_watcher_event(&Event::InitApply(o));
    }
    writer.apply_watcher_event(&Event::InitDone);
    store
}

/// A context reading Secrets and CronJobs from watch caches holding these objects (as
/// `dbpolicy run` does), on a mocked API server that serves batch/v1 CronJobs.
pub(crate) fn test_context_cached(
    secrets: Vec<Secret>,
    cronjobs: Vec<CronJob>,
) -> (Arc<Context>, ApiServerVerifier) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, NS);
    let ctx = Context::new(client, Some("test-instance".into()), Metrics::default())
        .with_jobs(super::context::DEFAULT_JOB_IMAGE, true)
        .with_caches(filled_store(secrets), Some(filled_store(cronjobs)));
    (Arc::new(ctx), ApiServerVerifier(handle))
}
