//! The areas of a policy and their registry. Each area is one module implementing
//! [`AreaModule`]: which section of the spec it reconciles, its observer (a constant number
//! of catalog queries), its pure planner (`diff` → `Op`s → rendered `Change`s) and
//! `simulate` for the convergence property every area passes (`convergence::converges`).
//!
//! The engine knows areas only through `AREAS`: observe, plan, facts and the hooks after
//! an apply are loops over it. A new area is its module and one line in `registry!`.

pub mod autovacuum;
pub(crate) mod backups;
pub mod feature_flags;
pub mod indexes;
pub mod matviews;
pub mod partitions;
pub(crate) mod replicas;
pub mod rls;
pub mod server_settings;

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::fmt::Debug;
use std::future::Future;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use serde::Serialize;
use sqlx::PgConnection;

use super::apply::ApplyReport;
use super::ledger::Ledger;
use super::plan::{AreaPlan, Change};
use super::EngineError;
use crate::api::DatabasePolicySpec;
use crate::pg::QualifiedName;
use crate::reason::Reason;
use server_settings::AllowedSettings;

/// Replica probe results, per replica name (see [`super::replica_health`]).
pub(crate) type Probes = std::collections::BTreeMap<String, replicas::Probe>;

/// One area: the section of the spec it owns and its observe → plan pipeline.
pub trait AreaModule: Sync + 'static {
    const AREA: Area;
    /// Areas that keep running once their section left the spec, with an empty one, while
    /// the ledger says the policy set something there: what it set is reset.
    const RESETS_WHEN_REMOVED: bool = false;
    /// Observed on a connection of its own when the run has a second one (see
    /// `RunOptions::second_url`), at the same time as the ledger and the other areas: for
    /// the area whose catalog read keeps the server busiest. Such an area is observed
    /// without the ledger (its `ObserveContext` holds an empty one, however many
    /// connections the run has), so it cannot be one that `RESETS_WHEN_REMOVED`.
    const OWN_CONNECTION: bool = false;
    /// The area's changes of different targets are independent (no order between them,
    /// no lock they both take): given a second connection, the executor runs them on
    /// both at once, each target's changes in order on one (see `apply::execute`).
    const APPLIES_IN_PARALLEL: bool = false;
    type Spec: Clone + Default + Send + Sync + 'static;
    type Observed: Clone + Debug + Send + Sync + 'static;
    type Op: Debug;

    /// The area's section of the spec.
    fn section(spec: &DatabasePolicySpec) -> Option<&Self::Spec>;

    /// Reads what the area needs from the catalog: a constant number of queries.
    fn observe<'a>(
        conn: &'a mut PgConnection,
        section: &'a Self::Spec,
        ctx: ObserveContext<'a>,
    ) -> impl Future<Output = Result<Self::Observed, ObserveError>> + Send + 'a;

    /// What must change, as the area's own operations; what cannot be done goes to
    /// `plan` as errors (and what is worth telling as notices).
    fn diff(
        section: &Self::Spec,
        observed: &Self::Observed,
        ctx: &PlanContext<'_>,
        plan: &mut AreaPlan,
    ) -> Vec<Self::Op>;

    /// One operation as the statements that carry it out.
    fn render(section: &Self::Spec, op: &Self::Op) -> Vec<Change>;

    /// The catalog as it will be after `ops` (for the convergence property).
    fn simulate(
        section: &Self::Spec,
        observed: &Self::Observed,
        ops: &[Self::Op],
    ) -> Self::Observed;

    /// The area's plan: its diff, rendered, then [`AreaModule::finish`]. Areas whose
    /// changes need more than that (transaction groups, a claim before the first change)
    /// override it.
    fn plan(
        section: &Self::Spec,
        observed: &Self::Observed,
        ctx: &mut PlanContext<'_>,
    ) -> AreaPlan {
        let mut plan = AreaPlan::new(Self::AREA);
        let ops = Self::diff(section, observed, ctx, &mut plan);
        plan.changes = ops
            .iter()
            .flat_map(|op| Self::render(section, op))
            .collect();
        Self::finish(section, observed, &mut plan);
        plan
    }

    /// What the area adds to its rendered plan (refusals, notices).
    fn finish(_section: &Self::Spec, _observed: &Self::Observed, _plan: &mut AreaPlan) {}

    /// The plan of an area that observes nothing (None: nothing to plan unobserved).
    fn plan_unobserved(_section: &Self::Spec) -> Option<AreaPlan> {
        None
    }

    /// The area's details for status (and metrics), from what was observed; `section` is
    /// None when the spec no longer has it.
    fn facts(_section: Option<&Self::Spec>, _observed: &Self::Observed, _facts: &mut Facts) {}

    /// Runs after an apply, while the run still holds the lock (a failed settings run
    /// restored, normalisations cached).
    fn after_apply<'a>(
        _conn: &'a mut PgConnection,
        _observed: &'a Self::Observed,
        _ctx: AfterApply<'a>,
    ) -> impl Future<Output = ()> + Send + 'a {
        std::future::ready(())
    }
}

