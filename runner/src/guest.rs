//! Booting a guest under QEMU and driving it from the host: the library behind the
//! `qcow-metal` command and the end-to-end tests.
//!
//! ```no_run
//! use qcow_metal_runner::guest::Guest;
//! use std::time::Duration;
//! let mut guest = Guest::builder().size(64 << 20).start()?;
//! let banner = guest.wait_for_banner(Duration::from_secs(120))?;
//! println!("up in {} ms; metrics on port {}", banner.guest_ms, guest.metrics_port());
//! let status = guest.qmp()?.query_status()?;
//! assert!(status.running);
//! let outcome = guest.shutdown()?;
//! assert!(outcome.is_clean());
//! # Ok::<(), qcow_metal_runner::Error>(())
//! ```

use std::ffi::OsString;
use std::fs::File;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use qcow_metal::config::IpConfig;
use qcow_metal::qcow2::chain;
use tempfile::TempDir;

use crate::console::{Console, Echo, Wait};
use crate::disk::{self, GuestFormat, PreparedDisk};
use crate::error::{Error, Result};
use crate::exit::GuestOutcome;
use crate::guard;
use crate::hostfile::{self, Cut, GrowerConfig};
use crate::kernel;
use crate::net::{self, NetMode, Tap, TapPlan};
use crate::ports;
use crate::qemu::{self, Accel, AccelKind, QemuConfig};
use crate::qmp::Qmp;
use crate::rundir;
use crate::spawn;

/// How long an `auto` boot waits for the banner under KVM before falling back to TCG.
pub const KVM_BANNER_TIMEOUT: Duration = Duration::from_secs(10);

/// How long to wait for QEMU's QMP socket after starting it.
const QMP_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// What QEMU prints when a bare-metal guest cannot run under a (nested, PVM) KVM.
const KVM_FAILURE_SIGNS: [&str; 3] = ["KVM internal error", "emulation failure", "kvm run failed"];

/// Environment variable: when set to 1, guests started by the library echo their serial
/// console and QEMU's stderr to stderr (for debugging tests).
pub const ECHO_ENV: &str = "QCOW_METAL_ECHO";

/// The guest's "main loop reached" line: `qcow-metal <version> ready in <N> ms: <devices>`.
#[derive(Debug, Clone, PartialEq)]
pub struct Banner {
    /// The whole line.
    pub line: String,
    /// The guest's version.
    pub version: String,
    /// The guest's own measure of its boot, in milliseconds.
    pub guest_ms: f64,
    /// The devices it names.
    pub devices: String,
    /// Wall time from starting QEMU to the line's arrival.
    pub wall: Duration,
}

/// Whether `line` is the guest's banner.
pub fn is_banner(line: &str) -> bool {
    line.starts_with("qcow-metal") && line.contains("ready in")
}

/// Splits a banner line into version, guest milliseconds and devices.
pub fn parse_banner(line: &str) -> Option<(String, f64, String)> {
    if !is_banner(line) {
        return None;
    }
    let rest = line.strip_prefix("qcow-metal")?.trim_start();
    let (version, rest) = rest.split_once(" ready in ")?;
    let rest = rest.trim_start();
    let (number, rest) = rest.split_once(char::is_whitespace)?;
    let guest_ms: f64 = number.parse().ok()?;
    let devices = rest
        .trim_start()
        .strip_prefix("ms")
        .map(|r| r.trim_start_matches(':').trim())
        .unwrap_or("")
        .to_string();
    Some((version.trim().to_string(), guest_ms, devices))
}

/// Options for starting a guest. Every option has a default suitable for tests: TCG, free
/// host ports, a temporary 1 GiB qcow2 disk, 256 MiB of memory.
#[derive(Debug, Clone)]
pub struct GuestBuilder {
    kernel: Option<PathBuf>,
    disk: Option<PathBuf>,
    size: u64,
    cluster_size: u64,
    refcount_bits: u32,
    append: Vec<String>,
    format: GuestFormat,
    read_only: bool,
    drive_format: String,
    memory_mib: u32,
    accel: Accel,
    metrics_port: Option<u16>,
    nbd_port: Option<u16>,
    serial_log: Option<PathBuf>,
    user_qmp_socket: Option<PathBuf>,
    echo: bool,
    shutdown_timeout: Duration,
    extra_qemu_args: Vec<OsString>,
    force_kvm_trial: bool,
    net: NetMode,
    tap: Option<String>,
    guest_ip: Option<IpConfig>,
    /// Kernel arguments of the network plan (`ip=`, `gw=`), before the user's own.
    net_args: Vec<String>,
    /// The tap's address plan, once made (for QEMU's error messages).
    tap_plan: Option<TapPlan>,
}

impl Default for GuestBuilder {
    fn default() -> Self {
        GuestBuilder {
            kernel: None,
            disk: None,
            size: disk::DEFAULT_SIZE,
            cluster_size: disk::DEFAULT_CLUSTER_SIZE,
            refcount_bits: disk::DEFAULT_REFCOUNT_BITS,
            append: Vec::new(),
            format: GuestFormat::Auto,
            read_only: false,
            drive_format: "raw".into(),
            memory_mib: 256,
            accel: Accel::Tcg,
            metrics_port: None,
            nbd_port: None,
            serial_log: None,
            user_qmp_socket: None,
            echo: std::env::var(ECHO_ENV).is_ok_and(|v| v == "1"),
            shutdown_timeout: Duration::from_secs(30),
            extra_qemu_args: Vec::new(),
            force_kvm_trial: false,
            net: NetMode::User,
            tap: None,
            guest_ip: None,
            net_args: Vec::new(),
            tap_plan: None,
        }
    }
}

impl GuestBuilder {
    /// Boots this kernel ELF instead of the one built from the workspace.
    pub fn kernel(mut self, path: impl Into<PathBuf>) -> Self {
        self.kernel = Some(path.into());
        self
    }

