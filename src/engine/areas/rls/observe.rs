//! The catalog: the declared tables, their policies and shapes (one query), the roles the
//! spec names (one query), and the expressions of the policies the cache does not answer
//! (one query, none on a no-op).

use super::*;

/// One row per (table, policy); the policy columns are NULL for a table without policies.
/// The table is named by its 1-based position in the arrays bound to the query (the
/// client has its names already), its kind and the policy's command are `"char"`s, and
/// its shape comes as a fingerprint ([`Shape`]): a row carries no text the client does
/// not need. The policy's expressions are not read here: deparsing them (`pg_get_expr`)
/// is most of what a catalog read of policies costs the server, and the normalisation
/// cache already holds them for every policy whose version (`normcache::policy_version_sql`)
/// is the one it recorded; [`EXPRESSIONS_SQL`] reads the others, by OID.
pub(super) type CatalogRow = (
    i64,
    i8,
    bool,
    bool,
    bool,
    Option<String>,
    Option<i8>,
    Option<bool>,
    Option<Vec<String>>,
    Option<i64>,
    Shape,
    Option<String>,
);

/// SHA-256 of a table's column list (`quote_ident(name) type collation, …`, in column
/// order), computed by the server: the text itself is never needed on the client, only
/// whether two tables (or two runs) have the same one. It goes into the normalisation
/// cache key and the twin groups in its place; `convert_to` the server's own encoding
/// hashes the text's bytes as stored, whatever the encoding.
pub(super) type Shape = [u8; 32];

pub(super) const CATALOG_SQL: &str = concat!(
    "SELECT d.i, c.relkind,
       c.relrowsecurity, c.relforcerowsecurity, NOT pg_has_role(c.relowner, 'USAGE'),
       p.polname::text, p.polcmd, p.polpermissive,
       CASE WHEN p.oid IS NOT NULL THEN
         ARRAY(SELECT CASE WHEN r = 0 THEN 'public' ELSE pg_get_userbyid(r)::text END
               FROM unnest(p.polroles) AS r)
       END,
       p.oid::int8, s.shape, ",
    normcache::policy_version_sql!(),
    "
FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS d(schema, name, i)
JOIN pg_namespace n ON n.nspname = d.schema
JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = d.name
CROSS JOIN LATERAL (
  SELECT sha256(convert_to(
           coalesce(string_agg(quote_ident(a.attname) || ' ' || format_type(a.atttypid, a.atttypmod)
                               || ' ' || a.attcollation::text, ', ' ORDER BY a.attnum), ''),
           current_setting('server_encoding')))
  FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
) AS s(shape)
LEFT JOIN pg_policy p ON p.polrelid = c.oid"
);

/// The expressions of the policies the cache does not answer, by OID, with their versions:
/// a policy whose version is not the one the catalog query saw changed in between.
pub(super) const EXPRESSIONS_SQL: &str = concat!(
    "SELECT p.oid::int8, ",
    normcache::policy_version_sql!(),
    ", pg_get_expr(p.polqual, p.polrelid), pg_get_expr(p.polwithcheck, p.polrelid)
FROM pg_policy p JOIN unnest($1::int8[]) AS w(oid) ON p.oid = w.oid::oid"
);

/// Reads the spec's tables and policies (one query), the roles they name (one query), the
/// environment and the cache rows (two), the expressions of the policies the cache does not
/// answer (one query, none on a no-op), and normalises the desired expressions the cache
/// does not answer (one rolled-back transaction), whatever the number of tables and
/// policies.
pub async fn observe(
    conn: &mut PgConnection,
    spec: &RowLevelSecuritySpec,
) -> Result<Observed, sqlx::Error> {
    let names: Vec<QualifiedName> = spec
        .tables
        .iter()
        .map(|t| t.qualified())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let schemas: Vec<&str> = names.iter().map(|q| q.schema.as_str()).collect();
    let tables: Vec<&str> = names.iter().map(|q| q.name.as_str()).collect();
    let rows: Vec<CatalogRow> = sqlx::query_as(CATALOG_SQL)
        .bind(&schemas)
        .bind(&tables)
        .fetch_all(&mut *conn)
        .await?;
    let mut observed = Observed::default();
    let mut states: Vec<Option<TableState>> = vec![None; names.len()];
    let mut shapes = Shapes::with_capacity(names.len());
    let mut versions = Versions::with_capacity(names.len() * 2);
    for (
        i,
        relkind,
        enabled,
        force,
        not_owned,
        polname,
        polcmd,
        permissive,
        roles,
        oid,
        shape,
        version,
    ) in rows
    {
        let Some(name) = usize::try_from(i - 1).ok().and_then(|i| names.get(i)) else {
            return Err(sqlx::Error::Protocol(format!(
                "the row-level security catalog query named table {i} of {}",
                names.len()
            )));
        };
        // By position: `names` is in order, so the map is built in one pass at the end.
        let table = states[(i - 1) as usize].get_or_insert_with(|| {
            shapes.insert(name.clone(), shape);
            TableState {
                relkind: char::from(relkind as u8).to_string(),
                enabled,
                force,
                not_owned,
                policies: BTreeMap::new(),
            }
        });
        if let (Some(polname), Some(oid), Some(version)) = (polname, oid, version) {
            versions.insert((name.clone(), polname.clone()), (oid, version));
            table.policies.insert(
                polname,
                PolicyState {
                    command: command_from_catalog(polcmd.map_or(b'*', |c| c as u8)),
                    kind: if permissive.unwrap_or(true) {
                        PolicyKind::Permissive
                    } else {
                        PolicyKind::Restrictive
                    },
                    roles: roles.unwrap_or_default().into_iter().collect(),
                    // Filled below: from the cache, or read by OID.
                    using: None,
                    with_check: None,
                },
            );
        }
    }

    observed.tables = names
        .iter()
        .zip(states)
        .filter_map(|(name, state)| Some((name.clone(), state?)))
        .collect();

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
    let mut wanted: Vec<&str> = keys.values().map(String::as_str).collect();
    wanted.sort_unstable();
    wanted.dedup();
    let cached = normcache::read(conn, &wanted).await?;
    let (hits, misses) = use_cache(&keys, &cached, &versions);
    read_expressions(conn, &mut observed.tables, &hits, &versions).await?;
    let (fresh, twins) = normalize(conn, spec, &observed.tables, &shapes, &misses).await?;
    observed.cache_fill = fill(&fresh, &keys, &observed.tables);
    observed.normalized = hits.into_iter().map(|(item, n)| (item, Ok(n))).collect();
    observed.normalized.extend(fresh);
    observed.cache_keys = keys;
    observed.twins = twins;
    Ok(observed)
}

