//! The image header: version 2 and 3 layouts, header extensions (kept verbatim), the
//! feature-name table and the feature bits.

use super::compress::CompressionType;
use super::error::{Qcow2Error, Result};
use super::layout::{MAX_CLUSTER_BITS, MIN_CLUSTER_BITS};
use alloc::string::String;
use alloc::vec::Vec;

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;
/// Header length of a version 2 image (and the fixed part of every header).
pub const V2_HEADER_LEN: usize = 72;
/// Minimum header length of a version 3 image.
pub const V3_HEADER_LEN: usize = 104;

/// Incompatible bit 0: refcounts may be stale (lazy refcounts); rebuild before writing.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible bit 1: the image is corrupt; do not write.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible bit 2: guest data lives in an external data file.
pub const INCOMPAT_EXTERNAL_DATA: u64 = 1 << 2;
/// Incompatible bit 3: a non-zlib compression type is used.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible bit 4: extended L2 entries (subclusters).
pub const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
/// Every incompatible bit the format defines today.
pub const INCOMPAT_KNOWN: u64 = INCOMPAT_DIRTY
    | INCOMPAT_CORRUPT
    | INCOMPAT_EXTERNAL_DATA
    | INCOMPAT_COMPRESSION
    | INCOMPAT_EXTENDED_L2;
/// Compatible bit 0: lazy refcounts may be used.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear bit 0: the bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// Autoclear bit 1: the external data file is a consistent raw image.
pub const AUTOCLEAR_RAW_EXTERNAL: u64 = 1 << 1;

/// Header extension: end of the extension area.
pub const EXT_END: u32 = 0;
/// Header extension: backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension: feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Header extension: bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Header extension: full disk encryption header pointer.
pub const EXT_CRYPTO: u32 = 0x0537_be77;
/// Header extension: external data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Which feature bitmap a feature-name entry describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureKind {
    /// `incompatible_features`.
    Incompatible,
    /// `compatible_features`.
    Compatible,
    /// `autoclear_features`.
    Autoclear,
    /// A type byte the spec does not define (kept for display).
    Other(u8),
}

impl FeatureKind {
    fn from_byte(b: u8) -> Self {
        match b {
            0 => FeatureKind::Incompatible,
            1 => FeatureKind::Compatible,
            2 => FeatureKind::Autoclear,
            x => FeatureKind::Other(x),
        }
    }

    fn to_byte(self) -> u8 {
        match self {
            FeatureKind::Incompatible => 0,
            FeatureKind::Compatible => 1,
            FeatureKind::Autoclear => 2,
            FeatureKind::Other(x) => x,
        }
    }
}

/// One entry of the feature-name table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// Which bitmap.
    pub kind: FeatureKind,
    /// Bit number (0..=63).
    pub bit: u8,
    /// Name, up to 46 bytes.
    pub name: String,
}

/// A header extension, kept byte for byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extension {
    /// Extension type.
    pub kind: u32,
    /// Extension data (without padding).
    pub data: Vec<u8>,
}

/// A parsed image header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Offset of the backing file name, 0 if none.
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// 0: none, 1: AES, 2: LUKS.
    pub crypt_method: u32,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Host offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Host offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters the refcount table occupies.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Host offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits (v3).
    pub incompatible_features: u64,
    /// Compatible feature bits (v3).
    pub compatible_features: u64,
    /// Autoclear feature bits (v3).
    pub autoclear_features: u64,
    /// log2 of the refcount width (4 for v2).
    pub refcount_order: u32,
    /// Header length in bytes (72 for v2).
    pub header_length: u32,
    /// Bytes of the header after byte 104 (compression type, padding, future fields), kept
    /// verbatim.
    pub tail: Vec<u8>,
    /// Header extensions in on-disk order (the end marker excluded).
    pub extensions: Vec<Extension>,
    /// The feature-name table, if the image has one.
    pub feature_names: Vec<FeatureName>,
    /// Backing file name, if any.
    pub backing_file: Option<String>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

