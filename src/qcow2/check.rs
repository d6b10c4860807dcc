//! Consistency check and repair, reporting what `qemu-img check` reports: leaked clusters,
//! corruptions (references past the end, refcounts too low, overlapping metadata, wrong
//! COPIED flags) and, after repair, what was fixed.
//!
//! The check counts every reference the image's metadata makes (header, L1 tables of the
//! active state and of snapshots, L2 tables, data and compressed clusters, the refcount
//! table and blocks, the snapshot table) and compares the counts with the stored refcounts.

use super::cache::{TableKind, get_u64, set_u64};
use super::entry::{COPIED, Mapping, OFFSET_MASK, decode_l1};
use super::error::{Qcow2Error, Result};
use super::{Pool, Qcow2};
use crate::block::BlockDevice;
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
}

impl CheckReport {
    /// No corruptions, no leaks, no check errors.
    pub fn is_clean(&self) -> bool {
        self.corruptions == 0 && self.leaks == 0 && self.check_errors == 0
    }

    fn note(&mut self, msg: String) {
        if self.messages.len() < MAX_MESSAGES {
            self.messages.push(msg);
        }
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for m in &self.messages {
            writeln!(f, "{m}")?;
        }
        if self.corruptions_fixed > 0 || self.leaks_fixed > 0 {
            writeln!(
                f,
                "The following inconsistencies were found and repaired:\n    {} leaked clusters\n    {} corruptions",
                self.leaks_fixed, self.corruptions_fixed
            )?;
        }
        if self.is_clean() {
            writeln!(f, "No errors were found on the image.")?;
        } else {
            if self.corruptions > 0 {
                writeln!(
                    f,
                    "{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.",
                    self.corruptions
                )?;
            }
            if self.leaks > 0 {
                writeln!(
                    f,
                    "{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.",
                    self.leaks
                )?;
            }
            if self.check_errors > 0 {
                writeln!(
                    f,
                    "{} internal errors have occurred during the check.",
                    self.check_errors
                )?;
            }
        }
        writeln!(
            f,
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
            self.allocated_clusters,
            self.total_clusters,
            pct(self.allocated_clusters, self.total_clusters),
            pct(self.fragmented_clusters, self.allocated_clusters),
            pct(self.compressed_clusters, self.allocated_clusters)
        )?;
        write!(f, "Image end offset: {}", self.image_end_offset)
    }
}

fn pct(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 * 100.0 / b as f64
    }
}

/// Expected references per host cluster.
struct Refs {
    counts: Vec<u16>,
    flags: Vec<u8>,
    /// Clusters on the device.
    dev_clusters: u64,
    /// Clusters the memory limit allows tracking.
    limit: u64,
    /// References beyond `limit` (but on the device).
    beyond_limit: u64,
}

impl Refs {
    /// Counts a reference to cluster `c`. `Ok(false)`: past the device end.
    fn add(&mut self, c: u64, flag: u8) -> bool {
        if c >= self.dev_clusters {
            return false;
        }
        if c >= self.limit {
            self.beyond_limit += 1;
            return true;
        }
        let i = c as usize;
        if i >= self.counts.len() {
            let n = (i + 1).max(self.counts.len() * 2).min(self.limit as usize);
            self.counts.resize(n, 0);
            self.flags.resize(n, 0);
        }
        self.counts[i] = self.counts[i].saturating_add(1);
        self.flags[i] |= flag;
        true
    }

    fn get(&self, c: u64) -> u64 {
        self.counts.get(c as usize).copied().unwrap_or(0) as u64
    }
}

impl<D: BlockDevice> Qcow2<D> {
    /// Checks the image's consistency without changing it (dirty metadata is written back
    /// first so the check sees what the disk holds).
    pub fn check(&mut self) -> Result<CheckReport> {
        self.flush_metadata()?;
        let mut rep = CheckReport::default();
        let refs = self.collect(false, &mut rep)?;
        self.compare(&refs, false, &mut rep)?;
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
        self.begin_write()?;
        self.flush_metadata()?;
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
        messages.truncate(MAX_MESSAGES);
        after.messages = messages;
        Ok(after)
    }

    /// Rebuilds refcounts from the references (after a crash with lazy refcounts).
    pub(crate) fn rebuild_refcounts(&mut self) -> Result<()> {
        let saved = self.write_started;
        // The dirty bit is already set; nothing else to change in the header.
        self.write_started = true;
        let r = self.repair();
        self.write_started = saved;
        r.map(|_| ())
    }

