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
//!
//! [`run`] is the mechanism, for every area: [`twins`] for one-statement twins read back
//! with one query (index definitions, view queries), and RLS's normalisation
//! (`areas/rls/normalize.rs`), whose item is a table twin and all its policies.

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

/// Where the names of the items' statements resolve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Names {
    /// As in the session: twins are named `pg_temp.…` explicitly.
    AsSession,
    /// `pg_temp` last in the search path, so a twin named like its real table stands in
    /// for it only where the statement says `pg_temp`, and every other name resolves as
    /// it does for the real table (RLS expressions that mention other tables).
    TwinsLast,
}

/// The one scratch mechanism: runs `work` for each item in a transaction that is always
/// rolled back, each item in its own savepoint rolled back as soon as its work returns,
/// and returns what each item's work returned, or PostgreSQL's refusal of it (in item
/// order). Lock and statement timeouts and errors that are not PostgreSQL's are errors of
/// the whole run, not of an item (see [`item_outcome`]). `work` may start its item over
/// with [`restart_item`].
pub(crate) async fn run<T, R>(
    conn: &mut PgConnection,
    items: &[T],
    names: Names,
    mut work: impl AsyncFnMut(&mut PgConnection, &T) -> Result<R, sqlx::Error>,
) -> Result<Vec<ItemResult<R>>, sqlx::Error> {
    let mut out = Vec::with_capacity(items.len());
    if items.is_empty() {
        return Ok(out);
    }
    let mut tx = conn.begin().await?;
    let result = async {
        if names == Names::TwinsLast {
            sqlx::Executor::execute(
                &mut *tx,
                "SELECT set_config('search_path',
                    CASE WHEN current_setting('search_path') = '' THEN 'pg_temp'
                         ELSE current_setting('search_path') || ', pg_temp' END, true)",
            )
            .await?;
        }
        for item in items {
            savepoint(&mut tx).await?;
            let done = work(&mut tx, item).await;
            release_savepoint(&mut tx).await?;
            out.push(item_outcome(done)?);
        }
        Ok::<_, sqlx::Error>(())
    }
    .await;
    let rolled_back = tx.rollback().await;
    result?;
    rolled_back?;
    Ok(out)
}

/// Builds every twin (see [`run`]) and returns PostgreSQL's form of each item, or its
/// refusal.
pub(crate) async fn twins(
    conn: &mut PgConnection,
    items: Vec<Twin>,
) -> Result<BTreeMap<QualifiedName, Normalized>, sqlx::Error> {
    let read = run(conn, &items, Names::AsSession, build_and_read).await?;
    Ok(items
        .into_iter()
        .zip(read)
        .map(|(twin, built)| {
            let value = match built {
                Ok(Some(def)) => Ok(def),
                Ok(None) => Err((None, "PostgreSQL did not read the twin back".into())),
                Err(refusal) => Err(refusal),
            };
            (twin.item, value)
        })
        .collect())
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
async fn savepoint(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::Executor::execute(&mut *conn, "SAVEPOINT dbpolicy_item").await?;
    Ok(())
}

/// Rolls the item's savepoint back and releases it, so savepoints do not nest item after
/// item (fixed text: no spec text, so one simple-protocol round trip).
async fn release_savepoint(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::Executor::execute(
        &mut *conn,
        "ROLLBACK TO SAVEPOINT dbpolicy_item; RELEASE SAVEPOINT dbpolicy_item",
    )
    .await?;
    Ok(())
}

/// Undoes what the current item's work did so far, also after an error, so that it can
/// start over (the item's savepoint stays).
pub(crate) async fn restart_item(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::Executor::execute(&mut *conn, "ROLLBACK TO SAVEPOINT dbpolicy_item").await?;
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
