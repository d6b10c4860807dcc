//! The asynchronous side of a block device: submit reads and writes, collect completions
//! later, so several requests are in flight at once and the caller's loop keeps running.
//!
//! A [`BlockQueue`] is the same storage as the device's [`BlockDevice`] side (the kernel's
//! virtio-blk driver implements both on one virtqueue; [`MemQueue`] does for host tests).
//! Buffers are owned: a request hands its buffer to the queue and gets it back with the
//! completion, so nothing borrowed has to outlive a call.
//!
//! Ordering: requests in flight may complete in any order, and a synchronous call on the
//! device side may run while requests are in flight (the engine reads and writes metadata
//! that way). Callers keep requests that overlap each other apart, and wait for every
//! request before a flush that must cover them (see [`super::pipeline`]).

use crate::block::{BlockDevice, BlockError, SectorDevice, Sectored};
use alloc::collections::VecDeque;
use alloc::vec::Vec;

/// A read or write handed to a [`BlockQueue`], with the buffer it owns until completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueuedOp {
    /// Read `len` bytes at byte `offset`.
    Read {
        /// First byte on the device.
        offset: u64,
        /// Bytes to read.
        len: usize,
    },
    /// Write `data` at byte `offset`.
    Write {
        /// First byte on the device.
        offset: u64,
        /// The bytes; given back with the completion.
        data: Vec<u8>,
    },
}

impl QueuedOp {
    /// The byte range the request covers on the device.
    pub fn range(&self) -> (u64, u64) {
        match self {
            QueuedOp::Read { offset, len } => (*offset, *len as u64),
            QueuedOp::Write { offset, data } => (*offset, data.len() as u64),
        }
    }
}

/// A request the queue finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// The tag it was submitted with.
    pub tag: u64,
    /// Whether the device did it.
    pub result: Result<(), BlockError>,
    /// A read's bytes (on success), or a write's buffer back.
    pub data: Vec<u8>,
}

/// Asynchronous reads and writes on a block device.
pub trait BlockQueue {
    /// Offsets and lengths of queued requests must be multiples of this (the device's
    /// sector size); other requests go through the synchronous side.
    fn queue_alignment(&self) -> u64;

    /// How many requests the queue holds at once.
    fn queue_depth(&self) -> usize;

    /// Puts a request on the queue. Gives it back when the queue is full (collect
    /// completions, then try again). A request the device cannot take (out of range,
    /// read-only) is accepted and completes with its error.
    fn submit(&mut self, tag: u64, op: QueuedOp) -> Result<(), QueuedOp>;

    /// A finished request, if there is one; never waits.
    fn poll(&mut self) -> Option<Completion>;

    /// Requests submitted and not yet returned by [`BlockQueue::poll`].
    fn in_flight(&self) -> usize;

    /// Waits until a request completes (or a short while passes): for callers with nothing
    /// else to do. The default returns at once (queues whose `poll` completes requests).
    fn wait(&mut self) {}
}

impl<Q: BlockQueue + ?Sized> BlockQueue for &mut Q {
    fn queue_alignment(&self) -> u64 {
        (**self).queue_alignment()
    }
    fn queue_depth(&self) -> usize {
        (**self).queue_depth()
    }
    fn submit(&mut self, tag: u64, op: QueuedOp) -> Result<(), QueuedOp> {
        (**self).submit(tag, op)
    }
    fn poll(&mut self) -> Option<Completion> {
        (**self).poll()
    }
    fn in_flight(&self) -> usize {
        (**self).in_flight()
    }
    fn wait(&mut self) {
        (**self).wait()
    }
}

/// A sector device's queue is the byte-addressed device's queue: [`Sectored`] passes it on
/// (queued requests are whole sectors, see [`BlockQueue::queue_alignment`]).
impl<S: SectorDevice + BlockQueue> BlockQueue for Sectored<S> {
    fn queue_alignment(&self) -> u64 {
        self.inner().queue_alignment()
    }
    fn queue_depth(&self) -> usize {
        self.inner().queue_depth()
    }
    fn submit(&mut self, tag: u64, op: QueuedOp) -> Result<(), QueuedOp> {
        self.inner_mut().submit(tag, op)
    }
    fn poll(&mut self) -> Option<Completion> {
        self.inner_mut().poll()
    }
    fn in_flight(&self) -> usize {
        self.inner().in_flight()
    }
    fn wait(&mut self) {
        self.inner_mut().wait()
    }
}

/// In which order a [`MemQueue`] completes what it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompletionOrder {
    /// Oldest first.
    Fifo,
    /// Newest first.
    Lifo,
    /// Pseudo-random, from this seed.
    Shuffled(u64),
}

/// A queue over any [`BlockDevice`], for host tests: requests are held until
/// [`BlockQueue::poll`] completes them one at a time in a chosen [`CompletionOrder`]
/// (a write reaches the device only then, as on a real device), at most
/// [`MemQueue::step`] completions become ready per [`MemQueue::advance`] call when stepping
/// is on (so tests can look at the state with requests still in flight).
#[derive(Debug)]
pub struct MemQueue<D> {
    dev: D,
    pending: VecDeque<(u64, QueuedOp)>,
    ready: VecDeque<Completion>,
    order: CompletionOrder,
    rng: fastrand::Rng,
    depth: usize,
    alignment: u64,
    /// With `Some(n)`, only [`MemQueue::advance`] completes requests, `n` per call.
    pub step: Option<usize>,
    /// Most requests held at once so far.
    pub max_in_flight: usize,
    /// Requests submitted so far.
    pub submitted: u64,
}

