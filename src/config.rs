//! The guest's configuration: the kernel command line, parsed into a typed [`Config`], and the
//! [`GuestExit`] statuses the guest leaves QEMU with.
//!
//! The command line (QEMU `-append`, written by the runner) is a space-separated list of
//! `key=value` words:
//!
//! | key              | values                                   | default  |
//! |------------------|------------------------------------------|----------|
//! | `log`            | `error`, `warn`, `info`, `debug`, `trace`| `info`   |
//! | `ip`             | `dhcp` or `A.B.C.D/len`                  | `dhcp`   |
//! | `gw`             | `A.B.C.D`                                | none     |
//! | `dns`            | accepted and ignored                     |          |
//! | `metrics_port`   | 1..=65535                                | `9090`   |
//! | `nbd_port`       | 1..=65535                                | `10809`  |
//! | `export`         | NBD export name, 1..=4096 bytes          | `disk`   |
//! | `ro`             | `0` or `1`                               | `0`      |
//! | `format`         | `auto`, `qcow2`, `raw`                   | `auto`   |
//! | `l2_cache`       | bytes, with an optional `K`/`M`/`G` suffix | 1 MiB  |
//! | `refcount_cache` | bytes, with an optional `K`/`M`/`G` suffix | 256 KiB|
//! | `mirage_metrics` | `0` or `1`                               | `0`      |
//! | `grow`           | `0` or `1`: ask the runner to grow the disk's host file (see [`crate::hostfile`]) | `0` |
//! | `compact`        | `on`, `off`: online compaction in idle time | `on`  |
//! | `compact_after`  | bytes freed since the last pass that start one (`K`/`M`/`G`) | 16 MiB |
//! | `compact_rate`   | bytes moved per second at most (`K`/`M`/`G`), above 0 | 32 MiB |
//! | `compact_idle`   | NBD silence before a step, `MS`, `MSms` or `Ss` | `1s` |
//! | `debug_fault`    | `none`, `ud`, `pf`, `gp`                 | `none`   |
//!
//! An unknown key, or a word without `=`, is a [`ConfigWarning`]: the guest logs it and goes
//! on. A known key with a value it cannot accept is a [`ConfigError`] that names the key, the
//! value and what is accepted; the guest prints it and exits with [`GuestExit::BadConfig`].
//! When a key is given twice, the last one wins.

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;
use core::net::Ipv4Addr;

use log::LevelFilter;

/// How the guest leaves QEMU: the value written to QEMU's `isa-debug-exit` device.
///
/// With `-device isa-debug-exit,iobase=0xf4,iosize=0x04`, writing `v` to port `0xf4` makes QEMU
/// exit with status `(v << 1) | 1`; [`GuestExit::qemu_status`] computes that status and
/// [`GuestExit::from_qemu_status`] maps it back. The values are distinct from the statuses QEMU
/// uses for its own errors (0 and 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum GuestExit {
    /// Orderly shutdown (power button or a requested stop); everything was flushed. Status 33.
    Clean = 0x10,
    /// The kernel command line had an invalid value. Status 35.
    BadConfig = 0x11,
    /// A CPU exception (fault) that the kernel cannot handle. Status 37.
    Fault = 0x12,
    /// A Rust panic. Status 39.
    Panic = 0x13,
    /// The heap ran out of memory. Status 41.
    OutOfMemory = 0x14,
    /// Orderly shutdown, but closing the disk failed (metadata write-back or the final
    /// flush): what was written may not be durable and the image may be left dirty.
    /// Status 43.
    DiskError = 0x15,
}

impl GuestExit {
    /// Every exit, in value order.
    pub const ALL: [GuestExit; 6] = [
        GuestExit::Clean,
        GuestExit::BadConfig,
        GuestExit::Fault,
        GuestExit::Panic,
        GuestExit::OutOfMemory,
        GuestExit::DiskError,
    ];

    /// The byte the guest writes to the `isa-debug-exit` port.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The exit status QEMU ends with when the guest writes [`GuestExit::code`]:
    /// `(code << 1) | 1`.
    pub fn qemu_status(self) -> i32 {
        ((self as i32) << 1) | 1
    }

