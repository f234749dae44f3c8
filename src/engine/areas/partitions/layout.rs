//! The layout a table should have (pure): which partitions to create, retire or leave
//! alone, rows to move out of the default; checks of what cannot be done.

use super::*;

/// A declared table that passed the checks.
#[derive(Debug, Clone)]
pub(super) struct Valid {
    pub(super) column: String,
    pub(super) key_type: KeyType,
}

/// Why a declared table cannot be maintained: (reason, message).
pub(super) type TableError = (Reason, String);

pub(super) fn validate_table(
    t: &PartitionedTable,
    state: &TableState,
) -> Result<Valid, TableError> {
    let name = t.qualified();
    match state.relkind.as_str() {
        "p" => {}
        "r" => {
            return Err((
                Reason::NotPartitioned,
                format!("{name} is not partitioned: create it with PARTITION BY RANGE (<column>) on a date, timestamp or timestamptz column"),
            ))
        }
        k => return Err((Reason::NotATable, format!("{name} is not a table (relkind {k})"))),
    }
    match state.strategy.as_deref() {
        Some("r") => {}
        Some(s) => {
            let how = match s {
                "l" => "LIST",
                "h" => "HASH",
                _ => "an unknown strategy",
            };
            return Err((
                Reason::UnsupportedPartitionStrategy,
                format!("{name} is partitioned by {how}; time partitions need PARTITION BY RANGE"),
            ));
        }
        None => return Err((Reason::NotPartitioned, format!("{name} is not partitioned"))),
    }
    let column = match (&state.key_column, state.key_columns) {
        (Some(c), 1) => c.clone(),
        _ => {
            return Err((
                Reason::UnsupportedPartitionKey,
                format!("{name} is partitioned by an expression or several columns; time partitions need one date, timestamp or timestamptz column"),
            ))
        }
    };
    if let Some(want) = &t.column {
        if *want != column {
            return Err((
                Reason::ColumnMismatch,
                format!("{name} is partitioned by column {column:?}, the policy says {want:?}"),
            ));
        }
    }
    let ty = state.key_type.as_deref().unwrap_or("unknown");
    let Some(key_type) = KeyType::from_regtype(ty) else {
        return Err((
            Reason::UnsupportedKeyType,
            format!("{name} is partitioned by {column:?} of type {ty}; time partitions need date, timestamp or timestamptz"),
        ));
    };
    Ok(Valid { column, key_type })
}

/// The partitions of one table sorted out against the spec and the clock.
#[derive(Debug, Default)]
pub(super) struct Layout {
    /// Desired ranges that do not exist yet, oldest first.
    pub(super) missing: Vec<Range>,
    /// Ours, by start.
    pub(super) ours: BTreeMap<NaiveDate, Child>,
    pub(super) default: Option<Child>,
    /// Partitions we did not name.
    pub(super) foreign: Vec<Child>,
    /// Past desired ranges not created because a relation already has their name.
    pub(super) name_taken: Vec<(Range, String)>,
}

