//! The `qcow-metal image` subcommands: create, inspect, check and map qcow2 images on the
//! host with the project's own engine (`qcow_metal::qcow2`).

use std::path::Path;

use qcow_metal::block::FileDisk;
use qcow_metal::qcow2::chain::LayerFormat;
use qcow_metal::qcow2::chain::files as chain_files;
use qcow_metal::qcow2::{CheckReport, ClusterKind, OpenOptions, Qcow2, Qcow2Error};

use crate::disk;
use crate::error::{Error, Result};
use crate::units::format_size;

/// Options of `image create`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreateOptions {
    /// Virtual size in bytes.
    pub size: u64,
    /// Cluster size in bytes (a power of two, 512 B to 2 MiB).
    pub cluster_size: u64,
    /// Refcount width in bits (1, 2, 4, 8, 16, 32 or 64).
    pub refcount_bits: u32,
    /// Extended L2 entries: 32 subclusters per cluster (clusters of 16 KiB or more).
    pub extended_l2: bool,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: disk::DEFAULT_SIZE,
            cluster_size: disk::DEFAULT_CLUSTER_SIZE,
            refcount_bits: disk::DEFAULT_REFCOUNT_BITS,
            extended_l2: false,
        }
    }
}

impl CreateOptions {
    /// Checks the geometry before anything is written.
    pub fn validate(&self) -> Result<()> {
        if !self.cluster_size.is_power_of_two() || !(512..=2 << 20).contains(&self.cluster_size) {
            return Err(Error::Usage(format!(
                "cluster size {} is not a power of two from 512 B to 2 MiB",
                self.cluster_size
            )));
        }
        if !self.refcount_bits.is_power_of_two() || self.refcount_bits > 64 {
            return Err(Error::Usage(format!(
                "refcount width {} is not one of 1, 2, 4, 8, 16, 32, 64",
                self.refcount_bits
            )));
        }
        if self.extended_l2 && self.cluster_size < 16 << 10 {
            return Err(Error::Usage(format!(
                "extended L2 entries need clusters of 16K or more (not {}): raise --cluster-size",
                self.cluster_size
            )));
        }
        if self.size == 0 {
            return Err(Error::Usage("the virtual size must not be zero".into()));
        }
        Ok(())
    }
}

/// `image create`: writes a new, empty qcow2 image (refuses to overwrite a file).
pub fn create(path: &Path, opts: CreateOptions) -> Result<()> {
    opts.validate()?;
    if path.exists() {
        return Err(Error::Disk {
            path: path.to_path_buf(),
            action: "create",
            reason: "the file exists (remove it first)".into(),
        });
    }
    disk::create_qcow2_with(
        path,
        &qcow_metal::qcow2::CreateOptions {
            virtual_size: opts.size,
            cluster_size: opts.cluster_size,
            refcount_bits: opts.refcount_bits,
            extended_l2: opts.extended_l2,
            ..qcow_metal::qcow2::CreateOptions::default()
        },
    )
}

/// Opens `path` with the engine (read-only unless `writable`). With `repair` an image
/// marked corrupt opens writable so that [`Qcow2::repair`] can fix it.
fn open(path: &Path, writable: bool) -> Result<Qcow2<FileDisk>> {
    open_with(path, writable, false)
}

fn open_with(path: &Path, writable: bool, repair: bool) -> Result<Qcow2<FileDisk>> {
    let err = |action: &'static str, reason: String| Error::Disk {
        path: path.to_path_buf(),
        action,
        reason,
    };
    // A FIFO would block the open forever.
    crate::guard::ensure_regular(path)?;
    let dev = FileDisk::open(path, !writable).map_err(|e| err("open", e.to_string()))?;
    let opts = OpenOptions {
        read_only: !writable,
        repair,
        ..OpenOptions::default()
    };
    // An overlay opens with its backing chain, resolved as QEMU does.
    let chain =
        chain_files::resolve_if_qcow2(path).map_err(|e| err("resolve the backing chain of", e))?;
    let below =
        chain_files::open_layers(&chain, &opts).map_err(|e| err("open the backing chain of", e))?;
    Qcow2::open_with_backing(dev, opts, below).map_err(|e| err("open", e.to_string()))
}

fn engine_err<'a>(path: &'a Path, action: &'static str) -> impl Fn(Qcow2Error) -> Error + 'a {
    move |e| Error::Disk {
        path: path.to_path_buf(),
        action,
        reason: e.to_string(),
    }
}

