//! Random operation sequences on images QEMU made (`fuzz/images/*.qcow2`, from the `.spec`
//! files next to them): write, write-zeroes, discard, read, block status, flush, resize,
//! reopen and crash (reopen a copy of the device taken without a flush), checked against a
//! byte model of the virtual disk: after a crash, bytes written since the last flush may
//! read as anything; every other byte must read as it did. At the end the image is closed, reopened, read whole
//! against the model, and our own check must find no corruption (and no leak unless an
//! operation failed or a crash was simulated on an image without lazy refcounts).
//!
//! Input: byte 0 picks the image, byte 1 the device and options (see [`Setup`]), then one
//! operation per group of bytes (see [`run`]).
#![no_main]

use libfuzzer_sys::fuzz_target;
use qcow_metal::block::{BlockDevice, MemDisk};
use qcow_metal::disk::{Allocation, DiskError, VirtualDisk};
use qcow_metal::qcow2::{OpenOptions, Qcow2};

/// The seed images and the qemu-io commands that filled them.
const IMAGES: [(&[u8], &str); 7] = [
    (
        include_bytes!("../images/a.qcow2"),
        include_str!("../images/a.spec"),
    ),
    (
        include_bytes!("../images/b.qcow2"),
        include_str!("../images/b.spec"),
    ),
    (
        include_bytes!("../images/c.qcow2"),
        include_str!("../images/c.spec"),
    ),
    (
        include_bytes!("../images/d.qcow2"),
        include_str!("../images/d.spec"),
    ),
    (
        include_bytes!("../images/e.qcow2"),
        include_str!("../images/e.spec"),
    ),
    (
        include_bytes!("../images/f.qcow2"),
        include_str!("../images/f.spec"),
    ),
    (
        include_bytes!("../images/g.qcow2"),
        include_str!("../images/g.spec"),
    ),
];

/// The largest virtual size a resize may reach (keeps the model and the reads small).
const MAX_SIZE: u64 = 4 << 20;

/// What each byte of the virtual disk may read as (bytes, so that ranges compare with
/// `memcmp`: the harness's own loops are instrumented too, and per-byte loops over
/// megabytes would make it crawl).
type Known = u8;
/// Exactly the model's byte.
const EXACT: Known = 0;
/// The model's byte or zero (after a discard, or a failed write-zeroes).
const OR_ZERO: Known = 1;
/// Anything (a failed write, or written since the last flush before a crash).
const ANY: Known = 2;

/// Ranges are compared in pieces of this size; only pieces that differ go byte by byte.
const PIECE: usize = 512;
static ZEROS: [u8; PIECE] = [0; PIECE];

fn all_zero(s: &[u8]) -> bool {
    s.chunks(PIECE).all(|c| c == &ZEROS[..c.len()])
}

struct Model {
    bytes: Vec<u8>,
    known: Vec<Known>,
}

impl Model {
    fn from_spec(spec: &str, size: u64) -> Model {
        let mut m = Model {
            bytes: vec![0; size as usize],
            known: vec![EXACT; size as usize],
        };
        for line in spec.lines().skip(1) {
            for cmd in line.split(" ; ") {
                let w: Vec<&str> = cmd.split_whitespace().collect();
                match w.as_slice() {
                    ["write", "-P", pat, off, len] => {
                        let pat = u8::from_str_radix(pat.trim_start_matches("0x"), 16).unwrap();
                        m.set(off.parse().unwrap(), len.parse().unwrap(), pat);
                    }
                    ["write", "-z", off, len] => {
                        m.set(off.parse().unwrap(), len.parse().unwrap(), 0)
                    }
                    ["snapshot", ..] | ["abort"] | [] => {}
                    other => panic!("spec line the model does not know: {other:?}"),
                }
            }
        }
        m
    }

    fn range(off: u64, len: u64) -> core::ops::Range<usize> {
        off as usize..(off + len) as usize
    }

    fn set(&mut self, off: u64, len: u64, val: u8) {
        self.bytes[Self::range(off, len)].fill(val);
        self.known[Self::range(off, len)].fill(EXACT);
    }

    /// Bytes of the range may now also read as zero (`OR_ZERO`) or as anything (`ANY`).
    fn weaken(&mut self, off: u64, len: u64, to: Known) {
        for k in &mut self.known[Self::range(off, len)] {
            *k = (*k).max(to);
        }
    }

    fn snapshot(&self) -> Model {
        Model {
            bytes: self.bytes.clone(),
            known: self.known.clone(),
        }
    }

    /// Becomes a copy of `other`, reusing the allocations.
    fn copy_from(&mut self, other: &Model) {
        self.bytes.clone_from(&other.bytes);
        self.known.clone_from(&other.known);
    }

    fn grow(&mut self, size: u64) {
        self.bytes.resize(size as usize, 0);
        self.known.resize(size as usize, EXACT);
    }

