//! Shared by the KVM tests: skip (one line) when /dev/kvm is unusable,
//! unless `PRECOPY_REQUIRE_KVM=1`, which turns a skip into a failure.

use precopy_engine::kvm::KvmVm;

/// True when KVM can be used; otherwise prints why and returns false (or
/// panics under `PRECOPY_REQUIRE_KVM=1`).
pub(crate) fn kvm_available(test: &str) -> bool {
    match KvmVm::probe() {
        Ok(()) => true,
        Err(e) => {
            if std::env::var("PRECOPY_REQUIRE_KVM").as_deref() == Ok("1") {
                panic!("{test}: KVM required (PRECOPY_REQUIRE_KVM=1) but {e}");
            }
            println!("{test}: skipped: {e}");
            false
        }
    }
}
