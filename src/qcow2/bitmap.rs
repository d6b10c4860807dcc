//! Persistent dirty bitmaps (the bitmaps header extension, autoclear bit 0), kept valid the
//! way QEMU keeps them.
//!
//! At open, the bitmap directory is read and every consistent dirty-tracking bitmap (not
//! marked in use) is loaded into memory. At the first change of a writable session, the
//! enabled ("auto") bitmaps are marked in use on disk (they will differ from the disk until
//! stored); enabled bitmaps that could not be loaded are marked in use too, and stay so
//! (inconsistent), as QEMU leaves them. Every write, write-zeroes and discard sets the bits
//! of the range it touches. At [`Qcow2::close`] the changed parts are written back (new
//! data clusters where a table entry had none), their refcounts and the tables made
//! durable, and only then the in-use flags cleared. After a crash the flags stay set: QEMU
//! then treats the bitmaps as inconsistent, and `qemu-img check` still counts their clusters.
//!
//! Memory: one bit per granule of each loaded bitmap (2 KiB for 1 GiB at 64 KiB
//! granularity), at most a quarter of [`super::OpenOptions::check_memory_limit`] in all.

use super::Qcow2;
use super::cache::get_u64;
use super::entry::OFFSET_MASK;
use super::error::{Qcow2Error, Result};
use super::header::{AUTOCLEAR_BITMAPS, EXT_BITMAPS};
use crate::block::BlockDevice;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

/// Directory entry flag: the bitmap on disk may be inconsistent.
const FLAG_IN_USE: u32 = 1 << 0;
/// Directory entry flag: the bitmap is enabled (records every change).
const FLAG_AUTO: u32 = 1 << 1;
/// Directory entry flag: unknown extra data may be ignored.
const FLAG_EXTRA_COMPATIBLE: u32 = 1 << 2;
/// Bitmap type: dirty tracking.
const TYPE_DIRTY: u8 = 1;
/// Largest directory QEMU accepts.
const MAX_DIRECTORY_BYTES: u64 = 64 << 20;
/// Most bitmaps QEMU accepts.
const MAX_BITMAPS: u32 = 65535;
/// Bitmap table entry: an unallocated cluster that reads as all ones.
const ALL_ONES: u64 = 1;

/// What a persistent bitmap is, as [`Qcow2::bitmaps`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    /// The bitmap's name.
    pub name: String,
    /// Bytes of the virtual disk one bit stands for.
    pub granularity: u64,
    /// Enabled: records every change of the disk (QEMU's `auto` flag).
    pub enabled: bool,
    /// Consistent and loaded: its bits can be read ([`Qcow2::bitmap_status`]).
    pub readable: bool,
    /// Marked in use on disk (inconsistent after a crash, or being recorded now).
    pub in_use: bool,
}

/// One bitmap directory entry and, when loaded, its bits.
#[derive(Debug, Clone)]
struct Bitmap {
    name: String,
    /// Byte offset of this entry in the directory (flags at +12).
    entry_at: u64,
    flags: u32,
    granularity_bits: u32,
    table_offset: u64,
    table_size: u32,
    /// The bits (LSB first in each byte), when loaded.
    bits: Option<Vec<u8>>,
    /// Per table entry: bits changed since open.
    changed: Vec<bool>,
    /// Recording changes in this session (enabled and loaded, marked in use on disk).
    tracking: bool,
}

/// The bitmaps of an image whose bitmaps extension is in force.
#[derive(Debug, Clone, Default)]
pub(crate) struct Bitmaps {
    list: Vec<Bitmap>,
    dir_offset: u64,
    dir_size: u64,
    /// The in-use flags of this session are on disk.
    marked: bool,
}

