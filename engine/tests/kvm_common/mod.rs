//! Shared by the KVM tests: skip (one line) when /dev/kvm is unusable,
//! unless `PRECOPY_REQUIRE_KVM=1`, which turns a skip into a failure.

use precopy_engine::kvm::KvmVm;

/// True when KVM can be used; otherwise says why (see
/// [`precopy_testsupport::kvm_or_skip`]) and returns false.
pub(crate) fn kvm_available(test: &str) -> bool {
    precopy_testsupport::kvm_or_skip(test, KvmVm::probe())
}
