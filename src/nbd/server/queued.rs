//! Several requests of one client in flight together: [`Connection::process_queued`].
//!
//! Reads and writes of at most one I/O chunk that wait back to back in the input go to the
//! disk as one batch through a [`Pipeline`] (the device holds up to [`MAX_BATCH`] of them at
//! once), and each reply is written as its request finishes, in whatever order: NBD lets a
//! server reply out of order, simple replies and structured ones alike, since every reply
//! carries the client's cookie. The batch finishes before the call returns, so nothing is in
//! flight between calls and every other command (flush, trim, write-zeroes, block status,
//! disconnect, larger reads and writes) runs on the ordinary path after the requests before
//! it: a flush covers every write replied to before it. The ordering rules inside a batch are
//! the pipeline's (doc/io-path.md).
//!
//! A loop serving several clients can instead keep one [`Pipeline`] in flight across its
//! turns: [`Connection::take_queued`] hands out the same requests, the loop answers each with
//! [`Connection::finish_queued`] when the pipeline finishes it, and
//! [`Connection::process_ordinary`] serves everything else, once nothing of this connection
//! is in flight (and, the loop's rule, nothing of any client: an ordinary request may change
//! mappings).

use super::*;
use crate::blkqueue::pipeline::{DiskOp, Finished, Pipeline, QueuedDisk};
use crate::disk::VirtualDisk;

/// Most requests one batch puts in flight.
pub const MAX_BATCH: usize = 32;

/// A request [`Connection::take_queued`] handed out, to give back with its result to
/// [`Connection::finish_queued`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueuedRequest(Request);

impl Connection {
    /// As [`Connection::process`], with reads and writes batched onto the disk's queue (see
    /// the module documentation). A client of a snapshot view is served from the view as
    /// there, and its reads take the engine's path. Returns whether anything happened.
    pub fn process_queued<D: QueuedDisk + ?Sized>(
        &mut self,
        disk: &mut D,
        stats: &mut NbdStats,
    ) -> bool {
        self.advance(disk, stats, |conn, disk, stats| {
            if conn.run_batch(disk, stats) {
                Batch::Served
            } else {
                Batch::No
            }
        })
    }

    /// For a pipeline outside: takes the reads and writes at the head of the input that can
    /// join one (as [`Connection::process_queued`]'s batches, but no read bigger than the
    /// output's high-water mark; none for a snapshot view's client or while shutting
    /// down), at most `max`, with the disk requests to submit.
    pub fn take_queued(
        &mut self,
        size: u64,
        max: usize,
        stats: &mut NbdStats,
    ) -> Vec<(QueuedRequest, DiskOp)> {
        if self.view.is_some() {
            return Vec::new();
        }
        let budget = (self.config.output_high_water as usize)
            .saturating_sub(self.output.len() + self.queued_read_bytes);
        let taken = self.take_batch(size, max, budget, self.queued_out == 0, false, stats);
        for (req, _) in &taken {
            self.queued_out += 1;
            if Command::from_wire(req.kind) == Command::Read {
                self.queued_read_bytes += req.len as usize;
            }
        }
        taken
            .into_iter()
            .map(|(req, op)| (QueuedRequest(req), op))
            .collect()
    }

    /// Answers a request [`Connection::take_queued`] handed out, with what the pipeline
    /// made of it (nothing is sent once the connection is closed).
    pub fn finish_queued(&mut self, q: QueuedRequest, done: Finished, stats: &mut NbdStats) {
        self.queued_out = self.queued_out.saturating_sub(1);
        if Command::from_wire(q.0.kind) == Command::Read {
            self.queued_read_bytes = self.queued_read_bytes.saturating_sub(q.0.len as usize);
        }
        if self.phase != Phase::Closed {
            self.queued_reply(q.0, done, stats);
        }
    }

    /// Requests handed to a pipeline outside and not answered yet.
    pub fn queued_in_flight(&self) -> usize {
        self.queued_out
    }

    /// As [`Connection::process`], for a connection whose reads and writes go to a pipeline
    /// outside: does nothing while any of them is in flight, and stops at a request
    /// [`Connection::take_queued`] would take. Returns whether anything happened.
    pub fn process_ordinary<D: VirtualDisk + ?Sized>(
        &mut self,
        disk: &mut D,
        stats: &mut NbdStats,
    ) -> bool {
        if self.queued_out > 0 {
            return false;
        }
        let size = disk.size();
        self.advance(disk, stats, |conn, _, _| {
            if conn.view.is_none() && conn.head_is_batchable(size) {
                Batch::Stop
            } else {
                Batch::No
            }
        })
    }

