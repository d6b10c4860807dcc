//! Shared helpers of the end-to-end tests: boot guests under QEMU (TCG) through the runner's
//! library and drive them from the host.
//!
//! Tests never skip: a missing host tool fails the test with a message that names the Debian
//! package to install (`bash .ci/setup` installs them all).
//!
//! - Guests: [`guest`] (the test defaults), [`boot`], [`boot_serving`], [`run_to_exit`],
//!   [`shut_down_cleanly`].
//! - Host tools: [`require_tool`], [`run_tool`], [`run_tool_output`], [`qemu_io`].
//! - Images: [`qemu_img_check_json`], [`qemu_img_to_raw`], [`qemu_img_snapshot_raw`].
//! - Dirty bitmaps: [`nbd_dirty_runs`], [`qemu_nbd_dirty_runs`] (`nbdinfo --map`),
//!   [`dirty_runs`], [`merge_runs`].
//! - Prometheus: [`spawn_prometheus`]; the guest's exposition: [`metrics_text`], [`sample`].
//! - NBD: [`nbd_client`] on a guest's export.
//! - Network namespaces: [`in_namespace`] (a guest on a tap, on its own address), [`ip`].
//! - Scratch space: [`ScratchDir`].

use qcow_metal::nbd::client::{Client, ClientOptions};
use qcow_metal_runner::kernel;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

pub use qcow_metal_runner::guest::{Banner, Guest, GuestBuilder};
pub use qcow_metal_runner::qemu::Accel;
pub use qcow_metal_runner::{Error, GuestOutcome};

/// How long a boot may take before a test gives up. A guard against hangs only: under TCG
/// on a loaded two-core machine a boot takes well under a second; tests never assert on time.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

/// How long a test waits for a guest to exit on its own (same kind of guard).
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(300);

/// How long a host tool or an NBD peer may stay silent before a test gives up (a guard
/// against hangs, never a timed assert).
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(900);

/// The name of the guest's NBD export.
pub const NBD_EXPORT: &str = "disk";

/// A guest builder with the test defaults: TCG, free ports, a temporary 64 MiB qcow2 disk.
pub fn guest() -> GuestBuilder {
    Guest::builder()
        .accel(Accel::Tcg)
        .size(64 << 20)
        .shutdown_timeout(Duration::from_secs(120))
}

/// Starts the guest and waits for its banner; panics with the console's tail on failure.
pub fn boot(builder: GuestBuilder) -> (Guest, Banner) {
    let mut guest = builder
        .start()
        .unwrap_or_else(|e| panic!("starting the guest: {e}"));
    let banner = guest
        .wait_for_banner(BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("the guest did not reach its main loop: {e}"));
    (guest, banner)
}

/// [`boot`], then waits until the guest's `/metrics` answers (polled with short timeouts):
/// the guest opens its listeners just after the banner. Not needed to avoid a lost first
/// connection on the user-mode network (the runner gives the guest its address statically,
/// so a connection made right after [`boot`] is answered), but it makes that HTTP request:
/// for tests that do not count the guest's HTTP requests.
pub fn boot_serving(builder: GuestBuilder) -> (Guest, Banner) {
    let (mut guest, banner) = boot(builder);
    guest
        .wait_for_metrics(BOOT_TIMEOUT, || false)
        .unwrap_or_else(|e| panic!("the guest's /metrics did not answer: {e}"));
    (guest, banner)
}

/// Starts the guest and waits for QEMU to exit on its own; returns the guest (for its
/// console) and how it ended.
pub fn run_to_exit(builder: GuestBuilder) -> (Guest, GuestOutcome) {
    let mut guest = builder
        .start()
        .unwrap_or_else(|e| panic!("starting the guest: {e}"));
    let outcome = guest
        .wait_exit(EXIT_TIMEOUT)
        .unwrap_or_else(|e| panic!("the guest did not exit: {e}"));
    (guest, outcome)
}

/// The path of a host program, or a panic naming the Debian package that provides it.
pub fn require_tool(program: &str, package: &str) -> PathBuf {
    qcow_metal_runner::qemu::find_program(program).unwrap_or_else(|| {
        panic!(
            "`{program}` is not installed: install the Debian package {package} \
             (`bash .ci/setup` installs everything the tests need)"
        )
    })
}

