//! Consistency check and repair, reporting what `qemu-img check` reports: leaked clusters,
//! corruptions (references past the end, refcounts too low, overlapping metadata, wrong
//! COPIED flags) and, after repair, what was fixed.
//!
//! The check counts every reference the image's metadata makes (header, L1 tables of the
//! active state and of snapshots, L2 tables, data and compressed clusters, the refcount
//! table and blocks, the snapshot table, the bitmap directory, tables and data) and compares the counts with the stored refcounts.

use super::cache::{TableKind, get_refcount, get_u64, set_u64};
use super::entry::{COPIED, Mapping, OFFSET_MASK, decode_l1};
use super::error::{Qcow2Error, Result};
use super::{Pool, Qcow2};
use crate::block::BlockDevice;
use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

/// Most messages a report keeps.
const MAX_MESSAGES: usize = 100;
/// Most snapshots a check walks (QEMU's limit).
const MAX_SNAPSHOTS: u32 = 65536;

const F_DATA: u8 = 1;
const F_L2: u8 = 2;
const F_META: u8 = 4;

/// The result of [`Qcow2::check`] or [`Qcow2::repair`], in `qemu-img check` terms.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Inconsistencies that can lose data (refcount too low, references past the end,
    /// overlapping metadata, wrong COPIED flags, invalid entries). After a repair: what is left.
    pub corruptions: u64,
    /// Clusters whose refcount is higher than their references (space lost, data safe).
    pub leaks: u64,
    /// Errors that stopped parts of the check (unreadable tables).
    pub check_errors: u64,
    /// Corruptions a repair fixed.
    pub corruptions_fixed: u64,
    /// Leaks a repair fixed.
    pub leaks_fixed: u64,
    /// End of the last cluster in use.
    pub image_end_offset: u64,
    /// Guest clusters of the virtual disk.
    pub total_clusters: u64,
    /// Guest clusters with a host cluster (data, compressed, preallocated zero).
    pub allocated_clusters: u64,
    /// Allocated guest clusters not contiguous with the previous one on the host.
    pub fragmented_clusters: u64,
    /// Compressed guest clusters.
    pub compressed_clusters: u64,
    /// What was found, one line each (the first 100).
    pub messages: Vec<String>,
    /// Lines past the first 100, not kept.
    pub messages_dropped: u64,
}

impl CheckReport {
    /// No corruptions, no leaks, no check errors.
    pub fn is_clean(&self) -> bool {
        self.corruptions == 0 && self.leaks == 0 && self.check_errors == 0
    }

    fn note(&mut self, msg: String) {
        if self.messages.len() < MAX_MESSAGES {
            self.messages.push(msg);
        } else {
            self.messages_dropped += 1;
        }
    }
}

impl fmt::Display for CheckReport {
    /// The lines `qemu-img check` prints (its messages go to stderr, the rest to stdout).
    /// The last line has no line break.
    fn fmt(&self, out: &mut fmt::Formatter<'_>) -> fmt::Result {
        use core::fmt::Write;
        let mut text = String::new();
        let f = &mut text;
        for m in &self.messages {
            writeln!(f, "{m}")?;
        }
        if self.messages_dropped > 0 {
            writeln!(f, "({} more lines not shown)", self.messages_dropped)?;
        }
        if self.corruptions_fixed > 0 || self.leaks_fixed > 0 {
            writeln!(
                f,
                "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...",
                self.leaks_fixed, self.corruptions_fixed
            )?;
        }
        if self.is_clean() {
            writeln!(f, "No errors were found on the image.")?;
        } else {
            if self.corruptions > 0 {
                writeln!(
                    f,
                    "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.",
                    self.corruptions
                )?;
            }
            if self.leaks > 0 {
                writeln!(
                    f,
                    "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.",
                    self.leaks
                )?;
            }
            if self.check_errors > 0 {
                writeln!(
                    f,
                    "\n{} internal errors have occurred during the check.",
                    self.check_errors
                )?;
            }
        }
        // Like qemu-img: no fragmentation line without allocated clusters, no end offset
        // when it is unknown.
        if self.total_clusters != 0 && self.allocated_clusters != 0 {
            writeln!(
                f,
                "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
                self.allocated_clusters,
                self.total_clusters,
                pct(self.allocated_clusters, self.total_clusters),
                pct(self.fragmented_clusters, self.allocated_clusters),
                pct(self.compressed_clusters, self.allocated_clusters)
            )?;
        }
        if self.image_end_offset != 0 {
            writeln!(f, "Image end offset: {}", self.image_end_offset)?;
        }
        out.write_str(text.trim_end_matches('\n'))
    }
}

fn pct(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 * 100.0 / b as f64
    }
}

