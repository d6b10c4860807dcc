//! The text of an exposition: formats, content negotiation, escaping and number rendering.
//!
//! Two formats are written: Prometheus text format 0.0.4 and OpenMetrics 1.0 text. They differ
//! in a few places, all handled by the registry's encoder with the helpers here:
//! - OpenMetrics ends with `# EOF`, names counter families without `_total` (the samples keep
//!   it), may carry `# UNIT`, and also escapes `"` in `# HELP` text.
//! - Both escape label values (`\\`, `\"`, `\n`).
//!
//! Numbers: integers are written as integers; floats in the "canonical" rendering that the
//! OpenMetrics specification asks for in `le` labels (Go's `%g` with `.0` appended when there
//! is neither a point nor an exponent), with `+Inf`, `-Inf` and `NaN`. Prometheus parses every
//! such string. Nothing here allocates.

use core::fmt::{self, Write};

/// An exposition format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// Prometheus text format 0.0.4.
    Text,
    /// OpenMetrics 1.0 text format.
    OpenMetrics,
}

/// `Content-Type` of the Prometheus text format 0.0.4.
pub const CONTENT_TYPE_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
/// `Content-Type` of the OpenMetrics 1.0 text format.
pub const CONTENT_TYPE_OPENMETRICS: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

impl Format {
    /// The `Content-Type` header value of a response in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Text => CONTENT_TYPE_TEXT,
            Format::OpenMetrics => CONTENT_TYPE_OPENMETRICS,
        }
    }
}

/// Picks the format for a scraper's `Accept` header value (empty when the header is absent).
///
/// OpenMetrics is chosen when the header accepts `application/openmetrics-text` (version
/// absent, `1.0.0` or `0.0.1`, whose text we also satisfy) with a quality above zero and at
/// least as high as the best quality given to the plain-text format (`text/plain`, `text/*`
/// or `*/*`). Everything else, including a malformed header, gets the text format 0.0.4,
/// which every Prometheus understands.
pub fn negotiate(accept: &str) -> Format {
    let mut best_om: Option<u32> = None;
    let mut best_text: Option<u32> = None;
    for range in accept.split(',') {
        let mut parts = range.split(';');
        let media = parts.next().unwrap_or("").trim();
        let mut q = 1000u32;
        let mut version_ok = true;
        for param in parts {
            let Some((key, value)) = param.split_once('=') else {
                continue;
            };
            let key = key.trim();
            let value = value.trim().trim_matches('"');
            if key.eq_ignore_ascii_case("q") {
                q = parse_quality(value).unwrap_or(0);
            } else if key.eq_ignore_ascii_case("version") {
                version_ok = matches!(value, "1.0.0" | "0.0.1" | "0.0.4");
            }
        }
        let slot = if media.eq_ignore_ascii_case("application/openmetrics-text") {
            if !version_ok {
                continue;
            }
            &mut best_om
        } else if media.eq_ignore_ascii_case("text/plain")
            || media.eq_ignore_ascii_case("text/*")
            || media == "*/*"
        {
            &mut best_text
        } else {
            continue;
        };
        *slot = Some(slot.map_or(q, |old| old.max(q)));
    }
    match best_om {
        Some(om) if om > 0 && om >= best_text.unwrap_or(0) => Format::OpenMetrics,
        _ => Format::Text,
    }
}

/// Parses an HTTP quality value (`0`, `0.5`, `1.000`) into thousandths.
fn parse_quality(s: &str) -> Option<u32> {
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if int.len() != 1 || frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let whole = match int {
        "0" => 0,
        "1" => 1000,
        _ => return None,
    };
    let mut thousandths = 0u32;
    for (i, b) in frac.bytes().enumerate() {
        thousandths += u32::from(b - b'0') * [100, 10, 1][i];
    }
    Some((whole + thousandths).min(1000))
}

/// Writes `s` as a label value: `\` → `\\`, `"` → `\"`, line feed → `\n`.
pub fn write_label_value<W: Write + ?Sized>(out: &mut W, s: &str) -> fmt::Result {
    write_escaped(out, s, true)
}

/// Writes `s` as `# HELP` text: `\` → `\\` and line feed → `\n`; OpenMetrics also escapes `"`.
pub fn write_help<W: Write + ?Sized>(out: &mut W, s: &str, format: Format) -> fmt::Result {
    write_escaped(out, s, format == Format::OpenMetrics)
}

