//! Replicas: the physical replication slots a policy keeps on the primary, the health and
//! lag of each declared replica, and the read endpoint published for applications.
//!
//! The primary is observed with two queries whatever the number of replicas or slots (one
//! over `pg_replication_slots`, one over `pg_stat_replication`). What the replicas say
//! about themselves is probed by [`crate::engine::replica_health`] (I/O on other
//! servers) and handed in as [`Probe`]s: everything here is pure.
//!
//! Slots are created with their WAL reserved at once and recorded in the ledger; only
//! slots the ledger says this policy created are ever dropped, and only as destructive
//! changes. Slots the policy did not create are never touched, but every inactive slot
//! that retains WAL is reported loudly: it keeps WAL until the disk fills.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use sqlx::PgConnection;

use crate::api::{ReplicaSpec, ReplicaStatus, ReplicasSpec};
use crate::engine::areas::{AreaModule, Facts, ObserveContext, ObserveError, PlanContext};
use crate::engine::ledger::Ledger;
use crate::engine::plan::{Area, AreaPlan, Change, Hazard};
use crate::pg::quote_literal;
use crate::reason::Reason;

const AREA: Area = Area::Replicas;
/// Ledger item of a slot; the ledger target is the slot name.
pub const OWNED_SLOT: &str = "physicalSlot";

// ---------------------------------------------------------------- observed

/// A WAL position (`pg_lsn`), compared and subtracted without asking the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl Lsn {
    /// Parses PostgreSQL's `XXXXXXXX/XXXXXXXX` text form.
    pub fn parse(s: &str) -> Option<Lsn> {
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
    pub fn bytes_since(self, earlier: Lsn) -> i64 {
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
pub async fn observe(conn: &mut PgConnection) -> Result<Observed, sqlx::Error> {
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

// ---------------------------------------------------------------- health (pure)

/// The health of one replica, as status reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub enum ReplicaState {
    /// In recovery and within its lag limits.
    Healthy,
    /// Over `maxLagSeconds` or `maxLagBytes`.
    Lagging,
    /// Could not be connected to within the timeout.
    Unreachable,
    /// Reachable but not a standby (promoted, or pointed at the wrong server).
    NotInRecovery,
    /// Not checked: nothing to connect with.
    Unknown,
}

impl ReplicaState {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaState::Healthy => "Healthy",
            ReplicaState::Lagging => "Lagging",
            ReplicaState::Unreachable => "Unreachable",
            ReplicaState::NotInRecovery => "NotInRecovery",
            ReplicaState::Unknown => "Unknown",
        }
    }
    /// The notice (and condition) reason of an unhealthy state.
    pub fn reason(self) -> Option<Reason> {
        match self {
            ReplicaState::Healthy => None,
            ReplicaState::Lagging => Some(Reason::ReplicaLagging),
            ReplicaState::Unreachable => Some(Reason::ReplicaUnreachable),
            ReplicaState::NotInRecovery => Some(Reason::ReplicaNotInRecovery),
            ReplicaState::Unknown => Some(Reason::ReplicaNotChecked),
        }
    }
}

/// Where a lag figure was measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum LagSource {
    /// `pg_stat_replication` on the primary.
    Primary,
    /// The replica's own replay position and timestamp.
    Replica,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaHealth {
    pub name: String,
    pub state: ReplicaState,
    pub lag_seconds: Option<f64>,
    pub lag_seconds_source: Option<LagSource>,
    pub lag_bytes: Option<i64>,
    pub lag_bytes_source: Option<LagSource>,
    pub slot: Option<String>,
    /// The WAL sender on the primary feeding this replica, when one could be matched.
    pub streaming: Option<String>,
    pub replay_paused: bool,
    pub checked_at: Option<String>,
    /// Why it is not healthy, for people.
    pub detail: Option<String>,
}

/// The WAL sender feeding a replica: through its slot (the slot's `active_pid`), else the
/// only sender whose `application_name` is the replica's name.
fn sender_for<'a>(
    replica: &ReplicaSpec,
    side: Option<&ReplicaSide>,
    observed: &'a Observed,
) -> Option<&'a Sender> {
    let slot_names = replica
        .slot
        .as_deref()
        .into_iter()
        .chain(side.and_then(|s| s.receiver_slot.as_deref()));
    for slot in slot_names {
        if let Some(pid) = observed.slots.get(slot).and_then(|s| s.active_pid) {
            if let Some(sender) = observed.senders.iter().find(|s| s.pid == pid) {
                return Some(sender);
            }
        }
    }
    let mut by_name = observed
        .senders
        .iter()
        .filter(|s| s.application_name == replica.name);
    match (by_name.next(), by_name.next()) {
        (Some(s), None) => Some(s),
        _ => None,
    }
}

/// A lag figure and where it was measured.
type Measured<T> = Option<(T, LagSource)>;

