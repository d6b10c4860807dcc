//! Crash safety end to end under TCG: the guest serves a qcow2 image over NBD, a client
//! streams writes of random lengths (512 B to 256 KiB, unaligned ones, overwrites, writes
//! across cluster boundaries, write-zeroes) with a FLUSH every few writes and some FUA
//! writes, and QEMU is killed with SIGKILL at a pseudo-random moment: during writes, right
//! after a flush or FUA acknowledgement, while a flush is in progress, or after the guest's
//! idle metadata write-back.
//!
//! Each round takes one image (made by the runner with the project's engine, or by
//! `qemu-img create`: lazy refcounts, version 2) through three such crash cycles, each
//! booting on what the last one left, then a kill while the guest boots on it, then a last
//! boot that ends in a clean shutdown. After each kill:
//! - `qemu-img check` finds no corruption on the killed image (leaks are allowed and
//!   reported). An image left dirty by lazy refcounts is judged the way QEMU opens it: its
//!   refcounts are rebuilt (`qemu-img check -r all` on a copy), which must leave no
//!   corruption.
//! - The virtual disk (`qemu-img convert -O raw`) holds every flushed byte: a byte written
//!   since it was last made durable (by a FLUSH or a FUA write that was acknowledged) may
//!   hold its durable value or the value of any of those later writes; every other byte
//!   must hold its durable value exactly. A kill during boot changes no byte.
//! - The next boot serves exactly what QEMU reads from the image (the whole export is read
//!   back over NBD). After the last boot's writes, flush and clean shutdown (QEMU status
//!   33), `qemu-img check` finds no corruption, and no leak where the image was dirty (the
//!   guest rebuilt its refcounts); leaks of a crash on a clean image stay, and are reported.
//!
//! SIGKILL loses what the guest had not yet handed to QEMU, not what QEMU had written to
//! the host's page cache: it tests the order of the engine's writes, not its device
//! flushes (the engine's power-cut tests in `src/qcow2/tests` do that).
//!
//! One pass is 8 rounds, 32 SIGKILLs; `QCOW_METAL_CRASH_SOAK=N` runs N passes (a soak, by
//! hand: about a minute per round under TCG).
//!
//! The pseudo-random choices come from one seed, printed at the start:
//! `QCOW_METAL_CRASH_SEED=<n>` replays a run (the kill lands where the timing puts it, so a
//! replay repeats the operations, not necessarily the exact kill point). A failing round
//! keeps its images and prints where.

use qcow_metal::nbd::client::Client;
use qcow_metal::nbd::proto::{CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLUSH, CMD_WRITE};
use qcow_metal_e2e::{
    BOOT_TIMEOUT, Guest, GuestBuilder, boot, guest, qemu_img_to_raw, require_tool, run_tool_output,
};
use serde_json::Value;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
/// Virtual size of every test disk: small, so that writes overlap and TCG keeps up.
const SIZE: u64 = 16 * MIB;
/// Largest write of the stream.
const MAX_WRITE: u64 = 256 * KIB;
/// The seed when `QCOW_METAL_CRASH_SEED` is not set.
const DEFAULT_SEED: u64 = 0x5eed_c0de_2026;

// ---------------------------------------------------------------------------------------
// Pseudo-random numbers: the project's one seeded generator (fastrand), reproducible from
// the printed seed.

type Rng = fastrand::Rng;

/// True with probability `percent`/100.
fn chance(rng: &mut Rng, percent: u64) -> bool {
    rng.u64(..100) < percent
}

/// `len` random bytes.
fn random_bytes(rng: &mut Rng, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    rng.fill(&mut v);
    v
}

// ---------------------------------------------------------------------------------------
// The model: what the disk must hold after a crash.

/// A write not yet known to be durable.
struct Pending {
    /// Its number in the round's operation log.
    op: usize,
    offset: u64,
    data: Vec<u8>,
    /// Byte ranges `[start, end)` where this write may still show: its own range, less what
    /// a later, acknowledged FUA write made durable.
    live: Vec<(u64, u64)>,
}

/// The disk as of the last acknowledged flush (and FUA writes), plus the writes since.
struct Model {
    /// Every byte's durable value.
    durable: Vec<u8>,
    /// Writes since then (acknowledged or not), oldest first.
    pending: Vec<Pending>,
}

/// What a comparison of the killed image with the model found.
#[derive(Default)]
struct Verdict {
    /// Bytes written since the last flush that hold data of one of those writes.
    new_bytes: u64,
    /// Bytes written since the last flush that still hold their durable value.
    old_bytes: u64,
    /// Ranges `[start, end)` around the bytes that hold neither (the loss), at most a few.
    bad: Vec<(u64, u64)>,
    bad_bytes: u64,
}

impl Model {
    fn new(size: u64) -> Self {
        Model {
            durable: vec![0; size as usize],
            pending: Vec::new(),
        }
    }

    /// A write was sent (whether or not it will be acknowledged).
    fn sent(&mut self, op: usize, offset: u64, data: Vec<u8>) {
        let end = offset + data.len() as u64;
        self.pending.push(Pending {
            op,
            offset,
            data,
            live: vec![(offset, end)],
        });
    }

