//! Metadata tables through the caches: loading (with eviction), the active L1 table, L2
//! tables for reading and for writing (allocated or copied on demand), and the write-back of
//! dirty metadata in crash-safe order.

use super::cache::{TableKind, get_u64, set_u64};
use super::entry::{COPIED, Mapping, decode_l1, l2_raw, put_l2_raw};
use super::error::{Qcow2Error, Result};
use super::header::{COMPAT_LAZY_REFCOUNTS, INCOMPAT_DIRTY};
use super::{Pool, Qcow2};
use crate::block::BlockDevice;

impl<D: BlockDevice> Qcow2<D> {
    /// Write barrier: everything written so far is durable before anything written next.
    pub(crate) fn barrier(&mut self) -> Result<()> {
        self.stats.device_flushes += 1;
        Ok(self.dev.flush()?)
    }

    /// Checks that a metadata cluster at `off` starts on the device (its bytes past the
    /// device end read as zeros) and does not lie in the header.
    pub(crate) fn check_meta_offset(&self, off: u64, what: &'static str) -> Result<()> {
        let cs = self.geo.cluster_size();
        if off < cs || off / cs >= self.dev_span {
            return Err(Qcow2Error::Corrupt(what));
        }
        Ok(())
    }

    /// One past the last byte of the last cluster that starts on the device.
    pub(crate) fn span_end(&self) -> u64 {
        self.dev_span.saturating_mul(self.geo.cluster_size())
    }

    /// The cache slot holding the cluster at `key`, reading it from the device (or zeroing
    /// it when `read` is false: a newly allocated table). A dirty table evicted to make room
    /// is written back with all the metadata it depends on.
    pub(crate) fn load(
        &mut self,
        pool: Pool,
        key: u64,
        kind: TableKind,
        read: bool,
    ) -> Result<usize> {
        let cache = match pool {
            Pool::L2 => &mut self.l2c,
            Pool::Rc => &mut self.rcc,
        };
        if let Some(s) = cache.get(key) {
            match pool {
                Pool::L2 => self.stats.l2_cache_hits += 1,
                Pool::Rc => self.stats.refcount_cache_hits += 1,
            }
            if !read {
                let cache = self.cache_mut(pool);
                cache.data_mut(s).fill(0);
                cache.mark_fresh(s);
            }
            return Ok(s);
        }
        if read {
            match pool {
                Pool::L2 => self.stats.l2_cache_misses += 1,
                Pool::Rc => self.stats.refcount_cache_misses += 1,
            }
        }
        let victim = loop {
            let cache = self.cache_mut(pool);
            match cache.victim() {
                Some(v) if cache.slot(v).dirty => self.write_back_victim(pool, v)?,
                other => break other,
            }
        };
        let s = self.cache_mut(pool).install(key, kind, victim);
        if read {
            let cache = match pool {
                Pool::L2 => &mut self.l2c,
                Pool::Rc => &mut self.rcc,
            };
            if let Err(e) = super::read_dev(&mut self.dev, key, cache.fill(s)) {
                cache.forget(key);
                return Err(e);
            }
        } else {
            // A newly allocated table: zeros, and nothing on disk points to it yet.
            let cache = self.cache_mut(pool);
            cache.data_mut(s).fill(0);
            cache.mark_fresh(s);
        }
        Ok(s)
    }

    pub(crate) fn cache_mut(&mut self, pool: Pool) -> &mut super::cache::TableCache {
        match pool {
            Pool::L2 => &mut self.l2c,
            Pool::Rc => &mut self.rcc,
        }
    }

    /// Makes the dirty slot `v` clean so it can be evicted.
    fn write_back_victim(&mut self, pool: Pool, v: usize) -> Result<()> {
        // While decrementing deferred frees, or with lazy refcounts, a refcount block may go
        // to disk on its own: nothing references what it frees, and lazy refcounts are
        // rebuilt after a crash anyway.
        if pool == Pool::Rc && (self.in_free_phase || self.lazy) {
            return self.write_slot(pool, v);
        }
        self.flush_metadata()?;
        // In lazy mode the flush leaves refcounts dirty; write this one directly.
        if self.cache_mut(pool).slot(v).dirty {
            self.write_slot(pool, v)?;
        }
        Ok(())
    }

