//! `qcow-metal image compact` as a command, on images QEMU made: most clusters trimmed with
//! `qemu-io discard`, the file shrinks to near its live data, `qemu-img check` is clean and
//! `qemu-img compare` finds the guest disk unchanged.

use std::path::Path;
use std::process::{Command, Output};

mod common;
use common::{ok, qcow2_to_raw, run};

fn ours(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qcow-metal"))
        .args(args)
        .output()
        .expect("run qcow-metal")
}

fn len(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}

/// A 256 MiB image (64 KiB clusters) written over its first 200 MiB by qemu-io, then 150
/// MiB trimmed from the start and every other MiB of the rest up to 180 MiB: about 35 MiB
/// stays live, most of it at the end of the file.
#[test]
fn compact_shrinks_a_trimmed_qemu_image_to_its_live_data() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("t.qcow2");
    let s = img.to_str().unwrap();
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s, "256M"]);
    ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5a 0 200M",
            "-c",
            "write -P 0xa5 7M 3M",
            s,
        ],
    );
    let mut cmds = vec![
        "-f".to_string(),
        "qcow2".into(),
        "-c".into(),
        "discard 0 150M".into(),
    ];
    for m in (150..180).step_by(2) {
        cmds.push("-c".into());
        cmds.push(format!("discard {m}M 1M"));
    }
    cmds.push(s.into());
    let refs: Vec<&str> = cmds.iter().map(|c| c.as_str()).collect();
    ok("qemu-io", &refs);
    let before_raw = dir.path().join("before.raw");
    qcow2_to_raw(&img, &before_raw);
    let old = len(&img);
    assert!(old > 200 << 20, "file {old}");

    let o = ours(&["image", "compact", s]);
    let text =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{text}");
    assert!(
        text.contains("compacted") && text.contains("moved"),
        "{text}"
    );
    let new = len(&img);
    // Live data: 35 MiB; metadata: a few clusters.
    let live = 35u64 << 20;
    assert!(
        new >= live && new <= live + (1 << 20),
        "file {old} -> {new}, live data {live}: {text}"
    );

    // QEMU's tools: clean, same guest disk, and the file ends at QEMU's image end.
    let check = run("qemu-img", &["check", "--output=json", "-f", "qcow2", s]);
    let json = String::from_utf8_lossy(&check.stdout).into_owned();
    assert!(
        check.status.success(),
        "qemu-img check: {json}{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(
        json.contains(&format!("\"image-end-offset\": {new}")),
        "{json}"
    );
    ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            s,
            before_raw.to_str().unwrap(),
        ],
    );
    // Our own check agrees, and a second compaction finds nothing to move.
    let o = ours(&["image", "check", s]);
    assert!(o.status.success(), "{o:?}");
    let o = ours(&["image", "compact", s]);
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success() && text.contains("moved 0 B"), "{text}");
    assert_eq!(len(&img), new);
}

/// A missing file and a file that is not qcow2 are refused with a reason, the file untouched.
#[test]
fn compact_refuses_what_it_cannot_compact() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.qcow2");
    let o = ours(&["image", "compact", missing.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("missing.qcow2"),
        "{o:?}"
    );
    let junk = dir.path().join("junk.qcow2");
    std::fs::write(&junk, vec![7u8; 4096]).unwrap();
    let o = ours(&["image", "compact", junk.to_str().unwrap()]);
    assert!(!o.status.success());
    assert_eq!(
        std::fs::read(&junk).unwrap(),
        vec![7u8; 4096],
        "the file was changed"
    );
}