    /// The last write sent was acknowledged with FUA: its bytes are durable, and no earlier
    /// write may show there any more.
    fn fua_acked(&mut self) {
        let w = self.pending.pop().expect("a FUA write was sent");
        let (s, e) = (w.offset, w.offset + w.data.len() as u64);
        self.durable[s as usize..e as usize].copy_from_slice(&w.data);
        for p in &mut self.pending {
            p.live = subtract(&p.live, s, e);
        }
        self.pending.retain(|p| !p.live.is_empty());
    }

    /// A flush was acknowledged: every write acknowledged before it is durable (the client
    /// waits for each acknowledgement, so that is every write sent).
    fn flush_acked(&mut self) {
        for p in self.pending.drain(..) {
            for &(s, e) in &p.live {
                let from = (s - p.offset) as usize;
                self.durable[s as usize..e as usize]
                    .copy_from_slice(&p.data[from..from + (e - s) as usize]);
            }
        }
    }

    /// Whether `value` at byte `b` is the data of a write since the last flush.
    fn pending_allows(&self, b: u64, value: u8) -> bool {
        self.pending.iter().any(|p| {
            p.live.iter().any(|&(s, e)| s <= b && b < e) && p.data[(b - p.offset) as usize] == value
        })
    }

    fn pending_covers(&self, b: u64) -> bool {
        self.pending
            .iter()
            .any(|p| p.live.iter().any(|&(s, e)| s <= b && b < e))
    }

    /// Compares an image's virtual disk with the model, byte by byte (4 KiB pieces that are
    /// equal to the durable data are skipped at once).
    fn verify(&self, disk: &[u8]) -> Verdict {
        let mut v = Verdict::default();
        let covered = self.covered_map();
        const PIECE: usize = 4096;
        for (i, (got, want)) in disk
            .chunks(PIECE)
            .zip(self.durable.chunks(PIECE))
            .enumerate()
        {
            let base = (i * PIECE) as u64;
            if got == want {
                v.old_bytes += covered[i];
                continue;
            }
            for (j, (&g, &w)) in got.iter().zip(want).enumerate() {
                let b = base + j as u64;
                if g == w {
                    if self.pending_covers(b) {
                        v.old_bytes += 1;
                    }
                } else if self.pending_allows(b, g) {
                    v.new_bytes += 1;
                } else {
                    v.bad_bytes += 1;
                    let room = v.bad.len() < 8;
                    match v.bad.last_mut() {
                        // Ranges a few bytes apart are one range (random data matches by chance).
                        Some((_, e)) if b <= *e + 64 => *e = b + 1,
                        _ if room => v.bad.push((b, b + 1)),
                        _ => {}
                    }
                }
            }
        }
        v
    }

    /// For each 4 KiB piece, how many of its bytes writes since the last flush cover.
    fn covered_map(&self) -> Vec<u64> {
        let pieces = self.durable.len().div_ceil(4096);
        let mut mask = vec![false; self.durable.len()];
        for p in &self.pending {
            for &(s, e) in &p.live {
                mask[s as usize..e as usize].fill(true);
            }
        }
        (0..pieces)
            .map(|i| {
                let r = i * 4096..((i + 1) * 4096).min(mask.len());
                mask[r].iter().filter(|m| **m).count() as u64
            })
            .collect()
    }

    /// A description of what the model expects at `[s, e)`, for a failure message.
    fn explain(&self, disk: &[u8], s: u64, e: u64, cluster: u64) -> String {
        let n = (e - s).min(16) as usize;
        let mut out = format!(
            "  virtual bytes {s}..{e} ({} bytes; cluster {} at offset {} in it)\n    image holds   {:02x?}\n    flushed model {:02x?}\n",
            e - s,
            s / cluster,
            s % cluster,
            &disk[s as usize..s as usize + n],
            &self.durable[s as usize..s as usize + n],
        );
        for p in &self.pending {
            if p.live.iter().any(|&(ls, le)| ls < e && s < le) {
                let from = s.max(p.offset);
                let k = (from - p.offset) as usize;
                let _ = writeln!(
                    out,
                    "    unflushed op #{} ({}+{}) has {:02x?} at {from}",
                    p.op,
                    p.offset,
                    p.data.len(),
                    &p.data[k..(k + n).min(p.data.len())]
                );
            }
        }
        out
    }
}

