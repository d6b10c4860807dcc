//! Metrics: lock-free counters, gauges and histograms with labels, and the encoders of the
//! Prometheus text format 0.0.4 and OpenMetrics 1.0.
//!
//! - [`primitives`]: [`Counter`], [`Gauge`], [`FloatGauge`], [`Histogram`] (atomics only).
//! - [`registry`]: [`Family`] (children by label values), [`Registry`], the [`Encoder`].
//! - [`encode`]: [`Format`], [`negotiate`], content types, escaping, number rendering.
//! - [`families`]: the guest's own families, layer by layer ([`GuestMetrics`]), and the
//!   snapshots the kernel copies into them at scrape time.
//! - [`instrument`]: [`Instrumented`] and [`InstrumentedDevice`], wrappers that count and
//!   time every request of a disk or a block device.
//! - [`parse`]: a strict parser of both formats, for tests and host tools.
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
pub mod families;
pub mod instrument;
pub mod parse;
pub mod primitives;
pub mod registry;

pub use encode::{CONTENT_TYPE_OPENMETRICS, CONTENT_TYPE_TEXT, Format, negotiate};
pub use primitives::{Counter, FloatGauge, Gauge, Histogram, LATENCY_BUCKETS_SECONDS};
pub use registry::{
    Collector, Encoder, Family, InfoValue, Kind, LegacyCounter, Meta, Metric, Registry, Value,
};

pub use families::{
    BlockDeviceMetrics, DiskMetrics, EngineSnapshot, GuestConfig, GuestMetrics, HttpMetrics,
    HttpSnapshot, IoOp, NbdMetrics, NbdSnapshot, RequestMetrics, SystemMetrics, SystemSnapshot,
};
pub use instrument::{Instrumented, InstrumentedDevice};

use alloc::vec::Vec;

/// The guest's metrics, once the kernel has installed them.
static GUEST: spin::Once<GuestMetrics> = spin::Once::new();

/// Installs the guest's metrics (once; later calls keep the first and return it).
pub fn install(metrics: GuestMetrics) -> &'static GuestMetrics {
    GUEST.call_once(|| metrics)
}

/// The installed guest metrics, if any.
pub fn installed() -> Option<&'static GuestMetrics> {
    GUEST.get()
}

/// The `/metrics` body in `format` from the installed guest metrics; before installation,
/// an empty exposition (`# EOF` alone in OpenMetrics).
pub fn render(format: Format) -> Vec<u8> {
    match installed() {
        Some(m) => m.render(format),
        None => Registry::new().render(format),
    }
}

#[cfg(test)]
mod tests;
