//! Every kind of image QEMU 7.2 makes, served and written: compat 0.10 and 1.1, clusters
//! 512 B to 2 MiB, refcount widths 1 to 64, lazy refcounts, `preallocation=metadata`,
//! extended L2 entries, zlib- and zstd-compressed clusters, zero clusters, backing chains
//! (qcow2 and raw layers, depth 3 and 4), internal snapshots (compat 1.1 and 0.10) and
//! persistent dirty bitmaps.
//!
//! Each kind is a row of [`KINDS`]: the `qemu-img create` options and how the image is
//! filled (qemu-io writes, zeroes and discards; a `qemu-img convert -c` for compressed
//! clusters; the layers of a chain; snapshots taken between writes; bitmaps dirtied by the
//! fill). Two consumers run every row:
//! - `engine_reads_and_writes_every_kind` (host, fast): the engine (with the image's
//!   backing chain) reads the image byte-equal to `qemu-img convert -O raw`, takes
//!   [`OUR_OPS`] (writes and write-zeroes), closes it; `qemu-img check` exits 0 and
//!   `qemu-img compare` equals the model.
//! - `guest_serves_every_kind` (one TCG boot per row): the guest's NBD export reads
//!   byte-equal to `qemu-img convert -O raw` (nbdcopy), takes the same operations over NBD
//!   (qemu-io), and after a clean shutdown `qemu-img check` exits 0 (no leaks) and
//!   `qemu-img compare` equals the model.
//!
//! Both also check what the row's extras must keep ([`Made::assert_kept`]): the layers below
//! an overlay are untouched; every snapshot reads as it did before (`qemu-img convert -l`;
//! in the guest also through the export `disk@NAME`, in the engine through its snapshot
//! view); every bitmap records exactly the granules written (an enabled one: those dirty
//! before plus those [`OUR_OPS`] touched; a disabled one: those dirty before), as
//! `qemu-nbd -B NAME` with `nbdinfo --map` reports them after the close, and in the guest as
//! its own export reports them (`qemu:dirty-bitmap:NAME`) while it runs.
//!
//! Adding a kind: add a row; a [`Fill`] variant if the image needs more than qemu-io to make.

use qcow_metal::disk::VirtualDisk;
use qcow_metal::qcow2::OpenOptions;
use qcow_metal::qcow2::chain::files;
use qcow_metal_e2e::{
    ScratchDir, boot_serving, guest, merge_runs, nbd_dirty_runs, qemu_img_snapshot_raw,
    qemu_img_to_raw, qemu_io, qemu_nbd_dirty_runs, require_tool, run_tool, run_tool_output,
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
    /// The image is the top of a backing chain: these layers, from the base up, each over
    /// the one before; then [`QEMU_FILL`] on the image.
    Chain(&'static [Below]),
    /// [`QEMU_FILL`], then for each (name, commands): `qemu-img snapshot -c NAME` and the
    /// qemu-io commands, so that each snapshot and the active disk differ.
    Snapshots(&'static [(&'static str, &'static [&'static str])]),
    /// These persistent bitmaps (name, granularity) added by `qemu-img bitmap --add`, then
    /// [`QEMU_FILL`] (which dirties them); then for each name in the second list a disabled
    /// bitmap of 64 KiB granules made from the first bitmap (`--add --merge --disable`):
    /// it must not change.
    Bitmaps(
        &'static [(&'static str, &'static str)],
        &'static [&'static str],
    ),
}

