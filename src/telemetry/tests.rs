//! The guest's exposition: every layer's families, exact counts, promtool.

use super::*;
use crate::block::telemetry::{InstrumentedDevice, IoOp};
use crate::compaction::CompactionState;
use crate::disk::telemetry::Instrumented;
use crate::http::Status;
use crate::metrics::{CONTENT_TYPE_OPENMETRICS, parse};
use crate::nbd::{Command, NbdError};
use crate::qcow2::telemetry::EngineFigures;
use crate::qcow2::{SpaceInfo, Stats};
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::Ordering::Relaxed;

/// A fake monotonic clock for tests: advances 1.5 µs per call.
fn test_clock() -> u64 {
    use core::sync::atomic::AtomicU64;
    static NOW: AtomicU64 = AtomicU64::new(0);
    NOW.fetch_add(1_500, Relaxed)
}

/// A guest's metrics and the counters its layers keep, every family with non-trivial values.
pub(crate) struct Populated {
    pub m: GuestMetrics,
    pub space: SpaceInfo,
    pub stats: Stats,
    pub compaction: CompactionState,
    pub nbd: NbdStats,
    pub http: HttpStats,
    pub net: NetStats,
}

impl Populated {
    /// What a scrape reads.
    pub fn scrape(&self) -> Scrape<'_> {
        Scrape {
            disk: DiskFigures {
                engine: EngineFigures {
                    space: self.space,
                    stats: Some(&self.stats),
                },
                compaction: self.compaction,
                compaction_passes: 2,
            },
            nbd: &self.nbd,
            http: &self.http,
            net: &self.net,
            system: SystemFigures {
                uptime_seconds: 12.5,
                heap_size: 64 << 20,
                heap_used: 3 << 20,
            },
            connections: None,
        }
    }

    /// The exposition.
    pub fn render(&self, format: Format) -> Vec<u8> {
        self.m.render(format, &self.scrape())
    }

    /// The exposition as text.
    pub fn text(&self, format: Format) -> String {
        String::from_utf8(self.render(format)).unwrap()
    }
}

/// A guest with every family populated.
pub(crate) fn populated_guest(mirage: bool) -> Populated {
    use crate::block::MemDisk;
    use crate::disk::{RawDisk, VirtualDisk};
    let m = GuestMetrics::new(&GuestConfig {
        disk: "disk0",
        device: "vda",
        interface: "eth0",
        version: "0.1.0",
        mirage,
        clock: test_clock,
    });
    let mut disk = Instrumented::new(
        RawDisk::new(MemDisk::fixed(1 << 20)),
        m.disk.clone(),
        test_clock,
    );
    disk.write(0, &[1u8; 4096]).unwrap();
    let mut buf = [0u8; 512];
    disk.read(512, &mut buf).unwrap();
    disk.read(1 << 20, &mut buf).unwrap_err();
    disk.discard(0, 4096).unwrap();
    disk.write_zeroes(8192, 4096, true).unwrap();
    disk.flush().unwrap();
    m.disk.set_up(true);
    m.blockdev.submitted();
    m.blockdev.record(IoOp::Read, 4096, 80_000, true);
    m.blockdev.record(IoOp::Write, 65536, 2_000_000, true);
    m.blockdev.record(IoOp::Flush, 0, 9_000_000, true);
    m.blockdev.record(IoOp::Write, 512, 1_000, false);
    let space = SpaceInfo {
        virtual_size: 1 << 30,
        cluster_size: 65536,
        data_bytes: 3 * 65536,
        metadata_bytes: 4 * 65536,
        image_extent: 7 * 65536,
        free_clusters: 2,
    };
    let stats = Stats {
        clusters_allocated: 9,
        clusters_freed: 2,
        cow_bytes: 61440,
        l2_cache_hits: 100,
        l2_cache_misses: 3,
        refcount_cache_hits: 50,
        refcount_cache_misses: 1,
        metadata_bytes_written: 196608,
        reclaim_junk: 2,
        reclaim_erased: 2,
        reclaim_available: 1,
        reclaim_copied: 1,
        reclaim_flushed: 1,
        reclaim_referenced: 1,
        overlaps_refused: 1,
        reclaim_junk_now: 3,
        ..Stats::default()
    };
    let mut nbd = NbdStats {
        connections_active: 1,
        connections_total: 3,
        sessions_total: 2,
        protocol_errors: 1,
        requests: [10, 5, 1, 2, 1, 1, 4, 1],
        bytes_read: 40960,
        bytes_written: 20480,
        bytes_trimmed: 4096,
        bytes_zeroed: 4096,
        ..NbdStats::default()
    };
    nbd.errors[NbdError::Invalid.index()] = 1;
    let http = HttpStats::new();
    for _ in 0..7 {
        http.count_response(Status::Ok, 7000, false);
    }
    http.count_response(Status::NotFound, 1000, true);
    http.count_response(Status::BadRequest, 1000, true);
    http.count_bad_request();
    http.count_timeout();
    http.count_received(1000);
    let net = NetStats::default();
    net.rx_packets.store(100, Relaxed);
    net.tx_packets.store(90, Relaxed);
    net.rx_bytes.store(10000, Relaxed);
    net.tx_bytes.store(90000, Relaxed);
    let p = Populated {
        m,
        space,
        stats,
        compaction: CompactionState::Running,
        nbd,
        http,
        net,
    };
    // One render so the scrape-encode histogram has an observation.
    let _ = p.render(Format::Text);
    p
}

