//! Finding QEMU, choosing the accelerator and writing QEMU's command line.

use std::env;
use std::ffi::OsString;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The system emulator the guest runs in.
pub const QEMU_SYSTEM: &str = "qemu-system-x86_64";

/// Environment variable naming another QEMU binary.
pub const QEMU_ENV: &str = "QCOW_METAL_QEMU";

/// The guest's TCP ports behind the host forwards.
pub const GUEST_METRICS_PORT: u16 = 9090;
/// The guest's NBD port.
pub const GUEST_NBD_PORT: u16 = 10809;

/// Finds `program` on `PATH` (or an absolute/relative path as given).
pub fn find_program(program: &str) -> Option<PathBuf> {
    let p = Path::new(program);
    if p.components().count() > 1 {
        return p.is_file().then(|| p.to_path_buf());
    }
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The QEMU system emulator: [`QEMU_ENV`] if set, else `qemu-system-x86_64` on `PATH`.
pub fn find_qemu() -> Result<PathBuf> {
    let wanted = env::var(QEMU_ENV).unwrap_or_else(|_| QEMU_SYSTEM.to_string());
    find_program(&wanted).ok_or(Error::QemuMissing { program: wanted })
}

/// Which accelerator to run the guest on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Accel {
    /// KVM when `/dev/kvm` is usable and the guest comes up on it; TCG otherwise.
    #[default]
    Auto,
    /// Hardware virtualisation (fails if KVM is unusable).
    Kvm,
    /// QEMU's software emulator: slower, works everywhere.
    Tcg,
}

impl std::str::FromStr for Accel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Accel::Auto),
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            other => Err(format!("unknown accelerator `{other}` (auto, kvm or tcg)")),
        }
    }
}

impl Accel {
    /// The option's spelling: `auto`, `kvm` or `tcg`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Accel::Auto => "auto",
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// An accelerator QEMU is actually started with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccelKind {
    /// `-accel kvm`.
    Kvm,
    /// `-accel tcg`.
    Tcg,
}

impl AccelKind {
    /// QEMU's name for it.
    pub fn as_str(&self) -> &'static str {
        match self {
            AccelKind::Kvm => "kvm",
            AccelKind::Tcg => "tcg",
        }
    }
}

/// Whether `/dev/kvm` opens for reading and writing.
pub fn kvm_device_opens() -> bool {
    open_kvm_device().is_ok()
}

fn open_kvm_device() -> std::io::Result<std::fs::File> {
    OpenOptions::new().read(true).write(true).open("/dev/kvm")
}

/// Why KVM cannot run this guest, or `None` when it is worth a try: `/dev/kvm` must open
/// for reading and writing, and must not be PVM (`kvm_pvm`, a KVM for paravirtualized Linux
/// guests only, on which a bare-metal guest dies with "emulation failure").
pub fn kvm_unusable_reason() -> Option<String> {
    if let Err(e) = open_kvm_device() {
        return Some(format!("/dev/kvm: {e}"));
    }
    if Path::new("/sys/module/kvm_pvm").exists() {
        return Some("this host's KVM is PVM, which runs only paravirtualized Linux guests".into());
    }
    None
}

/// Everything that goes into one QEMU command line.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    /// The kernel ELF (PVH).
    pub kernel: PathBuf,
    /// The kernel command line.
    pub append: String,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// The accelerator.
    pub accel: AccelKind,
    /// The disk image file.
    pub disk: PathBuf,
    /// QEMU's format for the drive: `raw` (the guest does qcow2) or `qcow2` (QEMU does).
    pub drive_format: String,
    /// Give the guest a read-only disk.
    pub read_only: bool,
    /// The layers of the disk's backing chain: each file is attached read-only as a
    /// virtio-blk device with the serial given (see `qcow_metal::qcow2::chain`).
    pub backing: Vec<(PathBuf, String)>,
    /// Host port forwarded to the guest's metrics port.
    pub metrics_port: u16,
    /// Host port forwarded to the guest's NBD port.
    pub nbd_port: u16,
    /// Attach the guest's network card to this tap device instead of QEMU's user-mode
    /// network (then nothing is forwarded and the ports above are the guest's own).
    pub tap: Option<String>,
    /// The QMP socket.
    pub qmp_socket: PathBuf,
    /// A second QMP socket for the user's own tools (the runner holds the first).
    pub user_qmp_socket: Option<PathBuf>,
    /// A QMP socket for the runner's host-file grower ([`crate::hostfile`]), if any.
    pub grow_qmp_socket: Option<PathBuf>,
    /// More arguments, appended as they are.
    pub extra_args: Vec<OsString>,
}

