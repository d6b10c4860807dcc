//! Counters of what the responder did, for the metrics layer.

use core::sync::atomic::{AtomicU64, Ordering};

use super::Status;

/// Counters shared by every connection of a server. Updates are lock-free (relaxed
/// atomics), so one `HttpStats` can be a `static` or sit behind an `Arc`; the metrics layer
/// reads a [`HttpStatsSnapshot`].
#[derive(Debug)]
pub struct HttpStats {
    responses: [AtomicU64; Status::ALL.len()],
    bad_requests: AtomicU64,
    timeouts: AtomicU64,
    bytes_received: AtomicU64,
    bytes_sent: AtomicU64,
    gzip_responses: AtomicU64,
}

/// A copy of [`HttpStats`] at one moment. All counters only grow.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HttpStatsSnapshot {
    /// Responses by status, indexed like [`Status::ALL`]; see [`HttpStatsSnapshot::by_code`].
    pub responses: [u64; Status::ALL.len()],
    /// Requests rejected as malformed or over a limit (400, 413, 414, 431, 501, 505).
    pub bad_requests: u64,
    /// Connections closed by the idle timeout (with or without a `408`).
    pub timeouts: u64,
    /// Request bytes taken from clients.
    pub bytes_received: u64,
    /// Response bytes produced (status line, headers and body), as queued for sending.
    pub bytes_sent: u64,
    /// Responses sent with `Content-Encoding: gzip`.
    pub gzip_responses: u64,
}

impl HttpStatsSnapshot {
    /// `(status code, responses)` for every status the responder can send, zeros included.
    pub fn by_code(&self) -> impl Iterator<Item = (u16, u64)> + '_ {
        Status::ALL
            .iter()
            .zip(self.responses.iter())
            .map(|(status, count)| (status.code(), *count))
    }

    /// Responses of all statuses.
    pub fn requests_total(&self) -> u64 {
        self.responses.iter().sum()
    }
}

impl Default for HttpStats {
    fn default() -> Self {
        Self::new()
    }
}

impl HttpStats {
    /// All counters at zero; usable in a `static`.
    pub const fn new() -> Self {
        Self {
            responses: [const { AtomicU64::new(0) }; Status::ALL.len()],
            bad_requests: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            gzip_responses: AtomicU64::new(0),
        }
    }

    /// Reads every counter.
    pub fn snapshot(&self) -> HttpStatsSnapshot {
        let mut responses = [0; Status::ALL.len()];
        for (slot, counter) in responses.iter_mut().zip(self.responses.iter()) {
            *slot = counter.load(Ordering::Relaxed);
        }
        HttpStatsSnapshot {
            responses,
            bad_requests: self.bad_requests.load(Ordering::Relaxed),
            timeouts: self.timeouts.load(Ordering::Relaxed),
            bytes_received: self.bytes_received.load(Ordering::Relaxed),
            bytes_sent: self.bytes_sent.load(Ordering::Relaxed),
            gzip_responses: self.gzip_responses.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn count_response(&self, status: Status, bytes: usize, gzip: bool) {
        self.responses[status.index()].fetch_add(1, Ordering::Relaxed);
        self.bytes_sent.fetch_add(bytes as u64, Ordering::Relaxed);
        if gzip {
            self.gzip_responses.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn count_bad_request(&self) {
        self.bad_requests.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_timeout(&self) {
        self.timeouts.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_received(&self, bytes: usize) {
        self.bytes_received
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }
}
