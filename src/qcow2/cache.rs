//! Bounded write-back caches of cluster-sized metadata tables (L1 pages, L2 tables,
//! refcount-table pages, refcount blocks), keyed by host offset.
//!
//! Lookups are O(1) (an open-addressing index); eviction is the clock algorithm (LRU-ish,
//! second chance). Slots are allocated on first use up to the configured budget and then
//! reused, so a steady-state request allocates nothing. The cache never writes by itself:
//! the engine decides when dirty tables go to disk, because the order matters.

use alloc::vec;
use alloc::vec::Vec;

/// What a cached cluster holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableKind {
    /// A cluster of the active L1 table.
    L1,
    /// An L2 table.
    L2,
    /// A cluster of the refcount table.
    RefTable,
    /// A refcount block.
    RefBlock,
}

/// One cached cluster.
#[derive(Debug)]
pub struct Slot {
    /// Host offset of the cluster.
    pub key: u64,
    /// What it holds.
    pub kind: TableKind,
    /// The cluster's bytes as on disk.
    pub data: Vec<u8>,
    /// Changed since it was read or written.
    pub dirty: bool,
    /// A newly allocated table never written yet: nothing on disk points to it.
    pub fresh: bool,
    /// Byte range changed since the slot was read or written (`lo..hi`; empty when clean).
    dirty_lo: usize,
    dirty_hi: usize,
    referenced: bool,
    used: bool,
}

/// Fewest slots a cache has whatever its byte budget (an operation touches at most a few
/// tables of one cache at a time).
pub const MIN_SLOTS: usize = 4;

const EMPTY: u32 = u32::MAX;

/// Write-back granularity: dirty ranges are widened to whole sectors of this size.
const SECTOR: usize = 512;

/// An open-addressing map from host offset to slot number, linear probing, backward-shift
/// deletion (no tombstones).
#[derive(Debug)]
struct Index {
    keys: Vec<u64>,
    vals: Vec<u32>,
    shift: u32,
}

impl Index {
    fn new(min_capacity: usize) -> Self {
        let cap = (min_capacity * 2).next_power_of_two().max(8);
        Index {
            keys: vec![0; cap],
            vals: vec![EMPTY; cap],
            shift: 64 - cap.trailing_zeros(),
        }
    }

    fn mask(&self) -> usize {
        self.keys.len() - 1
    }

    fn home(&self, key: u64) -> usize {
        ((key >> 9).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> self.shift) as usize
    }

    fn get(&self, key: u64) -> Option<usize> {
        let mut i = self.home(key);
        loop {
            let v = self.vals[i];
            if v == EMPTY {
                return None;
            }
            if self.keys[i] == key {
                return Some(v as usize);
            }
            i = (i + 1) & self.mask();
        }
    }

    fn insert(&mut self, key: u64, val: usize) {
        let mut i = self.home(key);
        while self.vals[i] != EMPTY && self.keys[i] != key {
            i = (i + 1) & self.mask();
        }
        self.keys[i] = key;
        self.vals[i] = val as u32;
    }

    fn remove(&mut self, key: u64) {
        let mask = self.mask();
        let mut i = self.home(key);
        loop {
            if self.vals[i] == EMPTY {
                return;
            }
            if self.keys[i] == key {
                break;
            }
            i = (i + 1) & mask;
        }
        // Backward shift: pull later entries of the probe chain into the hole.
        let mut hole = i;
        let mut j = (i + 1) & mask;
        while self.vals[j] != EMPTY {
            let home = self.home(self.keys[j]);
            // Move j into the hole if its home is not in (hole, j] cyclically.
            let between = if hole <= j {
                home > hole && home <= j
            } else {
                home > hole || home <= j
            };
            if !between {
                self.keys[hole] = self.keys[j];
                self.vals[hole] = self.vals[j];
                hole = j;
            }
            j = (j + 1) & mask;
        }
        self.vals[hole] = EMPTY;
    }
}

/// A bounded cache of cluster-sized tables.
#[derive(Debug)]
pub struct TableCache {
    slots: Vec<Slot>,
    free: Vec<usize>,
    max_slots: usize,
    index: Index,
    hand: usize,
    cluster_size: usize,
}

