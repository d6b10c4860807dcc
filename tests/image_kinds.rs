//! Every kind of image QEMU 7.2 makes, served and written: compat 0.10 and 1.1, clusters
//! 512 B to 2 MiB, refcount widths 1 to 64, lazy refcounts, `preallocation=metadata`,
//! extended L2 entries, zlib- and zstd-compressed clusters, zero clusters.
//!
//! Each kind is a row of [`KINDS`]: the `qemu-img create` options and how the image is
//! filled (qemu-io writes, zeroes and discards; a `qemu-img convert -c` for compressed
//! clusters). Two consumers run every row:
//! - `engine_reads_and_writes_every_kind` (host, fast): the engine reads the image
//!   byte-equal to `qemu-img convert -O raw`, takes [`OUR_OPS`] (writes and write-zeroes),
//!   closes it; `qemu-img check` exits 0 and `qemu-img compare` equals the model.
//! - `guest_serves_every_kind` (one TCG boot per row): the guest's NBD export reads
//!   byte-equal to `qemu-img convert -O raw` (nbdcopy), takes the same operations over NBD
//!   (qemu-io), and after a clean shutdown `qemu-img check` exits 0 (no leaks) and
//!   `qemu-img compare` equals the model.
//!
//! Adding a kind (snapshots, bitmaps, backing chains): add a row; a [`Fill`] variant
//! if the image needs more than qemu-io to make.

use qcow_metal::block::FileDisk;
use qcow_metal::disk::VirtualDisk;
use qcow_metal::qcow2::{OpenOptions, Qcow2};
use qcow_metal_e2e::{
    ScratchDir, boot, guest, qemu_img_to_raw, qemu_io, require_tool, run_tool, run_tool_output,
    shut_down_cleanly,
};
use std::path::{Path, PathBuf};

/// Virtual size of every image: small, so that a row costs little.
const SIZE: u64 = 8 << 20;

/// How a row's image gets its contents after `qemu-img create`.
#[derive(Debug, Clone, Copy)]
enum Fill {
    /// [`QEMU_FILL`] by qemu-io on the image itself.
    Io,
    /// [`QEMU_FILL`] on a plain image, then `qemu-img convert -c` into this kind
    /// (compressed clusters), then [`QEMU_AFTER_COMPRESS`] (overwrites of compressed data).
    Compressed,
}

/// One kind of image.
struct Kind {
    /// Short name (in failure messages and the scratch directory).
    name: &'static str,
    /// `qemu-img create -o` options.
    options: &'static str,
    /// How it is filled.
    fill: Fill,
    /// More qemu-io commands for this kind (run after the fill).
    extra: &'static [&'static str],
}

/// The kinds, one row each.
const KINDS: &[Kind] = &[
    Kind {
        name: "compat-0.10",
        options: "compat=0.10,cluster_size=65536",
        fill: Fill::Io,
        extra: &[],
    },
    Kind {
        name: "cluster-512-refcount-1",
        options: "cluster_size=512,refcount_bits=1",
        fill: Fill::Io,
        extra: &[],
    },
    Kind {
        name: "cluster-4k-refcount-2",
        options: "cluster_size=4096,refcount_bits=2",
        fill: Fill::Io,
        extra: &[],
    },
    Kind {
        name: "cluster-16k-refcount-4",
        options: "cluster_size=16384,refcount_bits=4",
        fill: Fill::Io,
        extra: &[],
    },
    Kind {
        name: "cluster-64k-refcount-8",
        options: "cluster_size=65536,refcount_bits=8",
        fill: Fill::Io,
        extra: &[],
    },
    Kind {
        name: "cluster-256k-refcount-32",
        options: "cluster_size=262144,refcount_bits=32",
        fill: Fill::Io,
        extra: &[],
    },
    Kind {
        name: "cluster-2m-refcount-64",
        options: "cluster_size=2097152,refcount_bits=64",
        fill: Fill::Io,
        extra: &[],
    },
    Kind {
        name: "lazy-refcounts",
        options: "cluster_size=65536,lazy_refcounts=on",
        fill: Fill::Io,
        extra: &[],
    },
    Kind {
        name: "preallocation-metadata",
        options: "cluster_size=65536,preallocation=metadata",
        fill: Fill::Io,
        extra: &[],
    },
    Kind {
        name: "extended-l2-64k",
        options: "cluster_size=65536,extended_l2=on",
        fill: Fill::Io,
        // Data, zero and unallocated subclusters (2 KiB) side by side.
        extra: &[
            "write -P 0x61 6293504 2048",
            "write -z 6299648 4096",
            "write -P 0x62 6311936 700",
        ],
    },
    Kind {
        name: "extended-l2-16k-compat-v3-lazy",
        options: "cluster_size=16384,extended_l2=on,lazy_refcounts=on",
        fill: Fill::Io,
        extra: &["write -P 0x63 6291968 512", "write -z 6292992 1024"],
    },
    Kind {
        name: "zlib-compressed",
        options: "cluster_size=65536",
        fill: Fill::Compressed,
        extra: &[],
    },
    Kind {
        name: "zstd-compressed",
        options: "cluster_size=65536,compression_type=zstd",
        fill: Fill::Compressed,
        extra: &[],
    },
    Kind {
        name: "zero-clusters",
        options: "cluster_size=4096",
        fill: Fill::Io,
        // Zero clusters over data, with and without keeping their host clusters.
        extra: &[
            "write -P 0x64 5242880 262144",
            "write -z 5242880 65536",
            "write -z -u 5308416 65536",
        ],
    },
];

