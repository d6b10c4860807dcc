//! The per-client NBD state machine: handshake, option haggling and transmission.
//!
//! A [`Connection`] is fed the bytes a client sent ([`Connection::receive`]), advanced with
//! the shared disk ([`Connection::process`]) and drained of the bytes to send back
//! ([`Connection::output`], [`Connection::consume_output`]). It does no I/O itself, so the
//! guest drives it from smoltcp sockets and the host tests from std sockets.
//!
//! Buffers are bounded: the input holds at most one I/O chunk plus a little (a write payload
//! is written to the disk chunk by chunk as it arrives), and new replies are only produced
//! while less than a high-water mark of output is waiting, so a client that does not read
//! its replies stops being read from.

use super::buf::ByteQueue;
use super::proto::*;
use super::stats::{Command, NbdError, NbdStats};
use crate::disk::{Allocation, DiskError, VirtualDisk, check_request};
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

mod queued;
pub use queued::{MAX_BATCH, QueuedRequest};

/// The largest option payload accepted during the handshake; larger ones are skipped and
/// answered with `NBD_REP_ERR_TOO_BIG`.
pub const MAX_OPTION_LEN: usize = 16 * 1024;

/// At most this many `base:allocation` descriptors go into one block-status reply.
pub const MAX_EXTENTS: usize = 1024;

/// What the server exports and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Name of the one export (the empty name also selects it, as the default export).
    pub export_name: String,
    /// Human-readable description sent with `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`
    /// (nothing when empty).
    pub description: String,
    /// Refuse writes (`EPERM`) and advertise `NBD_FLAG_READ_ONLY`. The export is also
    /// read-only when the disk says so.
    pub read_only: bool,
    /// Advertise `NBD_FLAG_CAN_MULTI_CONN`: right when every connection works on the same
    /// disk object, which is how this server is meant to be driven.
    pub multi_conn: bool,
    /// Minimum block size advertised (1: any byte alignment works).
    pub min_block: u32,
    /// Preferred block size advertised.
    pub preferred_block: u32,
    /// Largest read or write payload accepted (advertised as the maximum block size).
    pub max_payload: u32,
    /// Size of the pieces reads and writes are split into on the way to the disk; also
    /// bounds the input buffer. Pieces are aligned to multiples of this size on the disk.
    pub io_chunk: u32,
    /// New replies are produced only while less than this many output bytes are waiting.
    pub output_high_water: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            export_name: String::from("disk"),
            description: String::new(),
            read_only: false,
            multi_conn: true,
            min_block: 1,
            preferred_block: 4096,
            max_payload: 32 * 1024 * 1024,
            io_chunk: 1024 * 1024,
            output_high_water: 256 * 1024,
        }
    }
}

impl ServerConfig {
    /// A configuration exporting `name` with the defaults for everything else.
    pub fn named(name: &str) -> Self {
        ServerConfig {
            export_name: String::from(name),
            ..ServerConfig::default()
        }
    }

    fn chunk(&self) -> u64 {
        u64::from(self.io_chunk.clamp(4096, 64 * 1024 * 1024))
    }
}

