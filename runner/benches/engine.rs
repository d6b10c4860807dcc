//! Engine benchmark: our qcow2 engine on a host file against its fastest peers, same machine,
//! same run, same kind of image.
//!
//! Run: `cargo bench -p qcow-metal-runner --bench engine` (about a minute and a half), or
//! `cargo bench -p qcow-metal-runner --bench engine -- --quick` (a few seconds; also
//! `QCOW_METAL_BENCH_QUICK=1`). More options after `--`: `--repeat N` (runs per contender and
//! row, the fastest counts), `--only NAME,...` (contenders), `--rows 1,3` (rows), `--json FILE`
//! (also write the results as JSON, read by `qcow-metal bench`).
//! `QCOW_METAL_BENCH_DIR` picks the scratch directory (default: the system temporary
//! directory), the same for every contender.
//!
//! Contenders, each on images made by `qemu-img create -f qcow2 -o cluster_size=65536`:
//! - ours: `qcow_metal::qcow2::Qcow2<FileDisk>`, in-process, through the `VirtualDisk` trait;
//! - imago (feature `sync`): `FormatAccess<Qcow2<imago::file::File>>`, in-process;
//! - qcow2-rs: `Qcow2Dev<Qcow2IoSync>` (plain pread/pwrite), in-process, each call driven to
//!   completion by `futures_executor::block_on` on the calling thread;
//! - `qemu-img bench` (QEMU's block layer, aio=threads), one process per run;
//! - raw-file: no qcow2 at all, plain positioned reads and writes (`pread`/`pwrite`) of the
//!   same offsets on a raw file of the same virtual size: the floor under every engine.
//!
//! All use buffered I/O (no `O_DIRECT`, QEMU's `-t writeback`), queue depth 1. Write runs end
//! with a flush that makes data and metadata durable (fdatasync), and that flush is inside the
//! timed part. See `doc/benchmarks.md` for what each row does and how QEMU is timed.

use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const CLUSTER: u64 = 64 * KIB;
/// Byte that fills every written buffer (and QEMU's `--pattern`), except the stamps.
const FILL: u8 = 0xa5;
/// Every 4 KiB block a contender writes or the read image holds starts with a stamp: its
/// virtual offset, then the offset xor this tag, so misplaced data cannot pass.
const TAG: u64 = 0x5143_4f57_4d45_5441;
/// Stamps are per 4 KiB block.
const BLOCK: u64 = 4 * KIB;

/// Sizes of one benchmark run.
#[derive(Clone, Copy, Debug)]
struct Sizes {
    /// Virtual size of every image.
    virtual_size: u64,
    /// Number of 4 KiB random writes (at most one per cluster).
    random_writes: u64,
    /// Number of 4 KiB random reads.
    random_reads: u64,
    /// Bytes written by the sequential-write row.
    sequential_write_bytes: u64,
    /// Bytes read by the sequential-read row (wrapping around the disk when larger).
    sequential_read_bytes: u64,
}

impl Sizes {
    fn full() -> Self {
        Sizes {
            virtual_size: 1024 * MIB,
            random_writes: 16384,
            random_reads: 65536,
            sequential_write_bytes: 256 * MIB,
            sequential_read_bytes: 2048 * MIB,
        }
    }

    fn quick() -> Self {
        Sizes {
            virtual_size: 256 * MIB,
            random_writes: 4096,
            random_reads: 32768,
            sequential_write_bytes: 64 * MIB,
            sequential_read_bytes: 1024 * MIB,
        }
    }
}

/// One row of the table: a request pattern every contender runs.
struct Workload {
    /// Row label.
    name: &'static str,
    /// Writes into a fresh image, or reads of the fully written read image.
    write: bool,
    /// Reads the overlay on the read image instead (half its clusters copied up, the other
    /// half read from the backing file; see [`make_overlay_image`]).
    overlay: bool,
    /// Request size in bytes.
    request: u64,
    /// Offsets of the in-process contenders' requests, in order.
    offsets: Vec<u64>,
    /// `qemu-img bench` step (`-S`): it can only stride, see [`qemu_stride`].
    qemu_step: u64,
    /// What the in-process contenders do, for the legend.
    pattern: String,
    /// What `qemu-img bench` does, for the legend.
    qemu_pattern: String,
}

impl Workload {
    fn bytes(&self) -> u64 {
        self.request * self.offsets.len() as u64
    }
}

/// An odd multiple-of-`unit` step near `n / φ` units: `i * step mod size` visits `n` distinct
/// units (n a power of two) spread over the whole disk, the closest `qemu-img bench` (which only
/// knows a start offset and a fixed step, wrapping at the image end) gets to random offsets.
fn qemu_stride(units: u64) -> u64 {
    ((units as f64 * 0.618_033_988_7) as u64) | 1
}