/// `image info --backing-chain`: [`info`] of the image and of every layer of its backing
/// chain, top first, separated by blank lines (as `qemu-img info --backing-chain`).
pub fn info_chain(path: &Path) -> Result<String> {
    let chain = chain_files::resolve_if_qcow2(path)
        .map_err(|e| Error::disk(path, "resolve the backing chain of", e))?;
    let mut out = info(path)?;
    for layer in &chain {
        out.push('\n');
        match layer.format {
            LayerFormat::Qcow2 => out.push_str(&info(&layer.path)?),
            LayerFormat::Raw => {
                let mut line = |k: &str, v: String| out.push_str(&format!("{k:<24}{v}\n"));
                line("image:", layer.path.display().to_string());
                line("file format:", "raw".into());
                line(
                    "virtual size:",
                    format!(
                        "{} ({} bytes)",
                        format_size(layer.virtual_size),
                        layer.virtual_size
                    ),
                );
            }
        }
    }
    Ok(out)
}

/// `image info`: a human-readable summary of the image (header, features, space).
pub fn info(path: &Path) -> Result<String> {
    let file_len = std::fs::metadata(path)
        .map_err(|e| Error::Disk {
            path: path.to_path_buf(),
            action: "open",
            reason: e.to_string(),
        })?
        .len();
    let mut image = open(path, false)?;
    let i = image.info();
    let space = image.space().map_err(engine_err(path, "read"))?;
    // The open succeeded, so the type is a known one.
    let compression = image
        .header()
        .compression_type()
        .map_or("unknown", |t| t.name());
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<24}{v}\n"));
    line("image:", path.display().to_string());
    line("file format:", "qcow2".into());
    line(
        "virtual size:",
        format!("{} ({} bytes)", format_size(i.virtual_size), i.virtual_size),
    );
    line(
        "file length:",
        format!("{} ({file_len} bytes)", format_size(file_len)),
    );
    line(
        "image extent:",
        format!(
            "{} ({} bytes)",
            format_size(space.image_extent),
            space.image_extent
        ),
    );
    line("cluster size:", format_size(i.cluster_size));
    line(
        "compat:",
        if i.version >= 3 {
            "1.1 (version 3)"
        } else {
            "0.10 (version 2)"
        }
        .into(),
    );
    line("refcount bits:", i.refcount_bits.to_string());
    line("lazy refcounts:", i.lazy_refcounts.to_string());
    line("compression type:", compression.into());
    line(
        "extended L2:",
        (i.incompatible_features & qcow_metal::qcow2::header::INCOMPAT_EXTENDED_L2 != 0)
            .to_string(),
    );
    line("dirty:", i.dirty.to_string());
    line("corrupt:", i.corrupt.to_string());
    line("snapshots:", i.snapshots.to_string());
    if let Some(backing) = &i.backing_file {
        line("backing file:", backing.clone());
    }
    if let Some(format) = image.header().backing_format() {
        line("backing file format:", format);
    }
    line("data:", format_size(space.data_bytes));
    line("metadata:", format_size(space.metadata_bytes));
    line("free clusters:", space.free_clusters.to_string());
    line(
        "L1 table:",
        format!("{} entries at {:#x}", i.l1_size, i.l1_table_offset),
    );
    line(
        "refcount table:",
        format!(
            "{} clusters at {:#x}",
            i.refcount_table_clusters, i.refcount_table_offset
        ),
    );
    line(
        "features:",
        format!(
            "incompatible {:#x}, compatible {:#x}, autoclear {:#x}",
            i.incompatible_features, i.compatible_features, i.autoclear_features
        ),
    );
    for f in &i.feature_names {
        line("", format!("{:?} bit {}: {}", f.kind, f.bit, f.name));
    }
    if !i.extensions.is_empty() {
        line("header extensions:", i.extensions.len().to_string());
    }
    Ok(out)
}

/// `image check [--repair]`: leaks and corruptions, as `qemu-img check` reports them.
/// Without `repair` the image is opened read-only; with it, writable for repair (also when
/// it is marked corrupt: a repair that leaves it clean lifts the mark).
pub fn check(path: &Path, repair: bool) -> Result<CheckReport> {
    // Repairing an image a running guest writes would corrupt it: the guest's lock refuses.
    let _lock = if repair {
        Some(crate::guard::lock_disk(path, false)?)
    } else {
        None
    };
    let mut image = open_with(path, repair, repair)?;
    if repair {
        let report = image.repair().map_err(engine_err(path, "repair"))?;
        image.close().map_err(engine_err(path, "write"))?;
        Ok(report)
    } else {
        image.check().map_err(engine_err(path, "check"))
    }
}

