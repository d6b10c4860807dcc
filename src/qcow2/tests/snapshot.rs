//! Internal snapshots against QEMU: images with snapshots made by `qemu-img snapshot`, our
//! create/apply/delete checked by `qemu-img check` and `qemu-img snapshot -l`/`info`, each
//! snapshot's data read back by `qemu-img convert -l` and through our read-only views; and
//! a model test of random writes mixed with snapshot operations.

use super::model::{discarded, pattern};
use super::util::*;
use crate::block::{FileDisk, MemDisk};
use crate::disk::VirtualDisk;
use crate::qcow2::{CreateOptions, OpenOptions, Qcow2, Snapshot};
use proptest::prelude::*;
use std::path::Path;

/// `qemu-img convert -l NAME -O raw`: the bytes of snapshot `name` as QEMU reads them.
fn qemu_snapshot_raw(dir: &Path, img: &Path, name: &str) -> Vec<u8> {
    let raw = dir.join("snap.raw");
    let _ = std::fs::remove_file(&raw);
    qemu_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "qcow2",
            "-l",
            name,
            "-O",
            "raw",
            img.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    std::fs::read(&raw).unwrap()
}

/// Asserts our snapshot list equals what `qemu-img info --output=json` reports.
fn assert_list_eq_qemu(ours: &[Snapshot], img: &Path) {
    let out = qemu_ok(
        "qemu-img",
        &[
            "info",
            "--output=json",
            "-f",
            "qcow2",
            img.to_str().unwrap(),
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let theirs = v["snapshots"].as_array().cloned().unwrap_or_default();
    assert_eq!(ours.len(), theirs.len(), "{out}");
    for (a, b) in ours.iter().zip(&theirs) {
        assert_eq!(b["id"], a.id.as_str(), "{out}");
        assert_eq!(b["name"], a.name.as_str(), "{out}");
        assert_eq!(b["date-sec"], a.date_sec, "{out}");
        assert_eq!(b["date-nsec"], a.date_nsec, "{out}");
        assert_eq!(b["vm-state-size"], a.vm_state_size, "{out}");
        assert_eq!(b["icount"], a.icount.unwrap_or(0), "{out}");
    }
}

fn our_view(img: &Path, name: &str) -> Vec<u8> {
    let mut q = open_file(
        img,
        OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        },
    );
    let view = q.snapshot_view(name).unwrap().expect("snapshot exists");
    let mut buf = vec![0xEE; view.size() as usize];
    q.read_snapshot(&view, 0, &mut buf).unwrap();
    buf
}

fn rw(img: &Path) -> Qcow2<FileDisk> {
    open_file(img, OpenOptions::default())
}

#[test]
fn qemu_snapshots_and_ours_interoperate() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    let p = img.to_str().unwrap();
    qemu_create(&img, "cluster_size=4096,refcount_bits=16", 8 << 20);
    qemu_ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 1 0 300k",
            "-c",
            "write -c -P 7 2M 64k",
            "-c",
            "write -z 4M 64k",
            p,
        ],
    );
    qemu_ok("qemu-img", &["snapshot", "-c", "q1", p]);
    let q1 = qemu_raw(dir.path(), &img);

    // Ours next to QEMU's: listed alike, check clean, both read as before.
    let mut q = rw(&img);
    q.write(100 << 10, &[2u8; 200 << 10]).unwrap();
    let sn = q.snapshot_create("ours", 1_700_000_000, 123_000).unwrap();
    assert_eq!((sn.id.as_str(), sn.disk_size), ("2", 8 << 20));
    q.write(0, &[3u8; 8192]).unwrap();
    q.write_zeroes(2 << 20, 4096, true).unwrap();
    let list = q.snapshots().unwrap();
    q.close().unwrap();
    assert_qemu_clean(&img);
    assert_list_eq_qemu(&list, &img);
    let listing = qemu_ok("qemu-img", &["snapshot", "-l", p]);
    assert!(
        listing.contains("ours") && listing.contains("q1"),
        "{listing}"
    );
    assert_eq!(qemu_snapshot_raw(dir.path(), &img, "q1"), q1);
    assert_eq!(our_view(&img, "q1"), q1);
    let ours = qemu_snapshot_raw(dir.path(), &img, "ours");
    assert_eq!(our_view(&img, "2"), ours);
    assert_eq!(&ours[100 << 10..300 << 10], &[2u8; 200 << 10][..]);
    assert_eq!(ours[2 << 20], 7);

    // QEMU writes and snapshots on top of ours.
    qemu_ok("qemu-io", &["-f", "qcow2", "-c", "write -P 9 1M 1M", p]);
    qemu_ok("qemu-img", &["snapshot", "-c", "q2", p]);
    let active = qemu_raw(dir.path(), &img);
    assert_qemu_clean(&img);

    // Delete QEMU's first snapshot, apply ours, delete QEMU's second.
    let mut q = rw(&img);
    q.snapshot_delete("q1").unwrap();
    q.close().unwrap();
    assert_qemu_clean(&img);
    assert_eq!(qemu_snapshot_raw(dir.path(), &img, "ours"), ours);
    assert_eq!(qemu_snapshot_raw(dir.path(), &img, "q2"), active);

    let mut q = rw(&img);
    q.snapshot_apply("ours").unwrap();
    let mut now = vec![0u8; 8 << 20];
    q.read(0, &mut now).unwrap();
    assert!(now == ours, "after apply the disk reads as the snapshot");
    // Writes after an apply copy shared clusters: the snapshot keeps its data.
    q.write(150 << 10, &[4u8; 4096]).unwrap();
    q.snapshot_delete("q2").unwrap();
    q.close().unwrap();
    assert_qemu_clean(&img);
    assert_eq!(qemu_snapshot_raw(dir.path(), &img, "ours"), ours);
    assert_eq!(qemu_raw(dir.path(), &img)[150 << 10], 4);
    let report = rw(&img).check().unwrap();
    assert!(report.is_clean(), "{report}");
    assert_summary_eq_qemu(&report, &qemu_check_json(&img));

    // Deleting the last snapshot frees everything only it used.
    let mut q = rw(&img);
    q.snapshot_delete("ours").unwrap();
    assert!(q.snapshots().unwrap().is_empty());
    q.close().unwrap();
    assert_qemu_clean(&img);
    let json = qemu_check_json(&img);
    let report = rw(&img).check().unwrap();
    assert_summary_eq_qemu(&report, &json);
}