/// What the `batch` step of [`Connection::advance`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Batch {
    /// Served requests: look again.
    Served,
    /// The request at the head belongs to a pipeline outside: the call ends.
    Stop,
    /// Nothing: the ordinary step runs.
    No,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the client's 32-bit flags.
    ClientFlags,
    /// Waiting for an option header.
    OptionHeader,
    /// Waiting for `len` bytes of option data.
    OptionData { opt: u32, len: usize },
    /// Skipping an oversized option's data.
    OptionSkip { opt: u32, remaining: u64 },
    /// Waiting for a request header.
    Request,
    /// Taking a write's payload, piece by piece.
    WritePayload(WriteState),
    /// Sending a read's data, piece by piece.
    ReadReply(ReadState),
    /// Done: nothing more is read; the output is still to be sent.
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct WriteState {
    req: Request,
    next: u64,
    remaining: u64,
    error: Option<NbdError>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ReadState {
    req: Request,
    next: u64,
    remaining: u64,
    header_sent: bool,
}

/// A metadata context a client selected; its ID is its index in the list plus one.
#[derive(Debug, Clone, PartialEq, Eq)]
enum MetaContext {
    /// `base:allocation`.
    Base,
    /// `qemu:dirty-bitmap:NAME`.
    Dirty(String),
}

/// Prefix of the dirty-bitmap metadata contexts (as `qemu-nbd -B NAME` names them).
pub const META_DIRTY_BITMAP: &str = "qemu:dirty-bitmap:";

/// One client's NBD session. See the module documentation for how to drive it.
pub struct Connection {
    config: ServerConfig,
    phase: Phase,
    input: ByteQueue,
    output: ByteQueue,
    input_cap: usize,
    no_zeroes: bool,
    structured: bool,
    /// Selected metadata contexts (`NBD_OPT_SET_META_CONTEXT`).
    contexts: Vec<MetaContext>,
    /// The read-only view (snapshot) the client opened as `EXPORT@VIEW`, if any.
    view: Option<String>,
    read_only: bool,
    counted: bool,
    released: bool,
    shutting_down: bool,
    /// Requests handed to a pipeline outside ([`Connection::take_queued`]) not yet answered.
    queued_out: usize,
    /// Bytes the reads among them will add to the output.
    queued_read_bytes: usize,
}

impl Connection {
    /// A new connection; its output already holds the server's greeting.
    pub fn new(config: &ServerConfig) -> Self {
        let chunk = config.chunk() as usize;
        let mut output = ByteQueue::new(4096);
        output.push(&NBDMAGIC.to_be_bytes());
        output.push(&IHAVEOPT.to_be_bytes());
        output.push(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        Connection {
            config: config.clone(),
            phase: Phase::ClientFlags,
            input: ByteQueue::new(4096),
            output,
            input_cap: chunk.max(MAX_OPTION_LEN) + 4096,
            no_zeroes: false,
            structured: false,
            contexts: Vec::new(),
            view: None,
            read_only: config.read_only,
            counted: false,
            released: false,
            shutting_down: false,
            queued_out: 0,
            queued_read_bytes: 0,
        }
    }

    /// Takes bytes the client sent; returns how many were accepted (possibly fewer than
    /// given when the input buffer is full: offer the rest after the next
    /// [`Connection::process`]). After the connection closed everything is accepted and
    /// dropped.
    pub fn receive(&mut self, bytes: &[u8]) -> usize {
        if self.phase == Phase::Closed {
            return bytes.len();
        }
        let n = bytes.len().min(self.input_space());
        if n > 0 {
            self.input.tail(n).copy_from_slice(&bytes[..n]);
            self.input.commit(n);
        }
        n
    }

    /// How many bytes [`Connection::receive`] would accept now.
    pub fn input_space(&self) -> usize {
        if self.phase == Phase::Closed {
            return usize::MAX;
        }
        self.input_cap.saturating_sub(self.input.len())
    }

    /// Bytes to send to the client.
    pub fn output(&self) -> &[u8] {
        self.output.pending()
    }

    /// Marks `n` bytes of [`Connection::output`] as sent.
    pub fn consume_output(&mut self, n: usize) {
        self.output.consume(n);
    }

    /// Whether the session is over and everything has been sent: close the socket.
    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed && self.output.is_empty()
    }

    /// Whether the session is over (the remaining output should still be sent).
    pub fn is_closing(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// Whether the handshake is done and requests are being served.
    pub fn in_transmission(&self) -> bool {
        matches!(
            self.phase,
            Phase::Request | Phase::WritePayload(_) | Phase::ReadReply(_)
        )
    }

    /// The server is shutting down: options from now on get `NBD_REP_ERR_SHUTDOWN` (an
    /// `NBD_OPT_EXPORT_NAME`, which cannot be refused, closes the connection) and requests
    /// get `ESHUTDOWN` (a write's payload is still read and dropped), so that clients
    /// disconnect. A request already being served completes normally; the driver can close
    /// once [`Connection::is_between_requests`] and the output is sent.
    pub fn shutdown(&mut self) {
        self.shutting_down = true;
    }

    /// Whether no request is half-served (no write payload or read data pending, none in a
    /// pipeline outside), so the session can be ended without cutting a reply short.
    pub fn is_between_requests(&self) -> bool {
        !matches!(self.phase, Phase::WritePayload(_) | Phase::ReadReply(_)) && self.queued_out == 0
    }

    /// Ends the session now (the peer went away, or the driver drops the connection);
    /// updates the connection counts. Idempotent.
    pub fn close(&mut self, stats: &mut NbdStats) {
        self.count_open(stats);
        self.phase = Phase::Closed;
        self.input.clear();
        self.release(stats);
    }

    /// Advances the session as far as the buffered input and the output high-water mark
    /// allow, doing the disk I/O it asks for. Returns whether anything happened (input
    /// consumed or output produced); when it returns `false`, more input or an emptier
    /// output is needed.
    pub fn process<D: VirtualDisk + ?Sized>(&mut self, disk: &mut D, stats: &mut NbdStats) -> bool {
        self.advance(disk, stats, |_, _, _| Batch::No)
    }

    /// The body of [`Connection::process`]: before each step, `batch` may serve several
    /// requests at once, or stop the call (see [`Batch`]).
    fn advance<D: VirtualDisk + ?Sized>(
        &mut self,
        disk: &mut D,
        stats: &mut NbdStats,
        batch: impl FnMut(&mut Self, &mut D, &mut NbdStats) -> Batch,
    ) -> bool {
        self.count_open(stats);
        // A client of a view (`EXPORT@SNAPSHOT`) is served from it for this call.
        if let Some(v) = &self.view
            && disk.select_view(Some(v)).is_err()
        {
            self.protocol_error(stats);
        }
        let progressed = self.process_selected(disk, stats, batch);
        if self.view.is_some() {
            let _ = disk.select_view(None);
        }
        progressed
    }

    fn process_selected<D: VirtualDisk + ?Sized>(
        &mut self,
        disk: &mut D,
        stats: &mut NbdStats,
        mut batch: impl FnMut(&mut Self, &mut D, &mut NbdStats) -> Batch,
    ) -> bool {
        let mut progressed = false;
        while self.phase != Phase::Closed
            && self.output.len() < self.config.output_high_water as usize
        {
            match batch(self, disk, stats) {
                Batch::Served => {
                    progressed = true;
                    continue;
                }
                Batch::Stop => break,
                Batch::No => {}
            }
            if !self.step(disk, stats) {
                break;
            }
            progressed = true;
        }
        if self.phase == Phase::Closed {
            self.input.clear();
            self.release(stats);
        }
        progressed
    }

    fn count_open(&mut self, stats: &mut NbdStats) {
        if !self.counted {
            self.counted = true;
            stats.connections_total += 1;
            stats.connections_active += 1;
        }
    }

    fn release(&mut self, stats: &mut NbdStats) {
        if self.counted && !self.released {
            self.released = true;
            stats.connections_active = stats.connections_active.saturating_sub(1);
        }
    }

    fn protocol_error(&mut self, stats: &mut NbdStats) {
        stats.protocol_errors += 1;
        self.phase = Phase::Closed;
    }

    /// One step; `false` when it cannot move without more input.
    fn step<D: VirtualDisk + ?Sized>(&mut self, disk: &mut D, stats: &mut NbdStats) -> bool {
        match self.phase {
            Phase::ClientFlags => {
                if self.input.len() < 4 {
                    return false;
                }
                let flags = be32(self.input.pending());
                self.input.consume(4);
                if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
                    self.protocol_error(stats);
                } else {
                    self.no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
                    self.phase = Phase::OptionHeader;
                }
                true
            }
            Phase::OptionHeader => {
                if self.input.len() < OPTION_HEADER_LEN {
                    return false;
                }
                let h = self.input.pending();
                let (magic, opt, len) = (be64(h), be32(&h[8..]), be32(&h[12..]));
                self.input.consume(OPTION_HEADER_LEN);
                if magic != IHAVEOPT {
                    self.protocol_error(stats);
                } else if len as usize > MAX_OPTION_LEN {
                    if opt == OPT_EXPORT_NAME {
                        // No way to refuse it but to close.
                        self.protocol_error(stats);
                    } else {
                        self.phase = Phase::OptionSkip {
                            opt,
                            remaining: u64::from(len),
                        };
                    }
                } else {
                    self.phase = Phase::OptionData {
                        opt,
                        len: len as usize,
                    };
                }
                true
            }
            Phase::OptionData { opt, len } => {
                if self.input.len() < len {
                    return false;
                }
                let data = self.input.pending()[..len].to_vec();
                self.input.consume(len);
                self.phase = Phase::OptionHeader;
                self.handle_option(opt, &data, disk, stats);
                true
            }
            Phase::OptionSkip { opt, remaining } => {
                let n = (self.input.len() as u64).min(remaining);
                self.input.consume(n as usize);
                let remaining = remaining - n;
                if remaining == 0 {
                    self.option_reply(opt, REP_ERR_TOO_BIG, b"option too large");
                    self.phase = Phase::OptionHeader;
                    true
                } else {
                    self.phase = Phase::OptionSkip { opt, remaining };
                    n > 0
                }
            }
            Phase::Request => {
                if self.input.len() < REQUEST_LEN {
                    return false;
                }
                let mut h = [0u8; REQUEST_LEN];
                h.copy_from_slice(&self.input.pending()[..REQUEST_LEN]);
                self.input.consume(REQUEST_LEN);
                match Request::decode(&h) {
                    Some(req) => self.start_request(req, disk, stats),
                    None => self.protocol_error(stats),
                }
                true
            }
            Phase::WritePayload(st) => self.write_step(st, disk, stats),
            Phase::ReadReply(st) => self.read_step(st, disk, stats),
            Phase::Closed => false,
        }
    }

    // ---- handshake -------------------------------------------------------------------

    fn option_reply(&mut self, opt: u32, kind: u32, data: &[u8]) {
        let mut h = [0u8; 20];
        h[0..8].copy_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
        h[8..12].copy_from_slice(&opt.to_be_bytes());
        h[12..16].copy_from_slice(&kind.to_be_bytes());
        h[16..20].copy_from_slice(&(data.len() as u32).to_be_bytes());
        self.output.push(&h);
        self.output.push(data);
    }

    /// Which export `name` selects: `Some(None)` the disk itself (also the empty name),
    /// `Some(Some(view))` a read-only view of it named `EXPORT@VIEW`, `None` no export.
    fn resolve_export<D: VirtualDisk + ?Sized>(
        &self,
        name: &[u8],
        disk: &mut D,
    ) -> Option<Option<String>> {
        let export = self.config.export_name.as_bytes();
        if name.is_empty() || name == export {
            return Some(None);
        }
        let view = name.strip_prefix(export)?.strip_prefix(b"@")?;
        let view = core::str::from_utf8(view).ok()?;
        disk.views()
            .into_iter()
            .any(|v| v == view)
            .then(|| Some(String::from(view)))
    }

    /// Runs `f` with `view` selected on the disk (the disk itself when `None`).
    fn with_view<D: VirtualDisk + ?Sized, T>(
        disk: &mut D,
        view: &Option<String>,
        f: impl FnOnce(&mut D) -> T,
    ) -> Option<T> {
        if view.is_some() && disk.select_view(view.as_deref()).is_err() {
            return None;
        }
        let r = f(disk);
        if view.is_some() {
            let _ = disk.select_view(None);
        }
        Some(r)
    }

    fn transmission_flags<D: VirtualDisk + ?Sized>(&self, disk: &D) -> u16 {
        let mut flags = TFLAG_HAS_FLAGS
            | TFLAG_SEND_FLUSH
            | TFLAG_SEND_FUA
            | TFLAG_SEND_TRIM
            | TFLAG_SEND_WRITE_ZEROES;
        if self.config.multi_conn {
            flags |= TFLAG_CAN_MULTI_CONN;
        }
        if self.config.read_only || disk.is_read_only() {
            flags |= TFLAG_READ_ONLY;
        }
        flags
    }

    fn enter_transmission(&mut self, disk_read_only: bool, stats: &mut NbdStats) {
        self.read_only = self.config.read_only || disk_read_only;
        self.phase = Phase::Request;
        stats.sessions_total += 1;
    }

    fn handle_option<D: VirtualDisk + ?Sized>(
        &mut self,
        opt: u32,
        data: &[u8],
        disk: &mut D,
        stats: &mut NbdStats,
    ) {
        if self.shutting_down && opt != OPT_ABORT {
            if opt == OPT_EXPORT_NAME {
                self.phase = Phase::Closed;
            } else {
                self.option_reply(opt, REP_ERR_SHUTDOWN, b"the server is shutting down");
            }
            return;
        }
        match opt {
            OPT_EXPORT_NAME => {
                let Some(view) = self.resolve_export(data, disk) else {
                    self.protocol_error(stats);
                    return;
                };
                let Some((size, flags, ro)) = Self::with_view(disk, &view, |d| {
                    (d.size(), self.transmission_flags(d), d.is_read_only())
                }) else {
                    self.protocol_error(stats);
                    return;
                };
                self.output.push(&size.to_be_bytes());
                self.output.push(&flags.to_be_bytes());
                if !self.no_zeroes {
                    self.output.push(&[0u8; 124]);
                }
                self.view = view;
                self.enter_transmission(ro, stats);
            }
            OPT_ABORT => {
                self.option_reply(opt, REP_ACK, &[]);
                self.phase = Phase::Closed;
            }
            OPT_LIST => {
                if !data.is_empty() {
                    self.option_reply(opt, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data");
                    return;
                }
                let mut names = vec![self.config.export_name.clone()];
                for v in disk.views() {
                    names.push(alloc::format!("{}@{v}", self.config.export_name));
                }
                for (i, name) in names.iter().enumerate() {
                    let name = name.as_bytes();
                    let mut rep =
                        Vec::with_capacity(4 + name.len() + self.config.description.len());
                    rep.extend_from_slice(&(name.len() as u32).to_be_bytes());
                    rep.extend_from_slice(name);
                    if i == 0 {
                        rep.extend_from_slice(self.config.description.as_bytes());
                    } else {
                        rep.extend_from_slice(b"internal snapshot (read-only)");
                    }
                    self.option_reply(opt, REP_SERVER, &rep);
                }
                self.option_reply(opt, REP_ACK, &[]);
            }
            OPT_INFO | OPT_GO => self.info_or_go(opt, data, disk, stats),
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    self.option_reply(
                        opt,
                        REP_ERR_INVALID,
                        b"NBD_OPT_STRUCTURED_REPLY takes no data",
                    );
                } else {
                    self.structured = true;
                    self.option_reply(opt, REP_ACK, &[]);
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => self.meta_context(opt, data, disk),
            OPT_STARTTLS => self.option_reply(opt, REP_ERR_UNSUP, b"TLS is not supported"),
            _ => self.option_reply(opt, REP_ERR_UNSUP, b"unknown option"),
        }
    }

    fn info_or_go<D: VirtualDisk + ?Sized>(
        &mut self,
        opt: u32,
        data: &[u8],
        disk: &mut D,
        stats: &mut NbdStats,
    ) {
        // u32 name length, name, u16 count, count x u16 information requests.
        let parsed = (|| {
            let (name, rest) = split_length_prefixed(data)?;
            let count = be16(rest.get(0..2)?) as usize;
            let reqs = rest.get(2..)?;
            (reqs.len() == count * 2).then_some((name, reqs))
        })();
        let Some((name, reqs)) = parsed else {
            self.option_reply(opt, REP_ERR_INVALID, b"malformed information request");
            return;
        };
        let Some(view) = self.resolve_export(name, disk) else {
            self.option_reply(opt, REP_ERR_UNKNOWN, b"no such export");
            return;
        };
        let Some((size, flags, ro)) = Self::with_view(disk, &view, |d| {
            (d.size(), self.transmission_flags(d), d.is_read_only())
        }) else {
            self.option_reply(opt, REP_ERR_UNKNOWN, b"the snapshot cannot be opened");
            return;
        };
        let wants = |t: u16| reqs.chunks_exact(2).any(|r| be16(r) == t);
        let mut info = Vec::with_capacity(16);
        info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        info.extend_from_slice(&size.to_be_bytes());
        info.extend_from_slice(&flags.to_be_bytes());
        self.option_reply(opt, REP_INFO, &info);
        if wants(INFO_NAME) {
            let mut rep = Vec::from(INFO_NAME.to_be_bytes());
            rep.extend_from_slice(self.config.export_name.as_bytes());
            if let Some(v) = &view {
                rep.push(b'@');
                rep.extend_from_slice(v.as_bytes());
            }
            self.option_reply(opt, REP_INFO, &rep);
        }
        if wants(INFO_DESCRIPTION) && !self.config.description.is_empty() {
            let mut rep = Vec::from(INFO_DESCRIPTION.to_be_bytes());
            rep.extend_from_slice(self.config.description.as_bytes());
            self.option_reply(opt, REP_INFO, &rep);
        }
        // Sent even when not asked for, as other servers do: clients that did not ask ignore it.
        let mut bs = Vec::from(INFO_BLOCK_SIZE.to_be_bytes());
        bs.extend_from_slice(&self.config.min_block.max(1).to_be_bytes());
        bs.extend_from_slice(&self.config.preferred_block.max(1).to_be_bytes());
        bs.extend_from_slice(&self.config.max_payload.to_be_bytes());
        self.option_reply(opt, REP_INFO, &bs);
        self.option_reply(opt, REP_ACK, &[]);
        if opt == OPT_GO {
            if view != self.view {
                // Contexts were negotiated for another export.
                self.contexts.clear();
            }
            self.view = view;
            self.enter_transmission(ro, stats);
        }
    }

    fn meta_context<D: VirtualDisk + ?Sized>(&mut self, opt: u32, data: &[u8], disk: &mut D) {
        if !self.structured {
            self.option_reply(opt, REP_ERR_INVALID, b"negotiate structured replies first");
            return;
        }
        // u32 name length, name, u32 query count, count x (u32 length, query).
        let parsed = (|| {
            let (name, rest) = split_length_prefixed(data)?;
            let count = be32(rest.get(0..4)?) as usize;
            let mut rest = &rest[4..];
            let mut queries = Vec::new();
            for _ in 0..count {
                let (query, next) = split_length_prefixed(rest)?;
                queries.push(query);
                rest = next;
            }
            rest.is_empty().then_some((name, queries))
        })();
        let Some((name, queries)) = parsed else {
            self.option_reply(opt, REP_ERR_INVALID, b"malformed metadata context request");
            return;
        };
        let Some(view) = self.resolve_export(name, disk) else {
            self.option_reply(opt, REP_ERR_UNKNOWN, b"no such export");
            return;
        };
        // Dirty bitmaps belong to the disk itself, not to its snapshots.
        let bitmaps = if view.is_none() {
            disk.dirty_bitmaps()
        } else {
            Vec::new()
        };
        let base = META_BASE_ALLOCATION.as_bytes();
        let dirty = META_DIRTY_BITMAP.as_bytes();
        let mut selected = Vec::new();
        let list = opt == OPT_LIST_META_CONTEXT;
        if (list && queries.is_empty())
            || queries
                .iter()
                .any(|q| *q == base || (list && *q == b"base:"))
        {
            selected.push(MetaContext::Base);
        }
        for b in bitmaps {
            let full = [dirty, b.as_bytes()].concat();
            let listed = list
                && (queries.is_empty() || queries.iter().any(|q| *q == b"qemu:" || *q == dirty));
            if listed || queries.contains(&full.as_slice()) {
                selected.push(MetaContext::Dirty(b));
            }
        }
        for (i, c) in selected.iter().enumerate() {
            let id: u32 = if list { 0 } else { i as u32 + 1 };
            let mut rep = Vec::from(id.to_be_bytes());
            match c {
                MetaContext::Base => rep.extend_from_slice(base),
                MetaContext::Dirty(b) => {
                    rep.extend_from_slice(dirty);
                    rep.extend_from_slice(b.as_bytes());
                }
            }
            self.option_reply(opt, REP_META_CONTEXT, &rep);
        }
        if !list {
            self.contexts = selected;
            self.view = view;
        }
        self.option_reply(opt, REP_ACK, &[]);
    }

    // ---- transmission ----------------------------------------------------------------

    fn reply_ok(&mut self, handle: u64) {
        let mut h = [0u8; SIMPLE_REPLY_LEN];
        put_simple_reply(&mut h, 0, handle);
        self.output.push(&h);
    }

    fn reply_error(&mut self, handle: u64, err: NbdError, msg: &str, stats: &mut NbdStats) {
        stats.errors[err.index()] += 1;
        if self.structured {
            let msg = &msg.as_bytes()[..msg.len().min(1024)];
            let mut h = [0u8; CHUNK_HEADER_LEN + 6];
            put_chunk_header(
                &mut h,
                REPLY_FLAG_DONE,
                REPLY_TYPE_ERROR,
                handle,
                6 + msg.len() as u32,
            );
            h[20..24].copy_from_slice(&err.code().to_be_bytes());
            h[24..26].copy_from_slice(&(msg.len() as u16).to_be_bytes());
            self.output.push(&h);
            self.output.push(msg);
        } else {
            let mut h = [0u8; SIMPLE_REPLY_LEN];
            put_simple_reply(&mut h, err.code(), handle);
            self.output.push(&h);
        }
    }

    fn finish(&mut self, handle: u64, result: Result<(), NbdError>, stats: &mut NbdStats) {
        match result {
            Ok(()) => self.reply_ok(handle),
            Err(e) => self.reply_error(handle, e, error_message(e), stats),
        }
    }

    fn start_request<D: VirtualDisk + ?Sized>(
        &mut self,
        req: Request,
        disk: &mut D,
        stats: &mut NbdStats,
    ) {
        let cmd = Command::from_wire(req.kind);
        stats.requests[cmd.index()] += 1;
        if self.shutting_down && cmd != Command::Disconnect {
            if cmd == Command::Write {
                self.phase = Phase::WritePayload(WriteState {
                    req,
                    next: req.offset,
                    remaining: u64::from(req.len),
                    error: Some(NbdError::Shutdown),
                });
            } else {
                self.reply_error(
                    req.handle,
                    NbdError::Shutdown,
                    error_message(NbdError::Shutdown),
                    stats,
                );
            }
            return;
        }
        let size = disk.size();
        let len = u64::from(req.len);
        let in_range = check_request(req.offset, len, size).is_ok();
        match cmd {
            Command::Read => {
                let bad = if req.flags & !CMD_FLAG_FUA != 0 || !in_range {
                    Some(error_message(NbdError::Invalid))
                } else if req.len > self.config.max_payload {
                    Some("read larger than the maximum block size")
                } else {
                    None
                };
                if let Some(msg) = bad {
                    self.reply_error(req.handle, NbdError::Invalid, msg, stats);
                } else if req.len == 0 {
                    if self.structured {
                        let mut h = [0u8; CHUNK_HEADER_LEN];
                        put_chunk_header(&mut h, REPLY_FLAG_DONE, REPLY_TYPE_NONE, req.handle, 0);
                        self.output.push(&h);
                    } else {
                        self.reply_ok(req.handle);
                    }
                } else {
                    self.phase = Phase::ReadReply(ReadState {
                        req,
                        next: req.offset,
                        remaining: len,
                        header_sent: false,
                    });
                }
            }
            Command::Write => {
                let error = if req.flags & !CMD_FLAG_FUA != 0 || req.len > self.config.max_payload {
                    Some(NbdError::Invalid)
                } else if self.read_only {
                    Some(NbdError::Perm)
                } else if !in_range {
                    Some(NbdError::NoSpace)
                } else {
                    None
                };
                // The payload follows in every case and is read (and dropped on error).
                self.phase = Phase::WritePayload(WriteState {
                    req,
                    next: req.offset,
                    remaining: len,
                    error,
                });
            }
            Command::Disconnect => {
                self.phase = Phase::Closed;
            }
            Command::Flush => {
                let r = if req.flags & !CMD_FLAG_FUA != 0 {
                    Err(NbdError::Invalid)
                } else if self.read_only {
                    Ok(())
                } else {
                    disk.flush().map_err(NbdError::from)
                };
                self.finish(req.handle, r, stats);
            }
            Command::Trim => {
                let r = if req.flags & !CMD_FLAG_FUA != 0 || !in_range {
                    Err(NbdError::Invalid)
                } else if self.read_only {
                    Err(NbdError::Perm)
                } else if len == 0 {
                    Ok(())
                } else {
                    match disk.discard(req.offset, len) {
                        // A trim is a hint: a disk that cannot discard ignores it.
                        Ok(()) | Err(DiskError::Unsupported) => fua(disk, req.flags),
                        Err(e) => Err(e.into()),
                    }
                };
                if r.is_ok() {
                    stats.bytes_trimmed += len;
                }
                self.finish(req.handle, r, stats);
            }
            Command::WriteZeroes => {
                let r = if req.flags & !(CMD_FLAG_FUA | CMD_FLAG_NO_HOLE) != 0 {
                    Err(NbdError::Invalid)
                } else if self.read_only {
                    Err(NbdError::Perm)
                } else if !in_range {
                    Err(NbdError::NoSpace)
                } else if len == 0 {
                    Ok(())
                } else {
                    let may_unmap = req.flags & CMD_FLAG_NO_HOLE == 0;
                    match disk.write_zeroes(req.offset, len, may_unmap) {
                        Ok(()) => fua(disk, req.flags),
                        Err(DiskError::Unsupported) => {
                            zero_by_writing(disk, req.offset, len, self.config.chunk())
                                .and_then(|()| fua(disk, req.flags))
                        }
                        Err(e) => Err(e.into()),
                    }
                };
                if r.is_ok() {
                    stats.bytes_zeroed += len;
                }
                self.finish(req.handle, r, stats);
            }
            Command::BlockStatus => {
                if !self.structured || self.contexts.is_empty() {
                    self.reply_error(
                        req.handle,
                        NbdError::Invalid,
                        "no metadata context negotiated",
                        stats,
                    );
                } else if req.flags & !(CMD_FLAG_FUA | CMD_FLAG_REQ_ONE) != 0
                    || len == 0
                    || !in_range
                {
                    self.reply_error(
                        req.handle,
                        NbdError::Invalid,
                        error_message(NbdError::Invalid),
                        stats,
                    );
                } else {
                    self.block_status(req, disk, stats);
                }
            }
            Command::Other => {
                self.reply_error(req.handle, NbdError::Invalid, "unknown command", stats);
            }
        }
    }

    fn write_step<D: VirtualDisk + ?Sized>(
        &mut self,
        mut st: WriteState,
        disk: &mut D,
        stats: &mut NbdStats,
    ) -> bool {
        let mut progressed = false;
        if st.remaining > 0 {
            if st.error.is_some() {
                let n = (self.input.len() as u64).min(st.remaining);
                self.input.consume(n as usize);
                st.remaining -= n;
                progressed = n > 0;
            } else {
                let chunk = self.config.chunk();
                let piece = st.remaining.min(chunk - st.next % chunk) as usize;
                if self.input.len() < piece {
                    return false;
                }
                if let Err(e) = disk.write(st.next, &self.input.pending()[..piece]) {
                    st.error = Some(e.into());
                }
                self.input.consume(piece);
                st.next += piece as u64;
                st.remaining -= piece as u64;
                progressed = true;
            }
        }
        if st.remaining > 0 {
            self.phase = Phase::WritePayload(st);
            return progressed;
        }
        let r = match st.error {
            Some(e) => Err(e),
            None => fua(disk, st.req.flags),
        };
        if r.is_ok() {
            stats.bytes_written += u64::from(st.req.len);
        }
        self.phase = Phase::Request;
        self.finish(st.req.handle, r, stats);
        true
    }

    fn read_step<D: VirtualDisk + ?Sized>(
        &mut self,
        mut st: ReadState,
        disk: &mut D,
        stats: &mut NbdStats,
    ) -> bool {
        let chunk = self.config.chunk();
        let piece = st.remaining.min(chunk - st.next % chunk) as usize;
        let last = piece as u64 == st.remaining;
        let header = if self.structured {
            CHUNK_HEADER_LEN + 8
        } else if st.header_sent {
            0
        } else {
            SIMPLE_REPLY_LEN
        };
        let buf = self.output.tail(header + piece);
        match disk.read(st.next, &mut buf[header..]) {
            Ok(()) => {
                if self.structured {
                    let flags = if last { REPLY_FLAG_DONE } else { 0 };
                    let len = 8 + piece as u32;
                    put_chunk_header(buf, flags, REPLY_TYPE_OFFSET_DATA, st.req.handle, len);
                    buf[20..28].copy_from_slice(&st.next.to_be_bytes());
                } else if !st.header_sent {
                    put_simple_reply(buf, 0, st.req.handle);
                }
                self.output.commit(header + piece);
                st.header_sent = true;
                st.next += piece as u64;
                st.remaining -= piece as u64;
                if last {
                    stats.bytes_read += u64::from(st.req.len);
                    self.phase = Phase::Request;
                } else {
                    self.phase = Phase::ReadReply(st);
                }
            }
            Err(e) => {
                let e = NbdError::from(e);
                self.phase = Phase::Request;
                if self.structured || !st.header_sent {
                    self.reply_error(st.req.handle, e, error_message(e), stats);
                } else {
                    // A simple reply already promised the data: the protocol leaves only a
                    // hard disconnect.
                    stats.errors[e.index()] += 1;
                    self.phase = Phase::Closed;
                }
            }
        }
        true
    }

    fn block_status<D: VirtualDisk + ?Sized>(
        &mut self,
        req: Request,
        disk: &mut D,
        stats: &mut NbdStats,
    ) {
        let contexts = core::mem::take(&mut self.contexts);
        let mut chunks = Vec::with_capacity(contexts.len());
        for c in &contexts {
            match collect_extents(disk, c, req) {
                Ok(extents) if !extents.is_empty() => chunks.push(extents),
                Ok(_) => {
                    self.contexts = contexts;
                    self.reply_error(
                        req.handle,
                        NbdError::Io,
                        "the disk reported an empty extent",
                        stats,
                    );
                    return;
                }
                Err(e) => {
                    self.contexts = contexts;
                    let e = NbdError::from(e);
                    self.reply_error(req.handle, e, error_message(e), stats);
                    return;
                }
            }
        }
        let last = chunks.len() - 1;
        for (i, extents) in chunks.iter().enumerate() {
            let payload = 4 + 8 * extents.len();
            let mut h = [0u8; CHUNK_HEADER_LEN + 4];
            put_chunk_header(
                &mut h,
                if i == last { REPLY_FLAG_DONE } else { 0 },
                REPLY_TYPE_BLOCK_STATUS,
                req.handle,
                payload as u32,
            );
            h[20..24].copy_from_slice(&(i as u32 + 1).to_be_bytes());
            self.output.push(&h);
            let mut d = vec![0u8; 8 * extents.len()];
            for (i, (len, state)) in extents.iter().enumerate() {
                d[i * 8..i * 8 + 4].copy_from_slice(&len.to_be_bytes());
                d[i * 8 + 4..i * 8 + 8].copy_from_slice(&state.to_be_bytes());
            }
            self.output.push(&d);
        }
        self.contexts = contexts;
    }
}

/// The extents (length, state) of one metadata context for a block-status request: at most
/// [`MAX_EXTENTS`] (one with `NBD_CMD_FLAG_REQ_ONE`). An error only when the first query
/// fails; later failures end the list early.
fn collect_extents<D: VirtualDisk + ?Sized>(
    disk: &mut D,
    context: &MetaContext,
    req: Request,
) -> Result<Vec<(u32, u32)>, DiskError> {
    let end = req.offset + u64::from(req.len);
    let req_one = req.flags & CMD_FLAG_REQ_ONE != 0;
    let mut extents: Vec<(u32, u32)> = Vec::new();
    let mut pos = req.offset;
    let mut calls = 0;
    while pos < end && calls < 4 * MAX_EXTENTS {
        calls += 1;
        let r = match context {
            MetaContext::Base => disk
                .block_status(pos, end - pos)
                .map(|ext| (ext.len, allocation_state(ext.kind))),
            MetaContext::Dirty(name) => disk
                .dirty_status(name, pos, end - pos)
                .map(|(dirty, len)| (len, u32::from(dirty))),
        };
        let (len, state) = match r {
            Ok((len, state)) => (len.min(end - pos), state),
            // A disk that cannot tell: "allocated, contents unknown" is always true.
            Err(DiskError::Unsupported) if *context == MetaContext::Base => (end - pos, 0),
            Err(e) if extents.is_empty() => return Err(e),
            Err(_) => break,
        };
        if len == 0 {
            break;
        }
        match extents.last_mut() {
            Some(last) if last.1 == state => last.0 += len as u32,
            _ => {
                if (req_one && !extents.is_empty()) || extents.len() == MAX_EXTENTS {
                    break;
                }
                extents.push((len as u32, state));
            }
        }
        pos += len;
    }
    Ok(extents)
}

/// The `base:allocation` flags of an allocation kind.
pub fn allocation_state(kind: Allocation) -> u32 {
    match kind {
        Allocation::Data => 0,
        Allocation::Zero => STATE_ZERO,
        Allocation::Hole => STATE_HOLE | STATE_ZERO,
    }
}

/// Makes a request durable when the client asked for it (`NBD_CMD_FLAG_FUA`).
fn fua<D: VirtualDisk + ?Sized>(disk: &mut D, flags: u16) -> Result<(), NbdError> {
    if flags & CMD_FLAG_FUA != 0 {
        disk.flush().map_err(NbdError::from)
    } else {
        Ok(())
    }
}

/// Zeroes `len` bytes at `offset` by writing zero buffers of at most `chunk` bytes (for
/// write-zeroes on a disk that has no write-zeroes of its own).
fn zero_by_writing<D: VirtualDisk + ?Sized>(
    disk: &mut D,
    offset: u64,
    len: u64,
    chunk: u64,
) -> Result<(), NbdError> {
    let zeros = vec![0u8; chunk.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeros.len() as u64);
        disk.write(offset + done, &zeros[..n as usize])?;
        done += n;
    }
    Ok(())
}

/// The text sent with an error reply.
fn error_message(e: NbdError) -> &'static str {
    match e {
        NbdError::Perm => "the export is read-only",
        NbdError::Io => "I/O error on the disk",
        NbdError::Invalid => "invalid request (range, flags or command)",
        NbdError::NoSpace => "no space (or the request reaches past the end of the export)",
        NbdError::Overflow => "request too large",
        NbdError::NotSupported => "operation not supported",
        NbdError::Shutdown => "the server is shutting down",
    }
}
