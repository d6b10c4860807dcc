//! Overlap checks before writes, on images made by `qemu-img create` (QEMU 7.2 layout of a
//! 64 MiB image: refcount table 0x10000, refcount block 0x20000, L1 0x30000, the first L2
//! table 0x40000): a write that a corrupt entry sends onto metadata is refused with
//! [`Qcow2Error::Overlap`], the metadata's bytes stay as they were, the image is marked
//! corrupt and the refusal is counted; QEMU refuses the same writes. A compressed cluster
//! whose descriptor runs into its neighbour frees only what its stream uses when it is
//! overwritten, so the neighbour's data survives (as with QEMU).

use super::util::*;
use crate::block::FileDisk;
use crate::disk::{DiskError, VirtualDisk};
use crate::nbd::ServerConfig;
use crate::nbd::client::Client;
use crate::nbd::host::HostServer;
use crate::qcow2::header::INCOMPAT_CORRUPT;
use crate::qcow2::{OpenOptions, Qcow2, Qcow2Error};
use std::path::{Path, PathBuf};

const CS: u64 = 65536;
const REFBLOCK: u64 = 0x20000;
const L1: u64 = 0x30000;
const L2: u64 = 0x40000;
const COPIED: u64 = 1 << 63;

fn get64(b: &[u8], at: u64) -> u64 {
    u64::from_be_bytes(b[at as usize..at as usize + 8].try_into().unwrap())
}

fn put64(path: &Path, at: u64, v: u64) {
    let mut b = std::fs::read(path).unwrap();
    b[at as usize..at as usize + 8].copy_from_slice(&v.to_be_bytes());
    std::fs::write(path, b).unwrap();
}

/// `len` bytes at `at` (fewer where the file ends first).
fn bytes(path: &Path, at: u64, len: u64) -> Vec<u8> {
    let b = std::fs::read(path).unwrap();
    b[at as usize..((at + len) as usize).min(b.len())].to_vec()
}

/// Asserts that the bytes at `at` still are `before` (the file may have grown past them).
fn assert_unchanged(path: &Path, at: u64, before: &[u8], what: &str) {
    let now = bytes(path, at, before.len() as u64);
    assert!(now == before, "{what} at {at:#x} changed");
}

/// Runs qemu-io on the qcow2 image `img`, one `-c` per command; fails unless it succeeds.
fn qemu_io_ok(img: &Path, cmds: &[&str]) {
    let mut args = vec!["-f", "qcow2"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(img.to_str().unwrap());
    qemu_ok("qemu-io", &args);
}

fn incompatible(path: &Path) -> u64 {
    get64(&std::fs::read(path).unwrap(), 72)
}

/// A 64 MiB image by `qemu-img create` whose guest clusters 0 and 1 QEMU filled with 0x11 and
/// 0x22 (so the first L2 table exists at 0x40000).
fn qemu_image(dir: &Path) -> PathBuf {
    let img = dir.join("o.qcow2");
    qemu_create(&img, "cluster_size=65536", 64 << 20);
    qemu_io_ok(&img, &["write -P 0x11 0 64k", "write -P 0x22 64k 64k"]);
    let b = std::fs::read(&img).unwrap();
    assert_eq!(get64(&b, 40), L1, "QEMU 7.2 layout: L1 table at 0x30000");
    assert_eq!(get64(&b, L1) & !COPIED, L2, "first L2 table at 0x40000");
    assert_eq!(
        get64(&b, 0x10000),
        REFBLOCK,
        "first refcount block at 0x20000"
    );
    img
}

fn open_rw(img: &Path) -> Qcow2<FileDisk> {
    open_file(img, OpenOptions::default())
}

/// QEMU's qemu-io on the same image: the write fails with QEMU's overlap message.
fn assert_qemu_refuses(img: &Path, write: &str) {
    let o = qemu(
        "qemu-io",
        &["-f", "qcow2", "-c", write, img.to_str().unwrap()],
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        text.contains("Preventing invalid write on metadata"),
        "QEMU should refuse `{write}`: {text}"
    );
}

#[test]
fn data_write_through_an_l2_entry_pointing_at_its_own_l2_table_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = qemu_image(dir.path());
    put64(&img, L2, COPIED | L2);
    let qemu_copy = dir.path().join("qemu.qcow2");
    std::fs::copy(&img, &qemu_copy).unwrap();
    let before = bytes(&img, L2, CS);

    let mut q = open_rw(&img);
    let err = q.write_at(0, &[0x77; 4096]).unwrap_err();
    assert_eq!(
        err,
        Qcow2Error::Overlap {
            offset: L2,
            what: "an active L2 table"
        }
    );
    assert!(
        err.to_string()
            .contains("an active L2 table at host offset 0x40000")
    );
    assert_eq!(q.stats().overlaps_refused, 1);
    // Marked corrupt: later writes are refused too, reads still work.
    assert_eq!(
        q.write(65536, &[1; 512]),
        Err(DiskError::Corrupt("image marked corrupt"))
    );
    let mut buf = vec![0u8; 65536];
    q.read(65536, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0x22));
    drop(q);

    assert_unchanged(&img, L2, &before, "the L2 table");
    assert_ne!(incompatible(&img) & INCOMPAT_CORRUPT, 0, "corrupt bit set");
    // A later writable open is refused, as QEMU refuses it.
    assert!(matches!(
        Qcow2::open(FileDisk::open(&img, false).unwrap(), OpenOptions::default()),
        Err(Qcow2Error::MarkedCorrupt)
    ));
    let o = qemu(
        "qemu-io",
        &["-f", "qcow2", "-c", "write 0 4k", img.to_str().unwrap()],
    );
    assert!(
        !o.status.success() || String::from_utf8_lossy(&o.stdout).contains("failed"),
        "QEMU refuses to write a corrupt image"
    );
    assert_qemu_refuses(&qemu_copy, "write -P 0x77 0 4k");
}

