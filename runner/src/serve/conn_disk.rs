//! One connection's way to the shared engine: [`ConnDisk`], the [`QueuedDisk`] its NBD
//! session is driven with for one turn.
//!
//! The engine is behind a mutex, taken for one call at a time: a mapping
//! ([`Qcow2::map_read`], [`Qcow2::map_overwrite`]), or a request on the engine's own path.
//! The data of mapped requests then moves through the connection's [`PoolQueue`] with the
//! mutex let go, in parallel with other connections' requests and engine calls.
//!
//! What keeps that safe is the gate, a read-write lock beside the mutex:
//! - a connection holds the gate for reading from its first mapping of a turn until the
//!   turn ends (all its pieces have completed by then: a batch finishes before
//!   [`Connection::process_queued`] returns), so no host cluster it was given can be freed
//!   or reused while its data moves;
//! - requests that may change mappings or free clusters (writes on the engine's path, which
//!   allocate or copy, discard, write-zeroes) and flushes take the gate for writing, so they
//!   run when no mapped data is moving anywhere. The pipeline runs such a request only when
//!   nothing of its own connection is in flight, so the connection lets its read side go
//!   first.
//! - Lock order: the gate before the mutex, never the other way round.
//!
//! A client of a snapshot view (`EXPORT@NAME`) holds the engine for its whole call, with
//! the view selected, as before the queue existed: its requests take the engine's path.
//!
//! [`Connection::process_queued`]: qcow_metal::nbd::Connection::process_queued

use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard};

use qcow_metal::blkqueue::pipeline::{HostRun, QueuedDisk};
use qcow_metal::blkqueue::queue::BlockQueue;
use qcow_metal::block::telemetry::HasRequests;
use qcow_metal::disk::telemetry::DiskMetrics;
use qcow_metal::disk::{DiskError, Extent, VirtualDisk, check_request};
use qcow_metal::service::disk::Disk;

use super::Device;
use super::io_pool::PoolQueue;

/// The engine as the connections share it.
pub(super) type Engine = Mutex<Option<Disk<Device>>>;

fn lock(m: &Engine) -> MutexGuard<'_, Option<Disk<Device>>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// See the module documentation.
pub(super) struct ConnDisk<'a> {
    engine: &'a Engine,
    gate: &'a RwLock<()>,
    queue: &'a mut PoolQueue,
    /// The gate's read side, held while this turn's mapped data may be moving.
    reading: Option<RwLockReadGuard<'a, ()>>,
    /// The engine, held while a view is selected.
    view: Option<MutexGuard<'a, Option<Disk<Device>>>>,
    size: u64,
    read_only: bool,
    /// Where queued requests are counted (the engine's wrapper counts the others).
    metrics: &'a Counted,
}

/// The disk's request metrics and their clock (nanoseconds).
pub(super) struct Counted {
    pub(super) disk: Arc<DiskMetrics>,
    pub(super) clock: fn() -> u64,
}

impl<'a> ConnDisk<'a> {
    /// The engine for one turn of a connection, whose pieces go on `queue`. `size` and
    /// `read_only` are the disk's (they do not change while it is served).
    pub(super) fn new(
        engine: &'a Engine,
        gate: &'a RwLock<()>,
        queue: &'a mut PoolQueue,
        metrics: &'a Counted,
        size: u64,
        read_only: bool,
    ) -> Self {
        ConnDisk {
            engine,
            gate,
            queue,
            reading: None,
            view: None,
            size,
            read_only,
            metrics,
        }
    }

    /// Runs `f` on the engine (held already with a view, else locked for the call).
    fn with<R>(
        &mut self,
        f: impl FnOnce(&mut dyn VirtualDisk) -> Result<R, DiskError>,
    ) -> Result<R, DiskError> {
        let mut locked;
        let guard = match &mut self.view {
            Some(g) => g,
            None => {
                locked = lock(self.engine);
                &mut locked
            }
        };
        match guard.as_mut().and_then(|d| d.virtual_disk()) {
            Some(d) => f(d),
            None => Err(DiskError::Unsupported),
        }
    }

    /// [`ConnDisk::with`] for a request that may change mappings: with the gate closed to
    /// mapped data in flight.
    fn with_gate_closed<R>(
        &mut self,
        f: impl FnOnce(&mut dyn VirtualDisk) -> Result<R, DiskError>,
    ) -> Result<R, DiskError> {
        if self.view.is_some() {
            // A view is read-only: the engine refuses changes, and nothing maps.
            return self.with(f);
        }
        self.reading = None;
        let _closed = self.gate.write().unwrap_or_else(|e| e.into_inner());
        self.with(f)
    }

    /// Maps a request for the queue: the gate held open for this turn, then the engine
    /// locked for the mapping only.
    fn map(
        &mut self,
        offset: u64,
        len: u64,
        write: bool,
    ) -> Result<Option<Vec<HostRun>>, DiskError> {
        if write && self.read_only {
            return Err(DiskError::ReadOnly);
        }
        if self.view.is_some() {
            return Ok(None);
        }
        if self.reading.is_none() {
            self.reading = Some(self.gate.read().unwrap_or_else(|e| e.into_inner()));
        }
        let mut guard = lock(self.engine);
        match guard.as_mut() {
            Some(Disk::Qcow2(d)) if write => Ok(d.inner_mut().map_overwrite(offset, len)?),
            Some(Disk::Qcow2(d)) => Ok(d.inner_mut().map_read(offset, len)?),
            Some(Disk::Raw(_)) => {
                check_request(offset, len, self.size)?;
                Ok(Some(vec![HostRun::Data { host: offset, len }]))
            }
            Some(Disk::Unavailable(_)) | None => Err(DiskError::Unsupported),
        }
    }
}

