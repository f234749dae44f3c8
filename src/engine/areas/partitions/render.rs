//! Partition operations as statements: creation, row moves, detach and drop, each with
//! the lock it takes. A change's target is the partitioned table; its [`LockLevel`] is the
//! strongest lock the statement takes on a relation that already exists (the parent, its
//! default partition or the partition detached or dropped), as the documentation of
//! CREATE TABLE … PARTITION OF and ALTER TABLE ATTACH/DETACH PARTITION states it.

use super::*;
use crate::engine::plan::OwnTimeout;

/// A lock on a partitioned table itself (ONLY: its partitions are locked as needed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ParentLock {
    /// Blocks writers (and other DDL), not readers: what a row move needs.
    ShareRowExclusive,
    /// What CREATE … PARTITION OF and DETACH take anyway.
    AccessExclusive,
}

pub(super) fn lock_parent(table: &QualifiedName, mode: ParentLock) -> Change {
    let level = match mode {
        ParentLock::ShareRowExclusive => LockLevel::ShareRowExclusive,
        ParentLock::AccessExclusive => LockLevel::AccessExclusive,
    };
    let (mode, why) = match mode {
        ParentLock::ShareRowExclusive => (
            "SHARE ROW EXCLUSIVE",
            "writers wait until the new partition is attached",
        ),
        ParentLock::AccessExclusive => (
            "ACCESS EXCLUSIVE",
            "the strongest lock this transaction needs, before any other",
        ),
    };
    Change::new(
        AREA,
        table.to_string(),
        format!("lock {} ({why})", table.name),
        format!("LOCK TABLE ONLY {} IN {mode} MODE", table.quoted()),
    )
    .hazard(Hazard::Locking)
    .lock(level)
}

