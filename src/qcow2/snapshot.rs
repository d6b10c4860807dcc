//! Internal snapshots: the snapshot table (read and written as QEMU writes it, extra data
//! included), creating, applying and deleting snapshots, and read-only views of one.
//!
//! A snapshot is a copy of the active L1 table; every L2 table and data cluster it reaches
//! gets one more reference, so the active state copies them on its next write (COPIED
//! clear). Reference counting follows QEMU: each L1 table (active or snapshot) adds one
//! reference to each L2 table it points to and one to each data cluster in those tables,
//! even when an L2 table is shared.
//!
//! Crash safety: new refcounts, the L1 copy and the new snapshot table are durable before
//! the header points to the new table; references are dropped (deferred frees) only after
//! the header no longer reaches them. A crash leaves at worst leaked clusters.

use super::cache::{TableKind, get_u64};
use super::entry::{COPIED, Mapping, decode_l1};
use super::error::{Qcow2Error, Result};
use super::layout::MAX_L1_BYTES;
use super::{Pool, Qcow2};
use crate::block::BlockDevice;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

/// Most snapshots an image may have (QEMU's limit).
pub const MAX_SNAPSHOTS: usize = 65536;
/// Largest snapshot table (QEMU's limit).
const MAX_TABLE_BYTES: u64 = 64 << 20;
/// Extra data QEMU writes per entry: VM state size (64-bit), disk size, icount.
const EXTRA_LEN: usize = 24;

/// One internal snapshot, as its snapshot-table entry describes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Unique ID (QEMU numbers them "1", "2", ...).
    pub id: String,
    /// Name (tag).
    pub name: String,
    /// Host offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Entries in the snapshot's L1 table.
    pub l1_size: u32,
    /// Creation time, seconds since the epoch.
    pub date_sec: u32,
    /// Creation time, nanoseconds part.
    pub date_nsec: u32,
    /// Guest clock when taken, nanoseconds.
    pub vm_clock_nsec: u64,
    /// Bytes of saved VM state (0 for disk-only snapshots).
    pub vm_state_size: u64,
    /// Virtual disk size when taken.
    pub disk_size: u64,
    /// Instruction count when taken (`None`: not recorded, -1 on disk).
    pub icount: Option<u64>,
    /// Extra data past the fields this engine knows, kept verbatim.
    extra_unknown: Vec<u8>,
}

impl Snapshot {
    /// The entry in on-disk form (padded to 8 bytes).
    fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        out.extend_from_slice(&self.l1_size.to_be_bytes());
        out.extend_from_slice(&(self.id.len() as u16).to_be_bytes());
        out.extend_from_slice(&(self.name.len() as u16).to_be_bytes());
        out.extend_from_slice(&self.date_sec.to_be_bytes());
        out.extend_from_slice(&self.date_nsec.to_be_bytes());
        out.extend_from_slice(&self.vm_clock_nsec.to_be_bytes());
        // The 32-bit field keeps the low bits; the 64-bit extra field is authoritative.
        out.extend_from_slice(&(self.vm_state_size as u32).to_be_bytes());
        let extra = (EXTRA_LEN + self.extra_unknown.len()) as u32;
        out.extend_from_slice(&extra.to_be_bytes());
        out.extend_from_slice(&self.vm_state_size.to_be_bytes());
        out.extend_from_slice(&self.disk_size.to_be_bytes());
        out.extend_from_slice(&self.icount.unwrap_or(u64::MAX).to_be_bytes());
        out.extend_from_slice(&self.extra_unknown);
        out.extend_from_slice(self.id.as_bytes());
        out.extend_from_slice(self.name.as_bytes());
        let len = out.len() - start;
        out.resize(start + len.div_ceil(8) * 8, 0);
    }
}

/// A snapshot opened for reading: its L1 table in memory.
#[derive(Debug, Clone, Default)]
pub struct SnapshotView {
    /// The snapshot it shows.
    pub snapshot: Snapshot,
    l1: Vec<u64>,
}

impl SnapshotView {
    /// Virtual size of the snapshot's disk.
    pub fn size(&self) -> u64 {
        self.snapshot.disk_size
    }
}

impl<D: BlockDevice> Qcow2<D> {
    /// The snapshot table, in on-disk order.
    pub fn snapshots(&mut self) -> Result<Vec<Snapshot>> {
        self.read_snapshot_table().map(|(list, _)| list)
    }