pub(super) fn layout(
    t: &PartitionedTable,
    state: &TableState,
    observed: &Observed,
) -> Result<Layout, TableError> {
    let name = t.qualified();
    let interval = t.interval;
    let today = observed.now.date_naive();
    let current = floor(interval, today);
    let mut last = current;
    for _ in 0..t.premake.unwrap_or(DEFAULT_PREMAKE) {
        last = next(interval, last);
    }
    let start_date = match &t.start_date {
        Some(d) => Some(NaiveDate::parse_from_str(d, "%Y-%m-%d").map_err(|_| {
            (
                Reason::InvalidStartDate,
                format!("startDate {d:?} is not a date YYYY-MM-DD"),
            )
        })?),
        None => None,
    };
    let retention = match &t.retention {
        Some(r) => Some(parse_retention(r).map_err(|e| (Reason::InvalidRetention, e.to_string()))?),
        None => None,
    };
    let mut out = Layout::default();
    for c in &state.children {
        match &c.bound {
            Bound::Default => out.default = Some(c.clone()),
            Bound::Range { from, to } => {
                let start = (c.name.schema == name.schema)
                    .then(|| ours_start(&name.name, interval, &c.name.name))
                    .flatten()
                    .filter(|start| {
                        micros(*start) == *from && micros(next(interval, *start)) == *to
                    });
                match start {
                    Some(s) => {
                        out.ours.insert(s, c.clone());
                    }
                    None => out.foreign.push(c.clone()),
                }
            }
            Bound::Other(_) => out.foreign.push(c.clone()),
        }
    }
    // From startDate on; without one, from our oldest partition on (so a gap left while
    // nothing ran is filled, and rows for it do not pile up in the default), or now.
    let mut first = match start_date {
        Some(d) => floor(interval, d),
        None => out.ours.keys().next().map_or(current, |o| current.min(*o)),
    };
    if let Some(r) = retention {
        // Never create what retention would retire at once: that would never converge.
        first = first.max(floor(interval, cutoff(observed.now, r).date()));
    }
    let mut start = first;
    let mut count = 0usize;
    while start <= last {
        let range = Range {
            start,
            end: next(interval, start),
        };
        start = range.end;
        count += 1;
        if count > MAX_PARTITIONS_PER_RUN {
            return Err((
                Reason::TooManyPartitions,
                format!("{name}: more than {MAX_PARTITIONS_PER_RUN} {interval:?} partitions from {first} to {last}; move startDate closer"),
            ));
        }
        if out.ours.contains_key(&range.start) {
            continue;
        }
        // A partition we did not name may already hold this range (or more): then it is
        // covered; one that overlaps it only in part makes the range impossible.
        let mut covered = false;
        for f in &out.foreign {
            if let Bound::Range { from, to } = f.bound {
                if from < range.hi() && range.lo() < to {
                    if from <= range.lo() && range.hi() <= to {
                        covered = true;
                    } else {
                        return Err((
                            Reason::OverlappingPartition,
                            format!(
                                "{name}: partition {} ({}) overlaps the {interval:?} range [{}, {}) the policy needs; merge or re-create it on the interval grid, or remove the table from the policy",
                                f.name,
                                describe_bound(&f.bound),
                                range.start,
                                range.end
                            ),
                        ));
                    }
                }
            }
        }
        if covered {
            continue;
        }
        let pname = partition_name(&name.name, interval, range.start);
        if state.other_relations.contains(&pname)
            || state
                .children
                .iter()
                .any(|c| c.name.name == pname && c.name.schema == name.schema)
        {
            if range.end <= today {
                out.name_taken.push((range, pname));
                continue;
            }
            return Err((
                Reason::NameTaken,
                format!("{name}: a relation named {pname} already exists in schema {} but is not the partition for [{}, {}); rename it or attach it with ALTER TABLE … ATTACH PARTITION",
                    name.schema, range.start, range.end),
            ));
        }
        out.missing.push(range);
    }
    Ok(out)
}

/// The interval start named by `child`, when it is `<table prefix>_<suffix>` exactly.
pub(super) fn ours_start(
    table: &str,
    interval: PartitionInterval,
    child: &str,
) -> Option<NaiveDate> {
    // Suffixes contain underscores; try each split point and keep the one that rebuilds
    // exactly our name.
    child
        .match_indices('_')
        .filter_map(|(i, _)| parse_suffix(interval, &child[i + 1..]))
        .find(|start| partition_name(table, interval, *start) == child)
}

pub(super) fn describe_micros(m: i64) -> String {
    match m {
        i64::MIN => "MINVALUE".into(),
        i64::MAX => "MAXVALUE".into(),
        m => match DateTime::<Utc>::from_timestamp_micros(m) {
            Some(t) if t.time() == chrono::NaiveTime::MIN => t.format("%Y-%m-%d").to_string(),
            Some(t) => t.format("%Y-%m-%dT%H:%M:%S%.fZ").to_string(),
            None => m.to_string(),
        },
    }
}

pub(super) fn describe_bound(b: &Bound) -> String {
    match b {
        Bound::Default => "DEFAULT".into(),
        Bound::Range { from, to } => {
            format!("[{}, {})", describe_micros(*from), describe_micros(*to))
        }
        Bound::Other(s) => s.clone(),
    }
}

/// A difference to close.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// `CREATE TABLE … PARTITION OF … FOR VALUES FROM … TO …`.
    Create {
        table: QualifiedName,
        partition: String,
        range: Range,
        key_type: KeyType,
        owner: Option<String>,
    },
    /// The default holds rows of the range: create the partition standalone, move the
    /// rows into it, attach it; all in the table's one transaction.
    CreateMovingRows {
        table: QualifiedName,
        partition: String,
        range: Range,
        key_type: KeyType,
        column: String,
        columns: Vec<String>,
        default: QualifiedName,
        rows: i64,
        owner: Option<String>,
        /// `LIKE … INCLUDING COMPRESSION` exists from PostgreSQL 14 on.
        compression: bool,
    },
    CreateDefault {
        table: QualifiedName,
        partition: String,
        owner: Option<String>,
    },
    Detach {
        table: QualifiedName,
        partition: QualifiedName,
        range: Range,
        concurrently: bool,
    },
    /// Completes a `DETACH … CONCURRENTLY` that was interrupted.
    FinalizeDetach {
        table: QualifiedName,
        partition: QualifiedName,
    },
    Drop {
        table: QualifiedName,
        partition: QualifiedName,
        range: Range,
    },
}

