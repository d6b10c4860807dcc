//! Device errors end to end: the guest's disk file lives on a host filesystem that fills up.
//!
//! A 40 MiB tmpfs is mounted in a scratch directory (the test runs as root; it fails with a
//! clear message otherwise) and a 1 GiB qcow2 image is created there by the runner. The guest
//! boots on it and a client writes 1 MiB blocks of a position-dependent pattern over NBD,
//! with a FLUSH every few MiB, until the filesystem is full. The image's file grows when the
//! guest asks (`crate::hostfile` of the runner), never past the filesystem's free space: the
//! first failure is a growth the runner refuses (the guest's write gets `ENOSPC`) or, when
//! the tmpfs fills before that, a host write that fails. Then:
//! - the failing request gets an NBD error (`ENOSPC` or `EIO`) promptly, not a hang (QEMU
//!   runs the drive with `werror=report`, so the guest sees an I/O error instead of being
//!   paused);
//! - QEMU's run state (QMP `query-status`) stays `running`, `/metrics` keeps answering and
//!   counts the failures (`qcow_metal_blockdev_errors_total`, `qcow_metal_disk_errors_total`,
//!   `qcow_metal_nbd_errors_total` equal to the error replies the client received);
//! - every acknowledged write reads back over NBD;
//! - once the filesystem is grown (`mount -o remount,size=`), the write that failed succeeds
//!   and a FLUSH succeeds: the engine was not wedged by the failures;
//! - after a clean shutdown, `qemu-img check` finds no corruption (leaks would be allowed)
//!   and the image, converted by `qemu-img`, holds every written byte.

use qcow_metal::metrics::Format;
use qcow_metal::metrics::parse::{Exposition, parse};
use qcow_metal::nbd::client::{Client, ClientOptions};
use qcow_metal_e2e::{
    NBD_EXPORT, ScratchDir, boot, guest, qemu_img_check_json, qemu_img_to_raw, require_tool,
    run_tool, shut_down_cleanly,
};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
/// Size of the tmpfs the image lives on.
const TMPFS_MIB: u64 = 40;
/// Virtual size of the image: far more than the tmpfs holds.
const IMAGE_SIZE: u64 = 1 << 30;
/// Bytes per NBD write.
const BLOCK: u64 = MIB;
/// A FLUSH after every this many writes.
const FLUSH_EVERY: u64 = 4;
/// How long one NBD request may take before the test calls it a hang. Under TCG a 1 MiB
/// write takes well under a second; a paused VM never answers.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The failing request must be answered within this (a generous bound, far below a hang).
const ERROR_WITHIN: Duration = Duration::from_secs(10);

/// The NBD errors the test expects for a full host filesystem.
const EIO: u32 = 5;
const ENOSPC: u32 = 28;

/// A tmpfs mounted on a directory, unmounted on drop (even when the test fails).
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `mib` MiB on `dir` (created if missing).
    fn mount(dir: &Path, mib: u64) -> Tmpfs {
        std::fs::create_dir_all(dir).expect("creating the tmpfs mount point");
        let size = format!("size={mib}m");
        run_tool(
            "mount",
            "mount",
            &["-t", "tmpfs", "-o", &size, "tmpfs", dir.to_str().unwrap()],
        );
        Tmpfs {
            dir: dir.to_path_buf(),
        }
    }

    /// Gives the mounted tmpfs a new size limit.
    fn resize(&self, mib: u64) {
        let opts = format!("remount,size={mib}m");
        run_tool("mount", "mount", &["-o", &opts, self.dir.to_str().unwrap()]);
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let dir = self.dir.to_str().unwrap();
        let ok = Command::new("umount")
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Still busy (a process holding a file): detach it now, freed when released.
            let _ = Command::new("umount").args(["-l", dir]).status();
        }
    }
}

/// Fails the test unless it runs as root (mounting a tmpfs needs it).
fn require_root() {
    let status = std::fs::read_to_string("/proc/self/status").expect("reading /proc/self/status");
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().nth(1))
        .expect("no Uid line in /proc/self/status");
    assert_eq!(
        euid, "0",
        "this test mounts a small tmpfs to fill up and must run as root (effective uid is {euid})"
    );
}