/// What an observer gets besides its section and the connection.
pub struct ObserveContext<'a> {
    /// What this policy (and the others on the database) own.
    pub ledger: &'a Ledger,
    /// Replica probes started before the run took its lock (I/O on other servers).
    pub probes: &'a mut Option<tokio::task::JoinHandle<Probes>>,
}

impl ObserveContext<'_> {
    /// The clock, read by the one area that needs it when it observes: the plan is then a
    /// pure function of what was observed.
    pub(crate) fn now(&self) -> Result<DateTime<Utc>, ObserveError> {
        super::clock::now().map_err(|e| ObserveError {
            reason: Reason::InvalidClock,
            message: e.to_string(),
        })
    }

    /// The results of the replica probes, awaited.
    pub(crate) async fn probes(&mut self) -> Option<Probes> {
        Some(self.probes.take()?.await.unwrap_or_default())
    }
}

/// Why an area could not be observed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ObserveError {
    pub reason: Reason,
    pub message: String,
}

impl From<sqlx::Error> for ObserveError {
    fn from(e: sqlx::Error) -> Self {
        ObserveError {
            reason: Reason::of_error(&e, Reason::ApplyFailed),
            message: crate::pg::error_summary(&e),
        }
    }
}

/// What a planner gets besides its section and what was observed.
pub struct PlanContext<'a> {
    /// The whole spec: an area may depend on another's section (views and their indexes).
    pub spec: &'a DatabasePolicySpec,
    pub ledger: &'a Ledger,
    /// Server settings denied by default that the platform team allows.
    pub allowed_settings: &'a AllowedSettings,
    /// Views the materialized-views plan drops and builds again (planned before the
    /// indexes, which go with them).
    pub recreated_views: BTreeSet<QualifiedName>,
}

impl<'a> PlanContext<'a> {
    pub fn new(spec: &'a DatabasePolicySpec, ledger: &'a Ledger) -> Self {
        PlanContext {
            spec,
            ledger,
            allowed_settings: AllowedSettings::none(),
            recreated_views: BTreeSet::new(),
        }
    }
}

/// What runs after an apply gets.
pub struct AfterApply<'a> {
    /// The ledger as it was observed, before the apply.
    pub ledger: &'a Ledger,
    pub report: &'a mut ApplyReport,
    pub policy: &'a str,
}

/// Per-area details for status, derived from what was observed.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Facts {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partitions: Option<Vec<crate::api::PartitionTableStatus>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub materialized_views: Option<Vec<crate::api::MaterializedViewStatus>>,
    /// Health and lag of each declared replica (`Unknown` when it could not be checked).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replicas: Option<Vec<crate::api::ReplicaStatus>>,
    /// WAL retained by each replication slot of the server (bytes), when slots were
    /// observed: for the operator's metrics, not status.
    #[serde(skip)]
    pub slot_retained_bytes: Option<std::collections::BTreeMap<String, i64>>,
}

/// What one area observed, to be stored in [`Observed`] once every area is observed (the
/// areas of a run with two connections are observed at the same time).
pub(crate) type Fill = Box<dyn FnOnce(&mut Observed) + Send>;

/// An area as the engine's loops see it (whatever its types).
pub(crate) trait Registered: Sync {
    fn area(&self) -> Area;
    fn in_spec(&self, spec: &DatabasePolicySpec) -> bool;
    /// See [`AreaModule::OWN_CONNECTION`].
    fn own_connection(&self) -> bool;
    /// The area's observation (None when the area is not observed this run).
    fn observe<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        spec: &'a DatabasePolicySpec,
        ledger: &'a Ledger,
        probes: &'a mut Option<tokio::task::JoinHandle<Probes>>,
    ) -> BoxFuture<'a, Result<Option<Fill>, EngineError>>;
    fn plan(
        &self,
        spec: &DatabasePolicySpec,
        observed: &Observed,
        ctx: &mut PlanContext<'_>,
    ) -> Option<AreaPlan>;
    fn facts(&self, spec: &DatabasePolicySpec, observed: &Observed, facts: &mut Facts);
    fn after_apply<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        observed: &'a Observed,
        report: &'a mut ApplyReport,
        policy: &'a str,
    ) -> BoxFuture<'a, ()>;
}

