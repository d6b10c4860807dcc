//! What the fuzz targets (`fuzz/`) found in the engine, kept as tests.

use super::util::{assert_qemu_clean, json_u64, mem_image, qemu_check_json, qemu_ok, save};
use crate::block::MemDisk;
use crate::disk::VirtualDisk;
use crate::qcow2::{OpenOptions, Qcow2};

fn get64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// Fuzz target `image` (a mutated QEMU image, 2 KiB clusters): two L2 tables of the active L1
/// point at the same three data clusters (the second table's entries lie past the virtual
/// size). The repair counts both references (refcount 2, COPIED cleared), as
/// `qemu-img check -r all` does, and the image is then clean for both checks. A write copies
/// one of the shared clusters; the other entry keeps the cluster at refcount 1 without
/// COPIED, which both checks report as a corruption: QEMU's own write leaves exactly the
/// same (so the fuzz target accepts this one message after a repair and a write). It is
/// harmless (the next write there copies again), the data is intact, and a second repair
/// makes the image clean for both checks.
#[test]
fn clusters_shared_by_active_tables_after_repair_and_write() {
    const CS: u64 = 2048;
    let size = (1 << 20) + 1024; // L1[2] covers the last KiB only
    let mut q = mem_image(size, CS, 16);
    q.write(526336, &[0x11; 6144]).unwrap(); // entries 1..=3 of the table of L1[1]
    q.write(1 << 20, &[0x22; 1024]).unwrap(); // a table for L1[2]
    let mut b = q.close().unwrap().into_bytes();
    let l1 = get64(&b, 40) as usize;
    let t1 = (get64(&b, l1 + 8) & 0x00ff_ffff_ffff_fe00) as usize;
    let t2 = (get64(&b, l1 + 16) & 0x00ff_ffff_ffff_fe00) as usize;
    for i in 1..=3 {
        let e = b[t1 + 8 * i..t1 + 8 * i + 8].to_vec();
        b[t2 + 8 * (226 + i)..t2 + 8 * (227 + i)].copy_from_slice(&e);
    }
    let repair = OpenOptions {
        repair: true,
        ..OpenOptions::default()
    };
    let mut q = Qcow2::open(MemDisk::from_bytes(b, false), repair.clone()).unwrap();
    let found = q.check().unwrap();
    assert_eq!(found.corruptions, 3, "{found}");
    assert!(q.repair().unwrap().is_clean());
    assert!(q.check().unwrap().is_clean());
    let repaired = q.close().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let ours = dir.path().join("ours.qcow2");
    let theirs = dir.path().join("theirs.qcow2");
    save(&repaired, &ours);
    save(&repaired, &theirs);
    assert_qemu_clean(&ours);

    // Our write and QEMU's write of the same bytes leave the same single report.
    let mut q = Qcow2::open(repaired, OpenOptions::default()).unwrap();
    q.write(524544, &[0x5a; 3000]).unwrap();
    q.flush().unwrap();
    let after = q.check().unwrap();
    assert_eq!(after.corruptions, 1, "{after}");
    assert_eq!((after.leaks, after.check_errors), (0, 0), "{after}");
    assert!(
        after.messages[0].contains("OFLAG_COPIED") && after.messages[0].ends_with("refcount=1"),
        "{after}"
    );
    qemu_ok(
        "qemu-io",
        &["-c", "write -P 0x5a 524544 3000", theirs.to_str().unwrap()],
    );
    let json = qemu_check_json(&theirs);
    assert_eq!(json_u64(&json, "corruptions"), 1, "qemu-img check: {json}");

    // A second repair fixes it; the data is intact.
    let mut q = Qcow2::open(q.close().unwrap(), repair).unwrap();
    assert!(q.repair().unwrap().is_clean());
    let mut back = vec![0u8; 8192];
    q.read(524288, &mut back).unwrap();
    assert!(back[..256].iter().all(|&x| x == 0));
    assert!(back[256..3256].iter().all(|&x| x == 0x5a));
    assert!(back[3256..].iter().all(|&x| x == 0x11));
    save(&q.close().unwrap(), &ours);
    assert_qemu_clean(&ours);
}

/// Fuzz target `image` (`fuzz/regressions/image-flush-after-repair.qcow2`, 4 KiB clusters on
/// a fixed device that ends 2 bytes into the cluster holding the only L2 table): the table
/// reads as zeros past the end, so check and repair find nothing to fix there, and a write
/// that changed it was accepted and then failed at flush (EIO). A write that would change a
/// table the device cannot hold is refused at once (ENOSPC) and changes nothing.
#[test]
fn a_write_into_an_l2_table_past_a_fixed_device_end_is_refused() {
    let data = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fuzz/regressions/image-flush-after-repair.qcow2"
    ))
    .unwrap();
    let mut bytes = data.clone();
    bytes.resize(data.len() + (256 << 10), 0);
    let repair = OpenOptions {
        repair: true,
        ..OpenOptions::default()
    };
    let mut q = Qcow2::open(MemDisk::from_bytes(bytes, true), repair).unwrap();
    assert!(q.repair().unwrap().is_clean());
    let off = q.size() / 2;
    let mut before = vec![0u8; 3000];
    q.read(off, &mut before).unwrap();
    let e = q.write(off, &[0x5a; 3000]).unwrap_err();
    assert!(e.to_string().contains("space"), "{e}");
    q.flush().unwrap();
    let mut after = vec![0u8; 3000];
    q.read(off, &mut after).unwrap();
    assert_eq!(before, after);
    assert!(q.check().unwrap().is_clean());
}
