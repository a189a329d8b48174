//! Shared workload generators for the precopy benches.
