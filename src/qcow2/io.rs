//! Guest I/O: read and write at any byte offset and length, discard, write-zeroes and block
//! status, and the [`VirtualDisk`] implementation that serves them.
//!
//! Reads and writes go straight between the caller's buffer and the device, one device call
//! per run of guest clusters that are contiguous on the host. Partially written new clusters
//! are completed in the scratch cluster (copy-on-write of the untouched part).

use super::entry::{Mapping, subcluster_mask};
use super::error::{Qcow2Error, Result};
use super::{ClusterKind, Qcow2};
use crate::block::BlockDevice;
use crate::disk::{Allocation, DiskError, Extent, VirtualDisk, check_request};

/// Zeros to write from (write-zeroes of partial clusters).
static ZEROS: [u8; 4096] = [0; 4096];

/// How a write treats one guest cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    /// Allocated with refcount 1: overwrite in place.
    InPlace(u64),
    /// A preallocated zero cluster with refcount 1: reuse its host cluster.
    Reuse(u64),
    /// Needs a new cluster (unallocated, zero, shared or compressed).
    Fresh,
}

impl<D: BlockDevice> Qcow2<D> {
    /// Checks a data cluster run on the host before reading it: its clusters start on the
    /// device (bytes past the device end read as zeros), not over fixed metadata.
    pub(crate) fn check_data_host(&self, host: u64, len: u64) -> Result<()> {
        self.check_data_span(host, len)?;
        if self.overlaps_fixed(host, len) {
            return Err(Qcow2Error::Corrupt(
                "a data cluster overlaps the header, the L1 table or the refcount table",
            ));
        }
        Ok(())
    }

    /// Checks that a data cluster run starts on the device.
    fn check_data_span(&self, host: u64, len: u64) -> Result<()> {
        match host.checked_add(len) {
            Some(end) if end <= self.span_end() => Ok(()),
            _ => Err(Qcow2Error::Corrupt(
                "a data cluster lies past the device end",
            )),
        }
    }

    /// Checks a data cluster run on the host before writing it: on the device, and over no
    /// metadata at all ([`Qcow2Error::Overlap`] otherwise, the image then marked corrupt).
    pub(crate) fn check_data_write(&mut self, host: u64, len: u64) -> Result<()> {
        self.check_data_span(host, len)?;
        self.check_overlap(host, len, 0)
    }

    /// The mapping of guest cluster `vc`.
    pub fn mapping(&mut self, vc: u64) -> Result<Mapping> {
        match self.l2_for_read(vc)? {
            None => Ok(Mapping::Unallocated),
            Some((s, _)) => {
                let i = (vc & (self.geo.l2_entries() - 1)) as usize;
                self.l2_mapping_at(s, i)
            }
        }
    }

    /// Reads `dst` at guest offset `offset` of a cluster with subclusters `m` (extended L2
    /// entries): allocated subclusters from its host cluster, zero ones as zeros, the
    /// others as the backing layer reads them (zeros without one).
    pub(crate) fn read_subclusters(
        &mut self,
        m: Mapping,
        offset: u64,
        dst: &mut [u8],
    ) -> Result<()> {
        let sub = self.geo.subcluster_size();
        let base = offset & !(self.geo.cluster_size() - 1);
        let end = offset + dst.len() as u64;
        let mut pos = offset;
        while pos < end {
            let x = ((pos - base) / sub) as u32;
            let kind = m.subcluster_kind(x);
            // The run of subclusters of the same kind.
            let mut y = x + 1;
            while y < 32 && m.subcluster_kind(y) == kind && base + (y as u64) * sub < end {
                y += 1;
            }
            let stop = (base + y as u64 * sub).min(end);
            let part = &mut dst[(pos - offset) as usize..(stop - offset) as usize];
            match (kind, m.host_cluster()) {
                (ClusterKind::Data, Some(h)) => {
                    self.check_data_host(h, stop - base)?;
                    super::read_dev(&mut self.dev, h + (pos - base), part)?;
                    self.stats.data_bytes_read += stop - pos;
                }
                (ClusterKind::Unallocated, _) => self.read_unallocated(pos, part)?,
                _ => part.fill(0),
            }
            pos = stop;
        }
        Ok(())
    }

    /// Fills `part` (a subcluster's bytes, or part of one, at guest offset `at`) with what
    /// it reads as while it holds no data: zeros if its zero bit is set in `m`, else what
    /// the backing layer holds there.
    fn read_unallocated_part(&mut self, m: Mapping, at: u64, part: &mut [u8]) -> Result<()> {
        let x = ((at & (self.geo.cluster_size() - 1)) / self.geo.subcluster_size()) as u32;
        if m.subcluster_kind(x) == ClusterKind::Zero {
            part.fill(0);
            Ok(())
        } else {
            self.read_unallocated(at, part)
        }
    }

