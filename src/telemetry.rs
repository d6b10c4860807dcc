//! The guest's exposition, assembled at scrape time from every layer's telemetry.
//!
//! Layers that count on their own hot path keep their counters where they are ([`NbdStats`],
//! [`HttpStats`], [`NetStats`], the engine's [`crate::qcow2::Stats`]); a scrape borrows them
//! in a [`Scrape`] and each layer writes its own families. Only the request counters of the
//! disk and the block device, updated by wrappers and drivers, live here ([`GuestMetrics`]).
//! Where each family is defined: doc/metrics.md.

use crate::block::telemetry::BlockDeviceMetrics;
use crate::disk::telemetry::{DiskFigures, DiskMetrics};
use crate::http::HttpStats;
use crate::http::telemetry::ScrapeTimer;
use crate::metrics::registry::VecWriter;
use crate::metrics::{Collector, Encoder, Family, Format, InfoValue, Meta, Value, negotiate};
use crate::nbd::NbdStats;
use crate::net::NetStats;
use crate::service::telemetry::ConnectionFigures;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{AtomicUsize, Ordering};

/// What the guest's metrics are built from.
#[derive(Debug, Clone)]
pub struct GuestConfig<'a> {
    /// The `disk` label: the export name.
    pub disk: &'a str,
    /// The `device` label of the block device (`vda`).
    pub device: &'a str,
    /// The `interface` label of the network interface (`eth0`).
    pub interface: &'a str,
    /// The build's version, for `qcow_metal_build_info`.
    pub version: &'a str,
    /// Adds ocaml-qcow's `Mirage_qcow_*` families (`mirage_metrics=1`).
    pub mirage: bool,
    /// Monotonic clock in nanoseconds, used to time scrapes.
    pub clock: fn() -> u64,
}

/// What one scrape reads from the layers, borrowed where they keep it.
#[derive(Debug, Clone, Copy)]
pub struct Scrape<'a> {
    /// The disk's engine figures and compaction.
    pub disk: DiskFigures<'a>,
    /// The NBD server's counters.
    pub nbd: &'a NbdStats,
    /// The HTTP responder's counters.
    pub http: &'a HttpStats,
    /// The network interface's counters.
    pub net: &'a NetStats,
    /// The machine's own figures.
    pub system: SystemFigures,
    /// The service ports' listener pools, where the server has them (the guest).
    pub connections: Option<ConnectionFigures<'a>>,
}

/// What the machine reports about itself at scrape time.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SystemFigures {
    /// Seconds since the guest started.
    pub uptime_seconds: f64,
    /// Bytes of RAM given to the heap.
    pub heap_size: u64,
    /// Bytes of the heap in use.
    pub heap_used: u64,
}

/// The guest's own families and the handles of the counters that live here.
pub struct GuestMetrics {
    /// The virtual disk's metrics (requests, up).
    pub disk: Arc<DiskMetrics>,
    /// The block device's metrics.
    pub blockdev: Arc<BlockDeviceMetrics>,
    /// Time to encode a `/metrics` response (observed by [`GuestMetrics::render_into`]).
    pub scrape_encode: ScrapeTimer,
    build_info: Family<InfoValue>,
    interface: String,
    export: String,
    mirage: bool,
    clock: fn() -> u64,
    /// Length of the last exposition, to size the next buffer in one allocation.
    last_len: AtomicUsize,
}

impl GuestMetrics {
    /// Builds every family that lives here, with all label values.
    pub fn new(cfg: &GuestConfig<'_>) -> Self {
        let mut build_info = Family::new(
            "qcow_metal_build",
            "The qcow-metal build the guest runs.",
            &["version"],
        );
        build_info.child(&[cfg.version]);
        GuestMetrics {
            disk: Arc::new(DiskMetrics::new(cfg.disk)),
            blockdev: Arc::new(BlockDeviceMetrics::new(cfg.device)),
            scrape_encode: ScrapeTimer::new(),
            build_info,
            interface: String::from(cfg.interface),
            export: String::from(cfg.disk),
            mirage: cfg.mirage,
            clock: cfg.clock,
            last_len: AtomicUsize::new(0),
        }
    }

    /// Writes every layer's families into `enc`, and ends the exposition.
    pub fn encode(&self, enc: &mut Encoder<'_>, s: &Scrape<'_>) -> fmt::Result {
        self.disk.encode(enc, &s.disk)?;
        self.blockdev.encode(enc)?;
        s.nbd.encode(enc, &self.export)?;
        s.http.encode(enc)?;
        self.scrape_encode.encode(enc)?;
        enc.family(
            &Meta::gauge(
                "qcow_metal_guest_uptime_seconds",
                "Seconds since the guest started.",
            )
            .unit("seconds"),
            &[],
            [([], Value::F64(s.system.uptime_seconds))],
        )?;
        enc.family(
            &Meta::gauge(
                "qcow_metal_guest_heap_size_bytes",
                "Bytes of RAM given to the guest's heap.",
            )
            .unit("bytes"),
            &[],
            [([], Value::U64(s.system.heap_size))],
        )?;
        enc.family(
            &Meta::gauge(
                "qcow_metal_guest_heap_used_bytes",
                "Bytes of the guest's heap in use.",
            )
            .unit("bytes"),
            &[],
            [([], Value::U64(s.system.heap_used))],
        )?;
        self.build_info.encode(enc)?;
        s.net.encode(enc, &self.interface)?;
        if let Some(connections) = &s.connections {
            connections.encode(enc)?;
        }
        if self.mirage {
            self.disk.encode_mirage(enc, &s.disk)?;
        }
        enc.finish()
    }

    /// Appends the exposition in `format` to `out`, and records how long encoding took in
    /// `qcow_metal_http_scrape_encode_seconds` (seen by the next scrape).
    pub fn render_into(&self, format: Format, s: &Scrape<'_>, out: &mut Vec<u8>) {
        let start = (self.clock)();
        let before = out.len();
        out.reserve(self.last_len.load(Ordering::Relaxed) + 1024);
        // Writing into a Vec cannot fail, and no layer returns errors of its own.
        let _ = self.encode(&mut Encoder::new(&mut VecWriter(out), format), s);
        let took = (self.clock)().saturating_sub(start);
        self.last_len.store(out.len() - before, Ordering::Relaxed);
        self.scrape_encode.observe(took);
    }

    /// The exposition in `format`.
    pub fn render(&self, format: Format, s: &Scrape<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        self.render_into(format, s, &mut out);
        out
    }

    /// Answers a scrape: picks the format from the `Accept` header value, appends the body
    /// to `out` and returns its `Content-Type`.
    pub fn serve(&self, accept: &str, s: &Scrape<'_>, out: &mut Vec<u8>) -> &'static str {
        let format = negotiate(accept);
        self.render_into(format, s, out);
        format.content_type()
    }
}

#[cfg(test)]
pub(crate) mod tests;
