//! Metric families and the registry that encodes them.
//!
//! A [`Family`] has a name, a help text, optionally a unit, fixed label names, and children:
//! one metric per label-value set, created up front and shared (`Arc`) with the code that
//! updates them. Label sets are rendered (and escaped) once, when a child is created, so a
//! scrape writes each sample with no work beyond formatting its number.
//!
//! A [`Registry`] holds [`Collector`]s (families, or anything that can write itself through
//! an [`Encoder`]) and encodes them in either [`Format`].

use super::encode::{
    Format, is_valid_label_name, is_valid_metric_name, write_float, write_help, write_label_value,
};
use super::primitives::{Counter, FloatGauge, Gauge, Histogram};
use alloc::boxed::Box;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt::{self, Write};

/// What a family holds, which decides its sample names and `# TYPE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `name_total` samples; `# TYPE name_total counter` in text 0.0.4, `# TYPE name counter`
    /// in OpenMetrics.
    Counter,
    /// `name` samples, `# TYPE name gauge`.
    Gauge,
    /// `name_bucket{le=..}`, `name_sum`, `name_count`.
    Histogram,
    /// `name_info{..} 1`: a gauge named `name_info` in text 0.0.4, an `info` family in
    /// OpenMetrics.
    Info,
    /// A counter whose samples carry no `_total` (ocaml-qcow's `Mirage_qcow_*`): a `counter`
    /// in text 0.0.4 as ocaml-qcow exposes it, `unknown` in OpenMetrics (which requires
    /// `_total` on counters), so the series keep their names in both.
    LegacyCounter,
}

impl Kind {
    /// What every sample name of a family of this kind ends with, in both formats
    /// (histograms have several and are written by [`Histogram`]'s own encoder).
    pub const fn sample_suffix(self) -> &'static str {
        match self {
            Kind::Counter => "_total",
            Kind::Info => "_info",
            Kind::Gauge | Kind::Histogram | Kind::LegacyCounter => "",
        }
    }
}

/// The description of a family: everything but its children.
#[derive(Debug, Clone)]
pub struct Meta {
    /// Family name. For [`Kind::Counter`] without `_total`; for [`Kind::Info`] without
    /// `_info`.
    pub name: &'static str,
    /// Help text (escaped when written).
    pub help: &'static str,
    /// The kind of the family.
    pub kind: Kind,
    /// Unit, such as `bytes` or `seconds`; written as `# UNIT` in OpenMetrics when the
    /// family name ends with `_<unit>`, as the specification requires.
    pub unit: Option<&'static str>,
}

impl Meta {
    /// A counter family `name` (without `_total`).
    pub const fn counter(name: &'static str, help: &'static str) -> Meta {
        Meta {
            name,
            help,
            kind: Kind::Counter,
            unit: None,
        }
    }

    /// A gauge family `name`.
    pub const fn gauge(name: &'static str, help: &'static str) -> Meta {
        Meta {
            name,
            help,
            kind: Kind::Gauge,
            unit: None,
        }
    }

    /// A legacy counter family `name`, written without `_total` ([`Kind::LegacyCounter`]).
    pub const fn legacy_counter(name: &'static str, help: &'static str) -> Meta {
        Meta {
            name,
            help,
            kind: Kind::LegacyCounter,
            unit: None,
        }
    }

    /// The same family with a unit (`bytes`, `seconds`).
    pub const fn unit(mut self, unit: &'static str) -> Meta {
        self.unit = Some(unit);
        self
    }
}

/// A number as it is written.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    /// An unsigned integer.
    U64(u64),
    /// A signed integer.
    I64(i64),
    /// A float (canonical rendering, `+Inf`, `NaN`).
    F64(f64),
}

/// Writes the samples of one exposition. [`Collector`]s call it; it knows the format.
pub struct Encoder<'a> {
    out: &'a mut dyn Write,
    format: Format,
}

impl<'a> Encoder<'a> {
    /// An encoder writing `format` into `out`.
    pub fn new(out: &'a mut dyn Write, format: Format) -> Self {
        Encoder { out, format }
    }

    /// The format being written.
    pub fn format(&self) -> Format {
        self.format
    }