/// What `image snapshot` does, as `qemu-img snapshot -l|-c|-a|-d` does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotAction {
    /// List the snapshots.
    List,
    /// Create a snapshot of the current state with this name.
    Create(String),
    /// Revert the current state to this snapshot (ID or name).
    Apply(String),
    /// Delete this snapshot (ID or name).
    Delete(String),
}

/// `image snapshot`: lists (the text `qemu-img snapshot -l` prints) or changes the internal
/// snapshots of `path`. Changes take the image's lock: a running guest's image is refused.
pub fn snapshot(path: &Path, action: &SnapshotAction) -> Result<String> {
    if *action == SnapshotAction::List {
        let mut image = open(path, false)?;
        let list = image
            .snapshots()
            .map_err(engine_err(path, "read the snapshots of"))?;
        return Ok(snapshot_list_text(&list));
    }
    let _lock = crate::guard::lock_disk(path, false)?;
    let mut image = open(path, true)?;
    let r = match action {
        SnapshotAction::Create(name) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            // Microseconds, as QEMU stamps them.
            let nsec = now.subsec_micros() * 1000;
            image
                .snapshot_create(name, now.as_secs() as u32, nsec)
                .map(|_| ())
        }
        SnapshotAction::Apply(name) => image.snapshot_apply(name),
        SnapshotAction::Delete(name) => image.snapshot_delete(name),
        SnapshotAction::List => Ok(()),
    };
    r.map_err(engine_err(path, "change the snapshots of"))?;
    image.close().map_err(engine_err(path, "write"))?;
    Ok(String::new())
}

/// The snapshot table in `qemu-img snapshot -l`'s layout (dates in UTC).
pub fn snapshot_list_text(list: &[qcow_metal::qcow2::Snapshot]) -> String {
    if list.is_empty() {
        return String::new();
    }
    let mut s = String::from("Snapshot list:\n");
    s += &format!(
        "{:<10}{:<18}{:>7}{:>20}{:>13}{:>11}\n",
        "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT"
    );
    for sn in list {
        let clock_ms = sn.vm_clock_nsec / 1_000_000;
        let clock = format!(
            "{:02}:{:02}:{:02}.{:03}",
            clock_ms / 3_600_000,
            clock_ms / 60_000 % 60,
            clock_ms / 1000 % 60,
            clock_ms % 1000
        );
        let icount = sn.icount.map(|i| i.to_string()).unwrap_or_default();
        s += &format!(
            "{:<10}{:<18}{:>7}{:>20}{:>13}{:>11}\n",
            sn.id,
            sn.name,
            format_size(sn.vm_state_size),
            utc_date(sn.date_sec as u64),
            clock,
            icount
        );
    }
    s
}

/// `YYYY-MM-DD HH:MM:SS` in UTC for seconds since the epoch.
fn utc_date(secs: u64) -> String {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// The exit status `qemu-img check` would give: 0 clean, 1 check errors, 2 corruptions,
/// 3 leaks only.
pub fn check_exit_code(report: &CheckReport) -> u8 {
    if report.check_errors > 0 {
        1
    } else if report.corruptions > 0 {
        2
    } else if report.leaks > 0 {
        3
    } else {
        0
    }
}

/// What [`compact`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompactSummary {
    /// Clusters moved (data, L2 tables, refcount blocks).
    pub moved_clusters: u64,
    /// Bytes moved.
    pub moved_bytes: u64,
    /// Compaction steps run.
    pub steps: u64,
    /// Image extent before and after, in bytes.
    pub extent_before: u64,
    /// Image extent after.
    pub extent_after: u64,
    /// File length before and after (cut to the extent).
    pub old_file_len: u64,
    /// File length after.
    pub new_file_len: u64,
}

/// Clusters one compaction step of `image compact` moves at most (bounds the memory of a
/// step: its list of tail clusters).
const OFFLINE_STEP_CLUSTERS: u64 = 4096;

