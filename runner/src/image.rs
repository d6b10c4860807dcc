//! The `qcow-metal image` subcommands: create, inspect, check and map qcow2 images on the
//! host with the project's own engine (`qcow_metal::qcow2`).

use std::path::Path;

use crate::disk::{self, DiskKind};
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
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: disk::DEFAULT_SIZE,
            cluster_size: disk::DEFAULT_CLUSTER_SIZE,
            refcount_bits: disk::DEFAULT_REFCOUNT_BITS,
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
    disk::create_qcow2(path, opts.size, opts.cluster_size, opts.refcount_bits)
}

/// `image info`: a human-readable summary of the image's header.
pub fn info(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::Disk {
        path: path.to_path_buf(),
        action: "open",
        reason: e.to_string(),
    })?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let kind = disk::probe(&mut file).map_err(|e| Error::Disk {
        path: path.to_path_buf(),
        action: "read",
        reason: e.to_string(),
    })?;
    Ok(match kind {
        DiskKind::Qcow2(g) => format!(
            "image: {}\nformat: qcow2 (version {})\nvirtual size: {} ({} bytes)\n\
             cluster size: {}\nrefcount bits: {}\nfile length: {}\n",
            path.display(),
            g.version,
            format_size(g.virtual_size),
            g.virtual_size,
            format_size(g.cluster_size),
            g.refcount_bits,
            format_size(len)
        ),
        DiskKind::Raw => format!(
            "image: {}\nformat: raw\nvirtual size: {} ({len} bytes)\n",
            path.display(),
            format_size(len)
        ),
    })
}

/// `image check [--repair]`: leaks and corruptions, as `qemu-img check` reports them.
pub fn check(path: &Path, repair: bool) -> Result<String> {
    let _ = repair;
    Err(engine_missing(path, "check"))
}

/// `image map`: which guest ranges are data, zero or unallocated, and where they live.
pub fn map(path: &Path) -> Result<String> {
    Err(engine_missing(path, "map"))
}

fn engine_missing(path: &Path, what: &str) -> Error {
    Error::Usage(format!(
        "`image {what}` on {} needs the qcow2 engine's check/map, which this build does not \
         have yet; meanwhile use `qemu-img {what} {}`",
        path.display(),
        path.display()
    ))
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
    fn info_of_a_raw_file_and_a_missing_one() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.img");
        std::fs::write(&p, vec![1u8; 2048]).unwrap();
        let text = info(&p).unwrap();
        assert!(text.contains("format: raw"), "{text}");
        assert!(text.contains("2048 bytes"), "{text}");
        assert!(info(&dir.path().join("missing")).is_err());
    }
}
