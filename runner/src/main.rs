//! `qcow-metal`: build the unikernel, boot it under QEMU on a qcow2 disk, and work on qcow2
//! images. `cargo run` at the workspace root runs `qcow-metal run` with the defaults.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

mod bench;

use qcow_metal::config::{Config, IpConfig};
use qcow_metal_runner::convert::{self, ConvertOptions, Format};
use qcow_metal_runner::disk::{self, GuestFormat};
use qcow_metal_runner::image::{self, CreateOptions};
use qcow_metal_runner::kernel::{self, BuildOutput};
use qcow_metal_runner::net::{self, NetMode};
use qcow_metal_runner::qemu::{self, Accel, GUEST_METRICS_PORT, GUEST_NBD_PORT};
use qcow_metal_runner::scrape;
use qcow_metal_runner::serve;
use qcow_metal_runner::units::{format_size, parse_size};
use qcow_metal_runner::{Error, Guest, GuestOutcome, guard, ports, spawn};

/// Boot the qcow-metal unikernel under QEMU, or work on qcow2 images.
///
/// Without a subcommand, `run` is assumed: build the kernel, create the default disk if
/// needed, boot, print the URLs, and shut down cleanly on Ctrl-C.
#[derive(Parser)]
#[command(name = "qcow-metal", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Boot the guest (the default).
    Run(RunArgs),
    /// Run every benchmark comparison and write one report: a table of ratios (report.md)
    /// and a chart (report.png)
    Bench(bench::BenchArgs),
    /// Create, inspect, check and map qcow2 images with the project's own engine.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Summarise a running guest's metrics: rates, space, errors and health, from two
    /// scrapes a few seconds apart.
    Scrape {
        /// The guest's metrics URL (`http://HOST:PORT/metrics`, or `HOST[:PORT]`)
        #[arg(default_value = scrape::DEFAULT_URL)]
        url: String,
        /// Time between the two scrapes (seconds, or e.g. 500ms, 5s)
        #[arg(long, value_name = "TIME", default_value = "2", value_parser = scrape::parse_interval)]
        interval: Duration,
    },
    /// Serve a qcow2 image (with its backing chain) or a raw file over NBD with the
    /// project's engine on the host (no guest), with the guest's Prometheus metrics; Ctrl-C
    /// closes the image clean
    Serve(ServeArgs),
}

#[derive(Args, Clone)]
struct ServeArgs {
    /// The image to export (qcow2, or a raw file)
    image: PathBuf,
    /// NBD port (0: any free port, printed at start)
    #[arg(long, value_name = "PORT", default_value_t = GUEST_NBD_PORT)]
    nbd_port: u16,
    /// Metrics port: /metrics, / and /healthz (0: any free port, printed at start)
    #[arg(long, value_name = "PORT", default_value_t = GUEST_METRICS_PORT)]
    metrics_port: u16,
    /// NBD export name (the empty name selects it too)
    #[arg(long, value_name = "NAME", default_value = "disk")]
    export: String,
    /// Open the image read-only and export it read-only
    #[arg(long)]
    read_only: bool,
    /// How to take the file's bytes: auto (qcow2 when it has the qcow2 magic, else raw;
    /// a qcow2 image with a damaged magic is refused), qcow2 or raw
    #[arg(long, value_name = "auto|qcow2|raw", default_value = "auto")]
    format: GuestFormat,
    /// Address both ports listen on (e.g. 0.0.0.0 for every interface)
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1")]
    bind: std::net::IpAddr,
    /// Disconnect an NBD client that finished the handshake and sent nothing for this many
    /// seconds (0: never), like the guest's nbd_idle=
    #[arg(long, value_name = "SECS", default_value_t = Config::DEFAULT_NBD_IDLE_MS / 1000)]
    nbd_idle: u64,
}

