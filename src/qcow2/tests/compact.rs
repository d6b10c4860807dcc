//! Compaction: clusters at the tail move into free space below, the extent shrinks, and the
//! image cut to its extent is clean for `qemu-img check` and equal to a model for
//! `qemu-img compare`.

use super::util::*;
use crate::block::MemDisk;
use crate::disk::VirtualDisk;
use crate::qcow2::{CompactionState, CreateOptions, OpenOptions, Qcow2};

fn pattern(len: u64, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed) | 1)
        .collect()
}

/// Closes `q`, cuts its bytes to the image extent, checks them with QEMU's tools against
/// `model`, and opens the cut image again.
pub(super) fn checkpoint(
    q: Qcow2<MemDisk>,
    model: &[u8],
    opts: OpenOptions,
    what: &str,
) -> Qcow2<MemDisk> {
    let extent = q.image_extent();
    let mut bytes = q.close().unwrap().into_bytes();
    bytes.truncate(extent as usize);
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("c.qcow2");
    std::fs::write(&img, &bytes).unwrap();
    assert_qemu_clean(&img);
    assert_qemu_compare(dir.path(), &img, model, what);
    let mut q = Qcow2::open(MemDisk::from_bytes(bytes, false), opts).unwrap();
    let r = q.check().unwrap();
    assert!(r.is_clean(), "{what}: our check after the cut: {r}");
    q
}

/// Data written over 64 clusters, the first 48 trimmed: compaction moves the 16 live ones
/// down, and the extent ends right after them and the metadata.
#[test]
fn compaction_moves_the_tail_down_and_the_extent_shrinks() {
    let cs = 65536u64;
    let size = 8u64 << 20;
    let mut q = mem_image(size, cs, 16);
    let mut model = vec![0u8; size as usize];
    let data = pattern(64 * cs, 7);
    q.write(0, &data).unwrap();
    model[..data.len()].copy_from_slice(&data);
    q.flush().unwrap();
    let full = q.image_extent();
    q.discard(0, 48 * cs).unwrap();
    model[..(48 * cs) as usize].fill(0);
    q.flush().unwrap();
    assert_eq!(
        q.image_extent(),
        full,
        "the trim left the live tail in place"
    );
    assert_eq!(q.compactable_bytes().unwrap(), 48 * cs);
    let stats0 = q.stats().clone();
    assert_eq!(stats0.reclaim_junk, 48);
    assert_eq!(stats0.reclaim_available, 48);
    assert_eq!(stats0.reclaim_erased, 48);
    let mut moved = 0;
    let mut steps = 0;
    loop {
        let p = q.compact_step(5).unwrap();
        assert!(p.moved_clusters <= 5);
        assert!(p.extent_after <= p.extent_before);
        moved += p.moved_clusters;
        steps += 1;
        if p.done {
            break;
        }
        assert_eq!(q.stats().compaction_state, CompactionState::Running);
        assert!(steps < 20);
    }
    assert_eq!(moved, 16);
    assert_eq!(q.stats().compaction_state, CompactionState::Done);
    assert_eq!(q.compactable_bytes().unwrap(), 0);
    let s = q.stats().clone();
    assert_eq!(s.reclaim_copied, 16);
    assert_eq!(s.reclaim_flushed, 16);
    assert_eq!(s.reclaim_referenced, 16);
    assert_eq!(s.reclaim_junk, 64);
    let space = q.space().unwrap();
    assert_eq!(space.free_clusters, 0);
    assert_eq!(q.image_extent(), full - 48 * cs);
    let mut all = vec![0u8; size as usize];
    q.read(0, &mut all).unwrap();
    assert!(all == model);
    checkpoint(q, &model, OpenOptions::default(), "after compaction");
}

/// L2 tables and refcount blocks at the tail move too: 512-byte clusters (an L2 table
/// covers 32 KiB, a 16-bit refcount block 256 clusters), data written far out, then the
/// early part trimmed.
#[test]
fn compaction_moves_l2_tables_and_refcount_blocks() {
    let cs = 512u64;
    let size = 4u64 << 20;
    let mut q = Qcow2::create(
        MemDisk::growable(),
        &CreateOptions {
            virtual_size: size,
            cluster_size: cs,
            refcount_bits: 16,
            ..CreateOptions::default()
        },
    )
    .unwrap();
    let mut model = vec![0u8; size as usize];
    // Data first (low host clusters), then tables interleaved further out.
    for i in 0..40u64 {
        let off = i * 97 * 1024;
        let d = pattern(3 * cs, i as u8);
        q.write(off, &d).unwrap();
        model[off as usize..(off + 3 * cs) as usize].copy_from_slice(&d);
    }
    q.write(0, &pattern(600 * cs, 9)).unwrap();
    model[..(600 * cs) as usize].copy_from_slice(&pattern(600 * cs, 9));
    q.flush().unwrap();
    q.discard(0, 600 * cs).unwrap();
    model[..(600 * cs) as usize].fill(0);
    q.flush().unwrap();
    let before = q.image_extent();
    let mut n = 0;
    while !q.compact_step(64).unwrap().done {
        n += 1;
        assert!(n < 100);
    }
    let after = q.image_extent();
    assert!(after < before / 2, "extent {before} -> {after}");
    assert_eq!(
        q.space().unwrap().free_clusters,
        0,
        "holes left below the extent"
    );
    assert_space_kept(&mut q);
    checkpoint(q, &model, OpenOptions::default(), "after moving tables");
}

