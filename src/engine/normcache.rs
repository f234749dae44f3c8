//! The normalisation cache (`dbpolicy.normalized`): what PostgreSQL made of a desired
//! expression, keyed by a hash of everything that decides it, so that a drift check with
//! nothing to change builds no scratch twin at all.
//!
//! A row maps the key of one desired item (see [`key`]: the table and item, the text as
//! written, the command, the table's shape (a SHA-256 of its column list, computed by the
//! server), the search path and a fingerprint of the catalogs that resolve names) to the
//! form PostgreSQL stored and the version of the item's catalog row it was recorded
//! against (`policy_version_sql`: `oid:xmin` and the names of the other tables and columns
//! it refers to). It is written beside the ledger, in the same transaction as the change
//! that created the item, or after a run that found the item already right, and only with
//! a version when the form is exactly what `pg_get_expr` shows for the item then.
//!
//! The cache only ever saves work, it never decides: a row is used only when the item's
//! catalog row is the very version it was recorded against, so the catalog still shows the
//! form the row holds and the drift check needs neither a twin nor `pg_get_expr` for it. A
//! stale row (the item was changed by hand, even to the text the row holds; the table's
//! columns changed; something its expressions name was renamed; a function was created
//! that would resolve differently) or one whose version was tampered with fails this, and
//! the item is read and normalised again on a twin: drift is never hidden by the cache.
//! (Whoever can rewrite both a row and its version can also rewrite the ledger: the
//! `dbpolicy` schema is the operator's, see docs/security.md.)

use sha2::{Digest, Sha256};
use sqlx::PgConnection;

use crate::pg::QualifiedName;

pub(crate) const CACHE_TABLE: &str = "dbpolicy.normalized";

/// Appended to the ledger's bootstrap: created with it, in the same transaction.
pub(crate) const BOOTSTRAP_SQL: &str = "CREATE TABLE IF NOT EXISTS dbpolicy.normalized (
    key text PRIMARY KEY,
    policy text NOT NULL,
    using_expr text,
    check_expr text,
    item_version text,
    updated_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE dbpolicy.normalized IS 'dbpolicy''s cache of normalised expressions; safe to empty, do not edit by hand.'";

/// One cached item: PostgreSQL's form of the desired expressions of the policy `name` on
/// `table`, under `key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub key: String,
    pub table: QualifiedName,
    pub name: String,
    pub using: Option<String>,
    pub with_check: Option<String>,
}

/// A row as read back: its forms, and the version (`oid:xmin`) of the catalog row it was
/// recorded against. Any later change to that catalog row (an `ALTER POLICY` by hand, a
/// drop and re-create) changes its version, and the row is not used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Cached {
    pub using: Option<String>,
    pub with_check: Option<String>,
    pub version: Option<String>,
}

/// What resolves the names of an expression, besides its table: the search path, the
/// server version, and for each catalog a name can resolve to (functions, operators,
/// casts, namespaces, collations, and types other than tables' row and array types; not
/// the `dbpolicy` schema, which the first apply creates, nor temporary ones) its size, its
/// newest OID and a sum of hashes of each entry's name, schema and OID. A `CREATE
/// FUNCTION` that would capture a name changes it, and so does a rename or a move to
/// another schema of anything an expression may call (which changes how `pg_get_expr`
/// spells an unchanged policy): every key changes with it. `CREATE OR REPLACE` of a
/// function does not. One query per run.
pub(crate) const ENVIRONMENT_SQL: &str = "SELECT concat_ws(' | ',
    current_setting('search_path'), current_setting('server_version_num'),
    (SELECT count(*) || ':' || coalesce(max(oid), 0) || ':'
            || coalesce(sum(hashtextextended(proname::text || ' ' || pronamespace::text, oid::int8)), 0)
       FROM pg_proc),
    (SELECT count(*) || ':' || coalesce(max(oid), 0) || ':'
            || coalesce(sum(hashtextextended(oprname::text || ' ' || oprnamespace::text, oid::int8)), 0)
       FROM pg_operator),
    (SELECT count(*) || ':' || coalesce(max(oid), 0) FROM pg_cast),
    (SELECT count(*) || ':' || coalesce(max(oid), 0) || ':'
            || coalesce(sum(hashtextextended(nspname::text, oid::int8)), 0)
       FROM pg_namespace
      WHERE nspname <> 'dbpolicy' AND nspname NOT LIKE 'pg\\_temp\\_%'
        AND nspname NOT LIKE 'pg\\_toast\\_temp\\_%'),
    (SELECT count(*) || ':' || coalesce(max(oid), 0) || ':'
            || coalesce(sum(hashtextextended(collname::text || ' ' || collnamespace::text, oid::int8)), 0)
       FROM pg_collation),
    (SELECT count(*) || ':' || coalesce(max(oid), 0) || ':'
            || coalesce(sum(hashtextextended(typname::text || ' ' || typnamespace::text, oid::int8)), 0)
       FROM pg_type
      WHERE typrelid = 0 AND typcategory <> 'A'))";