impl Header {
    /// Parses the header, its extensions and the backing file name from the first bytes of
    /// the image (`first` should hold the whole first cluster, or at least 72 bytes to learn
    /// the cluster size). Only checks what the header alone can tell; the engine validates
    /// offsets against the device.
    pub fn parse(first: &[u8]) -> Result<Header> {
        if first.len() < V2_HEADER_LEN {
            return Err(Qcow2Error::NotQcow2);
        }
        if be32(first, 0) != MAGIC {
            return Err(Qcow2Error::NotQcow2);
        }
        let version = be32(first, 4);
        if version != 2 && version != 3 {
            return Err(Qcow2Error::UnsupportedVersion(version));
        }
        let cluster_bits = be32(first, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(Qcow2Error::BadHeader(
                "cluster_bits outside 9..=21 (cluster size 512 B to 2 MiB)",
            ));
        }
        let cluster_size = 1usize << cluster_bits;
        let mut h = Header {
            version,
            backing_file_offset: be64(first, 8),
            backing_file_size: be32(first, 16),
            cluster_bits,
            size: be64(first, 24),
            crypt_method: be32(first, 32),
            l1_size: be32(first, 36),
            l1_table_offset: be64(first, 40),
            refcount_table_offset: be64(first, 48),
            refcount_table_clusters: be32(first, 56),
            nb_snapshots: be32(first, 60),
            snapshots_offset: be64(first, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN as u32,
            tail: Vec::new(),
            extensions: Vec::new(),
            feature_names: Vec::new(),
            backing_file: None,
        };
        if version == 3 {
            if first.len() < V3_HEADER_LEN {
                return Err(Qcow2Error::BadHeader("version 3 header truncated"));
            }
            h.incompatible_features = be64(first, 72);
            h.compatible_features = be64(first, 80);
            h.autoclear_features = be64(first, 88);
            h.refcount_order = be32(first, 96);
            h.header_length = be32(first, 100);
            let hl = h.header_length as usize;
            if hl < V3_HEADER_LEN || !hl.is_multiple_of(8) {
                return Err(Qcow2Error::BadHeader(
                    "header_length is below 104 or not a multiple of 8",
                ));
            }
            if hl > cluster_size || hl > first.len() {
                return Err(Qcow2Error::BadHeader(
                    "header_length reaches past the first cluster",
                ));
            }
            if h.refcount_order > 6 {
                return Err(Qcow2Error::BadHeader(
                    "refcount_order above 6 (64-bit refcounts)",
                ));
            }
            h.tail = first[V3_HEADER_LEN..hl].to_vec();
        }
        if !h.l1_table_offset.is_multiple_of(cluster_size as u64) {
            return Err(Qcow2Error::BadHeader(
                "the L1 table offset is not aligned to a cluster",
            ));
        }
        if !h.refcount_table_offset.is_multiple_of(cluster_size as u64)
            || h.refcount_table_offset == 0
        {
            return Err(Qcow2Error::BadHeader(
                "the refcount table offset is zero or not aligned to a cluster",
            ));
        }
        if h.refcount_table_clusters == 0 {
            return Err(Qcow2Error::BadHeader("the refcount table has no clusters"));
        }
        if h.nb_snapshots > 0 && !h.snapshots_offset.is_multiple_of(cluster_size as u64) {
            return Err(Qcow2Error::BadHeader(
                "the snapshot table offset is not aligned to a cluster",
            ));
        }
        h.parse_extensions(first, cluster_size)?;
        if h.backing_file_offset != 0 {
            let off = h.backing_file_offset as usize;
            let len = h.backing_file_size as usize;
            if len > 1023 || h.backing_file_offset > cluster_size as u64 || off + len > first.len()
            {
                return Err(Qcow2Error::BadHeader(
                    "the backing file name lies outside the first cluster or exceeds 1023 bytes",
                ));
            }
            h.backing_file = Some(String::from_utf8_lossy(&first[off..off + len]).into_owned());
        }
        Ok(h)
    }

    fn parse_extensions(&mut self, first: &[u8], cluster_size: usize) -> Result<()> {
        let end = first.len().min(cluster_size);
        let mut at = self.header_length as usize;
        if self.version == 2 {
            at = V2_HEADER_LEN;
        }
        loop {
            if at + 8 > end {
                // v2 images may have no end marker room; treat the end of the cluster as end.
                return Ok(());
            }
            let kind = be32(first, at);
            let len = be32(first, at + 4) as usize;
            if kind == EXT_END {
                return Ok(());
            }
            let data_start = at + 8;
            if len > end - data_start {
                return Err(Qcow2Error::BadHeader(
                    "a header extension reaches past the first cluster",
                ));
            }
            let data = first[data_start..data_start + len].to_vec();
            if kind == EXT_FEATURE_TABLE {
                for e in data.chunks_exact(48) {
                    let raw = &e[2..48];
                    let n = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
                    self.feature_names.push(FeatureName {
                        kind: FeatureKind::from_byte(e[0]),
                        bit: e[1],
                        name: String::from_utf8_lossy(&raw[..n]).into_owned(),
                    });
                }
            }
            self.extensions.push(Extension { kind, data });
            at = data_start + len.div_ceil(8) * 8;
        }
    }

    /// Refuses features this engine cannot handle. `writable` adds the write-only rules.
    pub fn check_features(&self, writable: bool) -> Result<()> {
        let unknown = self.incompatible_features & !INCOMPAT_KNOWN;
        if unknown != 0 {
            let bit = unknown.trailing_zeros();
            let name = self
                .feature_names
                .iter()
                .find(|f| f.kind == FeatureKind::Incompatible && f.bit as u32 == bit)
                .map(|f| {
                    let mut s = heapless::String::<46>::new();
                    for c in f.name.chars() {
                        if s.push(c).is_err() {
                            break;
                        }
                    }
                    s
                });
            return Err(Qcow2Error::UnknownIncompatibleFeature { bit, name });
        }
        if self.incompatible_features & INCOMPAT_EXTERNAL_DATA != 0 {
            return Err(Qcow2Error::Unsupported(
                "an external data file (incompatible bit 2)",
            ));
        }
        if self.incompatible_features & INCOMPAT_EXTENDED_L2 != 0 && self.cluster_bits < 14 {
            return Err(Qcow2Error::Unsupported(
                "extended L2 entries with clusters under 16 KiB (subclusters under 512 bytes)",
            ));
        }
        self.compression_type()?;
        if self.crypt_method != 0 {
            return Err(Qcow2Error::Unsupported("encryption"));
        }
        if writable && self.incompatible_features & INCOMPAT_CORRUPT != 0 {
            return Err(Qcow2Error::MarkedCorrupt);
        }
        Ok(())
    }

    /// The fixed header (`header_length` bytes) in on-disk form. Extensions are not part of
    /// it: they stay on disk as they are.
    pub fn encode_fixed(&self) -> Vec<u8> {
        let len = self.header_length as usize;
        let mut b = alloc::vec![0u8; len];
        put32(&mut b, 0, MAGIC);
        put32(&mut b, 4, self.version);
        put64(&mut b, 8, self.backing_file_offset);
        put32(&mut b, 16, self.backing_file_size);
        put32(&mut b, 20, self.cluster_bits);
        put64(&mut b, 24, self.size);
        put32(&mut b, 32, self.crypt_method);
        put32(&mut b, 36, self.l1_size);
        put64(&mut b, 40, self.l1_table_offset);
        put64(&mut b, 48, self.refcount_table_offset);
        put32(&mut b, 56, self.refcount_table_clusters);
        put32(&mut b, 60, self.nb_snapshots);
        put64(&mut b, 64, self.snapshots_offset);
        if self.version >= 3 {
            put64(&mut b, 72, self.incompatible_features);
            put64(&mut b, 80, self.compatible_features);
            put64(&mut b, 88, self.autoclear_features);
            put32(&mut b, 96, self.refcount_order);
            put32(&mut b, 100, self.header_length);
            b[V3_HEADER_LEN..].copy_from_slice(&self.tail[..len - V3_HEADER_LEN]);
        }
        b
    }

    /// The extension area (extensions, padding and end marker) in on-disk form.
    pub fn encode_extensions(&self) -> Vec<u8> {
        let mut b = Vec::new();
        for e in &self.extensions {
            b.extend_from_slice(&e.kind.to_be_bytes());
            b.extend_from_slice(&(e.data.len() as u32).to_be_bytes());
            b.extend_from_slice(&e.data);
            b.resize(b.len().div_ceil(8) * 8, 0);
        }
        b.extend_from_slice(&[0u8; 8]);
        b
    }

    /// A fresh version 3 header (no extensions yet).
    pub fn new_v3(cluster_bits: u32, refcount_order: u32, size: u64) -> Header {
        Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits,
            size,
            crypt_method: 0,
            l1_size: 0,
            l1_table_offset: 0,
            refcount_table_offset: 0,
            refcount_table_clusters: 0,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order,
            // 104 bytes plus the compression type byte and padding, as QEMU writes.
            header_length: 112,
            tail: alloc::vec![0u8; 8],
            extensions: Vec::new(),
            feature_names: Vec::new(),
            backing_file: None,
        }
    }

