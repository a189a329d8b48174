//! The command-line options of `precopy migrate`, `precopy incoming` and `precopy inspect`
//! (clap derive), and the guest kinds they name.

use std::path::PathBuf;

use clap::ValueEnum;
use precopy_engine::{Capabilities, ParameterUpdate, SimWorkload};

use crate::size::parse_size;

/// `on` / `off`, as QEMU spells capability states.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum OnOff {
    /// Enabled.
    On,
    /// Disabled.
    Off,
}

impl OnOff {
    pub(crate) fn on(self) -> bool {
        self == OnOff::On
    }
}

/// Which guest to migrate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum GuestKind {
    /// The built-in simulated guest (threads dirtying shared memory).
    Sim,
    /// A real KVM guest (needs /dev/kvm and the `kvm` feature).
    Kvm,
}

/// Arguments of `precopy migrate`.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct MigrateArgs {
    /// The guest to migrate.
    #[arg(long, value_enum, default_value = "sim")]
    pub(crate) guest: GuestKind,
    /// Guest RAM size (e.g. 256M, 1G).
    #[arg(long, value_parser = parse_size, default_value = "1G")]
    pub(crate) mem: u64,
    /// vCPUs (writer threads of the simulated guest).
    #[arg(long, default_value_t = 2)]
    pub(crate) vcpus: usize,
    /// Pages the guest dirties per second (before throttling); 0 = idle.
    #[arg(long, default_value_t = 100_000)]
    pub(crate) dirty_rate: u64,
    /// Workload of the simulated guest: sparse, cacheline, fullpage, zeroing, hotset, mix.
    #[arg(long, default_value = "hotset")]
    pub(crate) workload: SimWorkload,
    /// Seed of the simulated guest's contents and writes.
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,
    /// Destination URI (tcp:HOST:PORT, unix:PATH, file:PATH, exec:CMD, fd:N); default: an
    /// in-process destination on loopback TCP.
    #[arg(long)]
    pub(crate) to: Option<String>,
    /// max-bandwidth, bytes/s (suffixes allowed: 128M); 0 = unlimited. Any small value is
    /// legitimate: the migration then proceeds at that rate (possibly never converging)
    /// and the progress display keeps updating.
    #[arg(long, value_parser = parse_size)]
    pub(crate) max_bandwidth: Option<u64>,
    /// avail-switchover-bandwidth, bytes/s; 0 = use the measured bandwidth.
    #[arg(long, value_parser = parse_size)]
    pub(crate) avail_switchover_bandwidth: Option<u64>,
    /// downtime-limit, ms.
    #[arg(long)]
    pub(crate) downtime_limit: Option<u64>,
    /// xbzrle-cache-size, bytes (power of two, suffixes allowed: 64M).
    #[arg(long, value_parser = parse_size)]
    pub(crate) xbzrle_cache_size: Option<u64>,
    /// cpu-throttle-initial, %.
    #[arg(long)]
    pub(crate) cpu_throttle_initial: Option<u8>,
    /// cpu-throttle-increment, %.
    #[arg(long)]
    pub(crate) cpu_throttle_increment: Option<u8>,
    /// cpu-throttle-tailslow.
    #[arg(long, value_enum)]
    pub(crate) cpu_throttle_tailslow: Option<OnOff>,
    /// max-cpu-throttle, %.
    #[arg(long)]
    pub(crate) max_cpu_throttle: Option<u8>,
    /// throttle-trigger-threshold, %.
    #[arg(long)]
    pub(crate) throttle_trigger_threshold: Option<u8>,
    /// Capability xbzrle.
    #[arg(long, value_enum, default_value = "on")]
    pub(crate) xbzrle: OnOff,
    /// Capability auto-converge.
    #[arg(long, value_enum, default_value = "on")]
    pub(crate) auto_converge: OnOff,
    /// Capability x-parallel-encoding (ours): encode on a thread pool.
    #[arg(long, value_enum, default_value = "off")]
    pub(crate) parallel_encoding: OnOff,
    /// Capability multifd: pages go over --multifd-channels connections besides the main
    /// one (tcp: and unix: only), each with its own XBZRLE cache shard, zero-page
    /// detection and page compression. The destination (`precopy incoming`) follows.
    #[arg(long, value_enum, default_value = "off")]
    pub(crate) multifd: OnOff,
    /// multifd-channels: page channels with --multifd on, 1..=255 (default 2).
    #[arg(long)]
    pub(crate) multifd_channels: Option<u16>,
    /// Capability mapped-ram (QEMU ≥ 9.0): with --to file:PATH, write QEMU's mapped-ram
    /// file layout (pages at fixed offsets, zero pages as holes; see `precopy inspect`).
    #[arg(long, value_enum, default_value = "off")]
    pub(crate) mapped_ram: OnOff,
    /// Give up (failed) after this many dirty-bitmap syncs without converging. It counts
    /// bitmap syncs (QEMU's "dirty sync count", one at the start of each pass over RAM),
    /// not seconds; with a tiny --max-bandwidth one pass can take very long.
    #[arg(long)]
    pub(crate) pass_limit: Option<u64>,
    /// Print the final query-migrate object as one JSON line, plus "verified": true or
    /// false when this process compared the destination RAM with the source (in-process
    /// destination or --to file:PATH; false also when the migration failed), null when an
    /// external destination (e.g. `precopy incoming`) verifies and the source cannot know,
    /// and "multifd-channels" (page channels, 0 for one stream). A failure before the migration started (bad URI or option, no guest, no connection)
    /// prints `{"status": "failed", "error-desc": ..., "verified": false}`.
    /// Exit status is non-zero only when the migration failed or verification was false.
    #[arg(long)]
    pub(crate) json: bool,
    #[command(flatten)]
    pub(crate) compression: crate::compression::CompressionArgs,
}