/// `ranges` less `[s, e)`.
fn subtract(ranges: &[(u64, u64)], s: u64, e: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(a, b) in ranges {
        if b <= s || e <= a {
            out.push((a, b));
            continue;
        }
        if a < s {
            out.push((a, s));
        }
        if e < b {
            out.push((e, b));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Host tools.

fn qemu_img(args: &[&str]) -> String {
    let t = run_tool_output("qemu-img", "qemu-utils", args);
    let (ok, out, err) = (t.success, t.stdout, t.stderr);
    assert!(ok, "`qemu-img {}` failed:\n{out}\n{err}", args.join(" "));
    out
}

/// What `qemu-img check --output=json` reported.
#[derive(Debug, Clone, Default)]
struct Check {
    corruptions: u64,
    leaks: u64,
    check_errors: u64,
    corruptions_fixed: u64,
    leaks_fixed: u64,
    /// The whole report, for messages.
    text: String,
}

impl Check {
    fn summary(&self) -> String {
        let mut s = format!(
            "{} corruptions, {} leaked clusters, {} check errors",
            self.corruptions, self.leaks, self.check_errors
        );
        if self.corruptions_fixed + self.leaks_fixed > 0 {
            let _ = write!(
                s,
                " (repaired: {} corruptions, {} leaks)",
                self.corruptions_fixed, self.leaks_fixed
            );
        }
        s
    }
}

/// `qemu-img check --output=json [extra] <image>`. Exit statuses 2 (corruptions) and 3
/// (leaks) still carry a report; anything without one fails the test.
fn qemu_img_check(image: &Path, extra: &[&str]) -> Check {
    let image = image.to_str().unwrap();
    let mut args = vec!["check", "-f", "qcow2", "--output=json"];
    args.extend_from_slice(extra);
    args.push(image);
    let t = run_tool_output("qemu-img", "qemu-utils", &args);
    let (out, err) = (t.stdout, t.stderr);
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| {
        panic!(
            "`qemu-img {}` gave no JSON report ({e}):\n{out}\n{err}",
            args.join(" ")
        )
    });
    let n = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    Check {
        corruptions: n("corruptions"),
        leaks: n("leaks"),
        check_errors: n("check-errors"),
        corruptions_fixed: n("corruptions-fixed"),
        leaks_fixed: n("leaks-fixed"),
        text: format!("{out}{err}"),
    }
}

/// The image's virtual disk as QEMU reads it.
fn virtual_disk(image: &Path, scratch: &Path) -> Vec<u8> {
    let raw = scratch.with_extension("raw");
    qemu_img_to_raw(image, &raw);
    let bytes = std::fs::read(&raw).unwrap();
    let _ = std::fs::remove_file(&raw);
    assert_eq!(
        bytes.len() as u64,
        SIZE,
        "virtual size of {}",
        image.display()
    );
    bytes
}

/// Incompatible feature bits of a qcow2 header (bit 0: dirty).
fn incompatible_features(image: &Path) -> u64 {
    let head = std::fs::read(image).unwrap();
    u64::from_be_bytes(head[72..80].try_into().unwrap())
}

// ---------------------------------------------------------------------------------------
// Rounds.

/// Where the kill lands.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kill {
    /// While a burst of writes is in flight (none of them acknowledged yet when sent).
    DuringWrites,
    /// While a flush is being processed (sent, not acknowledged).
    MidFlush,
    /// At once after a flush was acknowledged.
    AfterFlushAck,
    /// At once after a FUA write was acknowledged.
    AfterFuaAck,
    /// After the guest sat idle long enough for its background metadata write-back.
    AfterIdle,
}

/// How the round's image is made.
#[derive(Debug, Clone, Copy)]
enum Image {
    /// By the runner (the project's own engine): cluster size and refcount width.
    Engine(u64, u32),
    /// By `qemu-img create`: cluster size and further `-o` options.
    Qemu(u64, &'static str),
}

struct Round {
    name: &'static str,
    image: Image,
    kill: Kill,
    /// Extra kernel arguments (cache sizes).
    append: &'static str,
}

fn rounds() -> Vec<Round> {
    vec![
        Round {
            name: "64 KiB clusters, kill during writes",
            image: Image::Engine(64 * KIB, 16),
            kill: Kill::DuringWrites,
            append: "",
        },
        Round {
            name: "4 KiB clusters, tiny caches (evictions), kill mid-flush",
            image: Image::Engine(4 * KIB, 16),
            kill: Kill::MidFlush,
            append: "l2_cache=16K refcount_cache=8K",
        },
        Round {
            name: "512 B clusters, 1-bit refcounts, kill right after a flush ack",
            image: Image::Engine(512, 1),
            kill: Kill::AfterFlushAck,
            append: "",
        },
        Round {
            name: "64 KiB clusters, kill right after a FUA ack",
            image: Image::Engine(64 * KIB, 16),
            kill: Kill::AfterFuaAck,
            append: "",
        },
        Round {
            name: "qemu-img lazy_refcounts=on, 64 KiB clusters, kill during writes",
            image: Image::Qemu(64 * KIB, "lazy_refcounts=on"),
            kill: Kill::DuringWrites,
            append: "",
        },
        Round {
            name: "qemu-img lazy_refcounts=on, 4 KiB clusters, tiny caches, kill mid-flush",
            image: Image::Qemu(4 * KIB, "lazy_refcounts=on"),
            kill: Kill::MidFlush,
            append: "l2_cache=16K refcount_cache=8K",
        },
        Round {
            name: "qemu-img compat=0.10 (version 2: no zero clusters), kill during writes",
            image: Image::Qemu(64 * KIB, "compat=0.10"),
            kill: Kill::DuringWrites,
            append: "",
        },
        Round {
            name: "64 KiB clusters, unflushed writes, kill after idle write-back",
            image: Image::Engine(64 * KIB, 16),
            kill: Kill::AfterIdle,
            append: "",
        },
    ]
}

/// The round's guest on `disk`.
fn builder(round: &Round, disk: &Path) -> GuestBuilder {
    let b = guest().size(SIZE).disk(disk).append(round.append);
    match round.image {
        Image::Engine(cs, bits) => b.geometry(cs, bits),
        Image::Qemu(..) => b,
    }
}

fn cluster_size(round: &Round) -> u64 {
    match round.image {
        Image::Engine(cs, _) | Image::Qemu(cs, _) => cs,
    }
}

/// One write of the stream: where, how long, what.
fn pick_write(rng: &mut Rng, cs: u64, history: &[(u64, u64)]) -> (u64, u64) {
    // Length: log-uniform from 512 B to 256 KiB; some unaligned.
    let base = 512u64 << rng.u64(..10);
    let mut len = (base + rng.u64(..base)).min(MAX_WRITE);
    if chance(rng, 50) {
        len = (len / 512).max(1) * 512;
    } else {
        len = len.max(1);
    }
    let mut off = match rng.u64(..10) {
        // Over an earlier write.
        0..=2 if !history.is_empty() => {
            let (o, l) = history[rng.u64(..history.len() as u64) as usize];
            (o + rng.u64(..l)).saturating_sub(rng.u64(..len))
        }
        // Across a cluster boundary.
        3..=5 => {
            let k = rng.u64(1..=SIZE / cs - 1);
            let before = rng.u64(1..=(len - 1).clamp(1, cs));
            (k * cs).saturating_sub(before)
        }
        _ => rng.u64(..SIZE),
    };
    if chance(rng, 50) {
        off &= !511;
    }
    off = off.min(SIZE - len);
    (off, len)
}

/// A round's client: the NBD connection, the model, the operation log.
struct Driver {
    client: Client,
    model: Model,
    log: Vec<String>,
    history: Vec<(u64, u64)>,
    /// Every write and write-zeroes sent: (op number, offset, length).
    writes: Vec<(usize, u64, u64)>,
    cs: u64,
    /// Operations of each kind: writes, FUA writes, zero writes, flushes.
    counts: [u64; 4],
    /// Time from sending to acknowledgement of the plain writes so far, and their bytes:
    /// the kill during a burst of writes is placed within the time the burst should take.
    write_time: Duration,
    write_bytes: u64,
    /// The longest flush so far: a kill mid-flush is placed within it.
    longest_flush: Duration,
}

impl Driver {
    fn write(&mut self, rng: &mut Rng, fua: bool) {
        let (off, len) = pick_write(rng, self.cs, &self.history);
        let op = self.log.len();
        let data = random_bytes(rng, len as usize);
        self.log.push(format!(
            "#{op} write{} {off}+{len}",
            if fua { " FUA" } else { "" }
        ));
        self.model.sent(op, off, data.clone());
        self.writes.push((op, off, len));
        let t = Instant::now();
        let err = self.client.write(off, &data, fua).expect("NBD write");
        assert_eq!(err, 0, "NBD error on op #{op}");
        if fua {
            self.model.fua_acked();
            self.counts[1] += 1;
        } else {
            self.write_time += t.elapsed();
            self.write_bytes += len;
            self.counts[0] += 1;
        }
        self.history.push((off, len));
    }

    fn write_zeroes(&mut self, rng: &mut Rng) {
        let (mut off, mut len) = pick_write(rng, self.cs, &self.history);
        if chance(rng, 50) && self.cs <= MAX_WRITE {
            // Whole clusters: the engine may drop them (their refcounts go later).
            off = off / self.cs * self.cs;
            len = (len / self.cs).max(1) * self.cs;
            off = off.min(SIZE - len);
        }
        let no_hole = chance(rng, 30);
        let fua = chance(rng, 20);
        let flags = if no_hole { CMD_FLAG_NO_HOLE } else { 0 } | if fua { CMD_FLAG_FUA } else { 0 };
        let op = self.log.len();
        self.log.push(format!(
            "#{op} write-zeroes{}{} {off}+{len}",
            if no_hole { " NO_HOLE" } else { "" },
            if fua { " FUA" } else { "" }
        ));
        self.model.sent(op, off, vec![0; len as usize]);
        self.writes.push((op, off, len));
        let err = self
            .client
            .write_zeroes(off, len as u32, flags)
            .expect("NBD write-zeroes");
        assert_eq!(err, 0, "NBD error on op #{op}");
        if fua {
            self.model.fua_acked();
        }
        self.counts[2] += 1;
        self.history.push((off, len));
    }

    fn flush(&mut self) {
        let op = self.log.len();
        self.log.push(format!("#{op} flush"));
        let t = Instant::now();
        let err = self.client.flush().expect("NBD flush");
        self.longest_flush = self.longest_flush.max(t.elapsed());
        assert_eq!(err, 0, "NBD error on op #{op}");
        self.model.flush_acked();
        self.counts[3] += 1;
    }

    /// Sends a write without waiting for its acknowledgement; returns its length.
    fn send_write(&mut self, rng: &mut Rng) -> u64 {
        let (off, len) = pick_write(rng, self.cs, &self.history);
        let op = self.log.len();
        let data = random_bytes(rng, len as usize);
        self.log
            .push(format!("#{op} write {off}+{len} (not waited for)"));
        self.model.sent(op, off, data.clone());
        self.writes.push((op, off, len));
        self.client
            .send(CMD_WRITE, 0, off, len as u32, &data)
            .expect("NBD send");
        self.counts[0] += 1;
        len
    }

    /// How long writing `bytes` took so far, on average, in microseconds (at least 1).
    fn write_estimate_us(&self, bytes: u64) -> u64 {
        let per_byte = self.write_time.as_secs_f64() / self.write_bytes.max(1) as f64;
        ((bytes as f64 * per_byte * 1e6) as u64).max(1)
    }

    /// Sends a flush without waiting for its acknowledgement.
    fn send_flush(&mut self) {
        let op = self.log.len();
        self.log.push(format!("#{op} flush (not waited for)"));
        self.client.send(CMD_FLUSH, 0, 0, 0, &[]).expect("NBD send");
        self.counts[3] += 1;
    }

    /// The operations since the last acknowledged flush, for a failure message.
    fn tail_log(&self) -> String {
        let from = self
            .log
            .iter()
            .rposition(|l| l.ends_with(" flush"))
            .unwrap_or(0);
        self.log[from..].join("\n    ")
    }
}

/// Connects to the guest's NBD export once its network is up.
fn connect(g: &mut Guest) -> Client {
    g.wait_for_metrics(BOOT_TIMEOUT, || false)
        .unwrap_or_else(|e| panic!("the guest's network did not come up: {e}"));
    Client::connect(("127.0.0.1", g.nbd_port()), "")
        .unwrap_or_else(|e| panic!("NBD connect: {e}\n{}", g.tail()))
}

/// Kill modes for crash cycles after a round's first (the idle one takes too long). A kill
/// mid-flush is the likeliest to land between two metadata writes, so it comes twice.
const LATER_KILLS: [Kill; 5] = [
    Kill::DuringWrites,
    Kill::MidFlush,
    Kill::MidFlush,
    Kill::AfterFlushAck,
    Kill::AfterFuaAck,
];

/// Crash cycles per round: boot, stream, kill, check; each on the image the last left.
const CYCLES: usize = 3;

/// Runs one round; `lines` collects what it found, `Err` carries a failure with its evidence.
fn run_round(
    index: usize,
    round: &Round,
    seed: u64,
    dir: &Path,
    lines: &mut Vec<String>,
) -> Result<(), String> {
    let mut rng = Rng::with_seed(seed ^ (index as u64 + 1).wrapping_mul(0xa076_1d64_78bd_642f));
    let disk = dir.join(format!("round{}.qcow2", index + 1));
    if let Image::Qemu(cs, options) = round.image {
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("cluster_size={cs},{options}"),
            disk.to_str().unwrap(),
            &SIZE.to_string(),
        ]);
    }
    // What the image holds, as QEMU reads it: a fresh image reads as zeros.
    let mut image = vec![0u8; SIZE as usize];
    let mut dirty = false;
    let mut boot_wall = Duration::ZERO;
    for cycle in 0..CYCLES {
        let kill = if cycle == 0 {
            round.kill
        } else {
            LATER_KILLS[rng.u64(..LATER_KILLS.len() as u64) as usize]
        };
        let (killed, was_dirty, wall) =
            crash_cycle(round, kill, &disk, image, &mut rng, dir, lines, cycle)?;
        image = killed;
        dirty = was_dirty;
        boot_wall = wall;
    }

    // A kill while the guest boots on the killed image (opening it, rebuilding refcounts
    // of a dirty one): nothing may change in the virtual disk.
    let wait = rng.u64(..boot_wall.as_micros() as u64 * 5 / 4 + 1);
    let mut g = builder(round, &disk)
        .start()
        .unwrap_or_else(|e| panic!("starting the guest: {e}"));
    std::thread::sleep(Duration::from_micros(wait));
    let banner = g
        .serial_log()
        .lines()
        .any(qcow_metal_runner::guest::is_banner);
    g.kill();
    drop(g);
    let (check, now_dirty) = check_killed(&disk, dir)?;
    lines.push(format!(
        "killed {} ms into a boot ({}): qemu-img check: {}",
        wait / 1000,
        if banner {
            "after its banner"
        } else {
            "before its banner"
        },
        check
    ));
    let after = virtual_disk(&disk, &dir.join(format!("round{}-boot-killed", index + 1)));
    if let Some(k) = first_difference(&after, &image) {
        return Err(format!(
            "a kill during boot changed the virtual disk: byte {k} holds {:#04x}, it held {:#04x}",
            after[k], image[k]
        ));
    }
    dirty |= now_dirty;

    // Boot again on the killed image: it opens, serves what QEMU reads, takes writes, and
    // shuts down cleanly.
    let (mut g, _) = boot(builder(round, &disk));
    let mut client = connect(&mut g);
    serves(&mut client, &image, "after the crashes")?;
    let mut expected = image;
    for _ in 0..rng.u64(3..=8) {
        let (off, len) = pick_write(&mut rng, cluster_size(round), &[]);
        let data = random_bytes(&mut rng, len as usize);
        assert_eq!(client.write(off, &data, false).expect("NBD write"), 0);
        expected[off as usize..(off + len) as usize].copy_from_slice(&data);
    }
    assert_eq!(client.flush().expect("NBD flush"), 0);
    client.disconnect().expect("NBD disconnect");
    let outcome = g.shutdown().expect("shutdown");
    for p in console_problems(&g) {
        lines.push(format!("last boot's console: {p}"));
    }
    let console = g.serial_log();
    if !outcome.is_clean() || console.contains("closing the disk failed") {
        return Err(format!(
            "the guest did not shut down cleanly after the crashes: {outcome}\n{}",
            g.tail()
        ));
    }
    drop(g);
    let check = qemu_img_check(&disk, &[]);
    let dirty_after = incompatible_features(&disk) & 1 != 0;
    lines.push(format!(
        "rebooted: served the killed image, took more writes, clean shutdown; qemu-img check: {}{}",
        check.summary(),
        if dirty_after {
            " (dirty bit still set)"
        } else {
            ""
        }
    ));
    if check.corruptions > 0 || check.check_errors > 0 || dirty_after {
        return Err(format!(
            "after the reboot and a clean shutdown the image is not clean:\n{}",
            check.text
        ));
    }
    if dirty && check.leaks > 0 {
        return Err(format!(
            "the guest opened a dirty image without rebuilding its refcounts: {} leaked \
             clusters after a clean shutdown\n{}",
            check.leaks, check.text
        ));
    }
    if check.leaks > 0 {
        lines.push(format!(
            "  note: {} clusters leaked by the crashes stay leaked (the image was not dirty, so \
             the guest does not rebuild refcounts on open; `qemu-img check -r leaks` frees them)",
            check.leaks
        ));
    }
    let after = virtual_disk(&disk, &dir.join(format!("round{}-after", index + 1)));
    if let Some(k) = first_difference(&after, &expected) {
        return Err(format!(
            "after the reboot's writes and a clean shutdown, byte {k} holds {:#04x}, expected {:#04x}",
            after[k], expected[k]
        ));
    }
    Ok(())
}

