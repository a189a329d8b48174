//! Test support for the precopy workspace (dev-only, never published).
//!
//! The real QEMU 7.2 migration data ("the QEMU vectors": two raw streams, the
//! XBZRLE records cut out of one of them, a page trace and the expected
//! results) is not part of the repository. This crate finds it, reads and
//! decompresses its files, and decides what a test does when it is absent.
//!
//! # Where the vectors are looked for
//!
//! 1. `$PRECOPY_VECTORS` when set: the `qemu-vectors` folder, or any file in
//!    it (then its folder is used).
//! 2. Else `../shared/qemu-vectors` relative to the workspace root, i.e. a
//!    `shared/` checkout beside the repository clone (that is how CI has it).
//!    The workspace root is the nearest folder at or above this crate's
//!    manifest whose `Cargo.toml` has a `[workspace]` table.
//!
//! A folder counts as found when it exists; a file missing inside it is an
//! error of the test that reads it, not a skip.
//!
//! # Skip or fail
//!
//! A test that needs the vectors starts with
//!
//! ```no_run
//! # fn the_test() {
//! let Some(v) = precopy_testsupport::vectors_or_skip("the_test") else {
//!     return;
//! };
//! let stream = v.read("plain-stream.bin.xz").unwrap();
//! # let _ = stream;
//! # }
//! ```
//!
//! Without the vectors it writes one line to standard error (straight to the
//! stream, so `cargo test` shows it even for a passing test):
//!
//! ```text
//! SKIPPED the_test: QEMU vectors not found (looked in /x/shared/qemu-vectors); get them with scripts/qemu-vectors/make-vectors.sh OUT or set PRECOPY_VECTORS=DIR
//! ```
//!
//! and returns `None`, so the test passes having checked nothing. When
//! `PRECOPY_REQUIRE_VECTORS` is set to anything but empty or `0` (CI sets
//! `PRECOPY_REQUIRE_VECTORS=1`), it panics instead with the same reason
//! (`FAILED the_test: QEMU vectors not found ...`), so a missing data set can
//! never turn a CI run green.
//!
//! The vectors can be regenerated with `scripts/qemu-vectors/make-vectors.sh`
//! (Debian's QEMU 7.2); a regenerated set differs in bytes from the shared
//! one, see `scripts/qemu-vectors/README.md` for which tests need the exact
//! shared set.

use std::fmt;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// Environment variable naming the vectors folder (or a file in it).
pub const VECTORS_ENV: &str = "PRECOPY_VECTORS";

/// Environment variable that turns a skip into a panic when set to anything
/// but empty or `0`.
pub const REQUIRE_ENV: &str = "PRECOPY_REQUIRE_VECTORS";

/// The repository's script that regenerates the vectors (relative to the
/// workspace root).
pub const MAKE_VECTORS_SCRIPT: &str = "scripts/qemu-vectors/make-vectors.sh";

/// Size in bytes of every page in the vectors (QEMU's target page on x86).
pub const PAGE_SIZE: usize = 4096;

/// One page of guest memory.
pub type Page = [u8; PAGE_SIZE];

/// The vectors were not found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotFound {
    /// Every folder that was tried, in order.
    pub looked_in: Vec<PathBuf>,
}

impl fmt::Display for NotFound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let places: Vec<String> = self
            .looked_in
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        write!(
            f,
            "QEMU vectors not found (looked in {}); get them with {MAKE_VECTORS_SCRIPT} OUT \
             or set {VECTORS_ENV}=DIR",
            if places.is_empty() {
                "nowhere: no workspace root".to_string()
            } else {
                places.join(", ")
            }
        )
    }
}

impl std::error::Error for NotFound {}

/// The workspace root: the nearest folder at or above `start` whose
/// `Cargo.toml` contains a `[workspace]` table. `None` when there is none.
pub fn workspace_root_from(start: &Path) -> Option<PathBuf> {
    start.ancestors().find_map(|dir| {
        let text = std::fs::read_to_string(dir.join("Cargo.toml")).ok()?;
        text.lines()
            .any(|l| l.trim() == "[workspace]")
            .then(|| dir.to_path_buf())
    })
}

/// The root of the workspace this crate was built in (found from this crate's
/// `CARGO_MANIFEST_DIR`, so it works for tests, benches and bench binaries
/// run from anywhere).
pub fn workspace_root() -> Option<PathBuf> {
    workspace_root_from(Path::new(env!("CARGO_MANIFEST_DIR")))
}