    /// Reads `buf.len()` bytes at guest offset `offset`.
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_request(offset, buf.len() as u64, self.hdr.size)
            .map_err(|_| Qcow2Error::Invalid("read past the end of the virtual disk"))?;
        let cs = self.geo.cluster_size();
        let l2e = self.geo.l2_entries();
        let len = buf.len() as u64;
        let mut done = 0u64;
        while done < len {
            let (vc, inoff, l2i) = self.geo.locate(offset + done);
            let want = len - done;
            let Some((s, _)) = self.l2_for_read(vc)? else {
                let n = want.min((l2e - l2i) * cs - inoff);
                self.read_unallocated(offset + done, &mut buf[done as usize..(done + n) as usize])?;
                done += n;
                continue;
            };
            let data = self.l2c.data(s);
            let first = Mapping::from_table(data, l2i as usize, &self.geo, self.hdr.version)?;
            // With a backing layer, unallocated clusters read from it, zero clusters as zeros.
            let backed = self.backing.is_some();
            let mut run = (cs - inoff).min(want);
            let mut i = l2i + 1;
            while run < want && i < l2e {
                let m = Mapping::from_table(data, i as usize, &self.geo, self.hdr.version)?;
                let same = match (first, m) {
                    (Mapping::Data { host: a, .. }, Mapping::Data { host: b, .. }) => {
                        b == a + (i - l2i) * cs
                    }
                    (Mapping::Zero { .. }, Mapping::Zero { .. })
                    | (Mapping::Unallocated, Mapping::Unallocated) => true,
                    (
                        Mapping::Zero { .. } | Mapping::Unallocated,
                        Mapping::Zero { .. } | Mapping::Unallocated,
                    ) => !backed,
                    _ => false,
                };
                if !same {
                    break;
                }
                run += cs.min(want - run);
                i += 1;
            }
            let dst = &mut buf[done as usize..(done + run) as usize];
            match first {
                Mapping::Data { host, .. } => {
                    self.check_data_host(host, inoff + run)?;
                    super::read_dev(&mut self.dev, host + inoff, dst)?;
                    self.stats.data_bytes_read += run;
                }
                Mapping::Compressed { host, len } => {
                    self.inflate_into_scratch(host, len)?;
                    dst.copy_from_slice(&self.scratch[inoff as usize..(inoff + run) as usize]);
                    self.stats.data_bytes_read += run;
                }
                Mapping::Unallocated => self.read_unallocated(offset + done, dst)?,
                Mapping::Subclusters { .. } => {
                    self.read_subclusters(first, offset + done, dst)?;
                }
                _ => dst.fill(0),
            }
            done += run;
        }
        Ok(())
    }

    /// How a write treats a cluster with mapping `m` (may set a missing COPIED flag).
    fn plan(&mut self, m: Mapping, vc: u64) -> Result<Plan> {
        let cs = self.geo.cluster_size();
        Ok(match m {
            Mapping::Data { host, copied: true } => Plan::InPlace(host),
            Mapping::Data {
                host,
                copied: false,
            } => match self.refcount(host / cs)? {
                0 => return Err(Qcow2Error::Corrupt("a data cluster in use has refcount 0")),
                1 => {
                    self.set_l2_entry(vc, Mapping::Data { host, copied: true })?;
                    Plan::InPlace(host)
                }
                _ => Plan::Fresh,
            },
            Mapping::Zero {
                host: Some(host),
                copied,
            } => {
                if copied || self.refcount(host / cs)? == 1 {
                    Plan::Reuse(host)
                } else {
                    Plan::Fresh
                }
            }
            _ => Plan::Fresh,
        })
    }

    /// Sets the L2 entry of guest cluster `vc` (its table is made writable).
    pub(crate) fn set_l2_entry(&mut self, vc: u64, m: Mapping) -> Result<()> {
        let s = self.l2_for_write(vc)?;
        let i = (vc & (self.geo.l2_entries() - 1)) as usize;
        self.put_l2(s, i, m);
        Ok(())
    }

    /// Drops the reference a mapping holds (deferred until its replacement is on disk).
    pub(crate) fn release(&mut self, m: Mapping) -> Result<()> {
        let cs = self.geo.cluster_size();
        match m {
            Mapping::Data { .. }
            | Mapping::Zero { host: Some(_), .. }
            | Mapping::Subclusters { host: Some(_), .. } => {
                self.tally(|t| t.data_clusters = t.data_clusters.saturating_sub(1))
            }
            Mapping::Compressed { len, .. } => {
                self.tally(|t| t.compressed_bytes = t.compressed_bytes.saturating_sub(len))
            }
            _ => {}
        }
        match m {
            Mapping::Data { host, .. }
            | Mapping::Zero {
                host: Some(host), ..
            }
            | Mapping::Subclusters {
                host: Some(host), ..
            } => self.queue_free(host / cs, 1),
            Mapping::Compressed { host, len } => {
                let n = self.compressed_owned_clusters(host, len);
                self.queue_free(host / cs, n)
            }
            _ => Ok(()),
        }
    }

    /// How many host clusters, from the one at `host` on, the compressed cluster at `host`
    /// (at most `len` bytes) holds data in: the clusters its descriptor reaches into, but
    /// only as far as its deflate stream really goes. A corrupt descriptor whose length
    /// runs into a neighbour (a data cluster, another table) must not free the neighbour:
    /// its refcount drop would let the allocator hand out live data. When the stream cannot
    /// be inflated, only the first cluster is freed (the rest leaks: safe, and check
    /// reports it). Clobbers the scratch cluster.
    fn compressed_owned_clusters(&mut self, host: u64, len: u64) -> u64 {
        let cs = self.geo.cluster_size();
        let first = host / cs;
        let last = (host + len - 1) / cs;
        if last == first {
            return 1;
        }
        match self.inflate_into_scratch(host, len) {
            Ok(used) => {
                let end = host + (used as u64).max(1);
                ((end - 1) / cs).clamp(first, last) - first + 1
            }
            Err(e) => {
                log::warn!(
                    "qcow2: compressed cluster at {host:#x} does not inflate ({e}); freeing \
                     only its first host cluster"
                );
                1
            }
        }
    }

    /// Inflates the compressed cluster at `host` (at most `len` bytes) into the scratch
    /// cluster; returns how many compressed bytes the stream used.
    pub(crate) fn inflate_into_scratch(&mut self, host: u64, len: u64) -> Result<usize> {
        let kind = self.hdr.compression_type()?;
        let cs = self.geo.cluster_size();
        if host < cs || host >= self.dev.capacity() {
            return Err(Qcow2Error::Corrupt(
                "a compressed cluster lies in the header or past the device end",
            ));
        }
        // The last sectors may run past the device end; QEMU clamps them too.
        let len = len.min(self.dev.capacity() - host).min(2 * cs) as usize;
        let input = self.inflater.input_buf(len);
        super::read_dev(&mut self.dev, host, input)?;
        self.inflater.inflate(kind, len, &mut self.scratch)
    }

    /// Fills the scratch cluster with what guest cluster `vc`, mapped as `m`, reads as.
    fn fill_scratch_from(&mut self, m: Mapping, vc: u64) -> Result<()> {
        match m {
            Mapping::Data { host, .. } => {
                let cs = self.geo.cluster_size();
                self.check_data_host(host, cs)?;
                super::read_dev(&mut self.dev, host, &mut self.scratch)?;
                Ok(())
            }
            Mapping::Compressed { host, len } => self.inflate_into_scratch(host, len).map(drop),
            Mapping::Subclusters { host, alloc, .. } => {
                // Allocated subclusters from the host cluster, the rest as they read.
                let cs = self.geo.cluster_size();
                if let Some(host) = host {
                    self.check_data_host(host, cs)?;
                    super::read_dev(&mut self.dev, host, &mut self.scratch)?;
                }
                let full = m;
                let sub = self.geo.subcluster_size();
                let mut scratch = core::mem::take(&mut self.scratch);
                let mut r = Ok(());
                for (x, part) in scratch.chunks_mut(sub as usize).enumerate() {
                    if alloc >> x & 1 == 0 {
                        let at = vc * cs + x as u64 * sub;
                        r = r.and_then(|()| self.read_unallocated_part(full, at, part));
                    }
                }
                self.scratch = scratch;
                r
            }
            Mapping::Unallocated if self.has_backing() => {
                // Copy-on-write from the backing layer (only the bytes inside this disk).
                let off = vc * self.geo.cluster_size();
                let inside = self
                    .hdr
                    .size
                    .saturating_sub(off)
                    .min(self.scratch.len() as u64);
                let mut scratch = core::mem::take(&mut self.scratch);
                let (head, tail) = scratch.split_at_mut(inside as usize);
                let r = self.read_unallocated(off, head);
                tail.fill(0);
                self.scratch = scratch;
                r
            }
            _ => {
                self.scratch.fill(0);
                Ok(())
            }
        }
    }

    /// Validates a request that changes the disk and starts the write session. `false`:
    /// nothing to do (an empty request on a writable image); an empty request on a read-only
    /// image is still refused, and one past the virtual end is `past_end`.
    pub(crate) fn start_change(
        &mut self,
        offset: u64,
        len: u64,
        past_end: &'static str,
    ) -> Result<bool> {
        check_request(offset, len, self.hdr.size).map_err(|_| Qcow2Error::Invalid(past_end))?;
        if len == 0 {
            return if self.read_only {
                Err(Qcow2Error::ReadOnly)
            } else {
                Ok(false)
            };
        }
        self.begin_write()?;
        self.begin_bitmap_session()?;
        self.mark_dirty(offset, len);
        Ok(true)
    }

    /// Writes `buf` at guest offset `offset`.
    pub fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<()> {
        if !self.start_change(
            offset,
            buf.len() as u64,
            "write past the end of the virtual disk",
        )? {
            return Ok(());
        }
        let cs = self.geo.cluster_size();
        let l2e = self.geo.l2_entries();
        let len = buf.len() as u64;
        let mut done = 0u64;
        while done < len {
            let (vc, inoff, l2i) = self.geo.locate(offset + done);
            let want = len - done;
            let s = self.l2_for_write(vc)?;
            let m0 = self.l2_mapping_at(s, l2i as usize)?;
            if self.geo.extended_l2 {
                let n = (cs - inoff).min(want);
                let whole = n == cs;
                let per_subcluster = match m0 {
                    Mapping::Subclusters { .. } => true,
                    Mapping::Unallocated | Mapping::Zero { .. } => !whole,
                    _ => false,
                };
                if per_subcluster {
                    self.write_subclusters(
                        vc,
                        inoff,
                        &buf[done as usize..(done + n) as usize],
                        m0,
                    )?;
                    done += n;
                    continue;
                }
            }
            match self.plan(m0, vc)? {
                Plan::InPlace(host) => {
                    let s = self.l2_for_write(vc)?;
                    let data = self.l2c.data(s);
                    let mut run = (cs - inoff).min(want);
                    let mut i = l2i + 1;
                    while run < want && i < l2e {
                        let m = Mapping::from_table(data, i as usize, &self.geo, self.hdr.version)?;
                        match m {
                            Mapping::Data {
                                host: h,
                                copied: true,
                            } if h == host + (i - l2i) * cs => {}
                            _ => break,
                        }
                        run += cs.min(want - run);
                        i += 1;
                    }
                    self.check_data_write(host, inoff + run)?;
                    super::write_dev(
                        &mut self.dev,
                        host + inoff,
                        &buf[done as usize..(done + run) as usize],
                    )?;
                    self.stats.data_bytes_written += run;
                    done += run;
                }
                Plan::Reuse(host) => {
                    let n = (cs - inoff).min(want);
                    self.check_data_write(host, cs)?;
                    let src = &buf[done as usize..(done + n) as usize];
                    if n == cs {
                        super::write_dev(&mut self.dev, host, src)?;
                    } else {
                        self.scratch.fill(0);
                        self.scratch[inoff as usize..(inoff + n) as usize].copy_from_slice(src);
                        super::write_dev(&mut self.dev, host, &self.scratch)?;
                        self.stats.cow_bytes += cs - n;
                    }
                    self.stats.data_bytes_written += n;
                    self.set_l2_entry(vc, Mapping::Data { host, copied: true })?;
                    done += n;
                }
                Plan::Fresh => {
                    // How many following clusters also need a new cluster (and read as zeros).
                    let s = self.l2_for_write(vc)?;
                    let data = self.l2c.data(s);
                    let mut k = 1u64;
                    let mut last_old = m0;
                    let mut span = cs - inoff;
                    let mut i = l2i + 1;
                    while span < want && i < l2e {
                        let m = Mapping::from_table(data, i as usize, &self.geo, self.hdr.version)?;
                        if !matches!(m, Mapping::Unallocated | Mapping::Zero { host: None, .. }) {
                            break;
                        }
                        last_old = m;
                        span += cs;
                        k += 1;
                        i += 1;
                    }
                    let (hc, got) = self.alloc_run(k)?;
                    let zeroed = self.last_alloc_zeroed;
                    let host = hc * cs;
                    let n = (got * cs - inoff).min(want);
                    self.check_data_write(host, got * cs)?;
                    let src = &buf[done as usize..(done + n) as usize];
                    // Partial clusters copy the rest from below when they fall through.
                    let from_backing = self.has_backing()
                        && (m0 == Mapping::Unallocated || last_old == Mapping::Unallocated);
                    let written = if zeroed
                        && !from_backing
                        && matches!(m0, Mapping::Unallocated | Mapping::Zero { .. })
                    {
                        // New clusters that already read as zeros: just the data.
                        super::write_dev(&mut self.dev, host + inoff, src)
                    } else {
                        self.write_new_clusters(host, inoff, src, vc, m0, last_old)
                    };
                    if let Err(e) = written {
                        // Nothing points at the new clusters yet (see `faults`).
                        return Err(self.fresh_write_failed(hc, got, e));
                    }
                    // Data is on its way; now point the L2 entries at it.
                    let s = self.l2_for_write(vc)?;
                    for j in 0..got {
                        let idx = (l2i + j) as usize;
                        let old = self.l2_mapping_at(s, idx)?;
                        self.put_l2(
                            s,
                            idx,
                            Mapping::Data {
                                host: host + j * cs,
                                copied: true,
                            },
                        );
                        if j == 0 {
                            self.release(old)?;
                        }
                    }
                    self.tally(|t| t.data_clusters += got);
                    self.stats.data_bytes_written += n;
                    done += n;
                }
            }
        }
        Ok(())
    }

    /// Extended L2 entries: writes `src` at `inoff` into guest cluster `vc` (mapping `m`,
    /// not compressed), allocating only the subclusters it touches. A partly written
    /// subcluster that held no data is completed with what it read as (zeros, or the
    /// backing layer's bytes); the other
    /// subclusters keep their state. The host cluster is reused when it is ours alone; a
    /// shared one (snapshots) is copied first.
    fn write_subclusters(&mut self, vc: u64, inoff: u64, src: &[u8], m: Mapping) -> Result<()> {
        let cs = self.geo.cluster_size();
        let sub = self.geo.subcluster_size();
        let n = src.len() as u64;
        let (alloc, zero) = m.bitmaps();
        let first = (inoff / sub) as u32;
        let end = (inoff + n).div_ceil(sub) as u32;
        let touched = subcluster_mask(first, end);
        let own = match m.host_cluster() {
            Some(h) if m.copied() => Some(h),
            Some(h) if self.refcount(h / cs)? == 1 => Some(h),
            _ => None,
        };
        let (host, fresh) = match own {
            Some(h) => (h, None),
            None => {
                let (hc, _) = self.alloc_run(1)?;
                (hc * cs, Some(hc))
            }
        };
        self.check_data_write(host, cs)?;
        let written = if fresh.is_some() && alloc != 0 {
            // A shared cluster: copy what it holds, then the new data over it.
            self.fill_scratch_from(m, vc).and_then(|()| {
                self.scratch[inoff as usize..(inoff + n) as usize].copy_from_slice(src);
                self.stats.cow_bytes += cs - n;
                super::write_dev(&mut self.dev, host, &self.scratch)
            })
        } else {
            // Edge subclusters without data are completed with what they read as.
            let has_data = |x: u32| fresh.is_none() && alloc >> x & 1 != 0;
            let lo = if has_data(first) {
                inoff
            } else {
                first as u64 * sub
            };
            let hi = if has_data(end - 1) {
                inoff + n
            } else {
                end as u64 * sub
            };
            if lo == inoff && hi == inoff + n {
                super::write_dev(&mut self.dev, host + inoff, src)
            } else {
                let base = vc * cs;
                let mut scratch = core::mem::take(&mut self.scratch);
                let mut r = Ok(());
                if lo < inoff {
                    r = self.read_unallocated_part(
                        m,
                        base + lo,
                        &mut scratch[lo as usize..inoff as usize],
                    );
                }
                if hi > inoff + n {
                    let (a, b) = ((inoff + n) as usize, hi as usize);
                    r = r.and_then(|()| {
                        self.read_unallocated_part(m, base + a as u64, &mut scratch[a..b])
                    });
                }
                scratch[inoff as usize..(inoff + n) as usize].copy_from_slice(src);
                self.scratch = scratch;
                self.stats.cow_bytes += (hi - lo) - n;
                r.and_then(|()| {
                    super::write_dev(
                        &mut self.dev,
                        host + lo,
                        &self.scratch[lo as usize..hi as usize],
                    )
                })
            }
        };
        if let Err(e) = written {
            return Err(match fresh {
                // Nothing points at the new cluster yet (see `faults`).
                Some(hc) => self.fresh_write_failed(hc, 1, e),
                None => e,
            });
        }
        let new = Mapping::normalise(Some(host), true, alloc | touched, zero & !touched);
        self.set_l2_entry(vc, new)?;
        if fresh.is_some() {
            self.release(m)?;
            self.tally(|t| t.data_clusters += 1);
        }
        self.stats.data_bytes_written += n;
        Ok(())
    }

    /// Extended L2 entries: makes `len` bytes at `offset` (inside one guest cluster, not
    /// compressed) read as zeros. Whole subclusters get their zero bit (their data, if any,
    /// is dropped from the allocation bitmap; the host cluster stays); partial ones that
    /// hold data (or show the backing layer) are written with zeros.
    fn zero_subclusters(&mut self, offset: u64, len: u64, m: Mapping) -> Result<()> {
        let cs = self.geo.cluster_size();
        let sub = self.geo.subcluster_size();
        let vc = offset / cs;
        let a = offset & (cs - 1);
        let b = a + len;
        let first = a.div_ceil(sub);
        // The disk's last subcluster counts as whole when the range reaches the disk's end.
        let end = if offset + len == self.hdr.size {
            b.div_ceil(sub)
        } else {
            b / sub
        };
        let (alloc, zero) = m.bitmaps();
        let full = subcluster_mask(first as u32, end as u32);
        if full != 0 && (alloc & full != 0 || zero & full != full) {
            let new = Mapping::normalise(m.host_cluster(), m.copied(), alloc & !full, zero | full);
            self.set_l2_entry(vc, new)?;
        }
        let head = (a, (first * sub).min(b));
        let edges = [head, ((end * sub).max(head.1), b)];
        let backed = self.has_backing();
        for (lo, hi) in edges {
            if lo >= hi {
                continue;
            }
            let x = lo / sub;
            let reads_zeros = zero >> x & 1 != 0 || !backed;
            if alloc >> x & 1 == 0 && reads_zeros {
                continue; // nothing, or a subcluster that reads as zeros already
            }
            let base = vc * cs;
            let mut z = lo;
            while z < hi {
                let k = (hi - z).min(ZEROS.len() as u64);
                self.write_at(base + z, &ZEROS[..k as usize])?;
                z += k;
            }
        }
        Ok(())
    }

    /// Writes `src` at `inoff` into newly allocated clusters starting at `host` (for guest
    /// clusters from `vc` on), completing partial first and last clusters from what they
    /// read as before (mapped as `first_old` and `last_old`).
    fn write_new_clusters(
        &mut self,
        host: u64,
        inoff: u64,
        src: &[u8],
        vc: u64,
        first_old: Mapping,
        last_old: Mapping,
    ) -> Result<()> {
        let cs = self.geo.cluster_size();
        let n = src.len() as u64;
        let end = inoff + n; // relative to host
        let clusters = end.div_ceil(cs);
        let head_partial = inoff != 0 || end < cs;
        let tail_partial = clusters > 1 && !end.is_multiple_of(cs);
        let mut pos = 0u64; // bytes of src consumed
        if head_partial {
            self.fill_scratch_from(first_old, vc)?;
            let take = (cs - inoff).min(n);
            self.scratch[inoff as usize..(inoff + take) as usize]
                .copy_from_slice(&src[..take as usize]);
            super::write_dev(&mut self.dev, host, &self.scratch)?;
            self.stats.cow_bytes += cs - take;
            pos = take;
        }
        let full_start = if head_partial { 1 } else { 0 };
        let full_end = if tail_partial { clusters - 1 } else { clusters };
        if full_end > full_start {
            let bytes = (full_end - full_start) * cs;
            super::write_dev(
                &mut self.dev,
                host + full_start * cs,
                &src[pos as usize..(pos + bytes) as usize],
            )?;
            pos += bytes;
        }
        if tail_partial && clusters > full_start.max(1) {
            let take = n - pos;
            self.fill_scratch_from(last_old, vc + clusters - 1)?;
            self.scratch[..take as usize].copy_from_slice(&src[pos as usize..]);
            super::write_dev(&mut self.dev, host + (clusters - 1) * cs, &self.scratch)?;
            self.stats.cow_bytes += cs - take;
        }
        Ok(())
    }

    /// Discards whole clusters inside the range: they become unallocated (read as zeros)
    /// and their host clusters are freed. Partial clusters at the edges are left alone.
    /// Over a backing layer they become zero clusters instead (so the layer does not show
    /// through); a version 2 image, which has none, keeps its data (a discard is a hint).
    pub fn discard_range(&mut self, offset: u64, len: u64) -> Result<()> {
        if !self.start_change(offset, len, "discard past the end of the virtual disk")? {
            return Ok(());
        }
        if !self.has_backing() {
            self.unmap_clusters(offset, len, UnmapTo::Unallocated)
        } else if self.hdr.version >= 3 {
            self.unmap_clusters(offset, len, UnmapTo::Zero)
        } else {
            Ok(())
        }
    }

    /// Rewrites the L2 entries of the whole clusters inside the range.
    fn unmap_clusters(&mut self, offset: u64, len: u64, to: UnmapTo) -> Result<()> {
        let cs = self.geo.cluster_size();
        let first = offset.div_ceil(cs);
        let end = if offset + len == self.hdr.size {
            (offset + len).div_ceil(cs)
        } else {
            (offset + len) / cs
        };
        let l2e = self.geo.l2_entries();
        let mut vc = first;
        while vc < end {
            let l1i = vc >> self.geo.l2_bits;
            let table_end = ((l1i + 1) << self.geo.l2_bits).min(end);
            if (to == UnmapTo::Unallocated || !self.has_backing())
                && self.l2_for_read(vc)?.is_none()
            {
                // No table: the whole range is unallocated and reads as zeros already.
                vc = table_end;
                continue;
            }
            let s = self.l2_for_write(vc)?;
            for c in vc..table_end {
                let i = (c & (l2e - 1)) as usize;
                let old = self.l2_mapping_at(s, i)?;
                let zero = Mapping::Zero {
                    host: None,
                    copied: false,
                };
                let new = match (to, old) {
                    (UnmapTo::Unallocated, _) => Mapping::Unallocated,
                    (UnmapTo::Zero, _) => zero,
                    (UnmapTo::ZeroKeep, Mapping::Compressed { .. }) => zero,
                    (UnmapTo::ZeroKeep, m) if m.copied() && m.host_cluster().is_some() => {
                        Mapping::Zero {
                            host: m.host_cluster(),
                            copied: true,
                        }
                    }
                    (UnmapTo::ZeroKeep, _) => zero,
                };
                self.put_l2(s, i, new);
                if new.host_cluster().is_none() {
                    self.release(old)?;
                }
            }
            vc = table_end;
        }
        Ok(())
    }

    /// Makes `len` bytes at `offset` read as zeros.
    pub fn zero_range(&mut self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        if !self.start_change(offset, len, "write-zeroes past the end of the virtual disk")? {
            return Ok(());
        }
        let cs = self.geo.cluster_size();
        let end = offset + len;
        let first_full = offset.div_ceil(cs) * cs;
        let last_full = if end == self.hdr.size {
            end.div_ceil(cs) * cs
        } else {
            end / cs * cs
        };
        if first_full >= last_full {
            return self.zero_partial(offset, len);
        }
        self.zero_partial(offset, first_full - offset)?;
        if last_full < end {
            self.zero_partial(last_full, end - last_full)?;
        }
        let whole_end = last_full.min(self.hdr.size);
        if self.hdr.version >= 3 {
            let to = if may_unmap {
                UnmapTo::Zero
            } else {
                UnmapTo::ZeroKeep
            };
            self.unmap_clusters(first_full, whole_end - first_full, to)
        } else if may_unmap && !self.has_backing() {
            self.unmap_clusters(first_full, whole_end - first_full, UnmapTo::Unallocated)
        } else {
            self.zero_partial(first_full, whole_end - first_full)
        }
    }

    /// Zeroes a range by writing zeros, skipping clusters that already read as zeros.
    fn zero_partial(&mut self, offset: u64, len: u64) -> Result<()> {
        let backing_size = self.backing.as_ref().map_or(0, |b| b.size());
        let cs = self.geo.cluster_size();
        let mut done = 0;
        while done < len {
            let pos = offset + done;
            let n = (cs - (pos & (cs - 1))).min(len - done);
            let m = self.mapping(pos / cs)?;
            if self.geo.extended_l2 && !matches!(m, Mapping::Compressed { .. }) {
                self.zero_subclusters(pos, n, m)?;
                done += n;
                continue;
            }
            match m {
                Mapping::Unallocated if pos < backing_size => self.write_zeros(pos, n)?,
                Mapping::Unallocated | Mapping::Zero { .. } => {}
                Mapping::Data { host, copied: true } => {
                    // Ours alone: zero it in place.
                    self.check_data_write(host, cs)?;
                    self.dev.write_zeroes(host + (pos & (cs - 1)), n)?;
                    self.stats.data_bytes_written += n;
                }
                _ => self.write_zeros(pos, n)?,
            }
            done += n;
        }
        Ok(())
    }

    /// Writes `len` zero bytes at guest offset `offset` (a buffer at a time).
    fn write_zeros(&mut self, offset: u64, len: u64) -> Result<()> {
        let mut z = 0;
        while z < len {
            let k = (len - z).min(ZEROS.len() as u64);
            self.write_at(offset + z, &ZEROS[..k as usize])?;
            z += k;
        }
        Ok(())
    }

    /// The allocation of the run starting at `offset`, at most `len` bytes long.
    pub fn status(&mut self, offset: u64, len: u64) -> Result<(ClusterKind, u64)> {
        check_request(offset, len, self.hdr.size)
            .map_err(|_| Qcow2Error::Invalid("block status past the end of the virtual disk"))?;
        let cs = self.geo.cluster_size();
        let l2e = self.geo.l2_entries();
        let mut kind = None;
        let mut done = 0u64;
        while done < len {
            let (vc, inoff, l2i) = self.geo.locate(offset + done);
            let (k, n) = match self.l2_for_read(vc)? {
                None => (ClusterKind::Unallocated, (l2e - l2i) * cs - inoff),
                Some((s, _)) => {
                    let (k0, mut n) = self.status_piece(s, l2i as usize, inoff)?;
                    let mut i = l2i + 1;
                    while n == (i - l2i) * cs - inoff && i < l2e && done + n < len {
                        let (k, m) = self.status_piece(s, i as usize, 0)?;
                        if k != k0 {
                            break;
                        }
                        n += m;
                        i += 1;
                    }
                    (k0, n)
                }
            };
            let (k, n) = if k == ClusterKind::Unallocated && self.has_backing() {
                // Falls through: what the chain below holds there.
                self.unallocated_status(offset + done, n.min(len - done))?
            } else {
                (k, n)
            };
            match kind {
                None => kind = Some(k),
                Some(k0) if k0 != k => break,
                _ => {}
            }
            done += n;
        }
        Ok((kind.unwrap_or(ClusterKind::Unallocated), done.min(len)))
    }
}