/// Where an area's observation is kept in [`Observed`] (written by `registry!`).
pub(crate) trait Slot: AreaModule {
    fn slot(observed: &Observed) -> &Option<Self::Observed>;
    fn slot_mut(observed: &mut Observed) -> &mut Option<Self::Observed>;
}

/// The section the area runs with: the spec's, or an empty one when the spec dropped it
/// and `reset` (the area resets what it set once its section is gone).
fn section_or_empty<T: AreaModule>(
    spec: &DatabasePolicySpec,
    reset: bool,
) -> Option<Cow<'_, T::Spec>> {
    match T::section(spec) {
        Some(s) => Some(Cow::Borrowed(s)),
        None if reset => Some(Cow::Owned(T::Spec::default())),
        None => None,
    }
}

impl<T: Slot> Registered for T {
    fn area(&self) -> Area {
        T::AREA
    }

    fn in_spec(&self, spec: &DatabasePolicySpec) -> bool {
        T::section(spec).is_some()
    }

    fn own_connection(&self) -> bool {
        T::OWN_CONNECTION
    }

    fn observe<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        spec: &'a DatabasePolicySpec,
        ledger: &'a Ledger,
        probes: &'a mut Option<tokio::task::JoinHandle<Probes>>,
    ) -> BoxFuture<'a, Result<Option<Fill>, EngineError>> {
        const {
            assert!(
                !(T::OWN_CONNECTION && T::RESETS_WHEN_REMOVED),
                "an area observed on its own connection sees no ledger"
            )
        };
        Box::pin(async move {
            // Observed once its section is gone only while the ledger says this policy
            // still owns something there.
            let owns = ledger.items(T::AREA).next().is_some();
            let Some(section) = section_or_empty::<T>(spec, T::RESETS_WHEN_REMOVED && owns) else {
                return Ok(None);
            };
            let ctx = ObserveContext { ledger, probes };
            let o = T::observe(conn, &section, ctx)
                .await
                .map_err(|e| EngineError::Observe {
                    area: T::AREA.as_str(),
                    message: e.message,
                    reason: e.reason,
                })?;
            Ok(Some(
                Box::new(move |observed: &mut Observed| *T::slot_mut(observed) = Some(o)) as Fill,
            ))
        })
    }

    fn plan(
        &self,
        spec: &DatabasePolicySpec,
        observed: &Observed,
        ctx: &mut PlanContext<'_>,
    ) -> Option<AreaPlan> {
        let section = section_or_empty::<T>(spec, T::RESETS_WHEN_REMOVED)?;
        match T::slot(observed) {
            Some(o) => Some(T::plan(&section, o, ctx)),
            None => T::plan_unobserved(&section),
        }
    }

    fn facts(&self, spec: &DatabasePolicySpec, observed: &Observed, facts: &mut Facts) {
        if let Some(o) = T::slot(observed) {
            T::facts(T::section(spec), o, facts);
        }
    }

    fn after_apply<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        observed: &'a Observed,
        report: &'a mut ApplyReport,
        policy: &'a str,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if let Some(o) = T::slot(observed) {
                let ctx = AfterApply {
                    ledger: &observed.ledger,
                    report,
                    policy,
                };
                T::after_apply(conn, o, ctx).await;
            }
        })
    }
}