    fn write_slot(&mut self, pool: Pool, s: usize) -> Result<()> {
        let (lo, hi) = self.cache_mut(pool).dirty_span(s);
        if hi > lo {
            let slot = self.cache_mut(pool).slot(s);
            let (key, allowed) = (slot.key, Self::table_kind_bits(slot.kind));
            // A table never overwrites other metadata (a corrupt pointer could send it there).
            self.check_overlap(key + lo as u64, (hi - lo) as u64, allowed)?;
            let cache = match pool {
                Pool::L2 => &self.l2c,
                Pool::Rc => &self.rcc,
            };
            super::write_dev(&mut self.dev, key + lo as u64, &cache.slot(s).data[lo..hi])?;
            self.stats.metadata_bytes_written += (hi - lo) as u64;
        }
        self.cache_mut(pool).mark_clean(s);
        Ok(())
    }

    /// Writes every dirty table of `kind`; returns how many.
    fn write_dirty(&mut self, pool: Pool, kind: TableKind) -> Result<usize> {
        self.write_dirty_where(pool, kind, false)
    }

    /// Writes the dirty tables of `kind` (only the fresh ones with `fresh_only`).
    fn write_dirty_where(
        &mut self,
        pool: Pool,
        kind: TableKind,
        fresh_only: bool,
    ) -> Result<usize> {
        let mut list = core::mem::take(&mut self.dirty_list);
        self.cache_mut(pool)
            .dirty_slots(kind, fresh_only, &mut list);
        let n = list.len();
        let mut result = Ok(());
        for &(_, s) in list.iter() {
            result = self.write_slot(pool, s);
            if result.is_err() {
                break;
            }
        }
        self.dirty_list = list;
        result.map(|_| n)
    }

    fn has_dirty(&mut self, pool: Pool, kind: TableKind) -> bool {
        let mut list = core::mem::take(&mut self.dirty_list);
        self.cache_mut(pool).dirty_slots(kind, false, &mut list);
        let any = !list.is_empty();
        self.dirty_list = list;
        any
    }

    /// Writes dirty refcount blocks, then (after a barrier) dirty refcount-table pages.
    pub(crate) fn write_refcounts(&mut self) -> Result<()> {
        self.write_dirty(Pool::Rc, TableKind::RefBlock)?;
        if self.has_dirty(Pool::Rc, TableKind::RefTable) {
            // Barrier: a new refcount block is on disk before the table entry pointing at it.
            self.barrier()?;
            self.write_dirty(Pool::Rc, TableKind::RefTable)?;
        }
        Ok(())
    }

    /// Writes all dirty metadata in crash-safe order and applies deferred frees. Guest data
    /// is already on the device (written before the L2 entries were changed).
    pub fn flush_metadata(&mut self) -> Result<()> {
        self.write_back().map(drop)
    }

