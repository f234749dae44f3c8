//! Partitions: time-range partitions of tables declared `PARTITION BY RANGE` on a date,
//! timestamp or timestamptz column. Keeps `premake` future partitions, an optional
//! DEFAULT partition, partitions back to `startDate`, moves rows that landed in the default
//! into the partition created for them, and retires partitions past the retention
//! (detach by default, drop only with `retentionPolicy: Drop` and `allowDestructive`).
//!
//! Ownership is by name: a partition is ours when it is named `<table>_<suffix>` with the
//! suffix of its interval (see [`suffix`]) and its bounds are exactly that interval. Every
//! other partition is reported and never touched. Observed with one catalog query for all
//! tables, plus one query (UNION ALL over the default partitions) counting the rows of each
//! default partition and of the ranges about to be created. The planner is pure: the
//! clock is part of what is observed ([`Observed::now`]), so tests inject time.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Datelike, Months, NaiveDate, NaiveDateTime, Utc};
use sqlx::{PgConnection, Row};

use crate::api::{PartitionInterval, PartitionTableStatus, PartitionedTable, PartitionsSpec};
use crate::api::{RetentionPolicy, TableTarget};
use crate::duration::{parse_retention, Retention};
use crate::engine::areas::{AreaModule, Facts, ObserveContext, ObserveError, PlanContext};
use crate::engine::plan::{Area, AreaPlan, Change, Hazard};
use crate::pg::{quote_ident, quote_literal, QualifiedName};
use crate::reason::Reason;

const AREA: Area = Area::Partitions;

/// PostgreSQL truncates identifiers to 63 bytes; names we build must fit.
const MAX_IDENT: usize = 63;
/// Longest suffix with its underscore (`_2024_01_31`): every name of ours starts with the
/// table name cut to leave room for it, which is what the observer searches by.
const LONGEST_SUFFIX: usize = 11;
/// Default `premake`.
pub const DEFAULT_PREMAKE: u32 = 4;
/// A guard against a `startDate` decades back with daily partitions.
pub const MAX_PARTITIONS_PER_RUN: usize = 5000;
/// `DETACH … CONCURRENTLY` exists from PostgreSQL 14 on.
const CONCURRENT_DETACH_VERSION: i32 = 140_000;

// ---------------------------------------------------------------- calendar

/// The interval containing `d` starts here.
pub fn floor(interval: PartitionInterval, d: NaiveDate) -> NaiveDate {
    let ymd = |y, m, day| NaiveDate::from_ymd_opt(y, m, day).expect("valid date");
    match interval {
        PartitionInterval::Daily => d,
        // ISO weeks start on Monday.
        PartitionInterval::Weekly => {
            d - chrono::Duration::days(d.weekday().num_days_from_monday() as i64)
        }
        PartitionInterval::Monthly => ymd(d.year(), d.month(), 1),
        PartitionInterval::Quarterly => ymd(d.year(), (d.month0() / 3) * 3 + 1, 1),
        PartitionInterval::Yearly => ymd(d.year(), 1, 1),
    }
}

/// The start of the interval after the one starting at `start` (an aligned date).
pub fn next(interval: PartitionInterval, start: NaiveDate) -> NaiveDate {
    match interval {
        PartitionInterval::Daily => start + chrono::Duration::days(1),
        PartitionInterval::Weekly => start + chrono::Duration::days(7),
        PartitionInterval::Monthly => start + Months::new(1),
        PartitionInterval::Quarterly => start + Months::new(3),
        PartitionInterval::Yearly => start + Months::new(12),
    }
}

/// The name suffix of the interval starting at `start`:
/// daily `2024_01_31`, weekly `2024_w05` (ISO year and week), monthly `2024_01`,
/// quarterly `2024_q1`, yearly `2024`.
pub fn suffix(interval: PartitionInterval, start: NaiveDate) -> String {
    match interval {
        PartitionInterval::Daily => start.format("%Y_%m_%d").to_string(),
        PartitionInterval::Weekly => {
            let w = start.iso_week();
            format!("{:04}_w{:02}", w.year(), w.week())
        }
        PartitionInterval::Monthly => start.format("%Y_%m").to_string(),
        PartitionInterval::Quarterly => format!("{:04}_q{}", start.year(), start.month0() / 3 + 1),
        PartitionInterval::Yearly => format!("{:04}", start.year()),
    }
}

