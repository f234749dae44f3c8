//! The PostgreSQL client programs a backup shells out to (`pg_dump`, `pg_restore`): which
//! binary to run, and the libpq environment that carries the connection.
//!
//! Why the environment and not `--dbname URL`: a process's arguments are readable by every
//! user of the machine (`ps`, `/proc/<pid>/cmdline`) and end up in logs; the password must
//! never be there. libpq reads `PGHOST`, `PGPASSWORD`, … from the environment instead.

use std::path::{Path, PathBuf};
use std::process::Stdio;

/// A connection given as libpq environment variables (the password among them).
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct LibpqEnv {
    vars: Vec<(&'static str, String)>,
}

/// Never prints values: `PGPASSWORD` is one of them.
impl std::fmt::Debug for LibpqEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.vars.iter().map(|(k, _)| *k).collect();
        f.debug_struct("LibpqEnv").field("vars", &names).finish()
    }
}

/// libpq URI query parameters and the environment variable libpq reads for each.
const PARAMS: &[(&str, &str)] = &[
    ("host", "PGHOST"),
    ("hostaddr", "PGHOSTADDR"),
    ("port", "PGPORT"),
    ("dbname", "PGDATABASE"),
    ("user", "PGUSER"),
    ("password", "PGPASSWORD"),
    ("passfile", "PGPASSFILE"),
    ("options", "PGOPTIONS"),
    ("application_name", "PGAPPNAME"),
    ("connect_timeout", "PGCONNECT_TIMEOUT"),
    ("sslmode", "PGSSLMODE"),
    ("sslnegotiation", "PGSSLNEGOTIATION"),
    ("sslrootcert", "PGSSLROOTCERT"),
    ("sslcert", "PGSSLCERT"),
    ("sslkey", "PGSSLKEY"),
    ("sslcrl", "PGSSLCRL"),
    ("sslcrldir", "PGSSLCRLDIR"),
    ("sslsni", "PGSSLSNI"),
    ("requirepeer", "PGREQUIREPEER"),
    ("require_auth", "PGREQUIREAUTH"),
    ("channel_binding", "PGCHANNELBINDING"),
    ("gssencmode", "PGGSSENCMODE"),
    ("krbsrvname", "PGKRBSRVNAME"),
    ("target_session_attrs", "PGTARGETSESSIONATTRS"),
    ("load_balance_hosts", "PGLOADBALANCEHOSTS"),
];

/// A database URL libpq's variables cannot be made from. Says the problem, never the URL
/// (it may hold a password).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum UrlError {
    #[error("the database URL is not a valid postgres:// URI ({0})")]
    Invalid(#[source] url::ParseError),
    #[error("the database URL must start with postgres:// or postgresql://, not {0}://")]
    Scheme(String),
    #[error("the database URL has an invalid %-escape")]
    BadEscape,
    #[error("the database URL has %-escapes that are not UTF-8")]
    NotUtf8,
    #[error("the database URL has a parameter libpq does not know: {0}")]
    UnknownParameter(String),
}

impl LibpqEnv {
    /// Splits a `postgres://` URI into libpq variables.
    pub(crate) fn from_url(url: &str) -> Result<LibpqEnv, UrlError> {
        let parsed = url::Url::parse(url).map_err(UrlError::Invalid)?;
        if !matches!(parsed.scheme(), "postgres" | "postgresql") {
            return Err(UrlError::Scheme(parsed.scheme().to_string()));
        }
        let mut vars: Vec<(&'static str, String)> = Vec::new();
        let mut set = |name: &'static str, value: String| {
            vars.retain(|(k, _)| *k != name);
            if !value.is_empty() {
                vars.push((name, value));
            }
        };
        if let Some(host) = parsed.host_str() {
            set(
                "PGHOST",
                host.trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string(),
            );
        }
        if let Some(port) = parsed.port() {
            set("PGPORT", port.to_string());
        }
        set("PGUSER", percent_decode(parsed.username())?);
        if let Some(password) = parsed.password() {
            set("PGPASSWORD", percent_decode(password)?);
        }
        set(
            "PGDATABASE",
            percent_decode(parsed.path().trim_start_matches('/'))?,
        );
        for (key, value) in parsed.query_pairs() {
            let Some((_, var)) = PARAMS.iter().find(|(p, _)| *p == key) else {
                return Err(UrlError::UnknownParameter(key.into_owned()));
            };
            set(var, value.into_owned());
        }
        Ok(LibpqEnv { vars })
    }

    /// The same connection to another database of the server.
    pub(crate) fn with_database(&self, database: &str) -> LibpqEnv {
        let mut vars: Vec<_> = self
            .vars
            .iter()
            .filter(|(k, _)| *k != "PGDATABASE")
            .cloned()
            .collect();
        vars.push(("PGDATABASE", database.to_string()));
        LibpqEnv { vars }
    }

    #[cfg(test)]
    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.vars
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Replaces whatever libpq variables the command would inherit with these.
    pub(crate) fn apply(&self, cmd: &mut tokio::process::Command) {
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PG") {
                cmd.env_remove(&key);
            }
        }
        cmd.env("PGAPPNAME", "dbpolicy-backup");
        for (k, v) in &self.vars {
            cmd.env(k, v);
        }
    }
}

