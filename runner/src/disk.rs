//! The guest's disk on the host: creating the default image, checking it can be opened, and
//! warning when its filesystem cannot hold the image's growth.
//!
//! QEMU gives the guest the file's bytes (`-drive format=raw`), so the virtio-blk capacity is
//! the file's length. The file is not extended before boot: it grows when the guest asks
//! (see [`crate::hostfile`]) and is cut back to the image's end at a clean shutdown. Before
//! boot the runner warns when the filesystem has less free space than the image may grow
//! to.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};

use qcow_metal::block::FileDisk;
use qcow_metal::qcow2::chain::files::{self as chain_files, ChainFile};
use qcow_metal::qcow2::header::Header;
use qcow_metal::qcow2::{CreateOptions, Qcow2};

use crate::error::{Error, Result};

/// Virtual size of the default disk: 1 GiB.
pub const DEFAULT_SIZE: u64 = 1 << 30;
/// Cluster size of images the runner creates: 64 KiB (QEMU's default).
pub const DEFAULT_CLUSTER_SIZE: u64 = 64 << 10;
/// Refcount width of images the runner creates: 16 bits (QEMU's default).
pub const DEFAULT_REFCOUNT_BITS: u32 = 16;

/// What the guest should take the disk's bytes for (the kernel's `format=` argument).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GuestFormat {
    /// qcow2 when the disk starts with the qcow2 magic, raw otherwise.
    #[default]
    Auto,
    /// The disk is a qcow2 image (the guest runs the engine).
    Qcow2,
    /// The disk's bytes are the virtual disk.
    Raw,
}

impl GuestFormat {
    /// The value of the kernel's `format=` argument.
    pub fn as_str(&self) -> &'static str {
        match self {
            GuestFormat::Auto => "auto",
            GuestFormat::Qcow2 => "qcow2",
            GuestFormat::Raw => "raw",
        }
    }
}

impl std::str::FromStr for GuestFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(GuestFormat::Auto),
            "qcow2" => Ok(GuestFormat::Qcow2),
            "raw" => Ok(GuestFormat::Raw),
            other => Err(format!("unknown format `{other}` (auto, qcow2 or raw)")),
        }
    }
}

/// The default disk: `<workspace>/target/qcow-metal/disk.qcow2`.
pub fn default_disk_path(root: &Path) -> PathBuf {
    root.join("target").join("qcow-metal").join("disk.qcow2")
}

/// The parameters of a qcow2 image, read from its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Qcow2Geometry {
    /// qcow2 version (2 or 3).
    pub version: u32,
    /// Virtual disk size in bytes.
    pub virtual_size: u64,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// Refcount width in bits.
    pub refcount_bits: u32,
}

/// What a disk file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskKind {
    /// A qcow2 image.
    Qcow2(Qcow2Geometry),
    /// Anything else: served as raw bytes.
    Raw,
}

/// A disk file checked and sized for the guest.
#[derive(Debug, Clone)]
pub struct PreparedDisk {
    /// The image file.
    pub path: PathBuf,
    /// What it holds.
    pub kind: DiskKind,
    /// Its length at boot (the guest's first virtio-blk capacity).
    pub file_len: u64,
    /// The layers of its backing chain, its backing file first (empty without one): each
    /// is attached read-only as a virtio-blk device of its own (see [`backing_chain`]).
    pub backing: Vec<ChainFile>,
}

/// Resolves the backing chain of the qcow2 image at `path` as QEMU does (see
/// [`qcow_metal::qcow2::chain::files`]), checks that the engine opens every layer, and
/// takes a shared lock on each layer file (held while the returned files live), so that no
/// writer can change a layer under the guest. Errors name the file.
pub fn backing_chain(path: &Path) -> Result<(Vec<ChainFile>, Vec<File>)> {
    let chain = chain_files::resolve(path)
        .map_err(|e| Error::disk(path, "resolve the backing chain of", e))?;
    if chain.is_empty() {
        return Ok((chain, Vec::new()));
    }
    let mut locks = Vec::new();
    for layer in &chain {
        locks.push(crate::guard::lock_disk(&layer.path, true)?);
    }
    chain_files::open_layers(&chain, &qcow_metal::qcow2::OpenOptions::default())
        .map_err(|e| Error::disk(path, "open the backing chain of", e))?;
    Ok((chain, locks))
}

pub use qcow_metal::qcow2::max_image_len;

/// Creates a qcow2 image of `size` virtual bytes at `path` with the project's own engine,
/// creating parent directories. An existing file is refused and never touched; a failed
/// create leaves nothing behind.
pub fn create_qcow2(path: &Path, size: u64, cluster_size: u64, refcount_bits: u32) -> Result<()> {
    create_qcow2_with(
        path,
        &CreateOptions {
            virtual_size: size,
            cluster_size,
            refcount_bits,
            ..CreateOptions::default()
        },
    )
}