/// Expected references per host cluster: dense up to a little past the refcounted end of
/// the image, sparse (bounded) beyond it, where only corrupt references can point.
struct Refs {
    counts: Vec<u16>,
    flags: Vec<u8>,
    sparse: BTreeMap<u64, (u16, u8)>,
    /// Clusters tracked densely.
    dense_cap: u64,
    /// Most sparse entries.
    sparse_max: usize,
    /// Clusters on the device.
    dev_clusters: u64,
    /// References that could not be tracked within the memory limit.
    beyond_limit: u64,
    /// Cluster size in bytes.
    cs: u64,
    /// Length of the stored data (a file's length; a fixed device's capacity).
    file_len: u64,
    /// Clusters the check compares (QEMU's `nb_clusters`): those the file covers, grown by
    /// references that end less than a cluster past its end.
    nb: u64,
    /// Clusters referenced past the end of the file (not counted; a repair must not
    /// allocate them). Bounded like `sparse`.
    past_eof: BTreeMap<u64, ()>,
}

/// The cluster's refcount block has been compared (duplicate table entries are skipped).
const F_SCANNED: u8 = 8;
/// The L2 table has been walked from the active L1 table.
const F_ACTIVE: u8 = 16;

impl Refs {
    /// Counts a reference to cluster `c`; false when `c` lies past the device end.
    fn add(&mut self, c: u64, flag: u8) -> bool {
        if c >= self.dev_clusters {
            return false;
        }
        self.nb = self.nb.max(c + 1);
        if c < self.dense_cap {
            let i = c as usize;
            if i >= self.counts.len() {
                let n = (i + 1)
                    .max(self.counts.len() * 2)
                    .min(self.dense_cap as usize);
                self.counts.resize(n, 0);
                self.flags.resize(n, 0);
            }
            self.counts[i] = self.counts[i].saturating_add(1);
            self.flags[i] |= flag;
        } else if self.sparse.len() < self.sparse_max || self.sparse.contains_key(&c) {
            let e = self.sparse.entry(c).or_insert((0, 0));
            e.0 = e.0.saturating_add(1);
            e.1 |= flag;
        } else {
            self.beyond_limit += 1;
        }
        true
    }

    fn get(&self, c: u64) -> u64 {
        match self.counts.get(c as usize) {
            Some(&n) => n as u64,
            None => self.sparse.get(&c).map_or(0, |e| e.0 as u64),
        }
    }

    fn flags(&self, c: u64) -> u8 {
        match self.flags.get(c as usize) {
            Some(&f) => f,
            None => self.sparse.get(&c).map_or(0, |e| e.1),
        }
    }

    fn set_flag(&mut self, c: u64, f: u8) {
        if let Some(x) = self.flags.get_mut(c as usize) {
            *x |= f;
        } else if let Some(e) = self.sparse.get_mut(&c) {
            e.1 |= f;
        }
    }

    /// Every referenced cluster, in order.
    fn referenced(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.counts
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(c, &n)| (c as u64, n as u64))
            .chain(self.sparse.iter().map(|(&c, e)| (c, e.0 as u64)))
    }

    /// Whether `size` bytes at `off` end a cluster or more past the end of the file: QEMU
    /// lets the last cluster of an image be cut short, nothing more.
    fn beyond_file(&self, off: u64, size: u64) -> bool {
        off.saturating_add(size) >= self.file_len.saturating_add(self.cs)
    }

    /// Counts the clusters of `size` bytes at `off` (at least one byte), QEMU's way: a
    /// region past the end of the file is a corruption, reported and not counted (its
    /// clusters are remembered so that a repair does not allocate them). False when the
    /// region was not counted (past the end of the file or of the device).
    fn count(&mut self, off: u64, size: u64, flag: u8, rep: &mut CheckReport) -> bool {
        let size = size.max(1);
        if self.beyond_file(off, size) {
            rep.corruptions += 1;
            rep.note(format!(
                "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset {off:#x} size {size:#x}"
            ));
            let first = off / self.cs;
            let last = off.saturating_add(size - 1) / self.cs;
            for c in first..=last.min(first + 64) {
                if self.past_eof.len() < self.sparse_max {
                    self.past_eof.insert(c, ());
                }
            }
            return false;
        }
        let first = off / self.cs;
        let last = (off + size - 1) / self.cs;
        (first..=last).all(|c| self.add(c, flag))
    }
}

impl<D: BlockDevice> Qcow2<D> {
    /// Checks the image's consistency without changing it (dirty metadata is written back
    /// first so the check sees what the disk holds).
    pub fn check(&mut self) -> Result<CheckReport> {
        self.flush_metadata()?;
        let mut rep = CheckReport::default();
        let mut refs = self.collect(false, &mut rep)?;
        self.compare(&mut refs, &mut rep)?;
        self.check_copied(false, &mut rep)?;
        Ok(rep)
    }