#[test]
fn guest_registry_counts_requests_exactly() {
    let p = populated_guest(false);
    let m = &p.m;
    let r = &m.disk.requests;
    assert_eq!(r.requests(IoOp::Read), 1);
    assert_eq!(r.errors(IoOp::Read), 1);
    assert_eq!(r.bytes(IoOp::Read), 512);
    assert_eq!(r.requests(IoOp::Write), 1);
    assert_eq!(r.bytes(IoOp::Write), 4096);
    assert_eq!(r.requests(IoOp::Discard), 1);
    assert_eq!(r.bytes(IoOp::WriteZeroes), 4096);
    assert_eq!(r.requests(IoOp::Flush), 1);
    // The fake clock advances 1.5 µs between the two reads of each request.
    assert_eq!(r.latency(IoOp::Write).count(), 1);
    assert_eq!(r.latency(IoOp::Write).sum_units(), 1_500);
    assert_eq!(
        r.latency(IoOp::Read).count(),
        1,
        "failed reads have no latency"
    );
    let b = &m.blockdev.requests;
    assert_eq!(b.requests(IoOp::Write), 1);
    assert_eq!(b.errors(IoOp::Write), 1);
    assert_eq!(b.bytes(IoOp::Write), 65536);

    let t = p.text(Format::Text);
    for line in [
        "qcow_metal_disk_requests_total{disk=\"disk0\",op=\"read\"} 1\n",
        "qcow_metal_disk_errors_total{disk=\"disk0\",op=\"read\"} 1\n",
        "qcow_metal_disk_bytes_total{disk=\"disk0\",op=\"write_zeroes\"} 4096\n",
        "qcow_metal_disk_image_extent_bytes{disk=\"disk0\"} 458752\n",
        "qcow_metal_disk_reclaim_bytes_total{disk=\"disk0\",stage=\"referenced\"} 65536\n",
        "qcow_metal_disk_reclaim_junk_bytes{disk=\"disk0\"} 196608\n",
        "qcow_metal_disk_reclaim_available_bytes{disk=\"disk0\"} 131072\n",
        "qcow_metal_disk_compaction_state{disk=\"disk0\",state=\"off\"} 0\n",
        "qcow_metal_disk_compaction_state{disk=\"disk0\",state=\"idle\"} 0\n",
        "qcow_metal_disk_compaction_state{disk=\"disk0\",state=\"waiting\"} 0\n",
        "qcow_metal_disk_compaction_state{disk=\"disk0\",state=\"running\"} 1\n",
        "qcow_metal_disk_compaction_passes_total{disk=\"disk0\"} 2\n",
        "qcow_metal_disk_cache_misses_total{disk=\"disk0\",cache=\"refcount\"} 1\n",
        "qcow_metal_disk_up{disk=\"disk0\"} 1\n",
        "qcow_metal_blockdev_request_duration_seconds_bucket{device=\"vda\",op=\"flush\",le=\"0.01\"} 1\n",
        "qcow_metal_blockdev_request_duration_seconds_bucket{device=\"vda\",op=\"flush\",le=\"0.005\"} 0\n",
        "qcow_metal_blockdev_in_flight{device=\"vda\"} 1\n",
        "qcow_metal_nbd_requests_total{export=\"disk0\",command=\"block_status\"} 4\n",
        "qcow_metal_nbd_errors_total{export=\"disk0\",error=\"EINVAL\"} 1\n",
        "qcow_metal_http_requests_total{code=\"200\"} 7\n",
        "qcow_metal_http_requests_total{code=\"503\"} 0\n",
        "qcow_metal_http_gzip_responses_total 2\n",
        "qcow_metal_http_scrape_encode_seconds_count 1\n",
        "qcow_metal_guest_uptime_seconds 12.5\n",
        "qcow_metal_build_info{version=\"0.1.0\"} 1\n",
        "qcow_metal_net_bytes_total{interface=\"eth0\",direction=\"out\"} 90000\n",
    ] {
        assert!(t.contains(line), "missing {line:?} in\n{t}");
    }
    assert!(!t.contains("Mirage_qcow"));
    // Family names are unique.
    let exp = parse::parse(&t, Format::Text).unwrap();
    let mut names: Vec<&str> = exp.families.iter().map(|f| f.name.as_str()).collect();
    let n = names.len();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), n);
}

