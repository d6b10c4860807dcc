//! [`OpenOptions::zero_tail`]: on a fixed-capacity device holding garbage past the image,
//! new clusters read back as zeros around the data, the image stays clean for `qemu-img`,
//! and a 4 KiB write into a fresh cluster writes about 4 KiB, not the whole cluster.

use super::util::{Counting, assert_qemu_clean, assert_qemu_compare};
use crate::block::{BlockDevice, MemDisk};
use crate::disk::VirtualDisk;
use crate::qcow2::{CreateOptions, OpenOptions, Qcow2};

const CS: u64 = 64 * 1024;
const SIZE: u64 = 64 << 20;
/// Fresh clusters written by the tests.
const N: u64 = 64;
/// Garbage past the image end.
const JUNK: u8 = 0xEE;

/// A fresh image (64 KiB clusters, `lazy` refcounts or not) at the start of a fixed device
/// of 16 MiB more than it needs, every byte past the image filled with [`JUNK`]. Returns the
/// device and the image's length (whole clusters).
fn junk_device(lazy: bool) -> (Counting, u64) {
    let q = Qcow2::create(
        MemDisk::growable(),
        &CreateOptions {
            virtual_size: SIZE,
            cluster_size: CS,
            lazy_refcounts: lazy,
            ..CreateOptions::default()
        },
    )
    .unwrap();
    let mut q = q;
    let extent = q.space().unwrap().image_extent;
    let mut bytes = q.close().unwrap().into_bytes();
    // The stored bytes may end before the image does (a growable disk reads zeros past its
    // end, where the L1 table lies): the garbage starts after the last cluster in use.
    let len = extent.div_ceil(CS) * CS;
    assert!(len >= bytes.len() as u64);
    bytes.resize(len as usize, 0);
    bytes.resize((len + (16 << 20)) as usize, JUNK);
    let disk = MemDisk::from_bytes(bytes, true);
    assert_eq!(disk.zeroes_from(), None);
    // A fixed device promises no zeros past its data, so `Counting` forwards `None`.
    let dev = Counting::new(disk);
    (dev, len)
}

fn opts(zero_tail: bool) -> OpenOptions {
    OpenOptions {
        zero_tail,
        ..OpenOptions::default()
    }
}

/// Writes 4 KiB into each of [`N`] fresh clusters (spread over the disk, at varying offsets
/// inside the cluster) and records them in `model`.
fn write_fresh(q: &mut Qcow2<Counting>, model: &mut [u8]) {
    for k in 0..N {
        let cluster = (k * 37) % (SIZE / CS);
        let off = cluster * CS + ((k * 5) % 16) * 4096;
        let data = vec![(k as u8).wrapping_mul(13) | 1; 4096];
        q.write(off, &data).unwrap();
        model[off as usize..off as usize + 4096].copy_from_slice(&data);
    }
    q.flush().unwrap();
}

/// Reads the whole virtual disk and compares it with `model`.
fn assert_reads(q: &mut Qcow2<Counting>, model: &[u8]) {
    let mut back = vec![0u8; SIZE as usize];
    q.read(0, &mut back).unwrap();
    let bad = back.iter().zip(model).position(|(a, b)| a != b);
    assert_eq!(bad, None, "first wrong byte at this virtual offset");
}

#[test]
fn zero_tail_writes_only_the_data_into_fresh_clusters() {
    let (dev, len) = junk_device(false);
    let cap = dev.capacity();
    let mut q = Qcow2::open(dev, opts(true)).unwrap();
    // One request at open, from the end of the last cluster in use to the capacity.
    assert_eq!(q.device().zero_requests, 1);
    assert_eq!(q.device().zeroed, cap - len);
    let before = q.device().written;
    let mut model = vec![0u8; SIZE as usize];
    write_fresh(&mut q, &mut model);
    let written = q.device().written - before;
    // Data plus metadata (one L2 table, refcount and L2 updates), far below whole clusters.
    assert!(
        (N * 4096..N * 4096 + N * 8192 + 2 * CS).contains(&written),
        "{written} bytes written for {N} 4 KiB writes into fresh clusters"
    );
    assert_reads(&mut q, &model);
    let r = q.check().unwrap();
    assert!(r.is_clean(), "{r}");

    let dev = q.close().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("zero-tail.qcow2");
    std::fs::write(&img, dev.disk.bytes()).unwrap();
    assert_qemu_clean(&img);
    assert_qemu_compare(dir.path(), &img, &model, "after zero_tail writes");

    // Reopened: the tail past the new end is zeroed again, the data is kept.
    let mut q = Qcow2::open(dev, opts(true)).unwrap();
    assert_eq!(q.device().zero_requests, 2);
    assert_reads(&mut q, &model);
}

#[test]
fn without_zero_tail_fresh_clusters_are_padded() {
    let (dev, _) = junk_device(false);
    let mut q = Qcow2::open(dev, opts(false)).unwrap();
    assert_eq!(q.device().zero_requests, 0);
    let mut model = vec![0u8; SIZE as usize];
    write_fresh(&mut q, &mut model);
    assert!(
        q.device().written >= N * CS,
        "{} bytes written: every fresh cluster is written whole",
        q.device().written
    );
    assert_reads(&mut q, &model);
}

#[test]
fn zero_tail_is_not_done_read_only() {
    let (dev, _) = junk_device(false);
    let q = Qcow2::open(
        dev,
        OpenOptions {
            read_only: true,
            ..opts(true)
        },
    )
    .unwrap();
    assert_eq!(q.device().zero_requests, 0);
    assert_eq!(q.device().written, 0);
}

#[test]
fn zero_tail_after_a_crash_with_lazy_refcounts_keeps_the_data() {
    // With lazy refcounts the refcounts on the device may miss clusters the L2 tables
    // reference: the tail must be zeroed only after they were rebuilt.
    let (dev, _) = junk_device(true);
    let mut q = Qcow2::open(dev, opts(true)).unwrap();
    let mut model = vec![0u8; SIZE as usize];
    write_fresh(&mut q, &mut model);
    assert!(q.info().dirty);
    // "Crash": take the device without closing.
    let dev = q.device().clone();
    drop(q);
    let mut q = Qcow2::open(dev, opts(true)).unwrap();
    assert_reads(&mut q, &model);
    let r = q.check().unwrap();
    assert!(r.is_clean(), "{r}");
    let dev = q.close().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("zero-tail-lazy.qcow2");
    std::fs::write(&img, dev.disk.bytes()).unwrap();
    assert_qemu_clean(&img);
    assert_qemu_compare(dir.path(), &img, &model, "after a crash and reopen");
}
