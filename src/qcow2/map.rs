//! Where guest I/O lands on the host, for callers that move the data themselves (the
//! overlapped pipeline in [`crate::blkqueue::pipeline`]): reads of any mapped range and
//! writes that change no metadata (every cluster allocated, refcount one).

use super::Qcow2;
use super::entry::Mapping;
use super::error::{Qcow2Error, Result};
use super::header::INCOMPAT_EXTENDED_L2;
use crate::blkqueue::pipeline::{HostRun, QueuedDisk, push_run};
use crate::blkqueue::queue::BlockQueue;
use crate::block::BlockDevice;
use crate::disk::check_request;
use crate::disk::{DiskError, VirtualDisk};
use alloc::vec::Vec;

impl<D: BlockDevice> Qcow2<D> {
    /// The host runs `len` bytes at guest `offset` read from, in guest order: data on the
    /// device and runs that read as zeros (unallocated and zero clusters, and data clusters
    /// past the device end). `None` when a cluster needs the engine itself (compressed, or
    /// unallocated over a backing layer; subclusters).
    pub fn map_read(&mut self, offset: u64, len: u64) -> Result<Option<Vec<HostRun>>> {
        check_request(offset, len, self.hdr.size)
            .map_err(|_| Qcow2Error::Invalid("read past the end of the virtual disk"))?;
        if self.hdr.incompatible_features & INCOMPAT_EXTENDED_L2 != 0 {
            // Subclusters: a cluster's entry alone does not say what reads as what.
            return Ok(None);
        }
        let cs = self.geo.cluster_size();
        let cap = self.dev.capacity();
        let mut runs = Vec::new();
        let mut done = 0u64;
        while done < len {
            let (vc, inoff, _) = self.geo.locate(offset + done);
            let n = (cs - inoff).min(len - done);
            match self.mapping(vc)? {
                Mapping::Data { host, .. } => {
                    self.check_data_host(host, inoff + n)?;
                    let start = host + inoff;
                    let inside = cap.saturating_sub(start).min(n);
                    if inside > 0 {
                        push_run(
                            &mut runs,
                            HostRun::Data {
                                host: start,
                                len: inside,
                            },
                        );
                        self.stats.data_bytes_read += inside;
                    }
                    if inside < n {
                        push_run(&mut runs, HostRun::Zeros { len: n - inside });
                    }
                }
                Mapping::Compressed { .. } | Mapping::Subclusters { .. } => return Ok(None),
                // Over a backing layer an unallocated cluster reads from it: the engine's read.
                Mapping::Unallocated if self.has_backing() => return Ok(None),
                Mapping::Zero { .. } | Mapping::Unallocated => {
                    push_run(&mut runs, HostRun::Zeros { len: n })
                }
            }
            done += n;
        }
        Ok(Some(runs))
    }

    /// The host runs a write of `len` bytes at guest `offset` goes to when it changes no
    /// metadata: every cluster is a data cluster with refcount one (COPIED, in an L2 table
    /// that is not shared) inside the device, over no metadata. `None` otherwise: the write
    /// then goes through [`Qcow2::write_at`], which allocates and orders metadata. Marks the
    /// image as being written first (the dirty bit of lazy refcounts), as every write does.
    pub fn map_overwrite(&mut self, offset: u64, len: u64) -> Result<Option<Vec<HostRun>>> {
        if self.hdr.incompatible_features & INCOMPAT_EXTENDED_L2 != 0 {
            return Ok(None);
        }
        if !self.start_change(offset, len, "write past the end of the virtual disk")? {
            return Ok(Some(Vec::new()));
        }
        let cs = self.geo.cluster_size();
        let cap = self.dev.capacity();
        let mut runs = Vec::new();
        let mut done = 0u64;
        while done < len {
            let (vc, inoff, _) = self.geo.locate(offset + done);
            let n = (cs - inoff).min(len - done);
            if self.l2_for_read(vc)?.is_none() || !matches!(self.l2_memo, Some((.., true))) {
                return Ok(None);
            }
            let Mapping::Data { host, copied: true } = self.mapping(vc)? else {
                return Ok(None);
            };
            let start = host + inoff;
            if start.checked_add(n).is_none_or(|end| end > cap) {
                // Past the device end (the host file grows first): the engine's write path.
                return Ok(None);
            }
            // Refused (and the image marked corrupt) over metadata, as the engine's path does.
            self.check_data_write(host, inoff + n)?;
            push_run(
                &mut runs,
                HostRun::Data {
                    host: start,
                    len: n,
                },
            );
            done += n;
        }
        self.stats.data_bytes_written += len;
        Ok(Some(runs))
    }
}

impl<D: BlockDevice + BlockQueue> QueuedDisk for Qcow2<D> {
    fn map_read(
        &mut self,
        offset: u64,
        len: u64,
    ) -> core::result::Result<Option<Vec<HostRun>>, DiskError> {
        // Read-only for another reason than the open options (a snapshot view): the
        // engine's own read knows what to read.
        if VirtualDisk::is_read_only(self) && !self.read_only {
            return Ok(None);
        }
        Ok(Qcow2::map_read(self, offset, len)?)
    }
    fn map_overwrite(
        &mut self,
        offset: u64,
        len: u64,
    ) -> core::result::Result<Option<Vec<HostRun>>, DiskError> {
        if VirtualDisk::is_read_only(self) {
            return Err(DiskError::ReadOnly);
        }
        Ok(Qcow2::map_overwrite(self, offset, len)?)
    }
    fn queue(&mut self) -> &mut dyn BlockQueue {
        &mut self.dev
    }
}

#[cfg(test)]
impl<D: BlockDevice> Qcow2<D> {
    /// The device, for tests that step a queue under the engine.
    pub(crate) fn device_mut_for_tests(&mut self) -> &mut D {
        &mut self.dev
    }
}
