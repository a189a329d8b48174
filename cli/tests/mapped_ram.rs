//! mapped-ram through the command line: `migrate --mapped-ram on --to file:`, `inspect` and
//! `incoming file:` of the file it wrote, and of QEMU 10's file (the stream crate's fixture).

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

fn precopy(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_precopy"))
        .args(args)
        .output()
        .expect("run precopy")
}

fn json(o: &Output) -> Value {
    let s = String::from_utf8_lossy(&o.stdout);
    serde_json::from_str(s.trim()).unwrap_or_else(|e| {
        panic!(
            "{e}: stdout {s:?} stderr {:?}",
            String::from_utf8_lossy(&o.stderr)
        )
    })
}

#[test]
fn migrate_to_a_mapped_ram_file_then_inspect_and_incoming() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("vm.mr");
    let uri = format!("file:{}", f.display());
    let o = precopy(&[
        "migrate",
        "--mem",
        "64M",
        "--dirty-rate",
        "20000",
        "--mapped-ram",
        "on",
        "--to",
        &uri,
        "--json",
    ]);
    assert!(o.status.success(), "{o:?}");
    let v = json(&o);
    assert_eq!(v["status"], "completed");
    assert_eq!(v["verified"], true);
    // 25 % of the simulated guest's pages start zero: holes, not disk blocks.
    let disk = v["disk-usage"].as_u64().unwrap();
    assert!(disk < 64 << 20, "disk usage {disk}");
    assert!(v["ram"]["duplicate"].as_u64().unwrap() > 0);

    let o = precopy(&["inspect", "--json", f.to_str().unwrap()]);
    assert!(o.status.success(), "{o:?}");
    let i = json(&o);
    assert_eq!(i["format"], "mapped-ram");
    assert_eq!(i["blocks"][0]["name"], "pc.ram");
    assert_eq!(i["zero_holes"], v["ram"]["duplicate"]);
    assert_eq!(i["pages_present"], v["ram"]["normal"]);
    assert_eq!(i["eof"], true);

    let o = precopy(&["incoming", "--json", &uri]);
    assert!(o.status.success(), "{o:?}");
    let r = json(&o);
    assert_eq!(r["status"], "completed");
    assert_eq!(r["verified"], true);

    // One byte of page data changed: incoming's digest check fails.
    let mut b = std::fs::read(&f).unwrap();
    let m = precopy_stream::mapped_ram::MappedRamFile::parse(&b[..], &Default::default()).unwrap();
    let p = (0..m.blocks[0].pages())
        .find(|&p| m.blocks[0].is_present(p))
        .unwrap();
    let at = m.blocks[0].page_file_offset(p) as usize + 3;
    b[at] ^= 0x40;
    std::fs::write(&f, &b).unwrap();
    let o = precopy(&["incoming", "--json", &uri]);
    assert!(!o.status.success());
    assert_eq!(json(&o)["verified"], false);

    // A bitmap offset past the end: inspect names the field's offset.
    let h = m.blocks[0].header_offset as usize + 12;
    b[h..h + 8].copy_from_slice(&u64::MAX.to_be_bytes());
    std::fs::write(&f, &b).unwrap();
    let o = precopy(&["inspect", "--json", f.to_str().unwrap()]);
    assert!(!o.status.success());
    let e = json(&o);
    assert_eq!(e["offset"], h as u64);
    assert!(e["error-desc"].as_str().unwrap().contains("bitmap"), "{e}");
}

#[test]
fn qemu10_mapped_ram_file_inspects_and_loads() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../stream/tests/data");
    let z = std::fs::read(data.join("qemu10-mapped-ram.bin.zst")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("qemu.mr");
    std::fs::write(&f, zstd::decode_all(&z[..]).unwrap()).unwrap();
    let expected = std::fs::read_to_string(data.join("qemu10-mapped-ram.expected")).unwrap();

    let o = precopy(&["inspect", "--json", f.to_str().unwrap()]);
    assert!(o.status.success(), "{o:?}");
    let i = json(&o);
    assert_eq!(i["machine_type"], "pc-i440fx-10.0");
    let blocks = i["blocks"].as_array().unwrap();
    for (b, line) in blocks
        .iter()
        .zip(expected.lines().filter(|l| l.starts_with("block ")))
    {
        let e: Vec<&str> = line.split(' ').collect();
        assert_eq!(b["name"], e[1]);
        assert_eq!(b["pages_present"].to_string(), e[5]);
        assert_eq!(b["sha256"], e[6]);
    }
    assert_eq!(i["sections"][0]["name"], "timer");

    let uri = format!("file:{}", f.display());
    // QEMU's file has no RAM digest: refused with verification on, loaded with it off.
    let o = precopy(&["incoming", "--json", &uri]);
    assert!(!o.status.success());
    let o = precopy(&["incoming", "--json", "--verify", "off", &uri]);
    assert!(o.status.success(), "{o:?}");
    let r = json(&o);
    assert_eq!(r["status"], "completed");
    assert_eq!(r["ram-total"], 134750208);
}
