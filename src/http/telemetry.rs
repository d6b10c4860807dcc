//! Telemetry of the HTTP responder, written at scrape time straight from its [`HttpStats`]
//! (label `code` from [`Status`]), and the histogram of scrape encoding times.

use super::{HttpStats, Status};
use crate::metrics::{Collector, Encoder, Family, Histogram, Meta, Value};
use alloc::sync::Arc;
use core::fmt;

impl HttpStats {
    /// Writes the responder's counter families.
    pub fn encode(&self, enc: &mut Encoder<'_>) -> fmt::Result {
        let s = self.snapshot();
        let mut codes = [[0u8; 3]; Status::ALL.len()];
        for (text, status) in codes.iter_mut().zip(Status::ALL) {
            *text = code_digits(status.code());
        }
        enc.family(
            &Meta::counter(
                "qcow_metal_http_requests",
                "HTTP responses sent, by status code.",
            ),
            &["code"],
            codes
                .iter()
                .zip(s.responses)
                .map(|(code, n)| ([core::str::from_utf8(code).unwrap_or("000")], Value::U64(n))),
        )?;
        let singles: [(Meta, u64); 5] = [
            (
                Meta::counter(
                    "qcow_metal_http_bad_requests",
                    "HTTP requests rejected as malformed or over a limit.",
                ),
                s.bad_requests,
            ),
            (
                Meta::counter(
                    "qcow_metal_http_timeouts",
                    "HTTP connections closed by the idle timeout.",
                ),
                s.timeouts,
            ),
            (
                Meta::counter(
                    "qcow_metal_http_received_bytes",
                    "HTTP request bytes received.",
                )
                .unit("bytes"),
                s.bytes_received,
            ),
            (
                Meta::counter("qcow_metal_http_sent_bytes", "HTTP response bytes sent.")
                    .unit("bytes"),
                s.bytes_sent,
            ),
            (
                Meta::counter(
                    "qcow_metal_http_gzip_responses",
                    "HTTP responses sent gzip-compressed.",
                ),
                s.gzip_responses,
            ),
        ];
        for (meta, v) in &singles {
            enc.family(meta, &[], [([], Value::U64(*v))])?;
        }
        Ok(())
    }
}

/// A status code's three digits.
fn code_digits(code: u16) -> [u8; 3] {
    let code = code.clamp(100, 999);
    [
        b'0' + (code / 100) as u8,
        b'0' + (code / 10 % 10) as u8,
        b'0' + (code % 10) as u8,
    ]
}

/// How long encoding `/metrics` took (`qcow_metal_http_scrape_encode_seconds`), observed by
/// whoever assembles the exposition.
pub struct ScrapeTimer {
    family: Family<Histogram>,
    histogram: Arc<Histogram>,
}

impl Default for ScrapeTimer {
    fn default() -> Self {
        Self::new()
    }
}

impl ScrapeTimer {
    /// An empty histogram.
    pub fn new() -> Self {
        let mut family = Family::new(
            "qcow_metal_http_scrape_encode_seconds",
            "Time to encode the /metrics exposition.",
            &[],
        )
        .unit("seconds");
        let histogram = family.histogram(&[], Histogram::latency);
        ScrapeTimer { family, histogram }
    }

    /// Records one encoding that took `ns` nanoseconds.
    pub fn observe(&self, ns: u64) {
        self.histogram.observe(ns);
    }

    /// The histogram.
    pub fn histogram(&self) -> &Histogram {
        &self.histogram
    }

    /// Writes the family.
    pub fn encode(&self, enc: &mut Encoder<'_>) -> fmt::Result {
        self.family.encode(enc)
    }
}