    /// Uses this disk image (created as qcow2 of [`size`](Self::size) when missing) instead
    /// of a temporary one.
    pub fn disk(mut self, path: impl Into<PathBuf>) -> Self {
        self.disk = Some(path.into());
        self
    }

    /// Virtual size of a disk the builder creates (default 1 GiB).
    pub fn size(mut self, bytes: u64) -> Self {
        self.size = bytes;
        self
    }

    /// Cluster size and refcount width of a qcow2 disk the builder creates.
    pub fn geometry(mut self, cluster_size: u64, refcount_bits: u32) -> Self {
        self.cluster_size = cluster_size;
        self.refcount_bits = refcount_bits;
        self
    }

    /// Adds kernel arguments (space-separated `key=value`), after the runner's own.
    pub fn append(mut self, args: impl Into<String>) -> Self {
        let args = args.into();
        if !args.trim().is_empty() {
            self.append.push(args.trim().to_string());
        }
        self
    }

    /// Tells the guest how to take its disk (`format=` on the kernel command line).
    pub fn format(mut self, format: GuestFormat) -> Self {
        self.format = format;
        self
    }

    /// Gives the guest a read-only disk (QEMU `readonly=on` and the kernel's `ro=1`).
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// QEMU's own format for the drive (default `raw`: the guest does qcow2). With `qcow2`,
    /// QEMU's driver does the qcow2 work and the guest should be told `format(Raw)`.
    pub fn qemu_drive_format(mut self, format: impl Into<String>) -> Self {
        self.drive_format = format.into();
        self
    }

    /// Guest memory in MiB (default 256).
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    /// The accelerator (default TCG, which works on every machine).
    pub fn accel(mut self, accel: Accel) -> Self {
        self.accel = accel;
        self
    }

    /// Forwards this host port to the guest's metrics port (default: a free port).
    pub fn metrics_port(mut self, port: u16) -> Self {
        self.metrics_port = Some(port);
        self
    }

    /// Forwards this host port to the guest's NBD port (default: a free port).
    pub fn nbd_port(mut self, port: u16) -> Self {
        self.nbd_port = Some(port);
        self
    }

    /// Also writes the serial console to this file.
    pub fn serial_log(mut self, path: impl Into<PathBuf>) -> Self {
        self.serial_log = Some(path.into());
        self
    }

    /// Also serves QMP on this Unix socket, for the user's own tools (`socat`, `qmp-shell`);
    /// the runner keeps its own session on a private socket.
    pub fn user_qmp_socket(mut self, path: impl Into<PathBuf>) -> Self {
        self.user_qmp_socket = Some(path.into());
        self
    }

    /// Echoes the serial console to stdout and QEMU's stderr to stderr as they arrive.
    pub fn echo(mut self, echo: bool) -> Self {
        self.echo = echo;
        self
    }

    /// How long [`Guest::shutdown`] waits for the guest to power off (default 30 s).
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// With [`Accel::Auto`]: try KVM whenever `/dev/kvm` opens, even on hosts whose KVM is
    /// known not to run bare-metal guests (PVM), so the fallback to TCG is exercised.
    pub fn force_kvm_trial(mut self, force: bool) -> Self {
        self.force_kvm_trial = force;
        self
    }

    /// The guest's network: [`NetMode::User`] (default; ports forwarded to 127.0.0.1) or
    /// [`NetMode::Tap`] (its own address on a tap device, [`net::DEFAULT_TAP`] unless
    /// [`tap`](Self::tap) names one).
    pub fn net(mut self, net: NetMode) -> Self {
        self.net = net;
        self
    }

    /// Attaches the guest to tap device `name` ([`NetMode::Tap`]): used as it is when it
    /// exists; else created, addressed and brought up here, and removed with the guest.
    pub fn tap(mut self, name: impl Into<String>) -> Self {
        self.net = NetMode::Tap;
        self.tap = Some(name.into());
        self
    }

    /// The guest's address (`ip=` on the kernel command line; an `ip=` of
    /// [`append`](Self::append) still wins). Default: see [`TapPlan::new`] on a tap, and
    /// [`net::user_net_args`] on the user-mode network (10.0.2.15/24, static; `dhcp` asks
    /// QEMU's DHCP).
    pub fn guest_ip(mut self, ip: IpConfig) -> Self {
        self.guest_ip = Some(ip);
        self
    }

    /// Appends raw arguments to QEMU's command line.
    pub fn qemu_arg(mut self, arg: impl Into<OsString>) -> Self {
        self.extra_qemu_args.push(arg.into());
        self
    }

    /// The kernel command line the guest gets.
    pub fn kernel_cmdline(&self) -> String {
        let mut parts: Vec<String> = Vec::new();
        if self.format != GuestFormat::Auto {
            parts.push(format!("format={}", self.format.as_str()));
        }
        if self.read_only {
            parts.push("ro=1".into());
        } else if self.drive_format == "raw" && self.format != GuestFormat::Raw {
            // The host file grows when the guest asks (a raw drive the guest's engine writes).
            parts.push("grow=1".into());
        }
        parts.extend(self.net_args.iter().cloned());
        parts.extend(self.append.iter().cloned());
        parts.join(" ")
    }

