//! The guest's metrics end to end: scraped through the forwarded port, checked by
//! `promtool`, parsed in both formats, scraped by a real Prometheus server that answers
//! every PromQL expression of `doc/dashboard.json`, held against QEMU's own
//! `query-blockstats`, and still served while other clients misbehave.
//!
//! One test needs no guest: it serves a populated registry from the host through the same
//! HTTP responder, so the Prometheus/dashboard checks also hold for every family when the
//! guest's workload leaves some of them at zero.

use qcow_metal::block::MemDisk;
use qcow_metal::block::telemetry::IoOp;
use qcow_metal::compaction::CompactionState;
use qcow_metal::disk::telemetry::{DiskFigures, Instrumented};
use qcow_metal::disk::{RawDisk, VirtualDisk};
use qcow_metal::http::{Health, HttpStats, IndexPage, Site};
use qcow_metal::metrics::Format;
use qcow_metal::metrics::parse::{Exposition, parse};
use qcow_metal::nbd::NbdStats;
use qcow_metal::net::NetStats;
use qcow_metal::qcow2::telemetry::EngineFigures;
use qcow_metal::qcow2::{SpaceInfo, Stats};
use qcow_metal::telemetry::{GuestConfig, GuestMetrics, Scrape, SystemFigures};
use qcow_metal_e2e::{
    Guest, ScratchDir, boot, guest, qemu_io, require_tool, run_tool, shut_down_cleanly,
    spawn_prometheus,
};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// The dashboard whose every expression must return data.
const DASHBOARD: &str = include_str!("../doc/dashboard.json");

/// Guard against hangs (never a timed assert: it only stops a stuck test).
const GUARD: Duration = Duration::from_secs(300);

// ---------------------------------------------------------------------------------------
// HTTP, promtool and Prometheus helpers
// ---------------------------------------------------------------------------------------

/// One HTTP response.
#[derive(Debug)]
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8(self.body.clone()).expect("body is UTF-8")
    }
}

/// Sends `request` to 127.0.0.1:`port` and reads one response (by `Content-Length`, or to
/// the end of the stream).
fn exchange(port: u16, request: &[u8]) -> std::io::Result<Response> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(GUARD))?;
    s.write_all(request)?;
    read_response(&mut s)
}

/// Reads one response from `s`: its head, then the body by `Content-Length` (or to the end
/// of the stream when there is none).
fn read_response(s: &mut TcpStream) -> std::io::Result<Response> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 16384];
    let head_end = loop {
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Err(std::io::Error::other(format!(
                "connection closed before a full response head: {:?}",
                String::from_utf8_lossy(&raw)
            )));
        }
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {status_line:?}")))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let length = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok());
    let mut body = raw[head_end..].to_vec();
    match length {
        Some(len) => {
            while body.len() < len {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    return Err(std::io::Error::other("body cut short"));
                }
                body.extend_from_slice(&buf[..n]);
            }
            body.truncate(len);
        }
        None => {
            s.read_to_end(&mut body)?;
        }
    }
    Ok(Response {
        status,
        headers,
        body,
    })
}

/// `GET path` with an optional `Accept`, on a fresh connection.
fn get(port: u16, path: &str, accept: Option<&str>) -> Response {
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    let req = format!("GET {path} HTTP/1.1\r\nHost: guest\r\n{accept}Connection: close\r\n\r\n");
    exchange(port, req.as_bytes()).unwrap_or_else(|e| panic!("GET {path} on port {port}: {e}"))
}

/// Scrapes `/metrics` in `format`, checks status and content type, and parses it strictly.
fn scrape(port: u16, format: Format) -> (String, Exposition) {
    let accept = match format {
        Format::Text => None,
        Format::OpenMetrics => Some("application/openmetrics-text; version=1.0.0"),
    };
    let r = get(port, "/metrics", accept);
    assert_eq!(r.status, 200, "GET /metrics: {}", r.text());
    assert_eq!(r.header("Content-Type"), Some(format.content_type()));
    let text = r.text();
    let exp = parse(&text, format).unwrap_or_else(|e| panic!("{format:?} exposition: {e}\n{text}"));
    (text, exp)
}

