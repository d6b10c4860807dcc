//! How block requests are cut up and tracked on a request-queue device (virtio-blk, virtio
//! 1.x section 5.2), as plain functions: the kernel's driver only moves the descriptors.
//!
//! - [`Limits::negotiate`]: the device's configuration (block size, `size_max`, `seg_max`,
//!   discard and write-zeroes limits) turned into what one request may carry;
//! - [`transfer_pieces`], [`range_pieces`], [`segments`]: a read or write cut into requests
//!   of at most [`Limits::request_max`] bytes, each into data segments of at most
//!   [`Limits::segment_max`]; a discard or write-zeroes into ranges of whole blocks;
//! - [`descriptors_needed`], [`header`], [`range_segment`], [`status_result`]: the bytes of
//!   the request header and range segment, and what the status byte means;
//! - [`Slots`]: the requests on the queue, found again by the token the queue handed out.

use crate::block::BlockError;

/// virtio-blk addresses the disk in 512-byte units whatever its logical block size.
pub const VIRTIO_SECTOR: u64 = 512;
/// Largest data transfer of one request when the device sets no limit.
pub const MAX_REQUEST_BYTES: usize = 4 << 20;
/// Largest number of data segments one request carries.
pub const MAX_SEGMENTS: usize = 32;

/// Request types (virtio 1.x, 5.2.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    /// `VIRTIO_BLK_T_IN`: read.
    Read,
    /// `VIRTIO_BLK_T_OUT`: write.
    Write,
    /// `VIRTIO_BLK_T_FLUSH`: write barrier.
    Flush,
    /// `VIRTIO_BLK_T_DISCARD`.
    Discard,
    /// `VIRTIO_BLK_T_WRITE_ZEROES`.
    WriteZeroes,
}

impl RequestType {
    /// The type code in the request header.
    pub fn code(self) -> u32 {
        match self {
            RequestType::Read => 0,
            RequestType::Write => 1,
            RequestType::Flush => 4,
            RequestType::Discard => 11,
            RequestType::WriteZeroes => 13,
        }
    }
}

/// What one request may carry on this device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Logical block size in bytes: the unit of every request.
    pub block_size: u32,
    /// Largest data segment in bytes.
    pub segment_max: usize,
    /// Largest data transfer of one request, a whole number of blocks.
    pub request_max: usize,
    /// Largest discard range in 512-byte sectors (0: no discard).
    pub max_discard_sectors: u64,
    /// Largest write-zeroes range in 512-byte sectors (0: no write-zeroes).
    pub max_write_zeroes_sectors: u64,
}

/// The configuration fields [`Limits::negotiate`] reads; `None` when the feature bit that
/// makes the field valid was not negotiated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceConfig {
    /// `blk_size` (`VIRTIO_BLK_F_BLK_SIZE`).
    pub blk_size: Option<u32>,
    /// `size_max` (`VIRTIO_BLK_F_SIZE_MAX`).
    pub size_max: Option<u32>,
    /// `seg_max` (`VIRTIO_BLK_F_SEG_MAX`).
    pub seg_max: Option<u32>,
    /// `max_discard_sectors` (`VIRTIO_BLK_F_DISCARD`).
    pub max_discard_sectors: Option<u32>,
    /// `max_write_zeroes_sectors` (`VIRTIO_BLK_F_WRITE_ZEROES`).
    pub max_write_zeroes_sectors: Option<u32>,
}

impl Limits {
    /// The limits of a device with configuration `cfg`. Values out of range are ignored: a
    /// block size that is not a power of two in 512..=65536 is 512, a `size_max` below one
    /// block or a `seg_max` of 0 sets no limit, and a zero discard or write-zeroes maximum
    /// means "as large as the field allows".
    pub fn negotiate(cfg: DeviceConfig) -> Limits {
        let block_size = cfg
            .blk_size
            .filter(|bs| bs.is_power_of_two() && (512..=65536).contains(bs))
            .unwrap_or(512);
        let bs = block_size as usize;
        let segment_max = cfg
            .size_max
            .filter(|&v| v as usize >= bs)
            .map_or(usize::MAX, |v| v as usize);
        let segments = cfg
            .seg_max
            .filter(|&v| v >= 1)
            .map_or(MAX_SEGMENTS, |v| MAX_SEGMENTS.min(v as usize));
        // Segments of `segment_max` bytes, but whole blocks per request, and at least one.
        let per_request = segment_max.saturating_mul(segments).min(MAX_REQUEST_BYTES);
        let request_max = (per_request / bs * bs).max(bs);
        let sectors_cap = |v: u32| {
            if v == 0 {
                u64::from(u32::MAX >> 1)
            } else {
                u64::from(v)
            }
        };
        Limits {
            block_size,
            segment_max: segment_max.max(bs),
            request_max,
            max_discard_sectors: cfg.max_discard_sectors.map_or(0, sectors_cap),
            max_write_zeroes_sectors: cfg.max_write_zeroes_sectors.map_or(0, sectors_cap),
        }
    }