    /// Counts every reference. With `fix`, invalid or out-of-range entries are cleared.
    fn collect(&mut self, fix: bool, rep: &mut CheckReport) -> Result<Refs> {
        let cs = self.geo.cluster_size();
        let limit = (self.opts.check_memory_limit / 3).min(self.dev_clusters);
        let mut refs = Refs {
            counts: Vec::new(),
            flags: Vec::new(),
            dev_clusters: self.dev_clusters,
            limit,
            beyond_limit: 0,
        };
        rep.total_clusters = self.hdr.size.div_ceil(cs);
        // Header.
        refs.add(0, F_META);
        // Active L1 table and everything under it.
        let l1_clusters = (self.hdr.l1_size as u64 * 8).div_ceil(cs);
        for k in 0..l1_clusters {
            refs.add(self.hdr.l1_table_offset / cs + k, F_META);
        }
        self.walk_active_l1(fix, &mut refs, rep)?;
        // Refcount table and blocks.
        for k in 0..self.hdr.refcount_table_clusters as u64 {
            refs.add(self.hdr.refcount_table_offset / cs + k, F_META);
        }
        for ti in 0..self.rt_entries {
            let (page, i) = {
                let byte = ti * 8;
                (
                    self.hdr.refcount_table_offset + (byte & !(cs - 1)),
                    ((byte & (cs - 1)) / 8) as usize,
                )
            };
            let s = self.load(Pool::Rc, page, TableKind::RefTable, true)?;
            let e = get_u64(self.rcc.data(s), i);
            if e == 0 {
                continue;
            }
            let bad = e & (cs - 1) != 0 || e < cs;
            if bad || !refs.add(e / cs, F_META) {
                rep.corruptions += 1;
                rep.note(format!(
                    "ERROR refcount block {ti} at offset {e:#x} is invalid or past the end of the image"
                ));
                if fix {
                    let s = self.load(Pool::Rc, page, TableKind::RefTable, true)?;
                    set_u64(self.rcc.data_mut(s), i, 0);
                }
            }
        }
        // Snapshots.
        self.walk_snapshots(&mut refs, rep)?;
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
        let mut last_host = None::<u64>;
        for l1i in 0..self.hdr.l1_size as u64 {
            let e = self.l1_entry(l1i)?;
            let off = match decode_l1(e, &self.geo) {
                Ok(None) => continue,
                Ok(Some((off, _))) if off >= cs && refs.add(off / cs, F_L2) => off,
                _ => {
                    rep.corruptions += 1;
                    rep.note(format!(
                        "ERROR L1 entry {l1i} ({e:#x}) is invalid or points past the end of the image"
                    ));
                    if fix {
                        self.set_l1_entry(l1i, 0)?;
                    }
                    continue;
                }
            };
            let s = match self.load(Pool::L2, off, TableKind::L2, true) {
                Ok(s) => s,
                Err(_) => {
                    rep.check_errors += 1;
                    rep.note(format!("ERROR cannot read the L2 table at {off:#x}"));
                    continue;
                }
            };
            for i in 0..self.geo.l2_entries() as usize {
                let s = self.l2c.get(off).map_or(s, |x| x);
                let e = get_u64(self.l2c.data(s), i);
                let ok = match Mapping::decode(e, &self.geo, self.hdr.version) {
                    Ok(Mapping::Data { host, .. })
                    | Ok(Mapping::Zero {
                        host: Some(host), ..
                    }) => {
                        let ok = refs.add(host / cs, F_DATA);
                        if ok {
                            rep.allocated_clusters += 1;
                            if last_host.is_some_and(|h| h + cs != host) {
                                rep.fragmented_clusters += 1;
                            }
                            last_host = Some(host);
                        }
                        ok
                    }
                    Ok(Mapping::Compressed { host, len }) => {
                        rep.allocated_clusters += 1;
                        rep.compressed_clusters += 1;
                        let first = host / cs;
                        let last = (host + len - 1) / cs;
                        (first..=last).all(|c| refs.add(c, F_DATA))
                    }
                    Ok(_) => true,
                    Err(_) => false,
                };
                if !ok {
                    rep.corruptions += 1;
                    rep.note(format!(
                        "ERROR L2 entry {i} of the table at {off:#x} ({e:#x}) is invalid or points past the end of the image"
                    ));
                    if fix {
                        let s = self.load(Pool::L2, off, TableKind::L2, true)?;
                        set_u64(self.l2c.data_mut(s), i, 0);
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
            return Err(Qcow2Error::BadHeader("more than 65536 snapshots"));
        }
        let cs = self.geo.cluster_size();
        let cap = self.dev.capacity();
        let mut pos = self.hdr.snapshots_offset;
        let mut buf = vec![0u8; cs as usize];
        for _ in 0..n {
            let mut fixed = [0u8; 40];
            if pos.checked_add(40).is_none_or(|e| e > cap) {
                rep.corruptions += 1;
                rep.note(String::from(
                    "ERROR the snapshot table runs past the end of the image",
                ));
                return Ok(());
            }
            self.dev.read_at(pos, &mut fixed)?;
            let l1_off = u64::from_be_bytes(fixed[0..8].try_into().unwrap_or([0; 8]));
            let l1_size = u32::from_be_bytes(fixed[8..12].try_into().unwrap_or([0; 4])) as u64;
            let id_len = u16::from_be_bytes([fixed[12], fixed[13]]) as u64;
            let name_len = u16::from_be_bytes([fixed[14], fixed[15]]) as u64;
            let extra = u32::from_be_bytes(fixed[36..40].try_into().unwrap_or([0; 4])) as u64;
            pos += (40 + extra + id_len + name_len).div_ceil(8) * 8;
            let l1_clusters = (l1_size * 8).div_ceil(cs);
            if l1_off % cs != 0 || l1_size * 8 > super::layout::MAX_L1_BYTES {
                rep.corruptions += 1;
                rep.note(format!("ERROR snapshot L1 table at {l1_off:#x} is invalid"));
                continue;
            }
            for k in 0..l1_clusters {
                if !refs.add(l1_off / cs + k, F_META) {
                    rep.corruptions += 1;
                    rep.note(format!(
                        "ERROR snapshot L1 table at {l1_off:#x} lies past the end"
                    ));
                    break;
                }
            }
            for l1i in 0..l1_size {
                let mut b = [0u8; 8];
                if self.dev.read_at(l1_off + l1i * 8, &mut b).is_err() {
                    rep.check_errors += 1;
                    break;
                }
                let off = u64::from_be_bytes(b) & OFFSET_MASK;
                if off == 0 {
                    continue;
                }
                if !off.is_multiple_of(cs) || !refs.add(off / cs, F_L2) {
                    rep.corruptions += 1;
                    rep.note(format!("ERROR snapshot L2 table at {off:#x} is invalid"));
                    continue;
                }
                if self.dev.read_at(off, &mut buf).is_err() {
                    rep.check_errors += 1;
                    continue;
                }
                for i in 0..self.geo.l2_entries() as usize {
                    let e = get_u64(&buf, i);
                    match Mapping::decode(e, &self.geo, self.hdr.version) {
                        Ok(Mapping::Data { host, .. })
                        | Ok(Mapping::Zero {
                            host: Some(host), ..
                        }) => {
                            refs.add(host / cs, F_DATA);
                        }
                        Ok(Mapping::Compressed { host, len }) => {
                            for c in host / cs..=(host + len - 1) / cs {
                                refs.add(c, F_DATA);
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
        let table_end = pos;
        let first = self.hdr.snapshots_offset / cs;
        for c in first..table_end.div_ceil(cs) {
            refs.add(c, F_META);
        }
        Ok(())
    }

    /// Compares stored refcounts with the counted references (check only).
    fn compare(&mut self, refs: &Refs, _fix: bool, rep: &mut CheckReport) -> Result<()> {
        let end = self.compute_end().unwrap_or(self.end);
        let n = end.max(refs.counts.len() as u64).min(self.dev_clusters);
        let mut last_used = 0u64;
        for c in 0..n {
            let want = refs.get(c);
            let have = match self.refcount(c) {
                Ok(r) => r,
                Err(_) => {
                    rep.check_errors += 1;
                    continue;
                }
            };
            if want > 0 || have > 0 {
                last_used = c + 1;
            }
            self.judge(c, have, want, refs, rep);
        }
        rep.image_end_offset = last_used * self.geo.cluster_size();
        Ok(())
    }

    fn judge(&self, c: u64, have: u64, want: u64, refs: &Refs, rep: &mut CheckReport) {
        let cs = self.geo.cluster_size();
        if have < want {
            rep.corruptions += 1;
            rep.note(format!(
                "ERROR cluster {c} refcount={have} reference={want} (refcount too low)"
            ));
        } else if have > want {
            rep.leaks += 1;
            if want == 0 {
                rep.note(format!(
                    "Leaked cluster {c} refcount={have} reference={want}"
                ));
            } else {
                rep.note(format!(
                    "Leaked cluster {c} refcount={have} reference={want} (refcount too high)"
                ));
            }
        }
        let flags = refs.flags.get(c as usize).copied().unwrap_or(0);
        if flags.count_ones() > 1 || (flags == F_META && want > 1) {
            rep.corruptions += 1;
            rep.note(format!(
                "ERROR overlapping metadata: cluster {c} (offset {:#x}) is used by more than one structure",
                c * cs
            ));
        }
    }

    /// Sets every refcount to its reference count.
    fn compare_and_fix(&mut self, refs: Refs, rep: &mut CheckReport) -> Result<()> {
        let end = self.compute_end().unwrap_or(self.end);
        let n = end.max(refs.counts.len() as u64).min(self.dev_clusters);
        let flags = refs.flags.clone();
        let refs_for_judge = Refs {
            counts: Vec::new(),
            flags,
            dev_clusters: refs.dev_clusters,
            limit: refs.limit,
            beyond_limit: 0,
        };
        // Referenced clusters must not be handed out while refcount blocks are allocated.
        self.guard = Some(refs.counts);
        self.end = self.end.max(n);
        self.cursor = 1;
        let r = (|| -> Result<()> {
            let mut c = 0u64;
            while c < n.max(self.guard.as_ref().map_or(0, |g| g.len() as u64)) {
                let want = self
                    .guard
                    .as_ref()
                    .and_then(|g| g.get(c as usize))
                    .copied()
                    .unwrap_or(0) as u64;
                let have = match self.refcount(c) {
                    Ok(r) => r,
                    Err(_) => {
                        rep.check_errors += 1;
                        c += 1;
                        continue;
                    }
                };
                self.judge(c, have, want, &refs_for_judge, rep);
                if have != want {
                    if want > 0 && self.rt_entry(c >> self.geo.rb_bits)?.is_none() {
                        self.ensure_blocks(c, 1)?;
                    }
                    self.set_refcount(c, want)?;
                    if want == 0 {
                        self.cursor = self.cursor.min(c);
                    }
                }
                c += 1;
            }
            Ok(())
        })();
        self.guard = None;
        self.cursor = 1;
        r
    }

    /// Checks (and with `fix`, corrects) the COPIED flags of the active tables.
    fn check_copied(&mut self, fix: bool, rep: &mut CheckReport) -> Result<()> {
        let cs = self.geo.cluster_size();
        for l1i in 0..self.hdr.l1_size as u64 {
            let e = self.l1_entry(l1i)?;
            let Ok(Some((off, copied))) = decode_l1(e, &self.geo) else {
                continue;
            };
            if off / cs >= self.dev_clusters {
                continue;
            }
            let rc = self.refcount(off / cs)?;
            if (rc == 1) != copied {
                rep.corruptions += 1;
                rep.note(format!(
                    "ERROR OFLAG_COPIED L2 cluster: l1_index={l1i} l1_entry={e:#x} refcount={rc}"
                ));
                if fix {
                    self.set_l1_entry(l1i, if rc == 1 { e | COPIED } else { e & !COPIED })?;
                }
            }
            for i in 0..self.geo.l2_entries() as usize {
                let s = self.load(Pool::L2, off, TableKind::L2, true)?;
                let e = get_u64(self.l2c.data(s), i);
                let (host, copied) = match Mapping::decode(e, &self.geo, self.hdr.version) {
                    Ok(Mapping::Data { host, copied })
                    | Ok(Mapping::Zero {
                        host: Some(host),
                        copied,
                    }) => (host, copied),
                    _ => continue,
                };
                if host / cs >= self.dev_clusters {
                    continue;
                }
                let rc = self.refcount(host / cs)?;
                if (rc == 1) != copied {
                    rep.corruptions += 1;
                    rep.note(format!(
                        "ERROR OFLAG_COPIED data cluster: l2_entry={e:#x} refcount={rc}"
                    ));
                    if fix {
                        let s = self.load(Pool::L2, off, TableKind::L2, true)?;
                        set_u64(
                            self.l2c.data_mut(s),
                            i,
                            if rc == 1 { e | COPIED } else { e & !COPIED },
                        );
                    }
                }
            }
        }
        Ok(())
    }
}