/// The guest's warnings and errors on its console (reported with the round).
fn console_problems(g: &Guest) -> Vec<String> {
    g.serial_log()
        .lines()
        .filter(|l| l.contains("] WARN ") || l.contains("] ERROR "))
        .map(|l| l.trim().to_string())
        .collect()
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a == b {
        return None;
    }
    Some(a.iter().zip(b).position(|(x, y)| x != y).unwrap_or(0))
}

/// Reads the whole export and compares it with `want` (what QEMU reads from the image).
fn serves(client: &mut Client, want: &[u8], when: &str) -> Result<(), String> {
    let mut buf = vec![0u8; MIB as usize];
    for (i, want) in want.chunks(MIB as usize).enumerate() {
        let off = i as u64 * MIB;
        let buf = &mut buf[..want.len()];
        let err = client.read(off, buf).expect("NBD read");
        if err != 0 {
            return Err(format!(
                "{when}, the guest fails to read {off}+{} (NBD error {err})",
                want.len()
            ));
        }
        if let Some(k) = first_difference(buf, want) {
            return Err(format!(
                "{when}, the guest serves byte {} as {:#04x}; QEMU reads {:#04x} there",
                off + k as u64,
                buf[k],
                want[k]
            ));
        }
    }
    Ok(())
}

/// `qemu-img check` on a killed image: no corruption (leaks allowed). A dirty image (lazy
/// refcounts) is judged as QEMU opens it, after `check -r all` on a copy. Returns the
/// summary and whether the image was dirty.
fn check_killed(disk: &Path, dir: &Path) -> Result<(String, bool), String> {
    let dirty = incompatible_features(disk) & 1 != 0;
    let check = qemu_img_check(disk, &[]);
    if !dirty {
        if check.corruptions > 0 || check.check_errors > 0 {
            return Err(format!(
                "qemu-img check finds corruption in the killed image:\n{}",
                check.text
            ));
        }
        return Ok((check.summary(), false));
    }
    // QEMU rebuilds a dirty image's refcounts when it opens it: judge it that way.
    let copy = dir.join("repaired.qcow2");
    std::fs::copy(disk, &copy).unwrap();
    let repaired = qemu_img_check(&copy, &["-r", "all"]);
    let after = qemu_img_check(&copy, &[]);
    let _ = std::fs::remove_file(&copy);
    if after.corruptions + after.check_errors + after.leaks > 0 {
        return Err(format!(
            "the dirty image is not consistent after QEMU's refcount rebuild:\n{}",
            after.text
        ));
    }
    Ok((
        format!(
            "{} (dirty bit set: lazy refcounts); as QEMU opens it (check -r all on a copy): {}; \
             then: {}",
            check.summary(),
            repaired.summary(),
            after.summary()
        ),
        true,
    ))
}

