//! Tests of the responder: status codes, keep-alive, pipelining, partial output, timeouts,
//! gzip, a fuzz of arbitrary byte streams, and real TCP clients (curl and threads).

use std::format;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::string::{String, ToString};
use std::sync::Arc;
use std::thread;
use std::vec::Vec;

use proptest::prelude::*;

use super::*;

/// A site with fixed content and its own counters.
struct TestSite {
    stats: Arc<HttpStats>,
    metrics: Vec<u8>,
    healthy: bool,
    /// The `Accept` values `/metrics` was asked with.
    accepts: Vec<String>,
}

impl TestSite {
    fn new() -> Self {
        let mut metrics = Vec::new();
        metrics.extend_from_slice(
            b"# HELP test_requests_total Requests.\n# TYPE test_requests_total counter\n",
        );
        for i in 0..200 {
            metrics.extend_from_slice(
                format!("test_requests_total{{path=\"/p{i}\"}} {}\n", i * 7).as_bytes(),
            );
        }
        Self {
            stats: Arc::new(HttpStats::new()),
            metrics,
            healthy: true,
            accepts: Vec::new(),
        }
    }
}

impl Site for TestSite {
    fn metrics(&mut self, accept: &str, out: &mut Vec<u8>) -> &'static str {
        self.accepts.push(accept.to_string());
        out.extend_from_slice(&self.metrics);
        if accept.contains("application/openmetrics-text") {
            out.extend_from_slice(b"# EOF\n");
            "application/openmetrics-text; version=1.0.0; charset=utf-8"
        } else {
            "text/plain; version=0.0.4; charset=utf-8"
        }
    }

    fn index(&mut self, page: &mut IndexPage) {
        page.fact("NBD export", "disk0 on port 10809")
            .fact("Virtual size", "1 GiB");
    }

    fn healthz(&mut self) -> Health {
        if self.healthy {
            Health::Ok
        } else {
            Health::Unavailable("image not opened: bad magic".to_string())
        }
    }

    fn http_stats(&self) -> &HttpStats {
        &self.stats
    }
}

/// One parsed response.
#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Splits a byte stream into responses; `heads[i]` says whether response `i` answers a
/// HEAD (no body). Panics (test failure) on anything malformed.
fn split_responses(mut bytes: &[u8], heads: &[bool]) -> Vec<Resp> {
    let mut out = Vec::new();
    let mut i = 0;
    while !bytes.is_empty() {
        let end = bytes
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("response head ends")
            + 4;
        let head = std::str::from_utf8(&bytes[..end]).expect("head is ASCII");
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap();
        assert!(status_line.starts_with("HTTP/1.1 "), "{status_line}");
        let status: u16 = status_line[9..12].parse().unwrap();
        let headers: Vec<(String, String)> = lines
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (n, v) = l.split_once(": ").expect("header has ': '");
                (n.to_string(), v.to_string())
            })
            .collect();
        let resp = Resp {
            status,
            headers,
            body: Vec::new(),
        };
        let len: usize = resp
            .header("Content-Length")
            .expect("every response has Content-Length")
            .parse()
            .unwrap();
        let body_len = if heads.get(i).copied().unwrap_or(false) {
            0
        } else {
            len
        };
        let body = bytes[end..end + body_len].to_vec();
        bytes = &bytes[end + body_len..];
        out.push(Resp { body, ..resp });
        i += 1;
    }
    out
}

/// Takes everything the connection wants to send, as if the socket took it all.
fn drain(conn: &mut Connection, now: u64) -> Vec<u8> {
    let out = conn.pending_output().to_vec();
    conn.consume_output(out.len(), now);
    out
}

/// Feeds `input` at time 0 and returns everything the connection wants to send.
fn exchange(site: &mut TestSite, input: &[u8]) -> (Connection, Vec<u8>) {
    let mut conn = Connection::new(Config::default(), 0);
    let mut out = Vec::new();
    let mut rest = input;
    while !rest.is_empty() || conn.has_pending_output() {
        let n = conn.receive(rest, 0, site);
        rest = &rest[n..];
        out.extend(drain(&mut conn, 0));
        conn.poll(0, site);
    }
    (conn, out)
}

/// Sends one request to a fresh connection and parses its one response.
fn one(input: &str) -> (Connection, Resp, TestSite) {
    let mut site = TestSite::new();
    let head = input.starts_with("HEAD ");
    let (conn, out) = exchange(&mut site, input.as_bytes());
    let mut resps = split_responses(&out, &[head]);
    assert_eq!(resps.len(), 1, "{input:?}");
    (conn, resps.remove(0), site)
}

