//! The NBD port: drives [`crate::nbd::Connection`] over a [`Socket`].
//!
//! Bytes flow without intermediate buffers: the socket's receive buffer is offered to the
//! connection in place (it copies what it takes into its input queue), and the connection's
//! output is copied straight into the socket's transmit buffer. Disk I/O happens inside
//! [`crate::nbd::Connection::process`] (or `process_queued`, with pipelined reads and
//! writes in flight together), which stops producing replies once its output high-water
//! mark is reached, so one client cannot starve the others.

use super::socket::Socket;
use crate::blkqueue::pipeline::Finished;
use crate::disk::{DiskError, Extent, VirtualDisk};
use crate::nbd::{Connection, NbdStats, QueuedRequest, ServerConfig};

/// Turns of receive/process/send per call, so that one busy client yields to the others and
/// to the network stack (which must run to free transmit space and take in more data).
const TURNS_PER_DRIVE: usize = 8;

/// One NBD client.
pub struct NbdSession {
    conn: Connection,
    /// The socket was asked to close.
    closing: bool,
    /// When bytes last moved.
    last_activity_ms: u64,
    /// Names the session to a loop that routes finished requests back to it.
    id: u64,
}

impl NbdSession {
    /// A session for a freshly accepted connection: the greeting is ready to be sent.
    pub fn new(config: &ServerConfig, now_ms: u64) -> Self {
        NbdSession {
            conn: Connection::new(config),
            closing: false,
            last_activity_ms: now_ms,
            id: 0,
        }
    }

    /// The same session, named `id` (see [`NbdSession::id`]).
    pub fn with_id(mut self, id: u64) -> Self {
        self.id = id;
        self
    }

    /// What the loop named the session (0 unless [`NbdSession::with_id`] said otherwise).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Answers a request the connection handed to the loop's pipeline
    /// ([`Connection::take_queued`]); the reply goes out on the next drive.
    pub fn finish_queued(&mut self, q: QueuedRequest, done: Finished, stats: &mut NbdStats) {
        self.conn.finish_queued(q, done, stats);
    }

    /// A session that turns the client away: every option is answered with
    /// `NBD_REP_ERR_SHUTDOWN` (`NBD_OPT_EXPORT_NAME`, which cannot be refused, closes the
    /// connection), for when there is no disk to export. Drive it with [`NoDisk`].
    pub fn refusing(config: &ServerConfig, now_ms: u64) -> Self {
        let mut session = NbdSession::new(config, now_ms);
        session.conn.shutdown();
        session
    }

    /// Stops serving: options and requests from now on are refused so the client
    /// disconnects; a request being served completes first.
    pub fn shutdown(&mut self) {
        self.conn.shutdown();
    }

    /// Whether the session can be dropped without cutting a reply short: no request is
    /// half-served and every reply has been handed to the socket.
    pub fn is_quiescent(&self) -> bool {
        self.closing || (self.conn.is_between_requests() && self.conn.output().is_empty())
    }

    /// Since when a client that has not finished the handshake has been silent, if it has
    /// not: such a connection can be closed to make room for a new client. Clients in the
    /// transmission phase are never evicted.
    pub fn idle_since_ms(&self) -> Option<u64> {
        (!self.closing && !self.conn.in_transmission()).then_some(self.last_activity_ms)
    }

    /// Since when a client in the transmission phase has been silent with nothing of its
    /// own in progress (no request half-received or half-served, no reply waiting), if it
    /// has: the idle timeout runs from there, and such a client may be evicted.
    pub fn idle_in_transmission_since(&self) -> Option<u64> {
        (!self.closing
            && self.conn.in_transmission()
            && self.conn.is_between_requests()
            && self.conn.output().is_empty())
        .then_some(self.last_activity_ms)
    }