impl<D: BlockDevice> Qcow2<D> {
    /// Reads the bitmap directory and loads the consistent bitmaps (at open). `None` when
    /// the image has no bitmaps extension in force; an error when it is unusable.
    pub(crate) fn load_bitmaps(&mut self) -> Result<Option<Bitmaps>> {
        if self.hdr.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
            return Ok(None);
        }
        let Some(ext) = self.hdr.extensions.iter().find(|e| e.kind == EXT_BITMAPS) else {
            return Ok(None);
        };
        if ext.data.len() < 24 {
            return Err(Qcow2Error::Corrupt("the bitmaps extension is too short"));
        }
        let nb = u32::from_be_bytes([ext.data[0], ext.data[1], ext.data[2], ext.data[3]]);
        let dir_size = get_u64(&ext.data[8..16], 0);
        let dir_offset = get_u64(&ext.data[16..24], 0);
        let cs = self.geo.cluster_size();
        if nb == 0 || nb > MAX_BITMAPS || dir_size > MAX_DIRECTORY_BYTES {
            return Err(Qcow2Error::Corrupt(
                "the bitmap directory is empty or larger than QEMU allows",
            ));
        }
        self.check_meta_offset(dir_offset, "the bitmap directory lies past the device end")?;
        if !dir_offset.is_multiple_of(cs) {
            return Err(Qcow2Error::Corrupt(
                "the bitmap directory is not cluster aligned",
            ));
        }
        let mut dir = vec![0u8; dir_size as usize];
        super::read_dev(&mut self.dev, dir_offset, &mut dir)?;
        let mut list = Vec::with_capacity(nb as usize);
        let mut at = 0usize;
        let mut budget = self.opts.check_memory_limit / 4;
        for _ in 0..nb {
            if at + 24 > dir.len() {
                return Err(Qcow2Error::Corrupt("the bitmap directory is truncated"));
            }
            let e = &dir[at..];
            let be32 = |i: usize| u32::from_be_bytes([e[i], e[i + 1], e[i + 2], e[i + 3]]);
            let name_len = u16::from_be_bytes([e[18], e[19]]) as usize;
            let extra = be32(20) as usize;
            let len = 24 + extra + name_len;
            if at + len > dir.len() || name_len == 0 {
                return Err(Qcow2Error::Corrupt("a bitmap directory entry is invalid"));
            }
            let mut bm = Bitmap {
                name: String::from_utf8_lossy(&e[24 + extra..len]).into_owned(),
                entry_at: at as u64,
                flags: be32(12),
                granularity_bits: e[17] as u32,
                table_offset: get_u64(&e[..8], 0),
                table_size: be32(8),
                bits: None,
                changed: Vec::new(),
                tracking: false,
            };
            let usable = e[16] == TYPE_DIRTY
                && (extra == 0 || bm.flags & FLAG_EXTRA_COMPATIBLE != 0)
                && bm.flags & FLAG_IN_USE == 0
                && (9..=31).contains(&bm.granularity_bits);
            if usable {
                let bytes = self.bitmap_bytes(bm.granularity_bits);
                if bytes <= budget && (bm.table_size as u64) == self.bitmap_clusters(bytes) {
                    budget -= bytes;
                    bm.bits = Some(self.read_bitmap_bits(&bm, bytes)?);
                    bm.changed = vec![false; bm.table_size as usize];
                } else {
                    log::warn!(
                        "qcow2: bitmap {} not loaded (its table does not fit the disk size, or \
                         the bitmaps exceed the memory limit)",
                        bm.name
                    );
                }
            }
            list.push(bm);
            at += len.div_ceil(8) * 8;
        }
        Ok(Some(Bitmaps {
            list,
            dir_offset,
            dir_size,
            marked: false,
        }))
    }

    /// Bytes of bits a bitmap of this granularity has for the virtual disk.
    fn bitmap_bytes(&self, granularity_bits: u32) -> u64 {
        self.hdr.size.div_ceil(1 << granularity_bits).div_ceil(8)
    }

    /// Clusters (table entries) `bytes` of bits take.
    fn bitmap_clusters(&self, bytes: u64) -> u64 {
        bytes.div_ceil(self.geo.cluster_size())
    }

    /// Reads a bitmap's table and data.
    fn read_bitmap_bits(&mut self, bm: &Bitmap, bytes: u64) -> Result<Vec<u8>> {
        let cs = self.geo.cluster_size();
        let table = self.read_bitmap_table(bm)?;
        let mut bits = vec![0u8; bytes as usize];
        for (i, e) in table.into_iter().enumerate() {
            let lo = i * cs as usize;
            let hi = (lo + cs as usize).min(bits.len());
            let off = e & OFFSET_MASK;
            if off != 0 {
                self.check_meta_offset(off, "a bitmap data cluster lies past the device end")?;
                super::read_dev(&mut self.dev, off, &mut bits[lo..hi])?;
            } else if e & ALL_ONES != 0 {
                bits[lo..hi].fill(0xff);
            }
        }
        // Bits past the disk's end stay clear.
        let nbits = self.hdr.size.div_ceil(1 << bm.granularity_bits);
        if !nbits.is_multiple_of(8)
            && let Some(last) = bits.last_mut()
        {
            *last &= (1u8 << (nbits % 8)) - 1;
        }
        Ok(bits)
    }

    /// A bitmap's table entries, validated.
    fn read_bitmap_table(&mut self, bm: &Bitmap) -> Result<Vec<u64>> {
        let cs = self.geo.cluster_size();
        if bm.table_size > 0
            && (!bm.table_offset.is_multiple_of(cs) || bm.table_offset / cs >= self.dev_span)
        {
            return Err(Qcow2Error::Corrupt(
                "a bitmap table is unaligned or past the device end",
            ));
        }
        let mut raw = vec![0u8; bm.table_size as usize * 8];
        super::read_dev(&mut self.dev, bm.table_offset, &mut raw)?;
        let table: Vec<u64> = raw.chunks_exact(8).map(|c| get_u64(c, 0)).collect();
        for &e in &table {
            let off = e & OFFSET_MASK;
            if e & !(OFFSET_MASK | ALL_ONES) != 0 || (off != 0 && e & ALL_ONES != 0) {
                return Err(Qcow2Error::Corrupt(
                    "a bitmap table entry has reserved bits set",
                ));
            }
            if !off.is_multiple_of(cs) {
                return Err(Qcow2Error::Corrupt("a bitmap data cluster is unaligned"));
            }
        }
        Ok(table)
    }

    /// The host regions (offset, bytes) the bitmaps extension references: the directory,
    /// each bitmap table and each data cluster. A table that cannot be read is reported as
    /// an error after the regions found so far.
    pub(crate) fn bitmap_regions(&mut self) -> (Vec<(u64, u64)>, Option<Qcow2Error>) {
        let Some(b) = self.bitmaps.take() else {
            return (Vec::new(), None);
        };
        let cs = self.geo.cluster_size();
        let mut out = alloc::vec![(b.dir_offset, b.dir_size)];
        let mut err = None;
        for bm in &b.list {
            if bm.table_size == 0 {
                continue;
            }
            out.push((bm.table_offset, bm.table_size as u64 * 8));
            match self.read_bitmap_table(bm) {
                Ok(t) => out.extend(
                    t.into_iter()
                        .map(|e| e & OFFSET_MASK)
                        .filter(|&o| o != 0)
                        .map(|o| (o, cs)),
                ),
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
        self.bitmaps = Some(b);
        (out, err)
    }

    /// The persistent bitmaps (empty without a bitmaps extension in force).
    pub fn bitmaps(&self) -> Vec<BitmapInfo> {
        let Some(b) = &self.bitmaps else {
            return Vec::new();
        };
        b.list
            .iter()
            .map(|bm| BitmapInfo {
                name: bm.name.clone(),
                granularity: 1 << bm.granularity_bits,
                enabled: bm.flags & FLAG_AUTO != 0,
                readable: bm.bits.is_some(),
                in_use: bm.flags & FLAG_IN_USE != 0,
            })
            .collect()
    }

    /// Whether the range at `offset` is dirty in bitmap `name`, and for how many bytes
    /// (at most `len`, at least one granule or up to the disk's end) it stays so. `None`
    /// when no readable bitmap has that name.
    pub fn bitmap_status(&self, name: &str, offset: u64, len: u64) -> Option<(bool, u64)> {
        let bm = self
            .bitmaps
            .as_ref()?
            .list
            .iter()
            .find(|b| b.name == name)?;
        let bits = bm.bits.as_ref()?;
        let g = bm.granularity_bits;
        let get = |i: u64| {
            bits.get((i / 8) as usize)
                .is_some_and(|b| b >> (i % 8) & 1 != 0)
        };
        let end = offset.saturating_add(len.max(1)).min(self.hdr.size);
        let first = offset >> g;
        let state = get(first);
        let mut i = first + 1;
        while i << g < end && get(i) == state {
            i += 1;
        }
        Some((state, ((i << g).min(end)).saturating_sub(offset).max(1)))
    }

    /// Sets the bits of every tracking bitmap for `len` bytes at `offset` (a change).
    pub(crate) fn mark_dirty(&mut self, offset: u64, len: u64) {
        let cs = self.geo.cluster_size();
        let Some(b) = &mut self.bitmaps else {
            return;
        };
        if len == 0 {
            return;
        }
        for bm in b.list.iter_mut().filter(|bm| bm.tracking) {
            let Some(bits) = &mut bm.bits else { continue };
            let g = bm.granularity_bits;
            let (first, last) = (offset >> g, (offset + len - 1) >> g);
            for i in first..=last {
                let byte = (i / 8) as usize;
                if let Some(b) = bits.get_mut(byte) {
                    *b |= 1 << (i % 8);
                    if let Some(c) = bm.changed.get_mut(byte / cs as usize) {
                        *c = true;
                    }
                }
            }
        }
    }

    /// Marks every bit of every tracking bitmap (the whole disk changed: a snapshot apply).
    pub(crate) fn mark_all_dirty(&mut self) {
        let size = self.hdr.size;
        self.mark_dirty(0, size);
    }

    /// At the first change of a writable session: enabled bitmaps are marked in use on disk
    /// (durably, before the change), loaded ones start recording. Returns whether the
    /// bitmaps extension stays valid (it does unless the directory cannot be written).
    pub(crate) fn begin_bitmap_session(&mut self) -> Result<()> {
        if self.read_only || self.repairing {
            return Ok(());
        }
        let Some(mut b) = self.bitmaps.take() else {
            return Ok(());
        };
        if b.marked {
            self.bitmaps = Some(b);
            return Ok(());
        }
        let mut any = false;
        for bm in b.list.iter_mut() {
            if bm.flags & FLAG_AUTO != 0 && bm.flags & FLAG_IN_USE == 0 {
                bm.flags |= FLAG_IN_USE;
                bm.tracking = bm.bits.is_some();
                any = true;
            }
        }
        let r = if any {
            self.write_bitmap_flags(&b).and_then(|()| self.barrier())
        } else {
            Ok(())
        };
        b.marked = true;
        self.bitmaps = Some(b);
        r
    }

    /// Rewrites the flags word of each directory entry in place.
    fn write_bitmap_flags(&mut self, b: &Bitmaps) -> Result<()> {
        for bm in &b.list {
            super::write_dev(
                &mut self.dev,
                b.dir_offset + bm.entry_at + 12,
                &bm.flags.to_be_bytes(),
            )?;
            self.stats.metadata_bytes_written += 4;
        }
        debug_assert!(b.list.iter().all(|bm| bm.entry_at + 16 <= b.dir_size));
        Ok(())
    }

    /// Writes the recorded bitmaps back (changed clusters only; new data clusters where
    /// the table had none), makes their refcounts and tables durable, then clears their
    /// in-use flags. [`Qcow2::close`] does it; a server shutting down without giving up
    /// the engine can call it. A later change marks them in use again.
    pub fn store_bitmaps(&mut self) -> Result<()> {
        let Some(mut b) = self.bitmaps.take() else {
            return Ok(());
        };
        let r = self.store_bitmaps_of(&mut b);
        self.bitmaps = Some(b);
        r
    }

    fn store_bitmaps_of(&mut self, b: &mut Bitmaps) -> Result<()> {
        if !b.list.iter().any(|bm| bm.tracking) {
            return Ok(());
        }
        let cs = self.geo.cluster_size();
        let mut tables = Vec::new();
        for (k, bm) in b.list.iter().enumerate() {
            if !bm.tracking {
                continue;
            }
            let mut table = self.read_bitmap_table(bm)?;
            let mut table_changed = false;
            let bits = bm.bits.as_ref().expect("tracking bitmaps are loaded");
            let mut chunk = vec![0u8; cs as usize];
            for (i, e) in table.iter_mut().enumerate() {
                if !bm.changed[i] {
                    continue;
                }
                let lo = i * cs as usize;
                let hi = (lo + cs as usize).min(bits.len());
                chunk.fill(0);
                chunk[..hi - lo].copy_from_slice(&bits[lo..hi]);
                let mut off = *e & OFFSET_MASK;
                if off == 0 {
                    let (c, _) = self.alloc_run(1)?;
                    off = c * cs;
                    *e = off;
                    table_changed = true;
                }
                self.check_overlap(off, cs, 0)?;
                super::write_dev(&mut self.dev, off, &chunk)?;
                self.stats.metadata_bytes_written += cs;
            }
            if table_changed {
                tables.push((k, table));
            }
        }
        // New data clusters' refcounts and the data are durable before the tables point
        // at them.
        self.flush_all()?;
        for (k, table) in tables {
            let off = b.list[k].table_offset;
            let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
            super::write_dev(&mut self.dev, off, &bytes)?;
            self.stats.metadata_bytes_written += bytes.len() as u64;
        }
        self.barrier()?;
        for bm in b.list.iter_mut().filter(|bm| bm.tracking) {
            bm.flags &= !FLAG_IN_USE;
            bm.tracking = false;
            bm.changed.fill(false);
        }
        self.write_bitmap_flags(b)?;
        b.marked = false;
        self.barrier()
    }
}
