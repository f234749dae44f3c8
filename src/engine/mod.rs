//! The engine shared by the CLI, the controller and the jobs: observe → plan → apply.
//!
//! Observation and planning happen while holding a per-database advisory lock, so two
//! reconcilers never plan from the same state and apply twice; planning is pure.

pub mod apply;
pub mod areas;
pub(crate) mod clock;
pub mod ddl_notify;
pub(crate) mod ledger;
pub(crate) mod normcache;
pub mod plan;
pub(crate) mod release;
pub(crate) mod replica_health;
pub(crate) mod scratch;
pub(crate) mod server_claims;

use std::time::Duration;

use serde::Serialize;
use sqlx::PgConnection;

use crate::api::{validate_spec, DatabasePolicySpec, Mode, ValidationError};
use crate::duration::pg_millis;
use crate::reason::Reason;
pub(crate) use apply::{ApplyFailure, ApplyReport};
pub(crate) use areas::server_settings::AllowedSettings;
pub use areas::{Facts, Observed};
pub use ledger::Ledger;
pub use plan::{Area, AreaPlan, Change, Hazard, Plan};

/// Key of the advisory lock every dbpolicy run takes on the database it changes
/// (advisory locks are per database, so one key serves all). "dbpolicy" in ASCII.
pub const ADVISORY_LOCK_KEY: i64 = 0x6462_706f_6c69_6379;

/// Who is reconciling: written to the ledger as the owner of what gets created.
#[derive(Debug, Clone)]
pub struct PolicyId(pub String);

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// One line: the first problem stands alone (`kubectl get -o wide`, Event notes).
    #[error("invalid policy: {}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    InvalidSpec(Vec<ValidationError>),
    #[error("invalid policy: {0}")]
    InvalidTimeout(#[from] apply::InvalidTimeout),
    #[error("could not set up the session: {0}")]
    Session(String),
    #[error(
        "another dbpolicy run holds the lock on this database and did not finish within {0:?}"
    )]
    Busy(Duration),
    #[error("observing {area} failed: {message}")]
    Observe {
        area: &'static str,
        message: String,
        reason: Reason,
    },
}

impl EngineError {
    /// The reason for conditions and metrics.
    pub(crate) fn reason(&self) -> Reason {
        match self {
            EngineError::InvalidSpec(_) => Reason::InvalidSpec,
            EngineError::InvalidTimeout(e) => e.reason(),
            EngineError::Session(_) => Reason::ConnectionFailed,
            EngineError::Busy(_) => Reason::ConcurrentApply,
            EngineError::Observe { reason, .. } => *reason,
        }
    }
}

/// Reads what every area of the spec needs: a constant number of queries per area.
pub async fn observe(
    conn: &mut PgConnection,
    spec: &DatabasePolicySpec,
    policy: &PolicyId,
) -> Result<Observed, EngineError> {
    observe_with(conn, None, spec, policy, None).await
}

/// [`observe`], with the replica probes started before the run took its lock, and, given a
/// second connection to the same database, the areas that observe on a connection of their
/// own ([`areas::AreaModule::OWN_CONNECTION`]) read on it while the first reads the ledger
/// and the other areas: the server runs the two lanes' queries in parallel. Both lanes
/// read under the lock the first connection holds.
async fn observe_with(
    conn: &mut PgConnection,
    second: Option<&mut PgConnection>,
    spec: &DatabasePolicySpec,
    policy: &PolicyId,
    mut probes: Option<tokio::task::JoinHandle<areas::Probes>>,
) -> Result<Observed, EngineError> {
    // What the areas of a connection of their own see as the ledger, whether or not they
    // get that connection: nothing (they are observed before the ledger is read).
    let unread = Ledger::for_policy(&policy.0);
    let (ledger, results) = match second {
        None => {
            let ledger = read_ledger(conn, policy).await?;
            let results = lane(conn, spec, &ledger, &unread, &mut probes, |_| true).await;
            (ledger, results)
        }
        Some(second) => {
            let first = async {
                let ledger = read_ledger(conn, policy).await?;
                let results = lane(conn, spec, &ledger, &unread, &mut probes, |a| {
                    !a.own_connection()
                })
                .await;
                Ok::<_, EngineError>((ledger, results))
            };
            // The replica probes are awaited by one area only, in the first lane.
            let mut none = None;
            let (first, mut own) = tokio::join!(
                first,
                lane(second, spec, &unread, &unread, &mut none, |a| a
                    .own_connection()),
            );
            let (ledger, mut results) = first?;
            results.append(&mut own);
            results.sort_by_key(|(i, _)| *i);
            (ledger, results)
        }
    };
    let mut observed = Observed {
        ledger,
        ..Observed::default()
    };
    // The first failure in area order, as when the areas are observed one after another.
    for (_, r) in results {
        if let Some(fill) = r? {
            fill(&mut observed);
        }
    }
    Ok(observed)
}

