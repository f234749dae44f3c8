//! `dbpolicy`: parse the command line, set up logging, dispatch. Nothing else.

use std::process::ExitCode;

use clap::Parser;
use dbpolicy::cli::{Cli, Command, LogFormat};

#[tokio::main]
async fn main() -> ExitCode {
    // Installed as `kubectl-dbpolicy`, the binary is the kubectl plugin.
    let cli = Cli::parse_from(dbpolicy::cli::args_for(std::env::args_os().collect()));
    // The operator tells what it does; the one-shot commands only warn.
    let default = match cli.command {
        Command::Run(_) => "info",
        _ => "warn",
    };
    let rust_log = std::env::var("RUST_LOG").ok();
    let filter = dbpolicy::logging::filter(rust_log.as_deref(), default);
    dbpolicy::logging::init(cli.log_format == LogFormat::Json, filter);
    dbpolicy::cli::run(cli).await
}
