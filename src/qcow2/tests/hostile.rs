//! Hostile images: tables pointing past the end or into the header, refcount tables that
//! loop, overlapping metadata, absurd sizes and counts, unknown features, random damage.
//! Every case gives an error or a consistent answer: never a panic, never a huge
//! allocation (the devices here are small and fixed, so nothing can legitimately be big).

use crate::block::MemDisk;
use crate::disk::{DiskError, VirtualDisk};
use crate::qcow2::{CreateOptions, OpenOptions, Qcow2, Qcow2Error};
use proptest::prelude::*;

const CS: u64 = 4096;
const HDR_RT: u64 = CS; // refcount table
const BLOCK: u64 = 2 * CS; // first refcount block
const L1: u64 = 3 * CS; // L1 table
const L2: u64 = 4 * CS; // first L2 table (allocated by the first write)

/// A small valid image: 4 KiB clusters, 16-bit refcounts, 4 MiB, some data written.
fn base() -> Vec<u8> {
    let mut q = Qcow2::create(
        MemDisk::growable(),
        &CreateOptions {
            virtual_size: 4 << 20,
            cluster_size: CS,
            refcount_bits: 16,
            ..CreateOptions::default()
        },
    )
    .unwrap();
    q.write(0, &[0x11; 10000]).unwrap();
    q.write(3 << 20, &[0x22; 5000]).unwrap();
    let mut v = q.close().unwrap().into_bytes();
    v.resize(v.len().next_multiple_of(CS as usize) + 4 * CS as usize, 0);
    v
}

fn put32(b: &mut [u8], at: u64, v: u32) {
    b[at as usize..at as usize + 4].copy_from_slice(&v.to_be_bytes());
}

fn put64(b: &mut [u8], at: u64, v: u64) {
    b[at as usize..at as usize + 8].copy_from_slice(&v.to_be_bytes());
}

fn open(b: Vec<u8>, read_only: bool) -> Result<Qcow2<MemDisk>, Qcow2Error> {
    open_with(b, read_only, false)
}

fn open_with(b: Vec<u8>, read_only: bool, repair: bool) -> Result<Qcow2<MemDisk>, Qcow2Error> {
    Qcow2::open(
        MemDisk::from_bytes(b, true),
        OpenOptions {
            read_only,
            repair,
            l2_cache_bytes: 0,
            refcount_cache_bytes: 0,
            check_memory_limit: 1 << 20,
            ..OpenOptions::default()
        },
    )
}

/// Uses a damaged image every way there is; only errors are allowed, not panics.
fn exercise(b: Vec<u8>) {
    if let Ok(mut q) = open(b.clone(), true) {
        let size = q.size().min(8 << 20);
        let mut buf = vec![0u8; 65536];
        let mut off = 0;
        while off < size {
            let n = (size - off).min(buf.len() as u64);
            let _ = q.read(off, &mut buf[..n as usize]);
            let _ = q.block_status(off, n);
            off += n;
        }
        let _ = q.check();
        let _ = q.map();
        let _ = q.space();
        let _ = format!("{:?}", q.info());
    }
    // Opened for repair: repair, then use what it left.
    if let Ok(mut q) = open_with(b.clone(), false, true) {
        if let Ok(rep) = q.repair() {
            let _ = format!("{rep}");
            let size = q.size();
            if size > 0 {
                let _ = q.write(size / 2, &[7u8; 3000]);
            }
            let _ = q.check();
        }
        let _ = q.close();
    }
    if let Ok(mut q) = open(b, false) {
        let size = q.size();
        if size > 0 {
            for off in [0, size / 3, size - 1] {
                let n = (size - off).min(9000);
                let _ = q.write(off, &vec![0x5a; n as usize]);
                let _ = q.discard(off, n);
                let _ = q.write_zeroes(off, n, false);
            }
        }
        let _ = q.flush();
        if let Ok(rep) = q.repair() {
            let _ = format!("{rep}");
        }
        let _ = q.check();
        let _ = q.close();
    }
}

fn expect_err(b: Vec<u8>, read_only: bool) -> Qcow2Error {
    match open(b, read_only) {
        Ok(_) => panic!("a hostile image opened"),
        Err(e) => e,
    }
}

#[test]
fn base_image_is_clean() {
    let mut q = open(base(), false).unwrap();
    assert!(q.check().unwrap().is_clean());
    let mut b = [0u8; 4];
    q.read(0, &mut b).unwrap();
    assert_eq!(b, [0x11; 4]);
}