impl TableCache {
    /// A cache of at most `budget_bytes` (at least [`MIN_SLOTS`] tables).
    pub fn new(cluster_size: usize, budget_bytes: u64) -> Self {
        let max_slots = ((budget_bytes / cluster_size as u64) as usize).clamp(MIN_SLOTS, 1 << 20);
        TableCache {
            slots: Vec::new(),
            free: Vec::new(),
            max_slots,
            index: Index::new(max_slots),
            hand: 0,
            cluster_size,
        }
    }

    /// Most tables the cache holds.
    pub fn capacity(&self) -> usize {
        self.max_slots
    }

    /// The slot holding `key`, marking it recently used.
    #[inline]
    pub fn get(&mut self, key: u64) -> Option<usize> {
        let s = self.index.get(key)?;
        self.slots[s].referenced = true;
        Some(s)
    }

    /// Whether slot `s` still holds `key` (for callers that remember a slot).
    #[inline]
    pub fn is_live(&self, s: usize, key: u64) -> bool {
        self.slots.get(s).is_some_and(|x| x.used && x.key == key)
    }

    /// Whether `key` is cached (without touching its age).
    pub fn contains(&self, key: u64) -> bool {
        self.index.get(key).is_some()
    }

    /// The slot a new table would go to, if that means evicting one: `None` when there is
    /// still room. The caller writes the victim back if it is dirty, then calls
    /// [`TableCache::install`].
    pub fn victim(&mut self) -> Option<usize> {
        if !self.free.is_empty() || self.slots.len() < self.max_slots {
            return None;
        }
        let n = self.slots.len();
        loop {
            let s = self.hand;
            self.hand = (self.hand + 1) % n;
            let slot = &mut self.slots[s];
            if slot.referenced {
                slot.referenced = false;
            } else {
                return Some(s);
            }
        }
    }

    /// Puts a table for `key` into the cache (evicting `victim` if given, which must be
    /// clean by now) and returns its slot. Its bytes are left for the caller to fill.
    pub fn install(&mut self, key: u64, kind: TableKind, victim: Option<usize>) -> usize {
        let s = match victim {
            Some(v) => {
                let old = self.slots[v].key;
                if self.slots[v].used {
                    self.index.remove(old);
                }
                v
            }
            None => match self.free.pop() {
                Some(f) => f,
                None => {
                    self.slots.push(Slot {
                        key,
                        kind,
                        data: vec![0; self.cluster_size],
                        dirty: false,
                        fresh: false,
                        dirty_lo: 0,
                        dirty_hi: 0,
                        referenced: true,
                        used: true,
                    });
                    self.slots.len() - 1
                }
            },
        };
        let slot = &mut self.slots[s];
        slot.key = key;
        slot.kind = kind;
        slot.dirty = false;
        slot.fresh = false;
        slot.dirty_lo = 0;
        slot.dirty_hi = 0;
        slot.referenced = true;
        slot.used = true;
        self.index.insert(key, s);
        s
    }

    /// Drops `key` from the cache without writing it (its cluster was freed).
    pub fn forget(&mut self, key: u64) {
        if let Some(s) = self.index.get(key) {
            self.index.remove(key);
            let slot = &mut self.slots[s];
            slot.used = false;
            slot.dirty = false;
            slot.fresh = false;
            slot.dirty_lo = 0;
            slot.dirty_hi = 0;
            slot.referenced = false;
            self.free.push(s);
        }
    }

    /// Drops everything (after a failed operation or before a rebuild). Dirty tables are lost.
    pub fn clear(&mut self) {
        for s in 0..self.slots.len() {
            if self.slots[s].used {
                let key = self.slots[s].key;
                self.forget(key);
            }
        }
    }

    /// The slot's bytes.
    #[inline]
    pub fn data(&self, slot: usize) -> &[u8] {
        &self.slots[slot].data
    }

