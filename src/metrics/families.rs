//! The guest's metric families, layer by layer, and the registry that holds them.
//!
//! Names follow Prometheus' conventions: prefix `qcow_metal_`, base units in the name
//! (`_bytes`, `_seconds`), counters end in `_total`. Every family exists from boot on, with
//! all its label values, so rates start at zero instead of appearing late.
//!
//! | layer | families | labels |
//! |---|---|---|
//! | engine | `qcow_metal_disk_requests_total`, `_errors_total`, `_bytes_total`, `_request_duration_seconds` | `disk`, `op` |
//! | engine | `qcow_metal_disk_virtual_size_bytes`, `_data_bytes`, `_metadata_bytes`, `_image_extent_bytes`, `_cluster_size_bytes`, `_free_clusters`, `_up` | `disk` |
//! | engine | `qcow_metal_disk_clusters_allocated_total`, `_clusters_freed_total`, `_cow_bytes_total`, `_metadata_written_bytes_total` | `disk` |
//! | engine | `qcow_metal_disk_metadata_overlaps_total` | `disk` |
//! | engine | `qcow_metal_disk_cache_hits_total`, `_cache_misses_total` | `disk`, `cache` (`l2`, `refcount`) |
//! | engine | `qcow_metal_disk_reclaim_bytes_total` | `disk`, `stage` |
//! | engine | `qcow_metal_disk_reclaim_junk_bytes`, `_reclaim_available_bytes`, `_compaction_passes_total` | `disk` |
//! | engine | `qcow_metal_disk_compaction_state` | `disk`, `state` |
//! | block device | `qcow_metal_blockdev_requests_total`, `_errors_total`, `_bytes_total`, `_request_duration_seconds` | `device`, `op` |
//! | block device | `qcow_metal_blockdev_in_flight`, `qcow_metal_blockdev_capacity_bytes` | `device` |
//! | NBD | `qcow_metal_nbd_connections_active`, `_connections_total`, `_sessions_total`, `_protocol_errors_total` | `export` |
//! | NBD | `qcow_metal_nbd_requests_total` | `export`, `command` |
//! | NBD | `qcow_metal_nbd_errors_total` | `export`, `error` |
//! | NBD | `qcow_metal_nbd_bytes_total` | `export`, `op` |
//! | HTTP | `qcow_metal_http_requests_total` | `code` |
//! | HTTP | `qcow_metal_http_bad_requests_total`, `_timeouts_total`, `_received_bytes_total`, `_sent_bytes_total`, `_gzip_responses_total`, `_scrape_encode_seconds` | |
//! | guest | `qcow_metal_guest_uptime_seconds`, `_heap_size_bytes`, `_heap_used_bytes`, `qcow_metal_build_info` | |
//! | guest | `qcow_metal_net_packets_total`, `qcow_metal_net_bytes_total` | `interface`, `direction` (`in`, `out`) |
//!
//! With the mirage switch on, the twelve `Mirage_qcow_*` families of ocaml-qcow are added,
//! label `id`, in bytes, sharing the counts above: `reads`, `writes`, `discards` (request
//! bytes), `junk`, `erased`, `available`, `roots`, `copied`, `flushed`, `referenced`
//! (reclaim), `used` (= data bytes) and `size` (= image extent). Their counters have no
//! `_total`, as ocaml-qcow exposes them, so `promtool check metrics` warns about them; they
//! are off by default. Three gauges in the same style go with them: `junk_now` and
//! `available_now` (bytes now) and `compacting` (1 while a compaction pass is on).

use super::encode::Format;
use super::primitives::{Counter, FloatGauge, Gauge, Histogram};
use super::registry::{Family, InfoValue, LegacyCounter, Metric, Registry};
use crate::compaction::CompactionState;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicUsize, Ordering};

/// A kind of I/O request, at the engine and at the block device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IoOp {
    /// Read.
    Read = 0,
    /// Write.
    Write = 1,
    /// Discard (trim, unmap).
    Discard = 2,
    /// Write zeroes.
    WriteZeroes = 3,
    /// Flush (write barrier).
    Flush = 4,
}

impl IoOp {
    /// Every kind, in index order.
    pub const ALL: [IoOp; 5] = [
        IoOp::Read,
        IoOp::Write,
        IoOp::Discard,
        IoOp::WriteZeroes,
        IoOp::Flush,
    ];