async fn read_ledger(conn: &mut PgConnection, policy: &PolicyId) -> Result<Ledger, EngineError> {
    ledger::observe(conn, &policy.0)
        .await
        .map_err(|e| EngineError::Observe {
            area: "ledger",
            message: crate::pg::error_summary(&e),
            reason: Reason::of_error(&e, Reason::ApplyFailed),
        })
}

/// What the areas `which` selects observed on `conn`, in area order: (index in `AREAS`,
/// result), stopping at the first error. Areas of a connection of their own get `unread`
/// as their ledger.
async fn lane(
    conn: &mut PgConnection,
    spec: &DatabasePolicySpec,
    ledger: &Ledger,
    unread: &Ledger,
    probes: &mut Option<tokio::task::JoinHandle<areas::Probes>>,
    which: impl Fn(&dyn areas::Registered) -> bool,
) -> Vec<(usize, Result<Option<areas::Fill>, EngineError>)> {
    let mut out = Vec::new();
    for (i, area) in areas::AREAS.iter().enumerate() {
        if !which(*area) {
            continue;
        }
        let ledger = if area.own_connection() {
            unread
        } else {
            ledger
        };
        let r = area.observe(conn, spec, ledger, probes).await;
        let failed = r.is_err();
        out.push((i, r));
        if failed {
            break;
        }
    }
    out
}

/// The plan: pure, from the spec and what was observed, with no denied server setting
/// allowed (see [`plan_with`]).
pub fn plan(spec: &DatabasePolicySpec, observed: &Observed) -> Plan {
    plan_with(spec, observed, &AllowedSettings::default())
}

/// [`plan`], with the server settings the platform team allows (`--allow-setting`).
pub(crate) fn plan_with(
    spec: &DatabasePolicySpec,
    observed: &Observed,
    allowed_settings: &AllowedSettings,
) -> Plan {
    let mut ctx = areas::PlanContext {
        allowed_settings,
        ..areas::PlanContext::new(spec, &observed.ledger)
    };
    let mut plan = Plan {
        areas: areas::AREAS
            .iter()
            .filter_map(|area| area.plan(spec, observed, &mut ctx))
            .collect(),
    };
    refuse_conflicts(&mut plan, &observed.ledger);
    if let Some(claims) = &observed.server_claims {
        let touched = server_claims::touched(spec, &observed.ledger);
        server_claims::refuse(&mut plan, &touched, claims);
    }
    plan.areas.sort_by_key(|a| a.area);
    plan
}

/// Two policies pointing at one database must not fight over the same setting: a change
/// that would take over what another policy owns is an error, reported, never applied.
fn refuse_conflicts(plan: &mut Plan, ledger: &Ledger) {
    for area in &mut plan.areas {
        let mut conflicts = Vec::new();
        for change in &area.changes {
            for op in &change.ledger {
                if let plan::LedgerOp::Record { area, target, item } = op {
                    if let Some(owner) = ledger.owned_by_other(*area, target, item) {
                        conflicts.push((
                            change.target.clone(),
                            format!("{item} on {target} is owned by policy {owner}"),
                        ));
                    }
                }
            }
        }
        for (target, message) in conflicts {
            area.error(target, Reason::OwnershipConflict, message);
        }
    }
}

