//! Pure builders of `DatabasePolicyStatus` from what a reconcile found: conditions, the bounded pending plan, observedGeneration; `lastTransitionTime` moves only on a transition.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::api::{
    BackupStatus, DatabasePolicySpec, DatabasePolicyStatus, Mode, ReplicaStatus,
    ServerSettingsStatus,
};
use crate::engine::{Area, AreaPlan, Change, Outcome, Plan};
use crate::reason::Reason;

pub(crate) const READY: &str = "Ready";
pub(crate) const DRIFTED: &str = "Drifted";

/// Condition messages are capped well below the API's 32 KiB: they are for people.
const MAX_MESSAGE: usize = 1024;

/// What every builder needs besides the finding itself.
#[derive(Debug, Clone)]
pub(crate) struct Input<'a> {
    pub spec: &'a DatabasePolicySpec,
    pub generation: Option<i64>,
    pub previous: Option<&'a DatabasePolicyStatus>,
    /// The clock, read once per reconcile; it only lands in status on a transition.
    pub now: Time,
    /// `spec.driftCheckInterval`: how long a repaired drift stays reported.
    pub drift_interval: Duration,
}

/// The areas present in the spec, in apply order (the registry's, see
/// `engine::areas`).
pub(crate) fn spec_areas(spec: &DatabasePolicySpec) -> Vec<Area> {
    Area::ALL.into_iter().filter(|a| a.in_spec(spec)).collect()
}

/// The condition's three states, as the API spells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    True,
    False,
    Unknown,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::True => "True",
            Status::False => "False",
            Status::Unknown => "Unknown",
        }
    }
}

/// Builds a condition, keeping the previous `lastTransitionTime` unless the status changed.
pub(crate) fn condition(
    input: &Input<'_>,
    type_: &str,
    status: Status,
    reason: Reason,
    message: &str,
) -> Condition {
    let status = status.as_str();
    let last_transition_time = previous_condition(input.previous, type_)
        .filter(|c| c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| input.now.clone());
    Condition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: reason.as_str().to_string(),
        message: bounded(message),
        observed_generation: input.generation,
        last_transition_time,
    }
}

fn previous_condition<'a>(
    previous: Option<&'a DatabasePolicyStatus>,
    type_: &str,
) -> Option<&'a Condition> {
    previous?.conditions.iter().find(|c| c.type_ == type_)
}

fn bounded(message: &str) -> String {
    if message.len() <= MAX_MESSAGE {
        return message.to_string();
    }
    let mut end = MAX_MESSAGE;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &message[..end])
}

/// `spec.suspend: true`: `Ready=False/Suspended`, and every area and `Drifted` Unknown
/// with reason `Suspended` (they are not being checked; a stale True would say otherwise).
/// The details last seen (`status.replicas`, `status.backups`, …) are kept as they were.
pub(crate) fn suspended(input: &Input<'_>) -> DatabasePolicyStatus {
    let mut status = input.previous.cloned().unwrap_or_default();
    const NOT_CHECKED: &str = "not checked: spec.suspend is true";
    let mut conditions = vec![condition(
        input,
        READY,
        Status::False,
        Reason::Suspended,
        "spec.suspend is true: the database is neither observed nor changed",
    )];
    for area in spec_areas(input.spec) {
        conditions.push(condition(
            input,
            area.condition_type(),
            Status::Unknown,
            Reason::Suspended,
            NOT_CHECKED,
        ));
    }
    conditions.push(condition(
        input,
        DRIFTED,
        Status::Unknown,
        Reason::Suspended,
        NOT_CHECKED,
    ));
    status.conditions = conditions;
    status.observed_generation = input.generation;
    status.mode = Some(input.spec.effective_mode());
    status
}

/// A failure before or while observing the database (Secret, connection, engine): the
/// areas and drift are Unknown, the pending plan of the last check is kept.
#[cfg(test)]
pub(crate) fn from_error(input: &Input<'_>, reason: Reason, message: &str) -> DatabasePolicyStatus {
    from_error_with(input, reason, message, &Children::default())
}