    /// Marks as `ANY` every byte that differs from the model `then` (value or knowledge).
    fn forget_since(&mut self, then: &Model) {
        let common = then.bytes.len().min(self.bytes.len());
        let mut at = 0;
        while at < common {
            let end = (at + PIECE).min(common);
            if self.bytes[at..end] != then.bytes[at..end]
                || self.known[at..end] != then.known[at..end]
            {
                for i in at..end {
                    if self.bytes[i] != then.bytes[i] || self.known[i] != then.known[i] {
                        self.known[i] = ANY;
                    }
                }
            }
            at = end;
        }
        self.known[common..].fill(ANY);
    }

    fn verify(&self, off: u64, got: &[u8], what: &str) {
        let base = off as usize;
        for (p, piece) in got.chunks(PIECE).enumerate() {
            let at = base + p * PIECE;
            if piece == &self.bytes[at..at + piece.len()] {
                continue;
            }
            for (i, &b) in piece.iter().enumerate() {
                let at = at + i;
                let ok = match self.known[at] {
                    EXACT => b == self.bytes[at],
                    OR_ZERO => b == self.bytes[at] || b == 0,
                    _ => true,
                };
                assert!(
                    ok,
                    "{what}: byte {at} reads {b:#04x}, the model has {:#04x}",
                    self.bytes[at]
                );
            }
        }
    }

    /// Whether every byte of the range may read as zero.
    fn may_be_zero(&self, off: u64, len: u64) -> bool {
        let r = Self::range(off, len);
        let (bytes, known) = (&self.bytes[r.clone()], &self.known[r]);
        bytes
            .chunks(PIECE)
            .zip(known.chunks(PIECE))
            .all(|(b, k)| all_zero(b) || b.iter().zip(k).all(|(&b, &k)| b == 0 || k != EXACT))
    }
}

/// Reads the input a few bytes at a time; zeros once it runs out.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        let (&b, rest) = self.0.split_first().unwrap_or((&0, &[]));
        self.0 = rest;
        b
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
}

/// Byte 1 of the input: device and open options.
struct Setup {
    /// `None`: a growable device (like a host file); `Some(n)`: a fixed device with `n`
    /// bytes of room past the image (writes may then run out of space).
    slack: Option<u64>,
    small_caches: bool,
    lazy: bool,
    zero_tail: bool,
}

impl Setup {
    fn new(b: u8) -> Setup {
        Setup {
            slack: match b & 3 {
                0 | 1 => None,
                2 => Some(16 << 10),
                _ => Some(1 << 20),
            },
            small_caches: b & 4 != 0,
            lazy: b & 8 != 0,
            zero_tail: b & 16 != 0,
        }
    }

    fn options(&self) -> OpenOptions {
        OpenOptions {
            l2_cache_bytes: if self.small_caches { 0 } else { 1 << 20 },
            refcount_cache_bytes: if self.small_caches { 0 } else { 256 << 10 },
            lazy_refcounts: self.lazy,
            check_memory_limit: 64 << 20,
            zero_tail: self.zero_tail,
            ..OpenOptions::default()
        }
    }
}

fn open(dev: MemDisk, setup: &Setup) -> Qcow2<MemDisk> {
    match Qcow2::open(dev, setup.options()) {
        Ok(q) => q,
        Err(e) => panic!("reopening the image failed: {e}"),
    }
}

/// Offset and length of a request on a disk of `size` bytes: mostly inside, sometimes
/// reaching past the end (which must fail with `Invalid` and change nothing).
fn request(inp: &mut Input, size: u64) -> (u64, u64) {
    let off = u64::from(inp.u32()) % (size + 1);
    let len = u64::from(inp.u16()) * 2 + u64::from(inp.u8() & 1);
    (off, len)
}

