//! Pure policy: bandwidth / threshold / expected-downtime estimation, the switchover
//! decision and auto-converge. No clock, no I/O: the loop feeds numbers in.
//!
//! Semantics from QEMU migration/migration.c (`migration_update_counters`,
//! `migration_iteration_run`) and migration/ram.c (`migration_trigger_throttle`,
//! `mig_throttle_guest_down`), softmmu/cpu-throttle.c (`cpu_throttle_set` clamps to 1..=99).

use crate::params::MigrationParameters;

/// QEMU's `CPU_THROTTLE_PCT_MIN`.
pub const CPU_THROTTLE_PCT_MIN: u8 = 1;
/// QEMU's `CPU_THROTTLE_PCT_MAX`.
pub const CPU_THROTTLE_PCT_MAX: u8 = 99;

/// Result of one 100 ms estimation (QEMU `migration_update_counters`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Estimate {
    /// Measured bandwidth over the period, bytes per millisecond.
    pub bandwidth_bytes_per_ms: f64,
    /// Bandwidth used for the switchover decision: `avail-switchover-bandwidth` / 1000 when
    /// that parameter is non-zero, else the measured bandwidth; bytes per millisecond.
    pub switchover_bytes_per_ms: f64,
    /// Remaining dirty bytes below which switchover happens: switchover bandwidth ×
    /// `downtime-limit`.
    pub threshold_bytes: u64,
    /// Remaining bytes / switchover bandwidth, in ms (`expected-downtime`); `None` when the
    /// bandwidth is 0.
    pub expected_downtime_ms: Option<u64>,
    /// Measured bandwidth in Mbit/s (`mbps`, 10^6 bits).
    pub mbps: f64,
}

/// Estimate bandwidth, threshold and expected downtime for a period in which
/// `transferred_bytes` went out in `elapsed_ms`, with `remaining_bytes` still dirty.
///
/// `avail_switchover_bandwidth` is bytes/s (0 = use the measured bandwidth);
/// `downtime_limit_ms` is the `downtime-limit` parameter.
pub fn estimate(
    transferred_bytes: u64,
    elapsed_ms: f64,
    remaining_bytes: u64,
    downtime_limit_ms: u64,
    avail_switchover_bandwidth: u64,
) -> Estimate {
    let bw = if elapsed_ms > 0.0 {
        transferred_bytes as f64 / elapsed_ms
    } else {
        0.0
    };
    let sw = if avail_switchover_bandwidth > 0 {
        avail_switchover_bandwidth as f64 / 1000.0
    } else {
        bw
    };
    let threshold = (sw * downtime_limit_ms as f64) as u64;
    let expected = (sw > 0.0).then(|| (remaining_bytes as f64 / sw).round() as u64);
    Estimate {
        bandwidth_bytes_per_ms: bw,
        switchover_bytes_per_ms: sw,
        threshold_bytes: threshold,
        expected_downtime_ms: expected,
        mbps: bw * 1000.0 * 8.0 / 1e6,
    }
}

/// The switchover predicate (QEMU `migration_iteration_run`): switch over when nothing is
/// pending, or when the pending bytes are below the threshold. Otherwise keep iterating.
pub fn should_switchover(pending_bytes: u64, threshold_bytes: u64) -> bool {
    pending_bytes == 0 || pending_bytes < threshold_bytes
}

/// Auto-converge state: the trigger counter (QEMU `dirty_rate_high_cnt`).
///
/// The counter counts periods in which the guest dirtied more than
/// `throttle-trigger-threshold` % of the bytes sent. It is not reset by a quiet period; it is
/// reset only when it reaches 2 and the throttle steps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AutoConverge {
    high_count: u32,
}

impl AutoConverge {
    /// A fresh state (counter 0).
    pub fn new() -> Self {
        Self::default()
    }

    /// The trigger counter.
    pub fn high_count(&self) -> u32 {
        self.high_count
    }

    /// Evaluate one period (at a bitmap sync at least 1 s after the previous evaluation):
    /// `bytes_dirty` = pages dirtied in the period × page size, `bytes_sent` = bytes
    /// transferred in the period, `throttle_now` = the throttle in force (0 = off).
    ///
    /// Returns `Some(new_throttle)` when the throttle must change.
    pub fn on_period(
        &mut self,
        params: &MigrationParameters,
        bytes_dirty: u64,
        bytes_sent: u64,
        throttle_now: u8,
    ) -> Option<u8> {
        let threshold =
            (u128::from(bytes_sent) * u128::from(params.throttle_trigger_threshold) / 100) as u64;
        if bytes_dirty <= threshold {
            return None;
        }
        self.high_count += 1;
        if self.high_count < 2 {
            return None;
        }
        self.high_count = 0;
        Some(throttle_step(params, throttle_now, bytes_dirty, threshold))
    }
}

