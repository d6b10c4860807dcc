//! The `qcow-metal` command under faults, run as a user runs it (the built binary): a
//! SIGKILLed runner takes QEMU along and its private directory goes at the next run; a
//! second runner on a busy image is refused without touching the first one's QMP socket or
//! serial log; a FIFO as `--disk` is refused at once; a failed `image create` leaves no
//! file; the image tools end quietly when their reader goes away (`| head -1`).

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use qcow_metal_runner::qmp::Qmp;
use qcow_metal_runner::rundir::alive;
use qcow_metal_runner::{kernel, ports};

/// Guard against hangs (never a timed assert): a TCG boot takes about a second.
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

mod common;
use common::{RUNNER, Runner};

impl Runner {
    /// Runs the runner with `args` and `TMPDIR` set to `tmpdir`.
    fn start(args: &[&str], tmpdir: &Path) -> Runner {
        let mut cmd = Command::new(RUNNER);
        cmd.args(args).env("TMPDIR", tmpdir);
        Runner::spawn(cmd)
    }

    /// The QEMU process this runner started (its child).
    fn qemu_pid(&self) -> u32 {
        let me = self.child.id();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // `pid (comm) state ppid ...`
            let Some((comm, rest)) = stat.split_once(" (").and_then(|(_, r)| r.rsplit_once(')'))
            else {
                continue;
            };
            let ppid = rest
                .split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<u32>().ok());
            if ppid == Some(me) && comm.starts_with("qemu") {
                return pid;
            }
        }
        panic!("no QEMU child of the runner (pid {me}):\n{}", self.stderr());
    }
}

/// Sends SIGTERM (the runner must power the guest down cleanly).
fn terminate(pid: u32) {
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill is missing: install the Debian package procps");
    assert!(status.success());
}

/// The runners' private directories under `tmpdir` (see `qcow_metal_runner::rundir`).
fn private_dirs(tmpdir: &Path) -> Vec<PathBuf> {
    let uid = std::fs::metadata("/proc/self").unwrap().uid();
    match std::fs::read_dir(tmpdir.join(format!("qcow-metal-{uid}"))) {
        Ok(entries) => entries.flatten().map(|e| e.path()).collect(),
        Err(_) => Vec::new(),
    }
}

fn run_args<'a>(
    kernel: &'a str,
    disk: &'a str,
    qmp: &'a str,
    log: &'a str,
    ports: &'a [String; 2],
) -> Vec<&'a str> {
    vec![
        "run",
        "--kernel",
        kernel,
        "--accel",
        "tcg",
        "--memory",
        "128",
        "--disk",
        disk,
        "--size",
        "64M",
        "--qmp",
        qmp,
        "--serial-log",
        log,
        "--metrics-port",
        &ports[0],
        "--nbd-port",
        &ports[1],
    ]
}

fn free_ports() -> [String; 2] {
    let a = ports::pick_free().unwrap();
    let b = loop {
        let b = ports::pick_free().unwrap();
        if b != a {
            break b;
        }
    };
    [a.to_string(), b.to_string()]
}