/// The rows of the table for these sizes, offsets included.
fn workloads(s: Sizes) -> Vec<Workload> {
    let clusters = s.virtual_size / CLUSTER;
    let blocks = s.virtual_size / BLOCK;
    let n = s.random_writes.min(clusters);

    // 4 KiB random writes: a random permutation of the clusters (Fisher-Yates, fixed seed), one
    // request each at a random 4 KiB slot inside it. Every request allocates a cluster, for us
    // and for the peers alike, so allocation work is the same whatever the order.
    // Fixed seeds: every contender gets the same offsets.
    let mut rng = fastrand::Rng::with_seed(0x0005_1c03_e7a1);
    let mut perm: Vec<u64> = (0..clusters).collect();
    for i in (1..perm.len()).rev() {
        let j = rng.u64(..i as u64 + 1) as usize;
        perm.swap(i, j);
    }
    let rand_write: Vec<u64> = perm[..n as usize]
        .iter()
        .map(|&c| c * CLUSTER + rng.u64(..CLUSTER / BLOCK) * BLOCK)
        .collect();
    let wstride = qemu_stride(clusters);

    // 4 KiB random reads: uniform 4 KiB-aligned offsets over the whole (fully written) disk.
    let mut rng = fastrand::Rng::with_seed(0x0052_ead5);
    let rand_read: Vec<u64> = (0..s.random_reads)
        .map(|_| rng.u64(..blocks) * BLOCK)
        .collect();
    let rstride = qemu_stride(blocks);

    let seq = |req: u64, bytes: u64| -> Vec<u64> {
        (0..bytes / req).map(|i| i * req % s.virtual_size).collect()
    };

    vec![
        Workload {
            name: "4 KiB random writes, fresh image",
            write: true,
            overlay: false,
            request: 4 * KIB,
            offsets: rand_write,
            qemu_step: wstride * CLUSTER,
            pattern: format!(
                "{n} x 4 KiB writes, one per cluster: clusters in a seeded random order, random 4 KiB slot"
            ),
            qemu_pattern: format!(
                "{n} x 4 KiB writes at i * {wstride} clusters mod size (slot 0): distinct clusters, scattered"
            ),
        },
        Workload {
            name: "4 KiB random reads, full image",
            write: false,
            overlay: false,
            request: 4 * KIB,
            offsets: rand_read,
            qemu_step: rstride * BLOCK,
            pattern: format!(
                "{} x 4 KiB reads at seeded uniform random 4 KiB-aligned offsets",
                s.random_reads
            ),
            qemu_pattern: format!(
                "{} x 4 KiB reads at i * {rstride} blocks mod size: distinct, scattered",
                s.random_reads
            ),
        },
        Workload {
            name: "64 KiB sequential writes, fresh image",
            write: true,
            overlay: false,
            request: 64 * KIB,
            offsets: seq(64 * KIB, s.sequential_write_bytes),
            qemu_step: 64 * KIB,
            pattern: format!("{} MiB from offset 0", s.sequential_write_bytes / MIB),
            qemu_pattern: "the same".into(),
        },
        Workload {
            name: "1 MiB sequential reads, full image",
            write: false,
            overlay: false,
            request: MIB,
            offsets: seq(MIB, s.sequential_read_bytes),
            qemu_step: MIB,
            pattern: format!(
                "{} MiB from offset 0, wrapping at the end of the disk",
                s.sequential_read_bytes / MIB
            ),
            qemu_pattern: "the same".into(),
        },
        Workload {
            name: "1 MiB seq. reads, overlay half in base",
            write: false,
            overlay: true,
            request: MIB,
            offsets: seq(MIB, s.sequential_read_bytes),
            qemu_step: MIB,
            pattern: format!(
                "{} MiB from offset 0 of an overlay (qemu-img create -b /abs/read.qcow2) holding every other cluster, the rest read from its backing file",
                s.sequential_read_bytes / MIB
            ),
            qemu_pattern: "the same".into(),
        },
    ]
}

/// Writes the stamps of the 4 KiB blocks of a request at `offset` into `buf` (the rest of the
/// buffer keeps [`FILL`]).
fn stamp(buf: &mut [u8], offset: u64) {
    for (i, block) in buf.chunks_mut(BLOCK as usize).enumerate() {
        let at = offset + i as u64 * BLOCK;
        block[..8].copy_from_slice(&at.to_le_bytes());
        block[8..16].copy_from_slice(&(at ^ TAG).to_le_bytes());
    }
}

/// Folds the stamps of the blocks in `buf` into `acc` (cheap: two loads per 4 KiB).
fn fold_stamps(acc: &mut u64, buf: &[u8]) {
    for block in buf.chunks(BLOCK as usize) {
        let a = u64::from_le_bytes(block[..8].try_into().expect("8 bytes"));
        let b = u64::from_le_bytes(block[8..16].try_into().expect("8 bytes"));
        *acc = acc.rotate_left(7) ^ a ^ b.wrapping_mul(3);
    }
}

/// What `fold_stamps` gives over the reads of `w` when every block holds its own stamp.
fn expected_fold(w: &Workload) -> u64 {
    let mut acc = 0;
    for &off in &w.offsets {
        for i in 0..w.request / BLOCK {
            let at = off + i * BLOCK;
            acc = u64::rotate_left(acc, 7) ^ at ^ (at ^ TAG).wrapping_mul(3);
        }
    }
    acc
}

