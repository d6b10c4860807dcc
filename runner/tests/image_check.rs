//! `qcow-metal image check [--repair]` as a command: on a truncated image (tables and data
//! past the end of the file) it exits as `qemu-img check` does, prints QEMU's lines, and
//! after `--repair` both checkers agree.

use std::path::Path;
use std::process::Command;

mod common;
use common::run;

/// `qemu-img check -f qcow2`: exit status and stdout + stderr.
fn qemu_check(path: &Path) -> (i32, String) {
    let o = run(
        "qemu-img",
        &["check", "-f", "qcow2", path.to_str().unwrap()],
    );
    (
        o.status.code().expect("qemu-img exit status"),
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr),
    )
}

/// `qcow-metal image check [--repair]`: exit status and stdout + stderr.
fn ours(path: &Path, repair: bool) -> (i32, String) {
    let mut args = vec!["image", "check", path.to_str().unwrap()];
    if repair {
        args.push("--repair");
    }
    let o = Command::new(env!("CARGO_BIN_EXE_qcow-metal"))
        .args(&args)
        .output()
        .expect("run qcow-metal");
    (
        o.status.code().expect("qcow-metal exit status"),
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr),
    )
}

/// A 64 MiB image with 64 KiB clusters and 1.3 MiB of data written by qemu-io.
fn image(dir: &Path) -> Vec<u8> {
    let p = dir.join("full.qcow2");
    let ps = p.to_str().unwrap();
    let o = run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=65536",
            ps,
            "64M",
        ],
    );
    assert!(o.status.success(), "{o:?}");
    let o = run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "write -P 0xcd 10M 300k",
            ps,
        ],
    );
    assert!(o.status.success(), "{o:?}");
    std::fs::read(&p).unwrap()
}

#[test]
fn truncated_image_exits_like_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = image(dir.path());
    let cut = dir.path().join("t.qcow2");
    // `head -c 327680`: the L1 and L2 tables are there, the data clusters past 0x50000 not.
    std::fs::write(&cut, &bytes[..327680]).unwrap();
    let (qc, qout) = qemu_check(&cut);
    let (oc, oout) = ours(&cut, false);
    assert_eq!(qc, 2, "qemu-img check: {qout}");
    assert_eq!(oc, qc, "ours: {oout}\nqemu-img: {qout}");
    let line = "ERROR: counting reference for region exceeding the end of the file by one \
                cluster or more: offset 0x150000 size 0x10000";
    assert!(qout.contains(line) && oout.contains(line), "{oout}");
    assert!(
        oout.contains("21 errors were found on the image."),
        "{oout}"
    );
    assert!(oout.contains("Image end offset: 327680"), "{oout}");
    // Line for line: qemu-img's messages (stderr) then its summary (stdout).
    let o = run("qemu-img", &["check", "-f", "qcow2", cut.to_str().unwrap()]);
    let qemu_text =
        String::from_utf8_lossy(&o.stderr).into_owned() + &String::from_utf8_lossy(&o.stdout);
    assert_eq!(oout, qemu_text);

    // --repair keeps the references past the end, as `qemu-img check -r all` does: both
    // exit 2 afterwards, and both checkers agree on the repaired file.
    let (rc, rout) = ours(&cut, true);
    assert_eq!(rc, 2, "{rout}");
    let (qc, qout) = qemu_check(&cut);
    let (oc, oout) = ours(&cut, false);
    assert_eq!((oc, qc), (2, 2), "ours: {oout}\nqemu-img: {qout}");

    // The refcount block outside the file: both find the corruption. QEMU's repair fails
    // here (its rebuilt refcounts land on the L1 table it did not count); ours puts the
    // block back in the file and counts the tables that brings back: both checkers then
    // find the image clean (the data cut away stays lost: nothing references it now).
    std::fs::write(&cut, &bytes[..131072]).unwrap();
    let (qc, qout) = qemu_check(&cut);
    let (oc, oout) = ours(&cut, false);
    assert_eq!((oc, qc), (2, 2), "ours: {oout}\nqemu-img: {qout}");
    assert!(
        oout.contains("ERROR refcount block 0 is outside image"),
        "{oout}"
    );
    let (rc, rout) = ours(&cut, true);
    assert!(
        rout.contains("Repairing refcount block 0 is outside image"),
        "{rout}"
    );
    assert_eq!(rc, 0, "{rout}");
    let (qc, qout) = qemu_check(&cut);
    let (oc, oout) = ours(&cut, false);
    assert_eq!(
        (oc, qc),
        (0, 0),
        "after our repair: ours {oout}\nqemu-img: {qout}"
    );

    // Cut inside the header: qemu-img cannot open it (exit 1), nor can we.
    std::fs::write(&cut, &bytes[..100]).unwrap();
    let (qc, qout) = qemu_check(&cut);
    let (oc, oout) = ours(&cut, false);
    assert_eq!((oc, qc), (1, 1), "ours: {oout}\nqemu-img: {qout}");
}
