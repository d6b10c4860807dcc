//! Request-head parsing: pure functions over the bytes received so far.
//!
//! Lines end in CRLF; a bare LF is accepted too (RFC 9112 §2.2), a bare CR is not.

use alloc::string::String;

use super::gzip::accepts_gzip;
use super::{Config, MAX_HEADERS, Status};

/// The request method, as far as routing cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Method {
    Get,
    Head,
    /// Any other (syntactically valid) method: answered with 405.
    Other,
}

/// The resource a request names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Route {
    Metrics,
    Index,
    Healthz,
    NotFound,
}

/// A parsed request head: what the responder needs, owned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Request {
    pub method: Method,
    pub route: Route,
    /// HTTP/1.0 (otherwise 1.1 or a later 1.x, treated as 1.1).
    pub http10: bool,
    /// Whether the connection stays open after the response.
    pub keep_alive: bool,
    /// Whether the client accepts a gzip-encoded response.
    pub gzip: bool,
    /// The `Accept` field(s), joined with `", "`; empty when absent.
    pub accept: String,
    /// Body length announced by `Content-Length` (0 when absent).
    pub content_length: u64,
    /// The client sent `Expect: 100-continue`.
    pub expect_continue: bool,
}

/// `tchar` of RFC 9110 §5.6.2: the characters of methods and field names.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Characters allowed in a request target (visible ASCII).
fn is_target_char(b: u8) -> bool {
    (0x21..=0x7e).contains(&b)
}

/// Characters allowed in a field value: visible ASCII, space, tab and obs-text.
fn is_value_char(b: u8) -> bool {
    b == b'\t' || (0x20..=0x7e).contains(&b) || b >= 0x80
}

/// Number of leading bytes that are empty lines (`\r\n` or `\n`), which a server ignores
/// before a request line (RFC 9112 §2.2).
pub(super) fn leading_empty_lines(buf: &[u8]) -> usize {
    let mut i = 0;
    loop {
        match buf.get(i..) {
            Some([b'\n', ..]) => i += 1,
            Some([b'\r', b'\n', ..]) => i += 2,
            _ => return i,
        }
    }
}

/// Finds the end of a request head (just past its blank line), scanning from `from`.
pub(super) fn find_head_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while i < buf.len() {
        if buf[i] == b'\n' {
            match buf.get(i + 1..) {
                Some([b'\n', ..]) => return Some(i + 2),
                Some([b'\r', b'\n', ..]) => return Some(i + 3),
                _ => {}
            }
        }
        i += 1;
    }
    None
}

/// Rejects an incomplete head early when what has arrived already cannot become a valid
/// request line (binary garbage, TLS handshakes) or is already too long.
pub(super) fn check_partial(buf: &[u8], config: &Config) -> Result<(), Status> {
    let line = match buf.iter().position(|&b| b == b'\n') {
        // The request line is complete; the full parse judges it once the head is complete.
        Some(_) => return Ok(()),
        None => buf,
    };
    let mut fields = line.splitn(3, |&b| b == b' ');
    let method = fields.next().unwrap_or(&[]);
    if !method.iter().all(|&b| is_tchar(b)) {
        return Err(Status::BadRequest);
    }
    if let Some(target) = fields.next()
        && (method.is_empty() || !target.iter().all(|&b| is_target_char(b)))
    {
        return Err(Status::BadRequest);
    }
    if let Some(version) = fields.next()
        && !version_prefix_ok(version)
    {
        return Err(Status::BadRequest);
    }
    if line.len() > config.max_request_line_bytes {
        return Err(Status::UriTooLong);
    }
    Ok(())
}

/// Whether `v` can still grow into `HTTP/d.d` (optionally followed by CR).
fn version_prefix_ok(v: &[u8]) -> bool {
    v.iter().enumerate().all(|(i, &b)| match i {
        0..=4 => b == b"HTTP/"[i],
        5 | 7 => b.is_ascii_digit(),
        6 => b == b'.',
        8 => b == b'\r',
        _ => false,
    })
}

