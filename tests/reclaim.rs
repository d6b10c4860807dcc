//! Space comes back, end to end under TCG: the guest's online compaction after a large trim.
//!
//! - [`an_idle_guest_compacts_after_a_large_trim`]: 256 MiB written over NBD to a 512 MiB
//!   disk, flushed, the first 192 MiB trimmed and flushed; NBD reads every 300 ms for 5 s
//!   keep the pass waiting (nothing copied); then the client goes quiet. Within 60 s the image extent (`qcow_metal_disk_image_extent_bytes`) is under 80 MiB and
//!   all six reclaim stages have moved; the live 64 MiB read back over NBD, the trimmed part
//!   reads as zeros; the pass ends (state `idle`, a pass counted, the `Mirage_qcow_*`
//!   families agree). After a clean shutdown `qemu-img check` is clean, the host file is cut
//!   to the image end offset it reports, and `qemu-img compare` finds the image equal to a
//!   model raw file.
//! - [`sigkill_during_compaction_loses_nothing_flushed`]: the same workload with a slow
//!   compaction rate, QEMU killed (SIGKILL) while the pass moves clusters; `qemu-img check`
//!   finds no corruption and the image equals the flushed model; the next boot finishes the
//!   pass (extent under 80 MiB within 60 s), shuts down cleanly, and the image is clean
//!   and still equal.

use qcow_metal::metrics::parse::Exposition;
use qcow_metal::nbd::proto::CMD_WRITE;
use qcow_metal_e2e::{
    Guest, ScratchDir, boot, guest, nbd_client, run_tool_output, shut_down_cleanly,
};
use qcow_metal_runner::scrape::{Url, scrape};
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
/// Virtual size of the disk.
const SIZE: u64 = 512 * MIB;
/// Bytes written from the start of the disk.
const FILLED: u64 = 256 * MIB;
/// Bytes trimmed from the start of the disk: what stays live is `TRIMMED..FILLED`.
const TRIMMED: u64 = 192 * MIB;
/// The image extent compaction must get under.
const EXTENT_GOAL: u64 = 80 * MIB;
/// How long an idle guest may take to get there.
const COMPACT_WITHIN: Duration = Duration::from_secs(60);
/// NBD writes in flight while filling.
const WINDOW: usize = 4;

/// The bytes of the `i`-th MiB of the disk: 64-bit words that name the MiB and the word.
fn mib_pattern(i: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(MIB as usize);
    for w in 0..MIB / 8 {
        let word = (i << 40) ^ (w.wrapping_mul(0x9e37_79b9)) ^ 0x5151_0000_0000_a5a5;
        v.extend_from_slice(&word.to_le_bytes());
    }
    v
}

/// Writes `FILLED` bytes in 1 MiB writes (a few in flight), flushes, trims the first
/// `TRIMMED` bytes and flushes again; every request must succeed.
fn fill_and_trim(guest: &Guest) {
    let started = Instant::now();
    let mut nbd = nbd_client(guest.nbd_port());
    let mut scratch = Vec::new();
    let mut inflight = 0;
    for i in 0..FILLED / MIB {
        if inflight == WINDOW {
            let r = nbd.recv(&mut scratch).expect("NBD write reply");
            assert_eq!(r.error, 0, "an NBD write failed");
            inflight -= 1;
        }
        nbd.send(CMD_WRITE, 0, i * MIB, MIB as u32, &mib_pattern(i))
            .expect("sending an NBD write");
        inflight += 1;
    }
    for _ in 0..inflight {
        let r = nbd.recv(&mut scratch).expect("NBD write reply");
        assert_eq!(r.error, 0, "an NBD write failed");
    }
    assert_eq!(nbd.flush().expect("NBD flush"), 0, "flush after the fill");
    let wrote = started.elapsed();
    for chunk in 0..TRIMMED / (64 * MIB) {
        let e = nbd
            .trim(chunk * 64 * MIB, (64 * MIB) as u32)
            .expect("NBD trim");
        assert_eq!(e, 0, "trim of 64 MiB at {} MiB", chunk * 64);
    }
    assert_eq!(nbd.flush().expect("NBD flush"), 0, "flush after the trim");
    nbd.disconnect().expect("NBD disconnect");
    eprintln!(
        "reclaim: wrote {} MiB in {:.1} s, trimmed {} MiB in {:.1} s",
        FILLED / MIB,
        wrote.as_secs_f64(),
        TRIMMED / MIB,
        (started.elapsed() - wrote).as_secs_f64()
    );
}

/// The live data reads back over NBD; the trimmed part reads as zeros.
fn read_back(guest: &Guest) {
    let mut nbd = nbd_client(guest.nbd_port());
    let mut buf = vec![0u8; MIB as usize];
    for i in TRIMMED / MIB..FILLED / MIB {
        assert_eq!(nbd.read(i * MIB, &mut buf).expect("NBD read"), 0);
        assert!(
            buf == mib_pattern(i),
            "MiB {i} does not read back as written"
        );
    }
    for i in (0..TRIMMED / MIB).step_by(7) {
        assert_eq!(nbd.read(i * MIB, &mut buf).expect("NBD read"), 0);
        assert!(
            buf.iter().all(|&b| b == 0),
            "trimmed MiB {i} does not read as zeros"
        );
    }
    nbd.disconnect().expect("NBD disconnect");
}

