//! Our check reports what `qemu-img check` reports on damaged images (leaks, refcounts too
//! low or too high, wrong COPIED flags), and our repair leaves an image QEMU finds clean with
//! the data intact.

use super::util::*;
use crate::block::FileDisk;
use crate::disk::VirtualDisk;
use crate::qcow2::{CreateOptions, OpenOptions, Qcow2};
use std::path::Path;

const CS: u64 = 65536;

/// A fresh image with some data: header 0, refcount table 1, block 2, L1 3, then L2 and
/// data clusters from 4 on.
fn make(path: &Path) -> Vec<u8> {
    let mut q = Qcow2::create(
        FileDisk::create(path).unwrap(),
        &CreateOptions {
            virtual_size: 64 << 20,
            cluster_size: CS,
            refcount_bits: 16,
            ..CreateOptions::default()
        },
    )
    .unwrap();
    let data: Vec<u8> = (0..(5 * CS as usize)).map(|i| (i / 7) as u8).collect();
    q.write(0, &data).unwrap();
    q.write(40 << 20, &data[..1000]).unwrap();
    // Free host clusters 6 and 7 (guest clusters 1 and 2) so there are holes inside the file.
    q.discard(CS, 2 * CS).unwrap();
    q.close().unwrap();
    let mut v = vec![0u8; 64 << 20];
    let mut q = open_file(path, read_only());
    q.read(0, &mut v).unwrap();
    v
}

/// Sets the 16-bit refcount of cluster `c` (first refcount block at cluster 2).
fn set_rc(path: &Path, c: u64, v: u16) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&v.to_be_bytes(), 2 * CS + 2 * c).unwrap();
}

fn qemu_counts(path: &Path) -> (u64, u64) {
    let out = qemu_check_json(path);
    (json_u64(&out, "corruptions"), json_u64(&out, "leaks"))
}

/// What `qemu-img check -r all` fixes on a copy: (corruptions fixed, leaks fixed).
fn qemu_fixes(path: &Path) -> (u64, u64) {
    let copy = path.with_extension("copy");
    std::fs::copy(path, &copy).unwrap();
    let o = qemu(
        "qemu-img",
        &[
            "check",
            "-r",
            "all",
            "--output=json",
            copy.to_str().unwrap(),
        ],
    );
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    (
        json_u64(&out, "corruptions-fixed"),
        json_u64(&out, "leaks-fixed"),
    )
}

fn ours(path: &Path) -> (u64, u64) {
    let mut q = open_file(path, read_only());
    let r = q.check().unwrap();
    (r.corruptions, r.leaks)
}

fn damage_and_compare(damage: impl Fn(&Path)) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.qcow2");
    let data = make(&path);
    damage(&path);
    let theirs = qemu_counts(&path);
    assert!(theirs != (0, 0), "the damage went unnoticed by qemu-img");
    assert_eq!(
        ours(&path),
        theirs,
        "our (corruptions, leaks) differ from qemu-img check"
    );
    let their_fixes = qemu_fixes(&path);
    let mut q = open_file(&path, OpenOptions::default());
    let rep = q.repair().unwrap();
    assert!(rep.is_clean(), "{rep}");
    assert_eq!(
        (rep.corruptions_fixed, rep.leaks_fixed),
        their_fixes,
        "repair fixed something else than was found: {rep}"
    );
    q.close().unwrap();
    assert_qemu_clean(&path);
    let mut q = open_file(&path, read_only());
    let mut back = vec![0u8; 64 << 20];
    q.read(0, &mut back).unwrap();
    assert!(back == data, "repair changed the data");
}

#[test]
fn leaked_clusters() {
    damage_and_compare(|p| {
        set_rc(p, 6, 1);
        set_rc(p, 7, 2);
    });
}

#[test]
fn refcount_too_low() {
    // Cluster 5 is the first data cluster: refcount 0 with a reference (and COPIED set).
    damage_and_compare(|p| set_rc(p, 5, 0));
}

#[test]
fn refcount_too_high() {
    damage_and_compare(|p| set_rc(p, 6, 3));
}

#[test]
fn metadata_refcount_too_low() {
    // The L1 table's own refcount.
    damage_and_compare(|p| set_rc(p, 3, 0));
}

/// An image we find corrupt is marked so in a way QEMU sees (`"corrupt": true`), and after
/// our repair both sides find it clean and unmarked.
#[test]
fn corrupt_mark_is_shared_with_qemu() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.qcow2");
    make(&path);
    // The L1 entry (the only L2 table) points at the L1 table itself.
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&((1u64 << 63) | (3 * CS)).to_be_bytes(), 3 * CS)
        .unwrap();
    drop(f);
    let mut q = open_file(&path, OpenOptions::default());
    let mut b = [0u8; 8];
    assert!(q.read(40 << 20, &mut b).is_err());
    assert!(q.info().corrupt);
    drop(q);
    let info = qemu_ok(
        "qemu-img",
        &["info", "--output=json", path.to_str().unwrap()],
    );
    assert!(info.contains("\"corrupt\": true"), "{info}");
    let mut q = open_file(
        &path,
        OpenOptions {
            repair: true,
            ..OpenOptions::default()
        },
    );
    let rep = q.repair().unwrap();
    assert!(rep.is_clean() && rep.corruptions_fixed > 0, "{rep}");
    q.close().unwrap();
    assert_qemu_clean(&path);
    let info = qemu_ok(
        "qemu-img",
        &["info", "--output=json", path.to_str().unwrap()],
    );
    assert!(info.contains("\"corrupt\": false"), "{info}");
}

/// The summary numbers agree with `qemu-img check` too.
#[test]
fn summary_numbers_match_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.qcow2");
    make(&path);
    let out = qemu_check_json(&path);
    let mut q = open_file(&path, read_only());
    let r = q.check().unwrap();
    assert_summary_eq_qemu(&r, &out);
    assert_eq!(
        r.fragmented_clusters,
        json_u64(&out, "fragmented-clusters"),
        "{out}"
    );
}