#[test]
fn get_metrics() {
    let (conn, r, site) = one("GET /metrics HTTP/1.1\r\nHost: guest\r\nAccept: text/plain\r\n\r\n");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("Content-Type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    assert_eq!(r.body, site.metrics);
    assert_eq!(
        r.header("Content-Length"),
        Some(site.metrics.len().to_string().as_str())
    );
    assert_eq!(r.header("Content-Encoding"), None);
    assert_eq!(r.header("Connection"), None);
    assert_eq!(site.accepts, ["text/plain"]);
    assert!(!conn.wants_close());
}

#[test]
fn openmetrics_negotiated_by_site() {
    let (_, r, _) = one(
        "GET /metrics HTTP/1.1\r\nHost: g\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\n\r\n",
    );
    assert!(
        r.header("Content-Type")
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    assert!(r.body.ends_with(b"# EOF\n"));
}

#[test]
fn head_has_headers_without_body() {
    let (_, get, _) = one("GET /metrics HTTP/1.1\r\nHost: g\r\n\r\n");
    let (_, head, _) = one("HEAD /metrics HTTP/1.1\r\nHost: g\r\n\r\n");
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    assert_eq!(head.header("Content-Length"), get.header("Content-Length"));
    assert_eq!(head.header("Content-Type"), get.header("Content-Type"));
}

#[test]
fn index_and_healthz() {
    let (_, r, _) = one("GET / HTTP/1.1\r\nHost: g\r\n\r\n");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("Content-Type"), Some("text/html; charset=utf-8"));
    let html = String::from_utf8(r.body).unwrap();
    assert!(html.contains("href=\"/metrics\""));
    assert!(html.contains("disk0 on port 10809"));

    let (_, r, _) = one("GET /healthz HTTP/1.1\r\nHost: g\r\n\r\n");
    assert_eq!((r.status, r.body.as_slice()), (200, &b"ok\n"[..]));

    let mut site = TestSite::new();
    site.healthy = false;
    let (_, out) = exchange(&mut site, b"GET /healthz HTTP/1.1\r\nHost: g\r\n\r\n");
    let r = &split_responses(&out, &[false])[0];
    assert_eq!(r.status, 503);
    assert_eq!(r.body, b"image not opened: bad magic\n");
}

/// The attribute values of `attr="..."` in `html`.
fn attribute_values<'a>(html: &'a str, attr: &str) -> Vec<&'a str> {
    let key = format!(" {attr}=\"");
    html.match_indices(&key)
        .map(|(i, _)| {
            let rest = &html[i + key.len()..];
            &rest[..rest.find('"').expect("attribute value ends")]
        })
        .collect()
}

#[test]
fn index_is_the_live_page() {
    let (_, r, _) = one("GET / HTTP/1.1\r\nHost: g\r\n\r\n");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("Content-Type"), Some("text/html; charset=utf-8"));
    let html = String::from_utf8(r.body).unwrap();
    // Small: the page is part of the kernel image and is sent on every load.
    assert!(
        html.len() < 30 * 1024,
        "the page is {} bytes, above the 30 KiB budget",
        html.len()
    );
    // Self-contained: no external asset, no absolute URL of any kind.
    let lower = html.to_ascii_lowercase();
    // (A protocol-relative `//host` URL would sit in an attribute: checked below.)
    for external in ["http://", "https://", "url(", "@import", "<link", "<iframe"] {
        let hits: Vec<_> = lower
            .match_indices(external)
            .map(|(i, _)| String::from_utf8_lossy(&lower.as_bytes()[i..(i + 60).min(lower.len())]))
            .collect();
        assert!(hits.is_empty(), "{external:?} in the page: {hits:?}");
    }
    for attr in ["src", "href", "action"] {
        for value in attribute_values(&html, attr) {
            assert!(
                value.starts_with('/') && !value.starts_with("//"),
                "{attr}=\"{value}\" is not a relative path on the guest"
            );
        }
    }
    assert_eq!(attribute_values(&html, "src"), Vec::<&str>::new());
    assert!(
        html.contains("fetch(\"/metrics\""),
        "the script scrapes /metrics"
    );
    // Readable on a phone, and without JavaScript (the facts are server-rendered).
    assert!(html.contains("<meta name=\"viewport\" content=\"width=device-width"));
    assert!(html.contains("<noscript>"));
    assert!(html.contains("<th>NBD export</th><td>disk0 on port 10809</td>"));
    assert!(html.contains("data-refreshes=\"0\" data-errors=\"0\""));
    // Every family the script reads is one the guest exports.
    let exposition =
        crate::telemetry::tests::populated_guest(false).text(crate::metrics::Format::Text);
    let mut read = 0;
    for (i, _) in html.match_indices("\"qcow_metal_") {
        let name = &html[i + 1..];
        let name = &name[..name.find('"').unwrap()];
        assert!(
            ["{", " ", "_bucket{"]
                .iter()
                .any(|next| exposition.contains(&format!("\n{name}{next}"))),
            "the page reads {name}, which the guest does not export"
        );
        read += 1;
    }
    assert!(read >= 20, "the page reads {read} families");

    // Compressed when asked (the page is well above gzip_min_bytes).
    let (_, gz, _) = one("GET / HTTP/1.1\r\nHost: g\r\nAccept-Encoding: gzip\r\n\r\n");
    assert_eq!(gz.header("Content-Encoding"), Some("gzip"));
    assert_eq!(gzip::decompress(&gz.body).unwrap(), html.as_bytes());
    assert!(
        gz.body.len() < html.len() / 2,
        "{} bytes gzip'd",
        gz.body.len()
    );
}