    /// [`Qcow2::flush_metadata`]; returns whether it ended with a device flush.
    pub(crate) fn write_back(&mut self) -> Result<bool> {
        if self.read_only {
            return Ok(false);
        }
        let l2_dirty = self.l2c.any_dirty();
        let rc_dirty = self.rcc.any_dirty();
        if !l2_dirty && !rc_dirty && !self.header_dirty && self.pending.is_empty() {
            return Ok(false);
        }
        self.stats.metadata_flushes += 1;
        // 1. What nothing on disk points to yet: refcount blocks (a new block is unreferenced
        //    until its table entry is written; a changed one only counts clusters whose
        //    references are still to come) and newly allocated L2 tables (unreferenced until
        //    their L1 entry is written). With lazy refcounts the refcounts wait: the dirty bit
        //    covers them.
        if !self.lazy {
            self.write_dirty(Pool::Rc, TableKind::RefBlock)?;
        }
        self.write_dirty_where(Pool::L2, TableKind::L2, true)?;
        // 2. Barrier: guest data, refcounts and new tables are durable before anything on
        //    disk refers to them.
        self.barrier()?;
        // 3. The references: refcount-table pages, existing L2 tables, L1 pages, header.
        //    A new refcount block counts only once its table entry is on disk, so the
        //    table pages get a barrier of their own before anything that references a
        //    cluster the new block counts.
        if !self.lazy && self.write_dirty(Pool::Rc, TableKind::RefTable)? > 0 {
            self.barrier()?;
        }
        self.write_dirty(Pool::L2, TableKind::L2)?;
        self.write_dirty(Pool::L2, TableKind::L1)?;
        if self.header_dirty {
            self.write_header()?;
        }
        // 4. Barrier: references are durable (so removed references are gone on disk).
        self.barrier()?;
        // 5. Only now drop the refcounts of clusters whose references were removed.
        if !self.pending.is_empty() {
            let freed_before = self.stats.clusters_freed;
            self.in_free_phase = true;
            let r = self.apply_frees();
            self.in_free_phase = false;
            r?;
            if !self.lazy {
                self.write_refcounts()?;
                self.barrier()?;
            }
            // Reclaim: the freed clusters' zero refcounts are durable (or covered by the
            // dirty bit): they are available for reuse.
            self.stats.reclaim_available += self.stats.clusters_freed - freed_before;
            // The last cluster in use was freed: the image extent shrinks.
            // (An error there leaves the old, larger end: safe.)
            if self.freed_top >= self.end
                && !self.repairing
                && let Ok(end) = self.compute_end_below(self.end)
            {
                self.end = end;
            }
            self.freed_top = 0;
        }
        Ok(true)
    }

    /// Writes the fixed header (extensions stay as they are on disk).
    pub(crate) fn write_header(&mut self) -> Result<()> {
        let bytes = self.hdr.encode_fixed();
        super::write_dev(&mut self.dev, 0, &bytes)?;
        self.stats.metadata_bytes_written += bytes.len() as u64;
        self.header_dirty = false;
        Ok(())
    }

    /// Called before the first change of a session: clears the autoclear bits of what this
    /// engine does not keep consistent (raw external data; bitmaps it could not read),
    /// marks the enabled bitmaps in use and, with lazy refcounts, sets the dirty bit.
    pub(crate) fn begin_write(&mut self) -> Result<()> {
        if self.read_only {
            return Err(Qcow2Error::ReadOnly);
        }
        if self.corrupt && !self.repairing {
            return Err(Qcow2Error::MarkedCorrupt);
        }
        if self.repairing {
            // Repair rewrites references and refcounts wholesale: the map is rebuilt after.
            self.meta = None;
        } else if self.meta.is_none() {
            self.build_meta_map()?;
        }
        if self.write_started {
            return Ok(());
        }
        let mut change = false;
        let keep = if self.bitmaps.is_some() {
            super::header::AUTOCLEAR_BITMAPS
        } else {
            0
        };
        if self.hdr.version >= 3 && self.hdr.autoclear_features & !keep != 0 {
            self.hdr.autoclear_features &= keep;
            change = true;
        }
        if self.lazy && self.hdr.incompatible_features & INCOMPAT_DIRTY == 0 {
            self.hdr.incompatible_features |= INCOMPAT_DIRTY;
            change = true;
        }
        if change {
            self.write_header()?;
            // Barrier: the dirty bit is on disk before any lazily counted change.
            self.barrier()?;
        }
        if !self.repairing {
            self.begin_bitmap_session()?;
        }
        self.write_started = true;
        Ok(())
    }

    /// Called when an operation found the metadata corrupt: like QEMU, marks the image
    /// corrupt (incompatible bit 1) so nothing writes to it until a repair, and stops guest
    /// writes for this session. Best effort: the original error is what the caller reports.
    pub(crate) fn mark_corrupt(&mut self) {
        if self.read_only || self.corrupt || self.repairing {
            return;
        }
        self.corrupt = true;
        log::error!("qcow2: image found corrupt; marking it corrupt (run image check --repair)");
        if self.hdr.version >= 3 {
            self.hdr.incompatible_features |= super::header::INCOMPAT_CORRUPT;
            if self.write_header().is_ok() {
                let _ = self.barrier();
            }
        }
    }

    /// Passes `r` on, marking the image corrupt if it is a corruption error.
    pub(crate) fn note_corrupt<T>(&mut self, r: Result<T>) -> Result<T> {
        if let Err(Qcow2Error::Corrupt(_) | Qcow2Error::Overlap { .. }) = r {
            self.mark_corrupt();
        }
        r
    }