    /// The snapshot table and its length in bytes on disk.
    fn read_snapshot_table(&mut self) -> Result<(Vec<Snapshot>, u64)> {
        let n = self.hdr.nb_snapshots as usize;
        if n > MAX_SNAPSHOTS {
            return Err(Qcow2Error::Corrupt("more than 65536 snapshots"));
        }
        let mut out = Vec::with_capacity(n);
        let mut pos = self.hdr.snapshots_offset;
        let table_end = pos.saturating_add(MAX_TABLE_BYTES);
        for _ in 0..n {
            let mut fixed = [0u8; 40];
            if pos + 40 > table_end {
                return Err(Qcow2Error::Corrupt("the snapshot table exceeds 64 MiB"));
            }
            super::read_dev(&mut self.dev, pos, &mut fixed)?;
            let be32 = |at: usize| {
                u32::from_be_bytes([fixed[at], fixed[at + 1], fixed[at + 2], fixed[at + 3]])
            };
            let id_len = u16::from_be_bytes([fixed[12], fixed[13]]) as usize;
            let name_len = u16::from_be_bytes([fixed[14], fixed[15]]) as usize;
            let extra_len = be32(36) as usize;
            if extra_len > 1024 {
                return Err(Qcow2Error::Corrupt(
                    "a snapshot table entry has more than 1 KiB of extra data",
                ));
            }
            let mut rest = vec![0u8; extra_len + id_len + name_len];
            super::read_dev(&mut self.dev, pos + 40, &mut rest)?;
            let extra = &rest[..extra_len];
            let x64 = |at: usize| (extra.len() >= at + 8).then(|| get_u64(&extra[at..at + 8], 0));
            let l1_size = be32(8);
            let sn = Snapshot {
                l1_table_offset: get_u64(&fixed, 0),
                l1_size,
                date_sec: be32(16),
                date_nsec: be32(20),
                vm_clock_nsec: get_u64(&fixed[24..32], 0),
                vm_state_size: x64(0).unwrap_or(be32(32) as u64),
                // Version 2 entries may lack it: the size the L1 table covers, as QEMU does.
                disk_size: x64(8)
                    .unwrap_or((l1_size as u64) << (self.geo.l2_bits + self.geo.cluster_bits)),
                icount: x64(16).filter(|&i| i != u64::MAX),
                extra_unknown: extra.get(EXTRA_LEN..).unwrap_or(&[]).to_vec(),
                id: String::from_utf8_lossy(&rest[extra_len..extra_len + id_len]).into_owned(),
                name: String::from_utf8_lossy(&rest[extra_len + id_len..]).into_owned(),
            };
            pos += (40 + rest.len() as u64).div_ceil(8) * 8;
            out.push(sn);
        }
        Ok((out, pos - self.hdr.snapshots_offset))
    }

    /// The snapshot whose ID, else whose name, is `id_or_name` (as `qemu-img snapshot`
    /// looks them up), with its index in the table.
    pub fn find_snapshot(&mut self, id_or_name: &str) -> Result<Option<(usize, Snapshot)>> {
        let list = self.snapshots()?;
        let i = list
            .iter()
            .position(|s| s.id == id_or_name)
            .or_else(|| list.iter().position(|s| s.name == id_or_name));
        Ok(i.map(|i| (i, list[i].clone())))
    }

