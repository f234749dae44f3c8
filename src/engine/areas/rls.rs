//! Row-level security: `ENABLE`/`FORCE ROW LEVEL SECURITY` per table and its policies
//! (`CREATE`/`ALTER`/`DROP POLICY`). Observed with one catalog query for all tables, one
//! for the roles the policies name, and one normalisation pass that has PostgreSQL rewrite
//! every desired `USING`/`WITH CHECK` expression into the form `pg_get_expr` shows, inside
//! a transaction that is always rolled back, so a rewritten expression is never drift.

use std::collections::{BTreeMap, BTreeSet};

use sqlx::{Connection, PgConnection};

use crate::api::{
    PolicyCommand, PolicyKind, RlsPolicy, RlsTable, RowLevelSecuritySpec, TableTarget,
};
use crate::engine::ledger::Ledger;
use crate::engine::normcache;
use crate::engine::plan::{Area, AreaPlan, Change, Hazard};
use crate::engine::scratch;
use crate::pg::grammar::check_expression;
use crate::pg::{execute_one, quote_ident, QualifiedName};

const AREA: Area = Area::RowLevelSecurity;

/// How PUBLIC is spelled in role sets: `public` is reserved, so no role can have that name.
pub const PUBLIC: &str = "public";

/// One policy as the catalog shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyState {
    pub command: PolicyCommand,
    pub kind: PolicyKind,
    /// Role names, [`PUBLIC`] for PUBLIC.
    pub roles: BTreeSet<String>,
    /// `pg_get_expr(polqual)`.
    pub using: Option<String>,
    /// `pg_get_expr(polwithcheck)`.
    pub with_check: Option<String>,
}

/// One table as the catalog shows it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TableState {
    /// `pg_class.relkind`: r (table), p (partitioned table), v (view), …
    pub relkind: String,
    pub enabled: bool,
    pub force: bool,
    /// The connecting role neither owns the table nor is a member of its owner role: it may
    /// not create policies on it or enable RLS.
    pub not_owned: bool,
    pub policies: BTreeMap<String, PolicyState>,
}

/// A desired policy's expressions as PostgreSQL stores them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Normalized {
    pub using: Option<String>,
    pub with_check: Option<String>,
}

/// Why PostgreSQL refused a desired policy during normalisation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpressionError {
    pub sqlstate: Option<String>,
    pub message: String,
}

/// What the live database holds for the spec's tables.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Observed {
    /// Tables that exist; a name that is absent does not exist.
    pub tables: BTreeMap<QualifiedName, TableState>,
    /// The roles named by the spec that exist.
    pub roles: BTreeSet<String>,
    /// Per (table, policy name): the desired expressions in PostgreSQL's own form, or
    /// PostgreSQL's refusal. A policy absent here is compared as written.
    pub normalized: BTreeMap<(QualifiedName, String), Result<Normalized, ExpressionError>>,
    /// Per (table, policy name): the key of its desired expressions in the normalisation
    /// cache ([`normcache`]), for the changes that create or alter it to record.
    pub cache_keys: BTreeMap<(QualifiedName, String), String>,
    /// Items normalised on a twin this run whose form the catalog already shows: recorded
    /// in the cache after a successful apply, so the next check needs no twin for them.
    pub cache_fill: Vec<normcache::Record>,
    /// How many twin tables this run built (0 on a no-op whose cache is up to date).
    pub twins: usize,
}

// ------------------------------------------------------------------------------- observe

/// One row per (table, policy); the policy columns are NULL for a table without policies.
type CatalogRow = (
    String,
    String,
    String,
    bool,
    bool,
    bool,
    Option<String>,
    Option<String>,
    Option<bool>,
    Option<Vec<String>>,
    Option<String>,
    Option<String>,
    String,
    Option<String>,
);

const CATALOG_SQL: &str = "SELECT n.nspname::text, c.relname::text, c.relkind::text,
       c.relrowsecurity, c.relforcerowsecurity, NOT pg_has_role(c.relowner, 'USAGE'),
       p.polname::text, p.polcmd::text, p.polpermissive,
       CASE WHEN p.oid IS NOT NULL THEN
         ARRAY(SELECT CASE WHEN r = 0 THEN 'public' ELSE pg_get_userbyid(r)::text END
               FROM unnest(p.polroles) AS r)
       END,
       pg_get_expr(p.polqual, p.polrelid), pg_get_expr(p.polwithcheck, p.polrelid),
       s.shape, p.oid::text || ':' || p.xmin::text
FROM unnest($1::text[], $2::text[]) AS d(schema, name)
JOIN pg_namespace n ON n.nspname = d.schema
JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = d.name
CROSS JOIN LATERAL (
  SELECT coalesce(string_agg(quote_ident(a.attname) || ' ' || format_type(a.atttypid, a.atttypmod)
                             || ' ' || a.attcollation::text, ', ' ORDER BY a.attnum), '')
  FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
) AS s(shape)
LEFT JOIN pg_policy p ON p.polrelid = c.oid";

/// Reads the spec's tables and policies (one query), the roles they name (one query), and
/// normalises the desired expressions (one rolled-back transaction of three round trips),
/// whatever the number of tables and policies.
pub async fn observe(
    conn: &mut PgConnection,
    spec: &RowLevelSecuritySpec,
) -> Result<Observed, sqlx::Error> {
    let names: BTreeSet<QualifiedName> = spec.tables.iter().map(|t| t.qualified()).collect();
    let (schemas, tables): (Vec<String>, Vec<String>) =
        names.into_iter().map(|q| (q.schema, q.name)).unzip();
    let rows: Vec<CatalogRow> = sqlx::query_as(CATALOG_SQL)
        .bind(&schemas)
        .bind(&tables)
        .fetch_all(&mut *conn)
        .await?;
    let mut observed = Observed::default();
    let mut shapes = BTreeMap::new();
    let mut versions = BTreeMap::new();
    for (
        schema,
        name,
        relkind,
        enabled,
        force,
        not_owned,
        polname,
        polcmd,
        permissive,
        roles,
        using,
        check,
        shape,
        version,
    ) in rows
    {
        shapes.insert(QualifiedName::new(&schema, &name), shape);
        if let (Some(polname), Some(version)) = (&polname, version) {
            versions.insert(
                (QualifiedName::new(&schema, &name), polname.clone()),
                version,
            );
        }
        let table = observed
            .tables
            .entry(QualifiedName::new(schema, name))
            .or_insert_with(|| TableState {
                relkind,
                enabled,
                force,
                not_owned,
                policies: BTreeMap::new(),
            });
        if let Some(polname) = polname {
            table.policies.insert(
                polname,
                PolicyState {
                    command: command_from_catalog(polcmd.as_deref().unwrap_or("*")),
                    kind: if permissive.unwrap_or(true) {
                        PolicyKind::Permissive
                    } else {
                        PolicyKind::Restrictive
                    },
                    roles: roles.unwrap_or_default().into_iter().collect(),
                    using,
                    with_check: check,
                },
            );
        }
    }

    let wanted: Vec<String> = spec
        .tables
        .iter()
        .flat_map(|t| t.policies.iter())
        .flat_map(|p| desired_roles(p).unwrap_or_default())
        .filter(|r| r != PUBLIC)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    if !wanted.is_empty() {
        let existing: Vec<String> = sqlx::query_scalar(
            "SELECT rolname::text FROM pg_roles WHERE rolname = ANY($1::text[])",
        )
        .bind(&wanted)
        .fetch_all(&mut *conn)
        .await?;
        observed.roles = existing.into_iter().collect();
    }

    let environment = normcache::environment(conn).await?;
    let keys = cache_keys(spec, &observed.tables, &shapes, &environment);
    let wanted: Vec<String> = keys
        .values()
        .cloned()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let cached = normcache::read(conn, &wanted).await?;
    let (hits, misses) = use_cache(&keys, &cached, &observed.tables, &versions);
    let (fresh, twins) = normalize(conn, spec, &observed.tables, &shapes, &misses).await?;
    observed.cache_fill = fill(&fresh, &keys, &observed.tables);
    observed.normalized = hits;
    observed.normalized.extend(fresh);
    observed.cache_keys = keys;
    observed.twins = twins;
    Ok(observed)
}

fn command_from_catalog(polcmd: &str) -> PolicyCommand {
    match polcmd {
        "r" => PolicyCommand::Select,
        "a" => PolicyCommand::Insert,
        "w" => PolicyCommand::Update,
        "d" => PolicyCommand::Delete,
        _ => PolicyCommand::All,
    }
}

