//! gzip (RFC 1952) framing around miniz_oxide's raw DEFLATE, and the `Accept-Encoding`
//! decision.

use alloc::vec::Vec;

/// CRC-32 (IEEE 802.3, reflected, polynomial 0xEDB88320) lookup table, built at compile time.
const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

/// The CRC-32 that gzip's trailer carries.
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc = CRC_TABLE[((crc ^ byte as u32) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

/// Compresses `data` into a complete gzip member (no file name, no time stamp).
/// `level` is the DEFLATE level, 1 to 9 (clamped).
pub fn compress(data: &[u8], level: u8) -> Vec<u8> {
    let level = level.clamp(1, 9);
    let deflated = miniz_oxide::deflate::compress_to_vec(data, level);
    let mut out = Vec::with_capacity(deflated.len() + 18);
    // ID1 ID2 CM=deflate FLG=0 MTIME=0 XFL OS=unknown
    let xfl = match level {
        1 => 4,
        9 => 2,
        _ => 0,
    };
    out.extend_from_slice(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, xfl, 255]);
    out.extend_from_slice(&deflated);
    out.extend_from_slice(&crc32(data).to_le_bytes());
    // ISIZE is the length modulo 2^32 by definition.
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

/// Why [`decompress`] refused its input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GzipError {
    /// Not a gzip member this decoder understands (magic, method or flags).
    Header,
    /// The DEFLATE stream is corrupt or truncated.
    Deflate,
    /// The trailer is missing or its CRC-32 or length does not match.
    Trailer,
}

impl core::fmt::Display for GzipError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            GzipError::Header => "not a gzip member this decoder reads (magic, method or flags)",
            GzipError::Deflate => "the DEFLATE stream is corrupt or truncated",
            GzipError::Trailer => "the gzip trailer is missing or its CRC-32 or length is wrong",
        })
    }
}

impl core::error::Error for GzipError {}

/// Decompresses one gzip member with no optional header fields, as [`compress`] writes it,
/// checking CRC-32 and length. For tests and host tools that read the guest's responses.
pub fn decompress(data: &[u8]) -> Result<Vec<u8>, GzipError> {
    if data.len() < 18 || data[0] != 0x1f || data[1] != 0x8b || data[2] != 8 || data[3] != 0 {
        return Err(GzipError::Header);
    }
    let body = &data[10..data.len() - 8];
    let plain = miniz_oxide::inflate::decompress_to_vec(body).map_err(|_| GzipError::Deflate)?;
    let trailer = &data[data.len() - 8..];
    let crc = u32::from_le_bytes([trailer[0], trailer[1], trailer[2], trailer[3]]);
    let size = u32::from_le_bytes([trailer[4], trailer[5], trailer[6], trailer[7]]);
    if crc != crc32(&plain) || size != plain.len() as u32 {
        return Err(GzipError::Trailer);
    }
    Ok(plain)
}

/// Whether an `Accept-Encoding` value allows gzip: `gzip` (or `x-gzip`) with a non-zero
/// quality, or `*` with a non-zero quality when gzip is not listed explicitly.
pub fn accepts_gzip(accept_encoding: &str) -> bool {
    let mut explicit: Option<bool> = None;
    let mut wildcard: Option<bool> = None;
    for item in accept_encoding.split(',') {
        let mut parts = item.split(';');
        let coding = parts.next().unwrap_or("").trim();
        let mut allowed = true;
        for param in parts {
            let param = param.trim();
            if let Some((name, value)) = param.split_once('=')
                && name.trim().eq_ignore_ascii_case("q")
            {
                allowed = quality_nonzero(value.trim());
            }
        }
        if coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("x-gzip") {
            explicit = Some(explicit.unwrap_or(false) || allowed);
        } else if coding == "*" {
            wildcard = Some(wildcard.unwrap_or(false) || allowed);
        }
    }
    explicit.or(wildcard).unwrap_or(false)
}

/// Whether a qvalue (`0`, `0.5`, `1.000`, ...) is above zero; malformed values count as zero.
fn quality_nonzero(q: &str) -> bool {
    let mut chars = q.chars();
    match chars.next() {
        Some('1') => chars.all(|c| c == '.' || c == '0'),
        Some('0') => {
            let rest = chars.as_str();
            match rest.strip_prefix('.') {
                Some(frac) => {
                    frac.chars().all(|c| c.is_ascii_digit()) && frac.chars().any(|c| c != '0')
                }
                None => false,
            }
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_of_known_strings() {
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(
            crc32(b"The quick brown fox jumps over the lazy dog"),
            0x414F_A339
        );
    }

    #[test]
    fn round_trip() {
        let mut data = Vec::new();
        for i in 0..5000u32 {
            data.extend_from_slice(format!("metric_{} {}\n", i % 17, i).as_bytes());
        }
        for level in [0, 1, 6, 9, 200] {
            let packed = compress(&data, level);
            assert!(packed.len() < data.len() / 2);
            assert_eq!(decompress(&packed).unwrap(), data);
        }
        assert_eq!(decompress(&compress(b"", 1)).unwrap(), b"");
    }

    #[test]
    fn corrupt_input_is_an_error() {
        let mut packed = compress(b"hello hello hello", 6);
        assert_eq!(decompress(&packed[..5]), Err(GzipError::Header));
        let n = packed.len();
        packed[n - 8] ^= 1;
        assert_eq!(decompress(&packed), Err(GzipError::Trailer));
    }

    #[test]
    fn accept_encoding_rules() {
        assert!(accepts_gzip("gzip"));
        assert!(accepts_gzip("GZIP"));
        assert!(accepts_gzip("deflate, gzip;q=1.0, *;q=0.5"));
        assert!(accepts_gzip("x-gzip"));
        assert!(accepts_gzip("*"));
        assert!(accepts_gzip("br;q=1, gzip;q=0.001"));
        assert!(!accepts_gzip(""));
        assert!(!accepts_gzip("identity"));
        assert!(!accepts_gzip("gzip;q=0"));
        assert!(!accepts_gzip("gzip;q=0.000"));
        assert!(!accepts_gzip("*;q=0"));
        assert!(!accepts_gzip("gzip;q=0, *"));
        assert!(!accepts_gzip("gzip;q=bogus"));
        assert!(!accepts_gzip("deflate, br"));
    }
}
