//! A scratch transaction that is always rolled back: PostgreSQL itself checks and
//! normalises what the spec says (expressions, index definitions, view queries) on
//! throwaway twins of the real tables, so the planner compares like with like and bad
//! input is found before anything is applied. One function call for all items: a
//! constant number of round trips however many items there are.

use sqlx::{Connection, PgConnection};

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
        sqlx::raw_sql(functions_sql).execute(&mut *tx).await?;
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
