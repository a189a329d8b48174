//! Migration state and statistics, serializing to QEMU's `query-migrate` JSON
//! (qapi/migration.json `MigrationInfo`, `MigrationStats`, `XBZRLECacheStats`).

use std::fmt;

use serde::{Deserialize, Serialize};

/// Migration state (QEMU `MigrationStatus`, the subset a pre-copy migration uses).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MigrationStatus {
    /// No migration has started.
    #[default]
    None,
    /// Connecting, sending the header and MEM_SIZE, enabling the dirty log.
    Setup,
    /// Iterating (sending dirty pages), including the final pass with the guest stopped.
    Active,
    /// A cancel was asked for; the source is being restored.
    Cancelling,
    /// Cancelled; the source runs on.
    Cancelled,
    /// Completed (destination RAM equals source RAM at switchover).
    Completed,
    /// Failed; the source runs on. See `error-desc`.
    Failed,
}

impl MigrationStatus {
    /// QEMU's name (`none`, `setup`, `active`, ...).
    pub fn name(self) -> &'static str {
        match self {
            MigrationStatus::None => "none",
            MigrationStatus::Setup => "setup",
            MigrationStatus::Active => "active",
            MigrationStatus::Cancelling => "cancelling",
            MigrationStatus::Cancelled => "cancelled",
            MigrationStatus::Completed => "completed",
            MigrationStatus::Failed => "failed",
        }
    }

    /// True for setup, active and cancelling (a migration is in progress).
    pub fn is_active(self) -> bool {
        matches!(
            self,
            MigrationStatus::Setup | MigrationStatus::Active | MigrationStatus::Cancelling
        )
    }

    /// True for cancelled, completed and failed.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            MigrationStatus::Cancelled | MigrationStatus::Completed | MigrationStatus::Failed
        )
    }
}

/// A state change (QEMU's `MIGRATION` event), as sent to the subscribers of
/// [`Migrator::subscribe`](crate::Migrator::subscribe) and
/// [`Destination::subscribe`](crate::Destination::subscribe).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateChange {
    /// Previous state.
    pub from: MigrationStatus,
    /// New state.
    pub to: MigrationStatus,
}

impl fmt::Display for MigrationStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// RAM statistics (QEMU `MigrationStats`).
///
/// Every page handled by the loop is counted once in exactly one of `duplicate` (ZERO
/// record), `normal` (PAGE record), the XBZRLE cache's `pages` (XBZRLE record), the zstd or
/// zlib `pages` of [`PageCompressionStats`] (our COMPRESSED record), or is unchanged since
/// its cached copy and not sent at all (not counted here).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RamStats {
    /// Bytes written to the transport so far, headers included (equals bytes on the wire).
    pub transferred: u64,
    /// Dirty bytes not yet sent (dirty pages × page size).
    pub remaining: u64,
    /// Guest RAM bytes (sum of the blocks' used lengths).
    pub total: u64,
    /// Pages sent as ZERO records.
    pub duplicate: u64,
    /// Pages sent whole (PAGE records).
    pub normal: u64,
    /// Bytes of page data in PAGE records (`normal` × page size).
    pub normal_bytes: u64,
    /// Pages dirtied per second, measured between the last two bitmap syncs ≥ 1 s apart.
    pub dirty_pages_rate: u64,
    /// Throughput of the last 100 ms period, Mbit/s (10^6 bits).
    pub mbps: f64,
    /// Dirty-bitmap syncs so far (= XBZRLE cache generations).
    pub dirty_sync_count: u64,
    /// Target page size, bytes.
    pub page_size: u64,
    /// Pages handled per second in the last period.
    pub pages_per_second: u64,
    /// Bytes sent before the guest stopped (QEMU's `precopy-bytes`); while the guest runs,
    /// and for a migration that failed before the final stage, all bytes sent so far.
    /// `precopy_bytes + downtime_bytes == transferred`.
    pub precopy_bytes: u64,
    /// Bytes sent while the guest was stopped.
    pub downtime_bytes: u64,
    /// Bytes sent on multifd page channels (QEMU's `multifd-bytes`; 0 without multifd),
    /// included in `transferred`.
    #[serde(default)]
    pub multifd_bytes: u64,
}

