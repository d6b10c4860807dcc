//! Per-connection glue between the smoltcp sockets of the pool ([`crate::net`]) and the
//! sans-I/O protocol state machines of the library: [`http`] drives
//! `qcow_metal::http::Connection` for the metrics port, [`nbd`] drives
//! `qcow_metal::nbd::Connection` for the NBD port.
//!
//! Each pool socket has at most one [`Session`]. A session is created when its socket has
//! accepted a connection, is driven on every turn of the main loop, and is dropped once the
//! socket has left the connection (closed, reset, or in `TIME-WAIT`); the socket is then put
//! back to listening.

pub mod http;
pub mod nbd;

/// The protocol state of one accepted connection.
pub enum Session {
    /// A metrics (HTTP) client (boxed: its request buffer is large).
    Http(alloc::boxed::Box<http::HttpSession>),
    /// An NBD client.
    Nbd(alloc::boxed::Box<nbd::NbdSession>),
}