/// A qcow2 engine driven in-process, one request at a time.
trait Engine: Sized {
    /// Whether the engine's images are qcow2 (checked with `qemu-img check` after writes).
    const QCOW2: bool = true;
    /// Opens the image at `path`, read-write if `write`.
    fn open(path: &Path, write: bool) -> Result<Self, String>;
    /// Reads `buf.len()` bytes at virtual `offset`.
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), String>;
    /// Writes `buf` at virtual `offset`.
    fn write(&mut self, offset: u64, buf: &[u8]) -> Result<(), String>;
    /// Makes everything written durable: cached metadata written out, then fdatasync.
    fn flush(&mut self) -> Result<(), String>;
    /// Closes the image (after `flush`, so nothing is left to write).
    fn close(self) -> Result<(), String> {
        Ok(())
    }
}

mod ours {
    use super::Engine;
    use qcow_metal::block::FileDisk;
    use qcow_metal::disk::VirtualDisk;
    use qcow_metal::qcow2::{OpenOptions, Qcow2};
    use std::path::Path;

    /// Our engine over a host file, with its default options (1 MiB L2 cache, 256 KiB refcount
    /// cache: QEMU's defaults too).
    pub struct Ours(Qcow2<FileDisk>);

    impl Engine for Ours {
        fn open(path: &Path, write: bool) -> Result<Self, String> {
            let dev = FileDisk::open(path, !write).map_err(|e| format!("open {path:?}: {e}"))?;
            let opts = OpenOptions {
                read_only: !write,
                ..OpenOptions::default()
            };
            // An overlay opens with its backing chain (resolved as QEMU does).
            let chain = qcow_metal::qcow2::chain::files::resolve_if_qcow2(path)?;
            let below = qcow_metal::qcow2::chain::files::open_layers(&chain, &opts)?;
            Qcow2::open_with_backing(dev, opts, below)
                .map(Ours)
                .map_err(|e| format!("qcow-metal open: {e}"))
        }
        fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
            self.0
                .read(offset, buf)
                .map_err(|e| format!("qcow-metal read: {e}"))
        }
        fn write(&mut self, offset: u64, buf: &[u8]) -> Result<(), String> {
            self.0
                .write(offset, buf)
                .map_err(|e| format!("qcow-metal write: {e}"))
        }
        fn flush(&mut self) -> Result<(), String> {
            self.0.flush().map_err(|e| format!("qcow-metal flush: {e}"))
        }
        fn close(self) -> Result<(), String> {
            self.0
                .close()
                .map(drop)
                .map_err(|e| format!("qcow-metal close: {e}"))
        }
    }
}

mod raw {
    use super::Engine;
    use std::fs::File;
    use std::os::unix::fs::FileExt;
    use std::path::Path;

    /// The floor: a raw file, each request one positioned read or write, flush = fdatasync.
    pub struct RawFile(File);

    impl Engine for RawFile {
        const QCOW2: bool = false;
        fn open(path: &Path, write: bool) -> Result<Self, String> {
            std::fs::OpenOptions::new()
                .read(true)
                .write(write)
                .open(path)
                .map(RawFile)
                .map_err(|e| format!("open {path:?}: {e}"))
        }
        fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
            self.0
                .read_exact_at(buf, offset)
                .map_err(|e| format!("raw read: {e}"))
        }
        fn write(&mut self, offset: u64, buf: &[u8]) -> Result<(), String> {
            self.0
                .write_all_at(buf, offset)
                .map_err(|e| format!("raw write: {e}"))
        }
        fn flush(&mut self) -> Result<(), String> {
            self.0
                .sync_data()
                .map_err(|e| format!("raw fdatasync: {e}"))
        }
    }
}

mod peers {
    use super::Engine;
    use std::path::Path;

    /// imago with the `sync` feature: `FormatAccess` over `Qcow2<imago::file::File>`.
    pub struct Imago(imago::FormatAccess<imago::file::File>);