#[test]
fn not_qcow2_and_bad_versions() {
    assert_eq!(expect_err(vec![0u8; 8192], true), Qcow2Error::NotQcow2);
    assert_eq!(expect_err(vec![0u8; 10], true), Qcow2Error::NotQcow2);
    let mut b = base();
    put32(&mut b, 4, 4);
    assert_eq!(expect_err(b, true), Qcow2Error::UnsupportedVersion(4));
    for bits in [0u32, 8, 22, 63, u32::MAX] {
        let mut b = base();
        put32(&mut b, 20, bits);
        assert!(matches!(expect_err(b, true), Qcow2Error::BadHeader(_)));
    }
}

#[test]
fn unknown_incompatible_bit_is_named() {
    let mut b = base();
    // Rename the feature-table entry of incompatible bit 4 to bit 9 "frobnication".
    let pos = b[..CS as usize]
        .windows(19)
        .position(|w| w == b"extended L2 entries")
        .expect("feature table");
    b[pos - 1] = 9;
    b[pos..pos + 19].copy_from_slice(b"frobnication\0\0\0\0\0\0\0");
    put64(&mut b, 72, 1 << 9);
    let e = expect_err(b, true);
    let msg = e.to_string();
    assert!(
        msg.contains("bit 9") && msg.contains("frobnication"),
        "{msg}"
    );
    // Without a name the bit number is still there.
    let mut b = base();
    put64(&mut b, 72, 1 << 40);
    assert!(expect_err(b, true).to_string().contains("bit 40"));
    // Known but unsupported features are refused by name.
    let mut b = base();
    put64(&mut b, 72, 1 << 4);
    assert!(expect_err(b, true).to_string().contains("extended L2"));
    let mut b = base();
    put64(&mut b, 72, 1 << 2);
    assert!(
        expect_err(b, true)
            .to_string()
            .contains("external data file")
    );
}

