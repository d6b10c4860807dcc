//! The data reads and writes of batched NBD requests, done by a pool of threads with
//! positioned I/O on the image file, outside the engine's lock.
//!
//! [`IoPool`] owns the worker threads; each connection gets a [`PoolQueue`], the
//! [`BlockQueue`] its [`Pipeline`](qcow_metal::blkqueue::pipeline::Pipeline) puts the
//! pieces of its requests on. A piece is done by whichever thread takes it first: a worker,
//! or the connection's own thread while it waits for its completions (so a batch moves even
//! when the workers are slow to be scheduled). Completions go back to the connection that
//! submitted them, in the order they finish.
//!
//! The queue only moves bytes at host offsets the engine mapped; which requests may be in
//! flight together, and what must wait for them, is the pipeline's and `serve`'s business
//! (doc/io-path.md).

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use qcow_metal::blkqueue::queue::{BlockQueue, Completion, QueuedOp};
use qcow_metal::block::FileDisk;
use qcow_metal::block::telemetry::{BlockDeviceMetrics, IoOp};

/// Worker threads of a pool. More than the host's CPUs: a piece that misses the page cache
/// blocks its thread in the kernel, and the others go on.
pub const IO_THREADS: usize = 8;

/// The longest a waiting connection sleeps before it looks again (a guard: completions
/// wake it).
const WAIT_SLICE: Duration = Duration::from_millis(50);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One piece of a request, on the pool's queue.
struct Piece {
    tag: u64,
    op: QueuedOp,
    /// Where its completion goes (the submitting connection's).
    done: Arc<Done>,
    /// When it was submitted (the metrics' clock), for the latency histogram.
    since_ns: u64,
}

/// A connection's finished pieces.
#[derive(Default)]
struct Done {
    list: Mutex<VecDeque<Completion>>,
    ready: Condvar,
}

#[derive(Default)]
struct Pending {
    pieces: VecDeque<Piece>,
    stopping: bool,
}

struct Inner {
    file: FileDisk,
    pending: Mutex<Pending>,
    work: Condvar,
    metrics: Metrics,
}

/// Where a pool counts its pieces, and its clock (nanoseconds).
#[derive(Clone)]
pub struct Metrics {
    /// Each piece as a request of the device.
    pub device: Arc<BlockDeviceMetrics>,
    /// The metrics' clock.
    pub clock: fn() -> u64,
}

impl Inner {
    /// The next piece, if any is waiting.
    fn take(&self) -> Option<Piece> {
        lock(&self.pending).pieces.pop_front()
    }

    /// Does `piece` and hands its completion to its connection.
    fn run(&self, piece: Piece) {
        let (op, bytes, result, data) = match piece.op {
            QueuedOp::Read { offset, len } => {
                let mut data = vec![0; len];
                let result = self.file.pread(offset, &mut data);
                (IoOp::Read, len, result, data)
            }
            QueuedOp::Write { offset, data } => {
                let result = self.file.pwrite(offset, &data);
                (IoOp::Write, data.len(), result, data)
            }
        };
        let m = &self.metrics;
        let latency = (m.clock)().saturating_sub(piece.since_ns);
        let ok = result.is_ok();
        m.device.record(op, bytes as u64, latency, ok);
        m.device.completed();
        lock(&piece.done.list).push_back(Completion {
            tag: piece.tag,
            result,
            data,
        });
        piece.done.ready.notify_one();
    }
}

/// Worker threads doing positioned reads and writes on one file; see the module
/// documentation. Dropping it stops and joins the workers (after the pieces they hold).
pub struct IoPool {
    inner: Arc<Inner>,
    workers: Vec<JoinHandle<()>>,
}

impl IoPool {
    /// A pool of `threads` workers on `file`, each piece counted in `metrics`.
    pub fn new(file: FileDisk, threads: usize, metrics: Metrics) -> IoPool {
        let inner = Arc::new(Inner {
            file,
            pending: Mutex::new(Pending::default()),
            work: Condvar::new(),
            metrics,
        });
        let workers = (0..threads)
            .map(|_| {
                let inner = inner.clone();
                thread::spawn(move || worker(&inner))
            })
            .collect();
        IoPool { inner, workers }
    }

