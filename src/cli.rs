//! The command line: `plan`, `apply`, `release`, `crd` here; `refresh`, `backup`,
//! `restore`, `run` (the operator) and `kubectl` dispatched to their modules. Exit status of
//! `plan`: 0 nothing to change, 2 changes pending, 1 error. `apply`: 0 done, 2 done but
//! destructive changes refused, 1 on any failure. `release`: 0 done, 1 on any failure.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use sqlx::Connection;

use crate::api::{DatabasePolicy, Mode};
use crate::engine::{self, Hazard, Outcome, PolicyId};

#[derive(Parser, Debug)]
#[command(
    name = "dbpolicy",
    version,
    about = "Reconcile a DatabasePolicy against a live PostgreSQL database"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Print what would change (exit 0: nothing, 2: changes pending, 1: error).
    Plan(TargetArgs),
    /// Change the database to match the policy and print what was done.
    Apply(TargetArgs),
    /// Release a policy that is gone: delete its claims in dbpolicy.managed so another
    /// policy can take over (what the operator's finalizer does on deletion).
    Release(ReleaseArgs),
    /// Print the CustomResourceDefinition.
    Crd,
    /// Refresh materialized views (what the refresh CronJob runs).
    Refresh(crate::jobs::refresh::RefreshArgs),
    /// Backups: run, list, verify, prune (what the backup CronJob runs).
    Backup(crate::backup::BackupArgs),
    /// Point-in-time recovery: assemble a data directory that PostgreSQL recovers to a
    /// time, an LSN or the latest archived WAL (see docs/pitr.md).
    Restore(crate::backup::pitr::RestoreArgs),
    /// Run the operator: reconcile DatabasePolicies in the cluster until SIGTERM.
    Run(crate::controller::RunArgs),
    /// The kubectl plugin (`kubectl dbpolicy …` when installed as `kubectl-dbpolicy`):
    /// status, pending plan as SQL, reconcile now.
    Kubectl(crate::kubectl::PluginArgs),
}

/// The plugin's executable name: kubectl runs `kubectl-dbpolicy` for `kubectl dbpolicy`.
pub(crate) const PLUGIN_NAME: &str = "kubectl-dbpolicy";

/// The command line as [`Cli`] parses it: invoked as `kubectl-dbpolicy` (a symlink or a
/// copy of this binary), the arguments are those of the `kubectl` subcommand.
pub fn args_for(args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let as_plugin = args
        .first()
        .and_then(|a| std::path::Path::new(a).file_stem())
        .is_some_and(|stem| stem == PLUGIN_NAME);
    if !as_plugin {
        return args;
    }
    let mut out = vec!["dbpolicy".into(), "kubectl".into()];
    out.extend(args.into_iter().skip(1));
    out
}

#[derive(clap::Args, Debug)]
pub struct TargetArgs {
    /// DatabasePolicy YAML (several documents allowed; `-` reads stdin).
    #[arg(short = 'f', long = "filename")]
    pub file: PathBuf,
    /// libpq URI of the database; spec.database.connectionSecretRef is ignored when given.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    #[arg(short, long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// A replica's libpq URI for its health check, `NAME=URL` (repeatable); else
    /// `DBPOLICY_REPLICA_<NAME>_URL`. spec.replicas[].connectionSecretRef is read by the
    /// operator only.
    #[arg(long = "replica-url", value_name = "NAME=URL")]
    pub replica_urls: Vec<String>,
    /// Bound on each replica health check (connect and query; replicas are checked
    /// concurrently).
    #[arg(long, default_value = "5s", value_parser = crate::duration::parse_duration)]
    pub replica_timeout: std::time::Duration,
    /// Allow a server setting that is denied by default (it runs commands, loads code or
    /// can lock clients out: see docs/server-settings.md); repeatable, or comma-separated.
    /// The platform team's decision: a policy cannot allow one itself.
    #[arg(long = "allow-setting", value_name = "NAME", value_delimiter = ',')]
    pub allow_settings: Vec<String>,
}