/// The bytes block `index` holds: each 8-byte word is its own byte offset, mixed, so that
/// every position (and a block landing at the wrong place) is told apart.
fn pattern(index: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(BLOCK as usize);
    let base = index * BLOCK;
    for w in 0..BLOCK / 8 {
        let x = (base + w * 8) ^ 0x5eed_f011_d15c_0000;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v
}

/// `GET /metrics` on the guest with a timeout; the parsed exposition.
fn scrape(port: u16) -> Exposition {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .unwrap_or_else(|e| panic!("connecting to /metrics on port {port}: {e}"));
    s.set_read_timeout(Some(REQUEST_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(REQUEST_TIMEOUT)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: guest\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .unwrap_or_else(|e| panic!("/metrics did not answer after the device errors: {e}"));
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("/metrics: no HTTP header: {text}"));
    assert!(head.starts_with("HTTP/1.1 200"), "/metrics: {head}");
    parse(body, Format::Text).unwrap_or_else(|e| panic!("/metrics exposition: {e}\n{body}"))
}

/// Sum of the samples of `name` with `labels`.
fn total(exp: &Exposition, name: &str, labels: &[(&str, &str)]) -> f64 {
    exp.find(name, labels).map(|s| s.value).sum()
}

/// Reads blocks `0..blocks` over NBD and checks their patterns.
fn read_back(client: &mut Client, blocks: u64, when: &str) {
    let mut buf = vec![0u8; BLOCK as usize];
    for i in 0..blocks {
        let err = client
            .read(i * BLOCK, &mut buf)
            .unwrap_or_else(|e| panic!("NBD read of block {i} {when}: {e}"));
        assert_eq!(err, 0, "NBD read of block {i} {when}: error {err}");
        assert!(
            buf == pattern(i),
            "block {i} (offset {}) reads back wrong {when}",
            i * BLOCK
        );
    }
}

/// What `qemu-img check --output=json` found: (corruptions, leaks, check errors, report).
fn qemu_img_check(image: &Path) -> (u64, u64, u64, String) {
    let out = qemu_img_check_json(image);
    let v: Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "qemu-img check gave no JSON report ({e}):\n{}{}",
            out.stdout, out.stderr
        )
    });
    let n = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    (
        n("corruptions"),
        n("leaks"),
        n("check-errors"),
        format!("{}{}", out.stdout, out.stderr),
    )
}

