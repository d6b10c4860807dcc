//! Telling a qcow2 image from other bytes when the format is not given (`format=auto`): the
//! intact magic says qcow2; a damaged magic in front of an otherwise plausible qcow2 header
//! says "a broken qcow2 image", which must not be taken for a raw disk (exporting it raw
//! would let a client overwrite the image's metadata).

use super::header::{MAGIC, V2_HEADER_LEN, V3_HEADER_LEN};
use super::layout::{MAX_CLUSTER_BITS, MIN_CLUSTER_BITS};

/// What the first bytes of a device hold, as far as `format=auto` cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// The qcow2 magic: open it with the engine.
    Qcow2,
    /// A qcow2 header whose magic is damaged: refuse unless the format is given.
    DamagedQcow2,
    /// Anything else: the bytes are the disk.
    Raw,
}

/// How many bytes [`probe`] looks at (a version 3 header's fixed part).
pub const PROBE_LEN: usize = V3_HEADER_LEN;

/// Classifies the first bytes of a device (give it at least [`PROBE_LEN`] bytes, or all the
/// device has). A magic with at least two of its four bytes intact, followed by a header
/// whose version (2 or 3), cluster bits (9 to 21), encryption method (0 to 2), table
/// offsets (cluster-aligned, a refcount table present) and, for version 3, refcount order
/// (at most 6) and header length (at least 104, a multiple of 8) are all plausible, is a
/// damaged qcow2 image: raw data matches all of that by chance essentially never.
pub fn probe(first: &[u8]) -> Probe {
    if first.len() >= 4 && first[..4] == MAGIC.to_be_bytes() {
        return Probe::Qcow2;
    }
    if looks_like_damaged_qcow2(first) {
        Probe::DamagedQcow2
    } else {
        Probe::Raw
    }
}

/// Whether `first` is a qcow2 header with a damaged magic (see [`probe`]); false for an
/// intact one.
pub fn looks_like_damaged_qcow2(first: &[u8]) -> bool {
    if first.len() < V2_HEADER_LEN {
        return false;
    }
    let be32 =
        |at: usize| u32::from_be_bytes([first[at], first[at + 1], first[at + 2], first[at + 3]]);
    let be64 = |at: usize| (u64::from(be32(at)) << 32) | u64::from(be32(at + 4));
    let magic = be32(0);
    if magic == MAGIC {
        return false;
    }
    let intact_bytes = magic
        .to_be_bytes()
        .iter()
        .zip(MAGIC.to_be_bytes())
        .filter(|(a, b)| **a == *b)
        .count();
    if intact_bytes < 2 {
        return false;
    }
    let version = be32(4);
    let cluster_bits = be32(20);
    if !(version == 2 || version == 3)
        || !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits)
    {
        return false;
    }
    let cluster_mask = (1u64 << cluster_bits) - 1;
    let crypt_method = be32(32);
    let l1_table_offset = be64(40);
    let refcount_table_offset = be64(48);
    let refcount_table_clusters = be32(56);
    if crypt_method > 2
        || l1_table_offset & cluster_mask != 0
        || refcount_table_offset == 0
        || refcount_table_offset & cluster_mask != 0
        || refcount_table_clusters == 0
    {
        return false;
    }
    if version == 3 {
        if first.len() < V3_HEADER_LEN {
            return false;
        }
        let refcount_order = be32(96);
        let header_length = be32(100);
        if refcount_order > 6 || header_length < V3_HEADER_LEN as u32 || header_length % 8 != 0 {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::MemDisk;
    use crate::qcow2::{CreateOptions, Qcow2};

    fn fresh_header(version: u32) -> alloc::vec::Vec<u8> {
        let opts = CreateOptions {
            virtual_size: 64 << 20,
            ..CreateOptions::default()
        };
        let image = Qcow2::create(MemDisk::default(), &opts).unwrap();
        let mut dev = image.close().unwrap();
        let mut first = alloc::vec![0u8; PROBE_LEN];
        crate::block::BlockDevice::read_at(&mut dev, 0, &mut first).unwrap();
        // A version 2 header is the same fixed part (its first 72 bytes).
        first[4..8].copy_from_slice(&version.to_be_bytes());
        first
    }

    #[test]
    fn intact_images_are_qcow2_and_damaged_magics_are_caught() {
        for version in [2, 3] {
            let good = fresh_header(version);
            assert_eq!(probe(&good), Probe::Qcow2, "v{version}");
            assert!(!looks_like_damaged_qcow2(&good));
            // One flipped bit, one overwritten byte, two overwritten bytes.
            for (at, value) in [(0, b'Q' ^ 0x01), (3, 0x00), (1, 0x41)] {
                let mut bad = good.clone();
                bad[at] = value;
                assert_eq!(probe(&bad), Probe::DamagedQcow2, "v{version} byte {at}");
            }
            let mut bad = good.clone();
            bad[..2].copy_from_slice(b"XX");
            assert_eq!(probe(&bad), Probe::DamagedQcow2, "v{version}, two bytes");
            // Three bytes gone: too little of the magic is left to call it qcow2.
            bad[..3].copy_from_slice(b"XXX");
            assert_eq!(probe(&bad), Probe::Raw, "v{version}, three bytes");
        }
    }

    #[test]
    fn a_damaged_magic_with_an_implausible_header_is_raw() {
        let good = fresh_header(3);
        let mut bad = good.clone();
        bad[3] = 0;
        assert_eq!(probe(&bad), Probe::DamagedQcow2);
        // Each implausible field alone makes it raw data.
        for (at, value) in [
            (4usize, 4u32), // version
            (20, 8),        // cluster bits too small
            (20, 22),       // cluster bits too large
            (32, 3),        // encryption method
            (52, 0x200),    // refcount table offset not cluster-aligned (low word)
            (56, 0),        // no refcount table clusters
            (96, 7),        // refcount order
            (100, 100),     // v3 header length
        ] {
            let mut b = bad.clone();
            b[at..at + 4].copy_from_slice(&value.to_be_bytes());
            assert_eq!(probe(&b), Probe::Raw, "field at {at} = {value}");
        }
    }

    #[test]
    fn ordinary_raw_bytes_are_raw() {
        assert_eq!(probe(&[]), Probe::Raw);
        assert_eq!(probe(b"QFI"), Probe::Raw);
        assert_eq!(probe(&[0u8; 512]), Probe::Raw);
        assert_eq!(probe(&[0xffu8; 512]), Probe::Raw);
        // A boot sector, and text.
        let mut mbr = [0u8; 512];
        mbr[0..3].copy_from_slice(&[0xeb, 0x63, 0x90]);
        mbr[510..].copy_from_slice(&[0x55, 0xaa]);
        assert_eq!(probe(&mbr), Probe::Raw);
        assert_eq!(probe(&[b'a'; 512]), Probe::Raw);
        // A header cut short is not enough to call it damaged qcow2.
        let mut short = fresh_header(3);
        short[3] = 0;
        assert_eq!(probe(&short[..V2_HEADER_LEN - 1]), Probe::Raw);
    }
}
