//! Interoperability with QEMU: images made by `qemu-img create` and filled by `qemu-io`
//! read exactly as `qemu-img convert -O raw` gives them; after our writes `qemu-img check`
//! is clean and `qemu-img compare` matches the same writes applied to the raw copy. Images
//! we create are opened by QEMU's tools the other way round.

use super::util::*;
use crate::block::FileDisk;
use crate::disk::VirtualDisk;
use crate::qcow2::{CreateOptions, OpenOptions, Qcow2};
use std::path::Path;

const SIZE: u64 = 16 << 20;

struct Config {
    cluster: u64,
    refcount_bits: u32,
    compat: &'static str,
    lazy: bool,
    prealloc: bool,
    snapshot: bool,
    /// Extended L2 entries (subclusters), with subcluster-sized writes by qemu-io.
    extended: bool,
}

fn qemu_image(dir: &Path, c: &Config) -> std::path::PathBuf {
    let img = dir.join("q.qcow2");
    let mut o = format!(
        "cluster_size={},refcount_bits={},compat={}",
        c.cluster, c.refcount_bits, c.compat
    );
    if c.lazy {
        o.push_str(",lazy_refcounts=on");
    }
    if c.prealloc {
        o.push_str(",preallocation=metadata");
    }
    if c.extended {
        o.push_str(",extended_l2=on");
    }
    qemu_create(&img, &o, SIZE);
    let p = img.to_str().unwrap();
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
            "write -P 0x34 5242880 1048577",
            "-c",
            "write -P 0x56 16773120 4096",
            "-c",
            "write -z 9437184 131072",
            "-c",
            "write -P 0x78 12582912 2097152",
            "-c",
            "discard 13631488 524288",
            p,
        ],
    );
    if c.extended {
        // Clusters whose subclusters are in mixed states: data, zero and unallocated side
        // by side, partial subclusters, and zeroes over data.
        let sub = c.cluster / 32;
        let at = |cluster: u64, subcluster: u64| (2 << 20) + cluster * c.cluster + subcluster * sub;
        let cmds = [
            format!("write -P 0x61 {} {}", at(0, 1), sub),
            format!("write -z {} {}", at(0, 3), 2 * sub),
            format!("write -P 0x62 {} {}", at(0, 7) + 100, sub / 2),
            format!("write -P 0x63 {} {}", at(1, 0), 4 * sub),
            format!("write -z {} {}", at(1, 1), sub),
            format!("write -P 0x64 {} {}", at(2, 31), sub + 512),
            format!("write -z {} {}", at(4, 0), c.cluster),
            format!("write -P 0x65 {} {}", at(4, 5), 512),
            format!("write -z -u {} {}", at(5, 8), 3 * sub),
            format!("discard {} {}", at(1, 2), c.cluster),
        ];
        let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
        qemu_io_image(&img, &cmds);
    }
    if c.snapshot {
        qemu_ok("qemu-img", &["snapshot", "-c", "snap1", p]);
        qemu_ok(
            "qemu-io",
            &["-f", "qcow2", "-c", "write -P 0x9a 3000 70000", p],
        );
    }
    img
}

/// Our writes, applied to the image and to the raw model alike.
fn our_writes(q: &mut Qcow2<FileDisk>, model: &mut [u8], cs: u64) {
    let writes: [(u64, u64, u8); 7] = [
        (500, 70000, 0xc1),
        (5242880 + 100, 10, 0xc2),
        (9437184 + 4096, 8192, 0xc3),
        (12582912 + 1048576, 1048576, 0xc4),
        (16 * 1024 * 1024 - 700, 700, 0xc5),
        (7 << 20, 2 * cs + 77, 0xc6),
        (3 << 20, 1, 0xc7),
    ];
    for (off, len, v) in writes {
        let data = vec![v; len as usize];
        q.write(off, &data).unwrap();
        model[off as usize..(off + len) as usize].fill(v);
    }
    // Whole-cluster discard and zeroes, partial zeroes.
    let d = (4 << 20) / cs * cs;
    q.write(d, &vec![0xd1; 3 * cs as usize]).unwrap();
    q.discard(d, cs).unwrap();
    model[d as usize..(d + cs) as usize].fill(0);
    model[(d + cs) as usize..(d + 3 * cs) as usize].fill(0xd1);
    q.write_zeroes(d + cs, cs, false).unwrap();
    q.write_zeroes(d + 2 * cs + 1, 100, true).unwrap();
    model[(d + cs) as usize..(d + 2 * cs) as usize].fill(0);
    model[(d + 2 * cs + 1) as usize..(d + 2 * cs + 101) as usize].fill(0);
    q.write_zeroes(0, 65536, true).unwrap();
    model[..65536].fill(0);
    q.flush().unwrap();
}