/// What every image holds before the test touches it (qemu-io commands; offsets in bytes).
const QEMU_FILL: &[&str] = &[
    "write -P 0x11 0 204800",
    "write -P 0x12 1000000 3000",
    "write -z 2097152 262144",
    "write -P 0x13 3145728 1048576",
    "discard 3670016 131072",
    "write -P 0x14 8384512 4096",
];

/// Overwrites of compressed clusters (partial and whole), for [`Fill::Compressed`].
const QEMU_AFTER_COMPRESS: &[&str] = &["write -P 0x15 65536 1000", "write -P 0x16 131072 65536"];

/// One operation of the test on a served image: both sides apply it, the model too.
#[derive(Debug, Clone, Copy)]
enum Op {
    /// Write `len` bytes of `pattern` at `off`.
    Write { off: u64, len: u64, pattern: u8 },
    /// Write-zeroes (`unmap`: the image may drop the clusters).
    Zero { off: u64, len: u64, unmap: bool },
}

/// The test's writes and write-zeroes: sector-sized, unaligned, across clusters and
/// subclusters, into data, zeros, holes and compressed clusters, up to the disk's end.
const OUR_OPS: &[Op] = &[
    Op::Write {
        off: 512,
        len: 512,
        pattern: 0x51,
    },
    Op::Write {
        off: 999_999,
        len: 70_001,
        pattern: 0x52,
    },
    Op::Write {
        off: 2_162_688,
        len: 4096,
        pattern: 0x53,
    },
    Op::Zero {
        off: 3_145_728 + 4096,
        len: 200_000,
        unmap: false,
    },
    Op::Zero {
        off: 4_194_304,
        len: 1_048_576,
        unmap: true,
    },
    Op::Write {
        off: 6_291_456 + 1536,
        len: 3000,
        pattern: 0x54,
    },
    Op::Write {
        off: 7_340_032,
        len: 131_072,
        pattern: 0x55,
    },
    Op::Zero {
        off: 100_000,
        len: 20_000,
        unmap: true,
    },
    Op::Write {
        off: SIZE - 700,
        len: 700,
        pattern: 0x56,
    },
];

impl Op {
    /// Applies the operation to the model of the disk.
    fn apply(&self, model: &mut [u8]) {
        match *self {
            Op::Write { off, len, pattern } => {
                model[off as usize..(off + len) as usize].fill(pattern)
            }
            Op::Zero { off, len, .. } => model[off as usize..(off + len) as usize].fill(0),
        }
    }

