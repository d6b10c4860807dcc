//! Devices that end part-way through the image's last cluster: a file made by
//! `qemu-img create` ends inside the L1 table's cluster, and a read-only virtio-blk disk is
//! not extended. Bytes past the device end read as zeros (as QEMU reads a file past its
//! end); a write that would need bytes there to be anything else is refused with
//! `NoSpace` before a byte is written.

use super::util::*;
use crate::block::MemDisk;
use crate::disk::{DiskError, VirtualDisk};
use crate::qcow2::{OpenOptions, Qcow2, Qcow2Error};

const SIZE: u64 = 8 << 20;
const CLUSTERS: [u64; 4] = [512, 4096, 65536, 2 << 20];

fn open_fixed(bytes: Vec<u8>, read_only: bool) -> Result<Qcow2<MemDisk>, Qcow2Error> {
    let mut dev = MemDisk::from_bytes(bytes, true);
    dev.set_read_only(read_only);
    Qcow2::open(
        dev,
        OpenOptions {
            read_only,
            ..OpenOptions::default()
        },
    )
}

fn read_all(q: &mut Qcow2<MemDisk>) -> Vec<u8> {
    let mut got = vec![0u8; SIZE as usize];
    q.read(0, &mut got).expect("read the whole disk");
    got
}

/// A fresh qemu-img image on a device exactly as long as the file (it ends inside the L1
/// table's cluster), and one rounded up to whole sectors as QEMU presents it to a guest.
#[test]
fn fresh_qemu_images_open_on_short_devices() {
    let dir = tempfile::tempdir().unwrap();
    for cs in CLUSTERS {
        let img = dir.path().join(format!("fresh{cs}.qcow2"));
        qemu_create(&img, &format!("cluster_size={cs}"), SIZE);
        let bytes = std::fs::read(&img).unwrap();
        assert!(
            cs == 512 || !(bytes.len() as u64).is_multiple_of(cs),
            "qemu-img made a file of whole clusters ({} bytes, cluster {cs}); the test needs a short one",
            bytes.len()
        );
        let want = qemu_raw(dir.path(), &img);
        let mut padded = bytes.clone();
        padded.resize(bytes.len().div_ceil(512) * 512, 0);
        for dev_bytes in [bytes.clone(), padded] {
            // Read-only.
            let mut q = open_fixed(dev_bytes.clone(), true)
                .unwrap_or_else(|e| panic!("cluster {cs}: read-only open: {e}"));
            assert!(read_all(&mut q) == want, "cluster {cs}: contents differ");
            let rep = q.check().unwrap();
            assert!(rep.is_clean(), "cluster {cs}: {rep}");
            let mut buf = [1u8; 16];
            assert_eq!(q.write(0, &buf), Err(DiskError::ReadOnly));
            q.read(SIZE - 16, &mut buf).unwrap();
            assert_eq!(buf, [0; 16]);

            // Read-write: no whole cluster is free, so a write is refused cleanly and the
            // device keeps its bytes.
            let mut q = open_fixed(dev_bytes.clone(), false)
                .unwrap_or_else(|e| panic!("cluster {cs}: writable open: {e}"));
            assert!(q.check().unwrap().is_clean());
            assert_eq!(
                q.write(cs * 3, &[7u8; 100]),
                Err(DiskError::NoSpace),
                "cluster {cs}"
            );
            assert!(read_all(&mut q) == want, "cluster {cs}: contents changed");
            let rep = q.check().unwrap();
            assert!(rep.is_clean(), "cluster {cs} after NoSpace: {rep}");
            let after = q.close().expect("close").into_bytes();
            assert!(after == dev_bytes, "cluster {cs}: device bytes changed");
        }
    }
}

/// An image whose last data cluster is cut short by the device end: the missing bytes read
/// as zeros; writes inside the device succeed, writes of data past it are refused before
/// anything changes; afterwards QEMU finds the image clean and equal to the model.
#[test]
fn data_cluster_cut_by_the_device_end() {
    let dir = tempfile::tempdir().unwrap();
    for cs in CLUSTERS {
        let img = dir.path().join(format!("data{cs}.qcow2"));
        qemu_create(&img, &format!("cluster_size={cs}"), SIZE);
        qemu_ok(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                "write -P 0x5a 1k 3k",
                img.to_str().unwrap(),
            ],
        );
        let full = std::fs::read(&img).unwrap();
        assert!((full.len() as u64).is_multiple_of(cs));
        // The last host cluster holds guest cluster `g` (data is allocated in guest order).
        let g = 4095 / cs * cs;
        let cut = full.len() - cs as usize / 2;
        std::fs::write(&img, &full[..cut]).unwrap();
        let mut model = qemu_raw(dir.path(), &img);

        let mut q = open_fixed(full[..cut].to_vec(), true).unwrap();
        assert!(
            read_all(&mut q) == model,
            "cluster {cs}: read-only contents differ"
        );
        let rep = q.check().unwrap();
        assert!(rep.is_clean(), "cluster {cs}: {rep}");

        let mut q = open_fixed(full[..cut].to_vec(), false).unwrap();
        // Inside the device: written in place.
        let n = (cs / 4) as usize;
        q.write(g, &vec![0x33; n]).unwrap();
        model[g as usize..g as usize + n].fill(0x33);
        // Across the device end: refused whole.
        let at = g + cs / 2 - 16;
        assert_eq!(q.write(at, &[0x44; 32]), Err(DiskError::NoSpace));
        // Zeros past the end are what is there already: accepted.
        q.write(at, &[0; 32]).unwrap();
        model[at as usize..at as usize + 32].fill(0);
        assert!(read_all(&mut q) == model, "cluster {cs}: contents differ");
        let bytes = q.close().unwrap().into_bytes();
        assert_eq!(bytes.len(), cut);
        std::fs::write(&img, &bytes).unwrap();
        assert_qemu_clean(&img);
        assert!(
            qemu_raw(dir.path(), &img) == model,
            "cluster {cs}: QEMU reads otherwise"
        );
    }
}