/// Shuts the guest down over QMP and fails, with the console's tail, unless it ended cleanly.
pub fn shut_down_cleanly(guest: &mut Guest) {
    let outcome = guest.shutdown().expect("shutting the guest down");
    assert!(outcome.is_clean(), "{outcome:?}\n{}", guest.tail());
}

/// What a host program printed and whether it succeeded.
#[derive(Debug)]
pub struct ToolOutput {
    /// The program exited with status 0.
    pub success: bool,
    /// Its standard output.
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
}

/// Runs a host program to completion, reading its output while it runs (so that a large
/// report cannot fill a pipe and stall it). Fails the test, naming the Debian `package`,
/// when the program is missing or runs longer than [`TOOL_TIMEOUT`].
pub fn run_tool_output(program: &str, package: &str, args: &[&str]) -> ToolOutput {
    let path = require_tool(program, package);
    let mut child = Command::new(&path)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {program} ({e}): install {package}"));
    fn drain(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<String> {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            String::from_utf8_lossy(&bytes).into_owned()
        })
    }
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for a tool") {
            break status;
        }
        if started.elapsed() > TOOL_TIMEOUT {
            let _ = child.kill();
            panic!("`{program} {}` hung for {TOOL_TIMEOUT:?}", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    ToolOutput {
        success: status.success(),
        stdout: stdout.join().expect("reading a tool's output"),
        stderr: stderr.join().expect("reading a tool's output"),
    }
}

/// Runs a host program like [`run_tool_output`] and fails unless it succeeds; returns its
/// standard output.
pub fn run_tool(program: &str, package: &str, args: &[&str]) -> String {
    let out = run_tool_output(program, package, args);
    assert!(
        out.success,
        "`{program} {}` failed:\n{}\n{}",
        args.join(" "),
        out.stdout,
        out.stderr
    );
    out.stdout
}

/// Runs qemu-io on the raw NBD export at `uri`, one `-c` per command, and fails unless every
/// command succeeded (`read -P` verifies its pattern). Returns qemu-io's standard output.
pub fn qemu_io(uri: &str, cmds: &[impl AsRef<str>]) -> String {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.extend(["-c", c.as_ref()]);
    }
    args.push(uri);
    let out = run_tool_output("qemu-io", "qemu-utils", &args);
    assert!(
        out.success && !out.stdout.contains("failed") && !out.stderr.contains("failed"),
        "`qemu-io {}` failed:\n{}\n{}",
        args.join(" "),
        out.stdout,
        out.stderr
    );
    out.stdout
}

/// Runs `qemu-img check -f qcow2 --output=json` on `image` and returns what it printed;
/// the caller judges the exit status (it is non-zero when the check finds problems).
pub fn qemu_img_check_json(image: &Path) -> ToolOutput {
    run_tool_output(
        "qemu-img",
        "qemu-utils",
        &[
            "check",
            "-f",
            "qcow2",
            "--output=json",
            image.to_str().unwrap(),
        ],
    )
}

/// Converts the qcow2 `image` to the raw file `raw` with `qemu-img convert` (the virtual
/// disk as QEMU reads it); fails unless it succeeds.
pub fn qemu_img_to_raw(image: &Path, raw: &Path) {
    qemu_img_convert_to_raw("qcow2", image.to_str().unwrap(), raw);
}

/// `qemu-img convert -f FORMAT -O raw SOURCE RAW`: `source` is a file or a URI (an NBD
/// export is read as `raw`); fails unless it succeeds.
pub fn qemu_img_convert_to_raw(format: &str, source: &str, raw: &Path) {
    run_tool(
        "qemu-img",
        "qemu-utils",
        &[
            "convert",
            "-f",
            format,
            "-O",
            "raw",
            source,
            raw.to_str().unwrap(),
        ],
    );
}

