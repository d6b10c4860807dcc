//! What a session needs of a TCP connection: [`Socket`], a small non-blocking byte pipe.
//!
//! The sessions ([`super::http`], [`super::nbd`]) move bytes through this trait only, so the
//! same session code runs on a smoltcp socket in the guest (the implementation below, with
//! the `smoltcp` feature) and on anything else that can say how much it can take and give
//! (a host `TcpStream` behind buffers, a test double).

/// A connected TCP socket as the sessions drive it: never blocks.
pub trait Socket {
    /// Received bytes are waiting.
    fn can_recv(&self) -> bool;
    /// Offers waiting received bytes to `take`, which returns how many it consumed. Returns
    /// that count (0 if nothing was waiting). May offer only part of what is waiting.
    fn recv_with(&mut self, take: &mut dyn FnMut(&[u8]) -> usize) -> usize;
    /// Received bytes not taken yet.
    fn recv_queue(&self) -> usize;
    /// The peer may still send (it has not closed its side, the connection is not gone).
    fn may_recv(&self) -> bool;
    /// There is room to queue bytes for sending.
    fn can_send(&self) -> bool;
    /// The connection can still send (it was not closed by this side or reset).
    fn may_send(&self) -> bool;
    /// Queues as much of `data` as fits; returns how many bytes were queued.
    fn send_slice(&mut self, data: &[u8]) -> usize;
    /// Bytes queued for sending that the peer has not acknowledged yet.
    fn send_queue(&self) -> usize;
    /// Closes this side once the queued bytes are sent (FIN).
    fn close(&mut self);
    /// Drops the connection at once (RST), queued bytes included.
    fn abort(&mut self);
}

#[cfg(feature = "smoltcp")]
impl Socket for smoltcp::socket::tcp::Socket<'_> {
    fn can_recv(&self) -> bool {
        smoltcp::socket::tcp::Socket::can_recv(self)
    }
    fn recv_with(&mut self, take: &mut dyn FnMut(&[u8]) -> usize) -> usize {
        self.recv(|buf| {
            let n = take(buf);
            (n, n)
        })
        .unwrap_or(0)
    }
    fn recv_queue(&self) -> usize {
        smoltcp::socket::tcp::Socket::recv_queue(self)
    }
    fn may_recv(&self) -> bool {
        smoltcp::socket::tcp::Socket::may_recv(self)
    }
    fn can_send(&self) -> bool {
        smoltcp::socket::tcp::Socket::can_send(self)
    }
    fn may_send(&self) -> bool {
        smoltcp::socket::tcp::Socket::may_send(self)
    }
    fn send_slice(&mut self, data: &[u8]) -> usize {
        smoltcp::socket::tcp::Socket::send_slice(self, data).unwrap_or(0)
    }
    fn send_queue(&self) -> usize {
        smoltcp::socket::tcp::Socket::send_queue(self)
    }
    fn close(&mut self) {
        smoltcp::socket::tcp::Socket::close(self)
    }
    fn abort(&mut self) {
        smoltcp::socket::tcp::Socket::abort(self)
    }
}
