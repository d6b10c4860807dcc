//! Preallocation: host clusters for the clusters of a range that have none, as QEMU's
//! `preallocation=metadata` gives them (the data written later lands in place).

use super::Qcow2;
use super::entry::Mapping;
use super::error::{Qcow2Error, Result};
use crate::block::BlockDevice;

/// Whether a cluster mapped `m` reads as zeros and has no host cluster.
fn without_host(m: Mapping) -> bool {
    matches!(m, Mapping::Unallocated | Mapping::Zero { host: None, .. })
}

impl<D: BlockDevice> Qcow2<D> {
    /// Gives every cluster that touches `[offset, offset + len)` and has no host cluster
    /// (unallocated, or a zero cluster without one) a host cluster of its own, pointed at by
    /// a data entry, as QEMU's `preallocation=metadata` does; the disk reads the same
    /// (zeros) afterwards. New host clusters are zeroed on the device unless they lie past
    /// its stored data, and the device is made to reach the last of them (a file is
    /// lengthened, sparsely). An image with a backing file is refused: there such clusters
    /// read from the backing file.
    pub fn preallocate(&mut self, offset: u64, len: u64) -> Result<()> {
        if self.has_backing() {
            return Err(Qcow2Error::Invalid(
                "an image with a backing file cannot be preallocated",
            ));
        }
        if !self.start_change(
            offset,
            len,
            "preallocation past the end of the virtual disk",
        )? {
            return Ok(());
        }
        let cs = self.geo.cluster_size();
        let l2e = self.geo.l2_entries();
        let end = (offset + len).div_ceil(cs);
        let mut vc = offset / cs;
        let mut top = 0u64;
        while vc < end {
            let l2i = vc & (l2e - 1);
            let s = self.l2_for_write(vc)?;
            if !without_host(self.l2_mapping_at(s, l2i as usize)?) {
                vc += 1;
                continue;
            }
            // The run of such clusters in this L2 table.
            let mut k = 1;
            while vc + k < end
                && l2i + k < l2e
                && without_host(self.l2_mapping_at(s, (l2i + k) as usize)?)
            {
                k += 1;
            }
            let (hc, got) = self.alloc_run(k)?;
            let host = hc * cs;
            if !self.last_alloc_zeroed {
                let zeroed = self
                    .check_data_write(host, got * cs)
                    .and_then(|()| Ok(self.dev.write_zeroes(host, got * cs)?));
                if let Err(e) = zeroed {
                    return Err(self.fresh_write_failed(hc, got, e));
                }
            }
            let s = self.l2_for_write(vc)?;
            for j in 0..got {
                let data = Mapping::Data {
                    host: host + j * cs,
                    copied: true,
                };
                // The old entry had no host cluster: nothing to release.
                self.put_l2(s, (l2i + j) as usize, data);
            }
            self.tally(|t| t.data_clusters += got);
            top = top.max(host + got * cs);
            vc += got;
        }
        // Reach the last new cluster: QEMU counts a data cluster past the file's end as
        // corrupt.
        if self.dev.zeroes_from().is_some_and(|z| z < top) {
            super::write_dev(&mut self.dev, top - 512, &[0u8; 512])?;
        }
        Ok(())
    }
}
