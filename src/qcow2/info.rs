//! What the engine reports: work counters ([`Stats`]), space accounting ([`SpaceInfo`]),
//! image facts ([`ImageInfo`]) and the guest-to-host cluster map ([`MapEntry`]).

use super::cache::{TableKind, get_refcount};
use super::entry::{ClusterKind, Mapping, decode_l1};
use super::error::Result;
use super::header::{Extension, FeatureName, INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use super::{Pool, Qcow2};
use crate::block::BlockDevice;
use alloc::string::String;
use alloc::vec::Vec;

/// Backing layers whose reads [`Stats::layer_data_bytes_read`] counts.
pub const MAX_LAYER_STATS: usize = 16;

/// Counters of the engine's work since the image was opened. Plain integers: the engine is
/// used through `&mut` from one thread.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// L2-cache (and L1 page) lookups that hit.
    pub l2_cache_hits: u64,
    /// L2-cache lookups that read from the device.
    pub l2_cache_misses: u64,
    /// Refcount-cache lookups that hit.
    pub refcount_cache_hits: u64,
    /// Refcount-cache lookups that read from the device.
    pub refcount_cache_misses: u64,
    /// Host clusters allocated (data and metadata).
    pub clusters_allocated: u64,
    /// Host clusters whose refcount dropped to zero.
    pub clusters_freed: u64,
    /// L2 tables allocated.
    pub l2_tables_allocated: u64,
    /// Refcount blocks allocated.
    pub refcount_blocks_allocated: u64,
    /// Bytes copied or zero-filled to complete partially written clusters.
    pub cow_bytes: u64,
    /// Metadata bytes written (tables, header).
    pub metadata_bytes_written: u64,
    /// Guest bytes read from data clusters.
    pub data_bytes_read: u64,
    /// Guest bytes written.
    pub data_bytes_written: u64,
    /// Metadata write-backs.
    pub metadata_flushes: u64,
    /// Device flushes (write barriers).
    pub device_flushes: u64,
    /// Space reclaim: clusters whose refcount reached 0 (their last reference is gone on
    /// disk; counted at the metadata write-back that drops the refcount).
    pub reclaim_junk: u64,
    /// Space reclaim: freed clusters the device accepted a discard for (the host punches
    /// holes; a device without discard that still answers success counts too).
    pub reclaim_erased: u64,
    /// Space reclaim: freed clusters whose zero refcount is durable: reusable.
    pub reclaim_available: u64,
    /// Space reclaim: clusters compaction copied to a new place (data, L2 tables, refcount
    /// blocks).
    pub reclaim_copied: u64,
    /// Space reclaim: compaction copies made durable by a device flush (the old copy still
    /// referenced).
    pub reclaim_flushed: u64,
    /// Space reclaim: compaction moves whose new references are durable (the old cluster
    /// then goes to junk).
    pub reclaim_referenced: u64,
    /// Writes refused because they would have overwritten metadata (each marks the image
    /// corrupt; see [`super::Qcow2Error::Overlap`]).
    pub overlaps_refused: u64,
    /// Space reclaim now: clusters whose references are gone, waiting for their refcount
    /// to drop at the next metadata write-back (junk not yet available).
    pub reclaim_junk_now: u64,
    /// Compaction: where it stands.
    pub compaction_state: super::CompactionState,
    /// Compaction steps run since open.
    pub compaction_steps: u64,
    /// Leaked clusters (in use by nothing) that compaction found at the tail and freed.
    pub compaction_leaks_freed: u64,
    /// Layers of the backing chain, this image included (0 or 1: no backing file).
    pub chain_layers: u64,
    /// Guest data bytes each backing layer served from its own clusters (a raw layer: every
    /// byte read from it): element `d - 1` for layer `d` (1 is the backing file); layers
    /// deeper than [`MAX_LAYER_STATS`] are not counted here.
    pub layer_data_bytes_read: [u64; MAX_LAYER_STATS],
}

/// How the image uses its space.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpaceInfo {
    /// Virtual disk size in bytes.
    pub virtual_size: u64,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// Bytes of host clusters holding guest data (including preallocated zero clusters).
    pub data_bytes: u64,
    /// Bytes of metadata clusters (header, L1, L2, refcount table and blocks).
    pub metadata_bytes: u64,
    /// End of the last allocated cluster: the smallest file that holds the image.
    pub image_extent: u64,
    /// Clusters inside the extent with refcount 0 (reusable holes).
    pub free_clusters: u64,
}

