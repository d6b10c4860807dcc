//! `qcow-metal scrape`: a short summary of a guest's metrics from two scrapes a few seconds
//! apart: request and byte rates, space, errors and health.
//!
//! The rates are over the guest's own clock (`qcow_metal_guest_uptime_seconds`) when both
//! scrapes carry it, the host's otherwise. The texts are read with the library's strict
//! parser ([`qcow_metal::metrics::parse`]), so a malformed exposition is reported, not
//! summarised.

use std::collections::BTreeSet;
use std::fmt::{self, Write as _};
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use qcow_metal::metrics::Format;
use qcow_metal::metrics::parse::{Exposition, parse};

use crate::error::{Error, Result};
use crate::units::format_size;

/// What `qcow-metal scrape` reads without an argument (the runner's default forward).
pub const DEFAULT_URL: &str = "http://127.0.0.1:9090/metrics";

/// How long one HTTP exchange may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// Answers larger than this are refused (the guest's are tens of kilobytes).
const MAX_BODY: usize = 64 << 20;

/// The disk operations the summary shows, in order.
const DISK_OPS: [&str; 5] = ["read", "write", "discard", "write_zeroes", "flush"];

/// An `http://host[:port][/path]` URL (also `host[:port]`; port 9090 and `/metrics` by
/// default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    /// Host name or address (IPv6 in brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Path, starting with `/`.
    pub path: String,
}

impl Url {
    /// Parses `text`; only plain `http` is spoken.
    pub fn parse(text: &str) -> Result<Url, String> {
        let rest = match text.split_once("://") {
            Some(("http", rest)) => rest,
            Some((scheme, _)) => {
                return Err(format!(
                    "`{text}`: only http:// URLs can be scraped, not {scheme}"
                ));
            }
            None => text,
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/metrics"),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() && (!h.contains(':') || h.ends_with(']')) => {
                let port = p
                    .parse::<u16>()
                    .ok()
                    .filter(|&p| p != 0)
                    .ok_or_else(|| format!("`{text}`: `{p}` is not a TCP port"))?;
                (h, port)
            }
            _ => (authority, 9090),
        };
        if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '@') {
            return Err(format!("`{text}` has no host to scrape"));
        }
        Ok(Url {
            host: host.to_string(),
            port,
            path: path.to_string(),
        })
    }

    /// The same host and port with another path.
    pub fn with_path(&self, path: &str) -> Url {
        Url {
            path: path.to_string(),
            ..self.clone()
        }
    }
}

impl fmt::Display for Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}:{}{}", self.host, self.port, self.path)
    }
}

/// Sends `GET` for `url` (HTTP/1.0, so the answer is not chunked) and returns the status
/// code and body.
pub fn get(url: &Url) -> Result<(u16, String)> {
    let ctx = |what: &str| format!("{what} {url}");
    let host = url.host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<_> = (host, url.port)
        .to_socket_addrs()
        .map_err(|e| Error::io(ctx("resolving"), e))?
        .collect();
    let mut last = None;
    let mut stream = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, HTTP_TIMEOUT) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let mut stream = stream.ok_or_else(|| {
        Error::io(
            ctx("connecting to"),
            last.unwrap_or_else(|| std::io::Error::other("no address")),
        )
    })?;
    stream
        .set_read_timeout(Some(HTTP_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(HTTP_TIMEOUT)))
        .map_err(|e| Error::io(ctx("talking to"), e))?;
    let request = format!(
        "GET {} HTTP/1.0\r\nHost: {}:{}\r\nUser-Agent: qcow-metal-scrape\r\nAccept: text/plain\r\n\r\n",
        url.path, url.host, url.port
    );
    stream
        .write_all(request.as_bytes())
        .map_err(|e| Error::io(ctx("sending a request to"), e))?;
    let mut bytes = Vec::new();
    Read::by_ref(&mut stream)
        .take(MAX_BODY as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(ctx("reading the answer of"), e))?;
    if bytes.len() > MAX_BODY {
        return Err(Error::Usage(format!("{url} answered more than 64 MiB")));
    }
    parse_response(&bytes).map_err(|e| Error::Usage(format!("{url}: {e}")))
}