    /// Creates a snapshot of the active state named `name`, stamped with the given time
    /// (seconds and nanoseconds since the epoch). Returns it (its ID is one past the highest
    /// numeric ID, as QEMU picks them).
    pub fn snapshot_create(
        &mut self,
        name: &str,
        date_sec: u32,
        date_nsec: u32,
    ) -> Result<Snapshot> {
        if name.is_empty() || name.len() > u16::MAX as usize {
            return Err(Qcow2Error::Invalid(
                "a snapshot name must have 1 to 65535 bytes",
            ));
        }
        let mut list = self.snapshots()?;
        if list.iter().any(|s| s.name == name || s.id == name) {
            return Err(Qcow2Error::Invalid(
                "a snapshot with this name or ID exists already; delete it first or pick another name",
            ));
        }
        if list.len() >= MAX_SNAPSHOTS {
            return Err(Qcow2Error::Invalid(
                "the image has 65536 snapshots, the most allowed",
            ));
        }
        if self.geo.refcount_bits() < 2 {
            return Err(Qcow2Error::Invalid(
                "refcounts of 1 bit cannot count a snapshot's references; convert the image with \
                 refcount_bits=16 (`qemu-img convert -O qcow2 -o refcount_bits=16`)",
            ));
        }
        self.start_snapshot_op()?;
        let cs = self.geo.cluster_size();
        let r = (|| -> Result<Snapshot> {
            let l1 = self.read_l1(self.hdr.l1_table_offset, self.hdr.l1_size)?;
            self.add_l1_refs(&l1)?;
            // The copy of the L1 table, written directly (nothing references it yet).
            let l1_off = if l1.is_empty() {
                0
            } else {
                let n = (l1.len() as u64 * 8).div_ceil(cs);
                let (first, _) = self.alloc_contiguous(n)?;
                let mut bytes = Vec::with_capacity((n * cs) as usize);
                for e in &l1 {
                    bytes.extend_from_slice(&(e & !COPIED).to_be_bytes());
                }
                bytes.resize((n * cs) as usize, 0);
                self.write_meta(first * cs, &bytes)?;
                first * cs
            };
            let id = list
                .iter()
                .filter_map(|s| s.id.parse::<u64>().ok())
                .max()
                .unwrap_or(0)
                + 1;
            let sn = Snapshot {
                id: alloc::format!("{id}"),
                name: String::from(name),
                l1_table_offset: l1_off,
                l1_size: l1.len() as u32,
                date_sec,
                date_nsec,
                vm_clock_nsec: 0,
                vm_state_size: 0,
                disk_size: self.hdr.size,
                icount: Some(0),
                extra_unknown: Vec::new(),
            };
            list.push(sn.clone());
            self.fix_copied()?;
            self.write_snapshot_table(&list)?;
            Ok(sn)
        })();
        self.end_snapshot_op(r)
    }

    /// Deletes the snapshot with ID or name `id_or_name`: its entry goes, then its L1 table
    /// and every cluster only it used are freed.
    pub fn snapshot_delete(&mut self, id_or_name: &str) -> Result<()> {
        let Some((i, sn)) = self.find_snapshot(id_or_name)? else {
            return Err(Qcow2Error::Invalid(
                "no snapshot has this ID or name; list them with `image snapshot -l`",
            ));
        };
        self.start_snapshot_op()?;
        let cs = self.geo.cluster_size();
        let r = (|| -> Result<()> {
            let l1 = self.read_l1(sn.l1_table_offset, sn.l1_size)?;
            let mut list = self.snapshots()?;
            list.remove(i);
            self.write_snapshot_table(&list)?;
            // The header no longer reaches the snapshot: drop its references.
            self.drop_l1_refs(&l1)?;
            if sn.l1_size > 0 {
                let n = (sn.l1_size as u64 * 8).div_ceil(cs);
                self.queue_free(sn.l1_table_offset / cs, n)?;
            }
            self.flush_metadata()?;
            self.fix_copied()
        })();
        self.end_snapshot_op(r)
    }

    /// Reverts the active state to the snapshot with ID or name `id_or_name` (the snapshot
    /// stays). The virtual size becomes the snapshot's.
    pub fn snapshot_apply(&mut self, id_or_name: &str) -> Result<()> {
        let Some((_, sn)) = self.find_snapshot(id_or_name)? else {
            return Err(Qcow2Error::Invalid(
                "no snapshot has this ID or name; list them with `image snapshot -l`",
            ));
        };
        if (sn.l1_size as u64) < self.geo.l1_entries_for(sn.disk_size) {
            return Err(Qcow2Error::Corrupt(
                "a snapshot's L1 table is too small for its disk size",
            ));
        }
        self.start_snapshot_op()?;
        let cs = self.geo.cluster_size();
        let r = (|| -> Result<()> {
            let new_l1 = self.read_l1(sn.l1_table_offset, sn.l1_size)?;
            let old_l1 = self.read_l1(self.hdr.l1_table_offset, self.hdr.l1_size)?;
            self.add_l1_refs(&new_l1)?;
            // A fresh active L1 table holding the snapshot's entries.
            let n = (new_l1.len() as u64 * 8).div_ceil(cs).max(1);
            let (first, _) = self.alloc_contiguous(n)?;
            let mut bytes = Vec::with_capacity((n * cs) as usize);
            for e in &new_l1 {
                bytes.extend_from_slice(&e.to_be_bytes());
            }
            bytes.resize((n * cs) as usize, 0);
            self.write_meta(first * cs, &bytes)?;
            self.flush_all()?;
            let old_off = self.hdr.l1_table_offset;
            let old_n = (old_l1.len() as u64 * 8).div_ceil(cs);
            for k in 0..old_n {
                self.l2c.forget(old_off + k * cs);
            }
            self.hdr.l1_table_offset = first * cs;
            self.hdr.l1_size = new_l1.len() as u32;
            self.hdr.size = sn.disk_size;
            self.write_header()?;
            self.barrier()?;
            self.drop_l1_refs(&old_l1)?;
            if old_n > 0 {
                self.queue_free(old_off / cs, old_n)?;
            }
            self.flush_metadata()?;
            // The whole disk may have changed: enabled bitmaps record all of it.
            self.mark_all_dirty();
            self.fix_copied()
        })();
        self.end_snapshot_op(r)
    }

