//! A scratch transaction that is always rolled back: PostgreSQL itself checks and
//! normalises what the spec says (index definitions, view queries) on throwaway twins of
//! the real tables, so the planner compares like with like and bad input is found before
//! anything is applied. One function call for all items: a constant number of round trips
//! however many items there are. Each item runs in its own subtransaction that is rolled
//! back as soon as its result is read (a sentinel exception), so the twins' locks
//! never pile up, whatever the number of items.

use std::collections::BTreeMap;

use sqlx::{Connection, Executor, PgConnection};

use crate::pg::QualifiedName;

/// The function every area's twins go through: for each input item, `build` (PL/pgSQL that
/// creates the twin named `twin` from `item` and sets `def` to what PostgreSQL reads back)
/// runs in a subtransaction that is then rolled back on purpose, releasing its locks; a
/// refusal is kept with its SQLSTATE and message.
fn twins_function(build: &str) -> String {
    format!(
        r#"CREATE FUNCTION pg_temp.dbpolicy_twins(input jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $dbpolicy$
DECLARE
    item jsonb;
    twin text;
    def text;
    result jsonb := '[]';
BEGIN
    FOR item IN SELECT value FROM jsonb_array_elements(input) LOOP
        twin := 'dbpolicy_twin_' || (item->>'n');
        BEGIN
{build}
            RAISE EXCEPTION 'dbpolicy: roll back this item';
        EXCEPTION
            WHEN lock_not_available OR query_canceled THEN RAISE;
            WHEN OTHERS THEN
                IF SQLERRM = 'dbpolicy: roll back this item' THEN
                    result := result || jsonb_build_object('schema', item->>'schema', 'name', item->>'name', 'def', def);
                ELSE
                    result := result || jsonb_build_object('schema', item->>'schema', 'name', item->>'name',
                        'sqlstate', SQLSTATE, 'message', SQLERRM);
                END IF;
        END;
    END LOOP;
    RETURN result;
END
$dbpolicy$;"#
    )
}

/// Builds a twin of every item (`{n, schema, name, …}`) with `build` in a transaction that
/// is rolled back, and returns PostgreSQL's form of each, or its refusal.
pub async fn twins(
    conn: &mut PgConnection,
    build: &str,
    items: Vec<serde_json::Value>,
) -> Result<BTreeMap<QualifiedName, Normalized>, sqlx::Error> {
    if items.is_empty() {
        return Ok(BTreeMap::new());
    }
    let input = serde_json::Value::Array(items).to_string();
    let functions = twins_function(build);
    let mut tx = conn.begin().await?;
    let result = async {
        // A plain string runs as one simple query and, unlike `raw_sql`, keeps this
        // future `Send` for the controller.
        (&mut *tx).execute(functions.as_str()).await?;
        // Not prepared: the function is new in every transaction.
        sqlx::query_scalar::<_, String>("SELECT pg_temp.dbpolicy_twins($1::jsonb)::text")
            .bind(input)
            .persistent(false)
            .fetch_one(&mut *tx)
            .await
    }
    .await;
    let rolled_back = tx.rollback().await;
    let text = result?;
    rolled_back?;
    let value = serde_json::from_str(&text)
        .map_err(|e| sqlx::Error::Protocol(format!("scratch result: {e}")))?;
    parse_rows(value)
}

/// What the scratch transaction made of one item: PostgreSQL's form of it, or the
/// SQLSTATE and message PostgreSQL refused it with.
pub type Normalized = Result<String, (Option<String>, String)>;

#[derive(serde::Deserialize)]
struct Row {
    schema: String,
    name: String,
    def: Option<String>,
    sqlstate: Option<String>,
    message: Option<String>,
}

/// Reads a scratch function's `[{schema, name, def | sqlstate, message}]` result.
pub fn parse_rows(
    value: serde_json::Value,
) -> Result<std::collections::BTreeMap<crate::pg::QualifiedName, Normalized>, sqlx::Error> {
    let rows: Vec<Row> = serde_json::from_value(value)
        .map_err(|e| sqlx::Error::Protocol(format!("scratch result: {e}")))?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let value = match (r.def, r.message) {
                (Some(def), _) => Ok(def),
                (None, message) => Err((r.sqlstate, message.unwrap_or_default())),
            };
            (QualifiedName::new(r.schema, r.name), value)
        })
        .collect())
}

/// The normalised text of an item, or the reason and message of the plan error for it:
/// PostgreSQL's SQLSTATE decides the reason, `fallback` when it says nothing specific.
pub fn checked<'a>(
    item: Option<&'a Normalized>,
    fallback: &'static str,
) -> Result<&'a str, (&'static str, String)> {
    match item {
        Some(Ok(text)) => Ok(text),
        Some(Err((code, message))) => {
            let reason = match crate::pg::reason_for_sqlstate(code.as_deref()) {
                "ApplyFailed" => fallback,
                r => r,
            };
            Err((reason, message.clone()))
        }
        None => Err((fallback, "could not be checked".into())),
    }
}