    /// Starts QEMU. Returns once QMP is connected (or QEMU has already stopped: a guest
    /// that exits at once is a result, not an error). With [`Accel::Auto`] it also waits
    /// for the banner under KVM, and falls back to TCG when KVM fails.
    pub fn start(mut self) -> Result<Guest> {
        let qemu = qemu::find_qemu()?;
        let kernel = match &self.kernel {
            Some(k) => k.clone(),
            None => kernel::shared_kernel()?,
        };
        spawn::find_setpriv()?;
        // The tap first: without the rights to create it, fail before the disk is touched.
        let tap = match self.net {
            NetMode::User => {
                self.net_args = net::user_net_args(self.guest_ip, &self.kernel_cmdline());
                None
            }
            NetMode::Tap => {
                let name = self.tap.clone().unwrap_or_else(|| net::DEFAULT_TAP.into());
                let user_args = self.kernel_cmdline();
                let plan = TapPlan::new(&name, net::probe_tap(&name)?, self.guest_ip, &user_args)?;
                self.net_args = plan.kernel_args.clone();
                self.tap_plan = Some(plan.clone());
                Some(Tap::setup(plan)?)
            }
        };
        let dir = rundir::create()?;
        let (disk, locks) = self.prepare_disk(dir.path())?;
        for (port, flag) in [
            (self.metrics_port, "--metrics-port"),
            (self.nbd_port, "--nbd-port"),
        ] {
            if let Some(port) = port
                && tap.is_none()
            {
                ports::ensure_free(port, flag)?;
            }
        }
        let accel = match self.accel {
            Accel::Tcg => AccelKind::Tcg,
            Accel::Kvm => AccelKind::Kvm,
            Accel::Auto if self.force_kvm_trial && qemu::kvm_device_opens() => AccelKind::Kvm,
            Accel::Auto => match qemu::kvm_unusable_reason() {
                None => AccelKind::Kvm,
                Some(why) => {
                    if self.echo {
                        eprintln!("qcow-metal: accel auto: using TCG ({why})");
                    }
                    AccelKind::Tcg
                }
            },
        };
        let trial = self.accel == Accel::Auto && accel == AccelKind::Kvm;
        // A KVM trial runs silently; its output is replayed when it is kept.
        let echo = self.echo && !trial;
        let mut guest = self.spawn_retrying_ports(&qemu, &kernel, &disk, &dir, accel, echo)?;
        if trial {
            match guest.wait_for_kvm_boot() {
                None => {
                    if self.echo {
                        guest.console.set_echo(Echo::Stdout, true);
                        guest.stderr.set_echo(Echo::Stderr, true);
                    }
                }
                Some(why) => {
                    if self.echo {
                        eprintln!(
                            "qcow-metal: the guest does not run under KVM here ({why}); \
                             retrying with TCG (--accel tcg skips the attempt)"
                        );
                    }
                    guest.kill();
                    drop(guest);
                    guest = self.spawn_retrying_ports(
                        &qemu,
                        &kernel,
                        &disk,
                        &dir,
                        AccelKind::Tcg,
                        self.echo,
                    )?;
                }
            }
        }
        guest.dir = Some(dir);
        guest.guest_ip = tap.as_ref().and_then(|t| t.plan().guest_addr());
        guest.tap = tap;
        if guest.outcome.is_none() {
            guest.disk_lock = locks;
        }
        Ok(guest)
    }

