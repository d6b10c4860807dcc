//! Model-based random tests: random writes, reads, flushes, discards, write-zeroes and
//! reopens at random offsets and lengths, compared byte for byte with an in-memory model;
//! afterwards the image must pass our check and `qemu-img check`, and `qemu-img compare`
//! must find it equal to the model. Plus crash tests: the device stops taking writes at a
//! random point, and the image left behind must have no corruption (leaks are allowed).

use super::util::*;
use crate::block::{BlockDevice, BlockError, MemDisk};
use crate::disk::VirtualDisk;
use crate::qcow2::{Backing, CreateOptions, OpenOptions, Qcow2};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Write {
        off: u64,
        len: u64,
        seed: u8,
    },
    Read {
        off: u64,
        len: u64,
    },
    Flush,
    Discard {
        off: u64,
        len: u64,
    },
    Zero {
        off: u64,
        len: u64,
        unmap: bool,
    },
    Reopen,
    /// One compaction step moving at most `max` clusters.
    Compact {
        max: u64,
    },
}

/// Offsets and lengths scaled to the disk: mostly small, sometimes spanning clusters.
fn op(size: u64, cs: u64) -> impl Strategy<Value = Op> {
    let span = (cs * 3 + cs / 2).min(size);
    let range = move || {
        (0..size, 1..=span).prop_map(move |(off, len)| {
            let len = len.min(size - off).max(1);
            (off.min(size - 1), len)
        })
    };
    let aligned = move || {
        (0..size / cs, 1..=4u64).prop_map(move |(c, n)| {
            let off = c * cs;
            (off, (n * cs).min(size - off))
        })
    };
    // 512-byte sectors, as most guests write (with subclusters: partial and whole ones).
    let sectors = move || {
        (0..size / 512, 1..=(cs / 512).clamp(1, 64)).prop_map(move |(s, n)| {
            let off = s * 512;
            (off, (n * 512).min(size - off))
        })
    };
    prop_oneof![
        4 => (range(), any::<u8>()).prop_map(|((off, len), seed)| Op::Write { off, len, seed }),
        2 => (sectors(), any::<u8>()).prop_map(|((off, len), seed)| Op::Write { off, len, seed }),
        1 => (sectors(), any::<bool>()).prop_map(|((off, len), unmap)| Op::Zero { off, len, unmap }),
        2 => (aligned(), any::<u8>()).prop_map(|((off, len), seed)| Op::Write { off, len, seed }),
        3 => range().prop_map(|(off, len)| Op::Read { off, len }),
        1 => Just(Op::Flush),
        1 => range().prop_map(|(off, len)| Op::Discard { off, len }),
        1 => aligned().prop_map(|(off, len)| Op::Discard { off, len }),
        1 => (range(), any::<bool>()).prop_map(|((off, len), unmap)| Op::Zero { off, len, unmap }),
        1 => (aligned(), any::<bool>()).prop_map(|((off, len), unmap)| Op::Zero { off, len, unmap }),
        1 => Just(Op::Reopen),
        1 => (1..=8u64).prop_map(|max| Op::Compact { max }),
    ]
}