#[derive(clap::Args, Debug)]
pub struct ReleaseArgs {
    /// DatabasePolicy YAML (several documents allowed; `-` reads stdin): each policy's
    /// claims are released, under the id `namespace/name` (`default/` without a namespace).
    #[arg(short = 'f', long = "filename", required_unless_present = "policy_id")]
    pub file: Option<PathBuf>,
    /// The owner recorded in dbpolicy.managed (`namespace/name` for the operator's
    /// policies); overrides the id taken from the file.
    #[arg(long)]
    pub policy_id: Option<String>,
    /// libpq URI of the database.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Reset what the policy set and drop the replication slots it created before
    /// releasing (as `spec.deletionPolicy: Reset` does; also taken from the file).
    #[arg(long)]
    pub reset: bool,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Text,
    Json,
}

pub(crate) const EXIT_OK: u8 = 0;
pub(crate) const EXIT_ERROR: u8 = 1;
pub(crate) const EXIT_PENDING: u8 = 2;

/// Why a policy file gives no policies to run. Each message names the file or the
/// document (counted from 1) and, for a bad field, its path.
#[derive(Debug, thiserror::Error)]
pub enum PolicyFileError {
    #[error("reading {what}: {source}")]
    Read {
        /// `stdin` or the file's path.
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "line {line}: more than {} nested [ or {{: not a DatabasePolicy",
        crate::policy_yaml::MAX_FLOW_DEPTH
    )]
    TooDeep { line: usize },
    #[error("document {document}: {source}")]
    Yaml {
        document: usize,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("document {document}: apiVersion {found:?} is not {expected}")]
    ApiVersion {
        document: usize,
        found: String,
        expected: String,
    },
    #[error("document {document}: {path}: {}", crate::policy_yaml::without_yaml_path(source.to_string(), path))]
    Field {
        document: usize,
        /// Where in the document, as serde_path_to_error spells it
        /// (`spec.autovacuum.tables[0].vacuumScaleFactor`).
        path: String,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("no DatabasePolicy document found")]
    NoPolicy,
}

pub use crate::policy_yaml::parse_policies;

/// The file at `path`, or standard input for `-`.
pub(crate) fn read_file(path: &Path) -> Result<String, PolicyFileError> {
    let read_failed = |what: String| move |source| PolicyFileError::Read { what, source };
    if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(read_failed("stdin".into()))?;
        return Ok(s);
    }
    std::fs::read_to_string(path).map_err(read_failed(path.display().to_string()))
}

fn policy_id(p: &DatabasePolicy) -> PolicyId {
    let ns = p.metadata.namespace.as_deref().unwrap_or("default");
    let name = p.metadata.name.as_deref().unwrap_or("unnamed");
    PolicyId(format!("{ns}/{name}"))
}

pub async fn run(cli: Cli) -> ExitCode {
    let code = match cli.command {
        Command::Crd => {
            print!("{}", crate::crd::crd_yaml());
            EXIT_OK
        }
        Command::Plan(args) => run_target(args, Mode::Plan).await,
        Command::Refresh(args) => crate::jobs::refresh::run(args).await,
        Command::Backup(args) => crate::backup::run(args).await,
        Command::Apply(args) => run_target(args, Mode::Apply).await,
        Command::Release(args) => run_release(args).await,
        Command::Restore(args) => crate::backup::pitr::cmd_restore(args).await,
        Command::Kubectl(args) => crate::kubectl::run(args).await,
        Command::Run(args) => match crate::controller::run(args).await {
            Ok(()) => EXIT_OK,
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), "operator stopped");
                EXIT_ERROR
            }
        },
    };
    ExitCode::from(code)
}