/// True when `PRECOPY_REQUIRE_VECTORS` asks for missing vectors to fail
/// (set, and neither empty nor `0`).
pub fn vectors_required() -> bool {
    std::env::var_os(REQUIRE_ENV).is_some_and(|v| !v.is_empty() && v != "0")
}

/// A found vectors folder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vectors {
    dir: PathBuf,
}

impl Vectors {
    /// Finds the vectors folder (see the crate docs for the order).
    ///
    /// # Errors
    /// [`NotFound`] listing the folder(s) tried.
    pub fn locate() -> Result<Vectors, NotFound> {
        let candidate = match std::env::var_os(VECTORS_ENV) {
            Some(p) if !p.is_empty() => {
                let p = PathBuf::from(p);
                if p.is_file() {
                    p.parent().map(Path::to_path_buf).unwrap_or_default()
                } else {
                    p
                }
            }
            _ => match workspace_root() {
                // `<root>/../shared/qemu-vectors`, spelled without the `..`.
                Some(root) => root
                    .parent()
                    .unwrap_or(&root)
                    .join("shared")
                    .join("qemu-vectors"),
                None => return Err(NotFound { looked_in: vec![] }),
            },
        };
        if candidate.is_dir() {
            Ok(Vectors { dir: candidate })
        } else {
            Err(NotFound {
                looked_in: vec![candidate],
            })
        }
    }

    /// Uses `dir` as the vectors folder without checking it.
    pub fn at(dir: impl Into<PathBuf>) -> Vectors {
        Vectors { dir: dir.into() }
    }

    /// The vectors folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The path of file `name` in the folder (whether or not it exists).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The bytes of file `name`, decompressed when the name ends in `.xz`.
    ///
    /// # Errors
    /// I/O and xz errors, with the file's path in the message.
    pub fn read(&self, name: &str) -> io::Result<Vec<u8>> {
        let path = self.path(name);
        let with_path = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
        let file = std::fs::File::open(&path).map_err(with_path)?;
        let mut out = Vec::new();
        if name.ends_with(".xz") {
            xz2::read::XzDecoder::new(io::BufReader::new(file))
                .read_to_end(&mut out)
                .map_err(with_path)?;
        } else {
            io::BufReader::new(file)
                .read_to_end(&mut out)
                .map_err(with_path)?;
        }
        Ok(out)
    }

    /// File `name` as UTF-8 text (decompressed when it ends in `.xz`).
    ///
    /// # Errors
    /// As [`Vectors::read`], and `InvalidData` when the text is not UTF-8.
    pub fn read_to_string(&self, name: &str) -> io::Result<String> {
        String::from_utf8(self.read(name)?).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", self.path(name).display()),
            )
        })
    }

    /// Every record of `xbzrle-vectors.bin.xz`, in file order (9349 in the
    /// shared set). Layout, from the vectors' README: records repeat with no
    /// header, each `u32 LE old_len`, old page, `u32 LE enc_len`, the XBZRLE
    /// delta as QEMU wrote it, `u32 LE new_len`, new page.
    ///
    /// # Errors
    /// As [`Vectors::read`], and `InvalidData` naming the record when the file
    /// ends inside a record or a page is not [`PAGE_SIZE`] bytes.
    pub fn xbzrle_records(&self) -> io::Result<Vec<XbzrleRecord>> {
        const FILE: &str = "xbzrle-vectors.bin.xz";
        let raw = self.read(FILE)?;
        parse_xbzrle_records(&raw).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", self.path(FILE).display()),
            )
        })
    }
}

/// One record of `xbzrle-vectors.bin`: the page before, QEMU's delta, the
/// page after.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XbzrleRecord {
    /// The page at the destination before the record.
    pub old: Box<Page>,
    /// The XBZRLE delta exactly as QEMU 7.2 wrote it (length not checked here).
    pub delta: Vec<u8>,
    /// The page after applying the record.
    pub new: Box<Page>,
}

