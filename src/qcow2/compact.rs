//! Compaction: clusters near the end of the image move into free clusters nearer the start,
//! so that the image extent (and the host file cut to it) shrinks.
//!
//! A step takes the highest clusters in use, from the top down, and gives each the lowest
//! free cluster below it, until one cannot move (a blocker), no free cluster lies below, or
//! the step's budget is spent. What moves:
//! - guest data clusters (and preallocated zero clusters) with refcount 1 referenced once
//!   from an active L2 table that is not shared;
//! - active L2 tables with refcount 1 (their L1 entry is rewritten);
//! - refcount blocks (their refcount-table entry is rewritten).
//!
//! What blocks (compaction stops below it, documented in doc/status.md): the header, the
//! L1 table and the refcount table (their offsets live in the header), clusters shared
//! with internal snapshots (refcount above 1), snapshot tables, compressed clusters and
//! bitmap tables. Clusters in use that nothing references (leaks, such as the old copy of
//! a move a crash cut short) are freed instead, when the image has no snapshots and no
//! bitmaps (whose tables this engine does not follow); otherwise they block too.
//!
//! Crash safety, per move: the new cluster gets refcount 1 and the copy; a barrier makes
//! the copies durable (copied → flushed); then the references are rewritten in the cache
//! and written back in the engine's order (refcount blocks and new tables, barrier,
//! refcount-table pages with a barrier of their own, L2 tables and L1 pages, barrier)
//! (referenced); only then does the old cluster's refcount drop (the deferred-free path).
//! A power cut at any write leaves the old copy referenced or the new one, never neither:
//! at worst a leaked cluster. A step runs to its end inside one `&mut self` call and keeps
//! nothing across calls, so a guest write between steps always lands on the cluster its
//! L2 entry names at that moment, and a later step copies what is there then.

use super::cache::TableKind;
use super::entry::{COMPRESSED, COPIED, Mapping, OFFSET_MASK, decode_l1};
use super::error::{Qcow2Error, Result};
use super::header::EXT_BITMAPS;
use super::overlap::kind;
use super::{Pool, Qcow2};
use crate::block::BlockDevice;
use alloc::vec::Vec;

/// Most bytes a compaction step copies with one read and one write (a run of clusters
/// contiguous at both ends).
const COPY_RUN_BYTES: u64 = 1 << 20;

/// What one [`Qcow2::compact_step`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompactProgress {
    /// Clusters moved by this step.
    pub moved_clusters: u64,
    /// Nothing above the lowest possible extent remains to move.
    pub done: bool,
    /// Image extent in bytes before the step.
    pub extent_before: u64,
    /// Image extent in bytes after the step.
    pub extent_after: u64,
}

/// Where compaction stands (for metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CompactionState {
    /// No compaction step since open.
    #[default]
    Idle,
    /// The last step moved clusters and more remain.
    Running,
    /// The last step found nothing more to move.
    Done,
}

impl CompactionState {
    /// The state as a number for a gauge: 0 idle, 1 running, 2 done.
    pub fn as_gauge(self) -> u64 {
        match self {
            CompactionState::Idle => 0,
            CompactionState::Running => 1,
            CompactionState::Done => 2,
        }
    }

    /// The state's name (`idle`, `running`, `done`).
    pub fn name(self) -> &'static str {
        match self {
            CompactionState::Idle => "idle",
            CompactionState::Running => "running",
            CompactionState::Done => "done",
        }
    }
}

/// What a cluster at the tail holds, as far as compaction is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Holds {
    /// Not yet known (data if the L2 scan finds one reference, a leak otherwise).
    Unknown,
    /// The metadata map says: an active L2 table (its L1 entry not yet found).
    L2Expected,
    /// The metadata map says: a refcount block (its table entry not yet found).
    RefBlockExpected,
    /// Guest data referenced once: L1 index, entry index in the L2 table.
    Data { l1i: u64, idx: u32 },
    /// An active L2 table with refcount 1 at L1 index `l1i`.
    L2 { l1i: u64 },
    /// The refcount block of refcount-table index `ti`.
    RefBlock { ti: u64 },
    /// In use by nothing (a leak, e.g. the old copy of a move a crash cut short): freed,
    /// not moved.
    Leak,
    /// Cannot move.
    Blocked,
}

