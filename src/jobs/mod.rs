//! The operator's CronJobs: their manifests ([`cronjob`], for the refresh and the backup
//! jobs) and the refresh command they run ([`refresh`]); the backup commands are
//! [`crate::backup`].

pub mod cronjob;
pub mod pitr;
pub mod refresh;
