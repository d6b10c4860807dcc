//! A strict reader of the two exposition formats, for tests and tools: it checks the rules
//! a scraper relies on and returns the families and samples.
//!
//! Checked in both formats: line syntax, metric and label names, label-value escapes,
//! numbers; `# TYPE`/`# HELP` at most once per family and before its samples; families not
//! interleaved; sample names that fit their family's type (`_total` for counters,
//! `_bucket`/`_sum`/`_count` for histograms); histogram buckets with increasing `le`,
//! cumulative counts, a `+Inf` bucket equal to `_count`; counters not negative.
//! OpenMetrics also: only `TYPE`/`UNIT`/`HELP` comments, family names of counters without
//! `_total`, `# UNIT` a suffix of the name, `info` samples ending in `_info` with value 1,
//! and `# EOF` as the last line.

use super::encode::{Format, is_valid_label_name, is_valid_metric_name};
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Sample name (with its suffix, e.g. `_total`, `_bucket`).
    pub name: String,
    /// Labels in the order written, values unescaped.
    pub labels: Vec<(String, String)>,
    /// The value.
    pub value: f64,
}

impl Sample {
    /// The value of label `name`, if present.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The metadata of one family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilyInfo {
    /// Family name as written in `# TYPE` (or the sample name for untyped samples).
    pub name: String,
    /// Type: `counter`, `gauge`, `histogram`, `summary`, `info`, `unknown`, `untyped`...
    pub kind: String,
    /// Help text, unescaped.
    pub help: Option<String>,
    /// Unit (OpenMetrics).
    pub unit: Option<String>,
}

/// A parsed exposition.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Exposition {
    /// Families in order.
    pub families: Vec<FamilyInfo>,
    /// Samples in order.
    pub samples: Vec<Sample>,
}

impl Exposition {
    /// The family called `name`.
    pub fn family(&self, name: &str) -> Option<&FamilyInfo> {
        self.families.iter().find(|f| f.name == name)
    }

    /// The samples called `name` whose labels include every pair of `labels`.
    pub fn find<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples
            .iter()
            .filter(move |s| s.name == name && labels.iter().all(|(k, v)| s.label(k) == Some(*v)))
    }

    /// The value of the one sample called `name` with `labels` (`None` if there is not
    /// exactly one).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut it = self.find(name, labels);
        let first = it.next()?;
        if it.next().is_some() {
            return None;
        }
        Some(first.value)
    }
}

/// What is wrong, and on which line (1-based; 0 for the whole text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// Line number.
    pub line: usize,
    /// The problem.
    pub message: String,
}

impl core::fmt::Display for ParseError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

impl core::error::Error for ParseError {}

/// A parse error at `line` (1-based).
fn err(line: usize, message: impl Into<String>) -> ParseError {
    ParseError {
        line,
        message: message.into(),
    }
}

