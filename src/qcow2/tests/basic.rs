//! Unit behaviour of the engine on in-memory images.

use super::util::*;
use crate::block::MemDisk;
use crate::disk::{Allocation, VirtualDisk};
use crate::qcow2::{ClusterKind, CreateOptions, OpenOptions, Qcow2, max_image_len};

#[test]
fn write_read_round_trip_across_clusters() {
    let mut q = mem_image(1 << 20, 512, 16);
    let data: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
    q.write(1000, &data).unwrap();
    let mut back = vec![0u8; 7000];
    q.read(0, &mut back).unwrap();
    assert!(back[..1000].iter().all(|&b| b == 0));
    assert_eq!(&back[1000..6000], &data[..]);
    assert!(back[6000..].iter().all(|&b| b == 0));
    q.flush().unwrap();
    let r = q.check().unwrap();
    assert!(r.is_clean(), "{r}");
}

#[test]
fn reopen_sees_data() {
    let mut q = mem_image(4 << 20, 4096, 16);
    q.write(12345, b"hello qcow2").unwrap();
    let dev = q.close().unwrap();
    let mut q = Qcow2::open(dev, OpenOptions::default()).unwrap();
    let mut buf = [0u8; 11];
    q.read(12345, &mut buf).unwrap();
    assert_eq!(&buf, b"hello qcow2");
}

#[test]
fn block_status_and_discard() {
    let mut q = mem_image(1 << 20, 4096, 16);
    q.write(8192, &[1u8; 8192]).unwrap();
    let e = q.block_status(0, 1 << 20).unwrap();
    assert_eq!((e.kind, e.len), (Allocation::Hole, 8192));
    let e = q.block_status(8192, 1 << 20).unwrap_err();
    assert_eq!(e, crate::disk::DiskError::Invalid);
    let e = q.block_status(8192, (1 << 20) - 8192).unwrap();
    assert_eq!((e.kind, e.len), (Allocation::Data, 8192));
    q.write_zeroes(8192, 4096, false).unwrap();
    let e = q.block_status(8192, 4096).unwrap();
    assert_eq!(e.kind, Allocation::Zero);
    q.discard(12288, 4096).unwrap();
    q.flush().unwrap();
    let e = q.block_status(12288, 4096).unwrap();
    assert_eq!(e.kind, Allocation::Hole);
    let mut buf = vec![9u8; 8192];
    q.read(8192, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    let r = q.check().unwrap();
    assert!(r.is_clean(), "{r}");
    let map = q.map().unwrap();
    assert!(map.iter().any(|m| m.kind == ClusterKind::Zero));
}

#[test]
fn tiny_refcounts_grow_table() {
    // 512-byte clusters with 64-bit refcounts: a block covers 64 clusters, the table grows.
    let mut q = mem_image(8 << 20, 512, 64);
    let data = vec![0xA5u8; 3 << 20];
    q.write(0, &data).unwrap();
    q.flush().unwrap();
    let r = q.check().unwrap();
    assert!(r.is_clean(), "{r}");
    let mut back = vec![0u8; 3 << 20];
    q.read(0, &mut back).unwrap();
    assert!(back == data);
}

#[test]
fn no_space_on_fixed_device() {
    let size = 4 << 20;
    let mut q = Qcow2::create(
        MemDisk::fixed(256 * 1024),
        &CreateOptions {
            virtual_size: size,
            cluster_size: 4096,
            ..CreateOptions::default()
        },
    )
    .unwrap();
    let err = q.write(0, &vec![1u8; 1 << 20]).unwrap_err();
    assert_eq!(err, crate::disk::DiskError::NoSpace);
}

#[test]
fn max_image_len_is_enough() {
    for (cs, rb) in [(512u64, 1u32), (4096, 16), (65536, 64)] {
        let size = 2 << 20;
        let cap = max_image_len(size, cs, rb);
        let mut q = Qcow2::create(
            MemDisk::fixed(cap),
            &CreateOptions {
                virtual_size: size,
                cluster_size: cs,
                refcount_bits: rb,
                ..CreateOptions::default()
            },
        )
        .unwrap();
        let data = vec![3u8; size as usize];
        q.write(0, &data).unwrap();
        q.flush().unwrap();
        // Partial rewrites and discards do not need more.
        q.discard(0, size / 2).unwrap();
        q.write(0, &data[..size as usize / 2]).unwrap();
        q.flush().unwrap();
    }
}

#[test]
fn lazy_refcounts_dirty_then_rebuilt() {
    let mut q = Qcow2::create(
        MemDisk::growable(),
        &CreateOptions {
            virtual_size: 1 << 20,
            cluster_size: 4096,
            lazy_refcounts: true,
            ..CreateOptions::default()
        },
    )
    .unwrap();
    q.write(0, &[7u8; 10000]).unwrap();
    q.flush().unwrap();
    assert!(q.info().dirty);
    // "Crash": take the device without closing.
    let dev = q.device().clone();
    let mut q = Qcow2::open(dev, OpenOptions::default()).unwrap();
    let r = q.check().unwrap();
    assert!(r.is_clean(), "{r}");
    let dev = q.close().unwrap();
    let q = Qcow2::open(dev, OpenOptions::default()).unwrap();
    assert!(!q.info().dirty);
}

#[test]
fn resize_grows_l1() {
    let mut q = mem_image(1 << 20, 512, 16);
    q.write(0, &[1u8; 4096]).unwrap();
    q.resize(64 << 20).unwrap();
    q.write((64 << 20) - 4096, &[2u8; 4096]).unwrap();
    q.flush().unwrap();
    let mut b = [0u8; 4096];
    q.read(0, &mut b).unwrap();
    assert_eq!(b, [1u8; 4096]);
    q.read((64 << 20) - 4096, &mut b).unwrap();
    assert_eq!(b, [2u8; 4096]);
    let r = q.check().unwrap();
    assert!(r.is_clean(), "{r}");
}
