//! Replica probes: the I/O half of replica health. Each declared replica is connected to
//! with its own URL, all at once, each under one bounded timeout (connect and query
//! together), so a replica that is down or silently dropping packets never holds up the
//! run. What each replica says goes to the pure planner as a [`Probe`].

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use sqlx::Connection;

use crate::api::ReplicasSpec;
use crate::engine::areas::replicas::{Lsn, Probe, ProbeResult, ReplicaSide};

/// Default bound on one replica check (connect + query).
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// How to reach the replicas: a libpq URI per replica name. Its `Debug` shows names only.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct ReplicaTargets {
    pub urls: BTreeMap<String, String>,
    /// Bound on each replica's check; the checks run concurrently.
    pub timeout: Duration,
}

impl Default for ReplicaTargets {
    fn default() -> Self {
        ReplicaTargets {
            urls: BTreeMap::new(),
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

impl fmt::Debug for ReplicaTargets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplicaTargets")
            .field("names", &self.urls.keys().collect::<Vec<_>>())
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// `DBPOLICY_REPLICA_<NAME>_URL`: the name upper-cased, every other character than a
/// letter or digit turned into `_` (`read-1` → `DBPOLICY_REPLICA_READ_1_URL`).
pub(crate) fn env_var_name(replica: &str) -> String {
    let name: String = replica
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("DBPOLICY_REPLICA_{name}_URL")
}

/// An argument that is not `NAME=URL`. Never echoes the argument: it may hold a password.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("expected NAME=URL (e.g. replica-1=postgres://reader@host:5432/app)")]
pub(crate) struct NotNameUrl;

/// Parses `NAME=URL`.
pub(crate) fn parse_name_url(s: &str) -> Result<(String, String), NotNameUrl> {
    match s.split_once('=') {
        Some((name, url)) if !name.is_empty() && !url.is_empty() => {
            Ok((name.to_string(), url.to_string()))
        }
        _ => Err(NotNameUrl),
    }
}

/// The one query run on a replica. `pg_is_wal_replay_paused()` raises outside recovery,
/// hence the CASE (volatile functions in a CASE branch are only called when taken).
const PROBE_SQL: &str = "SELECT pg_is_in_recovery(),
       pg_last_wal_receive_lsn()::text,
       pg_last_wal_replay_lsn()::text,
       CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused() END,
       extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8,
       (SELECT status FROM pg_stat_wal_receiver LIMIT 1),
       (SELECT slot_name FROM pg_stat_wal_receiver LIMIT 1)";

type ProbeRow = (
    bool,
    Option<String>,
    Option<String>,
    Option<bool>,
    Option<f64>,
    Option<String>,
    Option<String>,
);

/// Checks every replica of the spec concurrently. Replicas without a URL are reported as
/// not checked; none is left out.
pub(crate) async fn probe_all(
    spec: Option<&ReplicasSpec>,
    targets: &ReplicaTargets,
) -> BTreeMap<String, Probe> {
    let Some(spec) = spec else {
        return BTreeMap::new();
    };
    let checks = spec.replicas.iter().map(|r| {
        let url = targets.urls.get(&r.name).cloned();
        let name = r.name.clone();
        let timeout = targets.timeout;
        async move {
            let probe = match url {
                None => Probe {
                    checked_at: None,
                    result: ProbeResult::NotChecked {
                        reason: "no connection URL for it".into(),
                    },
                },
                Some(url) => probe_one(&url, timeout).await,
            };
            (name, probe)
        }
    });
    futures::future::join_all(checks)
        .await
        .into_iter()
        .collect()
}

/// Connects to one replica and asks it about itself, all within `timeout`. A URL that does
/// not parse is a configuration problem, like a missing Secret: the replica is not checked
/// (Unknown), rather than reported Unreachable (so `Ready` treats both alike).
pub(crate) async fn probe_one(url: &str, timeout: Duration) -> Probe {
    if url.parse::<sqlx::postgres::PgConnectOptions>().is_err() {
        return Probe {
            checked_at: None,
            result: ProbeResult::NotChecked {
                reason: "its connection URL is not a valid libpq URI".into(),
            },
        };
    }
    let result = match tokio::time::timeout(timeout, query(url)).await {
        Ok(Ok(side)) => ProbeResult::Reached(side),
        Ok(Err(e)) => ProbeResult::Unreachable {
            message: e.to_string(),
        },
        Err(_) => ProbeResult::Unreachable {
            message: format!(
                "{}: no answer within {}",
                target(url),
                crate::units::duration(timeout)
            ),
        },
    };
    Probe {
        checked_at: Some(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
        result,
    }
}

/// Why a replica that was reached in time could not say where it stands (the probe then
/// reports it Unreachable). Neither variant ever shows the password.
#[derive(Debug, thiserror::Error)]
enum QueryError {
    /// Its errors name host, port and database only.
    #[error(transparent)]
    Connect(#[from] crate::pg::ConnectError),
    #[error("{target}: checking recovery state failed: {message}")]
    RecoveryState { target: String, message: String },
}

async fn query(url: &str) -> Result<ReplicaSide, QueryError> {
    let mut conn = crate::pg::connect_one(url).await?;
    let row: Result<ProbeRow, _> = sqlx::query_as(PROBE_SQL).fetch_one(&mut conn).await;
    let _ = conn.close().await;
    let (in_recovery, receive, replay, paused, age, status, slot) =
        row.map_err(|e| QueryError::RecoveryState {
            target: target(url),
            message: crate::pg::error_summary(&e),
        })?;
    Ok(ReplicaSide {
        in_recovery,
        receive_lsn: receive.as_deref().and_then(Lsn::parse),
        replay_lsn: replay.as_deref().and_then(Lsn::parse),
        replay_paused: paused,
        last_replay_age_seconds: age,
        receiver_status: status,
        receiver_slot: slot,
    })
}

/// `host:port/db` of a URL, for messages (never user or password).
fn target(url: &str) -> String {
    match url.parse::<sqlx::postgres::PgConnectOptions>() {
        Ok(o) => format!(
            "{}:{}/{}",
            o.get_host(),
            o.get_port(),
            o.get_database().unwrap_or("(default)")
        ),
        Err(_) => "(invalid replica URL)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ReplicaSpec, SecretKeyRef};

    #[test]
    fn env_var_names() {
        assert_eq!(env_var_name("read-1"), "DBPOLICY_REPLICA_READ_1_URL");
        assert_eq!(env_var_name("eu.west"), "DBPOLICY_REPLICA_EU_WEST_URL");
    }

    #[test]
    fn name_url_pairs_never_echo_the_url() {
        assert_eq!(
            parse_name_url("r1=postgres://u:p@h/db?x=1").unwrap(),
            ("r1".into(), "postgres://u:p@h/db?x=1".into())
        );
        let e = parse_name_url("postgres://u:hunter2@h/db").unwrap_err();
        assert!(!e.to_string().contains("hunter2"));
        assert!(parse_name_url("r1=").is_err());
    }

    #[test]
    fn debug_hides_urls() {
        let t = ReplicaTargets {
            urls: BTreeMap::from([("r".into(), "postgres://u:hunter2@h/db".into())]),
            ..Default::default()
        };
        assert!(!format!("{t:?}").contains("hunter2"));
    }

    #[tokio::test]
    async fn a_replica_that_never_answers_is_cut_off_at_the_timeout() {
        // Accepts TCP connections (the kernel does) but never speaks: a black hole.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let spec = ReplicasSpec {
            replicas: vec![ReplicaSpec {
                name: "hole".into(),
                connection_secret_ref: SecretKeyRef {
                    name: "s".into(),
                    key: None,
                },
                ..Default::default()
            }],
            ..Default::default()
        };
        let targets = ReplicaTargets {
            urls: BTreeMap::from([(
                "hole".into(),
                format!("postgres://u:hunter2@127.0.0.1:{port}/db?sslmode=disable"),
            )]),
            timeout: Duration::from_millis(300),
        };
        let started = std::time::Instant::now();
        let probes = probe_all(Some(&spec), &targets).await;
        assert!(started.elapsed() < Duration::from_secs(3));
        match &probes["hole"].result {
            ProbeResult::Unreachable { message } => {
                assert!(message.contains("no answer within 300ms"), "{message}");
                assert!(!message.contains("hunter2"));
            }
            other => panic!("{other:?}"),
        }
        drop(listener);
    }

    #[tokio::test]
    async fn a_replica_without_url_is_not_checked() {
        let spec = ReplicasSpec {
            replicas: vec![ReplicaSpec {
                name: "r".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let probes = probe_all(Some(&spec), &ReplicaTargets::default()).await;
        assert!(matches!(probes["r"].result, ProbeResult::NotChecked { .. }));
        // A URL that does not parse is not checked either (like a missing Secret), and the
        // password in it shows nowhere.
        let probe = probe_one("postgres://u:hunter2@:notaport/db", Duration::from_secs(1)).await;
        match probe.result {
            ProbeResult::NotChecked { reason } => {
                assert_eq!(reason, "its connection URL is not a valid libpq URI")
            }
            other => panic!("{other:?}"),
        }
    }
}
