//! The qcow2 engine: a `no_std` + `alloc` implementation of QEMU's qcow2 format over any
//! [`BlockDevice`], serving it as a [`VirtualDisk`](crate::disk::VirtualDisk).
//!
//! Modules, one job each:
//! - [`header`]: header (v2/v3) parse and serialise, extensions, feature names and bits.
//! - [`layout`]: geometry arithmetic and [`max_image_len`].
//! - [`probe`]: `format=auto`: qcow2, raw, or a qcow2 header with a damaged magic.
//! - [`entry`]: L1/L2 entry bits and the [`Mapping`] of a guest cluster.
//! - [`cache`]: bounded write-back caches of metadata tables.
//! - `tables`: L1/L2 access through the cache, metadata write-back in crash-safe order.
//! - `refcount`: refcounts of any width; refcount blocks and table grown on demand.
//! - `allocator`: first-free cluster allocation with a cursor; deferred frees.
//! - `io`: read, write, discard, write-zeroes, block status.
//! - [`backing`]: the read-only layers under an overlay (backing chains).
//! - [`chain`]: naming the layers of a chain, opening it from its devices (or files).
//! - `create`, `open`: making and opening images; `resize`: growing the virtual size.
//! - `compact`: compaction (moving clusters from the tail into free space below).
//! - `snapshot`: internal snapshots: the table, create, apply, delete, read-only views.
//! - `bitmap`: persistent dirty bitmaps: loaded at open, recorded, stored at close.
//! - `compress`: compressing and inflating clusters (zlib/deflate and zstd).
//! - `packed`: writing compressed clusters, packed into shared host clusters.
//! - `check`: consistency check and repair, as `qemu-img check` reports them.
//! - `grow`: asking a device that grows on demand for room, ahead of need.
//! - `faults`: what a failing device turns into (`NoSpace` or a device error) and leaves.
//! - `overlap`: the metadata map and the overlap check before every write.
//! - `info`: statistics, space accounting, image information and the cluster map.
//!
//! Crash safety: guest data goes straight to the device; metadata changes collect in the
//! caches and reach the disk at [`Qcow2::flush_metadata`] (or when a dirty table is evicted)
//! in two phases: first what nothing on disk points to yet (refcount blocks, newly
//! allocated L2 tables), barrier, then the references (refcount-table pages, existing L2
//! tables, L1 pages, header), barrier; only then are freed clusters' refcounts decremented
//! (and written, barrier). So a reference never reaches the disk before the data, table and
//! refcount it relies on, and a refcount never drops before the reference is gone: a crash
//! leaves at worst leaked clusters. Refcount-table growth and L1 moves write their new
//! tables, barrier, switch the header, barrier, then free the old ones.

pub mod backing;
pub mod cache;
pub mod chain;
pub mod entry;
pub mod error;
pub mod header;
pub mod layout;
pub mod probe;
pub mod telemetry;

mod allocator;
mod bitmap;
mod check;
mod compact;
mod compress;
mod create;
mod faults;
mod grow;
mod info;
mod io;
mod map;
mod open;
mod overlap;
mod packed;
mod prealloc;
mod refcount;
mod resize;
mod snapshot;
mod tables;

#[cfg(test)]
mod tests;

pub use backing::{Backing, Layer};
pub use bitmap::BitmapInfo;
pub use check::CheckReport;
pub use compact::{CompactProgress, CompactionState};
pub use compress::{ClusterCompressor, CompressionType};
pub use entry::{ClusterKind, Mapping};
pub use error::Qcow2Error;
pub use info::{ImageInfo, MAX_LAYER_STATS, MapEntry, SpaceInfo, Stats};
pub use layout::max_image_len;
pub use snapshot::{Snapshot, SnapshotView};

use crate::block::BlockDevice;
use alloc::vec::Vec;
use cache::TableCache;
use header::Header;
use layout::Geometry;

