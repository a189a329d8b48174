//! `precopy incoming --save-ram DIR`: each received RAM block as a raw file, named after the
//! block, with its SHA-256, so that it can be compared with QEMU's `pmemsave` of the source.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use precopy_stream::RamTarget;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::inspect::hex;

/// One saved block.
pub(crate) struct SavedBlock {
    /// The block's id string (e.g. `pc.ram`, `/rom@etc/acpi/tables`).
    pub(crate) block: String,
    /// The file written.
    pub(crate) path: PathBuf,
    /// Its length in bytes (the block's used length).
    pub(crate) bytes: u64,
    /// SHA-256 of the contents, hex.
    pub(crate) sha256: String,
}

impl SavedBlock {
    /// The `--json` object: `{"block", "file", "bytes", "sha256"}`.
    pub(crate) fn json(&self) -> Value {
        json!({
            "block": self.block,
            "file": self.path.display().to_string(),
            "bytes": self.bytes,
            "sha256": self.sha256,
        })
    }
}

/// A file name for block `name`: `/` and anything outside `[A-Za-z0-9._@-]` become `_`,
/// leading `_` dropped, `.ram` appended (`pc.ram` → `pc.ram.ram`,
/// `/rom@etc/acpi/tables` → `rom@etc_acpi_tables.ram`). Block `index` disambiguates a
/// name that two blocks would share after the mapping.
fn file_name(name: &str, index: usize, taken: &[String]) -> String {
    let mapped: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._@-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let mapped = mapped.trim_start_matches(['_', '.']);
    let base = if mapped.is_empty() {
        format!("block{index}")
    } else {
        mapped.to_owned()
    };
    let candidate = format!("{base}.ram");
    if taken.contains(&candidate) {
        format!("{base}.{index}.ram")
    } else {
        candidate
    }
}

/// Creates `dir` if missing and checks that a file can be written in it (before a
/// migration starts).
///
/// # Errors
/// The I/O error, with the path it concerns.
pub(crate) fn prepare(dir: &Path) -> Result<(), String> {
    let at = |p: &Path, e: io::Error| format!("--save-ram: {}: {e}", p.display());
    fs::create_dir_all(dir).map_err(|e| at(dir, e))?;
    let probe = dir.join(format!(".precopy-save-ram-{}", std::process::id()));
    File::create(&probe).map_err(|e| at(dir, e))?;
    fs::remove_file(&probe).map_err(|e| at(&probe, e))
}

/// Writes every block of `ram` into `dir` (created if missing) and returns what was written.
///
/// # Errors
/// The I/O error, with the path it concerns.
pub(crate) fn save_ram<T: RamTarget>(ram: &T, dir: &Path) -> Result<Vec<SavedBlock>, String> {
    let at = |p: &Path, e: io::Error| format!("--save-ram: {}: {e}", p.display());
    fs::create_dir_all(dir).map_err(|e| at(dir, e))?;
    let mut out: Vec<SavedBlock> = Vec::new();
    let mut taken = Vec::new();
    for i in 0..ram.block_count() {
        let Some((name, len)) = ram.block_info(i) else {
            continue;
        };
        let fname = file_name(name, i, &taken);
        taken.push(fname.clone());
        let path = dir.join(&fname);
        let mut w = BufWriter::new(File::create(&path).map_err(|e| at(&path, e))?);
        let mut h = Sha256::new();
        for part in ram.block_parts(i) {
            h.update(part);
            w.write_all(part).map_err(|e| at(&path, e))?;
        }
        w.into_inner()
            .map_err(|e| at(&path, e.into_error()))?
            .sync_all()
            .map_err(|e| at(&path, e))?;
        out.push(SavedBlock {
            block: name.to_owned(),
            path,
            bytes: len,
            sha256: hex(&h.finalize()),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use precopy_stream::{RamBlockInfo, RamImage};

    #[test]
    fn file_names_are_safe_and_distinct() {
        assert_eq!(file_name("pc.ram", 0, &[]), "pc.ram.ram");
        assert_eq!(
            file_name("/rom@etc/acpi/tables", 1, &[]),
            "rom@etc_acpi_tables.ram"
        );
        assert_eq!(file_name("../..", 2, &[]), "block2.ram");
        let taken = vec!["a_b.ram".to_owned()];
        assert_eq!(file_name("a/b", 3, &taken), "a_b.3.ram");
    }

    #[test]
    fn saves_every_block_with_its_digest() {
        let mut img = RamImage::default();
        img.set_blocks(
            &[
                RamBlockInfo::new("pc.ram", 0x3000),
                RamBlockInfo::new("/rom@etc/table-loader", 0x1000),
            ],
            1 << 20,
        )
        .unwrap();
        img.page_mut(0, 0x1000).unwrap().fill(0xab);
        let dir = std::env::temp_dir().join(format!("precopy-save-ram-{}", std::process::id()));
        prepare(&dir).unwrap();
        assert!(prepare(Path::new("/proc/precopy-no-such-dir")).is_err());
        let saved = save_ram(&img, &dir).unwrap();
        assert_eq!(saved.len(), 2);
        let pc = fs::read(&saved[0].path).unwrap();
        assert_eq!(pc.len(), 0x3000);
        assert!(pc[0x1000..0x2000].iter().all(|&b| b == 0xab));
        assert!(pc[..0x1000].iter().all(|&b| b == 0));
        assert_eq!(saved[0].sha256, hex(&Sha256::digest(&pc)));
        assert_eq!(
            saved[1].path.file_name().unwrap(),
            "rom@etc_table-loader.ram"
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