    /// Adds the feature-name table describing every feature bit the format defines.
    pub fn add_feature_table(&mut self) {
        const NAMES: [(FeatureKind, u8, &str); 8] = [
            (FeatureKind::Incompatible, 0, "dirty bit"),
            (FeatureKind::Incompatible, 1, "corrupt bit"),
            (FeatureKind::Incompatible, 2, "external data file"),
            (FeatureKind::Incompatible, 3, "compression type"),
            (FeatureKind::Incompatible, 4, "extended L2 entries"),
            (FeatureKind::Compatible, 0, "lazy refcounts"),
            (FeatureKind::Autoclear, 0, "bitmaps"),
            (FeatureKind::Autoclear, 1, "raw external data"),
        ];
        let mut data = Vec::with_capacity(NAMES.len() * 48);
        for (kind, bit, name) in NAMES {
            let mut e = [0u8; 48];
            e[0] = kind.to_byte();
            e[1] = bit;
            e[2..2 + name.len()].copy_from_slice(name.as_bytes());
            data.extend_from_slice(&e);
            self.feature_names.push(FeatureName {
                kind,
                bit,
                name: String::from(name),
            });
        }
        self.extensions.push(Extension {
            kind: EXT_FEATURE_TABLE,
            data,
        });
    }

    /// The compression type of compressed clusters (byte 104 of a version 3 header longer
    /// than 104 bytes; zlib otherwise). A type the format does not define, or a type that
    /// disagrees with incompatible bit 3, is an error.
    pub fn compression_type(&self) -> Result<CompressionType> {
        let byte = if self.version >= 3 {
            self.tail.first().copied().unwrap_or(0)
        } else {
            0
        };
        let bit = self.incompatible_features & INCOMPAT_COMPRESSION != 0;
        match CompressionType::from_byte(byte) {
            None => Err(Qcow2Error::BadHeader(
                "unknown compression type (header byte 104 is neither 0 = zlib nor 1 = zstd)",
            )),
            Some(CompressionType::Zlib) if bit => Err(Qcow2Error::BadHeader(
                "incompatible bit 3 (compression type) is set but the compression type is zlib",
            )),
            Some(CompressionType::Zstd) if !bit => Err(Qcow2Error::BadHeader(
                "the compression type is zstd but incompatible bit 3 (compression type) is clear",
            )),
            Some(t) => Ok(t),
        }
    }

    /// Sets the compression type (version 3 headers with room for byte 104, as
    /// [`Header::new_v3`] makes) and incompatible bit 3 with it.
    pub fn set_compression_type(&mut self, t: CompressionType) {
        if let Some(b) = self.tail.first_mut() {
            *b = t.to_byte();
        }
        if t == CompressionType::Zlib {
            self.incompatible_features &= !INCOMPAT_COMPRESSION;
        } else {
            self.incompatible_features |= INCOMPAT_COMPRESSION;
        }
    }

    /// Whether the lazy-refcounts compatible bit is set.
    pub fn lazy_refcounts(&self) -> bool {
        self.compatible_features & COMPAT_LAZY_REFCOUNTS != 0
    }

    /// The name the feature-name table gives a bit, if any.
    pub fn feature_name(&self, kind: FeatureKind, bit: u32) -> Option<&str> {
        self.feature_names
            .iter()
            .find(|f| f.kind == kind && f.bit as u32 == bit)
            .map(|f| f.name.as_str())
    }
}
