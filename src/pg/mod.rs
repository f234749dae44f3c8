//! PostgreSQL plumbing: identifier and literal quoting, connections, and the SQLSTATE of an
//! error (which [`crate::reason::Reason::from_sqlstate`] maps to what users see).

pub mod grammar;

use std::fmt;
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};

use crate::reason::Reason;

/// `"ident"`, with embedded quotes doubled: every identifier the engine emits goes through here.
pub(crate) fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// `'literal'` with embedded quotes doubled: every literal the engine emits goes through
/// here. A value with a backslash becomes `E'…'` with backslashes doubled (as PostgreSQL's
/// own `quote_literal` does), so the literal means the same whatever
/// `standard_conforming_strings` is.
pub(crate) fn quote_literal(value: &str) -> String {
    let quoted = value.replace('\'', "''");
    if value.contains('\\') {
        format!("E'{}'", quoted.replace('\\', "\\\\"))
    } else {
        format!("'{quoted}'")
    }
}

/// Sends one statement on its own, in one extended-protocol message (Parse/Bind/Execute,
/// unnamed and not cached): PostgreSQL refuses a second statement there, so even text that
/// slipped past [`grammar`] could not smuggle one in. The statement is parsed with
/// PostgreSQL's grammar first and refused unless it is exactly one.
pub(crate) async fn execute_one(
    conn: &mut sqlx::PgConnection,
    sql: &str,
) -> Result<sqlx::postgres::PgQueryResult, sqlx::Error> {
    grammar::check_one_statement(sql).map_err(|e| {
        sqlx::Error::InvalidArgument(format!("refusing to send a statement that {e}"))
    })?;
    sqlx::query(sql).persistent(false).execute(conn).await
}

/// A schema-qualified relation name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct QualifiedName {
    pub schema: String,
    pub name: String,
}

impl QualifiedName {
    pub fn new(schema: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            schema: schema.into(),
            name: name.into(),
        }
    }
    /// Reads back what [`Display`](fmt::Display) wrote (`schema.name`), split at the first
    /// dot: how the ledger and `dbpolicy.refreshes` store names.
    pub(crate) fn parse(text: &str) -> Option<Self> {
        text.split_once('.').map(|(s, n)| Self::new(s, n))
    }
    /// `"schema"."name"`, for SQL.
    pub(crate) fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

/// `schema.name`, for people.
impl fmt::Display for QualifiedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// A statement slower than this is logged as a warning (its text cut by
/// [`crate::logging`], like every logged statement).
pub(crate) const SLOW_STATEMENT: Duration = Duration::from_secs(5);

fn describe(opts: &PgConnectOptions) -> String {
    format!(
        "{}:{}/{}",
        opts.get_host(),
        opts.get_port(),
        opts.get_database().unwrap_or("(default)")
    )
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("the database URL is not a valid postgres:// URI")]
    InvalidUrl,
    #[error("cannot connect to {target}: {reason}")]
    Failed {
        target: String,
        reason: String,
        /// PostgreSQL's SQLSTATE, when the server answered with an error.
        sqlstate: Option<String>,
    },
}

impl ConnectError {
    pub(crate) fn failed(target: String, source: &sqlx::Error) -> Self {
        ConnectError::Failed {
            target,
            reason: error_summary(source),
            sqlstate: sqlstate(source),
        }
    }

    /// `AuthenticationFailed` when PostgreSQL's SQLSTATE says so (class 28), else
    /// `ConnectionFailed`.
    pub(crate) fn reason(&self) -> Reason {
        match self {
            ConnectError::InvalidUrl => Reason::InvalidConnectionUrl,
            ConnectError::Failed { sqlstate, .. } => {
                match Reason::from_sqlstate(sqlstate.as_deref()) {
                    Some(Reason::AuthenticationFailed) => Reason::AuthenticationFailed,
                    _ => Reason::ConnectionFailed,
                }
            }
        }
    }
}

/// Opens one connection (the engine's unit of work: session settings and the advisory
/// lock belong to it).
pub async fn connect_one(url: &str) -> Result<sqlx::PgConnection, ConnectError> {
    let opts: PgConnectOptions = url.parse().map_err(|_| ConnectError::InvalidUrl)?;
    let target = describe(&opts);
    let opts = opts
        .application_name("dbpolicy")
        .log_statements(tracing::log::LevelFilter::Debug)
        .log_slow_statements(tracing::log::LevelFilter::Warn, SLOW_STATEMENT);
    tokio::time::timeout(
        Duration::from_secs(15),
        sqlx::PgConnection::connect_with(&opts),
    )
    .await
    .map_err(|_| ConnectError::Failed {
        target: target.clone(),
        reason: "timed out after 15s".into(),
        sqlstate: None,
    })?
    .map_err(|source| ConnectError::failed(target, &source))
}

/// A one-line description of a sqlx error with the SQLSTATE when PostgreSQL sent one.
pub(crate) fn error_summary(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(db) => match db.code() {
            Some(code) => format!("{} (SQLSTATE {code})", db.message()),
            None => db.message().to_string(),
        },
        other => other.to_string(),
    }
}

/// The SQLSTATE of a database error, if it is one.
pub(crate) fn sqlstate(e: &sqlx::Error) -> Option<String> {
    match e {
        sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
        _ => None,
    }
}

/// `url` with its database replaced by `db` (percent-encoded), query string kept.
pub fn url_with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let path_start = base[authority_start..]
        .find('/')
        .map_or(base.len(), |i| authority_start + i);
    let mut out = format!("{}/{}", &base[..path_start], percent_encode(db));
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}

/// Everything but RFC 3986's unreserved characters (`A-Z a-z 0-9 - . _ ~`).
const URI_COMPONENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encodes everything but unreserved characters, for URI parts.
pub(crate) fn percent_encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, URI_COMPONENT).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("t"), "\"t\"");
        assert_eq!(
            quote_ident("a\"; DROP TABLE x; --"),
            "\"a\"\"; DROP TABLE x; --\""
        );
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal("a\\'b"), "E'a\\\\''b'");
        assert_eq!(QualifiedName::new("s", "T").quoted(), "\"s\".\"T\"");
        assert_eq!(QualifiedName::new("s", "T").to_string(), "s.T");
    }

    #[test]
    fn uri_parts_are_percent_encoded() {
        assert_eq!(percent_encode("az-09._~"), "az-09._~");
        assert_eq!(
            percent_encode("a b/c?d#e@f:g%"),
            "a%20b%2Fc%3Fd%23e%40f%3Ag%25"
        );
        assert_eq!(percent_encode("ü"), "%C3%BC");
        assert_eq!(
            url_with_database("postgres://u:p@h1:5432,h2/old?sslmode=require", "new db"),
            "postgres://u:p@h1:5432,h2/new%20db?sslmode=require"
        );
        assert_eq!(url_with_database("postgres://h", "d"), "postgres://h/d");
    }

    #[test]
    fn bad_url_has_no_secret() {
        let e = futures::executor::block_on(connect_one("postgres://u:hunter2@:notaport/db"))
            .unwrap_err();
        assert!(!e.to_string().contains("hunter2"));
    }
}
