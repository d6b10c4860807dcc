//! Telemetry of the block-device layer: per-operation request counters ([`RequestMetrics`],
//! shared with the disk layer), the block device's own families ([`BlockDeviceMetrics`],
//! label `device`) and [`InstrumentedDevice`], which counts every call of a [`BlockDevice`].

use super::{BlockDevice, BlockError};
use crate::metrics::{Collector, Counter, Encoder, Family, Gauge, Histogram};
use alloc::sync::Arc;
use core::fmt;

/// A kind of I/O request, at the disk and at the block device (label `op`).
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

/// Names and help texts of the four request families of one layer.
pub struct RequestFamilyNames {
    /// The label that names the disk or device (`disk`, `device`).
    pub labels: &'static [&'static str; 2],
    /// Successful requests (a counter).
    pub requests: (&'static str, &'static str),
    /// Failed requests (a counter).
    pub errors: (&'static str, &'static str),
    /// Bytes of successful requests (a counter in bytes).
    pub bytes: (&'static str, &'static str),
    /// Latency of successful requests (a histogram in seconds).
    pub latency: (&'static str, &'static str),
}

/// The block device's request families.
const BLOCKDEV_REQUESTS: RequestFamilyNames = RequestFamilyNames {
    labels: &["device", "op"],
    requests: (
        "qcow_metal_blockdev_requests",
        "Block device requests that completed successfully, one per device request (as QEMU counts them), by operation.",
    ),
    errors: (
        "qcow_metal_blockdev_errors",
        "Block device requests that failed, by operation (not counted in requests).",
    ),
    bytes: (
        "qcow_metal_blockdev_bytes",
        "Bytes covered by successful block device requests, by operation.",
    ),
    latency: (
        "qcow_metal_blockdev_request_duration_seconds",
        "Time from submission to completion of successful block device requests, by operation.",
    ),
};

/// Per-operation request counters of one disk or device: requests, errors, bytes, latency,
/// with their four families (labels: the disk or device, and `op`).
pub struct RequestMetrics {
    requests: Family<Counter>,
    errors: Family<Counter>,
    bytes: Family<Counter>,
    latency: Family<Histogram>,
    request_counts: [Arc<Counter>; 5],
    error_counts: [Arc<Counter>; 5],
    byte_counts: [Arc<Counter>; 5],
    latencies: [Arc<Histogram>; 5],
}

impl fmt::Debug for RequestMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestMetrics")
            .field("family", &self.requests.meta().name)
            .finish_non_exhaustive()
    }
}

impl RequestMetrics {
    /// The families `names`, with every `op` series of the disk or device `name`.
    pub fn new(names: &RequestFamilyNames, name: &str) -> Self {
        let mut requests = Family::new(names.requests.0, names.requests.1, names.labels);
        let mut errors = Family::new(names.errors.0, names.errors.1, names.labels);
        let mut bytes = Family::new(names.bytes.0, names.bytes.1, names.labels).unit("bytes");
        let mut latency =
            Family::new(names.latency.0, names.latency.1, names.labels).unit("seconds");
        let request_counts = IoOp::ALL.map(|op| requests.child(&[name, op.name()]));
        let error_counts = IoOp::ALL.map(|op| errors.child(&[name, op.name()]));
        // A flush covers no bytes: its counter exists (always 0) but has no series.
        let byte_counts = IoOp::ALL.map(|op| match op {
            IoOp::Flush => Arc::new(Counter::new()),
            _ => bytes.child(&[name, op.name()]),
        });
        let latencies =
            IoOp::ALL.map(|op| latency.histogram(&[name, op.name()], Histogram::latency));
        RequestMetrics {
            requests,
            errors,
            bytes,
            latency,
            request_counts,
            error_counts,
            byte_counts,
            latencies,
        }
    }

    /// Records a read or (`write`) a write of `bytes` that went through a device queue
    /// ([`crate::blkqueue::pipeline::QueuedDisk::queued_done`]), started at `started` on
    /// `clock` and finished now.
    pub fn record_queued(
        &self,
        clock: fn() -> u64,
        write: bool,
        bytes: u64,
        started: u64,
        ok: bool,
    ) {
        let op = if write { IoOp::Write } else { IoOp::Read };
        self.record(op, bytes, clock().saturating_sub(started), ok);
    }

    /// Records one completed request: with `ok` it counts as a request of `bytes` bytes
    /// that took `latency_ns`; without, as an error only.
    pub fn record(&self, op: IoOp, bytes: u64, latency_ns: u64, ok: bool) {
        let i = op.index();
        if ok {
            self.request_counts[i].inc();
            self.byte_counts[i].add(bytes);
            self.latencies[i].observe(latency_ns);
        } else {
            self.error_counts[i].inc();
        }
    }

    /// Successful requests of one kind.
    pub fn requests(&self, op: IoOp) -> u64 {
        self.request_counts[op.index()].get()
    }

    /// Failed requests of one kind.
    pub fn errors(&self, op: IoOp) -> u64 {
        self.error_counts[op.index()].get()
    }

    /// Bytes of successful requests of one kind.
    pub fn bytes(&self, op: IoOp) -> u64 {
        self.byte_counts[op.index()].get()
    }

    /// The latency histogram of one kind.
    pub fn latency(&self, op: IoOp) -> &Histogram {
        &self.latencies[op.index()]
    }

