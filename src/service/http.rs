//! The metrics port: drives [`crate::http::Connection`] over a [`Socket`], and
//! [`GuestSite`], the [`Site`] that answers with the guest's metrics registry.

use alloc::string::String;
use alloc::vec::Vec;

use super::socket::Socket;
use crate::http::{Config, Connection, Health, HttpStats, IndexPage, Site};
use crate::metrics::{Format, negotiate};

/// What the HTTP responder serves: the metrics exposition, the facts of `/`, the health.
pub struct GuestSite<'a> {
    /// Writes the exposition in a format into a buffer.
    pub render: &'a mut dyn FnMut(Format, &mut Vec<u8>),
    /// Facts shown on `/` (label, value).
    pub facts: &'a [(&'static str, String)],
    /// The answer of `/healthz`.
    pub health: Health,
    /// Where the responder counts what it does.
    pub stats: &'a HttpStats,
}

impl Site for GuestSite<'_> {
    fn metrics(&mut self, accept: &str, out: &mut Vec<u8>) -> &'static str {
        let format = negotiate(accept);
        (self.render)(format, out);
        format.content_type()
    }

    fn index(&mut self, page: &mut IndexPage) {
        page.title("qcow-metal guest");
        for (label, value) in self.facts {
            page.fact(label, value);
        }
    }

    fn healthz(&mut self) -> Health {
        self.health.clone()
    }

    fn http_stats(&self) -> &HttpStats {
        self.stats
    }
}

/// One metrics client.
pub struct HttpSession {
    conn: Connection,
    /// The socket was asked to close (FIN sent or being sent).
    closing: bool,
}

impl HttpSession {
    /// A session for a connection accepted at `now_ms`.
    pub fn new(now_ms: u64) -> Self {
        HttpSession {
            conn: Connection::new(Config::default(), now_ms),
            closing: false,
        }
    }

    /// Moves bytes between the socket and the responder, answers complete requests, applies
    /// the idle timeout, and closes the socket when the responder is done. Returns whether
    /// anything moved.
    pub fn drive<S: Socket + ?Sized>(
        &mut self,
        socket: &mut S,
        now_ms: u64,
        site: &mut impl Site,
    ) -> bool {
        if self.closing {
            return false;
        }
        let mut progress = false;
        loop {
            let mut moved = false;
            // Received bytes, as far as the responder takes them.
            if socket.can_recv() {
                let taken = socket.recv_with(&mut |buf| self.conn.receive(buf, now_ms, site));
                moved |= taken > 0;
            }
            self.conn.poll(now_ms, site);
            // Response bytes, as far as the socket takes them.
            while self.conn.has_pending_output() && socket.can_send() {
                let n = socket.send_slice(self.conn.pending_output());
                if n == 0 {
                    break;
                }
                self.conn.consume_output(n, now_ms);
                self.conn.poll(now_ms, site);
                moved = true;
            }
            progress |= moved;
            if !moved {
                break;
            }
        }
        // The peer finished sending and everything it sent was taken.
        if !socket.may_recv() && socket.recv_queue() == 0 && !self.conn.wants_close() {
            self.conn.receive_eof(now_ms, site);
            progress = true;
            while self.conn.has_pending_output() && socket.can_send() {
                let n = socket.send_slice(self.conn.pending_output());
                if n == 0 {
                    break;
                }
                self.conn.consume_output(n, now_ms);
            }
        }
        if self.conn.is_closed() {
            if self.conn.timed_out() {
                // The client stopped reading: do not wait to send a FIN behind unsent data.
                socket.abort();
            } else {
                socket.close();
            }
            self.closing = true;
            progress = true;
        }
        progress
    }

    /// Since when the connection has been idle (no request being received or answered), if
    /// it is: such a connection can be closed to make room for a new client.
    pub fn idle_since_ms(&self) -> Option<u64> {
        (!self.closing && self.conn.is_idle()).then(|| self.conn.last_activity_ms())
    }

    /// Since when the request being received has been arriving, if one is and the
    /// connection is not closing (see [`crate::http::Connection::receiving_since_ms`]).
    pub fn receiving_since_ms(&self) -> Option<u64> {
        if self.closing {
            None
        } else {
            self.conn.receiving_since_ms()
        }
    }

    /// The connection was closed because the client stalled (the responder's idle timeout).
    pub fn timed_out(&self) -> bool {
        self.closing && self.conn.timed_out()
    }

    /// The socket was asked to close; the session does nothing more.
    pub fn is_closing(&self) -> bool {
        self.closing
    }

    /// When [`HttpSession::drive`] must run again at the latest (the idle timeout).
    pub fn next_deadline_ms(&self) -> Option<u64> {
        if self.closing {
            None
        } else {
            self.conn.next_deadline()
        }
    }
}