/// Splits an HTTP/1.x answer into status code and body.
fn parse_response(bytes: &[u8]) -> Result<(u16, String), String> {
    let end = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("the answer is not HTTP (no end of headers)")?;
    let head = String::from_utf8_lossy(&bytes[..end]);
    let status_line = head.lines().next().unwrap_or_default();
    let mut words = status_line.split_whitespace();
    let code = match (words.next(), words.next()) {
        (Some(v), Some(c)) if v.starts_with("HTTP/") => c.parse::<u16>().ok(),
        _ => None,
    }
    .ok_or_else(|| format!("the answer is not HTTP: `{status_line}`"))?;
    let mut body = &bytes[end + 4..];
    for line in head.lines().skip(1) {
        if let Some((name, value)) = line.split_once(':') {
            let name = name.trim().to_ascii_lowercase();
            let value = value.trim();
            if name == "content-length"
                && let Ok(n) = value.parse::<usize>()
            {
                if n > body.len() {
                    return Err(format!(
                        "the answer was cut short ({} of {n} bytes)",
                        body.len()
                    ));
                }
                body = &body[..n];
            }
            if name == "content-encoding" && !value.eq_ignore_ascii_case("identity") {
                return Err(format!(
                    "the answer is encoded ({value}), which was not asked for"
                ));
            }
        }
    }
    Ok((code, String::from_utf8_lossy(body).into_owned()))
}

/// Scrapes `url` once and parses the text format.
pub fn scrape(url: &Url) -> Result<Exposition> {
    let (code, body) = get(url)?;
    if code != 200 {
        return Err(Error::Usage(format!(
            "{url} answered {code}: {}",
            body.lines().next().unwrap_or_default()
        )));
    }
    parse(&body, Format::Text).map_err(|e| {
        Error::Usage(format!(
            "{url} is not a valid Prometheus text exposition: {e}"
        ))
    })
}

/// Scrapes `url` twice, `interval` apart, and `/healthz` on the same host; the summary.
pub fn run(url: &Url, interval: Duration) -> Result<Summary> {
    let before = scrape(url)?;
    let t0 = Instant::now();
    std::thread::sleep(interval);
    let after = scrape(url)?;
    let host_secs = t0.elapsed().as_secs_f64();
    let health = match get(&url.with_path("/healthz")) {
        Ok((200, body)) => Health::Ok(body.trim().to_string()),
        Ok((code, body)) => Health::Unhealthy(code, body.trim().to_string()),
        Err(e) => Health::Unknown(e.to_string()),
    };
    let mut summary = summarize(&before, &after, host_secs);
    summary.url = url.to_string();
    summary.health = health;
    Ok(summary)
}

/// What `/healthz` said.
#[derive(Debug, Clone, PartialEq)]
pub enum Health {
    /// Not asked.
    NotAsked,
    /// `200`, with its body.
    Ok(String),
    /// Another status, with its body.
    Unhealthy(u16, String),
    /// No answer.
    Unknown(String),
}

/// Rates of one kind of request over the interval.
#[derive(Debug, Clone, PartialEq)]
pub struct Rate {
    /// Operation name.
    pub op: String,
    /// Requests per second.
    pub ops: f64,
    /// Bytes per second (`None` for operations without bytes, e.g. flush).
    pub bytes: Option<f64>,
}