/// `qemu-img convert -l NAME -O raw IMAGE OUT`: the bytes of internal snapshot `name` of the
/// qcow2 `image` as QEMU reads them (converted into `out`).
pub fn qemu_img_snapshot_raw(image: &Path, name: &str, out: &Path) -> Vec<u8> {
    run_tool(
        "qemu-img",
        "qemu-utils",
        &[
            "convert",
            "-l",
            name,
            "-O",
            "raw",
            image.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
    );
    std::fs::read(out).unwrap()
}

/// Byte runs (offset, length) in ascending order, adjacent ones merged into one.
pub fn merge_runs(runs: impl IntoIterator<Item = (u64, u64)>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (off, len) in runs {
        match out.last_mut() {
            Some(last) if last.0 + last.1 == off => last.1 += len,
            _ => out.push((off, len)),
        }
    }
    out
}

/// The dirty runs (offset, length), merged, of `nbdinfo --map=qemu:dirty-bitmap:...` output
/// (lines `offset length type description`; type 1 is dirty).
pub fn dirty_runs(map: &str) -> Vec<(u64, u64)> {
    let dirty = map.lines().filter_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        assert!(f.len() >= 3, "unexpected nbdinfo --map line: {line}");
        let run = || (f[0].parse().unwrap(), f[1].parse().unwrap());
        (f[2] == "1").then(run)
    });
    merge_runs(dirty)
}

/// The dirty runs of bitmap `bitmap` of the NBD export at `uri`
/// (`nbdinfo --map=qemu:dirty-bitmap:BITMAP URI`).
pub fn nbd_dirty_runs(uri: &str, bitmap: &str) -> Vec<(u64, u64)> {
    let ctx = format!("--map=qemu:dirty-bitmap:{bitmap}");
    dirty_runs(&run_tool("nbdinfo", "libnbd-bin", &[&ctx, uri]))
}

/// The dirty runs of persistent bitmap `bitmap` of the qcow2 `image` as QEMU reports them:
/// `nbdinfo --map` over `qemu-nbd -r -B BITMAP IMAGE`.
pub fn qemu_nbd_dirty_runs(image: &Path, bitmap: &str) -> Vec<(u64, u64)> {
    require_tool("qemu-nbd", "qemu-utils");
    let ctx = format!("--map=qemu:dirty-bitmap:{bitmap}");
    let map = run_tool(
        "nbdinfo",
        "libnbd-bin",
        &[
            &ctx,
            "--",
            "[",
            "qemu-nbd",
            "-r",
            "-f",
            "qcow2",
            "-B",
            bitmap,
            image.to_str().unwrap(),
            "]",
        ],
    );
    dirty_runs(&map)
}

/// Starts a Prometheus server (Debian package prometheus) with the configuration file
/// `config`, its data and log (`prometheus.log`) in `dir`, listening on loopback `port`.
pub fn spawn_prometheus(config: &Path, dir: &Path, port: u16) -> Child {
    let binary = require_tool("prometheus", "prometheus");
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    Command::new(binary)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--log.level=warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("starting prometheus (Debian package prometheus)")
}

/// `GET /metrics` on the guest at `127.0.0.1:port` (text format): the whole answer, checked
/// to be a 200.
pub fn metrics_text(port: u16) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .unwrap_or_else(|e| panic!("connecting to /metrics on port {port}: {e}"));
    s.set_read_timeout(Some(TOOL_TIMEOUT)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: guest\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out)
        .unwrap_or_else(|e| panic!("/metrics did not answer: {e}"));
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