#[test]
fn not_found_and_method_not_allowed_keep_the_connection() {
    let (conn, r, _) = one("GET /nope HTTP/1.1\r\nHost: g\r\n\r\n");
    assert_eq!(r.status, 404);
    assert!(!conn.wants_close());
    for method in ["POST", "PUT", "DELETE", "OPTIONS", "get", "BREW"] {
        let (conn, r, _) = one(&format!("{method} /metrics HTTP/1.1\r\nHost: g\r\n\r\n"));
        assert_eq!(r.status, 405, "{method}");
        assert_eq!(r.header("Allow"), Some("GET, HEAD"));
        assert!(!conn.wants_close());
    }
}

#[test]
fn each_rejection_closes_with_its_status() {
    let big_header = format!(
        "GET / HTTP/1.1\r\nHost: g\r\nX-Big: {}\r\n\r\n",
        "b".repeat(9000)
    );
    let long_line = format!("GET /{} HTTP/1.1\r\nHost: g\r\n\r\n", "a".repeat(5000));
    let cases: Vec<(Vec<u8>, u16)> = vec![
        (b"GARBAGE\r\n\r\n".to_vec(), 400),
        (
            b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03".to_vec(),
            400,
        ),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(), 400),
        (
            b"GET / HTTP/1.1\r\nHost: g\r\nContent-Length: x\r\n\r\n".to_vec(),
            400,
        ),
        (b"GET / HTTP/1.1\r\nBad Header\r\n\r\n".to_vec(), 400),
        (
            b"POST / HTTP/1.1\r\nHost: g\r\nContent-Length: 100000\r\n\r\n".to_vec(),
            413,
        ),
        (long_line.into_bytes(), 414),
        (big_header.into_bytes(), 431),
        (
            b"POST / HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(),
            501,
        ),
        (b"GET / HTTP/3.0\r\nHost: g\r\n\r\n".to_vec(), 505),
    ];
    for (input, code) in cases {
        let mut site = TestSite::new();
        let (conn, out) = exchange(&mut site, &input);
        let resps = split_responses(&out, &[]);
        assert_eq!(resps.len(), 1, "{input:?}");
        assert_eq!(resps[0].status, code, "{input:?}");
        assert_eq!(resps[0].header("Connection"), Some("close"));
        assert!(conn.is_closed(), "{input:?}");
        let snap = site.stats.snapshot();
        assert_eq!(snap.bad_requests, 1);
        assert_eq!(snap.requests_total(), 1);
    }
}

#[test]
fn nothing_is_answered_after_a_rejection() {
    let mut site = TestSite::new();
    let (mut conn, out) = exchange(
        &mut site,
        b"BAD\x01 / HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\nHost: g\r\n\r\n",
    );
    assert_eq!(split_responses(&out, &[]).len(), 1);
    let again = b"GET / HTTP/1.1\r\nHost: g\r\n\r\n";
    assert_eq!(conn.receive(again, 1, &mut site), again.len());
    assert!(conn.pending_output().is_empty());
    assert!(conn.is_closed());
}

