//! `--guest kvm` for `precopy migrate` and `precopy incoming` (issue 6).
//! Called by migrate.rs; owned by the KVM work.