    /// Writes the `# TYPE`, `# UNIT` (OpenMetrics) and `# HELP` lines of a family.
    pub fn header(&mut self, meta: &Meta) -> fmt::Result {
        let (suffix, type_name) = match (self.format, meta.kind) {
            (Format::Text, Kind::Counter) => ("_total", "counter"),
            (Format::OpenMetrics, Kind::Counter) => ("", "counter"),
            (_, Kind::Gauge) => ("", "gauge"),
            (_, Kind::Histogram) => ("", "histogram"),
            (Format::Text, Kind::Info) => ("_info", "gauge"),
            (Format::OpenMetrics, Kind::Info) => ("", "info"),
            (Format::Text, Kind::LegacyCounter) => ("", "counter"),
            (Format::OpenMetrics, Kind::LegacyCounter) => ("", "unknown"),
        };
        let out = &mut *self.out;
        match self.format {
            Format::Text => {
                if !meta.help.is_empty() {
                    write!(out, "# HELP {}{} ", meta.name, suffix)?;
                    write_help(out, meta.help, self.format)?;
                    out.write_char('\n')?;
                }
                writeln!(out, "# TYPE {}{} {}", meta.name, suffix, type_name)
            }
            Format::OpenMetrics => {
                writeln!(out, "# TYPE {}{} {}", meta.name, suffix, type_name)?;
                if let Some(unit) = meta.unit {
                    let has_suffix = meta
                        .name
                        .strip_suffix(unit)
                        .is_some_and(|rest| rest.ends_with('_'));
                    if has_suffix && !unit.is_empty() {
                        writeln!(out, "# UNIT {}{} {}", meta.name, suffix, unit)?;
                    }
                }
                if !meta.help.is_empty() {
                    write!(out, "# HELP {}{} ", meta.name, suffix)?;
                    write_help(out, meta.help, self.format)?;
                    out.write_char('\n')?;
                }
                Ok(())
            }
        }
    }