    /// Repairs the image: clears references past the end and invalid entries, sets every
    /// refcount to the number of references (fixing leaks and refcounts that are too low or
    /// too high, allocating refcount blocks where needed), fixes COPIED flags; then checks
    /// again. The report's `corruptions`/`leaks` are what is left, `*_fixed` what was fixed.
    pub fn repair(&mut self) -> Result<CheckReport> {
        if self.read_only {
            return Err(Qcow2Error::ReadOnly);
        }
        self.repairing = true;
        let mut r = self.repair_inner();
        // A pass that made the file longer (a refcount block that lay outside it) can bring
        // tables that were past the end back in: their refcounts need another pass.
        for _ in 0..2 {
            let prev = match r {
                Ok(p) if p.corruptions > 0 && p.corruptions_fixed > 0 => p,
                other => {
                    r = other;
                    break;
                }
            };
            r = match self.repair_inner() {
                Ok(next) if next.corruptions_fixed == 0 && next.leaks_fixed == 0 => {
                    r = Ok(prev);
                    break;
                }
                Ok(mut next) => {
                    next.corruptions_fixed += prev.corruptions_fixed;
                    next.leaks_fixed += prev.leaks_fixed;
                    let mut messages = prev.messages;
                    messages.append(&mut next.messages);
                    next.messages_dropped +=
                        prev.messages_dropped + messages.len().saturating_sub(MAX_MESSAGES) as u64;
                    messages.truncate(MAX_MESSAGES);
                    next.messages = messages;
                    Ok(next)
                }
                Err(e) => Err(e),
            };
        }
        self.repairing = false;
        let after = r?;
        if after.corruptions == 0 && after.check_errors == 0 && self.corrupt {
            // Consistent again: lift the corrupt mark.
            self.hdr.incompatible_features &= !super::header::INCOMPAT_CORRUPT;
            self.write_header()?;
            self.barrier()?;
            self.corrupt = false;
        }
        Ok(after)
    }

    fn repair_inner(&mut self) -> Result<CheckReport> {
        self.begin_write()?;
        self.flush_metadata()?;
        // Repair changes references and refcounts wholesale: recount space afterwards.
        self.tally = None;
        let mut before = CheckReport::default();
        let refs = self.collect(true, &mut before)?;
        if refs.beyond_limit > 0 {
            return Err(Qcow2Error::TooLarge(
                "the image references more clusters than the check memory limit allows",
            ));
        }
        self.flush_metadata()?;
        self.compare_and_fix(refs, &mut before)?;
        self.check_copied(true, &mut before)?;
        self.flush_all()?;
        let mut after = self.check()?;
        after.corruptions_fixed = before.corruptions.saturating_sub(after.corruptions);
        after.leaks_fixed = before.leaks.saturating_sub(after.leaks);
        let mut messages = before.messages;
        messages.append(&mut after.messages);
        after.messages_dropped +=
            before.messages_dropped + messages.len().saturating_sub(MAX_MESSAGES) as u64;
        messages.truncate(MAX_MESSAGES);
        after.messages = messages;
        Ok(after)
    }

    /// Rebuilds refcounts from the references (after a crash with lazy refcounts).
    pub(crate) fn rebuild_refcounts(&mut self) -> Result<()> {
        self.repair().map(drop)
    }

