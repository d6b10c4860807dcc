//! A sans-I/O HTTP/1.1 responder for the guest's metrics port.
//!
//! [`Connection`] is a per-connection state machine: the driver feeds it the bytes the
//! socket received ([`Connection::receive`]), sends what [`Connection::pending_output`]
//! holds (as much as the socket takes, then [`Connection::consume_output`]), calls
//! [`Connection::poll`] regularly (idle timeout, and requests held back while output was
//! pending), and closes the socket once [`Connection::is_closed`] says so. The same code
//! runs over smoltcp sockets in the guest and over std `TcpStream`s in host tests
//! (`std_io`, with the `std` feature).
//!
//! What it serves is supplied by the application through the [`Site`] trait: `/metrics`
//! (content negotiated by the site from the `Accept` header), `/` (a small HTML page built
//! from facts the site gives), and `/healthz`. `GET` and `HEAD` only.
//!
//! Behaviour, in short:
//! - `404` for other paths, `405` (with `Allow: GET, HEAD`) for other methods; both keep
//!   the connection open, since the request was well framed.
//! - `400` for malformed requests (request line, header syntax, `Content-Length`, a missing
//!   `Host` in HTTP/1.1, the HTTP/2 preface, binary garbage), `413` for a body above
//!   [`Config::max_body_bytes`], `414` for a request line above
//!   [`Config::max_request_line_bytes`], `431` for a header section above
//!   [`Config::max_head_bytes`] or with more than [`MAX_HEADERS`] fields, `501` for a
//!   request with `Transfer-Encoding`, `505` for an HTTP major version other than 1. After
//!   any of these the connection closes.
//! - `408` when a started request does not complete within the idle timeout; an idle
//!   connection with nothing started is closed silently.
//! - Keep-alive by default in HTTP/1.1, `Connection: close` honoured; HTTP/1.0 closes unless
//!   it asks for `keep-alive`. Pipelined requests are answered in order.
//! - Every response has `Content-Length`. Responses are gzip-compressed when the client's
//!   `Accept-Encoding` allows it (see [`gzip`]).
//! - Nothing here panics on any input; the request head is held in a fixed-size buffer.

mod connection;
pub mod gzip;
mod parse;
mod response;
mod site;
mod stats;
#[cfg(any(test, feature = "std"))]
pub mod std_io;
pub mod telemetry;
#[cfg(test)]
mod tests;

pub use connection::Connection;
pub use response::Status;
pub use site::{Health, IndexPage, Site};
pub use stats::{HttpStats, HttpStatsSnapshot};

/// Capacity of the per-connection buffer that holds a request head (request line and
/// header fields). [`Config::max_head_bytes`] may lower the limit, never raise it.
pub const HEAD_BUFFER_BYTES: usize = 8192;

/// The most header fields a request may carry; more are answered with `431`.
pub const MAX_HEADERS: usize = 64;

/// Tunables of a [`Connection`]. [`Config::default`] suits the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// A connection with no progress (nothing received, nothing sent) for this long is
    /// closed; a half-received request is answered with `408` first.
    pub idle_timeout_ms: u64,
    /// Largest request head (request line + headers + blank line); capped at
    /// [`HEAD_BUFFER_BYTES`]. Above it: `431`.
    pub max_head_bytes: usize,
    /// Largest request line; above it: `414`.
    pub max_request_line_bytes: usize,
    /// Largest request body accepted (and discarded); above it: `413`.
    pub max_body_bytes: u64,
    /// Responses whose body is shorter than this are never compressed.
    pub gzip_min_bytes: usize,
    /// DEFLATE level for gzip responses, 1 (fastest) to 9 (smallest).
    pub gzip_level: u8,
    /// While this many response bytes wait to be sent, further pipelined requests are held
    /// back (and the input buffer stops taking bytes), so a client that does not read
    /// cannot make the guest buffer without bound.
    pub output_high_water: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            idle_timeout_ms: 30_000,
            max_head_bytes: HEAD_BUFFER_BYTES,
            max_request_line_bytes: 2048,
            max_body_bytes: 1024,
            gzip_min_bytes: 256,
            gzip_level: 1,
            output_high_water: 16 * 1024,
        }
    }
}