    /// The `op` label value.
    pub fn name(self) -> &'static str {
        match self {
            IoOp::Read => "read",
            IoOp::Write => "write",
            IoOp::Discard => "discard",
            IoOp::WriteZeroes => "write_zeroes",
            IoOp::Flush => "flush",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The stages of space reclaim, as ocaml-qcow names them.
pub const RECLAIM_STAGES: [&str; 6] = [
    "junk",
    "erased",
    "available",
    "copied",
    "flushed",
    "referenced",
];

/// Per-operation request counters of one disk or device: requests, errors, bytes, latency.
#[derive(Debug)]
pub struct RequestMetrics {
    requests: [Arc<Counter>; 5],
    errors: [Arc<Counter>; 5],
    bytes: [Arc<Counter>; 5],
    latency: [Arc<Histogram>; 5],
}

/// The families of [`RequestMetrics`] before registration.
struct RequestFamilies {
    requests: Family<Counter>,
    errors: Family<Counter>,
    bytes: Family<Counter>,
    latency: Family<Histogram>,
}

impl RequestFamilies {
    fn new(prefix: Prefix) -> Self {
        let labels: &'static [&'static str] = match prefix {
            Prefix::Disk => &["disk", "op"],
            Prefix::Blockdev => &["device", "op"],
        };
        let (requests, errors, bytes, latency) = match prefix {
            Prefix::Disk => (
                Family::new(
                    "qcow_metal_disk_requests",
                    "Requests to the virtual disk that completed successfully, by operation.",
                    labels,
                ),
                Family::new(
                    "qcow_metal_disk_errors",
                    "Requests to the virtual disk that failed, by operation (not counted in requests).",
                    labels,
                ),
                Family::new(
                    "qcow_metal_disk_bytes",
                    "Bytes covered by successful requests to the virtual disk (read, written, discarded or zeroed), by operation.",
                    labels,
                )
                .unit("bytes"),
                Family::new(
                    "qcow_metal_disk_request_duration_seconds",
                    "Time from start to completion of successful requests to the virtual disk, by operation.",
                    labels,
                )
                .unit("seconds"),
            ),
            Prefix::Blockdev => (
                Family::new(
                    "qcow_metal_blockdev_requests",
                    "Block device requests that completed successfully, one per device request (as QEMU counts them), by operation.",
                    labels,
                ),
                Family::new(
                    "qcow_metal_blockdev_errors",
                    "Block device requests that failed, by operation (not counted in requests).",
                    labels,
                ),
                Family::new(
                    "qcow_metal_blockdev_bytes",
                    "Bytes covered by successful block device requests, by operation.",
                    labels,
                )
                .unit("bytes"),
                Family::new(
                    "qcow_metal_blockdev_request_duration_seconds",
                    "Time from submission to completion of successful block device requests, by operation.",
                    labels,
                )
                .unit("seconds"),
            ),
        };
        RequestFamilies {
            requests,
            errors,
            bytes,
            latency,
        }
    }

    fn child(&mut self, name: &str) -> RequestMetrics {
        let make = |f: &mut Family<Counter>| IoOp::ALL.map(|op| f.child(&[name, op.name()]));
        let requests = make(&mut self.requests);
        let errors = make(&mut self.errors);
        // A flush covers no bytes: its counter exists (always 0) but has no series.
        let bytes = IoOp::ALL.map(|op| match op {
            IoOp::Flush => Arc::new(Counter::new()),
            _ => self.bytes.child(&[name, op.name()]),
        });
        let latency = IoOp::ALL.map(|op| {
            self.latency
                .histogram(&[name, op.name()], Histogram::latency)
        });
        RequestMetrics {
            requests,
            errors,
            bytes,
            latency,
        }
    }

    fn register(self, registry: &mut Registry) {
        registry.register(self.requests);
        registry.register(self.errors);
        registry.register(self.bytes);
        registry.register(self.latency);
    }
}

#[derive(Clone, Copy)]
enum Prefix {
    Disk,
    Blockdev,
}

impl RequestMetrics {
    /// Records one completed request: with `ok` it counts as a request of `bytes` bytes
    /// that took `latency_ns`; without, as an error only.
    pub fn record(&self, op: IoOp, bytes: u64, latency_ns: u64, ok: bool) {
        let i = op.index();
        if ok {
            self.requests[i].inc();
            self.bytes[i].add(bytes);
            self.latency[i].observe(latency_ns);
        } else {
            self.errors[i].inc();
        }
    }

    /// Successful requests of one kind.
    pub fn requests(&self, op: IoOp) -> u64 {
        self.requests[op.index()].get()
    }

    /// Failed requests of one kind.
    pub fn errors(&self, op: IoOp) -> u64 {
        self.errors[op.index()].get()
    }

    /// Bytes of successful requests of one kind.
    pub fn bytes(&self, op: IoOp) -> u64 {
        self.bytes[op.index()].get()
    }

    /// The latency histogram of one kind.
    pub fn latency(&self, op: IoOp) -> &Histogram {
        &self.latency[op.index()]
    }

    fn bytes_counter(&self, op: IoOp) -> Arc<Counter> {
        self.bytes[op.index()].clone()
    }
}

/// What the qcow2 engine (or the raw disk) reports about its space, caches and reclaim,
/// copied from the engine's statistics at scrape time. All sizes are in bytes; the
/// counters only grow.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineSnapshot {
    /// Size of the virtual disk.
    pub virtual_size: u64,
    /// Cluster size of the image (0 for a raw disk).
    pub cluster_size: u64,
    /// Bytes of clusters holding guest data.
    pub data_bytes: u64,
    /// Bytes of clusters holding metadata (header, L1/L2 tables, refcount structures).
    pub metadata_bytes: u64,
    /// End of the last allocated cluster: how large the host file must be.
    pub image_extent: u64,
    /// Clusters below the image extent that are free for reuse.
    pub free_clusters: u64,
    /// Clusters allocated since open.
    pub clusters_allocated: u64,
    /// Clusters freed since open.
    pub clusters_freed: u64,
    /// Bytes copied by copy-on-write of partially written clusters.
    pub cow_bytes: u64,
    /// L2 table cache hits.
    pub l2_cache_hits: u64,
    /// L2 table cache misses.
    pub l2_cache_misses: u64,
    /// Refcount block cache hits.
    pub refcount_cache_hits: u64,
    /// Refcount block cache misses.
    pub refcount_cache_misses: u64,
    /// Bytes of metadata written to the device.
    pub metadata_written_bytes: u64,
    /// Space reclaim, bytes through each stage of [`RECLAIM_STAGES`], in that order.
    pub reclaim: [u64; 6],
    /// Bytes registered as reclaim roots (ocaml-qcow's `roots`; only in the mirage families).
    pub reclaim_roots: u64,
    /// Writes refused because they would have overwritten metadata (image corrupt).
    pub overlaps_refused: u64,
    /// Bytes of junk now: clusters freed whose refcounts have not dropped yet.
    pub junk_bytes: u64,
    /// Bytes available now: free clusters inside the image extent, reusable.
    pub available_bytes: u64,
    /// What online compaction is doing.
    pub compaction: crate::compaction::CompactionState,
    /// Compaction passes finished since boot.
    pub compaction_passes: u64,
}

