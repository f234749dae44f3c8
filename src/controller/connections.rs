//! Database connections kept between runs: at most one per connection URL, handed to one
//! run at a time.
//!
//! Why: a fresh connection per run costs the connect (TCP, the TLS attempt of
//! `sslmode=prefer`, authentication, session start) and re-prepares every statement of the
//! observers; and runs on one database serialize on the engine's advisory lock anyway, a
//! waiter polling it with a growing pause. Here a run waits for its database's slot in
//! process (woken the moment the run before it hands the connection back) and reuses the
//! connection with its prepared statements. The advisory lock is still taken by every run:
//! it is what keeps out other operators' and the CLI's runs.
//!
//! A connection goes back only after a run that succeeded, and only once it is known
//! clean: outside any transaction, its session reset (settings, role, temporary objects,
//! cursors, LISTENs) and holding no advisory lock. Anything else — a failed run, a failed
//! reset, a run dropped half way — closes it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection, Row};
use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

use super::error::Error;
use crate::engine::EngineError;

/// Idle connections kept at most, over all URLs: beyond it a connection is closed when its
/// run ends (many databases must not mean many idle backends on the servers).
pub(crate) const MAX_IDLE: usize = 16;
/// An idle connection unused this long is closed (at the next checkout after it).
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// What a connection's session is set back to before it is kept: everything `DISCARD ALL`
/// does except `DEALLOCATE ALL` (the prepared statements are what reuse is for). Session
/// advisory locks go too, should a run's unlock have failed.
const RESET: &str = "SELECT pg_advisory_unlock_all(); CLOSE ALL; RESET ALL; \
     SET SESSION AUTHORIZATION DEFAULT; UNLISTEN *; DISCARD TEMP; DISCARD SEQUENCES";
/// True when the session is clean: sent alone in the simple protocol, it is the first
/// statement of its transaction unless one was left open (then the timestamps differ),
/// and no advisory lock is held.
const CLEAN: &str = "SELECT statement_timestamp() = transaction_timestamp() \
     AND NOT EXISTS (SELECT 1 FROM pg_locks WHERE pid = pg_backend_pid() AND locktype = 'advisory')";

#[derive(Default)]
struct Slot {
    idle: Option<(PgConnection, Instant)>,
}

/// The connections of one operator, by connection URL (held in memory only, never logged).
pub(crate) struct Connections {
    slots: Mutex<HashMap<String, Arc<AsyncMutex<Slot>>>>,
    idle: AtomicUsize,
    max_idle: usize,
    idle_timeout: Duration,
}

impl Default for Connections {
    fn default() -> Self {
        Connections::new(MAX_IDLE, IDLE_TIMEOUT)
    }
}

/// A connection lent to one run; its URL's slot is held until it is checked in or
/// dropped. Dropped without [`Connections::checkin`], the connection is closed.
pub(crate) struct Checkout {
    slot: OwnedMutexGuard<Slot>,
    conn: PgConnection,
    /// Whether the connection was kept from an earlier run (read by the tests).
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) reused: bool,
}

impl Checkout {
    pub(crate) fn conn(&mut self) -> &mut PgConnection {
        &mut self.conn
    }
}

impl Connections {
    pub(crate) fn new(max_idle: usize, idle_timeout: Duration) -> Self {
        Connections {
            slots: Mutex::new(HashMap::new()),
            idle: AtomicUsize::new(0),
            max_idle,
            idle_timeout,
        }
    }

    /// Idle connections kept now.
    pub(crate) fn idle(&self) -> usize {
        self.idle.load(Ordering::Relaxed)
    }

