//! Metrics: lock-free counters, gauges and histograms with labels, and the encoders of the
//! Prometheus text format 0.0.4 and OpenMetrics 1.0.
//!
//! - [`primitives`]: [`Counter`], [`Gauge`], [`FloatGauge`], [`Histogram`] (atomics only).
//! - [`registry`]: [`Family`] (children by label values), [`Registry`], the [`Encoder`].
//! - [`encode`]: [`Format`], [`negotiate`], content types, escaping, number rendering.
//! - [`parse`] (with `std`): a strict parser of both formats, for tests and host tools.
//!
//! This is the base: it imports nothing else of the crate. Each layer writes its own
//! families next to its code (`block::telemetry`, `disk::telemetry`, `qcow2::telemetry`,
//! `nbd::telemetry`, `http::telemetry`, `net`), and [`crate::telemetry`] assembles the
//! guest's exposition.
//!
//! Typical use: build families, keep the `Arc`s of the children on the hot path, register the
//! families, and call [`Registry::render`] with the [`Format`] that [`negotiate`] picked from
//! the scraper's `Accept` header.
//!
//! ```
//! use qcow_metal::metrics::{Counter, Family, Format, Registry};
//! let mut reads: Family<Counter> = Family::new("demo_reads", "Reads done.", &["disk"]);
//! let vda = reads.child(&["vda"]);
//! let mut registry = Registry::new();
//! registry.register(reads);
//! vda.add(3);
//! let text = registry.render(Format::Text);
//! assert!(text.ends_with(b"demo_reads_total{disk=\"vda\"} 3\n"));
//! ```

pub mod encode;
#[cfg(any(test, feature = "std"))]
pub mod parse;
pub mod primitives;
pub mod registry;

pub use encode::{CONTENT_TYPE_OPENMETRICS, CONTENT_TYPE_TEXT, Format, negotiate};
pub use primitives::{Counter, FloatGauge, Gauge, Histogram, LATENCY_BUCKETS_SECONDS};
pub use registry::{
    Collector, Encoder, Family, InfoValue, Kind, LegacyCounter, Meta, Metric, Registry, Value,
};

#[cfg(test)]
mod tests;