/// The statements of one op.
pub(crate) fn render(op: &Op) -> Vec<Change> {
    match op {
        Op::Create {
            table,
            partition,
            range,
            key_type,
            owner,
        } => {
            let p = in_schema(table, partition);
            let mut out = vec![Change::new(
                AREA,
                table.to_string(),
                format!(
                    "create partition {partition} for [{}, {})",
                    range.start, range.end
                ),
                format!(
                    "CREATE TABLE {} PARTITION OF {} FOR VALUES FROM ({}) TO ({})",
                    p.quoted(),
                    table.quoted(),
                    key_type.literal(range.start),
                    key_type.literal(range.end)
                ),
            )
            // ACCESS EXCLUSIVE on the parent for a moment (and a scan of the default).
            .hazard(Hazard::Locking)
            .lock(LockLevel::AccessExclusive)];
            out.extend(owner_change(table, &p, owner));
            out
        }
        Op::CreateMovingRows {
            table,
            partition,
            range,
            key_type,
            column,
            columns,
            default,
            rows,
            owner,
            compression,
        } => {
            // PostgreSQL refuses a new partition while the default holds rows of its range.
            // In the table's transaction:
            // 1. The parent, ONLY (not its partitions), in SHARE ROW EXCLUSIVE: no writer
            //    can route a row through it until the new partition is attached and
            //    committed, so none routes a row of the range to the default with the old
            //    partition set and then fails its changed constraint. Readers go on.
            //    Taken before any lock on a partition, as writers do (no deadlock), and
            //    strong enough for ATTACH (SHARE UPDATE EXCLUSIVE): no upgrade later.
            // 2. The default in ACCESS EXCLUSIVE, which ATTACH needs anyway.
            // 3. The partition as a standalone copy of the parent's columns and CHECK
            //    constraints (no trigger, no foreign key: LIKE copies neither).
            // 4. The rows move with one DELETE … RETURNING feeding an INSERT under
            //    session_replication_role = replica: neither the foreign-key actions of
            //    tables referencing the parent (their triggers are on the default) nor any
            //    ordinary user trigger or rule fires. The same rows with the same keys are
            //    in the parent at commit, so every reference stays valid.
            // 5. The role back to the session's own before ATTACH (DDL event triggers
            //    see it), and SET LOCAL ends with the transaction in any case.
            // 6. ATTACH: PostgreSQL checks the bound, builds the parent's indexes, adds
            //    the parent's triggers and foreign keys (validating those it references).
            // Any failure rolls all of it back: no row is ever lost or duplicated.
            let p = in_schema(table, partition);
            let lo = key_type.literal(range.start);
            let hi = key_type.literal(range.end);
            let cols = columns
                .iter()
                .map(|c| quote_ident(c))
                .collect::<Vec<_>>()
                .join(", ");
            let key = quote_ident(column);
            let mut out = vec![
                lock_parent(table, ParentLock::ShareRowExclusive),
                Change::new(
                    AREA,
                    table.to_string(),
                    format!("lock {} to move its rows of [{}, {})", default.name, range.start, range.end),
                    format!("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE", default.quoted()),
                )
                .hazard(Hazard::Locking)
                .lock(LockLevel::AccessExclusive),
                Change::new(
                    AREA,
                    table.to_string(),
                    format!("create {partition} for [{}, {}) as a standalone table", range.start, range.end),
                    format!(
                        "CREATE TABLE {} (LIKE {} INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING GENERATED INCLUDING STORAGE{})",
                        p.quoted(),
                        table.quoted(),
                        if *compression { " INCLUDING COMPRESSION" } else { "" }
                    ),
                )
                // LIKE reads the parent's definition under ACCESS SHARE.
                .lock(LockLevel::AccessShare),
                Change::new(
                    AREA,
                    table.to_string(),
                    "fire no foreign-key action or trigger for the rows moved (this transaction only)",
                    "SET LOCAL session_replication_role = replica",
                ),
                Change::new(
                    AREA,
                    table.to_string(),
                    format!("move {rows} row(s) from {} into {partition}", default.name),
                    format!(
                        "WITH moved AS (DELETE FROM {} WHERE {key} >= {lo} AND {key} < {hi} RETURNING {cols}) INSERT INTO {} ({cols}) SELECT {cols} FROM moved",
                        default.quoted(),
                        p.quoted()
                    ),
                )
                .lock(LockLevel::RowExclusive)
                .reports_rows(),
                Change::new(
                    AREA,
                    table.to_string(),
                    "back to the session's replication role",
                    "SET LOCAL session_replication_role = DEFAULT",
                ),
                Change::new(
                    AREA,
                    table.to_string(),
                    format!("attach {partition} for [{}, {})", range.start, range.end),
                    format!(
                        "ALTER TABLE {} ATTACH PARTITION {} FOR VALUES FROM ({lo}) TO ({hi})",
                        table.quoted(),
                        p.quoted()
                    ),
                )
                // SHARE UPDATE EXCLUSIVE on the parent, ACCESS EXCLUSIVE on the table
                // attached and on the default partition (held already, from step 2).
                .hazard(Hazard::Locking)
                .lock(LockLevel::AccessExclusive),
            ];
            out.extend(owner_change(table, &p, owner));
            out
        }
        Op::CreateDefault {
            table,
            partition,
            owner,
        } => {
            let p = in_schema(table, partition);
            let mut out = vec![Change::new(
                AREA,
                table.to_string(),
                format!("create default partition {partition}"),
                format!(
                    "CREATE TABLE {} PARTITION OF {} DEFAULT",
                    p.quoted(),
                    table.quoted()
                ),
            )
            .hazard(Hazard::Locking)
            .lock(LockLevel::AccessExclusive)];
            out.extend(owner_change(table, &p, owner));
            out
        }
        Op::Detach {
            table,
            partition,
            range,
            concurrently,
        } => {
            let summary = format!(
                "detach {} [{}, {}): older than the retention",
                partition.name, range.start, range.end
            );
            if *concurrently {
                vec![Change::new(
                    AREA,
                    table.to_string(),
                    summary + " (concurrently)",
                    format!(
                        "ALTER TABLE {} DETACH PARTITION {} CONCURRENTLY",
                        table.quoted(),
                        partition.quoted()
                    ),
                )
                // SHARE UPDATE EXCLUSIVE on the parent throughout, so traffic on the
                // table goes on; ACCESS EXCLUSIVE on the partition in its second,
                // internal transaction (what the level records: the strongest lock).
                // Not allowed in a transaction block. It waits for every transaction
                // that uses the table, so it is long by nature: the long-operation timeout.
                .autonomous()
                .lock(LockLevel::AccessExclusive)
                .own_timeout(OwnTimeout::LongOperation)]
            } else {
                // With a default partition PostgreSQL refuses CONCURRENTLY; the plain
                // form takes ACCESS EXCLUSIVE briefly, inside the table's transaction.
                vec![Change::new(
                    AREA,
                    table.to_string(),
                    summary,
                    format!(
                        "ALTER TABLE {} DETACH PARTITION {}",
                        table.quoted(),
                        partition.quoted()
                    ),
                )
                .hazard(Hazard::Locking)
                .lock(LockLevel::AccessExclusive)]
            }
        }
        Op::FinalizeDetach { table, partition } => vec![Change::new(
            AREA,
            table.to_string(),
            format!("finish the interrupted detach of {}", partition.name),
            format!(
                "ALTER TABLE {} DETACH PARTITION {} FINALIZE",
                table.quoted(),
                partition.quoted()
            ),
        )
        // As the second transaction of DETACH … CONCURRENTLY.
        .autonomous()
        .lock(LockLevel::AccessExclusive)],
        Op::Drop {
            table,
            partition,
            range,
        } => vec![Change::new(
            AREA,
            table.to_string(),
            format!(
                "drop {} [{}, {}): older than the retention",
                partition.name, range.start, range.end
            ),
            format!("DROP TABLE {}", partition.quoted()),
        )
        .hazard(Hazard::Destructive)
        .lock(LockLevel::AccessExclusive)],
    }
}
