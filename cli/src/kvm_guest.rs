//! `--guest kvm` (issue 6): a real KVM VM (precopy-engine's `kvm` feature, Linux x86_64)
//! is migrated by the engine; the destination loads the stream straight into the memory of
//! a new VM (`KvmIncomingRam`), builds the VM around it with the `precopy/vcpu` device
//! section (no copy of RAM), resumes it, and reports the guest's progress counter at
//! switchover and one second after resuming, and its self-check.

use std::process::ExitCode;

use crate::args::{IncomingArgs, MigrateArgs};

/// `precopy migrate --guest kvm`: the KVM guest created from the options and running,
/// migrated. Errors: why it could not start.
pub(crate) fn migrate(args: &MigrateArgs) -> Result<ExitCode, String> {
    imp::migrate(args)
}

/// `precopy incoming --guest kvm`.
pub(crate) fn incoming(args: &IncomingArgs) -> ExitCode {
    imp::incoming(args)
}

#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
mod imp {
    use super::*;

    const UNSUPPORTED: &str = "--guest kvm needs Linux on x86_64";

    pub(super) fn migrate(_args: &MigrateArgs) -> Result<ExitCode, String> {
        Err(UNSUPPORTED.into())
    }

    pub(super) fn incoming(args: &IncomingArgs) -> ExitCode {
        crate::incoming::failed(args, UNSUPPORTED, 0)
    }
}

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod imp {
    use std::sync::Arc;
    use std::time::Duration;

    use precopy_engine::kvm::{
        GuestReport, KvmConfig, KvmError, KvmIncomingRam, KvmVm, KvmWorkload, SelfCheck,
    };
    use precopy_engine::{Received, SharedGuest};
    use precopy_stream::OwnedDeviceState;
    use serde_json::{Map, Value};

    use super::*;
    use crate::destination::same_ram;
    use crate::guest_kind::{IncomingGuest, SourceGuest};

    /// How long the destination lets the resumed guest run before reporting.
    const REPORT_AFTER: Duration = Duration::from_secs(1);

    /// Builds the destination VM around the memory a verified stream was loaded into and
    /// its device sections, resumes it and reports.
    fn resume_loaded(
        ram: KvmIncomingRam,
        device_states: &[OwnedDeviceState],
    ) -> Result<(KvmVm, GuestReport), KvmError> {
        let vm = KvmVm::from_loaded(ram, device_states)?;
        let report = vm.resume_and_report(REPORT_AFTER)?;
        Ok((vm, report))
    }

    /// The resumed guest ran on and passed its self-check.
    fn report_ok(report: &GuestReport) -> bool {
        report.self_check == SelfCheck::Ok && report.progress_after > report.progress_before
    }

    fn guest_json(report: &GuestReport, sync_us_per_gib: Option<f64>) -> Value {
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

    /// The source VM and, once checked, the report of the VM resumed from what the
    /// destination received.
    struct KvmSource {
        vm: Arc<KvmVm>,
        report: Option<GuestReport>,
    }

    impl KvmSource {
        /// Dirty-log sync cost of the migration, µs per GiB of RAM, if it synced.
        fn sync_us_per_gib(&self) -> Option<f64> {
            let syncs = self.vm.sync_totals();
            (syncs.count > 0).then(|| syncs.per_gib().as_secs_f64() * 1e6)
        }
    }

    pub(super) fn migrate(args: &MigrateArgs) -> Result<ExitCode, String> {
        let config = KvmConfig {
            mem_size: args.mem,
            vcpus: args.vcpus,
            dirty_rate: args.dirty_rate,
            workload: KvmWorkload {
                seed: args.seed,
                // `--workload hotset` (the default): the counter sweep cycles over 1/8 of
                // each vCPU's data, re-dirtying it every pass; any other workload sweeps
                // all of it.
                hot_percent: if args.workload == precopy_engine::SimWorkload::HotSet {
                    12
                } else {
                    100
                },
                ..KvmWorkload::default()
            },
            ..KvmConfig::default()
        };
        let vm = KvmVm::new(&config).map_err(|e| format!("KVM guest: {e}"))?;
        vm.resume().map_err(|e| format!("KVM guest: {e}"))?;
        let guest = KvmSource {
            vm: Arc::new(vm),
            report: None,
        };
        crate::migrate::migrate_with(args, guest)
    }

    impl SourceGuest for KvmSource {
        type Ram = KvmIncomingRam;

        fn shared(&self) -> SharedGuest {
            self.vm.clone()
        }

        fn destination_ram(&self) -> KvmIncomingRam {
            KvmIncomingRam::new()
        }

        fn describe(&self, args: &MigrateArgs, uri: &str) -> String {
            format!(
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
            )
        }

        fn check(&mut self, r: Received<KvmIncomingRam>) -> bool {
            let same = same_ram(&*self.vm, &r);
            match resume_loaded(r.image, &r.device_states) {
                Ok((_dst, report)) => {
                    let ok = report_ok(&report);
                    self.report = Some(report);
                    same && ok
                }
                Err(e) => {
                    eprintln!("destination: KVM guest: {e}");
                    false
                }
            }
        }

        fn add_json(&self, o: &mut Map<String, Value>) {
            if let Some(report) = &self.report {
                o.insert("guest".into(), guest_json(report, self.sync_us_per_gib()));
            }
        }

        fn print_details(&self) {
            if let Some(us) = self.sync_us_per_gib() {
                println!(
                    "dirty-log sync: {:.0} us per GiB ({} syncs)",
                    us,
                    self.vm.sync_totals().count
                );
            }
            if let Some(report) = &self.report {
                print_report(report);
            }
        }
    }

    /// The VM built and resumed from the received stream, and its report.
    #[derive(Default)]
    struct KvmIncoming {
        resumed: Option<(KvmVm, GuestReport)>,
    }

    pub(super) fn incoming(args: &IncomingArgs) -> ExitCode {
        crate::incoming::receive(args, KvmIncoming::default())
    }

    impl IncomingGuest for KvmIncoming {
        type Ram = KvmIncomingRam;

        fn waiting(&self, uri: &str) -> String {
            format!(
                "precopy incoming: KVM guest, waiting on {uri} (RAM size and vCPUs come from the stream)"
            )
        }

        fn ram(&self) -> KvmIncomingRam {
            KvmIncomingRam::new()
        }

        fn load(
            &mut self,
            ram: KvmIncomingRam,
            device_states: &[OwnedDeviceState],
        ) -> Result<bool, String> {
            let (vm, report) =
                resume_loaded(ram, device_states).map_err(|e| format!("KVM guest: {e}"))?;
            let ok = report_ok(&report);
            self.resumed = Some((vm, report));
            Ok(ok)
        }

        fn add_json(&self, o: &mut Map<String, Value>) {
            if let Some((_, report)) = &self.resumed {
                o.insert("guest".into(), guest_json(report, None));
            }
        }

        fn print_details(&self) {
            if let Some((vm, report)) = &self.resumed {
                println!(
                    "guest: resumed with {} MiB of RAM and {} vCPUs",
                    vm.ram().size() >> 20,
                    vm.vcpu_count()
                );
                print_report(report);
            }
        }
    }
}
