//! `image convert` and `image resize`, on the project's own engine, with `qemu-img`'s
//! option names.
//!
//! Convert reads the source in chunks, skipping what its allocation says is holes or zeros
//! (qcow2 block status, `SEEK_DATA` on raw files), and writes only clusters that hold
//! nonzero bytes (`-S` sets the zero run that is skipped): the output is sparse (a raw
//! output is a sparse file of the virtual size). With `-c` the clusters are compressed on
//! several threads (`convert/compress.rs`) and written in order by the calling thread, packed as
//! QEMU packs them. The output's write-back starts while the copy goes on and the output is
//! made durable (fsync) before convert returns. A qcow2 source is read with its backing
//! chain, or one of its internal snapshots (`-l`); the output holds the whole disk, or with
//! `-B` is an overlay holding what the source's top layer holds. With `-n` it goes into an
//! existing output; `-o preallocation=` takes the output's space first.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use qcow_metal::block::FileDisk;
use qcow_metal::disk::{Allocation, VirtualDisk};
use qcow_metal::qcow2::backing::Backing;
use qcow_metal::qcow2::chain::LayerFormat;
use qcow_metal::qcow2::chain::files::{self as chain_files, ChainFile};
use qcow_metal::qcow2::entry::Mapping;
use qcow_metal::qcow2::probe::{self, Probe};
use qcow_metal::qcow2::{CompressionType, CreateOptions, OpenOptions, Qcow2, Qcow2Error};

use crate::error::{Error, Result};
use crate::units::parse_size;

mod compress;

/// An image format the tools read and write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The file's bytes are the disk.
    Raw,
    /// A qcow2 image.
    Qcow2,
}

impl Format {
    /// The format named `name` (`raw` or `qcow2`), as `-f` and `-O` take it.
    pub fn parse(name: &str) -> std::result::Result<Format, String> {
        match name {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            other => Err(format!(
                "unknown format `{other}` (this tool reads and writes raw and qcow2)"
            )),
        }
    }
}

/// How the output's space is taken before the copy (`-o preallocation=`), as qemu-img
/// takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preallocation {
    /// Only what holds data (sparse).
    #[default]
    Off,
    /// qcow2: every cluster gets a host cluster (data entries over a sparse file).
    Metadata,
    /// As metadata (qcow2), and the whole file is allocated with `fallocate`.
    Falloc,
    /// As metadata (qcow2), and every byte of the file is written (zeros where no data).
    Full,
}

impl Preallocation {
    /// The mode as `-o preallocation=` names it.
    pub fn name(self) -> &'static str {
        match self {
            Preallocation::Off => "off",
            Preallocation::Metadata => "metadata",
            Preallocation::Falloc => "falloc",
            Preallocation::Full => "full",
        }
    }
}

/// Options of `image convert`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvertOptions {
    /// Source format (`-f`); probed when `None`.
    pub src_format: Option<Format>,
    /// Output format (`-O`; raw by default, as with `qemu-img convert`).
    pub out_format: Format,
    /// Compress the output's clusters (`-c`; qcow2 output only).
    pub compress: bool,
    /// Output cluster size (`-o cluster_size=`).
    pub cluster_size: u64,
    /// Output refcount width (`-o refcount_bits=`).
    pub refcount_bits: u32,
    /// Output compression type (`-o compression_type=`).
    pub compression_type: CompressionType,
    /// Set the lazy-refcounts bit in the output (`-o lazy_refcounts=on`).
    pub lazy_refcounts: bool,
    /// Extended L2 entries in the output (`-o extended_l2=on`; clusters of 16 KiB or more).
    pub extended_l2: bool,
    /// The output's header version (`-o compat=`): 3 (`1.1`, `v3`; the default) or 2
    /// (`0.10`, `v2`: 16-bit refcounts, zlib, no lazy refcounts or extended L2 entries).
    pub version: u32,
    /// Read this internal snapshot of a qcow2 source (`-l`, by ID or name) instead of its
    /// current disk.
    pub snapshot: Option<String>,
    /// Zero runs this long (bytes, a multiple of 512 up to 16 MiB) are not written
    /// (`-S`; 4 KiB when `None`, as qemu-img). 0: nothing is skipped, the output is fully
    /// allocated.
    pub sparse_size: Option<u64>,
    /// Compression threads (`-m`; 0: one per core, at least 4 as QEMU's qcow2 driver runs).
    pub threads: usize,
    /// The output is an overlay on this backing file (`-B`, stored as given: a relative
    /// name is relative to the output's directory). Only what the source's top layer holds
    /// is written; where that layer is unallocated the new backing file shows through.
    pub backing: Option<String>,
    /// Format of the backing file (`-F`; probed when `None`).
    pub backing_format: Option<Format>,
    /// Convert into the existing output (`-n`, opened as `out_format`; at least the
    /// source's virtual size): nothing is created, the output-creation options do not apply,
    /// and where the source reads zeros the output is zeroed (zero clusters, or holes punched
    /// in a raw file), as qemu-img does. Past the source's size the output is left as it is.
    pub existing: bool,
    /// `-o preallocation=` (qcow2 and raw output; raw has no `metadata`).
    pub preallocation: Preallocation,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            src_format: None,
            out_format: Format::Raw,
            compress: false,
            cluster_size: crate::disk::DEFAULT_CLUSTER_SIZE,
            refcount_bits: crate::disk::DEFAULT_REFCOUNT_BITS,
            compression_type: CompressionType::Zlib,
            lazy_refcounts: false,
            extended_l2: false,
            version: 3,
            snapshot: None,
            sparse_size: None,
            threads: 0,
            backing: None,
            backing_format: None,
            existing: false,
            preallocation: Preallocation::Off,
        }
    }
}

