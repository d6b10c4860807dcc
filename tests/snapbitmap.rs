//! Internal snapshots and persistent dirty bitmaps end to end under TCG: the guest serves an
//! image QEMU made with a snapshot and a bitmap. `nbdinfo --list` shows `disk@s1`, reading
//! it gives what `qemu-img convert -l s1` gives, NBD writes show up in
//! `nbdinfo --map=qemu:dirty-bitmap:b0` over the guest's export, and after a clean shutdown
//! `qemu-img check` exits 0 and `qemu-nbd -B b0` on the image reports the same dirty runs.

use qcow_metal_e2e::{
    ScratchDir, boot_serving, guest, nbd_dirty_runs, qemu_img_check_json, qemu_img_convert_to_raw,
    qemu_img_snapshot_raw, qemu_io, qemu_nbd_dirty_runs, require_tool, run_tool, shut_down_cleanly,
};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;

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
    let s1 = qemu_img_snapshot_raw(&img, "s1", &dir.path().join("s1.raw"));

    let (mut g, _) = boot_serving(guest().disk(&img));
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
    assert_eq!(nbd_dirty_runs(&uri, "b0"), want, "over the guest's export");

    shut_down_cleanly(&mut g);
    drop(g);
    let check = qemu_img_check_json(&img);
    assert!(
        check.success,
        "qemu-img check: {}{}",
        check.stdout, check.stderr
    );
    assert_eq!(
        qemu_nbd_dirty_runs(&img, "b0"),
        want,
        "qemu-nbd -B b0 after shutdown"
    );
    assert!(
        qemu_img_snapshot_raw(&img, "s1", &dir.path().join("s1-after.raw")) == s1,
        "the snapshot changed"
    );
}