    /// The slot's bytes for changing; marks the whole table dirty (it is written whole).
    #[inline]
    pub fn data_mut(&mut self, slot: usize) -> &mut [u8] {
        let len = self.cluster_size;
        self.data_mut_range(slot, 0, len)
    }

    /// The slot's bytes for changing, marking only bytes `lo..hi` dirty: the caller
    /// promises to change nothing outside them. Write-back then covers only the 512-byte
    /// sectors holding the dirty bytes.
    #[inline]
    pub fn data_mut_range(&mut self, slot: usize, lo: usize, hi: usize) -> &mut [u8] {
        let s = &mut self.slots[slot];
        let hi = hi.min(s.data.len());
        let lo = lo.min(hi);
        if s.dirty {
            s.dirty_lo = s.dirty_lo.min(lo);
            s.dirty_hi = s.dirty_hi.max(hi);
        } else {
            s.dirty = true;
            s.dirty_lo = lo;
            s.dirty_hi = hi;
        }
        &mut s.data
    }

    /// The part of the slot's bytes to write back: the dirty range widened to whole
    /// 512-byte sectors (so a sector-based device needs no read-modify-write), as a byte
    /// range of the table. The whole table when it is fresh (never written yet).
    pub fn dirty_span(&self, slot: usize) -> (usize, usize) {
        let s = &self.slots[slot];
        let len = s.data.len();
        if s.fresh {
            return (0, len);
        }
        let lo = s.dirty_lo & !(SECTOR - 1);
        let hi = s.dirty_hi.div_ceil(SECTOR) * SECTOR;
        (lo.min(len), hi.min(len))
    }

    /// The slot's bytes for filling from disk (does not mark it dirty).
    pub fn fill(&mut self, slot: usize) -> &mut [u8] {
        &mut self.slots[slot].data
    }

    /// The slot.
    pub fn slot(&self, slot: usize) -> &Slot {
        &self.slots[slot]
    }

    /// Marks a slot clean (it was written).
    pub fn mark_clean(&mut self, slot: usize) {
        let s = &mut self.slots[slot];
        s.dirty = false;
        s.fresh = false;
        s.dirty_lo = 0;
        s.dirty_hi = 0;
    }

    /// Marks a slot as a newly allocated table that nothing on disk points to yet.
    pub fn mark_fresh(&mut self, slot: usize) {
        self.slots[slot].fresh = true;
    }

    /// Slots that are dirty and of `kind` (only fresh ones with `fresh_only`), by host
    /// offset (so write-back is sequential).
    pub fn dirty_slots(&self, kind: TableKind, fresh_only: bool, out: &mut Vec<(u64, usize)>) {
        out.clear();
        for (i, s) in self.slots.iter().enumerate() {
            if s.used && s.dirty && s.kind == kind && (s.fresh || !fresh_only) {
                out.push((s.key, i));
            }
        }
        out.sort_unstable();
    }

    /// Whether any slot is dirty.
    pub fn any_dirty(&self) -> bool {
        self.slots.iter().any(|s| s.used && s.dirty)
    }

    /// Bytes the cache holds now.
    pub fn resident_bytes(&self) -> u64 {
        (self.slots.len() * self.cluster_size) as u64
    }
}

/// Reads the big-endian u64 at entry `i` of a table.
#[inline]
pub fn get_u64(data: &[u8], i: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&data[i * 8..i * 8 + 8]);
    u64::from_be_bytes(b)
}

/// Writes the big-endian u64 at entry `i` of a table.
#[inline]
pub fn set_u64(data: &mut [u8], i: usize, v: u64) {
    data[i * 8..i * 8 + 8].copy_from_slice(&v.to_be_bytes());
}

/// Reads refcount entry `i` of a block whose entries are `1 << order` bits wide.
#[inline]
pub fn get_refcount(data: &[u8], i: usize, order: u32) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let bit = i * bits;
            let byte = data[bit / 8];
            ((byte >> (bit % 8)) & ((1u16 << bits) - 1) as u8) as u64
        }
        3 => data[i] as u64,
        4 => u16::from_be_bytes([data[2 * i], data[2 * i + 1]]) as u64,
        5 => {
            let mut b = [0u8; 4];
            b.copy_from_slice(&data[4 * i..4 * i + 4]);
            u32::from_be_bytes(b) as u64
        }
        _ => get_u64(data, i),
    }
}

