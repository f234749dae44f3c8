//! A scratch transaction that is always rolled back: PostgreSQL itself checks and
//! normalises what the spec says (index definitions, view queries) on throwaway twins of
//! the real tables, so the planner compares like with like and bad input is found before
//! anything is applied. One function call for all items: a constant number of round trips
//! however many items there are. Each item runs in its own subtransaction that is rolled
//! back as soon as its result is read (a sentinel exception), so the twins' locks
//! never pile up, whatever the number of items.

use sqlx::{Connection, Executor, PgConnection};

/// Runs `functions_sql` (CREATE FUNCTION pg_temp.… statements) and then `call` (a query
/// returning one jsonb, taking `input` as `$1::jsonb`) in a transaction that is rolled back.
pub async fn rolled_back(
    conn: &mut PgConnection,
    functions_sql: &str,
    call: &str,
    input: &serde_json::Value,
) -> Result<serde_json::Value, sqlx::Error> {
    let mut tx = conn.begin().await?;
    let result = async {
        // A plain string runs as one simple query (several statements allowed) and, unlike
        // `raw_sql`, keeps this future `Send` for the controller.
        (&mut *tx).execute(functions_sql).await?;
        // Not prepared: the function is new in every transaction.
        sqlx::query_scalar::<_, String>(call)
            .bind(input.to_string())
            .persistent(false)
            .fetch_one(&mut *tx)
            .await
    }
    .await;
    let rolled_back = tx.rollback().await;
    let text = result?;
    rolled_back?;
    serde_json::from_str(&text).map_err(|e| sqlx::Error::Protocol(format!("scratch result: {e}")))
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
            (crate::pg::QualifiedName::new(r.schema, r.name), value)
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