impl ConvertOptions {
    /// Applies a `-o` list (`key=value,key=value`). Unknown keys, bad values, and keys
    /// that do not apply to the output format are errors naming the key.
    pub fn apply_o(&mut self, list: &str) -> Result<()> {
        for item in list.split(',').filter(|s| !s.is_empty()) {
            let (key, value) = item.split_once('=').ok_or_else(|| {
                Error::Usage(format!(
                    "-o `{item}`: expected key=value (e.g. cluster_size=64K)"
                ))
            })?;
            if self.out_format == Format::Raw && key != "preallocation" {
                return Err(Error::Usage(format!(
                    "-o {key}: raw output has no such option (only preallocation; use -O \
                     qcow2)"
                )));
            }
            let bad = |what: &str| Error::Usage(format!("-o {key}={value}: {what}"));
            match key {
                "cluster_size" => {
                    let v = parse_size(value).map_err(|e| bad(&e))?;
                    if !v.is_power_of_two() || !(512..=2 << 20).contains(&v) {
                        return Err(bad(
                            "the cluster size must be a power of two from 512 to 2M",
                        ));
                    }
                    self.cluster_size = v;
                }
                "refcount_bits" => {
                    let v: u32 = value.parse().map_err(|_| bad("not a number"))?;
                    if !v.is_power_of_two() || v > 64 {
                        return Err(bad("must be 1, 2, 4, 8, 16, 32 or 64"));
                    }
                    self.refcount_bits = v;
                }
                "compression_type" => {
                    self.compression_type = CompressionType::from_name(value)
                        .ok_or_else(|| bad("the compression type must be zlib or zstd"))?;
                }
                "lazy_refcounts" => {
                    self.lazy_refcounts =
                        parse_on_off(value).ok_or_else(|| bad("use on or off"))?;
                }
                "extended_l2" => {
                    self.extended_l2 = parse_on_off(value).ok_or_else(|| bad("use on or off"))?;
                }
                "compat" => {
                    self.version = match value {
                        "1.1" | "v3" => 3,
                        "0.10" | "v2" => 2,
                        _ => return Err(bad("use 0.10 (or v2) or 1.1 (or v3)")),
                    };
                }
                "preallocation" => {
                    self.preallocation = match value {
                        "off" => Preallocation::Off,
                        "metadata" => Preallocation::Metadata,
                        "falloc" => Preallocation::Falloc,
                        "full" => Preallocation::Full,
                        _ => return Err(bad("use off, metadata, falloc or full")),
                    };
                }
                other => {
                    return Err(Error::Usage(format!(
                        "-o {other}: unknown option (known: cluster_size, refcount_bits, \
                         compression_type, lazy_refcounts, extended_l2, compat, preallocation)"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Checks the combination of options.
    pub fn validate(&self) -> Result<()> {
        if self.compress && self.out_format != Format::Qcow2 {
            return Err(Error::Usage(
                "-c (compress) needs qcow2 output (-O qcow2)".into(),
            ));
        }
        if self.preallocation != Preallocation::Off {
            let refuse = |what: &str| {
                Err(Error::Usage(format!(
                    "-o preallocation={}: {what}",
                    self.preallocation.name()
                )))
            };
            if self.out_format == Format::Raw && self.preallocation == Preallocation::Metadata {
                return refuse(
                    "unsupported preallocation mode for raw output (use falloc or full)",
                );
            }
            if self.compress {
                return refuse("not with -c (compressed clusters go into new clusters)");
            }
            if self.backing.is_some() {
                return refuse("not with -B (an overlay's clusters read from its backing file)");
            }
        }
        if self.existing && self.backing.is_some() {
            return Err(Error::Usage(
                "-n and -B together are not supported: -n keeps the output's own header, \
                 backing file included"
                    .into(),
            ));
        }
        if self.existing && self.compress {
            return Err(Error::Usage(
                "-n and -c together are not supported (compressed clusters can only be \
                 written into unallocated ones)"
                    .into(),
            ));
        }
        if self.backing.is_some() {
            let refuse = |what: &str| Err(Error::Usage(format!("-B {what}")));
            if self.out_format != Format::Qcow2 {
                return refuse("(backing file) needs qcow2 output (-O qcow2)");
            }
        } else if self.backing_format.is_some() {
            return Err(Error::Usage(
                "-F (backing format) needs -B (backing file)".into(),
            ));
        }
        let v2 = CreateOptions {
            refcount_bits: self.refcount_bits,
            lazy_refcounts: self.lazy_refcounts,
            compression_type: self.compression_type,
            extended_l2: self.extended_l2,
            ..CreateOptions::default()
        };
        if self.version == 2
            && let Some(key) = v2.beyond_version_2()
        {
            // Refused with QEMU's reason, before any file is made.
            return Err(Error::Usage(format!(
                "-o {key}: only supported with compatibility level 1.1 and above (use \
                 compat=1.1, or leave compat=0.10 out)"
            )));
        }
        if self.extended_l2 && self.cluster_size < 16 << 10 {
            return Err(Error::Usage(
                "-o extended_l2=on needs clusters of 16K or more (-o cluster_size=...)".into(),
            ));
        }
        if let Some(s) = self.sparse_size
            && (!s.is_multiple_of(512) || s > MAX_SPARSE_SIZE)
        {
            return Err(Error::Usage(format!(
                "-S {s}: the sparse size must be a multiple of 512 up to 16M (0: no sparse \
                 output)"
            )));
        }
        Ok(())
    }

    /// Sets the snapshot to read from a `-l` parameter, as qemu-img takes it: `NAME_OR_ID`,
    /// `snapshot.name=NAME` or `snapshot.id=ID`.
    pub fn set_snapshot(&mut self, param: &str) -> Result<()> {
        let mut found = None;
        for item in param.split(',') {
            let value = match item.split_once('=') {
                Some(("snapshot.name" | "snapshot.id", v)) => v,
                Some((key, _)) => {
                    return Err(Error::Usage(format!(
                        "-l {param}: unknown key `{key}` (use snapshot.name=NAME, \
                         snapshot.id=ID or just the name or ID)"
                    )));
                }
                None => item,
            };
            if value.is_empty() || found.replace(value).is_some() {
                return Err(Error::Usage(format!(
                    "-l {param}: give one snapshot name or ID"
                )));
            }
        }
        self.snapshot = found.map(str::to_string);
        Ok(())
    }

    /// Zero detection granularity of the output: `None` writes everything (`-S 0`).
    fn zero_block(&self, cluster_size: u64) -> Option<u64> {
        let s = self.sparse_size.unwrap_or(DEFAULT_SPARSE_SIZE);
        if s == 0 {
            return None;
        }
        Some(match self.out_format {
            Format::Raw => s,
            // Preallocated clusters are written in place: zero runs inside them are skipped.
            Format::Qcow2 if self.preallocation != Preallocation::Off => s,
            // A qcow2 cluster is allocated whole: whole clusters of zeros are skipped.
            Format::Qcow2 => s.next_multiple_of(cluster_size),
        })
    }
}

/// qemu-img's default `-S`: 4 KiB.
const DEFAULT_SPARSE_SIZE: u64 = 4096;

/// qemu-img's largest `-S`: 16 MiB.
const MAX_SPARSE_SIZE: u64 = 16 << 20;

fn parse_on_off(v: &str) -> Option<bool> {
    match v {
        "on" | "true" | "yes" => Some(true),
        "off" | "false" | "no" => Some(false),
        _ => None,
    }
}

/// What [`convert`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConvertSummary {
    /// Virtual size of the disk.
    pub virtual_size: u64,
    /// Bytes read from the source (its data ranges).
    pub bytes_read: u64,
    /// Guest bytes written to the output (zeros skipped).
    pub bytes_written: u64,
    /// Clusters written compressed.
    pub compressed_clusters: u64,
    /// Clusters that did not shrink and were written uncompressed (with `-c`).
    pub uncompressed_clusters: u64,
    /// Length of the output file.
    pub out_file_len: u64,
}

/// The source disk: a raw file (holes found with `SEEK_DATA`) or an image on the engine.
enum Source {
    Raw {
        file: File,
        size: u64,
    },
    Image {
        image: Box<Qcow2<FileDisk>>,
        /// `-B` with output clusters of this size: whole output clusters that the top
        /// layer leaves to the backing chain are holes, not read (the new backing file
        /// shows through there). An output cluster only partly left to the chain is read
        /// whole, through the chain.
        top_only: Option<u64>,
    },
}

impl Source {
    fn size(&self) -> u64 {
        match self {
            Source::Raw { size, .. } => *size,
            Source::Image { image, .. } => image.size(),
        }
    }

    /// Whether the run at `off` (at most `len` bytes) holds data, and how long it is.
    fn extent(&mut self, off: u64, len: u64) -> std::io::Result<(bool, u64)> {
        match self {
            Source::Raw { file, size } => {
                use rustix::fs::{SeekFrom, seek};
                let end = (off + len).min(*size);
                match seek(&*file, SeekFrom::Data(off)) {
                    Ok(d) if d > off => Ok((false, (d.min(end)) - off)),
                    Ok(_) => {
                        let h = seek(&*file, SeekFrom::Hole(off))
                            .map(|h| h.min(end))
                            .unwrap_or(end);
                        Ok((true, h.max(off + 1).min(end) - off))
                    }
                    // Nothing but a hole up to the end of the file.
                    Err(rustix::io::Errno::NXIO) => Ok((false, end - off)),
                    // A filesystem without SEEK_DATA: all of it is data.
                    Err(_) => Ok((true, end - off)),
                }
            }
            Source::Image { image, top_only } => {
                let mut len = len;
                if let Some(out_cs) = *top_only
                    && image.backing().is_some()
                {
                    // The run of granules (the larger of the two cluster sizes) that the top
                    // layer holds something of, or leaves wholly to the chain.
                    let g = out_cs.max(image.cluster_size());
                    let first = top_unallocated(image, off / g * g, g)?;
                    let mut pos = (off / g + 1) * g;
                    while pos < off + len && top_unallocated(image, pos, g)? == first {
                        pos += g;
                    }
                    len = pos.min(off + len) - off;
                    if first {
                        return Ok((false, len));
                    }
                }
                let e = image
                    .block_status(off, len)
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                let n = e.len.clamp(1, len);
                Ok((matches!(e.kind, Allocation::Data), n))
            }
        }
    }

    /// Whether the whole run at `off` (`len` bytes) is unallocated in a qcow2 source's top
    /// layer and so reads from its backing chain (false without a backing chain: there such
    /// clusters read as zeros).
    fn reads_from_backing(&mut self, off: u64, len: u64) -> std::io::Result<bool> {
        match self {
            Source::Image { image, .. } if image.backing().is_some() => {
                top_unallocated(image, off, len)
            }
            _ => Ok(false),
        }
    }

    fn read(&mut self, off: u64, buf: &mut [u8]) -> std::io::Result<()> {
        match self {
            Source::Raw { file, .. } => file.read_exact_at(buf, off),
            Source::Image { image, .. } => image
                .read(off, buf)
                .map_err(|e| std::io::Error::other(e.to_string())),
        }
    }

    /// Reads `buf.len()` bytes at `off`, only the data ranges (the rest filled with zeros);
    /// returns the bytes read and whether any range held data.
    fn read_sparse(&mut self, off: u64, buf: &mut [u8]) -> std::io::Result<(u64, bool)> {
        let len = buf.len() as u64;
        let mut done = 0;
        let mut read = 0;
        while done < len {
            let (data, n) = self.extent(off + done, len - done)?;
            let range = done as usize..(done + n) as usize;
            if data {
                self.read(off + done, &mut buf[range])?;
                read += n;
            } else {
                buf[range].fill(0);
            }
            done += n;
        }
        Ok((read, read > 0))
    }
}

fn disk_err<'a>(path: &'a Path, action: &'static str) -> impl Fn(std::io::Error) -> Error + 'a {
    move |e| Error::disk(path, action, e)
}

fn engine_err<'a>(path: &'a Path, action: &'static str) -> impl Fn(Qcow2Error) -> Error + 'a {
    move |e| Error::disk(path, action, e)
}

/// Which format `path` holds: the qcow2 magic says qcow2; a qcow2 header with a damaged
/// magic is refused (converting it as raw would copy its metadata as data).
fn probe_format(path: &Path) -> Result<Format> {
    let file = File::open(path).map_err(disk_err(path, "open"))?;
    let mut first = vec![0u8; probe::PROBE_LEN];
    let n = file
        .read_at(&mut first, 0)
        .map_err(disk_err(path, "read"))?;
    match probe::probe(&first[..n]) {
        Probe::Qcow2 => Ok(Format::Qcow2),
        Probe::Raw => Ok(Format::Raw),
        _ => Err(Error::disk(
            path,
            "probe",
            "it looks like a qcow2 image with a damaged magic; give -f raw to convert its \
             bytes as they are, or check it with `qcow-metal image check`",
        )),
    }
}

/// Whether every cluster of `q`'s own (top) layer (of the snapshot read with `-l`) that the
/// run at `off` (`len` bytes, cut at the disk's end) touches is unallocated.
fn top_unallocated(q: &mut Qcow2<FileDisk>, off: u64, len: u64) -> std::io::Result<bool> {
    let end = (off + len).min(q.size());
    if end <= off {
        return Ok(false);
    }
    let cs = q.cluster_size();
    for vc in off / cs..=(end - 1) / cs {
        // The snapshot's own clusters with -l.
        let m = q
            .view_mapping(vc)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        if m != Mapping::Unallocated {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Opens the source: a raw file, or a qcow2 image with its backing chain (one of its
/// snapshots with `snapshot`; with `top_only`, what its top layer leaves to the chain reads
/// as holes, see [`Source::Image`]).
fn open_source(
    path: &Path,
    format: Option<Format>,
    snapshot: Option<&str>,
    top_only: Option<u64>,
) -> Result<Source> {
    crate::guard::ensure_regular(path)?;
    let format = match format {
        Some(f) => f,
        None => probe_format(path)?,
    };
    match format {
        Format::Raw => {
            if snapshot.is_some() {
                return Err(Error::Usage(format!(
                    "-l: {} is a raw file, which has no snapshots",
                    path.display()
                )));
            }
            let file = File::open(path).map_err(disk_err(path, "open"))?;
            let size = file.metadata().map_err(disk_err(path, "open"))?.len();
            Ok(Source::Raw { file, size })
        }
        Format::Qcow2 => {
            let opts = OpenOptions {
                read_only: true,
                l2_cache_bytes: 32 << 20,
                ..OpenOptions::default()
            };
            // With its backing chain: unallocated clusters read through to the layers below.
            let mut image = qcow_metal::qcow2::chain::files::open(path, opts)
                .map_err(|e| Error::disk(path, "open", e))?;
            if let Some(name) = snapshot {
                if image
                    .find_snapshot(name)
                    .map_err(engine_err(path, "read the snapshots of"))?
                    .is_none()
                {
                    return Err(Error::disk(
                        path,
                        "read snapshot",
                        format!(
                            "it has no snapshot with ID or name `{name}` (see `qcow-metal \
                             image snapshot -l`)"
                        ),
                    ));
                }
                // From here on reads, sizes and block status are the snapshot's.
                image
                    .select_view(Some(name))
                    .map_err(|e| Error::disk(path, "read snapshot", e))?;
            }
            Ok(Source::Image {
                image: Box::new(image),
                top_only,
            })
        }
    }
}

/// Bytes read per step: large reads through the engine (one device call per contiguous
/// host run), rounded to whole output clusters.
const CHUNK: u64 = 2 << 20;

/// `image convert`: copies the disk in `src` to a new `dst` (an existing `dst` is
/// replaced, as `qemu-img convert` does; the source itself is refused).
/// `progress(done, total)` reports virtual bytes processed.
pub fn convert(
    src: &Path,
    dst: &Path,
    opts: &ConvertOptions,
    mut progress: impl FnMut(u64, u64),
) -> Result<ConvertSummary> {
    opts.validate()?;
    let _src_lock = crate::guard::lock_disk(src, true)?;
    let mut source = open_source(
        src,
        opts.src_format,
        opts.snapshot.as_deref(),
        opts.backing.is_some().then_some(opts.cluster_size),
    )?;
    if same_file(src, dst) {
        return Err(Error::disk(
            dst,
            "write",
            "it is the source image; convert into another file",
        ));
    }
    // Nor a layer under the source: replacing it would destroy what is being read.
    if std::fs::metadata(dst).is_ok() {
        let layers = chain_files::resolve_if_qcow2(src).unwrap_or_default();
        refuse_layer_as_output(dst, &layers, "the source's backing chain")?;
    }
    let size = source.size();
    let mut summary = ConvertSummary {
        virtual_size: size,
        ..Default::default()
    };
    if opts.existing {
        into_existing(&mut source, src, dst, opts, &mut summary, &mut progress)?;
        summary.out_file_len = std::fs::metadata(dst).map_err(disk_err(dst, "open"))?.len();
        return Ok(summary);
    }
    match opts.out_format {
        Format::Raw => {
            let file = File::create(dst).map_err(disk_err(dst, "create"))?;
            file.set_len(size).map_err(disk_err(dst, "write"))?;
            if opts.preallocation == Preallocation::Falloc {
                // Before the data, as qemu-img takes it (what is written later splits the
                // allocated extents as it does there).
                take_space(&file, opts.preallocation).map_err(disk_err(dst, "preallocate"))?;
            }
            let block = opts.zero_block(1);
            let chunk_len = chunk_len(block, 512);
            let mut behind = WriteBehind::default();
            copy_nonzero(
                &mut source,
                chunk_len,
                block,
                &mut summary,
                &mut progress,
                |at, bytes| {
                    file.write_all_at(bytes, at).map_err(CopyError::WriteFile)?;
                    behind.wrote(&file, bytes.len());
                    Ok(())
                },
            )
            .map_err(|e| e.named(src, dst))?;
            if opts.preallocation == Preallocation::Full {
                take_space(&file, opts.preallocation).map_err(disk_err(dst, "preallocate"))?;
            }
            file.sync_all().map_err(disk_err(dst, "flush"))?;
        }
        Format::Qcow2 => {
            let cs = opts.cluster_size;
            let mut create = CreateOptions {
                version: opts.version,
                virtual_size: size,
                cluster_size: cs,
                refcount_bits: opts.refcount_bits,
                lazy_refcounts: opts.lazy_refcounts,
                compression_type: opts.compression_type,
                extended_l2: opts.extended_l2,
                open: OpenOptions {
                    // Tables for the whole disk stay cached: no write-back before close.
                    l2_cache_bytes: (size / cs * 8).clamp(1 << 20, 64 << 20),
                    refcount_cache_bytes: 4 << 20,
                    ..OpenOptions::default()
                },
                ..CreateOptions::default()
            };
            let below = match &opts.backing {
                Some(name) => {
                    let (format, below) = open_new_backing(dst, name, opts.backing_format)?;
                    create.backing_file = Some(name.clone());
                    create.backing_format = Some(format);
                    below
                }
                None => None,
            };
            let dev = FileDisk::create(dst).map_err(disk_err(dst, "create"))?;
            let mut image = Qcow2::create_with_backing(dev, &create, below)
                .map_err(engine_err(dst, "create"))?;
            if opts.preallocation != Preallocation::Off {
                // Host clusters in virtual order before the data, as qemu-img lays them out.
                image
                    .preallocate(0, size)
                    .map_err(engine_err(dst, "preallocate"))?;
            }
            if opts.compress {
                let chunk_len = chunk_len(Some(cs), cs);
                compress::to_compressed(
                    &mut source,
                    &mut image,
                    opts,
                    chunk_len,
                    &mut summary,
                    &mut progress,
                )
                .map_err(|e| e.named(src, dst))?;
            } else if opts.backing.is_some() {
                to_overlay(&mut source, &mut image, opts, &mut summary, &mut progress)
                    .map_err(|e| e.named(src, dst))?;
            } else {
                let block = opts.zero_block(cs);
                let mut behind = WriteBehind::default();
                copy_nonzero(
                    &mut source,
                    chunk_len(block, cs),
                    block,
                    &mut summary,
                    &mut progress,
                    |at, bytes| {
                        image.write_at(at, bytes).map_err(CopyError::Write)?;
                        behind.wrote(image.device().file(), bytes.len());
                        Ok(())
                    },
                )
                .map_err(|e| e.named(src, dst))?;
            }
            // close() writes the metadata back and flushes the file.
            let dev = image.close().map_err(engine_err(dst, "write"))?;
            if opts.preallocation != Preallocation::Off {
                take_space(dev.file(), opts.preallocation).map_err(disk_err(dst, "preallocate"))?;
                dev.file().sync_all().map_err(disk_err(dst, "flush"))?;
            }
        }
    }
    summary.out_file_len = std::fs::metadata(dst).map_err(disk_err(dst, "open"))?.len();
    Ok(summary)
}

/// `-n`: copies the source into the existing `dst` (format `opts.out_format`, at least the
/// source's size, locked while it is written): data where the source has data, zeros (zero
/// clusters, or holes punched in a raw file) where it reads zeros.
fn into_existing(
    source: &mut Source,
    src: &Path,
    dst: &Path,
    opts: &ConvertOptions,
    summary: &mut ConvertSummary,
    progress: &mut impl FnMut(u64, u64),
) -> Result<()> {
    if std::fs::metadata(dst).is_err() {
        return Err(Error::disk(
            dst,
            "open",
            "it does not exist (with -n the output must exist; leave -n out to create it)",
        ));
    }
    let _lock = crate::guard::lock_disk(dst, false)?;
    let size = source.size();
    let too_small = |have: u64| {
        Error::disk(
            dst,
            "write",
            format!(
                "output file is smaller than input file ({have} bytes, the source is {size}; \
                 grow it with `qcow-metal image resize`)"
            ),
        )
    };
    let mut out = match opts.out_format {
        Format::Raw => {
            let (file, len) = open_raw_rw(dst)?;
            if len < size {
                return Err(too_small(len));
            }
            Existing::Raw(file)
        }
        Format::Qcow2 => {
            let open = OpenOptions {
                l2_cache_bytes: 32 << 20,
                refcount_cache_bytes: 4 << 20,
                ..OpenOptions::default()
            };
            let image = chain_files::open(dst, open).map_err(|e| Error::disk(dst, "open", e))?;
            if image.size() < size {
                return Err(too_small(image.size()));
            }
            Existing::Image(Box::new(image))
        }
    };
    let granule = match &out {
        Existing::Raw(_) => 1,
        Existing::Image(image) => image.cluster_size(),
    };
    let block = opts.zero_block(granule);
    let mut behind = WriteBehind::default();
    copy_with_zeros(
        source,
        chunk_len(block, granule.max(512)),
        block,
        summary,
        progress,
        |at, bytes, data| match &mut out {
            Existing::Raw(file) if data => {
                file.write_all_at(bytes, at).map_err(CopyError::WriteFile)?;
                behind.wrote(file, bytes.len());
                Ok(())
            }
            Existing::Raw(file) => punch_zeros(file, at, bytes).map_err(CopyError::WriteFile),
            Existing::Image(image) if data => {
                image.write_at(at, bytes).map_err(CopyError::Write)?;
                behind.wrote(image.device().file(), bytes.len());
                Ok(())
            }
            // With its own backing chain: a zero range hides what lies below.
            Existing::Image(image) => image
                .zero_range(at, bytes.len() as u64, true)
                .map_err(CopyError::Write),
        },
    )
    .map_err(|e| e.named(src, dst))?;
    match out {
        Existing::Raw(file) => file.sync_all().map_err(disk_err(dst, "flush"))?,
        Existing::Image(image) => {
            image.close().map_err(engine_err(dst, "write"))?;
        }
    }
    Ok(())
}

/// The existing output of `-n`.
enum Existing {
    /// A raw file.
    Raw(File),
    /// A qcow2 image, with its backing chain.
    Image(Box<Qcow2<FileDisk>>),
}

/// Takes the space of the whole file as `-o preallocation=` asks: `falloc` allocates it
/// (`fallocate`, what is there stays), `full` writes zeros into its holes; `metadata` leaves
/// it sparse (the zeros the engine wrote at its end to lengthen it become a hole again).
fn take_space(file: &File, mode: Preallocation) -> std::io::Result<()> {
    use rustix::fs::{FallocateFlags, SeekFrom, fallocate, seek};
    let len = file.metadata()?.len();
    match mode {
        Preallocation::Metadata if len >= 4096 => {
            let mut tail = [0u8; 4096];
            file.read_exact_at(&mut tail, len - 4096)?;
            if is_zero(&tail) {
                punch_zeros(file, len - 4096, &tail)?;
            }
            Ok(())
        }
        Preallocation::Falloc if len > 0 => Ok(fallocate(file, FallocateFlags::empty(), 0, len)?),
        Preallocation::Full => {
            let zeros = vec![0u8; 1 << 20];
            let mut pos = 0;
            while pos < len {
                let hole = seek(file, SeekFrom::Hole(pos)).map_or(len, |h| h.min(len));
                if hole >= len {
                    break;
                }
                let data = match seek(file, SeekFrom::Data(hole)) {
                    Ok(d) => d.min(len),
                    Err(_) => len,
                };
                let mut at = hole;
                while at < data {
                    let n = (data - at).min(zeros.len() as u64) as usize;
                    file.write_all_at(&zeros[..n], at)?;
                    at += n as u64;
                }
                pos = data;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Opens the existing raw file `path` for writing; returns it and its length.
fn open_raw_rw(path: &Path) -> Result<(File, u64)> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(disk_err(path, "open"))?;
    let len = file.metadata().map_err(disk_err(path, "open"))?.len();
    Ok((file, len))
}

/// Makes `zeros.len()` bytes at `at` of a raw file read as zeros: a hole punched where the
/// filesystem can, the zeros written where it cannot.
fn punch_zeros(file: &File, at: u64, zeros: &[u8]) -> std::io::Result<()> {
    use rustix::fs::{FallocateFlags, fallocate};
    let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
    match fallocate(file, flags, at, zeros.len() as u64) {
        Ok(()) => Ok(()),
        Err(_) => file.write_all_at(zeros, at),
    }
}

/// Copies the whole source with `write(disk offset, bytes, whether they are data)`: its
/// nonzero `block`-sized pieces as data (all of it when `block` is `None`), the rest as
/// zeros.
fn copy_with_zeros(
    source: &mut Source,
    chunk_len: usize,
    block: Option<u64>,
    summary: &mut ConvertSummary,
    progress: &mut impl FnMut(u64, u64),
    mut write: impl FnMut(u64, &[u8], bool) -> std::result::Result<(), CopyError>,
) -> std::result::Result<(), CopyError> {
    each_chunk(
        source,
        chunk_len,
        summary,
        progress,
        |_, off, chunk, any, summary| {
            let runs = match block {
                None => vec![(0, chunk.len())],
                Some(_) if !any => Vec::new(),
                Some(b) => nonzero_runs(chunk, b as usize),
            };
            let mut pos = 0;
            for (start, end) in runs {
                if start > pos {
                    write(off + pos as u64, &chunk[pos..start], false)?;
                }
                write(off + start as u64, &chunk[start..end], true)?;
                summary.bytes_written += (end - start) as u64;
                pos = end;
            }
            if pos < chunk.len() {
                write(off + pos as u64, &chunk[pos..], false)?;
            }
            Ok(())
        },
    )
}

/// An error while copying: on which side.
enum CopyError {
    Read(std::io::Error),
    Write(Qcow2Error),
    /// A write to a raw output file failed.
    WriteFile(std::io::Error),
    /// A compressor could not be set up.
    Compress(std::io::Error),
}

impl CopyError {
    fn named(self, src: &Path, dst: &Path) -> Error {
        match self {
            CopyError::Read(e) => Error::disk(src, "read", e),
            CopyError::Write(e) => Error::disk(dst, "write", e),
            CopyError::WriteFile(e) => Error::disk(dst, "write", e),
            CopyError::Compress(e) => Error::disk(dst, "compress clusters for", e),
        }
    }
}

/// Bytes per step for zero blocks of `block` bytes (`None`: no zero detection).
fn chunk_len(block: Option<u64>, cluster_size: u64) -> usize {
    let unit = block.unwrap_or(1).max(cluster_size);
    CHUNK.max(unit).next_multiple_of(unit) as usize
}

/// Starts the write-back of the output while the copy goes on, so that the final flush
/// finds little left to write: after every [`WriteBehind::STEP`] bytes written, the
/// kernel is asked to write the file's dirty pages out (`posix_fadvise(DONTNEED)`, which
/// starts write-back without waiting and drops pages already clean). Durability still
/// comes from the flush at the end; this only overlaps the disk's work with the copy.
#[derive(Default)]
struct WriteBehind {
    since: usize,
}

impl WriteBehind {
    /// Bytes written between two write-back starts.
    const STEP: usize = 32 << 20;

    fn wrote(&mut self, file: &File, n: usize) {
        self.since += n;
        if self.since >= Self::STEP {
            self.since = 0;
            // Advice only: a filesystem that ignores it changes nothing.
            let _ = rustix::fs::fadvise(file, 0, None, rustix::fs::Advice::DontNeed);
        }
    }
}

/// Copies the source's nonzero `block`-sized pieces (all of it when `block` is `None`)
/// with `write(disk offset, bytes)`; the zeros are left out.
fn copy_nonzero(
    source: &mut Source,
    chunk_len: usize,
    block: Option<u64>,
    summary: &mut ConvertSummary,
    progress: &mut impl FnMut(u64, u64),
    mut write: impl FnMut(u64, &[u8]) -> std::result::Result<(), CopyError>,
) -> std::result::Result<(), CopyError> {
    copy_with_zeros(
        source,
        chunk_len,
        block,
        summary,
        progress,
        |at, bytes, data| if data { write(at, bytes) } else { Ok(()) },
    )
}

/// Reads the source `chunk_len` bytes at a time (holes as zeros, [`Source::read_sparse`])
/// and hands each chunk to `f(offset, bytes, whether any of it is data, summary)`;
/// reports progress after each.
fn each_chunk(
    source: &mut Source,
    chunk_len: usize,
    summary: &mut ConvertSummary,
    progress: &mut impl FnMut(u64, u64),
    mut f: impl FnMut(
        &mut Source,
        u64,
        &[u8],
        bool,
        &mut ConvertSummary,
    ) -> std::result::Result<(), CopyError>,
) -> std::result::Result<(), CopyError> {
    let size = source.size();
    let mut buf = vec![0u8; chunk_len];
    let mut off = 0;
    while off < size {
        let n = (chunk_len as u64).min(size - off) as usize;
        let chunk = &mut buf[..n];
        let (read, any) = source.read_sparse(off, chunk).map_err(CopyError::Read)?;
        summary.bytes_read += read;
        f(source, off, chunk, any, summary)?;
        off += n as u64;
        progress(off, size);
    }
    Ok(())
}

/// Runs of `block`-sized pieces of `buf` that hold a nonzero byte, merged.
fn nonzero_runs(buf: &[u8], block: usize) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, piece) in buf.chunks(block).enumerate() {
        if is_zero(piece) {
            continue;
        }
        let (start, end) = (i * block, i * block + piece.len());
        match runs.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => runs.push((start, end)),
        }
    }
    runs
}

/// Whether every byte is zero (64 bytes at a time, which the compiler vectorises).
pub fn is_zero(buf: &[u8]) -> bool {
    let mut chunks = buf.chunks_exact(64);
    for c in &mut chunks {
        if c.iter().fold(0u8, |a, &b| a | b) != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

/// Whether `a` and `b` are the same existing file.
fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Refuses an output file that is one of the `layers` (`what` names the chain).
fn refuse_layer_as_output(dst: &Path, layers: &[ChainFile], what: &str) -> Result<()> {
    match layers.iter().find(|l| same_file(&l.path, dst)) {
        Some(l) => Err(Error::disk(
            dst,
            "write",
            format!(
                "it is {} in {what}; convert into another file",
                l.path.display()
            ),
        )),
        None => Ok(()),
    }
}

/// Opens the backing file `name` of a new overlay at `dst` (resolved as QEMU resolves it:
/// relative to `dst`'s directory) with its own chain; returns its format (`format`, else
/// probed) and the layer.
fn open_new_backing(
    dst: &Path,
    name: &str,
    format: Option<Format>,
) -> Result<(LayerFormat, Option<Backing<FileDisk>>)> {
    let path = match dst.parent() {
        Some(dir) if !Path::new(name).is_absolute() => dir.join(name),
        _ => Path::new(name).to_path_buf(),
    };
    let format = match format {
        Some(f) => f,
        None => probe_format(&path)?,
    };
    let format = match format {
        Format::Raw => LayerFormat::Raw,
        Format::Qcow2 => LayerFormat::Qcow2,
    };
    let mut chain = vec![ChainFile {
        path: path.clone(),
        name: name.to_string(),
        format,
        virtual_size: 0,
    }];
    if format == LayerFormat::Qcow2 {
        chain.extend(chain_files::resolve(&path).map_err(|e| Error::disk(&path, "open", e))?);
    }
    refuse_layer_as_output(dst, &chain, "the new backing chain (-B)")?;
    let below = chain_files::open_layers(&chain, &OpenOptions::default())
        .map_err(|e| Error::disk(&path, "open the backing file", e))?;
    Ok((format, below))
}

/// What a cluster of an overlay output becomes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum OverlayRun {
    /// The new backing file shows through (the source's top layer has nothing there).
    Through,
    /// A zero cluster (hides the backing file).
    Zero,
    /// Data.
    Data,
}

/// `-B`: copies what the source's top layer holds into the overlay `image`: data as data,
/// zeros (holes of a source without a backing chain too) as zero clusters so that the
/// backing file does not show through; clusters the source's top layer leaves to its own
/// backing chain are left unallocated, as qemu-img leaves them.
fn to_overlay(
    source: &mut Source,
    image: &mut Qcow2<FileDisk>,
    opts: &ConvertOptions,
    summary: &mut ConvertSummary,
    progress: &mut impl FnMut(u64, u64),
) -> std::result::Result<(), CopyError> {
    let cs = image.cluster_size();
    let detect_zeros = opts.zero_block(cs).is_some();
    let chunk_len = chunk_len(Some(cs), cs);
    each_chunk(
        source,
        chunk_len,
        summary,
        progress,
        |source, off, chunk, _, summary| {
            // Runs of clusters of one kind, written as one request each.
            let mut runs: Vec<(OverlayRun, usize, usize)> = Vec::new();
            for start in (0..chunk.len()).step_by(cs as usize) {
                let end = (start + cs as usize).min(chunk.len());
                let piece = &chunk[start..end];
                let kind = if source
                    .reads_from_backing(off + start as u64, piece.len() as u64)
                    .map_err(CopyError::Read)?
                {
                    OverlayRun::Through
                } else if detect_zeros && is_zero(piece) {
                    OverlayRun::Zero
                } else {
                    OverlayRun::Data
                };
                match runs.last_mut() {
                    Some(last) if last.0 == kind => last.2 = end,
                    _ => runs.push((kind, start, end)),
                }
            }
            for (kind, start, end) in runs {
                let at = off + start as u64;
                match kind {
                    OverlayRun::Through => {}
                    OverlayRun::Zero => image
                        .zero_range(at, (end - start) as u64, true)
                        .map_err(CopyError::Write)?,
                    OverlayRun::Data => {
                        image
                            .write_at(at, &chunk[start..end])
                            .map_err(CopyError::Write)?;
                        summary.bytes_written += (end - start) as u64;
                    }
                }
            }
            Ok(())
        },
    )
}

/// A new size as `image resize` takes it: `SIZE`, `+SIZE` or `-SIZE` (relative to `old`).
pub fn parse_new_size(text: &str, old: u64) -> std::result::Result<u64, String> {
    let t = text.trim();
    if let Some(rest) = t.strip_prefix('+') {
        let d = parse_size(rest)?;
        old.checked_add(d)
            .ok_or_else(|| format!("`{text}`: the new size does not fit in 64 bits"))
    } else if let Some(rest) = t.strip_prefix('-') {
        let d = parse_size(rest)?;
        old.checked_sub(d).ok_or_else(|| {
            format!("`{text}`: the image is only {old} bytes; cannot shrink it below zero")
        })
    } else {
        parse_size(t)
    }
}

/// What [`resize`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResizeSummary {
    /// The format of the image.
    pub format: Format,
    /// Virtual size before.
    pub old_size: u64,
    /// Virtual size after.
    pub new_size: u64,
}

/// `image resize [--shrink] IMAGE SIZE`: grows (or, with `shrink`, shrinks) the virtual
/// disk. A qcow2 image that shrinks loses the clusters past its new end, and its file is
/// cut to the image's new end. The image must not be in use (the disk lock is taken).
pub fn resize(
    path: &Path,
    format: Option<Format>,
    size: &str,
    shrink: bool,
) -> Result<ResizeSummary> {
    let _lock = crate::guard::lock_disk(path, false)?;
    let format = match format {
        Some(f) => f,
        None => probe_format(path)?,
    };
    let usage = |m: String| Error::Usage(m);
    match format {
        Format::Raw => {
            let (file, old) = open_raw_rw(path)?;
            let new = parse_new_size(size, old).map_err(usage)?;
            refuse_unasked_shrink(new, old, shrink)?;
            file.set_len(new).map_err(disk_err(path, "resize"))?;
            file.sync_all().map_err(disk_err(path, "flush"))?;
            Ok(ResizeSummary {
                format,
                old_size: old,
                new_size: new,
            })
        }
        Format::Qcow2 => {
            // With its backing chain (an overlay opens only over its layers).
            let open = |opts| {
                qcow_metal::qcow2::chain::files::open(path, opts)
                    .map_err(|e| Error::disk(path, "open", e))
            };
            let mut image = open(OpenOptions::default())?;
            let old = image.size();
            let new = parse_new_size(size, old).map_err(usage)?;
            refuse_unasked_shrink(new, old, shrink)?;
            if new == 0 {
                return Err(Error::Usage("the virtual size must not be zero".into()));
            }
            if new < old {
                image.shrink(new).map_err(engine_err(path, "shrink"))?;
            } else {
                image.resize(new).map_err(engine_err(path, "resize"))?;
            }
            let new = image.size();
            image.close().map_err(engine_err(path, "write"))?;
            if new < old {
                // Freed clusters at the tail: cut the file to the image's new end.
                let mut image = open(OpenOptions::default())?;
                let extent = image
                    .space()
                    .map_err(engine_err(path, "read"))?
                    .image_extent;
                let dev = image.close().map_err(engine_err(path, "write"))?;
                if dev.len().map_err(disk_err(path, "open"))? > extent {
                    dev.set_len(extent).map_err(disk_err(path, "truncate"))?;
                    dev.file().sync_all().map_err(disk_err(path, "flush"))?;
                }
            }
            Ok(ResizeSummary {
                format,
                old_size: old,
                new_size: new,
            })
        }
    }
}

fn refuse_unasked_shrink(new: u64, old: u64, shrink: bool) -> Result<()> {
    if new < old && !shrink {
        return Err(Error::Usage(format!(
            "the new size ({new} bytes) is smaller than the image ({old} bytes): data past \
             the new end would be lost; give --shrink if that is what you want"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn o_options_parse_and_name_the_bad_one() {
        let mut o = ConvertOptions {
            out_format: Format::Qcow2,
            ..Default::default()
        };
        o.apply_o("cluster_size=4K,compression_type=zstd,refcount_bits=8,lazy_refcounts=on")
            .unwrap();
        assert_eq!(o.cluster_size, 4096);
        assert_eq!(o.compression_type, CompressionType::Zstd);
        assert_eq!(o.refcount_bits, 8);
        assert!(o.lazy_refcounts);
        for (bad, name) in [
            ("cluster_size=3000", "cluster_size"),
            ("compression_type=lz4", "compression_type"),
            ("refcount_bits=3", "refcount_bits"),
            ("compat=0.9", "compat"),
            ("frobnicate=1", "frobnicate"),
            ("cluster_size", "cluster_size"),
        ] {
            let e = o.apply_o(bad).unwrap_err().to_string();
            assert!(e.contains(name), "{bad}: {e}");
        }
        let mut raw = ConvertOptions::default();
        let e = raw.apply_o("cluster_size=64K").unwrap_err().to_string();
        assert!(e.contains("cluster_size") && e.contains("raw"), "{e}");
        raw.compress = true;
        assert!(raw.validate().unwrap_err().to_string().contains("-c"));
    }

    #[test]
    fn new_sizes_parse() {
        assert_eq!(parse_new_size("+1M", 1 << 20), Ok(2 << 20));
        assert_eq!(parse_new_size("-512K", 1 << 20), Ok(512 << 10));
        assert_eq!(parse_new_size("2G", 1), Ok(2 << 30));
        assert!(parse_new_size("-2M", 1 << 20).is_err());
        assert!(parse_new_size("+x", 1).is_err());
    }

    #[test]
    fn zero_runs() {
        let mut b = vec![0u8; 16384];
        b[5000] = 1;
        b[12288] = 2;
        assert_eq!(nonzero_runs(&b, 4096), vec![(4096, 8192), (12288, 16384)]);
        b[9000] = 3;
        assert_eq!(nonzero_runs(&b, 4096), vec![(4096, 16384)]);
        assert!(is_zero(&[0u8; 37]));
        assert!(!is_zero(&[
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1
        ]));
    }
}
