//! The read endpoint the operator publishes for applications (a Secret beside the
//! policy): the healthy replicas of `spec.replicas`, in spec order, or the primary when
//! none is healthy and `fallbackToPrimary` is set. Pure: from replica health and URLs.

use std::collections::BTreeMap;
use std::fmt;

use crate::api::{ReplicaStatus, ReplicasSpec};
use crate::engine::areas::replicas::ReplicaState;

/// Where the read endpoint points.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum ReadSource {
    /// One or more healthy replicas.
    Replicas,
    /// No replica is healthy and `fallbackToPrimary` is set.
    Primary,
    /// No replica is healthy and there is no fallback.
    None,
}

impl ReadSource {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ReadSource::Replicas => "replicas",
            ReadSource::Primary => "primary",
            ReadSource::None => "none",
        }
    }
}

/// Secret keys of the read endpoint.
pub(crate) const KEY_READ_URL: &str = "DATABASE_READ_URL";
pub(crate) const KEY_READ_URLS: &str = "DATABASE_READ_URLS";
pub(crate) const KEY_READ_SOURCE: &str = "DATABASE_READ_SOURCE";

/// The contents of the read-endpoint Secret. Holds credentials: its `Debug` shows names,
/// never URLs.
#[derive(Clone, PartialEq)]
pub struct ReadEndpoint {
    /// The first healthy replica in spec order (stable while it stays healthy), else the
    /// primary when falling back, else None.
    pub database_read_url: Option<String>,
    /// Every healthy replica, in spec order (the primary alone when falling back).
    pub healthy_urls: Vec<String>,
    /// Names of the healthy replicas, in spec order.
    pub healthy_replicas: Vec<String>,
    pub source: ReadSource,
}

impl fmt::Debug for ReadEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadEndpoint")
            .field("healthy_replicas", &self.healthy_replicas)
            .field("source", &self.source)
            .field("urls", &self.healthy_urls.len())
            .finish()
    }
}

impl ReadEndpoint {
    /// The Secret's `stringData`: `DATABASE_READ_URL` (empty when there is no endpoint, so
    /// pods that reference the key still start and can tell), `DATABASE_READ_URLS` (comma
    /// separated) and `DATABASE_READ_SOURCE` (`replicas`, `primary` or `none`).
    pub fn secret_data(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (
                KEY_READ_URL.to_string(),
                self.database_read_url.clone().unwrap_or_default(),
            ),
            (KEY_READ_URLS.to_string(), self.healthy_urls.join(",")),
            (
                KEY_READ_SOURCE.to_string(),
                self.source.as_str().to_string(),
            ),
        ])
    }
}

