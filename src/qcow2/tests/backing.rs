//! Backing chains made by `qemu-img create -b ... -F ...`: reads equal `qemu-img convert -O
//! raw` (which follows the chain), and random writes, write-zeroes and discards on the
//! overlay leave an image that `qemu-img check` finds clean and `qemu-img compare` finds
//! equal to a model, the layers below untouched.

use super::util::{assert_qemu_clean, assert_qemu_compare, qemu, qemu_create, qemu_ok, qemu_raw};
use crate::block::{BlockDevice, FileDisk, MemDisk};
use crate::disk::{Allocation, VirtualDisk};
use crate::qcow2::chain::{self, ChainFault, LayerFormat, files};
use crate::qcow2::{Backing, OpenOptions, Qcow2, Qcow2Error};
use std::path::{Path, PathBuf};

const MIB: u64 = 1 << 20;

/// The project's seeded generator, so failures reproduce.
type Rng = fastrand::Rng;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `qemu-io -f FMT -c CMD... FILE`, asserting success.
fn qemu_io(fmt: &str, file: &Path, cmds: &[&str]) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(s(file));
    qemu_ok("qemu-io", &args);
}

/// `qemu-img create -f qcow2 -o compat=.. -b BACKING -F FMT FILE SIZE` (backing named
/// relative to the overlay's directory, as QEMU resolves it).
fn overlay(file: &Path, backing: &str, backing_fmt: &str, compat: &str, cluster: u64, size: u64) {
    overlay_with(file, backing, backing_fmt, compat, cluster, size, "");
}

/// [`overlay`] with more `-o` options (`extra`: empty or starting with a comma).
fn overlay_with(
    file: &Path,
    backing: &str,
    backing_fmt: &str,
    compat: &str,
    cluster: u64,
    size: u64,
    extra: &str,
) {
    qemu_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("compat={compat},cluster_size={cluster}{extra}"),
            "-b",
            backing,
            "-F",
            backing_fmt,
            s(file),
            &size.to_string(),
        ],
    );
}

/// A chain of depth 4 in `dir` (raw base, two qcow2 layers of other cluster sizes, a
/// larger top; relative names, one through a subdirectory); returns the top and the
/// layers below it, top first.
/// With `ext`, the two upper layers have extended L2 entries (subclusters).
fn make_chain(dir: &Path, compat: &str, ext: bool) -> (PathBuf, Vec<PathBuf>) {
    let extra = if ext { ",extended_l2=on" } else { "" };
    let mut rng = Rng::with_seed(0x1234_5678 ^ compat.len() as u64);
    // Layer 3: raw, 3 MiB + 1000 bytes of random data (not a whole cluster at its end).
    let base = dir.join("base.raw");
    let mut bytes = vec![0u8; (3 * MIB + 1000) as usize];
    rng.fill(&mut bytes);
    std::fs::write(&base, &bytes).unwrap();
    // Layer 2: qcow2 (4 KiB clusters) over it, 4 MiB, some writes and zero clusters.
    let mid = dir.join("mid.qcow2");
    overlay(&mid, "base.raw", "raw", compat, 4096, 4 * MIB);
    qemu_io(
        "qcow2",
        &mid,
        &[
            "write -P 0x11 100k 300k",
            "write -z 600k 64k",
            "write -P 0x12 2900k 400k",
        ],
    );
    // Layer 1: qcow2 (64 KiB clusters) over layer 2, in a subdirectory, naming its backing
    // by a relative path.
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    let upper = dir.join("sub/upper.qcow2");
    overlay_with(
        &upper,
        "../mid.qcow2",
        "qcow2",
        compat,
        65536,
        5 * MIB,
        extra,
    );
    qemu_io(
        "qcow2",
        &upper,
        &[
            "write -P 0x21 1000k 10k",
            "write -z 2048k 128k",
            "write -P 0x22 4500k 100k",
        ],
    );
    // Top: 8 MiB (larger than every layer), 16 KiB clusters.
    let top = dir.join("top.qcow2");
    overlay_with(
        &top,
        "sub/upper.qcow2",
        "qcow2",
        compat,
        16384,
        8 * MIB,
        extra,
    );
    qemu_io(
        "qcow2",
        &top,
        &[
            "write -P 0x31 30k 50k",
            "write -z 3m 20k",
            "write -P 0x32 1001k 3k",
        ],
    );
    (top, vec![upper, mid, base])
}

