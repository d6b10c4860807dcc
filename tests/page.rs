//! The guest's live page (`/`) in a real browser: headless Chromium loads it from a booted
//! guest while an NBD client keeps the disk busy, runs its script (which scrapes `/metrics`
//! every two seconds), and the test checks the rendered DOM: the script refreshed several
//! times without an error and every chart drew data. It also takes a screenshot, kept in a
//! scratch directory, or written where `QCOW_METAL_SCREENSHOT` says (a path relative to the
//! repository root, e.g. `QCOW_METAL_SCREENSHOT=doc/page.png`, which is how the README's
//! picture is made).
//!
//! Chromium runs with virtual time (`--virtual-time-budget`): its timers run as fast as the
//! page's fetches allow, so the test does not wait for real seconds; the page computes its
//! rates from the guest's own uptime, so they stay true.

use qcow_metal_e2e::{
    ScratchDir, TOOL_TIMEOUT, boot, guest, nbd_client, require_tool, run_tool_output,
    shut_down_cleanly,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// Virtual milliseconds Chromium gives the page before it dumps the DOM or takes the
/// screenshot: about ten refreshes.
const VIRTUAL_TIME_MS: u32 = 20_000;

/// The charts the page draws, by title (each must show data).
const CHARTS: &[&str] = &[
    "Disk requests",
    "Disk throughput",
    "Device throughput (virtio-blk)",
    "Disk latency",
    "Space",
    "Space reclaim",
    "NBD clients and errors",
    "HTTP",
];

/// Runs headless Chromium on `url` with `extra` arguments and its profile in `profile`;
/// returns its standard output. Fails, naming the Debian package, when it is missing.
fn chromium(profile: &Path, url: &str, extra: &[&str]) -> String {
    let budget = format!("--virtual-time-budget={VIRTUAL_TIME_MS}");
    let profile = format!("--user-data-dir={}", profile.display());
    let mut args = vec![
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--no-first-run",
        "--hide-scrollbars",
        &budget,
        &profile,
    ];
    args.extend_from_slice(extra);
    args.push(url);
    let out = run_tool_output("chromium", "chromium", &args);
    assert!(
        out.success,
        "chromium {} failed:\n{}",
        args.join(" "),
        out.stderr
    );
    out.stdout
}

/// The value of `attr="..."` on the `<body>` element of `dom`.
fn body_attribute<'a>(dom: &'a str, attr: &str) -> &'a str {
    let body = &dom[dom.find("<body").expect("the DOM has a body")..];
    let body = &body[..body.find('>').unwrap()];
    let key = format!("{attr}=\"");
    let value = &body[body
        .find(&key)
        .unwrap_or_else(|| panic!("<body> has no {attr}: {body}"))
        + key.len()..];
    &value[..value.find('"').unwrap()]
}

/// The inner markup of the `<svg>` that follows the chart title `title`.
fn chart<'a>(dom: &'a str, title: &str) -> &'a str {
    let head = format!("<h2>{title} (");
    let head = dom
        .find(&head)
        .or_else(|| dom.find(&format!("<h2>{title}</h2>")))
        .unwrap_or_else(|| panic!("no chart titled {title:?} in the DOM"));
    let svg = &dom[head..];
    let svg = &svg[svg.find("<svg").unwrap()..];
    &svg[..svg.find("</svg>").expect("the chart's svg ends")]
}

/// The y coordinates of every polyline point and circle of a chart.
fn plotted_ys(svg: &str) -> Vec<f64> {
    let mut ys = Vec::new();
    for (i, _) in svg.match_indices("points=\"") {
        let points = &svg[i + 8..];
        for point in points[..points.find('"').unwrap()].split(' ') {
            let (_, y) = point.split_once(',').expect("a point is x,y");
            ys.push(y.parse().expect("a numeric coordinate"));
        }
    }
    for (i, _) in svg.match_indices(" cy=\"") {
        let y = &svg[i + 5..];
        ys.push(
            y[..y.find('"').unwrap()]
                .parse()
                .expect("a numeric coordinate"),
        );
    }
    ys
}

