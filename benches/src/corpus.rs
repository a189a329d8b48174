//! The page corpus: pairs of real dirty pages captured from running processes by the
//! `capture` binary, and the reader the `compression` bench uses.
//!
//! # File format (`.pcz`)
//!
//! The whole file is one zstd frame; inside, all integers little-endian:
//!
//! ```text
//! 8 bytes   magic "PCCORP01"
//! u64       scanned     present writable pages read in the second pass
//! u64       zero        of them, all zero in the second pass (a ZERO record; no pair stored)
//! u64       unchanged   of them, non-zero and equal to the first pass (nothing to send)
//! u64       changed     of them, non-zero and different from the first pass
//! u64       fresh       of them, non-zero and not present in the first pass
//! u64       unreadable  present pages whose read failed (skipped)
//! u64       interval_ms time between the two passes
//! u32       label_len   then label_len bytes of UTF-8: the workload's command line
//! u64       count       pairs stored (all of changed + fresh, or an even sample of them)
//! count × { u64 address, u8 has_old (0|1), [4096 bytes old if has_old], 4096 bytes new }
//! ```
//!
//! A changed page's pair has its old content (an XBZRLE cache hit); a fresh page's has
//! none (sent whole, or compressed, but never as a delta).

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;

use crate::{PAGE_SIZE, Page};

/// File magic.
pub const MAGIC: &[u8; 8] = b"PCCORP01";
/// Largest uncompressed corpus the reader accepts (bytes).
pub const MAX_CORPUS_BYTES: u64 = 1 << 30;

/// One captured page: its address in the process, the content of the first pass (if
/// the page was present then), and of the second.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pair {
    /// Virtual address in the captured process.
    pub address: u64,
    /// Content in the first pass (`None`: not present then).
    pub old: Option<Box<Page>>,
    /// Content in the second pass (never all zero).
    pub new: Box<Page>,
}

/// A corpus file's counts and pairs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Corpus {
    /// Present writable pages read in the second pass.
    pub scanned: u64,
    /// All-zero pages in the second pass.
    pub zero: u64,
    /// Non-zero pages equal in both passes.
    pub unchanged: u64,
    /// Non-zero pages that changed.
    pub changed: u64,
    /// Non-zero pages not present in the first pass.
    pub fresh: u64,
    /// Present pages that could not be read.
    pub unreadable: u64,
    /// ms between the passes.
    pub interval_ms: u64,
    /// The workload's command line.
    pub label: String,
    /// Stored pairs (changed and fresh pages, possibly an even sample).
    pub pairs: Vec<Pair>,
}