/// Reads the whole virtual disk through our engine.
fn read_all<D: BlockDevice>(q: &mut Qcow2<D>) -> Vec<u8> {
    let mut out = vec![0u8; q.size() as usize];
    for (i, c) in out.chunks_mut(MIB as usize).enumerate() {
        q.read_at(i as u64 * MIB, c).unwrap();
    }
    out
}

fn chain_reads_equal_qemu(compat: &str, ext: bool) {
    let dir = tempfile::tempdir().unwrap();
    let (top, layers) = make_chain(dir.path(), compat, ext);
    let resolved = files::resolve(&top).unwrap();
    let formats: Vec<_> = resolved.iter().map(|l| l.format).collect();
    assert_eq!(
        formats,
        [LayerFormat::Qcow2, LayerFormat::Qcow2, LayerFormat::Raw]
    );
    for (r, l) in resolved.iter().zip(&layers) {
        assert_eq!(
            std::fs::canonicalize(&r.path).unwrap(),
            std::fs::canonicalize(l).unwrap()
        );
    }
    let expected = qemu_raw(dir.path(), &top);
    let mut q = files::open(
        &top,
        OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    assert_eq!(q.chain_depth(), 4);
    let got = read_all(&mut q);
    assert!(got == expected, "chain reads differ from qemu-img convert");
    // Every layer served some data.
    assert!(
        q.layer_data_bytes().iter().all(|&b| b > 0),
        "{:?}",
        q.layer_data_bytes()
    );
    // Block status: data from below is data, the zero clusters are zeros, past every
    // layer's end (5 MiB) the overlay's unallocated space is a hole.
    let e = q.block_status(0, 4096).unwrap();
    assert_eq!(e.kind, Allocation::Data);
    // (Version 2 has no zero flag: QEMU wrote zeros as data.)
    let e = q.block_status(3 * MIB, 16384).unwrap();
    let zero = if compat == "0.10" {
        Allocation::Data
    } else {
        Allocation::Zero
    };
    assert_eq!(e.kind, zero);
    let e = q.block_status(6 * MIB, MIB).unwrap();
    assert_eq!((e.kind, e.len), (Allocation::Hole, MIB));
    // Unaligned reads across layer and cluster boundaries.
    let mut rng = Rng::with_seed(7);
    for _ in 0..200 {
        let off = rng.u64(..8 * MIB - 1);
        let len = 1 + rng.u64(..(8 * MIB - off).min(200_000));
        let mut buf = vec![0u8; len as usize];
        q.read_at(off, &mut buf).unwrap();
        assert!(
            buf[..] == expected[off as usize..(off + len) as usize],
            "read {off}+{len}"
        );
    }
}

#[test]
fn chain_v3_reads_equal_qemu_convert() {
    chain_reads_equal_qemu("1.1", false);
}

#[test]
fn chain_with_subclusters_reads_equal_qemu_convert() {
    chain_reads_equal_qemu("1.1", true);
}

#[test]
fn chain_v2_reads_equal_qemu_convert() {
    chain_reads_equal_qemu("0.10", false);
}

/// The overlay on a compressed base (`qemu-img convert -c`) reads as QEMU reads it.
#[test]
fn overlay_on_compressed_base() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    let mut bytes = vec![0u8; 2 * MIB as usize];
    // Compressible: runs of a repeated pattern.
    for (i, c) in bytes.chunks_mut(4096).enumerate() {
        c.fill(i as u8);
    }
    std::fs::write(&raw, &bytes).unwrap();
    let base = dir.path().join("base.qcow2");
    qemu_ok(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            s(&raw),
            s(&base),
        ],
    );
    let top = dir.path().join("top.qcow2");
    overlay(&top, "base.qcow2", "qcow2", "1.1", 65536, 2 * MIB);
    let mut q = files::open(&top, OpenOptions::default()).unwrap();
    assert!(read_all(&mut q) == bytes);
    // A partial write copies the rest of the compressed cluster up.
    q.write_at(70_000, b"hello").unwrap();
    bytes[70_000..70_005].copy_from_slice(b"hello");
    q.close().unwrap();
    assert_qemu_clean(&top);
    assert_qemu_compare(dir.path(), &top, &bytes, "after a partial write");
}