    /// 512-byte sectors per logical block.
    pub fn sectors_per_block(&self) -> u64 {
        u64::from(self.block_size) / VIRTIO_SECTOR
    }

    /// The first 512-byte sector of `count` blocks from `block` on a device of
    /// `capacity_sectors`, or why they do not fit.
    pub fn check_blocks(
        &self,
        block: u64,
        count: u64,
        capacity_sectors: u64,
    ) -> Result<u64, BlockError> {
        let per_block = self.sectors_per_block();
        let total = capacity_sectors / per_block;
        let bs = u64::from(self.block_size);
        match block.checked_add(count) {
            Some(end) if end <= total => Ok(block * per_block),
            _ => Err(BlockError::OutOfRange {
                offset: block.saturating_mul(bs),
                len: count.saturating_mul(bs),
                capacity: total * bs,
            }),
        }
    }
}

/// One request of a cut-up transfer: `len` bytes at byte `offset` of the caller's buffer go
/// to or from the device at 512-byte sector `sector`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// First 512-byte sector on the device.
    pub sector: u64,
    /// Offset in the caller's buffer.
    pub offset: usize,
    /// Bytes.
    pub len: usize,
}

/// Cuts a transfer of `len` bytes starting at sector `sector` into requests of at most
/// `request_max` bytes (a multiple of 512), in order.
pub fn transfer_pieces(sector: u64, len: usize, request_max: usize) -> impl Iterator<Item = Piece> {
    let step = request_max.max(VIRTIO_SECTOR as usize);
    (0..len).step_by(step).map(move |offset| Piece {
        sector: sector + offset as u64 / VIRTIO_SECTOR,
        offset,
        len: step.min(len - offset),
    })
}

/// Cuts `count` sectors from `sector` into (sector, count) ranges of at most `max` sectors,
/// each a whole number of blocks of `per_block` sectors (at least one block), in order.
pub fn range_pieces(
    sector: u64,
    count: u64,
    max: u64,
    per_block: u64,
) -> impl Iterator<Item = (u64, u64)> {
    let per_block = per_block.max(1);
    let step = (max / per_block * per_block).max(per_block);
    let mut done = 0u64;
    core::iter::from_fn(move || {
        (done < count).then(|| {
            let n = step.min(count - done);
            let piece = (sector + done, n);
            done += n;
            piece
        })
    })
}

/// The data segments of a request of `len` bytes: byte ranges of at most `segment_max`.
pub fn segments(len: usize, segment_max: usize) -> impl Iterator<Item = core::ops::Range<usize>> {
    let step = segment_max.max(1);
    (0..len)
        .step_by(step)
        .map(move |start| start..(start + step).min(len))
}

/// Descriptors a request takes on the ring: header, data segments, status (and one range
/// segment for discard and write-zeroes); 1 with indirect descriptors.
pub fn descriptors_needed(
    kind: RequestType,
    len: usize,
    segment_max: usize,
    indirect: bool,
) -> usize {
    if indirect {
        return 1;
    }
    match kind {
        RequestType::Read | RequestType::Write => 2 + len.div_ceil(segment_max.max(1)),
        RequestType::Flush => 2,
        RequestType::Discard | RequestType::WriteZeroes => 3,
    }
}

