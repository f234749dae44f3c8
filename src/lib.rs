//! dbpolicy: reconcile a `DatabasePolicy` against a live PostgreSQL database.
//!
//! One engine (observe → plan → apply, in [`engine`]) serves three fronts: the CLI
//! ([`cli`]), the Kubernetes controller and the backup job.

pub mod api;
pub mod backup;
pub mod cli;
pub mod controller;
pub mod crd;
pub mod duration;
pub mod engine;
pub mod jobs;
pub mod kubectl;
pub mod logging;
pub mod pg;