    /// Checks, creates and locks the disk, then prepares it for the guest. Nothing of an
    /// earlier guest's (QMP socket, serial log) is touched before the lock is held.
    fn prepare_disk(&self, dir: &Path) -> Result<(PreparedDisk, Vec<File>)> {
        // A raw guest on a raw drive gets a plain file; every other setup a qcow2 image.
        let raw_file = self.format == GuestFormat::Raw && self.drive_format == "raw";
        let path = match &self.disk {
            Some(p) => p.clone(),
            None => dir.join(if raw_file { "disk.raw" } else { "disk.qcow2" }),
        };
        guard::ensure_regular(&path)?;
        if !path.exists() {
            if raw_file {
                if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                    std::fs::create_dir_all(parent).map_err(|e| Error::disk(&path, "create", e))?;
                }
                guard::create_new(&path, |f| f.set_len(self.size))
                    .map_err(|e| Error::disk(&path, "create", e))?;
            } else {
                disk::create_qcow2(&path, self.size, self.cluster_size, self.refcount_bits)?;
            }
        }
        let lock = guard::lock_disk(&path, self.read_only)?;
        if self.drive_format == "raw" && self.format == GuestFormat::Auto {
            guard::check_auto_format(&path)?;
        }
        if lock.metadata().map(|m| m.len()).unwrap_or(0) == 0 {
            return Err(guard::empty(&path));
        }
        let mut locks = vec![lock];
        let prepared = if self.drive_format == "raw" {
            let mut prepared = disk::prepare(&path, self.read_only)?;
            if matches!(prepared.kind, disk::DiskKind::Qcow2(_)) && self.format != GuestFormat::Raw
            {
                // The guest opens the chain: every layer becomes a read-only device.
                let (chain, layer_locks) = disk::backing_chain(&path)?;
                prepared.backing = chain;
                locks.extend(layer_locks);
            }
            prepared
        } else {
            // QEMU's own driver grows the file; only check that it opens.
            std::fs::OpenOptions::new()
                .read(true)
                .write(!self.read_only)
                .open(&path)
                .map_err(|e| Error::disk(&path, "open", e))?;
            PreparedDisk {
                file_len: std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0),
                path,
                kind: disk::DiskKind::Raw,
                backing: Vec::new(),
            }
        };
        Ok((prepared, locks))
    }

    /// Starts QEMU; when the host ports were picked here and QEMU cannot forward them (taken
    /// in between by someone else), picks new ones, a few times.
    fn spawn_retrying_ports(
        &self,
        qemu: &Path,
        kernel: &Path,
        disk: &PreparedDisk,
        dir: &TempDir,
        accel: AccelKind,
        echo: bool,
    ) -> Result<Guest> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            // On a tap nothing is forwarded: the ports are the guest's own.
            let guest_config = qcow_metal::config::Config::parse(&self.kernel_cmdline())
                .map(|(c, _)| c)
                .unwrap_or_default();
            let tap = self.net == NetMode::Tap;
            let metrics_port = match self.metrics_port {
                _ if tap => guest_config.metrics_port,
                Some(p) => p,
                None => ports::pick_free()?,
            };
            let nbd_port = match self.nbd_port {
                _ if tap => guest_config.nbd_port,
                Some(p) => p,
                None => loop {
                    let p = ports::pick_free()?;
                    if p != metrics_port {
                        break p;
                    }
                },
            };
            let ports = (metrics_port, nbd_port);
            let mut guest = self.spawn(qemu, kernel, disk, dir.path(), accel, ports, echo)?;
            if let Err(e) = guest.connect_qmp() {
                if guest.try_outcome()?.is_none() {
                    return Err(e);
                }
            } else {
                return Ok(guest);
            }
            // QEMU stopped before QMP came up.
            let outcome = guest.wait_exit(Duration::from_secs(30))?;
            let stderr = guest.qemu_stderr();
            let hostfwd = stderr.contains("host forwarding");
            let auto_ports = self.metrics_port.is_none() || self.nbd_port.is_none();
            if hostfwd && auto_ports && attempt < 4 {
                continue;
            }
            if outcome == GuestOutcome::Other(1) {
                if let Some(plan) = &self.tap_plan
                    && let Some(why) = net::qemu_tap_error(plan, &stderr)
                {
                    return Err(Error::Network(why));
                }
                if hostfwd {
                    let metrics_rule = format!("127.0.0.1:{metrics_port}-");
                    let (port, flag) = if stderr.contains(&metrics_rule) {
                        (metrics_port, "--metrics-port")
                    } else {
                        (nbd_port, "--nbd-port")
                    };
                    return Err(Error::PortInUse {
                        port,
                        flag,
                        source: std::io::Error::other(stderr.trim().to_string()),
                    });
                }
                if stderr.contains("Failed to get") && stderr.contains("lock") {
                    return Err(Error::Disk {
                        path: disk.path.clone(),
                        action: "lock",
                        reason: format!(
                            "another QEMU (another qcow-metal?) has it open ({})",
                            stderr.trim()
                        ),
                    });
                }
                return Err(Error::Qemu(format!(
                    "QEMU failed to start:\n{}",
                    stderr.trim()
                )));
            }
            // The guest ran and exited before QMP connected: a result for the caller.
            return Ok(guest);
        }
    }

    /// The most the image can need, when its file is to grow on demand and be cut at a clean
    /// exit ([`crate::hostfile`]): a writable qcow2 image the guest runs its engine on. Never
    /// for a guest that serves the file's bytes raw (a cut to the image's end would drop what
    /// clients wrote past it), nor with the user's `grow=0`.
    fn host_file_grows(&self, kind: disk::DiskKind) -> Option<u64> {
        let config = qcow_metal::config::Config::parse(&self.kernel_cmdline())
            .map(|(c, _)| c)
            .unwrap_or_default();
        let engine_writes = config.grow
            && !config.read_only
            && config.format != qcow_metal::config::DiskFormat::Raw
            && !self.read_only
            && self.drive_format == "raw";
        match kind {
            disk::DiskKind::Qcow2(g) if engine_writes => Some(qcow_metal::qcow2::max_image_len(
                g.virtual_size,
                g.cluster_size,
                g.refcount_bits,
            )),
            _ => None,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn spawn(
        &self,
        qemu: &Path,
        kernel: &Path,
        disk: &PreparedDisk,
        dir: &Path,
        accel: AccelKind,
        (metrics_port, nbd_port): (u16, u16),
        echo: bool,
    ) -> Result<Guest> {
        let qmp_socket = dir.join(format!("qmp-{}.sock", accel.as_str()));
        let _ = std::fs::remove_file(&qmp_socket);
        let grows = self.host_file_grows(disk.kind);
        let grow_qmp_socket = grows.map(|_| dir.join(format!("grow-{}.sock", accel.as_str())));
        if let Some(s) = &grow_qmp_socket {
            let _ = std::fs::remove_file(s);
        }
        if let Some(user) = &self.user_qmp_socket {
            prepare_user_socket(user)?;
        }
        let config = QemuConfig {
            kernel: kernel.to_path_buf(),
            append: self.kernel_cmdline(),
            memory_mib: self.memory_mib,
            accel,
            disk: disk.path.clone(),
            drive_format: self.drive_format.clone(),
            read_only: self.read_only,
            backing: disk
                .backing
                .iter()
                .enumerate()
                .map(|(i, l)| (l.path.clone(), chain::layer_serial(i + 1, l.format)))
                .collect(),
            metrics_port,
            nbd_port,
            tap: match self.net {
                NetMode::Tap => Some(self.tap.clone().unwrap_or_else(|| net::DEFAULT_TAP.into())),
                NetMode::User => None,
            },
            qmp_socket: qmp_socket.clone(),
            user_qmp_socket: self.user_qmp_socket.clone(),
            grow_qmp_socket: grow_qmp_socket.clone(),
            extra_args: self.extra_qemu_args.clone(),
        };
        let serial_file = match &self.serial_log {
            Some(p) => {
                if let Some(parent) = p.parent().filter(|p| !p.as_os_str().is_empty()) {
                    std::fs::create_dir_all(parent)
                        .map_err(|e| Error::io(format!("creating {}", parent.display()), e))?;
                }
                Some(
                    File::create(p)
                        .map_err(|e| Error::io(format!("creating {}", p.display()), e))?,
                )
            }
            None => None,
        };
        // Under setpriv: QEMU dies with the runner, even a SIGKILLed one.
        let mut cmd = spawn::dies_with_parent(&spawn::find_setpriv()?, qemu);
        // The guest's serial input carries the answers to its grow requests.
        cmd.args(config.args())
            .stdin(if grows.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Its own process group: Ctrl-C in the terminal goes to the runner, which then
        // powers the guest down cleanly, instead of killing QEMU mid-write.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let started = Instant::now();
        let mut child = spawn::spawn(cmd)
            .map_err(|e| Error::Qemu(format!("cannot start {}: {e}", qemu.display())))?;
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let (Some(stdout), Some(stderr)) = (stdout, stderr) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::Qemu("QEMU's output pipes are missing".into()));
        };
        let console = Console::capture(
            stdout,
            if echo { Echo::Stdout } else { Echo::Off },
            serial_file,
        );
        let stderr = Console::capture(stderr, if echo { Echo::Stderr } else { Echo::Off }, None);
        if let (Some(max_len), Some(socket), Some(stdin)) =
            (grows, grow_qmp_socket, child.stdin.take())
        {
            hostfile::spawn_grower(
                console.clone(),
                stdin,
                GrowerConfig {
                    disk: disk.path.clone(),
                    qmp_socket: socket,
                    max_len,
                },
            );
        }
        Ok(Guest {
            child,
            dir: None,
            disk_lock: Vec::new(),
            disk: disk.clone(),
            config,
            console,
            stderr,
            qmp: None,
            accel,
            started,
            outcome: None,
            shutdown_timeout: self.shutdown_timeout,
            tap: None,
            guest_ip: None,
            cut_at_exit: grows.is_some(),
            echo,
            host_file_cut: None,
        })
    }
}