    /// The exit for a QEMU exit status, if the status is one of [`GuestExit::qemu_status`].
    pub fn from_qemu_status(status: i32) -> Option<GuestExit> {
        GuestExit::ALL
            .into_iter()
            .find(|exit| exit.qemu_status() == status)
    }

    /// A short human description ("clean shutdown", "CPU fault", ...).
    pub fn describe(self) -> &'static str {
        match self {
            GuestExit::Clean => "clean shutdown",
            GuestExit::BadConfig => "invalid kernel command line",
            GuestExit::Fault => "CPU fault",
            GuestExit::Panic => "kernel panic",
            GuestExit::OutOfMemory => "out of memory",
            GuestExit::DiskError => "shutdown with a disk error",
        }
    }
}

impl fmt::Display for GuestExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

/// How the guest gets its IPv4 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpConfig {
    /// Ask a DHCP server (QEMU's user-mode network gives 10.0.2.15).
    Dhcp,
    /// A fixed address and prefix length.
    Static {
        /// The guest's address.
        addr: Ipv4Addr,
        /// The network prefix length, 0..=32.
        prefix_len: u8,
    },
}

/// Which on-disk format the guest expects on its block device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    /// qcow2 if the device starts with the qcow2 magic, raw otherwise.
    Auto,
    /// qcow2; anything else is an error.
    Qcow2,
    /// The device's bytes are the virtual disk.
    Raw,
}

/// A CPU exception to raise on purpose right after the banner (for the fault tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DebugFault {
    /// No fault (the normal case).
    None,
    /// Invalid opcode (`ud2`), vector 6.
    Ud,
    /// Page fault (a read from an unmapped address), vector 14.
    Pf,
    /// General protection fault (a non-canonical address), vector 13.
    Gp,
}

/// The guest's typed configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The most verbose log level printed on the console.
    pub log: LevelFilter,
    /// The guest's address.
    pub ip: IpConfig,
    /// The default gateway, if any (DHCP supplies its own).
    pub gw: Option<Ipv4Addr>,
    /// TCP port of the Prometheus metrics endpoint.
    pub metrics_port: u16,
    /// TCP port of the NBD server.
    pub nbd_port: u16,
    /// Name of the NBD export.
    pub export: String,
    /// Serve the disk read-only.
    pub read_only: bool,
    /// The format of the block device's contents.
    pub format: DiskFormat,
    /// Size of the qcow2 L2-table cache in bytes.
    pub l2_cache: u64,
    /// Size of the qcow2 refcount-block cache in bytes.
    pub refcount_cache: u64,
    /// Also export ocaml-qcow's `Mirage_qcow_*` metric families.
    pub mirage_metrics: bool,
    /// A CPU exception to raise right after the banner.
    pub debug_fault: DebugFault,
    /// The disk's host file grows on demand: the guest asks the runner for room on its
    /// console (the runner sets `grow=1`); otherwise the device's size is all there is.
    pub grow: bool,
    /// When the guest compacts its image in idle time.
    pub compaction: CompactionPolicy,
    /// An NBD client that finished the handshake and sent nothing for this long (ms) is
    /// disconnected (`nbd_idle`; 0: never).
    pub nbd_idle_ms: u64,
    /// Most bytes of TCP socket buffers the listener pools may hold (`net_buffers`; `None`:
    /// the service layer's default, a share of the heap).
    pub net_buffers: Option<u64>,
}

/// The online compaction policy (`compact`, `compact_after`, `compact_rate`, `compact_idle`):
/// the guest moves clusters from the image's tail into free space below once enough was
/// freed, only while no NBD request came for a while, and at a bounded rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompactionPolicy {
    /// Compaction runs at all.
    pub enabled: bool,
    /// Bytes freed since the last pass that start a pass (at boot, anything compactable
    /// starts one).
    pub after_bytes: u64,
    /// Most bytes moved per second (above 0).
    pub rate_bytes_per_sec: u64,
    /// Milliseconds without an NBD request before compaction moves anything.
    pub idle_ms: u64,
}