/// [`create_qcow2`] with every engine option (extended L2 entries, lazy refcounts).
pub fn create_qcow2_with(path: &Path, opts: &CreateOptions) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::disk(path, "create", e))?;
    }
    // Whole or not at all: a failed create (say, `--size 8E`) leaves no empty file behind.
    crate::guard::create_new(path, |file| {
        let dev = FileDisk::from_file(file.try_clone()?, false);
        let image = Qcow2::create(dev, opts).map_err(|e| std::io::Error::other(e.to_string()))?;
        image
            .close()
            .map(drop)
            .map_err(|e| std::io::Error::other(e.to_string()))
    })
    .map_err(|e| Error::disk(path, "create", e))
}

/// Reads what `file` holds: a qcow2 header (parsed by the engine) or anything else (raw).
/// A file with the qcow2 magic but a header the engine rejects is an error.
pub fn probe(file: &mut File) -> std::io::Result<DiskKind> {
    // The first cluster holds the header and its extensions; 2 MiB is the largest cluster.
    let mut first = Vec::with_capacity(64 << 10);
    file.by_ref().take(2 << 20).read_to_end(&mut first)?;
    if first.len() < 4 || &first[..4] != b"QFI\xfb" {
        return Ok(DiskKind::Raw);
    }
    let header = Header::parse(&first)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
    Ok(DiskKind::Qcow2(Qcow2Geometry {
        version: header.version,
        virtual_size: header.size,
        cluster_size: 1 << header.cluster_bits,
        refcount_bits: 1 << header.refcount_order,
    }))
}

/// Opens `path` as the guest will use it and reads what it holds; for a writable qcow2
/// image, warns when the filesystem cannot hold its growth to [`max_image_len`]. The file
/// is left as it is (it grows on demand).
pub fn prepare(path: &Path, read_only: bool) -> Result<PreparedDisk> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .map_err(|e| Error::disk(path, "open", e))?;
    let kind = probe(&mut file)
        .and_then(|kind| file.rewind().map(|()| kind))
        .map_err(|e| Error::disk(path, "read", e))?;
    let file_len = file
        .metadata()
        .map_err(|e| Error::disk(path, "read", e))?
        .len();
    if let (DiskKind::Qcow2(g), false) = (kind, read_only) {
        let reachable = max_image_len(g.virtual_size, g.cluster_size, g.refcount_bits);
        if let Some(warning) = space_warning(path, &file, reachable) {
            eprintln!("qcow-metal: warning: {warning}");
        }
    }
    Ok(PreparedDisk {
        path: path.to_path_buf(),
        kind,
        file_len,
        backing: Vec::new(),
    })
}

/// Room on the host for the image to grow, as [`space_warning`] measures it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpaceCheck {
    /// The image file.
    pub path: PathBuf,
    /// Where the filesystem holding it is mounted, and its type when known (`/mnt (tmpfs)`).
    pub filesystem: String,
    /// Bytes an unprivileged writer may still allocate there.
    pub free: u64,
    /// Bytes the file holds now (allocated blocks: the file is sparse).
    pub allocated: u64,
    /// Largest size the image can reach ([`max_image_len`]).
    pub reachable: u64,
}

impl SpaceCheck {
    /// Why the image may not fit, or `None` when the free space covers its growth.
    pub fn warning(&self) -> Option<String> {
        let growth = self.reachable.saturating_sub(self.allocated);
        if self.free >= growth {
            return None;
        }
        Some(format!(
            "{} may grow to {} but the filesystem at {} has {} free ({} more may be needed): \
             the file grows as the guest writes, and once the filesystem is full the guest's \
             writes that need new space fail (NBD clients get ENOSPC or EIO, the guest keeps \
             running and counts them); free space there, put the disk on a bigger filesystem \
             (--disk) or use a smaller --size",
            self.path.display(),
            crate::units::format_size(self.reachable),
            self.filesystem,
            crate::units::format_size(self.free),
            crate::units::format_size(growth),
        ))
    }
}

/// Measures whether the filesystem holding `file` (at `path`) has room for the image to
/// grow to `reachable` bytes, and returns a warning when it has not. Measuring is best
/// effort: a filesystem that cannot say (`statvfs` fails) gets no warning.
pub fn space_warning(path: &Path, file: &File, reachable: u64) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let st = rustix::fs::fstatvfs(file).ok()?;
    let allocated = file.metadata().ok()?.blocks().saturating_mul(512);
    SpaceCheck {
        path: path.to_path_buf(),
        filesystem: filesystem_name(path),
        free: st.f_bavail.saturating_mul(st.f_frsize),
        allocated,
        reachable,
    }
    .warning()
}