/// Where the screenshot goes: `QCOW_METAL_SCREENSHOT` (relative to the repository root) or
/// the scratch directory.
fn screenshot_path(scratch: &Path) -> PathBuf {
    match std::env::var_os("QCOW_METAL_SCREENSHOT") {
        Some(p) => Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(p),
        None => scratch.join("page.png"),
    }
}

#[test]
fn live_page_draws_charts_in_chromium() {
    // Before booting anything: a missing browser fails at once, naming its package.
    require_tool("chromium", "chromium");
    let scratch = ScratchDir::new("page");
    let (mut g, _) = boot(guest());
    let url = format!("http://127.0.0.1:{}/", g.metrics_port());

    // A client that writes, reads, discards and flushes until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let requests = Arc::new(AtomicU64::new(0));
    let traffic = {
        let (stop, requests, port) = (stop.clone(), requests.clone(), g.nbd_port());
        thread::spawn(move || {
            let mut c = nbd_client(port);
            let block = vec![0x5au8; 64 << 10];
            let mut buf = vec![0u8; 64 << 10];
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let offset = (i % 256) * (64 << 10);
                assert_eq!(c.write(offset, &block, false).unwrap(), 0);
                assert_eq!(c.read(offset, &mut buf).unwrap(), 0);
                assert_eq!(buf, block);
                if i % 8 == 7 {
                    assert_eq!(c.trim(offset, 64 << 10).unwrap(), 0);
                    assert_eq!(c.flush().unwrap(), 0);
                }
                i += 1;
                requests.store(i, Ordering::Relaxed);
            }
            c.disconnect().unwrap();
        })
    };
    // Let the client get going, so that the first scrapes already see traffic.
    let started = Instant::now();
    while requests.load(Ordering::Relaxed) < 16 {
        assert!(!traffic.is_finished(), "the NBD client stopped early");
        assert!(started.elapsed() < TOOL_TIMEOUT, "no NBD traffic");
        thread::sleep(Duration::from_millis(20));
    }

    let dom = chromium(scratch.path(), &url, &["--dump-dom"]);
    let shot = screenshot_path(scratch.path());
    let size = "--window-size=1280,880";
    let shot_arg = format!("--screenshot={}", shot.display());
    chromium(scratch.path(), &url, &[size, &shot_arg]);

    stop.store(true, Ordering::Relaxed);
    traffic.join().expect("the NBD client");
    shut_down_cleanly(&mut g);

    // The script ran, refreshed several times, and nothing failed.
    let refreshes: u32 = body_attribute(&dom, "data-refreshes").parse().unwrap();
    let status = &dom[dom.find("id=\"status\"").expect("status line")..];
    let status = &status[..status.find('<').unwrap()];
    assert_eq!(
        body_attribute(&dom, "data-errors"),
        "0",
        "the page reported errors: {status}"
    );
    assert!(
        refreshes >= 3,
        "the page refreshed {refreshes} times: {status}"
    );
    // Every chart drew data; the request and throughput charts above zero.
    for title in CHARTS {
        let ys = plotted_ys(chart(&dom, title));
        assert!(!ys.is_empty(), "the chart {title:?} shows no data");
        let lowest = ys.iter().cloned().fold(f64::MIN, f64::max);
        let highest = ys.iter().cloned().fold(f64::MAX, f64::min);
        if [
            "Disk requests",
            "Disk throughput",
            "Device throughput (virtio-blk)",
        ]
        .contains(title)
        {
            assert!(
                highest < lowest,
                "the chart {title:?} is flat during NBD traffic"
            );
        }
    }
    assert!(
        dom.contains("<th>export</th><td>disk</td>"),
        "server-rendered facts"
    );

    // The screenshot is a PNG of the page.
    let png = std::fs::read(&shot).expect("chromium wrote the screenshot");
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n"),
        "{} is no PNG",
        shot.display()
    );
    assert!(
        png.len() > 20_000,
        "a {} byte screenshot is blank",
        png.len()
    );
}