pub(super) fn pattern(len: u64, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

/// The bytes a discard zeroes: whole clusters inside the range (the last partial cluster of
/// the disk counts as whole).
pub(super) fn discarded(off: u64, len: u64, cs: u64, size: u64) -> (u64, u64) {
    let first = off.div_ceil(cs) * cs;
    let end = if off + len == size {
        size
    } else {
        (off + len) / cs * cs
    };
    (first.min(size), end.max(first.min(size)))
}

fn open_opts(small: bool) -> OpenOptions {
    if small {
        small_cache()
    } else {
        OpenOptions::default()
    }
}

fn run(cs: u64, rb: u32, lazy: bool, small: bool, extended_l2: bool, ops: &[Op]) {
    let size = (cs * 24).max(1 << 20) + 1536;
    let mut q = Qcow2::create(
        MemDisk::growable(),
        &CreateOptions {
            virtual_size: size,
            cluster_size: cs,
            refcount_bits: rb,
            lazy_refcounts: lazy,
            extended_l2,
            open: open_opts(small),
            ..CreateOptions::default()
        },
    )
    .unwrap();
    // Start the incremental space counters; they are compared with a full walk at the end.
    q.space().unwrap();
    let mut model = vec![0u8; size as usize];
    for o in ops {
        match *o {
            Op::Write { off, len, seed } => {
                let off = off.min(size - 1);
                let len = len.min(size - off);
                let data = pattern(len, seed);
                q.write(off, &data).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            Op::Read { off, len } => {
                let off = off.min(size - 1);
                let len = len.min(size - off);
                let mut buf = vec![0xEEu8; len as usize];
                q.read(off, &mut buf).unwrap();
                assert!(
                    buf == model[off as usize..(off + len) as usize],
                    "read mismatch at {off}+{len}"
                );
            }
            Op::Flush => q.flush().unwrap(),
            Op::Discard { off, len } => {
                let off = off.min(size - 1);
                let len = len.min(size - off);
                q.discard(off, len).unwrap();
                let (a, b) = discarded(off, len, cs, size);
                model[a as usize..b as usize].fill(0);
            }
            Op::Zero { off, len, unmap } => {
                let off = off.min(size - 1);
                let len = len.min(size - off);
                q.write_zeroes(off, len, unmap).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            Op::Reopen => {
                let dev = q.close().unwrap();
                q = Qcow2::open(dev, open_opts(small)).unwrap();
                q.space().unwrap();
            }
            Op::Compact { max } => {
                let p = q.compact_step(max).unwrap();
                assert!(p.moved_clusters <= max, "{p:?}");
                assert!(p.extent_after <= p.extent_before, "{p:?}");
                assert_eq!(p.extent_after, q.image_extent());
                assert_space_kept(&mut q);
                // Checkpoint: the image cut to its extent is clean and equals the model
                // for QEMU's tools, and goes on from there.
                q = super::compact::checkpoint(
                    q,
                    &model,
                    open_opts(small),
                    "after a compaction step",
                );
                q.space().unwrap();
            }
        }
    }
    let mut all = vec![0u8; size as usize];
    q.read(0, &mut all).unwrap();
    assert!(all == model, "whole-disk read differs from the model");
    let report = q.check().unwrap();
    assert!(report.is_clean(), "our check: {report}");
    q.flush().unwrap();
    assert_space_kept(&mut q);
    let dev = q.close().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.qcow2");
    save(&dev, &img);
    assert_qemu_clean(&img);
    assert_qemu_compare(dir.path(), &img, &model, "qemu-img compare");
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

macro_rules! model_test {
    ($name:ident, $cs:expr, $rb:expr, $cases:expr, $n:expr) => {
        model_test!($name, $cs, $rb, $cases, $n, false);
    };
    ($name:ident, $cs:expr, $rb:expr, $cases:expr, $n:expr, $ext:expr) => {
        proptest! {
            #![proptest_config(config($cases))]
            #[test]
            fn $name(
                ops in proptest::collection::vec(op(($cs * 24u64).max(1 << 20) + 1536, $cs), 1..$n),
                lazy in any::<bool>(),
                small in any::<bool>(),
            ) {
                run($cs, $rb, lazy, small, $ext, &ops);
            }
        }
    };
}

model_test!(model_512_rc1, 512, 1, 12, 60);
model_test!(model_512_rc64, 512, 64, 12, 60);
model_test!(model_4k_rc16, 4096, 16, 12, 60);
model_test!(model_4k_rc1, 4096, 1, 8, 60);
model_test!(model_64k_rc64, 65536, 64, 8, 40);
model_test!(model_64k_rc16, 65536, 16, 8, 40);
model_test!(model_2m_rc16, 2 << 20, 16, 4, 25);
model_test!(model_2m_rc1, 2 << 20, 1, 3, 20);
// Extended L2 entries (subclusters of 512 B, 2 KiB and 64 KiB).
model_test!(model_ext_16k_rc16, 16384, 16, 10, 60, true);
model_test!(model_ext_64k_rc1, 65536, 1, 8, 50, true);
model_test!(model_ext_2m_rc64, 2 << 20, 64, 3, 25, true);

/// A device that stops taking writes after a budget (a power cut at a random point). Like
/// a disk with a volatile write cache, it keeps only what a flush made durable for sure:
/// writes since the last flush may reach the medium or not, each on its own.
struct CrashDisk {
    /// What reads see: every write so far.
    inner: MemDisk,
    /// What the last flush made durable.
    durable: MemDisk,
    /// Writes since the last flush.
    pending: Vec<(u64, Vec<u8>)>,
    writes_left: u64,
}

impl CrashDisk {
    fn new(base: MemDisk, budget: u64) -> Self {
        CrashDisk {
            durable: base.clone(),
            inner: base,
            pending: Vec::new(),
            writes_left: budget,
        }
    }

    /// The medium after a power cut three ways: with every pending write, with none, and
    /// with a pseudo-random half of them (chosen by `seed`).
    fn cuts(&self, seed: u64) -> [MemDisk; 3] {
        let mut rng = fastrand::Rng::with_seed(seed);
        let coin: Vec<bool> = (0..self.pending.len()).map(|_| rng.bool()).collect();
        [
            self.after_cut(|_| true),
            self.after_cut(|_| false),
            self.after_cut(|i| coin[i]),
        ]
    }

    /// The medium after a power cut: the durable bytes plus the pending writes `keep`
    /// picks (by their index), in the order they were written.
    fn after_cut(&self, keep: impl Fn(usize) -> bool) -> MemDisk {
        let mut d = self.durable.clone();
        for (i, (off, data)) in self.pending.iter().enumerate() {
            if keep(i) {
                d.write_at(*off, data).unwrap();
            }
        }
        d
    }
}

impl BlockDevice for CrashDisk {
    fn capacity(&self) -> u64 {
        self.inner.capacity()
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        self.inner.read_at(offset, buf)
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), BlockError> {
        if self.writes_left == 0 {
            return Err(BlockError::Io);
        }
        self.writes_left -= 1;
        self.pending.push((offset, buf.to_vec()));
        self.inner.write_at(offset, buf)
    }
    fn flush(&mut self) -> Result<(), BlockError> {
        if self.writes_left == 0 {
            return Err(BlockError::Io);
        }
        for (off, data) in self.pending.drain(..) {
            self.durable.write_at(off, &data)?;
        }
        self.inner.flush()
    }
    fn discard(&mut self, _offset: u64, _len: u64) -> Result<(), BlockError> {
        Ok(())
    }
}

fn crash_run(cs: u64, rb: u32, lazy: bool, budget: u64, small: bool, ops: &[Op]) -> u64 {
    let size = (cs * 24).max(1 << 20) + 1536;
    let base = Qcow2::create(
        MemDisk::growable(),
        &CreateOptions {
            virtual_size: size,
            cluster_size: cs,
            refcount_bits: rb,
            lazy_refcounts: lazy,
            ..CreateOptions::default()
        },
    )
    .unwrap()
    .close()
    .unwrap();
    crash_on(base, size, budget, small, ops)
}

/// Runs `ops` on the image in `base` until the device has taken `budget` writes, then
/// checks the image left on the device: no corruption, and every byte no request touched
/// since the last completed flush reads as it did then. Returns the writes used.
fn crash_on(base: MemDisk, size: u64, budget: u64, small: bool, ops: &[Op]) -> u64 {
    let dev = CrashDisk::new(base, budget);
    let mut q = Qcow2::open(dev, open_opts(small)).unwrap();
    // What the disk held at the last completed flush, and the bytes requests have touched
    // since: after the crash every untouched byte must still read as flushed.
    let mut flushed = vec![0u8; size as usize];
    q.read(0, &mut flushed).unwrap();
    let mut current = flushed.clone();
    let mut touched: Vec<(usize, usize)> = Vec::new();
    for o in ops {
        let range = |off: u64, len: u64| {
            let off = off.min(size - 1);
            (off, len.min(size - off))
        };
        let r = match *o {
            Op::Write { off, len, seed } => {
                let (off, len) = range(off, len);
                touched.push((off as usize, (off + len) as usize));
                let data = pattern(len, seed);
                current[off as usize..(off + len) as usize].copy_from_slice(&data);
                q.write(off, &data)
            }
            Op::Flush | Op::Reopen => {
                let r = q.flush();
                if r.is_ok() {
                    flushed.copy_from_slice(&current);
                    touched.clear();
                }
                r
            }
            Op::Discard { off, len } => {
                let (off, len) = range(off, len);
                touched.push((off as usize, (off + len) as usize));
                let (a, b) = discarded(off, len, q.cluster_size(), size);
                current[a as usize..b as usize].fill(0);
                q.discard(off, len)
            }
            Op::Zero { off, len, unmap } => {
                let (off, len) = range(off, len);
                touched.push((off as usize, (off + len) as usize));
                current[off as usize..(off + len) as usize].fill(0);
                q.write_zeroes(off, len, unmap)
            }
            Op::Read { .. } => Ok(()),
            Op::Compact { max } => q.compact_step(max).map(drop).map_err(Into::into),
        };
        if r.is_err() {
            break;
        }
    }
    let assert_flushed_kept = |q: &mut Qcow2<MemDisk>| {
        let mut now = vec![0u8; size as usize];
        q.read(0, &mut now).unwrap();
        // Untouched bytes as flushed, touched ones as they read now.
        let mut want = flushed.clone();
        for &(a, b) in &touched {
            want[a..b].copy_from_slice(&now[a..b]);
        }
        if now == want {
            return;
        }
        if let Some(i) = (0..size as usize).find(|&i| now[i] != want[i]) {
            panic!(
                "byte {i}, untouched since the last flush, reads {:#x} after the crash, not {:#x}",
                now[i], flushed[i]
            );
        }
    };
    // Power cut: the medium holds what was flushed plus some of the later writes: all of
    // them, none, or a pseudo-random half.
    let used = budget - q.device().writes_left;
    for disk in q.device().cuts(budget) {
        if disk.bytes()[79] & 1 != 0 {
            // Lazy refcounts: stale refcounts are expected; the next writable open
            // rebuilds them, after which the image must be clean, leaks included.
            let mut q = Qcow2::open(disk, OpenOptions::default()).unwrap();
            assert_flushed_kept(&mut q);
            let report = q.check().unwrap();
            assert!(
                report.is_clean(),
                "after the rebuild of a crashed lazy image: {report}"
            );
            let dev = q.close().unwrap();
            assert_eq!(
                dev.bytes()[79] & 1,
                0,
                "the dirty bit stays set after close"
            );
            let mut q = Qcow2::open(dev, read_only()).unwrap();
            assert!(q.check().unwrap().is_clean());
            continue;
        }
        let mut q = Qcow2::open(disk, read_only()).unwrap();
        assert_flushed_kept(&mut q);
        let report = q.check().unwrap();
        assert_eq!(report.corruptions, 0, "corruption after a crash: {report}");
        assert_eq!(report.check_errors, 0, "{report}");
    }
    used
}

/// Runs the ops once to count the device writes, then cuts the power after many different
/// numbers of writes (every write when there are few).
fn crash_sweep(cs: u64, rb: u32, lazy: bool, small: bool, ops: &[Op]) {
    let total = crash_run(cs, rb, lazy, u64::MAX / 2, small, ops);
    let step = (total / 40).max(1);
    let mut k = 0;
    while k <= total {
        crash_run(cs, rb, lazy, k, small, ops);
        k += step;
    }
}

proptest! {
    #![proptest_config(config(6))]
    #[test]
    fn crash_leaves_no_corruption(
        ops in proptest::collection::vec(op((1u64 << 20) + 1536, 512), 1..50),
        rb in prop_oneof![Just(1u32), Just(16), Just(64)],
        small in any::<bool>(),
    ) {
        crash_sweep(512, rb, false, small, &ops);
    }

    #[test]
    fn crash_leaves_no_corruption_4k(
        ops in proptest::collection::vec(op((1u64 << 20) + 1536, 4096), 1..50),
        small in any::<bool>(),
    ) {
        crash_sweep(4096, 16, false, small, &ops);
    }

    /// Lazy refcounts: refcount blocks reach the disk in any order; after a crash the
    /// next writable open rebuilds them from the references.
    #[test]
    fn crash_with_lazy_refcounts(
        ops in proptest::collection::vec(op((1u64 << 20) + 1536, 512), 1..50),
        rb in prop_oneof![Just(1u32), Just(16), Just(64)],
        small in any::<bool>(),
    ) {
        crash_sweep(512, rb, true, small, &ops);
    }
}

/// The active L1 table's entries and the refcount table's entries, as on the device.
fn table_entries(d: &MemDisk) -> (Vec<u64>, Vec<u64>) {
    let b = d.bytes();
    let be = |at: usize, n: usize| -> u64 {
        b[at..at + n]
            .iter()
            .fold(0u64, |acc, &x| (acc << 8) | x as u64)
    };
    let cs = 1usize << be(20, 4);
    let (l1_size, l1_off) = (be(36, 4) as usize, be(40, 8) as usize);
    let (rt_off, rt_clusters) = (be(48, 8) as usize, be(56, 4) as usize);
    let l1 = (0..l1_size).map(|i| be(l1_off + i * 8, 8)).collect();
    let rt = (0..rt_clusters * cs / 8)
        .map(|i| be(rt_off + i * 8, 8))
        .collect();
    (l1, rt)
}

/// Power cuts at every device write of a compaction (data clusters, L2 tables and refcount
/// blocks moving), in all three cuts of the write-cache model: no corruption, and every
/// flushed byte reads back. The image: the whole disk written, then three quarters of it
/// trimmed in stripes, so that live clusters and tables sit at the tail.
fn compaction_sweep(cs: u64, rb: u32, lazy: bool, small: bool, size: u64) {
    let mut q = Qcow2::create(
        MemDisk::growable(),
        &CreateOptions {
            virtual_size: size,
            cluster_size: cs,
            refcount_bits: rb,
            lazy_refcounts: lazy,
            ..CreateOptions::default()
        },
    )
    .unwrap();
    let chunk = 8 * cs;
    let mut off = 0;
    while off < size {
        let len = chunk.min(size - off);
        q.write(off, &pattern(len, (off / chunk) as u8)).unwrap();
        off += len;
    }
    let mut off = 0;
    while off < size {
        let len = (3 * chunk / 4).min(size - off);
        q.discard(off, len).unwrap();
        off += chunk;
    }
    let base = q.close().unwrap();
    let ops = [
        Op::Compact { max: 3 },
        Op::Write {
            off: size - 3 * cs,
            len: cs + 7,
            seed: 99,
        },
        Op::Compact { max: 16 },
        Op::Flush,
        Op::Compact { max: 1 << 20 },
        Op::Discard { off: 0, len: size },
    ];
    // Uncut, the compaction shrinks the image, moving tables too (with small clusters).
    let mut q = Qcow2::open(base.clone(), open_opts(small)).unwrap();
    let before = q.image_extent();
    let tables = table_entries(&base);
    while !q.compact_step(1 << 20).unwrap().done {}
    let after = q.image_extent();
    assert!(after * 2 < before, "extent {before} -> {after}");
    let moved = table_entries(&q.close().unwrap());
    if cs == 512 {
        assert_ne!(moved.0, tables.0, "no L2 table moved");
        if tables.1.iter().filter(|&&e| e != 0).count() > 1 {
            assert_ne!(moved.1, tables.1, "no refcount block moved");
        }
    }
    let total = crash_on(base.clone(), size, u64::MAX / 2, small, &ops);
    for k in 0..=total {
        crash_on(base.clone(), size, k, small, &ops);
    }
    // After a cut, the next compaction (as the guest starts at boot) finishes the job:
    // it frees what the cut left leaked at the tail, and the guest disk reads the same.
    for k in (0..=total).step_by((total as usize / 12).max(1)) {
        let mut q = Qcow2::open(CrashDisk::new(base.clone(), k), open_opts(small)).unwrap();
        for o in &ops {
            let r = match *o {
                Op::Compact { max } => q.compact_step(max).map(drop).map_err(Into::into),
                Op::Write { off, len, seed } => q.write(off, &pattern(len, seed)),
                Op::Discard { off, len } => q.discard(off, len),
                _ => q.flush(),
            };
            if r.is_err() {
                break;
            }
        }
        for disk in [
            q.device().after_cut(|_| true),
            q.device().after_cut(|_| false),
        ] {
            let mut q = Qcow2::open(disk, OpenOptions::default()).unwrap();
            let mut was = vec![0u8; size as usize];
            q.read(0, &mut was).unwrap();
            while !q.compact_step(1 << 20).unwrap().done {}
            let mut now = vec![0u8; size as usize];
            q.read(0, &mut now).unwrap();
            assert!(
                was == now,
                "compaction after a cut at write {k} changed the disk"
            );
            let r = q.check().unwrap();
            assert_eq!(
                r.corruptions, 0,
                "after a cut at write {k} and compaction: {r}"
            );
            let after = q.image_extent();
            assert!(
                after * 2 < before,
                "after a cut at write {k}: extent {before} -> {after}"
            );
        }
    }
}

#[test]
fn crash_during_compaction_512() {
    compaction_sweep(512, 16, false, false, 256 << 10);
}

#[test]
fn crash_during_compaction_512_small_cache_rc1() {
    compaction_sweep(512, 1, false, true, 192 << 10);
}

#[test]
fn crash_during_compaction_lazy() {
    compaction_sweep(512, 64, true, true, 128 << 10);
}

#[test]
fn crash_during_compaction_64k() {
    compaction_sweep(65536, 16, false, false, 8 << 20);
}

/// Power cuts while the refcount table grows: a QEMU-made image with 512-byte clusters and
/// 64-bit refcounts starts with a table that covers 2 MiB of host space; 4 MiB of writes
/// make it grow (with refcount blocks that count themselves) several times.
#[test]
fn crash_during_refcount_table_growth() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("g.qcow2");
    let size = 8u64 << 20;
    qemu_create(&img, "cluster_size=512,refcount_bits=64", size);
    let base = MemDisk::from_bytes(std::fs::read(&img).unwrap(), false);
    let ops: Vec<Op> = (0..8u64)
        .map(|i| Op::Write {
            off: i * (512 << 10),
            len: 512 << 10,
            seed: i as u8,
        })
        .chain([Op::Flush])
        .collect();
    let total = crash_on(base.clone(), size, u64::MAX / 2, false, &ops);
    let mut k = 0;
    while k <= total {
        crash_on(base.clone(), size, k, false, &ops);
        k += (total / 100).max(1);
    }
    // And the image grown without a crash is what QEMU expects.
    let mut q = Qcow2::open(base, OpenOptions::default()).unwrap();
    for o in &ops {
        if let Op::Write { off, len, seed } = *o {
            q.write(off, &pattern(len, seed)).unwrap();
        }
    }
    assert!(
        q.header().refcount_table_clusters > 1,
        "the table did not grow"
    );
    let dev = q.close().unwrap();
    save(&dev, &img);
    assert_qemu_clean(&img);
}

/// After a request failed with `NoSpace`, the model takes what the range reads as.
fn adopt(q: &mut Qcow2<MemDisk>, model: &mut [u8], off: u64, len: u64) {
    let r = &mut model[off as usize..(off + len) as usize];
    q.read(off, r).expect("read after NoSpace");
}

/// Writes the whole disk in runs of three clusters; returns how many hit `NoSpace`.
fn fill_disk(q: &mut Qcow2<MemDisk>, model: &mut [u8], seed: u8) -> u32 {
    let size = model.len() as u64;
    let cs = q.cluster_size();
    let mut no_space = 0;
    let mut off = 0;
    while off < size {
        let len = (3 * cs).min(size - off);
        let data = pattern(len, seed);
        match q.write(off, &data) {
            Ok(()) => model[off as usize..(off + len) as usize].copy_from_slice(&data),
            Err(crate::disk::DiskError::NoSpace) => {
                no_space += 1;
                adopt(q, model, off, len);
            }
            Err(e) => panic!("fill write {off}+{len}: {e:?}"),
        }
        off += len;
    }
    no_space
}

/// Runs `ops` on a fixed-capacity device too small for the whole disk: writes and
/// write-zeroes that find no free cluster fail with `NoSpace`, and the range they covered
/// then reads as whatever the engine kept (old or new data per cluster, taken into the
/// model). Everything else must go on as on a large device: reads match the model,
/// discards make room that later writes use, reopening works, and at the end our check
/// and `qemu-img check` are clean and `qemu-img compare` equals the model.
fn run_full(cs: u64, rb: u32, lazy: bool, small: bool, ops: &[Op]) {
    let size = (cs * 24).max(1 << 20) + 1536;
    // Metadata plus about half of the disk's clusters.
    let cap = (size / 2 / cs + 16) * cs;
    let mut q = Qcow2::create(
        MemDisk::fixed(cap),
        &CreateOptions {
            virtual_size: size,
            cluster_size: cs,
            refcount_bits: rb,
            lazy_refcounts: lazy,
            open: open_opts(small),
            ..CreateOptions::default()
        },
    )
    .unwrap();
    let mut model = vec![0u8; size as usize];
    let mut fill = 0u8;
    let mut no_space = fill_disk(&mut q, &mut model, fill);
    assert!(no_space > 0, "the device held the whole disk");
    for o in ops.iter().cycle().take(ops.len() * 3) {
        match *o {
            Op::Write { off, len, seed } => {
                let off = off.min(size - 1);
                let len = len.min(size - off);
                let data = pattern(len, seed);
                match q.write(off, &data) {
                    Ok(()) => model[off as usize..(off + len) as usize].copy_from_slice(&data),
                    Err(crate::disk::DiskError::NoSpace) => {
                        no_space += 1;
                        adopt(&mut q, &mut model, off, len);
                    }
                    Err(e) => panic!("write {off}+{len}: {e:?}"),
                }
            }
            Op::Read { off, len } => {
                let off = off.min(size - 1);
                let len = len.min(size - off);
                let mut buf = vec![0xEEu8; len as usize];
                q.read(off, &mut buf).unwrap();
                assert!(
                    buf == model[off as usize..(off + len) as usize],
                    "read mismatch at {off}+{len}"
                );
            }
            Op::Flush => q.flush().unwrap(),
            Op::Discard { off, len } => {
                let off = off.min(size - 1);
                let len = len.min(size - off);
                q.discard(off, len).unwrap();
                let (a, b) = discarded(off, len, cs, size);
                model[a as usize..b as usize].fill(0);
            }
            Op::Zero { off, len, unmap } => {
                let off = off.min(size - 1);
                let len = len.min(size - off);
                match q.write_zeroes(off, len, unmap) {
                    Ok(()) => model[off as usize..(off + len) as usize].fill(0),
                    Err(crate::disk::DiskError::NoSpace) => {
                        no_space += 1;
                        adopt(&mut q, &mut model, off, len);
                    }
                    Err(e) => panic!("write-zeroes {off}+{len}: {e:?}"),
                }
            }
            Op::Reopen => {
                let dev = q.close().unwrap();
                q = Qcow2::open(dev, open_opts(small)).unwrap();
                // Fill the disk to the brim now and then, so NoSpace is common.
                fill = fill.wrapping_add(1);
                no_space += fill_disk(&mut q, &mut model, fill);
            }
            Op::Compact { max } => {
                let p = q.compact_step(max).unwrap();
                assert!(p.extent_after <= p.extent_before, "{p:?}");
            }
        }
    }
    assert!(no_space > 0);
    let mut all = vec![0u8; size as usize];
    q.read(0, &mut all).unwrap();
    assert!(all == model, "whole-disk read differs from the model");
    let report = q.check().unwrap();
    assert!(report.is_clean(), "our check: {report}");
    let dev = q.close().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("full.qcow2");
    save(&dev, &img);
    assert_qemu_clean(&img);
    assert_qemu_compare(dir.path(), &img, &model, "qemu-img compare");
}

proptest! {
    #![proptest_config(config(8))]
    #[test]
    fn full_device_512(
        ops in proptest::collection::vec(op((1u64 << 20) + 1536, 512), 1..40),
        rb in prop_oneof![Just(1u32), Just(16), Just(64)],
        lazy in any::<bool>(),
        small in any::<bool>(),
    ) {
        run_full(512, rb, lazy, small, &ops);
    }

    #[test]
    fn full_device_4k(
        ops in proptest::collection::vec(op((1u64 << 20) + 1536, 4096), 1..40),
        rb in prop_oneof![Just(2u32), Just(16)],
        small in any::<bool>(),
    ) {
        run_full(4096, rb, false, small, &ops);
    }

    #[test]
    fn full_device_64k(
        ops in proptest::collection::vec(op((65536u64 * 24) + 1536, 65536), 1..30),
        lazy in any::<bool>(),
        small in any::<bool>(),
    ) {
        run_full(65536, 16, lazy, small, &ops);
    }
}

/// Power cuts around a resize that moves the L1 table (512-byte clusters: 1.5 MiB need one
/// L1 cluster, 8 MiB need four), with writes before and after it, in every cut of
/// [`CrashDisk`]: no corruption, and bytes untouched since the last completed flush (or
/// resize) read as they did then, whichever virtual size the image was left with.
#[test]
fn crash_during_l1_growth() {
    let (small, big) = (1536u64 << 10, 8u64 << 20);
    for lazy in [false, true] {
        let base = Qcow2::create(
            MemDisk::growable(),
            &CreateOptions {
                virtual_size: small,
                cluster_size: 512,
                refcount_bits: 16,
                lazy_refcounts: lazy,
                ..CreateOptions::default()
            },
        )
        .unwrap()
        .close()
        .unwrap();
        let writes = [
            (0u64, 65536u64, 1u8),
            (6 << 20, 100_000, 2),
            (1000, 5000, 3),
        ];
        let run = |budget: u64| -> u64 {
            let mut q = Qcow2::open(CrashDisk::new(base.clone(), budget), small_cache()).unwrap();
            let mut current = vec![0u8; big as usize];
            let mut flushed = current.clone();
            let mut touched: Vec<(usize, usize)> = Vec::new();
            // Steps: Some(write index), or None for a flush point (flush, resize, flush).
            for step in [Some(0), None, None, Some(1), Some(2), None] {
                let ok = match step {
                    Some(w) => {
                        let (off, len, seed) = writes[w];
                        touched.push((off as usize, (off + len) as usize));
                        let data = pattern(len, seed);
                        current[off as usize..(off + len) as usize].copy_from_slice(&data);
                        q.write(off, &data).is_ok()
                    }
                    None if q.info().virtual_size == small && touched.is_empty() => {
                        q.resize(big).is_ok()
                    }
                    None => q.flush().is_ok(),
                };
                if !ok {
                    break;
                }
                if step.is_none() {
                    // A completed flush or resize (it ends with a barrier): durable.
                    flushed.copy_from_slice(&current);
                    touched.clear();
                }
            }
            let used = budget - q.device().writes_left;
            for disk in q.device().cuts(budget) {
                let dirty = disk.bytes()[79] & 1 != 0;
                let opts = if dirty {
                    OpenOptions::default()
                } else {
                    read_only()
                };
                let mut q = Qcow2::open(disk, opts).unwrap();
                let size = q.info().virtual_size;
                assert!(size == small || size == big, "virtual size {size}");
                let mut now = vec![0u8; size as usize];
                q.read(0, &mut now).unwrap();
                let mut want = flushed[..size as usize].to_vec();
                for &(a, b) in &touched {
                    let b = b.min(size as usize);
                    if a < b {
                        want[a..b].copy_from_slice(&now[a..b]);
                    }
                }
                assert!(now == want, "budget {budget}: flushed data changed");
                let report = q.check().unwrap();
                if dirty {
                    assert!(report.is_clean(), "lazy, after the rebuild: {report}");
                } else {
                    assert_eq!(report.corruptions, 0, "budget {budget}: {report}");
                    assert_eq!(report.check_errors, 0, "{report}");
                }
            }
            used
        };
        sweep_budgets(run);
    }
}

/// Runs `run` (which returns the writes it made) uncut, then cut after every number of
/// writes up to that.
fn sweep_budgets(run: impl Fn(u64) -> u64) {
    let total = run(u64::MAX / 2);
    for k in 0..=total {
        run(k);
    }
}

/// Power cuts while an overlay grows over a larger raw layer (512-byte clusters: the L1
/// table moves; 64 KiB clusters: the old end lies inside a cluster, copied up): after every
/// cut the image opens at the old or the new size without corruption (leaks allowed), the
/// old area reads as before and the new area reads as zeros, never as the layer below.
#[test]
fn crash_while_an_overlay_grows_over_a_larger_layer() {
    let (small, big) = (1000u64 << 10, 4u64 << 20);
    let layer = pattern(big + 65536, 9);
    let with_layer = |dev: CrashDisk, opts: OpenOptions| {
        let below = CrashDisk::new(MemDisk::from_bytes(layer.clone(), true), u64::MAX / 2);
        Qcow2::open_with_backing(dev, opts, Some(Backing::raw(below))).unwrap()
    };
    for cs in [512u64, 65536] {
        let empty = Qcow2::create(
            MemDisk::growable(),
            &CreateOptions {
                virtual_size: small,
                cluster_size: cs,
                ..CreateOptions::default()
            },
        )
        .unwrap()
        .close()
        .unwrap();
        // A write of the overlay's own near the old end, then the image as it is on disk.
        let mut q = with_layer(CrashDisk::new(empty, u64::MAX / 2), small_cache());
        q.write(small - 700, &[7u8; 300]).unwrap();
        let base = q.close().unwrap().inner;
        let mut old = layer[..small as usize].to_vec();
        old[small as usize - 700..small as usize - 400].fill(7);
        let run = |budget: u64| -> u64 {
            let mut q = with_layer(CrashDisk::new(base.clone(), budget), small_cache());
            let grown = q.resize(big).is_ok();
            let used = budget - q.device().writes_left;
            for disk in q.device().cuts(budget) {
                let mut q = with_layer(CrashDisk::new(disk, u64::MAX / 2), read_only());
                let size = q.info().virtual_size;
                assert!(
                    size == big || (size == small && !grown),
                    "{cs}/{budget}: {size}"
                );
                let mut now = vec![0u8; size as usize];
                q.read(0, &mut now).unwrap();
                assert!(
                    now[..small as usize] == old,
                    "{cs}/{budget}: the old area changed"
                );
                assert!(
                    now[small as usize..].iter().all(|&b| b == 0),
                    "{cs}/{budget}: the layer shows through the new area"
                );
                let report = q.check().unwrap();
                assert!(
                    report.corruptions == 0 && report.check_errors == 0,
                    "{cs}/{budget}: {report}"
                );
            }
            used
        };
        sweep_budgets(run);
    }
}

/// Power cuts while writing over clusters shared with a snapshot (refcount 2): L2 tables and
/// data clusters are copied on write and the snapshot's references must survive every cut.
#[test]
fn crash_over_snapshot_shared_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("snap.qcow2");
    let size = (1u64 << 20) + 1536;
    qemu_create(&img, "cluster_size=512,refcount_bits=16", size);
    let p = img.to_str().unwrap();
    qemu_ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x11 0 300000",
            "-c",
            "write -P 0x22 700000 100000",
            p,
        ],
    );
    qemu_ok("qemu-img", &["snapshot", "-c", "s1", p]);
    let base = MemDisk::from_bytes(std::fs::read(&img).unwrap(), false);
    let ops = [
        Op::Write {
            off: 1000,
            len: 3000,
            seed: 1,
        },
        Op::Write {
            off: 40_000,
            len: 70_000,
            seed: 2,
        },
        Op::Flush,
        Op::Discard {
            off: 700_000,
            len: 50_000,
        },
        Op::Zero {
            off: 200_000,
            len: 20_000,
            unmap: true,
        },
        Op::Write {
            off: 290_000,
            len: 20_000,
            seed: 3,
        },
        Op::Flush,
    ];
    for small in [false, true] {
        let total = crash_on(base.clone(), size, u64::MAX / 2, small, &ops);
        let mut k = 0;
        while k <= total {
            crash_on(base.clone(), size, k, small, &ops);
            k += (total / 150).max(1);
        }
    }
    // Uncut, QEMU finds the image clean and the snapshot unchanged.
    let mut q = Qcow2::open(base, OpenOptions::default()).unwrap();
    q.write(1000, &pattern(3000, 1)).unwrap();
    q.discard(700_000, 50_000).unwrap();
    let dev = q.close().unwrap();
    save(&dev, &img);
    assert_qemu_clean(&img);
    qemu_ok("qemu-img", &["snapshot", "-a", "s1", p]);
    let out = qemu_ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "read -P 0x11 0 300000",
            "-c",
            "read -P 0x22 700000 100000",
            p,
        ],
    );
    assert!(!out.contains("verification failed"), "{out}");
}