/// The start of the interval a suffix names, when it is exactly one of ours.
pub fn parse_suffix(interval: PartitionInterval, s: &str) -> Option<NaiveDate> {
    let num = |t: &str| -> Option<u32> {
        (!t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
            .then(|| t.parse().ok())
            .flatten()
    };
    let parts: Vec<&str> = s.split('_').collect();
    let start = match (interval, parts.as_slice()) {
        (PartitionInterval::Daily, [y, m, d]) => {
            NaiveDate::from_ymd_opt(num(y)? as i32, num(m)?, num(d)?)?
        }
        (PartitionInterval::Weekly, [y, w]) => NaiveDate::from_isoywd_opt(
            num(y)? as i32,
            num(w.strip_prefix('w')?)?,
            chrono::Weekday::Mon,
        )?,
        (PartitionInterval::Monthly, [y, m]) => {
            NaiveDate::from_ymd_opt(num(y)? as i32, num(m)?, 1)?
        }
        (PartitionInterval::Quarterly, [y, q]) => {
            let q = num(q.strip_prefix('q')?)?;
            if !(1..=4).contains(&q) {
                return None;
            }
            NaiveDate::from_ymd_opt(num(y)? as i32, (q - 1) * 3 + 1, 1)?
        }
        (PartitionInterval::Yearly, [y]) => NaiveDate::from_ymd_opt(num(y)? as i32, 1, 1)?,
        _ => return None,
    };
    // Only the canonical spelling is ours (`2024_1` is not `2024_01`).
    (suffix(interval, start) == s).then_some(start)
}

/// `table` cut (on a character boundary) so that `<table>_<suffix>` fits in 63 bytes.
fn prefix(table: &str, suffix_len: usize) -> &str {
    let mut end = table.len().min(MAX_IDENT - 1 - suffix_len);
    while !table.is_char_boundary(end) {
        end -= 1;
    }
    &table[..end]
}

/// The name of our partition of `table` for the interval starting at `start`.
pub fn partition_name(table: &str, interval: PartitionInterval, start: NaiveDate) -> String {
    let s = suffix(interval, start);
    format!("{}_{s}", prefix(table, s.len()))
}

/// The name of the default partition we create: `<table>_default`.
pub fn default_name(table: &str) -> String {
    format!("{}_default", prefix(table, "default".len()))
}

/// Microseconds since 1970-01-01 00:00 of a date's midnight (UTC for timestamptz,
/// nominal for timestamp and date): how the observer reports bounds.
pub fn micros(d: NaiveDate) -> i64 {
    d.and_hms_opt(0, 0, 0)
        .expect("midnight")
        .and_utc()
        .timestamp_micros()
}

/// One interval `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Range {
    pub start: NaiveDate,
    pub end: NaiveDate,
}

impl Range {
    fn lo(&self) -> i64 {
        micros(self.start)
    }
    fn hi(&self) -> i64 {
        micros(self.end)
    }
}

/// When a partition ending at `end` is entirely older than the retention.
pub fn cutoff(now: DateTime<Utc>, retention: Retention) -> NaiveDateTime {
    let now = now.naive_utc();
    let back = |m: u32| {
        now.checked_sub_months(Months::new(m))
            .unwrap_or(NaiveDateTime::MIN)
    };
    match retention {
        Retention::Days(n) => now - chrono::Duration::days(n as i64),
        Retention::Weeks(n) => now - chrono::Duration::weeks(n as i64),
        Retention::Months(n) => back(n),
        Retention::Years(n) => back(n.saturating_mul(12)),
    }
}

// ---------------------------------------------------------------- observed state

/// The type of the partition key column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    Date,
    Timestamp,
    Timestamptz,
}

impl KeyType {
    /// From `atttypid::regtype::text`.
    pub fn from_regtype(t: &str) -> Option<KeyType> {
        match t {
            "date" => Some(KeyType::Date),
            "timestamp without time zone" => Some(KeyType::Timestamp),
            "timestamp with time zone" => Some(KeyType::Timestamptz),
            _ => None,
        }
    }
    fn sql_name(self) -> &'static str {
        match self {
            KeyType::Date => "date",
            KeyType::Timestamp => "timestamp",
            KeyType::Timestamptz => "timestamptz",
        }
    }
    /// A bound literal; timestamptz bounds are UTC midnights, whatever the session's zone.
    pub fn literal(self, d: NaiveDate) -> String {
        match self {
            KeyType::Date => quote_literal(&d.format("%Y-%m-%d").to_string()),
            KeyType::Timestamp => quote_literal(&format!("{} 00:00:00", d.format("%Y-%m-%d"))),
            KeyType::Timestamptz => quote_literal(&format!("{} 00:00:00+00", d.format("%Y-%m-%d"))),
        }
    }
}