/// One spec table's desired policies, as normalisation creates them on its twin.
struct NormalizeTable<'a> {
    name: QualifiedName,
    policies: Vec<NormalizePolicy<'a>>,
}

struct NormalizePolicy<'a> {
    name: &'a str,
    command: &'static str,
    clauses: String,
}

type NormalizedPolicies = BTreeMap<(QualifiedName, String), Result<Normalized, ExpressionError>>;

/// Has PostgreSQL rewrite every desired expression of the spec's existing tables, in a
/// transaction that is always rolled back: nothing is left behind, whatever happens.
///
/// Each spec table gets a temporary twin of the same name (`CREATE TEMP TABLE … (LIKE …)`,
/// which only takes ACCESS SHARE on the real table: a policy on the real table would take
/// ACCESS EXCLUSIVE on every reconcile), each desired policy is created on the twin, and
/// `pg_get_expr` reads it back. The twin has the real table's name and column types, and
/// `pg_temp` goes last in the search path so that names in the expression resolve as they
/// do for the real table; the deparsed text is therefore the one the real policy shows.
/// The twin is partitioned (by an extra column) only so that it has no storage: no file,
/// no TOAST table, which makes it about fifteen times cheaper than a plain temporary table.
/// Creating a policy never evaluates its expressions.
///
/// Every statement carrying an expression is sent alone (extended protocol), after
/// [`check_expression`] accepted the expression. Each table's work runs in a savepoint
/// that is always rolled back, so a thousand tables never hold thousands of locks. Inside
/// it, the table's policies are created together; only when one is invalid are they
/// created again one savepoint each, to name every bad one.
async fn normalize(
    conn: &mut PgConnection,
    spec: &RowLevelSecuritySpec,
    tables: &BTreeMap<QualifiedName, TableState>,
    shapes: &BTreeMap<QualifiedName, String>,
    misses: &BTreeSet<(QualifiedName, String)>,
) -> Result<(NormalizedPolicies, usize), sqlx::Error> {
    let mut input = Vec::new();
    for t in &spec.tables {
        let name = t.qualified();
        if !tables
            .get(&name)
            .is_some_and(|s| matches!(s.relkind.as_str(), "r" | "p"))
        {
            continue;
        }
        let policies: Vec<NormalizePolicy> = t
            .policies
            .iter()
            // Text that is not one expression never reaches PostgreSQL (see check_expression).
            .filter(|p| misses.contains(&(name.clone(), p.name.clone())))
            .filter(|p| expressions(p).is_ok())
            .map(|p| NormalizePolicy {
                name: &p.name,
                command: command_sql(p.command.unwrap_or_default()),
                clauses: clauses_sql(p.using.as_deref(), p.with_check.as_deref()),
            })
            .collect();
        if !policies.is_empty() {
            input.push(NormalizeTable { name, policies });
        }
    }
    let mut out = BTreeMap::new();
    if input.is_empty() {
        return Ok((out, 0));
    }
    // Each distinct (schema, table shape, policies) is normalised once: tables alike get
    // the first one's result.
    let mut groups: BTreeMap<TwinGroup, Vec<usize>> = BTreeMap::new();
    for (i, t) in input.iter().enumerate() {
        let key = twin_group(t, tables, shapes);
        groups.entry(key).or_default().push(i);
    }
    let mut representatives = Vec::with_capacity(groups.len());
    let mut members = Vec::new();
    for indexes in groups.values() {
        representatives.push(&input[indexes[0]]);
        for &m in &indexes[1..] {
            members.push((indexes[0], m));
        }
    }
    let mut tx = conn.begin().await?;
    let result = normalize_in(&mut tx, &representatives, &mut out).await;
    let rolled_back = tx.rollback().await;
    result?;
    rolled_back?;
    for (rep, member) in members {
        let (rep, member) = (&input[rep], &input[member]);
        for p in &member.policies {
            if let Some(v) = out.get(&(rep.name.clone(), p.name.to_string())).cloned() {
                out.insert((member.name.clone(), p.name.to_string()), v);
            }
        }
    }
    Ok((out, representatives.len()))
}

