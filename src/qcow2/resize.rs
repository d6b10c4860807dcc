//! Changing the virtual size: growing (the L1 table moves to a bigger place when it must
//! grow) and shrinking (the clusters and L2 tables past the new end are freed).

use super::Qcow2;
use super::error::{Qcow2Error, Result};
use super::layout::MAX_L1_BYTES;
use crate::block::BlockDevice;

impl<D: BlockDevice> Qcow2<D> {
    /// Grows the virtual disk to `new_size` bytes, rounded up to 512 (shrinking is refused). If
    /// the L1 table is too small, a bigger one is written to newly allocated clusters, the
    /// header is switched to it, and the old one is freed.
    ///
    /// An overlay whose backing layer is larger than its old size gets the new area as zero
    /// clusters, so that the layer's data there does not show through (as QEMU does since
    /// 5.0: the new area reads as zeros, the head of the cluster holding the old end is
    /// copied up). A version 2 image has no zero clusters: QEMU refuses to grow it then
    /// ("Failed to zero out new clusters"), and so does this, before changing anything.
    pub fn resize(&mut self, new_size: u64) -> Result<()> {
        let new_size = new_size.saturating_add(511) & !511;
        if new_size < self.hdr.size {
            return Err(Qcow2Error::Invalid("shrinking an image is not supported"));
        }
        if new_size > i64::MAX as u64 {
            return Err(Qcow2Error::Invalid("virtual size above 2^63 bytes"));
        }
        if self
            .hdr
            .extensions
            .iter()
            .any(|e| e.kind == super::header::EXT_BITMAPS)
            && self.hdr.autoclear_features & super::header::AUTOCLEAR_BITMAPS != 0
        {
            return Err(Qcow2Error::Invalid(
                "an image with persistent dirty bitmaps cannot be resized (as with QEMU); \
                 remove them first with `qemu-img bitmap --remove`",
            ));
        }
        let old_size = self.hdr.size;
        let zero_new =
            new_size > old_size && self.backing.as_ref().is_some_and(|b| b.size() > old_size);
        if zero_new && self.hdr.version < 3 {
            return Err(Qcow2Error::Invalid(
                "a compat=0.10 overlay cannot grow while its backing file is larger than it \
                 (the new area needs zero clusters, which version 2 lacks; QEMU refuses it \
                 too): upgrade it first with `qemu-img amend -o compat=1.1`",
            ));
        }
        self.begin_write()?;
        let cs = self.geo.cluster_size();
        let need = self.geo.l1_entries_for(new_size);
        if need * 8 > MAX_L1_BYTES {
            return Err(Qcow2Error::Invalid(
                "virtual size too large for this cluster size (L1 table over 32 MiB)",
            ));
        }
        let old_entries = self.hdr.l1_size as u64;
        if need > old_entries {
            let old_clusters = (old_entries * 8).div_ceil(cs);
            let new_clusters = (need * 8).div_ceil(cs);
            if new_clusters > old_clusters {
                // Everything the old table says is on disk first; the copy reads it there.
                self.flush_metadata()?;
                let (first, got) = self.alloc_contiguous(new_clusters)?;
                debug_assert_eq!(got, new_clusters);
                let new_off = first * cs;
                let old_off = self.hdr.l1_table_offset;
                let mut scratch = core::mem::take(&mut self.scratch);
                let r = (|| -> Result<()> {
                    for k in 0..new_clusters {
                        if k < old_clusters {
                            super::read_dev(&mut self.dev, old_off + k * cs, &mut scratch)?;
                        } else {
                            scratch.fill(0);
                        }
                        super::write_dev(&mut self.dev, new_off + k * cs, &scratch)?;
                        self.stats.metadata_bytes_written += cs;
                    }
                    Ok(())
                })();
                self.scratch = scratch;
                r?;
                self.flush_metadata()?;
                self.barrier()?;
                for k in 0..old_clusters {
                    self.l2c.forget(old_off + k * cs);
                }
                self.hdr.l1_table_offset = new_off;
                self.hdr.l1_size = need as u32;
                self.write_header()?;
                self.barrier()?;
                if old_clusters > 0 {
                    self.queue_free(old_off / cs, old_clusters)?;
                }
                self.flush_metadata()?;
                return self.set_grown_size(old_size, new_size, zero_new);
            }
            // The L1 grows inside its last cluster: make sure the new entries are zero.
            for l1i in old_entries..need {
                self.set_l1_entry(l1i, 0)?;
            }
            self.flush_metadata()?;
            self.hdr.l1_size = need as u32;
        }
        self.set_grown_size(old_size, new_size, zero_new)
    }