impl CompactionPolicy {
    /// Default `compact_after`: 16 MiB (a large trim starts a pass, a few small ones do not).
    pub const DEFAULT_AFTER: u64 = 16 << 20;
    /// Default `compact_rate`: 32 MiB/s (a 64 MiB tail moves in seconds, host I/O stays light).
    pub const DEFAULT_RATE: u64 = 32 << 20;
    /// Default `compact_idle`: one second without NBD requests.
    pub const DEFAULT_IDLE_MS: u64 = 1000;
}

impl Default for CompactionPolicy {
    fn default() -> CompactionPolicy {
        CompactionPolicy {
            enabled: true,
            after_bytes: CompactionPolicy::DEFAULT_AFTER,
            rate_bytes_per_sec: CompactionPolicy::DEFAULT_RATE,
            idle_ms: CompactionPolicy::DEFAULT_IDLE_MS,
        }
    }
}

impl Config {
    /// Default metrics port.
    pub const DEFAULT_METRICS_PORT: u16 = 9090;
    /// Default NBD port (the IANA-assigned one).
    pub const DEFAULT_NBD_PORT: u16 = 10809;
    /// Default export name.
    pub const DEFAULT_EXPORT: &'static str = "disk";
    /// Default L2-table cache size: 1 MiB (QEMU's default, enough for 8 GiB of 64 KiB clusters).
    pub const DEFAULT_L2_CACHE: u64 = 1 << 20;
    /// Default refcount-block cache size: 256 KiB (a quarter of the L2 cache, as QEMU does).
    pub const DEFAULT_REFCOUNT_CACHE: u64 = 256 << 10;
    /// Default `nbd_idle`: 10 minutes.
    pub const DEFAULT_NBD_IDLE_MS: u64 = 600_000;
    /// Longest export name NBD allows.
    pub const MAX_EXPORT_LEN: usize = 4096;

    /// Parses a kernel command line. Returns the configuration and the warnings (unknown keys,
    /// words without `=`) the guest should log, or the first invalid value.
    pub fn parse(cmdline: &str) -> Result<(Config, Vec<ConfigWarning>), ConfigError> {
        let mut config = Config::default();
        let mut warnings = Vec::new();
        for word in cmdline.split_ascii_whitespace() {
            let Some((key, value)) = word.split_once('=') else {
                warnings.push(ConfigWarning::NotKeyValue(word.to_string()));
                continue;
            };
            let err = |expected: &'static str| ConfigError {
                key: key.to_string(),
                value: value.to_string(),
                expected,
            };
            match key {
                "log" => {
                    config.log = match value {
                        "off" => LevelFilter::Off,
                        "error" => LevelFilter::Error,
                        "warn" => LevelFilter::Warn,
                        "info" => LevelFilter::Info,
                        "debug" => LevelFilter::Debug,
                        "trace" => LevelFilter::Trace,
                        _ => return Err(err("one of off, error, warn, info, debug, trace")),
                    }
                }
                "ip" => {
                    config.ip = parse_ip(value).ok_or_else(|| err("dhcp or A.B.C.D/len"))?;
                }
                "gw" => {
                    config.gw = Some(
                        value
                            .parse::<Ipv4Addr>()
                            .map_err(|_| err("an IPv4 address A.B.C.D"))?,
                    );
                }
                "dns" => {}
                "metrics_port" => {
                    config.metrics_port = parse_port(value).ok_or_else(|| err(PORT_EXPECTED))?;
                }
                "nbd_port" => {
                    config.nbd_port = parse_port(value).ok_or_else(|| err(PORT_EXPECTED))?;
                }
                "export" => {
                    if value.is_empty() || value.len() > Config::MAX_EXPORT_LEN {
                        return Err(err("a name of 1 to 4096 bytes"));
                    }
                    config.export = value.to_string();
                }
                "ro" => config.read_only = parse_bool(value).ok_or_else(|| err("0 or 1"))?,
                "format" => {
                    config.format = match value {
                        "auto" => DiskFormat::Auto,
                        "qcow2" => DiskFormat::Qcow2,
                        "raw" => DiskFormat::Raw,
                        _ => return Err(err("one of auto, qcow2, raw")),
                    }
                }
                "l2_cache" => {
                    config.l2_cache = parse_size(value).ok_or_else(|| err(SIZE_EXPECTED))?;
                }
                "refcount_cache" => {
                    config.refcount_cache = parse_size(value).ok_or_else(|| err(SIZE_EXPECTED))?;
                }
                "mirage_metrics" => {
                    config.mirage_metrics = parse_bool(value).ok_or_else(|| err("0 or 1"))?;
                }
                "grow" => config.grow = parse_bool(value).ok_or_else(|| err("0 or 1"))?,
                "compact" => {
                    config.compaction.enabled = match value {
                        "on" => true,
                        "off" => false,
                        _ => return Err(err("on or off")),
                    }
                }
                "compact_after" => {
                    config.compaction.after_bytes =
                        parse_size(value).ok_or_else(|| err(SIZE_EXPECTED))?;
                }
                "compact_rate" => {
                    config.compaction.rate_bytes_per_sec = parse_size(value)
                        .filter(|&r| r > 0)
                        .ok_or_else(|| err(RATE_EXPECTED))?;
                }
                "nbd_idle" => {
                    config.nbd_idle_ms =
                        parse_duration_ms(value).ok_or_else(|| err(DURATION_EXPECTED))?;
                }
                "net_buffers" => {
                    config.net_buffers = Some(parse_size(value).ok_or_else(|| err(SIZE_EXPECTED))?);
                }
                "compact_idle" => {
                    config.compaction.idle_ms =
                        parse_duration_ms(value).ok_or_else(|| err(DURATION_EXPECTED))?;
                }
                "debug_fault" => {
                    config.debug_fault = match value {
                        "none" => DebugFault::None,
                        "ud" => DebugFault::Ud,
                        "pf" => DebugFault::Pf,
                        "gp" => DebugFault::Gp,
                        _ => return Err(err("one of none, ud, pf, gp")),
                    }
                }
                _ => warnings.push(ConfigWarning::UnknownKey(key.to_string())),
            }
        }
        Ok((config, warnings))
    }
}