impl QemuConfig {
    /// QEMU's arguments (without the program name).
    ///
    /// The serial console goes to QEMU's stdout (`-chardev stdio`, signals off so Ctrl-C in
    /// the terminal reaches the runner, not QEMU); nothing else is created by default
    /// (`-nodefaults`).
    pub fn args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |s: &str| a.push(s.into());
        push("-nodefaults");
        push("-machine");
        push("q35");
        push("-accel");
        push(self.accel.as_str());
        push("-m");
        push(&format!("{}M", self.memory_mib));
        push("-smp");
        push("1");
        push("-display");
        push("none");
        push("-no-reboot");
        push("-chardev");
        push("stdio,id=serial0,signal=off");
        push("-serial");
        push("chardev:serial0");
        push("-device");
        push("isa-debug-exit,iobase=0xf4,iosize=0x04");
        push("-drive");
        // werror/rerror=report: a failed host write or read (a full filesystem, an I/O
        // error) completes the guest's request with an error status instead of pausing
        // the VM (QEMU's default for writes is `enospc`, which stops the guest).
        let mut drive = format!(
            "file={},format={},if=none,id=disk0,cache=writeback,discard=unmap,werror=report,rerror=report",
            escape_option(&self.disk.to_string_lossy()),
            self.drive_format
        );
        if self.read_only {
            drive.push_str(",readonly=on");
        }
        push(&drive);
        push("-device");
        push(&format!(
            "virtio-blk-pci,drive=disk0,id=vblk0,serial={}",
            qcow_metal::qcow2::chain::DISK_SERIAL
        ));
        for (i, (file, serial)) in self.backing.iter().enumerate() {
            // QEMU takes a shared lock on a read-only file: no writer can open it meanwhile.
            push("-drive");
            push(&format!(
                "file={},format=raw,if=none,id=layer{},readonly=on,cache=writeback,rerror=report",
                escape_option(&file.to_string_lossy()),
                i + 1
            ));
            push("-device");
            push(&format!(
                "virtio-blk-pci,drive=layer{},id=vblk-layer{},serial={serial}",
                i + 1,
                i + 1
            ));
        }
        push("-netdev");
        match &self.tap {
            // script=no: the runner (or the user) has set the host side up already.
            Some(tap) => push(&format!(
                "tap,id=net0,ifname={},script=no,downscript=no",
                escape_option(tap)
            )),
            None => push(&format!(
                "user,id=net0,hostfwd=tcp:127.0.0.1:{}-:{GUEST_METRICS_PORT},hostfwd=tcp:127.0.0.1:{}-:{GUEST_NBD_PORT}",
                self.metrics_port, self.nbd_port
            )),
        }
        push("-device");
        push("virtio-net-pci,netdev=net0,id=vnet0");
        push("-qmp");
        push(&format!(
            "unix:{},server=on,wait=off",
            escape_option(&self.qmp_socket.to_string_lossy())
        ));
        if let Some(grow) = &self.grow_qmp_socket {
            push("-qmp");
            push(&format!(
                "unix:{},server=on,wait=off",
                escape_option(&grow.to_string_lossy())
            ));
        }
        if let Some(user) = &self.user_qmp_socket {
            push("-qmp");
            push(&format!(
                "unix:{},server=on,wait=off",
                escape_option(&user.to_string_lossy())
            ));
        }
        push("-kernel");
        a.push(self.kernel.clone().into_os_string());
        if !self.append.is_empty() {
            a.push("-append".into());
            a.push(self.append.clone().into());
        }
        a.extend(self.extra_args.iter().cloned());
        a
    }
}

/// QEMU option values separate fields with commas; a literal comma is written twice.
fn escape_option(value: &str) -> String {
    value.replace(',', ",,")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> QemuConfig {
        QemuConfig {
            kernel: "/k/kernel".into(),
            append: "log=debug".into(),
            memory_mib: 128,
            accel: AccelKind::Tcg,
            disk: "/d/my,disk.qcow2".into(),
            drive_format: "raw".into(),
            read_only: false,
            backing: Vec::new(),
            metrics_port: 19090,
            nbd_port: 20809,
            tap: None,
            qmp_socket: "/s/qmp.sock".into(),
            user_qmp_socket: None,
            grow_qmp_socket: None,
            extra_args: vec![],
        }
    }

    fn joined(c: &QemuConfig) -> String {
        c.args()
            .iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn command_line_has_the_devices() {
        let s = joined(&config());
        for want in [
            "-machine q35",
            "-accel tcg",
            "-m 128M",
            "-no-reboot",
            "-device isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-drive file=/d/my,,disk.qcow2,format=raw,if=none,id=disk0,cache=writeback,discard=unmap,werror=report,rerror=report ",
            "virtio-blk-pci,drive=disk0",
            "hostfwd=tcp:127.0.0.1:19090-:9090",
            "hostfwd=tcp:127.0.0.1:20809-:10809",
            "virtio-net-pci,netdev=net0",
            "-qmp unix:/s/qmp.sock,server=on,wait=off",
            "-kernel /k/kernel -append log=debug",
        ] {
            assert!(s.contains(want), "missing `{want}` in {s}");
        }
    }

    #[test]
    fn read_only_and_qemu_side_qcow2() {
        let mut c = config();
        c.read_only = true;
        c.drive_format = "qcow2".into();
        c.append.clear();
        c.user_qmp_socket = Some("/u/qmp.sock".into());
        let s = joined(&c);
        assert!(
            s.contains("-qmp unix:/u/qmp.sock,server=on,wait=off"),
            "{s}"
        );
        assert!(s.contains("format=qcow2"), "{s}");
        assert!(s.contains(",readonly=on"), "{s}");
        assert!(!s.contains("-append"), "{s}");
    }

    #[test]
    fn a_tap_replaces_the_forwards() {
        let mut c = config();
        c.tap = Some("qm-tap0".into());
        let s = joined(&c);
        assert!(
            s.contains("-netdev tap,id=net0,ifname=qm-tap0,script=no,downscript=no "),
            "{s}"
        );
        assert!(s.contains("virtio-net-pci,netdev=net0"), "{s}");
        assert!(!s.contains("hostfwd"), "{s}");
    }

    #[test]
    fn accel_parses() {
        assert_eq!("auto".parse::<Accel>(), Ok(Accel::Auto));
        assert_eq!("kvm".parse::<Accel>(), Ok(Accel::Kvm));
        assert_eq!("tcg".parse::<Accel>(), Ok(Accel::Tcg));
        assert!("hvf".parse::<Accel>().is_err());
    }

    #[test]
    fn programs_are_found_on_path() {
        assert!(find_program("sh").is_some());
        assert!(find_program("qcow-metal-no-such-program").is_none());
    }
}