/// Parses `HTTP/d.d` into (major, minor).
fn parse_version(v: &[u8]) -> Option<(u8, u8)> {
    match v {
        [b'H', b'T', b'T', b'P', b'/', major, b'.', minor]
            if major.is_ascii_digit() && minor.is_ascii_digit() =>
        {
            Some((major - b'0', minor - b'0'))
        }
        _ => None,
    }
}

/// Splits off the first line of `buf` (without its CRLF or LF); `None` if there is no LF.
fn next_line(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    let lf = buf.iter().position(|&b| b == b'\n')?;
    let line = &buf[..lf];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    Some((line, &buf[lf + 1..]))
}

/// Trims spaces and tabs at both ends.
fn trim_ows(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

/// Parses a `Content-Length` value: decimal digits only.
fn parse_content_length(v: &[u8]) -> Result<u64, Status> {
    if v.is_empty() {
        return Err(Status::BadRequest);
    }
    let mut n: u64 = 0;
    for &b in v {
        if !b.is_ascii_digit() {
            return Err(Status::BadRequest);
        }
        n = n
            .checked_mul(10)
            .and_then(|n| n.checked_add(u64::from(b - b'0')))
            .ok_or(Status::BadRequest)?;
    }
    Ok(n)
}

/// Maps a request target to a route: origin form (`/path?query`), absolute form
/// (`http://host/path`) and the asterisk form; anything else is malformed.
fn route(target: &[u8]) -> Result<Route, Status> {
    let path = if target.first() == Some(&b'/') {
        target
    } else if target == b"*" {
        return Ok(Route::NotFound);
    } else {
        let lower_starts = |prefix: &[u8]| {
            target.len() >= prefix.len() && target[..prefix.len()].eq_ignore_ascii_case(prefix)
        };
        let rest = if lower_starts(b"http://") {
            &target[7..]
        } else if lower_starts(b"https://") {
            &target[8..]
        } else {
            return Err(Status::BadRequest);
        };
        match rest
            .iter()
            .position(|&b| b == b'/' || b == b'?' || b == b'#')
        {
            Some(i) if rest[i] == b'/' => &rest[i..],
            _ => b"/",
        }
    };
    let end = path
        .iter()
        .position(|&b| b == b'?' || b == b'#')
        .unwrap_or(path.len());
    Ok(match &path[..end] {
        b"/metrics" => Route::Metrics,
        b"/" => Route::Index,
        b"/healthz" => Route::Healthz,
        _ => Route::NotFound,
    })
}

/// Appends a field value to a comma-joined list.
fn join_value(list: &mut String, value: &[u8]) {
    if !list.is_empty() {
        list.push_str(", ");
    }
    list.push_str(&String::from_utf8_lossy(value));
}

/// What the request line's version says when httparse refuses it: 505 for another major
/// version, `Ok` for a later HTTP/1.x (served as 1.1), 400 for anything else.
fn version_verdict(line: &[u8]) -> Result<(), Status> {
    let mut fields = line.splitn(3, |&b| b == b' ');
    let method = fields.next().unwrap_or(&[]);
    let target = fields.next().unwrap_or(&[]);
    match fields.next().and_then(parse_version) {
        // The HTTP/2 connection preface: this server speaks HTTP/1.x only.
        Some((2, _)) if method == b"PRI" && target == b"*" => Err(Status::BadRequest),
        Some((1, _)) => Ok(()),
        Some(_) => Err(Status::VersionNotSupported),
        None => Err(Status::BadRequest),
    }
}

/// Tokenizes a head with httparse into `headers`. A later HTTP/1.x version (which httparse
/// refuses) is read as HTTP/1.1 from a copy of the head. Returns the method, the target,
/// whether the version is 1.0, and the number of headers.
fn tokenize<'h>(
    head: &'h [u8],
    line: &[u8],
    copy: &'h mut alloc::vec::Vec<u8>,
    headers: &mut [httparse::Header<'h>; MAX_HEADERS],
) -> Result<(&'h str, &'h str, bool, usize), Status> {
    let parsed = |bytes: &'h [u8], headers: &mut [httparse::Header<'h>; MAX_HEADERS]| {
        let mut req = httparse::Request::new(headers);
        match req.parse(bytes) {
            Ok(httparse::Status::Complete(n)) if n == bytes.len() => Ok((
                req.method.unwrap_or(""),
                req.path.unwrap_or(""),
                req.version == Some(0),
                req.headers.len(),
            )),
            // The caller hands exactly one head; anything after the blank line (or a head
            // without one) is a bug upstream, answered as malformed rather than trusted.
            Ok(_) => Err(Some(Status::BadRequest)),
            Err(httparse::Error::TooManyHeaders) => Err(Some(Status::HeaderFieldsTooLarge)),
            Err(httparse::Error::Version) => Err(None),
            Err(_) => Err(Some(Status::BadRequest)),
        }
    };
    match parsed(head, headers) {
        Ok(t) => Ok(t),
        Err(Some(status)) => Err(status),
        Err(None) => {
            version_verdict(line)?;
            // `HTTP/1.x` with x > 1: the version is the line's last 8 bytes.
            copy.extend_from_slice(head);
            copy[line.len() - 1] = b'1';
            parsed(copy, headers).map_err(|s| s.unwrap_or(Status::BadRequest))
        }
    }
}