/// What decides PostgreSQL's form of a table's policies, besides the environment: the
/// schema, the columns (names, types, collations), whether we own the table, the policies
/// as written, and the table's own name when an expression mentions it (a reference to
/// the table itself must not resolve to another table's twin).
type TwinGroup = (
    String,
    String,
    bool,
    String,
    Vec<(String, &'static str, String)>,
);

fn twin_group(
    t: &NormalizeTable<'_>,
    tables: &BTreeMap<QualifiedName, TableState>,
    shapes: &BTreeMap<QualifiedName, String>,
) -> TwinGroup {
    let policies: Vec<(String, &'static str, String)> = t
        .policies
        .iter()
        .map(|p| (p.name.to_string(), p.command, p.clauses.clone()))
        .collect();
    let mentioned = policies.iter().any(|(_, _, c)| mentions(c, &t.name.name));
    (
        t.name.schema.clone(),
        shapes.get(&t.name).cloned().unwrap_or_default(),
        tables.get(&t.name).is_some_and(|s| s.not_owned),
        if mentioned {
            t.name.name.clone()
        } else {
            String::new()
        },
        policies,
    )
}

/// Whether `text` mentions `name` as a word, ignoring case (conservative: quoting and
/// schema qualification do not hide it).
fn mentions(text: &str, name: &str) -> bool {
    let (text, name) = (text.to_lowercase(), name.to_lowercase());
    let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$');
    text.match_indices(&name).any(|(i, m)| {
        !word(text[..i].chars().next_back()) && !word(text[i + m.len()..].chars().next())
    })
}

/// The normalisation cache key of every desired policy that normalisation would see.
fn cache_keys(
    spec: &RowLevelSecuritySpec,
    tables: &BTreeMap<QualifiedName, TableState>,
    shapes: &BTreeMap<QualifiedName, String>,
    environment: &str,
) -> BTreeMap<(QualifiedName, String), String> {
    let mut keys = BTreeMap::new();
    for t in &spec.tables {
        let name = t.qualified();
        let Some(state) = tables.get(&name) else {
            continue;
        };
        if !matches!(state.relkind.as_str(), "r" | "p") {
            continue;
        }
        let shape = shapes.get(&name).map(String::as_str).unwrap_or_default();
        for p in t.policies.iter().filter(|p| expressions(p).is_ok()) {
            let written = |e: &Option<String>| match e {
                Some(e) => format!("+{}", e.trim()),
                None => "-".to_string(),
            };
            let (using, check) = (written(&p.using), written(&p.with_check));
            let mentioned = mentions(&using, &name.name) || mentions(&check, &name.name);
            let key = normcache::key(&[
                "rowLevelSecurity/1",
                environment,
                &name.schema,
                &name.name,
                &p.name,
                shape,
                if mentioned { &name.name } else { "" },
                if state.not_owned {
                    "not owned"
                } else {
                    "owned"
                },
                command_sql(p.command.unwrap_or_default()),
                &using,
                &check,
            ]);
            keys.insert((name.clone(), p.name.clone()), key);
        }
    }
    keys
}

/// Splits the keyed policies into those the cache answers (its form is exactly what the
/// catalog shows now for that policy, whose catalog row is the version the form was
/// recorded against) and those to normalise on a twin. A row that fails either, stale or
/// tampered, is never used: the twin decides.
fn use_cache(
    keys: &BTreeMap<(QualifiedName, String), String>,
    cached: &BTreeMap<String, normcache::Cached>,
    tables: &BTreeMap<QualifiedName, TableState>,
    versions: &BTreeMap<(QualifiedName, String), String>,
) -> (NormalizedPolicies, BTreeSet<(QualifiedName, String)>) {
    let mut hits = BTreeMap::new();
    let mut misses = BTreeSet::new();
    for (item, key) in keys {
        let (table, policy) = item;
        let live = tables.get(table).and_then(|t| t.policies.get(policy));
        match (cached.get(key), live) {
            (Some(row), Some(live))
                if row.using == live.using
                    && row.with_check == live.with_check
                    && row.version.is_some()
                    && row.version.as_ref() == versions.get(item) =>
            {
                hits.insert(
                    (table.clone(), policy.clone()),
                    Ok(Normalized {
                        using: row.using.clone(),
                        with_check: row.with_check.clone(),
                    }),
                );
            }
            _ => {
                misses.insert((table.clone(), policy.clone()));
            }
        }
    }
    (hits, misses)
}

/// The cache rows of items normalised this run that the catalog already shows as
/// PostgreSQL would store them (one per key).
fn fill(
    fresh: &NormalizedPolicies,
    keys: &BTreeMap<(QualifiedName, String), String>,
    tables: &BTreeMap<QualifiedName, TableState>,
) -> Vec<normcache::Record> {
    let mut rows = BTreeMap::new();
    for ((table, policy), n) in fresh {
        let (Ok(n), Some(key)) = (n, keys.get(&(table.clone(), policy.clone()))) else {
            continue;
        };
        let live = tables.get(table).and_then(|t| t.policies.get(policy));
        if live.is_some_and(|l| l.using == n.using && l.with_check == n.with_check) {
            rows.insert(
                key.clone(),
                normcache::Record {
                    key: key.clone(),
                    table: table.clone(),
                    name: policy.clone(),
                    using: n.using.clone(),
                    with_check: n.with_check.clone(),
                },
            );
        }
    }
    rows.into_values().collect()
}

async fn normalize_in(
    conn: &mut PgConnection,
    input: &[&NormalizeTable<'_>],
    out: &mut NormalizedPolicies,
) -> Result<(), sqlx::Error> {
    sqlx::Executor::execute(
        &mut *conn,
        "SELECT set_config('search_path',
            CASE WHEN current_setting('search_path') = '' THEN 'pg_temp'
                 ELSE current_setting('search_path') || ', pg_temp' END, true)",
    )
    .await?;
    for t in input {
        scratch::savepoint(conn).await?;
        let mut result = twin_policies(conn, t, false).await;
        if matches!(&result, Ok(errors) if !errors.is_empty()) || result.is_err() {
            // Name every bad policy: again, one savepoint each.
            scratch::release_savepoint(conn).await?;
            scratch::savepoint(conn).await?;
            result = twin_policies(conn, t, true).await;
        }
        let read = match result {
            Ok(errors) => {
                let read = read_twin(conn, &t.name).await;
                read.map(|rows| (rows, errors))
            }
            Err(e) => Err(e),
        };
        scratch::release_savepoint(conn).await?;
        match scratch::item_outcome(read)? {
            Ok((rows, errors)) => {
                for (policy, using, with_check) in rows {
                    out.insert(
                        (t.name.clone(), policy),
                        Ok(Normalized { using, with_check }),
                    );
                }
                for (policy, error) in errors {
                    out.insert((t.name.clone(), policy), Err(error));
                }
            }
            // The table itself failed (e.g. no SELECT privilege for LIKE): every policy.
            Err((sqlstate, message)) => {
                for p in &t.policies {
                    out.insert(
                        (t.name.clone(), p.name.to_string()),
                        Err(ExpressionError {
                            sqlstate: sqlstate.clone(),
                            message: message.clone(),
                        }),
                    );
                }
            }
        }
    }
    Ok(())
}

/// Creates the twin and its policies. With `one_by_one`, each policy gets a savepoint of
/// its own and a refused one is returned with PostgreSQL's reason; without, the first
/// refusal is an error (the caller then retries one by one).
async fn twin_policies(
    conn: &mut PgConnection,
    t: &NormalizeTable<'_>,
    one_by_one: bool,
) -> Result<Vec<(String, ExpressionError)>, sqlx::Error> {
    let twin = quote_ident(&t.name.name);
    execute_one(
        &mut *conn,
        &format!(
            "CREATE TEMP TABLE {twin} (LIKE {}, \"dbpolicy twin key\" int) PARTITION BY LIST (\"dbpolicy twin key\")",
            t.name.quoted()
        ),
    )
    .await?;
    let mut refused = Vec::new();
    for p in &t.policies {
        let sql = format!(
            "CREATE POLICY {} ON pg_temp.{twin} FOR {}{}",
            quote_ident(p.name),
            p.command,
            p.clauses
        );
        if !one_by_one {
            execute_one(&mut *conn, &sql).await?;
            continue;
        }
        sqlx::Executor::execute(&mut *conn, "SAVEPOINT dbpolicy_policy").await?;
        let created = execute_one(&mut *conn, &sql).await;
        let rollback = if created.is_ok() {
            "RELEASE SAVEPOINT dbpolicy_policy"
        } else {
            "ROLLBACK TO SAVEPOINT dbpolicy_policy; RELEASE SAVEPOINT dbpolicy_policy"
        };
        sqlx::Executor::execute(&mut *conn, rollback).await?;
        if let Err((sqlstate, message)) = scratch::item_outcome(created)? {
            refused.push((p.name.to_string(), ExpressionError { sqlstate, message }));
        }
    }
    Ok(refused)
}

type TwinPolicyRow = (String, Option<String>, Option<String>);

async fn read_twin(
    conn: &mut PgConnection,
    table: &QualifiedName,
) -> Result<Vec<TwinPolicyRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT polname::text, pg_get_expr(polqual, polrelid), pg_get_expr(polwithcheck, polrelid)
         FROM pg_policy WHERE polrelid = to_regclass($1)",
    )
    .bind(format!("pg_temp.{}", quote_ident(&table.name)))
    .persistent(false)
    .fetch_all(&mut *conn)
    .await
}

// ---------------------------------------------------------------------- expressions (pure)

/// `(expr)`: [`check_expression`] has made sure the expression cannot leave it.
fn parenthesized(expr: &str) -> String {
    format!("({})", expr.trim())
}

/// ` USING (…) WITH CHECK (…)`, as both the policy and its normalisation are written.
fn clauses_sql(using: Option<&str>, with_check: Option<&str>) -> String {
    let mut s = String::new();
    if let Some(u) = using {
        s.push_str(" USING ");
        s.push_str(&parenthesized(u));
    }
    if let Some(c) = with_check {
        s.push_str(" WITH CHECK ");
        s.push_str(&parenthesized(c));
    }
    s
}

/// The policy's expressions after [`check_expression`], or which one is not an expression.
fn expressions(p: &RlsPolicy) -> Result<(), (&'static str, String)> {
    if let Some(u) = &p.using {
        check_expression(u).map_err(|e| ("using", e.to_string()))?;
    }
    if let Some(c) = &p.with_check {
        check_expression(c).map_err(|e| ("withCheck", e.to_string()))?;
    }
    Ok(())
}

fn command_sql(c: PolicyCommand) -> &'static str {
    match c {
        PolicyCommand::All => "ALL",
        PolicyCommand::Select => "SELECT",
        PolicyCommand::Insert => "INSERT",
        PolicyCommand::Update => "UPDATE",
        PolicyCommand::Delete => "DELETE",
    }
}

fn kind_sql(k: PolicyKind) -> &'static str {
    match k {
        PolicyKind::Permissive => "PERMISSIVE",
        PolicyKind::Restrictive => "RESTRICTIVE",
    }
}

/// The spec's roles as a set: PUBLIC when omitted, `public` in any case is PUBLIC, other
/// names are exact role names. None for an empty list (an error: no one would match).
pub fn desired_roles(p: &RlsPolicy) -> Option<BTreeSet<String>> {
    match &p.roles {
        None => Some(BTreeSet::from([PUBLIC.to_string()])),
        Some(r) if r.is_empty() => None,
        Some(r) => Some(
            r.iter()
                .map(|r| {
                    if r.eq_ignore_ascii_case(PUBLIC) {
                        PUBLIC.to_string()
                    } else {
                        r.clone()
                    }
                })
                .collect(),
        ),
    }
}