    /// Writes a whole family whose values a layer keeps itself and hands over at scrape time
    /// (no stored children): the header, then one sample per `(label values, value)`, the
    /// values in the order of `labels`. Not for histograms.
    pub fn family<'v, const N: usize>(
        &mut self,
        meta: &Meta,
        labels: &[&str; N],
        samples: impl IntoIterator<Item = ([&'v str; N], Value)>,
    ) -> fmt::Result {
        debug_assert!(meta.kind != Kind::Histogram, "{}", meta.name);
        self.header(meta)?;
        for (values, value) in samples {
            self.labelled_sample(meta.name, meta.kind.sample_suffix(), labels, &values, value)?;
        }
        Ok(())
    }

    /// Writes one sample line `name suffix {n1="v1",..} value`, escaping the label values.
    pub fn labelled_sample(
        &mut self,
        name: &str,
        suffix: &str,
        names: &[&str],
        values: &[&str],
        value: Value,
    ) -> fmt::Result {
        let labels = |out: &mut dyn Write| {
            for (i, (name, v)) in names.iter().zip(values).enumerate() {
                if i > 0 {
                    out.write_char(',')?;
                }
                out.write_str(name)?;
                out.write_str("=\"")?;
                write_label_value(out, v)?;
                out.write_char('"')?;
            }
            Ok(())
        };
        let labels: Option<&LabelWriter<'_>> = (!names.is_empty()).then_some(&labels);
        self.line(name, suffix, labels, value)
    }

    /// Ends the exposition: `# EOF` in OpenMetrics, nothing in text 0.0.4.
    pub fn finish(&mut self) -> fmt::Result {
        if self.format == Format::OpenMetrics {
            self.out.write_str("# EOF\n")?;
        }
        Ok(())
    }

    /// Writes one sample line: `name suffix {labels[,extra]} value`. `labels` is an already
    /// rendered label list (see [`render_labels`]); `extra` is one more label whose value is
    /// a float (the `le` of a histogram bucket).
    pub fn sample(
        &mut self,
        name: &str,
        suffix: &str,
        labels: &str,
        extra: Option<(&str, f64)>,
        value: Value,
    ) -> fmt::Result {
        let list = |out: &mut dyn Write| {
            out.write_str(labels)?;
            if let Some((label, v)) = extra {
                if !labels.is_empty() {
                    out.write_char(',')?;
                }
                out.write_str(label)?;
                out.write_str("=\"")?;
                write_float(out, v)?;
                out.write_char('"')?;
            }
            Ok(())
        };
        let list: Option<&LabelWriter<'_>> =
            (!labels.is_empty() || extra.is_some()).then_some(&list);
        self.line(name, suffix, list, value)
    }

    /// Writes `name suffix{labels} value` and the newline; `labels` writes the list inside
    /// the braces (no braces without it).
    fn line(
        &mut self,
        name: &str,
        suffix: &str,
        labels: Option<&LabelWriter<'_>>,
        value: Value,
    ) -> fmt::Result {
        let out = &mut *self.out;
        out.write_str(name)?;
        out.write_str(suffix)?;
        if let Some(labels) = labels {
            out.write_char('{')?;
            labels(out)?;
            out.write_char('}')?;
        }
        out.write_char(' ')?;
        write_value(out, value)?;
        out.write_char('\n')
    }
}

/// Writes a sample's label list (what goes inside the braces).
type LabelWriter<'a> = dyn Fn(&mut dyn Write) -> fmt::Result + 'a;

/// Writes a sample's number.
fn write_value(out: &mut dyn Write, value: Value) -> fmt::Result {
    match value {
        Value::U64(v) => write!(out, "{v}"),
        Value::I64(v) => write!(out, "{v}"),
        Value::F64(v) => write_float(out, v),
    }
}

/// Renders `names` and `values` as a label list `a="x",b="y"` with values escaped.
/// Pairs whose name is invalid are skipped; extra names or values are ignored.
pub fn render_labels(names: &[&str], values: &[&str]) -> String {
    let mut s = String::new();
    for (name, value) in names.iter().zip(values) {
        if !is_valid_label_name(name) {
            continue;
        }
        if !s.is_empty() {
            s.push(',');
        }
        s.push_str(name);
        s.push_str("=\"");
        // Writing into a String cannot fail.
        let _ = write_label_value(&mut s, value);
        s.push('"');
    }
    s
}

/// Something that writes one or more families into an exposition.
pub trait Collector: Send + Sync {
    /// Writes the family headers and samples.
    fn encode(&self, enc: &mut Encoder<'_>) -> fmt::Result;

    /// The family names this collector writes (as in [`Meta::name`]), for duplicate checks.
    fn names(&self) -> Vec<&'static str>;
}

/// A metric type that can be a child of a [`Family`].
pub trait Metric: Send + Sync {
    /// The family kind this metric makes.
    const KIND: Kind;
    /// Writes the samples of one child.
    fn encode(&self, enc: &mut Encoder<'_>, name: &str, labels: &str) -> fmt::Result;
}

impl Metric for Counter {
    const KIND: Kind = Kind::Counter;
    fn encode(&self, enc: &mut Encoder<'_>, name: &str, labels: &str) -> fmt::Result {
        enc.sample(name, "_total", labels, None, Value::U64(self.get()))
    }
}

impl Metric for Gauge {
    const KIND: Kind = Kind::Gauge;
    fn encode(&self, enc: &mut Encoder<'_>, name: &str, labels: &str) -> fmt::Result {
        enc.sample(name, "", labels, None, Value::I64(self.get()))
    }
}

impl Metric for FloatGauge {
    const KIND: Kind = Kind::Gauge;
    fn encode(&self, enc: &mut Encoder<'_>, name: &str, labels: &str) -> fmt::Result {
        enc.sample(name, "", labels, None, Value::F64(self.get()))
    }
}

impl Metric for Histogram {
    const KIND: Kind = Kind::Histogram;
    fn encode(&self, enc: &mut Encoder<'_>, name: &str, labels: &str) -> fmt::Result {
        // Read each bucket once; the cumulative count at +Inf is also `_count`.
        let mut cumulative = 0u64;
        for (i, &bound) in self.bounds().iter().enumerate() {
            cumulative = cumulative.wrapping_add(self.bucket_count(i));
            enc.sample(
                name,
                "_bucket",
                labels,
                Some(("le", bound)),
                Value::U64(cumulative),
            )?;
        }
        cumulative = cumulative.wrapping_add(self.bucket_count(self.bounds().len()));
        enc.sample(
            name,
            "_bucket",
            labels,
            Some(("le", f64::INFINITY)),
            Value::U64(cumulative),
        )?;
        let sum = if self.is_integral() {
            Value::U64(self.sum_units())
        } else {
            Value::F64(self.sum())
        };
        enc.sample(name, "_sum", labels, None, sum)?;
        enc.sample(name, "_count", labels, None, Value::U64(cumulative))
    }
}

/// The value of an info family's child: always 1, labels say everything.
#[derive(Debug, Default)]
pub struct InfoValue;

impl Metric for InfoValue {
    const KIND: Kind = Kind::Info;
    fn encode(&self, enc: &mut Encoder<'_>, name: &str, labels: &str) -> fmt::Result {
        enc.sample(name, "_info", labels, None, Value::U64(1))
    }
}

/// A counter exposed without `_total` (see [`Kind::LegacyCounter`]). It wraps a shared
/// [`Counter`], so the same count can appear under a current name and a legacy one.
#[derive(Debug, Default)]
pub struct LegacyCounter(pub Arc<Counter>);

impl Metric for LegacyCounter {
    const KIND: Kind = Kind::LegacyCounter;
    fn encode(&self, enc: &mut Encoder<'_>, name: &str, labels: &str) -> fmt::Result {
        enc.sample(name, "", labels, None, Value::U64(self.0.get()))
    }
}

/// A family of metrics of one type with fixed label names.
pub struct Family<M: Metric> {
    meta: Meta,
    label_names: &'static [&'static str],
    children: Vec<(String, Arc<M>)>,
}

impl<M: Metric> Family<M> {
    /// A family named `name` (for counters without `_total`) with `help` and label names.
    /// Invalid names are a programming error: caught by `debug_assert` and the tests.
    pub fn new(name: &'static str, help: &'static str, labels: &'static [&'static str]) -> Self {
        debug_assert!(is_valid_metric_name(name), "bad metric name {name}");
        debug_assert!(
            labels.iter().all(|l| is_valid_label_name(l) && *l != "le"),
            "bad label names for {name}"
        );
        Family {
            meta: Meta {
                name,
                help,
                kind: M::KIND,
                unit: None,
            },
            label_names: labels,
            children: Vec::new(),
        }
    }

