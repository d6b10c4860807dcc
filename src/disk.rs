//! Virtual disks: what the NBD export serves and what the metrics layer instruments.
//!
//! [`VirtualDisk`] is the guest-visible disk: the qcow2 engine implements it over a
//! [`BlockDevice`] holding an image, and [`RawDisk`] implements it over a device's own bytes
//! (raw mode). The NBD server and the request-level metrics are generic over it.

use crate::block::{BlockDevice, BlockError};
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

pub mod telemetry;

/// How a range of the virtual disk is backed, as NBD `base:allocation` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Allocation {
    /// Allocated, holds data.
    Data,
    /// Allocated or not, reads as zeros (qcow2 zero clusters, or zeroed storage).
    Zero,
    /// Not allocated: reads as zeros (or from a backing file, later) and takes no space.
    Hole,
}

/// A run of the virtual disk with one [`Allocation`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length of the run in bytes (at least 1 for a non-empty query).
    pub len: u64,
    /// What the run is.
    pub kind: Allocation,
}

/// What a virtual-disk request can fail with. The NBD server maps these to its error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskError {
    /// The request lies (partly) outside the disk, or its arguments are invalid (`EINVAL`).
    Invalid,
    /// The disk is read-only (`EPERM`).
    ReadOnly,
    /// The storage under the disk is full (`ENOSPC`).
    NoSpace,
    /// The image is damaged in a way that stops this request (`EIO`).
    Corrupt(&'static str),
    /// The device under the disk failed (`EIO`).
    Device(BlockError),
    /// The operation is not supported by this disk (`EINVAL` / `ENOTSUP`).
    Unsupported,
}

impl fmt::Display for DiskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DiskError::Invalid => {
                f.write_str("invalid request (outside the disk or bad arguments)")
            }
            DiskError::ReadOnly => f.write_str("the disk is read-only"),
            DiskError::NoSpace => f.write_str("no space left on the device under the disk"),
            DiskError::Corrupt(what) => write!(f, "image corrupt: {what}"),
            DiskError::Device(e) => write!(f, "device error: {e}"),
            DiskError::Unsupported => f.write_str("operation not supported by this disk"),
        }
    }
}

impl core::error::Error for DiskError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            DiskError::Device(e) => Some(e),
            _ => None,
        }
    }
}

impl From<BlockError> for DiskError {
    fn from(e: BlockError) -> Self {
        match e {
            BlockError::ReadOnly => DiskError::ReadOnly,
            BlockError::OutOfRange { .. } => DiskError::NoSpace,
            other => DiskError::Device(other),
        }
    }
}

/// Checks that a request of `len` bytes at `offset` lies inside a disk of `size` bytes.
pub fn check_request(offset: u64, len: u64, size: u64) -> Result<(), DiskError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(DiskError::Invalid),
    }
}

/// The disk a client sees: read, write, flush, discard, write-zeroes and block status.
pub trait VirtualDisk {
    /// Size of the virtual disk in bytes.
    fn size(&self) -> u64;

    /// Whether writes are refused.
    fn is_read_only(&self) -> bool;

    /// Reads `buf.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError>;

    /// Writes `buf` at `offset`; durable after [`VirtualDisk::flush`].
    fn write(&mut self, offset: u64, buf: &[u8]) -> Result<(), DiskError>;

    /// Makes every completed write durable (data and metadata).
    fn flush(&mut self) -> Result<(), DiskError>;

    /// The client no longer needs `len` bytes at `offset`; they may read as zeros afterwards.
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), DiskError>;

    /// Makes `len` bytes at `offset` read as zeros. With `may_unmap` the disk may free the
    /// space (NBD without `NO_HOLE`); without it the space stays allocated.
    fn write_zeroes(&mut self, offset: u64, len: u64, may_unmap: bool) -> Result<(), DiskError>;

    /// The allocation of the run that starts at `offset`, at most `len` bytes long.
    fn block_status(&mut self, offset: u64, len: u64) -> Result<Extent, DiskError>;

    /// Names of the read-only views (internal snapshots) served besides the disk itself
    /// (the NBD export `EXPORT@NAME`). None by default.
    fn views(&mut self) -> Vec<String> {
        Vec::new()
    }

    /// Directs the following requests to view `name`, or back to the disk itself with
    /// `None`. A view is read-only; [`VirtualDisk::size`] is its size while selected.
    fn select_view(&mut self, name: Option<&str>) -> Result<(), DiskError> {
        match name {
            None => Ok(()),
            Some(_) => Err(DiskError::Invalid),
        }
    }

    /// Names of the dirty bitmaps the disk can report (the NBD metadata contexts
    /// `qemu:dirty-bitmap:NAME`). None by default.
    fn dirty_bitmaps(&mut self) -> Vec<String> {
        Vec::new()
    }

    /// Whether `offset` is dirty in bitmap `name`, and for how many bytes from there (at
    /// least one, at most `len` unless a granule reaches further) that stays so.
    fn dirty_status(
        &mut self,
        name: &str,
        offset: u64,
        len: u64,
    ) -> Result<(bool, u64), DiskError> {
        let _ = (name, offset, len);
        Err(DiskError::Unsupported)
    }
}

/// Raw mode: the device's bytes are the virtual disk.
pub struct RawDisk<D> {
    dev: D,
    size: u64,
}

impl<D: BlockDevice> RawDisk<D> {
    /// Serves `dev` as it is; the disk's size is the device's capacity.
    pub fn new(dev: D) -> Self {
        let size = dev.capacity();
        RawDisk { dev, size }
    }

    /// The device under the disk.
    pub fn device(&self) -> &D {
        &self.dev
    }

    /// The device under the disk, mutably.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.dev
    }

    /// Gives the device back.
    pub fn into_inner(self) -> D {
        self.dev
    }
}

impl<D: BlockDevice> VirtualDisk for RawDisk<D> {
    fn size(&self) -> u64 {
        self.size
    }

    fn is_read_only(&self) -> bool {
        self.dev.is_read_only()
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        check_request(offset, buf.len() as u64, self.size)?;
        Ok(self.dev.read_at(offset, buf)?)
    }

    fn write(&mut self, offset: u64, buf: &[u8]) -> Result<(), DiskError> {
        check_request(offset, buf.len() as u64, self.size)?;
        Ok(self.dev.write_at(offset, buf)?)
    }

    fn flush(&mut self) -> Result<(), DiskError> {
        Ok(self.dev.flush()?)
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<(), DiskError> {
        check_request(offset, len, self.size)?;
        Ok(self.dev.discard(offset, len)?)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, _may_unmap: bool) -> Result<(), DiskError> {
        check_request(offset, len, self.size)?;
        Ok(self.dev.write_zeroes(offset, len)?)
    }

    fn block_status(&mut self, offset: u64, len: u64) -> Result<Extent, DiskError> {
        check_request(offset, len, self.size)?;
        // A raw device does not know which of its bytes are allocated: all of it is data.
        Ok(Extent {
            len,
            kind: Allocation::Data,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::MemDisk;

    #[test]
    fn raw_disk_round_trip_and_bounds() {
        let mut d = RawDisk::new(MemDisk::fixed(4096));
        d.write(100, b"hello").unwrap();
        let mut buf = [0u8; 5];
        d.read(100, &mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        assert_eq!(d.read(4095, &mut [0u8; 2]), Err(DiskError::Invalid));
        d.write_zeroes(100, 5, true).unwrap();
        d.read(100, &mut buf).unwrap();
        assert_eq!(buf, [0; 5]);
    }
}