/// The registry: one line per area, in the order the executor applies them (settings
/// first, they may matter to what follows; then structure — partitions, views, the
/// indexes that may sit on those views — before the policies that read it; data last).
/// Each line names the area, its spec field and the field of [`Observed`] that holds
/// what was observed, and its module's [`AreaModule`]. It writes [`Area`], [`Observed`]
/// and `AREAS`.
macro_rules! registry {
    ($($area:ident, $spec_field:literal, $field:ident: $module:path;)*) => {
        /// The areas of a policy, in the order the executor applies them.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
        #[serde(rename_all = "camelCase")]
        pub enum Area {
            $($area,)*
        }

        impl Area {
            pub(crate) const ALL: [Area; [$(Area::$area,)*].len()] = [$(Area::$area,)*];

            /// The spec field of the area.
            pub(crate) fn as_str(self) -> &'static str {
                match self {
                    $(Area::$area => $spec_field,)*
                }
            }

            /// The area's condition type in status.
            pub(crate) fn condition_type(self) -> &'static str {
                match self {
                    $(Area::$area => concat!(stringify!($area), "Ready"),)*
                }
            }

            /// See [`AreaModule::APPLIES_IN_PARALLEL`].
            pub(crate) fn applies_in_parallel(self) -> bool {
                match self {
                    $(Area::$area => <$module as AreaModule>::APPLIES_IN_PARALLEL,)*
                }
            }

            /// Whether the spec has the area's section.
            pub(crate) fn in_spec(self, spec: &DatabasePolicySpec) -> bool {
                AREAS.iter().any(|a| a.area() == self && a.in_spec(spec))
            }
        }

        /// What the live database holds, for every area of the spec.
        #[derive(Debug, Clone, Default)]
        pub struct Observed {
            pub ledger: Ledger,
            $(pub $field: Option<<$module as AreaModule>::Observed>,)*
            /// Who claims the server-wide items the policy touches (see
            /// [`crate::engine::server_claims`]); None when it touches none, or when the
            /// caller observed without the claims database.
            pub server_claims: Option<crate::engine::server_claims::Observed>,
        }

        $(
            impl Slot for $module {
                fn slot(observed: &Observed) -> &Option<Self::Observed> {
                    &observed.$field
                }
                fn slot_mut(observed: &mut Observed) -> &mut Option<Self::Observed> {
                    &mut observed.$field
                }
            }
        )*

        /// Every area, in apply order.
        pub(crate) static AREAS: &[&dyn Registered] = &[$(&$module,)*];

        #[cfg(test)]
        mod registry_tests {
            use super::*;

            #[test]
            fn the_registry_is_in_area_order() {
                $(assert_eq!(<$module as AreaModule>::AREA, Area::$area);)*
                let order: Vec<Area> = AREAS.iter().map(|a| a.area()).collect();
                assert_eq!(order, Area::ALL.to_vec());
            }
        }
    };
}

registry! {
    ServerSettings, "serverSettings", server_settings: server_settings::ServerSettings;
    Autovacuum, "autovacuum", autovacuum: autovacuum::Autovacuum;
    Partitions, "partitions", partitions: partitions::Partitions;
    MaterializedViews, "materializedViews", materialized_views: matviews::MaterializedViews;
    Indexes, "indexes", indexes: indexes::Indexes;
    RowLevelSecurity, "rowLevelSecurity", rls: rls::RowLevelSecurity;
    FeatureFlags, "featureFlags", feature_flags: feature_flags::FeatureFlags;
    Replicas, "replicas", replicas: replicas::Replicas;
    Backups, "backups", backups: backups::Backups;
}

impl std::fmt::Display for Area {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
pub(crate) mod convergence {
    //! The property every area passes: after applying a plan, planning again finds
    //! nothing to do.

    use proptest::prelude::*;

    use super::*;

    /// Plans `section` against `observed`, applies the operations to a simulated catalog
    /// (and their ledger records to the ledger) and plans again: nothing may be left to
    /// do. `first` checks the first plan's operations and errors before that (the area's
    /// own properties; `prop_assume!` there skips a case). Returns the simulated catalog.
    pub(crate) fn converges<A: AreaModule>(
        section: &A::Spec,
        observed: &A::Observed,
        ledger: &Ledger,
        first: impl FnOnce(&[A::Op], &AreaPlan) -> Result<(), TestCaseError>,
    ) -> Result<A::Observed, TestCaseError> {
        let spec = DatabasePolicySpec::default();
        let mut plan = AreaPlan::new(A::AREA);
        let ops = A::diff(
            section,
            observed,
            &PlanContext::new(&spec, ledger),
            &mut plan,
        );
        first(&ops, &plan)?;
        let after = A::simulate(section, observed, &ops);
        let mut ledger = ledger.clone();
        for c in ops.iter().flat_map(|op| A::render(section, op)) {
            ledger.apply_ops(&c.ledger);
        }
        let ctx = PlanContext::new(&spec, &ledger);
        let again = A::diff(section, &after, &ctx, &mut AreaPlan::new(A::AREA));
        prop_assert!(again.is_empty(), "{ops:?} then {again:?}");
        Ok(after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// No `..` in the spec above: a new section of the spec must be registered as an area.
    #[test]
    fn every_section_of_the_spec_is_an_area() {
        let spec = DatabasePolicySpec {
            database: Default::default(),
            mode: None,
            suspend: None,
            drift_check_interval: None,
            drift_detection: None,
            deletion_policy: None,
            safety: None,
            row_level_security: Some(Default::default()),
            partitions: Some(Default::default()),
            autovacuum: Some(Default::default()),
            server_settings: Some(Default::default()),
            replicas: Some(Default::default()),
            backups: Some(Default::default()),
            feature_flags: Some(Default::default()),
            materialized_views: Some(Default::default()),
            indexes: Some(Default::default()),
        };
        for area in Area::ALL {
            assert!(area.in_spec(&spec), "{area}");
        }
    }
}
