//! `dbpolicy refresh`: refresh materialized views, from a policy file (its
//! `materializedViews`) or from flags (what the refresh CronJob passes), one view at a time,
//! each under its own timeout, recorded in `dbpolicy.refreshes` for status.

use std::path::PathBuf;
use std::time::Duration;

use sqlx::Connection;

use crate::api::{DEFAULT_LOCK_TIMEOUT, DEFAULT_SCHEMA};
use crate::cli::PolicyFileError;
use crate::duration::{parse_duration, DurationError};
use crate::engine::areas::matviews::{self, DEFAULT_REFRESH_TIMEOUT};
use crate::pg::QualifiedName;

#[derive(clap::Args, Debug)]
pub struct RefreshArgs {
    /// Refresh the materialized views of this DatabasePolicy YAML.
    #[arg(short = 'f', long = "filename")]
    pub file: Option<PathBuf>,
    /// Only this view (`schema.name` or `name`); repeatable. Without -f, the views to refresh.
    #[arg(long = "view")]
    pub views: Vec<String>,
    /// Without -f: refresh CONCURRENTLY (needs a unique index on the view).
    #[arg(long)]
    pub concurrently: bool,
    /// Without -f: statement timeout of one refresh.
    #[arg(long, default_value = DEFAULT_REFRESH_TIMEOUT)]
    pub timeout: String,
    /// Without -f: lock timeout.
    #[arg(long, default_value = DEFAULT_LOCK_TIMEOUT)]
    pub lock_timeout: String,
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
}

/// One view to refresh and how.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Job {
    pub view: QualifiedName,
    pub concurrently: bool,
    pub timeout: Duration,
    pub lock_timeout: Duration,
}

fn parse_view(s: &str) -> QualifiedName {
    match s.split_once('.') {
        Some((schema, name)) => QualifiedName::new(schema, name),
        None => QualifiedName::new(DEFAULT_SCHEMA, s),
    }
}

/// Why the arguments name no refresh to run.
#[derive(Debug, thiserror::Error)]
pub(crate) enum JobsError {
    #[error("nothing to refresh: pass -f POLICY.yaml or --view NAME")]
    NothingToRefresh,
    #[error(transparent)]
    Duration(#[from] DurationError),
    #[error(transparent)]
    PolicyFile(#[from] PolicyFileError),
    #[error("{0} is not a materialized view of the policy")]
    NotAView(QualifiedName),
}

/// The refreshes the arguments ask for.
pub(crate) fn jobs(args: &RefreshArgs) -> Result<Vec<Job>, JobsError> {
    let wanted: Vec<QualifiedName> = args.views.iter().map(|v| parse_view(v)).collect();
    let Some(file) = &args.file else {
        if wanted.is_empty() {
            return Err(JobsError::NothingToRefresh);
        }
        let timeout = parse_duration(&args.timeout)?;
        let lock_timeout = parse_duration(&args.lock_timeout)?;
        return Ok(wanted
            .into_iter()
            .map(|view| Job {
                view,
                concurrently: args.concurrently,
                timeout,
                lock_timeout,
            })
            .collect());
    };
    let text = std::fs::read_to_string(file).map_err(|source| PolicyFileError::Read {
        what: file.display().to_string(),
        source,
    })?;
    let (policies, _) = crate::cli::parse_policies(&text)?;
    let mut jobs = Vec::new();
    for p in &policies {
        let lock_timeout = parse_duration(p.spec.lock_timeout())?;
        for v in p.spec.materialized_views.iter().flat_map(|m| &m.views) {
            let view = matviews::view_name(v);
            if !wanted.is_empty() && !wanted.contains(&view) {
                continue;
            }
            let timeout = parse_duration(v.timeout.as_deref().unwrap_or(DEFAULT_REFRESH_TIMEOUT))?;
            jobs.push(Job {
                view,
                concurrently: v.concurrently.unwrap_or(false),
                timeout,
                lock_timeout,
            });
        }
    }
    if let Some(missing) = wanted.iter().find(|w| !jobs.iter().any(|j| &j.view == *w)) {
        return Err(JobsError::NotAView(missing.clone()));
    }
    Ok(jobs)
}

/// Exit status: 0 when every view was refreshed, 1 otherwise.
pub(crate) async fn run(args: RefreshArgs) -> u8 {
    let jobs = match jobs(&args) {
        Ok(j) => j,
        Err(e) => {
            eprintln!("error: {e}");
            return 1;
        }
    };
    let Some(url) = args.database_url.as_deref() else {
        eprintln!("error: no database: pass --database-url or set DATABASE_URL");
        return 1;
    };
    let mut conn = match crate::pg::connect_one(url).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return 1;
        }
    };
    let mut code = 0;
    for job in jobs {
        match matviews::refresh(
            &mut conn,
            &job.view,
            job.concurrently,
            job.timeout,
            job.lock_timeout,
        )
        .await
        {
            Ok(done) => println!(
                "refreshed {}{} in {:.3}s",
                done.view,
                if done.concurrently {
                    " concurrently"
                } else {
                    ""
                },
                done.seconds
            ),
            Err(e) => {
                eprintln!("error: refresh {e}");
                code = 1;
            }
        }
    }
    let _ = conn.close().await;
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(file: Option<PathBuf>, views: &[&str]) -> RefreshArgs {
        RefreshArgs {
            file,
            views: views.iter().map(|v| v.to_string()).collect(),
            concurrently: true,
            timeout: "10m".into(),
            lock_timeout: "2s".into(),
            database_url: None,
        }
    }

    #[test]
    fn jobs_from_flags() {
        let j = jobs(&args(None, &["stats", "s.v"])).unwrap();
        assert_eq!(j[0].view, QualifiedName::new("public", "stats"));
        assert_eq!(j[1].view, QualifiedName::new("s", "v"));
        assert!(j[0].concurrently);
        assert_eq!(j[0].timeout, Duration::from_secs(600));
        assert!(jobs(&args(None, &[])).is_err());
    }

    #[test]
    fn jobs_from_a_policy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.yaml");
        std::fs::write(
            &path,
            "apiVersion: dbpolicy.dev/v1alpha1\nkind: DatabasePolicy\nmetadata: {name: p}\nspec:\n  database: {connectionSecretRef: {name: db}}\n  safety: {lockTimeout: 3s}\n  materializedViews:\n    views:\n      - {name: a, concurrently: true, timeout: 5m}\n      - {name: b}\n",
        )
        .unwrap();
        let j = jobs(&args(Some(path.clone()), &[])).unwrap();
        assert_eq!(j.len(), 2);
        assert_eq!(
            j[0],
            Job {
                view: QualifiedName::new("public", "a"),
                concurrently: true,
                timeout: Duration::from_secs(300),
                lock_timeout: Duration::from_secs(3)
            }
        );
        assert!(!j[1].concurrently);
        assert_eq!(jobs(&args(Some(path.clone()), &["b"])).unwrap().len(), 1);
        assert!(jobs(&args(Some(path), &["c"]))
            .unwrap_err()
            .to_string()
            .contains("public.c"));
    }
}