/// The guest's `/metrics`, parsed.
fn metrics(guest: &Guest) -> Exposition {
    let url = Url::parse(&guest.metrics_url()).expect("the guest's metrics URL");
    scrape(&url).unwrap_or_else(|e| panic!("scraping {url}: {e}"))
}

/// One sample's value (every family here has exactly one series per label set).
fn value(exp: &Exposition, name: &str, labels: &[(&str, &str)]) -> u64 {
    exp.value(name, labels)
        .unwrap_or_else(|| panic!("{name}{labels:?} missing from /metrics")) as u64
}

/// The reclaim stages as the guest counts them, in bytes.
fn stages(exp: &Exposition) -> Vec<(&'static str, u64)> {
    [
        "junk",
        "erased",
        "available",
        "copied",
        "flushed",
        "referenced",
    ]
    .into_iter()
    .map(|stage| {
        (
            stage,
            value(
                exp,
                "qcow_metal_disk_reclaim_bytes_total",
                &[("stage", stage)],
            ),
        )
    })
    .collect()
}

/// Waits (at most [`COMPACT_WITHIN`]) until the image extent is under [`EXTENT_GOAL`] and,
/// with `all_stages`, every reclaim stage has moved; returns the last scrape. Fails with
/// what it saw.
fn wait_for_compaction(guest: &mut Guest, all_stages: bool) -> Exposition {
    let started = Instant::now();
    loop {
        let exp = metrics(guest);
        let extent = value(&exp, "qcow_metal_disk_image_extent_bytes", &[]);
        let st = stages(&exp);
        if extent < EXTENT_GOAL && (!all_stages || st.iter().all(|&(_, v)| v > 0)) {
            eprintln!(
                "reclaim: extent {} MiB after {:.1} s; stages {st:?}",
                extent / MIB,
                started.elapsed().as_secs_f64()
            );
            return exp;
        }
        if started.elapsed() > COMPACT_WITHIN {
            panic!(
                "after {COMPACT_WITHIN:?} of idle the image extent is {extent} bytes (goal: under \
                 {EXTENT_GOAL}); stages {st:?}; compaction state {}\n{}",
                compaction_state(&exp),
                guest.tail()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `qemu-img check --output=json` on `image`: (exit status, report).
fn qemu_img_check(image: &Path) -> (i32, Value) {
    let out = std::process::Command::new(qcow_metal_e2e::require_tool("qemu-img", "qemu-utils"))
        .args(["check", "--output=json", "-f", "qcow2"])
        .arg(image)
        .output()
        .expect("running qemu-img check");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "qemu-img check printed no JSON ({e}):\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), report)
}

/// A raw file of the disk as it must read: the live part, zeros elsewhere (sparse).
fn write_model(path: &Path) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::File::create(path).expect("creating the model");
    f.set_len(SIZE).expect("sizing the model");
    f.seek(SeekFrom::Start(TRIMMED)).unwrap();
    for i in TRIMMED / MIB..FILLED / MIB {
        f.write_all(&mib_pattern(i)).expect("writing the model");
    }
}

/// `qemu-img compare` of the image with the model: identical (status 0).
fn assert_equals_model(image: &Path, model: &Path) {
    let image = image.to_str().unwrap();
    let model = model.to_str().unwrap();
    let out = run_tool_output(
        "qemu-img",
        "qemu-utils",
        &["compare", "-f", "qcow2", "-F", "raw", image, model],
    );
    assert!(
        out.success,
        "qemu-img compare: the image differs from the model:\n{}{}",
        out.stdout, out.stderr
    );
}

/// After a clean shutdown: `qemu-img check` exits 0 (or 3, leaks only, with `allow_leaks`:
/// what a crash between allocating a copy and referencing it leaves, as with QEMU) and the
/// host file is cut to the image end offset it reports (and so is under the goal).
fn assert_clean_and_cut(image: &Path, allow_leaks: bool) {
    let (status, report) = qemu_img_check(image);
    assert_eq!(
        report["corruptions"].as_u64().unwrap_or(0),
        0,
        "qemu-img check found corruption: {report}"
    );
    assert!(
        status == 0 || (allow_leaks && status == 3),
        "qemu-img check exited {status}: {report}"
    );
    let end = report["image-end-offset"]
        .as_u64()
        .unwrap_or_else(|| panic!("no image-end-offset in {report}"));
    let len = std::fs::metadata(image).expect("the image file").len();
    eprintln!("reclaim: host file {len} bytes, image end offset {end}");
    assert!(end < EXTENT_GOAL, "image end offset {end}");
    assert_eq!(
        len, end,
        "the host file is not cut to the image end offset after a clean shutdown"
    );
}

/// The state `qcow_metal_disk_compaction_state` says compaction is in.
fn compaction_state(exp: &Exposition) -> String {
    let on: Vec<_> = exp
        .find("qcow_metal_disk_compaction_state", &[])
        .filter(|s| s.value == 1.0)
        .map(|s| s.label("state").unwrap_or("?").to_string())
        .collect();
    assert_eq!(on.len(), 1, "exactly one compaction state is 1: {on:?}");
    on.into_iter().next().unwrap()
}

/// NBD reads every 300 ms for 5 s keep a pass waiting: nothing is copied meanwhile.
fn requests_hold_compaction_back(guest: &Guest) {
    let mut nbd = nbd_client(guest.nbd_port());
    let mut buf = vec![0u8; 4096];
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        assert_eq!(nbd.read(TRIMMED, &mut buf).expect("NBD read"), 0);
        std::thread::sleep(Duration::from_millis(300));
    }
    let exp = metrics(guest);
    assert_eq!(
        value(
            &exp,
            "qcow_metal_disk_reclaim_bytes_total",
            &[("stage", "copied")]
        ),
        0,
        "compaction moved clusters while NBD requests kept coming"
    );
    assert_eq!(compaction_state(&exp), "waiting");
    nbd.disconnect().expect("NBD disconnect");
}

#[test]
fn an_idle_guest_compacts_after_a_large_trim() {
    let dir = ScratchDir::new("reclaim");
    let image = dir.path().join("disk.qcow2");
    let (mut g, _) = boot(guest().size(SIZE).disk(&image).append("mirage_metrics=1"));
    fill_and_trim(&g);
    requests_hold_compaction_back(&g);
    let exp = wait_for_compaction(&mut g, true);
    let available = value(&exp, "qcow_metal_disk_reclaim_available_bytes", &[]);
    let extent = value(&exp, "qcow_metal_disk_image_extent_bytes", &[]);
    assert!(
        available < extent,
        "available {available} >= extent {extent}"
    );
    // The pass ends (nothing left to move): the state goes back to idle, a pass is counted,
    // and ocaml-qcow's families say the same as ours.
    let started = Instant::now();
    let exp = loop {
        let exp = metrics(&g);
        if compaction_state(&exp) == "idle" {
            break exp;
        }
        assert!(
            started.elapsed() < COMPACT_WITHIN,
            "the compaction pass did not end: {}",
            compaction_state(&exp)
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(value(&exp, "qcow_metal_disk_compaction_passes_total", &[]) >= 1);
    assert_eq!(value(&exp, "Mirage_qcow_compacting", &[]), 0);
    for stage in ["junk", "copied", "referenced"] {
        assert_eq!(
            value(&exp, &format!("Mirage_qcow_{stage}"), &[]),
            value(
                &exp,
                "qcow_metal_disk_reclaim_bytes_total",
                &[("stage", stage)]
            ),
            "{stage}"
        );
    }
    read_back(&g);
    shut_down_cleanly(&mut g);
    drop(g);
    assert_clean_and_cut(&image, false);
    let model = dir.path().join("model.raw");
    write_model(&model);
    assert_equals_model(&image, &model);
}

#[test]
fn sigkill_during_compaction_loses_nothing_flushed() {
    let dir = ScratchDir::new("reclaim-kill");
    let image = dir.path().join("disk.qcow2");
    let model = dir.path().join("model.raw");
    write_model(&model);
    // A slow pass (64 MiB to move at 8 MiB/s) leaves seconds to kill it in the middle.
    let (mut g, _) = boot(guest().size(SIZE).disk(&image).append("compact_rate=8M"));
    fill_and_trim(&g);
    let started = Instant::now();
    let (copied, extent) = loop {
        let exp = metrics(&g);
        let copied = value(
            &exp,
            "qcow_metal_disk_reclaim_bytes_total",
            &[("stage", "copied")],
        );
        let extent = value(&exp, "qcow_metal_disk_image_extent_bytes", &[]);
        assert!(
            extent >= EXTENT_GOAL,
            "compaction finished before the kill (extent {extent}): nothing was tested"
        );
        if copied >= 8 * MIB {
            break (copied, extent);
        }
        assert!(
            started.elapsed() < COMPACT_WITHIN,
            "compaction did not start within {COMPACT_WITHIN:?}\n{}",
            g.tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    g.kill();
    drop(g);
    eprintln!(
        "reclaim: killed QEMU with {} MiB copied, extent {} MiB",
        copied / MIB,
        extent / MIB
    );
    let (status, report) = qemu_img_check(&image);
    assert_eq!(
        report["corruptions"].as_u64().unwrap_or(0),
        0,
        "qemu-img check found corruption: {report}"
    );
    assert!(
        status == 0 || status == 3,
        "qemu-img check exited {status} after the kill (0 or 3, leaks, expected): {report}"
    );
    assert_equals_model(&image, &model);

    // The next boot finishes the pass on its own, and leaves the image clean.
    let (mut g, _) = boot(guest().size(SIZE).disk(&image));
    wait_for_compaction(&mut g, false);
    read_back(&g);
    shut_down_cleanly(&mut g);
    drop(g);
    assert_clean_and_cut(&image, true);
    assert_equals_model(&image, &model);
}
