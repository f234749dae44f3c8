//! Pure builders of `status.backups` and the `BackupsReady` condition from the backup CronJob, its Jobs and their pods' termination messages; the schedule's window from its cron expression.

use std::str::FromStr as _;
use std::time::Duration;

use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use serde::Deserialize;

use super::status::Status;
use crate::api::BackupStatus;
use crate::reason::Reason;

/// What `dbpolicy backup run` writes to its termination log (see `backup::termination_message`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
struct TerminationMessage {
    result: String,
    #[serde(default)]
    size_bytes: Option<i64>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

/// One finished backup Job.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Run {
    pub finished: Timestamp,
    pub succeeded: bool,
    pub size_bytes: Option<i64>,
    /// CamelCase reason of a failure (`DumpFailed`, `BackoffLimitExceeded`, …).
    pub reason: Option<String>,
    pub message: Option<String>,
}

pub(crate) fn ts(s: Option<&str>) -> Option<Timestamp> {
    s.and_then(|s| s.parse().ok())
}

/// The newest terminated container's message among the pods of `job` (matched by the
/// Job's uid in the pods' owner references).
fn termination_message(job: &Job, pods: &[Pod]) -> Option<TerminationMessage> {
    termination_json(job, pods)
}

/// [`termination_message`] as any type the message parses into (the base backup Job's
/// message has more fields).
pub(crate) fn termination_json<T: serde::de::DeserializeOwned>(
    job: &Job,
    pods: &[Pod],
) -> Option<T> {
    let uid = job.metadata.uid.as_deref()?;
    pods.iter()
        .filter(|p| {
            p.metadata
                .owner_references
                .iter()
                .flatten()
                .any(|o| o.uid == uid)
        })
        .flat_map(|p| {
            p.status
                .iter()
                .flat_map(|s| s.container_statuses.iter().flatten())
        })
        .filter_map(|c| c.state.as_ref()?.terminated.as_ref())
        .filter_map(|t| {
            let finished = t.finished_at.as_ref().map(|f| f.0);
            let msg: T = serde_json::from_str(t.message.as_deref()?).ok()?;
            Some((finished, msg))
        })
        .max_by_key(|(finished, _)| *finished)
        .map(|(_, m)| m)
}

/// The finished runs among `jobs`, oldest first; running Jobs are left out.
pub(crate) fn runs(jobs: &[Job], pods: &[Pod]) -> Vec<Run> {
    let mut runs: Vec<Run> = jobs
        .iter()
        .filter_map(|job| {
            let status = job.status.as_ref()?;
            let message = termination_message(job, pods);
            let failed = status
                .conditions
                .iter()
                .flatten()
                .find(|c| c.type_ == "Failed" && c.status == "True");
            if status.succeeded.unwrap_or(0) > 0 {
                let finished = status
                    .completion_time
                    .as_ref()
                    .map(|t| t.0)
                    .or_else(|| status.start_time.as_ref().map(|t| t.0))?;
                return Some(Run {
                    finished,
                    succeeded: true,
                    size_bytes: message.and_then(|m| m.size_bytes),
                    reason: None,
                    message: None,
                });
            }
            let failed = failed?;
            let finished = failed
                .last_transition_time
                .as_ref()
                .map(|t| t.0)
                .or_else(|| status.start_time.as_ref().map(|t| t.0))?;
            // The pod's own account beats the Job's (BackoffLimitExceeded says little).
            let (reason, text) = match message.filter(|m| m.result == "Failed") {
                Some(m) => (m.reason, m.message),
                None => (failed.reason.clone(), failed.message.clone()),
            };
            Some(Run {
                finished,
                succeeded: false,
                size_bytes: None,
                reason: Some(reason.unwrap_or_else(|| Reason::BackupFailed.into())),
                message: text,
            })
        })
        .collect();
    runs.sort_by_key(|r| r.finished);
    runs
}

