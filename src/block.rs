//! Block devices: the byte-addressed storage the qcow2 engine sits on.
//!
//! [`BlockDevice`] is the one interface between the engine and storage. It is byte-addressed
//! (any offset, any length) so the engine never has to think about sectors; devices that can
//! only move whole sectors (virtio-blk) implement [`SectorDevice`] and are wrapped in
//! [`Sectored`], which does the read-modify-write of unaligned edges.
//!
//! Ordering: writes may be reordered by the device until [`BlockDevice::flush`] returns, so
//! `flush` is the write-ordering barrier the engine uses (data before the L2 entry that points
//! at it, refcount increments before references).

use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

pub mod telemetry;

/// What a block device can fail with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockError {
    /// The request reaches past the end of the device.
    OutOfRange {
        /// First byte of the request.
        offset: u64,
        /// Length of the request in bytes.
        len: u64,
        /// Capacity of the device in bytes.
        capacity: u64,
    },
    /// The device is read-only and the request would change it.
    ReadOnly,
    /// The device does not implement this operation.
    Unsupported,
    /// The device (or the host behind it) reported an I/O error.
    Io,
}

impl fmt::Display for BlockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlockError::OutOfRange {
                offset,
                len,
                capacity,
            } => write!(
                f,
                "request of {len} bytes at offset {offset} reaches past the device's end ({capacity} bytes)"
            ),
            BlockError::ReadOnly => f.write_str("the device is read-only"),
            BlockError::Unsupported => f.write_str("the device does not support this operation"),
            BlockError::Io => f.write_str("the device reported an I/O error"),
        }
    }
}

impl core::error::Error for BlockError {}

/// Checks that `len` bytes at `offset` fit in a device of `capacity` bytes.
pub fn check_range(offset: u64, len: u64, capacity: u64) -> Result<(), BlockError> {
    match offset.checked_add(len) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(BlockError::OutOfRange {
            offset,
            len,
            capacity,
        }),
    }
}

/// Byte-addressed storage with positioned reads and writes, flush, discard and write-zeroes.
pub trait BlockDevice {
    /// Size of the device in bytes. Requests must end at or before it.
    fn capacity(&self) -> u64;

    /// Whether writes, discards and write-zeroes are refused.
    fn is_read_only(&self) -> bool {
        false
    }

    /// Reads `buf.len()` bytes starting at byte `offset`.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError>;

    /// Writes `buf` starting at byte `offset`. Not durable until [`BlockDevice::flush`].
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), BlockError>;

    /// Write barrier: every write that completed before this call is durable when it returns.
    fn flush(&mut self) -> Result<(), BlockError>;

    /// Tells the device that `len` bytes at `offset` are no longer needed. A hint: the bytes
    /// may read back as anything afterwards. The default does nothing.
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), BlockError> {
        check_range(offset, len, self.capacity())?;
        if self.is_read_only() {
            return Err(BlockError::ReadOnly);
        }
        Ok(())
    }

    /// Makes `len` bytes at `offset` read as zeros. The default writes zero buffers.
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), BlockError> {
        check_range(offset, len, self.capacity())?;
        zero_by_writing(self, offset, len)
    }

    /// Where the stored data ends, if the device knows: every byte at or past this offset
    /// reads as zeros (a host file's length, a growable memory disk's end). The qcow2 engine
    /// then skips writing zeros into new clusters there. The default promises nothing.
    fn zeroes_from(&self) -> Option<u64> {
        None
    }

    /// Asks for a longer device (one whose host file grows on demand, see
    /// [`crate::hostfile`]): at least `need` bytes, `want` if it can. With `wait`, returns
    /// once the capacity reaches `need`, the host refused, or a bounded time passed;
    /// without, only sends the request (or looks for the answer to an earlier one) and
    /// returns at once (`grow(0, 0, false)` only takes a capacity that changed). Either way
    /// new bytes read as zeros. Returns whether the capacity is now at least `need`. The
    /// default (a device of fixed size) asks nothing.
    fn grow(&mut self, need: u64, want: u64, wait: bool) -> bool {
        let _ = (want, wait);
        self.capacity() >= need
    }

    /// Asks for a shorter device (its host file cut to `len` bytes), waiting a bounded time
    /// for the answer. The caller uses nothing at or past `len` and writes nothing there
    /// from now on. Returns whether the capacity is now at most `len`. The default (a device
    /// of fixed size) asks nothing.
    fn cut(&mut self, len: u64) -> bool {
        self.capacity() <= len
    }
}