/// Lag in time and bytes, preferring what the primary measured: `replay_lag` comes from
/// the standby's own replies and does not grow while an idle primary writes nothing,
/// whereas the replica's last replay timestamp does. One exception: `replay_lag` is only
/// re-measured when replay moves, so while replay is paused behind received WAL it shows
/// the last (small) value; there the replica's replay age is the truth.
fn measure(
    sender: Option<&Sender>,
    side: Option<&ReplicaSide>,
    primary_lsn: Option<Lsn>,
) -> (Measured<f64>, Measured<i64>) {
    let caught_up_on_primary =
        sender.is_some_and(|s| matches!((s.replay_lsn, primary_lsn), (Some(r), Some(p)) if r >= p));
    let on_replica = side.and_then(|r| match (r.receive_lsn, r.replay_lsn) {
        // Everything received is replayed: behind only by what has not arrived, which
        // the byte lag shows; the replay timestamp would only measure idleness.
        (Some(recv), Some(replay)) if replay >= recv => Some((0.0, LagSource::Replica)),
        _ => r
            .last_replay_age_seconds
            .map(|v| (v.max(0.0), LagSource::Replica)),
    });
    let paused_behind = side.is_some_and(|r| {
        r.replay_paused == Some(true)
            && matches!((r.receive_lsn, r.replay_lsn), (Some(recv), Some(replay)) if replay < recv)
    });
    let seconds = match sender {
        _ if paused_behind && on_replica.is_some() => on_replica,
        Some(s) if s.replay_lag_seconds.is_some() => s
            .replay_lag_seconds
            .map(|v| (v.max(0.0), LagSource::Primary)),
        Some(_) if caught_up_on_primary => Some((0.0, LagSource::Primary)),
        _ => on_replica,
    };
    let bytes = match sender.and_then(|s| s.replay_lag_bytes) {
        Some(b) => Some((b.max(0), LagSource::Primary)),
        None => match (primary_lsn, side.and_then(|r| r.replay_lsn)) {
            (Some(p), Some(r)) => Some((p.bytes_since(r), LagSource::Replica)),
            _ => None,
        },
    };
    (seconds, bytes)
}

/// Each declared replica's health, from the primary's view and the replica's probe.
pub fn health(spec: &ReplicasSpec, observed: &Observed) -> Vec<ReplicaHealth> {
    spec.replicas
        .iter()
        .map(|replica| replica_health(replica, observed))
        .collect()
}

fn replica_health(replica: &ReplicaSpec, observed: &Observed) -> ReplicaHealth {
    let ReplicaSpec {
        name,
        connection_secret_ref: _,
        slot,
        max_lag_seconds,
        max_lag_bytes,
    } = replica;
    let probe = observed.probes.get(name);
    let side = match probe.map(|p| &p.result) {
        Some(ProbeResult::Reached(side)) => Some(side),
        _ => None,
    };
    let sender = sender_for(replica, side, observed);
    let (seconds, bytes) = measure(sender, side, observed.primary_lsn);
    let mut detail = None;
    let state = match probe.map(|p| &p.result) {
        None => {
            detail = Some("not checked: no connection URL for it".to_string());
            ReplicaState::Unknown
        }
        Some(ProbeResult::NotChecked { reason }) => {
            detail = Some(format!("not checked: {reason}"));
            ReplicaState::Unknown
        }
        Some(ProbeResult::Unreachable { message }) => {
            detail = Some(message.clone());
            ReplicaState::Unreachable
        }
        Some(ProbeResult::Reached(side)) if !side.in_recovery => {
            detail = Some(
                "the server is not in recovery (promoted, or not a standby): not a read replica"
                    .to_string(),
            );
            ReplicaState::NotInRecovery
        }
        Some(ProbeResult::Reached(_)) => {
            let mut over = Vec::new();
            if let (Some(max), Some((lag, _))) = (max_lag_seconds, seconds) {
                if lag > f64::from(*max) {
                    over.push(format!("replay lag {lag:.1}s exceeds maxLagSeconds {max}"));
                }
            }
            if let (Some(max), Some((lag, _))) = (max_lag_bytes, bytes) {
                if u64::try_from(lag).unwrap_or(0) > *max {
                    over.push(format!(
                        "replay lag {} ({lag} bytes) exceeds maxLagBytes {max}",
                        human_bytes(lag)
                    ));
                }
            }
            if over.is_empty() {
                ReplicaState::Healthy
            } else {
                detail = Some(over.join("; "));
                ReplicaState::Lagging
            }
        }
    };
    let replay_paused = side.and_then(|s| s.replay_paused).unwrap_or(false);
    if replay_paused {
        let note = "replay is paused on the replica (pg_wal_replay_resume() resumes it)";
        detail = Some(match detail {
            Some(d) => format!("{d}; {note}"),
            None => note.to_string(),
        });
    }
    ReplicaHealth {
        name: name.clone(),
        state,
        lag_seconds: seconds.map(|(v, _)| v),
        lag_seconds_source: seconds.map(|(_, s)| s),
        lag_bytes: bytes.map(|(v, _)| v),
        lag_bytes_source: bytes.map(|(_, s)| s),
        slot: slot.clone(),
        streaming: sender.map(|s| {
            format!(
                "pid {} from {} ({})",
                s.pid,
                s.client_addr.as_deref().unwrap_or("local socket"),
                s.state.as_deref().unwrap_or("state hidden")
            )
        }),
        replay_paused,
        checked_at: probe.and_then(|p| p.checked_at.clone()),
        detail,
    }
}