    /// Disconnects the client now (idle timeout or eviction of an idle client): the
    /// connection counts are updated, the socket is closed (FIN; the client sees the end
    /// of the stream) and the session does nothing more.
    pub fn disconnect<S: Socket + ?Sized>(&mut self, socket: &mut S, stats: &mut NbdStats) {
        self.conn.close(stats);
        socket.close();
        self.closing = true;
    }

    /// The socket was asked to close; the session does nothing more.
    pub fn is_closing(&self) -> bool {
        self.closing
    }

    /// Moves bytes between the socket and the NBD state machine and serves requests on
    /// `disk`, one at a time ([`Connection::process`]). Returns whether anything moved.
    pub fn drive<S: Socket + ?Sized, D: VirtualDisk + ?Sized>(
        &mut self,
        socket: &mut S,
        disk: &mut D,
        stats: &mut NbdStats,
        now_ms: u64,
    ) -> bool {
        self.drive_with(socket, stats, now_ms, |conn, stats| {
            conn.process(disk, stats)
        })
    }

    /// As [`NbdSession::drive`], with `process` serving what the connection holds: for
    /// example [`Connection::process_queued`], which serves the reads and writes the client
    /// pipelined together on the disk's queue and answers them as they complete.
    pub fn drive_with<S: Socket + ?Sized>(
        &mut self,
        socket: &mut S,
        stats: &mut NbdStats,
        now_ms: u64,
        mut process: impl FnMut(&mut Connection, &mut NbdStats) -> bool,
    ) -> bool {
        if self.closing {
            return false;
        }
        let mut progress = false;
        for _ in 0..TURNS_PER_DRIVE {
            let mut moved = false;
            if socket.can_recv() && self.conn.input_space() > 0 {
                let taken = socket.recv_with(&mut |buf| self.conn.receive(buf));
                moved |= taken > 0;
            }
            moved |= process(&mut self.conn, stats);
            while !self.conn.output().is_empty() && socket.can_send() {
                let n = socket.send_slice(self.conn.output());
                if n == 0 {
                    break;
                }
                self.conn.consume_output(n);
                moved = true;
            }
            progress |= moved;
            if !moved {
                break;
            }
        }
        // The client went away (FIN or reset) and nothing it sent is left to serve.
        let peer_gone = !socket.may_recv() && socket.recv_queue() == 0;
        if peer_gone && !self.conn.is_closing() {
            self.conn.close(stats);
            progress = true;
        }
        if self.conn.is_closed() || (self.conn.is_closing() && !socket.may_send()) {
            socket.close();
            self.closing = true;
            progress = true;
        }
        if progress {
            self.last_activity_ms = now_ms;
        }
        progress
    }

    /// The connection is being dropped (socket reset or recycled): updates the counts.
    pub fn end(&mut self, stats: &mut NbdStats) {
        self.conn.close(stats);
    }
}

/// The disk of a [`NbdSession::refusing`] session: empty and read-only; every request fails
/// (a refusing session never reaches the transmission phase anyway).
pub struct NoDisk;

impl VirtualDisk for NoDisk {
    fn size(&self) -> u64 {
        0
    }
    fn is_read_only(&self) -> bool {
        true
    }
    fn read(&mut self, _offset: u64, _buf: &mut [u8]) -> Result<(), DiskError> {
        Err(DiskError::Unsupported)
    }
    fn write(&mut self, _offset: u64, _buf: &[u8]) -> Result<(), DiskError> {
        Err(DiskError::ReadOnly)
    }
    fn flush(&mut self) -> Result<(), DiskError> {
        Ok(())
    }
    fn discard(&mut self, _offset: u64, _len: u64) -> Result<(), DiskError> {
        Err(DiskError::ReadOnly)
    }
    fn write_zeroes(&mut self, _offset: u64, _len: u64, _may_unmap: bool) -> Result<(), DiskError> {
        Err(DiskError::ReadOnly)
    }
    fn block_status(&mut self, _offset: u64, _len: u64) -> Result<Extent, DiskError> {
        Err(DiskError::Unsupported)
    }
}
