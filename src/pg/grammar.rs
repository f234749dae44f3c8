//! PostgreSQL's own grammar (libpg_query, through the `pg_query` crate) as the security
//! boundary for SQL the policy author writes: an RLS `using`/`withCheck`, an index key or
//! `where`, a materialized view's query. Each fragment must be exactly what its field
//! means, as PostgreSQL's scanner and parser read it, before any statement carrying it is
//! built, let alone sent. A heuristic lexer cannot be that boundary: PostgreSQL's lexical
//! rules (escape strings, string continuation across newlines, nested comments, dollar
//! quoting) are subtle, and a fragment that ends its parenthesis early is arbitrary SQL.
//!
//! Two properties together make a fragment safe to place inside the statements the engine
//! writes (`USING (<expr>)`, `ON t (<key>)`, `WHERE (<expr>)`, `AS <query>`):
//! - its tokens, as PostgreSQL's own scanner splits them, hold no `;`, no comment, no
//!   parameter and balanced brackets, so placed after `(` it cannot leave that
//!   parenthesis, and placed last it cannot start another statement;
//! - parsed in a minimal statement of its kind, it is one node of that kind and nothing
//!   else (one expression; one index element; one plain `SELECT` with no data-modifying
//!   part).
//!
//! The executor additionally parses every statement it sends and sends it alone, in one
//! extended-protocol message, so a smuggled `;` would be at worst a syntax error.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};

use pg_query::protobuf::{node::Node as N, Token};
use pg_query::{NodeRef, ParserOptions};

/// Why a fragment is not what its field means; the message is for the policy author.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FragmentError(pub String);

fn fail<T>(message: impl Into<String>) -> Result<T, FragmentError> {
    Err(FragmentError(message.into()))
}

/// Longest fragment accepted (the CRD's limits are lower; the CLI has no API server).
pub(crate) const MAX_FRAGMENT_BYTES: usize = 100_000;

/// The verdicts already given in this process, per kind of fragment and text. A spec repeats
/// the same fragment on many tables (one tenant rule for every table), and validation,
/// observation and planning each ask about every fragment: parsing is the cost of a no-op
/// drift check at thousands of tables, and a verdict depends on the text alone.
static VERDICTS: LazyLock<[Verdicts; 2]> = LazyLock::new(Default::default);

/// The verdicts of one kind of fragment, by text.
type Verdicts = Mutex<HashMap<Box<str>, Result<(), FragmentError>>>;

/// Verdicts kept at most; past it the memo starts again (a cap, not an LRU: specs that
/// large re-parse at most once per run).
const MAX_VERDICTS: usize = 200_000;

#[derive(Debug, Clone, Copy)]
enum Fragment {
    Expression = 0,
    IndexKey = 1,
}

fn memoized(
    kind: Fragment,
    text: &str,
    check: fn(&str) -> Result<(), FragmentError>,
) -> Result<(), FragmentError> {
    let memo = &VERDICTS[kind as usize];
    // A poisoned lock only means another thread panicked mid-insert: the map is still valid.
    if let Some(v) = memo.lock().unwrap_or_else(|e| e.into_inner()).get(text) {
        return v.clone();
    }
    let verdict = check(text);
    let mut memo = memo.lock().unwrap_or_else(|e| e.into_inner());
    if memo.len() >= MAX_VERDICTS {
        memo.clear();
    }
    memo.insert(text.into(), verdict.clone());
    verdict
}

/// One scalar SQL expression: an RLS `using` or `withCheck`, an index `where`.
pub fn check_expression(text: &str) -> Result<(), FragmentError> {
    memoized(Fragment::Expression, text, parse_expression)
}

fn parse_expression(text: &str) -> Result<(), FragmentError> {
    check_tokens(text)?;
    if has_top_level_comma(text)? {
        // `SELECT (a, b)` is a row, but `USING (a, b)` is not an expression at all.
        return fail("is a list, not one SQL expression");
    }
    let parsed = parse(&format!("SELECT ({text}\n)"))?;
    let select = match one_statement(&parsed)? {
        N::SelectStmt(s) => s,
        _ => return fail("is not one SQL expression"),
    };
    let plain = select.target_list.len() == 1
        && select.from_clause.is_empty()
        && select.where_clause.is_none()
        && select.group_clause.is_empty()
        && select.having_clause.is_none()
        && select.window_clause.is_empty()
        && select.values_lists.is_empty()
        && select.sort_clause.is_empty()
        && select.limit_count.is_none()
        && select.limit_offset.is_none()
        && select.locking_clause.is_empty()
        && select.with_clause.is_none()
        && select.into_clause.is_none()
        && select.distinct_clause.is_empty()
        && select.larg.is_none();
    if !plain {
        return fail("is not one SQL expression");
    }
    no_data_modification(&parsed)
}

