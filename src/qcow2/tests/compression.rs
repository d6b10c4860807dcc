//! Compression types both ways: zstd images made by QEMU read as `qemu-img convert -O raw`
//! gives them; compressed clusters we write (zlib and zstd, packed into shared host
//! clusters) pass `qemu-img check` and read equal to a model in `qemu-img compare`.

use super::util::*;
use crate::block::FileDisk;
use crate::disk::VirtualDisk;
use crate::qcow2::{
    ClusterCompressor, ClusterKind, CompressionType, CreateOptions, OpenOptions, Qcow2,
};
use std::path::Path;

/// Bytes that compress to roughly `1 - random` of their size (a seeded pattern).
fn mixed(len: usize, seed: u32, random: u32) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(u64::from(seed));
    (0..len)
        .map(|i| {
            if rng.u32(..100) < random {
                rng.u8(..)
            } else {
                (i / 64) as u8
            }
        })
        .collect()
}

/// A QEMU image with zstd compression: `qemu-img create -o compression_type=zstd`, data
/// written with qemu-io, then `qemu-img convert -c` into a zstd image.
fn qemu_zstd(dir: &Path, cluster: u64) -> std::path::PathBuf {
    qemu_compressed(dir, cluster, CompressionType::Zstd)
}

/// A QEMU image with compressed clusters of `kind`: data written with qemu-io (compressed,
/// plain and zero clusters, incompressible bytes), then `qemu-img convert -c` into an image
/// of that compression type.
fn qemu_compressed(dir: &Path, cluster: u64, kind: CompressionType) -> std::path::PathBuf {
    let src = dir.join("src.qcow2");
    let size = 8u64 << 20;
    qemu_create(
        &src,
        &format!("cluster_size={cluster},compression_type={}", kind.name()),
        size,
    );
    let p = src.to_str().unwrap();
    qemu_ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0xab 0 65536",
            "-c",
            "write -P 0x12 1000 3000",
            "-c",
            "write -P 0x34 3145728 1048577",
            "-c",
            "write -z 5242880 131072",
            "-c",
            "write -c -P 0x77 6291456 2097152",
            p,
        ],
    );
    // Incompressible bytes too: those clusters stay uncompressed.
    let noise = dir.join("noise.raw");
    std::fs::write(&noise, mixed(1 << 20, 7, 100)).unwrap();
    qemu_ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            &format!("write -s {} 1048576 1048576", noise.to_str().unwrap()),
            p,
        ],
    );
    let img = dir.join("z.qcow2");
    qemu_ok(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-f",
            "qcow2",
            "-O",
            "qcow2",
            "-o",
            &format!("cluster_size={cluster},compression_type={}", kind.name()),
            p,
            img.to_str().unwrap(),
        ],
    );
    img
}

/// Random writes (plain and compressed), write-zeroes, discards, flushes and reopens over an
/// image QEMU compressed: reads follow a model throughout, and at the end our check,
/// `qemu-img check` and `qemu-img compare` agree with it.
fn random_ops_on_qemu_compressed(kind: CompressionType, cluster: u64, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let img = qemu_compressed(dir.path(), cluster, kind);
    let mut model = qemu_raw(dir.path(), &img);
    let size = model.len() as u64;
    let mut q = open_file(&img, small_cache());
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut cc = ClusterCompressor::new(kind);
    for step in 0..160u32 {
        let off = rng.u64(..size);
        let len = 1 + rng.u64(..(size - off).min(200_000));
        let (o, l) = (off as usize, len as usize);
        match rng.u32(..10) {
            0..=3 => {
                let data = mixed(l, step, rng.u32(..60));
                q.write(off, &data).unwrap();
                model[o..o + l].copy_from_slice(&data);
            }
            4 => {
                let at = off / cluster * cluster;
                let n = cluster.min(size - at) as usize;
                let data = mixed(n, step, 20);
                q.write_cluster_compressed(at, &data, &mut cc).unwrap();
                model[at as usize..at as usize + n].copy_from_slice(&data);
            }
            5 | 6 => {
                q.write_zeroes(off, len, rng.bool()).unwrap();
                model[o..o + l].fill(0);
            }
            7 | 8 => {
                q.discard(off, len).unwrap();
                let (a, b) = super::model::discarded(off, len, cluster, size);
                model[a as usize..b as usize].fill(0);
            }
            _ => q.flush().unwrap(),
        }
        if step % 40 == 39 {
            assert!(read_all(&mut q) == model, "step {step}: reads differ");
            q.close().unwrap();
            q = open_file(&img, small_cache());
        }
    }
    assert!(read_all(&mut q) == model, "reads differ before close");
    let rep = q.check().unwrap();
    assert!(rep.is_clean(), "our check: {rep}");
    q.close().unwrap();
    assert_qemu_clean(&img);
    assert_qemu_compare(dir.path(), &img, &model, "after random operations");
}

