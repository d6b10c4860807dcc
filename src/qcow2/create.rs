//! Creating a fresh image (version 3, or version 2 for `compat=0.10`).

use super::backing::Backing;
use super::cache::{set_refcount, set_u64};
use super::compress::CompressionType;
use super::error::{Qcow2Error, Result};
use super::header::{
    COMPAT_LAZY_REFCOUNTS, EXT_BACKING_FORMAT, Extension, Header, INCOMPAT_EXTENDED_L2,
    V2_HEADER_LEN,
};
use super::layout::{Geometry, MAX_CLUSTER_BITS, MAX_L1_BYTES, MIN_CLUSTER_BITS, max_image_len};
use super::{CreateOptions, Qcow2};
use crate::block::BlockDevice;
use alloc::vec;

/// Longest backing file name (as QEMU: 1023 bytes).
const MAX_BACKING_NAME: usize = 1023;

/// Largest refcount table written at creation (it grows later if needed).
const MAX_INITIAL_RT_BYTES: u64 = 1024 * 1024;

impl<D: BlockDevice> Qcow2<D> {
    /// Writes a new empty image (version [`CreateOptions::version`]) to `dev` and opens it. The virtual size is rounded
    /// up to a multiple of 512 bytes, as `qemu-img create` does.
    ///
    /// Layout: header cluster, refcount table (sized for [`max_image_len`] up to 1 MiB),
    /// refcount blocks counting the initial clusters, the zeroed L1 table.
    pub fn create(dev: D, opts: &CreateOptions) -> Result<Self> {
        Self::create_with_backing(dev, opts, None)
    }

    /// [`Qcow2::create`] for an overlay: writes `opts.backing_file` (and
    /// `opts.backing_format`) into the header and opens the new image over `backing`, the
    /// layer that name resolves to (read where the overlay has no clusters of its own).
    pub fn create_with_backing(
        mut dev: D,
        opts: &CreateOptions,
        backing: Option<Backing<D>>,
    ) -> Result<Self> {
        let cs = opts.cluster_size;
        if !cs.is_power_of_two()
            || !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cs.trailing_zeros())
        {
            return Err(Qcow2Error::Invalid(
                "cluster size must be a power of two from 512 B to 2 MiB",
            ));
        }
        let rb = opts.refcount_bits;
        if !rb.is_power_of_two() || rb > 64 {
            return Err(Qcow2Error::Invalid(
                "refcount bits must be 1, 2, 4, 8, 16, 32 or 64",
            ));
        }
        if dev.is_read_only() {
            return Err(Qcow2Error::ReadOnly);
        }
        if opts.extended_l2 && cs < 16 * 1024 {
            return Err(Qcow2Error::Invalid(
                "extended L2 entries need a cluster size of at least 16 KiB",
            ));
        }
        check_version(opts)?;
        let geo = Geometry::new(cs.trailing_zeros(), rb.trailing_zeros())
            .with_extended_l2(opts.extended_l2);
        if opts.virtual_size > i64::MAX as u64 - 511 {
            return Err(Qcow2Error::Invalid("virtual size above 2^63 bytes"));
        }
        // QEMU counts the disk in 512-byte sectors: round up as `qemu-img create` does.
        let virtual_size = opts.virtual_size.next_multiple_of(512);
        let l1_entries = geo.l1_entries_for(virtual_size);
        if l1_entries * 8 > MAX_L1_BYTES {
            return Err(Qcow2Error::Invalid(
                "virtual size too large for this cluster size (L1 table over 32 MiB); use a bigger cluster size",
            ));
        }
        let l1_clusters = geo.clusters_for(l1_entries * 8);
        let epc = cs / 8;
        // Refcount table covering the image's maximum size, within a budget.
        let max_clusters = max_image_len(virtual_size, cs, rb) / cs;
        let want_rt = geo.clusters_for(max_clusters.div_ceil(geo.rb_entries()) * 8);
        let mut rt_clusters = want_rt.clamp(1, (MAX_INITIAL_RT_BYTES / cs).max(1));
        // Refcount blocks for the initial clusters (header, table, blocks, L1).
        let mut nb = 1u64;
        loop {
            let total = 1 + rt_clusters + nb + l1_clusters;
            let need = total.div_ceil(geo.rb_entries());
            let need_rt = geo.clusters_for(need * 8).max(rt_clusters);
            if need == nb && need_rt == rt_clusters {
                break;
            }
            nb = need;
            rt_clusters = need_rt;
        }
        let total = 1 + rt_clusters + nb + l1_clusters;
        if total.checked_mul(cs).is_none_or(|b| b > dev.capacity()) {
            return Err(Qcow2Error::NoSpace);
        }
        let rt_off = cs;
        let blocks_off = rt_off + rt_clusters * cs;
        let l1_off = blocks_off + nb * cs;