/// The differences between spec and catalog at `observed.now`, and the problems that
/// block them. A table with an error gets no op.
pub(crate) fn diff(spec: &PartitionsSpec, observed: &Observed, plan: &mut AreaPlan) -> Vec<Op> {
    let mut out = Vec::new();
    let mut late = Vec::new();
    for t in &spec.tables {
        let mut creates = Vec::new();
        let mut retires = Vec::new();
        let name = t.qualified();
        let Some(state) = observed.tables.get(&name) else {
            plan.error(
                name.to_string(),
                Reason::TableNotFound,
                format!("table {name} does not exist"),
            );
            continue;
        };
        let valid = match validate_table(t, state) {
            Ok(v) => v,
            Err((reason, message)) => {
                plan.error(name.to_string(), reason, message);
                continue;
            }
        };
        let layout = match layout(t, state, observed) {
            Ok(l) => l,
            Err((reason, message)) => {
                plan.error(name.to_string(), reason, message);
                continue;
            }
        };
        for f in &layout.foreign {
            plan.notice(
                name.to_string(),
                Reason::PartitionNotManaged,
                format!(
                    "partition {} {} is not named by this policy (ours are named like {}); left alone",
                    f.name,
                    describe_bound(&f.bound),
                    partition_name(&name.name, t.interval, floor(t.interval, observed.now.date_naive()))
                ),
            );
        }
        for (range, pname) in &layout.name_taken {
            plan.notice(
                name.to_string(),
                Reason::NameTaken,
                format!("a relation named {pname} exists but is not a partition of {name}; the past range [{}, {}) is not created (its rows go to the default partition)", range.start, range.end),
            );
        }
        let owner = (state.owner != observed.current_user).then(|| state.owner.clone());
        let default_count = |r: &Range| {
            layout
                .default
                .as_ref()
                .and(state.default_rows.as_ref())
                .and_then(|d| d.in_range.get(&r.lo()).copied())
                .unwrap_or(0)
        };
        if let Some(default) = &layout.default {
            if let Err((reason, message)) = check_moves(
                &name,
                default,
                &layout.missing,
                &default_count,
                state,
                observed,
            ) {
                plan.error(name.to_string(), reason, message);
                continue;
            }
        }
        for range in &layout.missing {
            let partition = partition_name(&name.name, t.interval, range.start);
            let rows = default_count(range);
            creates.push(match (&layout.default, rows > 0) {
                (Some(default), true) => Op::CreateMovingRows {
                    table: name.clone(),
                    partition,
                    range: *range,
                    key_type: valid.key_type,
                    column: valid.column.clone(),
                    columns: state.columns.clone(),
                    default: default.name.clone(),
                    rows,
                    owner: owner.clone(),
                    compression: observed.server_version >= 140_000,
                },
                _ => Op::Create {
                    table: name.clone(),
                    partition,
                    range: *range,
                    key_type: valid.key_type,
                    owner: owner.clone(),
                },
            });
        }
        let want_default = t.default_partition.unwrap_or(true);
        let will_have_default = layout.default.is_some() || want_default;
        if want_default && layout.default.is_none() {
            let partition = default_name(&name.name);
            if state.other_relations.contains(&partition) {
                plan.error(
                    name.to_string(),
                    Reason::NameTaken,
                    format!("a relation named {partition} already exists in schema {} and is not the default partition of {name}", name.schema),
                );
                continue;
            }
            creates.push(Op::CreateDefault {
                table: name.clone(),
                partition,
                owner: owner.clone(),
            });
        } else if !want_default {
            if let Some(d) = &layout.default {
                plan.notice(
                    name.to_string(),
                    Reason::DefaultPartitionKept,
                    format!("defaultPartition is false but {} exists; it is not dropped (it may hold rows)", d.name),
                );
            }
        }
        let concurrently =
            !will_have_default && observed.server_version >= CONCURRENT_DETACH_VERSION;
        for (start, child) in &layout.ours {
            let range = Range {
                start: *start,
                end: next(t.interval, *start),
            };
            if child.detach_pending {
                retires.push(Op::FinalizeDetach {
                    table: name.clone(),
                    partition: child.name.clone(),
                });
                continue;
            }
            let Some(r) = t.retention.as_deref().and_then(|r| parse_retention(r).ok()) else {
                continue;
            };
            // Bounds are enforced by PostgreSQL: a partition whose upper bound is at or
            // before the cutoff cannot hold a row inside the retention window.
            if range.end.and_hms_opt(0, 0, 0).expect("midnight") > cutoff(observed.now, r) {
                continue;
            }
            retires.push(match t.retention_policy.unwrap_or_default() {
                RetentionPolicy::Detach => Op::Detach {
                    table: name.clone(),
                    partition: child.name.clone(),
                    range,
                    concurrently,
                },
                RetentionPolicy::Drop => Op::Drop {
                    table: name.clone(),
                    partition: child.name.clone(),
                    range,
                },
            });
        }
        // A table's transactional ops stay together (its transaction, see `plan`); the
        // statements PostgreSQL refuses in a transaction (DETACH … CONCURRENTLY,
        // FINALIZE) come after every table's, each on its own.
        let (autonomous, transactional): (Vec<Op>, Vec<Op>) =
            retires.into_iter().partition(is_autonomous);
        out.extend(creates);
        out.extend(transactional);
        late.extend(autonomous);
    }
    out.extend(late);
    out
}

