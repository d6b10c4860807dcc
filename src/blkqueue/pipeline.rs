//! Several disk requests in flight at once: a [`Pipeline`] takes requests (from one or more
//! NBD clients), moves the data of reads and of writes that change no metadata through the
//! device's [`BlockQueue`], and hands back each request when it finishes, in whatever order
//! the device completes them.
//!
//! Which requests overlap, and the ordering rules that keep the image safe:
//!
//! - **Queued** (in flight together): a read of any mapped range, a write whose every
//!   cluster is allocated with refcount one ([`QueuedDisk::map_overwrite`]), and a write
//!   that fills whole new clusters ([`QueuedDisk::map_write`]). The first two change no
//!   metadata, so crash safety is the device's own (a write in flight may or may not be on
//!   the disk after a power cut, as on any disk, and nothing points anywhere new). The third
//!   has its clusters allocated (refcount one) before its data goes out, and the references
//!   to them ([`NewRefs`]) are made only when the data has landed
//!   ([`QueuedDisk::finish_write`]): a power cut in between leaks at most the new clusters.
//! - **Synchronous** (a barrier): flush, discard, write-zeroes, writes with FUA, writes that
//!   allocate only part of a cluster or replace shared or compressed clusters, unaligned
//!   requests, reads of compressed clusters. One runs only when nothing is in flight, through the engine's
//!   ordinary path with its metadata ordering; requests behind it wait. So a flush covers
//!   every write that finished before it, and no mapping changes under a request in flight.
//! - **Conflicts**: a request that overlaps one in flight (a read over a write, a write over
//!   anything) waits for it; requests start in the order they came.
//!
//! The caller drives it: [`Pipeline::submit`], then [`Pipeline::run`] whenever the loop comes
//! round (it never waits for the device), and [`Pipeline::next_finished`] for the replies.
//! Engine background work (metadata write-back, compaction) must wait until
//! [`Pipeline::is_idle`].

use super::queue::{BlockQueue, Completion, QueuedOp};
use crate::block::BlockDevice;
use crate::disk::{DiskError, RawDisk, VirtualDisk, check_request};
use alloc::collections::{BTreeMap, VecDeque};
use alloc::vec;
use alloc::vec::Vec;

/// A piece of a guest range on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostRun {
    /// `len` bytes at host byte `host`.
    Data {
        /// First host byte.
        host: u64,
        /// Bytes.
        len: u64,
    },
    /// `len` bytes that read as zeros.
    Zeros {
        /// Bytes.
        len: u64,
    },
}

impl HostRun {
    /// Bytes the run covers.
    pub fn len(&self) -> u64 {
        match self {
            HostRun::Data { len, .. } | HostRun::Zeros { len } => *len,
        }
    }

    /// Whether the run is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Appends `run` to `runs`, merged into the last one when it continues it.
pub fn push_run(runs: &mut Vec<HostRun>, run: HostRun) {
    match (runs.last_mut(), run) {
        (Some(HostRun::Data { host, len }), HostRun::Data { host: h, len: n })
            if *host + *len == h =>
        {
            *len += n
        }
        (Some(HostRun::Zeros { len }), HostRun::Zeros { len: n }) => *len += n,
        _ => runs.push(run),
    }
}

/// Guest ranges a queued write gave new homes: clusters allocated for it before its data
/// went out, referenced only once the data has landed ([`QueuedDisk::finish_write`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewRefs(pub Vec<NewRef>);

impl NewRefs {
    /// Whether the write allocated nothing.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// One guest range of [`NewRefs`] and the host range that will hold it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewRef {
    /// First guest byte.
    pub guest: u64,
    /// First host byte.
    pub host: u64,
    /// Bytes.
    pub len: u64,
}

/// Where a queued write's data goes ([`QueuedDisk::map_write`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MappedWrite {
    /// The host runs, in guest order (only [`HostRun::Data`]).
    pub runs: Vec<HostRun>,
    /// What to reference once the data has landed (empty for a pure overwrite).
    pub refs: NewRefs,
}