/// The L1 table's cluster is cut by the device end and a free whole cluster lies below it:
/// a write allocates its L2 table there and the L1 update reaches the device (only the
/// table's bytes are on it; the rest of the cluster is zeros); the data cluster finds no
/// room (`NoSpace`). The image stays clean for us and for QEMU.
#[test]
fn l1_update_in_a_cut_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("moved.qcow2");
    let cs = 65536u64;
    qemu_create(&img, "cluster_size=65536", SIZE);
    let bytes = std::fs::read(&img).unwrap();
    let be64 =
        |b: &[u8], at: u64| u64::from_be_bytes(b[at as usize..at as usize + 8].try_into().unwrap());
    // QEMU's layout: header, refcount table, refcount block, L1 (8 bytes of it on disk).
    assert_eq!(be64(&bytes, 40), 3 * cs, "L1 offset");
    assert_eq!(be64(&bytes, 48), cs, "refcount table offset");
    assert_eq!(be64(&bytes, cs), 2 * cs, "refcount block offset");
    // Move the L1 table one cluster up, leaving cluster 3 free.
    let mut b = bytes[..3 * cs as usize].to_vec();
    b.resize(4 * cs as usize + 8, 0);
    b[40..48].copy_from_slice(&(4 * cs).to_be_bytes());
    let rb = 2 * cs as usize;
    b[rb + 6..rb + 8].copy_from_slice(&[0, 0]);
    b[rb + 8..rb + 10].copy_from_slice(&[0, 1]);
    std::fs::write(&img, &b).unwrap();
    assert_qemu_clean(&img);

    let mut q = open_fixed(b.clone(), false).unwrap();
    assert_eq!(q.write(5 << 20, &[9u8; 512]), Err(DiskError::NoSpace));
    let rep = q.check().unwrap();
    assert!(rep.is_clean(), "{rep}");
    let after = q.close().unwrap().into_bytes();
    assert_eq!(after.len(), b.len(), "the device did not grow");
    let l1 = be64(&after, 4 * cs);
    assert_eq!(
        l1 & !(1 << 63),
        3 * cs,
        "the L2 table went into the free cluster"
    );
    std::fs::write(&img, &after).unwrap();
    assert_qemu_clean(&img);
    assert!(qemu_raw(dir.path(), &img).iter().all(|&x| x == 0));
}

/// A fresh qemu-img image (64 KiB clusters) whose only refcount block was moved (by byte
/// edits) to a cluster that the fixed device ends 100 bytes into; cluster 2, where the block
/// was, is free. A write needs a new cluster, whose refcount lies in the cut block: it could
/// never be written back, so the write is refused at once with `NoSpace` (it used to be
/// accepted and then fail at flush with EIO). Nothing changes: the image reads as before, a
/// flush succeeds, our check and `qemu-img check` find it clean.
#[test]
fn a_refcount_block_cut_by_a_fixed_device_end_refuses_allocation() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("cut-refblock.qcow2");
    qemu_create(&img, "cluster_size=65536", SIZE);
    let mut bytes = std::fs::read(&img).unwrap();
    let be = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let rt = be(&bytes, 48) as usize;
    let old = be(&bytes, rt) as usize;
    assert_eq!((rt, old), (0x10000, 0x20000), "qemu-img's layout changed");
    let block: Vec<u8> = bytes[old..old + 100].to_vec();
    bytes.resize(0x40000, 0);
    bytes.extend_from_slice(&block);
    // 16-bit refcounts: cluster 2 (the old block) is free, cluster 4 (the new one) used.
    bytes[0x40000 + 4..0x40000 + 6].copy_from_slice(&[0, 0]);
    bytes[0x40000 + 8..0x40000 + 10].copy_from_slice(&[0, 1]);
    bytes[rt..rt + 8].copy_from_slice(&0x40000u64.to_be_bytes());
    bytes[old..old + 0x10000].fill(0);
    std::fs::write(&img, &bytes).unwrap();
    assert_qemu_clean(&img);

    let mut q = open_fixed(bytes.clone(), false).unwrap();
    let before = read_all(&mut q);
    assert_eq!(q.write(4096, &[0x5a; 8192]), Err(DiskError::NoSpace));
    q.flush().unwrap();
    assert_eq!(read_all(&mut q), before);
    assert!(q.check().unwrap().is_clean());
    let disk = q.close().unwrap();
    assert!(
        disk.bytes() == &bytes[..],
        "a refused write changed the device"
    );
    save(&disk, &img);
    assert_qemu_clean(&img);
}