#[test]
fn keep_alive_rules() {
    let mut site = TestSite::new();
    let mut conn = Connection::new(Config::default(), 0);
    for _ in 0..3 {
        conn.receive(b"GET /healthz HTTP/1.1\r\nHost: g\r\n\r\n", 0, &mut site);
        assert_eq!(split_responses(&drain(&mut conn, 0), &[])[0].status, 200);
        assert!(!conn.wants_close());
    }
    conn.receive(
        b"GET /healthz HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n",
        0,
        &mut site,
    );
    assert!(conn.wants_close() && !conn.is_closed());
    let r = &split_responses(&drain(&mut conn, 0), &[])[0];
    assert_eq!(r.header("Connection"), Some("close"));
    assert!(conn.is_closed());

    let (conn, r, _) = one("GET /healthz HTTP/1.0\r\n\r\n");
    assert!(conn.is_closed());
    assert_eq!(r.header("Connection"), Some("close"));
    let (conn, r, _) = one("GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    assert!(!conn.wants_close());
    assert_eq!(r.header("Connection"), Some("keep-alive"));
}

#[test]
fn pipelined_requests_in_order() {
    let mut site = TestSite::new();
    let input = b"GET /healthz HTTP/1.1\r\nHost: g\r\n\r\n\
        HEAD /metrics HTTP/1.1\r\nHost: g\r\n\r\n\
        GET /nope HTTP/1.1\r\nHost: g\r\n\r\n\
        \r\nGET / HTTP/1.1\r\nHost: g\r\nContent-Length: 4\r\n\r\nbody\
        GET /metrics HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n\
        GET /healthz HTTP/1.1\r\nHost: g\r\n\r\n";
    let (conn, out) = exchange(&mut site, input);
    let resps = split_responses(&out, &[false, true, false, false, false]);
    let codes: Vec<u16> = resps.iter().map(|r| r.status).collect();
    assert_eq!(codes, [200, 200, 404, 200, 200]);
    assert_eq!(resps[0].body, b"ok\n");
    assert!(
        resps[3]
            .header("Content-Type")
            .unwrap()
            .starts_with("text/html")
    );
    assert_eq!(resps[4].body, site.metrics);
    assert!(conn.is_closed());
}

#[test]
fn any_split_of_input_gives_the_same_output() {
    let input = b"GET /healthz HTTP/1.1\r\nHost: g\r\n\r\nGET / HTTP/1.1\r\nHost: g\r\nContent-Length: 3\r\n\r\nabcGET /metrics HTTP/1.1\r\nHost: g\r\n\r\n";
    let mut whole_site = TestSite::new();
    let (_, whole) = exchange(&mut whole_site, input);
    for chunk in 1..input.len() {
        let mut site = TestSite::new();
        let mut conn = Connection::new(Config::default(), 0);
        let mut out = Vec::new();
        for piece in input.chunks(chunk) {
            assert_eq!(conn.receive(piece, 0, &mut site), piece.len());
            // Send one byte at a time: partial writes.
            while conn.has_pending_output() {
                out.push(conn.pending_output()[0]);
                conn.consume_output(1, 0);
            }
        }
        assert_eq!(out, whole, "chunk {chunk}");
    }
}

#[test]
fn output_backpressure_holds_requests_back() {
    let mut site = TestSite::new();
    let config = Config {
        output_high_water: 1024,
        ..Config::default()
    };
    let mut conn = Connection::new(config, 0);
    let request = b"GET /metrics HTTP/1.1\r\nHost: g\r\n\r\n";
    let input: Vec<u8> = request
        .iter()
        .copied()
        .cycle()
        .take(request.len() * 500)
        .collect();
    let mut rest = &input[..];
    let mut out = Vec::new();
    let mut max_pending = 0;
    while !rest.is_empty() || conn.has_pending_output() {
        let n = conn.receive(rest, 0, &mut site);
        rest = &rest[n..];
        max_pending = max_pending.max(conn.pending_output().len());
        // A slow reader: 1000 bytes at a time.
        let k = conn.pending_output().len().min(1000);
        out.extend_from_slice(&conn.pending_output()[..k]);
        conn.consume_output(k, 0);
        conn.poll(0, &mut site);
    }
    let resps = split_responses(&out, &[]);
    assert_eq!(resps.len(), 500);
    assert!(
        resps
            .iter()
            .all(|r| r.status == 200 && r.body == site.metrics)
    );
    // Never more than one response beyond the high-water mark.
    assert!(
        max_pending < 1024 + site.metrics.len() + 300,
        "{max_pending}"
    );
}

#[test]
fn idleness_is_visible_to_the_driver() {
    let mut site = TestSite::new();
    let mut conn = Connection::new(Config::default(), 7);
    assert!(conn.is_idle());
    assert_eq!(conn.last_activity_ms(), 7);
    conn.receive(b"GET /healthz HTTP/1.1\r\n", 9, &mut site);
    assert!(!conn.is_idle());
    conn.receive(b"Host: g\r\n\r\n", 10, &mut site);
    assert!(!conn.is_idle(), "a response is pending");
    drain(&mut conn, 12);
    assert!(conn.is_idle());
    assert_eq!(conn.last_activity_ms(), 12);
}

#[test]
fn idle_connection_times_out_silently() {
    let mut site = TestSite::new();
    let mut conn = Connection::new(Config::default(), 1000);
    assert_eq!(conn.next_deadline(), Some(31_000));
    conn.poll(30_999, &mut site);
    assert!(!conn.wants_close());
    conn.poll(31_000, &mut site);
    assert!(conn.is_closed());
    assert!(conn.pending_output().is_empty());
    assert_eq!(conn.next_deadline(), None);
    assert_eq!(site.stats.snapshot().timeouts, 1);
}

#[test]
fn activity_extends_the_idle_timeout() {
    let mut site = TestSite::new();
    let mut conn = Connection::new(Config::default(), 0);
    conn.receive(
        b"GET /healthz HTTP/1.1\r\nHost: g\r\n\r\n",
        20_000,
        &mut site,
    );
    conn.poll(40_000, &mut site);
    assert!(!conn.wants_close());
    drain(&mut conn, 45_000);
    conn.poll(74_999, &mut site);
    assert!(!conn.wants_close());
    conn.poll(75_000, &mut site);
    assert!(conn.is_closed());
}

#[test]
fn incomplete_request_gets_408_even_when_trickled() {
    let mut site = TestSite::new();
    let mut conn = Connection::new(Config::default(), 0);
    let head = b"GET /metrics HTTP/1.1\r\nHost: g\r\nX-Slow: ";
    conn.receive(head, 0, &mut site);
    // One byte every 10 s keeps the connection active but never completes the request.
    let mut now = 0;
    while !conn.wants_close() {
        now += 10_000;
        assert!(now <= 40_000, "a trickled request must time out");
        conn.receive(b"a", now, &mut site);
        conn.poll(now, &mut site);
    }
    conn.poll(now, &mut site);
    conn.poll(now + 1000, &mut site);
    let resps = split_responses(&drain(&mut conn, now), &[]);
    assert_eq!(resps[0].status, 408);
    assert!(conn.is_closed());
    let snap = site.stats.snapshot();
    assert_eq!((snap.timeouts, snap.bad_requests), (1, 0));
}

#[test]
fn unread_output_times_out() {
    let mut site = TestSite::new();
    let mut conn = Connection::new(Config::default(), 0);
    conn.receive(b"GET /metrics HTTP/1.1\r\nHost: g\r\n\r\n", 0, &mut site);
    conn.consume_output(10, 5_000);
    conn.poll(34_999, &mut site);
    assert!(conn.has_pending_output() && !conn.wants_close());
    assert!(!conn.timed_out());
    conn.poll(35_000, &mut site);
    assert!(conn.is_closed() && !conn.has_pending_output());
    assert!(conn.timed_out());
}

#[test]
fn gzip_when_asked() {
    let (_, r, site) = one("GET /metrics HTTP/1.1\r\nHost: g\r\nAccept-Encoding: gzip\r\n\r\n");
    assert_eq!(r.header("Content-Encoding"), Some("gzip"));
    assert_eq!(r.header("Vary"), Some("Accept, Accept-Encoding"));
    assert!(r.body.len() < site.metrics.len() / 3);
    assert_eq!(gzip::decompress(&r.body).unwrap(), site.metrics);
    // Independent check of the framing: miniz_oxide's inflate on the raw DEFLATE part.
    let raw = miniz_oxide::inflate::decompress_to_vec(&r.body[10..r.body.len() - 8]).unwrap();
    assert_eq!(raw, site.metrics);

    let (_, head, _) = one("HEAD /metrics HTTP/1.1\r\nHost: g\r\nAccept-Encoding: gzip\r\n\r\n");
    assert_eq!(head.header("Content-Length"), r.header("Content-Length"));

    let (_, r, _) = one("GET /metrics HTTP/1.1\r\nHost: g\r\nAccept-Encoding: gzip;q=0\r\n\r\n");
    assert_eq!(r.header("Content-Encoding"), None);
    // Tiny bodies are not worth compressing.
    let (_, r, _) = one("GET /healthz HTTP/1.1\r\nHost: g\r\nAccept-Encoding: gzip\r\n\r\n");
    assert_eq!(
        (r.header("Content-Encoding"), r.body.as_slice()),
        (None, &b"ok\n"[..])
    );
}

#[test]
fn body_is_skipped_across_receives() {
    let mut site = TestSite::new();
    let mut conn = Connection::new(Config::default(), 0);
    conn.receive(
        b"GET /healthz HTTP/1.1\r\nHost: g\r\nContent-Length: 10\r\n\r\n0123",
        0,
        &mut site,
    );
    conn.receive(b"45", 0, &mut site);
    conn.receive(b"6789GET /nope HTTP/1.1\r\nHost: g\r\n\r\n", 0, &mut site);
    let codes: Vec<u16> = split_responses(&drain(&mut conn, 0), &[])
        .iter()
        .map(|r| r.status)
        .collect();
    assert_eq!(codes, [200, 404]);
}

#[test]
fn expect_continue_with_unsent_body_closes() {
    let (conn, r, _) = one(
        "POST /metrics HTTP/1.1\r\nHost: g\r\nContent-Length: 100\r\nExpect: 100-continue\r\n\r\n",
    );
    assert_eq!(r.status, 405);
    assert_eq!(r.header("Connection"), Some("close"));
    assert!(conn.is_closed());
    // With the body already there, the framing is known and the connection stays.
    let (conn, r, _) = one(
        "POST /metrics HTTP/1.1\r\nHost: g\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\nhi",
    );
    assert_eq!((r.status, r.header("Connection")), (405, None));
    assert!(!conn.wants_close());
}

#[test]
fn end_of_stream() {
    let mut site = TestSite::new();
    let mut conn = Connection::new(Config::default(), 0);
    conn.receive(
        b"GET /healthz HTTP/1.1\r\nHost: g\r\n\r\nGET /hea",
        0,
        &mut site,
    );
    conn.receive_eof(0, &mut site);
    assert!(conn.wants_close() && !conn.is_closed());
    assert_eq!(split_responses(&drain(&mut conn, 0), &[]).len(), 1);
    assert!(conn.is_closed());
}

#[test]
fn stats_count_codes_and_bytes() {
    let mut site = TestSite::new();
    let input = b"GET /healthz HTTP/1.1\r\nHost: g\r\n\r\nGET /x HTTP/1.1\r\nHost: g\r\n\r\nGET /metrics HTTP/1.1\r\nHost: g\r\nAccept-Encoding: gzip\r\n\r\nBAD";
    let (_, out) = exchange(&mut site, input);
    let snap = site.stats.snapshot();
    let codes: Vec<(u16, u64)> = snap.by_code().filter(|(_, n)| *n > 0).collect();
    assert_eq!(codes, [(200, 2), (404, 1)]);
    assert_eq!(snap.bytes_received, input.len() as u64);
    assert_eq!(snap.bytes_sent, out.len() as u64);
    assert_eq!(snap.gzip_responses, 1);
    assert_eq!(snap.bad_requests, 0);
}

/// Pieces that fuzzed streams are made of: valid fragments, near-misses and noise.
fn piece() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"GET /metrics HTTP/1.1\r\nHost: g\r\n\r\n".to_vec()),
        Just(b"HEAD / HTTP/1.1\r\nHost: g\r\nAccept-Encoding: gzip\r\n\r\n".to_vec()),
        Just(b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n".to_vec()),
        Just(b"POST /x HTTP/1.1\r\nHost: g\r\nContent-Length: 5\r\n\r\nhello".to_vec()),
        Just(b"Content-Length: 3\r\n".to_vec()),
        Just(b"\r\n".to_vec()),
        Just(b"\n".to_vec()),
        Just(b" ".to_vec()),
        Just(b"GET ".to_vec()),
        Just(b"HTTP/1.1".to_vec()),
        proptest::collection::vec(any::<u8>(), 0..64),
        proptest::collection::vec(
            prop_oneof![Just(b'a'), Just(b':'), Just(b' '), Just(b'\r'), Just(b'\n')],
            0..32
        ),
    ]
}