    /// Writes the four families.
    pub fn encode(&self, enc: &mut Encoder<'_>) -> fmt::Result {
        self.requests.encode(enc)?;
        self.errors.encode(enc)?;
        self.bytes.encode(enc)?;
        self.latency.encode(enc)
    }
}

/// The metrics of a block device under the engine (virtio-blk), label `device`.
///
/// The driver calls [`BlockDeviceMetrics::record`] once per device request it completes,
/// after any splitting, so the counts equal QEMU's `query-blockstats` for the device
/// (which counts write-zeroes among writes and does not count discards).
pub struct BlockDeviceMetrics {
    /// Request counters.
    pub requests: RequestMetrics,
    in_flight_family: Family<Gauge>,
    capacity_family: Family<Gauge>,
    in_flight: Arc<Gauge>,
    capacity: Arc<Gauge>,
}

impl fmt::Debug for BlockDeviceMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockDeviceMetrics")
            .field("in_flight", &self.in_flight.get())
            .field("capacity", &self.capacity.get())
            .finish_non_exhaustive()
    }
}

impl BlockDeviceMetrics {
    /// Every family of the device `device`, at zero.
    pub fn new(device: &str) -> Self {
        let mut in_flight_family = Family::new(
            "qcow_metal_blockdev_in_flight",
            "Block device requests submitted and not yet completed.",
            &["device"],
        );
        let mut capacity_family = Family::new(
            "qcow_metal_blockdev_capacity_bytes",
            "Size of the block device: for the disk, the host file as the guest sees it.",
            &["device"],
        )
        .unit("bytes");
        BlockDeviceMetrics {
            requests: RequestMetrics::new(&BLOCKDEV_REQUESTS, device),
            in_flight: in_flight_family.child(&[device]),
            capacity: capacity_family.child(&[device]),
            in_flight_family,
            capacity_family,
        }
    }

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

    /// Writes the device's families.
    pub fn encode(&self, enc: &mut Encoder<'_>) -> fmt::Result {
        self.requests.encode(enc)?;
        self.in_flight_family.encode(enc)?;
        self.capacity_family.encode(enc)
    }
}

/// Something that holds [`RequestMetrics`] (disk or block-device metrics).
pub trait HasRequests: Send + Sync {
    /// The request counters.
    fn request_metrics(&self) -> &RequestMetrics;
}

impl HasRequests for BlockDeviceMetrics {
    fn request_metrics(&self) -> &RequestMetrics {
        &self.requests
    }
}

impl HasRequests for RequestMetrics {
    fn request_metrics(&self) -> &RequestMetrics {
        self
    }
}

/// Where a wrapper records: the metrics and the clock (nanoseconds, monotonic).
pub(crate) struct Recorder<H> {
    pub(crate) metrics: Arc<H>,
    pub(crate) clock: fn() -> u64,
}

impl<H: HasRequests> Recorder<H> {
    /// Times `f` and records it as one `op` request of `bytes` bytes.
    pub(crate) fn time<T, E>(
        &self,
        op: IoOp,
        bytes: u64,
        f: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, E> {
        let start = (self.clock)();
        let result = f();
        let took = (self.clock)().saturating_sub(start);
        self.metrics
            .request_metrics()
            .record(op, bytes, took, result.is_ok());
        result
    }
}

/// A [`BlockDevice`] whose calls are counted, one request per call. For virtio-blk, where
/// a call may become several device requests, the driver records each device request
/// itself with [`BlockDeviceMetrics::record`] instead.
pub struct InstrumentedDevice<D, H: HasRequests = BlockDeviceMetrics> {
    inner: D,
    recorder: Recorder<H>,
}

impl<D: BlockDevice, H: HasRequests> InstrumentedDevice<D, H> {
    /// Wraps `inner`, recording into `metrics` with `clock` (nanoseconds).
    pub fn new(inner: D, metrics: Arc<H>, clock: fn() -> u64) -> Self {
        InstrumentedDevice {
            inner,
            recorder: Recorder { metrics, clock },
        }
    }

    /// The wrapped device.
    pub fn inner(&self) -> &D {
        &self.inner
    }

    /// Gives the wrapped device back.
    pub fn into_inner(self) -> D {
        self.inner
    }
}

impl<D: BlockDevice, H: HasRequests> BlockDevice for InstrumentedDevice<D, H> {
    fn capacity(&self) -> u64 {
        self.inner.capacity()
    }

    fn is_read_only(&self) -> bool {
        self.inner.is_read_only()
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        let bytes = buf.len() as u64;
        self.recorder
            .time(IoOp::Read, bytes, || self.inner.read_at(offset, buf))
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), BlockError> {
        let bytes = buf.len() as u64;
        self.recorder
            .time(IoOp::Write, bytes, || self.inner.write_at(offset, buf))
    }

    fn flush(&mut self) -> Result<(), BlockError> {
        self.recorder.time(IoOp::Flush, 0, || self.inner.flush())
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.recorder
            .time(IoOp::Discard, len, || self.inner.discard(offset, len))
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.recorder.time(IoOp::WriteZeroes, len, || {
            self.inner.write_zeroes(offset, len)
        })
    }

    fn grow(&mut self, need: u64, want: u64, wait: bool) -> bool {
        self.inner.grow(need, want, wait)
    }

    fn cut(&mut self, len: u64) -> bool {
        self.inner.cut(len)
    }
}