#[test]
fn mirage_families_share_our_counts() {
    let p = populated_guest(true);
    let t = p.text(Format::Text);
    for line in [
        "# TYPE Mirage_qcow_reads counter\nMirage_qcow_reads{id=\"disk0\"} 512\n",
        "Mirage_qcow_writes{id=\"disk0\"} 4096\n",
        "Mirage_qcow_discards{id=\"disk0\"} 4096\n",
        "Mirage_qcow_junk{id=\"disk0\"} 131072\n",
        "Mirage_qcow_erased{id=\"disk0\"} 131072\n",
        "Mirage_qcow_available{id=\"disk0\"} 65536\n",
        "Mirage_qcow_roots{id=\"disk0\"} 0\n",
        "Mirage_qcow_copied{id=\"disk0\"} 65536\n",
        "Mirage_qcow_flushed{id=\"disk0\"} 65536\n",
        "Mirage_qcow_referenced{id=\"disk0\"} 65536\n",
        "# TYPE Mirage_qcow_used gauge\nMirage_qcow_used{id=\"disk0\"} 196608\n",
        "# TYPE Mirage_qcow_size gauge\nMirage_qcow_size{id=\"disk0\"} 458752\n",
        "# TYPE Mirage_qcow_junk_now gauge\nMirage_qcow_junk_now{id=\"disk0\"} 196608\n",
        "Mirage_qcow_available_now{id=\"disk0\"} 131072\n",
        "# TYPE Mirage_qcow_compacting gauge\nMirage_qcow_compacting{id=\"disk0\"} 1\n",
    ] {
        assert!(t.contains(line), "missing {line:?}");
    }
    assert_eq!(t.matches("# TYPE Mirage_qcow_").count(), 15);
    let om = p.text(Format::OpenMetrics);
    assert!(om.contains("# TYPE Mirage_qcow_reads unknown\n"));
    assert!(om.contains("Mirage_qcow_reads{id=\"disk0\"} 512\n"));
    assert!(om.ends_with("# EOF\n"));
}