/// XBZRLE cache statistics (QEMU `XBZRLECacheStats`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct XbzrleCacheStats {
    /// XBZRLE cache size, bytes (the `xbzrle-cache-size` in force).
    pub cache_size: u64,
    /// Bytes of XBZRLE records sent (record headers included).
    pub bytes: u64,
    /// Pages sent as XBZRLE records.
    pub pages: u64,
    /// Pages looked up and not found in the cache (sent whole).
    pub cache_miss: u64,
    /// Misses / pages looked up in the last period (0..=1).
    pub cache_miss_rate: f64,
    /// Page bytes / XBZRLE bytes for the XBZRLE pages of the last period.
    pub encoding_rate: f64,
    /// Pages whose delta did not fit in less than a page (sent whole).
    pub overflow: u64,
}

/// Pages, bytes and CPU time of one page compression method (ours, `query-migrate` style).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MethodStats {
    /// Pages sent with this method.
    pub pages: u64,
    /// Stream bytes of their records (headers included).
    pub bytes: u64,
    /// Nanoseconds spent encoding with this method on the encoding threads, summed over
    /// threads, including `auto`'s probes (pages encoded but sent another way).
    pub cpu_time_ns: u64,
}

/// Per-method statistics of `page-compression` (ours). Zero pages and unchanged pages are
/// in [`RamStats`] only; every other page is in exactly one method here.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct PageCompressionStats {
    /// The `page-compression` in force (`none`, `xbzrle`, `zstd`, `zlib`, `auto`).
    pub method: String,
    /// PAGE records.
    pub none: MethodStats,
    /// XBZRLE records.
    pub xbzrle: MethodStats,
    /// Our COMPRESSED records with zstd frames.
    pub zstd: MethodStats,
    /// Our COMPRESSED records with zlib frames.
    pub zlib: MethodStats,
    /// The link rate the `auto` selector used last, bytes/s (0 unless `auto`).
    pub link_bandwidth: u64,
}

/// The `query-migrate` answer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationInfo {
    /// The state.
    pub status: MigrationStatus,
    /// ms since the migration started (up to completion when finished).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_time: Option<u64>,
    /// ms spent in setup.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub setup_time: Option<u64>,
    /// ms the guest was stopped (only once completed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downtime: Option<u64>,
    /// Estimated downtime if switching over now, ms (only while active).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected_downtime: Option<u64>,
    /// RAM statistics (once the migration has started).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ram: Option<RamStats>,
    /// XBZRLE cache statistics (when the `xbzrle` capability is on).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub xbzrle_cache: Option<XbzrleCacheStats>,
    /// Auto-converge throttle in force, % (only when throttling).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_throttle_percentage: Option<u8>,
    /// Per-method page compression statistics (ours; once the migration has started).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_compression: Option<PageCompressionStats>,
    /// Why the migration failed: the rendered message of the typed error
    /// that failed it. A `String` on purpose: this mirrors QMP's
    /// `error-desc` of `query-migrate`, a human-readable text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_desc: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_uses_qemu_names() {
        let info = MigrationInfo {
            status: MigrationStatus::Completed,
            total_time: Some(10),
            setup_time: Some(1),
            downtime: Some(5),
            ram: Some(RamStats::default()),
            xbzrle_cache: Some(XbzrleCacheStats::default()),
            cpu_throttle_percentage: Some(20),
            ..Default::default()
        };
        let j = serde_json::to_value(&info).unwrap();
        assert_eq!(j["status"], "completed");
        for k in [
            "total-time",
            "setup-time",
            "downtime",
            "cpu-throttle-percentage",
        ] {
            assert!(j.get(k).is_some(), "{k}");
        }
        for k in [
            "transferred",
            "remaining",
            "total",
            "duplicate",
            "normal",
            "normal-bytes",
            "dirty-pages-rate",
            "mbps",
            "dirty-sync-count",
        ] {
            assert!(j["ram"].get(k).is_some(), "{k}");
        }
        for k in [
            "cache-size",
            "bytes",
            "pages",
            "cache-miss",
            "cache-miss-rate",
            "encoding-rate",
            "overflow",
        ] {
            assert!(j["xbzrle-cache"].get(k).is_some(), "{k}");
        }
        assert!(j.get("expected-downtime").is_none());
        let back: MigrationInfo = serde_json::from_value(j).unwrap();
        assert_eq!(back, info);
    }
}
