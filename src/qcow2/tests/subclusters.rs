//! Extended L2 entries (subclusters): the per-subcluster states QEMU writes read, map and
//! report as QEMU sees them; our writes allocate and zero single subclusters; images we
//! create with them open in QEMU's tools.

use super::util::*;
use crate::block::FileDisk;
use crate::disk::{Allocation, VirtualDisk};
use crate::qcow2::{ClusterKind, CreateOptions, Mapping, OpenOptions, Qcow2};
use std::path::Path;

const SIZE: u64 = 4 << 20;

/// What each 512-byte sector is, as `qemu-img map --output=json` says: 'D' data, 'Z'
/// allocated zeros, 'H' a hole (unallocated, reads as zeros).
fn qemu_sector_kinds(img: &Path, size: u64) -> Vec<u8> {
    let out = qemu_ok(
        "qemu-img",
        &["map", "--output=json", "-f", "qcow2", img.to_str().unwrap()],
    );
    let mut kinds = vec![b'?'; (size / 512) as usize];
    for line in out.lines().filter(|l| l.contains("\"start\"")) {
        let start = json_u64(line, "start");
        let len = json_u64(line, "length");
        let k = if line.contains("\"data\": true") {
            b'D'
        } else if line.contains("\"present\": true") {
            b'Z'
        } else {
            b'H'
        };
        kinds[(start / 512) as usize..((start + len) / 512) as usize].fill(k);
    }
    kinds
}

/// The same from our block status.
fn our_sector_kinds<D: crate::block::BlockDevice>(q: &mut Qcow2<D>, size: u64) -> Vec<u8> {
    let mut kinds = Vec::new();
    let mut pos = 0;
    while pos < size {
        let e = q.block_status(pos, size - pos).unwrap();
        assert!(e.len > 0 && e.len % 512 == 0, "{e:?} at {pos}");
        let k = match e.kind {
            Allocation::Data => b'D',
            Allocation::Zero => b'Z',
            _ => b'H',
        };
        kinds.extend(std::iter::repeat_n(k, (e.len / 512) as usize));
        pos += e.len;
    }
    kinds
}

/// One 64 KiB cluster with data, zero and unallocated subclusters (2 KiB each), written by
/// qemu-io: reads, block status and `image map` equal QEMU's view.
#[test]
fn mixed_subclusters_read_and_map_as_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("x.qcow2");
    qemu_create(&img, "cluster_size=65536,extended_l2=on", SIZE);
    qemu_io_image(
        &img,
        &[
            "write -P 0x11 2048 2048",   // subcluster 1: data
            "write -z 8192 4096",        // subclusters 4-5: zero
            "write -P 0x22 20000 100",   // subcluster 9: data, completed with zeros
            "write -P 0x33 65536 65536", // the next cluster whole
            "write -z 67584 2048",       // ... its subcluster 1 zeroed again
            "write -z 262144 65536",     // a whole zero cluster
            "write -P 0x44 264192 512",  // ... one sector of it data again
        ],
    );
    let model = qemu_raw(dir.path(), &img);
    let mut q = open_file(&img, read_only());
    let mut ours = vec![0u8; SIZE as usize];
    q.read(0, &mut ours).unwrap();
    assert!(ours == model, "our read differs from qemu-img convert");
    // Odd-sized reads across subcluster edges.
    for (off, len) in [
        (1000u64, 5000u64),
        (20001, 3),
        (65535, 4099),
        (262143, 3000),
    ] {
        let mut b = vec![0u8; len as usize];
        q.read(off, &mut b).unwrap();
        assert!(
            b == model[off as usize..(off + len) as usize],
            "{off}+{len}"
        );
    }
    match q.mapping(0).unwrap() {
        Mapping::Subclusters { alloc, zero, .. } => {
            assert_eq!(alloc, 1 << 1 | 1 << 9, "allocation bitmap");
            assert_eq!(zero, 0b11 << 4, "zero bitmap");
        }
        m => panic!("cluster 0 should have mixed subclusters: {m:?}"),
    }
    assert_eq!(
        our_sector_kinds(&mut q, SIZE),
        qemu_sector_kinds(&img, SIZE)
    );
    let map = q.map().unwrap();
    assert!(
        map.iter()
            .any(|e| e.offset == 2048 && e.len == 2048 && e.kind == ClusterKind::Data),
        "{map:?}"
    );
    let rep = q.check().unwrap();
    assert!(rep.is_clean(), "{rep}");
    assert_summary_eq_qemu(&rep, &qemu_check_json(&img));
}