/// A virtual disk whose data can be moved through a [`BlockQueue`]: it says where a guest
/// range lives on the device, and gives the device's queue.
pub trait QueuedDisk: VirtualDisk {
    /// Where a read of `len` bytes at `offset` comes from; `None` when only
    /// [`VirtualDisk::read`] can serve it.
    fn map_read(&mut self, offset: u64, len: u64) -> Result<Option<Vec<HostRun>>, DiskError>;

    /// Where a write of `len` bytes at `offset` goes when it changes no metadata (only
    /// [`HostRun::Data`] runs); `None` when only [`VirtualDisk::write`] can do it.
    fn map_overwrite(&mut self, offset: u64, len: u64) -> Result<Option<Vec<HostRun>>, DiskError>;

    /// Where a write of `len` bytes at `offset` goes when its data can move through the
    /// queue, new clusters allocated for it if it needs them: a disk that allocates here
    /// returns the references to make in [`MappedWrite::refs`], and makes them in
    /// [`QueuedDisk::finish_write`] once the data has landed. `None` when only
    /// [`VirtualDisk::write`] can do it. The default allocates nothing:
    /// [`QueuedDisk::map_overwrite`].
    fn map_write(&mut self, offset: u64, len: u64) -> Result<Option<MappedWrite>, DiskError> {
        Ok(self.map_overwrite(offset, len)?.map(|runs| MappedWrite {
            runs,
            refs: NewRefs::default(),
        }))
    }

    /// The data of a write [`QueuedDisk::map_write`] allocated for finished on the device
    /// with `result`: on success the disk references its new clusters now; on failure it
    /// gives them back. Returns the write's result (an error when the references could not
    /// be made). Called only with non-empty `refs`; the default returns `result`.
    fn finish_write(
        &mut self,
        refs: NewRefs,
        result: Result<(), DiskError>,
    ) -> Result<(), DiskError> {
        let _ = refs;
        result
    }

    /// The device's queue.
    fn queue(&mut self) -> &mut dyn BlockQueue;

    /// A stamp taken as a request starts on the queue, handed back to
    /// [`QueuedDisk::queued_done`] (a wrapper that times requests reads its clock here).
    /// The default is 0.
    fn queued_start(&mut self) -> u64 {
        0
    }

    /// A request the [`Pipeline`] served without [`VirtualDisk::read`] or
    /// [`VirtualDisk::write`] finished (its data went through the queue, or mapping it
    /// failed): a write or a read of `bytes` bytes, started at the stamp `started`, which
    /// succeeded or not. For wrappers that count the disk's requests; the default does
    /// nothing. Requests on the synchronous path are counted by the disk's own calls.
    fn queued_done(&mut self, write: bool, bytes: u64, started: u64, ok: bool) {
        let _ = (write, bytes, started, ok);
    }
}

impl<D: BlockDevice + BlockQueue> QueuedDisk for RawDisk<D> {
    fn map_read(&mut self, offset: u64, len: u64) -> Result<Option<Vec<HostRun>>, DiskError> {
        check_request(offset, len, self.size())?;
        Ok(Some(vec![HostRun::Data { host: offset, len }]))
    }
    fn map_overwrite(&mut self, offset: u64, len: u64) -> Result<Option<Vec<HostRun>>, DiskError> {
        check_request(offset, len, self.size())?;
        if self.is_read_only() {
            return Err(DiskError::ReadOnly);
        }
        Ok(Some(vec![HostRun::Data { host: offset, len }]))
    }
    fn queue(&mut self) -> &mut dyn BlockQueue {
        self.device_mut()
    }
}

/// A request to a [`Pipeline`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskOp {
    /// Read `len` bytes at `offset`.
    Read {
        /// First guest byte.
        offset: u64,
        /// Bytes.
        len: usize,
    },
    /// Write `data` at `offset`; with `fua`, durable before it finishes.
    Write {
        /// First guest byte.
        offset: u64,
        /// The bytes (given back when the request finishes).
        data: Vec<u8>,
        /// Force unit access.
        fua: bool,
    },
    /// Make every finished write durable.
    Flush,
    /// Discard `len` bytes at `offset`.
    Discard {
        /// First guest byte.
        offset: u64,
        /// Bytes.
        len: u64,
    },
    /// Zero `len` bytes at `offset`.
    WriteZeroes {
        /// First guest byte.
        offset: u64,
        /// Bytes.
        len: u64,
        /// The disk may free the space.
        may_unmap: bool,
    },
}