impl<D: BlockDevice> Qcow2<D> {
    /// One bounded, crash-safe step of compaction: moves at most `max_clusters` clusters from
    /// the image's tail into free clusters below, flushing as the order requires; `done` when
    /// nothing above the lowest possible extent remains to move.
    pub fn compact_step(&mut self, max_clusters: u64) -> Result<CompactProgress> {
        let r = self.compact_step_inner(max_clusters.max(1));
        self.note_corrupt(r)
    }

    /// Bytes that compaction could give back now (extent minus the extent after a full
    /// compaction, estimated): the free clusters inside the extent, or 0 when the last step
    /// found nothing to move and nothing was freed since.
    pub fn compactable_bytes(&mut self) -> Result<u64> {
        if self.compact_done_at == Some(self.stats.clusters_freed) {
            return Ok(0);
        }
        let s = self.space()?;
        Ok(s.free_clusters * s.cluster_size)
    }

    /// The image extent (end of the last cluster with a nonzero refcount), in bytes: what the
    /// host file may be cut to. Exact after a metadata write-back or a compaction step; in
    /// between it may be above (never below) the end of the clusters in use.
    pub fn image_extent(&self) -> u64 {
        self.end.saturating_mul(self.geo.cluster_size())
    }

    fn compact_step_inner(&mut self, max: u64) -> Result<CompactProgress> {
        self.begin_write()?;
        self.stats.compaction_steps += 1;
        // Start from a clean cache with the deferred frees applied: every later change is
        // this step's.
        self.flush_metadata()?;
        self.end = self.compute_end_below(self.end)?;
        let extent_before = self.image_extent();
        let (cands, mut holds) = self.tail_candidates(max)?;
        self.classify(&cands, &mut holds)?;
        // Plan, top down: each movable cluster gets the lowest free cluster below it.
        let mut moves: Vec<(u64, u64, Holds)> = Vec::new();
        let mut done = cands.len() < max as usize;
        let mut lo = 1;
        for i in (0..cands.len()).rev() {
            let t = cands[i];
            if matches!(
                holds[i],
                Holds::Blocked | Holds::Unknown | Holds::L2Expected | Holds::RefBlockExpected
            ) {
                done = true;
                break;
            }
            if holds[i] == Holds::Leak {
                moves.push((t, 0, Holds::Leak));
                continue;
            }
            let Some(f) = self.alloc_below(lo, t)? else {
                done = true;
                break;
            };
            lo = f + 1;
            moves.push((t, f, holds[i]));
        }
        // Leaks go without a copy; the others move.
        let leaks: Vec<u64> = moves
            .iter()
            .filter(|m| m.2 == Holds::Leak)
            .map(|m| m.0)
            .collect();
        moves.retain(|m| m.2 != Holds::Leak);
        // Sources were taken top down and targets bottom up: pair them in the same order
        // so that clusters keep their order on the host (sequential guest data stays
        // sequential). Every target is below every source.
        let n = moves.len();
        let targets: Vec<u64> = moves.iter().map(|m| m.1).collect();
        for (i, m) in moves.iter_mut().enumerate() {
            m.1 = targets[n - 1 - i];
        }
        let cs = self.geo.cluster_size();
        // Data first: copies, then a barrier so they are durable before any reference.
        // Runs contiguous at both ends are copied in one read and one write (up to
        // `COPY_RUN_BYTES`); a single cluster goes through the scratch cluster.
        let data: Vec<(u64, u64)> = moves
            .iter()
            .rev()
            .filter(|m| matches!(m.2, Holds::Data { .. }))
            .map(|m| (m.0, m.1))
            .collect();
        let run_max = (COPY_RUN_BYTES / cs).max(1) as usize;
        let mut buf: Vec<u8> = Vec::new();
        let mut scratch = core::mem::take(&mut self.scratch);
        let r = (|| -> Result<u64> {
            let mut i = 0;
            while i < data.len() {
                let (t, f) = data[i];
                let mut n = 1;
                while n < run_max
                    && i + n < data.len()
                    && data[i + n] == (t + n as u64, f + n as u64)
                {
                    n += 1;
                }
                let b: &mut [u8] = if n == 1 {
                    &mut scratch
                } else {
                    buf.resize(n * cs as usize, 0);
                    &mut buf[..n * cs as usize]
                };
                super::read_dev(&mut self.dev, t * cs, b)?;
                self.check_overlap(f * cs, n as u64 * cs, 0)?;
                super::write_dev(&mut self.dev, f * cs, b)?;
                self.stats.reclaim_copied += n as u64;
                i += n;
            }
            Ok(data.len() as u64)
        })();
        self.scratch = scratch;
        let data_moved = r?;
        if data_moved > 0 {
            self.barrier()?;
            self.stats.reclaim_flushed += data_moved;
        }
        // References to the data copies.
        for &(t, f, h) in &moves {
            if let Holds::Data { l1i, idx } = h {
                self.repoint_data(l1i, idx as usize, t, f)?;
            }
        }
        // Tables: copied in the cache (with the entries just rewritten), written as new
        // tables, then referenced.
        let mut tables = 0;
        for &(t, f, h) in &moves {
            match h {
                Holds::L2 { l1i } => self.move_l2(l1i, t, f)?,
                Holds::RefBlock { ti } => self.move_refblock(ti, t, f)?,
                _ => continue,
            }
            tables += 1;
        }
        for &(t, _, _) in &moves {
            self.queue_free(t, 1)?;
        }
        for &t in &leaks {
            self.queue_free(t, 1)?;
        }
        self.flush_metadata()?;
        if self.lazy && moves.iter().any(|m| matches!(m.2, Holds::RefBlock { .. })) {
            // The refcount table must not name a freed block: write it now, not at close.
            self.write_refcounts()?;
            self.barrier()?;
        }
        self.stats.reclaim_copied += tables;
        self.stats.reclaim_flushed += tables;
        self.stats.reclaim_referenced += moves.len() as u64;
        self.end = self.compute_end_below(self.end)?;
        self.stats.compaction_leaks_freed += leaks.len() as u64;
        let moved = moves.len() as u64;
        if done {
            self.compact_done_at = Some(self.stats.clusters_freed);
            self.stats.compaction_state = super::CompactionState::Done;
        } else {
            self.compact_done_at = None;
            self.stats.compaction_state = super::CompactionState::Running;
        }
        Ok(CompactProgress {
            moved_clusters: moved,
            done,
            extent_before,
            extent_after: self.image_extent(),
        })
    }

