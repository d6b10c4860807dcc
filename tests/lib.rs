//! Shared helpers of the end-to-end tests: boot guests under QEMU (TCG) through the runner's
//! library and drive them from the host.
//!
//! Tests never skip: a missing host tool fails the test with a message that names the Debian
//! package to install (`bash .ci/setup` installs them all).

use std::path::PathBuf;
use std::time::Duration;

pub use qcow_metal_runner::guest::{Banner, Guest, GuestBuilder};
pub use qcow_metal_runner::qemu::Accel;
pub use qcow_metal_runner::{Error, GuestOutcome};

/// How long a boot may take before a test gives up. A guard against hangs only: under TCG
/// on a loaded two-core machine a boot takes well under a second; tests never assert on time.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

/// How long a test waits for a guest to exit on its own (same kind of guard).
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(300);

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
