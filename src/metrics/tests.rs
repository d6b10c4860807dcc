//! Encoder tests: both formats, histogram rules, escaping, family kinds.

use super::*;
use alloc::string::String;
use alloc::sync::Arc;

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