#[test]
fn random_ops_on_qemu_zlib_64k() {
    random_ops_on_qemu_compressed(CompressionType::Zlib, 65536, 0x2_1b);
}

#[test]
fn random_ops_on_qemu_zstd_4k() {
    random_ops_on_qemu_compressed(CompressionType::Zstd, 4096, 0x25_7d);
}

fn read_all(q: &mut Qcow2<FileDisk>) -> Vec<u8> {
    let mut out = vec![0u8; q.size() as usize];
    q.read(0, &mut out).unwrap();
    out
}

fn qemu_zstd_reads_as_qemu(cluster: u64) {
    let dir = tempfile::tempdir().unwrap();
    let img = qemu_zstd(dir.path(), cluster);
    let model = qemu_raw(dir.path(), &img);
    let mut q = open_file(&img, read_only());
    assert_eq!(
        q.header().compression_type().unwrap(),
        CompressionType::Zstd
    );
    let map = q.map().unwrap();
    assert!(
        map.iter().any(|m| m.kind == ClusterKind::Compressed),
        "qemu-img convert -c made no compressed clusters"
    );
    assert!(
        read_all(&mut q) == model,
        "zstd image reads differently from qemu-img convert -O raw"
    );
    assert!(q.check().unwrap().is_clean());
    drop(q);
    // Writable: our writes over compressed clusters (copy-on-write out of them), then a
    // few compressed writes of our own in zstd.
    let mut q = open_file(&img, small_cache());
    let mut model = model;
    let cs = cluster as usize;
    q.write(100, &[0xe1; 5000]).unwrap();
    model[100..5100].fill(0xe1);
    let mut zc = ClusterCompressor::new(CompressionType::Zstd);
    for k in 0..(2 << 20) / cs {
        let off = (6 << 20) + k * cs;
        let data = mixed(cs, k as u32, 30);
        q.write_cluster_compressed(off as u64, &data, &mut zc)
            .unwrap();
        model[off..off + cs].copy_from_slice(&data);
    }
    q.close().unwrap();
    assert_qemu_clean(&img);
    assert_qemu_compare(dir.path(), &img, &model, "zstd image after our writes");
}

#[test]
fn qemu_zstd_512() {
    qemu_zstd_reads_as_qemu(512);
}

#[test]
fn qemu_zstd_64k() {
    qemu_zstd_reads_as_qemu(65536);
}

#[test]
fn qemu_zstd_2m() {
    qemu_zstd_reads_as_qemu(2 << 20);
}