/// `status.backups`: what the CronJob and its Jobs say, merged with the previous status.
/// Kubernetes deletes finished Jobs (history limits, TTL), so a time only moves forward
/// and the newest size stays known after its Job is gone.
pub(crate) fn backup_status(
    previous: Option<&BackupStatus>,
    cronjob: Option<&CronJob>,
    runs: &[Run],
) -> BackupStatus {
    let mut status = previous.cloned().unwrap_or_default();
    if let Some(t) = cronjob
        .and_then(|c| c.status.as_ref())
        .and_then(|s| s.last_schedule_time.as_ref())
    {
        status.last_schedule_time = Some(t.0.to_string());
    }
    if let Some(ok) = runs.iter().rev().find(|r| r.succeeded) {
        if ts(status.last_success_time.as_deref()).is_none_or(|prev| ok.finished >= prev) {
            status.last_success_time = Some(ok.finished.to_string());
            if ok.size_bytes.is_some() {
                status.newest_backup_bytes = ok.size_bytes;
            }
        }
    }
    if let Some(bad) = runs.iter().rev().find(|r| !r.succeeded) {
        if ts(status.last_failure_time.as_deref()).is_none_or(|prev| bad.finished >= prev) {
            status.last_failure_time = Some(bad.finished.to_string());
            status.last_failure_reason = bad.reason.clone();
        }
    }
    status
}

/// How long without a successful backup is too long: twice the interval between the two
/// most recent scheduled times before `now` (a daily schedule: 48 hours), so one run may
/// be late or slow, but a missed run is noticed. Schedules are evaluated in UTC, as
/// kube-controller-manager does for a CronJob without `timeZone`. None when the schedule
/// does not parse or never fires.
pub(crate) fn window(schedule: &str, now: Timestamp) -> Option<Duration> {
    let cron = croner::Cron::from_str(schedule.trim()).ok()?;
    let now = chrono::DateTime::<chrono::Utc>::from_timestamp(now.as_second(), 0)?;
    let last = cron.find_previous_occurrence(&now, true).ok()?;
    let before = cron.find_previous_occurrence(&last, false).ok()?;
    let interval = (last - before).to_std().ok()?;
    Some(interval * 2)
}

/// What `BackupsReady` says: (status, reason, message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    pub status: Status,
    pub reason: Reason,
    pub message: String,
}

/// `BackupsReady`. False when the last run failed or the newest success is older than the
/// [`window`]; Unknown before the first run. `created` is the CronJob's creation time:
/// a CronJob that never produced a success within a window of its creation is overdue
/// too. No message holds a duration that grows with the clock, so a steady state writes
/// the same condition.
pub(crate) fn readiness(
    schedule: &str,
    suspended: bool,
    status: &BackupStatus,
    last_failure_message: Option<&str>,
    created: Option<Timestamp>,
    now: Timestamp,
) -> Readiness {
    let ready = |status, reason, message: String| Readiness {
        status,
        reason,
        message,
    };
    let success = ts(status.last_success_time.as_deref());
    let failure = ts(status.last_failure_time.as_deref());
    if suspended {
        return ready(
            Status::Unknown,
            Reason::BackupsSuspended,
            "backups are suspended (spec.backups.suspend or spec.suspend)".into(),
        );
    }
    if let Some(f) = failure.filter(|f| success.is_none_or(|s| *f > s)) {
        let reason = status
            .last_failure_reason
            .as_deref()
            .unwrap_or(Reason::BackupFailed.as_str());
        let detail = last_failure_message
            .map(|m| format!(": {m}"))
            .unwrap_or_default();
        return ready(
            Status::False,
            Reason::BackupFailed,
            format!("the last backup failed at {f} ({reason}){detail}"),
        );
    }
    let Some(window) = window(schedule, now) else {
        return ready(
            Status::Unknown,
            Reason::InvalidSchedule,
            format!("spec.backups.schedule {schedule:?} is not a cron schedule this operator can evaluate"),
        );
    };
    let since = |t: Timestamp| Duration::try_from(now.duration_since(t)).unwrap_or(Duration::ZERO);
    match success {
        Some(s) if since(s) <= window => ready(
            Status::True,
            Reason::BackupSucceeded,
            format!(
                "last backup succeeded at {s}{}",
                status
                    .newest_backup_bytes
                    .map(|b| format!(" ({b} bytes)"))
                    .unwrap_or_default()
            ),
        ),
        Some(s) => ready(
            Status::False,
            Reason::BackupOverdue,
            format!(
                "no successful backup within {} (twice the schedule's interval); the last one succeeded at {s}",
                crate::units::duration(window)
            ),
        ),
        None if created.is_some_and(|c| since(c) > window) => ready(
            Status::False,
            Reason::BackupOverdue,
            format!(
                "no successful backup within {} of the CronJob's creation",
                crate::units::duration(window)
            ),
        ),
        None => ready(
            Status::Unknown,
            Reason::NoBackupYet,
            match &status.last_schedule_time {
                Some(t) => format!("the first backup was started at {t} and has not finished"),
                None => format!("no backup has run yet (schedule {schedule:?})"),
            },
        ),
    }
}