/// The next throttle (QEMU `mig_throttle_guest_down` + `cpu_throttle_set`): the initial value
/// when not throttling yet; else `throttle_now` + increment, where with
/// `cpu-throttle-tailslow` the increment is `min(cpu_now − cpu_ideal, increment)` with
/// `cpu_now = 100 − throttle_now` and `cpu_ideal = cpu_now × dirty_threshold / dirty`;
/// capped at `max-cpu-throttle`, clamped to 1..=99.
pub fn throttle_step(
    params: &MigrationParameters,
    throttle_now: u8,
    bytes_dirty: u64,
    bytes_dirty_threshold: u64,
) -> u8 {
    let next = if throttle_now == 0 {
        u64::from(params.cpu_throttle_initial)
    } else {
        let inc = if params.cpu_throttle_tailslow && bytes_dirty > 0 {
            let cpu_now = 100.0 - f64::from(throttle_now);
            let cpu_ideal = cpu_now * (bytes_dirty_threshold as f64 / bytes_dirty as f64);
            ((cpu_now - cpu_ideal).max(0.0) as u64).min(u64::from(params.cpu_throttle_increment))
        } else {
            u64::from(params.cpu_throttle_increment)
        };
        (u64::from(throttle_now) + inc).min(u64::from(params.max_cpu_throttle))
    };
    next.clamp(
        u64::from(CPU_THROTTLE_PCT_MIN),
        u64::from(CPU_THROTTLE_PCT_MAX),
    ) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_downtime_from_info_migrate() {
        // QEMU `info migrate`: remaining 376892 kbytes, throughput 866.83 mbps.
        let remaining = 376_892u64 * 1024;
        // bytes transferred in 1 s at 866.83 Mbit/s
        let sent = (866.83e6 / 8.0) as u64;
        let e = estimate(sent, 1000.0, remaining, 300, 0);
        let ms = e.expected_downtime_ms.unwrap();
        assert!((3400..=3600).contains(&ms), "{ms}");
        assert!((e.mbps - 866.83).abs() < 0.01, "{}", e.mbps);
    }

    #[test]
    fn switchover_with_and_without_avail_bandwidth() {
        // 40 MB/s measured, 200 MB pending, 300 ms limit: threshold 12 MB, keep going.
        let e = estimate(40_000_000, 1000.0, 200_000_000, 300, 0);
        assert_eq!(e.threshold_bytes, 12_000_000);
        assert!(!should_switchover(200_000_000, e.threshold_bytes));
        // avail-switchover-bandwidth 1.25 GB/s: threshold 375 MB, switch over.
        let e = estimate(40_000_000, 1000.0, 200_000_000, 300, 1_250_000_000);
        assert_eq!(e.threshold_bytes, 375_000_000);
        assert!(should_switchover(200_000_000, e.threshold_bytes));
        assert_eq!(e.expected_downtime_ms, Some(160));
    }

    #[test]
    fn nothing_pending_switches_over_even_at_zero_threshold() {
        assert!(should_switchover(0, 0));
        assert!(!should_switchover(4096, 0));
        assert!(!should_switchover(4096, 4096));
        assert!(should_switchover(4095, 4096));
    }

    #[test]
    fn zero_time_gives_no_estimate() {
        let e = estimate(0, 0.0, 100, 300, 0);
        assert_eq!(e.expected_downtime_ms, None);
        assert_eq!(e.threshold_bytes, 0);
    }

    #[test]
    fn throttle_goes_20_30_40_with_defaults() {
        let p = MigrationParameters::default();
        let mut ac = AutoConverge::new();
        let mut t = 0u8;
        let mut seen = Vec::new();
        for _ in 0..20 {
            if let Some(n) = ac.on_period(&p, 1000, 1000, t) {
                t = n;
                seen.push(t);
            }
        }
        assert_eq!(seen, [20, 30, 40, 50, 60, 70, 80, 90, 99, 99]);
    }

    #[test]
    fn trigger_counter_is_not_reset_by_a_quiet_period() {
        let p = MigrationParameters::default();
        let mut ac = AutoConverge::new();
        assert_eq!(ac.on_period(&p, 1000, 1000, 0), None);
        assert_eq!(ac.high_count(), 1);
        // quiet: dirty 400 <= 50 % of 1000
        assert_eq!(ac.on_period(&p, 400, 1000, 0), None);
        assert_eq!(ac.high_count(), 1);
        assert_eq!(ac.on_period(&p, 1000, 1000, 0), Some(20));
        assert_eq!(ac.high_count(), 0);
        // exactly at the threshold does not count
        assert_eq!(ac.on_period(&p, 500, 1000, 20), None);
        assert_eq!(ac.high_count(), 0);
    }

    #[test]
    fn tailslow_at_50_with_ratio_0_9_goes_to_55() {
        let p = MigrationParameters {
            cpu_throttle_tailslow: true,
            ..MigrationParameters::default()
        };
        assert_eq!(throttle_step(&p, 50, 1000, 900), 55);
        // far from ideal: capped by the increment
        assert_eq!(throttle_step(&p, 50, 1000, 100), 60);
        // through on_period: threshold = 50 % of sent; dirty 1000, sent 1800 -> 900
        let mut ac = AutoConverge::new();
        assert_eq!(ac.on_period(&p, 1000, 1800, 50), None);
        assert_eq!(ac.on_period(&p, 1000, 1800, 50), Some(55));
    }

    #[test]
    fn max_and_clamp() {
        let p = MigrationParameters {
            max_cpu_throttle: 45,
            ..MigrationParameters::default()
        };
        assert_eq!(throttle_step(&p, 40, 1, 0), 45);
        assert_eq!(throttle_step(&p, 45, 1, 0), 45);
        let p = MigrationParameters {
            cpu_throttle_initial: 99,
            cpu_throttle_increment: 99,
            ..MigrationParameters::default()
        };
        assert_eq!(throttle_step(&p, 0, 1, 0), 99);
        assert_eq!(throttle_step(&p, 99, 1, 0), 99);
    }
}
