//! Backups: an area of the spec the engine does not reconcile. The operator runs them as a
//! CronJob (`dbpolicy backup`); a plan says so rather than staying silent.

use sqlx::PgConnection;

use super::{AreaModule, ObserveContext, ObserveError, PlanContext};
use crate::api::{BackupsSpec, DatabasePolicySpec};
use crate::engine::plan::{Area, AreaPlan, Change};

pub struct Backups;

impl AreaModule for Backups {
    const AREA: Area = Area::Backups;
    type Spec = BackupsSpec;
    /// Nothing is read from the database.
    type Observed = ();
    type Op = std::convert::Infallible;

    fn section(spec: &DatabasePolicySpec) -> Option<&BackupsSpec> {
        spec.backups.as_ref()
    }

    async fn observe(
        _conn: &mut PgConnection,
        _section: &BackupsSpec,
        _ctx: ObserveContext<'_>,
    ) -> Result<(), ObserveError> {
        Ok(())
    }

    fn diff(_: &BackupsSpec, _: &(), _: &PlanContext<'_>, _: &mut AreaPlan) -> Vec<Self::Op> {
        Vec::new()
    }

    fn render(_: &BackupsSpec, op: &Self::Op) -> Vec<Change> {
        match *op {}
    }

    fn simulate(_: &BackupsSpec, _: &(), _: &[Self::Op]) {}

    fn plan(section: &BackupsSpec, _: &(), _: &mut PlanContext<'_>) -> AreaPlan {
        Self::plan_unobserved(section).unwrap_or_else(|| AreaPlan::new(Self::AREA))
    }

    fn plan_unobserved(_: &BackupsSpec) -> Option<AreaPlan> {
        Some(AreaPlan::skipped(
            Self::AREA,
            "run by the operator as a CronJob (dbpolicy backup), not by plan/apply",
        ))
    }
}
