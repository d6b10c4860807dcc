//! Status codes and the serialisation of responses.

use alloc::vec::Vec;
use core::fmt::Write as _;

/// Every status the responder sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    /// 200: served.
    Ok,
    /// 400: malformed request.
    BadRequest,
    /// 404: no such path.
    NotFound,
    /// 405: a method other than GET or HEAD.
    MethodNotAllowed,
    /// 408: a started request did not complete within the idle timeout.
    RequestTimeout,
    /// 413: a request body above the limit.
    PayloadTooLarge,
    /// 414: a request line above the limit.
    UriTooLong,
    /// 431: a header section above the limit.
    HeaderFieldsTooLarge,
    /// 501: a request with `Transfer-Encoding`.
    NotImplemented,
    /// 503: `/healthz` when the site is not healthy.
    ServiceUnavailable,
    /// 505: an HTTP major version other than 1.
    VersionNotSupported,
}

impl Status {
    /// Every status, in the order of [`super::HttpStatsSnapshot::responses`].
    pub const ALL: [Status; 11] = [
        Status::Ok,
        Status::BadRequest,
        Status::NotFound,
        Status::MethodNotAllowed,
        Status::RequestTimeout,
        Status::PayloadTooLarge,
        Status::UriTooLong,
        Status::HeaderFieldsTooLarge,
        Status::NotImplemented,
        Status::ServiceUnavailable,
        Status::VersionNotSupported,
    ];

    /// The numeric code.
    pub const fn code(self) -> u16 {
        match self {
            Status::Ok => 200,
            Status::BadRequest => 400,
            Status::NotFound => 404,
            Status::MethodNotAllowed => 405,
            Status::RequestTimeout => 408,
            Status::PayloadTooLarge => 413,
            Status::UriTooLong => 414,
            Status::HeaderFieldsTooLarge => 431,
            Status::NotImplemented => 501,
            Status::ServiceUnavailable => 503,
            Status::VersionNotSupported => 505,
        }
    }

    /// The reason phrase.
    pub const fn reason(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::BadRequest => "Bad Request",
            Status::NotFound => "Not Found",
            Status::MethodNotAllowed => "Method Not Allowed",
            Status::RequestTimeout => "Request Timeout",
            Status::PayloadTooLarge => "Content Too Large",
            Status::UriTooLong => "URI Too Long",
            Status::HeaderFieldsTooLarge => "Request Header Fields Too Large",
            Status::NotImplemented => "Not Implemented",
            Status::ServiceUnavailable => "Service Unavailable",
            Status::VersionNotSupported => "HTTP Version Not Supported",
        }
    }

    /// Position in [`Status::ALL`].
    pub(super) const fn index(self) -> usize {
        self as usize
    }
}

/// `Content-Type` of the responder's own plain-text bodies.
pub(super) const TEXT_PLAIN: &str = "text/plain; charset=utf-8";
/// `Content-Type` of the index page.
pub(super) const TEXT_HTML: &str = "text/html; charset=utf-8";

/// Everything about a response except its body.
pub(super) struct Head<'a> {
    pub status: Status,
    pub content_type: &'a str,
    pub content_length: usize,
    pub gzip: bool,
    /// `Vary` value, if the body was negotiated.
    pub vary: Option<&'static str>,
    /// Whether to send `Allow: GET, HEAD`.
    pub allow: bool,
    /// `Connection: close` (true) or, for HTTP/1.0 keep-alive, `Connection: keep-alive`.
    pub close: bool,
    pub http10_keep_alive: bool,
}

/// Appends the status line and header section of `head` to `out`.
pub(super) fn write_head(head: &Head<'_>, out: &mut Vec<u8>) {
    let mut text = alloc::string::String::with_capacity(192);
    // Writing into a String cannot fail.
    let _ = write!(
        text,
        "HTTP/1.1 {} {}\r\nServer: qcow-metal\r\nContent-Type: {}\r\nContent-Length: {}\r\n",
        head.status.code(),
        head.status.reason(),
        head.content_type,
        head.content_length
    );
    if head.gzip {
        text.push_str("Content-Encoding: gzip\r\n");
    }
    if let Some(vary) = head.vary {
        text.push_str("Vary: ");
        text.push_str(vary);
        text.push_str("\r\n");
    }
    if head.allow {
        text.push_str("Allow: GET, HEAD\r\n");
    }
    if head.close {
        text.push_str("Connection: close\r\n");
    } else if head.http10_keep_alive {
        text.push_str("Connection: keep-alive\r\n");
    }
    text.push_str("\r\n");
    out.extend_from_slice(text.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_matches_all() {
        for (i, status) in Status::ALL.iter().enumerate() {
            assert_eq!(status.index(), i);
        }
    }

    #[test]
    fn head_has_length_and_close() {
        let mut out = Vec::new();
        write_head(
            &Head {
                status: Status::MethodNotAllowed,
                content_type: TEXT_PLAIN,
                content_length: 7,
                gzip: false,
                vary: None,
                allow: true,
                close: true,
                http10_keep_alive: false,
            },
            &mut out,
        );
        let text = core::str::from_utf8(&out).unwrap();
        assert!(text.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"));
        assert!(text.contains("\r\nContent-Length: 7\r\n"));
        assert!(text.contains("\r\nAllow: GET, HEAD\r\n"));
        assert!(text.ends_with("\r\nConnection: close\r\n\r\n"));
    }
}
