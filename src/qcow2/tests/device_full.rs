//! A failing device under the engine (see `faults`): a host filesystem that fills up, and a
//! disk whose writes or flushes fail for a while. The client gets `ENOSPC` for a write that
//! needed new space and `EIO` for the rest (a flush always `EIO`), the engine keeps its
//! dirty metadata and writes it at the next flush once the device works again, acknowledged
//! data reads back throughout, and the image is consistent for `qemu-img check` afterwards.

use super::util::{assert_qemu_clean, assert_qemu_compare, json_u64, qemu_check_json};
use crate::block::{BlockDevice, BlockError, MemDisk};
use crate::disk::{DiskError, VirtualDisk};
use crate::nbd::NbdError;
use crate::qcow2::{CreateOptions, OpenOptions, Qcow2, max_image_len};
use std::cell::RefCell;
use std::collections::HashSet;
use std::rc::Rc;

const PAGE: u64 = 4096;
const SIZE: u64 = 64 << 20;

/// What the test controls of a [`HostFile`] while the engine holds it.
#[derive(Debug, Default)]
struct HostState {
    /// Pages of the file that hold storage (the rest are holes).
    pages: HashSet<u64>,
    /// Most pages the filesystem can give the file.
    budget: u64,
    /// Every write fails (a failing disk).
    fail_writes: bool,
    /// Every flush fails.
    fail_flushes: bool,
    /// Requests that failed.
    errors: u64,
}

/// A sparse file on a small host filesystem as virtio-blk shows it to the guest: a fixed
/// capacity; a page is allocated on its first write, and a write that needs a page past the
/// budget writes what fits and fails with an I/O error (QEMU's short write, then `ENOSPC`,
/// reported as `VIRTIO_BLK_S_IOERR`). Write-zeroes and discard punch holes.
struct HostFile {
    disk: MemDisk,
    state: Rc<RefCell<HostState>>,
}

impl HostFile {
    fn punch(&mut self, offset: u64, len: u64) {
        let mut st = self.state.borrow_mut();
        for p in offset.div_ceil(PAGE)..(offset + len) / PAGE {
            st.pages.remove(&p);
        }
    }
}

impl BlockDevice for HostFile {
    fn capacity(&self) -> u64 {
        self.disk.capacity()
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        self.disk.read_at(offset, buf)
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), BlockError> {
        let mut st = self.state.borrow_mut();
        if st.fail_writes {
            st.errors += 1;
            return Err(BlockError::Io);
        }
        let end = offset + buf.len() as u64;
        let mut fits = end;
        for p in offset / PAGE..end.div_ceil(PAGE) {
            if !st.pages.contains(&p) {
                if st.pages.len() as u64 >= st.budget {
                    fits = (p * PAGE).max(offset);
                    break;
                }
                st.pages.insert(p);
            }
        }
        if fits < end {
            st.errors += 1;
            drop(st);
            self.disk
                .write_at(offset, &buf[..(fits - offset) as usize])?;
            return Err(BlockError::Io);
        }
        drop(st);
        self.disk.write_at(offset, buf)
    }
    fn flush(&mut self) -> Result<(), BlockError> {
        let mut st = self.state.borrow_mut();
        if st.fail_flushes {
            st.errors += 1;
            return Err(BlockError::Io);
        }
        Ok(())
    }
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.write_zeroes(offset, len)
    }
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), BlockError> {
        crate::block::check_range(offset, len, self.capacity())?;
        // Whole pages become holes; the partial edges are written (they exist already or
        // read as zeros anyway).
        let first = offset.div_ceil(PAGE) * PAGE;
        let last = (offset + len) / PAGE * PAGE;
        if first < last {
            self.punch(first, last - first);
            self.disk.write_zeroes(first, last - first)?;
            if offset < first {
                self.write_at(offset, &vec![0; (first - offset) as usize])?;
            }
            if last < offset + len {
                self.write_at(last, &vec![0; (offset + len - last) as usize])?;
            }
            Ok(())
        } else {
            self.write_at(offset, &vec![0; len as usize])
        }
    }
}