    fn slot(&self, url: &str) -> Arc<AsyncMutex<Slot>> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.entry(url.to_string()).or_default().clone()
    }

    /// The connection for one run on `url`: waits at most `wait` for another run on the
    /// same URL to hand it back (then `Busy`, as the engine's own lock wait would say),
    /// reuses the kept connection when it still answers, else connects.
    pub(crate) async fn checkout(&self, url: &str, wait: Duration) -> Result<Checkout, Error> {
        self.close_expired().await;
        let slot = tokio::time::timeout(wait, self.slot(url).lock_owned())
            .await
            .map_err(|_| Error::Engine(EngineError::Busy(wait)))?;
        self.checkout_locked(slot, url).await
    }

    async fn checkout_locked(
        &self,
        mut slot: OwnedMutexGuard<Slot>,
        url: &str,
    ) -> Result<Checkout, Error> {
        if let Some((mut conn, since)) = slot.idle.take() {
            self.idle.fetch_sub(1, Ordering::Relaxed);
            if since.elapsed() < self.idle_timeout && conn.ping().await.is_ok() {
                return Ok(Checkout {
                    slot,
                    conn,
                    reused: true,
                });
            }
            let _ = conn.close().await;
        }
        let conn = crate::pg::connect_one(url).await?;
        Ok(Checkout {
            slot,
            conn,
            reused: false,
        })
    }

    /// Ends a run: after a successful one (`succeeded`) the connection is kept for the
    /// next run on its URL once its session is reset and found clean, within
    /// [`MAX_IDLE`]; otherwise it is closed.
    pub(crate) async fn checkin(&self, checkout: Checkout, succeeded: bool) {
        let Checkout {
            mut slot, mut conn, ..
        } = checkout;
        // Counted before the reset, so that two runs ending at once cannot both pass
        // the limit; uncounted again when the connection is not kept.
        let counted = succeeded && self.idle.fetch_add(1, Ordering::Relaxed) < self.max_idle;
        if succeeded && !counted {
            self.idle.fetch_sub(1, Ordering::Relaxed);
        }
        let keep = counted && reset(&mut conn).await;
        if counted && !keep {
            self.idle.fetch_sub(1, Ordering::Relaxed);
        }
        if keep {
            slot.idle = Some((conn, Instant::now()));
        } else {
            let _ = conn.close().await;
        }
    }

    /// Closes the connections idle longer than the idle timeout, skipping slots in use.
    async fn close_expired(&self) {
        if self.idle() == 0 {
            return;
        }
        let slots: Vec<_> = {
            let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            slots.values().cloned().collect()
        };
        for slot in slots {
            let expired = match slot.try_lock() {
                Ok(mut s) => match &s.idle {
                    Some((_, since)) if since.elapsed() >= self.idle_timeout => {
                        self.idle.fetch_sub(1, Ordering::Relaxed);
                        s.idle.take()
                    }
                    _ => None,
                },
                Err(_) => None,
            };
            if let Some((conn, _)) = expired {
                let _ = conn.close().await;
            }
        }
    }
}

