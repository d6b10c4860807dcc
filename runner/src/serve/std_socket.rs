//! A host `TcpStream` as the service layer's [`Socket`]: what lets `qcow-metal serve` drive
//! the guest's own sessions ([`NbdSession`], [`HttpSession`]) on std sockets.
//!
//! The sessions expect a non-blocking socket with buffers (smoltcp's). Here the
//! connection's thread does the blocking I/O around each turn of the session: it reads what
//! the client sent into [`StdSocket`]'s receive buffer, lets the session take it and queue
//! replies (under the engine lock, for NBD), then writes the queued replies with the lock
//! let go, so a client that does not read stalls only itself.
//!
//! [`NbdSession`]: qcow_metal::service::nbd::NbdSession
//! [`HttpSession`]: qcow_metal::service::http::HttpSession

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};

use qcow_metal::service::socket::Socket;

/// Most bytes a turn may queue for sending before the socket says it is full.
const SEND_BUFFER: usize = 4 * 1024 * 1024;

/// Size of the receive buffer (many pipelined NBD requests, or a good part of a write).
const RECV_BUFFER: usize = 256 * 1024;

/// See the module documentation.
pub struct StdSocket {
    stream: TcpStream,
    rx: Vec<u8>,
    rx_start: usize,
    rx_end: usize,
    tx: Vec<u8>,
    /// The peer closed its side (a read returned 0).
    peer_closed: bool,
    /// A read or write failed (reset, broken pipe): the connection is gone.
    broken: bool,
    /// The session closed the connection (FIN after the queued bytes).
    closed: bool,
    /// The session dropped the connection (RST, queued bytes dropped).
    aborted: bool,
    /// Payload bytes moved since [`StdSocket::take_moved`] last looked: (received, sent).
    moved: (u64, u64),
}

impl StdSocket {
    /// Wraps a connected stream.
    pub fn new(stream: TcpStream) -> Self {
        StdSocket {
            stream,
            rx: vec![0; RECV_BUFFER],
            rx_start: 0,
            rx_end: 0,
            tx: Vec::new(),
            peer_closed: false,
            broken: false,
            closed: false,
            aborted: false,
            moved: (0, 0),
        }
    }

    /// The session has finished with the connection (closed or aborted it), or it broke.
    pub fn is_done(&self) -> bool {
        self.closed || self.aborted || self.broken
    }

    /// Payload bytes (received, sent) since the last call.
    pub fn take_moved(&mut self) -> (u64, u64) {
        std::mem::take(&mut self.moved)
    }

    /// Whether the peer has closed its side (nothing more will be read).
    pub fn peer_closed(&self) -> bool {
        self.peer_closed || self.broken
    }

    /// Writes every queued byte (blocking). A failure marks the connection broken.
    pub fn flush(&mut self) {
        if self.aborted || self.broken {
            self.tx.clear();
            return;
        }
        if !self.tx.is_empty() {
            match self.stream.write_all(&self.tx) {
                Ok(()) => self.moved.1 += self.tx.len() as u64,
                Err(_) => self.broken = true,
            }
            self.tx.clear();
        }
    }

    /// Reads what the peer sent into the receive buffer, waiting at most the stream's read
    /// timeout. Returns whether bytes (or the end of the stream) arrived.
    pub fn fill(&mut self) -> io::Result<bool> {
        if self.rx_start > 0 {
            self.rx.copy_within(self.rx_start..self.rx_end, 0);
            self.rx_end -= self.rx_start;
            self.rx_start = 0;
        }
        if self.peer_closed() || self.rx_end == self.rx.len() {
            return Ok(false);
        }
        match self.stream.read(&mut self.rx[self.rx_end..]) {
            Ok(0) => {
                self.peer_closed = true;
                Ok(true)
            }
            Ok(n) => {
                self.rx_end += n;
                self.moved.0 += n as u64;
                Ok(true)
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Ok(false),
            Err(e) if e.kind() == ErrorKind::Interrupted => Ok(false),
            Err(e) => {
                self.broken = true;
                Err(e)
            }
        }
    }

    /// Ends the connection as the session asked: a FIN after the queued bytes, or a reset.
    pub fn finish(mut self) {
        self.flush();
        let how = if self.aborted || self.broken {
            Shutdown::Both
        } else {
            Shutdown::Write
        };
        let _ = self.stream.shutdown(how);
    }
}

impl Socket for StdSocket {
    fn can_recv(&self) -> bool {
        self.rx_start < self.rx_end
    }
    fn recv_with(&mut self, take: &mut dyn FnMut(&[u8]) -> usize) -> usize {
        if self.rx_start == self.rx_end {
            return 0;
        }
        let n = take(&self.rx[self.rx_start..self.rx_end]).min(self.rx_end - self.rx_start);
        self.rx_start += n;
        n
    }
    fn recv_queue(&self) -> usize {
        self.rx_end - self.rx_start
    }
    fn may_recv(&self) -> bool {
        !self.peer_closed()
    }
    fn can_send(&self) -> bool {
        self.may_send() && self.tx.len() < SEND_BUFFER
    }
    fn may_send(&self) -> bool {
        !(self.closed || self.aborted || self.broken)
    }
    fn send_slice(&mut self, data: &[u8]) -> usize {
        if !self.may_send() {
            return 0;
        }
        let n = data.len().min(SEND_BUFFER - self.tx.len().min(SEND_BUFFER));
        self.tx.extend_from_slice(&data[..n]);
        n
    }
    fn send_queue(&self) -> usize {
        self.tx.len()
    }
    fn close(&mut self) {
        self.closed = true;
    }
    fn abort(&mut self) {
        self.aborted = true;
        self.tx.clear();
    }
}