/// A partition bound as the catalog has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bound {
    Default,
    /// Microseconds since the epoch (see [`micros`]); `i64::MIN`/`i64::MAX` stand for
    /// MINVALUE/MAXVALUE and ±infinity.
    Range {
        from: i64,
        to: i64,
    },
    /// Anything else (`pg_get_expr` text), e.g. a list bound.
    Other(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Child {
    pub name: QualifiedName,
    pub bound: Bound,
    /// `pg_inherits.inhdetachpending`: a `DETACH … CONCURRENTLY` was interrupted.
    pub detach_pending: bool,
}

/// Rows of the default partition: all of them, and those in each range about to be
/// created (keyed by the range's start in micros).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DefaultRows {
    pub total: i64,
    pub in_range: BTreeMap<i64, i64>,
}

/// One declared table as the catalog shows it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TableState {
    /// `pg_class.relkind`: p (partitioned), r (plain table), …
    pub relkind: String,
    /// `pg_partitioned_table.partstrat`: r (range), l (list), h (hash).
    pub strategy: Option<String>,
    pub key_columns: i32,
    /// None when the key is an expression.
    pub key_column: Option<String>,
    /// `regtype` of the key column.
    pub key_type: Option<String>,
    pub owner: String,
    /// Columns a moved row is copied through: not dropped, not generated.
    pub columns: Vec<String>,
    pub children: Vec<Child>,
    /// Relations in the table's schema named like our partitions but not partitions of
    /// this table (detached earlier, or made by hand).
    pub other_relations: BTreeSet<String>,
    /// Counted when the table has a default partition.
    pub default_rows: Option<DefaultRows>,
    /// Triggers and rules of the default partition that fire on DELETE even under
    /// `session_replication_role = replica` (`ENABLE ALWAYS` / `ENABLE REPLICA`), as
    /// `trigger "name" (ENABLE ALWAYS)`: a row move would fire them, so it is refused.
    pub default_fires_on_delete: Vec<String>,
}

/// What the observer saw, and when.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    /// The clock of this reconcile, read once, so observe and plan agree on "now".
    pub now: DateTime<Utc>,
    /// `server_version_num`.
    pub server_version: i32,
    pub current_user: String,
    /// Whether `current_user` may `SET session_replication_role` (a superuser, or
    /// `GRANT SET ON PARAMETER` on PostgreSQL 15+): row moves need it. Read only when
    /// some rows are to move.
    pub can_set_replication_role: bool,
    pub tables: BTreeMap<QualifiedName, TableState>,
    /// Round trips the observer made (constant: 1; 2 when a default partition exists;
    /// 3 when rows are to move).
    pub queries: usize,
}

impl Observed {
    pub fn new(now: DateTime<Utc>) -> Self {
        Observed {
            now,
            server_version: 150_000,
            current_user: "postgres".into(),
            can_set_replication_role: true,
            tables: BTreeMap::new(),
            queries: 0,
        }
    }
}

