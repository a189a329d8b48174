//! `--guest kvm` for `precopy migrate` and `precopy incoming` (issue 6):
//! a real KVM VM (precopy-engine's `kvm` feature, Linux x86_64) is migrated
//! by the engine; the destination builds a new VM from the received RAM and
//! the `precopy/vcpu` device section, resumes it, and reports the guest's
//! progress counter at switchover and one second after resuming, and its
//! self-check.

use std::process::ExitCode;

use crate::migrate::{IncomingArgs, MigrateArgs};

/// `precopy migrate --guest kvm`.
pub(crate) fn migrate(args: &MigrateArgs) -> ExitCode {
    imp::migrate(args)
}

/// `precopy incoming --guest kvm URI`.
pub(crate) fn incoming(args: &IncomingArgs) -> ExitCode {
    imp::incoming(args)
}

#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
mod imp {
    use super::*;

    pub(super) fn migrate(_args: &MigrateArgs) -> ExitCode {
        eprintln!("precopy migrate: --guest kvm needs Linux on x86_64");
        ExitCode::FAILURE
    }

    pub(super) fn incoming(_args: &IncomingArgs) -> ExitCode {
        eprintln!("precopy incoming: --guest kvm needs Linux on x86_64");
        ExitCode::FAILURE
    }
}

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod imp {
    use std::sync::Arc;
    use std::time::Duration;

    use precopy_engine::kvm::{GuestReport, KvmConfig, KvmError, KvmVm, KvmWorkload, SelfCheck};
    use precopy_engine::{Destination, IncomingListener, MigrationStatus, Migrator, Received};
    use precopy_stream::Limits;

    use super::*;
    use crate::migrate::{configure, follow, json_line, print_summary};

    /// How long the destination lets the resumed guest run before reporting.
    const REPORT_AFTER: Duration = Duration::from_secs(1);

    /// Builds the destination VM from a verified stream, resumes it and
    /// reports.
    fn resume_received(r: &Received) -> Result<(KvmVm, GuestReport), KvmError> {
        let vm = KvmVm::from_received(r)?;
        let report = vm.resume_and_report(REPORT_AFTER)?;
        Ok((vm, report))
    }

    /// Source RAM (stopped at switchover) equals the received image.
    fn same_ram(vm: &KvmVm, r: &Received) -> bool {
        let Some(b) = r.image.blocks().first() else {
            return false;
        };
        if r.image.blocks().len() != 1 || b.data().len() as u64 != vm.ram().size() {
            return false;
        }
        let mut page = [0u8; 4096];
        b.data()
            .chunks_exact(4096)
            .enumerate()
            .all(|(p, d)| vm.ram().read(p as u64 * 4096, &mut page).is_ok() && page[..] == d[..])
    }

    fn guest_json(report: &GuestReport, sync_us_per_gib: Option<f64>) -> serde_json::Value {
        let mut v = serde_json::to_value(report).unwrap_or_default();
        if let (Some(o), Some(us)) = (v.as_object_mut(), sync_us_per_gib) {
            o.insert("dirty-sync-us-per-gib".into(), serde_json::json!(us));
        }
        v
    }

    fn print_report(report: &GuestReport) {
        println!(
            "guest: progress {} at switchover, {} one second after resuming; self-check: {}",
            report.progress_before,
            report.progress_after,
            match report.self_check {
                SelfCheck::Ok => "ok",
                SelfCheck::Failed => "FAILED",
            }
        );
        if let Some(f) = &report.failure {
            println!("guest self-check failure: {f}");
        }
    }

    pub(super) fn migrate(args: &MigrateArgs) -> ExitCode {
        let config = KvmConfig {
            mem_size: args.mem,
            vcpus: args.vcpus,
            dirty_rate: args.dirty_rate,
            workload: KvmWorkload {
                seed: args.seed,
                // `--workload hotset` (the default): the counter sweep cycles
                // over 1/8 of each vCPU's data, re-dirtying it every pass;
                // any other workload sweeps all of it.
                hot_percent: if args.workload == precopy_engine::SimWorkload::HotSet {
                    12
                } else {
                    100
                },
                ..KvmWorkload::default()
            },
            ..KvmConfig::default()
        };
        let vm = match KvmVm::new(&config) {
            Ok(vm) => Arc::new(vm),
            Err(e) => {
                eprintln!("precopy migrate: KVM guest: {e}");
                return ExitCode::FAILURE;
            }
        };
        if let Err(e) = vm.resume() {
            eprintln!("precopy migrate: KVM guest: {e}");
            return ExitCode::FAILURE;
        }
        let m = Migrator::new(vm.clone());
        if !configure(&m, args) {
            return ExitCode::FAILURE;
        }
        let (uri, dest) = match &args.to {
            Some(u) => (u.clone(), None),
            None => match crate::migrate::spawn_local_destination() {
                Some((uri, t)) => (uri, Some(t)),
                None => return ExitCode::FAILURE,
            },
        };
        if !args.json {
            eprintln!(
                "migrating a {} MiB KVM guest ({} vCPUs, {} sweep, dirty rate {}) to {uri}",
                args.mem >> 20,
                args.vcpus,
                if args.workload == precopy_engine::SimWorkload::HotSet {
                    "hot-set"
                } else {
                    "whole-RAM"
                },
                if args.dirty_rate == 0 {
                    "unpaced".to_owned()
                } else {
                    format!("{} pages/s", args.dirty_rate)
                }
            );
        }
        if let Err(e) = m.start(&uri) {
            eprintln!("precopy migrate: {e}");
            return ExitCode::FAILURE;
        }
        let info = follow(&m, args.mem, args.json);
        let completed = info.status == MigrationStatus::Completed;
        let syncs = vm.sync_totals();
        let sync_us_per_gib = (syncs.count > 0).then(|| syncs.per_gib().as_secs_f64() * 1e6);

        // In-process destination: check RAM, build the VM, resume, report.
        let mut report = None;
        let verified = match dest.map(|t| t.join()) {
            None => None,
            Some(Ok(Ok(r))) => {
                let same = completed && same_ram(&vm, &r);
                match resume_received(&r) {
                    Ok((_dst, rep)) => {
                        let ok = rep.self_check == SelfCheck::Ok
                            && rep.progress_after > rep.progress_before;
                        report = Some(rep);
                        Some(same && ok)
                    }
                    Err(e) => {
                        eprintln!("destination: KVM guest: {e}");
                        Some(false)
                    }
                }
            }
            Some(Ok(Err(e))) => {
                eprintln!("destination: {e}");
                Some(false)
            }
            Some(Err(_)) => Some(false),
        };
        if args.json {
            let mut v: serde_json::Value =
                serde_json::from_str(&json_line(&info, verified)).unwrap_or_default();
            if let (Some(o), Some(rep)) = (v.as_object_mut(), &report) {
                o.insert("guest".into(), guest_json(rep, sync_us_per_gib));
            }
            println!("{v}");
        } else {
            print_summary(&info, &m.parameters(), &m.capabilities(), verified);
            if let Some(us) = sync_us_per_gib {
                println!(
                    "dirty-log sync: {:.0} us per GiB ({} syncs)",
                    us, syncs.count
                );
            }
            if let Some(rep) = &report {
                print_report(rep);
            }
        }
        if completed && verified != Some(false) {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    }

    pub(super) fn incoming(args: &IncomingArgs) -> ExitCode {
        let limits = Limits {
            max_ram_bytes: args.max_ram,
            ..Limits::default()
        };
        let l = match IncomingListener::bind(&args.uri) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("precopy incoming: {e}");
                return ExitCode::FAILURE;
            }
        };
        if !args.json {
            eprintln!(
                "precopy incoming: KVM guest, waiting on {} (RAM size and vCPUs come from the stream)",
                l.local_uri()
            );
        }
        let d = Destination::new();
        let received = d.accept_and_receive(l, limits);
        let result = match &received {
            Ok(r) => resume_received(r).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let ok = matches!(&result, Ok((_, rep)) if rep.self_check == SelfCheck::Ok
            && rep.progress_after > rep.progress_before);
        if args.json {
            let mut v = match (&received, &result) {
                (Ok(r), _) => serde_json::json!({
                    "status": "completed",
                    "total-time": r.total_time_ms,
                    "bytes": r.bytes,
                    "ram-total": r.image.total_bytes(),
                    "digest": r.digest,
                }),
                (Err(e), _) => serde_json::json!({"status": "failed", "error": e.to_string()}),
            };
            if let Some(o) = v.as_object_mut() {
                o.insert("verified".into(), serde_json::Value::Bool(ok));
                match &result {
                    Ok((_, rep)) => {
                        o.insert("guest".into(), guest_json(rep, None));
                    }
                    Err(e) if received.is_ok() => {
                        o.insert("error".into(), serde_json::json!(e));
                    }
                    Err(_) => {}
                }
            }
            println!("{v}");
        } else {
            match &result {
                Ok((vm, rep)) => {
                    println!(
                        "received {} MiB of RAM and {} vCPUs; RAM digest verified",
                        vm.ram().size() >> 20,
                        vm.vcpu_count()
                    );
                    print_report(rep);
                }
                Err(e) => eprintln!("precopy incoming: {e}"),
            }
        }
        if ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    }
}