#[test]
fn discarding_a_data_entry_that_points_at_its_l2_table_does_not_free_the_table() {
    // The discard itself only clears the entry; dropping the reference would take the live
    // L2 table's refcount to zero (and hand it out for data next): refused at write-back.
    let dir = tempfile::tempdir().unwrap();
    let img = qemu_image(dir.path());
    put64(&img, L2, COPIED | L2);
    let mut q = open_rw(&img);
    q.discard(0, CS).unwrap();
    assert_eq!(
        q.flush_metadata().unwrap_err(),
        Qcow2Error::Overlap {
            offset: L2,
            what: "an active L2 table"
        }
    );
    assert_eq!(q.stats().overlaps_refused, 1);
    drop(q);
    let refcount = |c: u64| {
        let b = bytes(&img, REFBLOCK + 2 * c, 2);
        u16::from_be_bytes([b[0], b[1]])
    };
    assert_eq!(refcount(L2 / CS), 1, "the L2 table stays allocated");
    assert_ne!(incompatible(&img) & INCOMPAT_CORRUPT, 0);
    let mut q = open_file(&img, read_only());
    let mut buf = vec![0u8; 65536];
    q.read(CS, &mut buf).unwrap();
    assert!(
        buf.iter().all(|&b| b == 0x22),
        "guest cluster 1 reads as before"
    );
}

#[test]
fn data_write_onto_a_refcount_block_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = qemu_image(dir.path());
    put64(&img, L2 + 8, COPIED | REFBLOCK);
    let qemu_copy = dir.path().join("qemu.qcow2");
    std::fs::copy(&img, &qemu_copy).unwrap();
    let before = bytes(&img, REFBLOCK, CS);
    let mut q = open_rw(&img);
    // A write-zeroes that keeps the cluster goes through the same check.
    let err = q.zero_range(65536, 4096, false).unwrap_err();
    assert_eq!(
        err,
        Qcow2Error::Overlap {
            offset: REFBLOCK,
            what: "a refcount block"
        }
    );
    drop(q);
    assert_unchanged(&img, REFBLOCK, &before, "metadata");
    assert_ne!(incompatible(&img) & INCOMPAT_CORRUPT, 0);
    assert_qemu_refuses(&qemu_copy, "write -P 0x77 64k 4k");
}

#[test]
fn data_write_onto_the_l1_table_or_refcount_table_is_refused() {
    // (The header cannot be reached: an L2 entry with host offset 0 is "unallocated", or
    // refused as pointing into the header when it has the COPIED flag.)
    for (target, what) in [(L1, "the active L1 table"), (0x10000, "the refcount table")] {
        let dir = tempfile::tempdir().unwrap();
        let img = qemu_image(dir.path());
        put64(&img, L2, COPIED | target);
        let before = bytes(&img, target, CS);
        let mut q = open_rw(&img);
        assert_eq!(
            q.write_at(0, &[0x77; 65536]).unwrap_err(),
            Qcow2Error::Overlap {
                offset: target,
                what
            }
        );
        drop(q);
        assert_unchanged(&img, target, &before, "metadata");
        assert_ne!(incompatible(&img) & INCOMPAT_CORRUPT, 0);
    }
}

