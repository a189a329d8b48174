//! Migration parameters and capabilities, with QEMU's names, units, defaults and ranges
//! (qapi/migration.json, migration/migration.c `migrate_params_check`).

use serde::{Deserialize, Serialize};

use xbzrle::PAGE_SIZE;

/// QEMU's default `max-bandwidth` (`MAX_THROTTLE`): 128 MiB/s.
pub const DEFAULT_MAX_BANDWIDTH: u64 = 128 << 20;
/// QEMU's default `downtime-limit`: 300 ms.
pub const DEFAULT_DOWNTIME_LIMIT_MS: u64 = 300;
/// QEMU's largest `downtime-limit` (`MAX_MIGRATE_DOWNTIME`): 2000 s, in ms.
pub const MAX_DOWNTIME_LIMIT_MS: u64 = 2_000_000;
/// QEMU's default `xbzrle-cache-size`: 64 MiB.
pub const DEFAULT_XBZRLE_CACHE_SIZE: u64 = 64 << 20;

/// Migration parameters (`migrate-set-parameters` / `query-migrate-parameters`).
///
/// Serializes with QEMU's names (`max-bandwidth`, `downtime-limit`, ...).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationParameters {
    /// `max-bandwidth`: bytes/s the source may send while iterating (0 = unlimited);
    /// default 128 MiB/s. The final pass is not rate limited.
    pub max_bandwidth: u64,
    /// `avail-switchover-bandwidth`: bytes/s assumed for the switchover decision instead of
    /// the measured bandwidth; 0 (default) = use the measured bandwidth (QEMU 8.2+).
    pub avail_switchover_bandwidth: u64,
    /// `downtime-limit`: largest acceptable downtime, ms; 0..=2 000 000, default 300.
    pub downtime_limit: u64,
    /// `xbzrle-cache-size`: bytes of XBZRLE page cache; a power of two of at least the page
    /// size (4096); default 64 MiB. Can change while a migration runs (resizes in place).
    pub xbzrle_cache_size: u64,
    /// `cpu-throttle-initial`: first auto-converge throttle, %, 1..=99, default 20.
    pub cpu_throttle_initial: u8,
    /// `cpu-throttle-increment`: auto-converge step, %, 1..=99, default 10.
    pub cpu_throttle_increment: u8,
    /// `cpu-throttle-tailslow`: smaller steps near the needed throttle; default false.
    pub cpu_throttle_tailslow: bool,
    /// `max-cpu-throttle`: highest auto-converge throttle, %, 1..=99, default 99.
    pub max_cpu_throttle: u8,
    /// `throttle-trigger-threshold`: dirtied/sent ratio, %, that counts a period as
    /// non-converging; 1..=100, default 50.
    pub throttle_trigger_threshold: u8,
}

impl Default for MigrationParameters {
    fn default() -> Self {
        MigrationParameters {
            max_bandwidth: DEFAULT_MAX_BANDWIDTH,
            avail_switchover_bandwidth: 0,
            downtime_limit: DEFAULT_DOWNTIME_LIMIT_MS,
            xbzrle_cache_size: DEFAULT_XBZRLE_CACHE_SIZE,
            cpu_throttle_initial: 20,
            cpu_throttle_increment: 10,
            cpu_throttle_tailslow: false,
            max_cpu_throttle: 99,
            throttle_trigger_threshold: 50,
        }
    }
}

/// A parameter value out of its range (QEMU: "Parameter 'X' expects ...").
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("parameter '{name}' expects {expected}, got {value}")]
pub struct ParameterError {
    /// The parameter's QEMU name.
    pub name: &'static str,
    /// The rejected value.
    pub value: u64,
    /// What is accepted.
    pub expected: &'static str,
}

/// A partial update (`migrate-set-parameters`): `None` leaves a parameter as it is.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[allow(missing_docs)]
pub struct ParameterUpdate {
    pub max_bandwidth: Option<u64>,
    pub avail_switchover_bandwidth: Option<u64>,
    pub downtime_limit: Option<u64>,
    pub xbzrle_cache_size: Option<u64>,
    pub cpu_throttle_initial: Option<u8>,
    pub cpu_throttle_increment: Option<u8>,
    pub cpu_throttle_tailslow: Option<bool>,
    pub max_cpu_throttle: Option<u8>,
    pub throttle_trigger_threshold: Option<u8>,
}

fn pct(name: &'static str, v: u8, max: u8) -> Result<(), ParameterError> {
    if (1..=max).contains(&v) {
        Ok(())
    } else {
        Err(ParameterError {
            name,
            value: u64::from(v),
            expected: if max == 100 {
                "an integer in the range of 1 to 100"
            } else {
                "an integer in the range of 1 to 99"
            },
        })
    }
}