/// Drives a connection with `input` cut at `cuts`, draining `drain_step` bytes at a time,
/// advancing time by `tick` per step; checks the invariants that hold for any input.
fn fuzz_drive(input: &[u8], cuts: &[usize], drain_step: usize, tick: u64) {
    let mut site = TestSite::new();
    let config = Config {
        max_head_bytes: 512,
        max_request_line_bytes: 128,
        output_high_water: 700,
        idle_timeout_ms: 1000,
        ..Config::default()
    };
    let mut conn = Connection::new(config, 0);
    let mut now = 0;
    let mut out = Vec::new();
    let mut pos = 0;
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
    cuts.sort_unstable();
    cuts.push(input.len());
    let mut steps = 0;
    for cut in cuts {
        while pos < cut {
            steps += 1;
            assert!(steps < 100_000, "no progress");
            let n = conn.receive(&input[pos..cut], now, &mut site);
            assert!(n <= cut - pos);
            pos += n;
            let k = conn.pending_output().len().min(drain_step);
            out.extend_from_slice(&conn.pending_output()[..k]);
            conn.consume_output(k, now);
            now += tick;
            conn.poll(now, &mut site);
            if conn.is_closed() {
                assert!(conn.pending_output().is_empty());
            }
        }
    }
    conn.receive_eof(now, &mut site);
    while conn.has_pending_output() {
        out.extend_from_slice(conn.pending_output());
        let n = conn.pending_output().len();
        conn.consume_output(n, now);
        conn.poll(now, &mut site);
    }
    assert!(conn.is_closed() || !conn.wants_close());
    if !out.is_empty() {
        assert!(out.starts_with(b"HTTP/1.1 "));
    }
    let snap = site.stats.snapshot();
    assert_eq!(snap.bytes_sent, out.len() as u64);
    assert!(snap.bytes_received <= input.len() as u64);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn fuzz_arbitrary_bytes(
        input in proptest::collection::vec(any::<u8>(), 0..2048),
        cuts in proptest::collection::vec(any::<usize>(), 0..16),
        drain_step in 1usize..5000,
        tick in 0u64..300,
    ) {
        fuzz_drive(&input, &cuts, drain_step, tick);
    }

    #[test]
    fn fuzz_request_like_streams(
        pieces in proptest::collection::vec(piece(), 0..40),
        cuts in proptest::collection::vec(any::<usize>(), 0..16),
        drain_step in 1usize..5000,
        tick in 0u64..50,
    ) {
        let input: Vec<u8> = pieces.concat();
        fuzz_drive(&input, &cuts, drain_step, tick);
    }

    #[test]
    fn valid_pipelines_are_answered_in_full(
        paths in proptest::collection::vec(prop_oneof![Just("/"), Just("/metrics"), Just("/healthz"), Just("/x")], 1..20),
        cuts in proptest::collection::vec(any::<usize>(), 0..16),
    ) {
        let mut input = Vec::new();
        for p in &paths {
            input.extend_from_slice(format!("GET {p} HTTP/1.1\r\nHost: g\r\n\r\n").as_bytes());
        }
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
        cuts.sort_unstable();
        cuts.push(input.len());
        let mut site = TestSite::new();
        let mut conn = Connection::new(Config::default(), 0);
        let mut out = Vec::new();
        let mut pos = 0;
        for cut in cuts {
            while pos < cut {
                pos += conn.receive(&input[pos..cut], 0, &mut site);
                out.extend(drain(&mut conn, 0));
                conn.poll(0, &mut site);
            }
        }
        // Requests held back while output was pending are answered as it drains.
        while conn.has_pending_output() {
            out.extend(drain(&mut conn, 0));
            conn.poll(0, &mut site);
        }
        let codes: Vec<u16> = split_responses(&out, &[]).iter().map(|r| r.status).collect();
        let want: Vec<u16> = paths.iter().map(|p| if *p == "/x" { 404 } else { 200 }).collect();
        prop_assert_eq!(codes, want);
    }
}