/// Facts about the image, as `image info` shows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// 2 or 3.
    pub version: u32,
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// Refcount width in bits.
    pub refcount_bits: u32,
    /// Entries in the L1 table.
    pub l1_size: u32,
    /// Host offset of the L1 table.
    pub l1_table_offset: u64,
    /// Host offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters of the refcount table.
    pub refcount_table_clusters: u32,
    /// Internal snapshots.
    pub snapshots: u32,
    /// Incompatible feature bits.
    pub incompatible_features: u64,
    /// Compatible feature bits.
    pub compatible_features: u64,
    /// Autoclear feature bits.
    pub autoclear_features: u64,
    /// Lazy refcounts compatible bit.
    pub lazy_refcounts: bool,
    /// Dirty bit.
    pub dirty: bool,
    /// Corrupt bit.
    pub corrupt: bool,
    /// The feature-name table.
    pub feature_names: Vec<FeatureName>,
    /// Header extensions (type and data).
    pub extensions: Vec<Extension>,
    /// Backing file name.
    pub backing_file: Option<String>,
}

/// A run of the guest disk in [`Qcow2::map`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapEntry {
    /// Guest offset.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// What the run is.
    pub kind: ClusterKind,
    /// Host offset of the run's first byte (data runs; preallocated zero runs).
    pub host: Option<u64>,
}

/// Space counters maintained as the image changes (after one full walk).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Tally {
    /// Host clusters referenced by the active L2 tables (data and preallocated zeros).
    pub data_clusters: u64,
    /// Bytes of compressed data referenced by the active L2 tables.
    pub compressed_bytes: u64,
    /// L2 tables of the active L1 table.
    pub l2_tables: u64,
    /// Refcount blocks.
    pub refblocks: u64,
    /// Host clusters with a nonzero refcount.
    pub used: u64,
}

impl<D: BlockDevice> Qcow2<D> {
    /// Applies `f` to the space counters, if they are being kept.
    #[inline]
    pub(crate) fn tally(&mut self, f: impl FnOnce(&mut Tally)) {
        if let Some(t) = &mut self.tally {
            f(t);
        }
    }

    /// Space accounting. The first call walks the L1/L2 tables and the refcounts; later
    /// calls use counters the engine keeps up to date (and one short refcount scan for the
    /// image's end).
    pub fn space(&mut self) -> Result<SpaceInfo> {
        let t = match self.tally {
            Some(t) => t,
            None => {
                let t = self.walk_space()?;
                self.tally = Some(t);
                t
            }
        };
        let cs = self.geo.cluster_size();
        // Nothing past `self.end` was ever allocated: scan down from there.
        let end = self.compute_end_below(self.end)?;
        let l1_clusters = (self.hdr.l1_size as u64 * 8).div_ceil(cs);
        let meta =
            1 + l1_clusters + t.l2_tables + self.hdr.refcount_table_clusters as u64 + t.refblocks;
        Ok(SpaceInfo {
            virtual_size: self.hdr.size,
            cluster_size: cs,
            data_bytes: t.data_clusters * cs + t.compressed_bytes,
            metadata_bytes: meta * cs,
            image_extent: end * cs,
            free_clusters: end.saturating_sub(t.used),
        })
    }

    /// [`Qcow2::space`] from a full walk (the counters are rebuilt).
    pub fn space_walk(&mut self) -> Result<SpaceInfo> {
        self.tally = None;
        self.space()
    }

    /// Facts from the header.
    pub fn info(&self) -> ImageInfo {
        let h = &self.hdr;
        ImageInfo {
            version: h.version,
            virtual_size: h.size,
            cluster_size: self.geo.cluster_size(),
            refcount_bits: self.geo.refcount_bits(),
            l1_size: h.l1_size,
            l1_table_offset: h.l1_table_offset,
            refcount_table_offset: h.refcount_table_offset,
            refcount_table_clusters: h.refcount_table_clusters,
            snapshots: h.nb_snapshots,
            incompatible_features: h.incompatible_features,
            compatible_features: h.compatible_features,
            autoclear_features: h.autoclear_features,
            lazy_refcounts: h.lazy_refcounts(),
            dirty: h.incompatible_features & INCOMPAT_DIRTY != 0,
            corrupt: h.incompatible_features & INCOMPAT_CORRUPT != 0,
            feature_names: h.feature_names.clone(),
            extensions: h.extensions.clone(),
            backing_file: h.backing_file.clone(),
        }
    }