/// The metrics of one virtual disk (the qcow2 engine, or the raw disk), label `disk`.
#[derive(Debug)]
pub struct DiskMetrics {
    /// Request counters, updated by [`super::Instrumented`].
    pub requests: RequestMetrics,
    virtual_size: Arc<Gauge>,
    cluster_size: Arc<Gauge>,
    data_bytes: Arc<Gauge>,
    metadata_bytes: Arc<Gauge>,
    image_extent: Arc<Gauge>,
    free_clusters: Arc<Gauge>,
    up: Arc<Gauge>,
    clusters_allocated: Arc<Counter>,
    clusters_freed: Arc<Counter>,
    cow_bytes: Arc<Counter>,
    cache_hits: [Arc<Counter>; 2],
    cache_misses: [Arc<Counter>; 2],
    metadata_written: Arc<Counter>,
    overlaps: Arc<Counter>,
    reclaim: [Arc<Counter>; 6],
    roots: Arc<Counter>,
    junk_now: Arc<Gauge>,
    available_now: Arc<Gauge>,
    compaction_state: [Arc<Gauge>; 4],
    compacting: Arc<Gauge>,
    compaction_passes: Arc<Counter>,
}

impl DiskMetrics {
    /// Copies the engine's statistics into the gauges and counters.
    pub fn update(&self, s: &EngineSnapshot) {
        self.virtual_size.set_u64(s.virtual_size);
        self.cluster_size.set_u64(s.cluster_size);
        self.data_bytes.set_u64(s.data_bytes);
        self.metadata_bytes.set_u64(s.metadata_bytes);
        self.image_extent.set_u64(s.image_extent);
        self.free_clusters.set_u64(s.free_clusters);
        self.clusters_allocated.mirror(s.clusters_allocated);
        self.clusters_freed.mirror(s.clusters_freed);
        self.cow_bytes.mirror(s.cow_bytes);
        self.cache_hits[0].mirror(s.l2_cache_hits);
        self.cache_misses[0].mirror(s.l2_cache_misses);
        self.cache_hits[1].mirror(s.refcount_cache_hits);
        self.cache_misses[1].mirror(s.refcount_cache_misses);
        self.metadata_written.mirror(s.metadata_written_bytes);
        self.overlaps.mirror(s.overlaps_refused);
        for (c, v) in self.reclaim.iter().zip(s.reclaim) {
            c.mirror(v);
        }
        self.roots.mirror(s.reclaim_roots);
        self.junk_now.set_u64(s.junk_bytes);
        self.available_now.set_u64(s.available_bytes);
        for (g, state) in self.compaction_state.iter().zip(CompactionState::ALL) {
            g.set(i64::from(state == s.compaction));
        }
        let compacting = matches!(
            s.compaction,
            CompactionState::Waiting | CompactionState::Running
        );
        self.compacting.set(i64::from(compacting));
        self.compaction_passes.mirror(s.compaction_passes);
    }

    /// Says whether the image is open and served (`qcow_metal_disk_up` 1 or 0).
    pub fn set_up(&self, up: bool) {
        self.up.set(i64::from(up));
    }
}

/// The metrics of the block device under the engine (virtio-blk), label `device`.
///
/// The driver calls [`BlockDeviceMetrics::record`] once per device request it completes,
/// after any splitting, so the counts equal QEMU's `query-blockstats` for the device
/// (which counts write-zeroes among writes and does not count discards).
#[derive(Debug)]
pub struct BlockDeviceMetrics {
    /// Request counters.
    pub requests: RequestMetrics,
    in_flight: Arc<Gauge>,
    capacity: Arc<Gauge>,
}

impl BlockDeviceMetrics {
    /// Records one completed device request (see [`RequestMetrics::record`]).
    pub fn record(&self, op: IoOp, bytes: u64, latency_ns: u64, ok: bool) {
        self.requests.record(op, bytes, latency_ns, ok);
    }

    /// A request was submitted (`+1` in flight).
    pub fn submitted(&self) {
        self.in_flight.inc();
    }

    /// A submitted request completed (`-1` in flight); record it with [`Self::record`].
    pub fn completed(&self) {
        self.in_flight.dec();
    }

    /// The device's size in bytes (for a disk image: the host file as the guest sees it).
    pub fn set_capacity(&self, bytes: u64) {
        self.capacity.set_u64(bytes);
    }
}

/// NBD command label values, in the order of [`NbdSnapshot::requests`].
pub const NBD_COMMANDS: [&str; 8] = [
    "read",
    "write",
    "disc",
    "flush",
    "trim",
    "write_zeroes",
    "block_status",
    "other",
];

/// NBD error label values, in the order of [`NbdSnapshot::errors`].
pub const NBD_ERRORS: [&str; 7] = [
    "EPERM",
    "EIO",
    "EINVAL",
    "ENOSPC",
    "EOVERFLOW",
    "ENOTSUP",
    "ESHUTDOWN",
];

/// NBD byte-count label values, in the order of [`NbdSnapshot::bytes`].
pub const NBD_BYTE_OPS: [&str; 4] = ["read", "write", "trim", "write_zeroes"];