#[test]
fn a_full_host_filesystem_gives_errors_not_a_paused_guest() {
    require_root();
    require_tool("umount", "mount");
    require_tool("qemu-img", "qemu-utils");
    // Dropped last to first: the guest (QEMU killed), then the tmpfs, then the directory.
    let scratch = ScratchDir::new("device-errors");
    let fs = Tmpfs::mount(&scratch.path().join("tmpfs"), TMPFS_MIB);
    let image = fs.dir.join("disk.qcow2");
    let (mut guest, _) = boot(guest().disk(&image).size(IMAGE_SIZE));

    let opts = ClientOptions {
        timeout: Some(REQUEST_TIMEOUT),
        ..ClientOptions::new(NBD_EXPORT)
    };
    let mut client = Client::connect_with(("127.0.0.1", guest.nbd_port()), &opts)
        .unwrap_or_else(|e| panic!("NBD handshake: {e}"));
    let hang = |what: String| {
        move |e: std::io::Error| -> u32 {
            panic!("{what}: no answer within {REQUEST_TIMEOUT:?} (a paused guest?): {e}")
        }
    };

    // Fill the filesystem: 1 MiB writes, a FLUSH every few.
    let mut written = 0u64; // blocks acknowledged
    let mut flushed = 0u64; // blocks made durable by a successful FLUSH
    let mut errors = Vec::new(); // (command, errno)
    let limit = 4 * TMPFS_MIB; // blocks: the tmpfs must be full long before
    let (failed_at, took) = loop {
        assert!(
            written < limit,
            "{limit} MiB written to a {TMPFS_MIB} MiB tmpfs without an error"
        );
        let t = Instant::now();
        let err = client
            .write(written * BLOCK, &pattern(written), false)
            .unwrap_or_else(hang(format!("write of block {written}")));
        if err != 0 {
            errors.push(("write", err));
            break (written, t.elapsed());
        }
        written += 1;
        if written.is_multiple_of(FLUSH_EVERY) {
            let t = Instant::now();
            let err = client
                .flush()
                .unwrap_or_else(hang(format!("flush after block {written}")));
            if err != 0 {
                errors.push(("flush", err));
                break (written, t.elapsed());
            }
            flushed = written;
        }
    };
    let (op, errno) = errors[0];
    eprintln!(
        "device_errors: {op} failed with errno {errno} after {written} MiB acknowledged \
         ({flushed} MiB flushed), answered in {took:?}"
    );
    assert!(
        errno == ENOSPC || errno == EIO,
        "{op} failed with errno {errno}, not ENOSPC ({ENOSPC}) or EIO ({EIO})"
    );
    if op == "flush" {
        assert_eq!(errno, EIO, "a failed FLUSH must be EIO");
    }
    assert!(
        took < ERROR_WITHIN,
        "the failing {op} took {took:?} to answer"
    );
    assert!(
        written + 8 >= TMPFS_MIB,
        "the first error came after only {written} MiB on a {TMPFS_MIB} MiB tmpfs: not a full \
         filesystem"
    );

    // The filesystem is still full: the write fails again, and a FLUSH either makes the
    // acknowledged writes durable or fails with EIO.
    let err = client
        .write(failed_at * BLOCK, &pattern(failed_at), false)
        .unwrap_or_else(hang("the write again".into()));
    assert!(
        err == ENOSPC || err == EIO,
        "the write on a full filesystem gave errno {err}"
    );
    errors.push(("write", err));
    let err = client
        .flush()
        .unwrap_or_else(hang("a flush on the full filesystem".into()));
    match err {
        0 => eprintln!("device_errors: a FLUSH on the full filesystem succeeded"),
        EIO => errors.push(("flush", err)),
        other => panic!("a FLUSH on a full filesystem gave errno {other}, not 0 or EIO"),
    }

    assert!(
        errors.iter().any(|&(op, e)| op == "write" && e == ENOSPC),
        "no write got ENOSPC on the full filesystem (the engine's rule: a failed write into \
         newly allocated clusters is ENOSPC): {errors:?}"
    );

    // The VM runs, /metrics answers and counts what happened.
    let status = guest
        .qmp()
        .expect("QMP")
        .query_status()
        .expect("query-status");
    assert!(
        status.running && status.status == "running",
        "QEMU's run state after the device errors: {status:?} (werror=report missing?)"
    );
    let m = scrape(guest.metrics_port());
    let device_write_errors = total(&m, "qcow_metal_blockdev_errors_total", &[("op", "write")]);
    let refused = guest
        .serial_log()
        .contains("the host could not grow the disk's file");
    assert!(
        device_write_errors > 0.0 || refused,
        "neither a refused growth on the console nor a device write error \
         (qcow_metal_blockdev_errors_total{{op=\"write\"}} is {device_write_errors})"
    );
    eprintln!(
        "device_errors: growth refused: {refused}, device write errors: {device_write_errors}"
    );
    let disk_errors = total(&m, "qcow_metal_disk_errors_total", &[]);
    assert!(
        disk_errors >= errors.len() as f64,
        "qcow_metal_disk_errors_total is {disk_errors}, the client saw {} errors",
        errors.len()
    );
    for (name, code) in [("ENOSPC", ENOSPC), ("EIO", EIO)] {
        let seen = errors.iter().filter(|(_, e)| *e == code).count() as f64;
        let counted = total(&m, "qcow_metal_nbd_errors_total", &[("error", name)]);
        assert_eq!(
            counted, seen,
            "qcow_metal_nbd_errors_total{{error=\"{name}\"}} against the client's replies"
        );
    }

    // Acknowledged writes read back while the filesystem is full.
    read_back(&mut client, written, "on the full filesystem");

    // More room: the failed write now succeeds and a FLUSH makes everything durable.
    fs.resize(4 * TMPFS_MIB);
    let err = client
        .write(failed_at * BLOCK, &pattern(failed_at), false)
        .unwrap_or_else(hang("the write after growing the filesystem".into()));
    assert_eq!(
        err, 0,
        "the write after growing the filesystem: errno {err}"
    );
    written = failed_at + 1;
    let err = client
        .flush()
        .unwrap_or_else(hang("the flush after growing the filesystem".into()));
    assert_eq!(
        err, 0,
        "the flush after growing the filesystem: errno {err}"
    );
    flushed = written;
    client.disconnect().expect("NBD disconnect");

    shut_down_cleanly(&mut guest);
    drop(guest);

    let (corruptions, leaks, check_errors, report) = qemu_img_check(&image);
    assert!(
        corruptions == 0 && check_errors == 0,
        "qemu-img check after the device errors:\n{report}"
    );
    eprintln!("device_errors: qemu-img check: no corruption, {leaks} leaked clusters");

    // Off the tmpfs: the virtual disk as QEMU reads it holds every flushed block.
    let raw = scratch.path().join("disk.raw");
    qemu_img_to_raw(&image, &raw);
    let mut f = std::fs::File::open(&raw).unwrap();
    let mut buf = vec![0u8; BLOCK as usize];
    for i in 0..flushed {
        f.read_exact(&mut buf).unwrap();
        assert!(
            buf == pattern(i),
            "block {i} (offset {}) of the converted image is not what was flushed",
            i * BLOCK
        );
    }
}