impl<D: BlockDevice + ?Sized> BlockDevice for &mut D {
    fn capacity(&self) -> u64 {
        (**self).capacity()
    }
    fn is_read_only(&self) -> bool {
        (**self).is_read_only()
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        (**self).read_at(offset, buf)
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), BlockError> {
        (**self).write_at(offset, buf)
    }
    fn flush(&mut self) -> Result<(), BlockError> {
        (**self).flush()
    }
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), BlockError> {
        (**self).discard(offset, len)
    }
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), BlockError> {
        (**self).write_zeroes(offset, len)
    }
    fn zeroes_from(&self) -> Option<u64> {
        (**self).zeroes_from()
    }
    fn grow(&mut self, need: u64, want: u64, wait: bool) -> bool {
        (**self).grow(need, want, wait)
    }
    fn cut(&mut self, len: u64) -> bool {
        (**self).cut(len)
    }
}

/// A device that moves whole sectors only (virtio-blk): the kernel implements this, and
/// [`Sectored`] turns it into a byte-addressed [`BlockDevice`].
pub trait SectorDevice {
    /// Sector size in bytes (a power of two, usually 512).
    fn sector_size(&self) -> u32;
    /// Number of sectors.
    fn sector_count(&self) -> u64;
    /// Whether the device refuses writes.
    fn is_read_only(&self) -> bool {
        false
    }
    /// Reads whole sectors starting at `sector`; `buf.len()` is a multiple of the sector size.
    fn read_sectors(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), BlockError>;
    /// Writes whole sectors starting at `sector`; `buf.len()` is a multiple of the sector size.
    fn write_sectors(&mut self, sector: u64, buf: &[u8]) -> Result<(), BlockError>;
    /// Write barrier, as [`BlockDevice::flush`].
    fn flush(&mut self) -> Result<(), BlockError>;
    /// Discards whole sectors, if the device can. The default does nothing.
    fn discard_sectors(&mut self, _sector: u64, _count: u64) -> Result<(), BlockError> {
        Ok(())
    }
    /// Zeroes whole sectors; `None` when the device has no such command (the caller then
    /// writes zero buffers).
    fn write_zeroes_sectors(
        &mut self,
        _sector: u64,
        _count: u64,
    ) -> Option<Result<(), BlockError>> {
        None
    }
    /// As [`BlockDevice::grow`], in bytes. The default (a fixed device) asks nothing.
    fn grow(&mut self, need: u64, want: u64, wait: bool) -> bool {
        let _ = (want, wait);
        self.sector_count()
            .saturating_mul(u64::from(self.sector_size()))
            >= need
    }
    /// As [`BlockDevice::cut`], in bytes. The default (a fixed device) asks nothing.
    fn cut(&mut self, len: u64) -> bool {
        self.sector_count()
            .saturating_mul(u64::from(self.sector_size()))
            <= len
    }
}

/// Byte-addressed access to a [`SectorDevice`]: aligned requests go straight through,
/// unaligned head and tail sectors are read, patched and written back.
pub struct Sectored<S> {
    inner: S,
    scratch: Vec<u8>,
}

impl<S: SectorDevice> Sectored<S> {
    /// Wraps a sector device.
    pub fn new(inner: S) -> Self {
        let sector = inner.sector_size() as usize;
        Sectored {
            inner,
            scratch: vec![0; sector],
        }
    }

    /// The wrapped device.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// The wrapped device, mutably.
    pub fn inner_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    fn sector(&self) -> u64 {
        self.inner.sector_size() as u64
    }
}

impl<S: SectorDevice> BlockDevice for Sectored<S> {
    fn capacity(&self) -> u64 {
        self.inner.sector_count() * self.sector()
    }

    fn is_read_only(&self) -> bool {
        self.inner.is_read_only()
    }

    fn read_at(&mut self, mut offset: u64, mut buf: &mut [u8]) -> Result<(), BlockError> {
        check_range(offset, buf.len() as u64, self.capacity())?;
        let ss = self.sector();
        // Unaligned head (or a request that fits inside one sector).
        let head = offset % ss;
        if head != 0 || (buf.len() as u64) < ss {
            let n = ((ss - head) as usize).min(buf.len());
            self.inner.read_sectors(offset / ss, &mut self.scratch)?;
            buf[..n].copy_from_slice(&self.scratch[head as usize..head as usize + n]);
            offset += n as u64;
            buf = &mut buf[n..];
        }
        // Aligned middle, straight into the caller's buffer.
        let whole = (buf.len() as u64 / ss * ss) as usize;
        if whole > 0 {
            self.inner.read_sectors(offset / ss, &mut buf[..whole])?;
            offset += whole as u64;
            buf = &mut buf[whole..];
        }
        // Unaligned tail.
        if !buf.is_empty() {
            self.inner.read_sectors(offset / ss, &mut self.scratch)?;
            let n = buf.len();
            buf.copy_from_slice(&self.scratch[..n]);
        }
        Ok(())
    }

