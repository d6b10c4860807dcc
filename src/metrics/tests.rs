//! Encoder tests: both formats, histogram rules, escaping, family kinds.

use super::*;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;

fn text(reg: &Registry, format: Format) -> String {
    String::from_utf8(reg.render(format)).unwrap()
}

#[test]
fn counter_family_in_both_formats() {
    let mut f: Family<Counter> =
        Family::new("t_read_bytes", "Bytes read.", &["disk", "op"]).unit("bytes");
    let a = f.child(&["vda", "read"]);
    let b = f.child(&["we\"ird\\\nname", "write"]);
    a.add(4096);
    b.inc();
    let mut reg = Registry::new();
    reg.register(f);
    assert_eq!(
        text(&reg, Format::Text),
        "# HELP t_read_bytes_total Bytes read.\n\
         # TYPE t_read_bytes_total counter\n\
         t_read_bytes_total{disk=\"vda\",op=\"read\"} 4096\n\
         t_read_bytes_total{disk=\"we\\\"ird\\\\\\nname\",op=\"write\"} 1\n"
    );
    assert_eq!(
        text(&reg, Format::OpenMetrics),
        "# TYPE t_read_bytes counter\n\
         # UNIT t_read_bytes bytes\n\
         # HELP t_read_bytes Bytes read.\n\
         t_read_bytes_total{disk=\"vda\",op=\"read\"} 4096\n\
         t_read_bytes_total{disk=\"we\\\"ird\\\\\\nname\",op=\"write\"} 1\n\
         # EOF\n"
    );
}

#[test]
fn histogram_is_cumulative_with_inf_equal_to_count() {
    let mut f: Family<Histogram> =
        Family::new("t_latency_seconds", "Latency.", &["op"]).unit("seconds");
    let h = f.histogram(&["read"], || Histogram::new(&[0.001, 0.01, 1.0], 1e-9));
    for ns in [500_000u64, 1_000_000, 5_000_000, 2_000_000_000, 20_000_000] {
        h.observe(ns);
    }
    let mut reg = Registry::new();
    reg.register(f);
    let want_samples = "t_latency_seconds_bucket{op=\"read\",le=\"0.001\"} 2\n\
         t_latency_seconds_bucket{op=\"read\",le=\"0.01\"} 3\n\
         t_latency_seconds_bucket{op=\"read\",le=\"1.0\"} 4\n\
         t_latency_seconds_bucket{op=\"read\",le=\"+Inf\"} 5\n\
         t_latency_seconds_sum{op=\"read\"} 2.0265\n\
         t_latency_seconds_count{op=\"read\"} 5\n";
    let t = text(&reg, Format::Text);
    assert!(
        t.starts_with("# HELP t_latency_seconds Latency.\n# TYPE t_latency_seconds histogram\n")
    );
    assert!(t.ends_with(want_samples), "{t}");
    let om = text(&reg, Format::OpenMetrics);
    assert!(om.starts_with(
        "# TYPE t_latency_seconds histogram\n# UNIT t_latency_seconds seconds\n# HELP t_latency_seconds Latency.\n"
    ));
    assert!(
        om.ends_with(&alloc::format!("{want_samples}# EOF\n")),
        "{om}"
    );
}

#[test]
fn histogram_of_bytes_has_integer_sum_and_unlabelled_le() {
    let mut f: Family<Histogram> = Family::new("t_size_bytes", "Sizes.", &[]).unit("bytes");
    let h = f.histogram(&[], || Histogram::new(&[512.0, 4096.0], 1.0));
    h.observe(512);
    h.observe(100_000);
    let mut reg = Registry::new();
    reg.register(f);
    let t = text(&reg, Format::Text);
    assert!(t.contains("t_size_bytes_bucket{le=\"512.0\"} 1\n"));
    assert!(t.contains("t_size_bytes_bucket{le=\"4096.0\"} 1\n"));
    assert!(t.contains("t_size_bytes_bucket{le=\"+Inf\"} 2\n"));
    assert!(t.contains("t_size_bytes_sum 100512\n"));
    assert!(t.contains("t_size_bytes_count 2\n"));
}