async fn run_target(args: TargetArgs, mode: Mode) -> u8 {
    let fail = |msg: String| {
        eprintln!("error: {msg}");
        EXIT_ERROR
    };
    // The first connection is opened (TCP, startup, authentication: round trips and a new
    // server process) while the policy file is read and parsed, on the runtime's other
    // thread: at thousands of tables parsing takes a while. Nothing is sent on it until
    // the file parsed; a file that does not parse drops it unused.
    let mut early = args
        .database_url
        .clone()
        .map(|url| tokio::spawn(async move { crate::pg::connect_one(&url).await }));
    let text = match read_file(&args.file) {
        Ok(t) => t,
        Err(e) => return fail(e.to_string()),
    };
    let (policies, skipped) = match parse_policies(&text) {
        Ok(p) => p,
        Err(e) => return fail(e.to_string()),
    };
    drop(text);
    for s in skipped {
        eprintln!("note: {s}");
    }
    let Some(url) = args.database_url.as_deref() else {
        return fail("no database: pass --database-url or set DATABASE_URL (spec.database.connectionSecretRef is read by the operator only)".into());
    };
    let mut flagged = std::collections::BTreeMap::new();
    for arg in &args.replica_urls {
        match engine::replica_health::parse_name_url(arg) {
            Ok((name, url)) => {
                flagged.insert(name, url);
            }
            Err(e) => return fail(format!("--replica-url: {e}")),
        }
    }
    let allowed = match engine::AllowedSettings::new(&args.allow_settings) {
        Ok(a) => a,
        Err(e) => return fail(e.to_string()),
    };
    let mut worst = EXIT_OK;
    let mut json = Vec::new();
    for policy in &policies {
        let id = policy_id(policy);
        let mut options = run_options(policy, &id, &flagged, args.replica_timeout);
        options.allowed_settings = allowed.clone();
        let conn = match early.take() {
            Some(task) => task.await.unwrap_or_else(|e| {
                Err(crate::pg::ConnectError::Failed {
                    target: "the database".into(),
                    reason: format!("the connecting task failed: {e}"),
                    sqlstate: None,
                })
            }),
            None => crate::pg::connect_one(url).await,
        };
        let code = match run_one(conn, url, policy, &id, mode, &options).await {
            Ok(outcome) => {
                let code = exit_code(&outcome, mode);
                match args.output {
                    Output::Text => print_text(&id, &outcome, mode),
                    Output::Json => json.push(
                        serde_json::json!({ "policy": id.0, "outcome": outcome, "exitCode": code }),
                    ),
                }
                code
            }
            Err(e) => {
                if args.output == Output::Json {
                    json.push(
                        serde_json::json!({ "policy": id.0, "error": e.to_string(), "exitCode": EXIT_ERROR }),
                    );
                }
                eprintln!("error: {}: {e}", id.0);
                EXIT_ERROR
            }
        };
        worst = worse(worst, code);
    }
    if args.output == Output::Json {
        let doc = if json.len() == 1 {
            json.pop().unwrap()
        } else {
            serde_json::Value::Array(json)
        };
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    }
    worst
}