    /// A queue for one connection.
    pub fn queue(&self) -> PoolQueue {
        PoolQueue {
            pool: self.inner.clone(),
            done: Arc::new(Done::default()),
            in_flight: 0,
        }
    }
}

impl Drop for IoPool {
    fn drop(&mut self) {
        lock(&self.inner.pending).stopping = true;
        self.inner.work.notify_all();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn worker(inner: &Inner) {
    loop {
        let piece = {
            let mut pending = lock(&inner.pending);
            loop {
                if let Some(p) = pending.pieces.pop_front() {
                    break p;
                }
                if pending.stopping {
                    return;
                }
                pending = inner.work.wait(pending).unwrap_or_else(|e| e.into_inner());
            }
        };
        inner.run(piece);
    }
}

/// One connection's side of an [`IoPool`]: a [`BlockQueue`] that never refuses a piece.
pub struct PoolQueue {
    pool: Arc<Inner>,
    done: Arc<Done>,
    in_flight: usize,
}

impl BlockQueue for PoolQueue {
    fn queue_alignment(&self) -> u64 {
        // Positioned file I/O takes any offset and length.
        1
    }

    fn queue_depth(&self) -> usize {
        usize::MAX
    }

    fn submit(&mut self, tag: u64, op: QueuedOp) -> Result<(), QueuedOp> {
        let piece = Piece {
            tag,
            op,
            done: self.done.clone(),
            since_ns: (self.pool.metrics.clock)(),
        };
        self.pool.metrics.device.submitted();
        lock(&self.pool.pending).pieces.push_back(piece);
        self.pool.work.notify_one();
        self.in_flight += 1;
        Ok(())
    }

    fn poll(&mut self) -> Option<Completion> {
        let c = lock(&self.done.list).pop_front()?;
        self.in_flight -= 1;
        Some(c)
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Does a waiting piece (of any connection) on this thread, or else sleeps until one of
    /// this connection's pieces completes.
    fn wait(&mut self) {
        if self.in_flight == 0 || !lock(&self.done.list).is_empty() {
            return;
        }
        if let Some(piece) = self.pool.take() {
            self.pool.run(piece);
            return;
        }
        let list = lock(&self.done.list);
        if list.is_empty() {
            let _ = self.done.ready.wait_timeout(list, WAIT_SLICE);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qcow_metal::block::telemetry::HasRequests;

    fn clock() -> u64 {
        0
    }

    #[test]
    fn pieces_are_done_by_the_workers_or_the_waiting_thread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        for threads in [0, 3] {
            let file = FileDisk::open(&path, false).unwrap();
            let metrics = Metrics {
                device: Arc::new(BlockDeviceMetrics::new("t")),
                clock,
            };
            let pool = IoPool::new(file, threads, metrics.clone());
            let mut q = pool.queue();
            for i in 0..64u64 {
                let data = vec![i as u8 + threads as u8; 4096];
                q.submit(
                    i,
                    QueuedOp::Write {
                        offset: i * 4096,
                        data,
                    },
                )
                .unwrap();
            }
            let mut seen = Vec::new();
            while q.in_flight() > 0 {
                q.wait();
                while let Some(c) = q.poll() {
                    assert_eq!(c.result, Ok(()));
                    seen.push(c.tag);
                }
            }
            seen.sort_unstable();
            assert_eq!(seen, (0..64).collect::<Vec<_>>());
            // Read back, one past the file's end (reads as zeros).
            q.submit(
                1,
                QueuedOp::Read {
                    offset: 5 * 4096,
                    len: 4096,
                },
            )
            .unwrap();
            q.submit(
                2,
                QueuedOp::Read {
                    offset: (1 << 20) - 512,
                    len: 1024,
                },
            )
            .unwrap();
            let mut got = Vec::new();
            while q.in_flight() > 0 {
                q.wait();
                got.extend(std::iter::from_fn(|| q.poll()));
            }
            got.sort_by_key(|c| c.tag);
            assert_eq!(got[0].data, vec![5 + threads as u8; 4096]);
            assert_eq!(got[1].data, vec![0; 1024]);
            assert_eq!(metrics.device.request_metrics().requests(IoOp::Write), 64);
            assert_eq!(metrics.device.request_metrics().requests(IoOp::Read), 2);
        }
    }
}