    /// The highest `max` clusters in use (ascending), down to the lowest free cluster, each
    /// with what the refcounts, the fixed metadata and the metadata map say of it.
    fn tail_candidates(&mut self, max: u64) -> Result<(Vec<u64>, Vec<Holds>)> {
        let floor = match self.find_free(1) {
            Ok(f) => f,
            Err(Qcow2Error::NoSpace) => self.end,
            Err(e) => return Err(e),
        };
        let cs = self.geo.cluster_size();
        let mut cands = Vec::new();
        let mut holds = Vec::new();
        let mut c = self.end;
        while c > floor && (cands.len() as u64) < max {
            c -= 1;
            let rc = self.refcount(c)?;
            if rc == 0 {
                continue;
            }
            let meta = self
                .meta
                .as_ref()
                .and_then(|m| m.find(c, c, 0))
                .map_or(0, |(_, bits)| bits);
            let h = if rc != 1 || self.fixed_overlap(c * cs, cs) != 0 {
                Holds::Blocked
            } else if meta == kind::ACTIVE_L2 {
                Holds::L2Expected
            } else if meta == kind::REFCOUNT_BLOCK {
                Holds::RefBlockExpected
            } else if meta != 0 {
                Holds::Blocked
            } else {
                Holds::Unknown
            };
            cands.push(c);
            holds.push(h);
        }
        cands.reverse();
        holds.reverse();
        Ok((cands, holds))
    }