#[test]
fn gauges_info_and_legacy_counters() {
    let mut g: Family<Gauge> = Family::new("t_in_flight", "In flight.", &[]);
    g.child(&[]).set(-3);
    let mut fg: Family<FloatGauge> = Family::new("t_uptime_seconds", "Up.", &[]).unit("seconds");
    fg.child(&[]).set(1.25);
    let mut info: Family<InfoValue> = Family::new("t_build", "Build.", &["version"]);
    info.child(&["0.1.0"]);
    let mut legacy: Family<LegacyCounter> =
        Family::new("Mirage_qcow_reads", "Bytes read.", &["id"]).unit("bytes");
    legacy.child(&["disk"]).0.add(7);
    let mut reg = Registry::new();
    reg.register(g);
    reg.register(fg);
    reg.register(info);
    reg.register(legacy);
    assert_eq!(
        text(&reg, Format::Text),
        "# HELP t_in_flight In flight.\n# TYPE t_in_flight gauge\nt_in_flight -3\n\
         # HELP t_uptime_seconds Up.\n# TYPE t_uptime_seconds gauge\nt_uptime_seconds 1.25\n\
         # HELP t_build_info Build.\n# TYPE t_build_info gauge\nt_build_info{version=\"0.1.0\"} 1\n\
         # HELP Mirage_qcow_reads Bytes read.\n# TYPE Mirage_qcow_reads counter\n\
         Mirage_qcow_reads{id=\"disk\"} 7\n"
    );
    assert_eq!(
        text(&reg, Format::OpenMetrics),
        "# TYPE t_in_flight gauge\n# HELP t_in_flight In flight.\nt_in_flight -3\n\
         # TYPE t_uptime_seconds gauge\n# UNIT t_uptime_seconds seconds\n# HELP t_uptime_seconds Up.\n\
         t_uptime_seconds 1.25\n\
         # TYPE t_build info\n# HELP t_build Build.\nt_build_info{version=\"0.1.0\"} 1\n\
         # TYPE Mirage_qcow_reads unknown\n# HELP Mirage_qcow_reads Bytes read.\n\
         Mirage_qcow_reads{id=\"disk\"} 7\n# EOF\n"
    );
}

#[test]
fn empty_registry_and_shared_children() {
    let reg = Registry::new();
    assert_eq!(text(&reg, Format::Text), "");
    assert_eq!(text(&reg, Format::OpenMetrics), "# EOF\n");

    // A child can be shared by two families' owners and is updated lock-free from anywhere.
    let shared = Arc::new(Counter::new());
    let mut f: Family<Counter> = Family::new("t_x", "X.", &["a"]);
    f.add(&["1"], shared.clone());
    shared.add(5);
    let mut reg = Registry::new();
    reg.register(f);
    assert!(text(&reg, Format::Text).contains("t_x_total{a=\"1\"} 5\n"));
    assert_eq!(reg.names(), ["t_x"]);
}

#[test]
fn help_escaping_per_format() {
    let mut f: Family<Gauge> = Family::new("t_h", "a \\ b\nc \"d\"", &[]);
    f.child(&[]);
    let mut reg = Registry::new();
    reg.register(f);
    assert!(text(&reg, Format::Text).starts_with("# HELP t_h a \\\\ b\\nc \"d\"\n"));
    assert!(text(&reg, Format::OpenMetrics).contains("# HELP t_h a \\\\ b\\nc \\\"d\\\"\n"));
}

/// A fake monotonic clock for tests: advances 1.5 µs per call.
fn test_clock() -> u64 {
    use core::sync::atomic::{AtomicU64, Ordering};
    static NOW: AtomicU64 = AtomicU64::new(0);
    NOW.fetch_add(1_500, Ordering::Relaxed)
}

