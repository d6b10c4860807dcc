//! `qcow-metal image snapshot` and `image info --backing-chain` as commands, against QEMU's
//! tools on the same images:
//! - `image snapshot -c|-a|-d|-l` on an image that also holds a snapshot made by
//!   `qemu-img snapshot -c`: `-l` prints what `qemu-img snapshot -l` prints (dates in UTC),
//!   each snapshot reads as it was (`qemu-img convert -l`), applying one makes the disk read
//!   as it, deleting one frees its clusters, and `qemu-img check` is clean after every step.
//! - `image info --backing-chain` on a chain of depth 3 (qcow2 over qcow2 over raw) names
//!   the same layers in the same order, with the same formats, sizes and backing files, as
//!   `qemu-img info --backing-chain`.

use std::path::Path;
use std::process::Command;

mod common;
use common::{RUNNER, ok, qcow2_to_raw, run};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `qcow-metal ARGS...`, which must succeed; returns its standard output.
fn ours(args: &[&str]) -> String {
    ok(RUNNER, args)
}

/// `qemu-img create -q -f qcow2 OPTIONS... PATH SIZE`.
fn create(path: &Path, options: &[&str], size: &str) {
    let head = ["create", "-q", "-f", "qcow2"];
    ok("qemu-img", &[&head[..], options, &[s(path), size]].concat());
}

/// `qemu-img check` exits 0 (no corruption, no leak).
fn assert_clean(img: &Path, when: &str) {
    let o = run("qemu-img", &["check", "-f", "qcow2", s(img)]);
    assert!(
        o.status.success(),
        "{when}: qemu-img check: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The bytes of snapshot `name` as QEMU reads them (`qemu-img convert -l`).
fn snapshot_bytes(img: &Path, name: &str) -> Vec<u8> {
    let raw = img.with_extension(format!("{name}.raw"));
    let args = ["convert", "-l", name, "-f", "qcow2", "-O", "raw"];
    ok("qemu-img", &[&args[..], &[s(img), s(&raw)]].concat());
    std::fs::read(&raw).unwrap()
}

/// The active disk's bytes as QEMU reads them.
fn disk_bytes(img: &Path) -> Vec<u8> {
    let raw = img.with_extension("active.raw");
    qcow2_to_raw(img, &raw);
    std::fs::read(&raw).unwrap()
}

/// `qemu-img snapshot -l`, dates in UTC (as ours prints them).
fn qemu_list(img: &Path) -> String {
    let o = Command::new("qemu-img")
        .env("TZ", "UTC")
        .args(["snapshot", "-l", s(img)])
        .output()
        .expect("cannot run qemu-img: install the Debian package qemu-utils");
    assert!(o.status.success(), "{o:?}");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn qemu_io(img: &Path, cmd: &str) {
    let out = ok("qemu-io", &["-f", "qcow2", "-c", cmd, s(img)]);
    assert!(!out.contains("failed"), "{out}");
}

#[test]
fn image_snapshot_works_like_qemu_img_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    create(&img, &["-o", "cluster_size=4096"], "4M");
    qemu_io(&img, "write -P 0x11 0 1M");
    ours(&["image", "snapshot", "-c", "s1", s(&img)]);
    assert_clean(&img, "after our -c s1");
    qemu_io(&img, "write -P 0x22 512k 1M");
    let s1 = snapshot_bytes(&img, "s1");
    assert!(s1[..1 << 20].iter().all(|&b| b == 0x11) && s1[1 << 20..].iter().all(|&b| b == 0));
    // One of QEMU's own beside ours, then more writes over what both share.
    ok("qemu-img", &["snapshot", "-c", "q1", s(&img)]);
    let q1 = disk_bytes(&img);
    ours(&["image", "snapshot", "-c", "s2", s(&img)]);
    qemu_io(&img, "write -P 0x33 0 2M");
    assert_clean(&img, "after writes over shared clusters");
    // -l: QEMU's listing, line for line.
    let list = ours(&["image", "snapshot", "-l", s(&img)]);
    assert_eq!(list, qemu_list(&img));
    for tag in ["s1", "q1", "s2"] {
        assert!(list.contains(&format!(" {tag} ")), "{list}");
    }
    assert!(snapshot_bytes(&img, "s1") == s1, "s1 changed");
    assert!(
        snapshot_bytes(&img, "s2") == q1,
        "s2 differs from the disk it was taken of"
    );
    // -a: the disk reads as the snapshot; QEMU's snapshot applied by us too.
    ours(&["image", "snapshot", "-a", "s1", s(&img)]);
    assert_clean(&img, "after our -a s1");
    assert!(disk_bytes(&img) == s1, "the disk after -a s1");
    ours(&["image", "snapshot", "-a", "q1", s(&img)]);
    assert!(disk_bytes(&img) == q1, "the disk after -a q1");
    // -d: gone from QEMU's listing, its clusters freed (no leaks), the others intact.
    ours(&["image", "snapshot", "-d", "s1", s(&img)]);
    assert_clean(&img, "after our -d s1");
    let list = qemu_list(&img);
    assert!(!list.contains(" s1 ") && list.contains(" q1 "), "{list}");
    assert!(snapshot_bytes(&img, "s2") == q1, "s2 after deleting s1");
    ours(&["image", "snapshot", "-d", "q1", s(&img)]);
    ours(&["image", "snapshot", "-d", "s2", s(&img)]);
    assert_clean(&img, "after deleting every snapshot");
    assert_eq!(ours(&["image", "snapshot", "-l", s(&img)]), qemu_list(&img));
    assert!(
        disk_bytes(&img) == q1,
        "the disk after deleting every snapshot"
    );
}

/// The values of `key:` lines of an `info` listing, in order (file names only for `image:`
/// and `backing file:`, which QEMU prints as paths of its own making, the latter followed
/// by ` (actual path: ...)`).
fn values(info: &str, key: &str) -> Vec<String> {
    info.lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}:")))
        .map(|v| {
            let v = v.trim().split(" (actual path:").next().unwrap();
            match key {
                "image" | "backing file" => v.rsplit('/').next().unwrap().to_string(),
                _ => v.to_string(),
            }
        })
        .collect()
}

#[test]
fn image_info_backing_chain_names_the_layers_as_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("base.raw"), vec![0x5au8; 3 << 20]).unwrap();
    create(&d.join("mid.qcow2"), &["-b", "base.raw", "-F", "raw"], "5M");
    create(
        &d.join("top.qcow2"),
        &["-b", "mid.qcow2", "-F", "qcow2"],
        "8M",
    );
    let top = d.join("top.qcow2");
    let ours = ours(&["image", "info", "--backing-chain", s(&top)]);
    let qemu = ok("qemu-img", &["info", "--backing-chain", s(&top)]);
    for key in [
        "image",
        "file format",
        "virtual size",
        "backing file",
        "backing file format",
    ] {
        assert_eq!(
            values(&ours, key),
            values(&qemu, key),
            "{key}:\n{ours}\n{qemu}"
        );
    }
    assert_eq!(
        values(&ours, "image"),
        ["top.qcow2", "mid.qcow2", "base.raw"]
    );
}