#[test]
fn a_killed_runner_takes_qemu_along_and_a_refused_one_leaves_the_first_alone() {
    let kernel = kernel::shared_kernel().expect("building the kernel");
    let kernel = kernel.to_str().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let tmpdir = scratch.path().join("tmp");
    std::fs::create_dir(&tmpdir).unwrap();
    let disk = scratch.path().join("disk.qcow2");
    // The QMP socket and serial log in directories nobody created (as in a fresh clone).
    let qmp = scratch.path().join("qmp-dir").join("qmp.sock");
    let log = scratch.path().join("fresh").join("logs").join("serial.log");
    let (disk_s, qmp_s, log_s) = (
        disk.to_str().unwrap(),
        qmp.to_str().unwrap(),
        log.to_str().unwrap(),
    );

    let ports_a = free_ports();
    let mut a = Runner::start(&run_args(kernel, disk_s, qmp_s, log_s, &ports_a), &tmpdir);
    a.wait_for("press Ctrl-C", BOOT_TIMEOUT);
    let qemu_a = a.qemu_pid();
    let log_before = std::fs::read_to_string(&log).unwrap();
    assert!(log_before.contains("ready in"), "{log_before}");

    // A second runner on the same image, same QMP socket and serial log: refused, and the
    // first guest's files are untouched.
    let ports_b = free_ports();
    let mut b = Runner::start(&run_args(kernel, disk_s, qmp_s, log_s, &ports_b), &tmpdir);
    let status = b.wait_exit(Duration::from_secs(60));
    let err = b.stderr();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("lock") && err.contains("another qcow-metal"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let log_after = std::fs::read_to_string(&log).unwrap();
    assert!(
        log_after.starts_with(&log_before),
        "the first guest's serial log was truncated:\n{log_after}"
    );
    let status = Qmp::connect(&qmp)
        .and_then(|mut q| q.query_status())
        .expect("the first guest's QMP socket must still answer");
    assert!(status.running, "{status:?}");

    // SIGKILL the first runner: QEMU goes too; its private directory stays for now.
    let dir_a: Vec<_> = private_dirs(&tmpdir)
        .into_iter()
        .filter(|d| {
            d.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{}-", a.child.id())))
        })
        .collect();
    assert_eq!(dir_a.len(), 1, "{:?}", private_dirs(&tmpdir));
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(qemu_a) {
        assert!(
            Instant::now() < deadline,
            "QEMU (pid {qemu_a}) outlived its SIGKILLed runner"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(dir_a[0].exists(), "a SIGKILLed runner cannot clean up");

    // The next runner boots on the released image, removes the stale directory, and shuts
    // down cleanly on SIGTERM (leaving nothing behind).
    let ports_c = free_ports();
    let mut c = Runner::start(&run_args(kernel, disk_s, qmp_s, log_s, &ports_c), &tmpdir);
    c.wait_for("press Ctrl-C", BOOT_TIMEOUT);
    assert!(
        !dir_a[0].exists(),
        "the killed runner's directory survived the next run"
    );
    terminate(c.child.id());
    let status = c.wait_exit(BOOT_TIMEOUT);
    assert!(status.success(), "{status}\n{}", c.stderr());
    assert!(c.stderr().contains("clean"), "{}", c.stderr());
    assert_eq!(private_dirs(&tmpdir), Vec::<PathBuf>::new());
    let check = Command::new("qemu-img")
        .args(["check", "-f", "qcow2", disk_s])
        .output()
        .expect("qemu-img is missing: install the Debian package qemu-utils");
    assert!(
        check.status.success(),
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
}

#[test]
fn a_fifo_as_disk_is_refused_at_once() {
    let scratch = tempfile::tempdir().unwrap();
    let fifo = scratch.path().join("disk.fifo");
    let made = Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo is missing: install the Debian package coreutils");
    assert!(made.success());
    let ports = free_ports();
    let mut r = Runner::start(
        &[
            "run",
            "--disk",
            fifo.to_str().unwrap(),
            "--kernel",
            "/nonexistent/kernel",
            "--accel",
            "tcg",
            "--metrics-port",
            &ports[0],
            "--nbd-port",
            &ports[1],
        ],
        scratch.path(),
    );
    let status = r.wait_exit(Duration::from_secs(30));
    let err = r.stderr();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("FIFO") && err.contains("regular file") && err.contains("disk.fifo"),
        "{err}"
    );
}

#[test]
fn image_tools_refuse_a_fifo_and_repair_refuses_a_busy_image() {
    let scratch = tempfile::tempdir().unwrap();
    let fifo = scratch.path().join("image.fifo");
    let made = Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo is missing: install the Debian package coreutils");
    assert!(made.success());
    for args in [&["check"][..], &["check", "--repair"], &["info"], &["map"]] {
        let mut r = Runner::start(
            &[&["image"][..], args, &[fifo.to_str().unwrap()]].concat(),
            scratch.path(),
        );
        let status = r.wait_exit(Duration::from_secs(30));
        let err = r.stderr();
        assert_eq!(status.code(), Some(1), "image {args:?}: {err}");
        assert!(err.contains("FIFO"), "image {args:?}: {err}");
    }
    // A guest holds the image (its runner's lock): --repair is refused, check still reads.
    let image = scratch.path().join("busy.qcow2");
    qcow_metal_runner::disk::create_qcow2(&image, 8 << 20, 65536, 16).unwrap();
    let lock = qcow_metal_runner::guard::lock_disk(&image, false).unwrap();
    let image_s = image.to_str().unwrap();
    let out = Command::new(RUNNER)
        .args(["image", "check", "--repair", image_s])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("lock") && err.contains("another qcow-metal"),
        "{err}"
    );
    let out = Command::new(RUNNER)
        .args(["image", "check", image_s])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    drop(lock);
    let out = Command::new(RUNNER)
        .args(["image", "check", "--repair", image_s])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn a_failed_create_leaves_no_file() {
    let scratch = tempfile::tempdir().unwrap();
    let path = scratch.path().join("huge.qcow2");
    let out = Command::new(RUNNER)
        .args(["image", "create", path.to_str().unwrap(), "--size", "8E"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("huge.qcow2"), "{err}");
    let left: Vec<_> = std::fs::read_dir(scratch.path()).unwrap().collect();
    assert!(left.is_empty(), "a failed create left {left:?}");
    // And a boot on the path does not find a 0-byte leftover: it creates a real image.
    let existing = scratch.path().join("empty.img");
    std::fs::write(&existing, b"").unwrap();
    let out = Command::new(RUNNER)
        .args([
            "image",
            "create",
            existing.to_str().unwrap(),
            "--size",
            "1M",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(std::fs::metadata(&existing).unwrap().len(), 0);
}

#[test]
fn image_tools_end_quietly_when_their_reader_goes_away() {
    let scratch = tempfile::tempdir().unwrap();
    let image = scratch.path().join("d.qcow2");
    let image_s = image.to_str().unwrap();
    let out = Command::new(RUNNER)
        .args(["image", "create", image_s, "--size", "64M"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    for tool in ["check", "info", "map"] {
        // A reader that is already gone: every write fails with EPIPE.
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let mut child = Command::new(RUNNER)
            .args(["image", tool, image_s])
            .stdout(writer)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        let status = child.wait().unwrap();
        assert!(err.is_empty(), "image {tool} on a closed pipe said: {err}");
        assert_eq!(status.code(), Some(141), "image {tool}");
        // And as a user writes it.
        let out = Command::new("sh")
            .args([
                "-c",
                &format!("\"$0\" image {tool} \"$1\" | head -1"),
                RUNNER,
                image_s,
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && err.is_empty(),
            "image {tool} | head -1: {err}"
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);
    }
}