/// The index of the last nonzero refcount in a refcount block of width `2^order` bits,
/// found a 64-bit word at a time (whatever the width, the last nonzero byte belongs to it).
pub fn last_nonzero_refcount(data: &[u8], order: u32) -> Option<usize> {
    let w = data
        .chunks_exact(8)
        .rposition(|w| u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]) != 0)?;
    let b = (w * 8..w * 8 + 8).rev().find(|&b| data[b] != 0)?;
    // Sub-byte entries fill a byte from its low bits up: the highest set bit is the last
    // entry; wider entries start on a byte multiple of their width.
    let top = 7 - data[b].leading_zeros() as usize;
    Some((b * 8 + top) >> order)
}

/// Writes refcount entry `i` (the value must fit the width).
#[inline]
pub fn set_refcount(data: &mut [u8], i: usize, order: u32, v: u64) {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let bit = i * bits;
            let mask = (((1u16 << bits) - 1) as u8) << (bit % 8);
            let byte = &mut data[bit / 8];
            *byte = (*byte & !mask) | (((v as u8) << (bit % 8)) & mask);
        }
        3 => data[i] = v as u8,
        4 => data[2 * i..2 * i + 2].copy_from_slice(&(v as u16).to_be_bytes()),
        5 => data[4 * i..4 * i + 4].copy_from_slice(&(v as u32).to_be_bytes()),
        _ => set_u64(data, i, v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_insert_remove_many() {
        let mut idx = Index::new(64);
        for k in 0..64u64 {
            idx.insert(k * 512 * 7, k as usize);
        }
        for k in (0..64u64).step_by(3) {
            idx.remove(k * 512 * 7);
        }
        for k in 0..64u64 {
            let want = (k % 3 != 0).then_some(k as usize);
            assert_eq!(idx.get(k * 512 * 7), want, "key {k}");
        }
    }

    #[test]
    fn refcount_widths_round_trip() {
        for order in 0..=6u32 {
            let mut d = vec![0u8; 512];
            let n = (512 * 8) >> order;
            let max = if order == 6 {
                u64::MAX
            } else {
                (1u64 << (1 << order)) - 1
            };
            for i in 0..n {
                set_refcount(&mut d, i, order, (i as u64 * 7 + 1) & max);
            }
            for i in 0..n {
                assert_eq!(get_refcount(&d, i, order), (i as u64 * 7 + 1) & max);
            }
        }
    }

    #[test]
    fn last_nonzero_refcount_every_position_and_width() {
        for order in 0..=6u32 {
            let n = (512 * 8) >> order;
            let max = if order == 6 {
                u64::MAX
            } else {
                (1u64 << (1 << order)) - 1
            };
            let mut d = vec![0u8; 512];
            assert_eq!(last_nonzero_refcount(&d, order), None);
            for i in 0..n {
                // Lowest and highest value, alone and with an earlier entry set.
                for (v, earlier) in [(1, false), (max, false), (1, true), (max >> 1 | 1, true)] {
                    d.fill(0);
                    if earlier && i > 0 {
                        set_refcount(&mut d, i - 1, order, max);
                        set_refcount(&mut d, 0, order, 1);
                    }
                    set_refcount(&mut d, i, order, v);
                    assert_eq!(
                        last_nonzero_refcount(&d, order),
                        Some(i),
                        "order {order}, entry {i}, value {v:#x}"
                    );
                }
            }
        }
    }

    #[test]
    fn clock_evicts_within_budget() {
        let mut c = TableCache::new(512, 512 * 4);
        for k in 0..10u64 {
            let v = c.victim();
            let s = c.install(k * 512, TableKind::L2, v);
            c.fill(s)[0] = k as u8;
        }
        assert_eq!(c.resident_bytes(), 2048);
        let s = c.get(9 * 512).expect("latest stays");
        assert_eq!(c.data(s)[0], 9);
    }
}
