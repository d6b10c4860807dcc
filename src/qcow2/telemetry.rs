//! Telemetry of the qcow2 engine: its space, caches and reclaim as metric families (label
//! `disk`), written at scrape time straight from the engine's [`Stats`] and [`SpaceInfo`].

use super::{SpaceInfo, Stats};
use crate::metrics::{Encoder, Meta, Value};
use core::fmt;

/// A metadata cache of the engine (label `cache`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cache {
    /// The L2 table cache.
    L2,
    /// The refcount block cache.
    Refcount,
}

impl Cache {
    /// Every cache.
    pub const ALL: [Cache; 2] = [Cache::L2, Cache::Refcount];

    /// The `cache` label value.
    pub fn name(self) -> &'static str {
        match self {
            Cache::L2 => "l2",
            Cache::Refcount => "refcount",
        }
    }

    fn hits(self, s: &Stats) -> u64 {
        match self {
            Cache::L2 => s.l2_cache_hits,
            Cache::Refcount => s.refcount_cache_hits,
        }
    }

    fn misses(self, s: &Stats) -> u64 {
        match self {
            Cache::L2 => s.l2_cache_misses,
            Cache::Refcount => s.refcount_cache_misses,
        }
    }
}

/// A stage of space reclaim, as ocaml-qcow names them (label `stage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReclaimStage {
    /// Clusters that became unused (dirty).
    Junk,
    /// Junk clusters erased.
    Erased,
    /// Clusters made available for reuse.
    Available,
    /// Clusters copied when moved.
    Copied,
    /// Copies made durable.
    Flushed,
    /// Moved clusters whose references were rewritten.
    Referenced,
}

impl ReclaimStage {
    /// Every stage, in reclaim order.
    pub const ALL: [ReclaimStage; 6] = [
        ReclaimStage::Junk,
        ReclaimStage::Erased,
        ReclaimStage::Available,
        ReclaimStage::Copied,
        ReclaimStage::Flushed,
        ReclaimStage::Referenced,
    ];

    /// The `stage` label value.
    pub fn name(self) -> &'static str {
        match self {
            ReclaimStage::Junk => "junk",
            ReclaimStage::Erased => "erased",
            ReclaimStage::Available => "available",
            ReclaimStage::Copied => "copied",
            ReclaimStage::Flushed => "flushed",
            ReclaimStage::Referenced => "referenced",
        }
    }

    /// Clusters through this stage since open.
    pub fn clusters(self, s: &Stats) -> u64 {
        match self {
            ReclaimStage::Junk => s.reclaim_junk,
            ReclaimStage::Erased => s.reclaim_erased,
            ReclaimStage::Available => s.reclaim_available,
            ReclaimStage::Copied => s.reclaim_copied,
            ReclaimStage::Flushed => s.reclaim_flushed,
            ReclaimStage::Referenced => s.reclaim_referenced,
        }
    }
}

/// What a scrape reads from the engine: its space accounting (cached by the caller: it
/// walks the tables) and its counters. A raw disk has space figures and no counters.
#[derive(Debug, Clone, Copy)]
pub struct EngineFigures<'a> {
    /// How the image uses its space.
    pub space: SpaceInfo,
    /// The engine's counters; `None` for a raw disk (all zero).
    pub stats: Option<&'a Stats>,
}

impl EngineFigures<'_> {
    /// The figures of a raw disk of `size` bytes: all data, no metadata, no counters.
    pub fn raw(size: u64) -> EngineFigures<'static> {
        EngineFigures {
            space: SpaceInfo {
                virtual_size: size,
                data_bytes: size,
                image_extent: size,
                ..SpaceInfo::default()
            },
            stats: None,
        }
    }

    /// Bytes of `clusters` clusters.
    pub fn bytes(&self, clusters: u64) -> u64 {
        clusters.saturating_mul(self.space.cluster_size)
    }

    /// The engine's counters, zero without an engine.
    pub fn stats(&self) -> Stats {
        self.stats.cloned().unwrap_or_default()
    }
}

const DISK: &[&str; 1] = &["disk"];

