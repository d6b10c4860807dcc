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

#[test]
fn header_round_trip_and_unknown_extensions_kept() {
    use crate::qcow2::header::{FeatureKind, Header};
    let q = mem_image(1 << 20, 4096, 16);
    let mut bytes = q.close().unwrap().into_bytes();
    let h = Header::parse(&bytes[..4096]).unwrap();
    assert_eq!(h.version, 3);
    assert_eq!(
        h.feature_name(FeatureKind::Compatible, 0),
        Some("lazy refcounts")
    );
    assert_eq!(
        Header::parse(&bytes[..4096]).unwrap().encode_fixed(),
        h.encode_fixed()
    );
    // Insert an unknown extension before the feature table: it must survive our writes.
    let mut h2 = h.clone();
    h2.extensions.insert(
        0,
        crate::qcow2::header::Extension {
            kind: 0x1234_5678,
            data: b"keep me as I am".to_vec(),
        },
    );
    let ext = h2.encode_extensions();
    let hl = h2.header_length as usize;
    bytes[hl..hl + ext.len()].copy_from_slice(&ext);
    let area = bytes[..4096].to_vec();
    let mut q = Qcow2::open(MemDisk::from_bytes(bytes, false), OpenOptions::default()).unwrap();
    assert_eq!(q.info().extensions[0].data, b"keep me as I am");
    q.write(0, &[1u8; 100000]).unwrap();
    q.resize(4 << 20).unwrap();
    let bytes = q.close().unwrap().into_bytes();
    assert_eq!(&bytes[hl..4096], &area[hl..], "extension area changed");
    let h3 = Header::parse(&bytes[..4096]).unwrap();
    assert_eq!(h3.extensions[0].kind, 0x1234_5678);
    assert_eq!(h3.size, 4 << 20);
}

#[test]
fn create_rejects_bad_options() {
    for (cs, rb) in [
        (256u64, 16u32),
        (4 << 20, 16),
        (3000, 16),
        (65536, 3),
        (65536, 128),
    ] {
        let r = Qcow2::create(
            MemDisk::growable(),
            &CreateOptions {
                virtual_size: 1 << 20,
                cluster_size: cs,
                refcount_bits: rb,
                ..CreateOptions::default()
            },
        );
        assert!(r.is_err(), "cluster {cs} refcount bits {rb} accepted");
    }
    // 1 PiB with 512-byte clusters would need a 256 GiB L1 table.
    let r = Qcow2::create(
        MemDisk::growable(),
        &CreateOptions {
            virtual_size: 1 << 50,
            cluster_size: 512,
            ..CreateOptions::default()
        },
    );
    let msg = r.err().expect("refused").to_string();
    assert!(msg.contains("bigger cluster size"), "{msg}");
}

#[test]
fn v2_images_use_no_zero_flag() {
    // A version 2 image from QEMU: write-zeroes writes zeros or deallocates, never sets the
    // zero flag (which version 2 does not have).
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("v2.qcow2");
    qemu_create(&img, "compat=0.10,cluster_size=4096", 1 << 20);
    let mut q = open_file(&img, OpenOptions::default());
    assert_eq!(q.info().version, 2);
    q.write(0, &[9u8; 16384]).unwrap();
    q.write_zeroes(0, 4096, false).unwrap();
    q.write_zeroes(4096, 4096, true).unwrap();
    let map = q.map().unwrap();
    assert!(map.iter().all(|m| m.kind != ClusterKind::Zero), "{map:?}");
    let mut b = vec![1u8; 16384];
    q.read(0, &mut b).unwrap();
    assert!(b[..8192].iter().all(|&x| x == 0) && b[8192..].iter().all(|&x| x == 9));
    q.close().unwrap();
    assert_qemu_clean(&img);
}

/// The last nonzero refcount of the image, by brute force over the existing blocks.
fn brute_end(q: &mut Qcow2<MemDisk>) -> u64 {
    let rb = q.geo.rb_entries();
    let mut end = 0;
    for ti in 0..q.rt_entries {
        if q.rt_entry(ti).unwrap().is_none() {
            continue;
        }
        for i in 0..rb {
            if q.refcount((ti * rb) + i).unwrap() != 0 {
                end = ti * rb + i + 1;
            }
        }
    }
    end.max(q.fixed_end())
}