/// Layers in memory: the engine over a raw backing device, without files.
#[test]
fn memory_overlay_on_raw_layer() {
    let mut base = vec![0u8; 300_000];
    Rng::with_seed(3).fill(&mut base);
    let top = Qcow2::create(
        MemDisk::growable(),
        &crate::qcow2::CreateOptions {
            virtual_size: 1 << 20,
            cluster_size: 4096,
            ..Default::default()
        },
    )
    .unwrap()
    .close()
    .unwrap();
    let mut q = Qcow2::open_with_backing(
        top,
        OpenOptions::default(),
        Some(Backing::raw(MemDisk::from_bytes(base.clone(), true))),
    )
    .unwrap();
    let mut model = base.clone();
    model.resize(1 << 20, 0);
    let mut buf = vec![0u8; 1 << 20];
    q.read_at(0, &mut buf).unwrap();
    assert!(buf == model);
    q.write_at(5000, &[9u8; 100]).unwrap();
    model[5000..5100].fill(9);
    q.write_zeroes(8192, 4096, true).unwrap();
    model[8192..12288].fill(0);
    q.discard(16384, 8192).unwrap();
    model[16384..24576].fill(0);
    q.read_at(0, &mut buf).unwrap();
    assert!(buf == model);
    assert_eq!(q.layer_data_bytes().len(), 2);
}

/// An overlay opened without its chain is refused with an error that says what to do.
#[test]
fn overlay_without_backing_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![1u8; 65536]).unwrap();
    let top = dir.path().join("top.qcow2");
    overlay(&top, "base.raw", "raw", "1.1", 65536, MIB);
    let dev = FileDisk::open(&top, true).unwrap();
    let Err(e) = Qcow2::open(dev, OpenOptions::default()) else {
        panic!("an overlay opened without its backing")
    };
    assert_eq!(e, Qcow2Error::BackingRequired);
    assert!(e.to_string().contains("backing chain"), "{e}");
}

/// Missing layers and loops are errors naming the file.
#[test]
fn missing_layer_and_loop_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    qemu_ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&base), "1M"]);
    let top = dir.path().join("top.qcow2");
    overlay(&top, "base.qcow2", "qcow2", "1.1", 65536, MIB);
    std::fs::remove_file(&base).unwrap();
    let e = files::resolve(&top).unwrap_err();
    assert!(e.contains("base.qcow2") && e.contains("missing"), "{e}");
    // A loop: a <- b <- a (made with rebase -u, which does not check).
    let a = dir.path().join("a.qcow2");
    let b = dir.path().join("b.qcow2");
    qemu_ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&a), "1M"]);
    overlay(&b, "a.qcow2", "qcow2", "1.1", 65536, MIB);
    qemu_ok(
        "qemu-img",
        &[
            "rebase",
            "-u",
            "-f",
            "qcow2",
            "-b",
            "b.qcow2",
            "-F",
            "qcow2",
            s(&a),
        ],
    );
    let e = files::resolve(&b).unwrap_err();
    assert!(e.contains("loops") && e.contains("a.qcow2"), "{e}");
}