/// A guest registry with every family populated with non-trivial values.
pub(crate) fn populated_guest(mirage: bool) -> GuestMetrics {
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
    m.disk.update(&EngineSnapshot {
        virtual_size: 1 << 30,
        cluster_size: 65536,
        data_bytes: 3 * 65536,
        metadata_bytes: 4 * 65536,
        image_extent: 7 * 65536,
        free_clusters: 2,
        clusters_allocated: 9,
        clusters_freed: 2,
        cow_bytes: 61440,
        l2_cache_hits: 100,
        l2_cache_misses: 3,
        refcount_cache_hits: 50,
        refcount_cache_misses: 1,
        metadata_written_bytes: 196608,
        reclaim: [131072, 131072, 65536, 65536, 65536, 65536],
        reclaim_roots: 65536,
        overlaps_refused: 1,
        junk_bytes: 3 * 65536,
        available_bytes: 2 * 65536,
        compaction: crate::compaction::CompactionState::Running,
        compaction_passes: 2,
    });
    m.blockdev.submitted();
    m.blockdev.record(IoOp::Read, 4096, 80_000, true);
    m.blockdev.record(IoOp::Write, 65536, 2_000_000, true);
    m.blockdev.record(IoOp::Flush, 0, 9_000_000, true);
    m.blockdev.record(IoOp::Write, 512, 1_000, false);
    m.nbd.update(&NbdSnapshot {
        connections_active: 1,
        connections_total: 3,
        sessions_total: 2,
        protocol_errors: 1,
        requests: [10, 5, 1, 2, 1, 1, 4, 1],
        errors: [0, 0, 1, 0, 0, 0, 0],
        bytes: [40960, 20480, 4096, 4096],
    });
    let mut http = HttpSnapshot {
        bad_requests: 1,
        timeouts: 1,
        bytes_received: 1000,
        bytes_sent: 50000,
        gzip_responses: 2,
        ..HttpSnapshot::default()
    };
    assert!(http.set_code(200, 7));
    assert!(http.set_code(404, 1));
    assert!(!http.set_code(418, 1));
    m.http.update(&http);
    m.system.update(&SystemSnapshot {
        uptime_seconds: 12.5,
        heap_size: 64 << 20,
        heap_used: 3 << 20,
        rx_packets: 100,
        tx_packets: 90,
        rx_bytes: 10000,
        tx_bytes: 90000,
    });
    // One render so the scrape-encode histogram has an observation.
    let _ = m.render(Format::Text);
    m
}

#[test]
fn guest_registry_counts_requests_exactly() {
    let m = populated_guest(false);
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

    let t = String::from_utf8(m.render(Format::Text)).unwrap();
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
        "qcow_metal_http_scrape_encode_seconds_count 1\n",
        "qcow_metal_guest_uptime_seconds 12.5\n",
        "qcow_metal_build_info{version=\"0.1.0\"} 1\n",
        "qcow_metal_net_bytes_total{interface=\"eth0\",direction=\"out\"} 90000\n",
    ] {
        assert!(t.contains(line), "missing {line:?} in\n{t}");
    }
    assert!(!t.contains("Mirage_qcow"));
    // Family names are unique.
    let mut names = m.registry().names();
    let n = names.len();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), n);
}