/// What one run did.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Outcome {
    pub plan: Plan,
    /// None in Plan mode, and when the plan had errors (nothing was applied).
    pub report: Option<ApplyReport>,
    /// What was observed that status reports per area (as observed before applying).
    pub facts: Facts,
    /// The drift event trigger, when `spec.driftDetection.eventTrigger` asks for it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drift_trigger: Option<ddl_notify::TriggerState>,
}

/// The status details of what was observed.
pub fn facts(spec: &DatabasePolicySpec, observed: &Observed) -> Facts {
    let mut facts = Facts::default();
    for area in areas::AREAS {
        area.facts(spec, observed, &mut facts);
    }
    facts
}

/// What a run needs besides the primary's connection.
#[derive(Debug, Clone, Default)]
pub(crate) struct RunOptions {
    /// How to reach the replicas of `spec.replicas`; a replica without a URL is reported
    /// as not checked.
    pub replicas: replica_health::ReplicaTargets,
    /// Server settings denied by default that the platform team allows (operator and CLI
    /// flag `--allow-setting`): never read from the spec.
    pub allowed_settings: AllowedSettings,
    /// Where server-wide items are claimed (see [`server_claims`]); without it every
    /// server setting and slot of the policy is refused (`ServerClaimsUnavailable`).
    pub claims: server_claims::ClaimsTarget,
    /// The URL of the database the run's connection is on, for a second connection that
    /// observes the areas of [`areas::AreaModule::OWN_CONNECTION`] while the first observes
    /// the others, and applies the changes of [`areas::AreaModule::APPLIES_IN_PARALLEL`]
    /// beside the first (the CLI; the operator keeps one connection per database). Opened
    /// while the first takes the lock, or before an apply that has use for it; when it
    /// cannot be opened, the run goes on with one.
    pub second_url: Option<String>,
}

/// Observe, plan and (in Apply mode, when the plan is valid) apply, under the policy lock.
/// Replicas are not checked (no URLs): see [`run_with`].
pub async fn run(
    conn: &mut PgConnection,
    spec: &DatabasePolicySpec,
    mode: Mode,
    policy: &PolicyId,
) -> Result<Outcome, EngineError> {
    run_with(conn, spec, mode, policy, &RunOptions::default()).await
}

/// [`run`] as the CLI runs it: with a second connection to the same database (`url`, the
/// database of `conn`) to observe and apply on beside the first (see
/// `RunOptions::second_url`).
pub async fn run_with_second(
    conn: &mut PgConnection,
    url: &str,
    spec: &DatabasePolicySpec,
    mode: Mode,
    policy: &PolicyId,
) -> Result<Outcome, EngineError> {
    let options = RunOptions {
        second_url: Some(url.to_string()),
        ..RunOptions::default()
    };
    run_with(conn, spec, mode, policy, &options).await
}