    /// Finds who references each candidate: one pass over the active L1 and L2 tables (and
    /// the refcount table when a refcount block is among them). Anything referenced twice,
    /// compressed, or from a shared table is blocked.
    fn classify(&mut self, cands: &[u64], holds: &mut [Holds]) -> Result<()> {
        let Some(&lowest) = cands.first() else {
            return Ok(());
        };
        let cs = self.geo.cluster_size();
        let find = |c: u64| cands.binary_search(&c).ok();
        for l1i in 0..self.hdr.l1_size as u64 {
            let e = self.l1_entry(l1i)?;
            let Some((off, copied)) = decode_l1(e, &self.geo)? else {
                continue;
            };
            let tc = off / cs;
            if let Some(i) = find(tc) {
                holds[i] = match holds[i] {
                    Holds::L2Expected if copied => Holds::L2 { l1i },
                    _ => Holds::Blocked,
                };
            }
            self.check_meta_offset(off, "an L1 entry points past the device end")?;
            let s = self.load(Pool::L2, off, TableKind::L2, true)?;
            for idx in 0..self.geo.l2_entries() as usize {
                let raw = self.l2_raw_at(s, idx).0;
                if raw & COMPRESSED != 0 {
                    if let Mapping::Compressed { host, len } = self.l2_mapping_at(s, idx)? {
                        let last = (host + len.max(1) - 1) / cs;
                        if last >= lowest {
                            for c in (host / cs)..=last {
                                if let Some(i) = find(c) {
                                    holds[i] = Holds::Blocked;
                                }
                            }
                        }
                    }
                    continue;
                }
                let hc = (raw & OFFSET_MASK) / cs;
                if hc < lowest || raw & OFFSET_MASK == 0 {
                    continue;
                }
                let Some(i) = find(hc) else {
                    continue;
                };
                let m = self.l2_mapping_at(s, idx)?;
                holds[i] = match (holds[i], m.host_cluster()) {
                    (Holds::Unknown, Some(_)) if copied => Holds::Data {
                        l1i,
                        idx: idx as u32,
                    },
                    _ => Holds::Blocked,
                };
            }
        }
        if holds
            .iter()
            .any(|h| matches!(h, Holds::RefBlockExpected | Holds::Unknown))
        {
            for ti in 0..self.rt_entries {
                let Some(b) = self.rt_entry(ti)? else {
                    continue;
                };
                if let Some(i) = find(b / cs) {
                    holds[i] = match holds[i] {
                        Holds::RefBlockExpected => Holds::RefBlock { ti },
                        _ => Holds::Blocked,
                    };
                }
            }
        }
        // What nothing references is a leak, if nothing this engine does not read could
        // reference it: no snapshots (their tables and data), no bitmaps.
        let may_free_leaks = self.hdr.nb_snapshots == 0
            && !self.hdr.extensions.iter().any(|e| e.kind == EXT_BITMAPS)
            && self.meta.is_some();
        for h in holds.iter_mut() {
            if *h == Holds::Unknown {
                *h = if may_free_leaks {
                    Holds::Leak
                } else {
                    Holds::Blocked
                };
            }
        }
        Ok(())
    }