/// Arguments of `precopy incoming`.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct IncomingArgs {
    /// Where to receive: tcp:HOST:PORT, unix:PATH, file:PATH, exec:CMD, fd:N.
    pub(crate) uri: String,
    /// The guest to receive into.
    #[arg(long, value_enum, default_value = "sim")]
    pub(crate) guest: GuestKind,
    /// Not used: the RAM size comes from the stream (MEM_SIZE, bounded by --max-ram), for
    /// every guest kind. Accepted so that a `precopy migrate` command line's --mem can be
    /// repeated here.
    #[arg(long, value_parser = parse_size, default_value = "1G")]
    pub(crate) mem: u64,
    /// Not used: a KVM destination takes its vCPUs from the stream's `precopy/vcpu` section.
    #[arg(long, default_value_t = 2)]
    pub(crate) vcpus: usize,
    /// Largest RAM the stream may declare (MEM_SIZE), bytes (suffixes K, M, G, T).
    #[arg(long, value_parser = parse_size, default_value = "16G")]
    pub(crate) max_ram: u64,
    /// Check the RAM against the digest the source (`precopy migrate`) puts in the VM
    /// description. A real QEMU stream carries no such digest: receive it with `--verify off`
    /// (it then loads and reports "verified: not checked"; --json: `"verified": null`).
    #[arg(long, value_enum, default_value = "on")]
    pub(crate) verify: OnOff,
    /// Print the result as one JSON line: `status` (completed or failed; a failure says
    /// why in `error-desc`, as QEMU's query-migrate does), `total-time` (ms), `bytes`
    /// (stream bytes read), `ram-total`, `zero-pages`, `normal-pages`, `xbzrle-pages` (page
    /// records received by kind), `digest` (BLAKE3 of the RAM), `verified` (true, false, or
    /// null with --verify off), `device-state` (QEMU's device sections kept as bytes, null
    /// for our streams), `ram-files` (with --save-ram), `multifd-channels` (page channels
    /// of a multifd source, 0 for one stream), `refused-connections` (why each stray,
    /// duplicate or non-migration connection was refused; each is also printed to stderr
    /// as it happens, and the destination waits on for its source).
    #[arg(long)]
    pub(crate) json: bool,
    /// Write each received RAM block to DIR as a raw file named after the block (e.g.
    /// `pc.ram.ram`), to compare with QEMU's `pmemsave`; `--json` lists them with their
    /// SHA-256 under `ram-files`.
    #[arg(long, value_name = "DIR")]
    pub(crate) save_ram: Option<PathBuf>,
}