/// `dbpolicy release`: for each policy of the file (or the one `--policy-id`), reset when
/// asked, release its claims, and name the replication slots it leaves behind.
async fn run_release(args: ReleaseArgs) -> u8 {
    let fail = |msg: String| {
        eprintln!("error: {msg}");
        EXIT_ERROR
    };
    let targets: Vec<(PolicyId, crate::api::DatabasePolicySpec)> = match &args.file {
        Some(path) => {
            let text = match read_file(path) {
                Ok(t) => t,
                Err(e) => return fail(e.to_string()),
            };
            let (policies, skipped) = match parse_policies(&text) {
                Ok(p) => p,
                Err(e) => return fail(e.to_string()),
            };
            for s in skipped {
                eprintln!("note: {s}");
            }
            if args.policy_id.is_some() && policies.len() > 1 {
                return fail("--policy-id names one policy, and the file holds several".into());
            }
            policies
                .into_iter()
                .map(|p| {
                    let id = args
                        .policy_id
                        .clone()
                        .map(PolicyId)
                        .unwrap_or_else(|| policy_id(&p));
                    (id, p.spec)
                })
                .collect()
        }
        None => vec![(
            PolicyId(args.policy_id.clone().unwrap_or_default()),
            Default::default(),
        )],
    };
    if targets.iter().any(|(id, _)| id.0.trim().is_empty()) {
        return fail(
            "--policy-id is empty: give the owner recorded in dbpolicy.managed (namespace/name)"
                .into(),
        );
    }
    let Some(url) = args.database_url.as_deref() else {
        return fail("no database: pass --database-url or set DATABASE_URL".into());
    };
    let mut worst = EXIT_OK;
    for (id, spec) in &targets {
        let reset =
            args.reset || spec.effective_deletion_policy() == crate::api::DeletionPolicy::Reset;
        let result = async {
            let mut conn = crate::pg::connect_one(url)
                .await
                .map_err(|e| e.to_string())?;
            let claims = engine::server_claims::ClaimsTarget::for_policy_url(url);
            let r = engine::release::release(&mut conn, spec, id, reset, &claims).await;
            let _ = conn.close().await;
            r.map_err(|e| e.to_string())
        }
        .await;
        match result {
            Ok(released) => {
                println!("# policy {}", id.0);
                if let Some(outcome) = &released.reset {
                    print_text(id, outcome, Mode::Apply);
                    if exit_code(outcome, Mode::Apply) == EXIT_ERROR {
                        worst = EXIT_ERROR;
                    }
                }
                for (area, target, item) in &released.claims {
                    println!("released {area} {target} {item}");
                }
                for (kind, name) in &released.server_claims {
                    println!("released server-wide {} {name}", kind.as_str());
                }
                println!("# released {} claim(s) of {}", released.claims.len(), id.0);
                for slot in &released.remaining_slots {
                    eprintln!(
                        "warning: {}: replication slot {slot} created by this policy remains and retains WAL; when no replica uses it: {}",
                        id.0,
                        engine::release::drop_slot_sql(slot)
                    );
                }
            }
            Err(e) => {
                eprintln!("error: {}: {e}", id.0);
                worst = EXIT_ERROR;
            }
        }
    }
    worst
}

/// Error beats pending beats ok.
fn worse(a: u8, b: u8) -> u8 {
    let rank = |c: u8| match c {
        EXIT_OK => 0,
        EXIT_PENDING => 1,
        _ => 2,
    };
    if rank(b) > rank(a) {
        b
    } else {
        a
    }
}

/// The replicas' URLs for one policy: `--replica-url` first, then the environment.
fn run_options(
    policy: &DatabasePolicy,
    id: &PolicyId,
    flagged: &std::collections::BTreeMap<String, String>,
    timeout: std::time::Duration,
) -> engine::RunOptions {
    let mut targets = engine::replica_health::ReplicaTargets {
        timeout,
        ..Default::default()
    };
    let replicas = policy.spec.replicas.iter().flat_map(|r| r.replicas.iter());
    for r in replicas {
        let var = engine::replica_health::env_var_name(&r.name);
        match flagged
            .get(&r.name)
            .cloned()
            .or_else(|| std::env::var(&var).ok())
        {
            Some(url) => {
                targets.urls.insert(r.name.clone(), url);
            }
            None => eprintln!(
                "note: {}: replica {} is not checked: pass --replica-url {}=URL or set {var}",
                id.0, r.name, r.name
            ),
        }
    }
    for name in flagged.keys() {
        if !targets.urls.contains_key(name) {
            eprintln!(
                "note: {}: --replica-url {name}: the policy declares no replica {name}",
                id.0
            );
        }
    }
    engine::RunOptions {
        replicas: targets,
        ..Default::default()
    }
}

async fn run_one(
    conn: Result<sqlx::PgConnection, crate::pg::ConnectError>,
    url: &str,
    policy: &DatabasePolicy,
    id: &PolicyId,
    mode: Mode,
    options: &engine::RunOptions,
) -> Result<Outcome, RunError> {
    let mut conn = conn?;
    let options = engine::RunOptions {
        claims: engine::server_claims::ClaimsTarget::for_policy_url(url),
        second_url: Some(url.to_string()),
        ..options.clone()
    };
    let result = engine::run_with(&mut conn, &policy.spec, mode, id, &options).await;
    let _ = conn.close().await;
    Ok(result?)
}