    /// Counts every reference. With `fix`, invalid, out-of-range and overlapping entries
    /// are cleared.
    fn collect(&mut self, fix: bool, rep: &mut CheckReport) -> Result<Refs> {
        let cs = self.geo.cluster_size();
        let limit = self.opts.check_memory_limit / 3;
        let end = self.compute_end().unwrap_or(self.end).max(self.end);
        let file_len = self.file_len();
        let mut refs = Refs {
            counts: Vec::new(),
            flags: Vec::new(),
            sparse: BTreeMap::new(),
            dense_cap: (end + 1024).min(limit).min(self.dev_span),
            sparse_max: (self.opts.check_memory_limit / 64) as usize,
            dev_clusters: self.dev_span,
            beyond_limit: 0,
            cs,
            file_len,
            nb: file_len.div_ceil(cs),
            past_eof: BTreeMap::new(),
        };
        rep.total_clusters = self.hdr.size.div_ceil(cs);
        // Fixed metadata: header, active L1 table, refcount table.
        refs.count(0, cs, F_META, rep);
        if self.hdr.l1_size > 0 {
            let l1_bytes = self.hdr.l1_size as u64 * 8;
            refs.count(self.hdr.l1_table_offset, l1_bytes, F_META, rep);
        }
        let rt_bytes = self.hdr.refcount_table_clusters as u64 * cs;
        if rt_bytes > 0 {
            refs.count(self.hdr.refcount_table_offset, rt_bytes, F_META, rep);
        }
        // Refcount blocks.
        for ti in 0..self.rt_entries {
            let byte = ti * 8;
            let page = self.hdr.refcount_table_offset + (byte & !(cs - 1));
            let i = ((byte & (cs - 1)) / 8) as usize;
            let s = self.load(Pool::Rc, page, TableKind::RefTable, true)?;
            let e = get_u64(self.rcc.data(s), i);
            if e == 0 {
                continue;
            }
            let bad = e & (cs - 1) != 0 || e < cs || e / cs >= self.dev_span;
            let shared = !bad && refs.get(e / cs) > 0;
            if bad || shared {
                rep.corruptions += 1;
                if shared {
                    rep.note(format!(
                        "ERROR overlapping metadata: refcount block {ti} at {e:#x} is used by another structure"
                    ));
                } else {
                    rep.note(format!(
                        "ERROR refcount block {ti} at offset {e:#x} is invalid or past the end of the image"
                    ));
                }
                if fix {
                    let s = self.load(Pool::Rc, page, TableKind::RefTable, true)?;
                    set_u64(self.rcc.data_mut(s), i, 0);
                }
                if bad || fix {
                    continue;
                }
            }
            if e / cs >= refs.nb {
                // Past the end of the file: it reads as zeros. Like QEMU, a repair makes
                // the file long enough to hold it (zeros), and the refcount pass fills it.
                rep.corruptions += 1;
                rep.note(format!(
                    "{} refcount block {ti} is outside image",
                    if fix { "Repairing" } else { "ERROR" }
                ));
                if !fix {
                    continue;
                }
                if e / cs >= refs.dense_cap {
                    // Far past anything in use (hostile): the entry is cleared instead of
                    // growing the file that far; the refcount pass allocates a new block.
                    let s = self.load(Pool::Rc, page, TableKind::RefTable, true)?;
                    set_u64(self.rcc.data_mut(s), i, 0);
                    continue;
                }
                super::write_dev(&mut self.dev, e, &vec![0u8; cs as usize])?;
                refs.file_len = refs.file_len.max(e + cs);
                refs.nb = refs.nb.max(refs.file_len.div_ceil(cs));
            }
            refs.add(e / cs, F_META);
        }
        // Snapshot table and snapshots (their L1/L2 tables and data).
        self.walk_snapshots(&mut refs, rep)?;
        // The bitmaps extension: directory, bitmap tables, bitmap data.
        let (regions, err) = self.bitmap_regions();
        for (off, len) in regions {
            refs.count(off, len, F_META, rep);
        }
        if let Some(e) = err {
            rep.check_errors += 1;
            rep.note(format!("ERROR the bitmaps cannot be read: {e}"));
        }
        // The active L1 table and everything under it.
        self.walk_active_l1(fix, &mut refs, rep)?;
        if refs.beyond_limit > 0 {
            rep.corruptions += refs.beyond_limit;
            rep.note(format!(
                "ERROR {} references lie beyond what the check memory limit can track",
                refs.beyond_limit
            ));
        }
        Ok(refs)
    }

