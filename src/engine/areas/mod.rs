//! One module per area: its observer (a constant number of catalog queries) and its pure
//! planner (`diff` → `Op`s → rendered `Change`s), plus `simulate` for convergence tests.

pub mod autovacuum;
pub mod feature_flags;
pub mod indexes;
pub mod matviews;
pub mod partitions;
pub mod replicas;
pub mod rls;
pub mod server_settings;
