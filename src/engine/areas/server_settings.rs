//! Server settings: `ALTER SYSTEM SET/RESET` and `pg_reload_conf()`.
//!
//! - Names are PostgreSQL's: matched case-insensitively, shown with `pg_settings`' spelling.
//! - Settings that run commands, load code, move the server's files or can lock clients
//!   out are denied unless the platform team allows them ([`AllowedSettings`], the
//!   `--allow-setting` flag): never the policy author's decision.
//! - Every value is checked before the first `ALTER SYSTEM` (which cannot be rolled
//!   back): against `pg_settings` (type, unit, range, enum), and by PostgreSQL itself
//!   (`set_config` in a rolled-back transaction) for every parameter a session may set.
//!   What only `ALTER SYSTEM` can check (`sighup`/`postmaster` string values) is undone by
//!   [`recover`] when it fails, so postgresql.auto.conf ends a failed run as it began.
//! - Drift is judged by what is written (`pg_file_settings` on postgresql.auto.conf) and
//!   by what is live (`pg_settings`): written but never loaded is fixed by a reload;
//!   waiting for a restart is reported (`RestartRequired`), never drift.

use std::collections::{BTreeMap, BTreeSet};

use futures::StreamExt;
use sqlx::{Connection, PgConnection, Row};

use crate::api::ServerSettingsSpec;
use crate::engine::apply::ApplyReport;
use crate::engine::areas::{AfterApply, AreaModule, ObserveContext, ObserveError, PlanContext};
use crate::engine::ledger::{self, Ledger};
use crate::engine::plan::{Area, AreaPlan, Change, Hazard, LedgerOp};
use crate::pg::{error_summary, execute_one, quote_ident, quote_literal, sqlstate};
use crate::reason::Reason;

const AREA: Area = Area::ServerSettings;
/// The ledger target under which owned parameters are recorded.
const TARGET: &str = "server";
/// The target of the reload change.
const RELOAD_TARGET: &str = "server";
const RELOAD_SQL: &str = "SELECT pg_reload_conf()";

// ------------------------------------------------------------------ the denylist

/// Parameters denied unless the platform team allows them, and why. See
/// docs/server-settings.md for the reasoning behind each group.
pub(crate) const DENIED: &[(&str, &str)] = &[
    // Run shell commands on the database host as the postgres OS user.
    (
        "archive_command",
        "runs shell commands on the database host",
    ),
    (
        "archive_cleanup_command",
        "runs shell commands on the database host",
    ),
    (
        "recovery_end_command",
        "runs shell commands on the database host",
    ),
    (
        "restore_command",
        "runs shell commands on the database host",
    ),
    (
        "ssl_passphrase_command",
        "runs shell commands on the database host",
    ),
    // Load shared libraries (native code) into the server.
    ("archive_library", "loads native code into the server"),
    (
        "dynamic_library_path",
        "chooses where the server loads native code from",
    ),
    ("jit_provider", "loads native code into the server"),
    (
        "local_preload_libraries",
        "loads native code into every new session",
    ),
    (
        "session_preload_libraries",
        "loads native code into every new session; a bad value makes every new connection fail",
    ),
    (
        "shared_preload_libraries",
        "loads native code into the server; a bad value stops the server from starting",
    ),
    // Move the files the server reads or writes, or where clients reach it.
    ("config_file", "moves the server's configuration files"),
    ("data_directory", "moves the server's data directory"),
    (
        "external_pid_file",
        "writes a file anywhere the postgres OS user can",
    ),
    ("hba_file", "replaces the client authentication rules"),
    ("ident_file", "replaces the client authentication rules"),
    (
        "krb_server_keyfile",
        "makes the server read a key file of the setter's choosing",
    ),
    (
        "listen_addresses",
        "can lock every client out after a restart",
    ),
    (
        "log_directory",
        "makes the server write log files anywhere the postgres OS user can",
    ),
    (
        "log_filename",
        "makes the server write log files anywhere the postgres OS user can",
    ),
    ("port", "can lock every client out after a restart"),
    (
        "primary_conninfo",
        "makes the server connect to a host of the setter's choosing",
    ),
    ("ssl", "turning TLS off locks out clients that require it"),
    (
        "ssl_ca_file",
        "makes the server read a file of the setter's choosing; a bad file breaks TLS",
    ),
    (
        "ssl_cert_file",
        "makes the server read a file of the setter's choosing; a bad file breaks TLS",
    ),
    (
        "ssl_crl_dir",
        "makes the server read files of the setter's choosing; a bad value breaks TLS",
    ),
    (
        "ssl_crl_file",
        "makes the server read a file of the setter's choosing; a bad file breaks TLS",
    ),
    (
        "ssl_key_file",
        "makes the server read a file of the setter's choosing; a bad file breaks TLS",
    ),
    (
        "unix_socket_directories",
        "can lock local clients out after a restart",
    ),
    (
        "unix_socket_group",
        "can lock local clients out after a restart",
    ),
    (
        "unix_socket_permissions",
        "can lock local clients out, or open the socket to every local user",
    ),
    // Silently lose or corrupt data, or switch integrity checks off server-wide.
    (
        "allow_system_table_mods",
        "lets DDL change the system catalogs",
    ),
    ("fsync", "off loses or corrupts data on a crash"),
    ("full_page_writes", "off corrupts data on a crash"),
    ("ignore_checksum_failure", "hides data corruption"),
    (
        "session_replication_role",
        "replica disables foreign keys and triggers in every session",
    ),
    (
        "zero_damaged_pages",
        "destroys damaged data instead of reporting it",
    ),
];

/// Why `name` (lower case) is denied by default, if it is.
pub(crate) fn denied_reason(name: &str) -> Option<&'static str> {
    DENIED.iter().find(|(n, _)| *n == name).map(|(_, why)| *why)
}

/// Parameters that belong to a session or transaction: `ALTER SYSTEM` refuses them, and
/// checking them with `set_config` would change who or how the check itself runs.
const SESSION_ONLY: &[&str] = &[
    "role",
    "seed",
    "session_authorization",
    "transaction_deferrable",
    "transaction_isolation",
    "transaction_read_only",
];

/// Checked against `pg_settings` only, not with `set_config`: set in the check's own
/// transaction they would time out or re-encode the check itself.
const NOT_CHECKED_IN_SESSION: &[&str] = &[
    "client_encoding",
    "idle_in_transaction_session_timeout",
    "idle_session_timeout",
    "lock_timeout",
    "statement_timeout",
    "transaction_timeout",
];

/// An `--allow-setting` value that is not a parameter name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--allow-setting {0:?}: not a parameter name (letters, digits, '_' and '.')")]
pub(crate) struct NotAParameterName(pub String);

/// The denied settings the platform team allows (`--allow-setting`), lower case.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowedSettings(BTreeSet<String>);

impl AllowedSettings {
    /// No setting denied by default is allowed.
    pub(crate) fn none() -> &'static AllowedSettings {
        static NONE: AllowedSettings = AllowedSettings(BTreeSet::new());
        &NONE
    }
    /// From `--allow-setting` values; a name that is not a parameter name is refused.
    pub(crate) fn new<I, S>(names: I) -> Result<Self, NotAParameterName>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut set = BTreeSet::new();
        for name in names {
            let name = name.as_ref().trim();
            if !is_parameter_name(name) {
                return Err(NotAParameterName(name.to_string()));
            }
            set.insert(name.to_lowercase());
        }
        Ok(AllowedSettings(set))
    }
    pub(crate) fn allows(&self, lower: &str) -> bool {
        self.0.contains(lower)
    }
    pub(crate) fn names(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(String::as_str)
    }
}