impl VirtualDisk for ConnDisk<'_> {
    fn size(&self) -> u64 {
        match &self.view {
            Some(g) => g.as_ref().map_or(0, |d| d.size()),
            None => self.size,
        }
    }

    fn is_read_only(&self) -> bool {
        self.view.is_some() || self.read_only
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        self.with(|d| d.read(offset, buf))
    }

    fn write(&mut self, offset: u64, buf: &[u8]) -> Result<(), DiskError> {
        self.with_gate_closed(|d| d.write(offset, buf))
    }

    fn flush(&mut self) -> Result<(), DiskError> {
        self.with_gate_closed(|d| d.flush())
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.with_gate_closed(|d| d.discard(offset, len))
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, may_unmap: bool) -> Result<(), DiskError> {
        self.with_gate_closed(|d| d.write_zeroes(offset, len, may_unmap))
    }

    fn block_status(&mut self, offset: u64, len: u64) -> Result<Extent, DiskError> {
        self.with(|d| d.block_status(offset, len))
    }

    fn views(&mut self) -> Vec<String> {
        self.with(|d| Ok(d.views())).unwrap_or_default()
    }

    fn select_view(&mut self, name: Option<&str>) -> Result<(), DiskError> {
        if name.is_none() {
            let result = match self.view {
                Some(_) => self.with(|d| d.select_view(None)),
                None => Ok(()),
            };
            self.view = None;
            return result;
        }
        if self.view.is_none() {
            self.reading = None;
            self.view = Some(lock(self.engine));
        }
        let result = self.with(|d| d.select_view(name));
        if result.is_err() {
            self.view = None;
        }
        result
    }

    fn dirty_bitmaps(&mut self) -> Vec<String> {
        self.with(|d| Ok(d.dirty_bitmaps())).unwrap_or_default()
    }

    fn dirty_status(
        &mut self,
        name: &str,
        offset: u64,
        len: u64,
    ) -> Result<(bool, u64), DiskError> {
        self.with(|d| d.dirty_status(name, offset, len))
    }
}

impl QueuedDisk for ConnDisk<'_> {
    fn map_read(&mut self, offset: u64, len: u64) -> Result<Option<Vec<HostRun>>, DiskError> {
        self.map(offset, len, false)
    }

    fn map_overwrite(&mut self, offset: u64, len: u64) -> Result<Option<Vec<HostRun>>, DiskError> {
        self.map(offset, len, true)
    }

    fn queue(&mut self) -> &mut dyn BlockQueue {
        self.queue
    }

    fn queued_start(&mut self) -> u64 {
        (self.metrics.clock)()
    }

    fn queued_done(&mut self, write: bool, bytes: u64, started: u64, ok: bool) {
        let m = self.metrics;
        m.disk
            .request_metrics()
            .record_queued(m.clock, write, bytes, started, ok);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::thread;
    use std::time::Duration;

    use qcow_metal::block::FileDisk;
    use qcow_metal::block::telemetry::{BlockDeviceMetrics, InstrumentedDevice};
    use qcow_metal::disk::telemetry::{DiskMetrics, Instrumented};
    use qcow_metal::qcow2::{CreateOptions, Qcow2};

    use super::super::io_pool::{IoPool, Metrics};
    use super::*;

    fn clock() -> u64 {
        0
    }

    #[test]
    fn a_discard_waits_for_mapped_data_in_flight_and_reads_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.qcow2");
        let blockdev = Arc::new(BlockDeviceMetrics::new("t"));
        let dev =
            InstrumentedDevice::new(FileDisk::create(&path).unwrap(), blockdev.clone(), clock);
        let opts = CreateOptions {
            virtual_size: 4 << 20,
            ..CreateOptions::default()
        };
        let mut q = Qcow2::create(dev, &opts).unwrap();
        q.write(0, &[7; 65536]).unwrap();
        let disk_metrics = Arc::new(DiskMetrics::new("t"));
        let disk = Disk::Qcow2(Box::new(Instrumented::new(q, disk_metrics, clock)));
        let engine: Engine = Mutex::new(Some(disk));
        let gate = RwLock::new(());
        let pool = IoPool::new(
            FileDisk::open(&path, false).unwrap(),
            2,
            Metrics {
                device: blockdev,
                clock,
            },
        );
        let (mut qa, mut qb) = (pool.queue(), pool.queue());
        let counted = Counted {
            disk: Arc::new(DiskMetrics::new("t")),
            clock,
        };
        let mut a = ConnDisk::new(&engine, &gate, &mut qa, &counted, 4 << 20, false);
        // A maps an overwrite of the allocated cluster: its data may now be moving.
        let runs = a.map_overwrite(4096, 4096).unwrap().unwrap();
        assert!(matches!(runs[..], [HostRun::Data { len: 4096, .. }]));
        let done = AtomicBool::new(false);
        thread::scope(|s| {
            let b = s.spawn(|| {
                let mut b = ConnDisk::new(&engine, &gate, &mut qb, &counted, 4 << 20, false);
                // Another connection's reads go on meanwhile...
                let mut buf = [0u8; 512];
                b.read(0, &mut buf).unwrap();
                assert_eq!(buf, [7; 512]);
                assert!(b.map_read(0, 4096).unwrap().is_some());
                drop(b);
                let mut b = ConnDisk::new(&engine, &gate, &mut qb, &counted, 4 << 20, false);
                // ...but a discard of that cluster waits until A's turn ends.
                b.discard(0, 65536).unwrap();
                done.store(true, Ordering::SeqCst);
            });
            thread::sleep(Duration::from_millis(300));
            assert!(!done.load(Ordering::SeqCst), "the discard did not wait");
            drop(a);
            b.join().unwrap();
        });
        assert!(done.load(Ordering::SeqCst));
    }
}