/// One crash cycle on the image holding `image`: boot, check the export serves it, stream
/// writes and flushes, kill as `kill` says, check the killed image. Returns what it holds
/// (as QEMU reads it), whether it was left dirty, and how long the boot took.
#[allow(clippy::too_many_arguments)]
fn crash_cycle(
    round: &Round,
    kill: Kill,
    disk: &Path,
    image: Vec<u8>,
    rng: &mut Rng,
    dir: &Path,
    lines: &mut Vec<String>,
    cycle: usize,
) -> Result<(Vec<u8>, bool, Duration), String> {
    let (mut g, banner) = boot(builder(round, disk));
    let mut client = connect(&mut g);
    if cycle > 0 {
        serves(&mut client, &image, "after a crash")?;
    }
    let mut d = Driver {
        client,
        model: Model {
            durable: image,
            pending: Vec::new(),
        },
        log: Vec::new(),
        history: Vec::new(),
        writes: Vec::new(),
        cs: cluster_size(round),
        counts: [0; 4],
        write_time: Duration::ZERO,
        write_bytes: 0,
        longest_flush: Duration::ZERO,
    };
    let ops = rng.u64(16..=40);
    let mut until_flush = rng.u64(1..=6);
    for _ in 0..ops {
        match rng.u64(..100) {
            0..=9 => d.write_zeroes(rng),
            10..=21 => d.write(rng, true),
            _ => d.write(rng, false),
        }
        until_flush -= 1;
        if until_flush == 0 {
            d.flush();
            until_flush = rng.u64(1..=6);
        }
    }
    let how = match kill {
        Kill::DuringWrites => {
            for _ in 0..rng.u64(1..=3) {
                d.write(rng, false);
            }
            let burst = rng.u64(2..=8);
            let bytes: u64 = (0..burst).map(|_| d.send_write(rng)).sum();
            // Within the time the burst should take (as the acknowledged writes took).
            let span = d.write_estimate_us(bytes);
            let wait = rng.u64(..span + span / 4);
            std::thread::sleep(Duration::from_micros(wait));
            format!(
                "{burst} writes ({bytes} bytes, ~{span} us of work) in flight, killed {wait} us \
                 after sending them"
            )
        }
        Kill::MidFlush => {
            // Many writes, so that the flush has much metadata to write back.
            for _ in 0..rng.u64(4..=10) {
                d.write(rng, false);
            }
            d.send_flush();
            // Within the longest flush seen so far.
            let span = d.longest_flush.as_micros() as u64 + 1;
            let wait = rng.u64(..span);
            std::thread::sleep(Duration::from_micros(wait));
            format!(
                "flush in flight (longest flush so far {span} us), killed {wait} us after \
                 sending it"
            )
        }
        Kill::AfterFlushAck => {
            for _ in 0..rng.u64(2..=6) {
                d.write(rng, false);
            }
            d.flush();
            "killed at once after a flush ack".to_string()
        }
        Kill::AfterFuaAck => {
            for _ in 0..rng.u64(1..=4) {
                d.write(rng, false);
            }
            d.write(rng, true);
            "killed at once after a FUA ack".to_string()
        }
        Kill::AfterIdle => {
            for _ in 0..rng.u64(3..=8) {
                d.write(rng, false);
            }
            // The guest writes dirty metadata back every 5 s while idle.
            let wait = rng.u64(5_500..=7_000);
            std::thread::sleep(Duration::from_millis(wait));
            format!("unflushed writes, killed after {wait} ms idle")
        }
    };
    g.kill();
    let problems = console_problems(&g);
    drop(g);
    let [w, fua, z, f] = d.counts;
    lines.push(format!(
        "crash {}: {} ops ({w} writes, {fua} FUA, {z} write-zeroes, {f} flushes); {how}; {} \
         writes unflushed",
        cycle + 1,
        d.log.len(),
        d.model.pending.len()
    ));
    for p in problems {
        lines.push(format!("  guest console: {p}"));
    }

    // The killed image: consistent, and every flushed byte is there.
    let index = disk
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("round")
        .to_string();
    let checked = check_killed(disk, dir);
    let killed = virtual_disk(disk, &dir.join(format!("{index}-killed")));
    let verdict = d.model.verify(&killed);
    let mut failures = Vec::new();
    match &checked {
        Ok((summary, _)) => lines.push(format!("  killed image: qemu-img check: {summary}")),
        Err(e) => failures.push(e.clone()),
    }
    lines.push(format!(
        "  flushed data intact: {} bytes written since the last flush hold new data, {} their old",
        verdict.new_bytes, verdict.old_bytes
    ));
    if verdict.bad_bytes > 0 {
        let mut msg = format!(
            "DATA LOSS: {} bytes of the killed image hold neither their flushed value nor an \
             unflushed write's (first ranges below)\n",
            verdict.bad_bytes
        );
        for &(s, e) in &verdict.bad {
            msg.push_str(&d.model.explain(&killed, s, e, d.cs));
            let last: Vec<String> = d
                .writes
                .iter()
                .rev()
                .filter(|w| w.1 < e && s < w.1 + w.2)
                .take(3)
                .map(|w| format!("#{} ({}+{})", w.0, w.1, w.2))
                .collect();
            let _ = writeln!(
                msg,
                "    latest writes there this boot: {}",
                if last.is_empty() {
                    "none (the data is from an earlier boot)".to_string()
                } else {
                    last.join(", ")
                }
            );
        }
        let _ = write!(
            msg,
            "  operations since the last acknowledged flush:\n    {}",
            d.tail_log()
        );
        failures.push(msg);
    }
    if !failures.is_empty() {
        return Err(failures.join("\n"));
    }
    let dirty = checked.map(|c| c.1).unwrap_or(false);
    Ok((killed, dirty, banner.wall))
}