/// Runs `promtool check metrics` on `text`; returns its findings (empty when clean).
fn promtool(text: &str) -> String {
    let path = require_tool("promtool", "prometheus");
    let mut child = Command::new(path)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting promtool (Debian package prometheus)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let mut report = String::from_utf8_lossy(&out.stdout).into_owned();
    report.push_str(&String::from_utf8_lossy(&out.stderr));
    if !out.status.success() && report.trim().is_empty() {
        report = format!("promtool failed with {}", out.status);
    }
    report
}

/// A loopback port nobody listens on.
fn free_port() -> u16 {
    qcow_metal_runner::ports::pick_free().expect("a free loopback port")
}

/// A real Prometheus server on loopback with a temporary configuration and data directory,
/// scraping one target every second. Killed on drop.
struct Prometheus {
    child: Child,
    port: u16,
    dir: ScratchDir,
}

impl Prometheus {
    fn start(target: &str) -> Prometheus {
        let dir = ScratchDir::new("prometheus");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: qcow-metal\n    static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let child = spawn_prometheus(&config, dir.path(), port);
        Prometheus { child, port, dir }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// Runs an instant query; `Err` with Prometheus' message when it refuses it.
    fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let req = format!(
            "GET /api/v1/query?query={} HTTP/1.0\r\nHost: prometheus\r\n\r\n",
            url_encode(expr)
        );
        let r = exchange(self.port, req.as_bytes()).map_err(|e| format!("connecting: {e}"))?;
        let v: Value = serde_json::from_slice(&r.body)
            .map_err(|e| format!("status {}: {e}: {}", r.status, r.text()))?;
        if v["status"] != "success" {
            return Err(format!("{}: {}", v["errorType"], v["error"]));
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// Polls `expr` until `done` accepts its result.
    fn wait_for(&self, expr: &str, what: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let start = Instant::now();
        let mut last = Err(String::from("not queried yet"));
        while start.elapsed() < GUARD {
            last = self.query(expr);
            if let Ok(r) = &last
                && done(r)
            {
                return r.clone();
            }
            thread::sleep(Duration::from_millis(250));
        }
        panic!(
            "Prometheus never showed {what} (`{expr}`); last answer: {last:?}\nlog:\n{}",
            self.log()
        );
    }

    /// Waits until the target is up and scraped at least `scrapes` times.
    fn wait_scraped(&self, scrapes: usize) {
        self.wait_for("up", "the target up", |r| {
            r.len() == 1 && r[0]["value"][1] == "1"
        });
        let expr = format!("count_over_time(up[1h]) >= {scrapes}");
        self.wait_for(&expr, "enough scrapes", |r| !r.is_empty());
    }

    /// The names of every series Prometheus holds.
    fn metric_names(&self) -> Vec<String> {
        let req = "GET /api/v1/label/__name__/values HTTP/1.0\r\nHost: prometheus\r\n\r\n";
        let r = exchange(self.port, req.as_bytes()).expect("querying label values");
        let v: Value = serde_json::from_slice(&r.body).expect("label values JSON");
        v["data"]
            .as_array()
            .expect("label values")
            .iter()
            .filter_map(|n| n.as_str().map(String::from))
            .collect()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Percent-encodes `s` for a URL query (PromQL expressions).
fn url_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Every PromQL expression of the dashboard, with Grafana's variables made concrete.
fn dashboard_exprs() -> Vec<(String, String)> {
    let d: Value = serde_json::from_str(DASHBOARD).expect("doc/dashboard.json is JSON");
    assert_eq!(d["schemaVersion"], 39);
    let mut out = Vec::new();
    let mut panels: Vec<&Value> = d["panels"].as_array().expect("panels").iter().collect();
    while let Some(p) = panels.pop() {
        if let Some(inner) = p["panels"].as_array() {
            panels.extend(inner);
        }
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().expect("target expr");
            let concrete = expr
                .replace("$__rate_interval", "10s")
                .replace("$instance", ".*")
                .replace("$disk", ".*")
                .replace("$device", ".*");
            assert!(!concrete.contains('$'), "unreplaced variable in {expr}");
            out.push((p["title"].as_str().unwrap_or("").to_string(), concrete));
        }
    }
    assert!(out.len() > 20, "the dashboard has too few expressions");
    out
}

/// Checks every dashboard expression against `prom`: valid, and with data.
fn check_dashboard(prom: &Prometheus) {
    let mut failures = Vec::new();
    for (title, expr) in dashboard_exprs() {
        match prom.query(&expr) {
            Ok(r) if !r.is_empty() => {}
            Ok(_) => failures.push(format!("{title}: `{expr}` returned no data")),
            Err(e) => failures.push(format!("{title}: `{expr}` refused: {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "dashboard expressions:\n{}",
        failures.join("\n")
    );
}

/// The qcow2 families that must reach Prometheus (names as stored).
const CORE_SERIES: &[&str] = &[
    "qcow_metal_disk_up",
    "qcow_metal_disk_requests_total",
    "qcow_metal_disk_bytes_total",
    "qcow_metal_disk_request_duration_seconds_bucket",
    "qcow_metal_disk_virtual_size_bytes",
    "qcow_metal_disk_data_bytes",
    "qcow_metal_disk_metadata_bytes",
    "qcow_metal_disk_image_extent_bytes",
    "qcow_metal_disk_free_clusters",
    "qcow_metal_disk_reclaim_bytes_total",
    "qcow_metal_disk_cache_hits_total",
    "qcow_metal_blockdev_requests_total",
    "qcow_metal_blockdev_in_flight",
    "qcow_metal_nbd_requests_total",
    "qcow_metal_http_requests_total",
    "qcow_metal_http_scrape_encode_seconds_bucket",
    "qcow_metal_guest_uptime_seconds",
    "qcow_metal_build_info",
    "qcow_metal_net_bytes_total",
];

// ---------------------------------------------------------------------------------------
// The host-side registry served through the library's HTTP responder
// ---------------------------------------------------------------------------------------

/// Nanoseconds since the first call: the monotonic clock of the host-side registry.
fn host_clock() -> u64 {
    use std::sync::OnceLock;
    static START: OnceLock<Instant> = OnceLock::new();
    let start = START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// The site of the host-side server: the registry, and the `Accept` headers seen.
struct HostSite {
    metrics: Arc<Populated>,
    stats: Arc<HttpStats>,
    accepts: Arc<Mutex<Vec<String>>>,
}

impl Site for HostSite {
    fn metrics(&mut self, accept: &str, out: &mut Vec<u8>) -> &'static str {
        self.accepts.lock().unwrap().push(accept.to_string());
        let p = &self.metrics;
        let scrape = Scrape {
            disk: DiskFigures {
                engine: EngineFigures {
                    space: p.space,
                    stats: Some(&p.engine),
                },
                compaction: CompactionState::Idle,
                compaction_passes: 1,
            },
            nbd: &p.nbd,
            http: &self.stats,
            net: &p.net,
            system: SystemFigures {
                uptime_seconds: 3.5,
                heap_size: 64 << 20,
                heap_used: 1 << 20,
            },
            connections: None,
        };
        p.metrics.serve(accept, &scrape, out)
    }

    fn index(&mut self, page: &mut IndexPage) {
        page.fact("served by", "the metrics end-to-end test");
    }

    fn healthz(&mut self) -> Health {
        Health::Ok
    }

    fn http_stats(&self) -> &HttpStats {
        &self.stats
    }
}

/// A guest's metrics and what its layers counted, as a busy guest would have them.
struct Populated {
    metrics: GuestMetrics,
    space: SpaceInfo,
    engine: Stats,
    nbd: NbdStats,
    net: NetStats,
}

/// Every layer populated, as a busy guest would have it.
fn populated_registry() -> Arc<Populated> {
    let m = GuestMetrics::new(&GuestConfig {
        disk: "disk0",
        device: "vda",
        interface: "eth0",
        version: env!("CARGO_PKG_VERSION"),
        mirage: false,
        clock: host_clock,
    });
    let mut disk = Instrumented::new(
        RawDisk::new(MemDisk::fixed(1 << 20)),
        m.disk.clone(),
        host_clock,
    );
    for i in 0..16u64 {
        disk.write(i * 4096, &[i as u8; 4096]).unwrap();
        let mut buf = [0u8; 4096];
        disk.read(i * 4096, &mut buf).unwrap();
    }
    disk.discard(0, 4096).unwrap();
    disk.write_zeroes(8192, 4096, false).unwrap();
    disk.flush().unwrap();
    m.disk.set_up(true);
    for op in IoOp::ALL {
        m.blockdev.record(op, 4096, 250_000, true);
    }
    let net = NetStats::default();
    net.rx_packets.store(10, Ordering::Relaxed);
    net.tx_packets.store(10, Ordering::Relaxed);
    net.rx_bytes.store(1000, Ordering::Relaxed);
    net.tx_bytes.store(20000, Ordering::Relaxed);
    Arc::new(Populated {
        metrics: m,
        space: SpaceInfo {
            virtual_size: 1 << 20,
            cluster_size: 65536,
            data_bytes: 65536,
            metadata_bytes: 3 * 65536,
            image_extent: 5 * 65536,
            free_clusters: 1,
        },
        engine: Stats {
            clusters_allocated: 5,
            clusters_freed: 1,
            cow_bytes: 4096,
            l2_cache_hits: 40,
            l2_cache_misses: 2,
            refcount_cache_hits: 10,
            refcount_cache_misses: 1,
            metadata_bytes_written: 3 * 65536,
            reclaim_junk: 1,
            reclaim_erased: 1,
            reclaim_available: 1,
            reclaim_copied: 1,
            reclaim_flushed: 1,
            reclaim_referenced: 1,
            reclaim_junk_now: 1,
            ..Stats::default()
        },
        nbd: NbdStats {
            connections_active: 1,
            connections_total: 2,
            sessions_total: 2,
            requests: [16, 16, 1, 1, 1, 1, 2, 0],
            bytes_read: 65536,
            bytes_written: 65536,
            bytes_trimmed: 4096,
            bytes_zeroed: 4096,
            ..NbdStats::default()
        },
        net,
    })
}

/// Serves `metrics` on a loopback port with the library's HTTP responder (std driver).
fn serve_on_host(metrics: Arc<Populated>) -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let stats = Arc::new(HttpStats::new());
    let accepts = Arc::new(Mutex::new(Vec::new()));
    let seen = accepts.clone();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let mut site = HostSite {
                metrics: metrics.clone(),
                stats: stats.clone(),
                accepts: accepts.clone(),
            };
            thread::spawn(move || {
                let _ = qcow_metal::http::std_io::serve_stream(
                    &stream,
                    qcow_metal::http::Config::default(),
                    &mut site,
                );
            });
        }
    });
    (port, seen)
}

#[test]
fn prometheus_reads_every_family_and_the_dashboard_from_a_populated_registry() {
    let (port, accepts) = serve_on_host(populated_registry());
    let (text, _) = scrape(port, Format::Text);
    let report = promtool(&text);
    assert!(
        report.trim().is_empty(),
        "promtool check metrics:\n{report}"
    );
    let (om, _) = scrape(port, Format::OpenMetrics);
    assert!(om.ends_with("# EOF\n"));

    let prom = Prometheus::start(&format!("127.0.0.1:{port}"));
    prom.wait_scraped(12);
    // Prometheus asked for OpenMetrics, so its own OpenMetrics parser read our output.
    assert!(
        accepts
            .lock()
            .unwrap()
            .iter()
            .any(|a| a.contains("application/openmetrics-text")),
        "Prometheus did not ask for OpenMetrics"
    );
    let names = prom.metric_names();
    for series in CORE_SERIES {
        assert!(
            names.iter().any(|n| n == series),
            "{series} missing from Prometheus"
        );
    }
    check_dashboard(&prom);
}

// ---------------------------------------------------------------------------------------
// The guest
// ---------------------------------------------------------------------------------------

/// The guest's block-device counters in one scrape.
#[derive(Debug, Clone, PartialEq)]
struct DeviceCounts {
    reads: u64,
    writes: u64,
    write_zeroes: u64,
    flushes: u64,
    discards: u64,
    read_bytes: u64,
    write_bytes: u64,
    zeroed_bytes: u64,
    errors: u64,
    in_flight: u64,
}

/// The block device's counts in a scrape, to hold against QMP `query-blockstats`.
fn device_counts(exp: &Exposition) -> DeviceCounts {
    let v = |name: &str, op: &str| -> u64 {
        let filter = [("op", op)];
        let samples: Vec<_> = exp.find(name, &filter).collect();
        assert_eq!(samples.len(), 1, "{name}{{op={op}}}: one device expected");
        samples[0].value as u64
    };
    let errors = ["read", "write", "flush", "discard", "write_zeroes"]
        .iter()
        .map(|op| v("qcow_metal_blockdev_errors_total", op))
        .sum();
    DeviceCounts {
        reads: v("qcow_metal_blockdev_requests_total", "read"),
        writes: v("qcow_metal_blockdev_requests_total", "write"),
        write_zeroes: v("qcow_metal_blockdev_requests_total", "write_zeroes"),
        flushes: v("qcow_metal_blockdev_requests_total", "flush"),
        discards: v("qcow_metal_blockdev_requests_total", "discard"),
        read_bytes: v("qcow_metal_blockdev_bytes_total", "read"),
        write_bytes: v("qcow_metal_blockdev_bytes_total", "write"),
        zeroed_bytes: v("qcow_metal_blockdev_bytes_total", "write_zeroes"),
        errors,
        in_flight: exp
            .find("qcow_metal_blockdev_in_flight", &[])
            .map(|s| s.value as u64)
            .sum(),
    }
}

/// Fails, with the console's tail, unless QMP says the guest is still running.
fn assert_still_running(guest: &mut Guest) {
    let status = guest
        .qmp()
        .expect("QMP")
        .query_status()
        .expect("query-status");
    assert!(status.running, "the guest stopped: {}", guest.tail());
}

/// A known workload through NBD: writes, reads back (verified), zeroes, discards, flushes.
fn nbd_workload(guest: &Guest) {
    qemu_io(
        &guest.nbd_url(),
        &[
            "write -P 0xa5 0 256k",
            "write -P 0x5a 1M 64k",
            "write -P 0x11 3M 4k",
            "read -P 0xa5 0 256k",
            "read -P 0x5a 1M 64k",
            "write -z 2M 128k",
            "discard 3M 64k",
            "flush",
        ],
    );
}

#[test]
fn guest_metrics_pass_promtool_and_prometheus_and_the_dashboard() {
    let (mut guest, _) = boot(guest());
    let port = guest.metrics_port();
    let (text, exp) = scrape(port, Format::Text);
    let report = promtool(&text);
    assert!(
        report.trim().is_empty(),
        "promtool check metrics:\n{report}\n{text}"
    );
    let (om, om_exp) = scrape(port, Format::OpenMetrics);
    assert!(om.ends_with("# EOF\n"));
    for e in [&exp, &om_exp] {
        assert_eq!(
            e.value("qcow_metal_disk_up", &[]),
            Some(1.0),
            "disk not up:\n{text}"
        );
        assert!(
            e.value("qcow_metal_disk_virtual_size_bytes", &[])
                .unwrap_or(0.0)
                > 0.0
        );
        assert!(
            e.value("qcow_metal_disk_image_extent_bytes", &[])
                .unwrap_or(0.0)
                > 0.0
        );
        assert!(e.find("qcow_metal_blockdev_requests_total", &[]).count() > 0);
    }
    assert_eq!(
        exp.family("Mirage_qcow_reads"),
        None,
        "mirage families are off by default"
    );

    let prom = Prometheus::start(&format!("127.0.0.1:{port}"));
    prom.wait_scraped(3);
    nbd_workload(&guest);
    // Scrapes after the workload, so that its rates show.
    let start = prom.query("count_over_time(up[1h])").unwrap()[0]["value"][1]
        .as_str()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0);
    prom.wait_scraped(start + 3);
    let names = prom.metric_names();
    for series in CORE_SERIES {
        assert!(
            names.iter().any(|n| n == series),
            "{series} missing from Prometheus"
        );
    }
    let written = prom.wait_for(
        "sum(qcow_metal_disk_bytes_total{op=\"write\"})",
        "the NBD writes",
        |r| !r.is_empty() && r[0]["value"][1] != "0",
    );
    assert!(!written.is_empty());
    check_dashboard(&prom);
    drop(prom);
    shut_down_cleanly(&mut guest);
}

#[test]
fn guest_blockdev_counters_equal_qmp_blockstats() {
    let (mut guest, _) = boot(guest());
    let port = guest.metrics_port();
    nbd_workload(&guest);
    // The guest may still write metadata in the background: compare once two scrapes
    // around the QMP query agree and nothing is in flight.
    let mut attempts = 0;
    let (counts, qmp) = loop {
        attempts += 1;
        assert!(attempts < 200, "the guest's block device never went quiet");
        let (_, before) = scrape(port, Format::Text);
        let stats = guest
            .qmp()
            .expect("QMP")
            .query_blockstats()
            .expect("query-blockstats");
        let (_, after) = scrape(port, Format::Text);
        let (b, a) = (device_counts(&before), device_counts(&after));
        if a == b && a.in_flight == 0 {
            break (a, stats);
        }
        thread::sleep(Duration::from_millis(200));
    };
    let entries: Vec<_> = qmp
        .iter()
        .filter(|e| {
            e.qdev.as_deref().is_some_and(|q| q.contains("virtio"))
                || (qmp.len() == 1 && e.qdev.is_some())
        })
        .collect();
    assert_eq!(entries.len(), 1, "one virtio-blk device expected: {qmp:?}");
    let q = entries[0].stats;
    // The engine saw exactly the workload's requests (each NBD request is one disk request).
    let (_, exp) = scrape(port, Format::Text);
    let disk = |name: &str, op: &str| {
        exp.value(name, &[("op", op)])
            .unwrap_or_else(|| panic!("{name}{{op={op}}} missing"))
    };
    assert_eq!(disk("qcow_metal_disk_bytes_total", "write"), 331776.0);
    assert_eq!(disk("qcow_metal_disk_requests_total", "write"), 3.0);
    assert_eq!(
        disk("qcow_metal_disk_bytes_total", "write_zeroes"),
        131072.0
    );
    assert_eq!(disk("qcow_metal_disk_bytes_total", "discard"), 65536.0);
    assert_eq!(disk("qcow_metal_disk_bytes_total", "read"), 327680.0);
    assert_eq!(disk("qcow_metal_nbd_bytes_total", "write"), 331776.0);
    eprintln!("guest block device: {counts:?}\nQEMU query-blockstats: {q:?}");
    assert_eq!(counts.errors, 0, "{counts:?}");
    assert!(counts.writes > 0 && counts.reads > 0, "{counts:?}");
    // QEMU's virtio-blk counts write-zeroes requests among writes.
    assert_eq!(
        q.rd_operations, counts.reads,
        "rd_operations; guest {counts:?}, QEMU {q:?}"
    );
    assert_eq!(
        q.wr_operations,
        counts.writes + counts.write_zeroes,
        "wr_operations; guest {counts:?}, QEMU {q:?}"
    );
    assert_eq!(
        q.flush_operations, counts.flushes,
        "flush_operations; guest {counts:?}, QEMU {q:?}"
    );
    assert_eq!(
        q.rd_bytes, counts.read_bytes,
        "rd_bytes; guest {counts:?}, QEMU {q:?}"
    );
    assert_eq!(
        q.wr_bytes,
        counts.write_bytes + counts.zeroed_bytes,
        "wr_bytes; guest {counts:?}, QEMU {q:?}"
    );
    // QEMU 7.2's virtio-blk does not account discards; where a QEMU does, they must match.
    if q.unmap_operations != 0 {
        assert_eq!(q.unmap_operations, counts.discards, "unmap_operations");
    }
    shut_down_cleanly(&mut guest);
}

#[test]
fn guest_exports_the_mirage_families_when_asked() {
    let (mut guest, _) = boot(guest().append("mirage_metrics=1"));
    let port = guest.metrics_port();
    nbd_workload(&guest);
    let (text, exp) = scrape(port, Format::Text);
    for name in [
        "reads",
        "writes",
        "discards",
        "junk",
        "erased",
        "available",
        "roots",
        "copied",
        "flushed",
        "referenced",
        "used",
        "size",
    ] {
        let family = format!("Mirage_qcow_{name}");
        let info = exp
            .family(&family)
            .unwrap_or_else(|| panic!("{family} missing"));
        let want = if matches!(name, "used" | "size") {
            "gauge"
        } else {
            "counter"
        };
        assert_eq!(info.kind, want, "{family}");
        let samples: Vec<_> = exp.find(&family, &[]).collect();
        assert_eq!(samples.len(), 1, "{family}");
        assert!(samples[0].label("id").is_some(), "{family} has no id label");
    }
    assert_eq!(
        exp.value("Mirage_qcow_writes", &[]),
        exp.value("qcow_metal_disk_bytes_total", &[("op", "write")])
    );
    assert!(exp.value("Mirage_qcow_writes", &[]).unwrap_or(0.0) >= 327680.0);
    // promtool's only findings are the counters named without `_total`, as ocaml-qcow has them.
    for line in promtool(&text).lines().filter(|l| !l.trim().is_empty()) {
        assert!(
            line.starts_with("Mirage_qcow_") && line.contains("_total"),
            "unexpected promtool finding: {line}"
        );
    }
    let (_, om) = scrape(port, Format::OpenMetrics);
    assert_eq!(
        om.family("Mirage_qcow_reads").map(|f| f.kind.as_str()),
        Some("unknown")
    );
    // Prometheus keeps ocaml-qcow's names, so the queries of its dashboard work unchanged.
    let prom = Prometheus::start(&format!("127.0.0.1:{port}"));
    prom.wait_scraped(3);
    for expr in [
        "Mirage_qcow_used",
        "Mirage_qcow_size",
        "rate(Mirage_qcow_writes[10s])",
        "rate(Mirage_qcow_reads[10s])",
        "rate(Mirage_qcow_junk[10s])",
        "rate(Mirage_qcow_referenced[10s])",
    ] {
        let r = prom.query(expr).unwrap_or_else(|e| panic!("`{expr}`: {e}"));
        assert_eq!(r.len(), 1, "`{expr}` returned {r:?}");
        assert!(r[0]["metric"]["id"].is_string(), "`{expr}` has no id label");
    }
    let written = prom.query("Mirage_qcow_writes").unwrap();
    assert_eq!(written[0]["value"][1], "331776");
    drop(prom);
    shut_down_cleanly(&mut guest);
}

#[test]
fn metrics_keep_answering_while_clients_misbehave() {
    let (mut guest, _) = boot(guest());
    let port = guest.metrics_port();
    // Clients that connect and say nothing.
    let idle: Vec<TcpStream> = (0..4)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).expect("idle connection"))
        .collect();
    // A client that sent half a request and stalls.
    let mut stalled = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stalled
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: g")
        .unwrap();
    // /metrics still answers.
    let (_, exp) = scrape(port, Format::Text);
    assert!(exp.value("qcow_metal_disk_up", &[]).is_some());

    // Garbage gets a 400 and the connection closes.
    let r = exchange(port, b"\x00\x01\x02 garbage \xff\xfe\r\n\r\n").expect("garbage exchange");
    assert_eq!(r.status, 400);
    let r = exchange(port, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").expect("HTTP/2 preface");
    assert_eq!(r.status, 400);
    // An oversized header gets 431.
    let big = format!(
        "GET /metrics HTTP/1.1\r\nHost: g\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(GUARD)).unwrap();
    // The guest may answer and close before taking every byte: a failed write is fine.
    let _ = s.write_all(big.as_bytes());
    let r = read_response(&mut s).expect("response to an oversized header");
    assert_eq!(r.status, 431);
    // Too many header fields, an unknown method, a missing page.
    let many: String = (0..200).map(|i| format!("X-{i}: v\r\n")).collect();
    let r = exchange(
        port,
        format!("GET / HTTP/1.1\r\nHost: g\r\n{many}\r\n").as_bytes(),
    )
    .unwrap();
    assert_eq!(r.status, 431);
    assert_eq!(
        exchange(
            port,
            b"DELETE /metrics HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n"
        )
        .unwrap()
        .status,
        405
    );
    assert_eq!(get(port, "/nope", None).status, 404);

    // Keep-alive: two scrapes on one connection.
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(GUARD)).unwrap();
    for _ in 0..2 {
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: g\r\n\r\n")
            .unwrap();
        let r = read_response(&mut s).unwrap();
        assert_eq!(r.status, 200);
        parse(&r.text(), Format::Text).expect("keep-alive scrape parses");
    }

    // Everything above was counted, and the guest is still serving.
    let (_, exp) = scrape(port, Format::Text);
    let code = |c: &str| {
        exp.value("qcow_metal_http_requests_total", &[("code", c)])
            .unwrap_or(0.0)
    };
    assert!(code("400") >= 2.0, "400s not counted");
    assert!(code("431") >= 2.0, "431s not counted");
    assert!(code("405") >= 1.0 && code("404") >= 1.0);
    // The first scrape and the two keep-alive ones (this one is counted once it is sent).
    assert!(code("200") >= 3.0, "200s not counted");
    drop(idle);
    drop(stalled);
    assert_still_running(&mut guest);
    assert_eq!(get(port, "/healthz", None).status, 200);
    shut_down_cleanly(&mut guest);
}

