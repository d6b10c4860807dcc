//! Cluster allocation: first-free search from a cursor, contiguous runs for multi-cluster
//! writes, bounded by the device's capacity; and deferred frees, whose refcounts drop only
//! after the references to them are gone from the disk.

use super::cache::{TableKind, get_refcount};
use super::error::{Qcow2Error, Result};
use super::{Pool, Qcow2};
use crate::block::BlockDevice;

/// Most clusters waiting for their refcount decrement before a metadata write-back is
/// forced (bounds memory and the space [`super::max_image_len`] must allow for).
pub const PENDING_FREE_LIMIT: u64 = 4096;

impl<D: BlockDevice> Qcow2<D> {
    /// Whether free cluster `c` must still not be handed out. A metadata structure with
    /// refcount 0 is corruption: allocating over it would destroy it.
    fn reserved(&self, c: u64) -> Result<bool> {
        if let Some(g) = &self.guard
            && g.get(c as usize).is_some_and(|&x| x != 0)
        {
            return Ok(true);
        }
        let cs = self.geo.cluster_size();
        let key = c * cs;
        if self.overlaps_fixed(key, cs)
            || self.l2c.contains(key)
            || self.rcc.contains(key)
            || self
                .meta
                .as_ref()
                .is_some_and(|m| m.find(c, c, 0).is_some())
        {
            if self.guard.is_some() {
                return Ok(true);
            }
            return Err(Qcow2Error::Corrupt(
                "a metadata cluster has refcount 0 (refusing to allocate over it)",
            ));
        }
        Ok(false)
    }

    /// Records that clusters `[start, start+n)` are in use from now on: the known-zero area
    /// starts after them. Remembers whether they were in it.
    pub(crate) fn note_zero_use(&mut self, start: u64, n: u64) {
        let cs = self.geo.cluster_size();
        self.last_alloc_zeroed = start.saturating_mul(cs) >= self.zero_from;
        let end = (start + n).saturating_mul(cs);
        if end > self.zero_from && self.zero_from != u64::MAX {
            self.zero_from = end;
        }
    }

    /// During repair, records a new allocation so the refcount pass keeps it.
    pub(crate) fn note_alloc(&mut self, c: u64) {
        if let Some(g) = &mut self.guard {
            let i = c as usize;
            if i >= g.len() {
                g.resize(i + 1, 0);
            }
            g[i] = g[i].saturating_add(1);
        }
    }

    /// The first free cluster at or after `from`.
    pub(crate) fn find_free(&mut self, from: u64) -> Result<u64> {
        let rb_bits = self.geo.rb_bits;
        let mask = self.geo.rb_entries() - 1;
        let order = self.geo.refcount_order;
        let mut c = from.max(1);
        // Recently scanned full blocks: refcount-table entries that share a block (a loop
        // in the table) would otherwise make the search go round forever.
        let mut full = [u64::MAX; 8];
        let mut nfull = 0usize;
        loop {
            if c >= self.dev_clusters && !self.grow_to(c + 1) {
                return Err(Qcow2Error::NoSpace);
            }
            if c >= self.end {
                // Nothing at or past the end is in use.
                if !self.reserved(c)? {
                    return Ok(c);
                }
                c += 1;
                continue;
            }
            let ti = c >> rb_bits;
            match self.rt_entry(ti)? {
                None => {
                    if !self.reserved(c)? {
                        return Ok(c);
                    }
                    c += 1;
                }
                Some(block) => {
                    let s = self.load(Pool::Rc, block, TableKind::RefBlock, true)?;
                    let data = self.rcc.data(s);
                    let base = ti << rb_bits;
                    let mut i = c & mask;
                    let mut found = None;
                    while i <= mask {
                        if get_refcount(data, i as usize, order) == 0 {
                            found = Some(base + i);
                            break;
                        }
                        i += 1;
                    }
                    match found {
                        // The block may count clusters past the device end.
                        Some(f) if f >= self.dev_clusters && !self.grow_to(f + 1) => {
                            return Err(Qcow2Error::NoSpace);
                        }
                        Some(f) => {
                            if !self.reserved(f)? {
                                return Ok(f);
                            }
                            c = f + 1;
                        }
                        None => {
                            if full.contains(&block) {
                                return Err(Qcow2Error::Corrupt(
                                    "refcount table entries share a refcount block",
                                ));
                            }
                            full[nfull % full.len()] = block;
                            nfull += 1;
                            c = base + mask + 1;
                        }
                    }
                }
            }
        }
    }

