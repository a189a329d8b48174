#!/usr/bin/env bash
# KVM guest tests (issue 6): a real KVM VM migrated over loopback TCP, exact
# dirty log, auto-converge against a real vCPU, cancel/failure recovery.
# Needs /dev/kvm (x86_64 Linux). PRECOPY_REQUIRE_KVM=1 turns "skipped: no
# KVM" into a failure, since CI runs where KVM exists. A few minutes at most.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(uname -m)" != "x86_64" ] || [ "$(uname -s)" != "Linux" ]; then
    echo "kvm.sh: not Linux x86_64; the KVM guest is not built here"
    exit 0
fi
export PRECOPY_REQUIRE_KVM="${PRECOPY_REQUIRE_KVM:-1}"
# The tests run VMs with several vCPU threads each; one test at a time keeps
# their timing meaningful on a 2-core machine.
cargo test -p precopy-engine --features kvm --test 'kvm*' -- --test-threads 1
