//! The disk the guest serves: [`Disk`] (qcow2, raw, or none and why), opened by
//! [`open_disk`] on the block device.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use log::warn;

use crate::blkqueue::pipeline::QueuedDisk;
use crate::blkqueue::queue::BlockQueue;
use crate::block::BlockDevice;
use crate::config::{Config, DiskFormat};
use crate::disk::telemetry::Instrumented;
use crate::disk::{RawDisk, VirtualDisk};
use crate::qcow2::telemetry::EngineFigures;
use crate::qcow2::{OpenOptions, Qcow2, SpaceInfo, chain, probe};
use crate::telemetry::GuestMetrics;

/// The first bytes of every qcow2 image.
const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// The engine's space figures (computing them walks the tables), with the allocation
/// counters they were computed at: they can only change when those counters do.
pub type SpaceCache = ([u64; 4], SpaceInfo);

/// The disk the NBD export serves, or why there is none.
pub enum Disk<B: BlockDevice> {
    /// The qcow2 engine on the device.
    Qcow2(Box<Instrumented<Qcow2<B>>>),
    /// The device's bytes served as they are.
    Raw(Box<Instrumented<RawDisk<B>>>),
    /// No usable disk: the reason is logged, shown on `/`, `/healthz` and in the metrics.
    Unavailable(String),
}

impl<B: BlockDevice> Disk<B> {
    /// The disk to serve, if there is one.
    pub fn virtual_disk(&mut self) -> Option<&mut dyn VirtualDisk> {
        match self {
            Disk::Qcow2(d) => Some(&mut **d),
            Disk::Raw(d) => Some(&mut **d),
            Disk::Unavailable(_) => None,
        }
    }

    /// `"qcow2"`, `"raw"` or `"none"`.
    pub fn format_name(&self) -> &'static str {
        match self {
            Disk::Qcow2(_) => "qcow2",
            Disk::Raw(_) => "raw",
            Disk::Unavailable(_) => "none",
        }
    }

    /// Whether writes are refused (by the command line, the image or the device).
    pub fn is_read_only(&self) -> bool {
        match self {
            Disk::Qcow2(d) => d.is_read_only(),
            Disk::Raw(d) => d.is_read_only(),
            Disk::Unavailable(_) => true,
        }
    }

    /// Size of the virtual disk in bytes (0 without a disk).
    pub fn size(&self) -> u64 {
        match self {
            Disk::Qcow2(d) => d.size(),
            Disk::Raw(d) => d.size(),
            Disk::Unavailable(_) => 0,
        }
    }

    /// What the engine reports, for the metrics. The space figures walk the tables, so they
    /// are recomputed only after clusters or tables were allocated or freed (`cache`).
    pub fn figures<'a>(&'a mut self, cache: &mut Option<SpaceCache>) -> EngineFigures<'a> {
        match self {
            Disk::Qcow2(d) => {
                let engine = d.inner_mut();
                let st = engine.stats();
                let key = [
                    st.clusters_allocated,
                    st.clusters_freed,
                    st.l2_tables_allocated,
                    st.refcount_blocks_allocated,
                ];
                if cache.is_none_or(|(k, _)| k != key) {
                    match engine.space() {
                        Ok(space) => *cache = Some((key, space)),
                        Err(e) => warn!("qcow2: space accounting failed: {e}"),
                    }
                }
                let engine: &'a Qcow2<B> = engine;
                EngineFigures {
                    space: cache.map(|(_, s)| s).unwrap_or_default(),
                    stats: Some(engine.stats()),
                }
            }
            Disk::Raw(d) => EngineFigures::raw(d.size()),
            Disk::Unavailable(_) => EngineFigures {
                space: SpaceInfo::default(),
                stats: None,
            },
        }
    }

    /// Periodic engine work while the guest is idle: dirty metadata is written back (in
    /// crash-safe order), so a crash loses little.
    pub fn background(&mut self) {
        if let Disk::Qcow2(d) = self
            && let Err(e) = d.inner_mut().flush_metadata()
        {
            warn!("qcow2: metadata write-back failed: {e}");
        }
    }

    /// Growth of the host file ahead of need (qcow2 on a device that grows on demand): asks
    /// for room when the image nears the device's end, and takes a capacity that grew.
    pub fn keep_headroom(&mut self) {
        if let Disk::Qcow2(d) = self {
            d.inner_mut().keep_headroom();
        }
    }

    /// Makes everything durable and leaves the image clean (qcow2: metadata and refcounts
    /// written, dirty bit cleared; then the device's cache flushed).
    pub fn close(self) -> Result<(), String> {
        match self {
            Disk::Qcow2(d) => {
                let mut dev = d.into_inner().close().map_err(|e| format!("{e}"))?;
                dev.flush().map_err(|e| format!("{e}"))
            }
            Disk::Raw(d) => {
                let mut dev = d.into_inner().into_inner();
                dev.flush().map_err(|e| format!("{e}"))
            }
            Disk::Unavailable(_) => Ok(()),
        }
    }
}