    /// Opens the snapshot with ID or name `id_or_name` for reading.
    pub fn snapshot_view(&mut self, id_or_name: &str) -> Result<Option<SnapshotView>> {
        let Some((_, sn)) = self.find_snapshot(id_or_name)? else {
            return Ok(None);
        };
        if (sn.l1_size as u64) < self.geo.l1_entries_for(sn.disk_size) {
            return Err(Qcow2Error::Corrupt(
                "a snapshot's L1 table is too small for its disk size",
            ));
        }
        let l1 = self.read_l1(sn.l1_table_offset, sn.l1_size)?;
        Ok(Some(SnapshotView { snapshot: sn, l1 }))
    }

    /// The mapping of guest cluster `vc` in a snapshot.
    pub fn snapshot_mapping(&mut self, view: &SnapshotView, vc: u64) -> Result<Mapping> {
        let l1i = (vc >> self.geo.l2_bits) as usize;
        let Some(&e) = view.l1.get(l1i) else {
            return Ok(Mapping::Unallocated);
        };
        let Some((off, _)) = decode_l1(e, &self.geo)? else {
            return Ok(Mapping::Unallocated);
        };
        self.check_meta_offset(
            off,
            "a snapshot L1 entry points past the device end or into the header",
        )?;
        let s = self.load(Pool::L2, off, TableKind::L2, true)?;
        let i = (vc & (self.geo.l2_entries() - 1)) as usize;
        self.l2_mapping_at(s, i)
    }

    /// The mapping of guest cluster `vc` in what reads are directed to: the snapshot chosen
    /// with [`crate::disk::VirtualDisk::select_view`], else the disk itself
    /// ([`Qcow2::mapping`]).
    pub fn view_mapping(&mut self, vc: u64) -> Result<Mapping> {
        let Some(v) = self.view else {
            return self.mapping(vc);
        };
        let view = core::mem::take(&mut self.views[v]);
        let r = self.snapshot_mapping(&view, vc);
        self.views[v] = view;
        r
    }