#[test]
fn serve_negotiates_the_format() {
    let p = populated_guest(false);
    let mut out = Vec::new();
    let ct = p.m.serve(
        "application/openmetrics-text; version=1.0.0",
        &p.scrape(),
        &mut out,
    );
    assert_eq!(ct, CONTENT_TYPE_OPENMETRICS);
    assert!(out.ends_with(b"# EOF\n"));
    assert!(
        p.render(Format::Text)
            .starts_with(b"# HELP qcow_metal_disk_requests_total ")
    );
}

/// Runs `promtool check metrics` on `input`; returns (success, combined output).
fn promtool_check(input: &[u8]) -> (bool, String) {
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    let mut child = match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => panic!(
            "cannot run promtool ({e}): install Debian's `prometheus` package (apt-get install prometheus)"
        ),
    };
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn promtool_finds_nothing_in_the_default_output() {
    let p = populated_guest(false);
    let (ok, report) = promtool_check(&p.render(Format::Text));
    assert!(ok && report.trim().is_empty(), "promtool says:\n{report}");
}

#[test]
fn promtool_only_flags_the_mirage_counters() {
    let p = populated_guest(true);
    let (_, report) = promtool_check(&p.render(Format::Text));
    let lines: Vec<&str> = report.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty());
    for line in lines {
        assert!(
            line.contains("Mirage_qcow_") && line.contains("_total"),
            "unexpected promtool finding: {line}"
        );
    }
}

#[test]
fn every_http_status_has_a_series() {
    let p = populated_guest(false);
    let exp = parse::parse(&p.text(Format::Text), Format::Text).unwrap();
    for status in Status::ALL {
        let mut code = String::new();
        core::fmt::Write::write_fmt(&mut code, format_args!("{}", status.code())).unwrap();
        assert!(
            exp.value("qcow_metal_http_requests_total", &[("code", &code)])
                .is_some(),
            "HTTP status {code} has no qcow_metal_http_requests_total series"
        );
    }
}

#[test]
fn every_nbd_command_and_error_has_a_series() {
    let mut p = populated_guest(false);
    for (i, cmd) in Command::ALL.into_iter().enumerate() {
        p.nbd.requests[cmd.index()] = 10 + i as u64;
    }
    for (i, e) in NbdError::ALL.into_iter().enumerate() {
        p.nbd.errors[e.index()] = 100 + i as u64;
    }
    p.nbd.bytes_written = 4096;
    let exp = parse::parse(&p.text(Format::Text), Format::Text).unwrap();
    for (i, cmd) in Command::ALL.into_iter().enumerate() {
        let v = exp.value(
            "qcow_metal_nbd_requests_total",
            &[("export", "disk0"), ("command", cmd.name())],
        );
        assert_eq!(v, Some(10.0 + i as f64), "{}", cmd.name());
    }
    for (i, e) in NbdError::ALL.into_iter().enumerate() {
        let v = exp.value(
            "qcow_metal_nbd_errors_total",
            &[("export", "disk0"), ("error", e.name())],
        );
        assert_eq!(v, Some(100.0 + i as f64), "{}", e.name());
    }
    assert_eq!(
        exp.value("qcow_metal_nbd_bytes_total", &[("op", "write")]),
        Some(4096.0)
    );
}