/// The version of a policy's catalog row (`pg_policy p`) as the cache records and compares
/// it: `oid:xmin`, which any `ALTER POLICY` or drop and re-create changes, then the names
/// of the other tables and columns its expressions refer to (`pg_depend`), which
/// `pg_get_expr` spells out and a rename changes without touching the policy's row. Its
/// own table's columns are in the cache key (the shape), what it calls in the environment.
/// One fragment, so that the catalog read and the cache write compute it alike.
macro_rules! policy_version_sql {
    () => {
        "p.oid::text || ':' || p.xmin::text || coalesce(':' || (
           SELECT string_agg(r.relnamespace::text || '.' || quote_ident(r.relname)
                             || CASE WHEN d.refobjsubid > 0 THEN '.' || quote_ident(a.attname) ELSE '' END,
                             ',' ORDER BY d.refobjid, d.refobjsubid)
           FROM pg_depend d JOIN pg_class r ON r.oid = d.refobjid
           LEFT JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
           WHERE d.classid = 'pg_policy'::regclass AND d.objid = p.oid
             AND d.refclassid = 'pg_class'::regclass AND d.refobjid <> p.polrelid), '')"
    };
}
pub(crate) use policy_version_sql;

pub(crate) async fn environment(conn: &mut PgConnection) -> Result<String, sqlx::Error> {
    sqlx::query_scalar(ENVIRONMENT_SQL)
        .fetch_one(&mut *conn)
        .await
}

/// The cache key of one item: SHA-256 over its parts, each length-prefixed so that no two
/// different lists of parts hash alike. (The engine hashes through [`KeyPrefix`].)
#[cfg(test)]
pub(crate) fn key(parts: &[&str]) -> String {
    KeyPrefix::new(&[] as &[&str]).key(parts)
}

/// The hash of the parts every key of a run starts with (the kind of item, the
/// environment): hashed once per run, not once per item. `KeyPrefix::new(a).key(b)` is
/// `key(a ++ b)`, and so is `KeyPrefix::new(a).then(b).key(c)` of `key(a ++ b ++ c)`: the
/// parts an item shares with others (its table's) are hashed once for all of them.
#[derive(Clone)]
pub(crate) struct KeyPrefix(Sha256);

impl KeyPrefix {
    pub(crate) fn new<P: AsRef<[u8]>>(parts: &[P]) -> Self {
        let mut h = Sha256::new();
        absorb(&mut h, parts);
        KeyPrefix(h)
    }

    pub(crate) fn then<P: AsRef<[u8]>>(&self, parts: &[P]) -> Self {
        let mut h = self.0.clone();
        absorb(&mut h, parts);
        KeyPrefix(h)
    }

    pub(crate) fn key<P: AsRef<[u8]>>(&self, parts: &[P]) -> String {
        let mut h = self.0.clone();
        absorb(&mut h, parts);
        let mut out = [0u8; 64];
        hex(&h.finalize().into(), &mut out).to_string()
    }
}

/// `bytes` in lower-case hexadecimal, spelled into `out` (no allocation).
pub(crate) fn hex<'a>(bytes: &[u8; 32], out: &'a mut [u8; 64]) -> &'a str {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = HEX[usize::from(b >> 4)];
        out[2 * i + 1] = HEX[usize::from(b & 0xf)];
    }
    std::str::from_utf8(out).expect("hexadecimal digits are ASCII")
}

