//! `precopy migrate` (issues 5 and 6).
//!
//! With no arguments it migrates a built-in simulated guest (1 GiB, a hot-set workload that
//! does not converge at the default bandwidth without XBZRLE or auto-converge) to a
//! destination in the same process over loopback TCP, shows a live progress bar, prints a
//! summary like QEMU's `info migrate`, and verifies the destination RAM against the source.
//! `--guest kvm` migrates a real KVM guest the same way; the guest kind
//! ([`crate::guest_kind`]) is the only part that differs.

use std::process::ExitCode;

use precopy_engine::{MigrationStatus, MigrationUri, Migrator};

use crate::args::{MigrateArgs, parameters_from};
use crate::destination::Target;
use crate::guest_kind::SourceGuest;
use crate::progress::follow;
use crate::report::{ERROR_KEY, exit_code, failed_json, migrate_json, print_summary};

/// `precopy migrate`. Exit status 1 when the migration failed (or could not start) or
/// verification was false.
pub(crate) fn run(args: MigrateArgs) -> ExitCode {
    match migrate(&args) {
        Ok(code) => code,
        Err(why) => {
            eprintln!("precopy migrate: {why}");
            if args.json {
                println!("{}", failed_json(&why));
            }
            ExitCode::FAILURE
        }
    }
}

/// Configure `m` from the options. Errors: a parameter or capability the engine refuses.
fn configure(m: &Migrator, args: &MigrateArgs) -> Result<(), String> {
    let (u, c) = parameters_from(args);
    m.set_parameters(&u)
        .and_then(|()| m.set_capabilities(c))
        .map_err(|e| e.to_string())?;
    m.set_pass_limit(args.pass_limit);
    Ok(())
}

/// The migration once the options are read; `Err` is why it could not start.
fn migrate(args: &MigrateArgs) -> Result<ExitCode, String> {
    if let Some(Err(e)) = args.to.as_deref().map(str::parse::<MigrationUri>) {
        return Err(e.to_string());
    }
    if args.multifd_channels.is_some() && !args.multifd.on() {
        eprintln!(
            "warning: --multifd-channels has no effect without --multifd on (one stream is sent)"
        );
    }
    if args.mapped_ram.on() {
        if args.multifd.on() {
            return Err("--multifd on needs a socket transport (tcp: or unix:); \
                        --mapped-ram on writes a file (its pages are written in parallel already)"
                .into());
        }
        return crate::mapped_ram::migrate(args);
    }
    args.guest.migrate(args)
}

/// The migration of `guest`, built from `args`; `Err` is why it could not start.
pub(crate) fn migrate_with<G: SourceGuest>(
    args: &MigrateArgs,
    mut guest: G,
) -> Result<ExitCode, String> {
    let m = Migrator::new(guest.shared());
    configure(&m, args)?;
    let target = Target::start(args.to.as_deref(), guest.destination_ram())?;
    if !args.json {
        eprintln!("{}", guest.describe(args, &target.uri));
    }
    m.start(&target.uri).map_err(|e| e.to_string())?;
    let info = follow(&m, args.mem, args.json);
    let completed = info.status == MigrationStatus::Completed;
    // --json keeps stdout to one object: say why on stderr too (text mode has it in the
    // summary), as `incoming --json` does.
    if let (true, Some(e)) = (args.json, &info.error_desc) {
        eprintln!("precopy migrate: {e}");
    }
    // Why the destination's RAM could not be had to compare (not a RAM difference).
    let mut verify_error = None;
    let verified = match target.received(completed) {
        Some(Ok(r)) => Some(completed && guest.check(r)),
        Some(Err(why)) if completed => {
            eprintln!("precopy migrate: {why}");
            verify_error = Some(why);
            Some(false)
        }
        // The destination's error of a failed migration is a consequence, not news.
        Some(Err(_)) => Some(false),
        // An external destination verifies; a failed migration has nothing to verify.
        None => (!completed).then_some(false),
    };
    if args.json {
        let mut v = migrate_json(&info, verified);
        if let Some(o) = v.as_object_mut() {
            // As `precopy incoming --json` says it: page channels, 0 for one stream.
            let channels = if m.capabilities().multifd {
                m.parameters().multifd_channels
            } else {
                0
            };
            o.insert("multifd-channels".into(), channels.into());
            guest.add_json(o);
            if let Some(why) = &verify_error {
                o.entry(ERROR_KEY).or_insert_with(|| why.as_str().into());
            }
        }
        println!("{v}");
    } else {
        print_summary(
            &info,
            &m.parameters(),
            &m.capabilities(),
            verified,
            verify_error.as_deref(),
        );
        guest.print_details();
    }
    Ok(exit_code(completed && verified != Some(false)))
}