/// [`run`], with replica health checked through `options.replicas`.
pub(crate) async fn run_with(
    conn: &mut PgConnection,
    spec: &DatabasePolicySpec,
    mode: Mode,
    policy: &PolicyId,
    options: &RunOptions,
) -> Result<Outcome, EngineError> {
    let errors = validate_spec(spec);
    if !errors.is_empty() {
        return Err(EngineError::InvalidSpec(errors));
    }
    let lock_ms = apply::millis("lockTimeout", spec.lock_timeout())?;
    let timeouts = apply::Timeouts::from_spec(spec)?;
    let statement_ms = timeouts.statement_ms;
    let session = |e: sqlx::Error| EngineError::Session(crate::pg::error_summary(&e));
    // Replicas are checked while this run waits for the lock and observes the primary:
    // each check is bounded, and none needs the lock.
    let probes = spec.replicas.clone().map(|replicas| {
        let targets = options.replicas.clone();
        tokio::spawn(async move { replica_health::probe_all(Some(&replicas), &targets).await })
    });

    // The same session on both connections: timeouts, and the marker that tells the drift
    // trigger the DDL is dbpolicy's own (the second connection's twins are DDL too).
    let session_sql = format!(
        "SET standard_conforming_strings = on; SET statement_timeout = {statement_ms}; SET lock_timeout = {lock_ms}; SET {} = on",
        ddl_notify::APPLYING_GUC
    );
    let second = options
        .second_url
        .clone()
        .filter(|_| {
            areas::AREAS
                .iter()
                .any(|a| a.own_connection() && a.in_spec(spec))
        })
        .map(|url| tokio::spawn(second_connection(url, session_sql.clone())));
    sqlx::Executor::execute(&mut *conn, session_sql.as_str())
        .await
        .map_err(session)?;
    let wait = lock_wait(spec);
    acquire_lock(conn, wait).await?;
    let mut second = match second {
        Some(task) => task.await.ok().flatten(),
        None => None,
    };
    let mut claims_conn = None;
    let result = async {
        let observed = observe_with(conn, second.as_mut(), spec, policy, probes).await;
        let mut observed = observed?;
        let touched = server_claims::touched(spec, &observed.ledger);
        if !touched.is_empty() {
            let (claims, connection) =
                observe_claims(conn, &options.claims, policy, &touched, statement_ms).await?;
            observed.server_claims = Some(claims);
            claims_conn = connection;
        }
        let plan = plan_with(spec, &observed, &options.allowed_settings);
        let facts = facts(spec, &observed);
        let report = if mode == Mode::Apply && !plan.has_errors() {
            // Server-wide items are claimed before anything changes: a run on another
            // database that planned at the same time loses here, not after ALTER SYSTEM.
            let taken = match (&observed.server_claims, claims_conn.as_mut()) {
                (Some(claims), Some(c)) => {
                    let items = server_claims::to_take(&touched, claims);
                    server_claims::take(c, &claims.me, &items)
                        .await
                        .map_err(|e| (e, claims.claims_database.clone()))
                }
                _ => Ok(()),
            };
            let mut report = match taken {
                Ok(()) => {
                    if apply::uses_second_connection(&plan, spec.allow_destructive())
                        && second.is_none()
                    {
                        if let Some(url) = &options.second_url {
                            second = second_connection(url.clone(), session_sql.clone()).await;
                        }
                    }
                    apply::execute_with(
                        conn,
                        second.as_mut(),
                        &plan,
                        spec.allow_destructive(),
                        &policy.0,
                        &timeouts,
                    )
                    .await
                }
                Err((e, database)) => claims_not_taken(&plan, &e, &database),
            };
            for area in areas::AREAS {
                area.after_apply(conn, &observed, &mut report, &policy.0)
                    .await;
            }
            if let (Some(claims), Some(c)) = (&observed.server_claims, claims_conn.as_mut()) {
                server_claims::settle(c, spec, &observed.ledger, claims, &report.applied).await;
            }
            Some(report)
        } else {
            None
        };
        // After the apply: its own DDL is not drift, and a failure here fails nothing.
        let drift_trigger = ddl_notify::sync(
            conn,
            spec,
            mode,
            &policy.0,
            observed.ledger.drift_subscribers(),
            statement_ms,
        )
        .await;
        Ok(Outcome {
            plan,
            report,
            facts,
            drift_trigger,
        })
    }
    .await;
    if let Some(c) = claims_conn {
        let _ = sqlx::Connection::close(c).await;
    }
    if let Some(c) = second {
        // Closed off the run's path.
        tokio::spawn(sqlx::Connection::close(c));
    }
    // A broken connection releases the lock by itself; otherwise release it now.
    let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(ADVISORY_LOCK_KEY)
        .execute(&mut *conn)
        .await;
    result
}

/// The run's second connection, with the first's session settings; None when it cannot be
/// had (too many connections, say): the run then observes on one.
async fn second_connection(url: String, session_sql: String) -> Option<PgConnection> {
    let mut conn = match crate::pg::connect_one(&url).await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = %e, "no second connection; the run goes on with one");
            return None;
        }
    };
    match sqlx::Executor::execute(&mut conn, session_sql.as_str()).await {
        Ok(_) => Some(conn),
        Err(e) => {
            tracing::debug!(error = %crate::pg::error_summary(&e), "no second connection; the run goes on with one");
            None
        }
    }
}