    /// Whether lazy refcounts can be used with this header and these options.
    pub(crate) fn lazy_allowed(&self) -> bool {
        self.opts.lazy_refcounts
            && self.hdr.version >= 3
            && self.hdr.compatible_features & COMPAT_LAZY_REFCOUNTS != 0
    }

    /// Host offset of the L1 page holding entry `l1i`, and the entry's index in it.
    fn l1_page(&self, l1i: u64) -> (u64, usize) {
        let cs = self.geo.cluster_size();
        let byte = l1i * 8;
        (
            self.hdr.l1_table_offset + (byte & !(cs - 1)),
            ((byte & (cs - 1)) / 8) as usize,
        )
    }

    /// Active L1 entry `l1i` (raw).
    pub(crate) fn l1_entry(&mut self, l1i: u64) -> Result<u64> {
        let (page, i) = self.l1_page(l1i);
        let s = self.load(Pool::L2, page, TableKind::L1, true)?;
        Ok(get_u64(self.l2c.data(s), i))
    }

    /// Sets active L1 entry `l1i`.
    pub(crate) fn set_l1_entry(&mut self, l1i: u64, v: u64) -> Result<()> {
        self.l2_memo = None;
        let (page, i) = self.l1_page(l1i);
        let s = self.load(Pool::L2, page, TableKind::L1, true)?;
        set_u64(self.l2c.data_mut_range(s, i * 8, i * 8 + 8), i, v);
        Ok(())
    }

    /// Sets L2 entry `i` of the cached table in slot `s` (marking only its bytes dirty).
    pub(crate) fn put_l2(&mut self, s: usize, i: usize, m: Mapping) {
        self.put_l2_raw(s, i, m.encode(&self.geo));
    }

    /// Sets the raw words (entry, bitmap) of L2 entry `i` of the table in slot `s`.
    pub(crate) fn put_l2_raw(&mut self, s: usize, i: usize, raw: (u64, u64)) {
        let w = self.geo.l2_entry_bytes();
        let geo = self.geo;
        put_l2_raw(&geo, self.l2c.data_mut_range(s, i * w, i * w + w), i, raw);
    }

    /// The raw words (entry, bitmap) of L2 entry `i` of the table in slot `s`.
    pub(crate) fn l2_raw_at(&self, s: usize, i: usize) -> (u64, u64) {
        l2_raw(&self.geo, self.l2c.data(s), i)
    }

    /// Decodes L2 entry `i` of the table in slot `s`.
    pub(crate) fn l2_mapping_at(&self, s: usize, i: usize) -> Result<Mapping> {
        Mapping::from_table(self.l2c.data(s), i, &self.geo, self.hdr.version)
    }

    /// Checks an L2 table offset from an L1 entry.
    fn check_l2_offset(&self, off: u64) -> Result<()> {
        self.check_meta_offset(
            off,
            "an L1 entry points past the device end or into the header",
        )?;
        if self.overlaps_fixed(off, self.geo.cluster_size()) {
            return Err(Qcow2Error::Corrupt(
                "an L2 table overlaps the L1 table or the refcount table",
            ));
        }
        Ok(())
    }

    /// An L2 table about to change must lie wholly on the device (grown if it can grow):
    /// one that runs past the end of a fixed device (a damaged or cut image) reads as
    /// zeros there but could never be written back, so the write is refused with
    /// [`Qcow2Error::NoSpace`] before anything changes, not failed later at flush.
    fn l2_fits_for_write(&mut self, off: u64) -> Result<()> {
        if self.grow_to(off / self.geo.cluster_size() + 1) {
            Ok(())
        } else {
            Err(Qcow2Error::NoSpace)
        }
    }

    /// Whether `[off, off+len)` overlaps the header cluster, the L1 table or the refcount table.
    pub(crate) fn overlaps_fixed(&self, off: u64, len: u64) -> bool {
        let cs = self.geo.cluster_size();
        let end = off.saturating_add(len);
        let l1s = self.hdr.l1_table_offset;
        let l1e = l1s + (self.hdr.l1_size as u64 * 8).div_ceil(cs) * cs;
        let rts = self.hdr.refcount_table_offset;
        let rte = rts + self.hdr.refcount_table_clusters as u64 * cs;
        off < cs || (off < l1e && end > l1s) || (off < rte && end > rts)
    }

