//! L1 and L2 table entries: their bits, and the [`Mapping`] a guest cluster has.

use super::cache::{get_u64, set_u64};
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
    /// Extended L2 entries only: a cluster whose 32 subclusters are not all of one kind.
    /// Subcluster `x` holds data at `host + x * subcluster_size` when bit `x` of `alloc` is
    /// set, reads as zeros when bit `x` of `zero` is set, and is unallocated otherwise.
    Subclusters {
        /// Host cluster (None: no subcluster is allocated).
        host: Option<u64>,
        /// The COPIED flag (refcount is one).
        copied: bool,
        /// Allocation bitmap (bit x: subcluster x holds data).
        alloc: u32,
        /// Zero bitmap (bit x: subcluster x reads as zeros).
        zero: u32,
    },
}

/// Every subcluster of a cluster (a full allocation or zero bitmap).
pub const ALL_SUBCLUSTERS: u32 = u32::MAX;

/// The bitmap of subclusters `first..end` (end at most 32).
pub fn subcluster_mask(first: u32, end: u32) -> u32 {
    if first >= end {
        return 0;
    }
    let upper = if end >= 32 {
        u32::MAX
    } else {
        (1u32 << end) - 1
    };
    upper & !((1u32 << first) - 1)
}

/// The raw words of L2 entry `i` of a table: the entry and (extended L2 only, else 0) its
/// subcluster bitmap.
#[inline]
pub fn l2_raw(g: &Geometry, data: &[u8], i: usize) -> (u64, u64) {
    if g.extended_l2 {
        (get_u64(data, 2 * i), get_u64(data, 2 * i + 1))
    } else {
        (get_u64(data, i), 0)
    }
}