/// A compaction step on a read-only image is refused, and moving nothing on a full image
/// is done at once.
#[test]
fn compaction_on_read_only_or_packed_images() {
    let cs = 65536u64;
    let mut q = mem_image(4 << 20, cs, 16);
    q.write(0, &pattern(3 * cs, 1)).unwrap();
    let p = q.compact_step(8).unwrap();
    assert!(p.done);
    assert_eq!(p.moved_clusters, 0);
    assert_eq!(p.extent_before, p.extent_after);
    let dev = q.close().unwrap();
    let mut q = Qcow2::open(dev, read_only()).unwrap();
    assert!(q.compact_step(8).is_err());
}

/// Runs qemu-io commands on a qcow2 file.
fn qemu_io(img: &std::path::Path, cmds: &[&str]) {
    let mut args = vec!["-f", "qcow2"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(img.to_str().unwrap());
    qemu_ok("qemu-io", &args);
}

/// Compacts a file image until done and cuts the file to the extent; returns the extent
/// before and after.
fn compact_file(img: &std::path::Path) -> (u64, u64) {
    let mut q = open_file(img, OpenOptions::default());
    let before = q.image_extent();
    let mut n = 0;
    while !q.compact_step(100).unwrap().done {
        n += 1;
        assert!(n < 1000);
    }
    let after = q.image_extent();
    let dev = q.close().unwrap();
    dev.set_len(after).unwrap();
    (before, after)
}

/// Clusters an internal snapshot shares (refcount 2) are not moved: compaction stops above
/// them; what lies above moves. Check is clean, the guest disk unchanged, and the snapshot
/// still reverts to its own data.
#[test]
fn compaction_leaves_snapshot_shared_clusters_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("s.qcow2");
    qemu_create(&img, "cluster_size=65536", 64 << 20);
    qemu_io(&img, &["write -P 0x11 0 4M"]);
    qemu_ok("qemu-img", &["snapshot", "-c", "s1", img.to_str().unwrap()]);
    qemu_io(&img, &["write -P 0x22 8M 8M", "write -P 0x33 20M 2M"]);
    qemu_io(&img, &["discard 8M 8M", "discard 0 2M"]);
    let model = qemu_raw(dir.path(), &img);
    let (before, after) = compact_file(&img);
    assert!(after < before, "nothing moved: {before} -> {after}");
    assert_qemu_clean(&img);
    assert_qemu_compare(dir.path(), &img, &model, "after compaction with a snapshot");
    // The snapshot's data is where it was.
    qemu_ok("qemu-img", &["snapshot", "-a", "s1", img.to_str().unwrap()]);
    let mut snap = vec![0u8; 64 << 20];
    snap[..4 << 20].fill(0x11);
    assert_qemu_compare(dir.path(), &img, &snap, "the snapshot after compaction");
    assert_qemu_clean(&img);
}

/// Compressed clusters are not moved (compaction stops above them); data written after
/// them moves below when room is freed. Check clean, guest disk unchanged.
#[test]
fn compaction_leaves_compressed_clusters_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.qcow2");
    let img = dir.path().join("c.qcow2");
    qemu_create(&src, "cluster_size=65536", 32 << 20);
    qemu_io(&src, &["write -P 0x44 0 2M", "write -P 0x55 4M 1M"]);
    qemu_ok(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            src.to_str().unwrap(),
            img.to_str().unwrap(),
        ],
    );
    // Uncompressed data after the compressed clusters, then part of it trimmed.
    qemu_io(&img, &["write -P 0x66 8M 4M", "discard 8M 3M"]);
    let model = qemu_raw(dir.path(), &img);
    let (before, after) = compact_file(&img);
    assert!(after < before, "nothing moved: {before} -> {after}");
    assert_qemu_clean(&img);
    assert_qemu_compare(
        dir.path(),
        &img,
        &model,
        "after compaction with compressed clusters",
    );
    let mut q = open_file(&img, read_only());
    let mut buf = vec![0u8; 1 << 20];
    q.read(4 << 20, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0x55));
}

/// A leaked cluster at the tail (in use by nothing: what a power cut between a move's new
/// reference and the old cluster's free leaves) is freed by compaction, not left to block
/// it.
#[test]
fn compaction_frees_a_leak_at_the_tail() {
    let cs = 65536u64;
    let size = 8u64 << 20;
    let mut q = mem_image(size, cs, 16);
    let mut model = vec![0u8; size as usize];
    let d = pattern(8 * cs, 3);
    q.write(0, &d).unwrap();
    model[..d.len()].copy_from_slice(&d);
    q.discard(0, 4 * cs).unwrap();
    model[..(4 * cs) as usize].fill(0);
    let before = q.image_extent();
    let mut bytes = q.close().unwrap().into_bytes();
    // Unreference guest cluster 7 (the last data cluster) by zeroing its L2 entry.
    let be = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let l1 = be(&bytes, 40) as usize;
    let l2 = (be(&bytes, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    bytes[l2 + 7 * 8..l2 + 8 * 8].fill(0);
    model[(7 * cs) as usize..(8 * cs) as usize].fill(0);
    let mut q = Qcow2::open(MemDisk::from_bytes(bytes, false), OpenOptions::default()).unwrap();
    assert_eq!(q.check().unwrap().leaks, 1);
    while !q.compact_step(16).unwrap().done {}
    assert_eq!(q.stats().compaction_leaks_freed, 1);
    assert_eq!(q.image_extent(), before - 5 * cs);
    let r = q.check().unwrap();
    assert!(r.is_clean(), "{r}");
    checkpoint(q, &model, OpenOptions::default(), "after freeing a leak");
}