/// A running (or finished) guest: one QEMU process. Dropping it kills QEMU.
pub struct Guest {
    child: Child,
    /// Holds the QMP socket and the temporary disk; removed when the guest is dropped.
    dir: Option<TempDir>,
    /// The disk file's lock (see [`guard::lock_disk`]), held while QEMU runs.
    disk_lock: Vec<File>,
    disk: PreparedDisk,
    config: QemuConfig,
    console: Console,
    stderr: Console,
    qmp: Option<Qmp>,
    accel: AccelKind,
    started: Instant,
    outcome: Option<GuestOutcome>,
    shutdown_timeout: Duration,
    /// The tap the guest is attached to (one the runner created goes after QEMU).
    tap: Option<Tap>,
    /// The guest's own address on the tap (static, or learnt from its DHCP lease).
    guest_ip: Option<Ipv4Addr>,
    /// The disk's file grows on demand: after a clean exit it is cut to the image's end.
    cut_at_exit: bool,
    /// The console is echoed (the command line): say what the cut did.
    echo: bool,
    /// What the cut after a clean exit did (or why it failed).
    host_file_cut: Option<std::result::Result<Cut, String>>,
}

impl Guest {
    /// A builder with the test defaults.
    pub fn builder() -> GuestBuilder {
        GuestBuilder::default()
    }

    /// The port to reach the guest's metrics on: the host port forwarded to it (user-mode
    /// network), or the guest's own port (9090) on a tap.
    pub fn metrics_port(&self) -> u16 {
        self.config.metrics_port
    }

    /// The port to reach the guest's NBD export on (forwarded, or the guest's own on a tap).
    pub fn nbd_port(&self) -> u16 {
        self.config.nbd_port
    }

    /// Where the guest is reached: 127.0.0.1 (forwarded ports), or its own address on a tap
    /// (unspecified, 0.0.0.0, while a DHCP guest has no lease yet).
    pub fn host(&self) -> Ipv4Addr {
        match (&self.tap, self.guest_ip) {
            (None, _) => Ipv4Addr::LOCALHOST,
            (Some(_), ip) => ip.unwrap_or(Ipv4Addr::UNSPECIFIED),
        }
    }

    /// The guest's own address on its tap, once known.
    pub fn guest_ip(&self) -> Option<Ipv4Addr> {
        self.guest_ip
    }

    /// The tap the guest is attached to, with its address plan.
    pub fn tap(&self) -> Option<&Tap> {
        self.tap.as_ref()
    }

    /// `http://<host>:<port>/metrics` ([`host`](Self::host), [`metrics_port`](Self::metrics_port)).
    pub fn metrics_url(&self) -> String {
        format!("http://{}:{}/metrics", self.host(), self.metrics_port())
    }

    /// `nbd://<host>:<port>/disk`.
    pub fn nbd_url(&self) -> String {
        format!("nbd://{}:{}/disk", self.host(), self.nbd_port())
    }

    /// The disk image file the guest runs on.
    pub fn disk_path(&self) -> &Path {
        &self.disk.path
    }

    /// The disk as prepared for the guest (kind, file length).
    pub fn disk(&self) -> &PreparedDisk {
        &self.disk
    }

    /// The accelerator QEMU runs with (after any `auto` fallback).
    pub fn accel(&self) -> AccelKind {
        self.accel
    }

    /// The kernel command line the guest got.
    pub fn kernel_cmdline(&self) -> &str {
        &self.config.append
    }

