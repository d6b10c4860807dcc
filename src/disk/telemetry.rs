//! Telemetry of the virtual disk (label `disk`): its request counters, kept by
//! [`Instrumented`], whether it is up, what online compaction does, the engine's families
//! ([`crate::qcow2::telemetry`]) and, on request, ocaml-qcow's `Mirage_qcow_*` families.

use super::{DiskError, Extent, VirtualDisk};
use crate::blkqueue::pipeline::{HostRun, MappedWrite, NewRefs, QueuedDisk};
use crate::blkqueue::queue::BlockQueue;
use crate::block::telemetry::{HasRequests, IoOp, Recorder, RequestFamilyNames, RequestMetrics};
use crate::compaction::CompactionState;
use crate::metrics::{Collector, Encoder, Family, Gauge, Meta, Value};
use crate::qcow2::telemetry::{EngineFigures, ReclaimStage};
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;

/// The disk's request families.
const DISK_REQUESTS: RequestFamilyNames = RequestFamilyNames {
    labels: &["disk", "op"],
    requests: (
        "qcow_metal_disk_requests",
        "Requests to the virtual disk that completed successfully, by operation.",
    ),
    errors: (
        "qcow_metal_disk_errors",
        "Requests to the virtual disk that failed, by operation (not counted in requests).",
    ),
    bytes: (
        "qcow_metal_disk_bytes",
        "Bytes covered by successful requests to the virtual disk (read, written, discarded or zeroed), by operation.",
    ),
    latency: (
        "qcow_metal_disk_request_duration_seconds",
        "Time from start to completion of successful requests to the virtual disk, by operation.",
    ),
};

/// What a scrape reads about the disk beyond its request counters.
#[derive(Debug, Clone, Copy)]
pub struct DiskFigures<'a> {
    /// The engine's space and counters.
    pub engine: EngineFigures<'a>,
    /// What online compaction is doing.
    pub compaction: CompactionState,
    /// Compaction passes finished since boot.
    pub compaction_passes: u64,
}

/// The metrics of one virtual disk (the qcow2 engine, or the raw disk), label `disk`.
pub struct DiskMetrics {
    /// Request counters, updated by [`Instrumented`].
    pub requests: RequestMetrics,
    name: String,
    up_family: Family<Gauge>,
    up: Arc<Gauge>,
}

impl fmt::Debug for DiskMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiskMetrics")
            .field("name", &self.name)
            .field("up", &self.up.get())
            .finish_non_exhaustive()
    }
}

impl HasRequests for DiskMetrics {
    fn request_metrics(&self) -> &RequestMetrics {
        &self.requests
    }
}

impl DiskMetrics {
    /// The families of the disk `name` (the export name), at zero and down.
    pub fn new(name: &str) -> Self {
        let mut up_family = Family::new(
            "qcow_metal_disk_up",
            "1 when the disk image is open and served, 0 when it could not be opened.",
            &["disk"],
        );
        DiskMetrics {
            requests: RequestMetrics::new(&DISK_REQUESTS, name),
            name: String::from(name),
            up: up_family.child(&[name]),
            up_family,
        }
    }

    /// Says whether the image is open and served (`qcow_metal_disk_up` 1 or 0).
    pub fn set_up(&self, up: bool) {
        self.up.set(i64::from(up));
    }

    /// Writes the disk's families: requests, up, the engine's, compaction.
    pub fn encode(&self, enc: &mut Encoder<'_>, f: &DiskFigures<'_>) -> fmt::Result {
        let disk = self.name.as_str();
        self.requests.encode(enc)?;
        self.up_family.encode(enc)?;
        crate::qcow2::telemetry::encode(enc, disk, &f.engine)?;
        enc.family(
            &Meta::gauge(
                "qcow_metal_disk_compaction_state",
                "What online compaction is doing: 1 for the current state (off, idle, waiting: a pass paused by NBD requests or the rate limit, running), 0 for the others.",
            ),
            &["disk", "state"],
            CompactionState::ALL
                .map(|st| ([disk, st.name()], Value::U64(u64::from(st == f.compaction)))),
        )?;
        enc.family(
            &Meta::counter(
                "qcow_metal_disk_compaction_passes",
                "Online compaction passes finished (each moves what it can from the image's tail into free space below).",
            ),
            &["disk"],
            [([disk], Value::U64(f.compaction_passes))],
        )
    }