/// Our compressed writes into a fresh image: compressible, half-compressible and
/// incompressible clusters (stored uncompressed), a short last cluster, overwrites of
/// compressed clusters (compressed and plain), then `qemu-img check` and `compare`.
fn our_compressed(kind: CompressionType, cluster: u64, refcount_bits: u32) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("ours.qcow2");
    // Not a multiple of the cluster size: the last cluster is short.
    let size = if cluster >= 1 << 20 { 12 } else { 40 } * cluster + 1536;
    let dev = FileDisk::create(&img).unwrap();
    let mut q = Qcow2::create(
        dev,
        &CreateOptions {
            virtual_size: size,
            cluster_size: cluster,
            refcount_bits,
            compression_type: kind,
            open: small_cache(),
            ..CreateOptions::default()
        },
    )
    .unwrap();
    assert_eq!(q.header().compression_type().unwrap(), kind);
    let mut model = vec![0u8; size as usize];
    let cs = cluster as usize;
    let mut cc = ClusterCompressor::new(kind);
    let clusters = size.div_ceil(cluster) as usize;
    for k in 0..clusters {
        let random = [0, 20, 50, 100][k % 4];
        let off = k * cs;
        let len = cs.min(size as usize - off);
        let data = mixed(len, k as u32, random);
        q.write_cluster_compressed(off as u64, &data, &mut cc)
            .unwrap();
        model[off..off + len].copy_from_slice(&data);
    }
    let compressed = q
        .map()
        .unwrap()
        .iter()
        .filter(|m| m.kind == ClusterKind::Compressed)
        .count();
    assert!(compressed > 0, "no compressed clusters written");
    if refcount_bits > 1 {
        // Packed: some host cluster holds more than one compressed cluster.
        let mut hosts: Vec<u64> = q
            .map()
            .unwrap()
            .iter()
            .filter(|m| m.kind == ClusterKind::Compressed)
            .filter_map(|m| m.host.map(|h| h / cluster))
            .collect();
        let n = hosts.len();
        hosts.dedup();
        assert!(hosts.len() < n, "no host cluster is shared: {hosts:?}");
    }
    // Overwrites: compressed over compressed, plain over compressed, partial.
    for k in [1usize, 2, 5] {
        let data = mixed(cs, 1000 + k as u32, 10);
        q.write_cluster_compressed((k * cs) as u64, &data, &mut cc)
            .unwrap();
        model[k * cs..(k + 1) * cs].copy_from_slice(&data);
    }
    q.write((6 * cs + 7) as u64, &[0x5e; 300]).unwrap();
    model[6 * cs + 7..6 * cs + 307].fill(0x5e);
    q.discard((9 * cs) as u64, cluster).unwrap();
    model[9 * cs..10 * cs].fill(0);
    assert!(
        read_all(&mut q) == model,
        "our read of our compressed image"
    );
    assert_space_kept(&mut q);
    let rep = q.check().unwrap();
    assert!(rep.is_clean(), "our check: {rep}");
    q.close().unwrap();
    assert_qemu_clean(&img);
    assert_qemu_compare(dir.path(), &img, &model, "our compressed image");
    let info = qemu_ok("qemu-img", &["info", img.to_str().unwrap()]);
    assert!(
        info.contains(&format!("compression type: {}", kind.name())),
        "{info}"
    );
    // Reopened, the engine reads it back too.
    let mut q = open_file(&img, OpenOptions::default());
    assert!(read_all(&mut q) == model);
}

#[test]
fn zlib_compressed_writes_4k() {
    our_compressed(CompressionType::Zlib, 4096, 16);
}

#[test]
fn zlib_compressed_writes_512_refcount_1() {
    // One reference per host cluster at most: no packing.
    our_compressed(CompressionType::Zlib, 512, 1);
}

#[test]
fn zlib_compressed_writes_64k_refcount_2() {
    our_compressed(CompressionType::Zlib, 65536, 2);
}

#[test]
fn zstd_compressed_writes_64k() {
    our_compressed(CompressionType::Zstd, 65536, 16);
}

#[test]
fn zstd_compressed_writes_2m() {
    our_compressed(CompressionType::Zstd, 2 << 20, 64);
}

#[test]
fn unknown_compression_type_is_refused_by_name() {
    let mut q = mem_image(1 << 20, 65536, 16);
    let mut cc = ClusterCompressor::new(CompressionType::Zlib);
    q.write_cluster_compressed(0, &mixed(65536, 1, 10), &mut cc)
        .unwrap();
    let mut bytes = q.close().unwrap().into_bytes();
    // Byte 104 names the type; 2 is not one, with or without incompatible bit 3.
    bytes[104] = 2;
    let dev = crate::block::MemDisk::from_bytes(bytes.clone(), false);
    let err = Qcow2::open(dev, OpenOptions::default()).err().unwrap();
    let text = err.to_string();
    assert!(text.contains("unknown compression type"), "{text}");
    assert!(text.contains("zlib") && text.contains("zstd"), "{text}");
    // zstd without its incompatible bit is refused too.
    bytes[104] = 1;
    let dev = crate::block::MemDisk::from_bytes(bytes, false);
    let text = Qcow2::open(dev, OpenOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(text.contains("incompatible bit 3"), "{text}");
}

#[test]
fn compressor_declines_what_does_not_shrink() {
    for kind in [CompressionType::Zlib, CompressionType::Zstd] {
        let mut cc = ClusterCompressor::new(kind);
        let mut out = Vec::new();
        assert!(!cc.compress(&mixed(4096, 3, 100), &mut out), "{kind:?}");
        assert!(cc.compress(&[0u8; 4096], &mut out), "{kind:?}");
        assert!(out.len() < 200, "{kind:?}: {}", out.len());
    }
}