    fn walk_active_l1(&mut self, fix: bool, refs: &mut Refs, rep: &mut CheckReport) -> Result<()> {
        let cs = self.geo.cluster_size();
        for l1i in 0..self.hdr.l1_size as u64 {
            let e = self.l1_entry(l1i)?;
            let off = match decode_l1(e, &self.geo) {
                Ok(None) => continue,
                Ok(Some((off, _)))
                    if off >= cs
                        && off / cs < self.dev_span
                        && refs.flags(off / cs) & (F_META | F_DATA) == 0 =>
                {
                    if refs.beyond_file(off, cs) {
                        // Reported, kept (as QEMU does); the table reads as zeros.
                        refs.count(off, cs, F_L2, rep);
                        continue;
                    }
                    let walked = refs.flags(off / cs) & F_ACTIVE != 0;
                    refs.add(off / cs, F_L2 | F_ACTIVE);
                    if walked {
                        // Two active L1 entries share a table: counted (so the refcount
                        // shows it), walked once.
                        continue;
                    }
                    off
                }
                _ => {
                    rep.corruptions += 1;
                    rep.note(format!(
                        "ERROR L1 entry {l1i} ({e:#x}) is invalid, points past the end of the image or into other metadata"
                    ));
                    if fix {
                        self.set_l1_entry(l1i, 0)?;
                    }
                    continue;
                }
            };
            if self.load(Pool::L2, off, TableKind::L2, true).is_err() {
                rep.check_errors += 1;
                rep.note(format!("ERROR cannot read the L2 table at {off:#x}"));
                continue;
            }
            // Like QEMU, fragmentation is counted within each L2 table.
            let mut last_host = None::<u64>;
            for i in 0..self.geo.l2_entries() as usize {
                let s = self.load(Pool::L2, off, TableKind::L2, true)?;
                let e = self.l2_raw_at(s, i).0;
                let mut into_meta = false;
                let ok = match self.l2_mapping_at(s, i) {
                    Ok(Mapping::Data { host, .. })
                    | Ok(Mapping::Zero {
                        host: Some(host), ..
                    })
                    | Ok(Mapping::Subclusters {
                        host: Some(host), ..
                    }) => {
                        rep.allocated_clusters += 1;
                        if last_host.is_some_and(|h| h + cs != host) {
                            rep.fragmented_clusters += 1;
                        }
                        last_host = Some(host);
                        into_meta = refs.flags(host / cs) & (F_META | F_L2) != 0;
                        if into_meta || host / cs >= self.dev_span {
                            false
                        } else if refs.beyond_file(host, cs) {
                            // Reported, kept (as QEMU does): it reads as zeros.
                            refs.count(host, cs, F_DATA, rep);
                            true
                        } else {
                            refs.add(host / cs, F_DATA)
                        }
                    }
                    Ok(Mapping::Compressed { host, len }) => {
                        rep.allocated_clusters += 1;
                        rep.compressed_clusters += 1;
                        // QEMU counts every compressed cluster as fragmented.
                        rep.fragmented_clusters += 1;
                        let first = host / cs;
                        let last = (host + len - 1) / cs;
                        if first < 1 || last >= self.dev_span {
                            false
                        } else {
                            // Past the end of the file: reported and kept.
                            let past = refs.beyond_file(host, len);
                            refs.count(host, len, F_DATA, rep) || past
                        }
                    }
                    Ok(_) => true,
                    Err(_) => false,
                };
                if !ok {
                    rep.corruptions += 1;
                    if into_meta {
                        rep.note(format!(
                            "ERROR overlapping metadata: L2 entry {i} of the table at {off:#x} ({e:#x}) points into metadata"
                        ));
                    } else {
                        rep.note(format!(
                            "ERROR L2 entry {i} of the table at {off:#x} ({e:#x}) is invalid or points past the end of the image"
                        ));
                    }
                    if fix {
                        let s = self.load(Pool::L2, off, TableKind::L2, true)?;
                        self.put_l2_raw(s, i, (0, 0));
                    }
                }
            }
        }
        Ok(())
    }

    /// Counts the snapshot table and each snapshot's L1, L2 tables and data clusters.
    fn walk_snapshots(&mut self, refs: &mut Refs, rep: &mut CheckReport) -> Result<()> {
        let n = self.hdr.nb_snapshots;
        if n == 0 {
            return Ok(());
        }
        if n > MAX_SNAPSHOTS {
            rep.corruptions += 1;
            rep.note(String::from("ERROR more than 65536 snapshots"));
            return Ok(());
        }
        let cs = self.geo.cluster_size();
        let cap = self.dev.capacity();
        let mut pos = self.hdr.snapshots_offset;
        let mut buf = vec![0u8; cs as usize];
        let mut l1_budget: u64 = 1 << 26;
        let mut seen_l1 = Vec::new();
        for sn in 0..n {
            let mut fixed = [0u8; 40];
            if pos.checked_add(40).is_none_or(|e| e > cap) {
                rep.corruptions += 1;
                rep.note(String::from(
                    "ERROR the snapshot table runs past the end of the image",
                ));
                return Ok(());
            }
            self.dev.read_at(pos, &mut fixed)?;
            let be32 = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as u64;
            let l1_off = (be32(&fixed[0..4]) << 32) | be32(&fixed[4..8]);
            let l1_size = be32(&fixed[8..12]);
            let id_len = u16::from_be_bytes([fixed[12], fixed[13]]) as u64;
            let name_len = u16::from_be_bytes([fixed[14], fixed[15]]) as u64;
            let extra = be32(&fixed[36..40]);
            pos += (40 + extra + id_len + name_len).div_ceil(8) * 8;
            if self.hdr.version >= 3 && extra < 16 {
                // Version 3 entries carry at least the VM state and disk sizes.
                rep.corruptions += 1;
                rep.note(format!("ERROR snapshot table entry {sn} is incomplete"));
            }
            if !l1_off.is_multiple_of(cs)
                || l1_size * 8 > super::layout::MAX_L1_BYTES
                || seen_l1.contains(&l1_off)
                || l1_size > l1_budget
            {
                rep.corruptions += 1;
                rep.note(format!("ERROR snapshot L1 table at {l1_off:#x} is invalid"));
                continue;
            }
            seen_l1.push(l1_off);
            l1_budget -= l1_size;
            if l1_size > 0 {
                if refs.beyond_file(l1_off, l1_size * 8) {
                    // Reported; like QEMU, its entries are still read (zeros past the end).
                    refs.count(l1_off, l1_size * 8, F_META, rep);
                } else if !refs.count(l1_off, l1_size * 8, F_META, rep) {
                    rep.corruptions += 1;
                    rep.note(format!(
                        "ERROR snapshot L1 table at {l1_off:#x} lies past the end"
                    ));
                    continue;
                }
            }
            for l1i in 0..l1_size {
                let mut b = [0u8; 8];
                if super::read_dev(&mut self.dev, l1_off + l1i * 8, &mut b).is_err() {
                    rep.check_errors += 1;
                    break;
                }
                let off = u64::from_be_bytes(b) & OFFSET_MASK;
                if off == 0 {
                    continue;
                }
                if refs.beyond_file(off, cs) {
                    // Reported; the table reads as zeros.
                    refs.count(off, cs, F_L2, rep);
                    continue;
                }
                if !off.is_multiple_of(cs) || !refs.add(off / cs, F_L2) {
                    rep.corruptions += 1;
                    rep.note(format!("ERROR snapshot L2 table at {off:#x} is invalid"));
                    continue;
                }
                if super::read_dev(&mut self.dev, off, &mut buf).is_err() {
                    rep.check_errors += 1;
                    continue;
                }
                for i in 0..self.geo.l2_entries() as usize {
                    match Mapping::from_table(&buf, i, &self.geo, self.hdr.version) {
                        Ok(Mapping::Data { host, .. })
                        | Ok(Mapping::Zero {
                            host: Some(host), ..
                        })
                        | Ok(Mapping::Subclusters {
                            host: Some(host), ..
                        }) => {
                            refs.count(host, cs, F_DATA, rep);
                        }
                        Ok(Mapping::Compressed { host, len }) => {
                            refs.count(host, len, F_DATA, rep);
                        }
                        _ => {}
                    }
                }
            }
        }
        let table_len = pos - self.hdr.snapshots_offset;
        if table_len > 0 {
            refs.count(self.hdr.snapshots_offset, table_len, F_META, rep);
        }
        Ok(())
    }