/// Per-replica status for `status.replicas`. Lag seconds are rounded to milliseconds.
pub fn status(spec: &ReplicasSpec, observed: &Observed) -> Vec<ReplicaStatus> {
    health(spec, observed).iter().map(to_status).collect()
}

pub fn to_status(h: &ReplicaHealth) -> ReplicaStatus {
    ReplicaStatus {
        name: h.name.clone(),
        state: h.state.as_str().to_string(),
        lag_seconds: h.lag_seconds.map(|s| (s * 1000.0).round() / 1000.0),
        lag_bytes: h.lag_bytes,
        slot: h.slot.clone(),
        last_check_time: h.checked_at.clone(),
    }
}

/// What the `ReplicasReady` condition says: `Ok` when every replica is healthy, else the
/// reason of the worst state (`ReplicaNotInRecovery` > `ReplicaUnreachable` >
/// `ReplicaLagging` > `ReplicaNotChecked`) and a message naming every unhealthy replica.
pub fn readiness(statuses: &[ReplicaStatus]) -> Result<(), (Reason, String)> {
    let unhealthy: Vec<(ReplicaState, &ReplicaStatus)> = statuses
        .iter()
        .map(|s| (parse_state(&s.state), s))
        .filter(|(state, _)| *state != ReplicaState::Healthy)
        .collect();
    let rank = |s: ReplicaState| match s {
        ReplicaState::NotInRecovery => 4,
        ReplicaState::Unreachable => 3,
        ReplicaState::Lagging => 2,
        ReplicaState::Unknown => 1,
        ReplicaState::Healthy => 0,
    };
    let Some(worst) = unhealthy.iter().map(|(s, _)| *s).max_by_key(|s| rank(*s)) else {
        return Ok(());
    };
    let message = unhealthy
        .iter()
        .map(|(state, s)| format!("{} is {}", s.name, state.as_str()))
        .collect::<Vec<_>>()
        .join(", ");
    Err((worst.reason().unwrap_or(Reason::ReplicaNotChecked), message))
}

fn parse_state(s: &str) -> ReplicaState {
    [
        ReplicaState::Healthy,
        ReplicaState::Lagging,
        ReplicaState::Unreachable,
        ReplicaState::NotInRecovery,
    ]
    .into_iter()
    .find(|st| st.as_str() == s)
    .unwrap_or(ReplicaState::Unknown)
}

/// A replica whose state changed between two checks (for Events: "crossed its lag limit",
/// "unreachable", "healthy again").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub name: String,
    /// None when the replica was not in the previous status.
    pub from: Option<String>,
    pub to: String,
    /// Whether it became healthy (a Normal event) or stopped being (a Warning).
    pub healthy: bool,
}

/// The replicas whose state changed from `previous` to `current`. A replica first seen
/// is a transition only when it is not healthy (nothing to tell about a healthy start).
pub fn transitions(previous: &[ReplicaStatus], current: &[ReplicaStatus]) -> Vec<Transition> {
    current
        .iter()
        .filter_map(|now| {
            let before = previous.iter().find(|p| p.name == now.name);
            let healthy = now.state == ReplicaState::Healthy.as_str();
            match before {
                Some(b) if b.state == now.state => None,
                None if healthy => None,
                _ => Some(Transition {
                    name: now.name.clone(),
                    from: before.map(|b| b.state.clone()),
                    to: now.state.clone(),
                    healthy,
                }),
            }
        })
        .collect()
}

fn human_bytes(n: i64) -> String {
    const UNITS: [&str; 5] = ["bytes", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} bytes")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

// ---------------------------------------------------------------- slots (pure)

/// A difference to close.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    CreateSlot { name: String },
    DropSlot { name: String },
}

/// Slot names PostgreSQL accepts (`ReplicationSlotValidateName`).
fn valid_slot_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// The slot changes, and the problems that block them.
pub fn diff(
    spec: &ReplicasSpec,
    observed: &Observed,
    ledger: &Ledger,
    plan: &mut AreaPlan,
) -> Vec<Op> {
    let mut ops = Vec::new();
    let mut declared: BTreeMap<&str, &str> = BTreeMap::new();
    for replica in &spec.replicas {
        let Some(slot) = replica.slot.as_deref() else {
            continue;
        };
        if !valid_slot_name(slot) {
            plan.error(
                slot,
                Reason::InvalidSlotName,
                format!(
                    "replica {}: slot name {slot:?} must be 1-63 lower-case letters, digits and underscores",
                    replica.name
                ),
            );
            continue;
        }
        if let Some(other) = declared.insert(slot, &replica.name) {
            plan.error(
                slot,
                Reason::DuplicateSlot,
                format!(
                    "replicas {other} and {} both declare slot {slot}: a slot feeds one standby",
                    replica.name
                ),
            );
            continue;
        }
        match observed.slots.get(slot) {
            None => ops.push(Op::CreateSlot {
                name: slot.to_string(),
            }),
            Some(s) if s.slot_type != "physical" => plan.error(
                slot,
                Reason::SlotTypeMismatch,
                format!(
                    "replica {}: slot {slot} exists but is a {} slot, not a physical one; it was not created by this policy and is left alone",
                    replica.name, s.slot_type
                ),
            ),
            Some(s) if s.wal_status.as_deref() == Some("lost") => plan.notice(
                slot,
                Reason::SlotLost,
                format!(
                    "slot {slot} of replica {} has lost WAL the standby still needs: the standby must be rebuilt (pg_basebackup)",
                    replica.name
                ),
            ),
            Some(_) => {}
        }
    }
    // Slots this policy created and no longer declares.
    let owned: BTreeSet<&str> = ledger
        .items(AREA)
        .filter(|(_, item)| *item == OWNED_SLOT)
        .map(|(target, _)| target)
        .collect();
    for name in owned {
        if declared.contains_key(name) {
            continue;
        }
        match observed.slots.get(name) {
            // Gone already (dropped by hand): nothing to do.
            None => {}
            Some(s) if s.active => plan.notice(
                name,
                Reason::SlotInUse,
                format!(
                    "slot {name} is no longer declared but a standby streams through it (pid {}): it is dropped once the standby stops using it",
                    s.active_pid.map_or("?".to_string(), |p| p.to_string())
                ),
            ),
            Some(_) => ops.push(Op::DropSlot {
                name: name.to_string(),
            }),
        }
    }
    ops
}