/// Letters, digits, `_`, `$` and `.` (a custom parameter is `prefix.name`), not empty.
pub(crate) fn is_parameter_name(name: &str) -> bool {
    !name.is_empty()
        && name.split('.').all(|part| {
            !part.is_empty()
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
        })
}

// ------------------------------------------------------------------ observe

/// A row of `pg_settings`.
#[derive(Debug, Clone, PartialEq, Default, sqlx::FromRow)]
pub struct SettingMeta {
    /// PostgreSQL's spelling (`TimeZone`).
    pub name: String,
    /// The live value, in the parameter's base unit.
    pub setting: Option<String>,
    pub unit: Option<String>,
    pub vartype: String,
    pub context: String,
    pub min_val: Option<String>,
    pub max_val: Option<String>,
    pub enumvals: Option<Vec<String>>,
    pub pending_restart: bool,
    /// Where the live value comes from (`default`, `configuration file`, `client`, …).
    pub source: Option<String>,
    /// The live value was loaded from postgresql.auto.conf.
    pub from_auto_conf: bool,
    /// The live value as `SHOW` prints it (with its unit).
    pub display: Option<String>,
}

/// PostgreSQL's own verdict on a value, from `set_config` in a rolled-back transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Accepted; the value as `SHOW` would print it.
    Valid(String),
    /// Refused, with PostgreSQL's message.
    Invalid(String),
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Observed {
    /// `pg_settings` rows of the parameters named by the spec or the ledger, by lower-case
    /// name.
    pub meta: BTreeMap<String, SettingMeta>,
    /// postgresql.auto.conf as `pg_file_settings` reads it: lower-case name → value (the
    /// last line of a name wins, as when PostgreSQL loads it).
    pub auto_conf: BTreeMap<String, String>,
    /// Lines of the configuration files PostgreSQL could not apply, by lower-case name.
    pub file_errors: BTreeMap<String, String>,
    /// PostgreSQL's verdict per (lower-case name, value): the spec's values and the file's
    /// values of the parameters a session may set. Absent: PostgreSQL cannot check it
    /// outside `ALTER SYSTEM`.
    pub verdicts: BTreeMap<(String, String), Verdict>,
    /// Parameters (lower case) this role may not `ALTER SYSTEM`.
    pub not_alterable: BTreeSet<String>,
    /// This role may call `pg_reload_conf()`.
    pub can_reload: bool,
    /// postgresql.auto.conf was modified after the configuration was last loaded (None:
    /// this role may not `pg_stat_file`).
    pub written_after_load: Option<bool>,
}