/// What the NBD server counted, copied at scrape time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NbdSnapshot {
    /// Connections open now.
    pub connections_active: u64,
    /// Connections accepted since start.
    pub connections_total: u64,
    /// Connections that reached the transmission phase.
    pub sessions_total: u64,
    /// Connections closed for breaking the protocol.
    pub protocol_errors: u64,
    /// Requests by command, in the order of [`NBD_COMMANDS`].
    pub requests: [u64; 8],
    /// Error replies by error, in the order of [`NBD_ERRORS`].
    pub errors: [u64; 7],
    /// Bytes of successful requests, in the order of [`NBD_BYTE_OPS`].
    pub bytes: [u64; 4],
}

/// The metrics of the NBD export, label `export`.
#[derive(Debug)]
pub struct NbdMetrics {
    connections_active: Arc<Gauge>,
    connections_total: Arc<Counter>,
    sessions_total: Arc<Counter>,
    protocol_errors: Arc<Counter>,
    requests: [Arc<Counter>; 8],
    errors: [Arc<Counter>; 7],
    bytes: [Arc<Counter>; 4],
}

impl NbdMetrics {
    /// Copies the server's counters.
    pub fn update(&self, s: &NbdSnapshot) {
        self.connections_active.set_u64(s.connections_active);
        self.connections_total.mirror(s.connections_total);
        self.sessions_total.mirror(s.sessions_total);
        self.protocol_errors.mirror(s.protocol_errors);
        for (c, v) in self.requests.iter().zip(s.requests) {
            c.mirror(v);
        }
        for (c, v) in self.errors.iter().zip(s.errors) {
            c.mirror(v);
        }
        for (c, v) in self.bytes.iter().zip(s.bytes) {
            c.mirror(v);
        }
    }
}

/// HTTP status codes with their own `code` series (every code the responder sends).
pub const HTTP_CODES: [u16; 12] = [200, 400, 404, 405, 408, 413, 414, 431, 500, 501, 503, 505];

/// What the HTTP responder counted, copied at scrape time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HttpSnapshot {
    /// Responses by status code, in the order of [`HTTP_CODES`].
    pub responses: [u64; 12],
    /// Requests rejected as malformed or over a limit.
    pub bad_requests: u64,
    /// Connections closed by the idle timeout.
    pub timeouts: u64,
    /// Request bytes received.
    pub bytes_received: u64,
    /// Response bytes sent.
    pub bytes_sent: u64,
    /// Responses sent gzip-compressed.
    pub gzip_responses: u64,
}

impl HttpSnapshot {
    /// Adds `count` responses with status `code`; false when the code has no series.
    pub fn set_code(&mut self, code: u16, count: u64) -> bool {
        match HTTP_CODES.iter().position(|&c| c == code) {
            Some(i) => {
                self.responses[i] = count;
                true
            }
            None => false,
        }
    }
}

/// The metrics of the HTTP responder.
#[derive(Debug)]
pub struct HttpMetrics {
    requests: [Arc<Counter>; 12],
    bad_requests: Arc<Counter>,
    timeouts: Arc<Counter>,
    received: Arc<Counter>,
    sent: Arc<Counter>,
    gzip: Arc<Counter>,
    /// Time to encode a `/metrics` response (observed by [`GuestMetrics::render`]).
    pub scrape_encode: Arc<Histogram>,
}

impl HttpMetrics {
    /// Copies the responder's counters.
    pub fn update(&self, s: &HttpSnapshot) {
        for (c, v) in self.requests.iter().zip(s.responses) {
            c.mirror(v);
        }
        self.bad_requests.mirror(s.bad_requests);
        self.timeouts.mirror(s.timeouts);
        self.received.mirror(s.bytes_received);
        self.sent.mirror(s.bytes_sent);
        self.gzip.mirror(s.gzip_responses);
    }
}

/// What the guest itself reports, copied at scrape time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SystemSnapshot {
    /// Seconds since the guest started.
    pub uptime_seconds: f64,
    /// Bytes of RAM given to the heap.
    pub heap_size: u64,
    /// Bytes of the heap in use.
    pub heap_used: u64,
    /// Packets received by the network interface.
    pub rx_packets: u64,
    /// Packets sent by the network interface.
    pub tx_packets: u64,
    /// Bytes received (frames, as the interface sees them).
    pub rx_bytes: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
}

/// Guest-wide metrics: uptime, heap, network.
#[derive(Debug)]
pub struct SystemMetrics {
    uptime: Arc<FloatGauge>,
    heap_size: Arc<Gauge>,
    heap_used: Arc<Gauge>,
    packets: [Arc<Counter>; 2],
    bytes: [Arc<Counter>; 2],
}

impl SystemMetrics {
    /// Copies the guest's figures.
    pub fn update(&self, s: &SystemSnapshot) {
        self.uptime.set(s.uptime_seconds);
        self.heap_size.set_u64(s.heap_size);
        self.heap_used.set_u64(s.heap_used);
        self.packets[0].mirror(s.rx_packets);
        self.packets[1].mirror(s.tx_packets);
        self.bytes[0].mirror(s.rx_bytes);
        self.bytes[1].mirror(s.tx_bytes);
    }
}

/// What the guest registry is built from.
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

/// The guest's registry and typed handles on every layer's metrics.
pub struct GuestMetrics {
    registry: Registry,
    /// The virtual disk (engine) metrics.
    pub disk: Arc<DiskMetrics>,
    /// The block device metrics.
    pub blockdev: Arc<BlockDeviceMetrics>,
    /// The NBD export metrics.
    pub nbd: Arc<NbdMetrics>,
    /// The HTTP responder metrics.
    pub http: Arc<HttpMetrics>,
    /// Guest-wide metrics.
    pub system: Arc<SystemMetrics>,
    clock: fn() -> u64,
    /// Length of the last exposition, to size the next buffer in one allocation.
    last_len: AtomicUsize,
}