#[test]
fn table_write_onto_a_refcount_block_is_refused() {
    // L1[0] points at the refcount block: the "L2 table" a write changes there is a
    // refcount block; writing it back (and the refcount block itself, which now shares its
    // cluster with an active L2 table) is refused.
    let dir = tempfile::tempdir().unwrap();
    let img = qemu_image(dir.path());
    put64(&img, L1, COPIED | REFBLOCK);
    let before = bytes(&img, REFBLOCK, CS);
    let mut q = open_rw(&img);
    // Entry 8 of the "L2 table" is zero (refcounts of clusters 32..35): a fresh write.
    q.write_at(8 * CS, &[0x55; 4096]).unwrap();
    let err = q.flush_metadata().unwrap_err();
    assert!(
        matches!(
            err,
            Qcow2Error::Overlap {
                offset: REFBLOCK,
                what: "an active L2 table" | "a refcount block"
            }
        ),
        "{err:?}"
    );
    assert_eq!(q.stats().overlaps_refused, 1);
    drop(q);
    assert_unchanged(&img, REFBLOCK, &before, "the refcount block");
    assert_ne!(incompatible(&img) & INCOMPAT_CORRUPT, 0);
}

#[test]
fn snapshot_tables_are_protected() {
    // An image with a QEMU snapshot: an L2 entry pointing at the snapshot's L1 table or at
    // the snapshot table is refused.
    let dir = tempfile::tempdir().unwrap();
    let img = qemu_image(dir.path());
    qemu_ok("qemu-img", &["snapshot", "-c", "s1", img.to_str().unwrap()]);
    let b = std::fs::read(&img).unwrap();
    let snap_table = get64(&b, 64);
    let snap_l1 = get64(&b, snap_table);
    assert_ne!(snap_l1, L1, "the snapshot has its own L1 table");
    // The active L1 entry lost its COPIED flag (the L2 table is shared): our first write
    // copies the table, so aim the corrupt entry through the copy with a later write.
    for (target, what) in [
        (snap_l1, "a snapshot L1 table"),
        (snap_table / CS * CS, "the snapshot table"),
    ] {
        let dir2 = tempfile::tempdir().unwrap();
        let img2 = dir2.path().join("s.qcow2");
        std::fs::copy(&img, &img2).unwrap();
        let before = bytes(&img2, target, CS);
        let mut q = open_rw(&img2);
        // Copy the shared L2 table (cluster 2 gets data), then corrupt entry 0 of the copy.
        q.write_at(2 * CS, &[3; 4096]).unwrap();
        q.flush_metadata().unwrap();
        drop(q);
        let active_l2 = get64(&std::fs::read(&img2).unwrap(), L1) & !COPIED;
        assert_ne!(active_l2, L2, "the active L2 table was copied");
        put64(&img2, active_l2, COPIED | target);
        let mut q = open_rw(&img2);
        assert_eq!(
            q.write_at(0, &[0x77; 4096]).unwrap_err(),
            Qcow2Error::Overlap {
                offset: target,
                what
            }
        );
        drop(q);
        assert_unchanged(&img2, target, &before, "metadata");
    }
}

#[test]
fn bitmap_directory_and_tables_are_protected() {
    let dir = tempfile::tempdir().unwrap();
    let img = qemu_image(dir.path());
    qemu_ok(
        "qemu-img",
        &["bitmap", "--add", img.to_str().unwrap(), "b0"],
    );
    // The bitmaps extension (type 0x23852875) gives the directory; its first entry the table.
    let b = std::fs::read(&img).unwrap();
    let mut at = u32::from_be_bytes(b[100..104].try_into().unwrap()) as usize;
    let dir_off = loop {
        let kind = u32::from_be_bytes(b[at..at + 4].try_into().unwrap());
        let len = u32::from_be_bytes(b[at + 4..at + 8].try_into().unwrap()) as usize;
        assert_ne!(kind, 0, "no bitmaps extension");
        if kind == 0x2385_2875 {
            break get64(&b, at as u64 + 8 + 16);
        }
        at += 8 + len.div_ceil(8) * 8;
    };
    let table_off = get64(&b, dir_off);
    assert!(table_off != 0 && dir_off != 0);
    for (target, what) in [
        (dir_off, "the bitmap directory"),
        (table_off, "a bitmap table"),
    ] {
        let dir2 = tempfile::tempdir().unwrap();
        let img2 = dir2.path().join("b.qcow2");
        std::fs::copy(&img, &img2).unwrap();
        put64(&img2, L2, COPIED | target);
        let mut before = bytes(&img2, target, CS);
        if target == dir_off {
            // The first change marks the enabled bitmap in use (flags at byte 12 of its
            // entry) before the write is refused: the rest must stay as it was.
            before[15] |= 1;
        }
        let mut q = open_rw(&img2);
        assert_eq!(
            q.write_at(0, &[0x77; 4096]).unwrap_err(),
            Qcow2Error::Overlap {
                offset: target,
                what
            }
        );
        drop(q);
        assert_unchanged(&img2, target, &before, what);
    }
}