    impl Engine for Imago {
        fn open(path: &Path, write: bool) -> Result<Self, String> {
            use imago::FormatDriverBuilder;
            let q = imago::qcow2::Qcow2::<imago::file::File>::builder_path(path)
                .write(write)
                .open(imago::PermissiveImplicitOpenGate::default())
                .map_err(|e| format!("imago open: {e}"))?;
            Ok(Imago(imago::FormatAccess::new(q)))
        }
        fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
            self.0
                .read(buf, offset)
                .map_err(|e| format!("imago read: {e}"))
        }
        fn write(&mut self, offset: u64, buf: &[u8]) -> Result<(), String> {
            self.0
                .write(buf, offset)
                .map_err(|e| format!("imago write: {e}"))
        }
        fn flush(&mut self) -> Result<(), String> {
            self.0.flush().map_err(|e| format!("imago flush: {e}"))?;
            self.0.sync().map_err(|e| format!("imago sync: {e}"))
        }
    }

    /// qcow2-rs over its plain pread/pwrite backend, each call run to completion in place.
    pub struct Qcow2Rs(qcow2_rs::dev::Qcow2Dev<qcow2_rs::sync_io::Qcow2IoSync>);

    impl Engine for Qcow2Rs {
        fn open(path: &Path, write: bool) -> Result<Self, String> {
            use futures_executor::block_on;
            // 512-byte blocks (its minimum), default cache sizes, buffered I/O.
            let params = qcow2_rs::dev::Qcow2DevParams::new(9, None, None, !write, false);
            let dev = qcow2_rs::utils::qcow2_setup_dev_sync(path, &params)
                .map_err(|e| format!("qcow2-rs open: {e:?}"))?;
            block_on(dev.qcow2_prep_io()).map_err(|e| format!("qcow2-rs prep: {e:?}"))?;
            Ok(Qcow2Rs(dev))
        }
        fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
            let n = futures_executor::block_on(self.0.read_at(buf, offset))
                .map_err(|e| format!("qcow2-rs read: {e:?}"))?;
            if n != buf.len() {
                return Err(format!("qcow2-rs short read: {n} of {}", buf.len()));
            }
            Ok(())
        }
        fn write(&mut self, offset: u64, buf: &[u8]) -> Result<(), String> {
            futures_executor::block_on(self.0.write_at(buf, offset))
                .map_err(|e| format!("qcow2-rs write: {e:?}"))
        }
        fn flush(&mut self) -> Result<(), String> {
            futures_executor::block_on(async {
                self.0.flush_meta().await?;
                self.0.fsync_range(0, usize::MAX).await
            })
            .map_err(|e| format!("qcow2-rs flush: {e:?}"))
        }
    }
}