fn bad(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

impl Corpus {
    /// Writes the corpus as one zstd frame at `level`.
    ///
    /// # Errors
    /// I/O errors of `out` or of zstd.
    pub fn write_to(&self, out: impl Write, level: i32) -> io::Result<()> {
        let mut z = zstd::stream::Encoder::new(out, level)?;
        z.write_all(MAGIC)?;
        for v in [
            self.scanned,
            self.zero,
            self.unchanged,
            self.changed,
            self.fresh,
            self.unreadable,
            self.interval_ms,
        ] {
            z.write_all(&v.to_le_bytes())?;
        }
        z.write_all(&(self.label.len() as u32).to_le_bytes())?;
        z.write_all(self.label.as_bytes())?;
        z.write_all(&(self.pairs.len() as u64).to_le_bytes())?;
        for p in &self.pairs {
            z.write_all(&p.address.to_le_bytes())?;
            match &p.old {
                Some(old) => {
                    z.write_all(&[1])?;
                    z.write_all(&old[..])?;
                }
                None => z.write_all(&[0])?,
            }
            z.write_all(&p.new[..])?;
        }
        z.finish()?.flush()
    }

    /// Reads a corpus file (see the module docs).
    ///
    /// # Errors
    /// `InvalidData` naming the field and its byte offset (in the uncompressed data) when
    /// the file is not a corpus, is cut short, or is larger than [`MAX_CORPUS_BYTES`];
    /// I/O and zstd errors.
    pub fn read(path: &Path) -> io::Result<Corpus> {
        let mut raw = Vec::new();
        zstd::stream::Decoder::new(File::open(path)?)?
            .take(MAX_CORPUS_BYTES + 1)
            .read_to_end(&mut raw)?;
        if raw.len() as u64 > MAX_CORPUS_BYTES {
            return Err(bad(format!(
                "{}: over {MAX_CORPUS_BYTES} bytes",
                path.display()
            )));
        }
        Corpus::parse(&raw).map_err(|e| bad(format!("{}: {e}", path.display())))
    }

    /// Parses uncompressed corpus bytes.
    ///
    /// # Errors
    /// A message naming the field and its byte offset.
    pub fn parse(raw: &[u8]) -> Result<Corpus, String> {
        let mut pos = 0usize;
        let mut take = |n: usize, what: &str| -> Result<&[u8], String> {
            let s = raw
                .get(pos..pos.saturating_add(n))
                .ok_or_else(|| format!("cut short in {what} at byte {pos}"))?;
            pos += n;
            Ok(s)
        };
        if take(8, "magic")? != MAGIC {
            return Err("not a page corpus (magic is not PCCORP01)".into());
        }
        let mut u64s = [0u64; 7];
        for v in &mut u64s {
            *v = u64::from_le_bytes(take(8, "header")?.try_into().unwrap());
        }
        let label_len = u32::from_le_bytes(take(4, "label length")?.try_into().unwrap());
        let label = String::from_utf8_lossy(take(label_len as usize, "label")?).into_owned();
        let count = u64::from_le_bytes(take(8, "pair count")?.try_into().unwrap());
        let mut pairs = Vec::new();
        for i in 0..count {
            let what = format!("pair {i}");
            let address = u64::from_le_bytes(take(8, &what)?.try_into().unwrap());
            let old = match take(1, &what)?[0] {
                0 => None,
                1 => Some(Box::new(<Page>::try_from(take(PAGE_SIZE, &what)?).unwrap())),
                b => return Err(format!("{what}: has_old byte {b} (expected 0 or 1)")),
            };
            let new = Box::new(<Page>::try_from(take(PAGE_SIZE, &what)?).unwrap());
            pairs.push(Pair { address, old, new });
        }
        if pos != raw.len() {
            return Err(format!("{} bytes after the last pair", raw.len() - pos));
        }
        let [
            scanned,
            zero,
            unchanged,
            changed,
            fresh,
            unreadable,
            interval_ms,
        ] = u64s;
        Ok(Corpus {
            scanned,
            zero,
            unchanged,
            changed,
            fresh,
            unreadable,
            interval_ms,
            label,
            pairs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let c = Corpus {
            scanned: 10,
            zero: 3,
            unchanged: 4,
            changed: 2,
            fresh: 1,
            unreadable: 0,
            interval_ms: 2000,
            label: "python3 -c ...".into(),
            pairs: vec![
                Pair {
                    address: 0x1000,
                    old: Some(Box::new([1; PAGE_SIZE])),
                    new: Box::new([2; PAGE_SIZE]),
                },
                Pair {
                    address: 0x5000,
                    old: None,
                    new: Box::new([3; PAGE_SIZE]),
                },
            ],
        };
        let mut z = Vec::new();
        c.write_to(&mut z, 3).unwrap();
        let raw = zstd::decode_all(&z[..]).unwrap();
        assert_eq!(Corpus::parse(&raw).unwrap(), c);
        assert!(
            Corpus::parse(&raw[..raw.len() - 1])
                .unwrap_err()
                .contains("pair 1")
        );
        let mut bad = raw.clone();
        bad[0] = b'X';
        assert!(Corpus::parse(&bad).is_err());
        let mut extra = raw;
        extra.push(0);
        assert!(
            Corpus::parse(&extra)
                .unwrap_err()
                .contains("after the last pair")
        );
    }
}