impl Default for Config {
    fn default() -> Config {
        Config {
            log: LevelFilter::Info,
            ip: IpConfig::Dhcp,
            gw: None,
            metrics_port: Config::DEFAULT_METRICS_PORT,
            nbd_port: Config::DEFAULT_NBD_PORT,
            export: String::from(Config::DEFAULT_EXPORT),
            read_only: false,
            format: DiskFormat::Auto,
            l2_cache: Config::DEFAULT_L2_CACHE,
            refcount_cache: Config::DEFAULT_REFCOUNT_CACHE,
            mirage_metrics: false,
            debug_fault: DebugFault::None,
            grow: false,
            compaction: CompactionPolicy::default(),
            nbd_idle_ms: Config::DEFAULT_NBD_IDLE_MS,
            net_buffers: None,
        }
    }
}

const PORT_EXPECTED: &str = "a TCP port number from 1 to 65535";
const SIZE_EXPECTED: &str = "a byte count, optionally with a K, M or G suffix (e.g. 4M)";
const RATE_EXPECTED: &str =
    "bytes per second above 0, optionally with a K, M or G suffix (e.g. 32M)";
const DURATION_EXPECTED: &str = "milliseconds, or a number with an ms or s suffix (e.g. 1s)";

/// Something on the command line the guest ignores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigWarning {
    /// A `key=value` word whose key the guest does not know.
    UnknownKey(String),
    /// A word without `=`.
    NotKeyValue(String),
}

impl fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigWarning::UnknownKey(key) => {
                write!(f, "unknown kernel argument {key:?} ignored")
            }
            ConfigWarning::NotKeyValue(word) => {
                write!(f, "kernel argument {word:?} is not key=value; ignored")
            }
        }
    }
}

/// A known key with a value the guest cannot accept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The key as written.
    pub key: String,
    /// The rejected value as written.
    pub value: String,
    /// What the key accepts.
    pub expected: &'static str,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid value {:?} for kernel argument {}: expected {}",
            self.value, self.key, self.expected
        )
    }
}

impl core::error::Error for ConfigError {}