/// Parses decompressed `xbzrle-vectors.bin` bytes (layout in
/// [`Vectors::xbzrle_records`]).
///
/// # Errors
/// A message naming the record when the data ends inside a record or a page
/// is not [`PAGE_SIZE`] bytes.
pub fn parse_xbzrle_records(mut data: &[u8]) -> Result<Vec<XbzrleRecord>, String> {
    fn field<'a>(data: &mut &'a [u8], rec: usize, what: &str) -> Result<&'a [u8], String> {
        let (len, rest) = data
            .split_first_chunk::<4>()
            .ok_or_else(|| format!("record {rec}: file ends inside the length of the {what}"))?;
        let len = u32::from_le_bytes(*len) as usize;
        let body = rest
            .get(..len)
            .ok_or_else(|| format!("record {rec}: file ends inside the {what}"))?;
        *data = &rest[len..];
        Ok(body)
    }
    fn page(bytes: &[u8], rec: usize, what: &str) -> Result<Box<Page>, String> {
        let arr: &Page = bytes
            .try_into()
            .map_err(|_| format!("record {rec}: {what} is {} bytes, not 4096", bytes.len()))?;
        Ok(Box::new(*arr))
    }
    let mut out = Vec::new();
    while !data.is_empty() {
        let rec = out.len();
        let old = page(field(&mut data, rec, "old page")?, rec, "old page")?;
        let delta = field(&mut data, rec, "delta")?.to_vec();
        let new = page(field(&mut data, rec, "new page")?, rec, "new page")?;
        out.push(XbzrleRecord { old, delta, new });
    }
    Ok(out)
}

/// The vectors, or `None` after saying on standard error that `test_name`
/// was skipped and how to get them. Panics with the same reason (`FAILED
/// test_name: ...`) instead when `PRECOPY_REQUIRE_VECTORS` is set (see the
/// crate docs).
///
/// The line is written straight to standard error, not through `eprintln!`,
/// so `cargo test` shows it without `--nocapture`.
pub fn vectors_or_skip(test_name: &str) -> Option<Vectors> {
    match Vectors::locate() {
        Ok(v) => Some(v),
        Err(e) => {
            skip_or_fail(test_name, &e);
            None
        }
    }
}

/// Says that `what` was skipped because of `reason` (one `SKIPPED` line on
/// standard error), or panics with `FAILED {what}: {reason} ...` when
/// `PRECOPY_REQUIRE_VECTORS` is set. For callers that locate data themselves.
pub fn skip_or_fail(what: &str, reason: &dyn fmt::Display) {
    if vectors_required() {
        panic!("FAILED {what}: {reason} ({REQUIRE_ENV} is set: missing vectors fail, not skip)");
    }
    let _ = writeln!(io::stderr().lock(), "SKIPPED {what}: {reason}");
}

/// The environment variable that turns a skipped KVM test into a failure
/// (`.ci/kvm.sh` sets it: CI runs where `/dev/kvm` works).
pub const REQUIRE_KVM_ENV: &str = "PRECOPY_REQUIRE_KVM";

/// For a test that needs KVM. `probe` is the caller's check (e.g.
/// `precopy_engine::kvm::KvmVm::probe()`; `Err` says why KVM is unusable).
/// Returns true when KVM can be used; otherwise prints one `SKIPPED
/// {test}: {reason}` line on standard error and returns false, or panics
/// when `PRECOPY_REQUIRE_KVM=1`.
pub fn kvm_or_skip<E: fmt::Display>(test: &str, probe: Result<(), E>) -> bool {
    match probe {
        Ok(()) => true,
        Err(e) => {
            if std::env::var(REQUIRE_KVM_ENV).as_deref() == Ok("1") {
                panic!("FAILED {test}: KVM required ({REQUIRE_KVM_ENV}=1) but {e}");
            }
            let _ = writeln!(io::stderr().lock(), "SKIPPED {test}: {e}");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_this_workspace_root() {
        let root = workspace_root().expect("workspace root");
        assert!(root.join("testsupport").is_dir(), "{}", root.display());
    }

    #[test]
    fn parses_and_rejects_records() {
        let mut raw = Vec::new();
        for (len, fill) in [(4096u32, 1u8), (3, 2), (4096, 3)] {
            raw.extend_from_slice(&len.to_le_bytes());
            raw.extend(std::iter::repeat_n(fill, len as usize));
        }
        let r = parse_xbzrle_records(&raw).unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].delta, [2, 2, 2]);
        assert!(r[0].old.iter().all(|&b| b == 1) && r[0].new.iter().all(|&b| b == 3));
        let e = parse_xbzrle_records(&raw[..raw.len() - 1]).unwrap_err();
        assert!(e.contains("record 0") && e.contains("new page"), "{e}");
        raw[1] = 0; // old_len 4096 -> 0
        assert!(parse_xbzrle_records(&raw).is_err());
    }

    #[test]
    fn not_found_says_where_and_how() {
        let e = NotFound {
            looked_in: vec![PathBuf::from("/x/shared/qemu-vectors")],
        };
        let s = e.to_string();
        assert!(s.contains("/x/shared/qemu-vectors"), "{s}");
        assert!(s.contains(MAKE_VECTORS_SCRIPT) && s.contains("PRECOPY_VECTORS=DIR"));
    }
}