    /// The QMP socket for the user's tools, when one was asked for.
    pub fn user_qmp_socket(&self) -> Option<&Path> {
        self.config.user_qmp_socket.as_deref()
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The serial console so far.
    pub fn serial_log(&self) -> String {
        self.console.text()
    }

    /// QEMU's stderr so far.
    pub fn qemu_stderr(&self) -> String {
        self.stderr.text()
    }

    /// The last lines of the console and of QEMU's stderr, for error reports.
    pub fn tail(&self) -> String {
        let mut t = format!(
            "--- serial console (last lines) ---\n{}",
            self.console.tail(30)
        );
        let err = self.stderr.tail(10);
        if !err.trim().is_empty() {
            t.push_str("\n--- QEMU stderr ---\n");
            t.push_str(&err);
        }
        t
    }

    /// Waits for a console line containing `pattern` and returns it.
    pub fn wait_for_line(&mut self, pattern: &str, timeout: Duration) -> Result<String> {
        self.wait_for(
            |l| l.contains(pattern),
            &format!("`{pattern}`"),
            timeout,
            || false,
        )
        .map(|(_, line)| line)
    }

    /// Waits for a console line satisfying `matches`; `what` describes it in errors, and
    /// `stop` (checked every 100 ms) ends the wait early with a timeout error.
    pub fn wait_for(
        &mut self,
        matches: impl FnMut(&str) -> bool,
        what: &str,
        timeout: Duration,
        mut stop: impl FnMut() -> bool,
    ) -> Result<(Instant, String)> {
        // Under KVM, a guest that KVM cannot run stops (QEMU pauses it) instead of exiting:
        // stop waiting as soon as QEMU says so.
        let kvm = self.accel == AccelKind::Kvm;
        let stderr = self.stderr.clone();
        let stop = move || stop() || (kvm && kvm_failure(&stderr).is_some());
        match self.console.wait_for(matches, timeout, stop) {
            Wait::Found(at, line) => Ok((at, line)),
            Wait::TimedOut if kvm && kvm_failure(&self.stderr).is_some() => {
                Err(Error::Qemu(format!(
                    "KVM cannot run this guest (QEMU: {}); use --accel tcg (or auto)\n{}",
                    kvm_failure(&self.stderr).unwrap_or_default(),
                    self.tail()
                )))
            }
            Wait::Closed => {
                let outcome = self.wait_exit(Duration::from_secs(30))?;
                Err(Error::GuestExited {
                    outcome,
                    waiting_for: what.to_string(),
                    tail: self.tail(),
                })
            }
            Wait::TimedOut => Err(Error::Timeout {
                waiting_for: what.to_string(),
                tail: self.tail(),
            }),
        }
    }

    /// Waits for the banner and parses it.
    pub fn wait_for_banner(&mut self, timeout: Duration) -> Result<Banner> {
        self.wait_for_banner_or_stop(timeout, || false)
    }

    /// Like [`wait_for_banner`](Self::wait_for_banner), giving up early when `stop()`.
    pub fn wait_for_banner_or_stop(
        &mut self,
        timeout: Duration,
        stop: impl FnMut() -> bool,
    ) -> Result<Banner> {
        let (at, line) = self.wait_for(
            is_banner,
            "the guest's banner (`qcow-metal ... ready in`)",
            timeout,
            stop,
        )?;
        let (version, guest_ms, devices) = parse_banner(&line).ok_or_else(|| {
            Error::Qemu(format!(
                "the guest's banner has an unexpected shape: {line}"
            ))
        })?;
        Ok(Banner {
            line,
            version,
            guest_ms,
            devices,
            wall: at.saturating_duration_since(self.started),
        })
    }

    /// Waits until the guest's `/metrics` answers `200 OK` through the forwarded port, or on
    /// its own address on a tap (learnt from the console's `DHCP lease` line for a DHCP
    /// guest); the network comes up shortly after the banner. Gives up after `timeout` or
    /// when `stop()`.
    pub fn wait_for_metrics(
        &mut self,
        timeout: Duration,
        mut stop: impl FnMut() -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut addr = std::net::SocketAddr::from((self.host(), self.metrics_port()));
        // Until the guest listens, user-mode networking accepts the connection and then
        // holds it silently: start with short read timeouts and lengthen them.
        let mut wait = Duration::from_millis(250);
        loop {
            if self.tap.is_some() && self.guest_ip.is_none() {
                self.guest_ip = dhcp_lease(&self.console.text());
                addr = std::net::SocketAddr::from((self.host(), self.metrics_port()));
            }
            let last = if addr.ip().is_unspecified() {
                "the guest has no DHCP lease yet".to_string()
            } else {
                match http_status_line(addr, wait) {
                    Ok(line) if line.contains(" 200") => return Ok(()),
                    Ok(line) => format!("answered `{line}`"),
                    Err(e) => e.to_string(),
                }
            };
            if let Some(outcome) = self.try_outcome()? {
                return Err(Error::GuestExited {
                    outcome,
                    waiting_for: "/metrics to answer".into(),
                    tail: self.tail(),
                });
            }
            if Instant::now() >= deadline || stop() {
                return Err(Error::Timeout {
                    waiting_for: format!("{} to answer ({last})", self.metrics_url()),
                    tail: self.tail(),
                });
            }
            wait = (wait * 2).min(Duration::from_secs(5));
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The QMP session (connected when the guest started).
    pub fn qmp(&mut self) -> Result<&mut Qmp> {
        if self.qmp.is_none() {
            self.connect_qmp()?;
        }
        self.qmp
            .as_mut()
            .ok_or_else(|| Error::Qmp("not connected".into()))
    }

    /// Whether QEMU has exited, and how (non-blocking).
    pub fn try_outcome(&mut self) -> Result<Option<GuestOutcome>> {
        if self.outcome.is_none()
            && let Some(status) = self
                .child
                .try_wait()
                .map_err(|e| Error::io("waiting for QEMU", e))?
        {
            let outcome = GuestOutcome::from_status(status);
            self.outcome = Some(outcome);
            if outcome == GuestOutcome::Clean && self.cut_at_exit {
                self.cut_host_file();
            }
            self.disk_lock.clear();
            self.drain_output();
        }
        Ok(self.outcome)
    }

    /// After a clean exit, with the disk still locked: cuts its file to the image's end
    /// ([`hostfile::cut_to_extent`]).
    fn cut_host_file(&mut self) {
        let path = &self.disk.path;
        let result = hostfile::cut_to_extent(path).map_err(|e| e.to_string());
        match &result {
            Ok(Cut::Cut { from, to }) if self.echo => eprintln!(
                "qcow-metal: {} cut to the image's end: {} (was {})",
                path.display(),
                crate::units::format_size(*to),
                crate::units::format_size(*from)
            ),
            Ok(Cut::Kept(why)) => eprintln!(
                "qcow-metal: warning: {} not cut to the image's end: {why}",
                path.display()
            ),
            Err(e) => eprintln!(
                "qcow-metal: warning: cannot cut {} to the image's end: {e}",
                path.display()
            ),
            _ => {}
        }
        self.host_file_cut = Some(result);
    }

    /// What cutting the disk's file to the image's end after a clean exit did: `None`
    /// before that (or when the file does not grow on demand: read-only, raw, or QEMU's
    /// own qcow2 driver).
    pub fn host_file_cut(&self) -> Option<&std::result::Result<Cut, String>> {
        self.host_file_cut.as_ref()
    }

    /// Waits up to `timeout` for QEMU to exit on its own and says how it ended.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<GuestOutcome> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(o) = self.try_outcome()? {
                return Ok(o);
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    waiting_for: "QEMU to exit".into(),
                    tail: self.tail(),
                });
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Shuts the guest down cleanly: QMP `system_powerdown` (the ACPI power button: the
    /// guest flushes and exits), repeated every second; if the guest has not exited within
    /// the shutdown timeout, QMP `quit`, then a kill.
    /// Returns how it ended; [`GuestOutcome::is_clean`] tells whether the guest flushed.
    pub fn shutdown(&mut self) -> Result<GuestOutcome> {
        self.shutdown_or_abort(|| false)
    }

    /// Like [`shutdown`](Self::shutdown), but kills QEMU at once when `abort()` becomes true
    /// (checked every 100 ms; the runner's second Ctrl-C).
    pub fn shutdown_or_abort(&mut self, mut abort: impl FnMut() -> bool) -> Result<GuestOutcome> {
        if let Some(o) = self.try_outcome()? {
            return Ok(o);
        }
        // The button is pressed again every second: a guest still booting has not armed
        // its ACPI power button yet and would miss a single press.
        let deadline = Instant::now() + self.shutdown_timeout;
        let mut next_press = Instant::now();
        while Instant::now() < deadline && !abort() {
            if Instant::now() >= next_press {
                if self.qmp().and_then(|q| q.system_powerdown()).is_err() {
                    break;
                }
                next_press = Instant::now() + Duration::from_secs(1);
            }
            if let Some(o) = self.try_outcome()? {
                return Ok(o);
            }
            thread::sleep(Duration::from_millis(100));
        }
        if let Some(o) = self.try_outcome()? {
            return Ok(o);
        }
        if !abort() {
            if let Some(q) = self.qmp.as_mut() {
                // `quit` may not get a reply: QEMU can close the socket first.
                let _ = q.quit();
            }
            if let Ok(o) = self.wait_exit(Duration::from_secs(5)) {
                return Ok(o);
            }
        }
        self.kill();
        self.wait_exit(Duration::from_secs(30))
    }

    /// After QEMU exited: lets the capture threads read the last of its output.
    fn drain_output(&self) {
        for c in [&self.console, &self.stderr] {
            c.wait_for(|_| false, Duration::from_secs(5), || false);
        }
    }

    /// Kills QEMU at once (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if self.outcome.is_none() {
            let _ = self.child.kill();
            if let Ok(status) = self.child.wait() {
                self.outcome = Some(GuestOutcome::from_status(status));
                self.disk_lock.clear();
            }
        }
    }

