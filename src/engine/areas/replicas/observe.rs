//! What the primary says about its slots and senders (two queries), and what the probes
//! of the replicas found.

use std::fmt;

use super::*;

/// A WAL position (`pg_lsn`), compared and subtracted without asking the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl Lsn {
    /// Parses PostgreSQL's `XXXXXXXX/XXXXXXXX` text form.
    pub(crate) fn parse(s: &str) -> Option<Lsn> {
        let (hi, lo) = s.split_once('/')?;
        let hi = u64::from_str_radix(hi, 16).ok()?;
        let lo = u64::from_str_radix(lo, 16).ok()?;
        if hi > u32::MAX as u64 || lo > u32::MAX as u64 {
            return None;
        }
        Some(Lsn((hi << 32) | lo))
    }
    /// Bytes from `earlier` to `self`; zero when `earlier` is ahead (a replica on another
    /// timeline, or positions read a moment apart).
    pub(crate) fn bytes_since(self, earlier: Lsn) -> i64 {
        i64::try_from(self.0.saturating_sub(earlier.0)).unwrap_or(i64::MAX)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

/// One row of `pg_replication_slots`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Slot {
    /// `physical` or `logical`.
    pub slot_type: String,
    pub temporary: bool,
    pub active: bool,
    pub active_pid: Option<i32>,
    /// `reserved`, `extended`, `unreserved` or `lost` (PostgreSQL 13+); None when the slot
    /// reserves no WAL.
    pub wal_status: Option<String>,
    /// WAL the slot keeps from being removed: current LSN − `restart_lsn`.
    pub retained_bytes: Option<i64>,
}

/// One row of `pg_stat_replication`: a WAL sender feeding a standby.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Sender {
    pub pid: i32,
    pub application_name: String,
    pub client_addr: Option<String>,
    /// `streaming`, `catchup`, `startup`, `backup`, `stopping`; None without the
    /// privilege to read it (`pg_read_all_stats`).
    pub state: Option<String>,
    pub replay_lsn: Option<Lsn>,
    /// `replay_lag`: measured by the primary from the standby's replies; None once the
    /// standby has caught up on an idle primary.
    pub replay_lag_seconds: Option<f64>,
    /// Current LSN − `replay_lsn`, on the primary.
    pub replay_lag_bytes: Option<i64>,
}

/// What a replica says about itself, in one query on the replica.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ReplicaSide {
    pub in_recovery: bool,
    pub receive_lsn: Option<Lsn>,
    pub replay_lsn: Option<Lsn>,
    pub replay_paused: Option<bool>,
    /// `now() - pg_last_xact_replay_timestamp()`: grows on an idle primary too, so only
    /// used when the replica has not replayed all it received.
    pub last_replay_age_seconds: Option<f64>,
    /// `pg_stat_wal_receiver.status` (`streaming`, …); None when no WAL receiver runs.
    pub receiver_status: Option<String>,
    /// The slot the replica streams through, as it reports it.
    pub receiver_slot: Option<String>,
}

/// The outcome of checking one replica.
#[derive(Debug, Clone, PartialEq)]
pub enum ProbeResult {
    /// Nothing to connect with (no URL given for it).
    NotChecked {
        reason: String,
    },
    /// Connection failed or timed out; the message names host, port and database only.
    Unreachable {
        message: String,
    },
    Reached(ReplicaSide),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Probe {
    /// RFC 3339, when the check finished; None when not checked.
    pub checked_at: Option<String>,
    pub result: ProbeResult,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Observed {
    pub slots: BTreeMap<String, Slot>,
    pub senders: Vec<Sender>,
    /// The primary's current WAL position; None when the server is itself in recovery.
    pub primary_lsn: Option<Lsn>,
    pub primary_in_recovery: bool,
    /// Per replica name; filled by the front that can reach the replicas.
    pub probes: BTreeMap<String, Probe>,
}

type SlotRow = (
    String,
    String,
    bool,
    bool,
    Option<i32>,
    Option<String>,
    Option<i64>,
);
type SenderRow = (
    Option<String>,
    bool,
    Option<i32>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<f64>,
    Option<i64>,
);

/// Reads every slot and every WAL sender of the server: two queries.
pub(crate) async fn observe(conn: &mut PgConnection) -> Result<Observed, sqlx::Error> {
    let slots: Vec<SlotRow> = sqlx::query_as(
        "SELECT slot_name::text, slot_type, temporary, active, active_pid, wal_status,
                pg_wal_lsn_diff(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()
                                     ELSE pg_current_wal_lsn() END, restart_lsn)::int8
         FROM pg_replication_slots",
    )
    .fetch_all(&mut *conn)
    .await?;
    // One row even without senders: the current position comes with it.
    let senders: Vec<SenderRow> = sqlx::query_as(
        "SELECT cur.lsn::text, cur.in_recovery, r.pid, r.application_name, host(r.client_addr),
                r.state, r.replay_lsn::text, extract(epoch FROM r.replay_lag)::float8,
                pg_wal_lsn_diff(cur.lsn, r.replay_lsn)::int8
         FROM (SELECT pg_is_in_recovery() AS in_recovery,
                      CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn() END AS lsn) cur
         LEFT JOIN pg_stat_replication r ON true
         ORDER BY r.pid",
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut observed = Observed::default();
    for (name, slot_type, temporary, active, active_pid, wal_status, retained_bytes) in slots {
        observed.slots.insert(
            name,
            Slot {
                slot_type,
                temporary,
                active,
                active_pid,
                wal_status,
                retained_bytes,
            },
        );
    }
    for (lsn, in_recovery, pid, app, addr, state, replay_lsn, lag_s, lag_b) in senders {
        observed.primary_lsn = lsn.as_deref().and_then(Lsn::parse);
        observed.primary_in_recovery = in_recovery;
        if let Some(pid) = pid {
            observed.senders.push(Sender {
                pid,
                application_name: app.unwrap_or_default(),
                client_addr: addr,
                state,
                replay_lsn: replay_lsn.as_deref().and_then(Lsn::parse),
                replay_lag_seconds: lag_s,
                replay_lag_bytes: lag_b,
            });
        }
    }
    Ok(observed)
}
