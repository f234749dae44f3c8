//! `dbpolicy`: parse the command line, set up logging, dispatch. Nothing else.

use std::process::ExitCode;

use clap::Parser;
use dbpolicy::cli::{Cli, Command, LogFormat};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    // Installed as `kubectl-dbpolicy`, the binary is the kubectl plugin.
    let cli = Cli::parse_from(dbpolicy::cli::args_for(std::env::args_os().collect()));
    // The operator tells what it does; the one-shot commands only warn.
    let default = match cli.command {
        Command::Run(_) => "info",
        _ => "warn",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    dbpolicy::logging::init(cli.log_format == LogFormat::Json, filter);
    dbpolicy::cli::run(cli).await
}
