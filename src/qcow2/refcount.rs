//! Refcounts: reading and setting the refcount of a host cluster at any width (1..=64 bits),
//! allocating refcount blocks on demand (including blocks that count themselves) and growing
//! the refcount table when the image outgrows it.

use super::cache::{TableKind, get_refcount, get_u64, set_refcount, set_u64};
use super::error::{Qcow2Error, Result};
use super::{Pool, Qcow2};
use crate::block::BlockDevice;
use alloc::vec::Vec;

impl<D: BlockDevice> Qcow2<D> {
    /// Host offset of the refcount-table page holding entry `ti`, and the index in it.
    pub(crate) fn rt_page(&self, ti: u64) -> (u64, usize) {
        let cs = self.geo.cluster_size();
        let byte = ti * 8;
        (
            self.hdr.refcount_table_offset + (byte & !(cs - 1)),
            ((byte & (cs - 1)) / 8) as usize,
        )
    }

    /// The refcount block for table index `ti`, if allocated.
    pub(crate) fn rt_entry(&mut self, ti: u64) -> Result<Option<u64>> {
        if ti >= self.rt_entries {
            return Ok(None);
        }
        let (page, i) = self.rt_page(ti);
        let s = self.load(Pool::Rc, page, TableKind::RefTable, true)?;
        let e = get_u64(self.rcc.data(s), i);
        if e == 0 {
            return Ok(None);
        }
        if e & (self.geo.cluster_size() - 1) != 0 {
            return Err(Qcow2Error::Corrupt(
                "a refcount table entry is unaligned or has reserved bits set",
            ));
        }
        self.check_meta_offset(
            e,
            "a refcount block lies past the device end or in the header",
        )?;
        Ok(Some(e))
    }

    pub(crate) fn set_rt_entry(&mut self, ti: u64, v: u64) -> Result<()> {
        let (page, i) = self.rt_page(ti);
        let s = self.load(Pool::Rc, page, TableKind::RefTable, true)?;
        set_u64(self.rcc.data_mut_range(s, i * 8, i * 8 + 8), i, v);
        Ok(())
    }

    /// Refcount of host cluster `c`.
    pub(crate) fn refcount(&mut self, c: u64) -> Result<u64> {
        let ti = c >> self.geo.rb_bits;
        let Some(block) = self.rt_entry(ti)? else {
            return Ok(0);
        };
        let s = self.load(Pool::Rc, block, TableKind::RefBlock, true)?;
        let i = (c & (self.geo.rb_entries() - 1)) as usize;
        Ok(get_refcount(self.rcc.data(s), i, self.geo.refcount_order))
    }

    /// Sets the refcount of host cluster `c`. Its refcount block must exist (see
    /// [`Qcow2::ensure_blocks`]) unless `v` is 0.
    pub(crate) fn set_refcount(&mut self, c: u64, v: u64) -> Result<()> {
        if v > self.geo.refcount_max() {
            return Err(Qcow2Error::Corrupt(
                "a refcount would overflow its width (too many references)",
            ));
        }
        let ti = c >> self.geo.rb_bits;
        let Some(block) = self.rt_entry(ti)? else {
            if v == 0 {
                return Ok(());
            }
            return Err(Qcow2Error::Corrupt(
                "refcount block missing for an allocated cluster",
            ));
        };
        let s = self.load(Pool::Rc, block, TableKind::RefBlock, true)?;
        let i = (c & (self.geo.rb_entries() - 1)) as usize;
        let order = self.geo.refcount_order;
        let old = get_refcount(self.rcc.data(s), i, order);
        let (lo, hi) = ((i << order) / 8, ((i + 1) << order).div_ceil(8));
        set_refcount(self.rcc.data_mut_range(s, lo, hi), i, order, v);
        if (old == 0) != (v == 0) {
            self.tally(|t| {
                if v == 0 {
                    t.used = t.used.saturating_sub(1)
                } else {
                    t.used += 1
                }
            });
        }
        Ok(())
    }

    /// The existing refcount blocks counting clusters `[start, start+n)` must lie wholly on
    /// the device (grown if it can grow) before any of those refcounts is raised: a block
    /// that runs past the end of a fixed device (a damaged or cut image) reads as zeros there
    /// but could never be written back, so the allocation is refused with
    /// [`Qcow2Error::NoSpace`] before anything changes, not failed later at flush.
    pub(crate) fn refblocks_fit_for_write(&mut self, start: u64, n: u64) -> Result<()> {
        let cs = self.geo.cluster_size();
        let first = start >> self.geo.rb_bits;
        let last = (start + n - 1) >> self.geo.rb_bits;
        for ti in first..=last {
            if let Some(block) = self.rt_entry(ti)?
                && !self.grow_to(block / cs + 1)
            {
                return Err(Qcow2Error::NoSpace);
            }
        }
        Ok(())
    }

