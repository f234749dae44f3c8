//! Normalisation of the desired expressions: PostgreSQL rewrites each `USING`/`WITH
//! CHECK` into the form `pg_get_expr` shows, on twins of the tables built by the engine's
//! one scratch mechanism ([`scratch::run`]: a transaction that is rolled back, one
//! savepoint per table), unless the normalisation cache ([`crate::engine::normcache`])
//! already holds it. What is RLS's own lives here: which policies, the twin groups, the
//! cache keys, and the table twin with its policies.

use super::*;

/// Each table's shape fingerprint (see `observe::Shape`), looked up per policy.
pub(super) type Shapes = std::collections::HashMap<QualifiedName, Shape>;
/// Each catalog policy's OID and version (see `normcache::policy_version_sql`), by (table,
/// policy name).
pub(super) type Versions = std::collections::HashMap<(QualifiedName, String), (i64, String)>;

/// One spec table's desired policies, as normalisation creates them on its twin.
pub(super) struct NormalizeTable<'a> {
    name: QualifiedName,
    policies: Vec<NormalizePolicy<'a>>,
}

pub(super) struct NormalizePolicy<'a> {
    name: &'a str,
    command: &'static str,
    clauses: String,
}

/// The policies the cache answers, with the form it recorded.
pub(super) type Answered = BTreeMap<(QualifiedName, String), Normalized>;

pub(super) type NormalizedPolicies =
    BTreeMap<(QualifiedName, String), Result<Normalized, ExpressionError>>;

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
pub(super) async fn normalize(
    conn: &mut PgConnection,
    spec: &RowLevelSecuritySpec,
    tables: &BTreeMap<QualifiedName, TableState>,
    shapes: &Shapes,
    misses: &BTreeSet<(QualifiedName, String)>,
) -> Result<(NormalizedPolicies, usize), sqlx::Error> {
    // A drift check the cache answers whole: nothing to look at per table.
    if misses.is_empty() {
        return Ok((BTreeMap::new(), 0));
    }
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
    normalize_in(conn, &representatives, &mut out).await?;
    // PostgreSQL's form may name the table itself (a column of it referenced from a
    // subquery is qualified: `o.id = t1.org`): such a form is the representative's own,
    // and every member of its group is normalised on a twin of its own.
    let mut alone = Vec::new();
    for (rep, member) in members {
        let (rep, member) = (&input[rep], &input[member]);
        let forms: Vec<_> = member
            .policies
            .iter()
            .map(|p| out.get(&(rep.name.clone(), p.name.to_string())).cloned())
            .collect();
        let names_rep = forms.iter().flatten().any(|f| match f {
            Ok(n) => [&n.using, &n.with_check]
                .into_iter()
                .flatten()
                .any(|text| mentions(text, &rep.name.name)),
            Err(_) => false,
        });
        if names_rep {
            alone.push(member);
            continue;
        }
        for (p, form) in member.policies.iter().zip(forms) {
            if let Some(v) = form {
                out.insert((member.name.clone(), p.name.to_string()), v);
            }
        }
    }
    let twins = representatives.len() + alone.len();
    if !alone.is_empty() {
        normalize_in(conn, &alone, &mut out).await?;
    }
    Ok((out, twins))
}

