//! What the primary says about the receiver's replication slot: whether a receiver streams
//! through it, how much WAL it holds back, and how far the receiver is behind. One query,
//! readable by any role (`pg_replication_slots`; `pg_stat_replication`'s positions need
//! `pg_read_all_stats` or the same role as the receiver, and fall back to the slot's).

use serde::Serialize;

/// The slot as the server reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SlotFacts {
    pub active: bool,
    /// `pg_current_wal_lsn() - restart_lsn`: WAL the server keeps for the slot (None
    /// before the slot has reserved any).
    pub retained_bytes: Option<i64>,
    /// `pg_current_wal_lsn()` minus what the receiver reported durable (its `flush_lsn`
    /// when visible, else the slot's `restart_lsn`, which the server advances to it).
    pub lag_bytes: Option<i64>,
}

const QUERY: &str = "\
SELECT s.active,
       pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn)::bigint AS retained,
       pg_wal_lsn_diff(pg_current_wal_lsn(), COALESCE(r.flush_lsn, s.restart_lsn))::bigint AS lag
  FROM pg_replication_slots s
  LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid
 WHERE s.slot_name = $1 AND s.slot_type = 'physical'";

/// The physical slot `slot`, None when it does not exist (the receiver creates it when it
/// starts). Run on the primary: `pg_current_wal_lsn()` fails during recovery.
pub async fn observe(
    conn: &mut sqlx::PgConnection,
    slot: &str,
) -> Result<Option<SlotFacts>, sqlx::Error> {
    let row: Option<(bool, Option<i64>, Option<i64>)> = sqlx::query_as(QUERY)
        .bind(slot)
        .fetch_optional(conn)
        .await?;
    Ok(row.map(|(active, retained_bytes, lag_bytes)| SlotFacts {
        active,
        retained_bytes,
        lag_bytes,
    }))
}