/// The message of the newest failed run, for the condition (the status field keeps the
/// reason only).
pub(crate) fn last_failure_message(runs: &[Run]) -> Option<String> {
    let m = runs
        .iter()
        .rev()
        .find(|r| !r.succeeded)?
        .message
        .as_deref()?;
    Some(m.chars().take(512).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn job(name: &str, status: serde_json::Value) -> Job {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "quiz", "uid": format!("uid-{name}")},
            "status": status,
        }))
        .unwrap()
    }

    fn pod(job: &str, finished: &str, message: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": format!("{job}-x"), "namespace": "quiz",
                "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": job, "uid": format!("uid-{job}")}]},
            "status": {"containerStatuses": [{
                "name": "backup", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"terminated": {"exitCode": 0, "finishedAt": finished, "message": message}},
            }]},
        }))
        .unwrap()
    }

    fn succeeded(name: &str, at: &str) -> Job {
        job(
            name,
            json!({"succeeded": 1, "startTime": at, "completionTime": at}),
        )
    }

    fn failed(name: &str, at: &str) -> Job {
        job(
            name,
            json!({"failed": 3, "startTime": at, "conditions": [{
                "type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                "message": "Job has reached the specified backoff limit", "lastTransitionTime": at,
            }]}),
        )
    }

    fn cronjob(last_schedule: &str) -> CronJob {
        serde_json::from_value(json!({
            "metadata": {"name": "certquiz-backup"},
            "spec": {"schedule": "0 3 * * *", "jobTemplate": {}},
            "status": {"lastScheduleTime": last_schedule},
        }))
        .unwrap()
    }

    #[test]
    fn window_is_twice_the_interval_between_the_last_two_schedules() {
        let now = at("2026-11-25T15:00:00Z");
        let h = |n: u64| Some(Duration::from_secs(n * 3600));
        assert_eq!(window("0 3 * * *", now), h(48));
        assert_eq!(window("@daily", now), h(48));
        assert_eq!(window("*/15 * * * *", now), Some(Duration::from_secs(1800)));
        assert_eq!(window("0 3 * * 0", now), h(2 * 7 * 24), "weekly on Sundays");
        // An uneven schedule: the two latest runs before now (03:00 and 20:00 the day before).
        assert_eq!(window("0 3,20 * * *", now), h(14));
        assert_eq!(window("not a schedule", now), None);
    }

    #[test]
    fn runs_read_the_termination_messages() {
        let jobs = vec![
            succeeded("b-1", "2026-11-23T03:05:00Z"),
            failed("b-2", "2026-11-24T03:02:00Z"),
            job(
                "b-3",
                json!({"active": 1, "startTime": "2026-11-25T03:00:00Z"}),
            ),
        ];
        let pods = vec![
            pod(
                "b-1",
                "2026-11-23T03:05:00Z",
                r#"{"result":"Succeeded","sizeBytes":1048576,"backup":"x"}"#,
            ),
            pod(
                "b-2",
                "2026-11-24T03:01:00Z",
                r#"{"result":"Failed","reason":"ConnectionFailed","message":"first try"}"#,
            ),
            pod(
                "b-2",
                "2026-11-24T03:02:00Z",
                r#"{"result":"Failed","reason":"DumpFailed","message":"pg_dump: error: permission denied"}"#,
            ),
        ];
        let runs = runs(&jobs, &pods);
        assert_eq!(runs.len(), 2, "the running Job is not a run yet");
        assert_eq!(runs[0].size_bytes, Some(1048576));
        assert!(runs[0].succeeded);
        assert_eq!(
            runs[1].reason.as_deref(),
            Some("DumpFailed"),
            "the newest pod's account"
        );
        assert_eq!(
            last_failure_message(&runs).as_deref(),
            Some("pg_dump: error: permission denied")
        );
        // Without a termination message (the pod is gone), the Job's reason.
        let runs = super::runs(&jobs[1..2], &[]);
        assert_eq!(runs[0].reason.as_deref(), Some("BackoffLimitExceeded"));
    }

    #[test]
    fn status_merges_with_the_previous_one() {
        let jobs = vec![
            succeeded("b-1", "2026-11-23T03:05:00Z"),
            failed("b-2", "2026-11-24T03:02:00Z"),
        ];
        let pods = vec![pod(
            "b-1",
            "2026-11-23T03:05:00Z",
            r#"{"result":"Succeeded","sizeBytes":2048}"#,
        )];
        let s = backup_status(
            None,
            Some(&cronjob("2026-11-24T03:00:00Z")),
            &runs(&jobs, &pods),
        );
        assert_eq!(
            s,
            BackupStatus {
                last_schedule_time: Some("2026-11-24T03:00:00Z".into()),
                last_success_time: Some("2026-11-23T03:05:00Z".into()),
                last_failure_time: Some("2026-11-24T03:02:00Z".into()),
                last_failure_reason: Some("BackoffLimitExceeded".into()),
                newest_backup_bytes: Some(2048),
                point_in_time_recovery: None,
            }
        );
        // The Jobs were deleted (TTL): nothing is forgotten.
        assert_eq!(backup_status(Some(&s), None, &[]), s);
        // A newer success moves the time and the size; an older one never moves them back.
        let newer = vec![succeeded("b-4", "2026-11-25T03:04:00Z")];
        let pods = vec![pod(
            "b-4",
            "2026-11-25T03:04:00Z",
            r#"{"result":"Succeeded","sizeBytes":4096}"#,
        )];
        let s2 = backup_status(Some(&s), None, &runs(&newer, &pods));
        assert_eq!(
            s2.last_success_time.as_deref(),
            Some("2026-11-25T03:04:00Z")
        );
        assert_eq!(s2.newest_backup_bytes, Some(4096));
        assert_eq!(backup_status(Some(&s2), None, &runs(&jobs, &[])), s2);
    }

    #[test]
    fn readiness_follows_the_last_run_and_the_window() {
        let now = at("2026-11-25T15:00:00Z");
        let ok = BackupStatus {
            last_schedule_time: Some("2026-11-25T03:00:00Z".into()),
            last_success_time: Some("2026-11-25T03:04:00Z".into()),
            newest_backup_bytes: Some(4096),
            ..Default::default()
        };
        let r = readiness("0 3 * * *", false, &ok, None, None, now);
        assert_eq!(
            (r.status, r.reason),
            (Status::True, Reason::BackupSucceeded)
        );
        assert!(r.message.contains("4096 bytes"), "{}", r.message);

        // The last run failed: False, whatever the window says.
        let failed = BackupStatus {
            last_failure_time: Some("2026-11-25T03:10:00Z".into()),
            last_failure_reason: Some("DumpFailed".into()),
            last_success_time: Some("2026-11-24T03:04:00Z".into()),
            ..ok.clone()
        };
        let r = readiness(
            "0 3 * * *",
            false,
            &failed,
            Some("pg_dump: error"),
            None,
            now,
        );
        assert_eq!((r.status, r.reason), (Status::False, Reason::BackupFailed));
        assert!(r.message.contains("DumpFailed") && r.message.contains("pg_dump: error"));

        // A success after the failure clears it.
        let recovered = BackupStatus {
            last_failure_time: Some("2026-11-24T03:10:00Z".into()),
            ..ok.clone()
        };
        assert_eq!(
            readiness("0 3 * * *", false, &recovered, None, None, now).status,
            Status::True
        );

        // No success within 48 hours of a daily schedule: overdue.
        let r = readiness(
            "0 3 * * *",
            false,
            &ok,
            None,
            None,
            at("2026-11-27T04:00:00Z"),
        );
        assert_eq!((r.status, r.reason), (Status::False, Reason::BackupOverdue));
        assert!(r.message.contains("2d"), "{}", r.message);

        // Before the first run; and a CronJob that never succeeded for a whole window.
        let none = BackupStatus::default();
        let r = readiness(
            "0 3 * * *",
            false,
            &none,
            None,
            Some(at("2026-11-25T10:00:00Z")),
            now,
        );
        assert_eq!((r.status, r.reason), (Status::Unknown, Reason::NoBackupYet));
        let r = readiness(
            "0 3 * * *",
            false,
            &none,
            None,
            Some(at("2026-11-20T10:00:00Z")),
            now,
        );
        assert_eq!((r.status, r.reason), (Status::False, Reason::BackupOverdue));

        let r = readiness("0 3 * * *", true, &failed, None, None, now);
        assert_eq!(
            (r.status, r.reason),
            (Status::Unknown, Reason::BackupsSuspended)
        );

        // The message does not change while time passes within the window.
        let a = readiness("0 3 * * *", false, &ok, None, None, now);
        let b = readiness(
            "0 3 * * *",
            false,
            &ok,
            None,
            None,
            at("2026-11-25T16:00:00Z"),
        );
        assert_eq!(a, b);
    }
}