/// The mount point of the filesystem holding `path` (the highest ancestor on the same
/// device) and its type from `/proc/self/mounts`, e.g. `/mnt/small (tmpfs)`.
fn filesystem_name(path: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let Ok(dev) = path.metadata().map(|m| m.dev()) else {
        return path.display().to_string();
    };
    let mut mount = path.as_path();
    while let Some(parent) = mount.parent() {
        match parent.metadata() {
            Ok(m) if m.dev() == dev => mount = parent,
            _ => break,
        }
    }
    let fs_type = std::fs::read_to_string("/proc/self/mounts")
        .ok()
        .and_then(|mounts| {
            // The last mount on a point is the one in effect.
            mounts.lines().rev().find_map(|l| {
                let mut f = l.split(' ');
                let (_, at, kind) = (f.next()?, f.next()?, f.next()?);
                // Spaces in mount points are written as octal escapes.
                (at.replace("\\040", " ") == mount.to_string_lossy()).then(|| kind.to_string())
            })
        });
    match fs_type {
        Some(kind) => format!("{} ({kind})", mount.display()),
        None => mount.display().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filesystem_too_small_for_the_image_is_named_in_a_warning() {
        let check = SpaceCheck {
            path: "/mnt/small/disk.qcow2".into(),
            filesystem: "/mnt/small (tmpfs)".into(),
            free: 40 << 20,
            allocated: 256 << 10,
            reachable: max_image_len(1 << 30, 65536, 16),
        };
        let w = check.warning().expect("40 MiB cannot hold a 1 GiB image");
        for want in [
            "/mnt/small/disk.qcow2",
            "/mnt/small (tmpfs)",
            "40 MiB free",
            "ENOSPC",
            "--disk",
            "--size",
        ] {
            assert!(w.contains(want), "missing `{want}` in: {w}");
        }
        assert!(
            w.contains(&crate::units::format_size(check.reachable)),
            "{w}"
        );
        // Enough room for what is not yet allocated: no warning.
        let roomy = SpaceCheck {
            free: check.reachable - check.allocated,
            ..check
        };
        assert_eq!(roomy.warning(), None);
        // This machine's temporary directory is measured without error.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.qcow2");
        std::fs::write(&path, b"x").unwrap();
        let file = File::open(&path).unwrap();
        assert_eq!(space_warning(&path, &file, 1), None);
        let huge = space_warning(&path, &file, u64::MAX).expect("no filesystem holds 16 EiB");
        assert!(huge.contains(&path.display().to_string()), "{huge}");
        assert!(filesystem_name(&path).starts_with('/'), "{huge}");
    }

    #[test]
    fn created_images_are_probed_and_left_small_for_the_guest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("d.qcow2");
        create_qcow2(&path, 8 << 20, 4096, 64).unwrap();
        let d = prepare(&path, false).unwrap();
        let DiskKind::Qcow2(g) = d.kind else {
            panic!("not probed as qcow2: {:?}", d.kind)
        };
        assert_eq!(
            g,
            Qcow2Geometry {
                version: 3,
                virtual_size: 8 << 20,
                cluster_size: 4096,
                refcount_bits: 64
            }
        );
        // Not extended: the file ends where the image does, and grows on demand.
        let len = std::fs::metadata(&path).unwrap().len();
        assert_eq!(d.file_len, len);
        assert!(len < 64 << 10, "a fresh 8 MiB image takes {len} bytes");
        // QEMU agrees the image is sound.
        let out = std::process::Command::new("qemu-img")
            .args(["check", "-f", "qcow2"])
            .arg(&path)
            .output()
            .expect("qemu-img is missing: install the Debian package qemu-utils");
        assert!(
            out.status.success(),
            "qemu-img check: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn a_failed_create_leaves_nothing_and_an_existing_file_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("huge.qcow2");
        let err = create_qcow2(&path, 8 << 60, 65536, 16)
            .unwrap_err()
            .to_string();
        assert!(err.contains("huge.qcow2"), "{err}");
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert!(left.is_empty(), "a failed create left {left:?}");
        let existing = dir.path().join("data.img");
        std::fs::write(&existing, b"precious").unwrap();
        assert!(create_qcow2(&existing, 8 << 20, 65536, 16).is_err());
        assert_eq!(std::fs::read(&existing).unwrap(), b"precious");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn raw_and_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("raw.img");
        std::fs::write(&raw, vec![0u8; 4096]).unwrap();
        let d = prepare(&raw, false).unwrap();
        assert_eq!(d.kind, DiskKind::Raw);
        assert_eq!(d.file_len, 4096);
        let err = prepare(&dir.path().join("nope.qcow2"), false).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("cannot open") && msg.contains("--disk"),
            "{msg}"
        );
    }

    #[test]
    fn read_only_images_are_left_alone_and_bad_headers_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ro.qcow2");
        create_qcow2(&path, 8 << 20, 65536, 16).unwrap();
        let len = std::fs::metadata(&path).unwrap().len();
        let d = prepare(&path, true).unwrap();
        assert!(matches!(d.kind, DiskKind::Qcow2(_)), "{:?}", d.kind);
        assert_eq!(d.file_len, len);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
        // Absurd cluster bits: an error, not a panic.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[20..24].copy_from_slice(&40u32.to_be_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let err = prepare(&path, false).unwrap_err().to_string();
        assert!(err.contains("cluster"), "{err}");
    }
}