/// Loud notices for inactive slots that keep WAL: any slot, declared or not, created by
/// this policy or not (the disk fills all the same).
fn inactive_slot_notices(observed: &Observed, plan: &mut AreaPlan) {
    for (name, slot) in &observed.slots {
        let Some(bytes) = slot.retained_bytes.filter(|b| *b > 0) else {
            continue;
        };
        if slot.active {
            continue;
        }
        plan.notice(
            name.clone(),
            Reason::InactiveSlotRetainingWal,
            format!(
                "WARNING: inactive {} replication slot {name} retains {} ({bytes} bytes) of WAL (wal_status {}): WAL is kept until a consumer uses the slot, and can fill the disk; attach its standby, or drop the slot if it is abandoned",
                slot.slot_type,
                human_bytes(bytes),
                slot.wal_status.as_deref().unwrap_or("unknown"),
            ),
        );
    }
}

pub fn render(op: &Op) -> Change {
    match op {
        // Slot creation is not undone by a rollback: run it alone, then record it.
        Op::CreateSlot { name } => Change::new(
            AREA,
            name.clone(),
            "create physical replication slot (WAL reserved now)",
            format!(
                "SELECT pg_create_physical_replication_slot({}, true)",
                quote_literal(name)
            ),
        )
        .autonomous()
        .record(OWNED_SLOT),
        Op::DropSlot { name } => Change::new(
            AREA,
            name.clone(),
            "drop replication slot no longer declared (its standby must resync from scratch)",
            format!("SELECT pg_drop_replication_slot({})", quote_literal(name)),
        )
        .autonomous()
        .hazard(Hazard::Destructive)
        .forget(OWNED_SLOT),
    }
}

/// Slot changes plus notices: inactive slots retaining WAL and replicas not healthy.
pub fn plan(spec: &ReplicasSpec, observed: &Observed, ledger: &Ledger) -> AreaPlan {
    let mut plan = AreaPlan::new(AREA);
    if observed.primary_in_recovery {
        plan.error(
            "primary",
            Reason::PrimaryInRecovery,
            "the policy's database is in recovery (a standby): slots and replica lag are managed on the primary",
        );
        return plan;
    }
    let ops = diff(spec, observed, ledger, &mut plan);
    plan.changes = ops.iter().map(render).collect();
    inactive_slot_notices(observed, &mut plan);
    for h in health(spec, observed) {
        if let Some(reason) = h.state.reason() {
            plan.notice(
                h.name.clone(),
                reason,
                format!(
                    "replica {} is {}: {}{}",
                    h.name,
                    h.state.as_str(),
                    h.detail.as_deref().unwrap_or("no detail"),
                    lag_text(&h)
                ),
            );
        }
    }
    plan
}

fn lag_text(h: &ReplicaHealth) -> String {
    let mut parts = Vec::new();
    if let Some(s) = h.lag_seconds {
        parts.push(format!("{s:.1}s"));
    }
    if let Some(b) = h.lag_bytes {
        parts.push(format!("{b} bytes"));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!(" (lag {})", parts.join(", "))
    }
}

/// The slots as they will be after `ops` (for tests of convergence).
pub fn simulate(observed: &Observed, ops: &[Op]) -> Observed {
    let mut next = observed.clone();
    for op in ops {
        match op {
            Op::CreateSlot { name } => {
                next.slots.insert(
                    name.clone(),
                    Slot {
                        slot_type: "physical".into(),
                        wal_status: Some("reserved".into()),
                        retained_bytes: Some(0),
                        ..Default::default()
                    },
                );
            }
            Op::DropSlot { name } => {
                next.slots.remove(name);
            }
        }
    }
    next
}

// ---------------------------------------------------------------- read endpoint (pure)

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
    pub fn as_str(self) -> &'static str {
        match self {
            ReadSource::Replicas => "replicas",
            ReadSource::Primary => "primary",
            ReadSource::None => "none",
        }
    }
}

/// Secret keys of the read endpoint.
pub const KEY_READ_URL: &str = "DATABASE_READ_URL";
pub const KEY_READ_URLS: &str = "DATABASE_READ_URLS";
pub const KEY_READ_SOURCE: &str = "DATABASE_READ_SOURCE";

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