/// A fresh image (`cluster` bytes per cluster) on a [`HostFile`] of the largest size it can
/// reach, whose filesystem has `room` bytes free once the image's own pages are counted.
fn host_image(cluster: u64, lazy: bool, room: u64) -> (HostFile, Rc<RefCell<HostState>>) {
    let q = Qcow2::create(
        MemDisk::growable(),
        &CreateOptions {
            virtual_size: SIZE,
            cluster_size: cluster,
            lazy_refcounts: lazy,
            ..CreateOptions::default()
        },
    )
    .unwrap();
    let mut bytes = q.close().unwrap().into_bytes();
    let pages: HashSet<u64> = (0..(bytes.len() as u64).div_ceil(PAGE)).collect();
    bytes.resize(max_image_len(SIZE, cluster, 16) as usize, 0);
    let state = Rc::new(RefCell::new(HostState {
        budget: pages.len() as u64 + room / PAGE,
        pages,
        ..HostState::default()
    }));
    let dev = HostFile {
        disk: MemDisk::from_bytes(bytes, true),
        state: Rc::clone(&state),
    };
    (dev, state)
}

/// The guest's open: zero the tail (punching it), lazy refcounts when the image has them.
fn guest_open(dev: HostFile, opts: OpenOptions) -> Qcow2<HostFile> {
    Qcow2::open(
        dev,
        OpenOptions {
            zero_tail: true,
            ..opts
        },
    )
    .unwrap()
}

/// The bytes block `i` of `len` bytes holds: its own offset in every word.
fn pattern(i: u64, len: u64) -> Vec<u8> {
    (0..len / 8)
        .flat_map(|w| (i * len + w * 8).wrapping_mul(0x9e37_79b9).to_le_bytes())
        .collect()
}

/// Saves the image's device to a file and has QEMU check it: no corruption, no leak unless
/// `leaks_allowed`, and the virtual disk equal to `model`.
fn assert_image(dev: HostFile, model: &[u8], leaks_allowed: bool, what: &str) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.qcow2");
    std::fs::write(&img, dev.disk.bytes()).unwrap();
    if leaks_allowed {
        let json = qemu_check_json(&img);
        assert_eq!(json_u64(&json, "corruptions"), 0, "{what}: {json}");
        assert_eq!(json_u64(&json, "check-errors"), 0, "{what}: {json}");
    } else {
        assert_qemu_clean(&img);
    }
    assert_qemu_compare(dir.path(), &img, model, what);
}

#[test]
fn a_full_host_filesystem_gives_enospc_and_the_image_stays_clean() {
    for lazy in [false, true] {
        const BLOCK: u64 = 64 << 10;
        let (dev, state) = host_image(BLOCK, lazy, 4 << 20);
        let mut q = guest_open(dev, OpenOptions::default());
        let mut model = vec![0u8; SIZE as usize];
        // Fill the filesystem: 64 KiB writes, a flush every fourth.
        let mut i = 0u64;
        let err = loop {
            assert!(i < SIZE / BLOCK, "lazy={lazy}: the filesystem never filled");
            let data = pattern(i, BLOCK);
            match q.write(i * BLOCK, &data) {
                Ok(()) => {
                    model[(i * BLOCK) as usize..][..BLOCK as usize].copy_from_slice(&data);
                    i += 1;
                    if i.is_multiple_of(4) {
                        q.flush().unwrap();
                    }
                }
                Err(e) => break e,
            }
        };
        assert_eq!(
            err,
            DiskError::NoSpace,
            "lazy={lazy}: a write into new space"
        );
        assert_eq!(NbdError::from(err), NbdError::NoSpace);
        assert!(
            i >= 60,
            "lazy={lazy}: failed after only {i} blocks in 4 MiB"
        );
        // Still full: the write fails again; a flush works (nothing it writes needs space)
        // or fails with EIO, never ENOSPC.
        assert_eq!(
            q.write(i * BLOCK, &pattern(i, BLOCK)),
            Err(DiskError::NoSpace)
        );
        if let Err(e) = q.flush() {
            assert!(
                matches!(e, DiskError::Device(_)),
                "lazy={lazy}: flush {e:?}"
            );
        }
        // Overwrites in place need no space and work; every acknowledged block reads back.
        let again = pattern(0, BLOCK);
        q.write(0, &again).unwrap();
        let mut buf = vec![0u8; BLOCK as usize];
        for j in 0..i {
            q.read(j * BLOCK, &mut buf).unwrap();
            assert!(
                buf == model[(j * BLOCK) as usize..][..BLOCK as usize],
                "block {j}"
            );
        }
        // Room again: the failed write succeeds, the engine flushes and closes cleanly.
        state.borrow_mut().budget += 1 << 20;
        let data = pattern(i, BLOCK);
        q.write(i * BLOCK, &data).unwrap();
        model[(i * BLOCK) as usize..][..BLOCK as usize].copy_from_slice(&data);
        q.flush().unwrap();
        let report = q.check().unwrap();
        assert!(report.is_clean(), "lazy={lazy}: our check: {report:?}");
        let dev = q.close().unwrap();
        // The clusters of the failed writes were given back: no leak at all.
        assert_image(dev, &model, false, &format!("lazy={lazy}"));
    }
}