#[test]
fn valid_images_write_without_refusals() {
    // Writes, discards, a snapshot's shared tables copied, a refcount-table growth (small
    // clusters): never refused, QEMU finds the result clean.
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("v.qcow2");
    qemu_create(&img, "cluster_size=512", 8 << 20);
    qemu_io_ok(&img, &["write -P 0x11 0 1M"]);
    qemu_ok("qemu-img", &["snapshot", "-c", "s1", img.to_str().unwrap()]);
    let mut q = open_rw(&img);
    let mut model = vec![0u8; 8 << 20];
    model[..1 << 20].fill(0x11);
    for i in 0..64u64 {
        let off = (i * 130_001) % ((8 << 20) - 70_000);
        let data = vec![i as u8; 65_536 + i as usize];
        q.write(off, &data).unwrap();
        model[off as usize..off as usize + data.len()].copy_from_slice(&data);
        if i % 7 == 0 {
            q.discard(off, 4096).unwrap();
            let a = off.div_ceil(512) * 512;
            let e = (off + 4096) / 512 * 512;
            model[a as usize..e as usize].fill(0);
        }
    }
    q.resize(64 << 20).unwrap();
    model.resize(64 << 20, 0);
    q.write(60 << 20, &[9; 100_000]).unwrap();
    model[60 << 20..(60 << 20) + 100_000].fill(9);
    assert_eq!(q.stats().overlaps_refused, 0);
    q.close().unwrap();
    assert_qemu_clean(&img);
    assert_qemu_compare(dir.path(), &img, &model, "after writes");
}

/// Bytes that deflate to about half their size (compressed clusters of these straddle host
/// cluster boundaries).
fn half_compressible(len: usize, seed: u32) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(u64::from(seed));
    (0..len)
        .map(|_| b"abcdefghijklmnop"[rng.usize(..16)])
        .collect()
}

#[test]
fn compressed_descriptor_running_into_its_neighbour_frees_only_its_own_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("c.qcow2");
    qemu_create(&img, "cluster_size=65536", 64 << 20);
    qemu_io_ok(&img, &["write -c -P 0xaa 0 64k", "write -P 0xbb 64k 64k"]);
    let b = std::fs::read(&img).unwrap();
    let l2 = get64(&b, L1) & !COPIED;
    let e0 = get64(&b, l2);
    let e1 = get64(&b, l2 + 8);
    assert_ne!(e0 & (1 << 62), 0, "guest cluster 0 is compressed");
    // 64 KiB clusters: offset in bits 0..54, additional sectors in bits 54..62.
    let host0 = e0 & ((1 << 54) - 1);
    let host1 = e1 & !COPIED;
    assert_eq!(host1, (host0 / CS + 1) * CS, "cluster 1's data follows");
    // The descriptor claims sectors up to 4 KiB into guest cluster 1's data.
    let sectors = (host1 + 4096 - host0 / 512 * 512) / 512 - 1;
    assert!(sectors < 256);
    put64(&img, l2, (1 << 62) | (sectors << 54) | host0);
    let qemu_copy = dir.path().join("qemu.qcow2");
    std::fs::copy(&img, &qemu_copy).unwrap();
    // Both checkers see the corruption (cluster 1's data is referenced twice).
    let json = qemu_check_json(&img);
    assert!(json_u64(&json, "corruptions") > 0, "{json}");
    let mut q = open_rw(&img);
    assert!(q.check().unwrap().corruptions > 0);

    // Overwrite guest cluster 0, write back (the old extent's refcounts drop), then allocate
    // more: nothing may land on cluster 1's data.
    q.write(0, &[0x77; 4096]).unwrap();
    q.flush().unwrap();
    for i in 2..6u64 {
        q.write(i * CS, &[i as u8; 65536]).unwrap();
    }
    q.close().unwrap();
    let mut q = open_file(&img, read_only());
    let mut buf = vec![0u8; 65536];
    q.read(CS, &mut buf).unwrap();
    assert!(
        buf.iter().all(|&b| b == 0xbb),
        "guest cluster 1 kept its data"
    );
    q.read(0, &mut buf).unwrap();
    assert!(buf[..4096].iter().all(|&b| b == 0x77));
    assert!(buf[4096..].iter().all(|&b| b == 0xaa));
    drop(q);
    let raw = qemu_raw(dir.path(), &img);
    assert!(raw[CS as usize..2 * CS as usize].iter().all(|&b| b == 0xbb));
    // The extent's first cluster only was freed: QEMU sees no corruption left, only that
    // cluster 1's data kept its single reference.
    let json = qemu_check_json(&img);
    assert_eq!(json_u64(&json, "corruptions"), 0, "{json}");

    // QEMU keeps guest cluster 1's data as well.
    qemu_io_ok(&qemu_copy, &["write -P 0x77 0 4k", "read -P 0xbb 64k 64k"]);
    let raw = qemu_raw(dir.path(), &qemu_copy);
    assert!(raw[CS as usize..2 * CS as usize].iter().all(|&b| b == 0xbb));
}