/// The one catalog query: every declared table (one row each: key, owner, columns,
/// relations named like ours that are not its partitions), then every partition (one row
/// each) with its bound turned into epoch seconds by PostgreSQL itself (the literal cast
/// back to the key's type), so neither `DateStyle` nor `TimeZone` of the session matters.
/// The per-table part is materialized: computed once per table, not once per partition.
const CATALOG_SQL: &str = r#"
WITH t AS MATERIALIZED (
    SELECT d.schema, d.name, c.oid, c.relkind::text AS relkind, pt.partstrat::text AS strategy,
           coalesce(pt.partnatts, 0)::int4 AS key_columns, a.attname::text AS key_column,
           a.atttypid, a.atttypid::regtype::text AS key_type,
           pg_get_userbyid(c.relowner)::text AS owner,
           ARRAY(SELECT x.attname::text FROM pg_attribute x
                 WHERE x.attrelid = c.oid AND x.attnum > 0 AND NOT x.attisdropped
                   AND x.attgenerated = '' ORDER BY x.attnum) AS columns,
           ARRAY(SELECT o.relname::text FROM pg_class o
                 WHERE o.relnamespace = c.relnamespace
                   AND o.relname >= (d.prefix || '_')::name AND o.relname < (d.prefix || '`')::name
                   AND o.relkind IN ('r', 'p', 'f')
                   AND NOT EXISTS (SELECT 1 FROM pg_inherits oi
                                   WHERE oi.inhrelid = o.oid AND oi.inhparent = c.oid)) AS others,
           -- What a DELETE on the default fires even under session_replication_role =
           -- replica (TRIGGER_TYPE_DELETE is bit 3; rule event 4 is DELETE).
           ARRAY(SELECT f FROM (
                   SELECT format('trigger %I (%s)', tg.tgname,
                                 CASE tg.tgenabled WHEN 'A' THEN 'ENABLE ALWAYS' ELSE 'ENABLE REPLICA' END) AS f
                   FROM pg_trigger tg
                   WHERE tg.tgrelid = pt.partdefid AND tg.tgenabled IN ('A', 'R') AND tg.tgtype & 8 <> 0
                   UNION ALL
                   SELECT format('rule %I (%s)', r.rulename,
                                 CASE r.ev_enabled WHEN 'A' THEN 'ENABLE ALWAYS' ELSE 'ENABLE REPLICA' END)
                   FROM pg_rewrite r
                   WHERE r.ev_class = pt.partdefid AND r.ev_enabled IN ('A', 'R') AND r.ev_type = '4'
                 ) fires ORDER BY f) AS fires
    FROM unnest($1::text[], $2::text[], $3::text[]) AS d(schema, name, prefix)
    JOIN pg_namespace n ON n.nspname = d.schema
    JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = d.name
    LEFT JOIN pg_partitioned_table pt ON pt.partrelid = c.oid
    LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND pt.partnatts = 1 AND a.attnum = pt.partattrs[0]
)
SELECT t.schema, t.name, t.relkind, t.strategy, t.key_columns, t.key_column, t.key_type, t.owner,
       current_user::text AS me, current_setting('server_version_num')::int4 AS version,
       t.columns, t.others, t.fires, NULL::text AS child_schema, NULL::text AS child_name,
       NULL::bool AS pending, NULL::text AS bound, NULL::float8 AS lo, NULL::float8 AS hi