/// Resets the session of `conn` and tells whether it is clean (see [`RESET`], [`CLEAN`]).
async fn reset(conn: &mut PgConnection) -> bool {
    // A query without arguments goes in the simple protocol, as CLEAN needs.
    if sqlx::Executor::execute(&mut *conn, RESET).await.is_err() {
        return false;
    }
    match sqlx::Executor::fetch_one(&mut *conn, CLEAN).await {
        Ok(row) => row.try_get::<bool, _>(0).unwrap_or(false),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    //! Against the local PostgreSQL (`DBPOLICY_TEST_ADMIN_URL`): sessions only, no database
    //! is created.
    use super::*;

    fn url() -> String {
        std::env::var("DBPOLICY_TEST_ADMIN_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
    }

    /// A second key for the same server: slots are per URL.
    fn other_url() -> String {
        let u = url();
        let sep = if u.contains('?') { '&' } else { '?' };
        format!("{u}{sep}connect_timeout=10")
    }

    const WAIT: Duration = Duration::from_secs(600);

    async fn pid(c: &mut Checkout) -> i32 {
        sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(c.conn())
            .await
            .unwrap()
    }

    async fn scalar(c: &mut Checkout, sql: &str) -> String {
        sqlx::query_scalar(sql).fetch_one(c.conn()).await.unwrap()
    }

    #[tokio::test]
    async fn a_connection_is_kept_after_a_successful_run_with_its_session_reset() {
        let pool = Connections::default();
        let mut c = pool.checkout(&url(), WAIT).await.unwrap();
        assert!(!c.reused);
        let first = pid(&mut c).await;
        let default_timeout = scalar(&mut c, "SELECT current_setting('statement_timeout')").await;
        // What a run leaves behind: settings, a temporary twin, the advisory lock (should
        // its unlock have failed), a cached prepared statement.
        sqlx::raw_sql(
            "SET statement_timeout = 4321; SET lock_timeout = 1234; \
             CREATE TEMP TABLE dbpolicy_twin (a int); SELECT pg_advisory_lock(7262)",
        )
        .execute(c.conn())
        .await
        .unwrap();
        pool.checkin(c, true).await;
        assert_eq!(pool.idle(), 1);

        let mut c = pool.checkout(&url(), WAIT).await.unwrap();
        assert!(c.reused);
        assert_eq!(pool.idle(), 0);
        assert_eq!(pid(&mut c).await, first, "the same backend");
        assert_eq!(
            scalar(&mut c, "SELECT current_setting('statement_timeout')").await,
            default_timeout
        );
        let temp: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_class WHERE relname = 'dbpolicy_twin' AND relpersistence = 't'",
        )
        .fetch_one(c.conn())
        .await
        .unwrap();
        assert_eq!(temp, 0, "temporary objects are dropped");
        let locks: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid() AND locktype = 'advisory'",
        )
        .fetch_one(c.conn())
        .await
        .unwrap();
        assert_eq!(locks, 0, "no advisory lock survives the checkin");
        pool.checkin(c, false).await;
    }

    #[tokio::test]
    async fn a_failed_run_closes_its_connection() {
        let pool = Connections::default();
        let mut c = pool.checkout(&url(), WAIT).await.unwrap();
        let first = pid(&mut c).await;
        pool.checkin(c, false).await;
        assert_eq!(pool.idle(), 0);
        let mut c = pool.checkout(&url(), WAIT).await.unwrap();
        assert!(!c.reused);
        assert_ne!(pid(&mut c).await, first);
        pool.checkin(c, false).await;
    }

    #[tokio::test]
    async fn a_connection_left_in_a_transaction_is_closed() {
        for open in [
            "BEGIN; SELECT pg_advisory_xact_lock(7263)",
            "BEGIN; SELECT 1/0",
        ] {
            let pool = Connections::default();
            let mut c = pool.checkout(&url(), WAIT).await.unwrap();
            let first = pid(&mut c).await;
            let _ = sqlx::raw_sql(open).execute(c.conn()).await;
            pool.checkin(c, true).await;
            assert_eq!(pool.idle(), 0, "{open}");
            let mut c = pool.checkout(&url(), WAIT).await.unwrap();
            assert!(!c.reused, "{open}");
            assert_ne!(pid(&mut c).await, first, "{open}");
            pool.checkin(c, false).await;
        }
    }

    #[tokio::test]
    async fn one_run_per_url_at_a_time_and_a_dropped_run_closes_its_connection() {
        let pool = Connections::default();
        let mut held = pool.checkout(&url(), WAIT).await.unwrap();
        let first = pid(&mut held).await;
        match pool.checkout(&url(), Duration::ZERO).await {
            Err(Error::Engine(EngineError::Busy(_))) => {}
            Err(e) => panic!("expected Busy, got {e}"),
            Ok(_) => panic!("two runs on one URL at once"),
        }
        // Another URL is not held up.
        let other = pool.checkout(&other_url(), Duration::ZERO).await.unwrap();
        pool.checkin(other, true).await;
        // A run dropped half way (cancelled, panicked) never hands its connection back.
        drop(held);
        let mut c = pool.checkout(&url(), Duration::ZERO).await.unwrap();
        assert!(!c.reused);
        assert_ne!(pid(&mut c).await, first);
        pool.checkin(c, false).await;
    }

    #[tokio::test]
    async fn idle_connections_are_bounded_in_number_and_time() {
        let pool = Connections::new(1, IDLE_TIMEOUT);
        let a = pool.checkout(&url(), WAIT).await.unwrap();
        let b = pool.checkout(&other_url(), WAIT).await.unwrap();
        pool.checkin(a, true).await;
        pool.checkin(b, true).await;
        assert_eq!(pool.idle(), 1, "at most max_idle kept");
        let c = pool.checkout(&other_url(), WAIT).await.unwrap();
        assert!(!c.reused, "the one over the limit was closed");
        pool.checkin(c, false).await;

        let pool = Connections::new(16, Duration::ZERO);
        let a = pool.checkout(&url(), WAIT).await.unwrap();
        pool.checkin(a, true).await;
        assert_eq!(pool.idle(), 1);
        let b = pool.checkout(&other_url(), WAIT).await.unwrap();
        assert_eq!(
            pool.idle(),
            0,
            "expired idle connections are closed at a checkout"
        );
        pool.checkin(b, false).await;
        let a = pool.checkout(&url(), WAIT).await.unwrap();
        assert!(!a.reused);
        pool.checkin(a, false).await;
    }
}
