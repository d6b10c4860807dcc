//! Internal snapshots and persistent dirty bitmaps end to end under TCG: the guest serves an
//! image QEMU made with a snapshot and a bitmap. `nbdinfo --list` shows `disk@s1`, reading
//! it gives what `qemu-img convert -l s1` gives, NBD writes show up in
//! `nbdinfo --map=qemu:dirty-bitmap:b0` over the guest's export, and after a clean shutdown
//! `qemu-img check` exits 0 and `qemu-nbd -B b0` on the image reports the same dirty runs.

use qcow_metal_e2e::{
    ScratchDir, boot, guest, qemu_img_check_json, qemu_img_convert_to_raw, qemu_io, require_tool,
    run_tool, shut_down_cleanly,
};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;

/// The dirty runs (offset, length) of `nbdinfo --map=qemu:dirty-bitmap:...` output, merged.
fn dirty_runs(text: &str) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        assert!(f.len() >= 3, "unexpected nbdinfo --map line: {line}");
        if f[2] != "1" {
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

/// `qemu-img convert -l NAME -O raw IMAGE OUT`: a snapshot's bytes as QEMU reads them.
fn snapshot_raw(image: &str, name: &str, out: &std::path::Path) -> Vec<u8> {
    run_tool(
        "qemu-img",
        "qemu-utils",
        &[
            "convert",
            "-l",
            name,
            "-O",
            "raw",
            image,
            out.to_str().unwrap(),
        ],
    );
    std::fs::read(out).unwrap()
}

#[test]
fn snapshot_export_and_dirty_bitmap_through_the_guest() {
    for (p, pkg) in [
        ("qemu-img", "qemu-utils"),
        ("qemu-io", "qemu-utils"),
        ("qemu-nbd", "qemu-utils"),
        ("nbdinfo", "libnbd-bin"),
    ] {
        require_tool(p, pkg);
    }
    let dir = ScratchDir::new("snapbitmap");
    let img = dir.path().join("disk.qcow2");
    let p = img.to_str().unwrap();
    run_tool(
        "qemu-img",
        "qemu-utils",
        &["create", "-q", "-f", "qcow2", p, &SIZE.to_string()],
    );
    run_tool(
        "qemu-io",
        "qemu-utils",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5a 0 2M",
            "-c",
            "write -P 0x33 6M 1M",
            p,
        ],
    );
    run_tool("qemu-img", "qemu-utils", &["snapshot", "-c", "s1", p]);
    run_tool(
        "qemu-img",
        "qemu-utils",
        &["bitmap", "--add", "-g", "64K", p, "b0"],
    );
    let s1 = snapshot_raw(p, "s1", &dir.path().join("s1.raw"));

    let (mut g, _) = boot(guest().disk(&img));
    let uri = g.nbd_url();
    let snap_uri = format!("{uri}@s1");
    let list = run_tool("nbdinfo", "libnbd-bin", &["--list", &uri]);
    assert!(list.contains("export=\"disk@s1\""), "{list}");
    assert!(list.contains("qemu:dirty-bitmap:b0"), "{list}");

    // Writes to the active disk (over the snapshot's clusters too) leave the snapshot as is.
    qemu_io(
        &uri,
        &[
            "write -P 0x77 1M 8k",
            "write -z 6M 128k",
            "write -P 0x78 10M 4k",
            "flush",
        ],
    );
    let via_nbd = dir.path().join("via-nbd.raw");
    qemu_img_convert_to_raw("raw", &snap_uri, &via_nbd);
    assert!(
        std::fs::read(&via_nbd).unwrap() == s1,
        "disk@s1 over the guest differs from qemu-img convert -l s1"
    );
    let want = vec![(MIB, 64 << 10), (6 * MIB, 128 << 10), (10 * MIB, 64 << 10)];
    let map = run_tool(
        "nbdinfo",
        "libnbd-bin",
        &["--map=qemu:dirty-bitmap:b0", &uri],
    );
    assert_eq!(dirty_runs(&map), want, "{map}");

    shut_down_cleanly(&mut g);
    drop(g);
    let check = qemu_img_check_json(&img);
    assert!(
        check.success,
        "qemu-img check: {}{}",
        check.stdout, check.stderr
    );
    let map = run_tool(
        "nbdinfo",
        "libnbd-bin",
        &[
            "--map=qemu:dirty-bitmap:b0",
            "--",
            "[",
            "qemu-nbd",
            "-r",
            "-f",
            "qcow2",
            "-B",
            "b0",
            p,
            "]",
        ],
    );
    assert_eq!(
        dirty_runs(&map),
        want,
        "qemu-nbd -B b0 after shutdown: {map}"
    );
    assert!(
        snapshot_raw(p, "s1", &dir.path().join("s1-after.raw")) == s1,
        "the snapshot changed"
    );
}
