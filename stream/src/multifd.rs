//! multifd: one migration over several connections (QEMU's `multifd` capability and
//! `multifd-channels` parameter), in our own layout, which also carries XBZRLE deltas,
//! zero pages and our compressed pages on every channel (QEMU refuses XBZRLE with multifd,
//! and its multifd packets are another format).
//!
//! # Connections
//!
//! A migration with `multifd-channels` = N opens N + 1 connections to the destination: the
//! **main channel** and N **page channels**, numbered 1..=N. Each starts with a hello of
//! [`HELLO_LEN`] bytes, so the destination can accept them in any order and match them up:
//!
//! ```text
//! be32 0x50434d46 "PCMF"   magic (MULTIFD_MAGIC)
//! be32 1                   version (MULTIFD_VERSION)
//! 16 bytes                 migration id: the same on every connection of one migration
//! be16 index               0 = main channel, 1..=count = page channel
//! be16 count               N, the number of page channels (1..=255), the same on every connection
//! ```
//!
//! A plain (single-connection) stream starts with `QEVM` instead, so a destination tells
//! the two apart by the first four bytes.
//!
//! **The main channel** then carries a normal stream ([`format`](crate::format)): file
//! header, configuration, `ram` START with MEM_SIZE, PART sections, the END section, our
//! device sections, EOF and the VM description. Its `ram` sections carry no page records:
//! only sync points (below) and EOS.
//!
//! **A page channel** then carries `ram` page records, exactly as inside a `ram` section
//! (ZERO, PAGE, XBZRLE, our COMPRESSED; CONTINUE refers to the previous record *on this
//! channel*), sync points, and one closing EOS (`be64 0x10`) after which the source closes
//! the connection. It has no sections and no MEM_SIZE: its records are checked against
//! the main channel's MEM_SIZE ([`Decoder::multifd_channel`](crate::Decoder::multifd_channel)).
//! A page is always sent on the same channel: page channel `1 + ((p / 64) mod N)` for
//! the page whose index in the flat RAM address space (blocks in MEM_SIZE order) is `p`
//! ([`channel_of_page`], runs of [`RUN_PAGES`] = 64 pages, 256 KiB). Each channel so
//! owns a fixed set of pages (and the source a disjoint shard of the XBZRLE
//! cache for it), so the copies of one page, and the deltas between them, stay in order on
//! one connection.
//!
//! # Sync points
//!
//! At every dirty-bitmap sync after pages were sent, and once after the last page, the
//! source writes a `MULTIFD_FLUSH` record (flag `0x200`) whose offset bits carry the sync
//! number `k` (1, 2, 3, ... in order): first on every page channel, then in the main
//! channel's current `ram` section, and it flushes every connection. The destination
//! applies a page channel's records in order; at sync point `k` the channel waits until
//! the main channel reached its sync point `k` and every other page channel reached its
//! own; only then does any channel go past `k`. So every page of the pages sent before
//! sync `k` lands before any page sent after it (a page sent twice lands in order), and
//! the main channel's END section, which starts with the last sync point, is read only
//! once every page sent before the switchover has landed. A destination also requires
//! every page channel to end with EOS and the end of its connection before it reports
//! the migration completed.
//!
//! Sync numbers that skip or repeat, a sync point on the main channel with a number no
//! channel sent, or a page channel that ends before the last sync point are
//! [`FormatError::Multifd`](crate::FormatError::Multifd) errors.

/// First four bytes of every multifd connection: `"PCMF"`.
pub const MULTIFD_MAGIC: u32 = 0x5043_4d46;
/// Version of the hello and channel layout.
pub const MULTIFD_VERSION: u32 = 1;
/// Bytes of a hello.
pub const HELLO_LEN: usize = 28;
/// Pages per run: page `p` goes on page channel `1 + ((p / RUN_PAGES) mod N)`. Runs,
/// not single pages, so each channel's thread walks memory in 256 KiB stretches (two
/// threads interleaving single pages contend: 1.3x on two cores instead of 1.7x).
pub const RUN_PAGES: u64 = 64;
/// Most page channels (QEMU's `multifd-channels` range is 1..=255).
pub const MAX_CHANNELS: u16 = 255;

/// The hello that opens each connection of a multifd migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Hello {
    /// The migration's id, the same on all its connections.
    pub migration_id: [u8; 16],
    /// 0 for the main channel, 1..=`channels` for a page channel.
    pub index: u16,
    /// Number of page channels, 1..=[`MAX_CHANNELS`].
    pub channels: u16,
}