    /// Whether [`Connection::process_ordinary`] has something to do: a handshake or a
    /// request of the ordinary path with its bytes at hand, or a big read's data to send
    /// on. A read or write the pipeline takes, and a small write whose payload is still on
    /// its way, are not.
    pub fn wants_ordinary(&self, size: u64) -> bool {
        if self.queued_out > 0 || self.phase == Phase::Closed {
            return false;
        }
        let pending = self.input.pending();
        match self.phase {
            Phase::ReadReply(_) => self.output.len() < self.config.output_high_water as usize,
            Phase::Request => {
                let Some(head) = pending.get(..REQUEST_LEN) else {
                    return false;
                };
                if self.view.is_none() && self.head_is_batchable(size) {
                    return false;
                }
                // A write the pipeline would take once its payload is in.
                let waiting_payload = <&[u8; REQUEST_LEN]>::try_from(head)
                    .ok()
                    .and_then(Request::decode)
                    .is_some_and(|req| {
                        Command::from_wire(req.kind) == Command::Write
                            && !self.shutting_down
                            && self.view.is_none()
                            && u64::from(req.len) <= self.config.chunk()
                            && pending.len() < REQUEST_LEN + req.len as usize
                    });
                !waiting_payload
            }
            _ => !pending.is_empty(),
        }
    }

    /// Whether the request at the head of the input can join a batch now.
    /// Whether the request at the head of the input is one [`Connection::take_queued`]
    /// takes now.
    fn head_is_batchable(&self, size: u64) -> bool {
        self.phase == Phase::Request
            && !self.shutting_down
            && self
                .batchable(size)
                .is_some_and(|req| !self.streamed_read(&req))
    }

    /// A read bigger than the output's high-water mark: for a pipeline outside it stays on
    /// the ordinary path, which sends its data out piece by piece while it reads (taken
    /// whole, it would wait for all its data and then copy it into the output; measured
    /// under TCG, 1 MiB sequential reads ran at half the speed).
    fn streamed_read(&self, req: &Request) -> bool {
        Command::from_wire(req.kind) == Command::Read && req.len > self.config.output_high_water
    }

    /// The request at the head of the input, if it can join a batch: a valid read or write
    /// of 1..=chunk bytes inside the disk (a write with all its payload buffered).
    fn batchable(&self, size: u64) -> Option<Request> {
        let pending = self.input.pending();
        let req = Request::decode(pending.get(..REQUEST_LEN)?.try_into().ok()?)?;
        let len = u64::from(req.len);
        let fits = len > 0
            && len <= self.config.chunk()
            && req.len <= self.config.max_payload
            && req.flags & !CMD_FLAG_FUA == 0
            && check_request(req.offset, len, size).is_ok();
        match Command::from_wire(req.kind) {
            Command::Read if fits => Some(req),
            Command::Write
                if fits && !self.read_only && pending.len() >= REQUEST_LEN + len as usize =>
            {
                Some(req)
            }
            _ => None,
        }
    }

    /// Takes the batchable requests at the head of the input (at most `max`; reads while
    /// their data fits in `budget` bytes, at least one when `first_free`; reads bigger than
    /// the output's high-water mark only with `big_reads`), with the disk requests to serve
    /// them.
    fn take_batch(
        &mut self,
        size: u64,
        max: usize,
        budget: usize,
        first_free: bool,
        big_reads: bool,
        stats: &mut NbdStats,
    ) -> Vec<(Request, DiskOp)> {
        let mut taken: Vec<(Request, DiskOp)> = Vec::new();
        if self.phase != Phase::Request || self.shutting_down {
            return taken;
        }
        let mut read_bytes = 0usize;
        while taken.len() < max {
            let Some(req) = self.batchable(size) else {
                break;
            };
            if !big_reads && self.streamed_read(&req) {
                break;
            }
            let len = req.len as usize;
            let cmd = Command::from_wire(req.kind);
            let op = if cmd == Command::Read {
                if !(taken.is_empty() && first_free) && read_bytes + len > budget {
                    break;
                }
                read_bytes += len;
                self.input.consume(REQUEST_LEN);
                DiskOp::Read {
                    offset: req.offset,
                    len,
                }
            } else {
                let data = self.input.pending()[REQUEST_LEN..REQUEST_LEN + len].to_vec();
                self.input.consume(REQUEST_LEN + len);
                DiskOp::Write {
                    offset: req.offset,
                    data,
                    fua: req.flags & CMD_FLAG_FUA != 0,
                }
            };
            stats.requests[cmd.index()] += 1;
            taken.push((req, op));
        }
        taken
    }