/// One index element: a column name, optionally with collation, operator class and
/// ordering (`email text_pattern_ops`, `created_at DESC`), or an expression
/// (`lower(email)`, `((stats->>'n')::numeric)`).
pub fn check_index_key(text: &str) -> Result<(), FragmentError> {
    memoized(Fragment::IndexKey, text, parse_index_key)
}

fn parse_index_key(text: &str) -> Result<(), FragmentError> {
    check_tokens(text)?;
    let parsed = parse(&format!("CREATE INDEX i ON t ({text}\n)"))?;
    let index = match one_statement(&parsed)? {
        N::IndexStmt(i) => i,
        _ => return fail("is not one index column or expression"),
    };
    if index.index_params.len() != 1
        || index.where_clause.is_some()
        || !index.index_including_params.is_empty()
    {
        return fail("is not one index column or expression");
    }
    no_data_modification(&parsed)
}

/// One query, as a materialized view's definition: a plain `SELECT` (or `VALUES`, `TABLE`,
/// set operations), with no `INTO`, no row locking and no data-modifying `WITH`. A single
/// trailing `;` is accepted and removed. Returns the query to place after `AS`.
pub fn check_query(text: &str) -> Result<&str, FragmentError> {
    let text = strip_final_semicolon(text)?;
    check_tokens(text)?;
    let parsed = parse(text)?;
    let select = match one_statement(&parsed)? {
        N::SelectStmt(s) => s,
        _ => return fail("is not a query: a view definition is one SELECT"),
    };
    if select.into_clause.is_some() {
        return fail("SELECT … INTO creates a table: a view definition is a plain SELECT");
    }
    // Row locking anywhere, subqueries included: FOR followed by UPDATE, SHARE, NO (KEY
    // UPDATE) or KEY (SHARE), read from PostgreSQL's tokens.
    let tokens: Vec<Token> = scan(text)?
        .iter()
        .map(|t| Token::try_from(t.token).unwrap_or(Token::Nul))
        .collect();
    if !select.locking_clause.is_empty()
        || tokens.windows(2).any(|w| {
            w[0] == Token::For
                && matches!(w[1], Token::Update | Token::Share | Token::No | Token::Key)
        })
    {
        return fail("row locking (FOR UPDATE/SHARE) is not allowed in a view definition");
    }
    for (node, ..) in parsed.protobuf.nodes() {
        if matches!(node, NodeRef::IntoClause(_)) {
            return fail("SELECT … INTO creates a table: a view definition is a plain SELECT");
        }
    }
    no_data_modification(&parsed)?;
    Ok(text)
}

/// The executor's last check on every statement it sends: exactly one statement.
pub(crate) fn check_one_statement(sql: &str) -> Result<(), FragmentError> {
    let parsed = parse(sql)?;
    one_statement(&parsed).map(|_| ())
}

/// The text without one final `;` (and the whitespace around it), found with PostgreSQL's
/// scanner so that a `;` inside a literal or identifier is not mistaken for it.
fn strip_final_semicolon(text: &str) -> Result<&str, FragmentError> {
    let tokens = scan(text)?;
    match tokens.last() {
        Some(last) if last.token == Token::Ascii59 as i32 => Ok(text[..last.start as usize].trim()),
        _ => Ok(text.trim()),
    }
}

fn scan(text: &str) -> Result<Vec<pg_query::protobuf::ScanToken>, FragmentError> {
    if text.len() > MAX_FRAGMENT_BYTES {
        return fail(format!(
            "is {} bytes long; at most {MAX_FRAGMENT_BYTES} are accepted",
            text.len()
        ));
    }
    if text.contains('\0') {
        return fail("contains a NUL byte");
    }
    if text.trim().is_empty() {
        // No tokens (and `scan_tokens` would build a slice from a null pointer).
        return Ok(Vec::new());
    }
    pg_query::scan(text)
        .map(|r| r.tokens)
        .map_err(|e| FragmentError(format!("is not valid SQL: {}", message(e))))
}

