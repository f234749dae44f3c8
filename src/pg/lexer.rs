//! The one lexer for SQL fragments the policy author writes (policy expressions, index
//! keys and predicates, view queries): enough of PostgreSQL's lexical rules (quotes,
//! escape strings, comments) to tell that a fragment stays inside the statement it is
//! placed in. PostgreSQL checks everything else in a rolled-back transaction.

/// What the lexer saw besides the fragment being well formed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lexed {
    /// A `--` comment: whatever follows on its line is commented out.
    pub line_comment: bool,
    /// Any comment, `--` or `/* */`.
    pub comment: bool,
}

/// Checks that `expr` is one SQL expression that cannot escape the parentheses it is
/// written into (`USING (…)`): parentheses balance outside literals and comments, and
/// there is no `;`. Says whether it holds comments (after a `--` comment the closing
/// parenthesis must go on a line of its own).
///
/// Conservative where PostgreSQL's lexer is subtle: `$` (dollar quoting, parameters) is
/// refused outside quotes, and a quote after `e`/`E` that starts a word or follows a
/// number is an escape string (backslashes escape), as PostgreSQL reads it.
pub fn check_expression(expr: &str) -> Result<Lexed, String> {
    let b = expr.as_bytes();
    if expr.trim().is_empty() {
        return Err("the expression is empty".into());
    }
    if b.contains(&0) {
        return Err("the expression contains a NUL byte".into());
    }
    let is_word = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80;
    let mut depth: i64 = 0;
    let mut line_comment = false;
    let mut comment = false;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\'' => {
                let escapes = i > 0 && (b[i - 1] == b'e' || b[i - 1] == b'E') && {
                    // Where does the word holding this e/E start?
                    let mut s = i - 1;
                    while s > 0 && is_word(b[s - 1]) {
                        s -= 1;
                    }
                    s == i - 1 || b[s].is_ascii_digit()
                };
                i = skip_quoted(b, i + 1, b'\'', escapes)
                    .ok_or("the expression has an unterminated string literal")?;
            }
            b'"' => {
                i = skip_quoted(b, i + 1, b'"', false)
                    .ok_or("the expression has an unterminated quoted identifier")?;
            }
            b'-' if b.get(i + 1) == Some(&b'-') => {
                line_comment = true;
                comment = true;
                // PostgreSQL ends a comment at \r as well as \n.
                while i < b.len() && b[i] != b'\n' && b[i] != b'\r' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                comment = true;
                let mut nested = 0;
                loop {
                    if i + 1 >= b.len() {
                        return Err("the expression has an unterminated /* comment".into());
                    }
                    if b[i] == b'/' && b[i + 1] == b'*' {
                        nested += 1;
                        i += 2;
                    } else if b[i] == b'*' && b[i + 1] == b'/' {
                        nested -= 1;
                        i += 2;
                        if nested == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
            }
            b'$' => {
                return Err(
                    "'$' outside quotes (dollar quoting, parameters) is not accepted in a policy expression"
                        .into(),
                )
            }
            b';' => {
                return Err(
                    "';' outside quotes: a policy expression is one SQL expression, not statements"
                        .into(),
                )
            }
            b'(' => {
                depth += 1;
                i += 1;
            }
            b')' => {
                depth -= 1;
                if depth < 0 {
                    return Err("the expression has a ')' without a matching '('".into());
                }
                i += 1;
            }
            _ => i += 1,
        }
    }
    if depth != 0 {
        return Err("the expression has a '(' that is not closed".into());
    }
    Ok(Lexed {
        line_comment,
        comment,
    })
}

/// The index after the closing quote of a literal whose body starts at `i`.
fn skip_quoted(b: &[u8], mut i: usize, quote: u8, backslash_escapes: bool) -> Option<usize> {
    while i < b.len() {
        if backslash_escapes && b[i] == b'\\' {
            i += 2;
        } else if b[i] == quote {
            if b.get(i + 1) == Some(&quote) {
                i += 2;
            } else {
                return Some(i + 1);
            }
        } else {
            i += 1;
        }
    }
    None
}