pub(crate) async fn observe(
    conn: &mut PgConnection,
    spec: &ServerSettingsSpec,
    ledger: &Ledger,
) -> Result<Observed, sqlx::Error> {
    let mut names: BTreeSet<String> = spec.parameters.keys().map(|k| k.to_lowercase()).collect();
    names.extend(ledger.items(AREA).map(|(_, item)| item.to_lowercase()));
    let names: Vec<String> = names.into_iter().collect();
    let meta: Vec<SettingMeta> = sqlx::query_as(
        "SELECT name::text, setting, unit, vartype, context, min_val, max_val, enumvals,
                pending_restart, source,
                coalesce(sourcefile LIKE '%/postgresql.auto.conf', false) AS from_auto_conf,
                current_setting(name) AS display
         FROM pg_catalog.pg_settings WHERE lower(name) = ANY($1)",
    )
    .bind(&names)
    .fetch_all(&mut *conn)
    .await?;
    let files: Vec<FileSetting> = sqlx::query_as(
        "SELECT name::text, setting, error, coalesce(sourcefile LIKE '%/postgresql.auto.conf', false)
         FROM pg_catalog.pg_file_settings ORDER BY seqno",
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut observed = Observed {
        meta: meta
            .into_iter()
            .map(|m| (m.name.to_lowercase(), m))
            .collect(),
        ..Default::default()
    };
    for (name, setting, error, is_auto) in files {
        let Some(name) = name else { continue };
        let name = name.to_lowercase();
        if let Some(error) = error {
            observed.file_errors.insert(name.clone(), error);
        }
        if is_auto {
            observed.auto_conf.insert(name, setting.unwrap_or_default());
        }
    }

    // Privileges, so that a role without them gets a plan error instead of a half-run.
    let known: Vec<String> = names
        .iter()
        .filter(|n| observed.meta.contains_key(*n) || n.contains('.'))
        .cloned()
        .collect();
    let (can_reload, can_stat, not_alterable): (bool, bool, Vec<String>) = sqlx::query_as(
        "SELECT has_function_privilege('pg_catalog.pg_reload_conf()', 'EXECUTE'),
                has_function_privilege('pg_catalog.pg_stat_file(text, boolean)', 'EXECUTE'),
                coalesce((SELECT array_agg(n) FROM unnest($1::text[]) AS n
                          WHERE NOT has_parameter_privilege(n, 'ALTER SYSTEM')), '{}')",
    )
    .bind(&known)
    .fetch_one(&mut *conn)
    .await?;
    observed.can_reload = can_reload;
    observed.not_alterable = not_alterable.into_iter().collect();
    if can_stat {
        // Modification times are whole seconds: "after" is certain only when the file's
        // second is past the load time; the per-value comparison covers the rest.
        observed.written_after_load = sqlx::query_scalar(
            "SELECT (pg_stat_file('postgresql.auto.conf', true)).modification > pg_conf_load_time()",
        )
        .fetch_one(&mut *conn)
        .await?;
    }

    // PostgreSQL's own check of every value a session may set, and the canonical form of
    // the file's values (to compare them with the live ones).
    let mut items: BTreeSet<(String, String)> = BTreeSet::new();
    for (key, value) in &spec.parameters {
        let lower = key.to_lowercase();
        if checkable_in_session(&observed, &lower) && is_safe_value(value) {
            items.insert((lower, value.clone()));
        }
    }
    for name in &names {
        if let Some(value) = observed.auto_conf.get(name) {
            if checkable_in_session(&observed, name) && is_safe_value(value) {
                items.insert((name.clone(), value.clone()));
            }
        }
    }
    let items: Vec<(String, String)> = items.into_iter().collect();
    observed.verdicts = check_in_session(conn, &items).await?;
    Ok(observed)
}

/// A line of `pg_file_settings`: name, value, error, whether it is in postgresql.auto.conf.
type FileSetting = (Option<String>, Option<String>, Option<String>, bool);

/// `user` and `superuser` parameters can be set in a session: `set_config` runs
/// PostgreSQL's parser and check hooks on them exactly as `ALTER SYSTEM` would.
fn checkable_in_session(observed: &Observed, lower: &str) -> bool {
    let Some(meta) = observed.meta.get(lower) else {
        return false;
    };
    matches!(meta.context.as_str(), "user" | "superuser")
        && denied_reason(lower).is_none()
        && !SESSION_ONLY.contains(&lower)
        && !NOT_CHECKED_IN_SESSION.contains(&lower)
}

/// What `ALTER SYSTEM` can write into postgresql.auto.conf at all.
fn is_safe_value(value: &str) -> bool {
    !value.contains(['\n', '\r', '\0'])
}

/// Runs `set_config(name, value, true)` for each item in a transaction that is rolled
/// back. Rows arrive in order, so the first error belongs to the item after the last row;
/// the check then goes on with the items after it, in a new transaction.
async fn check_in_session(
    conn: &mut PgConnection,
    items: &[(String, String)],
) -> Result<BTreeMap<(String, String), Verdict>, sqlx::Error> {
    let mut verdicts = BTreeMap::new();
    let mut rest = items;
    while !rest.is_empty() {
        let (names, values): (Vec<&str>, Vec<&str>) =
            rest.iter().map(|(n, v)| (n.as_str(), v.as_str())).unzip();
        let mut tx = conn.begin().await?;
        let mut seen = 0;
        {
            let mut rows = sqlx::query(
                "SELECT set_config(n, v, true)
                 FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS t(n, v, i) ORDER BY i",
            )
            .bind(&names)
            .bind(&values)
            .fetch(&mut *tx);
            while let Some(row) = rows.next().await {
                let item = rest[seen].clone();
                seen += 1;
                match row {
                    Ok(row) => {
                        verdicts.insert(item, Verdict::Valid(row.try_get::<String, _>(0)?));
                    }
                    Err(e @ sqlx::Error::Database(_)) => {
                        // Privileges and "cannot be changed now" say nothing about the
                        // value: ALTER SYSTEM checks those (and `recover` undoes).
                        let code = sqlstate(&e).unwrap_or_default();
                        if code != "42501" && code != "55P02" && !code.starts_with("25") {
                            verdicts.insert(item, Verdict::Invalid(error_summary(&e)));
                        }
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        tx.rollback().await?;
        if seen == 0 {
            break; // no row and no error: nothing more to learn
        }
        rest = &rest[seen..];
    }
    Ok(verdicts)
}

// ------------------------------------------------------------------ plan

#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Set {
        /// pg_settings' spelling (the spec's for a custom parameter).
        name: String,
        value: String,
        restart: bool,
        /// PostgreSQL itself accepted the value before the run.
        checked: bool,
    },
    Reset {
        name: String,
        restart: bool,
    },
}

impl Op {
    fn name(&self) -> &str {
        match self {
            Op::Set { name, .. } | Op::Reset { name, .. } => name,
        }
    }
}

/// The field path of a parameter in the spec.
fn field(key: &str) -> String {
    format!("spec.serverSettings.parameters.{key}")
}

/// What the area must do: the writes, and the parameters whose written value is not live
/// (a reload fixes them).
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct Diff {
    pub ops: Vec<Op>,
    pub not_loaded: Vec<String>,
}

pub(crate) fn diff(
    spec: &ServerSettingsSpec,
    observed: &Observed,
    ledger: &Ledger,
    allowed: &AllowedSettings,
    plan: &mut AreaPlan,
) -> Diff {
    let mut out = Diff::default();
    let mut desired: BTreeMap<String, (&String, &String)> = BTreeMap::new();
    for (key, value) in &spec.parameters {
        let lower = key.to_lowercase();
        if let Some((other, _)) = desired.get(&lower) {
            plan.error(
                key,
                Reason::DuplicateSetting,
                format!(
                    "{} and {}: one parameter spelled twice (names are case-insensitive); keep one",
                    field(other),
                    field(key)
                ),
            );
            continue;
        }
        desired.insert(lower, (key, value));
    }
    let mut sets = Vec::new();
    for (lower, (key, value)) in &desired {
        let meta = observed.meta.get(lower);
        let name = meta.map_or(key.as_str(), |m| m.name.as_str());
        if SESSION_ONLY.contains(&lower.as_str()) {
            plan.error(
                name,
                Reason::SessionOnlySetting,
                format!(
                    "{}: {name} belongs to a session or transaction; ALTER SYSTEM cannot set it",
                    field(key)
                ),
            );
            continue;
        }
        if let Some(why) = denied_reason(lower) {
            if !allowed.allows(lower) {
                plan.error(
                    name,
                    Reason::SettingNotAllowed,
                    format!(
                        "{}: {name} {why}, so it is denied by default; only the platform team can allow it: `dbpolicy plan/apply --allow-setting {lower}`, or the operator's `--allow-setting {lower}` (Helm value allowedServerSettings)",
                        field(key)
                    ),
                );
                continue;
            }
        }
        if !is_safe_value(value) {
            plan.error(
                name,
                Reason::InvalidValue,
                format!("{}: a value cannot contain a line break or NUL", field(key)),
            );
            continue;
        }
        let (restart, checked) = match meta {
            Some(meta) => {
                if meta.context == "internal" {
                    plan.error(
                        name,
                        Reason::ReadOnlySetting,
                        format!(
                            "{}: {name} is fixed when the server is built and cannot be set",
                            field(key)
                        ),
                    );
                    continue;
                }
                if let Err(why) = check_value(meta, value) {
                    plan.error(
                        name,
                        why.reason(),
                        format!("{}: invalid value {value:?} for {name}: {why}", field(key)),
                    );
                    continue;
                }
                let verdict = observed.verdicts.get(&(lower.clone(), (*value).clone()));
                if let Some(Verdict::Invalid(why)) = verdict {
                    plan.error(
                        name,
                        Reason::InvalidValue,
                        format!(
                            "{}: PostgreSQL refuses {value:?} for {name}: {why}",
                            field(key)
                        ),
                    );
                    continue;
                }
                if meta.pending_restart {
                    plan.notice(
                        name,
                        Reason::RestartRequired,
                        format!("{name} = {value} waits for a server restart"),
                    );
                }
                (
                    meta.context == "postmaster",
                    matches!(verdict, Some(Verdict::Valid(_))),
                )
            }
            // Custom (dotted) parameters belong to extensions that may load later;
            // PostgreSQL accepts any value for them as placeholders. Plain unknown names
            // are mistakes.
            None if lower.contains('.') => (false, true),
            None => {
                plan.error(
                    name,
                    Reason::UnknownSetting,
                    format!("{}: {name} is not a PostgreSQL server setting", field(key)),
                );
                continue;
            }
        };
        if observed.not_alterable.contains(lower) {
            plan.error(
                name,
                Reason::InsufficientPrivilege,
                format!("{}: this role may not ALTER SYSTEM SET {name}: connect as a superuser, or GRANT ALTER SYSTEM ON PARAMETER {name} TO the operator's role", field(key)),
            );
            continue;
        }
        if let Some(error) = observed.file_errors.get(lower) {
            plan.notice(
                name,
                Reason::SettingNotApplied,
                format!("{name}: PostgreSQL did not apply the configured value: {error}"),
            );
        }
        match observed.auto_conf.get(lower) {
            Some(cur) if same_setting(cur, value) => {
                if !is_live(observed, lower, Some(cur)) {
                    out.not_loaded.push(name.to_string());
                }
            }
            _ => sets.push(Op::Set {
                name: name.to_string(),
                value: (*value).clone(),
                restart,
                checked,
            }),
        }
    }
    // What only ALTER SYSTEM can check goes first: when it fails, less is to be undone.
    sets.sort_by_key(|op| matches!(op, Op::Set { checked: true, .. }));
    out.ops = sets;

    let owned: BTreeSet<String> = ledger
        .items(AREA)
        .map(|(_, item)| item.to_lowercase())
        .collect();
    for lower in owned {
        if desired.contains_key(&lower) {
            continue;
        }
        let meta = observed.meta.get(&lower);
        let name = meta.map_or(lower.clone(), |m| m.name.clone());
        if observed.auto_conf.contains_key(&lower) {
            out.ops.push(Op::Reset {
                name,
                restart: meta.is_some_and(|m| m.context == "postmaster"),
            });
        } else if !is_live(observed, &lower, None) {
            out.not_loaded.push(name);
        }
    }
    out
}

/// Whether the live value of `lower` is what postgresql.auto.conf says (`file`: its line,
/// None when it has none). Unknown counts as live: a reload must never be planned forever.
fn is_live(observed: &Observed, lower: &str, file: Option<&String>) -> bool {
    let Some(meta) = observed.meta.get(lower) else {
        return true;
    };
    if meta.pending_restart {
        return true; // loaded as far as it can be: RestartRequired says the rest
    }
    // A value set for this database, role or session hides the server's from us.
    let visible = matches!(
        meta.source.as_deref(),
        Some("default" | "configuration file" | "environment variable")
    );
    if !visible {
        return true;
    }
    let Some(file) = file else {
        // The line is gone, but the live value still comes from it: reset, not loaded.
        return !meta.from_auto_conf;
    };
    match observed.verdicts.get(&(lower.to_string(), file.clone())) {
        Some(Verdict::Valid(canonical)) => meta.display.as_deref() == Some(canonical.as_str()),
        Some(Verdict::Invalid(_)) => true, // never loadable: SettingNotApplied says so
        // Show hooks rewrite strings (archive_command reads "(disabled)" while archiving
        // is off), so a string is judged by where its live value comes from: a reload
        // points every parameter with a line in postgresql.auto.conf there, except a
        // `postmaster` one whose value did not change. A new line replacing an earlier
        // one of ours is seen by `written_after_load` only.
        None if meta.vartype == "string" => meta.from_auto_conf || meta.context == "postmaster",
        None => same_live_value(meta, file).unwrap_or(true),
    }
}

/// The file's `value` against the live `pg_settings.setting`, by type; None when they
/// cannot be compared with certainty.
fn same_live_value(meta: &SettingMeta, value: &str) -> Option<bool> {
    let live = meta.setting.as_deref()?;
    match meta.vartype.as_str() {
        "bool" => Some(parse_pg_bool(value)? == parse_pg_bool(live)?),
        "enum" => Some(value.trim().eq_ignore_ascii_case(live.trim())),
        // Modes print in octal (`0600`): not comparable with certainty.
        "integer" if live.len() > 1 && live.starts_with('0') => None,
        "integer" => {
            let want = parse_number_with_unit(value, meta.unit.as_deref(), true).ok()?;
            Some(want.round_ties_even() == live.parse::<f64>().ok()?)
        }
        "real" => {
            let want = parse_number_with_unit(value, meta.unit.as_deref(), false).ok()?;
            let live: f64 = live.parse().ok()?;
            Some((want - live).abs() <= 1e-9 * want.abs().max(live.abs()).max(1e-300))
        }
        // Check and show hooks rewrite strings: see `is_live`.
        _ => None,
    }
}

fn same_setting(current: &str, desired: &str) -> bool {
    current == desired || current.eq_ignore_ascii_case(desired)
}

/// `"a"` or `"ext"."param"`: parameter names are identifiers, possibly dotted.
fn quote_param(name: &str) -> String {
    name.split('.')
        .map(quote_ident)
        .collect::<Vec<_>>()
        .join(".")
}

pub(crate) fn render(op: &Op) -> Change {
    let ledger_item = op.name().to_lowercase();
    match op {
        Op::Set {
            name,
            value,
            restart,
            ..
        } => Change::new(
            AREA,
            name,
            format!("set {name} = {value}"),
            format!(
                "ALTER SYSTEM SET {} = {}",
                quote_param(name),
                quote_literal(value)
            ),
        )
        .hazard(Hazard::Server)
        .autonomous()
        .restart(*restart)
        .record_under(TARGET, ledger_item),
        Op::Reset { name, restart } => Change::new(
            AREA,
            name,
            format!("reset {name}"),
            format!("ALTER SYSTEM RESET {}", quote_param(name)),
        )
        .hazard(Hazard::Server)
        .autonomous()
        .restart(*restart)
        .forget_under(TARGET, ledger_item),
    }
}

fn reload(summary: impl Into<String>) -> Change {
    // A reload loads every line of the configuration files, not only this policy's.
    Change::new(AREA, RELOAD_TARGET, summary, RELOAD_SQL)
        .hazard(Hazard::Server)
        .autonomous()
}

/// The area's plan with the default denylist and no allowance: see [`plan_with`].
#[cfg(test)]
pub(crate) fn plan(spec: &ServerSettingsSpec, observed: &Observed, ledger: &Ledger) -> AreaPlan {
    plan_with(spec, observed, ledger, &AllowedSettings::default())
}

pub(crate) fn plan_with(
    spec: &ServerSettingsSpec,
    observed: &Observed,
    ledger: &Ledger,
    allowed: &AllowedSettings,
) -> AreaPlan {
    let mut plan = AreaPlan::new(AREA);
    let diff = diff(spec, observed, ledger, allowed, &mut plan);
    plan.changes = diff.ops.iter().map(render).collect();
    if !diff.not_loaded.is_empty() {
        plan.notice(
            RELOAD_TARGET,
            Reason::NotLoaded,
            format!(
                "written to postgresql.auto.conf but not loaded: {}",
                diff.not_loaded.join(", ")
            ),
        );
    }
    let stale_file = observed.written_after_load == Some(true);
    if stale_file && diff.ops.is_empty() && diff.not_loaded.is_empty() {
        plan.notice(
            RELOAD_TARGET,
            Reason::NotLoaded,
            "postgresql.auto.conf was written after the configuration was last loaded",
        );
    }
    if !diff.ops.is_empty() {
        plan.changes.push(reload("reload the configuration"));
    } else if !diff.not_loaded.is_empty() || stale_file {
        plan.changes
            .push(reload("reload the configuration: written but not loaded"));
    }
    if !plan.changes.is_empty() && !observed.can_reload {
        plan.error(
            RELOAD_TARGET,
            Reason::InsufficientPrivilege,
            "this role may not call pg_reload_conf(): connect as a superuser, or GRANT EXECUTE ON FUNCTION pg_reload_conf() TO the operator's role",
        );
    }
    plan
}

pub(crate) fn simulate(observed: &Observed, ops: &[Op]) -> Observed {
    let mut next = observed.clone();
    for op in ops {
        match op {
            Op::Set { name, value, .. } => {
                next.auto_conf.insert(name.to_lowercase(), value.clone());
            }
            Op::Reset { name, .. } => {
                next.auto_conf.remove(&name.to_lowercase());
            }
        }
    }
    next
}

// ------------------------------------------------------------------ recovery

/// The statement that puts `name` back as postgresql.auto.conf had it before the run.
pub(crate) fn restore_sql(name: &str, before: Option<&String>) -> String {
    match before {
        Some(value) => format!(
            "ALTER SYSTEM SET {} = {}",
            quote_param(name),
            quote_literal(value)
        ),
        None => format!("ALTER SYSTEM RESET {}", quote_param(name)),
    }
}

/// The parameter writes of this area that a run applied (the reload excluded).
fn written(report: &ApplyReport) -> Vec<&Change> {
    report
        .applied
        .iter()
        .filter(|c| c.area == AREA && c.sql.starts_with("ALTER SYSTEM"))
        .collect()
}

/// Runs after the executor. When the run failed inside this area after writing (a value
/// only `ALTER SYSTEM` could refuse, a lost privilege), it writes back what
/// postgresql.auto.conf held before the run, undoes the ledger entries of those writes,
/// and reloads: the file ends as it began, and what was written is never left unloaded.
/// Were the process killed before this, the next run sees written-but-not-loaded values
/// and reloads them ([`is_live`]).
pub(crate) async fn recover(
    conn: &mut PgConnection,
    observed: &Observed,
    ledger_before: &Ledger,
    report: &mut ApplyReport,
    policy: &str,
) {
    let failed_here = report.failure.as_ref().is_some_and(|f| f.area == AREA);
    let writes: Vec<Change> = written(report).into_iter().cloned().collect();
    if !failed_here || writes.is_empty() {
        return;
    }
    let mut restored = Vec::new();
    let mut problems = Vec::new();
    for change in writes.iter().rev() {
        let lower = change.target.to_lowercase();
        let sql = restore_sql(&change.target, observed.auto_conf.get(&lower));
        if let Err(e) = execute_one(conn, &sql).await {
            problems.push(format!("{sql}: {}", error_summary(&e)));
            continue;
        }
        for op in &change.ledger {
            if let Some(undo) = undo_ledger(op, ledger_before) {
                if let Err(e) = ledger::write(conn, &undo, policy).await {
                    problems.push(format!(
                        "ledger of {}: {}",
                        change.target,
                        error_summary(&e)
                    ));
                }
            }
        }
        restored.push(change.target.clone());
    }
    // Whatever was written is loaded, even when a restore failed.
    if let Err(e) = execute_one(conn, RELOAD_SQL).await {
        problems.push(format!("{RELOAD_SQL}: {}", error_summary(&e)));
    }
    report
        .applied
        .retain(|c| !(c.area == AREA && restored.contains(&c.target)));
    if let Some(failure) = report.failure.as_mut() {
        restored.reverse();
        if !restored.is_empty() {
            failure.message.push_str(&format!(
                "; what this run had written was restored, postgresql.auto.conf is as before the run ({})",
                restored.join(", ")
            ));
        }
        if !problems.is_empty() {
            failure.message.push_str(&format!(
                "; restoring failed too: {} (the next run finds and fixes what is left)",
                problems.join("; ")
            ));
        }
    }
}

/// The ledger operation that undoes `op`, when `op` changed the ledger.
fn undo_ledger(op: &LedgerOp, before: &Ledger) -> Option<LedgerOp> {
    let had = |area: &Area, target: &str, item: &str| {
        before.items(*area).any(|(t, i)| t == target && i == item)
    };
    match op {
        LedgerOp::Record { area, target, item } if !had(area, target, item) => {
            Some(LedgerOp::Forget {
                area: *area,
                target: target.clone(),
                item: item.clone(),
            })
        }
        LedgerOp::Forget { area, target, item } if had(area, target, item) => {
            Some(LedgerOp::Record {
                area: *area,
                target: target.clone(),
                item: item.clone(),
            })
        }
        _ => None,
    }
}

// ------------------------------------------------------------------ value checks

/// Why a value is not one PostgreSQL would take for a parameter (the message follows
/// "invalid value … for <name>: ").
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(crate) enum ValueError {
    #[error("expected on or off")]
    NotBool,
    #[error("expected one of {}", .0.join(", "))]
    NotAllowed(Vec<String>),
    #[error("expected a number")]
    NotANumber,
    #[error("expected an integer")]
    NotAnInteger,
    #[error("this parameter takes no unit, got {0:?}")]
    NoUnitTaken(String),
    #[error("unknown unit {suffix:?}, valid units are {}", .valid.join(", "))]
    UnknownUnit {
        suffix: String,
        valid: Vec<&'static str>,
    },
    #[error("out of range {min}..{max}{unit}")]
    OutOfRange {
        min: f64,
        max: f64,
        /// The parameter's unit with a leading space, or empty.
        unit: String,
    },
}

impl ValueError {
    pub(crate) fn reason(&self) -> Reason {
        Reason::InvalidValue
    }
}

/// Checks a value as PostgreSQL would, from `pg_settings` metadata, so that one bad value
/// refuses the whole area before any `ALTER SYSTEM` (which cannot be rolled back) runs.
pub(crate) fn check_value(meta: &SettingMeta, value: &str) -> Result<(), ValueError> {
    match meta.vartype.as_str() {
        "bool" => parse_pg_bool(value).map(|_| ()).ok_or(ValueError::NotBool),
        "enum" => {
            let allowed = meta.enumvals.clone().unwrap_or_default();
            if allowed.iter().any(|a| a.eq_ignore_ascii_case(value.trim())) {
                Ok(())
            } else {
                Err(ValueError::NotAllowed(allowed))
            }
        }
        "integer" | "real" => {
            let v = parse_number_with_unit(value, meta.unit.as_deref(), meta.vartype == "integer")?;
            let min = meta.min_val.as_deref().and_then(|m| m.parse::<f64>().ok());
            let max = meta.max_val.as_deref().and_then(|m| m.parse::<f64>().ok());
            if let (Some(min), Some(max)) = (min, max) {
                if v < min || v > max {
                    let unit = meta
                        .unit
                        .as_deref()
                        .map(|u| format!(" {u}"))
                        .unwrap_or_default();
                    return Err(ValueError::OutOfRange { min, max, unit });
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

fn parse_pg_bool(v: &str) -> Option<bool> {
    let v = v.trim().to_ascii_lowercase();
    let matches = |word: &str, min: usize| v.len() >= min && word.starts_with(v.as_str());
    if matches("true", 1) || matches("yes", 1) || matches("on", 2) || v == "1" {
        Some(true)
    } else if matches("false", 1) || matches("no", 1) || matches("off", 2) || v == "0" {
        Some(false)
    } else {
        None
    }
}

const MEMORY_UNITS: [(&str, f64); 5] = [
    ("B", 1.0),
    ("kB", 1024.0),
    ("MB", 1048576.0),
    ("GB", 1073741824.0),
    ("TB", 1099511627776.0),
];
const TIME_UNITS: [(&str, f64); 6] = [
    ("us", 0.001),
    ("ms", 1.0),
    ("s", 1000.0),
    ("min", 60000.0),
    ("h", 3600000.0),
    ("d", 86400000.0),
];

/// Size in bytes or time in ms of one `unit` of pg_settings (`8kB`, `ms`, `s`, …).
fn base_unit(unit: &str) -> Option<(f64, bool)> {
    let (mult, name) = match unit.find(|c: char| !c.is_ascii_digit()) {
        Some(0) | None => (1.0, unit),
        Some(i) => (unit[..i].parse::<f64>().ok()?, &unit[i..]),
    };
    if let Some((_, f)) = MEMORY_UNITS.iter().find(|(u, _)| *u == name) {
        return Some((mult * f, true));
    }
    TIME_UNITS
        .iter()
        .find(|(u, _)| *u == name)
        .map(|(_, f)| (mult * f, false))
}

/// The value expressed in the parameter's own unit.
fn parse_number_with_unit(
    value: &str,
    unit: Option<&str>,
    integer: bool,
) -> Result<f64, ValueError> {
    let v = value.trim();
    let split = v
        .find(|c: char| {
            !(c.is_ascii_digit() || c == '.' || c == '-' || c == '+' || c == 'e' || c == 'E')
        })
        .unwrap_or(v.len());
    let (num, suffix) = (v[..split].trim(), v[split..].trim());
    let n: f64 = num.parse().map_err(|_| ValueError::NotANumber)?;
    if integer && suffix.is_empty() && num.contains('.') {
        return Err(ValueError::NotAnInteger);
    }
    if suffix.is_empty() {
        return Ok(n);
    }
    let Some((param_base, param_is_memory)) = unit.and_then(base_unit) else {
        return Err(ValueError::NoUnitTaken(suffix.to_string()));
    };
    let table: &[(&str, f64)] = if param_is_memory {
        &MEMORY_UNITS
    } else {
        &TIME_UNITS
    };
    let Some((_, f)) = table.iter().find(|(u, _)| *u == suffix) else {
        return Err(ValueError::UnknownUnit {
            suffix: suffix.to_string(),
            valid: table.iter().map(|(u, _)| *u).collect(),
        });
    };
    Ok(n * f / param_base)
}

/// Server settings, through `ALTER SYSTEM` and a reload; reset when the section leaves
/// the spec.
pub struct ServerSettings;

impl AreaModule for ServerSettings {
    const AREA: Area = AREA;
    const RESETS_WHEN_REMOVED: bool = true;
    type Spec = ServerSettingsSpec;
    type Observed = Observed;
    type Op = Op;

    fn section(spec: &crate::api::DatabasePolicySpec) -> Option<&ServerSettingsSpec> {
        spec.server_settings.as_ref()
    }

    async fn observe(
        conn: &mut PgConnection,
        section: &ServerSettingsSpec,
        ctx: ObserveContext<'_>,
    ) -> Result<Observed, ObserveError> {
        Ok(observe(conn, section, ctx.ledger).await?)
    }

    fn diff(
        section: &ServerSettingsSpec,
        observed: &Observed,
        ctx: &PlanContext<'_>,
        plan: &mut AreaPlan,
    ) -> Vec<Op> {
        diff(section, observed, ctx.ledger, ctx.allowed_settings, plan).ops
    }

    fn render(_: &ServerSettingsSpec, op: &Op) -> Vec<Change> {
        vec![render(op)]
    }

    fn simulate(_: &ServerSettingsSpec, observed: &Observed, ops: &[Op]) -> Observed {
        simulate(observed, ops)
    }

    /// The writes, then one reload (and what is written but not loaded, as notices).
    fn plan(
        section: &ServerSettingsSpec,
        observed: &Observed,
        ctx: &mut PlanContext<'_>,
    ) -> AreaPlan {
        plan_with(section, observed, ctx.ledger, ctx.allowed_settings)
    }

    /// A failed settings run leaves postgresql.auto.conf as it began, reloaded.
    async fn after_apply(conn: &mut PgConnection, observed: &Observed, ctx: AfterApply<'_>) {
        recover(conn, observed, ctx.ledger, ctx.report, ctx.policy).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn meta(
        name: &str,
        vartype: &str,
        unit: Option<&str>,
        min: &str,
        max: &str,
        context: &str,
    ) -> SettingMeta {
        SettingMeta {
            name: name.into(),
            setting: Some("0".into()),
            unit: unit.map(String::from),
            vartype: vartype.into(),
            context: context.into(),
            min_val: Some(min.into()),
            max_val: Some(max.into()),
            enumvals: None,
            pending_restart: false,
            source: Some("default".into()),
            from_auto_conf: false,
            display: None,
        }
    }

    fn observed() -> Observed {
        let mut o = Observed {
            can_reload: true,
            ..Default::default()
        };
        for m in [
            meta(
                "log_min_duration_statement",
                "integer",
                Some("ms"),
                "-1",
                "2147483647",
                "superuser",
            ),
            meta(
                "max_connections",
                "integer",
                None,
                "1",
                "262143",
                "postmaster",
            ),
            meta(
                "shared_buffers",
                "integer",
                Some("8kB"),
                "16",
                "1073741823",
                "postmaster",
            ),
            meta(
                "work_mem",
                "integer",
                Some("kB"),
                "64",
                "2147483647",
                "user",
            ),
            meta(
                "random_page_cost",
                "real",
                None,
                "0",
                "1.79769e+308",
                "user",
            ),
            meta("log_checkpoints", "bool", None, "", "", "sighup"),
            meta("block_size", "integer", None, "8192", "8192", "internal"),
            meta("TimeZone", "string", None, "", "", "user"),
            meta("log_timezone", "string", None, "", "", "sighup"),
            meta("archive_command", "string", None, "", "", "sighup"),
            meta(
                "shared_preload_libraries",
                "string",
                None,
                "",
                "",
                "postmaster",
            ),
            SettingMeta {
                enumvals: Some(vec![
                    "none".into(),
                    "ddl".into(),
                    "mod".into(),
                    "all".into(),
                ]),
                ..meta("log_statement", "enum", None, "", "", "superuser")
            },
        ] {
            o.meta.insert(m.name.to_lowercase(), m);
        }
        o
    }

    fn spec(pairs: &[(&str, &str)]) -> ServerSettingsSpec {
        ServerSettingsSpec {
            parameters: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn reasons(p: &AreaPlan) -> Vec<(&str, Reason)> {
        p.errors
            .iter()
            .map(|e| (e.target.as_str(), e.reason))
            .collect()
    }

    #[test]
    fn sets_and_reloads() {
        let p = plan(
            &spec(&[("log_min_duration_statement", "500ms")]),
            &observed(),
            &Ledger::default(),
        );
        assert_eq!(p.changes.len(), 2);
        assert_eq!(
            p.changes[0].sql,
            r#"ALTER SYSTEM SET "log_min_duration_statement" = '500ms'"#
        );
        assert!(!p.changes[0].transactional);
        assert_eq!(p.changes[0].hazard, Hazard::Server);
        assert_eq!(p.changes[1].sql, "SELECT pg_reload_conf()");
        assert_eq!(p.changes[1].hazard, Hazard::Server);
        assert_eq!(p.changes[0].ledger.len(), 1);
        // Server-wide, but no relation lock: the hazard says what it risks.
        assert!(p
            .changes
            .iter()
            .all(|c| c.lock == crate::engine::plan::LockLevel::None && c.timeout.is_none()));
    }

    #[test]
    fn matching_auto_conf_is_no_change() {
        let mut o = observed();
        o.auto_conf.insert("log_statement".into(), "ddl".into());
        o.meta.get_mut("log_statement").unwrap().setting = Some("ddl".into());
        assert!(
            plan(&spec(&[("log_statement", "DDL")]), &o, &Ledger::default())
                .changes
                .is_empty()
        );
    }

    #[test]
    fn restart_settings_are_flagged_and_reported() {
        let mut o = observed();
        let p = plan(&spec(&[("max_connections", "200")]), &o, &Ledger::default());
        assert!(p.changes[0].requires_restart);
        o.auto_conf.insert("max_connections".into(), "200".into());
        o.meta.get_mut("max_connections").unwrap().pending_restart = true;
        let p = plan(&spec(&[("max_connections", "200")]), &o, &Ledger::default());
        assert!(p.changes.is_empty(), "waiting for a restart is not drift");
        assert_eq!(p.notices[0].reason, Reason::RestartRequired);
    }

    #[test]
    fn owned_settings_removed_from_spec_are_reset() {
        let mut o = observed();
        o.auto_conf.insert("work_mem".into(), "64MB".into());
        o.auto_conf.insert("log_statement".into(), "all".into());
        let mut ledger = Ledger::for_policy("p");
        ledger.insert(AREA, TARGET, "work_mem", "p");
        let p = plan(&spec(&[]), &o, &ledger);
        assert_eq!(p.changes[0].sql, r#"ALTER SYSTEM RESET "work_mem""#);
        assert_eq!(
            p.changes.len(),
            2,
            "reset + reload; log_statement is not ours"
        );
    }

    #[test]
    fn unknown_and_invalid_settings_are_errors_naming_the_field() {
        let mut o = observed();
        o.verdicts.insert(
            ("timezone".into(), "Mars/Olympus".into()),
            Verdict::Invalid("invalid value for parameter \"TimeZone\"".into()),
        );
        let p = plan(
            &spec(&[
                ("no_such_setting", "1"),
                ("work_mem", "lots"),
                ("log_checkpoints", "maybe"),
                ("block_size", "8192"),
                ("my.custom", "x"),
                ("timezone", "Mars/Olympus"),
                ("role", "postgres"),
                ("log_statement", "all\nlisten_addresses = '*'"),
            ]),
            &o,
            &Ledger::default(),
        );
        assert_eq!(
            reasons(&p),
            vec![
                ("block_size", Reason::ReadOnlySetting),
                ("log_checkpoints", Reason::InvalidValue),
                ("log_statement", Reason::InvalidValue),
                ("no_such_setting", Reason::UnknownSetting),
                ("role", Reason::SessionOnlySetting),
                ("TimeZone", Reason::InvalidValue),
                ("work_mem", Reason::InvalidValue)
            ]
        );
        assert!(p.errors[0]
            .message
            .starts_with("spec.serverSettings.parameters.block_size:"));
        // the custom parameter is still planned; the engine refuses the plan as a whole
        assert_eq!(p.changes[0].target, "my.custom");
        assert_eq!(p.changes[0].sql, r#"ALTER SYSTEM SET "my"."custom" = 'x'"#);
    }

    #[test]
    fn names_are_case_insensitive_and_shown_as_postgresql_spells_them() {
        let mut o = observed();
        let p = plan(
            &spec(&[("TIMEZONE", "Europe/Paris"), ("Work_Mem", "8MB")]),
            &o,
            &Ledger::default(),
        );
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        let sql: Vec<&str> = p.changes.iter().map(|c| c.sql.as_str()).collect();
        assert_eq!(
            sql,
            [
                r#"ALTER SYSTEM SET "TimeZone" = 'Europe/Paris'"#,
                r#"ALTER SYSTEM SET "work_mem" = '8MB'"#,
                "SELECT pg_reload_conf()"
            ]
        );
        assert_eq!(
            p.changes[0].ledger,
            [LedgerOp::Record {
                area: AREA,
                target: TARGET.into(),
                item: "timezone".into()
            }]
        );
        // Written as TimeZone by hand, asked for as timezone: the same parameter. (The
        // session's own TimeZone, set by the client, hides the server's.)
        o.auto_conf.insert("timezone".into(), "Europe/Paris".into());
        o.meta.get_mut("timezone").unwrap().source = Some("client".into());
        let p = plan(
            &spec(&[("timezone", "Europe/Paris")]),
            &o,
            &Ledger::default(),
        );
        assert!(p.changes.is_empty(), "{:?}", p.changes);

        let p = plan(
            &spec(&[("WORK_MEM", "8MB"), ("work_mem", "16MB")]),
            &o,
            &Ledger::default(),
        );
        assert_eq!(reasons(&p), vec![("work_mem", Reason::DuplicateSetting)]);
    }

    #[test]
    fn dangerous_settings_are_denied_unless_the_platform_allows_them() {
        let o = observed();
        let s = spec(&[
            ("Archive_Command", "/bin/true"),
            ("shared_preload_libraries", "pg_stat_statements"),
            ("work_mem", "8MB"),
        ]);
        let p = plan(&s, &o, &Ledger::default());
        assert_eq!(
            reasons(&p),
            vec![
                ("archive_command", Reason::SettingNotAllowed),
                ("shared_preload_libraries", Reason::SettingNotAllowed)
            ]
        );
        let msg = &p.errors[0].message;
        assert!(
            msg.starts_with("spec.serverSettings.parameters.Archive_Command: archive_command runs shell commands"),
            "{msg}"
        );
        assert!(msg.contains("--allow-setting archive_command"), "{msg}");

        let allowed =
            AllowedSettings::new(["ARCHIVE_COMMAND", "shared_preload_libraries"]).unwrap();
        let p = plan_with(&s, &o, &Ledger::default(), &allowed);
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        assert_eq!(p.changes.len(), 4);
        assert!(p.changes.iter().all(|c| c.hazard == Hazard::Server));
        assert!(AllowedSettings::new(["a; b"]).is_err());
        for (name, _) in DENIED {
            assert_eq!(name.to_lowercase(), *name, "the denylist is lower case");
        }
    }

    #[test]
    fn values_only_alter_system_can_check_go_first() {
        let mut o = observed();
        o.verdicts.insert(
            ("work_mem".into(), "8MB".into()),
            Verdict::Valid("8MB".into()),
        );
        let p = plan(
            &spec(&[("work_mem", "8MB"), ("log_timezone", "UTC")]),
            &o,
            &Ledger::default(),
        );
        let targets: Vec<&str> = p.changes.iter().map(|c| c.target.as_str()).collect();
        assert_eq!(targets, ["log_timezone", "work_mem", "server"]);
    }

    #[test]
    fn written_but_not_loaded_is_reloaded() {
        let mut o = observed();
        o.auto_conf.insert("work_mem".into(), "16MB".into());
        o.auto_conf
            .insert("log_min_duration_statement".into(), "500ms".into());
        o.auto_conf.insert("log_checkpoints".into(), "on".into());
        {
            let m = o.meta.get_mut("work_mem").unwrap();
            m.setting = Some("4096".into());
            m.display = Some("4MB".into());
        }
        o.meta
            .get_mut("log_min_duration_statement")
            .unwrap()
            .setting = Some("500".into());
        o.meta.get_mut("log_checkpoints").unwrap().setting = Some("on".into());
        o.verdicts.insert(
            ("work_mem".into(), "16MB".into()),
            Verdict::Valid("16MB".into()),
        );
        let s = spec(&[
            ("work_mem", "16MB"),
            ("log_min_duration_statement", "500ms"),
            ("log_checkpoints", "on"),
        ]);
        let p = plan(&s, &o, &Ledger::default());
        assert_eq!(p.changes.len(), 1);
        assert_eq!(p.changes[0].sql, "SELECT pg_reload_conf()");
        assert_eq!(p.notices[0].reason, Reason::NotLoaded);
        assert!(
            p.notices[0].message.ends_with("work_mem"),
            "{:?}",
            p.notices
        );

        // Loaded: nothing to do.
        o.meta.get_mut("work_mem").unwrap().display = Some("16MB".into());
        assert!(plan(&s, &o, &Ledger::default()).changes.is_empty());

        // Hidden by a per-database or session value: not judged.
        {
            let m = o.meta.get_mut("work_mem").unwrap();
            m.display = Some("1MB".into());
            m.source = Some("database".into());
        }
        assert!(plan(&s, &o, &Ledger::default()).changes.is_empty());

        // Differs from a number with a unit, in the parameter's unit.
        o.meta
            .get_mut("log_min_duration_statement")
            .unwrap()
            .setting = Some("2000".into());
        assert_eq!(plan(&s, &o, &Ledger::default()).changes.len(), 1);
        o.meta
            .get_mut("log_min_duration_statement")
            .unwrap()
            .setting = Some("500".into());

        // An owned line removed by hand without reload: the live value still comes from it.
        let mut ledger = Ledger::for_policy("p");
        ledger.insert(AREA, TARGET, "log_statement", "p");
        {
            let m = o.meta.get_mut("log_statement").unwrap();
            m.source = Some("configuration file".into());
            m.from_auto_conf = true;
        }
        let p = plan(&s, &o, &ledger);
        assert_eq!(p.changes.len(), 1, "{:?}", p.changes);
        assert_eq!(p.changes[0].sql, "SELECT pg_reload_conf()");

        // A string (show hooks rewrite them) is judged by where the live value comes from.
        let s2 = spec(&[("log_timezone", "UTC")]);
        o.auto_conf.insert("log_timezone".into(), "UTC".into());
        o.meta.get_mut("log_timezone").unwrap().setting = Some("Etc/UTC".into());
        assert_eq!(
            plan(&s2, &o, &Ledger::default()).changes.len(),
            1,
            "not loaded"
        );
        o.meta.get_mut("log_timezone").unwrap().from_auto_conf = true;
        assert!(
            plan(&s2, &o, &Ledger::default()).changes.is_empty(),
            "loaded"
        );

        // The file changed after the last load: reloaded, even where values hide it.
        o.meta.get_mut("log_statement").unwrap().from_auto_conf = false;
        assert!(plan(&s, &o, &ledger).changes.is_empty());
        o.written_after_load = Some(true);
        assert_eq!(plan(&s, &o, &ledger).changes.len(), 1);
    }

    #[test]
    fn missing_privileges_are_plan_errors() {
        let mut o = observed();
        o.not_alterable.insert("work_mem".into());
        o.can_reload = false;
        let p = plan(
            &spec(&[("work_mem", "8MB"), ("log_statement", "all")]),
            &o,
            &Ledger::default(),
        );
        assert_eq!(
            reasons(&p),
            vec![
                ("work_mem", Reason::InsufficientPrivilege),
                ("server", Reason::InsufficientPrivilege)
            ]
        );
    }

    #[test]
    fn restores_put_back_what_was_there() {
        assert_eq!(
            restore_sql("work_mem", Some(&"8MB".to_string())),
            r#"ALTER SYSTEM SET "work_mem" = '8MB'"#
        );
        assert_eq!(
            restore_sql("TimeZone", None),
            r#"ALTER SYSTEM RESET "TimeZone""#
        );
        let mut before = Ledger::for_policy("p");
        before.insert(AREA, TARGET, "work_mem", "p");
        let rec = |item: &str| LedgerOp::Record {
            area: AREA,
            target: TARGET.into(),
            item: item.into(),
        };
        let forget = |item: &str| LedgerOp::Forget {
            area: AREA,
            target: TARGET.into(),
            item: item.into(),
        };
        assert_eq!(undo_ledger(&rec("work_mem"), &before), None);
        assert_eq!(
            undo_ledger(&rec("timezone"), &before),
            Some(forget("timezone"))
        );
        assert_eq!(
            undo_ledger(&forget("work_mem"), &before),
            Some(rec("work_mem"))
        );
    }

    #[test]
    fn value_checks_follow_units_and_ranges() {
        let o = observed();
        let ok = |n: &str, v: &str| check_value(&o.meta[n], v);
        assert!(ok("shared_buffers", "128MB").is_ok());
        assert!(ok("shared_buffers", "16").is_ok());
        assert!(ok("shared_buffers", "64kB").is_err(), "below 16 pages");
        assert!(ok("work_mem", "4GB").is_ok());
        assert!(ok("work_mem", "4 GB").is_ok());
        assert!(ok("work_mem", "4Gb").is_err());
        assert!(ok("log_min_duration_statement", "1s").is_ok());
        assert!(ok("log_min_duration_statement", "-1").is_ok());
        assert!(ok("log_min_duration_statement", "-2").is_err());
        assert!(ok("log_min_duration_statement", "5MB").is_err());
        assert!(ok("max_connections", "100ms").is_err());
        assert!(ok("max_connections", "1.5").is_err());
        assert!(ok("random_page_cost", "1.1").is_ok());
        assert!(ok("log_checkpoints", "on").is_ok());
        assert!(
            ok("log_checkpoints", "of").is_ok(),
            "PostgreSQL takes unique prefixes"
        );
        assert!(ok("log_checkpoints", "o").is_err());
        assert!(ok("log_statement", "mod").is_ok());
        assert!(ok("log_statement", "some").is_err());
    }

    #[test]
    fn live_values_compare_by_type() {
        let o = observed();
        let same = |n: &str, setting: &str, v: &str| {
            let m = SettingMeta {
                setting: Some(setting.into()),
                ..o.meta[n].clone()
            };
            same_live_value(&m, v)
        };
        assert_eq!(same("work_mem", "16384", "16MB"), Some(true));
        assert_eq!(same("work_mem", "4096", "16MB"), Some(false));
        assert_eq!(same("shared_buffers", "16384", "128MB"), Some(true));
        assert_eq!(
            same("log_min_duration_statement", "1500", "1.5s"),
            Some(true)
        );
        assert_eq!(same("log_checkpoints", "on", "true"), Some(true));
        assert_eq!(same("random_page_cost", "1.1", "1.10"), Some(true));
        assert_eq!(same("log_statement", "all", "ALL"), Some(true));
        assert_eq!(same("work_mem", "16384", "lots"), None);
        assert_eq!(same("archive_command", "(disabled)", "/bin/true"), None);
    }

    #[test]
    fn values_are_quoted() {
        let p = plan(
            &spec(&[("my.x", "a'; DROP TABLE t; --")]),
            &observed(),
            &Ledger::default(),
        );
        assert_eq!(
            p.changes[0].sql,
            r#"ALTER SYSTEM SET "my"."x" = 'a''; DROP TABLE t; --'"#
        );
    }

    proptest! {
        #[test]
        fn applying_a_plan_converges(
            desired in prop::collection::btree_map(prop::sample::select(vec!["work_mem", "WORK_MEM", "log_statement", "log_checkpoints"]), prop::sample::select(vec!["on", "all", "64MB"]), 0..3),
            current in prop::collection::btree_map(prop::sample::select(vec!["work_mem", "log_statement", "log_checkpoints", "max_connections"]), prop::sample::select(vec!["on", "all", "64MB", "1"]), 0..4),
            owned in prop::collection::vec(prop::sample::select(vec!["work_mem", "log_statement", "max_connections"]), 0..3),
        ) {
            let spec = ServerSettingsSpec { parameters: desired.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect() };
            let mut o = observed();
            o.auto_conf = current.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            let mut ledger = Ledger::for_policy("p");
            for n in owned { ledger.insert(AREA, TARGET, n, "p"); }
            // invalid values never become ops, so they never need converging
            crate::engine::areas::convergence::converges::<ServerSettings>(&spec, &o, &ledger, |_, _| Ok(()))?;
        }
    }
}