    /// Writes ocaml-qcow's `Mirage_qcow_*` families (label `id`, in bytes) from the same
    /// counts as ours. Their counters have no `_total`, as ocaml-qcow exposes them.
    pub fn encode_mirage(&self, enc: &mut Encoder<'_>, f: &DiskFigures<'_>) -> fmt::Result {
        let id = self.name.as_str();
        let s = f.engine.stats();
        let reclaim = |stage: ReclaimStage| f.engine.bytes(stage.clusters(&s));
        let counters: [(&'static str, &'static str, u64); 10] = [
            (
                "Mirage_qcow_reads",
                "Bytes read from the virtual disk.",
                self.requests.bytes(IoOp::Read),
            ),
            (
                "Mirage_qcow_writes",
                "Bytes written to the virtual disk.",
                self.requests.bytes(IoOp::Write),
            ),
            (
                "Mirage_qcow_discards",
                "Bytes discarded from the virtual disk.",
                self.requests.bytes(IoOp::Discard),
            ),
            (
                "Mirage_qcow_junk",
                "Bytes of clusters that became junk.",
                reclaim(ReclaimStage::Junk),
            ),
            (
                "Mirage_qcow_erased",
                "Bytes of junk clusters erased.",
                reclaim(ReclaimStage::Erased),
            ),
            (
                "Mirage_qcow_available",
                "Bytes of clusters made available for reuse.",
                reclaim(ReclaimStage::Available),
            ),
            (
                "Mirage_qcow_roots",
                "Bytes of clusters registered as reclaim roots.",
                // The engine has no reclaim roots (ocaml-qcow's GC does).
                0,
            ),
            (
                "Mirage_qcow_copied",
                "Bytes of clusters copied when moving them.",
                reclaim(ReclaimStage::Copied),
            ),
            (
                "Mirage_qcow_flushed",
                "Bytes of cluster copies flushed.",
                reclaim(ReclaimStage::Flushed),
            ),
            (
                "Mirage_qcow_referenced",
                "Bytes of moved clusters whose references were rewritten.",
                reclaim(ReclaimStage::Referenced),
            ),
        ];
        for (name, help, v) in counters {
            let meta = Meta::legacy_counter(name, help).unit("bytes");
            enc.family(&meta, &["id"], [([id], Value::U64(v))])?;
        }
        let compacting = matches!(
            f.compaction,
            CompactionState::Waiting | CompactionState::Running
        );
        let gauges: [(Meta, u64); 5] = [
            (
                Meta::gauge("Mirage_qcow_used", "Bytes of clusters holding guest data.")
                    .unit("bytes"),
                f.engine.space.data_bytes,
            ),
            (
                Meta::gauge("Mirage_qcow_size", "Size of the image file in bytes.").unit("bytes"),
                f.engine.space.image_extent,
            ),
            (
                Meta::gauge("Mirage_qcow_junk_now", "Bytes of junk clusters now.").unit("bytes"),
                f.engine.bytes(s.reclaim_junk_now),
            ),
            (
                Meta::gauge(
                    "Mirage_qcow_available_now",
                    "Bytes of clusters available for reuse now.",
                )
                .unit("bytes"),
                f.engine.bytes(f.engine.space.free_clusters),
            ),
            (
                Meta::gauge(
                    "Mirage_qcow_compacting",
                    "1 while a compaction pass is on, 0 otherwise.",
                ),
                u64::from(compacting),
            ),
        ];
        for (meta, v) in &gauges {
            enc.family(meta, &["id"], [([id], Value::U64(*v))])?;
        }
        Ok(())
    }
}

/// A [`VirtualDisk`] whose requests are counted: read, write, discard, write-zeroes and
/// flush (block status is not a request of the disk and is passed through uncounted).
pub struct Instrumented<V, H: HasRequests = DiskMetrics> {
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

    fn views(&mut self) -> alloc::vec::Vec<alloc::string::String> {
        self.inner.views()
    }

    fn select_view(&mut self, name: Option<&str>) -> Result<(), DiskError> {
        self.inner.select_view(name)
    }

    fn dirty_bitmaps(&mut self) -> alloc::vec::Vec<alloc::string::String> {
        self.inner.dirty_bitmaps()
    }

    fn dirty_status(
        &mut self,
        name: &str,
        offset: u64,
        len: u64,
    ) -> Result<(bool, u64), DiskError> {
        self.inner.dirty_status(name, offset, len)
    }
}

/// The queued side of an instrumented disk: reads and writes whose data a
/// [`crate::blkqueue::pipeline::Pipeline`] moves through the device's queue are counted
/// when they finish, as [`VirtualDisk::read`] and [`VirtualDisk::write`] count theirs (one
/// request each, its bytes, the time from start to completion, or an error), so the
/// disk's families read the same whichever path served a request.
impl<V: QueuedDisk, H: HasRequests> QueuedDisk for Instrumented<V, H> {
    fn map_read(&mut self, offset: u64, len: u64) -> Result<Option<Vec<HostRun>>, DiskError> {
        self.inner.map_read(offset, len)
    }

    fn map_overwrite(&mut self, offset: u64, len: u64) -> Result<Option<Vec<HostRun>>, DiskError> {
        self.inner.map_overwrite(offset, len)
    }

    fn map_write(&mut self, offset: u64, len: u64) -> Result<Option<MappedWrite>, DiskError> {
        self.inner.map_write(offset, len)
    }

    fn finish_write(
        &mut self,
        refs: NewRefs,
        result: Result<(), DiskError>,
    ) -> Result<(), DiskError> {
        self.inner.finish_write(refs, result)
    }

    fn queue(&mut self) -> &mut dyn BlockQueue {
        self.inner.queue()
    }

    fn queued_start(&mut self) -> u64 {
        (self.recorder.clock)()
    }

    fn queued_done(&mut self, write: bool, bytes: u64, started: u64, ok: bool) {
        let r = &self.recorder;
        r.metrics
            .request_metrics()
            .record_queued(r.clock, write, bytes, started, ok);
    }
}