impl DiskOp {
    /// The guest range it touches and whether it changes it (`None` for a flush).
    fn range(&self) -> Option<(u64, u64, bool)> {
        match self {
            DiskOp::Read { offset, len } => Some((*offset, *len as u64, false)),
            DiskOp::Write { offset, data, .. } => Some((*offset, data.len() as u64, true)),
            DiskOp::Discard { offset, len } | DiskOp::WriteZeroes { offset, len, .. } => {
                Some((*offset, *len, true))
            }
            DiskOp::Flush => None,
        }
    }
}

/// A request the pipeline finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    /// The tag it was submitted with.
    pub tag: u64,
    /// Whether it succeeded.
    pub result: Result<(), DiskError>,
    /// A read's bytes (on success), or a write's buffer back; empty otherwise.
    pub data: Vec<u8>,
    /// Whether its data went through the queue (`false`: the synchronous path).
    pub queued: bool,
}

/// A request whose data is on the queue.
struct Job {
    tag: u64,
    offset: u64,
    len: u64,
    write: bool,
    parts_left: usize,
    result: Result<(), DiskError>,
    data: Vec<u8>,
    /// [`QueuedDisk::queued_start`]'s stamp.
    started: u64,
    /// New clusters to reference when the data has landed (a write that allocated).
    refs: NewRefs,
}

/// Counters of a [`Pipeline`], for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PipelineStats {
    /// Requests whose data went through the queue.
    pub queued: u64,
    /// Requests served on the synchronous path.
    pub synchronous: u64,
    /// Requests that waited for one in flight they overlap.
    pub conflicts: u64,
    /// Most requests in flight at once.
    pub max_in_flight: u64,
}

/// Requests in flight on a [`QueuedDisk`]. See the module documentation.
#[derive(Default)]
pub struct Pipeline {
    /// Not started yet, in arrival order; `true`: known to need the synchronous path.
    waiting: VecDeque<(u64, DiskOp, bool)>,
    /// Started requests, by job number.
    jobs: BTreeMap<u64, Job>,
    next_job: u64,
    /// Queue tag -> (job number, offset of the piece in the job's data).
    parts: BTreeMap<u64, (u64, usize)>,
    next_part: u64,
    /// Pieces the queue had no room for yet, in order.
    unsent: VecDeque<(u64, QueuedOp)>,
    finished: VecDeque<Finished>,
    stats: PipelineStats,
}

impl Pipeline {
    /// An empty pipeline.
    pub fn new() -> Self {
        Pipeline::default()
    }

    /// Takes a request; it starts on the next [`Pipeline::run`] that finds room for it.
    pub fn submit(&mut self, tag: u64, op: DiskOp) {
        self.waiting.push_back((tag, op, false));
    }

    /// A finished request, if any.
    pub fn next_finished(&mut self) -> Option<Finished> {
        self.finished.pop_front()
    }