fn interop(c: Config) {
    let dir = tempfile::tempdir().unwrap();
    let img = qemu_image(dir.path(), &c);
    let mut model = qemu_raw(dir.path(), &img);
    assert_eq!(model.len() as u64, SIZE);
    // Read-only: every byte as QEMU sees it.
    let mut q = open_file(&img, read_only());
    let mut ours = vec![0u8; SIZE as usize];
    q.read(0, &mut ours).unwrap();
    assert!(ours == model, "our read differs from qemu-img convert");
    let rep = q.check().unwrap();
    assert!(rep.is_clean(), "our check of a QEMU image: {rep}");
    drop(q);
    // Read-write with small caches (eviction) and our writes.
    let mut q = open_file(&img, small_cache());
    q.space().unwrap();
    our_writes(&mut q, &mut model, c.cluster);
    assert_space_kept(&mut q);
    let rep = q.check().unwrap();
    assert!(rep.is_clean(), "our check after our writes: {rep}");
    q.close().unwrap();
    assert_qemu_clean(&img);
    assert_qemu_compare(
        dir.path(),
        &img,
        &model,
        "qemu-img compare after our writes",
    );
    // And our engine reads it back too, and sums it up as QEMU does.
    let mut q = open_file(&img, OpenOptions::default());
    q.read(0, &mut ours).unwrap();
    assert!(ours == model, "re-read differs from the model");
    let r = q.check().unwrap();
    assert_summary_eq_qemu(&r, &qemu_check_json(&img));
}

fn cfg(cluster: u64, refcount_bits: u32, compat: &'static str) -> Config {
    Config {
        cluster,
        refcount_bits,
        compat,
        lazy: false,
        prealloc: false,
        snapshot: false,
        extended: false,
    }
}

fn ext(cluster: u64, refcount_bits: u32) -> Config {
    Config {
        extended: true,
        ..cfg(cluster, refcount_bits, "1.1")
    }
}

#[test]
fn qemu_ext_16k_rc16() {
    interop(ext(16384, 16));
}

#[test]
fn qemu_ext_32k_rc1_lazy() {
    interop(Config {
        lazy: true,
        ..ext(32768, 1)
    });
}

#[test]
fn qemu_ext_64k_rc64_prealloc() {
    interop(Config {
        prealloc: true,
        ..ext(65536, 64)
    });
}

#[test]
fn qemu_ext_64k_snapshot_cow() {
    interop(Config {
        snapshot: true,
        ..ext(65536, 16)
    });
}

#[test]
fn qemu_ext_512k_rc8() {
    interop(ext(512 << 10, 8));
}

#[test]
fn qemu_ext_2m_rc16() {
    interop(ext(2 << 20, 16));
}

#[test]
fn qemu_512_rc1() {
    interop(cfg(512, 1, "1.1"));
}

#[test]
fn qemu_512_rc16_v2() {
    interop(cfg(512, 16, "0.10"));
}

#[test]
fn qemu_512_rc64() {
    interop(cfg(512, 64, "1.1"));
}

#[test]
fn qemu_4k_rc16() {
    interop(cfg(4096, 16, "1.1"));
}

#[test]
fn qemu_4k_rc1_lazy() {
    interop(Config {
        lazy: true,
        ..cfg(4096, 1, "1.1")
    });
}

#[test]
fn qemu_4k_v2_prealloc() {
    interop(Config {
        prealloc: true,
        ..cfg(4096, 16, "0.10")
    });
}

#[test]
fn qemu_64k_rc16_v2() {
    interop(cfg(65536, 16, "0.10"));
}

#[test]
fn qemu_64k_rc64_prealloc() {
    interop(Config {
        prealloc: true,
        ..cfg(65536, 64, "1.1")
    });
}

#[test]
fn qemu_64k_rc16_lazy_prealloc() {
    interop(Config {
        lazy: true,
        prealloc: true,
        ..cfg(65536, 16, "1.1")
    });
}

#[test]
fn qemu_64k_snapshot_cow() {
    interop(Config {
        snapshot: true,
        ..cfg(65536, 16, "1.1")
    });
}

#[test]
fn qemu_512_snapshot_cow_v2() {
    interop(Config {
        snapshot: true,
        ..cfg(512, 16, "0.10")
    });
}

#[test]
fn qemu_2m_rc16() {
    interop(cfg(2 << 20, 16, "1.1"));
}

#[test]
fn qemu_2m_rc1_prealloc() {
    interop(Config {
        prealloc: true,
        ..cfg(2 << 20, 1, "1.1")
    });
}

#[test]
fn qemu_2m_rc64_v2_lazy_off() {
    interop(cfg(2 << 20, 64, "1.1"));
}