    /// The same as a qemu-io command.
    fn qemu_io(&self) -> String {
        match *self {
            Op::Write { off, len, pattern } => format!("write -P {pattern:#x} {off} {len}"),
            Op::Zero { off, len, unmap } => {
                format!("write -z{} {off} {len}", if unmap { " -u" } else { "" })
            }
        }
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `qemu-io -f qcow2 -c CMD... IMAGE` (a failure fails the test).
fn qemu_io_image(image: &Path, cmds: &[&str]) {
    if cmds.is_empty() {
        return;
    }
    let mut args = vec!["-f", "qcow2"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(s(image));
    let out = run_tool_output("qemu-io", "qemu-utils", &args);
    assert!(
        out.success && !out.stdout.contains("failed"),
        "qemu-io {args:?}: {}{}",
        out.stdout,
        out.stderr
    );
}

/// Makes the row's image in `dir` with QEMU's tools; returns its path.
fn make(kind: &Kind, dir: &Path) -> PathBuf {
    let image = dir.join(format!("{}.qcow2", kind.name));
    let create = |path: &Path, options: &str| {
        run_tool(
            "qemu-img",
            "qemu-utils",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                options,
                s(path),
                &SIZE.to_string(),
            ],
        );
    };
    match kind.fill {
        Fill::Io => {
            create(&image, kind.options);
            qemu_io_image(&image, QEMU_FILL);
        }
        Fill::Compressed => {
            let plain = dir.join("plain.qcow2");
            create(&plain, "cluster_size=65536");
            qemu_io_image(&plain, QEMU_FILL);
            run_tool(
                "qemu-img",
                "qemu-utils",
                &[
                    "convert",
                    "-c",
                    "-f",
                    "qcow2",
                    "-O",
                    "qcow2",
                    "-o",
                    kind.options,
                    s(&plain),
                    s(&image),
                ],
            );
            qemu_io_image(&image, QEMU_AFTER_COMPRESS);
        }
    }
    qemu_io_image(&image, kind.extra);
    image
}

/// The guest view of `image` as `qemu-img convert -O raw` gives it.
fn qemu_raw(image: &Path, dir: &Path) -> Vec<u8> {
    let raw = dir.join("qemu-view.raw");
    qemu_img_to_raw(image, &raw);
    std::fs::read(&raw).unwrap()
}

/// After the test's operations: `qemu-img check` exits 0 (no corruption, no leak) and
/// `qemu-img compare` finds the image equal to `model`.
fn assert_qemu_accepts(kind: &Kind, image: &Path, model: &[u8], dir: &Path) {
    let out = run_tool_output(
        "qemu-img",
        "qemu-utils",
        &["check", "-f", "qcow2", s(image)],
    );
    assert!(
        out.success,
        "{}: qemu-img check exit status not 0:\n{}{}",
        kind.name, out.stdout, out.stderr
    );
    let raw = dir.join("model.raw");
    std::fs::write(&raw, model).unwrap();
    let out = run_tool_output(
        "qemu-img",
        "qemu-utils",
        &["compare", "-f", "qcow2", "-F", "raw", s(image), s(&raw)],
    );
    assert!(
        out.success,
        "{}: qemu-img compare with the model:\n{}{}",
        kind.name, out.stdout, out.stderr
    );
}

/// The engine on the host, every row: reads equal QEMU's, writes leave an image QEMU
/// accepts and reads as the model.
#[test]
fn engine_reads_and_writes_every_kind() {
    require_tool("qemu-img", "qemu-utils");
    require_tool("qemu-io", "qemu-utils");
    for kind in KINDS {
        let dir = ScratchDir::new(&format!("kinds-engine-{}", kind.name));
        let image = make(kind, dir.path());
        let mut model = qemu_raw(&image, dir.path());
        let dev = FileDisk::open(&image, false).unwrap();
        let mut q = Qcow2::open(dev, OpenOptions::default())
            .unwrap_or_else(|e| panic!("{}: open: {e}", kind.name));
        let mut ours = vec![0u8; SIZE as usize];
        q.read(0, &mut ours).unwrap();
        assert!(
            ours == model,
            "{}: our read differs from qemu-img convert",
            kind.name
        );
        for op in OUR_OPS {
            match *op {
                Op::Write { off, len, pattern } => {
                    q.write(off, &vec![pattern; len as usize]).unwrap()
                }
                Op::Zero { off, len, unmap } => q.write_zeroes(off, len, unmap).unwrap(),
            }
            op.apply(&mut model);
        }
        q.read(0, &mut ours).unwrap();
        assert!(ours == model, "{}: our read after our writes", kind.name);
        let report = q.check().unwrap();
        assert!(report.is_clean(), "{}: our check: {report}", kind.name);
        q.close().unwrap();
        assert_qemu_accepts(kind, &image, &model, dir.path());
    }
}

/// The guest, every row (one boot each): its NBD export reads as QEMU reads the image,
/// takes writes and write-zeroes, and leaves an image QEMU accepts after a clean shutdown.
#[test]
fn guest_serves_every_kind() {
    for (p, pkg) in [
        ("qemu-img", "qemu-utils"),
        ("qemu-io", "qemu-utils"),
        ("nbdcopy", "libnbd-bin"),
    ] {
        require_tool(p, pkg);
    }
    for kind in KINDS {
        let dir = ScratchDir::new(&format!("kinds-guest-{}", kind.name));
        let image = make(kind, dir.path());
        let mut model = qemu_raw(&image, dir.path());
        let (mut g, _) = boot(guest().disk(&image));
        let uri = g.nbd_url();
        let served = dir.path().join("served.raw");
        run_tool("nbdcopy", "libnbd-bin", &[&uri, s(&served)]);
        let got = std::fs::read(&served).unwrap();
        assert!(
            got == model,
            "{}: the export differs from qemu-img convert ({} bytes served)",
            kind.name,
            got.len()
        );
        let cmds: Vec<String> = OUR_OPS.iter().map(Op::qemu_io).collect();
        qemu_io(&uri, &cmds);
        for op in OUR_OPS {
            op.apply(&mut model);
        }
        // What the export reads now is the model.
        run_tool("nbdcopy", "libnbd-bin", &[&uri, s(&served)]);
        assert!(
            std::fs::read(&served).unwrap() == model,
            "{}: the export after our writes differs from the model",
            kind.name
        );
        shut_down_cleanly(&mut g);
        drop(g);
        assert_qemu_accepts(kind, &image, &model, dir.path());
    }
}