/// Writes the engine's families for the disk `disk`.
pub fn encode(enc: &mut Encoder<'_>, disk: &str, f: &EngineFigures<'_>) -> fmt::Result {
    let s = f.stats();
    let space = &f.space;
    let one = |v: u64| [([disk], Value::U64(v))];
    let gauges: [(Meta, u64); 6] = [
        (
            Meta::gauge(
                "qcow_metal_disk_virtual_size_bytes",
                "Size of the virtual disk that clients see.",
            )
            .unit("bytes"),
            space.virtual_size,
        ),
        (
            Meta::gauge(
                "qcow_metal_disk_cluster_size_bytes",
                "Cluster size of the qcow2 image (0 for a raw disk).",
            )
            .unit("bytes"),
            space.cluster_size,
        ),
        (
            Meta::gauge(
                "qcow_metal_disk_data_bytes",
                "Bytes of image clusters that hold guest data.",
            )
            .unit("bytes"),
            space.data_bytes,
        ),
        (
            Meta::gauge(
                "qcow_metal_disk_metadata_bytes",
                "Bytes of image clusters that hold metadata (header, L1/L2 tables, refcount structures).",
            )
            .unit("bytes"),
            space.metadata_bytes,
        ),
        (
            Meta::gauge(
                "qcow_metal_disk_image_extent_bytes",
                "End of the last allocated cluster: the size the host file must have.",
            )
            .unit("bytes"),
            space.image_extent,
        ),
        (
            Meta::gauge(
                "qcow_metal_disk_free_clusters",
                "Clusters inside the image extent that are free for reuse.",
            ),
            space.free_clusters,
        ),
    ];
    for (meta, v) in &gauges {
        enc.family(meta, DISK, one(*v))?;
    }
    let counters: [(Meta, u64); 3] = [
        (
            Meta::counter(
                "qcow_metal_disk_clusters_allocated",
                "Clusters allocated by the engine.",
            ),
            s.clusters_allocated,
        ),
        (
            Meta::counter(
                "qcow_metal_disk_clusters_freed",
                "Clusters freed by the engine.",
            ),
            s.clusters_freed,
        ),
        (
            Meta::counter(
                "qcow_metal_disk_cow_bytes",
                "Bytes copied by copy-on-write when a cluster was partly written.",
            )
            .unit("bytes"),
            s.cow_bytes,
        ),
    ];
    for (meta, v) in &counters {
        enc.family(meta, DISK, one(*v))?;
    }
    // Reads per layer of the backing chain: depth 0 is the image itself.
    let layers = (s.chain_layers.max(1) as usize).min(s.layer_data_bytes_read.len() + 1);
    let depths: [&str; 17] = [
        "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
    ];
    enc.family(
        &Meta::counter(
            "qcow_metal_disk_layer_read_bytes",
            "Guest data bytes read from each layer of the backing chain (depth 0: the image itself, 1: its backing file, ...).",
        )
        .unit("bytes"),
        &["disk", "depth"],
        (0..layers).map(|d| {
            let v = match d {
                0 => s.data_bytes_read,
                d => s.layer_data_bytes_read[d - 1],
            };
            ([disk, depths[d]], Value::U64(v))
        }),
    )?;
    const CACHE: &[&str; 2] = &["disk", "cache"];
    enc.family(
        &Meta::counter(
            "qcow_metal_disk_cache_hits",
            "Metadata cache lookups served from memory, by cache.",
        ),
        CACHE,
        Cache::ALL.map(|c| ([disk, c.name()], Value::U64(c.hits(&s)))),
    )?;
    enc.family(
        &Meta::counter(
            "qcow_metal_disk_cache_misses",
            "Metadata cache lookups that read the device, by cache.",
        ),
        CACHE,
        Cache::ALL.map(|c| ([disk, c.name()], Value::U64(c.misses(&s)))),
    )?;
    enc.family(
        &Meta::counter(
            "qcow_metal_disk_metadata_written_bytes",
            "Bytes of metadata (tables, refcounts, header) written to the device.",
        )
        .unit("bytes"),
        DISK,
        one(s.metadata_bytes_written),
    )?;
    enc.family(
        &Meta::counter(
            "qcow_metal_disk_metadata_overlaps",
            "Writes refused because they would have overwritten metadata (each marks the image corrupt).",
        ),
        DISK,
        one(s.overlaps_refused),
    )?;
    enc.family(
        &Meta::counter(
            "qcow_metal_disk_reclaim_bytes",
            "Bytes of clusters through each stage of space reclaim: junk (unused, dirty), erased, available (reusable), copied, flushed (copies durable) and referenced (references rewritten).",
        )
        .unit("bytes"),
        &["disk", "stage"],
        ReclaimStage::ALL.map(|st| ([disk, st.name()], Value::U64(f.bytes(st.clusters(&s))))),
    )?;
    enc.family(
        &Meta::gauge(
            "qcow_metal_disk_reclaim_junk_bytes",
            "Bytes of junk now: clusters freed by trims and overwrites whose refcounts have not dropped yet.",
        )
        .unit("bytes"),
        DISK,
        one(f.bytes(s.reclaim_junk_now)),
    )?;
    enc.family(
        &Meta::gauge(
            "qcow_metal_disk_reclaim_available_bytes",
            "Bytes available now: free clusters inside the image extent, reusable by writes and by compaction.",
        )
        .unit("bytes"),
        DISK,
        one(f.bytes(space.free_clusters)),
    )
}
