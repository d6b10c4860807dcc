//! One accepted connection of either port: [`Session`].
//!
//! Each pool socket has at most one [`Session`]. A session is created when its socket has
//! accepted a connection, is driven on every turn of the main loop, and is dropped once the
//! socket has left the connection (closed, reset, or in `TIME-WAIT`); the socket is then put
//! back to listening.

use super::{http, nbd};

/// The protocol state of one accepted connection.
pub enum Session {
    /// A metrics (HTTP) client (boxed: its request buffer is large).
    Http(alloc::boxed::Box<http::HttpSession>),
    /// An NBD client.
    Nbd(alloc::boxed::Box<nbd::NbdSession>),
}

/// Sessions a full port may close to make room, in this order: finished ones, idle ones
/// (longest idle first), then stalled ones (longest stalled first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Evictable {
    /// The session is over and its socket has sent everything (it waits for the peer's
    /// FIN or ACK): resetting it loses nothing.
    Finished,
    /// Nothing in progress since this time (ms), for at least [`MIN_IDLE_MS`]: an HTTP
    /// keep-alive connection between requests (or accepted and silent), an NBD client
    /// silent during the handshake.
    Idle(u64),
    /// In progress but stalled since this time (ms): an HTTP request whose head or body has
    /// been arriving for more than [`SLOW_REQUEST_MS`], an NBD client in the transmission
    /// phase silent for more than [`NBD_EVICTABLE_IDLE_MS`].
    Stalled(u64),
}

/// An HTTP request still arriving after this long (ms) is a slow client's: it may be
/// evicted, and such clients may hold only a share of the pool. A scraper sends its request
/// in one segment.
pub const SLOW_REQUEST_MS: u64 = 250;

/// A connection idle for less than this (ms) is not evicted: a client just accepted gets
/// the time to send its request or its handshake.
pub const MIN_IDLE_MS: u64 = 250;

/// An NBD client in the transmission phase silent for this long (ms) may be evicted when
/// the port is full.
pub const NBD_EVICTABLE_IDLE_MS: u64 = 5000;

impl Session {
    /// The session is over; its socket was asked to close.
    pub fn is_closing(&self) -> bool {
        match self {
            Session::Http(s) => s.is_closing(),
            Session::Nbd(s) => s.is_closing(),
        }
    }

    /// Whether, and how readily, the session may be closed to make room at `now_ms`.
    pub fn evictable(&self, now_ms: u64) -> Option<Evictable> {
        let idle = |since: u64| (now_ms.saturating_sub(since) >= MIN_IDLE_MS).then_some(since);
        match self {
            Session::Http(s) => s
                .idle_since_ms()
                .and_then(idle)
                .map(Evictable::Idle)
                .or_else(|| {
                    s.receiving_since_ms()
                        .filter(|&t| now_ms.saturating_sub(t) >= SLOW_REQUEST_MS)
                        .map(Evictable::Stalled)
                }),
            Session::Nbd(s) => s
                .idle_since_ms()
                .and_then(idle)
                .map(Evictable::Idle)
                .or_else(|| {
                    s.idle_in_transmission_since()
                        .filter(|&t| now_ms.saturating_sub(t) >= NBD_EVICTABLE_IDLE_MS)
                        .map(Evictable::Stalled)
                }),
        }
    }

    /// Since when the session has been idle in a way that makes it safe to close (see
    /// [`http::HttpSession::idle_since_ms`] and [`nbd::NbdSession::idle_since_ms`]).
    pub fn idle_since_ms(&self) -> Option<u64> {
        match self {
            Session::Http(s) => s.idle_since_ms(),
            Session::Nbd(s) => s.idle_since_ms(),
        }
    }
}