/// The 16-byte request header: type, reserved, sector (0 for flush, discard, write-zeroes,
/// whose ranges travel in their own segment).
pub fn header(kind: RequestType, sector: u64) -> [u8; 16] {
    let sector = match kind {
        RequestType::Read | RequestType::Write => sector,
        _ => 0,
    };
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.code().to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

/// The 16-byte range segment of a discard or write-zeroes request. Write-zeroes sets the
/// `unmap` flag (the device may deallocate, the range reads as zeros either way); discard
/// must leave it clear.
pub fn range_segment(kind: RequestType, sector: u64, count: u32) -> [u8; 16] {
    const UNMAP: u32 = 1;
    let flags = if kind == RequestType::WriteZeroes {
        UNMAP
    } else {
        0
    };
    let mut r = [0u8; 16];
    r[0..8].copy_from_slice(&sector.to_le_bytes());
    r[8..12].copy_from_slice(&count.to_le_bytes());
    r[12..16].copy_from_slice(&flags.to_le_bytes());
    r
}

/// What a request's status byte means (`VIRTIO_BLK_S_OK` 0, `IOERR` 1, `UNSUPP` 2; any
/// other value, including the 0xff a request is submitted with, is an I/O error).
pub fn status_result(status: u8) -> Result<(), BlockError> {
    match status {
        0 => Ok(()),
        2 => Err(BlockError::Unsupported),
        _ => Err(BlockError::Io),
    }
}

/// The state of one request slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    /// Unused.
    Free,
    /// Filled in, not on the queue yet (the queue was full).
    Prepared,
    /// On the queue under this token: the device owns its buffers.
    Busy(u16),
}

/// Bookkeeping of the requests a driver holds: up to `N` slots, each free, prepared or on
/// the queue under a token; completions are matched back to their slot by token. Prepared
/// slots are submitted in the order they were prepared.
#[derive(Debug, Clone)]
pub struct Slots<const N: usize> {
    states: [SlotState; N],
    /// Preparation order of each slot, to submit prepared slots first in, first out.
    order: [u64; N],
    next_order: u64,
}

impl<const N: usize> Default for Slots<N> {
    fn default() -> Self {
        Slots {
            states: [SlotState::Free; N],
            order: [0; N],
            next_order: 0,
        }
    }
}

impl<const N: usize> Slots<N> {
    /// The state of slot `i`.
    pub fn state(&self, i: usize) -> SlotState {
        self.states[i]
    }

    /// A free slot, marked prepared; `None` when every slot is taken.
    pub fn prepare(&mut self) -> Option<usize> {
        let i = self.states.iter().position(|s| *s == SlotState::Free)?;
        self.states[i] = SlotState::Prepared;
        self.order[i] = self.next_order;
        self.next_order += 1;
        Some(i)
    }

    /// The prepared slot to submit next (the one prepared first).
    pub fn next_prepared(&self) -> Option<usize> {
        (0..N)
            .filter(|&i| self.states[i] == SlotState::Prepared)
            .min_by_key(|&i| self.order[i])
    }

    /// Slot `i` went on the queue under `token`.
    pub fn submitted(&mut self, i: usize, token: u16) {
        debug_assert_eq!(self.states[i], SlotState::Prepared);
        self.states[i] = SlotState::Busy(token);
    }

    /// The slot on the queue under `token`, now free; `None` for a token no slot holds (a
    /// device bug: the caller logs it).
    pub fn complete(&mut self, token: u16) -> Option<usize> {
        let i = self
            .states
            .iter()
            .position(|s| *s == SlotState::Busy(token))?;
        self.states[i] = SlotState::Free;
        Some(i)
    }

    /// The slot on the queue under `token`, without freeing it.
    pub fn find(&self, token: u16) -> Option<usize> {
        self.states
            .iter()
            .position(|s| *s == SlotState::Busy(token))
    }

    /// Frees slot `i` (a prepared request that will not be submitted, or a completed one).
    pub fn release(&mut self, i: usize) {
        self.states[i] = SlotState::Free;
    }

    /// Drops every prepared request (after an error: queue nothing more).
    pub fn drop_prepared(&mut self) {
        for s in self.states.iter_mut() {
            if *s == SlotState::Prepared {
                *s = SlotState::Free;
            }
        }
    }

    /// Requests on the queue.
    pub fn busy(&self) -> usize {
        self.states
            .iter()
            .filter(|s| matches!(s, SlotState::Busy(_)))
            .count()
    }