#[test]
fn overwriting_valid_compressed_clusters_frees_every_cluster_they_use() {
    // Compressed clusters packed by QEMU straddle host clusters; overwriting (and
    // discarding) them all must free exactly their clusters: no leaks, no corruption.
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let data: Vec<u8> = (0..32)
        .flat_map(|i| half_compressible(65536, i + 1))
        .collect();
    std::fs::write(&src, &data).unwrap();
    let img = dir.path().join("z.qcow2");
    qemu_ok(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            src.to_str().unwrap(),
            img.to_str().unwrap(),
        ],
    );
    let mut q = open_rw(&img);
    let mut straddling = 0;
    for vc in 0..32 {
        if let crate::qcow2::Mapping::Compressed { host, len } = q.mapping(vc).unwrap() {
            if host / CS != (host + len - 1) / CS {
                straddling += 1;
            }
        } else {
            panic!("guest cluster {vc} is not compressed");
        }
    }
    assert!(straddling >= 8, "only {straddling} straddle");
    let mut model = data.clone();
    for vc in 0..32u64 {
        let at = (vc * CS) as usize;
        match vc % 3 {
            0 => {
                q.write(vc * CS + 100, &[vc as u8; 5000]).unwrap();
                model[at + 100..at + 5100].fill(vc as u8);
            }
            1 => {
                q.write(vc * CS, &[vc as u8; 65536]).unwrap();
                model[at..at + 65536].fill(vc as u8);
            }
            _ => {
                q.discard(vc * CS, CS).unwrap();
                model[at..at + 65536].fill(0);
            }
        }
    }
    q.close().unwrap();
    assert_qemu_clean(&img);
    assert_qemu_compare(
        dir.path(),
        &img,
        &model,
        "after overwriting compressed clusters",
    );
}

#[test]
fn nbd_client_gets_eio_and_the_connection_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let img = qemu_image(dir.path());
    put64(&img, L2, COPIED | L2);
    let before = bytes(&img, L2, CS);
    let server = HostServer::start(open_rw(&img), ServerConfig::named("disk")).unwrap();
    let mut c = Client::connect(server.addr, "disk").unwrap();
    assert_eq!(c.write(0, &[0x77; 4096], false).unwrap(), 5, "EIO");
    // The connection still serves: reads, and a second write (refused: marked corrupt).
    let mut buf = vec![0u8; 65536];
    assert_eq!(c.read(CS, &mut buf).unwrap(), 0);
    assert!(buf.iter().all(|&b| b == 0x22));
    assert_eq!(c.write(CS, &[1; 512], false).unwrap(), 5, "EIO");
    assert_eq!(c.read(CS, &mut buf).unwrap(), 0);
    assert!(buf.iter().all(|&b| b == 0x22));
    c.disconnect().unwrap();
    assert_eq!(
        server.disk.lock().unwrap().stats().overlaps_refused,
        1,
        "one overlap (the second write met the corrupt mark)"
    );
    assert_eq!(server.stats().errors_of(crate::nbd::NbdError::Io), 2);
    assert_unchanged(&img, L2, &before, "metadata");
    assert_ne!(incompatible(&img) & INCOMPAT_CORRUPT, 0);
}