impl GuestMetrics {
    /// Builds every family, with all label values, and registers them.
    pub fn new(cfg: &GuestConfig<'_>) -> Self {
        let mut reg = Registry::new();
        let disk = build_disk(&mut reg, cfg);
        let blockdev = build_blockdev(&mut reg, cfg.device);
        let nbd = build_nbd(&mut reg, cfg.disk);
        let http = build_http(&mut reg);
        let system = build_system(&mut reg, cfg);
        if cfg.mirage {
            build_mirage(&mut reg, cfg.disk, &disk);
        }
        GuestMetrics {
            registry: reg,
            disk: Arc::new(disk),
            blockdev: Arc::new(blockdev),
            nbd: Arc::new(nbd),
            http: Arc::new(http),
            system: Arc::new(system),
            clock: cfg.clock,
            last_len: AtomicUsize::new(0),
        }
    }

    /// The registry (to encode it differently, or list its families).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Appends the exposition in `format` to `out`, and records how long encoding took in
    /// `qcow_metal_http_scrape_encode_seconds` (seen by the next scrape).
    pub fn render_into(&self, format: Format, out: &mut Vec<u8>) {
        let start = (self.clock)();
        let before = out.len();
        out.reserve(self.last_len.load(Ordering::Relaxed) + 1024);
        self.registry.encode_to_vec(format, out);
        let took = (self.clock)().saturating_sub(start);
        self.last_len.store(out.len() - before, Ordering::Relaxed);
        self.http.scrape_encode.observe(took);
    }

    /// The exposition in `format`.
    pub fn render(&self, format: Format) -> Vec<u8> {
        let mut out = Vec::new();
        self.render_into(format, &mut out);
        out
    }

    /// Answers a scrape: picks the format from the `Accept` header value, appends the body
    /// to `out` and returns its `Content-Type`.
    pub fn serve(&self, accept: &str, out: &mut Vec<u8>) -> &'static str {
        let format = super::encode::negotiate(accept);
        self.render_into(format, out);
        format.content_type()
    }
}

/// Registers a family `name` with one series, labelled `values`, and returns that series.
fn single_series<M: Metric + Default + 'static>(
    reg: &mut Registry,
    name: &'static str,
    help: &'static str,
    unit: Option<&'static str>,
    labels: &'static [&'static str],
    values: &[&str],
) -> Arc<M> {
    let mut family: Family<M> = Family::new(name, help, labels);
    if let Some(unit) = unit {
        family = family.unit(unit);
    }
    let series = family.child(values);
    reg.register(family);
    series
}