fn write_escaped<W: Write + ?Sized>(out: &mut W, s: &str, quotes: bool) -> fmt::Result {
    let mut start = 0;
    for (i, c) in s.char_indices() {
        let escaped = match c {
            '\\' => "\\\\",
            '\n' => "\\n",
            '"' if quotes => "\\\"",
            _ => continue,
        };
        out.write_str(&s[start..i])?;
        out.write_str(escaped)?;
        start = i + c.len_utf8();
    }
    out.write_str(&s[start..])
}

/// Writes a float the way Go's `%g` does, with `.0` appended when the result has neither a
/// decimal point nor an exponent (OpenMetrics' canonical numbers): `0.0`, `0.001`, `1.0`,
/// `100000.0`, `1e+06`, `1e-05`, `+Inf`, `-Inf`, `NaN`. Shortest round-trip digits.
pub fn write_float<W: Write + ?Sized>(out: &mut W, v: f64) -> fmt::Result {
    if v.is_nan() {
        return out.write_str("NaN");
    }
    if v.is_infinite() {
        return out.write_str(if v > 0.0 { "+Inf" } else { "-Inf" });
    }
    if v == 0.0 {
        return out.write_str(if v.is_sign_negative() { "-0.0" } else { "0.0" });
    }
    // Rust's `{:e}` gives the shortest round-trip digits: "1.2345e6", "-5e-7".
    let mut buf = StackBuf::<40>::new();
    write!(buf, "{v:e}")?;
    let text = buf.as_str();
    let (mantissa, exp) = text.split_once('e').ok_or(fmt::Error)?;
    let exp: i32 = exp.parse().map_err(|_| fmt::Error)?;
    let (negative, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => (true, m),
        None => (false, mantissa),
    };
    // The significant digits, without the point.
    let mut digits = StackBuf::<24>::new();
    for c in mantissa.chars().filter(|c| *c != '.') {
        digits.write_char(c)?;
    }
    let digits = digits.as_str();
    if negative {
        out.write_char('-')?;
    }
    if !(-4..6).contains(&exp) {
        // Exponent form: d[.ddd]e±XX (at least two exponent digits, as Go writes them).
        out.write_str(&digits[..1])?;
        if digits.len() > 1 {
            out.write_char('.')?;
            out.write_str(&digits[1..])?;
        }
        let sign = if exp < 0 { '-' } else { '+' };
        let mag = exp.unsigned_abs();
        if mag < 10 {
            write!(out, "e{sign}0{mag}")
        } else {
            write!(out, "e{sign}{mag}")
        }
    } else if exp < 0 {
        out.write_str("0.")?;
        for _ in 0..(-exp - 1) {
            out.write_char('0')?;
        }
        out.write_str(digits)
    } else {
        let int_len = exp as usize + 1;
        if digits.len() > int_len {
            out.write_str(&digits[..int_len])?;
            out.write_char('.')?;
            out.write_str(&digits[int_len..])
        } else {
            out.write_str(digits)?;
            for _ in digits.len()..int_len {
                out.write_char('0')?;
            }
            out.write_str(".0")
        }
    }
}

/// A small fixed-capacity string on the stack, so number rendering never allocates.
struct StackBuf<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> StackBuf<N> {
    fn new() -> Self {
        StackBuf {
            buf: [0; N],
            len: 0,
        }
    }

    fn as_str(&self) -> &str {
        // Only whole `&str`s are ever appended, so the bytes are valid UTF-8.
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
}

impl<const N: usize> Write for StackBuf<N> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len.checked_add(s.len()).ok_or(fmt::Error)?;
        if end > N {
            return Err(fmt::Error);
        }
        self.buf[self.len..end].copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// Whether `name` is a valid metric name: `[a-zA-Z_:][a-zA-Z0-9_:]*`.
pub fn is_valid_metric_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_' || b == b':')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':')
}

