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

impl Session {
    /// Since when the session has been idle in a way that makes it safe to close (see
    /// [`http::HttpSession::idle_since_ms`] and [`nbd::NbdSession::idle_since_ms`]).
    pub fn idle_since_ms(&self) -> Option<u64> {
        match self {
            Session::Http(s) => s.idle_since_ms(),
            Session::Nbd(s) => s.idle_since_ms(),
        }
    }
}
