//! Device errors under the image: what the engine reports when its device fails a write,
//! and what it leaves behind.
//!
//! virtio-blk has one status for every failure on the host (`VIRTIO_BLK_S_IOERR`): a full
//! host filesystem and a bad sector look the same to the guest. The engine tells them apart
//! by what the failed write was doing:
//! - writing guest data into clusters the request has just allocated (space the host file
//!   has to find: the image grows into a hole or past the file's old end) is
//!   [`Qcow2Error::NoSpace`] (NBD `ENOSPC`);
//! - every other failure (an overwrite in place, a read, a metadata write-back, a device
//!   flush) stays [`Qcow2Error::Device`] (NBD `EIO`). A flush never reports `NoSpace`.
//!
//! What a failure leaves: an L2 entry points at new data only after that data was written,
//! so a failed data write references nothing; its new clusters are given back (their
//! refcounts drop at the next metadata write-back, like any deferred free), so it leaks
//! nothing. Dirty metadata stays dirty in the caches until a write-back of it succeeds, so
//! a failed write-back is retried by the next flush (or the guest's idle write-back), in the
//! same crash-safe order. The image on the device stays consistent throughout.

use super::Qcow2;
use super::error::Qcow2Error;
use crate::block::{BlockDevice, BlockError};

impl<D: BlockDevice> Qcow2<D> {
    /// The error to report for a failed write of guest data into the `n` clusters from host
    /// cluster `first`, which the request has just allocated and nothing references: gives
    /// the clusters back and names a device I/O error for what it most likely is, a full
    /// host filesystem.
    pub(crate) fn fresh_write_failed(&mut self, first: u64, n: u64, e: Qcow2Error) -> Qcow2Error {
        if let Err(free) = self.queue_free(first, n) {
            // The free is queued; only the write-back it triggered failed (retried later).
            log::warn!("qcow2: metadata write-back after a failed data write: {free}");
        }
        match e {
            Qcow2Error::Device(BlockError::Io) => Qcow2Error::NoSpace,
            other => other,
        }
    }
}

/// The error a failed flush reports: a device I/O error, never [`Qcow2Error::NoSpace`] (the
/// data a flush could not make durable was accepted earlier; the client must treat it as
/// lost, which `EIO` says).
pub(crate) fn flush_error(e: Qcow2Error) -> Qcow2Error {
    match e {
        Qcow2Error::NoSpace => Qcow2Error::Device(BlockError::Io),
        other => other,
    }
}
