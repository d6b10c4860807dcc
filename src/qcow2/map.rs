//! Where guest I/O lands on the host, for callers that move the data themselves (the
//! overlapped pipeline in [`crate::blkqueue::pipeline`]): reads of any mapped range, writes
//! that change no metadata (every cluster allocated, refcount one), and writes that fill
//! whole new clusters (allocated here, referenced in [`Qcow2::finish_write`] once the data
//! has landed: the engine's rule that data comes before the L2 entry pointing at it).

use super::Qcow2;
use super::entry::Mapping;
use super::error::{Qcow2Error, Result};
use super::header::INCOMPAT_EXTENDED_L2;
use crate::blkqueue::pipeline::{HostRun, MappedWrite, NewRef, NewRefs, QueuedDisk, push_run};
use crate::blkqueue::queue::BlockQueue;
use crate::block::BlockDevice;
use crate::block::BlockError;
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

    /// The host runs a write of `len` bytes at guest `offset` goes to when the caller moves
    /// its data: clusters it overwrites in place (as [`Qcow2::map_overwrite`]), and new
    /// clusters allocated now (refcount one) for every guest cluster it covers whole that
    /// holds nothing (unallocated, or zero without a host cluster). The L2 entries of the
    /// new clusters are left for [`Qcow2::finish_write`], called once the data has landed;
    /// until then nothing on disk points at them (a power cut leaks them at most). `None`
    /// when a cluster needs [`Qcow2::write_at`]: part of a new cluster (its rest must be
    /// filled), a shared, compressed or preallocated cluster, an L2 table shared with a
    /// snapshot, a cluster past the device end, subclusters.
    pub fn map_write(&mut self, offset: u64, len: u64) -> Result<Option<MappedWrite>> {
        if self.hdr.incompatible_features & INCOMPAT_EXTENDED_L2 != 0 {
            return Ok(None);
        }
        check_request(offset, len, self.hdr.size)
            .map_err(|_| Qcow2Error::Invalid("write past the end of the virtual disk"))?;
        let Some(fresh) = self.fresh_clusters_in(offset, len)? else {
            return Ok(None);
        };
        if fresh == 0 {
            let runs = self.map_overwrite(offset, len)?;
            return Ok(runs.map(|runs| MappedWrite {
                runs,
                refs: NewRefs::default(),
            }));
        }
        self.start_change(offset, len, "write past the end of the virtual disk")?;
        let mut mapped = MappedWrite::default();
        if let Err(e) = self.map_write_runs(offset, len, &mut mapped) {
            // Nothing points at what was allocated: give it back.
            self.release_new_refs(&mapped.refs);
            return Err(e);
        }
        self.stats.data_bytes_written += len;
        Ok(Some(mapped))
    }

    /// How many guest clusters of the range a queued write would allocate, changing
    /// nothing; `None` when the write needs [`Qcow2::write_at`] (see [`Qcow2::map_write`]).
    fn fresh_clusters_in(&mut self, offset: u64, len: u64) -> Result<Option<u64>> {
        let cs = self.geo.cluster_size();
        let cap = self.dev.capacity();
        let mut fresh = 0;
        let mut done = 0u64;
        while done < len {
            let (vc, inoff, _) = self.geo.locate(offset + done);
            let n = (cs - inoff).min(len - done);
            let mapping = match self.l2_for_read(vc)? {
                None => Mapping::Unallocated,
                // A table shared with a snapshot is copied first: the engine's write.
                Some(_) if !matches!(self.l2_memo, Some((.., true))) => return Ok(None),
                Some(_) => self.mapping(vc)?,
            };
            match mapping {
                Mapping::Data { host, copied: true }
                    if (host + inoff).checked_add(n).is_some_and(|end| end <= cap) => {}
                Mapping::Unallocated | Mapping::Zero { host: None, .. } if n == cs => fresh += 1,
                _ => return Ok(None),
            }
            done += n;
        }
        Ok(Some(fresh))
    }

    /// [`Qcow2::map_write`]'s runs, allocating as it goes (what it allocated is in
    /// `mapped.refs` even when it fails).
    fn map_write_runs(&mut self, offset: u64, len: u64, mapped: &mut MappedWrite) -> Result<()> {
        let cs = self.geo.cluster_size();
        let l2e = self.geo.l2_entries();
        let mut done = 0u64;
        while done < len {
            let (vc, inoff, l2i) = self.geo.locate(offset + done);
            let n = (cs - inoff).min(len - done);
            if let Some(Mapping::Data { host, .. }) = match self.l2_for_read(vc)? {
                None => None,
                Some(_) => Some(self.mapping(vc)?),
            } {
                // Refused (and the image marked corrupt) over metadata, as the engine's
                // own write does.
                self.check_data_write(host, inoff + n)?;
                push_run(
                    &mut mapped.runs,
                    HostRun::Data {
                        host: host + inoff,
                        len: n,
                    },
                );
                done += n;
                continue;
            }
            // A run of whole new clusters in this L2 table.
            let s = self.l2_for_write(vc)?;
            let mut k = 1u64;
            while done + (k + 1) * cs <= len && l2i + k < l2e {
                let m = self.l2_mapping_at(s, (l2i + k) as usize)?;
                if !matches!(m, Mapping::Unallocated | Mapping::Zero { host: None, .. }) {
                    break;
                }
                k += 1;
            }
            let (hc, got) = self.alloc_run(k)?;
            let host = hc * cs;
            mapped.refs.0.push(NewRef {
                guest: vc * cs,
                host,
                len: got * cs,
            });
            self.check_data_write(host, got * cs)?;
            push_run(
                &mut mapped.runs,
                HostRun::Data {
                    host,
                    len: got * cs,
                },
            );
            done += got * cs;
        }
        Ok(())
    }

    /// The data of a write [`Qcow2::map_write`] allocated for finished with `result`: on
    /// success the new clusters' L2 entries are set (written back with the next metadata
    /// write-back, after a device flush, as every L2 change is); on failure the clusters
    /// are given back and a device error is reported as a full host filesystem, as
    /// [`Qcow2::write_at`] reports a failed write into new clusters.
    pub fn finish_write(&mut self, refs: &NewRefs, result: Result<()>) -> Result<()> {
        if let Err(e) = result {
            self.release_new_refs(refs);
            return Err(match e {
                Qcow2Error::Device(BlockError::Io) => Qcow2Error::NoSpace,
                other => other,
            });
        }
        let cs = self.geo.cluster_size();
        for (i, r) in refs.0.iter().enumerate() {
            let n = r.len / cs;
            for j in 0..n {
                let vc = r.guest / cs + j;
                let linked = self.mapping(vc).and_then(|old| {
                    self.set_l2_entry(
                        vc,
                        Mapping::Data {
                            host: r.host + j * cs,
                            copied: true,
                        },
                    )?;
                    self.release(old)
                });
                if let Err(e) = linked {
                    // The clusters not referenced yet go back.
                    let rest = NewRefs(
                        core::iter::once(NewRef {
                            guest: r.guest + j * cs,
                            host: r.host + j * cs,
                            len: (n - j) * cs,
                        })
                        .chain(refs.0[i + 1..].iter().copied())
                        .collect(),
                    );
                    self.tally(|t| t.data_clusters += j);
                    self.release_new_refs(&rest);
                    return Err(e);
                }
            }
            self.tally(|t| t.data_clusters += n);
        }
        Ok(())
    }

    /// Gives back clusters allocated for a queued write that nothing references.
    fn release_new_refs(&mut self, refs: &NewRefs) {
        let cs = self.geo.cluster_size();
        for r in &refs.0 {
            if let Err(e) = self.queue_free(r.host / cs, r.len / cs) {
                // The free is queued; only the write-back it triggered failed (retried later).
                log::warn!("qcow2: metadata write-back after a failed queued write: {e}");
            }
        }
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
    fn map_write(
        &mut self,
        offset: u64,
        len: u64,
    ) -> core::result::Result<Option<MappedWrite>, DiskError> {
        if VirtualDisk::is_read_only(self) {
            return Err(DiskError::ReadOnly);
        }
        Ok(Qcow2::map_write(self, offset, len)?)
    }
    fn finish_write(
        &mut self,
        refs: NewRefs,
        result: core::result::Result<(), DiskError>,
    ) -> core::result::Result<(), DiskError> {
        let result = result.map_err(|e| match e {
            DiskError::Device(b) => Qcow2Error::Device(b),
            DiskError::NoSpace => Qcow2Error::NoSpace,
            _ => Qcow2Error::Device(BlockError::Io),
        });
        Ok(Qcow2::finish_write(self, &refs, result)?)
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
