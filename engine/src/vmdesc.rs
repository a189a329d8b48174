//! The RAM digest and the VM description: what the source appends after EOF so the
//! destination can check the RAM it built. Used by both sides.
//!
//! The VM description is QEMU's JSON trailer (`page_size`, `devices`); we add our own object
//! under [`VMDESC_KEY`] with the RAM blocks and the digest:
//!
//! ```json
//! {"page_size":4096,"devices":[],
//!  "precopy":{"ram-digest":{"algorithm":"blake3","value":"<hex>"},
//!             "blocks":[{"name":"pc.ram","used-length":1073741824}]}}
//! ```
//!
//! The digest is BLAKE3 over, for each block in order, the u8 name length, the name, the
//! be64 used length, then the block's bytes; lowercase hex. A QEMU stream carries none.

use precopy_stream::RamTarget;
use xbzrle::{PAGE_SIZE, Page};

use crate::guest::{Guest, GuestError, RamBlockInfo, block_pages};

/// Key of our data in the VM description JSON.
pub const VMDESC_KEY: &str = "precopy";

/// The digest of a guest's RAM (see the [module docs](self)), read page by page through
/// [`GuestRam::read_page`](crate::GuestRam::read_page); the guest must be stopped for the
/// result to mean anything.
///
/// Errors: the guest's [`GuestError`].
pub fn ram_digest(guest: &dyn Guest, blocks: &[RamBlockInfo]) -> Result<String, GuestError> {
    const CHUNK_PAGES: usize = 512;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; CHUNK_PAGES * PAGE_SIZE];
    for (i, b) in blocks.iter().enumerate() {
        digest_block_header(&mut h, &b.name, b.used_length);
        let pages = block_pages(b);
        let mut p = 0;
        while p < pages {
            let n = (pages - p).min(CHUNK_PAGES as u64) as usize;
            for (k, chunk) in buf[..n * PAGE_SIZE].chunks_exact_mut(PAGE_SIZE).enumerate() {
                let page: &mut Page = chunk.try_into().expect("page-sized chunk");
                guest.read_page(i, p + k as u64, page)?;
            }
            h.update_rayon(&buf[..n * PAGE_SIZE]);
            p += n as u64;
        }
    }
    Ok(h.finalize().to_hex().to_string())
}

/// The digest of a received RAM image, in the layout of [`ram_digest`].
pub fn image_digest<T: RamTarget + ?Sized>(image: &T) -> String {
    let mut h = blake3::Hasher::new();
    for b in 0..image.block_count() {
        let Some((name, len)) = image.block_info(b) else {
            continue;
        };
        digest_block_header(&mut h, name, len);
        for part in image.block_parts(b) {
            h.update_rayon(part);
        }
    }
    h.finalize().to_hex().to_string()
}

/// Feed one block header into a RAM digest.
pub(crate) fn digest_block_header(h: &mut blake3::Hasher, name: &str, used_length: u64) {
    h.update(&[name.len() as u8]);
    h.update(name.as_bytes());
    h.update(&used_length.to_be_bytes());
}

/// The VM description JSON the source writes after EOF: `blocks` and their `digest`.
pub fn vm_description(blocks: &[RamBlockInfo], digest: &str) -> String {
    let blocks: Vec<_> = blocks
        .iter()
        .map(|b| serde_json::json!({"name": b.name, "used-length": b.used_length}))
        .collect();
    serde_json::json!({
        "page_size": PAGE_SIZE,
        "devices": [],
        VMDESC_KEY: {
            "ram-digest": {"algorithm": "blake3", "value": digest},
            "blocks": blocks,
        }
    })
    .to_string()
}

/// The digest the source wrote into a VM description, if any (`None` for a QEMU stream, or
/// an algorithm other than BLAKE3).
pub fn digest_from_vm_description(desc: &serde_json::Value) -> Option<&str> {
    let d = desc.get(VMDESC_KEY)?.get("ram-digest")?;
    if d.get("algorithm")?.as_str()? != "blake3" {
        return None;
    }
    d.get("value")?.as_str()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_description_carries_the_digest_back() {
        let blocks = [RamBlockInfo::new("pc.ram", 4096)];
        let desc: serde_json::Value =
            serde_json::from_str(&vm_description(&blocks, "abc")).unwrap();
        assert_eq!(digest_from_vm_description(&desc), Some("abc"));
        assert_eq!(desc["page_size"], 4096);
        assert_eq!(desc[VMDESC_KEY]["blocks"][0]["used-length"], 4096);
        assert_eq!(digest_from_vm_description(&serde_json::json!({})), None);
    }
}