    /// Connects QMP, waiting for QEMU to create the socket. Ok(()) with no session when
    /// QEMU exits first.
    fn connect_qmp(&mut self) -> Result<()> {
        let deadline = Instant::now() + QMP_CONNECT_TIMEOUT;
        loop {
            if self.config.qmp_socket.exists() {
                match Qmp::connect(&self.config.qmp_socket) {
                    Ok(q) => {
                        self.qmp = Some(q);
                        return Ok(());
                    }
                    Err(e) if self.try_outcome()?.is_some() || Instant::now() >= deadline => {
                        return Err(e);
                    }
                    Err(_) => {}
                }
            }
            if let Some(outcome) = self.try_outcome()? {
                return Err(Error::GuestExited {
                    outcome,
                    waiting_for: "QMP".into(),
                    tail: self.tail(),
                });
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    waiting_for: format!("QMP socket {}", self.config.qmp_socket.display()),
                    tail: self.tail(),
                });
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Under KVM (`auto`): `None` when the guest came up (or stopped with a result of its
    /// own), else why KVM is unusable: QEMU's "KVM internal error", or no banner in time.
    fn wait_for_kvm_boot(&mut self) -> Option<String> {
        let stderr = self.stderr.clone();
        let waited = self
            .console
            .wait_for(is_banner, KVM_BANNER_TIMEOUT, move || {
                kvm_failure(&stderr).is_some()
            });
        if let Some(why) = kvm_failure(&self.stderr) {
            return Some(why);
        }
        match waited {
            Wait::Found(..) => None,
            Wait::Closed => match self.wait_exit(Duration::from_secs(30)) {
                // One of the guest's own exits is a real result, not a KVM problem.
                Ok(o) if o.guest_exit().is_some() => None,
                Ok(o) => Some(o.to_string()),
                Err(e) => Some(e.to_string()),
            },
            Wait::TimedOut => Some(format!(
                "no banner within {} s",
                KVM_BANNER_TIMEOUT.as_secs()
            )),
        }
    }
}

/// Makes way for the user's QMP socket: creates its directory and removes a stale socket
/// (QEMU would refuse to bind over it), but refuses one that a running QEMU still serves.
fn prepare_user_socket(path: &Path) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|e| Error::io(format!("creating {}", parent.display()), e))?;
    }
    if std::fs::symlink_metadata(path).is_err() {
        return Ok(());
    }
    // A QEMU that was just killed can still accept for a moment: its main thread shows as a
    // zombie while its other threads, which share the socket, are still exiting. Refuse only
    // a socket that is still served after a short wait.
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut served = std::os::unix::net::UnixStream::connect(path).is_ok();
    while served && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        served = std::os::unix::net::UnixStream::connect(path).is_ok();
    }
    if served {
        return Err(Error::Qemu(format!(
            "the QMP socket {} is served by another running QEMU (another qcow-metal?); stop \
             that one first",
            path.display()
        )));
    }
    std::fs::remove_file(path).map_err(|e| Error::io(format!("removing {}", path.display()), e))
}