/// The read endpoint for applications: the healthy replicas (state `Healthy`, and a URL to
/// publish), else the primary when `fallbackToPrimary`, else nothing.
pub fn read_endpoint(
    spec: &ReplicasSpec,
    statuses: &[ReplicaStatus],
    primary_url: &str,
    replica_urls: &BTreeMap<String, String>,
) -> ReadEndpoint {
    let healthy: Vec<(&str, &str)> = spec
        .replicas
        .iter()
        .filter(|r| {
            statuses
                .iter()
                .any(|s| s.name == r.name && s.state == ReplicaState::Healthy.as_str())
        })
        .filter_map(|r| {
            replica_urls
                .get(&r.name)
                .map(|u| (r.name.as_str(), u.as_str()))
        })
        .collect();
    if !healthy.is_empty() {
        return ReadEndpoint {
            database_read_url: Some(healthy[0].1.to_string()),
            healthy_urls: healthy.iter().map(|(_, u)| u.to_string()).collect(),
            healthy_replicas: healthy.iter().map(|(n, _)| n.to_string()).collect(),
            source: ReadSource::Replicas,
        };
    }
    if spec.fallback_to_primary.unwrap_or(false) {
        return ReadEndpoint {
            database_read_url: Some(primary_url.to_string()),
            healthy_urls: vec![primary_url.to_string()],
            healthy_replicas: Vec::new(),
            source: ReadSource::Primary,
        };
    }
    ReadEndpoint {
        database_read_url: None,
        healthy_urls: Vec::new(),
        healthy_replicas: Vec::new(),
        source: ReadSource::None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ReplicaSpec, SecretKeyRef};

    fn replica(name: &str) -> ReplicaSpec {
        ReplicaSpec {
            name: name.into(),
            connection_secret_ref: SecretKeyRef {
                name: format!("{name}-conn"),
                key: None,
            },
            slot: None,
            max_lag_seconds: None,
            max_lag_bytes: None,
        }
    }

    fn spec(replicas: Vec<ReplicaSpec>) -> ReplicasSpec {
        ReplicasSpec {
            replicas,
            ..Default::default()
        }
    }

    fn st(name: &str, state: ReplicaState) -> ReplicaStatus {
        ReplicaStatus {
            name: name.into(),
            state: state.as_str().into(),
            ..Default::default()
        }
    }

    fn urls() -> BTreeMap<String, String> {
        BTreeMap::from([
            ("a".to_string(), "postgres://u:pw@a/db".to_string()),
            ("b".to_string(), "postgres://u:pw@b/db".to_string()),
        ])
    }

    #[test]
    fn read_endpoint_lists_healthy_replicas_in_spec_order() {
        let s = spec(vec![replica("b"), replica("a")]);
        let e = read_endpoint(
            &s,
            &[
                st("a", ReplicaState::Healthy),
                st("b", ReplicaState::Healthy),
            ],
            "postgres://primary/db",
            &urls(),
        );
        assert_eq!(e.source, ReadSource::Replicas);
        assert_eq!(e.database_read_url.as_deref(), Some("postgres://u:pw@b/db"));
        assert_eq!(e.healthy_replicas, ["b", "a"]);
        let data = e.secret_data();
        assert_eq!(
            data[KEY_READ_URLS],
            "postgres://u:pw@b/db,postgres://u:pw@a/db"
        );
        assert_eq!(data[KEY_READ_SOURCE], "replicas");
    }

    #[test]
    fn read_endpoint_drops_unhealthy_and_unknown_replicas() {
        let s = spec(vec![replica("a"), replica("b")]);
        let e = read_endpoint(
            &s,
            &[
                st("a", ReplicaState::Lagging),
                st("b", ReplicaState::Healthy),
            ],
            "postgres://primary/db",
            &urls(),
        );
        assert_eq!(e.healthy_urls, ["postgres://u:pw@b/db"]);
        for bad in [
            ReplicaState::Lagging,
            ReplicaState::Unreachable,
            ReplicaState::NotInRecovery,
            ReplicaState::Unknown,
        ] {
            let e = read_endpoint(&s, &[st("a", bad), st("b", bad)], "p", &urls());
            assert_eq!(e.source, ReadSource::None, "{bad:?}");
        }
    }

    #[test]
    fn read_endpoint_falls_back_to_the_primary_only_when_asked() {
        let mut s = spec(vec![replica("a")]);
        let down = [st("a", ReplicaState::Unreachable)];
        let none = read_endpoint(&s, &down, "postgres://primary/db", &urls());
        assert_eq!(none.database_read_url, None);
        assert_eq!(none.secret_data()[KEY_READ_URL], "");
        assert_eq!(none.secret_data()[KEY_READ_URLS], "");
        assert_eq!(none.secret_data()[KEY_READ_SOURCE], "none");
        s.fallback_to_primary = Some(true);
        let fb = read_endpoint(&s, &down, "postgres://primary/db", &urls());
        assert_eq!(fb.source, ReadSource::Primary);
        assert_eq!(
            fb.database_read_url.as_deref(),
            Some("postgres://primary/db")
        );
        assert_eq!(fb.healthy_urls, ["postgres://primary/db"]);
        // Healthy replicas win over the fallback.
        let ok = read_endpoint(&s, &[st("a", ReplicaState::Healthy)], "p", &urls());
        assert_eq!(ok.source, ReadSource::Replicas);
    }

    #[test]
    fn read_endpoint_skips_healthy_replicas_without_a_url_and_hides_urls_in_debug() {
        let s = spec(vec![replica("c"), replica("a")]);
        let e = read_endpoint(
            &s,
            &[
                st("c", ReplicaState::Healthy),
                st("a", ReplicaState::Healthy),
            ],
            "p",
            &urls(),
        );
        assert_eq!(e.healthy_replicas, ["a"]);
        assert!(!format!("{e:?}").contains("pw"));
    }
}
