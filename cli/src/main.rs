//! `precopy`: run a whole live migration of guest memory, receive one, or
//! inspect a migration stream file.
//!
//! Layout: [`args`] (the options), [`migrate`] and [`incoming`] (one path each, for every
//! guest kind), [`guest_kind`] and [`kvm_guest`] (what differs per `--guest`),
//! [`destination`] (where the migration goes and how it is verified), [`progress`],
//! [`report`] (summary, JSON with QEMU's `error-desc`, exit codes), [`size`], [`inspect`],
//! [`save_ram`] (`incoming --save-ram`), [`relay`].

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod args;
mod compression;
mod destination;
mod guest_kind;
mod incoming;
mod inspect;
mod kvm_guest;
mod mapped_ram;
mod migrate;
mod progress;
mod relay;
mod report;
mod save_ram;
mod size;
mod snapshot;

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
    Migrate(args::MigrateArgs),
    /// Receive a migration on URI and verify it.
    Incoming(args::IncomingArgs),
    /// Read a migration stream file and summarise it.
    Inspect(args::InspectArgs),
    /// Forward a migration from a QEMU source to a QEMU destination, re-encoding its RAM
    /// (zero pages, XBZRLE with the relay's own cache).
    Relay(args::RelayArgs),
    /// Incremental memory snapshots: take (simulated guest), restore, merge.
    Snapshot(snapshot::SnapshotArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Migrate(args) => migrate::run(args),
        Command::Incoming(args) => incoming::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Relay(args) => relay::run(args),
        Command::Snapshot(args) => snapshot::run(args),
    }
}
