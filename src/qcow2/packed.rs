//! Writing compressed clusters. Each compressed cluster's bytes follow the previous one's,
//! packed into shared host clusters as QEMU packs them: a host cluster's refcount is the
//! number of compressed clusters with bytes in it, and a compressed cluster may run over
//! into the next host cluster when that one is free. The L2 entry holds the byte offset
//! and the number of 512-byte sectors the data touches.

use super::Qcow2;
use super::compress::ClusterCompressor;
use super::entry::{COMPRESSED, Mapping};
use super::error::{Qcow2Error, Result};
use crate::block::BlockDevice;
use alloc::vec;
use alloc::vec::Vec;

impl<D: BlockDevice> Qcow2<D> {
    /// Stores the guest cluster at `offset` (a cluster boundary) as the compressed bytes
    /// `compressed`, made by a [`ClusterCompressor`] of this image's compression type from
    /// the whole cluster (the last cluster of the disk padded with zeros). Whatever the
    /// cluster held before is released.
    pub fn write_compressed(&mut self, offset: u64, compressed: &[u8]) -> Result<()> {
        let cs = self.geo.cluster_size();
        if !offset.is_multiple_of(cs) {
            return Err(Qcow2Error::Invalid(
                "a compressed cluster must start at a cluster boundary",
            ));
        }
        let len = compressed.len() as u64;
        if len == 0 || len >= cs {
            return Err(Qcow2Error::Invalid(
                "compressed data must be shorter than a cluster (store it uncompressed)",
            ));
        }
        let in_disk = cs.min(self.hdr.size.saturating_sub(offset));
        if !self.start_change(
            offset,
            in_disk.max(1),
            "compressed write past the end of the virtual disk",
        )? {
            return Ok(());
        }
        let host = self.alloc_compressed(len)?;
        let written = self
            .check_data_write(host, len)
            .and_then(|()| super::write_dev(&mut self.dev, host, compressed));
        if let Err(e) = written {
            // Nothing points at the bytes; at worst their cluster leaks (see `faults`).
            self.packed_at = None;
            return Err(e);
        }
        let x = 62 - (self.geo.cluster_bits - 8);
        let sectors = (host + len - 1) / 512 - host / 512;
        let entry = COMPRESSED | host | (sectors << x);
        let vc = offset / cs;
        let old = self.mapping(vc)?;
        let new = Mapping::decode(entry, &self.geo, self.hdr.version)?;
        let s = self.l2_for_write(vc)?;
        let i = (vc & (self.geo.l2_entries() - 1)) as usize;
        // A compressed entry's subcluster bitmap (extended L2) is all zeros.
        self.put_l2_raw(s, i, (entry, 0));
        self.release(old)?;
        if let Mapping::Compressed { len, .. } = new {
            self.tally(|t| t.compressed_bytes += len);
        }
        self.stats.data_bytes_written += len;
        Ok(())
    }

    /// Writes one guest cluster at `offset` (a cluster boundary; `data` is the whole
    /// cluster, or what is left of the disk for the last one) compressed with `compressor`
    /// when that makes it smaller, else uncompressed, as QEMU does.
    pub fn write_cluster_compressed(
        &mut self,
        offset: u64,
        data: &[u8],
        compressor: &mut ClusterCompressor,
    ) -> Result<()> {
        let cs = self.geo.cluster_size() as usize;
        let mut out = Vec::new();
        let fits = if data.len() < cs {
            let mut padded = vec![0u8; cs];
            padded[..data.len()].copy_from_slice(data);
            compressor.compress(&padded, &mut out)
        } else {
            compressor.compress(data, &mut out)
        };
        if fits {
            self.write_compressed(offset, &out)
        } else {
            self.write_at(offset, data)
        }
    }

    /// Host bytes for `len` bytes of compressed data (`len` below the cluster size): after
    /// the last compressed cluster when its host cluster can take another reference (and,
    /// if the bytes run over, the next host cluster is free), else at the start of a new
    /// host cluster.
    fn alloc_compressed(&mut self, len: u64) -> Result<u64> {
        let cs = self.geo.cluster_size();
        let after = |end: u64| (!end.is_multiple_of(cs)).then_some(end);
        if let Some(pos) = self.packed_at.take() {
            let c = pos / cs;
            let room = cs - pos % cs;
            let rc = self.refcount(c)?;
            if rc >= 1 && rc < self.geo.refcount_max() {
                if len <= room {
                    self.set_refcount(c, rc + 1)?;
                    self.packed_at = after(pos + len);
                    return Ok(pos);
                }
                // Run over into the next host cluster if that is the one allocated next.
                let saved = self.cursor;
                self.cursor = c + 1;
                let got = self.alloc_run(1);
                self.cursor = saved.min(self.cursor);
                let (hc, _) = got?;
                if hc == c + 1 {
                    let rc = self.refcount(c)?;
                    self.set_refcount(c, rc + 1)?;
                    self.packed_at = after(pos + len);
                    return Ok(pos);
                }
                self.packed_at = after(hc * cs + len);
                return Ok(hc * cs);
            }
        }
        let (hc, _) = self.alloc_run(1)?;
        self.packed_at = after(hc * cs + len);
        Ok(hc * cs)
    }
}