fn parse_port(value: &str) -> Option<u16> {
    match parse_decimal(value)? {
        port @ 1..=65535 => Some(port as u16),
        _ => None,
    }
}

fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "0" => Some(false),
        "1" => Some(true),
        _ => None,
    }
}

/// Digits only (no sign, no spaces), without overflow.
fn parse_decimal(value: &str) -> Option<u64> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok()
}

/// `1234`, `64K`, `4M`, `1G` (either case; binary multiples).
fn parse_size(value: &str) -> Option<u64> {
    let (digits, shift) = match value.as_bytes().last()? {
        b'k' | b'K' => (&value[..value.len() - 1], 10),
        b'm' | b'M' => (&value[..value.len() - 1], 20),
        b'g' | b'G' => (&value[..value.len() - 1], 30),
        _ => (value, 0),
    };
    parse_decimal(digits)?.checked_mul(1u64 << shift)
}

/// `250`, `250ms` (milliseconds) or `2s` (seconds).
fn parse_duration_ms(value: &str) -> Option<u64> {
    if let Some(ms) = value.strip_suffix("ms") {
        parse_decimal(ms)
    } else if let Some(s) = value.strip_suffix('s') {
        parse_decimal(s)?.checked_mul(1000)
    } else {
        parse_decimal(value)
    }
}

