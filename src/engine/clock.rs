//! The engine's clock, read once per reconcile. `DBPOLICY_NOW` (RFC 3339, e.g.
//! `2024-03-15T00:00:00Z`) replaces it, for tests that move time (partition premake and
//! retention); it is not meant for production and is logged when set.

use chrono::{DateTime, Utc};

pub(crate) const NOW_ENV: &str = "DBPOLICY_NOW";

/// `DBPOLICY_NOW` does not hold an RFC 3339 instant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{NOW_ENV}={value:?} is not an RFC 3339 instant: {why}")]
pub(crate) struct ClockError {
    pub value: String,
    pub why: String,
}

/// Now, or the instant `DBPOLICY_NOW` says.
pub(crate) fn now() -> Result<DateTime<Utc>, ClockError> {
    match std::env::var(NOW_ENV) {
        Ok(v) if !v.is_empty() => {
            let t = DateTime::parse_from_rfc3339(&v)
                .map_err(|e| ClockError {
                    why: e.to_string(),
                    value: v.clone(),
                })?
                .with_timezone(&Utc);
            tracing::warn!("{NOW_ENV} is set: the clock reads {t} (for testing only)");
            Ok(t)
        }
        _ => Ok(Utc::now()),
    }
}
