//! Opening an image: header validation against the device, cache setup, dirty-image
//! recovery.

use super::cache::{TableCache, TableKind, last_nonzero_refcount};
use super::error::{Qcow2Error, Result};
use super::header::{Header, INCOMPAT_DIRTY, V3_HEADER_LEN};
use super::info::Stats;
use super::layout::{
    Geometry, MAX_CLUSTER_BITS, MAX_L1_BYTES, MAX_REFCOUNT_TABLE_BYTES, MIN_CLUSTER_BITS,
};
use super::{OpenOptions, Pool, Qcow2};
use crate::block::BlockDevice;
use alloc::vec;
use alloc::vec::Vec;

impl<D: BlockDevice> Qcow2<D> {
    /// Opens the image on `dev`. An image left dirty by lazy refcounts gets its refcounts
    /// rebuilt (when writable). Memory use is the configured caches plus one cluster. An
    /// overlay (an image with a backing file) is refused: open it with
    /// [`Qcow2::open_with_backing`].
    pub fn open(dev: D, opts: OpenOptions) -> Result<Self> {
        Self::open_with_backing(dev, opts, None)
    }

    /// [`Qcow2::open`] without looking at the backing file name.
    pub(crate) fn open_unchained(mut dev: D, opts: OpenOptions) -> Result<Self> {
        let cap = dev.capacity();
        if cap < V3_HEADER_LEN as u64 {
            return Err(Qcow2Error::NotQcow2);
        }
        let mut head = [0u8; V3_HEADER_LEN];
        dev.read_at(0, &mut head)?;
        if head[..4] != [0x51, 0x46, 0x49, 0xfb] {
            return Err(Qcow2Error::NotQcow2);
        }
        let cluster_bits = u32::from_be_bytes([head[20], head[21], head[22], head[23]]);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(Qcow2Error::BadHeader(
                "cluster_bits outside 9..=21 (cluster size 512 B to 2 MiB)",
            ));
        }
        let cs = 1u64 << cluster_bits;
        let mut first = vec![0u8; cs.min(cap) as usize];
        dev.read_at(0, &mut first)?;
        let hdr = Header::parse(&first)?;
        drop(first);
        let read_only = opts.read_only || dev.is_read_only();
        hdr.check_features(!read_only && !opts.repair)?;
        let corrupt = hdr.incompatible_features & super::header::INCOMPAT_CORRUPT != 0;
        let geo = Geometry::new(hdr.cluster_bits, hdr.refcount_order)
            .with_extended_l2(hdr.incompatible_features & super::header::INCOMPAT_EXTENDED_L2 != 0);