/// Writes the raw words of L2 entry `i` into `data` (the bitmap only with extended L2).
#[inline]
pub fn put_l2_raw(g: &Geometry, data: &mut [u8], i: usize, raw: (u64, u64)) {
    if g.extended_l2 {
        set_u64(data, 2 * i, raw.0);
        set_u64(data, 2 * i + 1, raw.1);
    } else {
        set_u64(data, i, raw.0);
    }
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
    /// Decodes L2 entry `i` of a table (standard or extended, as the geometry says).
    pub fn from_table(data: &[u8], i: usize, g: &Geometry, version: u32) -> Result<Mapping> {
        Mapping::from_raw(l2_raw(g, data, i), g, version)
    }

    /// Decodes the raw words (entry, bitmap) of an L2 entry, standard or extended as the
    /// geometry says.
    pub fn from_raw(raw: (u64, u64), g: &Geometry, version: u32) -> Result<Mapping> {
        let (entry, bitmap) = raw;
        if g.extended_l2 {
            Mapping::decode_extended(entry, bitmap, g)
        } else {
            Mapping::decode(entry, g, version)
        }
    }

    /// Decodes an extended L2 entry and its subcluster bitmap. Uniform clusters decode to
    /// the same variants as standard entries; mixed ones to [`Mapping::Subclusters`].
    pub fn decode_extended(entry: u64, bitmap: u64, g: &Geometry) -> Result<Mapping> {
        if entry & COMPRESSED != 0 {
            if bitmap != 0 {
                return Err(Qcow2Error::Corrupt(
                    "a compressed cluster has a nonzero subcluster bitmap",
                ));
            }
            return Mapping::decode(entry, g, 3);
        }
        if entry & ZERO != 0 {
            return Err(Qcow2Error::Corrupt(
                "an extended L2 entry has the (reserved) zero flag set",
            ));
        }
        let alloc = bitmap as u32;
        let zero = (bitmap >> 32) as u32;
        if alloc & zero != 0 {
            return Err(Qcow2Error::Corrupt(
                "a subcluster is marked both allocated and zero",
            ));
        }
        let m = Mapping::decode(entry, g, 3)?;
        let (host, copied) = match m {
            Mapping::Unallocated => {
                if alloc != 0 {
                    return Err(Qcow2Error::Corrupt(
                        "an unallocated cluster has allocated subclusters",
                    ));
                }
                (None, false)
            }
            Mapping::Data { host, copied } => (Some(host), copied),
            _ => return Err(Qcow2Error::Corrupt("an invalid extended L2 entry")),
        };
        Ok(Mapping::normalise(host, copied, alloc, zero))
    }

    /// The mapping of a cluster with these subcluster bitmaps, as a uniform variant where
    /// the bitmaps allow.
    pub fn normalise(host: Option<u64>, copied: bool, alloc: u32, zero: u32) -> Mapping {
        match (host, alloc, zero) {
            (None, 0, 0) => Mapping::Unallocated,
            (Some(host), ALL_SUBCLUSTERS, _) => Mapping::Data { host, copied },
            (host, 0, ALL_SUBCLUSTERS) => Mapping::Zero { host, copied },
            _ => Mapping::Subclusters {
                host,
                copied,
                alloc,
                zero,
            },
        }
    }

    /// The raw L2 words (entry, bitmap) of this mapping; the bitmap is 0 unless `g` has
    /// extended L2 entries. Compressed mappings keep only their offset and length bits as
    /// decoded (callers never re-encode them).
    pub fn encode(&self, g: &Geometry) -> (u64, u64) {
        let flag = |copied: bool| if copied { COPIED } else { 0 };
        if !g.extended_l2 {
            return match *self {
                Mapping::Unallocated => (0, 0),
                Mapping::Zero { host, copied } => (host.unwrap_or(0) | ZERO | flag(copied), 0),
                Mapping::Data { host, copied } => (host | flag(copied), 0),
                Mapping::Compressed { .. } | Mapping::Subclusters { .. } => {
                    unreachable!("no re-encoding of compressed or subcluster entries")
                }
            };
        }
        let bits = |alloc: u32, zero: u32| alloc as u64 | (zero as u64) << 32;
        match *self {
            Mapping::Unallocated => (0, 0),
            Mapping::Zero { host, copied } => {
                (host.unwrap_or(0) | flag(copied), bits(0, ALL_SUBCLUSTERS))
            }
            Mapping::Data { host, copied } => (host | flag(copied), bits(ALL_SUBCLUSTERS, 0)),
            Mapping::Subclusters {
                host,
                copied,
                alloc,
                zero,
            } => (host.unwrap_or(0) | flag(copied), bits(alloc, zero)),
            Mapping::Compressed { .. } => unreachable!("no re-encoding of compressed entries"),
        }
    }

    /// The subcluster bitmaps (allocated, zero) of this mapping, as if it were extended.
    pub fn bitmaps(&self) -> (u32, u32) {
        match *self {
            Mapping::Unallocated => (0, 0),
            Mapping::Zero { .. } => (0, ALL_SUBCLUSTERS),
            Mapping::Data { .. } | Mapping::Compressed { .. } => (ALL_SUBCLUSTERS, 0),
            Mapping::Subclusters { alloc, zero, .. } => (alloc, zero),
        }
    }

    /// The kind of subcluster `x` (any `x` for uniform mappings).
    pub fn subcluster_kind(&self, x: u32) -> ClusterKind {
        match *self {
            Mapping::Subclusters { alloc, zero, .. } => {
                if alloc >> x & 1 != 0 {
                    ClusterKind::Data
                } else if zero >> x & 1 != 0 {
                    ClusterKind::Zero
                } else {
                    ClusterKind::Unallocated
                }
            }
            m => m.kind(),
        }
    }

    /// Decodes a standard L2 entry. `version` decides whether the zero flag exists.
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
            // Mixed: the kind of its first subcluster (see `subcluster_kind`).
            Mapping::Subclusters { .. } => self.subcluster_kind(0),
        }
    }

    /// The host cluster this mapping holds a reference to (not for compressed clusters).
    pub fn host_cluster(&self) -> Option<u64> {
        match *self {
            Mapping::Data { host, .. } => Some(host),
            Mapping::Zero { host, .. } | Mapping::Subclusters { host, .. } => host,
            _ => None,
        }
    }

    /// The COPIED flag of a mapping that holds a host cluster.
    pub fn copied(&self) -> bool {
        match *self {
            Mapping::Data { copied, .. }
            | Mapping::Zero { copied, .. }
            | Mapping::Subclusters { copied, .. } => copied,
            _ => false,
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