#[test]
fn failed_metadata_write_backs_are_retried_and_flushes_give_eio() {
    // Small clusters: many L2 tables and refcount blocks to write back. With no cache
    // budget every table switch evicts (and writes back) a dirty table, during the failure
    // too.
    const CS: u64 = 4096;
    for small_caches in [false, true] {
        let what = format!("small_caches={small_caches}");
        let (dev, state) = host_image(CS, false, 64 << 20);
        let opts = if small_caches {
            super::util::small_cache()
        } else {
            OpenOptions::default()
        };
        let mut q = guest_open(dev, opts);
        let mut model = vec![0u8; SIZE as usize];
        // Writes spread over many L2 tables (one per 2 MiB), not flushed.
        let stride = 3 * (1 << 20) + CS;
        let offsets: Vec<u64> = (0..16).map(|k| k * stride).collect();
        for (k, &off) in offsets.iter().enumerate() {
            let data = pattern(k as u64, CS);
            q.write(off, &data).unwrap();
            model[off as usize..][..CS as usize].copy_from_slice(&data);
        }
        assert!(q.has_dirty_metadata(), "{what}: nothing to write back");
        // The disk fails: the flush is EIO and keeps the dirty state.
        state.borrow_mut().fail_writes = true;
        let e = q.flush().unwrap_err();
        assert!(
            matches!(e, DiskError::Device(_)),
            "{what}: flush gave {e:?}"
        );
        assert_eq!(NbdError::from(e), NbdError::Io);
        assert!(
            q.has_dirty_metadata(),
            "{what}: the failed flush dropped dirty metadata"
        );
        // Requests while it fails: errors, never a panic or a wedge; an overwrite is EIO.
        for (k, &off) in offsets.iter().enumerate() {
            match q.write(off, &pattern(100 + k as u64, CS)) {
                Ok(()) => panic!("{what}: a write succeeded on a failing disk"),
                Err(DiskError::Device(_)) => {}
                Err(e) => panic!("{what}: an overwrite gave {e:?}, not EIO"),
            }
            let _ = q.write(off + CS, &pattern(200 + k as u64, CS));
            let mut buf = vec![0u8; CS as usize];
            if q.read(off, &mut buf).is_ok() {
                assert!(
                    buf == model[off as usize..][..CS as usize],
                    "{what}: read {off}"
                );
            }
        }
        // The flushes fail too for a moment.
        state.borrow_mut().fail_flushes = true;
        assert!(matches!(q.flush(), Err(DiskError::Device(_))), "{what}");
        // The disk works again: the next flush writes everything back.
        {
            let mut st = state.borrow_mut();
            st.fail_writes = false;
            st.fail_flushes = false;
            assert!(st.errors > 0);
        }
        q.flush().unwrap();
        assert!(!q.has_dirty_metadata(), "{what}: dirty after a good flush");
        for (k, &off) in offsets.iter().enumerate() {
            let mut buf = vec![0u8; CS as usize];
            q.read(off, &mut buf).unwrap();
            assert!(
                buf == pattern(k as u64, CS),
                "{what}: block {k} after recovery"
            );
        }
        let dev = q.close().unwrap();
        // A failure while a new table was being set up may leak its cluster (allowed); no
        // corruption, and every acknowledged write is there.
        assert_image(dev, &model, true, &what);
    }
}