/// Replicas: the primary's physical slots for them, and their health (probed on the
/// replicas themselves, see [`crate::engine::replica_health`]).
pub struct Replicas;

impl AreaModule for Replicas {
    const AREA: Area = AREA;
    const RESETS_WHEN_REMOVED: bool = true;
    type Spec = ReplicasSpec;
    type Observed = Observed;
    type Op = Op;

    fn section(spec: &crate::api::DatabasePolicySpec) -> Option<&ReplicasSpec> {
        spec.replicas.as_ref()
    }

    /// The primary's slots and senders, then the probes of the replicas (started before
    /// the run took its lock; none when the front has no URLs for them).
    async fn observe(
        conn: &mut PgConnection,
        _section: &ReplicasSpec,
        mut ctx: ObserveContext<'_>,
    ) -> Result<Observed, ObserveError> {
        let mut observed = observe(conn).await?;
        if let Some(probes) = ctx.probes().await {
            observed.probes = probes;
        }
        Ok(observed)
    }

    fn diff(
        section: &ReplicasSpec,
        observed: &Observed,
        ctx: &PlanContext<'_>,
        plan: &mut AreaPlan,
    ) -> Vec<Op> {
        diff(section, observed, ctx.ledger, plan)
    }

    fn render(_: &ReplicasSpec, op: &Op) -> Vec<Change> {
        vec![render(op)]
    }

    fn simulate(_: &ReplicasSpec, observed: &Observed, ops: &[Op]) -> Observed {
        simulate(observed, ops)
    }

    /// Refused on a standby; replica health as notices.
    fn plan(section: &ReplicasSpec, observed: &Observed, ctx: &mut PlanContext<'_>) -> AreaPlan {
        plan(section, observed, ctx.ledger)
    }