/// The parameter update and capabilities the options ask for.
pub(crate) fn parameters_from(args: &MigrateArgs) -> (ParameterUpdate, Capabilities) {
    let mut u = ParameterUpdate {
        max_bandwidth: args.max_bandwidth,
        avail_switchover_bandwidth: args.avail_switchover_bandwidth,
        downtime_limit: args.downtime_limit,
        xbzrle_cache_size: args.xbzrle_cache_size,
        cpu_throttle_initial: args.cpu_throttle_initial,
        cpu_throttle_increment: args.cpu_throttle_increment,
        cpu_throttle_tailslow: args.cpu_throttle_tailslow.map(OnOff::on),
        max_cpu_throttle: args.max_cpu_throttle,
        throttle_trigger_threshold: args.throttle_trigger_threshold,
        multifd_channels: args.multifd_channels,
        ..Default::default()
    };
    let mut c = Capabilities {
        xbzrle: args.xbzrle.on(),
        auto_converge: args.auto_converge.on(),
        x_parallel_encoding: args.parallel_encoding.on(),
        multifd: args.multifd.on(),
    };
    args.compression.apply(&mut u, &mut c);
    (u, c)
}

/// Arguments of `precopy relay`.
#[derive(clap::Args)]
pub(crate) struct RelayArgs {
    /// Where the source connects: tcp:HOST:PORT or unix:PATH (what the source QEMU's
    /// `migrate` names); file:, exec: and fd: read a recorded stream instead. One source.
    #[arg(long)]
    pub(crate) from: String,
    /// The destination, e.g. a QEMU started with `-incoming tcp:HOST:PORT` (or `-incoming
    /// defer` and `migrate-incoming`): tcp:, unix:, file: or exec:. Checked at start;
    /// connected once the source's stream has shown a valid beginning.
    #[arg(long)]
    pub(crate) to: String,
    /// Re-encode re-sent pages with XBZRLE against their previous content, which the
    /// relay holds for the whole RAM (the relay's choice, whatever the source uses; no
    /// cache size: the relay's copy of the RAM is the cache).
    #[arg(long, value_enum, default_value = "off")]
    pub(crate) xbzrle: OnOff,
    /// Largest RAM the source's stream may declare (MEM_SIZE), bytes (suffixes K, M, G, T).
    #[arg(long, value_parser = parse_size, default_value = "16G")]
    pub(crate) max_ram: u64,
    /// Print the result as one JSON line: `status`, `error-desc` and `failed-side`
    /// (`source`, `destination`, or null: none, or the relay itself) on failure, `bytes-in`, `bytes-out`, `pages-in`,
    /// `pages-out` per kind, XBZRLE counters, `device-state-bytes`, `total-time` (ms).
    #[arg(long)]
    pub(crate) json: bool,
}

/// Arguments of `precopy inspect`.
#[derive(clap::Args)]
pub(crate) struct InspectArgs {
    /// Stream file to read; `-` for stdin. xz / zstd compressed input is detected.
    pub(crate) file: PathBuf,
    /// Print one JSON object instead of text (on an error: `error-desc` and the stream byte
    /// `offset`, null when the stream was not at fault).
    #[arg(long)]
    pub(crate) json: bool,
    /// Refuse streams whose MEM_SIZE announces more RAM than this, bytes (suffixes K, M, G,
    /// T: 2T).
    #[arg(long, value_parser = parse_size, default_value = "16G")]
    pub(crate) max_ram: u64,
}