    /// Whether no slot is prepared or busy.
    pub fn is_idle(&self) -> bool {
        self.states.iter().all(|s| *s == SlotState::Free)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    #[test]
    fn limits_default_to_4_mib_requests_of_512_byte_blocks() {
        let l = Limits::negotiate(DeviceConfig::default());
        assert_eq!(l.block_size, 512);
        assert_eq!(l.segment_max, usize::MAX);
        assert_eq!(l.request_max, MAX_REQUEST_BYTES);
        assert_eq!((l.max_discard_sectors, l.max_write_zeroes_sectors), (0, 0));
    }

    #[test]
    fn limits_follow_qemus_virtio_blk_configuration() {
        // QEMU 7.2: seg_max = queue size - 2, size_max unset, discard and write-zeroes limits.
        let l = Limits::negotiate(DeviceConfig {
            blk_size: Some(512),
            size_max: None,
            seg_max: Some(126),
            max_discard_sectors: Some(0x3fff_ffff),
            max_write_zeroes_sectors: Some(0x3fff_ffff),
        });
        assert_eq!(l.request_max, MAX_REQUEST_BYTES);
        assert_eq!(l.max_discard_sectors, 0x3fff_ffff);
        // A zero maximum means "no limit of its own".
        let l = Limits::negotiate(DeviceConfig {
            max_discard_sectors: Some(0),
            ..DeviceConfig::default()
        });
        assert_eq!(l.max_discard_sectors, u64::from(u32::MAX >> 1));
    }

    #[test]
    fn small_segments_bound_the_request_to_whole_blocks() {
        // 4 segments of 6000 bytes: 24000 bytes, cut to 5 blocks of 4096.
        let l = Limits::negotiate(DeviceConfig {
            blk_size: Some(4096),
            size_max: Some(6000),
            seg_max: Some(4),
            ..DeviceConfig::default()
        });
        assert_eq!(l.segment_max, 6000);
        assert_eq!(l.request_max, 5 * 4096);
        // size_max below a block: ignored (no limit), seg_max 0 ignored.
        let l = Limits::negotiate(DeviceConfig {
            blk_size: Some(4096),
            size_max: Some(1000),
            seg_max: Some(0),
            ..DeviceConfig::default()
        });
        assert_eq!(l.segment_max, usize::MAX);
        assert_eq!(l.request_max, MAX_REQUEST_BYTES);
        // One segment of exactly one block still carries a block.
        let l = Limits::negotiate(DeviceConfig {
            blk_size: Some(4096),
            size_max: Some(4096),
            seg_max: Some(1),
            ..DeviceConfig::default()
        });
        assert_eq!(l.request_max, 4096);
    }

    #[test]
    fn odd_block_sizes_fall_back_to_512() {
        for bs in [0, 256, 1000, 131072] {
            let l = Limits::negotiate(DeviceConfig {
                blk_size: Some(bs),
                ..DeviceConfig::default()
            });
            assert_eq!(l.block_size, 512, "blk_size {bs}");
        }
    }

    #[test]
    fn check_blocks_converts_and_bounds() {
        let l = Limits::negotiate(DeviceConfig {
            blk_size: Some(4096),
            ..DeviceConfig::default()
        });
        // 80 sectors = 10 blocks.
        assert_eq!(l.check_blocks(2, 8, 80), Ok(16));
        assert_eq!(
            l.check_blocks(2, 9, 80),
            Err(BlockError::OutOfRange {
                offset: 8192,
                len: 9 * 4096,
                capacity: 40960
            })
        );
        assert!(l.check_blocks(u64::MAX, 2, 80).is_err());
    }

    #[test]
    fn transfers_are_cut_in_order_and_cover_the_buffer() {
        let pieces: Vec<_> = transfer_pieces(100, 10 * 1024 + 512, 4096).collect();
        assert_eq!(pieces.len(), 3);
        assert_eq!(
            pieces[0],
            Piece {
                sector: 100,
                offset: 0,
                len: 4096
            }
        );
        assert_eq!(
            pieces[2],
            Piece {
                sector: 116,
                offset: 8192,
                len: 2560
            }
        );
        assert_eq!(pieces.iter().map(|p| p.len).sum::<usize>(), 10 * 1024 + 512);
        assert_eq!(transfer_pieces(0, 0, 4096).count(), 0);
    }

    #[test]
    fn ranges_are_whole_blocks_and_at_most_the_maximum() {
        let r: Vec<_> = range_pieces(8, 100, 30, 8).collect();
        // step = 24 sectors (3 blocks of 8).
        assert_eq!(r, [(8, 24), (32, 24), (56, 24), (80, 24), (104, 4)]);
        // A maximum below one block still moves a block per request.
        let r: Vec<_> = range_pieces(0, 16, 3, 8).collect();
        assert_eq!(r, [(0, 8), (8, 8)]);
        assert_eq!(range_pieces(0, 0, 8, 1).count(), 0);
    }

    #[test]
    fn segments_and_descriptors() {
        let s: Vec<_> = segments(10_000, 4096).collect();
        assert_eq!(s, [0..4096, 4096..8192, 8192..10_000]);
        let whole: Vec<_> = segments(100, usize::MAX).collect();
        assert_eq!((whole.len(), whole[0].clone()), (1, 0..100));
        assert_eq!(
            descriptors_needed(RequestType::Write, 10_000, 4096, false),
            5
        );
        assert_eq!(
            descriptors_needed(RequestType::Read, 10_000, usize::MAX, false),
            3
        );
        assert_eq!(descriptors_needed(RequestType::Flush, 0, 4096, false), 2);
        assert_eq!(descriptors_needed(RequestType::Discard, 0, 4096, false), 3);
        assert_eq!(
            descriptors_needed(RequestType::Read, 1 << 20, 4096, true),
            1
        );
    }

    #[test]
    fn header_and_range_bytes_follow_the_spec() {
        let h = header(RequestType::Write, 0x0102_0304_0506_0708);
        assert_eq!(&h[0..4], &1u32.to_le_bytes());
        assert_eq!(&h[4..8], &[0; 4]);
        assert_eq!(&h[8..16], &0x0102_0304_0506_0708u64.to_le_bytes());
        // Flush carries no sector.
        assert_eq!(header(RequestType::Flush, 77), {
            let mut e = [0u8; 16];
            e[0] = 4;
            e
        });
        let r = range_segment(RequestType::WriteZeroes, 9, 3);
        assert_eq!(&r[0..8], &9u64.to_le_bytes());
        assert_eq!(&r[8..12], &3u32.to_le_bytes());
        assert_eq!(&r[12..16], &1u32.to_le_bytes());
        assert_eq!(&range_segment(RequestType::Discard, 9, 3)[12..16], &[0; 4]);
    }

    #[test]
    fn status_bytes() {
        assert_eq!(status_result(0), Ok(()));
        assert_eq!(status_result(1), Err(BlockError::Io));
        assert_eq!(status_result(2), Err(BlockError::Unsupported));
        assert_eq!(status_result(0xff), Err(BlockError::Io));
    }

    #[test]
    fn slots_match_completions_by_token_in_any_order() {
        let mut s = Slots::<3>::default();
        let a = s.prepare().unwrap();
        let b = s.prepare().unwrap();
        let c = s.prepare().unwrap();
        assert_eq!(s.prepare(), None);
        assert_eq!(s.next_prepared(), Some(a));
        s.submitted(a, 7);
        assert_eq!(s.next_prepared(), Some(b));
        s.submitted(b, 3);
        s.submitted(c, 9);
        assert_eq!(s.busy(), 3);
        // Out of order, and a token nobody holds.
        assert_eq!(s.complete(9), Some(c));
        assert_eq!(s.complete(9), None);
        assert_eq!(s.find(7), Some(a));
        assert_eq!(s.complete(7), Some(a));
        assert_eq!(s.complete(3), Some(b));
        assert!(s.is_idle());
    }

    #[test]
    fn prepared_slots_go_out_first_in_first_out() {
        let mut s = Slots::<4>::default();
        let a = s.prepare().unwrap();
        let b = s.prepare().unwrap();
        s.submitted(a, 1);
        assert_eq!(s.complete(1), Some(a));
        // Slot `a` is reused after `b`: `b` still goes first.
        let c = s.prepare().unwrap();
        assert_eq!(c, a);
        assert_eq!(s.next_prepared(), Some(b));
        s.drop_prepared();
        assert!(s.is_idle());
    }
}