/// Parses and checks `text` as `format`.
pub fn parse(text: &str, format: Format) -> Result<Exposition, ParseError> {
    let om = format == Format::OpenMetrics;
    if text.contains('\r') {
        return Err(err(0, "carriage return in exposition"));
    }
    if !text.is_empty() && !text.ends_with('\n') {
        return Err(err(0, "exposition does not end with a line feed"));
    }
    let mut exp = Exposition::default();
    // Index in exp.families of the family whose lines we are in.
    let mut current: Option<usize> = None;
    // Whether the current family has had samples (then metadata may not follow).
    let mut current_has_samples = false;
    let mut closed: Vec<String> = Vec::new();
    let mut saw_eof = false;
    let mut hist = HistogramCheck::default();

    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if saw_eof {
            return Err(err(n, "content after # EOF"));
        }
        if let Some(rest) = line.strip_prefix('#') {
            if om && line == "# EOF" {
                saw_eof = true;
                continue;
            }
            let Some(rest) = rest.strip_prefix(' ') else {
                if om {
                    return Err(err(n, "comment lines are not allowed in OpenMetrics"));
                }
                continue;
            };
            let mut parts = rest.splitn(3, ' ');
            let keyword = parts.next().unwrap_or("");
            if !matches!(keyword, "TYPE" | "HELP" | "UNIT") || (!om && keyword == "UNIT") {
                if om {
                    return Err(err(n, format!("unknown metadata line `# {keyword}`")));
                }
                continue;
            }
            let name = parts.next().unwrap_or("");
            let value = parts.next();
            if !is_valid_metric_name(name) {
                return Err(err(n, format!("bad metric name `{name}` in # {keyword}")));
            }
            let idx = match current {
                Some(c) if exp.families[c].name == name && !current_has_samples => c,
                _ => {
                    if exp.families.iter().any(|f| f.name == name) {
                        return Err(err(
                            n,
                            format!("metadata for `{name}` after its samples or repeated"),
                        ));
                    }
                    close_family(&mut exp, current, &mut closed, &mut hist, n)?;
                    exp.families.push(FamilyInfo {
                        name: name.to_string(),
                        kind: String::from(if om { "unknown" } else { "untyped" }),
                        help: None,
                        unit: None,
                    });
                    current = Some(exp.families.len() - 1);
                    current_has_samples = false;
                    exp.families.len() - 1
                }
            };
            let fam = &mut exp.families[idx];
            match keyword {
                "TYPE" => {
                    if fam.kind != if om { "unknown" } else { "untyped" } {
                        return Err(err(n, format!("second # TYPE for `{name}` (repeated)")));
                    }
                    let kind = value.unwrap_or("");
                    let known: &[&str] = if om {
                        &[
                            "counter",
                            "gauge",
                            "histogram",
                            "gaugehistogram",
                            "summary",
                            "info",
                            "stateset",
                            "unknown",
                        ]
                    } else {
                        &["counter", "gauge", "histogram", "summary", "untyped"]
                    };
                    if !known.contains(&kind) {
                        return Err(err(n, format!("unknown type `{kind}`")));
                    }
                    if om && kind == "counter" && name.ends_with("_total") {
                        return Err(err(
                            n,
                            "OpenMetrics counter family names must not end in _total",
                        ));
                    }
                    fam.kind = kind.to_string();
                }
                "HELP" => {
                    if fam.help.is_some() {
                        return Err(err(n, format!("second # HELP for `{name}`")));
                    }
                    fam.help =
                        Some(unescape(value.unwrap_or(""), om, false).map_err(|m| err(n, m))?);
                }
                _ => {
                    let unit = value.unwrap_or("");
                    if fam.unit.is_some() {
                        return Err(err(n, format!("second # UNIT for `{name}`")));
                    }
                    if !unit.is_empty() && !name.ends_with(&format!("_{unit}")) {
                        return Err(err(n, format!("unit `{unit}` is not a suffix of `{name}`")));
                    }
                    fam.unit = Some(unit.to_string());
                }
            }
            continue;
        }
        if line.is_empty() {
            if om {
                return Err(err(n, "empty line in OpenMetrics"));
            }
            continue;
        }
        let sample = parse_sample(line, om).map_err(|m| err(n, m))?;
        // Which family does it belong to?
        let belongs = current.is_some_and(|c| sample_fits(&exp.families[c], &sample.name, om));
        if !belongs {
            // An untyped sample starts its own family.
            let fam_name = sample.name.clone();
            if let Some(c) = current {
                let fam = &exp.families[c];
                if sample.name.starts_with(fam.name.as_str()) && fam.kind != "untyped" {
                    return Err(err(
                        n,
                        format!(
                            "sample `{}` does not fit its {} family `{}`",
                            sample.name, fam.kind, fam.name
                        ),
                    ));
                }
            }
            if exp.families.iter().any(|f| f.name == fam_name) || closed.contains(&fam_name) {
                return Err(err(
                    n,
                    format!("samples of `{fam_name}` interleaved with another family"),
                ));
            }
            if om {
                return Err(err(
                    n,
                    format!("sample `{}` does not fit the family before it", sample.name),
                ));
            }
            close_family(&mut exp, current, &mut closed, &mut hist, n)?;
            exp.families.push(FamilyInfo {
                name: fam_name,
                kind: String::from("untyped"),
                help: None,
                unit: None,
            });
            current = Some(exp.families.len() - 1);
        }
        current_has_samples = true;
        let fam = &exp.families[current.unwrap_or(0)];
        check_value(fam, &sample, om).map_err(|m| err(n, m))?;
        if fam.kind == "histogram" {
            hist.add(&fam.name, &sample).map_err(|m| err(n, m))?;
        }
        exp.samples.push(sample);
    }
    close_family(
        &mut exp,
        current,
        &mut closed,
        &mut hist,
        text.lines().count(),
    )?;
    if om && !saw_eof {
        return Err(err(0, "OpenMetrics exposition does not end with # EOF"));
    }
    Ok(exp)
}

/// Ends the family being read (if any): remembers its name, so that it may not come back
/// later, and finishes its histogram checks.
fn close_family(
    exp: &mut Exposition,
    current: Option<usize>,
    closed: &mut Vec<String>,
    hist: &mut HistogramCheck,
    line: usize,
) -> Result<(), ParseError> {
    if let Some(c) = current {
        closed.push(exp.families[c].name.clone());
    }
    hist.finish().map_err(|m| err(line, m))
}