/// The token-level rules: no statement separator, comment or parameter, and brackets
/// that balance without ever closing one the fragment did not open.
fn check_tokens(text: &str) -> Result<(), FragmentError> {
    if text.trim().is_empty() {
        return fail("is empty");
    }
    let mut parens: i64 = 0;
    let mut brackets: i64 = 0;
    for t in scan(text)? {
        let token = Token::try_from(t.token).unwrap_or(Token::Nul);
        match token {
            Token::Ascii59 => {
                return fail(
                    "contains ';' outside quotes: this field is one SQL fragment, not statements",
                )
            }
            Token::SqlComment | Token::CComment => {
                return fail("contains an SQL comment; comments are not accepted in policy SQL")
            }
            Token::Param => return fail("contains a parameter ($n); write the value itself"),
            Token::Ascii40 => parens += 1,
            Token::Ascii41 => parens -= 1,
            Token::Ascii91 => brackets += 1,
            Token::Ascii93 => brackets -= 1,
            _ => {}
        }
        if parens < 0 {
            return fail("has a ')' without a matching '('");
        }
        if brackets < 0 {
            return fail("has a ']' without a matching '['");
        }
    }
    if parens != 0 {
        return fail("has a '(' that is not closed");
    }
    if brackets != 0 {
        return fail("has a '[' that is not closed");
    }
    Ok(())
}

fn has_top_level_comma(text: &str) -> Result<bool, FragmentError> {
    let mut depth = 0;
    for t in scan(text)? {
        match Token::try_from(t.token).unwrap_or(Token::Nul) {
            Token::Ascii40 | Token::Ascii91 => depth += 1,
            Token::Ascii41 | Token::Ascii93 => depth -= 1,
            Token::Ascii44 if depth == 0 => return Ok(true),
            _ => {}
        }
    }
    Ok(false)
}

fn parse(sql: &str) -> Result<pg_query::ParseResult, FragmentError> {
    pg_query::parse(sql, ParserOptions::DEFAULT)
        .map_err(|e| FragmentError(format!("is not valid SQL: {}", message(e))))
}

fn message(e: pg_query::Error) -> String {
    match e {
        pg_query::Error::Parse(m) | pg_query::Error::Scan(m) => m,
        other => other.to_string(),
    }
}

fn one_statement(parsed: &pg_query::ParseResult) -> Result<&N, FragmentError> {
    match parsed.protobuf.stmts.as_slice() {
        [one] => one
            .stmt
            .as_ref()
            .and_then(|s| s.node.as_ref())
            .ok_or_else(|| FragmentError("is empty".into())),
        [] => fail("is empty"),
        many => fail(format!(
            "holds {} statements where one is expected",
            many.len()
        )),
    }
}