#[test]
fn engine_families_count_reclaim_in_bytes() {
    let mut p = populated_guest(false);
    p.space.free_clusters = 1;
    p.stats = Stats {
        clusters_allocated: 6,
        metadata_bytes_written: 8192,
        reclaim_junk: 3,
        reclaim_referenced: 1,
        reclaim_junk_now: 2,
        ..Stats::default()
    };
    let exp = parse::parse(&p.text(Format::Text), Format::Text).unwrap();
    let disk = [("disk", "disk0")];
    let v = |name: &str| exp.value(name, &disk);
    assert_eq!(
        v("qcow_metal_disk_reclaim_junk_bytes"),
        Some(2.0 * 65536.0),
        "junk now, in bytes"
    );
    assert_eq!(
        v("qcow_metal_disk_reclaim_available_bytes"),
        Some(65536.0),
        "free clusters inside the extent, in bytes"
    );
    assert_eq!(v("qcow_metal_disk_free_clusters"), Some(1.0));
    assert_eq!(v("qcow_metal_disk_clusters_allocated_total"), Some(6.0));
    assert_eq!(
        v("qcow_metal_disk_metadata_written_bytes_total"),
        Some(8192.0)
    );
    for (stage, bytes) in [
        ("junk", 3.0 * 65536.0),
        ("erased", 0.0),
        ("referenced", 65536.0),
    ] {
        assert_eq!(
            exp.value(
                "qcow_metal_disk_reclaim_bytes_total",
                &[("disk", "disk0"), ("stage", stage)]
            ),
            Some(bytes),
            "{stage}"
        );
    }
}

#[test]
fn a_raw_disk_is_all_data_and_no_counters() {
    let p = populated_guest(false);
    let mut s = p.scrape();
    s.disk.engine = EngineFigures::raw(1 << 20);
    let text = String::from_utf8(p.m.render(Format::Text, &s)).unwrap();
    let exp = parse::parse(&text, Format::Text).unwrap();
    let disk = [("disk", "disk0")];
    assert_eq!(
        exp.value("qcow_metal_disk_data_bytes", &disk),
        Some(1048576.0)
    );
    assert_eq!(
        exp.value("qcow_metal_disk_image_extent_bytes", &disk),
        Some(1048576.0)
    );
    assert_eq!(
        exp.value("qcow_metal_disk_cluster_size_bytes", &disk),
        Some(0.0)
    );
    assert_eq!(
        exp.value("qcow_metal_disk_clusters_allocated_total", &disk),
        Some(0.0)
    );
}

#[test]
fn failed_requests_count_as_errors_only() {
    use crate::block::{BlockDevice, MemDisk};
    use crate::disk::{RawDisk, VirtualDisk};
    let p = populated_guest(false);
    let m = GuestMetrics::new(&GuestConfig {
        disk: "d",
        device: "vda",
        interface: "eth0",
        version: "0",
        mirage: false,
        clock: test_clock,
    });
    let mut ro = MemDisk::fixed(8192);
    ro.set_read_only(true);
    let mut disk = Instrumented::new(RawDisk::new(ro), m.disk.clone(), test_clock);
    assert!(disk.write(0, &[1; 512]).is_err());
    assert!(disk.discard(0, 512).is_err());
    assert!(disk.write_zeroes(0, 512, true).is_err());
    assert!(disk.read(8000, &mut [0; 512]).is_err());
    disk.read(0, &mut [0; 512]).unwrap();
    let r = &m.disk.requests;
    for op in [IoOp::Write, IoOp::Discard, IoOp::WriteZeroes] {
        assert_eq!(
            (r.requests(op), r.errors(op), r.bytes(op)),
            (0, 1, 0),
            "{op:?}"
        );
        assert_eq!(r.latency(op).count(), 0);
    }
    assert_eq!((r.requests(IoOp::Read), r.errors(IoOp::Read)), (1, 1));
    assert_eq!(r.bytes(IoOp::Read), 512);
    // Block status is passed through, uncounted.
    disk.block_status(0, 512).unwrap();
    assert_eq!(r.requests(IoOp::Read), 1);

    // The device wrapper counts one request per call.
    let mut dev = InstrumentedDevice::new(MemDisk::fixed(4096), m.blockdev.clone(), test_clock);
    dev.write_at(0, &[7; 1024]).unwrap();
    dev.read_at(0, &mut [0; 100]).unwrap();
    dev.flush().unwrap();
    assert!(dev.read_at(4000, &mut [0; 100]).is_err());
    let b = &m.blockdev.requests;
    assert_eq!((b.requests(IoOp::Write), b.bytes(IoOp::Write)), (1, 1024));
    assert_eq!((b.requests(IoOp::Read), b.errors(IoOp::Read)), (1, 1));
    assert_eq!((b.requests(IoOp::Flush), b.bytes(IoOp::Flush)), (1, 0));
    let text = String::from_utf8(m.render(Format::Text, &p.scrape())).unwrap();
    assert!(!text.contains("_bytes_total{disk=\"d\",op=\"flush\"}"));
    assert!(!text.contains("_bytes_total{device=\"vda\",op=\"flush\"}"));
    assert!(text.contains("qcow_metal_blockdev_requests_total{device=\"vda\",op=\"flush\"} 1\n"));
}