/// `image compact`: moves clusters from the end of the image into free space nearer the
/// start (the engine's [`Qcow2::compact_step`], as the guest does online), then cuts the
/// file to the new image extent. `progress(done, total)` is called after every step with
/// the bytes given back so far and the estimate of all that can be. The image must not be
/// in use (the disk lock is taken).
pub fn compact(path: &Path, mut progress: impl FnMut(u64, u64)) -> Result<CompactSummary> {
    let _lock = crate::guard::lock_disk(path, false)?;
    let old_file_len = file_len(path)?;
    let mut image = open(path, true)?;
    let cs = image.cluster_size();
    let total = image
        .compactable_bytes()
        .map_err(engine_err(path, "read"))?;
    let mut summary = CompactSummary {
        moved_clusters: 0,
        moved_bytes: 0,
        steps: 0,
        extent_before: 0,
        extent_after: 0,
        old_file_len,
        new_file_len: old_file_len,
    };
    let mut first = true;
    loop {
        let p = image
            .compact_step(OFFLINE_STEP_CLUSTERS)
            .map_err(engine_err(path, "compact"))?;
        if first {
            summary.extent_before = p.extent_before;
            first = false;
        }
        summary.steps += 1;
        summary.moved_clusters += p.moved_clusters;
        summary.extent_after = p.extent_after;
        progress(
            summary
                .extent_before
                .saturating_sub(p.extent_after)
                .min(total),
            total,
        );
        if p.done {
            break;
        }
    }
    summary.moved_bytes = summary.moved_clusters * cs;
    let extent = image.image_extent();
    let dev = image.close().map_err(engine_err(path, "write"))?;
    // Nothing the closed image references lies at or past its extent: cut the file there.
    if extent < old_file_len {
        let cut = |e: std::io::Error| Error::Disk {
            path: path.to_path_buf(),
            action: "truncate",
            reason: e.to_string(),
        };
        dev.set_len(extent).map_err(cut)?;
        dev.file().sync_all().map_err(cut)?;
    }
    summary.new_file_len = file_len(path)?;
    Ok(summary)
}

fn file_len(path: &Path) -> Result<u64> {
    std::fs::metadata(path)
        .map(|m| m.len())
        .map_err(|e| Error::Disk {
            path: path.to_path_buf(),
            action: "open",
            reason: e.to_string(),
        })
}