    /// Sets the unit (`bytes`, `seconds`); the name should end with `_<unit>`.
    pub fn unit(mut self, unit: &'static str) -> Self {
        self.meta.unit = Some(unit);
        self
    }

    /// The family's description.
    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    /// Adds an existing metric as the child with `values` (one per label name, in order).
    pub fn add(&mut self, values: &[&str], metric: Arc<M>) -> Arc<M> {
        debug_assert_eq!(values.len(), self.label_names.len(), "{}", self.meta.name);
        let labels = render_labels(self.label_names, values);
        self.children.push((labels, metric.clone()));
        metric
    }

    /// The number of children.
    pub fn len(&self) -> usize {
        self.children.len()
    }

    /// Whether the family has no children.
    pub fn is_empty(&self) -> bool {
        self.children.is_empty()
    }
}

impl<M: Metric + Default> Family<M> {
    /// Creates the child with label `values` (one per label name, in order).
    pub fn child(&mut self, values: &[&str]) -> Arc<M> {
        self.add(values, Arc::new(M::default()))
    }
}

impl Family<Histogram> {
    /// Creates a histogram child with label `values`, made by `make`.
    pub fn histogram(
        &mut self,
        values: &[&str],
        make: impl FnOnce() -> Histogram,
    ) -> Arc<Histogram> {
        self.add(values, Arc::new(make()))
    }
}

impl<M: Metric> Collector for Family<M> {
    fn encode(&self, enc: &mut Encoder<'_>) -> fmt::Result {
        enc.header(&self.meta)?;
        for (labels, metric) in &self.children {
            metric.encode(enc, self.meta.name, labels)?;
        }
        Ok(())
    }

    fn names(&self) -> Vec<&'static str> {
        alloc::vec![self.meta.name]
    }
}

impl<C: Collector + ?Sized> Collector for Arc<C> {
    fn encode(&self, enc: &mut Encoder<'_>) -> fmt::Result {
        (**self).encode(enc)
    }
    fn names(&self) -> Vec<&'static str> {
        (**self).names()
    }
}

/// `core::fmt::Write` into a byte vector.
pub struct VecWriter<'a>(pub &'a mut Vec<u8>);

impl Write for VecWriter<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// The set of collectors one guest exposes.
#[derive(Default)]
pub struct Registry {
    collectors: Vec<Box<dyn Collector>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Registry::default()
    }

    /// Adds a collector (a [`Family`], or anything that writes families).
    pub fn register(&mut self, c: impl Collector + 'static) {
        self.collectors.push(Box::new(c));
    }

    /// Every family name, in exposition order.
    pub fn names(&self) -> Vec<&'static str> {
        self.collectors.iter().flat_map(|c| c.names()).collect()
    }

    /// Writes the whole exposition in `format` (OpenMetrics ends with `# EOF`).
    pub fn encode(&self, format: Format, out: &mut dyn Write) -> fmt::Result {
        let mut enc = Encoder::new(out, format);
        self.encode_families(&mut enc)?;
        enc.finish()
    }

    /// Writes every collector's families into `enc`, without ending the exposition (for
    /// an exposition that adds families written at scrape time).
    pub fn encode_families(&self, enc: &mut Encoder<'_>) -> fmt::Result {
        for c in &self.collectors {
            c.encode(enc)?;
        }
        Ok(())
    }

    /// Appends the exposition to `out`.
    pub fn encode_to_vec(&self, format: Format, out: &mut Vec<u8>) {
        // Writing into a Vec cannot fail, and no collector here returns errors of its own.
        let _ = self.encode(format, &mut VecWriter(out));
    }

    /// The exposition as bytes.
    pub fn render(&self, format: Format) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        self.encode_to_vec(format, &mut out);
        out
    }
}