    /// Makes sure refcount blocks exist for clusters `[start, start+n)`. Returns whether any
    /// had to be allocated (the caller then re-checks what it found free).
    pub(crate) fn ensure_blocks(&mut self, start: u64, n: u64) -> Result<bool> {
        let first = start >> self.geo.rb_bits;
        let last = (start + n - 1) >> self.geo.rb_bits;
        let mut changed = false;
        for ti in first..=last {
            if self.rt_entry(ti)?.is_none() {
                self.alloc_refcount_block(ti, 0)?;
                changed = true;
            }
        }
        Ok(changed)
    }

    /// Allocates the refcount block for table index `ti`. It goes to the first free cluster;
    /// if that cluster lies in the range the new block covers, the block counts itself.
    fn alloc_refcount_block(&mut self, ti: u64, depth: u32) -> Result<()> {
        if depth > 8 {
            return Err(Qcow2Error::Corrupt(
                "refcount block allocation does not converge",
            ));
        }
        if ti >= self.rt_entries {
            self.grow_refcount_table(ti)?;
            if self.rt_entry(ti)?.is_some() {
                return Ok(());
            }
        }
        let cs = self.geo.cluster_size();
        let mask = self.geo.rb_entries() - 1;
        loop {
            let c = self.find_free(self.cursor)?;
            let cti = c >> self.geo.rb_bits;
            let key = c * cs;
            if cti == ti {
                let s = self.load(Pool::Rc, key, TableKind::RefBlock, false)?;
                set_refcount(
                    self.rcc.data_mut(s),
                    (c & mask) as usize,
                    self.geo.refcount_order,
                    1,
                );
            } else if self.rt_entry(cti)?.is_some() {
                self.refblocks_fit_for_write(c, 1)?;
                self.set_refcount(c, 1)?;
                self.load(Pool::Rc, key, TableKind::RefBlock, false)?;
            } else {
                // The free cluster's own range has no block yet: that block comes first
                // (and will count itself at `c`); then look again.
                self.alloc_refcount_block(cti, depth + 1)?;
                if self.rt_entry(ti)?.is_some() {
                    return Ok(());
                }
                continue;
            }
            self.set_rt_entry(ti, key)?;
            self.meta_insert(c, super::overlap::kind::REFCOUNT_BLOCK);
            self.note_alloc(c);
            self.note_zero_use(c, 1);
            let self_counted = cti == ti;
            self.tally(|t| {
                t.refblocks += 1;
                if self_counted {
                    t.used += 1;
                }
            });
            self.stats.refcount_blocks_allocated += 1;
            self.stats.clusters_allocated += 1;
            self.end = self.end.max(c + 1);
            return Ok(());
        }
    }