fn percent_decode(s: &str) -> Result<String, UrlError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or(UrlError::BadEscape)?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| UrlError::NotUtf8)
}

/// A client program and its PostgreSQL major version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Tool {
    pub path: PathBuf,
    pub major: u32,
    /// `pg_dump (PostgreSQL) 15.20 (Debian 15.20-0+deb12u1)`.
    pub version: String,
}

/// Major version from `pg_dump --version` output (`pg_dump (PostgreSQL) 15.20 …`, or `9.6.24`).
pub(crate) fn parse_major(version_output: &str) -> Option<u32> {
    let number = version_output
        .split_whitespace()
        .find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()))?;
    let mut parts = number.split(|c: char| !c.is_ascii_digit());
    let first: u32 = parts.next()?.parse().ok()?;
    if first < 10 {
        // 9.6 and older: the major version is two numbers.
        let second: u32 = parts.next()?.parse().ok()?;
        return Some(first * 100 + second);
    }
    Some(first)
}

/// A client program (`pg_dump`, `pg_restore`, …) that cannot be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ToolError {
    #[error("{name} not found in PATH nor in /usr/lib/postgresql/<version>/bin: install the PostgreSQL client (postgresql-client)")]
    NotFound { name: String },
    #[error("{name}: {} is not runnable", path.display())]
    NotRunnable { name: String, path: PathBuf },
    #[error("{}: {source}", path.display())]
    Start {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} --version: {status}", path.display())]
    VersionFailed {
        path: PathBuf,
        status: std::process::ExitStatus,
    },
    #[error("{}: cannot read its version from {output:?}", path.display())]
    UnknownVersion { path: PathBuf, output: String },
    /// The newest copy found is older than the server or archive needs.
    #[error(
        "{name}: the newest one found ({}, version {major}) is older than PostgreSQL {}: install postgresql-client-{}",
        path.display(),
        display_major(*min),
        display_major(*min)
    )]
    TooOld {
        name: String,
        path: PathBuf,
        major: u32,
        min: u32,
    },
}

/// Picks the newest candidate of `name`; it must be at least `min_major` (a client refuses
/// to dump a newer server, and only a newer `pg_restore` reads a newer archive).
pub(crate) fn choose<'a>(
    name: &str,
    candidates: &'a [Tool],
    min_major: Option<u32>,
) -> Result<&'a Tool, ToolError> {
    let newest = candidates
        .iter()
        .max_by_key(|t| t.major)
        .ok_or_else(|| ToolError::NotFound { name: name.into() })?;
    match min_major {
        Some(min) if newest.major < min => Err(ToolError::TooOld {
            name: name.into(),
            path: newest.path.clone(),
            major: newest.major,
            min,
        }),
        _ => Ok(newest),
    }
}

fn display_major(major: u32) -> String {
    if major >= 100 {
        format!("{}.{}", major / 100, major % 100)
    } else {
        major.to_string()
    }
}

/// Major version of a `server_version_num` (150020 → 15, 90624 → 906).
pub(crate) fn server_major(version_num: i32) -> u32 {
    let v = version_num.max(0) as u32;
    if v >= 100_000 {
        v / 10_000
    } else {
        v / 100
    }
}

/// Finds `name` (`pg_dump`, `pg_restore`): `explicit` when given, otherwise every copy in
/// `PATH` and in `/usr/lib/postgresql/<v>/bin`, the newest chosen.
pub(crate) async fn find(
    name: &str,
    explicit: Option<&Path>,
    min_major: Option<u32>,
) -> Result<Tool, ToolError> {
    let mut paths: Vec<PathBuf> = Vec::new();
    if let Some(p) = explicit {
        paths.push(p.to_path_buf());
    } else {
        if let Some(path) = std::env::var_os("PATH") {
            paths.extend(std::env::split_paths(&path).map(|d| d.join(name)));
        }
        if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
            for e in entries.flatten() {
                paths.push(e.path().join("bin").join(name));
            }
        }
        paths.retain(|p| p.is_file());
        paths.dedup();
    }
    let mut found = Vec::new();
    for path in paths {
        match version_of(&path).await {
            Ok(version) => match parse_major(&version) {
                Some(major) => found.push(Tool {
                    path,
                    major,
                    version,
                }),
                None if explicit.is_some() => {
                    return Err(ToolError::UnknownVersion {
                        path,
                        output: version,
                    })
                }
                None => {}
            },
            Err(e) if explicit.is_some() => return Err(e),
            Err(_) => {}
        }
    }
    if let (true, Some(p)) = (found.is_empty(), explicit) {
        return Err(ToolError::NotRunnable {
            name: name.into(),
            path: p.to_path_buf(),
        });
    }
    choose(name, &found, min_major).cloned()
}