#[test]
fn compute_end_finds_the_last_refcount() {
    for bits in [1u32, 2, 4, 8, 16, 32, 64] {
        let mut q = mem_image(64 << 20, 512, bits);
        q.write(0, &vec![0x5a; 300 << 10]).unwrap();
        q.flush().unwrap();
        let rb = q.geo.rb_entries();
        let max = q.geo.refcount_max();
        let base = q.compute_end().unwrap();
        assert_eq!(base, brute_end(&mut q), "{bits} bits: fresh");
        let next_block = base.div_ceil(rb) * rb;
        // Inside the last block, at block edges, in blocks past empty table entries, and
        // past the first refcount-table page (the table grows).
        let epp = 512 / 8; // table entries per page
        for c in [
            base,
            next_block - 1,
            next_block,
            next_block + rb - 1,
            next_block + 3 * rb + rb / 2,
            (epp + 5) * rb + 1,
            (2 * epp + 1) * rb - 1,
        ] {
            for v in [1, max] {
                q.ensure_blocks(c, 1).unwrap();
                assert_eq!(q.refcount(c).unwrap(), 0, "{bits} bits: {c} is free");
                q.set_refcount(c, v).unwrap();
                q.flush().unwrap();
                let got = q.compute_end().unwrap();
                assert_eq!(got, c + 1, "{bits} bits: refcount {v:#x} at {c}");
                assert_eq!(got, brute_end(&mut q), "{bits} bits: at {c}");
                q.set_refcount(c, 0).unwrap();
                q.flush().unwrap();
                let got = q.compute_end().unwrap();
                assert_eq!(got, brute_end(&mut q), "{bits} bits: {c} cleared");
            }
        }
    }
}

#[test]
fn version_2_images_are_created_and_refuse_what_v2_cannot_hold() {
    let v2 = CreateOptions {
        version: 2,
        virtual_size: 1 << 20,
        cluster_size: 4096,
        ..CreateOptions::default()
    };
    let mut q = Qcow2::create(MemDisk::growable(), &v2).unwrap();
    assert_eq!(q.header().version, 2);
    assert_eq!(q.header().header_length, 72);
    q.write(5000, &[9u8; 9000]).unwrap();
    let dev = q.close().unwrap();
    let mut q = Qcow2::open(dev, OpenOptions::default()).unwrap();
    let mut back = vec![0u8; 9000];
    q.read(5000, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 9));
    assert!(q.check().unwrap().is_clean());
    for bad in [
        CreateOptions {
            lazy_refcounts: true,
            ..v2.clone()
        },
        CreateOptions {
            extended_l2: true,
            cluster_size: 65536,
            ..v2.clone()
        },
        CreateOptions {
            refcount_bits: 8,
            ..v2.clone()
        },
        CreateOptions {
            compression_type: crate::qcow2::CompressionType::Zstd,
            ..v2.clone()
        },
        CreateOptions {
            version: 4,
            ..v2.clone()
        },
    ] {
        assert!(Qcow2::create(MemDisk::growable(), &bad).is_err(), "{bad:?}");
    }
}

#[test]
fn preallocate_gives_every_cluster_a_host_cluster_and_keeps_the_data() {
    let mut q = mem_image(1 << 20, 4096, 16);
    q.write(10_000, &[5u8; 3000]).unwrap();
    q.zero_range(64 << 10, 8192, true).unwrap();
    q.preallocate(0, 1 << 20).unwrap();
    for vc in 0..256 {
        let m = q.mapping(vc).unwrap();
        assert!(
            matches!(m, crate::qcow2::entry::Mapping::Data { copied: true, .. }),
            "cluster {vc}: {m:?}"
        );
    }
    let mut back = vec![1u8; 1 << 20];
    q.read(0, &mut back).unwrap();
    assert!(back[10_000..13_000].iter().all(|&b| b == 5));
    assert!(
        back[..10_000]
            .iter()
            .chain(&back[13_000..])
            .all(|&b| b == 0)
    );
    // Writes land in the preallocated clusters: nothing more is allocated.
    let before = q.stats().clusters_allocated;
    q.write(500 << 10, &[7u8; 4096]).unwrap();
    assert_eq!(q.stats().clusters_allocated, before);
    assert!(q.check().unwrap().is_clean());
}