/// One virtual disk.
#[derive(Debug, Clone, PartialEq)]
pub struct DiskSummary {
    /// Its `disk` label.
    pub name: String,
    /// `qcow_metal_disk_up` (`None` when absent).
    pub up: Option<bool>,
    /// Request rates by operation.
    pub rates: Vec<Rate>,
    /// Space gauges, name and bytes, in order: virtual, data, metadata, image extent.
    pub space: Vec<(&'static str, u64)>,
    /// Failed requests since boot, and in the interval.
    pub errors: (u64, u64),
}

/// The summary of two scrapes.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// What was scraped.
    pub url: String,
    /// `qcow_metal_build_info{version}`.
    pub version: Option<String>,
    /// The guest's uptime at the second scrape.
    pub uptime: Option<f64>,
    /// Seconds between the scrapes.
    pub interval: f64,
    /// Whether `interval` is the guest's clock (else the host's).
    pub guest_clock: bool,
    /// The guest restarted between the scrapes (rates are since its start).
    pub restarted: bool,
    /// The virtual disks.
    pub disks: Vec<DiskSummary>,
    /// NBD requests per second, and bytes per second.
    pub nbd_rate: (f64, f64),
    /// Open NBD connections.
    pub nbd_connections: u64,
    /// The block devices' sizes (for the disk, the host file as the guest sees it), by
    /// `device`, when the guest reports them.
    pub host_files: Vec<(String, u64)>,
    /// Errors since boot and in the interval: (name, total, new).
    pub errors: Vec<(&'static str, u64, u64)>,
    /// `/healthz`.
    pub health: Health,
}

/// Sum of every sample called `name` whose labels include `labels`.
fn sum(exp: &Exposition, name: &str, labels: &[(&str, &str)]) -> f64 {
    exp.find(name, labels).map(|s| s.value).sum()
}

/// The values of label `label` over the samples called `name`, sorted.
fn label_values(exp: &Exposition, name: &str, label: &str) -> BTreeSet<String> {
    exp.find(name, &[])
        .filter_map(|s| s.label(label).map(String::from))
        .collect()
}

/// Summarises two scrapes of the same guest, `host_secs` apart on the host's clock.
pub fn summarize(before: &Exposition, after: &Exposition, host_secs: f64) -> Summary {
    let uptime_of = |e: &Exposition| e.value("qcow_metal_guest_uptime_seconds", &[]);
    let (u0, u1) = (uptime_of(before), uptime_of(after));
    let restarted = matches!((u0, u1), (Some(a), Some(b)) if b < a);
    // After a restart, the counters count from zero over the new uptime.
    let empty = Exposition::default();
    let before = if restarted { &empty } else { before };
    let (interval, guest_clock) = match (u0, u1) {
        (Some(_), Some(b)) if restarted => (b, true),
        (Some(a), Some(b)) if b > a => (b - a, true),
        _ => (host_secs, false),
    };
    let per_sec = |d: f64| if interval > 0.0 { d / interval } else { 0.0 };
    // Counter growth, never negative.
    let delta = |name: &str, labels: &[(&str, &str)]| {
        (sum(after, name, labels) - sum(before, name, labels)).max(0.0)
    };

    let mut names = label_values(after, "qcow_metal_disk_up", "disk");
    names.extend(label_values(
        after,
        "qcow_metal_disk_requests_total",
        "disk",
    ));
    let disks = names
        .iter()
        .map(|d| {
            let disk = [("disk", d.as_str())];
            let rates = DISK_OPS
                .iter()
                .map(|&op| {
                    let l = [("disk", d.as_str()), ("op", op)];
                    Rate {
                        op: op.to_string(),
                        ops: per_sec(delta("qcow_metal_disk_requests_total", &l)),
                        bytes: (op != "flush")
                            .then(|| per_sec(delta("qcow_metal_disk_bytes_total", &l))),
                    }
                })
                .collect();
            let mut space = Vec::new();
            for (label, family) in [
                ("virtual", "qcow_metal_disk_virtual_size_bytes"),
                ("data", "qcow_metal_disk_data_bytes"),
                ("metadata", "qcow_metal_disk_metadata_bytes"),
                ("image extent", "qcow_metal_disk_image_extent_bytes"),
            ] {
                if let Some(v) = after.value(family, &disk) {
                    space.push((label, v.max(0.0) as u64));
                }
            }
            DiskSummary {
                name: d.clone(),
                up: after.value("qcow_metal_disk_up", &disk).map(|v| v == 1.0),
                rates,
                space,
                errors: (
                    sum(after, "qcow_metal_disk_errors_total", &disk) as u64,
                    delta("qcow_metal_disk_errors_total", &disk) as u64,
                ),
            }
        })
        .collect();

    let http_errors = |e: &Exposition| {
        e.find("qcow_metal_http_requests_total", &[])
            .filter(|s| {
                s.label("code")
                    .and_then(|c| c.parse::<u16>().ok())
                    .is_some_and(|c| c >= 400)
            })
            .map(|s| s.value)
            .sum::<f64>()
    };
    // Families that an older guest does not have are left out rather than shown as 0.
    let mut errors = Vec::new();
    for (name, family) in [
        ("device", "qcow_metal_blockdev_errors_total"),
        ("NBD", "qcow_metal_nbd_errors_total"),
        ("NBD protocol", "qcow_metal_nbd_protocol_errors_total"),
        ("HTTP 4xx/5xx", "qcow_metal_http_requests_total"),
        (
            "metadata overlaps refused",
            "qcow_metal_disk_metadata_overlaps_total",
        ),
    ] {
        if after.find(family, &[]).next().is_none() {
            continue;
        }
        errors.push(if family == "qcow_metal_http_requests_total" {
            let (a, b) = (http_errors(after), http_errors(before));
            (name, a as u64, (a - b).max(0.0) as u64)
        } else {
            (
                name,
                sum(after, family, &[]) as u64,
                delta(family, &[]) as u64,
            )
        });
    }

    Summary {
        url: String::new(),
        version: after
            .find("qcow_metal_build_info", &[])
            .next()
            .and_then(|s| s.label("version").map(String::from)),
        uptime: u1,
        interval,
        guest_clock,
        restarted,
        disks,
        nbd_rate: (
            per_sec(delta("qcow_metal_nbd_requests_total", &[])),
            per_sec(delta("qcow_metal_nbd_bytes_total", &[])),
        ),
        nbd_connections: sum(after, "qcow_metal_nbd_connections_active", &[]) as u64,
        host_files: after
            .find("qcow_metal_blockdev_capacity_bytes", &[])
            .map(|s| {
                let device = s.label("device").unwrap_or_default().to_string();
                (device, s.value.max(0.0) as u64)
            })
            .collect(),
        errors,
        health: Health::NotAsked,
    }
}

/// `12.5`, `0.25`, `1234`: up to three significant decimals, no trailing zeros.
fn num(v: f64) -> String {
    let s = if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    };
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// Bytes per second with a binary unit.
fn byte_rate(v: f64) -> String {
    const UNITS: [&str; 5] = ["B/s", "KiB/s", "MiB/s", "GiB/s", "TiB/s"];
    let mut v = v;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{} {}", num(v), UNITS[unit])
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut head = String::from("qcow-metal");
        if let Some(v) = &self.version {
            let _ = write!(head, " {v}");
        }
        if !self.url.is_empty() {
            let _ = write!(head, " at {}", self.url);
        }
        if let Some(u) = self.uptime {
            let _ = write!(head, ", up {} s", num(u));
        }
        writeln!(f, "{head}")?;
        match &self.health {
            Health::NotAsked => {}
            Health::Ok(body) => {
                writeln!(f, "health:  {}", if body.is_empty() { "ok" } else { body })?
            }
            Health::Unhealthy(code, body) => writeln!(f, "health:  UNHEALTHY ({code}): {body}")?,
            Health::Unknown(why) => writeln!(f, "health:  unknown (/healthz: {why})")?,
        }
        // The disk's name only when there are several.
        let disk = |d: &DiskSummary| {
            if self.disks.len() == 1 {
                "disk".to_string()
            } else {
                format!("disk {}", d.name)
            }
        };
        for d in &self.disks {
            let state = match d.up {
                Some(true) => "up (image open)",
                Some(false) => "DOWN (the image could not be opened)",
                None => "state unknown",
            };
            writeln!(f, "{}: {state}", disk(d))?;
        }
        writeln!(
            f,
            "rates over {} s ({} clock){}:",
            num(self.interval),
            if self.guest_clock { "guest" } else { "host" },
            if self.restarted {
                "; the guest restarted between the scrapes, rates are since its start"
            } else {
                ""
            }
        )?;
        for d in &self.disks {
            if self.disks.len() > 1 {
                writeln!(f, "  {}:", disk(d))?;
            }
            for r in &d.rates {
                write!(f, "  {:<13} {:>8} ops/s", r.op, num(r.ops))?;
                match r.bytes {
                    Some(b) => writeln!(f, "  {:>12}", byte_rate(b))?,
                    None => writeln!(f)?,
                }
            }
        }
        writeln!(
            f,
            "  {:<13} {:>8} req/s  {:>12}  ({} connection{} open)",
            "NBD",
            num(self.nbd_rate.0),
            byte_rate(self.nbd_rate.1),
            self.nbd_connections,
            if self.nbd_connections == 1 { "" } else { "s" }
        )?;
        for d in &self.disks {
            if d.space.is_empty() {
                continue;
            }
            let mut parts: Vec<String> = d
                .space
                .iter()
                .map(|(name, v)| format!("{name} {}", format_size(*v)))
                .collect();
            // One disk on one device: the device is its host file.
            if let ([(device, size)], 1) = (self.host_files.as_slice(), self.disks.len()) {
                parts.push(format!("host file {} ({device})", format_size(*size)));
            }
            writeln!(f, "space of the {}: {}", disk(d), parts.join(", "))?;
        }
        if self.host_files.len() > 1 || (self.disks.len() != 1 && !self.host_files.is_empty()) {
            let parts: Vec<String> = self
                .host_files
                .iter()
                .map(|(device, size)| format!("{device} {}", format_size(*size)))
                .collect();
            writeln!(f, "block devices: {}", parts.join(", "))?;
        }
        let mut parts: Vec<String> = self
            .disks
            .iter()
            .map(|d| format!("{} {}{}", disk(d), d.errors.0, new(d.errors.1)))
            .collect();
        parts.extend(
            self.errors
                .iter()
                .map(|(name, total, fresh)| format!("{name} {total}{}", new(*fresh))),
        );
        writeln!(f, "errors since boot: {}", parts.join(", "))
    }
}