/// Whether a sample called `name` belongs to family `fam`.
fn sample_fits(fam: &FamilyInfo, name: &str, om: bool) -> bool {
    let base = fam.name.as_str();
    let suffix = match name.strip_prefix(base) {
        Some(s) => s,
        None => return false,
    };
    match (fam.kind.as_str(), om) {
        ("counter", true) => matches!(suffix, "_total" | "_created"),
        ("counter", false) => suffix.is_empty(),
        ("histogram", true) => matches!(suffix, "_bucket" | "_sum" | "_count" | "_created"),
        ("histogram", false) => matches!(suffix, "_bucket" | "_sum" | "_count"),
        ("summary", _) => matches!(suffix, "" | "_sum" | "_count" | "_created"),
        ("gaugehistogram", _) => matches!(suffix, "_bucket" | "_gsum" | "_gcount"),
        ("info", _) => suffix == "_info",
        _ => suffix.is_empty(),
    }
}

/// Checks a sample's value against its family's type (counters and buckets not negative).
fn check_value(fam: &FamilyInfo, s: &Sample, om: bool) -> Result<(), String> {
    let counter_like =
        fam.kind == "counter" || (fam.kind == "histogram" && !s.name.ends_with("_sum"));
    if counter_like && (s.value.is_nan() || s.value < 0.0) {
        return Err(format!("`{}` must not be negative or NaN", s.name));
    }
    if om && fam.kind == "info" && s.value != 1.0 {
        return Err(format!("info sample `{}` must be 1", s.name));
    }
    if fam.kind != "histogram" && s.label("le").is_some() && fam.kind != "unknown" {
        return Err(format!(
            "`{}` has an `le` label but is not a histogram",
            s.name
        ));
    }
    Ok(())
}

/// Checks the buckets of one histogram label set at a time.
#[derive(Default)]
struct HistogramCheck {
    /// The label set (without `le`) being read, and its buckets so far.
    key: Option<(String, Vec<(String, String)>)>,
    last_le: Option<f64>,
    last_count: f64,
    inf: Option<f64>,
    count: Option<f64>,
}

impl HistogramCheck {
    fn add(&mut self, family: &str, s: &Sample) -> Result<(), String> {
        let labels: Vec<(String, String)> = s
            .labels
            .iter()
            .filter(|(k, _)| k != "le")
            .cloned()
            .collect();
        let key = (family.to_string(), labels);
        if self.key.as_ref() != Some(&key) {
            self.finish()?;
            self.key = Some(key);
        }
        if s.name.ends_with("_bucket") {
            let le = s.label("le").ok_or("bucket without le")?;
            let le = parse_float(le).ok_or_else(|| format!("bad le `{le}`"))?;
            if self.last_le.is_some_and(|last| le <= last) {
                return Err(format!("buckets of `{family}` not in increasing le order"));
            }
            if s.value < self.last_count {
                return Err(format!("buckets of `{family}` are not cumulative"));
            }
            self.last_le = Some(le);
            self.last_count = s.value;
            if le == f64::INFINITY {
                self.inf = Some(s.value);
            }
        } else if s.name.ends_with("_count") {
            self.count = Some(s.value);
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), String> {
        if let Some((family, _)) = self.key.take() {
            let inf = self
                .inf
                .ok_or_else(|| format!("histogram `{family}` has no +Inf bucket"))?;
            if let Some(count) = self.count
                && count != inf
            {
                return Err(format!(
                    "`{family}_count` {count} differs from the +Inf bucket {inf}"
                ));
            }
        }
        *self = HistogramCheck::default();
        Ok(())
    }
}

/// Parses `name{labels} value [timestamp]`.
fn parse_sample(line: &str, om: bool) -> Result<Sample, String> {
    let name_end = line
        .find(['{', ' '])
        .ok_or_else(|| format!("no value on `{line}`"))?;
    let name = &line[..name_end];
    if !is_valid_metric_name(name) {
        return Err(format!("bad metric name `{name}`"));
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(r) = rest.strip_prefix('{') {
        rest = r;
        loop {
            if let Some(r) = rest.strip_prefix('}') {
                rest = r;
                break;
            }
            let eq = rest.find('=').ok_or("label without =")?;
            let lname = &rest[..eq];
            if !is_valid_label_name(lname) && lname != "le" {
                return Err(format!("bad label name `{lname}`"));
            }
            rest = rest[eq + 1..]
                .strip_prefix('"')
                .ok_or("label value not quoted")?;
            // Find the closing quote, skipping escapes.
            let bytes = rest.as_bytes();
            let mut j = 0;
            while j < bytes.len() && bytes[j] != b'"' {
                j += if bytes[j] == b'\\' { 2 } else { 1 };
            }
            if j >= bytes.len() {
                return Err("unterminated label value".into());
            }
            let value = unescape(&rest[..j], true, true)?;
            if labels.iter().any(|(k, _): &(String, String)| k == lname) {
                return Err(format!("label `{lname}` twice"));
            }
            labels.push((lname.to_string(), value));
            rest = &rest[j + 1..];
            if let Some(r) = rest.strip_prefix(',') {
                rest = r;
                if om && rest.starts_with('}') {
                    return Err("trailing comma in labels".into());
                }
            } else if !rest.starts_with('}') {
                return Err("expected , or } after a label".into());
            }
        }
    }
    let rest = rest
        .strip_prefix(' ')
        .ok_or("expected a space before the value")?;
    let mut fields = rest.split(' ');
    let value_text = fields.next().unwrap_or("");
    let value = parse_float(value_text).ok_or_else(|| format!("bad value `{value_text}`"))?;
    if let Some(ts) = fields.next() {
        parse_float(ts).ok_or_else(|| format!("bad timestamp `{ts}`"))?;
    }
    if fields.next().is_some() {
        return Err("trailing fields after the value".into());
    }
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// Parses a number as Prometheus does: decimal or exponent floats, `+Inf`, `-Inf`, `NaN`.
pub fn parse_float(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ if s
            .bytes()
            .all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b))
            && !s.is_empty() =>
        {
            s.parse().ok()
        }
        _ => None,
    }
}