/// No INSERT, UPDATE, DELETE or MERGE anywhere (a data-modifying `WITH` in a subquery).
fn no_data_modification(parsed: &pg_query::ParseResult) -> Result<(), FragmentError> {
    for (node, ..) in parsed.protobuf.nodes() {
        if matches!(
            node,
            NodeRef::InsertStmt(_)
                | NodeRef::UpdateStmt(_)
                | NodeRef::DeleteStmt(_)
                | NodeRef::MergeStmt(_)
        ) {
            return fail(
                "modifies data (INSERT, UPDATE, DELETE or MERGE), which is not allowed here",
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembered_verdicts_are_per_kind_and_stay_refusals() {
        // `a DESC` is one index key but not an expression: the memo must not mix kinds.
        for _ in 0..2 {
            assert_eq!(check_index_key("a DESC"), Ok(()));
            assert!(check_expression("a DESC").is_err());
            assert!(check_expression("1); DROP TABLE t; --").is_err());
            assert_eq!(check_expression("a = 1"), Ok(()));
        }
    }

    #[test]
    fn expressions_that_are_one_expression() {
        for ok in [
            "a = b",
            "(x->>'a')::numeric",
            "name = 'it''s (odd'",
            "\"we;ird\" > 0",
            "a IN ('x', 'y')",
            "E'\\'' = b",
            "user_id = current_setting('app.user_id', true)::uuid",
            "$$;$$ = b",
            "$tag$ ) ; $tag$ = b",
            "EXISTS (SELECT 1 FROM t WHERE t.id = owner_id)",
            "arr[1] = 2",
            "a -\n1 > 0",
            "U&'d\\0061t\\+000061' = x",
            // One literal to PostgreSQL (continuation): harmless text, accepted.
            "E'\\\\'\n'); DROP TABLE x; --' = 'a'",
        ] {
            assert_eq!(check_expression(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn expressions_that_are_not() {
        for bad in [
            "",
            "   ",
            "code) WHERE (true",
            "true); DROP TABLE t; --",
            "(a",
            "a)",
            "'open",
            "a -- c",
            "a /* c */",
            "a;",
            "$1",
            "E'\\'' ; DROP TABLE up; SELECT '",
            // PostgreSQL's string continuation: E'…' newline '…' is one escape string,
            // so `\'` in the second part is a quote and the literal ends early.
            "E'a'\n'\\''); DROP TABLE x; --'",
            "E'x'\n'y'); DROP TABLE x; --",
            "true) WITH CHECK (true",
            "1, 2",
            "1 FROM pg_shadow",
            "(WITH d AS (DELETE FROM t RETURNING 1) SELECT true)",
            "EXISTS (WITH d AS (UPDATE t SET a = 1 RETURNING 1) SELECT 1 FROM d)",
            "a[1",
            "a]",
            "a\0b",
        ] {
            assert!(check_expression(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn continuation_payload_is_one_literal_to_postgres() {
        // What the old lexer got wrong: a backslash-escaped quote inside E'' and a newline
        // continuation. PostgreSQL's scanner sees one string, so the ')' after it is real.
        let payload = "E'a'\n'\\'') OR (true); COPY (SELECT 1) TO PROGRAM 'touch /tmp/x'; --'";
        assert!(check_expression(payload).is_err());
    }

    #[test]
    fn index_keys() {
        for ok in [
            "user_id",
            "\"Weird Name\"",
            "lower(email)",
            "email text_pattern_ops",
            "created_at DESC NULLS LAST",
            "((stats->>'n')::numeric)",
            "name COLLATE \"C\"",
        ] {
            assert_eq!(check_index_key(ok), Ok(()), "{ok}");
        }
        for bad in [
            "a, b",
            "a) WHERE (true",
            "a); DROP TABLE t; --",
            "a) INCLUDE (b",
            "",
            "a -- x",
        ] {
            assert!(check_index_key(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn queries() {
        assert_eq!(check_query("SELECT 1;"), Ok("SELECT 1"));
        assert_eq!(check_query("  SELECT ';' ; \n"), Ok("SELECT ';'"));
        for ok in [
            "SELECT a, count(*) FROM t GROUP BY a",
            "VALUES (1), (2)",
            "TABLE t",
            "SELECT 1 UNION ALL SELECT 2",
            "WITH x AS (SELECT 1) SELECT * FROM x",
        ] {
            assert!(check_query(ok).is_ok(), "{ok}");
        }
        for bad in [
            "SELECT 1; DROP TABLE t",
            "SELECT 1; SELECT 2;",
            "DROP TABLE t",
            "SELECT 1 INTO newtable",
            "SELECT * FROM t FOR UPDATE",
            "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
            "SELECT * FROM (WITH d AS (INSERT INTO t VALUES (1) RETURNING *) SELECT * FROM d) s",
            "COPY (SELECT 1) TO PROGRAM 'id'",
            "SELECT 1 -- comment",
            "SELECT 1 /* x */",
            "SELECT E'\\'' \n'x'; DROP TABLE t; --'",
            ";",
            "",
        ] {
            assert!(check_query(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn one_statement() {
        assert!(check_one_statement("CREATE INDEX i ON t (a)").is_ok());
        assert!(check_one_statement("SELECT 1; SELECT 2").is_err());
        assert!(check_one_statement("").is_err());
    }

    #[test]
    fn huge_fragments_are_refused_without_parsing() {
        let big = format!("a = '{}'", "x".repeat(MAX_FRAGMENT_BYTES));
        assert!(check_expression(&big).unwrap_err().0.contains("bytes long"));
    }
}