/// ` (+N in the interval)` when N > 0.
fn new(n: u64) -> String {
    if n > 0 {
        format!(" (+{n} in the interval)")
    } else {
        String::new()
    }
}

/// Parses `--interval`: seconds (`2`, `0.5`) or with a unit (`500ms`, `3s`).
pub fn parse_interval(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let (num, scale) = if let Some(ms) = t.strip_suffix("ms") {
        (ms, 1e-3)
    } else if let Some(s) = t.strip_suffix('s') {
        (s, 1.0)
    } else {
        (t, 1.0)
    };
    let secs = num
        .trim()
        .parse::<f64>()
        .ok()
        .map(|v| v * scale)
        .filter(|v| v.is_finite() && (0.1..=3600.0).contains(v))
        .ok_or_else(|| format!("`{text}`: an interval from 100ms to 3600s (e.g. 2, 500ms, 5s)"))?;
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = include_str!("../testdata/scrape-before.txt");
    const AFTER: &str = include_str!("../testdata/scrape-after.txt");

    fn exp(text: &str) -> Exposition {
        parse(text, Format::Text).unwrap()
    }

    #[test]
    fn urls_parse() {
        let u = Url::parse(DEFAULT_URL).unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("127.0.0.1", 9090, "/metrics")
        );
        let u = Url::parse("10.213.0.2").unwrap();
        assert_eq!(u.to_string(), "http://10.213.0.2:9090/metrics");
        let u = Url::parse("http://guest:19090/m?x=1").unwrap();
        assert_eq!(u.to_string(), "http://guest:19090/m?x=1");
        assert_eq!(
            u.with_path("/healthz").to_string(),
            "http://guest:19090/healthz"
        );
        let u = Url::parse("http://[::1]:9090/metrics").unwrap();
        assert_eq!(u.host, "[::1]");
        assert!(
            Url::parse("https://x/metrics")
                .unwrap_err()
                .contains("http://")
        );
        assert!(Url::parse("http://x:0/").is_err());
        assert!(Url::parse("http://x:port/").is_err());
        assert!(Url::parse("http:///metrics").is_err());
    }

    #[test]
    fn responses_parse() {
        let (code, body) =
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\nextra").unwrap();
        assert_eq!((code, body.as_str()), (200, "ok\n"));
        let (code, _) = parse_response(b"HTTP/1.0 503 Service Unavailable\r\n\r\nno").unwrap();
        assert_eq!(code, 503);
        assert!(parse_response(b"SSH-2.0-OpenSSH\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nok").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\n\r\n\x1f").is_err());
    }

    #[test]
    fn intervals_parse() {
        assert_eq!(parse_interval("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_interval("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_interval("1.5s"), Ok(Duration::from_millis(1500)));
        for bad in ["0", "-1", "x", "10ms", "1h", "NaN"] {
            assert!(parse_interval(bad).is_err(), "{bad}");
        }
    }

    /// The two captured scrapes were taken around a qemu-io run on the export: a 1 MiB
    /// write, a 64 KiB discard, a 4 KiB read, a 64 KiB write-zeroes and a flush.
    #[test]
    fn the_summary_of_two_captured_scrapes() {
        let s = summarize(&exp(BEFORE), &exp(AFTER), 9.0);
        // Over the guest's clock, not the host's 9 s.
        assert!(s.guest_clock && !s.restarted);
        let interval = 4.619311843 - 3.506195932;
        assert!((s.interval - interval).abs() < 1e-9, "{}", s.interval);
        assert_eq!(s.version.as_deref(), Some("0.1.0"));
        assert_eq!(s.disks.len(), 1);
        let d = &s.disks[0];
        assert_eq!((d.name.as_str(), d.up), ("disk", Some(true)));
        let rate = |op: &str| d.rates.iter().find(|r| r.op == op).unwrap().clone();
        let close = |a: f64, b: f64| (a - b).abs() < 1e-6 * b.max(1.0);
        assert!(close(rate("write").ops, 1.0 / interval));
        assert!(close(rate("write").bytes.unwrap(), 1048576.0 / interval));
        assert!(close(rate("read").bytes.unwrap(), 4096.0 / interval));
        assert!(close(rate("discard").bytes.unwrap(), 65536.0 / interval));
        assert!(close(rate("flush").ops, 4.0 / interval));
        assert_eq!(rate("flush").bytes, None);
        // NBD: read, write, disc, 2 flushes, trim, write_zeroes.
        assert!(close(s.nbd_rate.0, 7.0 / interval), "{}", s.nbd_rate.0);
        assert_eq!(
            d.space,
            [
                ("virtual", 64 << 20),
                ("data", 983040),
                ("metadata", 327680),
                ("image extent", 1376256)
            ]
        );
        assert_eq!(d.errors, (0, 0));
        assert!(
            s.errors
                .iter()
                .all(|&(_, total, new)| total == 0 && new == 0)
        );
        let names: Vec<_> = s.errors.iter().map(|e| e.0).collect();
        assert_eq!(
            names,
            [
                "device",
                "NBD",
                "NBD protocol",
                "HTTP 4xx/5xx",
                "metadata overlaps refused"
            ]
        );

        let text = s.to_string();
        for want in [
            "qcow-metal 0.1.0, up 4.62 s",
            "disk: up (image open)",
            "rates over 1.11 s (guest clock):",
            "  write              0.9 ops/s     920 KiB/s",
            "  flush             3.59 ops/s\n",
            "  NBD               6.29 req/s    1.01 MiB/s  (0 connections open)",
            "space of the disk: virtual 64 MiB, data 960 KiB, metadata 320 KiB, image extent 1.3 MiB",
            "errors since boot: disk 0, device 0, NBD 0, NBD protocol 0, HTTP 4xx/5xx 0",
        ] {
            assert!(text.contains(want), "missing `{want}` in\n{text}");
        }
    }

    #[test]
    fn errors_restarts_and_missing_families() {
        // New errors between the scrapes, and a guest that restarted.
        let after = AFTER
            .replace(
                "qcow_metal_blockdev_errors_total{device=\"vda\",op=\"write\"} 0",
                "qcow_metal_blockdev_errors_total{device=\"vda\",op=\"write\"} 3",
            )
            .replace(
                "qcow_metal_http_requests_total{code=\"404\"} 0",
                "qcow_metal_http_requests_total{code=\"404\"} 2",
            )
            .replace(
                "qcow_metal_disk_up{disk=\"disk\"} 1",
                "qcow_metal_disk_up{disk=\"disk\"} 0",
            )
            + "# TYPE qcow_metal_blockdev_capacity_bytes gauge\n\
               qcow_metal_blockdev_capacity_bytes{device=\"vda\"} 69206016\n";
        let s = summarize(&exp(BEFORE), &exp(&after), 2.0);
        let text = s.to_string();
        assert!(text.contains("device 3 (+3 in the interval)"), "{text}");
        assert!(
            text.contains("HTTP 4xx/5xx 2 (+2 in the interval)"),
            "{text}"
        );
        assert!(text.contains("disk: DOWN"), "{text}");
        assert_eq!(s.host_files, [("vda".to_string(), 66 << 20)]);
        assert!(
            text.contains("image extent 1.3 MiB, host file 66 MiB (vda)\n"),
            "{text}"
        );
        let s = summarize(&exp(AFTER), &exp(BEFORE), 2.0);
        assert!(s.restarted, "uptime went backwards");
        assert!((s.interval - 3.506195932).abs() < 1e-9);
        assert!(s.to_string().contains("restarted"));
        // Without the guest's clock: the host's.
        let s = summarize(&Exposition::default(), &Exposition::default(), 2.5);
        assert!(!s.guest_clock && s.interval == 2.5 && s.disks.is_empty());
        assert!(s.errors.is_empty());
        assert!(s.to_string().contains("rates over 2.5 s (host clock)"));
    }
}