#[test]
fn metrics_answer_again_after_a_flood_of_idle_connections() {
    let (mut guest, _) = boot(guest());
    let port = guest.metrics_port();
    // More silent clients than the guest has sockets for the metrics port (64): the idle
    // timeout must free them so that /metrics answers again.
    let idle: Vec<TcpStream> = (0..80)
        .filter_map(|_| TcpStream::connect(("127.0.0.1", port)).ok())
        .collect();
    assert!(!idle.is_empty());
    let start = Instant::now();
    let text = loop {
        assert!(
            start.elapsed() < GUARD,
            "/metrics never answered again:\n{}",
            guest.tail()
        );
        let req = b"GET /metrics HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n";
        match exchange(port, req) {
            Ok(r) if r.status == 200 => break r.text(),
            _ => thread::sleep(Duration::from_millis(500)),
        }
    };
    let exp = parse(&text, Format::Text).expect("the scrape after the flood parses");
    let timeouts = exp
        .value("qcow_metal_http_timeouts_total", &[])
        .unwrap_or(0.0);
    eprintln!(
        "{} idle clients; {timeouts} closed by the idle timeout",
        idle.len()
    );
    drop(idle);
    assert_still_running(&mut guest);
    shut_down_cleanly(&mut guest);
}

#[test]
fn an_image_that_cannot_be_opened_is_reported_in_the_metrics() {
    let dir = ScratchDir::new("bad-image");
    let path = dir.path().join("garbage.img");
    std::fs::write(&path, vec![0x5a_u8; 1 << 20]).unwrap();
    let (mut guest, _) = boot(
        guest()
            .disk(&path)
            .format(qcow_metal_runner::disk::GuestFormat::Qcow2),
    );
    let port = guest.metrics_port();
    let (text, exp) = scrape(port, Format::Text);
    assert_eq!(exp.value("qcow_metal_disk_up", &[]), Some(0.0), "{text}");
    let report = promtool(&text);
    assert!(
        report.trim().is_empty(),
        "promtool check metrics:\n{report}"
    );
    let (_, om) = scrape(port, Format::OpenMetrics);
    assert_eq!(om.value("qcow_metal_disk_up", &[]), Some(0.0));
    assert_eq!(get(port, "/healthz", None).status, 503);
    assert_still_running(&mut guest);
}