#[test]
fn refusals_say_why() {
    let mut q = mem_image(1 << 20, 4096, 1);
    let e = q.snapshot_create("s", 0, 0).unwrap_err().to_string();
    assert!(e.contains("refcount_bits"), "{e}");
    let mut q = mem_image(1 << 20, 4096, 16);
    q.snapshot_create("s", 0, 0).unwrap();
    let e = q.snapshot_create("s", 0, 0).unwrap_err().to_string();
    assert!(e.contains("exists already"), "{e}");
    assert!(q.snapshot_delete("nope").is_err());
    assert!(q.snapshot_apply("nope").is_err());
    assert!(q.snapshot_view("nope").unwrap().is_none());
    // 2-bit refcounts hold three references: the third snapshot overflows, cleanly.
    let mut q = mem_image(1 << 20, 4096, 2);
    q.write(0, &[1; 4096]).unwrap();
    q.snapshot_create("a", 0, 0).unwrap();
    q.snapshot_create("b", 0, 0).unwrap();
    let e = q.snapshot_create("c", 0, 0).unwrap_err().to_string();
    assert!(e.contains("overflow"), "{e}");
}

#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, len: u64, seed: u8 },
    Zero { off: u64, len: u64, unmap: bool },
    Discard { off: u64, len: u64 },
    Create,
    Apply(usize),
    Delete(usize),
    Reopen,
}

fn op(size: u64, cs: u64) -> impl Strategy<Value = Op> {
    let range =
        move || (0..size, 1..=cs * 3).prop_map(move |(off, len)| (off, len.min(size - off)));
    prop_oneof![
        6 => (range(), any::<u8>()).prop_map(|((off, len), seed)| Op::Write { off, len, seed }),
        1 => (range(), any::<bool>()).prop_map(|((off, len), unmap)| Op::Zero { off, len, unmap }),
        1 => range().prop_map(|(off, len)| Op::Discard { off, len }),
        2 => Just(Op::Create),
        1 => any::<usize>().prop_map(Op::Apply),
        1 => any::<usize>().prop_map(Op::Delete),
        1 => Just(Op::Reopen),
    ]
}

const SIZE: u64 = 256 << 10;

fn run(cs: u64, lazy: bool, ops: &[Op]) {
    let opts = small_cache();
    let mut q = Qcow2::create(
        MemDisk::growable(),
        &CreateOptions {
            virtual_size: SIZE,
            cluster_size: cs,
            refcount_bits: 16,
            lazy_refcounts: lazy,
            open: opts.clone(),
            ..CreateOptions::default()
        },
    )
    .unwrap();
    let mut model = vec![0u8; SIZE as usize];
    // (name, contents) of each live snapshot.
    let mut snaps: Vec<(String, Vec<u8>)> = Vec::new();
    let mut next = 0;
    for o in ops {
        match *o {
            Op::Write { off, len, seed } => {
                let data = pattern(len, seed);
                q.write(off, &data).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            Op::Zero { off, len, unmap } => {
                q.write_zeroes(off, len, unmap).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            Op::Discard { off, len } => {
                q.discard(off, len).unwrap();
                let (a, b) = discarded(off, len, cs, SIZE);
                model[a as usize..b as usize].fill(0);
            }
            Op::Create => {
                next += 1;
                let name = format!("s{next}");
                q.snapshot_create(&name, next, 0).unwrap();
                snaps.push((name, model.clone()));
            }
            Op::Apply(i) if !snaps.is_empty() => {
                let (name, data) = &snaps[i % snaps.len()];
                q.snapshot_apply(name).unwrap();
                model = data.clone();
            }
            Op::Delete(i) if !snaps.is_empty() => {
                let (name, _) = snaps.remove(i % snaps.len());
                q.snapshot_delete(&name).unwrap();
            }
            Op::Reopen => {
                let dev = q.close().unwrap();
                q = Qcow2::open(dev, opts.clone()).unwrap();
            }
            _ => {}
        }
    }
    let mut all = vec![0u8; SIZE as usize];
    q.read(0, &mut all).unwrap();
    assert!(all == model, "active state differs from the model");
    for (name, data) in &snaps {
        let view = q.snapshot_view(name).unwrap().unwrap();
        q.read_snapshot(&view, 0, &mut all).unwrap();
        assert!(all == *data, "snapshot {name} differs from the model");
    }
    let report = q.check().unwrap();
    assert!(report.is_clean(), "our check: {report}");
    let dev = q.close().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.qcow2");
    save(&dev, &img);
    assert_qemu_clean(&img);
    assert_qemu_compare(dir.path(), &img, &model, "active state");
    for (name, data) in &snaps {
        assert!(
            qemu_snapshot_raw(dir.path(), &img, name) == *data,
            "qemu-img convert -l {name} differs from the model"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn random_ops_with_snapshots(
        ops in proptest::collection::vec(op(SIZE, 4096), 1..40),
        lazy in any::<bool>(),
        big in any::<bool>(),
    ) {
        let _ = &ops;
        run(if big { 65536 } else { 4096 }, lazy, &ops);
    }
}