    /// Compares stored refcounts with the counted references: block by block (each block
    /// once), then references in ranges that have no block.
    fn compare(&mut self, refs: &mut Refs, rep: &mut CheckReport) -> Result<()> {
        let rb_bits = self.geo.rb_bits;
        let order = self.geo.refcount_order;
        let mut covered = vec![false; self.rt_entries as usize];
        let mut last_used = 0u64;
        // Like QEMU, refcounts past the end of the file are not judged.
        let nb = refs.nb;
        for ti in 0..self.rt_entries {
            let Ok(Some(block)) = self.rt_entry(ti) else {
                continue;
            };
            let bc = block / self.geo.cluster_size();
            if refs.flags(bc) & F_SCANNED != 0 {
                continue;
            }
            refs.set_flag(bc, F_SCANNED);
            covered[ti as usize] = true;
            if ti << rb_bits >= nb {
                // Counts only clusters past the end of the file: nothing to judge or read.
                continue;
            }
            let s = match self.load(Pool::Rc, block, TableKind::RefBlock, true) {
                Ok(s) => s,
                Err(_) => {
                    rep.check_errors += 1;
                    continue;
                }
            };
            let base = ti << rb_bits;
            for i in 0..self.geo.rb_entries() {
                let c = base + i;
                if c >= self.dev_span || c >= nb {
                    break;
                }
                let have = get_refcount(self.rcc.data(s), i as usize, order);
                let want = refs.get(c);
                if have > 0 || want > 0 {
                    last_used = c + 1;
                    self.judge(c, have, want, refs, rep);
                }
            }
        }
        for (c, want) in refs.referenced() {
            let ti = c >> rb_bits;
            if covered.get(ti as usize).copied().unwrap_or(false) {
                continue;
            }
            last_used = last_used.max(c + 1);
            self.judge(c, 0, want, refs, rep);
        }
        rep.image_end_offset = last_used * self.geo.cluster_size();
        Ok(())
    }

    fn judge(&self, c: u64, have: u64, want: u64, refs: &Refs, rep: &mut CheckReport) {
        let cs = self.geo.cluster_size();
        if have < want {
            rep.corruptions += 1;
            rep.note(format!(
                "ERROR cluster {c} refcount={have} reference={want}"
            ));
        } else if have > want {
            rep.leaks += 1;
            rep.note(format!(
                "Leaked cluster {c} refcount={have} reference={want}"
            ));
        }
        let flags = refs.flags(c) & (F_DATA | F_L2 | F_META);
        if flags.count_ones() > 1 || (flags == F_META && want > 1) {
            rep.corruptions += 1;
            rep.note(format!(
                "ERROR overlapping metadata: cluster {c} (offset {:#x}) is used by more than one structure",
                c * cs
            ));
        }
    }