/// Reads who claims the server-wide items `touched`, on a connection of its own to the
/// claims database (kept for the run's claim writes). A claims database that cannot be
/// reached is observed as unavailable: the plan refuses every server-wide item.
async fn observe_claims(
    conn: &mut PgConnection,
    target: &server_claims::ClaimsTarget,
    policy: &PolicyId,
    touched: &server_claims::Touched,
    statement_ms: u64,
) -> Result<(server_claims::Observed, Option<PgConnection>), EngineError> {
    let database: String = sqlx::query_scalar("SELECT current_database()::text")
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| EngineError::Observe {
            area: "serverClaims",
            message: crate::pg::error_summary(&e),
            reason: Reason::of_error(&e, Reason::ApplyFailed),
        })?;
    let me = server_claims::Claimant {
        database,
        policy: policy.0.clone(),
    };
    let mut connection = server_claims::connect(target, statement_ms).await;
    let observed = server_claims::observe(
        connection.as_mut().map_err(|e| e.clone()),
        target,
        me,
        touched,
    )
    .await;
    Ok((observed, connection.ok()))
}

/// The report of an apply that stopped before its first change: its server-wide claims
/// could not be taken.
fn claims_not_taken(
    plan: &Plan,
    error: &server_claims::TakeError,
    claims_database: &str,
) -> ApplyReport {
    let first = plan.changes().next();
    let (area, target) = match (error, first) {
        (server_claims::TakeError::Conflict(lost), _) if !lost.is_empty() => {
            let ((kind, name), _) = &lost[0];
            (kind.area(), name.clone())
        }
        (_, Some(c)) => (c.area, c.target.clone()),
        _ => (Area::ServerSettings, "server".to_string()),
    };
    ApplyReport {
        not_attempted: plan.changes().cloned().collect(),
        failure: Some(ApplyFailure {
            area,
            target,
            statement: format!("(claims in {})", server_claims::CLAIMS_TABLE),
            reason: error.reason(),
            sqlstate: None,
            message: error.message(claims_database),
        }),
        ..Default::default()
    }
}

/// How long a run waits for another run on its database: as long as one statement may
/// take, not the lock_timeout meant for production tables. (An invalid timeout fails the
/// run before it waits: see `run_with`.)
pub(crate) fn lock_wait(spec: &DatabasePolicySpec) -> Duration {
    let ms = |s: &str| pg_millis(s).unwrap_or(0);
    Duration::from_millis(ms(spec.statement_timeout()).max(ms(spec.lock_timeout())))
}

/// Takes the per-database advisory lock, waiting at most `wait` for another run to finish.
///
/// The wait is a poll of `pg_try_advisory_lock` in short statements, never a blocking
/// `pg_advisory_lock()`: a statement waiting for the lock holds a snapshot, and the
/// `CREATE INDEX CONCURRENTLY` of the run holding the lock waits for every older snapshot
/// to go away — a deadlock (40P01). Between two polls this session holds no snapshot.
pub(crate) async fn acquire_lock(
    conn: &mut PgConnection,
    wait: Duration,
) -> Result<(), EngineError> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut pause = Duration::from_millis(20);
    loop {
        let taken: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(ADVISORY_LOCK_KEY)
            .fetch_one(&mut *conn)
            .await
            .map_err(|e| EngineError::Session(crate::pg::error_summary(&e)))?;
        if taken {
            return Ok(());
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Err(EngineError::Busy(wait));
        }
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = lock_backoff(pause);
    }
}

/// The next pause between two polls for the lock: doubling from 20 ms, at most 500 ms, so
/// a short run is noticed quickly and a long one costs a few statements a second.
fn lock_backoff(pause: Duration) -> Duration {
    (pause * 2).min(Duration::from_millis(500))
}

/// The controller awaits the engine on its own runtime: the engine's future must be `Send`
/// (checked at compile time).
#[cfg(test)]
#[allow(dead_code)]
fn engine_future_is_send(conn: &mut PgConnection, spec: &DatabasePolicySpec, id: &PolicyId) {
    fn is_send<T: Send>(_: T) {}
    is_send(run(conn, spec, Mode::Plan, id));
}
