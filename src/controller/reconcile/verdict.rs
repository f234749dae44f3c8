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