// ---- Real sockets on loopback ----

/// Serves `listener` with one thread per connection until `connections` were accepted.
fn spawn_server(
    listener: TcpListener,
    config: Config,
    stats: Arc<HttpStats>,
    connections: usize,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut workers = Vec::new();
        for stream in listener.incoming().take(connections) {
            let stream = stream.expect("accept");
            let config = config.clone();
            let stats = stats.clone();
            workers.push(thread::spawn(move || {
                let mut site = TestSite::new();
                site.stats = stats;
                std_io::serve_stream(&stream, config, &mut site).expect("serve");
            }));
        }
        for w in workers {
            w.join().expect("worker");
        }
    })
}

fn curl(args: &[&str]) -> std::process::Output {
    match Command::new("curl").args(args).output() {
        Ok(out) => out,
        Err(e) => panic!("cannot run curl ({e}); install the Debian package `curl`"),
    }
}

#[test]
fn curl_over_loopback() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let stats = Arc::new(HttpStats::new());
    let server = spawn_server(listener, Config::default(), stats.clone(), 4);
    let base = format!("http://127.0.0.1:{port}");
    let metrics_body = TestSite::new().metrics;

    // Two URLs in one curl: the second reuses the connection (keep-alive).
    let out = curl(&[
        "-sS",
        "--fail",
        "-w",
        "|%{num_connects}\n",
        &format!("{base}/metrics"),
        &format!("{base}/healthz"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut want = metrics_body.clone();
    want.extend_from_slice(b"|1\nok\n|0\n");
    assert_eq!(out.stdout, want);

    // gzip: curl asks for it, decodes it, and reports the encoding it got.
    let out = curl(&[
        "-sS",
        "--fail",
        "--compressed",
        "-D",
        "-",
        &format!("{base}/metrics"),
    ]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.to_ascii_lowercase().contains("content-encoding: gzip"),
        "{text}"
    );
    assert!(text.ends_with(std::str::from_utf8(&metrics_body).unwrap()));

    // HEAD, and a 405 with Allow.
    let out = curl(&["-sS", "-I", &format!("{base}/")]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    let out = curl(&[
        "-sS",
        "-i",
        "-X",
        "POST",
        "-d",
        "x=1",
        &format!("{base}/metrics"),
    ]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("HTTP/1.1 405"), "{text}");
    assert!(text.contains("Allow: GET, HEAD"));

    server.join().unwrap();
    let snap = stats.snapshot();
    assert_eq!(snap.by_code().find(|(c, _)| *c == 200).unwrap().1, 4);
    assert_eq!(snap.by_code().find(|(c, _)| *c == 405).unwrap().1, 1);
    assert_eq!(snap.gzip_responses, 1);
}

/// Reads one response from a keep-alive connection.
fn read_response(reader: &mut BufReader<TcpStream>) -> (u16, Vec<u8>) {
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let status: u16 = line.get(9..12).expect("status line").parse().unwrap();
    let mut len = 0;
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        if line == "\r\n" {
            break;
        }
        if let Some(v) = line.strip_prefix("Content-Length: ") {
            len = v.trim().parse().unwrap();
        }
    }
    let mut body = vec![0; len];
    reader.read_exact(&mut body).unwrap();
    (status, body)
}

#[test]
fn concurrent_keep_alive_clients_and_bad_ones() {
    const CLIENTS: usize = 10;
    const REQUESTS: usize = 25;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let stats = Arc::new(HttpStats::new());
    let config = Config {
        // Long enough that no real client idles out between its requests on a busy machine.
        idle_timeout_ms: 4000,
        ..Config::default()
    };
    // +3: a silent client, a garbage client and an oversized-header client.
    let server = spawn_server(listener, config, stats.clone(), CLIENTS + 3);

    let silent = TcpStream::connect(addr).unwrap();
    let mut garbage = TcpStream::connect(addr).unwrap();
    garbage
        .write_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage")
        .unwrap();
    let mut huge = TcpStream::connect(addr).unwrap();
    huge.write_all(b"GET / HTTP/1.1\r\nHost: g\r\n").unwrap();
    // The server answers 431 and closes before all of this is written; ignore write errors.
    let _ = huge.write_all(format!("X-Big: {}\r\n\r\n", "z".repeat(20_000)).as_bytes());

    let metrics_body = TestSite::new().metrics;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let want = metrics_body.clone();
            thread::spawn(move || {
                let stream = TcpStream::connect(addr).unwrap();
                let mut writer = stream.try_clone().unwrap();
                let mut reader = BufReader::new(stream);
                for j in 0..REQUESTS {
                    let gzip = if (i + j) % 2 == 0 {
                        "Accept-Encoding: gzip\r\n"
                    } else {
                        ""
                    };
                    writer
                        .write_all(
                            format!("GET /metrics HTTP/1.1\r\nHost: g\r\n{gzip}\r\n").as_bytes(),
                        )
                        .unwrap();
                    let (status, body) = read_response(&mut reader);
                    assert_eq!(status, 200);
                    let body = if gzip.is_empty() {
                        body
                    } else {
                        gzip::decompress(&body).unwrap()
                    };
                    assert_eq!(body, want);
                }
                writer
                    .write_all(b"GET /healthz HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n")
                    .unwrap();
                assert_eq!(read_response(&mut reader), (200, b"ok\n".to_vec()));
                let mut rest = Vec::new();
                reader.read_to_end(&mut rest).unwrap();
                assert!(rest.is_empty(), "server closes after Connection: close");
            })
        })
        .collect();
    for c in clients {
        c.join().expect("client");
    }

    let mut reply = Vec::new();
    garbage.read_to_end(&mut reply).unwrap();
    assert!(
        reply.starts_with(b"HTTP/1.1 400 "),
        "{}",
        String::from_utf8_lossy(&reply)
    );
    let mut reply = Vec::new();
    // The server may reset the connection after its 431 because our write was cut short.
    let _ = huge.read_to_end(&mut reply);
    if !reply.is_empty() {
        assert!(
            reply.starts_with(b"HTTP/1.1 431 "),
            "{}",
            String::from_utf8_lossy(&reply)
        );
    }
    // The silent client is closed by the idle timeout: the read sees end of stream.
    let mut reply = Vec::new();
    (&silent).read_to_end(&mut reply).unwrap();
    assert!(reply.is_empty());

    server.join().unwrap();
    let snap = stats.snapshot();
    assert_eq!(
        snap.by_code().find(|(c, _)| *c == 200).unwrap().1,
        (CLIENTS * (REQUESTS + 1)) as u64
    );
    assert_eq!(snap.by_code().find(|(c, _)| *c == 400).unwrap().1, 1);
    assert_eq!(snap.by_code().find(|(c, _)| *c == 431).unwrap().1, 1);
    assert_eq!(snap.timeouts, 1);
    assert_eq!(snap.bad_requests, 2);
}