    /// Sets every refcount to its reference count, allocating refcount blocks where a
    /// referenced range has none (never over a referenced cluster).
    fn compare_and_fix(&mut self, refs: Refs, rep: &mut CheckReport) -> Result<()> {
        let rb_bits = self.geo.rb_bits;
        // Referenced clusters, densely (the guard the allocator respects).
        let max = refs
            .sparse
            .keys()
            .next_back()
            .map_or(refs.counts.len() as u64, |&k| k + 1)
            .max(refs.counts.len() as u64);
        if max > self.opts.check_memory_limit / 3 {
            return Err(Qcow2Error::TooLarge(
                "repair would need more memory than the check memory limit",
            ));
        }
        let nb = refs.nb;
        // Clusters referenced past the end of the file keep their references (as with QEMU):
        // reserve them too, so that no new refcount block lands on them.
        let limit = self.opts.check_memory_limit / 3;
        let reserve: Vec<u64> = refs
            .past_eof
            .keys()
            .copied()
            .filter(|&c| c >= nb && c < limit)
            .collect();
        let max = reserve.last().map_or(max, |&c| max.max(c + 1));
        let mut guard = refs.counts;
        guard.resize(max as usize, 0);
        for (&c, e) in refs.sparse.iter() {
            guard[c as usize] = e.0;
        }
        for c in reserve {
            guard[c as usize] = guard[c as usize].max(1);
        }
        self.guard = Some(guard);
        self.end = self.end.max(max);
        let r = (|| -> Result<()> {
            let mut covered = vec![false; self.rt_entries as usize];
            let mut seen: BTreeMap<u64, ()> = BTreeMap::new();
            for ti in 0..self.rt_entries {
                let Ok(Some(block)) = self.rt_entry(ti) else {
                    continue;
                };
                if seen.insert(block, ()).is_some() {
                    continue;
                }
                covered[ti as usize] = true;
                let base = ti << rb_bits;
                if base >= nb {
                    continue;
                }
                for i in 0..self.geo.rb_entries() {
                    let c = base + i;
                    // Like QEMU, refcounts past the end of the file are left alone.
                    if c >= self.dev_span || c >= nb {
                        break;
                    }
                    let want = self.guarded(c);
                    let have = self.refcount(c)?;
                    if have != want {
                        count_fix(rep, have, want);
                        rep.note(format!(
                            "Repairing cluster {c} refcount={have} reference={want}"
                        ));
                        self.set_refcount(c, want)?;
                    }
                }
            }
            let mut c = 0u64;
            while c < self.guard.as_ref().map_or(0, |g| g.len() as u64) {
                let want = self.guarded(c);
                let ti = c >> rb_bits;
                if want > 0 && c < nb && !covered.get(ti as usize).copied().unwrap_or(false) {
                    let have = self.refcount(c)?;
                    if have != want {
                        count_fix(rep, have, want);
                        rep.note(format!(
                            "Repairing cluster {c} refcount={have} reference={want}"
                        ));
                        self.ensure_blocks(c, 1)?;
                        self.set_refcount(c, want)?;
                    }
                }
                c += 1;
            }
            // With the guard still in place, so the new table lands on no referenced cluster.
            self.fix_snapshot_table()
        })();
        self.guard = None;
        self.cursor = 1;
        r
    }

