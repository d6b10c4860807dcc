//! Metadata write-back writes only the 512-byte sectors of a table that changed: a 4 KiB
//! write into a fresh cluster followed by a flush costs a few metadata sectors, not whole
//! L2 tables and refcount blocks, and the image stays correct for the engine and qemu-img.

use super::util::{Counting, assert_qemu_clean};
use crate::block::MemDisk;
use crate::disk::VirtualDisk;
use crate::qcow2::{CreateOptions, OpenOptions, Qcow2};

const CS: u64 = 64 * 1024;
const SIZE: u64 = 256 << 20;
/// Measured writes (each into a fresh cluster, each followed by a flush).
const N: u64 = 32;

fn image() -> Qcow2<Counting> {
    let q = Qcow2::create(
        MemDisk::growable(),
        &CreateOptions {
            virtual_size: SIZE,
            cluster_size: CS,
            ..CreateOptions::default()
        },
    )
    .unwrap();
    let disk = q.close().unwrap();
    Qcow2::open(Counting::new(disk), OpenOptions::default()).unwrap()
}

#[test]
fn fresh_cluster_writes_write_back_sectors_not_clusters() {
    let mut q = image();
    let mut model = vec![0u8; SIZE as usize];
    // Warm-up: allocates the L2 table (written whole once, it is new) and touches the
    // refcount block.
    q.write(0, &[7u8; 4096]).unwrap();
    model[..4096].fill(7);
    q.flush().unwrap();

    let before = q.device().written;
    let meta_before = q.stats().metadata_bytes_written;
    for k in 1..=N {
        // Spread over the L2 table (different 512-byte sectors of it), one fresh cluster each.
        let off = k * 97 * CS + (k % 16) * 4096;
        let data = vec![(k as u8) | 0x80; 4096];
        q.write(off, &data).unwrap();
        q.flush().unwrap();
        model[off as usize..off as usize + 4096].copy_from_slice(&data);
    }
    let written = q.device().written - before;
    let meta = q.stats().metadata_bytes_written - meta_before;
    assert!(written >= N * 4096, "{written} bytes written");
    let extra = written - N * 4096;
    // Per write: one L2 sector and one refcount sector (a header update at most besides).
    assert!(
        extra <= N * 3 * 512,
        "{extra} bytes written beyond the data for {N} fresh-cluster writes (metadata \
         counted by the engine: {meta})"
    );
    assert!(meta <= N * 3 * 512, "{meta} metadata bytes");
    assert!(
        meta >= N * 2 * 512,
        "{meta} metadata bytes: L2 and refcount updates missing"
    );

    // The partial write-backs left a consistent image with the data in place.
    let mut back = vec![0u8; SIZE as usize];
    q.read(0, &mut back).unwrap();
    assert!(back == model, "data differs from the model");
    let r = q.check().unwrap();
    assert!(r.is_clean(), "{r}");
    let dev = q.close().unwrap();
    let mut q = Qcow2::open(dev, OpenOptions::default()).unwrap();
    q.read(0, &mut back).unwrap();
    assert!(back == model, "data differs from the model after reopening");
    let dev = q.close().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("partial.qcow2");
    std::fs::write(&img, dev.disk.bytes()).unwrap();
    assert_qemu_clean(&img);
}

#[test]
fn new_tables_in_freed_data_clusters_keep_no_stale_bytes() {
    // Junk data clusters are freed, then new L2 tables (one per 512 MiB of a 4 GiB disk)
    // are allocated, possibly into them: a new table is written whole the first time, so
    // none of the junk may show through its entries.
    let q = Qcow2::create(
        MemDisk::growable(),
        &CreateOptions {
            virtual_size: 4 << 30,
            cluster_size: CS,
            ..CreateOptions::default()
        },
    )
    .unwrap();
    let disk = q.close().unwrap();
    let mut q = Qcow2::open(Counting::new(disk), OpenOptions::default()).unwrap();
    for k in 0..8u64 {
        q.write(k * CS, &vec![0xEE; CS as usize]).unwrap();
    }
    q.flush().unwrap();
    q.discard(0, 8 * CS).unwrap();
    q.flush().unwrap();
    let table_span = 512u64 << 20;
    for k in 1..8u64 {
        q.write(k * table_span + 4096, &[0x11; 512]).unwrap();
        q.flush().unwrap();
    }
    let dev = q.close().unwrap();
    let mut q = Qcow2::open(dev, OpenOptions::default()).unwrap();
    let mut back = vec![0u8; CS as usize];
    for k in 0..8u64 {
        q.read(k * table_span, &mut back).unwrap();
        let mut want = vec![0u8; CS as usize];
        if k > 0 {
            want[4096..4608].fill(0x11);
        }
        assert!(back == want, "first cluster of table {k} reads wrong");
        // The rest of each table's range is unallocated and reads as zeros.
        q.read(k * table_span + 300 * CS, &mut back).unwrap();
        assert!(back.iter().all(|&b| b == 0), "table {k}: stale entry");
    }
    let r = q.check().unwrap();
    assert!(r.is_clean(), "{r}");
    let dev = q.close().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("reused.qcow2");
    std::fs::write(&img, dev.disk.bytes()).unwrap();
    assert_qemu_clean(&img);
}
