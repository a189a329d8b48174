//! `precopy`: run a whole live migration of guest memory, receive one, or
//! inspect a migration stream file.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod inspect;
mod kvm_guest;
mod migrate;

/// Live migration of guest memory, QEMU-compatible.
#[derive(Parser)]
#[command(name = "precopy", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Migrate a guest (the built-in simulated guest by default) to a destination.
    Migrate(migrate::MigrateArgs),
    /// Receive a migration on URI and verify it.
    Incoming(migrate::IncomingArgs),
    /// Read a migration stream file and summarise it.
    Inspect(inspect::InspectArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Migrate(args) => migrate::run(args),
        Command::Incoming(args) => migrate::run_incoming(args),
        Command::Inspect(args) => inspect::run(args),
    }
}