/// Images we create are valid for QEMU: `qemu-img check`, `info` and `qemu-io` reads.
#[test]
fn our_images_open_in_qemu() {
    for (cs, rb) in [(512u64, 1u32), (4096, 16), (65536, 64), (2 << 20, 8)] {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("ours.qcow2");
        let dev = FileDisk::create(&img).unwrap();
        let mut q = Qcow2::create(
            dev,
            &CreateOptions {
                virtual_size: SIZE,
                cluster_size: cs,
                refcount_bits: rb,
                lazy_refcounts: true,
                ..CreateOptions::default()
            },
        )
        .unwrap();
        q.write(12345, &vec![0x5a; 200000]).unwrap();
        q.close().unwrap();
        assert_qemu_clean(&img);
        let info = qemu_ok(
            "qemu-img",
            &["info", "--output=json", img.to_str().unwrap()],
        );
        assert_eq!(json_u64(&info, "cluster-size"), cs, "{info}");
        assert_eq!(json_u64(&info, "refcount-bits"), rb as u64, "{info}");
        assert_eq!(json_u64(&info, "virtual-size"), SIZE, "{info}");
        assert!(info.contains("\"lazy-refcounts\": true"), "{info}");
        let out = qemu_ok(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                "read -P 0x5a 12345 200000",
                "-c",
                "read -P 0 0 12345",
                img.to_str().unwrap(),
            ],
        );
        assert!(!out.contains("Pattern verification failed"), "{out}");
    }
}

/// A 1 PiB image can be created (64 KiB and 2 MiB clusters), written at its far end, read
/// by QEMU and checked.
#[test]
fn one_pib_image() {
    for cs in [65536u64, 2 << 20] {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("big.qcow2");
        let size = 1u64 << 50;
        let mut q = Qcow2::create(
            FileDisk::create(&img).unwrap(),
            &CreateOptions {
                virtual_size: size,
                cluster_size: cs,
                ..CreateOptions::default()
            },
        )
        .unwrap();
        q.write(size - 4096, &[7u8; 4096]).unwrap();
        q.write(size / 2, &[8u8; 4096]).unwrap();
        q.close().unwrap();
        assert_qemu_clean(&img);
        let info = qemu_ok(
            "qemu-img",
            &["info", "--output=json", img.to_str().unwrap()],
        );
        assert_eq!(json_u64(&info, "virtual-size"), size);
        let out = qemu_ok(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                &format!("read -P 7 {} 4096", size - 4096),
                img.to_str().unwrap(),
            ],
        );
        assert!(!out.contains("verification failed"), "{out}");
    }
}

/// Opening and using a 1 TiB image needs the caches and a few clusters, not memory in
/// proportion to the size.
#[test]
fn one_tib_image_memory_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("tib.qcow2");
    let size = 1u64 << 40;
    let mut q = Qcow2::create(
        FileDisk::create(&img).unwrap(),
        &CreateOptions {
            virtual_size: size,
            cluster_size: 65536,
            ..CreateOptions::default()
        },
    )
    .unwrap();
    // One write per 512 MiB (a new L2 table each time): 2048 tables, 128 MiB of them.
    for i in 0..2048u64 {
        q.write(i * (512 << 20) + 4096, &[i as u8 | 1; 512])
            .unwrap();
    }
    q.close().unwrap();
    let opts = OpenOptions {
        l2_cache_bytes: 1 << 20,
        refcount_cache_bytes: 256 << 10,
        ..OpenOptions::default()
    };
    let mut q = open_file(&img, opts);
    let mut b = [0u8; 512];
    for i in (0..2048u64).rev() {
        q.read(i * (512 << 20) + 4096, &mut b).unwrap();
        assert_eq!(b[0], i as u8 | 1);
    }
    let budget = (1 << 20) + (256 << 10) + 4 * 65536;
    assert!(
        q.memory_bytes() <= budget,
        "engine holds {} bytes",
        q.memory_bytes()
    );
    assert!(q.check().unwrap().is_clean());
}

/// Compressed images (`qemu-img convert -c`): read as QEMU reads them; partial writes into
/// compressed clusters copy-on-write them; `qemu-img check` stays clean.
fn compressed(cluster: u64, compat: &'static str) {
    let dir = tempfile::tempdir().unwrap();
    let src = qemu_image(dir.path(), &cfg(cluster, 16, compat));
    let img = dir.path().join("c.qcow2");
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
            &format!("cluster_size={cluster},compat={compat}"),
            src.to_str().unwrap(),
            img.to_str().unwrap(),
        ],
    );
    let mut model = qemu_raw(dir.path(), &img);
    let mut q = open_file(&img, read_only());
    let map = q.map().unwrap();
    assert!(
        map.iter()
            .any(|m| m.kind == crate::qcow2::ClusterKind::Compressed),
        "qemu-img convert -c made no compressed clusters"
    );
    let mut ours = vec![0u8; SIZE as usize];
    q.read(0, &mut ours).unwrap();
    assert!(
        ours == model,
        "compressed image reads differently from qemu-img convert"
    );
    assert!(q.check().unwrap().is_clean());
    drop(q);
    let mut q = open_file(&img, small_cache());
    q.space().unwrap();
    our_writes(&mut q, &mut model, cluster);
    assert_space_kept(&mut q);
    q.close().unwrap();
    assert_qemu_clean(&img);
    assert_qemu_compare(dir.path(), &img, &model, "qemu-img compare");
}

#[test]
fn qemu_compressed_512_v2() {
    compressed(512, "0.10");
}

#[test]
fn qemu_compressed_4k() {
    compressed(4096, "1.1");
}

#[test]
fn qemu_compressed_64k() {
    compressed(65536, "1.1");
}

#[test]
fn qemu_compressed_2m() {
    compressed(2 << 20, "1.1");
}
