//! L1 and L2 table entries: their bits, and the [`Mapping`] a guest cluster has.

use super::error::{Qcow2Error, Result};
use super::layout::Geometry;

/// Entry bit 63: the cluster's refcount is exactly one (writable in place).
pub const COPIED: u64 = 1 << 63;
/// L2 entry bit 62: a compressed cluster.
pub const COMPRESSED: u64 = 1 << 62;
/// Standard cluster descriptor bit 0: the cluster reads as zeros (version 3).
pub const ZERO: u64 = 1;
/// Bits 9..=55: a host cluster offset.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bits an L1 entry must have clear (reserved).
pub const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Bits a standard L2 entry must have clear (reserved; bit 0 is the zero flag).
pub const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;

/// What a guest cluster maps to, decoded from its L2 entry.
///
/// Later features (subclusters, backing files) add variants; match with a wildcard outside
/// this module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Mapping {
    /// Not allocated: reads as zeros (there is no backing file).
    Unallocated,
    /// Reads as zeros; `host` is a preallocated cluster that keeps its space.
    Zero {
        /// Preallocated host cluster, if any.
        host: Option<u64>,
        /// The COPIED flag (refcount is one).
        copied: bool,
    },
    /// A data cluster at `host`.
    Data {
        /// Host offset of the cluster.
        host: u64,
        /// The COPIED flag (refcount is one).
        copied: bool,
    },
    /// A compressed cluster: `len` bytes of compressed data at `host` (not aligned).
    Compressed {
        /// Host byte offset of the compressed data.
        host: u64,
        /// Upper bound of the compressed length in bytes (whole 512-byte sectors).
        len: u64,
    },
}

/// The kind of a run in [`super::Qcow2::map`] output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ClusterKind {
    /// Allocated data.
    Data,
    /// Reads as zeros (zero flag).
    Zero,
    /// Not allocated.
    Unallocated,
    /// Compressed data.
    Compressed,
}

impl Mapping {
    /// Decodes an L2 entry. `version` decides whether the zero flag exists.
    pub fn decode(entry: u64, g: &Geometry, version: u32) -> Result<Mapping> {
        if entry & COMPRESSED != 0 {
            // x = 62 - (cluster_bits - 8): offset bits below, sector count above.
            let x = 62 - (g.cluster_bits - 8);
            let host = entry & ((1u64 << x) - 1);
            let sectors = ((entry & !(COPIED | COMPRESSED)) >> x) + 1;
            if host >= super::layout::MAX_HOST_OFFSET {
                return Err(Qcow2Error::Corrupt(
                    "compressed cluster offset out of range",
                ));
            }
            let len = sectors * 512 - (host & 511);
            return Ok(Mapping::Compressed { host, len });
        }
        let copied = entry & COPIED != 0;
        let host = entry & OFFSET_MASK;
        if entry & L2_RESERVED != 0 {
            return Err(Qcow2Error::Corrupt("reserved bits set in an L2 entry"));
        }
        if host & (g.cluster_size() - 1) != 0 {
            return Err(Qcow2Error::Corrupt(
                "an L2 entry points to an unaligned host cluster",
            ));
        }
        if version >= 3 && entry & ZERO != 0 {
            return Ok(Mapping::Zero {
                host: (host != 0).then_some(host),
                copied,
            });
        }
        if host == 0 {
            if copied {
                return Err(Qcow2Error::Corrupt(
                    "an L2 entry points into the image header",
                ));
            }
            return Ok(Mapping::Unallocated);
        }
        Ok(Mapping::Data { host, copied })
    }

    /// The run kind of this mapping.
    pub fn kind(&self) -> ClusterKind {
        match self {
            Mapping::Unallocated => ClusterKind::Unallocated,
            Mapping::Zero { .. } => ClusterKind::Zero,
            Mapping::Data { .. } => ClusterKind::Data,
            Mapping::Compressed { .. } => ClusterKind::Compressed,
        }
    }

    /// The host cluster this mapping holds a reference to (not for compressed clusters).
    pub fn host_cluster(&self) -> Option<u64> {
        match *self {
            Mapping::Data { host, .. } => Some(host),
            Mapping::Zero { host, .. } => host,
            _ => None,
        }
    }
}

/// Decodes an L1 entry into the L2 table offset (None: unallocated) and its COPIED flag.
pub fn decode_l1(entry: u64, g: &Geometry) -> Result<Option<(u64, bool)>> {
    let off = entry & OFFSET_MASK;
    if entry & L1_RESERVED != 0 {
        return Err(Qcow2Error::Corrupt("reserved bits set in an L1 entry"));
    }
    if off & (g.cluster_size() - 1) != 0 {
        return Err(Qcow2Error::Corrupt(
            "an L1 entry points to an unaligned L2 table",
        ));
    }
    if off == 0 {
        return Ok(None);
    }
    Ok(Some((off, entry & COPIED != 0)))
}