/// Undoes the escapes of a label value (`quotes`) or help text.
fn unescape(s: &str, om: bool, quotes: bool) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some('\\') => out.push('\\'),
                Some('n') => out.push('\n'),
                Some('"') if quotes || om => out.push('"'),
                Some(other) => {
                    out.push('\\');
                    out.push(other);
                }
                None => return Err("dangling backslash".into()),
            },
            '"' if quotes => return Err("unescaped quote in label value".into()),
            '\n' => return Err("line feed inside a value".into()),
            c => out.push(c),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_broken_expositions() {
        let bad_om = [
            ("# TYPE a counter\na_total 1\n", "EOF"),
            ("# TYPE a_total counter\na_total 1\n# EOF\n", "_total"),
            ("# TYPE a counter\na 1\n# EOF\n", "fit"),
            ("# TYPE a gauge\n# UNIT a bytes\na 1\n# EOF\n", "suffix"),
            ("# TYPE a gauge\na 1\n# EOF\nb 1\n", "after"),
            (
                "# TYPE h histogram\nh_bucket{le=\"1.0\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\n# EOF\n",
                "cumulative",
            ),
            (
                "# TYPE h histogram\nh_bucket{le=\"1.0\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_count 3\n# EOF\n",
                "differs",
            ),
            (
                "# TYPE h histogram\nh_bucket{le=\"1.0\"} 1\nh_count 1\n# EOF\n",
                "+Inf",
            ),
            (
                "# TYPE a gauge\na{x=\"1\"} 1\n# TYPE b gauge\nb 1\na{x=\"2\"} 1\n# EOF\n",
                "interleaved",
            ),
            ("# comment\n# EOF\n", "comment"),
            ("# TYPE a gauge\na{x=\"1} 1\n# EOF\n", "unterminated"),
            ("# TYPE a gauge\na 1x\n# EOF\n", "bad value"),
            ("# TYPE a info\na_info 2\n# EOF\n", "must be 1"),
        ];
        for (text, want) in bad_om {
            let e = parse(text, Format::OpenMetrics).unwrap_err();
            assert!(e.message.contains(want), "{text:?}: got {e}, want {want}");
        }
        let bad_text = [
            ("a_total 1\nb 1\na_total 2\n", "interleaved"),
            ("# TYPE c counter\nc -1\n", "negative"),
            ("a{b=\"x\",b=\"y\"} 1\n", "twice"),
            ("a{1b=\"x\"} 1\n", "label name"),
            ("a 1", "line feed"),
            ("# TYPE a gauge\n# TYPE a gauge\na 1\n", "repeated"),
        ];
        for (text, want) in bad_text {
            let e = parse(text, Format::Text).unwrap_err();
            assert!(e.message.contains(want), "{text:?}: got {e}, want {want}");
        }
        // Valid corner cases.
        let ok = parse(
            "a{b=\"q\\\"\\\\\\n\"} +Inf 123\n\n# free comment\n",
            Format::Text,
        )
        .unwrap();
        assert_eq!(ok.samples[0].label("b"), Some("q\"\\\n"));
        assert_eq!(ok.samples[0].value, f64::INFINITY);
    }
}