#[test]
fn dashboard_and_prometheus_config_are_well_formed() {
    let d: Value = serde_json::from_str(DASHBOARD).expect("doc/dashboard.json is JSON");
    assert_eq!(d["schemaVersion"], 39);
    let vars: Vec<&str> = d["templating"]["list"]
        .as_array()
        .expect("templating variables")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    for v in ["datasource", "instance", "disk", "device"] {
        assert!(vars.contains(&v), "variable ${v} is not defined");
    }
    let mut ids = Vec::new();
    let mut boxes = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        ids.push(p["id"].as_u64().expect("panel id"));
        let g = &p["gridPos"];
        let (x, y, w, h) = (
            g["x"].as_u64().unwrap(),
            g["y"].as_u64().unwrap(),
            g["w"].as_u64().unwrap(),
            g["h"].as_u64().unwrap(),
        );
        assert!(x + w <= 24, "panel {} is wider than the grid", p["title"]);
        for &(ox, oy, ow, oh, ref t) in &boxes {
            let overlap = x < ox + ow && ox < x + w && y < oy + oh && oy < y + h;
            assert!(!overlap, "panels {} and {t} overlap", p["title"]);
        }
        boxes.push((x, y, w, h, p["title"].to_string()));
        if p["type"] != "row" {
            assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
            assert!(!p["targets"].as_array().expect("targets").is_empty());
        }
    }
    let n = ids.len();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), n, "panel ids are not unique");
    // Every variable a query uses is defined.
    for (title, expr) in dashboard_exprs() {
        assert!(!expr.contains("${"), "{title}: {expr}");
    }
    for word in DASHBOARD.split(|c: char| !(c.is_alphanumeric() || c == '$' || c == '_')) {
        if let Some(var) = word.strip_prefix('$')
            && !var.starts_with("__")
            && !var.is_empty()
        {
            assert!(vars.contains(&var), "${var} is used but not defined");
        }
    }

    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/../doc/prometheus.yml");
    run_tool("promtool", "prometheus", &["check", "config", config]);
    let text = std::fs::read_to_string(config).unwrap();
    assert!(
        text.contains("127.0.0.1:9090"),
        "doc/prometheus.yml must scrape the guest"
    );
}