#[test]
fn encodes_into_any_fmt_write_sink() {
    /// A fixed buffer: the encoder needs nothing but `write_str`.
    struct Fixed {
        buf: [u8; 128 * 1024],
        len: usize,
    }
    impl core::fmt::Write for Fixed {
        fn write_str(&mut self, s: &str) -> core::fmt::Result {
            let end = self.len + s.len();
            if end > self.buf.len() {
                return Err(core::fmt::Error);
            }
            self.buf[self.len..end].copy_from_slice(s.as_bytes());
            self.len = end;
            Ok(())
        }
    }
    let p = populated_guest(true);
    for format in [Format::Text, Format::OpenMetrics] {
        let mut sink = alloc::boxed::Box::new(Fixed {
            buf: [0; 128 * 1024],
            len: 0,
        });
        p.m.encode(&mut Encoder::new(&mut *sink, format), &p.scrape())
            .unwrap();
        assert_eq!(&sink.buf[..sink.len], &p.render(format)[..]);
        // A sink that fills up makes encoding fail instead of panicking.
        let mut small = Fixed {
            buf: [0; 128 * 1024],
            len: 128 * 1024 - 100,
        };
        assert!(
            p.m.encode(&mut Encoder::new(&mut small, format), &p.scrape())
                .is_err()
        );
    }
}

#[test]
fn the_parser_reads_both_formats_of_the_exposition() {
    let p = populated_guest(true);
    for format in [Format::Text, Format::OpenMetrics] {
        let text = p.text(format);
        let exp = parse::parse(&text, format).unwrap_or_else(|e| panic!("{format:?}: {e}\n{text}"));
        assert_eq!(
            exp.value(
                "qcow_metal_disk_bytes_total",
                &[("disk", "disk0"), ("op", "write")]
            ),
            Some(4096.0)
        );
        assert_eq!(
            exp.value("Mirage_qcow_reads", &[("id", "disk0")]),
            Some(512.0)
        );
        let counter_family = match format {
            Format::Text => "qcow_metal_disk_requests_total",
            Format::OpenMetrics => "qcow_metal_disk_requests",
        };
        assert_eq!(exp.family(counter_family).unwrap().kind, "counter");
    }
}

#[test]
fn backing_layer_reads_have_a_series_per_depth_and_pass_promtool() {
    let mut p = populated_guest(false);
    // Without a backing file: depth 0 only.
    assert!(
        p.text(Format::Text)
            .contains("qcow_metal_disk_layer_read_bytes_total{disk=\"disk0\",depth=\"0\"}")
    );
    assert!(!p.text(Format::Text).contains("depth=\"1\""));
    p.stats.chain_layers = 3;
    p.stats.layer_data_bytes_read[0] = 4096;
    p.stats.layer_data_bytes_read[1] = 65536;
    let text = p.text(Format::Text);
    assert!(
        text.contains("qcow_metal_disk_layer_read_bytes_total{disk=\"disk0\",depth=\"2\"} 65536"),
        "{text}"
    );
    let (ok, report) = promtool_check(text.as_bytes());
    assert!(ok && report.trim().is_empty(), "promtool says:\n{report}");
}