/// Whether `name` is a valid label name: `[a-zA-Z_][a-zA-Z0-9_]*`, not starting with `__`.
pub fn is_valid_label_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !name.starts_with("__")
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::String;

    fn float(v: f64) -> String {
        let mut s = String::new();
        write_float(&mut s, v).unwrap();
        s
    }

    #[test]
    fn floats_render_canonically() {
        // The examples of the OpenMetrics specification's "Canonical Numbers".
        let cases: &[(f64, &str)] = &[
            (0.0, "0.0"),
            (0.001, "0.001"),
            (0.002, "0.002"),
            (0.01, "0.01"),
            (0.1, "0.1"),
            (0.9, "0.9"),
            (0.95, "0.95"),
            (0.99, "0.99"),
            (0.999, "0.999"),
            (1.0, "1.0"),
            (1.7, "1.7"),
            (10.0, "10.0"),
            (1e-10, "1e-10"),
            (1e-9, "1e-09"),
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (100000.0, "100000.0"),
            (1e6, "1e+06"),
            (1e10, "1e+10"),
            (1e23, "1e+23"),
            (1.1e23, "1.1e+23"),
            (2.5e-5, "2.5e-05"),
            (123456.5, "123456.5"),
            (1234567.5, "1.2345675e+06"),
            (-0.25, "-0.25"),
            (-3.0, "-3.0"),
            (f64::INFINITY, "+Inf"),
            (f64::NEG_INFINITY, "-Inf"),
            (f64::NAN, "NaN"),
            (f64::MAX, "1.7976931348623157e+308"),
            (5e-324, "5e-324"),
        ];
        for (v, want) in cases {
            assert_eq!(float(*v), *want, "rendering of {v:e}");
            if v.is_finite() {
                assert_eq!(
                    float(*v).parse::<f64>().unwrap(),
                    *v,
                    "round trip of {want}"
                );
            }
        }
    }

    #[test]
    fn label_values_and_help_are_escaped() {
        let mut s = String::new();
        write_label_value(&mut s, "a\\b\"c\nd é").unwrap();
        assert_eq!(s, "a\\\\b\\\"c\\nd é");
        let mut h = String::new();
        write_help(&mut h, "x \"q\" \\ \n", Format::Text).unwrap();
        assert_eq!(h, "x \"q\" \\\\ \\n");
        let mut h = String::new();
        write_help(&mut h, "x \"q\" \\ \n", Format::OpenMetrics).unwrap();
        assert_eq!(h, "x \\\"q\\\" \\\\ \\n");
    }

    #[test]
    fn negotiation_follows_accept() {
        // What Prometheus 2.x sends.
        let prom = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(negotiate(prom), Format::OpenMetrics);
        assert_eq!(negotiate(""), Format::Text);
        assert_eq!(negotiate("*/*"), Format::Text);
        assert_eq!(negotiate("text/plain"), Format::Text);
        assert_eq!(
            negotiate("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            Format::OpenMetrics
        );
        assert_eq!(
            negotiate("Application/OpenMetrics-Text"),
            Format::OpenMetrics
        );
        assert_eq!(
            negotiate("application/openmetrics-text;q=0.4, text/plain;q=0.9"),
            Format::Text
        );
        assert_eq!(negotiate("application/openmetrics-text;q=0"), Format::Text);
        assert_eq!(
            negotiate("application/openmetrics-text;version=2.0.0"),
            Format::Text
        );
        // Malformed input never panics and falls back to text.
        for junk in [
            ";;;",
            "q=",
            "application/openmetrics-text;q=abc",
            ",,,",
            "\u{0}é;q=1.5",
        ] {
            let _ = negotiate(junk);
        }
        assert_eq!(negotiate("application/openmetrics-text;q=2"), Format::Text);
        assert_eq!(Format::Text.content_type(), CONTENT_TYPE_TEXT);
        assert_eq!(Format::OpenMetrics.content_type(), CONTENT_TYPE_OPENMETRICS);
    }

    #[test]
    fn names_are_validated() {
        assert!(is_valid_metric_name("qcow_metal_disk_read_bytes_total"));
        assert!(is_valid_metric_name("Mirage_qcow_reads"));
        assert!(!is_valid_metric_name("1abc"));
        assert!(!is_valid_metric_name("a-b"));
        assert!(!is_valid_metric_name(""));
        assert!(is_valid_label_name("disk"));
        assert!(!is_valid_label_name("__name__"));
        assert!(!is_valid_label_name("a:b"));
    }
}