    fn write_at(&mut self, mut offset: u64, mut buf: &[u8]) -> Result<(), BlockError> {
        check_range(offset, buf.len() as u64, self.capacity())?;
        if self.inner.is_read_only() {
            return Err(BlockError::ReadOnly);
        }
        let ss = self.sector();
        let head = offset % ss;
        if head != 0 || (buf.len() as u64) < ss {
            let n = ((ss - head) as usize).min(buf.len());
            let sector = offset / ss;
            self.inner.read_sectors(sector, &mut self.scratch)?;
            self.scratch[head as usize..head as usize + n].copy_from_slice(&buf[..n]);
            self.inner.write_sectors(sector, &self.scratch)?;
            offset += n as u64;
            buf = &buf[n..];
        }
        let whole = (buf.len() as u64 / ss * ss) as usize;
        if whole > 0 {
            self.inner.write_sectors(offset / ss, &buf[..whole])?;
            offset += whole as u64;
            buf = &buf[whole..];
        }
        if !buf.is_empty() {
            let sector = offset / ss;
            self.inner.read_sectors(sector, &mut self.scratch)?;
            self.scratch[..buf.len()].copy_from_slice(buf);
            self.inner.write_sectors(sector, &self.scratch)?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), BlockError> {
        self.inner.flush()
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<(), BlockError> {
        check_range(offset, len, self.capacity())?;
        if self.inner.is_read_only() {
            return Err(BlockError::ReadOnly);
        }
        // Only whole sectors inside the range can be dropped; the edges are kept.
        let ss = self.sector();
        let first = offset.div_ceil(ss);
        let end = (offset + len) / ss;
        if end > first {
            self.inner.discard_sectors(first, end - first)?;
        }
        Ok(())
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), BlockError> {
        check_range(offset, len, self.capacity())?;
        if self.inner.is_read_only() {
            return Err(BlockError::ReadOnly);
        }
        let ss = self.sector();
        let first = offset.div_ceil(ss);
        let end = (offset + len) / ss;
        if end > first
            && let Some(result) = self.inner.write_zeroes_sectors(first, end - first)
        {
            result?;
            // Zero the unaligned edges by writing.
            let head_len = first * ss - offset;
            zero_by_writing(self, offset, head_len)?;
            let tail_start = end * ss;
            return zero_by_writing(self, tail_start, offset + len - tail_start);
        }
        zero_by_writing(self, offset, len)
    }

    fn grow(&mut self, need: u64, want: u64, wait: bool) -> bool {
        self.inner.grow(need, want, wait)
    }

    fn cut(&mut self, len: u64) -> bool {
        self.inner.cut(len)
    }
}

/// Zeroes a range by writing zero buffers (for devices without a write-zeroes command).
fn zero_by_writing<D: BlockDevice + ?Sized>(
    dev: &mut D,
    offset: u64,
    len: u64,
) -> Result<(), BlockError> {
    const CHUNK: u64 = 64 * 1024;
    if len == 0 {
        return Ok(());
    }
    let zeros = vec![0u8; CHUNK.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = CHUNK.min(len - done);
        dev.write_at(offset + done, &zeros[..n as usize])?;
        done += n;
    }
    Ok(())
}

/// A disk in memory, for tests. Discarded and zeroed ranges read as zeros. It can grow on
/// write (like a host file) or have a fixed capacity (like a virtio-blk device).
#[derive(Clone, Debug, Default)]
pub struct MemDisk {
    data: Vec<u8>,
    /// `Some(n)`: fixed capacity of `n` bytes. `None`: grows on write like a sparse file.
    fixed: Option<u64>,
    read_only: bool,
    /// Number of flushes issued, for tests that check ordering.
    pub flushes: u64,
}

impl MemDisk {
    /// An empty disk that grows on write, like a host file.
    pub fn growable() -> Self {
        MemDisk::default()
    }

    /// A zero-filled disk of a fixed capacity, like a virtio-blk device.
    pub fn fixed(capacity: u64) -> Self {
        MemDisk {
            data: vec![0; capacity as usize],
            fixed: Some(capacity),
            ..MemDisk::default()
        }
    }

    /// A disk holding `bytes` (fixed capacity when `fixed` is true).
    pub fn from_bytes(bytes: Vec<u8>, fixed: bool) -> Self {
        let len = bytes.len() as u64;
        MemDisk {
            data: bytes,
            fixed: fixed.then_some(len),
            ..MemDisk::default()
        }
    }

    /// Makes the disk refuse writes.
    pub fn set_read_only(&mut self, read_only: bool) {
        self.read_only = read_only;
    }

    /// The disk's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }

    /// The disk's bytes, by value.
    pub fn into_bytes(self) -> Vec<u8> {
        self.data
    }
}

impl BlockDevice for MemDisk {
    fn capacity(&self) -> u64 {
        self.fixed.unwrap_or(u64::MAX / 2)
    }

    fn zeroes_from(&self) -> Option<u64> {
        // A growable disk reads zeros past its stored end; a fixed one promises nothing.
        self.fixed.is_none().then_some(self.data.len() as u64)
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        check_range(offset, buf.len() as u64, self.capacity())?;
        // Past the stored end of a growable disk reads as zeros, like a sparse file.
        let start = (offset.min(self.data.len() as u64)) as usize;
        let end = ((offset + buf.len() as u64).min(self.data.len() as u64)) as usize;
        let n = end - start;
        buf[..n].copy_from_slice(&self.data[start..end]);
        buf[n..].fill(0);
        Ok(())
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), BlockError> {
        check_range(offset, buf.len() as u64, self.capacity())?;
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        let end = (offset + buf.len() as u64) as usize;
        if end > self.data.len() {
            self.data.resize(end, 0);
        }
        self.data[offset as usize..end].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), BlockError> {
        self.flushes += 1;
        Ok(())
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.write_zeroes(offset, len)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), BlockError> {
        check_range(offset, len, self.capacity())?;
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        let start = (offset.min(self.data.len() as u64)) as usize;
        let end = ((offset + len).min(self.data.len() as u64)) as usize;
        self.data[start..end].fill(0);
        Ok(())
    }
}

#[cfg(any(test, feature = "std"))]
pub use file::FileDisk;

#[cfg(any(test, feature = "std"))]
mod file {
    use super::{BlockDevice, BlockError, check_range};
    use std::fs::{File, OpenOptions};
    use std::io;
    use std::os::unix::fs::FileExt;
    use std::path::Path;

    /// A host file as a block device (the `std` feature, and in tests). The file grows on write.
    #[derive(Debug)]
    pub struct FileDisk {
        file: File,
        read_only: bool,
        /// A fixed capacity ([`FileDisk::fixed_size`]); `None`: the file grows on write.
        fixed: Option<u64>,
    }

    impl FileDisk {
        /// Opens an existing file, read-write unless `read_only`.
        pub fn open(path: &Path, read_only: bool) -> io::Result<Self> {
            let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
            Ok(FileDisk {
                file,
                read_only,
                fixed: None,
            })
        }

        /// Creates (or truncates) a file for writing.
        pub fn create(path: &Path) -> io::Result<Self> {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(path)?;
            Ok(FileDisk {
                file,
                read_only: false,
                fixed: None,
            })
        }

        /// Wraps an open file.
        pub fn from_file(file: File, read_only: bool) -> Self {
            FileDisk {
                file,
                read_only,
                fixed: None,
            }
        }

        /// The same file with its current length as a fixed capacity: requests past it are
        /// refused (a raw disk, whose size is the file's).
        pub fn fixed_size(mut self) -> io::Result<Self> {
            self.fixed = Some(self.len()?);
            Ok(self)
        }

        /// The underlying file.
        pub fn file(&self) -> &File {
            &self.file
        }

        /// Current length of the file in bytes.
        pub fn len(&self) -> io::Result<u64> {
            Ok(self.file.metadata()?.len())
        }

        /// Whether the file is empty.
        pub fn is_empty(&self) -> io::Result<bool> {
            Ok(self.len()? == 0)
        }

        /// Sets the file's length (sparse when growing).
        pub fn set_len(&self, len: u64) -> io::Result<()> {
            self.file.set_len(len)
        }

        /// [`BlockDevice::read_at`] through a shared reference (positioned I/O: several
        /// threads may read and write one `FileDisk` at once). Past the end of the file
        /// reads as zeros, like a sparse file.
        pub fn pread(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
            check_range(offset, buf.len() as u64, self.capacity())?;
            let mut done = 0;
            while done < buf.len() {
                match self.file.read_at(&mut buf[done..], offset + done as u64) {
                    Ok(0) => {
                        buf[done..].fill(0);
                        break;
                    }
                    Ok(n) => done += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(io_error(e)),
                }
            }
            Ok(())
        }

        /// [`BlockDevice::write_at`] through a shared reference (see [`FileDisk::pread`]).
        pub fn pwrite(&self, offset: u64, buf: &[u8]) -> Result<(), BlockError> {
            check_range(offset, buf.len() as u64, self.capacity())?;
            if self.read_only {
                return Err(BlockError::ReadOnly);
            }
            self.file.write_all_at(buf, offset).map_err(io_error)
        }
    }

    fn io_error(e: io::Error) -> BlockError {
        log::error!("host file I/O error: {e}");
        BlockError::Io
    }

    impl BlockDevice for FileDisk {
        fn capacity(&self) -> u64 {
            // A host file grows on write; bound it to what offsets can express.
            self.fixed.unwrap_or(i64::MAX as u64)
        }

        fn zeroes_from(&self) -> Option<u64> {
            // Past its length a file reads as zeros.
            self.file.metadata().ok().map(|m| m.len())
        }

        fn is_read_only(&self) -> bool {
            self.read_only
        }

        fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
            self.pread(offset, buf)
        }

        fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), BlockError> {
            self.pwrite(offset, buf)
        }

        fn flush(&mut self) -> Result<(), BlockError> {
            if self.read_only {
                return Ok(());
            }
            self.file.sync_data().map_err(io_error)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sector device over a MemDisk that checks every request is whole sectors.
    struct Strict {
        disk: MemDisk,
    }

    impl SectorDevice for Strict {
        fn sector_size(&self) -> u32 {
            512
        }
        fn sector_count(&self) -> u64 {
            self.disk.capacity() / 512
        }
        fn read_sectors(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), BlockError> {
            assert_eq!(buf.len() % 512, 0);
            self.disk.read_at(sector * 512, buf)
        }
        fn write_sectors(&mut self, sector: u64, buf: &[u8]) -> Result<(), BlockError> {
            assert_eq!(buf.len() % 512, 0);
            self.disk.write_at(sector * 512, buf)
        }
        fn flush(&mut self) -> Result<(), BlockError> {
            Ok(())
        }
    }

    #[test]
    fn sectored_unaligned_io_matches_model() {
        let mut dev = Sectored::new(Strict {
            disk: MemDisk::fixed(8192),
        });
        let mut model = vec![0u8; 8192];
        let mut rng = fastrand::Rng::with_seed(1);
        for i in 0..500u32 {
            let off = rng.u64(..8000);
            let len = rng.u64(..1500).min(8192 - off);
            let data: Vec<u8> = (0..len).map(|j| (i as u64 + j) as u8).collect();
            dev.write_at(off, &data).unwrap();
            model[off as usize..(off + len) as usize].copy_from_slice(&data);
            let mut back = vec![0u8; len as usize];
            let roff = rng.u64(..=8192 - len);
            dev.read_at(roff, &mut back).unwrap();
            assert_eq!(back, model[roff as usize..(roff + len) as usize]);
        }
        assert!(dev.read_at(8000, &mut [0u8; 200]).is_err());
    }

    #[test]
    fn sectored_write_zeroes_keeps_edges() {
        let mut dev = Sectored::new(Strict {
            disk: MemDisk::from_bytes(vec![0xAA; 4096], true),
        });
        dev.write_zeroes(100, 2000).unwrap();
        let mut back = vec![0u8; 4096];
        dev.read_at(0, &mut back).unwrap();
        assert!(back[..100].iter().all(|&b| b == 0xAA));
        assert!(back[100..2100].iter().all(|&b| b == 0));
        assert!(back[2100..].iter().all(|&b| b == 0xAA));
    }

    #[test]
    fn growable_mem_disk_reads_zeros_past_end() {
        let mut d = MemDisk::growable();
        d.write_at(10, b"abc").unwrap();
        let mut buf = [9u8; 20];
        d.read_at(0, &mut buf).unwrap();
        assert_eq!(&buf[10..13], b"abc");
        assert_eq!(buf[0], 0);
        assert_eq!(buf[19], 0);
    }
}