/// Result of one contender on one row.
#[derive(Clone, Debug)]
struct Outcome {
    contender: &'static str,
    /// Timed part: all requests, plus the final flush for writes.
    time: Duration,
    /// A note for the table (e.g. QEMU's own timing).
    note: String,
}

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Runs `cmd` and returns its stdout; an error names the missing package or quotes stderr.
fn run_cmd(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| {
        format!(
            "cannot run {:?}: {e} (install the Debian package qemu-utils)",
            cmd.get_program()
        )
    })?;
    if !out.status.success() {
        return Err(format!(
            "{:?} failed ({}): {}{}",
            cmd,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A fresh, empty qcow2 image: version 3, 64 KiB clusters, 16-bit refcounts, no preallocation.
fn create_image(path: &Path, size: u64) -> Result<(), String> {
    let _ = fs::remove_file(path);
    run_cmd(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536"])
            .arg(path)
            .arg(size.to_string()),
    )
    .map(|_| ())
}

/// `qemu-img check`: the image must have no corruption and no leaks.
fn check_image(path: &Path) -> Result<(), String> {
    run_cmd(
        Command::new("qemu-img")
            .args(["check", "-q", "-f", "qcow2"])
            .arg(path),
    )
    .map(|_| ())
    .map_err(|e| format!("qemu-img check found problems: {e}"))
}

/// The image every read row reads: `virtual_size` bytes, every 4 KiB block stamped, all of it
/// allocated (made by `qemu-img convert` from a raw file), then read once so it is in the page
/// cache for every contender alike. The raw file stays, next to it ([`raw_twin`]), for the
/// raw-file contender.
fn make_read_image(dir: &Path, size: u64) -> Result<PathBuf, String> {
    let raw = dir.join("read.raw");
    let img = dir.join("read.qcow2");
    {
        let mut f = fs::File::create(&raw).map_err(|e| format!("create {raw:?}: {e}"))?;
        let mut chunk = vec![FILL; MIB as usize];
        for at in (0..size).step_by(MIB as usize) {
            stamp(&mut chunk, at);
            f.write_all(&chunk)
                .map_err(|e| format!("write {raw:?}: {e}"))?;
        }
    }
    run_cmd(
        Command::new("qemu-img")
            .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
            .args(["-o", "cluster_size=65536"])
            .arg(&raw)
            .arg(&img),
    )?;
    warm(&raw)?;
    warm(&img)?;
    Ok(img)
}

/// The overlay the overlay rows read: `qemu-img create -b /abs/read.qcow2 -F qcow2`, then every
/// other cluster copied up into it (read through the chain, written back unchanged, with our
/// engine), so half the data is in the overlay and half falls through to the base. Its raw
/// twin is a hard link to the read image's.
fn make_overlay_image(dir: &Path, read_image: &Path, size: u64) -> Result<PathBuf, String> {
    use qcow_metal::disk::VirtualDisk;
    let img = dir.join("overlay.qcow2");
    let _ = fs::remove_file(&img);
    run_cmd(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536"])
            // An absolute name: qcow2-rs resolves backing names against its working
            // directory (and panics on a relative one), QEMU and ours against the overlay's.
            .arg("-b")
            .arg(read_image)
            .args(["-F", "qcow2"])
            .arg(&img)
            .arg(size.to_string()),
    )?;
    let mut q =
        qcow_metal::qcow2::chain::files::open(&img, qcow_metal::qcow2::OpenOptions::default())?;
    let mut cluster = vec![0u8; CLUSTER as usize];
    for at in (0..size).step_by(2 * CLUSTER as usize) {
        q.read(at, &mut cluster)
            .map_err(|e| format!("overlay read: {e}"))?;
        q.write(at, &cluster)
            .map_err(|e| format!("overlay write: {e}"))?;
    }
    q.close().map_err(|e| format!("overlay close: {e}"))?;
    check_image(&img)?;
    let twin = raw_twin(&img);
    let _ = fs::remove_file(&twin);
    fs::hard_link(raw_twin(read_image), &twin).map_err(|e| format!("link {twin:?}: {e}"))?;
    warm(&img)?;
    Ok(img)
}

/// The raw file with the same bytes as a qcow2 image made by [`make_read_image`].
fn raw_twin(qcow2: &Path) -> PathBuf {
    qcow2.with_extension("raw")
}

/// Reads a file once so it sits in the page cache.
fn warm(path: &Path) -> Result<(), String> {
    let mut f = fs::File::open(path).map_err(|e| format!("open {path:?}: {e}"))?;
    std::io::copy(&mut f, &mut std::io::sink()).map_err(|e| format!("read {path:?}: {e}"))?;
    Ok(())
}

/// Runs `w` with engine `E` on `path` (a fresh image for writes), checks the result, and gives
/// the time of the requests (plus the final flush for writes).
fn run_engine<E: Engine>(name: &'static str, path: &Path, w: &Workload) -> Result<Outcome, String> {
    let mut buf = vec![FILL; w.request as usize];
    let mut engine = E::open(path, w.write)?;
    let mut note = String::new();
    let time = if w.write {
        let start = Instant::now();
        for &off in &w.offsets {
            stamp(&mut buf, off);
            engine.write(off, &buf)?;
        }
        engine.flush()?;
        let time = start.elapsed();
        engine.close()?;
        note = space_note(path)?;
        verify_written::<E>(path, w)?;
        if E::QCOW2 {
            check_image(path)?;
        }
        time
    } else {
        let mut acc = 0u64;
        let start = Instant::now();
        for &off in &w.offsets {
            engine.read(off, &mut buf)?;
            fold_stamps(&mut acc, &buf);
        }
        let time = start.elapsed();
        engine.close()?;
        if acc != expected_fold(w) {
            return Err(format!("{name}: read data does not match the image"));
        }
        time
    };
    Ok(Outcome {
        contender: name,
        time,
        note,
    })
}

/// How big a written image file is and how much of it is allocated on the host filesystem.
fn space_note(path: &Path) -> Result<String, String> {
    use std::os::unix::fs::MetadataExt;
    let m = fs::metadata(path).map_err(|e| format!("stat {path:?}: {e}"))?;
    Ok(format!(
        "file {} MiB, {} MiB allocated",
        m.len() / MIB,
        m.blocks() * 512 / MIB
    ))
}

/// Reopens a written image with the same engine and reads back a sample of the requests (whole,
/// compared byte for byte) and, for sub-cluster writes, the untouched rest of their clusters
/// (must read as zeros).
fn verify_written<E: Engine>(path: &Path, w: &Workload) -> Result<(), String> {
    let mut engine = E::open(path, false)?;
    let n = w.offsets.len();
    let mut want = vec![FILL; w.request as usize];
    let mut got = vec![0u8; w.request as usize];
    let mut cluster = vec![0u8; CLUSTER as usize];
    let step = (n / 64).max(1);
    for i in (0..n).step_by(step).chain([n - 1]) {
        let off = w.offsets[i];
        stamp(&mut want, off);
        engine.read(off, &mut got)?;
        if got != want {
            return Err(format!("request {i} at {off:#x} reads back wrong"));
        }
        if w.request < CLUSTER {
            let base = off / CLUSTER * CLUSTER;
            engine.read(base, &mut cluster)?;
            let inner = (off - base) as usize;
            let rest_zero = cluster[..inner].iter().all(|&b| b == 0)
                && cluster[inner + w.request as usize..]
                    .iter()
                    .all(|&b| b == 0);
            if !rest_zero {
                return Err(format!(
                    "cluster at {base:#x}: bytes around the write are not zero"
                ));
            }
        }
    }
    Ok(())
}

/// Wall time of a `qemu-img bench` process, and the time it reports itself.
fn qemu_bench_once(path: &Path, w: &Workload, count: u64) -> Result<(Duration, Duration), String> {
    let mut cmd = Command::new("qemu-img");
    cmd.args([
        "bench",
        "-f",
        "qcow2",
        "-t",
        "writeback",
        "-d",
        "1",
        "-o",
        "0",
    ])
    .args(["-c", &count.to_string()])
    .args(["-s", &w.request.to_string()])
    .args(["-S", &w.qemu_step.to_string()]);
    if w.write {
        cmd.args(["-w", &format!("--pattern={FILL}")]);
    }
    cmd.arg(path);
    let start = Instant::now();
    let out = run_cmd(&mut cmd)?;
    let wall = start.elapsed();
    let own = out
        .lines()
        .find_map(|l| l.strip_prefix("Run completed in "))
        .and_then(|l| l.strip_suffix(" seconds."))
        .and_then(|s| s.parse::<f64>().ok())
        .ok_or_else(|| format!("unexpected qemu-img bench output: {out}"))?;
    Ok((wall, Duration::from_secs_f64(own)))
}

/// `qemu-img bench`'s fixed cost for a write row: the wall time of the same command with one
/// request on a fresh image (process start-up, open, one write, close), best of three.
fn qemu_fixed_cost(dir: &Path, w: &Workload, size: u64) -> Result<Duration, String> {
    let img = dir.join("qemu-fixed.qcow2");
    let mut base = Duration::MAX;
    for _ in 0..3 {
        create_image(&img, size)?;
        base = base.min(qemu_bench_once(&img, w, 1)?.0);
    }
    let _ = fs::remove_file(&img);
    Ok(base)
}

/// `qemu-img bench` on the row. It times its own request loop, but stops the clock before the
/// flush it does when closing the image; so for writes its time is the process's wall time less
/// its fixed cost ([`qemu_fixed_cost`]), which puts the final flush inside the time, as for the
/// in-process contenders. For reads its own time is used.
fn run_qemu(
    dir: &Path,
    read_image: &Path,
    w: &Workload,
    size: u64,
    base: Duration,
) -> Result<Outcome, String> {
    let count = w.offsets.len() as u64;
    if !w.write {
        let (_, own) = qemu_bench_once(read_image, w, count)?;
        return Ok(Outcome {
            contender: "qemu-img bench",
            time: own,
            note: "self-timed".into(),
        });
    }
    let img = dir.join("qemu.qcow2");
    create_image(&img, size)?;
    let (wall, own) = qemu_bench_once(&img, w, count)?;
    // Check what it wrote: pattern bytes at the first and last request, zeros next to a
    // sub-cluster write, and a clean `qemu-img check`.
    let last = (count - 1) * w.qemu_step % size;
    let mut io = Command::new("qemu-io");
    io.args(["-f", "qcow2"])
        .args(["-c", &format!("read -q -P {FILL} 0 {}", w.request)])
        .args(["-c", &format!("read -q -P {FILL} {last} {}", w.request)]);
    if w.request < CLUSTER {
        io.args([
            "-c",
            &format!("read -q -P 0 {} {}", w.request, CLUSTER - w.request),
        ]);
    }
    let out = run_cmd(io.arg(&img))?;
    if out.contains("Pattern verification failed") {
        return Err(format!("qemu-img bench wrote unexpected data: {out}"));
    }
    let space = space_note(&img)?;
    check_image(&img)?;
    let _ = fs::remove_file(&img);
    let time = wall.saturating_sub(base).max(own);
    Ok(Outcome {
        contender: "qemu-img bench",
        time,
        note: format!(
            "{space}; wall {:.3}s - fixed {:.3}s; self-timed {:.3}s",
            wall.as_secs_f64(),
            base.as_secs_f64(),
            own.as_secs_f64()
        ),
    })
}

/// Runs one in-process contender on a row (fresh image for writes).
fn run_in_process<E: Engine>(
    name: &'static str,
    dir: &Path,
    read_image: &Path,
    w: &Workload,
    size: u64,
) -> Result<Outcome, String> {
    if !w.write {
        return run_engine::<E>(name, read_image, w);
    }
    let img = dir.join("fresh.qcow2");
    create_image(&img, size)?;
    let out = run_engine::<E>(name, &img, w);
    let _ = fs::remove_file(&img);
    out
}

/// Runs the raw-file contender on a row: a fresh sparse raw file for writes, the read image's
/// raw twin for reads.
fn run_raw(
    name: &'static str,
    dir: &Path,
    read_image: &Path,
    w: &Workload,
    size: u64,
) -> Result<Outcome, String> {
    if !w.write {
        return run_engine::<raw::RawFile>(name, &raw_twin(read_image), w);
    }
    let img = dir.join("fresh.raw");
    let _ = fs::remove_file(&img);
    fs::File::create(&img)
        .and_then(|f| f.set_len(size))
        .map_err(|e| format!("create {img:?}: {e}"))?;
    let out = run_engine::<raw::RawFile>(name, &img, w);
    let _ = fs::remove_file(&img);
    out
}

/// Throughput in MiB/s.
fn mib_s(bytes: u64, t: Duration) -> f64 {
    bytes as f64 / MIB as f64 / t.as_secs_f64()
}

/// Requests per second.
fn iops(n: u64, t: Duration) -> f64 {
    n as f64 / t.as_secs_f64()
}

/// Command-line options (after `--` on the `cargo bench` line).
struct Options {
    /// Smaller sizes (`--quick` or `QCOW_METAL_BENCH_QUICK=1`).
    quick: bool,
    /// Only these contenders (`--only qcow-metal,imago`); all when empty.
    only: Vec<String>,
    /// Only these rows, 1-based (`--rows 1,3`); all when empty.
    rows: Vec<usize>,
    /// Runs per contender and row, the fastest counts (`--repeat N`; default 3).
    repeat: u32,
    /// Also write the results as JSON to this file (`--json FILE`).
    json: Option<PathBuf>,
}

impl Options {
    fn parse() -> Result<Self, String> {
        let mut o = Options {
            quick: std::env::var("QCOW_METAL_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0"),
            only: Vec::new(),
            rows: Vec::new(),
            repeat: 0,
            json: None,
        };
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            match a.as_str() {
                "--quick" => o.quick = true,
                "--only" => {
                    let v = args.next().ok_or("--only needs a list of contenders")?;
                    o.only.extend(v.split(',').map(str::to_owned));
                }
                "--rows" => {
                    let v = args.next().ok_or("--rows needs a list of row numbers")?;
                    for r in v.split(',') {
                        o.rows
                            .push(r.parse().map_err(|_| format!("bad row number {r:?}"))?);
                    }
                }
                "--json" => {
                    let v = args.next().ok_or("--json needs a file name")?;
                    o.json = Some(PathBuf::from(v));
                }
                "--repeat" => {
                    let v = args.next().ok_or("--repeat needs a count")?;
                    o.repeat = v.parse().map_err(|_| format!("bad repeat count {v:?}"))?;
                }
                // `cargo bench` passes `--bench`; libtest-style filters are not used.
                "--bench" => {}
                "--help" | "-h" => {
                    return Err("usage: engine [--quick] [--repeat N] [--only qcow-metal,imago,qcow2-rs,raw-file,qemu-img] [--rows 1,2,3,4,5] [--json FILE]".into());
                }
                other => return Err(format!("unknown argument {other:?} (try --help)")),
            }
        }
        if o.repeat == 0 {
            o.repeat = 3;
        }
        Ok(o)
    }

    fn wants(&self, contender: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|c| contender.starts_with(c.as_str()))
    }
}

fn main() {
    let result = Options::parse().and_then(|o| run(&o));
    if let Err(e) = result {
        eprintln!("engine bench failed: {e}");
        std::process::exit(1);
    }
}

/// Runs `f` `n` times (at least once) and keeps the fastest outcome.
fn best_of(n: u32, mut f: impl FnMut() -> Result<Outcome, String>) -> Result<Outcome, String> {
    let mut best = f()?;
    for _ in 1..n {
        let o = f()?;
        if o.time < best.time {
            best = o;
        }
    }
    Ok(best)
}

/// A contender run in-process on one row.
type Runner = fn(&'static str, &Path, &Path, &Workload, u64) -> Result<Outcome, String>;

/// The in-process contenders, ours first, the raw floor last.
const IN_PROCESS: [(&str, Runner); 4] = [
    ("qcow-metal", run_in_process::<ours::Ours>),
    ("imago", run_in_process::<peers::Imago>),
    ("qcow2-rs", run_in_process::<peers::Qcow2Rs>),
    ("raw-file", run_raw),
];

/// Runs every selected contender on every selected row and prints the table and ratios.
fn run(opts: &Options) -> Result<(), String> {
    let sizes = if opts.quick {
        Sizes::quick()
    } else {
        Sizes::full()
    };
    let base = std::env::var_os("QCOW_METAL_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let scratch = Scratch(base.join(format!("qcow-metal-bench-{}", std::process::id())));
    fs::create_dir_all(&scratch.0).map_err(|e| format!("create {:?}: {e}", scratch.0))?;
    let dir = scratch.0.as_path();
    let version = run_cmd(Command::new("qemu-img").arg("--version"))?;
    let started = Instant::now();

    let rows = workloads(sizes);
    let selected: Vec<usize> = (0..rows.len())
        .filter(|i| opts.rows.is_empty() || opts.rows.contains(&(i + 1)))
        .collect();
    eprintln!(
        "engine bench{}: virtual size {} MiB, 64 KiB clusters, queue depth 1, buffered I/O, in {}",
        if opts.quick { " (quick)" } else { "" },
        sizes.virtual_size / MIB,
        dir.display()
    );
    let read_image = if selected.iter().any(|&i| !rows[i].write) {
        eprintln!("preparing the read image (stamped, fully allocated)...");
        make_read_image(dir, sizes.virtual_size)?
    } else {
        dir.join("no-read-image")
    };
    let overlay_image = if selected.iter().any(|&i| rows[i].overlay) {
        eprintln!("preparing the overlay (every other cluster copied up)...");
        make_overlay_image(dir, &read_image, sizes.virtual_size)?
    } else {
        dir.join("no-overlay-image")
    };

    let mut results: Vec<(usize, Vec<Outcome>)> = Vec::new();
    for &ri in &selected {
        let w = &rows[ri];
        eprintln!("[row {}] {}", ri + 1, w.name);
        let read_image = if w.overlay {
            &overlay_image
        } else {
            &read_image
        };
        let mut outs = Vec::new();
        for (name, f) in IN_PROCESS {
            if opts.wants(name) {
                let o = best_of(opts.repeat, || {
                    f(name, dir, read_image, w, sizes.virtual_size)
                });
                let o = match o {
                    Ok(o) => o,
                    // A peer without backing-file support sits the overlay row out.
                    Err(e) if w.overlay => {
                        eprintln!("  {name}: left out of this row: {e}");
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                progress(&o, w, started);
                outs.push(o);
            }
        }
        if opts.wants("qemu-img") {
            let base = if w.write {
                qemu_fixed_cost(dir, w, sizes.virtual_size)?
            } else {
                Duration::ZERO
            };
            let o = best_of(opts.repeat, || {
                run_qemu(dir, read_image, w, sizes.virtual_size, base)
            })?;
            progress(&o, w, started);
            outs.push(o);
        }
        results.push((ri, outs));
    }
    eprintln!("done in {:.1} s", started.elapsed().as_secs_f64());

    println!();
    println!(
        "qcow2 engine benchmark ({})",
        version.lines().next().unwrap_or("qemu-img")
    );
    println!(
        "images: qemu-img create -f qcow2 -o cluster_size=65536, {} MiB virtual; queue depth 1; buffered (writeback); writes include the final flush",
        sizes.virtual_size / MIB
    );
    println!(
        "best of {} run(s) each; speed ours/peer = peer's time / our time: above 1.00x ours is faster",
        opts.repeat
    );
    print!("{}", table(&rows, &results));
    println!();
    if let Some(path) = &opts.json {
        let text = json_report(opts, sizes, &version, &rows, &results);
        fs::write(path, text).map_err(|e| format!("write {path:?}: {e}"))?;
    }
    for &ri in &selected {
        let w = &rows[ri];
        println!("{}:", w.name);
        println!("  in-process: {}", w.pattern);
        println!("  qemu-img:   {}", w.qemu_pattern);
    }
    Ok(())
}

/// The results as JSON (what `qcow-metal bench` reads): the sizes, and per row its request size,
/// bytes and request count, and each contender's time in seconds.
fn json_report(
    opts: &Options,
    sizes: Sizes,
    version: &str,
    rows: &[Workload],
    results: &[(usize, Vec<Outcome>)],
) -> String {
    let rows: Vec<serde_json::Value> = results
        .iter()
        .map(|(ri, outs)| {
            let w = &rows[*ri];
            serde_json::json!({
                "row": w.name,
                "write": w.write,
                "request": w.request,
                "requests": w.offsets.len(),
                "bytes": w.bytes(),
                "pattern": w.pattern,
                "results": outs.iter().map(|o| serde_json::json!({
                    "contender": o.contender,
                    "seconds": o.time.as_secs_f64(),
                    "note": o.note,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let doc = serde_json::json!({
        "bench": "engine",
        "quick": opts.quick,
        "repeat": opts.repeat,
        "virtual_size": sizes.virtual_size,
        "qemu": version.lines().next().unwrap_or_default(),
        "rows": rows,
    });
    format!("{doc:#}\n")
}

/// Prints one timed run on stderr as it finishes.
fn progress(o: &Outcome, w: &Workload, started: Instant) {
    eprintln!(
        "  {:>6.1}s  {:<15} {:>8.3} s {:>9.1} MiB/s {:>9.0} IOPS  {}",
        started.elapsed().as_secs_f64(),
        o.contender,
        o.time.as_secs_f64(),
        mib_s(w.bytes(), o.time),
        iops(w.offsets.len() as u64, o.time),
        o.note
    );
}

/// The result table: one block per row, one line per contender, and for ours the speed ratio
/// against each peer (our throughput / the peer's; above 1 means ours is faster).
fn table(rows: &[Workload], results: &[(usize, Vec<Outcome>)]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<38} {:<15} {:>9} {:>10} {:>9}  speed ours/peer",
        "row", "contender", "time s", "MiB/s", "IOPS"
    );
    for (ri, outs) in results {
        let w = &rows[*ri];
        let ours = outs.iter().find(|o| o.contender == "qcow-metal");
        for (i, o) in outs.iter().enumerate() {
            let ratio = match ours {
                Some(us) if us.contender != o.contender => {
                    format!("{:.2}x", o.time.as_secs_f64() / us.time.as_secs_f64())
                }
                _ => String::new(),
            };
            let _ = writeln!(
                s,
                "{:<38} {:<15} {:>9.3} {:>10.1} {:>9.0}  {}",
                if i == 0 { w.name } else { "" },
                o.contender,
                o.time.as_secs_f64(),
                mib_s(w.bytes(), o.time),
                iops(w.offsets.len() as u64, o.time),
                ratio
            );
        }
    }
    s
}