/// [`from_error`], with what was found outside the database (backups) kept as found:
/// only the areas the engine decides become Unknown.
pub(crate) fn from_error_with(
    input: &Input<'_>,
    reason: Reason,
    message: &str,
    children: &Children,
) -> DatabasePolicyStatus {
    let mut status = input.previous.cloned().unwrap_or_default();
    let mut conditions = vec![condition(input, READY, Status::False, reason, message)];
    for area in spec_areas(input.spec) {
        let found = children
            .areas
            .iter()
            .find(|a| a.area == area && area == Area::Backups);
        conditions.push(match found {
            Some(a) => condition(input, area.condition_type(), a.status, a.reason, &a.message),
            None => condition(
                input,
                area.condition_type(),
                Status::Unknown,
                reason,
                "not checked: the database could not be observed (see Ready)",
            ),
        });
    }
    if children.backups.is_some() {
        status.backups = children.backups.clone();
    }
    if input.spec.backups.is_none() {
        status.backups = None;
    }
    conditions.push(condition(
        input,
        DRIFTED,
        Status::Unknown,
        reason,
        "not checked: the database could not be observed (see Ready)",
    ));
    status.conditions = conditions;
    status.observed_generation = input.generation;
    status.mode = Some(input.spec.effective_mode());
    status
}

/// The state of one area after a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AreaState {
    pub area: Area,
    pub status: Status,
    pub reason: Reason,
    pub message: String,
}

impl AreaState {
    pub(crate) fn new(area: Area, status: Status, reason: Reason, message: String) -> AreaState {
        AreaState {
            area,
            status,
            reason,
            message,
        }
    }

    /// The area fails with a step's error: its reason, its message.
    pub(crate) fn failed(area: Area, e: &crate::controller::error::Error) -> AreaState {
        AreaState::new(area, Status::False, e.reason(), e.to_string())
    }
}

/// What the controller found outside the engine's run: replica health, backups, the
/// CronJobs and the read-endpoint Secret.
#[derive(Debug, Clone, Default)]
pub(crate) struct Children {
    /// Area states decided outside the engine (replica health, backups, CronJobs): each
    /// replaces the engine's state of its area, unless that one is a worse failure.
    pub areas: Vec<AreaState>,
    /// Changes to child objects not carried out (Plan mode).
    pub pending: Vec<Change>,
    /// `status.replicas` (None: keep the previous one).
    pub replicas: Option<Vec<ReplicaStatus>>,
    /// `status.backups` (None: keep the previous one, unless the spec has no backups).
    pub backups: Option<BackupStatus>,
}

/// Puts `overrides` over `states`: an override wins unless the area already fails worse.
fn overlay(states: &mut Vec<AreaState>, overrides: &[AreaState]) {
    for o in overrides {
        match states.iter_mut().find(|s| s.area == o.area) {
            Some(s) if s.status != Status::False || severity(o) > severity(s) => *s = o.clone(),
            Some(_) => {}
            None => states.push(o.clone()),
        }
    }
    states.sort_by_key(|s| s.area);
}

/// How bad a failing area is, to pick the one `Ready` shows ([`Reason::severity`]).
fn severity(s: &AreaState) -> u8 {
    match s.status {
        Status::True | Status::Unknown => 0,
        Status::False => s.reason.severity(),
    }
}

fn count_by_area<'a>(changes: impl Iterator<Item = &'a Change>) -> BTreeMap<Area, usize> {
    let mut m = BTreeMap::new();
    for c in changes {
        *m.entry(c.area).or_insert(0) += 1;
    }
    m
}

