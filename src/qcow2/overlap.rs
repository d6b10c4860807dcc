//! Overlap checks before writes (QEMU's `qcow2_check_metadata_overlap`): guest data and
//! metadata tables never land on the header, the active L1 table, the refcount table (found
//! from the header), nor on L2 tables, refcount blocks, the snapshot table, snapshot L1 and
//! L2 tables or the bitmap directory and bitmap tables (kept in a [`MetaMap`]).
//!
//! The map is built once per writable session, at the first change (reading the active L1
//! table, the refcount table and the snapshot and bitmap tables), and kept up to date as
//! tables are allocated and freed: a lookup is a binary search over a few entries per GiB
//! of image, so every data write is checked, in place or into new clusters. A refused
//! write is [`Qcow2Error::Overlap`]: nothing is written, the image is marked corrupt (as
//! QEMU does), the event is logged and counted ([`super::Stats::overlaps_refused`]).

use super::Qcow2;
use super::cache::get_u64;
use super::entry::decode_l1;
use super::error::{Qcow2Error, Result};
use super::header::{AUTOCLEAR_BITMAPS, EXT_BITMAPS};
use super::layout::MAX_L1_BYTES;
use crate::block::BlockDevice;
use alloc::vec::Vec;

/// The kinds of metadata a cluster can hold, as bits (a corrupt image may use one cluster
/// for several).
pub(crate) mod kind {
    /// The image header (cluster 0).
    pub const HEADER: u16 = 1 << 0;
    /// The active L1 table.
    pub const ACTIVE_L1: u16 = 1 << 1;
    /// An L2 table of the active L1 table.
    pub const ACTIVE_L2: u16 = 1 << 2;
    /// The refcount table.
    pub const REFCOUNT_TABLE: u16 = 1 << 3;
    /// A refcount block.
    pub const REFCOUNT_BLOCK: u16 = 1 << 4;
    /// The snapshot table.
    pub const SNAPSHOT_TABLE: u16 = 1 << 5;
    /// A snapshot's L1 table.
    pub const INACTIVE_L1: u16 = 1 << 6;
    /// An L2 table only a snapshot uses.
    pub const INACTIVE_L2: u16 = 1 << 7;
    /// The bitmap directory.
    pub const BITMAP_DIRECTORY: u16 = 1 << 8;
    /// A bitmap table.
    pub const BITMAP_TABLE: u16 = 1 << 9;
}

/// The name of the first kind in `bits`, for messages.
pub(crate) fn kind_name(bits: u16) -> &'static str {
    const NAMES: [&str; 10] = [
        "the image header",
        "the active L1 table",
        "an active L2 table",
        "the refcount table",
        "a refcount block",
        "the snapshot table",
        "a snapshot L1 table",
        "a snapshot (inactive) L2 table",
        "the bitmap directory",
        "a bitmap table",
    ];
    NAMES
        .get(bits.trailing_zeros() as usize)
        .copied()
        .unwrap_or("metadata")
}

/// Most snapshots whose tables the map records (the format allows 65536).
const MAX_SNAPSHOTS: u32 = 65536;

/// Metadata clusters other than the header, L1 table and refcount table (those follow the
/// header): sorted entries `cluster << 16 | kinds`, one per cluster.
#[derive(Debug, Default)]
pub(crate) struct MetaMap {
    entries: Vec<u64>,
    /// Most entries the map may hold (memory bound); inactive tables past it are not
    /// recorded (and a warning is logged once).
    limit: usize,
    truncated: bool,
}

impl MetaMap {
    fn new(limit: usize) -> Self {
        MetaMap {
            entries: Vec::new(),
            limit,
            truncated: false,
        }
    }

    fn search(&self, c: u64) -> core::result::Result<usize, usize> {
        self.entries.binary_search_by(|e| (e >> 16).cmp(&c))
    }

    /// Whether another entry fits (warns once when not).
    fn room(&mut self) -> bool {
        if self.entries.len() < self.limit {
            return true;
        }
        if !self.truncated {
            log::warn!(
                "qcow2: too many metadata clusters to track for overlap checks; later ones \
                 are not checked"
            );
        }
        self.truncated = true;
        false
    }

    /// Adds `bits` to cluster `c`.
    pub(crate) fn insert(&mut self, c: u64, bits: u16) {
        match self.search(c) {
            Ok(i) => self.entries[i] |= bits as u64,
            Err(i) => {
                if self.room() {
                    self.entries.insert(i, (c << 16) | bits as u64);
                }
            }
        }
    }

