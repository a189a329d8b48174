//! `precopy migrate` and `precopy incoming` (issue 5).
use std::process::ExitCode;

/// Arguments of `precopy migrate`.
#[derive(clap::Args)]
pub(crate) struct MigrateArgs {}

/// Arguments of `precopy incoming`.
#[derive(clap::Args)]
pub(crate) struct IncomingArgs {}

pub(crate) fn run(_args: MigrateArgs) -> ExitCode {
    eprintln!("precopy migrate: not built yet");
    ExitCode::FAILURE
}

pub(crate) fn run_incoming(_args: IncomingArgs) -> ExitCode {
    eprintln!("precopy incoming: not built yet");
    ExitCode::FAILURE
}
