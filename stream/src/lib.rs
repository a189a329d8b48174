//! The QEMU-compatible RAM migration stream (work in progress: see issue 4).