#[derive(Args, Clone)]
struct RunArgs {
    /// Disk image (qcow2, or raw with `--format raw`); created when missing
    /// [default: target/qcow-metal/disk.qcow2]
    #[arg(long, value_name = "PATH")]
    disk: Option<PathBuf>,
    /// Virtual size of a disk that is created
    #[arg(long, value_name = "SIZE", default_value = "1G", value_parser = parse_size)]
    size: u64,
    /// Guest memory (MiB, or with a unit: 512M, 1G)
    #[arg(long, value_name = "SIZE", default_value = "256", value_parser = parse_memory_mib)]
    memory: u32,
    /// Accelerator: auto tries KVM and falls back to TCG when KVM is missing or the guest
    /// does not come up on it
    #[arg(long, value_name = "auto|kvm|tcg", default_value = "auto")]
    accel: Accel,
    /// Host port (127.0.0.1) forwarded to the guest's Prometheus metrics (guest port 9090)
    #[arg(long, value_name = "PORT", default_value_t = GUEST_METRICS_PORT)]
    metrics_port: u16,
    /// Host port (127.0.0.1) forwarded to the guest's NBD export (guest port 10809)
    #[arg(long, value_name = "PORT", default_value_t = GUEST_NBD_PORT)]
    nbd_port: u16,
    /// Network: user (QEMU's user-mode network, ports forwarded to 127.0.0.1) or tap (the
    /// guest has its own IP address on a tap device; see --tap and --ip)
    #[arg(long, value_name = "user|tap", default_value = "user")]
    net: NetMode,
    /// Tap device for --net tap (implies it): attached as it is when it exists; otherwise
    /// created (needs root), given the host's address, and removed at exit [default:
    /// qcow-metal0]
    #[arg(long, value_name = "NAME")]
    tap: Option<String>,
    /// The guest's address on the tap: A.B.C.D/len, or dhcp [default: 10.213.0.2/24 with the
    /// host at 10.213.0.1 on a tap the runner creates; the address after the host's on a
    /// ready-made tap]. On the user-mode network only dhcp (ask QEMU's DHCP) [default:
    /// 10.0.2.15/24, given statically]
    #[arg(long, value_name = "A.B.C.D/len|dhcp", value_parser = net::parse_guest_ip)]
    ip: Option<IpConfig>,
    /// Also write the serial console to this file [default: target/qcow-metal/serial.log]
    #[arg(long, value_name = "PATH")]
    serial_log: Option<PathBuf>,
    /// Serve QMP for your own tools on this Unix socket [default: target/qcow-metal/qmp.sock]
    #[arg(long, value_name = "PATH")]
    qmp: Option<PathBuf>,
    /// Extra kernel arguments, e.g. "log=debug" (space-separated key=value)
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    append: Vec<String>,
    /// Give the guest a read-only disk (and export it read-only)
    #[arg(long)]
    read_only: bool,
    /// How the guest takes the disk: auto (qcow2 if it has the qcow2 magic), qcow2, raw
    #[arg(long, value_name = "auto|qcow2|raw", default_value = "auto")]
    format: GuestFormat,
    /// Boot this kernel ELF instead of building kernel/
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Create an empty qcow2 image (version 3)
    Create {
        /// The new image file
        path: PathBuf,
        /// Virtual size
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        size: u64,
        /// Cluster size, a power of two from 512 to 2M
        #[arg(long, value_name = "SIZE", default_value = "64K", value_parser = parse_size)]
        cluster_size: u64,
        /// Refcount width in bits: 1, 2, 4, 8, 16, 32 or 64
        #[arg(long, value_name = "BITS", default_value_t = 16)]
        refcount_bits: u32,
        /// Extended L2 entries: each cluster in 32 subclusters, allocated and zeroed on
        /// their own (like `qemu-img create -o extended_l2=on`; clusters of 16K or more)
        #[arg(long)]
        extended_l2: bool,
    },
    /// Show an image's format, sizes and features
    Info {
        /// The image file
        path: PathBuf,
        /// Also show every layer of its backing chain (as `qemu-img info --backing-chain`)
        #[arg(long)]
        backing_chain: bool,
    },
    /// Check an image for leaked clusters and corruptions, like `qemu-img check` (exit
    /// status 0 clean, 1 check errors, 2 corruptions, 3 leaks)
    Check {
        /// The image file
        path: PathBuf,
        /// Fix leaks and rebuild refcounts
        #[arg(long)]
        repair: bool,
    },
    /// Show which guest ranges are data, zero or unallocated, and where their data is
    Map {
        /// The image file
        path: PathBuf,
    },
    /// List, create, apply or delete internal snapshots, like `qemu-img snapshot`
    #[command(group(clap::ArgGroup::new("action").required(true).args(["list", "create", "apply", "delete"])))]
    Snapshot {
        /// List the snapshots
        #[arg(short = 'l')]
        list: bool,
        /// Create a snapshot of the current state
        #[arg(short = 'c', value_name = "NAME")]
        create: Option<String>,
        /// Revert the current state to a snapshot (ID or name)
        #[arg(short = 'a', value_name = "NAME")]
        apply: Option<String>,
        /// Delete a snapshot (ID or name)
        #[arg(short = 'd', value_name = "NAME")]
        delete: Option<String>,
        /// The image file
        path: PathBuf,
    },
    /// Move clusters from the end of the image into free space nearer the start and cut
    /// the file to the new image end (the image must not be in use)
    Compact {
        /// The image file
        path: PathBuf,
    },
    /// Copy a disk into a new raw or qcow2 file, optionally compressed, like `qemu-img
    /// convert` (zero and unallocated ranges are skipped: the output is sparse)
    Convert {
        /// Compress the output's clusters (qcow2 output; clusters that do not shrink are
        /// stored as they are)
        #[arg(short = 'c')]
        compress: bool,
        /// Source format, raw or qcow2 (probed when not given)
        #[arg(short = 'f', value_name = "FMT", value_parser = Format::parse)]
        src_format: Option<Format>,
        /// Output format, raw or qcow2 (raw by default, as with qemu-img)
        #[arg(short = 'O', value_name = "FMT", value_parser = Format::parse, default_value = "raw")]
        out_format: Format,
        /// Output options, comma-separated (qcow2): cluster_size=SIZE, refcount_bits=N,
        /// compression_type=zlib|zstd, lazy_refcounts=on|off, extended_l2=on|off,
        /// compat=1.1|0.10 (0.10: a version 2 image), preallocation=off|metadata|falloc|full
        /// (raw output takes only preallocation, without metadata)
        #[arg(short = 'o', value_name = "OPTIONS")]
        options: Vec<String>,
        /// Convert an internal snapshot of a qcow2 source: NAME_OR_ID, snapshot.name=NAME
        /// or snapshot.id=ID
        #[arg(short = 'l', value_name = "SNAPSHOT")]
        snapshot: Option<String>,
        /// Zero runs of at least this many bytes (a multiple of 512, up to 16M) are left
        /// unwritten (default 4K); 0 writes everything (a fully allocated output)
        #[arg(short = 'S', value_name = "SIZE", value_parser = parse_size)]
        sparse_size: Option<u64>,
        /// Compression threads (1-16; default one per core, at least 4 as QEMU's qcow2
        /// driver)
        #[arg(short = 'm', value_name = "N", value_parser = clap::value_parser!(u16).range(1..=16))]
        threads: Option<u16>,
        /// Allow out-of-order writes (accepted for qemu-img compatibility and ignored: one
        /// thread writes the output in order; with -c the compressors run up to two
        /// chunks per thread ahead of it, so they do not wait on the order)
        #[arg(short = 'W')]
        out_of_order: bool,
        /// Make the output an overlay on this backing file (qcow2 output; a relative name is
        /// relative to the output's directory): only what the source's top layer holds is
        /// written
        #[arg(short = 'B', value_name = "BACKING")]
        backing: Option<String>,
        /// Format of the backing file, raw or qcow2 (probed when not given)
        #[arg(short = 'F', value_name = "FMT", value_parser = Format::parse)]
        backing_format: Option<Format>,
        /// Convert into an existing output of at least the source's size (opened as -O
        /// says, raw by default): nothing is created; where the source reads zeros the output
        /// is zeroed; -o, -B and -c do not go with it
        #[arg(short = 'n')]
        existing: bool,
        /// No progress bar
        #[arg(short = 'q')]
        quiet: bool,
        /// The source image
        src: PathBuf,
        /// The output file (replaced if it exists; with -n, written into)
        dst: PathBuf,
    },
    /// Change an image's virtual size, like `qemu-img resize` (the image must not be in use)
    Resize {
        /// Allow a smaller size (data past the new end is lost)
        #[arg(long)]
        shrink: bool,
        /// Image format, raw or qcow2 (probed when not given)
        #[arg(short = 'f', value_name = "FMT", value_parser = Format::parse)]
        format: Option<Format>,
        /// The image file
        path: PathBuf,
        /// The new size: SIZE, +SIZE or -SIZE (e.g. 10G, +1G, -512M)
        #[arg(allow_hyphen_values = true)]
        size: String,
    },
}