/// Our partial writes allocate only the subclusters they touch (completing partial ones
/// with zeros), write-zeroes sets zero bits, and QEMU agrees with the result.
#[test]
fn our_writes_allocate_single_subclusters() {
    for cs in [16384u64, 65536, 2 << 20] {
        let sub = cs / 32;
        let size = (8 * cs).max(SIZE);
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("ours.qcow2");
        let mut q = Qcow2::create(
            FileDisk::create(&img).unwrap(),
            &CreateOptions {
                virtual_size: size,
                cluster_size: cs,
                extended_l2: true,
                ..CreateOptions::default()
            },
        )
        .unwrap();
        let mut model = vec![0u8; size as usize];
        let put = |q: &mut Qcow2<FileDisk>, model: &mut Vec<u8>, off: u64, data: &[u8]| {
            q.write(off, data).unwrap();
            model[off as usize..off as usize + data.len()].copy_from_slice(data);
        };
        // Half of subcluster 3, in its middle: only it is allocated, padded with zeros.
        put(
            &mut q,
            &mut model,
            3 * sub + sub / 4,
            &vec![0xa1; (sub / 2) as usize],
        );
        let cow = q.stats().cow_bytes;
        assert_eq!(cow, sub / 2, "only the rest of one subcluster is padded");
        assert_eq!(
            q.mapping(0).unwrap(),
            Mapping::Subclusters {
                host: q.mapping(0).unwrap().host_cluster(),
                copied: true,
                alloc: 1 << 3,
                zero: 0
            }
        );
        // A write over subclusters 2..=4 (partial at both ends) in place.
        put(
            &mut q,
            &mut model,
            2 * sub + 7,
            &vec![0xa2; (2 * sub) as usize],
        );
        // Write-zeroes of whole subclusters 3-5 (data and unallocated) and a part of 2.
        q.write_zeroes(2 * sub + 100, 4 * sub - 100, false).unwrap();
        model[(2 * sub + 100) as usize..(6 * sub) as usize].fill(0);
        match q.mapping(0).unwrap() {
            Mapping::Subclusters { alloc, zero, .. } => {
                assert_eq!(alloc, 1 << 2, "subcluster 2 keeps its data");
                assert_eq!(zero, 0b111 << 3, "subclusters 3-5 are zero");
            }
            m => panic!("{m:?}"),
        }
        // The last subcluster of a cluster and the first of the next.
        put(&mut q, &mut model, 2 * cs - 300, &[0xa3; 600]);
        // Whole-cluster writes over a cluster with subclusters and a fresh one.
        put(&mut q, &mut model, 4 * cs, &vec![0xa4; (2 * cs) as usize]);
        put(&mut q, &mut model, 4 * cs + sub, &[0xa5; 512]);
        assert!(matches!(q.mapping(4).unwrap(), Mapping::Data { .. }));
        let mut all = vec![0u8; size as usize];
        q.read(0, &mut all).unwrap();
        assert!(all == model, "cs {cs}: our read differs from the model");
        let rep = q.check().unwrap();
        assert!(rep.is_clean(), "{rep}");
        q.close().unwrap();
        assert_qemu_clean(&img);
        assert_qemu_compare(dir.path(), &img, &model, "after our subcluster writes");
        let info = qemu_ok(
            "qemu-img",
            &["info", "--output=json", img.to_str().unwrap()],
        );
        assert!(info.contains("\"extended-l2\": true"), "{info}");
        let mut q = open_file(&img, OpenOptions::default());
        assert_eq!(
            our_sector_kinds(&mut q, size),
            qemu_sector_kinds(&img, size),
            "cs {cs}"
        );
    }
}

/// Subclusters are refused below 16 KiB clusters, as QEMU refuses to create them.
#[test]
fn small_clusters_refuse_extended_l2() {
    let r = Qcow2::create(
        crate::block::MemDisk::growable(),
        &CreateOptions {
            virtual_size: SIZE,
            cluster_size: 8192,
            extended_l2: true,
            ..CreateOptions::default()
        },
    );
    assert!(r.is_err());
}
