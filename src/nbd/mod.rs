//! The NBD server: a sans-I/O state machine per client, generic over [`VirtualDisk`].
//!
//! The protocol is `doc/proto.md` of the NBD project: fixed newstyle handshake with
//! `NBD_FLAG_NO_ZEROES`; options `NBD_OPT_EXPORT_NAME`, `ABORT`, `LIST`, `INFO`, `GO`
//! (export, name, description and block-size information), `STRUCTURED_REPLY` and
//! `LIST_META_CONTEXT`/`SET_META_CONTEXT` with `base:allocation`; any other option gets
//! `NBD_REP_ERR_UNSUP` and the haggling goes on. Commands `READ` (simple replies, or
//! `OFFSET_DATA` chunks once structured replies are negotiated), `WRITE` (with `FUA`),
//! `FLUSH`, `TRIM`, `WRITE_ZEROES` (with `NO_HOLE`), `BLOCK_STATUS` (with `REQ_ONE`) and
//! `DISC`.
//!
//! Errors: disk errors map to NBD error values ([`NbdError`]); a bad range, bad flags or an
//! unknown command get an error reply and the session goes on; a write payload that cannot
//! be written is read and dropped before the error reply. The connection is closed only
//! where the protocol leaves nothing else: a bad magic, unknown client flags, an unknown
//! export in `NBD_OPT_EXPORT_NAME`, or a read error after a simple reply header was sent.
//!
//! Driving a [`Connection`]: feed it what the socket received ([`Connection::receive`] may
//! accept only part; offer the rest later), call [`Connection::process`] with the shared
//! disk and the export's [`NbdStats`], send [`Connection::output`] and report what was sent
//! with [`Connection::consume_output`]; close the socket when [`Connection::is_closed`], and
//! call [`Connection::close`] when the peer goes away first. The disk is not owned by the
//! connection, so any number of connections can serve one disk. When the server is going
//! down, [`Connection::shutdown`] makes further options and requests fail with the
//! protocol's shutdown errors, so that clients disconnect on their own.
//!
//! With the `std` feature, for the host: `client`, a small blocking client for tests and
//! benchmarks, and `host`, which serves a disk from std TCP sockets with this same code.
//!
//! [`VirtualDisk`]: crate::disk::VirtualDisk

mod buf;
pub mod proto;
mod server;
mod stats;
pub mod telemetry;

#[cfg(any(test, feature = "std"))]
pub mod client;
#[cfg(any(test, feature = "std"))]
pub mod host;

#[cfg(test)]
mod tests;

pub use server::{
    Connection, MAX_BATCH, MAX_EXTENTS, MAX_OPTION_LEN, QueuedRequest, ServerConfig,
    allocation_state,
};
pub use stats::{Command, NbdError, NbdStats};