/// Registers the engine's families (label `disk`) and returns their handles.
fn build_disk(reg: &mut Registry, cfg: &GuestConfig<'_>) -> DiskMetrics {
    let d = cfg.disk;
    let mut fams = RequestFamilies::new(Prefix::Disk);
    let requests = fams.child(d);
    fams.register(reg);
    const DISK: &[&str] = &["disk"];
    let up = single_series::<Gauge>(
        reg,
        "qcow_metal_disk_up",
        "1 when the disk image is open and served, 0 when it could not be opened.",
        None,
        DISK,
        &[d],
    );
    let virtual_size = single_series::<Gauge>(
        reg,
        "qcow_metal_disk_virtual_size_bytes",
        "Size of the virtual disk that clients see.",
        Some("bytes"),
        DISK,
        &[d],
    );
    let cluster_size = single_series::<Gauge>(
        reg,
        "qcow_metal_disk_cluster_size_bytes",
        "Cluster size of the qcow2 image (0 for a raw disk).",
        Some("bytes"),
        DISK,
        &[d],
    );
    let data_bytes = single_series::<Gauge>(
        reg,
        "qcow_metal_disk_data_bytes",
        "Bytes of image clusters that hold guest data.",
        Some("bytes"),
        DISK,
        &[d],
    );
    let metadata_bytes = single_series::<Gauge>(
        reg,
        "qcow_metal_disk_metadata_bytes",
        "Bytes of image clusters that hold metadata (header, L1/L2 tables, refcount structures).",
        Some("bytes"),
        DISK,
        &[d],
    );
    let image_extent = single_series::<Gauge>(
        reg,
        "qcow_metal_disk_image_extent_bytes",
        "End of the last allocated cluster: the size the host file must have.",
        Some("bytes"),
        DISK,
        &[d],
    );
    let free_clusters = single_series::<Gauge>(
        reg,
        "qcow_metal_disk_free_clusters",
        "Clusters inside the image extent that are free for reuse.",
        None,
        DISK,
        &[d],
    );
    let clusters_allocated = single_series::<Counter>(
        reg,
        "qcow_metal_disk_clusters_allocated",
        "Clusters allocated by the engine.",
        None,
        DISK,
        &[d],
    );
    let clusters_freed = single_series::<Counter>(
        reg,
        "qcow_metal_disk_clusters_freed",
        "Clusters freed by the engine.",
        None,
        DISK,
        &[d],
    );
    let cow_bytes = single_series::<Counter>(
        reg,
        "qcow_metal_disk_cow_bytes",
        "Bytes copied by copy-on-write when a cluster was partly written.",
        Some("bytes"),
        DISK,
        &[d],
    );
    let mut hits: Family<Counter> = Family::new(
        "qcow_metal_disk_cache_hits",
        "Metadata cache lookups served from memory, by cache.",
        &["disk", "cache"],
    );
    let mut misses: Family<Counter> = Family::new(
        "qcow_metal_disk_cache_misses",
        "Metadata cache lookups that read the device, by cache.",
        &["disk", "cache"],
    );
    let cache_hits = [hits.child(&[d, "l2"]), hits.child(&[d, "refcount"])];
    let cache_misses = [misses.child(&[d, "l2"]), misses.child(&[d, "refcount"])];
    reg.register(hits);
    reg.register(misses);
    let metadata_written = single_series::<Counter>(
        reg,
        "qcow_metal_disk_metadata_written_bytes",
        "Bytes of metadata (tables, refcounts, header) written to the device.",
        Some("bytes"),
        DISK,
        &[d],
    );
    let overlaps = single_series::<Counter>(
        reg,
        "qcow_metal_disk_metadata_overlaps",
        "Writes refused because they would have overwritten metadata (each marks the image corrupt).",
        None,
        DISK,
        &[d],
    );
    let mut reclaim_f: Family<Counter> = Family::new(
        "qcow_metal_disk_reclaim_bytes",
        "Bytes of clusters through each stage of space reclaim: junk (unused, dirty), erased, available (reusable), copied, flushed (copies durable) and referenced (references rewritten).",
        &["disk", "stage"],
    )
    .unit("bytes");
    let reclaim = RECLAIM_STAGES.map(|stage| reclaim_f.child(&[d, stage]));
    reg.register(reclaim_f);
    let junk_now = single_series::<Gauge>(
        reg,
        "qcow_metal_disk_reclaim_junk_bytes",
        "Bytes of junk now: clusters freed by trims and overwrites whose refcounts have not dropped yet.",
        Some("bytes"),
        DISK,
        &[d],
    );
    let available_now = single_series::<Gauge>(
        reg,
        "qcow_metal_disk_reclaim_available_bytes",
        "Bytes available now: free clusters inside the image extent, reusable by writes and by compaction.",
        Some("bytes"),
        DISK,
        &[d],
    );
    let mut state_f: Family<Gauge> = Family::new(
        "qcow_metal_disk_compaction_state",
        "What online compaction is doing: 1 for the current state (off, idle, waiting: a pass paused by NBD requests or the rate limit, running), 0 for the others.",
        &["disk", "state"],
    );
    let compaction_state = CompactionState::ALL.map(|st| state_f.child(&[d, st.name()]));
    reg.register(state_f);
    let compaction_passes = single_series::<Counter>(
        reg,
        "qcow_metal_disk_compaction_passes",
        "Online compaction passes finished (each moves what it can from the image's tail into free space below).",
        None,
        DISK,
        &[d],
    );
    DiskMetrics {
        requests,
        virtual_size,
        cluster_size,
        data_bytes,
        metadata_bytes,
        image_extent,
        free_clusters,
        up,
        clusters_allocated,
        clusters_freed,
        cow_bytes,
        cache_hits,
        cache_misses,
        metadata_written,
        overlaps,
        reclaim,
        roots: Arc::new(Counter::new()),
        junk_now,
        available_now,
        compaction_state,
        compacting: Arc::new(Gauge::new()),
        compaction_passes,
    }
}

/// Registers the block device's families (label `device`) and returns their handles.
fn build_blockdev(reg: &mut Registry, device: &str) -> BlockDeviceMetrics {
    let mut fams = RequestFamilies::new(Prefix::Blockdev);
    let requests = fams.child(device);
    fams.register(reg);
    let in_flight = single_series::<Gauge>(
        reg,
        "qcow_metal_blockdev_in_flight",
        "Block device requests submitted and not yet completed.",
        None,
        &["device"],
        &[device],
    );
    let capacity = single_series::<Gauge>(
        reg,
        "qcow_metal_blockdev_capacity_bytes",
        "Size of the block device: for the disk, the host file as the guest sees it.",
        Some("bytes"),
        &["device"],
        &[device],
    );
    BlockDeviceMetrics {
        requests,
        in_flight,
        capacity,
    }
}

/// Registers the NBD export's families (label `export`) and returns their handles.
fn build_nbd(reg: &mut Registry, export: &str) -> NbdMetrics {
    const EXPORT: &[&str] = &["export"];
    let connections_active = single_series::<Gauge>(
        reg,
        "qcow_metal_nbd_connections_active",
        "NBD connections open now.",
        None,
        EXPORT,
        &[export],
    );
    let connections_total = single_series::<Counter>(
        reg,
        "qcow_metal_nbd_connections",
        "NBD connections accepted.",
        None,
        EXPORT,
        &[export],
    );
    let sessions_total = single_series::<Counter>(
        reg,
        "qcow_metal_nbd_sessions",
        "NBD connections that completed the handshake.",
        None,
        EXPORT,
        &[export],
    );
    let protocol_errors = single_series::<Counter>(
        reg,
        "qcow_metal_nbd_protocol_errors",
        "NBD connections closed because the client broke the protocol.",
        None,
        EXPORT,
        &[export],
    );
    let mut req_f: Family<Counter> = Family::new(
        "qcow_metal_nbd_requests",
        "NBD requests answered, by command.",
        &["export", "command"],
    );
    let requests = NBD_COMMANDS.map(|c| req_f.child(&[export, c]));
    reg.register(req_f);
    let mut err_f: Family<Counter> = Family::new(
        "qcow_metal_nbd_errors",
        "NBD error replies, by error.",
        &["export", "error"],
    );
    let errors = NBD_ERRORS.map(|e| err_f.child(&[export, e]));
    reg.register(err_f);
    let mut bytes_f: Family<Counter> = Family::new(
        "qcow_metal_nbd_bytes",
        "Bytes covered by successful NBD requests, by operation.",
        &["export", "op"],
    )
    .unit("bytes");
    let bytes = NBD_BYTE_OPS.map(|o| bytes_f.child(&[export, o]));
    reg.register(bytes_f);
    NbdMetrics {
        connections_active,
        connections_total,
        sessions_total,
        protocol_errors,
        requests,
        errors,
        bytes,
    }
}