    /// Adds `bits` to cluster `c` while building (in any order; [`MetaMap::finish`] sorts).
    fn push(&mut self, c: u64, bits: u16) {
        if self.room() {
            self.entries.push((c << 16) | bits as u64);
        }
    }

    /// Sorts what [`MetaMap::push`] added and merges entries of the same cluster.
    fn finish(&mut self) {
        self.entries.sort_unstable();
        self.entries.dedup_by(|later, kept| {
            let same = *later >> 16 == *kept >> 16;
            if same {
                *kept |= *later & 0xffff;
            }
            same
        });
    }

    /// Clears `bits` of cluster `c` (dropping it when none are left).
    pub(crate) fn clear(&mut self, c: u64, bits: u16) {
        if let Ok(i) = self.search(c) {
            self.entries[i] &= !(bits as u64);
            if self.entries[i] & 0xffff == 0 {
                self.entries.remove(i);
            }
        }
    }

    /// Forgets cluster `c` (its refcount dropped to zero).
    pub(crate) fn remove(&mut self, c: u64) {
        if let Ok(i) = self.search(c) {
            self.entries.remove(i);
        }
    }

    /// The first cluster in `[first, last]` with a kind outside `allowed`, and its kinds.
    pub(crate) fn find(&self, first: u64, last: u64, allowed: u16) -> Option<(u64, u16)> {
        let i = self.search(first).unwrap_or_else(|i| i);
        self.entries[i..]
            .iter()
            .take_while(|&&e| e >> 16 <= last)
            .map(|&e| (e >> 16, (e & 0xffff) as u16 & !allowed))
            .find(|&(_, bits)| bits != 0)
    }

    /// Bytes of memory the map holds.
    pub(crate) fn memory_bytes(&self) -> u64 {
        self.entries.capacity() as u64 * 8
    }
}

impl<D: BlockDevice> Qcow2<D> {
    /// The fixed metadata (header, active L1 table, refcount table) that `[off, off+len)`
    /// overlaps, as kind bits.
    pub(crate) fn fixed_overlap(&self, off: u64, len: u64) -> u16 {
        let cs = self.geo.cluster_size();
        let end = off.saturating_add(len);
        let l1s = self.hdr.l1_table_offset;
        let l1e = l1s + (self.hdr.l1_size as u64 * 8).div_ceil(cs) * cs;
        let rts = self.hdr.refcount_table_offset;
        let rte = rts + self.hdr.refcount_table_clusters as u64 * cs;
        let mut bits = 0;
        if off < cs {
            bits |= kind::HEADER;
        }
        if off < l1e && end > l1s {
            bits |= kind::ACTIVE_L1;
        }
        if off < rte && end > rts {
            bits |= kind::REFCOUNT_TABLE;
        }
        bits
    }

    /// Refuses a write of `len` bytes at host offset `off` that would land on metadata other
    /// than the kinds in `allowed` (the structure being written): [`Qcow2Error::Overlap`],
    /// after marking the image corrupt, logging and counting it. Before the map is built
    /// (repair, or the start of a session) only the fixed metadata is checked.
    pub(crate) fn check_overlap(&mut self, off: u64, len: u64, allowed: u16) -> Result<()> {
        if self.repairing || len == 0 {
            return Ok(());
        }
        let fixed = self.fixed_overlap(off, len) & !allowed;
        let hit = if fixed != 0 {
            Some((off, fixed))
        } else if let Some(map) = &self.meta {
            let cs = self.geo.cluster_size();
            let last = (off.saturating_add(len) - 1) / cs;
            map.find(off / cs, last, allowed)
                .map(|(c, bits)| (c * cs, bits))
        } else {
            None
        };
        let Some((at, bits)) = hit else {
            return Ok(());
        };
        let what = kind_name(bits);
        self.stats.overlaps_refused += 1;
        log::error!(
            "qcow2: preventing a write of {len} bytes at host offset {off:#x}: it would \
             overwrite {what} (at {at:#x}); the image is corrupt"
        );
        self.mark_corrupt();
        Err(Qcow2Error::Overlap {
            offset: off.max(at),
            what,
        })
    }

