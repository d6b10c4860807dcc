//! Geometry of an image: cluster size, table sizes, refcount width, and the arithmetic that
//! maps guest and host offsets onto table indices.

/// Smallest cluster size (bits) the format allows.
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster size (bits) this engine (like QEMU) accepts.
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Largest L1 table (bytes) accepted, as QEMU: bigger tables mean a bigger cluster size.
pub const MAX_L1_BYTES: u64 = 32 * 1024 * 1024;
/// Largest refcount table (bytes) accepted, as QEMU.
pub const MAX_REFCOUNT_TABLE_BYTES: u64 = 8 * 1024 * 1024;
/// Host offsets in tables have 56 bits (bits 9..=55).
pub const MAX_HOST_OFFSET: u64 = 1 << 56;

/// The fixed geometry of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// log2 of the number of entries in an L2 table.
    pub l2_bits: u32,
    /// log2 of the refcount width in bits (0..=6).
    pub refcount_order: u32,
    /// log2 of the number of entries in a refcount block.
    pub rb_bits: u32,
    /// Extended L2 entries (incompatible bit 4): 16-byte L2 entries whose second word holds
    /// the allocation and zero bitmaps of the cluster's 32 subclusters.
    pub extended_l2: bool,
}

impl Geometry {
    /// The geometry for a cluster size (`cluster_bits` 9..=21) and refcount order (0..=6).
    pub fn new(cluster_bits: u32, refcount_order: u32) -> Self {
        Geometry {
            cluster_bits,
            l2_bits: cluster_bits - 3,
            refcount_order,
            rb_bits: cluster_bits + 3 - refcount_order,
            extended_l2: false,
        }
    }

    /// The same geometry with extended L2 entries on or off (an L2 table then holds half as
    /// many entries).
    pub fn with_extended_l2(mut self, on: bool) -> Self {
        self.extended_l2 = on;
        self.l2_bits = self.cluster_bits - if on { 4 } else { 3 };
        self
    }

    /// Bytes of one L2 entry: 8, or 16 with extended L2 entries.
    pub fn l2_entry_bytes(&self) -> usize {
        if self.extended_l2 { 16 } else { 8 }
    }

    /// Bytes of one subcluster (a cluster has 32 with extended L2 entries, else 1).
    pub fn subcluster_size(&self) -> u64 {
        if self.extended_l2 {
            self.cluster_size() / 32
        } else {
            self.cluster_size()
        }
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Entries in an L2 table.
    pub fn l2_entries(&self) -> u64 {
        1 << self.l2_bits
    }

    /// Entries in a refcount block.
    pub fn rb_entries(&self) -> u64 {
        1 << self.rb_bits
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Largest refcount a block entry can hold.
    pub fn refcount_max(&self) -> u64 {
        if self.refcount_order == 6 {
            u64::MAX
        } else {
            (1u64 << self.refcount_bits()) - 1
        }
    }

    /// Guest bytes covered by one L2 table.
    pub fn l2_coverage(&self) -> u64 {
        1 << (self.cluster_bits + self.l2_bits)
    }

    /// L1 entries needed for a virtual size.
    pub fn l1_entries_for(&self, virtual_size: u64) -> u64 {
        virtual_size.div_ceil(self.l2_coverage())
    }

    /// Clusters needed to hold `bytes`.
    pub fn clusters_for(&self, bytes: u64) -> u64 {
        bytes.div_ceil(self.cluster_size())
    }

    /// Offset of `x` inside its cluster.
    pub fn in_cluster(&self, x: u64) -> u64 {
        x & (self.cluster_size() - 1)
    }

    /// Where guest byte `pos` lies: its guest cluster, the offset inside that cluster, and
    /// the cluster's index in its L2 table.
    pub fn locate(&self, pos: u64) -> (u64, u64, u64) {
        let vc = pos >> self.cluster_bits;
        (vc, self.in_cluster(pos), vc & (self.l2_entries() - 1))
    }
}

/// An upper bound of the host bytes an image of `virtual_size` can ever need with this
/// engine: header, L1, every L2 table, every data cluster, the refcount structures that
/// count all of them, the space an outgrown refcount table leaves behind, and the clusters
/// freed but not yet reusable between two flushes. The runner sizes a raw virtio-blk device
/// with it. Saturates at `u64::MAX` for absurd arguments.
pub fn max_image_len(virtual_size: u64, cluster_size: u64, refcount_bits: u32) -> u64 {
    if !cluster_size.is_power_of_two()
        || !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_size.trailing_zeros())
        || !refcount_bits.is_power_of_two()
        || refcount_bits > 64
    {
        return u64::MAX;
    }
    let g = Geometry::new(
        cluster_size.trailing_zeros(),
        refcount_bits.trailing_zeros(),
    );
    let l1 = g.l1_entries_for(virtual_size);
    let fixed = 1u64 // header
        .saturating_add(g.clusters_for(l1.saturating_mul(8)))
        .saturating_add(l1.saturating_mul(2)) // L2 tables (twice as many with extended L2)
        .saturating_add(g.clusters_for(virtual_size)) // data
        .saturating_add(crate::qcow2::allocator::PENDING_FREE_LIMIT); // freed, not yet reusable
    // Refcount blocks and table that count everything, themselves included.
    let mut blocks = 0u64;
    let mut table = 0u64;
    for _ in 0..64 {
        let total = fixed
            .saturating_add(blocks)
            .saturating_add(table.saturating_mul(2));
        let b = total.div_ceil(g.rb_entries());
        let t = g.clusters_for(b.saturating_mul(8));
        if b == blocks && t == table {
            break;
        }
        blocks = b;
        table = t;
    }
    // The table may have been grown by doubling: the old copies are at most as big again.
    let total = fixed
        .saturating_add(blocks)
        .saturating_add(table.saturating_mul(2))
        .saturating_add(2);
    total.saturating_mul(cluster_size)
}