        let mut hdr = Header::new_v3(geo.cluster_bits, geo.refcount_order, virtual_size);
        hdr.l1_size = l1_entries as u32;
        hdr.l1_table_offset = l1_off;
        hdr.refcount_table_offset = rt_off;
        hdr.refcount_table_clusters = rt_clusters as u32;
        if opts.lazy_refcounts {
            hdr.compatible_features |= COMPAT_LAZY_REFCOUNTS;
        }
        hdr.set_compression_type(opts.compression_type);
        if opts.extended_l2 {
            hdr.incompatible_features |= INCOMPAT_EXTENDED_L2;
        }
        if let Some(format) = opts.backing_format {
            hdr.extensions.push(Extension {
                kind: EXT_BACKING_FORMAT,
                data: format.name().as_bytes().to_vec(),
            });
        }
        if opts.version == 2 {
            // The 72-byte header, no feature table (as `qemu-img create -o compat=0.10`).
            hdr.version = 2;
            hdr.header_length = V2_HEADER_LEN as u32;
            hdr.tail.clear();
        } else {
            hdr.add_feature_table();
        }
        let backing_name = opts.backing_file.as_deref().unwrap_or("").as_bytes();
        if backing_name.len() > MAX_BACKING_NAME {
            return Err(Qcow2Error::Invalid(
                "the backing file name is longer than 1023 bytes",
            ));
        }
        if opts.backing_file.is_some() {
            if backing_name.is_empty() {
                return Err(Qcow2Error::Invalid("the backing file name is empty"));
            }
            // The name follows the header extensions.
            hdr.backing_file_offset =
                (hdr.encode_fixed().len() + hdr.encode_extensions().len()) as u64;
            hdr.backing_file_size = backing_name.len() as u32;
        }

        let mut buf = vec![0u8; cs as usize];
        // Refcount table.
        for k in 0..rt_clusters {
            buf.fill(0);
            for b in 0..nb {
                if b / epc == k {
                    set_u64(&mut buf, (b % epc) as usize, blocks_off + b * cs);
                }
            }
            dev.write_at(rt_off + k * cs, &buf)?;
        }
        // Refcount blocks: every initial cluster has refcount 1.
        for b in 0..nb {
            buf.fill(0);
            let first = b * geo.rb_entries();
            for c in first..total.min(first + geo.rb_entries()) {
                set_refcount(&mut buf, (c - first) as usize, geo.refcount_order, 1);
            }
            dev.write_at(blocks_off + b * cs, &buf)?;
        }
        // Empty L1 table.
        if l1_clusters > 0 {
            dev.write_zeroes(l1_off, l1_clusters * cs)?;
        }
        // Barrier: the tables are durable before the header that makes them an image.
        dev.flush()?;
        buf.fill(0);
        let fixed = hdr.encode_fixed();
        let ext = hdr.encode_extensions();
        let head_len = fixed.len() + ext.len();
        if head_len + backing_name.len() > buf.len() {
            return Err(Qcow2Error::Invalid(
                "header extensions and backing file name do not fit in one cluster",
            ));
        }
        buf[..fixed.len()].copy_from_slice(&fixed);
        buf[fixed.len()..head_len].copy_from_slice(&ext);
        buf[head_len..head_len + backing_name.len()].copy_from_slice(backing_name);
        dev.write_at(0, &buf)?;
        dev.flush()?;
        Qcow2::open_with_backing(dev, opts.open.clone(), backing)
    }
}

/// Refuses a version the engine does not write, and version 2 with a feature it cannot hold
/// (as QEMU refuses `compat=0.10` with them).
fn check_version(opts: &CreateOptions) -> Result<()> {
    match opts.version {
        3 => Ok(()),
        2 if opts.beyond_version_2().is_some() => Err(Qcow2Error::Invalid(
            "a version 2 image has 16-bit refcounts, zlib compression, no lazy refcounts \
             and no extended L2 entries",
        )),
        2 => Ok(()),
        _ => Err(Qcow2Error::Invalid("the image version must be 2 or 3")),
    }
}

impl CreateOptions {
    /// The first option set here that a version 2 header cannot hold, named as qemu-img's
    /// `-o` key (`lazy_refcounts`, `extended_l2`, `compression_type`, `refcount_bits`), or
    /// `None`.
    pub fn beyond_version_2(&self) -> Option<&'static str> {
        if self.lazy_refcounts {
            Some("lazy_refcounts")
        } else if self.extended_l2 {
            Some("extended_l2")
        } else if self.compression_type != CompressionType::Zlib {
            Some("compression_type")
        } else if self.refcount_bits != 16 {
            Some("refcount_bits")
        } else {
            None
        }
    }
}
