//! The commands the operator's CronJobs run (`dbpolicy refresh`, later `dbpolicy backup`).

pub mod cronjob;
pub mod pitr;
pub mod refresh;