#[test]
fn pipelined_burst_over_tcp_with_a_late_reader() {
    const REQUESTS: usize = 200;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let stats = Arc::new(HttpStats::new());
    let server = spawn_server(listener, Config::default(), stats.clone(), 1);
    let stream = TcpStream::connect(addr).unwrap();
    let mut writer = stream.try_clone().unwrap();
    // All requests at once, before reading anything: about 2.5 MB of answers must wait in
    // the server (partial writes, held-back requests) until the client reads.
    let mut burst = Vec::new();
    for i in 0..REQUESTS {
        let path = if i % 10 == 9 { "/healthz" } else { "/metrics" };
        burst.extend_from_slice(format!("GET {path} HTTP/1.1\r\nHost: g\r\n\r\n").as_bytes());
    }
    burst.extend_from_slice(b"GET /nope HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n");
    writer.write_all(&burst).unwrap();
    let mut reader = BufReader::new(stream);
    let want = TestSite::new().metrics;
    for i in 0..REQUESTS {
        let (status, body) = read_response(&mut reader);
        assert_eq!(status, 200);
        if i % 10 == 9 {
            assert_eq!(body, b"ok\n");
        } else {
            assert_eq!(body, want);
        }
    }
    assert_eq!(read_response(&mut reader).0, 404);
    let mut rest = Vec::new();
    reader.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    server.join().unwrap();
    assert_eq!(stats.snapshot().requests_total(), REQUESTS as u64 + 1);
}