/// Registers the HTTP responder's families and returns their handles.
fn build_http(reg: &mut Registry) -> HttpMetrics {
    let mut req_f: Family<Counter> = Family::new(
        "qcow_metal_http_requests",
        "HTTP responses sent, by status code.",
        &["code"],
    );
    let requests = HTTP_CODES.map(|code| {
        let mut buf = [0u8; 3];
        let text = code_text(code, &mut buf);
        req_f.child(&[text])
    });
    reg.register(req_f);
    let bad_requests = single_series::<Counter>(
        reg,
        "qcow_metal_http_bad_requests",
        "HTTP requests rejected as malformed or over a limit.",
        None,
        &[],
        &[],
    );
    let timeouts = single_series::<Counter>(
        reg,
        "qcow_metal_http_timeouts",
        "HTTP connections closed by the idle timeout.",
        None,
        &[],
        &[],
    );
    let received = single_series::<Counter>(
        reg,
        "qcow_metal_http_received_bytes",
        "HTTP request bytes received.",
        Some("bytes"),
        &[],
        &[],
    );
    let sent = single_series::<Counter>(
        reg,
        "qcow_metal_http_sent_bytes",
        "HTTP response bytes sent.",
        Some("bytes"),
        &[],
        &[],
    );
    let gzip = single_series::<Counter>(
        reg,
        "qcow_metal_http_gzip_responses",
        "HTTP responses sent gzip-compressed.",
        None,
        &[],
        &[],
    );
    let mut enc_f: Family<Histogram> = Family::new(
        "qcow_metal_http_scrape_encode_seconds",
        "Time to encode the /metrics exposition.",
        &[],
    )
    .unit("seconds");
    let scrape_encode = enc_f.histogram(&[], Histogram::latency);
    reg.register(enc_f);
    HttpMetrics {
        requests,
        bad_requests,
        timeouts,
        received,
        sent,
        gzip,
        scrape_encode,
    }
}

/// Writes a three-digit status code into `buf` (codes are 100..=999).
fn code_text(code: u16, buf: &mut [u8; 3]) -> &str {
    let code = code.clamp(100, 999);
    buf[0] = b'0' + (code / 100) as u8;
    buf[1] = b'0' + (code / 10 % 10) as u8;
    buf[2] = b'0' + (code % 10) as u8;
    core::str::from_utf8(buf).unwrap_or("000")
}

/// Registers the guest-wide families (uptime, heap, build, network) and returns their handles.
fn build_system(reg: &mut Registry, cfg: &GuestConfig<'_>) -> SystemMetrics {
    let mut up_f: Family<FloatGauge> = Family::new(
        "qcow_metal_guest_uptime_seconds",
        "Seconds since the guest started.",
        &[],
    )
    .unit("seconds");
    let uptime = up_f.child(&[]);
    reg.register(up_f);
    let heap_size = single_series::<Gauge>(
        reg,
        "qcow_metal_guest_heap_size_bytes",
        "Bytes of RAM given to the guest's heap.",
        Some("bytes"),
        &[],
        &[],
    );
    let heap_used = single_series::<Gauge>(
        reg,
        "qcow_metal_guest_heap_used_bytes",
        "Bytes of the guest's heap in use.",
        Some("bytes"),
        &[],
        &[],
    );
    let mut info: Family<InfoValue> = Family::new(
        "qcow_metal_build",
        "The qcow-metal build the guest runs.",
        &["version"],
    );
    info.child(&[cfg.version]);
    reg.register(info);
    let labels: &'static [&'static str] = &["interface", "direction"];
    let mut packets_f: Family<Counter> = Family::new(
        "qcow_metal_net_packets",
        "Packets through the guest's network interface, by direction.",
        labels,
    );
    let packets = ["in", "out"].map(|dir| packets_f.child(&[cfg.interface, dir]));
    reg.register(packets_f);
    let mut bytes_f: Family<Counter> = Family::new(
        "qcow_metal_net_bytes",
        "Bytes of frames through the guest's network interface, by direction.",
        labels,
    )
    .unit("bytes");
    let bytes = ["in", "out"].map(|dir| bytes_f.child(&[cfg.interface, dir]));
    reg.register(bytes_f);
    SystemMetrics {
        uptime,
        heap_size,
        heap_used,
        packets,
        bytes,
    }
}

