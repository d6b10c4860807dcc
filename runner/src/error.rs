//! The runner's error type. Every variant's message says what went wrong and what to do.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use crate::exit::GuestOutcome;

/// How to install QEMU: the setup script, or the apt command it runs (qemu-utils pinned to
/// the emulator's version, which also works where a newer backported qemu-utils is installed).
pub const INSTALL_HINT: &str = "install the Debian package qemu-system-x86 with `bash .ci/setup` \
     (from the repository root), or by hand: sudo apt-get update && sudo apt-get install -y \
     --allow-downgrades qemu-system-x86 \"qemu-utils=$(apt-cache policy qemu-system-x86 | awk \
     '/Candidate:/{print $2}')\"";

/// What can go wrong while building, starting or talking to a guest.
#[derive(Debug)]
pub enum Error {
    /// `qemu-system-x86_64` (or another QEMU tool) is not installed.
    QemuMissing {
        /// The program that was looked for.
        program: String,
    },
    /// A host port the guest should be reachable on is already taken.
    PortInUse {
        /// The port.
        port: u16,
        /// The runner flag that picks another one (`--metrics-port`, `--nbd-port`).
        flag: &'static str,
        /// The error from `bind`.
        source: io::Error,
    },
    /// The disk image cannot be opened, created or resized.
    Disk {
        /// The image file.
        path: PathBuf,
        /// What was being done ("open", "create", ...).
        action: &'static str,
        /// Why it failed.
        reason: String,
    },
    /// Building the kernel with cargo failed.
    KernelBuild(String),
    /// QEMU could not be started, or stopped before the guest came up.
    Qemu(String),
    /// The guest stopped before the expected line appeared on its console.
    GuestExited {
        /// How it stopped.
        outcome: GuestOutcome,
        /// What was being waited for.
        waiting_for: String,
        /// The end of the serial console and of QEMU's stderr, for the report.
        tail: String,
    },
    /// A wait ran out of time (a guard against hangs, not a performance check).
    Timeout {
        /// What was being waited for.
        waiting_for: String,
        /// The end of the serial console, for the report.
        tail: String,
    },
    /// The QMP conversation failed (connect, protocol or a command's error).
    Qmp(String),
    /// A command-line value is invalid.
    Usage(String),
    /// The guest's network (a tap device) cannot be set up; the message says what to run.
    Network(String),
    /// An I/O error with context.
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: io::Error,
    },
}

impl Error {
    /// Wraps an I/O error with a short description of what was being done.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// A [`Error::Disk`]: `action` on the image at `path` failed because of `reason`.
    pub fn disk(path: &Path, action: &'static str, reason: impl fmt::Display) -> Self {
        Error::Disk {
            path: path.to_path_buf(),
            action,
            reason: reason.to_string(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::QemuMissing { program } => {
                write!(f, "`{program}` was not found on PATH: {INSTALL_HINT}")
            }
            Error::PortInUse { port, flag, source } => write!(
                f,
                "port {port} on 127.0.0.1 is already in use ({source}); stop what is listening \
                 there (`ss -ltnp 'sport = :{port}'` shows it) or pick another port with \
                 `{flag} PORT`"
            ),
            Error::Disk {
                path,
                action,
                reason,
            } => write!(
                f,
                "cannot {action} the disk image {}: {reason}; check the path and its \
                 permissions, or pass another image with `--disk PATH`",
                path.display()
            ),
            Error::KernelBuild(msg) => write!(f, "building the kernel failed: {msg}"),
            Error::Qemu(msg) => write!(f, "QEMU: {msg}"),
            Error::GuestExited {
                outcome,
                waiting_for,
                tail,
            } => write!(
                f,
                "the guest stopped while waiting for {waiting_for}: {outcome}\n{tail}"
            ),
            Error::Timeout { waiting_for, tail } => {
                write!(f, "timed out waiting for {waiting_for}\n{tail}")
            }
            Error::Qmp(msg) => write!(f, "QMP: {msg}"),
            Error::Usage(msg) | Error::Network(msg) => f.write_str(msg),
            Error::Io { context, source } => write!(f, "{context}: {source}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::PortInUse { source, .. } | Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// The runner's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_say_what_to_do() {
        let e = Error::QemuMissing {
            program: "qemu-system-x86_64".into(),
        };
        let m = e.to_string();
        assert!(
            m.contains("qemu-system-x86 ") && m.contains(".ci/setup"),
            "{m}"
        );
        assert!(m.contains("apt-get install"), "{m}");
        let e = Error::Disk {
            path: "/nope/d.qcow2".into(),
            action: "open",
            reason: "No such file or directory".into(),
        };
        let m = e.to_string();
        assert!(m.contains("/nope/d.qcow2") && m.contains("--disk"), "{m}");
    }
}