/// The guest's assembly from serials: any device order, gaps and extra layers refused.
#[test]
fn open_chain_by_serial() {
    let mk = |size: u64| {
        Qcow2::create(
            MemDisk::growable(),
            &crate::qcow2::CreateOptions {
                virtual_size: size,
                cluster_size: 4096,
                ..Default::default()
            },
        )
        .unwrap()
        .close()
        .unwrap()
    };
    // Layer 1: a qcow2 image naming a backing file (made in memory: header field only).
    let dir = tempfile::tempdir().unwrap();
    let l2 = dir.path().join("l2.raw");
    std::fs::write(&l2, vec![0x5au8; 70_000]).unwrap();
    let l1 = dir.path().join("l1.qcow2");
    overlay(&l1, "l2.raw", "raw", "1.1", 4096, MIB);
    qemu_io("qcow2", &l1, &["write -P 0x6b 0 4096"]);
    let top = dir.path().join("top.qcow2");
    overlay(&top, "l1.qcow2", "qcow2", "1.1", 4096, MIB);
    let load = |p: &Path| MemDisk::from_bytes(std::fs::read(p).unwrap(), false);
    let layers = || {
        vec![
            (
                chain::layer_serial(2, LayerFormat::Raw),
                MemDisk::from_bytes(std::fs::read(&l2).unwrap(), true),
            ),
            ("something-else".to_string(), MemDisk::fixed(4096)),
            (chain::layer_serial(1, LayerFormat::Qcow2), load(&l1)),
        ]
    };
    let mut q = chain::open_chain(load(&top), OpenOptions::default(), layers()).unwrap();
    let mut buf = vec![0u8; 8192];
    q.read_at(0, &mut buf).unwrap();
    assert!(buf[..4096].iter().all(|&b| b == 0x6b) && buf[4096..].iter().all(|&b| b == 0x5a));
    // Layer 2 missing.
    let mut l = layers();
    l.remove(0);
    let e = chain::open_chain(load(&top), OpenOptions::default(), l)
        .err()
        .unwrap();
    assert_eq!((e.depth, e.error.clone()), (2, ChainFault::Missing));
    assert!(e.to_string().contains("backing layer 2"), "{e}");
    // A layer under an image without a backing file.
    let e = chain::open_chain(mk(MIB), OpenOptions::default(), layers())
        .err()
        .unwrap();
    assert_eq!((e.depth, e.error), (1, ChainFault::Unexpected));
    // Serials round-trip and fit virtio-blk's 20 bytes.
    let sname = chain::layer_serial(99999, LayerFormat::Qcow2);
    assert!(sname.len() <= 20);
    assert_eq!(
        chain::parse_layer_serial(&sname),
        Some((99999, LayerFormat::Qcow2))
    );
    assert_eq!(chain::parse_layer_serial("qm-layer0-raw"), None);
    // Picking the disk among devices by serial, whatever their order.
    let devs = vec![
        (Some(chain::layer_serial(1, LayerFormat::Raw)), 1),
        (Some(chain::DISK_SERIAL.to_string()), 2),
        (None, 3),
    ];
    let (disk, layers) = chain::split_devices(devs).unwrap();
    assert_eq!((disk, layers.len()), (Some(2), 1));
    let (disk, _) = chain::split_devices(vec![(None, 7)]).unwrap();
    assert_eq!(disk, Some(7));
    assert!(chain::split_devices(vec![(None, 7), (Some("x".into()), 8)]).is_err());
}

/// Random writes, write-zeroes (with and without unmap) and discards on an overlay of a
/// chain; the model is what the overlay must read as.
fn model_ops(compat: &str, ext: bool, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let (top, layers) = make_chain(dir.path(), compat, ext);
    let before: Vec<Vec<u8>> = layers.iter().map(|l| std::fs::read(l).unwrap()).collect();
    let mut model = qemu_raw(dir.path(), &top);
    let size = model.len() as u64;
    let cs = 16384u64;
    let v3 = compat != "0.10";
    let mut rng = Rng::with_seed(seed);
    let mut q = files::open(&top, OpenOptions::default()).unwrap();
    for step in 0..300 {
        let off = rng.u64(..size);
        let most = if rng.u64(..4) == 0 { 300_000 } else { 40_000 };
        let len = 1 + rng.u64(..(size - off).min(most));
        let (o, l) = (off as usize, len as usize);
        match rng.u64(..10) {
            0..=4 => {
                let mut data = vec![0u8; l];
                rng.fill(&mut data);
                q.write_at(off, &data).unwrap();
                model[o..o + l].copy_from_slice(&data);
            }
            5..=7 => {
                q.write_zeroes(off, len, rng.u64(..2) == 0).unwrap();
                model[o..o + l].fill(0);
            }
            _ => {
                q.discard(off, len).unwrap();
                if v3 {
                    // Whole clusters inside the range read as zeros; edges keep their data.
                    let first = off.div_ceil(cs) * cs;
                    let end = if off + len == size {
                        size
                    } else {
                        (off + len) / cs * cs
                    };
                    if first < end {
                        model[first as usize..end as usize].fill(0);
                    }
                }
            }
        }
        if step % 50 == 49 {
            let mut buf = vec![0u8; size as usize];
            q.read_at(0, &mut buf).unwrap();
            assert!(buf == model, "step {step}: reads differ from the model");
            q.flush().unwrap();
        }
    }
    let mut buf = vec![0u8; size as usize];
    q.read_at(0, &mut buf).unwrap();
    assert!(buf == model, "reads differ from the model before close");
    q.close().unwrap();
    assert_qemu_clean(&top);
    assert_qemu_compare(dir.path(), &top, &model, "after random operations");
    for (l, b) in layers.iter().zip(&before) {
        assert!(std::fs::read(l).unwrap() == *b, "{} changed", l.display());
    }
    // qemu-img check exits 0 (not only no errors).
    let o = qemu("qemu-img", &["check", "-f", "qcow2", s(&top)]);
    assert!(o.status.success());
}

