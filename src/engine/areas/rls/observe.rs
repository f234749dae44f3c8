//! The catalog: the declared tables, their policies and shapes (one query), and the roles
//! the spec names (one query).

use super::*;

/// One row per (table, policy); the policy columns are NULL for a table without policies.
pub(super) type CatalogRow = (
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

pub(super) const CATALOG_SQL: &str = "SELECT n.nspname::text, c.relname::text, c.relkind::text,
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

pub(super) fn command_from_catalog(polcmd: &str) -> PolicyCommand {
    match polcmd {
        "r" => PolicyCommand::Select,
        "a" => PolicyCommand::Insert,
        "w" => PolicyCommand::Update,
        "d" => PolicyCommand::Delete,
        _ => PolicyCommand::All,
    }
}