/// The value of the first sample of `family` (a family name, or a series with its labels)
/// in a text exposition; `None` when there is none.
pub fn sample(text: &str, family: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(family) && l[family.len()..].starts_with(['{', ' ']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// This crate's NBD client on the guest's export at loopback `port`, with
/// [`TOOL_TIMEOUT`] as its hang guard.
pub fn nbd_client(port: u16) -> Client {
    nbd_client_at(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port))
}

/// [`nbd_client`] on the guest's export at `addr` (a guest on a tap has its own address).
pub fn nbd_client_at(addr: SocketAddrV4) -> Client {
    let opts = ClientOptions {
        timeout: Some(TOOL_TIMEOUT),
        ..ClientOptions::new(NBD_EXPORT)
    };
    Client::connect_with(addr, &opts)
        .unwrap_or_else(|e| panic!("NBD handshake with the guest at {addr}: {e}"))
}

/// A fresh directory under the system's temporary directory, removed on drop.
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    /// Creates `qcow-metal-<tag>-<pid>-<n>` (unique within the process).
    pub fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "qcow-metal-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("creating a scratch directory");
        ScratchDir(dir)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Set in the copy of a test that runs inside its namespace ([`in_namespace`]): the
/// namespace's name.
const INNER_ENV: &str = "QCOW_METAL_TAP_NETNS";

/// How long the copy inside the namespace may run (a guard against hangs, not a timing
/// assertion: the tap tests take seconds under TCG, the load test about two minutes).
const INNER_TIMEOUT: Duration = Duration::from_secs(900);

/// Runs `ip ARGS` and fails the test unless it succeeds; returns its stdout.
pub fn ip(args: &[&str]) -> String {
    let out = run_tool_output("ip", "iproute2", args);
    assert!(
        out.success,
        "`ip {}` failed: {}{}",
        args.join(" "),
        out.stdout,
        out.stderr
    );
    out.stdout
}

/// A network namespace `qm-<pid>-<n>`; dropping it kills the processes still inside and
/// deletes it.
struct NetNs(String);

impl NetNs {
    fn create(tag: &str) -> NetNs {
        require_tool("ip", "iproute2");
        let name = format!("qm-{}-{tag}", std::process::id());
        let out = run_tool_output("ip", "iproute2", &["netns", "add", &name]);
        assert!(
            out.success,
            "`ip netns add {name}` failed: {}\nthis test needs root (or CAP_SYS_ADMIN and \
             CAP_NET_ADMIN) to create a network namespace and a tap device in it; CI runs \
             it as root: run the test with `sudo -E cargo test -p qcow-metal-e2e ...`",
            out.stderr.trim()
        );
        let ns = NetNs(name);
        ip(&["-n", &ns.0, "link", "set", "lo", "up"]);
        ns
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Whatever a failed test left in the namespace (QEMU, Prometheus): these are the
        // processes of this namespace only, which this test started.
        let pids = run_tool_output("ip", "iproute2", &["netns", "pids", &self.0]).stdout;
        for pid in pids.split_whitespace() {
            let _ = Command::new("kill").args(["-KILL", pid]).status();
        }
        let _ = run_tool_output("ip", "iproute2", &["netns", "del", &self.0]);
    }
}

/// Runs `body` in a network namespace of its own: outside one, creates it and runs this
/// test (`name`, its function's name) again inside it, failing with the inner run's output
/// if that fails; the inner run's output is printed (seen with `--nocapture`). Inside,
/// `body` can create taps and boot guests on their own addresses (`guest().net(NetMode::Tap)`)
/// without touching the host's network. Needs root; the namespace and every process left in
/// it are removed when the test ends, failed or not.
pub fn in_namespace(name: &str, body: impl FnOnce()) {
    if std::env::var_os(INNER_ENV).is_some() {
        body();
        return;
    }
    let ns = NetNs::create(name.split('_').next().unwrap_or("t"));
    // Built once here, outside: the copy inside boots this kernel.
    let kernel = kernel::shared_kernel().unwrap_or_else(|e| panic!("building the kernel: {e}"));
    // This process's own executable, even if cargo has replaced the file since it started.
    let exe = format!("/proc/{}/exe", std::process::id());
    let mut child = Command::new(require_tool("ip", "iproute2"))
        .args(["netns", "exec", &ns.0])
        .arg(&exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(INNER_ENV, &ns.0)
        .env(kernel::KERNEL_ENV, &kernel)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the test again inside the namespace");
    let (stdout, stderr) = (drain(child.stdout.take()), drain(child.stderr.take()));
    let status = wait_or_kill(&mut child, INNER_TIMEOUT);
    let (stdout, stderr) = (stdout.join().unwrap(), stderr.join().unwrap());
    let report = format!("--- inside {} ---\n{stdout}\n{stderr}", ns.0);
    assert!(
        status.is_some_and(|s| s.success()),
        "the test failed inside its namespace ({status:?}):\n{report}"
    );
    // The copy must really have run this test (not filtered everything out).
    assert!(
        stdout.contains("test result: ok. 1 passed"),
        "the test did not run inside its namespace:\n{report}"
    );
    print!("{report}");
    drop(ns);
}

/// Reads `pipe` to its end on a thread of its own.
fn drain(pipe: Option<impl Read + Send + 'static>) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// Waits for `child`; kills it after `timeout` (then `None`).
fn wait_or_kill(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("waiting for a child") {
            return Some(status);
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        thread::sleep(Duration::from_millis(50));
    }
}