#[test]
fn mirage_families_share_our_counts() {
    let m = populated_guest(true);
    let t = String::from_utf8(m.render(Format::Text)).unwrap();
    for line in [
        "# TYPE Mirage_qcow_reads counter\nMirage_qcow_reads{id=\"disk0\"} 512\n",
        "Mirage_qcow_writes{id=\"disk0\"} 4096\n",
        "Mirage_qcow_discards{id=\"disk0\"} 4096\n",
        "Mirage_qcow_junk{id=\"disk0\"} 131072\n",
        "Mirage_qcow_erased{id=\"disk0\"} 131072\n",
        "Mirage_qcow_available{id=\"disk0\"} 65536\n",
        "Mirage_qcow_roots{id=\"disk0\"} 65536\n",
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
    let om = String::from_utf8(m.render(Format::OpenMetrics)).unwrap();
    assert!(om.contains("# TYPE Mirage_qcow_reads unknown\n"));
    assert!(om.contains("Mirage_qcow_reads{id=\"disk0\"} 512\n"));
    assert!(om.ends_with("# EOF\n"));
}

#[test]
fn global_render_before_and_after_install() {
    // Before installation (no other test installs) the exposition is empty.
    if installed().is_none() {
        assert_eq!(render(Format::OpenMetrics), b"# EOF\n");
    }
    let m = install(populated_guest(false));
    assert!(core::ptr::eq(m, installed().unwrap()));
    let text = render(Format::Text);
    assert!(text.starts_with(b"# HELP qcow_metal_disk_requests_total "));
    let mut out = Vec::new();
    let ct = m.serve("application/openmetrics-text; version=1.0.0", &mut out);
    assert_eq!(ct, CONTENT_TYPE_OPENMETRICS);
    assert!(out.ends_with(b"# EOF\n"));
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
    let m = populated_guest(false);
    let text = m.render(Format::Text);
    let (ok, report) = promtool_check(&text);
    assert!(ok && report.trim().is_empty(), "promtool says:\n{report}");
}

#[test]
fn promtool_only_flags_the_mirage_counters() {
    let m = populated_guest(true);
    let (_, report) = promtool_check(&m.render(Format::Text));
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
    for status in crate::http::Status::ALL {
        assert!(
            families::HTTP_CODES.contains(&status.code()),
            "HTTP status {} has no qcow_metal_http_requests_total series",
            status.code()
        );
    }
    let stats = crate::http::HttpStats::new();
    let snap = HttpSnapshot::from(&stats.snapshot());
    assert_eq!(snap, HttpSnapshot::default());
}

#[test]
fn every_nbd_command_and_error_has_a_series() {
    use crate::nbd::{Command, NbdError, NbdStats};
    let mut stats = NbdStats::default();
    for (i, cmd) in Command::ALL.into_iter().enumerate() {
        assert!(
            families::NBD_COMMANDS.contains(&cmd.name()),
            "{}",
            cmd.name()
        );
        stats.requests[cmd.index()] = 10 + i as u64;
    }
    for (i, e) in NbdError::ALL.into_iter().enumerate() {
        assert!(families::NBD_ERRORS.contains(&e.name()), "{}", e.name());
        stats.errors[e.index()] = 100 + i as u64;
    }
    stats.bytes_written = 4096;
    let snap = NbdSnapshot::from(&stats);
    let m = populated_guest(false);
    m.nbd.update(&snap);
    let text = String::from_utf8(m.render(Format::Text)).unwrap();
    let exp = parse::parse(&text, Format::Text).unwrap();
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
fn engine_snapshot_from_qcow2_counts_reclaim_in_bytes() {
    let space = crate::qcow2::SpaceInfo {
        virtual_size: 1 << 30,
        cluster_size: 65536,
        data_bytes: 2 * 65536,
        metadata_bytes: 4 * 65536,
        image_extent: 7 * 65536,
        free_clusters: 1,
    };
    let stats = crate::qcow2::Stats {
        clusters_allocated: 6,
        cow_bytes: 512,
        l2_cache_misses: 2,
        metadata_bytes_written: 8192,
        reclaim_junk: 3,
        reclaim_referenced: 1,
        reclaim_junk_now: 2,
        compaction_state: crate::qcow2::CompactionState::Running,
        ..crate::qcow2::Stats::default()
    };
    let s = EngineSnapshot::from_qcow2(&space, &stats);
    assert_eq!(s.junk_bytes, 2 * 65536, "junk now, in bytes");
    assert_eq!(
        s.available_bytes, 65536,
        "free clusters inside the extent, in bytes"
    );
    assert_eq!(s.compaction, crate::compaction::CompactionState::Running);
    assert_eq!(s.image_extent, 7 * 65536);
    assert_eq!(s.free_clusters, 1);
    assert_eq!(s.clusters_allocated, 6);
    assert_eq!(s.metadata_written_bytes, 8192);
    assert_eq!(s.reclaim, [3 * 65536, 0, 0, 0, 0, 65536]);
}

#[test]
fn failed_requests_count_as_errors_only() {
    use crate::block::{BlockDevice, MemDisk};
    use crate::disk::{RawDisk, VirtualDisk};
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
    let text = String::from_utf8(m.render(Format::Text)).unwrap();
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
    let m = populated_guest(true);
    for format in [Format::Text, Format::OpenMetrics] {
        let mut sink = alloc::boxed::Box::new(Fixed {
            buf: [0; 128 * 1024],
            len: 0,
        });
        m.registry().encode(format, &mut *sink).unwrap();
        assert_eq!(&sink.buf[..sink.len], &m.registry().render(format)[..]);
        // A sink that fills up makes encoding fail instead of panicking.
        let mut small = Fixed {
            buf: [0; 128 * 1024],
            len: 128 * 1024 - 100,
        };
        assert!(m.registry().encode(format, &mut small).is_err());
    }
}