fn absorb<P: AsRef<[u8]>>(h: &mut Sha256, parts: &[P]) {
    for p in parts {
        let p = p.as_ref();
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
}

/// The rows for `keys` (one query); an absent cache table is an empty cache.
pub(crate) async fn read(
    conn: &mut PgConnection,
    keys: &[&str],
) -> Result<std::collections::HashMap<String, Cached>, sqlx::Error> {
    if keys.is_empty() {
        return Ok(Default::default());
    }
    type Row = (String, Option<String>, Option<String>, Option<String>);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT key, using_expr, check_expr, item_version FROM dbpolicy.normalized WHERE key = ANY($1::text[])",
    )
    .bind(keys)
    .fetch_all(&mut *conn)
    .await
    .or_else(|e| match crate::pg::sqlstate(&e).as_deref() {
        // undefined_table / invalid_schema_name: nothing applied yet
        Some("42P01") | Some("3F000") => Ok(Vec::new()),
        _ => Err(e),
    })?;
    Ok(rows
        .into_iter()
        .map(|(key, using, with_check, version)| {
            (
                key,
                Cached {
                    using,
                    with_check,
                    version,
                },
            )
        })
        .collect())
}

/// Upserts `records` in one statement (inside the caller's transaction when it has one),
/// each with the version of its policy's catalog row as the database has it now (after
/// the change that created or altered it, in the same transaction).
pub(crate) async fn write(
    conn: &mut PgConnection,
    records: &[Record],
    policy: &str,
) -> Result<(), sqlx::Error> {
    if records.is_empty() {
        return Ok(());
    }
    let keys: Vec<&str> = records.iter().map(|r| r.key.as_str()).collect();
    let usings: Vec<Option<&str>> = records.iter().map(|r| r.using.as_deref()).collect();
    let checks: Vec<Option<&str>> = records.iter().map(|r| r.with_check.as_deref()).collect();
    let tables: Vec<String> = records.iter().map(|r| r.table.quoted()).collect();
    let names: Vec<&str> = records.iter().map(|r| r.name.as_str()).collect();
    sqlx::query(
        concat!(
            "INSERT INTO dbpolicy.normalized (key, policy, using_expr, check_expr, item_version)
         SELECT DISTINCT ON (r.k) r.k, $6, r.u, r.c,
                (SELECT CASE WHEN pg_get_expr(p.polqual, p.polrelid) IS NOT DISTINCT FROM r.u
                              AND pg_get_expr(p.polwithcheck, p.polrelid) IS NOT DISTINCT FROM r.c
                        THEN ",
            policy_version_sql!(),
            " END
                   FROM pg_policy p WHERE p.polrelid = to_regclass(r.t) AND p.polname = r.n)
         FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[]) AS r(k, u, c, t, n)
         ON CONFLICT (key) DO UPDATE SET policy = EXCLUDED.policy, using_expr = EXCLUDED.using_expr,
             check_expr = EXCLUDED.check_expr, item_version = EXCLUDED.item_version, updated_at = now()"
    ))
    .bind(keys)
    .bind(usings)
    .bind(checks)
    .bind(tables)
    .bind(names)
    .bind(policy)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_separate_their_parts() {
        assert_ne!(key(&["ab", "c"]), key(&["a", "bc"]));
        assert_eq!(key(&["a", "b"]), key(&["a", "b"]));
        assert_eq!(key(&[]).len(), 64);
        // The key of no parts is SHA-256 of nothing: the hex spelling is unchanged.
        assert_eq!(
            key(&[]),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            KeyPrefix::new(&["a", "b"]).key(&["c"]),
            key(&["a", "b", "c"])
        );
        assert_eq!(
            KeyPrefix::new(&["a"]).then(&["b"]).key(&["c", "d"]),
            key(&["a", "b", "c", "d"])
        );
        assert_eq!(KeyPrefix::new(&[b"\xff"]).key(&[""]).len(), 64);
    }
}