/// Why one policy of the file was not run: the database could not be reached, or the
/// engine's run failed as a whole (plan errors and failed statements are in the outcome).
#[derive(Debug, thiserror::Error)]
enum RunError {
    #[error(transparent)]
    Connect(#[from] crate::pg::ConnectError),
    #[error(transparent)]
    Engine(#[from] engine::EngineError),
}

pub(crate) fn exit_code(outcome: &Outcome, mode: Mode) -> u8 {
    if outcome.plan.has_errors() {
        return EXIT_ERROR;
    }
    match (&outcome.report, mode) {
        (Some(r), _) if !r.succeeded() => EXIT_ERROR,
        (Some(r), _) if !r.refused.is_empty() => EXIT_PENDING,
        (Some(_), _) => EXIT_OK,
        (None, _) if outcome.plan.is_empty() => EXIT_OK,
        (None, _) => EXIT_PENDING,
    }
}

fn print_text(id: &PolicyId, outcome: &Outcome, mode: Mode) {
    let plan = &outcome.plan;
    println!("# policy {}", id.0);
    for (area, why) in plan.skipped() {
        println!("# skipped {area}: {why}");
    }
    for n in plan.notices() {
        println!(
            "# notice {}: {}: {} ({})",
            n.area, n.target, n.message, n.reason
        );
    }
    for e in plan.errors() {
        println!("# ERROR {e}");
    }
    for r in outcome.facts.replicas.iter().flatten() {
        let mut line = format!("# replica {}: {}", r.name, r.state);
        let lag: Vec<String> = [
            r.lag_seconds.map(|s| format!("{s:.3}s")),
            r.lag_bytes.map(|b| format!("{b} bytes")),
        ]
        .into_iter()
        .flatten()
        .collect();
        if !lag.is_empty() {
            line.push_str(&format!(", lag {}", lag.join(" / ")));
        }
        if let Some(slot) = &r.slot {
            line.push_str(&format!(", slot {slot}"));
        }
        println!("{line}");
    }
    if let Some(t) = &outcome.drift_trigger {
        println!("# drift event trigger: {}", t.describe());
    }
    match &outcome.report {
        None => {
            print!("{}", plan.render_sql());
            let n = plan.changes().count();
            if plan.has_errors() {
                println!(
                    "# the plan has errors: nothing {}",
                    if mode == Mode::Apply {
                        "was applied"
                    } else {
                        "can be applied"
                    }
                );
            } else if n == 0 {
                println!("# nothing to change");
            } else {
                println!(
                    "# {n} change(s) pending: {} safe, {} locking, {} server-wide, {} destructive",
                    plan.count_by_hazard(Hazard::Safe),
                    plan.count_by_hazard(Hazard::Locking),
                    plan.count_by_hazard(Hazard::Server),
                    plan.count_by_hazard(Hazard::Destructive)
                );
            }
        }
        Some(report) => {
            for c in &report.applied {
                let rows = c
                    .rows_affected
                    .map(|n| format!(" ({n} row(s) affected)"))
                    .unwrap_or_default();
                println!(
                    "applied [{}] {} {}: {}{rows}",
                    c.hazard.as_str(),
                    c.area,
                    c.target,
                    c.summary
                );
            }
            for c in &report.refused {
                println!(
                    "refused [destructive] {} {}: {} (set spec.safety.allowDestructive: true to allow)",
                    c.area, c.target, c.summary
                );
            }
            if let Some(f) = &report.failure {
                println!(
                    "FAILED {}: {}: {} [{}]\n  statement: {}",
                    f.area, f.target, f.message, f.reason, f.statement
                );
                if !report.not_attempted.is_empty() {
                    println!(
                        "not attempted: {} change(s) after the failure",
                        report.not_attempted.len()
                    );
                }
            }
            let restart = report.restart_required();
            if !restart.is_empty() {
                println!("# restart required for: {}", restart.join(", "));
            }
            if report.applied.is_empty() && report.failure.is_none() && report.refused.is_empty() {
                println!("# nothing to change");
            } else {
                println!("# applied {} change(s)", report.applied.len());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plugin_name_selects_the_kubectl_subcommand() {
        let os = |v: &[&str]| v.iter().map(std::ffi::OsString::from).collect::<Vec<_>>();
        for argv0 in ["kubectl-dbpolicy", "/usr/local/bin/kubectl-dbpolicy"] {
            let cli =
                Cli::try_parse_from(args_for(os(&[argv0, "status", "certquiz", "-n", "quiz"])))
                    .unwrap();
            let Command::Kubectl(a) = cli.command else {
                panic!("not the plugin")
            };
            assert_eq!(a.namespace.as_deref(), Some("quiz"));
            assert!(
                matches!(a.command, crate::kubectl::PluginCommand::Status { ref name } if name == "certquiz")
            );
        }
        // As dbpolicy, the arguments are left alone: `dbpolicy kubectl plan NAME` works too.
        assert_eq!(args_for(os(&["dbpolicy", "crd"])), os(&["dbpolicy", "crd"]));
        let cli = Cli::try_parse_from(os(&["dbpolicy", "kubectl", "plan", "x"])).unwrap();
        assert!(matches!(cli.command, Command::Kubectl(_)));
        assert!(Cli::try_parse_from(args_for(os(&["kubectl-dbpolicy", "status"]))).is_err());
    }

    #[test]
    fn parses_several_documents_and_skips_other_kinds() {
        let text = "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\n---\napiVersion: dbpolicy.dev/v1alpha1\nkind: DatabasePolicy\nmetadata: {name: a}\nspec:\n  database: {connectionSecretRef: {name: db}}\n---\napiVersion: dbpolicy.dev/v1alpha1\nkind: DatabasePolicy\nmetadata: {name: b, namespace: x}\nspec:\n  database: {connectionSecretRef: {name: db}}\n";
        let (p, skipped) = parse_policies(text).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(skipped.len(), 1);
        assert_eq!(policy_id(&p[1]).0, "x/b");
    }

    #[test]
    fn errors_name_the_document() {
        let text = "apiVersion: dbpolicy.dev/v1alpha1\nkind: DatabasePolicy\nmetadata: {name: a}\nspec:\n  database: {connectionSecretRef: {name: db}}\n  autovacuum: {tables: [{table: t, vacuumScaleFactor: lots}]}\n";
        let e = parse_policies(text).unwrap_err();
        assert!(e.to_string().starts_with("document 1:"), "{e}");
        assert!(e.to_string().contains("vacuumScaleFactor"), "{e}");
        assert!(parse_policies("apiVersion: v9\nkind: DatabasePolicy\n")
            .unwrap_err()
            .to_string()
            .contains("apiVersion"));
        assert!(parse_policies("").is_err());
    }

    #[test]
    fn allow_setting_is_repeatable_on_plan_apply_and_run() {
        let cli = Cli::try_parse_from([
            "dbpolicy",
            "apply",
            "-f",
            "p.yaml",
            "--allow-setting",
            "archive_command,shared_preload_libraries",
            "--allow-setting",
            "restore_command",
        ])
        .unwrap();
        let Command::Apply(args) = cli.command else {
            panic!("apply")
        };
        assert_eq!(
            args.allow_settings,
            [
                "archive_command",
                "shared_preload_libraries",
                "restore_command"
            ]
        );
        let cli =
            Cli::try_parse_from(["dbpolicy", "run", "--allow-setting", "Archive_Command"]).unwrap();
        let Command::Run(args) = cli.command else {
            panic!("run")
        };
        let allowed = engine::AllowedSettings::new(&args.allow_settings).unwrap();
        assert!(allowed.allows("archive_command"));
        assert!(engine::AllowedSettings::new(["x; DROP"]).is_err());
    }

    #[test]
    fn exit_codes_rank() {
        assert_eq!(worse(EXIT_OK, EXIT_PENDING), EXIT_PENDING);
        assert_eq!(worse(EXIT_ERROR, EXIT_PENDING), EXIT_ERROR);
    }
}