/// How to open an image.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Refuse writes.
    pub read_only: bool,
    /// Budget of the L2-table cache (L1 pages share it), in bytes.
    pub l2_cache_bytes: u64,
    /// Budget of the refcount-block cache (refcount-table pages share it), in bytes.
    pub refcount_cache_bytes: u64,
    /// Use lazy refcounts when the image allows them (compatible bit 0): the image is marked
    /// dirty while open, refcount updates skip the ordering barrier, and the next open after
    /// a crash rebuilds the refcounts.
    pub lazy_refcounts: bool,
    /// Most memory a consistency check (or refcount rebuild) may use for its tables.
    pub check_memory_limit: u64,
    /// Open an image marked corrupt (incompatible bit 1) writable so that
    /// [`Qcow2::repair`] can fix it; guest writes stay refused until a repair leaves it clean.
    pub repair: bool,
    /// Make the device read as zeros past the image's end once, at open, so that clusters
    /// allocated there need not be padded with zeros.
    ///
    /// A device that cannot promise that bytes past the stored data read as zeros
    /// ([`BlockDevice::zeroes_from`](crate::block::BlockDevice::zeroes_from) is `None`, e.g.
    /// virtio-blk with a fixed capacity) otherwise makes every write into a fresh cluster
    /// write the whole cluster (a 4 KiB write into a 64 KiB cluster writes 64 KiB). With
    /// this option, a writable open of such a device issues one
    /// [`BlockDevice::write_zeroes`](crate::block::BlockDevice::write_zeroes) from the end of
    /// the last cluster in use (by the refcounts, after a dirty image's refcounts were
    /// rebuilt) to the device's capacity, then a flush, and from then on writes only the
    /// data into new clusters past that end.
    ///
    /// Crash safety: nothing the image references lies past its end (every cluster in use
    /// has a nonzero refcount, written before the reference to it), so the zeroing erases
    /// only free space; the flush makes the zeros durable before any cluster past the end
    /// is used. After a crash, whatever was written past the new end is again zeroed by the
    /// next open. Meant for devices whose write-zeroes command is cheap (virtio-blk with
    /// `VIRTIO_BLK_F_WRITE_ZEROES`); without one the range is written with zero buffers.
    /// Not done for read-only, corrupt or repair opens; a failed zeroing is not an error
    /// (new clusters are then padded as without this option). Default: `false`.
    pub zero_tail: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            read_only: false,
            l2_cache_bytes: 1024 * 1024,
            refcount_cache_bytes: 256 * 1024,
            lazy_refcounts: true,
            check_memory_limit: 256 * 1024 * 1024,
            repair: false,
            zero_tail: false,
        }
    }
}

/// How to create an image.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Header version: 3 (`compat=1.1`, the default) or 2 (`compat=0.10`: 16-bit refcounts,
    /// zlib, no lazy refcounts, no extended L2 entries, no zero flag).
    pub version: u32,
    /// Virtual disk size in bytes.
    pub virtual_size: u64,
    /// Cluster size in bytes: a power of two from 512 B to 2 MiB.
    pub cluster_size: u64,
    /// Refcount width in bits: 1, 2, 4, 8, 16, 32 or 64.
    pub refcount_bits: u32,
    /// Set the lazy-refcounts compatible bit.
    pub lazy_refcounts: bool,
    /// Compression type of compressed clusters written later (zstd sets incompatible bit 3).
    pub compression_type: CompressionType,
    /// Extended L2 entries (incompatible bit 4): 32 subclusters per cluster, each allocated
    /// and zeroed on its own. Needs clusters of 16 KiB or more (as QEMU).
    pub extended_l2: bool,
    /// Backing file name for an overlay, stored as given (a relative name is relative to
    /// the image's directory when the chain is resolved). The image must then be created
    /// with [`Qcow2::create_with_backing`] and its backing layer.
    pub backing_file: Option<alloc::string::String>,
    /// Format of the backing file, stored in the backing-format header extension.
    pub backing_format: Option<chain::LayerFormat>,
    /// Options for the engine the created image is opened with.
    pub open: OpenOptions,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            version: 3,
            virtual_size: 0,
            cluster_size: 65536,
            refcount_bits: 16,
            lazy_refcounts: false,
            compression_type: CompressionType::Zlib,
            extended_l2: false,
            backing_file: None,
            backing_format: None,
            open: OpenOptions::default(),
        }
    }
}

/// Which metadata cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pool {
    /// L1 pages and L2 tables.
    L2,
    /// Refcount-table pages and refcount blocks.
    Rc,
}

/// A qcow2 image on a block device.
pub struct Qcow2<D: BlockDevice> {
    dev: D,
    hdr: Header,
    geo: Geometry,
    opts: OpenOptions,
    read_only: bool,
    /// L1 pages and L2 tables.
    l2c: TableCache,
    /// Refcount-table pages and refcount blocks.
    rcc: TableCache,
    /// Entries in the refcount table.
    rt_entries: u64,
    /// Lowest host cluster that may be free.
    cursor: u64,
    /// One past the highest host cluster known to be in use.
    end: u64,
    /// Host clusters the device holds whole: where new clusters may be allocated.
    dev_clusters: u64,
    /// Host clusters that start on the device (the last may end past it; its bytes there
    /// read as zeros): where existing metadata and data may lie.
    dev_span: u64,
    /// Host cluster ranges (first, count) whose references are gone from the cache but whose
    /// refcounts are decremented only after the next metadata write-back.
    pending: Vec<(u64, u64)>,
    pending_count: u64,
    /// One past the highest cluster the last deferred frees freed (0: none).
    freed_top: u64,
    /// `Stats::clusters_freed` when the last compaction step found nothing to move: until
    /// more is freed, nothing is compactable.
    compact_done_at: Option<u64>,
    /// One cluster of scratch space (copy-on-write, table copies).
    scratch: Vec<u8>,
    /// Reused list of dirty slots during write-back.
    dirty_list: Vec<(u64, usize)>,
    header_dirty: bool,
    /// Autoclear bits cleared / dirty bit set for this session.
    write_started: bool,
    /// Lazy refcounts in use (the dirty bit is set while writing).
    lazy: bool,
    /// Decrementing deferred frees: evicted refcount blocks are written directly.
    in_free_phase: bool,
    /// During repair: clusters (by index) that are referenced and must not be allocated.
    guard: Option<Vec<u16>>,
    /// Host bytes at or past this offset are known to read as zeros (nothing written there
    /// since open, and the device said so): new clusters there need no zero padding.
    zero_from: u64,
    /// Whether the last run [`Qcow2::alloc_run`] returned lies in the known-zero area.
    last_alloc_zeroed: bool,
    /// The L2 table used last: (L1 index, table offset, cache slot, writable in place).
    l2_memo: Option<(u64, u64, usize, bool)>,
    /// The image is marked corrupt (found so, or opened so for repair): only repair writes.
    corrupt: bool,
    /// A repair is running (it may write to a corrupt image).
    repairing: bool,
    /// Inflates compressed clusters (state allocated on first use).
    inflater: compress::Inflater,
    /// Host byte offset where the next compressed cluster may go, inside a host cluster
    /// that already holds compressed data (`None`: start a new host cluster).
    packed_at: Option<u64>,
    /// Metadata clusters that writes must not land on (built at the first change of a
    /// writable session; `None` before and during repair).
    meta: Option<overlap::MetaMap>,
    /// Space counters kept up to date after the first [`Qcow2::space`] walk.
    tally: Option<info::Tally>,
    /// Persistent dirty bitmaps, when the bitmaps extension is in force and readable.
    bitmaps: Option<bitmap::Bitmaps>,
    /// Snapshots opened as views through [`crate::disk::VirtualDisk::select_view`].
    views: Vec<SnapshotView>,
    /// The view the [`crate::disk::VirtualDisk`] requests go to now (index into `views`).
    view: Option<usize>,
    stats: Stats,
    /// The layer unallocated clusters read from (see [`backing`]).
    backing: Option<alloc::boxed::Box<Backing<D>>>,
}