        // The L1 table: big enough for the virtual size, within limits, on the device.
        let l1_bytes = hdr.l1_size as u64 * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(Qcow2Error::BadHeader("the L1 table is larger than 32 MiB"));
        }
        if (hdr.l1_size as u64) < geo.l1_entries_for(hdr.size) {
            return Err(Qcow2Error::Corrupt(
                "the L1 table is too small for the virtual size",
            ));
        }
        if hdr.l1_size > 0 {
            if hdr.l1_table_offset == 0 {
                return Err(Qcow2Error::Corrupt("the L1 table points into the header"));
            }
            // Only the table's bytes must be on the device: a device may end part-way
            // through the table's last cluster (qemu-img's files do), the rest reads as zeros.
            if hdr
                .l1_table_offset
                .checked_add(l1_bytes)
                .is_none_or(|e| e > cap)
            {
                return Err(Qcow2Error::Corrupt("the L1 table lies past the device end"));
            }
        }
        // The refcount table likewise.
        let rt_bytes = hdr.refcount_table_clusters as u64 * cs;
        if rt_bytes > MAX_REFCOUNT_TABLE_BYTES {
            return Err(Qcow2Error::BadHeader(
                "the refcount table is larger than 8 MiB",
            ));
        }
        if hdr
            .refcount_table_offset
            .checked_add(rt_bytes)
            .is_none_or(|e| e > cap)
        {
            return Err(Qcow2Error::Corrupt(
                "the refcount table lies past the device end",
            ));
        }
        let l1s = hdr.l1_table_offset;
        let l1e = l1s + l1_bytes.div_ceil(cs) * cs;
        let rts = hdr.refcount_table_offset;
        let rte = rts + rt_bytes;
        if hdr.l1_size > 0 && l1s < rte && rts < l1e {
            return Err(Qcow2Error::Corrupt(
                "overlapping metadata: the L1 table and the refcount table share clusters",
            ));
        }
        if hdr.nb_snapshots > 0 && (hdr.snapshots_offset == 0 || hdr.snapshots_offset >= cap) {
            return Err(Qcow2Error::Corrupt(
                "the snapshot table lies in the header or past the device end",
            ));
        }
        if hdr.size > i64::MAX as u64 {
            return Err(Qcow2Error::BadHeader("the virtual size exceeds 2^63 bytes"));
        }

        let mut q = Qcow2 {
            dev,
            rt_entries: rt_bytes / 8,
            geo,
            read_only,
            l2c: TableCache::new(cs as usize, opts.l2_cache_bytes),
            rcc: TableCache::new(cs as usize, opts.refcount_cache_bytes),
            cursor: 1,
            end: 1,
            dev_clusters: cap / cs,
            dev_span: cap.div_ceil(cs),
            pending: Vec::new(),
            pending_count: 0,
            freed_top: 0,
            compact_done_at: None,
            scratch: vec![0u8; cs as usize],
            dirty_list: Vec::new(),
            header_dirty: false,
            write_started: false,
            lazy: false,
            in_free_phase: false,
            guard: None,
            zero_from: u64::MAX,
            last_alloc_zeroed: false,
            l2_memo: None,
            inflater: Default::default(),
            packed_at: None,
            meta: None,
            corrupt,
            repairing: false,
            tally: None,
            bitmaps: None,
            views: Vec::new(),
            view: None,
            stats: Stats::default(),
            backing: None,
            opts,
            hdr,
        };
        q.lazy = !read_only && q.lazy_allowed();
        if !read_only && !q.opts.repair {
            q.validate_refcount_table()?;
        }
        q.end = q.compute_end()?;
        // Past the device's stored end and past everything the image uses, nothing is
        // written yet.
        q.zero_from = match q.dev.zeroes_from() {
            Some(z) => z.div_ceil(cs).max(q.end).saturating_mul(cs),
            None => u64::MAX,
        };
        if !read_only && !corrupt && q.hdr.incompatible_features & INCOMPAT_DIRTY != 0 {
            // Refcounts may be stale (a crash with lazy refcounts): rebuild them first.
            q.rebuild_refcounts()?;
            if !q.lazy {
                q.hdr.incompatible_features &= !INCOMPAT_DIRTY;
                q.write_header()?;
                q.barrier()?;
            }
        }
        q.bitmaps = match q.load_bitmaps() {
            Ok(b) => b,
            Err(e) => {
                // Left alone read-only; a writing session invalidates the extension (clears
                // autoclear bit 0) as QEMU's older versions would.
                log::warn!("qcow2: the persistent bitmaps cannot be used: {e}");
                None
            }
        };
        if q.opts.zero_tail && !read_only && !corrupt && !q.opts.repair && q.zero_from == u64::MAX {
            q.zero_tail();
        }
        Ok(q)
    }

    /// [`OpenOptions::zero_tail`]: zeroes the device from the end of the last cluster in use
    /// to its capacity, flushes, and records that new clusters there read as zeros. On a
    /// device error nothing is recorded (new clusters are then padded with zeros).
    fn zero_tail(&mut self) {
        let start = self.end.saturating_mul(self.geo.cluster_size());
        let cap = self.dev.capacity();
        if start >= cap {
            return;
        }
        let zeroed = self.dev.write_zeroes(start, cap - start).is_ok() && self.barrier().is_ok();
        if zeroed {
            self.zero_from = start;
        }
    }

    /// One past the last cluster with a nonzero refcount (at least past the fixed metadata).
    pub(crate) fn compute_end(&mut self) -> Result<u64> {
        self.compute_end_below(u64::MAX)
    }

    /// [`Qcow2::compute_end`] when no cluster at or past `bound` can be in use.
    pub(crate) fn compute_end_below(&mut self, bound: u64) -> Result<u64> {
        let fixed = self.fixed_end();
        let order = self.geo.refcount_order;
        let mut ti = self
            .rt_entries
            .min((bound.saturating_sub(1) >> self.geo.rb_bits).saturating_add(1));
        // Empty blocks are rare; past a few, stop and assume everything below is in use
        // (an over-estimate is safe: it only moves new metadata further out).
        let mut empty_blocks = 0;
        while ti > 0 {
            ti -= 1;
            // Skip empty refcount-table entries a word at a time, a page at most per step.
            let (page, i) = self.rt_page(ti);
            let s = self.load(Pool::Rc, page, TableKind::RefTable, true)?;
            let words = &self.rcc.data(s)[..(i + 1) * 8];
            match words.chunks_exact(8).rposition(|e| e != [0u8; 8]) {
                None => {
                    ti -= i as u64;
                    continue;
                }
                Some(j) => ti -= (i - j) as u64,
            }
            // A bad entry is for check/repair to report; here it only ends nothing.
            let Ok(Some(block)) = self.rt_entry(ti) else {
                continue;
            };
            if empty_blocks >= 64 {
                return Ok(((ti + 1) << self.geo.rb_bits).max(fixed));
            }
            empty_blocks += 1;
            let s = self.load(Pool::Rc, block, TableKind::RefBlock, true)?;
            if let Some(i) = last_nonzero_refcount(self.rcc.data(s), order) {
                let end = (ti << self.geo.rb_bits) + i as u64 + 1;
                return Ok(end.max(fixed));
            }
        }
        Ok(fixed)
    }
}
