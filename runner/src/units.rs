//! Byte sizes on the command line: `1G`, `64K`, `512M`, `1GiB`, `4096`.

/// Parses a size with an optional binary suffix (K, M, G, T, P, E; `KiB`/`KB`/`k` accepted).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, suffix) = t.split_at(split);
    if digits.is_empty() {
        return Err(format!("`{text}` is not a size (examples: 4096, 64K, 1G)"));
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{text}`: the number is too large"))?;
    let shift = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        "p" | "pb" | "pib" => 50,
        "e" | "eb" | "eib" => 60,
        other => {
            return Err(format!(
                "`{text}`: unknown unit `{other}` (use K, M, G, T, P or E)"
            ));
        }
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("`{text}` does not fit in 64 bits"))
}

/// Formats a byte count with the largest binary unit that divides it (`1 GiB`, `65 KiB`,
/// `1000 B`), or with one decimal when none does.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut unit = 0;
    let mut v = bytes;
    while unit < UNITS.len() - 1 && v >= 1024 && v.is_multiple_of(1024) {
        v /= 1024;
        unit += 1;
    }
    if v < 1024 || unit == UNITS.len() - 1 {
        return format!("{v} {}", UNITS[unit]);
    }
    let mut f = bytes as f64;
    let mut unit = 0;
    while f >= 1024.0 && unit < UNITS.len() - 1 {
        f /= 1024.0;
        unit += 1;
    }
    format!("{f:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("64k"), Ok(65536));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2M"), Ok(2 << 20));
        assert_eq!(parse_size("1P"), Ok(1 << 50));
        assert!(parse_size("").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("1X").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("16E").is_err());
        assert!(parse_size("99999999999999999999999").is_err());
    }

    #[test]
    fn sizes_format() {
        assert_eq!(format_size(1 << 30), "1 GiB");
        assert_eq!(format_size(65536), "64 KiB");
        assert_eq!(format_size(1000), "1000 B");
        assert_eq!(format_size(1536 * 1024 + 1), "1.5 MiB");
    }
}