    /// Whether nothing is waiting, in flight or unclaimed.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.jobs.is_empty() && self.finished.is_empty()
    }

    /// Requests whose data is on the queue.
    pub fn in_flight(&self) -> usize {
        self.jobs.len()
    }

    /// Requests not started yet.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// The counters.
    pub fn stats(&self) -> PipelineStats {
        self.stats
    }

    /// Moves everything along without waiting for the device: queues what fits, collects
    /// completions, starts waiting requests (running a synchronous one once nothing is in
    /// flight). Returns whether anything moved.
    pub fn run<D: QueuedDisk + ?Sized>(&mut self, disk: &mut D) -> bool {
        let mut progress = false;
        loop {
            let mut moved = self.send_parts(disk);
            while let Some(c) = disk.queue().poll() {
                if let Some(mut job) = self.complete(c) {
                    if !job.refs.is_empty() {
                        let refs = core::mem::take(&mut job.refs);
                        job.result = disk.finish_write(refs, job.result);
                    }
                    disk.queued_done(job.write, job.len, job.started, job.result.is_ok());
                    self.finish_job(job);
                }
                moved = true;
            }
            moved |= self.start(disk);
            progress |= moved;
            if !moved {
                return progress;
            }
        }
    }

    fn send_parts<D: QueuedDisk + ?Sized>(&mut self, disk: &mut D) -> bool {
        let mut moved = false;
        while let Some((tag, op)) = self.unsent.pop_front() {
            match disk.queue().submit(tag, op) {
                Ok(()) => moved = true,
                Err(op) => {
                    self.unsent.push_front((tag, op));
                    break;
                }
            }
        }
        moved
    }

    /// Takes a completion in; returns its request once every piece of it is done.
    fn complete(&mut self, c: Completion) -> Option<Job> {
        let Some((job_id, at)) = self.parts.remove(&c.tag) else {
            log::warn!("block queue: a completion for unknown request {}", c.tag);
            return None;
        };
        let job = self.jobs.get_mut(&job_id)?;
        match c.result {
            Err(e) => {
                if job.result.is_ok() {
                    job.result = Err(e.into());
                }
            }
            Ok(()) if !job.write => {
                if at == 0 && c.data.len() as u64 == job.len {
                    job.data = c.data;
                } else {
                    job.data[at..at + c.data.len()].copy_from_slice(&c.data);
                }
            }
            Ok(()) => {
                if at == 0 && c.data.len() as u64 == job.len {
                    job.data = c.data;
                }
            }
        }
        job.parts_left -= 1;
        if job.parts_left == 0 {
            self.jobs.remove(&job_id)
        } else {
            None
        }
    }

    fn finish_job(&mut self, job: Job) {
        let data = if job.result.is_ok() || job.write {
            job.data
        } else {
            Vec::new()
        };
        self.finished.push_back(Finished {
            tag: job.tag,
            result: job.result,
            data,
            queued: true,
        });
    }

    /// Whether the head request must wait for one in flight.
    fn conflicts(&self, op: &DiskOp) -> bool {
        let Some((offset, len, writes)) = op.range() else {
            return !self.jobs.is_empty();
        };
        self.jobs
            .values()
            .any(|j| (writes || j.write) && offset < j.offset + j.len && j.offset < offset + len)
    }

    /// Starts waiting requests in order while they can start. Returns whether one did.
    fn start<D: QueuedDisk + ?Sized>(&mut self, disk: &mut D) -> bool {
        let mut moved = false;
        while let Some((_, op, sync)) = self.waiting.front() {
            let sync = *sync || !self.queueable(disk, op);
            if sync {
                if !self.jobs.is_empty() {
                    break;
                }
                let Some((tag, op, _)) = self.waiting.pop_front() else {
                    break;
                };
                self.run_sync(disk, tag, op);
                moved = true;
                continue;
            }
            if self.conflicts(op) {
                self.stats.conflicts += 1;
                break;
            }
            let Some((tag, op, _)) = self.waiting.pop_front() else {
                break;
            };
            match self.start_queued(disk, tag, op) {
                Ok(()) => {}
                Err((tag, op)) => {
                    // Needs the synchronous path after all: wait at the head for a drain.
                    self.waiting.push_front((tag, op, true));
                    continue;
                }
            }
            moved = true;
            self.send_parts(disk);
        }
        moved
    }

    /// Whether a request may go through the queue (aligned read or write without FUA).
    fn queueable<D: QueuedDisk + ?Sized>(&self, disk: &mut D, op: &DiskOp) -> bool {
        let align = disk.queue().queue_alignment().max(1);
        match op {
            DiskOp::Read { offset, len } => {
                offset.is_multiple_of(align) && (*len as u64).is_multiple_of(align) && *len > 0
            }
            DiskOp::Write { offset, data, fua } => {
                !fua && offset.is_multiple_of(align)
                    && (data.len() as u64).is_multiple_of(align)
                    && !data.is_empty()
            }
            _ => false,
        }
    }

    /// Maps a request and puts its pieces on the queue; gives it back when it needs the
    /// synchronous path.
    fn start_queued<D: QueuedDisk + ?Sized>(
        &mut self,
        disk: &mut D,
        tag: u64,
        op: DiskOp,
    ) -> Result<(), (u64, DiskOp)> {
        let (offset, len, write) = match &op {
            DiskOp::Read { offset, len } => (*offset, *len as u64, false),
            DiskOp::Write { offset, data, .. } => (*offset, data.len() as u64, true),
            _ => return Err((tag, op)),
        };
        let started = disk.queued_start();
        let mapped = if write {
            disk.map_write(offset, len)
        } else {
            disk.map_read(offset, len).map(|m| {
                m.map(|runs| MappedWrite {
                    runs,
                    refs: NewRefs::default(),
                })
            })
        };
        let MappedWrite { runs, refs } = match mapped {
            Ok(Some(m)) => m,
            Ok(None) => return Err((tag, op)),
            Err(e) => {
                self.stats.synchronous += 1;
                disk.queued_done(write, len, started, false);
                self.finished.push_back(Finished {
                    tag,
                    result: Err(e),
                    data: match op {
                        DiskOp::Write { data, .. } => data,
                        _ => Vec::new(),
                    },
                    queued: false,
                });
                return Ok(());
            }
        };
        let align = disk.queue().queue_alignment().max(1);
        // A piece the queue cannot take whole would need splitting at odd host offsets;
        // such (rare) requests take the synchronous path.
        if runs.iter().any(
            |r| matches!(r, HostRun::Data { host, len } if !host.is_multiple_of(align) || !len.is_multiple_of(align)),
        ) {
            if !refs.is_empty() {
                // Give the clusters back: the synchronous path allocates its own.
                let _ = disk.finish_write(refs, Err(DiskError::Invalid));
            }
            return Err((tag, op));
        }
        let job_id = self.next_job;
        self.next_job += 1;
        let data_runs = runs
            .iter()
            .filter(|r| matches!(r, HostRun::Data { .. }))
            .count();
        let mut data = match op {
            DiskOp::Write { data, .. } => data,
            _ => vec![0; len as usize],
        };
        let mut at = 0usize;
        let mut parts = 0usize;
        for run in &runs {
            let n = run.len() as usize;
            if let HostRun::Data { host, .. } = *run {
                let part = self.next_part;
                self.next_part += 1;
                let qop = if write {
                    if data_runs == 1 && n == data.len() {
                        QueuedOp::Write {
                            offset: host,
                            data: core::mem::take(&mut data),
                        }
                    } else {
                        QueuedOp::Write {
                            offset: host,
                            data: data[at..at + n].to_vec(),
                        }
                    }
                } else {
                    QueuedOp::Read {
                        offset: host,
                        len: n,
                    }
                };
                self.parts.insert(part, (job_id, at));
                self.unsent.push_back((part, qop));
                parts += 1;
            }
            at += n;
        }
        self.stats.queued += 1;
        let job = Job {
            tag,
            offset,
            len,
            write,
            parts_left: parts,
            result: Ok(()),
            data,
            started,
            refs,
        };
        if parts == 0 {
            // All zeros (or an empty write): done already.
            disk.queued_done(write, len, started, true);
            self.finish_job(job);
        } else {
            self.jobs.insert(job_id, job);
            self.stats.max_in_flight = self.stats.max_in_flight.max(self.jobs.len() as u64);
        }
        Ok(())
    }

    /// Serves a request on the disk's ordinary (blocking) path; nothing is in flight.
    fn run_sync<D: QueuedDisk + ?Sized>(&mut self, disk: &mut D, tag: u64, op: DiskOp) {
        self.stats.synchronous += 1;
        let (result, data) = match op {
            DiskOp::Read { offset, len } => {
                let mut buf = vec![0; len];
                match disk.read(offset, &mut buf) {
                    Ok(()) => (Ok(()), buf),
                    Err(e) => (Err(e), Vec::new()),
                }
            }
            DiskOp::Write { offset, data, fua } => {
                let mut r = disk.write(offset, &data);
                if fua && r.is_ok() {
                    r = disk.flush();
                }
                (r, data)
            }
            DiskOp::Flush => (disk.flush(), Vec::new()),
            DiskOp::Discard { offset, len } => (disk.discard(offset, len), Vec::new()),
            DiskOp::WriteZeroes {
                offset,
                len,
                may_unmap,
            } => (disk.write_zeroes(offset, len, may_unmap), Vec::new()),
        };
        self.finished.push_back(Finished {
            tag,
            result,
            data,
            queued: false,
        });
    }
}