/// Why a hello was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HelloError {
    /// The connection does not start with `PCMF` (nor, for a main channel, `QEVM`).
    #[error(
        "not a multifd connection: first four bytes {found:#010x} (expected 0x50434d46 \"PCMF\")"
    )]
    BadMagic {
        /// The first four bytes, big-endian.
        found: u32,
    },
    /// A version we do not read.
    #[error("multifd version {found} not supported (expected {MULTIFD_VERSION})")]
    Version {
        /// The version on the wire.
        found: u32,
    },
    /// Channel count 0 or over [`MAX_CHANNELS`], or an index over the count.
    #[error(
        "bad multifd channel: index {index} of {channels} page channels (count 1..=255, index 0..=count)"
    )]
    BadChannel {
        /// Index on the wire.
        index: u16,
        /// Count on the wire.
        channels: u16,
    },
    /// The connection ended inside the hello.
    #[error("connection ended inside the multifd hello after {got} of {HELLO_LEN} bytes")]
    Truncated {
        /// Bytes received.
        got: usize,
    },
}

impl Hello {
    /// The hello's bytes.
    pub fn to_bytes(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[0..4].copy_from_slice(&MULTIFD_MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&MULTIFD_VERSION.to_be_bytes());
        b[8..24].copy_from_slice(&self.migration_id);
        b[24..26].copy_from_slice(&self.index.to_be_bytes());
        b[26..28].copy_from_slice(&self.channels.to_be_bytes());
        b
    }

    /// Parses a hello from the first bytes of a connection.
    ///
    /// # Errors
    /// [`HelloError::Truncated`] when `b` is shorter than [`HELLO_LEN`] (the magic is
    /// checked first when at least 4 bytes came), [`HelloError::BadMagic`],
    /// [`HelloError::Version`], [`HelloError::BadChannel`].
    pub fn parse(b: &[u8]) -> Result<Hello, HelloError> {
        if b.len() >= 4 {
            let found = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
            if found != MULTIFD_MAGIC {
                return Err(HelloError::BadMagic { found });
            }
        }
        if b.len() < HELLO_LEN {
            return Err(HelloError::Truncated { got: b.len() });
        }
        let found = u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
        if found != MULTIFD_VERSION {
            return Err(HelloError::Version { found });
        }
        let mut migration_id = [0u8; 16];
        migration_id.copy_from_slice(&b[8..24]);
        let index = u16::from_be_bytes([b[24], b[25]]);
        let channels = u16::from_be_bytes([b[26], b[27]]);
        if channels == 0 || channels > MAX_CHANNELS || index > channels {
            return Err(HelloError::BadChannel { index, channels });
        }
        Ok(Hello {
            migration_id,
            index,
            channels,
        })
    }
}

/// The page channel (1..=`channels`) that carries the page with flat page index `page`
/// (its index in the RAM address space, blocks in MEM_SIZE order): runs of
/// [`RUN_PAGES`] pages round-robin over the channels.
pub fn channel_of_page(page: u64, channels: u16) -> u16 {
    1 + ((page / RUN_PAGES) % u64::from(channels.max(1))) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_round_trips_and_refuses_bad_fields() {
        let h = Hello {
            migration_id: [7; 16],
            index: 3,
            channels: 4,
        };
        let b = h.to_bytes();
        assert_eq!(&b[..4], b"PCMF");
        assert_eq!(Hello::parse(&b).unwrap(), h);
        assert_eq!(
            Hello::parse(&b[..10]),
            Err(HelloError::Truncated { got: 10 })
        );
        assert_eq!(
            Hello::parse(b"QEVM\0\0\0\x03"),
            Err(HelloError::BadMagic { found: 0x5145_564d })
        );
        let mut v = b;
        v[7] = 2;
        assert_eq!(Hello::parse(&v), Err(HelloError::Version { found: 2 }));
        for (index, channels) in [(0u16, 0u16), (5, 4), (1, 256)] {
            let mut x = b;
            x[24..26].copy_from_slice(&index.to_be_bytes());
            x[26..28].copy_from_slice(&channels.to_be_bytes());
            assert_eq!(
                Hello::parse(&x),
                Err(HelloError::BadChannel { index, channels })
            );
        }
    }

    #[test]
    fn runs_of_64_pages_go_round_robin_over_the_channels() {
        let got: Vec<u16> = (0..6).map(|r| channel_of_page(r * 64 + 5, 3)).collect();
        assert_eq!(got, [1, 2, 3, 1, 2, 3]);
        assert!((0..64).all(|p| channel_of_page(p, 3) == 1));
        assert_eq!(channel_of_page(64, 3), 2);
        assert_eq!(
            channel_of_page(u64::MAX, 255),
            1 + ((u64::MAX / 64) % 255) as u16
        );
    }
}
