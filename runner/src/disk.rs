//! The guest's disk on the host: creating the default image, checking it can be opened, and
//! sizing the file so the guest can grow the qcow2 image inside it.
//!
//! QEMU gives the guest the file's bytes (`-drive format=raw`), so the virtio-blk capacity is
//! the file's length. The guest allocates clusters past the image's current end as it writes,
//! so before boot the file is extended (sparsely) to the largest length the image can reach.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

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
    /// Its length after preparation (the guest's virtio-blk capacity).
    pub file_len: u64,
}

/// The largest file an image of this geometry can grow to, with all of its metadata.
///
/// Data clusters plus, per cluster, an L2 entry (8 bytes) and a refcount entry (at most 8
/// bytes), plus room for the header, the L1 table and refcount-table growth.
pub fn max_image_len(virtual_size: u64, cluster_size: u64, refcount_bits: u32) -> u64 {
    let _ = refcount_bits;
    let cluster_size = cluster_size.max(512);
    let clusters = virtual_size.div_ceil(cluster_size);
    let metadata = clusters.saturating_mul(16);
    let len = virtual_size
        .saturating_add(metadata)
        .saturating_add(32 << 20);
    len.div_ceil(cluster_size).saturating_mul(cluster_size)
}

/// Creates a qcow2 image of `size` virtual bytes at `path` (parent directories included).
pub fn create_qcow2(path: &Path, size: u64, cluster_size: u64, refcount_bits: u32) -> Result<()> {
    let disk_err = |reason: String| Error::Disk {
        path: path.to_path_buf(),
        action: "create",
        reason,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| disk_err(e.to_string()))?;
    }
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o"])
        .arg(format!(
            "cluster_size={cluster_size},refcount_bits={refcount_bits}"
        ))
        .arg(path)
        .arg(size.to_string())
        .output()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::QemuMissing {
                program: "qemu-img".into(),
            },
            _ => disk_err(format!("cannot run qemu-img: {e}")),
        })?;
    if !out.status.success() {
        return Err(disk_err(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(())
}

/// Reads the qcow2 header of `file`, if it has one.
pub fn probe(file: &mut File) -> std::io::Result<DiskKind> {
    let mut header = [0u8; 104];
    let mut filled = 0;
    while filled < header.len() {
        match file.read(&mut header[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    let be32 = |o: usize| u32::from_be_bytes(header[o..o + 4].try_into().unwrap_or([0; 4]));
    let be64 = |o: usize| u64::from_be_bytes(header[o..o + 8].try_into().unwrap_or([0; 8]));
    if filled < 72 || &header[..4] != b"QFI\xfb" {
        return Ok(DiskKind::Raw);
    }
    let version = be32(4);
    let cluster_bits = be32(20);
    if !(9..=21).contains(&cluster_bits) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("qcow2 header: cluster_bits {cluster_bits} out of range (9..=21)"),
        ));
    }
    let refcount_order = if version >= 3 && filled >= 100 {
        be32(96)
    } else {
        4
    };
    if refcount_order > 6 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("qcow2 header: refcount_order {refcount_order} out of range (0..=6)"),
        ));
    }
    Ok(DiskKind::Qcow2(Qcow2Geometry {
        version,
        virtual_size: be64(24),
        cluster_size: 1 << cluster_bits,
        refcount_bits: 1 << refcount_order,
    }))
}

/// Opens `path` as the guest will use it, reads what it holds and, for a writable qcow2
/// image, extends the file sparsely to [`max_image_len`].
pub fn prepare(path: &Path, read_only: bool) -> Result<PreparedDisk> {
    let disk_err = |action: &'static str, reason: String| Error::Disk {
        path: path.to_path_buf(),
        action,
        reason,
    };
    let mut file = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .map_err(|e| disk_err("open", e.to_string()))?;
    let kind = probe(&mut file).map_err(|e| disk_err("read", e.to_string()))?;
    let mut file_len = file
        .metadata()
        .map_err(|e| disk_err("read", e.to_string()))?
        .len();
    if let (DiskKind::Qcow2(g), false) = (kind, read_only) {
        let want = max_image_len(g.virtual_size, g.cluster_size, g.refcount_bits);
        if file_len < want {
            file.set_len(want)
                .map_err(|e| disk_err("extend", e.to_string()))?;
            file_len = want;
        }
    }
    Ok(PreparedDisk {
        path: path.to_path_buf(),
        kind,
        file_len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_len_covers_data_and_metadata() {
        let len = max_image_len(1 << 30, 64 << 10, 16);
        assert!(len >= (1 << 30) + (1 << 30) / (64 << 10) * 16);
        assert_eq!(len % (64 << 10), 0);
        assert!(max_image_len(1 << 50, 512, 64) > 1 << 50);
        assert!(max_image_len(u64::MAX, 512, 64) >= u64::MAX / 2);
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
    fn qcow2_header_is_probed_and_the_file_extended() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hand.qcow2");
        let mut h = vec![0u8; 512];
        h[..4].copy_from_slice(b"QFI\xfb");
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[20..24].copy_from_slice(&16u32.to_be_bytes());
        h[24..32].copy_from_slice(&(8u64 << 20).to_be_bytes());
        h[96..100].copy_from_slice(&4u32.to_be_bytes());
        std::fs::write(&path, &h).unwrap();
        let d = prepare(&path, false).unwrap();
        let DiskKind::Qcow2(g) = d.kind else {
            panic!("not probed as qcow2: {:?}", d.kind)
        };
        assert_eq!(g.cluster_size, 65536);
        assert_eq!(g.virtual_size, 8 << 20);
        assert_eq!(g.refcount_bits, 16);
        assert_eq!(d.file_len, max_image_len(8 << 20, 65536, 16));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), d.file_len);
        // Read-only: left alone.
        std::fs::write(&path, &h).unwrap();
        assert_eq!(prepare(&path, true).unwrap().file_len, 512);
        // Absurd cluster bits: an error, not a panic.
        h[20..24].copy_from_slice(&40u32.to_be_bytes());
        std::fs::write(&path, &h).unwrap();
        assert!(prepare(&path, false).is_err());
    }
}
