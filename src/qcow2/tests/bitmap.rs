//! Persistent dirty bitmaps against QEMU: images with bitmaps made by `qemu-img bitmap
//! --add`, written by our engine; afterwards `qemu-img check` is clean (bitmap clusters
//! counted, none leaked) and `qemu-nbd -B NAME` + `nbdinfo --map=qemu:dirty-bitmap:NAME`
//! show exactly the ranges we changed. A session cut short leaves the bitmaps in use.

use super::util::*;
use crate::block::FileDisk;
use crate::disk::VirtualDisk;
use crate::qcow2::{OpenOptions, Qcow2};
use std::path::Path;
use std::process::Command;

/// `nbdinfo --map=qemu:dirty-bitmap:NAME` over `qemu-nbd -r -B NAME IMG` (socket
/// activation): the dirty runs as (offset, length), merged.
pub(crate) fn qemu_dirty_runs(img: &Path, name: &str) -> Vec<(u64, u64)> {
    let out = match Command::new("nbdinfo")
        .arg(format!("--map=qemu:dirty-bitmap:{name}"))
        .args(["--", "[", "qemu-nbd", "-r", "-f", "qcow2", "-B", name])
        .arg(img)
        .arg("]")
        .output()
    {
        Ok(o) => o,
        Err(e) => panic!("cannot run nbdinfo ({e}): install the Debian package `libnbd-bin`"),
    };
    assert!(
        out.status.success(),
        "nbdinfo/qemu-nbd -B {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_dirty_map(&String::from_utf8_lossy(&out.stdout))
}

/// The dirty runs of `nbdinfo --map` output lines `offset length flags description`.
pub(crate) fn parse_dirty_map(text: &str) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 3 || f[2] != "1" {
            continue;
        }
        let (off, len): (u64, u64) = (f[0].parse().unwrap(), f[1].parse().unwrap());
        match runs.last_mut() {
            Some(last) if last.0 + last.1 == off => last.1 += len,
            _ => runs.push((off, len)),
        }
    }
    runs
}

