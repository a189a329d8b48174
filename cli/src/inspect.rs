//! `precopy inspect` (issue 4).
use std::process::ExitCode;

/// Arguments of `precopy inspect`.
#[derive(clap::Args)]
pub(crate) struct InspectArgs {}

pub(crate) fn run(_args: InspectArgs) -> ExitCode {
    eprintln!("precopy inspect: not built yet");
    ExitCode::FAILURE
}