    /// Rewrites a version 3 snapshot table with entries that lack the 16 bytes of extra data
    /// every entry needs (a table cut by the end of the file reads as zeros), as QEMU's repair
    /// does: each entry gets 24 bytes of extra data (what it had, then the VM state size, the
    /// virtual size and an unknown instruction count for what it lacked), in new clusters;
    /// the old table is freed. A table that cannot be read whole is left to the check.
    fn fix_snapshot_table(&mut self) -> Result<()> {
        let n = self.hdr.nb_snapshots;
        if self.hdr.version < 3 || n == 0 || n > MAX_SNAPSHOTS {
            return Ok(());
        }
        let cs = self.geo.cluster_size();
        let cap = self.dev.capacity();
        let old_off = self.hdr.snapshots_offset;
        let mut pos = old_off;
        let mut table = Vec::new();
        let mut incomplete = false;
        for _ in 0..n {
            let mut fixed = [0u8; 40];
            if pos.checked_add(40).is_none_or(|e| e > cap) {
                return Ok(());
            }
            self.dev.read_at(pos, &mut fixed)?;
            let be32 = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
            let extra = be32(&fixed[36..40]);
            let id_len = u16::from_be_bytes([fixed[12], fixed[13]]) as usize;
            let name_len = u16::from_be_bytes([fixed[14], fixed[15]]) as usize;
            // QEMU's limits: 1 KiB of extra data, 64 MiB of table (and the check's memory).
            let max_table = (64 << 20).min(self.opts.check_memory_limit / 4) as usize;
            if extra > 1024 || table.len() > max_table {
                return Ok(());
            }
            let mut rest = vec![0u8; extra + id_len + name_len];
            if (pos + 40)
                .checked_add(rest.len() as u64)
                .is_none_or(|e| e > cap)
            {
                return Ok(());
            }
            self.dev.read_at(pos + 40, &mut rest)?;
            pos += (40 + rest.len() as u64).div_ceil(8) * 8;
            incomplete |= extra < 16;
            let mut ex = vec![0u8; extra.max(24)];
            ex[..extra].copy_from_slice(&rest[..extra]);
            if extra < 8 {
                let vm_state = be32(&fixed[32..36]) as u64;
                ex[0..8].copy_from_slice(&vm_state.to_be_bytes());
            }
            if extra < 16 {
                ex[8..16].copy_from_slice(&self.hdr.size.to_be_bytes());
            }
            if extra < 24 {
                ex[16..24].copy_from_slice(&u64::MAX.to_be_bytes());
            }
            fixed[36..40].copy_from_slice(&(ex.len() as u32).to_be_bytes());
            table.extend_from_slice(&fixed);
            table.extend_from_slice(&ex);
            table.extend_from_slice(&rest[extra..]);
            table.resize(table.len().next_multiple_of(8), 0);
        }
        if !incomplete {
            return Ok(());
        }
        let clusters = (table.len() as u64).div_ceil(cs);
        let (first, _) = self.alloc_contiguous(clusters)?;
        super::write_dev(&mut self.dev, first * cs, &table)?;
        self.stats.metadata_bytes_written += table.len() as u64;
        // Barrier: the new table is durable before the header points at it.
        self.flush_metadata()?;
        self.barrier()?;
        self.hdr.snapshots_offset = first * cs;
        self.write_header()?;
        self.barrier()?;
        for c in old_off / cs..pos.div_ceil(cs) {
            let r = self.refcount(c)?;
            if r > 0 {
                self.set_refcount(c, r - 1)?;
            }
        }
        Ok(())
    }

    /// Length of the device's stored data, QEMU's "end of the file": a file's length, a
    /// fixed device's capacity.
    fn file_len(&self) -> u64 {
        let cap = self.dev.capacity();
        self.dev.zeroes_from().map_or(cap, |z| z.min(cap))
    }

    fn guarded(&self, c: u64) -> u64 {
        self.guard
            .as_ref()
            .and_then(|g| g.get(c as usize))
            .copied()
            .unwrap_or(0) as u64
    }

    /// Checks (and with `fix`, corrects) the COPIED flags of the active tables.
    fn check_copied(&mut self, fix: bool, rep: &mut CheckReport) -> Result<()> {
        let cs = self.geo.cluster_size();
        for l1i in 0..self.hdr.l1_size as u64 {
            let e = self.l1_entry(l1i)?;
            let Ok(Some((off, copied))) = decode_l1(e, &self.geo) else {
                continue;
            };
            if off / cs >= self.dev_span {
                continue;
            }
            let rc = self.refcount(off / cs)?;
            if (rc == 1) != copied {
                rep.corruptions += 1;
                rep.note(format!(
                    "ERROR OFLAG_COPIED L2 cluster: l1_index={l1i} l1_entry={e:x} refcount={rc}"
                ));
                if fix {
                    self.set_l1_entry(l1i, if rc == 1 { e | COPIED } else { e & !COPIED })?;
                }
            }
            for i in 0..self.geo.l2_entries() as usize {
                let s = self.load(Pool::L2, off, TableKind::L2, true)?;
                let (e, bitmap) = self.l2_raw_at(s, i);
                let (host, copied) = match self.l2_mapping_at(s, i) {
                    Ok(Mapping::Data { host, copied })
                    | Ok(Mapping::Zero {
                        host: Some(host),
                        copied,
                    })
                    | Ok(Mapping::Subclusters {
                        host: Some(host),
                        copied,
                        ..
                    }) => (host, copied),
                    _ => continue,
                };
                if host / cs >= self.dev_span {
                    continue;
                }
                let rc = self.refcount(host / cs)?;
                if (rc == 1) != copied {
                    rep.corruptions += 1;
                    rep.note(format!(
                        "ERROR OFLAG_COPIED data cluster: l2_entry={e:x} refcount={rc}"
                    ));
                    if fix {
                        let s = self.load(Pool::L2, off, TableKind::L2, true)?;
                        let e = if rc == 1 { e | COPIED } else { e & !COPIED };
                        self.put_l2_raw(s, i, (e, bitmap));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Counts one refcount fix as a leak or corruption fixed (by what it was).
fn count_fix(rep: &mut CheckReport, have: u64, want: u64) {
    if have > want {
        rep.leaks += 1;
    } else {
        rep.corruptions += 1;
    }
}