/// A layer under the row's image ([`Fill::Chain`]).
#[derive(Debug, Clone, Copy)]
enum Below {
    /// A raw file of `size` bytes of [`layer_data`].
    Raw { size: u64 },
    /// [`layer_data`] of `size` bytes made into a qcow2 by `qemu-img convert -c -o OPTIONS`
    /// (compressed clusters; the base of a chain).
    Compressed { size: u64, options: &'static str },
    /// A qcow2 overlay made by `qemu-img create -o OPTIONS -b` (the layer below), then the
    /// qemu-io commands.
    Qcow2 {
        size: u64,
        options: &'static str,
        cmds: &'static [&'static str],
    },
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
        // The largest clusters with subclusters (64 KiB each).
        name: "extended-l2-2m",
        options: "cluster_size=2097152,extended_l2=on",
        fill: Fill::Io,
        extra: &[
            "write -P 0x65 6356992 65536",
            "write -z 6488064 131072",
            "write -P 0x66 6684672 1000",
        ],
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
        // Depth 4, every layer of another shape: raw base (smaller than the image), a
        // compat 0.10 layer of 4 KiB clusters, an extended-L2 layer; writes, zero clusters
        // and discards in each.
        name: "backing-chain-raw-base-depth-4",
        options: "cluster_size=65536",
        fill: Fill::Chain(&[
            Below::Raw { size: 6 << 20 },
            Below::Qcow2 {
                size: 7 << 20,
                options: "compat=0.10,cluster_size=4096",
                cmds: &[
                    "write -P 0x41 100k 300k",
                    "write -z 3m 64k",
                    "write -P 0x42 6000k 300k",
                ],
            },
            Below::Qcow2 {
                size: SIZE,
                options: "cluster_size=16384,extended_l2=on",
                cmds: &[
                    "write -P 0x43 1000k 3k",
                    "write -z 2048k 128k",
                    "discard 5m 64k",
                ],
            },
        ]),
        extra: &[],
    },
    Kind {
        // Depth 3 over a zstd-compressed base, the image with 4 KiB clusters.
        name: "backing-chain-compressed-base-depth-3",
        options: "cluster_size=4096",
        fill: Fill::Chain(&[
            Below::Compressed {
                size: 5 << 20,
                options: "cluster_size=65536,compression_type=zstd",
            },
            Below::Qcow2 {
                size: SIZE,
                options: "cluster_size=65536",
                cmds: &[
                    "write -P 0x44 64k 200k",
                    "write -z 1m 192k",
                    "write -P 0x45 7m 4k",
                ],
            },
        ]),
        extra: &[],
    },
    Kind {
        // Two snapshots, the clusters they share with the active disk written over; 4-bit
        // refcounts (shared clusters have refcount 2 or 3).
        name: "internal-snapshots",
        options: "cluster_size=16384,refcount_bits=4",
        fill: Fill::Snapshots(SNAPSHOT_STEPS),
        extra: &[],
    },
    Kind {
        // The same in a compat 0.10 image (16-bit refcounts only, no zero flag).
        name: "internal-snapshots-compat-0.10",
        options: "compat=0.10,cluster_size=65536",
        fill: Fill::Snapshots(SNAPSHOT_STEPS),
        extra: &[],
    },
    Kind {
        // Enabled bitmaps of 64 KiB and 4 KiB granules (dirty from the fill), a disabled one.
        name: "dirty-bitmaps",
        options: "cluster_size=65536",
        fill: Fill::Bitmaps(&[("b0", "64K"), ("b1", "4K")], &["frozen"]),
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

/// The snapshot rows' steps: each snapshot, then the writes after it (over clusters the
/// snapshots share with the active disk).
const SNAPSHOT_STEPS: &[(&str, &[&str])] = &[
    (
        "s1",
        &[
            "write -P 0x21 0 65536",
            "write -z 3145728 65536",
            "discard 204800 16384",
        ],
    ),
    (
        "s2",
        &["write -P 0x22 131072 4096", "write -P 0x23 7340032 20000"],
    ),
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

/// `qemu-img ARGS...` (a failure fails the test).
fn qemu_img(args: &[&str]) -> String {
    run_tool("qemu-img", "qemu-utils", args)
}

/// `qemu-img create -q -f qcow2 -o OPTIONS PATH SIZE`, over `backing` (file name relative to
/// `path`'s directory, and format) when given.
fn create(path: &Path, options: &str, size: u64, backing: Option<(&str, &str)>) {
    let size = size.to_string();
    let mut args = vec!["create", "-q", "-f", "qcow2", "-o", options];
    if let Some((file, format)) = backing {
        args.extend(["-b", file, "-F", format]);
    }
    args.extend([s(path), &size]);
    qemu_img(&args);
}

/// `qemu-img convert -c -f FORMAT -O qcow2 -o OPTIONS SRC OUT`: every cluster of data
/// compressed (where that makes it smaller).
fn convert_compressed(format: &str, options: &str, src: &Path, out: &Path) {
    let args = ["convert", "-c", "-f", format, "-O", "qcow2", "-o", options];
    qemu_img(&[&args[..], &[s(src), s(out)]].concat());
}

/// The bytes of a chain's base layer: position-dependent, compressible, never zero.
fn layer_data(size: u64) -> Vec<u8> {
    (0..size)
        .map(|i| ((i / 512) as u8).wrapping_mul(7) ^ (i % 5) as u8 | 0x80)
        .collect()
}

/// A persistent bitmap of a row's image and what it held before the test.
struct Bitmap {
    name: &'static str,
    /// Its granularity in bytes.
    granularity: u64,
    /// Whether writes set its bits.
    enabled: bool,
    /// Its dirty runs before the test (as `qemu-nbd -B` reports them).
    before: Vec<(u64, u64)>,
}

impl Bitmap {
    /// The dirty runs it must report after [`OUR_OPS`]: the runs before, and for an enabled
    /// bitmap every granule an operation touched.
    fn expected(&self) -> Vec<(u64, u64)> {
        let g = self.granularity;
        let mut dirty = vec![false; SIZE.div_ceil(g) as usize];
        let mut mark = |off: u64, len: u64| {
            for i in off / g..(off + len).div_ceil(g) {
                dirty[i as usize] = true;
            }
        };
        for &(off, len) in &self.before {
            mark(off, len);
        }
        if self.enabled {
            for op in OUR_OPS {
                let (Op::Write { off, len, .. } | Op::Zero { off, len, .. }) = *op;
                mark(off, len);
            }
        }
        let granules = dirty.iter().enumerate().filter(|(_, d)| **d);
        merge_runs(granules.map(|(i, _)| (i as u64 * g, g.min(SIZE - i as u64 * g))))
    }
}

/// A row's image as QEMU's tools made it, with what its extras must keep.
struct Made {
    /// The image (the top of its chain).
    image: PathBuf,
    /// The layers below it, with their bytes: they must never change.
    layers: Vec<(PathBuf, Vec<u8>)>,
    /// Each internal snapshot's name and contents (`qemu-img convert -l`).
    snapshots: Vec<(&'static str, Vec<u8>)>,
    /// Its persistent bitmaps.
    bitmaps: Vec<Bitmap>,
}

/// Makes the row's image in `dir` with QEMU's tools.
fn make(kind: &Kind, dir: &Path) -> Made {
    let image = dir.join(format!("{}.qcow2", kind.name));
    let mut made = Made {
        image: image.clone(),
        layers: Vec::new(),
        snapshots: Vec::new(),
        bitmaps: Vec::new(),
    };
    match kind.fill {
        Fill::Io => {
            create(&image, kind.options, SIZE, None);
            qemu_io_image(&image, QEMU_FILL);
        }
        Fill::Compressed => {
            let plain = dir.join("plain.qcow2");
            create(&plain, "cluster_size=65536", SIZE, None);
            qemu_io_image(&plain, QEMU_FILL);
            convert_compressed("qcow2", kind.options, &plain, &image);
            qemu_io_image(&image, QEMU_AFTER_COMPRESS);
        }
        Fill::Chain(layers) => {
            let mut below: Option<(String, &str)> = None;
            for (depth, layer) in layers.iter().enumerate() {
                let (name, format) = match *layer {
                    Below::Raw { size } => {
                        let name = format!("layer{depth}.raw");
                        std::fs::write(dir.join(&name), layer_data(size)).unwrap();
                        (name, "raw")
                    }
                    Below::Compressed { size, options } => {
                        let src = dir.join("layer-src.raw");
                        std::fs::write(&src, layer_data(size)).unwrap();
                        let name = format!("layer{depth}.qcow2");
                        convert_compressed("raw", options, &src, &dir.join(&name));
                        std::fs::remove_file(&src).unwrap();
                        (name, "qcow2")
                    }
                    Below::Qcow2 {
                        size,
                        options,
                        cmds,
                    } => {
                        let name = format!("layer{depth}.qcow2");
                        let path = dir.join(&name);
                        let backing = below.as_ref().map(|(n, f)| (n.as_str(), *f));
                        create(&path, options, size, backing);
                        qemu_io_image(&path, cmds);
                        (name, "qcow2")
                    }
                };
                below = Some((name, format));
            }
            let (name, format) = below.expect("a chain has layers");
            create(&image, kind.options, SIZE, Some((&name, format)));
            qemu_io_image(&image, QEMU_FILL);
            for (depth, layer) in layers.iter().enumerate() {
                let ext = if matches!(layer, Below::Raw { .. }) {
                    "raw"
                } else {
                    "qcow2"
                };
                let path = dir.join(format!("layer{depth}.{ext}"));
                let bytes = std::fs::read(&path).unwrap();
                made.layers.push((path, bytes));
            }
        }
        Fill::Snapshots(steps) => {
            create(&image, kind.options, SIZE, None);
            qemu_io_image(&image, QEMU_FILL);
            for &(name, cmds) in steps {
                qemu_img(&["snapshot", "-c", name, s(&image)]);
                qemu_io_image(&image, cmds);
                let raw = dir.join(format!("snapshot-{name}.raw"));
                made.snapshots
                    .push((name, qemu_img_snapshot_raw(&image, name, &raw)));
            }
        }
        Fill::Bitmaps(enabled, disabled) => {
            create(&image, kind.options, SIZE, None);
            for &(name, granularity) in enabled {
                qemu_img(&["bitmap", "--add", "-g", granularity, s(&image), name]);
            }
            qemu_io_image(&image, QEMU_FILL);
            let first = enabled[0].0;
            for &name in disabled {
                qemu_img(&[
                    "bitmap",
                    "--add",
                    "-g",
                    "64K",
                    "--merge",
                    first,
                    "--disable",
                    s(&image),
                    name,
                ]);
            }
            let granules = enabled.iter().map(|&(n, g)| (n, g, true));
            for (name, granularity, on) in
                granules.chain(disabled.iter().map(|&n| (n, "64K", false)))
            {
                let granularity = granularity.trim_end_matches('K').parse::<u64>().unwrap() << 10;
                let before = qemu_nbd_dirty_runs(&image, name);
                assert!(
                    !before.is_empty(),
                    "{}: the fill dirtied nothing in {name}",
                    kind.name
                );
                made.bitmaps.push(Bitmap {
                    name,
                    granularity,
                    enabled: on,
                    before,
                });
            }
        }
    }
    qemu_io_image(&image, kind.extra);
    made
}

impl Made {
    /// After the close: the layers below are untouched, every snapshot reads as before
    /// (`qemu-img convert -l`), every bitmap reports what it must (`qemu-nbd -B`).
    fn assert_kept(&self, kind: &Kind, dir: &Path) {
        for (path, bytes) in &self.layers {
            assert!(
                std::fs::read(path).unwrap() == *bytes,
                "{}: the layer {} changed",
                kind.name,
                path.display()
            );
        }
        for (name, bytes) in &self.snapshots {
            let raw = dir.join(format!("snapshot-{name}-after.raw"));
            assert!(
                qemu_img_snapshot_raw(&self.image, name, &raw) == *bytes,
                "{}: snapshot {name} (qemu-img convert -l) changed",
                kind.name
            );
        }
        for b in &self.bitmaps {
            assert_eq!(
                qemu_nbd_dirty_runs(&self.image, b.name),
                b.expected(),
                "{}: bitmap {} as qemu-nbd -B reports it",
                kind.name,
                b.name
            );
        }
    }
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
    require_tool("qemu-nbd", "qemu-utils");
    require_tool("nbdinfo", "libnbd-bin");
    for kind in KINDS {
        let dir = ScratchDir::new(&format!("kinds-engine-{}", kind.name));
        let made = make(kind, dir.path());
        let image = &made.image;
        let mut model = qemu_raw(image, dir.path());
        let mut q = files::open(image, OpenOptions::default())
            .unwrap_or_else(|e| panic!("{}: open: {e}", kind.name));
        assert_eq!(q.chain_depth(), made.layers.len() + 1, "{}", kind.name);
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
        for (name, bytes) in &made.snapshots {
            let view = q.snapshot_view(name).unwrap().expect("the snapshot");
            let mut got = vec![0u8; bytes.len()];
            q.read_snapshot(&view, 0, &mut got).unwrap();
            assert!(got == *bytes, "{}: our read of snapshot {name}", kind.name);
        }
        q.close().unwrap();
        assert_qemu_accepts(kind, image, &model, dir.path());
        made.assert_kept(kind, dir.path());
    }
}

/// The guest, every row (one boot each): its NBD export reads as QEMU reads the image,
/// takes writes and write-zeroes, and leaves an image QEMU accepts after a clean shutdown.
#[test]
fn guest_serves_every_kind() {
    for (p, pkg) in [
        ("qemu-img", "qemu-utils"),
        ("qemu-io", "qemu-utils"),
        ("qemu-nbd", "qemu-utils"),
        ("nbdcopy", "libnbd-bin"),
        ("nbdinfo", "libnbd-bin"),
    ] {
        require_tool(p, pkg);
    }
    for kind in KINDS {
        let dir = ScratchDir::new(&format!("kinds-guest-{}", kind.name));
        let made = make(kind, dir.path());
        let image = &made.image;
        let mut model = qemu_raw(image, dir.path());
        let (mut g, _) = boot_serving(guest().disk(image));
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
        // The snapshots' exports read as QEMU read them before the writes.
        for (name, bytes) in &made.snapshots {
            run_tool(
                "nbdcopy",
                "libnbd-bin",
                &[&format!("{uri}@{name}"), s(&served)],
            );
            assert!(
                std::fs::read(&served).unwrap() == *bytes,
                "{}: the export {}@{name} differs from qemu-img convert -l",
                kind.name,
                qcow_metal_e2e::NBD_EXPORT
            );
        }
        // The bitmaps, as the guest's export reports them while it runs.
        for b in &made.bitmaps {
            assert_eq!(
                nbd_dirty_runs(&uri, b.name),
                b.expected(),
                "{}: bitmap {} over the guest's export",
                kind.name,
                b.name
            );
        }
        shut_down_cleanly(&mut g);
        drop(g);
        assert_qemu_accepts(kind, image, &model, dir.path());
        made.assert_kept(kind, dir.path());
    }
}
