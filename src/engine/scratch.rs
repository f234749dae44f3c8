//! A scratch transaction that is always rolled back: PostgreSQL itself checks and
//! normalises what the spec says (index definitions, view queries) on throwaway twins of
//! the real tables, so the planner compares like with like and bad input is found before
//! anything is applied.
//!
//! Every statement carrying spec text is sent on its own, in one extended-protocol
//! message ([`crate::pg::execute_one`]), never inside a function body or a
//! multi-statement string, and only after [`crate::pg::grammar`] has accepted the
//! fragment: a twin is built, never run, so nothing the spec says executes during a plan.
//! Each item runs in its own savepoint, rolled back as soon as its result is read: the
//! twins' locks never pile up, whatever the number of items.

use std::collections::BTreeMap;

use sqlx::{Connection, PgConnection};

use crate::pg::{execute_one, sqlstate, QualifiedName};
use crate::reason::Reason;

/// One item to normalise: the statements that build its twin (one statement each) and the
/// query that reads PostgreSQL's form of it back (one text column, `$1` = `read_arg`).
#[derive(Debug, Clone)]
pub(crate) struct Twin {
    pub item: QualifiedName,
    pub build: Vec<String>,
    pub read: &'static str,
    pub read_arg: String,
}

/// The twin relation name of the `n`th item, in `pg_temp`.
pub(crate) fn twin_name(n: usize) -> String {
    format!("dbpolicy_twin_{n}")
}

/// Builds every twin in a transaction that is rolled back, and returns PostgreSQL's form of
/// each item, or its refusal. Lock and statement timeouts are errors of the whole run, not
/// of an item.
pub(crate) async fn twins(
    conn: &mut PgConnection,
    items: Vec<Twin>,
) -> Result<BTreeMap<QualifiedName, Normalized>, sqlx::Error> {
    let mut out = BTreeMap::new();
    if items.is_empty() {
        return Ok(out);
    }
    let mut tx = conn.begin().await?;
    let result = async {
        for twin in &items {
            savepoint(&mut tx).await?;
            let built = build_and_read(&mut tx, twin).await;
            release_savepoint(&mut tx).await?;
            let value = match item_outcome(built)? {
                Ok(Some(def)) => Ok(def),
                Ok(None) => Err((None, "PostgreSQL did not read the twin back".into())),
                Err(refusal) => Err(refusal),
            };
            out.insert(twin.item.clone(), value);
        }
        Ok::<_, sqlx::Error>(())
    }
    .await;
    let rolled_back = tx.rollback().await;
    result?;
    rolled_back?;
    Ok(out)
}

/// What an item's work returned, or PostgreSQL's refusal of it (SQLSTATE, message).
pub(crate) type ItemResult<T> = Result<T, (Option<String>, String)>;

async fn build_and_read(
    conn: &mut PgConnection,
    twin: &Twin,
) -> Result<Option<String>, sqlx::Error> {
    for statement in &twin.build {
        execute_one(&mut *conn, statement).await?;
    }
    sqlx::query_scalar::<_, Option<String>>(twin.read)
        .bind(&twin.read_arg)
        .persistent(false)
        .fetch_one(&mut *conn)
        .await
}

/// Opens the savepoint one scratch item runs in.
pub(crate) async fn savepoint(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::Executor::execute(&mut *conn, "SAVEPOINT dbpolicy_item").await?;
    Ok(())
}

/// Rolls the item's savepoint back and releases it, so savepoints do not nest item after
/// item (fixed text: no spec text, so one simple-protocol round trip).
pub(crate) async fn release_savepoint(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::Executor::execute(
        &mut *conn,
        "ROLLBACK TO SAVEPOINT dbpolicy_item; RELEASE SAVEPOINT dbpolicy_item",
    )
    .await?;
    Ok(())
}

/// An item's result: a database error is the item's refusal; lock and statement timeouts
/// and errors that are not PostgreSQL's abort the whole scratch run.
pub(crate) fn item_outcome<T>(
    result: Result<T, sqlx::Error>,
) -> Result<ItemResult<T>, sqlx::Error> {
    match result {
        Ok(value) => Ok(Ok(value)),
        Err(e) => match (&e, sqlstate(&e).as_deref()) {
            (_, Some("55P03") | Some("57014")) => Err(e),
            (sqlx::Error::Database(db), code) => {
                Ok(Err((code.map(str::to_string), db.message().to_string())))
            }
            _ => Err(e),
        },
    }
}

/// What the scratch transaction made of one item: PostgreSQL's form of it, or the
/// SQLSTATE and message PostgreSQL refused it with.
pub(crate) type Normalized = Result<String, (Option<String>, String)>;

/// The normalised text of an item, or the reason and message of the plan error for it:
/// PostgreSQL's SQLSTATE decides the reason, `fallback` when it says nothing specific.
pub(crate) fn checked(
    item: Option<&Normalized>,
    fallback: Reason,
) -> Result<&str, (Reason, String)> {
    match item {
        Some(Ok(text)) => Ok(text),
        Some(Err((code, message))) => Err((
            Reason::from_sqlstate(code.as_deref()).unwrap_or(fallback),
            message.clone(),
        )),
        None => Err((fallback, "could not be checked".into())),
    }
}