    /// Before host cluster `c`'s last reference is dropped: if it holds metadata still in use
    /// (a corrupt data entry pointed at it), its refcount must not reach zero (the allocator
    /// would hand the live table out for data). Returns the [`Qcow2Error::Overlap`] to
    /// report, after marking the image corrupt, logging and counting it.
    pub(crate) fn refuse_free(&mut self, c: u64) -> Option<Qcow2Error> {
        if self.repairing {
            return None;
        }
        let cs = self.geo.cluster_size();
        let fixed = self.fixed_overlap(c * cs, cs);
        let bits = if fixed != 0 {
            fixed
        } else {
            self.meta.as_ref()?.find(c, c, 0)?.1
        };
        let what = kind_name(bits);
        self.stats.overlaps_refused += 1;
        log::error!(
            "qcow2: preventing the free of host cluster {:#x}: it holds {what}; the image is \
             corrupt",
            c * cs
        );
        self.mark_corrupt();
        Some(Qcow2Error::Overlap {
            offset: c * cs,
            what,
        })
    }

    /// Records that host cluster `c` now holds metadata of kind `bits`.
    pub(crate) fn meta_insert(&mut self, c: u64, bits: u16) {
        if let Some(m) = &mut self.meta {
            m.insert(c, bits);
        }
    }

    /// Builds the map of metadata clusters (at the start of a writable session). Entries
    /// that are invalid (unaligned, past the device end) are left out: they cannot be
    /// written through anyway, and check/repair reports them.
    pub(crate) fn build_meta_map(&mut self) -> Result<()> {
        let cs = self.geo.cluster_size();
        let limit = (self.opts.check_memory_limit / 4 / 8).max(1024) as usize;
        let mut map = MetaMap::new(limit);
        let span = self.dev_span;
        let add = |map: &mut MetaMap, off: u64, bytes: u64, bits: u16| {
            if off == 0 || !off.is_multiple_of(cs) {
                return;
            }
            let first = off / cs;
            let n = bytes.div_ceil(cs).max(1);
            for c in first..first.saturating_add(n).min(span) {
                map.push(c, bits);
            }
        };
        // Refcount blocks.
        for ti in 0..self.rt_entries {
            if let Ok(Some(b)) = self.rt_entry(ti) {
                add(&mut map, b, cs, kind::REFCOUNT_BLOCK);
            }
        }
        // Active L2 tables.
        for l1i in 0..self.hdr.l1_size as u64 {
            let e = self.l1_entry(l1i)?;
            if let Ok(Some((off, _))) = decode_l1(e, &self.geo) {
                add(&mut map, off, cs, kind::ACTIVE_L2);
            }
        }
        // Snapshot table, snapshot L1 tables and their L2 tables.
        let n = self.hdr.nb_snapshots;
        if n > 0 && n <= MAX_SNAPSHOTS {
            let cap = self.dev.capacity();
            let mut pos = self.hdr.snapshots_offset;
            let mut l1s = Vec::new();
            for _ in 0..n {
                let mut fixed = [0u8; 40];
                if pos.checked_add(40).is_none_or(|e| e > cap) {
                    break;
                }
                self.dev.read_at(pos, &mut fixed)?;
                let l1_off = get_u64(&fixed, 0);
                let l1_size = u32::from_be_bytes([fixed[8], fixed[9], fixed[10], fixed[11]]);
                let id_len = u16::from_be_bytes([fixed[12], fixed[13]]) as u64;
                let name_len = u16::from_be_bytes([fixed[14], fixed[15]]) as u64;
                let extra = u32::from_be_bytes([fixed[36], fixed[37], fixed[38], fixed[39]]);
                pos += (40 + extra as u64 + id_len + name_len).div_ceil(8) * 8;
                if l1_size as u64 * 8 <= MAX_L1_BYTES {
                    add(&mut map, l1_off, l1_size as u64 * 8, kind::INACTIVE_L1);
                    l1s.push((l1_off, l1_size as u64));
                }
            }
            let first = self.hdr.snapshots_offset;
            add(
                &mut map,
                first,
                pos.saturating_sub(first),
                kind::SNAPSHOT_TABLE,
            );
            let mut buf = [0u8; 512];
            for (l1_off, l1_size) in l1s {
                if !l1_off.is_multiple_of(cs) {
                    continue;
                }
                let mut i = 0;
                while i < l1_size && map.entries.len() < map.limit {
                    let k = (l1_size - i).min(64) as usize;
                    if super::read_dev(&mut self.dev, l1_off + i * 8, &mut buf[..k * 8]).is_err() {
                        break;
                    }
                    for j in 0..k {
                        if let Ok(Some((off, _))) = decode_l1(get_u64(&buf, j), &self.geo) {
                            add(&mut map, off, cs, kind::INACTIVE_L2);
                        }
                    }
                    i += k as u64;
                }
            }
        }
        // Bitmap directory and tables, when the bitmaps extension is in force.
        if self.hdr.autoclear_features & AUTOCLEAR_BITMAPS != 0
            && let Some(ext) = self.hdr.extensions.iter().find(|e| e.kind == EXT_BITMAPS)
            && ext.data.len() >= 24
        {
            let nb = u32::from_be_bytes([ext.data[0], ext.data[1], ext.data[2], ext.data[3]]);
            let dir_size = get_u64(&ext.data[8..24], 0);
            let dir_off = get_u64(&ext.data[8..24], 1);
            // QEMU limits the directory to 64 MiB.
            if dir_size <= 64 << 20 && dir_off.checked_add(dir_size).is_some() {
                add(&mut map, dir_off, dir_size, kind::BITMAP_DIRECTORY);
                let mut at = dir_off;
                let end = dir_off + dir_size;
                for _ in 0..nb.min(65535) {
                    let mut e = [0u8; 24];
                    if at + 24 > end || super::read_dev(&mut self.dev, at, &mut e).is_err() {
                        break;
                    }
                    let table_off = get_u64(&e, 0);
                    let table_entries = u32::from_be_bytes([e[8], e[9], e[10], e[11]]) as u64;
                    let name_len = u16::from_be_bytes([e[18], e[19]]) as u64;
                    let extra = u32::from_be_bytes([e[20], e[21], e[22], e[23]]) as u64;
                    if table_entries * 8 <= 64 << 20 {
                        add(&mut map, table_off, table_entries * 8, kind::BITMAP_TABLE);
                    }
                    at += (24 + extra + name_len).div_ceil(8) * 8;
                }
            }
        }
        map.finish();
        self.meta = Some(map);
        Ok(())
    }