#[test]
fn model_ops_on_overlay_v3() {
    model_ops("1.1", false, 0xdead_beef);
}

#[test]
fn model_ops_on_overlay_with_subclusters() {
    model_ops("1.1", true, 0x50b_c105);
}

#[test]
fn model_ops_on_overlay_v2() {
    model_ops("0.10", false, 0xfeed_f00d);
}

/// Growing an overlay, against `qemu-img resize` of a copy: where the backing file is larger
/// than the old size the new area reads as zeros (the backing does not show through), the
/// head of the cluster holding the old end keeps the backing's data; where it is smaller,
/// the image only grows; a version 2 overlay over a larger backing is refused by both and
/// left as it was. Both results read the same, and `qemu-img check` finds ours clean.
#[test]
fn growing_an_overlay_matches_qemu_img_resize() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Backing files: 8 MiB qcow2 and raw of non-zero data; a 2 MiB qcow2.
    let big = d.join("big.qcow2");
    qemu_create(&big, "compat=1.1", 8 * MIB);
    qemu_io("qcow2", &big, &["write -P 0x11 0 8M"]);
    let raw = d.join("big.raw");
    let mut bytes = vec![0u8; 8 * MIB as usize];
    Rng::with_seed(11).fill(&mut bytes);
    std::fs::write(&raw, &bytes).unwrap();
    let small = d.join("small.qcow2");
    qemu_create(&small, "compat=1.1", 2 * MIB);
    qemu_io("qcow2", &small, &["write -P 0x22 0 2M"]);
    // (name, backing file (its format is its extension), the overlay's options, its size
    // before and after).
    let cases: [(&str, &str, &str, u64, u64); 7] = [
        (
            "old end inside a cluster",
            "big.qcow2",
            "cluster_size=65536",
            3_000_320,
            6 * MIB,
        ),
        (
            "still below the backing's end",
            "big.qcow2",
            "cluster_size=4096",
            MIB + 512,
            2 * MIB,
        ),
        (
            "extended L2, old end in a subcluster",
            "big.qcow2",
            "extended_l2=on",
            3_000_832,
            12 * MIB,
        ),
        (
            "raw backing, the L1 table moves",
            "big.raw",
            "cluster_size=512",
            MIB,
            8 * MIB + 4096,
        ),
        (
            "backing smaller than the overlay",
            "small.qcow2",
            "compat=1.1",
            3 * MIB,
            6 * MIB,
        ),
        (
            "version 2, backing smaller",
            "small.qcow2",
            "compat=0.10",
            3 * MIB,
            6 * MIB,
        ),
        (
            "version 2, backing larger: refused",
            "big.qcow2",
            "compat=0.10",
            3 * MIB,
            6 * MIB,
        ),
    ];
    for (n, (name, backing, options, old, new)) in cases.into_iter().enumerate() {
        let theirs = d.join(format!("theirs{n}.qcow2"));
        let ours = d.join(format!("ours{n}.qcow2"));
        let fmt = backing.rsplit('.').next().unwrap();
        qemu_create(
            &theirs,
            &format!("{options},backing_file={backing},backing_fmt={fmt}"),
            old,
        );
        // Some data of the overlay's own; in every other case in the cluster of the old end
        // too (else that cluster is copied up from the backing by the growth).
        qemu_io("qcow2", &theirs, &["write -P 0x33 4096 8192"]);
        if n % 2 == 1 {
            qemu_io(
                "qcow2",
                &theirs,
                &[&format!("write -P 0x34 {} 1024", old - 1536)],
            );
        }
        std::fs::copy(&theirs, &ours).unwrap();
        let before = std::fs::read(&ours).unwrap();
        let q_resize = qemu("qemu-img", &["resize", s(&theirs), &new.to_string()]);
        let mut q = files::open(&ours, OpenOptions::default()).unwrap();
        let r = q.resize(new);
        if !q_resize.status.success() {
            let stderr = String::from_utf8_lossy(&q_resize.stderr);
            assert!(stderr.contains("zero out"), "{name}: qemu-img: {stderr}");
            let Err(e) = r else {
                panic!("{name}: we grew what qemu-img refused to grow: {stderr}");
            };
            assert!(matches!(e, Qcow2Error::Invalid(_)), "{name}: {e}");
            assert!(e.to_string().contains("compat=1.1"), "{name}: {e}");
            q.close().unwrap();
            assert!(std::fs::read(&ours).unwrap() == before, "{name}: changed");
            continue;
        }
        r.unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(q.size(), new, "{name}");
        let got = read_all(&mut q);
        q.close().unwrap();
        let expected = qemu_raw(d, &theirs);
        assert_eq!(expected.len() as u64, new, "{name}");
        assert!(got == expected, "{name}: our reads differ from QEMU's");
        assert_qemu_clean(&ours);
        assert_qemu_compare(d, &ours, &expected, name);
        // The new area reads as zeros whenever the backing reached into it.
        if std::fs::metadata(d.join(backing)).unwrap().len() > old {
            assert!(
                expected[old as usize..].iter().all(|&b| b == 0),
                "{name}: QEMU shows the backing in the new area"
            );
        }
    }
}

