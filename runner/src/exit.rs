//! How a guest ended, read from QEMU's exit status.
//!
//! The guest leaves through `isa-debug-exit` (port 0xf4): writing `v` there makes QEMU exit
//! with status `(v << 1) | 1`. The values are the guest's [`GuestExit`] codes; anything else
//! (QEMU's own errors, `quit`, signals) is reported as such.

use std::fmt;
use std::process::ExitStatus;

pub use qcow_metal::config::GuestExit;

/// How a guest (and its QEMU process) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestOutcome {
    /// Clean shutdown: metadata flushed, image closed (QEMU status 33).
    Clean,
    /// The guest rejected its kernel command line (QEMU status 35).
    BadConfig,
    /// The guest took a CPU exception (QEMU status 37).
    Fault,
    /// The guest panicked (QEMU status 39).
    Panic,
    /// The guest's heap ran out of memory (QEMU status 41).
    OutOfMemory,
    /// The guest shut down, but closing its disk failed: data may not be durable and the
    /// image may be left dirty (QEMU status 43).
    DiskError,
    /// QEMU exited with status 0: `quit` over QMP, an ACPI power-off the guest did itself,
    /// or a reset/triple fault under `-no-reboot`.
    QemuQuit,
    /// Any other QEMU status: 1 is QEMU's own error (see its stderr), odd values are guest
    /// codes this runner does not know.
    Other(i32),
    /// QEMU was killed by a signal (the runner's kill after a timeout, or from outside).
    Signal(i32),
}

impl GuestOutcome {
    /// Classifies a QEMU exit status.
    pub fn from_status(status: ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt;
        match status.code() {
            Some(code) => Self::from_code(code),
            None => GuestOutcome::Signal(status.signal().unwrap_or(0)),
        }
    }

    /// Classifies a QEMU exit code.
    pub fn from_code(code: i32) -> Self {
        match (code, GuestExit::from_qemu_status(code)) {
            (0, _) => GuestOutcome::QemuQuit,
            (_, Some(exit)) => Self::from_guest_exit(exit),
            (c, None) => GuestOutcome::Other(c),
        }
    }

    /// The outcome for one of the guest's own exits.
    pub fn from_guest_exit(exit: GuestExit) -> Self {
        match exit {
            GuestExit::Clean => GuestOutcome::Clean,
            GuestExit::BadConfig => GuestOutcome::BadConfig,
            GuestExit::Fault => GuestOutcome::Fault,
            GuestExit::Panic => GuestOutcome::Panic,
            GuestExit::OutOfMemory => GuestOutcome::OutOfMemory,
            GuestExit::DiskError => GuestOutcome::DiskError,
        }
    }

    /// The guest's own exit, when it left through `isa-debug-exit` with a known code.
    pub fn guest_exit(&self) -> Option<GuestExit> {
        match self {
            GuestOutcome::Clean => Some(GuestExit::Clean),
            GuestOutcome::BadConfig => Some(GuestExit::BadConfig),
            GuestOutcome::Fault => Some(GuestExit::Fault),
            GuestOutcome::Panic => Some(GuestExit::Panic),
            GuestOutcome::OutOfMemory => Some(GuestExit::OutOfMemory),
            GuestOutcome::DiskError => Some(GuestExit::DiskError),
            _ => None,
        }
    }

    /// QEMU's exit code, when it exited rather than being killed.
    pub fn qemu_code(&self) -> Option<i32> {
        match self {
            GuestOutcome::QemuQuit => Some(0),
            GuestOutcome::Other(c) => Some(*c),
            GuestOutcome::Signal(_) => None,
            guest => guest.guest_exit().map(GuestExit::qemu_status),
        }
    }

    /// Whether this is the guest's own clean shutdown.
    pub fn is_clean(&self) -> bool {
        *self == GuestOutcome::Clean
    }
}

impl fmt::Display for GuestOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuestOutcome::Clean => {
                f.write_str("the guest shut down cleanly, everything flushed (QEMU exit status 33)")
            }
            GuestOutcome::BadConfig => f.write_str(
                "the guest rejected its kernel command line (QEMU exit status 35); the console \
                 above names the bad value",
            ),
            GuestOutcome::Fault => f.write_str(
                "the guest took a CPU exception (QEMU exit status 37); the console above shows \
                 the vector, RIP, error code and CR2",
            ),
            GuestOutcome::Panic => f.write_str(
                "the guest panicked (QEMU exit status 39); the console above shows the message",
            ),
            GuestOutcome::OutOfMemory => f.write_str(
                "the guest ran out of memory (QEMU exit status 41); give it more with --memory",
            ),
            GuestOutcome::DiskError => f.write_str(
                "the guest shut down but closing its disk failed (QEMU exit status 43): recent \
                 writes may not be durable and the image may be left dirty; the console above \
                 shows the error",
            ),
            GuestOutcome::QemuQuit => f.write_str(
                "QEMU exited with status 0 (quit over QMP, or the guest reset under -no-reboot); \
                 the guest did not report a clean shutdown",
            ),
            GuestOutcome::Other(1) => {
                f.write_str("QEMU failed (exit status 1); its error message is above")
            }
            GuestOutcome::Other(c) => write!(f, "QEMU exited with unexpected status {c}"),
            GuestOutcome::Signal(s) => write!(f, "QEMU was killed by signal {s}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_codes_map_to_qemu_statuses() {
        assert_eq!(GuestOutcome::from_code(33), GuestOutcome::Clean);
        assert_eq!(GuestOutcome::from_code(35), GuestOutcome::BadConfig);
        assert_eq!(GuestOutcome::from_code(37), GuestOutcome::Fault);
        assert_eq!(GuestOutcome::from_code(39), GuestOutcome::Panic);
        assert_eq!(GuestOutcome::from_code(41), GuestOutcome::OutOfMemory);
        assert_eq!(GuestOutcome::from_code(43), GuestOutcome::DiskError);
        assert_eq!(GuestOutcome::from_code(0), GuestOutcome::QemuQuit);
        assert_eq!(GuestOutcome::from_code(1), GuestOutcome::Other(1));
        for exit in GuestExit::ALL {
            let o = GuestOutcome::from_guest_exit(exit);
            assert_eq!(o.guest_exit(), Some(exit));
            assert_eq!(GuestOutcome::from_code(o.qemu_code().unwrap()), o);
        }
        assert_eq!(GuestOutcome::Clean.qemu_code(), Some(33));
        assert_eq!(GuestOutcome::QemuQuit.qemu_code(), Some(0));
        assert_eq!(GuestOutcome::Signal(9).qemu_code(), None);
    }

    #[test]
    fn outcomes_are_described_in_words() {
        assert!(GuestOutcome::Clean.to_string().contains("cleanly"));
        assert!(GuestOutcome::BadConfig.to_string().contains("command line"));
        assert!(GuestOutcome::Fault.to_string().contains("vector"));
        assert!(
            GuestOutcome::DiskError
                .to_string()
                .contains("closing its disk failed")
        );
        assert!(!GuestOutcome::DiskError.is_clean());
        assert!(GuestOutcome::Signal(9).to_string().contains("signal 9"));
    }
}