/// `autovacuum 2, serverSettings 1`
pub(crate) fn counts_note(counts: &BTreeMap<Area, usize>) -> String {
    counts
        .iter()
        .map(|(a, n)| format!("{a} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn area_state(area: Area, plan: Option<&AreaPlan>, outcome: &Outcome, mode: Mode) -> AreaState {
    let state = |status, reason: Reason, message: String| AreaState {
        area,
        status,
        reason,
        message,
    };
    let Some(ap) = plan else {
        return state(
            Status::Unknown,
            Reason::NotReconciled,
            format!("{area} was not planned"),
        );
    };
    if let Some(why) = &ap.skipped {
        return state(Status::Unknown, Reason::NotReconciled, why.clone());
    }
    if let Some(first) = ap.errors.first() {
        let all = ap
            .errors
            .iter()
            .map(|e| format!("{}: {}", e.target, e.message))
            .collect::<Vec<_>>()
            .join("; ");
        return state(Status::False, first.reason, all);
    }
    let report = outcome.report.as_ref();
    if let Some(f) = report.and_then(|r| r.failure.as_ref()) {
        if f.area == area {
            return state(
                Status::False,
                f.reason,
                format!("{}: {}", f.target, f.message),
            );
        }
    }
    if let Some(r) = report {
        if r.not_attempted.iter().any(|c| c.area == area) {
            let failed = r.failure.as_ref().map(|f| f.area.as_str()).unwrap_or("?");
            return state(
                Status::False,
                Reason::NotAttempted,
                format!("not attempted: an earlier change in {failed} failed"),
            );
        }
    }
    let mut restart: Vec<&str> = report
        .map(|r| {
            r.applied
                .iter()
                .filter(|c| c.area == area && c.requires_restart)
                .map(|c| c.target.as_str())
                .collect()
        })
        .unwrap_or_default();
    restart.extend(
        ap.notices
            .iter()
            .filter(|n| n.reason == Reason::RestartRequired)
            .map(|n| n.target.as_str()),
    );
    restart.sort();
    restart.dedup();
    if !restart.is_empty() {
        return state(
            Status::False,
            Reason::RestartRequired,
            format!(
                "set, but only in effect after a PostgreSQL restart: {}",
                restart.join(", ")
            ),
        );
    }
    if let Some(n) = ap
        .notices
        .iter()
        .find(|n| n.reason == Reason::SettingNotApplied)
    {
        return state(Status::False, n.reason, n.message.clone());
    }
    if let Some(r) = report {
        let refused: Vec<&Change> = r.refused.iter().filter(|c| c.area == area).collect();
        if !refused.is_empty() {
            return state(
                Status::False,
                Reason::DestructiveChangesRefused,
                format!(
                    "{} destructive change(s) refused ({}); set spec.safety.allowDestructive: true to allow them",
                    refused.len(),
                    refused
                        .iter()
                        .map(|c| c.target.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
        }
    }
    if mode == Mode::Plan && !ap.changes.is_empty() {
        return state(
            Status::False,
            Reason::PlanPending,
            format!(
                "{} change(s) pending (spec.mode is Plan; see status.pendingPlan)",
                ap.changes.len()
            ),
        );
    }
    state(
        Status::True,
        Reason::Reconciled,
        "the database matches the policy".into(),
    )
}

/// Every change found and not carried out: the engine's (see [`pending_changes`]) and the
/// child objects' (Plan mode). What `pendingChanges` counts.
pub(crate) fn pending(outcome: &Outcome, mode: Mode, children: &Children) -> Vec<Change> {
    let mut pending = pending_changes(outcome, mode);
    pending.extend(children.pending.iter().cloned());
    pending
}

fn pending_changes(outcome: &Outcome, mode: Mode) -> Vec<Change> {
    match (&outcome.report, mode) {
        (Some(r), Mode::Apply) => r
            .refused
            .iter()
            .chain(r.not_attempted.iter())
            .cloned()
            .collect(),
        _ => outcome.plan.changes().cloned().collect(),
    }
}

/// Areas in which the live database differed from a policy it had already converged to
/// (the last check of this generation found it Ready, or had already found drift).
/// Differences right after a spec change (or after a failed run) are not drift, in Plan
/// mode too: there a spec edit is pending, not drift.
pub(crate) fn drifted_areas(input: &Input<'_>, outcome: &Outcome, _mode: Mode) -> Vec<Area> {
    let converged = input.previous.is_some_and(|p| {
        p.observed_generation == input.generation
            && (previous_condition(Some(p), READY).is_some_and(|c| c.status == "True")
                || previous_condition(Some(p), DRIFTED)
                    .is_some_and(|c| c.status == "True" && Reason::DriftDetected == *c.reason))
    });
    if !converged {
        return Vec::new();
    }
    count_by_area(outcome.plan.changes()).into_keys().collect()
}

fn drifted_condition(input: &Input<'_>, outcome: &Outcome, mode: Mode) -> Condition {
    let drifted = drifted_areas(input, outcome, mode);
    if !drifted.is_empty() {
        let counts = count_by_area(outcome.plan.changes().filter(|c| drifted.contains(&c.area)));
        let all_applied = mode == Mode::Apply
            && outcome
                .report
                .as_ref()
                .is_some_and(|r| r.succeeded() && r.refused.is_empty());
        let (reason, what) = if all_applied {
            (Reason::DriftRepaired, "repaired")
        } else {
            (Reason::DriftDetected, "not repaired")
        };
        return condition(
            input,
            DRIFTED,
            Status::True,
            reason,
            &format!(
                "the database differed from the policy ({}); {what}",
                counts_note(&counts)
            ),
        );
    }
    if !outcome.plan.is_empty() && mode == Mode::Plan {
        return condition(
            input,
            DRIFTED,
            Status::False,
            Reason::ChangesPending,
            "the policy asks for changes not yet made (spec.mode is Plan; see status.pendingPlan): pending, not drift",
        );
    }
    if !outcome.plan.is_empty() {
        return condition(
            input,
            DRIFTED,
            Status::False,
            Reason::Converging,
            "the database is being brought to this generation of the policy",
        );
    }
    // A repaired drift stays visible for one drift-check interval: a check woken sooner
    // (a Secret change, the reconcile-at annotation) would otherwise erase it.
    if let Some(prev) = previous_condition(input.previous, DRIFTED) {
        if prev.status == "True" && Reason::DriftRepaired == *prev.reason {
            let since = input.now.0.duration_since(prev.last_transition_time.0);
            let interval = k8s_openapi::jiff::SignedDuration::try_from(input.drift_interval)
                .unwrap_or(k8s_openapi::jiff::SignedDuration::MAX);
            if since < interval {
                return prev.clone();
            }
        }
    }
    condition(
        input,
        DRIFTED,
        Status::False,
        Reason::InSync,
        "the database matched the policy at the last check",
    )
}

/// The status after the engine ran: `Ready`, one condition per area of the spec, `Drifted`,
/// the pending plan.
#[cfg(test)]
pub(crate) fn from_outcome(input: &Input<'_>, outcome: &Outcome) -> DatabasePolicyStatus {
    from_outcome_with(input, outcome, &Children::default())
}

/// [`from_outcome`], with the areas and pending changes found outside the engine.
pub(crate) fn from_outcome_with(
    input: &Input<'_>,
    outcome: &Outcome,
    children: &Children,
) -> DatabasePolicyStatus {
    let mode = input.spec.effective_mode();
    let in_spec = spec_areas(input.spec);
    // Areas removed from the spec still count while the engine resets what they set.
    let mut areas = in_spec.clone();
    areas.extend(outcome.plan.areas.iter().map(|a| a.area));
    areas.sort();
    areas.dedup();
    let mut states: Vec<AreaState> = areas
        .iter()
        .map(|a| area_state(*a, outcome.plan.area(*a), outcome, mode))
        .collect();
    overlay(&mut states, &children.areas);

    let failing: Vec<&AreaState> = states
        .iter()
        .filter(|s| s.status == Status::False)
        .collect();
    let ready = match failing
        .iter()
        .max_by_key(|s| (severity(s), std::cmp::Reverse(s.area)))
    {
        Some(worst) => {
            let more = failing.len() - 1;
            let message = if more == 0 {
                format!("{}: {}", worst.area, worst.message)
            } else {
                format!(
                    "{}: {} (and {more} more area(s) not ready)",
                    worst.area, worst.message
                )
            };
            condition(input, READY, Status::False, worst.reason, &message)
        }
        None => {
            let skipped: Vec<String> = states
                .iter()
                .filter(|s| s.status == Status::Unknown)
                .map(|s| format!("{} ({})", s.area, s.reason))
                .collect();
            let message = if skipped.is_empty() {
                "the database matches the policy".to_string()
            } else {
                format!(
                    "the database matches the policy; not checked: {}",
                    skipped.join(", ")
                )
            };
            condition(input, READY, Status::True, Reason::Reconciled, &message)
        }
    };

    let mut conditions = vec![ready];
    for s in states.iter().filter(|s| in_spec.contains(&s.area)) {
        conditions.push(condition(
            input,
            s.area.condition_type(),
            s.status,
            s.reason,
            &s.message,
        ));
    }
    conditions.push(drifted_condition(input, outcome, mode));

    let pending = pending(outcome, mode, children);
    let pending_plan = (!pending.is_empty()).then(|| {
        let mut plan = Plan::default();
        for c in &pending {
            match plan.areas.iter_mut().find(|a| a.area == c.area) {
                Some(a) => a.changes.push(c.clone()),
                None => {
                    let mut a = AreaPlan::new(c.area);
                    a.changes.push(c.clone());
                    plan.areas.push(a);
                }
            }
        }
        plan.summary()
    });

    let server_settings = input.spec.server_settings.as_ref().map(|_| {
        let mut restart_required: Vec<String> = outcome
            .report
            .iter()
            .flat_map(|r| r.restart_required())
            .map(str::to_string)
            .chain(
                outcome
                    .plan
                    .notices()
                    .filter(|n| {
                        n.area == Area::ServerSettings && n.reason == Reason::RestartRequired
                    })
                    .map(|n| n.target.clone()),
            )
            .collect();
        restart_required.sort();
        restart_required.dedup();
        ServerSettingsStatus { restart_required }
    });

    // Replica health and backups come from the controller; kept when it found nothing new.
    let previous = input.previous.cloned().unwrap_or_default();
    let replicas = match (&input.spec.replicas, &children.replicas) {
        (None, _) => None,
        (Some(_), Some(r)) => Some(r.clone()),
        (Some(_), None) => previous.replicas,
    };
    let backups = match (&input.spec.backups, &children.backups) {
        (None, _) => None,
        (Some(_), Some(b)) => Some(b.clone()),
        (Some(_), None) => previous.backups,
    };
    DatabasePolicyStatus {
        observed_generation: input.generation,
        mode: Some(mode),
        conditions,
        pending_changes: Some(pending.len() as u32),
        pending_plan,
        server_settings,
        partitions: outcome.facts.partitions.clone(),
        materialized_views: outcome.facts.materialized_views.clone(),
        replicas,
        backups,
    }
}

/// Applied changes per area, for the `Applied` event and the metrics.
pub(crate) fn applied_by_area(outcome: &Outcome) -> BTreeMap<Area, usize> {
    count_by_area(outcome.report.iter().flat_map(|r| r.applied.iter()))
}

/// Whether `new` says nothing `previous` (as the API server returned it) does not:
/// compared as JSON, the form both take on the wire, so that a field the server dropped
/// or defaulted (empty lists, `None`) is not a difference.
pub(crate) fn unchanged(
    previous: Option<&DatabasePolicyStatus>,
    new: &DatabasePolicyStatus,
) -> bool {
    let Some(previous) = previous else {
        return false;
    };
    match (serde_json::to_value(previous), serde_json::to_value(new)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{FeatureFlagsSpec, ServerSettingsSpec};
    use crate::engine::{ApplyFailure, ApplyReport, Hazard};
    use k8s_openapi::jiff::Timestamp;

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(1_700_000_000 + secs).unwrap())
    }

    fn spec() -> DatabasePolicySpec {
        DatabasePolicySpec {
            server_settings: Some(ServerSettingsSpec::default()),
            feature_flags: Some(FeatureFlagsSpec::default()),
            ..Default::default()
        }
    }

    fn input<'a>(
        spec: &'a DatabasePolicySpec,
        previous: Option<&'a DatabasePolicyStatus>,
        now: Time,
    ) -> Input<'a> {
        Input {
            spec,
            generation: Some(1),
            previous,
            now,
            drift_interval: Duration::from_secs(300),
        }
    }

    fn change(area: Area, target: &str) -> Change {
        Change::new(area, target, format!("set {target}"), "SELECT 1")
    }

    fn plan(changes: Vec<Change>) -> Plan {
        let mut p = Plan::default();
        for area in [Area::ServerSettings, Area::FeatureFlags] {
            let mut a = AreaPlan::new(area);
            a.changes = changes.iter().filter(|c| c.area == area).cloned().collect();
            p.areas.push(a);
        }
        p
    }

    fn applied(changes: Vec<Change>) -> Outcome {
        Outcome {
            facts: Default::default(),
            drift_trigger: None,
            plan: plan(changes.clone()),
            report: Some(ApplyReport {
                applied: changes,
                ..Default::default()
            }),
        }
    }

    fn cond<'a>(s: &'a DatabasePolicyStatus, t: &str) -> &'a Condition {
        s.conditions
            .iter()
            .find(|c| c.type_ == t)
            .unwrap_or_else(|| panic!("no condition {t}: {:?}", s.conditions))
    }

    #[test]
    fn areas_follow_the_spec() {
        assert_eq!(
            spec_areas(&spec()),
            vec![Area::ServerSettings, Area::FeatureFlags]
        );
        assert!(spec_areas(&DatabasePolicySpec::default()).is_empty());
    }

    #[test]
    fn applied_run_is_ready_with_one_condition_per_area() {
        let spec = spec();
        let outcome = applied(vec![change(Area::FeatureFlags, "f")]);
        let s = from_outcome(&input(&spec, None, at(0)), &outcome);
        let types: Vec<&str> = s.conditions.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(
            types,
            [
                "Ready",
                "ServerSettingsReady",
                "FeatureFlagsReady",
                "Drifted"
            ]
        );
        let ready = cond(&s, READY);
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("True", "Reconciled")
        );
        assert_eq!(ready.observed_generation, Some(1));
        // The first application is the spec arriving, not drift.
        assert_eq!(cond(&s, DRIFTED).status, "False");
        assert_eq!(cond(&s, DRIFTED).reason, "Converging");
        assert_eq!(s.pending_changes, Some(0));
        assert_eq!(s.pending_plan, None);
        assert_eq!(s.observed_generation, Some(1));
        assert_eq!(s.mode, Some(Mode::Apply));
        assert_eq!(s.server_settings, Some(ServerSettingsStatus::default()));
    }

    #[test]
    fn transition_time_moves_only_on_a_transition() {
        let spec = spec();
        let first = from_outcome(&input(&spec, None, at(0)), &applied(vec![]));
        let second = from_outcome(&input(&spec, Some(&first), at(60)), &applied(vec![]));
        assert_eq!(first, second, "a steady state writes the same status");
        let failed = from_error(
            &input(&spec, Some(&second), at(120)),
            Reason::ConnectionFailed,
            "x",
        );
        assert_eq!(cond(&failed, READY).last_transition_time, at(120));
        assert_eq!(cond(&failed, READY).reason, "ConnectionFailed");
        assert_eq!(cond(&failed, "FeatureFlagsReady").status, "Unknown");
        let again = from_error(
            &input(&spec, Some(&failed), at(180)),
            Reason::ConnectionFailed,
            "y",
        );
        assert_eq!(cond(&again, READY).last_transition_time, at(120));
        assert_eq!(cond(&again, READY).message, "y");
    }

    #[test]
    fn plan_mode_reports_pending_changes() {
        let mut spec = spec();
        spec.mode = Some(Mode::Plan);
        let outcome = Outcome {
            facts: Default::default(),
            drift_trigger: None,
            plan: plan(vec![
                change(Area::FeatureFlags, "a"),
                change(Area::FeatureFlags, "b").hazard(Hazard::Destructive),
            ]),
            report: None,
        };
        let s = from_outcome(&input(&spec, None, at(0)), &outcome);
        assert_eq!(cond(&s, READY).reason, "PlanPending");
        assert_eq!(cond(&s, READY).status, "False");
        assert_eq!(cond(&s, "FeatureFlagsReady").reason, "PlanPending");
        assert_eq!(cond(&s, "ServerSettingsReady").status, "True");
        // A spec the database does not match yet is pending in Plan mode, not drift.
        assert_eq!(
            (
                cond(&s, DRIFTED).status.as_str(),
                cond(&s, DRIFTED).reason.as_str()
            ),
            ("False", "ChangesPending")
        );
        assert!(drifted_areas(&input(&spec, None, at(0)), &outcome, Mode::Plan).is_empty());
        // The same pending changes at the next check are still not drift…
        let again = from_outcome(&input(&spec, Some(&s), at(60)), &outcome);
        assert_eq!(cond(&again, DRIFTED).reason, "ChangesPending");
        // …but a database that matched this generation and then changed has drifted, and
        // stays so reported until it matches again.
        let clean = Outcome {
            facts: Default::default(),
            drift_trigger: None,
            plan: plan(vec![]),
            report: None,
        };
        let matched = from_outcome(&input(&spec, Some(&again), at(120)), &clean);
        assert_eq!(cond(&matched, READY).status, "True");
        let drifted = from_outcome(&input(&spec, Some(&matched), at(180)), &outcome);
        assert_eq!(cond(&drifted, DRIFTED).reason, "DriftDetected");
        let still = from_outcome(&input(&spec, Some(&drifted), at(240)), &outcome);
        assert_eq!(cond(&still, DRIFTED).reason, "DriftDetected");
        assert_eq!(s.pending_changes, Some(2));
        let p = s.pending_plan.unwrap();
        assert_eq!((p.total, p.destructive), (2, 1));
        assert_eq!(p.by_area["featureFlags"], 2);
        assert_eq!(s.mode, Some(Mode::Plan));
    }

    #[test]
    fn refused_destructive_changes_are_pending_and_named() {
        let spec = spec();
        let drop = change(Area::FeatureFlags, "old").hazard(Hazard::Destructive);
        let outcome = Outcome {
            facts: Default::default(),
            drift_trigger: None,
            plan: plan(vec![drop.clone()]),
            report: Some(ApplyReport {
                refused: vec![drop],
                ..Default::default()
            }),
        };
        let s = from_outcome(&input(&spec, None, at(0)), &outcome);
        assert_eq!(cond(&s, READY).reason, "DestructiveChangesRefused");
        assert!(cond(&s, READY).message.contains("allowDestructive"));
        assert_eq!(s.pending_changes, Some(1));
        assert_eq!(s.pending_plan.unwrap().destructive, 1);
    }

    #[test]
    fn plan_errors_and_apply_failures_name_their_reason() {
        let spec = spec();
        let mut p = plan(vec![]);
        p.areas[0].error("work_mem", Reason::InvalidValue, "invalid value");
        let s = from_outcome(
            &input(&spec, None, at(0)),
            &Outcome {
                facts: Default::default(),
                drift_trigger: None,
                plan: p,
                report: None,
            },
        );
        assert_eq!(cond(&s, READY).reason, "InvalidValue");
        assert_eq!(cond(&s, "ServerSettingsReady").reason, "InvalidValue");
        assert_eq!(cond(&s, "FeatureFlagsReady").status, "True");

        let (a, b) = (
            change(Area::ServerSettings, "work_mem"),
            change(Area::FeatureFlags, "f"),
        );
        let outcome = Outcome {
            facts: Default::default(),
            drift_trigger: None,
            plan: plan(vec![a.clone(), b.clone()]),
            report: Some(ApplyReport {
                failure: Some(ApplyFailure {
                    area: Area::ServerSettings,
                    target: "work_mem".into(),
                    statement: "ALTER SYSTEM …".into(),
                    reason: Reason::LockTimeout,
                    sqlstate: Some("55P03".into()),
                    message: "canceling statement due to lock timeout".into(),
                }),
                not_attempted: vec![a, b],
                ..Default::default()
            }),
        };
        let s = from_outcome(&input(&spec, None, at(0)), &outcome);
        assert_eq!(cond(&s, READY).reason, "LockTimeout");
        assert_eq!(cond(&s, "FeatureFlagsReady").reason, "NotAttempted");
        assert_eq!(s.pending_changes, Some(2));
    }

    #[test]
    fn restart_required_is_reported_not_hidden() {
        let spec = spec();
        let c = change(Area::ServerSettings, "shared_buffers").restart(true);
        let s = from_outcome(&input(&spec, None, at(0)), &applied(vec![c]));
        assert_eq!(cond(&s, READY).reason, "RestartRequired");
        assert_eq!(cond(&s, "ServerSettingsReady").reason, "RestartRequired");
        assert_eq!(
            s.server_settings.unwrap().restart_required,
            vec!["shared_buffers".to_string()]
        );
    }

    #[test]
    fn skipped_areas_do_not_block_ready_but_are_said() {
        let spec = DatabasePolicySpec {
            partitions: Some(Default::default()),
            ..Default::default()
        };
        let outcome = Outcome {
            facts: Default::default(),
            drift_trigger: None,
            plan: Plan {
                areas: vec![AreaPlan::skipped(Area::Partitions, "not yet")],
            },
            report: Some(ApplyReport::default()),
        };
        let s = from_outcome(&input(&spec, None, at(0)), &outcome);
        assert_eq!(cond(&s, READY).status, "True");
        assert!(cond(&s, READY).message.contains("partitions"));
        assert_eq!(cond(&s, "PartitionsReady").status, "Unknown");
        assert_eq!(cond(&s, "PartitionsReady").reason, "NotReconciled");
    }

    #[test]
    fn drift_after_convergence_is_reported_and_kept_for_an_interval() {
        let spec = spec();
        let converged = from_outcome(&input(&spec, None, at(0)), &applied(vec![]));
        let repaired = from_outcome(
            &input(&spec, Some(&converged), at(300)),
            &applied(vec![change(Area::FeatureFlags, "f")]),
        );
        let d = cond(&repaired, DRIFTED);
        assert_eq!(
            (d.status.as_str(), d.reason.as_str()),
            ("True", "DriftRepaired")
        );
        assert!(d.message.contains("featureFlags 1"), "{}", d.message);
        assert_eq!(d.last_transition_time, at(300));
        assert_eq!(cond(&repaired, READY).status, "True");
        // A check soon after (a Secret change, the annotation): the repair stays visible.
        let soon = from_outcome(&input(&spec, Some(&repaired), at(301)), &applied(vec![]));
        assert_eq!(cond(&soon, DRIFTED), d);
        // One interval later, a clean check clears it.
        let later = from_outcome(&input(&spec, Some(&soon), at(600)), &applied(vec![]));
        assert_eq!(cond(&later, DRIFTED).status, "False");
        assert_eq!(cond(&later, DRIFTED).reason, "InSync");
        assert_eq!(
            drifted_areas(
                &input(&spec, Some(&later), at(900)),
                &applied(vec![change(Area::ServerSettings, "x")]),
                Mode::Apply
            ),
            vec![Area::ServerSettings]
        );
    }

    #[test]
    fn suspend_keeps_what_was_seen() {
        let spec = spec();
        let ok = from_outcome(&input(&spec, None, at(0)), &applied(vec![]));
        let s = suspended(&input(&spec, Some(&ok), at(60)));
        assert_eq!(cond(&s, READY).reason, "Suspended");
        assert_eq!(cond(&s, READY).status, "False");
        // The areas are not being checked: Unknown/Suspended, not the stale True.
        for ty in ["ServerSettingsReady", "FeatureFlagsReady", DRIFTED] {
            let c = cond(&s, ty);
            assert_eq!(
                (c.status.as_str(), c.reason.as_str(), c.message.as_str()),
                ("Unknown", "Suspended", "not checked: spec.suspend is true"),
                "{ty}"
            );
        }
        let fresh = suspended(&input(&spec, None, at(0)));
        assert_eq!(fresh.conditions.len(), 4);
    }

    #[test]
    fn areas_found_outside_the_engine_take_part_in_ready() {
        let spec = DatabasePolicySpec {
            feature_flags: Some(FeatureFlagsSpec::default()),
            backups: Some(Default::default()),
            ..Default::default()
        };
        let mut outcome = applied(vec![]);
        outcome
            .plan
            .areas
            .push(AreaPlan::skipped(Area::Backups, "run as a CronJob"));
        let failed = AreaState {
            area: Area::Backups,
            status: Status::False,
            reason: Reason::BackupFailed,
            message: "the last backup failed".into(),
        };
        let children = Children {
            areas: vec![failed.clone()],
            backups: Some(BackupStatus {
                last_failure_reason: Some("DumpFailed".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let s = from_outcome_with(&input(&spec, None, at(0)), &outcome, &children);
        assert_eq!(cond(&s, "BackupsReady").reason, "BackupFailed");
        assert_eq!(cond(&s, READY).reason, "BackupFailed");
        assert_eq!(s.backups, children.backups);
        // A worse failure of the engine's own is not hidden by an override.
        let mut p = plan(vec![]);
        p.areas[1].error("f", Reason::TableNotFound, "no table");
        let outcome = Outcome {
            facts: Default::default(),
            drift_trigger: None,
            plan: p,
            report: None,
        };
        let pending = Children {
            areas: vec![AreaState {
                area: Area::FeatureFlags,
                status: Status::False,
                reason: Reason::PlanPending,
                message: "x".into(),
            }],
            pending: vec![change(Area::Backups, "CronJob/test-backup")],
            ..Default::default()
        };
        let s = from_outcome_with(&input(&spec, None, at(0)), &outcome, &pending);
        assert_eq!(cond(&s, "FeatureFlagsReady").reason, "TableNotFound");
        assert_eq!(s.pending_changes, Some(1), "child changes are pending too");
        assert_eq!(s.pending_plan.unwrap().by_area["backups"], 1);
        // Unknown areas do not block Ready, and are named with their reason.
        let unknown = Children {
            areas: vec![AreaState {
                area: Area::Backups,
                status: Status::Unknown,
                reason: Reason::CronJobsUnsupported,
                message: "no batch/v1".into(),
            }],
            ..Default::default()
        };
        let s = from_outcome_with(&input(&spec, None, at(0)), &applied(vec![]), &unknown);
        assert_eq!(cond(&s, READY).status, "True");
        assert!(cond(&s, READY)
            .message
            .contains("backups (CronJobsUnsupported)"));
        // Without a backups section, no backups status is kept.
        let previous = DatabasePolicyStatus {
            backups: Some(BackupStatus::default()),
            ..Default::default()
        };
        let s = from_outcome(
            &input(&self::spec(), Some(&previous), at(0)),
            &applied(vec![]),
        );
        assert_eq!(s.backups, None);
    }

    #[test]
    fn long_messages_are_bounded() {
        let spec = spec();
        let s = from_error(
            &input(&spec, None, at(0)),
            Reason::ApplyFailed,
            &"é".repeat(5000),
        );
        assert!(cond(&s, READY).message.len() <= MAX_MESSAGE + 3);
    }

    #[test]
    fn counts_note_reads_well() {
        let outcome = applied(vec![
            change(Area::FeatureFlags, "a"),
            change(Area::FeatureFlags, "b"),
            change(Area::ServerSettings, "c"),
        ]);
        assert_eq!(
            counts_note(&applied_by_area(&outcome)),
            "serverSettings 1, featureFlags 2"
        );
    }
}