impl<D: BlockDevice> MemQueue<D> {
    /// A queue of `depth` requests over `dev`, completing in `order`, 512-byte aligned.
    pub fn new(dev: D, depth: usize, order: CompletionOrder) -> Self {
        MemQueue {
            dev,
            pending: VecDeque::new(),
            ready: VecDeque::new(),
            rng: fastrand::Rng::with_seed(match order {
                CompletionOrder::Shuffled(seed) => seed,
                _ => 1,
            }),
            order,
            depth: depth.max(1),
            alignment: 512,
            step: None,
            max_in_flight: 0,
            submitted: 0,
        }
    }

    /// The device under the queue.
    pub fn device(&self) -> &D {
        &self.dev
    }

    /// The device under the queue, mutably.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.dev
    }

    /// Gives the device back (requests still held are dropped).
    pub fn into_inner(self) -> D {
        self.dev
    }

    /// Completes up to `n` held requests (in the queue's order) so that `poll` returns them.
    pub fn advance(&mut self, n: usize) {
        for _ in 0..n {
            if !self.complete_one() {
                break;
            }
        }
    }

    fn complete_one(&mut self) -> bool {
        if self.pending.is_empty() {
            return false;
        }
        let i = match self.order {
            CompletionOrder::Fifo => 0,
            CompletionOrder::Lifo => self.pending.len() - 1,
            CompletionOrder::Shuffled(_) => self.rng.usize(..self.pending.len()),
        };
        let Some((tag, op)) = self.pending.remove(i) else {
            return false;
        };
        let completion = match op {
            QueuedOp::Read { offset, len } => {
                let mut data = alloc::vec![0; len];
                let result = self.dev.read_at(offset, &mut data);
                Completion { tag, result, data }
            }
            QueuedOp::Write { offset, data } => {
                let result = self.dev.write_at(offset, &data);
                Completion { tag, result, data }
            }
        };
        self.ready.push_back(completion);
        true
    }
}

impl<D: BlockDevice> BlockQueue for MemQueue<D> {
    fn queue_alignment(&self) -> u64 {
        self.alignment
    }

    fn queue_depth(&self) -> usize {
        self.depth
    }

    fn submit(&mut self, tag: u64, op: QueuedOp) -> Result<(), QueuedOp> {
        if self.in_flight() >= self.depth {
            return Err(op);
        }
        self.pending.push_back((tag, op));
        self.submitted += 1;
        self.max_in_flight = self.max_in_flight.max(self.in_flight());
        Ok(())
    }

    fn poll(&mut self) -> Option<Completion> {
        if self.ready.is_empty() && self.step.is_none() {
            self.complete_one();
        }
        self.ready.pop_front()
    }

    fn in_flight(&self) -> usize {
        self.pending.len() + self.ready.len()
    }
}

impl<D: BlockDevice> BlockDevice for MemQueue<D> {
    fn capacity(&self) -> u64 {
        self.dev.capacity()
    }
    fn is_read_only(&self) -> bool {
        self.dev.is_read_only()
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        self.dev.read_at(offset, buf)
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), BlockError> {
        self.dev.write_at(offset, buf)
    }
    fn flush(&mut self) -> Result<(), BlockError> {
        self.dev.flush()
    }
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.dev.discard(offset, len)
    }
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.dev.write_zeroes(offset, len)
    }
    fn zeroes_from(&self) -> Option<u64> {
        self.dev.zeroes_from()
    }
    fn grow(&mut self, need: u64, want: u64, wait: bool) -> bool {
        self.dev.grow(need, want, wait)
    }
    fn cut(&mut self, len: u64) -> bool {
        self.dev.cut(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::MemDisk;

    #[test]
    fn mem_queue_holds_writes_until_completion_and_gives_buffers_back() {
        let mut q = MemQueue::new(MemDisk::fixed(8192), 2, CompletionOrder::Lifo);
        q.step = Some(0);
        q.submit(
            1,
            QueuedOp::Write {
                offset: 0,
                data: alloc::vec![7; 512],
            },
        )
        .unwrap();
        q.submit(
            2,
            QueuedOp::Write {
                offset: 512,
                data: alloc::vec![8; 512],
            },
        )
        .unwrap();
        // Full.
        assert!(
            q.submit(
                3,
                QueuedOp::Read {
                    offset: 0,
                    len: 512
                }
            )
            .is_err()
        );
        assert_eq!(q.in_flight(), 2);
        assert_eq!(q.poll(), None);
        assert_eq!(
            q.device().bytes()[0],
            0,
            "nothing written before completion"
        );
        q.advance(1);
        let c = q.poll().unwrap();
        assert_eq!((c.tag, c.result, c.data.len()), (2, Ok(()), 512));
        assert_eq!(q.device().bytes()[512], 8);
        assert_eq!(q.device().bytes()[0], 0);
        q.advance(5);
        assert_eq!(q.poll().unwrap().tag, 1);
        assert_eq!(q.in_flight(), 0);
        q.step = None;
        q.submit(
            4,
            QueuedOp::Read {
                offset: 0,
                len: 1024,
            },
        )
        .unwrap();
        let c = q.poll().unwrap();
        assert_eq!(&c.data[..], &[[7u8; 512], [8u8; 512]].concat()[..]);
    }

    #[test]
    fn mem_queue_reports_device_errors_with_the_request() {
        let mut q = MemQueue::new(MemDisk::fixed(4096), 4, CompletionOrder::Fifo);
        q.submit(
            9,
            QueuedOp::Read {
                offset: 4096,
                len: 512,
            },
        )
        .unwrap();
        let c = q.poll().unwrap();
        assert_eq!(c.tag, 9);
        assert!(matches!(c.result, Err(BlockError::OutOfRange { .. })));
    }
}