fn run(data: &[u8]) {
    let mut inp = Input(data);
    let (image, spec) = IMAGES[inp.u8() as usize % IMAGES.len()];
    let setup = Setup::new(inp.u8());
    let lazy_image = spec.contains("lazy_refcounts=on");
    let mut bytes = image.to_vec();
    let dev = match setup.slack {
        None => MemDisk::from_bytes(bytes, false),
        Some(slack) => {
            bytes.resize(bytes.len() + slack as usize, 0);
            MemDisk::from_bytes(bytes, true)
        }
    };
    let mut q = open(dev, &setup);
    let mut model = Model::from_spec(spec, q.size());
    // The model as of the last flush, for crashes.
    let mut flushed = model.snapshot();
    // Ranges changed since the last flush: after a crash each byte there may read as any
    // value it had since (a data write may have landed while the later zeroing's metadata
    // did not, and the other way round).
    let mut touched: Vec<(u64, u64)> = Vec::new();
    let mut failed = false;
    let mut crashed = false;
    let mut ops = 0;
    while !inp.0.is_empty() && ops < 64 {
        ops += 1;
        let size = q.size();
        let op = inp.u8();
        match op % 9 {
            0 => {
                let (off, len) = request(&mut inp, size);
                if off + len <= size {
                    touched.push((off, len));
                }
                let pat = inp.u8();
                let buf = vec![pat; len as usize];
                match q.write(off, &buf) {
                    Err(e) if off + len > size => assert_eq!(e, DiskError::Invalid),
                    r if off + len > size => panic!("write past the end gave {r:?}"),
                    Ok(()) => model.set(off, len, pat),
                    Err(_) => {
                        failed = true;
                        model.weaken(off, len, ANY);
                    }
                }
            }
            1 => {
                let (off, len) = request(&mut inp, size);
                if off + len <= size {
                    touched.push((off, len));
                }
                let may_unmap = op & 0x80 != 0;
                match q.write_zeroes(off, len, may_unmap) {
                    Err(e) if off + len > size => assert_eq!(e, DiskError::Invalid),
                    r if off + len > size => panic!("write-zeroes past the end gave {r:?}"),
                    Ok(()) => model.set(off, len, 0),
                    Err(_) => {
                        failed = true;
                        model.weaken(off, len, OR_ZERO);
                    }
                }
            }
            2 => {
                let (off, len) = request(&mut inp, size);
                if off + len <= size {
                    touched.push((off, len));
                }
                match q.discard(off, len) {
                    Err(e) if off + len > size => assert_eq!(e, DiskError::Invalid),
                    r if off + len > size => panic!("discard past the end gave {r:?}"),
                    Ok(()) => model.weaken(off, len, OR_ZERO),
                    Err(_) => {
                        failed = true;
                        model.weaken(off, len, OR_ZERO);
                    }
                }
            }
            3 => {
                let (off, len) = request(&mut inp, size);
                let mut buf = vec![0u8; len as usize];
                match q.read(off, &mut buf) {
                    Err(e) if off + len > size => assert_eq!(e, DiskError::Invalid),
                    r if off + len > size => panic!("read past the end gave {r:?}"),
                    Ok(()) => model.verify(off, &buf, "read"),
                    Err(e) => panic!("read of {len} bytes at {off} failed: {e}"),
                }
            }
            4 => match q.flush() {
                Ok(()) => {
                    flushed.copy_from(&model);
                    touched.clear();
                }
                Err(_) => failed = true,
            },
            5 => {
                let grow = u64::from(inp.u16()) * 64;
                let new = (size + grow).min(MAX_SIZE).max(size);
                match q.resize(new) {
                    Ok(()) => {
                        assert_eq!(q.size(), new.next_multiple_of(512));
                        model.grow(q.size());
                    }
                    Err(_) => failed = true,
                }
            }
            6 => match q.close() {
                Ok(dev) => {
                    q = open(dev, &setup);
                    flushed.copy_from(&model);
                    touched.clear();
                }
                // The device is gone with the engine: nothing more to do.
                Err(_) => return,
            },
            7 => {
                // A crash now: whatever changed since the last flush may read old or new.
                let copy = q.device().clone();
                drop(q);
                q = open(copy, &setup);
                crashed = true;
                for (off, len) in touched.drain(..) {
                    model.weaken(off, len, ANY);
                }
                model.forget_since(&flushed);
                // A resize not yet flushed may be lost (sizes only grow).
                let (was, now) = (flushed.bytes.len() as u64, model.bytes.len() as u64);
                assert!(
                    (was..=now).contains(&q.size()),
                    "after a crash the size is {}, flushed {was}, last {now}",
                    q.size()
                );
                model.bytes.truncate(q.size() as usize);
                model.known.truncate(q.size() as usize);
                model.grow(q.size());
                flushed.copy_from(&model);
            }
            _ => {
                let (off, len) = request(&mut inp, size);
                match q.block_status(off, len) {
                    Err(e) if off + len > size => assert_eq!(e, DiskError::Invalid),
                    r if off + len > size => panic!("block status past the end gave {r:?}"),
                    Ok(ext) => {
                        assert!(
                            ext.len <= len && (ext.len > 0 || len == 0),
                            "{ext:?} for {len}"
                        );
                        if ext.kind != Allocation::Data {
                            assert!(
                                model.may_be_zero(off, ext.len),
                                "block status says {:?} for {} bytes at {off}, the model has data",
                                ext.kind,
                                ext.len
                            );
                        }
                    }
                    Err(e) => panic!("block status of {len} bytes at {off} failed: {e}"),
                }
            }
        }
    }
    // Close, reopen, read everything, check.
    let Ok(dev) = q.close() else { return };
    let capacity = dev.capacity();
    let mut q = open(dev, &setup);
    assert_eq!(q.size() as usize, model.bytes.len());
    let mut buf = vec![0u8; 65536];
    let mut off = 0;
    while off < q.size() {
        let n = (q.size() - off).min(buf.len() as u64);
        q.read(off, &mut buf[..n as usize])
            .expect("read after reopen");
        model.verify(off, &buf[..n as usize], "read after reopen");
        off += n;
    }
    let report = q.check().expect("check");
    assert_eq!(report.corruptions, 0, "{report}");
    assert_eq!(report.check_errors, 0, "{report}");
    if !failed && !(crashed && !(lazy_image && setup.lazy)) {
        assert_eq!(report.leaks, 0, "{report}");
    }
    assert!(report.image_end_offset <= capacity);
}

fuzz_target!(|data: &[u8]| run(data));