    /// Allocates up to `want` contiguous clusters (at least one) with refcount 1; returns the
    /// first cluster index and the count.
    pub(crate) fn alloc_run(&mut self, want: u64) -> Result<(u64, u64)> {
        loop {
            let start = self.find_free(self.cursor)?;
            let mut n = 1;
            while n < want {
                let c = start + n;
                if c >= self.dev_clusters || self.refcount(c)? != 0 || self.reserved(c)? {
                    break;
                }
                n += 1;
            }
            self.refblocks_fit_for_write(start, n)?;
            if self.ensure_blocks(start, n)? {
                continue; // a new refcount block may have taken part of the run
            }
            for i in 0..n {
                self.set_refcount(start + i, 1)?;
                self.note_alloc(start + i);
            }
            self.cursor = start + n;
            self.end = self.end.max(start + n);
            self.stats.clusters_allocated += n;
            self.note_zero_use(start, n);
            return Ok((start, n));
        }
    }

    /// Drops one reference to clusters `[first, first+n)` once the change that removed the
    /// reference is on disk.
    pub(crate) fn queue_free(&mut self, first: u64, n: u64) -> Result<()> {
        if let Some(last) = self.pending.last_mut()
            && last.0 + last.1 == first
        {
            last.1 += n;
            self.pending_count += n;
            self.stats.reclaim_junk_now = self.pending_count;
            return self.maybe_flush_pending();
        }
        self.pending.push((first, n));
        self.pending_count += n;
        self.stats.reclaim_junk_now = self.pending_count;
        self.maybe_flush_pending()
    }

    fn maybe_flush_pending(&mut self) -> Result<()> {
        if self.pending_count >= PENDING_FREE_LIMIT || self.pending.len() >= 1024 {
            self.flush_metadata()?;
        }
        Ok(())
    }

    /// Discards freed clusters `[first, first+n)` on the device (a hint: failures do not
    /// matter); counts them erased when the device took it.
    fn erase(&mut self, first: u64, n: u64) {
        let cs = self.geo.cluster_size();
        if self.dev.discard(first * cs, n * cs).is_ok() {
            self.stats.reclaim_erased += n;
        }
    }

    /// Decrements the refcounts of the deferred frees (their references are on disk now).
    pub(crate) fn apply_frees(&mut self) -> Result<()> {
        let cs = self.geo.cluster_size();
        let pending = core::mem::take(&mut self.pending);
        self.pending_count = 0;
        self.stats.reclaim_junk_now = 0;
        let mut result = Ok(());
        'outer: for &(first, n) in pending.iter() {
            let mut discard_start = None;
            for c in first..first + n {
                let r = match self.refcount(c) {
                    Ok(r) => r,
                    Err(e) => {
                        result = Err(e);
                        break 'outer;
                    }
                };
                if r == 0 {
                    result = Err(Qcow2Error::Corrupt(
                        "freeing a cluster whose refcount is already 0",
                    ));
                    break 'outer;
                }
                if r == 1
                    && let Some(e) = self.refuse_free(c)
                {
                    // A data reference into live metadata went away: the metadata stays
                    // allocated (the rest of the frees leak, which is safe).
                    result = Err(e);
                    break 'outer;
                }
                if let Err(e) = self.set_refcount(c, r - 1) {
                    result = Err(e);
                    break 'outer;
                }
                if r == 1 {
                    self.stats.clusters_freed += 1;
                    self.stats.reclaim_junk += 1;
                    self.freed_top = self.freed_top.max(c + 1);
                    self.cursor = self.cursor.min(c);
                    self.l2c.forget(c * cs);
                    self.meta_freed(c);
                    if self.packed_at.is_some_and(|p| p / cs == c) {
                        // Compressed clusters must not be packed into it once it is free.
                        self.packed_at = None;
                    }
                    discard_start.get_or_insert(c);
                } else if let Some(d) = discard_start.take() {
                    self.erase(d, c - d);
                }
            }
            if let Some(d) = discard_start {
                self.erase(d, first + n - d);
            }
        }
        let mut pending = pending;
        pending.clear();
        if self.pending.is_empty() {
            self.pending = pending;
        }
        result
    }
}