fn parse_ip(value: &str) -> Option<IpConfig> {
    if value == "dhcp" {
        return Some(IpConfig::Dhcp);
    }
    let (addr, len) = value.split_once('/')?;
    let addr = addr.parse::<Ipv4Addr>().ok()?;
    match parse_decimal(len)? {
        prefix_len @ 0..=32 => Some(IpConfig::Static {
            addr,
            prefix_len: prefix_len as u8,
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn ok(cmdline: &str) -> Config {
        let (config, warnings) = Config::parse(cmdline).expect("valid command line");
        assert!(warnings.is_empty(), "unexpected warnings {warnings:?}");
        config
    }

    fn bad(cmdline: &str) -> ConfigError {
        Config::parse(cmdline).expect_err("invalid command line")
    }

    #[test]
    fn empty_command_line_gives_defaults() {
        let config = ok("");
        assert_eq!(config, Config::default());
        assert_eq!(config.log, LevelFilter::Info);
        assert_eq!(config.ip, IpConfig::Dhcp);
        assert_eq!(config.gw, None);
        assert_eq!(config.metrics_port, 9090);
        assert_eq!(config.nbd_port, 10809);
        assert_eq!(config.export, "disk");
        assert!(!config.read_only);
        assert_eq!(config.format, DiskFormat::Auto);
        assert_eq!(config.l2_cache, 1 << 20);
        assert_eq!(config.refcount_cache, 256 << 10);
        assert!(!config.mirage_metrics);
        assert_eq!(config.debug_fault, DebugFault::None);
        assert!(!config.grow);
        assert!(config.compaction.enabled);
        assert_eq!(config.compaction.after_bytes, 16 << 20);
        assert_eq!(config.compaction.rate_bytes_per_sec, 32 << 20);
        assert_eq!(config.compaction.idle_ms, 1000);
        assert_eq!(ok("   \t "), Config::default());
    }

    #[test]
    fn every_key_is_parsed() {
        let config = ok("log=trace ip=192.168.7.2/24 gw=192.168.7.1 dns=1.1.1.1 \
             metrics_port=19090 nbd_port=20809 export=vm1 ro=1 format=qcow2 \
             l2_cache=4M refcount_cache=64k mirage_metrics=1 debug_fault=pf \
             compact=off compact_after=1G compact_rate=8M compact_idle=250ms grow=1 \
             nbd_idle=90s net_buffers=16M");
        assert_eq!(
            config,
            Config {
                log: LevelFilter::Trace,
                ip: IpConfig::Static {
                    addr: Ipv4Addr::new(192, 168, 7, 2),
                    prefix_len: 24
                },
                gw: Some(Ipv4Addr::new(192, 168, 7, 1)),
                metrics_port: 19090,
                nbd_port: 20809,
                export: "vm1".into(),
                read_only: true,
                format: DiskFormat::Qcow2,
                l2_cache: 4 << 20,
                refcount_cache: 64 << 10,
                mirage_metrics: true,
                debug_fault: DebugFault::Pf,
                grow: true,
                compaction: CompactionPolicy {
                    enabled: false,
                    after_bytes: 1 << 30,
                    rate_bytes_per_sec: 8 << 20,
                    idle_ms: 250,
                },
                nbd_idle_ms: 90_000,
                net_buffers: Some(16 << 20),
            }
        );
    }

    #[test]
    fn each_enumerated_value() {
        for (word, level) in [
            ("off", LevelFilter::Off),
            ("error", LevelFilter::Error),
            ("warn", LevelFilter::Warn),
            ("info", LevelFilter::Info),
            ("debug", LevelFilter::Debug),
            ("trace", LevelFilter::Trace),
        ] {
            assert_eq!(ok(&format!("log={word}")).log, level);
        }
        for (word, format) in [
            ("auto", DiskFormat::Auto),
            ("qcow2", DiskFormat::Qcow2),
            ("raw", DiskFormat::Raw),
        ] {
            assert_eq!(ok(&format!("format={word}")).format, format);
        }
        for (word, fault) in [
            ("none", DebugFault::None),
            ("ud", DebugFault::Ud),
            ("pf", DebugFault::Pf),
            ("gp", DebugFault::Gp),
        ] {
            assert_eq!(ok(&format!("debug_fault={word}")).debug_fault, fault);
        }
        assert!(!ok("ro=0").read_only);
        assert!(ok("ro=1").read_only);
        assert_eq!(ok("ip=dhcp").ip, IpConfig::Dhcp);
        assert_eq!(
            ok("ip=10.0.0.1/0").ip,
            IpConfig::Static {
                addr: Ipv4Addr::new(10, 0, 0, 1),
                prefix_len: 0
            }
        );
    }

    #[test]
    fn sizes_take_binary_suffixes() {
        assert_eq!(ok("l2_cache=0").l2_cache, 0);
        assert_eq!(ok("l2_cache=65536").l2_cache, 65536);
        assert_eq!(ok("l2_cache=64K").l2_cache, 65536);
        assert_eq!(ok("l2_cache=2m").l2_cache, 2 << 20);
        assert_eq!(ok("l2_cache=1G").l2_cache, 1 << 30);
        assert_eq!(ok("refcount_cache=3g").refcount_cache, 3 << 30);
        assert_eq!(
            ok("l2_cache=18446744073709551615").l2_cache,
            u64::MAX,
            "the largest plain number fits"
        );
    }

    #[test]
    fn compaction_policy_keys() {
        assert!(ok("compact=on").compaction.enabled);
        assert!(!ok("compact=off").compaction.enabled);
        assert_eq!(ok("compact_after=0").compaction.after_bytes, 0);
        assert_eq!(ok("compact_after=64K").compaction.after_bytes, 64 << 10);
        assert_eq!(ok("compact_rate=1").compaction.rate_bytes_per_sec, 1);
        assert_eq!(ok("compact_rate=2G").compaction.rate_bytes_per_sec, 2 << 30);
        assert_eq!(ok("compact_idle=0").compaction.idle_ms, 0);
        assert_eq!(ok("compact_idle=1500").compaction.idle_ms, 1500);
        assert_eq!(ok("compact_idle=40ms").compaction.idle_ms, 40);
        assert_eq!(ok("compact_idle=3s").compaction.idle_ms, 3000);
        // The other keys of the policy keep their defaults.
        let c = ok("compact_rate=4M").compaction;
        assert_eq!(
            c,
            CompactionPolicy {
                rate_bytes_per_sec: 4 << 20,
                ..CompactionPolicy::default()
            }
        );
        assert_eq!(
            bad("compact_rate=0").to_string(),
            "invalid value \"0\" for kernel argument compact_rate: expected bytes per \
             second above 0, optionally with a K, M or G suffix (e.g. 32M)"
        );
    }

    #[test]
    fn last_occurrence_wins() {
        assert_eq!(ok("nbd_port=1 nbd_port=2").nbd_port, 2);
        assert_eq!(ok("ip=1.2.3.4/8 ip=dhcp").ip, IpConfig::Dhcp);
    }

    #[test]
    fn unknown_and_bare_words_are_warnings() {
        let (config, warnings) =
            Config::parse("console=ttyS0 quiet nbd_port=1234 =x").expect("warnings only");
        assert_eq!(config.nbd_port, 1234);
        assert_eq!(
            warnings,
            vec![
                ConfigWarning::UnknownKey("console".into()),
                ConfigWarning::NotKeyValue("quiet".into()),
                ConfigWarning::UnknownKey("".into()),
            ]
        );
        assert_eq!(
            warnings[0].to_string(),
            "unknown kernel argument \"console\" ignored"
        );
        assert_eq!(
            warnings[1].to_string(),
            "kernel argument \"quiet\" is not key=value; ignored"
        );
    }

    #[test]
    fn invalid_values_name_key_value_and_what_is_accepted() {
        let e = bad("log=info metrics_port=abc");
        assert_eq!(e.key, "metrics_port");
        assert_eq!(e.value, "abc");
        assert_eq!(
            e.to_string(),
            "invalid value \"abc\" for kernel argument metrics_port: \
             expected a TCP port number from 1 to 65535"
        );
        for cmdline in [
            "metrics_port=0",
            "metrics_port=65536",
            "metrics_port=-1",
            "metrics_port=+80",
            "metrics_port=",
            "nbd_port=99999999999999999999999",
            "log=verbose",
            "log=INFO",
            "ip=10.0.2.15",
            "ip=10.0.2.15/33",
            "ip=10.0.2/24",
            "ip=10.0.2.256/24",
            "ip=",
            "gw=dhcp",
            "gw=1.2.3.4/24",
            "export=",
            "ro=yes",
            "ro=2",
            "format=vmdk",
            "l2_cache=",
            "l2_cache=K",
            "l2_cache=1T",
            "l2_cache=1.5M",
            "l2_cache=-1",
            "l2_cache=17179869184G",
            "refcount_cache=lots",
            "mirage_metrics=true",
            "grow=yes",
            "debug_fault=de",
            "compact=1",
            "compact=ON",
            "compact=",
            "compact_after=lots",
            "compact_after=-1M",
            "compact_rate=0",
            "compact_rate=0M",
            "compact_rate=1T",
            "compact_idle=1m",
            "compact_idle=1.5s",
            "compact_idle=s",
            "compact_idle=ms",
            "compact_idle=18446744073709552s",
        ] {
            let e = bad(cmdline);
            let (key, value) = cmdline.split_once('=').unwrap();
            assert_eq!(
                (e.key.as_str(), e.value.as_str()),
                (key, value),
                "{cmdline}"
            );
            let message = e.to_string();
            assert!(
                message.contains(key) && message.contains("expected"),
                "{message}"
            );
        }
    }

    #[test]
    fn export_names_are_bounded() {
        let longest = "x".repeat(Config::MAX_EXPORT_LEN);
        assert_eq!(ok(&format!("export={longest}")).export, longest);
        bad(&format!("export={longest}y"));
        assert_eq!(ok("export=a=b").export, "a=b", "only the first = splits");
    }

    #[test]
    fn guest_exit_statuses_round_trip() {
        assert_eq!(GuestExit::Clean.qemu_status(), 33);
        assert_eq!(GuestExit::BadConfig.qemu_status(), 35);
        assert_eq!(GuestExit::Fault.qemu_status(), 37);
        assert_eq!(GuestExit::Panic.qemu_status(), 39);
        assert_eq!(GuestExit::OutOfMemory.qemu_status(), 41);
        assert_eq!(GuestExit::DiskError.qemu_status(), 43);
        for exit in GuestExit::ALL {
            assert_eq!(exit.qemu_status(), (i32::from(exit.code()) << 1) | 1);
            assert_eq!(GuestExit::from_qemu_status(exit.qemu_status()), Some(exit));
        }
        for status in [0, 1, 2, 32, 34, 45, -1, 255] {
            assert_eq!(GuestExit::from_qemu_status(status), None, "{status}");
        }
    }
}
