//! Size options: `256M`, `1G`, `65536`, as QEMU spells sizes.

/// Parse a size: a whole number with an optional binary suffix K, M, G, T (optionally
/// followed by `iB` or `B`), as QEMU's size options: `256M`, `1G`, `65536`. Every size
/// option of the CLI uses this parser; fractions (`1.5G`) are refused.
pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suf) = t.split_at(digits);
    if suf.starts_with(['.', ',']) {
        return Err(format!(
            "{s:?}: fractions are not accepted; give a whole number of a smaller unit (e.g. 1536M for 1.5G)"
        ));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 4096, 256M, 1G)"))?;
    let suf = suf.trim_end_matches("iB").trim_end_matches('B');
    let shift = match suf {
        "" => 0,
        "K" | "k" => 10,
        "M" | "m" => 20,
        "G" | "g" => 30,
        "T" | "t" => 40,
        _ => return Err(format!("{s:?}: unknown size suffix (use K, M, G or T)")),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("256M").unwrap(), 256 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert!(parse_size("1X").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert_eq!(parse_size("2T").unwrap(), 2 << 40);
        assert!(
            parse_size("1.5G")
                .unwrap_err()
                .contains("fractions are not accepted")
        );
    }
}