impl<D: BlockDevice> Qcow2<D> {
    /// The device under the image.
    pub fn device(&self) -> &D {
        &self.dev
    }

    /// The parsed header.
    pub fn header(&self) -> &Header {
        &self.hdr
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.geo.cluster_size()
    }

    /// Bytes of memory the engine holds now: cache contents, scratch cluster, inflater
    /// buffers. Bounded by the configured cache budgets plus a few clusters, whatever the
    /// image's size.
    pub fn memory_bytes(&self) -> u64 {
        self.l2c.resident_bytes()
            + self.rcc.resident_bytes()
            + self.scratch.len() as u64
            + self.inflater.input.len() as u64
            + self.pending.capacity() as u64 * 16
            + self.meta.as_ref().map_or(0, |m| m.memory_bytes())
    }

    /// Whether metadata changes wait in the caches for [`Qcow2::flush_metadata`] (the
    /// guest's flush timer can use it to decide whether to write back).
    pub fn has_dirty_metadata(&self) -> bool {
        self.l2c.any_dirty()
            || self.rcc.any_dirty()
            || self.header_dirty
            || !self.pending.is_empty()
    }

    /// Counters of the engine's work since open.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Writes all metadata and the recorded dirty bitmaps back and clears the dirty bit,
    /// then returns the device.
    pub fn close(mut self) -> Result<D, Qcow2Error> {
        if !self.read_only {
            self.store_bitmaps()?;
            self.flush_all()?;
            if self.hdr.incompatible_features & header::INCOMPAT_DIRTY != 0 {
                self.hdr.incompatible_features &= !header::INCOMPAT_DIRTY;
                self.write_header()?;
                self.barrier()?;
            }
        }
        Ok(self.dev)
    }

    /// Writes every dirty table (refcounts too, in lazy mode) and flushes the device.
    pub(crate) fn flush_all(&mut self) -> Result<(), Qcow2Error> {
        self.flush_metadata()?;
        if self.lazy {
            self.write_refcounts()?;
        }
        self.barrier()
    }
}

/// Reads `buf` at `off`; bytes past the device's end read as zeros (a fixed-size device,
/// such as a read-only virtio-blk disk, may end part-way through the image's last cluster,
/// as a file made by `qemu-img create` does).
pub(crate) fn read_dev<D: BlockDevice>(
    dev: &mut D,
    off: u64,
    buf: &mut [u8],
) -> Result<(), Qcow2Error> {
    let cap = dev.capacity();
    let inside = cap.saturating_sub(off).min(buf.len() as u64) as usize;
    if inside > 0 {
        dev.read_at(off, &mut buf[..inside])?;
    }
    buf[inside..].fill(0);
    Ok(())
}

/// Writes `buf` at `off`. Past the device's end only zeros may go (they are what those
/// bytes read as); anything else there is [`Qcow2Error::NoSpace`], refused before a byte is
/// written.
pub(crate) fn write_dev<D: BlockDevice>(
    dev: &mut D,
    off: u64,
    buf: &[u8],
) -> Result<(), Qcow2Error> {
    let cap = dev.capacity();
    let inside = cap.saturating_sub(off).min(buf.len() as u64) as usize;
    if buf[inside..].iter().any(|&b| b != 0) {
        return Err(Qcow2Error::NoSpace);
    }
    if inside > 0 {
        dev.write_at(off, &buf[..inside])?;
    }
    Ok(())
}