    /// The last step of a growth, once the L1 table covers `new_size`: with `zero_new`, the
    /// area from `old_size` becomes zeros (zero clusters, written zeros in the cluster of
    /// the old end) and that is durable before the header says the new size, so that a
    /// crash never shows the backing layer there.
    fn set_grown_size(&mut self, old_size: u64, new_size: u64, zero_new: bool) -> Result<()> {
        if zero_new {
            // The L1 table's new length on disk first: the L2 tables the zeroing adds are
            // then never left outside it (leaked) by a crash.
            self.write_header()?;
            self.barrier()?;
            // The range check of write-zeroes takes the new size; the header keeps the old
            // one until the zeros are in place.
            self.hdr.size = new_size;
            let r = self
                .zero_range(old_size, new_size - old_size, true)
                .and_then(|()| self.flush_metadata())
                .and_then(|()| self.barrier());
            if let Err(e) = r {
                self.hdr.size = old_size;
                return Err(e);
            }
        }
        self.hdr.size = new_size;
        self.write_header()?;
        self.barrier()
    }

    /// Shrinks the virtual disk to `new_size` bytes, rounded up to 512 (a bigger size grows
    /// it as [`Qcow2::resize`] does). Clusters past the new end are freed, L2 tables that
    /// cover only the cut part are freed and their L1 entries cleared; the part of the last
    /// cluster past the new end is zeroed, so that growing again shows zeros there. The L1
    /// table keeps its place and length. Refused for images with internal snapshots or
    /// persistent bitmaps (as QEMU refuses them).
    pub fn shrink(&mut self, new_size: u64) -> Result<()> {
        let new_size = new_size.saturating_add(511) & !511;
        let old = self.hdr.size;
        if new_size >= old {
            return self.resize(new_size);
        }
        if self.hdr.nb_snapshots > 0 {
            return Err(Qcow2Error::Unsupported(
                "shrinking an image with internal snapshots (delete them first)",
            ));
        }
        if self
            .hdr
            .extensions
            .iter()
            .any(|e| e.kind == super::header::EXT_BITMAPS)
        {
            return Err(Qcow2Error::Unsupported(
                "shrinking an image with persistent dirty bitmaps (remove them first)",
            ));
        }
        self.begin_write()?;
        let cs = self.geo.cluster_size();
        let cut = new_size.next_multiple_of(cs).min(old);
        if cut > new_size {
            self.zero_range(new_size, cut - new_size, false)?;
        }
        if cut < old {
            self.discard_range(cut, old - cut)?;
        }
        let keep = self.geo.l1_entries_for(new_size);
        for l1i in keep..self.hdr.l1_size as u64 {
            let e = self.l1_entry(l1i)?;
            if let Some((off, _)) = super::entry::decode_l1(e, &self.geo)? {
                self.set_l1_entry(l1i, 0)?;
                self.l2_memo = None;
                self.tally(|t| t.l2_tables = t.l2_tables.saturating_sub(1));
                self.queue_free(off / cs, 1)?;
            }
        }
        // The cut clusters' references are on disk before the header says the new size.
        self.flush_metadata()?;
        self.barrier()?;
        self.hdr.size = new_size;
        self.write_header()?;
        self.barrier()
    }

    /// Allocates exactly `n` contiguous clusters.
    pub(crate) fn alloc_contiguous(&mut self, n: u64) -> Result<(u64, u64)> {
        let saved = self.cursor;
        loop {
            let (first, got) = self.alloc_run(n)?;
            if got == n {
                self.cursor = saved.min(self.cursor);
                return Ok((first, got));
            }
            // Too short: give the run back right away (nothing references it) and move on.
            for c in first..first + got {
                self.set_refcount(c, 0)?;
            }
            self.stats.clusters_allocated -= got;
            self.cursor = first + got + 1;
        }
    }
}