    /// After an L2 table at `old` was copied to `new` for writing: `new` is active, `old`
    /// now belongs to the snapshots only.
    pub(crate) fn meta_l2_copied(&mut self, old: u64, new: u64) {
        if let Some(m) = &mut self.meta {
            m.clear(old, kind::ACTIVE_L2);
            m.insert(old, kind::INACTIVE_L2);
            m.insert(new, kind::ACTIVE_L2);
        }
    }

    /// Host cluster `c` is free again (refcount 0): it holds no metadata any more.
    pub(crate) fn meta_freed(&mut self, c: u64) {
        if let Some(m) = &mut self.meta {
            m.remove(c);
        }
    }

    /// Which kinds a table of the cache may overwrite: its own.
    pub(crate) fn table_kind_bits(kind: super::cache::TableKind) -> u16 {
        use super::cache::TableKind;
        match kind {
            TableKind::L1 => kind::ACTIVE_L1,
            TableKind::L2 => kind::ACTIVE_L2,
            TableKind::RefTable => kind::REFCOUNT_TABLE,
            TableKind::RefBlock => kind::REFCOUNT_BLOCK,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{MetaMap, kind};

    #[test]
    fn map_merges_finds_clears_and_bounds() {
        let mut m = MetaMap::new(4);
        m.push(9, kind::ACTIVE_L2);
        m.push(3, kind::REFCOUNT_BLOCK);
        m.push(9, kind::INACTIVE_L2);
        m.finish();
        assert_eq!(m.find(0, 100, 0), Some((3, kind::REFCOUNT_BLOCK)));
        assert_eq!(
            m.find(4, 100, kind::ACTIVE_L2),
            Some((9, kind::INACTIVE_L2))
        );
        assert_eq!(m.find(4, 8, 0), None);
        m.insert(5, kind::SNAPSHOT_TABLE);
        m.insert(7, kind::INACTIVE_L1);
        assert_eq!(m.find(4, 6, 0), Some((5, kind::SNAPSHOT_TABLE)));
        // Full: a fifth cluster is not recorded.
        m.insert(11, kind::ACTIVE_L2);
        assert_eq!(m.find(10, 12, 0), None);
        m.clear(9, kind::INACTIVE_L2);
        assert_eq!(m.find(9, 9, 0), Some((9, kind::ACTIVE_L2)));
        m.clear(9, kind::ACTIVE_L2);
        m.remove(5);
        assert_eq!(m.find(4, 10, 0), Some((7, kind::INACTIVE_L1)));
        assert_eq!(
            super::kind_name(kind::BITMAP_TABLE | kind::HEADER),
            "the image header"
        );
    }
}