    /// Counts everything [`Tally`] holds by walking the tables.
    fn walk_space(&mut self) -> Result<Tally> {
        let mut t = Tally::default();
        for l1i in 0..self.hdr.l1_size as u64 {
            let e = self.l1_entry(l1i)?;
            let Some((off, _)) = decode_l1(e, &self.geo)? else {
                continue;
            };
            t.l2_tables += 1;
            let s = self.load(Pool::L2, off, TableKind::L2, true)?;
            for i in 0..self.geo.l2_entries() as usize {
                match self.l2_mapping_at(s, i)? {
                    Mapping::Data { .. }
                    | Mapping::Zero { host: Some(_), .. }
                    | Mapping::Subclusters { host: Some(_), .. } => t.data_clusters += 1,
                    Mapping::Compressed { len, .. } => t.compressed_bytes += len,
                    _ => {}
                }
            }
        }
        for ti in 0..self.rt_entries {
            if self.rt_entry(ti)?.is_some() {
                t.refblocks += 1;
            }
        }
        let end = self.compute_end()?;
        self.end = self.end.max(end);
        let order = self.geo.refcount_order;
        let mut ti = 0;
        while (ti << self.geo.rb_bits) < end {
            let base = ti << self.geo.rb_bits;
            let n = self.geo.rb_entries().min(end - base);
            if let Some(b) = self.rt_entry(ti)? {
                let s = self.load(Pool::Rc, b, TableKind::RefBlock, true)?;
                let data = self.rcc.data(s);
                t.used += (0..n as usize)
                    .filter(|&i| get_refcount(data, i, order) != 0)
                    .count() as u64;
            }
            ti += 1;
        }
        Ok(t)
    }

    /// The guest disk as runs of one kind, with host offsets (for `image map`). Adjacent
    /// clusters merge when their kind matches and (for data) their host clusters are
    /// contiguous.
    pub fn map(&mut self) -> Result<Vec<MapEntry>> {
        let cs = self.geo.cluster_size();
        let size = self.hdr.size;
        let mut out: Vec<MapEntry> = Vec::new();
        let push = |out: &mut Vec<MapEntry>, offset: u64, len: u64, kind, host: Option<u64>| {
            if let Some(last) = out.last_mut() {
                let contiguous = match (last.host, host) {
                    (Some(a), Some(b)) => a + last.len == b,
                    (None, None) => true,
                    _ => false,
                };
                if last.kind == kind && last.offset + last.len == offset && contiguous {
                    last.len += len;
                    return;
                }
            }
            out.push(MapEntry {
                offset,
                len,
                kind,
                host,
            });
        };
        let coverage = self.geo.l2_coverage();
        for l1i in 0..self.geo.l1_entries_for(size) {
            let start = l1i * coverage;
            let stop = (start + coverage).min(size);
            let e = self.l1_entry(l1i)?;
            let Some((off, _)) = decode_l1(e, &self.geo)? else {
                push(
                    &mut out,
                    start,
                    stop - start,
                    ClusterKind::Unallocated,
                    None,
                );
                continue;
            };
            let s = self.load(Pool::L2, off, TableKind::L2, true)?;
            let sub = self.geo.subcluster_size();
            let mut pos = start;
            let mut i = 0usize;
            while pos < stop {
                let len = cs.min(stop - pos);
                let m = self.l2_mapping_at(s, i)?;
                match m {
                    Mapping::Subclusters { host, alloc, .. } => {
                        // One run per subcluster (merged with its neighbours by kind).
                        let mut x = 0u64;
                        while x * sub < len {
                            let k = m.subcluster_kind(x as u32);
                            let h = host.filter(|_| alloc >> x & 1 != 0).map(|h| h + x * sub);
                            push(&mut out, pos + x * sub, sub.min(len - x * sub), k, h);
                            x += 1;
                        }
                    }
                    _ => {
                        let host = match m {
                            Mapping::Data { host, .. } => Some(host),
                            Mapping::Zero { host, .. } => host,
                            Mapping::Compressed { host, .. } => Some(host),
                            _ => None,
                        };
                        push(&mut out, pos, len, m.kind(), host);
                    }
                }
                pos += len;
                i += 1;
            }
        }
        Ok(out)
    }
}