#[test]
fn corrupt_bit_refuses_writes_only() {
    let mut b = base();
    put64(&mut b, 72, 1 << 1);
    assert_eq!(expect_err(b.clone(), false), Qcow2Error::MarkedCorrupt);
    let mut q = open(b.clone(), true).unwrap();
    let mut buf = [0u8; 4];
    q.read(0, &mut buf).unwrap();
    assert_eq!(buf, [0x11; 4]);
    // Opened for repair: guest writes still refused, repair lifts the mark.
    let mut q = Qcow2::open(
        MemDisk::from_bytes(b, true),
        OpenOptions {
            repair: true,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    assert!(matches!(q.write(0, &buf), Err(DiskError::Corrupt(_))));
    assert!(q.repair().unwrap().is_clean());
    q.write(0, &buf).unwrap();
    let q = Qcow2::open(q.close().unwrap(), OpenOptions::default()).unwrap();
    assert!(!q.info().corrupt);
}

#[test]
fn autoclear_bits_are_cleared_on_write() {
    let mut b = base();
    put64(&mut b, 88, 0b11 | 1 << 20);
    let mut q = open(b, false).unwrap();
    assert_eq!(q.info().autoclear_features, 0b11 | 1 << 20);
    q.write(0, b"x").unwrap();
    let dev = q.close().unwrap();
    let q = Qcow2::open(dev, OpenOptions::default()).unwrap();
    assert_eq!(q.info().autoclear_features, 0);
}

#[test]
fn absurd_sizes_and_counts() {
    let cases: [(u64, u64, u32); 7] = [
        (36, 0xffff_ffff, 4),  // l1_size
        (56, 0xffff_ffff, 4),  // refcount_table_clusters
        (56, 0, 4),            // no refcount table
        (100, 0xffff_fff8, 4), // header_length
        (100, 96, 4),          // header_length too short
        (96, 7, 4),            // refcount_order
        (16, 0xffff_ffff, 4),  // backing file size (with offset below)
    ];
    for (at, v, width) in cases {
        let mut b = base();
        if width == 4 {
            put32(&mut b, at, v as u32);
        }
        if at == 16 {
            put64(&mut b, 8, 512);
        }
        let _ = expect_err(b.clone(), true);
        exercise(b);
    }
    // Virtual size far beyond what the L1 table maps.
    let mut b = base();
    put64(&mut b, 24, u64::MAX);
    let _ = expect_err(b, true);
    let mut b = base();
    put64(&mut b, 24, 1 << 62);
    let _ = expect_err(b, true);
    // Snapshot count absurd, table past the end.
    let mut b = base();
    put32(&mut b, 60, u32::MAX);
    put64(&mut b, 64, 1 << 40);
    let _ = expect_err(b.clone(), true);
    // ... or inside the image.
    put64(&mut b, 64, 5 * CS);
    exercise(b);
}

#[test]
fn extension_past_the_cluster() {
    let mut b = base();
    // The first extension (feature table) claims to be huge.
    put32(&mut b, 112 + 4, 0x7fff_0000);
    assert!(matches!(expect_err(b, true), Qcow2Error::BadHeader(_)));
}

#[test]
fn tables_past_the_end() {
    let len = base().len() as u64;
    let mut b = base();
    put64(&mut b, 40, len + 2 * CS); // L1 table
    assert!(matches!(expect_err(b, true), Qcow2Error::Corrupt(_)));
    let mut b = base();
    put64(&mut b, 48, 1 << 50); // refcount table
    assert!(matches!(expect_err(b, true), Qcow2Error::Corrupt(_)));

    // An L1 entry past the end: reads of that range fail, others work; repair clears it.
    let mut b = base();
    put64(&mut b, L1, (1 << 63) | (len + 64 * CS));
    let mut q = open(b.clone(), false).unwrap();
    let mut buf = [0u8; 16];
    assert!(matches!(q.read(0, &mut buf), Err(DiskError::Corrupt(_))));
    // Found corrupt: marked so (like QEMU), guest writes refused, reads elsewhere work.
    assert!(q.info().corrupt);
    assert!(q.write(3 << 20, &buf).is_err());
    q.read(3 << 20, &mut buf).unwrap();
    assert_eq!(buf, [0x22; 16]);
    let rep = q.check().unwrap();
    assert!(rep.corruptions > 0, "{rep}");
    let rep = q.repair().unwrap();
    assert!(rep.corruptions_fixed > 0 && rep.corruptions == 0, "{rep}");
    assert!(!q.info().corrupt, "a clean repair lifts the corrupt mark");
    q.write(3 << 20, &buf).unwrap();
    assert!(q.check().unwrap().is_clean());
    q.read(0, &mut buf).unwrap();
    assert_eq!(buf, [0; 16]);
    exercise(b);

    // An L2 entry past the end.
    let mut b = base();
    put64(&mut b, L2, (1 << 63) | (len + 64 * CS));
    let mut q = open(b.clone(), true).unwrap();
    assert!(matches!(q.read(0, &mut buf), Err(DiskError::Corrupt(_))));
    exercise(b);
}

#[test]
fn tables_into_the_header_and_overlapping() {
    // Data cluster at host 0 (the header) with COPIED set.
    let mut b = base();
    put64(&mut b, L2, 1 << 63);
    let mut q = open(b.clone(), false).unwrap();
    let mut buf = [0u8; 16];
    assert!(q.read(0, &mut buf).is_err());
    assert!(q.write(0, &buf).is_err());
    exercise(b);
    // Data cluster over the L1 table: reads refuse, check reports overlapping metadata.
    let mut b = base();
    put64(&mut b, L2, (1 << 63) | L1);
    let mut q = open(b.clone(), false).unwrap();
    assert!(q.read(0, &mut buf).is_err());
    assert!(q.write(0, &buf).is_err());
    let rep = q.check().unwrap();
    assert!(
        rep.messages.iter().any(|m| m.contains("overlapping")),
        "{rep}"
    );
    exercise(b);
    // L2 table over the refcount table.
    let mut b = base();
    put64(&mut b, L1, (1 << 63) | HDR_RT);
    let mut q = open(b.clone(), true).unwrap();
    assert!(q.read(0, &mut buf).is_err());
    exercise(b);
    // L1 table and refcount table overlap.
    let mut b = base();
    put64(&mut b, 40, HDR_RT);
    assert!(matches!(
        expect_err(b.clone(), true),
        Qcow2Error::Corrupt(_)
    ));
    // Refcount block in the header.
    let mut b = base();
    put64(&mut b, HDR_RT, 0);
    put64(&mut b, HDR_RT, 512);
    exercise(b);
}

#[test]
fn refcount_table_loops() {
    // Every refcount-table entry points at the same block: allocation must not go round
    // forever, check reports overlapping metadata, repair gives the ranges their own blocks.
    let mut b = base();
    for i in 0..(CS / 8) {
        put64(&mut b, HDR_RT + i * 8, BLOCK);
    }
    // Make the shared block look full so a first-free search would loop.
    for i in 0..(CS / 2) {
        b[(BLOCK + i * 2) as usize..(BLOCK + i * 2 + 2) as usize]
            .copy_from_slice(&1u16.to_be_bytes());
    }
    // Refused for writing (it would loop); read-only it opens and check reports it.
    assert!(expect_err(b.clone(), false).to_string().contains("loops"));
    let mut q = open(b.clone(), true).unwrap();
    let rep = q.check().unwrap();
    assert!(rep.corruptions > 0, "{rep}");
    // Opened for repair, the repair gives every range its own block and the image is clean.
    let mut q = Qcow2::open(
        MemDisk::from_bytes(b.clone(), true),
        OpenOptions {
            repair: true,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    let rep = q.repair().unwrap();
    assert!(rep.is_clean(), "{rep}");
    let dev = q.close().unwrap();
    let mut q = Qcow2::open(dev, OpenOptions::default()).unwrap();
    q.write(1 << 20, &[1u8; 8192]).unwrap();
    assert!(q.check().unwrap().is_clean());
    exercise(b.clone());
    // The table points at itself.
    let mut b = base();
    put64(&mut b, HDR_RT, HDR_RT);
    exercise(b);
}

#[test]
fn backing_files_and_encryption_are_refused() {
    let mut b = base();
    put64(&mut b, 8, 1024);
    put32(&mut b, 16, 4);
    b[1024..1028].copy_from_slice(b"base");
    assert!(expect_err(b, true).to_string().contains("backing file"));
    let mut b = base();
    put32(&mut b, 32, 2);
    assert!(expect_err(b, true).to_string().contains("encryption"));
}

#[test]
fn truncated_images() {
    let full = base();
    for len in [
        0usize,
        50,
        104,
        2000,
        CS as usize,
        3 * CS as usize,
        5 * CS as usize,
    ] {
        let b = full[..len.min(full.len())].to_vec();
        exercise(b);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, failure_persistence: None, ..ProptestConfig::default() })]

    /// Random damage to the metadata clusters.
    #[test]
    fn random_damage(
        hits in proptest::collection::vec((0u64..6 * CS / 8, any::<u64>(), 0u8..4), 1..6),
    ) {
        let mut b = base();
        for (slot, v, how) in hits {
            let at = slot * 8;
            match how {
                0 => put64(&mut b, at, v),
                1 => b[at as usize] ^= v as u8,
                2 => put64(&mut b, at, v & 0x00ff_ffff_ffff_fe00),
                _ => put64(&mut b, at, (1 << 63) | ((v % 64) * CS)),
            }
        }
        exercise(b);
    }
}

/// A small image with 512-byte clusters and the given refcount width, with a compressed
/// cluster descriptor planted in its first L2 table.
fn base_512(rb: u32) -> Vec<u8> {
    let mut q = Qcow2::create(
        MemDisk::growable(),
        &CreateOptions {
            virtual_size: 1 << 20,
            cluster_size: 512,
            refcount_bits: rb,
            ..CreateOptions::default()
        },
    )
    .unwrap();
    q.write(0, &[0x33; 3000]).unwrap();
    q.write(700 << 10, &[0x44; 700]).unwrap();
    let mut v = q.close().unwrap().into_bytes();
    v.resize(v.len().next_multiple_of(512) + 8 * 512, 0);
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, failure_persistence: None, ..ProptestConfig::default() })]

    /// Random damage to the first clusters of 512-byte-cluster images of several refcount
    /// widths, including compressed descriptors with random offsets and sizes.
    #[test]
    fn random_damage_small_clusters(
        rb in prop_oneof![Just(1u32), Just(2), Just(8), Just(64)],
        hits in proptest::collection::vec((0u64..16 * 512 / 8, any::<u64>(), 0u8..4), 1..6),
    ) {
        let mut b = base_512(rb);
        for (slot, v, how) in hits {
            let at = slot * 8;
            match how {
                0 => put64(&mut b, at, v),
                1 => b[at as usize] ^= v as u8,
                2 => put64(&mut b, at, (1 << 62) | (v >> 2)),
                _ => put64(&mut b, at, (1 << 63) | ((v % 32) * 512)),
            }
        }
        exercise(b);
    }
}