    fn facts(section: &ReplicasSpec, observed: &Observed, facts: &mut Facts) {
        facts.replicas = Some(status(section, observed));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::SecretKeyRef;
    use proptest::prelude::*;

    fn replica(name: &str, slot: Option<&str>) -> ReplicaSpec {
        ReplicaSpec {
            name: name.into(),
            connection_secret_ref: SecretKeyRef {
                name: format!("{name}-conn"),
                key: None,
            },
            slot: slot.map(String::from),
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

    fn slot(active: bool, retained: i64) -> Slot {
        Slot {
            slot_type: "physical".into(),
            active,
            active_pid: active.then_some(4242),
            wal_status: Some("reserved".into()),
            retained_bytes: Some(retained),
            ..Default::default()
        }
    }

    fn reached(replay: u64, receive: u64, age: f64) -> Probe {
        Probe {
            checked_at: Some("2026-01-01T00:00:00Z".into()),
            result: ProbeResult::Reached(ReplicaSide {
                in_recovery: true,
                receive_lsn: Some(Lsn(receive)),
                replay_lsn: Some(Lsn(replay)),
                replay_paused: Some(false),
                last_replay_age_seconds: Some(age),
                receiver_status: Some("streaming".into()),
                receiver_slot: None,
            }),
        }
    }

    fn primary_at(lsn: u64) -> Observed {
        Observed {
            primary_lsn: Some(Lsn(lsn)),
            ..Default::default()
        }
    }

    #[test]
    fn lsn_parses_and_subtracts() {
        let a = Lsn::parse("16/B374D848").unwrap();
        assert_eq!(a.0, 0x16_B374_D848);
        assert_eq!(a.to_string(), "16/B374D848");
        assert_eq!(Lsn::parse("0/0"), Some(Lsn(0)));
        assert_eq!(Lsn::parse("nope"), None);
        assert_eq!(Lsn::parse("1FFFFFFFF/0"), None);
        assert_eq!(Lsn(100).bytes_since(Lsn(40)), 60);
        assert_eq!(Lsn(40).bytes_since(Lsn(100)), 0);
    }

    #[test]
    fn creates_declared_slots_with_wal_reserved_and_records_them() {
        let p = plan(
            &spec(vec![replica("r1", Some("r1_slot")), replica("r2", None)]),
            &primary_at(0),
            &Ledger::for_policy("p"),
        );
        assert_eq!(p.changes.len(), 1);
        let c = &p.changes[0];
        assert_eq!(
            c.sql,
            "SELECT pg_create_physical_replication_slot('r1_slot', true)"
        );
        assert_eq!(c.hazard, Hazard::Safe);
        assert!(!c.transactional, "slot creation survives a rollback");
        assert_eq!(c.ledger.len(), 1);
    }

    #[test]
    fn existing_slot_is_left_alone_and_not_claimed() {
        let mut obs = primary_at(0);
        obs.slots.insert("s".into(), slot(true, 0));
        let p = plan(
            &spec(vec![replica("r", Some("s"))]),
            &obs,
            &Ledger::for_policy("p"),
        );
        assert!(p.changes.is_empty());
        assert!(p.errors.is_empty());
    }

    #[test]
    fn only_owned_slots_are_dropped_and_only_as_destructive() {
        let mut obs = primary_at(0);
        obs.slots.insert("mine".into(), slot(false, 0));
        obs.slots.insert("theirs".into(), slot(false, 0));
        let mut ledger = Ledger::for_policy("p");
        ledger.insert(AREA, "mine", OWNED_SLOT, "p");
        let p = plan(&spec(vec![]), &obs, &ledger);
        assert_eq!(p.changes.len(), 1);
        assert_eq!(p.changes[0].sql, "SELECT pg_drop_replication_slot('mine')");
        assert_eq!(p.changes[0].hazard, Hazard::Destructive);
        assert!(matches!(
            p.changes[0].ledger[0],
            crate::engine::plan::LedgerOp::Forget { .. }
        ));
    }

    #[test]
    fn an_owned_slot_in_use_is_not_dropped_but_said() {
        let mut obs = primary_at(0);
        obs.slots.insert("mine".into(), slot(true, 0));
        let mut ledger = Ledger::for_policy("p");
        ledger.insert(AREA, "mine", OWNED_SLOT, "p");
        let p = plan(&spec(vec![]), &obs, &ledger);
        assert!(p.changes.is_empty());
        assert_eq!(p.notices[0].reason, Reason::SlotInUse);
    }

    #[test]
    fn bad_duplicate_and_logical_slots_are_errors() {
        let mut obs = primary_at(0);
        obs.slots.insert(
            "logi".into(),
            Slot {
                slot_type: "logical".into(),
                ..slot(false, 0)
            },
        );
        let p = plan(
            &spec(vec![
                replica("a", Some("Bad-Name")),
                replica("b", Some("dup")),
                replica("c", Some("dup")),
                replica("d", Some("logi")),
            ]),
            &obs,
            &Ledger::for_policy("p"),
        );
        let reasons: Vec<Reason> = p.errors.iter().map(|e| e.reason).collect();
        assert_eq!(
            reasons,
            [
                Reason::InvalidSlotName,
                Reason::DuplicateSlot,
                Reason::SlotTypeMismatch
            ]
        );
        // The first declaration of "dup" still gets its slot.
        assert_eq!(p.changes.len(), 1);
    }

    #[test]
    fn quotes_slot_names_in_sql() {
        // Invalid names never reach SQL; valid ones are still literals, not spliced text.
        let c = render(&Op::CreateSlot { name: "a'b".into() });
        assert!(c.sql.contains("'a''b'"));
    }

    #[test]
    fn inactive_slots_retaining_wal_are_reported_with_bytes() {
        let mut obs = primary_at(0);
        obs.slots
            .insert("idle".into(), slot(false, 64 * 1024 * 1024));
        obs.slots.insert("busy".into(), slot(true, 1 << 30));
        obs.slots.insert("empty".into(), slot(false, 0));
        let p = plan(&spec(vec![]), &obs, &Ledger::for_policy("p"));
        let n: Vec<_> = p
            .notices
            .iter()
            .filter(|n| n.reason == Reason::InactiveSlotRetainingWal)
            .collect();
        assert_eq!(n.len(), 1);
        assert_eq!(n[0].target, "idle");
        assert!(n[0].message.contains("67108864 bytes"), "{}", n[0].message);
        assert!(n[0].message.contains("64.0 MB"), "{}", n[0].message);
    }

    #[test]
    fn lost_slot_is_said() {
        let mut obs = primary_at(0);
        obs.slots.insert(
            "s".into(),
            Slot {
                wal_status: Some("lost".into()),
                ..slot(false, 0)
            },
        );
        let p = plan(
            &spec(vec![replica("r", Some("s"))]),
            &obs,
            &Ledger::for_policy("p"),
        );
        assert!(p.notices.iter().any(|n| n.reason == Reason::SlotLost));
    }

    #[test]
    fn a_standby_as_primary_is_an_error() {
        let obs = Observed {
            primary_in_recovery: true,
            ..Default::default()
        };
        let p = plan(
            &spec(vec![replica("r", Some("s"))]),
            &obs,
            &Ledger::for_policy("p"),
        );
        assert_eq!(p.errors[0].reason, Reason::PrimaryInRecovery);
        assert!(p.changes.is_empty());
    }

    fn with_sender(mut obs: Observed, slot_name: &str, lag_s: Option<f64>, lag_b: i64) -> Observed {
        obs.slots.insert(slot_name.into(), slot(true, 0));
        obs.senders.push(Sender {
            pid: 4242,
            application_name: "walreceiver".into(),
            client_addr: Some("127.0.0.1".into()),
            state: Some("streaming".into()),
            replay_lsn: obs.primary_lsn.map(|l| Lsn(l.0 - lag_b as u64)),
            replay_lag_seconds: lag_s,
            replay_lag_bytes: Some(lag_b),
        });
        obs
    }

    #[test]
    fn primary_side_lag_is_preferred_over_replay_timestamps() {
        let mut obs = with_sender(primary_at(1000), "s", Some(0.25), 10);
        // An idle primary: the replica's last replay is an hour old.
        obs.probes.insert("r".into(), reached(990, 990, 3600.0));
        let h = &health(&spec(vec![replica("r", Some("s"))]), &obs)[0];
        assert_eq!(h.state, ReplicaState::Healthy);
        assert_eq!(h.lag_seconds, Some(0.25));
        assert_eq!(h.lag_seconds_source, Some(LagSource::Primary));
        assert_eq!(h.lag_bytes, Some(10));
        assert_eq!(h.lag_bytes_source, Some(LagSource::Primary));
        assert!(h.streaming.as_deref().unwrap().contains("127.0.0.1"));
    }

    #[test]
    fn paused_replay_is_measured_on_the_replica() {
        // The primary's replay_lag is stale while replay does not move.
        let mut obs = with_sender(primary_at(1000), "s", Some(0.001), 900);
        let mut probe = reached(100, 1000, 75.0);
        if let ProbeResult::Reached(side) = &mut probe.result {
            side.replay_paused = Some(true);
        }
        obs.probes.insert("r".into(), probe);
        let h = &health(&spec(vec![replica("r", Some("s"))]), &obs)[0];
        assert_eq!(h.lag_seconds, Some(75.0));
        assert_eq!(h.lag_seconds_source, Some(LagSource::Replica));
        assert_eq!(h.lag_bytes_source, Some(LagSource::Primary));
    }

    #[test]
    fn caught_up_sender_without_replay_lag_is_zero() {
        let mut obs = with_sender(primary_at(1000), "s", None, 0);
        obs.probes.insert("r".into(), reached(1000, 1000, 3600.0));
        let h = &health(&spec(vec![replica("r", Some("s"))]), &obs)[0];
        assert_eq!(h.lag_seconds, Some(0.0));
    }

    #[test]
    fn replica_side_lag_when_no_sender_matches() {
        let mut obs = primary_at(5000);
        obs.probes.insert("r".into(), reached(1000, 3000, 42.0));
        let h = &health(&spec(vec![replica("r", None)]), &obs)[0];
        assert_eq!(h.lag_seconds, Some(42.0));
        assert_eq!(h.lag_seconds_source, Some(LagSource::Replica));
        assert_eq!(h.lag_bytes, Some(4000));
        assert_eq!(h.lag_bytes_source, Some(LagSource::Replica));
        // Replayed all it received: the replay timestamp measures idleness, not lag.
        obs.probes.insert("r".into(), reached(5000, 5000, 3600.0));
        let h = &health(&spec(vec![replica("r", None)]), &obs)[0];
        assert_eq!(h.lag_seconds, Some(0.0));
        assert_eq!(h.lag_bytes, Some(0));
    }

    #[test]
    fn sender_matched_by_application_name() {
        let mut obs = with_sender(primary_at(1000), "other", Some(1.5), 5);
        obs.senders[0].application_name = "r".into();
        obs.probes.insert("r".into(), reached(0, 0, 0.0));
        let h = &health(&spec(vec![replica("r", None)]), &obs)[0];
        assert_eq!(h.lag_seconds, Some(1.5));
        assert_eq!(h.lag_bytes_source, Some(LagSource::Primary));
    }

    #[test]
    fn lag_limits_make_a_replica_lagging() {
        let mut r = replica("r", Some("s"));
        r.max_lag_bytes = Some(1024);
        r.max_lag_seconds = Some(30);
        let mut obs = with_sender(primary_at(1 << 20), "s", Some(2.0), 4096);
        obs.probes.insert("r".into(), reached(0, 0, 0.0));
        let s = spec(vec![r.clone()]);
        let h = &health(&s, &obs)[0];
        assert_eq!(h.state, ReplicaState::Lagging);
        assert!(h.detail.as_deref().unwrap().contains("maxLagBytes 1024"));
        let p = plan(&s, &obs, &Ledger::for_policy("p"));
        assert!(p.notices.iter().any(|n| n.reason == Reason::ReplicaLagging));

        // Within both limits.
        let mut obs = with_sender(primary_at(1 << 20), "s", Some(2.0), 512);
        obs.probes.insert("r".into(), reached(0, 0, 0.0));
        assert_eq!(health(&s, &obs)[0].state, ReplicaState::Healthy);

        // Over the time limit only.
        let mut obs = with_sender(primary_at(1 << 20), "s", Some(31.0), 0);
        obs.probes.insert("r".into(), reached(0, 0, 0.0));
        assert_eq!(health(&s, &obs)[0].state, ReplicaState::Lagging);
    }

    #[test]
    fn unreachable_not_in_recovery_and_unchecked() {
        let mut obs = primary_at(0);
        obs.probes.insert(
            "down".into(),
            Probe {
                checked_at: Some("t".into()),
                result: ProbeResult::Unreachable {
                    message: "cannot connect to h:5432/db: timed out after 2s".into(),
                },
            },
        );
        let mut promoted = reached(0, 0, 0.0);
        if let ProbeResult::Reached(side) = &mut promoted.result {
            side.in_recovery = false;
        }
        obs.probes.insert("promoted".into(), promoted);
        let s = spec(vec![
            replica("down", None),
            replica("promoted", None),
            replica("nourl", None),
        ]);
        let states: Vec<_> = health(&s, &obs).iter().map(|h| h.state).collect();
        assert_eq!(
            states,
            [
                ReplicaState::Unreachable,
                ReplicaState::NotInRecovery,
                ReplicaState::Unknown
            ]
        );
        let p = plan(&s, &obs, &Ledger::for_policy("p"));
        let reasons: Vec<_> = p.notices.iter().map(|n| n.reason).collect();
        assert_eq!(
            reasons,
            [
                Reason::ReplicaUnreachable,
                Reason::ReplicaNotInRecovery,
                Reason::ReplicaNotChecked
            ]
        );
        assert!(p.notices[0].message.contains("timed out"));
    }

    #[test]
    fn paused_replay_is_said() {
        let mut obs = primary_at(100);
        let mut probe = reached(10, 100, 5.0);
        if let ProbeResult::Reached(side) = &mut probe.result {
            side.replay_paused = Some(true);
        }
        obs.probes.insert("r".into(), probe);
        let h = &health(&spec(vec![replica("r", None)]), &obs)[0];
        assert!(h.replay_paused);
        assert!(h.detail.as_deref().unwrap().contains("paused"));
    }

    #[test]
    fn status_rounds_and_names_the_slot() {
        let mut obs = with_sender(primary_at(1000), "s", Some(0.123456), 0);
        obs.probes.insert("r".into(), reached(1000, 1000, 0.0));
        let s = status(&spec(vec![replica("r", Some("s"))]), &obs);
        assert_eq!(s[0].state, "Healthy");
        assert_eq!(s[0].lag_seconds, Some(0.123));
        assert_eq!(s[0].slot.as_deref(), Some("s"));
        assert_eq!(
            s[0].last_check_time.as_deref(),
            Some("2026-01-01T00:00:00Z")
        );
    }

    fn st(name: &str, state: ReplicaState) -> ReplicaStatus {
        ReplicaStatus {
            name: name.into(),
            state: state.as_str().into(),
            ..Default::default()
        }
    }

    #[test]
    fn readiness_names_the_worst_state_and_every_unhealthy_replica() {
        assert_eq!(readiness(&[st("a", ReplicaState::Healthy)]), Ok(()));
        assert_eq!(readiness(&[]), Ok(()));
        let (reason, message) = readiness(&[
            st("a", ReplicaState::Lagging),
            st("b", ReplicaState::Healthy),
            st("c", ReplicaState::Unreachable),
        ])
        .unwrap_err();
        assert_eq!(reason, Reason::ReplicaUnreachable);
        assert_eq!(message, "a is Lagging, c is Unreachable");
    }

    #[test]
    fn transitions_are_state_changes() {
        let before = [
            st("a", ReplicaState::Healthy),
            st("b", ReplicaState::Lagging),
        ];
        let after = [
            st("a", ReplicaState::Lagging),
            st("b", ReplicaState::Healthy),
            st("c", ReplicaState::Healthy),
            st("d", ReplicaState::Unreachable),
        ];
        let t = transitions(&before, &after);
        assert_eq!(t.len(), 3);
        assert_eq!(
            (t[0].name.as_str(), t[0].from.as_deref(), t[0].healthy),
            ("a", Some("Healthy"), false)
        );
        assert_eq!((t[1].name.as_str(), t[1].healthy), ("b", true));
        assert_eq!((t[2].name.as_str(), t[2].from.as_deref()), ("d", None));
        assert!(transitions(&after, &after).is_empty());
    }

    fn urls() -> BTreeMap<String, String> {
        BTreeMap::from([
            ("a".to_string(), "postgres://u:pw@a/db".to_string()),
            ("b".to_string(), "postgres://u:pw@b/db".to_string()),
        ])
    }

    #[test]
    fn read_endpoint_lists_healthy_replicas_in_spec_order() {
        let s = spec(vec![replica("b", None), replica("a", None)]);
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
        let s = spec(vec![replica("a", None), replica("b", None)]);
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
        let mut s = spec(vec![replica("a", None)]);
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
        let s = spec(vec![replica("c", None), replica("a", None)]);
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

    fn arb_slot_name() -> impl Strategy<Value = String> {
        prop::sample::select(vec!["s1", "s2", "s3", "s4"]).prop_map(String::from)
    }

    proptest! {
        /// Convergence: after applying a plan (destructive changes allowed), planning
        /// again yields nothing to do, and slots not owned are never touched.
        #[test]
        fn applying_a_plan_converges(
            declared in prop::collection::vec(prop::option::of(arb_slot_name()), 0..4),
            existing in prop::collection::btree_map(arb_slot_name(), prop::bool::ANY, 0..4),
            owned in prop::collection::btree_set(arb_slot_name(), 0..4),
        ) {
            let mut seen = BTreeSet::new();
            let replicas: Vec<_> = declared
                .into_iter()
                .enumerate()
                .map(|(i, s)| replica(&format!("r{i}"), s.filter(|s| seen.insert(s.clone())).as_deref()))
                .collect();
            let s = spec(replicas);
            let mut obs = primary_at(0);
            for (name, active) in &existing {
                obs.slots.insert(name.clone(), slot(*active, 0));
            }
            let mut ledger = Ledger::for_policy("p");
            for name in &owned {
                ledger.insert(AREA, name, OWNED_SLOT, "p");
            }
            crate::engine::areas::convergence::converges::<Replicas>(&s, &obs, &ledger, |ops, _| {
                for op in ops {
                    if let Op::DropSlot { name } = op {
                        prop_assert!(owned.contains(name), "dropped {name}, not owned");
                    }
                }
                Ok(())
            })?;
        }
    }
}