    /// Takes the batchable requests at the head of the input, runs them together and writes
    /// their replies. Returns whether there was any.
    fn run_batch<D: QueuedDisk + ?Sized>(&mut self, disk: &mut D, stats: &mut NbdStats) -> bool {
        let size = disk.size();
        // Reads reply with their data: keep a batch's replies near the high-water mark.
        let budget = (self.config.output_high_water as usize).saturating_sub(self.output.len());
        let mut pipeline = Pipeline::new();
        let mut reqs: Vec<Request> = Vec::new();
        for (req, op) in self.take_batch(size, MAX_BATCH, budget, true, true, stats) {
            pipeline.submit(reqs.len() as u64, op);
            reqs.push(req);
        }
        if reqs.is_empty() {
            return false;
        }
        loop {
            let moved = pipeline.run(disk);
            while let Some(done) = pipeline.next_finished() {
                let req = reqs[done.tag as usize];
                self.queued_reply(req, done, stats);
            }
            if pipeline.is_idle() {
                break;
            }
            if !moved && disk.queue().in_flight() == 0 {
                // Nothing on the device and nothing moving: a bug, not a wait.
                log::error!(
                    "nbd: {} batched requests are stuck; dropping the connection",
                    pipeline.waiting()
                );
                self.protocol_error(stats);
                break;
            }
            disk.queue().wait();
        }
        true
    }