    /// Allocates the lowest free cluster at or above `from` and below `below` (refcount 1),
    /// or `None` when there is none.
    fn alloc_below(&mut self, from: u64, below: u64) -> Result<Option<u64>> {
        loop {
            let f = match self.find_free(from) {
                Ok(f) => f,
                Err(Qcow2Error::NoSpace) => return Ok(None),
                Err(e) => return Err(e),
            };
            if f >= below {
                return Ok(None);
            }
            if self.ensure_blocks(f, 1)? {
                continue; // a new refcount block may have taken it
            }
            self.set_refcount(f, 1)?;
            self.note_alloc(f);
            self.note_zero_use(f, 1);
            self.stats.clusters_allocated += 1;
            return Ok(Some(f));
        }
    }

    /// Points L2 entry `idx` of the table at L1 index `l1i` from host cluster `from` to `to`.
    fn repoint_data(&mut self, l1i: u64, idx: usize, from: u64, to: u64) -> Result<()> {
        let cs = self.geo.cluster_size();
        let e = self.l1_entry(l1i)?;
        let Some((off, true)) = decode_l1(e, &self.geo)? else {
            return Err(Qcow2Error::Corrupt(
                "compaction: an L2 table changed under a move",
            ));
        };
        let s = self.load(Pool::L2, off, TableKind::L2, true)?;
        let (old, bitmap) = self.l2_raw_at(s, idx);
        if old & OFFSET_MASK != from * cs {
            return Err(Qcow2Error::Corrupt(
                "compaction: an L2 entry changed under a move",
            ));
        }
        let new = (old & !OFFSET_MASK) | (to * cs) | COPIED;
        self.put_l2_raw(s, idx, (new, bitmap));
        Ok(())
    }

    /// Records in the metadata map that a table of kind `bits` moved from cluster `from` to
    /// `to` (the old cluster, about to be freed, holds nothing in use any more).
    fn meta_move(&mut self, from: u64, to: u64, bits: u16) {
        if let Some(m) = &mut self.meta {
            m.clear(from, bits);
            m.insert(to, bits);
        }
    }

    /// Moves the L2 table of L1 index `l1i` from cluster `from` to `to` (allocated).
    fn move_l2(&mut self, l1i: u64, from: u64, to: u64) -> Result<()> {
        let cs = self.geo.cluster_size();
        let s = self.load(Pool::L2, from * cs, TableKind::L2, true)?;
        let mut scratch = core::mem::take(&mut self.scratch);
        scratch.copy_from_slice(self.l2c.data(s));
        let r = self.load(Pool::L2, to * cs, TableKind::L2, false);
        if let Ok(ns) = r {
            self.l2c.data_mut(ns).copy_from_slice(&scratch);
        }
        self.scratch = scratch;
        r?;
        self.meta_move(from, to, kind::ACTIVE_L2);
        self.set_l1_entry(l1i, (to * cs) | COPIED)?;
        // The old copy is not written again (a write-back on eviction above may have
        // written it: harmless, the L1 table on disk names it until the new entry is).
        self.l2c.forget(from * cs);
        Ok(())
    }

    /// Moves refcount block `ti` from cluster `from` to `to` (allocated, its refcount
    /// already counted, in this block or another).
    fn move_refblock(&mut self, ti: u64, from: u64, to: u64) -> Result<()> {
        let cs = self.geo.cluster_size();
        let s = self.load(Pool::Rc, from * cs, TableKind::RefBlock, true)?;
        let mut scratch = core::mem::take(&mut self.scratch);
        scratch.copy_from_slice(self.rcc.data(s));
        let r = self.load(Pool::Rc, to * cs, TableKind::RefBlock, false);
        if let Ok(ns) = r {
            self.rcc.data_mut(ns).copy_from_slice(&scratch);
        }
        self.scratch = scratch;
        r?;
        self.meta_move(from, to, kind::REFCOUNT_BLOCK);
        self.set_rt_entry(ti, to * cs)?;
        // Changes made to the old copy since the last write-back live on in the new one,
        // which the refcount table names on disk only once the new block is written. Only
        // now is the old copy dropped: an eviction above wrote both or neither.
        self.rcc.forget(from * cs);
        Ok(())
    }
}