/// Rows move with `session_replication_role = replica` (see [`render`]): refused up front,
/// naming the fix, when the role may not set it or when the default partition has a
/// trigger or rule that fires on DELETE even then.
pub(super) fn check_moves(
    table: &QualifiedName,
    default: &Child,
    missing: &[Range],
    rows_in: &dyn Fn(&Range) -> i64,
    state: &TableState,
    observed: &Observed,
) -> Result<(), TableError> {
    let moves: Vec<(&Range, i64)> = missing
        .iter()
        .map(|r| (r, rows_in(r)))
        .filter(|(_, n)| *n > 0)
        .collect();
    let Some((first, _)) = moves.first() else {
        return Ok(());
    };
    let rows: i64 = moves.iter().map(|(_, n)| n).sum();
    let what = format!(
        "{rows} row(s) of {} must move into new partitions (the first for [{}, {}))",
        default.name, first.start, first.end
    );
    if !observed.can_set_replication_role {
        let me = &observed.current_user;
        let fix = if observed.server_version >= 150_000 {
            format!(
                "run GRANT SET ON PARAMETER session_replication_role TO {} as a superuser, or apply as a superuser",
                quote_ident(me)
            )
        } else {
            "apply as a superuser (before PostgreSQL 15 only a superuser may set it)".to_string()
        };
        return Err((
            Reason::InsufficientPrivilege,
            format!(
                "{table}: {what}; dbpolicy moves rows with session_replication_role = replica so that no foreign-key action or trigger fires, and role {me} may not set it: {fix}. Nothing was changed"
            ),
        ));
    }
    if !state.default_fires_on_delete.is_empty() {
        return Err((
            Reason::TriggerFiresOnMove,
            format!(
                "{table}: {what}, but {} fires on DELETE of {} even under session_replication_role = replica, so the move would fire it: make it an ordinary trigger while the rows move (ALTER TABLE … ENABLE TRIGGER / ENABLE RULE), or move the rows yourself. Nothing was changed",
                state.default_fires_on_delete.join(", "),
                default.name
            ),
        ));
    }
    Ok(())
}

pub(super) fn op_table(op: &Op) -> &QualifiedName {
    match op {
        Op::Create { table, .. }
        | Op::CreateMovingRows { table, .. }
        | Op::CreateDefault { table, .. }
        | Op::Detach { table, .. }
        | Op::FinalizeDetach { table, .. }
        | Op::Drop { table, .. } => table,
    }
}

pub(super) fn is_autonomous(op: &Op) -> bool {
    matches!(
        op,
        Op::Detach {
            concurrently: true,
            ..
        } | Op::FinalizeDetach { .. }
    )
}

pub(super) fn in_schema(table: &QualifiedName, name: &str) -> QualifiedName {
    QualifiedName::new(table.schema.clone(), name)
}

pub(super) fn owner_change(
    table: &QualifiedName,
    partition: &QualifiedName,
    owner: &Option<String>,
) -> Option<Change> {
    // Partitions are owned by whoever creates them, not by the parent's owner.
    owner.as_ref().map(|o| {
        Change::new(
            AREA,
            table.to_string(),
            format!("give {} to the table's owner {o}", partition.name),
            format!(
                "ALTER TABLE {} OWNER TO {}",
                partition.quoted(),
                quote_ident(o)
            ),
        )
        .hazard(Hazard::Locking)
        .lock(LockLevel::AccessExclusive)
    })
}