    /// The reply to a batched request.
    fn queued_reply(&mut self, req: Request, done: Finished, stats: &mut NbdStats) {
        let e = match done.result {
            Err(e) => NbdError::from(e),
            Ok(()) if Command::from_wire(req.kind) == Command::Write => {
                stats.bytes_written += u64::from(req.len);
                self.reply_ok(req.handle);
                return;
            }
            Ok(()) => {
                stats.bytes_read += u64::from(req.len);
                if self.structured {
                    let mut h = [0u8; CHUNK_HEADER_LEN + 8];
                    put_chunk_header(
                        &mut h,
                        REPLY_FLAG_DONE,
                        REPLY_TYPE_OFFSET_DATA,
                        req.handle,
                        8 + req.len,
                    );
                    h[20..28].copy_from_slice(&req.offset.to_be_bytes());
                    self.output.push(&h);
                } else {
                    let mut h = [0u8; SIMPLE_REPLY_LEN];
                    put_simple_reply(&mut h, 0, req.handle);
                    self.output.push(&h);
                }
                self.output.push(&done.data);
                return;
            }
        };
        self.reply_error(req.handle, e, error_message(e), stats);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blkqueue::queue::{CompletionOrder, MemQueue};
    use crate::block::MemDisk;
    use crate::qcow2::{CreateOptions, Qcow2};
    use alloc::collections::BTreeMap;

    const SIZE: u64 = 4 << 20;

    fn engine() -> Qcow2<MemQueue<MemDisk>> {
        let mut e = Qcow2::create(
            MemQueue::new(MemDisk::growable(), 32, CompletionOrder::Shuffled(11)),
            &CreateOptions {
                virtual_size: SIZE,
                ..CreateOptions::default()
            },
        )
        .unwrap();
        // The first MiB allocated: writes there go through the queue.
        e.write(0, &vec![0x5a; 1 << 20]).unwrap();
        e
    }

    fn option(opt: u32, data: &[u8]) -> Vec<u8> {
        let mut m = IHAVEOPT.to_be_bytes().to_vec();
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        m
    }

    fn request(kind: u16, handle: u64, offset: u64, len: u32) -> Vec<u8> {
        let mut r = REQUEST_MAGIC.to_be_bytes().to_vec();
        r.extend_from_slice(&0u16.to_be_bytes());
        r.extend_from_slice(&kind.to_be_bytes());
        r.extend_from_slice(&handle.to_be_bytes());
        r.extend_from_slice(&offset.to_be_bytes());
        r.extend_from_slice(&len.to_be_bytes());
        r
    }

    /// A connection in transmission (structured replies if asked), its output drained.
    fn connected(structured: bool, disk: &mut Qcow2<MemQueue<MemDisk>>) -> Connection {
        let mut conn = Connection::new(&ServerConfig::default());
        let mut hello = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
            .to_be_bytes()
            .to_vec();
        if structured {
            hello.extend(option(OPT_STRUCTURED_REPLY, &[]));
        }
        hello.extend(option(OPT_EXPORT_NAME, b""));
        assert_eq!(conn.receive(&hello), hello.len());
        let mut stats = NbdStats::default();
        conn.process_queued(disk, &mut stats);
        let n = conn.output().len();
        assert_eq!(n, 18 + if structured { 20 } else { 0 } + 10);
        conn.consume_output(n);
        conn
    }

    /// Splits replies: handle -> (error, data), in the order they came.
    fn replies(mut out: &[u8], read_lens: &BTreeMap<u64, usize>) -> Vec<(u64, u32, Vec<u8>)> {
        let mut v = Vec::new();
        while !out.is_empty() {
            let magic = u32::from_be_bytes(out[..4].try_into().unwrap());
            if magic == SIMPLE_REPLY_MAGIC {
                let error = u32::from_be_bytes(out[4..8].try_into().unwrap());
                let handle = u64::from_be_bytes(out[8..16].try_into().unwrap());
                let n = if error == 0 {
                    read_lens.get(&handle).copied().unwrap_or(0)
                } else {
                    0
                };
                v.push((handle, error, out[16..16 + n].to_vec()));
                out = &out[16 + n..];
            } else {
                assert_eq!(magic, STRUCTURED_REPLY_MAGIC);
                let kind = u16::from_be_bytes(out[6..8].try_into().unwrap());
                let handle = u64::from_be_bytes(out[8..16].try_into().unwrap());
                let len = u32::from_be_bytes(out[16..20].try_into().unwrap()) as usize;
                assert_eq!(kind, REPLY_TYPE_OFFSET_DATA);
                v.push((handle, 0, out[20 + 8..20 + len].to_vec()));
                out = &out[20 + len..];
            }
        }
        v
    }

    fn pipelined_requests_are_served_together(structured: bool) {
        let mut disk = engine();
        let mut conn = connected(structured, &mut disk);
        let mut stats = NbdStats::default();
        let mut input = Vec::new();
        let mut read_lens = BTreeMap::new();
        // 16 writes of distinct 4 KiB blocks, then 16 reads of other blocks, then a flush.
        for i in 0..16u64 {
            input.extend(request(CMD_WRITE, i, i * 8192, 4096));
            input.extend(vec![i as u8 + 1; 4096]);
        }
        for i in 0..16u64 {
            input.extend(request(CMD_READ, 100 + i, i * 8192 + 4096, 4096));
            read_lens.insert(100 + i, 4096);
        }
        input.extend(request(CMD_FLUSH, 999, 0, 0));
        assert_eq!(conn.receive(&input), input.len());
        while conn.process_queued(&mut disk, &mut stats) {}
        let got = replies(conn.output(), &read_lens);
        assert_eq!(got.len(), 33);
        assert!(got.iter().all(|(_, e, _)| *e == 0));
        let order: Vec<u64> = got.iter().map(|r| r.0).collect();
        assert!(
            order[..32].windows(2).any(|w| w[0] > w[1]),
            "replies in order: {order:?}"
        );
        assert_eq!(
            order[32], 999,
            "the flush is answered after every write before it"
        );
        for (h, _, data) in &got {
            if *h >= 100 && *h < 999 {
                assert_eq!(data, &vec![0x5a; 4096]);
            }
        }
        assert!(
            disk.device().max_in_flight >= 16,
            "{}",
            disk.device().max_in_flight
        );
        assert_eq!(stats.bytes_written, 16 * 4096);
        assert_eq!(stats.bytes_read, 16 * 4096);
        let mut back = vec![0u8; 4096];
        for i in 0..16u64 {
            disk.read(i * 8192, &mut back).unwrap();
            assert_eq!(back, vec![i as u8 + 1; 4096]);
        }
        assert!(disk.check().unwrap().is_clean());
    }

    #[test]
    fn pipelined_requests_finish_together_with_simple_replies() {
        pipelined_requests_are_served_together(false);
    }

    #[test]
    fn pipelined_requests_finish_together_with_structured_replies() {
        pipelined_requests_are_served_together(true);
    }

    #[test]
    fn other_commands_and_errors_keep_their_place() {
        let mut disk = engine();
        let mut conn = connected(false, &mut disk);
        let mut stats = NbdStats::default();
        let mut input = Vec::new();
        // A write into unallocated space (engine path), a read past the end (error), a
        // partial-payload write that must wait for its bytes.
        input.extend(request(CMD_WRITE, 1, 2 << 20, 4096));
        input.extend(vec![7; 4096]);
        input.extend(request(CMD_READ, 2, SIZE, 4096));
        input.extend(request(CMD_READ, 3, 2 << 20, 4096));
        input.extend(request(CMD_WRITE, 4, 0, 4096));
        input.extend(vec![9; 1000]);
        assert_eq!(conn.receive(&input), input.len());
        while conn.process_queued(&mut disk, &mut stats) {}
        let lens = BTreeMap::from([(3u64, 4096usize)]);
        let got = replies(conn.output(), &lens);
        let handles: Vec<u64> = got.iter().map(|r| r.0).collect();
        assert_eq!(handles, [1, 2, 3]);
        assert_ne!(got[1].1, 0, "a read past the end fails");
        assert_eq!(got[2].2, vec![7; 4096]);
        let n = conn.output().len();
        conn.consume_output(n);
        assert_eq!(conn.receive(&[9; 3096]), 3096);
        while conn.process_queued(&mut disk, &mut stats) {}
        assert_eq!(replies(conn.output(), &lens), [(4, 0, Vec::new())]);
    }

    #[test]
    fn a_pipeline_outside_takes_reads_and_writes_and_the_ordinary_path_the_rest() {
        let mut disk = engine();
        let mut conn = connected(false, &mut disk);
        let mut stats = NbdStats::default();
        let size = disk.size();
        let mut input = Vec::new();
        input.extend(request(CMD_READ, 1, 0, 4096));
        input.extend(request(CMD_WRITE, 2, 8192, 4096));
        input.extend(vec![3; 4096]);
        input.extend(request(CMD_FLUSH, 3, 0, 0));
        input.extend(request(CMD_READ, 4, 4096, 4096));
        assert_eq!(conn.receive(&input), input.len());
        assert!(!conn.wants_ordinary(size), "the head is for the pipeline");
        let taken = conn.take_queued(size, 32, &mut stats);
        assert_eq!(taken.len(), 2, "the read and the write, not the flush");
        assert_eq!(conn.queued_in_flight(), 2);
        assert!(!conn.is_between_requests());
        // The flush waits for them: the ordinary path does nothing meanwhile.
        assert!(!conn.wants_ordinary(size));
        assert!(!conn.process_ordinary(&mut disk, &mut stats));
        assert!(conn.output().is_empty());
        let mut pipeline = Pipeline::new();
        let mut reqs = Vec::new();
        for (tag, (q, op)) in taken.into_iter().enumerate() {
            pipeline.submit(tag as u64, op);
            reqs.push(q);
        }
        while !pipeline.is_idle() {
            pipeline.run(&mut disk);
            while let Some(done) = pipeline.next_finished() {
                conn.finish_queued(reqs[done.tag as usize], done, &mut stats);
            }
        }
        assert_eq!(conn.queued_in_flight(), 0);
        assert!(conn.wants_ordinary(size), "the flush is at the head");
        // The flush runs on the ordinary path, which stops at the read behind it.
        assert!(conn.process_ordinary(&mut disk, &mut stats));
        let lens = BTreeMap::from([(1u64, 4096usize)]);
        let got = replies(conn.output(), &lens);
        let mut handles: Vec<u64> = got.iter().map(|r| r.0).collect();
        assert_eq!(handles.pop(), Some(3), "the flush is answered last");
        handles.sort_unstable();
        assert_eq!(handles, [1, 2]);
        assert_eq!(got.iter().find(|r| r.0 == 1).unwrap().2, vec![0x5a; 4096]);
        assert!(!conn.wants_ordinary(size));
        let mut last = conn.take_queued(size, 32, &mut stats);
        assert_eq!(last.len(), 1);
        let (q, op) = last.remove(0);
        pipeline.submit(9, op);
        while !pipeline.is_idle() {
            pipeline.run(&mut disk);
            while let Some(done) = pipeline.next_finished() {
                conn.finish_queued(q, done, &mut stats);
            }
        }
        assert_eq!(conn.queued_in_flight(), 0);
        // A read bigger than the output's high-water mark is the ordinary path's (it
        // streams its data out).
        let n = conn.output().len();
        conn.consume_output(n);
        assert_eq!(conn.receive(&request(CMD_READ, 6, 0, 1 << 20)), REQUEST_LEN);
        assert!(conn.take_queued(size, 32, &mut stats).is_empty());
        assert!(conn.wants_ordinary(size));
        while conn.process_ordinary(&mut disk, &mut stats) {
            let n = conn.output().len();
            conn.consume_output(n);
        }
        assert!(conn.is_between_requests());
        // A small write whose payload is still arriving is not the ordinary path's.
        let mut more = request(CMD_WRITE, 5, 0, 4096);
        more.extend(vec![1; 100]);
        assert_eq!(conn.receive(&more), more.len());
        assert!(!conn.wants_ordinary(size));
    }
}