/// Registers ocaml-qcow's `Mirage_qcow_*` families over the same counters as `disk`'s.
fn build_mirage(reg: &mut Registry, id: &str, disk: &DiskMetrics) {
    let shared: [(&'static str, &'static str, Arc<Counter>); 10] = [
        (
            "Mirage_qcow_reads",
            "Bytes read from the virtual disk.",
            disk.requests.bytes_counter(IoOp::Read),
        ),
        (
            "Mirage_qcow_writes",
            "Bytes written to the virtual disk.",
            disk.requests.bytes_counter(IoOp::Write),
        ),
        (
            "Mirage_qcow_discards",
            "Bytes discarded from the virtual disk.",
            disk.requests.bytes_counter(IoOp::Discard),
        ),
        (
            "Mirage_qcow_junk",
            "Bytes of clusters that became junk.",
            disk.reclaim[0].clone(),
        ),
        (
            "Mirage_qcow_erased",
            "Bytes of junk clusters erased.",
            disk.reclaim[1].clone(),
        ),
        (
            "Mirage_qcow_available",
            "Bytes of clusters made available for reuse.",
            disk.reclaim[2].clone(),
        ),
        (
            "Mirage_qcow_roots",
            "Bytes of clusters registered as reclaim roots.",
            disk.roots.clone(),
        ),
        (
            "Mirage_qcow_copied",
            "Bytes of clusters copied when moving them.",
            disk.reclaim[3].clone(),
        ),
        (
            "Mirage_qcow_flushed",
            "Bytes of cluster copies flushed.",
            disk.reclaim[4].clone(),
        ),
        (
            "Mirage_qcow_referenced",
            "Bytes of moved clusters whose references were rewritten.",
            disk.reclaim[5].clone(),
        ),
    ];
    for (name, help, counter) in shared {
        let mut f: Family<LegacyCounter> = Family::new(name, help, &["id"]).unit("bytes");
        f.add(&[id], Arc::new(LegacyCounter(counter)));
        reg.register(f);
    }
    let gauges: [(&'static str, &'static str, &Arc<Gauge>); 5] = [
        (
            "Mirage_qcow_used",
            "Bytes of clusters holding guest data.",
            &disk.data_bytes,
        ),
        (
            "Mirage_qcow_size",
            "Size of the image file in bytes.",
            &disk.image_extent,
        ),
        (
            "Mirage_qcow_junk_now",
            "Bytes of junk clusters now.",
            &disk.junk_now,
        ),
        (
            "Mirage_qcow_available_now",
            "Bytes of clusters available for reuse now.",
            &disk.available_now,
        ),
        (
            "Mirage_qcow_compacting",
            "1 while a compaction pass is on, 0 otherwise.",
            &disk.compacting,
        ),
    ];
    for (name, help, g) in gauges {
        let mut f: Family<Gauge> = Family::new(name, help, &["id"]);
        if name != "Mirage_qcow_compacting" {
            f = f.unit("bytes");
        }
        f.add(&[id], g.clone());
        reg.register(f);
    }
}

impl From<&crate::http::HttpStatsSnapshot> for HttpSnapshot {
    fn from(s: &crate::http::HttpStatsSnapshot) -> Self {
        let mut out = HttpSnapshot {
            bad_requests: s.bad_requests,
            timeouts: s.timeouts,
            bytes_received: s.bytes_received,
            bytes_sent: s.bytes_sent,
            gzip_responses: s.gzip_responses,
            ..HttpSnapshot::default()
        };
        for (code, count) in s.by_code() {
            // Every code the responder sends has a series (checked by a test).
            out.set_code(code, count);
        }
        out
    }
}

impl From<&crate::nbd::NbdStats> for NbdSnapshot {
    fn from(s: &crate::nbd::NbdStats) -> Self {
        let mut out = NbdSnapshot {
            connections_active: s.connections_active,
            connections_total: s.connections_total,
            sessions_total: s.sessions_total,
            protocol_errors: s.protocol_errors,
            bytes: [
                s.bytes_read,
                s.bytes_written,
                s.bytes_trimmed,
                s.bytes_zeroed,
            ],
            ..NbdSnapshot::default()
        };
        // Matched by name, so the two orders need not agree (a test checks every name).
        for cmd in crate::nbd::Command::ALL {
            if let Some(i) = NBD_COMMANDS.iter().position(|&n| n == cmd.name()) {
                out.requests[i] = s.requests_of(cmd);
            }
        }
        for e in crate::nbd::NbdError::ALL {
            if let Some(i) = NBD_ERRORS.iter().position(|&n| n == e.name()) {
                out.errors[i] = s.errors_of(e);
            }
        }
        out
    }
}

impl EngineSnapshot {
    /// The snapshot of a qcow2 engine from its space accounting and statistics. The
    /// engine counts reclaim stages in clusters; the metrics count them in bytes. The
    /// compaction state is the engine's own (running while its last step left work); the
    /// guest replaces it with its scheduler's.
    pub fn from_qcow2(space: &crate::qcow2::SpaceInfo, stats: &crate::qcow2::Stats) -> Self {
        let bytes = |clusters: u64| clusters.saturating_mul(space.cluster_size);
        EngineSnapshot {
            virtual_size: space.virtual_size,
            cluster_size: space.cluster_size,
            data_bytes: space.data_bytes,
            metadata_bytes: space.metadata_bytes,
            image_extent: space.image_extent,
            free_clusters: space.free_clusters,
            clusters_allocated: stats.clusters_allocated,
            clusters_freed: stats.clusters_freed,
            cow_bytes: stats.cow_bytes,
            l2_cache_hits: stats.l2_cache_hits,
            l2_cache_misses: stats.l2_cache_misses,
            refcount_cache_hits: stats.refcount_cache_hits,
            refcount_cache_misses: stats.refcount_cache_misses,
            metadata_written_bytes: stats.metadata_bytes_written,
            reclaim: [
                bytes(stats.reclaim_junk),
                bytes(stats.reclaim_erased),
                bytes(stats.reclaim_available),
                bytes(stats.reclaim_copied),
                bytes(stats.reclaim_flushed),
                bytes(stats.reclaim_referenced),
            ],
            reclaim_roots: 0,
            overlaps_refused: stats.overlaps_refused,
            junk_bytes: bytes(stats.reclaim_junk_now),
            available_bytes: bytes(space.free_clusters),
            compaction: match stats.compaction_state {
                crate::qcow2::CompactionState::Running => CompactionState::Running,
                _ => CompactionState::Idle,
            },
            compaction_passes: 0,
        }
    }
}
