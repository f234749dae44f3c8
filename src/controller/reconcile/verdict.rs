//! Step 8, what the controller does next: the next drift check after
//! `spec.driftCheckInterval`, or the run's failure (retried with backoff, told as a
//! Warning by `reconcile`). Status already says it, area by area.

use std::time::Duration;

use kube::runtime::controller::Action;

use crate::controller::error::{Error, Result};
use crate::engine::Outcome;

/// The engine's failure first (the database is what the policy is about), then the
/// first failure of the Kubernetes side.
pub(super) fn verdict(
    outcome: &Outcome,
    children_error: Option<Error>,
    interval: Duration,
) -> Result<Action> {
    failure_of(outcome)?;
    match children_error {
        Some(e) => Err(e),
        None => Ok(Action::requeue(interval)),
    }
}

/// A plan with errors or a failed statement is a failure.
pub(super) fn failure_of(outcome: &Outcome) -> Result<()> {
    let errors: Vec<_> = outcome.plan.errors().collect();
    if let Some(first) = errors.first() {
        return Err(Error::PlanErrors {
            count: errors.len(),
            reason: first.reason,
            first: first.to_string(),
        });
    }
    if let Some(f) = outcome.report.as_ref().and_then(|r| r.failure.as_ref()) {
        return Err(Error::ApplyFailed {
            reason: f.reason,
            message: format!("{}: {}: {}", f.area, f.target, f.message),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{ApplyFailure, ApplyReport, Area, AreaPlan, Plan};
    use crate::reason::Reason;

    const INTERVAL: Duration = Duration::from_secs(300);

    fn outcome(plan: Plan, report: Option<ApplyReport>) -> Outcome {
        Outcome {
            facts: Default::default(),
            plan,
            report,
            drift_trigger: None,
        }
    }

    fn child_error() -> Error {
        Error::MissingObjectKey("namespace")
    }

    #[test]
    fn a_clean_run_waits_for_the_next_drift_check() {
        let fine = outcome(Plan::default(), Some(ApplyReport::default()));
        assert_eq!(
            verdict(&fine, None, INTERVAL).unwrap(),
            Action::requeue(INTERVAL)
        );
        let e = verdict(&fine, Some(child_error()), INTERVAL).unwrap_err();
        assert_eq!(e.reason(), Reason::InvalidObject);
    }

    #[test]
    fn the_engines_failure_comes_before_the_childrens() {
        let mut area = AreaPlan::new(Area::FeatureFlags);
        area.error("public.flags", Reason::TableNotFound, "no table");
        area.error("public.other", Reason::NotATable, "a view");
        let plan = Plan { areas: vec![area] };
        let e = verdict(&outcome(plan, None), Some(child_error()), INTERVAL).unwrap_err();
        assert_eq!(e.reason(), Reason::TableNotFound);
        assert!(e.to_string().contains("2 error(s)"), "{e}");

        let report = ApplyReport {
            failure: Some(ApplyFailure {
                area: Area::ServerSettings,
                target: "work_mem".into(),
                statement: "ALTER SYSTEM …".into(),
                reason: Reason::LockTimeout,
                sqlstate: Some("55P03".into()),
                message: "canceling statement due to lock timeout".into(),
            }),
            ..Default::default()
        };
        let failed = outcome(Plan::default(), Some(report));
        let e = verdict(&failed, Some(child_error()), INTERVAL).unwrap_err();
        assert_eq!(e.reason(), Reason::LockTimeout);
        assert!(e.to_string().contains("work_mem"), "{e}");
    }
}