impl MigrationParameters {
    /// Check every parameter against QEMU's range.
    pub fn validate(&self) -> Result<(), ParameterError> {
        if self.downtime_limit > MAX_DOWNTIME_LIMIT_MS {
            return Err(ParameterError {
                name: "downtime-limit",
                value: self.downtime_limit,
                expected: "an integer in the range of 0 to 2000000 milliseconds",
            });
        }
        if self.xbzrle_cache_size < PAGE_SIZE as u64 || !self.xbzrle_cache_size.is_power_of_two() {
            return Err(ParameterError {
                name: "xbzrle-cache-size",
                value: self.xbzrle_cache_size,
                expected: "a power of two no less than the target page size (4096)",
            });
        }
        pct("cpu-throttle-initial", self.cpu_throttle_initial, 99)?;
        pct("cpu-throttle-increment", self.cpu_throttle_increment, 99)?;
        pct("max-cpu-throttle", self.max_cpu_throttle, 99)?;
        pct(
            "throttle-trigger-threshold",
            self.throttle_trigger_threshold,
            100,
        )?;
        Ok(())
    }

    /// Apply `update` after checking the result; on error nothing changes.
    pub fn apply(&mut self, update: &ParameterUpdate) -> Result<(), ParameterError> {
        let mut next = self.clone();
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = update.$f { next.$f = v; } )* };
        }
        set!(
            max_bandwidth,
            avail_switchover_bandwidth,
            downtime_limit,
            xbzrle_cache_size,
            cpu_throttle_initial,
            cpu_throttle_increment,
            cpu_throttle_tailslow,
            max_cpu_throttle,
            throttle_trigger_threshold
        );
        next.validate()?;
        *self = next;
        Ok(())
    }
}

/// Migration capabilities (`migrate-set-capabilities`). They cannot change while a migration
/// is active.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Capabilities {
    /// `xbzrle`: send changed pages as XBZRLE deltas against the XBZRLE cache.
    pub xbzrle: bool,
    /// `auto-converge`: throttle the guest's CPUs when it dirties memory faster than it can
    /// be sent.
    pub auto_converge: bool,
    /// `x-parallel-encoding` (ours): zero detection and XBZRLE encoding on a rayon thread
    /// pool, with the XBZRLE cache sharded by page address across the threads.
    pub x_parallel_encoding: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_qemus_and_valid() {
        let p = MigrationParameters::default();
        p.validate().unwrap();
        let j = serde_json::to_value(&p).unwrap();
        assert_eq!(j["max-bandwidth"], 134_217_728);
        assert_eq!(j["downtime-limit"], 300);
        assert_eq!(j["xbzrle-cache-size"], 67_108_864);
        assert_eq!(j["cpu-throttle-initial"], 20);
        assert_eq!(j["cpu-throttle-increment"], 10);
        assert_eq!(j["max-cpu-throttle"], 99);
        assert_eq!(j["throttle-trigger-threshold"], 50);
    }

    #[test]
    fn out_of_range_is_rejected_and_leaves_params_unchanged() {
        let mut p = MigrationParameters::default();
        for (u, name) in [
            (
                ParameterUpdate {
                    downtime_limit: Some(2_000_001),
                    ..Default::default()
                },
                "downtime-limit",
            ),
            (
                ParameterUpdate {
                    xbzrle_cache_size: Some(3 << 20),
                    ..Default::default()
                },
                "xbzrle-cache-size",
            ),
            (
                ParameterUpdate {
                    xbzrle_cache_size: Some(2048),
                    ..Default::default()
                },
                "xbzrle-cache-size",
            ),
            (
                ParameterUpdate {
                    cpu_throttle_initial: Some(0),
                    ..Default::default()
                },
                "cpu-throttle-initial",
            ),
            (
                ParameterUpdate {
                    max_cpu_throttle: Some(100),
                    ..Default::default()
                },
                "max-cpu-throttle",
            ),
            (
                ParameterUpdate {
                    throttle_trigger_threshold: Some(101),
                    ..Default::default()
                },
                "throttle-trigger-threshold",
            ),
        ] {
            let e = p.apply(&u).unwrap_err();
            assert_eq!(e.name, name);
            assert_eq!(p, MigrationParameters::default());
        }
        p.apply(&ParameterUpdate {
            downtime_limit: Some(2_000_000),
            throttle_trigger_threshold: Some(100),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(p.downtime_limit, 2_000_000);
    }
}