impl<B: BlockDevice + BlockQueue> Disk<B> {
    /// The disk to serve with requests in flight together (its device has a queue), if
    /// there is one: the same disk as [`Disk::virtual_disk`], and the same counters (the
    /// `Instrumented` wrapper counts the requests whose data goes through the queue).
    pub fn queued_disk(&mut self) -> Option<&mut dyn QueuedDisk> {
        match self {
            Disk::Qcow2(d) => Some(&mut **d),
            Disk::Raw(d) => Some(&mut **d),
            Disk::Unavailable(_) => None,
        }
    }
}

/// Brings up the disk on the block device, following `config.format`; a qcow2 overlay
/// opens over the backing `layers` (devices with their serials, see [`chain`]); `clock`
/// (monotonic, nanoseconds) times the requests for the metrics.
pub fn open_disk<B: BlockDevice>(
    dev: Option<B>,
    layers: Vec<(String, B)>,
    config: &Config,
    metrics: &GuestMetrics,
    clock: fn() -> u64,
) -> Disk<B> {
    let Some(mut dev) = dev else {
        return Disk::Unavailable(String::from("no block device"));
    };
    let mut magic = [0u8; 4];
    let is_qcow2 =
        dev.capacity() >= 4 && dev.read_at(0, &mut magic).is_ok() && magic == QCOW2_MAGIC;
    if config.format == DiskFormat::Auto && !is_qcow2 {
        // A qcow2 image whose magic was damaged must not be served as a writable raw disk
        // (a client would overwrite its metadata): only an explicit format=raw does that.
        let mut first = [0u8; probe::PROBE_LEN];
        let len = first
            .len()
            .min(usize::try_from(dev.capacity()).unwrap_or(usize::MAX));
        if dev.read_at(0, &mut first[..len]).is_ok()
            && probe::looks_like_damaged_qcow2(&first[..len])
        {
            return Disk::Unavailable(String::from(
                "the disk looks like a qcow2 image with a damaged magic; not exported \
                 (format=raw exports its bytes as they are)",
            ));
        }
    }
    let want_qcow2 = match config.format {
        DiskFormat::Auto => is_qcow2,
        DiskFormat::Qcow2 => true,
        DiskFormat::Raw => false,
    };
    if !want_qcow2 {
        return Disk::Raw(Box::new(Instrumented::new(
            RawDisk::new(dev),
            metrics.disk.clone(),
            clock,
        )));
    }
    if !is_qcow2 {
        return Disk::Unavailable(String::from(
            "format=qcow2, but the device does not start with the qcow2 magic",
        ));
    }
    let options = OpenOptions {
        read_only: config.read_only,
        l2_cache_bytes: config.l2_cache,
        refcount_cache_bytes: config.refcount_cache,
        // virtio-blk cannot say that bytes past the image read as zeros: zero them once
        // (WRITE_ZEROES requests) so that new clusters need no padding.
        zero_tail: !config.read_only,
        ..OpenOptions::default()
    };
    let engine = if layers.is_empty() {
        Qcow2::open(dev, options).map_err(|e| format!("the qcow2 image cannot be opened: {e}"))
    } else {
        chain::open_chain(dev, options, layers)
            .map_err(|e| format!("the backing chain cannot be opened: {e}"))
    };
    match engine {
        Ok(engine) => Disk::Qcow2(Box::new(Instrumented::new(
            engine,
            metrics.disk.clone(),
            clock,
        ))),
        Err(e) => Disk::Unavailable(e),
    }
}