fn roles_sql(roles: &BTreeSet<String>) -> String {
    roles
        .iter()
        .map(|r| {
            if r == PUBLIC {
                "PUBLIC".to_string()
            } else {
                quote_ident(r)
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

// ------------------------------------------------------------------------------- planner

/// An expression as written (for SQL) and as PostgreSQL stores it (for comparison).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expr {
    pub sql: String,
    pub normalized: String,
}

/// A policy as the spec wants it, resolved against the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredPolicy {
    pub name: String,
    pub command: PolicyCommand,
    pub kind: PolicyKind,
    pub roles: BTreeSet<String>,
    pub using: Option<Expr>,
    pub with_check: Option<Expr>,
    /// Its normalisation cache row, when PostgreSQL normalised it (written with the change).
    pub cache: Option<normcache::Record>,
}

impl DesiredPolicy {
    fn state(&self) -> PolicyState {
        PolicyState {
            command: self.command,
            kind: self.kind,
            roles: self.roles.clone(),
            using: self.using.as_ref().map(|e| e.normalized.clone()),
            with_check: self.with_check.as_ref().map(|e| e.normalized.clone()),
        }
    }
}

/// A difference to close.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Create {
        table: QualifiedName,
        policy: DesiredPolicy,
    },
    /// Command, kind, or a clause to remove: `ALTER POLICY` cannot, so DROP and CREATE,
    /// consecutive changes of the area, run in one transaction by the executor.
    Replace {
        table: QualifiedName,
        policy: DesiredPolicy,
        why: String,
    },
    /// Only the parts that differ are set.
    Alter {
        table: QualifiedName,
        name: String,
        roles: Option<BTreeSet<String>>,
        using: Option<Expr>,
        with_check: Option<Expr>,
        /// The policy's normalisation cache row, written with the change.
        cache: Option<normcache::Record>,
    },
    /// A policy the spec does not list, on a table whose policies it owns.
    Drop {
        table: QualifiedName,
        name: String,
    },
    Enable {
        table: QualifiedName,
        on: bool,
    },
    Force {
        table: QualifiedName,
        on: bool,
    },
}

fn policy_target(table: &QualifiedName, policy: &str) -> String {
    format!("{table} policy {policy}")
}

fn expression_reason(sqlstate: Option<&str>) -> &'static str {
    match sqlstate {
        Some("42703") => "ColumnNotFound",
        Some("42501") => "InsufficientPrivilege",
        _ => "InvalidPolicyExpression",
    }
}

/// Resolves one spec policy, or reports on `plan` why it cannot be carried out.
fn resolve(
    table: &QualifiedName,
    p: &RlsPolicy,
    observed: &Observed,
    plan: &mut AreaPlan,
) -> Option<DesiredPolicy> {
    let target = policy_target(table, &p.name);
    let mut ok = true;
    match desired_roles(p) {
        None => {
            plan.error(
                &target,
                "InvalidRoles",
                "roles is an empty list: omit it for PUBLIC, or name at least one role",
            );
            ok = false;
        }
        Some(roles) => {
            for r in roles
                .iter()
                .filter(|r| *r != PUBLIC && !observed.roles.contains(*r))
            {
                plan.error(
                    &target,
                    "RoleNotFound",
                    format!("role {r:?} does not exist; dbpolicy does not create roles: create it first (CREATE ROLE), then reconcile again"),
                );
                ok = false;
            }
        }
    }
    if let Err((field, e)) = expressions(p) {
        plan.error(&target, "InvalidPolicyExpression", format!("{field}: {e}"));
        return None;
    }
    let normalized = match observed.normalized.get(&(table.clone(), p.name.clone())) {
        Some(Err(e)) => {
            let code = e
                .sqlstate
                .as_deref()
                .map(|c| format!(" (SQLSTATE {c})"))
                .unwrap_or_default();
            plan.error(
                &target,
                expression_reason(e.sqlstate.as_deref()),
                format!("{}{code}", e.message),
            );
            return None;
        }
        Some(Ok(n)) => {
            if n.using.is_some() != p.using.is_some()
                || n.with_check.is_some() != p.with_check.is_some()
            {
                plan.error(
                    &target,
                    "InvalidPolicyExpression",
                    "PostgreSQL read the policy with different clauses than written: each of using and withCheck must be one expression",
                );
                return None;
            }
            n.clone()
        }
        None => Normalized::default(),
    };
    if !ok {
        return None;
    }
    let expr = |sql: &Option<String>, norm: &Option<String>| {
        sql.as_ref().map(|s| Expr {
            sql: s.trim().to_string(),
            normalized: norm.clone().unwrap_or_else(|| s.trim().to_string()),
        })
    };
    Some(DesiredPolicy {
        name: p.name.clone(),
        command: p.command.unwrap_or_default(),
        kind: p.kind.unwrap_or_default(),
        roles: desired_roles(p).unwrap_or_default(),
        using: expr(&p.using, &normalized.using),
        with_check: expr(&p.with_check, &normalized.with_check),
        cache: observed
            .normalized
            .get(&(table.clone(), p.name.clone()))
            .zip(observed.cache_keys.get(&(table.clone(), p.name.clone())))
            .map(|(_, key)| normcache::Record {
                key: key.clone(),
                table: table.clone(),
                name: p.name.clone(),
                using: normalized.using.clone(),
                with_check: normalized.with_check.clone(),
            }),
    })
}

/// The policy changes of one table whose spec resolved without errors.
fn diff_policies(
    table: &QualifiedName,
    t: &RlsTable,
    desired: Vec<DesiredPolicy>,
    state: &TableState,
    ledger: &Ledger,
    plan: &mut AreaPlan,
    ops: &mut Vec<Op>,
) {
    for want in desired {
        let Some(have) = state.policies.get(&want.name) else {
            ops.push(Op::Create {
                table: table.clone(),
                policy: want,
            });
            continue;
        };
        let mut why = Vec::new();
        if have.command != want.command {
            why.push(format!("command {:?} → {:?}", have.command, want.command));
        }
        if have.kind != want.kind {
            why.push(format!("{:?} → {:?}", have.kind, want.kind));
        }
        if have.using.is_some() && want.using.is_none() {
            why.push("remove USING".into());
        }
        if have.with_check.is_some() && want.with_check.is_none() {
            why.push("remove WITH CHECK".into());
        }
        if !why.is_empty() {
            ops.push(Op::Replace {
                table: table.clone(),
                policy: want,
                why: why.join(", "),
            });
            continue;
        }
        let differs = |have: &Option<String>, want: &Option<Expr>| {
            want.as_ref()
                .filter(|w| have.as_deref() != Some(w.normalized.as_str()))
                .cloned()
        };
        let roles = (have.roles != want.roles).then(|| want.roles.clone());
        let using = differs(&have.using, &want.using);
        let with_check = differs(&have.with_check, &want.with_check);
        if roles.is_some() || using.is_some() || with_check.is_some() {
            ops.push(Op::Alter {
                table: table.clone(),
                name: want.name,
                roles,
                using,
                with_check,
                cache: want.cache,
            });
        }
    }
    let listed: BTreeSet<&str> = t.policies.iter().map(|p| p.name.as_str()).collect();
    for name in state
        .policies
        .keys()
        .filter(|n| !listed.contains(n.as_str()))
    {
        if t.own_all_policies.unwrap_or(false) {
            ops.push(Op::Drop {
                table: table.clone(),
                name: name.clone(),
            });
        } else if ledger.contains(AREA, &table.to_string(), name) {
            plan.notice(
                policy_target(table, name),
                "PolicyNoLongerListed",
                "created by dbpolicy and no longer listed; left in place (ownAllPolicies: true and safety.allowDestructive: true drop it)",
            );
        }
    }
}

