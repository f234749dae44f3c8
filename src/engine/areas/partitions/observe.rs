//! What the catalog says about the declared tables and their partitions: one catalog
//! query for all tables, one counting rows of the default partitions.

use super::*;

/// The type of the partition key column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    Date,
    Timestamp,
    Timestamptz,
}

impl KeyType {
    /// From `atttypid::regtype::text`.
    pub(crate) fn from_regtype(t: &str) -> Option<KeyType> {
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
    pub(crate) fn literal(self, d: NaiveDate) -> String {
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
    pub(crate) fn new(now: DateTime<Utc>) -> Self {
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
pub(super) const CATALOG_SQL: &str = r#"
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

pub(super) fn epoch_to_micros(seconds: f64) -> i64 {
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
pub(super) async fn observe_replication_role(
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
pub(super) async fn count_default_rows(
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