    /// The L2 table for guest cluster `vc`, if allocated (slot and host offset).
    pub(crate) fn l2_for_read(&mut self, vc: u64) -> Result<Option<(usize, u64)>> {
        let l1i = vc >> self.geo.l2_bits;
        if let Some((mi, off, s, _)) = self.l2_memo
            && mi == l1i
            && self.l2c.is_live(s, off)
        {
            self.stats.l2_cache_hits += 1;
            return Ok(Some((s, off)));
        }
        if l1i >= self.hdr.l1_size as u64 {
            return Ok(None);
        }
        let e = self.l1_entry(l1i)?;
        match decode_l1(e, &self.geo)? {
            None => Ok(None),
            Some((off, copied)) => {
                self.check_l2_offset(off)?;
                let s = self.load(Pool::L2, off, TableKind::L2, true)?;
                self.l2_memo = Some((l1i, off, s, copied));
                Ok(Some((s, off)))
            }
        }
    }

    /// The L2 table for guest cluster `vc`, ready to be changed: allocated if missing,
    /// copied if shared (refcount above one).
    pub(crate) fn l2_for_write(&mut self, vc: u64) -> Result<usize> {
        let l1i = vc >> self.geo.l2_bits;
        if let Some((mi, off, s, true)) = self.l2_memo
            && mi == l1i
            && self.l2c.is_live(s, off)
        {
            self.l2_fits_for_write(off)?;
            self.stats.l2_cache_hits += 1;
            return Ok(s);
        }
        if l1i >= self.hdr.l1_size as u64 {
            return Err(Qcow2Error::Corrupt(
                "the L1 table is too small for the virtual size",
            ));
        }
        let e = self.l1_entry(l1i)?;
        let cs = self.geo.cluster_size();
        match decode_l1(e, &self.geo)? {
            Some((off, true)) => {
                self.check_l2_offset(off)?;
                self.l2_fits_for_write(off)?;
                let s = self.load(Pool::L2, off, TableKind::L2, true)?;
                self.l2_memo = Some((l1i, off, s, true));
                Ok(s)
            }
            Some((off, false)) => {
                self.check_l2_offset(off)?;
                self.l2_fits_for_write(off)?;
                let rc = self.refcount(off / cs)?;
                if rc == 0 {
                    return Err(Qcow2Error::Corrupt("an L2 table in use has refcount 0"));
                }
                if rc == 1 {
                    self.set_l1_entry(l1i, off | COPIED)?;
                    return self.load(Pool::L2, off, TableKind::L2, true);
                }
                // Shared with a snapshot: copy it.
                let (nc, _) = self.alloc_run(1)?;
                let noff = nc * cs;
                let s = self.load(Pool::L2, off, TableKind::L2, true)?;
                let mut scratch = core::mem::take(&mut self.scratch);
                scratch.copy_from_slice(self.l2c.data(s));
                let ns = self.load(Pool::L2, noff, TableKind::L2, false)?;
                self.l2c.data_mut(ns).copy_from_slice(&scratch);
                self.scratch = scratch;
                self.set_l1_entry(l1i, noff | COPIED)?;
                self.meta_l2_copied(off / cs, nc);
                self.queue_free(off / cs, 1)?;
                self.l2c
                    .get(noff)
                    .map_or_else(|| self.load(Pool::L2, noff, TableKind::L2, true), Ok)
            }
            None => {
                let (nc, _) = self.alloc_run(1)?;
                let noff = nc * cs;
                self.load(Pool::L2, noff, TableKind::L2, false)?;
                self.stats.l2_tables_allocated += 1;
                self.tally(|t| t.l2_tables += 1);
                self.meta_insert(nc, super::overlap::kind::ACTIVE_L2);
                self.set_l1_entry(l1i, noff | COPIED)?;
                self.l2c
                    .get(noff)
                    .map_or_else(|| self.load(Pool::L2, noff, TableKind::L2, true), Ok)
            }
        }
    }
}