/// The differences between spec and catalog, and the problems that block them. A table
/// with any problem gets no change at all (and a plan with errors is not applied).
pub fn diff(
    spec: &RowLevelSecuritySpec,
    observed: &Observed,
    ledger: &Ledger,
    plan: &mut AreaPlan,
) -> Vec<Op> {
    let mut ops = Vec::new();
    for t in &spec.tables {
        let table = t.qualified();
        let Some(state) = observed.tables.get(&table) else {
            plan.error(
                table.to_string(),
                "TableNotFound",
                format!(
                    "table {table} does not exist (policies: {})",
                    t.policies
                        .iter()
                        .map(|p| p.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
            continue;
        };
        if !matches!(state.relkind.as_str(), "r" | "p") {
            plan.error(
                table.to_string(),
                "NotATable",
                format!("{table} is not a table: row-level security applies to tables and partitioned tables"),
            );
            continue;
        }
        let errors_before = plan.errors.len();
        let desired: Vec<DesiredPolicy> = t
            .policies
            .iter()
            .filter_map(|p| resolve(&table, p, observed, plan))
            .collect();
        if plan.errors.len() > errors_before {
            continue;
        }
        diff_policies(&table, t, desired, state, ledger, plan, &mut ops);
        let enabled = t.enabled.unwrap_or(true);
        if state.enabled != enabled {
            ops.push(Op::Enable {
                table: table.clone(),
                on: enabled,
            });
        }
        let force = t.force.unwrap_or(false);
        if state.force != force {
            ops.push(Op::Force { table, on: force });
        }
    }
    ops
}

fn create_sql(table: &QualifiedName, p: &DesiredPolicy) -> String {
    format!(
        "CREATE POLICY {} ON {} AS {} FOR {} TO {}{}",
        quote_ident(&p.name),
        table.quoted(),
        kind_sql(p.kind),
        command_sql(p.command),
        roles_sql(&p.roles),
        clauses_sql(
            p.using.as_ref().map(|e| e.sql.as_str()),
            p.with_check.as_ref().map(|e| e.sql.as_str())
        )
    )
}

fn create_summary(p: &DesiredPolicy) -> String {
    format!(
        "create policy {} ({:?}, {:?}, to {})",
        p.name,
        p.command,
        p.kind,
        roles_sql(&p.roles)
    )
}

/// Every statement here takes ACCESS EXCLUSIVE on the table (bounded by lock_timeout).
pub fn render(op: &Op) -> Vec<Change> {
    match op {
        Op::Create { table, policy } => vec![Change::new(
            AREA,
            table.to_string(),
            create_summary(policy),
            create_sql(table, policy),
        )
        .hazard(Hazard::Locking)
        .record(&policy.name)
        .cache(policy.cache.clone())],
        Op::Replace { table, policy, why } => vec![
            // Not destructive: the policy is recreated in the same transaction.
            Change::new(
                AREA,
                table.to_string(),
                format!("drop policy {} to recreate it ({why})", policy.name),
                format!(
                    "DROP POLICY {} ON {}",
                    quote_ident(&policy.name),
                    table.quoted()
                ),
            )
            .hazard(Hazard::Locking),
            Change::new(
                AREA,
                table.to_string(),
                create_summary(policy),
                create_sql(table, policy),
            )
            .hazard(Hazard::Locking)
            .record(&policy.name)
            .cache(policy.cache.clone()),
        ],
        Op::Alter {
            table,
            name,
            roles,
            using,
            with_check,
            cache,
        } => {
            let mut sql = format!("ALTER POLICY {} ON {}", quote_ident(name), table.quoted());
            let mut what = Vec::new();
            if let Some(r) = roles {
                sql.push_str(&format!(" TO {}", roles_sql(r)));
                what.push(format!("roles to {}", roles_sql(r)));
            }
            sql.push_str(&clauses_sql(
                using.as_ref().map(|e| e.sql.as_str()),
                with_check.as_ref().map(|e| e.sql.as_str()),
            ));
            if using.is_some() {
                what.push("USING".into());
            }
            if with_check.is_some() {
                what.push("WITH CHECK".into());
            }
            vec![Change::new(
                AREA,
                table.to_string(),
                format!("alter policy {name}: {}", what.join(", ")),
                sql,
            )
            .hazard(Hazard::Locking)
            // Claims the policy, so a second policy altering it is refused as a conflict.
            .record(name.as_str())
            .cache(cache.clone())]
        }
        Op::Drop { table, name } => vec![Change::new(
            AREA,
            table.to_string(),
            format!("drop policy {name} (not listed; ownAllPolicies)"),
            format!("DROP POLICY {} ON {}", quote_ident(name), table.quoted()),
        )
        .hazard(Hazard::Destructive)
        .forget(name)],
        Op::Enable { table, on } => {
            let verb = if *on { "ENABLE" } else { "DISABLE" };
            vec![Change::new(
                AREA,
                table.to_string(),
                format!("{} row level security", verb.to_lowercase()),
                format!("ALTER TABLE {} {verb} ROW LEVEL SECURITY", table.quoted()),
            )
            .hazard(Hazard::Locking)]
        }
        Op::Force { table, on } => {
            let verb = if *on { "FORCE" } else { "NO FORCE" };
            vec![Change::new(
                AREA,
                table.to_string(),
                format!("{} row level security", verb.to_lowercase()),
                format!("ALTER TABLE {} {verb} ROW LEVEL SECURITY", table.quoted()),
            )
            .hazard(Hazard::Locking)]
        }
    }
}

/// Whether `change` (one [`render`] made) undoes a change that weakened the table's
/// protection, when it repairs drift: a policy dropped or altered by hand (recreated,
/// altered back), one added by hand (dropped: an extra permissive policy opens rows), or
/// RLS disabled or unforced by hand (enabled, forced again). Turning RLS off or unforcing
/// it, as the spec asks, repairs the opposite and is not one.
pub fn repairs_weakened_security(change: &Change) -> bool {
    if change.area != AREA {
        return false;
    }
    let sql = change.sql.as_str();
    sql.starts_with("CREATE POLICY ")
        || sql.starts_with("ALTER POLICY ")
        || sql.starts_with("DROP POLICY ")
        || sql.ends_with(" ENABLE ROW LEVEL SECURITY")
        || (sql.ends_with(" FORCE ROW LEVEL SECURITY")
            && !sql.ends_with(" NO FORCE ROW LEVEL SECURITY"))
}

pub fn plan(spec: &RowLevelSecuritySpec, observed: &Observed, ledger: &Ledger) -> AreaPlan {
    let mut plan = AreaPlan::new(AREA);
    let ops = diff(spec, observed, ledger, &mut plan);
    plan.changes = ops.iter().flat_map(render).collect();
    plan.refuse_unowned(|target| {
        QualifiedName::parse(target)
            .and_then(|t| observed.tables.get(&t))
            .is_some_and(|t| t.not_owned)
    });
    plan
}

/// The catalog as it will be after `ops` (for tests of convergence).
pub fn simulate(observed: &Observed, ops: &[Op]) -> Observed {
    let mut next = observed.clone();
    for op in ops {
        match op {
            Op::Create { table, policy } | Op::Replace { table, policy, .. } => {
                if let Some(t) = next.tables.get_mut(table) {
                    t.policies.insert(policy.name.clone(), policy.state());
                }
            }
            Op::Alter {
                table,
                name,
                roles,
                using,
                with_check,
                cache: _,
            } => {
                if let Some(p) = next
                    .tables
                    .get_mut(table)
                    .and_then(|t| t.policies.get_mut(name))
                {
                    if let Some(r) = roles {
                        p.roles = r.clone();
                    }
                    if let Some(u) = using {
                        p.using = Some(u.normalized.clone());
                    }
                    if let Some(c) = with_check {
                        p.with_check = Some(c.normalized.clone());
                    }
                }
            }
            Op::Drop { table, name } => {
                if let Some(t) = next.tables.get_mut(table) {
                    t.policies.remove(name);
                }
            }
            Op::Enable { table, on } => {
                if let Some(t) = next.tables.get_mut(table) {
                    t.enabled = *on;
                }
            }
            Op::Force { table, on } => {
                if let Some(t) = next.tables.get_mut(table) {
                    t.force = *on;
                }
            }
        }
    }
    next
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const OWN: &str = "user_id = current_setting('app.current_user_id')::uuid";
    const OWN_PG: &str = "(user_id = (current_setting('app.current_user_id'::text))::uuid)";

    fn t(name: &str) -> QualifiedName {
        QualifiedName::new("public", name)
    }

    fn policy(name: &str, command: Option<PolicyCommand>, using: Option<&str>) -> RlsPolicy {
        RlsPolicy {
            name: name.into(),
            command,
            using: using.map(String::from),
            ..Default::default()
        }
    }

    fn table(name: &str, policies: Vec<RlsPolicy>) -> RlsTable {
        RlsTable {
            table: name.into(),
            policies,
            ..Default::default()
        }
    }

    fn spec(tables: Vec<RlsTable>) -> RowLevelSecuritySpec {
        RowLevelSecuritySpec { tables }
    }

    fn state(using: Option<&str>, with_check: Option<&str>) -> PolicyState {
        PolicyState {
            command: PolicyCommand::All,
            kind: PolicyKind::Permissive,
            roles: BTreeSet::from([PUBLIC.to_string()]),
            using: using.map(String::from),
            with_check: with_check.map(String::from),
        }
    }

    /// Tables that exist with RLS enabled (not forced) and the given policies; every
    /// desired expression normalises to `OWN_PG` when it is `OWN`.
    fn observed(tables: &[(&str, Vec<(&str, PolicyState)>)]) -> Observed {
        Observed {
            tables: tables
                .iter()
                .map(|(n, ps)| {
                    (
                        t(n),
                        TableState {
                            relkind: "r".into(),
                            enabled: true,
                            force: false,
                            not_owned: false,
                            policies: ps.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
                        },
                    )
                })
                .collect(),
            roles: BTreeSet::from(["app".to_string(), "Admin Role".to_string()]),
            normalized: BTreeMap::new(),
            ..Default::default()
        }
    }

    fn with_normalized(mut o: Observed, table: &str, name: &str, n: Normalized) -> Observed {
        o.normalized.insert((t(table), name.into()), Ok(n));
        o
    }

    fn run(spec: &RowLevelSecuritySpec, o: &Observed) -> AreaPlan {
        plan(spec, o, &Ledger::for_policy("p"))
    }

    fn sqls(p: &AreaPlan) -> Vec<&str> {
        p.changes.iter().map(|c| c.sql.as_str()).collect()
    }

    #[test]
    fn repairs_of_weakened_protection_are_told_apart() {
        // Hand changes that weaken: dropped, altered, added, RLS disabled and unforced.
        let mut tbl = table("up", vec![policy("own", None, Some(OWN))]);
        tbl.force = Some(true);
        let mut o = observed(&[("up", vec![("extra", state(Some("true"), None))])]);
        o.tables.get_mut(&t("up")).unwrap().enabled = false;
        let mut s = spec(vec![tbl]);
        s.tables[0].own_all_policies = Some(true);
        let p = run(&s, &o);
        assert!(p.changes.len() >= 4, "{:?}", sqls(&p));
        for c in &p.changes {
            assert!(repairs_weakened_security(c), "{}", c.sql);
        }
        let altered = with_normalized(
            observed(&[("up", vec![("own", state(Some("true"), None))])]),
            "up",
            "own",
            Normalized {
                using: Some(OWN_PG.into()),
                with_check: None,
            },
        );
        let p = run(
            &spec(vec![table("up", vec![policy("own", None, Some(OWN))])]),
            &altered,
        );
        assert!(!p.changes.is_empty());
        assert!(
            p.changes.iter().all(repairs_weakened_security),
            "{:?}",
            sqls(&p)
        );

        // The spec turning protection off: not a weakening repaired.
        let mut off = table("up", vec![]);
        off.enabled = Some(false);
        let mut o = observed(&[("up", vec![])]);
        o.tables.get_mut(&t("up")).unwrap().force = true;
        let p = run(&spec(vec![off]), &o);
        assert_eq!(p.changes.len(), 2, "{:?}", sqls(&p));
        assert!(
            !p.changes.iter().any(repairs_weakened_security),
            "{:?}",
            sqls(&p)
        );
        let other = Change::new(Area::FeatureFlags, "f", "set", "CREATE POLICY x ON y");
        assert!(!repairs_weakened_security(&other));
    }

    #[test]
    fn creates_policy_then_enables_and_forces() {
        let mut tbl = table("up", vec![policy("own", None, Some(OWN))]);
        tbl.force = Some(true);
        let mut o = observed(&[("up", vec![])]);
        o.tables.get_mut(&t("up")).unwrap().enabled = false;
        let p = run(&spec(vec![tbl]), &o);
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        assert_eq!(
            sqls(&p),
            vec![
                format!(r#"CREATE POLICY "own" ON "public"."up" AS PERMISSIVE FOR ALL TO PUBLIC USING ({OWN})"#).as_str(),
                r#"ALTER TABLE "public"."up" ENABLE ROW LEVEL SECURITY"#,
                r#"ALTER TABLE "public"."up" FORCE ROW LEVEL SECURITY"#,
            ]
        );
        assert!(p
            .changes
            .iter()
            .all(|c| c.hazard == Hazard::Locking && c.transactional));
        assert_eq!(p.changes[0].ledger.len(), 1, "a created policy is recorded");
    }

    #[test]
    fn every_part_of_create_is_rendered_and_quoted() {
        let mut pol = policy("we\"ird", Some(PolicyCommand::Update), Some("a = 1"));
        pol.kind = Some(PolicyKind::Restrictive);
        pol.roles = Some(vec!["Admin Role".into(), "app".into(), "PUBLIC".into()]);
        pol.with_check = Some("b = 2".into());
        let mut tbl = table("T x", vec![pol]);
        tbl.schema = Some("s".into());
        let mut o = observed(&[]);
        o.tables.insert(
            QualifiedName::new("s", "T x"),
            TableState {
                relkind: "p".into(),
                enabled: true,
                ..Default::default()
            },
        );
        let p = run(&spec(vec![tbl]), &o);
        assert_eq!(
            sqls(&p),
            vec![
                r#"CREATE POLICY "we""ird" ON "s"."T x" AS RESTRICTIVE FOR UPDATE TO "Admin Role", "app", PUBLIC USING (a = 1) WITH CHECK (b = 2)"#
            ]
        );
    }

    #[test]
    fn a_table_mentioned_in_its_expression_is_told_apart() {
        assert!(mentions("id IN (SELECT id FROM a)", "a"));
        assert!(mentions("EXISTS (SELECT 1 FROM public.\"Notes\")", "notes"));
        assert!(!mentions("current_setting('app.user_id') AND x", "a"));
        assert!(!mentions("table_a = 1", "a"));
    }

    #[test]
    fn the_cache_answers_only_what_the_catalog_shows_at_the_recorded_version() {
        let o = observed(&[("up", vec![("own", state(Some(OWN_PG), None))])]);
        let item = (t("up"), "own".to_string());
        let keys = BTreeMap::from([(item.clone(), "k".to_string())]);
        let row = |using: &str, version: Option<&str>| {
            BTreeMap::from([(
                "k".to_string(),
                normcache::Cached {
                    using: Some(using.into()),
                    with_check: None,
                    version: version.map(String::from),
                },
            )])
        };
        let versions = BTreeMap::from([(item.clone(), "1:100".to_string())]);
        let (hits, misses) = use_cache(&keys, &row(OWN_PG, Some("1:100")), &o.tables, &versions);
        assert_eq!(hits.len(), 1);
        assert!(misses.is_empty());
        for (cached, why) in [
            (row(OWN_PG, Some("1:101")), "the policy changed since"),
            (row(OWN_PG, None), "no version"),
            (
                row("(owner = 2)", Some("1:100")),
                "not what the catalog shows",
            ),
            (BTreeMap::new(), "no row"),
        ] {
            let (hits, misses) = use_cache(&keys, &cached, &o.tables, &versions);
            assert!(hits.is_empty(), "{why}");
            assert!(misses.contains(&item), "{why}");
        }
    }

    #[test]
    fn normalised_expression_is_not_drift() {
        let s = spec(vec![table("up", vec![policy("own", None, Some(OWN))])]);
        let o = observed(&[("up", vec![("own", state(Some(OWN_PG), None))])]);
        // Without normalisation, the text PostgreSQL shows differs from the spec's…
        assert_eq!(run(&s, &o).changes.len(), 1);
        // …with it, nothing to do.
        let o = with_normalized(
            o,
            "up",
            "own",
            Normalized {
                using: Some(OWN_PG.into()),
                with_check: None,
            },
        );
        let p = run(&s, &o);
        assert!(p.changes.is_empty(), "{:?}", p.changes);
        assert!(p.errors.is_empty());
    }

    #[test]
    fn changed_expression_or_roles_is_altered_in_place() {
        let mut pol = policy("own", None, Some("a = 2"));
        pol.roles = Some(vec!["app".into()]);
        pol.with_check = Some("b = 1".into());
        let s = spec(vec![table("up", vec![pol])]);
        let o = observed(&[("up", vec![("own", state(Some("a = 1"), Some("b = 1")))])]);
        let p = run(&s, &o);
        assert_eq!(
            sqls(&p),
            vec![r#"ALTER POLICY "own" ON "public"."up" TO "app" USING (a = 2)"#]
        );
        assert_eq!(
            p.changes[0].summary,
            r#"alter policy own: roles to "app", USING"#
        );
        assert_eq!(p.changes[0].hazard, Hazard::Locking);
    }

    #[test]
    fn added_with_check_is_altered_in_place() {
        let mut pol = policy("own", None, Some("a = 1"));
        pol.with_check = Some("b = 1".into());
        let s = spec(vec![table("up", vec![pol])]);
        let o = observed(&[("up", vec![("own", state(Some("a = 1"), None))])]);
        assert_eq!(
            sqls(&run(&s, &o)),
            vec![r#"ALTER POLICY "own" ON "public"."up" WITH CHECK (b = 1)"#]
        );
    }

    #[test]
    fn command_kind_or_removed_clause_is_dropped_and_recreated_in_one_group() {
        let cases: Vec<(RlsPolicy, &str)> = vec![
            (
                policy("own", Some(PolicyCommand::Select), Some("a = 1")),
                "command All → Select",
            ),
            (
                RlsPolicy {
                    kind: Some(PolicyKind::Restrictive),
                    ..policy("own", None, Some("a = 1"))
                },
                "Permissive → Restrictive",
            ),
            (policy("own", None, Some("a = 1")), "remove WITH CHECK"),
        ];
        for (pol, why) in cases {
            let s = spec(vec![table("up", vec![pol])]);
            let o = observed(&[("up", vec![("own", state(Some("a = 1"), Some("b = 1")))])]);
            let p = run(&s, &o);
            assert_eq!(p.changes.len(), 2, "{why}: {:?}", p.changes);
            assert_eq!(p.changes[0].sql, r#"DROP POLICY "own" ON "public"."up""#);
            assert!(
                p.changes[0].summary.contains(why),
                "{}",
                p.changes[0].summary
            );
            assert!(p.changes[1]
                .sql
                .starts_with(r#"CREATE POLICY "own" ON "public"."up""#));
            // Not destructive (the executor would refuse the DROP and keep the CREATE),
            // transactional and of one area: the executor runs both in one transaction.
            for c in &p.changes {
                assert_eq!(c.hazard, Hazard::Locking);
                assert!(c.transactional);
                assert_eq!(c.area, AREA);
            }
        }
    }

    #[test]
    fn unlisted_policies_are_left_alone_unless_owned_all() {
        let s = spec(vec![table("up", vec![policy("own", None, Some("a = 1"))])]);
        let o = observed(&[(
            "up",
            vec![
                ("own", state(Some("a = 1"), None)),
                ("theirs", state(Some("true"), None)),
            ],
        )]);
        assert!(run(&s, &o).changes.is_empty());

        let mut s = s;
        s.tables[0].own_all_policies = Some(true);
        let p = run(&s, &o);
        assert_eq!(sqls(&p), vec![r#"DROP POLICY "theirs" ON "public"."up""#]);
        assert_eq!(p.changes[0].hazard, Hazard::Destructive);
        assert_eq!(
            p.changes[0].ledger.len(),
            1,
            "a dropped policy is forgotten"
        );
    }

    #[test]
    fn policy_created_by_dbpolicy_and_unlisted_is_a_notice() {
        let s = spec(vec![table("up", vec![])]);
        let o = observed(&[("up", vec![("old", state(Some("true"), None))])]);
        let mut ledger = Ledger::for_policy("p");
        ledger.insert(AREA, "public.up", "old", "p");
        let p = plan(&s, &o, &ledger);
        assert!(p.changes.is_empty());
        assert_eq!(p.notices.len(), 1);
        assert_eq!(p.notices[0].reason, "PolicyNoLongerListed");
        assert_eq!(p.notices[0].target, "public.up policy old");
    }

    #[test]
    fn disable_and_no_force() {
        let mut tbl = table("up", vec![]);
        tbl.enabled = Some(false);
        let mut o = observed(&[("up", vec![])]);
        o.tables.get_mut(&t("up")).unwrap().force = true;
        assert_eq!(
            sqls(&run(&spec(vec![tbl]), &o)),
            vec![
                r#"ALTER TABLE "public"."up" DISABLE ROW LEVEL SECURITY"#,
                r#"ALTER TABLE "public"."up" NO FORCE ROW LEVEL SECURITY"#,
            ]
        );
    }

    #[test]
    fn missing_table_view_and_role_are_errors_naming_table_and_policy() {
        let mut pol = policy("own", None, Some("true"));
        pol.roles = Some(vec!["ghost".into(), "app".into()]);
        let s = spec(vec![
            table("nope", vec![policy("a", None, Some("true"))]),
            table("v", vec![]),
            table("up", vec![pol]),
        ]);
        let mut o = observed(&[("up", vec![]), ("v", vec![])]);
        o.tables.get_mut(&t("v")).unwrap().relkind = "v".into();
        let p = run(&s, &o);
        assert!(p.changes.is_empty(), "{:?}", p.changes);
        let got: Vec<(&str, &str)> = p
            .errors
            .iter()
            .map(|e| (e.reason.as_str(), e.target.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("TableNotFound", "public.nope"),
                ("NotATable", "public.v"),
                ("RoleNotFound", "public.up policy own"),
            ]
        );
        assert!(p.errors[2].message.contains("\"ghost\""));
        assert!(p.errors[2].message.contains("does not create roles"));
    }

    #[test]
    fn empty_roles_list_is_an_error() {
        let mut pol = policy("own", None, Some("true"));
        pol.roles = Some(vec![]);
        let p = run(
            &spec(vec![table("up", vec![pol])]),
            &observed(&[("up", vec![])]),
        );
        assert_eq!(p.errors[0].reason, "InvalidRoles");
    }

    #[test]
    fn public_in_any_case_is_public() {
        let mut pol = policy("own", None, Some("true"));
        pol.roles = Some(vec!["Public".into()]);
        let s = spec(vec![table("up", vec![pol])]);
        let o = observed(&[("up", vec![("own", state(Some("true"), None))])]);
        let p = run(&s, &o);
        assert!(p.errors.is_empty() && p.changes.is_empty(), "{p:?}");
    }

    #[test]
    fn postgres_refusals_become_errors_with_its_message() {
        let s = spec(vec![
            table(
                "up",
                vec![
                    policy("col", None, Some("nosuch = 1")),
                    policy("typ", None, Some("1")),
                    policy("fine", None, Some("true")),
                ],
            ),
            table("other", vec![policy("x", None, Some("true"))]),
        ]);
        let mut o = observed(&[("up", vec![]), ("other", vec![])]);
        o.normalized.insert(
            (t("up"), "col".into()),
            Err(ExpressionError {
                sqlstate: Some("42703".into()),
                message: "column \"nosuch\" does not exist".into(),
            }),
        );
        o.normalized.insert(
            (t("up"), "typ".into()),
            Err(ExpressionError {
                sqlstate: Some("42804".into()),
                message: "argument of USING must be type boolean, not type integer".into(),
            }),
        );
        let p = run(&s, &o);
        assert_eq!(p.errors.len(), 2);
        assert_eq!(p.errors[0].reason, "ColumnNotFound");
        assert_eq!(p.errors[0].target, "public.up policy col");
        assert_eq!(
            p.errors[0].message,
            "column \"nosuch\" does not exist (SQLSTATE 42703)"
        );
        assert_eq!(p.errors[1].reason, "InvalidPolicyExpression");
        // No change for the table in error, not even for its valid policy; other tables
        // are planned (but a plan with errors is not applied).
        assert!(p.changes.iter().all(|c| c.target == "public.other"));
        assert_eq!(p.changes.len(), 1);
    }

    #[test]
    fn clauses_read_back_differently_are_an_error() {
        let s = spec(vec![table("up", vec![policy("own", None, Some("a = 1"))])]);
        let o = with_normalized(
            observed(&[("up", vec![])]),
            "up",
            "own",
            Normalized {
                using: Some("(a = 1)".into()),
                with_check: Some("false".into()),
            },
        );
        assert_eq!(run(&s, &o).errors[0].reason, "InvalidPolicyExpression");
    }

    #[test]
    fn text_that_is_not_one_expression_is_refused_before_postgres_sees_it() {
        for bad in [
            "true) WITH CHECK (false",
            "true; DROP TABLE up",
            "(true",
            "true -- x\r); DROP TABLE up; --",
            "'unterminated",
            // Without E, a backslash does not escape: the quote ends the literal.
            "'\\') ; DROP TABLE up; --'",
            "xe'\\') ; DROP TABLE up; --'",
            "/* open",
            "   ",
        ] {
            let s = spec(vec![table("up", vec![policy("own", None, Some(bad))])]);
            let p = run(&s, &observed(&[("up", vec![])]));
            assert!(p.changes.is_empty(), "{bad:?} was accepted");
            assert_eq!(p.errors[0].reason, "InvalidPolicyExpression", "{bad:?}");
            assert!(p.errors[0].message.starts_with("using: "), "{bad:?}");
        }
    }

    #[test]
    fn comments_are_refused() {
        let s = spec(vec![table(
            "up",
            vec![policy("own", None, Some("true -- all"))],
        )]);
        let p = run(&s, &observed(&[("up", vec![])]));
        assert!(p.changes.is_empty());
        assert_eq!(p.errors[0].reason, "InvalidPolicyExpression");
    }

    /// The controller's executor needs the engine's future to be `Send` for every
    /// lifetime; `raw_sql` (an `async fn` generic over the executor) would break that.
    #[allow(dead_code)]
    fn observe_is_send(url: String, spec: RowLevelSecuritySpec) {
        fn is_send<T: Send>(_: T) {}
        is_send(async move {
            let mut conn = crate::pg::connect_one(&url).await.unwrap();
            let _ = observe(&mut conn, &spec).await;
        });
    }

    // ---------------------------------------------------------------- convergence

    const NAMES: [&str; 3] = ["p", "q", "r"];
    const ROLES: [&str; 3] = [PUBLIC, "app", "Admin Role"];
    const EXPRS: [&str; 3] = ["a = 1", "b = 2", OWN];

    /// What PostgreSQL would store for an expression of `EXPRS`.
    fn pg_form(e: &str) -> String {
        format!("({e})")
    }

    fn arb_command() -> impl Strategy<Value = PolicyCommand> {
        prop::sample::select(vec![
            PolicyCommand::All,
            PolicyCommand::Select,
            PolicyCommand::Insert,
            PolicyCommand::Update,
            PolicyCommand::Delete,
        ])
    }

    fn arb_kind() -> impl Strategy<Value = PolicyKind> {
        prop::sample::select(vec![PolicyKind::Permissive, PolicyKind::Restrictive])
    }

    fn arb_roles() -> impl Strategy<Value = BTreeSet<String>> {
        prop::collection::btree_set(prop::sample::select(ROLES.to_vec()), 1..3)
            .prop_map(|s| s.into_iter().map(String::from).collect())
    }

    fn arb_expr() -> impl Strategy<Value = Option<&'static str>> {
        prop::option::of(prop::sample::select(EXPRS.to_vec()))
    }

    /// A valid spec policy: the clauses its command accepts, at least one.
    fn arb_policy() -> impl Strategy<Value = RlsPolicy> {
        (
            prop::sample::select(NAMES.to_vec()),
            prop::option::of(arb_command()),
            prop::option::of(arb_kind()),
            prop::option::of(arb_roles()),
            arb_expr(),
            arb_expr(),
        )
            .prop_map(|(name, command, kind, roles, using, check)| {
                let cmd = command.unwrap_or_default();
                let (using, check) = match cmd {
                    PolicyCommand::Insert => (None, Some(check.or(using).unwrap_or("true"))),
                    PolicyCommand::Select | PolicyCommand::Delete => {
                        (Some(using.or(check).unwrap_or("true")), None)
                    }
                    _ if using.is_none() && check.is_none() => (Some("true"), None),
                    _ => (using, check),
                };
                RlsPolicy {
                    name: name.into(),
                    command,
                    kind,
                    roles: roles.map(|r| r.into_iter().collect()),
                    using: using.map(String::from),
                    with_check: check.map(String::from),
                }
            })
    }

    fn arb_table() -> impl Strategy<Value = RlsTable> {
        (
            prop::sample::select(vec!["a", "b"]),
            prop::option::of(any::<bool>()),
            prop::option::of(any::<bool>()),
            prop::option::of(any::<bool>()),
            prop::collection::vec(arb_policy(), 0..4),
        )
            .prop_map(|(name, enabled, force, own_all, policies)| {
                let mut seen = BTreeSet::new();
                RlsTable {
                    schema: None,
                    table: name.into(),
                    enabled,
                    force,
                    own_all_policies: own_all,
                    policies: policies
                        .into_iter()
                        .filter(|p| seen.insert(p.name.clone()))
                        .collect(),
                }
            })
    }

    fn arb_state() -> impl Strategy<Value = PolicyState> {
        (
            arb_command(),
            arb_kind(),
            arb_roles(),
            prop::option::of(prop::sample::select(EXPRS.to_vec())),
            prop::option::of(prop::sample::select(EXPRS.to_vec())),
        )
            .prop_map(|(command, kind, roles, using, check)| PolicyState {
                command,
                kind,
                roles,
                using: using.map(pg_form),
                with_check: check.map(pg_form),
            })
    }

    fn arb_observed() -> impl Strategy<Value = Observed> {
        let table = (
            any::<bool>(),
            any::<bool>(),
            prop::collection::btree_map(
                prop::sample::select(vec!["p", "q", "r", "s"]).prop_map(String::from),
                arb_state(),
                0..4,
            ),
        )
            .prop_map(|(enabled, force, policies)| TableState {
                relkind: "r".into(),
                enabled,
                force,
                not_owned: false,
                policies,
            });
        prop::collection::btree_map(prop::sample::select(vec!["a", "b"]), table, 0..3).prop_map(
            |m| Observed {
                tables: m.into_iter().map(|(n, s)| (t(n), s)).collect(),
                roles: ROLES.iter().map(|r| r.to_string()).collect(),
                normalized: BTreeMap::new(),
                ..Default::default()
            },
        )
    }

    /// What the observer reads back for the spec: each expression in PostgreSQL's form.
    fn normalise_all(spec: &RowLevelSecuritySpec, o: &mut Observed) {
        for tbl in &spec.tables {
            for p in &tbl.policies {
                o.normalized.insert(
                    (tbl.qualified(), p.name.clone()),
                    Ok(Normalized {
                        using: p.using.as_deref().map(pg_form),
                        with_check: p.with_check.as_deref().map(pg_form),
                    }),
                );
            }
        }
    }

    proptest! {
        /// Convergence: after applying a plan, planning again yields nothing to do, and
        /// the catalog holds exactly the spec's policies (and, when owning all, no other).
        #[test]
        fn applying_a_plan_converges(tables in prop::collection::vec(arb_table(), 0..3), obs in arb_observed()) {
            let mut seen = BTreeSet::new();
            let tables: Vec<_> = tables.into_iter().filter(|t| seen.insert(t.table.clone())).collect();
            let spec = RowLevelSecuritySpec { tables };
            let mut obs = obs;
            normalise_all(&spec, &mut obs);
            let mut ledger = Ledger::for_policy("p");
            let mut scratch = AreaPlan::new(AREA);
            let ops = diff(&spec, &obs, &ledger, &mut scratch);
            let after = simulate(&obs, &ops);
            for c in ops.iter().flat_map(render) { ledger.apply_ops(&c.ledger); }
            let mut again = AreaPlan::new(AREA);
            let ops2 = diff(&spec, &after, &ledger, &mut again);
            prop_assert!(ops2.is_empty(), "{ops2:?}");
            for tbl in &spec.tables {
                let Some(state) = after.tables.get(&tbl.qualified()) else { continue };
                prop_assert_eq!(state.enabled, tbl.enabled.unwrap_or(true));
                prop_assert_eq!(state.force, tbl.force.unwrap_or(false));
                for p in &tbl.policies {
                    let have = &state.policies[&p.name];
                    prop_assert_eq!(have.command, p.command.unwrap_or_default());
                    prop_assert_eq!(have.kind, p.kind.unwrap_or_default());
                    prop_assert_eq!(&have.using, &p.using.as_deref().map(pg_form));
                    prop_assert_eq!(&have.with_check, &p.with_check.as_deref().map(pg_form));
                }
                if tbl.own_all_policies == Some(true) {
                    prop_assert_eq!(state.policies.len(), tbl.policies.len());
                }
            }
        }

        /// Destructive changes are only ever drops of unlisted policies of owned tables;
        /// drop-and-recreate pairs are adjacent.
        #[test]
        fn only_pruning_is_destructive(tables in prop::collection::vec(arb_table(), 0..3), obs in arb_observed()) {
            let mut seen = BTreeSet::new();
            let tables: Vec<_> = tables.into_iter().filter(|t| seen.insert(t.table.clone())).collect();
            let spec = RowLevelSecuritySpec { tables };
            let mut obs = obs;
            normalise_all(&spec, &mut obs);
            let p = plan(&spec, &obs, &Ledger::for_policy("p"));
            for (i, c) in p.changes.iter().enumerate() {
                if c.hazard == Hazard::Destructive {
                    prop_assert!(c.summary.contains("ownAllPolicies"));
                }
                if c.summary.contains("to recreate it") {
                    prop_assert!(p.changes[i + 1].sql.starts_with("CREATE POLICY"));
                }
            }
        }
    }
}