/// `image map`: the guest disk as runs of data, zeros, unallocated and compressed clusters,
/// with the host offset of each data run.
pub fn map(path: &Path) -> Result<String> {
    let mut image = open(path, false)?;
    let runs = image.map().map_err(engine_err(path, "map"))?;
    let mut out = format!(
        "{:<20}{:<20}{:<14}{}\n",
        "Offset", "Length", "Kind", "Host offset"
    );
    for r in runs {
        let kind = match r.kind {
            ClusterKind::Data => "data",
            ClusterKind::Zero => "zero",
            ClusterKind::Unallocated => "unallocated",
            ClusterKind::Compressed => "compressed",
            _ => "other",
        };
        let host = r
            .host
            .map(|h| format!("{h:#x}"))
            .unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "{:<20}{:<20}{:<14}{}\n",
            format!("{:#x}", r.offset),
            format!("{:#x}", r.len),
            kind,
            host
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_is_validated() {
        assert!(CreateOptions::default().validate().is_ok());
        let bad = CreateOptions {
            cluster_size: 3000,
            ..Default::default()
        };
        assert!(bad.validate().is_err());
        let bad = CreateOptions {
            cluster_size: 4 << 20,
            ..Default::default()
        };
        assert!(bad.validate().is_err());
        let bad = CreateOptions {
            refcount_bits: 128,
            ..Default::default()
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn create_info_check_map_on_our_own_image() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.qcow2");
        let opts = CreateOptions {
            size: 4 << 20,
            cluster_size: 4096,
            refcount_bits: 16,
            ..Default::default()
        };
        create(&p, opts).unwrap();
        assert!(create(&p, opts).is_err(), "must not overwrite");
        // Write some data with the engine, as the guest would.
        {
            let mut img = open(&p, true).unwrap();
            img.write_at(8192, &[7u8; 5000]).unwrap();
            img.close().unwrap();
        }
        let text = info(&p).unwrap();
        assert!(text.contains("virtual size:           4 MiB"), "{text}");
        assert!(text.contains("cluster size:           4 KiB"), "{text}");
        assert!(text.contains("refcount bits:          16"), "{text}");
        let report = check(&p, false).unwrap();
        assert!(report.is_clean(), "{report}");
        assert_eq!(check_exit_code(&report), 0);
        let m = map(&p).unwrap();
        assert!(
            m.lines()
                .any(|l| l.starts_with("0x2000") && l.contains("data")),
            "{m}"
        );
        assert!(
            m.lines()
                .any(|l| l.starts_with("0x0 ") && l.contains("unallocated")),
            "{m}"
        );
        // Raw files and missing files are errors that name the file.
        let raw = dir.path().join("r.img");
        std::fs::write(&raw, vec![1u8; 2048]).unwrap();
        let err = info(&raw).unwrap_err().to_string();
        assert!(
            err.contains("r.img") && err.contains("not a qcow2"),
            "{err}"
        );
        assert!(info(&dir.path().join("missing")).is_err());
    }

    /// `image create --extended-l2` makes an image QEMU reads as having subclusters, and
    /// `image info` says so; too small clusters are a usage error.
    #[test]
    fn create_with_extended_l2() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ext.qcow2");
        let opts = CreateOptions {
            size: 8 << 20,
            cluster_size: 32 << 10,
            refcount_bits: 16,
            extended_l2: true,
        };
        create(&p, opts).unwrap();
        let (code, out) = qemu_img(&["info", "--output=json", p.to_str().unwrap()]);
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("\"extended-l2\": true"), "{out}");
        let text = info(&p).unwrap();
        assert!(
            text.lines()
                .any(|l| l.starts_with("extended L2:") && l.ends_with(" true")),
            "{text}"
        );
        let small = CreateOptions {
            cluster_size: 8 << 10,
            ..opts
        };
        assert!(matches!(small.validate(), Err(Error::Usage(_))));
    }

    /// Runs `qemu-img` (package qemu-utils); returns its exit code and stdout.
    fn qemu_img(args: &[&str]) -> (i32, String) {
        let o = std::process::Command::new("qemu-img")
            .args(args)
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run qemu-img ({e}): install the Debian package qemu-utils")
            });
        let out =
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
        (o.status.code().expect("qemu-img exit code"), out)
    }

    #[test]
    fn check_repair_fixes_a_corrupt_marked_image() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.qcow2");
        let cs = 4096u64;
        create(
            &p,
            CreateOptions {
                size: 4 << 20,
                cluster_size: cs,
                refcount_bits: 16,
                ..Default::default()
            },
        )
        .unwrap();
        let host = {
            let mut img = open(&p, true).unwrap();
            img.write_at(3 * cs, &[0x5a; 4096]).unwrap();
            let host = match img.mapping(3).unwrap() {
                qcow_metal::qcow2::Mapping::Data { host, .. } => host,
                m => panic!("unexpected mapping {m:?}"),
            };
            img.close().unwrap();
            host
        };
        // Raw damage: the data cluster's refcount drops to 0 (refcount too low, a
        // corruption) and the image is marked corrupt (incompatible bit 1), as QEMU marks it
        // when it finds such damage at run time.
        let mut bytes = std::fs::read(&p).unwrap();
        let be64 = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
        let rt = be64(&bytes, 48) as usize;
        let block = be64(&bytes, rt) as usize;
        let at = block + 2 * (host / cs) as usize;
        assert_eq!(&bytes[at..at + 2], &[0, 1], "refcount of the data cluster");
        bytes[at..at + 2].copy_from_slice(&[0, 0]);
        bytes[79] |= 2;
        std::fs::write(&p, &bytes).unwrap();
        let image = p.to_str().unwrap();

        let report = check(&p, false).unwrap();
        assert!(report.corruptions > 0, "{report}");
        assert_eq!(check_exit_code(&report), 2, "{report}");
        let (code, out) = qemu_img(&["check", "-f", "qcow2", image]);
        assert_eq!(code, 2, "qemu-img check agrees: {out}");
        assert!(info(&p).unwrap().contains("corrupt:                true"));

        let report = check(&p, true).unwrap();
        assert!(
            report.corruptions == 0 && report.corruptions_fixed > 0,
            "{report}"
        );
        assert_eq!(check_exit_code(&report), 0, "{report}");

        let report = check(&p, false).unwrap();
        assert!(report.is_clean(), "{report}");
        assert_eq!(check_exit_code(&report), 0);
        assert!(info(&p).unwrap().contains("corrupt:                false"));
        let (code, out) = qemu_img(&["check", "-f", "qcow2", image]);
        assert_eq!(code, 0, "qemu-img check after our repair: {out}");
        assert!(out.contains("No errors were found"), "{out}");
        // The data survived.
        let mut img = open(&p, false).unwrap();
        let mut buf = [0u8; 4096];
        img.read_at(3 * cs, &mut buf).unwrap();
        assert_eq!(buf, [0x5a; 4096]);
    }
}