    /// Reads `buf.len()` bytes at guest offset `offset` of a snapshot.
    pub fn read_snapshot(
        &mut self,
        view: &SnapshotView,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        crate::disk::check_request(offset, buf.len() as u64, view.size())
            .map_err(|_| Qcow2Error::Invalid("read past the end of the snapshot's disk"))?;
        let cs = self.geo.cluster_size();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let inoff = pos & (cs - 1);
            let n = ((cs - inoff) as usize).min(buf.len() - done);
            let dst = &mut buf[done..done + n];
            match self.snapshot_mapping(view, pos / cs)? {
                Mapping::Data { host, .. } => {
                    self.check_data_host(host, inoff + n as u64)?;
                    super::read_dev(&mut self.dev, host + inoff, dst)?;
                }
                Mapping::Compressed { host, len } => {
                    self.inflate_into_scratch(host, len)?;
                    dst.copy_from_slice(&self.scratch[inoff as usize..inoff as usize + n]);
                }
                // Through to the backing layer, if any (QEMU reads snapshots so too).
                Mapping::Unallocated => self.read_unallocated(pos, dst)?,
                m @ Mapping::Subclusters { .. } => self.read_subclusters(m, pos, dst)?,
                _ => dst.fill(0),
            }
            done += n;
        }
        Ok(())
    }

    /// The kind of the run of a snapshot at `offset` (at most `len` bytes), as
    /// [`crate::disk::VirtualDisk::block_status`] reports it.
    pub fn snapshot_status(
        &mut self,
        view: &SnapshotView,
        offset: u64,
        len: u64,
    ) -> Result<crate::disk::Extent> {
        use crate::disk::{Allocation, Extent};
        crate::disk::check_request(offset, len, view.size())
            .map_err(|_| Qcow2Error::Invalid("block status past the end of the snapshot's disk"))?;
        let cs = self.geo.cluster_size();
        let backed = self.has_backing();
        let kind = |m: Mapping| match m {
            // Mixed subclusters count as data (always true: "contents unknown").
            Mapping::Data { .. } | Mapping::Compressed { .. } | Mapping::Subclusters { .. } => {
                Allocation::Data
            }
            Mapping::Zero { .. } => Allocation::Zero,
            // Backing data shows through: "allocated, contents unknown" is always true.
            _ if backed => Allocation::Data,
            _ => Allocation::Hole,
        };
        let end = offset + len;
        let first = kind(self.snapshot_mapping(view, offset / cs)?);
        let mut pos = (offset / cs + 1) * cs;
        // Up to 1024 clusters per answer: the caller asks again for the rest.
        while pos < end && pos - offset < 1024 * cs {
            if kind(self.snapshot_mapping(view, pos / cs)?) != first {
                break;
            }
            pos += cs;
        }
        Ok(Extent {
            len: pos.min(end) - offset,
            kind: first,
        })
    }

    /// Reads an L1 table of `entries` entries at `off`.
    fn read_l1(&mut self, off: u64, entries: u32) -> Result<Vec<u64>> {
        let bytes = entries as u64 * 8;
        if bytes > MAX_L1_BYTES {
            return Err(Qcow2Error::Corrupt("an L1 table is larger than 32 MiB"));
        }
        if entries > 0 {
            self.check_meta_offset(off, "an L1 table lies past the device end or in the header")?;
        }
        let mut raw = vec![0u8; bytes as usize];
        super::read_dev(&mut self.dev, off, &mut raw)?;
        Ok(raw.chunks_exact(8).map(|c| get_u64(c, 0)).collect())
    }

    /// Before a snapshot operation: the session is writing, every change so far is on disk,
    /// and the overlap map is dropped (tables change owners; it is rebuilt at the next write).
    fn start_snapshot_op(&mut self) -> Result<()> {
        self.begin_write()?;
        self.begin_bitmap_session()?;
        self.flush_all()?;
        self.meta = None;
        self.l2_memo = None;
        Ok(())
    }

    /// After a snapshot operation: everything is written back; cached state derived from
    /// the tables is recomputed on demand.
    fn end_snapshot_op<T>(&mut self, r: Result<T>) -> Result<T> {
        let flushed = self.flush_all();
        self.meta = None;
        self.l2_memo = None;
        self.tally = None;
        self.compact_done_at = None;
        let r = self.note_corrupt(r)?;
        flushed?;
        Ok(r)
    }

    /// Writes a metadata structure that nothing references yet (a new L1 copy or snapshot
    /// table) straight to the device.
    fn write_meta(&mut self, off: u64, bytes: &[u8]) -> Result<()> {
        super::write_dev(&mut self.dev, off, bytes)?;
        self.stats.metadata_bytes_written += bytes.len() as u64;
        Ok(())
    }

    /// The host clusters an L2 entry holds references to: (first, count).
    fn entry_clusters(&self, m: Mapping) -> Option<(u64, u64)> {
        let cs = self.geo.cluster_size();
        match m {
            Mapping::Data { host, .. }
            | Mapping::Zero {
                host: Some(host), ..
            }
            | Mapping::Subclusters {
                host: Some(host), ..
            } => Some((host / cs, 1)),
            Mapping::Compressed { host, len } => {
                let first = host / cs;
                Some((first, (host + len - 1) / cs - first + 1))
            }
            _ => None,
        }
    }

    /// The raw entries (entry, subcluster bitmap) of the L2 table at `off`.
    fn l2_entries_of(&mut self, off: u64) -> Result<Vec<(u64, u64)>> {
        self.check_meta_offset(
            off,
            "an L1 entry points past the device end or into the header",
        )?;
        let s = self.load(Pool::L2, off, TableKind::L2, true)?;
        Ok((0..self.geo.l2_entries() as usize)
            .map(|i| self.l2_raw_at(s, i))
            .collect())
    }

    /// Adds one reference to each L2 table of `l1` and each cluster those tables use.
    fn add_l1_refs(&mut self, l1: &[u64]) -> Result<()> {
        self.change_l1_refs(l1, true)
    }

    /// Drops (deferred) one reference to each L2 table of `l1` and each cluster they use.
    fn drop_l1_refs(&mut self, l1: &[u64]) -> Result<()> {
        self.change_l1_refs(l1, false)
    }

    /// One reference more (`add`) or one less, deferred, to everything `l1` reaches.
    fn change_l1_refs(&mut self, l1: &[u64], add: bool) -> Result<()> {
        let cs = self.geo.cluster_size();
        for &e in l1 {
            let Some((off, _)) = decode_l1(e, &self.geo)? else {
                continue;
            };
            let mut runs: Vec<(u64, u64)> = Vec::new();
            for x in self.l2_entries_of(off)? {
                let m = Mapping::from_raw(x, &self.geo, self.hdr.version)?;
                runs.extend(self.entry_clusters(m));
            }
            runs.push((off / cs, 1));
            for (first, n) in runs {
                if add {
                    for c in first..first + n {
                        self.add_ref(c)?;
                    }
                } else {
                    self.queue_free(first, n)?;
                }
            }
        }
        Ok(())
    }

    /// One more reference to host cluster `c` (which is in use).
    fn add_ref(&mut self, c: u64) -> Result<()> {
        let r = self.refcount(c)?;
        if r == 0 {
            return Err(Qcow2Error::Corrupt("a cluster in use has refcount 0"));
        }
        if r >= self.geo.refcount_max() {
            return Err(Qcow2Error::Invalid(
                "a refcount would overflow its width (too many snapshots for this refcount_bits); \
                 delete snapshots or convert the image with wider refcounts",
            ));
        }
        self.set_refcount(c, r + 1)
    }

    /// Sets the COPIED flag of every active L1 and L2 entry exactly where the refcount is 1
    /// (QEMU's check demands it; writes in place rely on it). Clearing the flag in an L2
    /// table shared with a snapshot changes nothing the snapshot reads.
    fn fix_copied(&mut self) -> Result<()> {
        let cs = self.geo.cluster_size();
        self.l2_memo = None;
        for l1i in 0..self.hdr.l1_size as u64 {
            let e = self.l1_entry(l1i)?;
            let Some((off, copied)) = decode_l1(e, &self.geo)? else {
                continue;
            };
            let one = self.refcount(off / cs)? == 1;
            if one != copied {
                self.set_l1_entry(l1i, if one { e | COPIED } else { e & !COPIED })?;
            }
            let entries = self.l2_entries_of(off)?;
            for (i, x) in entries.into_iter().enumerate() {
                let m = Mapping::from_raw(x, &self.geo, self.hdr.version)?;
                let want = match m {
                    Mapping::Data { host, .. }
                    | Mapping::Zero {
                        host: Some(host), ..
                    }
                    | Mapping::Subclusters {
                        host: Some(host), ..
                    } => self.refcount(host / cs)? == 1,
                    _ => continue,
                };
                let (x, bitmap) = x;
                if want != (x & COPIED != 0) {
                    if want && !one {
                        return Err(Qcow2Error::Corrupt(
                            "a shared L2 table holds a cluster with one reference",
                        ));
                    }
                    let s = self.load(Pool::L2, off, TableKind::L2, true)?;
                    let v = if want { x | COPIED } else { x & !COPIED };
                    self.put_l2_raw(s, i, (v, bitmap));
                }
            }
        }
        Ok(())
    }

    /// Writes `list` as a new snapshot table, switches the header to it (after everything
    /// it references is durable) and frees the old table.
    fn write_snapshot_table(&mut self, list: &[Snapshot]) -> Result<()> {
        let cs = self.geo.cluster_size();
        let mut bytes = Vec::new();
        for sn in list {
            sn.encode(&mut bytes);
        }
        if bytes.len() as u64 > MAX_TABLE_BYTES {
            return Err(Qcow2Error::Invalid(
                "the snapshot table would exceed 64 MiB",
            ));
        }
        let old_off = self.hdr.snapshots_offset;
        let old_n = if self.hdr.nb_snapshots > 0 {
            self.read_snapshot_table()?.1.div_ceil(cs)
        } else {
            0
        };
        let new_off = if bytes.is_empty() {
            0
        } else {
            let n = (bytes.len() as u64).div_ceil(cs);
            let (first, _) = self.alloc_contiguous(n)?;
            bytes.resize((n * cs) as usize, 0);
            self.write_meta(first * cs, &bytes)?;
            first * cs
        };
        // Refcounts, the L1 copy and the table are durable before the header points at them.
        self.flush_all()?;
        self.hdr.nb_snapshots = list.len() as u32;
        self.hdr.snapshots_offset = new_off;
        self.write_header()?;
        self.barrier()?;
        if old_n > 0 {
            self.queue_free(old_off / cs, old_n)?;
        }
        Ok(())
    }
}