/// Parses a complete request head (request line through the blank line, as delimited by
/// [`find_head_end`]). Errors carry the status to answer with. The tokens come from
/// httparse; the limits, the checks it leaves to the server (targets in visible ASCII,
/// `Host`, `Content-Length`, `Transfer-Encoding`) and the statuses are ours.
pub(super) fn parse_head(head: &[u8], config: &Config) -> Result<Request, Status> {
    if head.len() > config.max_head_bytes.min(super::HEAD_BUFFER_BYTES) {
        return Err(Status::HeaderFieldsTooLarge);
    }
    let (line, _) = next_line(head).ok_or(Status::BadRequest)?;
    if line.len() > config.max_request_line_bytes {
        return Err(Status::UriTooLong);
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut copy = alloc::vec::Vec::new();
    let (method, target, http10, count) = tokenize(head, line, &mut copy, &mut headers)?;
    // httparse also takes obs-text in targets; we answer with 400, as before.
    if target.is_empty() || !target.bytes().all(is_target_char) {
        return Err(Status::BadRequest);
    }

    let mut content_length: Option<u64> = None;
    let mut transfer_encoding = false;
    let mut hosts = 0usize;
    let mut close = false;
    let mut keep_alive_token = false;
    let mut accept = String::new();
    let mut accept_encoding = String::new();
    let mut expect_continue = false;
    for header in &headers[..count] {
        let name = header.name.as_bytes();
        let value = trim_ows(header.value);
        if !value.iter().all(|&b| is_value_char(b)) {
            return Err(Status::BadRequest);
        }
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = parse_content_length(value)?;
            if content_length.is_some_and(|old| old != n) {
                return Err(Status::BadRequest);
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            transfer_encoding = true;
        } else if name.eq_ignore_ascii_case(b"host") {
            hosts += 1;
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in value.split(|&b| b == b',') {
                let token = trim_ows(token);
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    keep_alive_token = true;
                }
            }
        } else if name.eq_ignore_ascii_case(b"accept") {
            join_value(&mut accept, value);
        } else if name.eq_ignore_ascii_case(b"accept-encoding") {
            join_value(&mut accept_encoding, value);
        } else if name.eq_ignore_ascii_case(b"expect") {
            expect_continue |= value.eq_ignore_ascii_case(b"100-continue");
        }
    }
    if transfer_encoding {
        // A body framed by Transfer-Encoding is not supported; with Content-Length as well it
        // is a request-smuggling shape (RFC 9112 §6.1).
        return Err(if content_length.is_some() {
            Status::BadRequest
        } else {
            Status::NotImplemented
        });
    }
    if hosts > 1 || (hosts == 0 && !http10) {
        return Err(Status::BadRequest);
    }
    let content_length = content_length.unwrap_or(0);
    if content_length > config.max_body_bytes {
        return Err(Status::PayloadTooLarge);
    }
    let method = match method {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        _ => Method::Other,
    };
    Ok(Request {
        method,
        route: route(target.as_bytes())?,
        http10,
        keep_alive: !close && (!http10 || keep_alive_token),
        gzip: accepts_gzip(&accept_encoding),
        accept,
        content_length,
        expect_continue,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Request, Status> {
        parse_head(text.as_bytes(), &Config::default())
    }

    #[test]
    fn simple_get() {
        let r = parse("GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: text/plain\r\n\r\n").unwrap();
        assert_eq!(r.method, Method::Get);
        assert_eq!(r.route, Route::Metrics);
        assert!(!r.http10 && r.keep_alive && !r.gzip);
        assert_eq!(r.accept, "text/plain");
        assert_eq!(r.content_length, 0);
    }

    #[test]
    fn bare_lf_and_joined_fields() {
        let r = parse(
            "HEAD /?x=1 HTTP/1.1\nhost: x\naccept: a/b\nACCEPT: c/d\naccept-encoding: br\nAccept-Encoding:  gzip \n\n",
        )
        .unwrap();
        assert_eq!(r.method, Method::Head);
        assert_eq!(r.route, Route::Index);
        assert_eq!(r.accept, "a/b, c/d");
        assert!(r.gzip);
    }

    #[test]
    fn routes() {
        let cases: [(&str, Route); 8] = [
            ("/", Route::Index),
            ("/metrics", Route::Metrics),
            ("/metrics?name[]=x", Route::Metrics),
            ("/healthz", Route::Healthz),
            ("/metrics/", Route::NotFound),
            ("/nope", Route::NotFound),
            ("http://10.0.2.15:9090/metrics", Route::Metrics),
            ("HTTP://host", Route::Index),
        ];
        for (target, want) in cases {
            let text = format!("GET {target} HTTP/1.1\r\nHost: h\r\n\r\n");
            assert_eq!(parse(&text).unwrap().route, want, "{target}");
        }
    }

    #[test]
    fn connection_rules() {
        let ka = |text: &str| parse(text).unwrap().keep_alive;
        assert!(ka("GET / HTTP/1.1\r\nHost: h\r\n\r\n"));
        assert!(!ka(
            "GET / HTTP/1.1\r\nHost: h\r\nConnection: Close\r\n\r\n"
        ));
        assert!(!ka(
            "GET / HTTP/1.1\r\nHost: h\r\nConnection: te, close\r\n\r\n"
        ));
        assert!(!ka("GET / HTTP/1.0\r\n\r\n"));
        assert!(ka("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"));
        assert!(ka("GET / HTTP/1.9\r\nHost: h\r\n\r\n"));
    }

    #[test]
    fn statuses_of_bad_heads() {
        let cases: [(&str, Status); 22] = [
            ("GET /\r\n\r\n", Status::BadRequest),
            ("GET  / HTTP/1.1\r\nHost: h\r\n\r\n", Status::BadRequest),
            ("GET / HTTP/1.1 \r\nHost: h\r\n\r\n", Status::BadRequest),
            ("GET / http/1.1\r\nHost: h\r\n\r\n", Status::BadRequest),
            ("G(T / HTTP/1.1\r\nHost: h\r\n\r\n", Status::BadRequest),
            ("GET /\x01 HTTP/1.1\r\nHost: h\r\n\r\n", Status::BadRequest),
            (
                "GET relative HTTP/1.1\r\nHost: h\r\n\r\n",
                Status::BadRequest,
            ),
            ("GET / HTTP/1.1\r\n\r\n", Status::BadRequest),
            (
                "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
                Status::BadRequest,
            ),
            ("GET / HTTP/1.1\r\nHost : h\r\n\r\n", Status::BadRequest),
            (
                "GET / HTTP/1.1\r\nHost: h\r\n folded\r\n\r\n",
                Status::BadRequest,
            ),
            ("GET / HTTP/1.1\r\nHost h\r\n\r\n", Status::BadRequest),
            ("GET / HTTP/1.1\r\nHost: h\x7f\r\n\r\n", Status::BadRequest),
            ("GET / HTTP/1.1\r\nHost: h\rx\r\n\r\n", Status::BadRequest),
            (
                "GET / HTTP/1.1\r\nHost: h\r\nContent-Length: -1\r\n\r\n",
                Status::BadRequest,
            ),
            (
                "GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 99999999999999999999\r\n\r\n",
                Status::BadRequest,
            ),
            (
                "GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                Status::BadRequest,
            ),
            (
                "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
                Status::BadRequest,
            ),
            (
                "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n",
                Status::NotImplemented,
            ),
            (
                "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1025\r\n\r\n",
                Status::PayloadTooLarge,
            ),
            (
                "GET / HTTP/2.0\r\nHost: h\r\n\r\n",
                Status::VersionNotSupported,
            ),
            ("PRI * HTTP/2.0\r\n\r\n", Status::BadRequest),
        ];
        for (text, want) in cases {
            assert_eq!(parse(text), Err(want), "{text:?}");
        }
    }

    #[test]
    fn limits() {
        let long_target = "/".repeat(3000);
        let text = format!("GET {long_target} HTTP/1.1\r\nHost: h\r\n\r\n");
        assert_eq!(parse(&text), Err(Status::UriTooLong));
        let mut text = String::from("GET / HTTP/1.1\r\nHost: h\r\n");
        for i in 0..MAX_HEADERS {
            text.push_str(&format!("X-{i}: y\r\n"));
        }
        text.push_str("\r\n");
        assert_eq!(parse(&text), Err(Status::HeaderFieldsTooLarge));
        let ok =
            "GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 1024\r\nContent-Length: 1024\r\n\r\n";
        assert_eq!(parse(ok).unwrap().content_length, 1024);
    }

    #[test]
    fn partial_checks() {
        let c = Config::default();
        assert_eq!(check_partial(b"GE", &c), Ok(()));
        assert_eq!(check_partial(b"GET /met", &c), Ok(()));
        assert_eq!(check_partial(b"GET /metrics HTTP/1.", &c), Ok(()));
        assert_eq!(check_partial(b"GET /metrics HTTP/1.1\r", &c), Ok(()));
        assert_eq!(
            check_partial(b"\x16\x03\x01\x02", &c),
            Err(Status::BadRequest)
        );
        assert_eq!(check_partial(b" GET", &c), Err(Status::BadRequest));
        assert_eq!(check_partial(b"GET /\x00", &c), Err(Status::BadRequest));
        assert_eq!(check_partial(b"GET / XTTP", &c), Err(Status::BadRequest));
        assert_eq!(
            check_partial(b"GET / HTTP/1.1x", &c),
            Err(Status::BadRequest)
        );
        let long = format!("GET /{}", "a".repeat(3000));
        assert_eq!(check_partial(long.as_bytes(), &c), Err(Status::UriTooLong));
    }

    #[test]
    fn head_end_and_empty_lines() {
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\n\r\nX", 0), Some(18));
        assert_eq!(find_head_end(b"GET / HTTP/1.1\n\nX", 0), Some(16));
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\nA: b\r\n", 0), None);
        assert_eq!(leading_empty_lines(b"\r\n\n\r\nGET"), 5);
        assert_eq!(leading_empty_lines(b"\r"), 0);
    }
}
