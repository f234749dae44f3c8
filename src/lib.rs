//! dbpolicy: reconcile a `DatabasePolicy` against a live PostgreSQL database.
//!
//! One engine (observe → plan → apply, in [`engine`]) serves the CLI ([`cli`]) and the
//! Kubernetes [`controller`]; the backup and refresh jobs ([`backup`], [`jobs`]) run beside
//! it, as CronJobs the controller keeps. See docs/architecture.md.

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
pub mod policy_yaml;
pub mod reason;
pub mod units;