impl<D: BlockDevice> Qcow2<D> {
    /// The kind of the cluster at L2 entry `i` of the table in slot `s` at `inoff`, and how
    /// many bytes from there to the end of the cluster (or, with subclusters, to the first
    /// subcluster of another kind) share it.
    fn status_piece(&self, s: usize, i: usize, inoff: u64) -> Result<(ClusterKind, u64)> {
        let m = self.l2_mapping_at(s, i)?;
        let cs = self.geo.cluster_size();
        if !matches!(m, Mapping::Subclusters { .. }) {
            return Ok((m.kind(), cs - inoff));
        }
        let sub = self.geo.subcluster_size();
        let x = (inoff / sub) as u32;
        let k = m.subcluster_kind(x);
        let mut y = x + 1;
        while y < 32 && m.subcluster_kind(y) == k {
            y += 1;
        }
        Ok((k, y as u64 * sub - inoff))
    }
}

/// What [`Qcow2::unmap_clusters`] turns whole clusters into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UnmapTo {
    /// Unallocated (reads as zeros without a backing file).
    Unallocated,
    /// Zero flag, host cluster freed.
    Zero,
    /// Zero flag, host cluster kept where it is ours alone.
    ZeroKeep,
}

impl<D: BlockDevice> VirtualDisk for Qcow2<D> {
    fn size(&self) -> u64 {
        match self.view {
            Some(v) => self.views[v].size(),
            None => self.hdr.size,
        }
    }

