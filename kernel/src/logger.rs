//! The `log` facade on the serial console.
//!
//! Each record is one line: `[    1.234567] INFO  target: message`, the timestamp being
//! seconds since the CPU started (see `time.rs`). The level is set from the command line
//! (`log=`); until then it is `info`.

use core::fmt::Write as _;

use log::{Level, LevelFilter, Log, Metadata, Record};

use crate::serial::Serial;
use crate::time;

struct SerialLogger;

static LOGGER: SerialLogger = SerialLogger;

impl Log for SerialLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let us = time::now_us();
        let level = match record.level() {
            Level::Error => "ERROR",
            Level::Warn => "WARN ",
            Level::Info => "INFO ",
            Level::Debug => "DEBUG",
            Level::Trace => "TRACE",
        };
        let target = record.target();
        let target = match target.strip_prefix("qcow_metal_kernel") {
            Some("") => "kernel",
            Some(rest) => rest.strip_prefix("::").unwrap_or(rest),
            None => target,
        };
        let _ = writeln!(
            Serial,
            "[{:5}.{:06}] {level} {target}: {}",
            us / 1_000_000,
            us % 1_000_000,
            record.args()
        );
    }

    fn flush(&self) {}
}

/// Installs the logger at `info`.
pub fn init() {
    // A second call (impossible in this kernel) would just keep the first logger.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(LevelFilter::Info);
}

/// Changes the most verbose level printed.
pub fn set_level(level: LevelFilter) {
    log::set_max_level(level);
}