/// A power cut that proptest found (512 B clusters, 64-bit refcounts, small caches): a write
/// back put a new refcount block's table entry and an L2 table referencing a cluster that
/// block counts in the same phase, with no barrier between them; a cut that kept the L2
/// write but not the table page left the cluster referenced with refcount 0.
#[test]
fn crash_regression_refcount_too_low_512_rc64() {
    use Op::*;
    let w = |off, len, seed| Write { off, len, seed };
    let ops = [
        w(451227, 809, 158),
        w(249364, 275, 16),
        w(346109, 1593, 237),
        w(560392, 1656, 233),
        w(907264, 2048, 125),
        Discard {
            off: 247296,
            len: 512,
        },
        w(804346, 1061, 39),
        Discard {
            off: 413696,
            len: 1536,
        },
        w(534209, 1141, 244),
        w(610502, 22, 182),
        w(523943, 1614, 1),
        Flush,
        Flush,
        Zero {
            off: 896329,
            len: 650,
            unmap: false,
        },
        Read {
            off: 440934,
            len: 960,
        },
        Zero {
            off: 704717,
            len: 1765,
            unmap: true,
        },
        w(739840, 1024, 202),
        Read {
            off: 945417,
            len: 556,
        },
        Zero {
            off: 504320,
            len: 1536,
            unmap: true,
        },
        Reopen,
        w(419897, 1769, 201),
        Read {
            off: 1036674,
            len: 1032,
        },
        Read {
            off: 870115,
            len: 794,
        },
        w(58368, 1536, 180),
        w(728576, 2048, 234),
        Read {
            off: 26087,
            len: 1408,
        },
        Discard {
            off: 718336,
            len: 512,
        },
        Read {
            off: 1043860,
            len: 679,
        },
        w(930889, 354, 182),
        Read {
            off: 611853,
            len: 891,
        },
        Read {
            off: 705133,
            len: 1192,
        },
        Read {
            off: 1033960,
            len: 458,
        },
        w(277307, 17, 253),
        w(604672, 512, 163),
        w(934872, 371, 171),
        Read {
            off: 169242,
            len: 1790,
        },
        w(592003, 952, 42),
        w(58754, 1257, 181),
    ];
    crash_sweep(512, 64, false, true, &ops);
}