    fn is_read_only(&self) -> bool {
        self.read_only || self.view.is_some()
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> core::result::Result<(), DiskError> {
        if let Some(v) = self.view {
            let view = core::mem::take(&mut self.views[v]);
            let r = self.read_snapshot(&view, offset, buf);
            self.views[v] = view;
            return Ok(r?);
        }
        check_request(offset, buf.len() as u64, self.hdr.size)?;
        let r = self.read_at(offset, buf);
        Ok(self.note_corrupt(r)?)
    }

    fn write(&mut self, offset: u64, buf: &[u8]) -> core::result::Result<(), DiskError> {
        if self.view.is_some() {
            return Err(DiskError::ReadOnly);
        }
        check_request(offset, buf.len() as u64, self.hdr.size)?;
        let r = self.write_at(offset, buf);
        Ok(self.note_corrupt(r)?)
    }

    fn flush(&mut self) -> core::result::Result<(), DiskError> {
        if self.read_only || self.view.is_some() {
            return Ok(());
        }
        // Guest data and metadata durable: one device flush unless the write-back ended
        // with one.
        // A failed flush is EIO, never ENOSPC (see `faults`).
        let r = self.write_back().map_err(super::faults::flush_error);
        if !self.note_corrupt(r)? {
            self.barrier()?;
        }
        Ok(())
    }

    fn discard(&mut self, offset: u64, len: u64) -> core::result::Result<(), DiskError> {
        if self.view.is_some() {
            return Err(DiskError::ReadOnly);
        }
        check_request(offset, len, self.hdr.size)?;
        let r = self.discard_range(offset, len);
        Ok(self.note_corrupt(r)?)
    }

    fn write_zeroes(
        &mut self,
        offset: u64,
        len: u64,
        may_unmap: bool,
    ) -> core::result::Result<(), DiskError> {
        if self.view.is_some() {
            return Err(DiskError::ReadOnly);
        }
        check_request(offset, len, self.hdr.size)?;
        let r = self.zero_range(offset, len, may_unmap);
        Ok(self.note_corrupt(r)?)
    }

    fn block_status(&mut self, offset: u64, len: u64) -> core::result::Result<Extent, DiskError> {
        if let Some(v) = self.view {
            let view = core::mem::take(&mut self.views[v]);
            let r = self.snapshot_status(&view, offset, len);
            self.views[v] = view;
            return Ok(r?);
        }
        check_request(offset, len, self.hdr.size)?;
        if len == 0 {
            return Ok(Extent {
                len: 0,
                kind: Allocation::Hole,
            });
        }
        let r = self.status(offset, len);
        let (k, n) = self.note_corrupt(r)?;
        let kind = match k {
            ClusterKind::Data | ClusterKind::Compressed => Allocation::Data,
            ClusterKind::Zero => Allocation::Zero,
            _ => Allocation::Hole,
        };
        Ok(Extent { len: n, kind })
    }

    fn views(&mut self) -> alloc::vec::Vec<alloc::string::String> {
        self.snapshots()
            .map(|l| l.into_iter().map(|s| s.name).collect())
            .unwrap_or_default()
    }

    fn select_view(&mut self, name: Option<&str>) -> core::result::Result<(), DiskError> {
        let Some(name) = name else {
            self.view = None;
            return Ok(());
        };
        if let Some(i) = self.views.iter().position(|v| v.snapshot.name == name) {
            self.view = Some(i);
            return Ok(());
        }
        match self.snapshot_view(name)? {
            Some(v) => {
                self.views.push(v);
                self.view = Some(self.views.len() - 1);
                Ok(())
            }
            None => Err(DiskError::Invalid),
        }
    }

    fn dirty_bitmaps(&mut self) -> alloc::vec::Vec<alloc::string::String> {
        self.bitmaps()
            .into_iter()
            .filter(|b| b.readable)
            .map(|b| b.name)
            .collect()
    }

    fn dirty_status(
        &mut self,
        name: &str,
        offset: u64,
        len: u64,
    ) -> core::result::Result<(bool, u64), DiskError> {
        check_request(offset, len, self.hdr.size)?;
        self.bitmap_status(name, offset, len)
            .ok_or(DiskError::Invalid)
    }
}