fn parse_memory_mib(text: &str) -> Result<u32, String> {
    let bytes = if text.bytes().all(|b| b.is_ascii_digit()) {
        text.parse::<u64>()
            .map_err(|e| format!("`{text}`: {e}"))?
            .saturating_mul(1 << 20)
    } else {
        parse_size(text)?
    };
    let mib = bytes >> 20;
    if !(32..=1 << 20).contains(&mib) {
        return Err(format!("`{text}`: guest memory must be from 32M to 1T"));
    }
    u32::try_from(mib).map_err(|_| format!("`{text}` is too large"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        None => run(cli.run),
        Some(Command::Run(args)) => run(args),
        Some(Command::Bench(args)) => Ok(bench::run(&args)),
        Some(Command::Image(cmd)) => image_command(cmd),
        Some(Command::Scrape { url, interval }) => scrape_command(&url, interval),
        Some(Command::Serve(args)) => serve_command(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("qcow-metal: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn image_command(cmd: ImageCommand) -> Result<ExitCode, Error> {
    match cmd {
        ImageCommand::Create {
            path,
            size,
            cluster_size,
            refcount_bits,
            extended_l2,
        } => {
            let opts = CreateOptions {
                size,
                cluster_size,
                refcount_bits,
                extended_l2,
            };
            image::create(&path, opts)?;
            out(&format!(
                "created {}: qcow2, {} virtual, {} clusters{}, {}-bit refcounts\n",
                path.display(),
                format_size(size),
                format_size(cluster_size),
                if extended_l2 { " with subclusters" } else { "" },
                refcount_bits
            ))
        }
        ImageCommand::Info {
            path,
            backing_chain: false,
        } => out(&image::info(&path)?),
        ImageCommand::Info {
            path,
            backing_chain: true,
        } => out(&image::info_chain(&path)?),
        ImageCommand::Check { path, repair } => {
            let report = image::check(&path, repair)?;
            let code = ExitCode::from(image::check_exit_code(&report));
            out(&format!("{report}\n")).map(|written| {
                if written == ExitCode::SUCCESS {
                    code
                } else {
                    written
                }
            })
        }
        ImageCommand::Map { path } => out(&image::map(&path)?),
        ImageCommand::Snapshot {
            create,
            apply,
            delete,
            path,
            ..
        } => {
            let action = match (create, apply, delete) {
                (Some(n), _, _) => image::SnapshotAction::Create(n),
                (_, Some(n), _) => image::SnapshotAction::Apply(n),
                (_, _, Some(n)) => image::SnapshotAction::Delete(n),
                _ => image::SnapshotAction::List,
            };
            out(&image::snapshot(&path, &action)?)
        }
        ImageCommand::Compact { path } => {
            // A bar on stderr when it is a terminal (hidden otherwise): bytes given back.
            let bar = indicatif::ProgressBar::new(0).with_style(
                indicatif::ProgressStyle::with_template(
                    "compacting {bar:40} {bytes}/{total_bytes} given back ({elapsed})",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            let r = image::compact(&path, |done, total| {
                bar.set_length(total);
                bar.set_position(done);
            });
            bar.finish_and_clear();
            let s = r?;
            out(&format!(
                "compacted {}: moved {} ({} clusters) in {} step{}; image end {} -> {}; file {} -> {}\n",
                path.display(),
                format_size(s.moved_bytes),
                s.moved_clusters,
                s.steps,
                if s.steps == 1 { "" } else { "s" },
                format_size(s.extent_before),
                format_size(s.extent_after),
                format_size(s.old_file_len),
                format_size(s.new_file_len),
            ))
        }
        ImageCommand::Convert {
            compress,
            src_format,
            out_format,
            options,
            snapshot,
            sparse_size,
            threads,
            out_of_order: _,
            backing,
            backing_format,
            existing,
            quiet,
            src,
            dst,
        } => {
            if existing && !options.is_empty() {
                return Err(Error::Usage(
                    "-o has no effect when skipping image creation (-n)".into(),
                ));
            }
            let mut opts = ConvertOptions {
                src_format,
                out_format,
                compress,
                sparse_size,
                threads: threads.map_or(0, usize::from),
                backing,
                backing_format,
                existing,
                ..ConvertOptions::default()
            };
            for list in &options {
                opts.apply_o(list)?;
            }
            if let Some(param) = &snapshot {
                opts.set_snapshot(param)?;
            }
            opts.validate()?;
            // A bar on stderr when it is a terminal (hidden otherwise, and with -q).
            let bar = if quiet {
                indicatif::ProgressBar::hidden()
            } else {
                indicatif::ProgressBar::new(0).with_style(
                    indicatif::ProgressStyle::with_template(
                        "converting {bar:40} {bytes}/{total_bytes} ({binary_bytes_per_sec}, {eta} left)",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                )
            };
            let r = convert::convert(&src, &dst, &opts, |done, total| {
                bar.set_length(total);
                bar.set_position(done);
            });
            bar.finish_and_clear();
            let s = r?;
            let what = match (out_format, compress) {
                (Format::Raw, _) => "raw".to_string(),
                (Format::Qcow2, false) => "qcow2".to_string(),
                (Format::Qcow2, true) => format!(
                    "qcow2, {}-compressed: {} clusters compressed, {} stored as they are",
                    opts.compression_type.name(),
                    s.compressed_clusters,
                    s.uncompressed_clusters
                ),
            };
            if quiet {
                return Ok(ExitCode::SUCCESS);
            }
            out(&format!(
                "converted {} ({} virtual) to {} ({what}): read {}, wrote {}; file {}\n",
                src.display(),
                format_size(s.virtual_size),
                dst.display(),
                format_size(s.bytes_read),
                format_size(s.bytes_written),
                format_size(s.out_file_len),
            ))
        }
        ImageCommand::Resize {
            shrink,
            format,
            path,
            size,
        } => {
            let s = convert::resize(&path, format, &size, shrink)?;
            out(&format!(
                "resized {}: {} -> {}\n",
                path.display(),
                format_size(s.old_size),
                format_size(s.new_size),
            ))
        }
    }
}

/// Exit status of a command whose reader went away (`| head`): 128 + SIGPIPE, as a shell
/// reports a tool killed by that signal.
const BROKEN_PIPE_EXIT: u8 = 141;

/// Writes `text` to stdout. A reader that went away (`| head -1`) ends the command quietly
/// with [`BROKEN_PIPE_EXIT`] instead of a panic; other write errors are errors.
fn out(text: &str) -> Result<ExitCode, Error> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            Ok(ExitCode::from(BROKEN_PIPE_EXIT))
        }
        Err(e) => Err(Error::io("writing to stdout", e)),
    }
}

fn scrape_command(url: &str, interval: Duration) -> Result<ExitCode, Error> {
    let url = scrape::Url::parse(url).map_err(Error::Usage)?;
    let summary = scrape::run(&url, interval)?;
    print!("{summary}");
    Ok(ExitCode::SUCCESS)
}

fn serve_command(args: &ServeArgs) -> Result<ExitCode, Error> {
    if args.export.is_empty() || args.export.len() > 4096 {
        return Err(Error::Usage(
            "--export: an NBD export name is 1 to 4096 bytes long".into(),
        ));
    }
    // First, so Ctrl-C and SIGTERM are never ignored.
    let interrupts = interrupt_counter()?;
    let server = serve::Server::start(&serve::ServeOptions {
        image: args.image.clone(),
        nbd: (args.bind, args.nbd_port).into(),
        metrics: (args.bind, args.metrics_port).into(),
        export: args.export.clone(),
        read_only: args.read_only,
        format: args.format,
        nbd_idle: (args.nbd_idle > 0).then(|| Duration::from_secs(args.nbd_idle)),
    })?;
    eprintln!(
        "qcow-metal: serving {}{}",
        args.image.display(),
        if args.read_only { " read-only" } else { "" }
    );
    eprintln!("qcow-metal: NBD:     {}", server.nbd_uri());
    eprintln!("qcow-metal: metrics: {}", server.metrics_url());
    eprintln!("qcow-metal: press Ctrl-C to stop (the image is closed clean)");
    while interrupts.load(Ordering::SeqCst) == 0 {
        thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "\nqcow-metal: stopping: NBD clients told to go (up to {} s), then the image is closed",
        serve::DRAIN.as_secs()
    );
    let report = server.stop()?;
    if report.nbd_closed > 0 {
        eprintln!(
            "qcow-metal: closed {} NBD connection(s) that did not leave",
            report.nbd_closed
        );
    }
    eprintln!("qcow-metal: {} closed clean", args.image.display());
    Ok(ExitCode::SUCCESS)
}

fn run(args: RunArgs) -> Result<ExitCode, Error> {
    let tap = args.net == NetMode::Tap || args.tap.is_some();
    if !tap && matches!(args.ip, Some(IpConfig::Static { .. })) {
        return Err(Error::Usage(
            "--ip A.B.C.D/len is the guest's address on a tap: use it with --net tap or --tap \
             NAME (on the user-mode network the guest is 10.0.2.15, where QEMU forwards the \
             ports; --ip dhcp asks QEMU's DHCP for it)"
                .into(),
        ));
    }
    if tap && (args.metrics_port != GUEST_METRICS_PORT || args.nbd_port != GUEST_NBD_PORT) {
        return Err(Error::Usage(
            "--metrics-port and --nbd-port choose forwarded host ports of --net user; on a \
             tap the guest is reached on its own address (its ports are the kernel arguments \
             metrics_port= and nbd_port=)"
                .into(),
        ));
    }
    // First, so Ctrl-C and SIGTERM are never ignored: each phase below checks them.
    let interrupts = interrupt_counter()?;
    let interrupted = || interrupts.load(Ordering::SeqCst) > 0;
    let root = kernel::workspace_root();
    let disk_path = args
        .disk
        .clone()
        .unwrap_or_else(|| disk::default_disk_path(&root));
    // Cheap checks first, so a missing QEMU, a busy port or a disk that cannot be one
    // (a FIFO would block the runner) fails before a long build.
    qemu::find_qemu()?;
    spawn::find_setpriv()?;
    guard::ensure_regular(&disk_path)?;
    if !tap {
        ports::ensure_free(args.metrics_port, "--metrics-port")?;
        ports::ensure_free(args.nbd_port, "--nbd-port")?;
    }
    let kernel = match &args.kernel {
        Some(k) => k.clone(),
        None => kernel::build_kernel(&root, BuildOutput::Show)?,
    };
    if interrupted() {
        return Ok(interrupted_exit());
    }
    if !disk_path.exists() {
        eprintln!(
            "qcow-metal: creating {} ({} virtual, qcow2)",
            disk_path.display(),
            format_size(args.size)
        );
    }
    let serial_log = args
        .serial_log
        .clone()
        .unwrap_or_else(|| root.join("target").join("qcow-metal").join("serial.log"));

    eprintln!(
        "qcow-metal: booting {} on {} ({} MiB, accel {}); serial log {}",
        kernel.display(),
        disk_path.display(),
        args.memory,
        args.accel.as_str(),
        serial_log.display()
    );
    // Unix socket paths are limited to 107 bytes; skip the default socket past that.
    let qmp_socket = match &args.qmp {
        Some(path) if path.as_os_str().len() >= 108 => {
            return Err(Error::Usage(format!(
                "--qmp {}: a Unix socket path must be shorter than 108 bytes",
                path.display()
            )));
        }
        Some(path) => Some(path.clone()),
        None => {
            let path = root.join("target").join("qcow-metal").join("qmp.sock");
            (path.as_os_str().len() < 100).then_some(path)
        }
    };
    let mut builder = Guest::builder()
        .kernel(&kernel)
        .disk(&disk_path)
        .size(args.size)
        .memory_mib(args.memory)
        .accel(args.accel)
        .metrics_port(args.metrics_port)
        .nbd_port(args.nbd_port)
        .serial_log(&serial_log)
        .format(args.format)
        .read_only(args.read_only)
        .echo(true)
        .shutdown_timeout(Duration::from_secs(10));
    if let Some(sock) = &qmp_socket {
        builder = builder.user_qmp_socket(sock);
    }
    for a in &args.append {
        builder = builder.append(a.clone());
    }
    if tap {
        builder = builder.tap(args.tap.as_deref().unwrap_or(net::DEFAULT_TAP));
    }
    if let Some(ip) = args.ip {
        builder = builder.guest_ip(ip);
    }
    // A Ctrl-C from here on powers the guest down cleanly (below).
    let mut guest = builder.start()?;
    if let Some(tap) = guest.tap() {
        let plan = tap.plan();
        eprintln!(
            "qcow-metal: network: tap {} ({}), host side {}; guest {}",
            tap.name(),
            if tap.created() {
                "created by the runner, removed at exit"
            } else {
                "ready-made, attached as it is"
            },
            plan.host
                .map(|h| h.to_string())
                .unwrap_or_else(|| "without an IPv4 address".into()),
            if plan.kernel_args.is_empty() {
                format!("ip={} (from --append)", net::ip_arg(plan.guest))
            } else {
                plan.kernel_args.join(" ")
            },
        );
        for note in &plan.notes {
            eprintln!("qcow-metal: {note}");
        }
    }

    let stop = {
        let interrupts = interrupts.clone();
        move || interrupts.load(Ordering::SeqCst) > 0
    };
    match guest.wait_for_banner_or_stop(Duration::from_secs(600), stop) {
        Ok(banner) => {
            eprintln!(
                "qcow-metal: the guest reached its main loop in {} ms of guest time \
                 ({} ms wall time since QEMU started, accel {})",
                banner.guest_ms,
                banner.wall.as_millis(),
                guest.accel().as_str()
            );
            let stop = {
                let interrupts = interrupts.clone();
                move || interrupts.load(Ordering::SeqCst) > 0
            };
            match guest.wait_for_metrics(Duration::from_secs(30), stop) {
                Ok(()) => {}
                Err(Error::GuestExited { outcome, .. }) => {
                    eprintln!("qcow-metal: {outcome}");
                    return Ok(exit_code(outcome));
                }
                Err(e) => {
                    let first = e.to_string();
                    let first = first.lines().next().unwrap_or_default();
                    eprintln!("qcow-metal: warning: {first}");
                }
            }
            if guest.tap().is_some() && guest.guest_ip().is_none() {
                // A DHCP guest whose lease has not shown on its console.
                eprintln!(
                    "qcow-metal: the guest's address is not known yet (no DHCP lease on its \
                     console); metrics on port {}, NBD on port {}",
                    guest.metrics_port(),
                    guest.nbd_port()
                );
            } else {
                eprintln!("qcow-metal: metrics: {}", guest.metrics_url());
                eprintln!("qcow-metal: NBD:     {}", guest.nbd_url());
            }
            if let Some(sock) = guest.user_qmp_socket() {
                eprintln!(
                    "qcow-metal: QMP:     {} (e.g. socat - UNIX-CONNECT:{})",
                    sock.display(),
                    sock.display()
                );
            }
            eprintln!("qcow-metal: press Ctrl-C to shut the guest down cleanly");
        }
        Err(Error::Timeout { .. }) if interrupts.load(Ordering::SeqCst) > 0 => {}
        Err(Error::GuestExited { outcome, .. }) => {
            // Its console (the reason) is already on the terminal.
            eprintln!("qcow-metal: the guest stopped before its main loop: {outcome}");
            return Ok(exit_code(outcome));
        }
        Err(e) => return Err(e),
    }

    let outcome = loop {
        if let Some(outcome) = guest.try_outcome()? {
            break outcome;
        }
        if interrupts.load(Ordering::SeqCst) > 0 {
            eprintln!(
                "\nqcow-metal: shutting the guest down (ACPI power button; up to 10 s; \
                 Ctrl-C again kills it)"
            );
            break guest.shutdown_or_abort(|| interrupts.load(Ordering::SeqCst) > 1)?;
        }
        thread::sleep(Duration::from_millis(50));
    };
    eprintln!("qcow-metal: {outcome}");
    Ok(exit_code(outcome))
}

/// Counts Ctrl-C and SIGTERM, from the first call on (the handler is installed once).
fn interrupt_counter() -> Result<Arc<AtomicUsize>, Error> {
    static COUNTER: OnceLock<Result<Arc<AtomicUsize>, String>> = OnceLock::new();
    COUNTER
        .get_or_init(|| {
            let interrupts = Arc::new(AtomicUsize::new(0));
            let counter = interrupts.clone();
            ctrlc::set_handler(move || {
                counter.fetch_add(1, Ordering::SeqCst);
            })
            .map(|()| interrupts)
            .map_err(|e| format!("cannot install the Ctrl-C handler: {e}"))
        })
        .clone()
        .map_err(Error::Usage)
}

/// The runner's status when Ctrl-C or SIGTERM came before the guest started: 128 + SIGINT.
fn interrupted_exit() -> ExitCode {
    eprintln!("qcow-metal: interrupted");
    ExitCode::from(130)
}

/// 0 for a clean shutdown; QEMU's own status otherwise (1 when it was killed).
fn exit_code(outcome: GuestOutcome) -> ExitCode {
    match outcome {
        GuestOutcome::Clean => ExitCode::SUCCESS,
        other => ExitCode::from(
            other
                .qemu_code()
                .and_then(|c| u8::try_from(c).ok())
                .filter(|&c| c != 0)
                .unwrap_or(1),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn serve_disconnects_idle_nbd_clients_after_the_guests_default() {
        let idle = |args: &[&str]| {
            let cli =
                Cli::try_parse_from(["qcow-metal", "serve", "d.qcow2"].iter().chain(args)).unwrap();
            match cli.command {
                Some(Command::Serve(a)) => a.nbd_idle,
                _ => panic!("not serve"),
            }
        };
        assert_eq!(idle(&[]), 600);
        assert_eq!(idle(&[]) * 1000, Config::DEFAULT_NBD_IDLE_MS);
        assert_eq!(idle(&["--nbd-idle", "0"]), 0);
        assert_eq!(idle(&["--nbd-idle", "90"]), 90);
        assert!(Cli::try_parse_from(["qcow-metal", "serve", "d", "--nbd-idle", "-1"]).is_err());
    }

    #[test]
    fn run_is_the_default_and_options_parse() {
        let cli = Cli::try_parse_from([
            "qcow-metal",
            "--size",
            "2G",
            "--memory",
            "512M",
            "--accel",
            "tcg",
            "--metrics-port",
            "19090",
            "--append",
            "log=debug",
            "--read-only",
            "--format",
            "raw",
        ])
        .unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.run.size, 2 << 30);
        assert_eq!(cli.run.memory, 512);
        assert_eq!(cli.run.accel, Accel::Tcg);
        assert_eq!(cli.run.metrics_port, 19090);
        assert_eq!(cli.run.nbd_port, GUEST_NBD_PORT);
        assert_eq!(cli.run.append, vec!["log=debug".to_string()]);
        assert!(cli.run.read_only);
        assert_eq!(cli.run.format, GuestFormat::Raw);
        assert!(Cli::try_parse_from(["qcow-metal", "--accel", "hvf"]).is_err());
        assert!(Cli::try_parse_from(["qcow-metal", "--memory", "1"]).is_err());
    }

    #[test]
    fn network_options_and_scrape_parse() {
        let cli = Cli::try_parse_from([
            "qcow-metal",
            "--net",
            "tap",
            "--tap",
            "qm0",
            "--ip",
            "10.9.0.2/24",
        ])
        .unwrap();
        assert_eq!(cli.run.net, NetMode::Tap);
        assert_eq!(cli.run.tap.as_deref(), Some("qm0"));
        assert_eq!(
            cli.run.ip,
            Some(IpConfig::Static {
                addr: std::net::Ipv4Addr::new(10, 9, 0, 2),
                prefix_len: 24
            })
        );
        let cli = Cli::try_parse_from(["qcow-metal", "--ip", "dhcp"]).unwrap();
        assert_eq!(
            (cli.run.net, cli.run.ip),
            (NetMode::User, Some(IpConfig::Dhcp))
        );
        assert!(Cli::try_parse_from(["qcow-metal", "--net", "bridge"]).is_err());
        assert!(Cli::try_parse_from(["qcow-metal", "--ip", "10.9.0.2"]).is_err());
        // A static --ip without a tap, and forwarded ports with one, are refused before
        // anything runs.
        let cli = Cli::try_parse_from(["qcow-metal", "--ip", "10.9.0.2/24"]).unwrap();
        let e = run(cli.run).expect_err("a static --ip without a tap is refused");
        assert!(e.to_string().contains("--net tap"), "{e}");
        let cli = Cli::try_parse_from(["qcow-metal", "--tap", "t0", "--metrics-port", "1"]);
        let e = run(cli.unwrap().run).expect_err("ports on a tap are refused");
        assert!(e.to_string().contains("--metrics-port"), "{e}");

        let cli = Cli::try_parse_from(["qcow-metal", "scrape"]).unwrap();
        let Some(Command::Scrape { url, interval }) = cli.command else {
            panic!("not parsed as scrape");
        };
        assert_eq!(url, scrape::DEFAULT_URL);
        assert_eq!(interval, Duration::from_secs(2));
        let cli = Cli::try_parse_from([
            "qcow-metal",
            "scrape",
            "http://10.213.0.2:9090/metrics",
            "--interval",
            "500ms",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Scrape { interval, .. }) if interval == Duration::from_millis(500)
        ));
    }

    #[test]
    fn image_subcommands_parse() {
        let cli = Cli::try_parse_from([
            "qcow-metal",
            "image",
            "create",
            "x.qcow2",
            "--size",
            "1G",
            "--cluster-size",
            "4K",
            "--refcount-bits",
            "64",
        ])
        .unwrap();
        let Some(Command::Image(ImageCommand::Create {
            size,
            cluster_size,
            refcount_bits,
            ..
        })) = cli.command
        else {
            panic!("not parsed as image create");
        };
        assert_eq!((size, cluster_size, refcount_bits), (1 << 30, 4096, 64));
        let cli = Cli::try_parse_from(["qcow-metal", "image", "check", "x", "--repair"]).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Image(ImageCommand::Check { repair: true, .. }))
        ));
        let cli = Cli::try_parse_from(["qcow-metal", "image", "compact", "x.qcow2"]).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Image(ImageCommand::Compact { path })) if path == std::path::Path::new("x.qcow2")
        ));
        assert!(Cli::try_parse_from(["qcow-metal", "image", "compact"]).is_err());
        let cli =
            Cli::try_parse_from(["qcow-metal", "image", "snapshot", "-c", "s1", "x"]).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Image(ImageCommand::Snapshot { create: Some(n), .. })) if n == "s1"
        ));
        assert!(Cli::try_parse_from(["qcow-metal", "image", "snapshot", "x"]).is_err());
        assert!(
            Cli::try_parse_from(["qcow-metal", "image", "snapshot", "-l", "-d", "s", "x"]).is_err()
        );
    }

    #[test]
    fn exit_codes() {
        assert_eq!(exit_code(GuestOutcome::Clean), ExitCode::SUCCESS);
        assert_eq!(exit_code(GuestOutcome::BadConfig), ExitCode::from(35));
        assert_eq!(exit_code(GuestOutcome::QemuQuit), ExitCode::from(1));
        assert_eq!(exit_code(GuestOutcome::Signal(9)), ExitCode::from(1));
    }
}