/// A directory under the system's temporary directory, removed on drop unless a round
/// failed (then its images stay for inspection).
struct ScratchDir {
    path: PathBuf,
    keep: bool,
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if self.keep || std::thread::panicking() {
            eprintln!("crash test: images kept in {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

#[test]
fn flushed_writes_survive_sigkill_and_the_image_stays_consistent() {
    require_tool("qemu-system-x86_64", "qemu-system-x86");
    require_tool("qemu-img", "qemu-utils");
    let seed = std::env::var("QCOW_METAL_CRASH_SEED")
        .ok()
        .map(|s| {
            let s = s.trim();
            s.strip_prefix("0x")
                .map(|h| u64::from_str_radix(h, 16))
                .unwrap_or_else(|| s.parse())
                .expect("QCOW_METAL_CRASH_SEED: a number")
        })
        .unwrap_or(DEFAULT_SEED);
    let path = std::env::temp_dir().join(format!("qcow-metal-crash-{}", std::process::id()));
    std::fs::create_dir_all(&path).unwrap();
    let mut dir = ScratchDir { path, keep: false };
    println!("crash test: seed {seed:#x} (QCOW_METAL_CRASH_SEED replays it)");
    let started = Instant::now();
    let mut failed = Vec::new();
    // The soak: `QCOW_METAL_CRASH_SOAK=N` runs the round list N times (each pass with its
    // own pseudo-random choices, since a round's seed mixes in its index).
    let passes: usize = std::env::var("QCOW_METAL_CRASH_SOAK")
        .ok()
        .map(|s| {
            s.trim()
                .parse()
                .expect("QCOW_METAL_CRASH_SOAK: a number of passes")
        })
        .unwrap_or(1)
        .max(1);
    let rounds: Vec<Round> = (0..passes).flat_map(|_| rounds()).collect();
    // Each round kills QEMU in CYCLES crash cycles and once more during a boot.
    let kills = rounds.len() * (CYCLES + 1);
    assert!(
        kills >= 20,
        "CI runs at least 20 SIGKILL cycles, this run has {kills}"
    );
    println!(
        "crash test: {} rounds, {kills} SIGKILLs (QCOW_METAL_CRASH_SOAK=N runs N passes)",
        rounds.len()
    );
    for (i, round) in rounds.iter().enumerate() {
        let t = Instant::now();
        println!("round {}/{}: {}", i + 1, rounds.len(), round.name);
        let mut lines = Vec::new();
        let result = run_round(i, round, seed, &dir.path, &mut lines);
        for l in &lines {
            println!("  {l}");
        }
        match result {
            Ok(()) => println!("  ok ({:.1} s)", t.elapsed().as_secs_f64()),
            Err(e) => {
                println!("  FAILED ({:.1} s):\n{e}", t.elapsed().as_secs_f64());
                failed.push(format!("round {} ({}): {e}", i + 1, round.name));
            }
        }
    }
    println!(
        "crash test: {} rounds in {:.1} s",
        rounds.len(),
        started.elapsed().as_secs_f64()
    );
    if !failed.is_empty() {
        dir.keep = true;
        panic!(
            "{} of {} rounds failed (seed {seed:#x}; images in {}):\n{}",
            failed.len(),
            rounds.len(),
            dir.path.display(),
            failed.join("\n\n")
        );
    }
}

// ---------------------------------------------------------------------------------------
// The model's own rules, without QEMU.

#[test]
fn the_model_accepts_old_or_new_unflushed_bytes_and_catches_lost_flushed_ones() {
    let mut m = Model::new(4096);
    m.sent(0, 100, vec![1; 200]);
    m.flush_acked();
    m.sent(1, 150, vec![2; 100]);
    m.sent(2, 200, vec![3; 100]);
    let mut disk = m.durable.clone();
    // Nothing of the unflushed writes, all of them, or any mix per byte: all fine.
    assert_eq!(m.verify(&disk).bad_bytes, 0);
    disk[150..250].fill(2);
    disk[200..300].fill(3);
    assert_eq!(m.verify(&disk).bad_bytes, 0);
    disk[210] = 2;
    disk[290] = 1;
    disk[240] = 1;
    let v = m.verify(&disk);
    assert_eq!(v.bad_bytes, 0);
    assert!(v.new_bytes > 0 && v.old_bytes > 0);
    // A flushed byte that is lost, or a byte nobody wrote.
    disk[120] = 0;
    disk[1000] = 7;
    let v = m.verify(&disk);
    assert_eq!(v.bad_bytes, 2);
    assert_eq!(v.bad, vec![(120, 121), (1000, 1001)]);
}

#[test]
fn the_model_makes_fua_writes_durable_over_earlier_unflushed_ones() {
    let mut m = Model::new(4096);
    m.sent(0, 0, vec![1; 1000]);
    m.sent(1, 500, vec![2; 100]);
    m.fua_acked();
    // The FUA write is durable; the earlier write may show only outside it.
    assert!(m.durable[500..600].iter().all(|b| *b == 2));
    assert_eq!(m.pending.len(), 1);
    assert_eq!(m.pending[0].live, vec![(0, 500), (600, 1000)]);
    let mut disk = m.durable.clone();
    disk[..500].fill(1);
    assert_eq!(m.verify(&disk).bad_bytes, 0);
    disk[550] = 1;
    assert_eq!(m.verify(&disk).bad, vec![(550, 551)]);
    // A flush makes the rest durable.
    m.flush_acked();
    assert!(m.pending.is_empty());
    assert!(m.durable[..500].iter().all(|b| *b == 1));
    assert!(m.durable[500..600].iter().all(|b| *b == 2));
    assert!(m.durable[600..1000].iter().all(|b| *b == 1));
}