FROM t
UNION ALL
SELECT t.schema, t.name, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
       ch.schema, ch.name, ch.pending, ch.bound,
       CASE WHEN ch.lo = 'MINVALUE' THEN '-Infinity'::float8
            WHEN ch.lo = 'MAXVALUE' THEN 'Infinity'::float8
            WHEN t.atttypid = 'timestamptz'::regtype
              THEN extract(epoch FROM btrim(ch.lo, '''')::timestamptz)::float8
            WHEN t.atttypid IN ('timestamp'::regtype, 'date'::regtype)
              THEN extract(epoch FROM btrim(ch.lo, '''')::timestamp)::float8 END,
       CASE WHEN ch.hi = 'MINVALUE' THEN '-Infinity'::float8
            WHEN ch.hi = 'MAXVALUE' THEN 'Infinity'::float8
            WHEN t.atttypid = 'timestamptz'::regtype
              THEN extract(epoch FROM btrim(ch.hi, '''')::timestamptz)::float8
            WHEN t.atttypid IN ('timestamp'::regtype, 'date'::regtype)
              THEN extract(epoch FROM btrim(ch.hi, '''')::timestamp)::float8 END
FROM t
JOIN LATERAL (
    -- `FOR VALUES FROM (<lo>) TO (<hi>)` cut with string functions (cheaper than a regexp
    -- per partition); <lo> and <hi> are one literal each, or MINVALUE/MAXVALUE.
    SELECT b.schema, b.name, b.pending, b.bound,
           CASE WHEN b.bound LIKE 'FOR VALUES FROM (%) TO (%)'
                THEN substr(split_part(b.bound, ') TO (', 1), 18) END AS lo,
           CASE WHEN b.bound LIKE 'FOR VALUES FROM (%) TO (%)'
                THEN left(split_part(b.bound, ') TO (', 2), -1) END AS hi
    FROM (SELECT cn.nspname::text AS schema, cc.relname::text AS name,
                 coalesce((to_jsonb(i) ->> 'inhdetachpending')::bool, false) AS pending,
                 pg_get_expr(cc.relpartbound, cc.oid) AS bound
          FROM pg_inherits i
          JOIN pg_class cc ON cc.oid = i.inhrelid
          JOIN pg_namespace cn ON cn.oid = cc.relnamespace
          WHERE i.inhparent = t.oid
          OFFSET 0) b -- not flattened: pg_get_expr (the costly part) runs once per partition
) ch ON true
"#;

fn epoch_to_micros(seconds: f64) -> i64 {
    if seconds.is_nan() || seconds == f64::INFINITY {
        i64::MAX
    } else if seconds == f64::NEG_INFINITY {
        i64::MIN
    } else {
        (seconds * 1e6).round() as i64
    }
}

/// Reads every declared table in one query, then counts default-partition rows in one
/// more (only when some declared table has a default partition).
pub async fn observe(
    conn: &mut PgConnection,
    spec: &PartitionsSpec,
    now: DateTime<Utc>,
) -> Result<Observed, sqlx::Error> {
    let mut observed = Observed::new(now);
    let names: Vec<QualifiedName> = spec.tables.iter().map(|t| t.qualified()).collect();
    // Owned strings: borrowed ones bound across an await make the engine's future lose
    // `Send` for the controller.
    let schemas: Vec<String> = names.iter().map(|q| q.schema.clone()).collect();
    let tables: Vec<String> = names.iter().map(|q| q.name.clone()).collect();
    let prefixes: Vec<String> = names
        .iter()
        .map(|q| prefix(&q.name, LONGEST_SUFFIX - 1).to_string())
        .collect();
    let rows = sqlx::query(CATALOG_SQL)
        .bind(&schemas)
        .bind(&tables)
        .bind(&prefixes)
        .fetch_all(&mut *conn)
        .await?;
    observed.queries += 1;
    for row in rows {
        let name = QualifiedName::new(
            row.try_get::<String, _>("schema")?,
            row.try_get::<String, _>("name")?,
        );
        let state = observed.tables.entry(name).or_default();
        let child_name: Option<String> = row.try_get("child_name")?;
        let Some(child_name) = child_name else {
            // The table's own row.
            observed.server_version = row.try_get("version")?;
            observed.current_user = row.try_get("me")?;
            state.relkind = row.try_get("relkind")?;
            state.strategy = row.try_get("strategy")?;
            state.key_columns = row.try_get("key_columns")?;
            state.key_column = row.try_get("key_column")?;
            state.key_type = row.try_get("key_type")?;
            state.owner = row.try_get("owner")?;
            state.columns = row.try_get("columns")?;
            state.other_relations = row
                .try_get::<Vec<String>, _>("others")?
                .into_iter()
                .collect();
            state.default_fires_on_delete = row.try_get("fires")?;
            continue;
        };
        let bound_text: Option<String> = row.try_get("bound")?;
        let lo: Option<f64> = row.try_get("lo")?;
        let hi: Option<f64> = row.try_get("hi")?;
        let bound = match (bound_text.as_deref(), lo, hi) {
            (Some("DEFAULT"), _, _) => Bound::Default,
            (_, Some(lo), Some(hi)) => Bound::Range {
                from: epoch_to_micros(lo),
                to: epoch_to_micros(hi),
            },
            (text, _, _) => Bound::Other(text.unwrap_or_default().to_string()),
        };
        state.children.push(Child {
            name: QualifiedName::new(row.try_get::<String, _>("child_schema")?, child_name),
            bound,
            detach_pending: row.try_get("pending")?,
        });
    }
    for state in observed.tables.values_mut() {
        state.children.sort_by(|a, b| a.name.cmp(&b.name));
    }
    count_default_rows(conn, spec, &mut observed).await?;
    observe_replication_role(conn, &mut observed).await?;
    Ok(observed)
}

/// Whether the role may set `session_replication_role`, asked only when rows are to
/// move (a missing range has rows in a default partition).
async fn observe_replication_role(
    conn: &mut PgConnection,
    observed: &mut Observed,
) -> Result<(), sqlx::Error> {
    let moving = observed.tables.values().any(|t| {
        t.default_rows
            .as_ref()
            .is_some_and(|d| d.in_range.values().any(|n| *n > 0))
    });
    if !moving {
        return Ok(());
    }
    // `has_parameter_privilege` (and GRANT SET ON PARAMETER) exist from PostgreSQL 15 on;
    // before, only a superuser may set it. It answers true for a superuser.
    let sql = if observed.server_version >= 150_000 {
        "SELECT has_parameter_privilege('session_replication_role', 'SET')"
    } else {
        "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
    };
    observed.can_set_replication_role = sqlx::query_scalar(sql).fetch_one(&mut *conn).await?;
    observed.queries += 1;
    Ok(())
}

/// One round trip for all default partitions: per default, a `GROUP BY width_bucket(key,
/// <bounds of the ranges about to be created>)` gives the rows of each such range and the
/// total, in one scan of that default.
async fn count_default_rows(
    conn: &mut PgConnection,
    spec: &PartitionsSpec,
    observed: &mut Observed,
) -> Result<(), sqlx::Error> {
    let mut branches = Vec::new();
    let mut thresholds_of: Vec<(QualifiedName, Vec<i64>)> = Vec::new();
    for t in &spec.tables {
        let name = t.qualified();
        let Some(state) = observed.tables.get(&name) else {
            continue;
        };
        let Ok(valid) = validate_table(t, state) else {
            continue;
        };
        let Some(default) = state.children.iter().find(|c| c.bound == Bound::Default) else {
            continue;
        };
        let ranges = match layout(t, state, observed) {
            Ok(l) => l.missing,
            Err(_) => Vec::new(),
        };
        // Sorted bounds of the missing ranges: range i starts at bucket position of its lo.
        let mut thresholds: Vec<NaiveDate> = ranges.iter().flat_map(|r| [r.start, r.end]).collect();
        thresholds.sort();
        thresholds.dedup();
        let key = quote_ident(&valid.column);
        let bucket = if thresholds.is_empty() {
            "NULL::int4".to_string()
        } else {
            format!(
                "width_bucket({key}, ARRAY[{}]::{}[])",
                thresholds
                    .iter()
                    .map(|d| valid.key_type.literal(*d))
                    .collect::<Vec<_>>()
                    .join(", "),
                valid.key_type.sql_name()
            )
        };
        branches.push(format!(
            "SELECT {idx}::int4 AS t, {bucket} AS b, count(*)::int8 AS n FROM {} GROUP BY 2",
            default.name.quoted(),
            idx = thresholds_of.len(),
        ));
        thresholds_of.push((name, thresholds.iter().map(|d| micros(*d)).collect()));
    }
    if branches.is_empty() {
        return Ok(());
    }
    let sql = branches
        .iter()
        .map(|b| format!("({b})"))
        .collect::<Vec<_>>()
        .join("\nUNION ALL\n");
    // Not prepared-and-cached: the text changes with the ranges (and `raw_sql`'s fetch
    // would make the engine's future lose `Send`).
    let rows = sqlx::query(&sql)
        .persistent(false)
        .fetch_all(&mut *conn)
        .await?;
    observed.queries += 1;
    for (name, _) in &thresholds_of {
        if let Some(s) = observed.tables.get_mut(name) {
            s.default_rows = Some(DefaultRows::default());
        }
    }
    for row in rows {
        let t: i32 = row.try_get("t")?;
        let b: Option<i32> = row.try_get("b")?;
        let n: i64 = row.try_get("n")?;
        let Some((name, thresholds)) = thresholds_of.get(t as usize) else {
            continue;
        };
        let Some(rows) = observed
            .tables
            .get_mut(name)
            .and_then(|s| s.default_rows.as_mut())
        else {
            continue;
        };
        rows.total += n;
        // Bucket b (1-based) is [thresholds[b-1], thresholds[b]); 0 and len are outside.
        if let Some(b) = b.filter(|b| *b >= 1 && (*b as usize) < thresholds.len()) {
            *rows.in_range.entry(thresholds[b as usize - 1]).or_default() += n;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- planning

/// A declared table that passed the checks.
#[derive(Debug, Clone)]
struct Valid {
    column: String,
    key_type: KeyType,
}

/// Why a declared table cannot be maintained: (reason, message).
type TableError = (Reason, String);

fn validate_table(t: &PartitionedTable, state: &TableState) -> Result<Valid, TableError> {
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
struct Layout {
    /// Desired ranges that do not exist yet, oldest first.
    missing: Vec<Range>,
    /// Ours, by start.
    ours: BTreeMap<NaiveDate, Child>,
    default: Option<Child>,
    /// Partitions we did not name.
    foreign: Vec<Child>,
    /// Past desired ranges not created because a relation already has their name.
    name_taken: Vec<(Range, String)>,
}

fn layout(
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
        Some(r) => Some(parse_retention(r).map_err(|e| (Reason::InvalidRetention, e))?),
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
fn ours_start(table: &str, interval: PartitionInterval, child: &str) -> Option<NaiveDate> {
    // Suffixes contain underscores; try each split point and keep the one that rebuilds
    // exactly our name.
    child
        .match_indices('_')
        .filter_map(|(i, _)| parse_suffix(interval, &child[i + 1..]))
        .find(|start| partition_name(table, interval, *start) == child)
}

fn describe_micros(m: i64) -> String {
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

fn describe_bound(b: &Bound) -> String {
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
pub fn diff(spec: &PartitionsSpec, observed: &Observed, plan: &mut AreaPlan) -> Vec<Op> {
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
fn check_moves(
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

fn op_table(op: &Op) -> &QualifiedName {
    match op {
        Op::Create { table, .. }
        | Op::CreateMovingRows { table, .. }
        | Op::CreateDefault { table, .. }
        | Op::Detach { table, .. }
        | Op::FinalizeDetach { table, .. }
        | Op::Drop { table, .. } => table,
    }
}

fn is_autonomous(op: &Op) -> bool {
    matches!(
        op,
        Op::Detach {
            concurrently: true,
            ..
        } | Op::FinalizeDetach { .. }
    )
}

fn in_schema(table: &QualifiedName, name: &str) -> QualifiedName {
    QualifiedName::new(table.schema.clone(), name)
}

fn owner_change(
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
    })
}

/// A lock on a partitioned table itself (ONLY: its partitions are locked as needed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ParentLock {
    /// Blocks writers (and other DDL), not readers: what a row move needs.
    ShareRowExclusive,
    /// What CREATE … PARTITION OF and DETACH take anyway.
    AccessExclusive,
}

fn lock_parent(table: &QualifiedName, mode: ParentLock) -> Change {
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
}

/// The statements of one op.
pub fn render(op: &Op) -> Vec<Change> {
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
            .hazard(Hazard::Locking)];
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
                .hazard(Hazard::Locking),
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
                ),
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
                .hazard(Hazard::Locking),
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
            .hazard(Hazard::Locking)];
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
                // SHARE UPDATE EXCLUSIVE only; not allowed in a transaction block.
                .autonomous()]
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
                .hazard(Hazard::Locking)]
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
        .autonomous()],
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
        .hazard(Hazard::Destructive)],
    }
}

/// Most ops of one table in one transaction. Each takes a few locks (the new partition,
/// its indexes, the parent) held to the end of its transaction: a whole run in one would
/// exhaust the server's lock table (`max_locks_per_transaction`) on a large policy.
pub const OPS_PER_TRANSACTION: usize = 50;

pub fn plan(spec: &PartitionsSpec, observed: &Observed) -> AreaPlan {
    let mut plan = AreaPlan::new(AREA);
    let ops = diff(spec, observed, &mut plan);
    // One transaction per table (per OPS_PER_TRANSACTION of its ops): a table's creates,
    // row moves and detaches are all or nothing, and locks are let go table by table.
    let mut groups: Vec<Vec<&Op>> = Vec::new();
    let mut last: Option<&QualifiedName> = None;
    for op in &ops {
        let table = op_table(op);
        match groups.last_mut() {
            Some(g) if last == Some(table) && g.len() < OPS_PER_TRANSACTION => g.push(op),
            _ => groups.push(vec![op]),
        }
        last = Some(table);
    }
    for (n, group) in groups.iter().enumerate() {
        let table = op_table(group[0]);
        let key = format!("{table}#{}", n + 1);
        // A row move locks the parent SHARE ROW EXCLUSIVE first; the other ops of its
        // transaction (CREATE … PARTITION OF, DETACH) take ACCESS EXCLUSIVE on it. Taking
        // that one first, before any partition, means no lock upgrade in the middle, which
        // could deadlock with a reader waiting behind the default partition's lock.
        let moves = group
            .iter()
            .any(|o| matches!(o, Op::CreateMovingRows { .. }));
        // (Autonomous ops run outside the transaction: they do not count.)
        let others = group
            .iter()
            .any(|o| !matches!(o, Op::CreateMovingRows { .. }) && !is_autonomous(o));
        if moves && others {
            plan.changes
                .push(lock_parent(table, ParentLock::AccessExclusive).in_group(key.clone()));
        }
        plan.changes.extend(
            group
                .iter()
                .flat_map(|op| render(op))
                .map(|c| c.in_group(key.clone())),
        );
    }
    plan
}

/// The catalog as it will be after `ops` (for tests of convergence).
pub fn simulate(observed: &Observed, ops: &[Op]) -> Observed {
    let mut next = observed.clone();
    let range_child = |table: &QualifiedName, partition: &str, range: &Range| Child {
        name: in_schema(table, partition),
        bound: Bound::Range {
            from: range.lo(),
            to: range.hi(),
        },
        detach_pending: false,
    };
    for op in ops {
        let Some(state) = next.tables.get_mut(op_table(op)) else {
            continue;
        };
        match op {
            Op::Create {
                table,
                partition,
                range,
                ..
            } => state.children.push(range_child(table, partition, range)),
            Op::CreateMovingRows {
                table,
                partition,
                range,
                rows,
                ..
            } => {
                state.children.push(range_child(table, partition, range));
                if let Some(d) = state.default_rows.as_mut() {
                    d.in_range.remove(&range.lo());
                    d.total -= rows;
                }
            }
            Op::CreateDefault {
                table, partition, ..
            } => {
                state.children.push(Child {
                    name: in_schema(table, partition),
                    bound: Bound::Default,
                    detach_pending: false,
                });
                state.default_rows = Some(DefaultRows::default());
            }
            Op::Detach { partition, .. }
            | Op::FinalizeDetach { partition, .. }
            | Op::Drop { partition, .. } => {
                state.children.retain(|c| &c.name != partition);
                if !matches!(op, Op::Drop { .. }) {
                    state.other_relations.insert(partition.name.clone());
                }
            }
        }
    }
    next
}

/// Status per declared table (tables with errors are left out: their condition says why).
pub fn status(spec: &PartitionsSpec, observed: &Observed) -> Vec<PartitionTableStatus> {
    let mut out = Vec::new();
    for t in &spec.tables {
        let name = t.qualified();
        let Some(state) = observed.tables.get(&name) else {
            continue;
        };
        if validate_table(t, state).is_err() {
            continue;
        }
        let ranges: Vec<(i64, i64)> = state
            .children
            .iter()
            .filter_map(|c| match c.bound {
                Bound::Range { from, to } => Some((from, to)),
                _ => None,
            })
            .collect();
        let has_default = state.children.iter().any(|c| c.bound == Bound::Default);
        // The next moment the plan changes by the clock alone: the next interval boundary
        // (premake moves on), or the next partition of ours to age past the retention.
        let today = observed.now.date_naive();
        let mut next_due = next(t.interval, floor(t.interval, today))
            .and_hms_opt(0, 0, 0)
            .expect("midnight")
            .and_utc();
        if let (Some(r), Ok(l)) = (
            t.retention.as_deref().and_then(|r| parse_retention(r).ok()),
            layout(t, state, observed),
        ) {
            if let Some(start) = l.ours.keys().next() {
                let end = next(t.interval, *start)
                    .and_hms_opt(0, 0, 0)
                    .expect("midnight");
                let due = match r {
                    Retention::Days(n) => end + chrono::Duration::days(n as i64),
                    Retention::Weeks(n) => end + chrono::Duration::weeks(n as i64),
                    Retention::Months(n) => end.checked_add_months(Months::new(n)).unwrap_or(end),
                    Retention::Years(n) => end
                        .checked_add_months(Months::new(n.saturating_mul(12)))
                        .unwrap_or(end),
                };
                next_due = next_due.min(due.and_utc().max(observed.now));
            }
        }
        out.push(PartitionTableStatus {
            table: name.to_string(),
            partitions: ranges.len() as u32,
            oldest_bound: ranges.iter().map(|r| r.0).min().map(describe_micros),
            newest_bound: ranges.iter().map(|r| r.1).max().map(describe_micros),
            rows_in_default: has_default
                .then(|| state.default_rows.as_ref().map(|d| d.total))
                .flatten(),
            next_maintenance: Some(next_due.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
        });
    }
    out
}

/// Range partitions on a calendar grid: premade ahead, retired behind, rows moved out of
/// the default partition.
pub struct Partitions;

impl AreaModule for Partitions {
    const AREA: Area = AREA;
    type Spec = PartitionsSpec;
    type Observed = Observed;
    type Op = Op;

    fn section(spec: &crate::api::DatabasePolicySpec) -> Option<&PartitionsSpec> {
        spec.partitions.as_ref()
    }

    /// The clock is read here, once: the plan is a pure function of what was observed.
    async fn observe(
        conn: &mut PgConnection,
        section: &PartitionsSpec,
        ctx: ObserveContext<'_>,
    ) -> Result<Observed, ObserveError> {
        let now = ctx.now()?;
        Ok(observe(conn, section, now).await?)
    }

    fn diff(
        section: &PartitionsSpec,
        observed: &Observed,
        _ctx: &PlanContext<'_>,
        plan: &mut AreaPlan,
    ) -> Vec<Op> {
        diff(section, observed, plan)
    }

    fn render(_: &PartitionsSpec, op: &Op) -> Vec<Change> {
        render(op)
    }

    fn simulate(_: &PartitionsSpec, observed: &Observed, ops: &[Op]) -> Observed {
        simulate(observed, ops)
    }

    /// One transaction per table (see [`plan`]).
    fn plan(section: &PartitionsSpec, observed: &Observed, _ctx: &mut PlanContext<'_>) -> AreaPlan {
        plan(section, observed)
    }

    fn facts(section: &PartitionsSpec, observed: &Observed, facts: &mut Facts) {
        facts.partitions = Some(status(section, observed));
    }
}

#[cfg(test)]
mod tests;
