//! `precopy migrate --page-compression ...` and `precopy incoming` reading what it sent.

mod common;
use common::{json, precopy, stderr};

#[test]
fn every_method_migrates_and_verifies_with_per_method_stats() {
    for mode in ["none", "xbzrle", "zstd", "zlib", "auto"] {
        let o = precopy(&[
            "migrate",
            "--mem",
            "8M",
            "--dirty-rate",
            "2000",
            "--workload",
            "zeroing",
            "--max-bandwidth",
            "64M",
            "--page-compression",
            mode,
            "--multifd-zstd-level",
            "2",
            "--multifd-zlib-level",
            "1",
            "--json",
        ]);
        assert_eq!(o.status.code(), Some(0), "{mode}: {}", stderr(&o));
        let v = json(&o);
        assert_eq!(v["verified"], true, "{mode}: {v}");
        let p = &v["page-compression"];
        assert_eq!(p["method"], mode, "{v}");
        for m in ["none", "xbzrle", "zstd", "zlib"] {
            for k in ["pages", "bytes", "cpu-time-ns"] {
                assert!(p[m][k].is_u64(), "{mode}: {m}.{k} in {p}");
            }
        }
        let xbzrle_on = v["xbzrle-cache"].is_object();
        assert_eq!(xbzrle_on, mode == "xbzrle" || mode == "auto", "{mode}: {v}");
    }
}

#[test]
fn the_text_summary_has_a_line_per_method() {
    let o = precopy(&[
        "migrate",
        "--mem",
        "8M",
        "--dirty-rate",
        "0",
        "--page-compression",
        "zstd",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("page compression: zstd"), "{out}");
    for m in ["none", "xbzrle", "zstd", "zlib"] {
        assert!(out.contains(&format!("page compression {m}: ")), "{out}");
    }
}

#[test]
fn a_migration_without_page_compression_says_nothing_of_it() {
    let o = precopy(&["migrate", "--mem", "8M", "--dirty-rate", "0"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("Migration status: completed"), "{out}");
    assert!(!out.contains("page compression"), "{out}");
}

#[test]
fn incoming_loads_a_zstd_stream_and_verifies_it() {
    let dir = std::env::temp_dir().join(format!("precopy-pc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("zstd.mig");
    let to = format!("file:{}", file.display());
    let o = precopy(&[
        "migrate",
        "--mem",
        "8M",
        "--dirty-rate",
        "1000",
        "--workload",
        "zeroing",
        "--page-compression",
        "zstd",
        "--to",
        &to,
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v = json(&o);
    assert_eq!(v["verified"], true);
    let zstd_pages = v["page-compression"]["zstd"]["pages"].as_u64().unwrap();
    assert!(zstd_pages > 0, "{v}");
    let o = precopy(&["incoming", &to, "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v = json(&o);
    assert_eq!(v["verified"], true, "{v}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn unknown_methods_and_levels_are_refused() {
    let o = precopy(&["migrate", "--mem", "8M", "--page-compression", "lz4"]);
    assert_ne!(o.status.code(), Some(0));
    assert!(stderr(&o).contains("lz4"), "{}", stderr(&o));
    let o = precopy(&[
        "migrate",
        "--mem",
        "8M",
        "--dirty-rate",
        "0",
        "--page-compression",
        "zstd",
        "--multifd-zstd-level",
        "21",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("multifd-zstd-level"), "{}", stderr(&o));
}