/// Gives every catalog policy its expressions as `pg_get_expr` shows them: a policy the
/// cache answers shows the form the cache recorded (its catalog row, and every name it
/// refers to, is the version that form was recorded against); the others are read by OID
/// in one query, none on a drift check the cache answers whole. A policy changed or
/// dropped since the catalog query read it is an error: the next run reads it again.
async fn read_expressions(
    conn: &mut PgConnection,
    tables: &mut BTreeMap<QualifiedName, TableState>,
    hits: &Answered,
    versions: &Versions,
) -> Result<(), sqlx::Error> {
    let unread = fill_answered(tables, hits, versions);
    if unread.is_empty() {
        return Ok(());
    }
    let oids: Vec<i64> = unread.iter().map(|(oid, _)| *oid).collect();
    let rows: Vec<ExpressionsRow> = sqlx::query_as(EXPRESSIONS_SQL)
        .bind(&oids)
        .fetch_all(&mut *conn)
        .await?;
    place_expressions(tables, versions, unread, rows)
}

/// A row of [`EXPRESSIONS_SQL`]: OID, version, `USING`, `WITH CHECK`.
pub(super) type ExpressionsRow = (i64, String, Option<String>, Option<String>);

/// Gives the policies the cache answers the forms it recorded; returns the others, with
/// their OIDs, to be read.
pub(super) fn fill_answered(
    tables: &mut BTreeMap<QualifiedName, TableState>,
    hits: &Answered,
    versions: &Versions,
) -> Vec<(i64, (QualifiedName, String))> {
    let mut unread = Vec::new();
    for (table, state) in tables.iter_mut() {
        for (name, policy) in state.policies.iter_mut() {
            let item = (table.clone(), name.clone());
            match hits.get(&item) {
                Some(n) => {
                    policy.using = n.using.clone();
                    policy.with_check = n.with_check.clone();
                }
                None => {
                    if let Some((oid, _)) = versions.get(&item) {
                        unread.push((*oid, item));
                    }
                }
            }
        }
    }
    unread
}

/// Gives each policy of `unread` the expressions read for it, when the row read is of the
/// version the catalog query saw; a policy missing from `rows` (dropped since) or of
/// another version (altered since) is an error.
pub(super) fn place_expressions(
    tables: &mut BTreeMap<QualifiedName, TableState>,
    versions: &Versions,
    unread: Vec<(i64, (QualifiedName, String))>,
    rows: Vec<ExpressionsRow>,
) -> Result<(), sqlx::Error> {
    let mut read: std::collections::HashMap<i64, (String, Option<String>, Option<String>)> = rows
        .into_iter()
        .map(|(oid, version, using, check)| (oid, (version, using, check)))
        .collect();
    for (oid, item) in unread {
        let seen = versions.get(&item).map(|(_, v)| v);
        let (table, name) = item;
        match read.remove(&oid) {
            Some((version, using, check)) if seen == Some(&version) => {
                if let Some(p) = tables
                    .get_mut(&table)
                    .and_then(|t| t.policies.get_mut(&name))
                {
                    p.using = using;
                    p.with_check = check;
                }
            }
            _ => return Err(changed_while_read(&table, &name)),
        }
    }
    Ok(())
}

fn changed_while_read(table: &QualifiedName, name: &str) -> sqlx::Error {
    sqlx::Error::Protocol(format!(
        "policy {} on {} changed while it was being read; the next run reads it again",
        quote_ident(name),
        table.quoted()
    ))
}

/// `pg_policy.polcmd`, a `"char"`.
pub(super) fn command_from_catalog(polcmd: u8) -> PolicyCommand {
    match polcmd {
        b'r' => PolicyCommand::Select,
        b'a' => PolicyCommand::Insert,
        b'w' => PolicyCommand::Update,
        b'd' => PolicyCommand::Delete,
        _ => PolicyCommand::All,
    }
}
