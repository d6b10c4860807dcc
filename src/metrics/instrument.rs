//! Request-level metrics by wrapping: [`Instrumented`] around a [`VirtualDisk`] and
//! [`InstrumentedDevice`] around a [`BlockDevice`].
//!
//! Each wrapped call is timed with the clock given at construction (nanoseconds, monotonic)
//! and recorded once in [`RequestMetrics`]: a success counts as a request with its bytes and
//! latency, a failure only as an error.

use super::families::{IoOp, RequestMetrics};
use crate::block::{BlockDevice, BlockError};
use crate::disk::{DiskError, Extent, VirtualDisk};
use alloc::sync::Arc;

/// Where a wrapper records: the metrics and the clock (nanoseconds, monotonic).
struct Recorder<H> {
    metrics: Arc<H>,
    clock: fn() -> u64,
}

impl<H: HasRequests> Recorder<H> {
    /// Times `f` and records it as one `op` request of `bytes` bytes.
    fn time<T, E>(&self, op: IoOp, bytes: u64, f: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
        let start = (self.clock)();
        let result = f();
        let took = (self.clock)().saturating_sub(start);
        self.metrics
            .request_metrics()
            .record(op, bytes, took, result.is_ok());
        result
    }
}

/// Something that holds [`RequestMetrics`] (disk or block-device metrics).
pub trait HasRequests: Send + Sync {
    /// The request counters.
    fn request_metrics(&self) -> &RequestMetrics;
}

impl HasRequests for super::families::DiskMetrics {
    fn request_metrics(&self) -> &RequestMetrics {
        &self.requests
    }
}

impl HasRequests for super::families::BlockDeviceMetrics {
    fn request_metrics(&self) -> &RequestMetrics {
        &self.requests
    }
}

impl HasRequests for RequestMetrics {
    fn request_metrics(&self) -> &RequestMetrics {
        self
    }
}

/// A [`VirtualDisk`] whose requests are counted: read, write, discard, write-zeroes and
/// flush (block status is not a request of the disk and is passed through uncounted).
pub struct Instrumented<V, H: HasRequests = super::families::DiskMetrics> {
    inner: V,
    recorder: Recorder<H>,
}

impl<V: VirtualDisk, H: HasRequests> Instrumented<V, H> {
    /// Wraps `inner`, recording into `metrics` with `clock` (nanoseconds).
    pub fn new(inner: V, metrics: Arc<H>, clock: fn() -> u64) -> Self {
        Instrumented {
            inner,
            recorder: Recorder { metrics, clock },
        }
    }

    /// The wrapped disk.
    pub fn inner(&self) -> &V {
        &self.inner
    }

    /// The wrapped disk, mutably (requests made through it are not counted).
    pub fn inner_mut(&mut self) -> &mut V {
        &mut self.inner
    }

    /// Gives the wrapped disk back.
    pub fn into_inner(self) -> V {
        self.inner
    }
}

impl<V: VirtualDisk, H: HasRequests> VirtualDisk for Instrumented<V, H> {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn is_read_only(&self) -> bool {
        self.inner.is_read_only()
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        let bytes = buf.len() as u64;
        self.recorder
            .time(IoOp::Read, bytes, || self.inner.read(offset, buf))
    }

    fn write(&mut self, offset: u64, buf: &[u8]) -> Result<(), DiskError> {
        let bytes = buf.len() as u64;
        self.recorder
            .time(IoOp::Write, bytes, || self.inner.write(offset, buf))
    }

    fn flush(&mut self) -> Result<(), DiskError> {
        self.recorder.time(IoOp::Flush, 0, || self.inner.flush())
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.recorder
            .time(IoOp::Discard, len, || self.inner.discard(offset, len))
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, may_unmap: bool) -> Result<(), DiskError> {
        self.recorder.time(IoOp::WriteZeroes, len, || {
            self.inner.write_zeroes(offset, len, may_unmap)
        })
    }

    fn block_status(&mut self, offset: u64, len: u64) -> Result<Extent, DiskError> {
        self.inner.block_status(offset, len)
    }
}

/// A [`BlockDevice`] whose calls are counted, one request per call. For virtio-blk, where
/// a call may become several device requests, the driver records each device request
/// itself with [`super::BlockDeviceMetrics::record`] instead.
pub struct InstrumentedDevice<D, H: HasRequests = super::families::BlockDeviceMetrics> {
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