/// The `flags` of bitmap `name` in `qemu-img info -U --output=json`.
fn qemu_bitmap_flags(img: &Path, name: &str) -> Vec<String> {
    let out = qemu_ok(
        "qemu-img",
        &[
            "info",
            "-U",
            "--output=json",
            "-f",
            "qcow2",
            img.to_str().unwrap(),
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let list = v["format-specific"]["data"]["bitmaps"].as_array().unwrap();
    let bm = list
        .iter()
        .find(|b| b["name"] == name)
        .expect("bitmap listed");
    bm["flags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_string())
        .collect()
}

/// Our own view of a bitmap's dirty runs, through [`Qcow2::bitmap_status`].
fn our_dirty_runs<D: crate::block::BlockDevice>(q: &Qcow2<D>, name: &str) -> Vec<(u64, u64)> {
    let size = q.header().size;
    let mut runs = Vec::new();
    let mut off = 0;
    while off < size {
        let (dirty, n) = q.bitmap_status(name, off, size - off).unwrap();
        if dirty {
            runs.push((off, n));
        }
        off += n;
    }
    runs
}

fn image_with_bitmaps(dir: &Path, cluster: &str) -> std::path::PathBuf {
    let img = dir.join("bm.qcow2");
    let p = img.to_str().unwrap();
    qemu_create(&img, &format!("cluster_size={cluster}"), 16 << 20);
    qemu_ok("qemu-io", &["-f", "qcow2", "-c", "write -P 1 0 1M", p]);
    qemu_ok("qemu-img", &["bitmap", "--add", "-g", "64K", p, "b0"]);
    qemu_ok(
        "qemu-img",
        &["bitmap", "--add", "-g", "128K", "--disable", p, "off"],
    );
    qemu_ok("qemu-img", &["bitmap", "--add", "-g", "4K", p, "fine"]);
    // Something dirty from QEMU's side first, in a data cluster of its own.
    qemu_ok("qemu-io", &["-f", "qcow2", "-c", "write -P 2 12M 4k", p]);
    img
}

#[test]
fn writes_zeroes_and_discards_are_recorded_as_qemu_reads_them() {
    for cluster in ["65536", "4096"] {
        let dir = tempfile::tempdir().unwrap();
        let img = image_with_bitmaps(dir.path(), cluster);
        assert_eq!(qemu_dirty_runs(&img, "b0"), vec![(12 << 20, 64 << 10)]);
        let mut q = open_file(&img, OpenOptions::default());
        assert_eq!(q.bitmaps().len(), 3);
        assert!(q.bitmaps().iter().all(|b| b.readable && !b.in_use));
        // A write far from anything dirty: marks in use at once, on disk.
        q.write((3 << 20) + 100, &[5u8; 5000]).unwrap();
        assert_eq!(qemu_bitmap_flags(&img, "b0"), ["in-use", "auto"]);
        assert_eq!(qemu_bitmap_flags(&img, "off"), Vec::<String>::new());
        q.write_zeroes(5 << 20, 64 << 10, true).unwrap();
        q.discard(8 << 20, 192 << 10).unwrap();
        q.write((16 << 20) - 1, &[9]).unwrap();
        let want_b0 = vec![
            (3 << 20, 64 << 10),
            (5 << 20, 64 << 10),
            (8 << 20, 192 << 10),
            (12 << 20, 64 << 10),
            ((16 << 20) - (64 << 10), 64 << 10),
        ];
        let want_fine = vec![
            (3 << 20, 8 << 10),
            (5 << 20, 64 << 10),
            (8 << 20, 192 << 10),
            (12 << 20, 4 << 10),
            ((16 << 20) - 4096, 4096),
        ];
        assert_eq!(our_dirty_runs(&q, "b0"), want_b0);
        assert_eq!(our_dirty_runs(&q, "fine"), want_fine);
        assert_eq!(our_dirty_runs(&q, "off"), vec![]);
        q.close().unwrap();

        assert_qemu_clean(&img);
        assert_eq!(qemu_bitmap_flags(&img, "b0"), ["auto"]);
        assert_eq!(qemu_dirty_runs(&img, "b0"), want_b0);
        assert_eq!(qemu_dirty_runs(&img, "fine"), want_fine);
        assert_eq!(qemu_dirty_runs(&img, "off"), vec![]);
        let report = open_file(&img, OpenOptions::default()).check().unwrap();
        assert!(report.is_clean(), "{report}");
        assert_summary_eq_qemu(&report, &qemu_check_json(&img));

        // A second session adds to it; QEMU then writes and removes a bitmap: all clean.
        let mut q = open_file(&img, OpenOptions::default());
        q.write(1 << 20, &[7u8; 4096]).unwrap();
        q.close().unwrap();
        let mut want = want_b0.clone();
        want.insert(0, (1 << 20, 64 << 10));
        assert_eq!(qemu_dirty_runs(&img, "b0"), want);
        let p = img.to_str().unwrap();
        qemu_ok("qemu-io", &["-f", "qcow2", "-c", "write -P 3 2M 4k", p]);
        qemu_ok("qemu-img", &["bitmap", "--remove", p, "fine"]);
        assert_qemu_clean(&img);
        want.insert(1, (2 << 20, 64 << 10));
        assert_eq!(qemu_dirty_runs(&img, "b0"), want);
    }
}

#[test]
fn a_session_cut_short_leaves_the_bitmaps_in_use_and_the_image_clean() {
    let dir = tempfile::tempdir().unwrap();
    let img = image_with_bitmaps(dir.path(), "65536");
    let mut q = open_file(&img, OpenOptions::default());
    q.write(4 << 20, &[1u8; 4096]).unwrap();
    q.flush().unwrap();
    drop(q); // no close: as a power cut after the flush
    assert_eq!(qemu_bitmap_flags(&img, "b0"), ["in-use", "auto"]);
    assert_qemu_clean(&img);
    // Reopened: the inconsistent bitmap is left alone (not readable, still in use), the
    // consistent ones work as before.
    let mut q = open_file(&img, OpenOptions::default());
    let b0 = q.bitmaps().into_iter().find(|b| b.name == "b0").unwrap();
    assert!(b0.in_use && !b0.readable);
    q.write(6 << 20, &[1u8; 4096]).unwrap();
    q.close().unwrap();
    assert_eq!(qemu_bitmap_flags(&img, "b0"), ["in-use", "auto"]);
    assert_qemu_clean(&img);
    // QEMU can still remove it.
    qemu_ok(
        "qemu-img",
        &["bitmap", "--remove", img.to_str().unwrap(), "b0"],
    );
    assert_qemu_clean(&img);
}

#[test]
fn read_only_sessions_and_snapshot_apply() {
    let dir = tempfile::tempdir().unwrap();
    let img = image_with_bitmaps(dir.path(), "65536");
    let mut q = Qcow2::open(
        FileDisk::open(&img, true).unwrap(),
        OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    assert_eq!(our_dirty_runs(&q, "b0"), vec![(12 << 20, 64 << 10)]);
    assert!(q.write(0, &[1]).is_err());
    drop(q);
    assert_eq!(qemu_bitmap_flags(&img, "b0"), ["auto"]);
    // A snapshot apply changes the whole disk: every bit of the enabled bitmaps is set.
    let mut q = open_file(&img, OpenOptions::default());
    q.snapshot_create("s", 0, 0).unwrap();
    q.snapshot_apply("s").unwrap();
    q.close().unwrap();
    assert_qemu_clean(&img);
    assert_eq!(qemu_dirty_runs(&img, "b0"), vec![(0, 16 << 20)]);
    assert_eq!(qemu_dirty_runs(&img, "off"), vec![]);
}

/// `nbdinfo ARGS`: its stdout (fails the test naming the package when missing).
fn nbdinfo(args: &[&str]) -> String {
    let out = match Command::new("nbdinfo").args(args).output() {
        Ok(o) => o,
        Err(e) => panic!("cannot run nbdinfo ({e}): install the Debian package `libnbd-bin`"),
    };
    assert!(
        out.status.success(),
        "nbdinfo {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn nbd_exports_snapshots_and_dirty_bitmap_contexts() {
    use crate::nbd::ServerConfig;
    use crate::nbd::host::HostServer;
    let dir = tempfile::tempdir().unwrap();
    let img = image_with_bitmaps(dir.path(), "65536");
    let p = img.to_str().unwrap();
    qemu_ok("qemu-img", &["snapshot", "-c", "s1", p]);
    let s1 = {
        let raw = dir.path().join("s1.raw");
        qemu_ok(
            "qemu-img",
            &["convert", "-l", "s1", "-O", "raw", p, raw.to_str().unwrap()],
        );
        std::fs::read(&raw).unwrap()
    };
    let server = HostServer::start(
        open_file(&img, OpenOptions::default()),
        ServerConfig::named("disk"),
    )
    .unwrap();
    let list = nbdinfo(&["--list", &server.uri("")]);
    assert!(
        list.contains("export=\"disk\"") && list.contains("export=\"disk@s1\""),
        "{list}"
    );
    assert!(list.contains("qemu:dirty-bitmap:b0"), "{list}");
    // The snapshot's export reads as QEMU reads the snapshot, and refuses writes.
    let out = dir.path().join("via-nbd.raw");
    qemu_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &server.uri("disk@s1"),
            out.to_str().unwrap(),
        ],
    );
    assert!(
        std::fs::read(&out).unwrap() == s1,
        "disk@s1 differs from qemu-img convert -l s1"
    );
    let o = qemu(
        "qemu-io",
        &["-f", "raw", "-c", "write 0 4k", &server.uri("disk@s1")],
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("failed") || !o.status.success());
    // Writes over NBD show in the dirty-bitmap context, as qemu-nbd would show them.
    qemu_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 4 3M 4k",
            "-c",
            "write -z 7M 128k",
            &server.uri("disk"),
        ],
    );
    let want = vec![
        (3 << 20, 64 << 10),
        (7 << 20, 128 << 10),
        (12 << 20, 64 << 10),
    ];
    let map = nbdinfo(&["--map=qemu:dirty-bitmap:b0", &server.uri("disk")]);
    assert_eq!(parse_dirty_map(&map), want, "{map}");
    let map = nbdinfo(&["--map=qemu:dirty-bitmap:off", &server.uri("disk")]);
    assert_eq!(parse_dirty_map(&map), vec![], "{map}");
    // Stored at shutdown: QEMU agrees and finds the image clean.
    server.disk.lock().unwrap().store_bitmaps().unwrap();
    server.disk.lock().unwrap().flush().unwrap();
    assert_qemu_clean(&img);
    assert_eq!(qemu_dirty_runs(&img, "b0"), want);
    assert!(qemu_raw(dir.path(), &img)[3 << 20] == 4);
}

#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, len: u64 },
    Zero { off: u64, len: u64, unmap: bool },
    Discard { off: u64, len: u64 },
    Flush,
    Reopen,
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    const SIZE: u64 = 16 << 20;
    let range = || (0..SIZE, 1..=300_000u64).prop_map(|(off, len)| (off, len.min(SIZE - off)));
    prop_oneof![
        4 => range().prop_map(|(off, len)| Op::Write { off, len }),
        1 => (range(), any::<bool>()).prop_map(|((off, len), unmap)| Op::Zero { off, len, unmap }),
        1 => range().prop_map(|(off, len)| Op::Discard { off, len }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ]
}

/// Sets the model's granules (of `1 << g` bytes) that `len` bytes at `off` touch.
fn touch(model: &mut [bool], g: u32, off: u64, len: u64) {
    for i in off >> g..=(off + len - 1) >> g {
        model[i as usize] = true;
    }
}

/// The dirty runs a model of granules gives, merged.
fn model_runs(model: &[bool], g: u32) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (i, _) in model.iter().enumerate().filter(|(_, d)| **d) {
        let off = (i as u64) << g;
        match runs.last_mut() {
            Some(last) if last.0 + last.1 == off => last.1 += 1 << g,
            _ => runs.push((off, 1 << g)),
        }
    }
    runs
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig {
        cases: 12,
        failure_persistence: None,
        ..Default::default()
    })]
    /// Random writes, write-zeroes, discards, flushes and reopens: the bitmaps QEMU reads
    /// afterwards are exactly the granules touched (plus QEMU's own write before), the
    /// image checks clean and `qemu-img compare` finds it equal to a model of the data.
    #[test]
    fn random_ops_are_recorded_exactly(ops in proptest::collection::vec(op(), 1..24)) {
        let dir = tempfile::tempdir().unwrap();
        let img = image_with_bitmaps(dir.path(), "65536");
        let mut model = qemu_raw(dir.path(), &img);
        let mut b0 = vec![false; 256];
        let mut fine = vec![false; 4096];
        touch(&mut b0, 16, 12 << 20, 4096);
        touch(&mut fine, 12, 12 << 20, 4096);
        let mut q = open_file(&img, OpenOptions::default());
        for (k, o) in ops.iter().enumerate() {
            let (off, len) = match *o {
                Op::Write { off, len } => {
                    let data = vec![0x40 + k as u8; len as usize];
                    q.write(off, &data).unwrap();
                    model[off as usize..(off + len) as usize].copy_from_slice(&data);
                    (off, len)
                }
                Op::Zero { off, len, unmap } => {
                    q.write_zeroes(off, len, unmap).unwrap();
                    model[off as usize..(off + len) as usize].fill(0);
                    (off, len)
                }
                Op::Discard { off, len } => {
                    q.discard(off, len).unwrap();
                    // No backing file: the whole clusters inside the range read as zeros.
                    let (a, b) = super::model::discarded(off, len, 65536, model.len() as u64);
                    model[a as usize..b as usize].fill(0);
                    (off, len)
                }
                Op::Flush => {
                    q.flush().unwrap();
                    continue;
                }
                Op::Reopen => {
                    q.close().unwrap();
                    q = open_file(&img, OpenOptions::default());
                    continue;
                }
            };
            touch(&mut b0, 16, off, len);
            touch(&mut fine, 12, off, len);
        }
        assert_eq!(our_dirty_runs(&q, "b0"), model_runs(&b0, 16));
        q.close().unwrap();
        assert_qemu_clean(&img);
        assert_qemu_compare(dir.path(), &img, &model, "after random operations");
        assert_eq!(qemu_dirty_runs(&img, "b0"), model_runs(&b0, 16));
        assert_eq!(qemu_dirty_runs(&img, "fine"), model_runs(&fine, 12));
        assert_eq!(qemu_dirty_runs(&img, "off"), vec![]);
    }
}
