//! The host side of qcow-metal: build the guest kernel, prepare its disk, boot it under QEMU,
//! talk to it over QMP, and the `image` tools on the qcow2 library.
//!
//! The `qcow-metal` command (`src/main.rs`) is a thin CLI over this library, and the
//! end-to-end tests (`tests/`) boot guests with [`guest::Guest::builder`].
//!
//! - [`kernel`]: builds `kernel/` (release) into its own target directory.
//! - [`disk`]: the default disk, qcow2 header probe, file sizing for the guest.
//! - [`qemu`]: finding QEMU, accelerators, QEMU's command line.
//! - [`guest`]: a running guest: console, ports, QMP, shutdown, kill on drop.
//! - [`guard`]: checks and locks on the disk file before anything is touched; whole-or-nothing
//!   file creation.
//! - [`spawn`]: QEMU under `setpriv --pdeathsig KILL`, so it dies with the runner.
//! - [`rundir`]: per-guest private directories, and those of killed runners removed.
//! - [`net`]: user-mode or tap networking; the host side of a tap.
//! - [`qmp`]: a small typed QMP client.
//! - [`scrape`]: `qcow-metal scrape`, a summary of a guest's metrics.
//! - [`serve`]: `qcow-metal serve`, the engine as a native NBD server with `/metrics`.
//! - [`console`]: capture and tee of the serial console.
//! - [`exit`]: the guest's exit statuses in words.
//! - [`hostfile`]: the disk's file grows when the guest asks and is cut to the image's end.
//! - [`image`]: `image create|info|check|map|compact`.
//! - [`convert`]: `image convert` and `image resize`.
//! - [`ports`], [`units`]: host ports and byte sizes.

pub mod console;
pub mod convert;
pub mod disk;
pub mod error;
pub mod exit;
pub mod guard;
pub mod guest;
pub mod hostfile;
pub mod image;
pub mod kernel;
pub mod net;
pub mod ports;
pub mod qemu;
pub mod qmp;
pub mod rundir;
pub mod scrape;
pub mod serve;
pub mod spawn;
pub mod units;

pub use error::{Error, Result};
pub use exit::GuestOutcome;
pub use guest::{Banner, Guest, GuestBuilder};