/// The first of QEMU's KVM failure messages in its stderr, if any.
fn kvm_failure(stderr: &Console) -> Option<String> {
    let text = stderr.text();
    KVM_FAILURE_SIGNS
        .iter()
        .find(|s| text.contains(*s))
        .map(|s| s.to_string())
}

/// The address of the guest's last `DHCP lease A.B.C.D/len` console line, if any.
pub fn dhcp_lease(console: &str) -> Option<Ipv4Addr> {
    let line = console.lines().rev().find(|l| l.contains("DHCP lease "))?;
    let (_, rest) = line.split_once("DHCP lease ")?;
    let cidr = rest
        .split(|c: char| c == '/' || c == ',' || c.is_whitespace())
        .next()?;
    cidr.parse().ok()
}

/// Sends `GET /metrics` and returns the response's status line.
fn http_status_line(addr: std::net::SocketAddr, wait: Duration) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, wait)?;
    stream.set_read_timeout(Some(wait))?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
    let mut buf = [0u8; 64];
    let mut n = 0;
    while n < buf.len() {
        match stream.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
        if buf[..n].contains(&b'\n') {
            break;
        }
    }
    let text = String::from_utf8_lossy(&buf[..n]);
    match text.lines().next() {
        Some(line) if line.starts_with("HTTP/") => Ok(line.to_string()),
        _ => Err(std::io::Error::other(
            "the connection closed without an HTTP answer",
        )),
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn banners_parse() {
        let (v, ms, dev) = parse_banner(
            "qcow-metal 0.1.0 ready in 87 ms: virtio-blk 1 GiB, virtio-net 52:54:00:12:34:56",
        )
        .unwrap();
        assert_eq!(v, "0.1.0");
        assert_eq!(ms, 87.0);
        assert_eq!(dev, "virtio-blk 1 GiB, virtio-net 52:54:00:12:34:56");
        let (_, ms, dev) = parse_banner("qcow-metal 0.1.0 ready in 3.25 ms").unwrap();
        assert_eq!(ms, 3.25);
        assert_eq!(dev, "");
        assert!(parse_banner("[ 0.1] qcow-metal ready in 3 ms").is_none());
        assert!(parse_banner("qcow-metal 0.1.0 ready in soon ms").is_none());
        assert!(parse_banner("qcow-metal 0.1.0 booting").is_none());
    }

    #[test]
    fn dhcp_leases_are_read_from_the_console() {
        let console = "[    0.4] INFO  net: MAC 52:54:00:12:34:56\n\
                       [    0.430075] INFO  net: DHCP lease 10.0.2.15/24, gateway 10.0.2.2\n";
        assert_eq!(dhcp_lease(console), Some(Ipv4Addr::new(10, 0, 2, 15)));
        assert_eq!(
            dhcp_lease("[ 0.1] INFO  net: static address 10.1.1.1/24\n"),
            None
        );
    }

    #[test]
    fn tap_addresses_go_before_the_users_kernel_arguments() {
        let mut b = Guest::builder()
            .tap("qm0")
            .guest_ip(IpConfig::Dhcp)
            .append("log=debug");
        b.net_args = vec!["ip=10.0.0.2/24".into(), "gw=10.0.0.1".into()];
        assert_eq!(b.net, NetMode::Tap);
        assert_eq!(
            b.kernel_cmdline(),
            "grow=1 ip=10.0.0.2/24 gw=10.0.0.1 log=debug"
        );
    }

    #[test]
    fn kernel_cmdline_carries_format_read_only_and_extras() {
        // A writable disk the guest does qcow2 on grows on demand.
        let b = Guest::builder();
        assert_eq!(b.kernel_cmdline(), "grow=1");
        let b = Guest::builder().qemu_drive_format("qcow2");
        assert_eq!(b.kernel_cmdline(), "");
        // Only a qcow2 image the guest's engine writes grows (and is cut at exit): never
        // one served raw, read-only, on QEMU's driver or with the user's grow=0.
        let qcow2 = disk::DiskKind::Qcow2(disk::Qcow2Geometry {
            version: 3,
            virtual_size: 1 << 30,
            cluster_size: 65536,
            refcount_bits: 16,
        });
        let max = qcow_metal::qcow2::max_image_len(1 << 30, 65536, 16);
        assert_eq!(Guest::builder().host_file_grows(qcow2), Some(max));
        assert_eq!(Guest::builder().host_file_grows(disk::DiskKind::Raw), None);
        for b in [
            Guest::builder().format(GuestFormat::Raw),
            Guest::builder().append("format=raw"),
            Guest::builder().append("grow=0"),
            Guest::builder().append("ro=1"),
            Guest::builder().read_only(true),
            Guest::builder().qemu_drive_format("qcow2"),
        ] {
            assert_eq!(b.host_file_grows(qcow2), None, "{}", b.kernel_cmdline());
        }
        let b = Guest::builder()
            .format(GuestFormat::Raw)
            .read_only(true)
            .append(" log=debug ")
            .append("");
        assert_eq!(b.kernel_cmdline(), "format=raw ro=1 log=debug");
    }
}