async fn version_of(path: &Path) -> Result<String, ToolError> {
    let out = tokio::process::Command::new(path)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|source| ToolError::Start {
            path: path.to_path_buf(),
            source,
        })?;
    if !out.status.success() {
        return Err(ToolError::VersionFailed {
            path: path.to_path_buf(),
            status: out.status,
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Resolves on Ctrl-C or SIGTERM (a Job being deleted), with the signal's name.
pub(crate) async fn interrupted() -> &'static str {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = term => "SIGTERM",
    }
}

/// One connection, like [`crate::pg::connect_one`], without sqlx's slow-statement
/// warnings: counting the rows of a big table takes seconds by nature.
pub(crate) async fn connect(url: &str) -> Result<sqlx::PgConnection, crate::pg::ConnectError> {
    use crate::pg::ConnectError;
    use sqlx::{ConnectOptions, Connection};
    let opts: sqlx::postgres::PgConnectOptions =
        url.parse().map_err(|_| ConnectError::InvalidUrl)?;
    let target = format!(
        "{}:{}/{}",
        opts.get_host(),
        opts.get_port(),
        opts.get_database().unwrap_or("(default)")
    );
    let opts = opts
        .application_name("dbpolicy-backup")
        .log_statements(tracing::log::LevelFilter::Debug)
        .log_slow_statements(tracing::log::LevelFilter::Off, std::time::Duration::MAX);
    match tokio::time::timeout(
        std::time::Duration::from_secs(15),
        sqlx::PgConnection::connect_with(&opts),
    )
    .await
    {
        Err(_) => Err(ConnectError::Failed {
            target,
            reason: "timed out after 15s".into(),
            sqlstate: None,
        }),
        Ok(Err(e)) => Err(ConnectError::failed(target, &e)),
        Ok(Ok(conn)) => Ok(conn),
    }
}

/// The last `max` bytes of a program's stderr, for error messages.
pub(crate) fn tail(stderr: &[u8], max: usize) -> String {
    let start = stderr.len().saturating_sub(max);
    String::from_utf8_lossy(&stderr[start..]).trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_to_env() {
        let env = LibpqEnv::from_url(
            "postgres://app%40corp:p%40ss%2Fw0rd@db.example:6432/quiz%20db?sslmode=require&application_name=x",
        )
        .unwrap();
        assert_eq!(env.get("PGHOST"), Some("db.example"));
        assert_eq!(env.get("PGPORT"), Some("6432"));
        assert_eq!(env.get("PGUSER"), Some("app@corp"));
        assert_eq!(env.get("PGPASSWORD"), Some("p@ss/w0rd"));
        assert_eq!(env.get("PGDATABASE"), Some("quiz db"));
        assert_eq!(env.get("PGSSLMODE"), Some("require"));
        assert_eq!(env.get("PGAPPNAME"), Some("x"));
        assert_eq!(env.with_database("other").get("PGDATABASE"), Some("other"));
        // Debug output never shows a value.
        assert!(!format!("{env:?}").contains("p@ss"));
    }

    #[test]
    fn socket_and_ipv6_urls() {
        let env = LibpqEnv::from_url("postgresql:///app?host=/var/run/postgresql&user=me").unwrap();
        assert_eq!(env.get("PGHOST"), Some("/var/run/postgresql"));
        assert_eq!(env.get("PGUSER"), Some("me"));
        assert_eq!(env.get("PGPASSWORD"), None);
        let env = LibpqEnv::from_url("postgres://u@[::1]:5433/db").unwrap();
        assert_eq!(env.get("PGHOST"), Some("::1"));
    }

    #[test]
    fn bad_urls_never_echo_the_secret() {
        for url in [
            "mysql://u:hunter2@h/db",
            "postgres://u:hunter2@h/db?frobnicate=1",
            "postgres://u:hunter2@h/db%zz",
            "not a url hunter2",
        ] {
            let e = LibpqEnv::from_url(url).unwrap_err();
            assert!(!e.to_string().contains("hunter2"), "{e}");
        }
    }

    #[test]
    fn versions() {
        assert_eq!(
            parse_major("pg_dump (PostgreSQL) 15.20 (Debian 15.20-0+deb12u1)"),
            Some(15)
        );
        assert_eq!(parse_major("pg_restore (PostgreSQL) 17beta2"), Some(17));
        assert_eq!(parse_major("pg_dump (PostgreSQL) 9.6.24"), Some(906));
        assert_eq!(parse_major("nonsense"), None);
        assert_eq!(server_major(150020), 15);
        assert_eq!(server_major(90624), 906);
    }

    #[test]
    fn chooses_the_newest_client_not_older_than_the_server() {
        let tool = |v: u32| Tool {
            path: PathBuf::from(format!("/usr/lib/postgresql/{v}/bin/pg_dump")),
            major: v,
            version: v.to_string(),
        };
        let tools = [tool(15), tool(17), tool(16)];
        assert_eq!(choose("pg_dump", &tools, Some(15)).unwrap().major, 17);
        assert_eq!(choose("pg_dump", &tools, Some(17)).unwrap().major, 17);
        assert_eq!(choose("pg_dump", &tools, None).unwrap().major, 17);
        let e = choose("pg_dump", &tools, Some(18)).unwrap_err();
        assert!(e.to_string().contains("postgresql-client-18"), "{e}");
        assert!(choose("pg_dump", &[], None).is_err());
    }
}