/// What decides PostgreSQL's form of a table's policies, besides the environment: the
/// schema, the columns (names, types, collations), whether we own the table, the policies
/// as written, and the table's own name when an expression mentions it (a reference to
/// the table itself must not resolve to another table's twin).
pub(super) type TwinGroup = (
    String,
    Shape,
    bool,
    String,
    Vec<(String, &'static str, String)>,
);

pub(super) fn twin_group(
    t: &NormalizeTable<'_>,
    tables: &BTreeMap<QualifiedName, TableState>,
    shapes: &Shapes,
) -> TwinGroup {
    let policies: Vec<(String, &'static str, String)> = t
        .policies
        .iter()
        .map(|p| (p.name.to_string(), p.command, p.clauses.clone()))
        .collect();
    let mentioned = policies.iter().any(|(_, _, c)| mentions(c, &t.name.name));
    (
        t.name.schema.clone(),
        shapes.get(&t.name).copied().unwrap_or_default(),
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
pub(super) fn mentions(text: &str, name: &str) -> bool {
    if text.is_ascii() && name.is_ascii() {
        return mentions_ascii(text.as_bytes(), name.as_bytes());
    }
    let (text, name) = (text.to_lowercase(), name.to_lowercase());
    let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$');
    text.match_indices(&name).any(|(i, m)| {
        !word(text[..i].chars().next_back()) && !word(text[i + m.len()..].chars().next())
    })
}

/// [`mentions`] of ASCII text: the same answer, without lower-casing copies (it runs for
/// every desired policy on every drift check).
fn mentions_ascii(text: &[u8], name: &[u8]) -> bool {
    let word =
        |c: Option<&u8>| c.is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_' || *c == b'$');
    if name.is_empty() {
        // As `match_indices("")`: an empty match at every position.
        return (0..=text.len())
            .any(|i| !word(i.checked_sub(1).and_then(|j| text.get(j))) && !word(text.get(i)));
    }
    let mut i = 0;
    while i + name.len() <= text.len() {
        if text[i..i + name.len()].eq_ignore_ascii_case(name) {
            if !word(i.checked_sub(1).and_then(|j| text.get(j))) && !word(text.get(i + name.len()))
            {
                return true;
            }
            // `match_indices` does not overlap its matches.
            i += name.len();
        } else {
            i += 1;
        }
    }
    false
}

/// The normalisation cache key of every desired policy that normalisation would see.
///
/// Its parts: the kind of item (`rowLevelSecurity/3`) and the environment, then the table's
/// (schema, name, shape fingerprint, owned or not), then the policy's (the table's name
/// again when an expression mentions it, the policy's name, command and expressions as
/// written). Version 1 had the shape as text and another order, version 2 rows were
/// recorded with the policy's `oid:xmin` alone: their rows miss once.
pub(super) fn cache_keys(
    spec: &RowLevelSecuritySpec,
    tables: &BTreeMap<QualifiedName, TableState>,
    shapes: &Shapes,
    environment: &str,
) -> BTreeMap<(QualifiedName, String), String> {
    // Collected at the end: built in one pass from the spec's order, not searched per item.
    let mut keys = Vec::new();
    let prefix = normcache::KeyPrefix::new(&["rowLevelSecurity/3", environment]);
    for t in &spec.tables {
        let name = t.qualified();
        let Some(state) = tables.get(&name) else {
            continue;
        };
        if !matches!(state.relkind.as_str(), "r" | "p") {
            continue;
        }
        let shape = shapes.get(&name).copied().unwrap_or_default();
        let owned: &[u8] = if state.not_owned {
            b"not owned"
        } else {
            b"owned"
        };
        let table = prefix.then(&[name.schema.as_bytes(), name.name.as_bytes(), &shape, owned]);
        for p in t.policies.iter().filter(|p| expressions(p).is_ok()) {
            let (using, check) = (
                p.using.as_deref().map(str::trim),
                p.with_check.as_deref().map(str::trim),
            );
            let mentioned = using.is_some_and(|u| mentions(u, &name.name))
                || check.is_some_and(|c| mentions(c, &name.name));
            let key = table.key(&[
                if mentioned { name.name.as_bytes() } else { b"" },
                p.name.as_bytes(),
                command_sql(p.command.unwrap_or_default()).as_bytes(),
                if using.is_some() { b"+" } else { b"-" },
                using.unwrap_or_default().as_bytes(),
                if check.is_some() { b"+" } else { b"-" },
                check.unwrap_or_default().as_bytes(),
            ]);
            keys.push(((name.clone(), p.name.clone()), key));
        }
    }
    keys.into_iter().collect()
}

/// Splits the keyed policies into those the cache answers and those to normalise on a
/// twin. The cache answers a policy whose catalog row is the very version its row was
/// recorded against (the version also covers the names its expressions refer to; the key,
/// its table's columns and what its names resolve to): then the catalog still shows the
/// form the row holds, which the write checked against `pg_get_expr`, and that form is
/// both the desired expression's and the live one's. A row without a version, or of
/// another version (stale, or tampered with), is never used: the twin decides.
pub(super) fn use_cache(
    keys: &BTreeMap<(QualifiedName, String), String>,
    cached: &std::collections::HashMap<String, normcache::Cached>,
    versions: &Versions,
) -> (Answered, BTreeSet<(QualifiedName, String)>) {
    // Keys come in order: both maps are built from ordered runs in one pass (no search).
    let mut hits = Vec::new();
    let mut misses = Vec::new();
    for (item, key) in keys {
        match (cached.get(key), versions.get(item)) {
            (Some(row), Some((_, live))) if row.version.as_ref() == Some(live) => {
                hits.push((
                    item.clone(),
                    Normalized {
                        using: row.using.clone(),
                        with_check: row.with_check.clone(),
                    },
                ));
            }
            _ => misses.push(item.clone()),
        }
    }
    (hits.into_iter().collect(), misses.into_iter().collect())
}

/// The cache rows of items normalised this run that the catalog already shows as
/// PostgreSQL would store them (one per key).
pub(super) fn fill(
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

/// Normalises the tables' policies with the scratch mechanism ([`scratch::run`]): one
/// item per table, `pg_temp` last in the search path.
pub(super) async fn normalize_in(
    conn: &mut PgConnection,
    input: &[&NormalizeTable<'_>],
    out: &mut NormalizedPolicies,
) -> Result<(), sqlx::Error> {
    let results = scratch::run(conn, input, scratch::Names::TwinsLast, twin_and_read).await?;
    for (t, result) in input.iter().zip(results) {
        match result {
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

/// One table's scratch item: its twin with every policy, read back. When a policy is
/// refused, the item starts over with one savepoint per policy, to name every bad one.
async fn twin_and_read(
    conn: &mut PgConnection,
    t: &&NormalizeTable<'_>,
) -> Result<(Vec<TwinPolicyRow>, Vec<(String, ExpressionError)>), sqlx::Error> {
    let errors = match twin_policies(conn, t, false).await {
        Ok(errors) if errors.is_empty() => errors,
        _ => {
            scratch::restart_item(conn).await?;
            twin_policies(conn, t, true).await?
        }
    };
    Ok((read_twin(conn, &t.name).await?, errors))
}

/// Creates the twin and its policies. With `one_by_one`, each policy gets a savepoint of
/// its own and a refused one is returned with PostgreSQL's reason; without, the first
/// refusal is an error (the caller then retries one by one).
pub(super) async fn twin_policies(
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

pub(super) type TwinPolicyRow = (String, Option<String>, Option<String>);

pub(super) async fn read_twin(
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