/// `Qcow2::create_with_backing` (what `image convert -B` uses): the header names the
/// backing file and its format, reads fall through to it, zeroed clusters hide it, and the
/// image reopens over the same layer.
#[test]
fn created_overlay_names_its_backing_and_reads_through() {
    use crate::qcow2::CreateOptions;
    let base = || {
        let mut d = MemDisk::fixed(4 * MIB);
        d.write_at(0, &vec![0xab; 4 * MIB as usize]).unwrap();
        Backing::raw(d)
    };
    let opts = CreateOptions {
        virtual_size: 4 * MIB,
        backing_file: Some("base.raw".into()),
        backing_format: Some(LayerFormat::Raw),
        ..CreateOptions::default()
    };
    let mut q = Qcow2::create_with_backing(MemDisk::growable(), &opts, Some(base())).unwrap();
    assert_eq!(q.header().backing_file.as_deref(), Some("base.raw"));
    assert_eq!(q.header().backing_format().as_deref(), Some("raw"));
    let mut buf = vec![0u8; 4096];
    q.read_at(MIB, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0xab));
    q.write_at(0, &[0x11; 65536]).unwrap();
    q.zero_range(65536, 65536, true).unwrap();
    let dev = q.close().unwrap();
    // Without its layer it is refused, as any overlay; with it, it reads as written.
    assert!(matches!(
        Qcow2::open(dev.clone(), OpenOptions::default()),
        Err(Qcow2Error::BackingRequired)
    ));
    let mut q = Qcow2::open_with_backing(dev, OpenOptions::default(), Some(base())).unwrap();
    let mut all = vec![0u8; 3 * 65536];
    q.read_at(0, &mut all).unwrap();
    assert!(all[..65536].iter().all(|&b| b == 0x11));
    assert!(all[65536..2 * 65536].iter().all(|&b| b == 0));
    assert!(all[2 * 65536..].iter().all(|&b| b == 0xab));
    // Names QEMU cannot store are refused before anything is written.
    for bad in [String::new(), "x".repeat(1024)] {
        let opts = CreateOptions {
            backing_file: Some(bad),
            ..opts.clone()
        };
        let dev = MemDisk::growable();
        assert!(Qcow2::create_with_backing(dev, &opts, Some(base())).is_err());
    }
}
