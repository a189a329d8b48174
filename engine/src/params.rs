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
    /// `page-compression` (ours): how a page that is not zero and not unchanged is sent;
    /// default `none` (see [`PageCompression`]).
    #[serde(default)]
    pub page_compression: PageCompression,
    /// `multifd-zstd-level`: zstd level of `page-compression=zstd` (and of `auto`'s zstd
    /// pages), 0..=20, default 1 (QEMU's name, range and default).
    #[serde(default = "default_level_i32")]
    pub multifd_zstd_level: i32,
    /// `multifd-zlib-level`: zlib level of `page-compression=zlib`, 0..=9, default 1.
    #[serde(default = "default_level_u32")]
    pub multifd_zlib_level: u32,
    /// `multifd-channels`: page channels of a migration with the `multifd` capability,
    /// 1..=255, default 2 (QEMU's name, range and default). Read when a migration starts.
    #[serde(default = "default_multifd_channels")]
    pub multifd_channels: u16,
}

fn default_multifd_channels() -> u16 {
    2
}

fn default_level_i32() -> i32 {
    1
}

fn default_level_u32() -> u32 {
    1
}

/// `page-compression` (our extension): the method for pages that are sent (QEMU's names;
/// QEMU offers zlib/zstd only as `multifd-compression`, on multifd channels).
///
/// | value | pages that are not zero and not unchanged |
/// |---|---|
/// | `none` | PAGE records (XBZRLE as the `xbzrle` capability says) |
/// | `xbzrle` | XBZRLE on a cache hit, else PAGE (turns the `xbzrle` capability on) |
/// | `zstd` | our COMPRESSED record with a zstd frame at `multifd-zstd-level` (PAGE when it does not shrink; XBZRLE on a hit if the capability is on) |
/// | `zlib` | as `zstd`, with zlib at `multifd-zlib-level` |
/// | `auto` | per page, among raw, XBZRLE (on a hit) and zstd, the one with the least estimated time on the measured link and CPU ([`precopy_compress::select`]); XBZRLE cache on |
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PageCompression {
    /// Raw pages.
    #[default]
    None,
    /// XBZRLE deltas on cache hits.
    Xbzrle,
    /// zstd per page.
    Zstd,
    /// zlib per page.
    Zlib,
    /// The adaptive per-page choice.
    Auto,
}

impl PageCompression {
    /// Every value, in order.
    pub const ALL: [PageCompression; 5] = [
        PageCompression::None,
        PageCompression::Xbzrle,
        PageCompression::Zstd,
        PageCompression::Zlib,
        PageCompression::Auto,
    ];

    /// The name: `none`, `xbzrle`, `zstd`, `zlib`, `auto`.
    pub fn name(self) -> &'static str {
        match self {
            PageCompression::None => "none",
            PageCompression::Xbzrle => "xbzrle",
            PageCompression::Zstd => "zstd",
            PageCompression::Zlib => "zlib",
            PageCompression::Auto => "auto",
        }
    }

    /// True when this mode keeps an XBZRLE cache (`xbzrle`, `auto`).
    pub fn needs_xbzrle_cache(self) -> bool {
        matches!(self, PageCompression::Xbzrle | PageCompression::Auto)
    }
}

impl std::fmt::Display for PageCompression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for PageCompression {
    type Err = ParameterError;
    fn from_str(s: &str) -> Result<Self, ParameterError> {
        PageCompression::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or(ParameterError {
                name: "page-compression",
                value: 0,
                expected: "one of none, xbzrle, zstd, zlib, auto",
            })
    }
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
            page_compression: PageCompression::None,
            multifd_zstd_level: 1,
            multifd_zlib_level: 1,
            multifd_channels: 2,
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
    /// `page-compression` (ours). Read when a migration starts: a change during a
    /// migration takes effect at the next one.
    #[serde(default)]
    pub page_compression: Option<PageCompression>,
    /// `multifd-zstd-level` (read when a migration starts).
    #[serde(default)]
    pub multifd_zstd_level: Option<i32>,
    /// `multifd-zlib-level` (read when a migration starts).
    #[serde(default)]
    pub multifd_zlib_level: Option<u32>,
    /// `multifd-channels` (read when a migration starts).
    #[serde(default)]
    pub multifd_channels: Option<u16>,
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
        if !(0..=precopy_compress::MAX_ZSTD_LEVEL).contains(&self.multifd_zstd_level) {
            return Err(ParameterError {
                name: "multifd-zstd-level",
                value: self.multifd_zstd_level as u64,
                expected: "an integer in the range of 0 to 20",
            });
        }
        if self.multifd_zlib_level > precopy_compress::MAX_ZLIB_LEVEL {
            return Err(ParameterError {
                name: "multifd-zlib-level",
                value: self.multifd_zlib_level.into(),
                expected: "an integer in the range of 0 to 9",
            });
        }
        if !(1..=precopy_stream::multifd::MAX_CHANNELS).contains(&self.multifd_channels) {
            return Err(ParameterError {
                name: "multifd-channels",
                value: self.multifd_channels.into(),
                expected: "an integer in the range of 1 to 255",
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
            throttle_trigger_threshold,
            page_compression,
            multifd_zstd_level,
            multifd_zlib_level,
            multifd_channels
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
    /// `multifd`: send pages over `multifd-channels` connections besides the main one
    /// (`tcp:` and `unix:` only), each page channel with its own encoder and its own
    /// shard of the XBZRLE cache; zero-page detection, XBZRLE and page compression run on
    /// every channel (QEMU refuses XBZRLE with multifd). Layout:
    /// [`precopy_stream::multifd`].
    #[serde(default)]
    pub multifd: bool,
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
        assert_eq!(j["page-compression"], "none");
        assert_eq!(j["multifd-zstd-level"], 1);
        assert_eq!(j["multifd-zlib-level"], 1);
        assert_eq!(j["multifd-channels"], 2);
    }

    #[test]
    fn multifd_channels_outside_qemus_range_are_rejected() {
        let mut p = MigrationParameters::default();
        for bad in [0u16, 256] {
            let e = p
                .apply(&ParameterUpdate {
                    multifd_channels: Some(bad),
                    ..Default::default()
                })
                .unwrap_err();
            assert_eq!(e.name, "multifd-channels");
        }
        p.apply(&ParameterUpdate {
            multifd_channels: Some(255),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(p.multifd_channels, 255);
    }

    #[test]
    fn compression_levels_outside_qemus_ranges_are_rejected() {
        let p = MigrationParameters {
            multifd_zstd_level: 21,
            ..Default::default()
        };
        assert_eq!(p.validate().unwrap_err().name, "multifd-zstd-level");
        let p = MigrationParameters {
            multifd_zlib_level: 10,
            ..Default::default()
        };
        assert_eq!(p.validate().unwrap_err().name, "multifd-zlib-level");
        for m in PageCompression::ALL {
            assert_eq!(m.name().parse::<PageCompression>().unwrap(), m);
        }
        assert!("lz4".parse::<PageCompression>().is_err());
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