    /// Grows the refcount table so it has an entry `min_ti`: a bigger table (with refcount
    /// blocks for itself where needed) is written at the end of the image, the header is
    /// switched to it, and the old table is freed.
    fn grow_refcount_table(&mut self, min_ti: u64) -> Result<()> {
        let cs = self.geo.cluster_size();
        let epc = cs / 8;
        let rb_bits = self.geo.rb_bits;
        // Everything the old table describes is on disk first: the copy reads it from there.
        self.write_refcounts()?;
        self.barrier()?;
        let old_off = self.hdr.refcount_table_offset;
        let old_clusters = self.hdr.refcount_table_clusters as u64;
        let mut new_clusters = (old_clusters * 2).max((min_ti + 1).div_ceil(epc));
        let e = self.end.max(self.fixed_end());
        // Find how many new blocks the new table and the blocks themselves need.
        let mut missing: Vec<u64> = Vec::new();
        loop {
            let mut bc = 0u64;
            loop {
                missing.clear();
                let last = e + new_clusters + bc - 1;
                for ti in (e >> rb_bits)..=(last >> rb_bits) {
                    if ti >= self.rt_entries || self.rt_entry(ti)?.is_none() {
                        missing.push(ti);
                    }
                }
                if missing.len() as u64 == bc {
                    break;
                }
                bc = missing.len() as u64;
            }
            let last = e + new_clusters + bc - 1;
            if (last >> rb_bits) < new_clusters * epc && min_ti < new_clusters * epc {
                break;
            }
            new_clusters = new_clusters.max(((last >> rb_bits) + 1).div_ceil(epc)) + 1;
            if new_clusters * cs > super::layout::MAX_REFCOUNT_TABLE_BYTES {
                return Err(Qcow2Error::NoSpace);
            }
        }
        let bc = missing.len() as u64;
        let total_end = e + new_clusters + bc;
        if total_end > self.dev_clusters && !self.grow_to(total_end) {
            return Err(Qcow2Error::NoSpace);
        }
        for c in e..total_end {
            if self.refcount(c)? != 0 {
                return Err(Qcow2Error::Corrupt(
                    "clusters past the image end are in use (refcount table growth)",
                ));
            }
        }
        // Refcounts of the new clusters that fall into existing blocks.
        for c in e..total_end {
            let ti = c >> rb_bits;
            if missing.binary_search(&ti).is_err() {
                self.set_refcount(c, 1)?;
            }
        }
        let mut scratch = core::mem::take(&mut self.scratch);
        let r = (|| -> Result<()> {
            // The new blocks.
            for (j, &ti) in missing.iter().enumerate() {
                scratch.fill(0);
                for c in e..total_end {
                    if c >> rb_bits == ti {
                        set_refcount(
                            &mut scratch,
                            (c & (self.geo.rb_entries() - 1)) as usize,
                            self.geo.refcount_order,
                            1,
                        );
                    }
                }
                super::write_dev(&mut self.dev, (e + new_clusters + j as u64) * cs, &scratch)?;
                self.stats.metadata_bytes_written += cs;
            }
            // The new table: old entries plus the new blocks.
            for k in 0..new_clusters {
                if k < old_clusters {
                    super::read_dev(&mut self.dev, old_off + k * cs, &mut scratch)?;
                } else {
                    scratch.fill(0);
                }
                for (j, &ti) in missing.iter().enumerate() {
                    if ti / epc == k {
                        set_u64(
                            &mut scratch,
                            (ti % epc) as usize,
                            (e + new_clusters + j as u64) * cs,
                        );
                    }
                }
                super::write_dev(&mut self.dev, (e + k) * cs, &scratch)?;
                self.stats.metadata_bytes_written += cs;
            }
            Ok(())
        })();
        self.scratch = scratch;
        r?;
        self.write_refcounts()?;
        // Barrier: the new table and blocks are durable before the header points at them.
        self.barrier()?;
        self.hdr.refcount_table_offset = e * cs;
        self.hdr.refcount_table_clusters = new_clusters as u32;
        self.write_header()?;
        self.barrier()?;
        for k in 0..old_clusters {
            self.rcc.forget(old_off + k * cs);
        }
        for c in e..total_end {
            self.note_alloc(c);
        }
        for j in 0..bc {
            self.meta_insert(e + new_clusters + j, super::overlap::kind::REFCOUNT_BLOCK);
        }
        self.note_zero_use(e, total_end - e);
        let in_new_blocks = (e..total_end)
            .filter(|c| missing.binary_search(&(c >> rb_bits)).is_ok())
            .count() as u64;
        self.tally(|t| {
            t.refblocks += bc;
            t.used += in_new_blocks;
        });
        self.rt_entries = new_clusters * epc;
        self.end = self.end.max(total_end);
        self.stats.clusters_allocated += new_clusters + bc;
        self.stats.refcount_blocks_allocated += bc;
        // The old table is no longer referenced by the (durable) header: free it.
        for k in 0..old_clusters {
            let c = old_off / cs + k;
            let r = self.refcount(c)?;
            if let Some(x) = self.guard.as_mut().and_then(|g| g.get_mut(c as usize)) {
                *x = x.saturating_sub(1);
            }
            if r > 0 {
                self.set_refcount(c, r - 1)?;
                if r == 1 {
                    self.stats.clusters_freed += 1;
                    // Reclaim: junk, and reusable at once (the header no longer points here).
                    self.stats.reclaim_junk += 1;
                    self.stats.reclaim_available += 1;
                    self.cursor = self.cursor.min(c);
                }
            }
        }
        Ok(())
    }

    /// Before writing: refcount blocks must be valid, distinct and clear of the fixed
    /// metadata. Entries that share a block (a loop in the table) would make allocation go
    /// round and round, and a block over other metadata would be clobbered. Memory: one
    /// `u64` per refcount block (the table itself is at most 8 MiB).
    pub(crate) fn validate_refcount_table(&mut self) -> Result<()> {
        let cs = self.geo.cluster_size();
        let mut blocks = Vec::new();
        for ti in 0..self.rt_entries {
            if let Some(b) = self.rt_entry(ti)? {
                if self.overlaps_fixed(b, cs) {
                    return Err(Qcow2Error::Corrupt(
                        "overlapping metadata: a refcount block lies on the header, the L1 table or the refcount table",
                    ));
                }
                blocks.push(b);
            }
        }
        blocks.sort_unstable();
        if blocks.windows(2).any(|w| w[0] == w[1]) {
            return Err(Qcow2Error::Corrupt(
                "refcount table entries share a refcount block (the table loops)",
            ));
        }
        Ok(())
    }

    /// One past the last cluster of the header, L1 table and refcount table.
    pub(crate) fn fixed_end(&self) -> u64 {
        let cs = self.geo.cluster_size();
        let l1_end = self.hdr.l1_table_offset / cs + (self.hdr.l1_size as u64 * 8).div_ceil(cs);
        let rt_end = self.hdr.refcount_table_offset / cs + self.hdr.refcount_table_clusters as u64;
        l1_end.max(rt_end).max(1)
    }
}
